//! The frame: a fixed 48-byte header, then the payload of one [`Message`].
//!
//! ```text
//! offset size field
//!      0    4 magic           b"TOMA" (u32 LE 0x414d4f54)
//!      4    1 version         1
//!      5    1 kind            Kind as u8
//!      6    2 flags           reserved, must be 0
//!      8    8 request id      0 only for unsolicited messages (SWITCH_TOPO, FENCED) and
//!                             for an ERROR about the connection itself (sent before closing)
//!     16   16 volume          volume UUID (u128 LE)
//!     32    8 generation      topology generation the sender uses
//!     40    4 payload length  at most MAX_PAYLOAD
//!     44    4 crc32c          over the header with this field zeroed, then the payload
//!     48    … payload
//! ```
//!
//! All integers are little-endian. Decoding never panics, refuses a header announcing more
//! than [`MAX_PAYLOAD`] before allocating anything, and allocates at most the announced
//! length.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use toma_core::{DiskId, Generation, Layout, LockMode, Member, NodeId, Role, Topology, VolumeId};

use crate::error::WireError;
use crate::message::{
    ErrorCode, Kind, LockEntry, Message, Secret, MAX_DIRTY_UNITS, MAX_IO_LEN, MAX_MEMBERS,
    MAX_NAME_LEN, MAX_TEXT_LEN, MEMBER_MASK,
};

/// `b"TOMA"` read as a little-endian u32.
pub const MAGIC: u32 = u32::from_le_bytes(*b"TOMA");
/// The frame format version this build speaks.
pub const VERSION: u8 = 1;
/// Size of the fixed header.
pub const HEADER_LEN: usize = 48;
/// Largest payload: a 16 MiB chunk plus 64 KiB for the fields around it.
pub const MAX_PAYLOAD: u32 = 16 * 1024 * 1024 + 64 * 1024;

const CRC_OFFSET: usize = 44;

/// One message with the header fields that travel with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Frame {
    /// Chosen by the requester, unique among its requests in flight on the connection;
    /// copied into the reply. 0 only for unsolicited messages.
    pub request_id: u64,
    pub volume: VolumeId,
    /// The topology generation the sender uses.
    pub generation: Generation,
    pub msg: Message,
}

/// The decoded fixed header of a frame (its checksum not yet verified).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub request_id: u64,
    pub volume: VolumeId,
    pub generation: Generation,
    pub payload_len: u32,
    pub crc: u32,
}

impl Header {
    /// Header plus payload.
    pub fn frame_len(&self) -> usize {
        HEADER_LEN + self.payload_len as usize
    }
}

/// An encoded frame, in two parts so that bulk data is never copied: `head` (header and the
/// small fields) and `tail` (the data of `WRITE`, `DATA`, `DATA_LOCK`, `DIRTY`; else empty).
/// Send `head` then `tail`.
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub head: Bytes,
    pub tail: Bytes,
}

impl EncodedFrame {
    pub fn len(&self) -> usize {
        self.head.len() + self.tail.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole frame in one buffer (copies `tail`).
    pub fn to_bytes(&self) -> Bytes {
        let mut b = BytesMut::with_capacity(self.len());
        b.extend_from_slice(&self.head);
        b.extend_from_slice(&self.tail);
        b.freeze()
    }
}

impl Frame {
    pub fn new(request_id: u64, volume: VolumeId, generation: Generation, msg: Message) -> Self {
        Frame {
            request_id,
            volume,
            generation,
            msg,
        }
    }

    /// A reply to this frame: same request id, volume and generation.
    pub fn reply(&self, msg: Message) -> Frame {
        Frame {
            request_id: self.request_id,
            volume: self.volume,
            generation: self.generation,
            msg,
        }
    }

    pub fn kind(&self) -> Kind {
        self.msg.kind()
    }

