//! `toma sim`: the deterministic simulation (crates/toma-sim). `--seed N` replays one run
//! and prints its event log; `--seeds COUNT` runs many and prints every failing seed with
//! the command that replays it.

use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::Instant;

use clap::{Args as ClapArgs, ValueEnum};
use toma_sim::{replay_command, Mutation, Options};

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Raid {
    Raid1,
    Raid6,
}

#[derive(Debug, ClapArgs)]
pub struct Args {
    /// Replay one seed and print its event log.
    #[arg(long, conflicts_with = "seeds")]
    pub seed: Option<u64>,
    /// Run this many seeds (from --first on) and print each failing one.
    #[arg(long)]
    pub seeds: Option<u64>,
    /// The first seed of --seeds.
    #[arg(long, default_value_t = 0)]
    pub first: u64,
    #[arg(long, value_enum, default_value_t = Raid::Raid1)]
    pub raid: Raid,
    /// A deliberate bug: skip-dual-lock, no-dirty-bits, read-from-w, early-advance.
    #[arg(long, value_name = "NAME")]
    pub mutate: Option<String>,
    /// Parallel runs (default: the number of CPUs).
    #[arg(long)]
    pub jobs: Option<usize>,
    /// With --seeds: stop after this many failing seeds.
    #[arg(long)]
    pub stop_after: Option<u64>,
    /// With --seed: print the event log as it happens (stderr). The log can also follow
    /// blocks (`TOMA_SIM_TRACE_BLOCK=N` or `FIRST-LAST`: each read and write of them) and
    /// a lock unit's frames (`TOMA_SIM_TRACE_UNIT=U`: its LOCK/UNLOCK/INTENT/WRITE frames
    /// and their answers, with fences and topology switches).
    #[arg(long)]
    pub verbose: bool,
    /// RAID6: let faults take more than two members away at once (a whole-cluster power
    /// loss while the volume is degraded, a third loss before the first two are rebuilt).
    /// Without it a RAID6 run keeps to RAID6's promise and skips such a fault. Beyond it
    /// the write hole remains: docs/datapath.md, "Beyond two losses".
    #[arg(long)]
    pub unbounded_losses: bool,
}

pub fn run(args: Args) -> ExitCode {
    if args.unbounded_losses && !matches!(args.raid, Raid::Raid6) {
        eprintln!("toma sim: --unbounded-losses is for --raid raid6 (a RAID1 run has no bound)");
        return ExitCode::from(2);
    }
    let mutation = match args.mutate.as_deref() {
        None => None,
        Some(name) => match Mutation::parse(name) {
            Some(m) => Some(m),
            None => {
                let names: Vec<&str> = Mutation::ALL.iter().map(|m| m.name()).collect();
                eprintln!(
                    "toma sim: unknown mutation {name:?}; known: {}",
                    names.join(", ")
                );
                return ExitCode::from(2);
            }
        },
    };
    let opts = Options {
        mutation,
        raid6: matches!(args.raid, Raid::Raid6),
        verbose: args.verbose,
        unbounded_losses: args.unbounded_losses,
        ..Options::default()
    };
    match (args.seed, args.seeds) {
        (Some(seed), _) => replay(seed, &opts),
        (None, Some(count)) => many(args.first, count, &opts, args.jobs, args.stop_after),
        (None, None) => {
            eprintln!("toma sim: give --seed N (replay one run) or --seeds COUNT (run many)");
            ExitCode::from(2)
        }
    }
}

fn replay(seed: u64, opts: &Options) -> ExitCode {
    let r = toma_sim::run(seed, opts);
    if !opts.verbose {
        for line in &r.log {
            println!("{line}");
        }
    }
    let faults: Vec<&str> = r.faults.iter().copied().collect();
    println!(
        "seed {seed}: {:.1} simulated seconds, {} fault kinds: {}{}",
        r.sim_secs,
        faults.len(),
        faults.join(", "),
        if r.skipped > 0 {
            format!("; {} faults skipped (RAID6's two losses)", r.skipped)
        } else {
            String::new()
        }
    );
    match r.violation {
        Some(v) => {
            println!("FAILED seed {seed}: {v}");
            ExitCode::from(1)
        }
        None => {
            println!("ok");
            ExitCode::SUCCESS
        }
    }
}

fn many(
    first: u64,
    count: u64,
    opts: &Options,
    jobs: Option<usize>,
    stop_after: Option<u64>,
) -> ExitCode {
    let jobs = jobs
        .or_else(|| std::thread::available_parallelism().ok().map(|n| n.get()))
        .unwrap_or(1)
        .max(1);
    let next = AtomicU64::new(first);
    let end = first.saturating_add(count);
    let failed = AtomicU64::new(0);
    let done = AtomicU64::new(0);
    let faults = AtomicU64::new(0);
    let skipped = AtomicU64::new(0);
    let out = Mutex::new(());
    let started = Instant::now();
    std::thread::scope(|s| {
        for _ in 0..jobs {
            s.spawn(|| loop {
                if stop_after.is_some_and(|n| failed.load(Ordering::SeqCst) >= n) {
                    return;
                }
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= end {
                    return;
                }
                let r = toma_sim::run(seed, opts);
                done.fetch_add(1, Ordering::SeqCst);
                faults.fetch_add(r.faults.len() as u64, Ordering::SeqCst);
                skipped.fetch_add(r.skipped as u64, Ordering::SeqCst);
                if let Some(v) = r.violation {
                    failed.fetch_add(1, Ordering::SeqCst);
                    let _g = out.lock();
                    println!("FAILED seed {seed}: {v}");
                    println!("  replay: {}", replay_command(seed, opts));
                }
            });
        }
    });
    let n = done.load(Ordering::SeqCst);
    let f = failed.load(Ordering::SeqCst);
    let secs = started.elapsed().as_secs_f64();
    let skipped = skipped.load(Ordering::SeqCst);
    let bound = if skipped > 0 {
        format!(", {skipped} faults skipped (they would have taken a third RAID6 member away)")
    } else {
        String::new()
    };
    println!(
        "{n} seeds in {secs:.1}s ({:.1} seeds/s, {jobs} jobs), {:.1} fault kinds per seed on average{bound}, {f} failed",
        n as f64 / secs.max(1e-9),
        faults.load(Ordering::SeqCst) as f64 / (n.max(1) as f64)
    );
    if f > 0 {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
