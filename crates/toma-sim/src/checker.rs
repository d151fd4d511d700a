//! The invariant checker, beside the simulated cluster (never inside the code under test):
//! it sees every frame the network delivers, every operation of the workload, and samples
//! the agents' lock tables and superblocks. The first violation ends the run.
//!
//! * P1 durability / P3 validity: a read returns a whole version of its block that is at
//!   least the newest acknowledged before it started and at most the newest issued before
//!   it ended (after a whole-cluster power loss: at least the newest *flushed*).
//! * P2 stability: two reads of a block with no write to it in flight anywhere between
//!   them return the same version.
//! * P5 exclusion: on every lock grant and every sample, no two clients hold a complete lock
//!   set of one chunk (under the current or the previous topology) unless one set has lost
//!   a member to DEAD.
//! * Generations: no agent accepts I/O of generation g while the volume is at g + 2 or later.
//! * Superblocks: no extent records a generation newer than the control plane's.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use futures_util::FutureExt;
use parking_lot::Mutex;
use tokio::time::Instant;
use toma_agent::server::AgentHandle;
use toma_control::{ControlPlane, EmbeddedControlPlane};
use toma_core::placement::locks;
use toma_core::{DiskId, Generation, NodeId, Topology, VolumeId};
use toma_wire::{Frame, Kind, Message};

use crate::net::Observer;
use crate::verify::decode_block;

#[derive(Default)]
struct Blocks {
    issued: Vec<u64>,
    acked: Vec<u64>,
    durable: Vec<u64>,
    inflight: Vec<u32>,
    /// A write of a crashed client may still land (until the next acknowledged write).
    zombie: Vec<bool>,
    /// Bumped whenever a write starts or ends, or the block may change under readers.
    epoch: Vec<u64>,
    /// The last read with no write in flight: (epoch, version).
    quiet: Vec<Option<(u64, u64)>>,
}

/// A read in progress.
pub struct ReadToken {
    block: u64,
    floor: u64,
    epoch: u64,
    quiet: bool,
}

#[derive(Default)]
struct State {
    log: Vec<String>,
    violation: Option<String>,
    faults: BTreeSet<&'static str>,
    blocks: Blocks,
    /// (connection, request id) → (kind, generation, volume generation at delivery).
    requests: BTreeMap<(u64, u64), (Kind, Generation, Generation)>,
    topologies: BTreeMap<Generation, Topology>,
    /// Workload operations in progress: id → (description, start).
    ops: BTreeMap<u64, (String, f64)>,
    next_op: u64,
    reads: u64,
    writes: u64,
    flushes: u64,
    lock_grants: u64,
}

pub struct Checker {
    start: Instant,
    st: Mutex<State>,
    pub cp: Arc<EmbeddedControlPlane>,
    pub volume: Mutex<Option<VolumeId>>,
    pub units: Mutex<u64>,
    /// Running agents by storage node (the world keeps it current).
    pub agents: Mutex<Vec<Option<Arc<AgentHandle>>>>,
    pub verbose: bool,
    /// The blocks whose history is logged (`TOMA_SIM_TRACE_BLOCK`: a block, or a range
    /// `FIRST-LAST` such as a whole stripe), read once.
    trace_block: Option<(u64, u64)>,
    /// `TOMA_SIM_TRACE_UNIT=U`: log every write, lock and recovery frame of lock unit `U`
    /// (and writes within its byte range of each member), with their answers.
    trace_unit: Option<u64>,
    traced: Mutex<std::collections::HashSet<(u64, u64)>>,
}

fn is_io(kind: Kind) -> bool {
    matches!(
        kind,
        Kind::Read
            | Kind::ReadTestLock
            | Kind::Write
            | Kind::Lock
            | Kind::Unlock
            | Kind::SetDirty
            | Kind::ClearDirty
    )
}

/// The storage node a member is on (`n{i}`).
pub(crate) fn node_index(n: &NodeId) -> Option<usize> {
    n.0.strip_prefix('n')?.parse().ok()
}

