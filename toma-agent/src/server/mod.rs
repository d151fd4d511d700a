//! The TOMA agent's datapath server and its control loop (protocol: `docs/datapath.md`).
//!
//! * [`Agent::start`] opens the listener and spawns: the accept loop, one task per
//!   connection (requests of a connection are served concurrently: pipelined), and the
//!   reconcile loop (heartbeat, topologies from the control plane, SWITCH_TOPO pushes,
//!   acknowledgement timeouts and fencing, status reports, rebuilds).
//! * Every timeout is a duration on this agent's own monotonic [`Clock`].

mod conn;
mod fence;
mod grow;
mod member;
mod rebuild;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::watch;
use tokio::task::JoinHandle;
use toma_client::{ClientConfig, VolumeClient};
use toma_control::{Clock, ControlPlane, DiskRecord, MemberStatus, NodeRecord, VolumeRecord};
use toma_core::{DiskId, NodeId, Phase, Role, Topology, VolumeId};
use toma_wire::transport::Transport;
use toma_wire::Secret;
use tracing::{debug, info, warn};

use crate::disk::Disk;
use crate::state::{ClientId, MemberRuntime};
use crate::superblock::{MemberState, SUPERBLOCK_AREA};

pub use member::Member;

/// How an agent behaves.
#[derive(Debug, Clone)]
pub struct AgentConfig {
    pub node: NodeId,
    /// Address to listen on (`127.0.0.2:0` picks a port).
    pub listen: String,
    /// How often the agent reports (heartbeat) and checks its timers.
    pub tick: Duration,
    /// A client that has not acknowledged a pushed topology in this long is fenced.
    pub ack_timeout: Duration,
    /// A client whose connection dropped is fenced unless it re-registers within this long.
    pub reconnect_grace: Duration,
    /// After a restart, locks are not granted for this long unless every attached client
    /// re-registered sooner.
    pub restart_grace: Duration,
    /// Ids of this agent's own client (rebuild, recovery): `None` draws them from the OS's
    /// random source; `Some(seed)` derives them from `seed` (the simulation).
    pub client_id_seed: Option<u64>,
}

impl AgentConfig {
    pub fn new(node: impl Into<NodeId>, listen: impl Into<String>) -> Self {
        AgentConfig {
            node: node.into(),
            listen: listen.into(),
            tick: Duration::from_millis(200),
            ack_timeout: Duration::from_secs(5),
            reconnect_grace: Duration::from_secs(5),
            restart_grace: Duration::from_secs(5),
            client_id_seed: None,
        }
    }
}

pub(crate) struct AgentInner {
    pub cfg: AgentConfig,
    pub cp: Arc<dyn ControlPlane>,
    pub transport: Arc<dyn Transport>,
    pub clock: Arc<dyn Clock>,
    pub disks: Vec<Arc<Disk>>,
    pub healthy: HashMap<DiskId, AtomicBool>,
    pub members: Mutex<BTreeMap<VolumeId, Arc<Member>>>,
    pub local: tokio::sync::Mutex<BTreeMap<VolumeId, VolumeClient>>,
    pub next_conn: AtomicU64,
    pub endpoint: String,
    pub boot: u64,
    pub heartbeat: AtomicU64,
    pub tasks: Mutex<Vec<JoinHandle<()>>>,
    /// Poked when something worth reporting changed (an ack, a fence).
    pub poke: watch::Sender<u64>,
}

/// A running agent. Dropping the handle does not stop it; call [`AgentHandle::shutdown`].
pub struct AgentHandle {
    inner: Arc<AgentInner>,
}

impl AgentHandle {
    /// Where clients reach this agent.
    pub fn endpoint(&self) -> &str {
        &self.inner.endpoint
    }

    pub fn node(&self) -> &NodeId {
        &self.inner.cfg.node
    }

    /// The members this agent hosts now.
    pub fn members(&self) -> Vec<Arc<Member>> {
        self.inner.members.lock().values().cloned().collect()
    }

