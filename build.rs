//! Compiles proto/ into Rust with protox (a protobuf compiler in Rust), so a
//! fresh machine needs no system protoc, and generates the canonical proto3
//! JSON mapping of every message (pbjson) for the REST face.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        [
            "build/bazel/remote/execution/v2/remote_execution.proto",
            "build/bazel/remote/asset/v1/remote_asset.proto",
            "google/bytestream/bytestream.proto",
        ],
        ["proto"],
    )?;
    let descriptors = fds.encode_to_vec();
    // The codec (src/codec.rs) counts entries by the messages' schema.
    let out = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out.join("descriptors.bin"), &descriptors)?;
    // Type names let larder's codec tell requests apart.
    let mut config = tonic_prost_build::Config::new();
    config.enable_type_names();
    tonic_prost_build::configure()
        .codec_path("crate::codec::Codec")
        // Blob payloads are `bytes::Bytes`: passed along without copying.
        .bytes(".")
        // Well-known types with serde support, for the JSON mapping.
        .compile_well_known_types(true)
        .extern_path(".google.protobuf", "::pbjson_types")
        .compile_fds_with_config(fds, config)?;
    pbjson_build::Builder::new().register_descriptors(&descriptors)?.build(&[
        ".build.bazel",
        ".google.bytestream",
        ".google.rpc",
    ])?;
    Ok(())
}
