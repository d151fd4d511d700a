//! The CSI Node service. NodeStage starts the volume's datapath process (see [`datapath`]),
//! puts a loop device on its FUSE-exported file, makes a file system if there is none and
//! mounts it at the staging path (filesystem volumes) or leaves the device for NodePublish
//! to bind (raw block). What is staged is recorded in `STATE/volumes/<id>/state.json`, so a
//! restarted node plugin finds it (the datapath processes keep running meanwhile).
//!
//! [`datapath`]: crate::datapath

use std::collections::HashMap;
use std::path::{Component, Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use csi_proto::v1;
use csi_proto::v1::node_server::Node;
use serde::{Deserialize, Serialize};
use toma_control::ControlPlane;
use toma_core::VolumeId;
use tonic::{Request, Response, Status};
use tracing::{info, warn};

use crate::controller::{check_capabilities, parse_volume_id};
use crate::datapath::FILE_NAME;
use crate::mounts;
use crate::{cp_status, topology_segment};

/// Annotation on a `TomaVolume`: the file system its first NodeStage made.
pub const FS_ANNOTATION: &str = "toma.io/filesystem";

/// How long NodeStage waits for a datapath process to export its volume.
pub const DATAPATH_START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long NodeUnstage waits for a datapath process to flush, detach and exit.
pub const DATAPATH_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// How long NodeExpandVolume waits for the datapath process to export the grown size.
pub const DATAPATH_GROW_TIMEOUT: Duration = Duration::from_secs(30);

/// What NodeStage set up for one volume.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Staged {
    pub volume_id: String,
    pub staging_path: PathBuf,
    pub block: bool,
    pub fs_type: Option<String>,
    pub loop_dev: Option<PathBuf>,
    pub pid: u32,
}

pub struct NodeService {
    pub cp: Arc<dyn ControlPlane>,
    /// For the `toma.io/filesystem` annotation on `TomaVolume`s.
    pub client: kube::Client,
    pub node_id: String,
    pub cluster: String,
    pub state_dir: PathBuf,
    /// Staging and target paths must lie under one of these (kubelet's directory).
    pub allowed_roots: Vec<PathBuf>,
    /// This binary, started as `datapath` for each staged volume.
    pub exe: PathBuf,
    pub kubeconfig: Option<PathBuf>,
    pub namespace: String,
    locks: parking_lot::Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>,
}

/// A path as given, checked: absolute, no `..`, under one of `roots`.
pub fn check_path(what: &str, p: &str, roots: &[PathBuf]) -> Result<PathBuf, Status> {
    if p.is_empty() {
        return Err(Status::invalid_argument(format!("{what}: missing")));
    }
    let path = PathBuf::from(p);
    if !path.is_absolute() || path.components().any(|c| c == Component::ParentDir) {
        return Err(Status::invalid_argument(format!(
            "{what} = {p:?}: must be an absolute path without '..'"
        )));
    }
    if !roots.iter().any(|r| path.starts_with(r) && path != *r) {
        let list: Vec<String> = roots.iter().map(|r| r.display().to_string()).collect();
        return Err(Status::invalid_argument(format!(
            "{what} = {p:?}: outside the directories this plugin manages ({})",
            list.join(", ")
        )));
    }
    Ok(path)
}

fn is_block(cap: &v1::VolumeCapability) -> bool {
    matches!(
        cap.access_type,
        Some(v1::volume_capability::AccessType::Block(_))
    )
}

/// Process `pid` is the datapath of `volume` (`toma-csi datapath --volume-id <volume> ...`).
fn alive(pid: u32, volume: &str) -> bool {
    std::fs::read(format!("/proc/{pid}/cmdline")).is_ok_and(|c| {
        let args: Vec<&[u8]> = c.split(|b| *b == 0).collect();
        args.get(1) == Some(&b"datapath".as_slice()) && args.contains(&volume.as_bytes())
    })
}

fn log_tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    if lines.is_empty() {
        return format!("{} is empty", path.display());
    }
    lines[lines.len().saturating_sub(5)..].join(" | ")
}

