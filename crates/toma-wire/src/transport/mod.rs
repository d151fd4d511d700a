//! Datapath connections that carry whole [`Frame`]s.
//!
//! Client and agent code never see sockets: a [`Transport`] connects to an address, a
//! [`Listener`] accepts, and both hand out a [`Conn`], which splits into a [`FrameSender`]
//! (cheap to clone, usable from any task) and a [`FrameReceiver`] (one reader task). Frames
//! are pipelined: send as many requests as you like, and match replies by `request_id`.
//!
//! Implementations:
//! - [`TcpTransport`]: tokio TCP, `TCP_NODELAY`, frames queued by many tasks are written in
//!   batches with vectored writes, and one read decodes as many frames as it brought.
//! - [`MemTransport`]: in-process, over `tokio::io::duplex` pipes through the same codec; for
//!   unit tests and the deterministic simulation.
//! - An RDMA (`ibverbs`) transport can implement the same two traits and build its `Conn`
//!   from its own queues ([`Conn::from_parts`]), without touching client or agent code.
//!
//! A connection ends for both directions when either side closes it, when the peer sends a
//! malformed frame, or on an I/O error. The receiver then yields the reason once
//! ([`ConnError`]), and later calls (and every send) return it too. A peer that sent a
//! malformed frame is told why with an `Error { code: Invalid }` of request id 0 before the
//! connection is closed; the reason is also logged (`tracing::warn!`). Conversely, a
//! received `Error` with request id 0 ends the connection: `recv` returns
//! [`ConnError::PeerError`] with its code and message.
//!
//! Every function that builds a `Conn` spawns two tokio tasks (a reader and a writer), so it
//! must run inside a tokio runtime. They end when the connection ends, or when both the
//! sender (all clones) and the receiver are dropped.

mod mem;
mod stream;
mod tcp;

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::{Arc, OnceLock};

use thiserror::Error;
use tokio::sync::{mpsc, watch};

use crate::error::WireError;
use crate::frame::{EncodedFrame, Frame};

pub use mem::{MemListener, MemTransport};
pub use stream::DEFAULT_QUEUE_DEPTH;
pub use tcp::{TcpListener, TcpTransport};

/// A boxed, sendable future (keeps [`Transport`] and [`Listener`] object-safe).
pub type BoxFuture<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Opens datapath connections. Use it as `Arc<dyn Transport>` to pick TCP, RDMA or in-memory
/// at run time.
pub trait Transport: Send + Sync {
    /// Connects to `addr` (`"host:port"` for TCP; a listener's [`Listener::local_addr`] for
    /// every transport).
    fn connect<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Conn>>;
    /// Listens on `addr` (`"127.0.0.1:0"` picks a free port; see `local_addr`).
    fn listen<'a>(&'a self, addr: &'a str) -> BoxFuture<'a, io::Result<Box<dyn Listener>>>;
}

/// Accepts datapath connections.
pub trait Listener: Send {
    /// The address peers connect to (with the port actually bound).
    fn local_addr(&self) -> String;
    /// The next connection.
    fn accept(&mut self) -> BoxFuture<'_, io::Result<Conn>>;
}

/// Why a connection ended (or why a frame was not sent).
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ConnError {
    /// Closed by either side, cleanly.
    #[error("connection closed")]
    Closed,
    /// The peer sent bytes that are not a valid frame; the connection was closed.
    #[error("connection closed: peer sent a malformed frame: {0}")]
    Malformed(WireError),
    /// The peer told us it closes the connection, and why (an `Error` with request id 0).
    #[error("connection closed by peer: {0}")]
    PeerError(String),
    /// Reading or writing failed.
    #[error("connection failed: {kind:?}: {message}")]
    Io {
        kind: io::ErrorKind,
        message: String,
    },
    /// This frame could not be encoded (a field out of the limits) and was not sent; the
    /// connection is still usable.
    #[error("frame not sent: {0}")]
    Encode(WireError),
}

impl From<io::Error> for ConnError {
    fn from(e: io::Error) -> Self {
        ConnError::Io {
            kind: e.kind(),
            message: e.to_string(),
        }
    }
}

