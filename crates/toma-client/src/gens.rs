//! Which generations this client still has I/O in flight under, and when it may acknowledge
//! a newer one: only when nothing issued under an older generation is in flight.

use std::collections::BTreeMap;
use std::sync::Arc;

use parking_lot::Mutex;
use tokio::sync::watch;
use toma_core::Generation;

#[derive(Default)]
struct State {
    current: Generation,
    inflight: BTreeMap<Generation, usize>,
}

/// Counts I/O per generation; `ackable` turns to `g` once every I/O of generations `< g` ended.
#[derive(Clone)]
pub struct GenTracker {
    state: Arc<Mutex<State>>,
    ackable: Arc<watch::Sender<Generation>>,
}

/// Holds one I/O's place under a generation; dropping it ends the I/O.
pub struct IoGuard {
    tracker: GenTracker,
    generation: Generation,
}

impl IoGuard {
    pub fn generation(&self) -> Generation {
        self.generation
    }
}

impl Drop for IoGuard {
    fn drop(&mut self) {
        let mut st = self.tracker.state.lock();
        if let Some(n) = st.inflight.get_mut(&self.generation) {
            *n -= 1;
            if *n == 0 {
                st.inflight.remove(&self.generation);
            }
        }
        self.tracker.publish(&st);
    }
}

impl GenTracker {
    pub fn new(current: Generation) -> Self {
        GenTracker {
            state: Arc::new(Mutex::new(State {
                current,
                inflight: BTreeMap::new(),
            })),
            ackable: Arc::new(watch::Sender::new(current)),
        }
    }

    fn publish(&self, st: &State) {
        let oldest = st.inflight.keys().next().copied().unwrap_or(st.current);
        let ackable = oldest.min(st.current);
        self.ackable.send_if_modified(|v| {
            if *v != ackable {
                *v = ackable;
                true
            } else {
                false
            }
        });
    }

    /// Starts an I/O under `generation`, unless a newer generation is already in use: an
    /// I/O must never start under a generation older than one this client may have
    /// acknowledged (the caller re-reads the topology and tries again).
    pub fn begin(&self, generation: Generation) -> Option<IoGuard> {
        let mut st = self.state.lock();
        if generation < st.current {
            return None;
        }
        *st.inflight.entry(generation).or_insert(0) += 1;
        self.publish(&st);
        Some(IoGuard {
            tracker: self.clone(),
            generation,
        })
    }

    /// New I/O now uses `generation` (if newer).
    pub fn switch(&self, generation: Generation) {
        let mut st = self.state.lock();
        if generation > st.current {
            st.current = generation;
        }
        self.publish(&st);
    }

    /// The newest generation with no older I/O in flight; changes are signalled.
    pub fn ackable(&self) -> watch::Receiver<Generation> {
        self.ackable.subscribe()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ack_waits_for_older_io() {
        let t = GenTracker::new(1);
        let rx = t.ackable();
        let a = t.begin(1).unwrap();
        t.switch(2);
        assert_eq!(*rx.borrow(), 1);
        assert!(t.begin(1).is_none(), "no new I/O under an older generation");
        let b = t.begin(2).unwrap();
        drop(a);
        assert_eq!(*rx.borrow(), 2);
        drop(b);
        t.switch(3);
        assert_eq!(*rx.borrow(), 3);
    }
}
