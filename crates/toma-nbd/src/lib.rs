//! An NBD server backed by a Toma volume client, so that standard tools (fio's `nbd`
//! engine, `qemu-img`, `nbdinfo`, the kernel's `nbd-client`) can use a Toma volume.
//!
//! Written from the NBD protocol description (`doc/proto.md` of the reference
//! implementation). What this server does:
//!
//! - **Handshake**: fixed newstyle only (`NBD_FLAG_FIXED_NEWSTYLE | NBD_FLAG_NO_ZEROES`).
//!   Options: `EXPORT_NAME`, `ABORT`, `LIST`, `INFO`, `GO` (with `NBD_INFO_EXPORT` and
//!   `NBD_INFO_BLOCK_SIZE`: minimum 512, preferred 4096, maximum 32 MiB). Structured replies,
//!   meta contexts, TLS and anything else are answered `NBD_REP_ERR_UNSUP`. One export; its
//!   name is `""` or the configured name (others: `NBD_REP_ERR_UNKNOWN`).
//! - **Transmission**: simple replies. `READ`, `WRITE` (with `FUA`), `FLUSH`, `TRIM`,
//!   `WRITE_ZEROES`, `DISC`. Requests are served concurrently (at most
//!   [`NbdConfig::max_in_flight`] per connection) and answered as they complete; several
//!   connections may serve one volume (`NBD_FLAG_CAN_MULTI_CONN`: a FLUSH flushes every
//!   member, so it covers writes completed on any connection).
//! - **Alignment**: the Toma datapath moves whole 4 KiB blocks. Requests must be multiples
//!   of 512 bytes (the advertised minimum block size); a request that is 512- but not
//!   4096-aligned is served by reading the covering 4 KiB blocks (reads) or by a
//!   read-modify-write of its edge blocks (writes). Every write holds its 4 KiB-aligned
//!   span in a range lock shared by all connections of the server for its whole duration,
//!   so an RMW can neither lose a concurrent write to another sector of the same block nor
//!   undo an aligned write (see [`rangelock`]). The exclusion is per `toma nbd` process:
//!   two processes writing different sectors of one 4 KiB block at the same time are not
//!   protected from each other (the Toma chunk locks only protect whole-block writes).
//! - **Bad input**: an unknown command, or a request breaking the 512-byte minimum block
//!   size, gets `EINVAL`; a read or trim beyond the end of the volume gets `EINVAL`, a write
//!   or write-zeroes beyond it `ENOSPC`; a length of zero or above 32 MiB gets `EINVAL` (a
//!   write's payload is read and discarded first, so the connection stays usable). None of
//!   these touch the volume. A request with a bad magic number ends the connection (the
//!   stream cannot be resynchronised).
//!
//! Topology switches, held writes and re-registration are the [`VolumeClient`]'s business:
//! the NBD server just waits for each call.
#![forbid(unsafe_code)]

pub mod rangelock;

use std::io::{self, IoSlice};
use std::path::PathBuf;
use std::sync::Arc;

use bytes::{Buf, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader};
use tokio::sync::{mpsc, Semaphore};
use toma_client::{ClientError, VolumeClient};
use tracing::{debug, warn};

use rangelock::RangeLocks;

// Handshake.
const NBDMAGIC: u64 = 0x4e42_444d_4147_4943;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const REPLY_MAGIC_OPT: u64 = 0x0003_e889_0455_65a9;
const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
const FLAG_NO_ZEROES: u16 = 1 << 1;
const CLIENT_FLAGS_KNOWN: u32 = 0b11;

const OPT_EXPORT_NAME: u32 = 1;
const OPT_ABORT: u32 = 2;
const OPT_LIST: u32 = 3;
const OPT_INFO: u32 = 6;
const OPT_GO: u32 = 7;

const REP_ACK: u32 = 1;
const REP_SERVER: u32 = 2;
const REP_INFO: u32 = 3;
const REP_ERR_UNSUP: u32 = (1 << 31) + 1;
const REP_ERR_INVALID: u32 = (1 << 31) + 3;
const REP_ERR_UNKNOWN: u32 = (1 << 31) + 6;

const INFO_EXPORT: u16 = 0;
const INFO_BLOCK_SIZE: u16 = 3;

