//! A verifying workload: every 4 KiB block written carries its address and a version, and
//! every read is checked against what was acknowledged before it started and what was
//! issued before it ended (P1 durability, P3 validity). Each block has one owner task, so no
//! two writes of a block overlap, as with a file system.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use parking_lot::Mutex;
use toma_client::VolumeClient;

pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"TOMAVRFY";

/// The bytes of version `version` of block `addr`.
pub fn block_bytes(addr: u64, version: u64) -> Vec<u8> {
    let mut v = vec![0u8; BLOCK];
    v[..8].copy_from_slice(MAGIC);
    v[8..16].copy_from_slice(&addr.to_le_bytes());
    v[16..24].copy_from_slice(&version.to_le_bytes());
    let mut x =
        addr.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ version.wrapping_add(0x632B_E59B_D9B4_E019);
    for chunk in v[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let b = x.to_le_bytes();
        chunk.copy_from_slice(&b[..chunk.len()]);
    }
    v
}

/// What a block holds: `Some(version)` (0 = never written, all zeroes) or `None` when the
/// bytes are neither zeroes nor a whole version of this block.
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

/// One completed I/O, for latency statistics.
#[derive(Debug, Clone, Copy)]
pub struct IoRecord {
    pub start: Duration,
    pub end: Duration,
    pub write: bool,
    pub block: u64,
}

/// Shared state of a running workload.
pub struct Workload {
    /// The first block this workload owns (the volume's block `base + i` is its block `i`).
    base: u64,
    blocks: u64,
    acked: Vec<AtomicU64>,
    issued: Vec<AtomicU64>,
    stop: AtomicBool,
    pub errors: Mutex<Vec<String>>,
    pub records: Mutex<Vec<IoRecord>>,
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    origin: Instant,
}

impl Workload {
    pub fn new(blocks: u64, origin: Instant) -> Arc<Workload> {
        Self::with_base(0, blocks, origin)
    }

    /// A workload on the volume's blocks `base..base + blocks` only (several workloads, one
    /// per range, can share a volume).
    pub fn with_base(base: u64, blocks: u64, origin: Instant) -> Arc<Workload> {
        Arc::new(Workload {
            base,
            blocks,
            acked: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
            issued: (0..blocks).map(|_| AtomicU64::new(0)).collect(),
            stop: AtomicBool::new(false),
            errors: Mutex::new(Vec::new()),
            records: Mutex::new(Vec::new()),
            reads: AtomicU64::new(0),
            writes: AtomicU64::new(0),
            origin,
        })
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::SeqCst);
    }

    fn error(&self, e: String) {
        let mut errs = self.errors.lock();
        if errs.len() < 100 {
            errs.push(e);
        }
    }

    /// Runs worker `k` of `workers` until stopped (or `max_ops` done): writes to the blocks
    /// it owns, reads any block.
    /// `interval`: the time between this worker's operations (zero: as fast as it can).
    #[allow(clippy::too_many_arguments)]
    pub async fn run_worker(
        self: Arc<Self>,
        client: VolumeClient,
        k: u64,
        workers: u64,
        seed: u64,
        max_ops: u64,
        interval: Duration,
    ) {
        let mut pace = (!interval.is_zero()).then(|| {
            let mut i = tokio::time::interval(interval);
            i.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            i
        });
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(k + 1) | 1;
        let mut next = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let owned: Vec<u64> = (0..self.blocks).filter(|b| b % workers == k).collect();
        if owned.is_empty() {
            return;
        }
        for _ in 0..max_ops {
            if self.stop.load(Ordering::SeqCst) {
                return;
            }
            if let Some(p) = pace.as_mut() {
                p.tick().await;
            }
            let r = next();
            let start = self.origin.elapsed();
            if r % 10 < 6 {
                let idx = owned[(next() % owned.len() as u64) as usize];
                let addr = self.base + idx;
                let ver = self.issued[idx as usize].load(Ordering::SeqCst) + 1;
                self.issued[idx as usize].store(ver, Ordering::SeqCst);
                let data = Bytes::from(block_bytes(addr, ver));
                match client.write(addr * BLOCK as u64, data).await {
                    Ok(()) => {
                        self.acked[idx as usize].store(ver, Ordering::SeqCst);
                        self.writes.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => self.error(format!("write of block {addr} v{ver}: {e}")),
                }
                self.record(start, true, addr);
            } else {
                let idx = next() % self.blocks;
                let addr = self.base + idx;
                let floor = self.acked[idx as usize].load(Ordering::SeqCst);
                match client.read(addr * BLOCK as u64, BLOCK).await {
                    Ok(data) => {
                        let ceil = self.issued[idx as usize].load(Ordering::SeqCst);
                        match decode_block(addr, &data) {
                            Some(v) if v >= floor && v <= ceil => {}
                            Some(v) => self.error(format!(
                                "read of block {addr} returned version {v}, expected {floor}..={ceil}"
                            )),
                            None => self.error(format!(
                                "read of block {addr} returned bytes that no write wrote"
                            )),
                        }
                        self.reads.fetch_add(1, Ordering::Relaxed);
                    }
                    Err(e) => self.error(format!("read of block {addr}: {e}")),
                }
                self.record(start, false, addr);
            }
        }
    }

    fn record(&self, start: Duration, write: bool, block: u64) {
        let end = self.origin.elapsed();
        self.records.lock().push(IoRecord {
            start,
            end,
            write,
            block,
        });
    }

    /// The newest acknowledged version of the workload's block `idx` (the volume's block
    /// `base() + idx`).
    pub fn expected(&self, idx: u64) -> u64 {
        self.acked[idx as usize].load(Ordering::SeqCst)
    }

    pub fn base(&self) -> u64 {
        self.base
    }

    pub fn blocks(&self) -> u64 {
        self.blocks
    }
}

/// The `q`-quantile of `v` (sorted in place).
pub fn quantile(v: &mut [Duration], q: f64) -> Duration {
    if v.is_empty() {
        return Duration::ZERO;
    }
    v.sort_unstable();
    let i = ((v.len() as f64 - 1.0) * q).round() as usize;
    v[i.min(v.len() - 1)]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_decode_only_as_themselves() {
        let b = block_bytes(7, 3);
        assert_eq!(decode_block(7, &b), Some(3));
        assert_eq!(decode_block(8, &b), None);
        let mut torn = b.clone();
        torn[2048..].copy_from_slice(&block_bytes(7, 4)[2048..]);
        assert_eq!(decode_block(7, &torn), None);
        assert_eq!(decode_block(1, &[0u8; BLOCK]), Some(0));
    }
}
