//! Byte-range exclusion between the writes of one NBD server (all its connections).
//!
//! A write that is not 4 KiB-aligned is a read-modify-write of its edge blocks: read the
//! 4 KiB blocks it only partly covers, patch them, write the aligned span. Two such writes to
//! different sectors of one block (which NBD allows in flight together: they do not
//! overlap) would lose one of them, and an aligned write landing between the read and the
//! write of an RMW would be undone. So every write holds its aligned span here for its whole
//! duration; writes to disjoint spans never wait for each other.

use parking_lot::Mutex;
use tokio::sync::Notify;

#[derive(Default)]
pub struct RangeLocks {
    held: Mutex<Vec<(u64, u64)>>,
    released: Notify,
}

/// Holds `[start, end)`; released on drop.
pub struct RangeGuard<'a> {
    locks: &'a RangeLocks,
    range: (u64, u64),
}

impl RangeLocks {
    /// Waits until no held range overlaps `[start, end)`, then holds it.
    pub async fn lock(&self, start: u64, end: u64) -> RangeGuard<'_> {
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the check, so a release between the check and the wait is seen.
            released.as_mut().enable();
            {
                let mut held = self.held.lock();
                if !held.iter().any(|&(s, e)| s < end && start < e) {
                    held.push((start, end));
                    return RangeGuard {
                        locks: self,
                        range: (start, end),
                    };
                }
            }
            released.await;
        }
    }

    /// Ranges held now (for tests).
    pub fn held(&self) -> usize {
        self.held.lock().len()
    }
}

impl Drop for RangeGuard<'_> {
    fn drop(&mut self) {
        let mut held = self.locks.held.lock();
        if let Some(i) = held.iter().position(|r| *r == self.range) {
            held.swap_remove(i);
        }
        drop(held);
        self.locks.released.notify_waiters();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::time::Duration;

    #[tokio::test]
    async fn overlapping_ranges_wait_disjoint_do_not() {
        let l = Arc::new(RangeLocks::default());
        let g = l.lock(0, 4096).await;
        // Disjoint: immediate.
        let d = tokio::time::timeout(Duration::from_secs(5), l.lock(4096, 8192))
            .await
            .expect("disjoint range is not blocked");
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(1000, 5000).await;
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "overlapping range must wait");
        drop(g);
        tokio::time::sleep(Duration::from_millis(30)).await;
        assert!(!waiter.is_finished(), "still overlaps [4096, 8192)");
        drop(d);
        tokio::time::timeout(Duration::from_secs(5), waiter)
            .await
            .expect("waiter proceeds once both are released")
            .expect("no panic");
        assert_eq!(l.held(), 0);
    }
}
