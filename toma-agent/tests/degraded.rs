//! Degraded writes set dirty bits on the survivor, exactly for the chunks written; the
//! rebuild after the member returns copies exactly those chunks and nothing else.

mod common;

use std::collections::BTreeSet;
use std::io::{Seek, SeekFrom, Write};

use common::*;
use toma_control::ControlPlane;
use toma_core::{Phase, Role};
use toma_wire::Message;

const UNITS: u64 = 16;

/// Two agents, a two-mirror volume of `UNITS` chunks each written once (version 1), a
/// client of it, and the nodes of members 0 and 1.
async fn written_mirror_pair() -> (
    tempfile::TempDir,
    toma_agent::local::LocalCluster,
    toma_core::VolumeId,
    toma_client::VolumeClient,
    usize,
    usize,
) {
    let (dir, c) = cluster(2).await;
    let id = volume(&c, 2, UNITS).await;
    let cl = client(&c, id).await;
    for u in 0..UNITS {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    let n0 = node_of(&c, id, 0).await;
    let n1 = node_of(&c, id, 1).await;
    (dir, c, id, cl, n0, n1)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn degraded_writes_set_dirty_bits_and_rebuild_copies_exactly_those() {
    let (_dir, mut c, id, cl, n0, n1) = written_mirror_pair().await;
    // Where member 1's extent lies on its disk file, to tamper with it while it is down.
    let (disk1_path, extent1) = {
        let m = c.agent(n1).unwrap().members();
        let m = m.iter().find(|m| m.volume == id).expect("member 1 hosted");
        let e = m.disk.extent(id, 1).expect("extent");
        (c.disk_paths(n1)[0].clone(), e.offset)
    };

    c.kill_agent(n1);
    let dirty: BTreeSet<u64> = [1, 4, 5, 9].into();
    for &u in &dirty {
        cl.write(u * CHUNK, block(u, 2)).await.unwrap();
    }
    let t = c.topology(id).await.unwrap();
    assert_eq!(t.phase(), Phase::Degraded, "{t}");
    assert_eq!(t.members[1].role, Role::Dead, "{t}");

    // The survivor's RAM: exactly the written chunks are dirty about member 1.
    let survivor = c.agent(n0).unwrap().members();
    let m0 = survivor.iter().find(|m| m.volume == id).expect("member 0");
    let rt = m0.runtime();
    assert_eq!(rt.dirty.iter_dirty(1).collect::<BTreeSet<_>>(), dirty);
    assert_eq!(
        rt.dirty.count(0),
        0,
        "nothing is dirty about the live member"
    );
    // The same through GET_DIRTY on a raw connection.
    let raw = Raw::register(&c, n0, id, random_u128()).await;
    match raw
        .call(Message::GetDirty {
            target: 1,
            units: 0..UNITS,
        })
        .await
    {
        Message::Dirty { first, bits } => {
            assert_eq!(first, 0);
            let got: BTreeSet<u64> = (0..UNITS)
                .filter(|u| bits[(u / 8) as usize] & (1 << (u % 8)) != 0)
                .collect();
            assert_eq!(got, dirty, "GET_DIRTY");
        }
        other => panic!("GET_DIRTY answered {other:?}"),
    }
    raw.close();
    for u in 0..UNITS {
        let want = block(u, if dirty.contains(&u) { 2 } else { 1 });
        assert_eq!(cl.read(u * CHUNK, CHUNK as usize).await.unwrap(), want);
    }

    // While member 1 is down, put a marker into one chunk never written while degraded: a
    // rebuild that copies only dirty chunks leaves it there.
    let marked = 7u64;
    assert!(!dirty.contains(&marked));
    let marker = block(marked, 99);
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(&disk1_path)
            .unwrap();
        f.seek(SeekFrom::Start(extent1 + marked * CHUNK)).unwrap();
        f.write_all(&marker).unwrap();
        f.sync_all().unwrap();
    }

    c.start_agent(n1).await.unwrap();
    let t = c
        .wait_topology(id, WAIT, |t| t.phase() == Phase::Normal && t.generation > 2)
        .await
        .unwrap();
    assert!(t.generation >= 6, "went through every phase: {t}");
    let statuses = c.cp_statuses(id).await;
    let rebuilds: Vec<_> = statuses
        .iter()
        .filter_map(|s| s.rebuild)
        .filter(|r| r.finished)
        .collect();
    assert_eq!(rebuilds.len(), 1, "{statuses:?}");
    let r = rebuilds[0];
    assert_eq!(r.done_units, dirty.len() as u64, "{r:?}");
    assert_eq!(r.total_units, dirty.len() as u64, "{r:?}");
    assert_eq!(r.bytes_copied, dirty.len() as u64 * CHUNK, "{r:?}");

    let contents = c.member_contents(id).await;
    assert_eq!(contents.len(), 2);
    for u in 0..UNITS {
        let (a, b) = (chunk_of(&contents[0].1, u), chunk_of(&contents[1].1, u));
        if u == marked {
            assert_eq!(
                b,
                &marker[..],
                "chunk {u} was copied though it was never dirty"
            );
            assert_eq!(a, &block(u, 1)[..]);
        } else {
            let want = block(u, if dirty.contains(&u) { 2 } else { 1 });
            assert_eq!(a, &want[..], "member 0 chunk {u}");
            assert_eq!(b, &want[..], "member 1 chunk {u}");
        }
    }
    // The survivor's bits are all clear again.
    let m0 = c.agent(n0).unwrap().members();
    let m0 = m0.iter().find(|m| m.volume == id).unwrap();
    assert_eq!(m0.runtime().dirty.count(1), 0);
    c.shutdown().await;
}

/// A volume that the control plane leaves out of a listing (as the Kubernetes store does
/// while it cannot read the volume's Secret, during an API server restart) is not a deleted
/// volume: the survivor keeps serving it with its dirty bits, and the rebuild copies every
/// chunk written while degraded. (The agent used to free such a member: its dirty bits were
/// lost, the rebuild skipped those chunks, and e2e scenario (f) read back old data.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_left_out_of_a_listing_keeps_its_member_and_its_dirty_bits() {
    let (_dir, mut c, id, cl, n0, n1) = written_mirror_pair().await;
    c.kill_agent(n1);
    // Degraded writes: dirty bits on member 0's TOMA only.
    for u in 0..5 {
        cl.write(u * CHUNK, block(u, 2)).await.unwrap();
    }
    c.wait_topology(id, WAIT, |t| t.members[1].role == Role::Dead)
        .await
        .expect("member 1 DEAD");

    let vname =
        c.cp.volume(id)
            .await
            .ok()
            .flatten()
            .map(|v| v.value.name)
            .expect("the volume's record");
    c.cp.set_unreadable(&vname, true);
    let before = c.cp.listings_left_out();
    // Each agent and the leader list the volumes every tick: several passes without it.
    wait_until("listings that left the volume out", WAIT, || async {
        c.cp.listings_left_out() >= before + 6
    })
    .await;
    let hosted = c
        .agent(n0)
        .expect("agent 0 runs")
        .members()
        .iter()
        .any(|m| m.volume == id);
    assert!(
        hosted,
        "member 0 is still served while its volume is left out"
    );
    c.cp.set_unreadable(&vname, false);

    c.start_agent(n1).await.unwrap();
    c.wait_topology(id, WAIT, |t| t.phase() == Phase::Normal && t.generation > 2)
        .await
        .expect("Normal again");
    for u in 0..UNITS {
        let want = block(u, if u < 5 { 2 } else { 1 });
        assert_eq!(cl.read(u * CHUNK, CHUNK as usize).await.unwrap(), want);
    }
    c.assert_mirrors_identical(id).await;
    c.shutdown().await;
}
