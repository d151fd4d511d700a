//! What a client does for a lock unit (a chunk for RAID1, a stripe for RAID6) under one
//! topology: where it locks, where it reads, where it writes, and which dirty bits it sets.
//!
//! Clients, agents, the model checker and the simulation all ask these functions; none keeps
//! its own copy of the rules.

use crate::topology::{LockMode, MemberIdx, Role, Topology};

/// The member that unit `unit` locks on in Normal: `unit mod n`.
pub fn home(t: &Topology, unit: u64) -> MemberIdx {
    let n = t.n().max(1) as u64;
    (unit % n) as usize
}

/// The readable member a unit locks on: its home when that is RWL, otherwise the next RWL
/// member after it (cyclically). `None` when no member is RWL.
pub fn interleaved_place(t: &Topology, unit: u64) -> Option<MemberIdx> {
    place_among(t, unit, |r| r == Role::Rwl)
}

/// The first member from `unit`'s home on (cyclically) whose role passes `lockable`.
fn place_among(t: &Topology, unit: u64, lockable: impl Fn(Role) -> bool) -> Option<MemberIdx> {
    let n = t.n();
    let h = home(t, unit);
    (0..n)
        .map(|k| (h + k) % n)
        .find(|&i| lockable(t.members[i].role))
}

/// The ordered lock set of `unit`, in the order a writer takes the locks. Empty when the
/// volume has no readable member (Failed: writes wait).
///
/// In DualLock a writer locks both the place of the topology before (WL members not
/// lockable) and the place of the topology after (WL members as good as RWL), so it meets
/// the writers of either neighbour — the old place *first*, then the new one (the slides'
/// "lock on the left-hand disk, and then on the right-hand disk"). Not ascending member
/// order: a write carried over from Rebuilding already holds the old place and re-issues
/// under DualLock by adding the new one; if DualLock writers took the lower-numbered member
/// first and that were the new place, each would hold the lock the other waits for.
///
/// RAID6: the lock (and a degraded write's intent) is also kept on the next RWL member after
/// the place, so that losing the place's server in the middle of a write does not lose the
/// stripe's lock table (DESIGN §7: stale-lock recovery fixes a half-written stripe "while
/// the lock table survives"). That second member is the place of the topology that marks
/// the first one DEAD: a writer that goes on holds the lock there without a break, so no
/// one else can have written the stripe between its two attempts (it may redo from the
/// columns it read first); a writer that is fenced instead leaves its lock and intent there
/// for stale-lock recovery to roll the stripe forward.
pub fn locks(t: &Topology, unit: u64) -> Vec<MemberIdx> {
    let Some(place) = interleaved_place(t, unit) else {
        return Vec::new();
    };
    let mut set = vec![place];
    if t.layout.is_raid6() {
        let n = t.n();
        if let Some(second) = (1..n)
            .map(|k| (place + k) % n)
            .find(|&i| t.members[i].role == Role::Rwl)
        {
            set.push(second);
        }
    }
    if t.lock_mode == LockMode::DualLock {
        if let Some(after) = place_among(t, unit, |r| matches!(r, Role::Rwl | Role::Wl)) {
            if !set.contains(&after) {
                set.push(after);
            }
        }
    }
    set
}

/// The member a reader of `unit` reads from (RAID1) and whose lock it tests in the same round
/// trip ("test after read, piggyback"). Always an RWL member; `None` when there is none.
pub fn read_member(t: &Topology, unit: u64) -> Option<MemberIdx> {
    interleaved_place(t, unit)
}

/// Every member a write of `unit` goes to: all members that are not DEAD. Empty when the
/// volume is Failed (writes are held until it comes back).
pub fn write_members(t: &Topology, unit: u64) -> Vec<MemberIdx> {
    let _ = unit;
    if t.count(Role::Rwl) < t.layout.min_readable() {
        return Vec::new();
    }
    t.members
        .iter()
        .enumerate()
        .filter(|(_, m)| !m.role.is_dead())
        .map(|(i, _)| i)
        .collect()
}

/// Dirty bits a write touches: on each of `holders` (in its TOMA's RAM), the bit of `unit`
/// for each member in `targets`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirtyMarks {
    /// The members whose TOMAs keep the bitmaps: every RWL member, so that losing one more
    /// server does not lose them.
    pub holders: Vec<MemberIdx>,
    /// The members the bits are about (one bitmap per target member, like DRBD's per-peer
    /// bitmaps).
    pub targets: Vec<MemberIdx>,
}

