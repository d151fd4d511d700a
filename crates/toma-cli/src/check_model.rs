//! `toma check-model`: runs the stateright model of the protocol and prints the number of
//! states and `ok`, or the shortest counterexample (exit 1).
//!
//! `--raid raid6` models a 2+2 volume (one stripe) with two clients and two disk failures,
//! bounded at 10 M transitions (about 10 s in release on two cores); `--clients 1 --failures 1`
//! is exhaustive (~0.7 M states, ~6 s); `--clients 1 --max-states 0` (two failures, at once or
//! one after the other) is exhaustive in ~71 M states, ~14 min, ~10 GB; `--data-members 4` is
//! the 4+2 layout, far larger.

use std::process::ExitCode;

use clap::{Args as ClapArgs, ValueEnum};
use toma_model::{check, Config, Mutation, Raid};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum RaidArg {
    Raid1,
    Raid6,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum MutationArg {
    /// Rebuilding goes straight to Normal, skipping DualLock. raid6: only with
    /// --fail-lock-place (otherwise stripe 0's lock never moves and DualLock changes
    /// nothing), and not caught within the default bounds (the RAID6 lock set's second
    /// member already spans the move).
    SkipDualLock,
    /// Degraded writes set no dirty bit. raid6: caught with --clients 1 --failures 1.
    NoDirtyBits,
    /// Reads may go to a W member.
    ReadFromW,
    /// The leader moves to g+1 before every client acknowledged g. Caught for raid1 (the
    /// planner rule is the same for raid6, whose runs do not reach the catch).
    EarlyAdvance,
}

impl From<MutationArg> for Mutation {
    fn from(m: MutationArg) -> Mutation {
        match m {
            MutationArg::SkipDualLock => Mutation::SkipDualLock,
            MutationArg::NoDirtyBits => Mutation::NoDirtyBits,
            MutationArg::ReadFromW => Mutation::ReadFromW,
            MutationArg::EarlyAdvance => Mutation::EarlyAdvance,
        }
    }
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Volume layout to model.
    #[arg(long, value_enum, default_value_t = RaidArg::Raid1)]
    pub raid: RaidArg,
    /// Number of clients (1 to 3).
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=3))]
    pub clients: u8,
    /// Break one rule on purpose; the check must then find a counterexample.
    #[arg(long, value_enum)]
    pub mutate: Option<MutationArg>,
    /// Writes per client.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub writes: u8,
    /// Reads by the last client.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub reads: u8,
    /// Leader crashes per run (0 or 1; 1 makes the run several times longer).
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=1))]
    pub leader_crashes: u8,
    /// Connection drops per run.
    #[arg(long, default_value_t = 0, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub drops: u8,
    /// Disk failures per run, each followed by the disk's return or a NEW disk (default: 1
    /// for raid1, 2 for raid6: two at once or one after the other).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub failures: Option<u8>,
    /// RAID6 data members k (k + 2 members). 4 (4+2) explores far more states than 2.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(2..=4))]
    pub data_members: u8,
    /// Let member 0's disk (stripe 0's lock place) fail too. Default for raid1; for raid6
    /// it makes the space several times larger (`--clients 1 --failures 1` stays
    /// exhaustive in about 10 s).
    #[arg(long)]
    pub fail_lock_place: bool,
    /// Disks come back only as themselves, never as a NEW disk (fewer states).
    #[arg(long)]
    pub no_new_disk: bool,
    /// Stop after this many transitions: a bounded run, reported as such. 0: no limit.
    /// Default: none for raid1; 10000000 for raid6 (about 40 s), whose full space with two
    /// clients does not fit (`--clients 1 --failures 1` is exhaustive in about 20 s).
    #[arg(long)]
    pub max_states: Option<usize>,
}

pub fn config(args: &Args) -> Config {
    Config {
        clients: usize::from(args.clients),
        writes: args.writes,
        reads: args.reads,
        leader_crashes: args.leader_crashes,
        drops: args.drops,
        failures: args.failures.unwrap_or(match args.raid {
            RaidArg::Raid1 => 1,
            RaidArg::Raid6 => 2,
        }),
        data_members: args.data_members,
        replacement: !args.no_new_disk,
        max_states: match (args.max_states, args.raid) {
            (Some(0), _) | (None, RaidArg::Raid1) => None,
            (Some(n), _) => Some(n),
            (None, RaidArg::Raid6) => Some(10_000_000),
        },
        fail_lock_place: args.fail_lock_place || args.raid == RaidArg::Raid1,
        mutation: args.mutate.map(Mutation::from),
    }
}

pub fn run(args: Args) -> ExitCode {
    let raid = match args.raid {
        RaidArg::Raid1 => Raid::Raid1,
        RaidArg::Raid6 => Raid::Raid6,
    };
    let cfg = config(&args);
    let outcome = match check(raid, cfg) {
        Ok(o) => o,
        Err(e) => {
            eprintln!("toma check-model: {e}");
            return ExitCode::from(2);
        }
    };
    println!(
        "{} states explored (max depth {}, {:.1}s)",
        outcome.states,
        outcome.max_depth,
        outcome.elapsed.as_secs_f64()
    );
    match outcome.violation {
        None if !outcome.complete => {
            println!("ok (bounded: stopped at the transition limit, not every state explored)");
            ExitCode::SUCCESS
        }
        None => {
            println!("ok");
            ExitCode::SUCCESS
        }
        Some((name, trace)) => {
            println!("counterexample for {name} (shortest, one line per action):");
            print!("{trace}");
            ExitCode::from(1)
        }
    }
}
