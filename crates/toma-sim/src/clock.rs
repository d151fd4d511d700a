//! Each simulated node's own monotonic clock: an offset and a rate over tokio's (paused,
//! virtual) time. No correctness rule may compare two of them.

use std::sync::Arc;
use std::time::Duration;

use toma_control::Clock;

use crate::watchdog::Watchdog;

pub struct SimClock {
    start: tokio::time::Instant,
    offset: Duration,
    rate: f64,
    wd: Arc<Watchdog>,
}

impl SimClock {
    /// Must be called inside the simulation's runtime.
    pub fn new(offset: Duration, rate: f64, wd: Arc<Watchdog>) -> Self {
        SimClock {
            start: tokio::time::Instant::now(),
            offset,
            rate,
            wd,
        }
    }
}

impl Clock for SimClock {
    fn now(&self) -> Duration {
        self.wd.step("a node's clock");
        self.offset + self.start.elapsed().mul_f64(self.rate)
    }
}
