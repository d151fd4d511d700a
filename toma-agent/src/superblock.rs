//! The superblock: the first MiB of every disk, which is all Toma persists (DESIGN §2).
//!
//! # On-disk layout (all integers little-endian)
//!
//! ```text
//! disk offset 0       copy 0 (SUPERBLOCK_COPY_SIZE = 512 KiB reserved)
//! disk offset 512 KiB copy 1 (512 KiB reserved)
//! disk offset 1 MiB   first extent may start here (extents are 1 MiB aligned)
//!
//! copy: header (128 bytes), then `extent_count` extent records of 64 bytes
//!   0  8  magic "TOMASUPR"
//!   8  4  format version (1)
//!  12  4  header length (128)
//!  16  8  sequence number: +1 on every write; both copies get the same number
//!  24 16  disk UUID
//!  40 16  cluster UUID
//!  56  8  boot counter (+1 on every open by an agent)
//!  64  8  device size when last written, bytes (informational)
//!  72  4  extent count (<= MAX_EXTENTS)
//!  76  4  extent record size (64)
//!  80 16  attached: the boot id of the host whose agent opened the disk and has not
//!         detached it cleanly since (0: detached cleanly, or never attached)
//!  96 28  reserved, zero
//! 124  4  crc32c of bytes 0..124 followed by the extent records
//!
//! extent record:
//!   0 16  volume UUID
//!  16  4  member index
//!  20  1  member state: 0 free, 1 RWL, 2 W, 3 WL, 4 DEAD
//!  21  3  reserved, zero
//!  24  8  offset on the disk, bytes (1 MiB aligned, >= 1 MiB)
//!  32  8  length, bytes (1 MiB multiple, > 0)
//!  40  8  topology generation last seen
//!  48 16  reserved, zero
//! ```
//!
//! Every update writes copy 0, flushes, then writes copy 1 and flushes, both with the same
//! new sequence number; so a torn write damages at most one copy and the other holds either
//! the old or the new state. [`open`] uses the valid copy with the higher sequence number.
//!
//! A superblock read from a disk is untrusted: every count, length and offset is checked
//! before use, and decoding never panics or allocates more than one copy's size.

use std::fmt;

use thiserror::Error;
use toma_core::{DiskId, Generation, MemberIdx, Role, VolumeId};

use crate::device::{AlignedBuf, BlockDevice, DeviceError, ALIGN};

/// Bytes at the start of every disk reserved for the two superblock copies.
pub const SUPERBLOCK_AREA: u64 = 1 << 20;
/// Bytes reserved for one copy.
pub const SUPERBLOCK_COPY_SIZE: usize = 512 * 1024;
/// Extents start and end on this alignment.
pub const EXTENT_ALIGN: u64 = 1 << 20;
/// The smallest disk Toma accepts: the superblock area plus one extent.
pub const MIN_DISK_SIZE: u64 = SUPERBLOCK_AREA + EXTENT_ALIGN;
pub const MAGIC: [u8; 8] = *b"TOMASUPR";
pub const FORMAT_VERSION: u32 = 1;
const HEADER_LEN: usize = 128;
const EXTENT_LEN: usize = 64;
const CRC_AT: usize = 124;
/// Most extents one copy can hold.
pub const MAX_EXTENTS: usize = (SUPERBLOCK_COPY_SIZE - HEADER_LEN) / EXTENT_LEN;

/// A cluster, named by its UUID.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ClusterId(pub u128);

impl fmt::Display for ClusterId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Same 8-4-4-4-12 form as DiskId/VolumeId.
        fmt::Display::fmt(&VolumeId(self.0), f)
    }
}

/// What a member extent is used for, as last recorded on its disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum MemberState {
    /// Allocated but holding no role: a new extent not yet in a topology (its contents are
    /// not valid data), or a member the topology released but that is not deleted yet.
    Free,
    /// The member's role in the topology of `Extent::generation`.
    Member(Role),
}

impl MemberState {
    fn code(self) -> u8 {
        match self {
            MemberState::Free => 0,
            MemberState::Member(Role::Rwl) => 1,
            MemberState::Member(Role::W) => 2,
            MemberState::Member(Role::Wl) => 3,
            MemberState::Member(Role::Dead) => 4,
        }
    }
    fn from_code(c: u8) -> Option<Self> {
        Some(match c {
            0 => MemberState::Free,
            1 => MemberState::Member(Role::Rwl),
            2 => MemberState::Member(Role::W),
            3 => MemberState::Member(Role::Wl),
            4 => MemberState::Member(Role::Dead),
            _ => return None,
        })
    }
}

