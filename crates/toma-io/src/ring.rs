//! [`Ring`]: positioned reads and writes through `io_uring`, awaited from tokio.

use std::io;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::sync::{Arc, Weak};

use io_uring::{opcode, types, IoUring};
use parking_lot::Mutex;
use rustix::event::{eventfd, EventfdFlags};
use tokio::io::unix::AsyncFd;
use tokio::sync::oneshot;

use crate::AlignedBuf;

/// Requests that wait for the kernel's answer, most at once before [`Ring`] submission
/// waits for completions to make room (the completion queue is twice as large).
const DEPTH: u32 = 256;

/// One `io_uring` instance for positioned I/O on files, with its completions delivered
/// through tokio: an eventfd registered with the ring wakes a reaper task, which hands each
/// completion to the task that awaits it.
///
/// **Ownership.** A request's buffer is moved into the ring's slot table when it is
/// submitted and handed back with its completion, so the kernel never sees a buffer that
/// was freed or moved, even if the awaiting future is dropped (the buffer is then freed
/// when the completion arrives). Dropping the ring waits for every request in flight.
///
/// **Runtime.** [`Ring::new`] must run inside a tokio runtime with I/O enabled; the reaper
/// task lives there. [`Ring::alive`] turns false when that runtime has shut down: make a
/// new ring then.
#[derive(Debug)]
pub struct Ring {
    shared: Arc<Shared>,
    reaper: tokio::task::JoinHandle<()>,
}

struct Shared {
    /// Submission and completion queues are touched only under `state`'s lock; the
    /// system call that submits runs outside it (the kernel serialises it, and it may be
    /// slow: on a VM it rings the disk's doorbell).
    ring: IoUring,
    state: Mutex<State>,
}

impl std::fmt::Debug for Shared {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Shared")
            .field("state", &self.state)
            .finish()
    }
}

struct State {
    /// Requests in flight, by their `user_data`.
    slots: Vec<Option<Slot>>,
    free: Vec<usize>,
    in_flight: usize,
    /// Set when the ring failed in a way that may leave a request queued but unsubmitted:
    /// nothing is submitted any more, and the ring and its buffers are leaked at drop
    /// rather than risk the kernel using freed memory.
    broken: Option<String>,
}

impl std::fmt::Debug for State {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("State")
            .field("in_flight", &self.in_flight)
            .field("broken", &self.broken)
            .finish()
    }
}

struct Slot {
    buf: AlignedBuf,
    /// The file, kept open until the kernel is done with the request.
    _file: Arc<dyn AsFd + Send + Sync>,
    tx: oneshot::Sender<Done>,
}

struct Done {
    res: i32,
    buf: AlignedBuf,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Op {
    Read,
    Write,
}

impl Ring {
    /// A new ring and its reaper task on the current tokio runtime. Fails where the kernel
    /// refuses `io_uring` (too old, disabled by `kernel.io_uring_disabled` or a seccomp
    /// profile), or outside a runtime; the caller then does blocking I/O on threads.
    pub fn new() -> io::Result<Ring> {
        let handle = tokio::runtime::Handle::try_current()
            .map_err(|e| io::Error::other(format!("no tokio runtime: {e}")))?;
        let ring = IoUring::new(DEPTH)?;
        let efd: OwnedFd = eventfd(0, EventfdFlags::CLOEXEC | EventfdFlags::NONBLOCK)?;
        ring.submitter().register_eventfd(efd.as_raw_fd())?;
        let shared = Arc::new(Shared {
            ring,
            state: Mutex::new(State {
                slots: Vec::new(),
                free: Vec::new(),
                in_flight: 0,
                broken: None,
            }),
        });
        let efd = {
            let _guard = handle.enter();
            // SAFETY: the eventfd is owned by the AsyncFd, which neither replaces nor
            // closes it while registered.
            unsafe { AsyncFd::register(efd)? }
        };
        let reaper = handle.spawn(reap(Arc::downgrade(&shared), efd));
        Ok(Ring { shared, reaper })
    }

    /// False once the reaper task has ended (its runtime shut down): completions would
    /// never be delivered, so requests must go to a new ring.
    pub fn alive(&self) -> bool {
        !self.reaper.is_finished()
    }

    /// Reads `buf.len()` bytes at `offset` of `file` into `buf`, and returns it. A read
    /// that ends early (end of file) is an `UnexpectedEof` error.
    pub async fn read_at<F: AsFd + Send + Sync + 'static>(
        &self,
        file: &Arc<F>,
        buf: AlignedBuf,
        offset: u64,
    ) -> io::Result<AlignedBuf> {
        self.run(Op::Read, file.clone(), buf, offset).await
    }

