//! Disks as seen by the agent: the [`BlockDevice`] trait and its two implementations,
//! [`FileDevice`] (a regular file or a block device, `O_DIRECT` where possible) and
//! [`MemDevice`] (in memory, with fault injection for tests and the simulation).
//!
//! # Contract
//!
//! * All I/O is **positioned** and **aligned**: `offset` and the buffer length must be
//!   multiples of [`ALIGN`] (4096 bytes). Any buffer *address* is accepted; a
//!   [`FileDevice`] opened with `O_DIRECT` copies a misaligned buffer through an aligned
//!   bounce buffer, so pass an [`AlignedBuf`] on hot paths to avoid that copy.
//! * Writes are durable only after [`BlockDevice::flush`] returns `Ok`. A power loss may drop
//!   or tear (at 4 KiB granularity) any write issued since the last successful flush.
//! * The trait is **synchronous and blocking**. Implementations are `Send + Sync` and take
//!   `&self`, so one device can be shared (`Arc<dyn BlockDevice>`) by many threads. From
//!   tokio, call it inside `tokio::task::spawn_blocking` (or `block_in_place`); never call it
//!   directly on an async worker thread for a real disk. The datapath's reads and writes
//!   use [`BlockDevice::file`] with `io_uring` instead (see `Disk::read_member_io`). [`MemDevice`] never blocks for long
//!   and may be called directly.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, Seek, SeekFrom};
use std::os::unix::fs::{FileExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use parking_lot::Mutex;
use thiserror::Error;

/// [`ALIGN`]: alignment of offsets, lengths and (for `O_DIRECT`) buffer addresses.
pub use toma_io::{AlignedBuf, ALIGN};

/// What went wrong with a device. Every message names the device.
#[derive(Debug, Error)]
pub enum DeviceError {
    #[error("disk {path}: does not exist; check the --disk path")]
    NotFound { path: PathBuf },
    #[error("disk {path}: cannot open: {source}")]
    Open {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("disk {path} is in use by another agent{}; stop it first, or give this agent another disk", match .pid { Some(p) => format!(" (pid {p})"), None => String::new() })]
    InUse { path: PathBuf, pid: Option<u32> },
    #[error("disk {device}: {op} at offset {offset} length {len} is not aligned to {ALIGN} bytes (a bug in the caller)")]
    Misaligned {
        device: String,
        op: &'static str,
        offset: u64,
        len: usize,
    },
    #[error("disk {device}: {op} at offset {offset} length {len} goes past the end of the device ({size} bytes)")]
    OutOfRange {
        device: String,
        op: &'static str,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error(
        "disk {device}: {op} at offset {offset} failed: {source}; the disk may be failing or gone"
    )]
    Io {
        device: String,
        op: &'static str,
        offset: u64,
        #[source]
        source: io::Error,
    },
    #[error("disk {device}: {op} failed: injected fault")]
    Injected { device: String, op: &'static str },
    #[error("disk {device}: {op} failed: the device has vanished")]
    Vanished { device: String, op: &'static str },
}

/// A disk: positioned, aligned, synchronous I/O. See the module documentation.
pub trait BlockDevice: Send + Sync + std::fmt::Debug {
    /// A human name for messages: the path for a [`FileDevice`].
    fn name(&self) -> &str;
    /// Size in bytes (fixed when the device was opened).
    fn size(&self) -> u64;
    /// Reads exactly `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError>;
    /// Writes all of `buf` at `offset`. Not durable until [`flush`](Self::flush).
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), DeviceError>;
    /// The device lives in this process's memory and never blocks: the agent calls it
    /// inline instead of on a blocking thread (the deterministic simulation relies on it,
    /// since blocking threads are real threads).
    fn in_memory(&self) -> bool {
        false
    }
    /// The open file behind the device, for asynchronous I/O on it (`io_uring`): its
    /// reads and writes must mean the same as [`read_at`](Self::read_at) and
    /// [`write_at`](Self::write_at) at the same offsets. `None`: only the blocking calls.
    fn file(&self) -> Option<Arc<File>> {
        None
    }
}

/// Checks alignment and bounds of an I/O; shared by the implementations.
pub fn check_io(
    dev: &dyn BlockDevice,
    op: &'static str,
    offset: u64,
    len: usize,
) -> Result<(), DeviceError> {
    if offset & (ALIGN as u64 - 1) != 0 || len & (ALIGN - 1) != 0 {
        return Err(DeviceError::Misaligned {
            device: dev.name().to_string(),
            op,
            offset,
            len,
        });
    }
    let end = offset.checked_add(len as u64);
    if end.is_none_or(|e| e > dev.size()) {
        return Err(DeviceError::OutOfRange {
            device: dev.name().to_string(),
            op,
            offset,
            len,
            size: dev.size(),
        });
    }
    Ok(())
}

fn is_aligned(buf: &[u8]) -> bool {
    buf.as_ptr().align_offset(ALIGN) == 0
}

/// How a [`FileDevice`] talks to its file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IoMode {
    /// `O_DIRECT`: no page cache; `flush` is an `fdatasync` for the device's write cache.
    Direct,
    /// The file system refused `O_DIRECT` (e.g. tmpfs): buffered I/O, `fdatasync` on flush.
    Buffered,
}