impl fmt::Display for MemberState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberState::Free => f.write_str("free"),
            MemberState::Member(r) => fmt::Display::fmt(r, f),
        }
    }
}

/// One volume member's extent on a disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    pub volume: VolumeId,
    pub member: MemberIdx,
    /// Byte offset on the disk (1 MiB aligned, after the superblock area).
    pub offset: u64,
    /// Length in bytes (a multiple of 1 MiB).
    pub length: u64,
    /// The newest topology generation this member was recorded in.
    pub generation: Generation,
    pub state: MemberState,
}

impl Extent {
    pub fn end(&self) -> u64 {
        self.offset + self.length
    }
}

/// The decoded contents of one superblock copy.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Superblock {
    pub seq: u64,
    pub disk: DiskId,
    pub cluster: ClusterId,
    pub boot_counter: u64,
    /// The boot of the host that attached the disk last and has not detached it cleanly
    /// (0: none). An agent that finds another boot here knows the disk lost power (its
    /// host rebooted, or it was pulled) since its last flush: writes it acknowledged may be
    /// gone.
    pub attached: u128,
    pub device_size: u64,
    pub extents: Vec<Extent>,
}

/// Why one copy could not be used.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum CopyError {
    #[error("all zero")]
    Blank,
    #[error("no Toma magic (not a Toma disk, or overwritten)")]
    BadMagic,
    #[error("format version {0} is not supported by this agent (supports {FORMAT_VERSION})")]
    UnsupportedVersion(u32),
    #[error("bad header: {0}")]
    BadHeader(&'static str),
    #[error("checksum mismatch (torn write or corruption)")]
    BadChecksum,
    #[error("extent {index}: {why}")]
    BadExtent { index: usize, why: String },
    #[error("cannot be read: {0}")]
    Unreadable(String),
}

/// Errors of the disk layer (superblock, extents, member I/O through [`crate::Disk`]).
/// Every message names the disk and what to do.
#[derive(Debug, Error)]
pub enum SuperblockError {
    #[error(transparent)]
    Device(#[from] DeviceError),
    #[error("disk {device} was detached (the agent is shutting down): no more writes to it")]
    Detached { device: String },
    #[error("disk {device} is too small: {size} bytes, Toma needs at least {MIN_DISK_SIZE} (1 MiB superblock area + one 1 MiB extent)")]
    TooSmall { device: String, size: u64 },
    #[error("disk {device} has no Toma superblock (its first MiB is all zero): format it first")]
    Blank { device: String },
    #[error("disk {device}: both superblock copies are unusable (copy 0: {copy0}; copy 1: {copy1}); nothing was written. If the disk may be erased, pass --force-format {device}")]
    Corrupt {
        device: String,
        copy0: CopyError,
        copy1: CopyError,
    },
    #[error("disk {device} belongs to cluster {found}, this agent is in cluster {expected}; refusing to use it. To reuse it here (erasing it), pass --force-format {device}")]
    ForeignCluster {
        device: String,
        found: ClusterId,
        expected: ClusterId,
    },
    #[error("disk {device}: refusing to format, it is not blank (it holds {what}); pass --force-format {device} to erase it")]
    NotBlank { device: String, what: String },
    #[error("disk {device}: force-format names {named}, not this disk; refusing to format")]
    ForceMismatch { device: String, named: String },
    #[error("disk {device}: extent {extent_end} ends past the device end ({size} bytes): the device shrank or is the wrong one")]
    DeviceShrunk {
        device: String,
        extent_end: u64,
        size: u64,
    },
    #[error(
        "disk {device}: volume {volume} member {member} already has an extent at offset {offset}"
    )]
    AlreadyAllocated {
        device: String,
        volume: VolumeId,
        member: MemberIdx,
        offset: u64,
    },
    #[error("disk {device}: no free space for {length} bytes for volume {volume} member {member}; use another disk or free extents")]
    NoSpace {
        device: String,
        volume: VolumeId,
        member: MemberIdx,
        length: u64,
    },
    #[error("disk {device}: volume {volume} member {member} cannot grow in place from {from} to {to} bytes: {why}")]
    CannotGrow {
        device: String,
        volume: VolumeId,
        member: MemberIdx,
        from: u64,
        to: u64,
        why: String,
    },
    #[error("disk {device}: the superblock is full ({MAX_EXTENTS} extents); use another disk")]
    TooManyExtents { device: String },
    #[error("disk {device}: extent length must be > 0 (volume {volume} member {member})")]
    ZeroLength {
        device: String,
        volume: VolumeId,
        member: MemberIdx,
    },
    #[error("disk {device}: volume {volume} member {member}: I/O at offset {offset} length {len} is outside its extent of {length} bytes")]
    OutsideExtent {
        device: String,
        volume: VolumeId,
        member: MemberIdx,
        offset: u64,
        len: usize,
        length: u64,
    },
    #[error("disk {device}: volume {volume} member {member} has no extent on this disk")]
    NoSuchExtent {
        device: String,
        volume: VolumeId,
        member: MemberIdx,
    },
}

