//! Faults under a mounted Toma volume, staged and published as kubelet would (NodeStage +
//! NodePublish through the `toma-csi` node plugin, real agents, real kube-apiserver):
//!
//! * a member's agent is killed while files are written through the mount; the volume goes
//!   Degraded, the agent comes back, the rebuild brings it to Normal; the writer never sees
//!   an I/O error; after unmount + remount every file's checksum matches.
//! * the node plugin is killed (SIGKILL) and restarted while files are written: the writer
//!   sees no error (the datapath runs in a process of its own), and the new plugin's
//!   NodeUnstage detaches cleanly (datapath gone, loop device gone, FUSE unmounted,
//!   attachment removed).

mod support;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use csi_proto::v1;
use csi_proto::v1::controller_client::ControllerClient;
use csi_proto::v1::node_client::NodeClient;
use support::{channel, eventually, mount_cap, precheck, wait_ready, Env};
use toma_control::ControlPlane;
use toma_core::{Phase, VolumeId};
use tonic::transport::Channel;

const FILE_BYTES: usize = 192 * 1024;
/// Upper bound on files one writer writes (the loops also stop on a deadline).
const MAX_FILES: u64 = 5000;
/// File names cycle over this many slots (48 MiB), so a long run never fills the volume:
/// write `i` goes to `f<i % SLOTS>`.
const SLOTS: u64 = 250;

/// The deterministic content of file `i`.
fn content(i: u64) -> Vec<u8> {
    let mut x = i.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..FILE_BYTES)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

struct Writer {
    stop: Arc<AtomicBool>,
    written: Arc<AtomicU64>,
    /// Longest single file write + fsync, in ms.
    longest_ms: Arc<AtomicU64>,
    handle: JoinHandle<Result<u64, String>>,
}

/// Writes files (write + fsync each) into `dir` until stopped, `MAX_FILES`, or 10
/// minutes; returns how many, or the first error.
fn start_writer(dir: PathBuf) -> Writer {
    let stop = Arc::new(AtomicBool::new(false));
    let written = Arc::new(AtomicU64::new(0));
    let longest_ms = Arc::new(AtomicU64::new(0));
    let (s, w, l) = (stop.clone(), written.clone(), longest_ms.clone());
    let handle = std::thread::spawn(move || {
        let deadline = Instant::now() + Duration::from_secs(600);
        for i in 0..MAX_FILES {
            if s.load(Ordering::SeqCst) || Instant::now() > deadline {
                return Ok(i);
            }
            let t0 = Instant::now();
            let p = dir.join(format!("f{}", i % SLOTS));
            let mut f =
                std::fs::File::create(&p).map_err(|e| format!("create {}: {e}", p.display()))?;
            f.write_all(&content(i))
                .map_err(|e| format!("write {}: {e}", p.display()))?;
            f.sync_all()
                .map_err(|e| format!("fsync {}: {e}", p.display()))?;
            l.fetch_max(t0.elapsed().as_millis() as u64, Ordering::SeqCst);
            w.store(i + 1, Ordering::SeqCst);
        }
        Ok(MAX_FILES)
    });
    Writer {
        stop,
        written,
        longest_ms,
        handle,
    }
}

/// Checks every file in `dir` holds the content of the last write to its slot, of the
/// `n` writes made.
fn verify_files(dir: &Path, n: u64) {
    for i in n.saturating_sub(SLOTS)..n {
        let p = dir.join(format!("f{}", i % SLOTS));
        let got = std::fs::read(&p).unwrap_or_else(|e| panic!("read {}: {e}", p.display()));
        assert!(
            crc32c::crc32c(&got) == crc32c::crc32c(&content(i)) && got.len() == FILE_BYTES,
            "file f{} (write {i}): checksum mismatch ({} bytes)",
            i % SLOTS,
            got.len()
        );
    }
}

async fn wait_files(w: &Writer, at_least: u64, what: &str) {
    eventually(what, Duration::from_secs(120), || async {
        assert!(!w.handle.is_finished(), "the writer stopped early ({what})");
        (w.written.load(Ordering::SeqCst) >= at_least).then_some(())
    })
    .await;
}

struct Plugin {
    ctrl: ControllerClient<Channel>,
    node: NodeClient<Channel>,
    node_sock: PathBuf,
    root: PathBuf,
}