impl Checker {
    pub fn new(cp: Arc<EmbeddedControlPlane>, storage_nodes: usize, verbose: bool) -> Self {
        Checker {
            start: Instant::now(),
            st: Mutex::new(State::default()),
            cp,
            volume: Mutex::new(None),
            units: Mutex::new(0),
            agents: Mutex::new(vec![None; storage_nodes]),
            verbose,
            trace_block: std::env::var("TOMA_SIM_TRACE_BLOCK")
                .ok()
                .and_then(|v| parse_block_range(&v)),
            trace_unit: std::env::var("TOMA_SIM_TRACE_UNIT")
                .ok()
                .and_then(|v| v.trim().parse().ok()),
            traced: Mutex::new(Default::default()),
        }
    }

    pub fn set_blocks(&self, n: u64) {
        let n = n as usize;
        let mut st = self.st.lock();
        st.blocks = Blocks {
            issued: vec![0; n],
            acked: vec![0; n],
            durable: vec![0; n],
            inflight: vec![0; n],
            zombie: vec![false; n],
            epoch: vec![0; n],
            quiet: vec![None; n],
        };
    }

    pub fn now_secs(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    pub fn log(&self, msg: impl AsRef<str>) {
        let line = format!("[{:9.4}s] {}", self.now_secs(), msg.as_ref());
        if self.verbose {
            eprintln!("{line}");
        }
        self.st.lock().log.push(line);
    }

    pub fn fault(&self, kind: &'static str, msg: impl AsRef<str>) {
        self.st.lock().faults.insert(kind);
        self.log(format!("FAULT {kind}: {}", msg.as_ref()));
    }

    pub fn violate(&self, what: impl AsRef<str>) {
        let line = format!("VIOLATION {}", what.as_ref());
        let first = {
            let mut st = self.st.lock();
            if st.violation.is_none() {
                st.violation = Some(what.as_ref().to_string());
                true
            } else {
                false
            }
        };
        if first {
            self.log(line);
        }
    }

    pub fn violation(&self) -> Option<String> {
        self.st.lock().violation.clone()
    }

    pub fn take_log(&self) -> Vec<String> {
        std::mem::take(&mut self.st.lock().log)
    }

    pub fn faults(&self) -> BTreeSet<&'static str> {
        self.st.lock().faults.clone()
    }

    pub fn counts(&self) -> (u64, u64, u64, u64) {
        let st = self.st.lock();
        (st.reads, st.writes, st.flushes, st.lock_grants)
    }

    /// The volume's current topology (the embedded store answers at once).
    pub fn topology(&self) -> Option<Topology> {
        let vol = (*self.volume.lock())?;
        let t = self.cp.volume(vol).now_or_never()?.ok()??.value.topology;
        let new = {
            let mut st = self.st.lock();
            let e = st.topologies.entry(t.generation);
            let new = matches!(e, std::collections::btree_map::Entry::Vacant(_));
            e.or_insert_with(|| t.clone());
            new
        };
        if new {
            self.log(format!("topology {} {}", t.phase(), t));
        }
        Some(t)
    }

    // ---- the workload ----

    pub fn op_begin(&self, what: String) -> u64 {
        let now = self.now_secs();
        let mut st = self.st.lock();
        st.next_op += 1;
        let id = st.next_op;
        st.ops.insert(id, (what, now));
        id
    }

    pub fn op_end(&self, id: u64) {
        self.st.lock().ops.remove(&id);
    }

    /// Operations in progress, oldest first.
    pub fn pending_ops(&self) -> Vec<String> {
        self.st
            .lock()
            .ops
            .values()
            .map(|(w, t)| format!("{w} (since {t:.3}s)"))
            .collect()
    }

    pub fn forget_ops(&self, prefix: &str) {
        self.st
            .lock()
            .ops
            .retain(|_, (w, _)| !w.starts_with(prefix));
    }

