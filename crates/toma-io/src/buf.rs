//! [`AlignedBuf`]: a buffer whose start is aligned for `O_DIRECT`.

use std::ops::{Deref, DerefMut};

/// Alignment of offsets, lengths and (for `O_DIRECT`) buffer addresses.
pub const ALIGN: usize = 4096;

/// A byte buffer whose start is aligned to [`ALIGN`], built without `unsafe`: it
/// over-allocates a `Vec` and uses the aligned window inside it, or it holds `Bytes` that
/// already start at an aligned address (a write's payload received into an aligned buffer:
/// [`from_bytes`](Self::from_bytes)), which it hands to the kernel without a copy.
#[derive(Clone)]
pub struct AlignedBuf {
    store: Store,
    start: usize,
    len: usize,
}

#[derive(Clone)]
enum Store {
    Owned(Vec<u8>),
    /// Aligned at its start; read-only (a mutable borrow copies it into `Owned` first).
    Shared(bytes::Bytes),
}

impl AlignedBuf {
    /// A zeroed buffer of `len` bytes (`len` should be a multiple of [`ALIGN`]).
    pub fn zeroed(len: usize) -> Self {
        let raw = vec![0u8; len + ALIGN];
        let start = raw.as_ptr().align_offset(ALIGN);
        // `align_offset` may return usize::MAX only for impossible alignments; 4096 is a
        // power of two and the allocation has ALIGN bytes of slack, so start < ALIGN.
        let start = if start < ALIGN { start } else { 0 };
        AlignedBuf {
            store: Store::Owned(raw),
            start,
            len,
        }
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
            store: Store::Owned(raw),
            start,
            len: data.len(),
        }
    }
    /// `data` itself when it starts at an aligned address (no copy), else an aligned copy.
    pub fn from_bytes(data: bytes::Bytes) -> Self {
        if data.as_ptr().align_offset(ALIGN) != 0 {
            return Self::copy_of(&data);
        }
        let len = data.len();
        AlignedBuf {
            store: Store::Shared(data),
            start: 0,
            len,
        }
    }
    /// Whether the buffer is bytes taken over without a copy ([`from_bytes`](Self::from_bytes)).
    pub fn is_borrowed_bytes(&self) -> bool {
        matches!(self.store, Store::Shared(_))
    }
    /// The aligned window's start, for handing the buffer to the kernel to write *into*
    /// (a read). Shared bytes are copied into an owned buffer first. The pointer stays
    /// valid while `self` lives and is not resized: moving an `AlignedBuf` does not move
    /// the heap allocation it points into.
    pub(crate) fn as_mut_ptr(&mut self) -> *mut u8 {
        self.own();
        self.deref_mut().as_mut_ptr()
    }
    /// The aligned window's start, for handing the buffer to the kernel to read *from* (a
    /// write). Same lifetime rule as [`as_mut_ptr`](Self::as_mut_ptr).
    pub(crate) fn as_ptr(&self) -> *const u8 {
        self.deref().as_ptr()
    }
    pub fn len(&self) -> usize {
        self.len
    }
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
    /// The buffer as `Bytes`, without copying (the aligned window of the allocation).
    pub fn into_bytes(self) -> bytes::Bytes {
        match self.store {
            Store::Owned(raw) => bytes::Bytes::from(raw).slice(self.start..self.start + self.len),
            Store::Shared(b) => b,
        }
    }
    /// Makes the buffer owned (copying shared bytes), so that it can be written to.
    fn own(&mut self) {
        if let Store::Shared(b) = &self.store {
            *self = Self::copy_of(b);
        }
    }
}

impl Deref for AlignedBuf {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        match &self.store {
            Store::Owned(raw) => &raw[self.start..self.start + self.len],
            Store::Shared(b) => b,
        }
    }
}
impl DerefMut for AlignedBuf {
    fn deref_mut(&mut self) -> &mut [u8] {
        self.own();
        let (start, len) = (self.start, self.len);
        match &mut self.store {
            Store::Owned(raw) => &mut raw[start..start + len],
            // `own` just made it owned.
            Store::Shared(_) => &mut [],
        }
    }
}
impl std::fmt::Debug for AlignedBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AlignedBuf({} bytes)", self.len)
    }
}