/// A regular file or a block device, locked exclusively (`flock`) for this process.
#[derive(Debug)]
pub struct FileDevice {
    file: Arc<File>,
    name: String,
    path: PathBuf,
    size: u64,
    mode: IoMode,
}

impl FileDevice {
    /// Opens `path` read-write with `O_DIRECT` when the file system allows it (buffered
    /// otherwise — logged), and takes an exclusive `flock` so that a second agent opening
    /// the same disk is refused with [`DeviceError::InUse`].
    pub fn open(path: &Path) -> Result<FileDevice, DeviceError> {
        Self::open_with(path, false)
    }

    /// Like [`open`](Self::open); `buffered = true` skips `O_DIRECT` (tests, and file systems
    /// known to mishandle it).
    pub fn open_with(path: &Path, buffered: bool) -> Result<FileDevice, DeviceError> {
        if !path.exists() {
            return Err(DeviceError::NotFound {
                path: path.to_path_buf(),
            });
        }
        let open_err = |source| DeviceError::Open {
            path: path.to_path_buf(),
            source,
        };
        let einval = Some(rustix::io::Errno::INVAL.raw_os_error());
        let direct = if buffered {
            Err(io::Error::from(rustix::io::Errno::INVAL))
        } else {
            OpenOptions::new()
                .read(true)
                .write(true)
                .custom_flags(rustix::fs::OFlags::DIRECT.bits() as i32)
                .open(path)
                .and_then(|f| {
                    // Some file systems accept the flag but refuse the I/O: probe one block.
                    let mut probe = AlignedBuf::zeroed(ALIGN);
                    match f.read_at(&mut probe, 0) {
                        Err(e) if e.raw_os_error() == einval => Err(e),
                        _ => Ok(f),
                    }
                })
        };
        let (mut file, mode) = match direct {
            Ok(f) => (f, IoMode::Direct),
            Err(e) if e.raw_os_error() == einval => {
                if !buffered {
                    tracing::warn!(
                        disk = %path.display(),
                        "file system refuses O_DIRECT; using buffered I/O with fdatasync on flush"
                    );
                }
                let f = OpenOptions::new()
                    .read(true)
                    .write(true)
                    .open(path)
                    .map_err(open_err)?;
                (f, IoMode::Buffered)
            }
            Err(e) => return Err(open_err(e)),
        };
        lock_exclusive(&file, path)?;
        let size = file.seek(SeekFrom::End(0)).map_err(open_err)?;
        tracing::info!(disk = %path.display(), size, ?mode, "opened disk");
        Ok(FileDevice {
            file: Arc::new(file),
            name: path.display().to_string(),
            path: path.to_path_buf(),
            size,
            mode,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn io_mode(&self) -> IoMode {
        self.mode
    }

    fn io_err(&self, op: &'static str, offset: u64, source: io::Error) -> DeviceError {
        DeviceError::Io {
            device: self.name.clone(),
            op,
            offset,
            source,
        }
    }
}

fn lock_exclusive(file: &File, path: &Path) -> Result<(), DeviceError> {
    use rustix::fs::{flock, FlockOperation};
    match flock(file, FlockOperation::NonBlockingLockExclusive) {
        Ok(()) => Ok(()),
        Err(e) if e == rustix::io::Errno::WOULDBLOCK => Err(DeviceError::InUse {
            path: path.to_path_buf(),
            pid: lock_holder_pid(file),
        }),
        Err(e) => Err(DeviceError::Open {
            path: path.to_path_buf(),
            source: e.into(),
        }),
    }
}

/// Best effort: the pid of the process holding a `flock` on `file`, from `/proc/locks`.
fn lock_holder_pid(file: &File) -> Option<u32> {
    let meta = file.metadata().ok()?;
    let (ino, dev) = (meta.ino(), meta.dev());
    let want = format!(
        "{:02x}:{:02x}:{}",
        rustix::fs::major(dev),
        rustix::fs::minor(dev),
        ino
    );
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    let me = std::process::id();
    let mut fallback = None;
    for line in locks.lines() {
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        let fields: Vec<&str> = line.split_whitespace().collect();
        if fields.len() < 6 || fields[1] != "FLOCK" {
            continue;
        }
        if !fields[5].eq_ignore_ascii_case(&want) {
            continue;
        }
        let pid: u32 = fields[4].parse().ok()?;
        if pid != me {
            return Some(pid);
        }
        fallback = Some(pid);
    }
    fallback
}

impl BlockDevice for FileDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        check_io(self, "read", offset, buf.len())?;
        if self.mode == IoMode::Direct && !is_aligned(buf) {
            let mut bounce = AlignedBuf::zeroed(buf.len());
            self.file
                .read_exact_at(&mut bounce, offset)
                .map_err(|e| self.io_err("read", offset, e))?;
            buf.copy_from_slice(&bounce);
            return Ok(());
        }
        self.file
            .read_exact_at(buf, offset)
            .map_err(|e| self.io_err("read", offset, e))
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        check_io(self, "write", offset, buf.len())?;
        if self.mode == IoMode::Direct && !is_aligned(buf) {
            // The bytes a client sent sit at any address: one aligned copy, not zeroed first.
            let bounce = AlignedBuf::copy_of(buf);
            return self
                .file
                .write_all_at(&bounce, offset)
                .map_err(|e| self.io_err("write", offset, e));
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|e| self.io_err("write", offset, e))
    }
    fn file(&self) -> Option<Arc<File>> {
        Some(self.file.clone())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        self.file
            .sync_data()
            .map_err(|e| self.io_err("flush", 0, e))
    }
}

/// What a simulated power loss does to the writes issued since the last flush.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PowerLoss {
    /// Every unflushed write is lost.
    DropUnflushed,
    /// Each unflushed 4 KiB block independently survives or reverts, decided by a
    /// deterministic generator seeded with `seed` (the device has no randomness of its own).
    Tear { seed: u64 },
}

