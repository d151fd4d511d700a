//! The Toma operator: the Kubernetes `ControlPlane` (`kube_cp`), the guard against impossible
//! hand edits (`guard`, pure), Events, metrics and probes, and the Lease loop that runs
//! `toma_control::Leader` while this replica holds the Lease (`runtime`).
#![forbid(unsafe_code)]

pub mod connect;
pub mod error;
pub mod events;
pub mod guard;
pub mod http;
pub mod kube_cp;
pub mod metrics;
pub mod runtime;

pub use connect::client_from_kubeconfig;
pub use kube_cp::{KubeConfig, KubeControlPlane, Notice, Watches};
pub use metrics::Metrics;
