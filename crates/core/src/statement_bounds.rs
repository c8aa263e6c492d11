//! Bounds on a parsed statement before it is planned. Planning walks expression trees
//! recursively, so a few KB of SQL that nest deep (`1+1+...+1`, a long `OR` chain) could
//! overflow a thread's stack and abort the process. A statement is measured here and
//! refused past `limits.max_expression_depth` with an error naming the limit; the tiers'
//! threads have stacks large enough for every walk of a statement within it.
//!
//! The one deep shape applications generate on purpose, `k = 1 OR k = 2 OR ...`, is first
//! folded into the equivalent `k IN (1, 2, ...)`, which is flat.

use std::ops::ControlFlow;

use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::{
    BinaryOperator, Expr, Query, Statement, Value, Visit, VisitMut, Visitor, VisitorMut,
};

use crate::error::{Result, StrataError};

/// Refuses SQL text longer than `max` bytes (`limits.max_query_size`).
pub fn check_size(sql: &str, max: usize) -> Result<()> {
    if sql.len() > max {
        return Err(StrataError::InvalidRequest(format!(
            "the query is {} bytes, over limits.max_query_size ({max} bytes)",
            sql.len()
        )));
    }
    Ok(())
}

/// Folds OR chains of equalities into IN lists, then refuses the statement if its
/// expressions or subqueries nest deeper than `max_depth` (`limits.max_expression_depth`).
pub fn bound_statement(statement: &mut DfStatement, max_depth: usize) -> Result<()> {
    let inner: &mut Statement = match statement {
        DfStatement::Statement(s) => s,
        DfStatement::Explain(explain) => return bound_statement(&mut explain.statement, max_depth),
        _ => return Ok(()),
    };
    let _ = VisitMut::visit(inner, &mut FoldOrChains);
    let mut depth = Depth { current: 0, max: max_depth };
    if let ControlFlow::Break(reached) = Visit::visit(&*inner, &mut depth) {
        return Err(StrataError::InvalidRequest(format!(
            "the query nests expressions and subqueries more than {reached} deep, over \
             limits.max_expression_depth ({max_depth}); write long OR/AND chains as IN lists or split the query"
        )));
    }
    Ok(())
}

/// Refuses a statement whose IN lists are longer than `max_in_list` (`limits.max_in_list`) or
/// that has more than `max_parameters` distinct placeholders (`limits.max_parameters`). Both
/// are bounded by the text's size too, but each element costs far more planned than written,
/// and a clear error names the limit a generated query ran into.
pub fn check_lists(statement: &DfStatement, max_in_list: usize, max_parameters: usize) -> Result<()> {
    let inner: &Statement = match statement {
        DfStatement::Statement(s) => s,
        DfStatement::Explain(explain) => return check_lists(&explain.statement, max_in_list, max_parameters),
        _ => return Ok(()),
    };
    let mut lists = Lists { max_in_list, max_parameters, parameters: std::collections::HashSet::new() };
    match Visit::visit(inner, &mut lists) {
        ControlFlow::Break(ListBound::InList(len)) => Err(StrataError::InvalidRequest(format!(
            "an IN list of the query has {len} elements, over limits.max_in_list ({max_in_list}); \
             pass long lists as a joined table or split the query"
        ))),
        ControlFlow::Break(ListBound::Parameters) => Err(StrataError::InvalidRequest(format!(
            "the query has more than {max_parameters} parameters, over limits.max_parameters ({max_parameters})"
        ))),
        ControlFlow::Continue(()) => Ok(()),
    }
}

enum ListBound {
    InList(usize),
    Parameters,
}

struct Lists {
    max_in_list: usize,
    max_parameters: usize,
    parameters: std::collections::HashSet<String>,
}

impl Visitor for Lists {
    type Break = ListBound;

