#![no_main]
//! See the `ingest` row in strata-fuzzing's table of targets.

libfuzzer_sys::fuzz_target!(init: strata_fuzzing::install_panic_policy(), |data: &[u8]| {
    let _ = strata_fuzzing::run("ingest", data);
});
