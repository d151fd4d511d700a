//! A member that stays dead is replaced by a NEW disk on a node added later, which is rebuilt
//! in full: every chunk copied, the volume back to Normal, the mirrors identical.

mod common;

use common::*;
use toma_agent::local::LocalTimers;
use toma_core::{Phase, Role};

const UNITS: u64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_member_is_replaced_by_a_new_disk_rebuilt_in_full() {
    let timers = LocalTimers {
        replace_after: std::time::Duration::from_secs(1),
        ..LocalTimers::default()
    };
    let (_dir, mut c) = cluster_with(3, timers).await;
    let id = volume(&c, 3, UNITS).await;
    let cl = client(&c, id).await;
    for u in 0..UNITS {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    let before = c.topology(id).await.unwrap();
    // The spare: a 4th node, added now.
    let spare = c.add_node(1, 64 * MIB).await.expect("4th node");
    assert_eq!(c.node_count(), 4);
    let spare_name = c.node_name(spare).clone();

    let victim = node_of(&c, id, 2).await;
    let old_disk = before.members[2].disk;
    c.kill_agent(victim);
    // Writes while degraded (held until the leader marks the member DEAD).
    for u in [0, 3, 8] {
        cl.write(u * CHUNK, block(u, 2)).await.unwrap();
    }

    let t = c
        .wait_topology(id, WAIT, |t| {
            t.phase() == Phase::Normal && t.members[2].node == spare_name
        })
        .await
        .unwrap();
    assert_ne!(t.members[2].disk, old_disk, "a NEW disk: {t}");
    assert!(t.members.iter().all(|m| m.role == Role::Rwl), "{t}");

    // Every chunk was copied to the new disk, in one finished cycle.
    let statuses = c.cp_statuses(id).await;
    let full: Vec<_> = statuses
        .iter()
        .filter_map(|s| s.rebuild)
        .filter(|r| r.finished && r.done_units == UNITS)
        .collect();
    assert_eq!(full.len(), 1, "{statuses:?}");
    assert_eq!(full[0].total_units, UNITS);
    assert_eq!(full[0].bytes_copied, UNITS * CHUNK);

    c.assert_mirrors_identical(id).await;
    let contents = c.member_contents(id).await;
    assert_eq!(contents.len(), 3);
    for u in 0..UNITS {
        let want = block(u, if [0, 3, 8].contains(&u) { 2 } else { 1 });
        assert_eq!(chunk_of(&contents[2].1, u), &want[..], "new disk chunk {u}");
        assert_eq!(cl.read(u * CHUNK, CHUNK as usize).await.unwrap(), want);
    }
    // And the new member serves reads and writes like the others.
    for u in 0..UNITS {
        cl.write(u * CHUNK, block(u, 3)).await.unwrap();
    }
    c.assert_mirrors_identical(id).await;
    c.shutdown().await;
}
