//! The CSI Controller service: volumes as `TomaVolume` + `TomaTopology`, placed by the
//! creator on distinct nodes by free capacity (`toma_core::allocate::choose_disks`).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use csi_proto::v1;
use csi_proto::v1::controller_server::Controller;
use toma_control::{grow_volume, ControlPlane, CpError, GrowError, VolumeRecord};
use toma_core::allocate::{choose_disks, Candidate};
use toma_core::topology::parse_uuid;
use toma_core::{Layout, Topology, VolumeId, VolumeSpec};
use tonic::{Request, Response, Status};
use tracing::info;

use crate::params::{expand_size, object_name, VolumeParams, FS_TYPES};
use crate::{cp_status, topology_segment, TOPOLOGY_KEY};

/// How long CreateVolume waits for every member's agent to host its extent.
pub const PLACE_TIMEOUT: Duration = Duration::from_secs(60);
/// How long one ControllerExpandVolume waits for every member's extent to grow before it
/// answers `Unavailable` (the growth stays pending; the retry resumes it).
pub const EXPAND_TIMEOUT: Duration = Duration::from_secs(60);

pub struct ControllerService {
    pub cp: Arc<dyn ControlPlane>,
    /// The value of [`TOPOLOGY_KEY`] this cluster's nodes report.
    pub cluster: String,
}

/// Checks the capabilities a volume is asked to support: single-node access modes, mount
/// (ext4/xfs or unspecified) or block.
pub fn check_capabilities(caps: &[v1::VolumeCapability]) -> Result<(), String> {
    use v1::volume_capability::access_mode::Mode;
    use v1::volume_capability::AccessType;
    if caps.is_empty() {
        return Err("volume_capabilities: missing".into());
    }
    for (i, c) in caps.iter().enumerate() {
        let mode = c
            .access_mode
            .as_ref()
            .ok_or_else(|| format!("volume_capabilities[{i}].access_mode: missing"))?
            .mode();
        match mode {
            Mode::SingleNodeWriter
            | Mode::SingleNodeReaderOnly
            | Mode::SingleNodeSingleWriter
            | Mode::SingleNodeMultiWriter => {}
            other => {
                return Err(format!(
                    "volume_capabilities[{i}].access_mode = {}: Toma volumes attach to one node at a time",
                    other.as_str_name()
                ))
            }
        }
        match &c.access_type {
            Some(AccessType::Block(_)) => {}
            Some(AccessType::Mount(m)) => {
                if !m.fs_type.is_empty() && !FS_TYPES.contains(&m.fs_type.as_str()) {
                    return Err(format!(
                        "volume_capabilities[{i}].mount.fs_type = {:?}: must be one of {}",
                        m.fs_type,
                        FS_TYPES.join(", ")
                    ));
                }
            }
            None => return Err(format!("volume_capabilities[{i}].access_type: missing")),
        }
    }
    Ok(())
}

/// The volume id CSI sees: the Toma volume's UUID.
pub fn parse_volume_id(s: &str) -> Option<VolumeId> {
    parse_uuid(s).map(VolumeId)
}

fn random_u128() -> Result<u128, Status> {
    let mut b = [0u8; 16];
    getrandom::fill(&mut b).map_err(|e| Status::internal(format!("random source: {e}")))?;
    Ok(u128::from_le_bytes(b))
}

impl ControllerService {
    async fn find_by_name(&self, name: &str) -> Result<Option<VolumeRecord>, Status> {
        Ok(self
            .cp
            .volumes()
            .await
            .map_err(cp_status)?
            .into_iter()
            .map(|v| v.value)
            .find(|v| v.name == name))
    }

    fn volume_of(&self, rec: &VolumeRecord, fs_type: Option<&str>) -> v1::Volume {
        let mut ctx = HashMap::from([
            ("raid".to_string(), rec.spec.layout.to_string()),
            ("chunkSize".to_string(), rec.spec.chunk_size.to_string()),
            ("name".to_string(), rec.name.clone()),
        ]);
        if let Some(f) = fs_type {
            ctx.insert("fsType".into(), f.into());
        }
        v1::Volume {
            capacity_bytes: i64::try_from(rec.spec.size).unwrap_or(i64::MAX),
            volume_id: rec.id.to_string(),
            volume_context: ctx,
            content_source: None,
            accessible_topology: vec![topology_segment(&self.cluster)],
        }
    }

