//! The messages of the datapath (client ↔ a member's TOMA) and of TOMA ↔ TOMA calls.
//!
//! One enum, [`Message`], holds every kind, requests and replies alike; a [`crate::Frame`]
//! carries one message plus the request id, volume and generation of the header. A message's
//! [`Kind`] is the `kind` byte of the frame header.
//!
//! Request → reply pairs (every reply carries the request id of its request):
//!
//! | request (client → TOMA) | replies |
//! |---|---|
//! | [`Message::Register`] | [`Message::Registered`] (the TOMA's current topology), `Error` |
//! | [`Message::Read`] | [`Message::Data`], `Error` |
//! | [`Message::ReadTestLock`] | [`Message::DataLock`], `Error` |
//! | [`Message::Write`] | [`Message::Ok`], `Error` |
//! | [`Message::Lock`] | [`Message::Ok`] (granted), [`Message::Locked`] (busy: retry), `Error` |
//! | [`Message::Unlock`], [`Message::SetDirty`], [`Message::ClearDirty`], [`Message::Flush`], [`Message::ReportUnreachable`], [`Message::Intent`] | [`Message::Ok`], `Error` |
//! | [`Message::AckTopo`] | none needed; a TOMA may answer [`Message::Ok`] |
//!
//! | request (TOMA → TOMA) | replies |
//! |---|---|
//! | [`Message::FenceClient`] | [`Message::Ok`] once nothing of that client is applied there any more |
//! | [`Message::GetLocks`] | [`Message::Locks`] |
//! | [`Message::PutLocks`] | [`Message::Ok`] |
//! | [`Message::GetDirty`] | [`Message::Dirty`] |
//! | [`Message::ReleaseLock`] | [`Message::Ok`] (frees `unit` if `client` still holds it) |
//!
//! Unsolicited (TOMA → client, request id 0): [`Message::SwitchTopo`], [`Message::Fenced`].
//! Any request may be answered with [`Message::Error`]. An `Error` with request id 0 is about
//! the connection itself (e.g. the peer sent a malformed frame) and is followed by its close.

use std::fmt;
use std::ops::Range;

use bytes::Bytes;
use toma_core::Topology;

/// A client, named by the UUID it registers with.
pub type ClientId = u128;

/// Largest `len` of a read and largest `data` of a write: one chunk of the largest size.
pub const MAX_IO_LEN: u32 = 16 * 1024 * 1024;
/// Largest node name in a topology, in bytes of UTF-8.
pub const MAX_NAME_LEN: usize = 255;
/// Largest human-readable text (`Error.message`, `Fenced.reason`), in bytes of UTF-8.
pub const MAX_TEXT_LEN: usize = 4096;
/// Members are numbered `0..MAX_MEMBERS` (RAID6 with 8 data members + P + Q).
pub const MAX_MEMBERS: u8 = 10;
/// Bits of a member bitmask that may be set.
pub const MEMBER_MASK: u16 = (1 << MAX_MEMBERS) - 1;
/// Largest number of units a [`Message::GetDirty`] may ask about (so the bitmap fits a frame).
pub const MAX_DIRTY_UNITS: u64 = MAX_IO_LEN as u64 * 8;

/// The per-volume secret a client proves it may attach with. Its `Debug` never prints it.
#[derive(Clone, PartialEq, Eq, Hash)]
pub struct Secret(pub [u8; 32]);

impl Secret {
    /// Compares in time independent of where the secrets differ.
    pub fn ct_eq(&self, other: &Secret) -> bool {
        self.0
            .iter()
            .zip(other.0.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Secret(..)")
    }
}

/// A lock held on one member: `unit` is held by `client`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct LockEntry {
    pub unit: u64,
    pub client: ClientId,
}

/// Why a request was refused. Stable numbers on the wire (`code as u16`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u16)]
pub enum ErrorCode {
    /// `Register` with a secret that is not the volume's.
    WrongSecret = 1,
    /// The volume is not served by this TOMA (no extent of it on this disk).
    UnknownVolume = 2,
    /// The frame's generation is older than `g - 1` of the newest this TOMA knows.
    StaleGeneration = 3,
    /// The client is fenced on this member: nothing of it is applied any more.
    Fenced = 4,
    /// Offset/length outside the member's extent, or a unit outside the volume.
    OutOfRange = 5,
    /// A request other than `Register` on a connection that has not registered.
    NotRegistered = 6,
    /// `Unlock` (or a locked write) of a unit this client does not hold.
    NotLockHolder = 7,
    /// The disk failed the I/O.
    Io = 8,
    /// Try again later (e.g. the TOMA restarted and is in its lock grace period).
    Busy = 9,
    /// The request makes no sense here (wrong direction, wrong state).
    Invalid = 10,
}

impl ErrorCode {
    pub const ALL: [ErrorCode; 10] = [
        ErrorCode::WrongSecret,
        ErrorCode::UnknownVolume,
        ErrorCode::StaleGeneration,
        ErrorCode::Fenced,
        ErrorCode::OutOfRange,
        ErrorCode::NotRegistered,
        ErrorCode::NotLockHolder,
        ErrorCode::Io,
        ErrorCode::Busy,
        ErrorCode::Invalid,
    ];

