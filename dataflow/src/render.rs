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

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use differential_dataflow::operators::arrange::{Arranged, ShutdownButton, TraceAgent};
use differential_dataflow::trace::cursor::cursor_list;
use differential_dataflow::trace::implementations::{KeyBuilder, KeySpine};
use differential_dataflow::trace::wrappers::frontier::TraceFrontier;
use differential_dataflow::trace::{Cursor, Navigable, TraceReader};
use differential_dataflow::{AsCollection, Hashable, VecCollection};
use serde::{Deserialize, Serialize};
use timely::dataflow::Scope;
use timely::dataflow::channels::pact::{Exchange, Pipeline};
use timely::dataflow::operators::{CapabilitySet, Operator};
use timely::progress::Antichain;
use timely::progress::frontier::AntichainRef;
use zero_queries::ast::SimpleOp;
use zero_queries::{Row, Value};

use crate::expr::{
    LikeCache, SortKey, after_start, compare_key_row, compare_rows, eval_pred, sort_key,
    start_bound,
};
use crate::lean::{LeanBatcher, LeanSpine};
use crate::plan::{Param, Pred, PredArg, QueryShape, TableId};

/// Dataflow time: the engine's version counter.
pub(crate) type Time = u64;
/// Multiplicity of an update.
pub(crate) type Diff = isize;
/// An index key: the values of the indexed columns (empty for the whole-table index), packed
/// in 24 bytes, so an index entry allocates nothing beyond the row it shares.
pub(crate) type Key = zero_queries::RowKey;
/// A shared arrangement of one table by some columns; values are whole rows.
pub(crate) type IndexTrace = TraceAgent<LeanSpine<Row>>;
/// Identifies an index: the table and the key columns.
pub(crate) type IndexId = (TableId, Vec<usize>);
/// A shared arrangement whose values under each key are rows in ORDER BY order, so a top-k
/// is a prefix scan.
pub(crate) type SortedTrace = TraceAgent<LeanSpine<SortedRow>>;

/// A row of a sorted index. It orders by the index's ordering (then by the whole row, which
/// only tells apart two versions of one row), read from the row itself: storing a copy of
/// the sort columns beside every row cost three times the row pointer.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct SortedRow {
    /// The index's ordering, shared by all its rows (behind a thin pointer: one per row).
    pub(crate) order: Arc<Vec<(usize, bool)>>,
    /// The row.
    pub(crate) row: Row,
}

impl Ord for SortedRow {
    fn cmp(&self, other: &Self) -> std::cmp::Ordering {
        compare_rows(&self.order, &self.row, &other.row).then_with(|| self.row.cmp(&other.row))
    }
}
impl PartialOrd for SortedRow {
    fn partial_cmp(&self, other: &Self) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}
impl PartialEq for SortedRow {
    fn eq(&self, other: &Self) -> bool {
        self.row == other.row
    }
}
impl Eq for SortedRow {}
impl std::hash::Hash for SortedRow {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.row.hash(state);
    }
}
/// Identifies a sorted index: table, key columns, ordering.
pub(crate) type SortedId = (TableId, Vec<usize>, Vec<(usize, bool)>);
type Imported<'s> = Arranged<'s, TraceFrontier<IndexTrace>>;
type ImportedSorted<'s> = Arranged<'s, TraceFrontier<SortedTrace>>;

/// The shared arrangements of one worker.
#[derive(Default)]
pub(crate) struct Indexes {
    /// Rows by key columns.
    pub(crate) by_key: HashMap<IndexId, IndexTrace>,
    /// Rows by key columns, sorted by an ordering under each key.
    pub(crate) sorted: HashMap<SortedId, SortedTrace>,
}
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
pub(crate) fn key_of(row: &Row, cols: &[usize]) -> Option<Key> {
    if cols.iter().any(|&c| row.is_null(c)) {
        return None;
    }
    Some(cols_key(row, cols))
}

/// The key of `row` on `cols`, nulls included (for rows that came through a lookup on
/// `cols`, whose keys are never null, and for grouping, where null is a group like any).
fn cols_key(row: &Row, cols: &[usize]) -> Key {
    cols.iter().map(|&c| row.get(c)).collect()
}

/// Joins instance-tagged keys with a shared index: the index's rows under each key, tagged
/// with each instance that asked for the key.
fn join_index<'s>(keys: Coll<'s, (Key, Q)>, index: Imported<'s>) -> Coll<'s, (Q, Row)> {
    keys.arrange_named::<LeanBatcher<Q>, LeanSpine<Q>>("ArrangeByKey", LeanBatcher::new)
        .join_core(index, |_k, q: &Q, row: &Row| {
            Some((Arc::clone(q), row.clone()))
        })
}

/// The top-level `col = $slot` or `col IN $slot` conjunct used to seek the root table's index.
pub(crate) fn driving(shape: &QueryShape) -> Option<(usize, usize)> {
    fn find(p: &Pred) -> Option<(usize, usize)> {
        match p {
            Pred::Cmp {
                left: PredArg::Col(c),
                op: SimpleOp::Eq | SimpleOp::In,
                right,
            } => Some((*c, *right)),
            Pred::And(v) => v.iter().find_map(find),
            _ => None,
        }
    }
    shape.filter.as_ref().and_then(find)
}

/// Whether the root level runs as a [`lookup_topk`]: it has a limit, and each instance reads
/// one prefix (its driving value, or the whole table) of one sorted index.
pub(crate) fn uses_lookup_topk(shape: &QueryShape, peers: usize) -> bool {
    // EXISTS conditions are evaluated by probing child indexes, which only a single worker
    // holds completely; with more workers such shapes use the join pipeline.
    shape.limit.is_some()
        && (peers == 1 || !shape.filter.as_ref().is_some_and(Pred::has_exists))
        && !seeks_one_row(shape)
}

/// Whether the driving value is the whole primary key (the ordering, which always ends with the
/// primary key, is that one column), so a seek finds at most one row: the primary-key index
/// answers it, and a sorted copy of the table (one entry per row) would only cost memory.
fn seeks_one_row(shape: &QueryShape) -> bool {
    driving_value(shape).is_some_and(|(c, _)| {
        shape.order.iter().all(|&(o, _)| o == c) && driving(shape).is_some_and(|(d, _)| d == c)
    })
}

