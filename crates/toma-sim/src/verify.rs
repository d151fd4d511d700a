//! Version-stamped blocks: every 4 KiB block written carries its address and a version, so
//! a read tells exactly which write it returns, or that no write wrote it (P3).

pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"TOMASIMB";

/// The bytes of version `version` (≥ 1) of block `addr`.
pub fn block_bytes(addr: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    v[..8].copy_from_slice(MAGIC);
    v[8..16].copy_from_slice(&addr.to_le_bytes());
    v[16..24].copy_from_slice(&version.to_le_bytes());
    let mut x = addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_add(0x632B_E59B);
    for chunk in v[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    v
}

/// `Some(version)` (0: never written, all zeroes), or `None` for bytes no write wrote.
pub fn decode_block(addr: u64, data: &[u8]) -> Option<u64> {
    if data.iter().all(|b| *b == 0) {
        return Some(0);
    }
    if data.len() != BLOCK || &data[..8] != MAGIC {
        return None;
    }
    let a = u64::from_le_bytes(data[8..16].try_into().ok()?);
    let v = u64::from_le_bytes(data[16..24].try_into().ok()?);
    (a == addr && block_bytes(addr, v) == data).then_some(v)
}
