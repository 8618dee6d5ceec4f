//! The timely worker loop: table inputs, shared indexes, template dataflows, output sinks.
//!
//! Every worker receives every command in the same order and builds the same dataflows in the
//! same order (timely identifies channels by construction order). Only the data differs:
//! each change and each parameter row is introduced on exactly one worker, chosen by hash,
//! while every input is *advanced* on every worker.

use std::cell::RefCell;
use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};

use differential_dataflow::input::InputSession;
use differential_dataflow::trace::TraceReader;
use differential_dataflow::{Hashable, VecCollection};
use timely::dataflow::ProbeHandle;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::{Operator, Probe};
use timely::progress::Antichain;
use timely::progress::frontier::AntichainRef;
use timely::worker::Worker;
use zero_queries::Row;

use crate::engine::IndexStats;
use crate::lean::LeanBatcher;
use crate::plan::{Catalog, QueryShape, TableId};
use crate::render::{
    Ctx, Diff, IndexId, IndexTrace, Indexes, Key, OutRec, PressOnDrop, Q, SortedId, SortedRow,
    SortedTrace, Time, key_of, needed_indexes,
};
use crate::sort_batcher::SortBatcher;

/// A command from the engine; sent to every worker.
pub(crate) enum Cmd {
    /// Apply table changes and parameter changes at `version`, then seal it.
    Advance {
        version: Time,
        changes: Arc<Vec<(TableId, Row, Diff)>>,
        params: Arc<Vec<(u64, Q, Diff)>>,
    },
    /// Build the dataflow of a new template.
    CreateTemplate { tid: u64, shape: Arc<QueryShape> },
    /// Drop a template's dataflow and its holds on the shared indexes.
    DropTemplate { tid: u64 },
    /// Build a lookup index (as of the last sealed version) if there is none; before the
    /// tables' dataflow exists, have it arranged there.
    EnsureIndex { id: IndexId },
    /// Build a sorted index (as of the last sealed version) if there is none; before the
    /// tables' dataflow exists, have it arranged there.
    EnsureSorted { id: SortedId },
    /// Report the size of every shared index.
    Stats(Sender<Vec<IndexStats>>),
}

/// The pseudo template id under which workers report the table arrangements' frontier, so
/// that a version counts as complete only once the tables have absorbed it (even with no
/// queries live).
pub(crate) const TABLES: u64 = u64::MAX;

/// Changes of one version handed to the table arrangements between worker steps.
const LOAD_SLICE: usize = 1 << 16;

/// What workers report back.
pub(crate) enum Out {
    /// Output updates of some template.
    Diffs(Vec<(OutRec, Time, Diff)>),
    /// A template's output frontier on one worker (`None`: the output is closed).
    Frontier {
        tid: u64,
        worker: usize,
        frontier: Option<Time>,
    },
    /// Everything one worker step produced, in order: one message (and one wake-up of the
    /// engine thread) per step instead of one per output batch and frontier change, which
    /// on a busy machine cost more than the step itself.
    Many(Vec<Out>),
}

/// An index asked for before the tables' dataflow exists.
#[derive(PartialEq)]
enum Deferred {
    Key(IndexId),
    Sorted(SortedId),
}

impl Deferred {
    fn table(&self) -> TableId {
        match self {
            Deferred::Key((t, _)) | Deferred::Sorted((t, _, _)) => *t,
        }
    }
}

fn index_name(table: &str, cols: &[usize]) -> String {
    format!("Index({table},{cols:?})")
}

fn sorted_name(table: &str, cols: &[usize], order: &[(usize, bool)]) -> String {
    format!("Sorted({table},{cols:?},{order:?})")
}

/// A row's entry in the lookup index on `cols`, whether the index is arranged from a table's
/// input or from its primary-key index. Rows with a null in the key can never be looked up,
/// so they have none (the whole-table index has no columns and keeps every row).
fn index_entry(cols: Vec<usize>) -> impl Fn(&Row) -> Option<(Key, Row)> + 'static {
    move |row| key_of(row, &cols).map(|k| (k, row.clone()))
}

