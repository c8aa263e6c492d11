//! `strata trace-sink`: an OTLP/gRPC trace receiver that keeps the spans it is sent in memory
//! and shows them at `GET /v1/spans[?trace_id=...]`: the collector stand-in of the compose
//! demo, for looking at one query's trace across the tiers without Jaeger.

use std::net::SocketAddr;
use std::process::ExitCode;

use strata_serving::telemetry::{self, LogFormat};
use strata_serving::trace_sink::TraceSink;

#[derive(clap::Args, Debug)]
pub struct TraceSinkArgs {
    /// Where OTLP/gRPC exporters send (a tier's `telemetry.otlp_endpoint`).
    #[arg(long, default_value = "127.0.0.1:4317")]
    otlp: SocketAddr,
    /// Where the spans are shown as JSON.
    #[arg(long, default_value = "127.0.0.1:16686")]
    http: SocketAddr,
    /// Spans kept; older ones are forgotten.
    #[arg(long, default_value_t = 100_000)]
    max_spans: usize,
    /// Log format: pretty or json.
    #[arg(long, env = "STRATA_LOG_FORMAT", default_value = "pretty")]
    log_format: LogFormat,
}

pub fn main(args: TraceSinkArgs) -> ExitCode {
    telemetry::init(args.log_format);
    crate::command::run(async move {
        serve(args).await?;
        Ok(ExitCode::SUCCESS)
    })
}

async fn serve(args: TraceSinkArgs) -> anyhow::Result<()> {
    let sink = TraceSink::new(args.max_spans);
    let http =
        tokio::net::TcpListener::bind(args.http).await.map_err(|e| anyhow::anyhow!("--http {}: {e}", args.http))?;
    let otlp = tonic::transport::Server::builder()
        .add_service(sink.grpc_service())
        .serve_with_shutdown(args.otlp, telemetry::shutdown_signal());
    tracing::info!(otlp = %args.otlp, http = %args.http, "trace sink listening");
    let web = axum::serve(http, sink.http_router()).with_graceful_shutdown(telemetry::shutdown_signal());
    let (otlp, web) = tokio::join!(otlp, web);
    otlp.map_err(|e| anyhow::anyhow!("--otlp {}: {e}", args.otlp))?;
    web?;
    Ok(())
}
