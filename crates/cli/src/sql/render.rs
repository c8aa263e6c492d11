//! How `strata sql` prints: answers in four formats, the line that says where an answer ran,
//! dataset listings, and errors with the SQL position marked.

use std::io::Write;
use std::time::Duration;

use anyhow::{Result, anyhow};
use arrow::array::{Array, AsArray, RecordBatch};
use arrow::datatypes::Schema;
use tonic::metadata::MetadataMap;

use crate::text_table::{age_cell, cell, table};

pub const HELP: &str = "\
  SQL;            run a statement (it may span lines; `;` ends it)
  \\d              datasets with status, rows, version and age
  \\d NAME         the columns of a dataset
  \\explain SQL    the plan of a statement
  \\timing         show or hide the time of each answer
  \\q              quit
";

/// Output formats.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns (arrow's pretty printer), then a line saying where the answer ran.
    Table,
    Csv,
    /// One JSON object per row.
    Json,
    /// An Arrow IPC stream on stdout, for other programs.
    Arrow,
}

/// Where an answer ran, from the response metadata.
#[derive(Debug, Default)]
pub struct Where {
    route: String,
    reason: String,
    versions: String,
    cache: String,
    trace_id: String,
}

impl Where {
    pub fn from_metadata(metadata: &MetadataMap) -> Self {
        let get = |name: &str| metadata.get(name).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
        Self {
            route: get("strata-route"),
            reason: get("strata-route-reason"),
            versions: get("strata-versions"),
            cache: get("strata-cache"),
            trace_id: get("strata-trace-id"),
        }
    }
}

pub struct Answer<'a> {
    pub batches: &'a [RecordBatch],
    pub elapsed: Duration,
    pub place: Where,
}

impl Answer<'_> {
    /// `(3 rows, 1.2 ms) route: forwarded (cold_start) versions: orders=4@1200ms cache: MISS
    /// trace: 4bf9...` (each part only when the answer said it)
    pub fn footer(&self, timing: bool) -> String {
        let rows: usize = self.batches.iter().map(RecordBatch::num_rows).sum();
        let mut line = format!("({rows} row{}", if rows == 1 { "" } else { "s" });
        if timing {
            line.push_str(&format!(", {:.1} ms", self.elapsed.as_secs_f64() * 1e3));
        }
        line.push(')');
        let place = &self.place;
        if !place.route.is_empty() {
            line.push_str(&format!(" route: {}", place.route));
            if !place.reason.is_empty() {
                line.push_str(&format!(" ({})", place.reason));
            }
        }
        if !place.versions.is_empty() {
            line.push_str(&format!(" versions: {}", place.versions));
        }
        if !place.cache.is_empty() {
            line.push_str(&format!(" cache: {}", place.cache));
        }
        if !place.trace_id.is_empty() {
            line.push_str(&format!(" trace: {}", place.trace_id));
        }
        line
    }
}

