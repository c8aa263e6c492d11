//! The downstream side of the tier protocol, shared by sidecars, edge agents and platforms
//! with peers: a resilient upstream client (tower), tables that execute upstream, replicas
//! kept current by version, and the router that decides where each query runs.

pub mod breaker;
pub mod client;
pub mod disk;
pub mod replica;
pub mod router;
pub mod table;
pub mod wire;

pub use client::UpstreamClient;
pub use router::TierRouter;
