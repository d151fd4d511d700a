//! Disk I/O for the agent's datapath: [`AlignedBuf`] (a buffer `O_DIRECT` accepts) and
//! [`Ring`], positioned reads and writes through Linux `io_uring` awaited from tokio.
//!
//! Why: the agent used to run every data read and write on tokio's blocking pool, one
//! thread hand-off there and one back per I/O. On a small machine those hand-offs, not the
//! disk, were most of the time of a 4 KiB request (docs/nbd.md). A ring takes the request
//! in one system call from the task that has it, the kernel completes it, and the
//! completion wakes the task through the runtime's own event loop (an eventfd).
//!
//! This is the one crate of the project with `unsafe` code: handing the kernel a buffer
//! that it fills or reads after the call returns. The buffer is owned by the ring until its
//! completion is reaped (see [`Ring`]), so no safe caller can free or touch it meanwhile.

mod buf;
mod ring;

pub use buf::{AlignedBuf, ALIGN};
pub use ring::Ring;
