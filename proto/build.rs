//! Generates the tonic/prost code from `proto/*.proto` with a vendored `protoc`, so a fresh
//! machine needs no system protobuf install.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // prost-build finds protoc through this variable; build scripts run single-threaded.
    std::env::set_var("PROTOC", protoc);
    let protos = [
        "proto/raft.proto",
        "proto/cluster.proto",
        "proto/jobs.proto",
        "proto/node.proto",
        "proto/etcd.proto",
        "proto/sandbox.proto",
    ];
    tonic_prost_build::configure()
        .btree_map(".")
        // Exec output and file chunks pass through the replica's proxy without a copy.
        .bytes(".surge.sandbox")
        .compile_protos(&protos, &["proto"])?;
    for p in protos {
        println!("cargo:rerun-if-changed={p}");
    }
    Ok(())
}
