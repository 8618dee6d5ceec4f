//! Row-level evaluation with Zero's semantics (protocol §7.1–§7.2): simple conditions with
//! parameters, LIKE / ILIKE with `\` escapes, and sort keys in Zero's ordering.
//!
//! The dataflow and the reference evaluator both use these functions, so a disagreement
//! between them in the oracle tests points at the incremental machinery, not at operator
//! semantics. The operator semantics themselves are pinned by the unit tests below.

use std::cmp::{Ordering, Reverse};
use std::collections::HashMap;

use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use zero_queries::ast::SimpleOp;
use zero_queries::eval::LikePattern;
use zero_queries::value::ValueKind;
use zero_queries::{Row, Value};

use crate::plan::{Param, Pred, PredArg};

/// Compiled LIKE patterns by `(pattern, fold)`, so a filter compiles each pattern once.
#[derive(Default)]
pub struct LikeCache(HashMap<(String, bool), Option<LikePattern>>);

impl LikeCache {
    fn matches(&mut self, pattern: &str, fold: bool, text: &str) -> bool {
        if self.0.len() > 1024 {
            self.0.clear();
        }
        self.0
            .entry((pattern.to_owned(), fold))
            // A trailing `\` (rejected by Zero) makes the condition false: a row filter cannot fail.
            .or_insert_with(|| LikePattern::new(pattern, fold).ok())
            .as_ref()
            .is_some_and(|l| l.matches(text))
    }
}

/// JavaScript `===` on wire values: scalars of one kind by value; arrays and objects never.
fn strict_eq(a: &Value, b: &Value) -> bool {
    a.kind() == b.kind() && a.kind() != ValueKind::Json && a == b
}

/// Evaluates `lhs op rhs` with Zero's rules: only `IS` / `IS NOT` see nulls as values; every
/// other operator is false when either side is null.
pub fn eval_op(op: SimpleOp, lhs: &Value, rhs: &Param, likes: &mut LikeCache) -> bool {
    let scalar = match rhs {
        Param::Value(v) => Some(v),
        _ => None,
    };
    match op {
        SimpleOp::Is | SimpleOp::IsNot => {
            let same = match scalar {
                Some(r) => (lhs.is_null() && r.is_null()) || strict_eq(lhs, r),
                None => false,
            };
            return same == (op == SimpleOp::Is);
        }
        _ => {}
    }
    if lhs.is_null() || scalar.is_some_and(Value::is_null) {
        return false;
    }
    let cmp = |want: &[Ordering]| {
        scalar
            .and_then(|r| lhs.compare_non_null(r))
            .is_some_and(|o| want.contains(&o))
    };
    let mut like = |fold: bool| match (scalar, lhs.as_str()) {
        (Some(p), Some(text)) => match p.as_str() {
            Some(s) => likes.matches(s, fold, text),
            None => likes.matches(&p.to_string(), fold, text),
        },
        _ => false,
    };
    let member = || match rhs {
        Param::List(items) => items.iter().any(|i| strict_eq(i, lhs)),
        _ => false,
    };
    match op {
        SimpleOp::Eq => scalar.is_some_and(|r| strict_eq(lhs, r)),
        SimpleOp::Ne => scalar.is_some_and(|r| !strict_eq(lhs, r)),
        SimpleOp::Lt => cmp(&[Ordering::Less]),
        SimpleOp::Le => cmp(&[Ordering::Less, Ordering::Equal]),
        SimpleOp::Gt => cmp(&[Ordering::Greater]),
        SimpleOp::Ge => cmp(&[Ordering::Greater, Ordering::Equal]),
        SimpleOp::Like => like(false),
        SimpleOp::ILike => like(true),
        SimpleOp::NotLike => lhs.as_str().is_some() && !like(false),
        SimpleOp::NotILike => lhs.as_str().is_some() && !like(true),
        SimpleOp::In => member(),
        SimpleOp::NotIn => matches!(rhs, Param::List(_)) && !member(),
        SimpleOp::Is | SimpleOp::IsNot => false,
    }
}