// Transmission flags.
const TF_HAS_FLAGS: u16 = 1 << 0;
const TF_SEND_FLUSH: u16 = 1 << 2;
const TF_SEND_FUA: u16 = 1 << 3;
const TF_SEND_TRIM: u16 = 1 << 5;
const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
const TF_CAN_MULTI_CONN: u16 = 1 << 8;
const TRANSMISSION_FLAGS: u16 = TF_HAS_FLAGS
    | TF_SEND_FLUSH
    | TF_SEND_FUA
    | TF_SEND_TRIM
    | TF_SEND_WRITE_ZEROES
    | TF_CAN_MULTI_CONN;

// Requests and replies.
const REQUEST_MAGIC: u32 = 0x2560_9513;
const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
const REQUEST_LEN: usize = 28;
const CMD_FLAG_FUA: u16 = 1 << 0;

const CMD_READ: u16 = 0;
const CMD_WRITE: u16 = 1;
const CMD_DISC: u16 = 2;
const CMD_FLUSH: u16 = 3;
const CMD_TRIM: u16 = 4;
const CMD_WRITE_ZEROES: u16 = 6;

/// NBD error values (the protocol's, which are Linux errno values).
pub mod errno {
    pub const EIO: u32 = 5;
    pub const EINVAL: u32 = 22;
    pub const ENOSPC: u32 = 28;
}

/// Advertised block sizes.
pub const MIN_BLOCK: u32 = 512;
pub const PREFERRED_BLOCK: u32 = 4096;
pub const MAX_REQUEST: u32 = 32 << 20;
const BLOCK: u64 = 4096;
/// Option payloads larger than this end the handshake (every known option is far smaller).
const MAX_OPTION_LEN: u32 = 64 * 1024;
/// WRITE_ZEROES is written in pieces of this size.
const ZERO_PIECE: u64 = 1 << 20;

/// How a server behaves.
#[derive(Debug, Clone)]
pub struct NbdConfig {
    /// The export's name (`""` is always accepted too).
    pub export_name: String,
    /// Requests served at once per connection; the reader waits beyond that.
    pub max_in_flight: usize,
}

impl Default for NbdConfig {
    fn default() -> Self {
        NbdConfig {
            export_name: "toma".into(),
            max_in_flight: 128,
        }
    }
}

/// Where a server listens: TCP (`host:port`) or a Unix socket (`unix:PATH`).
pub enum NbdListener {
    Tcp(tokio::net::TcpListener),
    Unix(tokio::net::UnixListener, PathBuf),
}

impl NbdListener {
    /// Binds `addr`: `unix:PATH` (a stale socket file at PATH is replaced) or `host:port`.
    pub async fn bind(addr: &str) -> io::Result<NbdListener> {
        if let Some(path) = addr.strip_prefix("unix:") {
            let path = PathBuf::from(path);
            if std::fs::symlink_metadata(&path).is_ok_and(|m| {
                use std::os::unix::fs::FileTypeExt;
                m.file_type().is_socket()
            }) {
                std::fs::remove_file(&path)?;
            }
            let l = tokio::net::UnixListener::bind(&path)?;
            Ok(NbdListener::Unix(l, path))
        } else {
            Ok(NbdListener::Tcp(tokio::net::TcpListener::bind(addr).await?))
        }
    }

    /// `host:port` or `unix:PATH`, with the port actually bound.
    pub fn local_addr(&self) -> String {
        match self {
            NbdListener::Tcp(l) => l
                .local_addr()
                .map(|a| a.to_string())
                .unwrap_or_else(|_| "?".into()),
            NbdListener::Unix(_, p) => format!("unix:{}", p.display()),
        }
    }

    /// The NBD URI of the default export (`nbd://…/` or `nbd+unix:///?socket=…`).
    pub fn uri(&self) -> String {
        match self {
            NbdListener::Tcp(_) => format!("nbd://{}/", self.local_addr()),
            NbdListener::Unix(_, p) => format!("nbd+unix:///?socket={}", p.display()),
        }
    }
}

/// What all connections of one server share.
struct Export {
    client: VolumeClient,
    size: u64,
    cfg: NbdConfig,
    ranges: RangeLocks,
    zeros: Bytes,
}

/// Serves `client`'s volume on `listener` until the listener fails (each connection in its
/// own task). See [`serve_nbd_with`].
pub async fn serve_nbd(client: VolumeClient, listener: NbdListener) -> io::Result<()> {
    serve_nbd_with(client, listener, NbdConfig::default()).await
}

