//! `TomaDisk`: a disk, named by the UUID in its superblock.
// kube's `printcolumn(name = .., type_ = ..)` lists trip clippy's duplicated_attributes.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A disk owned by a node's agent. Named after the disk UUID (`8-4-4-4-12` lowercase hex).
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "toma.io",
    version = "v1alpha1",
    kind = "TomaDisk",
    shortname = "td",
    status = "TomaDiskStatus",
    doc = "A disk, found by the UUID in its superblock, on the node that reports it",
    printcolumn(name = "Node", type_ = "string", json_path = ".spec.node"),
    printcolumn(name = "Capacity", type_ = "integer", json_path = ".spec.capacity"),
    printcolumn(name = "Free", type_ = "integer", json_path = ".status.free"),
    printcolumn(name = "Healthy", type_ = "boolean", json_path = ".status.healthy"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TomaDiskSpec {
    /// The node (TomaNode name) whose agent reports this disk now.
    #[schemars(length(min = 1, max = 253))]
    pub node: String,
    /// Bytes.
    pub capacity: u64,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TomaDiskStatus {
    /// Largest free extent, bytes.
    #[serde(default)]
    pub free: u64,
    /// The disk answers I/O.
    #[serde(default)]
    pub healthy: bool,
}