/// A row's entry in the sorted index on `cols` ordered by `order` (see [`index_entry`]).
fn sorted_entry(
    cols: Vec<usize>,
    order: Vec<(usize, bool)>,
) -> impl Fn(&Row) -> Option<(Key, SortedRow)> + 'static {
    let order = Arc::new(order);
    move |row| {
        key_of(row, &cols).map(|k| {
            let row = SortedRow {
                order: Arc::clone(&order),
                row: row.clone(),
            };
            (k, row)
        })
    }
}

/// Arranges a lookup index's entries, on the probe that tells when every shared index has
/// absorbed a version.
fn arrange_lookup(
    entries: VecCollection<'_, Time, (Key, Row), Diff>,
    name: &str,
    probe: &ProbeHandle<Time>,
) -> IndexTrace {
    let idx = entries.arrange_named::<LeanBatcher<Row>, _>(name, LeanBatcher::new);
    idx.stream.clone().probe_with(probe);
    idx.trace
}

/// [`arrange_lookup`] for a sorted index.
fn arrange_sorted(
    entries: VecCollection<'_, Time, (Key, SortedRow), Diff>,
    name: &str,
    probe: &ProbeHandle<Time>,
) -> SortedTrace {
    let idx = entries.arrange_named::<SortBatcher<SortedRow>, _>(name, SortBatcher::new);
    idx.stream.clone().probe_with(probe);
    idx.trace
}

struct Template {
    dataflow: usize,
    input: InputSession<Time, Q, Diff>,
    _buttons: Vec<PressOnDrop>,
}

/// One worker's dataflows and inputs; driven by [`run`] on a worker thread, or stepped by the
/// engine's own thread when there is one worker (see `engine::Workers`).
pub(crate) struct State {
    index: usize,
    peers: usize,
    catalog: Arc<Catalog>,
    tables: Vec<InputSession<Time, (Key, Row), Diff>>,
    indexes: Indexes,
    /// Dataflows (and import buttons) of lazily created indexes; kept for the engine's life.
    index_dataflows: Vec<(usize, PressOnDrop)>,
    /// The dataflow arranging the tables, once built.
    tables_dataflow: Option<usize>,
    /// Indexes asked for before the tables' dataflow was built, to be arranged inside it.
    deferred: Vec<Deferred>,
    /// Frontier of every shared index (tables and lazily built ones): a version is complete
    /// only once all of them have absorbed it.
    probe: ProbeHandle<Time>,
    templates: HashMap<u64, Template>,
    sealed: Time,
    /// Output of the current step, sent as one [`Out::Many`] after it.
    out: Rc<RefCell<Vec<Out>>>,
    /// The tables' frontier as last reported.
    reported: Option<Option<Time>>,
}

/// Runs one worker until the engine drops its command channel.
pub(crate) fn run(
    worker: &mut Worker,
    catalog: Arc<Catalog>,
    rx: Receiver<Cmd>,
    sender: Sender<Out>,
) {
    let mut st = State::new(worker, catalog);
    loop {
        loop {
            match rx.try_recv() {
                Ok(cmd) => st.handle(worker, cmd),
                Err(TryRecvError::Empty) => break,
                Err(TryRecvError::Disconnected) => {
                    st.shutdown(worker);
                    return;
                }
            }
        }
        worker.step_or_park(None);
        let step = st.after_step();
        if !step.is_empty() {
            let _ = sender.send(Out::Many(step));
        }
    }
}

impl State {
    /// Creates the table inputs and asks for the relationship indexes; the dataflow that
    /// arranges the tables is built when first needed (see [`State::build_tables`]).
    pub(crate) fn new(worker: &mut Worker, catalog: Arc<Catalog>) -> State {
        let tables = catalog.tables.iter().map(|_| InputSession::new()).collect();
        let mut st = State {
            index: worker.index(),
            peers: worker.peers(),
            catalog,
            tables,
            indexes: Indexes::default(),
            index_dataflows: Vec::new(),
            tables_dataflow: None,
            deferred: Vec::new(),
            probe: ProbeHandle::new(),
            templates: HashMap::new(),
            sealed: 0,
            out: Rc::new(RefCell::new(Vec::new())),
            reported: None,
        };
        for id in st.catalog.relationship_indexes.clone() {
            st.ensure_index(worker, &id);
        }
        st
    }

