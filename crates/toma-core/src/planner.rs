//! The leader's planner: from the current topology and what the leader knows, the next
//! topology (generation g+1), or nothing.
//!
//! The leader only moves on when every live member's TOMA reports that all its clients
//! acknowledged generation g — so at most two adjacent generations are ever in use.

use std::collections::BTreeSet;

use thiserror::Error;

use crate::topology::{
    DiskId, Generation, LockMode, MemberIdx, NodeId, Phase, Role, Topology, TopologyError,
};

/// What the leader knows about one member (indexed like `Topology::members`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct MemberReport {
    /// The node on which this member's disk is seen now (found by its UUID), or `None` when
    /// it is gone: unplugged, its agent dead, or reported unreachable by a client.
    pub present: Option<NodeId>,
    /// The newest generation for which this member's TOMA reports that every client it has
    /// registered acknowledged SWITCH_TOPO.
    pub synced: Generation,
    /// This member's TOMA lost its RAM dirty bits (it restarted) since the volume went
    /// degraded: a rebuild that relies on them must be full.
    pub dirty_bits_lost: bool,
    /// This member's disk lost power since its last flush (its agent says so): it may miss
    /// writes it acknowledged. A live member is failed at once; a returning one is rebuilt
    /// in full.
    pub stale: bool,
}

impl MemberReport {
    pub fn up(node: impl Into<NodeId>, synced: Generation) -> Self {
        MemberReport {
            present: Some(node.into()),
            synced,
            dirty_bits_lost: false,
            stale: false,
        }
    }
    pub fn gone(synced: Generation) -> Self {
        MemberReport {
            present: None,
            synced,
            dirty_bits_lost: false,
            stale: false,
        }
    }
}

/// A NEW disk the leader offers in place of a member that has been DEAD for longer than its
/// grace period (measured on the leader's own monotonic clock, outside this crate).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Replacement {
    pub member: MemberIdx,
    pub disk: DiskId,
    pub node: NodeId,
}

/// Everything the planner looks at besides the topology.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Knowledge {
    pub members: Vec<MemberReport>,
    /// The generation under which the rebuilder reported one complete cycle (every dirty unit
    /// copied and cleared).
    pub rebuild_done: Option<Generation>,
    pub replacement: Option<Replacement>,
}

/// The planner was given something it cannot plan from.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum PlanError {
    #[error("invalid current topology: {0}")]
    Topology(#[from] TopologyError),
    #[error("knowledge.members has {got} reports, the topology has {want} members")]
    ReportCount { got: usize, want: usize },
    #[error("knowledge.replacement.member = {got}: out of range (0..{n})")]
    ReplacementMember { got: usize, n: usize },
}

/// Why the planner returned no new topology (for status and logs).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Wait {
    /// Member `member`'s TOMA has not yet synced its clients to the current generation.
    Sync {
        member: MemberIdx,
        synced: Generation,
    },
    /// Rebuilding: the rebuild cycle has not finished.
    Rebuild,
    /// Degraded or Failed with nothing to bring back.
    NothingToRestore,
    /// Normal: nothing to do.
    Stable,
}

/// The result of one planning step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Next(Topology),
    Wait(Wait),
}

impl Plan {
    pub fn next(self) -> Option<Topology> {
        match self {
            Plan::Next(t) => Some(t),
            Plan::Wait(_) => None,
        }
    }
}

/// Deliberate bugs, used only to prove that the model checker and the simulation catch them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mutations {
    /// Rebuilding goes straight to Normal, skipping DualLock.
    pub skip_dual_lock: bool,
    /// The leader moves to g+1 before every member synced g.
    pub early_advance: bool,
}

/// One planning step without mutations.
pub fn plan(t: &Topology, k: &Knowledge) -> Result<Plan, PlanError> {
    plan_with(t, k, Mutations::default())
}

