//! fio (`--ioengine=nbd`, `--verify=crc32c`) over the NBD server while one of the two agents
//! is killed, the volume runs degraded, the agent comes back and the volume rebuilds to
//! Normal. Every fio run must verify clean, and the mirrors must be identical at the end.
//! Bounded: the whole test gives up after 90 s (it takes ~20 s).
//!
//! Skips (with a message) only when fio is not installed; scripts/setup.sh installs it.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use toma_agent::local::{LocalCluster, LocalTimers};
use toma_client::{ClientConfig, VolumeClient};
use toma_core::{Layout, Phase};
use toma_nbd::{serve_nbd, NbdListener};

const SIZE: u64 = 32 << 20;

fn have_fio() -> bool {
    std::process::Command::new("fio")
        .arg("--version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fio_verify_passes_while_an_agent_dies_and_the_volume_rebuilds() {
    if !have_fio() {
        eprintln!("SKIPPED: fio is not installed (scripts/setup.sh installs it)");
        return;
    }
    let deadline = Instant::now() + Duration::from_secs(90);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut cluster =
        LocalCluster::start(dir.path(), 2, 1, SIZE + (16 << 20), LocalTimers::default())
            .await
            .expect("cluster");
    let id = cluster
        .create_volume("v", Layout::raid1(2).expect("layout"), 64 * 1024, SIZE)
        .await
        .expect("volume");
    cluster
        .wait_topology(id, Duration::from_secs(30), |t| t.phase() == Phase::Normal)
        .await
        .expect("normal");
    let client = VolumeClient::attach(
        cluster.control_plane(),
        cluster.transport.clone(),
        id,
        ClientConfig::default(),
    )
    .await
    .expect("attach");
    let sock = dir.path().join("nbd.sock");
    let listener = NbdListener::bind(&format!("unix:{}", sock.display()))
        .await
        .expect("bind");
    let uri = listener.uri();
    let server = tokio::spawn(serve_nbd(client.clone(), listener));

    // fio in a loop until told to stop: each run writes the volume at random with crc32c
    // headers, verifies as it goes (backlog) and verifies everything at the end.
    let stop = Arc::new(AtomicBool::new(false));
    let runs = Arc::new(AtomicU32::new(0));
    let fio = {
        let (stop, runs, uri) = (stop.clone(), runs.clone(), uri.clone());
        let workdir = dir.path().to_path_buf();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let out = tokio::process::Command::new("fio")
                    .args([
                        "--name=verify",
                        "--ioengine=nbd",
                        "--rw=randwrite",
                        "--bs=4k",
                        "--iodepth=16",
                        "--size=16m",
                        "--verify=crc32c",
                        "--verify_backlog=512",
                        "--verify_fatal=1",
                        "--do_verify=1",
                        "--randrepeat=0",
                        "--verify_state_save=0",
                    ])
                    .arg(format!("--uri={uri}"))
                    .current_dir(&workdir)
                    .stdin(std::process::Stdio::null())
                    .output()
                    .await
                    .map_err(|e| format!("running fio: {e}"))?;
                if !out.status.success() {
                    return Err(format!(
                        "fio failed ({}):\n{}\n{}",
                        out.status,
                        String::from_utf8_lossy(&out.stdout),
                        String::from_utf8_lossy(&out.stderr)
                    ));
                }
                runs.fetch_add(1, Ordering::Relaxed);
            }
            Ok(())
        })
    };

    // Let fio get going, then kill the agent of member 1.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let victim = cluster
        .node_of_member(id, 1)
        .await
        .expect("member 1's node");
    cluster.kill_agent(victim);
    let left = deadline.saturating_duration_since(Instant::now());
    cluster
        .wait_topology(id, left, |t| t.phase() == Phase::Degraded)
        .await
        .expect("degraded");
    tokio::time::sleep(Duration::from_secs(2)).await;
    cluster.start_agent(victim).await.expect("restart agent");
    let left = deadline.saturating_duration_since(Instant::now());
    cluster
        .wait_topology(id, left, |t| t.phase() == Phase::Normal && t.generation > 1)
        .await
        .expect("back to Normal after the rebuild");
    let done_at = runs.load(Ordering::Relaxed);
    // At least one more full run after the rebuild.
    while runs.load(Ordering::Relaxed) < done_at + 1 && Instant::now() < deadline {
        if fio.is_finished() {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let left = deadline.saturating_duration_since(Instant::now());
    let res = tokio::time::timeout(left, fio)
        .await
        .expect("fio finished before the deadline")
        .expect("fio task");
    if let Err(e) = res {
        panic!("{e}");
    }
    assert!(
        runs.load(Ordering::Relaxed) >= 2,
        "fio completed {} runs",
        runs.load(Ordering::Relaxed)
    );
    server.abort();
    cluster.assert_mirrors_identical(id).await;
    cluster.shutdown().await;
}
