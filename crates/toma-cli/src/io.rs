//! `toma io`: the demo's verifying workload against a volume through the Kubernetes control
//! plane (`toma_operator::KubeControlPlane`, as the agents use it).
//!
//! It creates the volume if asked (disks chosen by `toma_core::allocate::choose_disks`),
//! runs the workload, prints every topology change and the rebuild progress with times on
//! its own clock, and on SIGUSR1 notes "fault now" (the e2e harness sends it right before
//! it injects a fault). On SIGTERM, SIGINT or SIGUSR2, or after `--duration-secs`, it stops,
//! reads every block through the client and every block of every mirror straight from its
//! member, and prints a summary: I/O errors, the longest I/O stall, and the times from the
//! fault to Degraded and to Normal. The exit status is non-zero if anything was wrong.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use tokio::signal::unix::{signal, SignalKind};
use toma_client::{ClientConfig, VolumeClient};
use toma_control::ControlPlane;
use toma_core::{Layout, Phase, Role, Topology, VolumeId};
use toma_wire::transport::{TcpTransport, Transport};
use toma_wire::Message;

use crate::workload::{decode_block, quantile, Workload, BLOCK};

#[derive(Debug, Clone, clap::Args)]
pub struct IoArgs {
    /// Kubeconfig file; without it, the in-cluster configuration.
    #[arg(long)]
    pub kubeconfig: Option<PathBuf>,
    /// The volume (its TomaVolume/TomaTopology name).
    #[arg(long)]
    pub volume: String,
    /// Create the volume if it does not exist (RAID1 with --mirrors, --size-mib, --chunk-kib).
    #[arg(long)]
    pub create: bool,
    #[arg(long, default_value_t = 2)]
    pub mirrors: u8,
    #[arg(long, default_value_t = 64)]
    pub size_mib: u64,
    #[arg(long, default_value_t = 64)]
    pub chunk_kib: u64,
    /// The first 4 KiB block this workload writes and checks (several workloads, each on its
    /// own range, can share a volume).
    #[arg(long, default_value_t = 0)]
    pub first_block: u64,
    /// Blocks in this workload's range (default: to the end of the volume).
    #[arg(long)]
    pub blocks: Option<u64>,
    /// Target rate in 4 KiB operations per second (0: as fast as it goes).
    #[arg(long, default_value_t = 500)]
    pub iops: u64,
    #[arg(long, default_value_t = 4)]
    pub workers: u64,
    /// Stop by itself after this long (a bound; the harness normally stops it with SIGTERM).
    #[arg(long, default_value_t = 600)]
    pub duration_secs: u64,
    /// The node this client runs on (recorded with its attachment).
    #[arg(long, default_value = "toma-io")]
    pub node: String,
    /// Every control plane call gives up after this long (ms).
    #[arg(long, default_value_t = 5000)]
    pub api_timeout_ms: u64,
    /// A datapath call with no answer in this long marks its member unreachable (ms).
    #[arg(long, default_value_t = 3000)]
    pub request_timeout_ms: u64,
    /// Skip the final verification (a client the harness kills anyway).
    #[arg(long)]
    pub no_verify: bool,
}

struct Clock(Instant);

