//! RAID6 parity: P and Q of a stripe's k data chunks, and the data back from any k of the
//! k + 2 shards, with `reed-solomon-simd` (Leopard-RS over GF(2^16), SSSE3/AVX2/NEON).
//!
//! Shard `i < k` is data chunk `i`, shard `k` is P and shard `k + 1` is Q (the crate's
//! recovery shards 0 and 1). The code works on 64-byte blocks independently, so the parity
//! of a byte range that starts and ends on a [`COLUMN_ALIGN`] boundary of every chunk is the
//! same range of the whole chunks' parity: a write of one 4 KiB block re-encodes 4 KiB
//! columns, not whole chunks (tested below).

use bytes::Bytes;

use crate::error::ClientError;

/// Column ranges are rounded out to this (the volume block size): whole 64-byte code blocks.
pub const COLUMN_ALIGN: u64 = toma_core::BLOCK_SIZE as u64;

fn codec_error(what: &str, e: reed_solomon_simd::Error) -> ClientError {
    ClientError::Protocol(format!("RAID6 {what}: {e}"))
}

/// P and Q of `data` (k shards of one length, even and non-zero).
///
/// Each thread keeps one encoder and reuses its working space (a new one per stripe
/// allocated and faulted in that space every time); P and Q come back in one allocation.
pub fn encode(data: &[&[u8]]) -> Result<(Bytes, Bytes), ClientError> {
    use reed_solomon_simd::ReedSolomonEncoder;
    use std::cell::RefCell;
    thread_local! {
        static ENCODER: RefCell<Option<ReedSolomonEncoder>> = const { RefCell::new(None) };
    }
    let len = data.first().map_or(0, |d| d.len());
    ENCODER.with(|cell| {
        let mut slot = cell.borrow_mut();
        let enc = match slot.as_mut() {
            Some(enc) => {
                enc.reset(data.len(), 2, len)
                    .map_err(|e| codec_error("encode", e))?;
                enc
            }
            None => slot.insert(
                ReedSolomonEncoder::new(data.len(), 2, len)
                    .map_err(|e| codec_error("encode", e))?,
            ),
        };
        for d in data {
            enc.add_original_shard(d)
                .map_err(|e| codec_error("encode", e))?;
        }
        let result = enc.encode().map_err(|e| codec_error("encode", e))?;
        let mut pq = Vec::with_capacity(2 * len);
        for i in 0..2 {
            let shard = result.recovery(i).ok_or_else(|| {
                ClientError::Protocol(format!("RAID6 encode: no recovery shard {i}"))
            })?;
            pq.extend_from_slice(shard);
        }
        let pq = Bytes::from(pq);
        Ok((pq.slice(..len), pq.slice(len..)))
    })
}

/// The k data shards from any k of the k + 2 shards (`(shard index, bytes)`, all one length).
pub fn reconstruct(k: usize, shards: &[(usize, Bytes)]) -> Result<Vec<Bytes>, ClientError> {
    let mut data: Vec<Option<Bytes>> = vec![None; k];
    let mut parity = Vec::new();
    for (i, b) in shards {
        match *i {
            i if i < k => data[i] = Some(b.clone()),
            i if i < k + 2 => parity.push((i - k, b.clone())),
            i => {
                return Err(ClientError::Protocol(format!(
                    "RAID6 shard index {i} out of 0..{}",
                    k + 2
                )))
            }
        }
    }
    if data.iter().any(Option::is_none) {
        let originals: Vec<(usize, Bytes)> = data
            .iter()
            .enumerate()
            .filter_map(|(i, d)| d.clone().map(|d| (i, d)))
            .collect();
        let restored = reed_solomon_simd::decode(k, 2, originals, parity)
            .map_err(|e| codec_error("reconstruct", e))?;
        for (i, d) in restored {
            if let Some(slot) = data.get_mut(i) {
                *slot = Some(Bytes::from(d));
            }
        }
    }
    data.into_iter()
        .enumerate()
        .map(|(i, d)| {
            d.ok_or_else(|| ClientError::Protocol(format!("RAID6: data shard {i} not restored")))
        })
        .collect()
}

/// `[lo, hi)` rounded out to [`COLUMN_ALIGN`], within `[0, chunk)`.
pub fn align_columns(lo: u64, hi: u64, chunk: u64) -> (u64, u64) {
    let lo = lo - lo % COLUMN_ALIGN;
    let hi = hi.div_ceil(COLUMN_ALIGN) * COLUMN_ALIGN;
    (lo, hi.min(chunk))
}

