//! Our `FlightService`, wrapping the Flight SQL implementation to answer the RPCs that
//! arrow-flight's blanket implementation hard-codes as unimplemented (GetSchema,
//! PollFlightInfo, ListFlights) and to accept plain-Flight JSON tickets from pyarrow.

use std::sync::Arc;

use arrow::ipc::writer::IpcWriteOptions;
use arrow_flight::flight_descriptor::DescriptorType;
use arrow_flight::flight_service_server::FlightService;
use arrow_flight::sql::{Any, Command, CommandPreparedStatementQuery, CommandStatementQuery};
use arrow_flight::{
    Action, Criteria, Empty, FlightData, FlightDescriptor, FlightInfo, HandshakeRequest, PollInfo, SchemaAsIpc,
    SchemaResult, Ticket,
};
use futures::stream;
use prost::Message;
use tonic::{Request, Response, Status, Streaming};

use super::handle::{JsonTicket, StatementHandle};
use super::sql_service::StrataFlightSql;

/// The Flight service every tier serves.
#[derive(Clone)]
pub struct StrataFlightService {
    sql: Arc<StrataFlightSql>,
}

impl StrataFlightService {
    pub fn new(sql: StrataFlightSql) -> Self {
        Self { sql: Arc::new(sql) }
    }

    /// The SQL a descriptor stands for: a Flight SQL query command, or a dataset path.
    fn descriptor_sql(descriptor: &FlightDescriptor) -> Result<String, Status> {
        if descriptor.r#type == DescriptorType::Path as i32 {
            let name = descriptor.path.join(".");
            if name.is_empty() {
                return Err(Status::invalid_argument("empty descriptor path: expected a dataset name"));
            }
            let quoted: Vec<String> =
                descriptor.path.iter().map(|p| format!("\"{}\"", p.replace('"', "\"\""))).collect();
            return Ok(format!("SELECT * FROM {}", quoted.join(".")));
        }
        let any =
            Any::decode(&*descriptor.cmd).map_err(|e| Status::invalid_argument(format!("invalid command: {e}")))?;
        match Command::try_from(any).map_err(|e| Status::invalid_argument(e.to_string()))? {
            Command::CommandStatementQuery(CommandStatementQuery { query, .. }) => Ok(query),
            Command::CommandPreparedStatementQuery(CommandPreparedStatementQuery { prepared_statement_handle }) => {
                Ok(StatementHandle::decode(&prepared_statement_handle)?.sql)
            }
            other => Err(Status::unimplemented(format!("GetSchema is not supported for {}", other.type_url()))),
        }
    }
}

type Inner = StrataFlightSql;

#[tonic::async_trait]
impl FlightService for StrataFlightService {
    type HandshakeStream = <Inner as FlightService>::HandshakeStream;
    type ListFlightsStream = <Inner as FlightService>::ListFlightsStream;
    type DoGetStream = <Inner as FlightService>::DoGetStream;
    type DoPutStream = <Inner as FlightService>::DoPutStream;
    type DoActionStream = <Inner as FlightService>::DoActionStream;
    type ListActionsStream = <Inner as FlightService>::ListActionsStream;
    type DoExchangeStream = <Inner as FlightService>::DoExchangeStream;

    async fn handshake(
        &self,
        request: Request<Streaming<HandshakeRequest>>,
    ) -> Result<Response<Self::HandshakeStream>, Status> {
        FlightService::handshake(&*self.sql, request).await
    }

    /// Every dataset as a flight with a path descriptor and a JSON ticket.
    async fn list_flights(&self, request: Request<Criteria>) -> Result<Response<Self::ListFlightsStream>, Status> {
        let mut infos = Vec::new();
        let access = self.sql.engine.access(&StrataFlightSql::options(request.metadata()));
        for status in self.sql.engine.datasets().into_iter().filter(|d| access.allows(&d.name)) {
            let path: Vec<String> = status.name.split('.').map(str::to_string).collect();
            let descriptor = FlightDescriptor::new_path(path);
            let sql = Self::descriptor_sql(&descriptor)?;
            let Ok(schema) = self.sql.statement_schema(&sql, request.metadata()).await else { continue };
            let ticket = serde_json::json!({ "sql": sql }).to_string();
            infos.push(Ok(self.sql.flight_info(&schema, ticket, descriptor)?));
        }
        Ok(Response::new(Box::pin(stream::iter(infos))))
    }

    async fn get_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<FlightInfo>, Status> {
        if request.get_ref().r#type == DescriptorType::Path as i32 {
            let sql = Self::descriptor_sql(request.get_ref())?;
            let schema = self.sql.statement_schema(&sql, request.metadata()).await?;
            let descriptor = request.into_inner();
            let ticket = serde_json::json!({ "sql": sql }).to_string();
            return Ok(Response::new(self.sql.flight_info(&schema, ticket, descriptor)?));
        }
        FlightService::get_flight_info(&*self.sql, request).await
    }

    /// Queries finish within one call, so the first poll already has the complete answer.
    async fn poll_flight_info(&self, request: Request<FlightDescriptor>) -> Result<Response<PollInfo>, Status> {
        let info = self.get_flight_info(request).await?.into_inner();
        Ok(Response::new(PollInfo {
            info: Some(info),
            flight_descriptor: None,
            progress: Some(1.0),
            expiration_time: None,
        }))
    }

    async fn get_schema(&self, request: Request<FlightDescriptor>) -> Result<Response<SchemaResult>, Status> {
        let sql = Self::descriptor_sql(request.get_ref())?;
        let schema = self.sql.statement_schema(&sql, request.metadata()).await?;
        let result: SchemaResult = SchemaAsIpc::new(&schema, &IpcWriteOptions::default())
            .try_into()
            .map_err(|e: arrow::error::ArrowError| Status::internal(format!("cannot encode schema: {e}")))?;
        Ok(Response::new(result))
    }

    async fn do_get(&self, request: Request<Ticket>) -> Result<Response<Self::DoGetStream>, Status> {
        if let Some(ticket) = JsonTicket::parse(&request.get_ref().ticket) {
            return self.sql.stream_statement(StatementHandle::new(ticket?.sql), request.metadata()).await;
        }
        FlightService::do_get(&*self.sql, request).await
    }

    async fn do_put(&self, request: Request<Streaming<FlightData>>) -> Result<Response<Self::DoPutStream>, Status> {
        FlightService::do_put(&*self.sql, request).await
    }

    async fn do_exchange(
        &self,
        _request: Request<Streaming<FlightData>>,
    ) -> Result<Response<Self::DoExchangeStream>, Status> {
        Err(Status::unimplemented("DoExchange is not supported"))
    }

    async fn do_action(&self, request: Request<Action>) -> Result<Response<Self::DoActionStream>, Status> {
        FlightService::do_action(&*self.sql, request).await
    }

    async fn list_actions(&self, request: Request<Empty>) -> Result<Response<Self::ListActionsStream>, Status> {
        FlightService::list_actions(&*self.sql, request).await
    }
}
