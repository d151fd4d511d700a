//! Transports over real loopback sockets and in memory: pipelining, reply matching, closing,
//! and malformed input.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::time::timeout;
use toma_core::VolumeId;
use toma_wire::transport::{Listener, TcpListener};
use toma_wire::*;

const DEADLINE: Duration = Duration::from_secs(60);
const VOL: VolumeId = VolumeId(42);

fn payload_for(offset: u64, len: u32) -> Bytes {
    (0..len)
        .map(|i| (offset.wrapping_add(u64::from(i)) % 251) as u8)
        .collect::<Vec<u8>>()
        .into()
}

/// Answers READs with `payload_for` and everything else with Ok, replying to each batch of
/// requests in reverse order so that replies overtake each other.
async fn serve(mut listener: Box<dyn Listener>) {
    while let Ok(conn) = listener.accept().await {
        tokio::spawn(async move {
            let (tx, mut rx) = conn.split();
            let mut pending = Vec::new();
            loop {
                // Take what arrived, then answer it backwards.
                let first = match rx.recv().await {
                    Ok(f) => f,
                    Err(_) => return,
                };
                pending.push(first);
                while pending.len() < 32 {
                    match rx.try_recv() {
                        Ok(Some(f)) => pending.push(f),
                        Ok(None) => break,
                        Err(_) => return,
                    }
                }
                for req in pending.drain(..).rev() {
                    let msg = match req.msg {
                        Message::Read { offset, len } => Message::Data {
                            data: payload_for(offset, len),
                        },
                        _ => Message::Ok,
                    };
                    if tx.send(&req.reply(msg)).await.is_err() {
                        return;
                    }
                }
            }
        });
    }
}