    /// Encodes the frame, or says which field is out of the limits a peer would refuse.
    pub fn encode(&self) -> Result<EncodedFrame, WireError> {
        validate(self)?;
        let mut head = BytesMut::with_capacity(HEADER_LEN + 64);
        head.resize(HEADER_LEN, 0);
        let tail = encode_payload(&self.msg, &mut head);
        let payload_len = (head.len() - HEADER_LEN) as u64 + tail.len() as u64;
        if payload_len > u64::from(MAX_PAYLOAD) {
            return Err(WireError::Oversized {
                len: payload_len,
                max: MAX_PAYLOAD,
            });
        }
        {
            let mut h = &mut head[..HEADER_LEN];
            h.put_u32_le(MAGIC);
            h.put_u8(VERSION);
            h.put_u8(self.kind() as u8);
            h.put_u16_le(0);
            h.put_u64_le(self.request_id);
            h.put_u128_le(self.volume.0);
            h.put_u64_le(self.generation);
            h.put_u32_le(payload_len as u32);
            h.put_u32_le(0);
        }
        let crc = crc32c::crc32c_append(crc32c::crc32c(&head), &tail);
        head[CRC_OFFSET..HEADER_LEN].copy_from_slice(&crc.to_le_bytes());
        Ok(EncodedFrame {
            head: head.freeze(),
            tail,
        })
    }

