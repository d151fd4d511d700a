//! `toma`: the command a user types. A thin dispatcher: each subcommand lives in its own
//! module and returns the process exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check_model;
mod nbd;

#[derive(Debug, Parser)]
#[command(
    name = "toma",
    version,
    about = "Toma: a cluster manager for a datapath-blind distributed block store"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run an embedded local cluster (no Kubernetes).
    Demo,
    /// Exhaustively check the protocol model (stateright, breadth-first).
    CheckModel(check_model::Args),
    Nbd(nbd::NbdArgs),
    Bench(bench::BenchArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        Command::Demo => {
            println!("toma demo: not built yet");
            ExitCode::SUCCESS
        }
        Command::CheckModel(args) => check_model::run(args),
        Command::Nbd(args) => report(nbd::run(args)),
        Command::Bench(args) => report(bench::run(args)),
    }
}

fn report(r: anyhow::Result<()>) -> ExitCode {
    match r {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toma: {e:#}");
            ExitCode::FAILURE
        }
    }
}