    /// Candidates for new members: healthy disks of nodes that report an endpoint.
    async fn candidates(&self) -> Result<Vec<Candidate>, Status> {
        let nodes = self.cp.nodes().await.map_err(cp_status)?;
        Ok(self
            .cp
            .disks()
            .await
            .map_err(cp_status)?
            .into_iter()
            .filter(|d| d.healthy && nodes.iter().any(|n| n.node == d.node))
            .map(|d| Candidate {
                disk: d.disk,
                node: d.node,
                free: d.free,
            })
            .collect())
    }

    /// Waits until every member's agent reports the volume (its extent is allocated).
    async fn wait_placed(&self, rec: &VolumeRecord) -> Result<(), Status> {
        let mut changes = self.cp.changes();
        let deadline = tokio::time::Instant::now() + PLACE_TIMEOUT;
        loop {
            let st = self.cp.member_statuses(rec.id).await.map_err(cp_status)?;
            let missing: Vec<String> = rec
                .topology
                .members
                .iter()
                .filter(|m| !st.iter().any(|s| s.disk == m.disk))
                .map(|m| format!("{}/{}", m.node, toma_core::topology::short_disk(m.disk)))
                .collect();
            if missing.is_empty() {
                return Ok(());
            }
            let left = deadline.saturating_duration_since(tokio::time::Instant::now());
            if left.is_zero() {
                return Err(Status::deadline_exceeded(format!(
                    "volume {} created, but after {PLACE_TIMEOUT:?} these members' agents have not reported it yet: {}",
                    rec.name,
                    missing.join(", ")
                )));
            }
            // Member reports are status writes; poll as well as waking on watches.
            let _ =
                tokio::time::timeout(left.min(Duration::from_millis(250)), changes.changed()).await;
        }
    }

    fn wanted_segment_ok(&self, req: &v1::CreateVolumeRequest) -> bool {
        let Some(t) = &req.accessibility_requirements else {
            return true;
        };
        if t.requisite.is_empty() {
            return true;
        }
        t.requisite.iter().any(|seg| {
            seg.segments
                .get(TOPOLOGY_KEY)
                .is_some_and(|v| *v == self.cluster)
        })
    }
}