    /// The whole frame in one buffer.
    pub fn to_bytes(&self) -> Result<Bytes, WireError> {
        Ok(self.encode()?.to_bytes())
    }
}

/// Decodes and checks a frame header (not its checksum: that needs the payload).
/// `buf` may hold more than the header.
pub fn decode_header(buf: &[u8]) -> Result<Header, WireError> {
    if buf.len() < HEADER_LEN {
        return Err(WireError::Truncated {
            what: "frame header",
            need: HEADER_LEN,
            have: buf.len(),
        });
    }
    let mut h = &buf[..HEADER_LEN];
    let magic = h.get_u32_le();
    if magic != MAGIC {
        return Err(WireError::BadMagic { got: magic });
    }
    let version = h.get_u8();
    if version != VERSION {
        return Err(WireError::UnsupportedVersion {
            got: version,
            supported: VERSION,
        });
    }
    let kind_byte = h.get_u8();
    let kind = Kind::from_u8(kind_byte).ok_or(WireError::UnknownKind { kind: kind_byte })?;
    let flags = h.get_u16_le();
    if flags != 0 {
        return Err(WireError::range(
            "frame header",
            "flags",
            format!("{flags:#06x}: no flags are defined in version {VERSION}"),
        ));
    }
    let request_id = h.get_u64_le();
    let volume = VolumeId(h.get_u128_le());
    let generation = h.get_u64_le();
    let payload_len = h.get_u32_le();
    if payload_len > MAX_PAYLOAD {
        return Err(WireError::Oversized {
            len: u64::from(payload_len),
            max: MAX_PAYLOAD,
        });
    }
    let crc = h.get_u32_le();
    Ok(Header {
        kind,
        request_id,
        volume,
        generation,
        payload_len,
        crc,
    })
}

/// Decodes exactly one frame from `buf`: no byte missing, none left over.
pub fn decode_frame(buf: &[u8]) -> Result<Frame, WireError> {
    let header = decode_header(buf)?;
    let total = header.frame_len();
    if buf.len() < total {
        return Err(WireError::Truncated {
            what: "frame payload",
            need: total,
            have: buf.len(),
        });
    }
    if buf.len() > total {
        return Err(WireError::TrailingBytes {
            kind: "frame",
            extra: buf.len() - total,
        });
    }
    check_crc(&header, &buf[..HEADER_LEN], &buf[HEADER_LEN..total])?;
    let payload = Bytes::copy_from_slice(&buf[HEADER_LEN..total]);
    finish(header, payload)
}

/// Where a `WRITE` frame's data starts: after the header and the 8-byte offset. A reader
/// that lands this byte on an aligned address hands the data to `O_DIRECT` without a copy.
pub const WRITE_DATA_AT: usize = HEADER_LEN + 8;

/// The length of the `WRITE` frame `buf` starts with (its header complete and valid), or
/// `None` (another kind, or a header not complete or invalid: [`decode_from`] says which).
pub fn write_frame_len(buf: &[u8]) -> Option<usize> {
    let header = decode_header(buf).ok()?;
    (header.kind == Kind::Write).then(|| header.frame_len())
}

/// Decodes exactly one frame that fills `frame`, sharing its memory (no copy of the data).
pub fn decode_frame_bytes(frame: Bytes) -> Result<Frame, WireError> {
    let header = decode_header(&frame)?;
    let total = header.frame_len();
    if frame.len() != total {
        return Err(if frame.len() < total {
            WireError::Truncated {
                what: "frame payload",
                need: total,
                have: frame.len(),
            }
        } else {
            WireError::TrailingBytes {
                kind: "frame",
                extra: frame.len() - total,
            }
        });
    }
    check_crc(&header, &frame[..HEADER_LEN], &frame[HEADER_LEN..])?;
    finish(header, frame.slice(HEADER_LEN..))
}

/// Stream decoding: if `buf` starts with a complete frame, removes it from `buf` and returns
/// it (bulk data shares `buf`'s memory, no copy). `Ok(None)`: more bytes are needed; by then
/// the header has been checked and `buf` has room reserved for the rest of the frame.
/// An `Err` means the stream is unusable: close the connection.
pub fn decode_from(buf: &mut BytesMut) -> Result<Option<Frame>, WireError> {
    if buf.len() < HEADER_LEN {
        return Ok(None);
    }
    let header = decode_header(buf)?;
    let total = header.frame_len();
    if buf.len() < total {
        buf.reserve(total - buf.len());
        return Ok(None);
    }
    let mut frame = buf.split_to(total);
    check_crc(&header, &frame[..HEADER_LEN], &frame[HEADER_LEN..])?;
    let payload = frame.split_off(HEADER_LEN).freeze();
    finish(header, payload).map(Some)
}

fn check_crc(header: &Header, head: &[u8], payload: &[u8]) -> Result<(), WireError> {
    let crc = crc32c::crc32c(&head[..CRC_OFFSET]);
    let crc = crc32c::crc32c_append(crc, &[0; 4]);
    let crc = crc32c::crc32c_append(crc, payload);
    if crc != header.crc {
        return Err(WireError::Checksum {
            expected: header.crc,
            computed: crc,
        });
    }
    Ok(())
}

fn finish(header: Header, payload: Bytes) -> Result<Frame, WireError> {
    let msg = decode_payload(header.kind, payload)?;
    let frame = Frame {
        request_id: header.request_id,
        volume: header.volume,
        generation: header.generation,
        msg,
    };
    validate(&frame)?;
    Ok(frame)
}

// ---------------------------------------------------------------- validation

/// The limits both sides enforce, on encode and on decode.
fn validate(frame: &Frame) -> Result<(), WireError> {
    let kind = frame.kind();
    let k = kind.name();
    let r = |field: &'static str, reason: String| Err(WireError::range(k, field, reason));
    if kind.is_unsolicited() && frame.request_id != 0 {
        return r(
            "request id",
            format!(
                "{}: unsolicited messages carry request id 0",
                frame.request_id
            ),
        );
    }
    if !kind.is_unsolicited() && kind != Kind::Error && frame.request_id == 0 {
        return r(
            "request id",
            "0: only unsolicited messages and connection-level errors carry request id 0".into(),
        );
    }
    let io_len = |field: &'static str, offset: u64, len: u64| {
        if len == 0 || len > u64::from(MAX_IO_LEN) {
            return r(field, format!("{len}: must be 1..={MAX_IO_LEN} bytes"));
        }
        if offset.checked_add(len).is_none() {
            return r(
                "offset",
                format!("{offset} + {len} overflows a 64-bit offset"),
            );
        }
        Ok(())
    };
    let data_len = |field: &'static str, len: usize| {
        if len > MAX_IO_LEN as usize {
            return r(field, format!("{len} bytes: at most {MAX_IO_LEN}"));
        }
        Ok(())
    };
    let targets = |t: u16| {
        if t == 0 || t & !MEMBER_MASK != 0 {
            return r(
                "targets",
                format!("{t:#06x}: a non-empty bitmask of members 0..{MAX_MEMBERS}"),
            );
        }
        Ok(())
    };
    let member = |field: &'static str, m: u8| {
        if m >= MAX_MEMBERS {
            return r(field, format!("{m}: members are numbered 0..{MAX_MEMBERS}"));
        }
        Ok(())
    };
    let text = |field: &'static str, s: &str| {
        if s.len() > MAX_TEXT_LEN {
            return r(field, format!("{} bytes: at most {MAX_TEXT_LEN}", s.len()));
        }
        Ok(())
    };
    let range = |units: &std::ops::Range<u64>| {
        if units.start > units.end {
            return r(
                "units",
                format!("{}..{}: start after end", units.start, units.end),
            );
        }
        Ok(())
    };
    let topo = |t: &Topology| {
        t.validate()
            .map_err(|source| WireError::InvalidTopology { kind: k, source })?;
        if t.volume != frame.volume {
            return r(
                "topology.volume",
                format!(
                    "{} differs from the frame's volume {}",
                    t.volume, frame.volume
                ),
            );
        }
        for (i, m) in t.members.iter().enumerate() {
            if m.node.0.len() > MAX_NAME_LEN {
                return Err(WireError::range(
                    k,
                    "topology.members[].node",
                    format!(
                        "members[{i}].node is {} bytes: at most {MAX_NAME_LEN}",
                        m.node.0.len()
                    ),
                ));
            }
        }
        Ok(())
    };
    match &frame.msg {
        Message::Read { offset, len } => io_len("len", *offset, u64::from(*len)),
        Message::ReadTestLock { offset, len, .. } => io_len("len", *offset, u64::from(*len)),
        Message::Write { offset, data } => io_len("data", *offset, data.len() as u64),
        Message::SetDirty { targets: t, .. } | Message::ClearDirty { targets: t, .. } => {
            targets(*t)
        }
        Message::ReportUnreachable { member: m } => member("member", *m),
        Message::Intent { data, .. } => {
            if data.is_empty() {
                return r(
                    "data",
                    "empty: an intent carries the columns the write leaves".into(),
                );
            }
            data_len("data", data.len())
        }
        Message::GetLocks { units } => range(units),
        Message::GetDirty { target, units } => {
            member("target", *target)?;
            range(units)?;
            if units.end - units.start > MAX_DIRTY_UNITS {
                return r(
                    "units",
                    format!(
                        "{} units: at most {MAX_DIRTY_UNITS} per request",
                        units.end - units.start
                    ),
                );
            }
            Ok(())
        }
        Message::Data { data } => data_len("data", data.len()),
        Message::DataLock { data, .. } => data_len("data", data.len()),
        Message::Dirty { bits, .. } => data_len("bits", bits.len()),
        Message::Error { message, .. } => text("message", message),
        Message::Fenced { reason } => text("reason", reason),
        Message::Registered { topology } | Message::SwitchTopo { topology } => topo(topology),
        Message::Register { .. }
        | Message::Lock { .. }
        | Message::Unlock { .. }
        | Message::Flush
        | Message::AckTopo { .. }
        | Message::FenceClient { .. }
        | Message::ReleaseLock { .. }
        | Message::PutLocks { .. }
        | Message::Ok
        | Message::Locked { .. }
        | Message::Locks { .. } => Ok(()),
    }
}

