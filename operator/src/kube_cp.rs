//! `KubeControlPlane`: `toma_control::ControlPlane` over the Kubernetes API (the CRDs of
//! `toma-crds`).
//!
//! Fencing a deposed leader, in three layers:
//!
//! 1. **CAS.** Every topology write is a `replace` (PUT) of the `TomaTopology` carrying the
//!    `resourceVersion` the leader read (`Version` = that resourceVersion, which the
//!    apiserver's etcd storage makes a decimal counter); the apiserver answers 409 if anything
//!    wrote the object since, which becomes `CpError::Conflict`.
//! 2. **Epoch in the object.** The write carries the leader's epoch (the Lease's
//!    `leaseTransitions` when it took over) in `spec.leaderEpoch`; a write whose epoch is older
//!    than the one recorded is refused with `CpError::Deposed` before it is sent, and the CRD's
//!    CEL rule `self.leaderEpoch >= oldSelf.leaderEpoch` refuses it at the apiserver too.
//! 3. **Stamping on takeover.** `acquire_leadership` stamps the new epoch on every
//!    `TomaTopology` (a CAS each). That changes every resourceVersion, so any write a paused
//!    predecessor still has in flight fails with 409, and every later one sees the newer epoch.
//!
//! Reads go straight to the API (lists); `changes()` is driven by watches on the four CRDs.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;

use async_trait::async_trait;
use futures_util::StreamExt;
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::Secret;
use k8s_openapi::ByteString;
use kube::api::{DeleteParams, ListParams, ObjectMeta, Patch, PatchParams, PostParams};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource, ResourceExt};
use parking_lot::Mutex;
use serde_json::json;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use toma_control::{
    Attachment, ControlPlane, CpError, CpResult, DiskRecord, Epoch, MemberStatus, NodeRecord,
    Unreachable, Version, Versioned, VolumeRecord,
};
use toma_core::{check_adjacent, DiskId, Topology, VolumeId, VolumeSpec};
use toma_crds::convert::{member_statuses, unreachable_reports};
use toma_crds::{
    MemberReportStatus, SecretRef, TomaDisk, TomaDiskSpec, TomaNode, TomaNodeSpec, TomaTopology,
    TomaTopologySpec, TomaVolume, TomaVolumeSpec, SECRET_KEY,
};
use tracing::{debug, info, warn};

use crate::error::{cp_error, status_of};
use crate::guard::{judge, Accepted, Observer, Verdict};
use crate::metrics::Metrics;

/// Something the operator tells humans through a Kubernetes Event on a `TomaTopology`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notice {
    /// The `TomaTopology` (= volume) name.
    pub topology: String,
    pub warning: bool,
    /// CamelCase, stable: `TopologyChanged`, `HandEditRefused`, ...
    pub reason: String,
    pub note: String,
}

/// Where the operator's control plane lives and what it calls itself.
#[derive(Debug, Clone)]
pub struct KubeConfig {
    /// Namespace of the leader Lease.
    pub lease_namespace: String,
    pub lease_name: String,
    /// Namespace where `create_volume` puts volume Secrets.
    pub secret_namespace: String,
    /// Field manager of every write.
    pub field_manager: String,
}

impl Default for KubeConfig {
    fn default() -> Self {
        KubeConfig {
            lease_namespace: "toma-system".into(),
            lease_name: "toma-operator-leader".into(),
            secret_namespace: "toma-system".into(),
            field_manager: "toma-operator".into(),
        }
    }
}

pub struct KubeControlPlane {
    cfg: KubeConfig,
    client: Client,
    topologies: Api<TomaTopology>,
    volumes: Api<TomaVolume>,
    nodes: Api<TomaNode>,
    disks: Api<TomaDisk>,
    leases: Api<Lease>,
    /// Set by the election loop when this replica lost the Lease: every leader write is then
    /// refused locally (`Deposed`) before it reaches the apiserver.
    lost_lease: AtomicBool,
    accepted: Mutex<BTreeMap<String, Accepted>>,
    /// The epoch this process leads (took the Lease with), if it ever did: for that epoch it
    /// wrote every topology step itself (see `guard::Observer`).
    led: Mutex<Option<Epoch>>,
    /// `(name, resourceVersion)` already reported as refused (one Event per bad version).
    refused: Mutex<BTreeMap<String, String>>,
    notices: Option<mpsc::UnboundedSender<Notice>>,
    metrics: Arc<Metrics>,
    tx: watch::Sender<u64>,
    synced: Arc<AtomicUsize>,
    watchers: Vec<JoinHandle<()>>,
    watches: Watches,
}

