//! `TomaNode`: one node's agent, as it reports itself.
// kube's `printcolumn(name = .., type_ = ..)` lists trip clippy's duplicated_attributes.
#![allow(clippy::duplicated_attributes)]

use kube::CustomResource;
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// A node's TOMA agent. Named after the Kubernetes node.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[kube(
    group = "toma.io",
    version = "v1alpha1",
    kind = "TomaNode",
    shortname = "tn",
    status = "TomaNodeStatus",
    doc = "A node's TOMA agent: where its datapath listens, and its liveness counters",
    printcolumn(name = "Endpoint", type_ = "string", json_path = ".spec.endpoint"),
    printcolumn(name = "Heartbeat", type_ = "integer", json_path = ".status.heartbeat"),
    printcolumn(name = "Boot", type_ = "integer", json_path = ".status.boot"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct TomaNodeSpec {
    /// Where clients reach this agent's datapath, `host:port`.
    #[schemars(length(min = 1, max = 253))]
    pub endpoint: String,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct TomaNodeStatus {
    /// Bumped by the agent on every report. The leader only notes, on its own monotonic
    /// clock, when it last saw it change; no clocks are compared.
    #[serde(default)]
    pub heartbeat: u64,
    /// Bumped on every agent start (its RAM state was lost).
    #[serde(default)]
    pub boot: u64,
}
