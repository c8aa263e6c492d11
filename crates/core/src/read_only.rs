//! The query path is read-only: every tier refuses statements and plans that write, change
//! the catalog or the session, before anything runs. SQL is checked as parsed; a shipped plan
//! (which skips the parser) is checked node by node, subqueries included.

use datafusion::logical_expr::LogicalPlan;
use datafusion::sql::parser::Statement as DfStatement;
use datafusion::sql::sqlparser::ast::Statement as SqlStatement;

use crate::error::{Result, StrataError};

/// Refuses plans that write or change the catalog: shipped plans bypass the SQL check.
pub fn check_plan(plan: &LogicalPlan) -> Result<()> {
    use datafusion::common::tree_node::TreeNodeRecursion;
    let mut refused = None;
    plan.apply_with_subqueries(|node| {
        let kind = match node {
            LogicalPlan::Dml(_) => Some("DML"),
            LogicalPlan::Ddl(_) => Some("DDL"),
            LogicalPlan::Copy(_) => Some("COPY"),
            LogicalPlan::Statement(_) => Some("session statement"),
            _ => None,
        };
        if let Some(kind) = kind {
            refused = Some(kind);
            return Ok(TreeNodeRecursion::Stop);
        }
        Ok(TreeNodeRecursion::Continue)
    })?;
    match refused {
        Some(kind) => Err(StrataError::ReadOnly(kind.into())),
        None => Ok(()),
    }
}

/// Refuses statements other than queries (and `EXPLAIN` of a query), naming the statement.
pub fn check_statement(statement: &DfStatement) -> Result<()> {
    match statement {
        DfStatement::Statement(s) => match s.as_ref() {
            SqlStatement::Query(_) => Ok(()),
            SqlStatement::Explain { statement, .. } => match statement.as_ref() {
                SqlStatement::Query(_) => Ok(()),
                other => Err(StrataError::ReadOnly(statement_kind(other))),
            },
            other => Err(StrataError::ReadOnly(statement_kind(other))),
        },
        DfStatement::Explain(explain) => check_statement(&explain.statement),
        DfStatement::CreateExternalTable(_) => Err(StrataError::ReadOnly("CREATE EXTERNAL TABLE".into())),
        DfStatement::CopyTo(_) => Err(StrataError::ReadOnly("COPY".into())),
        DfStatement::Reset(_) => Err(StrataError::ReadOnly("RESET".into())),
    }
}

/// The leading keywords of a statement ("CREATE TABLE", "INSERT"), for error messages.
fn statement_kind(statement: &SqlStatement) -> String {
    let text = statement.to_string();
    let words: Vec<&str> = text.split_whitespace().take(2).collect();
    match words.as_slice() {
        [first, second] if matches!(first.to_ascii_uppercase().as_str(), "CREATE" | "DROP" | "ALTER" | "TRUNCATE") => {
            format!("{} {}", first.to_ascii_uppercase(), second.to_ascii_uppercase())
        }
        [first, ..] => first.to_ascii_uppercase(),
        [] => "empty".into(),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::sql::parser::DFParser;

    use super::*;

    fn check(sql: &str) -> Result<()> {
        let mut statements = DFParser::parse_sql(sql).expect("parses");
        check_statement(&statements.pop_front().expect("one statement"))
    }

    #[test]
    fn queries_pass_and_writes_are_refused_by_name() {
        assert!(check("SELECT 1").is_ok());
        assert!(check("EXPLAIN SELECT * FROM t").is_ok());
        let refused = |sql: &str| check(sql).expect_err(sql).to_string();
        assert!(refused("INSERT INTO t VALUES (1)").contains("INSERT"));
        assert!(refused("create table x (a int)").contains("CREATE TABLE"));
        assert!(refused("EXPLAIN DELETE FROM t").contains("DELETE"));
        assert!(refused("COPY t TO 'x.csv'").contains("COPY"));
        assert!(refused("SET datafusion.execution.batch_size = 1").contains("SET"));
    }
}