impl Drop for KubeControlPlane {
    fn drop(&mut self) {
        for w in &self.watchers {
            w.abort();
        }
    }
}

fn version_of(meta: &ObjectMeta, what: &str) -> CpResult<Version> {
    let rv = meta.resource_version.as_deref().unwrap_or_default();
    rv.parse().map_err(|_| {
        CpError::Unavailable(format!(
            "{what}: resourceVersion {rv:?} is not a decimal counter (etcd3 storage expected)"
        ))
    })
}

fn client_key(client: u128) -> String {
    format!("{client:032x}")
}

/// Which kinds' watches drive `changes()`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Watches {
    /// All four CRDs (the operator: node heartbeats and disk reports matter to the leader).
    All,
    /// `TomaTopology` and `TomaVolume` only (agents and clients: they follow topologies and
    /// must not wake on every node's heartbeat).
    Topologies,
}

impl Watches {
    fn count(self) -> usize {
        match self {
            Watches::All => 4,
            Watches::Topologies => 2,
        }
    }
}

impl KubeControlPlane {
    /// Connects the APIs and starts the watches (of all four CRDs) that drive `changes()`.
    pub fn new(
        client: Client,
        cfg: KubeConfig,
        metrics: Arc<Metrics>,
        notices: Option<mpsc::UnboundedSender<Notice>>,
    ) -> Arc<Self> {
        Self::with_watches(client, cfg, metrics, notices, Watches::All)
    }

    /// Like [`KubeControlPlane::new`], watching only the kinds in `watches`.
    pub fn with_watches(
        client: Client,
        cfg: KubeConfig,
        metrics: Arc<Metrics>,
        notices: Option<mpsc::UnboundedSender<Notice>>,
        watches: Watches,
    ) -> Arc<Self> {
        let (tx, _) = watch::channel(0u64);
        let synced = Arc::new(AtomicUsize::new(0));
        let mut cp = KubeControlPlane {
            topologies: Api::all(client.clone()),
            volumes: Api::all(client.clone()),
            nodes: Api::all(client.clone()),
            disks: Api::all(client.clone()),
            leases: Api::namespaced(client.clone(), &cfg.lease_namespace),
            client,
            cfg,
            lost_lease: AtomicBool::new(false),
            accepted: Mutex::new(BTreeMap::new()),
            led: Mutex::new(None),
            refused: Mutex::new(BTreeMap::new()),
            notices,
            metrics,
            tx,
            synced,
            watchers: Vec::new(),
            watches,
        };
        cp.watchers = vec![
            spawn_watch(cp.topologies.clone(), cp.tx.clone(), cp.synced.clone()),
            spawn_watch(cp.volumes.clone(), cp.tx.clone(), cp.synced.clone()),
        ];
        if watches == Watches::All {
            cp.watchers.extend([
                spawn_watch(cp.nodes.clone(), cp.tx.clone(), cp.synced.clone()),
                spawn_watch(cp.disks.clone(), cp.tx.clone(), cp.synced.clone()),
            ]);
        }
        Arc::new(cp)
    }

    /// Every watch has delivered its initial list (for `/readyz`).
    pub fn ready(&self) -> bool {
        self.synced.load(Ordering::SeqCst) >= self.watches.count()
    }

    /// The election loop's verdict: `false` once this replica no longer holds the Lease.
    pub fn set_holding_lease(&self, holding: bool) {
        self.lost_lease.store(!holding, Ordering::SeqCst);
    }

    pub fn client(&self) -> &Client {
        &self.client
    }

    fn notify(&self, n: Notice) {
        if let Some(tx) = &self.notices {
            let _ = tx.send(n);
        }
    }

    fn pp(&self) -> PostParams {
        PostParams {
            dry_run: false,
            field_manager: Some(self.cfg.field_manager.clone()),
        }
    }

