//! The state machine: a leader, one TOMA per member disk, the disks, clients and the
//! in-flight messages between them. Every placement and planning decision is asked of
//! `toma_core`; this file only moves messages and keeps the history the properties need.

use std::hash::{Hash, Hasher};
use std::sync::Arc;

use stateright::{Model, Property};
use toma_core::placement::{raid6_data_member, raid6_parity_members, raid6_read, Raid6Read};
use toma_core::{
    clears_dirty, locks, plan_with, read_member, sets_dirty, write_members, DiskId, Knowledge,
    Layout, LockMode, MemberReport, Mutations, NodeId, Phase, Plan, Replacement, Role, Topology,
    VolumeId,
};

/// A topology generation (small in the model).
pub type Gen = u8;
/// Lock units the state has room for. RAID1 uses chunks 0 and 1, so both interleaved homes
/// are exercised; RAID6 uses stripe 0 (its lock place is always the rebuilder's member, see
/// the crate docs).
pub const CHUNKS: usize = 2;
/// Most RAID6 data chunks per stripe the model holds (4+2).
pub const K: usize = 4;
/// Most members a modelled volume has (RAID6 4+2).
pub const MAX_MEMBERS: usize = K + 2;
/// Blocks the history tracks: RAID1 chunk b is block b; RAID6 data chunk j of stripe 0 is
/// block j.
pub const BLOCKS: usize = 4;
/// What a NEW disk holds before the rebuild: no write ever wrote it.
pub const GARBAGE: u8 = 0xFF;
/// What a RAID6 decode returns when the chunks and parities it used do not agree (data from
/// different writes mixed): no write wrote it.
pub const MIX: u8 = 0xFE;

/// What a member holds of one lock unit, abstractly: the write id (version) of each data
/// chunk it covers. RAID1: `[v, 0, 0, 0]`. RAID6: data member of chunk j holds `v` at `j` and
/// 0 elsewhere; P and Q hold the versions of the k data chunks they were computed from
/// (parity "consistent with" those versions).
pub type Cell = [u8; K];
/// The actor id of the rebuilding TOMA's local client (clients are `0..clients`).
pub const REBUILDER: u8 = 0xF0;

/// A deliberate bug, to prove the checker can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Mutation {
    /// Rebuilding goes straight to Normal (`toma_core::Mutations::skip_dual_lock`).
    SkipDualLock,
    /// Degraded writes set no dirty bit (the model's wrapper around `sets_dirty`).
    NoDirtyBits,
    /// Reads may go to a `W` member (the model's wrapper around `read_member`).
    ReadFromW,
    /// The leader moves to g+1 before every client acknowledged g
    /// (`toma_core::Mutations::early_advance`).
    EarlyAdvance,
}

impl Mutation {
    pub const ALL: [Mutation; 4] = [
        Mutation::SkipDualLock,
        Mutation::NoDirtyBits,
        Mutation::ReadFromW,
        Mutation::EarlyAdvance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::SkipDualLock => "skip-dual-lock",
            Mutation::NoDirtyBits => "no-dirty-bits",
            Mutation::ReadFromW => "read-from-w",
            Mutation::EarlyAdvance => "early-advance",
        }
    }

    pub fn parse(s: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// The bounds of one model run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    pub clients: usize,
    /// Writes each client issues (one at a time).
    pub writes: u8,
    /// Reads the last client issues (the others only write: reads multiply the state space).
    pub reads: u8,
    /// Disk failures per run (each followed by the disk's return or replacement).
    pub failures: u8,
    /// Leader crashes per run.
    pub leader_crashes: u8,
    /// Client↔TOMA connection drops per run (the messages on it are lost; the TOMA fences).
    pub drops: u8,
    /// Whether a failed disk may come back as a NEW disk (garbage contents, full rebuild).
    pub replacement: bool,
    /// RAID6 only: data members k (2 to 4; the volume has k + 2 members).
    pub data_members: u8,
    /// Whether the disk of stripe/chunk 0's home (member 0, its lock place in Normal) may
    /// fail (see the crate docs).
    pub fail_lock_place: bool,
    /// Stop after this many transitions (a bounded, not exhaustive, run).
    pub max_states: Option<usize>,
    pub mutation: Option<Mutation>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            clients: 2,
            writes: 1,
            reads: 1,
            failures: 1,
            leader_crashes: 0,
            drops: 0,
            replacement: true,
            data_members: 2,
            fail_lock_place: true,
            max_states: None,
            mutation: None,
        }
    }
}

fn bit(i: usize) -> u8 {
    1u8 << i
}

/// A datapath request (client or rebuilder → a member's TOMA).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Req {
    Lock(u8),
    /// Write `data` (if any) and set the dirty bits `dirty` (a mask of target members).
    Write {
        chunk: u8,
        data: Option<Cell>,
        dirty: u8,
    },
    /// Release the lock (if held by the sender) and clear the dirty bits `clear`.
    Unlock {
        chunk: u8,
        clear: u8,
    },
    /// READ_TEST_LOCK: answered while the chunk is not locked by someone else.
    Read(u8),
    /// A plain READ (no lock test): a RAID6 writer's read of the old stripe under its lock,
    /// a RAID6 reader's reads under the stripe's locks, or a RAID6 read of a data chunk from
    /// its data member (which needs no lock test).
    Get(u8),
}

