//! Prints every Toma CRD as YAML, or writes one file per CRD into a directory.
//!
//! `cargo run -p toma-crds --bin crdgen` (stdout) or `... -- crds` (what `make crds` does).

use std::process::ExitCode;

fn main() -> ExitCode {
    let files = match toma_crds::generated() {
        Ok(f) => f,
        Err(e) => {
            eprintln!("crdgen: {e}");
            return ExitCode::FAILURE;
        }
    };
    match std::env::args().nth(1) {
        None => {
            for (_, yaml) in &files {
                print!("{yaml}");
            }
        }
        Some(dir) => {
            for (name, yaml) in &files {
                let path = std::path::Path::new(&dir).join(name);
                if let Err(e) = std::fs::write(&path, yaml) {
                    eprintln!("crdgen: writing {}: {e}", path.display());
                    return ExitCode::FAILURE;
                }
                eprintln!("wrote {}", path.display());
            }
        }
    }
    ExitCode::SUCCESS
}
