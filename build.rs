//! Compiles the native gRPC API (`proto-spec/drl/v1/ratelimiter.proto`) with
//! a pure-Rust protobuf compiler, so a build needs no `protoc` on the machine.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto-spec/drl/v1/ratelimiter.proto";
    println!("cargo:rerun-if-changed={proto}");
    let descriptors = protox::compile([proto], ["proto-spec"])?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}