/// One planning step. Never panics: invalid input is an error.
pub fn plan_with(t: &Topology, k: &Knowledge, mutate: Mutations) -> Result<Plan, PlanError> {
    t.validate()?;
    if k.members.len() != t.n() {
        return Err(PlanError::ReportCount {
            got: k.members.len(),
            want: t.n(),
        });
    }
    if let Some(r) = &k.replacement {
        if r.member >= t.n() {
            return Err(PlanError::ReplacementMember {
                got: r.member,
                n: t.n(),
            });
        }
    }
    let g = t.generation;
    let Some(next_gen) = g.checked_add(1) else {
        return Ok(Plan::Wait(Wait::Stable));
    };

    // A member is lost when its disk is gone, or shows up on another node than the one it
    // serves from (it moved: its TOMA, locks and dirty bits are not the ones clients use),
    // or lost power since its last flush (it may miss acknowledged writes).
    let lost: BTreeSet<MemberIdx> = t
        .members
        .iter()
        .enumerate()
        .filter(|(i, m)| {
            !m.role.is_dead()
                && (k.members[*i].present.as_ref() != Some(&m.node) || k.members[*i].stale)
        })
        .map(|(i, _)| i)
        .collect();

    // Every live member that is still here must have synced its clients to g.
    if !mutate.early_advance {
        for (i, m) in t.members.iter().enumerate() {
            if m.role.is_dead() || lost.contains(&i) {
                continue;
            }
            if k.members[i].synced < g {
                return Ok(Plan::Wait(Wait::Sync {
                    member: i,
                    synced: k.members[i].synced,
                }));
            }
        }
    }

    let mut next = t.clone();
    next.generation = next_gen;

    if !lost.is_empty() {
        for &i in &lost {
            // What it missed is unknown: when it returns, it is rebuilt in full.
            if k.members[i].stale {
                next.members[i].full_rebuild = true;
            }
        }
        if t.phase() == Phase::Resync {
            // Parity is not trusted until the resync pass is done, so nothing may be
            // reconstructed: the volume fails again. Every member was written by every
            // acknowledged write, so all stay last-good, and the resync starts over once
            // they are all back.
            for m in next.members.iter_mut() {
                m.role = Role::Dead;
                m.last_good = true;
            }
            next.rebuild = false;
            normalize(&mut next);
            return Ok(Plan::Next(next));
        }
        forced_failure(&mut next, &lost);
        normalize(&mut next);
        return Ok(Plan::Next(next));
    }

    match t.phase() {
        Phase::Normal => Ok(Plan::Wait(Wait::Stable)),
        Phase::Failed => {
            // Only the members that held every acknowledged write (the last readable ones)
            // may bring it back. They may come back on another node (a disk moved while the
            // volume was failed), each on a node of its own.
            let good: Vec<MemberIdx> = t
                .members
                .iter()
                .enumerate()
                .filter(|(_, m)| m.last_good)
                .map(|(i, _)| i)
                .collect();
            if t.layout.is_raid6() && good.len() == t.n() {
                if let Some(plan) = raid6_resync(t, k, next.clone()) {
                    return Ok(plan);
                }
            }
            let mut at: Vec<(MemberIdx, NodeId)> = Vec::new();
            for &i in &good {
                if let Some(node) = &k.members[i].present {
                    if !at.iter().any(|(_, n)| n == node) {
                        at.push((i, node.clone()));
                    }
                }
            }
            // One readable set of them is the source; the others may differ from it (a
            // write in flight when the volume failed, or lost with a disk's power) and are
            // rebuilt from it in full, like every member that was not good. Copies that kept
            // power are preferred; ones that lost it only once every good copy is back.
            let need = t.layout.min_readable().max(1);
            // A copy that lost power is known by its report, and, once its agent let go of
            // that (the leader marked it for a full rebuild), by `full_rebuild`: preferring
            // it while a copy that kept power is away loses writes (sim seed 593).
            let fresh: Vec<&(MemberIdx, NodeId)> = at
                .iter()
                .filter(|(i, _)| !k.members[*i].stale && !t.members[*i].full_rebuild)
                .collect();
            // RAID6 that failed while degraded: a write torn when the volume failed is put
            // right by stale-lock recovery only with redundancy to spare (k members decode
            // a torn stripe into bytes no write wrote; k + 1 still read it from the data
            // and the parity the write had not reached yet). So it waits for every good
            // member, as a resync does, until they are all back — or until one has been
            // gone so long that the leader offers a replacement: then k are enough.
            let raid6_all = t.layout.is_raid6() && good.len() < t.n();
            if raid6_all && at.len() < good.len() && k.replacement.is_none() {
                return Ok(Plan::Wait(Wait::NothingToRestore));
            }
            let chosen: Vec<&(MemberIdx, NodeId)> = if raid6_all && fresh.len() == good.len() {
                fresh
            } else if fresh.len() >= need {
                fresh.into_iter().take(need).collect()
            } else if at.len() == good.len() && at.len() >= need {
                at.iter().take(need).collect()
            } else {
                return Ok(Plan::Wait(Wait::NothingToRestore));
            };
            let sources: Vec<MemberIdx> = chosen.iter().map(|(i, _)| *i).collect();
            for (i, node) in chosen {
                next.members[*i].node = node.clone();
            }
            for (i, m) in next.members.iter_mut().enumerate() {
                m.last_good = false;
                if sources.contains(&i) {
                    m.role = Role::Rwl;
                    m.full_rebuild = false;
                } else {
                    // What it missed while the volume was failed is unknown: copy it all.
                    m.full_rebuild = true;
                }
            }
            normalize(&mut next);
            Ok(Plan::Next(next))
        }
        Phase::Degraded => {
            let any_bits_lost = t
                .members
                .iter()
                .enumerate()
                .any(|(i, m)| m.role == Role::Rwl && k.members[i].dirty_bits_lost);
            let mut changed = false;
            // Returning disks (same UUID, same or another node) come back as W, together.
            for i in 0..t.n() {
                if !t.members[i].role.is_dead() {
                    continue;
                }
                let Some(node) = &k.members[i].present else {
                    continue;
                };
                if next.node_taken(i, node) {
                    continue;
                }
                let m = &mut next.members[i];
                m.node = node.clone();
                m.role = Role::W;
                m.full_rebuild |= any_bits_lost || k.members[i].stale;
                m.last_good = false;
                changed = true;
            }
            // Otherwise a NEW disk may replace a DEAD member: everything is dirty.
            if !changed {
                if let Some(r) = &k.replacement {
                    // A NEW disk goes to a node no member uses, not even a DEAD one (whose
                    // disk may still come back there).
                    let free = t.members[r.member].role.is_dead()
                        && !t
                            .members
                            .iter()
                            .enumerate()
                            .any(|(j, m)| j != r.member && m.node == r.node)
                        && !t.members.iter().any(|m| m.disk == r.disk);
                    if free {
                        let m = &mut next.members[r.member];
                        m.disk = r.disk;
                        m.node = r.node.clone();
                        m.role = Role::W;
                        m.full_rebuild = true;
                        m.last_good = false;
                        changed = true;
                    }
                }
            }
            if !changed {
                return Ok(Plan::Wait(Wait::NothingToRestore));
            }
            normalize(&mut next);
            Ok(Plan::Next(next))
        }
        Phase::RebuildInit => {
            next.rebuild = true;
            Ok(Plan::Next(next))
        }
        Phase::Resync => {
            if k.rebuild_done != Some(g) {
                return Ok(Plan::Wait(Wait::Rebuild));
            }
            for m in next.members.iter_mut() {
                m.full_rebuild = false;
            }
            next.rebuild = false;
            Ok(Plan::Next(next))
        }
        Phase::Rebuilding => {
            if k.rebuild_done != Some(g) {
                return Ok(Plan::Wait(Wait::Rebuild));
            }
            let to = if mutate.skip_dual_lock {
                Role::Rwl
            } else {
                Role::Wl
            };
            for m in next.members.iter_mut() {
                if m.role == Role::W {
                    m.role = to;
                    m.full_rebuild = false;
                }
            }
            next.rebuild = false;
            normalize(&mut next);
            Ok(Plan::Next(next))
        }
        Phase::DualLock => {
            for m in next.members.iter_mut() {
                if m.role == Role::Wl {
                    m.role = Role::Rwl;
                }
            }
            normalize(&mut next);
            Ok(Plan::Next(next))
        }
    }
}

