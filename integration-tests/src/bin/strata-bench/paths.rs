//! The ways a benchmark query can be answered: through a tier over Flight SQL or HTTP, by
//! PostgreSQL, by DataFusion in-process; and the floors, a bare tier-protocol call and a
//! `GET /health`, round trips that ask the engine nothing.

use std::net::SocketAddr;
use std::sync::Arc;

use arrow::array::{Int64Array, RecordBatch};
use arrow::datatypes::{DataType, Field, Schema};
use arrow_flight::sql::client::FlightSqlServiceClient;
use async_trait::async_trait;
use datafusion::prelude::SessionContext;
use futures::{StreamExt, TryStreamExt};
use strata_proto::v1::HealthRequest;
use strata_proto::v1::tier_service_client::TierServiceClient;
use tonic::transport::Channel;

use crate::measure::{Probe, ProbeFactory};

/// The question a probe asks on every call.
#[derive(Debug, Clone, Copy)]
pub enum Query {
    /// One row by key, the key changing with every call so no answer repeats back to back.
    Lookup { rows: i64 },
    /// GROUP BY over the whole table.
    Aggregate,
    /// A dashboard's handful of queries, asked over and over (10 rows each).
    Dashboard,
}

/// Queries a dashboard repeats: each returns 10 rows.
pub const DASHBOARD: [&str; 4] = [
    "SELECT grp % 10 AS g, count(*) AS n FROM points GROUP BY grp % 10",
    "SELECT id, amount FROM points ORDER BY amount DESC, id LIMIT 10",
    "SELECT grp, avg(amount) AS mean FROM points WHERE grp < 10 GROUP BY grp",
    "SELECT id % 10 AS bucket, max(amount) AS top FROM points GROUP BY id % 10",
];

impl Query {
    /// The statement with the key as a parameter (`$1`), and the key of call `i`.
    fn prepared(self, i: usize) -> (String, Option<i64>) {
        match self {
            Query::Lookup { rows } => ("SELECT v FROM points WHERE id = $1".into(), Some(key(i, rows))),
            other => (other.sql(i), None),
        }
    }

    pub fn sql(self, i: usize) -> String {
        match self {
            Query::Lookup { rows } => format!("SELECT v FROM points WHERE id = {}", key(i, rows)),
            Query::Aggregate => AGGREGATE.to_string(),
            Query::Dashboard => DASHBOARD[i % DASHBOARD.len()].to_string(),
        }
    }
}

pub const AGGREGATE: &str = "SELECT grp, count(*) AS n, sum(amount) AS total FROM points GROUP BY grp";

fn key(i: usize, rows: i64) -> i64 {
    (i as i64).wrapping_mul(7919).rem_euclid(rows)
}

pub async fn channel(addr: SocketAddr) -> anyhow::Result<Channel> {
    Ok(Channel::from_shared(format!("http://{addr}"))?.tcp_nodelay(true).connect().await?)
}

/// A tier's Flight SQL endpoint: `execute` (GetFlightInfo) then `DoGet`, as ADBC does.
pub struct Flight {
    pub addr: SocketAddr,
    pub query: Query,
    /// Sends `strata-consistency: strong`, so a sidecar forwards the query to its platform.
    pub strong: bool,
}

struct FlightProbe {
    client: FlightSqlServiceClient<Channel>,
    query: Query,
}

#[async_trait]
impl ProbeFactory for Flight {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        let mut client = FlightSqlServiceClient::new(channel(self.addr).await?);
        if self.strong {
            client.set_header("strata-consistency", "strong");
        }
        Ok(Box::new(FlightProbe { client, query: self.query }))
    }
}

#[async_trait]
impl Probe for FlightProbe {
    async fn call(&mut self, i: usize) -> anyhow::Result<usize> {
        let info = self.client.execute(self.query.sql(i), None).await?;
        fetch_rows(&mut self.client, info).await
    }
}

