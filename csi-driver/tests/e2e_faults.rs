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
//! * a `toma-raid6` PVC (the chart's StorageClass, the real external-provisioner; RAID6
//!   4+2 over 7 nodes) loses two members' agents one after the other under writes, then two
//!   others under reads: no I/O error, every file's checksum matches, P and Q are right on
//!   every stripe after each rebuild, and the volume grows by whole stripes.

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
use toma_core::{Layout, Phase, Role, VolumeId};
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

/// Kills a child process (the external-provisioner) when dropped, also on a failure.
struct KillOnDrop(std::process::Child);

impl Drop for KillOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Every member's extent of volume `id` as its agent reads it from its disk (agents that
/// run now), by member index.
async fn member_contents(env: &Env, id: VolumeId) -> Vec<(usize, Vec<u8>)> {
    let members: Vec<_> = env
        .nodes
        .lock()
        .iter()
        .filter_map(|n| n.agent.as_ref())
        .flat_map(|a| a.members())
        .filter(|m| m.volume == id)
        .collect();
    let mut out = Vec::new();
    for m in members {
        let (disk, idx, len) = (m.disk.clone(), m.idx(), m.spec().member_bytes());
        let buf = tokio::task::spawn_blocking(move || {
            let mut buf = vec![0u8; len as usize];
            disk.read_member(id, idx, 0, &mut buf).map(|_| buf)
        })
        .await
        .expect("read task")
        .unwrap_or_else(|e| panic!("reading member {idx}: {e}"));
        out.push((idx, buf));
    }
    out.sort_by_key(|(i, _)| *i);
    out
}

/// The volume is unstaged (every write flushed) and Normal: P and Q must be those of the
/// data chunks on every stripe of every member, and the data must start with the ext4
/// superblock (the data chunks are where the volume's bytes are).
async fn verify_parity(env: &Env, id: VolumeId, when: &str) {
    let t = env.topology(id).await.expect("topology");
    assert!(
        t.phase() == Phase::Normal && t.members.iter().all(|m| m.role == Role::Rwl),
        "{when}: not Normal: {t}"
    );
    let contents = member_contents(env, id).await;
    assert_eq!(
        contents.iter().map(|(i, _)| *i).collect::<Vec<_>>(),
        (0..t.n()).collect::<Vec<_>>(),
        "{when}: every member's extent read"
    );
    let started = Instant::now();
    let data = toma_client::raid6::verify_members(&t, &contents)
        .unwrap_or_else(|e| panic!("{when}: parity: {e}"));
    let stripes = data.len() as u64 / (u64::from(t.chunk_size) * t.layout.data_chunks_per_unit());
    assert_eq!(
        data.get(1080..1082),
        Some(&[0x53, 0xEF][..]),
        "{when}: the ext4 magic at byte 1080 of the volume's data"
    );
    eprintln!(
        "{when}: P and Q verified on all {stripes} stripes of {} members ({} MiB of data) in {:?}",
        contents.len(),
        data.len() >> 20,
        started.elapsed()
    );
}

async fn wait_dead(env: &Env, id: VolumeId, dead: usize, t0: Instant, what: &str) -> u64 {
    let t = eventually(what, Duration::from_secs(60), || async {
        env.topology(id)
            .await
            .filter(|t| t.count(Role::Dead) == dead)
    })
    .await;
    eprintln!(
        "{what}: {} DEAD (gen {}, {}) {:?} after the kill",
        dead,
        t.generation,
        t.phase(),
        t0.elapsed()
    );
    t.generation
}

async fn wait_normal(env: &Env, id: VolumeId, after: u64, w: Option<&Writer>, what: &str) {
    let t0 = Instant::now();
    let t = eventually(what, Duration::from_secs(180), || async {
        if let Some(w) = w {
            assert!(!w.handle.is_finished(), "the writer stopped ({what})");
        }
        env.topology(id).await.filter(|t| {
            t.generation > after
                && t.phase() == Phase::Normal
                && t.members.iter().all(|m| m.role == Role::Rwl)
        })
    })
    .await;
    eprintln!(
        "{what}: Normal (gen {}) {:?} after both agents were back",
        t.generation,
        t0.elapsed()
    );
}

