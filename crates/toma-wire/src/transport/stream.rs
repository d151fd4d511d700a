//! A connection over a byte stream: one reader task decoding frames, one writer task
//! writing queued frames in batches with vectored writes.

use std::io::IoSlice;
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::mpsc;
use toma_core::VolumeId;

use super::{Conn, ConnError, Shared};
use crate::error::WireError;
use crate::frame::{
    decode_frame_bytes, decode_from, write_frame_len, EncodedFrame, Frame, WRITE_DATA_AT,
};
use crate::message::{ErrorCode, Message};

/// Frames queued in each direction before senders (or the socket reader) wait.
pub const DEFAULT_QUEUE_DEPTH: usize = 1024;
/// The writer gathers at most this many bytes, or `MAX_BATCH_FRAMES` frames, per batch.
const MAX_BATCH_BYTES: usize = 4 << 20;
const MAX_BATCH_FRAMES: usize = 256;
/// Slices handed to one `write_vectored` (Linux's IOV_MAX is 1024).
const MAX_IOVECS: usize = 512;
/// Room kept free in the read buffer before each read.
const READ_CHUNK: usize = 64 * 1024;
/// A `WRITE` frame with at least this much data is read into a buffer of its own, laid out
/// so that the data starts at a multiple of this (`O_DIRECT`'s alignment): the agent writes
/// it to disk without copying it.
const DATA_ALIGN: usize = 4096;

pub(crate) fn spawn<R, W>(read: R, write: W, peer: String) -> Conn
where
    R: AsyncRead + Unpin + Send + 'static,
    W: AsyncWrite + Unpin + Send + 'static,
{
    let shared = Shared::new(peer);
    let (out_tx, out_rx) = mpsc::channel(DEFAULT_QUEUE_DEPTH);
    let (in_tx, in_rx) = mpsc::channel(DEFAULT_QUEUE_DEPTH);
    tokio::spawn(read_loop(read, in_tx, shared.clone()));
    tokio::spawn(write_loop(write, out_rx, shared.clone()));
    Conn::assemble(out_tx, in_rx, shared)
}

async fn read_loop<R: AsyncRead + Unpin>(
    mut read: R,
    tx: mpsc::Sender<Result<Frame, ConnError>>,
    shared: Arc<Shared>,
) {
    let mut closing = shared.subscribe();
    let mut buf = BytesMut::with_capacity(READ_CHUNK);
    let reason = loop {
        // Every complete frame in the buffer first.
        // Ok(Some(total)): the head of the buffer is the start of a large WRITE of `total`
        // bytes, to be read whole into an aligned buffer of its own (not into `buf`:
        // decode_from would grow it for the whole frame).
        let decoded = loop {
            if let Some(total) = large_write_pending(&buf) {
                break Ok(Some(total));
            }
            match decode_from(&mut buf) {
                Ok(Some(frame)) => {
                    if let (0, Message::Error { code, message }) = (frame.request_id, &frame.msg) {
                        // The peer closes the connection, and says why.
                        break Err(ConnError::PeerError(format!("{code}: {message}")));
                    }
                    if tx.send(Ok(frame)).await.is_err() {
                        // The receiver is gone.
                        break Err(ConnError::Closed);
                    }
                }
                Ok(None) => break Ok(None),
                Err(e) => {
                    tracing::warn!(peer = %shared.peer, "closing connection: malformed frame: {e}");
                    break Err(ConnError::Malformed(e));
                }
            }
        };
        let large_write = match decoded {
            Ok(w) => w,
            Err(reason) => break reason,
        };
        if let Some(total) = large_write {
            let frame = tokio::select! {
                biased;
                _ = closing.wait_for(|c| *c) => return,
                f = read_aligned_write(&mut read, &mut buf, total) => f,
            };
            match frame {
                Ok(frame) => {
                    if tx.send(Ok(frame)).await.is_err() {
                        break ConnError::Closed;
                    }
                    continue;
                }
                Err(e) => {
                    tracing::warn!(peer = %shared.peer, "closing connection: {e}");
                    break e;
                }
            }
        }
        if buf.capacity() - buf.len() < READ_CHUNK / 4 {
            buf.reserve(READ_CHUNK);
        }
        let n = tokio::select! {
            biased;
            _ = closing.wait_for(|c| *c) => return,
            n = read.read_buf(&mut buf) => n,
        };
        match n {
            Ok(0) if buf.is_empty() => break ConnError::Closed,
            Ok(0) => {
                let e = WireError::Truncated {
                    what: "frame at end of stream",
                    need: frame_need(&buf),
                    have: buf.len(),
                };
                tracing::warn!(peer = %shared.peer, "closing connection: {e}");
                break ConnError::Malformed(e);
            }
            Ok(_) => {}
            Err(e) => break ConnError::from(e),
        }
    };
    shared.close(reason.clone());
    // Deliver the reason unless the receiver is gone (a full queue is waited for).
    let _ = tx.send(Err(shared.reason())).await;
}

/// The length of the `WRITE` frame with at least [`DATA_ALIGN`] bytes of data that `buf`
/// holds the start of but not the whole.
fn large_write_pending(buf: &[u8]) -> Option<usize> {
    write_frame_len(buf).filter(|&total| total >= WRITE_DATA_AT + DATA_ALIGN && buf.len() < total)
}