fn sorted_id(shape: &QueryShape) -> SortedId {
    let cols = driving_value(shape).map_or_else(Vec::new, |(c, _)| vec![c]);
    (shape.table, cols, shape.order.clone())
}

/// The driving `col = $slot` conjunct (single value, not `IN`).
fn driving_value(shape: &QueryShape) -> Option<(usize, usize)> {
    fn find(p: &Pred) -> Option<(usize, usize)> {
        match p {
            Pred::Cmp {
                left: PredArg::Col(c),
                op: SimpleOp::Eq,
                right,
            } => Some((*c, *right)),
            Pred::And(v) => v.iter().find_map(find),
            _ => None,
        }
    }
    shape.filter.as_ref().and_then(find)
}

/// How a level's candidate rows are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ScanPlan {
    /// Seek the index on the driving column.
    Seek(usize),
    /// Look parents up by the keys of the candidates of `exists[i]` (a top-level, non-negated
    /// EXISTS whose child can seek): Zero's "flipped" join, chosen when it avoids a full scan.
    Flip(usize),
    /// Read the whole table.
    Full,
}

fn scan_plan(shape: &QueryShape) -> ScanPlan {
    if let Some((col, _)) = driving(shape) {
        return ScanPlan::Seek(col);
    }
    let conjuncts: Vec<&Pred> = match &shape.filter {
        Some(Pred::And(v)) => v.iter().collect(),
        Some(p) => vec![p],
        None => vec![],
    };
    for p in conjuncts {
        if let Pred::Exists {
            index,
            negated: false,
        } = p
            && scan_plan(&shape.exists[*index].child) != ScanPlan::Full
        {
            return ScanPlan::Flip(*index);
        }
    }
    ScanPlan::Full
}

fn scan_indexes(shape: &QueryShape, out: &mut Vec<IndexId>) {
    match scan_plan(shape) {
        ScanPlan::Seek(col) => out.push((shape.table, vec![col])),
        ScanPlan::Full => out.push((shape.table, vec![])),
        ScanPlan::Flip(i) => {
            let es = &shape.exists[i];
            out.push((shape.table, es.parent_cols.clone()));
            scan_indexes(&es.child, out);
        }
    }
}

/// Every index a template reads, so the worker can create missing ones before rendering.
pub(crate) fn needed_indexes(shape: &QueryShape, peers: usize) -> (Vec<IndexId>, Vec<SortedId>) {
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
    let mut out = Vec::new();
    let mut sorted = Vec::new();
    fn seeks(shape: &QueryShape, out: &mut Vec<IndexId>) {
        for e in &shape.exists {
            if let Some((col, _)) = driving_value(&e.child) {
                out.push((e.child.table, vec![col]));
            }
            seeks(&e.child, out);
        }
    }
    if uses_lookup_topk(shape, peers) {
        sorted.push(sorted_id(shape));
        seeks(shape, &mut out);
    } else {
        scan_indexes(shape, &mut out);
    }
    children(shape, &mut out);
    out.sort();
    out.dedup();
    (out, sorted)
}

/// Buckets of the first stage of a whole-instance top-k.
const TOPK_BUCKETS: u64 = 16;

/// How many rows an instance keeps per group.
type LimitFn = Arc<dyn Fn(&Inst) -> usize>;

/// The rows a level produced, and its EXISTS children (kept for witnesses: their rows are
/// the children kept per parent key, after the witness cap).
struct LevelOut<'s> {
    rows: Coll<'s, (Q, Row)>,
    exists: Vec<Option<LevelOut<'s>>>,
}

/// Distinct `(instance, key)` pairs, left arranged: a semijoin reads the arrangement that
/// `distinct` builds anyway, where `distinct()` then `semijoin` would turn it back into a
/// collection and arrange it again (two more operators per EXISTS, each costing every
/// version its share of progress tracking, and one more trace).
type KeySet<'s> = Arranged<'s, TraceAgent<KeySpine<(Q, Key), Time, Diff>>>;

fn distinct_keys<'s>(keys: Coll<'s, (Q, Key)>) -> KeySet<'s> {
    keys.arrange_by_self_named("Arrange: Distinct")
        .reduce_abelian::<_, KeyBuilder<(Q, Key), Time, Diff>, KeySpine<(Q, Key), Time, Diff>, _, _>(
            "Distinct",
            |_key, _counts, out| out.push(((), 1)),
            |buffer, key, updates| {
                buffer.clear();
                buffer.extend(updates.drain(..).map(|(v, t, r)| ((key.clone(), v), t, r)));
            },
        )
}

/// The rows of `rows` whose `(instance, key(row))` is in `keys` or, when `negated`, is not.
/// One join straight to `(instance, row)`: DD's `semijoin` / `antijoin` would also arrange
/// `keys` again and need a map back.
fn semijoin_rows<'s>(
    rows: Coll<'s, (Q, Row)>,
    key: impl Fn(&Row) -> Key + 'static,
    keys: KeySet<'s>,
    negated: bool,
) -> Coll<'s, (Q, Row)> {
    let matched = rows
        .clone()
        .map(move |(q, row)| ((q, key(&row)), row))
        .arrange_by_key()
        .join_core(keys, |(q, _), row: &Row, _| {
            Some((Arc::clone(q), row.clone()))
        });
    if negated {
        rows.concat(matched.negate())
    } else {
        matched
    }
}

/// Rendering context of one template dataflow.
pub(crate) struct Ctx<'s, 'a> {
    scope: Scope<'s, Time>,
    peers: usize,
    indexes: &'a mut Indexes,
    as_of: Antichain<Time>,
    /// Import buttons; the template keeps them until it is dropped.
    pub(crate) buttons: Vec<PressOnDrop>,
    imported: HashMap<IndexId, Imported<'s>>,
}

impl<'s, 'a> Ctx<'s, 'a> {
    /// A context importing shared indexes as of `as_of` (the last sealed version).
    pub(crate) fn new(
        scope: Scope<'s, Time>,
        indexes: &'a mut Indexes,
        as_of: Time,
        peers: usize,
    ) -> Self {
        Ctx {
            scope,
            peers,
            indexes,
            as_of: Antichain::from_elem(as_of),
            buttons: Vec::new(),
            imported: HashMap::new(),
        }
    }

