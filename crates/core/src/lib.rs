//! Strata's engine, shared by every tier: configuration, sources, accelerated copies and
//! their refresh, and the read-only query path with its limits.

pub mod accelerator;
mod announced;
pub mod auth;
pub mod background;
mod bounded_functions;
pub mod config;
pub mod contained_panic;
mod cooperative_joins;
pub mod dataset;
pub mod encoded;
pub mod engine;
pub mod error;
pub mod generation;
mod ingest;
pub mod ipc;
pub mod key_index;
pub mod key_lookup;
mod literal_shapes;
mod parameterize;
pub mod pem;
mod placeholders;
mod plan_cache;
pub mod plan_codec;
mod plan_size;
pub mod progress;
pub mod query;
pub mod read_only;
pub mod refresh;
pub mod results_cache;
pub mod routing;
pub mod sink;
pub mod source;
mod source_tls;
mod statement_bounds;
pub mod tenant_memory;
pub mod trace_context;
mod traced_postgres;
pub mod writes;
pub mod zone_map;
pub mod zone_scan;

pub use config::Config;
pub use dataset::DatasetStatus;
pub use engine::{Engine, PlannedQuery};
pub use error::{ErrorKind, Result, StrataError};
pub use query::{Finished, Outcome, QueryObserver, QueryStream};
pub use routing::{QueryOptions, Route, RouteInfo, RouteReason, Router};

/// The hasher of the caches every query looks up by its text (plans, recipes, results):
/// foldhash, seeded at random per process, not std's SipHash (callgrind: a lookup's miss
/// by text went from 1.2k to 0.7k instructions). Keys are compared whole after the hash, so
/// a collision costs a miss, never a wrong entry.
pub(crate) type FastHash = hashbrown::DefaultHashBuilder;
