//! The Toma CSI driver
#![forbid(unsafe_code)]

fn main() {
    println!("toma-csi {}", env!("CARGO_PKG_VERSION"));
}
