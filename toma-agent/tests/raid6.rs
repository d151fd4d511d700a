//! RAID6 4+2 over six real agents (TCP, file disks): full-stripe, multi-chunk and single-block
//! writes, reads reconstructed while two members are lost (at once, and one after the
//! other), and the rebuild that brings both back in one pass — ending with every byte read
//! through the client and P and Q checked on every stripe of every member. And a writer that
//! dies between two shard writes of a doubly degraded stripe: recovered from its intent.

mod common;

use bytes::Bytes;
use common::*;
use toma_agent::local::LocalCluster;
use toma_client::raid6::verify_members;
use toma_client::VolumeClient;
use toma_core::{Layout, Phase, Role, VolumeId};

const K: u64 = 4;
const STRIPES: u64 = 8;
const SIZE: u64 = STRIPES * K * CHUNK;

/// Deterministic bytes for a write: which write (`tag`) and where.
fn pattern(tag: u64, offset: u64, len: usize) -> Bytes {
    Bytes::from(
        (0..len as u64)
            .map(|i| (((offset + i) / 7) ^ tag.wrapping_mul(0x9E37)) as u8)
            .collect::<Vec<u8>>(),
    )
}

async fn write(cl: &VolumeClient, model: &mut [u8], tag: u64, offset: u64, len: usize) {
    let data = pattern(tag, offset, len);
    cl.write(offset, data.clone())
        .await
        .unwrap_or_else(|e| panic!("write {tag} at {offset}+{len}: {e}"));
    model[offset as usize..offset as usize + len].copy_from_slice(&data);
}

/// A mix: one full stripe, a write across two chunks, single blocks at odd places, a write
/// across a stripe boundary.
async fn write_mix(cl: &VolumeClient, model: &mut [u8], round: u64) {
    let stripe = K * CHUNK;
    write(
        cl,
        model,
        round * 10,
        (round % STRIPES) * stripe,
        stripe as usize,
    )
    .await;
    write(cl, model, round * 10 + 1, CHUNK - 8192, 16384).await;
    for (i, b) in [3u64, 17, 40, 77, 100, 127].iter().enumerate() {
        let off = (b * 4096 + round * 4096 * 9) % SIZE;
        write(cl, model, round * 10 + 2 + i as u64, off, 4096).await;
    }
    write(cl, model, round * 10 + 9, 2 * stripe - 4096, 12288).await;
}

async fn read_all(cl: &VolumeClient, model: &[u8], when: &str) {
    // Whole volume in stripe-sized reads, then reads of single blocks and across chunks
    // (members take block-aligned I/O only).
    let stripe = K * CHUNK;
    for s in 0..STRIPES {
        let got = cl.read(s * stripe, stripe as usize).await.expect("read");
        let want = &model[(s * stripe) as usize..((s + 1) * stripe) as usize];
        if let Some(pos) = got.iter().zip(want).position(|(a, b)| a != b) {
            panic!("{when}: stripe {s} differs at byte {pos}");
        }
    }
    for (off, len) in [
        (4096u64, 8192usize),
        (CHUNK - 4096, 8192),
        (3 * CHUNK + 4096, 4096),
    ] {
        let got = cl.read(off, len).await.expect("read");
        assert_eq!(
            &got[..],
            &model[off as usize..off as usize + len],
            "{when}: {off}+{len}"
        );
    }
}

/// Every member's extent: P and Q right on every stripe, and the data is the model.
async fn verify_stripes(c: &LocalCluster, id: VolumeId, model: &[u8], when: &str) {
    let t = c.topology(id).await.expect("topology");
    let contents = c.member_contents(id).await;
    assert_eq!(contents.len(), 6, "{when}: every member readable");
    let data = verify_members(&t, &contents).unwrap_or_else(|e| panic!("{when}: {e}"));
    assert_eq!(data.len(), model.len());
    if let Some(pos) = data.iter().zip(model).position(|(a, b)| a != b) {
        panic!("{when}: the members' data differs from what was written at byte {pos}");
    }
}

