//! Translation of an AST to SQLite SQL over the replica: the reference oracle for the
//! incremental engine.
//!
//! The replica stores table `public.x` as `x` and `s.x` as the single identifier `"s.x"` (the
//! AST already uses those names), booleans as 0/1, JSON and arrays as JSON text, timestamps as
//! REAL epoch milliseconds. The translation keeps Zero's semantics:
//!
//! * `=`, `!=`, `<`, ... are false when either side is null (SQL's NULL logic gives that),
//!   `IS` / `IS NOT` are SQLite's null-safe forms;
//! * `IN` / `NOT IN` expand to parameter lists, and `NOT IN` is false for a null left side
//!   (SQLite would make `NULL NOT IN ()` true);
//! * `LIKE` becomes a case-sensitive `GLOB` with the pattern translated (`%` → `*`, `_` → `?`,
//!   `\x` → literal x, GLOB metacharacters bracketed); `ILIKE` compares `lower()` of both
//!   sides. SQLite's `lower()` folds ASCII only, so ILIKE on non-ASCII letters is the one place
//!   where this oracle is weaker than Zero;
//! * EXISTS / NOT EXISTS are correlated subqueries; a subquery with `limit: 0` is constant;
//! * the ordering is completed with the primary key; `start` becomes a lexicographic cursor
//!   predicate that follows Zero's null ordering (nulls first ascending, last descending);
//! * `limit` in a `related` subquery is per parent: [`evaluate`] runs one statement per parent
//!   row and relationship, with the correlation bound as parameters;
//! * rows Zero syncs for every EXISTS / NOT EXISTS in a `where`, under AND or OR at any depth
//!   (the first 3 matching child rows per parent in the child's ordering; up to the
//!   subquery's own limit when flipped; none for permission subqueries) come back as `exists`
//!   relationships, so [`synced_rows`] is the full set of rows a client receives.
//!
//! The crate does no I/O: [`evaluate`] calls an executor closure for every statement and
//! decodes the rows it returns with the schema's column types.

use std::collections::BTreeSet;
use std::fmt::Write as _;

use thiserror::Error;

use crate::ast::{
    Ast, Condition, CorrelatedSubquery, CorrelatedSubqueryCondition, Direction, ExistsOp,
    LiteralValue, Operand, OrderPart, SimpleCondition, SimpleOp, System, ValuePosition,
};
use crate::eval::LikePatternError;
use crate::row::Row;
use crate::schema::{ColumnType, Schema, TableSchema};
use crate::validate::{ValidationError, validate};
use crate::value::Value;

/// A value as SQLite stores it.
#[derive(Debug, Clone, PartialEq)]
pub enum SqlValue {
    /// NULL.
    Null,
    /// INTEGER (booleans are 0/1).
    Integer(i64),
    /// REAL.
    Real(f64),
    /// TEXT (strings, and JSON as text).
    Text(String),
}

/// Encodes a ZQL value the way the replica stores it.
pub fn to_sql(v: &Value) -> SqlValue {
    match v {
        Value::Null => SqlValue::Null,
        Value::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Value::Number(n) => {
            if n.fract() == 0.0 && n.abs() <= crate::value::MAX_SAFE_INTEGER {
                // Exact: integral and within ±2^53.
                SqlValue::Integer(*n as i64)
            } else {
                SqlValue::Real(*n)
            }
        }
        Value::String(s) => SqlValue::Text(s.to_string()),
        Value::Json(j) => match Value::from_json(serde_json::Value::clone(j)) {
            Value::Json(j) => SqlValue::Text(j.to_string()),
            scalar => to_sql(&scalar),
        },
    }
}

/// Decodes a replica value for a column of type `ty`.
pub fn from_sql(ty: ColumnType, v: SqlValue) -> Value {
    match (ty, v) {
        (_, SqlValue::Null) => Value::Null,
        (ColumnType::Boolean, SqlValue::Integer(i)) => Value::Bool(i != 0),
        (ColumnType::Boolean, SqlValue::Real(f)) => Value::Bool(f != 0.0),
        (ColumnType::Json, SqlValue::Text(t)) => serde_json::from_str(&t)
            .map(Value::from_json)
            .unwrap_or_else(|_| Value::String(t.into())),
        // Integers are JavaScript numbers on the wire.
        (_, SqlValue::Integer(i)) => Value::Number(i as f64),
        (_, SqlValue::Real(f)) => Value::Number(f),
        (_, SqlValue::Text(t)) => Value::String(t.into()),
    }
}