    /// Orderly shutdown (SIGTERM): stops serving, closes every client connection, then
    /// detaches every disk — the writes in flight finish, nothing lands after the final
    /// flush, and the superblock records that no host holds the disk. Its members are then
    /// trusted after a reboot or a move to another host (no power-loss full rebuild).
    /// Returns the disks that could not be detached, with why.
    pub fn shutdown(&self) -> Vec<(DiskId, String)> {
        self.kill();
        self.inner
            .disks
            .iter()
            .filter_map(|d| d.detach().err().map(|e| (d.id(), e.to_string())))
            .collect()
    }

    /// Stops everything at once, like a crash: connections drop, RAM state is lost, and
    /// the agent stops reporting. Disks are closed when the last reference goes.
    pub fn kill(&self) {
        for t in self.inner.tasks.lock().drain(..) {
            t.abort();
        }
        for m in self.inner.members.lock().values() {
            for c in m.clients.lock().values() {
                if let Some(s) = &c.sender {
                    s.close();
                }
            }
        }
        self.inner.members.lock().clear();
    }
}

impl Agent {
    /// Starts an agent on `disks` (already opened).
    pub async fn start(
        cfg: AgentConfig,
        disks: Vec<Arc<Disk>>,
        cp: Arc<dyn ControlPlane>,
        transport: Arc<dyn Transport>,
        clock: Arc<dyn Clock>,
    ) -> std::io::Result<AgentHandle> {
        let mut listener = transport.listen(&cfg.listen).await?;
        let endpoint = listener.local_addr();
        let boot = disks.iter().map(|d| d.boot_counter()).max().unwrap_or(0);
        let healthy = disks
            .iter()
            .map(|d| (d.id(), AtomicBool::new(true)))
            .collect();
        let inner = Arc::new(AgentInner {
            cfg,
            cp,
            transport,
            clock,
            disks,
            healthy,
            members: Mutex::new(BTreeMap::new()),
            local: tokio::sync::Mutex::new(BTreeMap::new()),
            next_conn: AtomicU64::new(1),
            endpoint,
            boot,
            heartbeat: AtomicU64::new(0),
            tasks: Mutex::new(Vec::new()),
            poke: watch::Sender::new(0),
        });
        info!(node = %inner.cfg.node, endpoint = %inner.endpoint, disks = inner.disks.len(), boot, "agent started");
        let acc = {
            let inner = inner.clone();
            tokio::spawn(async move {
                loop {
                    match listener.accept().await {
                        Ok(conn) => {
                            let h = tokio::spawn(conn::serve(inner.clone(), conn));
                            let mut tasks = inner.tasks.lock();
                            tasks.retain(|t| !t.is_finished());
                            tasks.push(h);
                        }
                        Err(e) => {
                            warn!(error = %e, "accept failed");
                            tokio::time::sleep(Duration::from_millis(50)).await;
                        }
                    }
                }
            })
        };
        // First report before anyone looks for us.
        inner.report_node().await;
        let rec = tokio::spawn(reconcile_loop(inner.clone()));
        inner.tasks.lock().extend([acc, rec]);
        Ok(AgentHandle { inner })
    }
}

/// Runs blocking disk work `f` on a blocking thread, or inline when `disk` is in memory
/// (never blocks; keeps a simulated run on one thread and reproducible).
pub(crate) async fn disk_io<T: Send + 'static>(
    disk: &Disk,
    f: impl FnOnce() -> T + Send + 'static,
) -> Result<T, String> {
    if disk.in_memory() {
        Ok(f())
    } else {
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| e.to_string())
    }
}

/// The agent type (its constructor is [`Agent::start`]).
pub struct Agent;

impl AgentInner {
    pub fn now(&self) -> Duration {
        self.clock.now()
    }

    pub fn member(&self, volume: VolumeId) -> Option<Arc<Member>> {
        self.members.lock().get(&volume).cloned()
    }

    pub fn poke(&self) {
        self.poke.send_modify(|v| *v = v.wrapping_add(1));
    }

    pub fn mark_unhealthy(&self, disk: DiskId) {
        if let Some(h) = self.healthy.get(&disk) {
            if h.swap(false, Ordering::SeqCst) {
                warn!(disk = %disk, "disk I/O failed; reporting it unhealthy");
                self.poke();
            }
        }
    }