// ---------------------------------------------------------------- payload encoding

/// Appends the message's small fields to `b`; returns its bulk data (possibly empty).
fn encode_payload(msg: &Message, b: &mut BytesMut) -> Bytes {
    match msg {
        Message::Register {
            client,
            secret,
            held_locks,
        } => {
            b.put_u128_le(*client);
            b.put_slice(&secret.0);
            b.put_u32_le(held_locks.len() as u32);
            for u in held_locks {
                b.put_u64_le(*u);
            }
        }
        Message::Read { offset, len } => {
            b.put_u64_le(*offset);
            b.put_u32_le(*len);
        }
        Message::ReadTestLock { unit, offset, len } => {
            b.put_u64_le(*unit);
            b.put_u64_le(*offset);
            b.put_u32_le(*len);
        }
        Message::Write { offset, data } => {
            b.put_u64_le(*offset);
            return data.clone();
        }
        Message::Lock { unit } | Message::Unlock { unit } => b.put_u64_le(*unit),
        Message::SetDirty { unit, targets } | Message::ClearDirty { unit, targets } => {
            b.put_u64_le(*unit);
            b.put_u16_le(*targets);
        }
        Message::Flush | Message::Ok => {}
        Message::AckTopo { generation } => b.put_u64_le(*generation),
        Message::ReportUnreachable { member } => b.put_u8(*member),
        Message::Intent { unit, column, data } => {
            b.put_u64_le(*unit);
            b.put_u32_le(*column);
            return data.clone();
        }
        Message::FenceClient { client } => b.put_u128_le(*client),
        Message::ReleaseLock { unit, client } => {
            b.put_u64_le(*unit);
            b.put_u128_le(*client);
        }
        Message::GetLocks { units } => {
            b.put_u64_le(units.start);
            b.put_u64_le(units.end);
        }
        Message::PutLocks { locks } | Message::Locks { locks } => put_locks(b, locks),
        Message::GetDirty { target, units } => {
            b.put_u8(*target);
            b.put_u64_le(units.start);
            b.put_u64_le(units.end);
        }
        Message::Registered { topology } | Message::SwitchTopo { topology } => {
            put_topology(b, topology)
        }
        Message::Data { data } => return data.clone(),
        Message::DataLock { locked, data } => {
            b.put_u8(u8::from(*locked));
            return data.clone();
        }
        Message::Locked { holder } => b.put_u128_le(*holder),
        Message::Error { code, message } => {
            b.put_u16_le(*code as u16);
            put_text(b, message);
        }
        Message::Dirty { first, bits } => {
            b.put_u64_le(*first);
            return bits.clone();
        }
        Message::Fenced { reason } => put_text(b, reason),
    }
    Bytes::new()
}

