//! Volume expansion on this TOMA (`toma_core::growth`).
//!
//! While a volume has a pending growth (`VolumeRecord::growing_to`), every TOMA hosting one
//! of its members grows the member's extent in place to the new length
//! ([`Disk::grow_extent`](crate::disk::Disk::grow_extent): the space right after it must be
//! free; the new part is zeroed and flushed before the longer extent is recorded), lets
//! the member's locks and dirty bits cover the new units, and reports the extent's length
//! (or why it could not grow) in its member status. The growth runs in a task of its own
//! (zeroing takes a while; the reconcile loop keeps heartbeating meanwhile).
//!
//! Only when the expansion is committed (`spec.size` grew) does this TOMA accept locks on
//! the new units, and its local client (rebuild) use the new size. A member hosted again
//! after a restart or a death grows here before the volume can be Normal again, which the
//! commit waits for.

use std::sync::atomic::Ordering;
use std::sync::Arc;

use toma_control::VolumeRecord;
use tracing::{info, warn};

use super::{disk_io, AgentInner, Member};
use crate::superblock::SuperblockError;

/// Brings member `m` of `rec` in line with the record's sizes.
pub(super) async fn sync(inner: &Arc<AgentInner>, m: &Arc<Member>, rec: &VolumeRecord) {
    let (vol, idx) = (m.volume, m.idx());
    let Some(extent) = m.disk.extent(vol, idx) else {
        return;
    };
    let chunk = u64::from(rec.spec.chunk_size);
    let want = rec.extent_bytes();
    if rec.growing_to.is_none() {
        *m.grow_refused.lock() = None;
    }
    if extent.length < want {
        // A refused growth is tried again on every pass (the checks come before any
        // write, so a refusal costs nothing): the space after may have been freed.
        if !m.growing.swap(true, Ordering::SeqCst) {
            let (a, m) = (inner.clone(), m.clone());
            let h = tokio::spawn(async move {
                grow(&a, &m, want, chunk).await;
                m.growing.store(false, Ordering::SeqCst);
                a.poke();
            });
            let mut tasks = inner.tasks.lock();
            tasks.retain(|t| !t.is_finished());
            tasks.push(h);
        }
        return;
    }
    // The extent covers the target: so do the locks and dirty bits (a no-op once done).
    m.runtime().grow(want / chunk);
    // The committed size: new units are lockable here, the local client may use them.
    let cur = m.spec();
    if rec.spec.size > cur.size && extent.length >= rec.spec.member_bytes() {
        if let Ok(grown) = cur.grown(rec.spec.size) {
            *m.spec.lock() = grown;
            info!(volume = %m.name, member = idx, from = cur.size, to = grown.size, "volume grew");
            if let Some(c) = inner.local.lock().await.get(&vol) {
                let _ = c.grow_to(grown.size);
            }
        }
    }
}

async fn grow(inner: &Arc<AgentInner>, m: &Arc<Member>, want: u64, chunk: u64) {
    let (vol, idx, disk) = (m.volume, m.idx(), m.disk.clone());
    let from = disk.extent(vol, idx).map_or(0, |e| e.length);
    let started = inner.now();
    // Locks and dirty bits cover the new units before the longer extent is reported (the
    // growth may commit as soon as it is): a client that learns the new size first gets
    // `Busy` (retry) from this TOMA, never `OutOfRange`.
    m.runtime().grow(want / chunk);
    let d = disk.clone();
    match disk_io(&disk, move || d.grow_extent(vol, idx, want)).await {
        Ok(Ok(e)) => {
            *m.grow_refused.lock() = None;
            let took = inner.now().saturating_sub(started);
            info!(volume = %m.name, member = idx, from, to = e.length, ?took, "extent grown (new part zeroed)");
        }
        Ok(Err(e @ SuperblockError::CannotGrow { .. })) => {
            let msg = e.to_string();
            let mut refused = m.grow_refused.lock();
            if refused.as_ref() != Some(&(want, msg.clone())) {
                warn!(volume = %m.name, member = idx, error = %msg, "extent cannot grow");
            }
            *refused = Some((want, msg));
        }
        Ok(Err(SuperblockError::Device(e))) => {
            warn!(volume = %m.name, member = idx, error = %e, "growing the extent failed");
            inner.mark_unhealthy(disk.id());
        }
        Ok(Err(e)) => {
            warn!(volume = %m.name, member = idx, error = %e, "growing the extent failed")
        }
        Err(e) => warn!(error = %e, "growth task failed"),
    }
}