    pub fn from_u16(v: u16) -> Option<ErrorCode> {
        ErrorCode::ALL.iter().copied().find(|c| *c as u16 == v)
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

/// Every message of the datapath and of TOMA ↔ TOMA calls. See the module docs for which
/// reply answers which request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Message {
    // ---- client → TOMA ----
    /// Attach to the volume on this member. `held_locks`: units the client still holds here
    /// after a reconnect (re-asserted during a TOMA's grace period).
    Register {
        client: ClientId,
        secret: Secret,
        held_locks: Vec<u64>,
    },
    /// Read `len` bytes at `offset` within the member's extent.
    Read { offset: u64, len: u32 },
    /// Read, and test in the same round trip whether another client holds `unit`'s lock.
    ReadTestLock { unit: u64, offset: u64, len: u32 },
    /// Write `data` at `offset` within the member's extent.
    Write { offset: u64, data: Bytes },
    /// Take `unit`'s lock on this member.
    Lock { unit: u64 },
    /// Release `unit`'s lock on this member.
    Unlock { unit: u64 },
    /// Set `unit`'s dirty bits for the members in the bitmask `targets` (bit i = member i).
    SetDirty { unit: u64, targets: u16 },
    /// Clear `unit`'s dirty bits for the members in `targets`.
    ClearDirty { unit: u64, targets: u16 },
    /// Make every acknowledged write durable.
    Flush,
    /// The client now uses `generation` and has no I/O in flight from older ones.
    AckTopo { generation: u64 },
    /// The client cannot reach member `member` of the volume.
    ReportUnreachable { member: u8 },
    /// RAID6 write intent, sent to a stripe's lock members while the client holds the
    /// stripe's lock and before it writes any shard: `data` is the k data chunks' columns
    /// `column..column + data.len() / k` as the write leaves them, chunk after chunk. Kept
    /// in RAM with the lock; if the client is fenced before it unlocks, stale-lock recovery
    /// writes these bytes instead of decoding a half-written stripe.
    Intent { unit: u64, column: u32, data: Bytes },

    // ---- TOMA → TOMA ----
    /// Fence `client` on this member: once answered `Ok`, nothing of it is applied here.
    FenceClient { client: ClientId },
    /// The locks held on this member for units in `units`.
    GetLocks { units: Range<u64> },
    /// Install these locks (RAM → RAM copy during rebuild).
    PutLocks { locks: Vec<LockEntry> },
    /// The dirty bits kept here for member `target` for units in `units`
    /// (at most [`MAX_DIRTY_UNITS`] units).
    GetDirty { target: u8, units: Range<u64> },
    /// Stale-lock recovery: free `unit`'s lock here if the (fenced) `client` still holds it.
    ReleaseLock { unit: u64, client: ClientId },

    // ---- replies ----
    /// The request succeeded.
    Ok,
    /// Answer to `Register`: the TOMA's current topology of the volume.
    Registered { topology: Topology },
    /// Answer to `Read`.
    Data { data: Bytes },
    /// Answer to `ReadTestLock`: `locked` is true when another client holds the unit.
    DataLock { locked: bool, data: Bytes },
    /// Answer to `Lock`: busy, held by `holder`; retry.
    Locked { holder: ClientId },
    /// The request was refused.
    Error { code: ErrorCode, message: String },
    /// Answer to `GetLocks`.
    Locks { locks: Vec<LockEntry> },
    /// Answer to `GetDirty`: bit i of `bits` (LSB first within each byte) is unit `first + i`.
    Dirty { first: u64, bits: Bytes },

    // ---- TOMA → client, unsolicited (request id 0) ----
    /// Use this topology from now on, then `AckTopo` it.
    SwitchTopo { topology: Topology },
    /// This client is fenced by this TOMA; it must re-register.
    Fenced { reason: String },
}

/// The `kind` byte of a frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum Kind {
    Register = 0x01,
    Read = 0x02,
    ReadTestLock = 0x03,
    Write = 0x04,
    Lock = 0x05,
    Unlock = 0x06,
    SetDirty = 0x07,
    ClearDirty = 0x08,
    Flush = 0x09,
    AckTopo = 0x0A,
    ReportUnreachable = 0x0B,
    Intent = 0x0C,
    FenceClient = 0x20,
    GetLocks = 0x21,
    PutLocks = 0x22,
    GetDirty = 0x23,
    ReleaseLock = 0x24,
    Ok = 0x40,
    Registered = 0x41,
    Data = 0x42,
    DataLock = 0x43,
    Locked = 0x44,
    Error = 0x45,
    Locks = 0x46,
    Dirty = 0x47,
    SwitchTopo = 0x60,
    Fenced = 0x61,
}

