//! Positional `?` placeholders, the parameter style of ODBC, JDBC and the ADBC Python
//! driver (`paramstyle = "qmark"`), numbered `$1`, `$2`, ... in the order they appear in
//! the text, which is the order those clients bind values in. DataFusion plans only `$n`.

use std::borrow::Cow;

use datafusion::sql::sqlparser::dialect::GenericDialect;
use datafusion::sql::sqlparser::tokenizer::{Token, Tokenizer};

use crate::error::{Result, StrataError};

/// `sql` with each `?` placeholder replaced by `$n`, n counting from 1 in text order; the
/// text itself when it has none. `?` inside strings, quoted names and comments is left
/// alone (the tokenizer tells them apart). Mixing `?` with `$n` is refused: which value
/// goes where would be a guess.
pub fn number_positional(sql: &str) -> Result<Cow<'_, str>> {
    if !sql.contains('?') {
        return Ok(Cow::Borrowed(sql));
    }
    // A text that does not tokenize is left to the parser, whose error names the position.
    let Ok(tokens) = Tokenizer::new(&GenericDialect {}, sql).tokenize_with_location() else {
        return Ok(Cow::Borrowed(sql));
    };
    let mut question = Vec::new();
    let mut numbered = false;
    for token in &tokens {
        if let Token::Placeholder(p) = &token.token {
            if p == "?" {
                question.push((token.span.start, token.span.end));
            } else if p.starts_with('$') {
                numbered = true;
            }
        }
    }
    if question.is_empty() {
        return Ok(Cow::Borrowed(sql));
    }
    if numbered {
        return Err(StrataError::Parse(
            "the query mixes `?` and `$n` placeholders; use one style (`?` are numbered in text order)".into(),
        ));
    }
    let lines = line_starts(sql);
    let offset = |loc: datafusion::sql::sqlparser::tokenizer::Location| -> Option<usize> {
        let start = *lines.get(usize::try_from(loc.line).ok()?.checked_sub(1)?)?;
        let column = usize::try_from(loc.column).ok()?.checked_sub(1)?;
        Some(sql[start..].char_indices().nth(column).map_or(sql.len(), |(i, _)| start + i))
    };
    let mut out = String::with_capacity(sql.len() + question.len() * 2);
    let mut copied = 0;
    for (n, (start, _)) in question.iter().enumerate() {
        let Some(at) = offset(*start).filter(|at| sql[*at..].starts_with('?') && *at >= copied) else {
            return Err(StrataError::Internal(format!("cannot locate placeholder {} in the query text", n + 1)));
        };
        out.push_str(&sql[copied..at]);
        out.push_str(&format!("${}", n + 1));
        copied = at + 1;
    }
    out.push_str(&sql[copied..]);
    Ok(Cow::Owned(out))
}

/// Byte offset of the start of each line.
fn line_starts(sql: &str) -> Vec<usize> {
    std::iter::once(0).chain(sql.match_indices('\n').map(|(i, _)| i + 1)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn question_marks_are_numbered_in_text_order() {
        assert_eq!(
            number_positional("SELECT a FROM t WHERE a = ? AND b IN (?, ?) LIMIT ?").expect("numbered"),
            "SELECT a FROM t WHERE a = $1 AND b IN ($2, $3) LIMIT $4"
        );
        // Across lines, after multi-byte text, and not inside strings, names or comments.
        let sql = "SELECT 'é?', \"q?\" -- what?\nFROM t WHERE x = ? /* ? */ AND y = ?";
        assert_eq!(
            number_positional(sql).expect("numbered"),
            "SELECT 'é?', \"q?\" -- what?\nFROM t WHERE x = $1 /* ? */ AND y = $2"
        );
    }

    #[test]
    fn text_without_question_marks_is_untouched_and_mixing_styles_is_refused() {
        assert!(matches!(number_positional("SELECT $1").expect("same"), Cow::Borrowed(_)));
        assert!(matches!(number_positional("SELECT '?'").expect("same"), Cow::Borrowed(_)));
        let err = number_positional("SELECT ? + $1").expect_err("mixed");
        assert!(err.to_string().contains("mixes"), "{err}");
    }
}
