//! Against a real kube-apiserver + etcd (e2e/harness/control-plane.sh): the CRDs from
//! `crds/` reject invalid specs with messages naming the field, and `KubeControlPlane`'s
//! compare-and-swap and epoch fencing hold.
//!
//! Needs the e2e tools built (`e2e/tools/build.sh`, cached under
//! `~/.cache/toma-e2e-tools/<key>/bin`, or `TOMA_E2E_BIN`). Without them the test prints why
//! and passes without checking anything — it never builds the tools itself (that takes long).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::api::core::v1::Namespace;
use kube::api::{ObjectMeta, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config};
use toma_control::{ControlPlane, CpError, VolumeRecord};
use toma_core::{DiskId, Layout, NodeId, Role, Topology, VolumeId, VolumeSpec};
use toma_operator::{KubeConfig, KubeControlPlane, Metrics};

const TOOLS: [&str; 4] = [
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kubectl",
];

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn has_tools(dir: &Path) -> bool {
    TOOLS.iter().all(|t| dir.join(t).is_file())
}

/// The e2e tools' bin dir, if they are built.
fn tools() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("TOMA_E2E_BIN") {
        let d = PathBuf::from(d);
        return has_tools(&d).then_some(d);
    }
    let root = std::env::var("TOMA_E2E_TOOLS_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache/toma-e2e-tools")
        });
    std::fs::read_dir(root)
        .ok()?
        .filter_map(|e| e.ok())
        .map(|e| e.path().join("bin"))
        .find(|d| has_tools(d))
}

/// Stops the control plane however the test ends.
struct ControlPlaneGuard {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Drop for ControlPlaneGuard {
    fn drop(&mut self) {
        let _ = Command::new(repo().join("e2e/harness/control-plane.sh"))
            .arg("stop")
            .arg(self.dir.path())
            .env("TOMA_E2E_BIN", &self.bin)
            .status();
    }
}

impl ControlPlaneGuard {
    fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn kubectl(&self, args: &[&str], stdin: Option<&str>) -> (bool, String) {
        use std::io::Write;
        let mut cmd = Command::new(self.bin.join("kubectl"));
        cmd.arg(format!("--kubeconfig={}", self.kubeconfig().display()))
            .arg("--request-timeout=20s")
            .args(args)
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped());
        let mut child = cmd.spawn().expect("kubectl runs");
        if let Some(mut input) = child.stdin.take() {
            let _ = input.write_all(stdin.unwrap_or_default().as_bytes());
        }
        let out = child.wait_with_output().expect("kubectl output");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }
}