/// Marks `lost` DEAD and keeps the volume serving if it can.
fn forced_failure(next: &mut Topology, lost: &BTreeSet<MemberIdx>) {
    let lost_readable = lost.iter().any(|&i| next.members[i].role == Role::Rwl);
    let was_readable: Vec<MemberIdx> = next.members_with(Role::Rwl).collect();
    for &i in lost {
        next.members[i].role = Role::Dead;
        next.members[i].last_good = false;
    }
    if lost_readable {
        // The bitmaps about other DEAD members lived (also) on the lost one: what the
        // survivors hold may be incomplete, so those members are rebuilt in full.
        for (i, m) in next.members.iter_mut().enumerate() {
            if m.role.is_dead() && !lost.contains(&i) {
                m.full_rebuild = true;
            }
        }
    }
    let readable = next.count(Role::Rwl);
    if readable < next.layout.min_readable() {
        // A WL member is fully rebuilt and written by every write since: it can be read.
        for m in next.members.iter_mut() {
            if m.role == Role::Wl {
                m.role = Role::Rwl;
            }
        }
    }
    if next.count(Role::Rwl) < next.layout.min_readable() {
        // Failed. Those that were readable until now hold every acknowledged write.
        for (i, m) in next.members.iter_mut().enumerate() {
            if m.role == Role::W {
                m.role = Role::Dead;
                m.full_rebuild = true;
            }
            m.last_good = was_readable.contains(&i) || m.role == Role::Rwl;
            if m.last_good {
                m.role = Role::Dead;
            }
        }
    }
}

