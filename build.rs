//! Compiles proto/ with protox (pure Rust), so building needs no protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "proto/ca.proto",
            "proto/citadel/jwtsvid.proto",
            "proto/citadel/federation.proto",
            "proto/spiffe/workload.proto",
            "proto/spiffe/broker.proto",
        ],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        .compile_fds(fds)?;
    // The SPIFFE Workload API's descriptors (with google/protobuf/struct.proto), for the
    // gRPC reflection the agent serves beside it on its socket.
    let workload = protox::compile(["proto/spiffe/workload.proto"], ["proto"])?;
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(
        out.join("spiffe_workload_descriptor.bin"),
        prost::Message::encode_to_vec(&workload),
    )?;
    Ok(())
}