fn start() -> Option<ControlPlaneGuard> {
    let Some(bin) = tools() else {
        eprintln!(
            "SKIPPED: the e2e tools (etcd, kube-apiserver, kube-controller-manager, kubectl) are \
             not built yet; run e2e/tools/build.sh (or set TOMA_E2E_BIN) to run this test"
        );
        return None;
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let g = ControlPlaneGuard { dir, bin };
    let ok = Command::new(repo().join("e2e/harness/control-plane.sh"))
        .arg("start")
        .arg(g.dir.path())
        .env("TOMA_E2E_BIN", &g.bin)
        .status()
        .expect("control-plane.sh runs")
        .success();
    assert!(
        ok,
        "control-plane.sh start failed; logs in {}",
        g.dir.path().display()
    );
    Some(g)
}

fn uuid(n: u128) -> String {
    DiskId(n).to_string()
}

fn raid1_topology(volume: VolumeId) -> Topology {
    Topology::new_normal(
        volume,
        Layout::raid1(2).expect("layout"),
        65536,
        vec![
            (DiskId(0xa1 << 96), NodeId::from("node-a")),
            (DiskId(0xb2 << 96), NodeId::from("node-b")),
        ],
    )
    .expect("topology")
}

async fn set_lease(api: &Api<Lease>, holder: &str, transitions: i32) {
    let lease = Lease {
        metadata: ObjectMeta {
            name: Some("toma-operator-leader".into()),
            ..ObjectMeta::default()
        },
        spec: Some(LeaseSpec {
            holder_identity: Some(holder.into()),
            lease_transitions: Some(transitions),
            lease_duration_seconds: Some(15),
            ..LeaseSpec::default()
        }),
    };
    api.patch(
        "toma-operator-leader",
        &PatchParams::apply("test").force(),
        &Patch::Apply(&serde_json::json!({
            "apiVersion": "coordination.k8s.io/v1",
            "kind": "Lease",
            "metadata": lease.metadata,
            "spec": lease.spec,
        })),
    )
    .await
    .expect("lease written");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crds_and_cas_against_a_real_apiserver() {
    let Some(cp) = start() else { return };

    // CRDs apply and become established.
    let crds = repo().join("crds");
    let (ok, out) = cp.kubectl(&["apply", "-f", &crds.display().to_string()], None);
    assert!(ok, "kubectl apply crds: {out}");
    let (ok, out) = cp.kubectl(
        &[
            "wait",
            "--for=condition=established",
            "--timeout=60s",
            "crd/tomanodes.toma.io",
            "crd/tomadisks.toma.io",
            "crd/tomavolumes.toma.io",
            "crd/tomatopologies.toma.io",
        ],
        None,
    );
    assert!(ok, "CRDs not established: {out}");

    // Invalid specs are refused by the apiserver, naming the field.
    let volume = |extra: &str| {
        format!(
            "apiVersion: toma.io/v1alpha1\nkind: TomaVolume\nmetadata: {{name: bad}}\nspec:\n  \
             volumeId: {}\n  secretRef: {{namespace: default, name: s}}\n  size: 1048576\n{extra}",
            uuid(7)
        )
    };
    let cases = [
        (
            "RAID6 with 1 data member",
            volume("  layout: raid6\n  dataMembers: 1\n  chunkSize: 65536\n"),
            vec!["spec.dataMembers"],
        ),
        (
            "chunk size 3000",
            volume("  layout: raid1\n  mirrors: 2\n  chunkSize: 3000\n"),
            vec!["spec.chunkSize", "power of two"],
        ),
        (
            "mirrors 4",
            volume("  layout: raid1\n  mirrors: 4\n  chunkSize: 65536\n"),
            vec!["spec.mirrors"],
        ),
    ];
    let member =
        |disk: u128, node: &str| format!("  - {{disk: {}, node: {node}, role: RWL}}\n", uuid(disk));
    let topology = |members: String, mirrors: u8| {
        format!(
            "apiVersion: toma.io/v1alpha1\nkind: TomaTopology\nmetadata: {{name: bad}}\nspec:\n  \
             volume: bad\n  volumeId: {}\n  generation: 1\n  layout: raid1\n  mirrors: {mirrors}\n  \
             chunkSize: 65536\n  lockMode: Interleaved\n  members:\n{members}",
            uuid(7)
        )
    };
    let topo_cases = [
        (
            "duplicate member disks",
            topology(format!("{}{}", member(1, "n1"), member(1, "n2")), 2),
            vec!["spec.members", "duplicate member disks"],
        ),
        (
            "members count not matching the layout",
            topology(format!("{}{}", member(1, "n1"), member(2, "n2")), 3),
            vec!["spec.members", "count"],
        ),
    ];
    for (what, yaml, needles) in cases.iter().chain(topo_cases.iter()) {
        let (ok, out) = cp.kubectl(&["apply", "-f", "-"], Some(yaml));
        assert!(!ok, "{what}: the apiserver accepted it:\n{yaml}");
        for n in needles {
            assert!(
                out.contains(n),
                "{what}: the error does not mention {n:?}: {out}"
            );
        }
        eprintln!("{what}: refused: {}", out.trim());
    }

    // KubeControlPlane: CAS on resourceVersion and epoch fencing.
    let kc = Kubeconfig::read_from(cp.kubeconfig()).expect("kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("config");
    let client = Client::try_from(config).expect("client");
    let ns: Api<Namespace> = Api::all(client.clone());
    let _ = ns
        .create(
            &PostParams::default(),
            &Namespace {
                metadata: ObjectMeta {
                    name: Some("toma-system".into()),
                    ..ObjectMeta::default()
                },
                ..Namespace::default()
            },
        )
        .await;
    let leases: Api<Lease> = Api::namespaced(client.clone(), "toma-system");
    set_lease(&leases, "replica-a", 1).await;

    let a = KubeControlPlane::new(
        client.clone(),
        KubeConfig::default(),
        Arc::new(Metrics::default()),
        None,
    );
    let b = KubeControlPlane::new(
        client.clone(),
        KubeConfig::default(),
        Arc::new(Metrics::default()),
        None,
    );
    let id = VolumeId(0x5eed);
    let t1 = raid1_topology(id);
    let v0 = a
        .create_volume(VolumeRecord {
            id,
            name: "vol-a".into(),
            spec: VolumeSpec::new(t1.layout, 65536, 16 * 65536).expect("spec"),
            secret: [7; 32],
            topology: t1.clone(),
            growing_to: None,
        })
        .await
        .expect("create_volume");
    assert!(matches!(
        b.acquire_leadership("replica-b").await,
        Err(CpError::Deposed { .. })
    ));
    let epoch_a = a.acquire_leadership("replica-a").await.expect("a leads");
    assert_eq!(epoch_a, 1);

    let vols = a.volumes().await.expect("volumes");
    assert_eq!(vols.len(), 1);
    let v1 = vols[0].version;
    assert_ne!(v1, v0, "stamping the epoch changed the resourceVersion");
    assert_eq!(vols[0].value.secret, [7; 32]);
    assert_eq!(vols[0].value.topology, t1);

    let mut t2 = t1.clone();
    t2.generation = 2;
    t2.members[1].role = Role::Dead;
    // A write at the old resourceVersion (read before the stamp) conflicts.
    let e = a
        .cas_topology(id, v0, epoch_a, t2.clone())
        .await
        .unwrap_err();
    assert!(matches!(e, CpError::Conflict { .. }), "{e}");
    let v2 = a
        .cas_topology(id, v1, epoch_a, t2.clone())
        .await
        .expect("cas");
    assert!(v2 > v1);

    // The Lease moves to replica b (epoch 2): b stamps it; a's writes are refused.
    set_lease(&leases, "replica-b", 2).await;
    let epoch_b = b.acquire_leadership("replica-b").await.expect("b leads");
    assert_eq!(epoch_b, 2);
    let fresh = a.volume(id).await.expect("read").expect("volume").version;
    let mut t3 = t2.clone();
    t3.generation = 3;
    t3.members[1].role = Role::W;
    t3.members[1].full_rebuild = true;
    let e = a
        .cas_topology(id, fresh, epoch_a, t3.clone())
        .await
        .unwrap_err();
    assert!(
        matches!(
            e,
            CpError::Deposed {
                mine: 1,
                current: 2
            }
        ),
        "{e}"
    );
    let v3 = b
        .cas_topology(id, fresh, epoch_b, t3.clone())
        .await
        .expect("b writes");
    // A non-adjacent topology is refused by the store.
    let mut bad = t3.clone();
    bad.generation = 5;
    let e = b.cas_topology(id, v3, epoch_b, bad).await.unwrap_err();
    assert!(matches!(e, CpError::Rejected(_)), "{e}");

    let (ok, out) = cp.kubectl(&["get", "tomatopologies"], None);
    assert!(ok, "{out}");
    eprintln!("{out}");
    assert!(
        out.contains("RebuildInit") && out.contains("node-b/000000b2:W"),
        "{out}"
    );

    // A hand edit into an impossible state (Degraded straight to Normal, skipping the
    // rebuild) is refused: the leader's view drops the volume until it is put back.
    let (ok, out) = cp.kubectl(
        &[
            "patch",
            "tomatopology",
            "vol-a",
            "--type=json",
            "-p",
            r#"[{"op":"replace","path":"/spec/members/1/role","value":"RWL"},{"op":"replace","path":"/spec/generation","value":4}]"#,
        ],
        None,
    );
    assert!(ok, "{out}");
    assert!(
        b.volumes().await.expect("volumes").is_empty(),
        "the hand edit was used"
    );
    // Left out of the listing, not deleted: agents keep serving its members and free
    // nothing of it while it is named here.
    let names = b.volume_names().await.expect("volume names");
    assert!(names.contains("vol-a"), "{names:?}");
}