/// A RAID6 4+2 volume named `name`, a client of it, and its model (all zero).
async fn raid6_volume(c: &LocalCluster, name: &str) -> (VolumeId, VolumeClient, Vec<u8>) {
    let id = c
        .create_volume(name, Layout::raid6(K as u8).unwrap(), CHUNK, SIZE)
        .await
        .expect("volume created");
    (id, client(c, id).await, vec![0u8; SIZE as usize])
}

async fn wait_normal(c: &LocalCluster, id: VolumeId, when: &str) {
    // Normal: every member RWL (`Topology::phase`).
    c.wait_topology(id, WAIT, |t| t.phase() == Phase::Normal)
        .await
        .unwrap_or_else(|e| panic!("{when}: not Normal: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid6_survives_two_losses_and_rebuilds_both() {
    let (_dir, mut c) = cluster(6).await;
    let (id, cl, mut model) = raid6_volume(&c, "r6").await;
    write_mix(&cl, &mut model, 0).await;
    read_all(&cl, &model, "normal").await;
    verify_stripes(&c, id, &model, "normal").await;

    // Two members lost at once (a data member of stripe 0 and one more): every read of
    // their chunks is reconstructed, writes go on degraded.
    let a = node_of(&c, id, 1).await;
    let b = node_of(&c, id, 4).await;
    c.kill_agent(a);
    c.kill_agent(b);
    write_mix(&cl, &mut model, 1).await;
    let t = c.topology(id).await.expect("topology");
    assert_eq!(t.count(Role::Dead), 2, "both lost members are DEAD: {t}");
    read_all(&cl, &model, "two lost").await;
    write_mix(&cl, &mut model, 2).await;
    read_all(&cl, &model, "two lost, more writes").await;

    // Both come back while the leader is down (a failover): the new leader finds both
    // returned and rebuilds them in one pass; then every stripe is checked.
    c.crash_leader();
    c.start_agent(a).await.expect("restart");
    c.start_agent(b).await.expect("restart");
    c.start_leader();
    let both = c
        .wait_topology(id, WAIT, |t| t.count(Role::W) == 2)
        .await
        .unwrap_or_else(|e| panic!("both returned members rebuilt in one pass: {e}"));
    assert!(both.rebuild || both.phase() == Phase::RebuildInit, "{both}");
    wait_normal(&c, id, "after two returns").await;
    read_all(&cl, &model, "rebuilt").await;
    verify_stripes(&c, id, &model, "rebuilt").await;

    // One after the other: the second loss while the first is still DEAD.
    let d = node_of(&c, id, 0).await;
    c.kill_agent(d);
    write_mix(&cl, &mut model, 3).await;
    let e = node_of(&c, id, 5).await;
    c.kill_agent(e);
    write_mix(&cl, &mut model, 4).await;
    read_all(&cl, &model, "lost one after the other").await;
    c.start_agent(d).await.expect("restart");
    c.start_agent(e).await.expect("restart");
    wait_normal(&c, id, "after the second pair").await;
    read_all(&cl, &model, "rebuilt again").await;
    verify_stripes(&c, id, &model, "rebuilt again").await;
    c.shutdown().await;
}

/// The write hole, closed by the write intent: with two data members of a stripe DEAD, a
/// client sends INTENT, writes one data chunk and not P and Q, and dies. Recovery writes the
/// intent's columns instead of decoding the half-written stripe: the lost chunks read back
/// as they were (decoding would give bytes no write wrote), the written one as the intent
/// says, and once both members return every stripe's P and Q are right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_writer_dead_mid_stripe_is_rolled_forward_from_its_intent() {
    use toma_agent::local::LocalTimers;
    use toma_core::placement::{locks, raid6_data_member};
    use toma_wire::Message;

    let timers = LocalTimers {
        reconnect_grace: std::time::Duration::from_millis(500),
        ..LocalTimers::default()
    };
    let (_dir, mut c) = cluster_with(6, timers).await;
    let (id, cl, mut model) = raid6_volume(&c, "r6-intent").await;
    write(&cl, &mut model, 1, 0, SIZE as usize).await;

    // Stripe 0's data chunks 1 and 2 are lost.
    let s = 0u64;
    let t = c.topology(id).await.expect("topology");
    let lost = [raid6_data_member(&t, s, 1), raid6_data_member(&t, s, 2)];
    let lost_nodes = [
        node_of(&c, id, lost[0]).await,
        node_of(&c, id, lost[1]).await,
    ];
    for n in lost_nodes {
        c.kill_agent(n);
    }
    // A write elsewhere meets the lost members: the client reports them.
    write(&cl, &mut model, 2, 4 * K * CHUNK, 4096).await;
    let t = c
        .wait_topology(id, WAIT, |t| t.count(Role::Dead) == 2)
        .await
        .expect("both lost members DEAD");

    // The doomed writer: registered on every live member, takes stripe 0's lock, says what
    // it will leave (chunk 0 new, the others as they are), writes chunk 0 only, and dies.
    let doomed = random_u128();
    let mut raws = Vec::new();
    for m in t.alive() {
        let n = node_of(&c, id, m).await;
        raws.push((m, Raw::register(&c, n, id, doomed).await));
    }
    let raw = |m: usize| &raws.iter().find(|(x, _)| *x == m).expect("live member").1;
    let lock_set = locks(&t, s);
    assert!(!lock_set.is_empty() && lock_set.iter().all(|m| !lost.contains(m)));
    // Bad intents are refused and change nothing: of a stripe it does not hold, and of a
    // size that is not k columns within a chunk.
    let l0 = raw(lock_set[0]);
    let bad = l0
        .call(Message::Intent {
            unit: s,
            column: 0,
            data: Bytes::from(vec![1u8; 4 * 4096]),
        })
        .await;
    expect_error(&bad, toma_wire::ErrorCode::NotLockHolder);
    for &l in &lock_set {
        assert_eq!(raw(l).call(Message::Lock { unit: s }).await, Message::Ok);
    }
    for (column, len) in [(0u32, 4 * 4096 + 1), (CHUNK as u32 - 4096, 4 * 8192)] {
        let bad = l0
            .call(Message::Intent {
                unit: s,
                column,
                data: Bytes::from(vec![1u8; len]),
            })
            .await;
        let why = expect_error(&bad, toma_wire::ErrorCode::OutOfRange);
        assert!(why.contains("INTENT") && why.contains("column"), "{why}");
    }
    let new0 = pattern(99, 0, CHUNK as usize);
    let mut intent = new0.to_vec();
    intent.extend_from_slice(&model[CHUNK as usize..(K * CHUNK) as usize]);
    let intent = Bytes::from(intent);
    for &l in &lock_set {
        let m = Message::Intent {
            unit: s,
            column: 0,
            data: intent.clone(),
        };
        assert_eq!(raw(l).call(m).await, Message::Ok);
    }
    let w = Message::Write {
        offset: s * CHUNK,
        data: new0.clone(),
    };
    assert_eq!(raw(raid6_data_member(&t, s, 0)).call(w).await, Message::Ok);
    for (_, r) in &raws {
        r.close();
    }
    model[..CHUNK as usize].copy_from_slice(&new0);

    // Fenced and recovered: the lock is free again (a write of the stripe goes through),
    // the lost chunks decode to what they held, chunk 0 is the intent's.
    write(&cl, &mut model, 3, K * CHUNK - 4096, 4096).await;
    read_all(&cl, &model, "recovered from the intent").await;

    for n in lost_nodes {
        c.start_agent(n).await.expect("restart");
    }
    wait_normal(&c, id, "both returned").await;
    read_all(&cl, &model, "rebuilt").await;
    verify_stripes(&c, id, &model, "rebuilt").await;
    c.shutdown().await;
}

/// What [`half_write_after_one_loss`] leaves: stripe 0 half written by a client that holds
/// its two locks (the intent left with both), one data member DEAD.
struct HalfWrite {
    /// The node of the stripe's lock place (which the test then makes lose its lock table).
    place_node: usize,
    /// The node of the DEAD member.
    lost_node: usize,
    /// The doomed client's sessions, one per live member.
    raws: Vec<(usize, Raw)>,
}

/// Stripe 0's data chunk 2 is lost (its member DEAD); then a doomed client takes the stripe's
/// two locks (the place and the next RWL member), leaves its intent with both, and writes
/// the data chunk the second lock member holds — not P and Q. The model gets the new chunk.
async fn half_write_after_one_loss(
    c: &mut LocalCluster,
    id: VolumeId,
    cl: &VolumeClient,
    model: &mut [u8],
    tag: u64,
) -> HalfWrite {
    use toma_core::placement::{locks, raid6_data_member};
    use toma_wire::Message;

    let s = 0u64;
    let t = c.topology(id).await.expect("topology");
    let lost = raid6_data_member(&t, s, 2);
    let lost_node = node_of(c, id, lost).await;
    c.kill_agent(lost_node);
    write(cl, model, 2, 4 * K * CHUNK, 4096).await;
    let t = c
        .wait_topology(id, WAIT, |t| t.count(Role::Dead) == 1)
        .await
        .expect("the lost member DEAD");
    assert!(t.members[lost].role.is_dead());

    let lock_set = locks(&t, s);
    assert_eq!(lock_set.len(), 2, "a RAID6 stripe locks on two members");
    let (place, second) = (lock_set[0], lock_set[1]);
    // The chunk the second lock member holds: it outlives the place.
    let j = (0..K as usize)
        .find(|&j| raid6_data_member(&t, s, j) == second)
        .expect("the second lock member holds a data chunk of stripe 0");

    let doomed = random_u128();
    let mut raws = Vec::new();
    for m in t.alive() {
        let n = node_of(c, id, m).await;
        raws.push((m, Raw::register(c, n, id, doomed).await));
    }
    let raw = |m: usize| &raws.iter().find(|(x, _)| *x == m).expect("live member").1;
    for &l in &lock_set {
        assert_eq!(raw(l).call(Message::Lock { unit: s }).await, Message::Ok);
    }
    let at = j * CHUNK as usize;
    let new_j = pattern(tag, at as u64, CHUNK as usize);
    let mut intent = model[..(K * CHUNK) as usize].to_vec();
    intent[at..at + CHUNK as usize].copy_from_slice(&new_j);
    let intent = Bytes::from(intent);
    for &l in &lock_set {
        let m = Message::Intent {
            unit: s,
            column: 0,
            data: intent.clone(),
        };
        assert_eq!(raw(l).call(m).await, Message::Ok);
    }
    let w = Message::Write {
        offset: s * CHUNK,
        data: new_j.clone(),
    };
    assert_eq!(raw(second).call(w).await, Message::Ok);
    model[at..at + CHUNK as usize].copy_from_slice(&new_j);
    HalfWrite {
        place_node: node_of(c, id, place).await,
        lost_node,
        raws,
    }
}

/// Six agents (a short reconnect grace) and a RAID6 volume `name` written whole, then left
/// as [`half_write_after_one_loss`] leaves it (`tag` marks the half write's bytes).
async fn half_written(
    name: &str,
    tag: u64,
) -> (
    tempfile::TempDir,
    LocalCluster,
    VolumeId,
    VolumeClient,
    Vec<u8>,
    HalfWrite,
) {
    let timers = toma_agent::local::LocalTimers {
        reconnect_grace: std::time::Duration::from_millis(500),
        ..toma_agent::local::LocalTimers::default()
    };
    let (dir, mut c) = cluster_with(6, timers).await;
    let (id, cl, mut model) = raid6_volume(&c, name).await;
    write(&cl, &mut model, 1, 0, SIZE as usize).await;
    let h = half_write_after_one_loss(&mut c, id, &cl, &mut model, tag).await;
    (dir, c, id, cl, model, h)
}

/// The lock table survives its member (DESIGN §7): the client of [`half_write_after_one_loss`]
/// dies together with the lock place's server. The second lock member — the place once the
/// first is DEAD — still holds the lock and the intent, and its stale-lock recovery rolls the
/// stripe forward: the two lost chunks read back as they were, where decoding the
/// half-written stripe gives bytes no write wrote (as it did with one lock member, whose
/// death took the lock and the intent with it).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_stripe_is_recovered_after_its_lock_place_dies() {
    let (_dir, mut c, id, cl, mut model, h) = half_written("r6-lock-place", 77).await;
    c.kill_agent(h.place_node);
    for (_, r) in &h.raws {
        r.close();
    }

    // A write elsewhere meets the lost place: two members DEAD.
    write(&cl, &mut model, 3, 5 * K * CHUNK, 4096).await;
    c.wait_topology(id, WAIT, |t| t.count(Role::Dead) == 2)
        .await
        .expect("the lock place DEAD too");
    // Fenced and recovered by the second lock member: the stripe's lock is free again (a
    // write of it goes through), the chunks of both lost members decode to what they held.
    write(&cl, &mut model, 4, K * CHUNK - 4096, 4096).await;
    read_all(&cl, &model, "recovered after the lock place died").await;

    for n in [h.lost_node, h.place_node] {
        c.start_agent(n).await.expect("restart");
    }
    wait_normal(&c, id, "both returned").await;
    read_all(&cl, &model, "rebuilt").await;
    verify_stripes(&c, id, &model, "rebuilt").await;
    c.shutdown().await;
}

