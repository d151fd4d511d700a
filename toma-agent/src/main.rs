//! The per-node TOMA agent: disks, locks, dirty bits, clients, rebuild
#![forbid(unsafe_code)]

fn main() {
    println!("toma-agent {}", env!("CARGO_PKG_VERSION"));
}