/// Whether [`format`] may overwrite a disk that is not blank.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overwrite {
    /// Format only a blank disk (first MiB all zero).
    OnlyIfBlank,
    /// Format whatever is there. `device` must equal the device's name (its path): the
    /// operator has to name the disk they want erased.
    Force { device: String },
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    let mut a = [0u8; 4];
    a.copy_from_slice(&b[at..at + 4]);
    u32::from_le_bytes(a)
}
fn le_u64(b: &[u8], at: usize) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[at..at + 8]);
    u64::from_le_bytes(a)
}
fn le_u128(b: &[u8], at: usize) -> u128 {
    let mut a = [0u8; 16];
    a.copy_from_slice(&b[at..at + 16]);
    u128::from_le_bytes(a)
}

fn checksum(header: &[u8], extents: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&header[..CRC_AT]), extents)
}

impl Superblock {
    /// A fresh superblock for a disk of `device_size` bytes.
    pub fn new(disk: DiskId, cluster: ClusterId, device_size: u64) -> Self {
        Superblock {
            seq: 0,
            disk,
            cluster,
            boot_counter: 0,
            attached: 0,
            device_size,
            extents: Vec::new(),
        }
    }

    /// Bytes of one encoded copy, rounded up to the I/O alignment.
    pub fn encoded_len(&self) -> usize {
        let raw = HEADER_LEN + self.extents.len() * EXTENT_LEN;
        raw.div_ceil(ALIGN) * ALIGN
    }

    /// Encodes one copy. The caller guarantees `extents.len() <= MAX_EXTENTS`.
    pub fn encode(&self) -> AlignedBuf {
        let mut buf = AlignedBuf::zeroed(self.encoded_len());
        let (h, rest) = buf.split_at_mut(HEADER_LEN);
        h[0..8].copy_from_slice(&MAGIC);
        h[8..12].copy_from_slice(&FORMAT_VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&(HEADER_LEN as u32).to_le_bytes());
        h[16..24].copy_from_slice(&self.seq.to_le_bytes());
        h[24..40].copy_from_slice(&self.disk.0.to_le_bytes());
        h[40..56].copy_from_slice(&self.cluster.0.to_le_bytes());
        h[56..64].copy_from_slice(&self.boot_counter.to_le_bytes());
        h[64..72].copy_from_slice(&self.device_size.to_le_bytes());
        h[80..96].copy_from_slice(&self.attached.to_le_bytes());
        h[72..76].copy_from_slice(&(self.extents.len() as u32).to_le_bytes());
        h[76..80].copy_from_slice(&(EXTENT_LEN as u32).to_le_bytes());
        for (e, r) in self.extents.iter().zip(rest.chunks_mut(EXTENT_LEN)) {
            r[0..16].copy_from_slice(&e.volume.0.to_le_bytes());
            r[16..20].copy_from_slice(&(e.member as u32).to_le_bytes());
            r[20] = e.state.code();
            r[24..32].copy_from_slice(&e.offset.to_le_bytes());
            r[32..40].copy_from_slice(&e.length.to_le_bytes());
            r[40..48].copy_from_slice(&e.generation.to_le_bytes());
        }
        let ext_bytes = self.extents.len() * EXTENT_LEN;
        let crc = checksum(h, &rest[..ext_bytes]);
        h[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_le_bytes());
        buf
    }