/// Fetches every endpoint of `info` with DoGet and counts the rows.
async fn fetch_rows(
    client: &mut FlightSqlServiceClient<Channel>,
    info: arrow_flight::FlightInfo,
) -> anyhow::Result<usize> {
    let mut rows = 0;
    for endpoint in info.endpoint {
        let ticket = endpoint.ticket.ok_or_else(|| anyhow::anyhow!("endpoint without ticket"))?;
        let batches: Vec<RecordBatch> = client.do_get(ticket).await?.try_collect().await?;
        rows += batches.iter().map(RecordBatch::num_rows).sum::<usize>();
    }
    Ok(rows)
}

/// A tier's HTTP `/v1/sql` over one HTTP/1.1 keep-alive connection per client: one round
/// trip per query, rows as JSON (what a web app or a dashboard's backend sends). The client
/// is hyper's own connection, as lean as tokio-postgres is for PostgreSQL: a pooled client
/// (reqwest) spent about as much CPU per call as the sidecar answering it, on the same two
/// cores, and that was most of the measured latency.
pub struct Http {
    /// `http://host:port/v1/sql`.
    pub url: String,
    pub query: Query,
}

/// `GET /health` on a tier over the same kind of connection as [`Http`]: a round trip
/// through the tier's HTTP stack (hyper, axum and its layers) that asks the engine nothing,
/// the HTTP counterpart of [`Floor`].
pub struct HttpFloor {
    /// `http://host:port/health`.
    pub url: String,
}

struct HttpProbe {
    sender: HttpSender,
    uri: http::Uri,
    host: http::HeaderValue,
    /// `None` for the floor's `GET /health`.
    query: Option<Query>,
}

type HttpSender = hyper::client::conn::http1::SendRequest<http_body_util::Full<bytes::Bytes>>;

/// One HTTP/1.1 connection to `authority`, its I/O driven by a task of its own.
async fn http_connection(authority: &str) -> anyhow::Result<HttpSender> {
    let stream = tokio::net::TcpStream::connect(authority).await?;
    stream.set_nodelay(true)?;
    let (sender, connection) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(connection);
    Ok(sender)
}

#[async_trait]
impl ProbeFactory for Http {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        HttpProbe::connect(&self.url, Some(self.query)).await
    }
}

#[async_trait]
impl ProbeFactory for HttpFloor {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        HttpProbe::connect(&self.url, None).await
    }
}

impl HttpProbe {
    /// One connection per probe, kept alive, as each of wrk's connections.
    async fn connect(url: &str, query: Option<Query>) -> anyhow::Result<Box<dyn Probe>> {
        let uri: http::Uri = url.parse()?;
        let authority = uri.authority().ok_or_else(|| anyhow::anyhow!("no host in {url}"))?.clone();
        let sender = http_connection(authority.as_str()).await?;
        let host = http::HeaderValue::from_str(authority.as_str())?;
        Ok(Box::new(HttpProbe { sender, uri, host, query }))
    }

    /// Sends call `i` (its query, or the floor's `GET`); `None` when the connection had
    /// closed before it was sent (the server closes connections idle past its timeout, as
    /// between the harness's slices).
    async fn send(&mut self, i: usize) -> anyhow::Result<Option<(http::StatusCode, bytes::Bytes)>> {
        use http_body_util::BodyExt;
        if self.sender.ready().await.is_err() {
            return Ok(None);
        }
        let (method, body) = match self.query {
            Some(query) => (http::Method::POST, bytes::Bytes::from(query.sql(i))),
            None => (http::Method::GET, bytes::Bytes::new()),
        };
        let request = http::Request::builder()
            .method(method)
            .uri(self.uri.clone())
            .header(http::header::HOST, self.host.clone())
            .body(http_body_util::Full::new(body))?;
        let response = match self.sender.send_request(request).await {
            Ok(response) => response,
            Err(err) if err.is_canceled() || err.is_closed() => return Ok(None),
            Err(err) => return Err(err.into()),
        };
        let status = response.status();
        Ok(Some((status, response.into_body().collect().await?.to_bytes())))
    }
}

