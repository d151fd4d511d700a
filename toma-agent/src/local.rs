//! A whole Toma cluster in one process, no Kubernetes: agents on 127.0.0.x with file-backed
//! disks, the embedded control plane and the leader. `toma demo` and the integration tests
//! run on it.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use toma_control::{
    Clock, ControlPlane, EmbeddedControlPlane, Leader, LeaderConfig, MonotonicClock, VolumeRecord,
};
use toma_core::allocate::{choose_disks, Candidate};
use toma_core::{Layout, NodeId, Topology, VolumeId, VolumeSpec};
use toma_wire::transport::{TcpTransport, Transport};

use crate::disks::{random_disk_id, DiskConfig, Disks};
use crate::server::{Agent, AgentConfig, AgentHandle};
use crate::superblock::ClusterId;

/// Timers of a local cluster: short, so that the demo and tests move quickly.
#[derive(Debug, Clone)]
pub struct LocalTimers {
    pub tick: Duration,
    pub ack_timeout: Duration,
    pub reconnect_grace: Duration,
    pub restart_grace: Duration,
    pub node_timeout: Duration,
    pub replace_after: Duration,
    pub readmit_after: Duration,
}

impl Default for LocalTimers {
    fn default() -> Self {
        LocalTimers {
            tick: Duration::from_millis(100),
            ack_timeout: Duration::from_secs(3),
            reconnect_grace: Duration::from_secs(3),
            restart_grace: Duration::from_secs(2),
            node_timeout: Duration::from_millis(1500),
            replace_after: Duration::from_secs(3600),
            readmit_after: Duration::from_secs(5),
        }
    }
}

struct Node {
    name: NodeId,
    listen: String,
    disk_paths: Vec<PathBuf>,
    agent: Option<AgentHandle>,
}

pub struct LocalCluster {
    pub cp: Arc<EmbeddedControlPlane>,
    pub transport: Arc<dyn Transport>,
    pub clock: Arc<dyn Clock>,
    cluster: ClusterId,
    timers: LocalTimers,
    dir: PathBuf,
    nodes: Vec<Node>,
    leader_stop: tokio::sync::watch::Sender<bool>,
    leader: Option<tokio::task::JoinHandle<()>>,
    /// Each agent on a runtime of its own (one thread), as separate agent processes
    /// would be; `None`: agents share the caller's runtime.
    agent_threads: Option<Vec<AgentThread>>,
}

/// A current-thread tokio runtime on a thread of its own, for one agent. Dropping it stops
/// the runtime (its tasks are cancelled) and lets the thread end.
struct AgentThread {
    handle: tokio::runtime::Handle,
    _stop: tokio::sync::oneshot::Sender<()>,
}

impl AgentThread {
    fn start(name: &str) -> std::io::Result<AgentThread> {
        // Blocking threads: flushes and superblock updates (data I/O uses io_uring); 16
        // bounds them where io_uring is off (TOMA_IO=threads), 512 would thrash 2 cores.
        let rt = tokio::runtime::Builder::new_current_thread()
            .max_blocking_threads(16)
            .enable_all()
            .build()?;
        let handle = rt.handle().clone();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        std::thread::Builder::new()
            .name(format!("agent-{name}"))
            .spawn(move || {
                // Runs the agent's tasks until the cluster lets go of this thread.
                let _ = rt.block_on(stopped);
                rt.shutdown_background();
            })?;
        Ok(AgentThread {
            handle,
            _stop: stop,
        })
    }
}

fn random_u128() -> u128 {
    let mut b = [0u8; 16];
    let _ = getrandom::fill(&mut b);
    u128::from_le_bytes(b)
}

impl LocalCluster {
    /// Creates `nodes` nodes with `disks_per_node` sparse disk files of `disk_size` bytes in
    /// `dir`, starts their agents on 127.0.0.(2+i) and the leader.
    pub async fn start(
        dir: &Path,
        nodes: usize,
        disks_per_node: usize,
        disk_size: u64,
        timers: LocalTimers,
    ) -> std::io::Result<LocalCluster> {
        Self::start_inner(dir, nodes, disks_per_node, disk_size, timers, false).await
    }

    /// Like [`start`](Self::start), with each agent on a tokio runtime of its own (one
    /// thread each), as separate agent processes on separate nodes would run, instead of on
    /// the caller's runtime. For measurements (`toma bench`, `toma nbd`).
    pub async fn start_on_own_threads(
        dir: &Path,
        nodes: usize,
        disks_per_node: usize,
        disk_size: u64,
        timers: LocalTimers,
    ) -> std::io::Result<LocalCluster> {
        Self::start_inner(dir, nodes, disks_per_node, disk_size, timers, true).await
    }

