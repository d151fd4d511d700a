//! Round trips for every message kind, decoder robustness, and one test per `WireError`.

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use toma_core::{DiskId, Layout, LockMode, Member, NodeId, Role, Topology, VolumeId};
use toma_wire::*;

const VOL: u128 = 0x1234_5678_9abc_def0_1122_3344_5566_7788;

fn arb_topology(volume: u128) -> impl Strategy<Value = Topology> {
    let layout = prop_oneof![
        (2u8..=3).prop_map(|mirrors| Layout::Raid1 { mirrors }),
        (2u8..=8).prop_map(|data| Layout::Raid6 { data }),
    ];
    (
        layout,
        12u32..=24,
        any::<u64>(),
        any::<u128>(),
        0u8..4,
        any::<u64>(),
        "[a-z0-9.-]{1,40}",
    )
        .prop_map(
            move |(layout, shift, generation, disk_base, scenario, pick, name)| {
                let n = layout.members();
                let members = (0..n)
                    .map(|i| {
                        let mut m = Member::new(
                            DiskId(disk_base.wrapping_add(i as u128)),
                            NodeId(format!("{name}-{i}")),
                            Role::Rwl,
                        );
                        m.full_rebuild = pick >> (8 + i) & 1 == 1;
                        m
                    })
                    .collect::<Vec<_>>();
                let mut t = Topology {
                    volume: VolumeId(volume),
                    generation,
                    layout,
                    chunk_size: 1 << shift,
                    members,
                    lock_mode: LockMode::Interleaved,
                    rebuild: false,
                };
                let victim = (pick % n as u64) as usize;
                match scenario {
                    1 => {
                        t.members[victim].role = Role::Dead;
                        t.members[victim].last_good = pick & 1 == 1;
                    }
                    2 => {
                        t.members[victim].role = Role::W;
                        t.rebuild = pick & 1 == 1;
                    }
                    3 => {
                        t.members[victim].role = Role::Wl;
                        t.lock_mode = LockMode::DualLock;
                    }
                    _ => {}
                }
                t
            },
        )
        .prop_filter("valid topology", |t| t.validate().is_ok())
}

fn arb_bytes(max: usize) -> impl Strategy<Value = Bytes> {
    proptest::collection::vec(any::<u8>(), 0..max).prop_map(Bytes::from)
}

fn arb_text() -> impl Strategy<Value = String> {
    prop_oneof![".{0,64}", "[a-z ]{0,4096}"].prop_filter("fits", |s| s.len() <= MAX_TEXT_LEN)
}

fn arb_locks() -> impl Strategy<Value = Vec<LockEntry>> {
    proptest::collection::vec(
        (any::<u64>(), any::<u128>()).prop_map(|(unit, client)| LockEntry { unit, client }),
        0..50,
    )
}

fn arb_range() -> impl Strategy<Value = std::ops::Range<u64>> {
    (any::<u64>(), any::<u64>()).prop_map(|(a, b)| a.min(b)..a.max(b))
}

fn arb_member_mask() -> impl Strategy<Value = u16> {
    1u16..=MEMBER_MASK
}

/// An io length and an offset that does not overflow with it.
fn arb_io() -> impl Strategy<Value = (u64, u32)> {
    (1u32..=MAX_IO_LEN, any::<u64>())
        .prop_map(|(len, off)| (off.min(u64::MAX - u64::from(len)), len))
}

fn arb_code() -> impl Strategy<Value = ErrorCode> {
    proptest::sample::select(ErrorCode::ALL.to_vec())
}

