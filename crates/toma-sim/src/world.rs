//! One simulated run: a cluster of agents on in-memory disks, the embedded control plane
//! and a leader, clients running a verifying workload, faults drawn from the seed, a
//! healing phase, and the final checks (P4, P6, superblocks).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::task::JoinHandle;
use toma_agent::device::BlockDevice;
use toma_agent::device::PowerLoss;
use toma_agent::disks::open_or_format;
use toma_agent::server::{Agent, AgentConfig};
use toma_agent::superblock::MemberState;
use toma_agent::{ClusterId, MIN_DISK_SIZE};
use toma_client::{ClientConfig, VolumeClient};
use toma_control::{Clock, ControlPlane, EmbeddedControlPlane, Leader, LeaderConfig, VolumeRecord};
use toma_core::{DiskId, Layout, Mutations, NodeId, Phase, Role, Topology, VolumeId, VolumeSpec};

use crate::checker::{node_index, Checker};
use crate::clock::SimClock;
use crate::disk::SimDisk;
use crate::net::{LinkParams, SimNet};
use crate::rng::Rng;
use crate::verify::{block_bytes, BLOCK};
use crate::watchdog::{Watchdog, MAX_SIM_TIME};
use crate::{Mutation, Options, Report};

/// The chunk size of the simulated volumes: a lock unit's bytes on each member.
pub(crate) const CHUNK: u64 = 16 * 1024;
const VOLUME_SIZE: u64 = 8 * CHUNK;
/// RAID6 4+2: four stripes of 4 data chunks.
const RAID6_DATA: u8 = 4;
const RAID6_VOLUME_SIZE: u64 = 4 * RAID6_DATA as u64 * CHUNK;
const TICK: Duration = Duration::from_millis(100);

#[derive(Debug, Clone, Copy)]
enum Fault {
    AgentCrash(usize),
    NodePowerLoss(usize),
    DiskMove { disk: usize, to: usize },
    DiskErrors(usize),
    LeaderCrash,
    ClientCrash(usize),
    Partition(u64),
    OneWay(usize, usize),
    Jitter,
    ClusterPowerLoss,
}

/// A planned fault's start or end; the number pairs the two (a skipped start skips its end).
#[derive(Debug, Clone, Copy)]
enum Step {
    Start(usize, Fault),
    Heal(usize, Fault),
}

/// How long the nodes of a healed fault still count as out of reach for the RAID6 bound:
/// a member can be reported unreachable, or found stale at its restart, a while after the
/// fault ended (the request timeout is 3 s). Past it, a loss shows in the topology.
const COOL_DOWN: Duration = Duration::from_secs(5);

/// The two-loss bound of a RAID6 run (`Options::unbounded_losses` off): which faults are
/// in effect, on which storage nodes.
#[derive(Default)]
struct LossBound {
    /// Started and not yet healed: id -> the storage nodes it takes away.
    active: BTreeMap<usize, BTreeSet<usize>>,
    /// Healed a short while ago (see [`COOL_DOWN`]).
    cooling: Vec<(tokio::time::Instant, BTreeSet<usize>)>,
    /// Faults not started because they would have taken a third member away.
    skipped: BTreeSet<usize>,
    /// Where each unplugged disk was (a move that would take a third member away goes back
    /// there instead).
    home: BTreeMap<usize, usize>,
}

struct SimClient {
    vc: VolumeClient,
    workers: Vec<JoinHandle<()>>,
    blocks: Vec<u64>,
}

struct World {
    seed: u64,
    opts: Options,
    rng: Rng,
    ck: Arc<Checker>,
    cp: Arc<EmbeddedControlPlane>,
    net: SimNet,
    cluster: ClusterId,
    storage: usize,
    clients_n: usize,
    workers_per_client: usize,
    disks: Vec<SimDisk>,
    clocks: Vec<Arc<dyn Clock>>,
    /// Each storage node's boot (+1 when it loses power): what its agents see as the host's
    /// boot id, so a disk that lost power is known to have.
    boots: Vec<u64>,
    leader_clock: Arc<dyn Clock>,
    leader: Option<JoinHandle<()>>,
    leaders_started: u64,
    clients: Vec<Option<SimClient>>,
    volume: VolumeId,
    blocks: u64,
    volume_size: u64,
    calm: LinkParams,
    stop: tokio::sync::watch::Sender<bool>,
    bound: LossBound,
}

fn node_name(i: usize) -> NodeId {
    NodeId(format!("n{i}"))
}

impl Mutation {
    fn leader(self) -> Mutations {
        Mutations {
            skip_dual_lock: self == Mutation::SkipDualLock,
            early_advance: self == Mutation::EarlyAdvance,
        }
    }
}

