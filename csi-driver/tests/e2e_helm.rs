//! `helm install` of charts/toma into the harness apiserver, then the binaries run with the
//! chart's ServiceAccount tokens (not as cluster-admin): the operator's leader (in this
//! process) as `toma-operator`, the agents (in this process) as `toma-agent`, `toma-csi
//! --mode controller` and the real external-provisioner (processes) as
//! `toma-csi-controller`. A PVC of StorageClass `toma-raid1` ends Bound to a PV whose
//! TomaVolume and TomaTopology exist; patching the PVC to a bigger size makes the real
//! external-resizer call ControllerExpandVolume: the TomaVolume and the PV grow, both extents
//! grow in the superblocks, data written before reads back and the new range reads zero; a
//! member's agent killed makes the leader write a new topology; deleting the PVC frees the
//! extents (read from the disks' superblocks). The chart's RBAC is listed and must be exactly
//! what the binaries use.

mod support;

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::time::Duration;

use std::sync::Arc;

use support::{client_for, eventually, extents_on, precheck, wait_ready, Env, NAMESPACE};
use toma_client::{ClientConfig, VolumeClient};
use toma_core::{Phase, VolumeId};
use toma_wire::transport::TcpTransport;

/// The rules each chart role must grant, as `group/resource:verb` (sorted).
fn expected_rules() -> Vec<(&'static str, Vec<&'static str>)> {
    let crd_read = |v: &mut Vec<&'static str>| {
        for r in ["tomanodes", "tomadisks", "tomavolumes", "tomatopologies"] {
            for verb in ["get", "list", "watch"] {
                v.push(Box::leak(format!("toma.io/{r}:{verb}").into_boxed_str()));
            }
        }
    };
    let mut operator = vec![
        "toma.io/tomatopologies:update",
        "toma.io/tomatopologies/status:patch",
        "events.k8s.io/events:create",
        "events.k8s.io/events:patch",
    ];
    crd_read(&mut operator);
    let mut agent = vec![
        "toma.io/tomanodes:create",
        "toma.io/tomanodes:patch",
        "toma.io/tomadisks:create",
        "toma.io/tomadisks:patch",
        "toma.io/tomanodes/status:patch",
        "toma.io/tomadisks/status:patch",
        "toma.io/tomatopologies/status:patch",
    ];
    crd_read(&mut agent);
    let mut controller = vec![
        "toma.io/tomavolumes:create",
        "toma.io/tomavolumes:delete",
        // Expansion: the target and then the committed size.
        "toma.io/tomavolumes:patch",
        // external-resizer
        "/persistentvolumeclaims/status:patch",
        "toma.io/tomatopologies:create",
        "toma.io/tomatopologies:delete",
    ];
    for verb in ["get", "list", "watch", "create", "patch", "delete"] {
        controller.push(Box::leak(
            format!("/persistentvolumes:{verb}").into_boxed_str(),
        ));
    }
    for verb in ["get", "list", "watch", "update"] {
        controller.push(Box::leak(
            format!("/persistentvolumeclaims:{verb}").into_boxed_str(),
        ));
    }
    for r in ["storageclasses", "csinodes", "volumeattachments"] {
        for verb in ["get", "list", "watch"] {
            controller.push(Box::leak(
                format!("storage.k8s.io/{r}:{verb}").into_boxed_str(),
            ));
        }
    }
    for verb in ["get", "list", "watch"] {
        controller.push(Box::leak(format!("/nodes:{verb}").into_boxed_str()));
    }
    for verb in ["list", "watch", "create", "update", "patch"] {
        controller.push(Box::leak(format!("/events:{verb}").into_boxed_str()));
    }
    crd_read(&mut controller);
    let mut node = vec![
        "toma.io/tomavolumes:patch",
        "toma.io/tomatopologies/status:patch",
    ];
    crd_read(&mut node);
    let mut ctrl_ns = vec!["/secrets:get", "/secrets:create", "/secrets:delete"];
    for verb in [
        "get", "list", "watch", "create", "update", "patch", "delete",
    ] {
        ctrl_ns.push(Box::leak(
            format!("coordination.k8s.io/leases:{verb}").into_boxed_str(),
        ));
    }
    vec![
        ("clusterrole/toma-operator", operator),
        ("clusterrole/toma-agent", agent),
        ("clusterrole/toma-csi-controller", controller),
        ("clusterrole/toma-csi-node", node),
        (
            "role/toma-operator",
            vec![
                "coordination.k8s.io/leases:get",
                "coordination.k8s.io/leases:create",
                "coordination.k8s.io/leases:update",
                "coordination.k8s.io/leases:patch",
                "/secrets:get",
            ],
        ),
        ("role/toma-agent", vec!["/secrets:get"]),
        ("role/toma-csi-controller", ctrl_ns),
        ("role/toma-csi-node", vec!["/secrets:get"]),
    ]
}