    /// The topology of `obj` if this replica may use it (see `guard`); refusals are
    /// reported once per resourceVersion.
    fn admit(&self, obj: &TomaTopology) -> Option<Topology> {
        let name = obj.name_any();
        let t = match obj.spec.to_topology() {
            Ok(t) => t,
            Err(e) => {
                self.refuse(obj, "InvalidTopology", format!("{e}; nothing was applied"));
                return None;
            }
        };
        let epoch = obj.spec.leader_epoch;
        let who = if *self.led.lock() == Some(epoch) {
            Observer::Writer
        } else {
            Observer::Reader
        };
        let mut acc = self.accepted.lock();
        match judge(acc.get(&name), &t, epoch, who) {
            Verdict::Accept => {
                let prev_epoch = acc.get(&name).map_or(0, |a| a.epoch);
                acc.insert(
                    name.clone(),
                    Accepted {
                        topology: t.clone(),
                        epoch: epoch.max(prev_epoch),
                    },
                );
                drop(acc);
                self.refused.lock().remove(&name);
                Some(t)
            }
            Verdict::Refuse(why) => {
                drop(acc);
                self.refuse(obj, "HandEditRefused", why);
                None
            }
        }
    }

    fn refuse(&self, obj: &TomaTopology, reason: &str, note: String) {
        let name = obj.name_any();
        let rv = obj.resource_version().unwrap_or_default();
        let first = self.refused.lock().insert(name.clone(), rv.clone()) != Some(rv);
        if first {
            warn!(topology = %name, reason, %note, "refusing a TomaTopology");
            self.metrics.refused_edits.inc();
            self.notify(Notice {
                topology: name,
                warning: true,
                reason: reason.into(),
                note,
            });
        }
    }

    async fn secret_bytes(&self, r: &SecretRef) -> CpResult<[u8; 32]> {
        let api: Api<Secret> = Api::namespaced(self.client.clone(), &r.namespace);
        let what = format!("Secret {}/{}", r.namespace, r.name);
        let s = api.get(&r.name).await.map_err(|e| match status_of(&e) {
            // Gone for good, not a hiccup: the volume is left out of listings (and named in
            // `volume_names`), the others go on.
            Some(404) => CpError::Rejected(format!("{what}: not found")),
            _ => cp_error(&what, e),
        })?;
        let bytes = s
            .data
            .as_ref()
            .and_then(|d| d.get(SECRET_KEY))
            .map(|b| b.0.clone())
            .ok_or_else(|| CpError::Rejected(format!("{what}: no data.{SECRET_KEY}")))?;
        <[u8; 32]>::try_from(bytes.as_slice()).map_err(|_| {
            CpError::Rejected(format!(
                "{what}: data.{SECRET_KEY} has {} bytes, want 32",
                bytes.len()
            ))
        })
    }

    async fn list_topologies(&self) -> CpResult<Vec<TomaTopology>> {
        Ok(self
            .topologies
            .list(&ListParams::default())
            .await
            .map_err(|e| cp_error("TomaTopology list", e))?
            .items)
    }

    /// The `TomaTopology` of volume `id`.
    async fn topology_of(&self, id: VolumeId) -> CpResult<TomaTopology> {
        let want = id.to_string();
        self.list_topologies()
            .await?
            .into_iter()
            .find(|t| t.spec.volume_id == want)
            .ok_or(CpError::NoVolume(id))
    }

    /// The TomaVolume of volume `id` and its checked core spec.
    async fn volume_of(&self, id: VolumeId) -> CpResult<(TomaVolume, VolumeSpec)> {
        let obj = self.topology_of(id).await?;
        let vol = match self.volumes.get(&obj.spec.volume).await {
            Ok(v) => v,
            Err(e) if status_of(&e) == Some(404) => return Err(CpError::NoVolume(id)),
            Err(e) => return Err(cp_error("TomaVolume get", e)),
        };
        let spec = vol
            .spec
            .to_volume_spec()
            .map_err(|e| CpError::Rejected(format!("TomaVolume {}: {e}", vol.name_any())))?;
        Ok((vol, spec))
    }

