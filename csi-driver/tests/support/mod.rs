//! The e2e environment of the CSI tests: a real control plane (`e2e/harness/control-plane.sh`:
//! etcd, kube-apiserver, kube-controller-manager), the CRDs, TOMA agents on 127.0.0.x with
//! sparse file disks (in this process, each with its own `KubeControlPlane`), the operator's
//! Lease loop and leader (in this process), and `toma-csi` controller and node plugins as
//! processes. Everything is torn down by `Drop`, also when a test fails: plugin processes,
//! datapath processes, mounts and loop devices under the test's directory, the control plane.
//!
//! Run by `e2e/csi.sh` (`make e2e`), which sets `TOMA_E2E_CSI=1`. Needs root (mounts, loop
//! devices, FUSE) and the e2e tools (`e2e/tools/build.sh`). Otherwise a test prints why and
//! returns, unless `TOMA_E2E_REQUIRED=1` (set by `e2e/csi.sh`), where it fails.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use csi_proto::v1;
use hyper_util::rt::TokioIo;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::Client;
use parking_lot::Mutex;
use tokio::sync::{mpsc, watch};
use toma_agent::disks::random_disk_id;
use toma_agent::server::{Agent, AgentConfig, AgentHandle};
use toma_agent::{ClusterId, DiskConfig, Disks};
use toma_control::{Clock, ControlPlane, LeaderConfig, MonotonicClock};
use toma_core::{Topology, VolumeId};
use toma_operator::runtime::Settings;
use toma_operator::{KubeConfig, KubeControlPlane, Metrics};
use toma_wire::transport::{TcpTransport, Transport};
use tonic::transport::{Channel, Endpoint, Uri};

pub const NAMESPACE: &str = "toma-system";

pub fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn has(dir: &Path, tools: &[&str]) -> bool {
    tools.iter().all(|t| dir.join(t).is_file())
}

/// The e2e tools' bin dir, if every one of `tools` is built.
pub fn tools(need: &[&str]) -> Option<PathBuf> {
    if let Ok(d) = std::env::var("TOMA_E2E_BIN") {
        let d = PathBuf::from(d);
        return has(&d, need).then_some(d);
    }
    let root = std::env::var("TOMA_E2E_TOOLS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/toma-e2e-tools")
        });
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .find(|d| has(d, need))
}

/// The tools dir if this test can run here; `None` (after saying why) if it cannot and is
/// not required to.
pub fn precheck(extra: &[&str]) -> Option<PathBuf> {
    let mut need = vec![
        "etcd",
        "kube-apiserver",
        "kube-controller-manager",
        "kubectl",
    ];
    need.extend_from_slice(extra);
    let why = if std::env::var("TOMA_E2E_CSI").as_deref() != Ok("1") {
        // `make e2e` (e2e/csi.sh) runs these one at a time; `make nextest` would run them a
        // second time, in parallel with everything else.
        Some("the CSI e2e tests run under e2e/csi.sh (TOMA_E2E_CSI=1)".to_string())
    } else if !rustix::process::geteuid().is_root() {
        Some("not root (mounts, loop devices and FUSE need it)".to_string())
    } else if !Path::new("/dev/fuse").exists() {
        Some("no /dev/fuse".to_string())
    } else if tools(&need).is_none() {
        Some(format!(
            "the e2e tools ({}) are not built; run e2e/tools/build.sh",
            need.join(", ")
        ))
    } else {
        None
    };
    match why {
        None => tools(&need),
        Some(w) if std::env::var("TOMA_E2E_REQUIRED").as_deref() == Ok("1") => {
            panic!("TOMA_E2E_REQUIRED=1 but this test cannot run: {w}")
        }
        Some(w) => {
            eprintln!("SKIPPED: {w}");
            None
        }
    }
}