/// Injected faults of a [`MemDevice`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Faults {
    pub fail_reads: bool,
    pub fail_writes: bool,
    pub fail_flush: bool,
    /// Every call fails with [`DeviceError::Vanished`] (hot-unplug).
    pub vanished: bool,
}

#[derive(Debug)]
struct MemState {
    data: Vec<u8>,
    /// Block index → contents at the last flush, for blocks written since then.
    unflushed: BTreeMap<u64, Vec<u8>>,
    faults: Faults,
}

/// An in-memory disk for tests and the deterministic simulation. Cloning gives another
/// handle to the *same* disk, so a test can inject faults while the disk is in use.
#[derive(Debug, Clone)]
pub struct MemDevice {
    name: Arc<str>,
    size: u64,
    state: Arc<Mutex<MemState>>,
}

impl MemDevice {
    /// A zeroed disk of `size` bytes (rounded down to [`ALIGN`]).
    pub fn new(name: &str, size: u64) -> MemDevice {
        let size = size - size % ALIGN as u64;
        MemDevice {
            name: name.into(),
            size,
            state: Arc::new(Mutex::new(MemState {
                data: vec![0; size as usize],
                unflushed: BTreeMap::new(),
                faults: Faults::default(),
            })),
        }
    }

    pub fn set_faults(&self, faults: Faults) {
        self.state.lock().faults = faults;
    }

