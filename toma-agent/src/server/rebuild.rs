//! One rebuild cycle, run by the TOMA of the lowest-index RWL member while the volume is
//! Rebuilding: merge the dirty bitmaps about the W members from every holder, copy held
//! locks RAM → RAM, then copy every dirty chunk disk → disk under its lock (through this
//! agent's own client) and clear its bits. Progress goes to the control plane.
//!
//! A RAID6 parity resync (`Phase::Resync`) is the same kind of cycle over every stripe: under
//! its lock, read the data chunks, re-encode P and Q and write them to their members.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;
use toma_client::CopyHow;

use toma_control::RebuildProgress;
use toma_core::{DirtyMarks, Phase, Role};
use toma_wire::{LockEntry, Message, MAX_DIRTY_UNITS};
use tracing::{info, warn};

use super::member::Member;
use super::AgentInner;

/// Starts the cycle for the member's current generation if this member should run it and
/// it has not run (or is not running) yet.
pub(super) fn maybe_start(agent: Arc<AgentInner>, m: Arc<Member>) {
    let t = m.topology();
    if !matches!(t.phase(), Phase::Rebuilding | Phase::Resync) {
        return;
    }
    let me = m.idx();
    if toma_core::placement::rebuilder(&t) != Some(me) {
        return;
    }
    {
        let mut r = m.rebuild.lock();
        if r.is_some_and(|p| p.generation == t.generation) {
            return;
        }
        *r = Some(RebuildProgress {
            generation: t.generation,
            ..RebuildProgress::default()
        });
    }
    let tasks = agent.clone();
    let h = tokio::spawn(async move {
        if let Err(why) = run(&agent, &m).await {
            warn!(volume = %m.name, why, "rebuild cycle stopped");
            // Let a later pass try again under the same generation.
            let mut r = m.rebuild.lock();
            if r.is_some_and(|p| !p.finished) {
                *r = None;
            }
        }
    });
    tasks.tasks.lock().push(h);
}

async fn run(agent: &Arc<AgentInner>, m: &Arc<Member>) -> Result<(), String> {
    let t = m.topology();
    let g = t.generation;
    let me = m.idx();
    let local = agent
        .local_client(m.volume)
        .await
        .ok_or("no local client")?;
    // The local client must be on this generation before it writes W members.
    if !local.wait_generation(g, Duration::from_secs(10)).await {
        return Err(format!("local client did not reach generation {g}"));
    }
    let targets: Vec<usize> = t.members_with(Role::W).collect();
    let holders: Vec<usize> = t.members_with(Role::Rwl).collect();
    let rt = m.runtime();
    // Every unit the RAM state covers (the member's extent; at least the volume's size).
    let units = rt.dirty.units();
    if t.phase() == Phase::Resync {
        // Every stripe gets P and Q re-encoded from its data chunks (every member is
        // readable, so nothing is reconstructed).
        let stripes = units.min(m.spec().units());
        info!(volume = %m.name, generation = g, stripes, "parity resync starts");
        let work = (0..stripes).map(|s| {
            let (p, q) = toma_core::placement::raid6_parity_members(&t, s);
            (s, vec![p, q])
        });
        return copy_units(agent, m, &local, stripes, work, None).await;
    }

    // Merge the other holders' bitmaps into ours.
    for &h in holders.iter().filter(|&&h| h != me) {
        for &w in &targets {
            let mut first = 0;
            while first < units {
                let end = (first + MAX_DIRTY_UNITS).min(units);
                let reply = local
                    .request(
                        &t,
                        h,
                        Message::GetDirty {
                            target: w as u8,
                            units: first..end,
                        },
                    )
                    .await
                    .map_err(|e| format!("GET_DIRTY from member {h}: {e}"))?;
                if let Message::Dirty { first: f, bits } = reply {
                    for (i, byte) in bits.iter().enumerate() {
                        for b in 0..8 {
                            if byte & (1 << b) != 0 {
                                let u = f + (i as u64) * 8 + b;
                                if u < units {
                                    let _ = rt.dirty.set(u, 1 << w);
                                }
                            }
                        }
                    }
                }
                first = end;
            }
        }
    }
    // Stale locks (of fenced clients, still being recovered), RAM → RAM. Live clients'
    // locks are not copied: they release them where they took them.
    let held: Vec<LockEntry> = rt
        .locks
        .locks()
        .into_iter()
        .filter(|(_, c)| rt.locks.is_fenced(*c))
        .map(|(unit, c)| LockEntry { unit, client: c.0 })
        .collect();
    if !held.is_empty() {
        for &w in &targets {
            local
                .request(
                    &t,
                    w,
                    Message::PutLocks {
                        locks: held.clone(),
                    },
                )
                .await
                .map_err(|e| format!("PUT_LOCKS to member {w}: {e}"))?;
        }
    }
    let dirty: BTreeSet<u64> = targets
        .iter()
        .flat_map(|&w| rt.dirty.iter_dirty(w).collect::<Vec<_>>())
        .collect();
    let total = dirty.len() as u64;
    info!(volume = %m.name, generation = g, dirty = total, targets = ?targets, "rebuild cycle starts");
    let marks = DirtyMarks {
        holders: holders.clone(),
        targets: targets.clone(),
    };
    let work = dirty.into_iter().map(|u| (u, targets.clone()));
    copy_units(agent, m, &local, total, work, Some(&marks)).await
}

/// Copies each `(unit, targets)` of `work` under the unit's locks through the agent's own
/// client (clearing the bits in `clear`), publishing progress as it goes; `total` units.
/// Stops when the topology changes.
async fn copy_units(
    agent: &Arc<AgentInner>,
    m: &Arc<Member>,
    local: &toma_client::VolumeClient,
    total: u64,
    work: impl Iterator<Item = (u64, Vec<usize>)>,
    clear: Option<&DirtyMarks>,
) -> Result<(), String> {
    let t = m.topology();
    let g = t.generation;
    let me = m.idx();
    let started = agent.now();
    let mut last_report = started;
    let mut done = 0u64;
    let mut bytes = 0u64;
    let publish = |done: u64, bytes: u64, finished: bool| {
        let elapsed = agent.now().saturating_sub(started).as_secs_f64().max(1e-3);
        *m.rebuild.lock() = Some(RebuildProgress {
            generation: g,
            done_units: done,
            total_units: total,
            bytes_copied: bytes,
            bytes_per_sec: (bytes as f64 / elapsed) as u64,
            finished,
        });
        agent.poke();
    };
    publish(0, 0, false);
    for (unit, targets) in work {
        if m.topology().generation != g {
            return Err("the topology changed during the rebuild".into());
        }
        let mut tries = 0;
        loop {
            match local
                .copy_unit(&t, unit, me, &targets, CopyHow::rebuild(clear))
                .await
            {
                Ok(n) => {
                    bytes += n * targets.len() as u64;
                    break;
                }
                Err(e) => {
                    tries += 1;
                    if tries >= 20 || m.topology().generation != g {
                        return Err(format!("chunk {unit}: {e}"));
                    }
                    // The product's own pacing between attempts of one copy.
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
        done += 1;
        let now = agent.now();
        if now.saturating_sub(last_report) >= Duration::from_millis(200) {
            last_report = now;
            publish(done, bytes, false);
        }
    }
    publish(done, bytes, true);
    info!(volume = %m.name, generation = g, chunks = done, bytes, "rebuild cycle finished");
    Ok(())
}
