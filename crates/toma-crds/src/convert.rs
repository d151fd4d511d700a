//! Conversions between the custom resources and the `toma_core` / `toma_control` types.
//! Every error names the field that is wrong (`spec.members[1].disk: ...`).

use std::collections::BTreeMap;

use thiserror::Error;
use toma_control::{DiskRecord, MemberStatus, NodeRecord, RebuildProgress, Unreachable};
use toma_core::topology::parse_uuid;
use toma_core::{
    DiskId, Layout, LockMode, Member, NodeId, Phase, Role, Topology, VolumeId, VolumeSpec,
};

use crate::disk::{TomaDiskSpec, TomaDiskStatus};
use crate::node::{TomaNodeSpec, TomaNodeStatus};
use crate::topology::{
    GrowRefusal, LockModeKind, MemberReportStatus, PhaseKind, RebuildStatus, RoleKind,
    TomaTopologySpec, TopologyMember, UnreachableReport,
};
use crate::volume::{LayoutKind, TomaVolumeSpec};

/// A resource that does not convert into a valid `toma_core` value.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
#[error("{field}: {problem}")]
pub struct ConvertError {
    /// JSON path of the offending field, e.g. `spec.members[1].disk`.
    pub field: String,
    pub problem: String,
}

impl ConvertError {
    pub fn new(field: impl Into<String>, problem: impl ToString) -> Self {
        ConvertError {
            field: field.into(),
            problem: problem.to_string(),
        }
    }

    /// A stable category for metrics and Event reasons.
    pub fn category(&self) -> &'static str {
        "invalid-spec"
    }
}

pub fn parse_disk(field: &str, s: &str) -> Result<DiskId, ConvertError> {
    parse_uuid(s)
        .map(DiskId)
        .ok_or_else(|| ConvertError::new(field, format!("{s:?} is not a UUID (8-4-4-4-12 hex)")))
}

pub fn parse_volume_id(field: &str, s: &str) -> Result<VolumeId, ConvertError> {
    parse_uuid(s)
        .map(VolumeId)
        .ok_or_else(|| ConvertError::new(field, format!("{s:?} is not a UUID (8-4-4-4-12 hex)")))
}

fn layout_of(
    kind: LayoutKind,
    mirrors: Option<u8>,
    data_members: Option<u8>,
) -> Result<Layout, ConvertError> {
    match (kind, mirrors, data_members) {
        (LayoutKind::Raid1, Some(m), None) => {
            Layout::raid1(m).map_err(|e| ConvertError::new("spec.mirrors", e))
        }
        (LayoutKind::Raid6, None, Some(k)) => {
            Layout::raid6(k).map_err(|e| ConvertError::new("spec.dataMembers", e))
        }
        (LayoutKind::Raid1, _, _) => Err(ConvertError::new(
            "spec.mirrors",
            "layout raid1 needs mirrors (2 or 3) and no dataMembers",
        )),
        (LayoutKind::Raid6, _, _) => Err(ConvertError::new(
            "spec.dataMembers",
            "layout raid6 needs dataMembers (2..8) and no mirrors",
        )),
    }
}

fn layout_fields(l: Layout) -> (LayoutKind, Option<u8>, Option<u8>) {
    match l {
        Layout::Raid1 { mirrors } => (LayoutKind::Raid1, Some(mirrors), None),
        Layout::Raid6 { data } => (LayoutKind::Raid6, None, Some(data)),
    }
}

impl TomaVolumeSpec {
    pub fn id(&self) -> Result<VolumeId, ConvertError> {
        parse_volume_id("spec.volumeId", &self.volume_id)
    }

    pub fn layout(&self) -> Result<Layout, ConvertError> {
        layout_of(self.layout, self.mirrors, self.data_members)
    }