/// RAID6 back from Failed when every member held every acknowledged write (it failed from
/// Normal, or from a resync: a whole-cluster power loss, or three members cut off at once).
/// A write in flight then, or torn by the power loss, may have left a stripe whose parity
/// disagrees with its data; decoding such a stripe returns bytes no write wrote, and nothing
/// records which stripes they are. So no member is rebuilt from the others: once all are
/// back, each on a node of its own, all become readable and P and Q of every stripe are
/// re-encoded from the data ([`Phase::Resync`]). Until then the volume waits — unless some
/// member has been gone so long that the leader offers a replacement, or only some members
/// lost power since their last flush (those may miss acknowledged writes and must be
/// rebuilt from the others): then `None`, and the caller restores from k members.
fn raid6_resync(t: &Topology, k: &Knowledge, mut next: Topology) -> Option<Plan> {
    let mut nodes = BTreeSet::new();
    let here = (0..t.n())
        .filter(|&i| {
            k.members[i]
                .present
                .as_ref()
                .is_some_and(|n| nodes.insert(n.clone()))
        })
        .count();
    let stale = (0..t.n()).filter(|&i| k.members[i].stale).count();
    if stale != 0 && stale != t.n() {
        return None;
    }
    if here < t.n() {
        return k
            .replacement
            .is_none()
            .then_some(Plan::Wait(Wait::NothingToRestore));
    }
    for (i, m) in next.members.iter_mut().enumerate() {
        if let Some(node) = &k.members[i].present {
            m.node = node.clone();
        }
        m.role = Role::Rwl;
        // After a whole-cluster power loss every member lost its unflushed writes alike
        // (only flushed ones had to survive). `full_rebuild` on a readable member tells its
        // agent that the leader took that into account, so it serves again; it is cleared
        // when the resync is done.
        m.full_rebuild = k.members[i].stale;
        m.last_good = false;
    }
    next.lock_mode = LockMode::Interleaved;
    next.rebuild = true;
    Some(Plan::Next(next))
}

/// Restores the derived fields: lock mode from the roles, rebuild flag only with W members.
fn normalize(t: &mut Topology) {
    t.lock_mode = if t.count(Role::Wl) > 0 {
        LockMode::DualLock
    } else {
        LockMode::Interleaved
    };
    if t.count(Role::W) == 0 && t.phase() != Phase::Resync {
        t.rebuild = false;
    }
}

