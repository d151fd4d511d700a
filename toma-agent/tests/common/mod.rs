//! Helpers shared by the datapath integration tests: a local cluster in its own temp dir,
//! volume clients, recognisable chunk contents, condition waits with deadlines, and a raw
//! `toma_wire` client that speaks the protocol frame by frame.
#![allow(dead_code)]

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, watch};
use toma_agent::local::{LocalCluster, LocalTimers};
use toma_client::{ClientConfig, VolumeClient};
use toma_core::{Generation, Layout, VolumeId};
use toma_wire::transport::FrameSender;
use toma_wire::{ErrorCode, Frame, Message, Secret};

pub const CHUNK: u64 = 64 * 1024;
pub const MIB: u64 = 1024 * 1024;
/// Deadline for anything the cluster does on its own (generous: a loaded 2-core machine).
pub const WAIT: Duration = Duration::from_secs(60);

/// A chunk whose bytes say which unit and which version wrote it.
pub fn block(unit: u64, version: u64) -> Bytes {
    let mut v = vec![0u8; CHUNK as usize];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (unit as usize * 31 + version as usize * 7 + i / 4096) as u8;
    }
    v[..8].copy_from_slice(&unit.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    Bytes::from(v)
}

/// Bytes of chunk `unit` in a member's extent contents.
pub fn chunk_of(contents: &[u8], unit: u64) -> &[u8] {
    &contents[(unit * CHUNK) as usize..((unit + 1) * CHUNK) as usize]
}

pub async fn cluster_with(nodes: usize, timers: LocalTimers) -> (tempfile::TempDir, LocalCluster) {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = LocalCluster::start(dir.path(), nodes, 1, 64 * MIB, timers)
        .await
        .expect("cluster starts");
    (dir, c)
}

pub async fn cluster(nodes: usize) -> (tempfile::TempDir, LocalCluster) {
    cluster_with(nodes, LocalTimers::default()).await
}

pub async fn volume(c: &LocalCluster, mirrors: u8, units: u64) -> VolumeId {
    c.create_volume("v", Layout::raid1(mirrors).unwrap(), CHUNK, units * CHUNK)
        .await
        .expect("volume created")
}

pub async fn client(c: &LocalCluster, id: VolumeId) -> VolumeClient {
    VolumeClient::attach(
        c.control_plane(),
        c.transport.clone(),
        id,
        ClientConfig::default(),
    )
    .await
    .expect("attach")
}

/// The node index that holds member `m` of the volume.
pub async fn node_of(c: &LocalCluster, id: VolumeId, m: usize) -> usize {
    c.node_of_member(id, m).await.expect("member node")
}

