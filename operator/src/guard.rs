//! Refusing a `TomaTopology` edited by hand into an impossible state (pure: no I/O).
//!
//! Every replica remembers, per `TomaTopology`, the last topology it accepted (written by
//! itself or seen through the watch). A newly observed topology is accepted when
//!
//! - it is the same topology (only derived or bookkeeping fields changed, e.g. the epoch stamp);
//! - `toma_core::check_adjacent(last, new)` holds (a leader's step, or a hand edit that a
//!   leader could have made);
//! - or it comes from a newer leader: a higher `spec.leaderEpoch` and a higher generation
//!   (this replica missed some of the successor's steps; the successor checked each one).
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

pub fn judge(last: Option<&Accepted>, new: &Topology, new_epoch: u64) -> Verdict {
    let Some(last) = last else {
        return Verdict::Accept;
    };
    if last.topology == *new {
        return Verdict::Accept;
    }
    if new_epoch > last.epoch && new.generation > last.topology.generation {
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
        assert_eq!(judge(None, &t0(), 1), Verdict::Accept);
        let acc = Accepted {
            topology: t0(),
            epoch: 3,
        };
        assert_eq!(judge(Some(&acc), &t0(), 4), Verdict::Accept);
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
        assert_eq!(judge(Some(&acc), &t1, 3), Verdict::Accept);
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
        let Verdict::Refuse(why) = judge(Some(&acc), &edited, 3) else {
            panic!("a jump from Degraded to Normal must be refused");
        };
        assert!(why.contains("cannot follow"), "{why}");
        // Same generation, different roles.
        let mut same_gen = acc.topology.clone();
        same_gen.members[0].role = Role::Dead;
        same_gen.members[1].role = Role::Rwl;
        assert!(matches!(
            judge(Some(&acc), &same_gen, 3),
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
        assert_eq!(judge(Some(&acc), &t5, 4), Verdict::Accept);
        assert!(matches!(judge(Some(&acc), &t5, 3), Verdict::Refuse(_)));
    }
}