fn put_locks(b: &mut BytesMut, locks: &[LockEntry]) {
    b.put_u32_le(locks.len() as u32);
    for l in locks {
        b.put_u64_le(l.unit);
        b.put_u128_le(l.client);
    }
}

/// Text was checked against `MAX_TEXT_LEN` (< u16::MAX) by `validate`.
fn put_text(b: &mut BytesMut, s: &str) {
    b.put_u16_le(s.len() as u16);
    b.put_slice(s.as_bytes());
}

fn put_topology(b: &mut BytesMut, t: &Topology) {
    b.put_u128_le(t.volume.0);
    b.put_u64_le(t.generation);
    match t.layout {
        Layout::Raid1 { mirrors } => {
            b.put_u8(1);
            b.put_u8(mirrors);
        }
        Layout::Raid6 { data } => {
            b.put_u8(2);
            b.put_u8(data);
        }
    }
    b.put_u32_le(t.chunk_size);
    b.put_u8(match t.lock_mode {
        LockMode::Interleaved => 0,
        LockMode::DualLock => 1,
    });
    b.put_u8(u8::from(t.rebuild));
    // validate() bounds the member count by the layout (at most MAX_MEMBERS).
    b.put_u8(t.members.len() as u8);
    for m in &t.members {
        b.put_u128_le(m.disk.0);
        // validate() bounds node names to MAX_NAME_LEN (255).
        b.put_u8(m.node.0.len() as u8);
        b.put_slice(m.node.0.as_bytes());
        b.put_u8(match m.role {
            Role::Rwl => 0,
            Role::W => 1,
            Role::Wl => 2,
            Role::Dead => 3,
        });
        b.put_u8(u8::from(m.full_rebuild) | (u8::from(m.last_good) << 1));
    }
}

// ---------------------------------------------------------------- payload decoding

/// A cursor over a payload; every read checks that the bytes are there.
struct Rd {
    kind: &'static str,
    buf: Bytes,
}

