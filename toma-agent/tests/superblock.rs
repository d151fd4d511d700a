//! Superblock and extent tests on real files in temp dirs.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use proptest::prelude::*;
use toma_agent::superblock::{self, SUPERBLOCK_COPY_SIZE};
use toma_agent::*;
use toma_core::{DiskId, Role, VolumeId};

const CLUSTER: ClusterId = ClusterId(0xc1);
const MIB: u64 = 1 << 20;

fn make_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn dev(path: &Path) -> Arc<dyn BlockDevice> {
    Arc::new(FileDevice::open(path).unwrap())
}

fn fresh(dir: &Path, size: u64) -> PathBuf {
    let p = make_file(dir, "disk", size);
    Disk::format(dev(&p), DiskId(7), CLUSTER, &Overwrite::OnlyIfBlank).unwrap();
    p
}

/// Overwrites 4 KiB at `offset` with garbage (outside any FileDevice, like bit rot).
fn smash(path: &Path, offset: u64) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path).unwrap();
    f.write_all_at(&[0x5a; 4096], offset).unwrap();
}

#[test]
fn a_disk_left_attached_by_another_boot_may_have_lost_writes() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 8 * MIB);
    let (vol, host_a, host_b) = (VolumeId(9), 0xa1, 0xb2);
    {
        let d = Disk::open_on(dev(&p), CLUSTER, host_a).unwrap();
        d.allocate_extent(vol, 0, MIB, 1).unwrap();
        d.update_extent(vol, 0, 1, superblock::MemberState::Member(Role::Rwl))
            .unwrap();
        assert!(
            !d.lost_writes(vol, 0),
            "a disk attached for the first time is trusted"
        );
    }
    // The agent restarts on the same boot (its process crashed): the disk kept power.
    let d = Disk::open_on(dev(&p), CLUSTER, host_a).unwrap();
    assert!(!d.lost_writes(vol, 0));
    drop(d);
    // Another boot finds it still attached: the host lost power, or the disk was pulled.
    let d = Disk::open_on(dev(&p), CLUSTER, host_b).unwrap();
    assert!(d.lost_writes(vol, 0));
    assert!(!d.lost_writes(vol, 1), "only members it holds");
    assert!(d.settle_lost_writes(vol, 0));
    assert!(!d.lost_writes(vol, 0));
    // A clean detach (orderly shutdown) makes the next boot trust it; no write lands after
    // it (the final flush is the last word), and a second detach changes nothing.
    d.write_member(vol, 0, 0, &[0x11; 4096]).unwrap();
    d.detach().unwrap();
    let e = d.write_member(vol, 0, 4096, &[0x22; 4096]).unwrap_err();
    assert!(e.to_string().contains("detached"), "{e}");
    d.detach().unwrap();
    drop(d);
    let d = Disk::open_on(dev(&p), CLUSTER, host_a).unwrap();
    assert!(!d.lost_writes(vol, 0));
    assert_eq!(
        d.extent(vol, 0).map(|e| e.length),
        Some(MIB),
        "nothing else changed"
    );
    let mut buf = vec![0u8; 8192];
    d.read_member(vol, 0, 0, &mut buf).unwrap();
    assert!(
        buf[..4096].iter().all(|&b| b == 0x11),
        "the write before the detach is there"
    );
    assert!(
        buf[4096..].iter().all(|&b| b == 0),
        "the refused write is not"
    );
}

#[test]
fn boot_ids_parse_strictly() {
    use toma_agent::disks::parse_boot_id;
    assert_eq!(
        parse_boot_id("0b3c8c1e-6c4a-4b8e-9a51-2f1d7c3e9a10\n"),
        Some(0x0b3c8c1e_6c4a_4b8e_9a51_2f1d7c3e9a10)
    );
    assert_eq!(parse_boot_id(""), None);
    assert_eq!(parse_boot_id("not-a-uuid"), None);
    assert_eq!(parse_boot_id("00000000-0000-0000-0000-000000000000"), None);
    assert!(
        toma_agent::disks::host_boot_id().is_some(),
        "Linux provides a boot id"
    );
}