/// Polls `cond` until it holds, up to `max`; panics with `what` otherwise.
pub async fn wait_until<F, Fut>(what: &str, max: Duration, mut cond: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + max;
    loop {
        if cond().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {max:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Awaits a task with a deadline.
pub async fn finish<T>(what: &str, h: tokio::task::JoinHandle<T>) -> T {
    match tokio::time::timeout(WAIT, h).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => panic!("{what}: task failed: {e}"),
        Err(_) => panic!("{what}: not done after {WAIT:?}"),
    }
}

pub fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("entropy");
    u128::from_le_bytes(b)
}

type Pending = Arc<Mutex<HashMap<u64, oneshot::Sender<Message>>>>;

/// A client that speaks the datapath protocol frame by frame over one real TCP connection
/// to one agent. Replies are matched by request id; unsolicited frames are kept.
pub struct Raw {
    tx: FrameSender,
    pending: Pending,
    next: AtomicU64,
    pub volume: VolumeId,
    pub client: u128,
    /// The generation frames are sent with (set from REGISTERED / SWITCH_TOPO).
    pub generation: AtomicU64,
    pub unsolicited: tokio::sync::Mutex<mpsc::UnboundedReceiver<Message>>,
    /// Why the connection ended, once it has.
    pub closed: watch::Receiver<Option<String>>,
}

impl Raw {
    /// Connects to node `node`'s agent for `volume`, without registering.
    pub async fn connect(c: &LocalCluster, node: usize, volume: VolumeId, client: u128) -> Raw {
        let addr = c.agent(node).expect("agent runs").endpoint().to_string();
        let conn = c.transport.connect(&addr).await.expect("connect");
        let (tx, mut rx) = conn.split();
        let pending: Pending = Arc::new(Mutex::new(HashMap::new()));
        let (utx, urx) = mpsc::unbounded_channel();
        let (ctx, crx) = watch::channel(None);
        let p = pending.clone();
        tokio::spawn(async move {
            loop {
                match rx.recv().await {
                    Ok(f) if f.request_id == 0 => {
                        let _ = utx.send(f.msg);
                    }
                    Ok(f) => {
                        if let Some(t) = p.lock().remove(&f.request_id) {
                            let _ = t.send(f.msg);
                        }
                    }
                    Err(e) => {
                        p.lock().clear();
                        ctx.send_replace(Some(e.to_string()));
                        return;
                    }
                }
            }
        });
        Raw {
            tx,
            pending,
            next: AtomicU64::new(1),
            volume,
            client,
            generation: AtomicU64::new(1),
            unsolicited: tokio::sync::Mutex::new(urx),
            closed: crx,
        }
    }

    /// Connects and registers with the volume's secret; panics unless REGISTERED.
    pub async fn register(c: &LocalCluster, node: usize, volume: VolumeId, client: u128) -> Raw {
        // A volume just created is learned by its agents on their next pass.
        wait_until("the agent hosts the volume", WAIT, || async {
            c.agent(node)
                .is_some_and(|a| a.members().iter().any(|m| m.volume == volume))
        })
        .await;
        let raw = Raw::connect(c, node, volume, client).await;
        let secret = Secret(c.volume_record(volume).await.expect("volume").secret);
        let g = c.topology(volume).await.expect("topology").generation;
        match raw
            .call_gen(
                g,
                Message::Register {
                    client,
                    secret,
                    held_locks: Vec::new(),
                },
            )
            .await
        {
            Message::Registered { topology } => {
                raw.generation.store(topology.generation, Ordering::SeqCst);
            }
            other => panic!("REGISTER answered {other:?}"),
        }
        raw
    }

    /// Sends `msg` under `generation`; the reply arrives on the returned receiver.
    pub async fn send_gen(
        &self,
        generation: Generation,
        msg: Message,
    ) -> oneshot::Receiver<Message> {
        let id = self.next.fetch_add(1, Ordering::Relaxed);
        let (t, r) = oneshot::channel();
        self.pending.lock().insert(id, t);
        self.tx
            .send(&Frame::new(id, self.volume, generation, msg))
            .await
            .expect("frame sent");
        r
    }

    pub async fn call_gen(&self, generation: Generation, msg: Message) -> Message {
        let r = self.send_gen(generation, msg).await;
        match tokio::time::timeout(WAIT, r).await {
            Ok(Ok(m)) => m,
            Ok(Err(_)) => panic!(
                "connection ended before the reply: {:?}",
                *self.closed.borrow()
            ),
            Err(_) => panic!("no reply within {WAIT:?}"),
        }
    }

    /// A request under the current generation.
    pub async fn call(&self, msg: Message) -> Message {
        self.call_gen(self.generation.load(Ordering::SeqCst), msg)
            .await
    }

    pub fn close(&self) {
        self.tx.close();
    }

    /// Waits until the connection has ended; returns why.
    pub async fn wait_closed(&self) -> String {
        let mut c = self.closed.clone();
        let why = match tokio::time::timeout(WAIT, c.wait_for(|r| r.is_some())).await {
            Ok(Ok(r)) => r.clone().unwrap_or_default(),
            _ => panic!("connection still open after {WAIT:?}"),
        };
        why
    }
}

/// Asserts `m` is an `Error` with `code`; returns its message.
pub fn expect_error(m: &Message, code: ErrorCode) -> String {
    match m {
        Message::Error { code: c, message } if *c == code => message.clone(),
        other => panic!("expected an error {code}, got {other:?}"),
    }
}