    /// This agent's own client of `volume`, for rebuild and recovery.
    pub async fn local_client(&self, volume: VolumeId) -> Option<VolumeClient> {
        let mut local = self.local.lock().await;
        if let Some(c) = local.get(&volume) {
            return Some(c.clone());
        }
        let cfg = ClientConfig {
            node: self.cfg.node.0.clone(),
            id_seed: self
                .cfg
                .client_id_seed
                .map(|s| s ^ volume.0 as u64 ^ (volume.0 >> 64) as u64),
            ..ClientConfig::default()
        };
        match VolumeClient::attach(self.cp.clone(), self.transport.clone(), volume, cfg).await {
            Ok(c) => {
                local.insert(volume, c.clone());
                Some(c)
            }
            Err(e) => {
                warn!(volume = %volume, error = %e, "cannot attach the local client");
                None
            }
        }
    }

    async fn report_node(&self) {
        let beat = self.heartbeat.fetch_add(1, Ordering::Relaxed) + 1;
        let node = NodeRecord {
            node: self.cfg.node.clone(),
            endpoint: self.endpoint.clone(),
            heartbeat: beat,
            boot: self.boot,
        };
        if let Err(e) = self.cp.put_node(node).await {
            debug!(error = %e, "heartbeat not written");
        }
        let mut records: Option<Option<Vec<DiskRecord>>> = None;
        for d in &self.disks {
            // A disk pulled out of this node, or failing, may see no datapath I/O here (its
            // clients went elsewhere): look at it now and then so its loss is reported.
            if self
                .healthy
                .get(&d.id())
                .is_some_and(|h| h.load(Ordering::SeqCst))
            {
                let dev = d.device().clone();
                let probe = disk_io(d, move || {
                    let mut buf = vec![0u8; 4096];
                    dev.read_at(&mut buf, 0)
                })
                .await;
                if !matches!(probe, Ok(Ok(()))) {
                    self.mark_unhealthy(d.id());
                }
            }
            let used: u64 = d.extents().iter().map(|e| e.length).sum();
            let free = d
                .size()
                .saturating_sub(SUPERBLOCK_AREA)
                .saturating_sub(used);
            let healthy = self
                .healthy
                .get(&d.id())
                .is_some_and(|h| h.load(Ordering::SeqCst));
            if !healthy {
                // A disk that failed here may have been plugged into another node since: its
                // record is then that node's, and this node's stale word must not replace it.
                // (The records are read once per heartbeat, and only when a disk failed.)
                if records.is_none() {
                    records = Some(self.cp.disks().await.ok());
                }
                let elsewhere = match records.as_ref().and_then(|r| r.as_ref()) {
                    Some(all) => all
                        .iter()
                        .any(|r| r.disk == d.id() && r.node != self.cfg.node),
                    None => true,
                };
                if elsewhere {
                    continue;
                }
            }
            let rec = DiskRecord {
                disk: d.id(),
                node: self.cfg.node.clone(),
                capacity: d.size(),
                free,
                healthy,
            };
            if let Err(e) = self.cp.put_disk(rec).await {
                debug!(error = %e, "disk report not written");
            }
        }
    }

