//! The in-RAM state a TOMA keeps per volume member on its disk: the chunk lock table
//! ([`LockTable`]) and the per-peer dirty bitmaps ([`DirtyBitmap`]) — DESIGN §3.
//!
//! Both are used from many tokio tasks at once. They use short `parking_lot` critical
//! sections (sharded for the lock table) or atomics (the bitmap), never block on I/O, and
//! never hold a guard across an `.await` (no guard escapes a method), so calling them
//! directly from async code is fine.
//!
//! A *unit* is the lock/dirty-bit unit of the volume: a chunk (RAID1) or a stripe (RAID6),
//! counted from 0 within the member's extent.

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use parking_lot::{Mutex, RwLock};
use thiserror::Error;
use toma_core::MemberIdx;

/// A datapath client, named by the UUID it registers with (`toma_wire::ClientId` is the
/// same `u128`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClientId(pub u128);

impl fmt::Display for ClientId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "client {}", toma_core::VolumeId(self.0))
    }
}

/// Errors of the lock/dirty-bit layer; the server maps them to protocol errors.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum StateError {
    #[error("unit {unit} is locked by {holder}")]
    HeldByOther { unit: u64, holder: ClientId },
    #[error("unit {unit} is not locked by {client}")]
    NotHeld { unit: u64, client: ClientId },
    #[error("{client} is fenced by this TOMA: re-register before any further request")]
    Fenced { client: ClientId },
    #[error("unit {unit} is out of range: this member has {units} units")]
    UnitOutOfRange { unit: u64, units: u64 },
    #[error("member {target} is out of range: the volume has {members} members")]
    TargetOutOfRange { target: MemberIdx, members: usize },
}

const SHARDS: usize = 16;

/// The chunk lock table of one volume member: unit → holder, plus the fenced clients.
///
/// Fencing is atomic with respect to locking: once [`fence`](Self::fence) returns, no lock
/// can be granted to that client any more (a concurrent `lock` either finished before, and
/// shows up in [`locks_of`](Self::locks_of), or fails with [`StateError::Fenced`]).
#[derive(Debug)]
pub struct LockTable {
    /// Grows with the member's extent (volume expansion), never shrinks.
    units: AtomicU64,
    shards: Vec<Mutex<HashMap<u64, ClientId>>>,
    fenced: RwLock<HashSet<ClientId>>,
    /// RAID6 write intents (`INTENT`) by unit, each of the unit's current holder. Dropped
    /// whenever the unit's lock is granted anew, released or cleared, so an intent never
    /// outlives the lock it was sent under. Taken after a shard's lock, never before.
    intents: Mutex<HashMap<u64, Intent>>,
}

/// What a RAID6 writer will leave in a stripe's columns (see `toma_wire::Message::Intent`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Intent {
    pub client: ClientId,
    /// The first column (byte within each chunk).
    pub column: u32,
    /// The k data chunks' columns, chunk after chunk.
    pub data: bytes::Bytes,
}

impl LockTable {
    pub fn new(units: u64) -> Self {
        LockTable {
            units: AtomicU64::new(units),
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            fenced: RwLock::new(HashSet::new()),
            intents: Mutex::new(HashMap::new()),
        }
    }

    pub fn units(&self) -> u64 {
        self.units.load(Ordering::Acquire)
    }

    /// Lets the table hold `units` units (no-op if it holds that many already).
    pub fn grow(&self, units: u64) {
        self.units.fetch_max(units, Ordering::AcqRel);
    }

    fn shard(&self, unit: u64) -> &Mutex<HashMap<u64, ClientId>> {
        &self.shards[(unit % SHARDS as u64) as usize]
    }

    fn check_unit(&self, unit: u64) -> Result<(), StateError> {
        let units = self.units();
        if unit >= units {
            return Err(StateError::UnitOutOfRange { unit, units });
        }
        Ok(())
    }

