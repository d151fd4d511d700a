//! `toma check-model`: runs the stateright model of the protocol and prints the number of
//! states and `ok`, or the shortest counterexample (exit 1).

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
    /// Rebuilding goes straight to Normal, skipping DualLock.
    SkipDualLock,
    /// Degraded writes set no dirty bit.
    NoDirtyBits,
    /// Reads may go to a W member.
    ReadFromW,
    /// The leader moves to g+1 before every client acknowledged g.
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
}

pub fn config(args: &Args) -> Config {
    Config {
        clients: usize::from(args.clients),
        writes: args.writes,
        reads: args.reads,
        leader_crashes: args.leader_crashes,
        drops: args.drops,
        mutation: args.mutate.map(Mutation::from),
        ..Config::default()
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
