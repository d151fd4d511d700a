//! Fencing a client and recovering its stale locks (DESIGN.md §5.1, docs/datapath.md):
//! fence here, fence on every other live member and wait for each answer, and only then copy
//! each chunk it held locked from this (read) member to the others and free the locks.

use std::sync::Arc;
use std::time::Duration;
use toma_client::CopyHow;

use toma_core::placement::{locks, read_member, recovery_targets, sets_dirty};
use toma_wire::Message;
use tracing::{info, warn};

use super::member::Member;
use super::AgentInner;
use crate::state::ClientId;

/// Starts fencing `client` on `m` (once; later calls while it runs do nothing).
pub(super) fn start(agent: Arc<AgentInner>, m: Arc<Member>, client: ClientId, why: &'static str) {
    {
        let mut f = m.fencing.lock();
        if f.contains(&client) {
            return;
        }
        f.push(client);
    }
    // Step 1: nothing of that client is applied here from now on.
    m.runtime().locks.fence(client);
    let entry = m.clients.lock().remove(&client);
    m.grace_waiting.lock().retain(|c| *c != client.0);
    info!(volume = %m.name, %client, why, "fencing client");
    let tasks = agent.clone();
    let h = tokio::spawn(async move {
        if let Some(sender) = entry.and_then(|e| e.sender) {
            let t = m.topology();
            let _ = sender
                .send(&toma_wire::Frame::new(
                    0,
                    m.volume,
                    t.generation,
                    Message::fenced(why),
                ))
                .await;
            sender.close();
        }
        recover(&agent, &m, client).await;
        m.fencing.lock().retain(|c| *c != client);
        agent.poke();
    });
    tasks.tasks.lock().push(h);
}

async fn recover(agent: &Arc<AgentInner>, m: &Arc<Member>, client: ClientId) {
    let Some(local) = agent.local_client(m.volume).await else {
        return;
    };
    // Step 2: every other live member fences it too.
    loop {
        // The member's TOMA may not have applied the newest topology (it may never, for a
        // DEAD member): tell the members that one lists as live.
        let t = newest_topology(m, &local);
        let me = m.idx();
        let mut pending = false;
        if t.alive().is_empty() {
            // The volume Failed: "every other live member" would be no one, and the
            // members that come back would never hear of the fence — their TOMAs would keep
            // the client's locks for good. Wait for the volume to come back.
            local
                .wait_generation(t.generation + 1, Duration::from_millis(500))
                .await;
            continue;
        }
        for other in t.alive() {
            if other == me {
                continue;
            }
            match local
                .request(&t, other, Message::FenceClient { client: client.0 })
                .await
            {
                Ok(Message::Ok) => {}
                _ => pending = true,
            }
        }
        if !pending {
            break;
        }
        // A member that does not answer is waited for until the topology marks it DEAD.
        let g = t.generation;
        local
            .wait_generation(g + 1, Duration::from_millis(500))
            .await;
    }
    // Step 3: copy and free what it held here, for the chunks this member reads.
    let rt = m.runtime();
    let held = rt.locks.locks_of(client);
    if held.is_empty() {
        return;
    }
    info!(volume = %m.name, %client, units = held.len(), "recovering stale locks");
    for unit in held {
        loop {
            // Only while the fenced client still holds this member's lock is no one else
            // writing the chunk; once it is freed (by a peer's recovery), copying it could
            // overwrite a newer write with an older one.
            if rt.locks.holder(unit) != Some(client) {
                break;
            }
            let t = m.topology();
            let me = m.idx();
            let reader = read_member(&t, unit);
            if reader != Some(me) {
                // Another member reads this chunk: its TOMA recovers it and frees our lock,
                // if it holds the client's lock too. If it does not, the client never held
                // the whole lock set, so it wrote nothing: free ours.
                let Some(r) = reader else {
                    wait_past(&local, t.generation).await;
                    continue;
                };
                match local
                    .request(
                        &t,
                        r,
                        Message::GetLocks {
                            units: unit..unit + 1,
                        },
                    )
                    .await
                {
                    Ok(Message::Locks { locks: theirs }) => {
                        if theirs.iter().any(|l| l.client == client.0) {
                            // The reader may not have fenced the client yet (it was DEAD
                            // when we told the live members): tell it now, so its TOMA
                            // recovers the chunk and frees the lock.
                            let fenced = local
                                .request(&t, r, Message::FenceClient { client: client.0 })
                                .await;
                            if !matches!(fenced, Ok(Message::Ok)) {
                                wait_past(&local, t.generation).await;
                                continue;
                            }
                        } else if rt.locks.holder(unit) == Some(client) {
                            if t.layout.is_raid6() && locks(&t, unit).contains(&me) {
                                // RAID6, and this member is in the stripe's lock set: the
                                // reader lost the lock (its agent restarted), or freed it
                                // after recovering and its RELEASE_LOCK is on its way.
                                // Recover the stripe here, under the lock taken over by
                                // this agent's client (so that RELEASE_LOCK cannot free it
                                // in the middle); done again it is harmless, as no writer
                                // gets the whole set while this member's lock is held.
                                let mine = ClientId(local.client_id());
                                if let Some(intent) = rt.locks.take_over(unit, client, mine) {
                                    recover_taken_over(&local, m, &t, unit, me, intent).await;
                                    rt.locks.release_if_held_by(unit, mine);
                                }
                                break;
                            }
                            rt.locks.force_unlock(unit);
                        }
                        break;
                    }
                    _ => {
                        wait_past(&local, t.generation).await;
                        continue;
                    }
                }
            }
            let intent = rt.locks.intent(unit, client);
            if copy_stale(&local, m, &t, unit, me, intent).await {
                for l in locks(&t, unit) {
                    if l == me {
                        if rt.locks.holder(unit) == Some(client) {
                            rt.locks.force_unlock(unit);
                        }
                    } else {
                        let _ = local
                            .request(
                                &t,
                                l,
                                Message::ReleaseLock {
                                    unit,
                                    client: client.0,
                                },
                            )
                            .await;
                    }
                }
                break;
            }
            wait_past(&local, t.generation).await;
        }
    }
}

