//! Volume layouts: RAID1 (2 or 3 mirrors) and RAID6 (k data + P + Q), and the chunk size.

use std::fmt;

use thiserror::Error;

/// Smallest chunk (lock and dirty-bit unit): 4 KiB.
pub const MIN_CHUNK_SIZE: u32 = 4 * 1024;
/// Largest chunk: 16 MiB.
pub const MAX_CHUNK_SIZE: u32 = 16 * 1024 * 1024;
/// Default chunk: 64 KiB.
pub const DEFAULT_CHUNK_SIZE: u32 = 64 * 1024;
/// The block that reads and writes are atomic on (and that the properties speak of).
pub const BLOCK_SIZE: u32 = 4096;

pub const MIN_MIRRORS: u8 = 2;
pub const MAX_MIRRORS: u8 = 3;
pub const MIN_RAID6_DATA: u8 = 2;
pub const MAX_RAID6_DATA: u8 = 8;

/// An invalid layout or volume parameter. The message names the field and its allowed range.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum LayoutError {
    #[error("mirrors = {got}: RAID1 needs {MIN_MIRRORS} or {MAX_MIRRORS} mirrors")]
    Mirrors { got: u8 },
    #[error("dataMembers = {got}: RAID6 needs between {MIN_RAID6_DATA} and {MAX_RAID6_DATA} data members (plus P and Q)")]
    Raid6Data { got: u8 },
    #[error("chunkSize = {got}: must be a power of two between {MIN_CHUNK_SIZE} (4 KiB) and {MAX_CHUNK_SIZE} (16 MiB)")]
    ChunkSize { got: u64 },
    #[error(
        "size = {got}: a volume's size must be a positive multiple of its lock unit ({unit} bytes)"
    )]
    Size { got: u64, unit: u64 },
    #[error("size = {to}: a volume never shrinks (it is {from} bytes); ask for at least {from}")]
    Shrink { from: u64, to: u64 },
}

/// How a volume protects its data.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Layout {
    /// Every member holds a full copy.
    Raid1 { mirrors: u8 },
    /// `data` data chunks plus P and Q per stripe, rotated across the `data + 2` members.
    Raid6 { data: u8 },
}

impl Layout {
    pub fn raid1(mirrors: u8) -> Result<Self, LayoutError> {
        if !(MIN_MIRRORS..=MAX_MIRRORS).contains(&mirrors) {
            return Err(LayoutError::Mirrors { got: mirrors });
        }
        Ok(Layout::Raid1 { mirrors })
    }

    pub fn raid6(data: u8) -> Result<Self, LayoutError> {
        if !(MIN_RAID6_DATA..=MAX_RAID6_DATA).contains(&data) {
            return Err(LayoutError::Raid6Data { got: data });
        }
        Ok(Layout::Raid6 { data })
    }

    /// Re-checks a layout that may have been built by hand or decoded from outside.
    pub fn validate(self) -> Result<Self, LayoutError> {
        match self {
            Layout::Raid1 { mirrors } => Layout::raid1(mirrors),
            Layout::Raid6 { data } => Layout::raid6(data),
        }
    }

    /// Number of members (disks) of a volume with this layout.
    pub fn members(self) -> usize {
        match self {
            Layout::Raid1 { mirrors } => usize::from(mirrors),
            Layout::Raid6 { data } => usize::from(data) + 2,
        }
    }

    /// How many members may be lost with no data lost.
    pub fn tolerated_failures(self) -> usize {
        match self {
            Layout::Raid1 { mirrors } => usize::from(mirrors) - 1,
            Layout::Raid6 { .. } => 2,
        }
    }

    /// How many members must be readable for every block to be readable.
    pub fn min_readable(self) -> usize {
        match self {
            Layout::Raid1 { .. } => 1,
            Layout::Raid6 { data } => usize::from(data),
        }
    }

    /// Data chunks per lock unit: 1 for RAID1, k for RAID6 (the stripe is the lock unit).
    pub fn data_chunks_per_unit(self) -> u64 {
        match self {
            Layout::Raid1 { .. } => 1,
            Layout::Raid6 { data } => u64::from(data),
        }
    }

