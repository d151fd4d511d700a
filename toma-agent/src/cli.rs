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
        })
    }
}
