//! A volume's topology: which disks are its members, and what each member is used for.

use std::collections::BTreeSet;
use std::fmt;

use thiserror::Error;

use crate::layout::{validate_chunk_size, Layout, LayoutError};

pub type Generation = u64;
/// Index of a member in `Topology::members`.
pub type MemberIdx = usize;

/// A disk, named by the UUID in its superblock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct DiskId(pub u128);

/// A volume, named by its UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VolumeId(pub u128);

/// A server (a Kubernetes node, or a host of the embedded cluster).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct NodeId(pub String);

fn fmt_uuid(v: u128, f: &mut fmt::Formatter<'_>) -> fmt::Result {
    let b = v.to_be_bytes();
    for (i, byte) in b.iter().enumerate() {
        if matches!(i, 4 | 6 | 8 | 10) {
            f.write_str("-")?;
        }
        write!(f, "{byte:02x}")?;
    }
    Ok(())
}

/// Parses the `8-4-4-4-12` hex form printed by `Display`.
pub fn parse_uuid(s: &str) -> Option<u128> {
    let hex: String = s.chars().filter(|c| *c != '-').collect();
    if hex.len() != 32 || s.len() != 36 {
        return None;
    }
    u128::from_str_radix(&hex, 16).ok()
}

impl fmt::Display for DiskId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_uuid(self.0, f)
    }
}
impl fmt::Display for VolumeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt_uuid(self.0, f)
    }
}
impl fmt::Display for NodeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}
impl From<&str> for NodeId {
    fn from(s: &str) -> Self {
        NodeId(s.to_string())
    }
}

/// What clients may do with a member.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Read, written, locked.
    Rwl,
    /// Written only (being rebuilt).
    W,
    /// Written and locked, not read (dual lock, after rebuild).
    Wl,
    /// Nothing is sent to it.
    Dead,
}

impl Role {
    pub fn is_dead(self) -> bool {
        self == Role::Dead
    }
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Rwl => "RWL",
            Role::W => "W",
            Role::Wl => "WL",
            Role::Dead => "DEAD",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Where writers lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LockMode {
    /// Each chunk locks on one readable member: its home `c mod n` when that is `RWL`,
    /// otherwise the next `RWL` member after it.
    Interleaved,
    /// A writer locks on the interleaved place *and* on the home member when that is `WL`:
    /// the old place first, then the new one.
    DualLock,
}

/// One member of a volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Member {
    pub disk: DiskId,
    pub node: NodeId,
    pub role: Role,
    /// When this member (re)enters as `W`, every chunk is dirty: it is a NEW disk, or the
    /// dirty bits that describe what it missed may be incomplete.
    pub full_rebuild: bool,
    /// A `DEAD` member that held every acknowledged write when it went down because it was
    /// among the last readable members. Only these may bring a failed volume back.
    pub last_good: bool,
}

impl Member {
    pub fn new(disk: DiskId, node: impl Into<NodeId>, role: Role) -> Self {
        Member {
            disk,
            node: node.into(),
            role,
            full_rebuild: false,
            last_good: false,
        }
    }
}

impl From<String> for NodeId {
    fn from(s: String) -> Self {
        NodeId(s)
    }
}

/// Where a volume is in its life cycle, derived from the roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Phase {
    Normal,
    Degraded,
    RebuildInit,
    Rebuilding,
    DualLock,
    /// RAID6, every member readable, `rebuild` set: after a restart from Failed with every
    /// member back, P and Q of every stripe are re-encoded from the data chunks (a write in
    /// flight when the volume failed, or torn by a power loss, may have left parity that
    /// disagrees with the data). Readers never reconstruct here (every data member is
    /// readable); losing any member fails the volume again (parity is not trusted yet).
    Resync,
    /// Too few readable members: I/O is held until a last-good member returns.
    Failed,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Normal => "Normal",
            Phase::Degraded => "Degraded",
            Phase::RebuildInit => "RebuildInit",
            Phase::Rebuilding => "Rebuilding",
            Phase::DualLock => "DualLock",
            Phase::Resync => "Resync",
            Phase::Failed => "Failed",
        }
    }
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A topology that cannot exist. The message names the field that is wrong.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum TopologyError {
    #[error(transparent)]
    Layout(#[from] LayoutError),
    #[error("members: {layout} needs {want} members, got {got}")]
    MemberCount {
        layout: Layout,
        want: usize,
        got: usize,
    },
    #[error("members[{a}] and members[{b}] are both on node {node}: no two live members of a volume may share a node")]
    SameNode { a: usize, b: usize, node: NodeId },
    #[error("members[{a}] and members[{b}] are both disk {disk}")]
    SameDisk { a: usize, b: usize, disk: DiskId },
    #[error("lockMode = {got:?} but {why}")]
    LockMode { got: LockMode, why: &'static str },
    #[error("rebuild = true but no member is W (and it is not a RAID6 parity resync, with every member RWL)")]
    RebuildFlag,
    #[error("members[{idx}].role = {role}: {why}")]
    RoleMix {
        idx: usize,
        role: Role,
        why: &'static str,
    },
    #[error(
        "members[{idx}].lastGood = true but its role is {role}: only DEAD members can be last-good"
    )]
    LastGood { idx: usize, role: Role },
}