impl DirtyMarks {
    /// The targets as a member bitmask (bit i = member i), as the wire carries them.
    pub fn target_mask(&self) -> u16 {
        self.targets
            .iter()
            .filter(|&&i| i < 16)
            .fold(0u16, |m, &i| m | (1u16 << i))
    }
}

/// The members a recovery of `unit` (a fenced client's stale lock) writes, copying from
/// `reader`'s view: every writable member — RAID1 but the reader, whose copy is the source;
/// RAID6 the reader too, since the stripe is re-encoded from its data chunks and the
/// reader's own shard may be the stale one.
pub fn recovery_targets(t: &Topology, unit: u64, reader: MemberIdx) -> Vec<MemberIdx> {
    write_members(t, unit)
        .into_iter()
        .filter(|&x| x != reader || t.layout.is_raid6())
        .collect()
}

/// The member whose TOMA runs a Rebuilding topology's rebuild cycle: the lowest-index RWL
/// member (it holds the dirty bits and reads the source data from its own disk).
pub fn rebuilder(t: &Topology) -> Option<MemberIdx> {
    t.members_with(Role::Rwl).next()
}

/// Whether a RAID6 write must first leave its intent (`INTENT`) with the stripe's lock
/// members: while some member is not RWL. Stale-lock recovery then decodes at least one
/// chunk, and a half-written stripe decodes into bytes no write wrote; with every member
/// RWL it reads every data chunk and needs no intent.
pub fn needs_intent(t: &Topology) -> bool {
    t.count(Role::Rwl) < t.n()
}

/// Dirty bits a write of `unit` must set *before* it is acknowledged: when some member is
/// DEAD, the write misses it, so its bit goes on in every RWL member's TOMA.
pub fn sets_dirty(t: &Topology, unit: u64) -> Option<DirtyMarks> {
    let _ = unit;
    let targets: Vec<_> = t.members_with(Role::Dead).collect();
    if targets.is_empty() {
        return None;
    }
    let holders: Vec<_> = t.members_with(Role::Rwl).collect();
    if holders.is_empty() {
        return None;
    }
    Some(DirtyMarks { holders, targets })
}

/// Dirty bits a write of `unit` may clear *after* it reached every member it writes: the bits
/// about members being rebuilt (W), which it has just brought up to date.
///
/// Only a write of the *whole* unit brings it up to date; see [`clears_dirty_after`].
pub fn clears_dirty(t: &Topology, unit: u64) -> Option<DirtyMarks> {
    let _ = unit;
    let targets: Vec<_> = t.members_with(Role::W).collect();
    if targets.is_empty() {
        return None;
    }
    let holders: Vec<_> = t.members_with(Role::Rwl).collect();
    if holders.is_empty() {
        return None;
    }
    Some(DirtyMarks { holders, targets })
}

/// The dirty bits a write covering `[offset_in_unit, +len)` of `unit` clears: those of
/// [`clears_dirty`] when it covers the whole unit (`unit_bytes`), none otherwise — a partial
/// write leaves the rest of a dirty unit stale on the W member, so its bit must stay.
pub fn clears_dirty_after(
    t: &Topology,
    unit: u64,
    offset_in_unit: u64,
    len: u64,
    unit_bytes: u64,
) -> Option<DirtyMarks> {
    if offset_in_unit == 0 && len >= unit_bytes {
        clears_dirty(t, unit)
    } else {
        None
    }
}

/// RAID6: the member holding data chunk `j` (0-based, `j < k`) of stripe `stripe`.
/// Data and parity rotate by one member per stripe.
pub fn raid6_data_member(t: &Topology, stripe: u64, j: usize) -> MemberIdx {
    (home(t, stripe) + j) % t.n()
}

/// RAID6: the members holding P and Q of stripe `stripe`.
pub fn raid6_parity_members(t: &Topology, stripe: u64) -> (MemberIdx, MemberIdx) {
    let n = t.n();
    let k = n.saturating_sub(2);
    let h = home(t, stripe);
    ((h + k) % n, (h + k + 1) % n)
}

/// How a RAID6 reader gets data chunk `j` of a stripe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Raid6Read {
    /// Read the chunk from its own member.
    Direct(MemberIdx),
    /// Its member is not readable: read these k readable members and reconstruct.
    Reconstruct(Vec<MemberIdx>),
    /// Fewer than k members readable.
    Unavailable,
}

pub fn raid6_read(t: &Topology, stripe: u64, j: usize) -> Raid6Read {
    let m = raid6_data_member(t, stripe, j);
    if t.members[m].role == Role::Rwl {
        return Raid6Read::Direct(m);
    }
    match raid6_sources(t, stripe) {
        Some(s) => Raid6Read::Reconstruct(s),
        None => Raid6Read::Unavailable,
    }
}

