//! `strata sql`: a Flight SQL client for people and scripts, against any tier.
//!
//! One-shot (`-c`, `-f`, or statements on a piped stdin) or a REPL with history and
//! multi-line input (a statement ends at `;`). After each answer it says how many rows, how
//! long, and where the answer came from, read from the response metadata every tier sends
//! (`strata-route`, `strata-route-reason`, `strata-versions`, `strata-cache`). Errors are
//! the server's message, with the SQL position marked when the message has one.

// Answers, listings and help go to stdout: it is the client's interface.
#![allow(clippy::print_stdout)]

mod render;

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow};
use arrow::array::RecordBatch;
use arrow_flight::decode::FlightRecordBatchStream;
use arrow_flight::flight_service_client::FlightServiceClient;
use arrow_flight::sql::{CommandGetTables, CommandStatementQuery, ProstMessageExt};
use arrow_flight::{FlightDescriptor, FlightInfo};
use futures::TryStreamExt;
use prost::Message;
use tonic::metadata::{MetadataKey, MetadataMap, MetadataValue};
use tonic::transport::Channel;

pub use render::Format;
use render::{Answer, Where};

/// `strata sql` flags.
#[derive(clap::Args, Debug)]
pub struct SqlArgs {
    /// The tier's Flight SQL endpoint.
    #[arg(long, env = "STRATA_ENDPOINT", default_value = "http://127.0.0.1:50051")]
    endpoint: String,
    /// The tier's HTTP endpoint, for dataset status in `\d`.
    #[arg(long, env = "STRATA_HTTP", default_value = "http://127.0.0.1:8080")]
    http: String,
    /// Run this SQL and exit.
    #[arg(short = 'c', long = "command", conflicts_with = "file")]
    command: Option<String>,
    /// Run the statements of this file (`;`-separated) and exit.
    #[arg(short = 'f', long = "file")]
    file: Option<PathBuf>,
    /// How answers are printed.
    #[arg(long, value_enum, default_value = "table")]
    format: Format,
    /// `strong` reads each dataset's authoritative copy in its home region.
    #[arg(long, value_parser = ["eventual", "strong"], default_value = "eventual")]
    consistency: String,
    /// An extra request header, `name=value` (repeatable).
    #[arg(long = "header", value_parser = parse_header)]
    headers: Vec<(String, String)>,
    /// Bearer token sent as `authorization: Bearer ...` on every call.
    #[arg(long, env = "STRATA_TOKEN", hide_env_values = true)]
    token: Option<String>,
    /// The CA certificate (PEM) an `https://` tier's certificate must chain to.
    #[arg(long, env = "STRATA_CA_FILE")]
    ca_file: Option<PathBuf>,
    /// Do not print the rows/time/route line after each answer.
    #[arg(long, short = 'q')]
    quiet: bool,
}

fn parse_header(s: &str) -> std::result::Result<(String, String), String> {
    let (name, value) = s.split_once('=').ok_or_else(|| format!("`{s}` is not name=value"))?;
    MetadataKey::<tonic::metadata::Ascii>::from_bytes(name.trim().to_ascii_lowercase().as_bytes())
        .map_err(|_| format!("`{name}` is not a valid header name"))?;
    MetadataValue::<tonic::metadata::Ascii>::try_from(value.trim())
        .map_err(|_| format!("the value of `{name}` is not a valid header value"))?;
    Ok((name.trim().to_ascii_lowercase(), value.trim().to_string()))
}

pub fn main(args: SqlArgs) -> ExitCode {
    crate::command::run(run(args))
}

