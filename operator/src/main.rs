//! The Toma operator: the Lease-elected leader that plans topologies
#![forbid(unsafe_code)]

fn main() {
    println!("toma-operator {}", env!("CARGO_PKG_VERSION"));
}