    /// Brings hosted members in line with the control plane's volumes.
    async fn sync_volumes(self: &Arc<Self>) {
        let vols = match self.cp.volumes().await {
            Ok(v) => v,
            Err(e) => {
                debug!(error = %e, "control plane unreachable; serving the topologies we have");
                return;
            }
        };
        let mut seen = Vec::new();
        let listed: Vec<VolumeId> = vols.iter().map(|v| v.value.id).collect();
        self.free_replaced_extents(&vols).await;
        for v in vols {
            let rec = v.value;
            let t = &rec.topology;
            // This node may hold the disks of two members of one volume (a disk moved here
            // from another node while this node hosts a member). The datapath serves one
            // member per volume: the one the topology places on this node, else the first.
            let ours: Vec<(usize, Arc<Disk>)> = t
                .members
                .iter()
                .enumerate()
                .filter_map(|(i, m)| {
                    self.disks
                        .iter()
                        .find(|d| d.id() == m.disk)
                        .map(|d| (i, d.clone()))
                })
                .collect();
            let here = |i: usize| t.members[i].node == self.cfg.node;
            let placed_here = ours
                .iter()
                .find(|(i, _)| here(*i) && !t.members[*i].role.is_dead())
                .or_else(|| ours.iter().find(|(i, _)| here(*i)));
            let Some((idx, disk)) = placed_here.or(ours.first()).cloned() else {
                continue;
            };
            seen.push(rec.id);
            let existing = self.member(rec.id);
            match existing {
                Some(m) if m.idx() == idx && m.disk.id() == disk.id() => {
                    if t.generation > m.topology().generation {
                        self.apply_topology(&m, t.clone(), idx).await;
                    }
                }
                Some(m) => {
                    // Another member of this volume is now the one placed here: stop serving
                    // the old one (its extent stays on its disk) and serve the new one.
                    info!(volume = %rec.name, from = m.idx(), to = idx, "serving another member of the volume");
                    self.stop_serving(&m).await;
                    self.host(&rec, idx, disk).await;
                }
                None => self.host(&rec, idx, disk).await,
            }
            if let Some(m) = self.member(rec.id) {
                grow::sync(self, &m, &rec).await;
            }
        }
        // Volumes that are gone: free their extents.
        let gone: Vec<Arc<Member>> = self
            .members
            .lock()
            .values()
            .filter(|m| !seen.contains(&m.volume))
            .cloned()
            .collect();
        // Left out of the listing is not deleted: a volume whose Secret could not be read
        // while the API server restarted, or whose topology edit was refused, is still
        // there. Its member keeps serving (with its locks and dirty bits) and its extent
        // stays; only a volume the control plane no longer names at all is freed. (A listed
        // volume whose topology no longer places a member here replaced it: freed.)
        let names = if gone.iter().any(|m| !listed.contains(&m.volume)) {
            match self.cp.volume_names().await {
                Ok(n) => n,
                Err(e) => {
                    debug!(error = %e, "cannot tell which volumes still exist; freeing nothing");
                    return;
                }
            }
        } else {
            Default::default()
        };
        for m in gone {
            if !listed.contains(&m.volume) && names.contains(&m.name) {
                warn!(volume = %m.name, "the volume exists but the control plane cannot give its record now; serving the topology we have");
                continue;
            }
            info!(volume = %m.name, "the volume has no member on this node any more (deleted, or replaced); freeing its extent");
            self.stop_serving(&m).await;
            let _ = free_extent(&m.disk, m.volume, m.idx()).await;
        }
    }

    /// Frees the extents on this node's disks of members that the volume's topology now
    /// places on another disk (the leader replaced them with a NEW disk, maybe while this
    /// agent was down or the disk was elsewhere): their data is no longer needed, and the
    /// space they hold may be the only room left for a replacement. Only a topology that
    /// names another disk for that member frees one; a volume missing from the list frees
    /// nothing here.
    async fn free_replaced_extents(
        self: &Arc<Self>,
        vols: &[toma_control::Versioned<toma_control::VolumeRecord>],
    ) {
        for disk in &self.disks {
            for e in disk.extents() {
                let Some(rec) = vols.iter().map(|v| &v.value).find(|r| r.id == e.volume) else {
                    continue;
                };
                let t = &rec.topology;
                let replaced = t
                    .members
                    .get(e.member)
                    .is_some_and(|m| m.disk != disk.id() && e.generation < t.generation);
                if !replaced {
                    continue;
                }
                info!(volume = %rec.name, member = e.member, disk = %disk.name(), generation = t.generation, "this member was replaced by another disk; freeing its extent here");
                if let Some(m) = self.member(rec.id) {
                    if m.idx() == e.member && m.disk.id() == disk.id() {
                        self.stop_serving(&m).await;
                    }
                }
                if let Err(err) = free_extent(disk, e.volume, e.member).await {
                    warn!(volume = %rec.name, member = e.member, error = %err, "cannot free the extent of a replaced member");
                }
            }
        }
    }

