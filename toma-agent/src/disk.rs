//! [`Disk`]: one opened Toma disk — its device, its superblock (extent table) and the RAM
//! state of the volume members it holds.
//!
//! Extent operations write the superblock (two copies, flushed) **before** they return, so
//! an extent is on disk before anyone uses it. They block on I/O: from tokio, call them in
//! `spawn_blocking`. The RAM-state accessors ([`Disk::member`]) never block on I/O.

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;

use parking_lot::Mutex;
use toma_core::{DiskId, Generation, MemberIdx, VolumeId};

use bytes::Bytes;
use toma_io::{AlignedBuf, Ring};

use crate::device::{check_io, BlockDevice, DeviceError};
use crate::state::MemberRuntime;
use crate::superblock::{
    self, ClusterId, Extent, MemberState, Overwrite, Superblock, SuperblockError, MAX_EXTENTS,
};

/// An opened Toma disk. Share it as `Arc<Disk>`.
#[derive(Debug)]
pub struct Disk {
    dev: Arc<dyn BlockDevice>,
    /// Held across superblock writes, so updates are serialised and the in-RAM copy always
    /// equals what is on disk (or what the failed write tried to put there).
    sb: Mutex<Superblock>,
    members: Mutex<HashMap<(VolumeId, MemberIdx), Arc<MemberRuntime>>>,
    /// Held by allocation and by the whole of a growth (zeroing included), so that free
    /// space a growth is zeroing is never allocated to someone else meanwhile.
    alloc: Mutex<()>,
    /// Members whose data may miss acknowledged writes: the disk lost power since its last
    /// flush (see [`superblock::open_on`]). Each stays here until the leader has it rebuilt
    /// in full (or chooses it as the only copy left).
    lost_writes: Mutex<BTreeSet<(VolumeId, MemberIdx)>>,
    /// `true` once [`detach`](Self::detach)ed. Every data write holds it shared, so a detach
    /// (which takes it exclusively) waits for the writes in flight and no write lands after
    /// the final flush.
    detached: parking_lot::RwLock<bool>,
    /// Data writes in flight through the ring (they cannot hold `detached` across their
    /// wait); a detach waits for this to drop to zero.
    ring_writes: Mutex<u64>,
    ring_writes_done: parking_lot::Condvar,
    /// The `io_uring` instance for this disk's data I/O, made on first use (see
    /// [`Disk::read_member_io`]); `Off` where the kernel or the operator refuses it.
    ring: Mutex<RingState>,
}

#[derive(Debug)]
enum RingState {
    Unset,
    On(Arc<Ring>),
    Off,
}

/// `TOMA_IO=threads` makes every agent of the process do data I/O on tokio's blocking
/// threads instead of `io_uring` (for comparison, or a kernel whose `io_uring` misbehaves).
pub const IO_ENV: &str = "TOMA_IO";

/// Counts one ring write in flight; a detach waits until every one is dropped.
struct RingWrite<'a>(&'a Disk);

impl Drop for RingWrite<'_> {
    fn drop(&mut self) {
        let mut n = self.0.ring_writes.lock();
        *n -= 1;
        if *n == 0 {
            self.0.ring_writes_done.notify_all();
        }
    }
}

impl Disk {
    /// Opens a formatted disk of `cluster` (bumps its boot counter). See [`superblock::open`].
    pub fn open(dev: Arc<dyn BlockDevice>, cluster: ClusterId) -> Result<Disk, SuperblockError> {
        Self::open_on(dev, cluster, 0)
    }

    /// Opens a formatted disk of `cluster` on a host whose current boot is `host` (0: boots
    /// are not tracked). See [`superblock::open_on`] and [`Disk::lost_writes`].
    pub fn open_on(
        dev: Arc<dyn BlockDevice>,
        cluster: ClusterId,
        host: u128,
    ) -> Result<Disk, SuperblockError> {
        let (sb, lost_power) = superblock::open_on(dev.as_ref(), cluster, host)?;
        let lost: BTreeSet<(VolumeId, MemberIdx)> = if lost_power {
            sb.extents
                .iter()
                .filter(|e| e.state != MemberState::Free)
                .map(|e| (e.volume, e.member))
                .collect()
        } else {
            BTreeSet::new()
        };
        let d = Self::from_parts(dev, sb);
        *d.lost_writes.lock() = lost;
        Ok(d)
    }

