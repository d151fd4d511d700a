//! The `ControlPlane` trait: everything agents, clients and the leader exchange goes through
//! it. Production: the Kubernetes API (CRDs). Embedded: an in-process store.

use std::collections::BTreeSet;

use async_trait::async_trait;
use thiserror::Error;
use tokio::sync::watch;
use toma_core::{DiskId, Topology, VolumeId};

use crate::records::{
    Attachment, DiskRecord, Epoch, MemberStatus, NodeRecord, Unreachable, Version, Versioned,
    VolumeRecord,
};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CpError {
    #[error("volume {0} not found")]
    NoVolume(VolumeId),
    #[error("volume {0} already exists")]
    Exists(String),
    #[error("conflict: volume {volume} is at version {actual}, the write expected {expected}")]
    Conflict {
        volume: VolumeId,
        expected: Version,
        actual: Version,
    },
    #[error("deposed: this leader holds epoch {mine}, the current leader epoch is {current}")]
    Deposed { mine: Epoch, current: Epoch },
    #[error("rejected: {0}")]
    Rejected(String),
    #[error("control plane unavailable: {0}")]
    Unavailable(String),
}

impl CpError {
    /// A stable category for metrics and logs.
    pub fn category(&self) -> &'static str {
        match self {
            CpError::NoVolume(_) => "not-found",
            CpError::Exists(_) => "exists",
            CpError::Conflict { .. } => "conflict",
            CpError::Deposed { .. } => "deposed",
            CpError::Rejected(_) => "rejected",
            CpError::Unavailable(_) => "unavailable",
        }
    }
}

pub type CpResult<T> = Result<T, CpError>;

#[async_trait]
pub trait ControlPlane: Send + Sync + 'static {
    // Volumes and topologies.
    async fn volumes(&self) -> CpResult<Vec<Versioned<VolumeRecord>>>;
    /// The names of every volume that exists, whether or not `volumes()` could read it. A
    /// volume that `volumes()` leaves out but that is named here is unreadable for now (its
    /// Secret could not be fetched while the API server restarted, an edit of its topology
    /// was refused, ...), not deleted: nothing of it may be freed.
    async fn volume_names(&self) -> CpResult<BTreeSet<String>> {
        Ok(self
            .volumes()
            .await?
            .into_iter()
            .map(|v| v.value.name)
            .collect())
    }
    async fn volume(&self, id: VolumeId) -> CpResult<Option<Versioned<VolumeRecord>>>;
    async fn create_volume(&self, rec: VolumeRecord) -> CpResult<Version>;
    async fn delete_volume(&self, id: VolumeId) -> CpResult<()>;
    /// Replaces the topology if the volume is still at `expected` and `epoch` is the current
    /// leader epoch. The store also checks that the new topology is adjacent to the old one.
    async fn cas_topology(
        &self,
        id: VolumeId,
        expected: Version,
        epoch: Epoch,
        topology: Topology,
    ) -> CpResult<Version>;

    /// Records that volume `id` grows to `size` bytes (`None` abandons a pending growth).
    /// Refused (`Rejected`, naming both sizes) when `size` is below the visible size or not
    /// a multiple of the lock unit. The visible size does not change.
    async fn set_growing(&self, id: VolumeId, size: Option<u64>) -> CpResult<()>;
    /// Makes the pending growth to `size` visible: `spec.size = size`, nothing pending.
    /// Refused unless `size` is the pending target. Callers check `toma_core::growth_state`
    /// first.
    async fn commit_growth(&self, id: VolumeId, size: u64) -> CpResult<()>;

    // Leadership.
    /// Takes the leadership and returns the new epoch (embedded: always succeeds).
    async fn acquire_leadership(&self, holder: &str) -> CpResult<Epoch>;

    // Nodes and disks, reported by agents.
    async fn nodes(&self) -> CpResult<Vec<NodeRecord>>;
    async fn put_node(&self, rec: NodeRecord) -> CpResult<()>;
    async fn disks(&self) -> CpResult<Vec<DiskRecord>>;
    async fn put_disk(&self, rec: DiskRecord) -> CpResult<()>;
    async fn remove_disk(&self, disk: DiskId) -> CpResult<()>;

    // What each member's TOMA reports.
    async fn member_statuses(&self, volume: VolumeId) -> CpResult<Vec<MemberStatus>>;
    async fn put_member_status(&self, status: MemberStatus) -> CpResult<()>;
    async fn report_unreachable(&self, report: Unreachable) -> CpResult<()>;
    async fn unreachable(&self, volume: VolumeId) -> CpResult<Vec<Unreachable>>;
    async fn clear_unreachable(&self, volume: VolumeId, disk: DiskId) -> CpResult<()>;

    // Clients attached to volumes.
    async fn attach(&self, a: Attachment) -> CpResult<()>;
    async fn detach(&self, volume: VolumeId, client: u128) -> CpResult<()>;
    async fn attachments(&self, volume: VolumeId) -> CpResult<Vec<Attachment>>;

    /// A counter that changes on every write: watchers wake on it and re-read.
    fn changes(&self) -> watch::Receiver<u64>;
}
