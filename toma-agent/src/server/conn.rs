//! One datapath connection: REGISTER binds it to a (volume, client); every other request is
//! checked (registered, not fenced, generation g or g−1) and served concurrently.

use std::collections::BTreeSet;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use bytes::Bytes;
use toma_control::Unreachable;
use toma_core::Role;
use toma_wire::transport::{Conn, FrameSender};
use toma_wire::{ErrorCode, Frame, LockEntry, Message, MAX_DIRTY_UNITS};
use tracing::{debug, info, warn};

use super::member::{ClientEntry, Member};
use super::{disk_io, fence, AgentInner};
use crate::device::ALIGN;
use crate::state::{ClientId, StateError};
use crate::superblock::SuperblockError;

fn err(code: ErrorCode, message: impl Into<String>) -> Message {
    Message::Error {
        code,
        message: message.into(),
    }
}

struct Bound {
    member: Arc<Member>,
    client: ClientId,
}

pub(super) async fn serve(agent: Arc<AgentInner>, conn: Conn) {
    let conn_id = agent.next_conn.fetch_add(1, Ordering::Relaxed);
    let peer = conn.peer().to_string();
    let (sender, mut receiver) = conn.split();
    let mut bound: Option<Bound> = None;
    let mut seen = SeenIds::default();
    loop {
        let frame = match receiver.recv().await {
            Ok(f) => f,
            Err(e) => {
                debug!(peer, error = %e, "connection ended");
                break;
            }
        };
        // A request delivered twice is served once: a LOCK repeated after its UNLOCK would
        // leave a lock that its client does not know it holds.
        if frame.request_id != 0 && !seen.first_time(frame.request_id) {
            debug!(
                peer,
                request = frame.request_id,
                "duplicate request ignored"
            );
            continue;
        }
        match &frame.msg {
            Message::Register { .. } => {
                let reply = register(&agent, &frame, &sender, conn_id, &mut bound);
                let _ = sender.send(&frame.reply(reply)).await;
            }
            Message::AckTopo { generation } => {
                if let Some(b) = &bound {
                    let g = b.member.topology().generation;
                    if let Some(c) = b.member.clients.lock().get_mut(&b.client) {
                        c.acked = c.acked.max(*generation);
                        if c.acked >= g {
                            c.waiting_since = None;
                        }
                    }
                    agent.poke();
                }
            }
            _ => {
                let Some(b) = &bound else {
                    let _ = sender
                        .send(&frame.reply(err(
                            ErrorCode::NotRegistered,
                            "REGISTER on this connection first",
                        )))
                        .await;
                    continue;
                };
                if frame.volume != b.member.volume {
                    let _ = sender
                        .send(&frame.reply(err(
                            ErrorCode::Invalid,
                            format!(
                                "this connection is registered for volume {}, not {}",
                                b.member.volume, frame.volume
                            ),
                        )))
                        .await;
                    continue;
                }
                // A client that reconnected (its request timed out here, say) registered a
                // newer connection: what still arrives on this one is late, and a late WRITE
                // or UNLOCK must not land after what the client did since.
                let current = b
                    .member
                    .clients
                    .lock()
                    .get(&b.client)
                    .is_some_and(|c| c.conn == conn_id);
                if !current {
                    let _ = sender
                        .send(&frame.reply(err(
                            ErrorCode::NotRegistered,
                            "this connection was replaced by a newer one of the same client",
                        )))
                        .await;
                    continue;
                }
                if matches!(
                    frame.msg,
                    Message::Lock { .. }
                        | Message::Unlock { .. }
                        | Message::Intent { .. }
                        | Message::SetDirty { .. }
                        | Message::ClearDirty { .. }
                ) {
                    // RAM-only requests are served in arrival order, inline: a client may
                    // send UNLOCK without waiting for its reply, and its next LOCK of the
                    // unit on this connection must not overtake it. (No task spawn either.)
                    let reply = handle(&agent, &b.member, b.client, &frame).await;
                    let _ = sender.send(&frame.reply(reply)).await;
                    continue;
                }
                let (agent, member, client, sender) =
                    (agent.clone(), b.member.clone(), b.client, sender.clone());
                tokio::spawn(async move {
                    let reply = handle(&agent, &member, client, &frame).await;
                    let _ = sender.send(&frame.reply(reply)).await;
                });
            }
        }
    }
    if let Some(b) = bound {
        let now = agent.now();
        if let Some(c) = b.member.clients.lock().get_mut(&b.client) {
            if c.conn == conn_id {
                c.sender = None;
                c.waiting_since = Some(now);
            }
        }
    }
}