/// The rules of a Role/ClusterRole as `group/resource:verb`.
fn granted(env: &Env, what: &str) -> BTreeSet<String> {
    let (ok, out) = env.kubectl(&["-n", NAMESPACE, "get", what, "-o", "json"], None);
    assert!(ok, "get {what}: {out}");
    let v: serde_json::Value = serde_json::from_str(&out).expect("json");
    let mut set = BTreeSet::new();
    for rule in v["rules"].as_array().cloned().unwrap_or_default() {
        let list = |k: &str| -> Vec<String> {
            rule[k]
                .as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(|x| x.as_str().map(String::from))
                        .collect()
                })
                .unwrap_or_default()
        };
        for g in list("apiGroups") {
            for r in list("resources") {
                for verb in list("verbs") {
                    set.insert(format!("{g}/{r}:{verb}"));
                }
            }
        }
    }
    set
}

/// A kubeconfig for ServiceAccount `sa` of the release namespace (a TokenRequest token).
fn sa_kubeconfig(env: &Env, sa: &str) -> PathBuf {
    let (ok, token) = env.kubectl(
        &["-n", NAMESPACE, "create", "token", sa, "--duration=1h"],
        None,
    );
    assert!(ok, "create token {sa}: {token}");
    let (ok, server) = env.kubectl(
        &[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.server}",
        ],
        None,
    );
    assert!(ok, "{server}");
    let (ok, ca) = env.kubectl(
        &[
            "config",
            "view",
            "--raw",
            "--minify",
            "-o",
            "jsonpath={.clusters[0].cluster.certificate-authority-data}",
        ],
        None,
    );
    assert!(ok, "{ca}");
    let text = format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster:\n    server: {}\n    \
         certificate-authority-data: {}\nusers:\n- name: {sa}\n  user:\n    token: {}\n\
         contexts:\n- name: x\n  context: {{cluster: c, user: {sa}}}\ncurrent-context: x\n",
        server.trim(),
        ca.trim(),
        token.trim()
    );
    let p = env.path().join(format!("kubeconfig-{sa}"));
    std::fs::write(&p, text).expect("kubeconfig");
    p
}

fn jsonpath(env: &Env, args: &[&str]) -> String {
    let (ok, out) = env.kubectl(args, None);
    if ok {
        out.trim().to_string()
    } else {
        String::new()
    }
}

