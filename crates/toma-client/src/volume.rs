//! A RAID1 and RAID6 volume client (RAID6 stripes: `stripe.rs`): reads with the piggybacked lock test, writes under lock to every
//! writable member, dirty bits when degraded, topology switches without stopping I/O, held
//! writes while a member is unreachable, and re-registration after being fenced.
//!
//! Every rule comes from `toma_core::placement` for the topology in use; this file only
//! carries them out.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::future::join_all;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use toma_control::{Attachment, ControlPlane};
use toma_core::placement::{clears_dirty_after, locks, read_member, sets_dirty, write_members};
use toma_core::{
    DirtyMarks, DiskId, Generation, MemberIdx, NodeId, Topology, VolumeId, VolumeSpec,
};
use toma_wire::transport::Transport;
use toma_wire::{ClientId, ErrorCode, Message, Secret};
use tracing::{debug, info, warn};

use crate::error::ClientError;
use crate::gens::GenTracker;
use crate::local_locks::LocalLocks;
use crate::range::{split, UnitPart};
use crate::session::{CallError, Session, Unsolicited};

mod stripe;

/// How a client behaves; the defaults suit a LAN.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// A call that gets no answer in this long marks its member unreachable (the client's
    /// own monotonic clock).
    pub request_timeout: Duration,
    /// A held write re-tries at least this often even if no new topology came.
    pub hold_retry: Duration,
    /// Node name recorded with the attachment.
    pub node: String,
    /// Where client ids come from: `None` (production) draws each from the OS's random
    /// source; `Some(seed)` derives them deterministically from `seed` (the simulation).
    pub id_seed: Option<u64>,
    /// Deliberate bugs (model/simulation mutations). Default: none.
    /// `read_from_w`: reads go to any written member, even one being rebuilt.
    pub read_from_w: bool,
    /// `no_dirty_bits`: degraded writes set no dirty bit.
    pub no_dirty_bits: bool,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout: Duration::from_secs(3),
            hold_retry: Duration::from_millis(250),
            node: "local".into(),
            id_seed: None,
            read_from_w: false,
            no_dirty_bits: false,
        }
    }
}

/// Counters a caller may show.
#[derive(Debug, Default)]
pub struct ClientStats {
    pub reads: AtomicU64,
    pub writes: AtomicU64,
    pub lock_retries: AtomicU64,
    pub read_retries: AtomicU64,
    pub held: AtomicU64,
    pub fenced: AtomicU64,
    pub switches: AtomicU64,
    /// RAID6 write intents sent (`INTENT`, one per slice of columns of a degraded write).
    pub intents: AtomicU64,
}

/// How [`VolumeClient::copy_unit`] copies.
pub struct CopyHow<'a> {
    clear: Option<&'a DirtyMarks>,
    lock: bool,
    intent: Option<(u32, Bytes)>,
}

impl<'a> CopyHow<'a> {
    /// Rebuild: take the unit's locks first, then clear the bits in `clear`.
    pub fn rebuild(clear: Option<&'a DirtyMarks>) -> Self {
        CopyHow {
            clear,
            lock: true,
            intent: None,
        }
    }

    /// Stale-lock recovery of a fenced client's unit, whose locks are still held for it: no
    /// locking. For a RAID6 stripe, `intent` is the client's write intent (`INTENT`: its
    /// first column, and the k data chunks' columns chunk after chunk); those columns are
    /// written as it says instead of read, since the client may have written some shards
    /// and not others.
    pub fn recovery(intent: Option<(u32, Bytes)>) -> Self {
        CopyHow {
            clear: None,
            lock: false,
            intent,
        }
    }
}

struct Link {
    session: Arc<Session>,
    /// The node the session goes to: a member whose disk moves is reached on its new node.
    node: NodeId,
}

struct Inner {
    cfg: ClientConfig,
    volume: VolumeId,
    /// Layout and chunk size; its `size` is the size at attach (see `size`).
    spec: VolumeSpec,
    /// The volume's size now: it grows when an expansion is committed and this client
    /// learns it ([`VolumeClient::refresh_size`], [`VolumeClient::grow_to`]).
    size: AtomicU64,
    secret: Secret,
    cp: Arc<dyn ControlPlane>,
    transport: Arc<dyn Transport>,
    topo: watch::Sender<Arc<Topology>>,
    gens: GenTracker,
    client: Mutex<ClientId>,
    links: Mutex<BTreeMap<DiskId, Link>>,
    connecting: Mutex<BTreeMap<DiskId, Arc<tokio::sync::Mutex<()>>>>,
    /// Locks this client holds, per member disk (re-asserted on reconnect).
    held: Mutex<BTreeMap<DiskId, BTreeSet<u64>>>,
    /// The deterministic id stream when `ClientConfig::id_seed` is set.
    ids: Mutex<Option<u64>>,
    reported: Mutex<BTreeSet<(DiskId, Generation)>>,
    events: mpsc::UnboundedSender<(DiskId, Unsolicited)>,
    stats: ClientStats,
    /// One writer per chunk within this client (TOMA locks are per client id).
    local_locks: LocalLocks,
    /// When a held operation last asked the control plane for a newer topology (this
    /// process's monotonic clock): one ask per `hold_retry`, however many operations wait.
    last_poll: Mutex<Option<tokio::time::Instant>>,
}

