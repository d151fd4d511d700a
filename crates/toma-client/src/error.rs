//! What a volume client reports to its caller.

use thiserror::Error;
use toma_core::{MemberIdx, VolumeId};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ClientError {
    #[error("volume {0} does not exist")]
    UnknownVolume(VolumeId),
    #[error("offset {offset} + length {len} is outside the volume (size {size} bytes), or the length is 0")]
    OutOfRange { offset: u64, len: u64, size: u64 },
    #[error("member {0} refused the request: {1}")]
    Member(MemberIdx, String),
    #[error("volume {0}: cannot use the size: {1}")]
    Size(VolumeId, toma_core::LayoutError),
    #[error("protocol error: {0}")]
    Protocol(String),
    #[error("control plane: {0}")]
    ControlPlane(String),
    #[error("the operation must be retried")]
    Retry,
}