/// A TOMA → client message.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Resp {
    SwitchTopo(Gen),
    LockOk,
    /// A lock or read that waited on a lock is bounced: the TOMA moved to a newer generation.
    Retry(Gen),
    Done,
    ReadOk(Cell),
    /// FENCED / stale generation / member DEAD: never applied.
    Rejected,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Msg {
    Req {
        from: u8,
        to: u8,
        gen: Gen,
        req: Req,
    },
    Resp {
        from: u8,
        to: u8,
        resp: Resp,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Conn {
    Ok,
    Broken,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum OpKind {
    Write(u8),
    Read,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    Lock,
    /// RAID6 read-modify-write: read the stripe's untouched data chunks (directly or by
    /// reconstruction) under the lock.
    ReadOld,
    Write,
    /// After the write was acknowledged: clear bits and unlock.
    Unlock,
    Read,
    /// Failed topology: nothing to send until a newer one.
    Blocked,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Op {
    pub kind: OpKind,
    /// The lock unit (RAID1 chunk, RAID6 stripe).
    pub chunk: u8,
    /// The blocks it writes (a write) or reads (a read: one bit).
    pub blocks: u8,
    /// RAID6: cells read in the current Read/ReadOld stage, by member, and which arrived.
    pub cells: [Cell; MAX_MEMBERS],
    pub got: u8,
    /// RAID6 writer: the stripe's new data versions (computed after ReadOld).
    pub vec: Cell,
    /// RAID6 writer: `vec` was computed under locks it still holds. A redo under a newer
    /// generation writes it again without reading the stripe (the client's `OldColumns`):
    /// read again, the stripe can mix its own first attempt with the old data.
    pub cached: bool,
    /// The generation the current stage was issued under.
    pub gen: Gen,
    pub stage: Stage,
    /// Members with a request in flight.
    pub pending: u8,
    /// Members that still need the current stage's request (connection not usable yet).
    pub todo: u8,
    /// Members on which this op holds the chunk lock (as the client believes).
    pub held: u8,
    /// Locks acquired by this op ever (for the trace only).
    pub clear: u8,
    /// P1: the value this read must return, if some write is stable.
    pub expect: Option<u8>,
    /// P2: no write to the chunk in flight since this read started.
    pub quiet: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Client {
    pub gen: Gen,
    pub conn: Vec<Conn>,
    pub op: Option<Op>,
    pub writes_done: u8,
    pub reads_done: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RebuildOp {
    pub chunk: u8,
    pub gen: Gen,
    pub pending: u8,
    pub ok: u8,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Toma {
    pub up: bool,
    pub gen: Gen,
    /// Lock table: holder per chunk.
    pub locks: [Option<u8>; CHUNKS],
    /// Per chunk, the mask of target members whose bit is set.
    pub dirty: [u8; CHUNKS],
    pub registered: Vec<bool>,
    pub acked: Vec<Gen>,
    pub rebuild: Option<RebuildOp>,
}

impl Toma {
    fn fresh(gen: Gen, clients: usize, registered: bool) -> Toma {
        Toma {
            up: true,
            gen,
            locks: [None; CHUNKS],
            dirty: [0; CHUNKS],
            registered: vec![registered; clients],
            acked: vec![if registered { gen } else { 0 }; clients],
            rebuild: None,
        }
    }
    fn down() -> Toma {
        Toma {
            up: false,
            gen: 0,
            locks: [None; CHUNKS],
            dirty: [0; CHUNKS],
            registered: Vec::new(),
            acked: Vec::new(),
            rebuild: None,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Disk {
    pub up: bool,
    /// 0: the original disk; 1: a NEW disk that replaced it.
    pub incarnation: u8,
    pub data: [Cell; CHUNKS],
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Prop {
    P1,
    P2,
    P3,
    Planner,
    /// RAID6: a writer could not read the old stripe it must recompute parity from (a value
    /// no write wrote, or from a member that cannot be decoded).
    Rmw,
}

/// A property violation observed on a transition (P1–P3 are about read results).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Viol {
    pub prop: Prop,
    pub client: u8,
    pub chunk: u8,
    pub got: u8,
    pub want: Option<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct History {
    /// Per block: mask of write ids that started (bit id).
    pub started: [u16; BLOCKS],
    /// Per block: mask of write ids in flight (started, not acknowledged).
    pub inflight: [u16; BLOCKS],
    /// Per block: the acknowledged write every later read must return (P1).
    pub stable: [Option<u8>; BLOCKS],
    /// Per block: the value a quiet read returned (P2).
    pub quiet_val: [Option<u8>; BLOCKS],
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Leader {
    /// The Lease epoch of the current leader.
    pub epoch: u8,
    /// A topology computed but not yet written.
    pub pending: Option<Topology>,
    /// A deposed leader's unwritten topology and the epoch it held.
    pub zombie: Option<(u8, Topology)>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// The control plane: every topology published so far (index g-1); the last is current.
    pub topos: Arc<Vec<Topology>>,
    pub lease_epoch: u8,
    pub leader: Leader,
    pub tomas: Vec<Toma>,
    pub disks: Vec<Disk>,
    pub clients: Vec<Client>,
    /// In-flight messages: a multiset, kept sorted.
    pub net: Vec<Msg>,
    pub hist: History,
    pub violation: Option<Viol>,
    pub failures_left: u8,
    pub crashes_left: u8,
    pub drops_left: u8,
}

/// A compact fingerprint of a topology (node names never change in the model).
fn hash_topology<H: Hasher>(t: &Topology, h: &mut H) {
    t.generation.hash(h);
    for m in &t.members {
        (m.role as u8, m.full_rebuild, m.last_good, m.disk.0 as u64).hash(h);
    }
    (t.lock_mode == LockMode::DualLock, t.rebuild).hash(h);
}

impl Hash for State {
    fn hash<H: Hasher>(&self, h: &mut H) {
        self.topos.len().hash(h);
        for t in self.topos.iter() {
            hash_topology(t, h);
        }
        self.lease_epoch.hash(h);
        self.leader.epoch.hash(h);
        match &self.leader.pending {
            Some(t) => {
                1u8.hash(h);
                hash_topology(t, h);
            }
            None => 0u8.hash(h),
        }
        match &self.leader.zombie {
            Some((e, t)) => {
                e.hash(h);
                hash_topology(t, h);
            }
            None => 0xFFu8.hash(h),
        }
        self.tomas.hash(h);
        self.disks.hash(h);
        self.clients.hash(h);
        self.net.hash(h);
        self.hist.hash(h);
        self.violation.hash(h);
        (self.failures_left, self.crashes_left, self.drops_left).hash(h);
    }
}

impl State {
    pub fn store_gen(&self) -> Gen {
        self.topos.len() as Gen
    }
    pub fn current(&self) -> &Topology {
        &self.topos[self.topos.len() - 1]
    }
    pub fn topo(&self, g: Gen) -> &Topology {
        let i = usize::from(g.max(1)) - 1;
        &self.topos[i.min(self.topos.len() - 1)]
    }
    fn send(&mut self, m: Msg) {
        let pos = self.net.partition_point(|x| x < &m);
        self.net.insert(pos, m);
    }
    fn reply(&mut self, from: usize, to: u8, resp: Resp) {
        self.send(Msg::Resp {
            from: from as u8,
            to,
            resp,
        });
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action {
    /// `target` indexes `TomaModel::write_targets`.
    StartWrite {
        client: u8,
        target: u8,
    },
    /// `target` indexes `TomaModel::read_targets`.
    StartRead {
        client: u8,
        target: u8,
    },
    Deliver(Msg),
    TomaLearn(u8),
    RebuildChunk {
        member: u8,
        chunk: u8,
    },
    LeaderPublish,
    LeaderCrash,
    ZombieWrite,
    FailDisk(u8),
    /// Two disks fail in one step (RAID6): the leader sees both lost at once.
    FailTwo(u8, u8),
    ReturnDisk {
        member: u8,
        new_disk: bool,
    },
    DropConn {
        client: u8,
        member: u8,
    },
}

/// The model of one volume: RAID1 (two mirrors) or RAID6 4+2.
pub struct TomaModel {
    pub cfg: Config,
    pub initial: Topology,
    nodes: Vec<NodeId>,
    raid6: bool,
    /// What writes and reads may target: (lock unit, mask of blocks).
    writes: Vec<(u8, u8)>,
    reads: Vec<(u8, u8)>,
}

pub fn node(i: usize) -> NodeId {
    NodeId(format!("node{i}"))
}

fn disk_id(i: usize, incarnation: u8) -> DiskId {
    DiskId(((i as u128 + 1) << 96) | u128::from(incarnation))
}

impl TomaModel {
    pub fn raid1(cfg: Config) -> Result<TomaModel, String> {
        let layout = Layout::raid1(2).map_err(|e| e.to_string())?;
        Self::build(cfg, layout)
    }

    /// RAID6 k+2: one stripe (lock unit 0), its data chunk 0 written alone (read-modify-write)
    /// or all k at once (a whole-stripe write), chunks 0 and 1 read.
    pub fn raid6(cfg: Config) -> Result<TomaModel, String> {
        if !(2..=K as u8).contains(&cfg.data_members) {
            return Err(format!(
                "--data-members {}: the RAID6 model supports 2 to {K} data members",
                cfg.data_members
            ));
        }
        let layout = Layout::raid6(cfg.data_members).map_err(|e| e.to_string())?;
        Self::build(cfg, layout)
    }

    fn build(cfg: Config, layout: Layout) -> Result<TomaModel, String> {
        let n = layout.members();
        let disks = (0..n).map(|i| (disk_id(i, 0), node(i))).collect();
        let initial =
            Topology::new_normal(VolumeId(1), layout, 65536, disks).map_err(|e| e.to_string())?;
        if cfg.clients == 0 || cfg.clients > 3 {
            return Err(format!(
                "--clients {}: the model supports 1 to 3 clients",
                cfg.clients
            ));
        }
        if cfg.failures > 2 {
            return Err(format!(
                "--failures {}: the model supports 0 to 2 disk failures per run",
                cfg.failures
            ));
        }
        if cfg.writes > 4 {
            return Err(format!(
                "--writes {}: the model supports 0 to 4 writes per client",
                cfg.writes
            ));
        }
        let raid6 = layout.is_raid6();
        let (writes, reads) = if raid6 {
            let full = (1u8 << layout.min_readable()) - 1;
            // Chunk 0 by read-modify-write or the whole stripe; chunk 1 is read, and
            // reconstructed while its member is DEAD or W, during writes of chunk 0.
            (vec![(0, 0b01), (0, full)], vec![(0, 0b01), (0, 0b10)])
        } else {
            (vec![(0, 0b01), (1, 0b10)], vec![(0, 0b01), (1, 0b10)])
        };
        Ok(TomaModel {
            cfg,
            initial,
            nodes: (0..n).map(node).collect(),
            raid6,
            writes,
            reads,
        })
    }

    fn n(&self) -> usize {
        self.initial.n()
    }

    pub fn is_raid6(&self) -> bool {
        self.raid6
    }

    /// What a write may target: (lock unit, mask of blocks). RAID1: chunk 0 or 1. RAID6:
    /// data chunk 0 or 1 of stripe 0 (read-modify-write) or the whole stripe.
    pub fn write_targets(&self) -> &[(u8, u8)] {
        &self.writes
    }

    /// What a read may target: (lock unit, block bit).
    pub fn read_targets(&self) -> &[(u8, u8)] {
        &self.reads
    }

    /// RAID6 data chunks per stripe (1 for RAID1).
    pub fn k(&self) -> usize {
        self.initial.layout.min_readable()
    }

    /// The blocks of a whole lock unit.
    pub fn full_mask(&self) -> u8 {
        (1u8 << self.k()) - 1
    }

    /// The lock units in use.
    pub fn units(&self) -> u8 {
        if self.raid6 {
            1
        } else {
            CHUNKS as u8
        }
    }

    /// The position of block `b` inside its unit's cell.
    fn pos(&self, b: usize) -> usize {
        if self.raid6 {
            b % self.k()
        } else {
            0
        }
    }

    /// Whether a write of `blocks` covers its whole lock unit (only then may it clear bits).
    fn whole_unit(&self, blocks: u8) -> bool {
        !self.raid6 || blocks == self.full_mask()
    }

    // ---- RAID6 stripe contents (abstract P/Q) ----

    /// What member `m` holds of stripe `unit` when the stripe's data versions are `vec`.
    fn cell_for(&self, t: &Topology, unit: u8, m: usize, vec: Cell) -> Cell {
        if !self.raid6 {
            return vec;
        }
        match (0..self.k()).find(|&j| raid6_data_member(t, u64::from(unit), j) == m) {
            Some(j) => {
                let mut c = [0; K];
                c[j] = vec[j];
                c
            }
            None => vec,
        }
    }

    /// Decodes data chunk `j` of stripe `unit` from the cells of the members in `got`: read
    /// directly from its data member when that is among them, otherwise solved from the
    /// other data chunks and as many parities as chunks are missing. Parities computed from
    /// other versions than the data read (or P and Q from different versions) give `MIX`.
    pub fn decode(&self, t: &Topology, unit: u8, got: u8, cells: &[Cell], j: usize) -> u8 {
        let s = u64::from(unit);
        let dm = |i: usize| raid6_data_member(t, s, i);
        if got & bit(dm(j)) != 0 {
            return cells[dm(j)][j];
        }
        let missing: Vec<usize> = (0..self.k()).filter(|&i| got & bit(dm(i)) == 0).collect();
        let (p, q) = raid6_parity_members(t, s);
        let pars: Vec<&Cell> = [p, q]
            .into_iter()
            .filter(|&m| got & bit(m) != 0)
            .map(|m| &cells[m])
            .take(missing.len())
            .collect();
        if pars.len() < missing.len() {
            return MIX;
        }
        let consistent = pars.iter().all(|par| {
            (0..self.k()).all(|i| missing.contains(&i) || par[i] == cells[dm(i)][i])
                && missing.iter().all(|&i| par[i] == pars[0][i])
        });
        if consistent {
            pars[0][j]
        } else {
            MIX
        }
    }

    fn reads_of(&self, client: usize) -> u8 {
        if client + 1 == self.cfg.clients {
            self.cfg.reads
        } else {
            0
        }
    }

    fn write_id(&self, client: usize, k: u8) -> u8 {
        1 + client as u8 * self.cfg.writes + k
    }

    // ---- the model's wrappers around toma-core (where the non-core mutations live) ----

    fn core_mutations(&self) -> Mutations {
        Mutations {
            skip_dual_lock: self.cfg.mutation == Some(Mutation::SkipDualLock),
            early_advance: self.cfg.mutation == Some(Mutation::EarlyAdvance),
        }
    }

    fn lock_set(t: &Topology, chunk: u8) -> u8 {
        locks(t, u64::from(chunk))
            .into_iter()
            .fold(0, |m, i| m | bit(i))
    }

    fn write_set(t: &Topology, chunk: u8) -> u8 {
        write_members(t, u64::from(chunk))
            .into_iter()
            .fold(0, |m, i| m | bit(i))
    }

    /// (holders, targets) of the dirty bits a write must set.
    fn dirty_to_set(&self, t: &Topology, chunk: u8) -> (u8, u8) {
        if self.cfg.mutation == Some(Mutation::NoDirtyBits) {
            return (0, 0);
        }
        match sets_dirty(t, u64::from(chunk)) {
            Some(d) => (
                d.holders.iter().fold(0, |m, &i| m | bit(i)),
                d.targets.iter().fold(0, |m, &i| m | bit(i)),
            ),
            None => (0, 0),
        }
    }

    fn dirty_to_clear(t: &Topology, chunk: u8) -> (u8, u8) {
        match clears_dirty(t, u64::from(chunk)) {
            Some(d) => (
                d.holders.iter().fold(0, |m, &i| m | bit(i)),
                d.targets.iter().fold(0, |m, &i| m | bit(i)),
            ),
            None => (0, 0),
        }
    }

    fn read_from(&self, t: &Topology, chunk: u8) -> Option<usize> {
        if self.cfg.mutation == Some(Mutation::ReadFromW) {
            let h = toma_core::home(t, u64::from(chunk));
            if t.members[h].role == Role::W {
                return Some(h);
            }
        }
        read_member(t, u64::from(chunk))
    }

    /// RAID6: how a reader gets data chunk `j` of stripe `unit` (toma-core's `raid6_read`;
    /// the read-from-w mutation reads a W data member directly instead of reconstructing).
    fn raid6_source(&self, t: &Topology, unit: u8, j: usize) -> Raid6Read {
        if self.cfg.mutation == Some(Mutation::ReadFromW) {
            let m = raid6_data_member(t, u64::from(unit), j);
            if t.members[m].role == Role::W {
                return Raid6Read::Direct(m);
            }
        }
        raid6_read(t, u64::from(unit), j)
    }

    /// The members a read of data chunk `j` goes to, or `None` when it cannot be read.
    fn raid6_read_set(&self, t: &Topology, unit: u8, j: usize) -> Option<u8> {
        match self.raid6_source(t, unit, j) {
            Raid6Read::Direct(m) => Some(bit(m)),
            Raid6Read::Reconstruct(v) => Some(v.into_iter().fold(0, |m, i| m | bit(i))),
            Raid6Read::Unavailable => None,
        }
    }

    /// The members that get data from a write of `op` (RAID1: the write set; RAID6: the
    /// members of the write set that hold a touched data chunk, P or Q).
    fn data_targets(&self, t: &Topology, op: &Op) -> u8 {
        let w = Self::write_set(t, op.chunk);
        if !self.raid6 {
            return w;
        }
        let s = u64::from(op.chunk);
        let (p, q) = raid6_parity_members(t, s);
        let touched = (0..self.k())
            .filter(|&j| op.blocks & bit(j) != 0)
            .fold(bit(p) | bit(q), |m, j| m | bit(raid6_data_member(t, s, j)));
        w & touched
    }

    /// The member whose TOMA's local client runs the rebuild: the first RWL member.
    fn rebuilder_of(t: &Topology) -> Option<usize> {
        if !t.rebuild {
            return None;
        }
        t.members_with(Role::Rwl).next()
    }

    // ---- what the leader knows ----

    /// A TOMA's report: the generation it knows when every client it registered (and its
    /// rebuilder) acknowledged it, else the one before.
    fn synced(t: &Toma) -> Gen {
        if !t.up {
            return 0;
        }
        let clients_ok = t
            .registered
            .iter()
            .zip(&t.acked)
            .all(|(&r, &a)| !r || a >= t.gen);
        let rb_ok = t.rebuild.as_ref().is_none_or(|r| r.gen >= t.gen);
        if clients_ok && rb_ok {
            t.gen
        } else {
            t.gen.saturating_sub(1)
        }
    }

    /// A cheap pre-check: false when `plan_with` would certainly wait (no member lost or
    /// returned, and some live member not synced), to save building its input.
    fn may_plan(&self, s: &State) -> bool {
        if self.core_mutations().early_advance {
            return true;
        }
        let cur = s.current();
        let g = s.store_gen();
        let mut all_synced = true;
        for i in 0..self.n() {
            let dead = cur.role(i).is_dead();
            if dead == s.disks[i].up {
                return true; // lost, returned or replaced
            }
            if !dead && Self::synced(&s.tomas[i]) < g {
                all_synced = false;
            }
        }
        all_synced && cur.phase() != Phase::Normal
    }

    pub fn knowledge(&self, s: &State) -> Knowledge {
        let cur = s.current();
        let mut replacement = None;
        let members = (0..self.n())
            .map(|i| {
                let d = &s.disks[i];
                let here = d.up && cur.members[i].disk == disk_id(i, d.incarnation);
                if d.up && !here {
                    replacement = Some(Replacement {
                        member: i,
                        disk: disk_id(i, d.incarnation),
                        node: self.nodes[i].clone(),
                    });
                }
                MemberReport {
                    present: here.then(|| self.nodes[i].clone()),
                    synced: u64::from(Self::synced(&s.tomas[i])),
                    dirty_bits_lost: false,
                    stale: false,
                }
            })
            .collect();
        let g = s.store_gen();
        let rebuild_done = Self::rebuilder_of(cur).and_then(|h| {
            let t = &s.tomas[h];
            let targets = cur.members_with(Role::W).fold(0, |m, i| m | bit(i));
            let bits = (0..CHUNKS as u8).fold(0, |m, ch| m | Self::held_bits(s, cur, ch));
            (t.up && t.gen == g && t.rebuild.is_none() && bits & targets == 0)
                .then_some(u64::from(g))
        });
        Knowledge {
            members,
            rebuild_done,
            replacement,
        }
    }

    /// The dirty bits of `chunk` the rebuilder works from: the OR of the bitmaps of every
    /// live RWL member's TOMA (each holds them all, so that one more loss keeps them).
    fn held_bits(s: &State, t: &Topology, chunk: u8) -> u8 {
        t.members_with(Role::Rwl)
            .filter(|&i| s.tomas[i].up)
            .fold(0, |m, i| m | s.tomas[i].dirty[usize::from(chunk)])
    }

    // ---- client logic ----

    /// Starts a stage of `op` under generation `gen`: who gets which request.
    fn enter_stage(&self, s: &State, op: &mut Op, stage: Stage, gen: Gen) {
        let t = s.topo(gen);
        op.gen = gen;
        op.stage = stage;
        op.pending = 0;
        op.todo = 0;
        match stage {
            Stage::Lock => {
                // One at a time, in the order toma-core gives.
                let order = locks(t, u64::from(op.chunk));
                // A lock taken (again) since `vec` was computed: another writer may have
                // been in between, so what an earlier pass read is stale.
                // One lock of the set held without a break is enough: every writer of this
                // topology takes them all (the client's `kept` rule).
                if self.raid6 && !order.iter().any(|&m| op.held & bit(m) != 0) {
                    op.vec = [0; K];
                    op.cached = false;
                }
                let next = order.iter().find(|&&m| op.held & bit(m) == 0);
                if order.is_empty() {
                    op.stage = Stage::Blocked;
                } else if let Some(&m) = next {
                    op.todo = bit(m);
                } else if op.kind == OpKind::Read {
                    self.enter_stage(s, op, Stage::Read, gen);
                } else if op.cached {
                    self.enter_stage(s, op, Stage::Write, gen);
                } else {
                    self.enter_stage(s, op, Stage::ReadOld, gen);
                }
            }
            Stage::ReadOld => {
                op.got = 0;
                op.cells = [[0; K]; MAX_MEMBERS];
                let mut need = 0;
                if self.raid6 {
                    for j in (0..self.k()).filter(|&j| op.blocks & bit(j) == 0) {
                        match self.raid6_read_set(t, op.chunk, j) {
                            Some(m) => need |= m,
                            None => {
                                op.stage = Stage::Blocked;
                                return;
                            }
                        }
                    }
                }
                if need == 0 {
                    self.compute_new(t, op);
                    self.enter_stage(s, op, Stage::Write, gen);
                } else {
                    op.todo = need;
                }
            }
            Stage::Write => {
                op.got = 0;
                op.cells = [[0; K]; MAX_MEMBERS];
                let w = Self::write_set(t, op.chunk);
                let (holders, _) = self.dirty_to_set(t, op.chunk);
                if w == 0 {
                    op.stage = Stage::Blocked;
                } else {
                    op.todo = self.data_targets(t, op) | holders;
                }
            }
            Stage::Unlock => {
                let (holders, _) = Self::dirty_to_clear(t, op.chunk);
                op.todo =
                    (op.held | (op.clear & holders)) & t.alive().iter().fold(0, |m, &i| m | bit(i));
                op.clear &= holders;
            }
            Stage::Read => {
                op.got = 0;
                op.cells = [[0; K]; MAX_MEMBERS];
                let set = if self.raid6 {
                    let j = (0..self.k())
                        .find(|&j| op.blocks & bit(j) != 0)
                        .unwrap_or(0);
                    self.raid6_read_set(t, op.chunk, j)
                } else {
                    self.read_from(t, op.chunk).map(bit)
                };
                // RAID6: a read that reconstructs reads several members, which a write may
                // change in between; it holds the stripe's locks meanwhile (a lock test after
                // the read misses a write that ended before the test).
                let reconstruct = self.raid6 && set.is_some_and(|m| m.count_ones() > 1);
                let need = Self::lock_set(t, op.chunk);
                if reconstruct && op.held & need != need {
                    self.enter_stage(s, op, Stage::Lock, gen);
                    return;
                }
                match set {
                    Some(m) => op.todo = m,
                    None => op.stage = Stage::Blocked,
                }
            }
            Stage::Blocked => {}
        }
    }

    /// RAID6 writer: the stripe's new data versions, from the old ones it read.
    fn compute_new(&self, t: &Topology, op: &mut Op) {
        let OpKind::Write(id) = op.kind else {
            return;
        };
        let mut v = [0; K];
        for (j, x) in v.iter_mut().enumerate().take(self.k()) {
            *x = if op.blocks & bit(j) != 0 || !self.raid6 {
                id
            } else {
                self.decode(t, op.chunk, op.got, &op.cells, j)
            };
        }
        op.vec = v;
        op.cached = true;
    }

    /// A read's data needs no lock test beyond the one it was read with: RAID1 reads with
    /// READ_TEST_LOCK; a RAID6 chunk read directly from its data member (one copy, which
    /// recovery and rebuild never change) needs none; a RAID6 read that reconstructs holds
    /// the stripe's locks.
    fn read_was_tested(&self, op: &Op) -> bool {
        !self.raid6 || op.got.count_ones() == 1
    }

    fn request_for(&self, s: &State, op: &Op, member: usize) -> Req {
        let t = s.topo(op.gen);
        match op.stage {
            Stage::Lock => Req::Lock(op.chunk),
            Stage::ReadOld => Req::Get(op.chunk),
            Stage::Write => {
                let data = match op.kind {
                    OpKind::Write(_) if self.data_targets(t, op) & bit(member) != 0 => {
                        Some(self.cell_for(t, op.chunk, member, op.vec))
                    }
                    _ => None,
                };
                let (holders, targets) = self.dirty_to_set(t, op.chunk);
                let dirty = if holders & bit(member) != 0 {
                    targets
                } else {
                    0
                };
                Req::Write {
                    chunk: op.chunk,
                    data,
                    dirty,
                }
            }
            Stage::Unlock => {
                let (holders, targets) = Self::dirty_to_clear(t, op.chunk);
                let clear = if op.clear != 0 && holders & bit(member) != 0 {
                    targets
                } else {
                    0
                };
                Req::Unlock {
                    chunk: op.chunk,
                    clear,
                }
            }
            // RAID1: READ_TEST_LOCK; RAID6: plain READs (see `read_was_tested`).
            Stage::Read if self.raid6 => Req::Get(op.chunk),
            Stage::Read | Stage::Blocked => Req::Read(op.chunk),
        }
    }

    /// Everything a client does on its own, right away: reconnect, send, re-issue held
    /// work under a newer generation, finish stages, acknowledge SWITCH_TOPO.
    fn client_progress(&self, s: &mut State, c: usize) {
        for _ in 0..16 {
            let mut changed = false;
            for i in 0..self.n() {
                if s.clients[c].conn[i] == Conn::Broken && s.tomas[i].up {
                    // REGISTER / REGISTERED: a connection handshake, modelled as one step.
                    // The TOMA answers with the newest topology it knows.
                    let t = &mut s.tomas[i];
                    t.registered[c] = true;
                    t.acked[c] = 0;
                    let g = t.gen;
                    let cl = &mut s.clients[c];
                    cl.conn[i] = Conn::Ok;
                    cl.gen = cl.gen.max(g);
                    changed = true;
                }
            }
            if let Some(mut op) = s.clients[c].op.take() {
                let cgen = s.clients[c].gen;
                let mut done = false;
                let complete = op.pending == 0 && op.todo == 0;
                if complete && op.stage == Stage::Write {
                    // Every member of the issue generation has it: acknowledged. Bits are
                    // cleared only if no newer generation is known (skipping is safe).
                    if let OpKind::Write(id) = op.kind {
                        self.write_acked(s, op.blocks, id);
                    }
                    op.clear = if op.gen == cgen && self.whole_unit(op.blocks) {
                        0xFF
                    } else {
                        0
                    };
                    self.enter_stage(s, &mut op, Stage::Unlock, cgen);
                    changed = true;
                } else if complete && op.stage == Stage::Unlock {
                    done = true;
                    changed = true;
                } else if complete && op.stage == Stage::ReadOld && op.gen == cgen {
                    let t = s.topo(op.gen);
                    self.compute_new(t, &mut op);
                    let bad = (0..self.k()).find(|&j| {
                        let v = op.vec[j];
                        op.blocks & bit(j) == 0
                            && (v == MIX || v == GARBAGE || v != 0 && !self.was_written(s, j, v))
                    });
                    if let Some(j) = bad {
                        s.violation.get_or_insert(Viol {
                            prop: Prop::Rmw,
                            client: c as u8,
                            chunk: j as u8,
                            got: op.vec[j],
                            want: None,
                        });
                    }
                    self.enter_stage(s, &mut op, Stage::Write, cgen);
                    changed = true;
                } else if complete
                    && op.stage == Stage::Read
                    && (op.gen == cgen || self.read_was_tested(&op))
                {
                    self.finish_read(s, c, &op);
                    if op.held != 0 {
                        // Read under the stripe's locks: unlock.
                        op.clear = 0;
                        self.enter_stage(s, &mut op, Stage::Unlock, cgen);
                    } else {
                        done = true;
                    }
                    changed = true;
                } else if op.pending == 0 && op.gen < cgen {
                    // Held or finished under an older generation: re-issue under the new one.
                    let alive = s.topo(cgen).alive().iter().fold(0, |m, &i| m | bit(i));
                    op.held &= alive;
                    match (op.kind, op.stage) {
                        (_, Stage::Unlock) => {
                            // Clearing under an older generation is skipped (always safe).
                            op.clear = 0;
                            self.enter_stage(s, &mut op, Stage::Unlock, cgen);
                        }
                        (OpKind::Write(_), _) => self.enter_stage(s, &mut op, Stage::Lock, cgen),
                        (OpKind::Read, _) => {
                            // A new read attempt: the old one returned nothing.
                            self.enter_stage(s, &mut op, Stage::Read, cgen)
                        }
                    }
                    changed = true;
                } else if op.pending == 0 && op.todo == 0 && op.stage != Stage::Blocked {
                    match op.stage {
                        Stage::Lock => {
                            let g = op.gen;
                            self.enter_stage(s, &mut op, Stage::Lock, g);
                            changed = true;
                        }
                        Stage::ReadOld
                        | Stage::Write
                        | Stage::Unlock
                        | Stage::Read
                        | Stage::Blocked => {}
                    }
                }
                if !done && op.todo != 0 && op.gen >= cgen {
                    for i in 0..self.n() {
                        if op.todo & bit(i) != 0 && s.clients[c].conn[i] == Conn::Ok {
                            let req = self.request_for(s, &op, i);
                            op.todo &= !bit(i);
                            op.pending |= bit(i);
                            s.send(Msg::Req {
                                from: c as u8,
                                to: i as u8,
                                gen: op.gen,
                                req,
                            });
                            changed = true;
                        }
                    }
                }
                if !done {
                    s.clients[c].op = Some(op);
                }
            }
            let ready = s.clients[c]
                .op
                .as_ref()
                .is_none_or(|o| o.gen >= s.clients[c].gen);
            if ready {
                // ACK_TOPO: the client has no I/O in flight issued under an older generation
                // than the one it knows. Delivered at once (a lost ack is a dropped
                // connection: the TOMA fences and the client re-registers).
                for i in 0..self.n() {
                    let g = s.clients[c].gen;
                    let t = &mut s.tomas[i];
                    if s.clients[c].conn[i] == Conn::Ok && t.up && t.registered[c] && t.acked[c] < g
                    {
                        t.acked[c] = g;
                        changed = true;
                    }
                }
            }
            if !changed {
                return;
            }
        }
    }

    fn write_started(&self, s: &mut State, c: usize, blocks: u8, id: u8) {
        for b in (0..BLOCKS).filter(|&b| blocks & bit(b) != 0) {
            s.hist.started[b] |= 1 << id;
            s.hist.inflight[b] |= 1 << id;
            s.hist.stable[b] = None;
            s.hist.quiet_val[b] = None;
        }
        for (k, cl) in s.clients.iter_mut().enumerate() {
            if let Some(op) = cl.op.as_mut() {
                if k != c && op.kind == OpKind::Read && op.blocks & blocks != 0 {
                    op.expect = None;
                    op.quiet = false;
                }
            }
        }
    }

    fn write_acked(&self, s: &mut State, blocks: u8, id: u8) {
        for b in (0..BLOCKS).filter(|&b| blocks & bit(b) != 0) {
            s.hist.inflight[b] &= !(1 << id);
            if s.hist.inflight[b] == 0 {
                s.hist.stable[b] = Some(id);
            }
        }
    }

    /// Whether some write of block `b` ever started with id `v`.
    fn was_written(&self, s: &State, b: usize, v: u8) -> bool {
        v < 16 && s.hist.started[b] & (1 << v) != 0
    }

    /// The value a read whose data all arrived returns, checked against the history.
    fn finish_read(&self, s: &mut State, c: usize, op: &Op) {
        let t = s.topo(op.gen);
        let b = (0..BLOCKS).find(|&b| op.blocks & bit(b) != 0).unwrap_or(0);
        let v = if self.raid6 {
            self.decode(t, op.chunk, op.got, &op.cells, self.pos(b))
        } else {
            (0..self.n())
                .find(|&m| op.got & bit(m) != 0)
                .map_or(0, |m| op.cells[m][0])
        };
        self.read_returned(s, c, op, b, v);
    }

    fn read_returned(&self, s: &mut State, c: usize, op: &Op, b: usize, v: u8) {
        let viol = |prop, want| Viol {
            prop,
            client: c as u8,
            chunk: b as u8,
            got: v,
            want,
        };
        if v != 0 && !self.was_written(s, b, v) {
            s.violation.get_or_insert(viol(Prop::P3, None));
        }
        if let Some(e) = op.expect {
            if e != v {
                s.violation.get_or_insert(viol(Prop::P1, Some(e)));
            }
        }
        if op.quiet {
            if let Some(q) = s.hist.quiet_val[b] {
                if q != v {
                    s.violation.get_or_insert(viol(Prop::P2, Some(q)));
                }
            }
            s.hist.quiet_val[b] = Some(v);
        }
    }

    fn client_receive(&self, s: &mut State, c: usize, from: usize, resp: Resp) {
        let cl = &mut s.clients[c];
        match resp {
            Resp::SwitchTopo(g) => {
                cl.gen = cl.gen.max(g);
                // Other SWITCH_TOPOs to this client that are not newer tell it nothing new
                // (acks are sent for the generation it knows): absorb them.
                let (cg, to) = (cl.gen, c as u8);
                s.net.retain(|m| {
                    !matches!(m, Msg::Resp { to: t, resp: Resp::SwitchTopo(h), .. } if *t == to && *h <= cg)
                });
            }
            Resp::Retry(g) => {
                cl.gen = cl.gen.max(g);
                if let Some(op) = cl.op.as_mut() {
                    op.pending &= !bit(from);
                    op.todo |= bit(from);
                }
            }
            Resp::Rejected => {
                cl.conn[from] = Conn::Broken;
                if let Some(op) = cl.op.as_mut() {
                    if op.pending & bit(from) != 0 {
                        op.pending &= !bit(from);
                        op.todo |= bit(from);
                    }
                }
            }
            Resp::LockOk => {
                if let Some(op) = cl.op.as_mut() {
                    op.pending &= !bit(from);
                    op.held |= bit(from);
                }
            }
            Resp::Done => {
                if let Some(op) = cl.op.as_mut() {
                    op.pending &= !bit(from);
                    if op.stage == Stage::Unlock {
                        op.held &= !bit(from);
                    }
                }
            }
            Resp::ReadOk(v) => {
                if let Some(op) = cl.op.as_mut() {
                    if op.pending & bit(from) != 0 {
                        op.pending &= !bit(from);
                        if matches!(op.stage, Stage::Read | Stage::ReadOld) {
                            op.cells[from] = v;
                            op.got |= bit(from);
                        }
                    }
                }
            }
        }
    }

    // ---- TOMA logic ----

    /// Whether member `m`'s TOMA answers a read of generation `gen` now (see
    /// `toma_receive`): it is up, knows `gen`, is at most one generation ahead, and its
    /// newest generation does not declare `m` DEAD.
    fn serves_read(&self, s: &State, m: usize, gen: Gen) -> bool {
        let t = &s.tomas[m];
        t.up && gen <= t.gen && gen + 1 >= t.gen && !s.topo(t.gen).role(m).is_dead()
    }

    /// Whether a request at the head of a TOMA's queue can be served now (a lock or read of
    /// a chunk locked by someone else waits; so does anything from a generation it has not
    /// learned yet).
    fn deliverable(&self, s: &State, from: u8, to: usize, gen: Gen, req: &Req) -> bool {
        let t = &s.tomas[to];
        if !t.up {
            return false;
        }
        let client_ok = from == REBUILDER || t.registered.get(usize::from(from)) == Some(&true);
        if !client_ok || gen + 1 < t.gen {
            return true; // rejected right away
        }
        if gen > t.gen {
            return false;
        }
        match req {
            // One of an older generation is bounced at once (RETRY) rather than waiting.
            Req::Lock(ch) | Req::Read(ch) => {
                gen < t.gen || !matches!(t.locks[usize::from(*ch)], Some(h) if h != from)
            }
            _ => true,
        }
    }

    fn toma_receive(&self, s: &mut State, from: u8, to: usize, gen: Gen, req: Req) {
        let t = &s.tomas[to];
        let client_ok = from == REBUILDER || t.registered.get(usize::from(from)) == Some(&true);
        if !client_ok || gen + 1 < t.gen {
            if from != REBUILDER {
                // Fenced or stale: the client must re-register.
                s.tomas[to].registered[usize::from(from)] = false;
            }
            self.respond(s, to, from, Resp::Rejected);
            return;
        }
        let dead_here = s.topo(t.gen).role(to).is_dead();
        if let Req::Lock(ch) | Req::Read(ch) = req {
            // Locked by another client and from an older generation: the real agent answers
            // LOCKED and the client retries under the newest generation it knows; a request
            // waiting here would hold back its client's ACK_TOPO (as TomaLearn's bounce).
            if gen < t.gen && matches!(t.locks[usize::from(ch)], Some(h) if h != from) {
                let g = t.gen;
                self.respond(s, to, from, Resp::Retry(g));
                return;
            }
        }
        if dead_here && !matches!(req, Req::Unlock { .. }) {
            // A member its TOMA's newest generation declares DEAD serves nothing more: its
            // agent answers StaleGeneration (g-1) or UnknownVolume (g), as does an agent whose
            // disk was replaced by a NEW one. A client still on g-1 must not read its chunk.
            if from != REBUILDER {
                s.tomas[to].registered[usize::from(from)] = false;
            }
            self.respond(s, to, from, Resp::Rejected);
            return;
        }
        match req {
            Req::Lock(ch) => {
                s.tomas[to].locks[usize::from(ch)] = Some(from);
                self.respond(s, to, from, Resp::LockOk);
            }
            Req::Write { chunk, data, dirty } => {
                if let Some(d) = data {
                    s.disks[to].data[usize::from(chunk)] = d;
                }
                s.tomas[to].dirty[usize::from(chunk)] |= dirty;
                self.respond(s, to, from, Resp::Done);
            }
            Req::Unlock { chunk, clear } => {
                let t = &mut s.tomas[to];
                let ch = usize::from(chunk);
                if t.locks[ch] == Some(from) {
                    t.locks[ch] = None;
                }
                t.dirty[ch] &= !clear;
                self.respond(s, to, from, Resp::Done);
            }
            Req::Read(ch) | Req::Get(ch) => {
                let v = s.disks[to].data[usize::from(ch)];
                self.respond(s, to, from, Resp::ReadOk(v));
            }
        }
    }

    /// A TOMA's answer, taken in by the client (or rebuilder) as the request is processed:
    /// the request/response pair is one step (loss is modelled on the request).
    fn respond(&self, s: &mut State, member: usize, to: u8, resp: Resp) {
        if to == REBUILDER {
            self.rebuilder_receive(s, member, resp);
        } else {
            self.client_receive(s, usize::from(to), member, resp);
        }
    }

    fn rebuilder_receive(&self, s: &mut State, from: usize, resp: Resp) {
        let Some(h) = s.tomas.iter().position(|t| t.rebuild.is_some()) else {
            return;
        };
        let Some(mut rb) = s.tomas[h].rebuild.take() else {
            return;
        };
        rb.pending &= !bit(from);
        if resp == Resp::Done {
            rb.ok |= bit(from);
        }
        if rb.pending == 0 {
            // CLEAR_DIRTY on every holder (modelled as one step: a clear that is late or
            // lost only leaves a bit set, which is safe), then UNLOCK.
            let ch = usize::from(rb.chunk);
            for t in s.tomas.iter_mut().filter(|t| t.up) {
                t.dirty[ch] &= !rb.ok;
            }
            Self::free_rebuilder_locks(s, ch);
        } else {
            s.tomas[h].rebuild = Some(rb);
        }
    }

    /// The rebuilder's locks of unit `ch`, on every member of its lock set.
    fn free_rebuilder_locks(s: &mut State, ch: usize) {
        for t in s.tomas.iter_mut() {
            if t.locks[ch] == Some(REBUILDER) {
                t.locks[ch] = None;
            }
        }
    }

    /// Client and rebuilder steps that need no outside event.
    fn settle(&self, s: &mut State) {
        for h in 0..self.n() {
            let t = &s.tomas[h];
            if let Some(rb) = &t.rebuild {
                let in_flight = s.net.iter().any(|m| match m {
                    Msg::Req { from, .. } => *from == REBUILDER,
                    Msg::Resp { to, .. } => *to == REBUILDER,
                });
                if rb.gen < t.gen && !in_flight {
                    // Its copy target died: give up on this chunk, keep its bit.
                    let ch = usize::from(rb.chunk);
                    s.tomas[h].rebuild = None;
                    Self::free_rebuilder_locks(s, ch);
                }
            }
        }
        for c in 0..s.clients.len() {
            self.client_progress(s, c);
        }
        // The leader plans as soon as it can (what it then writes may be stale by the time
        // it is written; publishing is a separate step).
        if s.leader.pending.is_none() && s.violation.is_none() && self.may_plan(s) {
            let k = self.knowledge(s);
            match plan_with(s.current(), &k, self.core_mutations()) {
                Ok(Plan::Next(t)) => s.leader.pending = Some(t),
                Ok(Plan::Wait(_)) => {}
                Err(_) => {
                    s.violation = Some(Viol {
                        prop: Prop::Planner,
                        client: 0,
                        chunk: 0,
                        got: 0,
                        want: None,
                    })
                }
            }
        }
    }

    fn drop_member(&self, s: &mut State, i: usize) {
        let iu = i as u8;
        s.net.retain(|m| match m {
            Msg::Req { to, .. } => *to != iu,
            Msg::Resp { from, .. } => *from != iu,
        });
        if let Some(rb) = s.tomas[i].rebuild.take() {
            // The rebuilder dies with its TOMA; the locks it took on the other members of
            // the stripe's lock set are freed as any dead client's are (fenced once its
            // connections end; nothing to copy: it wrote only to W members, whose dirty
            // bits stay set).
            Self::free_rebuilder_locks(s, usize::from(rb.chunk));
        }
        s.tomas[i] = Toma::down();
        for cl in s.clients.iter_mut() {
            cl.conn[i] = Conn::Broken;
            if let Some(op) = cl.op.as_mut() {
                if op.pending & bit(i) != 0 {
                    op.pending &= !bit(i);
                    op.todo |= bit(i);
                }
            }
        }
    }

    // ---- the checked state ----

    pub fn goal(&self, s: &State) -> bool {
        // A state with a safety violation ends its run: that is reported by P1-P3, not P6.
        s.violation.is_some()
            || s.failures_left == 0
                && s.disks.iter().all(|d| d.up)
                && s.current().phase() == Phase::Normal
                && s.clients.iter().enumerate().all(|(i, c)| {
                    c.op.is_none()
                        && c.writes_done == self.cfg.writes
                        && c.reads_done == self.reads_of(i)
                })
    }

    /// P4: in Normal with nothing in flight, every member holds the same data (RAID6: each
    /// data member its chunk of one data vector, P and Q computed from that same vector, so
    /// any k members decode it), and that data is the last acknowledged write of each block.
    pub fn converged(&self, s: &State) -> bool {
        let quiet = s.current().phase() == Phase::Normal
            && s.disks.iter().all(|d| d.up)
            && s.clients.iter().all(|c| c.op.is_none())
            && s.tomas.iter().all(|t| t.rebuild.is_none())
            && !s.net.iter().any(|m| {
                matches!(
                    m,
                    Msg::Req {
                        req: Req::Write { .. },
                        ..
                    }
                )
            });
        !quiet || (0..self.units()).all(|u| self.unit_converged(s, u))
    }

    /// The data vector of `unit` as its data members hold it, if every member agrees with it
    /// and it is the last acknowledged write of each block.
    pub fn unit_converged(&self, s: &State, unit: u8) -> bool {
        let t = s.current();
        let ch = usize::from(unit);
        let truth: Cell = if self.raid6 {
            let mut v = [0; K];
            for (j, x) in v.iter_mut().enumerate().take(self.k()) {
                *x = s.disks[raid6_data_member(t, u64::from(unit), j)].data[ch][j];
            }
            v
        } else {
            s.disks[0].data[ch]
        };
        let members_agree =
            (0..self.n()).all(|m| s.disks[m].data[ch] == self.cell_for(t, unit, m, truth));
        let latest = (0..BLOCKS).all(|b| {
            let (u, p) = if self.raid6 {
                (b / self.k(), b % self.k())
            } else {
                (b, 0)
            };
            u != ch || s.hist.stable[b].is_none_or(|v| truth[p] == v)
        });
        members_agree && latest
    }

    /// P5: the actors (clients, rebuilder) that hold a complete lock set of `chunk` right now,
    /// as the TOMAs' lock tables say.
    pub fn holders(&self, s: &State, chunk: u8) -> Vec<(u8, Gen)> {
        let ch = usize::from(chunk);
        let complete = |who: u8, g: Gen| {
            let set = Self::lock_set(s.topo(g), chunk);
            set != 0
                && (0..self.n()).all(|m| {
                    set & bit(m) == 0 || (s.tomas[m].up && s.tomas[m].locks[ch] == Some(who))
                })
        };
        let mut out = Vec::new();
        for (c, cl) in s.clients.iter().enumerate() {
            if let Some(op) = &cl.op {
                if matches!(op.kind, OpKind::Write(_))
                    && op.chunk == chunk
                    && complete(c as u8, op.gen)
                {
                    out.push((c as u8, op.gen));
                }
            }
        }
        for t in &s.tomas {
            if let Some(rb) = &t.rebuild {
                if rb.chunk == chunk && complete(REBUILDER, rb.gen) {
                    out.push((REBUILDER, rb.gen));
                }
            }
        }
        out
    }

    pub fn excluded(&self, s: &State) -> bool {
        (0..CHUNKS as u8).all(|c| self.holders(s, c).len() <= 1)
    }
}

fn viol_is(s: &State, p: Prop) -> bool {
    s.violation.as_ref().is_some_and(|v| v.prop == p)
}

impl Model for TomaModel {
    type State = State;
    type Action = Action;

    fn init_states(&self) -> Vec<State> {
        let n = self.n();
        let c = self.cfg.clients;
        vec![State {
            topos: Arc::new(vec![self.initial.clone()]),
            lease_epoch: 0,
            leader: Leader {
                epoch: 0,
                pending: None,
                zombie: None,
            },
            tomas: (0..n).map(|_| Toma::fresh(1, c, true)).collect(),
            disks: (0..n)
                .map(|_| Disk {
                    up: true,
                    incarnation: 0,
                    data: [[0; K]; CHUNKS],
                })
                .collect(),
            clients: (0..c)
                .map(|_| Client {
                    gen: 1,
                    conn: vec![Conn::Ok; n],
                    op: None,
                    writes_done: 0,
                    reads_done: 0,
                })
                .collect(),
            net: Vec::new(),
            hist: History {
                started: [0; BLOCKS],
                inflight: [0; BLOCKS],
                stable: [Some(0); BLOCKS],
                quiet_val: [None; BLOCKS],
            },
            violation: None,
            failures_left: self.cfg.failures,
            crashes_left: self.cfg.leader_crashes,
            drops_left: self.cfg.drops,
        }]
    }

    fn actions(&self, s: &State, out: &mut Vec<Action>) {
        if s.violation.is_some() {
            return;
        }
        let n = self.n();
        for (c, cl) in s.clients.iter().enumerate() {
            if cl.op.is_none() {
                if cl.writes_done < self.cfg.writes {
                    for target in 0..self.write_targets().len() as u8 {
                        out.push(Action::StartWrite {
                            client: c as u8,
                            target,
                        });
                    }
                }
                if cl.reads_done < self.reads_of(c) {
                    for target in 0..self.read_targets().len() as u8 {
                        out.push(Action::StartRead {
                            client: c as u8,
                            target,
                        });
                    }
                }
            }
        }
        let mut last: Option<&Msg> = None;
        // RAID6 reduction: of one actor's requests, only the deliverable one to the lowest
        // member is offered (its fan-out lands in member order; every interleaving with
        // other actors, failures and topology changes is still explored).
        let mut first_of: Vec<u8> = Vec::new();
        for m in &s.net {
            if last == Some(m) {
                continue;
            }
            last = Some(m);
            let ok = match m {
                Msg::Req { from, to, gen, req } => {
                    self.deliverable(s, *from, usize::from(*to), *gen, req)
                        && (!self.raid6 || {
                            let first = !first_of.contains(from);
                            first_of.push(*from);
                            first
                        })
                }
                Msg::Resp { .. } => true,
            };
            if ok {
                out.push(Action::Deliver(m.clone()));
            }
        }
        let g = s.store_gen();
        for (i, t) in s.tomas.iter().enumerate() {
            if t.up && t.gen < g {
                out.push(Action::TomaLearn(i as u8));
            }
            if t.up && t.rebuild.is_none() {
                let topo = s.topo(t.gen);
                if Self::rebuilder_of(topo) == Some(i) {
                    let targets = topo.members_with(Role::W).fold(0, |m, j| m | bit(j));
                    for chunk in 0..self.units() {
                        let ch = usize::from(chunk);
                        // The rebuilder takes the stripe's whole lock set (modelled as
                        // one step, when every lock of it is free); it rebuilds the units
                        // whose lock place it is.
                        let set = Self::lock_set(topo, chunk);
                        if Self::held_bits(s, topo, chunk) & targets != 0
                            && locks(topo, u64::from(chunk)).first() == Some(&i)
                            && (0..self.n()).all(|m| {
                                set & bit(m) == 0 || s.tomas[m].up && s.tomas[m].locks[ch].is_none()
                            })
                        {
                            out.push(Action::RebuildChunk {
                                member: i as u8,
                                chunk,
                            });
                        }
                    }
                }
            }
        }
        if s.leader.pending.is_some() {
            out.push(Action::LeaderPublish);
        }
        // A crash matters only between computing a topology and writing it: a new leader
        // resumes from the stored topology, which a crash at any other moment leaves as is.
        if s.crashes_left > 0 && s.leader.pending.is_some() {
            out.push(Action::LeaderCrash);
        }
        if s.leader.zombie.is_some() {
            out.push(Action::ZombieWrite);
        }
        let first_fail = usize::from(!self.cfg.fail_lock_place);
        for i in 0..n {
            let d = &s.disks[i];
            if i >= first_fail && d.up && s.failures_left > 0 && !s.current().role(i).is_dead() {
                out.push(Action::FailDisk(i as u8));
                if self.raid6 && s.failures_left > 1 {
                    for j in i + 1..n {
                        if s.disks[j].up && !s.current().role(j).is_dead() {
                            out.push(Action::FailTwo(i as u8, j as u8));
                        }
                    }
                }
            }
            if !d.up && s.current().role(i).is_dead() {
                out.push(Action::ReturnDisk {
                    member: i as u8,
                    new_disk: false,
                });
                if self.cfg.replacement {
                    out.push(Action::ReturnDisk {
                        member: i as u8,
                        new_disk: true,
                    });
                }
            }
        }
        if s.drops_left > 0 {
            for (c, cl) in s.clients.iter().enumerate() {
                for i in 0..n {
                    let busy = s.net.iter().any(|m| match m {
                        Msg::Req { from, to, .. } => {
                            usize::from(*from) == c && usize::from(*to) == i
                        }
                        Msg::Resp { from, to, .. } => {
                            usize::from(*from) == i && usize::from(*to) == c
                        }
                    });
                    if busy && cl.conn[i] == Conn::Ok && s.tomas[i].up {
                        out.push(Action::DropConn {
                            client: c as u8,
                            member: i as u8,
                        });
                    }
                }
            }
        }
    }

    fn next_state(&self, last: &State, action: Action) -> Option<State> {
        let mut s = last.clone();
        match action {
            Action::StartWrite { client, target } => {
                let c = usize::from(client);
                let (chunk, blocks) = *self.write_targets().get(usize::from(target))?;
                let id = self.write_id(c, s.clients[c].writes_done);
                s.clients[c].writes_done += 1;
                self.write_started(&mut s, c, blocks, id);
                let mut op = Op {
                    kind: OpKind::Write(id),
                    chunk,
                    blocks,
                    cells: [[0; K]; MAX_MEMBERS],
                    got: 0,
                    vec: if self.raid6 { [0; K] } else { [id, 0, 0, 0] },
                    cached: false,
                    gen: 0,
                    stage: Stage::Lock,
                    pending: 0,
                    todo: 0,
                    held: 0,
                    clear: 0,
                    expect: None,
                    quiet: false,
                };
                let g = s.clients[c].gen;
                self.enter_stage(&s, &mut op, Stage::Lock, g);
                s.clients[c].op = Some(op);
            }
            Action::StartRead { client, target } => {
                let c = usize::from(client);
                let (chunk, blocks) = *self.read_targets().get(usize::from(target))?;
                s.clients[c].reads_done += 1;
                let ch = (0..BLOCKS).find(|&b| blocks & bit(b) != 0).unwrap_or(0);
                let mut op = Op {
                    kind: OpKind::Read,
                    chunk,
                    blocks,
                    cells: [[0; K]; MAX_MEMBERS],
                    got: 0,
                    vec: [0; K],
                    cached: false,
                    gen: 0,
                    stage: Stage::Read,
                    pending: 0,
                    todo: 0,
                    held: 0,
                    clear: 0,
                    expect: s.hist.stable[ch],
                    quiet: s.hist.inflight[ch] == 0,
                };
                let g = s.clients[c].gen;
                self.enter_stage(&s, &mut op, Stage::Read, g);
                s.clients[c].op = Some(op);
            }
            Action::Deliver(m) => {
                let pos = s.net.iter().position(|x| *x == m)?;
                s.net.remove(pos);
                match m {
                    Msg::Req { from, to, gen, req } => {
                        self.toma_receive(&mut s, from, usize::from(to), gen, req)
                    }
                    Msg::Resp { from, to, resp } => {
                        if to == REBUILDER {
                            self.rebuilder_receive(&mut s, usize::from(from), resp);
                        } else {
                            self.client_receive(&mut s, usize::from(to), usize::from(from), resp);
                        }
                    }
                }
            }
            Action::TomaLearn(i) => {
                let i = usize::from(i);
                let old = s.tomas[i].gen;
                let g = s.store_gen();
                s.tomas[i].gen = g;
                let (old_t, new_t) = (s.topo(old).clone(), s.topo(g).clone());
                // A NEW disk (or one whose bits are unknown) enters as W: every bit is set
                // in each holder's RAM.
                if new_t.role(i) == Role::Rwl {
                    for (w, m) in new_t.members.iter().enumerate() {
                        if m.role == Role::W && m.full_rebuild && old_t.role(w) != Role::W {
                            let units = usize::from(self.units());
                            for d in s.tomas[i].dirty.iter_mut().take(units) {
                                *d |= bit(w);
                            }
                        }
                    }
                }
                // Locks and reads waiting on a lock under an older generation are bounced,
                // so they do not hold back their client's SWITCH_TOPO acknowledgement.
                let mut bounced = Vec::new();
                s.net.retain(|m| match m {
                    Msg::Req {
                        from,
                        to,
                        gen,
                        req: Req::Lock(ch) | Req::Read(ch),
                    } if usize::from(*to) == i
                        && *gen < g
                        && s.tomas[i].locks[usize::from(*ch)].is_some_and(|h| h != *from) =>
                    {
                        bounced.push(*from);
                        false
                    }
                    _ => true,
                });
                for from in bounced {
                    self.respond(&mut s, i, from, Resp::Retry(g));
                }
                for c in 0..s.clients.len() {
                    if s.tomas[i].registered[c] {
                        s.reply(i, c as u8, Resp::SwitchTopo(g));
                    }
                }
            }
            Action::RebuildChunk { member, chunk } => {
                let h = usize::from(member);
                let ch = usize::from(chunk);
                let gen = s.tomas[h].gen;
                let topo = s.topo(gen);
                let targets = topo.members_with(Role::W).fold(0, |m, j| m | bit(j))
                    & Self::held_bits(&s, topo, chunk);
                // Read under the stripe's lock: RAID1 from the read member, RAID6 the whole
                // stripe decoded from the k readable members toma-core names.
                let v = if self.raid6 {
                    let mut got = 0;
                    let mut cells = [[0; K]; MAX_MEMBERS];
                    for j in 0..self.k() {
                        let set = self.raid6_read_set(topo, chunk, j)?;
                        for m in (0..self.n()).filter(|&m| set & bit(m) != 0) {
                            // The rebuilder reads over the network like a client: a member
                            // whose TOMA is down, has not learned `gen`, or declares it DEAD
                            // in a newer generation answers no read (the rebuilder retries
                            // or gives up when it learns the newer generation).
                            if !self.serves_read(&s, m, gen) {
                                return None;
                            }
                            got |= bit(m);
                            cells[m] = s.disks[m].data[ch];
                        }
                    }
                    let mut v = [0; K];
                    for (j, x) in v.iter_mut().enumerate().take(self.k()) {
                        *x = self.decode(topo, chunk, got, &cells, j);
                    }
                    v
                } else {
                    let src = read_member(topo, u64::from(chunk))?;
                    if !self.serves_read(&s, src, gen) {
                        return None;
                    }
                    s.disks[src].data[ch]
                };
                let n = self.n();
                let cells: Vec<Cell> = (0..n).map(|w| self.cell_for(topo, chunk, w, v)).collect();
                let set = Self::lock_set(topo, chunk);
                for m in (0..n).filter(|&m| set & bit(m) != 0) {
                    s.tomas[m].locks[ch] = Some(REBUILDER);
                }
                s.tomas[h].rebuild = Some(RebuildOp {
                    chunk,
                    gen,
                    pending: targets,
                    ok: 0,
                });
                for (w, cell) in cells.into_iter().enumerate() {
                    if targets & bit(w) != 0 && s.tomas[w].up {
                        s.send(Msg::Req {
                            from: REBUILDER,
                            to: w as u8,
                            gen,
                            req: Req::Write {
                                chunk,
                                data: Some(cell),
                                dirty: 0,
                            },
                        });
                    }
                }
            }
            Action::LeaderPublish => {
                let t = s.leader.pending.take()?;
                // Compare-and-swap on the stored generation, under the Lease epoch.
                if s.leader.epoch == s.lease_epoch && t.generation == u64::from(s.store_gen()) + 1 {
                    Arc::make_mut(&mut s.topos).push(t);
                }
            }
            Action::LeaderCrash => {
                s.crashes_left -= 1;
                if let Some(t) = s.leader.pending.take() {
                    s.leader.zombie = Some((s.leader.epoch, t));
                }
                s.lease_epoch += 1;
                s.leader.epoch = s.lease_epoch;
            }
            Action::ZombieWrite => {
                let (epoch, t) = s.leader.zombie.take()?;
                if epoch == s.lease_epoch && t.generation == u64::from(s.store_gen()) + 1 {
                    Arc::make_mut(&mut s.topos).push(t);
                }
            }
            Action::FailDisk(i) => {
                let i = usize::from(i);
                s.failures_left -= 1;
                s.disks[i].up = false;
                self.drop_member(&mut s, i);
            }
            Action::FailTwo(i, j) => {
                s.failures_left = s.failures_left.saturating_sub(2);
                for m in [usize::from(i), usize::from(j)] {
                    s.disks[m].up = false;
                    self.drop_member(&mut s, m);
                }
            }
            Action::ReturnDisk { member, new_disk } => {
                let i = usize::from(member);
                let d = &mut s.disks[i];
                d.up = true;
                if new_disk {
                    d.incarnation += 1;
                    d.data = [[GARBAGE; K]; CHUNKS];
                }
                let g = s.store_gen();
                s.tomas[i] = Toma::fresh(g, s.clients.len(), false);
            }
            Action::DropConn { client, member } => {
                s.drops_left -= 1;
                let (c, i) = (usize::from(client), usize::from(member));
                s.net.retain(|m| match m {
                    Msg::Req { from, to, .. } => !(*from == client && *to == member),
                    Msg::Resp { from, to, .. } => !(*from == member && *to == client),
                });
                s.tomas[i].registered[c] = false;
                let cl = &mut s.clients[c];
                cl.conn[i] = Conn::Broken;
                if let Some(op) = cl.op.as_mut() {
                    if op.pending & bit(i) != 0 {
                        op.pending &= !bit(i);
                        op.todo |= bit(i);
                    }
                }
            }
        }
        self.settle(&mut s);
        Some(s)
    }

    fn properties(&self) -> Vec<Property<Self>> {
        vec![
            Property::always("P1 durability", |_, s| !viol_is(s, Prop::P1)),
            Property::always("P2 stability", |_, s| !viol_is(s, Prop::P2)),
            Property::always("P3 validity", |_, s| !viol_is(s, Prop::P3)),
            Property::always("RMW decodes the old stripe", |_, s| !viol_is(s, Prop::Rmw)),
            Property::always("P4 convergence", |m, s| m.converged(s)),
            Property::always("P5 exclusion", |m, s| m.excluded(s)),
            Property::always("planner accepts its input", |_, s| {
                !viol_is(s, Prop::Planner)
            }),
            Property::eventually("P6 liveness", |m, s| m.goal(s)),
        ]
    }
}