/// A handle to a volume; clone it freely, use it from many tasks.
#[derive(Clone)]
pub struct VolumeClient {
    inner: Arc<Inner>,
}

/// Why an attempt under one topology did not finish.
enum Retry {
    /// Wait for a newer topology (a member is unreachable, or the volume cannot serve).
    Topology,
    /// Try again shortly (lock busy, TOMA busy or behind).
    Backoff,
    /// This client was fenced: its locks are gone; start over.
    Fenced,
    Fatal(ClientError),
}

/// SplitMix64: the next deterministic id of the stream whose state is `state`.
fn seeded_id(state: &mut u64) -> ClientId {
    let mut next = || {
        *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = *state;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    };
    (u128::from(next()) << 64) | u128::from(next())
}

fn random_id() -> ClientId {
    let mut b = [0u8; 16];
    if getrandom::fill(&mut b).is_err() {
        // No entropy source: fall back to something unique within this process.
        static N: AtomicU64 = AtomicU64::new(1);
        b[..8].copy_from_slice(&N.fetch_add(1, Ordering::Relaxed).to_le_bytes());
        b[8..].copy_from_slice(&u64::from(std::process::id()).to_le_bytes());
    }
    u128::from_le_bytes(b)
}

impl VolumeClient {
    /// Attaches to a volume: reads its record from the control plane, records the attachment,
    /// and registers on every live member.
    pub async fn attach(
        cp: Arc<dyn ControlPlane>,
        transport: Arc<dyn Transport>,
        volume: VolumeId,
        cfg: ClientConfig,
    ) -> Result<VolumeClient, ClientError> {
        let rec = cp
            .volume(volume)
            .await
            .map_err(|e| ClientError::ControlPlane(e.to_string()))?
            .ok_or(ClientError::UnknownVolume(volume))?
            .value;
        let (events_tx, events_rx) = mpsc::unbounded_channel();
        let mut ids = cfg.id_seed;
        let client = ids.as_mut().map_or_else(random_id, seeded_id);
        let inner = Arc::new(Inner {
            volume,
            spec: rec.spec,
            size: AtomicU64::new(rec.spec.size),
            secret: Secret(rec.secret),
            cp,
            transport,
            topo: watch::Sender::new(Arc::new(rec.topology.clone())),
            gens: GenTracker::new(rec.topology.generation),
            client: Mutex::new(client),
            links: Mutex::new(BTreeMap::new()),
            connecting: Mutex::new(BTreeMap::new()),
            held: Mutex::new(BTreeMap::new()),
            ids: Mutex::new(ids),
            reported: Mutex::new(BTreeSet::new()),
            events: events_tx,
            stats: ClientStats::default(),
            local_locks: LocalLocks::default(),
            last_poll: Mutex::new(None),
            cfg,
        });
        inner.record_attachment(client).await?;
        let me = VolumeClient { inner };
        tokio::spawn(event_loop(Arc::downgrade(&me.inner), events_rx));
        tokio::spawn(ack_loop(Arc::downgrade(&me.inner)));
        // Register everywhere now so the TOMAs count this client from the start.
        let t = me.topology();
        for m in t.alive() {
            let (disk, node) = (t.members[m].disk, &t.members[m].node);
            if let Err(e) = me.inner.link(disk, node).await {
                warn!(volume = %volume, member = m, error = %e, "member not reachable at attach");
            }
        }
        Ok(me)
    }

    pub fn topology(&self) -> Arc<Topology> {
        self.inner.topo.borrow().clone()
    }

    /// Waits until the topology's generation is at least `g`, up to `max`.
    /// An idle client (no connection to push topologies on) asks the control plane itself
    /// now and then.
    pub async fn wait_generation(&self, g: Generation, max: Duration) -> bool {
        let mut rx = self.inner.topo.subscribe();
        let wait = async {
            loop {
                let step = tokio::time::timeout(
                    Duration::from_millis(250),
                    rx.wait_for(|t| t.generation >= g),
                )
                .await
                .map(|r| r.is_ok());
                match step {
                    Ok(reached) => return reached,
                    Err(_) => self.inner.refresh().await,
                }
            }
        };
        tokio::time::timeout(max, wait).await.unwrap_or(false)
    }

    /// The volume's spec, with the size this client uses now.
    pub fn spec(&self) -> VolumeSpec {
        self.inner.spec_now()
    }

    /// Lets this client use `size` bytes (a committed expansion it was told about). A size
    /// below the current one, or one that is not a multiple of the lock unit, is refused
    /// and changes nothing. Returns the size in use.
    pub fn grow_to(&self, size: u64) -> Result<u64, ClientError> {
        let cur = self.inner.spec_now();
        let g = cur
            .grown(size)
            .map_err(|e| ClientError::Size(self.inner.volume, e))?;
        self.inner.size.fetch_max(g.size, Ordering::AcqRel);
        Ok(self.inner.spec_now().size)
    }

    /// Reads the volume's committed size from the control plane and uses it (a volume
    /// never shrinks; a pending growth is not used until committed). Returns the size in use.
    pub async fn refresh_size(&self) -> Result<u64, ClientError> {
        let rec = self
            .inner
            .cp
            .volume(self.inner.volume)
            .await
            .map_err(|e| ClientError::ControlPlane(e.to_string()))?
            .ok_or(ClientError::UnknownVolume(self.inner.volume))?
            .value;
        if rec.spec.size <= self.inner.spec_now().size {
            return Ok(self.inner.spec_now().size);
        }
        self.grow_to(rec.spec.size)
    }

