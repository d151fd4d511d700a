//! The per-node TOMA agent's library: its storage layer (this module tree) and, later, the
//! datapath server built on it.
//!
//! * [`device`]: the [`BlockDevice`] trait, [`FileDevice`] (`O_DIRECT`, exclusive `flock`)
//!   and [`MemDevice`] (faults, power loss).
//! * [`superblock`]: the on-disk format of the first MiB of every disk (layout documented
//!   there), `format`/`open`/`inspect`.
//! * [`disk`]: [`Disk`], one opened disk: extent allocation persisted before use, and the RAM
//!   state of its volume members.
//! * [`state`]: [`LockTable`] and [`DirtyBitmap`] ([`MemberRuntime`] holds one of each).
//! * [`disks`]: [`Disks`], the registry opened at start from [`cli::DiskArgs`].
//!
//! Data reads and writes of file disks go through `io_uring` ([`Disk::read_member_io`],
//! `toma-io`); `TOMA_IO=threads` puts them on tokio's blocking threads instead.
//!
//! The crate has no `unsafe` at all: aligned buffers are carved out of a `Vec` with
//! `align_offset` (in `toma-io`, which also holds the one `unsafe` of the project: handing
//! buffers to the kernel's ring), `O_DIRECT` is an `OpenOptions` flag and `flock` comes
//! from `rustix`.
#![forbid(unsafe_code)]

pub mod cli;
pub mod device;
pub mod disk;
pub mod disks;
pub mod k8s;
pub mod local;
pub mod server;
pub mod state;
pub mod superblock;

pub use device::{
    AlignedBuf, BlockDevice, DeviceError, Faults, FileDevice, IoMode, MemDevice, PowerLoss, ALIGN,
};
pub use disk::Disk;
pub use disks::{DiskConfig, Disks, DisksError};
pub use state::{ActivityLog, ClientId, DirtyBitmap, LockTable, MemberRuntime, NoLog, StateError};
pub use superblock::{
    ClusterId, Extent, Inspection, MemberState, Overwrite, Superblock, SuperblockError,
    MIN_DISK_SIZE, SUPERBLOCK_AREA,
};