/// Quotes an identifier for SQLite.
pub fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// Why an AST could not be translated.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum SqlError {
    /// The AST does not fit the schema.
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    /// A LIKE pattern ends with `\`.
    #[error(transparent)]
    Like(#[from] LikePatternError),
}

/// Failure of [`evaluate`]: translation or the executor.
#[derive(Debug, Error)]
pub enum EvaluateError<E: std::error::Error + 'static> {
    /// The AST could not be translated.
    #[error(transparent)]
    Sql(#[from] SqlError),
    /// The executor failed.
    #[error("executing a statement failed")]
    Exec(#[source] E),
}

/// One SELECT with its positional parameters (`?1`, `?2`, ...).
#[derive(Debug, Clone, PartialEq)]
pub struct Statement {
    /// The SQL text.
    pub sql: String,
    /// Parameters, in `?N` order.
    pub params: Vec<SqlValue>,
    /// The table whose rows are selected.
    pub table: String,
    /// Selected columns (every schema column, in schema order) and their types.
    pub columns: Vec<(String, ColumnType)>,
}

/// The SELECT for one query node: its own `where`, `start`, completed ordering and `limit`,
/// restricted to `child_field = parent_values` when given (a related subquery for one parent).
/// `related` entries are not included; [`evaluate`] runs them as separate statements.
pub fn select_statement(
    ast: &Ast,
    schema: &Schema,
    correlation: Option<(&[String], &[Value])>,
) -> Result<Statement, SqlError> {
    let table = table_of(schema, ast)?;
    let mut b = SqlBuilder {
        schema,
        params: Vec::new(),
        next_alias: 1,
    };
    let cols: Vec<String> = table
        .columns
        .iter()
        .map(|c| format!("t0.{}", quote_ident(&c.name)))
        .collect();
    let mut sql = format!(
        "SELECT {} FROM {} AS t0",
        cols.join(", "),
        quote_ident(&ast.table)
    );
    let mut preds = Vec::new();
    if let Some((fields, values)) = correlation {
        for (f, v) in fields.iter().zip(values) {
            let p = b.param(v);
            preds.push(format!("t0.{} = {p}", quote_ident(f)));
        }
    }
    if let Some(w) = &ast.where_ {
        preds.push(b.condition(w, "t0")?);
    }
    let order = completed_order(ast, table);
    if let Some(start) = &ast.start {
        preds.push(b.start(&order, &start.row, start.exclusive));
    }
    if !preds.is_empty() {
        write!(sql, " WHERE {}", preds.join(" AND ")).ok();
    }
    let order_sql: Vec<String> = order
        .iter()
        .map(|p| {
            format!(
                "t0.{} {}",
                quote_ident(&p.0),
                match p.1 {
                    Direction::Asc => "ASC",
                    Direction::Desc => "DESC",
                }
            )
        })
        .collect();
    write!(sql, " ORDER BY {}", order_sql.join(", ")).ok();
    if let Some(limit) = ast.limit {
        write!(sql, " LIMIT {limit}").ok();
    }
    Ok(Statement {
        sql,
        params: b.params,
        table: ast.table.clone(),
        columns: table
            .columns
            .iter()
            .map(|c| (c.name.clone(), c.ty))
            .collect(),
    })
}

fn table_of<'a>(schema: &'a Schema, ast: &Ast) -> Result<&'a TableSchema, SqlError> {
    match schema.table(&ast.table) {
        Some(t) => Ok(t),
        None => Err(validate(ast, schema).err().map_or_else(
            || {
                SqlError::Invalid(ValidationError {
                    path: ast.table.clone(),
                    kind: crate::validate::ValidationErrorKind::UnknownTable(ast.table.clone()),
                })
            },
            SqlError::Invalid,
        )),
    }
}