    pub fn client_id(&self) -> ClientId {
        *self.inner.client.lock()
    }

    pub fn stats(&self) -> &ClientStats {
        &self.inner.stats
    }

    /// Detaches: closes every connection and removes the attachment record.
    pub async fn detach(&self) -> Result<(), ClientError> {
        let id = self.client_id();
        for (_, l) in std::mem::take(&mut *self.inner.links.lock()) {
            l.session.close();
        }
        self.inner
            .cp
            .detach(self.inner.volume, id)
            .await
            .map_err(|e| ClientError::ControlPlane(e.to_string()))
    }

    fn check_range(&self, offset: u64, len: usize) -> Result<(), ClientError> {
        let end = offset.checked_add(len as u64);
        let size = self.inner.size.load(Ordering::Acquire);
        if len == 0 || end.is_none_or(|e| e > size) {
            return Err(ClientError::OutOfRange {
                offset,
                len: len as u64,
                size,
            });
        }
        Ok(())
    }

    /// Reads `len` bytes at volume offset `offset`.
    pub async fn read(&self, offset: u64, len: usize) -> Result<Bytes, ClientError> {
        let mut parts = self.read_vectored(offset, len).await?;
        if parts.len() == 1 {
            // One lock unit: the member's buffer as it arrived, no copy.
            return Ok(parts.remove(0));
        }
        let mut out = BytesMut::with_capacity(len);
        for p in &parts {
            out.extend_from_slice(p);
        }
        Ok(out.freeze())
    }

    /// Reads `len` bytes at volume offset `offset` as one buffer per lock unit, in order
    /// (their concatenation is what [`read`](Self::read) returns), without copying them
    /// together: for callers that write them out with vectored I/O.
    pub async fn read_vectored(&self, offset: u64, len: usize) -> Result<Vec<Bytes>, ClientError> {
        self.check_range(offset, len)?;
        let parts = split(offset, len, self.inner.spec.unit_bytes());
        let results = join_all(parts.iter().map(|p| self.inner.read_unit(*p))).await;
        let out = results.into_iter().collect::<Result<Vec<Bytes>, _>>()?;
        self.inner.stats.reads.fetch_add(1, Ordering::Relaxed);
        Ok(out)
    }

    /// Writes `data` at volume offset `offset`. Returns once it is on every writable member
    /// (or the member it missed is marked dirty).
    pub async fn write(&self, offset: u64, data: Bytes) -> Result<(), ClientError> {
        self.check_range(offset, data.len())?;
        let parts = split(offset, data.len(), self.inner.spec.unit_bytes());
        let results = join_all(parts.iter().map(|p| {
            let slice = data.slice(p.buf_offset..p.buf_offset + p.len as usize);
            self.inner.write_unit(*p, slice)
        }))
        .await;
        for r in results {
            r?;
        }
        self.inner.stats.writes.fetch_add(1, Ordering::Relaxed);
        Ok(())
    }

    /// Makes every acknowledged write durable on every live member.
    pub async fn flush(&self) -> Result<(), ClientError> {
        let mut backoff = Backoff::new();
        'again: loop {
            let (t, guard) = self.inner.begin_io();
            for m in t.alive() {
                match self.inner.call(&t, m, Message::Flush).await {
                    Ok(_) => {}
                    // A member that cannot be reached, or whose disk fails, is declared
                    // DEAD and rebuilt from the others.
                    Err(Retry::Topology) => {}
                    // A TOMA ahead of this client (StaleGeneration: the topology was just
                    // refreshed) or behind it (Busy): flush again under the newest one.
                    // Failing the flush here failed the simulation's seeds 30, 32, 65, 164.
                    Err(Retry::Backoff) | Err(Retry::Fenced) => {
                        drop(guard);
                        backoff.wait().await;
                        continue 'again;
                    }
                    Err(Retry::Fatal(e)) => return Err(e),
                }
            }
            return Ok(());
        }
    }

    /// Sends one request to member `member` under topology `t` (TOMA ↔ TOMA calls such as
    /// FENCE_CLIENT, GET_DIRTY, PUT_LOCKS, RELEASE_LOCK go through an agent's own client).
    pub async fn request(
        &self,
        t: &Topology,
        member: MemberIdx,
        msg: Message,
    ) -> Result<Message, ClientError> {
        let m = t
            .members
            .get(member)
            .ok_or_else(|| ClientError::Member(member, "no such member".into()))?;
        let s = self
            .inner
            .link(m.disk, &m.node)
            .await
            .map_err(|e| ClientError::Member(member, e.to_string()))?;
        s.call(t.generation, msg)
            .await
            .map_err(|e| ClientError::Member(member, e.to_string()))
    }

    /// Rebuild and recovery: copies `unit` from member `from` to the members `to` under
    /// topology `t` as `how` says (see [`CopyHow`]). Returns the bytes copied per target.
    pub async fn copy_unit(
        &self,
        t: &Topology,
        unit: u64,
        from: MemberIdx,
        to: &[MemberIdx],
        how: CopyHow<'_>,
    ) -> Result<u64, ClientError> {
        self.inner.copy_unit(t, unit, from, to, how).await
    }
}

