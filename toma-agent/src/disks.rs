//! [`Disks`]: the agent's registry of its disks, opened (and formatted when new) at start.
//!
//! A disk whose first MiB is all zero is new and gets formatted; a valid Toma superblock of
//! this cluster is opened; anything else is refused unless its path is listed in
//! `force_format`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::Deserialize;
use thiserror::Error;
use toma_core::DiskId;

use crate::device::{BlockDevice, DeviceError, FileDevice};
use crate::disk::Disk;
use crate::superblock::{self, ClusterId, Inspection, Overwrite, SuperblockError};

/// Errors of the registry. Each names the disk path or config file.
#[derive(Debug, Error)]
pub enum DisksError {
    #[error("config file {path}: {why}")]
    Config { path: PathBuf, why: String },
    #[error("no cluster UUID: pass --cluster UUID or set `cluster` in the config file")]
    NoCluster,
    #[error("cluster UUID {0:?} is not of the form xxxxxxxx-xxxx-xxxx-xxxx-xxxxxxxxxxxx")]
    BadCluster(String),
    #[error(
        "--force-format {0} names a path that is not one of the agent's disks; add --disk {0} too"
    )]
    ForceNotADisk(PathBuf),
    #[error("disk {path} is listed twice (or through two paths): it is disk {id}")]
    Duplicate { path: PathBuf, id: DiskId },
    #[error("{0}")]
    Disk(#[from] SuperblockError),
    #[error("cannot get a random UUID for a new disk: {0}")]
    Random(String),
}

impl From<DeviceError> for DisksError {
    fn from(e: DeviceError) -> Self {
        DisksError::Disk(SuperblockError::Device(e))
    }
}

/// What disks to open, after merging the command line and the config file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskConfig {
    pub cluster: ClusterId,
    pub disks: Vec<PathBuf>,
    /// Paths that may be erased if they hold anything but a valid superblock of this
    /// cluster. Each must also be in `disks`.
    pub force_format: Vec<PathBuf>,
    /// This host's current boot ([`host_boot_id`]; 0 tracks nothing). A disk left attached
    /// by another boot lost power since its last flush (see [`crate::Disk::lost_writes`]).
    pub host_boot: u128,
}

/// The `[storage]`-less TOML config file: top-level keys
/// `cluster = "UUID"`, `disks = ["/dev/…"]`, `force_format = ["/dev/…"]`.
/// Unknown keys are ignored, so the same file can carry the server's settings.
#[derive(Debug, Clone, Default, Deserialize, PartialEq, Eq)]
pub struct ConfigFile {
    pub cluster: Option<String>,
    #[serde(default)]
    pub disks: Vec<PathBuf>,
    #[serde(default)]
    pub force_format: Vec<PathBuf>,
}

impl ConfigFile {
    pub fn load(path: &Path) -> Result<ConfigFile, DisksError> {
        let text = std::fs::read_to_string(path).map_err(|e| DisksError::Config {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
        toml::from_str(&text).map_err(|e| DisksError::Config {
            path: path.to_path_buf(),
            why: e.to_string(),
        })
    }
}

/// Parses a cluster UUID in the `8-4-4-4-12` hex form.
pub fn parse_cluster(s: &str) -> Result<ClusterId, DisksError> {
    toma_core::topology::parse_uuid(s)
        .map(ClusterId)
        .ok_or_else(|| DisksError::BadCluster(s.to_string()))
}

/// A fresh random disk UUID (version-4 style).
pub fn random_disk_id() -> Result<DiskId, DisksError> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| DisksError::Random(e.to_string()))?;
    b[6] = (b[6] & 0x0f) | 0x40;
    b[8] = (b[8] & 0x3f) | 0x80;
    Ok(DiskId(u128::from_be_bytes(b)))
}

/// The opened disks of this agent.
#[derive(Debug, Default)]
pub struct Disks {
    disks: Vec<(PathBuf, Arc<Disk>)>,
    by_id: HashMap<DiskId, Arc<Disk>>,
}

impl Disks {
    /// Opens (or formats) every disk of `cfg`, with random UUIDs for new disks. Stops at the
    /// first disk it refuses; disks opened before are closed again (their locks released).
    pub fn open(cfg: &DiskConfig) -> Result<Disks, DisksError> {
        Self::open_with(cfg, &mut random_disk_id)
    }

    /// Like [`open`](Self::open), with the UUIDs of new disks from `new_id` (tests and the
    /// simulation pass a deterministic source).
    pub fn open_with(
        cfg: &DiskConfig,
        new_id: &mut dyn FnMut() -> Result<DiskId, DisksError>,
    ) -> Result<Disks, DisksError> {
        for f in &cfg.force_format {
            if !cfg.disks.contains(f) {
                return Err(DisksError::ForceNotADisk(f.clone()));
            }
        }
        let mut out = Disks::default();
        for path in &cfg.disks {
            let force = cfg.force_format.contains(path);
            let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(path)?);
            let disk = open_or_format(dev, cfg.cluster, force, cfg.host_boot, new_id)?;
            out.insert(path.clone(), disk)?;
        }
        Ok(out)
    }

    /// Adds an opened disk (the simulation builds registries of [`crate::MemDevice`]s).
    pub fn insert(&mut self, path: PathBuf, disk: Disk) -> Result<Arc<Disk>, DisksError> {
        let id = disk.id();
        if self.by_id.contains_key(&id) {
            return Err(DisksError::Duplicate { path, id });
        }
        let disk = Arc::new(disk);
        self.by_id.insert(id, disk.clone());
        self.disks.push((path, disk.clone()));
        Ok(disk)
    }

    pub fn get(&self, id: DiskId) -> Option<&Arc<Disk>> {
        self.by_id.get(&id)
    }

    /// The disks with the path they were opened from, in command-line order.
    pub fn iter(&self) -> impl Iterator<Item = (&Path, &Arc<Disk>)> {
        self.disks.iter().map(|(p, d)| (p.as_path(), d))
    }

    pub fn len(&self) -> usize {
        self.disks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.disks.is_empty()
    }
}

/// Opens one device: formats it when blank (or when `force`), opens it when it holds a
/// valid superblock, refuses anything else.
pub fn open_or_format(
    dev: Arc<dyn BlockDevice>,
    cluster: ClusterId,
    force: bool,
    host: u128,
    new_id: &mut dyn FnMut() -> Result<DiskId, DisksError>,
) -> Result<Disk, DisksError> {
    if force {
        // Keep the UUID of a disk of this cluster that is being repaired? No: force means
        // erase; the disk is NEW to the cluster.
        let overwrite = Overwrite::Force {
            device: dev.name().to_string(),
        };
        return Ok(Disk::format_on(dev, new_id()?, cluster, &overwrite, host)?);
    }
    match superblock::inspect(dev.as_ref())? {
        Inspection::Blank => Ok(Disk::format_on(
            dev,
            new_id()?,
            cluster,
            &Overwrite::OnlyIfBlank,
            host,
        )?),
        Inspection::Valid { .. } | Inspection::Invalid { .. } => {
            Ok(Disk::open_on(dev, cluster, host)?)
        }
    }
}

/// This host's current boot, from the kernel's `boot_id` (a UUID that changes on every
/// boot). `None` when the kernel does not provide it.
pub fn host_boot_id() -> Option<u128> {
    let text = std::fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    parse_boot_id(&text)
}

/// Parses a `boot_id` UUID (`8-4-4-4-12` hex digits); `None` if malformed or all zero.
pub fn parse_boot_id(text: &str) -> Option<u128> {
    let hex: String = text.trim().chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok().filter(|v| *v != 0)
}