    /// Logs `what` when `b` is the block `TOMA_SIM_TRACE_BLOCK` names (a debugging aid for
    /// replaying a seed: the history of the block a violation is about).
    fn trace(&self, b: u64, what: impl FnOnce() -> String) {
        if self
            .trace_block
            .is_some_and(|(first, last)| (first..=last).contains(&b))
        {
            self.log(format!("block {b}: {}", what()));
        }
    }

    pub fn begin_write(&self, b: u64) -> u64 {
        let v = {
            let mut st = self.st.lock();
            let bl = &mut st.blocks;
            let i = b as usize;
            bl.issued[i] += 1;
            bl.inflight[i] += 1;
            bl.epoch[i] += 1;
            bl.issued[i]
        };
        self.trace(b, || format!("write v{v} begins"));
        v
    }

    pub fn end_write(&self, b: u64, version: u64, ok: bool) {
        let mut st = self.st.lock();
        let i = b as usize;
        {
            let bl = &mut st.blocks;
            bl.inflight[i] = bl.inflight[i].saturating_sub(1);
            bl.epoch[i] += 1;
            if ok {
                bl.acked[i] = bl.acked[i].max(version);
                bl.zombie[i] = false;
            }
        }
        if ok {
            st.writes += 1;
        }
        drop(st);
        self.trace(b, || format!("write v{version} ends, ok {ok}"));
    }

    /// A client crashed: its writes in flight may or may not land, later.
    pub fn orphan_writes(&self, blocks: &[u64]) {
        let mut st = self.st.lock();
        let bl = &mut st.blocks;
        for &b in blocks {
            let i = b as usize;
            if bl.inflight[i] > 0 {
                bl.inflight[i] = 0;
                bl.zombie[i] = true;
                bl.epoch[i] += 1;
            }
        }
    }

    /// Every block's acknowledged versions now: durable once a flush started after them ends.
    pub fn flush_begin(&self) -> Vec<u64> {
        self.st.lock().blocks.acked.clone()
    }

    pub fn flush_end(&self, snapshot: Vec<u64>) {
        let mut st = self.st.lock();
        st.flushes += 1;
        for (d, s) in st.blocks.durable.iter_mut().zip(snapshot) {
            *d = (*d).max(s);
        }
    }

    /// A whole-cluster power loss: only flushed writes must survive.
    pub fn power_lost(&self) {
        let mut st = self.st.lock();
        let bl = &mut st.blocks;
        for i in 0..bl.acked.len() {
            bl.acked[i] = bl.durable[i];
            bl.epoch[i] += 1;
            bl.quiet[i] = None;
        }
    }

    pub fn begin_read(&self, b: u64) -> ReadToken {
        let st = self.st.lock();
        let i = b as usize;
        ReadToken {
            block: b,
            floor: st.blocks.acked[i],
            epoch: st.blocks.epoch[i],
            quiet: st.blocks.inflight[i] == 0 && !st.blocks.zombie[i],
        }
    }

    pub fn end_read(&self, tok: ReadToken, data: &[u8]) {
        let b = tok.block;
        let i = b as usize;
        self.trace(b, || format!("read ends: {:?}", decode_block(b, data)));
        let problem = {
            let mut st = self.st.lock();
            st.reads += 1;
            let bl = &mut st.blocks;
            let ceil = bl.issued[i];
            match decode_block(b, data) {
                None => Some(format!(
                    "P3 validity: a read of block {b} returned bytes no write wrote"
                )),
                Some(v) if v < tok.floor || v > ceil => Some(format!(
                    "P1 durability: a read of block {b} returned version {v}, expected {}..={ceil}",
                    tok.floor
                )),
                Some(v) => {
                    let quiet = tok.quiet
                        && bl.epoch[i] == tok.epoch
                        && bl.inflight[i] == 0
                        && !bl.zombie[i];
                    let mut p = None;
                    if quiet {
                        if let Some((e, prev)) = bl.quiet[i] {
                            if e == tok.epoch && prev != v {
                                p = Some(format!(
                                    "P2 stability: two reads of block {b} with no write between returned versions {prev} and {v}"
                                ));
                            }
                        }
                        bl.quiet[i] = Some((tok.epoch, v));
                    }
                    p
                }
            }
        };
        if let Some(p) = problem {
            self.violate(p);
        }
    }