impl Kind {
    pub const ALL: [Kind; 27] = [
        Kind::Register,
        Kind::Read,
        Kind::ReadTestLock,
        Kind::Write,
        Kind::Lock,
        Kind::Unlock,
        Kind::SetDirty,
        Kind::ClearDirty,
        Kind::Flush,
        Kind::AckTopo,
        Kind::ReportUnreachable,
        Kind::Intent,
        Kind::FenceClient,
        Kind::GetLocks,
        Kind::PutLocks,
        Kind::GetDirty,
        Kind::ReleaseLock,
        Kind::Ok,
        Kind::Registered,
        Kind::Data,
        Kind::DataLock,
        Kind::Locked,
        Kind::Error,
        Kind::Locks,
        Kind::Dirty,
        Kind::SwitchTopo,
        Kind::Fenced,
    ];

    pub fn from_u8(v: u8) -> Option<Kind> {
        Kind::ALL.iter().copied().find(|k| *k as u8 == v)
    }

    /// The protocol name, as in the design (`READ_TEST_LOCK`, `SWITCH_TOPO`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Kind::Register => "REGISTER",
            Kind::Read => "READ",
            Kind::ReadTestLock => "READ_TEST_LOCK",
            Kind::Write => "WRITE",
            Kind::Lock => "LOCK",
            Kind::Unlock => "UNLOCK",
            Kind::SetDirty => "SET_DIRTY",
            Kind::ClearDirty => "CLEAR_DIRTY",
            Kind::Flush => "FLUSH",
            Kind::AckTopo => "ACK_TOPO",
            Kind::ReportUnreachable => "REPORT_UNREACHABLE",
            Kind::Intent => "INTENT",
            Kind::FenceClient => "FENCE_CLIENT",
            Kind::GetLocks => "GET_LOCKS",
            Kind::PutLocks => "PUT_LOCKS",
            Kind::GetDirty => "GET_DIRTY",
            Kind::ReleaseLock => "RELEASE_LOCK",
            Kind::Ok => "OK",
            Kind::Registered => "REGISTERED",
            Kind::Data => "DATA",
            Kind::DataLock => "DATA_LOCK",
            Kind::Locked => "LOCKED",
            Kind::Error => "ERROR",
            Kind::Locks => "LOCKS",
            Kind::Dirty => "DIRTY",
            Kind::SwitchTopo => "SWITCH_TOPO",
            Kind::Fenced => "FENCED",
        }
    }

    /// A request that expects a reply (everything below `0x40`).
    pub fn is_request(self) -> bool {
        (self as u8) < 0x40
    }

    /// A reply to a request (`0x40..0x60`).
    pub fn is_reply(self) -> bool {
        (0x40..0x60).contains(&(self as u8))
    }

    /// Sent by a TOMA on its own, with request id 0.
    pub fn is_unsolicited(self) -> bool {
        (self as u8) >= 0x60
    }
}

impl fmt::Display for Kind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl Message {
    pub fn kind(&self) -> Kind {
        match self {
            Message::Register { .. } => Kind::Register,
            Message::Read { .. } => Kind::Read,
            Message::ReadTestLock { .. } => Kind::ReadTestLock,
            Message::Write { .. } => Kind::Write,
            Message::Lock { .. } => Kind::Lock,
            Message::Unlock { .. } => Kind::Unlock,
            Message::SetDirty { .. } => Kind::SetDirty,
            Message::ClearDirty { .. } => Kind::ClearDirty,
            Message::Flush => Kind::Flush,
            Message::AckTopo { .. } => Kind::AckTopo,
            Message::ReportUnreachable { .. } => Kind::ReportUnreachable,
            Message::Intent { .. } => Kind::Intent,
            Message::FenceClient { .. } => Kind::FenceClient,
            Message::GetLocks { .. } => Kind::GetLocks,
            Message::PutLocks { .. } => Kind::PutLocks,
            Message::GetDirty { .. } => Kind::GetDirty,
            Message::ReleaseLock { .. } => Kind::ReleaseLock,
            Message::Ok => Kind::Ok,
            Message::Registered { .. } => Kind::Registered,
            Message::Data { .. } => Kind::Data,
            Message::DataLock { .. } => Kind::DataLock,
            Message::Locked { .. } => Kind::Locked,
            Message::Error { .. } => Kind::Error,
            Message::Locks { .. } => Kind::Locks,
            Message::Dirty { .. } => Kind::Dirty,
            Message::SwitchTopo { .. } => Kind::SwitchTopo,
            Message::Fenced { .. } => Kind::Fenced,
        }
    }

    /// An `Error` reply; `message` is cut (at a character boundary) to [`MAX_TEXT_LEN`] so
    /// that it can always be sent.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Message {
        Message::Error {
            code,
            message: truncate_text(message.into()),
        }
    }

    /// A `Fenced` message; `reason` is cut to [`MAX_TEXT_LEN`] like [`Message::error`].
    pub fn fenced(reason: impl Into<String>) -> Message {
        Message::Fenced {
            reason: truncate_text(reason.into()),
        }
    }
}

fn truncate_text(mut s: String) -> String {
    if s.len() > MAX_TEXT_LEN {
        let mut end = MAX_TEXT_LEN;
        while !s.is_char_boundary(end) {
            end -= 1;
        }
        s.truncate(end);
    }
    s
}