    fn pre_visit_expr(&mut self, expr: &Expr) -> ControlFlow<ListBound> {
        match expr {
            Expr::InList { list, .. } if list.len() > self.max_in_list => {
                ControlFlow::Break(ListBound::InList(list.len()))
            }
            Expr::Value(value) => match &value.value {
                Value::Placeholder(name) => {
                    self.parameters.insert(name.clone());
                    if self.parameters.len() > self.max_parameters {
                        ControlFlow::Break(ListBound::Parameters)
                    } else {
                        ControlFlow::Continue(())
                    }
                }
                _ => ControlFlow::Continue(()),
            },
            _ => ControlFlow::Continue(()),
        }
    }
}

/// Tracks nesting of expressions and queries; breaks as soon as it passes the bound.
struct Depth {
    current: usize,
    max: usize,
}

impl Depth {
    fn enter(&mut self) -> ControlFlow<usize> {
        self.current += 1;
        if self.current > self.max { ControlFlow::Break(self.max) } else { ControlFlow::Continue(()) }
    }
}

impl Visitor for Depth {
    type Break = usize;

    fn pre_visit_query(&mut self, _query: &Query) -> ControlFlow<usize> {
        self.enter()
    }

    fn post_visit_query(&mut self, _query: &Query) -> ControlFlow<usize> {
        self.current -= 1;
        ControlFlow::Continue(())
    }

    fn pre_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<usize> {
        self.enter()
    }

    fn post_visit_expr(&mut self, _expr: &Expr) -> ControlFlow<usize> {
        self.current -= 1;
        ControlFlow::Continue(())
    }
}

/// Rewrites `x = a OR x = b` (and `x IN (..) OR x = c`, either side of `=`) into
/// `x IN (a, b, c)` when every value is a literal of one kind (all numbers or all strings),
/// so type coercion treats the list as it treated the comparisons. Visiting bottom-up, a
/// left-deep chain folds one link at a time.
struct FoldOrChains;

impl VisitorMut for FoldOrChains {
    type Break = ();

    fn post_visit_expr(&mut self, expr: &mut Expr) -> ControlFlow<()> {
        if let Expr::BinaryOp { left, op: BinaryOperator::Or, right } = expr
            && let (Some((lk, lv)), Some((rk, rv))) = (membership(left), membership(right))
            && lk == rk
            && same_kind(lv.iter().chain(rv.iter()).copied())
        {
            let (Some((key, mut values)), Some((_, more))) = (into_membership(left), into_membership(right)) else {
                return ControlFlow::Continue(());
            };
            values.extend(more);
            *expr = Expr::InList { expr: Box::new(key), list: values, negated: false };
        }
        ControlFlow::Continue(())
    }
}

/// `(key, values)` when `expr` is `key = literal`, `literal = key` or `key IN (literals)`.
fn membership(expr: &Expr) -> Option<(&Expr, Vec<&Expr>)> {
    match expr {
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => match (is_literal(left), is_literal(right)) {
            (false, true) if is_key(left) => Some((left, vec![right])),
            (true, false) if is_key(right) => Some((right, vec![left])),
            _ => None,
        },
        Expr::InList { expr, list, negated: false } if is_key(expr) && list.iter().all(is_literal) => {
            Some((expr, list.iter().collect()))
        }
        Expr::Nested(inner) => membership(inner),
        _ => None,
    }
}

/// [`membership`], taking the parts out of `expr`.
fn into_membership(expr: &mut Expr) -> Option<(Expr, Vec<Expr>)> {
    let taken = std::mem::replace(expr, Expr::value(Value::Null));
    match taken {
        Expr::BinaryOp { left, op: BinaryOperator::Eq, right } => {
            if is_literal(&right) {
                Some((*left, vec![*right]))
            } else {
                Some((*right, vec![*left]))
            }
        }
        Expr::InList { expr, list, .. } => Some((*expr, list)),
        Expr::Nested(mut inner) => into_membership(&mut inner),
        _ => None,
    }
}

/// A column, possibly qualified: the left side of an IN list that means the same thing.
fn is_key(expr: &Expr) -> bool {
    matches!(expr, Expr::Identifier(_) | Expr::CompoundIdentifier(_))
}

fn is_literal(expr: &Expr) -> bool {
    matches!(expr, Expr::Value(v) if matches!(v.value, Value::Number(..) | Value::SingleQuotedString(_)))
}