/// Polls `kubectl ARGS` until it prints `want`; panics with `why(last output)` after `limit`.
async fn wait_jsonpath(
    env: &Env,
    args: &[&str],
    want: &str,
    limit: Duration,
    why: impl Fn(&str) -> String,
) {
    let deadline = std::time::Instant::now() + limit;
    loop {
        let got = jsonpath(env, args);
        if got == want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "after {limit:?}: {}",
            why(&got)
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn helm_install_then_pvc_bound_and_freed_with_chart_rbac() {
    let Some(bin) = precheck(&["helm", "csi-provisioner", "csi-resizer"]) else {
        return;
    };
    let mut env = Env::control_plane(bin).await;
    let chart = support::repo().join("charts/toma");

    // The chart's CRDs are the generated ones.
    for f in std::fs::read_dir(support::repo().join("crds")).expect("crds") {
        let f = f.expect("entry").path();
        let name = f.file_name().expect("name");
        let same = std::fs::read(&f).expect("crd")
            == std::fs::read(chart.join("crds").join(name)).unwrap_or_default();
        assert!(
            same,
            "charts/toma/crds/{} differs from crds/ (copy crds/*.yaml over)",
            name.to_string_lossy()
        );
    }
    let out = std::process::Command::new(env.bin.join("helm"))
        .args(["lint", "--strict"])
        .arg(&chart)
        .output()
        .expect("helm lint");
    assert!(
        out.status.success(),
        "helm lint: {}",
        String::from_utf8_lossy(&out.stdout)
    );
    let out = std::process::Command::new(env.bin.join("helm"))
        .arg(format!("--kubeconfig={}", env.kubeconfig.display()))
        .args(["install", "toma"])
        .arg(&chart)
        .args(["-n", NAMESPACE, "--create-namespace", "--wait=false"])
        .output()
        .expect("helm install");
    assert!(
        out.status.success(),
        "helm install: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    env.wait_crds();
    for obj in [
        "deployment/toma-operator",
        "deployment/toma-csi-controller",
        "daemonset/toma-agent",
        "daemonset/toma-csi-node",
        "configmap/toma-cluster",
        "csidriver/toma.csi.io",
        "storageclass/toma-raid1",
        "storageclass/toma-raid6",
    ] {
        let (ok, out) = env.kubectl(&["-n", NAMESPACE, "get", obj], None);
        assert!(ok, "helm install did not create {obj}: {out}");
    }
    assert_eq!(
        jsonpath(
            &env,
            &[
                "-n",
                NAMESPACE,
                "get",
                "deployment/toma-operator",
                "-o",
                "jsonpath={.spec.replicas}"
            ]
        ),
        "2"
    );
    let default = jsonpath(
        &env,
        &[
            "get",
            "storageclass/toma-raid1",
            "-o",
            "jsonpath={.metadata.annotations}",
        ],
    );
    assert!(
        !default.contains("is-default-class"),
        "toma-raid1 is the default class: {default}"
    );

    // RBAC: exactly the rules the binaries use.
    for (role, want) in expected_rules() {
        let want: BTreeSet<String> = want.into_iter().map(String::from).collect();
        let got = granted(&env, role);
        assert_eq!(got, want, "{role}: granted (left) vs needed (right)");
    }
    for (sa, verb, res, allowed) in [
        ("toma-operator", "create", "tomavolumes.toma.io", false),
        ("toma-operator", "delete", "secrets", false),
        ("toma-agent", "update", "tomatopologies.toma.io", false),
        ("toma-csi-node", "create", "tomavolumes.toma.io", false),
        (
            "toma-csi-controller",
            "update",
            "tomatopologies.toma.io",
            false,
        ),
        ("toma-csi-controller", "create", "tomavolumes.toma.io", true),
    ] {
        let who = format!("--as=system:serviceaccount:{NAMESPACE}:{sa}");
        let (_, out) = env.kubectl(&["auth", "can-i", &who, verb, res, "-n", NAMESPACE], None);
        let yes = out.lines().any(|l| l.trim() == "yes");
        assert_eq!(yes, allowed, "{sa} {verb} {res}: {out}");
    }

    // The binaries as their ServiceAccounts.
    env.agent_client = client_for(&sa_kubeconfig(&env, "toma-agent")).await;
    env.start_nodes(3, 2 << 30, 60).await;
    let operator = client_for(&sa_kubeconfig(&env, "toma-operator")).await;
    env.start_leader(operator);
    let ctrl_kc = sa_kubeconfig(&env, "toma-csi-controller");
    let sock = env.path().join("csi/controller.sock");
    let mut args = env.controller_args(&sock);
    let i = args.iter().position(|a| a == "--kubeconfig").expect("flag");
    args[i + 1] = ctrl_kc.display().to_string();
    env.spawn_csi("controller", &args);
    wait_ready(&sock, "controller", || env.log("controller")).await;
    let log = std::fs::File::create(env.path().join("provisioner.log")).expect("log");
    let mut prov = std::process::Command::new(env.bin.join("csi-provisioner"))
        .arg(format!("--csi-address={}", sock.display()))
        .arg(format!("--kubeconfig={}", ctrl_kc.display()))
        .args([
            "--leader-election=false",
            "--extra-create-metadata",
            "--timeout=120s",
            "-v=3",
        ])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("csi-provisioner");
    struct Kill<'a>(&'a mut std::process::Child);
    impl Drop for Kill<'_> {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _prov = Kill(&mut prov);
    let prov_log =
        || std::fs::read_to_string(env.path().join("provisioner.log")).unwrap_or_default();
    // The resizer with the chart's flags (see templates/csi-controller.yaml).
    let log = std::fs::File::create(env.path().join("resizer.log")).expect("log");
    let mut resizer = std::process::Command::new(env.bin.join("csi-resizer"))
        .arg(format!("--csi-address={}", sock.display()))
        .arg(format!("--kubeconfig={}", ctrl_kc.display()))
        .args([
            "--leader-election=false",
            "--timeout=90s",
            "--handle-volume-inuse-error=false",
            "--feature-gates=VolumeAttributesClass=false",
            "-v=3",
        ])
        .stdout(log.try_clone().expect("log"))
        .stderr(log)
        .spawn()
        .expect("csi-resizer");
    let _resizer = Kill(&mut resizer);
    let resizer_log =
        || std::fs::read_to_string(env.path().join("resizer.log")).unwrap_or_default();

    // What kubelet and node-driver-registrar do on a node running the node plugin (there is
    // no kubelet here): the Node with its topology label and the CSINode listing the driver
    // with its topology key. The provisioner derives the volume's requirements from them.
    let node = format!(
        "apiVersion: v1\nkind: Node\nmetadata:\n  name: worker1\n  labels: {{{}: toma}}\n---\n\
         apiVersion: storage.k8s.io/v1\nkind: CSINode\nmetadata: {{name: worker1}}\nspec:\n  drivers:\n  \
         - {{name: {}, nodeID: worker1, topologyKeys: [{}]}}\n",
        toma_csi::TOPOLOGY_KEY,
        toma_csi::DRIVER_NAME,
        toma_csi::TOPOLOGY_KEY
    );
    let (ok, out) = env.kubectl(&["apply", "-f", "-"], Some(&node));
    assert!(ok, "apply Node + CSINode: {out}");
    let pvc =
        "apiVersion: v1\nkind: PersistentVolumeClaim\nmetadata: {name: data, namespace: default}\n\
               spec:\n  accessModes: [ReadWriteOnce]\n  storageClassName: toma-raid1\n  \
               resources: {requests: {storage: 64Mi}}\n";
    let (ok, out) = env.kubectl(&["apply", "-f", "-"], Some(pvc));
    assert!(ok, "apply PVC: {out}");
    let t0 = std::time::Instant::now();
    wait_jsonpath(
        &env,
        &[
            "-n",
            "default",
            "get",
            "pvc/data",
            "-o",
            "jsonpath={.status.phase}",
        ],
        "Bound",
        Duration::from_secs(120),
        |phase| {
            format!(
                "PVC not Bound (phase {phase:?}); provisioner log:\n{}\ncontroller log:\n{}",
                prov_log(),
                env.log("controller")
            )
        },
    )
    .await;
    eprintln!("PVC Bound in {:?}", t0.elapsed());
    let pv = jsonpath(
        &env,
        &[
            "-n",
            "default",
            "get",
            "pvc/data",
            "-o",
            "jsonpath={.spec.volumeName}",
        ],
    );
    let handle = jsonpath(
        &env,
        &[
            "get",
            &format!("pv/{pv}"),
            "-o",
            "jsonpath={.spec.csi.volumeHandle}",
        ],
    );
    let id = toma_csi::controller::parse_volume_id(&handle).unwrap_or_else(|| {
        panic!(
            "PV {pv} volumeHandle {handle:?}; provisioner log:\n{}",
            prov_log()
        )
    });
    for kind in ["tomavolume", "tomatopology"] {
        let (ok, out) = env.kubectl(&["get", &format!("{kind}/{pv}")], None);
        assert!(ok, "{kind} {pv}: {out}");
    }
    let size = jsonpath(
        &env,
        &[
            "get",
            &format!("pv/{pv}"),
            "-o",
            "jsonpath={.spec.capacity.storage}",
        ],
    );
    assert_eq!(size, "64Mi", "PV capacity");
    let disks: Vec<PathBuf> = env
        .nodes
        .lock()
        .iter()
        .flat_map(|n| n.disk_paths.clone())
        .collect();
    let extent_lengths = |id: VolumeId| -> Vec<u64> {
        let mut v: Vec<u64> = disks
            .iter()
            .flat_map(extents_on)
            .filter(|e| e.volume == id)
            .map(|e| e.length)
            .collect();
        v.sort();
        v
    };
    assert_eq!(extent_lengths(id), vec![64 << 20, 64 << 20]);

    // Data written before the resize (a client in this process, as the node plugin's
    // datapath would be).
    let client = VolumeClient::attach(
        env.cp.clone(),
        Arc::new(TcpTransport::new()),
        id,
        ClientConfig {
            node: "worker1".into(),
            ..ClientConfig::default()
        },
    )
    .await
    .expect("attach a client");
    let pattern = |seed: u8| -> bytes::Bytes {
        (0..1 << 20)
            .map(|i: usize| (i / 4096) as u8 ^ seed)
            .collect::<Vec<u8>>()
            .into()
    };
    client.write(0, pattern(1)).await.expect("write");
    client.write(63 << 20, pattern(2)).await.expect("write");

    // PVC resize: 64Mi -> 160Mi through the real external-resizer.
    let t0 = std::time::Instant::now();
    let (ok, out) = env.kubectl(
        &[
            "-n",
            "default",
            "patch",
            "pvc/data",
            "--type=merge",
            "-p",
            r#"{"spec":{"resources":{"requests":{"storage":"160Mi"}}}}"#,
        ],
        None,
    );
    assert!(ok, "patch PVC: {out}");
    let pv_arg = format!("pv/{pv}");
    wait_jsonpath(
        &env,
        &["get", &pv_arg, "-o", "jsonpath={.spec.capacity.storage}"],
        "160Mi",
        Duration::from_secs(180),
        |cap| {
            format!(
                "PV not resized (capacity {cap:?}); resizer log:\n{}\ncontroller log:\n{}",
                resizer_log(),
                env.log("controller")
            )
        },
    )
    .await;
    eprintln!(
        "PVC resized 64Mi -> 160Mi (PV capacity) in {:?}",
        t0.elapsed()
    );
    assert_eq!(
        jsonpath(
            &env,
            &[
                "get",
                &format!("tomavolume/{pv}"),
                "-o",
                "jsonpath={.spec.size}"
            ]
        ),
        (160u64 << 20).to_string(),
        "TomaVolume size"
    );
    assert_eq!(
        jsonpath(
            &env,
            &[
                "get",
                &format!("tomavolume/{pv}"),
                "-o",
                "jsonpath={.spec.growingTo}"
            ]
        ),
        "",
        "no growth left pending"
    );
    assert_eq!(
        extent_lengths(id),
        vec![160 << 20, 160 << 20],
        "both extents grew"
    );
    // Node expansion is kubelet's (none here): the resizer marks the PVC for it.
    let cond = jsonpath(
        &env,
        &[
            "-n",
            "default",
            "get",
            "pvc/data",
            "-o",
            "jsonpath={.status.conditions[*].type}",
        ],
    );
    assert!(
        cond.contains("FileSystemResizePending"),
        "PVC conditions {cond:?}; resizer log:\n{}",
        resizer_log()
    );
    assert_eq!(client.refresh_size().await.expect("size"), 160 << 20);
    assert_eq!(client.read(0, 1 << 20).await.expect("read"), pattern(1));
    assert_eq!(
        client.read(63 << 20, 1 << 20).await.expect("read"),
        pattern(2)
    );
    for mib in 64..160u64 {
        let b = client
            .read(mib << 20, 1 << 20)
            .await
            .expect("read new range");
        assert!(
            b.iter().all(|&x| x == 0),
            "MiB {mib} of the new range is not zero"
        );
    }
    client.detach().await.expect("detach");

    // The leader (operator token) writes topologies: kill a member's agent, see Degraded,
    // bring it back, see Normal.
    let t = env.topology(id).await.expect("topology");
    let victim = env.node_index(&t.members[0].node.0).expect("node");
    env.kill_agent(victim);
    eventually(
        "Degraded after an agent died",
        Duration::from_secs(60),
        || async {
            env.topology(id)
                .await
                .filter(|t| t.phase() != Phase::Normal)
                .map(|_| ())
        },
    )
    .await;
    env.start_agent(victim).await;
    eventually("Normal again", Duration::from_secs(120), || async {
        env.topology(id)
            .await
            .filter(|x| x.phase() == Phase::Normal && x.generation > t.generation)
            .map(|_| ())
    })
    .await;

    // Deleting the PVC deletes the volume and frees its extents on every disk.
    let on_disks = |id: VolumeId| -> usize {
        disks
            .iter()
            .map(|d| extents_on(d).iter().filter(|e| e.volume == id).count())
            .sum()
    };
    assert_eq!(
        on_disks(id),
        2,
        "a RAID1x2 volume has an extent on two disks"
    );
    let (ok, out) = env.kubectl(
        &["-n", "default", "delete", "pvc/data", "--wait=false"],
        None,
    );
    assert!(ok, "delete PVC: {out}");
    eventually(
        "the PV, TomaVolume and TomaTopology to be deleted",
        Duration::from_secs(120),
        || async {
            let gone = |what: String| !env.kubectl(&["get", &what], None).0;
            (gone(format!("pv/{pv}"))
                && gone(format!("tomavolume/{pv}"))
                && gone(format!("tomatopology/{pv}")))
            .then_some(())
        },
    )
    .await;
    eventually(
        "the extents to be freed in the superblocks",
        Duration::from_secs(60),
        || async { (on_disks(id) == 0).then_some(()) },
    )
    .await;
    eprintln!("PVC deleted: volume, topology and both extents gone");
}
