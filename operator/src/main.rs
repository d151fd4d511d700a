//! The Toma operator: elects one leader with a `coordination.k8s.io/v1` Lease, and while it
//! holds it, runs `toma_control::Leader` over the CRDs. Serves `/metrics`, `/healthz`,
//! `/readyz`.
#![forbid(unsafe_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use tokio::sync::{mpsc, watch};
use toma_control::LeaderConfig;
use toma_operator::http::{serve, Health};
use toma_operator::runtime::{run, Settings};
use toma_operator::{KubeConfig, KubeControlPlane, Metrics};
use tracing::info;

#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// Kubeconfig file; without it, the in-cluster configuration.
    #[arg(long)]
    kubeconfig: Option<PathBuf>,
    /// Namespace of the leader Lease (and of volume Secrets the operator creates).
    #[arg(long, default_value = "toma-system")]
    lease_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "toma-operator-leader")]
    lease_name: String,
    /// This replica's identity (the pod name).
    #[arg(long, env = "POD_NAME")]
    name: String,
    /// Address of /metrics, /healthz and /readyz.
    #[arg(long, default_value = "0.0.0.0:9090")]
    metrics_addr: SocketAddr,
    /// Lease duration in seconds.
    #[arg(long, default_value_t = 15)]
    lease_duration: u64,
    /// Leader pass interval in seconds (passes also run on every change).
    #[arg(long, default_value_t = 2)]
    interval: u64,
    /// Seconds without a heartbeat change (on this process's clock) before a node is gone.
    #[arg(long, default_value_t = 10)]
    node_timeout: u64,
    /// Seconds after which a member a client reported unreachable is tried again.
    #[arg(long, default_value_t = 30)]
    readmit_after: u64,
    /// Seconds a member stays DEAD before a NEW disk replaces it.
    #[arg(long, default_value_t = 600)]
    replace_after: u64,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let args = Args::parse();
    let client =
        toma_operator::client_from_kubeconfig(args.kubeconfig.as_deref(), Duration::from_secs(5))
            .await?;
    let kube = KubeConfig {
        lease_namespace: args.lease_namespace.clone(),
        lease_name: args.lease_name.clone(),
        secret_namespace: args.lease_namespace.clone(),
        ..KubeConfig::default()
    };
    let metrics = Arc::new(Metrics::default());
    let (notices, notice_rx) = mpsc::unbounded_channel();
    let cp = KubeControlPlane::new(
        client.clone(),
        kube.clone(),
        metrics.clone(),
        Some(notices.clone()),
    );
    let health: Arc<dyn Health> = cp.clone();
    let (addr, _http) = serve(args.metrics_addr, metrics.clone(), health).await?;
    info!(%addr, name = %args.name, "toma-operator serving /metrics /healthz /readyz");

    let (shutdown_tx, shutdown) = watch::channel(false);
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        let _ = shutdown_tx.send(true);
    });
    let settings = Settings {
        name: args.name.clone(),
        kube,
        lease_duration: Duration::from_secs(args.lease_duration),
        lease_grace: Duration::from_secs((args.lease_duration / 3).max(1)),
        interval: Duration::from_secs(args.interval.max(1)),
        leader: LeaderConfig {
            node_timeout: Duration::from_secs(args.node_timeout),
            replace_after: Duration::from_secs(args.replace_after),
            readmit_after: Duration::from_secs(args.readmit_after),
            ..LeaderConfig::default()
        },
    };
    run(client, settings, cp, notices, notice_rx, metrics, shutdown).await
}
