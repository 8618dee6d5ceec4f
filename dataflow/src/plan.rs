//! From a ZQL AST to a *template* (the query's shape, with literals replaced by parameter slots)
//! and the *parameters* that fill those slots.
//!
//! Two client queries that differ only in literals, limits or start cursors have equal shapes,
//! so they run as two parameter rows of one dataflow (`dataflow-design.md` §5.2). Everything the
//! dataflow needs at run time is resolved here once: column names become row positions,
//! orderings are completed with the primary key, and EXISTS subqueries get their witness cap.

use std::collections::HashMap;
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use zero_queries::ast::{
    Ast, Condition, CorrelatedSubquery, Direction, ExistsOp, LiteralValue, Operand, SimpleOp,
    System, ValuePosition,
};
use zero_queries::schema::Schema;
use zero_queries::validate::simplify_condition;
use zero_queries::{Row, Value};

use crate::error::EngineError;

/// Position of a table in the [`Catalog`]; rows and changes refer to tables by it internally.
pub type TableId = usize;

/// How many witness rows Zero syncs per parent for a non-flipped EXISTS (`EXISTS_LIMIT`).
pub const EXISTS_LIMIT: usize = 3;

/// How many child rows a permission EXISTS keeps (`PERMISSIONS_EXISTS_LIMIT`); never synced.
pub const PERMISSIONS_EXISTS_LIMIT: usize = 1;

/// The tables the engine knows, in a fixed order, with column positions resolved.
#[derive(Debug, Clone)]
pub struct Catalog {
    /// Tables by [`TableId`].
    pub tables: Vec<TableInfo>,
    by_name: HashMap<String, TableId>,
    /// The schema, kept for validation and the reference evaluator.
    pub schema: Schema,
    /// `(table, columns)` of the destination end of every relationship hop: the correlation
    /// indexes that `related` and EXISTS children read, built up front so a query's first use
    /// does not pay for arranging a whole table. The source ends are read only by a flipped
    /// EXISTS (or a query seeking those columns), so they are built when a shape needs them:
    /// held for every row of a large table (`comment.creatorID`) they cost memory that most
    /// apps' queries never use.
    pub relationship_indexes: Vec<(TableId, Vec<usize>)>,
}

/// One table of the [`Catalog`].
#[derive(Debug, Clone)]
pub struct TableInfo {
    /// Table name as in the schema.
    pub name: Arc<str>,
    /// Column names in row order.
    pub columns: Vec<String>,
    /// Positions of the primary-key columns.
    pub pk: Vec<usize>,
}

impl Catalog {
    /// Builds the catalog of every table in `schema`.
    pub fn new(schema: &Schema) -> Catalog {
        let mut tables = Vec::new();
        let mut by_name = HashMap::new();
        for (name, t) in &schema.tables {
            let columns: Vec<String> = t.columns.iter().map(|c| c.name.clone()).collect();
            let pk = t
                .primary_key
                .iter()
                .map(|c| {
                    columns
                        .iter()
                        .position(|n| n == c)
                        .expect("the schema checks that primary-key columns exist")
                })
                .collect();
            by_name.insert(name.clone(), tables.len());
            tables.push(TableInfo {
                name: Arc::from(name.as_str()),
                columns,
                pk,
            });
        }
        let mut relationship_indexes = Vec::new();
        for rels in schema.relationships.values() {
            for hop in rels.values().flat_map(|rel| &rel.hops) {
                let Some(&tid) = by_name.get(hop.dest_table.as_str()) else {
                    continue;
                };
                let info: &TableInfo = &tables[tid];
                let idx: Option<Vec<usize>> = hop
                    .dest_field
                    .iter()
                    .map(|c| info.columns.iter().position(|n| n == c))
                    .collect();
                if let Some(idx) = idx {
                    relationship_indexes.push((tid, idx));
                }
            }
        }
        relationship_indexes.sort();
        relationship_indexes.dedup();
        Catalog {
            tables,
            by_name,
            schema: schema.clone(),
            relationship_indexes,
        }
    }

