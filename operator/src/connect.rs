//! A `kube::Client` from a kubeconfig file or the in-cluster configuration, shared by the
//! operator, `toma-agent` and `toma io`.

use std::path::Path;
use std::time::Duration;

use anyhow::Context;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

/// A client for the cluster of `kubeconfig` (or, without one, the in-cluster configuration).
/// Connecting gives up after `connect_timeout`, so that an unreachable apiserver is noticed
/// instead of waited on for the library's default 30 s.
pub async fn client_from_kubeconfig(
    kubeconfig: Option<&Path>,
    connect_timeout: Duration,
) -> anyhow::Result<Client> {
    let mut config = match kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
                .await
                .with_context(|| format!("kubeconfig {}", path.display()))?
        }
        None => Config::incluster().context("in-cluster configuration (or pass --kubeconfig)")?,
    };
    config.connect_timeout = Some(connect_timeout);
    Client::try_from(config).context("building the Kubernetes client")
}
