//! `toma bench`: Toma RAID1 over NBD against qemu-nbd and the raw file, with fio.
//!
//! Installs nothing (scripts/setup.sh provides fio and qemu-utils). In a scratch directory it
//! creates fully written backing files of one size: two Toma disks, one for qemu-nbd and one
//! read directly. It starts two agents on loopback and a RAID1 volume exported by the
//! in-process NBD server (`toma_nbd::serve_nbd`) on a Unix socket, and `qemu-nbd -f raw
//! --cache=none --aio=native` on another; fio then drives `nbd` (libnbd) against both NBD
//! servers and `libaio` with O_DIRECT against the file. Each workload runs the three targets
//! back to back, `--rounds` times with the order reversed every round, so drift hits them
//! alike; a target's numbers are the means over its rounds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::{json, Value};
use toma_agent::local::{LocalCluster, LocalTimers};
use toma_core::Layout;
use toma_nbd::{serve_nbd, NbdListener};

use crate::nbd::{attach, runtime};

#[derive(Debug, Clone, clap::Args)]
#[command(
    about = "Benchmark a Toma RAID1 volume over NBD against qemu-nbd and the raw file (fio)",
    long_about = "Benchmark a Toma RAID1 volume over NBD against qemu-nbd and the raw file.\n\n\
Needs fio (with its nbd engine) and qemu-nbd; scripts/setup.sh installs them, this command \
installs nothing. It creates fully written backing files in a scratch directory, starts 2 agents \
on loopback (embedded local cluster) and a RAID1 volume served by the in-process NBD server, \
plus qemu-nbd (-f raw --cache=none --aio=native) over a file of the same size, and runs fio: \
4 KiB randread and randwrite at QD1 and QD32, 1 MiB sequential read and write at QD8. Targets are \
interleaved per workload. Prints one table (IOPS, MB/s, p50/p99 completion latency, and the \
ratios Toma/qemu-nbd and Toma/direct); --json writes the same."
)]
pub struct BenchArgs {
    /// Protection of the Toma volume (raid1 only for now).
    #[arg(long, default_value = "raid1")]
    pub raid: String,
    /// Seconds of fio per workload and target (split over the rounds).
    #[arg(long, default_value_t = 10)]
    pub runtime: u64,
    /// Rounds per workload (targets interleaved, order reversed every round).
    #[arg(long, default_value_t = 2)]
    pub rounds: u64,
    /// Write the results as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Size of the volume and of each backing file, in MiB.
    #[arg(long, default_value_t = 1024)]
    pub size_mib: u64,
    /// Scratch directory (default: a temporary one, removed at the end).
    #[arg(long)]
    pub dir: Option<PathBuf>,
    /// Tokio worker threads for the in-process cluster and NBD server (0: current-thread).
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Most threads doing the agents' blocking disk I/O at once.
    /// (Measured on 2 cores: 8-16 beat tokio's default of 512, which thrashes.)
    #[arg(long, default_value_t = 16)]
    pub blocking_threads: usize,
    /// Only these workloads (comma-separated names, e.g. randread-4k-qd32).
    #[arg(long)]
    pub only: Option<String>,
}

struct Workload {
    name: &'static str,
    rw: &'static str,
    bs: &'static str,
    qd: u32,
}

const WORKLOADS: &[Workload] = &[
    Workload {
        name: "randread-4k-qd1",
        rw: "randread",
        bs: "4k",
        qd: 1,
    },
    Workload {
        name: "randread-4k-qd32",
        rw: "randread",
        bs: "4k",
        qd: 32,
    },
    Workload {
        name: "randwrite-4k-qd1",
        rw: "randwrite",
        bs: "4k",
        qd: 1,
    },
    Workload {
        name: "randwrite-4k-qd32",
        rw: "randwrite",
        bs: "4k",
        qd: 32,
    },
    Workload {
        name: "read-1m-qd8",
        rw: "read",
        bs: "1m",
        qd: 8,
    },
    Workload {
        name: "write-1m-qd8",
        rw: "write",
        bs: "1m",
        qd: 8,
    },
];