    pub fn faults(&self) -> Faults {
        self.state.lock().faults
    }

    /// Every later call fails until [`reappear`](Self::reappear).
    pub fn vanish(&self) {
        self.state.lock().faults.vanished = true;
    }

    pub fn reappear(&self) {
        self.state.lock().faults.vanished = false;
    }

    /// Simulates a power cut: the writes since the last flush are dropped or torn, then the
    /// device is usable again (as after a reboot). Returns how many 4 KiB blocks reverted.
    pub fn power_loss(&self, how: PowerLoss) -> usize {
        let mut st = self.state.lock();
        let unflushed = std::mem::take(&mut st.unflushed);
        let mut rng = match how {
            PowerLoss::DropUnflushed => None,
            PowerLoss::Tear { seed } => Some(SplitMix64(seed)),
        };
        let mut reverted = 0;
        for (block, old) in unflushed {
            let revert = rng.as_mut().is_none_or(|r| r.next() & 1 == 0);
            if revert {
                let at = block as usize * ALIGN;
                st.data[at..at + ALIGN].copy_from_slice(&old);
                reverted += 1;
            }
        }
        reverted
    }

    /// A copy of the current contents (what a read would see).
    pub fn snapshot(&self) -> Vec<u8> {
        self.state.lock().data.clone()
    }

    /// Number of 4 KiB blocks written since the last flush.
    pub fn unflushed_blocks(&self) -> usize {
        self.state.lock().unflushed.len()
    }

    fn check_faults(&self, st: &MemState, op: &'static str) -> Result<(), DeviceError> {
        let f = st.faults;
        let device = self.name.to_string();
        if f.vanished {
            return Err(DeviceError::Vanished { device, op });
        }
        let fail = match op {
            "read" => f.fail_reads,
            "write" => f.fail_writes,
            _ => f.fail_flush,
        };
        if fail {
            return Err(DeviceError::Injected { device, op });
        }
        Ok(())
    }
}

/// A tiny deterministic generator (SplitMix64) so that torn writes are reproducible.
struct SplitMix64(u64);
impl SplitMix64 {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
}

impl BlockDevice for MemDevice {
    fn name(&self) -> &str {
        &self.name
    }
    fn size(&self) -> u64 {
        self.size
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), DeviceError> {
        let st = self.state.lock();
        self.check_faults(&st, "read")?;
        check_io(self, "read", offset, buf.len())?;
        let at = offset as usize;
        buf.copy_from_slice(&st.data[at..at + buf.len()]);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), DeviceError> {
        let mut st = self.state.lock();
        self.check_faults(&st, "write")?;
        check_io(self, "write", offset, buf.len())?;
        let first = offset / ALIGN as u64;
        for (i, block) in buf.chunks(ALIGN).enumerate() {
            let idx = first + i as u64;
            let at = idx as usize * ALIGN;
            if !st.unflushed.contains_key(&idx) {
                let old = st.data[at..at + ALIGN].to_vec();
                st.unflushed.insert(idx, old);
            }
            st.data[at..at + ALIGN].copy_from_slice(block);
        }
        Ok(())
    }
    fn flush(&self) -> Result<(), DeviceError> {
        let mut st = self.state.lock();
        self.check_faults(&st, "flush")?;
        st.unflushed.clear();
        Ok(())
    }
    fn in_memory(&self) -> bool {
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_buf_is_aligned() {
        for len in [0, 4096, 8192, 1 << 20] {
            let b = AlignedBuf::zeroed(len);
            assert!(is_aligned(&b));
            assert_eq!(b.len(), len);
        }
    }

    #[test]
    fn file_device_round_trip_and_misaligned_buffers() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let dev = FileDevice::open(&path).unwrap();
        assert_eq!(dev.size(), 1 << 20);
        let mut buf = AlignedBuf::zeroed(8192);
        buf.fill(0xab);
        dev.write_at(&buf, 4096).unwrap();
        // A misaligned address goes through the bounce buffer.
        let mut raw = vec![0u8; 8192 + 1];
        dev.read_at(&mut raw[1..], 4096).unwrap();
        assert!(raw[1..].iter().all(|b| *b == 0xab));
        dev.flush().unwrap();
        assert!(matches!(
            dev.write_at(&buf[..100], 0),
            Err(DeviceError::Misaligned { .. })
        ));
        assert!(matches!(
            dev.read_at(&mut buf, (1 << 20) - 4096),
            Err(DeviceError::OutOfRange { .. })
        ));
    }