    pub fn is_raid6(self) -> bool {
        matches!(self, Layout::Raid6 { .. })
    }
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Layout::Raid1 { mirrors } => write!(f, "raid1x{mirrors}"),
            Layout::Raid6 { data } => write!(f, "raid6-{data}+2"),
        }
    }
}

/// Checks a chunk size: a power of two in 4 KiB..=16 MiB.
pub fn validate_chunk_size(chunk_size: u64) -> Result<u32, LayoutError> {
    if chunk_size.is_power_of_two()
        && (u64::from(MIN_CHUNK_SIZE)..=u64::from(MAX_CHUNK_SIZE)).contains(&chunk_size)
    {
        // In range, so it fits in u32.
        Ok(chunk_size as u32)
    } else {
        Err(LayoutError::ChunkSize { got: chunk_size })
    }
}

/// What a volume is: layout, chunk size and usable size.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct VolumeSpec {
    pub layout: Layout,
    pub chunk_size: u32,
    /// Usable bytes, a multiple of the lock unit.
    pub size: u64,
}

impl VolumeSpec {
    pub fn new(layout: Layout, chunk_size: u64, size: u64) -> Result<Self, LayoutError> {
        let layout = layout.validate()?;
        let chunk_size = validate_chunk_size(chunk_size)?;
        let unit = u64::from(chunk_size) * layout.data_chunks_per_unit();
        if size == 0 || !size.is_multiple_of(unit) {
            return Err(LayoutError::Size { got: size, unit });
        }
        Ok(VolumeSpec {
            layout,
            chunk_size,
            size,
        })
    }

    /// Bytes of user data covered by one lock unit (chunk for RAID1, stripe for RAID6).
    pub fn unit_bytes(&self) -> u64 {
        u64::from(self.chunk_size) * self.layout.data_chunks_per_unit()
    }

    /// Number of lock units (chunks or stripes).
    pub fn units(&self) -> u64 {
        self.size / self.unit_bytes()
    }

    /// Bytes each member stores (its extent length).
    pub fn member_bytes(&self) -> u64 {
        self.units() * u64::from(self.chunk_size)
    }

    /// This spec grown to `size` bytes: the same layout and chunk size. Refuses a smaller
    /// size (data would be lost) and one that is not a multiple of the lock unit.
    pub fn grown(&self, size: u64) -> Result<Self, LayoutError> {
        if size < self.size {
            return Err(LayoutError::Shrink {
                from: self.size,
                to: size,
            });
        }
        VolumeSpec::new(self.layout, u64::from(self.chunk_size), size)
    }

    /// Lock unit that holds volume byte `offset`.
    pub fn unit_of(&self, offset: u64) -> u64 {
        offset / self.unit_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn raid6_k1_is_refused_naming_the_field() {
        let e = Layout::raid6(1).unwrap_err();
        assert!(e.to_string().contains("dataMembers = 1"), "{e}");
        assert!(e.to_string().contains("between 2 and 8"), "{e}");
        assert!(Layout::raid6(9).is_err());
        assert_eq!(Layout::raid6(4).unwrap().members(), 6);
    }

    #[test]
    fn mirrors_out_of_range_are_refused() {
        assert!(Layout::raid1(1).is_err());
        assert!(Layout::raid1(4).is_err());
        assert_eq!(Layout::raid1(3).unwrap().members(), 3);
    }

    #[test]
    fn chunk_size_must_be_power_of_two_in_range() {
        let e = validate_chunk_size(3000).unwrap_err();
        assert!(e.to_string().contains("chunkSize = 3000"), "{e}");
        assert!(validate_chunk_size(2048).is_err());
        assert!(validate_chunk_size(32 << 20).is_err());
        assert_eq!(validate_chunk_size(4096), Ok(4096));
        assert_eq!(validate_chunk_size(16 << 20), Ok(16 << 20));
    }

    #[test]
    fn volume_size_must_be_whole_units() {
        let l = Layout::raid6(4).unwrap();
        assert!(VolumeSpec::new(l, 65536, 65536).is_err());
        let v = VolumeSpec::new(l, 65536, 4 * 65536 * 10).unwrap();
        assert_eq!(v.units(), 10);
        assert_eq!(v.member_bytes(), 10 * 65536);
        assert!(VolumeSpec::new(Layout::raid1(2).unwrap(), 65536, 0).is_err());
    }
}
