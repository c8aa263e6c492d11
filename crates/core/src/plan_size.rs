//! What a logical plan weighs in memory, estimated from its expressions, for the caches
//! that keep plans (the plan cache, the results cache's keys): a plan's size follows its
//! text (an IN list of 100,000 keys, a literal of a megabyte), not a fixed per-entry figure.

use datafusion::common::ScalarValue;
use datafusion::common::tree_node::{TreeNode, TreeNodeRecursion};
use datafusion::logical_expr::{Expr, LogicalPlan};

/// Bytes charged per plan node and per expression: the node or `Expr` with its boxes,
/// names and schema fields.
const NODE_BYTES: usize = 512;
const EXPR_BYTES: usize = 256;

/// An estimate of the bytes `plan` (with its subqueries) holds: a fixed share per node and
/// expression, plus the bytes of its string and binary literals.
pub fn estimated_bytes(plan: &LogicalPlan) -> usize {
    let mut bytes = 0usize;
    let _ = plan.apply_with_subqueries(|node| {
        bytes = bytes.saturating_add(NODE_BYTES);
        node.apply_expressions(|expr| {
            expr.apply(|e| {
                bytes = bytes.saturating_add(EXPR_BYTES);
                if let Expr::Literal(value, _) = e {
                    bytes = bytes.saturating_add(literal_bytes(value));
                }
                Ok(TreeNodeRecursion::Continue)
            })
        })
    });
    bytes
}

fn literal_bytes(value: &ScalarValue) -> usize {
    match value {
        ScalarValue::Utf8(Some(s)) | ScalarValue::LargeUtf8(Some(s)) | ScalarValue::Utf8View(Some(s)) => s.len(),
        ScalarValue::Binary(Some(b)) | ScalarValue::LargeBinary(Some(b)) | ScalarValue::BinaryView(Some(b)) => b.len(),
        other => other.size(),
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::SessionContext;

    use super::*;

    #[tokio::test]
    async fn large_literals_and_long_in_lists_weigh_what_they_hold() {
        let ctx = SessionContext::new();
        let plan = |sql: String| {
            let ctx = ctx.clone();
            async move { ctx.sql(&sql).await.expect("plan").into_unoptimized_plan() }
        };
        let small = estimated_bytes(&plan("SELECT 1 WHERE 'a' <> 'b'".into()).await);
        let literal = estimated_bytes(&plan(format!("SELECT 1 WHERE '{}' <> 'b'", "x".repeat(1 << 20))).await);
        assert!(literal > small + (1 << 20) - 64, "{small} {literal}");
        let keys: Vec<String> = (0..10_000).map(|i| i.to_string()).collect();
        let list = estimated_bytes(&plan(format!("SELECT 1 WHERE 5 IN ({})", keys.join(","))).await);
        assert!(list >= 10_000 * EXPR_BYTES, "{list}");
    }
}