/// Every kind of message (the `Kind::ALL` test below checks none is missing).
fn arb_message() -> impl Strategy<Value = Message> {
    prop_oneof![
        (
            any::<u128>(),
            any::<[u8; 32]>(),
            proptest::collection::vec(any::<u64>(), 0..100)
        )
            .prop_map(|(client, s, held_locks)| Message::Register {
                client,
                secret: Secret(s),
                held_locks
            }),
        arb_io().prop_map(|(offset, len)| Message::Read { offset, len }),
        (any::<u64>(), arb_io()).prop_map(|(unit, (offset, len))| Message::ReadTestLock {
            unit,
            offset,
            len
        }),
        (any::<u64>(), arb_bytes(3000))
            .prop_filter("non-empty", |(_, d)| !d.is_empty())
            .prop_map(|(offset, data)| Message::Write {
                offset: offset.min(u64::MAX - data.len() as u64),
                data
            }),
        any::<u64>().prop_map(|unit| Message::Lock { unit }),
        any::<u64>().prop_map(|unit| Message::Unlock { unit }),
        (any::<u64>(), arb_member_mask())
            .prop_map(|(unit, targets)| Message::SetDirty { unit, targets }),
        (any::<u64>(), arb_member_mask())
            .prop_map(|(unit, targets)| Message::ClearDirty { unit, targets }),
        Just(Message::Flush),
        any::<u64>().prop_map(|generation| Message::AckTopo { generation }),
        (0..MAX_MEMBERS).prop_map(|member| Message::ReportUnreachable { member }),
        (any::<u64>(), any::<u32>(), arb_bytes(3000))
            .prop_filter("non-empty", |(_, _, d)| !d.is_empty())
            .prop_map(|(unit, column, data)| Message::Intent { unit, column, data }),
        any::<u128>().prop_map(|client| Message::FenceClient { client }),
        (any::<u64>(), any::<u128>())
            .prop_map(|(unit, client)| Message::ReleaseLock { unit, client }),
        arb_range().prop_map(|units| Message::GetLocks { units }),
        arb_locks().prop_map(|locks| Message::PutLocks { locks }),
        (0..MAX_MEMBERS, any::<u64>(), 0..=MAX_DIRTY_UNITS).prop_map(|(target, start, n)| {
            let start = start.min(u64::MAX - n);
            Message::GetDirty {
                target,
                units: start..start + n,
            }
        }),
        Just(Message::Ok),
        arb_topology(VOL).prop_map(|topology| Message::Registered { topology }),
        arb_bytes(3000).prop_map(|data| Message::Data { data }),
        (any::<bool>(), arb_bytes(3000))
            .prop_map(|(locked, data)| Message::DataLock { locked, data }),
        any::<u128>().prop_map(|holder| Message::Locked { holder }),
        (arb_code(), arb_text()).prop_map(|(code, message)| Message::Error { code, message }),
        arb_locks().prop_map(|locks| Message::Locks { locks }),
        (any::<u64>(), arb_bytes(512)).prop_map(|(first, bits)| Message::Dirty { first, bits }),
        arb_topology(VOL).prop_map(|topology| Message::SwitchTopo { topology }),
        arb_text().prop_map(|reason| Message::Fenced { reason }),
    ]
}