/// The request ids already served on one connection. A client numbers its requests
/// 1, 2, 3, … on each connection; they may arrive out of order.
#[derive(Debug, Default)]
struct SeenIds {
    /// Every id up to this one was seen (or is too old to matter).
    floor: u64,
    /// Ids above `floor` seen so far.
    above: BTreeSet<u64>,
}

impl SeenIds {
    /// Most ids remembered above the floor (a client that skips ids cannot grow it).
    const WINDOW: usize = 4096;

    /// Records `id`; false if it was seen before.
    fn first_time(&mut self, id: u64) -> bool {
        if id <= self.floor || !self.above.insert(id) {
            return false;
        }
        while self.above.first() == Some(&(self.floor + 1)) {
            self.floor += 1;
            self.above.pop_first();
        }
        while self.above.len() > Self::WINDOW {
            if let Some(low) = self.above.pop_first() {
                self.floor = low;
            }
        }
        true
    }
}

fn register(
    agent: &Arc<AgentInner>,
    frame: &Frame,
    sender: &FrameSender,
    conn_id: u64,
    bound: &mut Option<Bound>,
) -> Message {
    let Message::Register {
        client,
        secret,
        held_locks,
    } = &frame.msg
    else {
        return err(ErrorCode::Invalid, "not a REGISTER");
    };
    let Some(member) = agent.member(frame.volume) else {
        // Perhaps a volume we have not learned yet: look again soon.
        agent.poke();
        return err(
            ErrorCode::UnknownVolume,
            format!(
                "volume {} has no member on node {}",
                frame.volume, agent.cfg.node
            ),
        );
    };
    if !member.secret.ct_eq(secret) {
        warn!(volume = %member.name, peer = sender.peer(), "REGISTER with a wrong secret refused");
        return err(ErrorCode::WrongSecret, "wrong secret for this volume");
    }
    let id = ClientId(*client);
    let rt = member.runtime();
    if rt.locks.is_fenced(id) {
        return err(
            ErrorCode::Fenced,
            "this client id is fenced; register under a new id",
        );
    }
    let t = member.topology();
    for &unit in held_locks {
        // Re-assert a lock the client still holds: after a restart of this TOMA (grace), or
        // after a reconnect. Never steal another client's lock.
        if rt.locks.holder(unit).is_none() {
            let _ = rt.locks.install(unit, id);
        }
    }
    // `held_locks` is the client's own list of what it holds here. A lock this TOMA still
    // has for it that is not on the list was released by an UNLOCK that never arrived (its
    // old connection was reset): free it, or it would block that chunk forever.
    for unit in rt.locks.locks_of(id) {
        if !held_locks.contains(&unit) {
            debug!(volume = %member.name, client = %id, unit, "freeing a lock the client no longer holds");
            rt.locks.force_unlock(unit);
        }
    }
    let now = agent.now();
    let acked = frame.generation.min(t.generation);
    member.clients.lock().insert(
        id,
        ClientEntry {
            sender: Some(sender.clone()),
            acked,
            waiting_since: if acked < t.generation {
                Some(now)
            } else {
                None
            },
            conn: conn_id,
        },
    );
    member.grace_waiting.lock().retain(|c| *c != *client);
    debug!(volume = %member.name, client = %id, generation = frame.generation, "client registered");
    *bound = Some(Bound {
        member: member.clone(),
        client: id,
    });
    agent.poke();
    Message::Registered {
        topology: (*t).clone(),
    }
}

