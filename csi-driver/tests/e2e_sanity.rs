//! csi-sanity (kubernetes-csi/csi-test v5, pinned in e2e/tools) against `toma-csi` backed by
//! real agents and a real kube-apiserver: mount access, then block access. Every spec must
//! pass; the ones csi-sanity skips are the capabilities Toma does not advertise (listed in
//! csi-driver/README.md).

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use csi_proto::v1;
use support::{precheck, wait_ready, Env};

fn run_sanity(env: &Env, access: &str, ctrl: &std::path::Path, node: &std::path::Path) -> String {
    let root = env.path().join("kubelet");
    let params = env.path().join("params.yaml");
    std::fs::write(&params, "raid: raid1\nmirrors: \"2\"\nchunkSize: 64Ki\n").expect("params");
    let out = Command::new(env.bin.join("csi-sanity"))
        .arg(format!("--csi.endpoint=unix://{}", node.display()))
        .arg(format!(
            "--csi.controllerendpoint=unix://{}",
            ctrl.display()
        ))
        .arg(format!(
            "--csi.stagingdir={}",
            root.join(format!("staging-{access}")).display()
        ))
        .arg(format!(
            "--csi.mountdir={}",
            root.join(format!("mount-{access}")).display()
        ))
        .arg(format!("--csi.testvolumesize={}", 64 << 20))
        .arg(format!("--csi.testvolumeexpandsize={}", 128 << 20))
        .arg(format!("--csi.testvolumeparameters={}", params.display()))
        .arg(format!("--csi.testvolumeaccesstype={access}"))
        .arg("--ginkgo.timeout=15m")
        .arg("--ginkgo.no-color")
        .arg("--ginkgo.v")
        .output()
        .expect("csi-sanity runs");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    std::fs::write(env.path().join(format!("sanity-{access}.log")), &text).expect("log");
    assert!(
        out.status.success(),
        "csi-sanity ({access}) failed:\n{text}\n--- controller log:\n{}\n--- node log:\n{}",
        env.log("controller"),
        env.log("node")
    );
    text
}

