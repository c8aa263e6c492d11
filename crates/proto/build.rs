//! Compiles `proto/strata/v1` with a vendored `protoc`, so building needs nothing installed,
//! and writes the descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let protos = [root.join("strata/v1/tier.proto")];
    for proto in &protos {
        println!("cargo:rerun-if-changed={}", proto.display());
    }
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    // Arrow frames are passed on without copying.
    config.bytes(["."]);
    // Our codec: a message that does not decode is the caller's error (INVALID_ARGUMENT),
    // not a server fault (tonic's INTERNAL).
    tonic_prost_build::configure()
        .codec_path("crate::codec::TierCodec")
        .file_descriptor_set_path(out.join("strata_v1_descriptor.bin"))
        .compile_with_config(config, &protos, &[root])?;
    Ok(())
}