    /// Decodes and validates one copy from untrusted bytes (at most one copy's worth is
    /// looked at). Never panics.
    pub fn decode(bytes: &[u8]) -> Result<Superblock, CopyError> {
        let bytes = &bytes[..bytes.len().min(SUPERBLOCK_COPY_SIZE)];
        if bytes.iter().all(|b| *b == 0) {
            return Err(CopyError::Blank);
        }
        if bytes.len() < HEADER_LEN {
            return Err(CopyError::BadHeader("shorter than the header"));
        }
        let h = &bytes[..HEADER_LEN];
        if h[0..8] != MAGIC {
            return Err(CopyError::BadMagic);
        }
        let version = le_u32(h, 8);
        if version != FORMAT_VERSION {
            return Err(CopyError::UnsupportedVersion(version));
        }
        if le_u32(h, 12) as usize != HEADER_LEN {
            return Err(CopyError::BadHeader("header length is not 128"));
        }
        if le_u32(h, 76) as usize != EXTENT_LEN {
            return Err(CopyError::BadHeader("extent record size is not 64"));
        }
        let count = le_u32(h, 72) as usize;
        if count > MAX_EXTENTS {
            return Err(CopyError::BadHeader("extent count exceeds the copy size"));
        }
        let ext_end = HEADER_LEN + count * EXTENT_LEN;
        let Some(ext_bytes) = bytes.get(HEADER_LEN..ext_end) else {
            return Err(CopyError::BadHeader("extent table is truncated"));
        };
        if checksum(h, ext_bytes) != le_u32(h, CRC_AT) {
            return Err(CopyError::BadChecksum);
        }
        let device_size = le_u64(h, 64);
        let mut extents = Vec::with_capacity(count);
        for (index, r) in ext_bytes.chunks_exact(EXTENT_LEN).enumerate() {
            let bad = |why: String| CopyError::BadExtent { index, why };
            let state =
                MemberState::from_code(r[20]).ok_or_else(|| bad(format!("state {}", r[20])))?;
            let e = Extent {
                volume: VolumeId(le_u128(r, 0)),
                member: le_u32(r, 16) as MemberIdx,
                state,
                offset: le_u64(r, 24),
                length: le_u64(r, 32),
                generation: le_u64(r, 40),
            };
            validate_extent(&e, device_size).map_err(bad)?;
            extents.push(e);
        }
        check_overlaps(&extents).map_err(|(index, why)| CopyError::BadExtent { index, why })?;
        Ok(Superblock {
            seq: le_u64(h, 16),
            disk: DiskId(le_u128(h, 24)),
            cluster: ClusterId(le_u128(h, 40)),
            boot_counter: le_u64(h, 56),
            attached: le_u128(h, 80),
            device_size,
            extents,
        })
    }

    /// The extent of `volume`'s member `member`, if this disk holds it.
    pub fn extent(&self, volume: VolumeId, member: MemberIdx) -> Option<&Extent> {
        self.extents
            .iter()
            .find(|e| e.volume == volume && e.member == member)
    }

    /// First-fit placement of `length` bytes (rounded up to 1 MiB) on a device of
    /// `device_size` bytes: the lowest 1 MiB aligned offset after the superblock area.
    pub fn find_free(&self, length: u64, device_size: u64) -> Option<u64> {
        let length = length.checked_next_multiple_of(EXTENT_ALIGN)?;
        let limit = device_size - device_size % EXTENT_ALIGN;
        let mut sorted: Vec<&Extent> = self.extents.iter().collect();
        sorted.sort_by_key(|e| e.offset);
        let mut cursor = SUPERBLOCK_AREA;
        for e in sorted {
            if e.offset >= cursor && e.offset - cursor >= length {
                return Some(cursor);
            }
            cursor = cursor.max(e.end());
        }
        (limit >= cursor && limit - cursor >= length).then_some(cursor)
    }
}

