//! The Toma CSI driver (`toma-csi`): the Identity, Controller and Node services of the CSI
//! v1 spec over the Toma control plane (Kubernetes CRDs through `toma_operator`'s
//! `KubeControlPlane`), and the per-volume datapath process that the node plugin starts for
//! every staged volume (a FUSE-exported file with a loop device on top).
#![forbid(unsafe_code)]

pub mod controller;
pub mod datapath;
pub mod identity;
pub mod mounts;
pub mod node;
pub mod params;
pub mod server;

pub mod kube;

use std::collections::HashMap;

use csi_proto::v1;
use toma_control::CpError;
use tonic::Status;

/// The driver's name (the CSIDriver object, StorageClass `provisioner`).
pub const DRIVER_NAME: &str = "toma.csi.io";
/// The topology key every node reports: Toma volumes are reachable over the network from
/// any node of the cluster, so the segment is the cluster.
pub const TOPOLOGY_KEY: &str = "topology.toma.io/cluster";

pub fn topology_segment(cluster: &str) -> v1::Topology {
    v1::Topology {
        segments: HashMap::from([(TOPOLOGY_KEY.to_string(), cluster.to_string())]),
    }
}

/// A control-plane error as a gRPC status.
pub fn cp_status(e: CpError) -> Status {
    match e {
        CpError::NoVolume(id) => Status::not_found(format!("volume {id} does not exist")),
        CpError::Exists(n) => Status::already_exists(format!("volume {n} already exists")),
        CpError::Conflict { .. } => Status::aborted(e.to_string()),
        CpError::Rejected(m) => Status::invalid_argument(m),
        CpError::Deposed { .. } | CpError::Unavailable(_) => Status::unavailable(e.to_string()),
    }
}
