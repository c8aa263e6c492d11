//! What Strata's fuzz targets run. Each target takes bytes the way an attacker or a broken
//! disk delivers them to one of our decoders, through the same code a live tier runs:
//!
//! | target | the bytes are | reaches |
//! |---|---|---|
//! | `config` | a config file | interpolation, the alias bound, YAML, every validation |
//! | `flight_sql` | a gRPC request body to one Flight SQL method | gRPC framing, Flight SQL command and ticket decoding, the handlers |
//! | `statement_handle` | a prepared-statement handle sent back by a client | handle decoding, bound parameters, execution |
//! | `ingest` | the body of an edge write (Arrow IPC or CSV) | IPC framing checks, decoding, conforming to the table |
//! | `ingest_log` | a segment of the edge's ingest log on disk | record framing, checksums, torn-tail repair |
//! | `tier_protocol` | a gRPC request body to one tier RPC | framing, prost decoding, the tier handlers |
//! | `shipped_plan` | a datafusion-proto plan another tier shipped | plan decoding, the leaf check, execution |
//!
//! A target fails by panicking (libFuzzer reports it and keeps the input), by a call that
//! hangs past its bound, or by breaking an invariant it asserts. The cargo-fuzz binaries in
//! `fuzz/` are one line each around [`run`]; CI replays the committed corpora and a bounded
//! number of mutations of them through the same functions (`tests/corpus.rs`).

mod harness;
pub mod mutate;
pub mod seeds;
mod targets;

/// A fuzz target: its name (the cargo-fuzz binary and `fuzz/corpus/<name>`) and its body.
pub struct Target {
    pub name: &'static str,
    pub run: fn(&[u8]) -> Outcome,
}

/// What a target did with an input that it survived: libFuzzer ignores it; the corpus
/// replay checks that the seeds get through (a harness whose every input is refused at
/// the first check would fuzz nothing).
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    Accepted,
    /// Refused with a clean error (the message says which).
    Refused(String),
}

impl Outcome {
    /// The first refusal of two steps.
    pub fn and(self, next: Outcome) -> Outcome {
        match self {
            Outcome::Accepted => next,
            refused => refused,
        }
    }
}

/// Every target, in the order of the table above.
pub const TARGETS: &[Target] = &[
    Target { name: "config", run: targets::config },
    Target { name: "flight_sql", run: targets::flight_sql },
    Target { name: "statement_handle", run: targets::statement_handle },
    Target { name: "ingest", run: targets::ingest },
    Target { name: "ingest_log", run: targets::ingest_log },
    Target { name: "tier_protocol", run: targets::tier_protocol },
    Target { name: "shipped_plan", run: targets::shipped_plan },
];

/// Runs target `name` on `data`; panics on an unknown name.
pub fn run(name: &str, data: &[u8]) -> Outcome {
    let target = TARGETS.iter().find(|t| t.name == name).unwrap_or_else(|| panic!("no fuzz target `{name}`"));
    (target.run)(data)
}

/// Installs the panic policy of a fuzz run: a panic is a finding when it escapes the
/// target, and libFuzzer sees those (it runs each input under `catch_unwind` and aborts on
/// an unwind). Panics the tiers catch on purpose are not: Arrow's IPC and Flight decoders
/// and datafusion-proto's plan decoder panic on some malformed input, and Strata runs them
/// under a guard that turns that into a clean INVALID_ARGUMENT (`strata_core::ipc::guarded`,
/// `strata_core::plan_codec::decode_plan`). libFuzzer's own hook would abort on those too,
/// so this puts back the default hook, which only prints.
pub fn install_panic_policy() {
    drop(std::panic::take_hook());
}
