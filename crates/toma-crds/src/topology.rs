//! `TomaTopology` (`tt`): one volume's current topology, written only by the leader, and
//! what each member's TOMA reports about it, written by the agents into `status`.
//!
//! The spec is replaced as a whole by the leader with a compare-and-swap on
//! `metadata.resourceVersion`, and carries the leader's epoch (`spec.leaderEpoch`, the
//! Lease's `leaseTransitions` when that leader took over). `phase` and `summary` are derived
//! from the topology by the writer so that `kubectl get tt` can show them; readers ignore
//! them. Status is a subresource, so a leader's spec write never touches what agents report,
//! and agents' reports are maps keyed by disk UUID so concurrent merge patches never clobber
//! each other.
// kube's `printcolumn(name = .., type_ = ..)` lists trip clippy's duplicated_attributes.
#![allow(clippy::duplicated_attributes)]

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::volume::LayoutKind;

/// What clients may do with a member (DESIGN.md §3).
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum RoleKind {
    /// Read, written, locked.
    #[serde(rename = "RWL")]
    Rwl,
    /// Written only (being rebuilt).
    W,
    /// Written and locked, not read (dual lock).
    #[serde(rename = "WL")]
    Wl,
    /// Nothing is sent to it.
    #[serde(rename = "DEAD")]
    Dead,
}

/// Where writers lock.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum LockModeKind {
    Interleaved,
    DualLock,
}

/// The volume's phase, derived from the roles.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
pub enum PhaseKind {
    Normal,
    Degraded,
    RebuildInit,
    Rebuilding,
    DualLock,
    // RAID6 after a restart from Failed: P and Q of every stripe are re-encoded.
    Resync,
    Failed,
}

/// One member: an extent on a disk.
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TopologyMember {
    /// Disk UUID (`8-4-4-4-12` lowercase hex); the TomaDisk of that name.
    #[schemars(regex(
        pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    ))]
    #[schemars(length(max = 36))]
    pub disk: String,
    /// The node (TomaNode name) holding the disk.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    pub role: RoleKind,
    /// When this member (re)enters as W every chunk is dirty.
    #[serde(default)]
    pub full_rebuild: bool,
    /// A DEAD member that held every acknowledged write when it went down.
    #[serde(default)]
    pub last_good: bool,
}

/// A volume's topology. Named after the volume (the TomaVolume of the same name).
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[kube(
    group = "toma.io",
    version = "v1alpha1",
    kind = "TomaTopology",
    shortname = "tt",
    status = "TomaTopologyStatus",
    doc = "A volume's topology, written only by the Toma leader (compare-and-swap on resourceVersion, fenced by the leader epoch); status holds what each member's TOMA reports",
    printcolumn(name = "Volume", type_ = "string", json_path = ".spec.volume"),
    printcolumn(name = "Generation", type_ = "integer", json_path = ".spec.generation"),
    printcolumn(name = "Phase", type_ = "string", json_path = ".spec.phase"),
    printcolumn(name = "Members", type_ = "string", json_path = ".spec.summary"),
    printcolumn(
        name = "Rebuild%",
        type_ = "integer",
        json_path = ".status.rebuildPercent"
    ),
    printcolumn(
        name = "Epoch",
        type_ = "integer",
        json_path = ".spec.leaderEpoch",
        priority = 1
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.layout == 'raid1' ? (has(self.mirrors) && !has(self.dataMembers)) : (has(self.dataMembers) && !has(self.mirrors))")
    .message("layout raid1 needs spec.mirrors (and no spec.dataMembers); layout raid6 needs spec.dataMembers (and no spec.mirrors)"))]
#[x_kube(validation = Rule::new("self.layout == 'raid1' ? (has(self.mirrors) && size(self.members) == self.mirrors) : (has(self.dataMembers) && size(self.members) == self.dataMembers + 2)")
    .message("members: the count must equal spec.mirrors (raid1) or spec.dataMembers + 2 (raid6)")
    .field_path(".members"))]
#[x_kube(validation = Rule::new("self.members.all(m, self.members.exists_one(o, o.disk == m.disk))")
    .message("members: duplicate member disks (each member must be a different disk)")
    .field_path(".members"))]
#[x_kube(validation = Rule::new("self.members.all(m, m.role == 'DEAD' || self.members.exists_one(o, o.role != 'DEAD' && o.node == m.node))")
    .message("members: two live members on one node (no two members of a volume that are not DEAD may share a node)")
    .field_path(".members"))]
#[x_kube(validation = Rule::new("self.lockMode == 'DualLock' ? self.members.exists(m, m.role == 'WL') : !self.members.exists(m, m.role == 'WL')")
    .message("lockMode: DualLock exactly when a member is WL")
    .field_path(".lockMode"))]