#[test]
fn format_open_round_trip_bumps_boot_counter() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 8 * MIB);
    let d = Disk::open(dev(&p), CLUSTER).unwrap();
    assert_eq!(d.id(), DiskId(7));
    assert_eq!(d.cluster(), CLUSTER);
    let boot = d.boot_counter();
    drop(d);
    let d = Disk::open(dev(&p), CLUSTER).unwrap();
    assert_eq!(d.boot_counter(), boot + 1);
}

#[test]
fn format_refuses_a_non_blank_disk_without_force() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 8 * MIB);
    let before = std::fs::read(&p).unwrap();
    let err = Disk::format(dev(&p), DiskId(8), CLUSTER, &Overwrite::OnlyIfBlank).unwrap_err();
    assert!(matches!(err, SuperblockError::NotBlank { .. }), "{err}");
    let err = Disk::format(
        dev(&p),
        DiskId(8),
        CLUSTER,
        &Overwrite::Force {
            device: "/some/other/disk".into(),
        },
    )
    .unwrap_err();
    assert!(
        matches!(err, SuperblockError::ForceMismatch { .. }),
        "{err}"
    );
    assert_eq!(std::fs::read(&p).unwrap(), before);
    let force = Overwrite::Force {
        device: p.display().to_string(),
    };
    let d = Disk::format(dev(&p), DiskId(8), CLUSTER, &force).unwrap();
    assert_eq!(d.id(), DiskId(8));
}

#[test]
fn one_corrupt_copy_falls_back_to_the_other_and_is_repaired() {
    for copy in [0, SUPERBLOCK_COPY_SIZE as u64] {
        let dir = tempfile::tempdir().unwrap();
        let p = fresh(dir.path(), 8 * MIB);
        {
            let d = Disk::open(dev(&p), CLUSTER).unwrap();
            d.allocate_extent(VolumeId(1), 0, MIB, 3).unwrap();
        }
        smash(&p, copy);
        let dv = dev(&p);
        match superblock::inspect(dv.as_ref()).unwrap() {
            Inspection::Valid { stale: Some(_), .. } => {}
            other => panic!("expected one stale copy, got {other:?}"),
        }
        let d = Disk::open(dv, CLUSTER).unwrap();
        assert_eq!(d.extents().len(), 1, "copy at {copy} corrupt");
        drop(d);
        // The open rewrote both copies.
        match superblock::inspect(dev(&p).as_ref()).unwrap() {
            Inspection::Valid { stale: None, .. } => {}
            other => panic!("expected both copies repaired, got {other:?}"),
        }
    }
}

#[test]
fn both_copies_corrupt_is_refused_and_nothing_is_written() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 8 * MIB);
    smash(&p, 0);
    smash(&p, SUPERBLOCK_COPY_SIZE as u64);
    let before = std::fs::read(&p).unwrap();
    let err = Disk::open(dev(&p), CLUSTER).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SuperblockError::Corrupt { .. }), "{msg}");
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(msg.contains("--force-format"), "{msg}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn disk_of_another_cluster_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 8 * MIB);
    let before = std::fs::read(&p).unwrap();
    let err = Disk::open(dev(&p), ClusterId(0xbad)).unwrap_err();
    let msg = err.to_string();
    assert!(
        matches!(err, SuperblockError::ForeignCluster { .. }),
        "{msg}"
    );
    assert!(msg.contains("belongs to cluster"), "{msg}");
    assert_eq!(std::fs::read(&p).unwrap(), before);
}

#[test]
fn too_small_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let p = make_file(dir.path(), "small", MIN_DISK_SIZE - 4096);
    let err = Disk::format(dev(&p), DiskId(1), CLUSTER, &Overwrite::OnlyIfBlank).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, SuperblockError::TooSmall { .. }), "{msg}");
    assert!(msg.contains(&p.display().to_string()), "{msg}");
    assert!(matches!(
        Disk::open(dev(&p), CLUSTER),
        Err(SuperblockError::TooSmall { .. })
    ));
}