    /// The final state: every block holds an acknowledged (or later issued) version.
    pub fn expected_range(&self, b: u64) -> (u64, u64) {
        let st = self.st.lock();
        (st.blocks.acked[b as usize], st.blocks.issued[b as usize])
    }

    // ---- sampled invariants ----

    /// Lock tables of the members the control plane places, by disk.
    fn lock_tables(&self, t: &Topology) -> BTreeMap<DiskId, BTreeMap<u64, u128>> {
        let agents = self.agents.lock().clone();
        let mut out = BTreeMap::new();
        for m in &t.members {
            let Some(i) = node_index(&m.node) else {
                continue;
            };
            let Some(Some(a)) = agents.get(i) else {
                continue;
            };
            for hm in a.members() {
                if hm.volume == t.volume && hm.disk.id() == m.disk {
                    let table: BTreeMap<u64, u128> = hm
                        .runtime()
                        .locks
                        .locks()
                        .into_iter()
                        .map(|(u, c)| (u, c.0))
                        .collect();
                    out.insert(m.disk, table);
                }
            }
        }
        out
    }

    /// The lock tables, for a failure message.
    pub fn describe_locks(&self) -> String {
        let Some(t) = self.topology() else {
            return String::new();
        };
        self.lock_tables(&t)
            .iter()
            .map(|(d, tb)| {
                let v: Vec<String> = tb
                    .iter()
                    .map(|(u, c)| format!("{u}:{:08x}", c >> 96))
                    .collect();
                format!("{d}: [{}]", v.join(" "))
            })
            .collect::<Vec<_>>()
            .join("; ")
    }

    /// P5 on the current lock tables.
    pub fn check_exclusion(&self) {
        let Some(t) = self.topology() else { return };
        let prev = self
            .st
            .lock()
            .topologies
            .get(&(t.generation.saturating_sub(1)))
            .cloned();
        let tables = self.lock_tables(&t);
        if tables.values().all(|x| x.is_empty()) {
            return;
        }
        let units = *self.units.lock();
        let mut tops = vec![&t];
        if let Some(p) = prev.as_ref().filter(|p| p.generation < t.generation) {
            tops.push(p);
        }
        for u in 0..units {
            // (client, generation, lost a member to DEAD)
            let mut holders: Vec<(u128, Generation, bool)> = Vec::new();
            for top in &tops {
                let set = locks(top, u);
                if set.is_empty() {
                    continue;
                }
                let mut holder = None;
                let mut complete = true;
                for &m in &set {
                    let disk = top.members[m].disk;
                    let h = tables.get(&disk).and_then(|tb| tb.get(&u)).copied();
                    match (h, holder) {
                        (Some(c), None) => holder = Some(c),
                        (Some(c), Some(x)) if c == x => {}
                        _ => complete = false,
                    }
                }
                if let (true, Some(c)) = (complete, holder) {
                    let lost = set.iter().any(|&m| {
                        let disk = top.members[m].disk;
                        t.members
                            .iter()
                            .find(|x| x.disk == disk)
                            .is_none_or(|x| x.role.is_dead())
                    });
                    holders.push((c, top.generation, lost));
                }
            }
            for a in &holders {
                for b in &holders {
                    if a.0 < b.0 && !a.2 && !b.2 {
                        self.violate(format!(
                            "P5 exclusion: chunk {u}: client {:032x} holds its whole lock set under generation {} and client {:032x} under generation {}",
                            a.0, a.1, b.0, b.1
                        ));
                    }
                }
            }
        }
    }

