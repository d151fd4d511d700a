//! The leader loop: for every volume, gather what the leader knows, ask `toma_core::plan`
//! for the next topology, and write it with a compare-and-swap that carries the leader's
//! epoch. The same loop runs embedded (`toma demo`) and in the operator.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use toma_core::allocate::{choose_disks, Candidate};
use toma_core::{
    plan_with, DiskId, Knowledge, MemberReport, Mutations, NodeId, Plan, Replacement, Role,
    Topology, VolumeId,
};
use tracing::{debug, info, warn};

use crate::api::{ControlPlane, CpError, CpResult};
use crate::clock::Clock;
use crate::records::{Epoch, RebuildProgress};

#[derive(Debug, Clone)]
pub struct LeaderConfig {
    /// Name written with the leadership (a pod name in Kubernetes).
    pub name: String,
    /// A node whose heartbeat counter has not changed for this long (on the leader's own
    /// monotonic clock) is considered gone, with all its disks.
    pub node_timeout: Duration,
    /// A member DEAD for this long (leader's clock) is replaced by a NEW disk, if one fits.
    pub replace_after: Duration,
    /// A member reported unreachable by a client is tried again after this long (leader's
    /// clock) if its agent did not restart meanwhile.
    pub readmit_after: Duration,
    /// Deliberate bugs, for proving the checkers can fail. Default: none.
    pub mutations: Mutations,
}

impl Default for LeaderConfig {
    fn default() -> Self {
        LeaderConfig {
            name: "leader".into(),
            node_timeout: Duration::from_secs(10),
            replace_after: Duration::from_secs(600),
            readmit_after: Duration::from_secs(30),
            mutations: Mutations::default(),
        }
    }
}

/// One topology change the leader made.
#[derive(Debug, Clone)]
pub struct Transition {
    pub volume: VolumeId,
    pub name: String,
    pub from: Topology,
    pub to: Topology,
}

/// Rebuild progress of a volume, for status displays.
#[derive(Debug, Clone)]
pub struct VolumeView {
    pub name: String,
    pub topology: Topology,
    pub rebuild: Option<RebuildProgress>,
}

struct Seen {
    heartbeat: u64,
    boot: u64,
    /// Observed silence: leader-clock time over which this leader read the node's record
    /// and found it unchanged.
    silent: Duration,
}

/// Called by `Leader::run` with the topology changes of each pass (see
/// `Leader::with_transition_hook`).
pub type TransitionHook = Arc<dyn Fn(&[Transition]) + Send + Sync>;

pub struct Leader {
    cp: Arc<dyn ControlPlane>,
    clock: Arc<dyn Clock>,
    cfg: LeaderConfig,
    epoch: Option<Epoch>,
    seen: BTreeMap<NodeId, Seen>,
    /// When this leader last read the nodes (its own clock).
    last_read: Option<Duration>,
    dead_since: BTreeMap<(VolumeId, usize, DiskId), Duration>,
    /// When this leader first saw each unreachability report, and the node's boot then.
    unreachable_seen: BTreeMap<(VolumeId, DiskId, u64), (Duration, u64)>,
    /// Reports found at takeover that a predecessor had already handled.
    unreachable_handled: BTreeSet<(VolumeId, DiskId, u64)>,
    hook: Option<TransitionHook>,
}

impl Leader {
    pub fn new(cp: Arc<dyn ControlPlane>, clock: Arc<dyn Clock>, cfg: LeaderConfig) -> Self {
        Leader {
            cp,
            clock,
            cfg,
            epoch: None,
            seen: BTreeMap::new(),
            last_read: None,
            dead_since: BTreeMap::new(),
            unreachable_seen: BTreeMap::new(),
            unreachable_handled: BTreeSet::new(),
            hook: None,
        }
    }

    /// Makes `run` hand every non-empty list of transitions a pass wrote to `hook` (the
    /// operator publishes a Kubernetes Event per transition). The hook runs inside the loop:
    /// it must not block (queue the work elsewhere).
    pub fn with_transition_hook(mut self, hook: TransitionHook) -> Self {
        self.hook = Some(hook);
        self
    }

    pub fn epoch(&self) -> Option<Epoch> {
        self.epoch
    }

