//! The synchronous front of the engine: it owns the timely workers, turns queries into
//! template instances, feeds versions, and collects per-version, per-query row patches.

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::mpsc::{self, Receiver, Sender};
use std::sync::{Arc, Mutex};
use std::thread::Thread;

use timely::worker::Worker;

use zero_queries::ast::Ast;
use zero_queries::schema::Schema;
use zero_queries::validate::{complete_ordering, validate};
use zero_queries::{Row, Value};

use crate::error::EngineError;
use crate::plan::{Catalog, Param, QueryShape, TableId, compile};
use crate::reference::{Tables, evaluate, view_json};
use crate::render::{Diff, Inst, OutRec, Q, Time};
use crate::worker::{Cmd, Out, State, TABLES, run};

/// How the engine runs; passed explicitly (no `Default`, see `style.md`).
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// Timely workers. Data is hash-partitioned across them; 1 is right for tests and small
    /// machines, `cores - 2` for a server (one core for I/O, one spare). One worker runs on
    /// the thread that calls the engine (no worker thread); more run on their own threads.
    pub workers: usize,
}

/// Whether a change adds or removes a row.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    /// The row now exists.
    Insert,
    /// The row no longer exists (pass the full old row).
    Delete,
}

/// One row change of a committed batch. An update is a delete of the old row and an insert of
/// the new one in the same version.
#[derive(Debug, Clone)]
pub struct TableChange {
    /// Table name as in the schema.
    pub table: String,
    /// Insert or delete.
    pub op: Op,
    /// The row's values in the table's column order.
    pub row: Row,
}

/// A change to one row of one query's result.
#[derive(Debug, Clone, PartialEq)]
pub enum RowPatch {
    /// The row is in the result now (new, or with new contents).
    Put {
        /// Table name.
        table: Arc<str>,
        /// Primary-key values.
        pk: Vec<Value>,
        /// The whole row.
        row: Row,
    },
    /// The row left the result.
    Del {
        /// Table name.
        table: Arc<str>,
        /// Primary-key values.
        pk: Vec<Value>,
    },
}

/// What changed in one query's result at one version. Complete and atomic: applying every
/// patch gives the result at `version`.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryDiff {
    /// The query id given to [`Engine::add_query`].
    pub query: String,
    /// The version the result is now at.
    pub version: u64,
    /// First result of this query (its hydration); sent even when it is empty.
    pub initial: bool,
    /// Row patches, at most one per row.
    pub patches: Vec<RowPatch>,
}

/// The size of one shared index (summed over workers): what its batches hold, for finding
/// where the engine's memory goes. Row payloads are shared by every index of a table and are
/// not counted here; `bytes` is the batches' own containers (keys, values, offsets, times).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct IndexStats {
    /// Table and key columns (and ordering, for a sorted index).
    pub name: String,
    /// Batches in the index's spines.
    pub batches: usize,
    /// Distinct keys over all batches.
    pub keys: usize,
    /// Values over all batches.
    pub vals: usize,
    /// Stored (time, diff) pairs; values whose update equals the previous one store none.
    pub updates: usize,
    /// Bytes of the containers' capacity, plus key values kept out of line.
    pub bytes: usize,
}

impl IndexStats {
    pub(crate) fn named(name: String) -> Self {
        IndexStats {
            name,
            ..IndexStats::default()
        }
    }

    pub(crate) fn add<V>(
        &mut self,
        st: &differential_dataflow::trace::implementations::ord_neu::val_batch::OrdValStorage<
            crate::lean::LeanLayout<V>,
        >,
    ) where
        V: Ord + Clone + 'static,
    {
        use differential_dataflow::trace::implementations::BatchContainer;
        use std::mem::size_of;
        let offs = |o: &crate::lean::BlockOffsets| o.heap_bytes();
        self.batches += 1;
        self.keys += st.keys.len();
        self.vals += st.vals.vals.len();
        self.updates += st.upds.times.0.len();
        self.bytes += st.keys.heap_bytes()
            + offs(&st.vals.offs)
            + st.vals.vals.capacity() * size_of::<V>()
            + offs(&st.upds.offs)
            + st.upds.times.0.capacity() * size_of::<Time>()
            + st.upds.diffs.0.capacity() * size_of::<Diff>();
    }
}