/// Checks a RAID6 volume's members straight from their extents (`(member, bytes)`, all
/// members present): for every stripe, P and Q must be those of its data chunks. Returns the
/// volume's data (the stripes' data chunks in order), or the first stripe whose parity is
/// wrong.
pub fn verify_members(
    t: &toma_core::Topology,
    members: &[(usize, Vec<u8>)],
) -> Result<Vec<u8>, String> {
    use toma_core::placement::raid6_shard_member;
    let k = t.layout.min_readable();
    let n = t.n();
    let chunk = t.chunk_size as usize;
    let mut by_member: Vec<Option<&[u8]>> = vec![None; n];
    for (i, b) in members {
        if let Some(slot) = by_member.get_mut(*i) {
            *slot = Some(b.as_slice());
        }
    }
    let Some(len) = by_member.iter().flatten().map(|b| b.len()).min() else {
        return Err("no member contents".into());
    };
    if let Some(missing) = by_member.iter().position(Option::is_none) {
        return Err(format!("member {missing}'s contents are missing"));
    }
    let stripes = len / chunk;
    let mut out = Vec::with_capacity(stripes * k * chunk);
    for s in 0..stripes {
        let shard = |i: usize| -> &[u8] {
            let m = raid6_shard_member(t, s as u64, i);
            let b = by_member[m].unwrap_or_default();
            &b[s * chunk..(s + 1) * chunk]
        };
        let data: Vec<&[u8]> = (0..k).map(shard).collect();
        let (p, q) = encode(&data).map_err(|e| e.to_string())?;
        for (name, i, want) in [("P", k, &p), ("Q", k + 1, &q)] {
            if shard(i) != &want[..] {
                let m = raid6_shard_member(t, s as u64, i);
                let at = shard(i).iter().zip(want.iter()).position(|(a, b)| a != b);
                return Err(format!(
                    "stripe {s}: {name} on member {m} does not match its data chunks (first difference at byte {})",
                    at.unwrap_or(0)
                ));
            }
        }
        for d in data {
            out.extend_from_slice(d);
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chunk(seed: u8, len: usize) -> Vec<u8> {
        (0..len)
            .map(|i| {
                (i as u8)
                    .wrapping_mul(31)
                    .wrapping_add(seed.wrapping_mul(7))
                    ^ seed
            })
            .collect()
    }

    #[test]
    fn any_two_lost_shards_come_back() {
        let k = 4;
        let len = 16384;
        let data: Vec<Vec<u8>> = (0..k).map(|i| chunk(i as u8 + 1, len)).collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let (p, q) = encode(&refs).unwrap();
        let mut all: Vec<Bytes> = data.iter().map(|d| Bytes::from(d.clone())).collect();
        all.push(p);
        all.push(q);
        for a in 0..k + 2 {
            for b in a + 1..k + 2 {
                let shards: Vec<(usize, Bytes)> = (0..k + 2)
                    .filter(|&i| i != a && i != b)
                    .map(|i| (i, all[i].clone()))
                    .collect();
                let got = reconstruct(k, &shards).unwrap();
                for (i, d) in got.iter().enumerate() {
                    assert_eq!(&d[..], &data[i][..], "lost {a} and {b}: data shard {i}");
                }
            }
        }
        // Fewer than k shards: a clear error, no panic.
        let e = reconstruct(k, &[(0, all[0].clone()), (4, all[4].clone())]).unwrap_err();
        assert!(e.to_string().contains("RAID6"), "{e}");
    }

    #[test]
    fn parity_of_aligned_columns_is_those_columns_of_the_whole_parity() {
        let k = 4;
        let len = 65536;
        let data: Vec<Vec<u8>> = (0..k).map(|i| chunk(i as u8 + 9, len)).collect();
        let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
        let (p, q) = encode(&refs).unwrap();
        for (lo, hi) in [(0, 4096), (4096, 8192), (61440, 65536), (8192, 40960)] {
            let cols: Vec<&[u8]> = data.iter().map(|d| &d[lo..hi]).collect();
            let (cp, cq) = encode(&cols).unwrap();
            assert_eq!(&cp[..], &p[lo..hi], "P of columns {lo}..{hi}");
            assert_eq!(&cq[..], &q[lo..hi], "Q of columns {lo}..{hi}");
        }
    }

    #[test]
    fn columns_round_out_to_blocks() {
        assert_eq!(align_columns(100, 200, 65536), (0, 4096));
        assert_eq!(align_columns(4096, 8193, 65536), (4096, 12288));
        assert_eq!(align_columns(0, 65536, 65536), (0, 65536));
    }
}
