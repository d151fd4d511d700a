//! [`AlignedBuf`]: a buffer whose start is aligned for `O_DIRECT`.

/// Alignment of offsets, lengths and (for `O_DIRECT`) buffer addresses.
pub const ALIGN: usize = 4096;

/// A zeroed byte buffer whose start is aligned to [`ALIGN`], built without `unsafe`: it
/// over-allocates a `Vec` and uses the aligned window inside it.
#[derive(Clone)]
pub struct AlignedBuf {
    raw: Vec<u8>,
    start: usize,
    len: usize,
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` should be a multiple of [`ALIGN`]).
    pub fn zeroed(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        // `align_offset` may return usize::MAX only for impossible alignments; 4096 is a
        // power of two and the allocation has ALIGN bytes of slack, so start < ALIGN.
        let start = if start < ALIGN { start } else { 0 };
        AlignedBuf { raw, start, len }
    }
    /// An aligned copy of `data`, without zeroing the buffer first (only the < ALIGN bytes
    /// of slack before the aligned start are written twice).
    pub fn copy_of(data: &[u8]) -> Self {
        let mut raw: Vec<u8> = Vec::with_capacity(data.len() + ALIGN);
        let start = raw.as_ptr().align_offset(ALIGN);
        let start = if start < ALIGN { start } else { 0 };
        // Within the capacity: the allocation does not move, so `start` stays aligned.
        raw.resize(start, 0);
        raw.extend_from_slice(data);
        AlignedBuf {
            raw,
            start,
            len: data.len(),
        }
    }
    /// The aligned window's start, for handing the buffer to the kernel. The pointer stays
    /// valid while `self` lives and is not resized: moving an `AlignedBuf` does not move
    /// the heap allocation it points into.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.raw[self.start..].as_mut_ptr()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The buffer as `Bytes`, without copying (the aligned window of the allocation).
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from(self.raw).slice(self.start..self.start + self.len)
    }
}

impl std::ops::Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.raw[self.start..self.start + self.len]
    }
}
impl std::ops::DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        &mut self.raw[self.start..self.start + self.len]
    }
}
impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}