    /// Refuses a fenced client; call it before serving any request of `client`.
    pub fn check_client(&self, client: ClientId) -> Result<(), StateError> {
        if self.fenced.read().contains(&client) {
            return Err(StateError::Fenced { client });
        }
        Ok(())
    }

    /// Takes the lock of `unit` for `client`. Re-locking a unit it already holds succeeds
    /// (a retried request, or re-assertion after a TOMA restart).
    pub fn lock(&self, unit: u64, client: ClientId) -> Result<(), StateError> {
        self.check_unit(unit)?;
        let fenced = self.fenced.read();
        if fenced.contains(&client) {
            return Err(StateError::Fenced { client });
        }
        let mut shard = self.shard(unit).lock();
        match shard.get(&unit) {
            Some(&holder) if holder != client => Err(StateError::HeldByOther { unit, holder }),
            Some(_) => Ok(()),
            None => {
                shard.insert(unit, client);
                self.intents.lock().remove(&unit);
                Ok(())
            }
        }
    }

    /// Records `client`'s write intent for `unit`, which it must hold (`INTENT`); replaces
    /// the one it sent before.
    pub fn set_intent(&self, unit: u64, intent: Intent) -> Result<(), StateError> {
        self.check_unit(unit)?;
        self.check_client(intent.client)?;
        let shard = self.shard(unit).lock();
        if shard.get(&unit) != Some(&intent.client) {
            return Err(StateError::NotHeld {
                unit,
                client: intent.client,
            });
        }
        self.intents.lock().insert(unit, intent);
        Ok(())
    }

    /// `client`'s write intent for `unit`, while it still holds the unit (recovery).
    pub fn intent(&self, unit: u64, client: ClientId) -> Option<Intent> {
        let shard = self.shard(unit).lock();
        if shard.get(&unit) != Some(&client) {
            return None;
        }
        self.intents
            .lock()
            .get(&unit)
            .filter(|i| i.client == client)
            .cloned()
    }

    /// Releases `client`'s lock of `unit`.
    pub fn unlock(&self, unit: u64, client: ClientId) -> Result<(), StateError> {
        self.check_unit(unit)?;
        self.check_client(client)?;
        if self.release_if_held_by(unit, client) {
            Ok(())
        } else {
            Err(StateError::NotHeld { unit, client })
        }
    }

    /// Releases `unit` whoever holds it (stale-lock recovery, after fencing). Returns the
    /// former holder.
    pub fn force_unlock(&self, unit: u64) -> Option<ClientId> {
        let mut shard = self.shard(unit).lock();
        self.intents.lock().remove(&unit);
        shard.remove(&unit)
    }

    /// Releases `unit` if `client` holds it (`RELEASE_LOCK`: a peer's stale-lock recovery
    /// is done); one step, so a lock taken over meanwhile ([`LockTable::take_over`]) stays.
    pub fn release_if_held_by(&self, unit: u64, client: ClientId) -> bool {
        let mut shard = self.shard(unit).lock();
        if shard.get(&unit) != Some(&client) {
            return false;
        }
        self.intents.lock().remove(&unit);
        shard.remove(&unit);
        true
    }

    /// Hands `from`'s lock of `unit` to `to` (stale-lock recovery done by this member for a
    /// fenced client: a peer's `RELEASE_LOCK` of `from` no longer frees it while the
    /// recovery runs). Returns `from`'s write intent, which recovery rolls forward; `None`
    /// when `from` does not hold the unit.
    pub fn take_over(&self, unit: u64, from: ClientId, to: ClientId) -> Option<Option<Intent>> {
        let mut shard = self.shard(unit).lock();
        if shard.get(&unit) != Some(&from) {
            return None;
        }
        shard.insert(unit, to);
        let mut intents = self.intents.lock();
        let intent = intents.get(&unit).filter(|i| i.client == from).cloned();
        intents.remove(&unit);
        Some(intent)
    }

    pub fn holder(&self, unit: u64) -> Option<ClientId> {
        self.shard(unit).lock().get(&unit).copied()
    }