/// A synced row's identity in a query result: table and primary-key values.
type Slot = (TableId, Vec<Value>);
/// The versions of one synced row with their multiplicity; almost always a single entry.
type Counts = Vec<(Row, Diff)>;
/// Hash map for the per-version output bookkeeping, whose keys are the engine's own data
/// (not attacker-chosen), so a fast non-DoS-resistant hash is fine.
type FastMap<K, V> = foldhash::HashMap<K, V>;

struct TemplateInfo {
    live: usize,
    /// Built by [`Engine::prepare`]: kept (and ready) while no query of the shape is live.
    pinned: bool,
}

struct Instance {
    q: Q,
    tid: u64,
    ast: Ast,
    subscribers: BTreeSet<String>,
    /// Subscribers that joined after hydration; they get the whole result at the next version.
    joining: Vec<String>,
    /// Version at which the instance hydrates (`None` until the next `apply`).
    hydrates_at: Option<Time>,
    hydrated: bool,
    /// Synced rows with their multiplicity (a row reachable by several paths counts several
    /// times), by table and primary key.
    rows: FastMap<Slot, Counts>,
}

/// The incremental view engine. See the crate documentation for the model.
pub struct Engine {
    catalog: Arc<Catalog>,
    workers: usize,
    run: Workers,
    templates: HashMap<Arc<QueryShape>, u64>,
    template_info: HashMap<u64, TemplateInfo>,
    instances: HashMap<u64, Instance>,
    instance_by_params: HashMap<(u64, Vec<Param>), u64>,
    queries: HashMap<String, u64>,
    pending_params: Vec<(u64, Q, Diff)>,
    frontiers: HashMap<(u64, usize), Option<Time>>,
    buffered: BTreeMap<Time, Vec<(OutRec, Diff)>>,
    /// Instances whose first result is due at a version.
    hydrating: HashMap<Time, Vec<u64>>,
    /// Instances with subscribers waiting for the whole result.
    joining: BTreeSet<u64>,
    applied: Vec<Time>,
    last_version: Option<Time>,
    next_tid: u64,
    next_instance: u64,
}

/// Where the timely workers run.
enum Workers {
    /// The one worker is stepped by the engine's caller, inside `step_until` / `poll`: a
    /// version costs no thread hand-off (a command to a parked worker thread, then a wake-up
    /// of the caller per step), which on a busy machine took as long as the version's work.
    /// `RefCell` because reads such as [`Engine::index_stats`] take `&self`.
    Inline(Box<RefCell<Inline>>),
    /// Worker threads fed through channels, reporting each step's output.
    Threads {
        cmd_txs: Vec<Sender<Cmd>>,
        threads: Vec<Thread>,
        out_rx: Receiver<Out>,
        guards: Option<timely::communication::initialize::WorkerGuards<()>>,
    },
}

/// An inline worker; `state` is declared first so that it drops before the worker.
struct Inline {
    state: State,
    worker: Worker,
}

impl Engine {
    /// Starts the workers with one input per table of `schema`.
    pub fn new(config: EngineConfig, schema: &Schema) -> Result<Engine, EngineError> {
        let catalog = Arc::new(Catalog::new(schema));
        let workers = config.workers.max(1);
        let run = if workers == 1 {
            let mut wconfig = timely::WorkerConfig::default();
            differential_config(&mut wconfig);
            let alloc = timely::communication::Allocator::Thread(
                timely::communication::allocator::thread::Thread::default(),
            );
            let mut worker = Worker::new(wconfig, alloc, Some(std::time::Instant::now()));
            let state = State::new(&mut worker, Arc::clone(&catalog));
            Workers::Inline(Box::new(RefCell::new(Inline { state, worker })))
        } else {
            start_threads(&catalog, workers)?
        };
        let frontiers = (0..workers).map(|w| ((TABLES, w), Some(0))).collect();
        Ok(Engine {
            catalog,
            workers,
            run,
            templates: HashMap::new(),
            template_info: HashMap::new(),
            instances: HashMap::new(),
            instance_by_params: HashMap::new(),
            queries: HashMap::new(),
            pending_params: Vec::new(),
            frontiers,
            buffered: BTreeMap::new(),
            hydrating: HashMap::new(),
            joining: BTreeSet::new(),
            applied: Vec::new(),
            last_version: None,
            next_tid: 0,
            next_instance: 0,
        })
    }
}