/// Polls `f` until it returns `Some`, up to `max`; panics with `what` on timeout.
pub async fn eventually<T, F, Fut>(what: &str, max: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + max;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {max:?}: {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

pub struct NodeSlot {
    pub name: String,
    pub listen: String,
    pub disk_paths: Vec<PathBuf>,
    pub agent: Option<AgentHandle>,
}

pub struct Env {
    pub dir: tempfile::TempDir,
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
    /// Admin (system:masters).
    pub client: Client,
    /// What the agents authenticate with (admin unless a test swaps it).
    pub agent_client: Client,
    pub cp: Arc<KubeControlPlane>,
    pub cluster: ClusterId,
    pub nodes: Mutex<Vec<NodeSlot>>,
    leader_stop: watch::Sender<bool>,
    procs: Mutex<Vec<(String, Child)>>,
    cp_started: bool,
}

pub fn kubectl_in(
    bin: &Path,
    kubeconfig: &Path,
    args: &[&str],
    stdin: Option<&str>,
) -> (bool, String) {
    use std::io::Write;
    let mut child = Command::new(bin.join("kubectl"))
        .arg(format!("--kubeconfig={}", kubeconfig.display()))
        .arg("--request-timeout=30s")
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let Some(mut input) = child.stdin.take() {
        let _ = input.write_all(stdin.unwrap_or_default().as_bytes());
    }
    let out = child.wait_with_output().expect("kubectl output");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// A client for `kubeconfig`.
pub async fn client_for(kubeconfig: &Path) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("kubeconfig");
    let config = kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    Client::try_from(config).expect("client")
}

fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).expect("random");
    u128::from_le_bytes(b)
}

impl Env {
    /// Starts the control plane, applies the CRDs, creates the namespace, starts `nodes`
    /// agents (one `disk_size` sparse disk each) on 127.0.0.`base_ip`+i and the leader.
    pub async fn start(bin: PathBuf, nodes: usize, disk_size: u64, base_ip: u8) -> Env {
        let mut env = Env::control_plane(bin).await;
        env.apply_crds();
        let (ok, out) = env.kubectl(&["create", "namespace", NAMESPACE], None);
        assert!(ok, "create namespace: {out}");
        env.start_nodes(nodes, disk_size, base_ip).await;
        env.start_leader(env.client.clone());
        env
    }

    /// Only the control plane (etcd, kube-apiserver, kube-controller-manager).
    pub async fn control_plane(bin: PathBuf) -> Env {
        let dir = tempfile::Builder::new()
            .prefix("toma-csi-e2e.")
            .tempdir()
            .expect("temp dir");
        let ok = Command::new(repo().join("e2e/harness/control-plane.sh"))
            .arg("start")
            .arg(dir.path())
            .env("TOMA_E2E_BIN", &bin)
            .status()
            .expect("control-plane.sh runs")
            .success();
        if !ok {
            let _ = Command::new(repo().join("e2e/harness/control-plane.sh"))
                .arg("stop")
                .arg(dir.path())
                .status();
            panic!(
                "control-plane.sh start failed; logs in {}",
                dir.path().display()
            );
        }
        let kubeconfig = dir.path().join("kubeconfig");
        let client = client_for(&kubeconfig).await;
        let cp = KubeControlPlane::new(
            client.clone(),
            KubeConfig {
                lease_namespace: NAMESPACE.into(),
                secret_namespace: NAMESPACE.into(),
                field_manager: "e2e".into(),
                ..KubeConfig::default()
            },
            Arc::new(Metrics::default()),
            None,
        );
        let (leader_stop, _) = watch::channel(false);
        Env {
            dir,
            bin,
            kubeconfig,
            agent_client: client.clone(),
            client,
            cp,
            cluster: ClusterId(random_u128()),
            nodes: Mutex::new(Vec::new()),
            leader_stop,
            procs: Mutex::new(Vec::new()),
            cp_started: true,
        }
    }

    /// Applies `crds/` and waits until they are established.
    pub fn apply_crds(&self) {
        let crds = repo().join("crds");
        let (ok, out) = self.kubectl(&["apply", "-f", &crds.display().to_string()], None);
        assert!(ok, "kubectl apply crds: {out}");
        self.wait_crds();
    }

