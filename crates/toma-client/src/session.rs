//! One registered connection to one member's TOMA: pipelined calls matched by request id,
//! and unsolicited messages (SWITCH_TOPO, FENCED) handed to the volume client.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use parking_lot::Mutex;
use tokio::sync::{mpsc, oneshot, Notify};
use toma_core::{DiskId, Generation, VolumeId};
use toma_wire::transport::{FrameSender, Transport};
use toma_wire::{ErrorCode, Frame, Message};
use tracing::debug;

/// How a call to a member failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CallError {
    /// The member's TOMA could not be reached or did not answer in time.
    Unreachable(String),
    /// The TOMA refused the request.
    Refused { code: ErrorCode, message: String },
    /// The session ended before the reply for a reason that says nothing about the
    /// member's health: this client closed it, or the TOMA fenced this client (`fenced`)
    /// and closed it. Never reported as the member being unreachable: a fenced client
    /// closes all its sessions at once, and reporting those would fail healthy members.
    Closed { fenced: bool },
}

impl std::fmt::Display for CallError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CallError::Unreachable(why) => write!(f, "unreachable: {why}"),
            CallError::Refused { code, message } => write!(f, "{code}: {message}"),
            CallError::Closed { fenced: true } => write!(f, "session closed: client fenced"),
            CallError::Closed { fenced: false } => write!(f, "session closed by this client"),
        }
    }
}

/// Something a TOMA told the client without being asked.
#[derive(Debug)]
pub enum Unsolicited {
    SwitchTopo(toma_core::Topology),
    /// This session's client id (the one it registered as, if known) is fenced.
    Fenced {
        reason: String,
        client: Option<toma_wire::ClientId>,
    },
    /// The connection ended.
    Closed,
    /// An UNLOCK of this unit was refused for its generation (too old, or not known there
    /// yet): the lock is still held and must be released again.
    UnlockRefused(u64),
}

type Pending = Arc<Mutex<BTreeMap<u64, oneshot::Sender<Message>>>>;

/// Why a session ended, when that is known before its calls fail (the first reason wins).
type End = Arc<Mutex<Option<CallError>>>;

/// UNLOCKs sent without waiting: request id → unit.
type Unlocks = Arc<Mutex<BTreeMap<u64, u64>>>;

pub struct Session {
    sender: FrameSender,
    pending: Pending,
    unlocks: Unlocks,
    /// Woken whenever an UNLOCK's reply arrives (or the connection ends).
    unlocked: Arc<Notify>,
    end: End,
    /// The client id this session registered as (set by the volume client).
    registered_as: Arc<Mutex<Option<toma_wire::ClientId>>>,
    next_id: AtomicU64,
    volume: VolumeId,
    timeout: Duration,
}

impl Session {
    /// Connects to `addr` and starts the reader task. Unsolicited messages go to `events`
    /// tagged with `tag`.
    pub async fn connect(
        transport: &dyn Transport,
        addr: &str,
        volume: VolumeId,
        timeout: Duration,
        tag: DiskId,
        events: mpsc::UnboundedSender<(DiskId, Unsolicited)>,
    ) -> Result<Arc<Session>, CallError> {
        let conn = tokio::time::timeout(timeout, transport.connect(addr))
            .await
            .map_err(|_| CallError::Unreachable(format!("connect to {addr}: timed out")))?
            .map_err(|e| CallError::Unreachable(format!("connect to {addr}: {e}")))?;
        let (sender, mut receiver) = conn.split();
        let pending: Pending = Arc::new(Mutex::new(BTreeMap::new()));
        let p = pending.clone();
        let unlocks: Unlocks = Arc::new(Mutex::new(BTreeMap::new()));
        let u = unlocks.clone();
        let unlocked = Arc::new(Notify::new());
        let woken = unlocked.clone();
        let end: End = Arc::new(Mutex::new(None));
        let ended = end.clone();
        let registered_as = Arc::new(Mutex::new(None));
        let registered = registered_as.clone();
        tokio::spawn(async move {
            loop {
                match receiver.recv().await {
                    Ok(frame) => {
                        if frame.request_id == 0 {
                            let ev = match frame.msg {
                                Message::SwitchTopo { topology } => {
                                    Unsolicited::SwitchTopo(topology)
                                }
                                Message::Fenced { reason } => {
                                    // Set before the TOMA closes the connection, so the
                                    // calls that fail with it say why.
                                    ended
                                        .lock()
                                        .get_or_insert(CallError::Closed { fenced: true });
                                    Unsolicited::Fenced {
                                        reason,
                                        client: *registered.lock(),
                                    }
                                }
                                other => {
                                    debug!(?other, "unsolicited message ignored");
                                    continue;
                                }
                            };
                            let _ = events.send((tag, ev));
                        } else if let Some(tx) = p.lock().remove(&frame.request_id) {
                            let _ = tx.send(frame.msg);
                        } else if let Some(unit) = u.lock().remove(&frame.request_id) {
                            woken.notify_waiters();
                            if let Message::Error {
                                code: ErrorCode::StaleGeneration | ErrorCode::Busy,
                                ..
                            } = frame.msg
                            {
                                let _ = events.send((tag, Unsolicited::UnlockRefused(unit)));
                            }
                        }
                    }
                    Err(e) => {
                        debug!(disk = %tag, error = %e, "connection ended");
                        p.lock().clear();
                        u.lock().clear();
                        woken.notify_waiters();
                        let _ = events.send((tag, Unsolicited::Closed));
                        return;
                    }
                }
            }
        });
        Ok(Arc::new(Session {
            sender,
            pending,
            unlocks,
            unlocked,
            end,
            registered_as,
            next_id: AtomicU64::new(1),
            volume,
            timeout,
        }))
    }

