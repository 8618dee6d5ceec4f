//! The process's incremental view engine, shared by every client group.
//!
//! One service thread owns a [`zero_dataflow::Engine`] loaded with the replica's client tables.
//! It tails the replica: on every watermark it reads the `_zero.changeLog2` entries after the
//! version it has applied, looks up their new contents in one read snapshot, and applies them
//! as one engine version, so each commit costs work in proportion to what changed. View-syncers
//! subscribe their queries by hash; identical queries (same AST after permissions) run once, and
//! queries of one shape share a dataflow inside the engine. Every message a group receives
//! ([`EngineMsg`]) brings all of its queries to one committed replica version, which is what
//! keeps a poke equal to exactly one replica state.
//!
//! Old row contents (needed to retract a row from the dataflow) are kept as the very `Row`s fed
//! to the engine, so they cost a map entry per row, not a copy.
//!
//! Truncates, resets, schema changes and resyncs rebuild the engine from the replica and send
//! every subscriber its query's full rows; the view-syncer diffs them against the CVR, so
//! clients keep their state and receive only the difference.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use rusqlite::types::Value as SqlValue;
use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::Value as Json;
use tokio::sync::mpsc::{UnboundedReceiver, UnboundedSender};
use tokio::sync::watch;
use tracing::{debug, info, warn};
use zero_dataflow::{Engine, EngineConfig, Op, RowPatch, TableChange};
use zero_queries::Row;
use zero_queries::ast::Ast;
use zero_queries::schema::{Column, ColumnType, Schema, TableSchema};

use crate::schema::PublishedSchema;
use crate::sync::cvr::RowId;
use crate::sync::protocol::RowJson;
use crate::sync::source::{SyncedRow, VERSION_COLUMN};
use crate::sync::table_rows::TableRows;
use crate::upstream::quote_ident;
use crate::zql;

/// One row change of one query, ready for the CVR and the wire.
#[derive(Debug, Clone)]
pub(crate) struct PatchRow {
    /// The row's CVR identity.
    pub id: RowId,
    /// `(_0_version, contents)` when the row is (still) in the result; `None` when it left.
    pub put: Option<(String, RowJson)>,
}

/// What happened to one subscribed query.
#[derive(Debug, Clone)]
pub(crate) enum QueryUpdate {
    /// All of the query's rows (after subscribing, a fetch, or a rebuild).
    Full(Arc<Vec<SyncedRow>>),
    /// The rows that changed since the group's previous message.
    Patch(Arc<Vec<PatchRow>>),
    /// The engine cannot run the query.
    Failed(String),
}

/// A message to one client group. After applying it, every query of the group reflects the
/// replica at `state_version`.
#[derive(Debug, Clone)]
pub(crate) struct EngineMsg {
    /// Replica watermark the group's queries are at now.
    pub state_version: String,
    /// Replica identity.
    pub replica_version: String,
    /// Per query hash.
    pub updates: Vec<(String, QueryUpdate)>,
    /// Answers a [`Cmd::Fetch`]: `updates` has every subscribed query in full.
    pub fetched: bool,
    /// `{app}.permissions` changed in this version: legacy queries must be transformed again.
    pub permissions: bool,
    /// The engine's time to apply and step this version, for every query at once (ms; 0 when
    /// no step ran): the inspector's update time of the queries it changed.
    pub step_ms: f64,
    /// The group's `clients` / `mutations` rows may have changed since its previous message
    /// (always set on its first message and after a rebuild): only then does it read them.
    pub lmids: bool,
}

/// Requests to the service.
#[derive(Debug)]
pub(crate) enum Cmd {
    /// A group starts: it receives messages on `out`, first one at the current version.
    /// While `connected` is set (the group has a client), its message of each version is sent
    /// before those of groups nobody waits on, so the sync worker handles it first.
    Register {
        group: String,
        out: UnboundedSender<EngineMsg>,
        connected: Arc<AtomicBool>,
    },
    /// Query `hash` of `group` is `ast`; `keys` are the client schema's primary keys. Replaces
    /// an earlier subscription of the same hash.
    Subscribe {
        group: String,
        hash: String,
        ast: Box<Ast>,
        keys: Arc<BTreeMap<String, Vec<String>>>,
    },
    /// The group no longer needs query `hash`.
    Unsubscribe { group: String, hash: String },
    /// Send the group every subscribed query in full.
    Fetch { group: String },
    /// The group stopped: drop all of its subscriptions.
    Leave { group: String },
    /// Queries clients are likely to ask for (those stored in the CVRs at startup): their
    /// shapes' indexes are built when the replica is loaded (or now, if it is), so the first
    /// client of a shape does not pay for them while every group waits.
    Prepare { asts: Vec<Ast> },
    /// The inspector's `analyze-query`: hydrate `ast` once (or read it, when an identical
    /// query already runs) and answer with its rows and the time taken.
    Analyze {
        ast: Box<Ast>,
        keys: Arc<BTreeMap<String, Vec<String>>>,
        reply: tokio::sync::oneshot::Sender<Result<Analysis, String>>,
    },
    /// Stop the thread.
    Stop,
}

/// What an `analyze-query` found.
#[derive(Debug)]
pub(crate) struct Analysis {
    /// The rows a client would receive.
    pub rows: Vec<SyncedRow>,
    /// Adding the query, the engine step that hydrated it and reading its rows (ms).
    pub elapsed_ms: f64,
    /// An identical query was already running and hydrated, so its rows were only read.
    pub already_running: bool,
}

/// An `analyze-query` waiting for the next step.
struct PendingAnalysis {
    qid: String,
    keys: Arc<BTreeMap<String, Vec<String>>>,
    /// The query was added for this analysis and is removed after it.
    own: bool,
    /// Time spent adding the query to the engine (ms).
    add_ms: f64,
    reply: tokio::sync::oneshot::Sender<Result<Analysis, String>>,
}

