//! Volume expansion: when a pending growth may become visible to clients.
//!
//! A volume grows in two steps. First its target size is recorded beside the visible one
//! (`VolumeSpec::size` stays as it was); every member's TOMA grows the member's extent in
//! place (the space right after it on its disk must be free), zeroes the new part and only
//! then records the longer extent in its superblock, and reports the extent's length.
//! Second, once [`growth_state`] says `Ready`, the visible size becomes the target: clients
//! may then read and write the new range, which reads as zeros on every member.
//!
//! The commit waits for `Normal` (every member `RWL`, none `DEAD`, no rebuild): so no member
//! of the topology can miss the growth. A member that dies while a growth is pending grows
//! when its TOMA hosts it again (it is rebuilt before the volume is `Normal`); a replacement
//! extent is allocated at the visible size and grown like any other. After the commit, every
//! member's extent already covers the new size, and replacements are allocated at it.

use crate::layout::VolumeSpec;
use crate::topology::{DiskId, Phase, Topology};

/// What one member's TOMA reports about its extent.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MemberExtent {
    pub disk: DiskId,
    /// The extent's length on its disk.
    pub extent_bytes: u64,
    /// The TOMA could not grow the extent to `want` bytes, and why.
    pub refused: Option<(u64, String)>,
}

/// Where a pending growth stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GrowthState {
    /// Every member's extent covers the target: the target may become the visible size.
    Ready,
    /// Not yet; says what is missing.
    Waiting(String),
    /// A member cannot grow in place (no free space right after its extent): the growth
    /// must be abandoned.
    Refused(String),
}

/// Whether `target` (the volume grown) may become visible, given topology `t` and the
/// members' reports.
pub fn growth_state(t: &Topology, target: &VolumeSpec, reports: &[MemberExtent]) -> GrowthState {
    let want = target.member_bytes();
    for (i, m) in t.members.iter().enumerate() {
        let r = reports.iter().find(|r| r.disk == m.disk);
        if let Some((w, why)) = r.and_then(|r| r.refused.as_ref()) {
            if *w == want {
                return GrowthState::Refused(format!(
                    "member {i} (disk {}, node {}) cannot grow to {want} bytes: {why}",
                    m.disk, m.node
                ));
            }
        }
    }
    let phase = t.phase();
    if phase != Phase::Normal {
        return GrowthState::Waiting(format!(
            "volume {} is {} (generation {}): it grows once every member is back and rebuilt",
            t.volume,
            phase.as_str(),
            t.generation
        ));
    }
    let short: Vec<String> = t
        .members
        .iter()
        .enumerate()
        .filter_map(|(i, m)| {
            let have = reports
                .iter()
                .find(|r| r.disk == m.disk)
                .map_or(0, |r| r.extent_bytes);
            (have < want).then(|| format!("member {i} on {} has {have} of {want} bytes", m.node))
        })
        .collect();
    if short.is_empty() {
        GrowthState::Ready
    } else {
        GrowthState::Waiting(short.join("; "))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;
    use crate::topology::{Role, VolumeId};

    fn setup() -> (Topology, VolumeSpec, VolumeSpec) {
        let t = Topology::new_normal(
            VolumeId(7),
            Layout::raid1(2).unwrap(),
            65536,
            vec![(DiskId(1), "a".into()), (DiskId(2), "b".into())],
        )
        .unwrap();
        let old = VolumeSpec::new(Layout::raid1(2).unwrap(), 65536, 1 << 20).unwrap();
        (t, old, old.grown(2 << 20).unwrap())
    }

    fn rep(disk: u128, bytes: u64) -> MemberExtent {
        MemberExtent {
            disk: DiskId(disk),
            extent_bytes: bytes,
            refused: None,
        }
    }

    #[test]
    fn ready_only_when_every_member_grew_in_normal() {
        let (mut t, _, new) = setup();
        let want = new.member_bytes();
        assert!(matches!(
            growth_state(&t, &new, &[rep(1, want)]),
            GrowthState::Waiting(w) if w.contains("member 1")
        ));
        assert!(matches!(
            growth_state(&t, &new, &[rep(1, want), rep(2, want - 1)]),
            GrowthState::Waiting(_)
        ));
        assert_eq!(
            growth_state(&t, &new, &[rep(1, want), rep(2, want + 4096)]),
            GrowthState::Ready
        );
        t.members[1].role = Role::Dead;
        assert!(matches!(
            growth_state(&t, &new, &[rep(1, want), rep(2, want)]),
            GrowthState::Waiting(w) if w.contains("Degraded")
        ));
    }

    #[test]
    fn a_refusal_for_this_target_ends_the_growth() {
        let (t, _, new) = setup();
        let want = new.member_bytes();
        let mut r = rep(2, 1 << 20);
        r.refused = Some((want + 65536, "older target".into()));
        assert!(matches!(
            growth_state(&t, &new, &[rep(1, want), r.clone()]),
            GrowthState::Waiting(_)
        ));
        r.refused = Some((want, "disk full after the extent".into()));
        assert!(matches!(
            growth_state(&t, &new, &[rep(1, want), r]),
            GrowthState::Refused(w) if w.contains("member 1") && w.contains("disk full")
        ));
    }

    #[test]
    fn shrinking_is_refused_naming_both_sizes() {
        let (_, old, _) = setup();
        let e = old.grown(65536).unwrap_err();
        assert!(
            e.to_string().contains("65536") && e.to_string().contains("1048576"),
            "{e}"
        );
        assert_eq!(old.grown(1 << 20).unwrap(), old);
        assert!(old.grown((1 << 20) + 4096).is_err());
    }
}