    /// Records the client id this session registered as.
    pub fn set_registered_as(&self, client: toma_wire::ClientId) {
        *self.registered_as.lock() = Some(client);
    }

    /// The client id this session registered as, once it has.
    pub fn registered_as(&self) -> Option<toma_wire::ClientId> {
        *self.registered_as.lock()
    }

    pub fn is_closed(&self) -> bool {
        self.sender.is_closed()
    }

    /// Closes the session; calls still waiting fail with [`CallError::Closed`].
    pub fn close(&self) {
        self.close_as(false);
    }

    /// Closes the session because this client was fenced: calls still waiting fail with
    /// `Closed { fenced: true }` (the caller must forget the locks it held).
    pub fn close_fenced(&self) {
        self.close_as(true);
    }

    fn close_as(&self, fenced: bool) {
        self.end.lock().get_or_insert(CallError::Closed { fenced });
        self.sender.close();
    }

    /// A failed call's error: why the session ended, when known, else `e`.
    fn ended_or(&self, e: CallError) -> CallError {
        self.end.lock().clone().unwrap_or(e)
    }

    /// Sends `msg` under `generation` and waits for its reply. `Error` replies become
    /// `CallError::Refused`.
    ///
    /// A LOCK first waits for the reply to an UNLOCK of the same unit this session sent
    /// without waiting ([`unlock`](Self::unlock)): were the LOCK served first (a transport
    /// or a TOMA that does not keep a connection's order), it would find the unit still
    /// held by this client and succeed, and the late UNLOCK would then free the lock the
    /// client believes it holds — another writer could interleave (for RAID6 a
    /// read-modify-write of the same stripe, which loses a write).
    pub async fn call(&self, generation: Generation, msg: Message) -> Result<Message, CallError> {
        if let Message::Lock { unit } = msg {
            self.wait_unlocked(unit).await?;
        }
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let (tx, rx) = oneshot::channel();
        self.pending.lock().insert(id, tx);
        let frame = Frame::new(id, self.volume, generation, msg);
        if let Err(e) = self.sender.send(&frame).await {
            self.pending.lock().remove(&id);
            return Err(self.ended_or(CallError::Unreachable(e.to_string())));
        }
        match tokio::time::timeout(self.timeout, rx).await {
            Ok(Ok(Message::Error { code, message })) => Err(CallError::Refused { code, message }),
            Ok(Ok(m)) => Ok(m),
            Ok(Err(_)) => Err(self.ended_or(CallError::Unreachable(format!(
                "connection to {} ended",
                self.sender.peer()
            )))),
            Err(_) => {
                self.pending.lock().remove(&id);
                Err(self.ended_or(CallError::Unreachable(format!(
                    "{} did not answer within {:?}",
                    self.sender.peer(),
                    self.timeout
                ))))
            }
        }
    }

    /// Waits until no UNLOCK of `unit` sent by [`unlock`](Self::unlock) awaits its reply.
    async fn wait_unlocked(&self, unit: u64) -> Result<(), CallError> {
        let deadline = tokio::time::Instant::now() + self.timeout;
        loop {
            let woken = self.unlocked.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if !self.unlocks.lock().values().any(|&u| u == unit) {
                return Ok(());
            }
            if tokio::time::timeout_at(deadline, woken).await.is_err() {
                return Err(self.ended_or(CallError::Unreachable(format!(
                    "{} did not answer an UNLOCK of unit {unit} within {:?}",
                    self.sender.peer(),
                    self.timeout
                ))));
            }
        }
    }

    /// Sends UNLOCK of `unit` without waiting for the reply; a refusal for the generation
    /// comes back as [`Unsolicited::UnlockRefused`].
    pub async fn unlock(&self, generation: Generation, unit: u64) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.unlocks.lock().insert(id, unit);
        let frame = Frame::new(id, self.volume, generation, Message::Unlock { unit });
        if self.sender.send(&frame).await.is_err() {
            self.unlocks.lock().remove(&id);
        }
    }

    /// Sends without waiting for a reply (ACK_TOPO).
    pub async fn tell(&self, generation: Generation, msg: Message) {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let _ = self
            .sender
            .send(&Frame::new(id, self.volume, generation, msg))
            .await;
    }
}
