//! Compiles `proto/csi.proto` with `protox` (a protobuf compiler written in Rust: no system
//! `protoc` needed) and generates the tonic client and server code into `OUT_DIR`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/csi.proto";
    println!("cargo:rerun-if-changed={proto}");
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;
    Ok(())
}
