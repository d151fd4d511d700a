//! What a TOMA refuses, and that a refused request changes no byte on any disk: a wrong
//! secret, an unknown volume, a generation older than g−1, I/O outside the member's extent
//! or not aligned, I/O to a member declared DEAD while its agent still runs.

mod common;

use common::*;
use toma_agent::local::LocalTimers;
use toma_core::{Phase, Role, VolumeId};
use toma_wire::{ErrorCode, Message, Secret};

const UNITS: u64 = 16;

/// Waits until the agent on `node` serves generation `g` of volume `id`.
async fn agent_knows(c: &toma_agent::local::LocalCluster, node: usize, id: VolumeId, g: u64) {
    wait_until("the member's TOMA knows g", WAIT, || async {
        c.agent(node)
            .unwrap()
            .members()
            .iter()
            .any(|m| m.volume == id && m.topology().generation == g)
    })
    .await;
}

/// Chunk 0 of the member `raw` is registered with, read under `generation`.
async fn read_chunk0(raw: &Raw, generation: u64) -> bytes::Bytes {
    let read = Message::Read {
        offset: 0,
        len: CHUNK as u32,
    };
    match raw.call_gen(generation, read).await {
        Message::Data { data } => data,
        other => panic!("READ at generation {generation} answered {other:?}"),
    }
}

