//! `toma-agent` in Kubernetes mode against a real kube-apiserver + etcd
//! (e2e/harness/control-plane.sh) and the operator's real Lease-elected leader loop:
//! agents register their TomaNode and TomaDisks (named by superblock UUID), host the members
//! of a volume created through the API, write their synced generation into the topology's
//! status, keep serving I/O while the apiserver is paused (SIGSTOP), catch up when it
//! resumes, and the leader (judging silence on its own clock) degrades and rebuilds the
//! volume when an agent dies and comes back.
//!
//! Needs the e2e tools (`e2e/tools/build.sh`, cached under `~/.cache/toma-e2e-tools/<key>/bin`,
//! or `TOMA_E2E_BIN`); without them it prints why and passes without checking (it never
//! builds them itself: that takes long). `make e2e` builds them.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::{mpsc, watch};
use toma_agent::k8s::kube_control_plane;
use toma_agent::server::{Agent, AgentConfig, AgentHandle};
use toma_agent::superblock::ClusterId;
use toma_agent::{DiskConfig, Disks};
use toma_client::{ClientConfig, VolumeClient};
use toma_control::{Clock, ControlPlane, LeaderConfig, MonotonicClock};
use toma_core::{Layout, Phase, Topology, VolumeId};
use toma_operator::runtime::Settings;
use toma_operator::{KubeConfig, KubeControlPlane, Metrics};
use toma_wire::transport::{TcpTransport, Transport};

const TOOLS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
];
const CHUNK: u64 = 64 * 1024;
const BLOCK: u64 = 4096;
/// Deadline for anything the cluster does on its own (a loaded 2-core machine).
const WAIT: Duration = Duration::from_secs(90);

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn has_tools(dir: &Path) -> bool {
    TOOLS.iter().all(|t| dir.join(t).is_file())
}

fn tools() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("TOMA_E2E_BIN") {
        let d = PathBuf::from(d);
        return has_tools(&d).then_some(d);
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
        .find(|d| has_tools(d))
}

