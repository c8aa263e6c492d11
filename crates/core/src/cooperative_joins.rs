//! Joins that yield. A task is stopped (a query cancelled, past its deadline, or a
//! distributed task whose coordinator went away) only when its future returns `Pending`.
//! DataFusion's operators return it when a cooperative leaf (a scan, an exchange) has used
//! up tokio's budget, so an operator that reads its input batch by batch stops between
//! batches. A join does not read between its output batches: one probe batch whose keys
//! match many build rows yields millions of rows from the join's own state, and the
//! aggregate above it pulls them all in one poll. Measured on a distributed fan-out join
//! (the deadline test of `integration-tests/tests/distributed.rs`): the replicas kept both
//! cores busy for 1.5 to 2.5 s after the query had been answered with its timeout.
//!
//! [`CooperativeJoins`] wraps every join's output in DataFusion's [`CooperativeExec`], so
//! each batch a join emits counts against the budget and a long fan-out yields too.

use std::sync::Arc;

use datafusion::common::config::ConfigOptions;
use datafusion::common::tree_node::{Transformed, TreeNode};
use datafusion::error::Result;
use datafusion::physical_optimizer::PhysicalOptimizerRule;
use datafusion::physical_plan::ExecutionPlan;
use datafusion::physical_plan::coop::CooperativeExec;
use datafusion::physical_plan::execution_plan::{ChildrenPropertiesMode, ReplaceChildrenOptions};
use datafusion::physical_plan::joins::{
    CrossJoinExec, HashJoinExec, NestedLoopJoinExec, SortMergeJoinExec, SymmetricHashJoinExec,
};

/// The physical optimizer rule; see the module's doc.
#[derive(Debug, Default)]
pub struct CooperativeJoins;

impl PhysicalOptimizerRule for CooperativeJoins {
    fn name(&self) -> &str {
        "CooperativeJoins"
    }

    fn optimize(&self, plan: Arc<dyn ExecutionPlan>, _config: &ConfigOptions) -> Result<Arc<dyn ExecutionPlan>> {
        let wrapped = plan.transform_up(|node| {
            let no_join_below = node.children().iter().all(|child| !is_join(child.as_ref()));
            if no_join_below || node.is::<CooperativeExec>() {
                return Ok(Transformed::no(node));
            }
            let children = node
                .children()
                .into_iter()
                .map(|child| match is_join(child.as_ref()) {
                    true => Arc::new(CooperativeExec::new(Arc::clone(child))) as Arc<dyn ExecutionPlan>,
                    false => Arc::clone(child),
                })
                .collect();
            // A CooperativeExec has its input's partitioning, ordering and boundedness.
            let keep = ReplaceChildrenOptions::new(ChildrenPropertiesMode::Keep);
            Ok(Transformed::yes(node.replace_children(children, keep)?))
        })?;
        Ok(match is_join(wrapped.data.as_ref()) {
            true => Arc::new(CooperativeExec::new(wrapped.data)),
            false => wrapped.data,
        })
    }

    fn schema_check(&self) -> bool {
        true
    }
}

fn is_join(plan: &dyn ExecutionPlan) -> bool {
    plan.is::<HashJoinExec>()
        || plan.is::<NestedLoopJoinExec>()
        || plan.is::<CrossJoinExec>()
        || plan.is::<SortMergeJoinExec>()
        || plan.is::<SymmetricHashJoinExec>()
}

#[cfg(test)]
mod tests {
    use super::*;
    use datafusion::execution::SessionStateBuilder;
    use datafusion::prelude::SessionContext;

    #[tokio::test]
    async fn every_join_is_wrapped_once_and_answers_are_unchanged() {
        let plain = SessionContext::new();
        let state = SessionStateBuilder::new()
            .with_default_features()
            .with_physical_optimizer_rule(Arc::new(CooperativeJoins))
            .build();
        let wrapped = SessionContext::new_with_state(state);
        let sql = "SELECT a.x, count(*) AS n FROM (VALUES (1), (2), (2)) a(x) JOIN (VALUES (2), (2), (3)) b(y) ON a.x = b.y \
                   CROSS JOIN (VALUES (7)) c(z) GROUP BY a.x ORDER BY a.x";
        for ctx in [&plain, &wrapped] {
            let rows = ctx.sql(sql).await.expect("plan").collect().await.expect("run");
            let text = arrow::util::pretty::pretty_format_batches(&rows).expect("format").to_string();
            assert!(text.contains("| 2 | 4 |"), "{text}");
        }
        let plan = wrapped.sql(sql).await.expect("plan").create_physical_plan().await.expect("physical");
        let text = datafusion::physical_plan::displayable(plan.as_ref()).indent(false).to_string();
        let lines: Vec<&str> = text.lines().map(str::trim).collect();
        let joins: Vec<usize> =
            (0..lines.len()).filter(|&i| lines[i].contains("JoinExec") || lines[i].starts_with("CrossJoin")).collect();
        assert_eq!(joins.len(), 2, "{text}");
        for i in joins {
            assert!(lines[i - 1].starts_with("CooperativeExec"), "no CooperativeExec above `{}`:\n{text}", lines[i]);
        }
        assert_eq!(text.matches("CooperativeExec").count() - plain_coops(&plain, sql).await, 2, "{text}");
    }

    async fn plain_coops(ctx: &SessionContext, sql: &str) -> usize {
        let plan = ctx.sql(sql).await.expect("plan").create_physical_plan().await.expect("physical");
        datafusion::physical_plan::displayable(plan.as_ref())
            .indent(false)
            .to_string()
            .matches("CooperativeExec")
            .count()
    }
}
