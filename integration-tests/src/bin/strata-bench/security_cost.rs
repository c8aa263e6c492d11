//! What authentication and TLS cost a query: the same Flight SQL point lookups against four
//! platforms serving the same accelerated Parquet file, plain, with an API key on every call,
//! over TLS, and over TLS with a key, side by side. Each probe keeps its connection (as a
//! pooled client does), so TLS is measured per call, not per handshake.

use std::path::PathBuf;
use std::time::Duration;

use arrow_flight::sql::client::FlightSqlServiceClient;
use async_trait::async_trait;
use futures::TryStreamExt;
use strata_integration_tests::certs::TestCa;
use strata_integration_tests::tier::Tier;
use tonic::transport::Channel;

use crate::measure::{Effort, Path, Probe, ProbeFactory, Watched, measure_side_by_side, with_ratios};
use crate::paths::Query;
use crate::report::Scenario;

pub async fn run(parquet: &std::path::Path, rows: i64, effort: Effort) -> anyhow::Result<Scenario> {
    let dir = tempfile::tempdir()?;
    let ca = TestCa::new(dir.path(), "bench");
    let tls = ca.server("server").server_yaml(None, false);
    let (key, hash) = strata_core::auth::generate_key().map_err(anyhow::Error::msg)?;
    let auth = format!(
        "auth:\n  keys:\n    - {{ id: bench, tenant: bench, hash: \"{hash}\" }}\ntenants:\n  bench: {{ datasets: [points] }}\n"
    );
    let platform = |server: &str, auth: &str| {
        format!(
            "region: eu\nserver:\n  max_connections: 1024\n{server}limits:\n  max_concurrent_queries: 256\n{auth}datasets:\n  - name: points\n    from: file:{}\n    acceleration: {{}}\n",
            parquet.display()
        )
    };
    let plain = Tier::start("platform-service", &platform("", "")).await;
    let keyed = Tier::start("platform-service", &platform("", &auth)).await.with_key(&key);
    let tls_only = Tier::builder("platform-service").config(&platform(&tls, "")).tls(&ca.ca_file).start().await;
    let both =
        Tier::builder("platform-service").config(&platform(&tls, &auth)).tls(&ca.ca_file).start().await.with_key(&key);
    for tier in [&plain, &keyed, &tls_only, &both] {
        tier.wait_ready(Duration::from_secs(600)).await;
    }
    let query = Query::Lookup { rows };
    let (p_plain, p_key, p_tls, p_both) = (
        SecuredFlight { url: plain.flight_url(), ca: None, key: None, query },
        SecuredFlight { url: keyed.flight_url(), ca: None, key: Some(key.clone()), query },
        SecuredFlight { url: tls_only.flight_url(), ca: Some(ca.ca_file.clone()), key: None, query },
        SecuredFlight { url: both.flight_url(), ca: Some(ca.ca_file.clone()), key: Some(key.clone()), query },
    );
    let paths: Vec<Path> = vec![
        ("plaintext, no auth", &p_plain),
        ("plaintext, API key", &p_key),
        ("TLS, no auth", &p_tls),
        ("TLS, API key", &p_both),
    ];
    let watched = [
        Watched::process("plain", plain.pid()),
        Watched::process("key", keyed.pid()),
        Watched::process("tls", tls_only.pid()),
        Watched::process("tls+key", both.pid()),
    ];
    let results = measure_side_by_side(&paths, effort, 1, &watched).await?;
    Ok(Scenario {
        name: format!("Security cost: Flight SQL point lookups over {rows} rows"),
        baseline: "plaintext, no auth".into(),
        results: with_ratios(results, "plaintext, no auth"),
        figures: Vec::new(),
        table: None,
    })
}

/// Flight SQL (GetFlightInfo + DoGet) over plaintext or TLS, with or without a key.
struct SecuredFlight {
    url: String,
    ca: Option<PathBuf>,
    key: Option<String>,
    query: Query,
}

struct SecuredProbe {
    client: FlightSqlServiceClient<Channel>,
    query: Query,
}

#[async_trait]
impl ProbeFactory for SecuredFlight {
    async fn probe(&self) -> anyhow::Result<Box<dyn Probe>> {
        let channel = match &self.ca {
            None => Channel::from_shared(self.url.clone())?.tcp_nodelay(true).connect().await?,
            Some(ca) => strata_integration_tests::tls_channel(&self.url, ca, None).await,
        };
        let mut client = FlightSqlServiceClient::new(channel);
        if let Some(key) = &self.key {
            client.set_token(key.clone());
        }
        Ok(Box::new(SecuredProbe { client, query: self.query }))
    }
}

#[async_trait]
impl Probe for SecuredProbe {
    async fn call(&mut self, i: usize) -> anyhow::Result<usize> {
        let info = self.client.execute(self.query.sql(i), None).await?;
        let mut rows = 0;
        for endpoint in info.endpoint {
            let ticket = endpoint.ticket.ok_or_else(|| anyhow::anyhow!("endpoint without ticket"))?;
            let batches: Vec<arrow::array::RecordBatch> = self.client.do_get(ticket).await?.try_collect().await?;
            rows += batches.iter().map(|b| b.num_rows()).sum::<usize>();
        }
        Ok(rows)
    }
}
