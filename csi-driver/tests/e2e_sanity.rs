//! csi-sanity (kubernetes-csi/csi-test v5, pinned in e2e/tools) against `toma-csi` backed by
//! real agents and a real kube-apiserver: mount access, then block access. Every spec must
//! pass; the ones csi-sanity skips are the capabilities Toma does not advertise (listed in
//! csi-driver/README.md).

mod support;

use std::process::Command;
use std::time::Duration;

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
                        .map(|c| String::from_utf8_lossy(&c).contains("datapath"))
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
