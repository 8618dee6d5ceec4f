//! A from-scratch evaluator of ZQL over in-memory rows, and Zero's hierarchical view format.
//!
//! It serves two purposes. It is the oracle of the tests (the maintained result must equal
//! [`evaluate`] over the accumulated tables at every version), and it builds
//! [`crate::Engine::view`]: the client rebuilds its view by running the query over the rows it
//! was sent, and the engine does the same over an instance's synced rows.
//!
//! It reads the AST directly (column names, not compiled slots), so it shares only the
//! row-level operator semantics of [`crate::expr`] with the dataflow.

use std::collections::{BTreeSet, HashMap};

use zero_queries::ast::{
    Ast, Condition, CorrelatedSubquery, CorrelatedSubqueryCondition, Direction, ExistsOp,
    LiteralValue, Operand, System, ValuePosition,
};
use zero_queries::{Row, Value};

use crate::expr::{LikeCache, SortKey, SortPart, eval_op};
use crate::plan::{Catalog, EXISTS_LIMIT, Param, TableId};

/// Rows by table, the input of the evaluator.
#[derive(Debug, Clone, Default)]
pub struct Tables {
    /// Rows of each table, by [`TableId`].
    pub rows: Vec<Vec<Row>>,
}

/// A result row with its relationships, as the client's view holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The table of the row.
    pub table: TableId,
    /// The row.
    pub row: Row,
    /// `related` children by alias, in query order; `bool` marks a hidden junction hop.
    pub related: Vec<(String, bool, Vec<Node>)>,
}

/// The result of a query: its view tree and the set of rows Zero would sync for it.
#[derive(Debug, Clone, Default)]
pub struct Evaluated {
    /// Root rows in query order.
    pub nodes: Vec<Node>,
    /// Every synced row: the view's rows plus EXISTS witnesses (not permission subqueries).
    pub synced: BTreeSet<(TableId, Row)>,
}

/// Evaluates `ast` (validated, with completed orderings) over `tables`.
pub fn evaluate(cat: &Catalog, ast: &Ast, tables: &Tables) -> Evaluated {
    let mut ev = Evaluator {
        cat,
        tables,
        index: HashMap::new(),
        likes: LikeCache::default(),
    };
    let Some(table) = cat.table_id(&ast.table) else {
        return Evaluated::default();
    };
    let cand: Vec<Row> = tables.rows.get(table).cloned().unwrap_or_default();
    let rows = ev.select(ast, table, cand, false);
    let mut synced = BTreeSet::new();
    let nodes = rows
        .into_iter()
        .map(|r| ev.node(ast, table, r, &mut synced, false))
        .collect();
    Evaluated { nodes, synced }
}

/// Zero's view format: an array of row objects; each relationship is an array under its alias,
/// and a hidden junction hop is replaced by the rows below it.
pub fn view_json(cat: &Catalog, nodes: &[Node]) -> serde_json::Value {
    serde_json::Value::Array(nodes.iter().map(|n| node_json(cat, n)).collect())
}

fn node_json(cat: &Catalog, n: &Node) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    for (name, v) in cat.tables[n.table].columns.iter().zip(n.row.iter()) {
        obj.insert(name.clone(), v.to_json());
    }
    for (alias, hidden, children) in &n.related {
        let items: Vec<serde_json::Value> = if *hidden {
            children
                .iter()
                .flat_map(|j| j.related.iter().flat_map(|(_, _, gc)| gc.iter()))
                .map(|g| node_json(cat, g))
                .collect()
        } else {
            children.iter().map(|c| node_json(cat, c)).collect()
        };
        obj.insert(alias.clone(), serde_json::Value::Array(items));
    }
    serde_json::Value::Object(obj)
}

/// Rows of one table grouped by the values of some columns.
type RowsByKey = HashMap<Vec<Value>, Vec<Row>>;