async fn plugins(env: &Env) -> Plugin {
    let ctrl_sock = env.path().join("csi/controller.sock");
    let node_sock = env.path().join("csi/node.sock");
    let root = env.path().join("kubelet");
    std::fs::create_dir_all(&root).expect("root");
    env.spawn_csi("controller", &env.controller_args(&ctrl_sock));
    env.spawn_csi("node", &env.node_args(&node_sock, "client-node", &root));
    wait_ready(&ctrl_sock, "controller", || env.log("controller")).await;
    wait_ready(&node_sock, "node plugin", || env.log("node")).await;
    Plugin {
        ctrl: ControllerClient::new(channel(&ctrl_sock).await),
        node: NodeClient::new(channel(&node_sock).await),
        node_sock,
        root,
    }
}

async fn create(p: &mut Plugin, name: &str, size: i64) -> (String, VolumeId) {
    let r = p
        .ctrl
        .create_volume(v1::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: size,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![mount_cap("ext4")],
            parameters: [
                ("raid".to_string(), "raid1".to_string()),
                ("mirrors".to_string(), "2".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let id = toma_csi::controller::parse_volume_id(&r.volume_id).expect("uuid");
    (r.volume_id, id)
}

async fn stage_publish(p: &mut Plugin, vid: &str, staging: &Path, target: &Path) {
    p.node
        .node_stage_volume(v1::NodeStageVolumeRequest {
            volume_id: vid.into(),
            staging_target_path: staging.display().to_string(),
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        })
        .await
        .expect("NodeStageVolume");
    p.node
        .node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: vid.into(),
            staging_target_path: staging.display().to_string(),
            target_path: target.display().to_string(),
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        })
        .await
        .expect("NodePublishVolume");
}

async fn unpublish_unstage(p: &mut Plugin, vid: &str, staging: &Path, target: &Path) {
    p.node
        .node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
            volume_id: vid.into(),
            target_path: target.display().to_string(),
        })
        .await
        .expect("NodeUnpublishVolume");
    p.node
        .node_unstage_volume(v1::NodeUnstageVolumeRequest {
            volume_id: vid.into(),
            staging_target_path: staging.display().to_string(),
        })
        .await
        .expect("NodeUnstageVolume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn member_agent_killed_mid_write_rebuilds_and_files_survive_remount() {
    let Some(bin) = precheck(&[]) else { return };
    let env = Env::start(bin, 3, 2 << 30, 40).await;
    let mut p = plugins(&env).await;
    let (vid, id) = create(&mut p, "pvc-faults-agent", 128 << 20).await;
    let staging = p.root.join("staging/v1");
    let target = p.root.join("pods/p1/volume");
    stage_publish(&mut p, &vid, &staging, &target).await;

    let w = start_writer(target.clone());
    wait_files(&w, 10, "10 files before the fault").await;
    let t = env.topology(id).await.expect("topology");
    let gen0 = t.generation;
    let victim = env.node_index(&t.members[0].node.0).expect("member's node");
    let t_fault = Instant::now();
    env.kill_agent(victim);
    let at_kill = w.written.load(Ordering::SeqCst);
    eprintln!(
        "killed the agent of {} (member 0) after {at_kill} files",
        t.members[0].node
    );

    let degraded = eventually(
        "the volume to go Degraded",
        Duration::from_secs(60),
        || async {
            env.topology(id)
                .await
                .filter(|t| t.phase() != Phase::Normal)
                .map(|t| (t_fault.elapsed(), t))
        },
    )
    .await;
    eprintln!(
        "fault -> {} (gen {}) in {:?}",
        degraded.1.phase(),
        degraded.1.generation,
        degraded.0
    );
    wait_files(&w, at_kill + 10, "10 files written while degraded").await;
    env.start_agent(victim).await;
    let normal = eventually(
        "the volume back in Normal after the rebuild",
        Duration::from_secs(180),
        || async {
            assert!(
                !w.handle.is_finished(),
                "the writer stopped during the rebuild"
            );
            env.topology(id)
                .await
                .filter(|t| t.phase() == Phase::Normal && t.generation > gen0)
                .map(|t| (t_fault.elapsed(), t))
        },
    )
    .await;
    eprintln!(
        "fault -> Normal (gen {}) in {:?}",
        normal.1.generation, normal.0
    );
    let after = w.written.load(Ordering::SeqCst);
    wait_files(&w, after + 5, "5 files after Normal").await;
    w.stop.store(true, Ordering::SeqCst);
    let n = w
        .handle
        .join()
        .expect("writer thread")
        .unwrap_or_else(|e| panic!("the writer saw an I/O error: {e}"));
    eprintln!(
        "writer: {n} files of {} KiB, no error; longest write+fsync {} ms",
        FILE_BYTES / 1024,
        w.longest_ms.load(Ordering::SeqCst)
    );

    // Unmount, detach, attach again, mount again: every file intact.
    unpublish_unstage(&mut p, &vid, &staging, &target).await;
    assert!(
        !toma_csi::mounts::is_mounted(&staging),
        "staging still mounted"
    );
    stage_publish(&mut p, &vid, &staging, &target).await;
    let root = target.clone();
    tokio::task::spawn_blocking(move || verify_files(&root, n))
        .await
        .expect("verify");
    eprintln!("all {n} files verified after remount");
    unpublish_unstage(&mut p, &vid, &staging, &target).await;
    p.ctrl
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vid.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn node_plugin_restart_while_writing_keeps_io_and_unstages_cleanly() {
    let Some(bin) = precheck(&[]) else { return };
    let env = Env::start(bin, 3, 2 << 30, 50).await;
    let mut p = plugins(&env).await;
    let (vid, id) = create(&mut p, "pvc-faults-restart", 64 << 20).await;
    let staging = p.root.join("staging/v1");
    let target = p.root.join("pods/p1/volume");
    stage_publish(&mut p, &vid, &staging, &target).await;
    let vol_dir = env.path().join("state-client-node/volumes").join(&vid);
    let datapath_pid: u32 = std::fs::read_to_string(vol_dir.join("ready"))
        .expect("ready file")
        .trim()
        .parse()
        .expect("pid");

    let w = start_writer(target.clone());
    wait_files(&w, 10, "10 files before the restart").await;
    env.kill_proc("node");
    let at_kill = w.written.load(Ordering::SeqCst);
    eprintln!("killed the node plugin (SIGKILL) after {at_kill} files");
    wait_files(&w, at_kill + 10, "10 files while no node plugin runs").await;
    let node_sock = p.node_sock.clone();
    env.spawn_csi(
        "node-restarted",
        &env.node_args(&node_sock, "client-node", &p.root),
    );
    wait_ready(&node_sock, "restarted node plugin", || {
        env.log("node-restarted")
    })
    .await;
    p.node = NodeClient::new(channel(&node_sock).await);
    let after = w.written.load(Ordering::SeqCst);
    wait_files(&w, after + 10, "10 files after the restart").await;
    w.stop.store(true, Ordering::SeqCst);
    let n = w
        .handle
        .join()
        .expect("writer thread")
        .unwrap_or_else(|e| panic!("the writer saw an I/O error: {e}"));
    eprintln!(
        "writer: {n} files, no error across the restart; longest write+fsync {} ms",
        w.longest_ms.load(Ordering::SeqCst)
    );
    let root = target.clone();
    tokio::task::spawn_blocking(move || verify_files(&root, n))
        .await
        .expect("verify");

    // The restarted plugin still knows the volume: stats, then a clean unstage.
    let stats = p
        .node
        .node_get_volume_stats(v1::NodeGetVolumeStatsRequest {
            volume_id: vid.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        })
        .await
        .expect("NodeGetVolumeStats")
        .into_inner();
    assert!(
        stats.usage.iter().any(|u| u.total > 0 && u.used > 0),
        "{stats:?}"
    );
    let fuse = vol_dir.join("fuse");
    unpublish_unstage(&mut p, &vid, &staging, &target).await;
    assert!(
        !toma_csi::mounts::is_mounted(&staging),
        "staging still mounted"
    );
    assert!(
        !toma_csi::mounts::is_mounted(&fuse),
        "FUSE export still mounted"
    );
    assert!(
        support::loops_under(env.path()).is_empty(),
        "loop device left"
    );
    assert!(
        !Path::new(&format!("/proc/{datapath_pid}")).exists()
            || !std::fs::read_to_string(format!("/proc/{datapath_pid}/cmdline"))
                .unwrap_or_default()
                .contains("datapath"),
        "the datapath process {datapath_pid} is still running"
    );
    let log = std::fs::read_to_string(env.path().join("node-restarted.log")).unwrap_or_default();
    assert!(!log.contains("did not stop cleanly"), "unclean stop: {log}");
    let cp = env.cp.clone();
    eventually(
        "the attachment to be removed",
        Duration::from_secs(30),
        || {
            let cp = cp.clone();
            async move { cp.attachments(id).await.ok().filter(|a| a.is_empty()) }
        },
    )
    .await;
    p.ctrl
        .delete_volume(v1::DeleteVolumeRequest {
            volume_id: vid.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
}
