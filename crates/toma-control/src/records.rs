//! What the control plane stores: volumes with their topologies, nodes, disks, and what each
//! member's TOMA reports about its volume.

use toma_core::{DiskId, Generation, NodeId, Topology, VolumeId, VolumeSpec};

/// An optimistic-concurrency version (Kubernetes' `resourceVersion`).
pub type Version = u64;

/// The leader's epoch (a Lease's transitions counter). Every leader write carries it.
pub type Epoch = u64;

/// A volume: what it is, its secret, and its current topology.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeRecord {
    pub id: VolumeId,
    pub name: String,
    pub spec: VolumeSpec,
    /// Clients must present it to register on a member.
    pub secret: [u8; 32],
    pub topology: Topology,
    /// A pending growth: the size (bytes) the volume is growing to. Clients keep using
    /// `spec.size` until the growth is committed (`toma_core::growth`).
    pub growing_to: Option<u64>,
}

impl VolumeRecord {
    /// The bytes each member's extent must hold: enough for the pending growth too.
    pub fn extent_bytes(&self) -> u64 {
        match self.growing_to.and_then(|s| self.spec.grown(s).ok()) {
            Some(g) => g.member_bytes().max(self.spec.member_bytes()),
            None => self.spec.member_bytes(),
        }
    }
}

/// A stored value with its version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Versioned<T> {
    pub value: T,
    pub version: Version,
}

/// A node's agent, as it reports itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRecord {
    pub node: NodeId,
    /// Where clients reach this agent's datapath (e.g. `127.0.0.2:7100`).
    pub endpoint: String,
    /// Bumped by the agent on every report. The leader never compares it with a clock of
    /// its own: it only notes, on its own monotonic clock, when it last saw it change.
    pub heartbeat: u64,
    /// Bumped on every agent start (its RAM state was lost).
    pub boot: u64,
}

/// A disk, found by the UUID in its superblock, on the node that reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DiskRecord {
    pub disk: DiskId,
    pub node: NodeId,
    pub capacity: u64,
    /// Largest free extent.
    pub free: u64,
    /// The disk answers I/O. A disk whose I/O fails is reported with `healthy = false`.
    pub healthy: bool,
}

/// Rebuild progress reported by the TOMA that runs it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RebuildProgress {
    /// The generation (a Rebuilding topology) the cycle ran under.
    pub generation: Generation,
    pub done_units: u64,
    pub total_units: u64,
    pub bytes_copied: u64,
    pub bytes_per_sec: u64,
    pub finished: bool,
}

impl RebuildProgress {
    pub fn percent(&self) -> u64 {
        self.done_units
            .saturating_mul(100)
            .checked_div(self.total_units)
            .unwrap_or(100)
    }
}

/// What one member's TOMA reports about one volume.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberStatus {
    pub volume: VolumeId,
    pub disk: DiskId,
    pub node: NodeId,
    /// Every client registered on this member acknowledged this generation.
    pub synced: Generation,
    /// The agent's boot counter when it wrote this report.
    pub boot: u64,
    /// This TOMA's dirty bits about other members were lost (it restarted while the volume
    /// was degraded).
    pub dirty_bits_lost: bool,
    /// This member's disk lost power since its last flush (its host rebooted, or it was
    /// pulled): it may miss writes it acknowledged, so it must be rebuilt in full before it
    /// is read again. The agent refuses its I/O meanwhile.
    pub stale: bool,
    pub rebuild: Option<RebuildProgress>,
    /// The member's extent length on its disk (bytes).
    pub extent_bytes: u64,
    /// The TOMA could not grow the extent to `.0` bytes, and why.
    pub grow_refused: Option<(u64, String)>,
}

/// A client could not reach a member; reported through the TOMAs it can reach.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Unreachable {
    pub volume: VolumeId,
    pub disk: DiskId,
    /// The generation the client was using.
    pub generation: Generation,
}

/// A client attached to a volume (a node plugin, `toma io`, an NBD export). An agent that
/// restarts waits for every attached client to re-register or be fenced before it grants
/// locks again.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Attachment {
    pub volume: VolumeId,
    pub client: u128,
    pub node: NodeId,
}