    /// Merge-patches `vol`'s spec, conditional on its resourceVersion (a concurrent change
    /// makes it fail with `Conflict`; the caller reads again).
    async fn patch_volume_spec(&self, vol: &TomaVolume, spec: serde_json::Value) -> CpResult<()> {
        let name = vol.name_any();
        let rv = vol.resource_version().unwrap_or_default();
        let patch = json!({ "metadata": { "resourceVersion": rv }, "spec": spec });
        match self
            .volumes
            .patch(
                &name,
                &PatchParams {
                    field_manager: Some(self.cfg.field_manager.clone()),
                    ..PatchParams::default()
                },
                &Patch::Merge(patch),
            )
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(409) => Err(CpError::Conflict {
                volume: vol.spec.id().unwrap_or(VolumeId(0)),
                expected: rv.parse().unwrap_or(0),
                actual: 0,
            }),
            Err(e) if status_of(&e) == Some(422) => {
                Err(CpError::Rejected(format!("TomaVolume {name}: {}", e)))
            }
            Err(e) => Err(cp_error("TomaVolume patch", e)),
        }
    }

    async fn patch_topology_status(&self, name: &str, status: serde_json::Value) -> CpResult<()> {
        self.topologies
            .patch_status(
                name,
                &PatchParams {
                    field_manager: Some(self.cfg.field_manager.clone()),
                    ..PatchParams::default()
                },
                &Patch::Merge(json!({ "status": status })),
            )
            .await
            .map_err(|e| cp_error(&format!("TomaTopology {name} status"), e))?;
        Ok(())
    }

    async fn apply<K>(&self, api: &Api<K>, name: &str, body: serde_json::Value) -> CpResult<()>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        api.patch(
            name,
            &PatchParams::apply(&self.cfg.field_manager).force(),
            &Patch::Apply(body),
        )
        .await
        .map_err(|e| cp_error(name, e))?;
        Ok(())
    }

    async fn merge_status<K>(
        &self,
        api: &Api<K>,
        name: &str,
        status: serde_json::Value,
    ) -> CpResult<()>
    where
        K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
    {
        api.patch_status(
            name,
            &PatchParams::default(),
            &Patch::Merge(json!({ "status": status })),
        )
        .await
        .map_err(|e| cp_error(name, e))?;
        Ok(())
    }

    /// Writes `spec` over `obj` with a CAS on the resourceVersion `obj` was read at.
    async fn replace_spec(
        &self,
        obj: &TomaTopology,
        spec: TomaTopologySpec,
        id: VolumeId,
        expected: Version,
    ) -> CpResult<Version> {
        let name = obj.name_any();
        let mut next = obj.clone();
        next.spec = spec;
        // Status is a subresource (ignored by a PUT of the object); leave managedFields to
        // the server.
        next.status = None;
        next.metadata.managed_fields = None;
        match self.topologies.replace(&name, &self.pp(), &next).await {
            Ok(written) => version_of(&written.metadata, &name),
            Err(e) if status_of(&e) == Some(409) => {
                let actual = match self.topologies.get(&name).await {
                    Ok(o) => version_of(&o.metadata, &name).unwrap_or(expected),
                    Err(_) => expected,
                };
                Err(CpError::Conflict {
                    volume: id,
                    expected,
                    actual,
                })
            }
            Err(e) => Err(cp_error(&format!("TomaTopology {name}"), e)),
        }
    }

    /// Stamps `epoch` on every `TomaTopology` (see the module comment, layer 3).
    async fn stamp_epoch(&self, epoch: Epoch) -> CpResult<()> {
        for _attempt in 0..5 {
            let mut conflicts = 0;
            for obj in self.list_topologies().await? {
                let current = obj.spec.leader_epoch;
                if current > epoch {
                    return Err(CpError::Deposed {
                        mine: epoch,
                        current,
                    });
                }
                if current == epoch {
                    continue;
                }
                let name = obj.name_any();
                let expected = version_of(&obj.metadata, &name)?;
                let mut spec = obj.spec.clone();
                spec.leader_epoch = epoch;
                let id = toma_crds::convert::parse_volume_id("spec.volumeId", &spec.volume_id)
                    .unwrap_or(VolumeId(0));
                match self.replace_spec(&obj, spec, id, expected).await {
                    Ok(_) => debug!(topology = %name, epoch, "stamped the leader epoch"),
                    Err(CpError::Conflict { .. }) => conflicts += 1,
                    Err(e) => return Err(e),
                }
            }
            if conflicts == 0 {
                return Ok(());
            }
        }
        Err(CpError::Unavailable(
            "could not stamp the leader epoch on every TomaTopology (kept conflicting)".into(),
        ))
    }
}