fn same_kind<'a>(mut values: impl Iterator<Item = &'a Expr>) -> bool {
    let kind = |e: &Expr| match e {
        Expr::Value(v) => matches!(v.value, Value::Number(..)),
        _ => false,
    };
    let Some(first) = values.next() else { return true };
    let first = kind(first);
    values.all(|v| kind(v) == first)
}

#[cfg(test)]
mod tests {
    use datafusion::sql::parser::DFParser;

    use super::*;

    fn parse(sql: &str) -> DfStatement {
        DFParser::parse_sql(sql).expect("parses").pop_front().expect("one statement")
    }

    #[test]
    fn long_in_lists_and_too_many_parameters_are_refused_naming_the_limit() {
        let list: Vec<String> = (0..101).map(|i| i.to_string()).collect();
        let err =
            check_lists(&parse(&format!("SELECT 1 WHERE 1 IN ({})", list.join(","))), 100, 10).expect_err("long list");
        assert!(err.to_string().contains("101 elements, over limits.max_in_list (100)"), "{err}");
        check_lists(&parse(&format!("SELECT 1 WHERE 1 IN ({})", list[..100].join(","))), 100, 10)
            .expect("at the bound");
        let params: Vec<String> = (1..=11).map(|i| format!("${i}")).collect();
        let err = check_lists(&parse(&format!("SELECT {}", params.join(","))), 100, 10).expect_err("11 parameters");
        assert!(err.to_string().contains("limits.max_parameters (10)"), "{err}");
        // The same placeholder used twice is one parameter.
        check_lists(&parse(&format!("SELECT {}, $1", params[..10].join(","))), 100, 10).expect("10 parameters");
    }

    #[test]
    fn or_chains_of_equalities_become_in_lists() {
        let terms: Vec<String> = (1..=600).map(|i| format!("id = {i}")).collect();
        let mut statement = parse(&format!("SELECT * FROM t WHERE {}", terms.join(" OR ")));
        bound_statement(&mut statement, 64).expect("folded under the bound");
        let text = statement.to_string();
        assert!(text.contains("id IN (1, 2, 3"), "{text}");
        assert!(text.ends_with("599, 600)"), "{text}");
    }

    #[test]
    fn or_chains_that_are_not_one_key_against_literals_stay() {
        for sql in [
            "SELECT * FROM t WHERE a = 1 OR b = 2",
            "SELECT * FROM t WHERE a = 1 OR a = 'x'",
            "SELECT * FROM t WHERE a = b OR a = 2",
            "SELECT * FROM t WHERE a = 1 OR a > 2",
        ] {
            let mut statement = parse(sql);
            bound_statement(&mut statement, 64).expect("within the bound");
            assert!(!statement.to_string().contains(" IN ("), "{sql} -> {statement}");
        }
        let mut statement = parse("SELECT * FROM t WHERE (a = 1 OR a = 2) OR a IN (3, 4)");
        bound_statement(&mut statement, 64).expect("within the bound");
        assert!(statement.to_string().contains("a IN (1, 2, 3, 4)"), "{statement}");
    }

    #[test]
    fn deep_expressions_and_subqueries_are_refused_naming_the_limit() {
        let sum = vec!["1"; 1500].join("+");
        let err = bound_statement(&mut parse(&format!("SELECT {sum}")), 500).expect_err("too deep");
        assert!(err.to_string().contains("limits.max_expression_depth (500)"), "{err}");
        let mut nested = "SELECT 1".to_string();
        for _ in 0..20 {
            nested = format!("SELECT * FROM ({nested}) AS s");
        }
        assert!(bound_statement(&mut parse(&nested), 15).is_err());
        bound_statement(&mut parse(&format!("SELECT {}", vec!["1"; 400].join("+"))), 500).expect("400 deep is fine");
    }

    #[test]
    fn oversized_text_is_refused_naming_the_limit() {
        let err = check_size(&"x".repeat(11), 10).expect_err("too long");
        assert!(err.to_string().contains("limits.max_query_size (10 bytes)"), "{err}");
        check_size("SELECT 1", 10).expect("short");
    }
}
