//! The per-volume datapath process (`toma-csi datapath`), started by the node plugin at
//! NodeStage in a process group of its own, so that it outlives a restart or upgrade of the
//! node plugin: it attaches a [`VolumeClient`] (registers on every member, follows topology
//! switches) and exports the volume as one file, `volume`, of a FUSE file system mounted at
//! `DIR/fuse`. The node plugin puts a loop device on that file.
//!
//! Files in `DIR`: `ready` (this process's pid, written once the export is mounted),
//! `datapath.log`. SIGTERM: flush, unmount, detach, exit 0. SIGUSR1: read the volume's
//! committed size from the control plane and export that (NodeExpandVolume sends it after an
//! expansion; the file only ever grows).
//!
//! The file is opened with `FOPEN_DIRECT_IO` (no page cache in the FUSE layer; the loop
//! device and the file system above it have their own). Reads and writes must be whole
//! 4 KiB blocks (the loop device uses 4 KiB sectors); anything else gets EINVAL. `fsync`
//! (a flush of the loop device) makes every acknowledged write durable on every live member.

use std::ffi::OsStr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use anyhow::{bail, Context};
use bytes::Bytes;
use fuser::{
    FileAttr, FileType, Filesystem, KernelConfig, MountOption, ReplyAttr, ReplyData,
    ReplyDirectory, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyWrite, Request,
};
use toma_client::{ClientConfig, VolumeClient};
use toma_core::BLOCK_SIZE;
use toma_wire::transport::{TcpTransport, Transport};
use tracing::{info, warn};

use crate::controller::parse_volume_id;

/// The exported file's name in the FUSE mount.
pub const FILE_NAME: &str = "volume";
const ROOT: u64 = 1;
const FILE: u64 = 2;
const TTL: Duration = Duration::from_secs(1);
const MAX_WRITE: u32 = 1 << 20;

#[derive(Debug, Clone, clap::Args)]
pub struct DatapathArgs {
    /// The volume (its UUID).
    #[arg(long)]
    pub volume_id: String,
    /// This volume's directory on the node (`ready`, `fuse/`).
    #[arg(long)]
    pub dir: PathBuf,
    /// This node's name (recorded with the attachment).
    #[arg(long)]
    pub node_id: String,
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the volume Secrets.
    #[arg(long, default_value = "toma-system")]
    pub namespace: String,
}

struct VolumeFs {
    client: VolumeClient,
    rt: tokio::runtime::Handle,
    /// The exported size; grows on SIGUSR1 after an expansion.
    size: Arc<AtomicU64>,
    started: SystemTime,
}

impl VolumeFs {
    fn size(&self) -> u64 {
        self.size.load(Ordering::Acquire)
    }

    fn attr(&self, ino: u64) -> FileAttr {
        let (kind, perm, size, nlink) = if ino == ROOT {
            (FileType::Directory, 0o755, 0, 2)
        } else {
            (FileType::RegularFile, 0o600, self.size(), 1)
        };
        FileAttr {
            ino,
            size,
            blocks: size / 512,
            atime: self.started,
            mtime: self.started,
            ctime: self.started,
            crtime: self.started,
            kind,
            perm,
            nlink,
            uid: 0,
            gid: 0,
            rdev: 0,
            blksize: BLOCK_SIZE,
            flags: 0,
        }
    }

    /// `Some(errno)` unless `[offset, offset+len)` is whole blocks inside the volume.
    fn check(&self, offset: i64, len: u64) -> Result<u64, i32> {
        let off = u64::try_from(offset).map_err(|_| libc::EINVAL)?;
        let b = u64::from(BLOCK_SIZE);
        if !off.is_multiple_of(b) || !len.is_multiple_of(b) {
            return Err(libc::EINVAL);
        }
        if off.checked_add(len).is_none_or(|e| e > self.size()) {
            return Err(libc::ENOSPC);
        }
        Ok(off)
    }
}

impl Filesystem for VolumeFs {
    fn init(&mut self, _req: &Request<'_>, config: &mut KernelConfig) -> Result<(), libc::c_int> {
        let _ = config.set_max_write(MAX_WRITE);
        Ok(())
    }