/// Serves `client`'s volume on `listener` with `cfg`.
pub async fn serve_nbd_with(
    client: VolumeClient,
    listener: NbdListener,
    cfg: NbdConfig,
) -> io::Result<()> {
    let export = Arc::new(Export {
        size: client.spec().size,
        client,
        cfg,
        ranges: RangeLocks::default(),
        zeros: Bytes::from(vec![0u8; ZERO_PIECE as usize]),
    });
    loop {
        match &listener {
            NbdListener::Tcp(l) => {
                let (s, peer) = l.accept().await?;
                let _ = s.set_nodelay(true);
                let (r, w) = s.into_split();
                spawn_conn(export.clone(), r, w, peer.to_string());
            }
            NbdListener::Unix(l, _) => {
                let (s, _) = l.accept().await?;
                let (r, w) = s.into_split();
                spawn_conn(export.clone(), r, w, "unix".into());
            }
        }
    }
}

fn spawn_conn<R, W>(export: Arc<Export>, r: R, w: W, peer: String)
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    tokio::spawn(async move {
        match serve_conn(export, r, w).await {
            Ok(()) => debug!(peer, "NBD connection closed"),
            Err(e) => debug!(peer, error = %e, "NBD connection ended"),
        }
    });
}

async fn serve_conn<R, W>(export: Arc<Export>, r: R, mut w: W) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let mut r = BufReader::with_capacity(256 * 1024, r);
    if !handshake(&export, &mut r, &mut w).await? {
        return Ok(());
    }
    transmission(export, r, w).await
}