/// The control plane, stopped (and a paused apiserver resumed first) however the test ends.
struct Harness {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Drop for Harness {
    fn drop(&mut self) {
        if let Some(pid) = self.pid("kube-apiserver") {
            let _ = Command::new("kill").args(["-CONT", &pid]).status();
        }
        let _ = Command::new(repo().join("e2e/harness/control-plane.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .env("TOMA_E2E_BIN", &self.bin)
            .status();
    }
}

impl Harness {
    fn start() -> Option<Harness> {
        let Some(bin) = tools() else {
            eprintln!(
                "SKIPPED: the e2e tools are not built yet; run e2e/tools/build.sh (or set \
                 TOMA_E2E_BIN) to run this test"
            );
            return None;
        };
        let h = Harness {
            dir: tempfile::tempdir().expect("temp dir"),
            bin,
        };
        let ok = Command::new(repo().join("e2e/harness/control-plane.sh"))
            .arg("start")
            .arg(h.dir.path())
            .env("TOMA_E2E_BIN", &h.bin)
            .status()
            .expect("control-plane.sh runs")
            .success();
        assert!(ok, "control-plane.sh start failed");
        Some(h)
    }

    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn kubectl(&self, args: &[&str]) -> String {
        let out = Command::new(self.bin.join("kubectl"))
            .arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .arg("--request-timeout=20s")
            .args(args)
            .output()
            .expect("kubectl runs");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(out.status.success(), "kubectl {args:?}: {text}");
        text
    }

    fn pid(&self, name: &str) -> Option<String> {
        let pids = std::fs::read_to_string(self.dir.path().join("pids")).ok()?;
        pids.lines()
            .filter_map(|l| l.split_once(' '))
            .find(|(n, _)| *n == name)
            .map(|(_, p)| p.trim().to_string())
    }

    fn signal_apiserver(&self, sig: &str) {
        let pid = self.pid("kube-apiserver").expect("apiserver pid");
        let ok = Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill runs")
            .success();
        assert!(ok, "kill {sig} {pid}");
    }
}

async fn kube_client(h: &Harness) -> kube::Client {
    toma_operator::client_from_kubeconfig(Some(&h.kubeconfig()), Duration::from_secs(5))
        .await
        .expect("client")
}

/// Polls `f` until it returns `Some`, up to `max`.
async fn eventually<T, F, Fut>(what: &str, max: Duration, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + max;
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out after {max:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

struct Node {
    name: String,
    disk: PathBuf,
    agent: Option<AgentHandle>,
}

async fn start_agent(h: &Harness, cluster: ClusterId, n: &Node) -> AgentHandle {
    let cfg = DiskConfig {
        cluster,
        disks: vec![n.disk.clone()],
        force_format: Vec::new(),
        host_boot: toma_agent::disks::host_boot_id().unwrap_or(0),
    };
    // A killed agent's tasks let go of its disk (and its flock) asynchronously.
    let disks = eventually("the disk to be free", WAIT, || async {
        match Disks::open(&cfg) {
            Ok(d) => Some(d),
            Err(e) if e.to_string().contains("in use") => None,
            Err(e) => panic!("opening {}: {e}", n.disk.display()),
        }
    })
    .await;
    let cp = kube_control_plane(
        kube_client(h).await,
        &format!("toma-agent-{}", n.name),
        Duration::from_secs(5),
    );
    let mut acfg = AgentConfig::new(n.name.as_str(), "127.0.0.1:0");
    acfg.tick = Duration::from_millis(300);
    acfg.ack_timeout = Duration::from_secs(3);
    acfg.reconnect_grace = Duration::from_secs(3);
    acfg.restart_grace = Duration::from_secs(2);
    let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::default());
    Agent::start(
        acfg,
        disks.iter().map(|(_, d)| d.clone()).collect(),
        cp,
        transport,
        clock,
    )
    .await
    .expect("agent starts")
}

fn block_bytes(addr: u64, version: u64) -> Bytes {
    let mut v = vec![(addr as u8) ^ (version as u8); BLOCK as usize];
    v[..8].copy_from_slice(&addr.to_le_bytes());
    v[8..16].copy_from_slice(&version.to_le_bytes());
    Bytes::from(v)
}

async fn topology(cp: &dyn ControlPlane, id: VolumeId) -> Option<Topology> {
    cp.volume(id).await.ok().flatten().map(|v| v.value.topology)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agents_follow_topologies_through_the_apiserver() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
    let Some(h) = Harness::start() else { return };
    h.kubectl(&["apply", "-f", &repo().join("crds").display().to_string()]);
    h.kubectl(&[
        "wait",
        "--for=condition=established",
        "--timeout=60s",
        "crd/tomanodes.toma.io",
        "crd/tomadisks.toma.io",
        "crd/tomavolumes.toma.io",
        "crd/tomatopologies.toma.io",
    ]);
    h.kubectl(&["create", "namespace", "toma-system"]);

    // The operator's leader loop, Lease-elected, in this process.
    let client = kube_client(&h).await;
    let metrics = Arc::new(Metrics::default());
    let (notices, notice_rx) = mpsc::unbounded_channel();
    let op_cp = KubeControlPlane::new(
        client.clone(),
        KubeConfig::default(),
        metrics.clone(),
        Some(notices.clone()),
    );
    let settings = Settings {
        name: "operator-test".into(),
        kube: KubeConfig::default(),
        lease_duration: Duration::from_secs(6),
        lease_grace: Duration::from_secs(2),
        interval: Duration::from_secs(1),
        leader: LeaderConfig {
            node_timeout: Duration::from_secs(3),
            readmit_after: Duration::from_secs(5),
            ..LeaderConfig::default()
        },
    };
    let (stop_op, op_stop_rx) = watch::channel(false);
    let operator = tokio::spawn(toma_operator::runtime::run(
        client.clone(),
        settings,
        op_cp,
        notices,
        notice_rx,
        metrics,
        op_stop_rx,
    ));

    // Three nodes, one file disk each.
    let cluster = ClusterId(0x7e57_0000_0000_0000_0000_0000_0000_0001);
    let mut nodes = Vec::new();
    for name in ["node-a", "node-b", "node-c"] {
        let disk = h.dir.path().join(format!("{name}.img"));
        let f = std::fs::File::create(&disk).expect("disk file");
        f.set_len(64 * 1024 * 1024).expect("disk size");
        nodes.push(Node {
            name: name.into(),
            disk,
            agent: None,
        });
    }
    for n in &mut nodes {
        let a = start_agent(&h, cluster, n).await;
        n.agent = Some(a);
    }

    // The test's own view of the control plane (a client's).
    let cp = kube_control_plane(client.clone(), "toma-test", Duration::from_secs(10));
    let disks = eventually("three healthy TomaDisks", WAIT, || async {
        let d = cp.disks().await.ok()?;
        (d.iter().filter(|d| d.healthy).count() == 3).then_some(d)
    })
    .await;
    // TomaDisks are named by the UUIDs in the superblocks, on the node that reports them.
    let out = h.kubectl(&["get", "tomadisks", "-o", "name"]);
    for d in &disks {
        assert!(
            out.contains(&d.disk.to_string()),
            "TomaDisk {}: {out}",
            d.disk
        );
    }
    let mut reported: Vec<&str> = disks.iter().map(|d| d.node.0.as_str()).collect();
    reported.sort_unstable();
    assert_eq!(
        reported,
        ["node-a", "node-b", "node-c"],
        "one disk per node"
    );
    let out = h.kubectl(&["get", "tomanodes", "-o", "name"]);
    for n in &nodes {
        assert!(out.contains(&n.name), "TomaNode {}: {out}", n.name);
    }

    // A volume through the API; a client through the API.
    let id = toma_agent::local::create_volume(
        cp.as_ref(),
        "vol-k8s",
        Layout::raid1(2).expect("layout"),
        CHUNK,
        4 * 1024 * 1024,
    )
    .await
    .expect("volume created");
    let t1 = topology(cp.as_ref(), id).await.expect("topology");
    let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
    let client_cfg = ClientConfig {
        node: "test".into(),
        ..ClientConfig::default()
    };
    let vc = VolumeClient::attach(cp.clone(), transport.clone(), id, client_cfg)
        .await
        .expect("client attaches");
    let blocks = 256u64;
    let mut version = vec![0u64; blocks as usize];
    let write_all = |round: u64| {
        let vc = vc.clone();
        async move {
            for b in 0..blocks {
                vc.write(b * BLOCK, block_bytes(b, round))
                    .await
                    .unwrap_or_else(|e| panic!("write of block {b} (round {round}): {e}"));
            }
        }
    };
    write_all(1).await;
    version.iter_mut().for_each(|v| *v = 1);

    // Each member's agent reports, in the topology's status, that its clients are synced.
    let g = t1.generation;
    eventually(
        "every member synced at the first generation",
        WAIT,
        || async {
            let st = cp.member_statuses(id).await.ok()?;
            (st.len() == 2 && st.iter().all(|s| s.synced >= g)).then_some(())
        },
    )
    .await;
    let out = h.kubectl(&["get", "tomatopologies"]);
    eprintln!("{out}");
    assert!(out.contains("vol-k8s") && out.contains("Normal"), "{out}");

    // The apiserver stops answering for longer than an agent's API timeout (5 s): I/O goes
    // on, on the topology the agents have.
    h.signal_apiserver("-STOP");
    let paused = tokio::time::Instant::now();
    let hold = Duration::from_secs(7);
    let mut round = 1;
    let io = tokio::time::timeout(Duration::from_secs(60), async {
        while paused.elapsed() < hold && round < 1000 {
            round += 1;
            write_all(round).await;
            for b in 0..blocks {
                let d = vc.read(b * BLOCK, BLOCK as usize).await.expect("read");
                assert_eq!(
                    d,
                    block_bytes(b, round),
                    "block {b} while the apiserver is paused"
                );
            }
        }
    })
    .await;
    h.signal_apiserver("-CONT");
    io.expect("I/O while the apiserver is paused finished in 60 s");
    assert!(round > 1, "no I/O while paused");
    version.iter_mut().for_each(|v| *v = round);
    eprintln!(
        "{} rounds of {blocks} writes + {blocks} reads with the apiserver paused for {:?}",
        round - 1,
        paused.elapsed()
    );

    // An agent dies: the leader, on its own clock, sees its node go silent; the volume
    // degrades; the survivor learns the new topology (it caught up after the pause).
    let victim_node = t1.members[1].node.0.clone();
    let victim = nodes
        .iter()
        .position(|n| n.name == victim_node)
        .expect("victim");
    nodes[victim].agent.take().expect("agent").kill();
    let degraded = eventually("Degraded", WAIT, || async {
        let t = topology(cp.as_ref(), id).await?;
        (t.phase() == Phase::Degraded).then_some(t)
    })
    .await;
    round += 1;
    write_all(round).await;
    version.iter_mut().for_each(|v| *v = round);
    let gd = degraded.generation;
    eventually(
        "the survivor synced at the Degraded generation",
        WAIT,
        || async {
            let st = cp.member_statuses(id).await.ok()?;
            st.iter()
                .any(|s| s.disk == t1.members[0].disk && s.synced >= gd)
                .then_some(())
        },
    )
    .await;

    // It comes back on the same disk: rebuild, then Normal.
    let a = start_agent(&h, cluster, &nodes[victim]).await;
    nodes[victim].agent = Some(a);
    eventually("Normal again", WAIT, || async {
        let t = topology(cp.as_ref(), id).await?;
        (t.phase() == Phase::Normal && t.generation > gd).then_some(())
    })
    .await;
    round += 1;
    write_all(round).await;
    version.iter_mut().for_each(|v| *v = round);

    // Every block on every mirror.
    let t = vc.topology();
    for (m, member) in t.members.iter().enumerate() {
        for first in (0..blocks).step_by((CHUNK / BLOCK) as usize) {
            let r = vc
                .request(
                    &t,
                    m,
                    toma_wire::Message::Read {
                        offset: first * BLOCK,
                        len: CHUNK as u32,
                    },
                )
                .await
                .unwrap_or_else(|e| panic!("reading member {m} ({}): {e}", member.disk));
            let toma_wire::Message::Data { data } = r else {
                panic!("member {m}: unexpected answer {r:?}");
            };
            for (i, b) in data.chunks(BLOCK as usize).enumerate() {
                let addr = first + i as u64;
                assert_eq!(
                    b,
                    &block_bytes(addr, version[addr as usize])[..],
                    "member {m} block {addr}"
                );
            }
        }
    }
    let out = h.kubectl(&["get", "tomatopologies"]);
    eprintln!("{out}");

    stop_op.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(20), operator).await;
    for n in &mut nodes {
        if let Some(a) = n.agent.take() {
            a.kill();
        }
    }
}
