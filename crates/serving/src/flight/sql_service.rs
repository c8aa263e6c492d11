//! The Flight SQL commands, implemented on arrow-flight's `FlightSqlService` over the engine.

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow::datatypes::{DataType, Field, Schema, SchemaRef};
use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::encode::FlightDataEncoderBuilder;
use arrow_flight::error::FlightError;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    CommandGetCatalogs, CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandPreparedStatementUpdate, CommandStatementIngest, CommandStatementQuery,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{
    Action, FlightDescriptor, FlightEndpoint, FlightInfo, HandshakeRequest, HandshakeResponse, IpcMessage, SchemaAsIpc,
    Ticket,
};
use datafusion::catalog::TableProvider;
use datafusion::datasource::TableType;
use futures::{Stream, StreamExt, TryStreamExt, stream};
use prost::Message;
use strata_core::Engine;
use tonic::{Request, Response, Status, Streaming};

use super::handle::StatementHandle;
use super::prefetch::Prefetcher;
use super::{session, sql_info};
use crate::status::to_grpc;

type DoGetStream = <StrataFlightSql as FlightService>::DoGetStream;

/// Flight SQL over the engine. Stateless: every handle and ticket carries its statement
/// (a run started early by GetFlightInfo is only a shortcut, see [`super::prefetch`]).
pub struct StrataFlightSql {
    pub(crate) engine: Engine,
    prefetcher: Prefetcher,
}

impl StrataFlightSql {
    pub fn new(engine: Engine) -> Self {
        Self { engine, prefetcher: Prefetcher::default() }
    }

    /// On a tier with an upstream, starts `handle`'s statement now and returns the id its
    /// ticket carries (one parameter row only).
    fn prefetch(&self, handle: &StatementHandle, metadata: &tonic::metadata::MetadataMap) -> Option<u64> {
        if !self.engine.has_router() {
            return None;
        }
        let mut rows = handle.parameter_rows().ok()?;
        if rows.len() != 1 {
            return None;
        }
        let options = crate::route_headers::options(&metadata.clone().into_headers());
        self.prefetcher.start(&self.engine, &handle.sql, rows.pop().unwrap_or_default(), &options)
    }

    /// Schema of a statement started by [`Self::prefetch`]. It is planned after the run
    /// starts, so a forwarded run's upstream call is already under way while this tier plans;
    /// a statement that does not plan has its run cancelled.
    async fn prefetched_schema(&self, handle: &StatementHandle) -> Result<SchemaRef, Status> {
        let schema = self.statement_schema(&handle.sql).await;
        if let (Err(_), Some(run)) = (&schema, handle.run) {
            self.prefetcher.cancel(run);
        }
        schema
    }

    /// Schema of a statement's result, planned but not run.
    pub(crate) async fn statement_schema(&self, sql: &str) -> Result<SchemaRef, Status> {
        self.engine.result_schema(sql).await.map_err(|e| to_grpc(&e))
    }

    /// Runs a statement once per bound parameter row and streams all results as one.
    /// The route and freshness go out as response headers and as the JSON `app_metadata`
    /// of the first message.
    pub(crate) async fn stream_statement(
        &self,
        handle: StatementHandle,
        metadata: &tonic::metadata::MetadataMap,
    ) -> Result<Response<DoGetStream>, Status> {
        let options = crate::route_headers::options(&metadata.clone().into_headers());
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
        crate::route_headers::insert_grpc(response.metadata_mut(), &route);
        Ok(response)
    }

    pub(crate) fn flight_info(
        &self,
        schema: &Schema,
        ticket: impl Into<bytes::Bytes>,
        descriptor: FlightDescriptor,
    ) -> Result<FlightInfo, Status> {
        let endpoint = FlightEndpoint::new().with_ticket(Ticket::new(ticket));
        Ok(FlightInfo::new()
            .try_with_schema(schema)
            .map_err(|e| Status::internal(format!("cannot encode schema: {e}")))?
            .with_endpoint(endpoint)
            .with_descriptor(descriptor)
            .with_total_records(-1)
            .with_ordered(true))
    }

    /// A FlightInfo whose ticket is the command itself, for the metadata commands.
    fn metadata_info(
        &self,
        command: impl ProstMessageExt,
        schema: &Schema,
        descriptor: FlightDescriptor,
    ) -> Result<Response<FlightInfo>, Status> {
        let ticket = command.as_any().encode_to_vec();
        Ok(Response::new(self.flight_info(schema, ticket, descriptor)?))
    }

