//! The watchdog: no seed may hang. Two bounds, both deterministic (they count simulated
//! events, never wall-clock time), so a seed that trips one trips it the same way on every
//! replay:
//!
//! * simulated time: a run lasts at most [`MAX_SIM_TIME`] (the world wraps itself in a
//!   `tokio::time::timeout`, which fires under paused time too);
//! * steps: the seams (node clocks, the network, the disks) count every use; a livelock
//!   that spins without letting simulated time move (a task that wakes itself forever)
//!   trips [`MAX_STEPS_PER_INSTANT`], and a run that does absurdly much work trips
//!   [`MAX_STEPS`].
//!
//! A tripped watchdog is reported as the run's violation, with the reason.

use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::time::Instant;

/// The longest a run may last in simulated time (a healthy run ends well before: chaos,
/// then at most 7 + 120 + 60 + 5 s of healing and checks).
pub const MAX_SIM_TIME: Duration = Duration::from_secs(400);
/// Steps at one simulated instant before the run counts as livelocked.
pub const MAX_STEPS_PER_INSTANT: u64 = 200_000;
/// Steps in a whole run.
pub const MAX_STEPS: u64 = 50_000_000;

struct State {
    at: Instant,
    here: u64,
    total: u64,
    /// What stepped most recently (for the report).
    last: &'static str,
}

pub struct Watchdog {
    st: Mutex<State>,
    tripped: watch::Sender<Option<String>>,
}

impl Watchdog {
    /// Must be called inside the simulation's runtime.
    pub fn new() -> Self {
        Watchdog {
            st: Mutex::new(State {
                at: Instant::now(),
                here: 0,
                total: 0,
                last: "",
            }),
            tripped: watch::Sender::new(None),
        }
    }

    /// One use of a seam (`what` says which).
    pub fn step(&self, what: &'static str) {
        let now = Instant::now();
        let why = {
            let mut st = self.st.lock();
            if st.at != now {
                st.at = now;
                st.here = 0;
            }
            st.here += 1;
            st.total += 1;
            st.last = what;
            if st.here == MAX_STEPS_PER_INSTANT {
                Some(format!(
                    "livelock: {MAX_STEPS_PER_INSTANT} steps without simulated time moving (last: {what})"
                ))
            } else if st.total == MAX_STEPS {
                Some(format!(
                    "{MAX_STEPS} steps in one run (last: {what}); something spins"
                ))
            } else {
                None
            }
        };
        if let Some(why) = why {
            self.tripped.send_if_modified(|t| {
                if t.is_none() {
                    *t = Some(why);
                    true
                } else {
                    false
                }
            });
        }
    }

    /// Resolves with the reason when a step bound trips.
    pub async fn tripped(&self) -> String {
        let mut rx = self.tripped.subscribe();
        let why = match rx.wait_for(|t| t.is_some()).await {
            Ok(t) => t.clone(),
            Err(_) => None,
        };
        match why {
            Some(why) => why,
            // The sender lives in `self`: it cannot be gone while we borrow it.
            None => std::future::pending().await,
        }
    }

    pub fn total_steps(&self) -> u64 {
        self.st.lock().total
    }
}

impl Default for Watchdog {
    fn default() -> Self {
        Self::new()
    }
}