impl NodeService {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cp: Arc<dyn ControlPlane>,
        client: kube::Client,
        node_id: String,
        cluster: String,
        state_dir: PathBuf,
        allowed_roots: Vec<PathBuf>,
        exe: PathBuf,
        kubeconfig: Option<PathBuf>,
        namespace: String,
    ) -> NodeService {
        NodeService {
            cp,
            client,
            node_id,
            cluster,
            state_dir,
            allowed_roots,
            exe,
            kubeconfig,
            namespace,
            locks: parking_lot::Mutex::new(HashMap::new()),
        }
    }

    fn lock(&self, volume: &str) -> Arc<tokio::sync::Mutex<()>> {
        self.locks
            .lock()
            .entry(volume.to_string())
            .or_default()
            .clone()
    }

    fn vol_dir(&self, id: VolumeId) -> PathBuf {
        self.state_dir.join("volumes").join(id.to_string())
    }

    fn load(&self, id: VolumeId) -> Option<Staged> {
        let p = self.vol_dir(id).join("state.json");
        let text = std::fs::read_to_string(p).ok()?;
        serde_json::from_str(&text).ok()
    }

    fn save(&self, s: &Staged, id: VolumeId) -> Result<(), Status> {
        let p = self.vol_dir(id).join("state.json");
        let tmp = p.with_extension("tmp");
        let text = serde_json::to_string_pretty(s).map_err(|e| Status::internal(e.to_string()))?;
        std::fs::write(&tmp, text)
            .and_then(|_| std::fs::rename(&tmp, &p))
            .map_err(|e| Status::internal(format!("{}: {e}", p.display())))
    }

    /// Readiness for the Identity probe: `None` when ready.
    pub fn not_ready(&self) -> Option<String> {
        if !Path::new("/dev/fuse").exists() {
            return Some("/dev/fuse is missing".into());
        }
        let probe = self.state_dir.join(".probe");
        if let Err(e) = std::fs::write(&probe, b"ok") {
            return Some(format!("state dir {}: {e}", self.state_dir.display()));
        }
        None
    }

    /// Starts the datapath process and puts a loop device on its file. Every frontend
    /// tried and why it failed is in the error.
    fn attach_frontend(&self, id: VolumeId, dir: &Path) -> Result<(u32, PathBuf), String> {
        let mut notes = Vec::new();
        // ublk and NBD need kernel modules these nodes may lack; this build has neither
        // frontend, so they are reported and the FUSE + loop frontend is used.
        for (name, dev, module) in [
            ("ublk", "/dev/ublk-control", "ublk_drv"),
            ("nbd", "/dev/nbd0", "nbd"),
        ] {
            if Path::new(dev).exists() {
                notes.push(format!(
                    "{name}: {dev} exists, but this build has no {name} frontend"
                ));
            } else {
                notes.push(format!(
                    "{name}: no {dev} (kernel module {module} not loaded)"
                ));
            }
        }
        match self.fuse_loop(id, dir) {
            Ok(r) => Ok(r),
            Err(e) => {
                notes.push(format!("fuse+loop: {e}"));
                Err(format!(
                    "no block frontend could be created: {}",
                    notes.join("; ")
                ))
            }
        }
    }

    fn fuse_loop(&self, id: VolumeId, dir: &Path) -> Result<(u32, PathBuf), String> {
        if !Path::new("/dev/fuse").exists() {
            return Err("/dev/fuse is missing (no FUSE in this kernel or container)".into());
        }
        let fuse_dir = dir.join("fuse");
        // A datapath of an earlier stage that did not finish: its mount is stale.
        if mounts::is_mounted(&fuse_dir) {
            let _ = mounts::run("umount", &["-l", &fuse_dir.to_string_lossy()]);
        }
        let _ = std::fs::remove_file(dir.join("ready"));
        let log_path = dir.join("datapath.log");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log_path)
            .map_err(|e| format!("{}: {e}", log_path.display()))?;
        let log2 = log.try_clone().map_err(|e| e.to_string())?;
        let mut cmd = Command::new(&self.exe);
        cmd.arg("datapath")
            .arg("--volume-id")
            .arg(id.to_string())
            .arg("--dir")
            .arg(dir)
            .arg("--node-id")
            .arg(&self.node_id)
            .arg("--namespace")
            .arg(&self.namespace);
        if let Some(k) = &self.kubeconfig {
            cmd.arg("--kubeconfig").arg(k);
        }
        {
            use std::os::unix::process::CommandExt;
            // Its own process group: signals to the plugin's group do not reach it.
            cmd.process_group(0);
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log2)
            .spawn()
            .map_err(|e| format!("starting {} datapath: {e}", self.exe.display()))?;
        let pid = child.id();
        // Reap it whenever it exits (the plugin may be long gone by then: then init does).
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let _ = tx.send(child.wait());
        });
        let deadline = std::time::Instant::now() + DATAPATH_START_TIMEOUT;
        let file = fuse_dir.join(FILE_NAME);
        loop {
            if dir.join("ready").exists() {
                break;
            }
            if let Ok(st) = rx.try_recv() {
                return Err(format!(
                    "the datapath process exited ({}) before exporting the volume: {}",
                    st.map(|s| s.to_string()).unwrap_or_else(|e| e.to_string()),
                    log_tail(&log_path)
                ));
            }
            if std::time::Instant::now() > deadline {
                self.stop_datapath(pid, id, dir);
                return Err(format!(
                    "the datapath process did not export the volume within {DATAPATH_START_TIMEOUT:?}: {}",
                    log_tail(&log_path)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        match mounts::loop_attach(&file) {
            Ok(dev) => Ok((pid, dev)),
            Err(e) => {
                self.stop_datapath(pid, id, dir);
                Err(format!("loop device on {}: {e}", file.display()))
            }
        }
    }

    /// SIGTERM, wait, SIGKILL; then make sure the FUSE mount is gone.
    fn stop_datapath(&self, pid: u32, id: VolumeId, dir: &Path) -> bool {
        let vol = id.to_string();
        let mut clean = true;
        if alive(pid, &vol) {
            let p = rustix::process::Pid::from_raw(pid as i32);
            if let Some(p) = p {
                let _ = rustix::process::kill_process(p, rustix::process::Signal::TERM);
            }
            let deadline = std::time::Instant::now() + DATAPATH_STOP_TIMEOUT;
            while alive(pid, &vol) && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(50));
            }
            if alive(pid, &vol) {
                warn!(pid, volume = %vol, "datapath did not stop; killing it");
                clean = false;
                if let Some(p) = p {
                    let _ = rustix::process::kill_process(p, rustix::process::Signal::KILL);
                }
            }
        }
        let fuse_dir = dir.join("fuse");
        if mounts::is_mounted(&fuse_dir) {
            clean = false;
            let _ = mounts::run("umount", &["-l", &fuse_dir.to_string_lossy()]);
        }
        clean
    }

    /// Stages volume `id`. `formatted`: the file system its first stage made (the
    /// `toma.io/filesystem` annotation), `None` if it never had one: then a file system is
    /// made whatever the device holds (a new volume's extents are not zeroed: they may hold
    /// an earlier volume's bytes), and the caller records it.
    fn stage(
        &self,
        id: VolumeId,
        staging: &Path,
        cap: &v1::VolumeCapability,
        ctx: &HashMap<String, String>,
        formatted: Option<&str>,
    ) -> Result<Option<String>, Status> {
        let block = is_block(cap);
        let fs = match &cap.access_type {
            Some(v1::volume_capability::AccessType::Mount(m)) if !m.fs_type.is_empty() => {
                Some(m.fs_type.clone())
            }
            Some(v1::volume_capability::AccessType::Mount(_)) => {
                Some(ctx.get("fsType").cloned().unwrap_or_else(|| "ext4".into()))
            }
            _ => None,
        };
        let dir = self.vol_dir(id);
        std::fs::create_dir_all(&dir)
            .map_err(|e| Status::internal(format!("{}: {e}", dir.display())))?;
        let (pid, dev) = self.attach_frontend(id, &dir).map_err(|e| {
            // Nothing was staged: leave nothing behind (the log's tail is in the message).
            let _ = std::fs::remove_dir_all(&dir);
            Status::failed_precondition(e)
        })?;
        let st = Staged {
            volume_id: id.to_string(),
            staging_path: staging.to_path_buf(),
            block,
            fs_type: fs.clone(),
            loop_dev: Some(dev.clone()),
            pid,
        };
        self.save(&st, id)?;
        let undo = |why: String| {
            let _ = self.unstage_state(id, &st);
            Status::internal(why)
        };
        let mut made = None;
        if let Some(fs) = fs.clone() {
            match formatted {
                None => {
                    let stripe = mounts::Stripe::from_context(
                        ctx.get("raid").map(String::as_str),
                        ctx.get("chunkSize").map(String::as_str),
                    );
                    mounts::mkfs(&fs, &dev, stripe).map_err(undo)?;
                    made = Some(fs.clone());
                }
                Some(f) if f == fs => {
                    let have = mounts::fs_type(&dev).map_err(undo)?;
                    if have.as_deref() != Some(f) {
                        let _ = self.unstage_state(id, &st);
                        return Err(Status::data_loss(format!(
                            "volume {id} was formatted {f}, but its device now shows {}; not mounting it (nothing was changed)",
                            have.as_deref().unwrap_or("no file system")
                        )));
                    }
                }
                Some(f) => {
                    let _ = self.unstage_state(id, &st);
                    return Err(Status::failed_precondition(format!(
                        "volume {id} holds a {f} file system; asked to mount it as {fs} (nothing was changed)"
                    )));
                }
            }
            // The volume may have grown while it was not staged: an ext4 grows now, before
            // it is mounted (no online resize needed); an xfs grows once mounted.
            if made.is_none() && mounts::grow_unmounted(&fs, &dev).map_err(undo)? {
                info!(volume = %id, fs = %fs, "file system grown to the volume's size");
            }
            std::fs::create_dir_all(staging)
                .map_err(|e| undo(format!("{}: {e}", staging.display())))?;
            let mut args = vec!["-t".to_string(), fs.clone()];
            if let Some(v1::volume_capability::AccessType::Mount(m)) = &cap.access_type {
                if !m.mount_flags.is_empty() {
                    args.push("-o".into());
                    args.push(m.mount_flags.join(","));
                }
            }
            args.push(dev.to_string_lossy().into_owned());
            args.push(staging.to_string_lossy().into_owned());
            let a: Vec<&str> = args.iter().map(String::as_str).collect();
            mounts::run("mount", &a).map_err(undo)?;
            if made.is_none() && fs == "xfs" {
                mounts::grow_fs(&fs, &dev, staging).map_err(undo)?;
            }
        }
        info!(volume = %id, staging = %staging.display(), dev = %dev.display(), pid, block, "volume staged");
        Ok(made)
    }

    /// Makes a staged volume's device (and file system) `size` bytes, the volume's committed
    /// size: the datapath process exports the new size (SIGUSR1), the loop device takes it
    /// (`losetup -c`), and a mounted file system grows online. Each step is idempotent.
    /// Returns the device's size. Blocking.
    fn grow_attached(&self, id: VolumeId, st: &Staged, size: u64) -> Result<u64, String> {
        let vol = id.to_string();
        if !alive(st.pid, &vol) {
            return Err(format!(
                "volume {id}: its datapath process ({}) is not running; unstage and stage it again",
                st.pid
            ));
        }
        let dev = st
            .loop_dev
            .clone()
            .ok_or_else(|| format!("volume {id}: no loop device recorded"))?;
        let file = self.vol_dir(id).join("fuse").join(FILE_NAME);
        let file_size = || std::fs::metadata(&file).map(|m| m.len()).unwrap_or(0);
        if file_size() < size {
            let p = rustix::process::Pid::from_raw(st.pid as i32)
                .ok_or_else(|| format!("volume {id}: bad pid {}", st.pid))?;
            rustix::process::kill_process(p, rustix::process::Signal::USR1)
                .map_err(|e| format!("volume {id}: signalling its datapath: {e}"))?;
            // The kernel refreshes the file's size when its attributes expire (1 s).
            let deadline = std::time::Instant::now() + DATAPATH_GROW_TIMEOUT;
            while file_size() < size {
                if std::time::Instant::now() > deadline {
                    return Err(format!(
                        "volume {id}: the datapath still exports {} of {size} bytes after {DATAPATH_GROW_TIMEOUT:?}: {}",
                        file_size(),
                        log_tail(&self.vol_dir(id).join("datapath.log"))
                    ));
                }
                std::thread::sleep(Duration::from_millis(100));
            }
        }
        if mounts::block_size_of(&dev).unwrap_or(0) < size {
            mounts::loop_set_capacity(&dev)?;
        }
        let dev_size = mounts::block_size_of(&dev).unwrap_or(0);
        if dev_size < size {
            return Err(format!(
                "volume {id}: {} is {dev_size} bytes after losetup -c, not {size}",
                dev.display()
            ));
        }
        if let (false, Some(fs)) = (st.block, st.fs_type.as_deref()) {
            mounts::grow_fs(fs, &dev, &st.staging_path)?;
        }
        info!(volume = %id, size, dev = %dev.display(), block = st.block, "volume grown on the node");
        Ok(dev_size)
    }

    /// Undoes a stage: unmount, loop device, datapath, state. `Err` names what was left.
    fn unstage_state(&self, id: VolumeId, st: &Staged) -> Result<(), String> {
        if !st.block {
            mounts::umount_all(&st.staging_path)?;
        }
        let dir = self.vol_dir(id);
        let file = dir.join("fuse").join(FILE_NAME);
        let dev = st.loop_dev.clone().or_else(|| mounts::loop_of(&file));
        if let Some(dev) = dev {
            if mounts::loop_of(&file).as_ref() == Some(&dev) {
                mounts::loop_detach(&dev)?;
            }
        }
        // The loop device lets go of the file asynchronously.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while mounts::loop_of(&file).is_some() && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let clean = self.stop_datapath(st.pid, id, &dir);
        if clean {
            let _ = std::fs::remove_dir_all(&dir);
            Ok(())
        } else {
            // Keep its log; the state goes (nothing is staged any more).
            let _ = std::fs::remove_file(dir.join("state.json"));
            Err(format!(
                "volume {id}: the datapath did not stop cleanly and was killed; its log: {}",
                dir.join("datapath.log").display()
            ))
        }
    }
}

