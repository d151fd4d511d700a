//! `toma-agent`: opens this node's disks. The datapath server is added on top of the library.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use toma_agent::cli::Cli;
use toma_agent::Disks;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    let disks = match cli.disks.resolve().and_then(|cfg| Disks::open(&cfg)) {
        Ok(d) => d,
        Err(e) => {
            eprintln!("toma-agent: {e}");
            return ExitCode::FAILURE;
        }
    };
    for (path, disk) in disks.iter() {
        println!(
            "disk {} id {} cluster {} boot {} extents {}",
            path.display(),
            disk.id(),
            disk.cluster(),
            disk.boot_counter(),
            disk.extents().len()
        );
    }
    ExitCode::SUCCESS
}