impl Inner {
    fn spec_now(&self) -> VolumeSpec {
        VolumeSpec {
            size: self.size.load(Ordering::Acquire),
            ..self.spec
        }
    }

    fn current(&self) -> Arc<Topology> {
        self.topo.borrow().clone()
    }

    /// The current topology and an I/O guard under its generation, taken so that no I/O
    /// starts under a generation older than the newest this client switched to.
    fn begin_io(&self) -> (Arc<Topology>, crate::gens::IoGuard) {
        loop {
            let t = self.current();
            if let Some(g) = self.gens.begin(t.generation) {
                return (t, g);
            }
        }
    }

    async fn record_attachment(&self, client: ClientId) -> Result<(), ClientError> {
        self.cp
            .attach(Attachment {
                volume: self.volume,
                client,
                node: toma_core::NodeId(self.cfg.node.clone()),
            })
            .await
            .map_err(|e| ClientError::ControlPlane(e.to_string()))
    }

    /// Adopts `t` if it is a newer topology of this volume.
    fn adopt(&self, t: Topology) {
        if t.volume != self.volume || t.validate().is_err() {
            warn!(volume = %self.volume, "ignoring an invalid topology from a TOMA");
            return;
        }
        let g = t.generation;
        let newer = self.topo.send_if_modified(|cur| {
            if g > cur.generation {
                *cur = Arc::new(t);
                true
            } else {
                false
            }
        });
        if newer {
            self.stats.switches.fetch_add(1, Ordering::Relaxed);
            debug!(volume = %self.volume, generation = g, "switched topology");
            self.gens.switch(g);
        }
    }

    /// Reads the newest topology from the control plane (when a TOMA says we are behind).
    async fn refresh(&self) {
        if let Ok(Some(v)) = self.cp.volume(self.volume).await {
            self.adopt(v.value.topology);
        }
    }

    /// Waits up to `max` for a topology newer than `g`. A held operation may have no live
    /// member to push the next topology to it (every member DEAD, connections gone): when
    /// none came, it asks the control plane.
    async fn wait_newer(&self, g: Generation, max: Duration) {
        let mut rx = self.topo.subscribe();
        let came = tokio::time::timeout(max, rx.wait_for(|t| t.generation > g))
            .await
            .is_ok_and(|r| r.is_ok());
        if came {
            return;
        }
        self.poll_when_due().await;
    }

    /// Reads the newest topology from the control plane, at most once per `hold_retry`.
    async fn poll_when_due(&self) {
        let now = tokio::time::Instant::now();
        let due = {
            let mut last = self.last_poll.lock();
            let due = last.is_none_or(|at| now.duration_since(at) >= self.cfg.hold_retry);
            if due {
                *last = Some(now);
            }
            due
        };
        if due {
            self.refresh().await;
        }
    }

    /// The datapath address of `node` (the topology says which node holds a member).
    async fn endpoint(&self, node: &NodeId) -> Result<String, CallError> {
        let nodes = self
            .cp
            .nodes()
            .await
            .map_err(|e| CallError::Unreachable(e.to_string()))?;
        nodes
            .iter()
            .find(|n| &n.node == node)
            .map(|n| n.endpoint.clone())
            .ok_or_else(|| CallError::Unreachable(format!("node {node} has no endpoint")))
    }

    /// The registered session to `disk`'s TOMA, connecting and registering if needed.
    async fn link(
        self: &Arc<Self>,
        disk: DiskId,
        node: &NodeId,
    ) -> Result<Arc<Session>, CallError> {
        if let Some(l) = self.links.lock().get(&disk) {
            if !l.session.is_closed() && &l.node == node {
                return Ok(l.session.clone());
            }
        }
        let gate = self
            .connecting
            .lock()
            .entry(disk)
            .or_insert_with(|| Arc::new(tokio::sync::Mutex::new(())))
            .clone();
        let _g = gate.lock().await;
        if let Some(l) = self.links.lock().get(&disk) {
            if !l.session.is_closed() && &l.node == node {
                return Ok(l.session.clone());
            }
        }
        if let Some(old) = self.links.lock().remove(&disk) {
            // The member moved to another node: the old session is of no use.
            old.session.close();
        }
        let addr = self.endpoint(node).await?;
        let session = Session::connect(
            self.transport.as_ref(),
            &addr,
            self.volume,
            self.cfg.request_timeout,
            disk,
            self.events.clone(),
        )
        .await?;
        let client = *self.client.lock();
        let held_locks: Vec<u64> = self
            .held
            .lock()
            .get(&disk)
            .map(|s| s.iter().copied().collect())
            .unwrap_or_default();
        let g = self.current().generation;
        let reply = session
            .call(
                g,
                Message::Register {
                    client,
                    secret: self.secret.clone(),
                    held_locks,
                },
            )
            .await;
        match reply {
            Ok(Message::Registered { topology }) => {
                session.set_registered_as(client);
                self.adopt(topology);
                self.links.lock().insert(
                    disk,
                    Link {
                        session: session.clone(),
                        node: node.clone(),
                    },
                );
                Ok(session)
            }
            Ok(other) => {
                session.close();
                Err(CallError::Unreachable(format!(
                    "unexpected answer to REGISTER: {:?}",
                    other.kind()
                )))
            }
            Err(e) => {
                session.close();
                if let CallError::Refused {
                    code: ErrorCode::Fenced,
                    ..
                } = e
                {
                    self.fenced(client).await;
                }
                Err(e)
            }
        }
    }