fn ok<T>(t: T) -> Result<Response<T>, Status> {
    Ok(Response::new(t))
}

#[tonic::async_trait]
impl Node for NodeService {
    async fn node_stage_volume(
        &self,
        request: Request<v1::NodeStageVolumeRequest>,
    ) -> Result<Response<v1::NodeStageVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        let staging = check_path(
            "staging_target_path",
            &req.staging_target_path,
            &self.allowed_roots,
        )?;
        let cap = req
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume_capability: missing"))?;
        check_capabilities(std::slice::from_ref(&cap)).map_err(Status::invalid_argument)?;
        let id = parse_volume_id(&req.volume_id).ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let lock = self.lock(&req.volume_id);
        let _g = lock.lock().await;
        if let Some(st) = self.load(id) {
            if st.staging_path == staging
                && st.block == is_block(&cap)
                && alive(st.pid, &st.volume_id)
            {
                if st.block || mounts::is_mounted(&staging) {
                    return ok(v1::NodeStageVolumeResponse {});
                }
            } else if st.staging_path != staging || st.block != is_block(&cap) {
                return Err(Status::already_exists(format!(
                    "volume {id} is already staged at {} ({})",
                    st.staging_path.display(),
                    if st.block { "block" } else { "mount" }
                )));
            }
            // Half staged (a crash in between): undo, then stage again.
            let st2 = st.clone();
            let svc_res = tokio::task::block_in_place(|| self.unstage_state(id, &st2));
            if let Err(e) = svc_res {
                warn!(volume = %id, error = %e, "cleaning up an earlier stage");
            }
        }
        let rec = self
            .cp
            .volume(id)
            .await
            .map_err(cp_status)?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?;
        let vols: kube::Api<toma_crds::TomaVolume> = kube::Api::all(self.client.clone());
        let obj = vols
            .get(&rec.value.name)
            .await
            .map_err(|e| Status::unavailable(format!("TomaVolume {}: {e}", rec.value.name)))?;
        let formatted = obj
            .metadata
            .annotations
            .as_ref()
            .and_then(|a| a.get(FS_ANNOTATION))
            .cloned();
        let made = tokio::task::block_in_place(|| {
            self.stage(
                id,
                &staging,
                &cap,
                &req.volume_context,
                formatted.as_deref(),
            )
        })?;
        if let Some(fs) = made {
            let patch = serde_json::json!({"metadata": {"annotations": {FS_ANNOTATION: fs}}});
            if let Err(e) = vols
                .patch(
                    &rec.value.name,
                    &kube::api::PatchParams::default(),
                    &kube::api::Patch::Merge(patch),
                )
                .await
            {
                // Without the record a later stage would format it again: undo this one.
                let st = self.load(id);
                if let Some(st) = st {
                    let _ = tokio::task::block_in_place(|| self.unstage_state(id, &st));
                }
                return Err(Status::unavailable(format!(
                    "TomaVolume {}: recording its file system: {e}",
                    rec.value.name
                )));
            }
        }
        ok(v1::NodeStageVolumeResponse {})
    }

    async fn node_unstage_volume(
        &self,
        request: Request<v1::NodeUnstageVolumeRequest>,
    ) -> Result<Response<v1::NodeUnstageVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        let staging = check_path(
            "staging_target_path",
            &req.staging_target_path,
            &self.allowed_roots,
        )?;
        let Some(id) = parse_volume_id(&req.volume_id) else {
            return ok(v1::NodeUnstageVolumeResponse {});
        };
        let lock = self.lock(&req.volume_id);
        let _g = lock.lock().await;
        let Some(st) = self.load(id) else {
            // Not staged here (or already unstaged): nothing to do.
            return ok(v1::NodeUnstageVolumeResponse {});
        };
        if st.staging_path != staging {
            return Err(Status::not_found(format!(
                "volume {id} is staged at {}, not at {}",
                st.staging_path.display(),
                staging.display()
            )));
        }
        tokio::task::block_in_place(|| self.unstage_state(id, &st)).map_err(Status::internal)?;
        info!(volume = %id, "volume unstaged");
        ok(v1::NodeUnstageVolumeResponse {})
    }

    async fn node_publish_volume(
        &self,
        request: Request<v1::NodePublishVolumeRequest>,
    ) -> Result<Response<v1::NodePublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        let staging = check_path(
            "staging_target_path",
            &req.staging_target_path,
            &self.allowed_roots,
        )?;
        let target = check_path("target_path", &req.target_path, &self.allowed_roots)?;
        let cap = req
            .volume_capability
            .ok_or_else(|| Status::invalid_argument("volume_capability: missing"))?;
        check_capabilities(std::slice::from_ref(&cap)).map_err(Status::invalid_argument)?;
        let id = parse_volume_id(&req.volume_id).ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let lock = self.lock(&req.volume_id);
        let _g = lock.lock().await;
        let Some(st) = self.load(id) else {
            if self.cp.volume(id).await.map_err(cp_status)?.is_none() {
                return Err(Status::not_found(format!("volume {id} does not exist")));
            }
            return Err(Status::failed_precondition(format!(
                "volume {id} is not staged on this node"
            )));
        };
        if st.staging_path != staging {
            return Err(Status::failed_precondition(format!(
                "volume {id} is staged at {}, not at {}",
                st.staging_path.display(),
                staging.display()
            )));
        }
        if st.block != is_block(&cap) {
            return Err(Status::invalid_argument(format!(
                "volume_capability: volume {id} was staged as {}",
                if st.block { "block" } else { "mount" }
            )));
        }
        if mounts::is_mounted(&target) {
            return ok(v1::NodePublishVolumeResponse {});
        }
        let source = if st.block {
            let dev = st
                .loop_dev
                .clone()
                .ok_or_else(|| Status::internal(format!("volume {id}: no device recorded")))?;
            if let Some(parent) = target.parent() {
                std::fs::create_dir_all(parent)
                    .map_err(|e| Status::internal(format!("{}: {e}", parent.display())))?;
            }
            if !target.exists() {
                std::fs::write(&target, b"")
                    .map_err(|e| Status::internal(format!("{}: {e}", target.display())))?;
            }
            dev
        } else {
            std::fs::create_dir_all(&target)
                .map_err(|e| Status::internal(format!("{}: {e}", target.display())))?;
            staging.clone()
        };
        let (s, t) = (source.to_string_lossy(), target.to_string_lossy());
        mounts::run("mount", &["--bind", &s, &t]).map_err(Status::internal)?;
        if req.readonly {
            if let Err(e) = mounts::run("mount", &["-o", "remount,bind,ro", &t]) {
                let _ = mounts::umount_all(&target);
                return Err(Status::internal(e));
            }
        }
        info!(volume = %id, target = %t, readonly = req.readonly, "volume published");
        ok(v1::NodePublishVolumeResponse {})
    }

    async fn node_unpublish_volume(
        &self,
        request: Request<v1::NodeUnpublishVolumeRequest>,
    ) -> Result<Response<v1::NodeUnpublishVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        let target = check_path("target_path", &req.target_path, &self.allowed_roots)?;
        let lock = self.lock(&req.volume_id);
        let _g = lock.lock().await;
        mounts::umount_all(&target).map_err(Status::internal)?;
        match std::fs::symlink_metadata(&target) {
            Ok(m) if m.is_dir() => std::fs::remove_dir(&target),
            Ok(_) => std::fs::remove_file(&target),
            Err(_) => Ok(()),
        }
        .map_err(|e| Status::internal(format!("{}: {e}", target.display())))?;
        ok(v1::NodeUnpublishVolumeResponse {})
    }

    async fn node_get_volume_stats(
        &self,
        request: Request<v1::NodeGetVolumeStatsRequest>,
    ) -> Result<Response<v1::NodeGetVolumeStatsResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        if req.volume_path.is_empty() {
            return Err(Status::invalid_argument("volume_path: missing"));
        }
        let id = parse_volume_id(&req.volume_id).ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let st = self
            .load(id)
            .ok_or_else(|| Status::not_found(format!("volume {id} is not staged on this node")))?;
        let path = PathBuf::from(&req.volume_path);
        if !path.exists() {
            return Err(Status::not_found(format!(
                "volume_path {}: does not exist",
                path.display()
            )));
        }
        use v1::volume_usage::Unit;
        let usage = if st.block {
            let total = st
                .loop_dev
                .as_deref()
                .and_then(mounts::block_size_of)
                .unwrap_or(0);
            vec![v1::VolumeUsage {
                available: 0,
                total: i64::try_from(total).unwrap_or(i64::MAX),
                used: 0,
                unit: Unit::Bytes as i32,
            }]
        } else {
            let s = rustix::fs::statvfs(&path)
                .map_err(|e| Status::internal(format!("statvfs {}: {e}", path.display())))?;
            let f = s.f_frsize;
            let i = |v: u64| i64::try_from(v).unwrap_or(i64::MAX);
            vec![
                v1::VolumeUsage {
                    available: i(s.f_bavail * f),
                    total: i(s.f_blocks * f),
                    used: i((s.f_blocks - s.f_bfree) * f),
                    unit: Unit::Bytes as i32,
                },
                v1::VolumeUsage {
                    available: i(s.f_favail),
                    total: i(s.f_files),
                    used: i(s.f_files - s.f_ffree),
                    unit: Unit::Inodes as i32,
                },
            ]
        };
        ok(v1::NodeGetVolumeStatsResponse { usage })
    }

    async fn node_expand_volume(
        &self,
        request: Request<v1::NodeExpandVolumeRequest>,
    ) -> Result<Response<v1::NodeExpandVolumeResponse>, Status> {
        let req = request.into_inner();
        if req.volume_id.is_empty() {
            return Err(Status::invalid_argument("volume_id: missing"));
        }
        if req.volume_path.is_empty() {
            return Err(Status::invalid_argument("volume_path: missing"));
        }
        let id = parse_volume_id(&req.volume_id).ok_or_else(|| {
            Status::not_found(format!("volume {:?} does not exist", req.volume_id))
        })?;
        let lock = self.lock(&req.volume_id);
        let _g = lock.lock().await;
        let rec = self
            .cp
            .volume(id)
            .await
            .map_err(cp_status)?
            .ok_or_else(|| Status::not_found(format!("volume {id} does not exist")))?
            .value;
        let st = self
            .load(id)
            .ok_or_else(|| Status::not_found(format!("volume {id} is not staged on this node")))?;
        check_path("volume_path", &req.volume_path, &self.allowed_roots)?;
        if let Some(cap) = &req.volume_capability {
            check_capabilities(std::slice::from_ref(cap)).map_err(Status::invalid_argument)?;
            if is_block(cap) != st.block {
                return Err(Status::invalid_argument(format!(
                    "volume_capability: volume {id} was staged as {}",
                    if st.block { "block" } else { "mount" }
                )));
            }
        }
        let size = rec.spec.size;
        let required = req.capacity_range.as_ref().map_or(0, |r| r.required_bytes);
        if u64::try_from(required).is_ok_and(|r| r > size) {
            return Err(Status::failed_precondition(format!(
                "volume {id} is {size} bytes, capacity_range.required_bytes is {required}: ControllerExpandVolume has not grown it yet"
            )));
        }
        let grown = tokio::task::block_in_place(|| self.grow_attached(id, &st, size))
            .map_err(Status::internal)?;
        ok(v1::NodeExpandVolumeResponse {
            capacity_bytes: i64::try_from(grown).unwrap_or(i64::MAX),
        })
    }

    async fn node_get_volume_health(
        &self,
        _: Request<v1::NodeGetVolumeHealthRequest>,
    ) -> Result<Response<v1::NodeGetVolumeHealthResponse>, Status> {
        Err(Status::unimplemented("NodeGetVolumeHealth: not advertised"))
    }

    async fn node_get_storage_health(
        &self,
        _: Request<v1::NodeGetStorageHealthRequest>,
    ) -> Result<Response<v1::NodeGetStorageHealthResponse>, Status> {
        Err(Status::unimplemented(
            "NodeGetStorageHealth: not advertised",
        ))
    }

    async fn node_get_capabilities(
        &self,
        _: Request<v1::NodeGetCapabilitiesRequest>,
    ) -> Result<Response<v1::NodeGetCapabilitiesResponse>, Status> {
        use v1::node_service_capability::rpc::Type;
        let caps = [
            Type::StageUnstageVolume,
            Type::GetVolumeStats,
            Type::ExpandVolume,
        ]
        .into_iter()
        .map(|t| v1::NodeServiceCapability {
            r#type: Some(v1::node_service_capability::Type::Rpc(
                v1::node_service_capability::Rpc { r#type: t as i32 },
            )),
        })
        .collect();
        ok(v1::NodeGetCapabilitiesResponse { capabilities: caps })
    }

    async fn node_get_info(
        &self,
        _: Request<v1::NodeGetInfoRequest>,
    ) -> Result<Response<v1::NodeGetInfoResponse>, Status> {
        ok(v1::NodeGetInfoResponse {
            node_id: self.node_id.clone(),
            max_volumes_per_node: 0,
            accessible_topology: Some(topology_segment(&self.cluster)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_must_stay_under_the_allowed_roots() {
        let roots = [PathBuf::from("/var/lib/kubelet")];
        let ok = check_path("target_path", "/var/lib/kubelet/pods/x/mount", &roots).unwrap();
        assert_eq!(ok, PathBuf::from("/var/lib/kubelet/pods/x/mount"));
        for (p, needle) in [
            ("", "missing"),
            ("relative/x", "absolute"),
            ("/var/lib/kubelet/../../etc", "'..'"),
            ("/etc/passwd", "outside"),
            ("/var/lib/kubelet", "outside"),
            ("/var/lib/kubeletx/y", "outside"),
        ] {
            let e = check_path("target_path", p, &roots).unwrap_err();
            assert_eq!(e.code(), tonic::Code::InvalidArgument, "{p}");
            assert!(e.message().contains("target_path"), "{p}: {}", e.message());
            assert!(e.message().contains(needle), "{p}: {}", e.message());
        }
    }
}