#[x_kube(validation = Rule::new("!self.rebuild || self.members.exists(m, m.role == 'W') || (self.layout == 'raid6' && self.members.all(m, m.role == 'RWL'))")
    .message("rebuild: true needs a W member (or, for a raid6 parity resync, every member RWL)")
    .field_path(".rebuild"))]
#[x_kube(validation = Rule::new("self.volume == oldSelf.volume && self.volumeId == oldSelf.volumeId && self.layout == oldSelf.layout && self.chunkSize == oldSelf.chunkSize")
    .message("volume, volumeId, layout and chunkSize are immutable"))]
#[x_kube(validation = Rule::new("self.generation >= oldSelf.generation")
    .message("generation never goes back")
    .field_path(".generation"))]
#[x_kube(validation = Rule::new("self.leaderEpoch >= oldSelf.leaderEpoch")
    .message("leaderEpoch never goes back (a deposed leader cannot overwrite its successor)")
    .field_path(".leaderEpoch"))]
#[serde(rename_all = "camelCase")]
pub struct TomaTopologySpec {
    /// The TomaVolume this topology belongs to.
    #[schemars(length(min = 1, max = 253))]
    pub volume: String,
    /// The volume UUID.
    #[schemars(regex(
        pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    ))]
    pub volume_id: String,
    /// Topology generation, bumped by one on every change.
    #[schemars(range(min = 1))]
    pub generation: u64,
    pub layout: LayoutKind,
    /// RAID1: 2 or 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 3))]
    pub mirrors: Option<u8>,
    /// RAID6: 2..8 data members (plus P and Q).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 8))]
    pub data_members: Option<u8>,
    /// Power of two, 4096..16777216.
    #[schemars(range(min = 4096, max = 16777216))]
    #[x_kube(validation = Rule::new("[4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216].exists(x, x == self)")
        .message("chunkSize must be a power of two between 4096 and 16777216"))]
    pub chunk_size: u64,
    /// Ordered: the member index decides lock placement.
    #[schemars(length(min = 2, max = 10))]
    pub members: Vec<TopologyMember>,
    pub lock_mode: LockModeKind,
    /// A rebuild cycle runs (Rebuilding), or, for raid6 with every member RWL, a parity
    /// resync (Resync).
    #[serde(default)]
    pub rebuild: bool,
    /// The epoch (Lease `leaseTransitions`) of the leader that last wrote this spec.
    #[serde(default)]
    pub leader_epoch: u64,
    /// Derived by the writer, for `kubectl get`: the phase of this topology.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<PhaseKind>,
    /// Derived by the writer, for `kubectl get`: `node/disk:role` per member.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(max = 2048))]
    pub summary: Option<String>,
}

/// Rebuild progress reported by the TOMA that runs it.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RebuildStatus {
    /// The generation (a Rebuilding topology) the cycle ran under.
    pub generation: u64,
    pub done_units: u64,
    pub total_units: u64,
    #[serde(default)]
    pub bytes_copied: u64,
    #[serde(default)]
    pub bytes_per_sec: u64,
    #[serde(default)]
    pub finished: bool,
}

/// What one member's TOMA reports.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct MemberReportStatus {
    pub node: String,
    /// Every client registered on this member acknowledged this generation.
    pub synced: u64,
    /// The agent's boot counter when it wrote this report.
    #[serde(default)]
    pub boot: u64,
    /// This TOMA's dirty bits about other members were lost.
    #[serde(default)]
    pub dirty_bits_lost: bool,
    /// This member's disk lost power since its last flush: it may miss acknowledged writes
    /// and serves no I/O until it is rebuilt in full.
    #[serde(default)]
    pub stale: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild: Option<RebuildStatus>,
    /// The member's extent length on its disk (bytes).
    #[serde(default)]
    pub extent_bytes: u64,
    /// The extent could not grow in place (expansion).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub grow_refused: Option<GrowRefusal>,
}

/// Why a member's extent could not grow to `wantBytes`.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct GrowRefusal {
    pub want_bytes: u64,
    pub reason: String,
}

/// A client could not reach a member, under this generation.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct UnreachableReport {
    pub generation: u64,
}

/// A client attached to the volume.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct AttachmentStatus {
    pub node: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TomaTopologyStatus {
    /// Per member disk UUID: what its TOMA reports (synced generation, dirty bits lost,
    /// rebuild progress).
    #[serde(default)]
    pub members: BTreeMap<String, MemberReportStatus>,
    /// Per member disk UUID: a client could not reach it.
    #[serde(default)]
    pub unreachable: BTreeMap<String, UnreachableReport>,
    /// Per client id (32 hex digits): a client attached to this volume, and its node. An
    /// agent that restarts waits for these to re-register or be fenced.
    #[serde(default)]
    pub attachments: BTreeMap<String, AttachmentStatus>,
    /// Progress of the running rebuild, 0..100 (for `kubectl get`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rebuild_percent: Option<u64>,
}
