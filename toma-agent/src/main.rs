//! `toma-agent`: opens this node's disks; with `--node NAME`, serves the datapath with the
//! Kubernetes API as its control plane (`toma_agent::k8s`).
#![forbid(unsafe_code)]

use std::process::ExitCode;

use clap::Parser;
use toma_agent::cli::Cli;
use toma_agent::Disks;

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
        )
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
    let Some(node) = cli.serve.node.clone() else {
        return ExitCode::SUCCESS;
    };
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("toma-agent: starting the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(async move {
        let agent = match toma_agent::k8s::start(&cli.serve, &node, &disks).await {
            Ok(h) => h,
            Err(e) => {
                eprintln!("toma-agent: {e:#}");
                return ExitCode::FAILURE;
            }
        };
        // SIGTERM (kubelet, systemd, a reboot) or SIGINT: an orderly shutdown detaches the
        // disks, so the next boot trusts them. SIGKILL is a crash, like a power loss.
        let mut term = match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("toma-agent: cannot watch SIGTERM: {e}");
                return ExitCode::FAILURE;
            }
        };
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
        let failed = agent.shutdown();
        for (disk, why) in &failed {
            eprintln!("toma-agent: disk {disk} not detached cleanly ({why}); it is rebuilt in full if this host reboots");
        }
        eprintln!(
            "toma-agent: shut down; {} of {} disks detached cleanly",
            disks.len() - failed.len(),
            disks.len()
        );
        ExitCode::SUCCESS
    })
}