    fn batch_response<E: std::fmt::Display>(
        &self,
        batch: Result<RecordBatch, E>,
    ) -> Result<Response<DoGetStream>, Status> {
        let batch = batch.map_err(|e| Status::internal(e.to_string()))?;
        let schema = batch.schema();
        Ok(Response::new(encode(
            schema,
            stream::once(async { Ok(batch) }),
            self.engine.limits().max_message_size.as_usize(),
        )))
    }

    async fn tables(&self) -> Vec<(String, String, String, Arc<dyn TableProvider>)> {
        let ctx = self.engine.session();
        let mut out = Vec::new();
        for catalog_name in ctx.catalog_names() {
            let Some(catalog) = ctx.catalog(&catalog_name) else { continue };
            for schema_name in catalog.schema_names() {
                let Some(schema) = catalog.schema(&schema_name) else { continue };
                for table_name in schema.table_names() {
                    if let Ok(Some(table)) = schema.table(&table_name).await {
                        out.push((catalog_name.clone(), schema_name.clone(), table_name, table));
                    }
                }
            }
        }
        out.sort_by(|a, b| (&a.0, &a.1, &a.2).cmp(&(&b.0, &b.1, &b.2)));
        out
    }
}

/// Encodes batches as Flight data, each message under the configured gRPC size limit.
pub(crate) fn encode(
    schema: SchemaRef,
    batches: impl Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
    max_message_size: usize,
) -> DoGetStream {
    encode_with_metadata(schema, batches, max_message_size, bytes::Bytes::new())
}

/// [`encode`] with `app_metadata` on the first (schema) message.
pub(crate) fn encode_with_metadata(
    schema: SchemaRef,
    batches: impl Stream<Item = Result<RecordBatch, FlightError>> + Send + 'static,
    max_message_size: usize,
    app_metadata: bytes::Bytes,
) -> DoGetStream {
    // Slices of view arrays would each carry the whole shared data buffers: compact first.
    let batches = batches
        .map_ok(|b| futures::stream::iter(strata_upstream::wire::compact_views(b).into_iter().map(Ok)))
        .try_flatten();
    let stream = FlightDataEncoderBuilder::new()
        .with_schema(schema)
        .with_metadata(app_metadata)
        // About 2 MiB per message, whatever the server accepts: clients decode up to 4 MiB
        // by default (tonic, grpc), and the encoder's split can overshoot its target.
        .with_max_flight_data_size((max_message_size / 2).clamp(64 * 1024, 2 << 20))
        .build(batches)
        .map_err(Status::from);
    Box::pin(stream)
}

/// The parameter rows a client sends with DoPut, at most `max` bytes in all.
async fn read_parameters(request: Request<PeekableFlightDataStream>, max: usize) -> Result<Vec<RecordBatch>, Status> {
    read_put(request, max, "bound parameters").await
}

/// Every record batch of a DoPut stream, refused once its messages add up to more than
/// `max` bytes (`limits.max_request_body`): each message is bounded by the gRPC limit, but
/// a stream of them would otherwise be collected without end.
async fn read_put(
    request: Request<PeekableFlightDataStream>,
    max: usize,
    what: &str,
) -> Result<Vec<RecordBatch>, Status> {
    let mut total = 0usize;
    let data = request.into_inner().map_err(FlightError::from).and_then(move |data| {
        total += data.data_header.len() + data.data_body.len() + data.app_metadata.len();
        let over = total > max;
        async move {
            if over {
                return Err(FlightError::ExternalError(Box::new(strata_core::StrataError::InvalidRequest(format!(
                    "the DoPut stream is over limits.max_request_body ({max} bytes)"
                )))));
            }
            Ok(data)
        }
    });
    arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(data)
        .try_collect()
        .await
        .map_err(|e| Status::invalid_argument(format!("cannot read the {what}: {e}")))
}

fn ipc_schema(schema: &Schema) -> Result<bytes::Bytes, Status> {
    let message: IpcMessage = SchemaAsIpc::new(schema, &IpcWriteOptions::default())
        .try_into()
        .map_err(|e: arrow::error::ArrowError| Status::internal(format!("cannot encode schema: {e}")))?;
    Ok(message.0)
}

fn table_type_name(t: TableType) -> &'static str {
    match t {
        TableType::Base => "TABLE",
        TableType::View => "VIEW",
        TableType::Temporary => "LOCAL TEMPORARY",
    }
}

/// Schema of GetPrimaryKeys answers (Flight SQL spec).
fn primary_keys_schema() -> Schema {
    Schema::new(vec![
        Field::new("catalog_name", DataType::Utf8, true),
        Field::new("db_schema_name", DataType::Utf8, true),
        Field::new("table_name", DataType::Utf8, false),
        Field::new("column_name", DataType::Utf8, false),
        Field::new("key_name", DataType::Utf8, true),
        Field::new("key_sequence", DataType::Int32, false),
    ])
}