/// `{generation, members[{disk, node, role}], lock mode, rebuild flag}` of one volume.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Topology {
    pub volume: VolumeId,
    pub generation: Generation,
    pub layout: Layout,
    pub chunk_size: u32,
    pub members: Vec<Member>,
    pub lock_mode: LockMode,
    pub rebuild: bool,
}

impl Topology {
    /// A new volume in Normal at generation 1.
    pub fn new_normal(
        volume: VolumeId,
        layout: Layout,
        chunk_size: u64,
        disks: Vec<(DiskId, NodeId)>,
    ) -> Result<Self, TopologyError> {
        let t = Topology {
            volume,
            generation: 1,
            layout: layout.validate()?,
            chunk_size: validate_chunk_size(chunk_size)?,
            members: disks
                .into_iter()
                .map(|(d, n)| Member::new(d, n, Role::Rwl))
                .collect(),
            lock_mode: LockMode::Interleaved,
            rebuild: false,
        };
        t.validate()?;
        Ok(t)
    }

    /// Checks every structural rule; a topology from outside the process must pass this
    /// before anything uses it.
    pub fn validate(&self) -> Result<(), TopologyError> {
        self.layout.validate()?;
        validate_chunk_size(u64::from(self.chunk_size))?;
        let want = self.layout.members();
        if self.members.len() != want {
            return Err(TopologyError::MemberCount {
                layout: self.layout,
                want,
                got: self.members.len(),
            });
        }
        for (a, ma) in self.members.iter().enumerate() {
            for (b, mb) in self.members.iter().enumerate().skip(a + 1) {
                // A DEAD member's node is only where it was last: a disk may come back on
                // that node as another member.
                if ma.node == mb.node && !ma.role.is_dead() && !mb.role.is_dead() {
                    return Err(TopologyError::SameNode {
                        a,
                        b,
                        node: ma.node.clone(),
                    });
                }
                if ma.disk == mb.disk {
                    return Err(TopologyError::SameDisk {
                        a,
                        b,
                        disk: ma.disk,
                    });
                }
            }
            if ma.last_good && ma.role != Role::Dead {
                return Err(TopologyError::LastGood {
                    idx: a,
                    role: ma.role,
                });
            }
        }
        let has = |r: Role| self.members.iter().any(|m| m.role == r);
        let has_wl = has(Role::Wl);
        let has_w = has(Role::W);
        match (self.lock_mode, has_wl) {
            (LockMode::DualLock, false) => {
                return Err(TopologyError::LockMode {
                    got: self.lock_mode,
                    why: "no member is WL",
                })
            }
            (LockMode::Interleaved, true) => {
                return Err(TopologyError::LockMode {
                    got: self.lock_mode,
                    why: "a WL member needs DualLock",
                })
            }
            _ => {}
        }
        // RAID6 parity resync: every member RWL, `rebuild` set (see [`Phase::Resync`]).
        let resync = self.layout.is_raid6() && self.members.iter().all(|m| m.role == Role::Rwl);
        if self.rebuild && !has_w && !resync {
            return Err(TopologyError::RebuildFlag);
        }
        if has_w && has_wl {
            let idx = self
                .members
                .iter()
                .position(|m| m.role == Role::Wl)
                .unwrap_or(0);
            return Err(TopologyError::RoleMix {
                idx,
                role: Role::Wl,
                why: "W and WL members cannot coexist (one rebuild phase at a time)",
            });
        }
        if (has_w || has_wl) && !has(Role::Rwl) {
            let idx = self
                .members
                .iter()
                .position(|m| matches!(m.role, Role::W | Role::Wl))
                .unwrap_or(0);
            return Err(TopologyError::RoleMix {
                idx,
                role: self.members[idx].role,
                why: "a member can only be rebuilt while another member is RWL",
            });
        }
        Ok(())
    }

    pub fn n(&self) -> usize {
        self.members.len()
    }

    pub fn role(&self, idx: MemberIdx) -> Role {
        self.members[idx].role
    }

    /// True when a live (not DEAD) member other than `idx` sits on `node`: member `idx`
    /// cannot be (or return) there, since no two live members of a volume share a node.
    pub fn node_taken(&self, idx: MemberIdx, node: &NodeId) -> bool {
        self.members
            .iter()
            .enumerate()
            .any(|(j, m)| j != idx && !m.role.is_dead() && &m.node == node)
    }

    pub fn count(&self, role: Role) -> usize {
        self.members.iter().filter(|m| m.role == role).count()
    }

    /// Whether member `idx` is one of the volume's last readable members: it is RWL and
    /// losing it would leave fewer than a readable set (RAID1: one member, RAID6: k).
    pub fn is_last_readable(&self, idx: MemberIdx) -> bool {
        self.members.get(idx).is_some_and(|m| m.role == Role::Rwl)
            && self.count(Role::Rwl) <= self.layout.min_readable()
    }