    /// Formats `dev` (see [`superblock::format`]) and opens it.
    pub fn format(
        dev: Arc<dyn BlockDevice>,
        id: DiskId,
        cluster: ClusterId,
        overwrite: &Overwrite,
    ) -> Result<Disk, SuperblockError> {
        Self::format_on(dev, id, cluster, overwrite, 0)
    }

    /// Formats `dev` and opens it on a host whose current boot is `host`.
    pub fn format_on(
        dev: Arc<dyn BlockDevice>,
        id: DiskId,
        cluster: ClusterId,
        overwrite: &Overwrite,
        host: u128,
    ) -> Result<Disk, SuperblockError> {
        superblock::format(dev.as_ref(), id, cluster, overwrite)?;
        Self::open_on(dev, cluster, host)
    }

    fn from_parts(dev: Arc<dyn BlockDevice>, sb: Superblock) -> Disk {
        Disk {
            dev,
            sb: Mutex::new(sb),
            members: Mutex::new(HashMap::new()),
            alloc: Mutex::new(()),
            lost_writes: Mutex::new(BTreeSet::new()),
            detached: parking_lot::RwLock::new(false),
            ring_writes: Mutex::new(0),
            ring_writes_done: parking_lot::Condvar::new(),
            ring: Mutex::new(RingState::Unset),
        }
    }

    /// Whether `volume`'s member `member` here may miss writes it acknowledged (the disk
    /// lost power since its last flush), and so must not serve I/O until it is rebuilt.
    pub fn lost_writes(&self, volume: VolumeId, member: MemberIdx) -> bool {
        self.lost_writes.lock().contains(&(volume, member))
    }

    /// The leader has taken the lost writes into account (a full rebuild is planned, or
    /// this is the only copy left): the member may serve again.
    pub fn settle_lost_writes(&self, volume: VolumeId, member: MemberIdx) -> bool {
        self.lost_writes.lock().remove(&(volume, member))
    }