    /// The id of table `name`.
    pub fn table_id(&self, name: &str) -> Option<TableId> {
        self.by_name.get(name).copied()
    }

    /// The primary-key values of `row` in table `t`.
    pub fn pk_of(&self, t: TableId, row: &Row) -> Vec<Value> {
        self.tables[t].pk.iter().map(|&c| row.get(c)).collect()
    }

    fn column(&self, t: TableId, name: &str) -> Result<usize, EngineError> {
        self.tables[t]
            .columns
            .iter()
            .position(|c| c == name)
            .ok_or_else(|| {
                EngineError::Unsupported(format!(
                    "table \"{}\" has no column \"{name}\"",
                    self.tables[t].name
                ))
            })
    }

    fn table(&self, name: &str) -> Result<TableId, EngineError> {
        self.table_id(name)
            .ok_or_else(|| EngineError::UnknownTable(name.to_owned()))
    }
}

/// A parameter value of one query instance of a template.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Param {
    /// A scalar literal of a simple condition.
    Value(Value),
    /// An array literal (right side of `IN` / `NOT IN`).
    List(Vec<Value>),
    /// A `limit`.
    Limit(u64),
    /// A `start` cursor: the cursor row's values for the ordering columns, in ordering order.
    Start {
        /// Values of the ordering columns (null where the cursor row lacks the column).
        key: Vec<Value>,
        /// Whether the cursor row itself is excluded.
        exclusive: bool,
    },
}

/// One side of a simple condition: a column of the row or a parameter slot.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum PredArg {
    /// Row position.
    Col(usize),
    /// Parameter slot.
    Slot(usize),
}

/// A compiled `where`.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Pred {
    /// Constant truth (empty `and` / `or`, or an EXISTS over `limit 0`).
    Const(bool),
    /// `left op right`.
    Cmp {
        /// Left side.
        left: PredArg,
        /// Operator.
        op: SimpleOp,
        /// Right-side parameter slot.
        right: usize,
    },
    /// Conjunction.
    And(Vec<Pred>),
    /// Disjunction.
    Or(Vec<Pred>),
    /// EXISTS / NOT EXISTS over `QueryShape::exists[index]`.
    Exists {
        /// Index into the level's `exists`.
        index: usize,
        /// NOT EXISTS.
        negated: bool,
    },
}

impl Pred {
    /// Whether the predicate needs a join (contains an EXISTS).
    pub fn has_exists(&self) -> bool {
        match self {
            Pred::Exists { .. } => true,
            Pred::And(v) | Pred::Or(v) => v.iter().any(Pred::has_exists),
            Pred::Const(_) | Pred::Cmp { .. } => false,
        }
    }
}

/// One level of a query (the root, a related child, or an EXISTS child) with slots for its
/// literals. Equal shapes share one dataflow.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct QueryShape {
    /// The table read.
    pub table: TableId,
    /// The compiled `where`, if any.
    pub filter: Option<Pred>,
    /// `(column, descending)`, completed with the primary key.
    pub order: Vec<(usize, bool)>,
    /// Slot of the `limit` ([`Param::Limit`]).
    pub limit: Option<usize>,
    /// Slot of the `start` cursor ([`Param::Start`]).
    pub start: Option<usize>,
    /// Every EXISTS of `filter`, referenced by index.
    pub exists: Vec<ExistsShape>,
    /// `related` subqueries (deduplicated by alias, last wins; permission subqueries dropped).
    pub related: Vec<RelatedShape>,
}

/// An EXISTS condition's child.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct ExistsShape {
    /// Parent key columns.
    pub parent_cols: Vec<usize>,
    /// Child key columns.
    pub child_cols: Vec<usize>,
    /// The child query (its own `limit` and `related` are not used).
    pub child: QueryShape,
    /// Child rows kept per parent key: 3, 1 for permissions, `None` (all) for `flip`.
    pub cap: Option<usize>,
    /// Whether the kept child rows are synced as witnesses (not for permission subqueries).
    pub synced: bool,
}

