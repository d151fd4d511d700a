//! Lock exclusion and the piggybacked read/lock test, over real TCP with real files: a raw
//! `toma_wire` client holds a chunk's lock and volume clients must wait for it.

mod common;

use std::sync::atomic::Ordering;

use common::*;
use toma_core::placement::{locks, read_member};
use toma_wire::{ErrorCode, Message};

/// Raw LOCK on a unit: a second client's LOCK gets `Locked{holder}`, and the writes of two
/// volume clients wait (nothing reaches the disks) until the raw client's UNLOCK.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_held_lock_blocks_other_lockers_and_writers_until_unlock() {
    let (_dir, c) = cluster(2).await;
    let id = volume(&c, 2, 8).await;
    let t = c.topology(id).await.unwrap();
    let unit = 3;
    let lock_set = locks(&t, unit);
    assert_eq!(lock_set.len(), 1, "Normal: one lock member per chunk");
    let lock_node = node_of(&c, id, lock_set[0]).await;

    let holder = random_u128();
    let raw = Raw::register(&c, lock_node, id, holder).await;
    assert_eq!(raw.call(Message::Lock { unit }).await, Message::Ok);

    // A second raw client meets the lock.
    let other = Raw::register(&c, lock_node, id, random_u128()).await;
    assert_eq!(
        other.call(Message::Lock { unit }).await,
        Message::Locked { holder }
    );
    // Its UNLOCK of a lock it does not hold is refused and changes nothing.
    expect_error(
        &other.call(Message::Unlock { unit }).await,
        ErrorCode::NotLockHolder,
    );
    // A write intent is RAID6's: a RAID1 member refuses it, naming the volume's layout.
    let why = expect_error(
        &raw.call(Message::Intent {
            unit,
            column: 0,
            data: bytes::Bytes::from_static(b"not RAID6"),
        })
        .await,
        ErrorCode::Invalid,
    );
    assert!(why.contains("not RAID6"), "{why}");

    let before = c.member_contents(id).await;
    let a = client(&c, id).await;
    let b = client(&c, id).await;
    let wa = {
        let a = a.clone();
        tokio::spawn(async move { a.write(unit * CHUNK, block(unit, 1)).await })
    };
    let wb = {
        let b = b.clone();
        tokio::spawn(async move { b.write(unit * CHUNK, block(unit, 2)).await })
    };
    // Both writers have met the lock at least once...
    wait_until("both writers retried the lock", WAIT, || async {
        a.stats().lock_retries.load(Ordering::Relaxed) > 0
            && b.stats().lock_retries.load(Ordering::Relaxed) > 0
    })
    .await;
    // ...and neither completed nor wrote a byte.
    assert!(
        !wa.is_finished() && !wb.is_finished(),
        "a write passed a held lock"
    );
    assert_eq!(
        c.member_contents(id).await,
        before,
        "nothing written under a held lock"
    );
    assert_eq!(
        other.call(Message::Lock { unit }).await,
        Message::Locked { holder }
    );

    assert_eq!(raw.call(Message::Unlock { unit }).await, Message::Ok);
    finish("write a", wa).await.expect("write a");
    finish("write b", wb).await.expect("write b");

    // One whole write won, on both mirrors.
    let got = a.read(unit * CHUNK, CHUNK as usize).await.unwrap();
    assert!(
        got == block(unit, 1) || got == block(unit, 2),
        "a mixture was read"
    );
    c.assert_mirrors_identical(id).await;
    for (m, data) in c.member_contents(id).await {
        assert_eq!(chunk_of(&data, unit), &got[..], "member {m}");
    }
    // The lock is free again: the raw client takes it at once.
    assert_eq!(raw.call(Message::Lock { unit }).await, Message::Ok);
    assert_eq!(raw.call(Message::Unlock { unit }).await, Message::Ok);
    c.shutdown().await;
}

/// A reader of a chunk whose lock another client holds retries (the lock test rides on the
/// read) and returns only after the unlock — with the data the lock holder wrote.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_read_of_a_locked_chunk_waits_and_returns_the_holders_data() {
    let (_dir, c) = cluster(2).await;
    let id = volume(&c, 2, 8).await;
    let reader = client(&c, id).await;
    let unit = 5;
    reader.write(unit * CHUNK, block(unit, 1)).await.unwrap();

    let t = c.topology(id).await.unwrap();
    let r = read_member(&t, unit).expect("a read member");
    assert_eq!(
        locks(&t, unit),
        vec![r],
        "Normal: the read member holds the lock"
    );
    let holder = random_u128();
    let lock_raw = Raw::register(&c, node_of(&c, id, r).await, id, holder).await;
    let other = 1 - r;
    let other_raw = Raw::register(&c, node_of(&c, id, other).await, id, holder).await;
    assert_eq!(lock_raw.call(Message::Lock { unit }).await, Message::Ok);

    let read = {
        let reader = reader.clone();
        tokio::spawn(async move { reader.read(unit * CHUNK, CHUNK as usize).await })
    };
    wait_until("the reader saw the lock", WAIT, || async {
        reader.stats().read_retries.load(Ordering::Relaxed) > 0
    })
    .await;
    assert!(!read.is_finished(), "a read returned past a held lock");

    // The holder writes both mirrors under its lock, then unlocks.
    for raw in [&lock_raw, &other_raw] {
        let w = Message::Write {
            offset: unit * CHUNK,
            data: block(unit, 2),
        };
        assert_eq!(raw.call(w).await, Message::Ok);
    }
    assert!(
        !read.is_finished(),
        "the read must wait for the unlock, not the write"
    );
    assert_eq!(lock_raw.call(Message::Unlock { unit }).await, Message::Ok);

    let got = finish("read", read).await.expect("read");
    assert_eq!(
        got,
        block(unit, 2),
        "the read returns what the lock holder wrote"
    );
    assert!(reader.stats().read_retries.load(Ordering::Relaxed) > 0);
    c.assert_mirrors_identical(id).await;
    c.shutdown().await;
}
