//! `toma-csi --mode controller|node`: the gRPC services on the CSI endpoint (a Unix socket).

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Context};
use csi_proto::v1::controller_server::ControllerServer;
use csi_proto::v1::identity_server::IdentityServer;
use csi_proto::v1::node_server::NodeServer;
use tokio::net::UnixListener;
use tokio_stream::wrappers::UnixListenerStream;
use toma_control::ControlPlane;
use tracing::info;

use crate::controller::ControllerService;
use crate::identity::IdentityService;
use crate::node::NodeService;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Mode {
    Controller,
    Node,
}

#[derive(Debug, Clone, clap::Args)]
pub struct ServeArgs {
    /// Which services to serve (Identity always).
    #[arg(long, value_enum)]
    pub mode: Option<Mode>,
    /// The CSI endpoint: `unix:///path/csi.sock` (or a bare path).
    #[arg(long, env = "CSI_ENDPOINT", default_value = "unix:///csi/csi.sock")]
    pub endpoint: String,
    /// Kubeconfig file; without it, the in-cluster configuration.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// Namespace of the volume Secrets.
    #[arg(long, env = "TOMA_NAMESPACE", default_value = "toma-system")]
    pub namespace: String,
    /// This node's name (node mode).
    #[arg(long, env = "NODE_NAME")]
    pub node_id: Option<String>,
    /// The value of the topology key `topology.toma.io/cluster`.
    #[arg(long, default_value = "toma")]
    pub cluster_name: String,
    /// Node mode: where staged volumes are recorded (must survive a plugin restart).
    #[arg(long, default_value = "/var/lib/toma-csi")]
    pub state_dir: PathBuf,
    /// Node mode: the program started as `PROGRAM datapath ...` for each staged volume
    /// (default: this binary).
    #[arg(long)]
    pub datapath_exe: Option<PathBuf>,
    /// Node mode: staging and target paths must lie under one of these (repeatable).
    #[arg(long = "allowed-root", default_value = "/var/lib/kubelet")]
    pub allowed_roots: Vec<PathBuf>,
}

fn socket_path(endpoint: &str) -> PathBuf {
    let p = endpoint
        .strip_prefix("unix://")
        .or_else(|| endpoint.strip_prefix("unix:"))
        .unwrap_or(endpoint);
    PathBuf::from(p)
}

pub async fn serve(args: ServeArgs) -> anyhow::Result<()> {
    let Some(mode) = args.mode else {
        bail!("--mode controller|node is required");
    };
    let sock = socket_path(&args.endpoint);
    if let Some(parent) = sock.parent() {
        std::fs::create_dir_all(parent)
            .with_context(|| format!("creating {}", parent.display()))?;
    }
    // A socket left by an earlier run of this plugin.
    if sock.exists() {
        std::fs::remove_file(&sock)
            .with_context(|| format!("removing stale {}", sock.display()))?;
    }
    let client = crate::kube::client(args.kubeconfig.as_deref()).await?;
    let kcp = crate::kube::control_plane(
        client.clone(),
        &args.namespace,
        match mode {
            Mode::Controller => "toma-csi-controller",
            Mode::Node => "toma-csi-node",
        },
    );
    let cp: Arc<dyn ControlPlane> = kcp.clone();
    let listener =
        UnixListener::bind(&sock).with_context(|| format!("binding {}", sock.display()))?;
    let mut router = tonic::transport::Server::builder();
    let shutdown = async {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler");
        tokio::select! {
            _ = term.recv() => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        info!("stopping");
    };
    match mode {
        Mode::Controller => {
            let k = kcp.clone();
            let identity = IdentityService {
                controller: true,
                ready: Arc::new(move || {
                    (!k.ready()).then(|| "the control-plane watches have not synced yet".into())
                }),
            };
            let ctrl = ControllerService {
                cp,
                cluster: args.cluster_name.clone(),
            };
            info!(endpoint = %sock.display(), "toma-csi controller serving");
            router
                .add_service(IdentityServer::new(identity))
                .add_service(ControllerServer::new(ctrl))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await?;
        }
        Mode::Node => {
            let node_id = args
                .node_id
                .clone()
                .context("--node-id (or NODE_NAME) is required in node mode")?;
            std::fs::create_dir_all(args.state_dir.join("volumes"))
                .with_context(|| format!("creating {}", args.state_dir.display()))?;
            let exe = match &args.datapath_exe {
                Some(p) => p.clone(),
                None => std::env::current_exe().context("locating this binary")?,
            };
            let node = Arc::new(NodeService::new(
                cp,
                client.clone(),
                node_id.clone(),
                args.cluster_name.clone(),
                args.state_dir.clone(),
                args.allowed_roots.clone(),
                exe,
                args.kubeconfig.clone(),
                args.namespace.clone(),
            ));
            let (k, n) = (kcp.clone(), node.clone());
            let identity = IdentityService {
                controller: false,
                ready: Arc::new(move || {
                    if !k.ready() {
                        return Some("the control-plane watches have not synced yet".into());
                    }
                    n.not_ready()
                }),
            };
            info!(endpoint = %sock.display(), node = %node_id, "toma-csi node serving");
            router
                .add_service(IdentityServer::new(identity))
                .add_service(NodeServer::from_arc(node))
                .serve_with_incoming_shutdown(UnixListenerStream::new(listener), shutdown)
                .await?;
        }
    }
    let _ = std::fs::remove_file(&sock);
    Ok(())
}