    /// Builds the dataflow of the table inputs: each table's primary-key index, and every
    /// index asked for until now arranged from the same input. An index built later is a
    /// dataflow of its own that imports the primary-key index, which costs every version a
    /// hop between dataflows and the scheduling of one more dataflow; the indexes a host
    /// prepares before loading the replica (relationships, upstream indexes) avoid both.
    fn build_tables(&mut self, worker: &mut Worker) {
        if self.tables_dataflow.is_some() {
            return;
        }
        self.tables_dataflow = Some(worker.next_dataflow_index());
        let deferred = std::mem::take(&mut self.deferred);
        let (catalog, tables, indexes, probe) = (
            &self.catalog,
            &mut self.tables,
            &mut self.indexes,
            &self.probe,
        );
        worker.dataflow_named::<Time, _, _>("tables", |scope| {
            for (t, (info, input)) in catalog.tables.iter().zip(tables.iter_mut()).enumerate() {
                let rows = input.to_collection(scope);
                let pk = arrange_lookup(rows.clone(), &format!("Index({},pk)", info.name), probe);
                indexes.by_key.insert((t, info.pk.clone()), pk);
                for spec in deferred.iter().filter(|d| d.table() == t) {
                    match spec {
                        Deferred::Key(id) => {
                            let name = index_name(&info.name, &id.1);
                            let entry = index_entry(id.1.clone());
                            let entries = rows
                                .clone()
                                .flat_map(move |(_pk, row): (Key, Row)| entry(&row));
                            let idx = arrange_lookup(entries, &name, probe);
                            indexes.by_key.insert(id.clone(), idx);
                        }
                        Deferred::Sorted(id) => {
                            let (_, cols, order) = id.clone();
                            let name = sorted_name(&info.name, &cols, &order);
                            let entry = sorted_entry(cols, order);
                            let entries = rows
                                .clone()
                                .flat_map(move |(_pk, row): (Key, Row)| entry(&row));
                            let idx = arrange_sorted(entries, &name, probe);
                            indexes.sorted.insert(id.clone(), idx);
                        }
                    }
                }
            }
        });
    }

    /// What a step produced, with the tables' frontier when it moved.
    pub(crate) fn after_step(&mut self) -> Vec<Out> {
        if self.tables_dataflow.is_none() {
            // Nothing arranged yet: an empty probe would read as "closed".
            return std::mem::take(&mut *self.out.borrow_mut());
        }
        let f = self.probe.with_frontier(|f| f.first().copied());
        if self.reported != Some(f) {
            self.reported = Some(f);
            self.out.borrow_mut().push(Out::Frontier {
                tid: TABLES,
                worker: self.index,
                frontier: f,
            });
        }
        std::mem::take(&mut *self.out.borrow_mut())
    }

    fn mine(&self, h: u64) -> bool {
        usize::try_from(h % self.peers as u64).unwrap_or(0) == self.index
    }