#[tonic::async_trait]
impl Controller for ControllerService {
    async fn create_volume(
        &self,
        request: Request<v1::CreateVolumeRequest>,
    ) -> Result<Response<v1::CreateVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.name.is_empty() {
            return Err(Status::invalid_argument("name: missing"));
        }
        check_capabilities(&req.volume_capabilities).map_err(Status::invalid_argument)?;
        if req.volume_content_source.is_some() {
            return Err(Status::invalid_argument(
                "volume_content_source: Toma volumes cannot be created from a snapshot or another volume",
            ));
        }
        let params = VolumeParams::parse(&req.parameters).map_err(Status::invalid_argument)?;
        let range = req.capacity_range.unwrap_or_default();
        let spec = params
            .spec_for(range.required_bytes, range.limit_bytes)
            .map_err(Status::out_of_range)?;
        if !self.wanted_segment_ok(&req) {
            return Err(Status::resource_exhausted(format!(
                "accessibility_requirements: no requisite segment has {TOPOLOGY_KEY}={}",
                self.cluster
            )));
        }
        let name = object_name(&req.name);
        let fs = params.fs_type.as_deref();
        if let Some(rec) = self.find_by_name(&name).await? {
            return self.existing(rec, &params, &range, fs).await;
        }
        let layout = params.layout;
        let candidates = self.candidates().await?;
        check_failure_domains(&candidates, layout).map_err(Status::resource_exhausted)?;
        let chosen = choose_disks(
            &candidates,
            layout,
            spec.member_bytes(),
            layout.members(),
            &[],
        )
        .map_err(|e| Status::resource_exhausted(e.to_string()))?;
        let id = VolumeId(random_u128()?);
        let topology = Topology::new_normal(id, layout, u64::from(params.chunk_size), chosen)
            .map_err(|e| Status::internal(e.to_string()))?;
        let mut secret = [0u8; 32];
        getrandom::fill(&mut secret)
            .map_err(|e| Status::internal(format!("random source: {e}")))?;
        let rec = VolumeRecord {
            id,
            name: name.clone(),
            spec,
            secret,
            topology,
            growing_to: None,
        };
        match self.cp.create_volume(rec.clone()).await {
            Ok(_) => {}
            // A concurrent CreateVolume of the same name won.
            Err(CpError::Exists(_)) => {
                if let Some(rec) = self.find_by_name(&name).await? {
                    return self.existing(rec, &params, &range, fs).await;
                }
                return Err(Status::aborted(format!(
                    "volume {name} is being created by another call; retry"
                )));
            }
            Err(e) => return Err(cp_status(e)),
        }
        info!(csi_name = %req.name, volume = %name, id = %id, layout = %layout, size = spec.size, "volume created");
        self.wait_placed(&rec).await?;
        Ok(Response::new(v1::CreateVolumeResponse {
            volume: Some(self.volume_of(&rec, fs)),
        }))
    }

    async fn delete_volume(
        &self,
        request: Request<v1::DeleteVolumeRequest>,
    ) -> Result<Response<v1::DeleteVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        // An id that is not ours names no volume: deleting it succeeds (idempotent).
        let Some(id) = parse_volume_id(&req.volume_id) else {
            return Ok(Response::new(v1::DeleteVolumeResponse {}));
        };
        // Attachments are not checked: the agents' own clients (rebuilds) attach too, and
        // the CO unstages a volume everywhere before it deletes it.
        match self.cp.delete_volume(id).await {
            Ok(()) | Err(CpError::NoVolume(_)) => {}
            Err(e) => return Err(cp_status(e)),
        }
        info!(id = %id, "volume deleted");
        Ok(Response::new(v1::DeleteVolumeResponse {}))
    }

    async fn controller_publish_volume(
        &self,
        _: Request<v1::ControllerPublishVolumeRequest>,
    ) -> Result<Response<v1::ControllerPublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerPublishVolume: not needed (the node plugin attaches)",
        ))
    }

    async fn controller_unpublish_volume(
        &self,
        _: Request<v1::ControllerUnpublishVolumeRequest>,
    ) -> Result<Response<v1::ControllerUnpublishVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerUnpublishVolume: not needed (the node plugin attaches)",
        ))
    }

    async fn validate_volume_capabilities(
        &self,
        request: Request<v1::ValidateVolumeCapabilitiesRequest>,
    ) -> Result<Response<v1::ValidateVolumeCapabilitiesResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        if req.volume_capabilities.is_empty() {
            return Err(Status::invalid_argument("volume_capabilities: missing"));
        }
        let id = parse_volume_id(&req.volume_id).ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        if self.cp.volume(id).await.map_err(cp_status)?.is_none() {
            return Err(Status::not_found(format!("volume {id} does not exist")));
        }
        if let Err(why) = check_capabilities(&req.volume_capabilities) {
            return Ok(Response::new(v1::ValidateVolumeCapabilitiesResponse {
                confirmed: None,
                message: why,
            }));
        }
        Ok(Response::new(v1::ValidateVolumeCapabilitiesResponse {
            confirmed: Some(v1::validate_volume_capabilities_response::Confirmed {
                volume_context: req.volume_context,
                volume_capabilities: req.volume_capabilities,
                parameters: req.parameters,
                mutable_parameters: req.mutable_parameters,
            }),
            message: String::new(),
        }))
    }

    async fn list_volumes(
        &self,
        _: Request<v1::ListVolumesRequest>,
    ) -> Result<Response<v1::ListVolumesResponse>, Status> {
        Err(Status::unimplemented("ListVolumes: not advertised"))
    }

    async fn get_capacity(
        &self,
        request: Request<v1::GetCapacityRequest>,
    ) -> Result<Response<v1::GetCapacityResponse>, Status> {
        let req = request.into_inner();
        if !req.volume_capabilities.is_empty() {
            check_capabilities(&req.volume_capabilities).map_err(Status::invalid_argument)?;
        }
        let params = VolumeParams::parse(&req.parameters).map_err(Status::invalid_argument)?;
        let in_segment = req.accessible_topology.as_ref().is_none_or(|t| {
            t.segments
                .get(TOPOLOGY_KEY)
                .is_none_or(|v| *v == self.cluster)
        });
        let bytes = if in_segment {
            largest_volume(&self.candidates().await?, params.layout, params.chunk_size)
        } else {
            0
        };
        Ok(Response::new(v1::GetCapacityResponse {
            available_capacity: i64::try_from(bytes).unwrap_or(i64::MAX),
            maximum_volume_size: Some(i64::try_from(bytes).unwrap_or(i64::MAX)),
            minimum_volume_size: None,
        }))
    }

    async fn controller_get_capabilities(
        &self,
        _: Request<v1::ControllerGetCapabilitiesRequest>,
    ) -> Result<Response<v1::ControllerGetCapabilitiesResponse>, Status> {
        use v1::controller_service_capability::rpc::Type;
        let caps = [
            Type::CreateDeleteVolume,
            Type::GetCapacity,
            Type::ExpandVolume,
        ]
        .into_iter()
        .map(|t| v1::ControllerServiceCapability {
            r#type: Some(v1::controller_service_capability::Type::Rpc(
                v1::controller_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        Ok(Response::new(v1::ControllerGetCapabilitiesResponse {
            capabilities: caps,
        }))
    }

    async fn create_snapshot(
        &self,
        _: Request<v1::CreateSnapshotRequest>,
    ) -> Result<Response<v1::CreateSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots: not supported"))
    }

    async fn delete_snapshot(
        &self,
        _: Request<v1::DeleteSnapshotRequest>,
    ) -> Result<Response<v1::DeleteSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots: not supported"))
    }

    async fn list_snapshots(
        &self,
        _: Request<v1::ListSnapshotsRequest>,
    ) -> Result<Response<v1::ListSnapshotsResponse>, Status> {
        Err(Status::unimplemented("snapshots: not supported"))
    }

    async fn get_snapshot(
        &self,
        _: Request<v1::GetSnapshotRequest>,
    ) -> Result<Response<v1::GetSnapshotResponse>, Status> {
        Err(Status::unimplemented("snapshots: not supported"))
    }

    async fn controller_expand_volume(
        &self,
        request: Request<v1::ControllerExpandVolumeRequest>,
    ) -> Result<Response<v1::ControllerExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        let range = req
            .capacity_range
            .ok_or_else(|| Status::invalid_argument("capacity_range: missing"))?;
        if let Some(c) = &req.volume_capability {
            check_capabilities(std::slice::from_ref(c)).map_err(Status::invalid_argument)?;
        }
        let id = parse_volume_id(&req.volume_id).ok_or_else(|| {
            Status::not_found(format!("volume_id {:?}: no such volume", req.volume_id))
        })?;
        let rec = self
            .cp
            .volume(id)
            .await
            .map_err(cp_status)?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?
            .value;
        let size = expand_size(&rec.spec, range.required_bytes, range.limit_bytes)
            .map_err(|e| Status::out_of_range(format!("volume {}: {e}", rec.name)))?;
        let grown = grow_volume(self.cp.as_ref(), id, size, EXPAND_TIMEOUT)
            .await
            .map_err(|e| match e {
                GrowError::NoVolume(_) => Status::not_found(e.to_string()),
                GrowError::Invalid { .. } | GrowError::Refused { .. } => {
                    Status::out_of_range(e.to_string())
                }
                GrowError::Pending { .. } => Status::unavailable(e.to_string()),
                GrowError::ControlPlane(c) => cp_status(c),
            })?;
        if grown != rec.spec.size {
            info!(volume = %rec.name, from = rec.spec.size, to = grown, "volume expanded");
        }
        Ok(Response::new(v1::ControllerExpandVolumeResponse {
            capacity_bytes: i64::try_from(grown).unwrap_or(i64::MAX),
            // An attached volume's device (FUSE file, loop device) grows on its node, and
            // so does the file system of a mount volume: block volumes need it too.
            node_expansion_required: true,
        }))
    }

    async fn controller_get_volume(
        &self,
        _: Request<v1::ControllerGetVolumeRequest>,
    ) -> Result<Response<v1::ControllerGetVolumeResponse>, Status> {
        Err(Status::unimplemented("ControllerGetVolume: not advertised"))
    }

    async fn controller_list_volume_health(
        &self,
        _: Request<v1::ControllerListVolumeHealthRequest>,
    ) -> Result<Response<v1::ControllerListVolumeHealthResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerListVolumeHealth: not advertised",
        ))
    }

    async fn controller_get_volume_health(
        &self,
        _: Request<v1::ControllerGetVolumeHealthRequest>,
    ) -> Result<Response<v1::ControllerGetVolumeHealthResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerGetVolumeHealth: not advertised",
        ))
    }

    async fn controller_modify_volume(
        &self,
        _: Request<v1::ControllerModifyVolumeRequest>,
    ) -> Result<Response<v1::ControllerModifyVolumeResponse>, Status> {
        Err(Status::unimplemented(
            "ControllerModifyVolume: not advertised",
        ))
    }
}

