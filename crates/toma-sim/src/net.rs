//! The simulated network: every datapath connection between two nodes goes through two
//! pump tasks (one per direction) that delay, duplicate, reorder and drop frames as the
//! seed says, cut links (both ways or one way), and reset every connection of a crashed
//! node. Each node gets its own [`NodeNet`] (a [`Transport`]) that knows who dials.
//!
//! Semantics (what a TCP or RDMA RC connection can do): frames of one connection arrive in
//! order unless the run allows reordering; a spike delays a frame (and, in order, those
//! behind it) past the client's request timeout, so it can land late; a duplicate arrives
//! right after its original; a frame sent over a cut link is lost and the connection is
//! reset a little later (the sender's retransmission timeout), never silently kept alive.

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;
use toma_wire::transport::{BoxFuture, Conn, ConnHandle, Listener, Transport};
use toma_wire::{decode_frame, ConnError, EncodedFrame, Frame};

use crate::rng::Rng;
use crate::watchdog::Watchdog;

/// Sees every frame when it is delivered (the invariant checker).
pub trait Observer: Send + Sync {
    /// `request`: the frame goes from the dialing side to the listening side.
    fn deliver(&self, conn: u64, from: usize, to: usize, request: bool, frame: &Frame);
}

/// How frames travel (per run; `jitter` raises it for a while).
#[derive(Debug, Clone, Copy)]
pub struct LinkParams {
    pub delay_min_us: u64,
    pub delay_max_us: u64,
    /// Probability of a long delay (past the client's request timeout).
    pub spike: f64,
    pub spike_max_ms: u64,
    pub dup: f64,
    pub reorder: bool,
}

impl Default for LinkParams {
    fn default() -> Self {
        LinkParams {
            delay_min_us: 20,
            delay_max_us: 300,
            spike: 0.0,
            spike_max_ms: 0,
            dup: 0.0,
            reorder: false,
        }
    }
}

/// What happened to frames, for the run's report.
#[derive(Debug, Default, Clone)]
pub struct NetStats {
    pub frames: u64,
    pub dropped: u64,
    pub duplicated: u64,
    pub spiked: u64,
    pub resets: u64,
}

struct ConnRec {
    a: usize,
    b: usize,
    kill: watch::Sender<bool>,
}

struct State {
    rng: Rng,
    params: LinkParams,
    listeners: BTreeMap<String, (usize, mpsc::UnboundedSender<Conn>)>,
    incarnation: Vec<u64>,
    down: BTreeSet<usize>,
    cut: BTreeSet<(usize, usize)>,
    conns: BTreeMap<u64, ConnRec>,
    next_conn: u64,
    stats: NetStats,
}

#[derive(Clone)]
pub struct SimNet {
    st: Arc<Mutex<State>>,
    obs: Arc<dyn Observer>,
    wd: Arc<Watchdog>,
}

enum Fate {
    Lost { reset_after: Option<Duration> },
    Deliver { delay: Duration, dup: bool },
}

impl SimNet {
    pub fn new(
        nodes: usize,
        rng: Rng,
        params: LinkParams,
        obs: Arc<dyn Observer>,
        wd: Arc<Watchdog>,
    ) -> Self {
        SimNet {
            st: Arc::new(Mutex::new(State {
                rng,
                params,
                listeners: BTreeMap::new(),
                incarnation: vec![0; nodes],
                down: BTreeSet::new(),
                cut: BTreeSet::new(),
                conns: BTreeMap::new(),
                next_conn: 1,
                stats: NetStats::default(),
            })),
            obs,
            wd,
        }
    }

    /// The transport of node `node`'s current incarnation.
    pub fn node(&self, node: usize) -> Arc<NodeNet> {
        let inc = self.st.lock().incarnation[node];
        Arc::new(NodeNet {
            net: self.clone(),
            node,
            inc,
        })
    }

    pub fn set_params(&self, p: LinkParams) {
        self.st.lock().params = p;
    }

    pub fn params(&self) -> LinkParams {
        self.st.lock().params
    }

    pub fn stats(&self) -> NetStats {
        self.st.lock().stats.clone()
    }

    /// The node stops: its connections reset, its transports are dead for good (a restart
    /// takes a new [`SimNet::node`]).
    pub fn crash(&self, node: usize) {
        let mut st = self.st.lock();
        st.incarnation[node] += 1;
        st.down.insert(node);
        st.listeners.retain(|_, (n, _)| *n != node);
        let ids: Vec<u64> = st
            .conns
            .iter()
            .filter(|(_, c)| c.a == node || c.b == node)
            .map(|(id, _)| *id)
            .collect();
        for id in ids {
            if let Some(c) = st.conns.remove(&id) {
                c.kill.send_replace(true);
                st.stats.resets += 1;
            }
        }
    }

