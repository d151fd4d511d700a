//! `toma nbd`: serves a Toma volume over NBD. There is no standalone control plane yet, so
//! it starts an embedded local cluster (agents on 127.0.0.x over file disks, the leader in
//! this process), creates a RAID1 volume on it, and serves that volume until interrupted.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use toma_agent::local::{LocalCluster, LocalTimers};
use toma_client::{ClientConfig, VolumeClient};
use toma_core::{Layout, Phase};
use toma_nbd::{serve_nbd_with, NbdConfig, NbdListener};

#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Serve a Toma RAID1 volume over NBD (fixed newstyle), backed by an embedded local cluster",
    long_about = "Serve a Toma RAID1 volume over NBD (fixed newstyle handshake; READ, WRITE, FLUSH, \
TRIM, WRITE_ZEROES, DISCONNECT; simple replies).\n\n\
There is no standalone control-plane service yet, so this command starts an embedded local \
cluster in this process: one agent per mirror on 127.0.0.2, 127.0.0.3, … with sparse file \
disks created in --local DIR (which must not hold an earlier cluster's disks), and the leader. \
It creates one RAID1 volume of --size MiB named --volume, attaches a Toma client to it and \
serves it on --listen until interrupted (Ctrl-C). The export follows topology switches like \
any client.\n\n\
Block sizes: minimum 512, preferred 4096, maximum 32 MiB. Requests that are 512- but not \
4096-aligned are served by read-modify-write of their edge blocks (safe within this process); \
smaller misalignment gets EINVAL.\n\n\
Use it with: nbdinfo nbd://HOST:PORT, fio --ioengine=nbd --uri=nbd://HOST:PORT, \
qemu-img info nbd://HOST:PORT, or nbd-client where the kernel has nbd."
)]
pub struct NbdArgs {
    /// Where to listen: HOST:PORT, or unix:PATH for a Unix socket.
    #[arg(long, default_value = "127.0.0.1:10809")]
    pub listen: String,
    /// Directory for the embedded local cluster's disk files (required: there is no
    /// standalone control plane yet).
    #[arg(long, value_name = "DIR")]
    pub local: PathBuf,
    /// Name of the volume (also the NBD export name; "" is accepted too).
    #[arg(long, default_value = "nbd0")]
    pub volume: String,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size: u64,
    /// RAID1 mirrors (2 or 3), one agent each.
    #[arg(long, default_value_t = 2)]
    pub mirrors: u8,
    /// Tokio worker threads for the client and the NBD server (0: one current-thread
    /// runtime); each embedded agent runs on a runtime of its own thread.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Most threads doing blocking disk work at once: flushes and superblock updates, and
    /// data I/O only with TOMA_IO=threads or without io_uring (data I/O uses io_uring).
    #[arg(long, default_value_t = 16)]
    pub blocking_threads: usize,
}

pub const CHUNK: u64 = 64 * 1024;

/// The tokio runtime every in-process command here uses: `threads` workers (0: a
/// current-thread runtime) and at most `blocking` threads for the agents' disk I/O.
pub fn runtime(threads: usize, blocking: usize) -> Result<tokio::runtime::Runtime> {
    let mut b = if threads == 0 {
        tokio::runtime::Builder::new_current_thread()
    } else {
        let mut b = tokio::runtime::Builder::new_multi_thread();
        b.worker_threads(threads);
        b
    };
    b.max_blocking_threads(blocking.max(1))
        .enable_all()
        .build()
        .context("starting the tokio runtime")
}

pub fn run(args: NbdArgs) -> Result<()> {
    runtime(args.threads, args.blocking_threads)?.block_on(serve(args))
}

async fn serve(args: NbdArgs) -> Result<()> {
    std::fs::create_dir_all(&args.local)
        .with_context(|| format!("creating {}", args.local.display()))?;
    if std::fs::read_dir(&args.local)?.next().is_some() {
        bail!(
            "{} is not empty: give a new directory (an earlier cluster's disks belong to another cluster id)",
            args.local.display()
        );
    }
    let size = args.size * 1024 * 1024;
    let layout = Layout::raid1(args.mirrors).map_err(anyhow::Error::msg)?;
    let cluster = LocalCluster::start_on_own_threads(
        &args.local,
        usize::from(args.mirrors),
        1,
        size + 64 * 1024 * 1024,
        LocalTimers::default(),
    )
    .await
    .context("starting the embedded local cluster")?;
    let (client, _) = attach(&cluster, &args.volume, layout, size).await?;
    let listener = NbdListener::bind(&args.listen)
        .await
        .with_context(|| format!("listening on {}", args.listen))?;
    println!(
        "toma nbd: RAID1 volume {:?} ({} MiB, {} mirrors) of an embedded cluster in {}; serving {}",
        args.volume,
        args.size,
        args.mirrors,
        args.local.display(),
        listener.uri()
    );
    let cfg = NbdConfig {
        export_name: args.volume.clone(),
        ..NbdConfig::default()
    };
    tokio::select! {
        r = serve_nbd_with(client.clone(), listener, cfg) => r.context("NBD server")?,
        _ = tokio::signal::ctrl_c() => println!("toma nbd: interrupted; stopping"),
    }
    let _ = client.detach().await;
    cluster.shutdown().await;
    Ok(())
}

/// Creates the volume on `cluster`, waits until every member serves it, and attaches a client.
pub async fn attach(
    cluster: &LocalCluster,
    name: &str,
    layout: Layout,
    size: u64,
) -> Result<(VolumeClient, toma_core::VolumeId)> {
    let id = cluster
        .create_volume(name, layout, CHUNK, size)
        .await
        .map_err(anyhow::Error::msg)
        .context("creating the volume")?;
    cluster
        .wait_topology(id, Duration::from_secs(30), |t| t.phase() == Phase::Normal)
        .await
        .map_err(anyhow::Error::msg)?;
    cluster
        .wait_served(id, Duration::from_secs(30))
        .await
        .map_err(anyhow::Error::msg)?;
    let client = VolumeClient::attach(
        cluster.control_plane(),
        cluster.transport.clone(),
        id,
        ClientConfig::default(),
    )
    .await
    .context("attaching the client")?;
    Ok((client, id))
}
