//! Renders a [`QueryShape`] into differential-dataflow operators, once per template.
//!
//! Every collection inside a template carries the query *instance* ([`Q`]) it belongs to, so
//! one dataflow serves every parameter row of its shape. The instance carries its parameters,
//! which filter closures and top-k read directly: a literal, a limit or a start cursor is data,
//! not code.
//!
//! Per level (root, related child, EXISTS child) the pipeline is Zero's: candidates →
//! `start` → `where` (pure conjuncts as one filter, EXISTS as (anti)semijoins) → `limit` per
//! group → output, then the synced rows hanging off the output: EXISTS witnesses (first
//! [`crate::plan::EXISTS_LIMIT`] children per parent in the child's order) and `related`
//! children. Tables are only ever read through shared arrangements: the root through an
//! equality index (or the whole-table index), every child through its correlation index.

use std::collections::HashMap;
use std::sync::Arc;

use differential_dataflow::VecCollection;
use differential_dataflow::operators::arrange::{Arranged, ShutdownButton, TraceAgent};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::wrappers::frontier::TraceFrontier;
use serde::{Deserialize, Serialize};
use timely::dataflow::Scope;
use timely::dataflow::operators::CapabilitySet;
use timely::progress::Antichain;
use zero_queries::ast::SimpleOp;
use zero_queries::{Row, Value};

use crate::expr::{LikeCache, SortKey, after_start, eval_pred, sort_key};
use crate::plan::{Operand2, Param, Pred, QueryShape, TableId};

/// Dataflow time: the engine's version counter.
pub(crate) type Time = u64;
/// Multiplicity of an update.
pub(crate) type Diff = isize;
/// An index key: the values of the indexed columns (empty for the whole-table index).
pub(crate) type Key = Arc<[Value]>;
/// A shared arrangement of one table by some columns; values are whole rows.
pub(crate) type IndexTrace = TraceAgent<ValSpine<Key, Row, Time, Diff>>;
/// Identifies an index: the table and the key columns.
pub(crate) type IndexId = (TableId, Vec<usize>);
type Imported<'s> = Arranged<'s, TraceFrontier<IndexTrace>>;
type Coll<'s, D> = VecCollection<'s, Time, D, Diff>;
/// One output record: the instance id, the table, the row.
pub(crate) type OutRec = (u64, TableId, Row);

/// A query instance of a template: its id and parameter values.
///
/// Equality, order and hash use the id only: ids are unique, and comparing parameters on every
/// join and reduce would be wasted work.
#[derive(Debug, Serialize, Deserialize)]
pub(crate) struct Inst {
    /// Unique across the engine.
    pub(crate) id: u64,
    /// Values for the template's slots.
    pub(crate) params: Vec<Param>,
}

impl PartialEq for Inst {
    fn eq(&self, other: &Self) -> bool {
        self.id == other.id
    }
}
impl Eq for Inst {}
impl PartialOrd for Inst {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for Inst {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        self.id.cmp(&other.id)
    }
}
impl std::hash::Hash for Inst {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.id.hash(state);
    }
}

/// Shared handle to an instance; cheap to copy through the dataflow.
pub(crate) type Q = Arc<Inst>;

/// Presses an import's shutdown button when dropped (DD 0.26 has no `press_on_drop`), so that
/// dropping a template releases its hold on the shared arrangements.
pub(crate) struct PressOnDrop(pub(crate) ShutdownButton<CapabilitySet<Time>>);

impl Drop for PressOnDrop {
    fn drop(&mut self) {
        self.0.press();
    }
}

/// The key of `row` on `cols`, or `None` if any value is null (a null key never matches).
pub(crate) fn key_of(row: &[Value], cols: &[usize]) -> Option<Key> {
    let mut k = Vec::with_capacity(cols.len());
    for &c in cols {
        if row[c].is_null() {
            return None;
        }
        k.push(row[c].clone());
    }
    Some(Arc::from(k))
}

