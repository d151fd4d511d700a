//! What can be wrong with bytes that claim to be a Toma frame (or with a frame we were asked
//! to encode).

use thiserror::Error;
use toma_core::TopologyError;

/// A frame that cannot be decoded (or a message that cannot be encoded). Every variant says
/// what was wrong and where.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum WireError {
    #[error("bad magic {got:#010x}: not a Toma frame (expected \"TOMA\")")]
    BadMagic { got: u32 },
    #[error("unsupported frame version {got} (this build speaks version {supported})")]
    UnsupportedVersion { got: u8, supported: u8 },
    #[error("unknown message kind {kind:#04x}")]
    UnknownKind { kind: u8 },
    #[error("oversized frame: payload length {len} exceeds the limit of {max} bytes")]
    Oversized { len: u64, max: u32 },
    #[error("truncated {what}: need {need} bytes, have {have}")]
    Truncated {
        what: &'static str,
        need: usize,
        have: usize,
    },
    #[error(
        "checksum mismatch: header says crc32c {expected:#010x}, frame hashes to {computed:#010x}"
    )]
    Checksum { expected: u32, computed: u32 },
    #[error("{kind}: field {field} out of range: {reason}")]
    OutOfRange {
        kind: &'static str,
        field: &'static str,
        reason: String,
    },
    #[error("{kind}: field {field} is not valid UTF-8")]
    InvalidUtf8 {
        kind: &'static str,
        field: &'static str,
    },
    #[error("{kind}: invalid topology: {source}")]
    InvalidTopology {
        kind: &'static str,
        #[source]
        source: TopologyError,
    },
    #[error("trailing bytes: {kind} payload has {extra} bytes after its last field")]
    TrailingBytes { kind: &'static str, extra: usize },
}

impl WireError {
    pub(crate) fn range(
        kind: &'static str,
        field: &'static str,
        reason: impl Into<String>,
    ) -> Self {
        WireError::OutOfRange {
            kind,
            field,
            reason: reason.into(),
        }
    }
}