    fn as_of_time(&self) -> Time {
        self.as_of.elements().first().copied().unwrap_or(0)
    }

    fn import(&mut self, id: &IndexId) -> Imported<'s> {
        if let Some(a) = self.imported.get(id) {
            return a.clone();
        }
        let trace = self
            .indexes
            .by_key
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
        let level = if uses_lookup_topk(shape, self.peers) {
            let rows = self.lookup_topk(shape, params);
            // The EXISTS conditions were decided by probing; running them again as joins over
            // the few output rows builds the children their witnesses come from.
            let mut exists = (0..shape.exists.len()).map(|_| None).collect();
            let rows = match &shape.filter {
                Some(p) if p.has_exists() => self.apply(shape, rows, p, &mut exists),
                _ => rows,
            };
            LevelOut { rows, exists }
        } else {
            let cand = self.scan(shape, params);
            self.level(shape, cand, &[], None)
        };
        let mut outs = Vec::new();
        let rows = level.rows.clone();
        self.emit(shape, &level, rows, &mut outs);
        differential_dataflow::collection::concatenate(self.scope, outs)
    }

    fn import_sorted(&mut self, id: &SortedId) -> ImportedSorted<'s> {
        let trace = self
            .indexes
            .sorted
            .get_mut(id)
            .expect("the worker creates every needed index before rendering");
        let (arr, button) = trace.import_frontier_core(
            self.scope,
            "ImportSorted",
            self.as_of.clone(),
            Antichain::new(),
        );
        self.buttons.push(PressOnDrop(button));
        arr
    }

    /// The root's top-k per instance, read from a shared sorted index (see [`lookup_topk`]).
    fn lookup_topk(&mut self, shape: &QueryShape, params: Coll<'s, Q>) -> Coll<'s, (Q, Row)> {
        let index = self.import_sorted(&sorted_id(shape));
        let mut traces = Vec::new();
        let mut touches = Vec::new();
        let level = self.probe_level(shape, &mut traces, &mut touches);
        let plan = TopKPlan {
            slot: driving_value(shape).map(|(_, s)| s),
            limit: shape.limit.expect("uses_lookup_topk requires a limit"),
            start: shape.start,
            order: shape.order.clone(),
            level,
        };
        let traces: Vec<TraceFrontier<IndexTrace>> = traces.into_iter().map(|(_, t)| t).collect();
        if touches.is_empty() {
            let plan = Arc::new(plan);
            let p = Arc::clone(&plan);
            // Parameter rows must meet the partition of the index that holds their key.
            let pact = Exchange::new(move |x: &(Left, Time, Diff)| match &x.0 {
                Left::Param(q) => p.key(q).map_or(0, |k| k.hashed()),
                Left::Touch(..) => 0,
            });
            let as_of = self.as_of_time();
            lookup_topk(params.map(Left::Param), pact, index, plan, traces, as_of)
        } else {
            let mut inputs = vec![params.map(Left::Param)];
            inputs.extend(touches);
            let left = differential_dataflow::collection::concatenate(self.scope, inputs);
            let as_of = self.as_of_time();
            lookup_topk(left, Pipeline, index, Arc::new(plan), traces, as_of)
        }
    }

    /// The EXISTS tree of `shape` for probing: imports each child index once (and the index
    /// on a child's driving column, to tell an unsatisfiable EXISTS without walking) and
    /// collects the rows at which any of them changes.
    fn probe_level(
        &mut self,
        shape: &QueryShape,
        traces: &mut Vec<(IndexId, TraceFrontier<IndexTrace>)>,
        touches: &mut Vec<Coll<'s, Left>>,
    ) -> ProbeLevel {
        let mut exists = Vec::new();
        for e in &shape.exists {
            let trace = self.probe_trace((e.child.table, e.child_cols.clone()), traces, touches);
            let mut child = self.probe_level(&e.child, traces, touches);
            if let Some((col, slot)) = driving_value(&e.child) {
                let t = self.probe_trace((e.child.table, vec![col]), traces, touches);
                child.seek = Some((t, slot));
            }
            exists.push(ProbeExists {
                parent_cols: e.parent_cols.clone(),
                trace,
                child,
            });
        }
        ProbeLevel {
            filter: shape.filter.clone(),
            exists,
            seek: None,
        }
    }

    /// Position of index `id` among the probe traces, importing it on first use.
    fn probe_trace(
        &mut self,
        id: IndexId,
        traces: &mut Vec<(IndexId, TraceFrontier<IndexTrace>)>,
        touches: &mut Vec<Coll<'s, Left>>,
    ) -> usize {
        if let Some(i) = traces.iter().position(|(i, _)| *i == id) {
            return i;
        }
        let arr = self.import(&id);
        traces.push((id, arr.trace.clone()));
        let as_of = self.as_of_time();
        touches.push(touch_rows(arr, traces.len() - 1, as_of));
        traces.len() - 1
    }

    /// Root candidates: the rows matching the driving equality, or the whole table.
    fn scan(&mut self, shape: &QueryShape, params: Coll<'s, Q>) -> Coll<'s, (Q, Row)> {
        if let ScanPlan::Flip(i) = scan_plan(shape) {
            // Drive from the EXISTS child: its candidate rows give the parent keys to look up.
            // A superset of the parents is enough; `level` applies the full condition.
            let es = &shape.exists[i];
            let children = self.scan(&es.child, params);
            return self.lookup(children, &es.child_cols, shape.table, &es.parent_cols, true);
        }
        match driving(shape) {
            Some((col, slot)) => {
                let index = self.import(&(shape.table, vec![col]));
                let keys = params.flat_map(move |q: Q| {
                    let mut keys: Vec<Value> = match &q.params[slot] {
                        Param::Value(v) if !v.is_null() => vec![v.clone()],
                        Param::List(items) => items.clone(),
                        _ => vec![],
                    };
                    keys.sort();
                    keys.dedup();
                    keys.into_iter()
                        .map(move |k| (Key::from(k), Arc::clone(&q)))
                        .collect::<Vec<_>>()
                });
                join_index(keys, index)
            }
            None => {
                let index = self.import(&(shape.table, vec![]));
                join_index(params.map(move |q| (Key::new(), q)), index)
            }
        }
    }

    /// Rows of `table` whose `cols` equal `from_cols` of a row of `from`, tagged with that
    /// row's instance (null keys never match).
    ///
    /// With `dedup`, each row comes once per instance however many parents share its key,
    /// which a limit (`top_k` counts multiplicities) needs. Without it a row counts once per
    /// parent: every other consumer only asks whether a row is there (filters, semijoins on
    /// distinct keys, the output's positive count), and skipping the `distinct` saves a
    /// reduce and two arrangements per level, on hydration and on every version.
    ///
    /// The keys are taken in the same operator that keys them for the join: every operator
    /// costs each version its share of progress tracking.
    fn lookup(
        &mut self,
        from: Coll<'s, (Q, Row)>,
        from_cols: &[usize],
        table: TableId,
        cols: &[usize],
        dedup: bool,
    ) -> Coll<'s, (Q, Row)> {
        let index = self.import(&(table, cols.to_vec()));
        let fc = from_cols.to_vec();
        let keys = from.flat_map(move |(q, row)| key_of(&row, &fc).map(|k| (k, q)));
        let keys = if dedup { keys.distinct() } else { keys };
        join_index(keys, index)
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
            (_, Some(c)) => Some(Arc::new(move |_| c)),
            (Some(slot), None) => Some(Arc::new(move |q: &Inst| match q.params[slot] {
                Param::Limit(k) => usize::try_from(k).unwrap_or(usize::MAX),
                _ => usize::MAX,
            })),
            (None, None) => None,
        };
        if let Some(k) = k {
            if group.is_empty() {
                // A whole-instance group can be large (a feed over a big table). A first stage
                // per hash bucket keeps each reduce small, so a change costs O(group / 16 + 16k)
                // instead of O(group) (Materialize's hierarchical top-k, one level).
                let first = top_k(
                    rows,
                    |row| Key::from(Value::Number((row.hashed() % TOPK_BUCKETS) as f64)),
                    shape.order.clone(),
                    Arc::clone(&k),
                );
                rows = top_k(first, |_| Key::new(), shape.order.clone(), k);
            } else {
                let g = group.to_vec();
                rows = top_k(rows, move |row| cols_key(row, &g), shape.order.clone(), k);
            }
        }
        LevelOut { rows, exists }
    }

    fn apply(
        &mut self,
        shape: &QueryShape,
        input: Coll<'s, (Q, Row)>,
        pred: &Pred,
        exists: &mut Vec<Option<LevelOut<'s>>>,
    ) -> Coll<'s, (Q, Row)> {
        self.apply_within(shape, input, pred, exists, None)
    }

    /// [`Self::apply`] below an OR whose input is `scope`. A row can pass the OR through
    /// another branch and still needs the witnesses of every EXISTS in it, so the children of
    /// an EXISTS are built for the parents in `scope` (the outermost OR's input), not only for
    /// the rows that passed the conjuncts before it.
    fn apply_within(
        &mut self,
        shape: &QueryShape,
        input: Coll<'s, (Q, Row)>,
        pred: &Pred,
        exists: &mut Vec<Option<LevelOut<'s>>>,
        scope: Option<&Coll<'s, (Q, Row)>>,
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
                    cur = self.apply_within(shape, cur, &p, exists, scope);
                }
                for p in joins {
                    cur = self.apply_within(shape, cur, p, exists, scope);
                }
                cur
            }
            Pred::Or(parts) => {
                let scope = scope.cloned().unwrap_or_else(|| input.clone());
                let branches: Vec<_> = parts
                    .iter()
                    .map(|p| self.apply_within(shape, input.clone(), p, exists, Some(&scope)))
                    .collect();
                differential_dataflow::collection::concatenate(self.scope, branches).distinct()
            }
            Pred::Exists { index, negated } => {
                let es = &shape.exists[*index];
                let parents = scope.unwrap_or(&input).clone();
                let dedup = es.cap.is_some() || es.child.limit.is_some();
                let cand = self.lookup(
                    parents,
                    &es.parent_cols,
                    es.child.table,
                    &es.child_cols,
                    dedup,
                );
                let child = self.level(&es.child, cand, &es.child_cols, es.cap);
                let cc = es.child_cols.clone();
                let child_keys = distinct_keys(
                    child
                        .rows
                        .clone()
                        .map(move |(q, row)| (q, cols_key(&row, &cc))),
                );
                let pc = es.parent_cols.clone();
                // A null key becomes a key no child has: EXISTS fails, NOT EXISTS passes.
                let key =
                    move |row: &Row| key_of(row, &pc).unwrap_or_else(|| Key::from(Value::Null));
                exists[*index] = Some(child);
                semijoin_rows(input, key, child_keys, *negated)
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
            let Some(child) = &level.exists[i] else {
                continue;
            };
            if !es.synced {
                continue;
            }
            let pc = es.parent_cols.clone();
            let parent_keys = distinct_keys(
                out.clone()
                    .flat_map(move |(q, row)| key_of(&row, &pc).map(|k| (q, k))),
            );
            let cc = es.child_cols.clone();
            let key = move |row: &Row| cols_key(row, &cc);
            let witnesses = semijoin_rows(child.rows.clone(), key, parent_keys, false);
            self.emit(&es.child, child, witnesses, outs);
        }
        for rel in &shape.related {
            let dedup = rel.child.limit.is_some();
            let cand = self.lookup(
                out.clone(),
                &rel.parent_cols,
                rel.child.table,
                &rel.child_cols,
                dedup,
            );
            let child = self.level(&rel.child, cand, &rel.child_cols, None);
            let rows = child.rows.clone();
            self.emit(&rel.child, &child, rows, outs);
        }
    }
}