    /// The piggybacked test of `READ_TEST_LOCK`: is `unit` locked by someone other than
    /// `reader`? (A reader may read a unit it holds itself.)
    pub fn held_by_other(&self, unit: u64, reader: ClientId) -> Option<ClientId> {
        self.holder(unit).filter(|h| *h != reader)
    }

    /// Every held lock, sorted by unit.
    pub fn locks(&self) -> Vec<(u64, ClientId)> {
        let mut all: Vec<(u64, ClientId)> = self
            .shards
            .iter()
            .flat_map(|s| s.lock().iter().map(|(u, c)| (*u, *c)).collect::<Vec<_>>())
            .collect();
        all.sort();
        all
    }

    /// The held locks with `units.start <= unit < units.end`, sorted (`GET_LOCKS`).
    pub fn locks_in(&self, units: std::ops::Range<u64>) -> Vec<(u64, ClientId)> {
        let mut v: Vec<(u64, ClientId)> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .iter()
                    .filter(|(u, _)| units.contains(u))
                    .map(|(u, c)| (*u, *c))
                    .collect::<Vec<_>>()
            })
            .collect();
        v.sort();
        v
    }

    /// Installs a lock copied from another member (`PUT_LOCKS`, RAM → RAM during rebuild).
    /// Unlike [`lock`](Self::lock) it ignores fences (the copy reflects the lock member's
    /// table); it still refuses a unit held by a different client.
    pub fn install(&self, unit: u64, client: ClientId) -> Result<(), StateError> {
        self.check_unit(unit)?;
        let mut shard = self.shard(unit).lock();
        match shard.get(&unit) {
            Some(&holder) if holder != client => Err(StateError::HeldByOther { unit, holder }),
            Some(_) => Ok(()),
            None => {
                shard.insert(unit, client);
                self.intents.lock().remove(&unit);
                Ok(())
            }
        }
    }

    /// The units `client` holds, sorted (stale-lock recovery).
    pub fn locks_of(&self, client: ClientId) -> Vec<u64> {
        let mut units: Vec<u64> = self
            .shards
            .iter()
            .flat_map(|s| {
                s.lock()
                    .iter()
                    .filter(|(_, c)| **c == client)
                    .map(|(u, _)| *u)
                    .collect::<Vec<_>>()
            })
            .collect();
        units.sort();
        units
    }

    /// From now on every request of `client` is refused. Its locks stay (recovery copies
    /// the chunks, then [`force_unlock`](Self::force_unlock)s them).
    pub fn fence(&self, client: ClientId) {
        self.fenced.write().insert(client);
    }

    /// Lifts the fence (the client re-registered with a fresh identity or was recovered).
    pub fn unfence(&self, client: ClientId) {
        self.fenced.write().remove(&client);
    }

    pub fn is_fenced(&self, client: ClientId) -> bool {
        self.fenced.read().contains(&client)
    }

    pub fn fenced(&self) -> Vec<ClientId> {
        let mut v: Vec<ClientId> = self.fenced.read().iter().copied().collect();
        v.sort();
        v
    }

    /// Drops every lock (Rebuild-init clears a member's locks). Fences stay.
    pub fn clear(&self) {
        for s in &self.shards {
            let mut shard = s.lock();
            self.intents.lock().retain(|u, _| !shard.contains_key(u));
            shard.clear();
        }
    }
}

/// The persistence seam for dirty bits (DESIGN §7, DRBD's activity log).
///
/// The bitmap calls [`before_set`](Self::before_set) *before* a bit goes from clean to
/// dirty and returns only after it succeeded; a persistent implementation makes sure the
/// unit's region is in its on-disk activity log (writing a log transaction when the region
/// is not already "hot"), so that after a crash "every bit set in the persisted bitmap, plus
/// every region in the log" covers every dirty unit. [`after_clear`](Self::after_clear) is a
/// hint that a region may cool down. [`NoLog`] keeps bits in RAM only (the slides'
/// behaviour); the on-disk implementation is future work.
pub trait ActivityLog: Send + Sync + fmt::Debug {
    fn before_set(&self, target: MemberIdx, unit: u64) -> Result<(), StateError>;
    fn after_clear(&self, target: MemberIdx, unit: u64) {
        let _ = (target, unit);
    }
}

