//! The leader loop against the embedded control plane, with agents played by the test.

use std::sync::Arc;
use std::time::Duration;

use toma_control::*;
use toma_core::{DiskId, Layout, NodeId, Phase, Topology, VolumeId, VolumeSpec};

const NODES: [&str; 3] = ["a", "b", "c"];

async fn setup() -> (
    Arc<EmbeddedControlPlane>,
    Arc<ManualClock>,
    Leader,
    VolumeId,
) {
    let cp = Arc::new(EmbeddedControlPlane::new());
    let clock = Arc::new(ManualClock::default());
    for (i, n) in NODES.iter().enumerate() {
        cp.put_node(NodeRecord {
            node: NodeId::from(*n),
            endpoint: format!("127.0.0.{}:1", i + 1),
            heartbeat: 1,
            boot: 1,
        })
        .await
        .unwrap();
        cp.put_disk(DiskRecord {
            disk: DiskId(i as u128 + 1),
            node: NodeId::from(*n),
            capacity: 1 << 30,
            free: 1 << 30,
            healthy: true,
        })
        .await
        .unwrap();
    }
    let layout = Layout::raid1(2).unwrap();
    let spec = VolumeSpec::new(layout, 65536, 1 << 20).unwrap();
    let id = VolumeId(42);
    let t = Topology::new_normal(
        id,
        layout,
        65536,
        vec![(DiskId(1), "a".into()), (DiskId(2), "b".into())],
    )
    .unwrap();
    cp.create_volume(VolumeRecord {
        id,
        name: "vol".into(),
        spec,
        secret: [7; 32],
        topology: t,
        growing_to: None,
    })
    .await
    .unwrap();
    let cfg = LeaderConfig {
        node_timeout: Duration::from_secs(5),
        replace_after: Duration::from_secs(30),
        ..LeaderConfig::default()
    };
    let leader = Leader::new(cp.clone(), clock.clone(), cfg);
    sync_all(&cp, id, None).await;
    (cp, clock, leader, id)
}

/// Every live member's TOMA reports its clients synced to the current generation.
async fn sync_all(cp: &EmbeddedControlPlane, id: VolumeId, rebuild: Option<RebuildProgress>) {
    let t = cp.volume(id).await.unwrap().unwrap().value.topology;
    for m in &t.members {
        cp.put_member_status(MemberStatus {
            volume: id,
            disk: m.disk,
            node: m.node.clone(),
            synced: t.generation,
            boot: 1,
            dirty_bits_lost: false,
            stale: false,
            rebuild,
            extent_bytes: 0,
            grow_refused: None,
        })
        .await
        .unwrap();
    }
}

async fn heartbeat(cp: &EmbeddedControlPlane, nodes: &[&str], beat: u64) {
    for (i, n) in NODES.iter().enumerate() {
        if nodes.contains(n) {
            cp.put_node(NodeRecord {
                node: NodeId::from(*n),
                endpoint: format!("127.0.0.{}:1", i + 1),
                heartbeat: beat,
                boot: 1,
            })
            .await
            .unwrap();
        }
    }
}

async fn phase(cp: &EmbeddedControlPlane, id: VolumeId) -> (Phase, u64) {
    let t = cp.volume(id).await.unwrap().unwrap().value.topology;
    (t.phase(), t.generation)
}

#[tokio::test]
async fn node_silence_degrades_and_return_rebuilds_to_normal() {
    let (cp, clock, mut leader, id) = setup().await;
    assert!(leader.tick().await.unwrap().is_empty());
    // Node b stops reporting; a keeps beating. Judged on the leader's clock only.
    for beat in 2..5 {
        clock.advance(Duration::from_secs(2));
        heartbeat(&cp, &["a", "c"], beat).await;
        leader.tick().await.unwrap();
    }
    assert_eq!(phase(&cp, id).await, (Phase::Degraded, 2));
    // Waits for member a's clients to sync g2.
    assert!(leader.tick().await.unwrap().is_empty());
    sync_all(&cp, id, None).await;
    assert!(
        leader.tick().await.unwrap().is_empty(),
        "nothing to restore yet"
    );
    // b comes back.
    heartbeat(&cp, &["a", "b", "c"], 10).await;
    let ch = leader.tick().await.unwrap();
    assert_eq!(ch.len(), 1);
    assert_eq!(phase(&cp, id).await, (Phase::RebuildInit, 3));
    sync_all(&cp, id, None).await;
    leader.tick().await.unwrap();
    assert_eq!(phase(&cp, id).await, (Phase::Rebuilding, 4));
    sync_all(&cp, id, None).await;
    leader.tick().await.unwrap();
    assert_eq!(
        phase(&cp, id).await.0,
        Phase::Rebuilding,
        "rebuild not reported done"
    );
    let done = RebuildProgress {
        generation: 4,
        done_units: 16,
        total_units: 16,
        finished: true,
        ..RebuildProgress::default()
    };
    sync_all(&cp, id, Some(done)).await;
    leader.tick().await.unwrap();
    assert_eq!(phase(&cp, id).await, (Phase::DualLock, 5));
    sync_all(&cp, id, None).await;
    leader.tick().await.unwrap();
    assert_eq!(phase(&cp, id).await, (Phase::Normal, 6));
}