    pub fn wait_crds(&self) {
        let (ok, out) = self.kubectl(
            &[
                "wait",
                "--for=condition=established",
                "--timeout=60s",
                "crd/tomanodes.toma.io",
                "crd/tomadisks.toma.io",
                "crd/tomavolumes.toma.io",
                "crd/tomatopologies.toma.io",
            ],
            None,
        );
        assert!(ok, "CRDs not established: {out}");
    }

    /// Creates `nodes` nodes with one sparse disk each and starts their agents (with
    /// `self.agent_client`'s credentials).
    pub async fn start_nodes(&mut self, nodes: usize, disk_size: u64, base_ip: u8) {
        let mut slots = Vec::new();
        for i in 0..nodes {
            let ndir = self.dir.path().join(format!("node{}", i + 1));
            std::fs::create_dir_all(&ndir).expect("node dir");
            let p = ndir.join("disk0.img");
            let f = std::fs::File::create(&p).expect("disk file");
            f.set_len(disk_size).expect("disk size");
            slots.push(NodeSlot {
                name: format!("node{}", i + 1),
                listen: format!("127.0.0.{}:0", usize::from(base_ip) + i),
                disk_paths: vec![p],
                agent: None,
            });
        }
        *self.nodes.lock() = slots;
        for i in 0..nodes {
            self.start_agent(i).await;
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        kubectl_in(&self.bin, &self.kubeconfig, args, stdin)
    }

    fn agent_cp(&self) -> Arc<dyn ControlPlane> {
        KubeControlPlane::new(
            self.agent_client.clone(),
            KubeConfig {
                lease_namespace: NAMESPACE.into(),
                secret_namespace: NAMESPACE.into(),
                field_manager: "toma-agent".into(),
                ..KubeConfig::default()
            },
            Arc::new(Metrics::default()),
            None,
        )
    }

    /// (Re)starts node `i`'s agent on its disks, waiting while a killed agent's tasks still
    /// hold them.
    pub async fn start_agent(&self, i: usize) {
        let (name, listen, paths) = {
            let n = &self.nodes.lock()[i];
            (n.name.clone(), n.listen.clone(), n.disk_paths.clone())
        };
        let cfg = DiskConfig {
            cluster: self.cluster,
            disks: paths,
            force_format: Vec::new(),
            host_boot: 0,
        };
        let disks = eventually(
            "the agent's disks to be released",
            Duration::from_secs(20),
            || {
                let r = Disks::open_with(&cfg, &mut random_disk_id);
                async move {
                    match r {
                        Ok(d) => Some(d),
                        Err(e) if e.to_string().contains("in use") => None,
                        Err(e) => panic!("opening disks: {e}"),
                    }
                }
            },
        )
        .await;
        let disks: Vec<_> = disks.iter().map(|(_, d)| d.clone()).collect();
        let mut acfg = AgentConfig::new(name.as_str(), listen);
        acfg.tick = Duration::from_millis(200);
        acfg.ack_timeout = Duration::from_secs(3);
        acfg.reconnect_grace = Duration::from_secs(3);
        acfg.restart_grace = Duration::from_secs(2);
        let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::default());
        let h = Agent::start(acfg, disks, self.agent_cp(), transport, clock)
            .await
            .expect("agent starts");
        self.nodes.lock()[i].agent = Some(h);
    }

    /// Kills node `i`'s agent like a crash.
    pub fn kill_agent(&self, i: usize) {
        if let Some(a) = self.nodes.lock()[i].agent.take() {
            a.kill();
        }
    }

    pub fn node_index(&self, name: &str) -> Option<usize> {
        self.nodes.lock().iter().position(|n| n.name == name)
    }