    async fn start_inner(
        dir: &Path,
        nodes: usize,
        disks_per_node: usize,
        disk_size: u64,
        timers: LocalTimers,
        own_threads: bool,
    ) -> std::io::Result<LocalCluster> {
        let cp = Arc::new(EmbeddedControlPlane::new());
        let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
        let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::default());
        let mut list = Vec::new();
        for i in 0..nodes {
            let name = NodeId(format!("node{}", i + 1));
            let ndir = dir.join(&name.0);
            std::fs::create_dir_all(&ndir)?;
            let mut disk_paths = Vec::new();
            for d in 0..disks_per_node {
                let p = ndir.join(format!("disk{d}.img"));
                let f = std::fs::OpenOptions::new()
                    .create(true)
                    .truncate(false)
                    .write(true)
                    .open(&p)?;
                if f.metadata()?.len() < disk_size {
                    f.set_len(disk_size)?;
                }
                disk_paths.push(p);
            }
            list.push(Node {
                name,
                listen: format!("127.0.0.{}:0", i + 2),
                disk_paths,
                agent: None,
            });
        }
        let (leader_stop, _) = tokio::sync::watch::channel(false);
        let mut c = LocalCluster {
            cp,
            transport,
            clock,
            cluster: ClusterId(random_u128()),
            timers,
            dir: dir.to_path_buf(),
            nodes: list,
            leader_stop,
            leader: None,
            agent_threads: own_threads.then(Vec::new),
        };
        for i in 0..nodes {
            c.start_agent(i).await?;
        }
        c.start_leader();
        Ok(c)
    }

    /// Starts a leader (again, after [`crash_leader`](Self::crash_leader)): it takes the
    /// leadership with a new epoch and learns the cluster afresh.
    pub fn start_leader(&mut self) {
        if self.leader.is_some() {
            return;
        }
        let cfg = LeaderConfig {
            name: "embedded-leader".into(),
            node_timeout: self.timers.node_timeout,
            replace_after: self.timers.replace_after,
            readmit_after: self.timers.readmit_after,
            ..LeaderConfig::default()
        };
        let leader = Leader::new(self.cp.clone(), self.clock.clone(), cfg);
        let stop = self.leader_stop.subscribe();
        self.leader = Some(tokio::spawn(leader.run(self.timers.tick, stop)));
    }

    pub fn control_plane(&self) -> Arc<dyn ControlPlane> {
        self.cp.clone()
    }

    pub fn node_count(&self) -> usize {
        self.nodes.len()
    }

    pub fn node_name(&self, i: usize) -> &NodeId {
        &self.nodes[i].name
    }

    pub fn disk_paths(&self, i: usize) -> &[PathBuf] {
        &self.nodes[i].disk_paths
    }

    pub fn agent(&self, i: usize) -> Option<&AgentHandle> {
        self.nodes[i].agent.as_ref()
    }

    /// (Re)starts node `i`'s agent on its disk files (RAM state starts empty, as after a crash).
    pub async fn start_agent(&mut self, i: usize) -> std::io::Result<()> {
        self.launch_agent(i, true).await
    }

    /// Starts node `i`'s agent. With `wait_in_use`, a disk still locked by a killed agent of
    /// this node is waited for (its tasks let go asynchronously); otherwise every refusal is
    /// returned at once.
    async fn launch_agent(&mut self, i: usize, wait_in_use: bool) -> std::io::Result<()> {
        let node = &self.nodes[i];
        let cfg = DiskConfig {
            cluster: self.cluster,
            disks: node.disk_paths.clone(),
            force_format: Vec::new(),
            host_boot: crate::disks::host_boot_id().unwrap_or(0),
        };
        // A killed agent's tasks let go of its disks (and their flock) asynchronously.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        let disks = loop {
            match Disks::open_with(&cfg, &mut random_disk_id) {
                Ok(d) => break d,
                Err(e)
                    if wait_in_use
                        && e.to_string().contains("in use")
                        && tokio::time::Instant::now() < deadline =>
                {
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
                Err(e) => return Err(std::io::Error::other(e.to_string())),
            }
        };
        let disks: Vec<_> = disks.iter().map(|(_, d)| d.clone()).collect();
        let mut acfg = AgentConfig::new(node.name.clone(), node.listen.clone());
        acfg.tick = self.timers.tick;
        acfg.ack_timeout = self.timers.ack_timeout;
        acfg.reconnect_grace = self.timers.reconnect_grace;
        acfg.restart_grace = self.timers.restart_grace;
        let start = Agent::start(
            acfg,
            disks,
            self.cp.clone(),
            self.transport.clone(),
            self.clock.clone(),
        );
        let h = match &mut self.agent_threads {
            None => start.await?,
            Some(threads) => {
                while threads.len() <= i {
                    threads.push(AgentThread::start(&format!("node{}", threads.len() + 1))?);
                }
                threads[i]
                    .handle
                    .spawn(start)
                    .await
                    .map_err(|e| std::io::Error::other(format!("agent start: {e}")))??
            }
        };
        self.nodes[i].agent = Some(h);
        Ok(())
    }

    /// Adds a node with `disks` sparse disk files of `disk_size` bytes (under the cluster's
    /// directory) and starts its agent on the next 127.0.0.x. Returns its index.
    pub async fn add_node(&mut self, disks: usize, disk_size: u64) -> std::io::Result<usize> {
        let i = self.nodes.len();
        let ndir = self.dir.join(format!("node{}", i + 1));
        std::fs::create_dir_all(&ndir)?;
        let mut paths = Vec::new();
        for d in 0..disks {
            let p = ndir.join(format!("disk{d}.img"));
            let f = std::fs::OpenOptions::new()
                .create(true)
                .truncate(false)
                .write(true)
                .open(&p)?;
            if f.metadata()?.len() < disk_size {
                f.set_len(disk_size)?;
            }
            paths.push(p);
        }
        self.add_node_with_disks(paths).await
    }

    /// Adds a node whose agent serves exactly the disks at `paths` (which must exist, be big
    /// enough and not be in use by another agent: refusals are returned, naming the path, and
    /// the node is not added). Returns its index.
    pub async fn add_node_with_disks(&mut self, paths: Vec<PathBuf>) -> std::io::Result<usize> {
        let i = self.nodes.len();
        self.nodes.push(Node {
            name: NodeId(format!("node{}", i + 1)),
            listen: format!("127.0.0.{}:0", i + 2),
            disk_paths: paths,
            agent: None,
        });
        if let Err(e) = self.launch_agent(i, false).await {
            self.nodes.pop();
            return Err(e);
        }
        Ok(i)
    }

    /// The node index whose agent serves member `member` of volume `id` now.
    pub async fn node_of_member(&self, id: VolumeId, member: usize) -> Option<usize> {
        let t = self.topology(id).await?;
        let node = &t.members.get(member)?.node;
        self.nodes.iter().position(|n| &n.name == node)
    }

    /// The volume's record (spec and secret included), for raw-protocol tests.
    pub async fn volume_record(&self, id: VolumeId) -> Option<VolumeRecord> {
        self.cp.volume(id).await.ok().flatten().map(|v| v.value)
    }

    /// Kills node `i`'s agent like a crash: its disks stop answering, its RAM state is lost.
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(a) = self.nodes[i].agent.take() {
            a.kill();
        }
    }

    /// Creates a volume placed on distinct nodes by free space.
    pub async fn create_volume(
        &self,
        name: &str,
        layout: Layout,
        chunk_size: u64,
        size: u64,
    ) -> Result<VolumeId, String> {
        create_volume(self.cp.as_ref(), name, layout, chunk_size, size).await
    }

    pub async fn topology(&self, id: VolumeId) -> Option<Topology> {
        self.cp
            .volume(id)
            .await
            .ok()
            .flatten()
            .map(|v| v.value.topology)
    }

    /// Waits until `pred` holds for the volume's topology, up to `max`.
    pub async fn wait_topology(
        &self,
        id: VolumeId,
        max: Duration,
        pred: impl Fn(&Topology) -> bool,
    ) -> Result<Topology, String> {
        let mut changes = self.cp.changes();
        let deadline = tokio::time::Instant::now() + max;
        loop {
            if let Some(t) = self.topology(id).await {
                if pred(&t) {
                    return Ok(t);
                }
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {max:?}; topology is {}",
                    self.topology(id)
                        .await
                        .map(|t| t.to_string())
                        .unwrap_or_default()
                ));
            }
            let _ = tokio::time::timeout(left, changes.changed()).await;
        }
    }

    /// Waits until the TOMA of every member of the volume has learned it (reported a status),
    /// up to `max`: a client attached before then is told "no member on node …" once.
    pub async fn wait_served(&self, id: VolumeId, max: Duration) -> Result<(), String> {
        let mut changes = self.cp.changes();
        let deadline = tokio::time::Instant::now() + max;
        loop {
            let t = self.topology(id).await;
            let statuses = self.cp_statuses(id).await;
            let missing: Vec<String> = t
                .iter()
                .flat_map(|t| t.members.iter())
                .filter(|m| !m.role.is_dead())
                .filter(|m| !statuses.iter().any(|s| s.disk == m.disk))
                .map(|m| m.node.0.clone())
                .collect();
            if t.is_some() && missing.is_empty() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(format!(
                    "timed out after {max:?}: the agents on {} have not learned volume {id}",
                    missing.join(", ")
                ));
            }
            // Statuses may land without a change event: look again at least every 50 ms.
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(50)), changes.changed()).await;
        }
    }

    /// What each member's TOMA reports about the volume.
    pub async fn cp_statuses(&self, id: VolumeId) -> Vec<toma_control::MemberStatus> {
        self.cp.member_statuses(id).await.unwrap_or_default()
    }

    /// Reads every member's extent straight from its disk (through the agents that hold
    /// them) and returns the bytes per member.
    pub async fn member_contents(&self, id: VolumeId) -> Vec<(usize, Vec<u8>)> {
        let mut out = Vec::new();
        for n in &self.nodes {
            let Some(a) = &n.agent else { continue };
            for m in a.members() {
                if m.volume != id {
                    continue;
                }
                let disk = m.disk.clone();
                let idx = m.idx();
                let len = m.spec().member_bytes();
                let data = tokio::task::spawn_blocking(move || {
                    let mut buf = vec![0u8; len as usize];
                    disk.read_member(id, idx, 0, &mut buf).map(|_| buf)
                })
                .await;
                if let Ok(Ok(buf)) = data {
                    out.push((idx, buf));
                }
            }
        }
        out.sort_by_key(|(i, _)| *i);
        out
    }

    /// Panics unless every member of the volume holds the same bytes.
    pub async fn assert_mirrors_identical(&self, id: VolumeId) {
        let t = self.topology(id).await.expect("volume exists");
        let contents = self.member_contents(id).await;
        assert_eq!(contents.len(), t.n(), "every member readable");
        for (i, c) in &contents[1..] {
            if let Some(pos) = c.iter().zip(&contents[0].1).position(|(a, b)| a != b) {
                panic!("member {i} differs from member 0 at byte {pos}");
            }
        }
    }

    /// Kills the leader like a crash: no topology changes until [`start_leader`](Self::start_leader).
    pub fn crash_leader(&mut self) {
        if let Some(l) = self.leader.take() {
            l.abort();
        }
    }

    /// Stops every agent and the leader.
    pub async fn shutdown(mut self) {
        self.leader_stop.send_replace(true);
        if let Some(l) = self.leader.take() {
            l.abort();
        }
        for i in 0..self.nodes.len() {
            self.kill_agent(i);
        }
    }
}

