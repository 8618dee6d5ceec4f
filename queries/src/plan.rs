//! The plan IR the dataflow engine renders, with the template/parameter split of
//! dataflow-design §5.2.
//!
//! [`plan_query`] normalizes a bound AST, completes its orderings, and replaces every literal
//! (right and left sides of simple conditions), every `limit` value and every `start` value
//! with a parameter slot. The result is a [`Template`] (the query *shape*: one dataflow per
//! shape) and a [`Params`] row (one per client query). Two queries that differ only in
//! literals, limits or cursor values get the same `shape_hash` and different params; the
//! instance id is [`instance_id`]`(shape_hash, params)`.
//!
//! Each query node is a [`PlanNode`] whose fields follow Zero's operator order (protocol §7.1):
//! scan (optionally an index [`Lookup`] on a driving equality) → `start` ([`StartPlan`], Zero's
//! Skip) → semi-joins for top-level EXISTS / NOT EXISTS ([`SemiJoin`]) → `filter` (EXISTS-free
//! conjuncts) and `residual` (conjuncts with EXISTS under OR/NOT) → top-k by `order` with
//! `limit` (per parent in a related node) → `related` children. Columns are resolved to row
//! indexes, so predicates run directly on [`crate::Row`]s.

use std::cmp::{Ordering, Reverse};

use serde::{Deserialize, Serialize};
use thiserror::Error;

use crate::ast::{
    Ast, Condition, CorrelatedSubquery, Direction, ExistsOp, LiteralValue, Operand, SimpleOp,
    System, ValuePosition,
};
use crate::eval::{LikePatternError, eval_op};
use crate::hash::{h64_base36, js_stringify};
use crate::normalize::{NormalizeError, normalize};
use crate::row::Cols;
use crate::schema::{Schema, TableSchema};
use crate::validate::{ValidationError, complete_ordering, validate};
use crate::value::Value;

/// Why a query could not be planned.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum PlanError {
    /// The AST does not fit the schema (static parameters must be bound first).
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// Normalization failed.
    #[error(transparent)]
    Normalize(#[from] NormalizeError),
    /// A LIKE pattern literal is malformed.
    #[error(transparent)]
    Like(#[from] LikePatternError),
}

/// One parameter value.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Param {
    /// A scalar literal, a limit (as a number) or a cursor value.
    Value(Value),
    /// The array of an `IN` / `NOT IN`.
    List(Vec<Value>),
}

impl Param {
    fn to_literal(&self) -> LiteralValue {
        match self {
            Param::Value(v) => LiteralValue::Scalar(v.clone()),
            Param::List(items) => LiteralValue::Array(items.clone()),
        }
    }

    /// The scalar value (`Null` for a list).
    pub fn value(&self) -> &Value {
        match self {
            Param::Value(v) => v,
            Param::List(_) => &Value::Null,
        }
    }
}

/// The parameter row of one query instance, indexed by [`Slot`].
pub type Params = Vec<Param>;

/// Index of a parameter in [`Params`].
pub type Slot = usize;

/// The shape of a query: everything but its literals.
#[derive(Debug, Clone, PartialEq)]
pub struct Template {
    /// Hash of the shape; equal for queries that differ only in parameters.
    pub shape_hash: String,
    /// The shape as JSON (normalized AST with `"$<slot>"` in place of every parameter), for
    /// logs and debugging.
    pub shape_json: String,
    /// Number of parameter slots.
    pub param_count: usize,
    /// The root query node.
    pub root: PlanNode,
}

/// One query node (the root, a related child, or an EXISTS child).
#[derive(Debug, Clone, PartialEq)]
pub struct PlanNode {
    /// Table scanned.
    pub table: String,
    /// Subquery alias (`None` at the root).
    pub alias: Option<String>,
    /// A top-level `col = $slot` or `col IN $slot` conjunct the scan can use as an index
    /// lookup. It is also part of `filter`, so ignoring it is correct.
    pub lookup: Option<Lookup>,
    /// Cursor: output starts at this bound in `order` (Zero's Skip).
    pub start: Option<StartPlan>,
    /// Top-level EXISTS / NOT EXISTS conjuncts, as (anti-)semi-joins.
    pub semijoins: Vec<SemiJoin>,
    /// Conjunction of the EXISTS-free top-level conjuncts (`None` = true).
    pub filter: Option<Predicate>,
    /// Conjunction of the other conjuncts (EXISTS under OR / NOT); `None` = true.
    pub residual: Option<Predicate>,
    /// Completed ordering (primary key appended).
    pub order: Vec<SortColumn>,
    /// Top-k size (per parent in a related node).
    pub limit: Option<Slot>,
    /// Child relationships, deduplicated by alias (last wins) as Zero does.
    pub related: Vec<RelatedPlan>,
}