struct Evaluator<'a> {
    cat: &'a Catalog,
    tables: &'a Tables,
    index: HashMap<(TableId, Vec<usize>), RowsByKey>,
    likes: LikeCache,
}

fn col(cat: &Catalog, t: TableId, name: &str) -> usize {
    cat.tables[t]
        .columns
        .iter()
        .position(|c| c == name)
        .expect("the AST was validated against the schema")
}

impl Evaluator<'_> {
    fn order(&self, ast: &Ast, t: TableId) -> Vec<(usize, bool)> {
        ast.order_by()
            .iter()
            .map(|p| {
                (
                    col(self.cat, t, p.column()),
                    p.direction() == Direction::Desc,
                )
            })
            .collect()
    }

    fn sort(&self, ast: &Ast, t: TableId, rows: &mut [Row]) {
        let order = self.order(ast, t);
        rows.sort_by_cached_key(|r| key(&order, r));
    }

    /// Children of `row` through `r` (null keys never match), unfiltered.
    fn children(&mut self, parent: TableId, row: &Row, r: &CorrelatedSubquery) -> Vec<Row> {
        let child = self
            .cat
            .table_id(&r.subquery.table)
            .expect("validated table");
        let pc: Vec<usize> = r
            .correlation
            .parent_field
            .iter()
            .map(|c| col(self.cat, parent, c))
            .collect();
        let cc: Vec<usize> = r
            .correlation
            .child_field
            .iter()
            .map(|c| col(self.cat, child, c))
            .collect();
        let mut k = Vec::new();
        for c in pc {
            if row.is_null(c) {
                return Vec::new();
            }
            k.push(row.get(c));
        }
        let tables = self.tables;
        let idx = self.index.entry((child, cc.clone())).or_insert_with(|| {
            let mut m: HashMap<Vec<Value>, Vec<Row>> = HashMap::new();
            for r in tables.rows.get(child).into_iter().flatten() {
                m.entry(cc.iter().map(|&c| r.get(c)).collect())
                    .or_default()
                    .push(r.clone());
            }
            m
        });
        idx.get(&k).cloned().unwrap_or_default()
    }

    /// start → where → order → limit over candidate rows (`exists`: no start, no limit).
    fn select(&mut self, ast: &Ast, t: TableId, cand: Vec<Row>, exists: bool) -> Vec<Row> {
        let order = self.order(ast, t);
        let mut rows: Vec<Row> = Vec::new();
        for r in cand {
            if !exists && let Some(b) = &ast.start {
                let cols = &self.cat.tables[t].columns;
                let bound: SortKey = order
                    .iter()
                    .map(|&(c, desc)| {
                        part(b.row.get(&cols[c]).cloned().unwrap_or(Value::Null), desc)
                    })
                    .collect();
                let o = key(&order, &r).cmp(&bound);
                let keep = if b.exclusive { o.is_gt() } else { o.is_ge() };
                if !keep {
                    continue;
                }
            }
            if let Some(w) = &ast.where_
                && !self.cond(w, t, &r)
            {
                continue;
            }
            rows.push(r);
        }
        self.sort(ast, t, &mut rows);
        if !exists && let Some(k) = ast.limit {
            rows.truncate(usize::try_from(k).unwrap_or(usize::MAX));
        }
        rows
    }

    fn exists_children(
        &mut self,
        c: &CorrelatedSubqueryCondition,
        t: TableId,
        row: &Row,
    ) -> Vec<Row> {
        if c.related.subquery.limit == Some(0) {
            return Vec::new();
        }
        let child = self
            .cat
            .table_id(&c.related.subquery.table)
            .expect("validated table");
        let cand = self.children(t, row, &c.related);
        self.select(&c.related.subquery, child, cand, true)
    }

    fn cond(&mut self, c: &Condition, t: TableId, row: &Row) -> bool {
        match c {
            Condition::And { conditions } => conditions.iter().all(|c| self.cond(c, t, row)),
            Condition::Or { conditions } => conditions.iter().any(|c| self.cond(c, t, row)),
            Condition::Simple(s) => {
                let lhs = match &s.left {
                    ValuePosition::Column { name } => row.get(col(self.cat, t, name)),
                    ValuePosition::Literal { value } => match value {
                        LiteralValue::Scalar(v) => v.clone(),
                        LiteralValue::Array(_) => {
                            return matches!(
                                s.op,
                                zero_queries::ast::SimpleOp::Ne
                                    | zero_queries::ast::SimpleOp::IsNot
                                    | zero_queries::ast::SimpleOp::NotIn
                            );
                        }
                    },
                    ValuePosition::Static(_) => return false,
                };
                let rhs = match &s.right {
                    Operand::Literal {
                        value: LiteralValue::Scalar(v),
                    } => Param::Value(v.clone()),
                    Operand::Literal {
                        value: LiteralValue::Array(items),
                    } => Param::List(items.clone()),
                    Operand::Static(_) => return false,
                };
                eval_op(s.op, &lhs, &rhs, &mut self.likes)
            }
            Condition::CorrelatedSubquery(c) => {
                let found = !self.exists_children(c, t, row).is_empty();
                found == (c.op == ExistsOp::Exists)
            }
        }
    }

    /// A synced row with its witnesses (recorded in `synced`) and its related children.
    fn node(
        &mut self,
        ast: &Ast,
        t: TableId,
        row: Row,
        synced: &mut BTreeSet<(TableId, Row)>,
        witness: bool,
    ) -> Node {
        synced.insert((t, row.clone()));
        let mut conds = Vec::new();
        if let Some(w) = &ast.where_ {
            gather(w, &mut conds);
        }
        for c in conds {
            if c.related.system == Some(System::Permissions) {
                continue;
            }
            let child = self
                .cat
                .table_id(&c.related.subquery.table)
                .expect("validated table");
            let mut kids = self.exists_children(c, t, &row);
            let cap = if c.flip == Some(true) {
                c.related
                    .subquery
                    .limit
                    .map_or(usize::MAX, |k| usize::try_from(k).unwrap_or(usize::MAX))
            } else {
                EXISTS_LIMIT
            };
            kids.truncate(cap);
            for k in kids {
                self.node(&c.related.subquery, child, k, synced, true);
            }
        }
        let mut related: Vec<(String, bool, Vec<Node>)> = Vec::new();
        if !witness {
            for r in ast.related() {
                if r.system == Some(System::Permissions) {
                    continue;
                }
                let alias = r.subquery.alias.clone().unwrap_or_default();
                let child = self
                    .cat
                    .table_id(&r.subquery.table)
                    .expect("validated table");
                let cand = self.children(t, &row, r);
                let rows = self.select(&r.subquery, child, cand, false);
                let nodes = rows
                    .into_iter()
                    .map(|c| self.node(&r.subquery, child, c, synced, false))
                    .collect();
                related.retain(|(a, _, _)| *a != alias);
                related.push((alias, r.hidden == Some(true), nodes));
            }
        }
        Node {
            table: t,
            row,
            related,
        }
    }
}

fn gather<'a>(c: &'a Condition, out: &mut Vec<&'a CorrelatedSubqueryCondition>) {
    match c {
        Condition::And { conditions } | Condition::Or { conditions } => {
            for c in conditions {
                gather(c, out);
            }
        }
        Condition::CorrelatedSubquery(c) => out.push(c),
        Condition::Simple(_) => {}
    }
}

fn part(v: Value, desc: bool) -> SortPart {
    if desc {
        SortPart::Desc(std::cmp::Reverse(v))
    } else {
        SortPart::Asc(v)
    }
}

fn key(order: &[(usize, bool)], row: &Row) -> SortKey {
    order.iter().map(|&(c, d)| part(row.get(c), d)).collect()
}
