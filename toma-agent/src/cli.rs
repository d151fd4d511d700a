//! Command-line flags of `toma-agent`. The storage flags live in [`DiskArgs`], which the
//! top-level [`Cli`] flattens; server flags (`--listen`, `--node`, …) get their own `Args`
//! struct flattened next to it.

use std::path::PathBuf;

use clap::{Args, Parser};

use crate::disks::{parse_cluster, ConfigFile, DiskConfig, DisksError};

/// The per-node TOMA agent: owns this node's disks and serves the datapath.
#[derive(Debug, Parser)]
#[command(name = "toma-agent", version, about)]
pub struct Cli {
    #[command(flatten)]
    pub disks: DiskArgs,
    #[command(flatten)]
    pub serve: ServeArgs,
}

/// Serving the datapath with the Kubernetes API as control plane. Without `--node`, the agent
/// only opens (and formats) its disks, prints them and exits.
#[derive(Debug, Clone, Args)]
pub struct ServeArgs {
    /// This node's name (its `TomaNode`); serving starts only when it is given.
    #[arg(long, value_name = "NAME")]
    pub node: Option<String>,
    /// Kubeconfig file; without it, the in-cluster configuration.
    #[arg(long, value_name = "FILE")]
    pub kubeconfig: Option<PathBuf>,
    /// Address of the datapath listener (clients and other agents connect here).
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:7100")]
    pub listen: String,
    /// Heartbeat and timer period, in milliseconds.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub tick_ms: u64,
    /// A client that does not acknowledge a pushed topology in this long is fenced (ms).
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub ack_timeout_ms: u64,
    /// A client whose connection dropped is fenced unless it comes back within this long (ms).
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub reconnect_grace_ms: u64,
    /// After a restart, no locks are granted for this long unless every attached client
    /// re-registered sooner (ms).
    #[arg(long, value_name = "MS", default_value_t = 3000)]
    pub restart_grace_ms: u64,
    /// Every call to the Kubernetes API gives up after this long (ms); the agent keeps serving
    /// on the topologies it has and retries on its next tick.
    #[arg(long, value_name = "MS", default_value_t = 5000)]
    pub api_timeout_ms: u64,
}

/// Which disks this agent owns.
#[derive(Debug, Clone, Default, Args)]
pub struct DiskArgs {
    /// TOML config file (keys `cluster`, `disks`, `force_format`); flags add to it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// UUID of the cluster this agent belongs to (overrides the config file).
    #[arg(long, value_name = "UUID")]
    pub cluster: Option<String>,
    /// A disk (block device or file) to own; repeat for more disks.
    #[arg(long = "disk", value_name = "PATH")]
    pub disks: Vec<PathBuf>,
    /// Erase and format PATH even if it holds data or another cluster's superblock.
    /// PATH must also be given as a disk. Repeatable.
    #[arg(long = "force-format", value_name = "PATH")]
    pub force_format: Vec<PathBuf>,
}

impl DiskArgs {
    /// Merges the flags with the config file (if any) into a [`DiskConfig`].
    pub fn resolve(&self) -> Result<DiskConfig, DisksError> {
        let file = match &self.config {
            Some(p) => ConfigFile::load(p)?,
            None => ConfigFile::default(),
        };
        let cluster = self
            .cluster
            .as_deref()
            .or(file.cluster.as_deref())
            .ok_or(DisksError::NoCluster)?;
        let cluster = parse_cluster(cluster)?;
        let mut disks = file.disks;
        disks.extend(self.disks.iter().cloned());
        let mut force_format = file.force_format;
        force_format.extend(self.force_format.iter().cloned());
        Ok(DiskConfig {
            cluster,
            disks,
            force_format,
            host_boot: crate::disks::host_boot_id().unwrap_or(0),
        })
    }
}