    /// Stops serving member `m`: forgets it, closes its clients' connections and drops the
    /// volume's local client. Its extent stays on its disk.
    async fn stop_serving(&self, m: &Arc<Member>) {
        self.members.lock().remove(&m.volume);
        m.disconnect_clients();
        self.local.lock().await.remove(&m.volume);
    }

    /// Starts hosting `rec`'s member `idx` on `disk`.
    async fn host(self: &Arc<Self>, rec: &VolumeRecord, idx: usize, disk: Arc<Disk>) {
        let t = rec.topology.clone();
        let had_extent = disk.extent(rec.id, idx).is_some();
        if !had_extent {
            // The volume's size: a pending growth is applied by grow.rs, which zeroes the new
            // part (a fresh extent is not zeroed, and a rebuild copies only the size).
            let (d, vol, len, g) = (disk.clone(), rec.id, rec.spec.member_bytes(), t.generation);
            match disk_io(&disk, move || d.allocate_extent(vol, idx, len, g)).await {
                Ok(Ok(e)) => {
                    info!(volume = %rec.name, member = idx, offset = e.offset, length = e.length, "extent allocated");
                }
                Ok(Err(e)) => {
                    warn!(volume = %rec.name, error = %e, "cannot allocate the member's extent");
                    return;
                }
                Err(e) => {
                    warn!(error = %e, "allocation task failed");
                    return;
                }
            }
        }
        // Locks and dirty bits cover the volume's units, and a pending growth's once the
        // extent has grown (grow.rs).
        let units = match disk.extent(rec.id, idx) {
            Some(e) if e.length >= rec.extent_bytes() => {
                rec.extent_bytes() / u64::from(rec.spec.chunk_size)
            }
            _ => rec.spec.units(),
        };
        let runtime = Arc::new(MemberRuntime::new(units, t.n()));
        let now = self.now();
        let role = t.members[idx].role;
        // A restart (the extent existed): locks and dirty bits were lost.
        let restarted = had_extent;
        let degraded = t.members.iter().any(|m| m.role != Role::Rwl);
        if restarted && degraded && role == Role::Rwl {
            // What the members that are not readable missed was in the lost bits: everything
            // is dirty for them, whatever the topology says (the leader may not know yet).
            for (k, mk) in t.members.iter().enumerate() {
                if matches!(mk.role, Role::W | Role::Dead) {
                    if let Err(e) = runtime.dirty.set_all(k) {
                        warn!(error = %e, "cannot set all dirty bits");
                    }
                }
            }
        }
        // Clients neither lock nor write a DEAD member: nothing of theirs was lost here, so
        // there is no one to wait for or fence (when it returns, it starts afresh anyway).
        let attached = if restarted && role != Role::Dead {
            self.cp
                .attachments(rec.id)
                .await
                .map(|a| a.into_iter().map(|a| a.client).collect())
                .unwrap_or_default()
        } else {
            Vec::new()
        };
        let m = Arc::new(Member {
            volume: rec.id,
            name: rec.name.clone(),
            spec: Mutex::new(rec.spec),
            secret: Secret(rec.secret),
            disk: disk.clone(),
            idx: Mutex::new(idx),
            topology: Mutex::new(Arc::new(t.clone())),
            runtime: Mutex::new(runtime),
            clients: Mutex::new(BTreeMap::new()),
            grace_until: Mutex::new(if restarted && !attached.is_empty() {
                Some(now + self.cfg.restart_grace)
            } else {
                None
            }),
            grace_waiting: Mutex::new(attached),
            dirty_bits_lost: Mutex::new(restarted && degraded && role == Role::Rwl),
            rebuild: Mutex::new(None),
            fencing: Mutex::new(Vec::new()),
            orphans: Mutex::new(BTreeMap::new()),
            growing: AtomicBool::new(false),
            grow_refused: Mutex::new(None),
        });
        if m.disk.lost_writes(m.volume, idx) {
            warn!(volume = %rec.name, member = idx, "this member's disk lost power since its last flush: it may miss acknowledged writes; serving no I/O until the leader has it rebuilt in full");
            settle_lost_writes(&m, &t, idx);
        }
        info!(volume = %rec.name, member = idx, role = %role, generation = t.generation, restarted, node = %self.cfg.node, disk = %disk.id(), "hosting member");
        self.members.lock().insert(rec.id, m.clone());
        self.record_extent(&m, &t, idx).await;
    }