impl ControllerService {
    /// CreateVolume of a name that exists: the same volume if compatible, else AlreadyExists.
    async fn existing(
        &self,
        rec: VolumeRecord,
        params: &VolumeParams,
        range: &v1::CapacityRange,
        fs: Option<&str>,
    ) -> Result<Response<v1::CreateVolumeResponse>, Status> {
        let size = rec.spec.size;
        let too_small = u64::try_from(range.required_bytes).is_ok_and(|r| size < r);
        let too_big =
            range.limit_bytes > 0 && u64::try_from(range.limit_bytes).is_ok_and(|l| size > l);
        if too_small
            || too_big
            || rec.spec.layout != params.layout
            || rec.spec.chunk_size != params.chunk_size
        {
            return Err(Status::already_exists(format!(
                "a volume named {} exists with {} chunk {} size {size}, incompatible with this request",
                rec.name, rec.spec.layout, rec.spec.chunk_size
            )));
        }
        self.wait_placed(&rec).await?;
        Ok(Response::new(v1::CreateVolumeResponse {
            volume: Some(self.volume_of(&rec, fs)),
        }))
    }
}

/// Refuses a layout with more members than there are failure domains (nodes with a
/// healthy disk): members go to distinct nodes, so no amount of free space would do. The
/// message names the parameter that sets the member count (`dataMembers` or `mirrors`).
pub fn check_failure_domains(cands: &[Candidate], layout: Layout) -> Result<(), String> {
    let mut nodes: Vec<&str> = cands.iter().map(|c| c.node.0.as_str()).collect();
    nodes.sort_unstable();
    nodes.dedup();
    let want = layout.members();
    if want <= nodes.len() {
        return Ok(());
    }
    let param = match layout {
        Layout::Raid1 { mirrors } => format!("mirrors = {mirrors}: {layout} needs {want} members"),
        Layout::Raid6 { data } => {
            format!("dataMembers = {data}: {layout} needs {want} members (dataMembers + P + Q)")
        }
    };
    let have = match nodes.len() {
        1 => "only 1 node has".to_string(),
        n => format!("only {n} nodes have"),
    };
    Err(format!(
        "{param} on distinct nodes (failure domains), but {have} a healthy disk"
    ))
}