/// The top-level `col = $slot` or `col IN $slot` conjunct used to seek the root table's index.
pub(crate) fn driving(shape: &QueryShape) -> Option<(usize, usize)> {
    fn find(p: &Pred) -> Option<(usize, usize)> {
        match p {
            Pred::Cmp {
                left: Operand2::Col(c),
                op: SimpleOp::Eq | SimpleOp::In,
                right,
            } => Some((*c, *right)),
            Pred::And(v) => v.iter().find_map(find),
            _ => None,
        }
    }
    shape.filter.as_ref().and_then(find)
}

/// Every index a template reads, so the worker can create missing ones before rendering.
pub(crate) fn needed_indexes(shape: &QueryShape) -> Vec<IndexId> {
    fn children(shape: &QueryShape, out: &mut Vec<IndexId>) {
        for e in &shape.exists {
            out.push((e.child.table, e.child_cols.clone()));
            children(&e.child, out);
        }
        for r in &shape.related {
            out.push((r.child.table, r.child_cols.clone()));
            children(&r.child, out);
        }
    }
    let mut out = vec![match driving(shape) {
        Some((col, _)) => (shape.table, vec![col]),
        None => (shape.table, vec![]),
    }];
    children(shape, &mut out);
    out.sort();
    out.dedup();
    out
}

/// How many rows an instance keeps per group.
type LimitFn = Box<dyn Fn(&Inst) -> usize>;

/// The rows a level produced, and its EXISTS children (kept for witnesses).
struct LevelOut<'s> {
    rows: Coll<'s, (Q, Row)>,
    exists: Vec<Option<ExistsOut<'s>>>,
}

struct ExistsOut<'s> {
    /// Child rows kept per parent key (the witness cap), keyed by `(instance, child key)`.
    capped: Coll<'s, ((Q, Key), Row)>,
    child: LevelOut<'s>,
}

/// Rendering context of one template dataflow.
pub(crate) struct Ctx<'s, 'a> {
    scope: Scope<'s, Time>,
    indexes: &'a mut HashMap<IndexId, IndexTrace>,
    as_of: Antichain<Time>,
    /// Import buttons; the template keeps them until it is dropped.
    pub(crate) buttons: Vec<PressOnDrop>,
    imported: HashMap<IndexId, Imported<'s>>,
}

impl<'s, 'a> Ctx<'s, 'a> {
    /// A context importing shared indexes as of `as_of` (the last sealed version).
    pub(crate) fn new(
        scope: Scope<'s, Time>,
        indexes: &'a mut HashMap<IndexId, IndexTrace>,
        as_of: Time,
    ) -> Self {
        Ctx {
            scope,
            indexes,
            as_of: Antichain::from_elem(as_of),
            buttons: Vec::new(),
            imported: HashMap::new(),
        }
    }

