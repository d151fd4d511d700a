//! The in-process control plane used by `toma demo`, tests and the simulation.

use std::collections::{BTreeMap, BTreeSet};

use async_trait::async_trait;
use parking_lot::Mutex;
use tokio::sync::watch;
use toma_core::{check_adjacent, DiskId, NodeId, Topology, VolumeId};

use crate::api::{ControlPlane, CpError, CpResult};
use crate::records::{
    Attachment, DiskRecord, Epoch, MemberStatus, NodeRecord, Unreachable, Version, Versioned,
    VolumeRecord,
};

#[derive(Default)]
struct State {
    version: Version,
    epoch: Epoch,
    volumes: BTreeMap<VolumeId, Versioned<VolumeRecord>>,
    nodes: BTreeMap<NodeId, NodeRecord>,
    disks: BTreeMap<DiskId, DiskRecord>,
    /// Keyed by the reporting node too: an agent that still believes it hosts a disk that
    /// was moved to another node must not overwrite (and wake everyone with) the new
    /// host's report, over and over (the simulation's livelock, seeds 101 and 103).
    statuses: BTreeMap<(VolumeId, DiskId, NodeId), MemberStatus>,
    unreachable: BTreeMap<(VolumeId, DiskId), Unreachable>,
    attachments: BTreeMap<(VolumeId, u128), Attachment>,
    /// Volumes `volumes()` leaves out (`set_unreadable`), and how many listings did.
    unreadable: BTreeSet<String>,
    left_out: u64,
}

/// An in-memory store with the same compare-and-swap and epoch rules as the Kubernetes one.
pub struct EmbeddedControlPlane {
    state: Mutex<State>,
    tx: watch::Sender<u64>,
    check_adjacent: bool,
}

impl Default for EmbeddedControlPlane {
    fn default() -> Self {
        Self::new()
    }
}

impl EmbeddedControlPlane {
    pub fn new() -> Self {
        let (tx, _) = watch::channel(0);
        EmbeddedControlPlane {
            state: Mutex::new(State::default()),
            tx,
            check_adjacent: true,
        }
    }

    /// A store that does not refuse non-adjacent topology writes. The check is defence in
    /// depth; the simulation turns it off for a mutated leader, to show that the datapath
    /// checkers catch what the store would have refused.
    pub fn without_adjacency_check() -> Self {
        EmbeddedControlPlane {
            check_adjacent: false,
            ..Self::new()
        }
    }

    /// Makes `volumes()` leave the volume `name` out (or stops it), as the Kubernetes store
    /// does while it cannot read the volume's Secret; `volume_names()` still names it. For
    /// tests of what agents do with a volume that exists but cannot be read.
    pub fn set_unreadable(&self, name: &str, unreadable: bool) {
        let mut st = self.state.lock();
        if unreadable {
            st.unreadable.insert(name.to_string());
        } else {
            st.unreadable.remove(name);
        }
    }

    /// How many `volumes()` listings have left an unreadable volume out.
    pub fn listings_left_out(&self) -> u64 {
        self.state.lock().left_out
    }

    fn bump(&self, st: &mut State) -> Version {
        st.version += 1;
        let v = st.version;
        self.tx.send_replace(v);
        v
    }
}

#[async_trait]
impl ControlPlane for EmbeddedControlPlane {
    async fn volumes(&self) -> CpResult<Vec<Versioned<VolumeRecord>>> {
        let mut st = self.state.lock();
        let all: Vec<_> = st.volumes.values().cloned().collect();
        let n = all.len();
        let out: Vec<_> = all
            .into_iter()
            .filter(|v| !st.unreadable.contains(&v.value.name))
            .collect();
        if out.len() < n {
            st.left_out += 1;
        }
        Ok(out)
    }

    async fn volume_names(&self) -> CpResult<BTreeSet<String>> {
        Ok(self
            .state
            .lock()
            .volumes
            .values()
            .map(|v| v.value.name.clone())
            .collect())
    }

