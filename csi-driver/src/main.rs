//! `toma-csi`: the Toma CSI driver. `toma-csi --mode controller|node` serves the CSI
//! services; `toma-csi datapath` is the per-volume process the node plugin starts.
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use toma_csi::datapath::{self, DatapathArgs};
use toma_csi::server::{self, ServeArgs};

#[derive(Parser, Debug)]
#[command(
    name = "toma-csi",
    version,
    about = "The Toma CSI driver (toma.csi.io)"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    #[command(flatten)]
    serve: ServeArgs,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The datapath of one staged volume (started by the node plugin; not for humans).
    Datapath(DatapathArgs),
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.cmd {
        Some(Cmd::Datapath(a)) => datapath::run(a),
        None => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .map_err(anyhow::Error::from)
            .and_then(|rt| rt.block_on(server::serve(cli.serve))),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("toma-csi: {e:#}");
            ExitCode::FAILURE
        }
    }
}
