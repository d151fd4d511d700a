//! Random event sequences through the planner: every produced pair passes `check_adjacent`,
//! generations strictly increase, no plan reads from a W/WL/DEAD member, the planner never
//! panics, and once faults stop every volume gets back to Normal.
//!
//! Replay a failure with `PROPTEST_CASES=... cargo test -p toma-core --test planner_props`;
//! proptest prints the minimal failing event list and saves its seed in
//! `proptest-regressions/`.

use proptest::prelude::*;
use toma_core::placement::{locks, read_member, write_members};
use toma_core::planner::all_synced;
use toma_core::*;

#[derive(Debug, Clone)]
enum Event {
    /// The member's disk disappears (unplugged, agent dead, unreachable).
    Lose(usize),
    /// A missing disk shows up again, on node `node` of a small pool.
    Return { member: usize, node: u8 },
    /// Member `member`'s TOMA syncs all its clients to the current generation.
    Sync(usize),
    /// Every present member syncs.
    SyncAll,
    /// The rebuilder reports a finished cycle for the current (or a stale) generation.
    RebuildDone { stale: bool },
    /// A NEW disk is offered in place of a member.
    Offer { member: usize, node: u8 },
    /// A member's TOMA restarts and forgets its RAM dirty bits.
    ForgetBits(usize),
    /// The leader plans.
    Plan,
}

fn event() -> impl Strategy<Value = Event> {
    prop_oneof![
        1 => (0usize..6).prop_map(Event::Lose),
        1 => (0usize..6, 0u8..8).prop_map(|(member, node)| Event::Return { member, node }),
        2 => (0usize..6).prop_map(Event::Sync),
        3 => Just(Event::SyncAll),
        2 => any::<bool>().prop_map(|stale| Event::RebuildDone { stale }),
        1 => (0usize..6, 0u8..8).prop_map(|(member, node)| Event::Offer { member, node }),
        1 => (0usize..6).prop_map(Event::ForgetBits),
        6 => Just(Event::Plan),
    ]
}

fn layout() -> impl Strategy<Value = Layout> {
    prop_oneof![
        Just(Layout::Raid1 { mirrors: 2 }),
        Just(Layout::Raid1 { mirrors: 3 }),
        Just(Layout::Raid6 { data: 2 }),
        Just(Layout::Raid6 { data: 4 }),
    ]
}

fn start(layout: Layout) -> Topology {
    let disks = (0..layout.members())
        .map(|i| (DiskId(100 + i as u128), NodeId(format!("n{i}"))))
        .collect();
    Topology::new_normal(VolumeId(1), layout, 65536, disks).expect("valid start topology")
}

/// Checks one planned step and returns the new topology.
fn check_step(prev: &Topology, next: &Topology) -> Result<(), TestCaseError> {
    prop_assert!(next.validate().is_ok(), "invalid plan {next:?}");
    prop_assert_eq!(next.generation, prev.generation + 1);
    if let Err(v) = check_adjacent(prev, next) {
        return Err(TestCaseError::fail(format!("{prev}\n -> {next}\n{v}")));
    }
    for c in 0..next.n() as u64 {
        if let Some(r) = read_member(next, c) {
            prop_assert_eq!(next.role(r), Role::Rwl, "reads from a non-RWL member");
        }
        for m in locks(next, c) {
            prop_assert!(matches!(next.role(m), Role::Rwl | Role::Wl));
        }
        for m in write_members(next, c) {
            prop_assert!(!next.role(m).is_dead());
        }
    }
    Ok(())
}

struct World {
    t: Topology,
    k: Knowledge,
    next_disk: u128,
    history: Vec<Topology>,
}

impl World {
    fn plan(&mut self) -> Result<(), TestCaseError> {
        match plan(&self.t, &self.k) {
            Ok(Plan::Next(n)) => {
                check_step(&self.t, &n)?;
                // A replaced member's disk is now the new one; it is present where planned.
                for (i, m) in n.members.iter().enumerate() {
                    if m.disk != self.t.members[i].disk {
                        self.k.members[i].present = Some(m.node.clone());
                    }
                }
                self.k.replacement = None;
                self.history.push(n.clone());
                self.t = n;
                Ok(())
            }
            Ok(Plan::Wait(_)) => Ok(()),
            Err(e) => Err(TestCaseError::fail(format!(
                "planner error on valid input: {e}"
            ))),
        }
    }

