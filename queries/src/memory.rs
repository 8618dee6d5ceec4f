//! A naive in-memory evaluator of a whole AST over table contents: the from-scratch
//! recomputation that oracle tests compare incremental views with (dataflow-design §6), and a
//! cross-check of the SQL translation.
//!
//! It follows the same semantics as [`crate::sql`]: filters per [`crate::eval`], EXISTS as
//! "some correlated child passes the child's `where`" (constant when the child has `limit: 0`),
//! ordering completed with the primary key under [`Value`]'s order (nulls first ascending),
//! `start` as a cursor in that ordering, per-parent `limit` in `related`, related entries
//! deduplicated by alias (last wins), null correlation keys never matching, and EXISTS witness
//! rows as in [`crate::sql::evaluate`].

use std::cmp::Ordering;

use crate::ast::{Ast, Condition, Direction, ExistsOp, OrderPart};
use crate::eval::{EvalError, eval_simple};
use crate::row::{Cols, Row};
use crate::schema::{Schema, TableSchema};
use crate::sql::{ChildQuery, Relationship, ResultNode, child_queries};
use crate::validate::{ValidationError, validate};
use crate::value::Value;

/// Why the in-memory evaluation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MemoryError {
    /// The AST does not fit the schema.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A condition could not be evaluated.
    #[error(transparent)]
    Eval(#[from] EvalError),
}

/// Evaluates `ast` over `rows(table)` (rows in schema column order).
pub fn evaluate_in_memory<'r>(
    ast: &Ast,
    schema: &Schema,
    rows: &dyn Fn(&str) -> &'r [Row],
) -> Result<Vec<ResultNode>, MemoryError> {
    validate(ast, schema)?;
    let ctx = Ctx { schema, rows };
    ctx.node(ast, None)
}

struct Ctx<'a, 'r> {
    schema: &'a Schema,
    rows: &'a dyn Fn(&str) -> &'r [Row],
}

fn table<'a>(schema: &'a Schema, ast: &Ast) -> Result<&'a TableSchema, MemoryError> {
    schema.table(&ast.table).ok_or_else(|| {
        MemoryError::Invalid(ValidationError {
            path: ast.table.clone(),
            kind: crate::validate::ValidationErrorKind::UnknownTable(ast.table.clone()),
        })
    })
}

fn get<R: Cols + ?Sized>(table: &TableSchema, row: &R, column: &str) -> Value {
    table
        .column_index(column)
        .filter(|&i| i < row.col_count())
        .map_or(Value::Null, |i| row.col(i).into_owned())
}

/// Compares two rows under a completed ordering.
pub fn compare_rows<A: Cols + ?Sized, B: Cols + ?Sized>(
    table: &TableSchema,
    order: &[OrderPart],
    a: &A,
    b: &B,
) -> Ordering {
    for p in order {
        let o = get(table, a, &p.0).cmp(&get(table, b, &p.0));
        let o = match p.1 {
            Direction::Asc => o,
            Direction::Desc => o.reverse(),
        };
        if o != Ordering::Equal {
            return o;
        }
    }
    Ordering::Equal
}

impl Ctx<'_, '_> {
    /// The rows of `ast` (optionally restricted to `child_field = keys`), filtered, ordered,
    /// started and limited, with their relationships.
    fn node(
        &self,
        ast: &Ast,
        correlation: Option<(&[String], &[Value])>,
    ) -> Result<Vec<ResultNode>, MemoryError> {
        let t = table(self.schema, ast)?;
        let mut rows: Vec<Row> = Vec::new();
        for row in (self.rows)(&ast.table) {
            if let Some((fields, keys)) = correlation
                && !fields
                    .iter()
                    .zip(keys)
                    .all(|(f, k)| get(t, row, f).sql_eq(k))
            {
                continue;
            }
            if let Some(w) = &ast.where_
                && !self.matches(w, t, row)?
            {
                continue;
            }
            rows.push(row.clone());
        }
        let mut order = ast.order_by().to_vec();
        for pk in &t.primary_key {
            if !order.iter().any(|p| &p.0 == pk) {
                order.push(OrderPart::new(pk.clone(), Direction::Asc));
            }
        }
        rows.sort_by(|a, b| compare_rows(t, &order, a, b));
        if let Some(start) = &ast.start {
            let bound: Vec<Value> = t
                .columns
                .iter()
                .map(|c| start.row.get(&c.name).cloned().unwrap_or(Value::Null))
                .collect();
            rows.retain(|r| {
                let o = compare_rows(t, &order, r, &bound);
                o == Ordering::Greater || (!start.exclusive && o == Ordering::Equal)
            });
        }
        if let Some(limit) = ast.limit {
            rows.truncate(usize::try_from(limit).unwrap_or(usize::MAX));
        }
        let children = child_queries(ast);
        let mut out = Vec::with_capacity(rows.len());
        for row in rows {
            let mut relationships = Vec::new();
            for ChildQuery { sub: r, exists } in &children {
                let keys: Vec<Value> = r
                    .correlation
                    .parent_field
                    .iter()
                    .map(|f| get(t, &row, f))
                    .collect();
                let nodes = if keys.iter().any(Value::is_null) {
                    Vec::new()
                } else {
                    self.node(&r.subquery, Some((&r.correlation.child_field, &keys)))?
                };
                relationships.push(Relationship {
                    alias: r.subquery.alias.clone().unwrap_or_default(),
                    hidden: r.hidden == Some(true),
                    system: r.system,
                    exists: *exists,
                    nodes,
                });
            }
            out.push(ResultNode {
                table: ast.table.clone(),
                row,
                relationships,
            });
        }
        Ok(out)
    }

    fn matches(&self, cond: &Condition, t: &TableSchema, row: &Row) -> Result<bool, MemoryError> {
        Ok(match cond {
            Condition::And { conditions } => {
                for c in conditions {
                    if !self.matches(c, t, row)? {
                        return Ok(false);
                    }
                }
                true
            }
            Condition::Or { conditions } => {
                for c in conditions {
                    if self.matches(c, t, row)? {
                        return Ok(true);
                    }
                }
                false
            }
            Condition::Simple(s) => eval_simple(s, &|c| get(t, row, c))?,
            Condition::CorrelatedSubquery(c) => {
                let sub = &c.related.subquery;
                let exists = if sub.limit == Some(0) {
                    false
                } else {
                    let ct = table(self.schema, sub)?;
                    let keys: Vec<Value> = c
                        .related
                        .correlation
                        .parent_field
                        .iter()
                        .map(|f| get(t, row, f))
                        .collect();
                    let mut found = false;
                    for child in (self.rows)(&sub.table) {
                        let correlated = c
                            .related
                            .correlation
                            .child_field
                            .iter()
                            .zip(&keys)
                            .all(|(f, k)| get(ct, child, f).sql_eq(k));
                        if correlated
                            && match &sub.where_ {
                                Some(w) => self.matches(w, ct, child)?,
                                None => true,
                            }
                        {
                            found = true;
                            break;
                        }
                    }
                    found
                };
                match c.op {
                    ExistsOp::Exists => exists,
                    ExistsOp::NotExists => !exists,
                }
            }
        })
    }
}
