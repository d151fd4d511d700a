//! `toma demo`: a local cluster (no Kubernetes), a RAID1 or RAID6 volume under a verifying
//! workload, one disk (RAID1) or two disks one after the other (RAID6) killed and brought
//! back, every phase shown as it happens, then every block checked through the client and on
//! every member (RAID6: P and Q of every stripe too).

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use parking_lot::Mutex;
use toma_agent::local::{LocalCluster, LocalTimers};
use toma_client::{ClientConfig, VolumeClient};
use toma_control::ControlPlane;
use toma_core::{Layout, Phase, Topology, VolumeId};

use crate::workload::{decode_block, quantile, Workload, BLOCK};

#[derive(Debug, Clone, clap::Args)]
pub struct DemoArgs {
    /// Protection: raid1 or raid6.
    #[arg(long, default_value = "raid1")]
    pub raid: String,
    /// Mirrors of the RAID1 volume (2 or 3).
    #[arg(long, default_value_t = 2)]
    pub mirrors: u8,
    /// Data members per stripe of the RAID6 volume (2..8; plus P and Q).
    #[arg(long, default_value_t = 4)]
    pub data_members: u8,
    /// Volume size in MiB.
    #[arg(long, default_value_t = 256)]
    pub size_mib: u64,
    /// Target rate of the workload, in 4 KiB operations per second (0: as fast as it goes).
    #[arg(long, default_value_t = 2000)]
    pub iops: u64,
    /// Seconds of workload before the disk is killed, while degraded, and after Normal.
    #[arg(long, default_value_t = 3)]
    pub phase_secs: u64,
    /// Concurrent workload tasks.
    #[arg(long, default_value_t = 4)]
    pub workers: u64,
    /// Keep the cluster's files in this directory (default: a temporary one, removed).
    #[arg(long)]
    pub dir: Option<std::path::PathBuf>,
}

const CHUNK: u64 = 64 * 1024;

struct Clock(Instant);

impl Clock {
    fn t(&self) -> f64 {
        self.0.elapsed().as_secs_f64()
    }
}

/// When each phase was first seen (workload clock), for the summary.
#[derive(Default)]
struct Timeline {
    changes: Vec<(Duration, Topology)>,
}

impl Timeline {
    fn first(&self, p: Phase, after: Duration) -> Option<Duration> {
        self.changes
            .iter()
            .find(|(at, t)| *at >= after && t.phase() == p)
            .map(|(at, _)| *at)
    }
}

async fn watch(
    units: &'static str,
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
                                "[{:7.2}s]      rebuild {:>3}%  {}/{} {units}  {:.1} MB/s",
                                clock.t(),
                                pct,
                                r.done_units,
                                r.total_units,
                                r.bytes_per_sec as f64 / 1e6
                            );
                        }
                    }
                }
            }
        }
        tokio::select! {
            _ = changes.changed() => {}
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
        }
    }
}

/// Runs the demo on its own multi-threaded runtime.
pub fn main(args: DemoArgs) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    let result = rt.block_on(run(args));
    // Background tasks (agents, connections) are cancelled; don't wait on stragglers.
    rt.shutdown_timeout(Duration::from_secs(1));
    result
}