/// RAID6: which shard of stripe `stripe` member `m` holds: `j < k` is data chunk `j`,
/// `k` is P and `k + 1` is Q.
pub fn raid6_shard_of(t: &Topology, stripe: u64, m: MemberIdx) -> usize {
    let n = t.n().max(1);
    (m % n + n - home(t, stripe)) % n
}

/// RAID6: the member holding shard `i` of stripe `stripe` (see [`raid6_shard_of`]).
pub fn raid6_shard_member(t: &Topology, stripe: u64, i: usize) -> MemberIdx {
    (home(t, stripe) + i) % t.n().max(1)
}

/// RAID6: the k readable (RWL) members a stripe is reconstructed from, in a fixed order of
/// preference — its data chunks first (in chunk order), then P, then Q — so that every
/// reader and every recovery of one stripe decodes from the same shards. `None` when fewer
/// than k members are readable.
pub fn raid6_sources(t: &Topology, stripe: u64) -> Option<Vec<MemberIdx>> {
    let k = t.layout.min_readable();
    let picked: Vec<_> = (0..t.n())
        .map(|i| raid6_shard_member(t, stripe, i))
        .filter(|&m| t.members[m].role == Role::Rwl)
        .take(k)
        .collect();
    (picked.len() == k).then_some(picked)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::topology::tests::raid1;
    use crate::topology::LockMode;

    #[test]
    fn normal_interleaves_locks_and_reads() {
        let t = raid1(2);
        assert_eq!(locks(&t, 0), vec![0]);
        assert_eq!(locks(&t, 1), vec![1]);
        assert_eq!(read_member(&t, 3), Some(1));
        assert_eq!(write_members(&t, 3), vec![0, 1]);
        assert_eq!(sets_dirty(&t, 3), None);
    }

    #[test]
    fn degraded_locks_on_the_survivor_and_sets_dirty() {
        let mut t = raid1(2);
        t.members[1].role = Role::Dead;
        assert_eq!(locks(&t, 1), vec![0]);
        assert_eq!(read_member(&t, 1), Some(0));
        assert_eq!(write_members(&t, 1), vec![0]);
        assert_eq!(
            sets_dirty(&t, 1),
            Some(DirtyMarks {
                holders: vec![0],
                targets: vec![1]
            })
        );
    }

    #[test]
    fn three_mirrors_keep_surviving_lock_places() {
        let mut t = raid1(3);
        t.members[1].role = Role::Dead;
        assert_eq!(locks(&t, 0), vec![0]);
        assert_eq!(locks(&t, 1), vec![2]);
        assert_eq!(locks(&t, 2), vec![2]);
        assert_eq!(sets_dirty(&t, 0).unwrap().holders, vec![0, 2]);
    }

    #[test]
    fn dual_lock_locks_old_place_then_home() {
        let mut t = raid1(2);
        t.members[1].role = Role::Wl;
        t.lock_mode = LockMode::DualLock;
        assert_eq!(locks(&t, 1), vec![0, 1]);
        assert_eq!(locks(&t, 0), vec![0]);
        assert_eq!(read_member(&t, 1), Some(0));
    }

    #[test]
    fn dual_lock_with_another_dead_member_locks_before_and_after_places() {
        // RAID1x3: m2 DEAD, m1 rebuilt (WL). Chunk 1's home is m1: before, it locked on m0
        // (next RWL after m1... m2 is DEAD, so m0); after, it locks on m1 itself.
        let mut t = raid1(3);
        t.members[1].role = Role::Wl;
        t.members[2].role = Role::Dead;
        t.lock_mode = LockMode::DualLock;
        assert_eq!(locks(&t, 1), vec![0, 1]);
        // Chunk 2's home is DEAD m2: before, the next RWL is m0; after, WL m1 is skipped
        // since m0 comes first from m2 on.
        assert_eq!(locks(&t, 2), vec![0]);
    }

    #[test]
    fn dual_lock_takes_the_old_place_before_the_new_one() {
        // Member 0 was rebuilt; chunk 0's home is member 0. Under Rebuilding chunk 0 locked
        // on member 1 only: a writer that re-issues under DualLock holds member 1 and adds
        // member 0. Every DualLock writer must take them in that same order, or the two
        // deadlock (found by the toma-model checker).
        let mut t = raid1(2);
        t.members[0].role = Role::W;
        t.rebuild = true;
        assert_eq!(locks(&t, 0), vec![1]);
        t.members[0].role = Role::Wl;
        t.rebuild = false;
        t.lock_mode = LockMode::DualLock;
        assert_eq!(locks(&t, 0), vec![1, 0]);
        assert_eq!(locks(&t, 1), vec![1]);
    }

    #[test]
    fn rebuild_clears_bits_of_the_w_member() {
        let mut t = raid1(2);
        t.members[1].role = Role::W;
        assert_eq!(write_members(&t, 0), vec![0, 1]);
        assert_eq!(sets_dirty(&t, 0), None);
        assert_eq!(clears_dirty(&t, 0).unwrap().targets, vec![1]);
        assert_eq!(clears_dirty(&t, 0).unwrap().target_mask(), 0b10);
        assert_eq!(rebuilder(&t), Some(0));
        assert!(clears_dirty_after(&t, 0, 0, 65536, 65536).is_some());
        // A 4 KiB write of a dirty 64 KiB chunk must leave its bit set.
        assert_eq!(clears_dirty_after(&t, 0, 4096, 4096, 65536), None);
        assert_eq!(clears_dirty_after(&t, 0, 0, 4096, 65536), None);
    }

    /// A Normal RAID6 4+2 volume on six disks, 64 KiB stripe units.
    fn raid6_4_plus_2() -> Topology {
        Topology::new_normal(
            crate::VolumeId(1),
            crate::Layout::raid6(4).unwrap(),
            65536,
            crate::topology::tests::disks(6),
        )
        .unwrap()
    }

    #[test]
    fn a_raid6_stripe_locks_on_its_place_and_the_next_rwl_member() {
        let mut t = raid6_4_plus_2();
        assert_eq!(locks(&t, 0), vec![0, 1]);
        assert_eq!(locks(&t, 5), vec![5, 0]);
        // The second place skips members that are not RWL, and it is the first place of
        // the topology that marks the first one DEAD.
        t.members[1].role = Role::Dead;
        assert_eq!(locks(&t, 0), vec![0, 2]);
        t.members[0].role = Role::Dead;
        assert_eq!(locks(&t, 0), vec![2, 3]);
        assert_eq!(locks(&t, 5), vec![5, 2]);
        // DualLock adds the place of the topology after, last.
        let mut t = raid6_4_plus_2();
        t.members[0].role = Role::Wl;
        t.lock_mode = LockMode::DualLock;
        assert_eq!(locks(&t, 0), vec![1, 2, 0]);
    }

    #[test]
    fn an_intent_is_needed_while_a_member_is_not_rwl() {
        let mut t = raid6_4_plus_2();
        assert!(!needs_intent(&t));
        t.members[2].role = Role::Dead;
        assert!(needs_intent(&t));
        t.members[2].role = Role::W;
        assert!(needs_intent(&t));
        t.members[2].role = Role::Rwl;
        assert!(!needs_intent(&t));
    }

    #[test]
    fn raid6_shards_rotate_and_invert() {
        let mut t = raid6_4_plus_2();
        for s in 0..12u64 {
            let mut seen = std::collections::BTreeSet::new();
            for i in 0..6 {
                let m = raid6_shard_member(&t, s, i);
                assert_eq!(raid6_shard_of(&t, s, m), i);
                seen.insert(m);
            }
            assert_eq!(seen.len(), 6, "stripe {s}: every member holds one shard");
            assert_eq!(raid6_shard_member(&t, s, 0), raid6_data_member(&t, s, 0));
            let (p, q) = raid6_parity_members(&t, s);
            assert_eq!((raid6_shard_of(&t, s, p), raid6_shard_of(&t, s, q)), (4, 5));
        }
        // Two members lost: the sources skip them, data first then parity.
        t.members[1].role = Role::Dead;
        t.members[2].role = Role::Dead;
        let src = raid6_sources(&t, 0).unwrap();
        assert_eq!(src, vec![0, 3, 4, 5]);
        assert_eq!(
            raid6_read(&t, 0, 1),
            Raid6Read::Reconstruct(vec![0, 3, 4, 5])
        );
        assert_eq!(raid6_read(&t, 0, 0), Raid6Read::Direct(0));
        t.members[3].role = Role::Dead;
        assert_eq!(raid6_sources(&t, 0), None);
        assert_eq!(raid6_read(&t, 0, 1), Raid6Read::Unavailable);
    }

    #[test]
    fn recovery_rewrites_the_reader_only_for_raid6() {
        let t = raid1(3);
        assert_eq!(recovery_targets(&t, 0, 1), vec![0, 2]);
        let r6 = Topology::new_normal(
            crate::VolumeId(1),
            crate::Layout::raid6(2).unwrap(),
            65536,
            crate::topology::tests::disks(4),
        )
        .unwrap();
        assert_eq!(recovery_targets(&r6, 0, 1), vec![0, 1, 2, 3]);
    }
}