/// "Ran N of M Specs" and "P Passed | F Failed | X Pending | S Skipped".
fn summary(text: &str) -> (u32, u32, u32) {
    let line = text
        .lines()
        .find(|l| l.contains("Passed") && l.contains("Failed") && l.contains("Skipped"))
        .unwrap_or_default();
    let num = |word: &str| -> u32 {
        line.split('|')
            .find(|p| p.contains(word))
            .and_then(|p| p.split_whitespace().find_map(|w| w.parse().ok()))
            .unwrap_or(u32::MAX)
    };
    (num("Passed"), num("Failed"), num("Skipped"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn csi_sanity_mount_and_block() {
    let Some(bin) = precheck(&["csi-sanity"]) else {
        return;
    };
    let env = Env::start(bin, 3, 4 << 30, 20).await;
    let ctrl = env.path().join("csi/controller.sock");
    let node = env.path().join("csi/node.sock");
    let root = env.path().join("kubelet");
    std::fs::create_dir_all(&root).expect("root");
    env.spawn_csi("controller", &env.controller_args(&ctrl));
    env.spawn_csi("node", &env.node_args(&node, "node1", &root));
    wait_ready(&ctrl, "controller", || env.log("controller")).await;
    wait_ready(&node, "node plugin", || env.log("node")).await;

    for access in ["mount", "block"] {
        let t0 = std::time::Instant::now();
        let text = tokio::task::block_in_place(|| run_sanity(&env, access, &ctrl, &node));
        let (passed, failed, skipped) = summary(&text);
        eprintln!(
            "csi-sanity {access}: {passed} passed, {failed} failed, {skipped} skipped in {:?}",
            t0.elapsed()
        );
        assert_eq!(failed, 0, "csi-sanity {access}:\n{text}");
        // 36 of 103 specs apply to what Toma advertises (the rest are skipped: README).
        assert!(
            (30..u32::MAX).contains(&passed),
            "csi-sanity {access} ran too few specs:\n{text}"
        );
        // The full node lifecycle (stage, publish, stats, unpublish, unstage) is among them.
        assert!(
            text.contains("Node Service should work"),
            "csi-sanity {access}: the node lifecycle spec did not run:\n{text}"
        );
    }
    bad_input(&env, &ctrl, &node, &root).await;

    // Every volume csi-sanity made was deleted: no TomaVolume is left, no extent on a disk
    // of a running agent, no datapath process, mount or loop device.
    let (ok, out) = env.kubectl(&["get", "tomavolumes", "-o", "name"], None);
    assert!(ok && out.trim().is_empty(), "volumes left: {out}");
    support::eventually(
        "no datapath process left",
        Duration::from_secs(30),
        || async {
            support::procs_under(env.path())
                .iter()
                .all(|p| {
                    !std::fs::read(format!("/proc/{p}/cmdline"))
                        // `toma-csi datapath ...`, not a plugin's `--datapath-exe` flag.
                        .map(|c| c.split(|b| *b == 0).nth(1) == Some(b"datapath".as_slice()))
                        .unwrap_or(false)
                })
                .then_some(())
        },
    )
    .await;
    assert!(
        support::loops_under(env.path()).is_empty(),
        "loop devices left"
    );
}

/// Bad input gets the status the spec requires, with a message naming what was wrong, and
/// changes nothing; a node whose frontend cannot be created says what it tried.
async fn bad_input(env: &Env, ctrl: &Path, node: &Path, root: &Path) {
    use csi_proto::v1::controller_client::ControllerClient;
    use csi_proto::v1::node_client::NodeClient;
    use tonic::Code;
    let mut c = ControllerClient::new(support::channel(ctrl).await);
    let mut n = NodeClient::new(support::channel(node).await);
    let cap = support::mount_cap("ext4");
    let create = |name: &str, params: &[(&str, &str)], bytes: i64| v1::CreateVolumeRequest {
        name: name.into(),
        capacity_range: Some(v1::CapacityRange {
            required_bytes: bytes,
            limit_bytes: 0,
        }),
        volume_capabilities: vec![cap.clone()],
        parameters: params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        ..Default::default()
    };
    for (params, code, needle) in [
        (vec![("raid", "raid5")], Code::InvalidArgument, "raid"),
        (
            vec![("chunkSize", "3000")],
            Code::InvalidArgument,
            "chunkSize",
        ),
        (
            vec![("raid", "raid6"), ("dataMembers", "1")],
            Code::InvalidArgument,
            "dataMembers",
        ),
        (
            vec![("mirrors", "3"), ("colour", "red")],
            Code::InvalidArgument,
            "colour",
        ),
        // Three nodes (failure domains) cannot hold RAID6 4+2 (six members) nor 2+2.
        (
            vec![("raid", "raid6")],
            Code::ResourceExhausted,
            "dataMembers = 4: raid6-4+2 needs 6 members",
        ),
        (
            vec![("raid", "raid6"), ("dataMembers", "2")],
            Code::ResourceExhausted,
            "dataMembers = 2",
        ),
    ] {
        let e = c
            .create_volume(create("bad-params", &params, 64 << 20))
            .await
            .expect_err("bad parameters refused");
        assert_eq!(e.code(), code, "{params:?}: {e:?}");
        assert!(e.message().contains(needle), "{params:?}: {}", e.message());
        if code == Code::ResourceExhausted {
            assert!(
                e.message().contains("only 3 nodes have a healthy disk"),
                "{params:?}: the node count: {}",
                e.message()
            );
        }
    }
    let e = c
        .create_volume(create("too-big", &[], 1 << 40))
        .await
        .expect_err("no capacity");
    assert_eq!(e.code(), Code::ResourceExhausted, "{e:?}");
    let (ok, out) = env.kubectl(&["get", "tomavolumes", "-o", "name"], None);
    assert!(
        ok && out.trim().is_empty(),
        "a refused CreateVolume left {out}"
    );

    let vol = c
        .create_volume(create("bad-input-ok", &[], 16 << 20))
        .await
        .expect("CreateVolume")
        .into_inner()
        .volume
        .expect("volume");
    let stage = |path: &Path| v1::NodeStageVolumeRequest {
        volume_id: vol.volume_id.clone(),
        staging_target_path: path.display().to_string(),
        volume_capability: Some(cap.clone()),
        ..Default::default()
    };
    for bad in [
        PathBuf::from("/etc/toma-outside"),
        root.join("staging/../../escape"),
        PathBuf::from("relative/path"),
    ] {
        let e = n.node_stage_volume(stage(&bad)).await.expect_err("refused");
        assert_eq!(e.code(), Code::InvalidArgument, "{}: {e:?}", bad.display());
        assert!(
            e.message().contains("staging_target_path"),
            "{}",
            e.message()
        );
    }
    let e = n
        .node_publish_volume(v1::NodePublishVolumeRequest {
            volume_id: vol.volume_id.clone(),
            staging_target_path: root.join("s").display().to_string(),
            target_path: "/tmp/../etc/x".into(),
            volume_capability: Some(cap.clone()),
            ..Default::default()
        })
        .await
        .expect_err("refused");
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    assert!(e.message().contains("target_path"), "{}", e.message());

    // A node plugin whose datapath cannot start: every frontend tried is named, with why.
    let sock = env.path().join("csi/node-broken.sock");
    let mut args = env.node_args(&sock, "broken-node", root);
    args.push("--datapath-exe".into());
    args.push("/bin/false".into());
    env.spawn_csi("node-broken", &args);
    wait_ready(&sock, "node plugin (broken datapath)", || {
        env.log("node-broken")
    })
    .await;
    let mut nb = NodeClient::new(support::channel(&sock).await);
    let e = nb
        .node_stage_volume(stage(&root.join("staging-broken")))
        .await
        .expect_err("no frontend");
    assert_eq!(e.code(), Code::FailedPrecondition, "{e:?}");
    for needle in ["ublk:", "nbd:", "fuse+loop:", "exited"] {
        assert!(
            e.message().contains(needle),
            "{needle:?} not in: {}",
            e.message()
        );
    }
    eprintln!("NodeStage without a frontend: {}", e.message());
    assert!(!toma_csi::mounts::is_mounted(&root.join("staging-broken")));
    assert!(
        !env.path()
            .join("state-broken-node/volumes")
            .join(&vol.volume_id)
            .join("state.json")
            .exists(),
        "a failed NodeStage left state behind"
    );
    c.delete_volume(v1::DeleteVolumeRequest {
        volume_id: vol.volume_id.clone(),
        ..Default::default()
    })
    .await
    .expect("DeleteVolume");
}
