//! The statement path of Flight SQL: GetFlightInfo plans a statement (and, on a tier with
//! an upstream, starts it early; neither when the results cache holds its answer, nor the
//! start for a key lookup a local index answers), DoGet
//! runs it once per bound parameter row and streams the answers as one, with the route and
//! freshness in headers and `app_metadata`. A results cache hit goes out as the messages
//! kept with the cached answer (encoded by the first DoGet that found it).

use arrow::datatypes::{Schema, SchemaRef};
use arrow_flight::error::FlightError;
use arrow_flight::{FlightDescriptor, FlightEndpoint, FlightInfo, Ticket};
use futures::{StreamExt, TryStreamExt, stream};
use strata_core::query::Delivery;
use tonic::{Response, Status};

use super::codec::{encode_with_metadata, join_messages, split_messages};
use super::handle::StatementHandle;
use super::sql_service::{DoGetStream, StrataFlightSql};
use crate::status::to_grpc;

impl StrataFlightSql {
    /// What GetFlightInfo answers for `handle`'s statement: the schema of its rows. A
    /// statement whose answer the results cache holds (one parameter row, or none) is
    /// neither planned nor started: DoGet finds the answer by its text as cheaply. Otherwise
    /// it is planned, and then, on a tier with an upstream, started now (unless a local key
    /// index answers it) with the id of its run in `handle` for the ticket, so a forwarded
    /// run's upstream call is under way while the client sends DoGet.
    pub(super) async fn info_schema(
        &self,
        handle: &mut StatementHandle,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<SchemaRef, Status> {
        let options = Self::options(metadata);
        // A malformed parameter batch is DoGet's error to report; here it only means no
        // shortcut.
        let mut rows = handle.parameter_rows().unwrap_or_default();
        let single = if rows.len() == 1 { rows.pop() } else { None };
        if let Some(params) = &single
            && let Some(schema) = self.engine.cached_schema(&handle.sql, params, &options)
        {
            return Ok(schema);
        }
        // Planned once, before any early start: a statement that does not plan never
        // starts, and a key lookup a local copy's index answers is left to DoGet (the hand
        // over from the early run's task would cost more than it overlaps).
        let one_row = single.is_some();
        let params = single.unwrap_or_default();
        let (schema, from_index) =
            self.engine.announce(&handle.sql, &params, &options).await.map_err(|e| to_grpc(&e))?;
        if one_row && !from_index && self.engine.has_router() {
            handle.run = self.prefetcher.start(&self.engine, &handle.sql, params, &options);
        }
        Ok(schema)
    }

    /// Schema of a statement's result, planned but not run, for the caller of `metadata`.
    pub(crate) async fn statement_schema(
        &self,
        sql: &str,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<SchemaRef, Status> {
        self.engine.result_schema(sql, &Self::options(metadata)).await.map_err(|e| to_grpc(&e))
    }

    /// A call's query options from its metadata (the caller's tenant among them, marked by
    /// the authentication layer).
    pub(crate) fn options(metadata: &tonic::metadata::MetadataMap) -> strata_core::routing::QueryOptions {
        crate::route_headers::options(metadata.as_ref())
    }

    /// Runs a statement once per bound parameter row and streams all results as one.
    /// The route and freshness go out as response headers and as the JSON `app_metadata`
    /// of the first message.
    pub(crate) async fn stream_statement(
        &self,
        handle: StatementHandle,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Response<DoGetStream>, Status> {
        let options = Self::options(metadata);
        let rows = handle.parameter_rows()?;
        let engine = self.engine.clone();
        let sql = handle.sql;
        let mut rows = rows.into_iter();
        // The first execution runs now (or was started by GetFlightInfo), so planning errors
        // become the RPC's status.
        let params = rows.next().unwrap_or_default();
        let started = match handle.run {
            Some(id) if rows.as_slice().is_empty() => self.prefetcher.take(id, &sql, &params, &options).await,
            _ => None,
        };
        let first = match started {
            Some(started) => started,
            None => engine.execute_with(&sql, params, &options).await,
        }
        .map_err(|e| to_grpc(&e))?;
        // A forwarded answer to one execution goes out in the messages the upstream sent.
        let first = match rows.as_slice().is_empty() {
            true => match first.into_delivery() {
                Delivery::Frames(framed) => return Ok(pass_through(framed)),
                Delivery::Batches(first) => match first.cached().cloned() {
                    Some(cached) => return self.cached_answer(first, &cached).await,
                    None => first,
                },
            },
            false => first,
        };
        let schema = first.schema();
        let route = first.route().clone();
        let rest = stream::iter(rows)
            .then(move |params| {
                let engine = engine.clone();
                let sql = sql.clone();
                let options = options.clone();
                async move { engine.execute_with(&sql, params, &options).await }
            })
            .map_ok(|s| s.boxed())
            .try_flatten();
        let batches = first.chain(rest).map_err(|e| FlightError::Tonic(Box::new(to_grpc(&e))));
        let max = self.engine.limits().max_message_size.as_usize();
        let mut response =
            Response::new(encode_with_metadata(schema, batches, max, crate::route_headers::app_metadata(&route)));
        crate::route_headers::insert(response.metadata_mut().as_mut(), &route);
        Ok(response)
    }

    /// A results cache hit's answer: the Flight messages kept with `cached`, or encoded now
    /// and kept for the next DoGet that finds it (a hit's answer is already whole in memory,
    /// at most `results_cache.max_entry_bytes`, so its messages are made at once). The rows are still
    /// read from `answer`'s stream, which applies the query's limits and records its end; the
    /// route goes into the headers and the first message, as on any answer.
    async fn cached_answer(
        &self,
        mut answer: strata_core::query::QueryStream,
        cached: &strata_core::results_cache::CachedResult,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut batches = Vec::new();
        while let Some(batch) = answer.next().await {
            batches.push(batch.map_err(|e| to_grpc(&e))?);
        }
        let mut messages = match cached.rendering(FLIGHT_RENDERING) {
            Some(kept) => split_messages(kept)?,
            None => {
                let max = self.engine.limits().max_message_size.as_usize();
                let rows = stream::iter(batches.into_iter().map(Ok));
                let messages: Vec<_> =
                    encode_with_metadata(answer.schema(), rows, max, bytes::Bytes::new()).try_collect().await?;
                cached.keep_rendering(FLIGHT_RENDERING, join_messages(&messages));
                messages
            }
        };
        let route = answer.route();
        if let Some(first) = messages.first_mut() {
            first.app_metadata = crate::route_headers::app_metadata(route);
        }
        let mut response = Response::new(Box::pin(stream::iter(messages.into_iter().map(Ok))) as DoGetStream);
        crate::route_headers::insert(response.metadata_mut().as_mut(), route);
        Ok(response)
    }

    /// A FlightInfo announcing `schema` (encoded now) at one endpoint with `ticket`.
    pub(crate) fn flight_info(
        &self,
        schema: &Schema,
        ticket: impl Into<bytes::Bytes>,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        Ok(info_with(super::codec::ipc_schema(schema)?, ticket, descriptor))
    }

    /// [`Self::flight_info`] for a statement's schema, which the plan cache hands out as the
    /// same `Arc` on every call: encoded once, not on every GetFlightInfo.
    pub(crate) fn statement_info(
        &self,
        schema: &SchemaRef,
        ticket: impl Into<bytes::Bytes>,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        Ok(info_with(self.schemas.encoded(schema)?, ticket, descriptor))
    }
}

fn info_with(schema: bytes::Bytes, ticket: impl Into<bytes::Bytes>, descriptor: FlightDescriptor) -> FlightInfo {
    let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket));
    let mut info =
        FlightInfo::new().with_endpoint(endpoint).with_descriptor(descriptor).with_total_records(-1).with_ordered(true);
    info.schema = schema;
    info
}

/// Statements' schemas encoded as IPC (what a FlightInfo carries), by the `Arc` they came
/// in. Each entry holds its `Arc`, so its address cannot be another schema's while it is
/// here; at [`EncodedSchemas::MAX`] entries the memo starts over.
#[derive(Default)]
pub(super) struct EncodedSchemas {
    by_address: std::sync::Mutex<std::collections::HashMap<usize, (SchemaRef, bytes::Bytes)>>,
}

impl EncodedSchemas {
    const MAX: usize = 1024;