    /// Nodes whose agents have reported recently, judged on this leader's clock only.
    ///
    /// Silence is counted only over time this leader could observe: each read credits the
    /// time since its previous read, at most half of `node_timeout`. A longer gap (the
    /// control plane did not answer, or this process was paused) counts no more than that,
    /// so an outage of the API server or of the leader itself never makes nodes that kept
    /// beating look dead: they get a fresh chance to be seen.
    fn live_nodes(&mut self, nodes: &[crate::records::NodeRecord]) -> BTreeSet<NodeId> {
        let now = self.clock.now();
        let credit = self.last_read.map_or(Duration::ZERO, |prev| {
            now.saturating_sub(prev).min(self.cfg.node_timeout / 2)
        });
        self.last_read = Some(now);
        let mut live = BTreeSet::new();
        for n in nodes {
            let s = self.seen.entry(n.node.clone()).or_insert(Seen {
                heartbeat: n.heartbeat,
                boot: n.boot,
                silent: Duration::ZERO,
            });
            if s.heartbeat != n.heartbeat || s.boot != n.boot {
                *s = Seen {
                    heartbeat: n.heartbeat,
                    boot: n.boot,
                    silent: Duration::ZERO,
                };
            } else {
                s.silent = s.silent.saturating_add(credit);
            }
            if s.silent < self.cfg.node_timeout {
                live.insert(n.node.clone());
            }
        }
        live
    }

    /// One pass over every volume. Returns the topology changes written.
    pub async fn tick(&mut self) -> CpResult<Vec<Transition>> {
        let taking_over = self.epoch.is_none();
        let epoch = match self.epoch {
            Some(e) => e,
            None => {
                let e = self.cp.acquire_leadership(&self.cfg.name).await?;
                info!(epoch = e, leader = %self.cfg.name, "took the leadership");
                self.epoch = Some(e);
                e
            }
        };
        let now = self.clock.now();
        let nodes = self.cp.nodes().await?;
        let live = self.live_nodes(&nodes);
        let disks = self.cp.disks().await?;
        let disk_node: BTreeMap<DiskId, NodeId> = disks
            .iter()
            .filter(|d| d.healthy && live.contains(&d.node))
            .map(|d| (d.disk, d.node.clone()))
            .collect();
        let mut changes = Vec::new();
        for vol in self.cp.volumes().await? {
            let rec = &vol.value;
            let t = &rec.topology;
            let statuses = self.cp.member_statuses(rec.id).await?;
            let unreachable = self.cp.unreachable(rec.id).await?;
            let mut reports = Vec::with_capacity(t.n());
            for (i, m) in t.members.iter().enumerate() {
                let mut present = disk_node.get(&m.disk).cloned();
                // A member a client cannot reach stays away until its agent restarts (a new
                // boot) or, for a broken link, until `readmit_after` has passed on this
                // leader's clock; then it is tried again.
                //
                // A report this leader found when it took over, made under an older generation
                // about a member alive in the current one, was already handled by a
                // predecessor (which let the member back); taking it as fresh would fail
                // members that are fine. A client that still cannot reach the member reports
                // again under the new generation.
                let report = unreachable.iter().find(|u| u.disk == m.disk);
                if let Some(u) = report {
                    if taking_over && !m.role.is_dead() && u.generation < t.generation {
                        self.unreachable_handled
                            .insert((rec.id, m.disk, u.generation));
                    }
                }
                if let (Some(node), Some(u)) = (&present, report) {
                    let boot = self.seen.get(node).map_or(0, |s| s.boot);
                    let key = (rec.id, m.disk, u.generation);
                    let (first, boot_then) =
                        *self.unreachable_seen.entry(key).or_insert((now, boot));
                    if !self.unreachable_handled.contains(&key)
                        && boot == boot_then
                        && now.saturating_sub(first) < self.cfg.readmit_after
                    {
                        present = None;
                    }
                }
                let status = statuses
                    .iter()
                    .find(|s| s.disk == m.disk && s.node == m.node);
                // Dirty bits are lost when the holder's agent restarted after the volume
                // went degraded; the agent says so itself.
                let dirty_bits_lost = status.is_some_and(|s| s.dirty_bits_lost);
                reports.push(MemberReport {
                    present,
                    synced: status.map_or(0, |s| s.synced),
                    dirty_bits_lost,
                    // A live member is failed for it only on a report made under the current
                    // generation (one made before, e.g. before the volume restarted from this
                    // very copy, is out of date); a returning one whenever it says so.
                    stale: status
                        .is_some_and(|s| s.stale && (m.role.is_dead() || s.synced >= t.generation)),
                });
                let key = (rec.id, i, m.disk);
                if m.role.is_dead() {
                    self.dead_since.entry(key).or_insert(now);
                } else {
                    self.dead_since.remove(&key);
                }
            }
            let rebuild_done = statuses
                .iter()
                // Only the member's current host speaks for it.
                .filter(|s| {
                    t.members
                        .iter()
                        .any(|m| m.disk == s.disk && m.node == s.node)
                })
                .filter_map(|s| s.rebuild)
                .find(|r| r.finished && r.generation == t.generation)
                .map(|r| r.generation);
            let replacement = self.replacement(
                rec.id,
                t,
                rec.spec.member_bytes(),
                &disks,
                &disk_node,
                &reports,
                now,
            );
            let k = Knowledge {
                members: reports,
                rebuild_done,
                replacement,
            };
            let plan = match plan_with(t, &k, self.cfg.mutations) {
                Ok(p) => p,
                Err(e) => {
                    warn!(volume = %rec.name, error = %e, "cannot plan");
                    continue;
                }
            };
            let Plan::Next(next) = plan else {
                debug!(volume = %rec.name, ?plan, knowledge = ?k.members, members = ?t.members, "waiting");
                continue;
            };
            match self
                .cp
                .cas_topology(rec.id, vol.version, epoch, next.clone())
                .await
            {
                Ok(_) => {
                    info!(volume = %rec.name, from = %t, to = %next, "topology change");
                    // A member let back in (DEAD → W): the reports that made it DEAD were
                    // acted on. Clear them so a later leader does not take them as news (a
                    // client that still cannot reach it reports again, under the new
                    // generation).
                    for (i, m) in next.members.iter().enumerate() {
                        let was = &t.members[i];
                        if was.role.is_dead() && !m.role.is_dead() {
                            for disk in [was.disk, m.disk] {
                                if let Err(e) = self.cp.clear_unreachable(rec.id, disk).await {
                                    debug!(volume = %rec.name, error = %e, "handled unreachability report not cleared");
                                }
                            }
                        }
                    }
                    changes.push(Transition {
                        volume: rec.id,
                        name: rec.name.clone(),
                        from: t.clone(),
                        to: next,
                    });
                }
                Err(CpError::Conflict { .. }) => {
                    debug!(volume = %rec.name, "topology changed under us; next pass");
                }
                Err(e @ CpError::Deposed { .. }) => {
                    warn!(error = %e, "no longer the leader; stepping down");
                    self.epoch = None;
                    return Err(e);
                }
                Err(e) => {
                    warn!(volume = %rec.name, error = %e, "topology write refused");
                }
            }
        }
        Ok(changes)
    }