/// Waits (at most 200 ms) for a topology newer than generation `g`, which is the member's
/// own. When the agent's client already knows a newer one (the member's TOMA has not
/// applied it yet, and may never, for a member it declares DEAD), the wait would return at
/// once and the recovery loop would spin without yielding: pause briefly instead.
async fn wait_past(local: &toma_client::VolumeClient, g: u64) {
    if local.topology().generation > g {
        tokio::time::sleep(Duration::from_millis(20)).await;
    } else {
        local
            .wait_generation(g + 1, Duration::from_millis(200))
            .await;
    }
}

/// Stale-lock recovery of RAID6 stripe `unit` by a lock member that is not the reader, under
/// the lock it took over from the fenced client: the stripe re-encoded (rolled forward from
/// `intent`) onto every writable member, dirty bits first when a member is DEAD. Retried
/// while the topology allows; given up (the lock is then freed) once this member is no
/// longer in the stripe's lock set.
async fn recover_taken_over(
    local: &toma_client::VolumeClient,
    m: &Arc<Member>,
    t0: &toma_core::Topology,
    unit: u64,
    me: usize,
    intent: Option<crate::state::Intent>,
) {
    let mut t = Arc::new(t0.clone());
    loop {
        if !locks(&t, unit).contains(&me) {
            return;
        }
        if copy_stale(local, m, &t, unit, me, intent.clone()).await {
            return;
        }
        wait_past(local, t.generation).await;
        t = newest_topology(m, local);
    }
}

/// The newer of the member's topology and the one the agent's client knows.
fn newest_topology(m: &Member, local: &toma_client::VolumeClient) -> Arc<toma_core::Topology> {
    let own = m.topology();
    let newest = local.topology();
    if newest.generation > own.generation {
        newest
    } else {
        own
    }
}

/// One attempt at copying a fenced client's unit under `t` from this member (`me`): the
/// dirty bits set first when a member is DEAD, then the unit copied (RAID6: re-encoded,
/// rolled forward from the client's `intent`) to every writable member. False when
/// something failed (the caller retries).
async fn copy_stale(
    local: &toma_client::VolumeClient,
    m: &Arc<Member>,
    t: &toma_core::Topology,
    unit: u64,
    me: usize,
    intent: Option<crate::state::Intent>,
) -> bool {
    let to = recovery_targets(t, unit, me);
    if let Some(d) = sets_dirty(t, unit) {
        let targets = d.target_mask();
        let mut ok = true;
        for h in d.holders {
            if local
                .request(t, h, Message::SetDirty { unit, targets })
                .await
                .is_err()
            {
                ok = false;
            }
        }
        if !ok {
            return false;
        }
    }
    if to.is_empty() {
        return true;
    }
    match local
        .copy_unit(
            t,
            unit,
            me,
            &to,
            CopyHow::recovery(intent.map(|i| (i.column, i.data))),
        )
        .await
    {
        Ok(_) => true,
        Err(e) => {
            warn!(volume = %m.name, unit, error = %e, "stale-lock copy failed; retrying");
            false
        }
    }
}
