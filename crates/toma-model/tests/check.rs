//! The model passes as configured by default, and each deliberate bug is caught.

use toma_model::{check, Config, Mutation, Raid};

fn run(mutation: Option<Mutation>) -> toma_model::Outcome {
    let cfg = Config {
        mutation,
        // Early advance lets the leader race ahead, which multiplies the states before the
        // first counterexample; it needs no read to break exclusion.
        reads: if mutation == Some(Mutation::EarlyAdvance) {
            0
        } else {
            1
        },
        ..Config::default()
    };
    match check(Raid::Raid1, cfg) {
        Ok(o) => o,
        Err(e) => panic!("config refused: {e}"),
    }
}

#[test]
fn default_raid1_passes_with_at_least_100k_states() {
    let o = run(None);
    if let Some((name, trace)) = &o.violation {
        panic!("{name} violated:\n{trace}");
    }
    assert!(o.states >= 100_000, "only {} states", o.states);
}

fn assert_caught(m: Mutation, expect: &[&str]) {
    let o = run(Some(m));
    let Some((name, trace)) = o.violation else {
        panic!("{} was not caught ({} states)", m.name(), o.states);
    };
    assert!(
        expect.iter().any(|e| name.starts_with(e)),
        "{}: unexpected property {name}:\n{trace}",
        m.name()
    );
    assert!(trace.contains("property violated"), "{trace}");
    assert!(trace.lines().count() > 4, "{trace}");
}

#[test]
fn skip_dual_lock_is_caught() {
    assert_caught(Mutation::SkipDualLock, &["P5", "P1", "P2", "P4"]);
}

#[test]
fn no_dirty_bits_is_caught() {
    assert_caught(Mutation::NoDirtyBits, &["P1", "P2", "P3", "P4"]);
}

#[test]
fn read_from_w_is_caught() {
    assert_caught(Mutation::ReadFromW, &["P1", "P2", "P3"]);
}

#[test]
fn early_advance_is_caught() {
    assert_caught(Mutation::EarlyAdvance, &["P1", "P2", "P4", "P5", "P6"]);
}

#[test]
fn raid6_is_refused_for_now() {
    let e = check(Raid::Raid6, Config::default()).err();
    assert_eq!(
        e.map(|e| e.to_string()),
        Some("raid6 model not available yet".to_string())
    );
}

#[test]
fn mutation_names_round_trip() {
    for m in Mutation::ALL {
        assert_eq!(Mutation::parse(m.name()), Some(m));
    }
    assert_eq!(Mutation::parse("nope"), None);
}