#[test]
fn extents_persist_across_reopen_and_update() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 16 * MIB);
    let (a, b);
    {
        let d = Disk::open(dev(&p), CLUSTER).unwrap();
        a = d.allocate_extent(VolumeId(1), 0, 3 * MIB, 1).unwrap();
        b = d.allocate_extent(VolumeId(2), 1, 1, 1).unwrap();
        assert_eq!(a.offset, MIB);
        assert_eq!(a.length, 3 * MIB);
        assert_eq!(b.offset, 4 * MIB);
        assert_eq!(b.length, MIB, "rounded up to 1 MiB");
        assert!(matches!(
            d.allocate_extent(VolumeId(1), 0, MIB, 1),
            Err(SuperblockError::AlreadyAllocated { .. })
        ));
        assert!(matches!(
            d.allocate_extent(VolumeId(3), 0, 100 * MIB, 1),
            Err(SuperblockError::NoSpace { .. })
        ));
        d.update_extent(VolumeId(1), 0, 5, MemberState::Member(Role::Rwl))
            .unwrap();
    }
    let d = Disk::open(dev(&p), CLUSTER).unwrap();
    let ext = d.extents();
    assert_eq!(ext.len(), 2);
    let a2 = d.extent(VolumeId(1), 0).unwrap();
    assert_eq!(a2.generation, 5);
    assert_eq!(a2.state, MemberState::Member(Role::Rwl));
    assert_eq!(d.extent(VolumeId(2), 1), Some(b));
    // Free the first; first fit reuses its hole.
    d.free_extent(VolumeId(1), 0).unwrap();
    let c = d.allocate_extent(VolumeId(4), 0, 2 * MIB, 1).unwrap();
    assert_eq!(c.offset, MIB);
    drop(d);
    let d = Disk::open(dev(&p), CLUSTER).unwrap();
    assert_eq!(d.extent(VolumeId(1), 0), None);
    assert_eq!(d.extent(VolumeId(4), 0), Some(c));
}

#[test]
fn member_io_stays_inside_its_extent() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 8 * MIB);
    let d = Disk::open(dev(&p), CLUSTER).unwrap();
    let a = d.allocate_extent(VolumeId(1), 0, MIB, 1).unwrap();
    let b = d.allocate_extent(VolumeId(2), 0, MIB, 1).unwrap();
    let mut buf = AlignedBuf::zeroed(8192);
    buf.fill(0x11);
    d.write_member(VolumeId(1), 0, MIB - 8192, &buf).unwrap();
    buf.fill(0x22);
    d.write_member(VolumeId(2), 0, 0, &buf).unwrap();
    d.flush().unwrap();
    let mut back = AlignedBuf::zeroed(8192);
    d.read_member(VolumeId(1), 0, MIB - 8192, &mut back)
        .unwrap();
    assert!(back.iter().all(|x| *x == 0x11));
    // The bytes landed at the extents' absolute offsets.
    let raw = std::fs::read(&p).unwrap();
    assert_eq!(raw[(a.offset + MIB - 1) as usize], 0x11);
    assert_eq!(raw[b.offset as usize], 0x22);
    let err = d
        .write_member(VolumeId(1), 0, MIB - 4096, &buf)
        .unwrap_err();
    assert!(
        matches!(err, SuperblockError::OutsideExtent { .. }),
        "{err}"
    );
    assert!(matches!(
        d.read_member(VolumeId(1), 0, u64::MAX - 4095, &mut back),
        Err(SuperblockError::OutsideExtent { .. })
    ));
    assert!(matches!(
        d.read_member(VolumeId(9), 0, 0, &mut back),
        Err(SuperblockError::NoSuchExtent { .. })
    ));
}