    /// Some TOMA fenced client id `old`: every lock it held has been (or will be)
    /// recovered. Start again under a new id.
    async fn fenced(&self, old: ClientId) {
        let new = {
            let mut id = self.client.lock();
            if *id != old {
                return;
            }
            *id = self.ids.lock().as_mut().map_or_else(random_id, seeded_id);
            *id
        };
        self.stats.fenced.fetch_add(1, Ordering::Relaxed);
        warn!(
            volume = %self.volume,
            old = %toma_core::VolumeId(old),
            new = %toma_core::VolumeId(new),
            "this client was fenced; re-registering under a new id"
        );
        for (_, l) in std::mem::take(&mut *self.links.lock()) {
            // Calls still waiting on these sessions fail as fenced, not as unreachable.
            l.session.close_fenced();
        }
        self.held.lock().clear();
        let _ = self.cp.detach(self.volume, old).await;
        if let Err(e) = self.record_attachment(new).await {
            warn!(error = %e, "could not record the new attachment");
        }
    }

    /// Tells the other members' TOMAs that `member` cannot be reached (once per generation).
    fn report_unreachable(self: &Arc<Self>, t: &Arc<Topology>, member: MemberIdx, why: &str) {
        let disk = t.members[member].disk;
        if !self.reported.lock().insert((disk, t.generation)) {
            return;
        }
        self.stats.held.fetch_add(1, Ordering::Relaxed);
        warn!(volume = %self.volume, member, generation = t.generation, why, "member unreachable; holding I/O");
        let me = self.clone();
        let t = t.clone();
        tokio::spawn(async move {
            for m in t.alive() {
                if m == member {
                    continue;
                }
                if let Ok(s) = me.link(t.members[m].disk, &t.members[m].node).await {
                    let _ = s
                        .call(
                            t.generation,
                            Message::ReportUnreachable {
                                member: member as u8,
                            },
                        )
                        .await;
                }
            }
        });
    }

    /// Maps a failed call on `member` to what the operation should do next.
    async fn on_error(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        member: MemberIdx,
        e: CallError,
    ) -> Retry {
        match e {
            CallError::Unreachable(why) => {
                // Forget the session so the next try reconnects.
                self.links.lock().remove(&t.members[member].disk);
                self.report_unreachable(t, member, &why);
                Retry::Topology
            }
            // The member's disk failed the I/O: its agent reports the disk unhealthy and the
            // leader declares the member DEAD. Hold the operation like for an unreachable
            // member (never fail it while the volume can still be written).
            CallError::Refused {
                code: ErrorCode::Io,
                message,
            } => {
                self.report_unreachable(t, member, &message);
                Retry::Topology
            }
            // Nothing is known of the member's health. A fenced client's locks are gone
            // (its event loop, or the next REGISTER, starts it again under a new id).
            CallError::Closed { fenced: true } => Retry::Fenced,
            CallError::Closed { fenced: false } => {
                let disk = t.members[member].disk;
                let mut links = self.links.lock();
                if links.get(&disk).is_some_and(|l| l.session.is_closed()) {
                    links.remove(&disk);
                }
                Retry::Backoff
            }
            CallError::Refused { code, message } => match code {
                ErrorCode::StaleGeneration | ErrorCode::NotRegistered => {
                    self.refresh().await;
                    if code == ErrorCode::NotRegistered {
                        self.links.lock().remove(&t.members[member].disk);
                    }
                    Retry::Backoff
                }
                // A TOMA that has not learned this volume (or its newest topology) yet.
                ErrorCode::Busy | ErrorCode::UnknownVolume => {
                    if code == ErrorCode::UnknownVolume {
                        self.links.lock().remove(&t.members[member].disk);
                        // Or our topology is out of date: the member left that node (and
                        // no TOMA we are registered with may be left to tell us).
                        self.poll_when_due().await;
                    }
                    Retry::Backoff
                }
                // The caller fenced the id the request went out as (`call`, `link`): not
                // the current one, which may already be the new id.
                ErrorCode::Fenced => Retry::Fenced,
                // INTENT for a stripe whose lock this client does not hold there (the
                // lock member's locks were cleared): release what it holds, start over.
                ErrorCode::NotLockHolder => Retry::Fenced,
                _ => Retry::Fatal(ClientError::Member(member, format!("{code}: {message}"))),
            },
        }
    }

    async fn call(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        member: MemberIdx,
        msg: Message,
    ) -> Result<Message, Retry> {
        let s = match self
            .link(t.members[member].disk, &t.members[member].node)
            .await
        {
            Ok(s) => s,
            Err(e) => return Err(self.on_error(t, member, e).await),
        };
        match s.call(t.generation, msg).await {
            Ok(m) => Ok(m),
            Err(CallError::Refused {
                code: ErrorCode::NotRegistered,
                ..
            }) => {
                // This session was replaced (by us, after a timeout) or the TOMA forgot us:
                // drop it unless a newer one already took its place, and try again.
                let disk = t.members[member].disk;
                let mut links = self.links.lock();
                if links
                    .get(&disk)
                    .is_some_and(|l| Arc::ptr_eq(&l.session, &s))
                {
                    links.remove(&disk);
                }
                Err(Retry::Backoff)
            }
            Err(e) => {
                if let CallError::Refused {
                    code: ErrorCode::Fenced,
                    ..
                } = e
                {
                    if let Some(id) = s.registered_as() {
                        self.fenced(id).await;
                    }
                }
                Err(self.on_error(t, member, e).await)
            }
        }
    }