async fn run(args: SqlArgs) -> Result<ExitCode> {
    let mut session = Session::connect(&args).await?;
    let script = match (&args.command, &args.file) {
        (Some(sql), _) => Some(sql.clone()),
        (None, Some(path)) => {
            Some(std::fs::read_to_string(path).with_context(|| format!("cannot read {}", path.display()))?)
        }
        (None, None) if !std::io::stdin().is_terminal() => {
            let mut text = String::new();
            std::io::stdin().read_to_string(&mut text).context("cannot read stdin")?;
            Some(text)
        }
        (None, None) => None,
    };
    match script {
        // A script stops at its first failing statement, with exit code 1.
        Some(text) => {
            for statement in split_statements(&text) {
                if !session.run_line(&statement).await {
                    return Ok(ExitCode::FAILURE);
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        None => repl(session).await,
    }
}

/// The interactive loop: rustyline for editing and history (`~/.strata_history`).
async fn repl(mut session: Session) -> Result<ExitCode> {
    let mut editor = rustyline::DefaultEditor::new().context("cannot open the terminal")?;
    let history = std::env::var_os("HOME").map(|home| PathBuf::from(home).join(".strata_history"));
    if let Some(path) = &history {
        let _ = editor.load_history(path);
    }
    println!("strata sql: connected to {} (\\? for help, \\q to quit)", session.endpoint);
    let mut pending = String::new();
    loop {
        let prompt = if pending.is_empty() { "strata> " } else { "   ...> " };
        let line = match editor.readline(prompt) {
            Ok(line) => line,
            Err(rustyline::error::ReadlineError::Interrupted) => {
                pending.clear();
                continue;
            }
            Err(rustyline::error::ReadlineError::Eof) => break,
            Err(err) => return Err(anyhow!("cannot read the terminal: {err}")),
        };
        let trimmed = line.trim();
        if pending.is_empty() && trimmed.starts_with('\\') {
            let _ = editor.add_history_entry(trimmed);
            if matches!(trimmed, "\\q" | "\\quit") {
                break;
            }
            session.run_line(trimmed).await;
            continue;
        }
        if trimmed.is_empty() && pending.is_empty() {
            continue;
        }
        pending.push_str(&line);
        pending.push('\n');
        if !trimmed.ends_with(';') {
            continue;
        }
        let statement = std::mem::take(&mut pending);
        let _ = editor.add_history_entry(statement.trim());
        session.run_line(statement.trim().trim_end_matches(';')).await;
    }
    if let Some(path) = &history {
        let _ = editor.save_history(path);
    }
    Ok(ExitCode::SUCCESS)
}

/// A connection to one tier and the client's settings.
struct Session {
    endpoint: String,
    http: String,
    /// For `\\d` (the tier's HTTP API), with the same key as the Flight calls.
    http_client: reqwest::Client,
    client: FlightServiceClient<Channel>,
    headers: Vec<(String, String)>,
    format: Format,
    footer: bool,
    timing: bool,
}

impl Session {
    async fn connect(args: &SqlArgs) -> Result<Self> {
        let channel = crate::command::flight_channel(&args.endpoint, args.ca_file.as_deref(), Duration::from_secs(5))
            .await
            .map_err(|err| anyhow!("cannot connect to {}: {}", args.endpoint, err.root_cause()))?;
        let mut headers = args.headers.clone();
        if args.consistency == "strong" {
            headers.push(("strata-consistency".into(), "strong".into()));
        }
        if let Some(token) = &args.token {
            headers.push(("authorization".into(), format!("Bearer {token}")));
        }
        Ok(Self {
            endpoint: args.endpoint.clone(),
            http: args.http.trim_end_matches('/').to_string(),
            http_client: crate::command::http_client(
                Duration::from_secs(30),
                args.token.as_deref(),
                args.ca_file.as_deref(),
            )?,
            client: FlightServiceClient::new(channel).max_decoding_message_size(256 << 20),
            headers,
            format: args.format,
            footer: !args.quiet,
            timing: true,
        })
    }

    /// Runs one statement or backslash command, printing its answer or error. False when
    /// it failed.
    async fn run_line(&mut self, line: &str) -> bool {
        let line = line.trim();
        let result = match line.split_once(char::is_whitespace).unwrap_or((line, "")) {
            ("\\?" | "\\help", _) => {
                print!("{}", render::HELP);
                Ok(())
            }
            ("\\d", "") => self.list_datasets().await,
            ("\\d", name) => self.describe(name.trim()).await,
            ("\\timing", _) => {
                self.timing = !self.timing;
                println!("timing is {}", if self.timing { "on" } else { "off" });
                Ok(())
            }
            ("\\explain", sql) if !sql.trim().is_empty() => self.query(&format!("EXPLAIN {}", sql.trim())).await,
            (command, _) if command.starts_with('\\') => Err(anyhow!("unknown command `{command}`: \\? lists them")),
            _ => self.query(line).await,
        };
        match result {
            Ok(()) => true,
            Err(err) => {
                eprintln!("{}", render::error(&format!("{err:#}"), line));
                false
            }
        }
    }

    async fn query(&mut self, sql: &str) -> Result<()> {
        let started = Instant::now();
        let command = CommandStatementQuery { query: sql.to_string(), transaction_id: None };
        let info = self.flight_info(command.as_any().encode_to_vec()).await?;
        let (batches, metadata) = self.fetch(info).await?;
        let answer = Answer { batches: &batches, elapsed: started.elapsed(), place: Where::from_metadata(&metadata) };
        let mut out = std::io::stdout().lock();
        render::write(&mut out, self.format, &answer)?;
        if self.footer && self.format == Format::Table {
            writeln!(out, "{}", answer.footer(self.timing))?;
        }
        out.flush()?;
        Ok(())
    }

    /// `\d`: every dataset with its status, from the tier's HTTP API (the Flight SQL
    /// catalog lists names only).
    async fn list_datasets(&mut self) -> Result<()> {
        let url = format!("{}/v1/datasets", self.http);
        let body: serde_json::Value = self
            .http_client
            .get(&url)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|err| anyhow!("cannot read {url}: {err} (set --http to the tier's HTTP address)"))?
            .json()
            .await
            .map_err(|err| anyhow!("{url} answered something that is not JSON: {err}"))?;
        print!("{}", render::datasets(&body));
        Ok(())
    }

    /// `\d NAME`: the columns of one table, from Flight SQL `GetTables` with schemas.
    async fn describe(&mut self, name: &str) -> Result<()> {
        let (schema, table) = match name.split_once('.') {
            Some((schema, table)) => (Some(schema.to_string()), table.to_string()),
            None => (None, name.to_string()),
        };
        let command = CommandGetTables {
            catalog: None,
            db_schema_filter_pattern: schema,
            table_name_filter_pattern: Some(table),
            table_types: Vec::new(),
            include_schema: true,
        };
        let info = self.flight_info(command.as_any().encode_to_vec()).await?;
        let (batches, _) = self.fetch(info).await?;
        let described = render::columns(&batches)?;
        if described.is_empty() {
            return Err(anyhow!("no dataset named `{name}`: \\d lists them"));
        }
        print!("{described}");
        Ok(())
    }

    async fn flight_info(&mut self, command: Vec<u8>) -> Result<FlightInfo> {
        let mut request = tonic::Request::new(FlightDescriptor::new_cmd(command));
        self.add_headers(request.metadata_mut());
        let info = self.client.get_flight_info(request).await.map_err(status)?;
        Ok(info.into_inner())
    }

    /// Every endpoint's batches, and the response metadata of the first (the route).
    async fn fetch(&mut self, info: FlightInfo) -> Result<(Vec<RecordBatch>, MetadataMap)> {
        let mut batches = Vec::new();
        let mut metadata = MetadataMap::new();
        for (i, endpoint) in info.endpoint.into_iter().enumerate() {
            let ticket = endpoint.ticket.ok_or_else(|| anyhow!("the server sent an endpoint without a ticket"))?;
            let mut request = tonic::Request::new(ticket);
            self.add_headers(request.metadata_mut());
            let response = self.client.do_get(request).await.map_err(status)?;
            if i == 0 {
                metadata = response.metadata().clone();
            }
            let stream = FlightRecordBatchStream::new_from_flight_data(
                response.into_inner().map_err(|s| arrow_flight::error::FlightError::Tonic(Box::new(s))),
            );
            let mut part: Vec<RecordBatch> = stream.try_collect().await.map_err(|err| match err {
                arrow_flight::error::FlightError::Tonic(s) => status(*s),
                other => anyhow!("{other}"),
            })?;
            batches.append(&mut part);
        }
        Ok((batches, metadata))
    }

    fn add_headers(&self, metadata: &mut MetadataMap) {
        for (name, value) in &self.headers {
            if let (Ok(name), Ok(value)) = (MetadataKey::from_bytes(name.as_bytes()), value.parse()) {
                metadata.insert(name, value);
            }
        }
    }
}

/// The server's own words for a failed call (never tonic's debug dump).
fn status(status: tonic::Status) -> anyhow::Error {
    let code = status.code();
    let message = status.message().trim();
    match code {
        tonic::Code::Unavailable => anyhow!("the tier is unavailable: {message}"),
        tonic::Code::Unauthenticated => anyhow!("not authenticated: {message}"),
        _ if message.is_empty() => anyhow!("{code}"),
        _ => anyhow!("{message}"),
    }
}

/// Statements of a script, split at `;` outside quotes and comments; empty ones dropped.
fn split_statements(text: &str) -> Vec<String> {
    let mut statements = Vec::new();
    let mut current = String::new();
    let mut chars = text.chars().peekable();
    let mut quote: Option<char> = None;
    while let Some(c) = chars.next() {
        match (quote, c) {
            (Some(q), _) if c == q => {
                quote = None;
                current.push(c);
            }
            (Some(_), _) => current.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                current.push(c);
            }
            (None, '-') if chars.peek() == Some(&'-') => {
                // A line comment: skip to the end of the line.
                for c in chars.by_ref() {
                    if c == '\n' {
                        current.push('\n');
                        break;
                    }
                }
            }
            (None, ';') => statements.push(std::mem::take(&mut current)),
            (None, _) => current.push(c),
        }
    }
    statements.push(current);
    statements.into_iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_split_at_semicolons_outside_quotes_and_comments() {
        let script = "SELECT 'a;b' AS x;\n-- a comment; still a comment\nSELECT \"c;d\" FROM t ;;\n  ";
        assert_eq!(split_statements(script), ["SELECT 'a;b' AS x", "SELECT \"c;d\" FROM t"]);
        assert!(split_statements("  ;  ; ").is_empty());
    }

    #[test]
    fn headers_are_checked_as_they_are_given() {
        assert_eq!(parse_header("X-Team = blue").expect("valid"), ("x-team".to_string(), "blue".to_string()));
        assert!(parse_header("novalue").expect_err("invalid").contains("name=value"));
        assert!(parse_header("bad name=1").expect_err("invalid").contains("header name"));
        assert!(parse_header("x=\u{1}").expect_err("invalid").contains("header value"));
    }
}