    /// The core volume spec (layout, chunk size, size), checked.
    pub fn to_volume_spec(&self) -> Result<VolumeSpec, ConvertError> {
        let layout = self.layout()?;
        VolumeSpec::new(layout, self.chunk_size, self.size).map_err(|e| {
            let field = match e {
                toma_core::LayoutError::ChunkSize { .. } => "spec.chunkSize",
                toma_core::LayoutError::Size { .. } | toma_core::LayoutError::Shrink { .. } => {
                    "spec.size"
                }
                toma_core::LayoutError::Mirrors { .. } => "spec.mirrors",
                toma_core::LayoutError::Raid6Data { .. } => "spec.dataMembers",
            };
            ConvertError::new(field, e)
        })
    }

    /// The spec for a core volume spec and id.
    pub fn from_core(id: VolumeId, spec: &VolumeSpec, secret_ref: crate::SecretRef) -> Self {
        let (layout, mirrors, data_members) = layout_fields(spec.layout);
        TomaVolumeSpec {
            volume_id: id.to_string(),
            layout,
            mirrors,
            data_members,
            chunk_size: u64::from(spec.chunk_size),
            size: spec.size,
            growing_to: None,
            secret_ref,
        }
    }
}

impl From<Role> for RoleKind {
    fn from(r: Role) -> Self {
        match r {
            Role::Rwl => RoleKind::Rwl,
            Role::W => RoleKind::W,
            Role::Wl => RoleKind::Wl,
            Role::Dead => RoleKind::Dead,
        }
    }
}

impl From<RoleKind> for Role {
    fn from(r: RoleKind) -> Self {
        match r {
            RoleKind::Rwl => Role::Rwl,
            RoleKind::W => Role::W,
            RoleKind::Wl => Role::Wl,
            RoleKind::Dead => Role::Dead,
        }
    }
}

impl From<LockMode> for LockModeKind {
    fn from(m: LockMode) -> Self {
        match m {
            LockMode::Interleaved => LockModeKind::Interleaved,
            LockMode::DualLock => LockModeKind::DualLock,
        }
    }
}

impl From<LockModeKind> for LockMode {
    fn from(m: LockModeKind) -> Self {
        match m {
            LockModeKind::Interleaved => LockMode::Interleaved,
            LockModeKind::DualLock => LockMode::DualLock,
        }
    }
}

impl From<Phase> for PhaseKind {
    fn from(p: Phase) -> Self {
        match p {
            Phase::Normal => PhaseKind::Normal,
            Phase::Degraded => PhaseKind::Degraded,
            Phase::RebuildInit => PhaseKind::RebuildInit,
            Phase::Rebuilding => PhaseKind::Rebuilding,
            Phase::DualLock => PhaseKind::DualLock,
            Phase::Resync => PhaseKind::Resync,
            Phase::Failed => PhaseKind::Failed,
        }
    }
}

impl TomaTopologySpec {
    /// The spec the leader writes for `t` (with the derived `phase` and `summary`).
    pub fn from_topology(volume_name: &str, t: &Topology, leader_epoch: u64) -> Self {
        let (layout, mirrors, data_members) = layout_fields(t.layout);
        TomaTopologySpec {
            volume: volume_name.to_string(),
            volume_id: t.volume.to_string(),
            generation: t.generation,
            layout,
            mirrors,
            data_members,
            chunk_size: u64::from(t.chunk_size),
            members: t
                .members
                .iter()
                .map(|m| TopologyMember {
                    disk: m.disk.to_string(),
                    node: m.node.0.clone(),
                    role: m.role.into(),
                    full_rebuild: m.full_rebuild,
                    last_good: m.last_good,
                })
                .collect(),
            lock_mode: t.lock_mode.into(),
            rebuild: t.rebuild,
            leader_epoch,
            phase: Some(t.phase().into()),
            summary: Some(t.members_summary()),
        }
    }

