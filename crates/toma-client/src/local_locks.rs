//! Exclusion between the tasks of one client. A TOMA's chunk lock is held by a client id, so
//! it cannot keep two writes of the *same* client apart: two tasks writing different blocks
//! of one chunk would both be granted the lock, and one's unlock (or dirty-bit clear) would
//! pass under the other's feet. Every writer first takes the chunk's local lock here.

use std::collections::HashMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::{Mutex as AsyncMutex, OwnedMutexGuard};

#[derive(Default)]
pub struct LocalLocks {
    map: Mutex<HashMap<u64, Arc<AsyncMutex<()>>>>,
}

/// Holds one unit's local lock; released on drop.
pub struct LocalGuard<'a> {
    guard: Option<OwnedMutexGuard<()>>,
    unit: u64,
    locks: &'a LocalLocks,
}

impl LocalLocks {
    pub async fn lock(&self, unit: u64) -> LocalGuard<'_> {
        let m = self
            .map
            .lock()
            .entry(unit)
            .or_insert_with(|| Arc::new(AsyncMutex::new(())))
            .clone();
        let guard = m.lock_owned().await;
        LocalGuard {
            guard: Some(guard),
            unit,
            locks: self,
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.map.lock().len()
    }
}

impl Drop for LocalGuard<'_> {
    fn drop(&mut self) {
        drop(self.guard.take());
        let mut map = self.locks.map.lock();
        if map
            .get(&self.unit)
            .is_some_and(|m| Arc::strong_count(m) == 1)
        {
            map.remove(&self.unit);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn one_holder_per_unit_and_entries_are_dropped() {
        let l = Arc::new(LocalLocks::default());
        let g = l.lock(3).await;
        let l2 = l.clone();
        let waiter = tokio::spawn(async move {
            let _g = l2.lock(3).await;
        });
        // The second locker cannot finish while the first holds the unit.
        assert!(tokio::time::timeout(Duration::from_millis(50), async {
            while !waiter.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .is_err());
        let _other = l.lock(4).await;
        drop(g);
        tokio::time::timeout(Duration::from_secs(10), async {
            while !waiter.is_finished() {
                tokio::task::yield_now().await;
            }
        })
        .await
        .expect("second locker proceeds after release");
        drop(_other);
        assert_eq!(l.len(), 0);
    }
}