/// The ordering with the primary key appended (Zero's `completeOrdering`).
fn completed_order(ast: &Ast, table: &TableSchema) -> Vec<OrderPart> {
    let mut order = ast.order_by().to_vec();
    for pk in &table.primary_key {
        if !order.iter().any(|p| &p.0 == pk) {
            order.push(OrderPart::new(pk.clone(), Direction::Asc));
        }
    }
    order
}

struct SqlBuilder<'a> {
    schema: &'a Schema,
    params: Vec<SqlValue>,
    next_alias: usize,
}

impl SqlBuilder<'_> {
    fn param(&mut self, v: &Value) -> String {
        self.params.push(to_sql(v));
        format!("?{}", self.params.len())
    }

    fn condition(&mut self, cond: &Condition, alias: &str) -> Result<String, SqlError> {
        Ok(match cond {
            Condition::And { conditions } if conditions.is_empty() => "1".to_owned(),
            Condition::Or { conditions } if conditions.is_empty() => "0".to_owned(),
            Condition::And { conditions } | Condition::Or { conditions } => {
                let sep = if matches!(cond, Condition::And { .. }) {
                    " AND "
                } else {
                    " OR "
                };
                let parts = conditions
                    .iter()
                    .map(|c| self.condition(c, alias))
                    .collect::<Result<Vec<_>, _>>()?;
                format!("({})", parts.join(sep))
            }
            Condition::Simple(s) => self.simple(s, alias)?,
            Condition::CorrelatedSubquery(c) => {
                let negate = c.op == ExistsOp::NotExists;
                if c.related.subquery.limit == Some(0) {
                    return Ok(if negate { "1" } else { "0" }.to_owned());
                }
                let sub = &c.related.subquery;
                // Fails early with a clear error when the child table is unknown.
                table_of(self.schema, sub)?;
                let child_alias = format!("t{}", self.next_alias);
                self.next_alias += 1;
                let mut preds: Vec<String> = c
                    .related
                    .correlation
                    .parent_field
                    .iter()
                    .zip(&c.related.correlation.child_field)
                    .map(|(p, ch)| {
                        format!(
                            "{child_alias}.{} = {alias}.{}",
                            quote_ident(ch),
                            quote_ident(p)
                        )
                    })
                    .collect();
                if let Some(w) = &sub.where_ {
                    preds.push(self.condition(w, &child_alias)?);
                }
                format!(
                    "{}EXISTS (SELECT 1 FROM {} AS {child_alias} WHERE {})",
                    if negate { "NOT " } else { "" },
                    quote_ident(&sub.table),
                    preds.join(" AND ")
                )
            }
        })
    }

    fn simple(&mut self, s: &SimpleCondition, alias: &str) -> Result<String, SqlError> {
        let unbound = || {
            SqlError::Invalid(ValidationError {
                path: String::new(),
                kind: crate::validate::ValidationErrorKind::UnboundStatic(
                    "static parameter".to_owned(),
                ),
            })
        };
        let right = match &s.right {
            Operand::Literal { value } => value,
            Operand::Static(_) => return Err(unbound()),
        };
        // The left operand, written once per use so that parameters stay in order.
        let left_lit: Option<Value> = match &s.left {
            ValuePosition::Column { .. } => None,
            ValuePosition::Literal { value } => Some(match value {
                LiteralValue::Scalar(v) => v.clone(),
                LiteralValue::Array(_) => value.to_value(),
            }),
            ValuePosition::Static(_) => return Err(unbound()),
        };
        let left = |b: &mut Self| match (&s.left, &left_lit) {
            (ValuePosition::Column { name }, _) => format!("{alias}.{}", quote_ident(name)),
            (_, Some(v)) => b.param(v),
            _ => "NULL".to_owned(),
        };
        let scalar = match right {
            LiteralValue::Scalar(v) => Some(v),
            LiteralValue::Array(_) => None,
        };
        Ok(match s.op {
            SimpleOp::Eq
            | SimpleOp::Ne
            | SimpleOp::Lt
            | SimpleOp::Gt
            | SimpleOp::Le
            | SimpleOp::Ge => {
                let Some(v) = scalar else {
                    return Ok("0".to_owned());
                };
                let l = left(self);
                format!("{l} {} {}", s.op.as_str(), self.param(v))
            }
            SimpleOp::Is | SimpleOp::IsNot => {
                let Some(v) = scalar else {
                    // Strict identity with an array literal never holds.
                    return Ok(if s.op == SimpleOp::Is { "0" } else { "1" }.to_owned());
                };
                let l = left(self);
                format!("{l} {} {}", s.op.as_str(), self.param(v))
            }
            SimpleOp::In | SimpleOp::NotIn => {
                let LiteralValue::Array(items) = right else {
                    return Ok("0".to_owned());
                };
                let l = left(self);
                let negate = s.op == SimpleOp::NotIn;
                if items.is_empty() {
                    return Ok(if negate {
                        format!("{l} IS NOT NULL")
                    } else {
                        "0".to_owned()
                    });
                }
                let ps: Vec<String> = items.iter().map(|i| self.param(i)).collect();
                if negate {
                    let l2 = left(self);
                    format!("({l} IS NOT NULL AND {l2} NOT IN ({}))", ps.join(", "))
                } else {
                    format!("{l} IN ({})", ps.join(", "))
                }
            }
            SimpleOp::Like | SimpleOp::NotLike | SimpleOp::ILike | SimpleOp::NotILike => {
                let Some(v) = scalar.filter(|v| !v.is_null()) else {
                    return Ok("0".to_owned());
                };
                let ci = matches!(s.op, SimpleOp::ILike | SimpleOp::NotILike);
                let pattern = match v.as_str() {
                    Some(p) => p.to_owned(),
                    None => v.to_string(),
                };
                let glob = like_to_glob(&pattern, ci)?;
                let l = left(self);
                let subject = if ci { format!("lower({l})") } else { l };
                let p = self.param(&Value::String(glob.into()));
                let test = format!("{subject} GLOB {p}");
                if matches!(s.op, SimpleOp::NotLike | SimpleOp::NotILike) {
                    // NOT(NULL) stays NULL, so a null left side is still false.
                    format!("NOT ({test})")
                } else {
                    test
                }
            }
        })
    }

    /// `row > bound` (or `>=` when not exclusive) in the completed ordering.
    fn start(
        &mut self,
        order: &[OrderPart],
        row: &crate::ast::RowObject,
        exclusive: bool,
    ) -> String {
        let bound: Vec<Value> = order
            .iter()
            .map(|p| row.get(&p.0).cloned().unwrap_or(Value::Null))
            .collect();
        let mut terms = Vec::new();
        for i in 0..order.len() {
            let mut parts = Vec::new();
            for j in 0..i {
                let p = self.param(&bound[j]);
                parts.push(format!("t0.{} IS {p}", quote_ident(&order[j].0)));
            }
            let col = format!("t0.{}", quote_ident(&order[i].0));
            let after = match (order[i].1, bound[i].is_null()) {
                (Direction::Asc, true) => format!("{col} IS NOT NULL"),
                (Direction::Asc, false) => format!("{col} > {}", self.param(&bound[i])),
                (Direction::Desc, true) => "0".to_owned(),
                (Direction::Desc, false) => {
                    format!("({col} IS NULL OR {col} < {})", self.param(&bound[i]))
                }
            };
            parts.push(after);
            terms.push(format!("({})", parts.join(" AND ")));
        }
        if !exclusive {
            let parts: Vec<String> = order
                .iter()
                .zip(&bound)
                .map(|(p, v)| format!("t0.{} IS {}", quote_ident(&p.0), self.param(v)))
                .collect();
            terms.push(format!("({})", parts.join(" AND ")));
        }
        if terms.is_empty() {
            "1".to_owned()
        } else {
            format!("({})", terms.join(" OR "))
        }
    }
}