    fn encoded(&self, schema: &SchemaRef) -> Result<bytes::Bytes, Status> {
        let address = std::sync::Arc::as_ptr(schema) as *const () as usize;
        let mut memo = self.by_address.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((_, bytes)) = memo.get(&address) {
            return Ok(bytes.clone());
        }
        let bytes = super::codec::ipc_schema(schema)?;
        if memo.len() >= Self::MAX {
            memo.clear();
        }
        memo.insert(address, (std::sync::Arc::clone(schema), bytes.clone()));
        Ok(bytes)
    }
}

/// The name a cached answer's Flight messages are kept under (beside HTTP's formats).
const FLIGHT_RENDERING: &str = "flight";

/// A forwarded answer's messages as the upstream encoded them, with this tier's route in
/// the headers and in the first message's `app_metadata`, as for an answer made here.
fn pass_through(framed: strata_core::query::FramedAnswer) -> Response<DoGetStream> {
    let route = framed.route().clone();
    let mut app_metadata = Some(crate::route_headers::app_metadata(&route));
    let messages = framed.map(move |frame| {
        let frame = frame.map_err(|e| to_grpc(&e))?;
        Ok(arrow_flight::FlightData {
            flight_descriptor: None,
            data_header: frame.header,
            data_body: frame.body,
            app_metadata: app_metadata.take().unwrap_or_default(),
        })
    });
    let mut response = Response::new(Box::pin(messages) as DoGetStream);
    crate::route_headers::insert(response.metadata_mut().as_mut(), &route);
    response
}