/// Dirty bits in RAM only.
#[derive(Debug, Default)]
pub struct NoLog;
impl ActivityLog for NoLog {
    fn before_set(&self, _: MemberIdx, _: u64) -> Result<(), StateError> {
        Ok(())
    }
}

/// A compact bitset of `len` bits with atomic set/clear and a maintained count. It can grow
/// (volume expansion): the words sit behind a read-write lock that only growth writes.
#[derive(Debug)]
struct AtomicBits {
    words: RwLock<Vec<AtomicU64>>,
    count: AtomicU64,
}

impl AtomicBits {
    fn new(len: u64) -> Self {
        AtomicBits {
            words: RwLock::new((0..len.div_ceil(64)).map(|_| AtomicU64::new(0)).collect()),
            count: AtomicU64::new(0),
        }
    }
    /// Holds at least `len` bits (new bits clear).
    fn grow(&self, len: u64) {
        let n = len.div_ceil(64) as usize;
        let mut w = self.words.write();
        while w.len() < n {
            w.push(AtomicU64::new(0));
        }
    }
    /// Word `wi`, if there is one.
    fn word(&self, wi: usize) -> Option<u64> {
        self.words.read().get(wi).map(|w| w.load(Ordering::Acquire))
    }
    /// Returns whether the bit changed.
    fn set(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        let old = self.words.read()[(i / 64) as usize].fetch_or(m, Ordering::AcqRel);
        let changed = old & m == 0;
        if changed {
            self.count.fetch_add(1, Ordering::AcqRel);
        }
        changed
    }
    fn clear(&self, i: u64) -> bool {
        let m = 1u64 << (i % 64);
        let old = self.words.read()[(i / 64) as usize].fetch_and(!m, Ordering::AcqRel);
        let changed = old & m != 0;
        if changed {
            self.count.fetch_sub(1, Ordering::AcqRel);
        }
        changed
    }
    fn get(&self, i: u64) -> bool {
        self.words.read()[(i / 64) as usize].load(Ordering::Acquire) & (1u64 << (i % 64)) != 0
    }
}

/// The dirty bits a holder member's TOMA keeps, one bitmap per *target* member (per-peer,
/// like DRBD): bit `u` of target `t` set means "unit `u` may be missing on member `t`".
///
/// `targets` arguments are bitmasks of member indexes (bit `t` = member `t`), so one call
/// marks a unit dirty for every DEAD member at once. Members are limited to 64.
#[derive(Debug)]
pub struct DirtyBitmap {
    /// Grows with the member's extent (volume expansion), never shrinks.
    units: AtomicU64,
    per_target: Vec<AtomicBits>,
    log: Arc<dyn ActivityLog>,
}

impl DirtyBitmap {
    /// All clean; `members` is the volume's member count, `units` the units per member.
    pub fn new(units: u64, members: usize) -> Self {
        Self::with_log(units, members, Arc::new(NoLog))
    }

    pub fn with_log(units: u64, members: usize, log: Arc<dyn ActivityLog>) -> Self {
        let members = members.min(64);
        DirtyBitmap {
            units: AtomicU64::new(units),
            per_target: (0..members).map(|_| AtomicBits::new(units)).collect(),
            log,
        }
    }

    pub fn units(&self) -> u64 {
        self.units.load(Ordering::Acquire)
    }

    /// Holds `units` units per target from now on (new units clean; no-op if it holds that
    /// many already). The words grow before the bound, so a unit below the bound always
    /// has its word.
    pub fn grow(&self, units: u64) {
        if units <= self.units() {
            return;
        }
        for b in &self.per_target {
            b.grow(units);
        }
        self.units.fetch_max(units, Ordering::AcqRel);
    }