/// No idle merging: with it, every idle step spends effort merging the large initial batches
/// of the shared indexes, which measured 10x slower single-row updates. Merges still progress
/// in proportion to the updates inserted, which keeps traces compact.
fn differential_config(config: &mut timely::WorkerConfig) {
    differential_dataflow::configure(
        config,
        &differential_dataflow::Config::default().idle_merge_effort(None),
    );
}

/// Starts `workers` worker threads.
fn start_threads(catalog: &Arc<Catalog>, workers: usize) -> Result<Workers, EngineError> {
    let (out_tx, out_rx) = mpsc::channel::<Out>();
    let mut cmd_txs = Vec::new();
    let mut cmd_rxs = Vec::new();
    for _ in 0..workers {
        let (t, r) = mpsc::channel::<Cmd>();
        cmd_txs.push(t);
        cmd_rxs.push(Some(r));
    }
    // `execute` wants a `Fn + Sync` closure, so receivers travel in a mutex.
    let cmd_rxs = Arc::new(Mutex::new(cmd_rxs));
    let (thr_tx, thr_rx) = mpsc::channel::<(usize, Thread)>();
    let mut tconfig = timely::Config::process(workers);
    differential_config(&mut tconfig.worker);
    let cat = Arc::clone(catalog);
    let out_tx = Mutex::new(out_tx);
    let thr_tx = Mutex::new(thr_tx);
    let guards = timely::execute(tconfig, move |worker| {
        let rx = cmd_rxs
            .lock()
            .expect("no worker panics while holding this lock")[worker.index()]
        .take()
        .expect("each worker takes its own receiver once");
        let out = out_tx
            .lock()
            .expect("no worker panics while holding this lock")
            .clone();
        let _ = thr_tx
            .lock()
            .expect("no worker panics while holding this lock")
            .send((worker.index(), std::thread::current()));
        run(worker, Arc::clone(&cat), rx, out);
    })
    .map_err(|_| EngineError::WorkersStopped)?;
    let mut threads: Vec<Option<Thread>> = vec![None; workers];
    for _ in 0..workers {
        let (i, t) = thr_rx.recv().map_err(|_| EngineError::WorkersStopped)?;
        threads[i] = Some(t);
    }
    let threads = threads
        .into_iter()
        .map(|t| t.ok_or(EngineError::WorkersStopped))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Workers::Threads {
        cmd_txs,
        threads,
        out_rx,
        guards: Some(guards),
    })
}

impl Engine {
    /// The engine's view of the schema.
    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    /// The size of every shared index, summed over workers, largest first; empty until the
    /// first version or shape builds the tables' dataflow.
    pub fn index_stats(&self) -> Result<Vec<IndexStats>, EngineError> {
        let (tx, rx) = mpsc::channel();
        self.send(&|| Cmd::Stats(tx.clone()))?;
        drop(tx);
        let mut by_name: BTreeMap<String, IndexStats> = BTreeMap::new();
        for worker in rx {
            for s in worker {
                let e = by_name
                    .entry(s.name.clone())
                    .or_insert_with(|| IndexStats::named(s.name.clone()));
                e.batches += s.batches;
                e.keys += s.keys;
                e.vals += s.vals;
                e.updates += s.updates;
                e.bytes += s.bytes;
            }
        }
        let mut out: Vec<IndexStats> = by_name.into_values().collect();
        out.sort_by_key(|s| std::cmp::Reverse(s.bytes));
        Ok(out)
    }

    /// Number of distinct query shapes running (one dataflow each).
    pub fn template_count(&self) -> usize {
        self.template_info.len()
    }

    /// Number of distinct queries (shape and parameters) running.
    pub fn instance_count(&self) -> usize {
        self.instances.len()
    }

    fn send(&self, mk: &dyn Fn() -> Cmd) -> Result<(), EngineError> {
        match &self.run {
            Workers::Inline(w) => {
                let w = &mut *w.borrow_mut();
                w.state.handle(&mut w.worker, mk());
            }
            Workers::Threads {
                cmd_txs, threads, ..
            } => {
                for (tx, th) in cmd_txs.iter().zip(threads.iter()) {
                    tx.send(mk()).map_err(|_| EngineError::WorkersStopped)?;
                    th.unpark();
                }
            }
        }
        Ok(())
    }

