//! `TomaVolume`: what a volume is (layout, chunk size, size) and where its secret lives.
// kube's `printcolumn(name = .., type_ = ..)` lists trip clippy's duplicated_attributes.
#![allow(clippy::duplicated_attributes)]

use kube::{CustomResource, KubeSchema};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// How a volume protects its data.
#[derive(Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum LayoutKind {
    /// `mirrors` full copies.
    Raid1,
    /// `dataMembers` data members plus P and Q.
    Raid6,
}

/// A Secret holding the volume secret (32 bytes under the key `secret`).
#[derive(Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// A Toma volume. Named after the volume (the PV name for CSI volumes); its topology is the
/// `TomaTopology` of the same name.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq)]
#[kube(
    group = "toma.io",
    version = "v1alpha1",
    kind = "TomaVolume",
    shortname = "tv",
    doc = "A Toma volume: layout, chunk size, size and the Secret clients register with",
    printcolumn(name = "Layout", type_ = "string", json_path = ".spec.layout"),
    printcolumn(name = "Mirrors", type_ = "integer", json_path = ".spec.mirrors"),
    printcolumn(name = "Data", type_ = "integer", json_path = ".spec.dataMembers"),
    printcolumn(name = "Chunk", type_ = "integer", json_path = ".spec.chunkSize"),
    printcolumn(name = "Size", type_ = "integer", json_path = ".spec.size"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.layout == 'raid1' ? (has(self.mirrors) && !has(self.dataMembers)) : (has(self.dataMembers) && !has(self.mirrors))")
    .message("layout raid1 needs spec.mirrors (and no spec.dataMembers); layout raid6 needs spec.dataMembers (and no spec.mirrors)"))]
#[x_kube(validation = Rule::new("self.size % (self.chunkSize * (self.layout == 'raid6' && has(self.dataMembers) ? self.dataMembers : 1)) == 0")
    .message("spec.size must be a multiple of the lock unit: chunkSize (raid1) or chunkSize * dataMembers (raid6)")
    .field_path(".size"))]
#[x_kube(validation = Rule::new("self.volumeId == oldSelf.volumeId && self.layout == oldSelf.layout && self.chunkSize == oldSelf.chunkSize && self.secretRef == oldSelf.secretRef && has(self.mirrors) == has(oldSelf.mirrors) && (!has(self.mirrors) || self.mirrors == oldSelf.mirrors) && has(self.dataMembers) == has(oldSelf.dataMembers) && (!has(self.dataMembers) || self.dataMembers == oldSelf.dataMembers)")
    .message("only spec.size (growing) and spec.growingTo may change: a volume's id, layout, chunk size and secret never change"))]
#[x_kube(validation = Rule::new("self.size >= oldSelf.size").message("spec.size never decreases: a volume does not shrink").field_path(".size"))]
#[x_kube(validation = Rule::new("!has(self.growingTo) || (self.growingTo >= self.size && self.growingTo % (self.chunkSize * (self.layout == 'raid6' && has(self.dataMembers) ? self.dataMembers : 1)) == 0)")
    .message("spec.growingTo must be at least spec.size and a multiple of the lock unit")
    .field_path(".growingTo"))]
#[serde(rename_all = "camelCase")]
pub struct TomaVolumeSpec {
    /// The volume UUID (`8-4-4-4-12` lowercase hex), also recorded in every member's
    /// superblock extent.
    #[schemars(regex(
        pattern = r"^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$"
    ))]
    pub volume_id: String,
    pub layout: LayoutKind,
    /// RAID1 only: number of full copies, 2 or 3.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 3))]
    pub mirrors: Option<u8>,
    /// RAID6 only: data members per stripe, 2..8 (plus P and Q).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 2, max = 8))]
    pub data_members: Option<u8>,
    /// The lock and dirty-bit unit: a power of two between 4096 (4 KiB) and 16777216 (16 MiB).
    #[schemars(range(min = 4096, max = 16777216))]
    #[x_kube(validation = Rule::new("[4096, 8192, 16384, 32768, 65536, 131072, 262144, 524288, 1048576, 2097152, 4194304, 8388608, 16777216].exists(x, x == self)")
        .message("chunkSize must be a power of two between 4096 and 16777216"))]
    pub chunk_size: u64,
    /// Usable bytes: a positive multiple of the lock unit.
    #[schemars(range(min = 1))]
    pub size: u64,
    /// A pending expansion: the size the members' extents are growing to. `size` becomes
    /// it once every member's extent has grown (and its new part is zeroed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub growing_to: Option<u64>,
    pub secret_ref: SecretRef,
}