fn bad(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

async fn opt_reply<W: AsyncWrite + Unpin>(
    w: &mut W,
    opt: u32,
    kind: u32,
    data: &[u8],
) -> io::Result<()> {
    let mut b = Vec::with_capacity(20 + data.len());
    b.extend_from_slice(&REPLY_MAGIC_OPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&kind.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    w.write_all(&b).await?;
    w.flush().await
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    b.get(at..at + 2).map(|s| u16::from_be_bytes([s[0], s[1]]))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    b.get(at..at + 4)
        .map(|s| u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

/// The option haggling phase. Returns whether to enter transmission.
async fn handshake<R, W>(export: &Export, r: &mut R, w: &mut W) -> io::Result<bool>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let mut hello = Vec::with_capacity(18);
    hello.extend_from_slice(&NBDMAGIC.to_be_bytes());
    hello.extend_from_slice(&IHAVEOPT.to_be_bytes());
    hello.extend_from_slice(&(FLAG_FIXED_NEWSTYLE | FLAG_NO_ZEROES).to_be_bytes());
    w.write_all(&hello).await?;
    w.flush().await?;
    let client_flags = r.read_u32().await?;
    if client_flags & !CLIENT_FLAGS_KNOWN != 0 {
        return Err(bad(format!("unknown client flags {client_flags:#x}")));
    }
    let no_zeroes = client_flags & u32::from(FLAG_NO_ZEROES) != 0;
    loop {
        let magic = r.read_u64().await?;
        if magic != IHAVEOPT {
            return Err(bad(format!("bad option magic {magic:#x}")));
        }
        let opt = r.read_u32().await?;
        let len = r.read_u32().await?;
        if len > MAX_OPTION_LEN {
            return Err(bad(format!("option {opt} of {len} bytes")));
        }
        let mut data = vec![0u8; len as usize];
        r.read_exact(&mut data).await?;
        match opt {
            OPT_EXPORT_NAME => {
                if !export.name_ok(&data) {
                    // No error reply exists for EXPORT_NAME: close.
                    return Err(bad("unknown export name"));
                }
                let mut b = Vec::with_capacity(10 + 124);
                b.extend_from_slice(&export.size.to_be_bytes());
                b.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                if !no_zeroes {
                    b.extend_from_slice(&[0u8; 124]);
                }
                w.write_all(&b).await?;
                w.flush().await?;
                return Ok(true);
            }
            OPT_ABORT => {
                let _ = opt_reply(w, opt, REP_ACK, &[]).await;
                return Ok(false);
            }
            OPT_LIST => {
                if len != 0 {
                    opt_reply(w, opt, REP_ERR_INVALID, b"LIST takes no data").await?;
                    continue;
                }
                let name = export.cfg.export_name.as_bytes();
                let mut d = Vec::with_capacity(4 + name.len());
                d.extend_from_slice(&(name.len() as u32).to_be_bytes());
                d.extend_from_slice(name);
                opt_reply(w, opt, REP_SERVER, &d).await?;
                opt_reply(w, opt, REP_ACK, &[]).await?;
            }
            OPT_INFO | OPT_GO => {
                // u32 name length, name, u16 count of info requests, u16 each.
                let parsed = be_u32(&data, 0).and_then(|n| {
                    let n = n as usize;
                    let name = data.get(4..4usize.checked_add(n)?)?;
                    let count = be_u16(&data, 4 + n)? as usize;
                    (data.len() == 4 + n + 2 + 2 * count).then_some(name)
                });
                let Some(name) = parsed else {
                    opt_reply(w, opt, REP_ERR_INVALID, b"malformed INFO/GO request").await?;
                    continue;
                };
                if !export.name_ok(name) {
                    opt_reply(w, opt, REP_ERR_UNKNOWN, b"no such export").await?;
                    continue;
                }
                let mut info = Vec::with_capacity(12);
                info.extend_from_slice(&INFO_EXPORT.to_be_bytes());
                info.extend_from_slice(&export.size.to_be_bytes());
                info.extend_from_slice(&TRANSMISSION_FLAGS.to_be_bytes());
                opt_reply(w, opt, REP_INFO, &info).await?;
                let mut bs = Vec::with_capacity(14);
                bs.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
                bs.extend_from_slice(&MIN_BLOCK.to_be_bytes());
                bs.extend_from_slice(&PREFERRED_BLOCK.to_be_bytes());
                bs.extend_from_slice(&MAX_REQUEST.to_be_bytes());
                opt_reply(w, opt, REP_INFO, &bs).await?;
                opt_reply(w, opt, REP_ACK, &[]).await?;
                if opt == OPT_GO {
                    return Ok(true);
                }
            }
            _ => {
                opt_reply(w, opt, REP_ERR_UNSUP, b"option not supported").await?;
            }
        }
    }
}

/// One reply: the 16-byte simple reply header and, for a successful READ, the data (one
/// buffer per lock unit, written out with the header in one vectored write).
struct Reply {
    head: [u8; 16],
    data: Vec<Bytes>,
}

fn reply(cookie: u64, error: u32, data: Vec<Bytes>) -> Reply {
    let mut head = [0u8; 16];
    head[..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    head[4..8].copy_from_slice(&error.to_be_bytes());
    head[8..].copy_from_slice(&cookie.to_be_bytes());
    Reply {
        head,
        data: if error == 0 { data } else { Vec::new() },
    }
}

struct Request {
    flags: u16,
    kind: u16,
    cookie: u64,
    offset: u64,
    len: u32,
}

async fn transmission<R, W>(export: Arc<Export>, mut r: BufReader<R>, w: W) -> io::Result<()>
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let (tx, rx) = mpsc::channel::<Reply>(export.cfg.max_in_flight.max(1) * 2);
    let writer = tokio::spawn(write_replies(w, rx));
    let slots = Arc::new(Semaphore::new(export.cfg.max_in_flight.max(1)));
    let result = loop {
        let mut h = [0u8; REQUEST_LEN];
        match r.read_exact(&mut h).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => break Ok(()),
            Err(e) => break Err(e),
        }
        let magic = u32::from_be_bytes([h[0], h[1], h[2], h[3]]);
        if magic != REQUEST_MAGIC {
            warn!("NBD request with bad magic {magic:#x}: closing the connection");
            break Err(bad(format!("bad request magic {magic:#x}")));
        }
        let req = Request {
            flags: u16::from_be_bytes([h[4], h[5]]),
            kind: u16::from_be_bytes([h[6], h[7]]),
            cookie: u64::from_be_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]),
            offset: u64::from_be_bytes([h[16], h[17], h[18], h[19], h[20], h[21], h[22], h[23]]),
            len: u32::from_be_bytes([h[24], h[25], h[26], h[27]]),
        };
        if req.kind == CMD_DISC {
            break Ok(());
        }
        let mut payload = None;
        if req.kind == CMD_WRITE {
            if req.len > MAX_REQUEST {
                // Read and drop the payload so the stream stays in step.
                let mut rest = (&mut r).take(u64::from(req.len));
                match tokio::io::copy(&mut rest, &mut tokio::io::sink()).await {
                    Ok(n) if n == u64::from(req.len) => {}
                    Ok(_) => break Err(io::ErrorKind::UnexpectedEof.into()),
                    Err(e) => break Err(e),
                }
                let _ = tx.send(reply(req.cookie, errno::EINVAL, Vec::new())).await;
                continue;
            }
            match read_payload(&mut r, req.len as usize).await {
                Ok(p) => payload = Some(p),
                Err(e) => break Err(e),
            }
        }
        let Ok(permit) = slots.clone().acquire_owned().await else {
            break Ok(());
        };
        let (export, tx) = (export.clone(), tx.clone());
        tokio::spawn(async move {
            let rep = export.handle(&req, payload).await;
            let _ = tx.send(rep).await;
            drop(permit);
        });
    };
    // Replies to everything in flight go out before the connection closes.
    drop(tx);
    let written = writer.await.unwrap_or_else(|e| Err(io::Error::other(e)));
    result.and(written)
}