    pub(crate) fn handle(&mut self, worker: &mut Worker, cmd: Cmd) {
        match cmd {
            Cmd::Advance {
                version,
                changes,
                params,
            } => {
                self.build_tables(worker);
                for input in &mut self.tables {
                    input.advance_to(version);
                }
                for t in self.templates.values_mut() {
                    t.input.advance_to(version);
                }
                for (i, (t, row, d)) in changes.iter().enumerate() {
                    let pk: Key = self.catalog.pk_of(*t, row).into();
                    if self.mine(pk.hashed()) {
                        self.tables[*t].update((pk, row.clone()), *d);
                    }
                    // A large batch (loading the replica) is handed to the arrangements in
                    // slices, so their batchers sort as it arrives instead of the whole batch
                    // waiting in channel buffers first: that queue was the loading peak, and
                    // the memory it left behind stayed resident.
                    if (i + 1) % LOAD_SLICE == 0 {
                        for input in &mut self.tables {
                            input.flush();
                        }
                        worker.step();
                    }
                }
                for (tid, q, d) in params.iter() {
                    if self.mine(q.id.hashed())
                        && let Some(t) = self.templates.get_mut(tid)
                    {
                        t.input.update(Arc::clone(q), *d);
                    }
                }
                for input in &mut self.tables {
                    input.advance_to(version + 1);
                    input.flush();
                }
                for t in self.templates.values_mut() {
                    t.input.advance_to(version + 1);
                    t.input.flush();
                }
                self.sealed = version;
                self.compact();
            }
            Cmd::EnsureIndex { id } => self.ensure_index(worker, &id),
            Cmd::EnsureSorted { id } => self.ensure_sorted(worker, &id),
            Cmd::Stats(reply) => {
                let _ = reply.send(self.stats());
            }
            Cmd::CreateTemplate { tid, shape } => {
                self.ensure_indexes(worker, &shape);
                self.build_tables(worker);
                let dataflow = worker.next_dataflow_index();
                let mut input: InputSession<Time, Q, Diff> = InputSession::new();
                let sealed = self.sealed;
                let out = Rc::clone(&self.out);
                let index = self.index;
                let peers = self.peers;
                let indexes = &mut self.indexes;
                let buttons =
                    worker.dataflow_named::<Time, _, _>(&format!("template{tid}"), |scope| {
                        let params = input.to_collection(scope);
                        let mut ctx = Ctx::new(scope, indexes, sealed, peers);
                        let result = ctx.render(&shape, params);
                        let mut reported: Option<Option<Time>> = None;
                        result
                            .inner
                            .sink(Pipeline, "Output", move |(input, frontier)| {
                                input.for_each(|_cap, data| {
                                    out.borrow_mut().push(Out::Diffs(std::mem::take(data)));
                                });
                                let f = frontier.frontier().first().copied();
                                if reported != Some(f) {
                                    reported = Some(f);
                                    out.borrow_mut().push(Out::Frontier {
                                        tid,
                                        worker: index,
                                        frontier: f,
                                    });
                                }
                            });
                        ctx.buttons
                    });
                input.advance_to(sealed + 1);
                input.flush();
                self.templates.insert(
                    tid,
                    Template {
                        dataflow,
                        input,
                        _buttons: buttons,
                    },
                );
            }
            Cmd::DropTemplate { tid } => {
                if let Some(t) = self.templates.remove(&tid) {
                    let df = t.dataflow;
                    drop(t);
                    worker.drop_dataflow(df);
                }
            }
        }
    }

    /// Lets every shared index forget history before the last sealed version: new imports
    /// read as of that version, so nothing older can be asked for. Physical compaction never
    /// passes what the index has already built (a join that imports it asserts that), so it
    /// stays a version behind: it reaches a version when the next one is applied.
    /// Once per version, not after every worker step: a version takes several steps, and
    /// adjusting every index's compaction frontiers in each of them was a measurable part of
    /// a one-row update.
    fn compact(&mut self) {
        let sealed = [self.sealed];
        let mut upper = Antichain::new();
        for tr in self.indexes.by_key.values_mut() {
            tr.set_logical_compaction(AntichainRef::new(&sealed));
            tr.read_upper(&mut upper);
            let physical = match upper.elements().first() {
                Some(u) => (*u).min(self.sealed),
                None => self.sealed,
            };
            tr.set_physical_compaction(AntichainRef::new(&[physical]));
        }
        for tr in self.indexes.sorted.values_mut() {
            tr.set_logical_compaction(AntichainRef::new(&sealed));
            tr.read_upper(&mut upper);
            let physical = match upper.elements().first() {
                Some(u) => (*u).min(self.sealed),
                None => self.sealed,
            };
            tr.set_physical_compaction(AntichainRef::new(&[physical]));
        }
    }

    /// The size of every shared index on this worker.
    fn stats(&self) -> Vec<IndexStats> {
        let mut out = Vec::new();
        for ((t, cols), tr) in &self.indexes.by_key {
            let mut s = IndexStats::named(format!("{}{cols:?}", self.catalog.tables[*t].name));
            tr.map_spans(|span| {
                if let Some(b) = &span.inner {
                    s.add(&b.storage);
                }
            });
            out.push(s);
        }
        for ((t, cols, order), tr) in &self.indexes.sorted {
            let mut s = IndexStats::named(format!(
                "{}{cols:?} sorted {order:?}",
                self.catalog.tables[*t].name
            ));
            tr.map_spans(|span| {
                if let Some(b) = &span.inner {
                    s.add(&b.storage);
                }
            });
            out.push(s);
        }
        out
    }

