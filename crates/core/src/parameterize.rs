//! Automatic parameterization of SQL text. Applications often spell a lookup's key into the
//! SQL (`WHERE id = 42`) instead of binding it, so every key is a new text and would be
//! planned from scratch. The literals a query's WHERE or HAVING compares a column with are
//! replaced by placeholders here; the statement is then planned once per shape, as a
//! prepared statement is, and each query binds its own values.
//!
//! Only a value whose type is the one the plan expects for it is bound (see
//! [`binds_exactly`]); anything else is planned as written, so the answer is always the one
//! the literal SQL gives.

use arrow::datatypes::DataType;
use datafusion::common::ScalarValue;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Query, SetExpr, Statement, UnaryOperator, Value, ValueWithSpan,
};
use datafusion::sql::sqlparser::tokenizer::Location;

/// A statement with its comparison literals replaced by `$1`, `$2`, ...
pub(crate) struct Parameterized {
    pub statement: DfStatement,
    /// The statement's text: the plan cache key of its shape.
    pub key: String,
    /// The literals taken out, in placeholder order.
    pub values: Vec<ScalarValue>,
    /// Where each of them was written, in the same order (see [`crate::literal_shapes`]).
    pub taken: Vec<Taken>,
}

/// Where a literal taken out was written: its token's place, and whether a `-` before it
/// was taken with it.
pub(crate) struct Taken {
    pub start: Location,
    pub negative: bool,
}

/// The parameterized form of a query, or `None` when it has no literal to take out or
/// already has placeholders of its own (a prepared statement).
pub(crate) fn parameterize(sql: &str, statement: &DfStatement) -> Option<Parameterized> {
    // Placeholders of the client's own would be renumbered under ours: leave such text alone.
    if sql.contains('$') || sql.contains('?') {
        return None;
    }
    let DfStatement::Statement(inner) = statement else { return None };
    let Statement::Query(query) = inner.as_ref() else { return None };
    let mut query = query.clone();
    let mut taken: Values = Vec::new();
    parameterize_query(&mut query, &mut taken);
    let (values, taken): (Vec<_>, Vec<_>) = taken.into_iter().unzip();
    if values.is_empty() {
        return None;
    }
    let statement = DfStatement::Statement(Box::new(Statement::Query(query)));
    Some(Parameterized { key: statement.to_string(), statement, values, taken })
}

/// True when `value` can stand for the literal in a plan that expects `expected` there with
/// no change of meaning: the same type, an integer that fits another integer type exactly,
/// or a string for another string type.
pub(crate) fn binds_exactly(value: &ScalarValue, expected: &DataType) -> bool {
    let actual = value.data_type();
    if &actual == expected {
        return true;
    }
    match (&actual, expected) {
        (a, e) if a.is_integer() && e.is_integer() => {
            value.cast_to(expected).and_then(|v| v.cast_to(&actual)).is_ok_and(|back| &back == value)
        }
        (DataType::Utf8, DataType::Utf8View | DataType::LargeUtf8) => true,
        _ => false,
    }
}

fn parameterize_query(query: &mut Query, values: &mut Values) {
    parameterize_set(&mut query.body, values);
}

fn parameterize_set(set: &mut SetExpr, values: &mut Values) {
    match set {
        SetExpr::Select(select) => {
            if let Some(selection) = &mut select.selection {
                parameterize_predicate(selection, values);
            }
            if let Some(having) = &mut select.having {
                parameterize_predicate(having, values);
            }
        }
        SetExpr::Query(query) => parameterize_query(query, values),
        SetExpr::SetOperation { left, right, .. } => {
            parameterize_set(left, values);
            parameterize_set(right, values);
        }
        _ => {}
    }
}

/// Walks the boolean structure of a predicate (AND, OR, NOT, parentheses) down to
/// comparisons of a column with literals.
fn parameterize_predicate(expr: &mut Expr, values: &mut Values) {
    match expr {
        Expr::BinaryOp { left, op: BinaryOperator::And | BinaryOperator::Or, right } => {
            parameterize_predicate(left, values);
            parameterize_predicate(right, values);
        }
        Expr::BinaryOp {
            left,
            op:
                BinaryOperator::Eq
                | BinaryOperator::NotEq
                | BinaryOperator::Lt
                | BinaryOperator::LtEq
                | BinaryOperator::Gt
                | BinaryOperator::GtEq,
            right,
        } => {
            if is_column(left) {
                take_literal(right, values);
            } else if is_column(right) {
                take_literal(left, values);
            }
        }
        Expr::Nested(inner) | Expr::UnaryOp { op: UnaryOperator::Not, expr: inner } => {
            parameterize_predicate(inner, values)
        }
        Expr::InList { expr, list, .. } if is_column(expr) => {
            for item in list {
                take_literal(item, values);
            }
        }
        Expr::Between { expr, low, high, .. } if is_column(expr) => {
            take_literal(low, values);
            take_literal(high, values);
        }
        _ => {}
    }
}

