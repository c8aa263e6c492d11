//! Helpers for end-to-end tests: a throwaway PostgreSQL, the real `platform-service`
//! binary on free ports, and clients for its HTTP and Flight SQL interfaces.

pub mod postgres;
pub mod tier;

use std::path::PathBuf;

/// Directory holding the workspace's built binaries: the profile directory, which holds a
/// binary such as `tier-bench` itself, or the parent of a test executable's `deps/`.
pub fn bin_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable dir");
    if dir.file_name().is_some_and(|n| n == "deps") {
        dir.parent().expect("profile dir").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The workspace root, for fixtures such as `examples/` and `integration-tests/slt/`.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root").to_path_buf()
}

/// A free TCP port on loopback (for servers such as PostgreSQL that cannot report theirs).
pub fn free_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind port 0");
    listener.local_addr().expect("local addr").port()
}
