//! The Toma datapath client: registers on every member of a volume, reads and writes RAID1
//! volumes straight against the members' TOMAs following the rules `toma_core` gives for
//! the current topology, follows SWITCH_TOPO without stopping I/O, holds writes while a
//! member is unreachable, and re-registers after being fenced. Agents use it too, for
//! rebuild and stale-lock recovery. The protocol is described in `docs/datapath.md`.
#![forbid(unsafe_code)]

pub mod error;
pub mod gens;
pub mod local_locks;
pub mod raid6;
pub mod range;
pub mod session;
pub mod volume;

pub use error::ClientError;
pub use volume::{ClientConfig, ClientStats, CopyHow, VolumeClient};