#[tokio::test]
async fn a_gap_in_the_leaders_own_observation_is_not_silence() {
    let (cp, clock, mut leader, id) = setup().await;
    assert!(leader.tick().await.unwrap().is_empty());
    // The leader could not read anything for a minute (API server down, or it was paused):
    // the nodes' unchanged heartbeats on its next read do not make them dead.
    clock.advance(Duration::from_secs(60));
    assert!(leader.tick().await.unwrap().is_empty(), "nodes judged dead");
    assert_eq!(phase(&cp, id).await, (Phase::Normal, 1));
    // Silence it does observe still counts: b stops beating, a and c go on.
    for beat in 2..5 {
        clock.advance(Duration::from_secs(2));
        heartbeat(&cp, &["a", "c"], beat).await;
        leader.tick().await.unwrap();
    }
    assert_eq!(phase(&cp, id).await, (Phase::Degraded, 2));
}

#[tokio::test]
async fn dead_member_is_replaced_by_a_new_disk_after_the_grace_period() {
    let (cp, clock, mut leader, id) = setup().await;
    leader.tick().await.unwrap();
    cp.remove_disk(DiskId(2)).await.unwrap();
    leader.tick().await.unwrap();
    assert_eq!(phase(&cp, id).await, (Phase::Degraded, 2));
    sync_all(&cp, id, None).await;
    heartbeat(&cp, &["a", "b", "c"], 2).await;
    leader.tick().await.unwrap();
    assert_eq!(
        phase(&cp, id).await.0,
        Phase::Degraded,
        "grace period not over"
    );
    clock.advance(Duration::from_secs(31));
    heartbeat(&cp, &["a", "b", "c"], 3).await;
    leader.tick().await.unwrap();
    let t = cp.volume(id).await.unwrap().unwrap().value.topology;
    assert_eq!(t.phase(), Phase::RebuildInit);
    assert_eq!(t.members[1].disk, DiskId(3), "the spare on node c");
    assert!(t.members[1].full_rebuild);
}

#[tokio::test]
async fn a_deposed_leader_cannot_write() {
    let (cp, clock, mut old, id) = setup().await;
    old.tick().await.unwrap();
    let mut new = Leader::new(cp.clone(), clock.clone(), LeaderConfig::default());
    new.tick().await.unwrap();
    cp.remove_disk(DiskId(2)).await.unwrap();
    let err = old.tick().await.unwrap_err();
    assert!(matches!(err, CpError::Deposed { .. }), "{err}");
    assert_eq!(
        phase(&cp, id).await,
        (Phase::Normal, 1),
        "old leader wrote nothing"
    );
    new.tick().await.unwrap();
    assert_eq!(phase(&cp, id).await, (Phase::Degraded, 2));
}

#[tokio::test]
async fn the_store_refuses_a_topology_that_skips_a_phase() {
    let (cp, _clock, _leader, id) = setup().await;
    let epoch = cp.acquire_leadership("x").await.unwrap();
    let v = cp.volume(id).await.unwrap().unwrap();
    let mut bad = v.value.topology.clone();
    bad.generation += 1;
    bad.members[1].role = toma_core::Role::W;
    let err = cp
        .cas_topology(id, v.version, epoch, bad)
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("DEAD member must come back as W")
            || err.to_string().contains("rule"),
        "{err}"
    );
    let mut back = v.value.topology.clone();
    back.generation = 0;
    assert!(cp.cas_topology(id, v.version, epoch, back).await.is_err());
}

#[tokio::test]
async fn a_new_leader_does_not_act_on_reports_its_predecessor_handled() {
    let (cp, clock, mut old, id) = setup().await;
    old.tick().await.unwrap();
    // A client could not reach member b under g1: the leader degrades it...
    cp.report_unreachable(Unreachable {
        volume: id,
        disk: DiskId(2),
        generation: 1,
    })
    .await
    .unwrap();
    old.tick().await.unwrap();
    assert_eq!(phase(&cp, id).await, (Phase::Degraded, 2));
    sync_all(&cp, id, None).await;
    // ...and after readmit_after lets it back.
    clock.advance(Duration::from_secs(31));
    heartbeat(&cp, &["a", "b", "c"], 2).await;
    old.tick().await.unwrap();
    assert_eq!(phase(&cp, id).await, (Phase::RebuildInit, 3));
    sync_all(&cp, id, None).await;
    // The leader dies; its successor must not take the g1 report as news.
    let cfg = LeaderConfig {
        node_timeout: Duration::from_secs(5),
        ..LeaderConfig::default()
    };
    let mut new = Leader::new(cp.clone(), clock.clone(), cfg);
    new.tick().await.unwrap();
    let t = cp.volume(id).await.unwrap().unwrap().value.topology;
    assert!(
        matches!(t.phase(), Phase::RebuildInit | Phase::Rebuilding),
        "the new leader acted on a handled report: {t}"
    );
    // A report under the current generation still counts.
    sync_all(&cp, id, None).await;
    cp.report_unreachable(Unreachable {
        volume: id,
        disk: DiskId(2),
        generation: t.generation,
    })
    .await
    .unwrap();
    new.tick().await.unwrap();
    assert_eq!(phase(&cp, id).await.0, Phase::Degraded);
}