    #[allow(clippy::too_many_arguments)]
    fn replacement(
        &self,
        id: VolumeId,
        t: &Topology,
        member_bytes: u64,
        disks: &[crate::records::DiskRecord],
        disk_node: &BTreeMap<DiskId, NodeId>,
        reports: &[MemberReport],
        now: Duration,
    ) -> Option<Replacement> {
        let (idx, _) = t.members.iter().enumerate().find(|(i, m)| {
            // Its disk is gone, or back on a node where another member lives (it cannot
            // return there: no two live members share a node).
            let stuck = match &reports[*i].present {
                None => true,
                Some(n) => t.node_taken(*i, n),
            };
            m.role == Role::Dead
                && stuck
                && self
                    .dead_since
                    .get(&(id, *i, m.disk))
                    .is_some_and(|since| now.saturating_sub(*since) >= self.cfg.replace_after)
        })?;
        let used: Vec<NodeId> = t
            .members
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != idx)
            .map(|(_, m)| m.node.clone())
            .collect();
        let candidates: Vec<Candidate> = disks
            .iter()
            .filter(|d| {
                disk_node.contains_key(&d.disk) && !t.members.iter().any(|m| m.disk == d.disk)
            })
            .map(|d| Candidate {
                disk: d.disk,
                node: d.node.clone(),
                free: d.free,
            })
            .collect();
        let chosen = choose_disks(&candidates, t.layout, member_bytes, 1, &used).ok()?;
        let (disk, node) = chosen.into_iter().next()?;
        Some(Replacement {
            member: idx,
            disk,
            node,
        })
    }

    /// Runs until `stop` turns true: a pass on every control-plane change, and at least every
    /// `interval` (so node timeouts are noticed).
    pub async fn run(mut self, interval: Duration, mut stop: tokio::sync::watch::Receiver<bool>) {
        let mut changes = self.cp.changes();
        loop {
            if *stop.borrow() {
                return;
            }
            match self.tick().await {
                Ok(ts) if !ts.is_empty() => {
                    if let Some(hook) = &self.hook {
                        hook(&ts);
                    }
                }
                Ok(_) => {}
                Err(e) => warn!(error = %e, category = e.category(), "leader pass failed"),
            }
            tokio::select! {
                _ = changes.changed() => {}
                _ = tokio::time::sleep(interval) => {}
                _ = stop.changed() => {}
            }
        }
    }
}
