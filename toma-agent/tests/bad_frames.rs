//! Bad frames on a raw TCP socket close only that connection, after telling the peer why;
//! the agent keeps serving everyone else and no byte on disk changes.

mod common;

use bytes::BytesMut;
use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use toma_core::VolumeId;
use toma_wire::{decode_from, ErrorCode, Frame, Message, HEADER_LEN, MAX_PAYLOAD};

const UNITS: u64 = 16;

fn write_frame(volume: VolumeId, offset: u64, unit: u64) -> Vec<u8> {
    Frame::new(
        7,
        volume,
        1,
        Message::Write {
            offset,
            data: block(unit, 50),
        },
    )
    .to_bytes()
    .expect("encodes")
    .to_vec()
}

/// Recomputes a frame's crc32c (header with the crc field zeroed, then the payload).
fn fix_crc(frame: &mut [u8]) {
    frame[44..48].copy_from_slice(&[0; 4]);
    let crc = crc32c::crc32c_append(crc32c::crc32c(&frame[..HEADER_LEN]), &frame[HEADER_LEN..]);
    frame[44..48].copy_from_slice(&crc.to_le_bytes());
}

/// Sends `bytes` on a fresh TCP connection to `addr` (then, with `eof`, shuts the write side)
/// and returns every frame received until the agent closes the connection.
async fn send_bad(addr: &str, bytes: &[u8], eof: bool) -> Vec<Frame> {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.write_all(bytes).await.expect("send");
    if eof {
        s.shutdown().await.expect("shutdown");
    }
    let mut buf = BytesMut::new();
    let read_all = async {
        loop {
            let mut chunk = [0u8; 4096];
            match s.read(&mut chunk).await {
                Ok(0) | Err(_) => break,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
    };
    tokio::time::timeout(WAIT, read_all)
        .await
        .expect("the agent closes the connection");
    let mut frames = Vec::new();
    while let Some(f) = decode_from(&mut buf).expect("the agent sends valid frames") {
        frames.push(f);
    }
    assert!(buf.is_empty(), "trailing bytes from the agent");
    frames
}

fn assert_told_why(what: &str, frames: &[Frame], needle: &str) {
    assert_eq!(frames.len(), 1, "{what}: {frames:?}");
    assert_eq!(
        frames[0].request_id, 0,
        "{what}: about the connection itself"
    );
    let why = expect_error(&frames[0].msg, ErrorCode::Invalid);
    assert!(why.contains("malformed"), "{what}: {why}");
    assert!(why.to_lowercase().contains(needle), "{what}: {why}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_frames_close_only_their_connection_and_change_nothing() {
    let (_dir, c) = cluster(2).await;
    let id = volume(&c, 2, UNITS).await;
    let cl = client(&c, id).await;
    for u in 0..UNITS {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    let before = c.member_contents(id).await;
    let n0 = node_of(&c, id, 0).await;
    let addr = c.agent(n0).unwrap().endpoint().to_string();

    // A reader keeps going the whole time.
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let reader = {
        let (cl, stop) = (cl.clone(), stop.clone());
        tokio::spawn(async move {
            let mut n = 0u64;
            while !stop.load(std::sync::atomic::Ordering::Relaxed) {
                let u = n % UNITS;
                let got = cl.read(u * CHUNK, CHUNK as usize).await.expect("read");
                assert_eq!(got, block(u, 1));
                n += 1;
                assert!(n < 1_000_000);
            }
            n
        })
    };

    // A registered raw client whose connection will be broken by a bad frame.
    let registered = Raw::register(&c, n0, id, random_u128()).await;

    let good = write_frame(id, 0, 0);

    // Garbage: no magic.
    let frames = send_bad(&addr, &[0xAB; 64], false).await;
    assert_told_why("garbage", &frames, "magic");

    // Bad checksum: one payload bit flipped in an otherwise valid WRITE.
    let mut bad_crc = good.clone();
    let last = bad_crc.len() - 1;
    bad_crc[last] ^= 0x01;
    let frames = send_bad(&addr, &bad_crc, false).await;
    assert_told_why("bad checksum", &frames, "crc");

    // Oversized: a header announcing more than MAX_PAYLOAD.
    let mut big = good[..HEADER_LEN].to_vec();
    big[40..44].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let frames = send_bad(&addr, &big, false).await;
    assert_told_why("oversized", &frames, "");

    // Truncated: half a WRITE, then end of stream.
    let frames = send_bad(&addr, &good[..good.len() / 2], true).await;
    assert_told_why("truncated", &frames, "truncated");

    // Malformed payload with a valid checksum: a LOCK whose payload is 3 bytes.
    let mut lock = Frame::new(9, id, 1, Message::Lock { unit: 1 })
        .to_bytes()
        .unwrap()
        .to_vec();
    lock.truncate(HEADER_LEN + 3);
    lock[40..44].copy_from_slice(&3u32.to_le_bytes());
    fix_crc(&mut lock);
    let frames = send_bad(&addr, &lock, false).await;
    assert_told_why("short payload", &frames, "");

    // Unknown kind, valid checksum.
    let mut unknown = good.clone();
    unknown[5] = 0x3F;
    fix_crc(&mut unknown);
    let frames = send_bad(&addr, &unknown, false).await;
    assert_told_why("unknown kind", &frames, "kind");

    // A registered connection sending a bad frame is closed too, with the reason; the
    // bad WRITE is not applied.
    let secret = toma_wire::Secret(c.volume_record(id).await.unwrap().secret);
    let g = c.topology(id).await.unwrap().generation;
    let mut s = TcpStream::connect(&addr).await.expect("connect");
    let reg = Frame::new(
        1,
        id,
        g,
        Message::Register {
            client: random_u128(),
            secret,
            held_locks: Vec::new(),
        },
    );
    s.write_all(&reg.to_bytes().unwrap()).await.unwrap();
    let mut buf = BytesMut::new();
    let reply = tokio::time::timeout(WAIT, async {
        loop {
            if let Some(f) = decode_from(&mut buf).expect("valid reply") {
                return f;
            }
            let mut chunk = [0u8; 4096];
            let n = s.read(&mut chunk).await.expect("read");
            assert!(n > 0, "closed before REGISTERED");
            buf.extend_from_slice(&chunk[..n]);
        }
    })
    .await
    .expect("REGISTERED in time");
    assert!(matches!(reply.msg, Message::Registered { .. }), "{reply:?}");
    let mut corrupt = write_frame(id, CHUNK, 1);
    corrupt[HEADER_LEN + 20] ^= 0xFF;
    s.write_all(&corrupt).await.unwrap();
    let mut rest = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut rest))
        .await
        .expect("closed in time")
        .expect("read");
    buf.extend_from_slice(&rest);
    let mut frames = Vec::new();
    while let Some(f) = decode_from(&mut buf).expect("valid frames") {
        frames.push(f);
    }
    assert_told_why("registered, corrupt write", &frames, "crc");

    // Other connections on the same agent are untouched by all of this.
    assert_eq!(
        registered.call(Message::Lock { unit: 2 }).await,
        Message::Ok
    );
    assert_eq!(
        registered.call(Message::Unlock { unit: 2 }).await,
        Message::Ok
    );

    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let reads = finish("reader", reader).await;
    assert!(reads > 0);
    assert_eq!(
        c.member_contents(id).await,
        before,
        "no byte on disk changed"
    );

    // The agent still serves reads and writes.
    for u in 0..UNITS {
        cl.write(u * CHUNK, block(u, 2)).await.unwrap();
        assert_eq!(
            cl.read(u * CHUNK, CHUNK as usize).await.unwrap(),
            block(u, 2)
        );
    }
    c.assert_mirrors_identical(id).await;
    c.shutdown().await;
}