/// Translates a Zero LIKE pattern into a SQLite GLOB pattern (lower-cased for ILIKE).
pub fn like_to_glob(pattern: &str, case_insensitive: bool) -> Result<String, LikePatternError> {
    let mut out = String::new();
    let mut chars = pattern.chars();
    while let Some(c) = chars.next() {
        let literal = match c {
            '%' => {
                out.push('*');
                continue;
            }
            '_' => {
                out.push('?');
                continue;
            }
            '\\' => chars.next().ok_or(LikePatternError)?,
            c => c,
        };
        let literal = if case_insensitive {
            literal.to_ascii_lowercase()
        } else {
            literal
        };
        match literal {
            '*' | '?' | '[' => {
                out.push('[');
                out.push(literal);
                out.push(']');
            }
            c => out.push(c),
        }
    }
    Ok(out)
}

/// Runs one statement and returns its rows, one SQLite value per selected column.
pub type Executor<'a, E> = dyn FnMut(&Statement) -> Result<Vec<Vec<SqlValue>>, E> + 'a;

/// One row of a hierarchical result, with its relationships.
#[derive(Debug, Clone, PartialEq)]
pub struct ResultNode {
    /// Table of the row.
    pub table: String,
    /// Column values in schema order.
    pub row: Row,
    /// Child rows per relationship (in `related` order, one entry per alias).
    pub relationships: Vec<Relationship>,
}

