//! Member statuses are kept per reporting node: an agent that still believes it hosts a
//! disk that was moved to another node must not overwrite the new host's report. Before,
//! the two agents overwrote each other on every pass, each write woke both of them (and the
//! leader) through `changes()`, and the cluster spun forever without time moving — the
//! simulation's seeds 101 and 103 (disk moved to another node, old agent still running).

use toma_control::*;
use toma_core::{DiskId, NodeId, VolumeId};

fn status(node: &str, synced: u64) -> MemberStatus {
    MemberStatus {
        volume: VolumeId(1),
        disk: DiskId(7),
        node: NodeId(node.into()),
        synced,
        boot: 1,
        dirty_bits_lost: false,
        stale: false,
        rebuild: None,
        extent_bytes: 0,
        grow_refused: None,
    }
}

#[tokio::test]
async fn two_nodes_reporting_one_disk_do_not_overwrite_each_other() {
    let cp = EmbeddedControlPlane::new();
    let changes = cp.changes();
    cp.put_member_status(status("n1", 2)).await.unwrap();
    cp.put_member_status(status("n3", 5)).await.unwrap();
    let v = *changes.borrow();
    // The same reports again (the next pass of each agent): nothing changes, nobody wakes.
    for _ in 0..10 {
        cp.put_member_status(status("n1", 2)).await.unwrap();
        cp.put_member_status(status("n3", 5)).await.unwrap();
    }
    assert_eq!(
        *changes.borrow(),
        v,
        "unchanged reports must not bump the store"
    );
    let mut all = cp.member_statuses(VolumeId(1)).await.unwrap();
    all.sort_by(|a, b| a.node.cmp(&b.node));
    assert_eq!(all, vec![status("n1", 2), status("n3", 5)]);
    assert!(cp.member_statuses(VolumeId(2)).await.unwrap().is_empty());
}