    async fn record_extent(&self, m: &Member, t: &Topology, idx: usize) {
        let state = MemberState::Member(t.members[idx].role);
        let (d, vol, g) = (m.disk.clone(), m.volume, t.generation);
        match disk_io(&m.disk, move || d.update_extent(vol, idx, g, state)).await {
            Ok(Ok(_)) => {}
            Ok(Err(e)) => {
                warn!(volume = %m.name, error = %e, "cannot record the member's generation")
            }
            Err(e) => warn!(error = %e, "superblock task failed"),
        }
    }

    /// Learns topology `t` (newer than the one the member has).
    async fn apply_topology(self: &Arc<Self>, m: &Arc<Member>, t: Topology, idx: usize) {
        let old = m.topology();
        let now = self.now();
        let role = t.members[idx].role;
        let old_role = old.members.get(idx).map(|x| x.role).unwrap_or(Role::Dead);
        // Rebuild-init, on the returning member: forget its locks and dirty bits. Whatever
        // role this TOMA last knew: one that restarted, or missed the topologies marking its
        // member DEAD, may still hold a lock a client took before and has since dropped (it
        // forgets a DEAD member's locks), and nothing would ever release it.
        if role == Role::W && old_role != Role::W {
            let units = m.runtime().locks.units();
            *m.runtime.lock() = Arc::new(MemberRuntime::new(units, t.n()));
        }
        // Rebuild-init, on a readable member: a NEW disk (or lost bits) is all dirty.
        if role == Role::Rwl {
            let rt = m.runtime();
            for (k, mk) in t.members.iter().enumerate() {
                let entering = old
                    .members
                    .get(k)
                    .is_some_and(|o| o.role == Role::Dead || o.disk != mk.disk);
                let lost = *m.dirty_bits_lost.lock();
                if mk.role == Role::W && (mk.full_rebuild || lost) && entering {
                    if let Err(e) = rt.dirty.set_all(k) {
                        warn!(error = %e, "cannot set all dirty bits");
                    }
                }
            }
        }
        if t.phase() == Phase::Normal {
            *m.dirty_bits_lost.lock() = false;
        }
        settle_lost_writes(m, &t, idx);
        *m.idx.lock() = idx;
        *m.topology.lock() = Arc::new(t.clone());
        {
            let mut clients = m.clients.lock();
            for c in clients.values_mut() {
                if c.acked < t.generation && c.waiting_since.is_none() {
                    c.waiting_since = Some(now);
                }
            }
        }
        debug!(volume = %m.name, from = %old, to = %t, "topology learned");
        self.record_extent(m, &t, idx).await;
        m.push_topology().await;
    }

    /// Fences clients that owe an acknowledgement for too long or vanished, and ends grace
    /// periods.
    fn check_timers(self: &Arc<Self>) {
        let now = self.now();
        let members: Vec<Arc<Member>> = self.members.lock().values().cloned().collect();
        for m in members {
            let mut late = Vec::new();
            for (id, c) in m.clients.lock().iter() {
                let limit = if c.sender.is_some() {
                    self.cfg.ack_timeout
                } else {
                    self.cfg.reconnect_grace
                };
                if c.waiting_since
                    .is_some_and(|s| now.saturating_sub(s) >= limit)
                {
                    late.push(*id);
                }
            }
            let grace_over = {
                let mut g = m.grace_until.lock();
                match *g {
                    Some(until) if now >= until || m.grace_waiting.lock().is_empty() => {
                        *g = None;
                        true
                    }
                    _ => false,
                }
            };
            if grace_over {
                let missing: Vec<u128> = std::mem::take(&mut *m.grace_waiting.lock());
                if !missing.is_empty() {
                    info!(volume = %m.name, missing = missing.len(), "grace period over; fencing clients that did not come back");
                }
                late.extend(missing.into_iter().map(ClientId));
            }
            for id in late {
                fence::start(
                    self.clone(),
                    m.clone(),
                    id,
                    "no acknowledgement or reconnection in time",
                );
            }
            // A lock whose holder never registers here would block its chunk forever:
            // after the reconnect grace, its holder is fenced and the chunk recovered.
            if m.grace_until.lock().is_none() {
                let rt = m.runtime();
                let holders: BTreeSet<ClientId> =
                    rt.locks.locks().into_iter().map(|(_, c)| c).collect();
                let stale: Vec<ClientId> = {
                    let clients = m.clients.lock();
                    let fencing = m.fencing.lock();
                    let mut orphans = m.orphans.lock();
                    orphans.retain(|c, _| holders.contains(c) && !clients.contains_key(c));
                    for c in &holders {
                        if !clients.contains_key(c) && !fencing.contains(c) {
                            orphans.entry(*c).or_insert(now);
                        }
                    }
                    orphans
                        .iter()
                        .filter(|(c, since)| {
                            !fencing.contains(c)
                                && now.saturating_sub(**since) >= self.cfg.reconnect_grace
                        })
                        .map(|(c, _)| *c)
                        .collect()
                };
                for id in stale {
                    m.orphans.lock().remove(&id);
                    fence::start(
                        self.clone(),
                        m.clone(),
                        id,
                        "holds locks here but never registered in time",
                    );
                }
            }
        }
    }