    pub fn revive(&self, node: usize) {
        self.st.lock().down.remove(&node);
    }

    /// Frames from `from` to `to` are lost until [`SimNet::heal`].
    pub fn cut(&self, from: usize, to: usize) {
        self.st.lock().cut.insert((from, to));
    }

    pub fn heal(&self, from: usize, to: usize) {
        self.st.lock().cut.remove(&(from, to));
    }

    pub fn heal_all(&self) {
        self.st.lock().cut.clear();
    }

    fn reset(&self, id: u64) {
        let mut st = self.st.lock();
        if let Some(c) = st.conns.remove(&id) {
            c.kill.send_replace(true);
            st.stats.resets += 1;
        }
    }

    fn fate(&self, id: u64, from: usize, to: usize, lost_once: &mut bool) -> Fate {
        self.wd.step("a frame sent");
        let mut st = self.st.lock();
        st.stats.frames += 1;
        if st.down.contains(&from) || st.down.contains(&to) || st.cut.contains(&(from, to)) {
            st.stats.dropped += 1;
            let reset_after = if *lost_once || !st.conns.contains_key(&id) {
                None
            } else {
                *lost_once = true;
                Some(st.rng.millis(200, 2000))
            };
            return Fate::Lost { reset_after };
        }
        let p = st.params;
        let mut delay = st.rng.micros(p.delay_min_us, p.delay_max_us);
        if p.spike > 0.0 && st.rng.chance(p.spike) {
            delay += st.rng.millis(500, p.spike_max_ms.max(500));
            st.stats.spiked += 1;
        }
        let dup = p.dup > 0.0 && st.rng.chance(p.dup);
        if dup {
            st.stats.duplicated += 1;
        }
        Fate::Deliver { delay, dup }
    }

    async fn dial(&self, from: usize, inc: u64, addr: &str) -> io::Result<Conn> {
        self.wd.step("a connection attempt");
        let refused = |why: String| io::Error::new(io::ErrorKind::ConnectionRefused, why);
        let (to, tx, blocked, rtt) = {
            let mut st = self.st.lock();
            if st.incarnation[from] != inc || st.down.contains(&from) {
                return Err(refused("this node is down".into()));
            }
            let Some((to, tx)) = st.listeners.get(addr).cloned() else {
                return Err(refused(format!("nothing listens on {addr}")));
            };
            let blocked = st.cut.contains(&(from, to)) || st.cut.contains(&(to, from));
            let p = st.params;
            let rtt = st.rng.micros(p.delay_min_us, p.delay_max_us) * 2;
            let blocked = blocked.then(|| st.rng.millis(200, 1500));
            (to, tx, blocked, rtt)
        };
        if let Some(wait) = blocked {
            tokio::time::sleep(wait).await;
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("connect to {addr}: no route"),
            ));
        }
        tokio::time::sleep(rtt).await;
        let (kill, id) = {
            let mut st = self.st.lock();
            if st.down.contains(&to) || st.down.contains(&from) || st.incarnation[from] != inc {
                return Err(refused(format!("{addr} went away")));
            }
            let id = st.next_conn;
            st.next_conn += 1;
            let (kill, _) = watch::channel(false);
            st.conns.insert(
                id,
                ConnRec {
                    a: from,
                    b: to,
                    kill: kill.clone(),
                },
            );
            (kill, id)
        };
        let (c_conn, c_out, c_in, c_h) = Conn::from_parts(addr.to_string(), 256);
        let (s_conn, s_out, s_in, s_h) = Conn::from_parts(format!("node{from}/conn{id}"), 256);
        tokio::spawn(pump(
            self.clone(),
            id,
            (from, to, true),
            c_out,
            c_h.clone(),
            s_in,
            s_h.clone(),
            kill.subscribe(),
        ));
        tokio::spawn(pump(
            self.clone(),
            id,
            (to, from, false),
            s_out,
            s_h,
            c_in,
            c_h,
            kill.subscribe(),
        ));
        if tx.send(s_conn).is_err() {
            self.reset(id);
            return Err(refused(format!("{addr} stopped listening")));
        }
        Ok(c_conn)
    }
}