    pub fn members(&self) -> usize {
        self.per_target.len()
    }

    fn check(&self, unit: u64, targets: u64) -> Result<(), StateError> {
        let units = self.units();
        if unit >= units {
            return Err(StateError::UnitOutOfRange { unit, units });
        }
        let members = self.per_target.len();
        if members < 64 && targets >> members != 0 {
            return Err(StateError::TargetOutOfRange {
                target: 63 - targets.leading_zeros() as usize,
                members,
            });
        }
        Ok(())
    }

    fn check_target(&self, target: MemberIdx) -> Result<&AtomicBits, StateError> {
        self.per_target
            .get(target)
            .ok_or(StateError::TargetOutOfRange {
                target,
                members: self.per_target.len(),
            })
    }

    fn targets(mask: u64) -> impl Iterator<Item = MemberIdx> {
        (0..64).filter(move |t| mask & (1u64 << t) != 0)
    }

    /// Marks `unit` dirty for every member in `targets` (must return before the write that
    /// caused it is acknowledged).
    pub fn set(&self, unit: u64, targets: u64) -> Result<(), StateError> {
        self.check(unit, targets)?;
        for t in Self::targets(targets) {
            let bits = &self.per_target[t];
            if !bits.get(unit) {
                self.log.before_set(t, unit)?;
            }
            bits.set(unit);
        }
        Ok(())
    }

    /// Marks `unit` clean for every member in `targets`.
    pub fn clear(&self, unit: u64, targets: u64) -> Result<(), StateError> {
        self.check(unit, targets)?;
        for t in Self::targets(targets) {
            if self.per_target[t].clear(unit) {
                self.log.after_clear(t, unit);
            }
        }
        Ok(())
    }

    pub fn is_dirty(&self, unit: u64, target: MemberIdx) -> bool {
        unit < self.units()
            && self
                .per_target
                .get(target)
                .is_some_and(|bits| bits.get(unit))
    }

    /// Every unit dirty for `target`: it is a NEW disk (Rebuild-init), a full rebuild.
    pub fn set_all(&self, target: MemberIdx) -> Result<(), StateError> {
        let bits = self.check_target(target)?;
        for unit in 0..self.units() {
            if !bits.get(unit) {
                self.log.before_set(target, unit)?;
                bits.set(unit);
            }
        }
        Ok(())
    }

    /// Every unit clean for `target` (e.g. a target member replaced by a NEW disk before
    /// [`set_all`](Self::set_all), or leaving the volume).
    pub fn clear_all(&self, target: MemberIdx) -> Result<(), StateError> {
        let bits = self.check_target(target)?;
        for unit in 0..self.units() {
            bits.clear(unit);
        }
        Ok(())
    }

    /// Number of units dirty for `target` (0 for an unknown target).
    pub fn count(&self, target: MemberIdx) -> u64 {
        self.per_target
            .get(target)
            .map_or(0, |b| b.count.load(Ordering::Acquire))
    }