/// Counters of the service, for `/statz` and tests.
#[derive(Debug, Default)]
pub(crate) struct EngineStats {
    /// Distinct queries running in the engine.
    pub queries: AtomicUsize,
    /// Subscriptions (group, hash).
    pub subscriptions: AtomicUsize,
    /// Dataflows (query shapes) running.
    pub shapes: AtomicUsize,
    /// Query instances in the engines: the distinct queries, plus any the inspector's
    /// `analyze-query` holds for the moment.
    pub instances: AtomicUsize,
    /// Rows loaded in the engine (0 until the replica is loaded).
    pub rows: AtomicUsize,
    /// Engines (one per distinct set of client primary keys; each holds every row, so more
    /// than one costs the replica's memory again).
    pub engines: AtomicUsize,
    /// The replica watermark the engine serves (empty while not loaded). Behind the replica's own
    /// watermark while a commit is being applied; a lasting gap means the engine lags.
    pub version: std::sync::Mutex<String>,
}

/// The handle view-syncers use.
#[derive(Debug, Clone)]
pub(crate) struct EngineHandle {
    tx: UnboundedSender<Cmd>,
    pub(crate) stats: Arc<EngineStats>,
}

impl EngineHandle {
    /// Starts the service thread over the replica at `replica_file`. Tables of the app and
    /// shard schemas (`app_id.*`, `shard_schema.*`) are internal and stay out of the engine,
    /// but changes to `{shard}.clients` / `{shard}.mutations` are reported to their groups.
    /// The thread waits on `watermarks` itself: a commit wakes it directly, with no task in
    /// between to forward the news.
    pub(crate) fn start(
        replica_file: PathBuf,
        app_id: String,
        shard_schema: String,
        workers: usize,
        watermarks: watch::Receiver<String>,
    ) -> std::io::Result<EngineHandle> {
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let stats = Arc::new(EngineStats::default());
        let st = stats.clone();
        let workers = workers.max(1);
        // The service is built on its thread: an engine with one worker runs that worker on
        // the calling thread, so it stays on the thread that created it.
        std::thread::Builder::new()
            .name("view-engine".into())
            .spawn(move || {
                let svc = Service {
                    replica_file,
                    internal: vec![format!("{app_id}."), format!("{shard_schema}.")],
                    permissions_table: format!("{app_id}.permissions"),
                    lmid_tables: [
                        format!("{shard_schema}.clients"),
                        format!("{shard_schema}.mutations"),
                    ],
                    workers,
                    ready: None,
                    queries: HashMap::new(),
                    subs: BTreeMap::new(),
                    groups: HashMap::new(),
                    prepared: Vec::new(),
                    tail: None,
                    pending: Vec::new(),
                    analyses: Vec::new(),
                    step_ms: 0.0,
                    seq: 0,
                    stats: st,
                };
                svc.run(rx, watermarks)
            })?;
        Ok(EngineHandle { tx, stats })
    }

    /// Sends a command; false when the service is gone.
    pub(crate) fn send(&self, cmd: Cmd) -> bool {
        self.tx.send(cmd).is_ok()
    }
}