    /// Superblocks never run ahead of the control plane.
    pub fn check_superblocks(&self) {
        let Some(t) = self.topology() else { return };
        let agents = self.agents.lock().clone();
        for a in agents.iter().flatten() {
            for m in a.members() {
                if m.volume != t.volume {
                    continue;
                }
                if let Some(e) = m.disk.extent(m.volume, m.idx()) {
                    if e.generation > t.generation {
                        self.violate(format!(
                            "superblock: disk {} records generation {} for member {}, the control plane is at {}",
                            m.disk.id(), e.generation, m.idx(), t.generation
                        ));
                    }
                }
            }
        }
    }
}

impl Observer for Checker {
    fn deliver(&self, conn: u64, from: usize, to: usize, request: bool, frame: &Frame) {
        let kind = frame.msg.kind();
        if let Some(u) = self.trace_unit {
            self.trace_frame(u, conn, from, to, request, frame);
        }
        if request {
            if is_io(kind) {
                let g = self.topology().map_or(0, |t| t.generation);
                self.st
                    .lock()
                    .requests
                    .insert((conn, frame.request_id), (kind, frame.generation, g));
            }
            return;
        }
        if frame.request_id == 0 {
            return;
        }
        let Some((rk, rg, at)) = self.st.lock().requests.remove(&(conn, frame.request_id)) else {
            return;
        };
        if matches!(frame.msg, Message::Error { .. }) {
            return;
        }
        if at >= rg + 2 {
            self.violate(format!(
                "generations: an agent accepted a {} of generation {rg} while the volume was at generation {at}",
                rk.name()
            ));
        }
        if rk == Kind::Lock && matches!(frame.msg, Message::Ok) {
            self.st.lock().lock_grants += 1;
            self.check_exclusion();
        }
    }
}

impl Checker {
    /// The frame log of `TOMA_SIM_TRACE_UNIT` (a debugging aid for replaying a seed).
    fn trace_frame(&self, u: u64, conn: u64, from: usize, to: usize, request: bool, frame: &Frame) {
        let unit_bytes = crate::world::CHUNK;
        let what = match &frame.msg {
            Message::Write { offset, data } if offset / unit_bytes == u => {
                format!("WRITE off={offset} len={}", data.len())
            }
            Message::Lock { unit } if *unit == u => "LOCK".to_string(),
            Message::Unlock { unit } if *unit == u => "UNLOCK".to_string(),
            Message::Intent { unit, column, data } if *unit == u => {
                format!("INTENT column={column} len={}", data.len())
            }
            Message::ReleaseLock { unit, client } if *unit == u => {
                format!("RELEASE_LOCK client={client}")
            }
            Message::Register { client, .. } => format!("REGISTER {client}"),
            Message::FenceClient { client } => format!("FENCE_CLIENT {client}"),
            Message::PutLocks { locks } => format!("PUT_LOCKS {} entries", locks.len()),
            Message::SwitchTopo { topology } => format!("SWITCH_TOPO g{}", topology.generation),
            Message::Fenced { reason } => format!("FENCED {reason}"),
            Message::Error { code, message } => format!("ERROR {code:?} {message}"),
            Message::Ok => "OK".to_string(),
            Message::Locked { holder } => format!("LOCKED by {holder}"),
            _ => return,
        };
        if request {
            self.traced.lock().insert((conn, frame.request_id));
        } else if frame.request_id != 0 && !self.traced.lock().remove(&(conn, frame.request_id)) {
            return;
        }
        let dir = if request { "->" } else { "<-" };
        self.log(format!(
            "frame c{conn} n{from}{dir}n{to} g{} r{} {what}",
            frame.generation, frame.request_id
        ));
    }
}

/// `TOMA_SIM_TRACE_BLOCK`'s value: `N` or `FIRST-LAST`.
fn parse_block_range(v: &str) -> Option<(u64, u64)> {
    match v.split_once('-') {
        Some((a, b)) => Some((a.trim().parse().ok()?, b.trim().parse().ok()?)),
        None => {
            let b = v.trim().parse().ok()?;
            Some((b, b))
        }
    }
}