    /// The units dirty for `target`, ascending. The iterator reads the live bitmap one
    /// 64-bit word at a time, so it sees concurrent changes made ahead of it; the rebuild
    /// loop (lock, copy, clear, unlock) is fine with that.
    pub fn iter_dirty(&self, target: MemberIdx) -> impl Iterator<Item = u64> + '_ {
        let bits = self.per_target.get(target);
        let units = self.units();
        let (mut wi, mut v) = (0usize, 0u64);
        std::iter::from_fn(move || loop {
            if v != 0 {
                let bit = v.trailing_zeros() as u64;
                v &= v - 1;
                return Some((wi as u64 - 1) * 64 + bit);
            }
            v = bits?.word(wi)?;
            wi += 1;
        })
        .filter(move |u| *u < units)
    }

    /// The bits of `target` for `units` (clamped to the member's units), LSB first within
    /// each byte: bit `i` is unit `units.start + i` (the `DIRTY` reply's format).
    pub fn bits_in(&self, target: MemberIdx, units: std::ops::Range<u64>) -> Vec<u8> {
        let end = units.end.min(self.units());
        let start = units.start.min(end);
        let mut out = vec![0u8; ((end - start) as usize).div_ceil(8)];
        if let Some(bits) = self.per_target.get(target) {
            for u in start..end {
                if bits.get(u) {
                    let i = (u - start) as usize;
                    out[i / 8] |= 1 << (i % 8);
                }
            }
        }
        out
    }

    /// A copy of `target`'s bitmap as 64-bit words (bit `u % 64` of word `u / 64`), for
    /// writing it to disk.
    pub fn export(&self, target: MemberIdx) -> Vec<u64> {
        self.per_target.get(target).map_or(Vec::new(), |b| {
            b.words
                .read()
                .iter()
                .map(|w| w.load(Ordering::Acquire))
                .collect()
        })
    }

    /// ORs words read back from disk (see [`export`](Self::export)) into `target`'s bitmap.
    pub fn import(&self, target: MemberIdx, words: &[u64]) -> Result<(), StateError> {
        let bits = self.check_target(target)?;
        for (wi, w) in words.iter().enumerate() {
            let mut v = *w;
            while v != 0 {
                let unit = wi as u64 * 64 + v.trailing_zeros() as u64;
                v &= v - 1;
                if unit < self.units() {
                    bits.set(unit);
                }
            }
        }
        Ok(())
    }
}

/// The RAM state of one volume member on this disk.
#[derive(Debug)]
pub struct MemberRuntime {
    pub locks: LockTable,
    pub dirty: DirtyBitmap,
}

impl MemberRuntime {
    /// Lets the locks and dirty bits cover `units` units (the member's extent grew).
    pub fn grow(&self, units: u64) {
        self.dirty.grow(units);
        self.locks.grow(units);
    }