/// Why loading from or advancing over the replica failed.
#[derive(Debug, thiserror::Error)]
enum LoadError {
    #[error("replica: {0}")]
    Sqlite(#[from] rusqlite::Error),
    #[error(transparent)]
    Replica(#[from] crate::replica::ReplicaError),
    #[error("engine: {0}")]
    Engine(#[from] zero_dataflow::EngineError),
}

struct TableInfo {
    schema: TableSchema,
    /// Column indexes of the replica key (which the change log uses).
    key_cols: Vec<usize>,
    /// `SELECT ... WHERE key IS ?` by replica key.
    lookup_sql: String,
}

/// One engine per distinct set of client primary keys (normally exactly one).
struct Slot {
    keys: Arc<BTreeMap<String, Vec<String>>>,
    schema: Schema,
    engine: Engine,
}

struct Ready {
    replica_version: String,
    state_version: String,
    published: PublishedSchema,
    /// `published` as the replica stores it: each watermark compares the text instead of
    /// parsing the schema again.
    published_text: String,
    tables: BTreeMap<String, TableInfo>,
    /// Current rows per table by primary key: exactly the `Row`s fed to the engine.
    rows: HashMap<String, TableRows>,
    slots: Vec<Slot>,
}

struct SvcQuery {
    keys: Arc<BTreeMap<String, Vec<String>>>,
    ast: Ast,
    subscribers: BTreeSet<(String, String)>,
    /// Set while the engine runs it; `None` when it failed or is waiting for the replica.
    running: bool,
}

struct Service {
    replica_file: PathBuf,
    internal: Vec<String>,
    permissions_table: String,
    lmid_tables: [String; 2],
    workers: usize,
    ready: Option<Ready>,
    /// Engine query id → query.
    queries: HashMap<String, SvcQuery>,
    /// (group, hash) → engine query id (ordered, so that a group's subscriptions are a range).
    subs: BTreeMap<(String, String), String>,
    groups: HashMap<String, Group>,
    /// The connection that reads each watermark's changes, with the replica file's inode.
    tail: Option<(Connection, u64)>,
    /// Query shapes to prepare whenever the engine is (re)built ([`Cmd::Prepare`]).
    prepared: Vec<Ast>,
    /// Subscriptions that need their full rows at the next step.
    pending: Vec<(String, String)>,
    /// Analyses answered at the next step.
    analyses: Vec<PendingAnalysis>,
    /// The engine's time to apply and step the latest version (ms; 0 when it had nothing to
    /// apply).
    step_ms: f64,
    seq: u64,
    stats: Arc<EngineStats>,
}

/// A registered group.
struct Group {
    out: UnboundedSender<EngineMsg>,
    /// See [`Cmd::Register`].
    connected: Arc<AtomicBool>,
}

/// What woke the service thread.
enum Wake {
    Cmd(Option<Cmd>),
    /// A new watermark, or `false` when the replica's publisher is gone.
    Watermark(bool),
}

/// Output of one step for the groups.
#[derive(Default)]
struct Outbox {
    msgs: HashMap<String, Vec<(String, QueryUpdate)>>,
    /// Groups that must get a message even without query updates (LMIDs, first message).
    touched: HashSet<String>,
    fetched: HashSet<String>,
    permissions: bool,
    /// Groups whose LMIDs / mutation results may have changed ([`EngineMsg::lmids`]).
    lmids: HashSet<String>,
    /// Every group's may have.
    all_lmids: bool,
}

impl Outbox {
    fn push(&mut self, group: &str, hash: &str, u: QueryUpdate) {
        self.msgs
            .entry(group.to_string())
            .or_default()
            .push((hash.to_string(), u));
    }
}

fn query_id(keys: &BTreeMap<String, Vec<String>>, ast: &Ast) -> String {
    let k = serde_json::to_string(keys).unwrap_or_default();
    format!(
        "{}:{}",
        zero_queries::hash::h64_base36(&k),
        zero_queries::hash::h64_base36(&ast.to_json_string())
    )
}

impl Service {
    fn run(mut self, mut rx: UnboundedReceiver<Cmd>, mut watermarks: watch::Receiver<String>) {
        // The current watermark (if any) is read once at start, as after any later commit.
        watermarks.mark_changed();
        let mut wm = Some(watermarks);
        loop {
            let wake = futures::executor::block_on(async {
                tokio::select! {
                    biased;
                    c = rx.recv() => Wake::Cmd(c),
                    r = async {
                        match wm.as_mut() {
                            Some(w) => w.changed().await.is_ok(),
                            None => std::future::pending().await,
                        }
                    } => Wake::Watermark(r),
                }
            });
            let mut batch = Vec::new();
            let mut watermark = false;
            match wake {
                Wake::Cmd(None) => return,
                Wake::Cmd(Some(c)) => batch.push(c),
                Wake::Watermark(true) => watermark = true,
                Wake::Watermark(false) => wm = None,
            }
            while let Ok(c) = rx.try_recv() {
                batch.push(c);
            }
            // Seen before the changes are read: a commit after this wakes the thread again.
            if let Some(w) = wm.as_mut()
                && w.has_changed().unwrap_or(false)
            {
                w.mark_unchanged();
                watermark = true;
            }
            let mut out = Outbox::default();
            let started = std::time::Instant::now();
            let commands = batch.len();
            for cmd in batch {
                match cmd {
                    Cmd::Stop => return,
                    Cmd::Register {
                        group,
                        out: tx,
                        connected,
                    } => {
                        self.groups
                            .insert(group.clone(), Group { out: tx, connected });
                        out.lmids.insert(group.clone());
                        out.touched.insert(group);
                    }
                    Cmd::Subscribe {
                        group,
                        hash,
                        ast,
                        keys,
                    } => self.subscribe(group, hash, *ast, keys, &mut out),
                    Cmd::Unsubscribe { group, hash } => self.unsubscribe(&group, &hash),
                    Cmd::Fetch { group } => {
                        out.fetched.insert(group);
                    }
                    Cmd::Analyze { ast, keys, reply } => self.analyze(*ast, keys, reply),
                    Cmd::Prepare { asts } => {
                        if let Some(ready) = self.ready.as_mut() {
                            prepare_shapes(ready, &asts);
                        }
                        self.prepared.extend(asts);
                    }
                    Cmd::Leave { group } => {
                        let hashes: Vec<String> =
                            self.group_subs(&group).map(|(_, h)| h.clone()).collect();
                        for h in hashes {
                            self.unsubscribe(&group, &h);
                        }
                        self.groups.remove(&group);
                    }
                }
            }
            let commands_ms = started.elapsed().as_secs_f64() * 1000.0;
            if let Err(e) = self.step(watermark, &mut out) {
                warn!(error = %e, "view engine could not advance; rebuilding at the next watermark");
                self.ready = None;
            }
            self.finish_analyses();
            let step_ms = started.elapsed().as_secs_f64() * 1000.0;
            self.send(out);
            let ms = started.elapsed().as_secs_f64() * 1000.0;
            if ms >= 20.0 {
                debug!(commands, commands_ms, step_ms, ms, "slow view engine round");
            }
            self.stats.queries.store(
                self.queries.values().filter(|q| q.running).count(),
                Ordering::Relaxed,
            );
            self.stats
                .subscriptions
                .store(self.subs.len(), Ordering::Relaxed);
            self.stats.rows.store(
                self.ready
                    .as_ref()
                    .map_or(0, |r| r.rows.values().map(TableRows::len).sum()),
                Ordering::Relaxed,
            );
            self.stats.engines.store(
                self.ready.as_ref().map_or(0, |r| r.slots.len()),
                Ordering::Relaxed,
            );
            {
                // Empty while the engine is not loaded (before the first load, or rebuilding
                // after a failed step): no version is served then.
                let serving = self.ready.as_ref().map_or("", |r| r.state_version.as_str());
                let mut v = self.stats.version.lock().unwrap_or_else(|e| e.into_inner());
                if *v != serving {
                    v.clear();
                    v.push_str(serving);
                }
            }
            self.stats.instances.store(
                self.ready.as_ref().map_or(0, |r| {
                    r.slots.iter().map(|s| s.engine.instance_count()).sum()
                }),
                Ordering::Relaxed,
            );
            self.stats.shapes.store(
                self.ready.as_ref().map_or(0, |r| {
                    r.slots.iter().map(|s| s.engine.template_count()).sum()
                }),
                Ordering::Relaxed,
            );
        }
    }

    /// The (group, hash) keys of `group`'s subscriptions.
    fn group_subs<'a>(&'a self, group: &'a str) -> impl Iterator<Item = &'a (String, String)> + 'a {
        self.subs
            .range((group.to_string(), String::new())..)
            .map(|(k, _)| k)
            .take_while(move |(g, _)| g == group)
    }

    fn subscribe(
        &mut self,
        group: String,
        hash: String,
        ast: Ast,
        keys: Arc<BTreeMap<String, Vec<String>>>,
        out: &mut Outbox,
    ) {
        self.unsubscribe(&group, &hash);
        let qid = query_id(&keys, &ast);
        let key = (group, hash);
        self.subs.insert(key.clone(), qid.clone());
        let q = self.queries.entry(qid.clone()).or_insert_with(|| SvcQuery {
            keys,
            ast,
            subscribers: BTreeSet::new(),
            running: false,
        });
        q.subscribers.insert(key.clone());
        if !q.running
            && let Some(ready) = self.ready.as_mut()
        {
            match start_query(ready, self.workers, self.seq, &qid, q) {
                Ok(()) => q.running = true,
                Err(e) => {
                    debug!(query = %key.1, error = %e, "the engine cannot run this query");
                    out.push(&key.0, &key.1, QueryUpdate::Failed(e));
                    return;
                }
            }
        }
        self.pending.push(key);
    }

    /// Answers an analysis now when an identical query runs and is hydrated; otherwise adds
    /// the query to the engine (unless a subscription of this batch did) and answers after
    /// the next step.
    fn analyze(
        &mut self,
        ast: Ast,
        keys: Arc<BTreeMap<String, Vec<String>>>,
        reply: tokio::sync::oneshot::Sender<Result<Analysis, String>>,
    ) {
        let Some(ready) = self.ready.as_mut() else {
            let _ = reply.send(Err("the replica is not loaded yet".into()));
            return;
        };
        let started = std::time::Instant::now();
        let shared = query_id(&keys, &ast);
        if self.queries.get(&shared).is_some_and(|q| q.running) {
            // Subscribed in this batch: hydrated by the next step, like the analysis.
            let hydrating = self
                .pending
                .iter()
                .any(|k| self.subs.get(k) == Some(&shared));
            if hydrating {
                self.analyses.push(PendingAnalysis {
                    qid: shared,
                    keys,
                    own: false,
                    add_ms: 0.0,
                    reply,
                });
                return;
            }
            let rows = ready
                .slots
                .iter()
                .find(|s| s.keys == keys)
                .and_then(|slot| full_rows(slot, &shared));
            let _ = reply.send(
                rows.ok_or_else(|| "the query is not running".into())
                    .map(|rows| Analysis {
                        rows,
                        elapsed_ms: started.elapsed().as_secs_f64() * 1000.0,
                        already_running: true,
                    }),
            );
            return;
        }
        // Its own id: a client may subscribe the same query before the step.
        let qid = format!("analyze:{}:{shared}", self.analyses.len());
        let q = SvcQuery {
            keys: keys.clone(),
            ast,
            subscribers: BTreeSet::new(),
            running: false,
        };
        match start_query(ready, self.workers, self.seq, &qid, &q) {
            Ok(()) => self.analyses.push(PendingAnalysis {
                qid,
                keys,
                own: true,
                add_ms: started.elapsed().as_secs_f64() * 1000.0,
                reply,
            }),
            Err(e) => {
                let _ = reply.send(Err(e));
            }
        }
    }

    /// Answers the queued analyses once their queries are hydrated. An analysis's time is its
    /// query's set-up, the step that hydrated it (shared with whatever else that step did) and
    /// reading its rows.
    fn finish_analyses(&mut self) {
        for a in std::mem::take(&mut self.analyses) {
            let started = std::time::Instant::now();
            let slot = self
                .ready
                .as_mut()
                .and_then(|r| r.slots.iter_mut().find(|s| s.keys == a.keys));
            let Some((slot, rows)) =
                slot.and_then(|slot| full_rows(slot, &a.qid).map(|rows| (slot, rows)))
            else {
                let _ = a.reply.send(Err(
                    "the query stopped before it could be read (the view engine was rebuilt, or its last subscriber left); try again"
                        .into(),
                ));
                continue;
            };
            let elapsed_ms = a.add_ms + self.step_ms + started.elapsed().as_secs_f64() * 1000.0;
            if a.own
                && let Err(e) = slot.engine.remove_query(&a.qid)
            {
                warn!(error = %e, "removing an analyzed query from the engine failed");
            }
            let _ = a.reply.send(Ok(Analysis {
                rows,
                elapsed_ms,
                already_running: false,
            }));
        }
    }

    fn unsubscribe(&mut self, group: &str, hash: &str) {
        let key = (group.to_string(), hash.to_string());
        self.pending.retain(|k| *k != key);
        let Some(qid) = self.subs.remove(&key) else {
            return;
        };
        let Some(q) = self.queries.get_mut(&qid) else {
            return;
        };
        q.subscribers.remove(&key);
        if q.subscribers.is_empty() {
            let q = self.queries.remove(&qid).expect("present");
            if q.running
                && let Some(ready) = self.ready.as_mut()
                && let Some(slot) = ready.slots.iter_mut().find(|s| s.keys == q.keys)
                && let Err(e) = slot.engine.remove_query(&qid)
            {
                warn!(error = %e, "removing a query from the engine failed");
            }
            debug!(query = %hash, "query released from the engine");
        }
    }

    /// Applies what the replica committed since the last step (when `watermark`), hydrates
    /// pending subscriptions, and fills `out`.
    fn step(&mut self, watermark: bool, out: &mut Outbox) -> Result<(), LoadError> {
        self.step_ms = 0.0;
        let mut changes: Vec<TableChange> = Vec::new();
        if self.ready.is_none() {
            if !(watermark || !self.pending.is_empty() || !out.touched.is_empty()) {
                return Ok(());
            }
            if !self.load()? {
                // Not ready: registered groups get their first message once it is.
                return Ok(());
            }
            out.all_lmids = true;
            out.touched.extend(self.groups.keys().cloned());
        } else if watermark {
            match self.read_changes(out)? {
                Some(c) => changes = c,
                None => {
                    // Reset: rebuild everything and resend every subscription in full.
                    info!("replica reset or schema change: rebuilding the view engine");
                    self.ready = None;
                    if !self.load()? {
                        return Ok(());
                    }
                    out.all_lmids = true;
                    out.touched.extend(self.groups.keys().cloned());
                }
            }
        }
        let ready = self.ready.as_mut().expect("loaded above");
        let needs_step =
            !changes.is_empty() || !self.pending.is_empty() || !self.analyses.is_empty();
        let mut diffs = Vec::new();
        let started = std::time::Instant::now();
        let n_changes = changes.len();
        if needs_step {
            self.seq += 1;
            let n = ready.slots.len();
            for (i, slot) in ready.slots.iter_mut().enumerate() {
                let batch = if i + 1 == n {
                    std::mem::take(&mut changes)
                } else {
                    changes.clone()
                };
                slot.engine.apply(self.seq, batch)?;
            }
            for slot in ready.slots.iter_mut() {
                diffs.push(slot.engine.step_until(self.seq)?);
            }
            self.step_ms = started.elapsed().as_secs_f64() * 1000.0;
        }
        let pending: HashSet<(String, String)> =
            std::mem::take(&mut self.pending).into_iter().collect();
        for (slot, slot_diffs) in ready.slots.iter().zip(&diffs) {
            // A row put by several queries (instances of one shape with other literals) is
            // rendered once: the engine hands every query the same allocation.
            let mut rendered: HashMap<usize, PatchRow> = HashMap::new();
            for d in slot_diffs {
                if d.initial || d.patches.is_empty() {
                    continue;
                }
                let Some(q) = self.queries.get(&d.query) else {
                    continue;
                };
                let rows: Arc<Vec<PatchRow>> = Arc::new(
                    d.patches
                        .iter()
                        .filter_map(|p| match p {
                            RowPatch::Put { row, .. } => {
                                if let Some(r) = rendered.get(&row.addr()) {
                                    return Some(r.clone());
                                }
                                let r = patch_row(&slot.schema, p)?;
                                rendered.insert(row.addr(), r.clone());
                                Some(r)
                            }
                            RowPatch::Del { .. } => patch_row(&slot.schema, p),
                        })
                        .collect(),
                );
                for key in &q.subscribers {
                    if !pending.contains(key) {
                        out.push(&key.0, &key.1, QueryUpdate::Patch(rows.clone()));
                    }
                }
            }
        }
        if needs_step {
            debug!(
                changes = n_changes,
                hydrating = pending.len(),
                ms = started.elapsed().as_secs_f64() * 1000.0,
                "engine step"
            );
        }
        // Full rows: new subscriptions, and everything of groups that asked.
        let mut full: BTreeSet<(String, String)> = pending.into_iter().collect();
        for g in &out.fetched {
            full.extend(
                self.subs
                    .range((g.clone(), String::new())..)
                    .map(|(k, _)| k)
                    .take_while(|(kg, _)| kg == g)
                    .cloned(),
            );
        }
        let mut cache: HashMap<String, Arc<Vec<SyncedRow>>> = HashMap::new();
        for key in full {
            let Some(qid) = self.subs.get(&key) else {
                continue;
            };
            let Some(q) = self.queries.get(qid) else {
                continue;
            };
            if !q.running {
                out.push(
                    &key.0,
                    &key.1,
                    QueryUpdate::Failed("the query could not be started".into()),
                );
                continue;
            }
            let rows = match cache.get(qid) {
                Some(r) => r.clone(),
                None => {
                    let slot = ready
                        .slots
                        .iter()
                        .find(|s| s.keys == q.keys)
                        .expect("running queries have a slot");
                    let rows = Arc::new(full_rows(slot, qid).unwrap_or_default());
                    cache.insert(qid.clone(), rows.clone());
                    rows
                }
            };
            out.push(&key.0, &key.1, QueryUpdate::Full(rows));
        }
        Ok(())
    }

    fn send(&mut self, out: Outbox) {
        let Some(ready) = self.ready.as_ref() else {
            return;
        };
        let Outbox {
            mut msgs,
            touched,
            fetched,
            permissions,
            lmids,
            all_lmids,
        } = out;
        let mut groups: BTreeSet<String> = msgs.keys().cloned().collect();
        groups.extend(touched);
        groups.extend(fetched.iter().cloned());
        // Groups with a client first: the sync worker starts on the first message while later
        // ones are still being sent, and a group nobody waits on must not take its turn.
        let (connected, idle): (Vec<String>, Vec<String>) = groups.into_iter().partition(|g| {
            self.groups
                .get(g)
                .is_some_and(|r| r.connected.load(Ordering::Relaxed))
        });
        for g in connected.into_iter().chain(idle) {
            let Some(Group { out: tx, .. }) = self.groups.get(&g) else {
                continue;
            };
            let msg = EngineMsg {
                state_version: ready.state_version.clone(),
                replica_version: ready.replica_version.clone(),
                updates: msgs.remove(&g).unwrap_or_default(),
                fetched: fetched.contains(&g),
                permissions,
                lmids: all_lmids || lmids.contains(&g),
                step_ms: self.step_ms,
            };
            if tx.send(msg).is_err() {
                debug!(client_group = %g, "view-syncer gone");
            }
        }
    }

    fn open(&self) -> Result<Option<Connection>, LoadError> {
        if !self.replica_file.exists() {
            return Ok(None);
        }
        let conn = Connection::open_with_flags(
            &self.replica_file,
            OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
        )?;
        conn.pragma_update(None, "busy_timeout", 30_000)?;
        Ok(Some(conn))
    }

    /// Loads every client table at one snapshot into new engines and restarts every query.
    /// False when the replica is not ready yet.
    fn load(&mut self) -> Result<bool, LoadError> {
        let Some(conn) = self.open()? else {
            return Ok(false);
        };
        conn.execute_batch("BEGIN")?;
        let Some(state) = crate::replica::read_state(&conn)? else {
            return Ok(false);
        };
        let started = std::time::Instant::now();
        let mut schema = zql::replica_schema(&state.schema);
        schema
            .tables
            .retain(|name, _| !self.internal.iter().any(|p| name.starts_with(p.as_str())));
        let mut tables = BTreeMap::new();
        let mut rows: HashMap<String, TableRows> = HashMap::new();
        let mut total = 0usize;
        for (name, t) in schema.tables.iter_mut() {
            t.columns.push(Column {
                name: VERSION_COLUMN.into(),
                ty: ColumnType::String,
                optional: false,
            });
            let key_cols: Vec<usize> = t
                .primary_key
                .iter()
                .filter_map(|k| t.column_index(k))
                .collect();
            let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(&c.name)).collect();
            let conds: Vec<String> = t
                .primary_key
                .iter()
                .enumerate()
                .map(|(i, k)| format!("{} IS ?{}", quote_ident(k), i + 1))
                .collect();
            let lookup_sql = format!(
                "SELECT {} FROM {} WHERE {}",
                cols.join(", "),
                quote_ident(name),
                conds.join(" AND ")
            );
            let table_rows = zql::read_table(&conn, t)?;
            total += table_rows.len();
            let mut map = TableRows::new(key_cols.clone(), table_rows.len());
            for r in table_rows {
                map.insert(r);
            }
            rows.insert(name.clone(), map);
            tables.insert(
                name.clone(),
                TableInfo {
                    schema: t.clone(),
                    key_cols,
                    lookup_sql,
                },
            );
        }
        let permissions: Option<String> = conn
            .query_row(
                &format!(
                    "SELECT permissions FROM {} LIMIT 1",
                    quote_ident(&self.permissions_table)
                ),
                [],
                |r| r.get(0),
            )
            .optional()
            .ok()
            .flatten();
        let published_text = crate::replica::read_stored_state(&conn)?
            .map(|s| s.schema)
            .unwrap_or_default();
        conn.execute_batch("COMMIT")?;
        let mut ready = Ready {
            replica_version: state.replica_version.clone(),
            state_version: state.watermark.clone(),
            published: state.schema.clone(),
            published_text,
            tables,
            rows,
            slots: Vec::new(),
        };
        self.seq += 1;
        // Legacy queries run with the permission rules applied: prepare those shapes, in the
        // empty engine, so their indexes fill as the rows load.
        let perms = permissions
            .as_deref()
            .and_then(|t| zero_queries::permissions::Permissions::from_json_str(t).ok())
            .unwrap_or_default();
        let prepared: Vec<Ast> = self
            .prepared
            .iter()
            .map(|a| zero_queries::permissions::transform_query(a, &perms, None))
            .collect();
        let default_keys: Arc<BTreeMap<String, Vec<String>>> = Arc::new(BTreeMap::new());
        let mut key_sets: Vec<Arc<BTreeMap<String, Vec<String>>>> = vec![default_keys];
        for q in self.queries.values() {
            if !key_sets.contains(&q.keys) {
                key_sets.push(q.keys.clone());
            }
        }
        for (i, keys) in key_sets.into_iter().enumerate() {
            let prepare: &[Ast] = if i == 0 { &prepared } else { &[] };
            ready.slots.push(new_slot(
                &ready,
                &schema,
                keys,
                self.workers,
                self.seq,
                prepare,
            )?);
        }
        let qids: Vec<String> = self.queries.keys().cloned().collect();
        self.pending.clear();
        for qid in qids {
            let q = self.queries.get_mut(&qid).expect("listed");
            q.running = false;
            match start_query(&mut ready, self.workers, self.seq, &qid, q) {
                Ok(()) => q.running = true,
                Err(e) => debug!(error = %e, "the engine cannot run a query"),
            }
            self.pending.extend(q.subscribers.iter().cloned());
        }
        info!(
            rows = total,
            tables = ready.tables.len(),
            queries = self.queries.len(),
            ms = started.elapsed().as_millis() as u64,
            state_version = %ready.state_version,
            "view engine loaded the replica"
        );
        self.ready = Some(ready);
        Ok(true)
    }

    /// The changes since the applied version, as engine changes; `None` when the replica was
    /// reset, truncated, resynced or changed schema (the engine must be rebuilt).
    fn read_changes(&mut self, out: &mut Outbox) -> Result<Option<Vec<TableChange>>, LoadError> {
        // The tail connection is kept between watermarks (opening one and reading the schema
        // costs more than a small commit's changes); a resync replaces the file, and with it
        // the connection.
        use std::os::unix::fs::MetadataExt;
        let Ok(ino) = std::fs::metadata(&self.replica_file).map(|m| m.ino()) else {
            return Ok(Some(Vec::new()));
        };
        let conn = match self.tail.take() {
            Some((c, i)) if i == ino => c,
            _ => match self.open()? {
                Some(c) => c,
                None => return Ok(Some(Vec::new())),
            },
        };
        // Cached statements: `execute_batch` would compile them again on every watermark.
        conn.prepare_cached("BEGIN")?.execute([])?;
        let r = self.read_changes_in(&conn, out);
        if conn
            .prepare_cached("COMMIT")
            .and_then(|mut st| st.execute([]))
            .is_ok()
        {
            self.tail = Some((conn, ino));
        }
        r
    }

    fn read_changes_in(
        &mut self,
        conn: &Connection,
        out: &mut Outbox,
    ) -> Result<Option<Vec<TableChange>>, LoadError> {
        let ready = self.ready.as_mut().expect("ready");
        // The common case in one statement that neither copies the schema text out nor scans
        // `sqlite_master`; anything else takes the full read below.
        let quick = crate::replica::read_versions_if_schema(conn, &ready.published_text);
        let (replica_version, watermark) = match quick {
            Ok(Some(versions)) => versions,
            _ => {
                let Some(crate::replica::StoredState {
                    replica_version,
                    watermark,
                    schema: schema_text,
                    ..
                }) = crate::replica::read_stored_state(conn)?
                else {
                    return Ok(Some(Vec::new()));
                };
                if replica_version == ready.replica_version && schema_text != ready.published_text {
                    match serde_json::from_str::<PublishedSchema>(&schema_text) {
                        Ok(schema) if schema == ready.published => {
                            ready.published_text = schema_text
                        }
                        _ => return Ok(None),
                    }
                }
                (replica_version, watermark)
            }
        };
        if replica_version != ready.replica_version {
            return Ok(None);
        }
        if watermark <= ready.state_version {
            return Ok(Some(Vec::new()));
        }
        let mut entries: Vec<(String, String, String)> = Vec::new();
        {
            let mut st = conn.prepare_cached(
                r#"SELECT "table", "rowKey", op FROM "_zero.changeLog2" WHERE "stateVersion" > ?1 ORDER BY "stateVersion", "pos""#,
            )?;
            let rows = st.query_map([&ready.state_version], |r| {
                Ok((r.get(0)?, r.get(1)?, r.get(2)?))
            })?;
            for r in rows {
                entries.push(r?);
            }
        }
        let mut changes = Vec::new();
        for (table, key, op) in entries {
            if table == self.permissions_table {
                out.permissions = true;
                out.touched.extend(self.groups.keys().cloned());
                continue;
            }
            if op == "t" || op == "r" {
                if ready.tables.contains_key(&table) {
                    return Ok(None);
                }
                if self.lmid_tables.contains(&table) {
                    out.all_lmids = true;
                    out.touched.extend(self.groups.keys().cloned());
                }
                continue;
            }
            if self.lmid_tables.contains(&table) {
                if let Ok(k) = serde_json::from_str::<Json>(&key)
                    && let Some(g) = k["clientGroupID"].as_str()
                {
                    out.lmids.insert(g.to_string());
                    out.touched.insert(g.to_string());
                }
                continue;
            }
            let Some(info) = ready.tables.get(&table) else {
                continue;
            };
            let Ok(Json::Object(key_obj)) = serde_json::from_str::<Json>(&key) else {
                warn!(%table, %key, "unreadable change-log key");
                continue;
            };
            let params: Vec<SqlValue> = info
                .schema
                .primary_key
                .iter()
                .map(|k| json_to_sql(key_obj.get(k).unwrap_or(&Json::Null)))
                .collect();
            let key: Vec<zero_queries::Value> = info
                .key_cols
                .iter()
                .zip(&params)
                .map(|(&i, p)| zql::value_from_sqlite(info.schema.columns[i].ty, p.clone()))
                .collect();
            let Some(table_rows) = ready.rows.get_mut(&table) else {
                continue;
            };
            if let Some(old) = table_rows.remove(&key) {
                changes.push(TableChange {
                    table: table.clone(),
                    op: Op::Delete,
                    row: old,
                });
            }
            if op == "d" {
                continue;
            }
            let types: Vec<ColumnType> = info.schema.columns.iter().map(|c| c.ty).collect();
            let new: Option<Row> = conn
                .prepare_cached(&info.lookup_sql)?
                .query_row(rusqlite::params_from_iter(params), |r| {
                    let mut row = Vec::with_capacity(types.len());
                    for (i, ty) in types.iter().enumerate() {
                        row.push(zql::value_from_sqlite(*ty, r.get::<_, SqlValue>(i)?));
                    }
                    Ok(Row::from(row))
                })
                .optional()?;
            if let Some(new) = new {
                // Keys compare as values: the change log may write one differently (1 vs 1.0).
                table_rows.insert(new.clone());
                changes.push(TableChange {
                    table,
                    op: Op::Insert,
                    row: new,
                });
            }
        }
        ready.state_version = watermark;
        debug!(changes = changes.len(), state_version = %ready.state_version, "replica changes for the view engine");
        Ok(Some(changes))
    }
}

fn json_to_sql(v: &Json) -> SqlValue {
    match v {
        Json::Null => SqlValue::Null,
        Json::Bool(b) => SqlValue::Integer(i64::from(*b)),
        Json::Number(n) => match n.as_i64() {
            Some(i) => SqlValue::Integer(i),
            None => SqlValue::Real(n.as_f64().unwrap_or_default()),
        },
        Json::String(s) => SqlValue::Text(s.clone()),
        other => SqlValue::Text(other.to_string()),
    }
}

/// A new engine for client primary keys `keys`, loaded with every current row at `version`.
fn new_slot(
    ready: &Ready,
    schema: &Schema,
    keys: Arc<BTreeMap<String, Vec<String>>>,
    workers: usize,
    version: u64,
    prepare: &[Ast],
) -> Result<Slot, LoadError> {
    let mut schema = schema.clone();
    for (t, k) in keys.iter() {
        if let Some(ts) = schema.tables.get_mut(t)
            && k.iter().all(|c| ts.column_index(c).is_some())
        {
            ts.primary_key = k.clone();
        }
    }
    let mut engine = Engine::new(EngineConfig { workers }, &schema)?;
    for (table, column) in zql::lookup_hints(&ready.published, &schema) {
        if let Err(e) = engine.prepare_index(&table, std::slice::from_ref(&column)) {
            debug!(%table, %column, error = %e, "an upstream index's lookup could not be prepared");
        }
    }
    for (table, key, column) in zql::order_hints(&ready.published, &schema) {
        for desc in [false, true] {
            if let Err(e) = engine.prepare_order(&table, &key, &[(column.clone(), desc)]) {
                debug!(%table, %column, error = %e, "an upstream index's ordering could not be prepared");
            }
        }
    }
    if !prepare.is_empty() {
        let t = std::time::Instant::now();
        for ast in prepare {
            if let Err(e) = engine.prepare(ast) {
                debug!(error = %e, "a stored query's shape could not be prepared");
            }
        }
        info!(
            shapes = prepare.len(),
            ms = t.elapsed().as_millis() as u64,
            "view engine prepared the stored queries' shapes"
        );
    }
    let mut changes = Vec::new();
    for (table, rows) in &ready.rows {
        for r in rows.iter() {
            changes.push(TableChange {
                table: table.clone(),
                op: Op::Insert,
                row: r.clone(),
            });
        }
    }
    engine.apply(version, changes)?;
    engine.step_until(version)?;
    Ok(Slot {
        keys,
        schema,
        engine,
    })
}

/// Builds the indexes of `asts`' shapes in the default engine (queries the engine cannot run
/// are skipped: they fail again, with their error, when a client subscribes them).
fn prepare_shapes(ready: &mut Ready, asts: &[Ast]) {
    let Some(slot) = ready.slots.first_mut() else {
        return;
    };
    for ast in asts {
        if let Err(e) = slot.engine.prepare(ast) {
            debug!(error = %e, "a stored query's shape could not be prepared");
        }
    }
}

/// Adds `q` to the engine of its keys (creating that engine when it is the first).
fn start_query(
    ready: &mut Ready,
    workers: usize,
    version: u64,
    qid: &str,
    q: &SvcQuery,
) -> Result<(), String> {
    if !ready.slots.iter().any(|s| s.keys == q.keys) {
        let base = ready
            .slots
            .first()
            .map(|s| s.schema.clone())
            .ok_or("no engine")?;
        // The base schema may carry other keys; start from the replica keys.
        let mut schema = base;
        for (name, t) in schema.tables.iter_mut() {
            if let Some(info) = ready.tables.get(name) {
                t.primary_key = info.schema.primary_key.clone();
            }
        }
        let slot = new_slot(ready, &schema, q.keys.clone(), workers, version, &[])
            .map_err(|e| e.to_string())?;
        ready.slots.push(slot);
    }
    let slot = ready
        .slots
        .iter_mut()
        .find(|s| s.keys == q.keys)
        .expect("created above");
    slot.engine
        .add_query(qid, &q.ast)
        .map_err(|e| e.to_string())
}

fn row_parts(t: &TableSchema, row: &Row) -> (String, String, RowJson) {
    let mut obj = serde_json::Map::new();
    let mut version = String::new();
    for (c, v) in t.columns.iter().zip(row.iter()) {
        if c.name == VERSION_COLUMN {
            if let zero_queries::Value::String(s) = &v {
                version = s.to_string();
            }
        } else {
            obj.insert(c.name.clone(), v.to_json());
        }
    }
    let mut key = serde_json::Map::new();
    for k in sorted_key(&t.primary_key) {
        key.insert(k.clone(), obj.get(k).cloned().unwrap_or(Json::Null));
    }
    (
        Json::Object(key).to_string(),
        version,
        RowJson::new(&Json::Object(obj)),
    )
}

/// Whether two primary keys have the same columns. Order does not count: Zero's clients send
/// their keys sorted (a table keyed `(b, a)` upstream arrives as `(a, b)`), and row keys are
/// written in [`sorted_key`] order.
pub(crate) fn same_key_columns(a: &[String], b: &[String]) -> bool {
    a.len() == b.len() && a.iter().all(|c| b.contains(c))
}

/// A row key's columns in name order: a row's key string (its CVR identity) is the same
/// whichever order the replica or the client lists its primary key in.
pub(crate) fn sorted_key(pk: &[String]) -> Vec<&String> {
    let mut cols: Vec<&String> = pk.iter().collect();
    cols.sort_unstable();
    cols
}

fn patch_row(schema: &Schema, p: &RowPatch) -> Option<PatchRow> {
    match p {
        RowPatch::Put { table, row, .. } => {
            let t = schema.table(table)?;
            let (key, version, value) = row_parts(t, row);
            Some(PatchRow {
                id: (table.to_string(), key),
                put: Some((version, value)),
            })
        }
        RowPatch::Del { table, pk } => {
            let t = schema.table(table)?;
            let mut pairs: Vec<(&String, &zero_queries::Value)> =
                t.primary_key.iter().zip(pk).collect();
            pairs.sort_unstable_by(|a, b| a.0.cmp(b.0));
            let mut key = serde_json::Map::new();
            for (k, v) in pairs {
                key.insert(k.clone(), v.to_json());
            }
            Some(PatchRow {
                id: (table.to_string(), Json::Object(key).to_string()),
                put: None,
            })
        }
    }
}

/// The query's current rows as synced rows; `None` when the engine does not run it.
fn full_rows(slot: &Slot, qid: &str) -> Option<Vec<SyncedRow>> {
    let rows = slot.engine.rows(qid)?;
    let rows = rows
        .into_iter()
        .filter_map(|(table, row)| {
            let t = slot.schema.table(&table)?;
            let (key, version, value) = row_parts(t, &row);
            Some(SyncedRow {
                table: table.to_string(),
                key,
                version,
                value,
            })
        })
        .collect();
    Some(rows)
}
