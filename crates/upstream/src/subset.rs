//! Subset implication: whether the rows a query needs (its scan's pushed-down filters) all
//! lie inside a replica's subset (its `predicate`). Conservative by construction: anything it
//! cannot prove is "no", and the query goes upstream, so a wrong answer here can only cost a
//! round trip, never return too few rows.

use std::cmp::Ordering;

use datafusion::common::ScalarValue;
use datafusion::logical_expr::utils::split_conjunction;
use datafusion::logical_expr::{BinaryExpr, Expr, Operator};

/// True when every conjunct of `predicate` is implied by some conjunct of `filters`.
pub fn covers(predicate: &Expr, filters: &[Expr]) -> bool {
    let mut known = Vec::new();
    for f in filters {
        known.extend(split_conjunction(f).into_iter().map(normalize));
    }
    split_conjunction(predicate).into_iter().map(normalize).all(|needed| known.iter().any(|k| implies(k, &needed)))
}

/// Puts `literal op column` as `column op' literal` and drops column qualifiers and casts
/// of literals, so equal conditions compare equal.
fn normalize(expr: &Expr) -> Expr {
    let strip = |e: &Expr| -> Expr {
        match e {
            Expr::Column(c) => Expr::Column(datafusion::common::Column::new_unqualified(c.name.clone())),
            Expr::Cast(cast) if matches!(cast.expr.as_ref(), Expr::Literal(..)) => (*cast.expr).clone(),
            other => other.clone(),
        }
    };
    match expr {
        Expr::BinaryExpr(BinaryExpr { left, op, right }) => {
            let (l, r) = (strip(left), strip(right));
            match (&l, &r, op.swap()) {
                (Expr::Literal(..), Expr::Column(_), Some(swapped)) => {
                    Expr::BinaryExpr(BinaryExpr::new(Box::new(r), swapped, Box::new(l)))
                }
                _ => Expr::BinaryExpr(BinaryExpr::new(Box::new(l), *op, Box::new(r))),
            }
        }
        Expr::InList(list) => {
            let mut list = list.clone();
            list.expr = Box::new(strip(&list.expr));
            list.list = list.list.iter().map(strip).collect();
            Expr::InList(list)
        }
        other => strip(other),
    }
}

/// Compares two literals, casting the second to the first's type (`'eu'` as Utf8View and Utf8).
fn cmp_literals(a: &ScalarValue, b: &ScalarValue) -> Option<Ordering> {
    if a.is_null() || b.is_null() {
        return None;
    }
    if a.data_type() == b.data_type() {
        return a.partial_cmp(b);
    }
    let text = |v: &ScalarValue| match v {
        ScalarValue::Utf8(Some(s)) | ScalarValue::Utf8View(Some(s)) | ScalarValue::LargeUtf8(Some(s)) => {
            Some(s.clone())
        }
        _ => None,
    };
    if let (Some(x), Some(y)) = (text(a), text(b)) {
        return x.partial_cmp(&y);
    }
    b.cast_to(&a.data_type()).ok().and_then(|b| a.partial_cmp(&b))
}

/// A column compared with a literal.
fn comparison(expr: &Expr) -> Option<(&str, Operator, &ScalarValue)> {
    if let Expr::BinaryExpr(BinaryExpr { left, op, right }) = expr
        && let (Expr::Column(c), Expr::Literal(v, _)) = (left.as_ref(), right.as_ref())
    {
        return Some((c.name.as_str(), *op, v));
    }
    None
}

/// Whether `value op bound` holds.
fn holds(value: &ScalarValue, op: Operator, bound: &ScalarValue) -> bool {
    let Some(ord) = cmp_literals(bound, value).map(Ordering::reverse) else { return false };
    match op {
        Operator::Eq => ord == Ordering::Equal,
        Operator::NotEq => ord != Ordering::Equal,
        Operator::Lt => ord == Ordering::Less,
        Operator::LtEq => ord != Ordering::Greater,
        Operator::Gt => ord == Ordering::Greater,
        Operator::GtEq => ord != Ordering::Less,
        _ => false,
    }
}

