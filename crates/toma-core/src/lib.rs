//! Toma's decisions, as plain functions: volume layouts, topologies, lock placement, the
//! leader's planner, and the rules that any two adjacent topologies must keep.
//!
//! This crate is pure: no I/O, no async, no clock. Agents, clients, the operator, the model
//! checker and the simulation all call into it, so the rules exist exactly once.
#![forbid(unsafe_code)]

pub mod adjacent;
pub mod allocate;
pub mod growth;
pub mod layout;
pub mod placement;
pub mod planner;
pub mod topology;

pub use adjacent::{check_adjacent, Rule, Violation};
pub use growth::{growth_state, GrowthState, MemberExtent};
pub use layout::{Layout, LayoutError, VolumeSpec, BLOCK_SIZE, DEFAULT_CHUNK_SIZE};
pub use placement::{
    clears_dirty, clears_dirty_after, home, locks, read_member, sets_dirty, write_members,
    DirtyMarks,
};
pub use planner::{
    plan, plan_with, Knowledge, MemberReport, Mutations, Plan, PlanError, Replacement, Wait,
};
pub use topology::{
    DiskId, Generation, LockMode, Member, MemberIdx, NodeId, Phase, Role, Topology, TopologyError,
    VolumeId,
};