/// The async data path, through `io_uring` and through blocking threads: what one writes
/// the other (and the blocking calls) read back, at the extent's absolute offset; I/O outside
/// the extent is refused before it reaches the kernel; after a detach no write lands.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn member_io_through_the_ring_and_through_threads_agree() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 8 * MIB);
    let d = Arc::new(Disk::open(dev(&p), CLUSTER).unwrap());
    let a = d.allocate_extent(VolumeId(1), 0, MIB, 1).unwrap();
    let vol = VolumeId(1);
    assert!(d.uses_ring(), "io_uring is available on this machine");
    let block = |v: u8| bytes::Bytes::from(vec![v; 8192]);

    // Ring write, then a blocking read and a ring read.
    d.write_member_io(vol, 0, 4096, block(0x31)).await.unwrap();
    let mut back = AlignedBuf::zeroed(8192);
    d.read_member(vol, 0, 4096, &mut back).unwrap();
    assert!(
        back.iter().all(|x| *x == 0x31),
        "the ring's write, read by pread"
    );
    let got = d.read_member_io(vol, 0, 4096, 8192).await.unwrap();
    assert!(got.iter().all(|x| *x == 0x31), "read back through the ring");

    // Blocking threads from now on: the same calls, the same bytes.
    d.use_blocking_io();
    assert!(!d.uses_ring());
    d.write_member_io(vol, 0, MIB - 8192, block(0x42))
        .await
        .unwrap();
    let got = d.read_member_io(vol, 0, MIB - 8192, 8192).await.unwrap();
    assert!(
        got.iter().all(|x| *x == 0x42),
        "written and read on threads"
    );
    let got = d.read_member_io(vol, 0, 4096, 8192).await.unwrap();
    assert!(
        got.iter().all(|x| *x == 0x31),
        "the ring's write, read on threads"
    );
    d.flush().unwrap();
    let raw = std::fs::read(&p).unwrap();
    assert_eq!(raw[(a.offset + 4096) as usize], 0x31);
    assert_eq!(raw[(a.offset + MIB - 1) as usize], 0x42);

    // Outside the extent: refused by both paths, nothing written past it.
    let d2 = Arc::new(Disk::open(dev_again(&p, d), CLUSTER).unwrap());
    assert!(d2.uses_ring());
    for ring in [true, false] {
        if !ring {
            d2.use_blocking_io();
        }
        let e = d2
            .write_member_io(vol, 0, MIB - 4096, block(0x55))
            .await
            .unwrap_err();
        assert!(matches!(e, SuperblockError::OutsideExtent { .. }), "{e}");
        let e = d2.read_member_io(vol, 0, MIB, 4096).await.unwrap_err();
        assert!(matches!(e, SuperblockError::OutsideExtent { .. }), "{e}");
    }
    let raw = std::fs::read(&p).unwrap();
    assert_ne!(
        raw[(a.offset + MIB) as usize],
        0x55,
        "nothing past the extent"
    );

    // After a detach, ring writes are refused and change nothing.
    let d3 = Arc::new(Disk::open(dev_again(&p, d2), CLUSTER).unwrap());
    assert!(d3.uses_ring());
    d3.detach().unwrap();
    let e = d3
        .write_member_io(vol, 0, 0, block(0x66))
        .await
        .unwrap_err();
    assert!(matches!(e, SuperblockError::Detached { .. }), "{e}");
    let raw = std::fs::read(&p).unwrap();
    assert_ne!(raw[a.offset as usize], 0x66);
}

/// Opens `path` again once `previous` (the disk that holds its lock) is dropped.
fn dev_again(path: &Path, previous: Arc<Disk>) -> Arc<dyn BlockDevice> {
    drop(previous);
    dev(path)
}

#[test]
fn member_runtime_exists_only_for_held_extents() {
    let dir = tempfile::tempdir().unwrap();
    let p = fresh(dir.path(), 8 * MIB);
    let d = Disk::open(dev(&p), CLUSTER).unwrap();
    assert!(d.member(VolumeId(1), 0, 16, 2).is_none());
    d.allocate_extent(VolumeId(1), 0, MIB, 1).unwrap();
    let m = d.member(VolumeId(1), 0, 16, 2).unwrap();
    m.locks.lock(3, ClientId(9)).unwrap();
    let again = d.member(VolumeId(1), 0, 16, 2).unwrap();
    assert_eq!(again.locks.holder(3), Some(ClientId(9)));
    d.free_extent(VolumeId(1), 0).unwrap();
    assert!(d.member_if_present(VolumeId(1), 0).is_none());
}

#[test]
fn superblock_write_survives_power_loss_and_torn_writes() {
    // A flushed update survives a power loss that tears whatever was not flushed.
    for seed in 0..32 {
        let mem = MemDevice::new("mem0", 8 * MIB);
        let dv: Arc<dyn BlockDevice> = Arc::new(mem.clone());
        let d = Disk::format(dv.clone(), DiskId(1), CLUSTER, &Overwrite::OnlyIfBlank).unwrap();
        d.allocate_extent(VolumeId(1), 0, MIB, 1).unwrap();
        // An unrelated write is in flight when the power goes.
        mem.write_at(&[0u8; 4096], 4 * MIB).unwrap(); // unrelated unflushed write
        mem.power_loss(PowerLoss::Tear { seed });
        let d = Disk::open(dv.clone(), CLUSTER).unwrap();
        assert_eq!(d.extents().len(), 1);
    }
}