    fn apply(&mut self, e: &Event) -> Result<(), TestCaseError> {
        let n = self.t.n();
        match *e {
            Event::Lose(i) => {
                if i < n {
                    self.k.members[i].present = None;
                }
            }
            Event::Return { member, node } => {
                if member < n && self.k.members[member].present.is_none() {
                    self.k.members[member].present = Some(NodeId(format!("n{node}")));
                }
            }
            Event::Sync(i) => {
                if i < n && self.k.members[i].present.is_some() {
                    self.k.members[i].synced = self.t.generation;
                }
            }
            Event::SyncAll => {
                for r in self.k.members.iter_mut() {
                    if r.present.is_some() {
                        r.synced = self.t.generation;
                    }
                }
            }
            Event::RebuildDone { stale } => {
                self.k.rebuild_done = Some(if stale {
                    self.t.generation.saturating_sub(1)
                } else {
                    self.t.generation
                });
            }
            Event::Offer { member, node } => {
                if member < n {
                    self.next_disk += 1;
                    self.k.replacement = Some(Replacement {
                        member,
                        disk: DiskId(self.next_disk),
                        node: NodeId(format!("n{node}")),
                    });
                }
            }
            Event::ForgetBits(i) => {
                if i < n {
                    self.k.members[i].dirty_bits_lost = true;
                }
            }
            Event::Plan => self.plan()?,
        }
        Ok(())
    }
}

proptest! {
    #![proptest_config(ProptestConfig {
        cases: 2000,
        failure_persistence: Some(Box::new(proptest::test_runner::FileFailurePersistence::Direct(
            "tests/planner_props.proptest-regressions",
        ))),
        ..ProptestConfig::default()
    })]

    #[test]
    fn random_histories_keep_every_rule(layout in layout(), events in prop::collection::vec(event(), 0..80)) {
        let t = start(layout);
        let k = all_synced(&t);
        let mut w = World { t, k, next_disk: 10_000, history: Vec::new() };
        for e in &events {
            w.apply(e)?;
        }
        // Generations strictly increase.
        for pair in w.history.windows(2) {
            prop_assert!(pair[1].generation > pair[0].generation);
        }

        // Healing: every disk comes back where it can, everyone syncs, rebuilds finish.
        // The volume must reach Normal (or stay Failed only if nothing can restore it, which
        // cannot happen once every disk is back).
        // (A disk that came back on a node already serving the volume is moved back by hand.)
        let mut steps = 0;
        while w.t.phase() != Phase::Normal {
            steps += 1;
            prop_assert!(steps < 40, "no progress to Normal: stuck at {} ({:?})", w.t, w.t.phase());
            for i in 0..w.t.n() {
                if w.k.members[i].present.is_none() || w.t.members[i].role.is_dead() {
                    let node = w.t.members[i].node.clone();
                    // A DEAD member whose node now serves another member cannot return there:
                    // the leader offers a NEW disk on a node of its own instead.
                    let taken = w.t.members.iter().enumerate().any(|(j, m)| {
                        j != i && !m.role.is_dead() && m.node == node
                    });
                    if w.t.members[i].role.is_dead() && taken {
                        w.next_disk += 1;
                        w.k.replacement = Some(Replacement {
                            member: i,
                            disk: DiskId(w.next_disk),
                            node: NodeId(format!("fresh{i}")),
                        });
                    }
                    w.k.members[i].present = Some(node);
                }
            }
            w.apply(&Event::SyncAll)?;
            w.apply(&Event::RebuildDone { stale: false })?;
            w.apply(&Event::Plan)?;
        }
    }

    #[test]
    fn planner_never_panics_on_arbitrary_input(
        roles in prop::collection::vec(0u8..4, 0..8),
        nodes in prop::collection::vec(0u8..4, 0..8),
        mirrors in 0u8..6,
        chunk in any::<u32>(),
        dual in any::<bool>(),
        rebuild in any::<bool>(),
        generation in any::<u64>(),
        present in prop::collection::vec(prop::option::of(0u8..6), 0..8),
        synced in prop::collection::vec(any::<u64>(), 0..8),
        done in prop::option::of(any::<u64>()),
        repl in prop::option::of((0usize..10, 0u8..6)),
    ) {
        let members = roles.iter().enumerate().map(|(i, r)| Member {
            disk: DiskId(i as u128),
            node: NodeId(format!("n{}", nodes.get(i).copied().unwrap_or(i as u8))),
            role: [Role::Rwl, Role::W, Role::Wl, Role::Dead][usize::from(*r)],
            full_rebuild: false,
            last_good: i % 2 == 0,
        }).collect();
        let t = Topology {
            volume: VolumeId(1),
            generation,
            layout: Layout::Raid1 { mirrors },
            chunk_size: chunk,
            members,
            lock_mode: if dual { LockMode::DualLock } else { LockMode::Interleaved },
            rebuild,
        };
        let k = Knowledge {
            members: present.iter().enumerate().map(|(i, p)| MemberReport {
                present: p.map(|n| NodeId(format!("n{n}"))),
                synced: synced.get(i).copied().unwrap_or(0),
                dirty_bits_lost: i % 3 == 0,
                stale: i % 5 == 1,
            }).collect(),
            rebuild_done: done,
            replacement: repl.map(|(member, n)| Replacement { member, disk: DiskId(77), node: NodeId(format!("n{n}")) }),
        };
        if let Ok(Plan::Next(n)) = plan(&t, &k) {
            check_step(&t, &n)?;
        }
    }
}