fn validate_extent(e: &Extent, device_size: u64) -> Result<(), String> {
    if e.offset < SUPERBLOCK_AREA {
        return Err(format!("offset {} is inside the superblock area", e.offset));
    }
    if e.offset & (EXTENT_ALIGN - 1) != 0 || e.length & (EXTENT_ALIGN - 1) != 0 {
        return Err(format!(
            "offset {} / length {} not 1 MiB aligned",
            e.offset, e.length
        ));
    }
    if e.length == 0 {
        return Err("length 0".into());
    }
    match e.offset.checked_add(e.length) {
        Some(end) if end <= device_size => Ok(()),
        _ => Err(format!(
            "offset {} + length {} passes the recorded device size {device_size}",
            e.offset, e.length
        )),
    }
}

/// Extents must not overlap and (volume, member) must be unique. Returns the index of the
/// first offending extent.
fn check_overlaps(extents: &[Extent]) -> Result<(), (usize, String)> {
    let mut order: Vec<usize> = (0..extents.len()).collect();
    order.sort_by_key(|&i| extents[i].offset);
    for w in order.windows(2) {
        let (a, b) = (&extents[w[0]], &extents[w[1]]);
        if b.offset < a.end() {
            return Err((w[1], format!("overlaps extent {}", w[0])));
        }
    }
    let mut keys: Vec<(VolumeId, MemberIdx, usize)> = extents
        .iter()
        .enumerate()
        .map(|(i, e)| (e.volume, e.member, i))
        .collect();
    keys.sort();
    for w in keys.windows(2) {
        if w[0].0 == w[1].0 && w[0].1 == w[1].1 {
            return Err((
                w[1].2,
                format!("volume {} member {} appears twice", w[0].0, w[0].1),
            ));
        }
    }
    Ok(())
}

/// What the superblock area of a disk holds, read without writing anything.
#[derive(Debug)]
pub enum Inspection {
    /// The first MiB is all zero: a new disk.
    Blank,
    /// At least one valid copy; `sb` is the newest. `stale` tells what is wrong with the
    /// other copy, if anything (it is rewritten on the next update).
    Valid {
        sb: Superblock,
        stale: Option<CopyError>,
    },
    /// Not blank, and neither copy is valid.
    Invalid { copy0: CopyError, copy1: CopyError },
}

/// Reads both copies and classifies the disk. Writes nothing.
pub fn inspect(dev: &dyn BlockDevice) -> Result<Inspection, SuperblockError> {
    check_size(dev)?;
    let mut area = AlignedBuf::zeroed(SUPERBLOCK_AREA as usize);
    dev.read_at(&mut area, 0)?;
    if area.iter().all(|b| *b == 0) {
        return Ok(Inspection::Blank);
    }
    let (c0, c1) = area.split_at(SUPERBLOCK_COPY_SIZE);
    Ok(match (Superblock::decode(c0), Superblock::decode(c1)) {
        (Ok(a), Ok(b)) => {
            let stale = (a != b).then(|| CopyError::Unreadable("older sequence number".into()));
            let sb = if b.seq > a.seq { b } else { a };
            Inspection::Valid { sb, stale }
        }
        (Ok(sb), Err(e)) | (Err(e), Ok(sb)) => Inspection::Valid { sb, stale: Some(e) },
        (Err(copy0), Err(copy1)) => Inspection::Invalid { copy0, copy1 },
    })
}

fn check_size(dev: &dyn BlockDevice) -> Result<(), SuperblockError> {
    if dev.size() < MIN_DISK_SIZE {
        return Err(SuperblockError::TooSmall {
            device: dev.name().to_string(),
            size: dev.size(),
        });
    }
    Ok(())
}

/// Persists `sb` with a new sequence number: copy 0, flush, copy 1, flush.
/// `sb.seq` is advanced even if the write fails, so a later write supersedes any half
/// written state.
pub fn write(dev: &dyn BlockDevice, sb: &mut Superblock) -> Result<(), SuperblockError> {
    if sb.extents.len() > MAX_EXTENTS {
        return Err(SuperblockError::TooManyExtents {
            device: dev.name().to_string(),
        });
    }
    sb.seq += 1;
    sb.device_size = dev.size();
    let buf = sb.encode();
    dev.write_at(&buf, 0)?;
    dev.flush()?;
    dev.write_at(&buf, SUPERBLOCK_COPY_SIZE as u64)?;
    dev.flush()?;
    Ok(())
}

