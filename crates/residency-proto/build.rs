//! Generates the gRPC code from `proto/` at build time with a vendored protoc, so no system
//! protoc is needed; a `PROTOC` set in the environment wins.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        let protoc = protoc_bin_vendored::protoc_bin_path()?;
        // SAFETY: build scripts are single-threaded; nothing else reads the environment now.
        #[allow(unsafe_code)]
        unsafe {
            std::env::set_var("PROTOC", protoc)
        }
    }
    let proto_root = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    let files = [
        "residency/v1/registry.proto",
        "residency/v1/catalog.proto",
        "residency/v1/watch.proto",
        "residency/v1/cluster.proto",
        "residency/v1/peer.proto",
    ];
    let paths: Vec<PathBuf> = files.iter().map(|file| proto_root.join(file)).collect();
    for path in &paths {
        println!("cargo:rerun-if-changed={}", path.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        .file_descriptor_set_path(out.join("residency_descriptor.bin"))
        .bytes(".residency.peer.v1.RaftPayload.data")
        .compile_protos(&paths, &[proto_root])?;
    Ok(())
}