    async fn volume(&self, id: VolumeId) -> CpResult<Option<Versioned<VolumeRecord>>> {
        Ok(self.state.lock().volumes.get(&id).cloned())
    }

    async fn create_volume(&self, rec: VolumeRecord) -> CpResult<Version> {
        rec.topology
            .validate()
            .map_err(|e| CpError::Rejected(format!("volume {}: {e}", rec.name)))?;
        let mut st = self.state.lock();
        if st.volumes.contains_key(&rec.id) || st.volumes.values().any(|v| v.value.name == rec.name)
        {
            return Err(CpError::Exists(rec.name));
        }
        let version = self.bump(&mut st);
        st.volumes.insert(
            rec.id,
            Versioned {
                value: rec,
                version,
            },
        );
        Ok(version)
    }

    async fn delete_volume(&self, id: VolumeId) -> CpResult<()> {
        let mut st = self.state.lock();
        if st.volumes.remove(&id).is_none() {
            return Err(CpError::NoVolume(id));
        }
        st.statuses.retain(|(v, _, _), _| *v != id);
        st.unreachable.retain(|(v, _), _| *v != id);
        st.attachments.retain(|(v, _), _| *v != id);
        self.bump(&mut st);
        Ok(())
    }

    async fn set_growing(&self, id: VolumeId, size: Option<u64>) -> CpResult<()> {
        let mut st = self.state.lock();
        let Some(cur) = st.volumes.get_mut(&id) else {
            return Err(CpError::NoVolume(id));
        };
        if let Some(s) = size {
            cur.value
                .spec
                .grown(s)
                .map_err(|e| CpError::Rejected(format!("volume {id}: {e}")))?;
        }
        if cur.value.growing_to == size {
            return Ok(());
        }
        cur.value.growing_to = size;
        let v = self.bump(&mut st);
        if let Some(cur) = st.volumes.get_mut(&id) {
            cur.version = v;
        }
        Ok(())
    }

    async fn commit_growth(&self, id: VolumeId, size: u64) -> CpResult<()> {
        let mut st = self.state.lock();
        let Some(cur) = st.volumes.get_mut(&id) else {
            return Err(CpError::NoVolume(id));
        };
        if cur.value.spec.size == size && cur.value.growing_to.is_none() {
            return Ok(());
        }
        if cur.value.growing_to != Some(size) {
            return Err(CpError::Rejected(format!(
                "volume {id}: no growth to {size} bytes is pending (pending: {:?})",
                cur.value.growing_to
            )));
        }
        cur.value.spec = cur
            .value
            .spec
            .grown(size)
            .map_err(|e| CpError::Rejected(format!("volume {id}: {e}")))?;
        cur.value.growing_to = None;
        let v = self.bump(&mut st);
        if let Some(cur) = st.volumes.get_mut(&id) {
            cur.version = v;
        }
        Ok(())
    }

    async fn cas_topology(
        &self,
        id: VolumeId,
        expected: Version,
        epoch: Epoch,
        topology: Topology,
    ) -> CpResult<Version> {
        let mut st = self.state.lock();
        if epoch != st.epoch {
            return Err(CpError::Deposed {
                mine: epoch,
                current: st.epoch,
            });
        }
        let Some(cur) = st.volumes.get(&id) else {
            return Err(CpError::NoVolume(id));
        };
        if cur.version != expected {
            return Err(CpError::Conflict {
                volume: id,
                expected,
                actual: cur.version,
            });
        }
        if self.check_adjacent {
            check_adjacent(&cur.value.topology, &topology)
                .map_err(|v| CpError::Rejected(format!("volume {id}: {v}")))?;
        } else {
            topology
                .validate()
                .map_err(|e| CpError::Rejected(format!("volume {id}: {e}")))?;
        }
        let version = self.bump(&mut st);
        if let Some(cur) = st.volumes.get_mut(&id) {
            cur.value.topology = topology;
            cur.version = version;
        }
        Ok(version)
    }

