//! The NBD server over TCP against a real local cluster (2 agents, RAID1, file disks): the
//! handshake, sub-4 KiB read-modify-write, and bad input (unknown command, out-of-range,
//! misaligned, oversized, bad magic) getting the protocol's errors without changing the
//! volume.

use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use toma_agent::local::{LocalCluster, LocalTimers};
use toma_client::{ClientConfig, VolumeClient};
use toma_core::{Layout, Phase};
use toma_nbd::{serve_nbd, NbdListener};

const SIZE: u64 = 8 << 20;
const IHAVEOPT: u64 = 0x4948_4156_454f_5054;
const EINVAL: u32 = 22;
const ENOSPC: u32 = 28;

struct Fixture {
    _dir: tempfile::TempDir,
    cluster: LocalCluster,
    addr: String,
}

async fn start() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let cluster = LocalCluster::start(dir.path(), 2, 1, SIZE + (16 << 20), LocalTimers::default())
        .await
        .expect("cluster");
    let id = cluster
        .create_volume("v", Layout::raid1(2).expect("layout"), 64 * 1024, SIZE)
        .await
        .expect("volume");
    cluster
        .wait_topology(id, Duration::from_secs(30), |t| t.phase() == Phase::Normal)
        .await
        .expect("normal");
    let client = VolumeClient::attach(
        cluster.control_plane(),
        cluster.transport.clone(),
        id,
        ClientConfig::default(),
    )
    .await
    .expect("attach");
    let listener = NbdListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr();
    tokio::spawn(serve_nbd(client, listener));
    Fixture {
        _dir: dir,
        cluster,
        addr,
    }
}

/// A minimal NBD client that speaks the fixed newstyle handshake and simple replies.
struct Nbd {
    s: TcpStream,
    next: u64,
}

async fn opt(s: &mut TcpStream, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.expect("send option");
}

/// One option reply: (type, data).
async fn opt_reply(s: &mut TcpStream, want_opt: u32) -> (u32, Vec<u8>) {
    assert_eq!(s.read_u64().await.expect("magic"), 0x0003_e889_0455_65a9);
    assert_eq!(s.read_u32().await.expect("opt"), want_opt);
    let kind = s.read_u32().await.expect("type");
    let len = s.read_u32().await.expect("len");
    let mut d = vec![0u8; len as usize];
    s.read_exact(&mut d).await.expect("data");
    (kind, d)
}