fn state_err(e: StateError) -> Message {
    let code = match e {
        StateError::Fenced { .. } => ErrorCode::Fenced,
        StateError::NotHeld { .. } => ErrorCode::NotLockHolder,
        StateError::UnitOutOfRange { .. } | StateError::TargetOutOfRange { .. } => {
            ErrorCode::OutOfRange
        }
        StateError::HeldByOther { .. } => ErrorCode::Busy,
    };
    err(code, e.to_string())
}

fn aligned(offset: u64, len: usize) -> bool {
    offset.is_multiple_of(ALIGN as u64) && len.is_multiple_of(ALIGN) && len > 0
}

/// The reply to a failed member read or write: I/O outside the member's extent is the
/// client's mistake (`OutOfRange`, the disk is fine); a device error marks the disk unhealthy.
fn io_err(agent: &AgentInner, m: &Member, e: SuperblockError) -> Message {
    match e {
        SuperblockError::OutsideExtent { .. } => err(ErrorCode::OutOfRange, e.to_string()),
        SuperblockError::Device(_) => {
            agent.mark_unhealthy(m.disk.id());
            err(ErrorCode::Io, e.to_string())
        }
        _ => err(ErrorCode::Io, e.to_string()),
    }
}

async fn read(agent: &AgentInner, m: &Member, offset: u64, len: u32) -> Result<Bytes, Message> {
    if !aligned(offset, len as usize) {
        return Err(err(
            ErrorCode::OutOfRange,
            format!(
                "read of {len} bytes at {offset}: offset and length must be multiples of {ALIGN}"
            ),
        ));
    }
    // Aligned, so an O_DIRECT device reads straight into it (no bounce buffer and copy).
    match m
        .disk
        .read_member_io(m.volume, m.idx(), offset, len as usize)
        .await
    {
        Ok(buf) => Ok(buf.into_bytes()),
        Err(e) => Err(io_err(agent, m, e)),
    }
}