    /// The core topology, checked with `Topology::validate`. `phase` and `summary` are
    /// derived and ignored here.
    pub fn to_topology(&self) -> Result<Topology, ConvertError> {
        let volume = parse_volume_id("spec.volumeId", &self.volume_id)?;
        let layout = layout_of(self.layout, self.mirrors, self.data_members)?;
        let chunk_size = toma_core::layout::validate_chunk_size(self.chunk_size)
            .map_err(|e| ConvertError::new("spec.chunkSize", e))?;
        let members = self
            .members
            .iter()
            .enumerate()
            .map(|(i, m)| {
                let disk = parse_disk(&format!("spec.members[{i}].disk"), &m.disk)?;
                if m.node.is_empty() {
                    return Err(ConvertError::new(
                        format!("spec.members[{i}].node"),
                        "must not be empty",
                    ));
                }
                Ok(Member {
                    disk,
                    node: NodeId(m.node.clone()),
                    role: m.role.into(),
                    full_rebuild: m.full_rebuild,
                    last_good: m.last_good,
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        if self.generation == 0 {
            return Err(ConvertError::new("spec.generation", "must be at least 1"));
        }
        let t = Topology {
            volume,
            generation: self.generation,
            layout,
            chunk_size,
            members,
            lock_mode: self.lock_mode.into(),
            rebuild: self.rebuild,
        };
        // TopologyError messages already name the field below `spec` (`members[1] ...`).
        t.validate()
            .map_err(|e| ConvertError::new("spec", e.to_string()))?;
        Ok(t)
    }
}

impl TomaNodeSpec {
    pub fn to_record(
        name: &str,
        spec: &TomaNodeSpec,
        status: Option<&TomaNodeStatus>,
    ) -> NodeRecord {
        let st = status.cloned().unwrap_or_default();
        NodeRecord {
            node: NodeId(name.to_string()),
            endpoint: spec.endpoint.clone(),
            heartbeat: st.heartbeat,
            boot: st.boot,
        }
    }

    pub fn from_record(rec: &NodeRecord) -> (TomaNodeSpec, TomaNodeStatus) {
        (
            TomaNodeSpec {
                endpoint: rec.endpoint.clone(),
            },
            TomaNodeStatus {
                heartbeat: rec.heartbeat,
                boot: rec.boot,
            },
        )
    }
}

impl TomaDiskSpec {
    /// `name` is the TomaDisk's name: the disk UUID.
    pub fn to_record(
        name: &str,
        spec: &TomaDiskSpec,
        status: Option<&TomaDiskStatus>,
    ) -> Result<DiskRecord, ConvertError> {
        let disk = parse_disk("metadata.name", name)?;
        let st = status.cloned().unwrap_or_default();
        Ok(DiskRecord {
            disk,
            node: NodeId(spec.node.clone()),
            capacity: spec.capacity,
            free: st.free,
            healthy: st.healthy,
        })
    }

    pub fn from_record(rec: &DiskRecord) -> (String, TomaDiskSpec, TomaDiskStatus) {
        (
            rec.disk.to_string(),
            TomaDiskSpec {
                node: rec.node.0.clone(),
                capacity: rec.capacity,
            },
            TomaDiskStatus {
                free: rec.free,
                healthy: rec.healthy,
            },
        )
    }
}

impl From<RebuildProgress> for RebuildStatus {
    fn from(r: RebuildProgress) -> Self {
        RebuildStatus {
            generation: r.generation,
            done_units: r.done_units,
            total_units: r.total_units,
            bytes_copied: r.bytes_copied,
            bytes_per_sec: r.bytes_per_sec,
            finished: r.finished,
        }
    }
}

impl From<&RebuildStatus> for RebuildProgress {
    fn from(r: &RebuildStatus) -> Self {
        RebuildProgress {
            generation: r.generation,
            done_units: r.done_units,
            total_units: r.total_units,
            bytes_copied: r.bytes_copied,
            bytes_per_sec: r.bytes_per_sec,
            finished: r.finished,
        }
    }
}

impl MemberReportStatus {
    pub fn from_core(s: &MemberStatus) -> (String, MemberReportStatus) {
        (
            s.disk.to_string(),
            MemberReportStatus {
                node: s.node.0.clone(),
                synced: s.synced,
                boot: s.boot,
                dirty_bits_lost: s.dirty_bits_lost,
                stale: s.stale,
                rebuild: s.rebuild.map(Into::into),
                extent_bytes: s.extent_bytes,
                grow_refused: s.grow_refused.as_ref().map(|(w, r)| GrowRefusal {
                    want_bytes: *w,
                    reason: r.clone(),
                }),
            },
        )
    }
}

/// The member reports of a topology's status, as core values (`status.members` keyed by
/// disk UUID).
pub fn member_statuses(
    volume: VolumeId,
    members: &BTreeMap<String, MemberReportStatus>,
) -> Result<Vec<MemberStatus>, ConvertError> {
    members
        .iter()
        .map(|(disk, s)| {
            Ok(MemberStatus {
                volume,
                disk: parse_disk(&format!("status.members[{disk:?}]"), disk)?,
                node: NodeId(s.node.clone()),
                synced: s.synced,
                boot: s.boot,
                dirty_bits_lost: s.dirty_bits_lost,
                stale: s.stale,
                rebuild: s.rebuild.as_ref().map(Into::into),
                extent_bytes: s.extent_bytes,
                grow_refused: s
                    .grow_refused
                    .as_ref()
                    .map(|g| (g.want_bytes, g.reason.clone())),
            })
        })
        .collect()
}

/// The unreachability reports of a topology's status (`status.unreachable`).
pub fn unreachable_reports(
    volume: VolumeId,
    reports: &BTreeMap<String, UnreachableReport>,
) -> Result<Vec<Unreachable>, ConvertError> {
    reports
        .iter()
        .map(|(disk, r)| {
            Ok(Unreachable {
                volume,
                disk: parse_disk(&format!("status.unreachable[{disk:?}]"), disk)?,
                generation: r.generation,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::SecretRef;

    fn raid1_topology() -> Topology {
        Topology::new_normal(
            VolumeId(0xabc),
            Layout::raid1(2).expect("layout"),
            65536,
            vec![
                (DiskId(0x1111 << 96), NodeId::from("n0")),
                (DiskId(0x2222 << 96), NodeId::from("n1")),
            ],
        )
        .expect("topology")
    }

    #[test]
    fn topology_round_trips_with_derived_columns() {
        let mut t = raid1_topology();
        t.generation = 4;
        t.members[1].role = Role::W;
        t.members[1].full_rebuild = true;
        t.rebuild = true;
        let spec = TomaTopologySpec::from_topology("vol-a", &t, 7);
        assert_eq!(spec.phase, Some(PhaseKind::Rebuilding));
        assert_eq!(
            spec.summary.as_deref(),
            Some("n0/00001111:RWL,n1/00002222:W")
        );
        assert_eq!(spec.leader_epoch, 7);
        assert_eq!(spec.to_topology(), Ok(t));
        let json = serde_json::to_value(&spec).expect("json");
        assert_eq!(json["members"][1]["role"], "W");
        assert_eq!(json["members"][1]["fullRebuild"], true);
        assert_eq!(json["lockMode"], "Interleaved");
        assert_eq!(json["mirrors"], 2);
        assert!(json.get("dataMembers").is_none());
    }

    #[test]
    fn bad_member_disk_names_the_field() {
        let mut spec = TomaTopologySpec::from_topology("v", &raid1_topology(), 1);
        spec.members[1].disk = "not-a-uuid".into();
        let e = spec.to_topology().unwrap_err();
        assert_eq!(e.field, "spec.members[1].disk");
        assert!(e.to_string().starts_with("spec.members[1].disk: "), "{e}");
    }

    #[test]
    fn duplicate_disks_and_count_mismatch_are_refused() {
        let mut spec = TomaTopologySpec::from_topology("v", &raid1_topology(), 1);
        spec.members[1].disk = spec.members[0].disk.clone();
        let e = spec.to_topology().unwrap_err();
        assert!(e.to_string().contains("members[0] and members[1]"), "{e}");

        let mut spec = TomaTopologySpec::from_topology("v", &raid1_topology(), 1);
        spec.mirrors = Some(3);
        let e = spec.to_topology().unwrap_err();
        assert!(e.to_string().contains("needs 3 members, got 2"), "{e}");
    }

    #[test]
    fn layout_fields_are_checked_and_named() {
        let mut spec = TomaTopologySpec::from_topology("v", &raid1_topology(), 1);
        spec.layout = LayoutKind::Raid6;
        spec.mirrors = None;
        spec.data_members = Some(1);
        let e = spec.to_topology().unwrap_err();
        assert_eq!(e.field, "spec.dataMembers");
        assert!(e.to_string().contains("dataMembers = 1"), "{e}");

        spec.data_members = None;
        spec.mirrors = Some(2);
        assert_eq!(spec.to_topology().unwrap_err().field, "spec.dataMembers");

        let mut spec = TomaTopologySpec::from_topology("v", &raid1_topology(), 1);
        spec.chunk_size = 3000;
        let e = spec.to_topology().unwrap_err();
        assert_eq!(e.field, "spec.chunkSize");
        assert!(e.to_string().contains("chunkSize = 3000"), "{e}");
    }

    #[test]
    fn volume_spec_converts_and_names_fields() {
        let secret_ref = SecretRef {
            namespace: "toma".into(),
            name: "vol-a".into(),
        };
        let core =
            VolumeSpec::new(Layout::raid6(4).expect("layout"), 65536, 4 * 65536 * 8).expect("spec");
        let spec = TomaVolumeSpec::from_core(VolumeId(5), &core, secret_ref);
        assert_eq!(spec.to_volume_spec(), Ok(core));
        assert_eq!(spec.id(), Ok(VolumeId(5)));

        let mut bad = spec.clone();
        bad.size = 65536;
        assert_eq!(bad.to_volume_spec().unwrap_err().field, "spec.size");
        let mut bad = spec.clone();
        bad.chunk_size = 3000;
        assert_eq!(bad.to_volume_spec().unwrap_err().field, "spec.chunkSize");
        let mut bad = spec.clone();
        bad.data_members = Some(9);
        assert_eq!(bad.to_volume_spec().unwrap_err().field, "spec.dataMembers");
        let mut bad = spec;
        bad.volume_id = "x".into();
        assert_eq!(bad.id().unwrap_err().field, "spec.volumeId");
    }

    #[test]
    fn statuses_round_trip() {
        let s = MemberStatus {
            volume: VolumeId(1),
            disk: DiskId(0x3333 << 96),
            node: NodeId::from("n2"),
            synced: 9,
            boot: 2,
            dirty_bits_lost: true,
            stale: true,
            rebuild: Some(RebuildProgress {
                generation: 9,
                done_units: 5,
                total_units: 10,
                bytes_copied: 100,
                bytes_per_sec: 10,
                finished: false,
            }),
            extent_bytes: 1 << 20,
            grow_refused: Some((2 << 20, "extent 3 follows it".into())),
        };
        let (k, v) = MemberReportStatus::from_core(&s);
        let map = BTreeMap::from([(k, v)]);
        assert_eq!(member_statuses(VolumeId(1), &map), Ok(vec![s]));
        let bad = BTreeMap::from([("zz".to_string(), UnreachableReport { generation: 1 })]);
        let e = unreachable_reports(VolumeId(1), &bad).unwrap_err();
        assert!(e.field.starts_with("status.unreachable"), "{e}");
    }

    #[test]
    fn node_and_disk_records_round_trip() {
        let n = NodeRecord {
            node: NodeId::from("n0"),
            endpoint: "127.0.0.2:7100".into(),
            heartbeat: 3,
            boot: 1,
        };
        let (spec, st) = TomaNodeSpec::from_record(&n);
        assert_eq!(TomaNodeSpec::to_record("n0", &spec, Some(&st)), n);
        let d = DiskRecord {
            disk: DiskId(0x4444 << 96),
            node: NodeId::from("n0"),
            capacity: 1 << 30,
            free: 1 << 29,
            healthy: true,
        };
        let (name, spec, st) = TomaDiskSpec::from_record(&d);
        assert_eq!(TomaDiskSpec::to_record(&name, &spec, Some(&st)), Ok(d));
        assert_eq!(
            TomaDiskSpec::to_record("nope", &spec, None)
                .unwrap_err()
                .field,
            "metadata.name"
        );
    }
}
