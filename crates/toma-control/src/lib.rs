//! The control plane seen by agents, clients and the leader: the `ControlPlane` trait, its
//! embedded in-process implementation, the `Clock` trait, and the leader loop that drives
//! `toma_core`'s planner. The operator provides the Kubernetes implementation of the trait.
#![forbid(unsafe_code)]

pub mod api;
pub mod bounded;
pub mod clock;
pub mod embedded;
pub mod growth;
pub mod leader;
pub mod records;

pub use api::{ControlPlane, CpError, CpResult};
pub use bounded::Bounded;
pub use clock::{Clock, ManualClock, MonotonicClock};
pub use embedded::EmbeddedControlPlane;
pub use growth::{grow_volume, GrowError};
pub use leader::{Leader, LeaderConfig, Transition, TransitionHook};
pub use records::*;