/// A driving equality usable as an index lookup.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    /// Row index of the column.
    pub column: usize,
    /// Parameter holding the value (or the list for `IN`).
    pub slot: Slot,
    /// `true` for `IN` (one lookup per list element).
    pub is_in: bool,
}

/// One column of an ordering.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SortColumn {
    /// Row index.
    pub column: usize,
    /// Column name.
    pub name: String,
    /// Direction.
    pub direction: Direction,
}

/// A cursor bound: one slot per ordering column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StartPlan {
    /// Bound value of each `order` column (missing columns bind to null).
    pub slots: Vec<Slot>,
    /// Rows strictly after the bound (`true`) or from it (`false`).
    pub exclusive: bool,
}

/// A correlated child query.
#[derive(Debug, Clone, PartialEq)]
pub struct Correlated {
    /// `(parent column index, child column index)` pairs; a null on either side never matches.
    pub keys: Vec<(usize, usize)>,
    /// The child query.
    pub child: Box<PlanNode>,
    /// `permissions` children are evaluated but never synced.
    pub system: Option<System>,
}

/// A top-level EXISTS / NOT EXISTS.
#[derive(Debug, Clone, PartialEq)]
pub struct SemiJoin {
    /// The child and the join keys.
    pub correlated: Correlated,
    /// `NOT EXISTS`.
    pub negated: bool,
    /// Child-first evaluation requested (Zero's FlippedJoin).
    pub flip: Option<bool>,
    /// One-row lookup hint.
    pub scalar: Option<bool>,
}

/// A `related` child.
#[derive(Debug, Clone, PartialEq)]
pub struct RelatedPlan {
    /// Relationship alias.
    pub alias: String,
    /// Junction hop hidden from the client view (its rows are still synced).
    pub hidden: bool,
    /// The child and the join keys.
    pub correlated: Correlated,
}

/// A row predicate over row indexes and parameter slots.
#[derive(Debug, Clone, PartialEq)]
pub enum Predicate {
    /// All hold.
    And(Vec<Predicate>),
    /// One holds.
    Or(Vec<Predicate>),
    /// `left op $right`.
    Compare {
        /// Left operand.
        left: PredOperand,
        /// Operator.
        op: SimpleOp,
        /// Parameter on the right.
        right: Slot,
    },
    /// `[NOT] EXISTS` nested under OR / NOT.
    Exists(Box<SemiJoin>),
}

/// Left operand of a comparison.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PredOperand {
    /// A column of the row.
    Column(usize),
    /// A parameter.
    Param(Slot),
}

impl Predicate {
    /// Evaluates the predicate on `row`; EXISTS nodes are answered by `exists(semi_join, row)`.
    pub fn eval_with<R: Cols + ?Sized>(
        &self,
        row: &R,
        params: &[Param],
        exists: &mut dyn FnMut(&SemiJoin, &R) -> bool,
    ) -> Result<bool, LikePatternError> {
        Ok(match self {
            Predicate::And(items) => {
                for p in items {
                    if !p.eval_with(row, params, exists)? {
                        return Ok(false);
                    }
                }
                true
            }
            Predicate::Or(items) => {
                for p in items {
                    if p.eval_with(row, params, exists)? {
                        return Ok(true);
                    }
                }
                false
            }
            Predicate::Compare { left, op, right } => {
                let lhs = match left {
                    PredOperand::Column(i) => col_or_null(row, *i),
                    PredOperand::Param(s) => param(params, *s).value().clone(),
                };
                eval_op(*op, &lhs, &param(params, *right).to_literal())?
            }
            Predicate::Exists(sj) => {
                let found = exists(sj, row);
                found != sj.negated
            }
        })
    }

