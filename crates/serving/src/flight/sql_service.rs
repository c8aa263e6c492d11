//! The Flight SQL commands, implemented on arrow-flight's `FlightSqlService` over the engine.
//! Each method only dispatches: statements to `statement.rs`, metadata commands to
//! `metadata.rs` and `sql_info.rs`, Flight data in and out through `codec.rs`.

use std::pin::Pin;
use std::sync::Arc;

use arrow::array::RecordBatch;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::server::{FlightSqlService, PeekableFlightDataStream};
use arrow_flight::sql::{
    ActionClosePreparedStatementRequest, ActionCreatePreparedStatementRequest, ActionCreatePreparedStatementResult,
    CommandGetCatalogs, CommandGetCrossReference, CommandGetDbSchemas, CommandGetExportedKeys, CommandGetImportedKeys,
    CommandGetPrimaryKeys, CommandGetSqlInfo, CommandGetTableTypes, CommandGetTables, CommandGetXdbcTypeInfo,
    CommandPreparedStatementQuery, CommandPreparedStatementUpdate, CommandStatementIngest, CommandStatementQuery,
    CommandStatementUpdate, DoPutPreparedStatementResult, ProstMessageExt, SqlInfo, TicketStatementQuery,
};
use arrow_flight::{Action, FlightDescriptor, FlightInfo, HandshakeRequest, HandshakeResponse, Ticket};
use futures::{Stream, StreamExt, stream};
use prost::Message;
use strata_core::Engine;
use tonic::{Request, Response, Status, Streaming};

use super::codec::{ipc_schema, read_parameters, read_put};
use super::handle::StatementHandle;
use super::prefetch::Prefetcher;
use super::{metadata, session, sql_info};
use crate::status::to_grpc;

pub(super) type DoGetStream = <StrataFlightSql as FlightService>::DoGetStream;

/// Flight SQL over the engine. Stateless: every handle and ticket carries its statement
/// (a run started early by GetFlightInfo is only a shortcut, see [`super::prefetch`]).
pub struct StrataFlightSql {
    pub(crate) engine: Engine,
    pub(super) prefetcher: Prefetcher,
    pub(super) schemas: super::statement::EncodedSchemas,
}

impl StrataFlightSql {
    pub fn new(engine: Engine) -> Self {
        Self { engine, prefetcher: Prefetcher::default(), schemas: Default::default() }
    }
}

#[tonic::async_trait]
impl FlightSqlService for StrataFlightSql {
    type FlightService = StrataFlightSql;

    async fn do_handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Pin<Box<dyn Stream<Item = Result<HandshakeResponse, Status>> + Send>>>, Status> {
        // With `auth:` the layer in front has verified the presented key, which is the bearer
        // token to use (stateless: any replica accepts it). Without, any credentials get a
        // random token back, so clients that always authenticate (JDBC, ADBC with a user)
        // can connect.
        let token = crate::auth::handshake_token(request.metadata())
            .unwrap_or_else(|| format!("strata-{}", uuid::Uuid::new_v4()));
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
        let schema = self.info_schema(&mut handle, request.metadata()).await?;
        let ticket = TicketStatementQuery { statement_handle: handle.encode() };
        let info = self.statement_info(&schema, ticket.as_any().encode_to_vec(), request.into_inner())?;
        Ok(Response::new(info))
    }

    async fn get_flight_info_prepared_statement(
        &self,
        query: CommandPreparedStatementQuery,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        let mut handle = StatementHandle::decode(&query.prepared_statement_handle)?;
        let schema = self.info_schema(&mut handle, request.metadata()).await?;
        let ticket = CommandPreparedStatementQuery { prepared_statement_handle: handle.encode() };
        let info = self.statement_info(&schema, ticket.as_any().encode_to_vec(), request.into_inner())?;
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
        self.metadata_info(query, &metadata::table_types_schema(), request.into_inner())
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
        self.metadata_info(query, &metadata::primary_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_exported_keys(
        &self,
        query: CommandGetExportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, &metadata::foreign_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_imported_keys(
        &self,
        query: CommandGetImportedKeys,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, &metadata::foreign_keys_schema(), request.into_inner())
    }

    async fn get_flight_info_cross_reference(
        &self,
        query: CommandGetCrossReference,
        request: Request<FlightDescriptor>,
    ) -> Result<Response<FlightInfo>, Status> {
        self.metadata_info(query, &metadata::foreign_keys_schema(), request.into_inner())
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
        self.batch_response(self.catalogs(query))
    }

    async fn do_get_schemas(
        &self,
        query: CommandGetDbSchemas,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let access = self.engine.access(&Self::options(request.metadata()));
        self.batch_response(self.db_schemas(query, &access).await)
    }

    async fn do_get_tables(
        &self,
        query: CommandGetTables,
        request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        let access = self.engine.access(&Self::options(request.metadata()));
        self.batch_response(self.tables(query, &access).await)
    }

    async fn do_get_table_types(
        &self,
        _query: CommandGetTableTypes,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(metadata::table_types())
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
        self.batch_response(Ok::<_, Status>(RecordBatch::new_empty(Arc::new(metadata::primary_keys_schema()))))
    }

    async fn do_get_exported_keys(
        &self,
        _query: CommandGetExportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(Ok::<_, Status>(RecordBatch::new_empty(Arc::new(metadata::foreign_keys_schema()))))
    }

    async fn do_get_imported_keys(
        &self,
        _query: CommandGetImportedKeys,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(Ok::<_, Status>(RecordBatch::new_empty(Arc::new(metadata::foreign_keys_schema()))))
    }

    async fn do_get_cross_reference(
        &self,
        _query: CommandGetCrossReference,
        _request: Request<Ticket>,
    ) -> Result<Response<DoGetStream>, Status> {
        self.batch_response(Ok::<_, Status>(RecordBatch::new_empty(Arc::new(metadata::foreign_keys_schema()))))
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
        let options = Self::options(request.metadata());
        let batches = read_parameters(request, self.engine.limits().max_request_body.as_usize()).await?;
        let handle = handle.with_params(&batches)?;
        let mut rows = 0i64;
        for params in handle.parameter_rows()? {
            let mut results = self.engine.execute_with(&handle.sql, params, &options).await.map_err(|e| to_grpc(&e))?;
            while let Some(batch) = results.next().await {
                rows += batch.map_err(|e| to_grpc(&e))?.num_rows() as i64;
            }
        }
        Ok(rows)
    }

    async fn do_put_statement_update(
        &self,
        command: CommandStatementUpdate,
        request: Request<PeekableFlightDataStream>,
    ) -> Result<i64, Status> {
        // Planning applies the read-only check, so writes get the same clear error as queries.
        self.engine.plan(&command.query, &Self::options(request.metadata())).await.map_err(|e| to_grpc(&e))?;
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
        // A dataset the caller may not see is as unknown as one that does not exist.
        if !self.engine.access(&Self::options(request.metadata())).allows(&command.table) {
            return Err(to_grpc(&strata_core::StrataError::UnknownDataset(command.table)));
        }
        let max = self.engine.limits().max_request_body.as_usize();
        let batches = read_put(request, max, "ingested rows").await?;
        let receipt = writes.write(&command.table, batches).await.map_err(|e| to_grpc(&e))?;
        Ok(receipt.rows as i64)
    }

    async fn do_action_create_prepared_statement(
        &self,
        query: ActionCreatePreparedStatementRequest,
        request: Request<Action>,
    ) -> Result<ActionCreatePreparedStatementResult, Status> {
        let planned =
            self.engine.plan(&query.query, &Self::options(request.metadata())).await.map_err(|e| to_grpc(&e))?;
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