    /// Runs the operator's Lease loop and leader in this process, as `client`.
    pub fn start_leader(&self, client: Client) {
        let (notices, notice_rx) = mpsc::unbounded_channel();
        let metrics = Arc::new(Metrics::default());
        let kube = KubeConfig {
            lease_namespace: NAMESPACE.into(),
            secret_namespace: NAMESPACE.into(),
            ..KubeConfig::default()
        };
        let cp = KubeControlPlane::new(
            client.clone(),
            kube.clone(),
            metrics.clone(),
            Some(notices.clone()),
        );
        let settings = Settings {
            name: "e2e-leader".into(),
            kube,
            lease_duration: Duration::from_secs(15),
            lease_grace: Duration::from_secs(5),
            interval: Duration::from_secs(1),
            leader: LeaderConfig {
                name: "e2e-leader".into(),
                node_timeout: Duration::from_secs(3),
                replace_after: Duration::from_secs(3600),
                readmit_after: Duration::from_secs(5),
                ..LeaderConfig::default()
            },
        };
        let stop = self.leader_stop.subscribe();
        tokio::spawn(async move {
            if let Err(e) =
                toma_operator::runtime::run(client, settings, cp, notices, notice_rx, metrics, stop)
                    .await
            {
                eprintln!("leader loop ended: {e:#}");
            }
        });
    }

    /// The topology of volume `id` now.
    pub async fn topology(&self, id: VolumeId) -> Option<Topology> {
        self.cp
            .volume(id)
            .await
            .ok()
            .flatten()
            .map(|v| v.value.topology)
    }

    /// Starts `toma-csi` with `args` (its log in DIR/<name>.log); returns its pid.
    pub fn spawn_csi(&self, name: &str, args: &[String]) -> u32 {
        let log = std::fs::File::create(self.path().join(format!("{name}.log"))).expect("log");
        let child = Command::new(env!("CARGO_BIN_EXE_toma-csi"))
            .args(args)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("toma-csi starts");
        let pid = child.id();
        self.procs.lock().push((name.to_string(), child));
        pid
    }

    /// Kills the process `name` started by [`spawn_csi`](Self::spawn_csi) (SIGKILL) and reaps it.
    pub fn kill_proc(&self, name: &str) {
        let mut procs = self.procs.lock();
        if let Some(i) = procs.iter().position(|(n, _)| n == name) {
            let (_, mut c) = procs.remove(i);
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    pub fn controller_args(&self, sock: &Path) -> Vec<String> {
        vec![
            "--mode".into(),
            "controller".into(),
            "--endpoint".into(),
            format!("unix://{}", sock.display()),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--namespace".into(),
            NAMESPACE.into(),
        ]
    }

    pub fn node_args(&self, sock: &Path, node: &str, root: &Path) -> Vec<String> {
        vec![
            "--mode".into(),
            "node".into(),
            "--endpoint".into(),
            format!("unix://{}", sock.display()),
            "--kubeconfig".into(),
            self.kubeconfig.display().to_string(),
            "--namespace".into(),
            NAMESPACE.into(),
            "--node-id".into(),
            node.into(),
            "--state-dir".into(),
            self.path()
                .join(format!("state-{node}"))
                .display()
                .to_string(),
            "--allowed-root".into(),
            root.display().to_string(),
        ]
    }

    /// Reads the log of process `name`.
    pub fn log(&self, name: &str) -> String {
        std::fs::read_to_string(self.path().join(format!("{name}.log"))).unwrap_or_default()
    }
}

/// Extents recorded in the superblock of the disk file at `path` (read without the agent's
/// lock: a copy of the first MiB is decoded).
pub fn extents_on(path: &PathBuf) -> Vec<toma_agent::Extent> {
    use toma_agent::superblock::{inspect, Inspection};
    use toma_agent::{BlockDevice, MemDevice, SUPERBLOCK_AREA};
    let bytes = std::fs::read(path)
        .map(|b| b[..SUPERBLOCK_AREA as usize].to_vec())
        .expect("read disk");
    let dev = MemDevice::new("copy", SUPERBLOCK_AREA * 2);
    dev.write_at(&bytes, 0).expect("copy");
    match inspect(&dev).expect("superblock") {
        Inspection::Valid { sb, .. } => sb.extents,
        other => panic!("{}: no valid superblock: {other:?}", path.display()),
    }
}

/// Processes whose command line mentions `dir` (datapath processes of this test).
pub fn procs_under(dir: &Path) -> Vec<u32> {
    let needle = dir.display().to_string();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        if pid == std::process::id() {
            continue;
        }
        if let Ok(c) = std::fs::read(e.path().join("cmdline")) {
            let s = String::from_utf8_lossy(&c).replace('\0', " ");
            if s.contains(&needle) && s.contains("toma-csi") {
                out.push(pid);
            }
        }
    }
    out
}

/// Mount points under `dir`, deepest first.
pub fn mounts_under(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = toma_csi::mounts::mount_table()
        .into_iter()
        .map(|m| m.target)
        .filter(|t| t.starts_with(dir))
        .collect();
    v.sort_by_key(|p| std::cmp::Reverse(p.components().count()));
    v
}

/// Loop devices whose backing file lies under `dir`.
pub fn loops_under(dir: &Path) -> Vec<String> {
    let out = Command::new("losetup")
        .args(["--noheadings", "--output", "NAME,BACK-FILE", "--list"])
        .output();
    let Ok(out) = out else { return Vec::new() };
    let needle = dir.display().to_string();
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.contains(&needle))
        .filter_map(|l| l.split_whitespace().next().map(str::to_string))
        .collect()
}