/// The largest volume of `layout` that could be placed now: its members need one disk each
/// on distinct nodes, so the member size is the `members()`-th largest per-node free extent.
pub fn largest_volume(cands: &[Candidate], layout: Layout, chunk_size: u32) -> u64 {
    let mut per_node: HashMap<&str, u64> = HashMap::new();
    for c in cands {
        let e = per_node.entry(c.node.0.as_str()).or_default();
        *e = (*e).max(c.free);
    }
    let mut frees: Vec<u64> = per_node.into_values().collect();
    frees.sort_unstable_by(|a, b| b.cmp(a));
    let Some(&member) = frees.get(layout.members() - 1) else {
        return 0;
    };
    let chunks = member / u64::from(chunk_size);
    let bytes = chunks * u64::from(chunk_size) * layout.data_chunks_per_unit();
    // Sizes are multiples of 1 MiB as well (see `VolumeParams::spec_for`).
    let spec_ok = |b: u64| VolumeSpec::new(layout, u64::from(chunk_size), b).is_ok();
    let mut b = bytes - bytes % crate::params::SIZE_ALIGN;
    while b > 0 && !spec_ok(b) {
        b -= crate::params::SIZE_ALIGN;
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;
    use toma_core::DiskId;

    #[test]
    fn capacity_is_the_nth_largest_node() {
        let c = |d: u128, n: &str, free: u64| Candidate {
            disk: DiskId(d),
            node: n.into(),
            free,
        };
        let cands = [
            c(1, "a", 10 << 20),
            c(2, "a", 50 << 20),
            c(3, "b", 20 << 20),
            c(4, "c", 5 << 20),
        ];
        let r1 = Layout::raid1(2).unwrap();
        assert_eq!(largest_volume(&cands, r1, 65536), 20 << 20);
        let r1x3 = Layout::raid1(3).unwrap();
        assert_eq!(largest_volume(&cands, r1x3, 65536), 5 << 20);
        let r6 = Layout::raid6(2).unwrap();
        assert_eq!(largest_volume(&cands, r6, 65536), 0);
    }

    #[test]
    fn more_members_than_nodes_is_refused_naming_the_parameter() {
        let c = |d: u128, n: &str| Candidate {
            disk: DiskId(d),
            node: n.into(),
            free: 1 << 30,
        };
        // Two disks on node a: still three failure domains.
        let cands = [c(1, "a"), c(2, "a"), c(3, "b"), c(4, "c")];
        let e = check_failure_domains(&cands, Layout::raid6(4).unwrap()).unwrap_err();
        assert!(
            e.contains("dataMembers = 4") && e.contains("6 members") && e.contains("only 3 nodes"),
            "{e}"
        );
        assert!(check_failure_domains(&cands, Layout::raid6(2).unwrap())
            .unwrap_err()
            .contains("only 3 nodes"));
        assert!(check_failure_domains(&cands, Layout::raid1(3).unwrap()).is_ok());
        let e = check_failure_domains(&cands[..2], Layout::raid1(2).unwrap()).unwrap_err();
        assert!(
            e.contains("mirrors = 2") && e.contains("only 1 node has"),
            "{e}"
        );
        let six: Vec<Candidate> = (0..6).map(|i| c(i, &format!("n{i}"))).collect();
        assert!(check_failure_domains(&six, Layout::raid6(4).unwrap()).is_ok());
    }

    #[test]
    fn capabilities_are_checked() {
        use v1::volume_capability::access_mode::Mode;
        use v1::volume_capability::{AccessMode, AccessType, MountVolume};
        let cap = |mode: Mode, fs: &str| v1::VolumeCapability {
            access_mode: Some(AccessMode { mode: mode as i32 }),
            access_type: Some(AccessType::Mount(MountVolume {
                fs_type: fs.into(),
                ..Default::default()
            })),
        };
        assert!(check_capabilities(&[cap(Mode::SingleNodeWriter, "ext4")]).is_ok());
        assert!(check_capabilities(&[])
            .unwrap_err()
            .contains("volume_capabilities"));
        assert!(check_capabilities(&[cap(Mode::MultiNodeMultiWriter, "")])
            .unwrap_err()
            .contains("access_mode"));
        assert!(check_capabilities(&[cap(Mode::SingleNodeWriter, "zfs")])
            .unwrap_err()
            .contains("fs_type"));
    }
}