    pub fn members_with(&self, role: Role) -> impl Iterator<Item = MemberIdx> + '_ {
        self.members
            .iter()
            .enumerate()
            .filter(move |(_, m)| m.role == role)
            .map(|(i, _)| i)
    }

    /// Members that are not DEAD.
    pub fn alive(&self) -> BTreeSet<MemberIdx> {
        self.members
            .iter()
            .enumerate()
            .filter(|(_, m)| !m.role.is_dead())
            .map(|(i, _)| i)
            .collect()
    }

    pub fn phase(&self) -> Phase {
        if self.count(Role::Rwl) < self.layout.min_readable() {
            return Phase::Failed;
        }
        if self.count(Role::Wl) > 0 {
            Phase::DualLock
        } else if self.count(Role::W) > 0 {
            if self.rebuild {
                Phase::Rebuilding
            } else {
                Phase::RebuildInit
            }
        } else if self.count(Role::Dead) > 0 {
            Phase::Degraded
        } else if self.rebuild {
            Phase::Resync
        } else {
            Phase::Normal
        }
    }

    /// `node/disk:role` for each member, as `kubectl get tomatopologies` shows them.
    pub fn members_summary(&self) -> String {
        self.members
            .iter()
            .map(|m| format!("{}/{}:{}", m.node, short_disk(m.disk), m.role))
            .collect::<Vec<_>>()
            .join(",")
    }

    pub fn describe_member(&self, idx: MemberIdx) -> String {
        match self.members.get(idx) {
            Some(m) => format!("m{idx}({}/{} {})", m.node, short_disk(m.disk), m.role),
            None => format!("m{idx}(?)"),
        }
    }
}

/// The first 8 hex digits of a disk UUID, enough for humans.
pub fn short_disk(d: DiskId) -> String {
    format!("{:08x}", (d.0 >> 96) as u32)
}

impl fmt::Display for Topology {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "g{} {} [{}]",
            self.generation,
            self.phase(),
            self.members
                .iter()
                .map(|m| m.role.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    pub fn disks(n: usize) -> Vec<(DiskId, NodeId)> {
        (0..n)
            .map(|i| (DiskId(1000 + i as u128), NodeId(format!("node{i}"))))
            .collect()
    }

    pub fn raid1(n: u8) -> Topology {
        Topology::new_normal(
            VolumeId(7),
            Layout::raid1(n).unwrap(),
            65536,
            disks(usize::from(n)),
        )
        .unwrap()
    }

    #[test]
    fn two_members_on_one_node_are_refused() {
        let mut d = disks(2);
        d[1].1 = d[0].1.clone();
        let e = Topology::new_normal(VolumeId(1), Layout::raid1(2).unwrap(), 65536, d).unwrap_err();
        assert!(e.to_string().contains("members[0] and members[1]"), "{e}");
        assert!(e.to_string().contains("node0"), "{e}");
    }

    #[test]
    fn last_readable_members() {
        let mut t = raid1(2);
        assert!(!t.is_last_readable(0), "two readable mirrors");
        t.members[1].role = Role::Dead;
        assert!(t.is_last_readable(0));
        assert!(!t.is_last_readable(1), "a DEAD member is not readable");
        assert!(!t.is_last_readable(7), "no such member");
        let mut r6 =
            Topology::new_normal(VolumeId(1), Layout::raid6(4).unwrap(), 65536, disks(6)).unwrap();
        r6.members[0].role = Role::Dead;
        assert!(!r6.is_last_readable(1), "five readable, four needed");
        r6.members[5].role = Role::W;
        assert!(r6.is_last_readable(1), "four readable, four needed");
    }

    #[test]
    fn wrong_member_count_is_refused() {
        let e = Topology::new_normal(VolumeId(1), Layout::raid6(4).unwrap(), 65536, disks(5))
            .unwrap_err();
        assert!(e.to_string().contains("needs 6 members, got 5"), "{e}");
    }

    #[test]
    fn phases_follow_roles() {
        let mut t = raid1(2);
        assert_eq!(t.phase(), Phase::Normal);
        t.members[1].role = Role::Dead;
        assert_eq!(t.phase(), Phase::Degraded);
        t.members[1].role = Role::W;
        assert_eq!(t.phase(), Phase::RebuildInit);
        t.rebuild = true;
        assert_eq!(t.phase(), Phase::Rebuilding);
        t.rebuild = false;
        t.members[1].role = Role::Wl;
        t.lock_mode = LockMode::DualLock;
        assert_eq!(t.phase(), Phase::DualLock);
        assert!(t.validate().is_ok());
        t.lock_mode = LockMode::Interleaved;
        assert!(t.validate().is_err());
    }

    #[test]
    fn uuid_display_round_trips() {
        let d = DiskId(0x0123_4567_89ab_cdef_0011_2233_4455_6677);
        let s = d.to_string();
        assert_eq!(s, "01234567-89ab-cdef-0011-223344556677");
        assert_eq!(parse_uuid(&s), Some(d.0));
        assert_eq!(parse_uuid("nope"), None);
    }
}
