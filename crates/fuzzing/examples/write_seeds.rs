//! Writes every target's seeds to `fuzz/corpus/<target>/seed-*` (scripts/fuzz.sh runs it
//! before fuzzing, so the committed seeds follow the encoders).

fn main() -> std::io::Result<()> {
    let corpus = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fuzz/corpus");
    for seed in strata_fuzzing::seeds::all() {
        let dir = corpus.join(seed.target);
        std::fs::create_dir_all(&dir)?;
        std::fs::write(dir.join(&seed.name), &seed.data)?;
    }
    Ok(())
}