/// Evaluates a predicate without EXISTS on `row` with the instance's `params`.
///
/// # Panics
/// On an EXISTS node: the renderer splits those off into joins before filtering.
pub fn eval_pred(pred: &Pred, row: &Row, params: &[Param], likes: &mut LikeCache) -> bool {
    match pred {
        Pred::Const(b) => *b,
        Pred::And(v) => v.iter().all(|p| eval_pred(p, row, params, likes)),
        Pred::Or(v) => v.iter().any(|p| eval_pred(p, row, params, likes)),
        Pred::Cmp { left, op, right } => {
            let col;
            let lhs = match left {
                PredArg::Col(c) => {
                    col = row.get(*c);
                    &col
                }
                PredArg::Slot(s) => match &params[*s] {
                    Param::Value(v) => v,
                    // An array on the left equals nothing Zero compares it with.
                    _ => return matches!(op, SimpleOp::Ne | SimpleOp::IsNot | SimpleOp::NotIn),
                },
            };
            eval_op(*op, lhs, &params[*right], likes)
        }
        Pred::Exists { .. } => panic!("EXISTS must be rendered as a join, not evaluated on a row"),
    }
}

/// One column of a sort key: the value, reversed for descending columns.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum SortPart {
    /// Ascending column.
    Asc(Value),
    /// Descending column.
    Desc(Reverse<Value>),
}

/// A row's position in a completed ordering; `Ord` is Zero's order of rows. Sorted indexes
/// store one per row, so the usual ordering (one column, then a one-column primary key) is
/// kept inline.
pub type SortKey = SmallVec<[SortPart; 2]>;

/// The sort key of `row` under `order` (which already ends with the primary key).
pub fn sort_key(order: &[(usize, bool)], row: &Row) -> SortKey {
    order
        .iter()
        .map(|&(c, desc)| part(row.get(c), desc))
        .collect()
}