    fn ensure_indexes(&mut self, worker: &mut Worker, shape: &QueryShape) {
        let (by_key, sorted) = needed_indexes(shape, self.peers);
        for id in by_key {
            self.ensure_index(worker, &id);
        }
        for id in sorted {
            self.ensure_sorted(worker, &id);
        }
    }

    /// Creates the index `id` from the primary-key arrangement, as of the last sealed version;
    /// before the tables' dataflow exists, records it to be arranged there.
    fn ensure_index(&mut self, worker: &mut Worker, id: &IndexId) {
        if self.indexes.by_key.contains_key(id) {
            return;
        }
        if self.tables_dataflow.is_none() {
            let d = Deferred::Key(id.clone());
            if *id != (id.0, self.catalog.tables[id.0].pk.clone()) && !self.deferred.contains(&d) {
                self.deferred.push(d);
            }
            return;
        }
        let (table, cols) = id.clone();
        let pk_id = (table, self.catalog.tables[table].pk.clone());
        let pk = self
            .indexes
            .by_key
            .get_mut(&pk_id)
            .expect("every table has its primary-key index");
        let sealed = self.sealed;
        let probe = &self.probe;
        let dataflow = worker.next_dataflow_index();
        let name = index_name(&self.catalog.tables[table].name, &cols);
        let (trace, button) = worker.dataflow_named::<Time, _, _>(&name, |scope| {
            let (arr, button) = pk.import_frontier_core(
                scope,
                "pk",
                Antichain::from_elem(sealed),
                Antichain::new(),
            );
            let entry = index_entry(cols);
            let entries = arr.flat_map_ref(move |_pk, row: &Row| entry(row));
            (arrange_lookup(entries, &name, probe), PressOnDrop(button))
        });
        self.index_dataflows.push((dataflow, button));
        self.indexes.by_key.insert(id.clone(), trace);
    }

    /// Creates the sorted index `id` (rows under their key in ORDER BY order) from the
    /// primary-key arrangement, as of the last sealed version; before the tables' dataflow
    /// exists, records it to be arranged there.
    fn ensure_sorted(&mut self, worker: &mut Worker, id: &SortedId) {
        if self.indexes.sorted.contains_key(id) {
            return;
        }
        if self.tables_dataflow.is_none() {
            let d = Deferred::Sorted(id.clone());
            if !self.deferred.contains(&d) {
                self.deferred.push(d);
            }
            return;
        }
        let (table, cols, order) = id.clone();
        let pk_id = (table, self.catalog.tables[table].pk.clone());
        let pk = self
            .indexes
            .by_key
            .get_mut(&pk_id)
            .expect("every table has its primary-key index");
        let sealed = self.sealed;
        let probe = &self.probe;
        let dataflow = worker.next_dataflow_index();
        let name = sorted_name(&self.catalog.tables[table].name, &cols, &order);
        let (trace, button) = worker.dataflow_named::<Time, _, _>(&name, |scope| {
            let (arr, button) = pk.import_frontier_core(
                scope,
                "pk",
                Antichain::from_elem(sealed),
                Antichain::new(),
            );
            let entry = sorted_entry(cols, order);
            let entries = arr.flat_map_ref(move |_pk, row: &Row| entry(row));
            (arrange_sorted(entries, &name, probe), PressOnDrop(button))
        });
        self.index_dataflows.push((dataflow, button));
        self.indexes.sorted.insert(id.clone(), trace);
    }

    pub(crate) fn shutdown(&mut self, worker: &mut Worker) {
        for (_, t) in self.templates.drain() {
            let df = t.dataflow;
            drop(t);
            worker.drop_dataflow(df);
        }
        self.indexes.by_key.clear();
        self.indexes.sorted.clear();
        for (df, button) in self.index_dataflows.drain(..) {
            drop(button);
            worker.drop_dataflow(df);
        }
        self.tables.clear();
        if let Some(df) = self.tables_dataflow.take() {
            worker.drop_dataflow(df);
        }
    }
}