fn spawn_watch<K>(api: Api<K>, tx: watch::Sender<u64>, synced: Arc<AtomicUsize>) -> JoinHandle<()>
where
    K: Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let kind = std::any::type_name::<K>();
        let mut counted = false;
        let mut stream = watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    if !counted {
                        counted = true;
                        synced.fetch_add(1, Ordering::SeqCst);
                    }
                    tx.send_modify(|v| *v += 1);
                }
                Ok(watcher::Event::Init | watcher::Event::InitApply(_)) => {}
                Ok(_) => tx.send_modify(|v| *v += 1),
                // One malformed object or a dropped connection must not end the watch.
                Err(e) => warn!(kind, error = %e, "watch error; retrying"),
            }
        }
    })
}

#[async_trait]
impl ControlPlane for KubeControlPlane {
    async fn volumes(&self) -> CpResult<Vec<Versioned<VolumeRecord>>> {
        let vols: BTreeMap<String, TomaVolume> = self
            .volumes
            .list(&ListParams::default())
            .await
            .map_err(|e| cp_error("TomaVolume list", e))?
            .items
            .into_iter()
            .map(|v| (v.name_any(), v))
            .collect();
        let mut out = Vec::new();
        for obj in self.list_topologies().await? {
            let name = obj.name_any();
            let Some(topology) = self.admit(&obj) else {
                continue;
            };
            let Some(vol) = vols.get(&obj.spec.volume) else {
                debug!(topology = %name, volume = %obj.spec.volume, "no TomaVolume yet");
                continue;
            };
            let spec = match vol.spec.to_volume_spec() {
                Ok(s) => s,
                Err(e) => {
                    warn!(volume = %obj.spec.volume, error = %e, "invalid TomaVolume");
                    continue;
                }
            };
            let secret = match self.secret_bytes(&vol.spec.secret_ref).await {
                Ok(s) => s,
                // The API server is away (restarting, say): the listing fails as a whole.
                // Leaving the volume out would tell every caller it does not exist.
                Err(e @ CpError::Unavailable(_)) => return Err(e),
                Err(e) => {
                    warn!(volume = %obj.spec.volume, error = %e, "volume secret unreadable");
                    continue;
                }
            };
            out.push(Versioned {
                version: version_of(&obj.metadata, &name)?,
                value: VolumeRecord {
                    id: topology.volume,
                    name: obj.spec.volume.clone(),
                    spec,
                    secret,
                    topology,
                    growing_to: vol.spec.growing_to,
                },
            });
        }
        Ok(out)
    }

    async fn volume_names(&self) -> CpResult<std::collections::BTreeSet<String>> {
        // A volume exists while its TomaVolume or its TomaTopology does (deletion removes
        // the TomaVolume first): whether or not its Secret and topology can be read now.
        let mut names: std::collections::BTreeSet<String> = self
            .list_topologies()
            .await?
            .into_iter()
            .map(|t| t.spec.volume)
            .collect();
        names.extend(
            self.volumes
                .list(&ListParams::default())
                .await
                .map_err(|e| cp_error("TomaVolume list", e))?
                .items
                .iter()
                .map(ResourceExt::name_any),
        );
        Ok(names)
    }

    async fn volume(&self, id: VolumeId) -> CpResult<Option<Versioned<VolumeRecord>>> {
        Ok(self.volumes().await?.into_iter().find(|v| v.value.id == id))
    }