pub async fn run(args: DemoArgs) -> Result<()> {
    let started = Instant::now();
    let layout = match args.raid.as_str() {
        "raid1" => Layout::raid1(args.mirrors).context("--mirrors")?,
        "raid6" => Layout::raid6(args.data_members).context("--data-members")?,
        other => bail!("--raid {other}: must be raid1 or raid6"),
    };
    let unit = CHUNK * layout.data_chunks_per_unit();
    if args.size_mib == 0 || args.size_mib > 1024 {
        bail!("--size-mib {}: must be between 1 and 1024", args.size_mib);
    }
    let size = args.size_mib * 1024 * 1024;
    if !size.is_multiple_of(unit) {
        bail!(
            "--size-mib {}: a {layout} volume's size must be a multiple of its stripe ({} KiB)",
            args.size_mib,
            unit / 1024
        );
    }
    let tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir().context("creating a temporary directory")?;
            tmp.path().to_path_buf()
        }
    };
    let clock = Arc::new(Clock(Instant::now()));
    let nodes = layout.members() + 1;
    let disk_size = size + 64 * 1024 * 1024;
    let mut cluster = LocalCluster::start(&dir, nodes, 1, disk_size, LocalTimers::default())
        .await
        .context("starting the local cluster")?;
    println!(
        "[{:7.2}s] cluster up: {nodes} agents on 127.0.0.2-{} with file disks in {}, embedded leader",
        clock.t(),
        nodes + 1,
        dir.display()
    );
    let id = cluster
        .create_volume("demo", layout, CHUNK, size)
        .await
        .map_err(anyhow::Error::msg)
        .context("creating the volume")?;
    let client = VolumeClient::attach(
        cluster.control_plane(),
        cluster.transport.clone(),
        id,
        ClientConfig::default(),
    )
    .await
    .context("attaching the client")?;
    println!(
        "[{:7.2}s] volume demo: {layout}, {} MiB, chunk 64 KiB; workload: {} tasks writing and verifying 4 KiB blocks",
        clock.t(),
        args.size_mib,
        args.workers
    );
    let timeline = Arc::new(Mutex::new(Timeline::default()));
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let watcher = tokio::spawn(watch(
        if layout.is_raid6() {
            "stripes"
        } else {
            "chunks"
        },
        cluster.control_plane(),
        id,
        clock.clone(),
        timeline.clone(),
        stop_rx,
    ));
    let work = Workload::new(size / BLOCK as u64, clock.0);
    let interval = if args.iops == 0 {
        Duration::ZERO
    } else {
        Duration::from_secs_f64(args.workers.max(1) as f64 / args.iops as f64)
    };
    let mut tasks = Vec::new();
    for k in 0..args.workers {
        tasks.push(tokio::spawn(work.clone().run_worker(
            client.clone(),
            k,
            args.workers,
            0x70A1,
            u64::MAX,
            interval,
        )));
    }
    let phase = Duration::from_secs(args.phase_secs);
    tokio::time::sleep(phase).await;

    // Kill the disk of member 1 (RAID6: then member 3's too, while member 1 is still
    // DEAD): its agent dies, taking its RAM state with it.
    let t = cluster.topology(id).await.context("volume vanished")?;
    let victims: Vec<usize> = if layout.is_raid6() {
        vec![1, 3]
    } else {
        vec![1]
    };
    let mut killed = Vec::new();
    let mut killed_at = None;
    for (n, &m) in victims.iter().enumerate() {
        let victim_node = t.members[m].node.clone();
        let victim = (0..cluster.node_count())
            .find(|&i| cluster.node_name(i) == &victim_node)
            .context("member node not found")?;
        killed_at.get_or_insert(clock.0.elapsed());
        println!(
            "[{:7.2}s] killing {victim_node}'s agent (member {m}'s disk goes away)",
            clock.t()
        );
        cluster.kill_agent(victim);
        killed.push((victim, victim_node));
        let dead = n + 1;
        cluster
            .wait_topology(id, Duration::from_secs(30), |t| {
                t.phase() == Phase::Degraded && t.count(toma_core::Role::Dead) >= dead
            })
            .await
            .map_err(anyhow::Error::msg)
            .context("waiting for Degraded")?;
        tokio::time::sleep(phase).await;
    }
    let killed_at = killed_at.unwrap_or_default();
    if killed.len() > 1 {
        // Both return while the leader is down (a failover): the new leader finds both back
        // and rebuilds them in one pass.
        println!(
            "[{:7.2}s] the leader goes down; both disks come back meanwhile",
            clock.t()
        );
        cluster.crash_leader();
    }
    for (victim, victim_node) in &killed {
        println!(
            "[{:7.2}s] bringing {victim_node}'s agent back on the same disk",
            clock.t()
        );
        cluster
            .start_agent(*victim)
            .await
            .context("restarting the agent")?;
    }
    if killed.len() > 1 {
        println!("[{:7.2}s] a new leader starts", clock.t());
        cluster.start_leader();
    }
    cluster
        .wait_topology(id, Duration::from_secs(60), |t| {
            t.phase() == Phase::Normal && t.generation > 1
        })
        .await
        .map_err(anyhow::Error::msg)
        .context("waiting for Normal")?;
    let normal_at = clock.0.elapsed();
    tokio::time::sleep(phase).await;
    work.stop();
    for t in tasks {
        t.await.context("workload task")?;
    }
    stop_tx.send_replace(true);
    let _ = watcher.await;
    println!(
        "[{:7.2}s] workload stopped; verifying every block on every member",
        clock.t()
    );

    // Every block through the client, then every mirror's raw bytes.
    let mut bad = Vec::new();
    let per_read = (CHUNK as usize / BLOCK) as u64;
    for first in (0..work.blocks()).step_by(per_read as usize) {
        let data = client
            .read(first * BLOCK as u64, CHUNK as usize)
            .await
            .with_context(|| format!("final read of blocks {first}.."))?;
        for (i, b) in data.chunks(BLOCK).enumerate() {
            let addr = first + i as u64;
            if decode_block(addr, b) != Some(work.expected(addr)) {
                bad.push(format!(
                    "block {addr}: read does not hold version {}",
                    work.expected(addr)
                ));
            }
        }
    }
    let contents = cluster.member_contents(id).await;
    if contents.len() != layout.members() {
        bad.push(format!(
            "only {} of {} members readable",
            contents.len(),
            layout.members()
        ));
    }
    // RAID6: P and Q checked on every stripe; the data chunks, put back in volume order, are
    // then checked like one mirror.
    let raid6_data;
    let checked: Vec<(usize, &Vec<u8>)> = if layout.is_raid6() {
        let t = cluster.topology(id).await.context("volume vanished")?;
        match toma_client::raid6::verify_members(&t, &contents) {
            Ok(d) => {
                raid6_data = d;
                vec![(0, &raid6_data)]
            }
            Err(e) => {
                bad.push(format!("parity: {e}"));
                Vec::new()
            }
        }
    } else {
        contents.iter().map(|(m, b)| (*m, b)).collect()
    };
    for (m, bytes) in checked {
        for addr in 0..work.blocks() {
            let off = (addr as usize) * BLOCK;
            let Some(b) = bytes.get(off..off + BLOCK) else {
                bad.push(format!("mirror {m} too short"));
                break;
            };
            if decode_block(addr, b) != Some(work.expected(addr)) {
                bad.push(format!(
                    "mirror {m} block {addr}: holds {:?}, expected version {}",
                    decode_block(addr, b),
                    work.expected(addr)
                ));
            }
        }
    }

    // Statistics.
    let (degraded_at, init_at) = {
        let tl = timeline.lock();
        (
            tl.first(Phase::Degraded, killed_at).unwrap_or(killed_at),
            tl.first(Phase::RebuildInit, killed_at).unwrap_or(normal_at),
        )
    };
    let records = work.records.lock().clone();
    let mut all: Vec<Duration> = records.iter().map(|r| r.end - r.start).collect();
    let mut during: Vec<Duration> = records
        .iter()
        .filter(|r| r.end >= killed_at && r.start <= normal_at)
        .map(|r| r.end - r.start)
        .collect();
    let max_during = during.iter().max().copied().unwrap_or_default();
    let blocks_per_unit = unit / BLOCK as u64;
    let dirtied: BTreeSet<u64> = records
        .iter()
        .filter(|r| r.write && r.end >= degraded_at && r.start <= init_at)
        .map(|r| r.block / blocks_per_unit)
        .collect();
    let statuses = cluster.cp_statuses(id).await;
    let rebuilt_bytes: u64 = statuses
        .iter()
        .filter_map(|s| s.rebuild)
        .filter(|r| r.finished)
        .map(|r| r.bytes_copied)
        .sum();
    // Bytes a rebuild of exactly the dirtied units writes: one chunk per unit per member
    // brought back.
    let dirtied_bytes = dirtied.len() as u64 * CHUNK * killed.len() as u64;
    let errors = work.errors.lock().clone();
    cluster.shutdown().await;

    let p99_during = quantile(&mut during, 0.99);
    println!();
    println!("summary");
    println!(
        "  I/Os done            {} writes, {} reads",
        work.writes.load(std::sync::atomic::Ordering::Relaxed),
        work.reads.load(std::sync::atomic::Ordering::Relaxed)
    );
    println!("  errors               {}", errors.len() + bad.len());
    println!(
        "  latency p50/p99      {:.2} ms / {:.2} ms overall",
        quantile(&mut all, 0.5).as_secs_f64() * 1e3,
        quantile(&mut all, 0.99).as_secs_f64() * 1e3
    );
    println!(
        "  stall p99 / max      {:.1} ms / {:.1} ms during the transitions (disk killed → Normal)",
        p99_during.as_secs_f64() * 1e3,
        max_during.as_secs_f64() * 1e3
    );
    println!(
        "  fault → Degraded     {:.2} s;  fault → Normal {:.2} s",
        (degraded_at - killed_at).as_secs_f64(),
        (normal_at - killed_at).as_secs_f64()
    );
    let units = if layout.is_raid6() {
        "stripes"
    } else {
        "chunks"
    };
    println!(
        "  rebuilt              {} KiB for {} {units} ({} KiB on the members brought back) dirtied while degraded{}",
        rebuilt_bytes / 1024,
        dirtied.len(),
        dirtied_bytes / 1024,
        if killed.len() > 1 {
            String::new()
        } else {
            format!(" — not the whole {} MiB", args.size_mib)
        }
    );
    if layout.is_raid6() {
        println!(
            "  verified             {} blocks through the client and on the {} members, P and Q of all {} stripes",
            work.blocks(),
            contents.len(),
            size / unit
        );
    } else {
        println!(
            "  verified             {} blocks through the client and on each of {} mirrors",
            work.blocks(),
            contents.len()
        );
    }
    println!(
        "  took                 {:.1} s",
        started.elapsed().as_secs_f64()
    );
    for e in errors.iter().chain(bad.iter()).take(20) {
        println!("  ERROR {e}");
    }
    if !errors.is_empty() || !bad.is_empty() {
        bail!("{} errors", errors.len() + bad.len());
    }
    if killed.len() > 1 {
        // The second loss took a holder of the first lost member's dirty bits while it was
        // DEAD: the leader rebuilds that member in full (toma_core::planner), and the one
        // pass writes both members' chunks of every stripe it copies.
        println!(
            "  note                 member {} was rebuilt in full: the second loss took a holder of its dirty bits",
            victims[0]
        );
    } else if rebuilt_bytes as f64 > 1.1 * dirtied_bytes as f64 {
        bail!("rebuilt {rebuilt_bytes} bytes, more than 1.1 × the {dirtied_bytes} bytes dirtied while degraded");
    }
    println!("ok");
    Ok(())
}