/// Writes the answer's rows in `format`.
pub fn write(out: &mut impl Write, format: Format, answer: &Answer<'_>) -> Result<()> {
    let batches = answer.batches;
    match format {
        Format::Table => {
            if batches.iter().all(|b| b.num_rows() == 0) && batches.first().is_none_or(|b| b.num_columns() == 0) {
                return Ok(());
            }
            writeln!(out, "{}", arrow::util::pretty::pretty_format_batches(batches)?)?;
        }
        Format::Csv => {
            let mut writer = arrow::csv::WriterBuilder::new().with_header(true).build(&mut *out);
            for batch in batches {
                writer.write(batch)?;
            }
        }
        Format::Json => {
            let mut writer = arrow::json::LineDelimitedWriter::new(&mut *out);
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
        Format::Arrow => {
            let schema = batches.first().map(|b| b.schema()).unwrap_or_else(|| Schema::empty().into());
            let mut writer = arrow::ipc::writer::StreamWriter::try_new(&mut *out, &schema)?;
            for batch in batches {
                writer.write(batch)?;
            }
            writer.finish()?;
        }
    }
    Ok(())
}

/// The `\d` table from `/v1/datasets`.
pub fn datasets(body: &serde_json::Value) -> String {
    let Some(datasets) = body["datasets"].as_array() else {
        return "no datasets\n".to_string();
    };
    let rows: Vec<[String; 7]> = datasets
        .iter()
        .map(|d| {
            [
                cell(&d["name"]),
                cell(&d["source"]),
                cell(&d["state"]),
                cell(&d["rows"]),
                cell(&d["version"]),
                age_cell(&d["staleness_seconds"]),
                d["last_error"].as_str().map_or("-".into(), |e| e.chars().take(60).collect()),
            ]
        })
        .collect();
    table(&["dataset", "source", "state", "rows", "version", "age", "last error"], &rows)
}

/// The `\d NAME` table from a `GetTables` answer with schemas.
pub fn columns(batches: &[RecordBatch]) -> Result<String> {
    let mut rows = Vec::new();
    for batch in batches {
        let names =
            batch.column_by_name("table_name").ok_or_else(|| anyhow!("GetTables answered without table_name"))?;
        let schemas =
            batch.column_by_name("table_schema").ok_or_else(|| anyhow!("GetTables answered without table_schema"))?;
        let (names, schemas) = (names.as_string::<i32>(), schemas.as_binary::<i32>());
        for i in 0..batch.num_rows() {
            if schemas.is_null(i) {
                continue;
            }
            let schema = arrow::ipc::convert::try_schema_from_ipc_buffer(schemas.value(i))?;
            for field in schema.fields() {
                rows.push([
                    names.value(i).to_string(),
                    field.name().clone(),
                    field.data_type().to_string(),
                    if field.is_nullable() { "yes" } else { "no" }.to_string(),
                ]);
            }
        }
    }
    if rows.is_empty() {
        return Ok(String::new());
    }
    Ok(table(&["table", "column", "type", "nullable"], &rows))
}

/// `error: ...`, and when the message names a position (`Line: 2, Column: 8`, as the SQL
/// parser reports), the statement's line with a caret under that column.
pub fn error(message: &str, sql: &str) -> String {
    let mut out = format!("error: {message}");
    if let Some((line, column)) = position(message)
        && let Some(text) = sql.lines().nth(line.saturating_sub(1))
    {
        let caret = " ".repeat(column.saturating_sub(1).min(text.chars().count()));
        out.push_str(&format!("\n  {text}\n  {caret}^"));
    }
    out
}

fn position(message: &str) -> Option<(usize, usize)> {
    let at = message.find("Line: ")?;
    let rest = &message[at + "Line: ".len()..];
    let line: usize = rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    let rest = &rest[rest.find("Column: ")? + "Column: ".len()..];
    let column: usize = rest.split(|c: char| !c.is_ascii_digit()).next()?.parse().ok()?;
    Some((line, column))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_position_is_marked_under_the_sql() {
        let shown = error(
            "SQL error: ParserError(\"Expected: end of statement, found: FORM at Line: 1, Column: 10\")",
            "SELECT 1 FORM t",
        );
        assert!(shown.ends_with("\n  SELECT 1 FORM t\n           ^"), "{shown}");
        let second_line = error("at Line: 2, Column: 3", "SELECT\n  nope");
        assert!(second_line.ends_with("\n    nope\n    ^"), "{second_line}");
        // A message without a position, or one past the text, is shown as it is.
        assert_eq!(error("table 'x' not found", "SELECT * FROM x"), "error: table 'x' not found");
        assert_eq!(error("at Line: 9, Column: 1", "SELECT"), "error: at Line: 9, Column: 1");
    }

    #[test]
    fn the_footer_says_rows_time_and_route() {
        let mut metadata = MetadataMap::new();
        metadata.insert("strata-route", "forwarded".parse().expect("header"));
        metadata.insert("strata-route-reason", "cold_start".parse().expect("header"));
        metadata.insert("strata-versions", "orders=4@1200ms".parse().expect("header"));
        metadata.insert("strata-trace-id", "4bf92f3577b34da6a3ce929d0e0e4736".parse().expect("header"));
        let answer =
            Answer { batches: &[], elapsed: Duration::from_micros(1500), place: Where::from_metadata(&metadata) };
        let trace = "trace: 4bf92f3577b34da6a3ce929d0e0e4736";
        assert_eq!(
            answer.footer(true),
            format!("(0 rows, 1.5 ms) route: forwarded (cold_start) versions: orders=4@1200ms {trace}")
        );
        assert_eq!(
            answer.footer(false),
            format!("(0 rows) route: forwarded (cold_start) versions: orders=4@1200ms {trace}")
        );
    }
}