/// State shared by the two halves of a connection and its tasks.
#[derive(Debug)]
pub(crate) struct Shared {
    /// Why the connection ended; the first reason wins.
    reason: OnceLock<ConnError>,
    /// Set to true to make both tasks stop.
    closing: watch::Sender<bool>,
    peer: String,
}

impl Shared {
    pub(crate) fn new(peer: String) -> Arc<Self> {
        Arc::new(Shared {
            reason: OnceLock::new(),
            closing: watch::Sender::new(false),
            peer,
        })
    }

    /// Ends the connection with `reason` (unless it already ended).
    pub(crate) fn close(&self, reason: ConnError) {
        let _ = self.reason.set(reason);
        self.closing.send_replace(true);
    }

    pub(crate) fn reason(&self) -> ConnError {
        self.reason.get().cloned().unwrap_or(ConnError::Closed)
    }

    pub(crate) fn is_closing(&self) -> bool {
        *self.closing.borrow()
    }

    pub(crate) fn subscribe(&self) -> watch::Receiver<bool> {
        self.closing.subscribe()
    }
}

/// One datapath connection: a sender and a receiver of frames.
#[derive(Debug)]
pub struct Conn {
    sender: FrameSender,
    receiver: FrameReceiver,
}

impl Conn {
    /// A connection over any byte stream (spawns its reader and writer tasks).
    pub fn from_stream<S>(stream: S, peer: impl Into<String>) -> Conn
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + 'static,
    {
        let (r, w) = tokio::io::split(stream);
        stream::spawn(r, w, peer.into())
    }

    /// A connection over separately owned read and write halves (e.g. a TCP stream's
    /// `into_split`, which avoids the lock of `tokio::io::split`).
    pub fn from_halves<R, W>(read: R, write: W, peer: impl Into<String>) -> Conn
    where
        R: tokio::io::AsyncRead + Unpin + Send + 'static,
        W: tokio::io::AsyncWrite + Unpin + Send + 'static,
    {
        stream::spawn(read, write, peer.into())
    }

    /// A connection whose frames are moved by the caller: `outgoing` receives what users
    /// send (already encoded), `incoming` delivers what arrived. For transports that do not
    /// move bytes through a stream (RDMA). Call [`ConnHandle::close`] when the link fails.
    pub fn from_parts(
        peer: impl Into<String>,
        queue_depth: usize,
    ) -> (
        Conn,
        mpsc::Receiver<EncodedFrame>,
        mpsc::Sender<Result<Frame, ConnError>>,
        ConnHandle,
    ) {
        let shared = Shared::new(peer.into());
        let (out_tx, out_rx) = mpsc::channel(queue_depth.max(1));
        let (in_tx, in_rx) = mpsc::channel(queue_depth.max(1));
        let conn = Conn::assemble(out_tx, in_rx, shared.clone());
        (conn, out_rx, in_tx, ConnHandle { shared })
    }

    pub(crate) fn assemble(
        out: mpsc::Sender<EncodedFrame>,
        incoming: mpsc::Receiver<Result<Frame, ConnError>>,
        shared: Arc<Shared>,
    ) -> Conn {
        Conn {
            sender: FrameSender {
                tx: out,
                shared: shared.clone(),
            },
            receiver: FrameReceiver {
                rx: incoming,
                shared,
                done: false,
            },
        }
    }

    /// The sending and receiving halves, for use from separate tasks.
    pub fn split(self) -> (FrameSender, FrameReceiver) {
        (self.sender, self.receiver)
    }

    /// Who is on the other side (an address, for logs).
    pub fn peer(&self) -> &str {
        &self.sender.shared.peer
    }

    /// Sends one frame (see [`FrameSender::send`]).
    pub async fn send(&self, frame: &Frame) -> Result<(), ConnError> {
        self.sender.send(frame).await
    }

    /// Receives one frame (see [`FrameReceiver::recv`]).
    pub async fn recv(&mut self) -> Result<Frame, ConnError> {
        self.receiver.recv().await
    }

    pub fn sender(&self) -> &FrameSender {
        &self.sender
    }