    fn import(&mut self, id: &IndexId) -> Imported<'s> {
        if let Some(a) = self.imported.get(id) {
            return a.clone();
        }
        let trace = self
            .indexes
            .get_mut(id)
            .expect("the worker creates every needed index before rendering");
        let (arr, button) = trace.import_frontier_core(
            self.scope,
            &format!("Import({id:?})"),
            self.as_of.clone(),
            Antichain::new(),
        );
        self.buttons.push(PressOnDrop(button));
        self.imported.insert(id.clone(), arr.clone());
        arr
    }

    /// Renders the whole query for the instances in `params`; the output holds every synced
    /// row of every instance, once per path that reaches it.
    pub(crate) fn render(&mut self, shape: &QueryShape, params: Coll<'s, Q>) -> Coll<'s, OutRec> {
        let cand = self.scan(shape, params);
        let level = self.level(shape, cand, &[], None);
        let mut outs = Vec::new();
        let rows = level.rows.clone();
        self.emit(shape, &level, rows, &mut outs);
        differential_dataflow::collection::concatenate(self.scope, outs)
    }

    /// Root candidates: the rows matching the driving equality, or the whole table.
    fn scan(&mut self, shape: &QueryShape, params: Coll<'s, Q>) -> Coll<'s, (Q, Row)> {
        match driving(shape) {
            Some((col, slot)) => {
                let index = self.import(&(shape.table, vec![col]));
                params
                    .flat_map(move |q: Q| {
                        let mut keys: Vec<Value> = match &q.params[slot] {
                            Param::Value(v) if !v.is_null() => vec![v.clone()],
                            Param::List(items) => items.clone(),
                            _ => vec![],
                        };
                        keys.sort();
                        keys.dedup();
                        keys.into_iter()
                            .map(move |k| (Arc::from(vec![k]), Arc::clone(&q)))
                            .collect::<Vec<_>>()
                    })
                    .arrange_by_key()
                    .join_core(index, |_k, q: &Q, row: &Row| {
                        Some((Arc::clone(q), Arc::clone(row)))
                    })
            }
            None => {
                let index = self.import(&(shape.table, vec![]));
                let empty: Key = Arc::from(Vec::new());
                params
                    .map(move |q| (Arc::clone(&empty), q))
                    .arrange_by_key()
                    .join_core(index, |_k, q: &Q, row: &Row| {
                        Some((Arc::clone(q), Arc::clone(row)))
                    })
            }
        }
    }

    /// Child rows of `table` whose `cols` equal one of `keys` (null keys never match).
    fn lookup(
        &mut self,
        keys: Coll<'s, (Q, Key)>,
        table: TableId,
        cols: &[usize],
    ) -> Coll<'s, (Q, Row)> {
        let index = self.import(&(table, cols.to_vec()));
        keys.distinct()
            .map(|(q, k)| (k, q))
            .arrange_by_key()
            .join_core(index, |_k, q: &Q, row: &Row| {
                Some((Arc::clone(q), Arc::clone(row)))
            })
    }

    /// Applies `start`, `where` and the limit (per `group` key) to candidate rows.
    fn level(
        &mut self,
        shape: &QueryShape,
        cand: Coll<'s, (Q, Row)>,
        group: &[usize],
        cap: Option<usize>,
    ) -> LevelOut<'s> {
        let mut rows = cand;
        if let Some(slot) = shape.start {
            let order = shape.order.clone();
            rows = rows.filter(move |(q, row)| after_start(&order, row, &q.params[slot]));
        }
        let mut exists = (0..shape.exists.len()).map(|_| None).collect();
        if let Some(p) = &shape.filter {
            rows = self.apply(shape, rows, p, &mut exists);
        }
        let k: Option<LimitFn> = match (shape.limit, cap) {
            (_, Some(c)) => Some(Box::new(move |_| c)),
            (Some(slot), None) => Some(Box::new(move |q: &Inst| match q.params[slot] {
                Param::Limit(k) => usize::try_from(k).unwrap_or(usize::MAX),
                _ => usize::MAX,
            })),
            (None, None) => None,
        };
        if let Some(k) = k {
            let g = group.to_vec();
            let keyed = rows.map(move |(q, row)| {
                let key: Key = g.iter().map(|&c| row[c].clone()).collect();
                ((q, key), row)
            });
            rows = top_k(keyed, shape.order.clone(), k).map(|((q, _), row)| (q, row));
        }
        LevelOut { rows, exists }
    }

    fn apply(
        &mut self,
        shape: &QueryShape,
        input: Coll<'s, (Q, Row)>,
        pred: &Pred,
        exists: &mut Vec<Option<ExistsOut<'s>>>,
    ) -> Coll<'s, (Q, Row)> {
        if !pred.has_exists() {
            let p = pred.clone();
            let mut likes = LikeCache::default();
            return input.filter(move |(q, row)| eval_pred(&p, row, &q.params, &mut likes));
        }
        match pred {
            Pred::And(parts) => {
                let (pure, joins): (Vec<&Pred>, Vec<&Pred>) =
                    parts.iter().partition(|p| !p.has_exists());
                let mut cur = input;
                if !pure.is_empty() {
                    let p = Pred::And(pure.into_iter().cloned().collect());
                    cur = self.apply(shape, cur, &p, exists);
                }
                for p in joins {
                    cur = self.apply(shape, cur, p, exists);
                }
                cur
            }
            Pred::Or(parts) => {
                let branches: Vec<_> = parts
                    .iter()
                    .map(|p| self.apply(shape, input.clone(), p, exists))
                    .collect();
                differential_dataflow::collection::concatenate(self.scope, branches).distinct()
            }
            Pred::Exists { index, negated } => {
                let es = &shape.exists[*index];
                let pc = es.parent_cols.clone();
                let keys = input
                    .clone()
                    .flat_map(move |(q, row)| key_of(&row, &pc).map(|k| (q, k)));
                let cand = self.lookup(keys, es.child.table, &es.child_cols);
                let child = self.level(&es.child, cand, &es.child_cols, es.cap);
                let cc = es.child_cols.clone();
                let capped = child.rows.clone().map(move |(q, row)| {
                    let k: Key = cc.iter().map(|&c| row[c].clone()).collect();
                    ((q, k), row)
                });
                let child_keys = capped.clone().map(|(qk, _)| qk).distinct();
                let pc = es.parent_cols.clone();
                let keyed = input.map(move |(q, row)| {
                    // A null key becomes a key no child has: EXISTS fails, NOT EXISTS passes.
                    let k = key_of(&row, &pc).unwrap_or_else(|| Arc::from(vec![Value::Null]));
                    ((q, k), row)
                });
                let out = if *negated {
                    keyed.antijoin(child_keys)
                } else {
                    keyed.semijoin(child_keys)
                };
                exists[*index] = Some(ExistsOut { capped, child });
                out.map(|((q, _), row)| (q, row))
            }
            Pred::Const(_) | Pred::Cmp { .. } => unreachable!("has_exists is false for these"),
        }
    }

    /// Outputs `out` (the rows of this level that are synced) and everything hanging off them.
    fn emit(
        &mut self,
        shape: &QueryShape,
        level: &LevelOut<'s>,
        out: Coll<'s, (Q, Row)>,
        outs: &mut Vec<Coll<'s, OutRec>>,
    ) {
        let table = shape.table;
        outs.push(out.clone().map(move |(q, row)| (q.id, table, row)));
        for (i, es) in shape.exists.iter().enumerate() {
            let Some(eo) = &level.exists[i] else { continue };
            if !es.synced {
                continue;
            }
            let pc = es.parent_cols.clone();
            let parent_keys = out
                .clone()
                .flat_map(move |(q, row)| key_of(&row, &pc).map(|k| (q, k)))
                .distinct();
            let witnesses = eo
                .capped
                .clone()
                .semijoin(parent_keys)
                .map(|((q, _), row)| (q, row));
            self.emit(&es.child, &eo.child, witnesses, outs);
        }
        for rel in &shape.related {
            let pc = rel.parent_cols.clone();
            let keys = out
                .clone()
                .flat_map(move |(q, row)| key_of(&row, &pc).map(|k| (q, k)));
            let cand = self.lookup(keys, rel.child.table, &rel.child_cols);
            let child = self.level(&rel.child, cand, &rel.child_cols, None);
            let rows = child.rows.clone();
            self.emit(&rel.child, &child, rows, outs);
        }
    }
}

/// The first `k(instance)` rows of each group in ORDER BY order, by `reduce`: correct for any
/// group, O(group) work per change in the group.
fn top_k<'s>(
    input: Coll<'s, ((Q, Key), Row)>,
    order: Vec<(usize, bool)>,
    k: LimitFn,
) -> Coll<'s, ((Q, Key), Row)> {
    input
        .map(move |(g, row)| (g, (sort_key(&order, &row), row)))
        .reduce(
            move |g: &(Q, Key),
                  vals: &[(&(SortKey, Row), Diff)],
                  out: &mut Vec<((SortKey, Row), Diff)>| {
                let mut left = isize::try_from(k(&g.0)).unwrap_or(isize::MAX);
                for (v, c) in vals {
                    if left <= 0 {
                        break;
                    }
                    if *c > 0 {
                        let take = (*c).min(left);
                        out.push(((*v).clone(), take));
                        left -= take;
                    }
                }
            },
        )
        .map(|(g, (_, row))| (g, row))
}
