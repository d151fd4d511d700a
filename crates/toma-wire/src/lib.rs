//! Toma's datapath and TOMA ↔ TOMA message formats, the framed codec, and the `Transport`
//! abstraction that carries frames.
//!
//! - [`Message`]: one enum for every request, reply and unsolicited message (see
//!   [`message`] for which reply answers which request).
//! - [`Frame`]: a message with its header fields (request id, volume, generation);
//!   [`Frame::encode`], [`decode_frame`] (exactly one frame from a byte slice; the fuzz
//!   target) and [`decode_from`] (stream decoding from a `BytesMut`, zero-copy bulk data).
//!   The byte layout is documented in [`frame`].
//! - [`WireError`]: everything that can be wrong with a frame.
//! - [`transport`]: `Transport`/`Listener` produce a [`transport::Conn`], which splits into a
//!   [`transport::FrameSender`] and a [`transport::FrameReceiver`] usable from separate
//!   tasks. Implementations: TCP ([`transport::TcpTransport`]) and in-memory
//!   ([`transport::MemTransport`]); an RDMA one can be added without touching its users.
//!
//! A request and its reply, in memory (TCP is the same with `TcpTransport` and
//! `"127.0.0.1:0"`):
//!
//! ```
//! use toma_core::VolumeId;
//! use toma_wire::{Frame, Message, MemTransport, Transport};
//!
//! # #[tokio::main(flavor = "current_thread")]
//! # async fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let net = MemTransport::new();
//! let mut listener = net.listen("agent-1:0").await?;
//! let client = net.connect(&listener.local_addr()).await?;
//! let mut server = listener.accept().await?;
//!
//! let (tx, mut rx) = client.split();
//! tx.send(&Frame::new(1, VolumeId(7), 3, Message::Lock { unit: 12 })).await?;
//!
//! let req = server.recv().await?;
//! assert_eq!(req.msg, Message::Lock { unit: 12 });
//! server.send(&req.reply(Message::Ok)).await?;
//!
//! let reply = rx.recv().await?;
//! assert_eq!((reply.request_id, reply.msg), (1, Message::Ok));
//! # Ok(())
//! # }
//! ```
#![forbid(unsafe_code)]

pub mod error;
pub mod frame;
pub mod message;
pub mod transport;

pub use error::WireError;
pub use frame::{
    decode_frame, decode_from, decode_header, EncodedFrame, Frame, Header, HEADER_LEN, MAGIC,
    MAX_PAYLOAD, VERSION,
};
pub use message::{
    ClientId, ErrorCode, Kind, LockEntry, Message, Secret, MAX_DIRTY_UNITS, MAX_IO_LEN,
    MAX_MEMBERS, MAX_NAME_LEN, MAX_TEXT_LEN, MEMBER_MASK,
};
pub use transport::{
    Conn, ConnError, FrameReceiver, FrameSender, Listener, MemTransport, TcpTransport, Transport,
};
