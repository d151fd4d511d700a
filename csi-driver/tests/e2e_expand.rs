//! Volume expansion through the node path, as kubelet would drive it (real agents, real
//! kube-apiserver, `toma-csi` controller and node plugins as processes):
//!
//! * a mounted xfs volume with a file is grown by ControllerExpandVolume, then
//!   NodeExpandVolume grows the FUSE export, the loop device and the file system online; the
//!   file is intact, the file system is bigger and the new space takes a file that would
//!   not have fitted before; both members' extents grew in the disks' superblocks;
//! * an ext4 volume grown while unstaged has its file system grown by the next NodeStage
//!   (offline: an online ext4 resize needs CAP_SYS_RESOURCE, which this test machine's root
//!   lacks), its file intact;
//! * a raw block volume: bytes written before read back, the new range reads zero, through
//!   the grown loop device (O_DIRECT);
//! * bad requests (a smaller limit, more than any disk holds, unknown volume, missing
//!   fields) get the status the spec requires and change nothing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use csi_proto::v1;
use csi_proto::v1::controller_client::ControllerClient;
use csi_proto::v1::node_client::NodeClient;
use support::{channel, extents_on, mount_cap, precheck, wait_ready, Env};
use toma_core::VolumeId;
use tonic::Code;

const MIB: u64 = 1 << 20;

fn block_cap() -> v1::VolumeCapability {
    use v1::volume_capability::access_mode::Mode;
    use v1::volume_capability::{AccessMode, AccessType, BlockVolume};
    v1::VolumeCapability {
        access_mode: Some(AccessMode {
            mode: Mode::SingleNodeWriter as i32,
        }),
        access_type: Some(AccessType::Block(BlockVolume {})),
    }
}