    async fn read_unit(self: &Arc<Self>, p: UnitPart) -> Result<Bytes, ClientError> {
        if self.spec.layout.is_raid6() {
            return self.read_stripe(p).await;
        }
        let mut backoff = Backoff::new();
        loop {
            let (t, guard) = self.begin_io();
            let member = if self.cfg.read_from_w {
                // Mutation: read from any written member, even one being rebuilt.
                write_members(&t, p.unit).into_iter().max()
            } else {
                read_member(&t, p.unit)
            };
            let Some(r) = member else {
                drop(guard);
                self.wait_newer(t.generation, self.cfg.hold_retry).await;
                continue;
            };
            let res = self
                .call(
                    &t,
                    r,
                    Message::ReadTestLock {
                        unit: p.unit,
                        offset: p.offset,
                        len: p.len,
                    },
                )
                .await;
            drop(guard);
            match res {
                Ok(Message::DataLock {
                    locked: false,
                    data,
                }) if data.len() == p.len as usize => return Ok(data),
                Ok(Message::DataLock { locked: true, .. }) => {
                    self.stats.read_retries.fetch_add(1, Ordering::Relaxed);
                    backoff.wait().await;
                }
                Ok(other) => {
                    return Err(ClientError::Protocol(format!(
                        "member {r} answered READ_TEST_LOCK with {:?}",
                        other.kind()
                    )))
                }
                Err(Retry::Topology) => self.wait_newer(t.generation, self.cfg.hold_retry).await,
                Err(Retry::Backoff) | Err(Retry::Fenced) => backoff.wait().await,
                Err(Retry::Fatal(e)) => return Err(e),
            }
        }
    }

    async fn write_unit(self: &Arc<Self>, p: UnitPart, data: Bytes) -> Result<(), ClientError> {
        let _local = self.local_locks.lock(p.unit).await;
        let mut held: BTreeSet<DiskId> = BTreeSet::new();
        let mut old = stripe::OldColumns::default();
        let mut backoff = Backoff::new();
        // The id the locks in `held` were taken as. Once this client is fenced (it starts
        // again under a new id), those locks are gone — the TOMAs recover them, copying the
        // unit's old bytes over whatever this write had sent — so the write starts again
        // under new locks, and an attempt that ended after the fence is done again.
        let mut locked_as = *self.client.lock();
        loop {
            let id = *self.client.lock();
            if id != locked_as {
                // Some of `held` may have been taken as the new id in the attempt that saw
                // the fence: release them (an UNLOCK of a lock the new id does not hold is
                // refused and changes nothing).
                let t = self.current();
                self.unlock_all(&t, p.unit, &mut held).await;
                old.forget();
                locked_as = id;
            }
            let (t, guard) = self.begin_io();
            let res = if self.spec.layout.is_raid6() {
                self.try_write_stripe(&t, p, &data, &mut held, &mut old)
                    .await
            } else {
                self.try_write(&t, p, &data, &mut held).await
            };
            drop(guard);
            let res = match res {
                Ok(()) if *self.client.lock() != locked_as => Err(Retry::Fenced),
                other => other,
            };
            match res {
                Ok(()) => return Ok(()),
                Err(Retry::Topology) => self.wait_newer(t.generation, self.cfg.hold_retry).await,
                Err(Retry::Backoff) => backoff.wait().await,
                Err(Retry::Fenced) => {
                    self.unlock_all(&t, p.unit, &mut held).await;
                    old.forget();
                    backoff.wait().await;
                }
                Err(Retry::Fatal(e)) => {
                    self.unlock_all(&t, p.unit, &mut held).await;
                    return Err(e);
                }
            }
        }
    }

    /// Drops from `held` the locks on members `t` declares DEAD. Their TOMAs forget them
    /// (Rebuild-init), so they must not be re-asserted at the next REGISTER either: that
    /// would take the lock again there for good, and every other writer of the unit waits.
    fn forget_dead_locks(&self, t: &Topology, unit: u64, held: &mut BTreeSet<DiskId>) {
        held.retain(|d| {
            let alive = t.members.iter().any(|m| &m.disk == d && !m.role.is_dead());
            if !alive {
                self.note_held(*d, unit, false);
            }
            alive
        });
    }

    fn note_held(&self, disk: DiskId, unit: u64, on: bool) {
        let mut h = self.held.lock();
        let set = h.entry(disk).or_default();
        if on {
            set.insert(unit);
        } else {
            set.remove(&unit);
        }
    }