/// Schema of GetExportedKeys / GetImportedKeys / GetCrossReference answers (Flight SQL spec).
fn foreign_keys_schema() -> Schema {
    Schema::new(vec![
        Field::new("pk_catalog_name", DataType::Utf8, true),
        Field::new("pk_db_schema_name", DataType::Utf8, true),
        Field::new("pk_table_name", DataType::Utf8, false),
        Field::new("pk_column_name", DataType::Utf8, false),
        Field::new("fk_catalog_name", DataType::Utf8, true),
        Field::new("fk_db_schema_name", DataType::Utf8, true),
        Field::new("fk_table_name", DataType::Utf8, false),
        Field::new("fk_column_name", DataType::Utf8, false),
        Field::new("key_sequence", DataType::Int32, false),
        Field::new("fk_key_name", DataType::Utf8, true),
        Field::new("pk_key_name", DataType::Utf8, true),
        Field::new("update_rule", DataType::UInt8, false),
        Field::new("delete_rule", DataType::UInt8, false),
    ])
}

fn table_types_schema() -> Schema {
    Schema::new(vec![Field::new("table_type", DataType::Utf8, false)])
}

#[tonic::async_trait]
impl FlightSqlService for StrataFlightSql {
    type FlightService = StrataFlightSql;

    async fn do_handshake(
        &self,
        _request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        // Authentication is not configured: any basic credentials get a session token back,
        // so clients that always authenticate (JDBC, ADBC with a user) can connect.
        let token = format!("strata-{}", uuid::Uuid::new_v4());
        let response = HandshakeResponse { protocol_version: 0, payload: token.clone().into() };
        let mut resp: Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>> =
            Response::new(Box::pin(stream::iter([Ok(response)])));
        if let Ok(value) = format!("Bearer {token}").parse() {
            resp.metadata_mut().insert("authorization", value);
        }
        Ok(resp)
    }

