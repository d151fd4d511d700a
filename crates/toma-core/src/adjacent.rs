//! The four rules that make any two adjacent topologies safe to use at the same time
//! (DESIGN.md §3), checked for every lock unit.

use std::collections::BTreeSet;
use std::fmt;

use crate::placement::{locks, read_member, sets_dirty, write_members};
use crate::topology::{MemberIdx, Role, Topology};

/// Which rule a pair of topologies breaks.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Rule {
    /// Not a g → g+1 pair of the same volume and shape, or an invalid topology.
    Adjacency,
    /// Rule 1: lock sets of T(g) and T(g+1) share a member alive in both.
    LockIntersection,
    /// Rule 2: a member readable in T(g+1) is in every writer's lock set.
    ReadSafety,
    /// Rule 3: every acknowledged write is on every live member, or dirty where it survives.
    DirtyCoverage,
    /// Rule 4: no writes reach a member between DEAD and its re-entry as W.
    DeadStaysDead,
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Rule::Adjacency => "adjacency",
            Rule::LockIntersection => "rule 1 (lock intersection)",
            Rule::ReadSafety => "rule 2 (read safety)",
            Rule::DirtyCoverage => "rule 3 (dirty coverage)",
            Rule::DeadStaysDead => "rule 4 (no writes to a DEAD member)",
        })
    }
}

