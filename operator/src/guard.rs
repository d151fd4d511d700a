//! Refusing a `TomaTopology` edited by hand into an impossible state (pure: no I/O).
//!
//! Every replica remembers, per `TomaTopology`, the last topology it accepted (written by
//! itself or seen through the watch). A newly observed topology is accepted when
//!
//! - it is the same topology (only derived or bookkeeping fields changed, e.g. the epoch stamp);
//! - `toma_core::check_adjacent(last, new)` holds (a leader's step, or a hand edit that a
//!   leader could have made);
//! - or it comes from a newer leader: a higher `spec.leaderEpoch` and a higher generation
//!   (this replica missed some of the successor's steps; the successor checked each one);
//! - or this process only reads topologies (an agent, the CSI node plugin) and the new one is
//!   newer, of the same or a newer epoch: a reader misses steps — it looks now and then (the
//!   node plugin at NodeStage), or its watch re-listed after a broken connection — and a
//!   reader that starts afresh accepts whatever is there anyway. Refusing the gap left such
//!   a reader refusing the volume for ever (a RAID6 volume losing two members one after the
//!   other, seen by the node plugin only before and after). The leader of that epoch wrote
//!   every step itself, so for it a gap is someone else's edit and is refused.
//!
//! Anything else is refused: the leader does not act on the volume and a Warning Event says
//! why, until the object is put back (to the accepted topology or one adjacent to it).
//! Limitation: a hand edit that also raises `spec.leaderEpoch` is taken for a newer leader;
//! the guard protects against mistakes, RBAC protects against adversaries.

use toma_core::{check_adjacent, Topology};

/// What a replica accepted last for one `TomaTopology`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Accepted {
    pub topology: Topology,
    pub epoch: u64,
}

/// Whether a newly observed topology may be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    Accept,
    Refuse(String),
}

/// Who judges: the process that writes the topologies of an epoch (its leader), or one that
/// only reads them.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observer {
    Writer,
    Reader,
}

pub fn judge(last: Option<&Accepted>, new: &Topology, new_epoch: u64, who: Observer) -> Verdict {
    let Some(last) = last else {
        return Verdict::Accept;
    };
    if last.topology == *new {
        return Verdict::Accept;
    }
    if new_epoch > last.epoch && new.generation > last.topology.generation {
        return Verdict::Accept;
    }
    if who == Observer::Reader
        && new_epoch >= last.epoch
        && new.generation > last.topology.generation.saturating_add(1)
    {
        return Verdict::Accept;
    }
    match check_adjacent(&last.topology, new) {
        Ok(()) => Verdict::Accept,
        Err(v) => Verdict::Refuse(format!(
            "topology {new} cannot follow the last accepted {} (leader epoch {}): {v}; \
             nothing was applied — restore the previous spec or an adjacent one",
            last.topology, last.epoch
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use toma_core::{DiskId, Layout, NodeId, Role, VolumeId};

    fn t0() -> Topology {
        Topology::new_normal(
            VolumeId(1),
            Layout::raid1(2).expect("layout"),
            65536,
            vec![
                (DiskId(10), NodeId::from("a")),
                (DiskId(11), NodeId::from("b")),
            ],
        )
        .expect("topology")
    }

    #[test]
    fn first_sight_and_unchanged_are_accepted() {
        assert_eq!(judge(None, &t0(), 1, Observer::Writer), Verdict::Accept);
        let acc = Accepted {
            topology: t0(),
            epoch: 3,
        };
        assert_eq!(
            judge(Some(&acc), &t0(), 4, Observer::Writer),
            Verdict::Accept
        );
    }

    #[test]
    fn a_leader_step_is_accepted() {
        let acc = Accepted {
            topology: t0(),
            epoch: 3,
        };
        let mut t1 = t0();
        t1.generation = 2;
        t1.members[1].role = Role::Dead;
        assert_eq!(judge(Some(&acc), &t1, 3, Observer::Writer), Verdict::Accept);
    }

    #[test]
    fn a_hand_edit_into_an_impossible_state_is_refused() {
        let mut last = t0();
        last.generation = 2;
        last.members[1].role = Role::Dead;
        let acc = Accepted {
            topology: last,
            epoch: 3,
        };
        // Straight back to Normal, skipping the rebuild: the dead member would be read.
        let mut edited = t0();
        edited.generation = 3;
        for who in [Observer::Writer, Observer::Reader] {
            let Verdict::Refuse(why) = judge(Some(&acc), &edited, 3, who) else {
                panic!("a jump from Degraded to Normal must be refused ({who:?})");
            };
            assert!(why.contains("cannot follow"), "{why}");
        }
        // Same generation, different roles.
        let mut same_gen = acc.topology.clone();
        same_gen.members[0].role = Role::Dead;
        same_gen.members[1].role = Role::Rwl;
        for who in [Observer::Writer, Observer::Reader] {
            assert!(matches!(
                judge(Some(&acc), &same_gen, 3, who),
                Verdict::Refuse(_)
            ));
        }
        // Backwards.
        let mut older = acc.topology.clone();
        older.generation = 1;
        older.members[1].role = Role::Rwl;
        assert!(matches!(
            judge(Some(&acc), &older, 3, Observer::Reader),
            Verdict::Refuse(_)
        ));
    }

    #[test]
    fn a_newer_leaders_jump_is_accepted() {
        let acc = Accepted {
            topology: t0(),
            epoch: 3,
        };
        let mut t5 = t0();
        t5.generation = 5;
        assert_eq!(judge(Some(&acc), &t5, 4, Observer::Writer), Verdict::Accept);
        assert!(matches!(
            judge(Some(&acc), &t5, 3, Observer::Writer),
            Verdict::Refuse(_)
        ));
    }

    #[test]
    fn a_reader_that_missed_steps_catches_up_and_the_writer_does_not() {
        // Seen by a reader: g1 Normal; then (g2 one DEAD missed) g3 two DEAD.
        let r6 = Topology::new_normal(
            VolumeId(1),
            Layout::raid6(2).expect("layout"),
            65536,
            (0..4)
                .map(|i| (DiskId(10 + i), NodeId::from(format!("n{i}").as_str())))
                .collect(),
        )
        .expect("topology");
        let acc = Accepted {
            topology: r6.clone(),
            epoch: 1,
        };
        let mut g3 = r6;
        g3.generation = 3;
        g3.members[0].role = Role::Dead;
        g3.members[3].role = Role::Dead;
        assert_eq!(judge(Some(&acc), &g3, 1, Observer::Reader), Verdict::Accept);
        assert!(matches!(
            judge(Some(&acc), &g3, 1, Observer::Writer),
            Verdict::Refuse(_)
        ));
        // Not from an older epoch.
        let acc2 = Accepted {
            topology: acc.topology.clone(),
            epoch: 2,
        };
        assert!(matches!(
            judge(Some(&acc2), &g3, 1, Observer::Reader),
            Verdict::Refuse(_)
        ));
    }
}