    /// Takes what the workers reported: with worker threads, waits for their next step's
    /// report when `wait` (else takes only what is queued); inline, runs one worker step.
    fn pump(&mut self, wait: bool) -> Result<(), EngineError> {
        let msgs: Vec<Out> = match &self.run {
            Workers::Inline(w) => {
                let w = &mut *w.borrow_mut();
                w.worker.step();
                w.state.after_step()
            }
            Workers::Threads { out_rx, .. } => {
                let mut msgs = Vec::new();
                if wait {
                    msgs.push(out_rx.recv().map_err(|_| EngineError::WorkersStopped)?);
                }
                loop {
                    match out_rx.try_recv() {
                        Ok(m) => msgs.push(m),
                        Err(mpsc::TryRecvError::Empty) => break,
                        Err(mpsc::TryRecvError::Disconnected) => {
                            return Err(EngineError::WorkersStopped);
                        }
                    }
                }
                msgs
            }
        };
        for m in msgs {
            self.receive(m);
        }
        Ok(())
    }

    /// Builds the dataflow of queries shaped like `ast` (literals do not matter) and the shared
    /// indexes it reads, without adding a query, and keeps it while no such query is live. A
    /// host that knows its app's common queries calls this while it loads the replica, so the
    /// first client query of such a shape hydrates like any later one instead of paying for
    /// arranging a whole table or rendering the shape's operators, which stops every other
    /// query's next version meanwhile. Indexes the schema's relationships need are asked for
    /// by [`Engine::new`] already.
    pub fn prepare(&mut self, ast: &Ast) -> Result<(), EngineError> {
        validate(ast, &self.catalog.schema)?;
        let ast = complete_ordering(ast, &self.catalog.schema)?;
        let (shape, _) = compile(&ast, &self.catalog)?;
        let tid = self.template_for(Arc::new(shape))?;
        if let Some(info) = self.template_info.get_mut(&tid) {
            info.pinned = true;
        }
        Ok(())
    }

    /// Builds the lookup index of `table` on `columns`, unless one exists. A host that knows
    /// its app's access paths without knowing its queries (say, from the upstream database's
    /// indexes) calls this before loading rows, so the index fills as the table loads and the
    /// first query that looks rows up by those columns (a relationship, an EXISTS) does not
    /// arrange the whole table while every other query waits. Asked for before the first
    /// version or shape, it is arranged with the tables, from their inputs (no dataflow of
    /// its own); later, now, from the primary-key index. Columns not in the table are an
    /// [`EngineError::Unsupported`].
    pub fn prepare_index(&mut self, table: &str, columns: &[String]) -> Result<(), EngineError> {
        let (t, cols) = self.column_positions(table, columns)?;
        self.send(&|| Cmd::EnsureIndex {
            id: (t, cols.clone()),
        })
    }

    /// Builds the sorted index of `table` that a top-k query seeking `key` (equality on each
    /// column) and ordered by `order` (column, descending) reads, unless one exists; the
    /// ordering is completed with the primary key as queries' orderings are. Such an index
    /// holds the whole table in ORDER BY order under each key, and building it on a shape's
    /// first use sorts every row while that client and every other query's next version wait;
    /// a host that can tell its app's orderings (say, from the upstream database's indexes)
    /// calls this before loading rows, so the index fills as the table loads (arranged with
    /// the tables, as for [`Engine::prepare_index`]). Columns not in
    /// the table are an [`EngineError::Unsupported`].
    pub fn prepare_order(
        &mut self,
        table: &str,
        key: &[String],
        order: &[(String, bool)],
    ) -> Result<(), EngineError> {
        let (t, cols) = self.column_positions(table, key)?;
        let names: Vec<String> = order.iter().map(|(c, _)| c.clone()).collect();
        let (_, ordered) = self.column_positions(table, &names)?;
        let mut sort = Vec::new();
        for (c, (_, desc)) in ordered.into_iter().zip(order) {
            if !sort.iter().any(|&(o, _)| o == c) {
                sort.push((c, *desc));
            }
        }
        for &pk in &self.catalog.tables[t].pk {
            if !sort.iter().any(|&(c, _)| c == pk) {
                sort.push((pk, false));
            }
        }
        self.send(&|| Cmd::EnsureSorted {
            id: (t, cols.clone(), sort.clone()),
        })
    }