    async fn get_flight_info_statement(
        &self,
        query: CommandStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let mut handle = StatementHandle::new(query.query);
        handle.run = self.prefetch(&handle, request.metadata());
        let schema = self.prefetched_schema(&handle).await?;
        let ticket = TicketStatementQuery { statement_handle: handle.encode() };
        let info = self.flight_info(&schema, ticket.as_any().encode_to_vec(), request.into_inner())?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let mut handle = StatementHandle::decode(&query.prepared_statement_handle)?;
        handle.run = self.prefetch(&handle, request.metadata());
        let schema = self.prefetched_schema(&handle).await?;
        let ticket = CommandPreparedStatementQuery { prepared_statement_handle: handle.encode() };
        let info = self.flight_info(&schema, ticket.as_any().encode_to_vec(), request.into_inner())?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_catalogs(
        &self,
        query: CommandGetCatalogs,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder().schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_tables(
        &self,
        query: CommandGetTables,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder().schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_table_types(
        &self,
        query: CommandGetTableTypes,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, &table_types_schema(), request.into_inner())
    }

    async fn get_flight_info_sql_info(
        &self,
        query: CommandGetSqlInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.clone().into_builder(sql_info::sql_info(self.engine.session())).schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn get_flight_info_primary_keys(
        &self,
        query: CommandGetPrimaryKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, &primary_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, &foreign_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, &foreign_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, &foreign_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let schema = query.into_builder(sql_info::xdbc_type_info()).schema();
        self.metadata_info(query, &schema, request.into_inner())
    }

    async fn do_get_statement(
        &self,
        ticket: TicketStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.stream_statement(StatementHandle::decode(&ticket.statement_handle)?, request.metadata()).await
    }

    async fn do_get_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.stream_statement(StatementHandle::decode(&query.prepared_statement_handle)?, request.metadata()).await
    }

    async fn do_get_catalogs(
        &self,
        query: CommandGetCatalogs,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        let mut names = self.engine.session().catalog_names();
        names.sort();
        for name in names {
            builder.append(name);
        }
        self.batch_response(builder.build())
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        let ctx = self.engine.session();
        for catalog_name in ctx.catalog_names() {
            let Some(catalog) = ctx.catalog(&catalog_name) else { continue };
            for schema_name in catalog.schema_names() {
                builder.append(&catalog_name, schema_name);
            }
        }
        self.batch_response(builder.build())
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let mut builder = query.into_builder();
        for (catalog, schema, name, table) in self.tables().await {
            builder
                .append(catalog, schema, name, table_type_name(table.table_type()), &table.schema())
                .map_err(|e| Status::internal(e.to_string()))?;
        }
        self.batch_response(builder.build())
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let types = arrow::array::StringArray::from(vec!["LOCAL TEMPORARY", "TABLE", "VIEW"]);
        self.batch_response(RecordBatch::try_new(Arc::new(table_types_schema()), vec![Arc::new(types)]))
    }

    async fn do_get_sql_info(
        &self,
        query: CommandGetSqlInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(query.into_builder(sql_info::sql_info(self.engine.session())).build())
    }

    async fn do_get_primary_keys(
        &self,
        _query: CommandGetPrimaryKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(Ok::<_, Status>(RecordBatch::new_empty(Arc::new(primary_keys_schema()))))
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(Ok::<_, Status>(RecordBatch::new_empty(Arc::new(foreign_keys_schema()))))
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(Ok::<_, Status>(RecordBatch::new_empty(Arc::new(foreign_keys_schema()))))
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(Ok::<_, Status>(RecordBatch::new_empty(Arc::new(foreign_keys_schema()))))
    }

    async fn do_get_xdbc_type_info(
        &self,
        query: CommandGetXdbcTypeInfo,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(query.into_builder(sql_info::xdbc_type_info()).build())
    }

    async fn do_put_prepared_statement_query(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<DoPutPreparedStatementResult, Status> {
        let handle = StatementHandle::decode(&query.prepared_statement_handle)?;
        let batches = read_parameters(request, self.engine.limits().max_request_body.as_usize()).await?;
        let handle = handle.with_params(&batches)?;
        Ok(DoPutPreparedStatementResult { prepared_statement_handle: Some(handle.encode()) })
    }

    /// `executemany` in DB-API clients: run the (read-only) statement once per bound row and
    /// report the rows it produced; writes are refused by the engine's read-only check.
    async fn do_put_prepared_statement_update(
        &self,
        query: CommandPreparedStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let handle = StatementHandle::decode(&query.prepared_statement_handle)?;
        let batches = read_parameters(request, self.engine.limits().max_request_body.as_usize()).await?;
        let handle = handle.with_params(&batches)?;
        let mut rows = 0i64;
        for params in handle.parameter_rows()? {
            let mut results = self.engine.execute(&handle.sql, params).await.map_err(|e| to_grpc(&e))?;
            while let Some(batch) = results.next().await {
                rows += batch.map_err(|e| to_grpc(&e))?.num_rows() as i64;
            }
        }
        Ok(rows)
    }

    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        _request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        // Planning applies the read-only check, so writes get the same clear error as queries.
        self.engine.plan(&command.query).await.map_err(|e| to_grpc(&e))?;
        Err(Status::invalid_argument("statement updates must be writes; use a query command for SELECT"))
    }

    /// Bulk ingest (ADBC `adbc_ingest`, Flight SQL `CommandStatementIngest`) into a writable
    /// dataset of an edge agent; answers once the rows are durable.
    async fn do_put_statement_ingest(
        &self,
        command: CommandStatementIngest,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        let writes = self.engine.writes().ok_or_else(|| {
            to_grpc(&strata_core::StrataError::NotSupported(
                "this tier accepts no writes; write to an edge-agent".into(),
            ))
        })?;
        let max = self.engine.limits().max_request_body.as_usize();
        let batches = read_put(request, max, "ingested rows").await?;
        let receipt = writes.write(&command.table, batches).await.map_err(|e| to_grpc(&e))?;
        Ok(receipt.rows as i64)
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let planned = self.engine.plan(&query.query).await.map_err(|e| to_grpc(&e))?;
        Ok(ActionCreatePreparedStatementResult {
            prepared_statement_handle: StatementHandle::new(query.query).encode(),
            dataset_schema: ipc_schema(&planned.schema)?,
            parameter_schema: ipc_schema(&planned.parameters)?,
        })
    }

    async fn do_action_close_prepared_statement(
        &self,
        _query: ActionClosePreparedStatementRequest,
        _request: Request<Action>,
    ) -> Result<(), Status> {
        // Handles are stateless: there is nothing to free.
        Ok(())
    }

    async fn do_action_fallback(
        &self,
        request: Request<Action>,
    ) -> Result<Response<<Self as FlightService>::DoActionStream>, Status> {
        let action = request.into_inner();
        match session::answer(&action.r#type, &action.body) {
            Some(result) => {
                let body = result?;
                let item = arrow_flight::Result { body: body.into() };
                Ok(Response::new(Box::pin(stream::iter([Ok(item)]))))
            }
            None => Err(Status::unimplemented(format!("action `{}` is not supported", action.r#type))),
        }
    }

    async fn register_sql_info(&self, _id: i32, _result: &SqlInfo) {}
}
