//! Volume expansion at the agent level: an extent grows in place only into free space,
//! its new part reads as zeros, a refusal changes nothing; through real agents (TCP, file
//! disks, the embedded control plane and leader) a RAID1 volume grows with its data intact,
//! a growth blocked by a neighbouring extent is withdrawn with the volume unchanged, and a
//! member that is DEAD during a growth gets it when it returns.

mod common;

use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use common::*;
use toma_agent::local::LocalTimers;
use toma_agent::*;
use toma_control::{grow_volume, GrowError};
use toma_core::{DiskId, Layout, Phase, VolumeId};

const CLUSTER: ClusterId = ClusterId(0xc2);

fn disk_file(dir: &Path, size: u64) -> (std::path::PathBuf, Disk) {
    let p = dir.join("disk");
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(&p).unwrap());
    let d = Disk::format(dev, DiskId(9), CLUSTER, &Overwrite::OnlyIfBlank).unwrap();
    (p, d)
}

fn reopen(p: &Path) -> Disk {
    let dev: Arc<dyn BlockDevice> = Arc::new(FileDevice::open(p).unwrap());
    Disk::open(dev, CLUSTER).unwrap()
}

fn pattern(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i / 4096) as u8 ^ seed).collect()
}

#[test]
fn an_extent_grows_into_free_space_and_its_new_part_reads_zero() {
    let dir = tempfile::tempdir().unwrap();
    let (p, d) = disk_file(dir.path(), 16 * MIB);
    let (a, b) = (VolumeId(1), VolumeId(2));
    let e = d.allocate_extent(a, 0, 2 * MIB, 1).unwrap();
    let old = pattern(2 * MIB as usize, 0x11);
    d.write_member(a, 0, 0, &old).unwrap();
    // Garbage where the extent will grow (what a freed extent of another volume left).
    d.device()
        .write_at(&pattern(2 * MIB as usize, 0x77), e.end())
        .unwrap();
    let g = d.grow_extent(a, 0, 3 * MIB + 4096).unwrap();
    assert_eq!(
        (g.offset, g.length),
        (e.offset, 4 * MIB),
        "rounded up to 1 MiB"
    );
    let mut buf = vec![0xffu8; 4 * MIB as usize];
    d.read_member(a, 0, 0, &mut buf).unwrap();
    assert_eq!(
        &buf[..2 * MIB as usize],
        &old[..],
        "the old part is untouched"
    );
    assert!(
        buf[2 * MIB as usize..].iter().all(|&x| x == 0),
        "the new part is zero"
    );
    // Growing to the same or a smaller length changes nothing.
    assert_eq!(d.grow_extent(a, 0, MIB).unwrap().length, 4 * MIB);
    drop(d);
    // Persisted: the reopened superblock has the longer extent.
    let d = reopen(&p);
    assert_eq!(d.extent(a, 0).unwrap().length, 4 * MIB);

    // Another extent right after it: growing is refused, naming it, and nothing changes.
    let eb = d.allocate_extent(b, 1, MIB, 1).unwrap();
    assert_eq!(eb.offset, e.offset + 4 * MIB, "first fit, right after");
    let theirs = pattern(MIB as usize, 0x55);
    d.write_member(b, 1, 0, &theirs).unwrap();
    let before = d.superblock().extents;
    let err = d.grow_extent(a, 0, 5 * MIB).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SuperblockError::CannotGrow { .. }), "{msg}");
    assert!(
        msg.contains(&b.to_string()) && msg.contains("4194304") && msg.contains("5242880"),
        "names the neighbour and both sizes: {msg}"
    );
    assert_eq!(
        d.superblock().extents,
        before,
        "the extent table is unchanged"
    );
    let mut got = vec![0u8; MIB as usize];
    d.read_member(b, 1, 0, &mut got).unwrap();
    assert_eq!(got, theirs, "the neighbour's data is untouched");
    d.read_member(a, 0, 0, &mut buf).unwrap();
    assert_eq!(&buf[..2 * MIB as usize], &old[..]);

    // Past the end of the disk: refused. The last extent may grow up to it.
    let err = d.grow_extent(b, 1, 64 * MIB).unwrap_err();
    assert!(
        err.to_string().contains("past the disk's usable end"),
        "{err}"
    );
    assert_eq!(
        d.grow_extent(b, 1, 16 * MIB - eb.offset).unwrap().end(),
        16 * MIB
    );
    // No such extent.
    assert!(matches!(
        d.grow_extent(VolumeId(3), 0, MIB),
        Err(SuperblockError::NoSuchExtent { .. })
    ));
}

