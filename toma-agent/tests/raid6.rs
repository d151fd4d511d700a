//! RAID6 4+2 over six real agents (TCP, file disks): full-stripe, multi-chunk and single-block
//! writes, reads reconstructed while two members are lost (at once, and one after the
//! other), and the rebuild that brings both back in one pass — ending with every byte read
//! through the client and P and Q checked on every stripe of every member.

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

async fn wait_normal(c: &LocalCluster, id: VolumeId, when: &str) {
    // Normal: every member RWL (`Topology::phase`).
    c.wait_topology(id, WAIT, |t| t.phase() == Phase::Normal)
        .await
        .unwrap_or_else(|e| panic!("{when}: not Normal: {e}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn raid6_survives_two_losses_and_rebuilds_both() {
    let (_dir, mut c) = cluster(6).await;
    let id = c
        .create_volume("r6", Layout::raid6(K as u8).unwrap(), CHUNK, SIZE)
        .await
        .expect("volume created");
    let cl = client(&c, id).await;
    let mut model = vec![0u8; SIZE as usize];
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