    async fn report_members(self: &Arc<Self>) {
        let members: Vec<Arc<Member>> = self.members.lock().values().cloned().collect();
        for m in members {
            let t = m.topology();
            let idx = m.idx();
            let Some(me) = t.members.get(idx) else {
                continue;
            };
            let status = MemberStatus {
                volume: m.volume,
                disk: me.disk,
                node: self.cfg.node.clone(),
                synced: m.synced(),
                boot: self.boot,
                dirty_bits_lost: *m.dirty_bits_lost.lock(),
                stale: m.disk.lost_writes(m.volume, idx),
                rebuild: *m.rebuild.lock(),
                extent_bytes: m.disk.extent(m.volume, idx).map_or(0, |e| e.length),
                grow_refused: m.grow_refused.lock().clone(),
            };
            if let Err(e) = self.cp.put_member_status(status).await {
                debug!(error = %e, "status not written");
            }
            rebuild::maybe_start(self.clone(), m.clone());
        }
    }
}

/// Removes `volume`'s member `idx` from `disk` (persisted), off the async threads.
async fn free_extent(disk: &Arc<Disk>, volume: VolumeId, idx: usize) -> Result<(), String> {
    let d = disk.clone();
    match disk_io(disk, move || d.free_extent(volume, idx)).await {
        Ok(Ok(_)) => Ok(()),
        Ok(Err(e)) => Err(e.to_string()),
        Err(e) => Err(e.to_string()),
    }
}

/// A member that may miss acknowledged writes serves again once topology `t` shows that
/// the leader took it into account (it is to be rebuilt in full), or when it is one of the
/// last readable members: failing it would fail the volume, which would then restart from
/// it (and rebuild every other member from it in full) anyway.
fn settle_lost_writes(m: &Member, t: &Topology, idx: usize) {
    let Some(me) = t.members.get(idx) else {
        return;
    };
    let full = me.full_rebuild;
    let last = t.is_last_readable(idx);
    if (full || last) && m.disk.settle_lost_writes(m.volume, idx) {
        info!(volume = %m.name, member = idx, generation = t.generation, full_rebuild = full, "the leader took this member's lost writes into account; serving again");
    }
}

async fn reconcile_loop(inner: Arc<AgentInner>) {
    let mut changes = inner.cp.changes();
    let mut poke = inner.poke.subscribe();
    let mut last_beat = inner.now();
    loop {
        let now = inner.now();
        if now.saturating_sub(last_beat) >= inner.cfg.tick {
            inner.report_node().await;
            last_beat = now;
        }
        inner.sync_volumes().await;
        inner.check_timers();
        inner.report_members().await;
        // `biased`: a fixed polling order, so that a simulated run is reproducible.
        tokio::select! {
            biased;
            _ = changes.changed() => {}
            _ = poke.changed() => {}
            _ = tokio::time::sleep(inner.cfg.tick) => {}
        }
    }
}