/// Deterministic bytes for file/range `seed`.
fn content(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

fn extent_lengths(env: &Env, id: VolumeId) -> Vec<u64> {
    let disks: Vec<PathBuf> = env
        .nodes
        .lock()
        .iter()
        .flat_map(|n| n.disk_paths.clone())
        .collect();
    let mut v: Vec<u64> = disks
        .iter()
        .flat_map(extents_on)
        .filter(|e| e.volume == id)
        .map(|e| e.length)
        .collect();
    v.sort();
    v
}

fn volume_size(env: &Env, name: &str) -> String {
    let (ok, out) = env.kubectl(
        &[
            "get",
            &format!("tomavolume/{name}"),
            "-o",
            "jsonpath={.spec.size}",
        ],
        None,
    );
    assert!(ok, "get tomavolume/{name}: {out}");
    out.trim().to_string()
}

/// `dd` with O_DIRECT: reads `count` MiB at MiB `skip` of `dev`.
fn read_direct(dev: &Path, skip: u64, count: u64) -> Vec<u8> {
    let out = Command::new("dd")
        .arg(format!("if={}", dev.display()))
        .args(["bs=1M", "iflag=direct", "status=none"])
        .arg(format!("skip={skip}"))
        .arg(format!("count={count}"))
        .output()
        .expect("dd runs");
    assert!(
        out.status.success(),
        "dd read: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// `dd` with O_DIRECT and O_SYNC: writes `data` (whole MiBs) at MiB `seek` of `dev`.
fn write_direct(dev: &Path, seek: u64, data: &[u8], tmp: &Path) {
    std::fs::write(tmp, data).expect("pattern file");
    let out = Command::new("dd")
        .arg(format!("if={}", tmp.display()))
        .arg(format!("of={}", dev.display()))
        .args(["bs=1M", "oflag=direct,sync", "conv=notrunc", "status=none"])
        .arg(format!("seek={seek}"))
        .output()
        .expect("dd runs");
    assert!(
        out.status.success(),
        "dd write: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn blockdev_size(dev: &Path) -> u64 {
    let out = Command::new("blockdev")
        .arg("--getsize64")
        .arg(dev)
        .output()
        .expect("blockdev runs");
    String::from_utf8_lossy(&out.stdout)
        .trim()
        .parse()
        .unwrap_or(0)
}

async fn create(
    ctrl: &mut ControllerClient<tonic::transport::Channel>,
    name: &str,
    size: u64,
    cap: v1::VolumeCapability,
) -> (String, VolumeId) {
    let r = ctrl
        .create_volume(v1::CreateVolumeRequest {
            name: name.into(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: size as i64,
                limit_bytes: 0,
            }),
            volume_capabilities: vec![cap],
            parameters: [
                ("raid".to_string(), "raid1".to_string()),
                ("mirrors".to_string(), "2".to_string()),
            ]
            .into(),
            ..Default::default()
        })
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let id = toma_csi::controller::parse_volume_id(&r.volume_id).expect("uuid");
    (r.volume_id, id)
}

async fn expand(
    ctrl: &mut ControllerClient<tonic::transport::Channel>,
    vid: &str,
    required: u64,
    limit: u64,
    cap: v1::VolumeCapability,
) -> Result<v1::ControllerExpandVolumeResponse, tonic::Status> {
    ctrl.controller_expand_volume(v1::ControllerExpandVolumeRequest {
        volume_id: vid.into(),
        capacity_range: Some(v1::CapacityRange {
            required_bytes: required as i64,
            limit_bytes: limit as i64,
        }),
        volume_capability: Some(cap),
        ..Default::default()
    })
    .await
    .map(|r| r.into_inner())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn expansion_through_the_node_path_keeps_data_and_zeroes_the_new_range() {
    let Some(bin) = precheck(&[]) else { return };
    let env = Env::start(bin, 3, 2 << 30, 80).await;
    let ctrl_sock = env.path().join("csi/controller.sock");
    let node_sock = env.path().join("csi/node.sock");
    let root = env.path().join("kubelet");
    std::fs::create_dir_all(&root).expect("root");
    env.spawn_csi("controller", &env.controller_args(&ctrl_sock));
    env.spawn_csi("node", &env.node_args(&node_sock, "client-node", &root));
    wait_ready(&ctrl_sock, "controller", || env.log("controller")).await;
    wait_ready(&node_sock, "node plugin", || env.log("node")).await;
    let mut ctrl = ControllerClient::new(channel(&ctrl_sock).await);
    let mut node = NodeClient::new(channel(&node_sock).await);

    // Capabilities: controller and node EXPAND_VOLUME, plugin VolumeExpansion ONLINE.
    let caps = ctrl
        .controller_get_capabilities(v1::ControllerGetCapabilitiesRequest {})
        .await
        .expect("caps")
        .into_inner();
    let want = v1::controller_service_capability::rpc::Type::ExpandVolume as i32;
    assert!(
        caps.capabilities.iter().any(|c| matches!(
            &c.r#type,
            Some(v1::controller_service_capability::Type::Rpc(r)) if r.r#type == want
        )),
        "{caps:?}"
    );
    let mut ident = v1::identity_client::IdentityClient::new(channel(&ctrl_sock).await);
    let pcaps = ident
        .get_plugin_capabilities(v1::GetPluginCapabilitiesRequest {})
        .await
        .expect("plugin caps")
        .into_inner();
    assert!(
        format!("{pcaps:?}").contains("VolumeExpansion"),
        "{pcaps:?}"
    );

    // --- A mounted xfs volume with a file, grown online.
    let (vid, id) = create(&mut ctrl, "pvc-expand-xfs", 320 * MIB, mount_cap("xfs")).await;
    let staging = root.join("staging/m");
    let target = root.join("pods/p1/m");
    node.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: vid.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap("xfs")),
        ..Default::default()
    })
    .await
    .expect("NodeStageVolume");
    node.node_publish_volume(v1::NodePublishVolumeRequest {
        volume_id: vid.clone(),
        staging_target_path: staging.display().to_string(),
        target_path: target.display().to_string(),
        volume_capability: Some(mount_cap("xfs")),
        ..Default::default()
    })
    .await
    .expect("NodePublishVolume");
    let before = content(1, 8 << 20);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(target.join("before")).expect("create");
        f.write_all(&before).expect("write");
        f.sync_all().expect("fsync");
    }
    let fs_total = |p: &Path| {
        let s = rustix::fs::statvfs(p).expect("statvfs");
        s.f_blocks * s.f_frsize
    };
    let total0 = fs_total(&target);
    let avail0 = {
        let s = rustix::fs::statvfs(&target).expect("statvfs");
        s.f_bavail * s.f_frsize
    };
    assert_eq!(extent_lengths(&env, id), vec![320 * MIB, 320 * MIB]);

    // Bad requests change nothing.
    let e = expand(&mut ctrl, &vid, 0, 32 * MIB, mount_cap("xfs"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(
        e.message().contains("never shrink") && e.message().contains(&(320 * MIB).to_string()),
        "{e:?}"
    );
    let e = expand(&mut ctrl, &vid, 8 << 30, 0, mount_cap("xfs"))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::OutOfRange, "{e:?}");
    assert!(e.message().contains("cannot grow"), "{e:?}");
    let e = expand(
        &mut ctrl,
        "0b4f1a52-1d5c-4f4e-9a55-7d1c2b3a4e5f",
        128 * MIB,
        0,
        mount_cap("xfs"),
    )
    .await
    .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let e = ctrl
        .controller_expand_volume(v1::ControllerExpandVolumeRequest {
            volume_id: vid.clone(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("capacity_range"), "{e:?}");
    assert_eq!(
        volume_size(&env, &vid_name(&env, id)),
        (320 * MIB).to_string()
    );
    assert_eq!(
        extent_lengths(&env, id),
        vec![320 * MIB, 320 * MIB],
        "nothing grew"
    );
    // NodeExpandVolume before the controller grew it: refused.
    let e = node
        .node_expand_volume(v1::NodeExpandVolumeRequest {
            volume_id: vid.clone(),
            volume_path: target.display().to_string(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: (512 * MIB) as i64,
                limit_bytes: 0,
            }),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");

    let t0 = Instant::now();
    let r = expand(&mut ctrl, &vid, 512 * MIB, 0, mount_cap("xfs"))
        .await
        .expect("ControllerExpandVolume");
    eprintln!(
        "ControllerExpandVolume 320 -> 512 MiB in {:?}",
        t0.elapsed()
    );
    assert_eq!(r.capacity_bytes, (512 * MIB) as i64);
    assert!(r.node_expansion_required);
    assert_eq!(extent_lengths(&env, id), vec![512 * MIB, 512 * MIB]);
    // Idempotent.
    let r = expand(&mut ctrl, &vid, 512 * MIB, 0, mount_cap("xfs"))
        .await
        .expect("again");
    assert_eq!(r.capacity_bytes, (512 * MIB) as i64);
    assert_eq!(
        fs_total(&target),
        total0,
        "the file system grows only on the node"
    );
    let t0 = Instant::now();
    let r = node
        .node_expand_volume(v1::NodeExpandVolumeRequest {
            volume_id: vid.clone(),
            volume_path: target.display().to_string(),
            staging_target_path: staging.display().to_string(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: (512 * MIB) as i64,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap("xfs")),
            ..Default::default()
        })
        .await
        .expect("NodeExpandVolume")
        .into_inner();
    eprintln!("NodeExpandVolume in {:?}", t0.elapsed());
    assert_eq!(r.capacity_bytes, (512 * MIB) as i64);
    let total1 = fs_total(&target);
    eprintln!("file system: {total0} -> {total1} bytes");
    assert!(total1 > total0 + 180 * MIB, "{total0} -> {total1}");
    assert_eq!(std::fs::read(target.join("before")).expect("read"), before);
    // Space that was not there before can be allocated, and written.
    let more = avail0 + 64 * MIB;
    let out = Command::new("fallocate")
        .arg("-l")
        .arg(more.to_string())
        .arg(target.join("big"))
        .output()
        .expect("fallocate runs");
    assert!(
        out.status.success(),
        "fallocate {more} bytes (free before: {avail0}): {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let tail = content(2, 4 << 20);
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .open(target.join("big"))
            .expect("open");
        f.seek(SeekFrom::Start(more - (4 << 20))).expect("seek");
        f.write_all(&tail).expect("write the tail");
        f.sync_all().expect("fsync");
    }
    // Unmount and mount again (restage): both files intact.
    node.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: vid.clone(),
        target_path: target.display().to_string(),
    })
    .await
    .expect("unpublish");
    node.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vid.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .expect("unstage");
    node.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: vid.clone(),
        staging_target_path: staging.display().to_string(),
        volume_capability: Some(mount_cap("xfs")),
        ..Default::default()
    })
    .await
    .expect("restage");
    assert_eq!(fs_total(&staging), total1);
    assert_eq!(std::fs::read(staging.join("before")).expect("read"), before);
    {
        use std::io::{Read, Seek, SeekFrom};
        let mut f = std::fs::File::open(staging.join("big")).expect("open");
        assert_eq!(f.metadata().expect("meta").len(), more);
        f.seek(SeekFrom::Start(more - (4 << 20))).expect("seek");
        let mut got = vec![0u8; 4 << 20];
        f.read_exact(&mut got).expect("read the tail");
        assert!(got == tail, "the tail of the big file differs");
    }
    node.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: vid.clone(),
        staging_target_path: staging.display().to_string(),
    })
    .await
    .expect("unstage");

    // --- An ext4 volume grown while not staged: the next stage grows the file system before
    // mounting it (offline: no CAP_SYS_RESOURCE needed), and NodeExpandVolume has nothing
    // left to do.
    let (evid, eid) = create(&mut ctrl, "pvc-expand-ext4", 64 * MIB, mount_cap("ext4")).await;
    let estaging = root.join("staging/e");
    let stage_ext4 = || v1::NodeStageVolumeRequest {
        volume_id: evid.clone(),
        staging_target_path: estaging.display().to_string(),
        volume_capability: Some(mount_cap("ext4")),
        ..Default::default()
    };
    let unstage_ext4 = || v1::NodeUnstageVolumeRequest {
        volume_id: evid.clone(),
        staging_target_path: estaging.display().to_string(),
    };
    node.node_stage_volume(stage_ext4())
        .await
        .expect("stage ext4");
    let efile = content(4, 4 << 20);
    {
        use std::io::Write;
        let mut f = std::fs::File::create(estaging.join("before")).expect("create");
        f.write_all(&efile).expect("write");
        f.sync_all().expect("fsync");
    }
    let etotal0 = fs_total(&estaging);
    node.node_unstage_volume(unstage_ext4())
        .await
        .expect("unstage ext4");
    let r = expand(&mut ctrl, &evid, 160 * MIB, 0, mount_cap("ext4"))
        .await
        .expect("ControllerExpandVolume ext4");
    assert_eq!(r.capacity_bytes, (160 * MIB) as i64);
    assert_eq!(extent_lengths(&env, eid), vec![160 * MIB, 160 * MIB]);
    node.node_stage_volume(stage_ext4())
        .await
        .expect("restage ext4");
    let etotal1 = fs_total(&estaging);
    eprintln!("ext4 grown at stage: {etotal0} -> {etotal1} bytes");
    assert!(etotal1 > etotal0 + 80 * MIB, "{etotal0} -> {etotal1}");
    assert_eq!(std::fs::read(estaging.join("before")).expect("read"), efile);
    let r = node
        .node_expand_volume(v1::NodeExpandVolumeRequest {
            volume_id: evid.clone(),
            volume_path: estaging.display().to_string(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: (160 * MIB) as i64,
                limit_bytes: 0,
            }),
            volume_capability: Some(mount_cap("ext4")),
            ..Default::default()
        })
        .await
        .expect("NodeExpandVolume ext4 (nothing left to do)")
        .into_inner();
    assert_eq!(r.capacity_bytes, (160 * MIB) as i64);
    assert_eq!(fs_total(&estaging), etotal1);
    node.node_unstage_volume(unstage_ext4())
        .await
        .expect("unstage ext4");

    // --- A raw block volume.
    let (bvid, bid) = create(&mut ctrl, "pvc-expand-block", 32 * MIB, block_cap()).await;
    let bstaging = root.join("staging/b");
    let btarget = root.join("pods/p2/dev");
    node.node_stage_volume(v1::NodeStageVolumeRequest {
        volume_id: bvid.clone(),
        staging_target_path: bstaging.display().to_string(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .expect("NodeStageVolume block");
    node.node_publish_volume(v1::NodePublishVolumeRequest {
        volume_id: bvid.clone(),
        staging_target_path: bstaging.display().to_string(),
        target_path: btarget.display().to_string(),
        volume_capability: Some(block_cap()),
        ..Default::default()
    })
    .await
    .expect("NodePublishVolume block");
    let old = content(3, 32 << 20);
    write_direct(&btarget, 0, &old, &env.path().join("pattern"));
    assert_eq!(blockdev_size(&btarget), 32 * MIB);
    let r = expand(&mut ctrl, &bvid, 96 * MIB, 0, block_cap())
        .await
        .expect("ControllerExpandVolume block");
    assert_eq!(r.capacity_bytes, (96 * MIB) as i64);
    assert_eq!(extent_lengths(&env, bid), vec![96 * MIB, 96 * MIB]);
    let r = node
        .node_expand_volume(v1::NodeExpandVolumeRequest {
            volume_id: bvid.clone(),
            volume_path: btarget.display().to_string(),
            capacity_range: Some(v1::CapacityRange {
                required_bytes: (96 * MIB) as i64,
                limit_bytes: 0,
            }),
            volume_capability: Some(block_cap()),
            ..Default::default()
        })
        .await
        .expect("NodeExpandVolume block")
        .into_inner();
    assert_eq!(r.capacity_bytes, (96 * MIB) as i64);
    assert_eq!(
        blockdev_size(&btarget),
        96 * MIB,
        "the published device grew"
    );
    assert!(
        read_direct(&btarget, 0, 32) == old,
        "data below the old size changed"
    );
    let new = read_direct(&btarget, 32, 64);
    assert_eq!(new.len() as u64, 64 * MIB);
    assert!(new.iter().all(|&x| x == 0), "the new range is not zero");
    node.node_unpublish_volume(v1::NodeUnpublishVolumeRequest {
        volume_id: bvid.clone(),
        target_path: btarget.display().to_string(),
    })
    .await
    .expect("unpublish block");
    node.node_unstage_volume(v1::NodeUnstageVolumeRequest {
        volume_id: bvid.clone(),
        staging_target_path: bstaging.display().to_string(),
    })
    .await
    .expect("unstage block");
    for v in [&vid, &evid, &bvid] {
        ctrl.delete_volume(v1::DeleteVolumeRequest {
            volume_id: v.clone(),
            ..Default::default()
        })
        .await
        .expect("DeleteVolume");
    }
    support::eventually("the extents freed", Duration::from_secs(60), || async {
        [id, eid, bid]
            .iter()
            .all(|v| extent_lengths(&env, *v).is_empty())
            .then_some(())
    })
    .await;
}

/// The TomaVolume name of volume `id` (the CSI name mapped to a Kubernetes name).
fn vid_name(env: &Env, id: VolumeId) -> String {
    let (ok, out) = env.kubectl(
        &[
            "get",
            "tomavolumes",
            "-o",
            &format!("jsonpath={{.items[?(@.spec.volumeId==\"{id}\")].metadata.name}}"),
        ],
        None,
    );
    assert!(ok, "{out}");
    out.trim().to_string()
}