/// Reads the rest of the `WRITE` frame of `total` bytes that `buf` holds the start of (all
/// of `buf`: less than the frame) into a new buffer, placed so that the frame's data starts
/// at an address aligned to [`DATA_ALIGN`], and decodes it (the data shares that buffer).
async fn read_aligned_write<R: AsyncRead + Unpin>(
    read: &mut R,
    buf: &mut BytesMut,
    total: usize,
) -> Result<Frame, ConnError> {
    let mut v: Vec<u8> = Vec::with_capacity(total + DATA_ALIGN);
    let pad = v
        .as_ptr()
        .wrapping_add(WRITE_DATA_AT)
        .align_offset(DATA_ALIGN)
        .min(DATA_ALIGN - 1);
    let end = pad + total;
    // Within the capacity from here on: the allocation does not move.
    v.resize(pad, 0);
    v.extend_from_slice(buf);
    buf.clear();
    while v.len() < end {
        let want = end - v.len();
        let n = read.read_buf(&mut (&mut v).limit(want)).await?;
        if n == 0 {
            return Err(ConnError::Malformed(WireError::Truncated {
                what: "frame at end of stream",
                need: total,
                have: v.len() - pad,
            }));
        }
    }
    decode_frame_bytes(Bytes::from(v).slice(pad..)).map_err(ConnError::Malformed)
}

/// How many bytes the partial frame at the head of `buf` needs.
fn frame_need(buf: &[u8]) -> usize {
    crate::frame::decode_header(buf)
        .map(|h| h.frame_len())
        .unwrap_or(crate::frame::HEADER_LEN)
}

async fn write_loop<W: AsyncWrite + Unpin>(
    mut write: W,
    mut rx: mpsc::Receiver<EncodedFrame>,
    shared: Arc<Shared>,
) {
    let mut closing = shared.subscribe();
    let mut batch: Vec<Bytes> = Vec::with_capacity(2 * MAX_BATCH_FRAMES);
    let mut busy = false;
    loop {
        let first = tokio::select! {
            biased;
            f = rx.recv() => f,
            _ = closing.wait_for(|c| *c) => None,
        };
        let Some(first) = first else { break };
        let mut bytes = push(&mut batch, first);
        let mut frames = 1;
        // Gather what is queued. Under load (the last batch had more than one frame),
        // also let the tasks that are ready to run queue theirs first (one turn of the
        // scheduler) and gather again: one system call then carries many frames instead of
        // one each. Alone (one request at a time) the turn would only add latency.
        for turn in 0..2 {
            if turn == 1 {
                if !busy || bytes >= MAX_BATCH_BYTES || frames >= MAX_BATCH_FRAMES {
                    break;
                }
                tokio::task::yield_now().await;
            }
            while bytes < MAX_BATCH_BYTES && frames < MAX_BATCH_FRAMES {
                match rx.try_recv() {
                    Ok(f) => {
                        bytes += push(&mut batch, f);
                        frames += 1;
                    }
                    Err(_) => break,
                }
            }
        }
        busy = frames > 1;
        if let Err(e) = write_all(&mut write, &mut batch).await {
            shared.close(ConnError::from(e));
            return;
        }
    }
    // Closing: write what was queued (unless the link failed), then say why if the peer
    // was at fault, then shut the stream down.
    let reason = shared.reason();
    if !matches!(reason, ConnError::Io { .. }) {
        while let Ok(f) = rx.try_recv() {
            push(&mut batch, f);
        }
        if let ConnError::Malformed(e) = &reason {
            let bye = Frame::new(
                0,
                VolumeId(0),
                0,
                Message::error(ErrorCode::Invalid, format!("malformed frame: {e}")),
            );
            if let Ok(enc) = bye.encode() {
                push(&mut batch, enc);
            }
        }
        let _ = write_all(&mut write, &mut batch).await;
    }
    rx.close();
    let _ = write.shutdown().await;
}

fn push(batch: &mut Vec<Bytes>, f: EncodedFrame) -> usize {
    let n = f.len();
    batch.push(f.head);
    if !f.tail.is_empty() {
        batch.push(f.tail);
    }
    n
}

/// Writes every buffer of `batch` (emptying it) with as few syscalls as the stream allows.
async fn write_all<W: AsyncWrite + Unpin>(
    write: &mut W,
    batch: &mut Vec<Bytes>,
) -> std::io::Result<()> {
    let mut start = 0;
    while start < batch.len() {
        let n = {
            let slices: Vec<IoSlice<'_>> = batch[start..]
                .iter()
                .take(MAX_IOVECS)
                .map(|b| IoSlice::new(b))
                .collect();
            write.write_vectored(&slices).await?
        };
        if n == 0 {
            return Err(std::io::ErrorKind::WriteZero.into());
        }
        let mut left = n;
        while left > 0 && start < batch.len() {
            let b = &mut batch[start];
            if b.len() <= left {
                left -= b.len();
                start += 1;
            } else {
                b.advance(left);
                left = 0;
            }
        }
    }
    batch.clear();
    write.flush().await
}
