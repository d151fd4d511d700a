//! The agent's disk registry and its CLI/config parsing, on real files.

use std::path::{Path, PathBuf};

use clap::Parser;
use toma_agent::cli::Cli;
use toma_agent::*;
use toma_core::DiskId;

const CLUSTER: ClusterId = ClusterId(0xc1);
const MIB: u64 = 1 << 20;

fn make_file(dir: &Path, name: &str, size: u64) -> PathBuf {
    let p = dir.join(name);
    std::fs::File::create(&p).unwrap().set_len(size).unwrap();
    p
}

fn ids() -> impl FnMut() -> Result<DiskId, DisksError> {
    let mut n = 100u128;
    move || {
        n += 1;
        Ok(DiskId(n))
    }
}

fn cfg(disks: &[&PathBuf], force: &[&PathBuf]) -> DiskConfig {
    DiskConfig {
        cluster: CLUSTER,
        disks: disks.iter().map(|p| (*p).clone()).collect(),
        force_format: force.iter().map(|p| (*p).clone()).collect(),
        host_boot: 0,
    }
}

#[test]
fn new_disks_are_formatted_and_reopened_with_their_ids() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_file(dir.path(), "a", 4 * MIB);
    let b = make_file(dir.path(), "b", 4 * MIB);
    let first: Vec<DiskId> = {
        let disks = Disks::open_with(&cfg(&[&a, &b], &[]), &mut ids()).unwrap();
        assert_eq!(disks.len(), 2);
        disks.iter().map(|(_, d)| d.id()).collect()
    };
    assert_eq!(first, vec![DiskId(101), DiskId(102)]);
    let disks = Disks::open(&cfg(&[&a, &b], &[])).unwrap();
    let again: Vec<DiskId> = disks.iter().map(|(_, d)| d.id()).collect();
    assert_eq!(again, first, "reopening keeps the UUIDs");
    assert!(disks.get(DiskId(101)).is_some());
}

#[test]
fn garbage_is_refused_unless_force_formatted() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_file(dir.path(), "a", 4 * MIB);
    std::fs::write(&a, vec![0x42u8; 4 * MIB as usize]).unwrap();
    let before = std::fs::read(&a).unwrap();
    let err = Disks::open_with(&cfg(&[&a], &[]), &mut ids()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains(&a.display().to_string()), "{msg}");
    assert!(msg.contains("--force-format"), "{msg}");
    assert_eq!(std::fs::read(&a).unwrap(), before);
    let disks = Disks::open_with(&cfg(&[&a], &[&a]), &mut ids()).unwrap();
    assert_eq!(disks.len(), 1);
}

#[test]
fn missing_small_and_in_use_paths_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nope");
    let err = Disks::open_with(&cfg(&[&missing], &[]), &mut ids()).unwrap_err();
    assert!(err.to_string().contains("nope"), "{err}");
    assert!(err.to_string().contains("does not exist"), "{err}");

    let small = make_file(dir.path(), "small", MIB);
    let err = Disks::open_with(&cfg(&[&small], &[]), &mut ids()).unwrap_err();
    assert!(err.to_string().contains("too small"), "{err}");
    assert!(err.to_string().contains("small"), "{err}");

    let a = make_file(dir.path(), "a", 4 * MIB);
    let _held = Disks::open_with(&cfg(&[&a], &[]), &mut ids()).unwrap();
    let err = Disks::open_with(&cfg(&[&a], &[]), &mut ids()).unwrap_err();
    let msg = err.to_string();
    assert!(msg.contains("is in use by another agent"), "{msg}");
    assert!(
        msg.contains(&format!("pid {}", std::process::id())),
        "{msg}"
    );
}

#[test]
fn force_format_must_name_a_disk() {
    let dir = tempfile::tempdir().unwrap();
    let a = make_file(dir.path(), "a", 4 * MIB);
    let b = dir.path().join("b");
    let err = Disks::open_with(&cfg(&[&a], &[&b]), &mut ids()).unwrap_err();
    assert!(matches!(err, DisksError::ForceNotADisk(_)), "{err}");
}

#[test]
fn cli_and_config_file_merge() {
    let dir = tempfile::tempdir().unwrap();
    let conf = dir.path().join("agent.toml");
    std::fs::write(
        &conf,
        "cluster = \"00000000-0000-0000-0000-0000000000c1\"\ndisks = [\"/dev/x\"]\nlisten = \"ignored by the storage layer\"\n",
    )
    .unwrap();
    let cli = Cli::try_parse_from([
        "toma-agent",
        "--config",
        conf.to_str().unwrap(),
        "--disk",
        "/dev/y",
        "--disk",
        "/dev/z",
        "--force-format",
        "/dev/z",
    ])
    .unwrap();
    let c = cli.disks.resolve().unwrap();
    assert_eq!(c.cluster, CLUSTER);
    assert_eq!(
        c.disks,
        vec![
            PathBuf::from("/dev/x"),
            PathBuf::from("/dev/y"),
            PathBuf::from("/dev/z")
        ]
    );
    assert_eq!(c.force_format, vec![PathBuf::from("/dev/z")]);

    let cli = Cli::try_parse_from(["toma-agent", "--disk", "/dev/y"]).unwrap();
    assert!(matches!(cli.disks.resolve(), Err(DisksError::NoCluster)));
    let cli = Cli::try_parse_from(["toma-agent", "--cluster", "xyz"]).unwrap();
    assert!(matches!(
        cli.disks.resolve(),
        Err(DisksError::BadCluster(_))
    ));
}
