//! `strata keygen`: a new API key and the hash that goes into `auth.keys[].hash`.

// The key and hash are this command's output.
#![allow(clippy::print_stdout)]

use std::process::ExitCode;

pub fn main() -> ExitCode {
    match strata_core::auth::generate_key() {
        Ok((key, hash)) => {
            println!("key:  {key}");
            println!("hash: {hash}");
            eprintln!(
                "Give the key to the client (shown once; store it as a secret). Put only the hash in strata.yaml:\n  auth:\n    keys:\n      - {{ id: <name>, tenant: <tenant>, hash: \"{hash}\" }}"
            );
            ExitCode::SUCCESS
        }
        Err(err) => {
            eprintln!("error: {err}");
            ExitCode::FAILURE
        }
    }
}