/// A broken rule, with the chunk (lock unit) and the members involved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub rule: Rule,
    pub chunk: Option<u64>,
    pub members: Vec<MemberIdx>,
    pub message: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} violated", self.rule)?;
        if let Some(c) = self.chunk {
            write!(f, " at chunk {c}")?;
        }
        if !self.members.is_empty() {
            let m: Vec<_> = self.members.iter().map(|m| format!("m{m}")).collect();
            write!(f, " (members {})", m.join(", "))?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for Violation {}

fn fmt_set(t: &Topology, set: &[MemberIdx]) -> String {
    let v: Vec<_> = set.iter().map(|&i| t.describe_member(i)).collect();
    format!("[{}]", v.join(", "))
}

/// Checks that `b` may follow `a` while clients of both are still doing I/O.
///
/// Writers of `a` whose lock or write set contains a member that `b` declares DEAD are left
/// out of rules 1 and 2 (the forced step): their I/O to that member never succeeds, so they
/// hold their write and redo it under `b`.
pub fn check_adjacent(a: &Topology, b: &Topology) -> Result<(), Violation> {
    let adj = |message: String| Violation {
        rule: Rule::Adjacency,
        chunk: None,
        members: Vec::new(),
        message,
    };
    if let Err(e) = a.validate() {
        return Err(adj(format!("T(g={}) is invalid: {e}", a.generation)));
    }
    if let Err(e) = b.validate() {
        return Err(adj(format!("T(g={}) is invalid: {e}", b.generation)));
    }
    if a.volume != b.volume || a.layout != b.layout || a.chunk_size != b.chunk_size {
        return Err(adj(
            "volume, layout and chunk size must not change between generations".into(),
        ));
    }
    if a.generation.checked_add(1) != Some(b.generation) {
        return Err(adj(format!(
            "generation {} does not follow {}",
            b.generation, a.generation
        )));
    }

    let newly_dead: BTreeSet<MemberIdx> = (0..a.n())
        .filter(|&i| !a.role(i).is_dead() && b.role(i).is_dead())
        .collect();
    let alive_both: BTreeSet<MemberIdx> = (0..a.n())
        .filter(|&i| !a.role(i).is_dead() && !b.role(i).is_dead())
        .collect();

    // Rule 4, structurally: a member that comes back enters as W, never straight as
    // readable, unless the volume was Failed and it is one of its last-good members. And a
    // replaced member (new disk) must come in as W.
    for i in 0..a.n() {
        let (ra, rb) = (a.role(i), b.role(i));
        let failed_recovery = ra.is_dead() && a.members[i].last_good && rb == Role::Rwl;
        if ra.is_dead() && !rb.is_dead() && rb != Role::W && !failed_recovery {
            return Err(Violation {
                rule: Rule::DeadStaysDead,
                chunk: None,
                members: vec![i],
                message: format!(
                    "{} re-enters as {rb}; a DEAD member must come back as W",
                    b.describe_member(i)
                ),
            });
        }
        if !ra.is_dead() && !rb.is_dead() && a.members[i].disk != b.members[i].disk {
            return Err(Violation {
                rule: Rule::DeadStaysDead,
                chunk: None,
                members: vec![i],
                message: format!(
                    "{} changed disk without going through DEAD",
                    b.describe_member(i)
                ),
            });
        }
    }

    // The rules depend on the unit only through `unit mod n`.
    for c in 0..a.n() as u64 {
        let la = locks(a, c);
        let lb = locks(b, c);
        let wa = write_members(a, c);
        let wb = write_members(b, c);
        // A writer of `a` that touches a newly dead member cannot complete under `a`.
        let a_writer_live =
            !la.is_empty() && !la.iter().chain(wa.iter()).any(|m| newly_dead.contains(m));
        let b_writer_live = !lb.is_empty();

        for (t, w, who) in [(a, &wa, "T(g)"), (b, &wb, "T(g+1)")] {
            if let Some(&m) = w.iter().find(|&&m| t.role(m).is_dead()) {
                return Err(Violation {
                    rule: Rule::DeadStaysDead,
                    chunk: Some(c),
                    members: vec![m],
                    message: format!(
                        "a {who} writer (g={}) writes {}",
                        t.generation,
                        t.describe_member(m)
                    ),
                });
            }
        }

        // Rule 1.
        if a_writer_live
            && b_writer_live
            && !la.iter().any(|m| lb.contains(m) && alive_both.contains(m))
        {
            return Err(Violation {
                rule: Rule::LockIntersection,
                chunk: Some(c),
                members: la.iter().chain(lb.iter()).copied().collect(),
                message: format!(
                    "a writer of g={} locks {} and a writer of g={} locks {}: they share no member alive in both, so both may write chunk {c} at once",
                    a.generation,
                    fmt_set(a, &la),
                    b.generation,
                    fmt_set(b, &lb)
                ),
            });
        }

        // Rule 2.
        if let Some(r) = read_member(b, c) {
            if b.role(r) != Role::Rwl {
                return Err(Violation {
                    rule: Rule::ReadSafety,
                    chunk: Some(c),
                    members: vec![r],
                    message: format!(
                        "g={} reads from {}, which is not RWL",
                        b.generation,
                        b.describe_member(r)
                    ),
                });
            }
            for (t, l, live) in [(a, &la, a_writer_live), (b, &lb, b_writer_live)] {
                if live && !l.contains(&r) {
                    return Err(Violation {
                        rule: Rule::ReadSafety,
                        chunk: Some(c),
                        members: std::iter::once(r).chain(l.iter().copied()).collect(),
                        message: format!(
                            "a reader of g={} reads {} but a writer of g={} locks only {}: the reader can see a write that is not on every mirror",
                            b.generation,
                            b.describe_member(r),
                            t.generation,
                            fmt_set(t, l)
                        ),
                    });
                }
            }
        }

        // Rule 3: each live member of `b` that a writer skips must be marked dirty on a
        // holder that is still alive in `b`.
        for (t, w, live) in [(a, &wa, a_writer_live), (b, &wb, b_writer_live)] {
            if !live {
                continue;
            }
            let marks = sets_dirty(t, c);
            for m in b.alive() {
                if w.contains(&m) {
                    continue;
                }
                let covered = marks.as_ref().is_some_and(|d| {
                    d.targets.contains(&m) && d.holders.iter().any(|h| !b.role(*h).is_dead())
                });
                // A member rebuilt in full needs no bits.
                let full = b.members[m].full_rebuild && b.role(m) == Role::W;
                if !covered && !full {
                    return Err(Violation {
                        rule: Rule::DirtyCoverage,
                        chunk: Some(c),
                        members: vec![m],
                        message: format!(
                            "a writer of g={} skips {} (alive in g={}) without a dirty bit that survives",
                            t.generation,
                            b.describe_member(m),
                            b.generation
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::raid1;
    use crate::topology::LockMode;

    fn next(t: &Topology, f: impl FnOnce(&mut Topology)) -> Topology {
        let mut n = t.clone();
        n.generation += 1;
        f(&mut n);
        n
    }

    #[test]
    fn rebuild_straight_to_normal_breaks_lock_intersection() {
        let mut a = raid1(2);
        a.members[1].role = Role::W;
        a.rebuild = true;
        let b = next(&a, |b| {
            b.members[1].role = Role::Rwl;
            b.rebuild = false;
        });
        let v = check_adjacent(&a, &b).unwrap_err();
        assert_eq!(v.rule, Rule::LockIntersection);
        assert_eq!(v.chunk, Some(1));
        let s = v.to_string();
        assert!(
            s.contains("rule 1 (lock intersection) violated at chunk 1"),
            "{s}"
        );
        assert!(s.contains("m0") && s.contains("m1"), "{s}");
    }

    #[test]
    fn reading_a_w_member_breaks_read_safety() {
        let mut a = raid1(2);
        a.members[1].role = Role::Dead;
        let mut b = next(&a, |b| b.members[1].role = Role::W);
        assert!(check_adjacent(&a, &b).is_ok());
        // A buggy topology whose lock is on W is not even valid.
        b.lock_mode = LockMode::DualLock;
        assert_eq!(check_adjacent(&a, &b).unwrap_err().rule, Rule::Adjacency);
    }

    #[test]
    fn dead_member_must_return_as_w() {
        let mut a = raid1(2);
        a.members[1].role = Role::Dead;
        let b = next(&a, |b| b.members[1].role = Role::Rwl);
        assert_eq!(
            check_adjacent(&a, &b).unwrap_err().rule,
            Rule::DeadStaysDead
        );
    }

    #[test]
    fn generation_must_advance_by_one() {
        let a = raid1(2);
        let mut b = a.clone();
        b.generation = 3;
        assert_eq!(check_adjacent(&a, &b).unwrap_err().rule, Rule::Adjacency);
    }

    #[test]
    fn forced_failure_step_is_allowed() {
        let a = raid1(3);
        let b = next(&a, |b| b.members[1].role = Role::Dead);
        check_adjacent(&a, &b).unwrap();
    }
}