/// The children of one row for one `related` entry.
#[derive(Debug, Clone, PartialEq)]
pub struct Relationship {
    /// The subquery alias.
    pub alias: String,
    /// A junction hop that the client hides.
    pub hidden: bool,
    /// `permissions` rows are evaluated but never synced.
    pub system: Option<System>,
    /// Witness rows of an EXISTS / NOT EXISTS condition rather than a `related` entry: synced
    /// (so the client can evaluate the condition) but not part of the view.
    pub exists: bool,
    /// Child rows in the child ordering.
    pub nodes: Vec<ResultNode>,
}

/// Rows Zero syncs per parent for a non-flipped EXISTS (`EXISTS_LIMIT`).
pub const EXISTS_LIMIT: u64 = 3;
/// Rows Zero fetches per parent for a permission EXISTS (evaluated, never synced, so no
/// witness query is built for it).
pub const PERMISSIONS_EXISTS_LIMIT: u64 = 1;

/// A child query evaluated for every output row of a node.
pub(crate) struct ChildQuery {
    pub(crate) sub: CorrelatedSubquery,
    pub(crate) exists: bool,
}

/// The child queries of `ast`: its `related` entries, deduplicated by alias (last wins, as in
/// Zero), then one witness query per EXISTS / NOT EXISTS condition anywhere in its `where`
/// (under AND and OR at any depth), in condition order.
///
/// A witness query is the condition's subquery with its own `where` and ordering, capped per
/// parent at [`EXISTS_LIMIT`] rows, or at the subquery's own `limit` (none: every child) when
/// flipped; its `start` and `related` are dropped, since Zero syncs the matching children, not
/// a view of them. Witnesses of a witness come from its own `where`, recursively. Whatever the
/// condition's truth value, the rows that match the subquery are synced: a NOT EXISTS that
/// holds has none, but one that fails under an OR has. Permission subqueries and subqueries
/// with `limit: 0` (constant conditions) have no witnesses.
pub(crate) fn child_queries(ast: &Ast) -> Vec<ChildQuery> {
    let related = ast.related();
    let mut out: Vec<ChildQuery> = related
        .iter()
        .enumerate()
        .filter(|(i, r)| {
            !related[i + 1..]
                .iter()
                .any(|later| later.subquery.alias == r.subquery.alias)
        })
        .map(|(_, r)| ChildQuery {
            sub: r.clone(),
            exists: false,
        })
        .collect();
    let mut conds = Vec::new();
    if let Some(w) = &ast.where_ {
        exists_conditions(w, &mut conds);
    }
    for csq in conds {
        if csq.related.system == Some(System::Permissions) || csq.related.subquery.limit == Some(0)
        {
            continue;
        }
        let mut sub = csq.related.clone();
        if csq.flip != Some(true) {
            sub.subquery.limit = Some(EXISTS_LIMIT);
        }
        sub.subquery.start = None;
        sub.subquery.related = None;
        out.push(ChildQuery { sub, exists: true });
    }
    out
}