    /// `table`'s id and the positions of `columns` in it, for the `prepare_*` calls.
    fn column_positions(
        &self,
        table: &str,
        columns: &[String],
    ) -> Result<(TableId, Vec<usize>), EngineError> {
        let t = self
            .catalog
            .table_id(table)
            .ok_or_else(|| EngineError::UnknownTable(table.to_owned()))?;
        let info = &self.catalog.tables[t];
        let cols = columns
            .iter()
            .map(|c| {
                info.columns.iter().position(|n| n == c).ok_or_else(|| {
                    EngineError::Unsupported(format!("no column \"{c}\" in table \"{table}\""))
                })
            })
            .collect::<Result<Vec<usize>, _>>()?;
        Ok((t, cols))
    }

    /// The template of `shape`, creating its dataflow if there is none.
    fn template_for(&mut self, shape: Arc<QueryShape>) -> Result<u64, EngineError> {
        if let Some(t) = self.templates.get(&shape) {
            return Ok(*t);
        }
        let tid = self.next_tid;
        self.next_tid += 1;
        let s = Arc::clone(&shape);
        self.send(&|| Cmd::CreateTemplate {
            tid,
            shape: Arc::clone(&s),
        })?;
        for w in 0..self.workers {
            self.frontiers.insert((tid, w), Some(0));
        }
        self.templates.insert(shape, tid);
        self.template_info.insert(
            tid,
            TemplateInfo {
                live: 0,
                pinned: false,
            },
        );
        Ok(tid)
    }

    /// Registers query `id`. Its first result arrives with the next applied version (use an
    /// empty [`Engine::apply`] when nothing changed). Identical queries share one instance;
    /// queries that differ only in literals share one dataflow.
    pub fn add_query(&mut self, id: &str, ast: &Ast) -> Result<(), EngineError> {
        if self.queries.contains_key(id) {
            return Err(EngineError::DuplicateQuery(id.to_owned()));
        }
        validate(ast, &self.catalog.schema)?;
        let ast = complete_ordering(ast, &self.catalog.schema)?;
        let (shape, params) = compile(&ast, &self.catalog)?;
        let tid = self.template_for(Arc::new(shape))?;
        let key = (tid, params);
        let iid = match self.instance_by_params.get(&key) {
            Some(i) => {
                let inst = self
                    .instances
                    .get_mut(i)
                    .expect("instance_by_params only names live instances");
                inst.subscribers.insert(id.to_owned());
                if inst.hydrated {
                    inst.joining.push(id.to_owned());
                    self.joining.insert(*i);
                }
                *i
            }
            None => {
                let iid = self.next_instance;
                self.next_instance += 1;
                let q = Arc::new(Inst {
                    id: iid,
                    params: key.1.clone(),
                });
                self.pending_params.push((tid, Arc::clone(&q), 1));
                self.instances.insert(
                    iid,
                    Instance {
                        q,
                        tid,
                        ast,
                        subscribers: BTreeSet::from([id.to_owned()]),
                        joining: Vec::new(),
                        hydrates_at: None,
                        hydrated: false,
                        rows: FastMap::default(),
                    },
                );
                self.template_info
                    .get_mut(&tid)
                    .expect("template registered above")
                    .live += 1;
                self.instance_by_params.insert(key, iid);
                iid
            }
        };
        self.queries.insert(id.to_owned(), iid);
        Ok(())
    }

