//! The Kubernetes side: a client from a kubeconfig or the in-cluster config, and the
//! operator's `KubeControlPlane` over it (CRDs, Secrets, watches).

use std::path::Path;
use std::sync::Arc;

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};
use toma_operator::{KubeConfig, KubeControlPlane, Metrics};

/// A client for `kubeconfig`, or the in-cluster configuration (a pod's ServiceAccount).
pub async fn client(kubeconfig: Option<&Path>) -> anyhow::Result<Client> {
    let config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => Config::incluster().context("in-cluster configuration (or pass --kubeconfig)")?,
    };
    Ok(Client::try_from(config)?)
}

/// The control plane (`namespace` holds the volume Secrets).
pub fn control_plane(client: Client, namespace: &str, manager: &str) -> Arc<KubeControlPlane> {
    let cfg = KubeConfig {
        lease_namespace: namespace.to_string(),
        secret_namespace: namespace.to_string(),
        field_manager: manager.to_string(),
        ..KubeConfig::default()
    };
    KubeControlPlane::new(client, cfg, Arc::new(Metrics::default()), None)
}