const TARGETS: [&str; 3] = ["toma", "qemu-nbd", "direct"];

#[derive(Debug, Clone, Copy, Default)]
struct Numbers {
    iops: f64,
    mbps: f64,
    p50_us: f64,
    p99_us: f64,
}

fn have(cmd: &str) -> bool {
    Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {cmd}"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

pub fn run(args: BenchArgs) -> Result<()> {
    if args.raid != "raid1" {
        bail!("--raid {}: only raid1 is implemented", args.raid);
    }
    let missing: Vec<&str> = ["fio", "qemu-nbd"]
        .into_iter()
        .filter(|c| !have(c))
        .collect();
    if !missing.is_empty() {
        bail!(
            "{} not found: run scripts/setup.sh (it installs fio and qemu-utils)",
            missing.join(", ")
        );
    }
    let _tmp;
    let dir = match &args.dir {
        Some(d) => {
            std::fs::create_dir_all(d)?;
            d.clone()
        }
        None => {
            let t = tempfile::Builder::new()
                .prefix("toma-bench-")
                .tempdir_in(std::env::temp_dir())?;
            let p = t.path().to_path_buf();
            _tmp = t;
            p
        }
    };
    runtime(args.threads, args.blocking_threads)?.block_on(bench(args, dir))
}

/// Writes `len` bytes of non-zero data from `from` on (so that no read hits a hole), then
/// syncs. The first `from` bytes stay zero (a Toma disk's superblock area must be blank).
fn fill(path: &Path, len: u64, from: u64) -> Result<()> {
    use std::io::{Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(true)
        .write(true)
        .open(path)
        .with_context(|| format!("creating {}", path.display()))?;
    f.set_len(len)?;
    f.seek(SeekFrom::Start(from))?;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    for b in block.chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        b.copy_from_slice(&x.to_le_bytes()[..b.len()]);
    }
    let mut pos = from;
    while pos < len {
        let n = (len - pos).min(block.len() as u64) as usize;
        f.write_all(&block[..n])?;
        pos += n as u64;
    }
    f.sync_all()?;
    Ok(())
}

struct QemuNbd(Child);

impl Drop for QemuNbd {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

async fn bench(args: BenchArgs, dir: PathBuf) -> Result<()> {
    let size = args.size_mib << 20;
    let disk_size = size + (64 << 20);
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    println!(
        "toma bench: {} MiB per target, {} s per workload and target in {} round(s), scratch {} (load {})",
        args.size_mib,
        args.runtime,
        args.rounds,
        dir.display(),
        load.split_whitespace().take(3).collect::<Vec<_>>().join(" ")
    );
    // Backing files, fully written.
    let t0 = Instant::now();
    let cluster_dir = dir.join("cluster");
    for n in 1..=2 {
        let nd = cluster_dir.join(format!("node{n}"));
        std::fs::create_dir_all(&nd)?;
        fill(&nd.join("disk0.img"), disk_size, 1 << 20)?;
    }
    let qemu_file = dir.join("qemu.img");
    let direct_file = dir.join("direct.img");
    fill(&qemu_file, size, 0)?;
    fill(&direct_file, size, 0)?;
    println!(
        "backing files written in {:.1} s",
        t0.elapsed().as_secs_f64()
    );

    // Toma: 2 agents, a RAID1 volume, the NBD server in this process.
    let cluster = LocalCluster::start(&cluster_dir, 2, 1, disk_size, LocalTimers::default())
        .await
        .context("starting the local cluster")?;
    let layout = Layout::raid1(2).map_err(anyhow::Error::msg)?;
    let (client, _) = attach(&cluster, "bench", layout, size).await?;
    let sock = dir.join("toma.sock");
    let listener = NbdListener::bind(&format!("unix:{}", sock.display())).await?;
    let toma_uri = listener.uri();
    let server = tokio::spawn(serve_nbd(client.clone(), listener));

    // qemu-nbd over its own file.
    let qsock = dir.join("qemu.sock");
    let _qemu = QemuNbd(
        Command::new("qemu-nbd")
            .args([
                "-f",
                "raw",
                "--cache=none",
                "--aio=native",
                "--shared=8",
                "--persistent",
                "-k",
            ])
            .arg(&qsock)
            .arg(&qemu_file)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qemu-nbd")?,
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    while !qsock.exists() {
        if Instant::now() > deadline {
            bail!("qemu-nbd did not create {}", qsock.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let qemu_uri = format!("nbd+unix:///?socket={}", qsock.display());

    let only: Option<Vec<String>> = args
        .only
        .as_ref()
        .map(|s| s.split(',').map(|x| x.trim().to_string()).collect());
    let per_round = (args.runtime as f64 / args.rounds.max(1) as f64).max(1.0);
    let mut results: Vec<(&Workload, [Numbers; 3])> = Vec::new();
    for w in WORKLOADS {
        if only
            .as_ref()
            .is_some_and(|o| !o.iter().any(|n| n == w.name))
        {
            continue;
        }
        let mut acc = [Numbers::default(); 3];
        let mut order: Vec<usize> = vec![0, 1, 2];
        for round in 0..args.rounds.max(1) {
            if round % 2 == 1 {
                order.reverse();
            }
            for &t in &order {
                let target = match t {
                    0 => Target::Nbd(&toma_uri),
                    1 => Target::Nbd(&qemu_uri),
                    _ => Target::File(&direct_file),
                };
                let n = run_fio(w, target, per_round, size)
                    .await
                    .with_context(|| format!("{} on {}", w.name, TARGETS[t]))?;
                acc[t].iops += n.iops;
                acc[t].mbps += n.mbps;
                acc[t].p50_us += n.p50_us;
                acc[t].p99_us += n.p99_us;
            }
            if round % 2 == 1 {
                order.reverse();
            }
        }
        let r = args.rounds.max(1) as f64;
        let mean = |n: Numbers| Numbers {
            iops: n.iops / r,
            mbps: n.mbps / r,
            p50_us: n.p50_us / r,
            p99_us: n.p99_us / r,
        };
        let nums = [mean(acc[0]), mean(acc[1]), mean(acc[2])];
        print_workload(w, &nums);
        results.push((w, nums));
    }
    server.abort();
    let _ = client.detach().await;
    cluster.shutdown().await;

    println!();
    print_table(&results);
    if let Some(path) = &args.json {
        let doc = to_json(&args, &results, &load);
        std::fs::write(path, serde_json::to_string_pretty(&doc)?)
            .with_context(|| format!("writing {}", path.display()))?;
        println!("wrote {}", path.display());
    }
    Ok(())
}

enum Target<'a> {
    Nbd(&'a str),
    File(&'a Path),
}

async fn run_fio(w: &Workload, target: Target<'_>, secs: f64, size: u64) -> Result<Numbers> {
    let mut cmd = tokio::process::Command::new("fio");
    cmd.args([
        "--name=bench",
        "--output-format=json",
        "--time_based",
        "--ramp_time=1",
        "--numjobs=1",
        "--percentile_list=50:99",
        "--randrepeat=0",
        "--norandommap",
    ])
    .arg(format!("--runtime={}", secs.round() as u64))
    .arg(format!("--rw={}", w.rw))
    .arg(format!("--bs={}", w.bs))
    .arg(format!("--iodepth={}", w.qd))
    .arg(format!("--size={size}"));
    match target {
        Target::Nbd(uri) => {
            cmd.arg("--ioengine=nbd").arg(format!("--uri={uri}"));
        }
        Target::File(p) => {
            cmd.args(["--ioengine=libaio", "--direct=1"])
                .arg(format!("--filename={}", p.display()));
        }
    }
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .context("running fio")?;
    if !out.status.success() {
        bail!(
            "fio failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    parse_fio(&out.stdout, w.rw)
}

/// Reads IOPS, bandwidth and completion-latency percentiles from fio's JSON.
fn parse_fio(stdout: &[u8], rw: &str) -> Result<Numbers> {
    // fio may print notices before the JSON document.
    let text = String::from_utf8_lossy(stdout);
    let start = text.find('{').context("no JSON in fio's output")?;
    let v: Value = serde_json::from_str(&text[start..]).context("parsing fio's JSON")?;
    let dir = if rw.contains("read") { "read" } else { "write" };
    let job = &v["jobs"][0][dir];
    let pct = |k: &str| {
        job["clat_ns"]["percentile"][k]
            .as_f64()
            .map(|ns| ns / 1000.0)
            .unwrap_or(0.0)
    };
    Ok(Numbers {
        iops: job["iops"].as_f64().context("fio JSON has no iops")?,
        mbps: job["bw_bytes"].as_f64().unwrap_or(0.0) / 1e6,
        p50_us: pct("50.000000"),
        p99_us: pct("99.000000"),
    })
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 {
        a / b
    } else {
        0.0
    }
}

fn print_header() {
    println!(
        "{:<18} {:<9} {:>9} {:>9} {:>9} {:>9}   {:>9} {:>9}",
        "workload", "target", "IOPS", "MB/s", "p50 us", "p99 us", "÷qemu-nbd", "÷direct"
    );
}

fn print_workload(w: &Workload, n: &[Numbers; 3]) {
    print_header();
    print_rows(w, n);
}

fn print_rows(w: &Workload, n: &[Numbers; 3]) {
    for (i, t) in TARGETS.iter().enumerate() {
        let (rq, rd) = if i == 0 {
            (
                format!("{:.2}x", ratio(n[0].iops, n[1].iops)),
                format!("{:.2}x", ratio(n[0].iops, n[2].iops)),
            )
        } else {
            (String::new(), String::new())
        };
        println!(
            "{:<18} {:<9} {:>9.0} {:>9.1} {:>9.1} {:>9.1}   {:>9} {:>9}",
            if i == 0 { w.name } else { "" },
            t,
            n[i].iops,
            n[i].mbps,
            n[i].p50_us,
            n[i].p99_us,
            rq,
            rd
        );
    }
}

fn print_table(results: &[(&Workload, [Numbers; 3])]) {
    println!("Ratios are Toma's IOPS (= MB/s) over the other target's; latencies are fio's completion latency.");
    print_header();
    for (w, n) in results {
        print_rows(w, n);
    }
}

fn to_json(args: &BenchArgs, results: &[(&Workload, [Numbers; 3])], load: &str) -> Value {
    let num = |n: &Numbers| {
        json!({
            "iops": n.iops,
            "mbps": n.mbps,
            "p50_us": n.p50_us,
            "p99_us": n.p99_us,
        })
    };
    let workloads: Vec<Value> = results
        .iter()
        .map(|(w, n)| {
            json!({
                "workload": w.name,
                "rw": w.rw,
                "bs": w.bs,
                "iodepth": w.qd,
                "toma": num(&n[0]),
                "qemu_nbd": num(&n[1]),
                "direct": num(&n[2]),
                "toma_over_qemu_nbd": ratio(n[0].iops, n[1].iops),
                "toma_over_direct": ratio(n[0].iops, n[2].iops),
                "p50_toma_over_qemu_nbd": ratio(n[0].p50_us, n[1].p50_us),
            })
        })
        .collect();
    json!({
        "runtime_s": args.runtime,
        "rounds": args.rounds,
        "size_mib": args.size_mib,
        "threads": args.threads,
        "blocking_threads": args.blocking_threads,
        "loadavg_at_start": load.trim(),
        "qemu_nbd": "qemu-nbd -f raw --cache=none --aio=native",
        "direct": "fio libaio, O_DIRECT, on the file",
        "workloads": workloads,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fio_json() {
        let out = br#"note: something
{"jobs":[{"read":{"iops":1234.5,"bw_bytes":5056512,
 "clat_ns":{"percentile":{"50.000000":81920,"99.000000":250880}}},
 "write":{"iops":0,"bw_bytes":0}}]}"#;
        let n = parse_fio(out, "randread").expect("parses");
        assert_eq!(n.iops, 1234.5);
        assert!((n.mbps - 5.056512).abs() < 1e-9);
        assert!((n.p50_us - 81.92).abs() < 1e-9);
        assert!((n.p99_us - 250.88).abs() < 1e-9);
        assert!(parse_fio(b"garbage", "read").is_err());
    }
}