    /// Writes all of `buf` at `offset` of `file`.
    pub async fn write_at<F: AsFd + Send + Sync + 'static>(
        &self,
        file: &Arc<F>,
        buf: AlignedBuf,
        offset: u64,
    ) -> io::Result<()> {
        self.run(Op::Write, file.clone(), buf, offset)
            .await
            .map(|_| ())
    }

    async fn run(
        &self,
        op: Op,
        file: Arc<dyn AsFd + Send + Sync>,
        mut buf: AlignedBuf,
        offset: u64,
    ) -> io::Result<AlignedBuf> {
        let mut done = 0usize;
        while done < buf.len() {
            let rx = self.submit(op, file.clone(), buf, done, offset)?;
            let Done { res, buf: back } = rx
                .await
                .map_err(|_| io::Error::other("the I/O ring was closed"))?;
            buf = back;
            if res < 0 {
                let e = io::Error::from_raw_os_error(-res);
                match e.kind() {
                    io::ErrorKind::Interrupted => continue,
                    // The kernel did not wait (a full device queue): retrying at once could
                    // spin, so the rest is done by a blocking call on a blocking thread.
                    io::ErrorKind::WouldBlock => {
                        return blocking_rest(op, file, buf, done, offset).await;
                    }
                    _ => return Err(e),
                }
            }
            if res == 0 {
                return Err(match op {
                    Op::Read => io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("read ended early: {done} of {} bytes", buf.len()),
                    ),
                    Op::Write => io::Error::new(
                        io::ErrorKind::WriteZero,
                        format!("write made no progress after {done} of {} bytes", buf.len()),
                    ),
                });
            }
            done += res as usize;
        }
        Ok(buf)
    }

    /// Queues one request for `buf[done..]` at `offset + done` and submits it to the
    /// kernel before returning (so the kernel has taken its reference to `fd`'s file).
    fn submit(
        &self,
        op: Op,
        file: Arc<dyn AsFd + Send + Sync>,
        mut buf: AlignedBuf,
        done: usize,
        offset: u64,
    ) -> io::Result<oneshot::Receiver<Done>> {
        let len = u32::try_from(buf.len() - done)
            .map_err(|_| io::Error::other("one request is limited to 4 GiB"))?;
        let at = offset + done as u64;
        let fd = types::Fd(file.as_fd().as_raw_fd());
        // The kernel writes into a read's buffer (owned, copied first if it was shared
        // bytes) and only reads a write's.
        let ptr = match op {
            Op::Read => buf.as_mut_ptr().wrapping_add(done).cast_const(),
            Op::Write => buf.as_ptr().wrapping_add(done),
        };
        let shared = &*self.shared;
        let mut st = shared.state.lock();
        if let Some(why) = &st.broken {
            return Err(io::Error::other(format!(
                "the I/O ring failed earlier: {why}"
            )));
        }
        let (tx, rx) = oneshot::channel();
        let slot = Slot {
            buf,
            _file: file,
            tx,
        };
        let id = match st.free.pop() {
            Some(id) => {
                st.slots[id] = Some(slot);
                id
            }
            None => {
                st.slots.push(Some(slot));
                st.slots.len() - 1
            }
        };
        let entry = match op {
            Op::Read => opcode::Read::new(fd, ptr.cast_mut(), len)
                .offset(at)
                .build(),
            Op::Write => opcode::Write::new(fd, ptr, len).offset(at).build(),
        }
        .user_data(id as u64);
        loop {
            // SAFETY: the submission queue is only touched under `state`'s lock, held here.
            // The entry points into the buffer now owned by slot `id`, and names the file
            // the slot keeps open; the slot keeps both (the buffer's heap allocation does
            // not move with it) until the completion with user_data `id` is reaped, and
            // nobody else touches the buffer meanwhile.
            let pushed = unsafe { shared.ring.submission_shared().push(&entry) };
            if pushed.is_ok() {
                break;
            }
            // Submission queue full (it is emptied at every submit, so only with many
            // threads at once): hand the queued entries to the kernel and try again.
            if let Err(e) = shared.enter(&mut st) {
                st.slots[id] = None;
                st.free.push(id);
                return Err(e);
            }
        }
        st.in_flight += 1;
        drop(st);
        // Submits every entry queued so far, ours included: when this returns, the kernel
        // has taken ours (by this call, or by another thread's that came first).
        match shared.ring.submit() {
            Ok(_) => Ok(rx),
            Err(e) if retryable(&e) => {
                let mut st = shared.state.lock();
                shared.enter(&mut st)?;
                Ok(rx)
            }
            Err(e) => Err(shared.fail(&mut shared.state.lock(), e)),
        }
    }
}

/// Does `buf[done..]` at `offset + done` with blocking `pread`/`pwrite` on a blocking
/// thread, and returns the buffer.
async fn blocking_rest(
    op: Op,
    file: Arc<dyn AsFd + Send + Sync>,
    mut buf: AlignedBuf,
    mut done: usize,
    offset: u64,
) -> io::Result<AlignedBuf> {
    tokio::task::spawn_blocking(move || {
        while done < buf.len() {
            let at = offset + done as u64;
            let n = match op {
                Op::Read => rustix::io::pread(&file, &mut buf[done..], at),
                Op::Write => rustix::io::pwrite(&file, &buf[done..], at),
            };
            match n {
                Ok(0) => {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        format!("{op} ended early: {done} of {} bytes", buf.len()),
                    ))
                }
                Ok(n) => done += n,
                Err(e) if e == rustix::io::Errno::INTR || e == rustix::io::Errno::AGAIN => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(buf)
    })
    .await
    .map_err(|e| io::Error::other(format!("blocking I/O thread: {e}")))?
}

