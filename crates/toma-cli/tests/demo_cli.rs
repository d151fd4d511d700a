//! `toma demo` end to end, shortened: a disk killed and rebuilt under a verifying workload,
//! every block checked on every mirror, exit 0 only when all verified.

use std::process::Command;

/// Runs a shortened `toma demo` with `extra` flags; panics unless it exits 0. Its stdout.
fn demo_ok(extra: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_toma"))
        .arg("demo")
        .args(extra)
        .args(["--phase-secs", "1", "--size-mib", "32", "--iops", "1000"])
        .output()
        .expect("run toma demo");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "demo failed:\n{stdout}\n{stderr}");
    stdout
}

#[test]
fn demo_kills_a_disk_rebuilds_and_verifies_every_block() {
    let stdout = demo_ok(&[]);
    for phase in [
        "Degraded",
        "RebuildInit",
        "Rebuilding",
        "DualLock",
        "Normal",
    ] {
        assert!(stdout.contains(phase), "phase {phase} not shown:\n{stdout}");
    }
    assert!(stdout.contains("errors               0"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
}

#[test]
fn raid6_demo_loses_two_disks_and_verifies_data_and_parity() {
    let stdout = demo_ok(&["--raid", "raid6"]);
    assert_eq!(
        stdout.matches("killing ").count(),
        2,
        "two disks killed:\n{stdout}"
    );
    // Both returned members are rebuilt in the same pass (one Rebuilding line with two W).
    assert!(
        stdout
            .lines()
            .any(|l| l.contains("Rebuilding") && l.matches(":W").count() == 2),
        "{stdout}"
    );
    assert!(stdout.contains("errors               0"), "{stdout}");
    assert!(stdout.contains("P and Q of all 128 stripes"), "{stdout}");
    assert!(stdout.lines().any(|l| l == "ok"), "{stdout}");
}

#[test]
fn demo_refuses_bad_flags_naming_them() {
    let out = Command::new(env!("CARGO_BIN_EXE_toma"))
        .args(["demo", "--mirrors", "5"])
        .output()
        .expect("run toma demo");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mirrors"), "{stderr}");
    let out = Command::new(env!("CARGO_BIN_EXE_toma"))
        .args(["demo", "--raid", "raid6", "--data-members", "1"])
        .output()
        .expect("run toma demo");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("dataMembers = 1"), "{stderr}");
}