/// Whether condition `known` (true of every row the query needs) implies `needed`.
fn implies(known: &Expr, needed: &Expr) -> bool {
    if known == needed {
        return true;
    }
    // The values `known` allows for one column, when it pins them down to a finite list.
    let allowed: Option<(&str, Vec<&ScalarValue>)> = match known {
        Expr::InList(list) if !list.negated => {
            match (list.expr.as_ref(), list.list.iter().all(|e| matches!(e, Expr::Literal(..)))) {
                (Expr::Column(c), true) => Some((
                    c.name.as_str(),
                    list.list.iter().filter_map(|e| if let Expr::Literal(v, _) = e { Some(v) } else { None }).collect(),
                )),
                _ => None,
            }
        }
        _ => match comparison(known) {
            Some((c, Operator::Eq, v)) => Some((c, vec![v])),
            _ => None,
        },
    };
    if let Some((column, values)) = &allowed {
        return match needed {
            Expr::InList(list) if !list.negated => {
                matches!(list.expr.as_ref(), Expr::Column(c) if c.name == *column)
                    && values.iter().all(|v| {
                        list.list
                            .iter()
                            .any(|e| matches!(e, Expr::Literal(l, _) if cmp_literals(l, v) == Some(Ordering::Equal)))
                    })
            }
            _ => match comparison(needed) {
                Some((c, op, bound)) if c == *column => values.iter().all(|v| holds(v, op, bound)),
                _ => false,
            },
        };
    }
    // Ranges: `c > 10` implies `c > 5` and `c >= 10`.
    match (comparison(known), comparison(needed)) {
        (Some((kc, kop, kv)), Some((nc, nop, nv))) if kc == nc => {
            let Some(ord) = cmp_literals(nv, kv) else { return false };
            // ord compares the needed bound with the known bound.
            match (kop, nop) {
                (Operator::Gt, Operator::Gt | Operator::GtEq) => ord != Ordering::Greater,
                (Operator::GtEq, Operator::GtEq) => ord != Ordering::Greater,
                (Operator::GtEq, Operator::Gt) => ord == Ordering::Less,
                (Operator::Lt, Operator::Lt | Operator::LtEq) => ord != Ordering::Less,
                (Operator::LtEq, Operator::LtEq) => ord != Ordering::Less,
                (Operator::LtEq, Operator::Lt) => ord == Ordering::Greater,
                _ => false,
            }
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use datafusion::prelude::{col, lit};

    use super::*;

    #[test]
    fn equality_subset_is_covered_only_by_the_same_value() {
        let subset = col("region").eq(lit("eu"));
        let covers = |filters: &[Expr]| covers(&subset, filters);
        assert!(covers(&[col("region").eq(lit("eu"))]));
        assert!(covers(&[lit("eu").eq(col("orders.region")), col("amount").gt(lit(3))]));
        assert!(covers(&[col("region").eq(lit(ScalarValue::Utf8View(Some("eu".into()))))]));
        assert!(!covers(&[col("region").eq(lit("us"))]));
        assert!(!covers(&[]), "no filter: the query may need every region");
        assert!(!covers(&[col("region").not_eq(lit("us"))]));
        assert!(!covers(&[col("region").in_list(vec![lit("eu"), lit("us")], false)]));
        assert!(!covers(&[col("region").eq(lit(ScalarValue::Utf8(None)))]), "NULL proves nothing");
    }

    #[test]
    fn in_list_subset_and_ranges() {
        let subset = col("region").in_list(vec![lit("eu"), lit("uk")], false);
        assert!(covers(&subset, &[col("region").eq(lit("uk"))]));
        assert!(covers(&subset, &[col("region").in_list(vec![lit("eu"), lit("uk")], false)]));
        assert!(!covers(&subset, &[col("region").in_list(vec![lit("eu"), lit("us")], false)]));
        assert!(!covers(&subset, &[col("region").in_list(vec![lit("eu")], true)]), "NOT IN pins nothing down");

        let subset = col("amount").gt_eq(lit(100i64));
        assert!(covers(&subset, &[col("amount").gt(lit(150i64))]));
        assert!(covers(&subset, &[col("amount").gt_eq(lit(100i64))]));
        assert!(covers(&subset, &[col("amount").eq(lit(100i64))]));
        assert!(covers(&subset, &[col("amount").gt(lit(50i64)), col("amount").gt(lit(120i64))]));
        assert!(!covers(&subset, &[col("amount").gt(lit(50i64))]));
        assert!(!covers(&subset, &[col("amount").lt(lit(150i64))]));
        assert!(!covers(&subset, &[col("other").gt(lit(150i64))]), "another column says nothing");
    }

    #[test]
    fn every_conjunct_of_the_subset_must_be_implied() {
        let subset = col("region").eq(lit("eu")).and(col("amount").lt(lit(10i64)));
        assert!(covers(&subset, &[col("region").eq(lit("eu")).and(col("amount").lt(lit(5i64)))]));
        assert!(!covers(&subset, &[col("region").eq(lit("eu"))]));
    }
}