    pub fn new(units: u64, members: usize) -> Self {
        MemberRuntime {
            locks: LockTable::new(units),
            dirty: DirtyBitmap::new(units, members),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: ClientId = ClientId(1);
    const B: ClientId = ClientId(2);

    fn intent(client: ClientId, byte: u8) -> Intent {
        Intent {
            client,
            column: 4096,
            data: bytes::Bytes::from(vec![byte; 8]),
        }
    }

    #[test]
    fn a_lock_taken_over_is_not_freed_by_a_release_of_its_former_holder() {
        let t = LockTable::new(4);
        assert!(t.take_over(1, A, B).is_none(), "nothing to take over");
        t.lock(1, A).unwrap();
        t.set_intent(1, intent(A, 7)).unwrap();
        let got = t.take_over(1, A, B).expect("A held it");
        assert_eq!(got.map(|i| i.data[0]), Some(7));
        assert_eq!(t.holder(1), Some(B));
        assert!(t.intent(1, A).is_none() && t.intent(1, B).is_none());
        // A peer's RELEASE_LOCK of A, late: B keeps it.
        assert!(!t.release_if_held_by(1, A));
        assert_eq!(t.holder(1), Some(B));
        assert!(t.release_if_held_by(1, B));
        assert_eq!(t.holder(1), None);
    }

    #[test]
    fn an_intent_lives_exactly_as_long_as_its_lock() {
        let t = LockTable::new(100);
        // Only the holder may send one.
        assert_eq!(
            t.set_intent(5, intent(A, 1)),
            Err(StateError::NotHeld { unit: 5, client: A })
        );
        t.lock(5, A).unwrap();
        t.set_intent(5, intent(A, 1)).unwrap();
        t.set_intent(5, intent(A, 2)).unwrap();
        assert_eq!(t.intent(5, A), Some(intent(A, 2)));
        assert_eq!(t.intent(5, B), None);
        // A retried LOCK by the holder keeps it; the unlock drops it.
        t.lock(5, A).unwrap();
        assert_eq!(t.intent(5, A), Some(intent(A, 2)));
        t.unlock(5, A).unwrap();
        t.lock(5, A).unwrap();
        assert_eq!(t.intent(5, A), None, "a new grant starts without an intent");
        // Recovery reads it while the fenced holder still holds the lock, then frees both.
        t.set_intent(5, intent(A, 3)).unwrap();
        t.fence(A);
        assert_eq!(t.intent(5, A), Some(intent(A, 3)));
        assert_eq!(
            t.set_intent(5, intent(A, 4)),
            Err(StateError::Fenced { client: A })
        );
        t.force_unlock(5);
        assert_eq!(t.intent(5, A), None);
        t.lock(6, B).unwrap();
        t.set_intent(6, intent(B, 5)).unwrap();
        t.clear();
        t.lock(6, B).unwrap();
        assert_eq!(
            t.intent(6, B),
            None,
            "Rebuild-init forgets intents with the locks"
        );
    }

    #[test]
    fn lock_unlock_and_piggyback_test() {
        let t = LockTable::new(100);
        t.lock(5, A).unwrap();
        t.lock(5, A).unwrap(); // idempotent
        assert_eq!(
            t.lock(5, B),
            Err(StateError::HeldByOther { unit: 5, holder: A })
        );
        assert_eq!(t.held_by_other(5, B), Some(A));
        assert_eq!(t.held_by_other(5, A), None);
        assert_eq!(t.held_by_other(6, B), None);
        assert_eq!(
            t.unlock(5, B),
            Err(StateError::NotHeld { unit: 5, client: B })
        );
        t.unlock(5, A).unwrap();
        assert_eq!(t.holder(5), None);
        t.lock(5, B).unwrap();
        assert!(matches!(
            t.lock(100, A),
            Err(StateError::UnitOutOfRange { .. })
        ));
    }

    #[test]
    fn fencing_and_recovery_helpers() {
        let t = LockTable::new(100);
        for u in [3, 17, 40] {
            t.lock(u, A).unwrap();
        }
        t.lock(4, B).unwrap();
        t.fence(A);
        assert!(t.is_fenced(A));
        assert_eq!(t.lock(50, A), Err(StateError::Fenced { client: A }));
        assert_eq!(t.unlock(3, A), Err(StateError::Fenced { client: A }));
        assert_eq!(t.check_client(A), Err(StateError::Fenced { client: A }));
        assert_eq!(t.locks_of(A), vec![3, 17, 40]);
        assert_eq!(t.locks(), vec![(3, A), (4, B), (17, A), (40, A)]);
        for u in t.locks_of(A) {
            assert_eq!(t.force_unlock(u), Some(A));
        }
        assert_eq!(t.locks(), vec![(4, B)]);
        assert_eq!(t.fenced(), vec![A]);
        assert_eq!(t.locks_in(0..10), vec![(4, B)]);
        t.install(60, A).unwrap(); // a copied lock ignores the fence
        assert!(matches!(
            t.install(4, A),
            Err(StateError::HeldByOther { .. })
        ));
        t.unfence(A);
        t.lock(50, A).unwrap();
        assert_eq!(t.locks_of(A), vec![50, 60]);
        t.clear();
        assert!(t.locks().is_empty());
    }

    #[test]
    fn concurrent_lockers_exclude_each_other() {
        let t = Arc::new(LockTable::new(8));
        let winners: Vec<_> = (0..4)
            .map(|c| {
                let t = t.clone();
                std::thread::spawn(move || {
                    (0..8)
                        .filter(|u| t.lock(*u, ClientId(c as u128)).is_ok())
                        .count()
                })
            })
            .collect();
        let total: usize = winners.into_iter().map(|h| h.join().unwrap()).sum();
        assert_eq!(total, 8, "each unit granted exactly once");
        assert_eq!(t.locks().len(), 8);
    }

    #[test]
    fn dirty_bits_per_target() {
        let d = DirtyBitmap::new(200, 3);
        d.set(7, 0b010).unwrap();
        d.set(130, 0b110).unwrap();
        d.set(130, 0b010).unwrap(); // already set: count unchanged
        assert_eq!(d.count(1), 2);
        assert_eq!(d.count(2), 1);
        assert_eq!(d.count(0), 0);
        assert_eq!(d.iter_dirty(1).collect::<Vec<_>>(), vec![7, 130]);
        assert_eq!(d.iter_dirty(2).collect::<Vec<_>>(), vec![130]);
        d.clear(130, 0b010).unwrap();
        assert!(!d.is_dirty(130, 1));
        assert!(d.is_dirty(130, 2));
        assert_eq!(d.count(1), 1);
        assert!(matches!(
            d.set(0, 0b1000),
            Err(StateError::TargetOutOfRange { target: 3, .. })
        ));
        assert!(matches!(
            d.set(200, 1),
            Err(StateError::UnitOutOfRange { .. })
        ));
        d.set_all(0).unwrap();
        assert_eq!(d.count(0), 200);
        assert_eq!(d.iter_dirty(0).count(), 200);
        assert_eq!(d.iter_dirty(0).last(), Some(199));
        let words = d.export(2);
        let e = DirtyBitmap::new(200, 3);
        e.import(2, &words).unwrap();
        assert_eq!(e.iter_dirty(2).collect::<Vec<_>>(), vec![130]);
        assert_eq!(e.count(2), 1);
        assert_eq!(d.bits_in(1, 0..16), vec![0b1000_0000, 0]);
        assert_eq!(d.bits_in(2, 128..300), {
            let mut v = vec![0u8; 9];
            v[0] = 0b100;
            v
        });
        d.clear_all(0).unwrap();
        assert_eq!(d.count(0), 0);
    }

    #[derive(Debug, Default)]
    struct CountingLog(Mutex<Vec<(MemberIdx, u64)>>);
    impl ActivityLog for CountingLog {
        fn before_set(&self, t: MemberIdx, u: u64) -> Result<(), StateError> {
            self.0.lock().push((t, u));
            Ok(())
        }
    }

    #[test]
    fn activity_log_sees_clean_to_dirty_transitions_only() {
        let log = Arc::new(CountingLog::default());
        let d = DirtyBitmap::with_log(10, 2, log.clone());
        d.set(3, 0b11).unwrap();
        d.set(3, 0b11).unwrap();
        assert_eq!(*log.0.lock(), vec![(0, 3), (1, 3)]);
    }

    #[test]
    fn growing_keeps_every_lock_and_dirty_bit_and_adds_clean_units() {
        let rt = MemberRuntime::new(100, 2);
        rt.locks.lock(99, A).unwrap();
        rt.dirty.set(99, 0b10).unwrap();
        rt.dirty.set(3, 0b01).unwrap();
        assert!(matches!(
            rt.locks.lock(100, A),
            Err(StateError::UnitOutOfRange {
                unit: 100,
                units: 100
            })
        ));
        assert!(rt.dirty.set(150, 0b01).is_err());
        rt.grow(300);
        rt.grow(200); // never shrinks
        assert_eq!((rt.locks.units(), rt.dirty.units()), (300, 300));
        assert_eq!(rt.locks.holder(99), Some(A));
        assert!(rt.dirty.is_dirty(99, 1) && rt.dirty.is_dirty(3, 0));
        assert_eq!(rt.dirty.count(0) + rt.dirty.count(1), 2);
        assert!((100..300).all(|u| !rt.dirty.is_dirty(u, 0) && !rt.dirty.is_dirty(u, 1)));
        rt.locks.lock(299, B).unwrap();
        rt.dirty.set(299, 0b01).unwrap();
        assert_eq!(rt.dirty.iter_dirty(0).collect::<Vec<_>>(), vec![3, 299]);
        rt.dirty.set_all(1).unwrap();
        assert_eq!(rt.dirty.count(1), 300);
    }
}