/// Creates volume `name` on any control plane: its members on healthy disks of distinct
/// nodes chosen by `toma_core::allocate::choose_disks` (most free space first), a random id
/// and secret, and a Normal topology at generation 1.
pub async fn create_volume(
    cp: &dyn ControlPlane,
    name: &str,
    layout: Layout,
    chunk_size: u64,
    size: u64,
) -> Result<VolumeId, String> {
    let spec = VolumeSpec::new(layout, chunk_size, size).map_err(|e| e.to_string())?;
    let disks = cp.disks().await.map_err(|e| e.to_string())?;
    let candidates: Vec<Candidate> = disks
        .iter()
        .filter(|d| d.healthy)
        .map(|d| Candidate {
            disk: d.disk,
            node: d.node.clone(),
            free: d.free,
        })
        .collect();
    let chosen = choose_disks(
        &candidates,
        layout,
        spec.member_bytes(),
        layout.members(),
        &[],
    )
    .map_err(|e| e.to_string())?;
    let id = VolumeId(random_u128());
    let topology =
        Topology::new_normal(id, layout, chunk_size, chosen).map_err(|e| e.to_string())?;
    let mut secret = [0u8; 32];
    getrandom::fill(&mut secret).map_err(|e| e.to_string())?;
    cp.create_volume(VolumeRecord {
        id,
        name: name.to_string(),
        spec,
        secret,
        topology,
        growing_to: None,
    })
    .await
    .map_err(|e| e.to_string())?;
    Ok(id)
}
