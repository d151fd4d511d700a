//! The datapath over real TCP with real files: agents, the embedded leader and clients.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use toma_agent::local::{LocalCluster, LocalTimers};
use toma_client::{ClientConfig, VolumeClient};
use toma_core::{Layout, Phase, VolumeId};

const CHUNK: u64 = 64 * 1024;
const MIB: u64 = 1024 * 1024;
const WAIT: Duration = Duration::from_secs(60);

fn block(unit: u64, version: u64) -> Bytes {
    let mut v = vec![0u8; CHUNK as usize];
    for (i, b) in v.iter_mut().enumerate() {
        *b = (unit as usize * 31 + version as usize * 7 + i / 4096) as u8;
    }
    v[..8].copy_from_slice(&unit.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    Bytes::from(v)
}

async fn cluster(nodes: usize) -> (tempfile::TempDir, LocalCluster) {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = LocalCluster::start(dir.path(), nodes, 1, 64 * MIB, LocalTimers::default())
        .await
        .expect("cluster starts");
    (dir, c)
}

async fn client(c: &LocalCluster, id: VolumeId) -> VolumeClient {
    VolumeClient::attach(
        c.control_plane(),
        c.transport.clone(),
        id,
        ClientConfig::default(),
    )
    .await
    .expect("attach")
}

/// The node index that holds member `m` of the volume.
async fn node_of(c: &LocalCluster, id: VolumeId, m: usize) -> usize {
    let t = c.topology(id).await.expect("topology");
    (0..c.node_count())
        .find(|&i| c.node_name(i) == &t.members[m].node)
        .expect("member node")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn write_read_degrade_and_rebuild_only_dirty_chunks() {
    let (_dir, c) = cluster(3).await;
    degrade_and_rebuild(c).await;
}

/// The same life cycle with every agent on a runtime (and thread) of its own, the shape
/// `toma bench` and `toma nbd` use: a killed agent's thread serves its restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_on_their_own_threads_degrade_and_rebuild() {
    let dir = tempfile::tempdir().expect("tempdir");
    let c = LocalCluster::start_on_own_threads(dir.path(), 3, 1, 64 * MIB, LocalTimers::default())
        .await
        .expect("cluster starts");
    degrade_and_rebuild(c).await;
}

async fn degrade_and_rebuild(mut c: LocalCluster) {
    let id = c
        .create_volume("v", Layout::raid1(2).unwrap(), CHUNK, 32 * CHUNK)
        .await
        .unwrap();
    let cl = client(&c, id).await;
    for u in 0..32 {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    for u in 0..32 {
        assert_eq!(
            cl.read(u * CHUNK, CHUNK as usize).await.unwrap(),
            block(u, 1)
        );
    }
    // Kill member 1's agent; writes hold until the leader marks it DEAD, then complete.
    let n1 = node_of(&c, id, 1).await;
    c.kill_agent(n1);
    for u in 0..5 {
        cl.write(u * CHUNK, block(u, 2)).await.unwrap();
    }
    let t = c.topology(id).await.unwrap();
    assert_eq!(t.phase(), Phase::Degraded, "{t}");
    for u in 0..5 {
        assert_eq!(
            cl.read(u * CHUNK, CHUNK as usize).await.unwrap(),
            block(u, 2)
        );
    }
    // The disk comes back; only the 5 dirty chunks are copied.
    c.start_agent(n1).await.unwrap();
    let t = c
        .wait_topology(id, WAIT, |t| t.phase() == Phase::Normal && t.generation > 2)
        .await
        .unwrap();
    assert!(t.generation >= 6, "went through every phase: {t}");
    let statuses = c.cp_statuses(id).await;
    let rebuilt: u64 = statuses
        .iter()
        .filter_map(|s| s.rebuild)
        .filter(|r| r.finished)
        .map(|r| r.done_units)
        .sum();
    assert_eq!(rebuilt, 5, "exactly the dirty chunks were rebuilt");
    // Both mirrors hold the same, newest data.
    for u in 0..32 {
        let want = block(u, if u < 5 { 2 } else { 1 });
        assert_eq!(cl.read(u * CHUNK, CHUNK as usize).await.unwrap(), want);
    }
    c.assert_mirrors_identical(id).await;
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_clients_never_interleave_on_one_chunk() {
    let (_dir, c) = cluster(2).await;
    let id = c
        .create_volume("v", Layout::raid1(2).unwrap(), CHUNK, 4 * CHUNK)
        .await
        .unwrap();
    let a = client(&c, id).await;
    let b = client(&c, id).await;
    // Both hammer the same chunks with whole-chunk writes; the mirrors must end identical
    // and every read must see one whole write.
    // Each runs at least 40 rounds, and goes on (up to 2000) until the two have met at a
    // lock, so the check below does not depend on how the scheduler interleaved them.
    let met = {
        let (a, b) = (a.clone(), b.clone());
        move || {
            a.stats()
                .lock_retries
                .load(std::sync::atomic::Ordering::Relaxed)
                + b.stats()
                    .lock_retries
                    .load(std::sync::atomic::Ordering::Relaxed)
                > 0
        }
    };
    let mut tasks = Vec::new();
    for (k, cl) in [a.clone(), b.clone()].into_iter().enumerate() {
        let met = met.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..2000u64 {
                if i >= 40 && met() {
                    break;
                }
                let u = i % 4;
                cl.write(u * CHUNK, block(u, 100 * k as u64 + i))
                    .await
                    .unwrap();
                let got = cl.read(u * CHUNK, CHUNK as usize).await.unwrap();
                let ver = u64::from_le_bytes(got[8..16].try_into().unwrap());
                assert_eq!(got, block(u, ver), "a read saw a mixture");
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    assert!(
        a.stats()
            .lock_retries
            .load(std::sync::atomic::Ordering::Relaxed)
            + b.stats()
                .lock_retries
                .load(std::sync::atomic::Ordering::Relaxed)
            > 0,
        "the two writers met at the locks"
    );
    c.assert_mirrors_identical(id).await;
    c.shutdown().await;
}

#[allow(dead_code)]
fn _assert_send(_: Arc<LocalCluster>) {}