/// `sort_key(order, a).cmp(&sort_key(order, b))` without building the keys.
pub fn compare_rows(order: &[(usize, bool)], a: &Row, b: &Row) -> Ordering {
    for &(c, desc) in order {
        let o = a.cmp_cols(c, b, c);
        let o = if desc { o.reverse() } else { o };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

/// `key.cmp(&sort_key(order, row))` without building the row's key.
pub fn compare_key_row(key: &[SortPart], order: &[(usize, bool)], row: &Row) -> Ordering {
    for (part, &(c, _)) in key.iter().zip(order) {
        let o = match part {
            SortPart::Asc(v) => row.cmp_col(c, v).reverse(),
            SortPart::Desc(Reverse(v)) => row.cmp_col(c, v),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    key.len().cmp(&order.len())
}

fn part(v: Value, desc: bool) -> SortPart {
    if desc {
        SortPart::Desc(Reverse(v))
    } else {
        SortPart::Asc(v)
    }
}

/// The sort key of a `start` cursor and whether it is exclusive (`None` for other parameters),
/// so a walk over rows in ORDER BY order can seek straight to the cursor.
pub fn start_bound(order: &[(usize, bool)], start: &Param) -> Option<(SortKey, bool)> {
    let Param::Start { key, exclusive } = start else {
        return None;
    };
    let bound: SortKey = order
        .iter()
        .zip(key.iter())
        .map(|(&(_, desc), v)| part(v.clone(), desc))
        .collect();
    Some((bound, *exclusive))
}

/// Whether `row` is at or after (or strictly after, if exclusive) a `start` cursor.
pub fn after_start(order: &[(usize, bool)], row: &Row, start: &Param) -> bool {
    let Some((bound, exclusive)) = start_bound(order, start) else {
        return true;
    };
    let o = sort_key(order, row).cmp(&bound);
    if exclusive {
        o == Ordering::Greater
    } else {
        o != Ordering::Less
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn like(p: &str, t: &str) -> bool {
        LikePattern::new(p, false)
            .expect("valid pattern")
            .matches(t)
    }

    #[test]
    fn like_wildcards_and_escapes() {
        assert!(like("a%", "abc"));
        assert!(like("%c", "abc"));
        assert!(like("a_c", "abc"));
        assert!(!like("a_c", "ac"));
        assert!(like("%b%", "abc"));
        assert!(!like("b", "abc"), "anchored");
        assert!(like("100\\%", "100%"));
        assert!(!like("100\\%", "1000"));
        assert!(like("a\\_", "a_"));
        assert!(!like("a\\_", "ab"));
        assert!(like("a\\\\", "a\\"));
        assert!(like("%", ""));
        assert!(like("a%b", "a\nb"));
        assert!(LikePattern::new("abc\\", false).is_err());
        assert!(LikePattern::new("ÄB%", true).expect("valid").matches("äbx"));
        assert!(
            !LikePattern::new("AB%", false)
                .expect("valid")
                .matches("abx")
        );
    }

    #[test]
    fn null_and_kind_rules() {
        let mut c = LikeCache::default();
        let v = |x: f64| Param::Value(Value::Number(x));
        let n = Value::Null;
        assert!(!eval_op(
            SimpleOp::Eq,
            &n,
            &Param::Value(Value::Null),
            &mut c
        ));
        assert!(eval_op(
            SimpleOp::Is,
            &n,
            &Param::Value(Value::Null),
            &mut c
        ));
        assert!(!eval_op(
            SimpleOp::IsNot,
            &n,
            &Param::Value(Value::Null),
            &mut c
        ));
        assert!(eval_op(
            SimpleOp::IsNot,
            &Value::Number(1.0),
            &Param::Value(Value::Null),
            &mut c
        ));
        assert!(!eval_op(SimpleOp::Ne, &n, &v(1.0), &mut c));
        assert!(!eval_op(SimpleOp::Lt, &n, &v(1.0), &mut c));
        assert!(!eval_op(SimpleOp::NotIn, &n, &Param::List(vec![]), &mut c));
        assert!(eval_op(
            SimpleOp::NotIn,
            &Value::Number(2.0),
            &Param::List(vec![Value::Number(1.0)]),
            &mut c
        ));
        assert!(eval_op(
            SimpleOp::In,
            &Value::Number(1.0),
            &Param::List(vec![Value::Number(1.0)]),
            &mut c
        ));
        assert!(!eval_op(SimpleOp::Eq, &Value::from("1"), &v(1.0), &mut c));
        assert!(eval_op(SimpleOp::Ne, &Value::from("1"), &v(1.0), &mut c));
        assert!(!eval_op(SimpleOp::Lt, &Value::from("1"), &v(2.0), &mut c));
        assert!(eval_op(
            SimpleOp::Lt,
            &Value::Bool(false),
            &Param::Value(Value::Bool(true)),
            &mut c
        ));
        assert!(!eval_op(
            SimpleOp::NotLike,
            &Value::Number(1.0),
            &Param::Value(Value::from("%")),
            &mut c
        ));
        assert!(eval_op(
            SimpleOp::NotILike,
            &Value::from("ABC"),
            &Param::Value(Value::from("x%")),
            &mut c
        ));
    }

    #[test]
    fn sort_keys_and_start() {
        let order = [(1, true), (0, false)];
        let r = |id: f64, m: Option<f64>| Row::from(vec![Value::Number(id), Value::from(m)]);
        let mut rows = [
            r(1.0, Some(5.0)),
            r(2.0, None),
            r(3.0, Some(7.0)),
            r(0.0, Some(5.0)),
        ];
        rows.sort_by_key(|x| sort_key(&order, x));
        let ids: Vec<f64> = rows
            .iter()
            .map(|x| x.get(0).as_f64().expect("number"))
            .collect();
        assert_eq!(
            ids,
            vec![3.0, 0.0, 1.0, 2.0],
            "desc puts nulls last, pk breaks ties"
        );
        let start = Param::Start {
            key: vec![Value::Number(5.0), Value::Number(0.0)],
            exclusive: true,
        };
        assert!(!after_start(&order, &r(0.0, Some(5.0)), &start));
        assert!(after_start(&order, &r(1.0, Some(5.0)), &start));
        assert!(!after_start(&order, &r(3.0, Some(7.0)), &start));
        for a in &rows {
            for b in &rows {
                assert_eq!(
                    compare_rows(&order, a, b),
                    sort_key(&order, a).cmp(&sort_key(&order, b))
                );
                assert_eq!(
                    compare_key_row(&sort_key(&order, a), &order, b),
                    sort_key(&order, a).cmp(&sort_key(&order, b))
                );
            }
        }
        let incl = Param::Start {
            key: vec![Value::Number(5.0), Value::Number(0.0)],
            exclusive: false,
        };
        assert!(after_start(&order, &r(0.0, Some(5.0)), &incl));
    }
}