/// The other way a stripe's lock place loses its lock table: its agent restarts (the member
/// stays readable) as the client of [`half_write_after_one_loss`] dies. Fenced, the client's
/// lock and intent are left only on the second lock member, which recovers the stripe itself
/// — it used to free its lock, since the reader held none, and the DEAD member's chunk then
/// decoded from the torn stripe.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_half_written_stripe_is_recovered_when_its_lock_place_restarts() {
    let (_dir, mut c, id, cl, mut model, h) = half_written("r6-place-restart", 78).await;
    c.kill_agent(h.place_node);
    c.start_agent(h.place_node)
        .await
        .expect("restart the place's agent");
    for (_, r) in &h.raws {
        r.close();
    }

    // Fenced and recovered by the second lock member: a write of the stripe goes through,
    // and the DEAD member's chunk decodes to what it held.
    write(&cl, &mut model, 3, K * CHUNK - 4096, 4096).await;
    read_all(&cl, &model, "recovered after the lock place restarted").await;

    c.start_agent(h.lost_node).await.expect("restart");
    wait_normal(&c, id, "the lost member returned").await;
    read_all(&cl, &model, "rebuilt").await;
    verify_stripes(&c, id, &model, "rebuilt").await;
    c.shutdown().await;
}

/// A degraded write whose intent would not fit one frame (an 8 MiB chunk written whole
/// means 4 × 8 MiB of intent) is written in slices of columns, each with its intent sent
/// first, and every byte and every stripe's P and Q come out right.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_degraded_write_wider_than_a_frame_sends_its_intent_in_slices() {
    use std::sync::atomic::Ordering::Relaxed;
    const BIG: u64 = 8 << 20;
    let size = K * BIG;
    let (_dir, mut c) = cluster(6).await;
    let id = c
        .create_volume("r6-wide", Layout::raid6(K as u8).unwrap(), BIG, size)
        .await
        .expect("volume created");
    let cl = client(&c, id).await;
    let mut model = vec![0u8; size as usize];
    let read_back = |cl: &VolumeClient, model: &[u8], when: &'static str| {
        let (cl, model) = (cl.clone(), model.to_vec());
        async move {
            let piece = 1 << 20;
            for off in (0..model.len()).step_by(piece) {
                let got = cl
                    .read(off as u64, piece)
                    .await
                    .unwrap_or_else(|e| panic!("{when}: read at {off}: {e}"));
                assert!(
                    got[..] == model[off..off + piece],
                    "{when}: bytes at {off}.."
                );
            }
        }
    };

    // A member lost: the full-stripe write meets it, the member is marked DEAD, and the
    // write completes degraded.
    let lost = node_of(&c, id, 2).await;
    c.kill_agent(lost);
    write(&cl, &mut model, 1, 0, size as usize).await;
    c.wait_topology(id, WAIT, |t| t.count(Role::Dead) == 1)
        .await
        .expect("the lost member DEAD");
    let before = cl.stats().intents.load(Relaxed);
    write(&cl, &mut model, 2, BIG, BIG as usize).await;
    let sent = cl.stats().intents.load(Relaxed) - before;
    assert_eq!(sent, 2, "two slices of 4 MiB columns, an intent each");
    read_back(&cl, &model, "degraded").await;

    c.start_agent(lost).await.expect("restart");
    wait_normal(&c, id, "returned").await;
    read_back(&cl, &model, "rebuilt").await;
    verify_stripes(&c, id, &model, "rebuilt").await;
    c.shutdown().await;
}