#[async_trait]
impl Probe for HttpProbe {
    async fn call(&mut self, i: usize) -> anyhow::Result<usize> {
        let (status, body) = match self.send(i).await? {
            Some(answer) => answer,
            None => {
                // Reconnect once, as a pooled client would (a lookup is safe to send again).
                let authority = self.uri.authority().map(|a| a.to_string()).unwrap_or_default();
                self.sender = http_connection(&authority).await?;
                self.send(i).await?.ok_or_else(|| anyhow::anyhow!("{authority} closed a new connection"))?
            }
        };
        anyhow::ensure!(status.is_success(), "HTTP {status}: {}", String::from_utf8_lossy(&body));
        if self.query.is_none() {
            let health: serde_json::Value = serde_json::from_slice(&body)?;
            anyhow::ensure!(health["status"] == "ok", "GET /health answered {health}");
            return Ok(1);
        }
        let rows: Vec<serde_json::Value> = serde_json::from_slice(&body)?;
        Ok(rows.len())
    }
}

/// A tier's Flight SQL endpoint with a prepared statement, as ADBC and JDBC run a query
/// with parameters: prepared once per connection, then per call the key is bound (`DoPut`),
/// `GetFlightInfo` and `DoGet`.
pub struct FlightPrepared {
    pub addr: SocketAddr,
    pub query: Query,
}

struct FlightPreparedProbe {
    client: FlightSqlServiceClient<Channel>,
    statement: arrow_flight::sql::client::PreparedStatement<Channel>,
    query: Query,
}

#[async_trait]
impl ProbeFactory for FlightPrepared {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        let mut client = FlightSqlServiceClient::new(channel(self.addr).await?);
        let statement = client.prepare(self.query.prepared(0).0, None).await?;
        Ok(Box::new(FlightPreparedProbe { client, statement, query: self.query }))
    }
}

#[async_trait]
impl Probe for FlightPreparedProbe {
    async fn call(&mut self, i: usize) -> anyhow::Result<usize> {
        if let (_, Some(key)) = self.query.prepared(i) {
            let schema = Arc::new(Schema::new(vec![Field::new("$1", DataType::Int64, false)]));
            self.statement
                .set_parameters(RecordBatch::try_new(schema, vec![Arc::new(Int64Array::from(vec![key]))])?)?;
        }
        let info = self.statement.execute().await?;
        fetch_rows(&mut self.client, info).await
    }
}

/// Plain Flight: one `DoGet` whose ticket carries the SQL (as pyarrow.flight sends it), one
/// round trip instead of Flight SQL's two.
pub struct FlightTicket {
    pub addr: SocketAddr,
    pub query: Query,
}

struct FlightTicketProbe {
    client: arrow_flight::flight_service_client::FlightServiceClient<Channel>,
    query: Query,
}

#[async_trait]
impl ProbeFactory for FlightTicket {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        let client = arrow_flight::flight_service_client::FlightServiceClient::new(channel(self.addr).await?);
        Ok(Box::new(FlightTicketProbe { client, query: self.query }))
    }
}

#[async_trait]
impl Probe for FlightTicketProbe {
    async fn call(&mut self, i: usize) -> anyhow::Result<usize> {
        let ticket = arrow_flight::Ticket::new(serde_json::json!({ "sql": self.query.sql(i) }).to_string());
        let data = self.client.do_get(ticket).await?.into_inner().map_err(arrow_flight::error::FlightError::from);
        let batches: Vec<RecordBatch> =
            arrow_flight::decode::FlightRecordBatchStream::new_from_flight_data(data).try_collect().await?;
        Ok(batches.iter().map(RecordBatch::num_rows).sum())
    }
}