/// Every EXISTS / NOT EXISTS condition of `cond`, through AND and OR, in order.
fn exists_conditions<'a>(cond: &'a Condition, out: &mut Vec<&'a CorrelatedSubqueryCondition>) {
    match cond {
        Condition::And { conditions } | Condition::Or { conditions } => {
            for c in conditions {
                exists_conditions(c, out);
            }
        }
        Condition::CorrelatedSubquery(c) => out.push(c),
        Condition::Simple(_) => {}
    }
}

/// Executes `ast` through `exec` and builds the hierarchical result. Validates first.
///
/// `exec` receives each statement and returns its rows as SQLite values, one entry per
/// selected column.
pub fn evaluate<E: std::error::Error + 'static>(
    ast: &Ast,
    schema: &Schema,
    mut exec: impl FnMut(&Statement) -> Result<Vec<Vec<SqlValue>>, E>,
) -> Result<Vec<ResultNode>, EvaluateError<E>> {
    validate(ast, schema).map_err(SqlError::from)?;
    evaluate_node(ast, schema, None, &mut exec)
}

fn evaluate_node<E: std::error::Error + 'static>(
    ast: &Ast,
    schema: &Schema,
    correlation: Option<(&[String], &[Value])>,
    exec: &mut Executor<'_, E>,
) -> Result<Vec<ResultNode>, EvaluateError<E>> {
    let stmt = select_statement(ast, schema, correlation)?;
    let rows = exec(&stmt).map_err(EvaluateError::Exec)?;
    let table = table_of(schema, ast)?;
    let children = child_queries(ast);
    let mut out = Vec::with_capacity(rows.len());
    for raw in rows {
        let row: Row = stmt
            .columns
            .iter()
            .zip(raw)
            .map(|((_, ty), v)| from_sql(*ty, v))
            .collect();
        let mut relationships = Vec::new();
        for ChildQuery { sub: r, exists } in &children {
            let keys: Vec<Value> = r
                .correlation
                .parent_field
                .iter()
                .map(|f| {
                    table
                        .column_index(f)
                        .filter(|&i| i < row.len())
                        .map_or(Value::Null, |i| row.get(i))
                })
                .collect();
            // A null key never matches (null != null).
            let nodes = if keys.iter().any(Value::is_null) {
                Vec::new()
            } else {
                evaluate_node(
                    &r.subquery,
                    schema,
                    Some((&r.correlation.child_field, &keys)),
                    exec,
                )?
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

/// The distinct `(table, row)` pairs a client would receive for this result: every row of
/// every relationship, junction rows and EXISTS witness rows included, permission rows
/// excluded.
pub fn synced_rows(nodes: &[ResultNode]) -> BTreeSet<(String, Row)> {
    fn walk(nodes: &[ResultNode], out: &mut BTreeSet<(String, Row)>) {
        for n in nodes {
            out.insert((n.table.clone(), n.row.clone()));
            for r in &n.relationships {
                if r.system != Some(System::Permissions) {
                    walk(&r.nodes, out);
                }
            }
        }
    }
    let mut out = BTreeSet::new();
    walk(nodes, &mut out);
    out
}

/// The result in the shape of the client's view: rows as JSON objects, relationships as
/// arrays under their alias, hidden junction hops replaced by their children.
pub fn to_view_json(nodes: &[ResultNode], schema: &Schema) -> serde_json::Value {
    serde_json::Value::Array(nodes.iter().map(|n| node_json(n, schema)).collect())
}

fn node_json(n: &ResultNode, schema: &Schema) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    if let Some(t) = schema.table(&n.table) {
        for (c, v) in t.columns.iter().zip(n.row.iter()) {
            obj.insert(c.name.clone(), v.to_json());
        }
    }
    for r in &n.relationships {
        if r.system == Some(System::Permissions) || r.exists {
            continue;
        }
        let children: Vec<serde_json::Value> = if r.hidden {
            // The junction's own single relationship is lifted into its place.
            r.nodes
                .iter()
                .flat_map(|j| j.relationships.iter().flat_map(|rr| rr.nodes.iter()))
                .map(|c| node_json(c, schema))
                .collect()
        } else {
            r.nodes.iter().map(|c| node_json(c, schema)).collect()
        };
        obj.insert(r.alias.clone(), serde_json::Value::Array(children));
    }
    serde_json::Value::Object(obj)
}
