//! `toma`: the command a user types.
#![forbid(unsafe_code)]

fn main() {
    println!("toma {}", env!("CARGO_PKG_VERSION"));
}
