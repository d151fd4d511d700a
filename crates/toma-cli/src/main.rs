//! `toma`: the command a user types. A thin dispatcher: each subcommand lives in its own
//! module and returns the process exit code.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};

mod bench;
mod check_model;
mod demo;
mod io;
mod nbd;
mod sim;
mod workload;

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
    /// A local cluster (no Kubernetes): a RAID1 volume under a verifying workload, a disk
    /// killed and rebuilt while I/O goes on, every block checked on every mirror at the end.
    Demo(demo::DemoArgs),
    /// Exhaustively check the protocol model (stateright, breadth-first).
    CheckModel(check_model::Args),
    /// Deterministic simulation: replay one seed, or run many and print failing seeds.
    Sim(sim::Args),
    Nbd(nbd::NbdArgs),
    Bench(bench::BenchArgs),
    /// The verifying workload against a volume through the Kubernetes control plane: every
    /// topology change on its own clock, SIGUSR1 marks a fault, SIGTERM stops and verifies
    /// every block on every mirror.
    Io(io::IoArgs),
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    // Logs go to stderr, warnings and up unless RUST_LOG says otherwise.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .try_init();
    match cli.command {
        Command::Demo(args) => report(demo::main(args)),
        Command::CheckModel(args) => check_model::run(args),
        Command::Sim(args) => sim::run(args),
        Command::Nbd(args) => report(nbd::run(args)),
        Command::Bench(args) => report(bench::run(args)),
        Command::Io(args) => report(io::run(args)),
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
