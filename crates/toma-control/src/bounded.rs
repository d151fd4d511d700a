//! [`Bounded`]: a `ControlPlane` whose every call gives up after a fixed duration (on this
//! process's monotonic clock) with `CpError::Unavailable`.
//!
//! A remote control plane (the Kubernetes API) that stops answering — its process paused,
//! a link dropping packets — must not hold the agent's reconcile loop, a client's
//! reconnection or the leader's pass hostage: the agent keeps serving I/O on the topologies
//! it has and tries again on its next tick; the leader's next pass starts over.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use crate::api::{ControlPlane, CpError, CpResult};
use crate::records::{
    Attachment, DiskRecord, Epoch, MemberStatus, NodeRecord, Unreachable, Version, Versioned,
    VolumeRecord,
};
use async_trait::async_trait;
use tokio::sync::watch;
use toma_core::{DiskId, Topology, VolumeId};

pub struct Bounded {
    inner: Arc<dyn ControlPlane>,
    limit: Duration,
}

impl Bounded {
    pub fn new(inner: Arc<dyn ControlPlane>, limit: Duration) -> Arc<Bounded> {
        Arc::new(Bounded { inner, limit })
    }

    async fn within<T>(&self, what: &str, f: impl Future<Output = CpResult<T>>) -> CpResult<T> {
        match tokio::time::timeout(self.limit, f).await {
            Ok(r) => r,
            Err(_) => Err(CpError::Unavailable(format!(
                "{what}: no answer from the control plane within {:?}",
                self.limit
            ))),
        }
    }
}

#[async_trait]
impl ControlPlane for Bounded {
    async fn volumes(&self) -> CpResult<Vec<Versioned<VolumeRecord>>> {
        self.within("volumes", self.inner.volumes()).await
    }
    async fn volume_names(&self) -> CpResult<std::collections::BTreeSet<String>> {
        self.within("volume_names", self.inner.volume_names()).await
    }
    async fn volume(&self, id: VolumeId) -> CpResult<Option<Versioned<VolumeRecord>>> {
        self.within("volume", self.inner.volume(id)).await
    }
    async fn create_volume(&self, rec: VolumeRecord) -> CpResult<Version> {
        self.within("create_volume", self.inner.create_volume(rec))
            .await
    }
    async fn delete_volume(&self, id: VolumeId) -> CpResult<()> {
        self.within("delete_volume", self.inner.delete_volume(id))
            .await
    }
    async fn cas_topology(
        &self,
        id: VolumeId,
        expected: Version,
        epoch: Epoch,
        topology: Topology,
    ) -> CpResult<Version> {
        self.within(
            "cas_topology",
            self.inner.cas_topology(id, expected, epoch, topology),
        )
        .await
    }
    async fn set_growing(&self, id: VolumeId, size: Option<u64>) -> CpResult<()> {
        self.within("set_growing", self.inner.set_growing(id, size))
            .await
    }
    async fn commit_growth(&self, id: VolumeId, size: u64) -> CpResult<()> {
        self.within("commit_growth", self.inner.commit_growth(id, size))
            .await
    }
    async fn acquire_leadership(&self, holder: &str) -> CpResult<Epoch> {
        self.within("acquire_leadership", self.inner.acquire_leadership(holder))
            .await
    }
    async fn nodes(&self) -> CpResult<Vec<NodeRecord>> {
        self.within("nodes", self.inner.nodes()).await
    }
    async fn put_node(&self, rec: NodeRecord) -> CpResult<()> {
        self.within("put_node", self.inner.put_node(rec)).await
    }
    async fn disks(&self) -> CpResult<Vec<DiskRecord>> {
        self.within("disks", self.inner.disks()).await
    }
    async fn put_disk(&self, rec: DiskRecord) -> CpResult<()> {
        self.within("put_disk", self.inner.put_disk(rec)).await
    }
    async fn remove_disk(&self, disk: DiskId) -> CpResult<()> {
        self.within("remove_disk", self.inner.remove_disk(disk))
            .await
    }
    async fn member_statuses(&self, volume: VolumeId) -> CpResult<Vec<MemberStatus>> {
        self.within("member_statuses", self.inner.member_statuses(volume))
            .await
    }
    async fn put_member_status(&self, status: MemberStatus) -> CpResult<()> {
        self.within("put_member_status", self.inner.put_member_status(status))
            .await
    }
    async fn report_unreachable(&self, report: Unreachable) -> CpResult<()> {
        self.within("report_unreachable", self.inner.report_unreachable(report))
            .await
    }
    async fn unreachable(&self, volume: VolumeId) -> CpResult<Vec<Unreachable>> {
        self.within("unreachable", self.inner.unreachable(volume))
            .await
    }
    async fn clear_unreachable(&self, volume: VolumeId, disk: DiskId) -> CpResult<()> {
        self.within(
            "clear_unreachable",
            self.inner.clear_unreachable(volume, disk),
        )
        .await
    }
    async fn attach(&self, a: Attachment) -> CpResult<()> {
        self.within("attach", self.inner.attach(a)).await
    }
    async fn detach(&self, volume: VolumeId, client: u128) -> CpResult<()> {
        self.within("detach", self.inner.detach(volume, client))
            .await
    }
    async fn attachments(&self, volume: VolumeId) -> CpResult<Vec<Attachment>> {
        self.within("attachments", self.inner.attachments(volume))
            .await
    }
    fn changes(&self) -> watch::Receiver<u64> {
        self.inner.changes()
    }
}