/// The first `k(instance)` rows of each group (`group(row)` within an instance) in ORDER BY
/// order, by `reduce`: correct for any group, O(group) work per change in the group.
fn top_k<'s>(
    input: Coll<'s, (Q, Row)>,
    group: impl Fn(&Row) -> Key + 'static,
    order: Vec<(usize, bool)>,
    k: LimitFn,
) -> Coll<'s, (Q, Row)> {
    input
        .map(move |(q, row)| ((q, group(&row)), (sort_key(&order, &row), row)))
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
        .map(|((q, _), (_, row))| (q, row))
}

/// What [`lookup_topk`] needs to know about the root level.
struct TopKPlan {
    /// Slot of the driving value; `None` reads the whole-table key.
    slot: Option<usize>,
    limit: usize,
    start: Option<usize>,
    order: Vec<(usize, bool)>,
    /// The filter, with its EXISTS children resolved to probe traces.
    level: ProbeLevel,
}

/// A level's filter for probing: EXISTS children are read from shared indexes by key.
struct ProbeLevel {
    filter: Option<Pred>,
    exists: Vec<ProbeExists>,
    /// For an EXISTS child with a driving `col = $slot`: the probe trace of its index on `col`
    /// and the slot, to find out cheaply that no child row can pass.
    seek: Option<(usize, usize)>,
}

