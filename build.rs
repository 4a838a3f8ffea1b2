//! Compiles `proto/fabric/v1/*.proto` with protox (pure Rust), so a fresh
//! build needs no `protoc` on the machine. The file descriptor set is kept for
//! gRPC server reflection.
//!
//! The `EntityService` server is generated a second time, into
//! `OUT_DIR/entity_server/`, with its entity-carrying responses mapped to
//! pre-encoded wire types (`crate::grpc::wire`): the server sends the cached
//! encoding of an entity version instead of encoding it on every read. The
//! bytes on the wire are the same messages; clients use the normal types.

use std::{env, fs, path::PathBuf};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut files: Vec<PathBuf> = fs::read_dir("proto/fabric/v1")?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "proto"))
        .collect();
    files.sort();
    for f in &files {
        println!("cargo:rerun-if-changed={}", f.display());
    }
    let fds = protox::compile(&files, ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(
        out.join("fabric_descriptor.bin"),
        prost::Message::encode_to_vec(&fds),
    )?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(fds)?;

    let server_out = out.join("entity_server");
    fs::create_dir_all(&server_out)?;
    let entity_fds = protox::compile(["proto/fabric/v1/entity.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(false)
        .build_server(true)
        .out_dir(&server_out)
        .extern_path(".fabric.v1.Entity", "crate::grpc::wire::EntityWire")
        .extern_path(
            ".fabric.v1.BatchGetEntitiesResponse",
            "crate::grpc::wire::BatchWire",
        )
        .extern_path(".fabric.v1", "crate::proto")
        .compile_fds(entity_fds)?;
    Ok(())
}