impl std::fmt::Display for Op {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Op::Read => "read",
            Op::Write => "write",
        })
    }
}

impl Shared {
    /// Submits every queued entry, under the lock. Retries while the kernel is only short
    /// of room (busy completion queue, memory, a signal), reaping completions to make
    /// some; any other error may leave entries queued, so the ring is marked broken.
    fn enter(&self, st: &mut State) -> io::Result<()> {
        let mut tries = 0u32;
        loop {
            match self.ring.submit() {
                Ok(_) => return Ok(()),
                Err(e) if retryable(&e) && tries < 10_000 => {
                    tries += 1;
                    let done = self.reap(st);
                    let idle = done.is_empty();
                    for (tx, d) in done {
                        let _ = tx.send(d);
                    }
                    if idle {
                        std::thread::yield_now();
                    }
                }
                Err(e) => return Err(self.fail(st, e)),
            }
        }
    }

    fn fail(&self, st: &mut State, e: io::Error) -> io::Error {
        let why = e.to_string();
        tracing::error!(error = %why, "io_uring submission failed; this ring takes no more requests");
        st.broken = Some(why);
        e
    }

    /// Takes every completion off the queue, freeing its slot. Call under the lock.
    fn reap(&self, st: &mut State) -> Vec<(oneshot::Sender<Done>, Done)> {
        let mut out = Vec::new();
        // SAFETY: the completion queue is only touched under `state`'s lock (`st`).
        for cqe in unsafe { self.ring.completion_shared() } {
            let id = cqe.user_data() as usize;
            if let Some(Slot { buf, tx, .. }) = st.slots.get_mut(id).and_then(Option::take) {
                st.free.push(id);
                st.in_flight -= 1;
                out.push((
                    tx,
                    Done {
                        res: cqe.result(),
                        buf,
                    },
                ));
            }
        }
        out
    }
}

/// Whether a failed submission only lacked room: busy completion queue, memory, a signal.
fn retryable(e: &io::Error) -> bool {
    use rustix::io::Errno;
    [Errno::BUSY, Errno::AGAIN, Errno::INTR]
        .iter()
        .any(|x| e.raw_os_error() == Some(x.raw_os_error()))
}

/// Waits for the eventfd, then delivers the completions. Ends when the ring is dropped.
async fn reap(shared: Weak<Shared>, efd: AsyncFd<OwnedFd>) {
    loop {
        let mut ready = match efd.readable().await {
            Ok(r) => r,
            Err(e) => {
                tracing::error!(error = %e, "io_uring eventfd failed; no more completions");
                return;
            }
        };
        // Reset the counter first: a completion posted after this sets it again.
        let mut count = [0u8; 8];
        let _ = rustix::io::read(efd.get_ref(), &mut count);
        ready.clear_ready();
        let Some(shared) = shared.upgrade() else {
            return;
        };
        let done = {
            let mut st = shared.state.lock();
            let mut done = shared.reap(&mut st);
            // Completions that found the queue full wait in the kernel's overflow list, and
            // only an enter moves them into the room just made: without one (no request
            // after them) they would wait for good.
            // SAFETY: the submission queue is only touched under `state`'s lock, held here
            // (this handle only reads the flags; dropping it writes back the same tail).
            while unsafe { shared.ring.submission_shared() }.cq_overflow() {
                if let Err(e) = shared.ring.submit() {
                    tracing::warn!(error = %e, "io_uring: cannot flush overflowed completions yet");
                    break;
                }
                done.extend(shared.reap(&mut st));
            }
            done
        };
        drop(shared);
        for (tx, d) in done {
            // The awaiting future may be gone: the buffer is freed with `d`.
            let _ = tx.send(d);
        }
    }
}

impl Drop for Ring {
    fn drop(&mut self) {
        self.reaper.abort();
    }
}

impl Drop for Shared {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        if st.broken.is_some() {
            // We cannot tell which requests the kernel still has: leak every buffer in
            // flight (closing the ring discards what was never submitted).
            std::mem::forget(std::mem::take(&mut st.slots));
            return;
        }
        // The kernel may still write into buffers we hold: wait for every request.
        while st.in_flight > 0 {
            match self.ring.submit_and_wait(1) {
                Ok(_) => {
                    for cqe in self.ring.completion() {
                        let id = cqe.user_data() as usize;
                        if st.slots.get_mut(id).and_then(Option::take).is_some() {
                            st.in_flight -= 1;
                        }
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => {
                    tracing::error!(error = %e, in_flight = st.in_flight, "cannot wait for I/O in flight; leaking its buffers");
                    std::mem::forget(std::mem::take(&mut st.slots));
                    return;
                }
            }
        }
    }
}