/// The left input of [`lookup_topk`]: parameter rows, and rows that changed in a probed child
/// index (by probe trace), which may change the EXISTS conditions of some instances.
#[derive(Debug, Clone, Serialize, Deserialize)]
enum Left {
    Param(Q),
    Touch(usize, Row),
}

/// Touched rows beyond which every instance re-walks instead of checking each row.
const TOUCH_CHECK_LIMIT: usize = 1024;

/// Whether `row` passes `filter` ignoring its EXISTS conditions (taken as satisfiable): a
/// child row that fails this, before and after a change, cannot change the EXISTS above it.
fn could_pass(filter: Option<&Pred>, row: &Row, params: &[Param], likes: &mut LikeCache) -> bool {
    fn go(p: &Pred, row: &Row, params: &[Param], likes: &mut LikeCache) -> bool {
        if !p.has_exists() {
            return eval_pred(p, row, params, likes);
        }
        match p {
            Pred::And(v) => v.iter().all(|p| go(p, row, params, likes)),
            Pred::Or(v) => v.iter().any(|p| go(p, row, params, likes)),
            _ => true,
        }
    }
    filter.is_none_or(|p| go(p, row, params, likes))
}

/// Whether a changed row of probe trace `trace` can change what `level`'s filter decides for
/// an instance with `params`.
fn touch_matters(
    level: &ProbeLevel,
    trace: usize,
    row: &Row,
    params: &[Param],
    likes: &mut LikeCache,
) -> bool {
    level.exists.iter().any(|e| {
        let c = &e.child;
        (e.trace == trace && could_pass(c.filter.as_ref(), row, params, likes))
            || (c.seek.is_some_and(|(t, _)| t == trace)
                && could_pass(c.filter.as_ref(), row, params, likes))
            || touch_matters(c, trace, row, params, likes)
    })
}

/// False when some top-level EXISTS conjunct of `level` cannot hold for any parent: its child
/// seeks a value that no child row with the level's pure conditions has (recursively). Lets
/// an instance whose EXISTS names a missing value skip walking the whole table.
fn satisfiable(
    level: &ProbeLevel,
    params: &[Param],
    likes: &mut LikeCache,
    fetch: &mut Fetch<'_>,
) -> bool {
    let conjuncts: Vec<&Pred> = match &level.filter {
        Some(Pred::And(v)) => v.iter().collect(),
        Some(p) => vec![p],
        None => return true,
    };
    for p in conjuncts {
        let Pred::Exists {
            index,
            negated: false,
        } = p
        else {
            continue;
        };
        let child = &level.exists[*index].child;
        if let Some((t, slot)) = child.seek {
            let key: Key = match &params[slot] {
                Param::Value(v) if !v.is_null() => Key::from(v.clone()),
                _ => return false,
            };
            let rows = fetch(t, &key);
            if !rows
                .iter()
                .any(|r| could_pass(child.filter.as_ref(), r, params, likes))
            {
                return false;
            }
        }
        if !satisfiable(child, params, likes, fetch) {
            return false;
        }
    }
    true
}

struct ProbeExists {
    parent_cols: Vec<usize>,
    /// Position of the child's correlation index among the probe traces.
    trace: usize,
    child: ProbeLevel,
}

/// One update of a sorted index: the row and its multiplicity change.
type SortedUpdate = (SortedRow, Diff);

/// Reads the child rows under a key of one probe trace, as of the time being processed.
type Fetch<'a> = dyn FnMut(usize, &Key) -> Arc<Vec<Row>> + 'a;

/// Evaluates `pred` on `row`, deciding EXISTS by fetching the children through `fetch`.
fn eval_probe(
    level: &ProbeLevel,
    pred: &Pred,
    row: &Row,
    params: &[Param],
    likes: &mut LikeCache,
    fetch: &mut Fetch<'_>,
) -> bool {
    if !pred.has_exists() {
        return eval_pred(pred, row, params, likes);
    }
    match pred {
        Pred::And(v) => v
            .iter()
            .all(|p| eval_probe(level, p, row, params, likes, fetch)),
        Pred::Or(v) => v
            .iter()
            .any(|p| eval_probe(level, p, row, params, likes, fetch)),
        Pred::Exists { index, negated } => {
            let e = &level.exists[*index];
            let found = match key_of(row, &e.parent_cols) {
                None => false,
                Some(k) => {
                    let children = fetch(e.trace, &k);
                    children.iter().any(|c| {
                        e.child
                            .filter
                            .as_ref()
                            .is_none_or(|f| eval_probe(&e.child, f, c, params, likes, fetch))
                    })
                }
            };
            found != *negated
        }
        Pred::Const(_) | Pred::Cmp { .. } => unreachable!("has_exists is false for these"),
    }
}