impl Rd {
    fn need(&self, n: usize) -> Result<(), WireError> {
        if self.buf.len() < n {
            return Err(WireError::Truncated {
                what: self.kind,
                need: n,
                have: self.buf.len(),
            });
        }
        Ok(())
    }
    fn u8(&mut self) -> Result<u8, WireError> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }
    fn u16(&mut self) -> Result<u16, WireError> {
        self.need(2)?;
        Ok(self.buf.get_u16_le())
    }
    fn u32(&mut self) -> Result<u32, WireError> {
        self.need(4)?;
        Ok(self.buf.get_u32_le())
    }
    fn u64(&mut self) -> Result<u64, WireError> {
        self.need(8)?;
        Ok(self.buf.get_u64_le())
    }
    fn u128(&mut self) -> Result<u128, WireError> {
        self.need(16)?;
        Ok(self.buf.get_u128_le())
    }
    fn bool(&mut self, field: &'static str) -> Result<bool, WireError> {
        match self.u8()? {
            0 => Ok(false),
            1 => Ok(true),
            v => Err(WireError::range(
                self.kind,
                field,
                format!("{v}: a boolean is 0 or 1"),
            )),
        }
    }
    fn bytes(&mut self, n: usize) -> Result<Bytes, WireError> {
        self.need(n)?;
        Ok(self.buf.split_to(n))
    }
    fn rest(&mut self) -> Bytes {
        std::mem::take(&mut self.buf)
    }
    fn string(&mut self, field: &'static str, len: usize, max: usize) -> Result<String, WireError> {
        if len > max {
            return Err(WireError::range(
                self.kind,
                field,
                format!("{len} bytes: at most {max}"),
            ));
        }
        let raw = self.bytes(len)?;
        String::from_utf8(raw.to_vec()).map_err(|_| WireError::InvalidUtf8 {
            kind: self.kind,
            field,
        })
    }
    /// A count of `elem`-byte elements that must all be in the payload: checked before
    /// anything is allocated for them.
    fn count(&mut self, field: &'static str, elem: usize) -> Result<usize, WireError> {
        let n = self.u32()? as usize;
        match n.checked_mul(elem) {
            Some(total) if total <= self.buf.len() => Ok(n),
            _ => Err(WireError::Truncated {
                what: field,
                need: n.saturating_mul(elem),
                have: self.buf.len(),
            }),
        }
    }
    fn end(self) -> Result<(), WireError> {
        if !self.buf.is_empty() {
            return Err(WireError::TrailingBytes {
                kind: self.kind,
                extra: self.buf.len(),
            });
        }
        Ok(())
    }
}

fn decode_payload(kind: Kind, payload: Bytes) -> Result<Message, WireError> {
    let mut rd = Rd {
        kind: kind.name(),
        buf: payload,
    };
    let msg = match kind {
        Kind::Register => {
            let client = rd.u128()?;
            let mut secret = [0u8; 32];
            secret.copy_from_slice(&rd.bytes(32)?);
            let n = rd.count("REGISTER held_locks", 8)?;
            let mut held_locks = Vec::with_capacity(n);
            for _ in 0..n {
                held_locks.push(rd.u64()?);
            }
            Message::Register {
                client,
                secret: Secret(secret),
                held_locks,
            }
        }
        Kind::Read => Message::Read {
            offset: rd.u64()?,
            len: rd.u32()?,
        },
        Kind::ReadTestLock => Message::ReadTestLock {
            unit: rd.u64()?,
            offset: rd.u64()?,
            len: rd.u32()?,
        },
        Kind::Write => Message::Write {
            offset: rd.u64()?,
            data: rd.rest(),
        },
        Kind::Lock => Message::Lock { unit: rd.u64()? },
        Kind::Unlock => Message::Unlock { unit: rd.u64()? },
        Kind::SetDirty => Message::SetDirty {
            unit: rd.u64()?,
            targets: rd.u16()?,
        },
        Kind::ClearDirty => Message::ClearDirty {
            unit: rd.u64()?,
            targets: rd.u16()?,
        },
        Kind::Flush => Message::Flush,
        Kind::AckTopo => Message::AckTopo {
            generation: rd.u64()?,
        },
        Kind::ReportUnreachable => Message::ReportUnreachable { member: rd.u8()? },
        Kind::Intent => Message::Intent {
            unit: rd.u64()?,
            column: rd.u32()?,
            data: rd.rest(),
        },
        Kind::FenceClient => Message::FenceClient { client: rd.u128()? },
        Kind::ReleaseLock => Message::ReleaseLock {
            unit: rd.u64()?,
            client: rd.u128()?,
        },
        Kind::GetLocks => Message::GetLocks {
            units: rd.u64()?..rd.u64()?,
        },
        Kind::PutLocks => Message::PutLocks {
            locks: get_locks(&mut rd)?,
        },
        Kind::GetDirty => Message::GetDirty {
            target: rd.u8()?,
            units: rd.u64()?..rd.u64()?,
        },
        Kind::Ok => Message::Ok,
        Kind::Registered => Message::Registered {
            topology: get_topology(&mut rd)?,
        },
        Kind::Data => Message::Data { data: rd.rest() },
        Kind::DataLock => Message::DataLock {
            locked: rd.bool("locked")?,
            data: rd.rest(),
        },
        Kind::Locked => Message::Locked { holder: rd.u128()? },
        Kind::Error => {
            let raw = rd.u16()?;
            let code = ErrorCode::from_u16(raw).ok_or_else(|| {
                WireError::range(rd.kind, "code", format!("{raw}: no such error code"))
            })?;
            let len = usize::from(rd.u16()?);
            Message::Error {
                code,
                message: rd.string("message", len, MAX_TEXT_LEN)?,
            }
        }
        Kind::Locks => Message::Locks {
            locks: get_locks(&mut rd)?,
        },
        Kind::Dirty => Message::Dirty {
            first: rd.u64()?,
            bits: rd.rest(),
        },
        Kind::SwitchTopo => Message::SwitchTopo {
            topology: get_topology(&mut rd)?,
        },
        Kind::Fenced => {
            let len = usize::from(rd.u16()?);
            Message::Fenced {
                reason: rd.string("reason", len, MAX_TEXT_LEN)?,
            }
        }
    };
    rd.end()?;
    Ok(msg)
}