    fn lookup(&mut self, _req: &Request<'_>, parent: u64, name: &OsStr, reply: ReplyEntry) {
        if parent == ROOT && name == FILE_NAME {
            reply.entry(&TTL, &self.attr(FILE), 0);
        } else {
            reply.error(libc::ENOENT);
        }
    }

    fn getattr(&mut self, _req: &Request<'_>, ino: u64, _fh: Option<u64>, reply: ReplyAttr) {
        match ino {
            ROOT | FILE => reply.attr(&TTL, &self.attr(ino)),
            _ => reply.error(libc::ENOENT),
        }
    }

    #[allow(clippy::too_many_arguments)]
    fn setattr(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<fuser::TimeOrNow>,
        _mtime: Option<fuser::TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<u64>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<u32>,
        reply: ReplyAttr,
    ) {
        // The size follows the volume (it grows with an expansion, never by truncate);
        // times and modes are not stored.
        if ino != FILE || size.is_some_and(|s| s != self.size()) {
            reply.error(libc::EPERM);
        } else {
            reply.attr(&TTL, &self.attr(FILE));
        }
    }

    fn open(&mut self, _req: &Request<'_>, ino: u64, _flags: i32, reply: ReplyOpen) {
        if ino == FILE {
            reply.opened(0, fuser::consts::FOPEN_DIRECT_IO);
        } else {
            reply.error(libc::EISDIR);
        }
    }