/// Reports in which every member is present where the topology says and synced to `g`.
pub fn all_synced(t: &Topology) -> Knowledge {
    Knowledge {
        members: t
            .members
            .iter()
            .map(|m| MemberReport::up(m.node.clone(), t.generation))
            .collect(),
        rebuild_done: None,
        replacement: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::adjacent::check_adjacent;
    use crate::topology::tests::raid1;

    fn step(t: &Topology, k: &Knowledge) -> Topology {
        let n = plan(t, k).unwrap().next().expect("a next topology");
        check_adjacent(t, &n).unwrap();
        n
    }

    #[test]
    fn raid1_full_life_cycle() {
        let t0 = raid1(2);
        let mut k = all_synced(&t0);
        assert_eq!(plan(&t0, &k).unwrap(), Plan::Wait(Wait::Stable));
        k.members[1].present = None;
        let t1 = step(&t0, &k);
        assert_eq!(t1.phase(), Phase::Degraded);
        assert_eq!(t1.generation, 2);
        // Not synced yet: wait.
        assert!(matches!(
            plan(&t1, &k).unwrap(),
            Plan::Wait(Wait::Sync { member: 0, .. })
        ));
        let mut k = all_synced(&t1);
        k.members[1].present = None;
        assert_eq!(plan(&t1, &k).unwrap(), Plan::Wait(Wait::NothingToRestore));
        // The disk returns, on another node.
        k.members[1].present = Some("node9".into());
        let t2 = step(&t1, &k);
        assert_eq!(t2.phase(), Phase::RebuildInit);
        assert_eq!(t2.members[1].node, NodeId::from("node9"));
        assert!(!t2.members[1].full_rebuild);
        let k = all_synced(&t2);
        let t3 = step(&t2, &k);
        assert_eq!(t3.phase(), Phase::Rebuilding);
        let mut k = all_synced(&t3);
        assert_eq!(plan(&t3, &k).unwrap(), Plan::Wait(Wait::Rebuild));
        k.rebuild_done = Some(t2.generation);
        assert_eq!(plan(&t3, &k).unwrap(), Plan::Wait(Wait::Rebuild));
        k.rebuild_done = Some(t3.generation);
        let t4 = step(&t3, &k);
        assert_eq!(t4.phase(), Phase::DualLock);
        let t5 = step(&t4, &all_synced(&t4));
        assert_eq!(t5.phase(), Phase::Normal);
        assert_eq!(t5.generation, 6);
    }

    #[test]
    fn failed_volume_returns_when_its_good_disk_moved() {
        let mut t = raid1(2);
        t.members[0].role = Role::Dead;
        t.members[0].full_rebuild = true;
        t.members[1].role = Role::Dead;
        t.members[1].last_good = true;
        t.members[1].node = "n3".into();
        assert_eq!(t.phase(), Phase::Failed);
        let mut k = all_synced(&t);
        k.members[0].present = Some(t.members[0].node.clone());
        k.members[1].present = Some("n1".into());
        let n = step(&t, &k);
        assert_eq!(n.phase(), Phase::Degraded);
        assert_eq!(n.members[1].role, Role::Rwl);
        assert_eq!(n.members[1].node, NodeId::from("n1"));
    }

    #[test]
    fn a_member_that_lost_power_is_failed_and_returns_with_a_full_rebuild() {
        let t = raid1(2);
        let mut k = all_synced(&t);
        k.members[1].stale = true;
        let d = step(&t, &k);
        assert_eq!(d.phase(), Phase::Degraded);
        assert_eq!(d.members[1].role, Role::Dead);
        assert!(d.members[1].full_rebuild);
        // It returns (its agent still says so, or not any more): everything is copied.
        let mut k = all_synced(&d);
        k.members[1].stale = false;
        let w = step(&d, &k);
        assert_eq!(w.members[1].role, Role::W);
        assert!(w.members[1].full_rebuild);
        // A DEAD member that lost power while it was away also comes back in full.
        let mut d2 = d.clone();
        d2.members[1].full_rebuild = false;
        let mut k = all_synced(&d2);
        k.members[1].stale = true;
        let w = step(&d2, &k);
        assert_eq!(w.members[1].role, Role::W);
        assert!(w.members[1].full_rebuild);
    }

    #[test]
    fn a_failed_volume_restarts_from_one_copy_and_rebuilds_the_others_in_full() {
        let mut t = raid1(3);
        for m in t.members.iter_mut() {
            m.role = Role::Dead;
            m.last_good = true;
        }
        assert_eq!(t.phase(), Phase::Failed);
        let n = step(&t, &all_synced(&t));
        assert_eq!(n.count(Role::Rwl), 1);
        assert_eq!(n.members[0].role, Role::Rwl);
        assert!(!n.members[0].full_rebuild);
        for m in &n.members[1..] {
            assert_eq!(m.role, Role::Dead);
            assert!(m.full_rebuild && !m.last_good);
        }
        let w = step(&n, &all_synced(&n));
        assert_eq!(w.count(Role::W), 2);
        assert!(w
            .members
            .iter()
            .filter(|m| m.role == Role::W)
            .all(|m| m.full_rebuild));
    }

    #[test]
    fn new_disk_replaces_dead_member_with_full_rebuild() {
        let mut t = raid1(2);
        t.members[1].role = Role::Dead;
        let mut k = all_synced(&t);
        k.members[1].present = None;
        k.replacement = Some(Replacement {
            member: 1,
            disk: DiskId(99),
            node: "node5".into(),
        });
        let n = step(&t, &k);
        assert_eq!(n.members[1].disk, DiskId(99));
        assert_eq!(n.members[1].role, Role::W);
        assert!(n.members[1].full_rebuild);
    }

    #[test]
    fn lost_dirty_bits_make_the_rebuild_full() {
        let mut t = raid1(2);
        t.members[1].role = Role::Dead;
        let mut k = all_synced(&t);
        k.members[0].dirty_bits_lost = true;
        let n = step(&t, &k);
        assert!(n.members[1].full_rebuild);
    }

    #[test]
    fn failure_of_the_member_being_rebuilt() {
        let mut t = raid1(2);
        t.members[1].role = Role::W;
        t.rebuild = true;
        let mut k = all_synced(&t);
        k.members[1].present = None;
        let n = step(&t, &k);
        assert_eq!(n.phase(), Phase::Degraded);
        assert!(!n.rebuild);
    }

    #[test]
    fn second_failure_during_rebuild_fails_a_two_mirror_volume_and_it_comes_back() {
        let mut t = raid1(2);
        t.members[1].role = Role::W;
        t.rebuild = true;
        let mut k = all_synced(&t);
        k.members[0].present = None;
        let f = step(&t, &k);
        assert_eq!(f.phase(), Phase::Failed);
        assert!(f.members[0].last_good);
        assert!(!f.members[1].last_good);
        // Member 1 alone cannot bring it back.
        let mut k = all_synced(&f);
        k.members[0].present = None;
        assert_eq!(plan(&f, &k).unwrap(), Plan::Wait(Wait::NothingToRestore));
        let k = all_synced(&f);
        let d = step(&f, &k);
        assert_eq!(d.phase(), Phase::Degraded);
        assert_eq!(d.members[0].role, Role::Rwl);
        assert!(d.members[1].full_rebuild);
    }

    /// Sim seed 593: a 3-mirror volume with member 0 DEAD; member 1's node loses power
    /// while member 2 is out of reach: the volume fails with both last good. Member 1 comes
    /// back first and its agent, seeing the full rebuild, no longer says it lost power. It
    /// must not restart the volume while member 2, which kept power, is away.
    #[test]
    fn a_failed_volume_waits_for_the_copy_that_kept_power() {
        let mut t = raid1(3);
        t.members[0].role = Role::Dead;
        let mut k = all_synced(&t);
        k.members[0].present = None;
        k.members[1].stale = true;
        k.members[2].present = None;
        let f = step(&t, &k);
        assert_eq!(f.phase(), Phase::Failed);
        assert!(f.members[1].last_good && f.members[1].full_rebuild);
        assert!(f.members[2].last_good && !f.members[2].full_rebuild);
        // Member 1 back, its report no longer stale: still waiting for member 2.
        let mut k = all_synced(&f);
        k.members[0].present = None;
        k.members[2].present = None;
        assert_eq!(plan(&f, &k).unwrap(), Plan::Wait(Wait::NothingToRestore));
        // Member 2 back: the volume restarts from it, member 1 is rebuilt in full.
        let mut k = all_synced(&f);
        k.members[0].present = None;
        let d = step(&f, &k);
        assert_eq!(d.phase(), Phase::Degraded);
        assert_eq!(d.members[2].role, Role::Rwl);
        assert!(d.members[1].role.is_dead() && d.members[1].full_rebuild);
    }

    #[test]
    fn second_failure_during_rebuild_with_three_mirrors_keeps_serving() {
        let mut t = raid1(3);
        t.members[2].role = Role::W;
        t.rebuild = true;
        let mut k = all_synced(&t);
        k.members[0].present = None;
        let n = step(&t, &k);
        assert_eq!(n.phase(), Phase::Rebuilding);
        assert_eq!(n.members[1].role, Role::Rwl);
        // Member 1 kept its own copy of the bits about member 2: the rebuild goes on.
        assert!(n.members[0].role.is_dead());
        assert!(!n.members[2].full_rebuild);
    }

    #[test]
    fn dual_lock_survivor_loss_promotes_the_rebuilt_member() {
        let mut t = raid1(2);
        t.members[1].role = Role::Wl;
        t.lock_mode = LockMode::DualLock;
        let mut k = all_synced(&t);
        k.members[0].present = None;
        let n = step(&t, &k);
        assert_eq!(n.members[1].role, Role::Rwl);
        assert_eq!(n.phase(), Phase::Degraded);
    }

    #[test]
    fn bad_knowledge_is_an_error_not_a_panic() {
        let t = raid1(2);
        let mut k = all_synced(&t);
        k.members.pop();
        assert!(plan(&t, &k)
            .unwrap_err()
            .to_string()
            .contains("knowledge.members"));
        let mut k = all_synced(&t);
        k.replacement = Some(Replacement {
            member: 7,
            disk: DiskId(1),
            node: "x".into(),
        });
        assert!(plan(&t, &k).is_err());
    }

    #[test]
    fn raid6_two_dead_rebuild_together() {
        use crate::layout::Layout;
        use crate::topology::{tests::disks, VolumeId};
        let t =
            Topology::new_normal(VolumeId(1), Layout::raid6(4).unwrap(), 65536, disks(6)).unwrap();
        let mut k = all_synced(&t);
        k.members[1].present = None;
        k.members[4].present = None;
        let d = step(&t, &k);
        assert_eq!(d.phase(), Phase::Degraded);
        let k = all_synced(&d);
        let mut kk = k.clone();
        kk.members[1].present = Some(d.members[1].node.clone());
        kk.members[4].present = Some(d.members[4].node.clone());
        let r = step(&d, &kk);
        assert_eq!(r.count(Role::W), 2);
        // A third loss fails the volume.
        let mut k3 = all_synced(&d);
        k3.members[0].present = None;
        let f = step(&d, &k3);
        assert_eq!(f.phase(), Phase::Failed);
    }

    #[test]
    fn raid6_failed_while_degraded_comes_back_with_every_good_member() {
        use crate::layout::Layout;
        use crate::topology::{tests::disks, VolumeId};
        let t =
            Topology::new_normal(VolumeId(1), Layout::raid6(4).unwrap(), 65536, disks(6)).unwrap();
        let mut k = all_synced(&t);
        k.members[3].present = None;
        let d = step(&t, &k);
        assert_eq!(d.phase(), Phase::Degraded);
        // Three more out of reach at once (a partition): Failed, five members good.
        let mut k = all_synced(&d);
        for i in [1, 3, 4, 5] {
            k.members[i].present = None;
        }
        let f = step(&d, &k);
        assert_eq!(f.phase(), Phase::Failed);
        assert_eq!(f.members.iter().filter(|m| m.last_good).count(), 5);
        // Four good ones back (k): wait for the fifth, whose redundancy recovery of a
        // write torn by the failure needs.
        let mut k = all_synced(&f);
        k.members[1].present = None;
        k.members[3].present = None;
        assert_eq!(plan(&f, &k).unwrap(), Plan::Wait(Wait::NothingToRestore));
        // All five back: all five readable, only the one DEAD before rebuilt.
        let mut k5 = all_synced(&f);
        k5.members[3].present = None;
        let b = step(&f, &k5);
        assert_eq!(b.count(Role::Rwl), 5);
        assert!(b.members[3].role.is_dead() && b.members[3].full_rebuild);
        // The fifth gone for good (the leader offers a replacement): k are enough.
        k.replacement = Some(Replacement {
            member: 1,
            disk: DiskId(99),
            node: "spare".into(),
        });
        let b = step(&f, &k);
        assert_eq!(b.count(Role::Rwl), 4);
    }

    /// A RAID6 volume that failed from Normal (every member last-good).
    fn raid6_failed_from_normal() -> Topology {
        use crate::layout::Layout;
        use crate::topology::{tests::disks, VolumeId};
        let t =
            Topology::new_normal(VolumeId(1), Layout::raid6(4).unwrap(), 65536, disks(6)).unwrap();
        let mut k = all_synced(&t);
        for i in [0, 2, 4] {
            k.members[i].present = None;
        }
        let f = step(&t, &k);
        assert_eq!(f.phase(), Phase::Failed);
        assert!(f.members.iter().all(|m| m.last_good));
        f
    }

    #[test]
    fn raid6_back_from_failed_resyncs_parity_with_every_member() {
        let f = raid6_failed_from_normal();
        // Not every member is back: wait for the others (decoding from k could read a torn
        // stripe).
        let mut k = all_synced(&f);
        k.members[5].present = None;
        assert_eq!(plan(&f, &k).unwrap(), Plan::Wait(Wait::NothingToRestore));
        // All back: every member readable, P and Q re-encoded.
        let r = step(&f, &all_synced(&f));
        assert_eq!(r.phase(), Phase::Resync);
        assert!(r
            .members
            .iter()
            .all(|m| m.role == Role::Rwl && !m.full_rebuild));
        assert_eq!(
            plan(&r, &all_synced(&r)).unwrap(),
            Plan::Wait(Wait::Rebuild)
        );
        let mut k = all_synced(&r);
        k.rebuild_done = Some(r.generation);
        let n = step(&r, &k);
        assert_eq!(n.phase(), Phase::Normal);
        // A member lost during the resync fails the volume again, every member still good.
        let mut k = all_synced(&r);
        k.members[3].present = None;
        let f2 = step(&r, &k);
        assert_eq!(f2.phase(), Phase::Failed);
        assert!(f2
            .members
            .iter()
            .all(|m| m.last_good && m.role == Role::Dead));
        assert_eq!(step(&f2, &all_synced(&f2)).phase(), Phase::Resync);
    }

    #[test]
    fn raid6_back_from_a_cluster_power_loss_resyncs_and_settles_the_lost_writes() {
        let f = raid6_failed_from_normal();
        let mut k = all_synced(&f);
        for m in k.members.iter_mut() {
            m.stale = true;
        }
        let r = step(&f, &k);
        assert_eq!(r.phase(), Phase::Resync);
        // The agents read `full_rebuild` as "the leader took the lost writes into account".
        assert!(r.members.iter().all(|m| m.full_rebuild));
        let mut k = all_synced(&r);
        k.rebuild_done = Some(r.generation);
        let n = step(&r, &k);
        assert_eq!(n.phase(), Phase::Normal);
        assert!(n.members.iter().all(|m| !m.full_rebuild));
    }

    #[test]
    fn raid6_back_from_failed_without_every_member_restores_from_k() {
        // Only some members lost power: those may miss acknowledged writes, so the volume
        // comes back from k members that did not, the others rebuilt in full.
        let f = raid6_failed_from_normal();
        let mut k = all_synced(&f);
        k.members[1].stale = true;
        let r = step(&f, &k);
        assert_eq!(r.count(Role::Rwl), 4);
        assert!(r.members[1].role != Role::Rwl && r.members[1].full_rebuild);
        // A member gone so long that the leader offers a replacement: stop waiting for it.
        let mut k = all_synced(&f);
        k.members[5].present = None;
        k.replacement = Some(Replacement {
            member: 5,
            disk: DiskId(99),
            node: "n99".into(),
        });
        let r = step(&f, &k);
        assert_eq!(r.count(Role::Rwl), 4);
        assert_eq!(r.members[5].role, Role::Dead);
    }
}