/// The rows that change in a probed index, tagged with the probe trace: lets [`lookup_topk`]
/// notice child changes and re-walk only the instances they can affect.
fn touch_rows<'s>(arr: Imported<'s>, trace: usize, as_of: Time) -> Coll<'s, Left> {
    arr.stream
        .unary(Pipeline, "TouchRows", move |_cap, _info| {
            move |input, output| {
                input.for_each(|cap, spans| {
                    let mut rows: BTreeMap<Time, Vec<Row>> = BTreeMap::new();
                    for span in spans.iter() {
                        let Some(b) = span.inner.as_ref() else {
                            continue;
                        };
                        if snapshot_only(span.desc.upper().borrow(), as_of) {
                            continue;
                        }
                        let mut c = b.cursor();
                        while c.get_key(b).is_some() {
                            while let Some(v) = c.get_val(b) {
                                c.map_times(b, |t, _| {
                                    if *t > as_of {
                                        rows.entry(*t).or_default().push(v.clone());
                                    }
                                });
                                c.step_val(b);
                            }
                            c.step_key(b);
                        }
                    }
                    for (t, rows) in rows {
                        let cap = cap.delayed(&t, 0);
                        let mut session = output.session(&cap);
                        for r in rows {
                            session.give((Left::Touch(trace, r), t, 1 as Diff));
                        }
                    }
                });
            }
        })
        .as_collection()
}

/// The updates from window `old` to window `new`. Rows are compared by allocation: a row
/// kept in a window is the same `Arc`, and equal rows in two allocations (a row deleted and
/// inserted unchanged) give a `-1` and a `+1` that cancel downstream.
fn window_diff(old: &[Row], new: &[Row]) -> Vec<(Row, Diff)> {
    let addr = |r: &Row| r.addr();
    let olds: std::collections::HashSet<usize> = old.iter().map(addr).collect();
    let news: std::collections::HashSet<usize> = new.iter().map(addr).collect();
    let mut out = Vec::new();
    for r in old {
        if !news.contains(&addr(r)) {
            out.push((r.clone(), -1));
        }
    }
    for r in new {
        if !olds.contains(&addr(r)) {
            out.push((r.clone(), 1));
        }
    }
    out
}

/// Where `row` (equal by value) is in `window`, which is in `order`.
fn window_position(order: &[(usize, bool)], window: &[Row], row: &Row) -> Option<usize> {
    let from = window.partition_point(|w| compare_rows(order, w, row).is_lt());
    window[from..]
        .iter()
        .take_while(|w| compare_rows(order, w, row).is_eq())
        .position(|w| w == row)
        .map(|i| from + i)
}

/// Whether a batch with this upper holds only updates at or before `as_of` (an import's
/// replayed snapshot, whose times are advanced to `as_of`).
fn snapshot_only(upper: AntichainRef<'_, Time>, as_of: Time) -> bool {
    !upper.is_empty() && upper.iter().all(|u| *u <= as_of + 1)
}

impl TopKPlan {
    fn key(&self, q: &Inst) -> Option<Key> {
        match self.slot {
            None => Some(Key::new()),
            Some(s) => match &q.params[s] {
                Param::Value(v) if !v.is_null() => Some(Key::from(v.clone())),
                _ => None,
            },
        }
    }

    fn limit(&self, q: &Inst) -> usize {
        match q.params[self.limit] {
            Param::Limit(k) => usize::try_from(k).unwrap_or(usize::MAX),
            _ => usize::MAX,
        }
    }
}