async fn pipelined(transport: Arc<dyn Transport>, requests: u64) {
    let listener = transport.listen("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr();
    let server = tokio::spawn(serve(listener));
    let conn = transport.connect(&addr).await.unwrap();
    let (tx, mut rx) = conn.split();
    // All requests go out before any reply is read: they are all in flight at once.
    let sender = tokio::spawn(async move {
        for id in 1..=requests {
            let len = 1 + (id * 977 % 20_000) as u32;
            let frame = Frame::new(
                id,
                VOL,
                1,
                Message::Read {
                    offset: id * 4096,
                    len,
                },
            );
            tx.send(&frame).await.unwrap();
        }
        tx
    });
    let mut seen = HashMap::new();
    while (seen.len() as u64) < requests {
        let reply = rx.recv().await.unwrap();
        let id = reply.request_id;
        let len = 1 + (id * 977 % 20_000) as u32;
        assert_eq!(
            reply.msg,
            Message::Data {
                data: payload_for(id * 4096, len)
            },
            "reply to request {id}"
        );
        assert!(seen.insert(id, ()).is_none(), "two replies to {id}");
    }
    let tx = sender.await.unwrap();
    tx.close();
    assert_eq!(rx.recv().await.unwrap_err(), ConnError::Closed);
    server.abort();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_many_pipelined_requests_replies_matched_by_id() {
    timeout(DEADLINE, pipelined(Arc::new(TcpTransport::new()), 3000))
        .await
        .expect("deadline");
}

#[tokio::test]
async fn mem_many_pipelined_requests_replies_matched_by_id() {
    timeout(DEADLINE, pipelined(Arc::new(MemTransport::new()), 3000))
        .await
        .expect("deadline");
}

#[tokio::test]
async fn tcp_malformed_frame_closes_the_connection_with_the_reason() {
    timeout(DEADLINE, async {
        let listener = TcpTransport.listen("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr();
        let mut listener = listener;
        let mut raw = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let mut server = listener.accept().await.unwrap();
        // One good frame, then garbage.
        let good = Frame::new(9, VOL, 1, Message::Flush).to_bytes().unwrap();
        raw.write_all(&good).await.unwrap();
        raw.write_all(b"GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE-GARBAGE")
            .await
            .unwrap();
        assert_eq!(server.recv().await.unwrap().msg, Message::Flush);
        let e = server.recv().await.unwrap_err();
        assert!(
            matches!(e, ConnError::Malformed(WireError::BadMagic { .. })),
            "{e:?}"
        );
        assert!(e.to_string().contains("bad magic"), "{e}");
        // The reason stays.
        assert_eq!(server.recv().await.unwrap_err(), e);
        assert_eq!(
            server
                .send(&Frame::new(1, VOL, 1, Message::Ok))
                .await
                .unwrap_err(),
            e
        );
        // The peer is told why, then the connection is closed.
        let mut got = Vec::new();
        raw.read_to_end(&mut got).await.unwrap();
        let bye = decode_frame(&got).unwrap();
        assert_eq!(bye.request_id, 0);
        match bye.msg {
            Message::Error { code, message } => {
                assert_eq!(code, ErrorCode::Invalid);
                assert!(message.contains("malformed frame: bad magic"), "{message}");
            }
            m => panic!("expected an Error, got {m:?}"),
        }
    })
    .await
    .expect("deadline");
}

#[tokio::test]
async fn a_corrupted_frame_is_refused_and_the_sender_learns_why() {
    timeout(DEADLINE, async {
        let t = MemTransport::new();
        let mut l = t.bind("").unwrap();
        let client = t.dial(&l.local_addr()).await.unwrap();
        let mut server = l.accept().await.unwrap();
        let (ctx, mut crx) = client.split();
        let enc = Frame::new(5, VOL, 1, Message::Lock { unit: 1 })
            .encode()
            .unwrap();
        let mut head = BytesMut::from(&enc.head[..]);
        head[47] ^= 0xff;
        ctx.send_encoded(EncodedFrame {
            head: head.freeze(),
            tail: enc.tail,
        })
        .await
        .unwrap();
        let e = server.recv().await.unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
        let e = crx.recv().await.unwrap_err();
        match &e {
            ConnError::PeerError(m) => assert!(
                m.contains("Invalid: malformed frame: checksum mismatch"),
                "{m}"
            ),
            e => panic!("expected PeerError, got {e:?}"),
        }
    })
    .await
    .expect("deadline");
}

/// The error a connection reports for a stream that ends after the first `cut` bytes of
/// `frame`.
async fn error_of_a_stream_cut_short(frame: Frame, cut: usize) -> ConnError {
    let (a, mut b) = tokio::io::duplex(1 << 16);
    let mut conn = Conn::from_stream(a, "test");
    let bytes = frame.to_bytes().unwrap();
    b.write_all(&bytes[..cut]).await.unwrap();
    b.shutdown().await.unwrap();
    conn.recv().await.unwrap_err()
}

#[tokio::test]
async fn truncated_stream_is_reported() {
    timeout(DEADLINE, async {
        let e =
            error_of_a_stream_cut_short(Frame::new(3, VOL, 1, Message::Lock { unit: 7 }), 30).await;
        assert!(
            e.to_string()
                .contains("truncated frame at end of stream: need 48 bytes, have 30"),
            "{e}"
        );
    })
    .await
    .expect("deadline");
}

#[tokio::test]
async fn close_ends_both_directions_and_invalid_frames_are_not_sent() {
    timeout(DEADLINE, async {
        let t = MemTransport::new();
        let mut l = t.bind("node-a:0").unwrap();
        assert!(t.dial("nobody").await.is_err());
        let client = t.dial(&l.local_addr()).await.unwrap();
        let mut server = l.accept().await.unwrap();
        // A frame breaking a limit is refused locally; the connection stays usable.
        let bad = Frame::new(1, VOL, 1, Message::Read { offset: 0, len: 0 });
        assert!(matches!(client.send(&bad).await, Err(ConnError::Encode(_))));
        client
            .send(&Frame::new(2, VOL, 1, Message::Flush))
            .await
            .unwrap();
        client.close();
        // What was queued before close still arrives, then the close.
        assert_eq!(server.recv().await.unwrap().request_id, 2);
        assert_eq!(server.recv().await.unwrap_err(), ConnError::Closed);
        assert_eq!(
            server
                .send(&Frame::new(2, VOL, 1, Message::Ok))
                .await
                .unwrap_err(),
            ConnError::Closed
        );
        assert!(client.sender().is_closed());
        assert_eq!(client.sender().closed().await, ConnError::Closed);
    })
    .await
    .expect("deadline");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_carries_a_full_chunk_write() {
    timeout(DEADLINE, async {
        let l = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = Listener::local_addr(&l);
        let accept = tokio::spawn(async move { l.accept().await.unwrap() });
        let client = TcpTransport.connect(&addr).await.unwrap();
        let mut server = accept.await.unwrap();
        let data = Bytes::from(vec![0xA5; MAX_IO_LEN as usize]);
        let w = Frame::new(
            1,
            VOL,
            3,
            Message::Write {
                offset: 1 << 30,
                data,
            },
        );
        client.send(&w).await.unwrap();
        client
            .send(&Frame::new(2, VOL, 3, Message::Flush))
            .await
            .unwrap();
        assert_eq!(server.recv().await.unwrap(), w);
        assert_eq!(server.recv().await.unwrap().msg, Message::Flush);
    })
    .await
    .expect("deadline");
}

/// WRITEs of every size arrive whole, however the stream cuts them (pieces of odd sizes,
/// small frames between the writes), and one longer than a read of the stream has its data
/// at an address `O_DIRECT` accepts (the agent writes it without a copy). One with a corrupt
/// checksum closes the connection.
#[tokio::test]
async fn a_large_write_arrives_with_its_data_aligned_however_the_stream_cuts_it() {
    timeout(DEADLINE, async {
        let (a, mut b) = tokio::io::duplex(1 << 16);
        let mut conn = Conn::from_stream(a, "test");
        let mut frames = Vec::new();
        for (i, len) in [4096usize, 65536, 8192 + 4096, 1 << 20]
            .into_iter()
            .enumerate()
        {
            let data: Bytes = (0..len)
                .map(|j| (j * 7 + i) as u8)
                .collect::<Vec<u8>>()
                .into();
            let id = 2 * i as u64 + 1;
            frames.push(Frame::new(
                id,
                VOL,
                1,
                Message::Write {
                    offset: 4096 * id,
                    data,
                },
            ));
            frames.push(Frame::new(id + 1, VOL, 1, Message::Lock { unit: id }));
        }
        let mut stream = Vec::new();
        for f in &frames {
            stream.extend_from_slice(&f.to_bytes().unwrap());
        }
        let writer = tokio::spawn(async move {
            for (n, piece) in stream.chunks(1000 + 4093).enumerate() {
                // Cut each piece once more at a place that moves with n.
                let cut = (n * 37) % piece.len();
                b.write_all(&piece[..cut]).await.unwrap();
                b.write_all(&piece[cut..]).await.unwrap();
            }
            b
        });
        for want in &frames {
            let got = conn.recv().await.unwrap();
            assert_eq!(&got, want);
            // A write whose frame is whole in the read buffer when its header is seen is
            // decoded from there (the agent copies it); one longer than a read is aligned.
            if let Message::Write { data, .. } = &got.msg {
                if data.len() < 1 << 20 {
                    continue;
                }
                assert_eq!(
                    data.as_ptr().align_offset(4096),
                    0,
                    "the data of write {} is not aligned",
                    got.request_id
                );
            }
        }
        let mut b = writer.await.unwrap();
        // A large write whose checksum does not match: refused, the connection closed.
        let bad = Frame::new(
            99,
            VOL,
            1,
            Message::Write {
                offset: 0,
                data: Bytes::from(vec![1u8; 65536]),
            },
        );
        let mut raw = BytesMut::from(&bad.to_bytes().unwrap()[..]);
        let last = raw.len() - 1;
        raw[last] ^= 0xff;
        b.write_all(&raw).await.unwrap();
        let e = conn.recv().await.unwrap_err();
        assert!(e.to_string().contains("checksum mismatch"), "{e}");
    })
    .await
    .expect("deadline");
}

/// A stream that ends in the middle of a large WRITE is reported as truncated.
#[tokio::test]
async fn a_stream_ending_inside_a_large_write_is_reported() {
    timeout(DEADLINE, async {
        let w = Frame::new(
            1,
            VOL,
            1,
            Message::Write {
                offset: 0,
                data: Bytes::from(vec![3u8; 65536]),
            },
        );
        let e = error_of_a_stream_cut_short(w, 40_000).await;
        assert!(
            e.to_string()
                .contains("truncated frame at end of stream: need 65592 bytes, have 40000"),
            "{e}"
        );
    })
    .await
    .expect("deadline");
}
