//! Plain aligned tables for the terminal (`strata sql`'s listings, `strata status`), and the
//! cells they make of a tier's JSON status.

use std::time::Duration;

use serde_json::Value;

/// A JSON value as a cell: `-` for null, strings unquoted.
pub fn cell(v: &Value) -> String {
    match v {
        Value::Null => "-".into(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Seconds as a whole-second age (`1m 5s`), `-` when absent.
pub fn age_cell(v: &Value) -> String {
    v.as_f64().map_or("-".into(), |s| humantime::format_duration(Duration::from_secs(s as u64)).to_string())
}

/// `header` and `rows` as left-aligned columns separated by ` | `, with a rule under the
/// header; trailing spaces trimmed.
pub fn table<const N: usize>(header: &[&str; N], rows: &[[String; N]]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let line = |cells: Vec<&str>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        format!(" {}\n", padded.join(" | ")).trim_end().to_string() + "\n"
    };
    let mut out = line(header.to_vec());
    out.push_str(&format!("-{}-\n", widths.iter().map(|w| "-".repeat(*w)).collect::<Vec<_>>().join("-+-")));
    for row in rows {
        out.push_str(&line(row.iter().map(String::as_str).collect()));
    }
    out
}