impl Nbd {
    /// Connects, checks the greeting, tries an unknown option, then GO; returns the client
    /// and (size, flags, min, preferred, max block size).
    async fn connect(addr: &str) -> (Nbd, (u64, u16, u32, u32, u32)) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        assert_eq!(s.read_u64().await.expect("NBDMAGIC"), 0x4e42_444d_4147_4943);
        assert_eq!(s.read_u64().await.expect("IHAVEOPT"), IHAVEOPT);
        assert_eq!(s.read_u16().await.expect("flags"), 0b11);
        s.write_u32(0b11).await.expect("client flags");
        // An unknown option: NBD_REP_ERR_UNSUP, and haggling goes on.
        opt(&mut s, 999, b"").await;
        let (kind, _) = opt_reply(&mut s, 999).await;
        assert_eq!(kind, (1 << 31) + 1);
        // GO with the default export, asking for block sizes.
        let mut go = Vec::new();
        go.extend_from_slice(&0u32.to_be_bytes());
        go.extend_from_slice(&1u16.to_be_bytes());
        go.extend_from_slice(&3u16.to_be_bytes());
        opt(&mut s, 7, &go).await;
        let (mut size, mut flags, mut bs) = (0, 0, (0, 0, 0));
        loop {
            let (kind, d) = opt_reply(&mut s, 7).await;
            match kind {
                1 => break,
                3 => match u16::from_be_bytes([d[0], d[1]]) {
                    0 => {
                        size = u64::from_be_bytes(d[2..10].try_into().expect("8"));
                        flags = u16::from_be_bytes([d[10], d[11]]);
                    }
                    3 => {
                        let u = |i: usize| u32::from_be_bytes(d[i..i + 4].try_into().expect("4"));
                        bs = (u(2), u(6), u(10));
                    }
                    other => panic!("unexpected info {other}"),
                },
                other => panic!("unexpected reply type {other:#x}"),
            }
        }
        (Nbd { s, next: 1 }, (size, flags, bs.0, bs.1, bs.2))
    }

    async fn send(&mut self, kind: u16, flags: u16, offset: u64, len: u32, data: &[u8]) -> u64 {
        let cookie = self.next;
        self.next += 1;
        let mut b = Vec::with_capacity(28 + data.len());
        b.extend_from_slice(&0x2560_9513u32.to_be_bytes());
        b.extend_from_slice(&flags.to_be_bytes());
        b.extend_from_slice(&kind.to_be_bytes());
        b.extend_from_slice(&cookie.to_be_bytes());
        b.extend_from_slice(&offset.to_be_bytes());
        b.extend_from_slice(&len.to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).await.expect("send request");
        cookie
    }

    /// Reads one simple reply header: (error, cookie).
    async fn reply(&mut self) -> (u32, u64) {
        let magic = tokio::time::timeout(Duration::from_secs(30), self.s.read_u32())
            .await
            .expect("reply in time")
            .expect("reply magic");
        assert_eq!(magic, 0x6744_6698);
        let err = self.s.read_u32().await.expect("error");
        let cookie = self.s.read_u64().await.expect("cookie");
        (err, cookie)
    }

    async fn cmd(&mut self, kind: u16, offset: u64, len: u32, data: &[u8]) -> u32 {
        let c = self.send(kind, 0, offset, len, data).await;
        let (err, cookie) = self.reply().await;
        assert_eq!(cookie, c);
        err
    }

    async fn write(&mut self, offset: u64, data: &[u8]) -> u32 {
        self.cmd(1, offset, data.len() as u32, data).await
    }

    async fn read(&mut self, offset: u64, len: u32) -> Result<Vec<u8>, u32> {
        let c = self.send(0, 0, offset, len, &[]).await;
        let (err, cookie) = self.reply().await;
        assert_eq!(cookie, c);
        if err != 0 {
            return Err(err);
        }
        let mut d = vec![0u8; len as usize];
        self.s.read_exact(&mut d).await.expect("read data");
        Ok(d)
    }
}