    /// Unregisters query `id`. An instance with no queries left is retracted at the next
    /// version, and a template with no instances left is dropped at once, which frees its
    /// state (unless [`Engine::prepare`] built it). Returns whether the query existed.
    pub fn remove_query(&mut self, id: &str) -> Result<bool, EngineError> {
        let Some(iid) = self.queries.remove(id) else {
            return Ok(false);
        };
        let inst = self
            .instances
            .get_mut(&iid)
            .expect("queries only name live instances");
        inst.subscribers.remove(id);
        inst.joining.retain(|j| j != id);
        if !inst.subscribers.is_empty() {
            return Ok(true);
        }
        let inst = self.instances.remove(&iid).expect("looked up just above");
        self.instance_by_params
            .remove(&(inst.tid, inst.q.params.clone()));
        let info = self
            .template_info
            .get_mut(&inst.tid)
            .expect("live instances have live templates");
        info.live -= 1;
        let pending = self
            .pending_params
            .iter()
            .position(|(t, q, d)| *t == inst.tid && q.id == iid && *d > 0);
        if info.live == 0 && !info.pinned {
            let tid = inst.tid;
            self.template_info.remove(&tid);
            self.templates.retain(|_, t| *t != tid);
            self.pending_params.retain(|(t, _, _)| *t != tid);
            self.frontiers.retain(|(t, _), _| *t != tid);
            self.send(&|| Cmd::DropTemplate { tid })?;
        } else if let Some(i) = pending {
            self.pending_params.remove(i);
        } else {
            self.pending_params.push((inst.tid, inst.q, -1));
        }
        Ok(true)
    }

    /// Applies one committed batch of changes as `version` (strictly increasing) and seals it.
    /// Queries added since the last version hydrate at this version.
    pub fn apply(&mut self, version: u64, changes: Vec<TableChange>) -> Result<(), EngineError> {
        if let Some(last) = self.last_version
            && version <= last
        {
            return Err(EngineError::VersionNotIncreasing { version, last });
        }
        let mut batch = Vec::with_capacity(changes.len());
        for c in changes {
            let t = self
                .catalog
                .table_id(&c.table)
                .ok_or_else(|| EngineError::UnknownTable(c.table.clone()))?;
            let expected = self.catalog.tables[t].columns.len();
            if c.row.len() != expected {
                return Err(EngineError::RowArity {
                    table: c.table,
                    found: c.row.len(),
                    expected,
                });
            }
            let d = match c.op {
                Op::Insert => 1,
                Op::Delete => -1,
            };
            batch.push((t, c.row, d));
        }
        let params = std::mem::take(&mut self.pending_params);
        for (_, q, d) in &params {
            if *d > 0
                && let Some(inst) = self.instances.get_mut(&q.id)
            {
                inst.hydrates_at = Some(version);
                self.hydrating.entry(version).or_default().push(q.id);
            }
        }
        let changes = Arc::new(batch);
        let params = Arc::new(params);
        self.send(&|| Cmd::Advance {
            version,
            changes: Arc::clone(&changes),
            params: Arc::clone(&params),
        })?;
        self.last_version = Some(version);
        self.applied.push(version);
        Ok(())
    }

    fn complete(&self, v: Time) -> bool {
        self.frontiers.values().all(|f| f.is_none_or(|f| f > v))
    }

    /// Waits until every live query's result is complete through `version`, then returns the
    /// patches of every version up to it, in version order.
    pub fn step_until(&mut self, version: u64) -> Result<Vec<QueryDiff>, EngineError> {
        if self.last_version.is_none_or(|l| version > l) {
            return Err(EngineError::VersionNotApplied(version));
        }
        while !self.complete(version) {
            self.pump(true)?;
        }
        if matches!(self.run, Workers::Threads { .. }) {
            self.pump(false)?;
        }
        Ok(self.finish_through(version))
    }

    /// Returns the patches of every applied version that is already complete, without
    /// waiting for worker threads; for callers that drive the engine from an event loop. An
    /// inline worker (one worker) is stepped until every applied version is complete.
    pub fn poll(&mut self) -> Result<Vec<QueryDiff>, EngineError> {
        match self.run {
            Workers::Inline(_) => {
                while self.applied.last().is_some_and(|v| !self.complete(*v)) {
                    self.pump(true)?;
                }
            }
            Workers::Threads { .. } => self.pump(false)?,
        }
        let done = self
            .applied
            .iter()
            .copied()
            .take_while(|v| self.complete(*v))
            .last();
        Ok(match done {
            Some(v) => self.finish_through(v),
            None => Vec::new(),
        })
    }

    /// The last applied version, if any.
    pub fn last_version(&self) -> Option<u64> {
        self.last_version
    }

