//! Frame codec micro-benchmarks: encoding and decoding the frames of the hot path (4 KiB
//! WRITE and DATA_LOCK, LOCK/UNLOCK), and stream-decoding a batch as a reader task does.

use bytes::{Bytes, BytesMut};
use criterion::{black_box, criterion_group, criterion_main, Criterion, Throughput};
use toma_core::VolumeId;
use toma_wire::{decode_frame, decode_from, Frame, Message};

fn frames() -> Vec<(&'static str, Frame)> {
    let data = Bytes::from(vec![0x5a; 4096]);
    vec![
        (
            "write-4k",
            Frame::new(
                7,
                VolumeId(42),
                3,
                Message::Write {
                    offset: 1 << 20,
                    data: data.clone(),
                },
            ),
        ),
        (
            "data-lock-4k",
            Frame::new(
                8,
                VolumeId(42),
                3,
                Message::DataLock {
                    locked: false,
                    data,
                },
            ),
        ),
        (
            "lock",
            Frame::new(9, VolumeId(42), 3, Message::Lock { unit: 1234 }),
        ),
    ]
}

fn codec(c: &mut Criterion) {
    let mut g = c.benchmark_group("frame");
    for (name, f) in frames() {
        let enc = f.encode().expect("encodes");
        let mut flat = BytesMut::new();
        flat.extend_from_slice(&enc.head);
        flat.extend_from_slice(&enc.tail);
        let flat = flat.freeze();
        g.throughput(Throughput::Bytes(flat.len() as u64));
        g.bench_function(format!("encode/{name}"), |b| {
            b.iter(|| black_box(&f).encode().expect("encodes"))
        });
        g.bench_function(format!("decode/{name}"), |b| {
            b.iter(|| decode_frame(black_box(&flat)).expect("decodes"))
        });
    }
    g.finish();

    // A reader's view: 64 frames (LOCK, WRITE 4 KiB, UNLOCK ...) arrived in one buffer.
    let mut stream = BytesMut::new();
    let mut n = 0;
    for i in 0..64u64 {
        let (_, f) = &frames()[(i % 3) as usize];
        let enc = f.encode().expect("encodes");
        stream.extend_from_slice(&enc.head);
        stream.extend_from_slice(&enc.tail);
        n += 1;
    }
    let stream = stream.freeze();
    let mut g = c.benchmark_group("stream");
    g.throughput(Throughput::Elements(n));
    g.bench_function("decode_from/64-frames", |b| {
        b.iter(|| {
            let mut buf = BytesMut::from(&stream[..]);
            let mut got = 0;
            while let Some(f) = decode_from(&mut buf).expect("decodes") {
                black_box(f);
                got += 1;
            }
            assert_eq!(got, n);
        })
    });
    g.finish();
}

criterion_group!(benches, codec);
criterion_main!(benches);