    #[test]
    fn second_opener_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let first = FileDevice::open(&path).unwrap();
        let err = FileDevice::open(&path).unwrap_err();
        let msg = err.to_string();
        assert!(matches!(err, DeviceError::InUse { .. }), "{msg}");
        assert!(msg.contains("is in use by another agent"), "{msg}");
        assert!(msg.contains(&path.display().to_string()), "{msg}");
        drop(first);
        FileDevice::open(&path).unwrap();
    }

    #[test]
    fn missing_path_is_named() {
        let err = FileDevice::open(Path::new("/nonexistent/toma-disk")).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/toma-disk"));
        assert!(matches!(err, DeviceError::NotFound { .. }));
    }

    #[test]
    fn buffered_mode_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("disk");
        std::fs::File::create(&path)
            .unwrap()
            .set_len(1 << 20)
            .unwrap();
        let dev = FileDevice::open_with(&path, true).unwrap();
        assert_eq!(dev.io_mode(), IoMode::Buffered);
        // Still exclusive.
        assert!(matches!(
            FileDevice::open(&path),
            Err(DeviceError::InUse { .. })
        ));
        let buf = vec![7u8; 4096];
        dev.write_at(&buf, 0).unwrap();
        dev.flush().unwrap();
        let mut back = vec![0u8; 4096];
        dev.read_at(&mut back, 0).unwrap();
        assert_eq!(back, buf);
    }

    #[test]
    fn mem_power_loss_drops_unflushed_writes() {
        let dev = MemDevice::new("mem0", 64 * 1024);
        dev.write_at(&[1u8; 8192], 0).unwrap();
        dev.flush().unwrap();
        dev.write_at(&[2u8; 8192], 4096).unwrap();
        assert_eq!(dev.unflushed_blocks(), 2);
        assert_eq!(dev.power_loss(PowerLoss::DropUnflushed), 2);
        let mut back = vec![0u8; 12288];
        dev.read_at(&mut back, 0).unwrap();
        assert!(back[..8192].iter().all(|b| *b == 1));
        assert!(back[8192..].iter().all(|b| *b == 0));
    }

    #[test]
    fn mem_tear_is_deterministic_per_seed() {
        let run = |seed| {
            let dev = MemDevice::new("mem0", 256 * 1024);
            dev.write_at(&[9u8; 256 * 1024], 0).unwrap();
            dev.power_loss(PowerLoss::Tear { seed });
            dev.snapshot()
        };
        assert_eq!(run(42), run(42));
        let torn = run(42);
        let kept = torn.chunks(ALIGN).filter(|b| b[0] == 9).count();
        assert!(kept > 0 && kept < 64, "some blocks kept, some lost: {kept}");
        for block in torn.chunks(ALIGN) {
            assert!(block.iter().all(|b| *b == block[0]), "torn inside a block");
        }
    }

    #[test]
    fn mem_faults_and_vanish() {
        let dev = MemDevice::new("mem0", 64 * 1024);
        let handle = dev.clone();
        handle.set_faults(Faults {
            fail_writes: true,
            ..Faults::default()
        });
        assert!(matches!(
            dev.write_at(&[0u8; 4096], 0),
            Err(DeviceError::Injected { .. })
        ));
        dev.read_at(&mut [0u8; 4096], 0).unwrap();
        handle.vanish();
        assert!(matches!(dev.flush(), Err(DeviceError::Vanished { .. })));
        assert!(matches!(
            dev.read_at(&mut [0u8; 4096], 0),
            Err(DeviceError::Vanished { .. })
        ));
        handle.reappear();
        handle.set_faults(Faults::default());
        dev.write_at(&[0u8; 4096], 0).unwrap();
    }
}