    fn finish_through(&mut self, version: Time) -> Vec<QueryDiff> {
        let mut out = Vec::new();
        let ready: Vec<Time> = self
            .applied
            .iter()
            .copied()
            .filter(|v| *v <= version)
            .collect();
        self.applied.retain(|v| *v > version);
        for v in ready {
            let diffs = self.buffered.remove(&v).unwrap_or_default();
            self.finish_version(v, diffs, &mut out);
        }
        // Updates at versions that were never applied cannot exist; drop stale buffers anyway.
        let stale: Vec<Time> = self.buffered.range(..=version).map(|(t, _)| *t).collect();
        for t in stale {
            self.buffered.remove(&t);
        }
        out
    }

    fn receive(&mut self, msg: Out) {
        match msg {
            Out::Many(msgs) => {
                for m in msgs {
                    self.receive(m);
                }
            }
            Out::Diffs(data) => {
                for (rec, t, d) in data {
                    self.buffered.entry(t).or_default().push((rec, d));
                }
            }
            Out::Frontier {
                tid,
                worker,
                frontier,
            } => {
                if let Some(f) = self.frontiers.get_mut(&(tid, worker)) {
                    *f = frontier;
                }
            }
        }
    }

    fn finish_version(&mut self, v: Time, diffs: Vec<(OutRec, Diff)>, out: &mut Vec<QueryDiff>) {
        // Grouped by instance without hashing rows: a hydration brings tens of thousands of
        // records, and hashing each whole row (twice) cost more than the dataflow itself.
        let mut per_inst: FastMap<u64, Vec<(TableId, Row, Diff)>> = FastMap::default();
        for ((iid, t, row), d) in diffs {
            per_inst.entry(iid).or_default().push((t, row, d));
        }
        // Only instances with changes, a hydration or a late subscriber have anything to say,
        // so the per-version cost does not grow with the number of idle queries.
        let mut ids: BTreeSet<u64> = per_inst.keys().copied().collect();
        ids.extend(self.hydrating.remove(&v).unwrap_or_default());
        ids.extend(std::mem::take(&mut self.joining));
        for iid in ids {
            let catalog = Arc::clone(&self.catalog);
            let Some(inst) = self.instances.get_mut(&iid) else {
                // Removed since; its late updates are dropped with it.
                continue;
            };
            let initial = inst.hydrates_at == Some(v);
            if initial {
                inst.hydrated = true;
            }
            let mut patches = Vec::new();
            if let Some(changes) = per_inst.remove(&iid) {
                // Sorted by slot, so each slot's updates are adjacent and patches come out in
                // slot order.
                let mut keyed: Vec<(Slot, Row, Diff)> = changes
                    .into_iter()
                    .filter(|(_, _, d)| *d != 0)
                    .map(|(t, row, d)| ((t, catalog.pk_of(t, &row)), row, d))
                    .collect();
                keyed.sort_unstable_by(|a, b| a.0.cmp(&b.0));
                let mut it = keyed.into_iter().peekable();
                while let Some((slot, row, d)) = it.next() {
                    let (old, new) = match inst.rows.get_mut(&slot) {
                        Some(m) => {
                            let old = visible(Some(m));
                            add_count(m, row, d);
                            while let Some((_, r, d)) = it.next_if(|x| x.0 == slot) {
                                add_count(m, r, d);
                            }
                            let new = visible(Some(m));
                            if m.is_empty() {
                                inst.rows.remove(&slot);
                            }
                            (old, new)
                        }
                        None => {
                            let mut m = Vec::with_capacity(1);
                            add_count(&mut m, row, d);
                            while let Some((_, r, d)) = it.next_if(|x| x.0 == slot) {
                                add_count(&mut m, r, d);
                            }
                            let new = visible(Some(&m));
                            if !m.is_empty() {
                                inst.rows.insert(slot.clone(), m);
                            }
                            (None, new)
                        }
                    };
                    let table = Arc::clone(&catalog.tables[slot.0].name);
                    match (old, new) {
                        (old, Some(row)) if old.as_ref() != Some(&row) => {
                            patches.push(RowPatch::Put {
                                table,
                                pk: slot.1,
                                row,
                            });
                        }
                        (Some(_), None) => patches.push(RowPatch::Del { table, pk: slot.1 }),
                        _ => {}
                    }
                }
            }
            if !patches.is_empty() || initial {
                for s in &inst.subscribers {
                    if inst.joining.contains(s) {
                        continue;
                    }
                    out.push(QueryDiff {
                        query: s.clone(),
                        version: v,
                        initial,
                        patches: patches.clone(),
                    });
                }
            }
            if inst.hydrated && !inst.joining.is_empty() {
                let all = all_puts(&catalog, inst);
                for s in std::mem::take(&mut inst.joining) {
                    out.push(QueryDiff {
                        query: s,
                        version: v,
                        initial: true,
                        patches: all.clone(),
                    });
                }
            }
        }
    }