    /// Closes the connection (see [`FrameSender::close`]).
    pub fn close(&self) {
        self.sender.close()
    }
}

/// Lets a transport implementation end a connection built with [`Conn::from_parts`].
#[derive(Debug, Clone)]
pub struct ConnHandle {
    shared: Arc<Shared>,
}

impl ConnHandle {
    /// Ends the connection with `reason`; users see it from `recv` and `send`.
    pub fn close(&self, reason: ConnError) {
        self.shared.close(reason)
    }

    /// Resolves when a user (or the handle) closed the connection.
    pub async fn closed(&self) {
        let mut rx = self.shared.subscribe();
        let _ = rx.wait_for(|c| *c).await;
    }
}

/// The sending half of a connection. Clone it freely: every clone feeds the same queue, and
/// frames queued by many tasks go out in batches.
#[derive(Debug, Clone)]
pub struct FrameSender {
    tx: mpsc::Sender<EncodedFrame>,
    shared: Arc<Shared>,
}

impl FrameSender {
    /// Encodes `frame` (in the caller's task) and queues it; waits while the queue is full.
    /// `Err(ConnError::Encode)`: the frame breaks a limit and was not sent. Any other error:
    /// the connection has ended, and why.
    pub async fn send(&self, frame: &Frame) -> Result<(), ConnError> {
        let enc = frame.encode().map_err(ConnError::Encode)?;
        self.send_encoded(enc).await
    }

    /// Queues a frame that is already encoded.
    pub async fn send_encoded(&self, frame: EncodedFrame) -> Result<(), ConnError> {
        if self.shared.is_closing() {
            return Err(self.shared.reason());
        }
        self.tx.send(frame).await.map_err(|_| self.shared.reason())
    }

    /// Closes the connection: frames already queued are still written, then both directions
    /// end. The receiver then returns [`ConnError::Closed`].
    pub fn close(&self) {
        self.shared.close(ConnError::Closed)
    }

    /// Whether the connection has ended (or is ending).
    pub fn is_closed(&self) -> bool {
        self.shared.is_closing()
    }

    /// Resolves when the connection has ended (or is ending); returns why.
    pub async fn closed(&self) -> ConnError {
        let mut rx = self.shared.subscribe();
        let _ = rx.wait_for(|c| *c).await;
        self.shared.reason()
    }

    pub fn peer(&self) -> &str {
        &self.shared.peer
    }
}

/// The receiving half of a connection.
#[derive(Debug)]
pub struct FrameReceiver {
    rx: mpsc::Receiver<Result<Frame, ConnError>>,
    shared: Arc<Shared>,
    done: bool,
}

impl FrameReceiver {
    /// The next frame, in arrival order. Once the connection has ended, returns why (the
    /// same error on every later call). Cancel-safe.
    pub async fn recv(&mut self) -> Result<Frame, ConnError> {
        if self.done {
            return Err(self.shared.reason());
        }
        match self.rx.recv().await {
            Some(Ok(frame)) => Ok(frame),
            Some(Err(e)) => {
                self.done = true;
                Err(e)
            }
            None => {
                self.done = true;
                Err(self.shared.reason())
            }
        }
    }

    /// A frame that has already arrived, without waiting: `Ok(None)` when there is none
    /// yet (e.g. to gather a batch after `recv`).
    pub fn try_recv(&mut self) -> Result<Option<Frame>, ConnError> {
        if self.done {
            return Err(self.shared.reason());
        }
        match self.rx.try_recv() {
            Ok(Ok(frame)) => Ok(Some(frame)),
            Ok(Err(e)) => {
                self.done = true;
                Err(e)
            }
            Err(mpsc::error::TryRecvError::Empty) => Ok(None),
            Err(mpsc::error::TryRecvError::Disconnected) => {
                self.done = true;
                Err(self.shared.reason())
            }
        }
    }

    pub fn peer(&self) -> &str {
        &self.shared.peer
    }
}

impl Drop for FrameReceiver {
    fn drop(&mut self) {
        // Nobody reads any more: the connection is of no use.
        self.shared.close(ConnError::Closed);
    }
}