    /// Evaluates an EXISTS-free predicate (EXISTS nodes count as false).
    pub fn eval<R: Cols + ?Sized>(
        &self,
        row: &R,
        params: &[Param],
    ) -> Result<bool, LikePatternError> {
        self.eval_with(row, params, &mut |_, _| false)
    }
}

fn col_or_null<R: Cols + ?Sized>(row: &R, i: usize) -> Value {
    if i < row.col_count() {
        row.col(i).into_owned()
    } else {
        Value::Null
    }
}

fn param(params: &[Param], slot: Slot) -> &Param {
    const NULL: Param = Param::Value(Value::Null);
    params.get(slot).unwrap_or(&NULL)
}

/// One component of a sort key; a column's direction is fixed, so `Asc` never meets `Desc`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SortPart {
    /// Ascending column value.
    Asc(Value),
    /// Descending column value.
    Desc(Reverse<Value>),
}

/// A row's position in an ordering: compare keys with `Ord`.
pub type SortKey = Vec<SortPart>;

impl PlanNode {
    /// The sort key of `row` under this node's completed ordering.
    pub fn sort_key<R: Cols + ?Sized>(&self, row: &R) -> SortKey {
        self.order
            .iter()
            .map(|c| {
                let v = col_or_null(row, c.column);
                match c.direction {
                    Direction::Asc => SortPart::Asc(v),
                    Direction::Desc => SortPart::Desc(Reverse(v)),
                }
            })
            .collect()
    }

    /// The start bound as a sort key, if the node has one.
    pub fn start_key(&self, params: &[Param]) -> Option<SortKey> {
        let start = self.start.as_ref()?;
        Some(
            self.order
                .iter()
                .zip(&start.slots)
                .map(|(c, s)| {
                    let v = param(params, *s).value().clone();
                    match c.direction {
                        Direction::Asc => SortPart::Asc(v),
                        Direction::Desc => SortPart::Desc(Reverse(v)),
                    }
                })
                .collect(),
        )
    }

    /// Whether `row` is at or past the start bound (always true without `start`).
    pub fn after_start<R: Cols + ?Sized>(&self, row: &R, params: &[Param]) -> bool {
        match (&self.start, self.start_key(params)) {
            (Some(s), Some(bound)) => match self.sort_key(row).cmp(&bound) {
                Ordering::Greater => true,
                Ordering::Equal => !s.exclusive,
                Ordering::Less => false,
            },
            _ => true,
        }
    }

    /// The limit value (`None` when the node has no limit).
    pub fn limit_value(&self, params: &[Param]) -> Option<u64> {
        let slot = self.limit?;
        // Limits are non-negative integers (the AST type guarantees it).
        param(params, slot).value().as_f64().map(|n| n as u64)
    }
}

/// Plans a bound AST: returns its template and its parameter row.
pub fn plan_query(ast: &Ast, schema: &Schema) -> Result<(Template, Params), PlanError> {
    validate(ast, schema)?;
    let normalized = normalize(&complete_ordering(ast, schema)?)?;
    let mut p = Planner {
        schema,
        params: Vec::new(),
    };
    let mut shape = normalized.clone();
    let root = p.node(&normalized, &mut shape)?;
    let shape_json = js_stringify(
        &serde_json::to_value(&shape).map_err(|e| NormalizeError::Json(e.to_string()))?,
    );
    Ok((
        Template {
            shape_hash: h64_base36(&shape_json),
            shape_json,
            param_count: p.params.len(),
            root,
        },
        p.params,
    ))
}

/// The id of a query instance: `h64(shape_hash + ":" + JSON(params))` in base 36.
pub fn instance_id(shape_hash: &str, params: &[Param]) -> String {
    let json: Vec<serde_json::Value> = params
        .iter()
        .map(|p| match p {
            Param::Value(v) => v.to_json(),
            Param::List(items) => {
                serde_json::Value::Array(items.iter().map(Value::to_json).collect())
            }
        })
        .collect();
    h64_base36(&format!(
        "{shape_hash}:{}",
        js_stringify(&serde_json::Value::Array(json))
    ))
}

struct Planner<'a> {
    schema: &'a Schema,
    params: Vec<Param>,
}