/// Moves frames one way over connection `id`.
#[allow(clippy::too_many_arguments)]
async fn pump(
    net: SimNet,
    id: u64,
    (from, to, request): (usize, usize, bool),
    mut out: mpsc::Receiver<EncodedFrame>,
    src: ConnHandle,
    dst_tx: mpsc::Sender<Result<Frame, ConnError>>,
    dst: ConnHandle,
    mut kill: watch::Receiver<bool>,
) {
    let mut queue: BTreeMap<(Instant, u64), Frame> = BTreeMap::new();
    let mut seq = 0u64;
    let mut last = Instant::now();
    let mut src_closed = false;
    let mut lost_once = false;
    let mut take = |enc: EncodedFrame, queue: &mut BTreeMap<(Instant, u64), Frame>| {
        let Ok(frame) = decode_frame(&enc.to_bytes()) else {
            return;
        };
        match net.fate(id, from, to, &mut lost_once) {
            Fate::Lost { reset_after } => {
                if let Some(after) = reset_after {
                    let net = net.clone();
                    tokio::spawn(async move {
                        tokio::time::sleep(after).await;
                        net.reset(id);
                    });
                }
            }
            Fate::Deliver { delay, dup } => {
                let reorder = net.params().reorder;
                let mut at = Instant::now() + delay;
                if !reorder && at < last {
                    at = last;
                }
                last = last.max(at);
                seq += 1;
                if dup {
                    queue.insert((at, seq), frame.clone());
                    seq += 1;
                }
                queue.insert((at, seq), frame);
            }
        }
    };
    loop {
        let head = queue.keys().next().map(|k| k.0);
        tokio::select! {
            biased;
            _ = killed(&mut kill) => {
                let reason = ConnError::Io {
                    kind: io::ErrorKind::ConnectionReset,
                    message: "connection reset".into(),
                };
                src.close(reason.clone());
                dst.close(reason.clone());
                let _ = dst_tx.try_send(Err(reason));
                return;
            }
            _ = tokio::time::sleep_until(head.unwrap_or_else(Instant::now)), if head.is_some() => {
                let now = Instant::now();
                while let Some(entry) = queue.first_entry() {
                    if entry.key().0 > now {
                        break;
                    }
                    let frame = entry.remove();
                    net.obs.deliver(id, from, to, request, &frame);
                    let _ = dst_tx.send(Ok(frame)).await;
                }
            }
            f = out.recv(), if !src_closed => match f {
                Some(enc) => take(enc, &mut queue),
                None => src_closed = true,
            },
            _ = src.closed(), if !src_closed => {
                src_closed = true;
                while let Ok(enc) = out.try_recv() {
                    take(enc, &mut queue);
                }
            }
        }
        if src_closed && queue.is_empty() {
            dst.close(ConnError::Closed);
            let _ = dst_tx.send(Err(ConnError::Closed)).await;
            net.st.lock().conns.remove(&id);
            return;
        }
    }
}

async fn killed(kill: &mut watch::Receiver<bool>) {
    let _ = kill.wait_for(|k| *k).await;
}

/// One node's view of the network.
pub struct NodeNet {
    net: SimNet,
    node: usize,
    inc: u64,
}

impl Transport for NodeNet {
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Conn>> {
        Box::pin(self.net.dial(self.node, self.inc, addr))
    }

    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>> {
        Box::pin(async move {
            let (tx, rx) = mpsc::unbounded_channel();
            let mut st = self.net.st.lock();
            if st.incarnation[self.node] != self.inc {
                return Err(io::Error::new(
                    io::ErrorKind::AddrNotAvailable,
                    "this node is down",
                ));
            }
            // The newest listener on a name wins (a restarted agent reuses its address).
            st.listeners.insert(addr.to_string(), (self.node, tx));
            Ok(Box::new(SimListener {
                name: addr.to_string(),
                rx,
            }) as Box<dyn Listener>)
        })
    }
}

struct SimListener {
    name: String,
    rx: mpsc::UnboundedReceiver<Conn>,
}

impl Listener for SimListener {
    fn local_addr(&self) -> String {
        self.name.clone()
    }

    fn accept(&mut self) -> BoxFuture<'_, io::Result<Conn>> {
        Box::pin(async move {
            match self.rx.recv().await {
                Some(c) => Ok(c),
                // Never listened again: wait forever like a closed port that gets no
                // connection (the agent's accept loop would otherwise spin).
                None => std::future::pending().await,
            }
        })
    }
}