pub async fn run(seed: u64, opts: Options) -> Report {
    let mut rng = Rng::new(seed);
    let cp = Arc::new(match opts.mutation {
        Some(Mutation::SkipDualLock) | Some(Mutation::EarlyAdvance) => {
            EmbeddedControlPlane::without_adjacency_check()
        }
        _ => EmbeddedControlPlane::new(),
    });
    let mirrors: u8 = if rng.chance(0.5) { 2 } else { 3 };
    let (layout, volume_size) = if opts.raid6 {
        (Layout::Raid6 { data: RAID6_DATA }, RAID6_VOLUME_SIZE)
    } else {
        (Layout::Raid1 { mirrors }, VOLUME_SIZE)
    };
    let storage = layout.members() + 2;
    let clients_n = 2 + rng.index(2);
    let ck = Arc::new(Checker::new(cp.clone(), storage, opts.verbose));
    // Per-run network character (swarm testing: each run its own mix).
    let calm = LinkParams {
        delay_min_us: 10 + rng.below(50),
        delay_max_us: 100 + rng.below(2000),
        spike: 0.0,
        spike_max_ms: 0,
        dup: if rng.chance(0.4) { 0.002 } else { 0.0 },
        reorder: rng.chance(0.4),
    };
    let wd = Arc::new(Watchdog::new());
    let net = SimNet::new(
        storage + clients_n,
        rng.fork(),
        calm,
        ck.clone(),
        wd.clone(),
    );
    let mut clocks: Vec<Arc<dyn Clock>> = Vec::new();
    let mut skew = false;
    for _ in 0..storage {
        let rate = 1.0 + (rng.unit() - 0.5) * 0.2;
        let offset = Duration::from_millis(rng.below(1_000_000));
        skew |= (rate - 1.0).abs() > 0.01;
        clocks.push(Arc::new(SimClock::new(offset, rate, wd.clone())));
    }
    let leader_clock: Arc<dyn Clock> = Arc::new(SimClock::new(
        Duration::from_millis(rng.below(1_000_000)),
        1.0 + (rng.unit() - 0.5) * 0.2,
        wd.clone(),
    ));
    let cluster = ClusterId(u128::from(rng.next_u64()) << 64 | u128::from(rng.next_u64()));
    let disks = (0..storage)
        .map(|i| SimDisk::new(&format!("disk{i}"), MIN_DISK_SIZE, i))
        .collect();
    let (stop, _) = tokio::sync::watch::channel(false);
    let mut w = World {
        seed,
        opts,
        rng,
        ck: ck.clone(),
        cp,
        net,
        cluster,
        storage,
        clients_n,
        workers_per_client: 2,
        disks,
        clocks,
        boots: vec![0; storage],
        leader_clock,
        leader: None,
        leaders_started: 0,
        clients: Vec::new(),
        volume: VolumeId(0),
        blocks: volume_size / BLOCK as u64,
        volume_size,
        calm,
        stop,
        bound: LossBound::default(),
    };
    ck.log(format!(
        "seed {seed}: {layout}, {storage} storage nodes, {clients_n} clients, mutation {}, links {:?}",
        w.opts.mutation.map_or("none", |m| m.name()),
        calm
    ));
    if skew {
        ck.fault(
            "clock-skew",
            "node clocks run at different rates and offsets",
        );
    }
    if calm.dup > 0.0 {
        ck.fault("duplication", "frames are duplicated now and then");
    }
    if calm.reorder {
        ck.fault(
            "reordering",
            "frames of a connection may overtake each other",
        );
    }
    // The watchdog: no seed hangs (bounded simulated time, bounded steps).
    let body = async {
        if let Err(e) = w.setup(layout).await {
            ck.violate(format!("setup failed: {e}"));
        } else {
            w.chaos().await;
            if ck.violation().is_none() {
                w.heal_and_check().await;
            }
        }
    };
    tokio::select! {
        biased;
        why = wd.tripped() => ck.violate(format!(
            "watchdog: {why}; operations in progress: [{}]",
            ck.pending_ops().join("; ")
        )),
        done = tokio::time::timeout(MAX_SIM_TIME, body) => {
            if done.is_err() {
                ck.violate(format!(
                    "watchdog: the run lasted {MAX_SIM_TIME:?} of simulated time; operations in progress: [{}]",
                    ck.pending_ops().join("; ")
                ));
            }
        }
    }
    w.stop.send_replace(true);
    let (reads, writes, flushes, grants) = ck.counts();
    let stats = w.net.stats();
    ck.log(format!(
        "end: {reads} reads, {writes} writes, {flushes} flushes, {grants} lock grants checked; frames {} (dropped {}, duplicated {}, delayed past timeout {}, connection resets {})",
        stats.frames, stats.dropped, stats.duplicated, stats.spiked, stats.resets
    ));
    let violation = ck.violation();
    let sim_secs = ck.now_secs();
    // Stop every task before the runtime goes (drop order must not matter).
    for a in ck.agents.lock().iter().flatten() {
        a.kill();
    }
    if let Some(l) = w.leader.take() {
        l.abort();
    }
    for c in w.clients.iter_mut().flatten() {
        for t in c.workers.drain(..) {
            t.abort();
        }
    }
    Report {
        seed,
        log: ck.take_log(),
        violation,
        faults: ck.faults(),
        sim_secs,
        skipped: w.bound.skipped.len(),
    }
}

