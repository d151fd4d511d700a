//! Deterministic simulation of a whole Toma cluster, running the real agent, client and
//! leader code. One seed fixes the whole run: the network (delays, duplicates, reordering,
//! partitions, one-way links), every node's clock (offset and rate), the disks (loss, move
//! to another node, power loss with torn writes, I/O errors), crashes and restarts of
//! agents, the leader and clients, whole-cluster power loss, the workload, and the
//! scheduling of every task.
//!
//! How it is deterministic: everything runs on one tokio `current_thread` runtime with
//! paused (virtual) time, so tasks run in a fixed order and time only moves when every task
//! waits; the network ([`net`]) and the disks ([`disk`]) are in memory and draw their
//! randomness from the seed; the product code has small seams for it (in-memory disks do
//! their I/O inline instead of on blocking threads, client ids come from a seed, no
//! `HashMap` order reaches behaviour, `select!`s poll in a fixed order). Invariants are
//! checked beside the cluster by [`checker`], never inside the code under test.
//!
//! `toma sim --seed N` replays one run and prints its event log; `toma sim --seeds COUNT`
//! runs many and prints every failing seed with the command that replays it.
#![forbid(unsafe_code)]

pub mod checker;
pub mod clock;
pub mod disk;
pub mod net;
pub mod rng;
pub mod verify;
pub mod watchdog;
mod world;

use std::collections::BTreeSet;
use std::time::Duration;

/// A deliberate bug, to show the checkers catch it (names shared with the model checker).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mutation {
    SkipDualLock,
    NoDirtyBits,
    ReadFromW,
    EarlyAdvance,
}

impl Mutation {
    pub const ALL: [Mutation; 4] = [
        Mutation::SkipDualLock,
        Mutation::NoDirtyBits,
        Mutation::ReadFromW,
        Mutation::EarlyAdvance,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mutation::SkipDualLock => "skip-dual-lock",
            Mutation::NoDirtyBits => "no-dirty-bits",
            Mutation::ReadFromW => "read-from-w",
            Mutation::EarlyAdvance => "early-advance",
        }
    }

    pub fn parse(s: &str) -> Option<Mutation> {
        Mutation::ALL.into_iter().find(|m| m.name() == s)
    }
}

/// What a run does besides what its seed decides.
#[derive(Debug, Clone)]
pub struct Options {
    pub mutation: Option<Mutation>,
    /// A RAID6 4+2 volume on 8 storage nodes instead of RAID1 (2 or 3 mirrors, drawn from
    /// the seed) on mirrors + 2.
    pub raid6: bool,
    /// RAID6: let faults take more than two members away at once (a whole-cluster power
    /// loss while the volume is degraded, a third member lost before the first two are
    /// back, a partition cutting three off). Without it a RAID6 run keeps to what RAID6
    /// promises, two members lost at once or one after the other: a fault that would take
    /// a third one away is skipped (logged as such). RAID1 runs ignore it.
    pub unbounded_losses: bool,
    /// Simulated time during which faults are injected (then every fault heals).
    pub chaos: Duration,
    /// Print the event log to stderr as it happens.
    pub verbose: bool,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            mutation: None,
            raid6: false,
            unbounded_losses: false,
            chaos: Duration::from_secs(20),
            verbose: false,
        }
    }
}

/// The outcome of one run.
#[derive(Debug, Clone)]
pub struct Report {
    pub seed: u64,
    /// The event log: faults, topology changes, violations, a summary. Byte-identical for
    /// two runs of the same seed and options.
    pub log: Vec<String>,
    /// The first invariant violated, if any.
    pub violation: Option<String>,
    /// The distinct fault kinds this run hit.
    pub faults: BTreeSet<&'static str>,
    /// Simulated seconds the run lasted.
    pub sim_secs: f64,
    /// Faults not injected because they would have taken a third RAID6 member away
    /// (`Options::unbounded_losses` off).
    pub skipped: usize,
}

/// The command that replays a run.
pub fn replay_command(seed: u64, opts: &Options) -> String {
    let raid = match (opts.raid6, opts.unbounded_losses) {
        (false, _) => "",
        (true, false) => " --raid raid6",
        (true, true) => " --raid raid6 --unbounded-losses",
    };
    match opts.mutation {
        Some(m) => format!("toma sim --seed {seed}{raid} --mutate {}", m.name()),
        None => format!("toma sim --seed {seed}{raid}"),
    }
}

/// Runs one seed on a fresh single-threaded runtime with paused time.
pub fn run(seed: u64, opts: &Options) -> Report {
    let mut builder = tokio::runtime::Builder::new_current_thread();
    builder.enable_time().start_paused(true);
    // tokio's own randomness (which shard of a `watch` channel a receiver waits in, hence
    // the order in which a send wakes its receivers; `select!` without `biased`) must come
    // from the seed too. `rng_seed` needs `--cfg tokio_unstable` (.cargo/config.toml).
    #[cfg(tokio_unstable)]
    builder.rng_seed(tokio::runtime::RngSeed::from_bytes(&seed.to_le_bytes()));
    let rt = match builder.build() {
        Ok(rt) => rt,
        Err(e) => {
            return Report {
                seed,
                log: vec![format!("cannot build the runtime: {e}")],
                violation: Some(format!("cannot build the runtime: {e}")),
                faults: BTreeSet::new(),
                sim_secs: 0.0,
                skipped: 0,
            }
        }
    };
    let report = rt.block_on(world::run(seed, opts.clone()));
    rt.shutdown_background();
    report
}
