//! toma-core must stay pure: no tokio, no sockets, no files, no clock.

use std::path::Path;

const FORBIDDEN: &[&str] = &[
    "tokio",
    "std::net",
    "std::fs",
    "std::time",
    "std::thread",
    "std::process",
    "std::env",
    "Instant",
    "SystemTime",
];

fn scan(dir: &Path, hits: &mut Vec<String>) {
    let entries = std::fs::read_dir(dir).expect("read src dir");
    for e in entries {
        let p = e.expect("dir entry").path();
        if p.is_dir() {
            scan(&p, hits);
        } else if p.extension().is_some_and(|x| x == "rs") {
            let text = std::fs::read_to_string(&p).expect("read source");
            for (n, line) in text.lines().enumerate() {
                for f in FORBIDDEN {
                    if line.contains(f) {
                        hits.push(format!("{}:{}: {f}", p.display(), n + 1));
                    }
                }
            }
        }
    }
}

#[test]
fn sources_use_no_io_async_or_clock() {
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let mut hits = Vec::new();
    scan(&src, &mut hits);
    assert!(
        hits.is_empty(),
        "toma-core must stay pure:\n{}",
        hits.join("\n")
    );
}

#[test]
fn manifest_has_only_pure_dependencies() {
    let manifest =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("Cargo.toml"))
            .expect("read Cargo.toml");
    let deps = manifest
        .split("[dependencies]")
        .nth(1)
        .expect("a [dependencies] table")
        .split("\n[")
        .next()
        .unwrap_or("");
    let names: Vec<&str> = deps
        .lines()
        .filter_map(|l| l.split(['=', '.']).next())
        .map(str::trim)
        .filter(|n| !n.is_empty() && !n.starts_with('#'))
        .collect();
    let allowed = ["thiserror"];
    for n in &names {
        assert!(
            allowed.contains(n),
            "toma-core depends on {n}; only {allowed:?} are allowed"
        );
    }
}