impl Clock {
    fn t(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

#[derive(Default)]
struct Timeline {
    changes: Vec<(Duration, Topology)>,
    fault: Option<Duration>,
}

pub fn run(args: IoArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let r = rt.block_on(main(args));
    rt.shutdown_timeout(Duration::from_secs(1));
    r
}

async fn find(cp: &dyn ControlPlane, name: &str) -> Result<Option<VolumeId>> {
    let vols = cp
        .volumes()
        .await
        .map_err(|e| anyhow::anyhow!("listing volumes: {e}"))?;
    Ok(vols
        .into_iter()
        .find(|v| v.value.name == name)
        .map(|v| v.value.id))
}

async fn main(args: IoArgs) -> Result<()> {
    let clock = Arc::new(Clock(Instant::now()));
    let api_timeout = Duration::from_millis(args.api_timeout_ms.max(100));
    let kube = toma_operator::client_from_kubeconfig(args.kubeconfig.as_deref(), api_timeout)
        .await
        .context("connecting to the Kubernetes API")?;
    let cp = toma_agent::k8s::kube_control_plane(kube, "toma-io", api_timeout);
    let id = match find(cp.as_ref(), &args.volume).await? {
        Some(id) => id,
        None if args.create => {
            let layout = Layout::raid1(args.mirrors).context("--mirrors")?;
            if args.size_mib == 0 {
                bail!("--size-mib 0: a volume needs at least 1 MiB");
            }
            let id = toma_agent::local::create_volume(
                cp.as_ref(),
                &args.volume,
                layout,
                args.chunk_kib * 1024,
                args.size_mib * 1024 * 1024,
            )
            .await
            .map_err(anyhow::Error::msg)
            .with_context(|| format!("creating volume {}", args.volume))?;
            println!("[{:7.2}s] created volume {} ({id})", clock.t(), args.volume);
            id
        }
        None => bail!(
            "volume {} does not exist (pass --create to create it)",
            args.volume
        ),
    };
    // Wait until every member's agent hosts the volume (it reported a synced generation).
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let t = cp.volume(id).await.ok().flatten().map(|v| v.value.topology);
        let st = cp.member_statuses(id).await.unwrap_or_default();
        if let Some(t) = &t {
            let hosted = t.alive().into_iter().all(|m| {
                st.iter()
                    .any(|s| s.disk == t.members[m].disk && s.node == t.members[m].node)
            });
            if hosted {
                break;
            }
        }
        if Instant::now() > deadline {
            bail!(
                "volume {}: its members' agents did not report within 120 s",
                args.volume
            );
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let transport: Arc<dyn Transport> = Arc::new(TcpTransport::new());
    let cfg = ClientConfig {
        node: args.node.clone(),
        request_timeout: Duration::from_millis(args.request_timeout_ms.max(100)),
        ..ClientConfig::default()
    };
    let client = VolumeClient::attach(cp.clone(), transport, id, cfg)
        .await
        .context("attaching the client")?;
    let vol_blocks = client.spec().size / BLOCK as u64;
    if args.first_block >= vol_blocks {
        bail!(
            "--first-block {}: the volume has {vol_blocks} blocks",
            args.first_block
        );
    }
    let blocks = args
        .blocks
        .unwrap_or(vol_blocks - args.first_block)
        .min(vol_blocks - args.first_block);
    if blocks == 0 {
        bail!("--blocks 0: nothing to do");
    }
    let work = Workload::with_base(args.first_block, blocks, clock.0);
    let interval = if args.iops == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(args.workers.max(1) as f64 / args.iops as f64)
    };
    let seed = std::process::id() as u64;
    let mut tasks = Vec::new();
    for k in 0..args.workers.max(1) {
        tasks.push(tokio::spawn(work.clone().run_worker(
            client.clone(),
            k,
            args.workers.max(1),
            seed,
            u64::MAX,
            interval,
        )));
    }
    println!(
        "[{:7.2}s] running: volume {} blocks {}..{} ({} workers, {} IOPS target)",
        clock.t(),
        args.volume,
        args.first_block,
        args.first_block + blocks,
        args.workers.max(1),
        args.iops
    );
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(watch(
        cp.clone(),
        id,
        clock.clone(),
        timeline.clone(),
        stop_rx,
    ));
    let mut usr1 = signal(SignalKind::user_defined1()).context("SIGUSR1 handler")?;
    let mut usr2 = signal(SignalKind::user_defined2()).context("SIGUSR2 handler")?;
    let mut term = signal(SignalKind::terminate()).context("SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("SIGINT handler")?;
    let end = tokio::time::sleep(Duration::from_secs(args.duration_secs));
    tokio::pin!(end);
    loop {
        tokio::select! {
            _ = usr1.recv() => {
                let at = clock.0.elapsed();
                timeline.lock().fault = Some(at);
                println!("[{:7.2}s] fault injected (SIGUSR1)", at.as_secs_f64());
            }
            _ = usr2.recv() => break,
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = &mut end => break,
        }
    }
    work.stop();
    for t in tasks {
        let _ = t.await;
    }
    stop_tx.send_replace(true);
    let _ = watcher.await;
    let stopped = clock.0.elapsed();
    println!("[{:7.2}s] workload stopped", stopped.as_secs_f64());

    let mut bad = Vec::new();
    let mut mirrors = 0;
    if !args.no_verify {
        println!(
            "[{:7.2}s] verifying every block through the client and on every mirror",
            clock.t()
        );
        mirrors = verify(&client, &work, vol_blocks, &mut bad).await;
    }

    let records = work.records.lock().clone();
    let longest = records
        .iter()
        .map(|r| r.end.saturating_sub(r.start))
        .max()
        .unwrap_or_default();
    let mut lat: Vec<Duration> = records.iter().map(|r| r.end - r.start).collect();
    // The longest time with no I/O completing at all.
    let mut ends: Vec<Duration> = records.iter().map(|r| r.end).collect();
    ends.sort_unstable();
    let quiet = ends
        .windows(2)
        .map(|w| w[1] - w[0])
        .max()
        .unwrap_or_default();
    let (fault, to_degraded, to_normal) = {
        let tl = timeline.lock();
        match tl.fault {
            Some(f) => {
                let after = |p: Phase| {
                    tl.changes
                        .iter()
                        .find(|(at, t)| *at >= f && t.phase() == p)
                        .map(|(at, _)| *at - f)
                };
                let left_normal = tl
                    .changes
                    .iter()
                    .any(|(at, t)| *at >= f && t.phase() != Phase::Normal);
                let normal = if left_normal {
                    tl.changes
                        .iter()
                        .filter(|(at, t)| *at >= f && t.phase() == Phase::Normal)
                        .map(|(at, _)| *at - f)
                        .next_back()
                } else {
                    None
                };
                (Some(f), after(Phase::Degraded), normal)
            }
            None => (None, None, None),
        }
    };
    let errors = work.errors.lock().clone();
    let secs =
        |d: Option<Duration>| d.map_or("n/a".to_string(), |d| format!("{:.2}", d.as_secs_f64()));
    println!();
    println!("summary");
    println!(
        "  ios                  {} writes, {} reads",
        work.writes.load(std::sync::atomic::Ordering::Relaxed),
        work.reads.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("  io-errors            {}", errors.len());
    println!("  verify-errors        {}", bad.len());
    println!(
        "  latency p50/p99      {:.2} ms / {:.2} ms",
        quantile(&mut lat.clone(), 0.5).as_secs_f64() * 1e3,
        quantile(&mut lat, 0.99).as_secs_f64() * 1e3
    );
    println!("  longest-stall-ms     {:.1}", longest.as_secs_f64() * 1e3);
    println!("  longest-quiet-ms     {:.1}", quiet.as_secs_f64() * 1e3);
    println!("  fault-at-s           {}", secs(fault));
    println!("  fault-to-degraded-s  {}", secs(to_degraded));
    println!("  fault-to-normal-s    {}", secs(to_normal));
    if !args.no_verify {
        println!(
            "  verified             {} blocks through the client, {} blocks on each of {mirrors} mirrors",
            work.blocks(),
            vol_blocks
        );
    }
    for e in errors.iter().chain(bad.iter()).take(20) {
        println!("  ERROR {e}");
    }
    if !errors.is_empty() || !bad.is_empty() {
        bail!("{} I/O errors, {} verify errors", errors.len(), bad.len());
    }
    println!("ok");
    Ok(())
}

async fn watch(
    cp: Arc<dyn ControlPlane>,
    id: VolumeId,
    clock: Arc<Clock>,
    timeline: Arc<Mutex<Timeline>>,
    stop: tokio::sync::watch::Receiver<bool>,
) {
    let mut changes = cp.changes();
    let mut last_gen = 0;
    let mut last_pct = None;
    loop {
        if *stop.borrow() {
            return;
        }
        if let Ok(Some(v)) = cp.volume(id).await {
            let t = v.value.topology;
            if t.generation != last_gen {
                last_gen = t.generation;
                last_pct = None;
                println!(
                    "[{:7.2}s] g{:<3} {:<12} {}",
                    clock.t(),
                    t.generation,
                    t.phase().as_str(),
                    t.members_summary()
                );
                timeline.lock().changes.push((clock.0.elapsed(), t.clone()));
            }
            if t.phase() == Phase::Rebuilding {
                if let Ok(st) = cp.member_statuses(id).await {
                    if let Some(r) = st
                        .iter()
                        .filter_map(|s| s.rebuild)
                        .find(|r| r.generation == t.generation)
                    {
                        let pct = r.percent();
                        if last_pct != Some(pct) && r.total_units > 0 {
                            last_pct = Some(pct);
                            println!(
                                "[{:7.2}s]      rebuild {:>3}%  {}/{} chunks",
                                clock.t(),
                                pct,
                                r.done_units,
                                r.total_units
                            );
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}

/// Reads every block of the workload's range through the client, and every block of the
/// volume from each member. Inside the range each must hold the last acknowledged version;
/// outside it (another client's blocks) every mirror must hold the same bytes. Returns the
/// number of mirrors read.
async fn verify(
    client: &VolumeClient,
    work: &Workload,
    vol_blocks: u64,
    bad: &mut Vec<String>,
) -> usize {
    let base = work.base();
    let chunk = client.spec().chunk_size as u64;
    let per = (chunk / BLOCK as u64).max(1);
    let expect = |addr: u64| -> Option<u64> {
        (addr >= base && addr < base + work.blocks()).then(|| work.expected(addr - base))
    };
    for first in (0..vol_blocks).step_by(per as usize) {
        let n = per.min(vol_blocks - first);
        if (first + n) <= base || first >= base + work.blocks() {
            continue;
        }
        match client
            .read(first * BLOCK as u64, (n as usize) * BLOCK)
            .await
        {
            Ok(data) => {
                for (i, b) in data.chunks(BLOCK).enumerate() {
                    let addr = first + i as u64;
                    if let Some(want) = expect(addr) {
                        if decode_block(addr, b) != Some(want) {
                            bad.push(format!(
                                "block {addr}: read {:?}, expected version {want}",
                                decode_block(addr, b)
                            ));
                        }
                    }
                }
            }
            Err(e) => bad.push(format!("final read of blocks {first}..: {e}")),
        }
    }
    let t = client.topology();
    if t.phase() != Phase::Normal {
        bad.push(format!(
            "the volume is {} at the end, not Normal",
            t.phase().as_str()
        ));
    }
    let members: Vec<usize> = (0..t.n())
        .filter(|m| t.members[*m].role == Role::Rwl)
        .collect();
    if members.len() != t.n() {
        bad.push(format!(
            "only {} of {} members readable",
            members.len(),
            t.n()
        ));
    }
    for first in (0..vol_blocks).step_by(per as usize) {
        let n = per.min(vol_blocks - first);
        let mut copies: Vec<(usize, bytes::Bytes)> = Vec::new();
        for &m in &members {
            let msg = Message::Read {
                offset: first * BLOCK as u64,
                len: (n * BLOCK as u64) as u32,
            };
            match client.request(&t, m, msg).await {
                Ok(Message::Data { data }) if data.len() == (n as usize) * BLOCK => {
                    copies.push((m, data))
                }
                Ok(other) => bad.push(format!("member {m}: blocks {first}..: answered {other:?}")),
                Err(e) => bad.push(format!("member {m}: blocks {first}..: {e}")),
            }
        }
        for (m, data) in &copies {
            for (i, b) in data.chunks(BLOCK).enumerate() {
                let addr = first + i as u64;
                match expect(addr) {
                    Some(want) if decode_block(addr, b) != Some(want) => bad.push(format!(
                        "member {m} block {addr}: holds {:?}, expected version {want}",
                        decode_block(addr, b)
                    )),
                    Some(_) => {}
                    None => {
                        let (m0, d0) = &copies[0];
                        let b0 = &d0[i * BLOCK..(i + 1) * BLOCK];
                        if b != b0 {
                            bad.push(format!("block {addr}: member {m} differs from member {m0}"));
                        }
                    }
                }
            }
        }
        if bad.len() > 1000 {
            break;
        }
    }
    members.len()
}