/// The tier protocol's `Health` call: a tonic unary round trip that does no work.
pub struct Floor {
    pub addr: SocketAddr,
}

struct FloorProbe(TierServiceClient<Channel>);

#[async_trait]
impl ProbeFactory for Floor {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        Ok(Box::new(FloorProbe(TierServiceClient::new(channel(self.addr).await?))))
    }
}

#[async_trait]
impl Probe for FloorProbe {
    async fn call(&mut self, _i: usize) -> anyhow::Result<usize> {
        self.0.health(HealthRequest {}).await?;
        Ok(1)
    }
}

/// PostgreSQL directly, with a prepared statement (as `pgbench -M prepared`).
pub struct Postgres {
    pub port: u16,
    pub query: Query,
}

struct PostgresProbe {
    client: tokio_postgres::Client,
    statement: tokio_postgres::Statement,
    query: Query,
}

#[async_trait]
impl ProbeFactory for Postgres {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        let (client, connection) = tokio_postgres::connect(
            &format!("host=127.0.0.1 port={} user=postgres dbname=postgres", self.port),
            tokio_postgres::NoTls,
        )
        .await?;
        tokio::spawn(connection);
        let sql = match self.query {
            Query::Lookup { .. } => "SELECT v FROM points WHERE id = $1",
            Query::Aggregate | Query::Dashboard => AGGREGATE,
        };
        let statement = client.prepare(sql).await?;
        Ok(Box::new(PostgresProbe { client, statement, query: self.query }))
    }
}

#[async_trait]
impl Probe for PostgresProbe {
    async fn call(&mut self, i: usize) -> anyhow::Result<usize> {
        let rows = match self.query {
            Query::Lookup { rows } => self.client.query(&self.statement, &[&key(i, rows)]).await?,
            Query::Aggregate | Query::Dashboard => self.client.query(&self.statement, &[]).await?,
        };
        Ok(rows.len())
    }
}

/// Strata's engine in this process over its accelerated copy: the tier's query path (plan
/// cache, generic plans, zone maps, results cache) without a network or a protocol.
pub struct Engine {
    pub engine: strata_core::Engine,
    pub query: Query,
    /// The key bound as a parameter; otherwise spelled into the SQL text.
    pub prepared: bool,
}

struct EngineProbe {
    engine: strata_core::Engine,
    query: Query,
    prepared: bool,
}

#[async_trait]
impl ProbeFactory for Engine {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        Ok(Box::new(EngineProbe { engine: self.engine.clone(), query: self.query, prepared: self.prepared }))
    }
}

#[async_trait]
impl Probe for EngineProbe {
    async fn call(&mut self, i: usize) -> anyhow::Result<usize> {
        let (sql, params) = match self.query.prepared(i) {
            (sql, Some(key)) if self.prepared => (sql, vec![datafusion::common::ScalarValue::Int64(Some(key))]),
            _ => (self.query.sql(i), Vec::new()),
        };
        let mut stream = self.engine.execute(&sql, params).await?;
        let mut rows = 0;
        while let Some(batch) = stream.next().await {
            rows += batch?.num_rows();
        }
        Ok(rows)
    }
}

/// DataFusion in this process over the same data in memory: no network, no tier.
pub struct InProcess {
    pub ctx: Arc<SessionContext>,
    pub query: Query,
}

struct InProcessProbe {
    ctx: Arc<SessionContext>,
    query: Query,
}

#[async_trait]
impl ProbeFactory for InProcess {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        Ok(Box::new(InProcessProbe { ctx: Arc::clone(&self.ctx), query: self.query }))
    }
}

#[async_trait]
impl Probe for InProcessProbe {
    async fn call(&mut self, i: usize) -> anyhow::Result<usize> {
        let batches = self.ctx.sql(&self.query.sql(i)).await?.collect().await?;
        Ok(batches.iter().map(RecordBatch::num_rows).sum())
    }
}
