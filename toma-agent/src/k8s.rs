//! `toma-agent --node NAME`: the agent with the Kubernetes API as its control plane.
//!
//! It registers its `TomaNode` and its `TomaDisk`s (named by the UUIDs in their
//! superblocks), heartbeats, hosts the members of every `TomaTopology` that names one of its
//! disks, pushes new topologies to its clients and writes its synced generation per volume
//! into the topology's status. Every API call is bounded ([`Bounded`]): when the apiserver
//! is unreachable the agent keeps serving I/O on the topologies it has and catches up when
//! the API answers again (its watches resume and its next tick re-reads everything).

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use toma_control::{Clock, ControlPlane, MonotonicClock};
use toma_operator::{KubeConfig, KubeControlPlane, Metrics, Watches};
use toma_wire::transport::{TcpTransport, Transport};
use tracing::info;

use crate::bounded::Bounded;
use crate::cli::ServeArgs;
use crate::disks::Disks;
use crate::server::{Agent, AgentConfig, AgentHandle};

/// The control plane an agent (or a client such as `toma io`) uses: the Kubernetes API
/// through `toma_operator::KubeControlPlane`, watching topologies and volumes only, every
/// call bounded by `api_timeout`.
pub fn kube_control_plane(
    client: kube::Client,
    field_manager: &str,
    api_timeout: Duration,
) -> Arc<dyn ControlPlane> {
    let kube = KubeControlPlane::with_watches(
        client,
        KubeConfig {
            field_manager: field_manager.to_string(),
            ..KubeConfig::default()
        },
        Arc::new(Metrics::default()),
        None,
        Watches::Topologies,
    );
    Bounded::new(kube, api_timeout)
}

/// Starts the agent on `disks` against the cluster of `args.kubeconfig`.
pub async fn start(args: &ServeArgs, node: &str, disks: &Disks) -> anyhow::Result<AgentHandle> {
    let api_timeout = Duration::from_millis(args.api_timeout_ms.max(100));
    let client = toma_operator::client_from_kubeconfig(args.kubeconfig.as_deref(), api_timeout)
        .await
        .context("connecting to the Kubernetes API")?;
    let cp = kube_control_plane(client, &format!("toma-agent-{node}"), api_timeout);
    let mut cfg = AgentConfig::new(node, args.listen.clone());
    cfg.tick = Duration::from_millis(args.tick_ms.max(10));
    cfg.ack_timeout = Duration::from_millis(args.ack_timeout_ms);
    cfg.reconnect_grace = Duration::from_millis(args.reconnect_grace_ms);
    cfg.restart_grace = Duration::from_millis(args.restart_grace_ms);
    let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
    let clock: Arc<dyn Clock> = Arc::new(MonotonicClock::default());
    let list = disks.iter().map(|(_, d)| d.clone()).collect();
    let h = Agent::start(cfg, list, cp, transport, clock)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    info!(node, endpoint = %h.endpoint(), "serving; control plane: the Kubernetes API");
    Ok(h)
}
