//! Driving a volume expansion through the control plane (the rules: `toma_core::growth`).
//!
//! [`grow_volume`] records the target beside the visible size, waits until every member's
//! TOMA reports its extent grown (new part zeroed) while the volume is Normal, and only then
//! makes the new size visible. A member that cannot grow in place ends the attempt: the
//! target is withdrawn and the volume stays as it was (an extent that did grow keeps its
//! zeroed space; a later expansion reuses it). Calling it again with the same size resumes
//! a pending expansion; with the visible size it returns at once.

use std::time::Duration;

use thiserror::Error;
use toma_core::{growth_state, GrowthState, MemberExtent, VolumeId};

use crate::api::{ControlPlane, CpError};

#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum GrowError {
    #[error("volume {0} not found")]
    NoVolume(VolumeId),
    /// A size that is smaller than the volume or not a multiple of its lock unit.
    #[error("volume {volume}: {why}")]
    Invalid { volume: VolumeId, why: String },
    /// A member's extent cannot grow in place; nothing visible changed.
    #[error("volume {volume} cannot grow to {size} bytes: {why}; the volume is unchanged")]
    Refused {
        volume: VolumeId,
        size: u64,
        why: String,
    },
    /// Not done within the wait; the growth stays pending (call again to resume).
    #[error("volume {volume}: growth to {size} bytes is pending: {why}")]
    Pending {
        volume: VolumeId,
        size: u64,
        why: String,
    },
    #[error(transparent)]
    ControlPlane(#[from] CpError),
}

/// Grows volume `id` to `size` bytes (a multiple of its lock unit, at least its size),
/// waiting up to `wait`. Returns the volume's size.
pub async fn grow_volume(
    cp: &dyn ControlPlane,
    id: VolumeId,
    size: u64,
    wait: Duration,
) -> Result<u64, GrowError> {
    let rec = cp.volume(id).await?.ok_or(GrowError::NoVolume(id))?.value;
    if rec.spec.size == size {
        return Ok(size);
    }
    let target = rec.spec.grown(size).map_err(|e| GrowError::Invalid {
        volume: id,
        why: e.to_string(),
    })?;
    if rec.growing_to != Some(size) {
        cp.set_growing(id, Some(size)).await?;
    }
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let rec = cp.volume(id).await?.ok_or(GrowError::NoVolume(id))?.value;
        if rec.spec.size >= size {
            return Ok(rec.spec.size);
        }
        if rec.growing_to != Some(size) {
            return Err(GrowError::Pending {
                volume: id,
                size,
                why: format!(
                    "another expansion changed the target to {:?} bytes",
                    rec.growing_to
                ),
            });
        }
        let statuses = cp.member_statuses(id).await?;
        let reports: Vec<MemberExtent> = rec
            .topology
            .members
            .iter()
            .filter_map(|m| {
                statuses
                    .iter()
                    .find(|s| s.disk == m.disk && s.node == m.node)
                    .map(|s| MemberExtent {
                        disk: s.disk,
                        extent_bytes: s.extent_bytes,
                        refused: s.grow_refused.clone(),
                    })
            })
            .collect();
        let why = match growth_state(&rec.topology, &target, &reports) {
            GrowthState::Ready => {
                cp.commit_growth(id, size).await?;
                return Ok(size);
            }
            GrowthState::Refused(why) => {
                cp.set_growing(id, None).await?;
                return Err(GrowError::Refused {
                    volume: id,
                    size,
                    why,
                });
            }
            GrowthState::Waiting(why) => why,
        };
        if tokio::time::Instant::now() >= deadline {
            return Err(GrowError::Pending {
                volume: id,
                size,
                why,
            });
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}