    async fn acquire_leadership(&self, _holder: &str) -> CpResult<Epoch> {
        let mut st = self.state.lock();
        st.epoch += 1;
        let e = st.epoch;
        self.bump(&mut st);
        Ok(e)
    }

    async fn nodes(&self) -> CpResult<Vec<NodeRecord>> {
        Ok(self.state.lock().nodes.values().cloned().collect())
    }

    async fn put_node(&self, rec: NodeRecord) -> CpResult<()> {
        let mut st = self.state.lock();
        st.nodes.insert(rec.node.clone(), rec);
        self.bump(&mut st);
        Ok(())
    }

    async fn disks(&self) -> CpResult<Vec<DiskRecord>> {
        Ok(self.state.lock().disks.values().cloned().collect())
    }

    async fn put_disk(&self, rec: DiskRecord) -> CpResult<()> {
        let mut st = self.state.lock();
        if st.disks.get(&rec.disk) != Some(&rec) {
            st.disks.insert(rec.disk, rec);
            self.bump(&mut st);
        }
        Ok(())
    }

    async fn remove_disk(&self, disk: DiskId) -> CpResult<()> {
        let mut st = self.state.lock();
        if st.disks.remove(&disk).is_some() {
            self.bump(&mut st);
        }
        Ok(())
    }

    async fn member_statuses(&self, volume: VolumeId) -> CpResult<Vec<MemberStatus>> {
        Ok(self
            .state
            .lock()
            .statuses
            .range((volume, DiskId(0), NodeId(String::new()))..)
            .take_while(|((v, _, _), _)| *v == volume)
            .map(|(_, s)| s.clone())
            .collect())
    }

    async fn put_member_status(&self, status: MemberStatus) -> CpResult<()> {
        let mut st = self.state.lock();
        let key = (status.volume, status.disk, status.node.clone());
        if st.statuses.get(&key) != Some(&status) {
            st.statuses.insert(key, status);
            self.bump(&mut st);
        }
        Ok(())
    }

    async fn report_unreachable(&self, report: Unreachable) -> CpResult<()> {
        let mut st = self.state.lock();
        let key = (report.volume, report.disk);
        let newer = st
            .unreachable
            .get(&key)
            .is_none_or(|r| r.generation < report.generation);
        if newer {
            st.unreachable.insert(key, report);
            self.bump(&mut st);
        }
        Ok(())
    }

    async fn unreachable(&self, volume: VolumeId) -> CpResult<Vec<Unreachable>> {
        Ok(self
            .state
            .lock()
            .unreachable
            .values()
            .filter(|u| u.volume == volume)
            .cloned()
            .collect())
    }

    async fn clear_unreachable(&self, volume: VolumeId, disk: DiskId) -> CpResult<()> {
        let mut st = self.state.lock();
        if st.unreachable.remove(&(volume, disk)).is_some() {
            self.bump(&mut st);
        }
        Ok(())
    }

    async fn attach(&self, a: Attachment) -> CpResult<()> {
        let mut st = self.state.lock();
        if !st.volumes.contains_key(&a.volume) {
            return Err(CpError::NoVolume(a.volume));
        }
        st.attachments.insert((a.volume, a.client), a);
        self.bump(&mut st);
        Ok(())
    }

    async fn detach(&self, volume: VolumeId, client: u128) -> CpResult<()> {
        let mut st = self.state.lock();
        if st.attachments.remove(&(volume, client)).is_some() {
            self.bump(&mut st);
        }
        Ok(())
    }

    async fn attachments(&self, volume: VolumeId) -> CpResult<Vec<Attachment>> {
        Ok(self
            .state
            .lock()
            .attachments
            .range((volume, 0)..=(volume, u128::MAX))
            .map(|(_, a)| a.clone())
            .collect())
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}