fn pattern(seed: u8, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_io_and_sub_block_writes() {
    let f = start().await;
    let (mut c, (size, flags, min, pref, max)) = Nbd::connect(&f.addr).await;
    assert_eq!(size, SIZE);
    assert_eq!((min, pref, max), (512, 4096, 32 << 20));
    // HAS_FLAGS, FLUSH, FUA, TRIM, WRITE_ZEROES, CAN_MULTI_CONN.
    assert_eq!(flags, 1 | 4 | 8 | 32 | 64 | 256);

    let a = pattern(1, 3 * 4096);
    assert_eq!(c.write(8192, &a).await, 0);
    assert_eq!(c.read(8192, a.len() as u32).await, Ok(a.clone()));

    // 512-byte writes inside one 4 KiB block, all in flight at once: read-modify-write must
    // not lose any of them.
    let mut expect = a.clone();
    let mut cookies = Vec::new();
    for k in 0..8u8 {
        let off = 8192 + 4096 + u64::from(k) * 512;
        let d = vec![0xA0 + k; 512];
        expect[4096 + usize::from(k) * 512..][..512].copy_from_slice(&d);
        cookies.push(c.send(1, 0, off, 512, &d).await);
    }
    for _ in 0..8 {
        let (err, cookie) = c.reply().await;
        assert_eq!(err, 0);
        assert!(cookies.contains(&cookie));
    }
    assert_eq!(c.read(8192, a.len() as u32).await, Ok(expect.clone()));
    // A 512-aligned read across block edges.
    assert_eq!(
        c.read(8192 + 3584, 1024).await,
        Ok(expect[3584..4608].to_vec())
    );

    // FUA write, WRITE_ZEROES across a block edge (512-aligned), TRIM and FLUSH.
    let fua = c.send(1, 1, 0, 4096, &pattern(9, 4096)).await;
    assert_eq!(c.reply().await, (0, fua));
    assert_eq!(c.cmd(6, 8192 + 2048, 4096, &[]).await, 0);
    expect[2048..6144].fill(0);
    assert_eq!(c.read(8192, a.len() as u32).await, Ok(expect));
    assert_eq!(c.cmd(4, 1 << 20, 1 << 20, &[]).await, 0);
    assert_eq!(c.cmd(3, 0, 0, &[]).await, 0);

    // Disconnect: the server closes after answering what was in flight.
    c.send(2, 0, 0, 0, &[]).await;
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("clean close");
    assert_eq!(n, 0);
    f.cluster.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_requests_get_protocol_errors_and_change_nothing() {
    let f = start().await;
    let (mut c, _) = Nbd::connect(&f.addr).await;
    let base = pattern(7, 64 * 1024);
    assert_eq!(c.write(0, &base).await, 0);
    let tail = pattern(8, 4096);
    assert_eq!(c.write(SIZE - 4096, &tail).await, 0);

    // Unknown command (CACHE, BLOCK_STATUS, made-up): EINVAL, connection still usable.
    for kind in [5u16, 7, 42] {
        assert_eq!(c.cmd(kind, 0, 4096, &[]).await, EINVAL, "command {kind}");
    }
    // Out of range: reads and trims EINVAL, writes and write-zeroes ENOSPC (the write's
    // payload is consumed, the stream stays in step).
    assert_eq!(c.read(SIZE - 4096, 8192).await, Err(EINVAL));
    assert_eq!(c.read(u64::MAX - 511, 512).await, Err(EINVAL));
    assert_eq!(c.cmd(4, SIZE, 4096, &[]).await, EINVAL);
    assert_eq!(c.write(SIZE - 4096, &vec![0xEE; 8192]).await, ENOSPC);
    assert_eq!(c.write(SIZE, &vec![0xEE; 4096]).await, ENOSPC);
    assert_eq!(c.cmd(6, SIZE - 4096, 8192, &[]).await, ENOSPC);
    // Misaligned (below the 512-byte minimum block size) and zero-length: EINVAL.
    assert_eq!(c.write(3, &[0xEE; 4096]).await, EINVAL);
    assert_eq!(c.write(4096, &[0xEE; 100]).await, EINVAL);
    assert_eq!(c.read(100, 4096).await, Err(EINVAL));
    assert_eq!(c.cmd(6, 1, 4096, &[]).await, EINVAL);
    assert_eq!(c.read(0, 0).await, Err(EINVAL));
    assert_eq!(c.write(0, &[]).await, EINVAL);
    // Longer than the advertised maximum: EINVAL, payload discarded.
    let big = vec![0xEE; (32 << 20) + 4096];
    assert_eq!(c.write(0, &big).await, EINVAL);
    assert_eq!(c.read(0, (32 << 20) + 4096).await, Err(EINVAL));

    // Nothing changed, and the connection still works.
    assert_eq!(c.read(0, base.len() as u32).await, Ok(base.clone()));
    assert_eq!(c.read(SIZE - 4096, 4096).await, Ok(tail));

    // A bad request magic ends the connection (the stream cannot be resynchronised) ...
    c.s.write_all(&[0u8; 28]).await.expect("send garbage");
    let mut rest = Vec::new();
    let n = tokio::time::timeout(Duration::from_secs(10), c.s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .unwrap_or(0);
    assert_eq!(n, 0);
    // ... but not the server.
    let (mut c2, _) = Nbd::connect(&f.addr).await;
    assert_eq!(c2.read(0, base.len() as u32).await, Ok(base));
    f.cluster.shutdown().await;
}