async fn written_volume(c: &toma_agent::local::LocalCluster) -> VolumeId {
    let id = volume(c, 2, UNITS).await;
    let cl = client(c, id).await;
    for u in 0..UNITS {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    id
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wrong_secret_and_unknown_volume_are_refused_and_nothing_is_written() {
    let (_dir, c) = cluster(2).await;
    let id = written_volume(&c).await;
    let before = c.member_contents(id).await;
    let g = c.topology(id).await.unwrap().generation;
    let n0 = node_of(&c, id, 0).await;

    // Wrong secret.
    let raw = Raw::connect(&c, n0, id, random_u128()).await;
    let mut secret = c.volume_record(id).await.unwrap().secret;
    secret[0] ^= 1;
    let reply = raw
        .call_gen(
            g,
            Message::Register {
                client: raw.client,
                secret: Secret(secret),
                held_locks: vec![0, 1],
            },
        )
        .await;
    expect_error(&reply, ErrorCode::WrongSecret);
    // The connection is not registered: its LOCK and WRITE are refused.
    expect_error(
        &raw.call_gen(g, Message::Lock { unit: 0 }).await,
        ErrorCode::NotRegistered,
    );
    let w = Message::Write {
        offset: 0,
        data: block(0, 66),
    };
    expect_error(&raw.call_gen(g, w).await, ErrorCode::NotRegistered);
    // Its held_locks were not installed.
    for a in c.agent(n0).unwrap().members() {
        assert!(a.runtime().locks.locks().is_empty());
    }

    // Unknown volume.
    let ghost = VolumeId(random_u128());
    let raw = Raw::connect(&c, n0, ghost, random_u128()).await;
    let reply = raw
        .call_gen(
            1,
            Message::Register {
                client: raw.client,
                secret: Secret([0; 32]),
                held_locks: Vec::new(),
            },
        )
        .await;
    expect_error(&reply, ErrorCode::UnknownVolume);
    let w = Message::Write {
        offset: 0,
        data: block(0, 67),
    };
    expect_error(&raw.call_gen(1, w).await, ErrorCode::NotRegistered);

    assert_eq!(c.member_contents(id).await, before, "no byte changed");
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generations_older_than_g_minus_1_are_refused_and_nothing_is_written() {
    let (_dir, mut c) = cluster(2).await;
    let id = written_volume(&c).await;
    let cl = client(&c, id).await;
    // Several topology changes: Degraded, and back through the rebuild to Normal.
    let n1 = node_of(&c, id, 1).await;
    c.kill_agent(n1);
    cl.write(0, block(0, 2)).await.unwrap();
    c.start_agent(n1).await.unwrap();
    let t = c
        .wait_topology(id, WAIT, |t| {
            t.phase() == Phase::Normal && t.generation >= 6
        })
        .await
        .unwrap();
    let g = t.generation;
    let n0 = node_of(&c, id, 0).await;
    // The agent serves g (it pushed it to the clients, which acknowledged it).
    agent_knows(&c, n0, id, g).await;
    let before = c.member_contents(id).await;
    let raw = Raw::register(&c, n0, id, random_u128()).await;

    for old in [1, g - 2] {
        let w = Message::Write {
            offset: 0,
            data: block(0, 70 + old),
        };
        let why = expect_error(&raw.call_gen(old, w).await, ErrorCode::StaleGeneration);
        assert!(why.contains(&old.to_string()), "{why}");
        expect_error(
            &raw.call_gen(old, Message::Lock { unit: 0 }).await,
            ErrorCode::StaleGeneration,
        );
        expect_error(
            &raw.call_gen(
                old,
                Message::SetDirty {
                    unit: 0,
                    targets: 0b10,
                },
            )
            .await,
            ErrorCode::StaleGeneration,
        );
    }
    // A generation this TOMA does not know yet: Busy, also not applied.
    let w = Message::Write {
        offset: 0,
        data: block(0, 80),
    };
    expect_error(&raw.call_gen(g + 1, w).await, ErrorCode::Busy);
    assert_eq!(c.member_contents(id).await, before, "no byte changed");
    for m in c.agent(n0).unwrap().members() {
        assert!(m.runtime().locks.locks().is_empty(), "no lock taken");
        assert_eq!(m.runtime().dirty.count(1), 0, "no dirty bit set");
    }

    // g − 1 is still served.
    assert_eq!(read_chunk0(&raw, g - 1).await, block(0, 2));
    c.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn io_outside_the_extent_or_misaligned_is_out_of_range_and_changes_nothing() {
    let (_dir, c) = cluster(2).await;
    let id = written_volume(&c).await;
    let before = c.member_contents(id).await;
    let member_bytes = c.volume_record(id).await.unwrap().spec.member_bytes();
    let n0 = node_of(&c, id, 0).await;
    let raw = Raw::register(&c, n0, id, random_u128()).await;

    let page = |v: u8, len: usize| bytes::Bytes::from(vec![v; len]);
    let cases: Vec<(&str, u64, bytes::Bytes)> = vec![
        ("past the end", member_bytes, page(1, 4096)),
        ("straddling the end", member_bytes - 4096, page(2, 8192)),
        ("far past the end", 1 << 40, page(3, 4096)),
        ("misaligned offset", 100, page(4, 4096)),
        ("misaligned length", 4096, page(5, 4096 + 512)),
    ];
    for (what, offset, data) in cases {
        let reply = raw.call(Message::Write { offset, data }).await;
        let why = expect_error(&reply, ErrorCode::OutOfRange);
        assert!(!why.is_empty(), "{what}");
    }
    for (what, offset, len) in [
        ("read past the end", member_bytes, 4096u32),
        ("read misaligned", 512, 4096),
    ] {
        let reply = raw.call(Message::Read { offset, len }).await;
        expect_error(&reply, ErrorCode::OutOfRange);
        let _ = what;
    }
    expect_error(
        &raw.call(Message::Lock { unit: UNITS }).await,
        ErrorCode::OutOfRange,
    );
    assert_eq!(c.member_contents(id).await, before, "no byte changed");
    // The disk was not blamed for the client's mistakes: the TOMA still serves it.
    let cl = client(&c, id).await;
    cl.write(0, block(0, 3)).await.unwrap();
    assert_eq!(cl.read(0, CHUNK as usize).await.unwrap(), block(0, 3));
    assert!(c
        .control_plane()
        .disks()
        .await
        .unwrap()
        .iter()
        .all(|d| d.healthy));
    c.shutdown().await;
}

/// A member a client reported unreachable is declared DEAD while its agent still runs (other
/// clients may still reach it). Its agent then serves nothing of the volume: I/O of the
/// generation before is `StaleGeneration` (its writers no longer write this member, so a
/// reader there could see stale data), and I/O of the current one is `UnknownVolume` (a
/// client on it addresses another member, whose disk is no longer on this node).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_declared_dead_while_its_agent_runs_serves_nothing() {
    // Long enough that the leader does not readmit the member during the test.
    let timers = LocalTimers {
        readmit_after: std::time::Duration::from_secs(600),
        ..LocalTimers::default()
    };
    let (_dir, c) = cluster_with(2, timers).await;
    let id = written_volume(&c).await;
    let g1 = c.topology(id).await.expect("topology").generation;
    let (n0, n1) = (node_of(&c, id, 0).await, node_of(&c, id, 1).await);
    let reporter = Raw::register(&c, n0, id, random_u128()).await;
    assert_eq!(
        reporter
            .call_gen(g1, Message::ReportUnreachable { member: 1 })
            .await,
        Message::Ok
    );
    let t = c
        .wait_topology(id, WAIT, |t| t.members[1].role == Role::Dead)
        .await
        .unwrap();
    let g = t.generation;
    assert_eq!(t.phase(), Phase::Degraded);
    agent_knows(&c, n1, id, g).await;
    let before = c.member_contents(id).await;
    let raw = Raw::register(&c, n1, id, random_u128()).await;
    let read = Message::Read {
        offset: 0,
        len: CHUNK as u32,
    };
    let why = expect_error(
        &raw.call_gen(g - 1, read.clone()).await,
        ErrorCode::StaleGeneration,
    );
    assert!(why.contains("DEAD"), "{why}");
    let why = expect_error(&raw.call_gen(g, read).await, ErrorCode::UnknownVolume);
    assert!(why.contains("DEAD"), "{why}");
    for gen in [g - 1, g] {
        let w = Message::Write {
            offset: 0,
            data: block(0, 90 + gen),
        };
        let r = raw.call_gen(gen, w).await;
        assert!(
            matches!(
                r,
                Message::Error {
                    code: ErrorCode::StaleGeneration | ErrorCode::UnknownVolume,
                    ..
                }
            ),
            "WRITE at {gen} answered {r:?}"
        );
        let r = raw.call_gen(gen, Message::Lock { unit: 0 }).await;
        assert!(
            matches!(r, Message::Error { .. }),
            "LOCK at {gen} answered {r:?}"
        );
    }
    assert_eq!(c.member_contents(id).await, before, "no byte changed");
    for m in c.agent(n1).unwrap().members() {
        assert!(m.runtime().locks.locks().is_empty(), "no lock taken");
    }
    // The live member still serves the current generation.
    assert_eq!(read_chunk0(&reporter, g).await, block(0, 1));
    c.shutdown().await;
}