    async fn try_write(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        p: UnitPart,
        data: &Bytes,
        held: &mut BTreeSet<DiskId>,
    ) -> Result<(), Retry> {
        let lock_set = locks(t, p.unit);
        if lock_set.is_empty() {
            // Failed volume: nothing can be written until a member comes back.
            return Err(Retry::Topology);
        }
        // Locks on members that are DEAD now are gone with them.
        self.forget_dead_locks(t, p.unit, held);
        self.take_locks(t, p.unit, &lock_set, held, false).await?;
        if let Some(d) = sets_dirty(t, p.unit).filter(|_| !self.cfg.no_dirty_bits) {
            self.dirty(t, p.unit, &d, true).await?;
        }
        let targets = write_members(t, p.unit);
        let results = join_all(targets.iter().map(|&m| {
            self.call(
                t,
                m,
                Message::Write {
                    offset: p.offset,
                    data: data.clone(),
                },
            )
        }))
        .await;
        // A write that reached some members and not others keeps its locks: it is redone.
        for r in results {
            match r {
                Ok(Message::Ok) => {}
                Ok(other) => {
                    return Err(Retry::Fatal(ClientError::Protocol(format!(
                        "WRITE answered with {:?}",
                        other.kind()
                    ))))
                }
                Err(e) => return Err(e),
            }
        }
        let unit_bytes = self.spec.unit_bytes();
        let in_unit = p.offset - p.unit * unit_bytes;
        if let Some(c) = clears_dirty_after(t, p.unit, in_unit, u64::from(p.len), unit_bytes) {
            // A bit left set only costs one extra copy at rebuild.
            let _ = self.dirty(t, p.unit, &c, false).await;
        }
        self.unlock_all(t, p.unit, held).await;
        Ok(())
    }

    /// Takes the locks of `lock_set` not in `held`, in the set's order, waiting while
    /// another client holds one.
    ///
    /// `may_yield`: the caller has written nothing under `held`, so when a lock it waits
    /// for is held by another client while it already holds some, it lets go of them all
    /// and returns `Retry::Backoff` instead of waiting. RAID6 lock sets have two or three
    /// members, and a writer carried over from the topology before holds some of them
    /// taken in that topology's order: a writer that has not written yet gives way, so two
    /// writers never wait for each other's locks for good. A writer that has written keeps
    /// its locks (no one may see its half-written stripe) and waits.
    async fn take_locks(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        unit: u64,
        lock_set: &[MemberIdx],
        held: &mut BTreeSet<DiskId>,
        may_yield: bool,
    ) -> Result<(), Retry> {
        for &m in lock_set {
            let disk = t.members[m].disk;
            if held.contains(&disk) {
                continue;
            }
            let mut backoff = Backoff::new();
            let mut tries = 0u64;
            loop {
                match self.call(t, m, Message::Lock { unit }).await? {
                    Message::Ok => {
                        held.insert(disk);
                        self.note_held(disk, unit, true);
                        break;
                    }
                    Message::Locked { holder } => {
                        self.stats.lock_retries.fetch_add(1, Ordering::Relaxed);
                        if may_yield && !held.is_empty() {
                            self.unlock_all(t, unit, held).await;
                            return Err(Retry::Backoff);
                        }
                        tries += 1;
                        if tries.is_multiple_of(200) {
                            warn!(volume = %self.volume, member = m, unit, holder = %format!("{holder:x}"), tries, "lock still held by another client");
                        }
                        backoff.wait().await;
                        // A newer topology may place the lock elsewhere.
                        if self.current().generation != t.generation {
                            return Err(Retry::Backoff);
                        }
                    }
                    other => {
                        return Err(Retry::Fatal(ClientError::Protocol(format!(
                            "LOCK answered with {:?}",
                            other.kind()
                        ))))
                    }
                }
            }
        }
        Ok(())
    }

    async fn dirty(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        unit: u64,
        d: &DirtyMarks,
        set: bool,
    ) -> Result<(), Retry> {
        let targets = d.target_mask();
        let results = join_all(d.holders.iter().map(|&h| {
            let msg = if set {
                Message::SetDirty { unit, targets }
            } else {
                Message::ClearDirty { unit, targets }
            };
            self.call(t, h, msg)
        }))
        .await;
        for r in results {
            r?;
        }
        Ok(())
    }

    async fn unlock_all(
        self: &Arc<Self>,
        t: &Arc<Topology>,
        unit: u64,
        held: &mut BTreeSet<DiskId>,
    ) {
        for disk in std::mem::take(held) {
            self.note_held(disk, unit, false);
            let Some(m) = t.members.iter().position(|x| x.disk == disk) else {
                continue;
            };
            // Sent without waiting for the reply: every write of this unit has completed
            // (or the caller gives up), and the TOMA serves LOCK/UNLOCK of a connection in
            // arrival order, so a later LOCK of this unit on this session cannot overtake
            // it. An unlock that does not arrive is cleaned up by fencing or Rebuild-init.
            if let Ok(s) = self.link(t.members[m].disk, &t.members[m].node).await {
                s.unlock(t.generation, unit).await;
            }
        }
    }

    /// Releases a lock whose UNLOCK was refused for its generation, under the current one.
    /// Holding the unit's local lock, so no later operation of this client on the unit
    /// (which may take the lock again) runs meanwhile. A connection that breaks meanwhile
    /// needs nothing more: registering again frees every lock the client does not hold.
    async fn unlock_again(self: &Arc<Self>, disk: DiskId, unit: u64) {
        let _local = self.local_locks.lock(unit).await;
        let mut backoff = Backoff::new();
        for _ in 0..50 {
            let t = self.current();
            let Some(m) = t
                .members
                .iter()
                .position(|x| x.disk == disk && !x.role.is_dead())
            else {
                return;
            };
            match self.call(&t, m, Message::Unlock { unit }).await {
                Err(Retry::Backoff) => backoff.wait().await,
                Ok(_) | Err(_) => return,
            }
        }
        warn!(volume = %self.volume, disk = %disk, unit, "could not release a lock; its member's TOMA frees it when this client registers again or is fenced");
    }

