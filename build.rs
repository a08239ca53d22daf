//! Compiles proto/ into Rust with protox (a protobuf compiler in Rust), so a
//! fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(
        ["build/bazel/remote/execution/v2/remote_execution.proto", "google/bytestream/bytestream.proto"],
        ["proto"],
    )?;
    tonic_prost_build::configure()
        // Blob payloads are `bytes::Bytes`: passed along without copying.
        .bytes(".")
        .compile_fds(fds)?;
    Ok(())
}