impl Drop for Env {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.lock().drain(..) {
            let _ = c.kill();
            let _ = c.wait();
        }
        let dir = self.dir.path().to_path_buf();
        for m in mounts_under(&dir) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        for l in loops_under(&dir) {
            let _ = Command::new("losetup").arg("-d").arg(&l).status();
        }
        for pid in procs_under(&dir) {
            if let Some(p) = rustix::process::Pid::from_raw(pid as i32) {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
            }
        }
        for m in mounts_under(&dir) {
            let _ = Command::new("umount").arg("-l").arg(&m).status();
        }
        self.leader_stop.send_replace(true);
        for n in self.nodes.lock().iter_mut() {
            if let Some(a) = n.agent.take() {
                a.kill();
            }
        }
        if self.cp_started {
            let _ = Command::new(repo().join("e2e/harness/control-plane.sh"))
                .arg("stop")
                .arg(self.dir.path())
                .env("TOMA_E2E_BIN", &self.bin)
                .status();
        }
        if std::env::var("TOMA_E2E_KEEP").as_deref() == Ok("1") {
            let p = std::mem::replace(&mut self.dir, tempfile::tempdir().expect("tmp")).keep();
            eprintln!("kept {}", p.display());
        }
    }
}

/// A gRPC channel to a CSI Unix socket.
pub async fn try_channel(sock: &Path) -> Result<Channel, tonic::transport::Error> {
    let sock = sock.to_path_buf();
    Endpoint::try_from("http://[::1]:50051")
        .expect("endpoint")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let s = sock.clone();
            async move {
                Ok::<_, std::io::Error>(TokioIo::new(tokio::net::UnixStream::connect(s).await?))
            }
        }))
        .await
}

pub async fn channel(sock: &Path) -> Channel {
    try_channel(sock).await.expect("connect to the CSI socket")
}

/// Waits until the plugin at `sock` answers Probe with ready = true.
pub async fn wait_ready(sock: &Path, what: &str, log: impl Fn() -> String) {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        // A killed plugin leaves its socket file behind: connecting may be refused.
        if let Ok(ch) = try_channel(sock).await {
            let mut id = v1::identity_client::IdentityClient::new(ch);
            if let Ok(r) = id.probe(v1::ProbeRequest {}).await {
                if r.into_inner().ready == Some(true) {
                    return;
                }
            }
        }
        assert!(
            Instant::now() < deadline,
            "{what} not ready after 60s; log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

pub fn mount_cap(fs: &str) -> v1::VolumeCapability {
    use v1::volume_capability::access_mode::Mode;
    use v1::volume_capability::{AccessMode, AccessType, MountVolume};
    v1::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Mount(MountVolume {
            fs_type: fs.into(),
            ..Default::default()
        })),
    }
}