/// Maintains, for each instance, the first `limit` rows under its key of a shared sorted index
/// that pass its filter and start cursor (`dataflow-design.md` §3.5 (c)).
///
/// Per instance it keeps only the rows it emitted, and it reads the index, which is shared by
/// every template, by seeking the instance's key and walking values in ORDER BY order until
/// the limit is reached: hydration costs O(limit / selectivity), not O(group). Changed rows
/// under a key update the windows of the instances interested in that key in place; an
/// instance walks again when its parameters or an EXISTS child table change, or when its full
/// window lost rows and must be refilled.
///
/// `left` carries parameter rows (`Some`) and, when the filter has EXISTS, one `None` per time
/// at which a probed child index changed; `pact` routes parameter rows to the worker holding
/// their key (probing shapes run on a single worker, so they use `Pipeline`).
fn lookup_topk<'s, P>(
    left: Coll<'s, Left>,
    pact: P,
    index: ImportedSorted<'s>,
    plan: Arc<TopKPlan>,
    mut probe_traces: Vec<TraceFrontier<IndexTrace>>,
    as_of: Time,
) -> Coll<'s, (Q, Row)>
where
    P: timely::dataflow::channels::pact::ParallelizationContract<Time, Vec<(Left, Time, Diff)>>,
{
    let mut trace = index.trace.clone();
    left.inner
        .binary_frontier(
            index.stream,
            pact,
            Pipeline,
            "LookupTopK",
            move |cap, _info| {
                let mut caps = CapabilitySet::from_elem(cap);
                // Parameter changes (`Some`) and child-index changes (`None`).
                let mut pending: Vec<(Left, Time, Diff)> = Vec::new();
                // Sort keys of the rows that changed, by time and index key.
                let mut changed: BTreeMap<Time, HashMap<Key, Vec<SortedUpdate>>> = BTreeMap::new();
                let mut live: HashMap<u64, (Q, Option<Key>, Diff)> = HashMap::new();
                let mut interest: HashMap<Key, BTreeSet<u64>> = HashMap::new();
                let mut emitted: HashMap<u64, Vec<Row>> = HashMap::new();
                let mut likes = LikeCache::default();
                move |(in1, f1), (in2, f2), output| {
                    in1.for_each(|_c, data| pending.append(data));
                    in2.for_each(|_c, spans| {
                        for span in spans.iter() {
                            let Some(b) = span.inner.as_ref() else {
                                continue;
                            };
                            // The snapshot replayed at `as_of` is read through the trace;
                            // only later updates are changes.
                            if snapshot_only(span.desc.upper().borrow(), as_of) {
                                continue;
                            }
                            let mut c = b.cursor();
                            while let Some(key) = c.get_key(b) {
                                while let Some(val) = c.get_val(b) {
                                    c.map_times(b, |t, d| {
                                        if *t <= as_of {
                                            return;
                                        }
                                        changed
                                            .entry(*t)
                                            .or_default()
                                            .entry(key.to_key())
                                            .or_default()
                                            .push((val.clone(), *d));
                                    });
                                    c.step_val(b);
                                }
                                c.step_key(b);
                            }
                        }
                    });
                    let frontier = [f1.frontier().first(), f2.frontier().first()]
                        .into_iter()
                        .map(|f| f.copied().unwrap_or(Time::MAX))
                        .min()
                        .unwrap_or(Time::MAX);
                    let mut times: BTreeSet<Time> =
                        changed.range(..frontier).map(|(t, _)| *t).collect();
                    times.extend(pending.iter().map(|(_, t, _)| *t).filter(|t| *t < frontier));
                    if !times.is_empty() {
                        let batches = trace
                            .batches_through(AntichainRef::new(&[]))
                            .expect("the index stays open while the template runs");
                        let (mut cursor, storage) = cursor_list(batches);
                        let mut probes: Vec<_> = probe_traces
                            .iter_mut()
                            .map(|tr| {
                                cursor_list(
                                    tr.batches_through(AntichainRef::new(&[]))
                                        .expect("the index stays open while the template runs"),
                                )
                            })
                            .collect();
                        for t in times {
                            let mut touched: Vec<(usize, Row)> = Vec::new();
                            let mut dirty: BTreeSet<u64> = BTreeSet::new();
                            // Instances retracted at `t`, kept to retract what they emitted.
                            let mut gone: HashMap<u64, Q> = HashMap::new();
                            pending.retain(|(q, pt, d)| {
                                if *pt != t {
                                    return true;
                                }
                                let q = match q {
                                    Left::Param(q) => q,
                                    Left::Touch(i, row) => {
                                        if touched.len() <= TOUCH_CHECK_LIMIT {
                                            touched.push((*i, row.clone()));
                                        }
                                        return false;
                                    }
                                };
                                let e = live
                                    .entry(q.id)
                                    .or_insert_with(|| (Arc::clone(q), plan.key(q), 0));
                                e.2 += d;
                                if e.2 > 0 {
                                    if let Some(k) = &e.1 {
                                        interest.entry(k.clone()).or_default().insert(q.id);
                                    }
                                } else {
                                    if let Some(k) = &e.1
                                        && let Some(set) = interest.get_mut(k)
                                    {
                                        set.remove(&q.id);
                                        if set.is_empty() {
                                            interest.remove(k);
                                        }
                                    }
                                    live.remove(&q.id);
                                    gone.insert(q.id, Arc::clone(q));
                                }
                                dirty.insert(q.id);
                                false
                            });
                            if touched.len() > TOUCH_CHECK_LIMIT {
                                dirty.extend(live.keys().copied());
                            } else if !touched.is_empty() {
                                for (qid, (q, _, _)) in &live {
                                    if !dirty.contains(qid)
                                        && touched.iter().any(|(i, row)| {
                                            touch_matters(
                                                &plan.level,
                                                *i,
                                                row,
                                                &q.params,
                                                &mut likes,
                                            )
                                        })
                                    {
                                        dirty.insert(*qid);
                                    }
                                }
                            }
                            // Child rows by (trace, key) as of `t`, shared by the walks below.
                            let mut fetched: HashMap<(usize, Key), Arc<Vec<Row>>> = HashMap::new();
                            let mut fetch = |i: usize, k: &Key| -> Arc<Vec<Row>> {
                                if let Some(rows) = fetched.get(&(i, k.clone())) {
                                    return Arc::clone(rows);
                                }
                                let (c, st) = &mut probes[i];
                                let mut rows = Vec::new();
                                c.rewind_keys(st);
                                c.seek_key(st, k.as_key_ref());
                                if c.get_key(st) == Some(k.as_key_ref()) {
                                    while let Some(v) = c.get_val(st) {
                                        let mut sum: Diff = 0;
                                        c.map_times(st, |tm, d| {
                                            if *tm <= t {
                                                sum += *d;
                                            }
                                        });
                                        if sum > 0 {
                                            rows.push(v.clone());
                                        }
                                        c.step_val(st);
                                    }
                                }
                                let rows = Arc::new(rows);
                                fetched.insert((i, k.clone()), Arc::clone(&rows));
                                rows
                            };
                            // Windows updated in place: with only index changes at `t`
                            // (no parameter or child change), the rows that pass an
                            // instance's filter change exactly by the changed rows, so its
                            // new window is the old one minus deleted plus inserted rows,
                            // unless a full window shrinks and must be refilled by a walk.
                            let mut updated: BTreeMap<u64, Vec<(Row, Diff)>> = BTreeMap::new();
                            if let Some(keys) = changed.remove(&t) {
                                for (k, mut rows) in keys {
                                    let Some(qs) = interest.get(&k) else { continue };
                                    rows.sort_by(|a, b| a.0.cmp(&b.0));
                                    let mut merged: Vec<SortedUpdate> = Vec::new();
                                    for (v, d) in rows {
                                        match merged.last_mut() {
                                            Some((lv, ld)) if *lv == v => *ld += d,
                                            _ => merged.push((v, d)),
                                        }
                                    }
                                    merged.retain(|(_, d)| *d != 0);
                                    for qid in qs {
                                        if dirty.contains(qid) {
                                            continue;
                                        }
                                        let Some((q, _, _)) = live.get(qid) else {
                                            continue;
                                        };
                                        let limit = plan.limit(q);
                                        let old: &[Row] =
                                            emitted.get(qid).map_or(&[], |v| v.as_slice());
                                        let full = limit > 0 && old.len() >= limit;
                                        let last = if full { old.last() } else { None };
                                        // Changed rows that pass and sort inside the window.
                                        let mut ins: Vec<Row> = Vec::new();
                                        let mut dels: Vec<&Row> = Vec::new();
                                        for (sr, d) in &merged {
                                            let row = &sr.row;
                                            if last.is_some_and(|l| {
                                                compare_rows(&plan.order, row, l)
                                                    == std::cmp::Ordering::Greater
                                            }) {
                                                continue;
                                            }
                                            let passes =
                                                plan.start.is_none_or(|s| {
                                                    after_start(&plan.order, row, &q.params[s])
                                                }) && plan.level.filter.as_ref().is_none_or(|p| {
                                                    eval_probe(
                                                        &plan.level,
                                                        p,
                                                        row,
                                                        &q.params,
                                                        &mut likes,
                                                        &mut fetch,
                                                    )
                                                });
                                            if !passes {
                                                continue;
                                            }
                                            if *d < 0 {
                                                dels.push(row);
                                            } else {
                                                ins.push(row.clone());
                                            }
                                        }
                                        if ins.is_empty() && dels.is_empty() {
                                            continue;
                                        }
                                        // The window is in order, so deleted rows are found
                                        // and new rows placed by binary search: the rows that
                                        // stay are neither read nor cloned (on a cold cache,
                                        // touching every row of every instance's window cost
                                        // more than the rest of the update).
                                        let mut gone_at: Vec<usize> = dels
                                            .iter()
                                            .filter_map(|r| window_position(&plan.order, old, r))
                                            .collect();
                                        gone_at.sort_unstable();
                                        gone_at.dedup();
                                        if full && old.len() - gone_at.len() + ins.len() < limit {
                                            dirty.insert(*qid);
                                            continue;
                                        }
                                        let window = emitted.entry(*qid).or_default();
                                        let mut diff: Vec<(Row, Diff)> = Vec::new();
                                        for at in gone_at.into_iter().rev() {
                                            diff.push((window.remove(at), -1));
                                        }
                                        // After rows that compare equal, as a stable sort
                                        // would put it.
                                        let mut added: Vec<usize> = Vec::new();
                                        for r in ins {
                                            let at = window.partition_point(|w| {
                                                compare_rows(&plan.order, w, &r).is_le()
                                            });
                                            added.push(r.addr());
                                            window.insert(at, r);
                                        }
                                        let cut: Vec<Row> = if window.len() > limit {
                                            window.drain(limit..).collect()
                                        } else {
                                            Vec::new()
                                        };
                                        for r in cut {
                                            match added.iter().position(|a| *a == r.addr()) {
                                                Some(i) => {
                                                    added.swap_remove(i);
                                                }
                                                None => diff.push((r, -1)),
                                            }
                                        }
                                        for r in window.iter() {
                                            if added.contains(&r.addr()) {
                                                diff.push((r.clone(), 1));
                                            }
                                        }
                                        if window.is_empty() {
                                            emitted.remove(qid);
                                        }
                                        updated.insert(*qid, diff);
                                    }
                                }
                            }
                            let cap = caps.delayed(&t);
                            let mut session = output.session(&cap);
                            for qid in dirty {
                                let mut new: Vec<Row> = Vec::new();
                                let mut q_out = None;
                                if let Some((q, Some(key), _)) = live.get(&qid) {
                                    q_out = Some(Arc::clone(q));
                                    let k = plan.limit(q);
                                    cursor.rewind_keys(&storage);
                                    cursor.seek_key(&storage, key.as_key_ref());
                                    // Rows before a start cursor are skipped without
                                    // evaluating them: values under a key are in ORDER BY order.
                                    let bound = plan
                                        .start
                                        .and_then(|s| start_bound(&plan.order, &q.params[s]));
                                    let possible = plan.level.exists.is_empty()
                                        || satisfiable(
                                            &plan.level,
                                            &q.params,
                                            &mut likes,
                                            &mut fetch,
                                        );
                                    if k > 0
                                        && possible
                                        && cursor.get_key(&storage) == Some(key.as_key_ref())
                                    {
                                        if let Some((b, _)) = &bound {
                                            // `seek_val` on a cursor list trips over empty
                                            // batches, so step: comparing stored sort keys
                                            // costs no allocation.
                                            while cursor.get_val(&storage).is_some_and(|v| {
                                                compare_key_row(b, &plan.order, &v.row).is_gt()
                                            }) {
                                                cursor.step_val(&storage);
                                            }
                                        }
                                        while let Some(val) = cursor.get_val(&storage) {
                                            let mut sum: Diff = 0;
                                            cursor.map_times(&storage, |tm, d| {
                                                if *tm <= t {
                                                    sum += *d;
                                                }
                                            });
                                            let row = &val.row;
                                            if sum > 0
                                                && bound.as_ref().is_none_or(|(b, excl)| {
                                                    !*excl
                                                        || compare_key_row(b, &plan.order, row)
                                                            .is_ne()
                                                })
                                                && plan.level.filter.as_ref().is_none_or(|p| {
                                                    eval_probe(
                                                        &plan.level,
                                                        p,
                                                        row,
                                                        &q.params,
                                                        &mut likes,
                                                        &mut fetch,
                                                    )
                                                })
                                            {
                                                new.push(row.clone());
                                                if new.len() >= k {
                                                    break;
                                                }
                                            }
                                            cursor.step_val(&storage);
                                        }
                                    }
                                } else if let Some((q, None, _)) = live.get(&qid) {
                                    q_out = Some(Arc::clone(q));
                                }
                                let old = emitted.remove(&qid).unwrap_or_default();
                                let Some(q) = q_out.or_else(|| gone.remove(&qid)) else {
                                    continue;
                                };
                                for (r, d) in window_diff(&old, &new) {
                                    session.give(((Arc::clone(&q), r), t, d));
                                }
                                if !new.is_empty() {
                                    emitted.insert(qid, new);
                                }
                            }
                            for (qid, diff) in updated {
                                let Some((q, _, _)) = live.get(&qid) else {
                                    continue;
                                };
                                for (r, d) in diff {
                                    session.give(((Arc::clone(q), r), t, d));
                                }
                            }
                        }
                    }
                    changed.retain(|t, _| *t >= frontier);
                    if frontier == Time::MAX {
                        caps.downgrade(Vec::<Time>::new());
                    } else {
                        caps.downgrade([frontier]);
                        trace.set_logical_compaction(AntichainRef::new(&[frontier]));
                        trace.set_physical_compaction(AntichainRef::new(&[frontier]));
                        for tr in probe_traces.iter_mut() {
                            tr.set_logical_compaction(AntichainRef::new(&[frontier]));
                            tr.set_physical_compaction(AntichainRef::new(&[frontier]));
                        }
                    }
                }
            },
        )
        .as_collection()
}
