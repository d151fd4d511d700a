//! `toma check-model` flags and exit codes.

use std::process::Command;

fn toma(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_toma"))
        .args(args)
        .output()
        .expect("run toma");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn unknown_mutation_lists_the_allowed_ones() {
    let (code, _, err) = toma(&["check-model", "--mutate", "nope"]);
    assert_eq!(code, 2, "{err}");
    for m in [
        "skip-dual-lock",
        "no-dirty-bits",
        "read-from-w",
        "early-advance",
    ] {
        assert!(err.contains(m), "{err}");
    }
}

#[test]
fn bad_raid_and_clients_are_refused() {
    let (code, _, err) = toma(&["check-model", "--raid", "raid5"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("raid1") && err.contains("raid6"), "{err}");
    let (code, _, err) = toma(&["check-model", "--clients", "0"]);
    assert_eq!(code, 2, "{err}");
}

#[test]
fn raid6_data_members_out_of_range_are_refused() {
    let (code, _, err) = toma(&["check-model", "--raid", "raid6", "--data-members", "5"]);
    assert_eq!(code, 2, "{err}");
    assert!(err.contains("--data-members"), "{err}");
}

#[test]
fn raid6_mutation_prints_a_raid6_counterexample() {
    let (code, out, err) = toma(&["check-model", "--raid", "raid6", "--mutate", "read-from-w"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("property violated"), "{out}");
    assert!(out.contains("of stripe0"), "{out}");
}

#[test]
fn a_mutation_prints_a_counterexample_and_exits_1() {
    let (code, out, err) = toma(&["check-model", "--mutate", "skip-dual-lock"]);
    assert_eq!(code, 1, "{out}{err}");
    assert!(out.contains("states explored"), "{out}");
    assert!(out.contains("property violated"), "{out}");
    assert!(out.contains("leader writes the topology"), "{out}");
}