/// The `toma-raid6` StorageClass of the chart (helm template, applied to the apiserver), a
/// PVC of it provisioned by the real external-provisioner (RAID6 4+2 over 6 of the 7 nodes,
/// so one node is a spare), staged and published with ext4 by the node plugin. Files are
/// written through the mount while two members' agents are killed one after the other: no
/// I/O error. Both come back, the volume is Normal again; then unstaged (flushed), P and Q
/// are checked on every stripe of the members' extents; a limit that leaves no whole stripe
/// is refused naming it, the volume grows by whole stripes while unstaged; staged again:
/// every file's checksum matches; unstaged, two other members' agents killed, staged again:
/// every file read back through reconstructed reads; both back, Normal, P and Q checked
/// again; deleting the PVC frees all six extents.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn raid6_pvc_loses_two_agents_under_writes_and_every_block_verifies() {
    let Some(bin) = precheck(&["helm", "csi-provisioner"]) else {
        return;
    };
    let t_test = Instant::now();
    let env = Env::start(bin, 7, 1 << 30, 100).await;

    // The chart's StorageClass, as `helm install` makes it.
    let out = std::process::Command::new(env.bin.join("helm"))
        .args(["template", "toma"])
        .arg(support::repo().join("charts/toma"))
        .args(["--show-only", "templates/storageclasses.yaml"])
        .output()
        .expect("helm template");
    assert!(
        out.status.success(),
        "helm template: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let (ok, msg) = env.kubectl(
        &["apply", "-f", "-"],
        Some(&String::from_utf8_lossy(&out.stdout)),
    );
    assert!(ok, "apply the chart's StorageClasses: {msg}");
    let (ok, sc) = env.kubectl(&["get", "storageclass/toma-raid6", "-o", "json"], None);
    assert!(ok, "storageclass/toma-raid6: {sc}");
    let sc: serde_json::Value = serde_json::from_str(&sc).expect("StorageClass JSON");
    let params = &sc["parameters"];
    assert_eq!(params["raid"], "raid6", "{sc}");
    assert_eq!(params["dataMembers"], "4", "{sc}");
    assert_eq!(sc["provisioner"], toma_csi::DRIVER_NAME, "{sc}");

    let mut p = plugins(&env).await;
    let ctrl_sock = env.path().join("csi/controller.sock");
    let log = std::fs::File::create(env.path().join("provisioner.log")).expect("log");
    let _prov = KillOnDrop(
        std::process::Command::new(env.bin.join("csi-provisioner"))
            .arg(format!("--csi-address={}", ctrl_sock.display()))
            .arg(format!("--kubeconfig={}", env.kubeconfig.display()))
            .args([
                "--leader-election=false",
                "--extra-create-metadata",
                "--timeout=120s",
                "-v=3",
            ])
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("csi-provisioner"),
    );
    let prov_log =
        || std::fs::read_to_string(env.path().join("provisioner.log")).unwrap_or_default();
    // What kubelet and node-driver-registrar would create for the node plugin's node.
    let node = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: client-node\n  labels: {{{}: toma}}\n---\n\
         apiVersion: storage.k8s.io/v1\nkind: CSINode\nmetadata: {{name: client-node}}\nspec:\n  drivers:\n  \
         - {{name: {}, nodeID: client-node, topologyKeys: [{}]}}\n",
        toma_csi::TOPOLOGY_KEY,
        toma_csi::DRIVER_NAME,
        toma_csi::TOPOLOGY_KEY
    );
    let (ok, out) = env.kubectl(&["apply", "-f", "-"], Some(&node));
    assert!(ok, "apply Node + CSINode: {out}");
    let pvc = "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data6, namespace: default}\n\
               spec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: toma-raid6\n  \
               resources: {requests: {storage: 128Mi}}\n";
    let (ok, out) = env.kubectl(&["apply", "-f", "-"], Some(pvc));
    assert!(ok, "apply PVC: {out}");
    let t0 = Instant::now();
    let jsonpath = |args: &[&str]| -> String {
        let (ok, out) = env.kubectl(args, None);
        if ok {
            out.trim().to_string()
        } else {
            String::new()
        }
    };
    let pv = eventually("the PVC to be Bound", Duration::from_secs(120), || async {
        let phase = jsonpath(&[
            "-n",
            "default",
            "get",
            "pvc/data6",
            "-o",
            "jsonpath={.status.phase}",
        ]);
        (phase == "Bound").then(|| {
            jsonpath(&[
                "-n",
                "default",
                "get",
                "pvc/data6",
                "-o",
                "jsonpath={.spec.volumeName}",
            ])
        })
    })
    .await;
    eprintln!("PVC toma-raid6 Bound to {pv} in {:?}", t0.elapsed());
    let vid = jsonpath(&[
        "get",
        &format!("pv/{pv}"),
        "-o",
        "jsonpath={.spec.csi.volumeHandle}",
    ]);
    let id = toma_csi::controller::parse_volume_id(&vid).unwrap_or_else(|| {
        panic!(
            "PV {pv} volumeHandle {vid:?}; provisioner log:\n{}",
            prov_log()
        )
    });
    let rec = env
        .cp
        .volume(id)
        .await
        .expect("control plane")
        .expect("the volume exists")
        .value;
    assert_eq!(rec.spec.layout, Layout::raid6(4).expect("layout"));
    assert_eq!(rec.spec.size, 128 << 20);
    let t = env.topology(id).await.expect("topology");
    let mut nodes: Vec<&str> = t.members.iter().map(|m| m.node.0.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    assert_eq!(nodes.len(), 6, "six members on six distinct nodes: {t}");

    let staging = p.root.join("staging/r6");
    let target = p.root.join("pods/p6/volume");
    stage_publish(&mut p, &vid, &staging, &target).await;
    let stats = |p: &mut Plugin| {
        let mut node = p.node.clone();
        let req = v1::NodeGetVolumeStatsRequest {
            volume_id: vid.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: String::new(),
        };
        async move {
            let r = node
                .node_get_volume_stats(req)
                .await
                .expect("NodeGetVolumeStats")
                .into_inner();
            r.usage
                .iter()
                .find(|u| u.unit == v1::volume_usage::Unit::Bytes as i32)
                .map(|u| u.total)
                .expect("byte usage")
        }
    };
    let total0 = stats(&mut p).await;

    // Two members lost one after the other under writes.
    let w = start_writer(target.clone());
    wait_files(&w, 10, "10 files before the first fault").await;
    let a = env.node_index(&t.members[1].node.0).expect("node");
    let b = env.node_index(&t.members[4].node.0).expect("node");
    let t_a = Instant::now();
    env.kill_agent(a);
    let at = w.written.load(Ordering::SeqCst);
    eprintln!(
        "killed the agent of {} (member 1) after {at} files",
        t.members[1].node
    );
    wait_dead(&env, id, 1, t_a, "first loss").await;
    wait_files(&w, at + 10, "10 files written with one member lost").await;
    let t_b = Instant::now();
    env.kill_agent(b);
    let at = w.written.load(Ordering::SeqCst);
    eprintln!(
        "killed the agent of {} (member 4) after {at} files",
        t.members[4].node
    );
    let gen2 = wait_dead(&env, id, 2, t_b, "second loss").await;
    wait_files(&w, at + 10, "10 files written with two members lost").await;
    env.start_agent(a).await;
    env.start_agent(b).await;
    wait_normal(&env, id, gen2, Some(&w), "both members back").await;
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
    unpublish_unstage(&mut p, &vid, &staging, &target).await;
    verify_parity(&env, id, "after two losses and the rebuild").await;

    // Expansion keeps whole stripes: a limit that allows none above the request is refused
    // (nothing changes), then the volume grows 128 -> 160 MiB.
    let e = p
        .ctrl
        .controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: vid.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: (128 << 20) + 4096,
                limit_bytes: (128 << 20) + (128 << 10),
            }),
            ..Default::default()
        })
        .await
        .expect_err("no whole stripe fits under the limit");
    assert_eq!(e.code(), tonic::Code::OutOfRange, "{e:?}");
    assert!(
        e.message()
            .contains("stripe, chunkSize 65536 x dataMembers 4 = 262144 bytes"),
        "{}",
        e.message()
    );
    let r = p
        .ctrl
        .controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: vid.clone(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: 160 << 20,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .expect("ControllerExpandVolume")
        .into_inner();
    assert_eq!(r.capacity_bytes, 160 << 20);
    let disks: Vec<PathBuf> = env
        .nodes
        .lock()
        .iter()
        .flat_map(|n| n.disk_paths.clone())
        .collect();
    let extents = |id: VolumeId| -> Vec<u64> {
        disks
            .iter()
            .flat_map(support::extents_on)
            .filter(|e| e.volume == id)
            .map(|e| e.length)
            .collect()
    };
    assert_eq!(
        extents(id),
        vec![40 << 20; 6],
        "every member grew to 160/4 MiB"
    );

    // Staged again (the ext4 grows to the new size first): every file intact.
    stage_publish(&mut p, &vid, &staging, &target).await;
    let total1 = stats(&mut p).await;
    assert!(
        total1 > total0,
        "the file system grew: {total0} -> {total1} bytes"
    );
    let root = target.clone();
    tokio::task::spawn_blocking(move || verify_files(&root, n))
        .await
        .expect("verify");
    eprintln!("all files verified after the rebuild and a remount");

    // Two other members lost, then the volume staged again: the files (a new mount, so
    // nothing of them is cached) are read back, the data chunks of the two lost members
    // (about a third of all) through reconstructed reads.
    unpublish_unstage(&mut p, &vid, &staging, &target).await;
    let t = env.topology(id).await.expect("topology");
    let c = env.node_index(&t.members[0].node.0).expect("node");
    let d = env.node_index(&t.members[5].node.0).expect("node");
    let t_c = Instant::now();
    env.kill_agent(c);
    env.kill_agent(d);
    let gen2 = wait_dead(&env, id, 2, t_c, "members 0 and 5 lost at once").await;
    let t_stage = Instant::now();
    stage_publish(&mut p, &vid, &staging, &target).await;
    eprintln!(
        "staged and published with two members lost in {:?}",
        t_stage.elapsed()
    );
    let root = target.clone();
    let t_read = Instant::now();
    tokio::task::spawn_blocking(move || verify_files(&root, n))
        .await
        .expect("verify");
    eprintln!(
        "all files verified with two members lost (reconstructed reads) in {:?}",
        t_read.elapsed()
    );
    unpublish_unstage(&mut p, &vid, &staging, &target).await;
    env.start_agent(c).await;
    env.start_agent(d).await;
    wait_normal(&env, id, gen2, None, "members 0 and 5 back").await;
    verify_parity(&env, id, "after the second pair's rebuild").await;

    // Deleting the PVC deletes the volume: all six extents freed.
    let (ok, out) = env.kubectl(
        &["-n", "default", "delete", "pvc/data6", "--wait=false"],
        None,
    );
    assert!(ok, "delete PVC: {out}");
    eventually(
        "the PV, the volume and its extents to be gone",
        Duration::from_secs(120),
        || async {
            let pv_gone = !env.kubectl(&["get", &format!("pv/{pv}")], None).0;
            (pv_gone && extents(id).is_empty()).then_some(())
        },
    )
    .await;
    eprintln!(
        "PVC deleted: all six extents freed; test took {:?}",
        t_test.elapsed()
    );
}