impl World {
    async fn setup(&mut self, layout: Layout) -> Result<(), String> {
        for i in 0..self.storage {
            self.start_agent(i).await?;
        }
        // The volume on the first nodes, one member each.
        let disks = self.cp.disks().await.map_err(|e| e.to_string())?;
        let mut members = Vec::new();
        for i in 0..layout.members() {
            let d = disks
                .iter()
                .find(|d| d.node == node_name(i))
                .ok_or(format!("no disk reported by n{i}"))?;
            members.push((d.disk, node_name(i)));
        }
        self.volume = VolumeId(u128::from(self.rng.next_u64()) << 64 | 1);
        let layout = layout.validate().map_err(|e| e.to_string())?;
        let spec = VolumeSpec::new(layout, CHUNK, self.volume_size).map_err(|e| e.to_string())?;
        let topology =
            Topology::new_normal(self.volume, layout, CHUNK, members).map_err(|e| e.to_string())?;
        let mut secret = [0u8; 32];
        for c in secret.chunks_mut(8) {
            c.copy_from_slice(&self.rng.next_u64().to_le_bytes());
        }
        self.cp
            .create_volume(VolumeRecord {
                id: self.volume,
                name: "simvol".into(),
                spec,
                secret,
                topology,
                growing_to: None,
            })
            .await
            .map_err(|e| e.to_string())?;
        *self.ck.volume.lock() = Some(self.volume);
        *self.ck.units.lock() = spec.units();
        self.ck.set_blocks(self.blocks);
        self.ck.topology();
        self.start_leader();
        // Let the agents host their members.
        tokio::time::sleep(Duration::from_millis(500)).await;
        for c in 0..self.clients_n {
            self.clients.push(None);
            self.start_client(c).await;
        }
        let ck = self.ck.clone();
        let mut stop = self.stop.subscribe();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    _ = stop.wait_for(|s| *s) => return,
                    _ = tokio::time::sleep(Duration::from_millis(20)) => {}
                }
                ck.check_exclusion();
                ck.check_superblocks();
            }
        });
        Ok(())
    }

    async fn start_agent(&mut self, i: usize) -> Result<(), String> {
        if self.ck.agents.lock()[i].is_some() {
            return Ok(());
        }
        self.net.revive(i);
        let mut opened = Vec::new();
        for d in self.disks.iter().filter(|d| d.node() == Some(i)) {
            let dev = Arc::new(d.view(i));
            let mut ids = self.rng.fork();
            let mut new_id = || Ok(DiskId(u128::from(ids.next_u64()) << 64 | 7));
            let host = ((i as u128 + 1) << 64) | (u128::from(self.boots[i]) + 1);
            match open_or_format(dev, self.cluster, false, host, &mut new_id) {
                Ok(disk) => opened.push(Arc::new(disk)),
                Err(e) => self
                    .ck
                    .log(format!("n{i}: cannot open {}: {e}", d.dev.name())),
            }
        }
        let mut cfg = AgentConfig::new(node_name(i), format!("n{i}:7100"));
        cfg.tick = TICK;
        cfg.ack_timeout = Duration::from_secs(3);
        cfg.reconnect_grace = Duration::from_secs(3);
        cfg.restart_grace = Duration::from_secs(2);
        cfg.client_id_seed = Some(self.rng.next_u64());
        let h = Agent::start(
            cfg,
            opened,
            self.cp.clone(),
            self.net.node(i),
            self.clocks[i].clone(),
        )
        .await
        .map_err(|e| format!("agent n{i}: {e}"))?;
        self.ck.agents.lock()[i] = Some(Arc::new(h));
        Ok(())
    }

    fn crash_agent(&mut self, i: usize) {
        if let Some(a) = self.ck.agents.lock()[i].take() {
            a.kill();
        }
        self.net.crash(i);
    }

    fn start_leader(&mut self) {
        if self.leader.is_some() {
            return;
        }
        self.leaders_started += 1;
        let cfg = LeaderConfig {
            name: format!("leader-{}", self.leaders_started),
            node_timeout: Duration::from_millis(1500),
            replace_after: self.rng.millis(3000, 15000),
            readmit_after: Duration::from_secs(5),
            mutations: self.opts.mutation.map(Mutation::leader).unwrap_or_default(),
        };
        let cp: Arc<dyn ControlPlane> = self.cp.clone();
        let clock = self.leader_clock.clone();
        self.leader = Some(tokio::spawn(async move {
            let mut leader = Leader::new(cp.clone(), clock, cfg);
            let mut changes = cp.changes();
            loop {
                let _ = leader.tick().await;
                tokio::select! {
                    biased;
                    _ = changes.changed() => {}
                    _ = tokio::time::sleep(TICK) => {}
                }
            }
        }));
    }

    fn client_blocks(&self, c: usize, k: usize) -> Vec<u64> {
        let total = (self.clients_n * self.workers_per_client) as u64;
        let me = (c * self.workers_per_client + k) as u64;
        (0..self.blocks).filter(|b| b % total == me).collect()
    }

    async fn start_client(&mut self, c: usize) {
        if self.clients[c].is_some() {
            return;
        }
        let node = self.storage + c;
        self.net.revive(node);
        let cfg = ClientConfig {
            node: format!("client{c}"),
            id_seed: Some(self.rng.next_u64()),
            read_from_w: self.opts.mutation == Some(Mutation::ReadFromW),
            no_dirty_bits: self.opts.mutation == Some(Mutation::NoDirtyBits),
            ..ClientConfig::default()
        };
        let vc = match VolumeClient::attach(self.cp.clone(), self.net.node(node), self.volume, cfg)
            .await
        {
            Ok(vc) => vc,
            Err(e) => {
                self.ck.violate(format!("client {c} cannot attach: {e}"));
                return;
            }
        };
        self.ck.log(format!(
            "client {c} attached as {:08x}",
            vc.client_id() >> 96
        ));
        let mut workers = Vec::new();
        let mut all = Vec::new();
        for k in 0..self.workers_per_client {
            let owned = self.client_blocks(c, k);
            all.extend(owned.iter().copied());
            workers.push(tokio::spawn(worker(
                self.ck.clone(),
                format!("client {c} worker {k}:"),
                vc.clone(),
                owned,
                self.blocks,
                self.rng.fork(),
                self.stop.subscribe(),
            )));
        }
        self.clients[c] = Some(SimClient {
            vc,
            workers,
            blocks: all,
        });
    }

    fn crash_client(&mut self, c: usize) {
        if let Some(mut cl) = self.clients[c].take() {
            for t in cl.workers.drain(..) {
                t.abort();
            }
            self.ck.orphan_writes(&cl.blocks);
            self.ck.forget_ops(&format!("client {c} "));
            drop(cl.vc);
        }
        self.net.crash(self.storage + c);
    }

    /// Whether this run keeps to RAID6's two losses (see `Options::unbounded_losses`).
    fn bounded(&self) -> bool {
        self.opts.raid6 && !self.opts.unbounded_losses
    }

    /// The storage nodes a fault takes away from the volume now (its members' nodes among
    /// them), or `None` for all of them.
    fn cost(&self, f: Fault, members: &BTreeSet<usize>) -> Option<BTreeSet<usize>> {
        let only = |nodes: &[usize]| -> Option<BTreeSet<usize>> {
            Some(
                nodes
                    .iter()
                    .copied()
                    .filter(|n| members.contains(n))
                    .collect(),
            )
        };
        match f {
            Fault::AgentCrash(i) | Fault::NodePowerLoss(i) => only(&[i]),
            Fault::DiskMove { disk, .. } | Fault::DiskErrors(disk) => {
                only(&self.disks[disk].node().into_iter().collect::<Vec<_>>())
            }
            Fault::LeaderCrash | Fault::ClientCrash(_) | Fault::Jitter => Some(BTreeSet::new()),
            Fault::Partition(bits) => {
                let side = |i: usize| bits >> i & 1 == 1;
                let client_sides: BTreeSet<bool> = (0..self.clients_n)
                    .map(|c| side(self.storage + c))
                    .collect();
                match client_sides.into_iter().collect::<Vec<_>>()[..] {
                    // Every client on one side: the members on the other are out of reach.
                    [cs] => only(
                        &(0..self.storage)
                            .filter(|&i| side(i) != cs)
                            .collect::<Vec<_>>(),
                    ),
                    // Clients on both sides: each side loses the other's members.
                    _ => None,
                }
            }
            Fault::OneWay(a, b) => only(&[a, b]),
            Fault::ClusterPowerLoss => None,
        }
    }

    /// Whether fault `id` may start: in a bounded RAID6 run, only if the members out of
    /// reach (not RWL in the topology, or on a node a fault has taken away or just given
    /// back) stay at two or fewer with it. A whole-cluster power loss may strike only a
    /// volume in Normal with no other fault about (the resync that follows re-encodes
    /// every stripe; nothing may strike until it is done).
    fn within_bound(&mut self, id: usize, f: Fault) -> bool {
        if !self.bounded() {
            return true;
        }
        let Some(t) = self.ck.topology() else {
            return true;
        };
        let members: BTreeSet<usize> = t
            .members
            .iter()
            .filter_map(|m| node_index(&m.node))
            .collect();
        let out = self.out_of_reach(&t);
        let cost = self.cost(f, &members);
        let ok = match &cost {
            Some(c) if c.is_empty() => true,
            // Failed, or Resync (parity not trusted yet): nothing more may go.
            _ if matches!(t.phase(), Phase::Failed | Phase::Resync) => false,
            Some(c) => out.union(c).count() <= 2,
            // A whole-cluster power loss, from Normal with nothing else about: the resync
            // puts every torn stripe right. A partition with clients on both sides takes
            // every member away from some client: beyond two losses.
            None => {
                matches!(f, Fault::ClusterPowerLoss) && t.phase() == Phase::Normal && out.is_empty()
            }
        };
        if !ok {
            self.ck.log(format!(
                "skipped: {f:?} would take a third member away (RAID6 keeps to two losses; out of reach now: {out:?})"
            ));
            self.bound.skipped.insert(id);
            return false;
        }
        self.bound
            .active
            .insert(id, cost.unwrap_or_else(|| (0..self.storage).collect()));
        true
    }

    /// Fault `id` has healed: its nodes cool down.
    fn healed(&mut self, id: usize) {
        if let Some(nodes) = self.bound.active.remove(&id) {
            self.bound
                .cooling
                .push((tokio::time::Instant::now(), nodes));
        }
    }

    /// The storage nodes out of reach now for the RAID6 bound: those of members that are
    /// not RWL, and those a fault has taken away or given back a short while ago.
    fn out_of_reach(&mut self, t: &Topology) -> BTreeSet<usize> {
        let now = tokio::time::Instant::now();
        self.bound
            .cooling
            .retain(|(at, _)| now.duration_since(*at) < COOL_DOWN);
        let mut out: BTreeSet<usize> = t
            .members
            .iter()
            .filter(|m| m.role != Role::Rwl)
            .filter_map(|m| node_index(&m.node))
            .collect();
        for nodes in self.bound.active.values() {
            out.extend(nodes);
        }
        for (_, nodes) in &self.bound.cooling {
            out.extend(nodes);
        }
        out
    }

    /// Where unplugged disk `disk` goes back in: `to`, unless in a bounded RAID6 run the
    /// restart of `to`'s agent would take a third member away; then back home.
    fn move_target(&mut self, disk: usize, to: usize) -> usize {
        let Some(&home) = self.bound.home.get(&disk) else {
            return to;
        };
        if !self.bounded() || to == home {
            return to;
        }
        let Some(t) = self.ck.topology() else {
            return to;
        };
        if !t.members.iter().any(|m| node_index(&m.node) == Some(to)) {
            return to;
        }
        let mut out = self.out_of_reach(&t);
        out.insert(to);
        if out.len() <= 2 {
            return to;
        }
        self.ck.log(format!(
            "disk{disk} goes back to n{home}, not n{to}: restarting n{to} would take a third member away"
        ));
        home
    }

    fn plan(&mut self) -> Vec<(Duration, Step)> {
        let chaos = self.opts.chaos;
        let n = 2 + self.rng.below(5);
        let mut steps = Vec::new();
        // Swarm testing: each run draws from its own subset of fault kinds.
        let kinds: Vec<u64> = (0..10).filter(|_| self.rng.chance(0.6)).collect();
        if kinds.is_empty() {
            return steps;
        }
        for id in 0..n {
            let at = self.rng.millis(1000, chaos.as_millis() as u64);
            let dur = self.rng.millis(300, 8000);
            let s = self.storage;
            let f = match kinds[self.rng.index(kinds.len())] {
                0 => Fault::AgentCrash(self.rng.index(s)),
                1 => Fault::NodePowerLoss(self.rng.index(s)),
                2 => Fault::DiskMove {
                    disk: self.rng.index(s),
                    to: self.rng.index(s),
                },
                3 => Fault::DiskErrors(self.rng.index(s)),
                4 => Fault::LeaderCrash,
                5 => Fault::ClientCrash(self.rng.index(self.clients_n)),
                6 => Fault::Partition(self.rng.next_u64()),
                7 => Fault::OneWay(
                    self.rng.index(s + self.clients_n),
                    self.rng.index(s + self.clients_n),
                ),
                8 => Fault::Jitter,
                _ => {
                    if self.rng.chance(0.3) {
                        Fault::ClusterPowerLoss
                    } else {
                        Fault::Jitter
                    }
                }
            };
            steps.push((at, Step::Start(id as usize, f)));
            steps.push((at + dur, Step::Heal(id as usize, f)));
        }
        steps.sort_by_key(|(t, _)| *t);
        steps
    }

    async fn chaos(&mut self) {
        let start = tokio::time::Instant::now();
        let steps = self.plan();
        for (at, step) in steps {
            tokio::time::sleep_until(start + at).await;
            if self.ck.violation().is_some() {
                return;
            }
            match step {
                Step::Start(id, f) => {
                    if self.within_bound(id, f) {
                        self.inject(f).await;
                    }
                }
                Step::Heal(id, f) => {
                    if !self.bound.skipped.contains(&id) {
                        self.heal(f).await;
                        self.healed(id);
                    }
                }
            }
        }
        tokio::time::sleep_until(start + self.opts.chaos).await;
    }

    async fn inject(&mut self, f: Fault) {
        let total = self.storage + self.clients_n;
        match f {
            Fault::AgentCrash(i) => {
                self.ck.fault("agent-crash", format!("agent n{i} crashes"));
                self.crash_agent(i);
            }
            Fault::NodePowerLoss(i) => {
                self.ck
                    .fault("node-power-loss", format!("node n{i} loses power"));
                // When fewer than a readable set of members (RAID1: one, RAID6: k) live on
                // other running nodes, this node held part of the only readable copy of
                // some writes: like a single disk, it keeps only flushed ones.
                let me = node_name(i);
                let other_copy = self.ck.topology().is_some_and(|t| {
                    t.members
                        .iter()
                        .filter(|m| {
                            m.role == Role::Rwl
                                && m.node != me
                                && (0..self.storage).any(|j| {
                                    node_name(j) == m.node && self.ck.agents.lock()[j].is_some()
                                })
                        })
                        .count()
                        >= t.layout.min_readable()
                });
                self.crash_agent(i);
                self.boots[i] += 1;
                for d in self.disks.iter().filter(|d| d.node() == Some(i)) {
                    let seed = self.rng.next_u64();
                    d.dev.power_loss(PowerLoss::Tear { seed });
                }
                if !other_copy {
                    self.ck.log(format!(
                        "n{i} held the only readable copy: only flushed writes must survive"
                    ));
                    self.ck.power_lost();
                }
            }
            Fault::DiskMove { disk, .. } => {
                if let Some(from) = self.disks[disk].node() {
                    self.bound.home.insert(disk, from);
                    self.ck
                        .fault("disk-loss", format!("disk{disk} unplugged from n{from}"));
                    *self.disks[disk].at.lock() = None;
                }
            }
            Fault::DiskErrors(d) => {
                let faults = toma_agent::Faults {
                    fail_reads: self.rng.chance(0.5),
                    fail_writes: true,
                    fail_flush: self.rng.chance(0.5),
                    vanished: false,
                };
                self.ck
                    .fault("disk-io-errors", format!("disk{d} returns I/O errors"));
                self.disks[d].dev.set_faults(faults);
            }
            Fault::LeaderCrash => {
                if let Some(l) = self.leader.take() {
                    self.ck.fault("leader-crash", "the leader crashes");
                    l.abort();
                }
            }
            Fault::ClientCrash(c) => {
                if self.clients[c].is_some() {
                    self.ck
                        .fault("client-crash", format!("client {c} crashes (locks held)"));
                    self.crash_client(c);
                }
            }
            Fault::Partition(bits) => {
                let side: Vec<bool> = (0..total).map(|i| bits >> i & 1 == 1).collect();
                let a: Vec<usize> = (0..total).filter(|&i| side[i]).collect();
                self.ck
                    .fault("partition", format!("partition {a:?} | rest"));
                for i in 0..total {
                    for j in 0..total {
                        if side[i] != side[j] {
                            self.net.cut(i, j);
                        }
                    }
                }
            }
            Fault::OneWay(a, b) => {
                if a != b {
                    self.ck.fault(
                        "one-way-link",
                        format!("frames from node {a} to node {b} are lost"),
                    );
                    self.net.cut(a, b);
                }
            }
            Fault::Jitter => {
                self.ck.fault(
                    "message-delay",
                    if self.bounded() {
                        "long delays (within the request timeout) and duplicates"
                    } else {
                        "long delays (past the request timeout) and duplicates"
                    },
                );
                let mut p = self.calm;
                p.delay_max_us = p.delay_max_us.max(5000);
                p.spike = 0.01;
                // Past the request timeout (3 s) a delay makes a member unreachable, to any
                // number of clients at once: the RAID6 bound keeps spikes below it.
                p.spike_max_ms = if self.bounded() { 1000 } else { 6000 };
                p.dup = 0.01;
                self.net.set_params(p);
            }
            Fault::ClusterPowerLoss => {
                self.ck
                    .fault("cluster-power-loss", "the whole cluster loses power");
                for c in 0..self.clients_n {
                    self.crash_client(c);
                }
                if let Some(l) = self.leader.take() {
                    l.abort();
                }
                for i in 0..self.storage {
                    self.crash_agent(i);
                    self.boots[i] += 1;
                }
                for d in &self.disks {
                    let seed = self.rng.next_u64();
                    d.dev.power_loss(PowerLoss::Tear { seed });
                }
                self.ck.power_lost();
            }
        }
    }

    async fn heal(&mut self, f: Fault) {
        let total = self.storage + self.clients_n;
        match f {
            Fault::AgentCrash(i) | Fault::NodePowerLoss(i) => {
                self.ck.log(format!("heal: agent n{i} restarts"));
                self.restart(i).await;
            }
            Fault::DiskMove { disk, to } => {
                let to = self.move_target(disk, to);
                if self.disks[disk].node().is_none() {
                    let fault = if to == disk {
                        "disk-replug"
                    } else {
                        "disk-move"
                    };
                    self.ck
                        .fault(fault, format!("disk{disk} plugged into n{to}"));
                    *self.disks[disk].at.lock() = Some(to);
                    // The node's agent picks it up when it (re)starts.
                    self.crash_agent(to);
                    self.restart(to).await;
                }
            }
            Fault::DiskErrors(d) => {
                self.ck.log(format!("heal: disk{d} answers again"));
                self.disks[d].dev.set_faults(toma_agent::Faults::default());
                if let Some(n) = self.disks[d].node() {
                    self.crash_agent(n);
                    self.restart(n).await;
                }
            }
            Fault::LeaderCrash => {
                self.ck.log("heal: a new leader takes over");
                self.start_leader();
            }
            Fault::ClientCrash(c) => {
                self.ck.log(format!("heal: client {c} restarts"));
                self.start_client(c).await;
            }
            Fault::Partition(bits) => {
                let side: Vec<bool> = (0..total).map(|i| bits >> i & 1 == 1).collect();
                self.ck.log("heal: partition ends");
                for i in 0..total {
                    for j in 0..total {
                        if side[i] != side[j] {
                            self.net.heal(i, j);
                        }
                    }
                }
            }
            Fault::OneWay(a, b) => {
                self.ck.log(format!("heal: link {a} -> {b} works again"));
                self.net.heal(a, b);
            }
            Fault::Jitter => {
                self.ck.log("heal: network calm again");
                self.net.set_params(self.calm);
            }
            Fault::ClusterPowerLoss => {
                self.ck.log("heal: power is back");
                for i in 0..self.storage {
                    self.restart(i).await;
                }
                self.start_leader();
                for c in 0..self.clients_n {
                    self.start_client(c).await;
                }
            }
        }
    }

    async fn restart(&mut self, i: usize) {
        if let Err(e) = self.start_agent(i).await {
            self.ck.log(format!("agent n{i} does not start: {e}"));
        }
    }

    /// Ends every fault, then P6: back in Normal within a bound, every held write done,
    /// mirrors identical, superblocks in line with the control plane.
    async fn heal_and_check(&mut self) {
        self.ck.log("healing: every fault ends now");
        self.net.heal_all();
        self.net.set_params(self.calm);
        if self.bounded() {
            // Moving a disk home is one more loss: not while a resync has parity untrusted.
            let since = tokio::time::Instant::now();
            while self
                .ck
                .topology()
                .is_some_and(|t| t.phase() == Phase::Resync)
                && since.elapsed() < Duration::from_secs(120)
            {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
        for d in 0..self.disks.len() {
            // The operator's part: a disk unplugged goes back home, and so does one moved to
            // a node that holds another disk too (two members of a volume cannot be served
            // from one node; left there, the volume could not get back to Normal).
            let piled = self.disks[d].node().is_some_and(|n| {
                n != d && self.disks.iter().filter(|o| o.node() == Some(n)).count() > 1
            });
            if piled {
                if let Some(n) = self.disks[d].node() {
                    self.ck
                        .log(format!("heal: disk{d} moved back from n{n} to n{d}"));
                    self.crash_agent(n);
                }
            }
            if self.disks[d].node().is_none() || piled {
                *self.disks[d].at.lock() = Some(d);
                self.crash_agent(d);
            }
            if self.disks[d].dev.faults() != toma_agent::Faults::default() {
                self.disks[d].dev.set_faults(toma_agent::Faults::default());
                if let Some(n) = self.disks[d].node() {
                    self.crash_agent(n);
                }
            }
        }
        for i in 0..self.storage {
            self.restart(i).await;
        }
        self.start_leader();
        for c in 0..self.clients_n {
            self.start_client(c).await;
        }
        // Frames delayed before the healing are still on their way: the last fault ends
        // when they have landed.
        tokio::time::sleep(Duration::from_secs(7)).await;
        let healed = tokio::time::Instant::now();
        let bound = Duration::from_secs(120);
        // P6: Normal, every member synced.
        let t = loop {
            if self.ck.violation().is_some() {
                return;
            }
            if let Some(t) = self.ck.topology() {
                if t.phase() == Phase::Normal && self.all_synced(&t).await {
                    break t;
                }
            }
            if healed.elapsed() > bound {
                let t = self
                    .ck
                    .topology()
                    .map(|t| t.to_string())
                    .unwrap_or_default();
                self.ck.violate(format!(
                    "P6 liveness: not back in Normal with every member synced {bound:?} after the last fault; topology {t}"
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        self.ck.log(format!(
            "healed: Normal at generation {} after {:.1}s",
            t.generation,
            healed.elapsed().as_secs_f64()
        ));
        // Every held write completes.
        self.stop.send_replace(true);
        let drained = tokio::time::Instant::now();
        loop {
            let busy = self
                .clients
                .iter()
                .flatten()
                .any(|c| c.workers.iter().any(|w| !w.is_finished()));
            if !busy {
                break;
            }
            if drained.elapsed() > Duration::from_secs(60) {
                self.ck.violate(format!(
                    "P6 liveness: workload operations did not complete within 60s after healing: {}; locks {}",
                    self.ck.pending_ops().join("; "),
                    self.ck.describe_locks()
                ));
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // Let stale-lock recovery and unlocks settle.
        tokio::time::sleep(Duration::from_secs(5)).await;
        let Some(t) = self.ck.topology() else { return };
        if t.phase() != Phase::Normal {
            self.ck.violate(format!(
                "P6 liveness: the volume left Normal with no fault: {t}"
            ));
            return;
        }
        self.final_checks(&t);
    }

    async fn all_synced(&self, t: &Topology) -> bool {
        let Ok(statuses) = self.cp.member_statuses(t.volume).await else {
            return false;
        };
        t.members.iter().all(|m| {
            statuses
                .iter()
                .any(|s| s.disk == m.disk && s.node == m.node && s.synced >= t.generation)
        })
    }

    fn final_checks(&self, t: &Topology) {
        let agents = self.ck.agents.lock().clone();
        let mut contents: Vec<(usize, Vec<u8>)> = Vec::new();
        for (i, m) in t.members.iter().enumerate() {
            let hosted = node_index(&m.node)
                .and_then(|n| agents.get(n).cloned().flatten())
                .and_then(|a| {
                    a.members()
                        .into_iter()
                        .find(|x| x.volume == t.volume && x.disk.id() == m.disk)
                });
            let Some(hm) = hosted else {
                self.ck.violate(format!(
                    "P6: member {i} ({}) is not hosted by the agent of {}",
                    m.disk, m.node
                ));
                return;
            };
            // Superblock in line with the control plane.
            match hm.disk.extent(t.volume, i) {
                Some(e)
                    if e.generation == t.generation
                        && e.state == MemberState::Member(Role::Rwl) => {}
                other => {
                    self.ck.violate(format!(
                        "superblock: member {i} on {} records {:?}, the control plane says generation {} RWL",
                        m.disk, other.map(|e| (e.generation, e.state)), t.generation
                    ));
                    return;
                }
            }
            let spec = VolumeSpec {
                layout: t.layout,
                chunk_size: t.chunk_size,
                size: self.volume_size,
            };
            let mut buf = vec![0u8; spec.member_bytes() as usize];
            if let Err(e) = hm.disk.read_member(t.volume, i, 0, &mut buf) {
                self.ck
                    .violate(format!("P4: member {i} cannot be read: {e}"));
                return;
            }
            contents.push((i, buf));
        }
        // RAID6: P and Q right on every stripe; then P1 on the stripes' data.
        if t.layout.is_raid6() {
            match toma_client::raid6::verify_members(t, &contents) {
                Ok(data) => {
                    self.check_final_data(&data, "parity consistent on every stripe");
                }
                Err(e) => self.ck.violate(format!(
                    "P4 convergence: in Normal and idle, RAID6 parity is wrong: {e}"
                )),
            }
            return;
        }
        // P4: mirrors identical.
        for (i, c) in &contents[1..] {
            if let Some(pos) = c.iter().zip(&contents[0].1).position(|(a, b)| a != b) {
                let b = (pos / BLOCK) as u64;
                let v0 =
                    crate::verify::decode_block(b, &contents[0].1[b as usize * BLOCK..][..BLOCK]);
                let vi = crate::verify::decode_block(b, &c[b as usize * BLOCK..][..BLOCK]);
                self.ck.violate(format!(
                    "P4 convergence: in Normal and idle, member {i} differs from member 0 at block {b} (versions {vi:?} vs {v0:?})"
                ));
                return;
            }
        }
        self.check_final_data(&contents[0].1, "mirrors identical");
    }

    /// P1 on the volume's final contents (`data`: its bytes in volume order).
    fn check_final_data(&self, contents: &[u8], converged: &str) {
        for b in 0..self.blocks {
            let data = &contents[b as usize * BLOCK..][..BLOCK];
            let (lo, hi) = self.ck.expected_range(b);
            match crate::verify::decode_block(b, data) {
                Some(v) if v >= lo && v <= hi => {}
                v => {
                    self.ck.violate(format!(
                        "P1 durability: after healing block {b} holds {v:?}, expected {lo}..={hi}"
                    ));
                    return;
                }
            }
        }
        self.ck.log(format!(
            "final checks passed: {converged}, every block as acknowledged"
        ));
        let _ = self.seed;
    }
}

/// One workload task: writes the blocks it owns, reads any block, flushes now and then.
async fn worker(
    ck: Arc<Checker>,
    me: String,
    vc: VolumeClient,
    owned: Vec<u64>,
    blocks: u64,
    mut rng: Rng,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    if owned.is_empty() {
        return;
    }
    loop {
        if *stop.borrow() {
            return;
        }
        tokio::time::sleep(rng.millis(5, 60)).await;
        let r = rng.unit();
        if r < 0.5 {
            let b = owned[rng.index(owned.len())];
            let v = ck.begin_write(b);
            let op = ck.op_begin(format!("{me} write of block {b} v{v}"));
            let res = vc
                .write(b * BLOCK as u64, Bytes::from(block_bytes(b, v)))
                .await;
            ck.end_write(b, v, res.is_ok());
            ck.op_end(op);
            if let Err(e) = res {
                ck.violate(format!("P6: a write of block {b} failed: {e}"));
            }
        } else if r < 0.55 {
            let snap = ck.flush_begin();
            let op = ck.op_begin(format!("{me} flush"));
            let res = vc.flush().await;
            ck.op_end(op);
            match res {
                Ok(()) => ck.flush_end(snap),
                Err(e) => ck.violate(format!("P6: a flush failed: {e}")),
            }
        } else {
            let b = rng.below(blocks);
            let tok = ck.begin_read(b);
            let op = ck.op_begin(format!("{me} read of block {b}"));
            let res = vc.read(b * BLOCK as u64, BLOCK).await;
            ck.op_end(op);
            match res {
                Ok(data) => ck.end_read(tok, &data),
                Err(e) => ck.violate(format!("P6: a read of block {b} failed: {e}")),
            }
        }
    }
}