fn is_column(expr: &Expr) -> bool {
    matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
}

/// The literals taken out so far, each with where it was written.
type Values = Vec<(ScalarValue, Taken)>;

/// Replaces an integer or string literal with the next placeholder.
fn take_literal(expr: &mut Expr, values: &mut Values) {
    let Some(taken) = literal(expr) else { return };
    values.push(taken);
    *expr = Expr::Value(ValueWithSpan::from(Value::Placeholder(format!("${}", values.len()))));
}

/// The value DataFusion's SQL planner gives an integer or single-quoted string literal.
/// Other literals (decimals, floats, typed strings, NULL) stay in the text.
fn literal(expr: &Expr) -> Option<(ScalarValue, Taken)> {
    let (negative, written) = match expr {
        Expr::UnaryOp { op: UnaryOperator::Minus, expr } => match expr.as_ref() {
            Expr::Value(v) => (true, v),
            _ => return None,
        },
        Expr::Value(v) => (false, v),
        _ => return None,
    };
    let taken = Taken { start: written.span.start, negative };
    let value = match &written.value {
        Value::Number(digits, false) if digits.bytes().all(|b| b.is_ascii_digit()) => {
            let signed = if negative { format!("-{digits}") } else { digits.clone() };
            signed.parse::<i64>().ok().map(|n| ScalarValue::Int64(Some(n)))
        }
        Value::SingleQuotedString(s) if !negative => Some(ScalarValue::Utf8(Some(s.clone()))),
        _ => None,
    }?;
    Some((value, taken))
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::sql::parser::DFParser;

    fn run(sql: &str) -> Option<(String, Vec<ScalarValue>)> {
        let statement = DFParser::parse_sql(sql).expect("parse").pop_front().expect("one statement");
        parameterize(sql, &statement).map(|p| (p.key, p.values))
    }

    #[test]
    fn comparison_literals_become_placeholders() {
        let (key, values) =
            run("SELECT v FROM t WHERE id = 42 AND (name <> 'x' OR -7 < n) AND k IN (1, 2) AND b BETWEEN 3 AND 4")
                .expect("parameterized");
        assert_eq!(
            key,
            "SELECT v FROM t WHERE id = $1 AND (name <> $2 OR $3 < n) AND k IN ($4, $5) AND b BETWEEN $6 AND $7"
        );
        let ints = |n: i64| ScalarValue::Int64(Some(n));
        assert_eq!(
            values,
            vec![ints(42), ScalarValue::Utf8(Some("x".into())), ints(-7), ints(1), ints(2), ints(3), ints(4)]
        );
    }

    #[test]
    fn same_shape_gives_same_key() {
        let a = run("SELECT v FROM t WHERE id = 1").expect("a").0;
        let b = run("SELECT v FROM t WHERE id = 999").expect("b").0;
        assert_eq!(a, b);
    }

    #[test]
    fn literals_outside_column_comparisons_stay() {
        // Projections, LIMIT, GROUP BY positions, floats, expressions and literal-vs-literal
        // comparisons keep their meaning only as written.
        assert!(run("SELECT 1, v FROM t LIMIT 10").is_none());
        assert!(run("SELECT v FROM t WHERE amount = 1.5").is_none());
        assert!(run("SELECT v FROM t WHERE id + 1 = 5").is_none());
        assert!(run("SELECT v FROM t WHERE 1 = 1").is_none());
        assert!(run("SELECT count(*) FROM t GROUP BY 1").is_none());
        assert!(run("SELECT v FROM t WHERE id = $1").is_none());
        assert!(run("EXPLAIN SELECT v FROM t WHERE id = 1").is_none());
    }

    #[test]
    fn only_exact_types_bind() {
        let int = ScalarValue::Int64(Some(5));
        assert!(binds_exactly(&int, &DataType::Int64));
        assert!(binds_exactly(&int, &DataType::Int32));
        assert!(!binds_exactly(&ScalarValue::Int64(Some(1 << 40)), &DataType::Int32));
        assert!(!binds_exactly(&ScalarValue::Int64(Some(-1)), &DataType::UInt64));
        assert!(!binds_exactly(&int, &DataType::Float64));
        assert!(!binds_exactly(&ScalarValue::Utf8(Some("2024-01-01".into())), &DataType::Date32));
        assert!(binds_exactly(&ScalarValue::Utf8(Some("x".into())), &DataType::Utf8View));
    }
}