async fn read_payload<R: AsyncRead + Unpin>(r: &mut R, len: usize) -> io::Result<Bytes> {
    let mut buf = BytesMut::with_capacity(len);
    let mut rest = r.take(len as u64);
    while buf.len() < len {
        if rest.read_buf(&mut buf).await? == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
    }
    Ok(buf.freeze())
}

async fn write_replies<W: AsyncWrite + Unpin>(
    mut w: W,
    mut rx: mpsc::Receiver<Reply>,
) -> io::Result<()> {
    let mut batch: Vec<Reply> = Vec::with_capacity(64);
    let mut failed = None;
    let mut busy = false;
    while let Some(first) = rx.recv().await {
        if failed.is_some() {
            continue; // keep draining so request tasks never block
        }
        batch.push(first);
        // Gather what is queued; under load (the last batch had more than one reply) give
        // the request tasks that are ready one turn of the scheduler to queue theirs, and
        // gather again (fewer system calls). Alone, the turn would only add latency.
        for turn in 0..2 {
            if turn == 1 {
                if !busy || batch.len() >= 64 {
                    break;
                }
                tokio::task::yield_now().await;
            }
            while batch.len() < 64 {
                match rx.try_recv() {
                    Ok(r) => batch.push(r),
                    Err(_) => break,
                }
            }
        }
        busy = batch.len() > 1;
        if let Err(e) = write_batch(&mut w, &mut batch).await {
            failed = Some(e);
        }
        batch.clear();
    }
    let _ = w.shutdown().await;
    failed.map_or(Ok(()), Err)
}