async fn handle(
    agent: &Arc<AgentInner>,
    m: &Arc<Member>,
    client: ClientId,
    frame: &Frame,
) -> Message {
    let rt = m.runtime();
    if rt.locks.is_fenced(client) {
        return err(ErrorCode::Fenced, "this client is fenced here");
    }
    let t = m.topology();
    let g = t.generation;
    if frame.generation.saturating_add(1) < g {
        return err(
            ErrorCode::StaleGeneration,
            format!("generation {} is older than {} − 1", frame.generation, g),
        );
    }
    if frame.generation > g {
        // The control plane has not told us yet; the client retries.
        agent.poke();
        return err(
            ErrorCode::Busy,
            format!(
                "generation {} is not known here yet (newest {g})",
                frame.generation
            ),
        );
    }
    if t.members.get(m.idx()).is_some_and(|x| x.role == Role::Dead)
        && matches!(
            frame.msg,
            Message::Read { .. }
                | Message::ReadTestLock { .. }
                | Message::Write { .. }
                | Message::Lock { .. }
                | Message::GetLocks { .. }
        )
    {
        if frame.generation == g {
            // A client on g never addresses a member g declares DEAD: it means another
            // member, one that this node no longer serves (its disk moved away, and this
            // node serves the volume's member whose disk is still here). Serving it from this
            // member's extent would answer with another member's bytes.
            return err(
                ErrorCode::UnknownVolume,
                format!(
                    "this node serves member {} of volume {}, DEAD in generation {g}, not the member you address: its disk is no longer here",
                    m.idx(),
                    m.name
                ),
            );
        }
        // Generation g declared this member DEAD, and its writers no longer write it: a
        // client still on g − 1 must not read it (it may miss their writes — the member
        // may have been reported unreachable while it was alive) nor lock or write here.
        return err(
            ErrorCode::StaleGeneration,
            format!(
                "member {} of volume {} is DEAD in generation {g}: switch to it",
                m.idx(),
                m.name
            ),
        );
    }
    if m.disk.lost_writes(m.volume, m.idx())
        && !matches!(
            frame.msg,
            Message::ReportUnreachable { .. }
                | Message::FenceClient { .. }
                | Message::Unlock { .. }
        )
    {
        // Reading it could return data older than acknowledged writes; the leader fails it
        // and has it rebuilt in full.
        return err(
            ErrorCode::Io,
            format!(
                "member {} of volume {} lost power since its disk's last flush and may miss acknowledged writes: it serves no I/O until it is rebuilt in full",
                m.idx(),
                m.name
            ),
        );
    }
    let units = m.spec().units();
    let unit_ok = |u: u64| {
        if u < units {
            Ok(())
        } else if u < rt.locks.units() {
            // Inside the (grown) extent but past the size this TOMA knows: the volume grew
            // and the control plane has not told us yet; the client retries.
            agent.poke();
            Err(err(
                ErrorCode::Busy,
                format!("unit {u} is past the volume's size known here ({units} units): not known here yet"),
            ))
        } else {
            Err(err(
                ErrorCode::OutOfRange,
                format!("unit {u} is outside the volume ({units} units)"),
            ))
        }
    };
    match &frame.msg {
        Message::Read { offset, len } => match read(agent, m, *offset, *len).await {
            Ok(data) => Message::Data { data },
            Err(e) => e,
        },
        Message::ReadTestLock { unit, offset, len } => {
            if let Err(e) = unit_ok(*unit) {
                return e;
            }
            // Test after read: a lock taken after the read began is seen.
            match read(agent, m, *offset, *len).await {
                Ok(data) => Message::DataLock {
                    locked: rt.locks.held_by_other(*unit, client).is_some(),
                    data,
                },
                Err(e) => e,
            }
        }
        Message::Write { offset, data } => {
            if !aligned(*offset, data.len()) {
                return err(
                    ErrorCode::OutOfRange,
                    format!(
                        "write of {} bytes at {offset}: offset and length must be multiples of {ALIGN}",
                        data.len()
                    ),
                );
            }
            // Re-check the fence right before the write lands.
            if rt.locks.is_fenced(client) {
                return err(ErrorCode::Fenced, "this client is fenced here");
            }
            match m
                .disk
                .write_member_io(m.volume, m.idx(), *offset, data.clone())
                .await
            {
                Ok(()) => Message::Ok,
                Err(e) => io_err(agent, m, e),
            }
        }
        Message::Lock { unit } => {
            if let Err(e) = unit_ok(*unit) {
                return e;
            }
            if m.grace_until.lock().is_some() {
                return err(
                    ErrorCode::Busy,
                    "this TOMA restarted and waits for clients to re-assert their locks",
                );
            }
            match rt.locks.lock(*unit, client) {
                Ok(()) => Message::Ok,
                Err(StateError::HeldByOther { holder, .. }) => Message::Locked { holder: holder.0 },
                Err(e) => state_err(e),
            }
        }
        Message::Intent { unit, column, data } => {
            if let Err(e) = unit_ok(*unit) {
                return e;
            }
            let spec = m.spec();
            if !spec.layout.is_raid6() {
                return err(
                    ErrorCode::Invalid,
                    format!("INTENT on volume {}, which is not RAID6", m.name),
                );
            }
            let k = spec.layout.min_readable();
            let width = data.len() / k;
            if data.len() % k != 0 || u64::from(*column) + width as u64 > u64::from(spec.chunk_size)
            {
                return err(
                    ErrorCode::OutOfRange,
                    format!(
                        "INTENT of {} bytes at column {column}: must be {k} data chunks' columns within a chunk of {} bytes",
                        data.len(),
                        spec.chunk_size
                    ),
                );
            }
            let intent = crate::state::Intent {
                client,
                column: *column,
                data: data.clone(),
            };
            match rt.locks.set_intent(*unit, intent) {
                Ok(()) => Message::Ok,
                Err(e) => state_err(e),
            }
        }
        Message::Unlock { unit } => match rt.locks.unlock(*unit, client) {
            Ok(()) => Message::Ok,
            Err(e) => state_err(e),
        },
        Message::SetDirty { unit, targets } => match rt.dirty.set(*unit, u64::from(*targets)) {
            Ok(()) => Message::Ok,
            Err(e) => state_err(e),
        },
        Message::ClearDirty { unit, targets } => match rt.dirty.clear(*unit, u64::from(*targets)) {
            Ok(()) => Message::Ok,
            Err(e) => state_err(e),
        },
        Message::Flush => {
            let disk = m.disk.clone();
            match disk_io(&m.disk, move || disk.flush()).await {
                Ok(Ok(())) => Message::Ok,
                Ok(Err(e)) => err(ErrorCode::Io, e.to_string()),
                Err(e) => err(ErrorCode::Io, e.to_string()),
            }
        }
        Message::ReportUnreachable { member } => {
            let Some(target) = t.members.get(usize::from(*member)) else {
                return err(
                    ErrorCode::OutOfRange,
                    format!("member {member} does not exist"),
                );
            };
            if target.role.is_dead() {
                return Message::Ok;
            }
            info!(volume = %m.name, member, generation = frame.generation, "a client reports a member unreachable");
            let report = Unreachable {
                volume: m.volume,
                disk: target.disk,
                generation: frame.generation,
            };
            match agent.cp.report_unreachable(report).await {
                Ok(()) => Message::Ok,
                Err(e) => err(ErrorCode::Busy, format!("control plane: {e}")),
            }
        }
        Message::FenceClient { client: victim } => {
            let victim_id = ClientId(*victim);
            // Fenced here already with nothing left to recover: nothing to do (peers tell
            // each other, and a fresh recovery each time would bounce between them).
            if rt.locks.is_fenced(victim_id) && rt.locks.locks_of(victim_id).is_empty() {
                return Message::Ok;
            }
            fence::start(
                agent.clone(),
                m.clone(),
                ClientId(*victim),
                "fenced by a peer TOMA",
            );
            Message::Ok
        }
        Message::ReleaseLock {
            unit,
            client: holder,
        } => {
            rt.locks.release_if_held_by(*unit, ClientId(*holder));
            Message::Ok
        }
        Message::GetLocks { units: r } => Message::Locks {
            locks: rt
                .locks
                .locks_in(r.clone())
                .into_iter()
                .map(|(unit, c)| LockEntry { unit, client: c.0 })
                .collect(),
        },
        Message::PutLocks { locks } => {
            for l in locks {
                let _ = rt.locks.install(l.unit, ClientId(l.client));
            }
            Message::Ok
        }
        Message::GetDirty { target, units: r } => {
            if r.end.saturating_sub(r.start) > MAX_DIRTY_UNITS {
                return err(ErrorCode::OutOfRange, "too many units in one GET_DIRTY");
            }
            Message::Dirty {
                first: r.start,
                bits: Bytes::from(rt.dirty.bits_in(usize::from(*target), r.clone())),
            }
        }
        other => err(
            ErrorCode::Invalid,
            format!("{:?} is not a request a TOMA serves", other.kind()),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::SeenIds;

    #[test]
    fn duplicates_are_recognised_in_any_order() {
        let mut s = SeenIds::default();
        assert!(s.first_time(1));
        assert!(!s.first_time(1));
        assert!(s.first_time(3));
        assert!(s.first_time(2));
        assert!(!s.first_time(3));
        assert!(!s.first_time(2));
        assert_eq!(s.floor, 3);
        assert!(s.above.is_empty());
    }

    #[test]
    fn skipped_ids_do_not_grow_the_window_without_bound() {
        let mut s = SeenIds::default();
        for id in (2..20_000u64).step_by(2) {
            assert!(s.first_time(id));
        }
        assert!(s.above.len() <= SeenIds::WINDOW);
        assert!(!s.first_time(2), "old ids count as seen");
    }
}
