//! A client dies holding locks after writing only one mirror: the TOMAs fence it on every
//! member, copy each chunk it held from the chunk's read member to the others, free the
//! locks, and refuse the client id from then on.

mod common;

use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use toma_agent::local::LocalTimers;
use toma_core::placement::read_member;
use toma_wire::{ErrorCode, Message, Secret};

const UNITS: u64 = 16;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_clients_stale_locks_are_recovered_after_fencing_it() {
    let timers = LocalTimers {
        reconnect_grace: Duration::from_millis(500),
        ..LocalTimers::default()
    };
    let (_dir, c) = cluster_with(2, timers).await;
    let id = volume(&c, 2, UNITS).await;
    let cl = client(&c, id).await;
    for u in 0..UNITS {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    let t = c.topology(id).await.unwrap();
    let node = [node_of(&c, id, 0).await, node_of(&c, id, 1).await];

    // The doomed client registers on both members, like every client.
    let dead = random_u128();
    let raw = [
        Raw::register(&c, node[0], id, dead).await,
        Raw::register(&c, node[1], id, dead).await,
    ];
    // Unit 2 (read and lock member 0): written on member 0 only.
    // Unit 3 (read and lock member 1): written on member 0 only, the member that does NOT
    // hold its lock: recovery must restore member 1's data (the read member's) there.
    // Unit 4 (member 0): locked, nothing written; another writer waits for it.
    let (u_a, u_b, u_c) = (2u64, 3u64, 4u64);
    assert_eq!(read_member(&t, u_a), Some(0));
    assert_eq!(read_member(&t, u_b), Some(1));
    assert_eq!(read_member(&t, u_c), Some(0));
    for (m, u) in [(0, u_a), (1, u_b), (0, u_c)] {
        assert_eq!(raw[m].call(Message::Lock { unit: u }).await, Message::Ok);
    }
    for u in [u_a, u_b] {
        let w = Message::Write {
            offset: u * CHUNK,
            data: block(u, 9),
        };
        assert_eq!(raw[0].call(w).await, Message::Ok);
    }
    let contents = c.member_contents(id).await;
    assert_eq!(chunk_of(&contents[0].1, u_a), &block(u_a, 9)[..]);
    assert_eq!(
        chunk_of(&contents[1].1, u_a),
        &block(u_a, 1)[..],
        "mirrors diverge"
    );

    // Another writer of unit 4 waits behind the stale lock.
    let waiter = client(&c, id).await;
    let w = {
        let waiter = waiter.clone();
        tokio::spawn(async move { waiter.write(u_c * CHUNK, block(u_c, 5)).await })
    };
    wait_until("the writer met the stale lock", WAIT, || async {
        waiter.stats().lock_retries.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(!w.is_finished());

    // The client dies: its connections drop.
    for r in &raw {
        r.close();
    }

    // Recovery: the locks are freed on both members...
    wait_until("stale locks freed", WAIT, || async {
        [0, 1].iter().all(|&i| {
            c.agent(node[i])
                .unwrap()
                .members()
                .iter()
                .filter(|m| m.volume == id)
                .all(|m| {
                    let rt = m.runtime();
                    rt.locks.is_fenced(toma_agent::ClientId(dead))
                        && rt.locks.locks_of(toma_agent::ClientId(dead)).is_empty()
                })
        })
    })
    .await;
    // ...the waiting writer proceeds...
    finish("the waiting writer", w).await.expect("write");
    // ...and every chunk the dead client held holds its read member's data on both mirrors.
    c.assert_mirrors_identical(id).await;
    let contents = c.member_contents(id).await;
    for (m, data) in &contents {
        assert_eq!(
            chunk_of(data, u_a),
            &block(u_a, 9)[..],
            "member {m} unit {u_a}"
        );
        assert_eq!(
            chunk_of(data, u_b),
            &block(u_b, 1)[..],
            "member {m} unit {u_b}"
        );
        assert_eq!(
            chunk_of(data, u_c),
            &block(u_c, 5)[..],
            "member {m} unit {u_c}"
        );
    }
    assert_eq!(
        cl.read(u_a * CHUNK, CHUNK as usize).await.unwrap(),
        block(u_a, 9)
    );

    // The fenced id is refused when it comes back, on every member.
    let secret = Secret(c.volume_record(id).await.unwrap().secret);
    for n in node {
        let again = Raw::connect(&c, n, id, dead).await;
        let reply = again
            .call_gen(
                t.generation,
                Message::Register {
                    client: dead,
                    secret: secret.clone(),
                    held_locks: vec![u_a],
                },
            )
            .await;
        expect_error(&reply, ErrorCode::Fenced);
    }
    // Nothing it wrote got in after the fence.
    c.assert_mirrors_identical(id).await;
    c.shutdown().await;
}

/// The dying client loses only its link to the lock member; its connection to the other
/// member is still up. The lock member's TOMA fences it, has the other TOMA fence it too
/// (which tells the client and closes that connection) before it copies, and only then
/// copies the chunk and frees the lock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fencing_reaches_the_other_member_before_recovery() {
    let timers = LocalTimers {
        reconnect_grace: Duration::from_millis(500),
        ..LocalTimers::default()
    };
    let (_dir, c) = cluster_with(2, timers).await;
    let id = volume(&c, 2, UNITS).await;
    let cl = client(&c, id).await;
    for u in 0..UNITS {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    let t = c.topology(id).await.unwrap();
    let node = [node_of(&c, id, 0).await, node_of(&c, id, 1).await];
    let dead = random_u128();
    let raw = [
        Raw::register(&c, node[0], id, dead).await,
        Raw::register(&c, node[1], id, dead).await,
    ];
    let unit = 6;
    assert_eq!(read_member(&t, unit), Some(0));
    assert_eq!(raw[0].call(Message::Lock { unit }).await, Message::Ok);
    let w = Message::Write {
        offset: unit * CHUNK,
        data: block(unit, 9),
    };
    assert_eq!(raw[0].call(w).await, Message::Ok);

    // Only the link to member 0 breaks.
    raw[0].close();
    // Member 1's TOMA fences it on member 0's request: FENCED, then the connection closes.
    let why = raw[1].wait_closed().await;
    let fenced = raw[1].unsolicited.lock().await.try_recv();
    assert!(
        matches!(fenced, Ok(Message::Fenced { .. })),
        "told it is fenced: {fenced:?} ({why})"
    );
    wait_until("the stale lock is freed", WAIT, || async {
        c.agent(node[0])
            .unwrap()
            .members()
            .iter()
            .filter(|m| m.volume == id)
            .all(|m| m.runtime().locks.holder(unit).is_none())
    })
    .await;
    c.assert_mirrors_identical(id).await;
    for (m, data) in c.member_contents(id).await {
        assert_eq!(chunk_of(&data, unit), &block(unit, 9)[..], "member {m}");
    }
    // Both TOMAs refuse it now.
    for n in node {
        let m = c.agent(n).unwrap().members();
        let m = m.iter().find(|m| m.volume == id).unwrap();
        assert!(m.runtime().locks.is_fenced(toma_agent::ClientId(dead)));
    }
    // A new writer of that chunk proceeds at once.
    cl.write(unit * CHUNK, block(unit, 3)).await.unwrap();
    c.assert_mirrors_identical(id).await;
    c.shutdown().await;
}