    async fn create_volume(&self, rec: VolumeRecord) -> CpResult<Version> {
        rec.topology
            .validate()
            .map_err(|e| CpError::Rejected(format!("volume {}: {e}", rec.name)))?;
        let secret_name = format!("toma-volume-{}", rec.name);
        let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &self.cfg.secret_namespace);
        let secret = Secret {
            metadata: ObjectMeta {
                name: Some(secret_name.clone()),
                ..ObjectMeta::default()
            },
            data: Some(BTreeMap::from([(
                SECRET_KEY.to_string(),
                ByteString(rec.secret.to_vec()),
            )])),
            ..Secret::default()
        };
        let exists = |e: kube::Error, what: &str| match status_of(&e) {
            Some(409) => CpError::Exists(rec.name.clone()),
            _ => cp_error(what, e),
        };
        secrets
            .create(&self.pp(), &secret)
            .await
            .map_err(|e| exists(e, "Secret"))?;
        let vol = TomaVolume::new(
            &rec.name,
            TomaVolumeSpec::from_core(
                rec.id,
                &rec.spec,
                SecretRef {
                    namespace: self.cfg.secret_namespace.clone(),
                    name: secret_name,
                },
            ),
        );
        self.volumes
            .create(&self.pp(), &vol)
            .await
            .map_err(|e| exists(e, "TomaVolume"))?;
        let tt = TomaTopology::new(
            &rec.name,
            TomaTopologySpec::from_topology(&rec.name, &rec.topology, 0),
        );
        let created = self
            .topologies
            .create(&self.pp(), &tt)
            .await
            .map_err(|e| exists(e, "TomaTopology"))?;
        self.accepted.lock().insert(
            rec.name.clone(),
            Accepted {
                topology: rec.topology,
                epoch: 0,
            },
        );
        version_of(&created.metadata, &rec.name)
    }

    async fn delete_volume(&self, id: VolumeId) -> CpResult<()> {
        let obj = self.topology_of(id).await?;
        let name = obj.name_any();
        let dp = DeleteParams::default();
        let gone = |r: Result<(), kube::Error>, what: &str| match r {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(cp_error(what, e)),
        };
        if let Ok(vol) = self.volumes.get(&obj.spec.volume).await {
            let r = &vol.spec.secret_ref;
            let secrets: Api<Secret> = Api::namespaced(self.client.clone(), &r.namespace);
            gone(secrets.delete(&r.name, &dp).await.map(|_| ()), "Secret")?;
            gone(
                self.volumes.delete(&obj.spec.volume, &dp).await.map(|_| ()),
                "TomaVolume",
            )?;
        }
        gone(
            self.topologies.delete(&name, &dp).await.map(|_| ()),
            "TomaTopology",
        )?;
        self.accepted.lock().remove(&name);
        Ok(())
    }

    async fn cas_topology(
        &self,
        id: VolumeId,
        expected: Version,
        epoch: Epoch,
        topology: Topology,
    ) -> CpResult<Version> {
        let result = self.cas_inner(id, expected, epoch, topology).await;
        self.metrics.cas(match &result {
            Ok(_) => "ok",
            Err(e) => e.category(),
        });
        result
    }

    async fn set_growing(&self, id: VolumeId, size: Option<u64>) -> CpResult<()> {
        let (vol, spec) = self.volume_of(id).await?;
        if let Some(s) = size {
            spec.grown(s)
                .map_err(|e| CpError::Rejected(format!("volume {}: {e}", vol.name_any())))?;
        }
        if vol.spec.growing_to == size {
            return Ok(());
        }
        self.patch_volume_spec(&vol, json!({ "growingTo": size }))
            .await
    }

    async fn commit_growth(&self, id: VolumeId, size: u64) -> CpResult<()> {
        let (vol, spec) = self.volume_of(id).await?;
        if spec.size == size && vol.spec.growing_to.is_none() {
            return Ok(());
        }
        if vol.spec.growing_to != Some(size) {
            return Err(CpError::Rejected(format!(
                "volume {}: no growth to {size} bytes is pending (pending: {:?})",
                vol.name_any(),
                vol.spec.growing_to
            )));
        }
        spec.grown(size)
            .map_err(|e| CpError::Rejected(format!("volume {}: {e}", vol.name_any())))?;
        self.patch_volume_spec(&vol, json!({ "size": size, "growingTo": null }))
            .await
    }

    async fn acquire_leadership(&self, holder: &str) -> CpResult<Epoch> {
        let lease = self
            .leases
            .get(&self.cfg.lease_name)
            .await
            .map_err(|e| cp_error(&format!("Lease {}", self.cfg.lease_name), e))?;
        let spec = lease.spec.unwrap_or_default();
        let current_holder = spec.holder_identity.unwrap_or_default();
        let epoch = Epoch::try_from(spec.lease_transitions.unwrap_or(0)).unwrap_or(0);
        if current_holder != holder {
            return Err(CpError::Deposed {
                mine: 0,
                current: epoch,
            });
        }
        self.stamp_epoch(epoch).await?;
        *self.led.lock() = Some(epoch);
        self.lost_lease.store(false, Ordering::SeqCst);
        self.metrics
            .epoch
            .set(i64::try_from(epoch).unwrap_or(i64::MAX));
        info!(
            holder,
            epoch, "leadership acquired; epoch stamped on every TomaTopology"
        );
        Ok(epoch)
    }

    async fn nodes(&self) -> CpResult<Vec<NodeRecord>> {
        Ok(self
            .nodes
            .list(&ListParams::default())
            .await
            .map_err(|e| cp_error("TomaNode list", e))?
            .items
            .iter()
            .map(|n| TomaNodeSpec::to_record(&n.name_any(), &n.spec, n.status.as_ref()))
            .collect())
    }

    async fn put_node(&self, rec: NodeRecord) -> CpResult<()> {
        let (spec, status) = TomaNodeSpec::from_record(&rec);
        let name = rec.node.0.clone();
        self.apply(
            &self.nodes,
            &name,
            json!({"apiVersion": "toma.io/v1alpha1", "kind": "TomaNode", "metadata": {"name": name}, "spec": spec}),
        )
        .await?;
        self.merge_status(
            &self.nodes,
            &name,
            serde_json::to_value(status).unwrap_or_default(),
        )
        .await
    }

    async fn disks(&self) -> CpResult<Vec<DiskRecord>> {
        let mut out = Vec::new();
        for d in self
            .disks
            .list(&ListParams::default())
            .await
            .map_err(|e| cp_error("TomaDisk list", e))?
            .items
        {
            match TomaDiskSpec::to_record(&d.name_any(), &d.spec, d.status.as_ref()) {
                Ok(r) => out.push(r),
                Err(e) => warn!(disk = %d.name_any(), error = %e, "ignoring an invalid TomaDisk"),
            }
        }
        Ok(out)
    }

    async fn put_disk(&self, rec: DiskRecord) -> CpResult<()> {
        let (name, spec, status) = TomaDiskSpec::from_record(&rec);
        self.apply(
            &self.disks,
            &name,
            json!({"apiVersion": "toma.io/v1alpha1", "kind": "TomaDisk", "metadata": {"name": name}, "spec": spec}),
        )
        .await?;
        self.merge_status(
            &self.disks,
            &name,
            serde_json::to_value(status).unwrap_or_default(),
        )
        .await
    }

    async fn remove_disk(&self, disk: DiskId) -> CpResult<()> {
        match self
            .disks
            .delete(&disk.to_string(), &DeleteParams::default())
            .await
        {
            Ok(_) => Ok(()),
            Err(e) if status_of(&e) == Some(404) => Ok(()),
            Err(e) => Err(cp_error(&format!("TomaDisk {disk}"), e)),
        }
    }

    async fn member_statuses(&self, volume: VolumeId) -> CpResult<Vec<MemberStatus>> {
        let obj = self.topology_of(volume).await?;
        let st = obj.status.unwrap_or_default();
        member_statuses(volume, &st.members).map_err(|e| CpError::Rejected(e.to_string()))
    }

    async fn put_member_status(&self, status: MemberStatus) -> CpResult<()> {
        let obj = self.topology_of(status.volume).await?;
        let (disk, report) = MemberReportStatus::from_core(&status);
        let refused = report.grow_refused.is_some();
        let mut patch = json!({ "members": { &disk: report } });
        if !refused {
            // A merge patch keeps what it does not mention: an old refusal is removed
            // explicitly.
            patch["members"][&disk]["growRefused"] = serde_json::Value::Null;
        }
        // Only the progress of the rebuild under the current generation is shown (a report
        // of an older cycle would show 100 % before the new one starts).
        if let Some(r) = status
            .rebuild
            .filter(|r| r.generation == obj.spec.generation)
        {
            let pct = match (r.finished, r.total_units) {
                (true, _) => 100,
                // Not counted yet: nothing done (`percent()` calls an empty rebuild done).
                (false, 0) => 0,
                _ => r.percent().min(99),
            };
            patch["rebuildPercent"] = json!(pct);
        }
        self.patch_topology_status(&obj.name_any(), patch).await
    }

    async fn report_unreachable(&self, report: Unreachable) -> CpResult<()> {
        let obj = self.topology_of(report.volume).await?;
        let disk = report.disk.to_string();
        let known = obj
            .status
            .as_ref()
            .and_then(|s| s.unreachable.get(&disk))
            .map(|u| u.generation);
        if known.is_some_and(|g| g >= report.generation) {
            return Ok(());
        }
        self.patch_topology_status(
            &obj.name_any(),
            json!({ "unreachable": { disk: { "generation": report.generation } } }),
        )
        .await
    }

    async fn unreachable(&self, volume: VolumeId) -> CpResult<Vec<Unreachable>> {
        let obj = self.topology_of(volume).await?;
        let st = obj.status.unwrap_or_default();
        unreachable_reports(volume, &st.unreachable).map_err(|e| CpError::Rejected(e.to_string()))
    }

    async fn clear_unreachable(&self, volume: VolumeId, disk: DiskId) -> CpResult<()> {
        let obj = self.topology_of(volume).await?;
        let key = disk.to_string();
        if !obj
            .status
            .as_ref()
            .is_some_and(|s| s.unreachable.contains_key(&key))
        {
            return Ok(());
        }
        self.patch_topology_status(&obj.name_any(), json!({ "unreachable": { key: null } }))
            .await
    }

    async fn attach(&self, a: Attachment) -> CpResult<()> {
        let obj = self.topology_of(a.volume).await?;
        self.patch_topology_status(
            &obj.name_any(),
            json!({ "attachments": { client_key(a.client): { "node": a.node.0 } } }),
        )
        .await
    }

    async fn detach(&self, volume: VolumeId, client: u128) -> CpResult<()> {
        let obj = self.topology_of(volume).await?;
        self.patch_topology_status(
            &obj.name_any(),
            json!({ "attachments": { client_key(client): null } }),
        )
        .await
    }

    async fn attachments(&self, volume: VolumeId) -> CpResult<Vec<Attachment>> {
        let obj = self.topology_of(volume).await?;
        let st = obj.status.unwrap_or_default();
        st.attachments
            .iter()
            .map(|(k, v)| {
                let client = u128::from_str_radix(k, 16).map_err(|_| {
                    CpError::Rejected(format!("status.attachments[{k:?}]: not a client id"))
                })?;
                Ok(Attachment {
                    volume,
                    client,
                    node: v.node.as_str().into(),
                })
            })
            .collect()
    }

    fn changes(&self) -> watch::Receiver<u64> {
        self.tx.subscribe()
    }
}