    fn read(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        size: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyData,
    ) {
        if ino != FILE {
            return reply.error(libc::EISDIR);
        }
        // Reads at or past the end return nothing; reads across it are cut.
        let off = u64::try_from(offset).unwrap_or(u64::MAX);
        let end = self.size();
        if off >= end {
            return reply.data(&[]);
        }
        let len = u64::from(size).min(end - off);
        if let Err(e) = self.check(offset, len) {
            return reply.error(e);
        }
        let client = self.client.clone();
        self.rt.spawn(async move {
            match client.read(off, len as usize).await {
                Ok(b) => reply.data(&b),
                Err(e) => {
                    warn!(offset = off, len, error = %e, "read failed");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    fn write(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        data: &[u8],
        _write_flags: u32,
        _flags: i32,
        _lock_owner: Option<u64>,
        reply: ReplyWrite,
    ) {
        if ino != FILE {
            return reply.error(libc::EISDIR);
        }
        let off = match self.check(offset, data.len() as u64) {
            Ok(o) => o,
            Err(e) => return reply.error(e),
        };
        let client = self.client.clone();
        let buf = Bytes::copy_from_slice(data);
        self.rt.spawn(async move {
            let n = buf.len() as u32;
            match client.write(off, buf).await {
                Ok(()) => reply.written(n),
                Err(e) => {
                    warn!(offset = off, error = %e, "write failed");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    fn flush(&mut self, _req: &Request<'_>, _ino: u64, _fh: u64, _lock: u64, reply: ReplyEmpty) {
        // close(): nothing is buffered here (writes are acknowledged by the members).
        reply.ok();
    }

    fn fsync(
        &mut self,
        _req: &Request<'_>,
        _ino: u64,
        _fh: u64,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        let client = self.client.clone();
        self.rt.spawn(async move {
            match client.flush().await {
                Ok(()) => reply.ok(),
                Err(e) => {
                    warn!(error = %e, "flush failed");
                    reply.error(libc::EIO)
                }
            }
        });
    }

    fn readdir(
        &mut self,
        _req: &Request<'_>,
        ino: u64,
        _fh: u64,
        offset: i64,
        mut reply: ReplyDirectory,
    ) {
        if ino != ROOT {
            return reply.error(libc::ENOTDIR);
        }
        let entries = [
            (ROOT, FileType::Directory, "."),
            (ROOT, FileType::Directory, ".."),
            (FILE, FileType::RegularFile, FILE_NAME),
        ];
        for (i, (ino, kind, name)) in entries.iter().enumerate().skip(offset.max(0) as usize) {
            if reply.add(*ino, (i + 1) as i64, *kind, name) {
                break;
            }
        }
        reply.ok();
    }
}

/// Runs the datapath until SIGTERM/SIGINT.
pub fn run(args: DatapathArgs) -> anyhow::Result<()> {
    let id = parse_volume_id(&args.volume_id)
        .with_context(|| format!("--volume-id {:?}: not a UUID", args.volume_id))?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("tokio runtime")?;
    let fuse_dir = args.dir.join("fuse");
    std::fs::create_dir_all(&fuse_dir)
        .with_context(|| format!("creating {}", fuse_dir.display()))?;
    let client = rt.block_on(async {
        let kc = crate::kube::client(args.kubeconfig.as_deref()).await?;
        let cp = crate::kube::control_plane(kc, &args.namespace, "toma-csi-node");
        let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
        let cfg = ClientConfig {
            node: args.node_id.clone(),
            ..ClientConfig::default()
        };
        VolumeClient::attach(cp, transport, id, cfg)
            .await
            .with_context(|| format!("attaching volume {id}"))
    })?;
    // RAID1 and RAID6 alike: the client splits requests into lock units (chunks or
    // stripes) and does the mirroring or the P/Q read-modify-write itself.
    let spec = client.spec();
    let size = Arc::new(AtomicU64::new(spec.size));
    let fs = VolumeFs {
        client: client.clone(),
        rt: rt.handle().clone(),
        size: size.clone(),
        started: SystemTime::now(),
    };
    let opts = [
        MountOption::FSName(format!("toma-{id}")),
        MountOption::Subtype("toma".into()),
        MountOption::RW,
        MountOption::NoDev,
        MountOption::NoSuid,
        MountOption::NoExec,
    ];
    let session = match fuser::spawn_mount2(fs, &fuse_dir, &opts) {
        Ok(s) => s,
        Err(e) => {
            let _ = rt.block_on(client.detach());
            bail!("FUSE mount at {}: {e}", fuse_dir.display());
        }
    };
    std::fs::write(args.dir.join("ready"), std::process::id().to_string())
        .context("writing the ready file")?;
    info!(volume = %id, layout = %spec.layout, size = spec.size, dir = %fuse_dir.display(), "datapath serving");
    rt.block_on(async {
        use tokio::signal::unix::{signal, SignalKind};
        let mut term = signal(SignalKind::terminate())?;
        let mut usr1 = signal(SignalKind::user_defined1())?;
        loop {
            tokio::select! {
                _ = term.recv() => break,
                _ = tokio::signal::ctrl_c() => break,
                _ = usr1.recv() => match client.refresh_size().await {
                    Ok(s) => {
                        let old = size.fetch_max(s, Ordering::AcqRel);
                        if s > old {
                            info!(volume = %id, from = old, to = s, "volume grew; exporting the new size");
                        }
                    }
                    Err(e) => warn!(volume = %id, error = %e, "cannot read the volume's size"),
                },
            }
        }
        anyhow::Ok(())
    })?;
    info!(volume = %id, "stopping: flush, unmount, detach");
    // Every step is bounded: the node plugin kills a datapath that takes longer than
    // `DATAPATH_STOP_TIMEOUT` (30 s) and reports the stop as unclean.
    let flushed = rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(15), client.flush()).await {
            Ok(r) => r.map_err(anyhow::Error::from),
            Err(_) => Err(anyhow::anyhow!("no answer in 15 s")),
        }
    });
    // Detach the mount lazily: a loop device that has not let go of the file yet keeps the
    // FUSE connection (and this session, served until then) alive; dropping the session
    // then returns once the kernel ends the connection.
    if let Err(e) = crate::mounts::run("umount", &["-l", &fuse_dir.to_string_lossy()]) {
        warn!(error = %e, "lazy unmount of the export");
    }
    info!(volume = %id, flushed = flushed.is_ok(), "export detached; ending the FUSE session");
    drop(session);
    info!(volume = %id, "FUSE session ended");
    let _ = std::fs::remove_file(args.dir.join("ready"));
    rt.block_on(async {
        match tokio::time::timeout(Duration::from_secs(5), client.detach()).await {
            Ok(r) => r.map_err(anyhow::Error::from),
            Err(_) => Err(anyhow::anyhow!("no answer in 5 s")),
        }
    })
    .with_context(|| format!("detaching volume {id}"))?;
    flushed.with_context(|| format!("final flush of volume {id}"))?;
    info!(volume = %id, "detached");
    Ok(())
}