    async fn copy_unit(
        self: &Arc<Self>,
        t: &Topology,
        unit: u64,
        from: MemberIdx,
        to: &[MemberIdx],
        how: CopyHow<'_>,
    ) -> Result<u64, ClientError> {
        let CopyHow {
            clear,
            lock,
            intent,
        } = how;
        let t = Arc::new(t.clone());
        let Some(_guard) = self.gens.begin(t.generation) else {
            // The client already moved past `t`: the caller must look at the new topology.
            return Err(ClientError::Retry);
        };
        let chunk = u64::from(self.spec.chunk_size);
        let offset = unit * chunk;
        let len = chunk.min(self.spec_now().member_bytes().saturating_sub(offset));
        if len == 0 {
            return Ok(0);
        }
        let fail = |r: Retry| match r {
            Retry::Fatal(e) => e,
            Retry::Topology => ClientError::Member(from, "unreachable".into()),
            Retry::Backoff | Retry::Fenced => ClientError::Retry,
        };
        let mut held = BTreeSet::new();
        let _local = if lock {
            Some(self.local_locks.lock(unit).await)
        } else {
            None
        };
        if lock {
            let lock_set = locks(&t, unit);
            if let Err(e) = self.take_locks(&t, unit, &lock_set, &mut held, true).await {
                // Whatever was taken before a newer topology stopped the wait.
                self.unlock_all(&t, unit, &mut held).await;
                return Err(fail(e));
            }
        }
        if t.layout.is_raid6() {
            let result = self
                .copy_stripe(&t, unit, to, clear, intent)
                .await
                .map_err(fail);
            self.unlock_all(&t, unit, &mut held).await;
            return result;
        }
        let result: Result<u64, ClientError> = async {
            let data = match self
                .call(
                    &t,
                    from,
                    Message::Read {
                        offset,
                        len: len as u32,
                    },
                )
                .await
                .map_err(fail)?
            {
                Message::Data { data } if data.len() as u64 == len => data,
                other => {
                    return Err(ClientError::Protocol(format!(
                        "READ answered with {:?}",
                        other.kind()
                    )))
                }
            };
            let writes = join_all(to.iter().map(|&m| {
                self.call(
                    &t,
                    m,
                    Message::Write {
                        offset,
                        data: data.clone(),
                    },
                )
            }))
            .await;
            for w in writes {
                w.map_err(fail)?;
            }
            if let Some(c) = clear {
                self.dirty(&t, unit, c, false).await.map_err(fail)?;
            }
            Ok(len)
        }
        .await;
        self.unlock_all(&t, unit, &mut held).await;
        result
    }
}

/// Handles what TOMAs say without being asked.
async fn event_loop(
    inner: std::sync::Weak<Inner>,
    mut rx: mpsc::UnboundedReceiver<(DiskId, Unsolicited)>,
) {
    while let Some((disk, ev)) = rx.recv().await {
        let Some(inner) = inner.upgrade() else {
            return;
        };
        match ev {
            Unsolicited::SwitchTopo(t) => inner.adopt(t),
            Unsolicited::Fenced { reason, client } => {
                info!(volume = %inner.volume, disk = %disk, reason, "fenced by a TOMA");
                // The id the fenced session registered as: the disk's link may already be
                // a newer session of a newer id, which no TOMA fenced (abandoning it would
                // leave its locks held until a topology change fences it).
                if let Some(id) = client {
                    inner.fenced(id).await;
                }
            }
            Unsolicited::Closed => {
                let mut links = inner.links.lock();
                if links.get(&disk).is_some_and(|l| l.session.is_closed()) {
                    links.remove(&disk);
                }
            }
            Unsolicited::UnlockRefused(unit) => {
                tokio::spawn(async move { inner.unlock_again(disk, unit).await });
            }
        }
    }
}

/// Acknowledges each generation to every member once nothing older is in flight.
async fn ack_loop(inner: std::sync::Weak<Inner>) {
    let mut rx = match inner.upgrade() {
        Some(i) => i.gens.ackable(),
        None => return,
    };
    loop {
        let g = *rx.borrow_and_update();
        {
            let Some(inner) = inner.upgrade() else {
                return;
            };
            let sessions: Vec<Arc<Session>> = inner
                .links
                .lock()
                .values()
                .map(|l| l.session.clone())
                .collect();
            for s in sessions {
                s.tell(g, Message::AckTopo { generation: g }).await;
            }
        }
        if rx.changed().await.is_err() {
            return;
        }
    }
}

/// Exponential backoff for lock and busy retries: the product's own pacing.
struct Backoff {
    next: Duration,
}

impl Backoff {
    fn new() -> Self {
        Backoff {
            next: Duration::from_micros(50),
        }
    }

    async fn wait(&mut self) {
        tokio::time::sleep(self.next).await;
        self.next = (self.next * 2).min(Duration::from_millis(20));
    }
}
