//! Replays every fuzz target's inputs in CI: its seeds, everything committed under
//! `fuzz/corpus/<target>/` (seeds and regressions of crashes the fuzzer found), and a fixed
//! number of deterministic mutations of them. A target panics on a finding, so this fails
//! with the target, the input's name and its bytes.

use std::path::PathBuf;

use strata_fuzzing::mutate::{Rng, mutate};
use strata_fuzzing::{Outcome, TARGETS, Target};

/// Mutations per target in CI (`STRATA_FUZZ_MUTATIONS` overrides: the replay is a smoke
/// test; coverage-guided fuzzing is `scripts/fuzz.sh`).
fn mutations() -> usize {
    std::env::var("STRATA_FUZZ_MUTATIONS").ok().and_then(|n| n.parse().ok()).unwrap_or(300)
}

fn corpus_dir(target: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus").join(target)
}

/// Seeds and committed corpus files of `target`, by name.
fn inputs(target: &Target) -> Vec<(String, Vec<u8>)> {
    let mut inputs: Vec<(String, Vec<u8>)> = strata_fuzzing::seeds::all()
        .into_iter()
        .filter(|s| s.target == target.name)
        .map(|s| (s.name, s.data))
        .collect();
    if let Ok(entries) = std::fs::read_dir(corpus_dir(target.name)) {
        let mut files: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
        files.sort();
        for path in files {
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
            inputs.push((name, std::fs::read(&path).expect("a corpus file")));
        }
    }
    inputs
}

/// Runs `target` on `data`, naming the input if it panics.
fn replay(target: &Target, name: &str, data: &[u8]) -> Outcome {
    let outcome = std::panic::catch_unwind(|| (target.run)(data));
    match outcome {
        Ok(outcome) => outcome,
        Err(panic) => {
            let message = panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            // Kept where `scripts/fuzz.sh` users look, to be copied into fuzz/corpus/ once fixed.
            let dir = std::env::temp_dir().join("strata-fuzz-failures").join(target.name);
            let file = dir.join(name.replace(' ', "-"));
            let saved = std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(&file, data));
            panic!(
                "fuzz target `{}` fails on input `{name}` ({} bytes{}): {message}",
                target.name,
                data.len(),
                saved.map(|_| format!(", saved as {}", file.display())).unwrap_or_default()
            );
        }
    }
}

/// Seeds that a platform refuses by design (each still exercises the decoding up to the
/// refusal): a write statement, bulk ingest into a tier that takes no writes, an edge
/// upload into a dataset that is not `writable`.
const REFUSED_SEEDS: &[&str] = &["seed-put-update", "seed-put-ingest", "seed-ingest"];

fn check(name: &str) {
    let target = TARGETS.iter().find(|t| t.name == name).expect("a target");
    let inputs = inputs(target);
    assert!(inputs.iter().any(|(n, _)| n.starts_with("seed-")), "target `{name}` has no seeds");
    for (input, data) in &inputs {
        let outcome = replay(target, input, data);
        let refused_by_design = REFUSED_SEEDS.contains(&input.as_str()) && name != "ingest";
        if input.starts_with("seed-") && !refused_by_design {
            assert_eq!(outcome, Outcome::Accepted, "seed `{input}` of `{name}` should get through");
        }
    }
    let mut rng = Rng::new(0x5157_A7A0 ^ name.len() as u64);
    for i in 0..mutations() {
        let (base, data) = &inputs[rng.below(inputs.len())];
        let (_, other) = &inputs[rng.below(inputs.len())];
        let mutant = mutate(data, other, &mut rng);
        replay(target, &format!("mutation {i} of {base}"), &mutant);
    }
}

#[test]
fn config() {
    check("config");
}

#[test]
fn flight_sql() {
    check("flight_sql");
}

#[test]
fn statement_handle() {
    check("statement_handle");
}

#[test]
fn ingest() {
    check("ingest");
}

#[test]
fn ingest_log() {
    check("ingest_log");
}

#[test]
fn tier_protocol() {
    check("tier_protocol");
}

#[test]
fn shipped_plan() {
    check("shipped_plan");
}

#[test]
fn every_target_is_replayed_here() {
    let names: Vec<&str> = TARGETS.iter().map(|t| t.name).collect();
    let this_file = include_str!("corpus.rs");
    for name in names {
        assert!(this_file.contains(&format!("check(\"{name}\")")), "target `{name}` has no replay test");
    }
}