/// Formats `dev` as a Toma disk of `cluster` with an empty extent table. Refuses a disk
/// that is not blank unless `overwrite` is [`Overwrite::Force`] naming this very device.
pub fn format(
    dev: &dyn BlockDevice,
    disk: DiskId,
    cluster: ClusterId,
    overwrite: &Overwrite,
) -> Result<Superblock, SuperblockError> {
    check_size(dev)?;
    let device = dev.name().to_string();
    match overwrite {
        Overwrite::Force { device: named } if *named != device => {
            return Err(SuperblockError::ForceMismatch {
                device,
                named: named.clone(),
            })
        }
        Overwrite::Force { .. } => {
            tracing::warn!(disk = %device, "force-formatting: erasing the superblock area");
        }
        Overwrite::OnlyIfBlank => match inspect(dev)? {
            Inspection::Blank => {}
            Inspection::Valid { sb, .. } => {
                return Err(SuperblockError::NotBlank {
                    device,
                    what: format!(
                        "a Toma superblock of disk {} in cluster {} with {} extents",
                        sb.disk,
                        sb.cluster,
                        sb.extents.len()
                    ),
                })
            }
            Inspection::Invalid { .. } => {
                return Err(SuperblockError::NotBlank {
                    device,
                    what: "data that is not a Toma superblock".into(),
                })
            }
        },
    }
    // Clear the whole area so no stale bytes of an old copy survive, then write.
    let zero = AlignedBuf::zeroed(SUPERBLOCK_AREA as usize);
    dev.write_at(&zero, 0)?;
    let mut sb = Superblock::new(disk, cluster, dev.size());
    write(dev, &mut sb)?;
    tracing::info!(disk = %device, id = %disk, %cluster, "formatted disk");
    Ok(sb)
}

/// Opens a formatted disk of cluster `expected`: reads both copies, uses the newest valid
/// one, checks the cluster and the device size, then bumps and persists the boot counter
/// (which also repairs a damaged copy). Never formats; writes nothing when it refuses.
/// Does not track host boots (see [`open_on`]).
pub fn open(dev: &dyn BlockDevice, expected: ClusterId) -> Result<Superblock, SuperblockError> {
    open_on(dev, expected, 0).map(|(sb, _)| sb)
}

/// Like [`open`], on a host whose current boot is `host` (nonzero; 0 tracks nothing).
/// Records `host` as the attaching boot and returns whether the disk may have lost
/// acknowledged writes: it was left attached by another boot (its host lost power or
/// rebooted, or the disk was pulled and moved here) without a clean [`detach`].
pub fn open_on(
    dev: &dyn BlockDevice,
    expected: ClusterId,
    host: u128,
) -> Result<(Superblock, bool), SuperblockError> {
    let device = dev.name().to_string();
    let (mut sb, stale) = match inspect(dev)? {
        Inspection::Blank => return Err(SuperblockError::Blank { device }),
        Inspection::Invalid { copy0, copy1 } => {
            return Err(SuperblockError::Corrupt {
                device,
                copy0,
                copy1,
            })
        }
        Inspection::Valid { sb, stale } => (sb, stale),
    };
    if sb.cluster != expected {
        return Err(SuperblockError::ForeignCluster {
            device,
            found: sb.cluster,
            expected,
        });
    }
    if let Some(e) = sb.extents.iter().find(|e| e.end() > dev.size()) {
        return Err(SuperblockError::DeviceShrunk {
            device,
            extent_end: e.end(),
            size: dev.size(),
        });
    }
    if let Some(why) = stale {
        tracing::warn!(disk = %device, %why, "one superblock copy is unusable; rewriting it from the other");
    }
    let lost_power = host != 0 && sb.attached != 0 && sb.attached != host;
    if lost_power {
        tracing::warn!(disk = %device, id = %sb.disk, "the disk was not detached cleanly by the host boot that last had it: writes acknowledged before it lost power may be gone; its members will be rebuilt in full");
    }
    sb.boot_counter += 1;
    sb.attached = host;
    write(dev, &mut sb)?;
    tracing::info!(disk = %device, id = %sb.disk, boot = sb.boot_counter, extents = sb.extents.len(), "opened Toma disk");
    Ok((sb, lost_power))
}

/// Clean detach: flushes the device, then records that no host has the disk attached, so
/// the next open (on any host) trusts its contents.
pub fn detach(dev: &dyn BlockDevice, sb: &mut Superblock) -> Result<(), SuperblockError> {
    dev.flush()?;
    sb.attached = 0;
    write(dev, sb)
}
