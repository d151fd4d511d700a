//! A stateright model of Toma's operational protocol.
//!
//! The model runs one RAID1 volume (two members) with a leader, one TOMA per member disk,
//! clients doing concurrent writes and reads of two chunks, a disk failure and its return (or
//! replacement by a NEW disk), the rebuild by the surviving TOMA's local client, dual lock,
//! a leader crash, and lost and reordered messages. Placement and planning are asked of
//! `toma_core`; the properties are P1–P6 of DESIGN.md §3.
#![forbid(unsafe_code)]

pub mod model;
mod trace;

use std::time::{Duration, Instant};

use stateright::{Checker, Model};

pub use model::{Config, Mutation, State, TomaModel};

/// Which volume layout to model.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Raid {
    Raid1,
    Raid6,
}

/// The result of one exhaustive check.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// Unique states explored.
    pub states: usize,
    pub max_depth: usize,
    pub elapsed: Duration,
    /// The first violated property (name) and the shortest trace to it, if any.
    pub violation: Option<(String, String)>,
}

impl Outcome {
    pub fn ok(&self) -> bool {
        self.violation.is_none()
    }
}

/// An error in the request (not a property violation).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError(pub String);

impl std::fmt::Display for ConfigError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for ConfigError {}

/// Runs the breadth-first check (so a counterexample is a shortest one).
pub fn check(raid: Raid, cfg: Config) -> Result<Outcome, ConfigError> {
    if raid == Raid::Raid6 {
        return Err(ConfigError("raid6 model not available yet".into()));
    }
    let model = TomaModel::raid1(cfg).map_err(ConfigError)?;
    let start = Instant::now();
    // Stop at the first failure: breadth-first, so it is a shortest one.
    let mut builder = model
        .checker()
        .threads(2)
        .finish_when(stateright::HasDiscoveries::AnyFailures);
    if let Some(n) = std::env::var("TOMA_MODEL_MAX_STATES")
        .ok()
        .and_then(|v| v.parse().ok())
    {
        builder = builder.target_state_count(n);
    }
    let checker = builder.spawn_bfs().join();
    let elapsed = start.elapsed();
    let mut found: Vec<_> = checker.discoveries().into_iter().collect();
    // Shortest first, then by name, so the report is deterministic.
    found.sort_by_key(|(name, path)| (path.clone().into_actions().len(), *name));
    let violation = found
        .into_iter()
        .next()
        .map(|(name, path)| (name.to_string(), trace::render(checker.model(), name, path)));
    Ok(Outcome {
        states: checker.unique_state_count(),
        max_depth: checker.max_depth(),
        elapsed,
        violation,
    })
}