fn slot_marker(slot: Slot) -> Value {
    Value::String(format!("${slot}").into())
}

impl<'a> Planner<'a> {
    fn push(&mut self, p: Param) -> Slot {
        self.params.push(p);
        self.params.len() - 1
    }

    fn table(&self, ast: &Ast) -> Result<&'a TableSchema, PlanError> {
        let schema: &'a Schema = self.schema;
        schema.table(&ast.table).ok_or_else(|| {
            PlanError::Invalid(ValidationError {
                path: ast.table.clone(),
                kind: crate::validate::ValidationErrorKind::UnknownTable(ast.table.clone()),
            })
        })
    }

    /// Plans `ast`, writing slot markers into `shape` (a copy of `ast`) as it goes.
    fn node(&mut self, ast: &Ast, shape: &mut Ast) -> Result<PlanNode, PlanError> {
        let t = self.table(ast)?;
        let col = |name: &str| t.column_index(name).unwrap_or(usize::MAX);
        let order: Vec<SortColumn> = ast
            .order_by()
            .iter()
            .map(|p| SortColumn {
                column: col(&p.0),
                name: p.0.clone(),
                direction: p.1,
            })
            .collect();

        // Conjuncts of the where, split by kind.
        let mut filter = Vec::new();
        let mut residual = Vec::new();
        let mut semijoins = Vec::new();
        let mut lookup = None;
        if let (Some(w), Some(sw)) = (&ast.where_, &mut shape.where_) {
            let pairs: Vec<(&Condition, &mut Condition)> = match (w, sw) {
                (Condition::And { conditions }, Condition::And { conditions: sc }) => {
                    conditions.iter().zip(sc.iter_mut()).collect()
                }
                (w, sw) => vec![(w, sw)],
            };
            for (c, sc) in pairs {
                match (c, sc) {
                    (Condition::CorrelatedSubquery(csq), Condition::CorrelatedSubquery(scsq)) => {
                        semijoins.push(self.semijoin(t, csq, scsq)?);
                    }
                    (c, sc) if !c.has_subquery() => {
                        let pred = self.predicate(t, c, sc)?;
                        if lookup.is_none()
                            && let Predicate::Compare {
                                left: PredOperand::Column(column),
                                op: op @ (SimpleOp::Eq | SimpleOp::In),
                                right,
                            } = &pred
                        {
                            lookup = Some(Lookup {
                                column: *column,
                                slot: *right,
                                is_in: *op == SimpleOp::In,
                            });
                        }
                        filter.push(pred);
                    }
                    (c, sc) => residual.push(self.predicate(t, c, sc)?),
                }
            }
        }

        let start = match (&ast.start, &mut shape.start) {
            (Some(start), Some(sstart)) => {
                let mut slots = Vec::new();
                for c in &order {
                    let v = start.row.get(&c.name).cloned().unwrap_or(Value::Null);
                    slots.push(self.push(Param::Value(v)));
                }
                for (i, (_, v)) in sstart.row.0.iter_mut().enumerate() {
                    *v = Value::String(format!("$start{i}").into());
                }
                Some(StartPlan {
                    slots,
                    exclusive: start.exclusive,
                })
            }
            _ => None,
        };
        let limit = match ast.limit {
            Some(n) => {
                let slot = self.push(Param::Value(Value::from(n as f64)));
                // The shape keeps only the presence of a limit.
                shape.limit = Some(0);
                Some(slot)
            }
            None => None,
        };

        // Zero deduplicates related entries by alias: the last one wins.
        let mut related = Vec::new();
        if let (Some(rel), Some(srel)) = (&ast.related, &mut shape.related) {
            for (i, (r, sr)) in rel.iter().zip(srel.iter_mut()).enumerate() {
                let overridden = rel[i + 1..]
                    .iter()
                    .any(|later| later.subquery.alias == r.subquery.alias);
                let correlated = self.correlated(t, r, sr)?;
                if !overridden {
                    related.push(RelatedPlan {
                        alias: r.subquery.alias.clone().unwrap_or_default(),
                        hidden: r.hidden == Some(true),
                        correlated,
                    });
                }
            }
        }

        let and = |mut v: Vec<Predicate>| match v.len() {
            0 => None,
            1 => v.pop(),
            _ => Some(Predicate::And(v)),
        };
        Ok(PlanNode {
            table: ast.table.clone(),
            alias: ast.alias.clone(),
            lookup,
            start,
            semijoins,
            filter: and(filter),
            residual: and(residual),
            order,
            limit,
            related,
        })
    }

    fn correlated(
        &mut self,
        parent: &TableSchema,
        r: &CorrelatedSubquery,
        sr: &mut CorrelatedSubquery,
    ) -> Result<Correlated, PlanError> {
        let child_table = self.table(&r.subquery)?;
        let keys = r
            .correlation
            .parent_field
            .iter()
            .zip(&r.correlation.child_field)
            .map(|(p, c)| {
                (
                    parent.column_index(p).unwrap_or(usize::MAX),
                    child_table.column_index(c).unwrap_or(usize::MAX),
                )
            })
            .collect();
        let child = self.node(&r.subquery, &mut sr.subquery)?;
        Ok(Correlated {
            keys,
            child: Box::new(child),
            system: r.system,
        })
    }

    fn semijoin(
        &mut self,
        t: &TableSchema,
        c: &crate::ast::CorrelatedSubqueryCondition,
        sc: &mut crate::ast::CorrelatedSubqueryCondition,
    ) -> Result<SemiJoin, PlanError> {
        Ok(SemiJoin {
            correlated: self.correlated(t, &c.related, &mut sc.related)?,
            negated: c.op == ExistsOp::NotExists,
            flip: c.flip,
            scalar: c.scalar,
        })
    }

    fn predicate(
        &mut self,
        t: &TableSchema,
        c: &Condition,
        sc: &mut Condition,
    ) -> Result<Predicate, PlanError> {
        Ok(match (c, sc) {
            (Condition::And { conditions }, Condition::And { conditions: sc })
            | (Condition::Or { conditions }, Condition::Or { conditions: sc }) => {
                let items = conditions
                    .iter()
                    .zip(sc.iter_mut())
                    .map(|(c, sc)| self.predicate(t, c, sc))
                    .collect::<Result<Vec<_>, _>>()?;
                if matches!(c, Condition::And { .. }) {
                    Predicate::And(items)
                } else {
                    Predicate::Or(items)
                }
            }
            (Condition::CorrelatedSubquery(csq), Condition::CorrelatedSubquery(scsq)) => {
                Predicate::Exists(Box::new(self.semijoin(t, csq, scsq)?))
            }
            (Condition::Simple(s), Condition::Simple(ss)) => {
                let left = match &s.left {
                    ValuePosition::Column { name } => {
                        PredOperand::Column(t.column_index(name).unwrap_or(usize::MAX))
                    }
                    ValuePosition::Literal { value } => {
                        let slot = self.push(literal_param(value));
                        ss.left = ValuePosition::Literal {
                            value: LiteralValue::Scalar(slot_marker(slot)),
                        };
                        PredOperand::Param(slot)
                    }
                    ValuePosition::Static(_) => {
                        return Err(PlanError::Invalid(ValidationError {
                            path: t.name.clone(),
                            kind: crate::validate::ValidationErrorKind::UnboundStatic(
                                "static parameter".to_owned(),
                            ),
                        }));
                    }
                };
                let right = match &s.right {
                    Operand::Literal { value } => {
                        if s.op.is_like()
                            && let LiteralValue::Scalar(Value::String(p)) = value
                        {
                            // Reject malformed patterns at plan time, not per row.
                            crate::eval::LikePattern::new(p, false)?;
                        }
                        let slot = self.push(literal_param(value));
                        ss.right = Operand::Literal {
                            value: LiteralValue::Scalar(slot_marker(slot)),
                        };
                        slot
                    }
                    Operand::Static(_) => {
                        return Err(PlanError::Invalid(ValidationError {
                            path: t.name.clone(),
                            kind: crate::validate::ValidationErrorKind::UnboundStatic(
                                "static parameter".to_owned(),
                            ),
                        }));
                    }
                };
                Predicate::Compare {
                    left,
                    op: s.op,
                    right,
                }
            }
            // The shape is a copy of the AST, so the variants always line up.
            _ => Predicate::And(vec![]),
        })
    }
}