#[test]
fn torn_update_keeps_old_or_new_state() {
    for seed in 0..64 {
        let mem = MemDevice::new("mem0", 8 * MIB);
        let dv: Arc<dyn BlockDevice> = Arc::new(mem.clone());
        let d = Disk::format(dv.clone(), DiskId(1), CLUSTER, &Overwrite::OnlyIfBlank).unwrap();
        // Make the next update's flushes fail so its writes stay unflushed, then tear them.
        mem.set_faults(Faults {
            fail_flush: true,
            ..Faults::default()
        });
        let r = d.allocate_extent(VolumeId(1), 0, MIB, 1);
        assert!(r.is_err());
        mem.set_faults(Faults::default());
        mem.power_loss(PowerLoss::Tear { seed });
        let d = Disk::open(dv.clone(), CLUSTER).unwrap();
        assert!(d.extents().len() <= 1);
    }
}

fn arb_op() -> impl Strategy<Value = (bool, u8, u64)> {
    (any::<bool>(), 0u8..12, 1u64..(6 * MIB))
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(24))]

    /// Random allocations and frees: extents never overlap, stay inside the device and
    /// after the superblock area, and survive a reopen unchanged.
    #[test]
    fn allocations_never_overlap_and_persist(ops in proptest::collection::vec(arb_op(), 1..30)) {
        let dir = tempfile::tempdir().unwrap();
        let p = fresh(dir.path(), 32 * MIB);
        let d = Disk::open(dev(&p), CLUSTER).unwrap();
        for (alloc, vol, len) in ops {
            if alloc {
                let _ = d.allocate_extent(VolumeId(vol as u128), 0, len, 1);
            } else {
                let _ = d.free_extent(VolumeId(vol as u128), 0);
            }
            let ext = d.extents();
            for w in ext.windows(2) {
                prop_assert!(w[0].end() <= w[1].offset, "overlap {:?}", w);
            }
            for e in &ext {
                prop_assert!(e.offset >= SUPERBLOCK_AREA && e.end() <= 32 * MIB);
                prop_assert_eq!(e.offset % MIB, 0);
            }
        }
        let before = d.extents();
        drop(d);
        let d = Disk::open(dev(&p), CLUSTER).unwrap();
        prop_assert_eq!(d.extents(), before);
    }

    /// Decoding random bytes never panics.
    #[test]
    fn decode_random_bytes(bytes in proptest::collection::vec(any::<u8>(), 0..4096)) {
        let _ = Superblock::decode(&bytes);
    }

    /// Decoding a valid copy with a few bytes changed never panics, and any copy it accepts
    /// has sane extents.
    #[test]
    fn decode_mutated_copy(
        muts in proptest::collection::vec((0usize..8192, any::<u8>()), 1..8),
        fix_crc in any::<bool>(),
    ) {
        let mut sb = Superblock::new(DiskId(1), CLUSTER, 64 * MIB);
        for i in 0..20u64 {
            sb.extents.push(Extent {
                volume: VolumeId(i as u128),
                member: 0,
                offset: (1 + 2 * i) * MIB,
                length: MIB,
                generation: i,
                state: MemberState::Free,
            });
        }
        let mut bytes = sb.encode().to_vec();
        for (at, v) in muts {
            if let Some(b) = bytes.get_mut(at) {
                *b = v;
            }
        }
        if fix_crc {
            // Recompute the checksum so the structural checks are exercised too.
            let count = u32::from_le_bytes([bytes[72], bytes[73], bytes[74], bytes[75]]) as usize;
            let end = (128 + count.saturating_mul(64)).min(bytes.len());
            if end >= 128 {
                let crc = crc32c::crc32c_append(crc32c::crc32c(&bytes[..124]), &bytes[128..end]);
                bytes[124..128].copy_from_slice(&crc.to_le_bytes());
            }
        }
        if let Ok(d) = Superblock::decode(&bytes) {
            for e in &d.extents {
                prop_assert!(e.offset >= SUPERBLOCK_AREA);
                prop_assert!(e.length > 0);
                prop_assert!(e.end() <= d.device_size);
            }
        }
    }
}
