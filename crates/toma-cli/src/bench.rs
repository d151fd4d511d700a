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
    /// Protection of the Toma volume: raid1 (against qemu-nbd and the raw file), or raid6
    /// (a 4+2 volume over 6 agents against a RAID1 volume of the same cluster and qemu-nbd,
    /// plus the P/Q encode rate of one core).
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
    /// Tokio worker threads for the client and the NBD server (0: current-thread); each
    /// embedded agent runs on a runtime of its own thread.
    #[arg(long, default_value_t = 2)]
    pub threads: usize,
    /// Most threads doing blocking disk work at once: flushes and superblock updates, and
    /// data I/O only with TOMA_IO=threads or without io_uring (data I/O uses io_uring).
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
    if args.raid != "raid1" && args.raid != "raid6" {
        bail!("--raid {}: must be raid1 or raid6", args.raid);
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

/// RAID6 P/Q encode rate of one core: GB of data (4 data chunks of 64 KiB per stripe)
/// encoded per second, over about a second.
fn encode_rate() -> Result<f64> {
    let chunk = 64 * 1024;
    let data: Vec<Vec<u8>> = (0..4u8)
        .map(|j| (0..chunk).map(|i| (i as u8).wrapping_mul(j + 3)).collect())
        .collect();
    let refs: Vec<&[u8]> = data.iter().map(|d| d.as_slice()).collect();
    let started = Instant::now();
    let mut bytes = 0u64;
    while started.elapsed() < Duration::from_secs(1) {
        for _ in 0..64 {
            let (p, q) = toma_client::raid6::encode(&refs).map_err(anyhow::Error::msg)?;
            std::hint::black_box((p, q));
            bytes += 4 * chunk as u64;
        }
    }
    Ok(bytes as f64 / started.elapsed().as_secs_f64() / 1e9)
}

async fn bench(args: BenchArgs, dir: PathBuf) -> Result<()> {
    let size = args.size_mib << 20;
    let raid6 = args.raid == "raid6";
    // RAID6 mode: one cluster holds both the RAID6 4+2 volume (size / 4 per member) and
    // the RAID1 volume it is compared with (size on 2 of the 6 disks).
    let disk_size = if raid6 {
        size + size / 4 + (64 << 20)
    } else {
        size + (64 << 20)
    };
    let nodes = if raid6 { 6 } else { 2 };
    let names: [&str; 3] = if raid6 {
        ["raid6", "raid1", "qemu-nbd"]
    } else {
        ["toma", "qemu-nbd", "direct"]
    };
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
    for n in 1..=nodes {
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

    // Toma: the agents, a RAID1 volume (and in RAID6 mode a RAID6 one), each served by the
    // NBD server in this process.
    let cluster = LocalCluster::start_on_own_threads(
        &cluster_dir,
        nodes,
        1,
        disk_size,
        LocalTimers::default(),
    )
    .await
    .context("starting the local cluster")?;
    let mut clients = Vec::new();
    let mut servers = Vec::new();
    let mut uris = Vec::new();
    let layouts = if raid6 {
        vec![
            Layout::raid6(4).map_err(anyhow::Error::msg)?,
            Layout::raid1(2).map_err(anyhow::Error::msg)?,
        ]
    } else {
        vec![Layout::raid1(2).map_err(anyhow::Error::msg)?]
    };
    for (i, layout) in layouts.into_iter().enumerate() {
        let (client, _) = attach(&cluster, &format!("bench{i}"), layout, size).await?;
        let sock = dir.join(format!("toma{i}.sock"));
        let listener = NbdListener::bind(&format!("unix:{}", sock.display())).await?;
        uris.push(listener.uri());
        servers.push(tokio::spawn(serve_nbd(client.clone(), listener)));
        clients.push(client);
    }
    let encode_gbps = if raid6 {
        let r = encode_rate()?;
        println!("RAID6 4+2 P/Q encode: {r:.2} GB/s of data on one core (64 KiB chunks)");
        Some(r)
    } else {
        None
    };

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
                let target = match (raid6, t) {
                    (_, 0) => Target::Nbd(&uris[0]),
                    (true, 1) => Target::Nbd(&uris[1]),
                    (false, 1) | (true, _) => Target::Nbd(&qemu_uri),
                    (false, _) => Target::File(&direct_file),
                };
                let n = run_fio(w, target, per_round, size)
                    .await
                    .with_context(|| format!("{} on {}", w.name, names[t]))?;
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
        print_workload(&names, w, &nums);
        results.push((w, nums));
    }
    for s in servers {
        s.abort();
    }
    for c in clients {
        let _ = c.detach().await;
    }
    cluster.shutdown().await;

    println!();
    print_table(&names, &results);
    if let Some(r) = encode_gbps {
        println!("RAID6 4+2 P/Q encode: {r:.2} GB/s of data on one core (64 KiB chunks)");
    }
    if let Some(path) = &args.json {
        let mut doc = to_json(&args, &names, &results, &load);
        if let Some(r) = encode_gbps {
            doc["raid6_encode_gbps_one_core"] = json!(r);
        }
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

fn print_header(names: &[&str; 3]) {
    println!(
        "{:<18} {:<9} {:>9} {:>9} {:>9} {:>9}   {:>9} {:>9}",
        "workload",
        "target",
        "IOPS",
        "MB/s",
        "p50 us",
        "p99 us",
        format!("÷{}", names[1]),
        format!("÷{}", names[2])
    );
}

fn print_workload(names: &[&str; 3], w: &Workload, n: &[Numbers; 3]) {
    print_header(names);
    print_rows(names, w, n);
}

fn print_rows(names: &[&str; 3], w: &Workload, n: &[Numbers; 3]) {
    for (i, t) in names.iter().enumerate() {
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

fn print_table(names: &[&str; 3], results: &[(&Workload, [Numbers; 3])]) {
    println!(
        "Ratios are {}'s IOPS (= MB/s) over the other target's; latencies are fio's completion latency.",
        names[0]
    );
    print_header(names);
    for (w, n) in results {
        print_rows(names, w, n);
    }
}

fn to_json(
    args: &BenchArgs,
    names: &[&str; 3],
    results: &[(&Workload, [Numbers; 3])],
    load: &str,
) -> Value {
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
            let key = |s: &str| s.replace('-', "_");
            let (a, b, c) = (key(names[0]), key(names[1]), key(names[2]));
            let mut o = serde_json::Map::new();
            o.insert("workload".into(), json!(w.name));
            o.insert("rw".into(), json!(w.rw));
            o.insert("bs".into(), json!(w.bs));
            o.insert("iodepth".into(), json!(w.qd));
            o.insert(a.clone(), num(&n[0]));
            o.insert(b.clone(), num(&n[1]));
            o.insert(c.clone(), num(&n[2]));
            o.insert(format!("{a}_over_{b}"), json!(ratio(n[0].iops, n[1].iops)));
            o.insert(format!("{a}_over_{c}"), json!(ratio(n[0].iops, n[2].iops)));
            o.insert(
                format!("p50_{a}_over_{b}"),
                json!(ratio(n[0].p50_us, n[1].p50_us)),
            );
            Value::Object(o)
        })
        .collect();
    json!({
        "raid": args.raid,
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
