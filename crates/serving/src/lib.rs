//! Strata's serving layer, written once for every tier: Flight SQL, the HTTP API, metrics,
//! limits, start-up and graceful shutdown.

pub mod auth;
pub mod cluster;
mod coalesced_writes;
pub mod connections;
pub mod flight;
pub mod http;
pub mod metrics;
pub mod process;
pub mod route_headers;
mod self_wake;
pub mod server;
pub mod stack;
pub mod status;
pub mod telemetry;
pub mod tier;
pub mod tls;
pub mod trace_sink;

pub use server::{ServeError, Servers, start};