impl KubeControlPlane {
    async fn cas_inner(
        &self,
        id: VolumeId,
        expected: Version,
        epoch: Epoch,
        topology: Topology,
    ) -> CpResult<Version> {
        if self.lost_lease.load(Ordering::SeqCst) {
            return Err(CpError::Deposed {
                mine: epoch,
                current: epoch.saturating_add(1),
            });
        }
        let obj = self.topology_of(id).await?;
        let name = obj.name_any();
        let current = obj.spec.leader_epoch;
        if current > epoch {
            return Err(CpError::Deposed {
                mine: epoch,
                current,
            });
        }
        let actual = version_of(&obj.metadata, &name)?;
        if actual != expected {
            return Err(CpError::Conflict {
                volume: id,
                expected,
                actual,
            });
        }
        let cur = obj
            .spec
            .to_topology()
            .map_err(|e| CpError::Rejected(format!("TomaTopology {name}: {e}")))?;
        check_adjacent(&cur, &topology)
            .map_err(|v| CpError::Rejected(format!("volume {id}: {v}")))?;
        let spec = TomaTopologySpec::from_topology(&obj.spec.volume, &topology, epoch);
        let version = match self.replace_spec(&obj, spec, id, expected).await {
            // The CEL rule on leaderEpoch fired: a newer leader wrote in between.
            Err(CpError::Rejected(m)) if m.contains("leaderEpoch") => {
                return Err(CpError::Deposed {
                    mine: epoch,
                    current: epoch.saturating_add(1),
                })
            }
            r => r?,
        };
        self.accepted
            .lock()
            .insert(name, Accepted { topology, epoch });
        Ok(version)
    }
}