    /// The rows currently synced for query `id`, as `(table, row)`, sorted.
    pub fn rows(&self, id: &str) -> Option<Vec<(Arc<str>, Row)>> {
        let inst = self.instances.get(self.queries.get(id)?)?;
        let mut rows: Vec<(TableId, Row)> = inst
            .rows
            .iter()
            .filter_map(|((t, _), m)| visible(Some(m)).map(|r| (*t, r)))
            .collect();
        rows.sort();
        Some(
            rows.into_iter()
                .map(|(t, r)| (Arc::clone(&self.catalog.tables[t].name), r))
                .collect(),
        )
    }

    /// Query `id`'s current result in Zero's view format: root rows in query order, each
    /// related alias an array of child rows, hidden junction hops flattened. Built, as the
    /// client builds it, by running the query over the synced rows.
    pub fn view(&self, id: &str) -> Option<serde_json::Value> {
        let inst = self.instances.get(self.queries.get(id)?)?;
        let mut tables = Tables {
            rows: vec![Vec::new(); self.catalog.tables.len()],
        };
        for ((t, _), m) in &inst.rows {
            if let Some(r) = visible(Some(m)) {
                tables.rows[*t].push(r);
            }
        }
        let ev = evaluate(&self.catalog, &inst.ast, &tables);
        Some(view_json(&self.catalog, &ev.nodes))
    }
}

/// The row a client holds for a primary key: the one with a positive count (the least such
/// row, should the dataflow ever hold two versions at once).
fn visible(m: Option<&Counts>) -> Option<Row> {
    m?.iter()
        .filter(|(_, c)| *c > 0)
        .map(|(r, _)| r)
        .min()
        .cloned()
}

/// Adds `d` to `row`'s count in `m`, dropping rows whose count reaches zero. The same row
/// usually arrives as the same allocation, which is compared first.
fn add_count(m: &mut Counts, row: Row, d: Diff) {
    match m.iter_mut().position(|(r, _)| r.same(&row) || *r == row) {
        Some(i) => {
            m[i].1 += d;
            if m[i].1 == 0 {
                m.swap_remove(i);
            }
        }
        None => m.push((row, d)),
    }
}

fn all_puts(catalog: &Catalog, inst: &Instance) -> Vec<RowPatch> {
    let mut v: Vec<RowPatch> = inst
        .rows
        .iter()
        .filter_map(|((t, pk), m)| {
            visible(Some(m)).map(|row| RowPatch::Put {
                table: Arc::clone(&catalog.tables[*t].name),
                pk: pk.clone(),
                row,
            })
        })
        .collect();
    // In table and primary-key order, as `rows` gives them (formatting each row to sort by it
    // cost more than the rest of a late subscriber's hydration).
    v.sort_by(|a, b| match (a, b) {
        (
            RowPatch::Put {
                table: ta, pk: ka, ..
            },
            RowPatch::Put {
                table: tb, pk: kb, ..
            },
        ) => ta.cmp(tb).then_with(|| ka.cmp(kb)),
        _ => std::cmp::Ordering::Equal,
    });
    v
}

impl Drop for Engine {
    fn drop(&mut self) {
        match &mut self.run {
            Workers::Inline(w) => {
                let w = &mut *w.borrow_mut();
                w.state.shutdown(&mut w.worker);
            }
            Workers::Threads {
                cmd_txs,
                threads,
                guards,
                ..
            } => {
                cmd_txs.clear();
                for th in threads.iter() {
                    th.unpark();
                }
                if let Some(g) = guards.take() {
                    // A worker that panicked already reported through a closed channel.
                    let _ = g.join();
                }
            }
        }
    }
}