/// A `related` subquery.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct RelatedShape {
    /// Relationship name in the view.
    pub alias: String,
    /// A junction hop the view flattens.
    pub hidden: bool,
    /// Parent key columns.
    pub parent_cols: Vec<usize>,
    /// Child key columns.
    pub child_cols: Vec<usize>,
    /// The child query; its limit applies per parent key.
    pub child: QueryShape,
}

/// Compiles a validated AST whose ordering is completed into a shape and its parameters.
pub fn compile(ast: &Ast, cat: &Catalog) -> Result<(QueryShape, Vec<Param>), EngineError> {
    let mut c = Compiler {
        cat,
        params: Vec::new(),
    };
    let shape = c.level(ast, Level::Root)?;
    Ok((shape, c.params))
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    Root,
    Related,
    Exists,
}

struct Compiler<'a> {
    cat: &'a Catalog,
    params: Vec<Param>,
}

impl Compiler<'_> {
    fn slot(&mut self, p: Param) -> usize {
        self.params.push(p);
        self.params.len() - 1
    }

    fn level(&mut self, ast: &Ast, level: Level) -> Result<QueryShape, EngineError> {
        let table = self.cat.table(&ast.table)?;
        let mut order = Vec::new();
        for part in ast.order_by() {
            order.push((
                self.cat.column(table, part.column())?,
                part.direction() == Direction::Desc,
            ));
        }
        for &pk in &self.cat.tables[table].pk {
            if !order.iter().any(|(c, _)| *c == pk) {
                order.push((pk, false));
            }
        }
        let mut exists = Vec::new();
        let filter = match &ast.where_ {
            Some(w) => Some(self.pred(&simplify_keeping_exists(w), table, &mut exists)?),
            None => None,
        };
        let (limit, start) = if level == Level::Exists {
            (None, None)
        } else {
            let limit = ast.limit.map(|k| self.slot(Param::Limit(k)));
            let start = match &ast.start {
                Some(b) => {
                    let cols = &self.cat.tables[table].columns;
                    let key = order
                        .iter()
                        .map(|(c, _)| b.row.get(&cols[*c]).cloned().unwrap_or(Value::Null))
                        .collect();
                    Some(self.slot(Param::Start {
                        key,
                        exclusive: b.exclusive,
                    }))
                }
                None => None,
            };
            (limit, start)
        };
        let mut related: Vec<RelatedShape> = Vec::new();
        if level != Level::Exists {
            for r in ast.related() {
                if r.system == Some(System::Permissions) {
                    continue;
                }
                let alias = r.subquery.alias.clone().unwrap_or_default();
                let (parent_cols, child_cols, _) = self.correlation(table, r)?;
                let child = self.level(&r.subquery, Level::Related)?;
                related.retain(|x| x.alias != alias);
                related.push(RelatedShape {
                    alias,
                    hidden: r.hidden == Some(true),
                    parent_cols,
                    child_cols,
                    child,
                });
            }
        }
        Ok(QueryShape {
            table,
            filter,
            order,
            limit,
            start,
            exists,
            related,
        })
    }

    fn correlation(
        &self,
        parent: TableId,
        r: &CorrelatedSubquery,
    ) -> Result<(Vec<usize>, Vec<usize>, TableId), EngineError> {
        let child = self.cat.table(&r.subquery.table)?;
        let parent_cols = r
            .correlation
            .parent_field
            .iter()
            .map(|c| self.cat.column(parent, c))
            .collect::<Result<Vec<_>, _>>()?;
        let child_cols = r
            .correlation
            .child_field
            .iter()
            .map(|c| self.cat.column(child, c))
            .collect::<Result<Vec<_>, _>>()?;
        if parent_cols.is_empty() || parent_cols.len() != child_cols.len() {
            return Err(EngineError::Unsupported(
                "correlation fields must be non-empty and of equal length".into(),
            ));
        }
        Ok((parent_cols, child_cols, child))
    }

    fn pred(
        &mut self,
        cond: &Condition,
        table: TableId,
        exists: &mut Vec<ExistsShape>,
    ) -> Result<Pred, EngineError> {
        Ok(match cond {
            Condition::And { conditions } if conditions.is_empty() => Pred::Const(true),
            Condition::Or { conditions } if conditions.is_empty() => Pred::Const(false),
            Condition::And { conditions } => Pred::And(
                conditions
                    .iter()
                    .map(|c| self.pred(c, table, exists))
                    .collect::<Result<_, _>>()?,
            ),
            Condition::Or { conditions } => Pred::Or(
                conditions
                    .iter()
                    .map(|c| self.pred(c, table, exists))
                    .collect::<Result<_, _>>()?,
            ),
            Condition::Simple(s) => {
                let left = match &s.left {
                    ValuePosition::Column { name } => PredArg::Col(self.cat.column(table, name)?),
                    ValuePosition::Literal { value } => {
                        PredArg::Slot(self.slot(literal_param(value)))
                    }
                    ValuePosition::Static(_) => {
                        return Err(EngineError::Unsupported(
                            "static parameters must be bound before the query is added".into(),
                        ));
                    }
                };
                let right = match &s.right {
                    Operand::Literal { value } => self.slot(literal_param(value)),
                    Operand::Static(_) => {
                        return Err(EngineError::Unsupported(
                            "static parameters must be bound before the query is added".into(),
                        ));
                    }
                };
                Pred::Cmp {
                    left,
                    op: s.op,
                    right,
                }
            }
            Condition::CorrelatedSubquery(c) => {
                let negated = c.op == ExistsOp::NotExists;
                if c.related.subquery.limit == Some(0) {
                    // Zero: an EXISTS over `limit 0` is constant false (NOT EXISTS true).
                    return Ok(Pred::Const(negated));
                }
                let (parent_cols, child_cols, _) = self.correlation(table, &c.related)?;
                let child = self.level(&c.related.subquery, Level::Exists)?;
                let permissions = c.related.system == Some(System::Permissions);
                let cap = if permissions {
                    Some(PERMISSIONS_EXISTS_LIMIT)
                } else if c.flip == Some(true) {
                    // A flipped join keeps the subquery's own limit (per child key) and
                    // syncs every child it keeps.
                    c.related
                        .subquery
                        .limit
                        .map(|k| usize::try_from(k).unwrap_or(usize::MAX))
                } else {
                    Some(EXISTS_LIMIT)
                };
                exists.push(ExistsShape {
                    parent_cols,
                    child_cols,
                    child,
                    cap,
                    synced: !permissions,
                });
                Pred::Exists {
                    index: exists.len() - 1,
                    negated,
                }
            }
        })
    }
}

/// [`simplify_condition`], unless folding a constant (`or(.., true)`, `and(.., false)`) would
/// drop an EXISTS whose witnesses are synced: Zero joins every EXISTS of a `where`, whatever
/// the truth of its branch, and syncs its witnesses for every output row. Such a condition is
/// compiled as written (constants become [`Pred::Const`]).
fn simplify_keeping_exists(w: &Condition) -> Condition {
    fn synced_exists(c: &Condition) -> usize {
        match c {
            Condition::Simple(_) => 0,
            Condition::And { conditions } | Condition::Or { conditions } => {
                conditions.iter().map(synced_exists).sum()
            }
            Condition::CorrelatedSubquery(c) => usize::from(
                c.related.system != Some(System::Permissions)
                    && c.related.subquery.limit != Some(0),
            ),
        }
    }
    let simplified = simplify_condition(w);
    if synced_exists(&simplified) == synced_exists(w) {
        simplified
    } else {
        w.clone()
    }
}

fn literal_param(v: &LiteralValue) -> Param {
    match v {
        LiteralValue::Scalar(v) => Param::Value(v.clone()),
        LiteralValue::Array(items) => Param::List(items.clone()),
    }
}