fn get_locks(rd: &mut Rd) -> Result<Vec<LockEntry>, WireError> {
    let n = rd.count("locks", 24)?;
    let mut locks = Vec::with_capacity(n);
    for _ in 0..n {
        locks.push(LockEntry {
            unit: rd.u64()?,
            client: rd.u128()?,
        });
    }
    Ok(locks)
}

fn get_topology(rd: &mut Rd) -> Result<Topology, WireError> {
    let volume = VolumeId(rd.u128()?);
    let generation = rd.u64()?;
    let tag = rd.u8()?;
    let param = rd.u8()?;
    let layout = match tag {
        1 => Layout::Raid1 { mirrors: param },
        2 => Layout::Raid6 { data: param },
        t => {
            return Err(WireError::range(
                rd.kind,
                "topology.layout",
                format!("{t}: 1 (raid1) or 2 (raid6)"),
            ))
        }
    };
    let chunk_size = rd.u32()?;
    let lock_mode = match rd.u8()? {
        0 => LockMode::Interleaved,
        1 => LockMode::DualLock,
        v => {
            return Err(WireError::range(
                rd.kind,
                "topology.lockMode",
                format!("{v}: 0 (Interleaved) or 1 (DualLock)"),
            ))
        }
    };
    let rebuild = rd.bool("topology.rebuild")?;
    let n = rd.u8()?;
    if n > MAX_MEMBERS {
        return Err(WireError::range(
            rd.kind,
            "topology.members",
            format!("{n} members: at most {MAX_MEMBERS}"),
        ));
    }
    let mut members = Vec::with_capacity(usize::from(n));
    for _ in 0..n {
        let disk = DiskId(rd.u128()?);
        let len = usize::from(rd.u8()?);
        let node = NodeId(rd.string("topology.members[].node", len, MAX_NAME_LEN)?);
        let role = match rd.u8()? {
            0 => Role::Rwl,
            1 => Role::W,
            2 => Role::Wl,
            3 => Role::Dead,
            v => {
                return Err(WireError::range(
                    rd.kind,
                    "topology.members[].role",
                    format!("{v}: 0 (RWL), 1 (W), 2 (WL) or 3 (DEAD)"),
                ))
            }
        };
        let flags = rd.u8()?;
        if flags & !0b11 != 0 {
            return Err(WireError::range(
                rd.kind,
                "topology.members[].flags",
                format!("{flags:#04x}: only bits 0 (fullRebuild) and 1 (lastGood) exist"),
            ));
        }
        members.push(Member {
            disk,
            node,
            role,
            full_rebuild: flags & 1 != 0,
            last_good: flags & 2 != 0,
        });
    }
    // `validate` (after decoding) runs Topology::validate and names the failing field.
    Ok(Topology {
        volume,
        generation,
        layout,
        chunk_size,
        members,
        lock_mode,
        rebuild,
    })
}