/// Writes every reply of `batch` with vectored writes.
async fn write_batch<W: AsyncWrite + Unpin>(w: &mut W, batch: &mut [Reply]) -> io::Result<()> {
    let mut bufs: Vec<Bytes> = Vec::with_capacity(batch.len() * 2);
    for r in batch.iter_mut() {
        bufs.push(Bytes::copy_from_slice(&r.head));
        bufs.append(&mut r.data);
    }
    let mut start = 0;
    while start < bufs.len() {
        let n = {
            let slices: Vec<IoSlice<'_>> = bufs[start..]
                .iter()
                .take(512)
                .map(|b| IoSlice::new(b))
                .collect();
            w.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 && start < bufs.len() {
            let b = &mut bufs[start];
            if b.len() <= left {
                left -= b.len();
                start += 1;
            } else {
                b.advance(left);
                left = 0;
            }
        }
    }
    w.flush().await
}

fn client_errno(e: &ClientError) -> u32 {
    match e {
        ClientError::OutOfRange { .. } => errno::EINVAL,
        _ => errno::EIO,
    }
}

impl Export {
    fn name_ok(&self, name: &[u8]) -> bool {
        name.is_empty() || name == self.cfg.export_name.as_bytes()
    }

    /// Checks a request's range: `Err(errno)` if it is empty, too long, not a multiple of
    /// the minimum block size, or (with `beyond`) past the end of the volume.
    fn check(&self, req: &Request, beyond: u32) -> Result<(), u32> {
        let min = u64::from(MIN_BLOCK);
        if req.len == 0
            || req.len > MAX_REQUEST
            || !req.offset.is_multiple_of(min)
            || !u64::from(req.len).is_multiple_of(min)
        {
            return Err(errno::EINVAL);
        }
        match req.offset.checked_add(u64::from(req.len)) {
            Some(end) if end <= self.size => Ok(()),
            _ => Err(beyond),
        }
    }

    async fn handle(&self, req: &Request, payload: Option<Bytes>) -> Reply {
        let fua = req.flags & CMD_FLAG_FUA != 0;
        let res: Result<Vec<Bytes>, u32> = match req.kind {
            CMD_READ => match self.check(req, errno::EINVAL) {
                Ok(()) => self.read(req.offset, req.len as usize).await,
                Err(e) => Err(e),
            },
            CMD_WRITE => match (self.check(req, errno::ENOSPC), payload) {
                (Ok(()), Some(data)) => self.write(req.offset, data, fua).await.map(|_| Vec::new()),
                (Ok(()), None) => Err(errno::EINVAL),
                (Err(e), _) => Err(e),
            },
            CMD_WRITE_ZEROES => match self.check(req, errno::ENOSPC) {
                Ok(()) => self
                    .write_zeroes(req.offset, u64::from(req.len), fua)
                    .await
                    .map(|_| Vec::new()),
                Err(e) => Err(e),
            },
            CMD_TRIM => {
                // Advisory: the data is left as it is (the protocol lets a trimmed range
                // read as anything until it is written again).
                self.check(req, errno::EINVAL).map(|_| Vec::new())
            }
            CMD_FLUSH => self.flush().await.map(|_| Vec::new()),
            other => {
                debug!(command = other, "unknown NBD command");
                Err(errno::EINVAL)
            }
        };
        match res {
            Ok(data) => reply(req.cookie, 0, data),
            Err(e) => reply(req.cookie, e, Vec::new()),
        }
    }

    async fn flush(&self) -> Result<(), u32> {
        self.client.flush().await.map_err(|e| {
            warn!(error = %e, "NBD flush failed");
            client_errno(&e)
        })
    }

    async fn read(&self, offset: u64, len: usize) -> Result<Vec<Bytes>, u32> {
        let a0 = offset - offset % BLOCK;
        let a1 = (offset + len as u64).div_ceil(BLOCK) * BLOCK;
        let fail = |e: ClientError| {
            warn!(error = %e, offset, len, "NBD read failed");
            client_errno(&e)
        };
        if a0 == offset && a1 - a0 == len as u64 {
            // Aligned: the members' buffers go out as they are (vectored, no copy).
            return self.client.read_vectored(offset, len).await.map_err(fail);
        }
        let data = self
            .client
            .read(a0, (a1 - a0) as usize)
            .await
            .map_err(fail)?;
        let at = (offset - a0) as usize;
        Ok(vec![data.slice(at..at + len)])
    }

    async fn write(&self, offset: u64, data: Bytes, fua: bool) -> Result<(), u32> {
        let end = offset + data.len() as u64;
        let a0 = offset - offset % BLOCK;
        let a1 = end.div_ceil(BLOCK) * BLOCK;
        let _span = self.ranges.lock(a0, a1).await;
        let fail = |e: ClientError| {
            warn!(error = %e, offset, "NBD write failed");
            client_errno(&e)
        };
        let full = if a0 == offset && a1 == end {
            data
        } else {
            // Read-modify-write of the edge blocks, under the span's range lock.
            let mut buf = BytesMut::zeroed((a1 - a0) as usize);
            if a0 != offset {
                let head = self.client.read(a0, BLOCK as usize).await.map_err(fail)?;
                buf[..BLOCK as usize].copy_from_slice(&head);
            }
            let last = a1 - BLOCK;
            if a1 != end && !(last == a0 && a0 != offset) {
                let tail = self.client.read(last, BLOCK as usize).await.map_err(fail)?;
                let at = (last - a0) as usize;
                buf[at..at + BLOCK as usize].copy_from_slice(&tail);
            }
            let at = (offset - a0) as usize;
            buf[at..at + data.len()].copy_from_slice(&data);
            buf.freeze()
        };
        self.client.write(a0, full).await.map_err(fail)?;
        if fua {
            self.flush().await?;
        }
        Ok(())
    }

    async fn write_zeroes(&self, offset: u64, len: u64, fua: bool) -> Result<(), u32> {
        let end = offset + len;
        let mut pos = offset;
        while pos < end {
            // Pieces end on ZERO_PIECE boundaries, so the middle ones are aligned.
            let piece_end = ((pos / ZERO_PIECE + 1) * ZERO_PIECE).min(end);
            let n = (piece_end - pos) as usize;
            self.write(pos, self.zeros.slice(..n), false).await?;
            pos = piece_end;
        }
        if fua {
            self.flush().await?;
        }
        Ok(())
    }
}
