//! Arrow Flight SQL for every tier.

mod codec;
mod handle;
mod metadata;
mod prefetch;
mod service;
mod session;
mod sql_info;
mod sql_service;
mod statement;

use arrow_flight::flight_service_server::FlightServiceServer;
use strata_core::Engine;

pub use service::StrataFlightService;
pub use sql_service::StrataFlightSql;

/// The gRPC service for Flight SQL, bounded by `limits.max_message_size` both ways.
pub fn flight_server(engine: Engine) -> FlightServiceServer<StrataFlightService> {
    let max = engine.limits().max_message_size.as_usize();
    FlightServiceServer::new(StrataFlightService::new(StrataFlightSql::new(engine)))
        .max_decoding_message_size(max)
        .max_encoding_message_size(max)
}