fn arb_frame() -> impl Strategy<Value = Frame> {
    (arb_message(), 1u64.., any::<u64>()).prop_map(|(msg, rid, generation)| {
        let request_id = if msg.kind().is_unsolicited() { 0 } else { rid };
        Frame::new(request_id, VolumeId(VOL), generation, msg)
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn round_trip(frame in arb_frame()) {
        let enc = frame.encode().unwrap();
        let bytes = enc.to_bytes();
        let header = decode_header(&bytes).unwrap();
        prop_assert_eq!(header.kind, frame.kind());
        prop_assert_eq!(header.frame_len(), bytes.len(), "length in header");
        prop_assert_eq!(decode_frame(&bytes).unwrap(), frame.clone());

        // Stream decoding, with the frame twice and a partial third in the buffer.
        let mut buf = BytesMut::new();
        buf.extend_from_slice(&bytes);
        buf.extend_from_slice(&bytes);
        buf.extend_from_slice(&bytes[..bytes.len() / 2]);
        prop_assert_eq!(decode_from(&mut buf).unwrap(), Some(frame.clone()));
        prop_assert_eq!(decode_from(&mut buf).unwrap(), Some(frame));
        prop_assert_eq!(decode_from(&mut buf).unwrap(), None);
    }

    #[test]
    fn random_bytes_never_panic(data in proptest::collection::vec(any::<u8>(), 0..300)) {
        let _ = decode_frame(&data);
        let mut buf = BytesMut::from(&data[..]);
        let _ = decode_from(&mut buf);
    }

    #[test]
    fn random_payload_after_a_valid_header_never_panics(
        kind in proptest::sample::select(Kind::ALL.to_vec()),
        payload in proptest::collection::vec(any::<u8>(), 0..400),
    ) {
        // A header with a correct checksum so the payload decoder itself is exercised.
        let bytes = raw_frame(kind as u8, 7, &payload);
        let _ = decode_frame(&bytes);
    }

    #[test]
    fn mutated_frames_never_panic(
        frame in arb_frame(),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        fix_crc in any::<bool>(),
    ) {
        let mut bytes = frame.to_bytes().unwrap().to_vec();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= v;
        }
        if fix_crc && bytes.len() >= HEADER_LEN {
            refresh_crc(&mut bytes);
        }
        let _ = decode_frame(&bytes);
        let cut = cut.index(bytes.len() + 1);
        if let Ok(f) = decode_frame(&bytes[..cut]) {
            prop_assert_eq!(cut, bytes.len(), "a truncated frame decoded: {:?}", f);
        }
    }
}

/// Recomputes the checksum of a frame whose bytes were edited.
fn refresh_crc(bytes: &mut [u8]) {
    bytes[44..48].fill(0);
    let crc = crc32c_of(bytes);
    bytes[44..48].copy_from_slice(&crc.to_le_bytes());
}

fn crc32c_of(bytes: &[u8]) -> u32 {
    // Same as the codec: header with the crc zeroed, then the payload.
    crc32c::crc32c(bytes)
}

/// A frame built by hand: valid header and checksum around any payload.
fn raw_frame(kind: u8, request_id: u64, payload: &[u8]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend_from_slice(b"TOMA");
    b.push(1);
    b.push(kind);
    b.extend_from_slice(&0u16.to_le_bytes());
    b.extend_from_slice(&request_id.to_le_bytes());
    b.extend_from_slice(&VOL.to_le_bytes());
    b.extend_from_slice(&5u64.to_le_bytes());
    b.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    b.extend_from_slice(&0u32.to_le_bytes());
    b.extend_from_slice(payload);
    refresh_crc(&mut b);
    b
}

#[test]
fn every_kind_is_generated_and_numbered_once() {
    let mut seen = std::collections::HashSet::new();
    for k in Kind::ALL {
        assert!(seen.insert(k as u8), "{k} numbered twice");
        assert_eq!(Kind::from_u8(k as u8), Some(k));
    }
    // Draw messages until every kind showed up.
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    let strat = arb_message();
    let mut kinds = std::collections::HashSet::new();
    for _ in 0..5000 {
        kinds.insert(strat.new_tree(&mut runner).unwrap().current().kind());
    }
    for k in Kind::ALL {
        assert!(kinds.contains(&k), "arb_message never generates {k}");
    }
}

#[test]
fn layout_is_as_documented() {
    let f = Frame::new(
        0x0102030405060708,
        VolumeId(VOL),
        9,
        Message::Lock { unit: 3 },
    );
    let b = f.to_bytes().unwrap();
    assert_eq!(&b[0..4], b"TOMA");
    assert_eq!(b[4], 1);
    assert_eq!(b[5], Kind::Lock as u8);
    assert_eq!(&b[6..8], &[0, 0]);
    assert_eq!(&b[8..16], &0x0102030405060708u64.to_le_bytes());
    assert_eq!(&b[16..32], &VOL.to_le_bytes());
    assert_eq!(&b[32..40], &9u64.to_le_bytes());
    assert_eq!(&b[40..44], &8u32.to_le_bytes());
    assert_eq!(b.len(), HEADER_LEN + 8);
    let mut zeroed = b.to_vec();
    zeroed[44..48].fill(0);
    assert_eq!(&b[44..48], &crc32c::crc32c(&zeroed).to_le_bytes());
    assert_eq!(
        raw_frame(Kind::Lock as u8, 0x0102030405060708, &3u64.to_le_bytes())[48..],
        b[48..]
    );
}

fn lock_frame() -> Vec<u8> {
    Frame::new(1, VolumeId(VOL), 1, Message::Lock { unit: 3 })
        .to_bytes()
        .unwrap()
        .to_vec()
}

fn err_of(bytes: &[u8]) -> String {
    let e = decode_frame(bytes).unwrap_err();
    // The stream decoder reports the same thing.
    let mut buf = BytesMut::from(bytes);
    match decode_from(&mut buf) {
        Err(e2) => assert_eq!(e, e2),
        Ok(None) => assert!(matches!(
            e,
            WireError::Truncated { .. } | WireError::TrailingBytes { .. }
        )),
        Ok(Some(f)) => assert!(matches!(e, WireError::TrailingBytes { .. }), "{f:?}"),
    }
    e.to_string()
}

fn assert_contains(msg: &str, want: &str) {
    assert!(msg.contains(want), "{msg:?} should contain {want:?}");
}

#[test]
fn error_bad_magic() {
    let mut b = lock_frame();
    b[0] = b'X';
    assert_contains(&err_of(&b), "bad magic");
}

#[test]
fn error_unsupported_version() {
    let mut b = lock_frame();
    b[4] = 2;
    assert_contains(&err_of(&b), "unsupported frame version 2");
}

#[test]
fn error_unknown_kind() {
    let mut b = lock_frame();
    b[5] = 0xEE;
    assert_contains(&err_of(&b), "unknown message kind 0xee");
}

#[test]
fn error_oversized_is_refused_from_the_header_alone() {
    let mut b = lock_frame();
    b[40..44].copy_from_slice(&(MAX_PAYLOAD + 1).to_le_bytes());
    let header_only = &b[..HEADER_LEN];
    let e = decode_frame(header_only).unwrap_err();
    assert_contains(&e.to_string(), "oversized frame: payload length 16842753");
    let mut buf = BytesMut::from(header_only);
    assert!(matches!(
        decode_from(&mut buf),
        Err(WireError::Oversized { .. })
    ));
    assert!(
        buf.capacity() < 1024,
        "nothing was reserved for an oversized frame"
    );
}

#[test]
fn error_truncated() {
    let b = lock_frame();
    assert_contains(
        &err_of(&b[..10]),
        "truncated frame header: need 48 bytes, have 10",
    );
    assert_contains(
        &err_of(&b[..50]),
        "truncated frame payload: need 56 bytes, have 50",
    );
    // A payload shorter than its fields, with a correct checksum.
    let short = raw_frame(Kind::Read as u8, 1, &[1, 2, 3]);
    assert_contains(&err_of(&short), "truncated READ: need 8 bytes, have 3");
    // A list whose count exceeds the payload is refused before allocating.
    let mut p = vec![0u8; 48];
    p.extend_from_slice(&u32::MAX.to_le_bytes());
    let e = err_of(&raw_frame(Kind::Register as u8, 1, &p));
    assert_contains(&e, "truncated REGISTER held_locks");
}

#[test]
fn error_checksum() {
    let mut b = lock_frame();
    b[50] ^= 1;
    assert_contains(&err_of(&b), "checksum mismatch");
}

#[test]
fn error_out_of_range() {
    // Read of 0 bytes.
    let mut p = 0u64.to_le_bytes().to_vec();
    p.extend_from_slice(&0u32.to_le_bytes());
    assert_contains(
        &err_of(&raw_frame(Kind::Read as u8, 1, &p)),
        "READ: field len out of range: 0",
    );
    // Dirty bits for a member that cannot exist.
    let mut p = 0u64.to_le_bytes().to_vec();
    p.extend_from_slice(&0x8000u16.to_le_bytes());
    assert_contains(
        &err_of(&raw_frame(Kind::SetDirty as u8, 1, &p)),
        "SET_DIRTY: field targets",
    );
    // Unknown error code.
    let mut p = 99u16.to_le_bytes().to_vec();
    p.extend_from_slice(&0u16.to_le_bytes());
    assert_contains(
        &err_of(&raw_frame(Kind::Error as u8, 1, &p)),
        "ERROR: field code out of range: 99",
    );
    // A boolean that is neither 0 nor 1.
    assert_contains(
        &err_of(&raw_frame(Kind::DataLock as u8, 1, &[7])),
        "DATA_LOCK: field locked out of range",
    );
    // Flags are reserved.
    let mut b = lock_frame();
    b[6] = 1;
    refresh_crc(&mut b);
    assert_contains(&err_of(&b), "field flags out of range");
    // An unsolicited message with a request id, and a request without one.
    let e = err_of(&raw_frame(Kind::Fenced as u8, 5, &0u16.to_le_bytes()));
    assert_contains(&e, "FENCED: field request id out of range");
    let e = err_of(&raw_frame(Kind::Flush as u8, 0, &[]));
    assert_contains(&e, "FLUSH: field request id out of range");
    // Too long a text, refused on encode too.
    let long = Frame::new(
        1,
        VolumeId(VOL),
        1,
        Message::Error {
            code: ErrorCode::Io,
            message: "x".repeat(5000),
        },
    );
    assert_contains(
        &long.encode().unwrap_err().to_string(),
        "ERROR: field message out of range: 5000 bytes",
    );
    // ...while the constructor cuts it.
    let cut = Frame::new(
        1,
        VolumeId(VOL),
        1,
        Message::error(ErrorCode::Io, "é".repeat(5000)),
    );
    assert!(cut.encode().is_ok());
}

#[test]
fn error_invalid_utf8() {
    let mut p = 2u16.to_le_bytes().to_vec();
    p.extend_from_slice(&[0xff, 0xfe]);
    assert_contains(
        &err_of(&raw_frame(Kind::Fenced as u8, 0, &p)),
        "FENCED: field reason is not valid UTF-8",
    );
}

fn topo() -> Topology {
    Topology::new_normal(
        VolumeId(VOL),
        Layout::raid1(2).unwrap(),
        65536,
        vec![
            (DiskId(1), NodeId::from("a")),
            (DiskId(2), NodeId::from("b")),
        ],
    )
    .unwrap()
}

#[test]
fn error_invalid_topology_names_the_field() {
    // Encode a valid topology, then make both members live on node "a".
    let f = Frame::new(
        0,
        VolumeId(VOL),
        1,
        Message::SwitchTopo { topology: topo() },
    );
    let mut b = f.to_bytes().unwrap().to_vec();
    let pos = b.iter().rposition(|&c| c == b'b').unwrap();
    b[pos] = b'a';
    refresh_crc(&mut b);
    let e = err_of(&b);
    assert_contains(
        &e,
        "SWITCH_TOPO: invalid topology: members[0] and members[1]",
    );
    // Encoding refuses it too.
    let mut t = topo();
    t.chunk_size = 1000;
    let e = Frame::new(1, VolumeId(VOL), 1, Message::Registered { topology: t })
        .encode()
        .unwrap_err();
    assert_contains(&e.to_string(), "chunkSize = 1000");
    // And a topology of another volume than the frame's.
    let e = Frame::new(1, VolumeId(1), 1, Message::Registered { topology: topo() })
        .encode()
        .unwrap_err();
    assert_contains(&e.to_string(), "field topology.volume");
    // A node name that is too long.
    let mut t = topo();
    t.members[0].node = NodeId("n".repeat(300));
    let e = Frame::new(1, VolumeId(VOL), 1, Message::Registered { topology: t })
        .encode()
        .unwrap_err();
    assert_contains(&e.to_string(), "members[0].node is 300 bytes");
}

#[test]
fn error_trailing_bytes() {
    let mut b = lock_frame();
    b.push(0);
    assert_contains(
        &err_of(&b),
        "trailing bytes: frame payload has 1 bytes after",
    );
    let e = err_of(&raw_frame(Kind::Lock as u8, 1, &[0; 9]));
    assert_contains(
        &e,
        "trailing bytes: LOCK payload has 1 bytes after its last field",
    );
}

#[test]
fn secret_is_not_printed() {
    let m = Message::Register {
        client: 1,
        secret: Secret([0xAB; 32]),
        held_locks: vec![],
    };
    assert!(!format!("{m:?}").contains("171"));
    assert!(Secret([1; 32]).ct_eq(&Secret([1; 32])));
    assert!(!Secret([1; 32]).ct_eq(&Secret([2; 32])));
}

#[test]
fn big_write_round_trips_without_copying_on_decode() {
    let data = Bytes::from(vec![0x5a; MAX_IO_LEN as usize]);
    let f = Frame::new(3, VolumeId(VOL), 2, Message::Write { offset: 4096, data });
    let enc = f.encode().unwrap();
    assert_eq!(enc.len(), HEADER_LEN + 8 + MAX_IO_LEN as usize);
    let mut buf = BytesMut::from(&enc.to_bytes()[..]);
    assert_eq!(decode_from(&mut buf).unwrap(), Some(f));
    // One byte more than a chunk is refused on encode.
    let data = Bytes::from(vec![0; MAX_IO_LEN as usize + 1]);
    let e = Frame::new(3, VolumeId(VOL), 2, Message::Write { offset: 0, data })
        .encode()
        .unwrap_err();
    assert_contains(&e.to_string(), "WRITE: field data out of range");
}

#[test]
fn empty_intent_is_refused_naming_its_data() {
    let f = Frame::new(
        3,
        VolumeId(VOL),
        2,
        Message::Intent {
            unit: 1,
            column: 0,
            data: Bytes::new(),
        },
    );
    let e = f.encode().unwrap_err();
    assert_contains(&e.to_string(), "INTENT: field data out of range");
}

/// One small frame of every kind.
fn sample_frames() -> Vec<Frame> {
    let t = topo();
    let locks = vec![LockEntry {
        unit: 5,
        client: 77,
    }];
    let msgs = vec![
        Message::Register {
            client: 77,
            secret: Secret([9; 32]),
            held_locks: vec![1, 2],
        },
        Message::Read {
            offset: 4096,
            len: 512,
        },
        Message::ReadTestLock {
            unit: 1,
            offset: 65536,
            len: 4096,
        },
        Message::Write {
            offset: 0,
            data: Bytes::from_static(b"0123456789abcdef"),
        },
        Message::Lock { unit: 3 },
        Message::Unlock { unit: 3 },
        Message::SetDirty {
            unit: 3,
            targets: 0b10,
        },
        Message::ClearDirty {
            unit: 3,
            targets: 0b10,
        },
        Message::Flush,
        Message::AckTopo { generation: 4 },
        Message::ReportUnreachable { member: 1 },
        Message::Intent {
            unit: 2,
            column: 4096,
            data: Bytes::from_static(b"columns"),
        },
        Message::FenceClient { client: 77 },
        Message::GetLocks { units: 0..100 },
        Message::PutLocks {
            locks: locks.clone(),
        },
        Message::GetDirty {
            target: 1,
            units: 0..64,
        },
        Message::ReleaseLock {
            unit: 5,
            client: 77,
        },
        Message::Ok,
        Message::Registered {
            topology: t.clone(),
        },
        Message::Data {
            data: Bytes::from_static(b"data"),
        },
        Message::DataLock {
            locked: true,
            data: Bytes::from_static(b"data"),
        },
        Message::Locked { holder: 78 },
        Message::error(ErrorCode::StaleGeneration, "generation 2 < 3"),
        Message::Locks { locks },
        Message::Dirty {
            first: 0,
            bits: Bytes::from_static(&[0b1010_0001, 0xff]),
        },
        Message::SwitchTopo { topology: t },
        Message::fenced("missed generation 5"),
    ];
    msgs.into_iter()
        .map(|m| {
            let rid = if m.kind().is_unsolicited() { 0 } else { 11 };
            Frame::new(rid, VolumeId(VOL), 3, m)
        })
        .collect()
}

#[test]
fn sample_frames_cover_every_kind_and_round_trip() {
    let frames = sample_frames();
    assert_eq!(frames.len(), Kind::ALL.len());
    for (f, k) in frames.iter().zip(Kind::ALL) {
        assert_eq!(f.kind(), k);
        assert_eq!(decode_frame(&f.to_bytes().unwrap()).unwrap(), *f);
    }
}

/// Regenerates the fuzz seed corpus: `cargo test -p toma-wire --test codec -- --ignored`.
#[test]
#[ignore]
fn write_fuzz_seeds() {
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/seeds");
    std::fs::create_dir_all(&dir).unwrap();
    for f in sample_frames() {
        let name = f.kind().name().to_ascii_lowercase();
        std::fs::write(dir.join(name), f.to_bytes().unwrap()).unwrap();
    }
}