async fn extent_lengths(c: &toma_agent::local::LocalCluster, id: VolumeId) -> Vec<u64> {
    let mut v = Vec::new();
    for i in 0..c.node_count() {
        if let Some(a) = c.agent(i) {
            for m in a.members().iter().filter(|m| m.volume == id) {
                if let Some(e) = m.disk.extent(id, m.idx()) {
                    v.push(e.length);
                }
            }
        }
    }
    v.sort();
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_volume_grows_with_its_data_intact_and_a_blocked_growth_changes_nothing() {
    let (_dir, c) = cluster(2).await;
    let cp = c.control_plane();
    let a = c
        .create_volume("a", Layout::raid1(2).unwrap(), CHUNK, 4 * MIB)
        .await
        .unwrap();
    let cl = client(&c, a).await;
    for u in 0..4 * MIB / CHUNK {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    // Refusals at the control plane: smaller, or not a multiple of the lock unit.
    let err = grow_volume(cp.as_ref(), a, 2 * MIB, WAIT)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GrowError::Invalid { why, .. } if why.contains("2097152") && why.contains("4194304")),
        "{err}"
    );
    assert!(matches!(
        grow_volume(cp.as_ref(), a, 4 * MIB + 4096, WAIT).await,
        Err(GrowError::Invalid { .. })
    ));
    assert!(cp.set_growing(a, Some(MIB)).await.is_err());
    // The new size is invisible until every member grew: a client that refreshes early
    // keeps the old size.
    assert_eq!(cl.refresh_size().await.unwrap(), 4 * MIB);

    let t0 = std::time::Instant::now();
    assert_eq!(
        grow_volume(cp.as_ref(), a, 8 * MIB, WAIT).await.unwrap(),
        8 * MIB
    );
    eprintln!("grew 4 -> 8 MiB in {:?}", t0.elapsed());
    let rec = c.volume_record(a).await.unwrap();
    assert_eq!((rec.spec.size, rec.growing_to), (8 * MIB, None));
    assert_eq!(extent_lengths(&c, a).await, vec![8 * MIB, 8 * MIB]);
    // The client learns the committed size; the new range reads zero, the old is intact.
    assert!(
        cl.read(4 * MIB, CHUNK as usize).await.is_err(),
        "not yet refreshed"
    );
    assert_eq!(cl.refresh_size().await.unwrap(), 8 * MIB);
    for u in 0..4 * MIB / CHUNK {
        assert_eq!(
            cl.read(u * CHUNK, CHUNK as usize).await.unwrap(),
            block(u, 1)
        );
    }
    let new = cl.read(4 * MIB, 4 * MIB as usize).await.unwrap();
    assert!(new.iter().all(|&x| x == 0), "the new range reads zero");
    for u in 4 * MIB / CHUNK..8 * MIB / CHUNK {
        cl.write(u * CHUNK, block(u, 2)).await.unwrap();
    }
    for u in 4 * MIB / CHUNK..8 * MIB / CHUNK {
        assert_eq!(
            cl.read(u * CHUNK, CHUNK as usize).await.unwrap(),
            block(u, 2)
        );
    }
    // Both members hold the same bytes, new range included.
    c.assert_mirrors_identical(a).await;

    // A second volume right after `a` on both disks blocks the next growth of `a`.
    let b = c
        .create_volume("b", Layout::raid1(2).unwrap(), CHUNK, 2 * MIB)
        .await
        .unwrap();
    let clb = client(&c, b).await;
    for u in 0..2 * MIB / CHUNK {
        clb.write(u * CHUNK, block(u, 3)).await.unwrap();
    }
    let err = grow_volume(cp.as_ref(), a, 16 * MIB, WAIT)
        .await
        .unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, GrowError::Refused { .. }), "{msg}");
    assert!(
        msg.contains("cannot grow in place")
            && msg.contains(&b.to_string())
            && msg.contains("unchanged"),
        "{msg}"
    );
    let rec = c.volume_record(a).await.unwrap();
    assert_eq!(
        (rec.spec.size, rec.growing_to),
        (8 * MIB, None),
        "unchanged"
    );
    assert_eq!(extent_lengths(&c, a).await, vec![8 * MIB, 8 * MIB]);
    for u in 0..8 * MIB / CHUNK {
        let v = if u < 4 * MIB / CHUNK { 1 } else { 2 };
        assert_eq!(
            cl.read(u * CHUNK, CHUNK as usize).await.unwrap(),
            block(u, v)
        );
    }
    for u in 0..2 * MIB / CHUNK {
        assert_eq!(
            clb.read(u * CHUNK, CHUNK as usize).await.unwrap(),
            block(u, 3)
        );
    }
    // The statuses stop reporting the refusal once the growth is withdrawn.
    wait_until("refusals cleared", WAIT, || async {
        cp.member_statuses(a)
            .await
            .unwrap()
            .iter()
            .all(|s| s.grow_refused.is_none())
    })
    .await;
    // `b`, the last extent on each disk, can grow.
    assert_eq!(
        grow_volume(cp.as_ref(), b, 4 * MIB, WAIT).await.unwrap(),
        4 * MIB
    );
    assert_eq!(clb.refresh_size().await.unwrap(), 4 * MIB);
    assert!(clb
        .read(2 * MIB, 2 * MIB as usize)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    c.assert_mirrors_identical(b).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_dead_during_a_growth_grows_when_it_returns() {
    let (_dir, mut c) = cluster_with(2, LocalTimers::default()).await;
    let cp = c.control_plane();
    let a = c
        .create_volume("a", Layout::raid1(2).unwrap(), CHUNK, 2 * MIB)
        .await
        .unwrap();
    let cl = client(&c, a).await;
    for u in 0..2 * MIB / CHUNK {
        cl.write(u * CHUNK, block(u, 1)).await.unwrap();
    }
    let n1 = node_of(&c, a, 1).await;
    c.kill_agent(n1);
    wait_until("member 1 DEAD", WAIT, || async {
        c.topology(a)
            .await
            .is_some_and(|t| t.phase() == Phase::Degraded)
    })
    .await;
    // Degraded: the growth stays pending, the size does not change.
    let err = grow_volume(cp.as_ref(), a, 4 * MIB, Duration::from_secs(2))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, GrowError::Pending { why, .. } if why.contains("Degraded")),
        "{err}"
    );
    assert_eq!(c.volume_record(a).await.unwrap().spec.size, 2 * MIB);
    // Written while member 1 is dead: the rebuild brings it over.
    cl.write(0, block(0, 2)).await.unwrap();
    c.start_agent(n1).await.unwrap();
    // Resuming the pending growth: it completes once member 1 is back, rebuilt and grown.
    let t0 = std::time::Instant::now();
    assert_eq!(
        grow_volume(cp.as_ref(), a, 4 * MIB, WAIT).await.unwrap(),
        4 * MIB
    );
    eprintln!(
        "growth finished {:?} after the member's return",
        t0.elapsed()
    );
    assert_eq!(c.topology(a).await.unwrap().phase(), Phase::Normal);
    assert_eq!(extent_lengths(&c, a).await, vec![4 * MIB, 4 * MIB]);
    assert_eq!(cl.refresh_size().await.unwrap(), 4 * MIB);
    assert_eq!(cl.read(0, CHUNK as usize).await.unwrap(), block(0, 2));
    for u in 1..2 * MIB / CHUNK {
        assert_eq!(
            cl.read(u * CHUNK, CHUNK as usize).await.unwrap(),
            block(u, 1)
        );
    }
    assert!(cl
        .read(2 * MIB, 2 * MIB as usize)
        .await
        .unwrap()
        .iter()
        .all(|&x| x == 0));
    c.assert_mirrors_identical(a).await;
}