fn literal_param(v: &LiteralValue) -> Param {
    match v {
        LiteralValue::Scalar(v) => Param::Value(v.clone()),
        LiteralValue::Array(items) => Param::List(items.clone()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_query;
    use crate::schema::tests::zbugs;

    fn plan(src: &str) -> (Template, Params) {
        let schema = zbugs();
        let ast = parse_query(src, &schema).unwrap_or_else(|e| panic!("{src}: {e}"));
        plan_query(&ast, &schema).unwrap_or_else(|e| panic!("{src}: {e}"))
    }

    #[test]
    fn same_shape_different_literals_share_a_template() {
        let (a, pa) = plan(
            "issue.where('open', true).where('creatorID', 'u1').orderBy('modified', 'desc').limit(10)",
        );
        let (b, pb) = plan(
            "issue.where('creatorID', 'u2').where('open', false).orderBy('modified', 'desc').limit(50)",
        );
        assert_eq!(a.shape_hash, b.shape_hash);
        assert_eq!(a.shape_json, b.shape_json);
        assert_eq!(a.root, b.root);
        assert_ne!(pa, pb);
        assert_eq!(
            pa,
            vec![
                Param::Value(Value::from("u1")),
                Param::Value(Value::Bool(true)),
                Param::Value(Value::from(10))
            ]
        );
        assert_ne!(
            instance_id(&a.shape_hash, &pa),
            instance_id(&b.shape_hash, &pb)
        );
        assert_eq!(
            instance_id(&a.shape_hash, &pa),
            instance_id(&a.shape_hash, &pa.clone())
        );
        // A different ordering, or a limit that appears, is a different shape.
        let (c, _) = plan(
            "issue.where('open', true).where('creatorID', 'u1').orderBy('modified', 'asc').limit(10)",
        );
        assert_ne!(a.shape_hash, c.shape_hash);
        let (d, _) =
            plan("issue.where('open', true).where('creatorID', 'u1').orderBy('modified', 'desc')");
        assert_ne!(a.shape_hash, d.shape_hash);
    }

    #[test]
    fn node_structure_follows_zero_operator_order() {
        let (t, params) = plan(
            "issue.where('creatorID', 'u1').where(({or, cmp, exists}) => or(cmp('open', true), exists('comments'))).whereExists('labels', l => l.where('name', 'bug')).related('comments', c => c.orderBy('created', 'desc').limit(3)).start({id: 'x'}).limit(5)",
        );
        let root = &t.root;
        assert_eq!(root.table, "issue");
        // creatorID is column 6 of issue in the fixture schema.
        assert_eq!(
            root.lookup,
            Some(Lookup {
                column: 6,
                slot: 0,
                is_in: false
            })
        );
        assert_eq!(root.semijoins.len(), 1);
        let sj = &root.semijoins[0];
        assert!(!sj.negated);
        assert_eq!(
            sj.correlated.keys,
            vec![(0, 0)],
            "issue.id = issueLabel.issueID"
        );
        let junction = &sj.correlated.child;
        assert_eq!(junction.table, "issueLabel");
        assert_eq!(
            junction.semijoins.len(),
            1,
            "two-hop exists nests a semijoin"
        );
        assert!(root.residual.is_some(), "or with exists is residual");
        assert_eq!(root.order.len(), 1);
        assert_eq!(root.order[0].name, "id");
        assert!(root.start.as_ref().is_some_and(|s| s.exclusive));
        assert_eq!(root.limit_value(&params), Some(5));
        assert_eq!(root.related.len(), 1);
        let comments = &root.related[0];
        assert_eq!(comments.alias, "comments");
        assert_eq!(comments.correlated.child.limit_value(&params), Some(3));
        assert_eq!(comments.correlated.child.order.len(), 2);
        assert_eq!(params.len(), t.param_count);
    }

    #[test]
    fn predicates_and_sort_keys_evaluate_with_params() {
        let (t, params) = plan(
            "issue.where('title', 'LIKE', 'a%').where('modified', '>', 5).where('assigneeID', 'NOT IN', ['u1']).orderBy('modified', 'desc').start({modified: 10, id: 'b'})",
        );
        let schema = zbugs();
        let row = |title: &str, modified: Option<f64>, assignee: Option<&str>, id: &str| {
            schema
                .row_from_json(
                    "issue",
                    &serde_json::json!({"id": id, "title": title, "modified": modified, "assigneeID": assignee}),
                )
                .expect("row")
        };
        let f = t.root.filter.as_ref().expect("filter");
        assert_eq!(
            f.eval(&row("abc", Some(6.0), Some("u2"), "a"), &params),
            Ok(true)
        );
        assert_eq!(
            f.eval(&row("abc", Some(5.0), Some("u2"), "a"), &params),
            Ok(false)
        );
        assert_eq!(
            f.eval(&row("xbc", Some(6.0), Some("u2"), "a"), &params),
            Ok(false)
        );
        assert_eq!(
            f.eval(&row("abc", Some(6.0), None, "a"), &params),
            Ok(false)
        );
        assert_eq!(
            f.eval(&row("abc", Some(6.0), Some("u1"), "a"), &params),
            Ok(false)
        );
        // modified desc, id asc; start after (10, "b").
        assert!(
            !t.root
                .after_start(&row("a", Some(11.0), None, "z"), &params)
        );
        assert!(
            !t.root
                .after_start(&row("a", Some(10.0), None, "b"), &params)
        );
        assert!(
            t.root
                .after_start(&row("a", Some(10.0), None, "c"), &params)
        );
        assert!(t.root.after_start(&row("a", Some(9.0), None, "a"), &params));
        assert!(
            t.root.after_start(&row("a", None, None, "a"), &params),
            "null sorts last desc"
        );
    }

    #[test]
    fn plan_matches_the_in_memory_oracle_on_filters() {
        // The plan's filter and start must select exactly the rows the oracle selects.
        const TITLES: [&str; 3] = ["a%", "b", "ab"];
        let schema = zbugs();
        let rows: Vec<crate::Row> = (0..30)
            .map(|i| {
                schema
                    .row_from_json(
                        "issue",
                        &serde_json::json!({"id": format!("i{i:02}"), "title": TITLES[i % 3],
                            "modified": if i % 7 == 0 { None } else { Some((i * 37 % 11) as f64) },
                            "open": i % 2 == 0, "assigneeID": if i % 4 == 0 { None } else { Some(format!("u{}", i % 3)) }}),
                    )
                    .expect("row")
            })
            .collect();
        let queries = [
            "issue.where('modified', '>=', 4).orderBy('modified', 'asc')",
            "issue.where(({or, cmp}) => or(cmp('title', 'LIKE', 'a\\\\%'), cmp('assigneeID', 'IN', ['u1', 'u2']))).orderBy('title', 'desc').start({title: 'ab', id: 'i10'}, {inclusive: true})",
            "issue.where('open', false).where('assigneeID', 'IS NOT', null).orderBy('modified', 'desc').start({modified: 3, id: 'i05'}).limit(4)",
        ];
        for src in queries {
            let ast = parse_query(src, &schema).expect("parse");
            let (t, params) = plan_query(&ast, &schema).expect("plan");
            let mut mine: Vec<&crate::Row> = rows
                .iter()
                .filter(|r| {
                    t.root
                        .filter
                        .as_ref()
                        .is_none_or(|f| f.eval(*r, &params) == Ok(true))
                        && t.root.after_start(*r, &params)
                })
                .collect();
            mine.sort_by_key(|r| t.root.sort_key(*r));
            if let Some(k) = t.root.limit_value(&params) {
                mine.truncate(k as usize);
            }
            let oracle =
                crate::memory::evaluate_in_memory(&ast, &schema, &|_| &rows).expect("oracle");
            let want: Vec<&crate::Row> = oracle.iter().map(|n| &n.row).collect();
            assert_eq!(mine, want, "{src}");
        }
    }

    #[test]
    fn bad_like_patterns_fail_at_plan_time() {
        let schema = zbugs();
        let ast = parse_query("issue.where('title', 'LIKE', 'a\\\\')", &schema).expect("parse");
        assert_eq!(
            plan_query(&ast, &schema),
            Err(PlanError::Like(LikePatternError))
        );
    }
}