    /// Held across a data write: refuses it once the disk is detached, and keeps a detach
    /// waiting until it is done.
    fn write_gate(&self) -> Result<parking_lot::RwLockReadGuard<'_, bool>, SuperblockError> {
        let gate = self.detached.read();
        if *gate {
            return Err(SuperblockError::Detached {
                device: self.name().to_string(),
            });
        }
        Ok(gate)
    }

    /// Clean detach (orderly shutdown): waits for the data writes in flight, refuses every
    /// later one, flushes, then records that no host holds the disk, so the next open (after
    /// a reboot, or on another host) trusts its contents. Idempotent.
    pub fn detach(&self) -> Result<(), SuperblockError> {
        let mut gate = self.detached.write();
        if *gate {
            return Ok(());
        }
        *gate = true;
        drop(gate);
        let mut n = self.ring_writes.lock();
        while *n > 0 {
            self.ring_writes_done.wait(&mut n);
        }
        drop(n);
        let mut sb = self.sb.lock();
        superblock::detach(self.dev.as_ref(), &mut sb)
    }

    pub fn id(&self) -> DiskId {
        self.sb.lock().disk
    }

    pub fn cluster(&self) -> ClusterId {
        self.sb.lock().cluster
    }

    /// How many times an agent has opened this disk (this open included).
    pub fn boot_counter(&self) -> u64 {
        self.sb.lock().boot_counter
    }

    /// The device, for data I/O at `extent.offset + …` (bounds are the caller's job: check
    /// against the member's [`Extent`]).
    pub fn device(&self) -> &Arc<dyn BlockDevice> {
        &self.dev
    }

    /// Whether the device is in memory (I/O inline, see [`BlockDevice::in_memory`]).
    pub fn in_memory(&self) -> bool {
        self.dev.in_memory()
    }

    /// The device name (its path) for messages.
    pub fn name(&self) -> &str {
        self.dev.name()
    }

    pub fn size(&self) -> u64 {
        self.dev.size()
    }

    /// A copy of the in-RAM superblock.
    pub fn superblock(&self) -> Superblock {
        self.sb.lock().clone()
    }

    /// Every extent, by offset.
    pub fn extents(&self) -> Vec<Extent> {
        let mut v = self.sb.lock().extents.clone();
        v.sort_by_key(|e| e.offset);
        v
    }

    pub fn extent(&self, volume: VolumeId, member: MemberIdx) -> Option<Extent> {
        self.sb.lock().extent(volume, member).copied()
    }

    /// Checks that `len` bytes at `offset` (relative to the member's extent) lie inside it
    /// and returns the absolute disk offset.
    fn member_offset(
        &self,
        volume: VolumeId,
        member: MemberIdx,
        offset: u64,
        len: usize,
    ) -> Result<u64, SuperblockError> {
        let device = || self.dev.name().to_string();
        let e = self
            .extent(volume, member)
            .ok_or_else(|| SuperblockError::NoSuchExtent {
                device: device(),
                volume,
                member,
            })?;
        match offset.checked_add(len as u64) {
            Some(end) if end <= e.length => Ok(e.offset + offset),
            _ => Err(SuperblockError::OutsideExtent {
                device: device(),
                volume,
                member,
                offset,
                len,
                length: e.length,
            }),
        }
    }

    /// Reads `buf.len()` bytes at `offset` *within* the member's extent (both multiples of
    /// 4096). Refuses anything outside the extent. Blocking.
    pub fn read_member(
        &self,
        volume: VolumeId,
        member: MemberIdx,
        offset: u64,
        buf: &mut [u8],
    ) -> Result<(), SuperblockError> {
        let at = self.member_offset(volume, member, offset, buf.len())?;
        Ok(self.dev.read_at(buf, at)?)
    }

    /// Writes `buf` at `offset` *within* the member's extent (both multiples of 4096).
    /// Refuses anything outside the extent. Not durable until [`flush`](Self::flush). Blocking.
    pub fn write_member(
        &self,
        volume: VolumeId,
        member: MemberIdx,
        offset: u64,
        buf: &[u8],
    ) -> Result<(), SuperblockError> {
        let at = self.member_offset(volume, member, offset, buf.len())?;
        let _gate = self.write_gate()?;
        Ok(self.dev.write_at(buf, at)?)
    }

    /// This disk's ring, made on first use; `None` for in-memory devices, devices without
    /// a file, with `TOMA_IO=threads`, or where `io_uring` cannot be set up (logged once).
    fn ring(&self) -> Option<Arc<Ring>> {
        if self.dev.in_memory() || self.dev.file().is_none() {
            return None;
        }
        let mut r = self.ring.lock();
        match &*r {
            RingState::On(ring) if ring.alive() => return Some(ring.clone()),
            RingState::Off => return None,
            // Unset, or its runtime shut down (an agent restarted in-process): a new one.
            _ => {}
        }
        if std::env::var(IO_ENV).is_ok_and(|v| v == "threads") {
            *r = RingState::Off;
            return None;
        }
        match Ring::new() {
            Ok(ring) => {
                let ring = Arc::new(ring);
                *r = RingState::On(ring.clone());
                Some(ring)
            }
            Err(e) => {
                tracing::warn!(disk = %self.name(), error = %e, "io_uring unavailable; data I/O runs on blocking threads");
                *r = RingState::Off;
                None
            }
        }
    }

    /// Whether data I/O from async code ([`read_member_io`](Self::read_member_io)) goes
    /// through `io_uring` (making the ring now, if it was not made yet: call it on the
    /// runtime that serves this disk).
    pub fn uses_ring(&self) -> bool {
        self.ring().is_some()
    }

    /// Data I/O from async code goes to blocking threads from now on, not `io_uring` (what
    /// `TOMA_IO=threads` does for every disk; requests already in the ring finish there).
    pub fn use_blocking_io(&self) {
        *self.ring.lock() = RingState::Off;
    }

    /// [`read_member`](Self::read_member) of `len` bytes into a new aligned buffer, from
    /// async code: through `io_uring` for a file, inline for an in-memory device, on a
    /// blocking thread otherwise.
    pub async fn read_member_io(
        self: &Arc<Self>,
        volume: VolumeId,
        member: MemberIdx,
        offset: u64,
        len: usize,
    ) -> Result<AlignedBuf, SuperblockError> {
        let Some(ring) = self.ring() else {
            let read = {
                let d = self.clone();
                move || {
                    let mut buf = AlignedBuf::zeroed(len);
                    d.read_member(volume, member, offset, &mut buf).map(|_| buf)
                }
            };
            return self.blocking(read).await;
        };
        let at = self.member_offset(volume, member, offset, len)?;
        check_io(self.dev.as_ref(), "read", at, len)?;
        let file = self
            .dev
            .file()
            .ok_or_else(|| self.io_failed("read", at, "no file"))?;
        ring.read_at(&file, AlignedBuf::zeroed(len), at)
            .await
            .map_err(|e| self.device_err("read", at, e))
    }

    /// [`write_member`](Self::write_member) from async code, like
    /// [`read_member_io`](Self::read_member_io).
    pub async fn write_member_io(
        self: &Arc<Self>,
        volume: VolumeId,
        member: MemberIdx,
        offset: u64,
        data: Bytes,
    ) -> Result<(), SuperblockError> {
        let Some(ring) = self.ring() else {
            let d = self.clone();
            return self
                .blocking(move || d.write_member(volume, member, offset, &data))
                .await;
        };
        let at = self.member_offset(volume, member, offset, data.len())?;
        check_io(self.dev.as_ref(), "write", at, data.len())?;
        let file = self
            .dev
            .file()
            .ok_or_else(|| self.io_failed("write", at, "no file"))?;
        let _counted = {
            let _gate = self.write_gate()?;
            *self.ring_writes.lock() += 1;
            RingWrite(self)
        };
        ring.write_at(&file, AlignedBuf::from_bytes(data), at)
            .await
            .map_err(|e| self.device_err("write", at, e))
    }

    /// Runs blocking disk work: inline for an in-memory device, else on a blocking thread.
    async fn blocking<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T, SuperblockError> + Send + 'static,
    ) -> Result<T, SuperblockError> {
        if self.dev.in_memory() {
            return f();
        }
        tokio::task::spawn_blocking(f)
            .await
            .map_err(|e| self.io_failed("I/O", 0, &e.to_string()))?
    }

    fn device_err(&self, op: &'static str, offset: u64, source: std::io::Error) -> SuperblockError {
        SuperblockError::Device(DeviceError::Io {
            device: self.name().to_string(),
            op,
            offset,
            source,
        })
    }

    fn io_failed(&self, op: &'static str, offset: u64, why: &str) -> SuperblockError {
        self.device_err(op, offset, std::io::Error::other(why.to_string()))
    }

    /// Makes every completed write to this disk durable. Blocking.
    pub fn flush(&self) -> Result<(), SuperblockError> {
        Ok(self.dev.flush()?)
    }

    /// Applies `change` to a copy of the superblock, persists it, then makes it current.
    fn update<T>(
        &self,
        change: impl FnOnce(&mut Superblock) -> Result<T, SuperblockError>,
    ) -> Result<T, SuperblockError> {
        let mut cur = self.sb.lock();
        let mut next = cur.clone();
        let out = change(&mut next)?;
        let res = superblock::write(self.dev.as_ref(), &mut next);
        // Keep the sequence number moving even on failure (see superblock::write).
        cur.seq = next.seq;
        res?;
        *cur = next;
        Ok(out)
    }

    /// Allocates `length` bytes (rounded up to 1 MiB), first fit, for `volume`'s member
    /// `member`, in state [`MemberState::Free`] at `generation`. Persisted before it returns.
    pub fn allocate_extent(
        &self,
        volume: VolumeId,
        member: MemberIdx,
        length: u64,
        generation: Generation,
    ) -> Result<Extent, SuperblockError> {
        let device = self.dev.name().to_string();
        let size = self.dev.size();
        let _alloc = self.alloc.lock();
        self.update(|sb| {
            if let Some(e) = sb.extent(volume, member) {
                return Err(SuperblockError::AlreadyAllocated {
                    device,
                    volume,
                    member,
                    offset: e.offset,
                });
            }
            if length == 0 {
                return Err(SuperblockError::ZeroLength {
                    device,
                    volume,
                    member,
                });
            }
            if sb.extents.len() >= MAX_EXTENTS {
                return Err(SuperblockError::TooManyExtents { device });
            }
            let no_space = || SuperblockError::NoSpace {
                device: device.clone(),
                volume,
                member,
                length,
            };
            let length = length
                .checked_next_multiple_of(superblock::EXTENT_ALIGN)
                .ok_or_else(no_space)?;
            let offset = sb.find_free(length, size).ok_or_else(no_space)?;
            let e = Extent {
                volume,
                member,
                offset,
                length,
                generation,
                state: MemberState::Free,
            };
            sb.extents.push(e);
            Ok(e)
        })
    }

    /// Grows `volume`'s member `member` in place to `length` bytes (rounded up to 1 MiB):
    /// the space right after its extent must be free. The new part is written with zeros
    /// and flushed *before* the longer extent is recorded (persisted), so that it reads as
    /// zeros whatever the disk held there; the bytes below the old length are not touched.
    /// A length at or below the current one changes nothing. On refusal nothing changes
    /// (a failed zeroing only wrote zeros to free space). Blocking; may take a while (it
    /// writes the whole new part).
    pub fn grow_extent(
        &self,
        volume: VolumeId,
        member: MemberIdx,
        length: u64,
    ) -> Result<Extent, SuperblockError> {
        let device = self.dev.name().to_string();
        let size = self.dev.size();
        let _alloc = self.alloc.lock();
        let e = self
            .extent(volume, member)
            .ok_or_else(|| SuperblockError::NoSuchExtent {
                device: device.clone(),
                volume,
                member,
            })?;
        let refuse = |why: String| SuperblockError::CannotGrow {
            device: device.clone(),
            volume,
            member,
            from: e.length,
            to: length,
            why,
        };
        let length = length
            .checked_next_multiple_of(superblock::EXTENT_ALIGN)
            .ok_or_else(|| refuse("the length overflows".into()))?;
        if length <= e.length {
            return Ok(e);
        }
        let end = e.offset + length;
        let limit = size - size % superblock::EXTENT_ALIGN;
        if end > limit {
            return Err(refuse(format!(
                "it would end at byte {end}, past the disk's usable end {limit}"
            )));
        }
        // Extents only change under `alloc` (allocation, growth) or shrink away (free), so
        // what is free now stays free until this growth is recorded.
        if let Some(next) = self
            .extents()
            .into_iter()
            .find(|x| x.offset < end && x.end() > e.end())
        {
            return Err(refuse(format!(
                "volume {} member {} holds {}..{} right after it (relocation is not supported)",
                next.volume,
                next.member,
                next.offset,
                next.end()
            )));
        }
        let zeros = vec![0u8; superblock::EXTENT_ALIGN as usize];
        let _gate = self.write_gate()?;
        let mut at = e.end();
        while at < end {
            self.dev.write_at(&zeros, at)?;
            at += superblock::EXTENT_ALIGN;
        }
        self.dev.flush()?;
        self.update(|sb| {
            let x = sb
                .extents
                .iter_mut()
                .find(|x| x.volume == volume && x.member == member)
                .ok_or(SuperblockError::NoSuchExtent {
                    device: device.clone(),
                    volume,
                    member,
                })?;
            x.length = length;
            Ok(*x)
        })
    }

    /// Removes `volume`'s member `member` from this disk (persisted) and drops its RAM state.
    pub fn free_extent(
        &self,
        volume: VolumeId,
        member: MemberIdx,
    ) -> Result<Extent, SuperblockError> {
        let device = self.dev.name().to_string();
        let e = self.update(|sb| {
            let i = sb
                .extents
                .iter()
                .position(|e| e.volume == volume && e.member == member)
                .ok_or(SuperblockError::NoSuchExtent {
                    device,
                    volume,
                    member,
                })?;
            Ok(sb.extents.remove(i))
        })?;
        self.members.lock().remove(&(volume, member));
        Ok(e)
    }

    /// Records the member's generation and state (persisted). Writes nothing if unchanged.
    pub fn update_extent(
        &self,
        volume: VolumeId,
        member: MemberIdx,
        generation: Generation,
        state: MemberState,
    ) -> Result<Extent, SuperblockError> {
        if let Some(e) = self.extent(volume, member) {
            if e.generation == generation && e.state == state {
                return Ok(e);
            }
        }
        let device = self.dev.name().to_string();
        self.update(|sb| {
            let e = sb
                .extents
                .iter_mut()
                .find(|e| e.volume == volume && e.member == member)
                .ok_or(SuperblockError::NoSuchExtent {
                    device,
                    volume,
                    member,
                })?;
            e.generation = generation;
            e.state = state;
            Ok(*e)
        })
    }

    /// The RAM state (locks, dirty bits) of `volume`'s member `member`, created on first use
    /// with `units` lock units and one dirty bitmap per each of the volume's `members`.
    /// Returns `None` if this disk holds no extent for that member.
    pub fn member(
        &self,
        volume: VolumeId,
        member: MemberIdx,
        units: u64,
        members: usize,
    ) -> Option<Arc<MemberRuntime>> {
        self.extent(volume, member)?;
        let mut map = self.members.lock();
        Some(
            map.entry((volume, member))
                .or_insert_with(|| Arc::new(MemberRuntime::new(units, members)))
                .clone(),
        )
    }

    /// The RAM state of a member if it was created already.
    pub fn member_if_present(
        &self,
        volume: VolumeId,
        member: MemberIdx,
    ) -> Option<Arc<MemberRuntime>> {
        self.members.lock().get(&(volume, member)).cloned()
    }

    /// Forgets a member's RAM state (its locks and dirty bits), e.g. at Rebuild-init.
    pub fn reset_member(&self, volume: VolumeId, member: MemberIdx) {
        self.members.lock().remove(&(volume, member));
    }
}
