//! Where client view records are kept: a SQLite file next to the replica (the default) or the
//! Postgres database of `ZERO_CVR_DB`, behind one [`CvrBackend`] trait.
//!
//! View-syncers never wait for the store while poking: [`CvrStore::flush`] takes the record's
//! changes as a [`CvrDelta`] and hands them to the one background writer. Each group has one
//! pending delta (deltas that pile up while a write is in flight are merged into one); the
//! writer takes every group's pending delta at once and stores them as one batch (one SQLite
//! transaction; concurrent sessions up to the pool size for Postgres), so a replica version that
//! touches ten thousand groups costs one commit, not ten thousand. A group's
//! record is only loaded after its queued changes are written, so a view-syncer that restarts
//! in the same process sees everything the previous one poked. Shutdown drains the queues
//! ([`CvrStore::drain`]), so a restarted server resumes every client without a reset.

use std::cell::Cell;
use std::collections::{BTreeMap, HashMap, HashSet};
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use rusqlite::{Connection, OptionalExtension, params};
use tokio::sync::{Notify, oneshot};
use tracing::{debug, info, warn};

use super::cvr::{Cvr, CvrDelta, CvrError, CvrVersion, RowId, RowRecord};
use crate::pgconn::{PgPool, UpstreamConfig};

/// A boxed future, so that backends can be trait objects.
pub type BoxFut<'a, T> = Pin<Box<dyn Future<Output = T> + Send + 'a>>;

/// Storage of client view records.
pub trait CvrBackend: Send + Sync + 'static {
    /// Loads a group's record (an empty, not `stored` one if none exists).
    fn load<'a>(&'a self, group: &'a str) -> BoxFut<'a, Result<Cvr, CvrError>>;
    /// Writes a group's changes atomically.
    fn write(&self, delta: Arc<CvrDelta>) -> BoxFut<'_, Result<(), CvrError>>;
    /// The distinct legacy query ASTs (JSON text) of every stored group: the shapes clients
    /// will ask for again after a restart.
    fn stored_asts(&self) -> BoxFut<'_, Result<Vec<String>, CvrError>>;
    /// Up to `limit` groups whose record was last written before `before_ms`, oldest first.
    fn inactive(&self, before_ms: i64, limit: usize) -> BoxFut<'_, Result<Vec<String>, CvrError>>;
    /// Marks the records of `groups` (whose view-syncers run in this process) active at
    /// `now_ms`, so that another process sharing the store does not collect them.
    fn touch(&self, groups: Vec<String>, now_ms: i64) -> BoxFut<'_, Result<(), CvrError>>;
    /// Deletes the whole records of those of `groups` still inactive since `before_ms`;
    /// returns how many were deleted.
    fn purge(&self, groups: Vec<String>, before_ms: i64) -> BoxFut<'_, Result<usize, CvrError>>;
    /// Whether [`write_batch_blocking`](Self::write_batch_blocking) works: the store then runs
    /// its writer on a thread of its own, with no hop through the async runtime per batch.
    fn blocking_writes(&self) -> bool {
        false
    }
    /// Writes several groups' changes on the calling thread (see
    /// [`blocking_writes`](Self::blocking_writes)).
    fn write_batch_blocking(&self, _deltas: &[Arc<CvrDelta>]) -> Result<(), CvrError> {
        Err(CvrError::Data(
            "this CVR store has no blocking writes".into(),
        ))
    }
    /// Background upkeep on the writer thread when no batch is pending (see
    /// [`blocking_writes`](Self::blocking_writes)); returns early once `busy` says a batch
    /// waits.
    fn maintain_blocking(&self, _busy: &dyn Fn() -> bool) {}
    /// Writes several groups' changes (one delta per group), each group's atomically.
    fn write_batch(&self, deltas: Vec<Arc<CvrDelta>>) -> BoxFut<'_, Result<(), CvrError>> {
        Box::pin(async move {
            for d in deltas {
                self.write(d).await?;
            }
            Ok(())
        })
    }
}

#[derive(Default)]
struct Queues {
    groups: HashMap<String, GroupQueue>,
    /// Groups whose `next` is set, oldest first (each at most once).
    order: std::collections::VecDeque<String>,
    /// Since when a flush on a sync worker has left the writer asleep (see
    /// [`CvrStore::wake_deferred`]).
    deferred_since: Option<Instant>,
}

thread_local! {
    /// Set on sync-worker threads: their lazy flushes leave waking the writer to
    /// [`CvrStore::wake_deferred`], run when the worker has nothing left to do.
    static DEFER_WAKES: Cell<bool> = const { Cell::new(false) };
}

/// Makes lazy flushes ([`CvrStore::flush_lazily`]) on this thread leave waking the writer to
/// [`CvrStore::wake_deferred`] (a sync worker calls it before it parks).
pub fn defer_wakes_on_this_thread() {
    DEFER_WAKES.set(true);
}

/// How long a deferred wake may wait while the worker stays busy with other groups.
const MAX_DEFER: Duration = Duration::from_millis(2);

/// Wakes the writer, whichever way it waits: a thread of its own (blocking backends) or a
/// task on the runtime.
#[derive(Default)]
struct Wake {
    pending: Mutex<bool>,
    cv: Condvar,
    notify: Notify,
}

impl Wake {
    fn wake(&self) {
        {
            // Ten thousand groups flush per version: only the first wake of a writer that is
            // busy (or asleep) needs the futex.
            let mut pending = self.pending.lock().expect("cvr wake");
            if !*pending {
                *pending = true;
                self.cv.notify_one();
            }
        }
        self.notify.notify_one();
    }

    /// Waits (at most `limit`) for a wake; false on timeout.
    fn wait_blocking(&self, limit: Duration) -> bool {
        let pending = self.pending.lock().expect("cvr wake");
        let (mut pending, _) = self
            .cv
            .wait_timeout_while(pending, limit, |p| !*p)
            .expect("cvr wake");
        std::mem::take(&mut *pending)
    }
}

#[derive(Default)]
struct GroupQueue {
    next: Option<CvrDelta>,
    /// Told when `next` is written.
    waiters: Vec<oneshot::Sender<()>>,
    /// Run when `next` is written (before `waiters` are told).
    released: Vec<Release>,
    /// Run when the delta of this group that is being written is stored.
    in_flight: Vec<Release>,
}

/// What a view-syncer hands to the writer to do once its latest changes are stored: sending
/// the held `pokeEnd` frames from the writer saves waking 10,000 view-syncers per version only
/// to forward them.
pub type Release = Box<dyn FnOnce() + Send>;

/// Groups stored per transaction at most: a version that touches ten thousand groups is
/// written in a few transactions, so the first groups' pokes end (and their sockets are
/// written) while the later groups' records are still being stored, instead of every poke
/// waiting for one long transaction.
const MAX_BATCH_GROUPS: usize = 1000;

/// Row records stored per transaction at most (a batch holds at least one group): fifty new
/// clients hydrating a 370-row query are stored a few groups at a time, so the first of them
/// get their `pokeEnd` (and start processing) while the others' rows are still being written.
const MAX_BATCH_ROWS: usize = 2000;

/// The process's CVR store: a backend plus the background writer.
pub struct CvrStore {
    backend: Arc<dyn CvrBackend>,
    /// Groups with unwritten changes (pending or in the batch being written), and the order in
    /// which their pending deltas were queued: the writer takes the oldest without scanning
    /// every group that is in flight.
    queues: Mutex<Queues>,
    /// Wakes the writer.
    wake: Arc<Wake>,
    /// Signalled whenever a batch is written (groups may have left `queues`) or a purge ends.
    idle: Notify,
    /// Groups whose records garbage collection may be deleting: their loads wait, so that a
    /// group that comes back during the purge sees either all of its record or none of it.
    purging: Mutex<HashSet<String>>,
    /// Records deleted by garbage collection since start.
    purged: AtomicU64,
}

impl CvrStore {
    /// Opens the SQLite store at `file`, or the Postgres store when `pg` is given (schema
    /// `{shard_schema}/cvr`, at most `max_conns` connections).
    pub async fn open(
        file: &Path,
        pg: Option<(&str, u32)>,
        shard_schema: &str,
    ) -> Result<Arc<CvrStore>, CvrError> {
        let backend: Arc<dyn CvrBackend> = match pg {
            Some((uri, max)) => {
                let cfg = UpstreamConfig::parse(uri).map_err(|e| CvrError::Data(e.to_string()))?;
                let schema = format!("{shard_schema}/cvr");
                let b = PgBackend::open(cfg, schema.clone(), max.max(1) as usize).await?;
                info!(schema = %schema, max_conns = max, "client view records in Postgres");
                Arc::new(b)
            }
            None => Arc::new(SqliteBackend::open(file)?),
        };
        let blocking = backend.blocking_writes();
        let store = Arc::new(CvrStore {
            backend,
            queues: Mutex::new(Queues::default()),
            wake: Arc::new(Wake::default()),
            idle: Notify::new(),
            purging: Mutex::new(HashSet::new()),
            purged: AtomicU64::new(0),
        });
        // The writer ends with the store. A blocking backend (SQLite) is written from a thread
        // of its own: a batch then costs no wake-ups of runtime tasks or blocking-pool threads
        // between the flush and the pokes' ends, which sit on that path. Others run on the
        // server's runtime (not a sync worker's).
        let weak = Arc::downgrade(&store);
        let wake = store.wake.clone();
        if blocking {
            std::thread::Builder::new()
                .name("cvr-writer".into())
                .spawn(move || {
                    loop {
                        let woken = wake.wait_blocking(Duration::from_millis(500));
                        let Some(store) = weak.upgrade() else { return };
                        if woken {
                            store.write_pending_blocking();
                        }
                        store.backend.maintain_blocking(&|| store.batch_waiting());
                    }
                })
                .map_err(|e| CvrError::Data(format!("CVR writer thread: {e}")))?;
        } else {
            tokio::spawn(async move {
                loop {
                    wake.notify.notified().await;
                    let Some(store) = weak.upgrade() else { return };
                    store.write_pending().await;
                }
            });
        }
        Ok(store)
    }

    /// Loads a group's record once every change queued for it is written (and no purge of
    /// it is under way).
    pub async fn load(&self, group: &str) -> Result<Cvr, CvrError> {
        loop {
            let idle = self.idle.notified();
            if !self.busy(group) {
                break;
            }
            // Its queued changes may be waiting for a sync worker to go idle.
            self.wake_deferred();
            idle.await;
        }
        self.backend.load(group).await
    }

    /// Whether the group has queued changes or is being purged.
    fn busy(&self, group: &str) -> bool {
        let queues = self.queues.lock().expect("cvr queues");
        queues.groups.contains_key(group)
            || self.purging.lock().expect("cvr purging").contains(group)
    }

    /// Deletes the records of up to `limit` groups inactive since `before_ms`, except those
    /// with queued changes and those `live` says are running; returns how many were deleted.
    ///
    /// Candidates are fenced (their loads wait) before `live` is asked, so a group that starts
    /// after the check waits for the purge and then finds no record, never half of one.
    pub async fn collect_garbage(
        &self,
        before_ms: i64,
        limit: usize,
        live: &(dyn Fn(&str) -> bool + Sync),
    ) -> Result<usize, CvrError> {
        let candidates = self.backend.inactive(before_ms, limit).await?;
        let fenced: Vec<String> = {
            let queues = self.queues.lock().expect("cvr queues");
            let mut purging = self.purging.lock().expect("cvr purging");
            candidates
                .into_iter()
                .filter(|g| !queues.groups.contains_key(g) && purging.insert(g.clone()))
                .collect()
        };
        let doomed: Vec<String> = fenced.iter().filter(|g| !live(g)).cloned().collect();
        // A group that flushed between the fence and the liveness check is kept too.
        let doomed: Vec<String> = {
            let queues = self.queues.lock().expect("cvr queues");
            doomed
                .into_iter()
                .filter(|g| !queues.groups.contains_key(g))
                .collect()
        };
        let result = if doomed.is_empty() {
            Ok(0)
        } else {
            self.backend.purge(doomed, before_ms).await
        };
        {
            let mut purging = self.purging.lock().expect("cvr purging");
            for g in &fenced {
                purging.remove(g);
            }
        }
        self.idle.notify_waiters();
        if let Ok(n) = result {
            self.purged.fetch_add(n as u64, Ordering::Relaxed);
        }
        result
    }

    /// Marks running groups' records active (see [`CvrBackend::touch`]).
    pub async fn touch(&self, groups: Vec<String>) -> Result<(), CvrError> {
        if groups.is_empty() {
            return Ok(());
        }
        self.backend.touch(groups, crate::replica::now_ms()).await
    }

    /// Records deleted by garbage collection since start.
    pub fn purged(&self) -> u64 {
        self.purged.load(Ordering::Relaxed)
    }

    /// The distinct legacy query ASTs of every stored group (see [`CvrBackend::stored_asts`]).
    pub async fn stored_asts(&self) -> Result<Vec<String>, CvrError> {
        self.backend.stored_asts().await
    }

    /// Queues the record's changes for writing and returns at once; the receiver completes
    /// when they (and everything queued before them) are written.
    pub fn flush(self: &Arc<Self>, cvr: &mut Cvr) -> oneshot::Receiver<()> {
        self.queue(cvr, true)
    }

    /// [`flush`](Self::flush) for a group that no client waits on (no poke's end hangs on
    /// this write): on a sync worker it leaves the writer asleep until the worker is idle, a
    /// batch is full or [`MAX_DEFER`] passed, so it does not take the place of a connected
    /// group's write in the next batch.
    pub fn flush_lazily(self: &Arc<Self>, cvr: &mut Cvr) -> oneshot::Receiver<()> {
        self.queue(cvr, false)
    }

    fn queue(self: &Arc<Self>, cvr: &mut Cvr, urgent: bool) -> oneshot::Receiver<()> {
        let delta = cvr.take_delta();
        let (done, written) = oneshot::channel();
        {
            let mut queues = self.queues.lock().expect("cvr queues");
            let Queues {
                groups,
                order,
                deferred_since,
            } = &mut *queues;
            let q = match groups.get_mut(&delta.group) {
                Some(q) => q,
                None => groups.entry(delta.group.clone()).or_default(),
            };
            match &mut q.next {
                Some(next) => next.merge(delta),
                None => {
                    order.push_back(delta.group.clone());
                    q.next = Some(delta);
                }
            }
            q.waiters.push(done);
            if !urgent
                && DEFER_WAKES.get()
                && order.len() < MAX_BATCH_GROUPS
                && deferred_since.is_none_or(|t| t.elapsed() < MAX_DEFER)
            {
                deferred_since.get_or_insert_with(Instant::now);
                return written;
            }
            *deferred_since = None;
        }
        self.wake.wake();
        written
    }

    /// Wakes the writer if a flush deferred it; sync workers call this before they park.
    pub fn wake_deferred(&self) {
        let deferred = self
            .queues
            .lock()
            .expect("cvr queues")
            .deferred_since
            .take()
            .is_some();
        if deferred {
            self.wake.wake();
        }
    }

    /// Hands `release` to the writer, to run once the group's latest flushed changes are
    /// stored (before the receiver [`flush`](Self::flush) returned for them completes); gives it
    /// back when nothing of the group is left to write, so the caller runs it now.
    pub fn after_written(&self, group: &str, release: Release) -> Option<Release> {
        let mut queues = self.queues.lock().expect("cvr queues");
        match queues.groups.get_mut(group) {
            Some(q) if q.next.is_some() => q.released.push(release),
            Some(q) => q.in_flight.push(release),
            None => return Some(release),
        }
        None
    }

    /// The next batch: the oldest pending deltas (see [`MAX_BATCH_GROUPS`], [`MAX_BATCH_ROWS`])
    /// and the waiters to tell once it is stored; `None` when nothing is pending.
    #[allow(clippy::type_complexity)]
    fn take_batch(&self) -> Option<(Vec<Arc<CvrDelta>>, Vec<oneshot::Sender<()>>)> {
        let mut queues = self.queues.lock().expect("cvr queues");
        let Queues { groups, order, .. } = &mut *queues;
        let mut batch = Vec::new();
        let mut waiters = Vec::new();
        let mut rows = 0;
        while batch.len() < MAX_BATCH_GROUPS
            && rows < MAX_BATCH_ROWS
            && let Some(g) = order.pop_front()
        {
            if let Some(q) = groups.get_mut(&g)
                && let Some(d) = q.next.take()
            {
                rows += d.rows.len();
                batch.push(Arc::new(d));
                waiters.append(&mut q.waiters);
                let released = std::mem::take(&mut q.released);
                q.in_flight.extend(released);
            }
        }
        (!batch.is_empty()).then_some((batch, waiters))
    }

    /// After a batch is stored: runs its groups' releases, then tells its waiters.
    fn batch_written(
        &self,
        batch: &[Arc<CvrDelta>],
        waiters: Vec<oneshot::Sender<()>>,
        started: Instant,
        store_ms: f64,
    ) {
        // Run outside the lock (view-syncers flush meanwhile); a group's later releases go
        // with its later deltas, and its waiters are told only after these ran, so frames
        // it sends itself after awaiting them never overtake these.
        let mut releases = Vec::new();
        {
            let mut queues = self.queues.lock().expect("cvr queues");
            for d in batch {
                if let Some(q) = queues.groups.get_mut(&d.group) {
                    releases.append(&mut q.in_flight);
                    if q.next.is_none() {
                        queues.groups.remove(&d.group);
                    }
                }
            }
        }
        for r in releases {
            r();
        }
        for w in waiters {
            let _ = w.send(());
        }
        self.idle.notify_waiters();
        debug!(
            groups = batch.len(),
            store_ms,
            ms = started.elapsed().as_secs_f64() * 1000.0,
            "client view records written"
        );
    }

    /// Writes every pending delta, batch after batch, until none is left (async backends).
    async fn write_pending(&self) {
        while let Some((batch, waiters)) = self.take_batch() {
            let started = Instant::now();
            let mut backoff = Duration::from_millis(50);
            loop {
                match self.backend.write_batch(batch.clone()).await {
                    Ok(()) => break,
                    Err(e) => {
                        warn!(groups = batch.len(), error = %e, retry_ms = backoff.as_millis() as u64, "writing client view records failed; retrying");
                        tokio::time::sleep(backoff).await;
                        backoff = (backoff * 2).min(Duration::from_secs(5));
                    }
                }
            }
            let store_ms = started.elapsed().as_secs_f64() * 1000.0;
            self.batch_written(&batch, waiters, started, store_ms);
        }
    }

    /// Writes every pending delta, batch after batch, until none is left, on the calling
    /// thread (blocking backends).
    fn write_pending_blocking(&self) {
        while let Some((batch, waiters)) = self.take_batch() {
            let started = Instant::now();
            let mut backoff = Duration::from_millis(50);
            while let Err(e) = self.backend.write_batch_blocking(&batch) {
                warn!(groups = batch.len(), error = %e, retry_ms = backoff.as_millis() as u64, "writing client view records failed; retrying");
                std::thread::sleep(backoff);
                backoff = (backoff * 2).min(Duration::from_secs(5));
            }
            let store_ms = started.elapsed().as_secs_f64() * 1000.0;
            self.batch_written(&batch, waiters, started, store_ms);
        }
    }

    /// Whether a batch waits to be written (upkeep gives way to it).
    fn batch_waiting(&self) -> bool {
        !self.queues.lock().expect("cvr queues").order.is_empty()
    }

    /// Number of groups with unwritten changes.
    pub fn pending(&self) -> usize {
        self.queues.lock().expect("cvr queues").groups.len()
    }

    /// Waits (at most `limit`) until every queued change is written; false on timeout.
    pub async fn drain(&self, limit: Duration) -> bool {
        let wait = async {
            loop {
                let idle = self.idle.notified();
                if self.pending() == 0 {
                    return;
                }
                self.wake_deferred();
                idle.await;
            }
        };
        tokio::time::timeout(limit, wait).await.is_ok()
    }
}

fn parse_version(v: &str) -> Result<CvrVersion, CvrError> {
    CvrVersion::parse(v).ok_or_else(|| CvrError::Data(format!("bad version {v}")))
}

fn data_err(e: serde_json::Error) -> CvrError {
    CvrError::Data(e.to_string())
}

/// Instances or rows upserted per statement by the SQLite store.
const UPSERT_CHUNK: usize = 64;

/// Prepared statements the writer keeps: the instance and row upserts of every chunk size up to
/// [`UPSERT_CHUNK`], plus the per-group record statements.
const STATEMENT_CACHE: usize = 2 * UPSERT_CHUNK + 32;

/// `n` placeholder tuples of `width` values.
fn placeholders(n: usize, width: usize) -> String {
    let tuple = format!("({})", vec!["?"; width].join(", "));
    vec![tuple; n].join(", ")
}

/// Upserts `n` instances (7 values each).
fn instance_upsert(n: usize) -> String {
    format!(
        r#"INSERT INTO instances ("clientGroupID", version, "replicaVersion", processed, "clientSchema", "lastActive", "ttlClock")
           VALUES {}
           ON CONFLICT ("clientGroupID") DO UPDATE SET version = excluded.version,
             "replicaVersion" = excluded."replicaVersion", processed = excluded.processed,
             "clientSchema" = coalesce(excluded."clientSchema", "clientSchema"),
             "lastActive" = excluded."lastActive", "ttlClock" = excluded."ttlClock""#,
        placeholders(n, 7)
    )
}

/// Upserts `n` row records (6 values each).
fn row_upsert(n: usize) -> String {
    format!(
        r#"INSERT INTO rows ("clientGroupID", "table", "rowKey", "rowVersion", "patchVersion", "refCounts")
           VALUES {}
           ON CONFLICT ("clientGroupID", "table", "rowKey") DO UPDATE SET
             "rowVersion" = excluded."rowVersion", "patchVersion" = excluded."patchVersion",
             "refCounts" = excluded."refCounts""#,
        placeholders(n, 6)
    )
}

/// The columns of one stored row record.
fn row_columns(r: &RowRecord) -> (String, Option<String>) {
    (
        r.patch_version.to_string(),
        r.refs
            .as_ref()
            .map(|refs| serde_json::to_string(refs).expect("strings serialize")),
    )
}

/// Fills a record from stored parts (shared by both backends).
struct Loader(Cvr);

impl Loader {
    fn instance(
        &mut self,
        version: &str,
        replica_version: Option<String>,
        processed: Option<String>,
        schema: Option<String>,
        ttl_clock: Option<f64>,
    ) -> Result<(), CvrError> {
        let cvr = &mut self.0;
        cvr.stored = true;
        if let Some(t) = ttl_clock {
            cvr.ttl_clock = t;
        }
        cvr.version = parse_version(version)?;
        cvr.replica_version = replica_version;
        cvr.processed = processed;
        cvr.client_schema = schema
            .map(|s| serde_json::from_str(&s))
            .transpose()
            .map_err(data_err)?;
        cvr.schema_written = cvr.client_schema.is_some();
        Ok(())
    }

    fn query(&mut self, hash: String, data: &str) -> Result<(), CvrError> {
        self.0
            .queries
            .insert(hash, serde_json::from_str(data).map_err(data_err)?);
        Ok(())
    }

    fn desire(&mut self, client: String, hash: String, data: &str) -> Result<(), CvrError> {
        self.0.desires.insert(
            (client, hash),
            serde_json::from_str(data).map_err(data_err)?,
        );
        Ok(())
    }

    fn row(
        &mut self,
        table: String,
        key: String,
        row_version: String,
        patch_version: &str,
        refs: Option<String>,
    ) -> Result<(), CvrError> {
        self.0.rows.insert(
            (table, key),
            RowRecord {
                row_version,
                patch_version: parse_version(patch_version)?,
                refs: refs
                    .map(|s| serde_json::from_str(&s))
                    .transpose()
                    .map_err(data_err)?,
            },
        );
        Ok(())
    }

    fn done(mut self) -> Cvr {
        self.0.rebuild_index();
        self.0
    }
}

/// Client view records in a SQLite file (`<replica>-cvr.db`).
/// SQLite store: one writer connection (batches) and one reader connection (loads), so loads
/// of connecting groups do not queue behind a batch (WAL lets them read meanwhile).
pub struct SqliteBackend {
    conn: Arc<Mutex<Writer>>,
    reader: Arc<Mutex<Connection>>,
    /// Groups with entries in the log that are not folded into the tables yet, with the `seq`
    /// of their newest entry: only their loads read the log.
    unfolded: Arc<Mutex<HashMap<String, i64>>>,
}

/// The SQLite writer connection and the state of its log.
///
/// A small batch (a version reaching a few groups, the latency-critical case) is appended to
/// `log` as one entry per group instead of being upserted into `instances` and `rows`: each
/// group's row records sit on their own B-tree pages, so a dozen groups with a handful of
/// changed rows each dirtied ~100 pages per commit (0.5–1 ms, and a checkpoint every few
/// commits), where the log's appends fill a few. The writer folds the log into the tables
/// when it is idle (and before any large batch, so records are always applied in order), at
/// open, and before garbage collection; loads of groups with unfolded entries apply them.
struct Writer {
    conn: Connection,
    /// `seq` of the next log entry.
    next_seq: i64,
    /// Log entries not folded yet.
    entries: usize,
    /// When the oldest of them was appended.
    since: Option<Instant>,
}

/// Batches of at most this many groups go to the log; larger ones (hydrations, a version
/// reaching thousands of groups, where every page is dirtied anyway) are upserted directly.
const LOG_MAX_GROUPS: usize = 64;

/// The writer folds the log when it is idle and the log holds this many entries, or
/// [`FOLD_AGE`] has passed since its oldest entry.
const FOLD_ENTRIES: usize = 4096;
const FOLD_AGE: Duration = Duration::from_secs(1);

/// Log entries folded per transaction at most, and row records (after the entry that
/// reaches it): between two transactions, new batches go first. A batch that arrives during
/// a fold waits for its transaction, and every poke of the batch waits with it: 4,000 rows
/// took 9–22 ms here, 500 take 1–3 ms.
const FOLD_CHUNK: usize = 2048;
const FOLD_ROWS: usize = 500;

/// One group's changes in the log: `version`, `replicaVersion`, `processed`, `clientSchema`,
/// `ttlClock`, `lastActive`, and its rows (table, key, rowVersion, patchVersion, refCounts).
type LogEntry = (
    String,
    Option<String>,
    Option<String>,
    Option<String>,
    f64,
    i64,
    Vec<(String, String, String, String, Option<String>)>,
);

/// One `instances` row to upsert.
struct InstanceCols<'a> {
    group: &'a str,
    version: &'a str,
    replica_version: Option<&'a str>,
    processed: Option<&'a str>,
    client_schema: Option<&'a str>,
    last_active: i64,
    ttl_clock: f64,
}

/// One `rows` row to upsert: group, table, key, rowVersion, patchVersion, refCounts.
type RowCols<'a> = (&'a str, &'a str, &'a str, &'a str, &'a str, Option<&'a str>);

/// Upserts instances and rows, [`UPSERT_CHUNK`] at a time: one statement per group and row
/// cost more in binding and stepping than in the B-tree (callers never pass a group twice, nor
/// a group's row twice, so no statement upserts one key twice). Each statement size is compiled
/// once per connection ([`STATEMENT_CACHE`]): compiling a 64-row upsert cost a small batch
/// more than storing it.
fn upsert(
    tx: &rusqlite::Transaction<'_>,
    instances: &[InstanceCols<'_>],
    rows: &[RowCols<'_>],
) -> Result<(), CvrError> {
    for chunk in instances.chunks(UPSERT_CHUNK) {
        let mut p: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 7);
        for i in chunk {
            p.extend([
                &i.group as &dyn rusqlite::ToSql,
                &i.version,
                &i.replica_version,
                &i.processed,
                &i.client_schema,
                &i.last_active,
                &i.ttl_clock,
            ]);
        }
        tx.prepare_cached(&instance_upsert(chunk.len()))?
            .execute(p.as_slice())?;
    }
    for chunk in rows.chunks(UPSERT_CHUNK) {
        let mut p: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 6);
        for (group, table, key, row_version, pv, refs) in chunk {
            p.extend([
                group as &dyn rusqlite::ToSql,
                table,
                key,
                row_version,
                pv,
                refs,
            ]);
        }
        tx.prepare_cached(&row_upsert(chunk.len()))?
            .execute(p.as_slice())?;
    }
    Ok(())
}

/// Appends `n` log entries (3 values each).
fn log_insert(n: usize) -> String {
    format!(
        r#"INSERT INTO log (seq, "clientGroupID", entry) VALUES {}"#,
        placeholders(n, 3)
    )
}

/// Folds the oldest log entries into the tables in one transaction: up to `limit` entries,
/// and no more once [`FOLD_ROWS`] row records are taken. True when entries may be left.
fn fold(
    w: &mut Writer,
    unfolded: &Mutex<HashMap<String, i64>>,
    limit: usize,
) -> Result<bool, CvrError> {
    let started = Instant::now();
    let tx = w.conn.transaction()?;
    // Later entries of a group win, field by field and row by row.
    type Folded = (
        LogEntry,
        BTreeMap<(String, String), (String, String, Option<String>)>,
    );
    let mut groups: HashMap<String, Folded> = HashMap::new();
    let mut folded_rows = 0;
    let mut taken = 0;
    let mut last = 0;
    // Entries are read one by one up to the row cap: a hydration's entry holds hundreds of
    // rows, so reading `limit` entries first would read up to 2,048 entries' text to fold a
    // handful.
    let mut more = false;
    {
        let mut st = tx.prepare_cached(
            r#"SELECT seq, "clientGroupID", entry FROM log ORDER BY seq LIMIT ?1"#,
        )?;
        let mut cursor = st.query([limit as i64])?;
        while let Some(r) = cursor.next()? {
            if folded_rows >= FOLD_ROWS {
                more = true;
                break;
            }
            let seq: i64 = r.get(0)?;
            let group: String = r.get(1)?;
            let text: String = r.get(2)?;
            let mut e: LogEntry = serde_json::from_str(&text).map_err(data_err)?;
            taken += 1;
            last = seq;
            let rows = std::mem::take(&mut e.6);
            folded_rows += rows.len();
            let f = match groups.entry(group) {
                std::collections::hash_map::Entry::Occupied(o) => {
                    let f = o.into_mut();
                    let schema = e.3.take().or(f.0.3.take());
                    f.0 = e;
                    f.0.3 = schema;
                    f
                }
                std::collections::hash_map::Entry::Vacant(v) => v.insert((e, BTreeMap::new())),
            };
            for (table, key, rv, pv, refs) in rows {
                f.1.insert((table, key), (rv, pv, refs));
            }
        }
        if taken == limit {
            more = true;
        }
    }
    if taken == 0 {
        tx.commit()?;
        w.entries = 0;
        w.since = None;
        return Ok(false);
    }
    let instances: Vec<InstanceCols<'_>> = groups
        .iter()
        .map(|(g, (e, _))| InstanceCols {
            group: g,
            version: &e.0,
            replica_version: e.1.as_deref(),
            processed: e.2.as_deref(),
            client_schema: e.3.as_deref(),
            last_active: e.5,
            ttl_clock: e.4,
        })
        .collect();
    let rows: Vec<RowCols<'_>> = groups
        .iter()
        .flat_map(|(g, (_, rows))| {
            rows.iter().map(move |((t, k), (rv, pv, refs))| {
                (
                    g.as_str(),
                    t.as_str(),
                    k.as_str(),
                    rv.as_str(),
                    pv.as_str(),
                    refs.as_deref(),
                )
            })
        })
        .collect();
    upsert(&tx, &instances, &rows)?;
    tx.prepare_cached("DELETE FROM log WHERE seq <= ?1")?
        .execute([last])?;
    tx.commit()?;
    w.entries = if more {
        w.entries.saturating_sub(taken)
    } else {
        0
    };
    if !more {
        w.since = None;
    }
    unfolded
        .lock()
        .expect("cvr unfolded")
        .retain(|_, s| *s > last);
    debug!(
        entries = taken,
        groups = groups.len(),
        rows = rows.len(),
        ms = started.elapsed().as_secs_f64() * 1000.0,
        "client view record log folded"
    );
    Ok(more)
}

/// Every table is `WITHOUT ROWID`: each record is found and upserted by its primary key, so a
/// table keyed by rowid would add a second B-tree (the key's index) to every write of every
/// poke.
const SQLITE_TABLES: [(&str, &str); 5] = [
    (
        "instances",
        r#""clientGroupID" TEXT PRIMARY KEY, version TEXT NOT NULL, "replicaVersion" TEXT,
  processed TEXT, "clientSchema" TEXT, "lastActive" INTEGER, "ttlClock" REAL"#,
    ),
    (
        "clients",
        r#""clientGroupID" TEXT, "clientID" TEXT, PRIMARY KEY ("clientGroupID", "clientID")"#,
    ),
    (
        "queries",
        r#""clientGroupID" TEXT, "queryHash" TEXT, data TEXT NOT NULL,
  PRIMARY KEY ("clientGroupID", "queryHash")"#,
    ),
    (
        "desires",
        r#""clientGroupID" TEXT, "clientID" TEXT, "queryHash" TEXT, data TEXT NOT NULL,
  PRIMARY KEY ("clientGroupID", "clientID", "queryHash")"#,
    ),
    (
        "rows",
        r#""clientGroupID" TEXT, "table" TEXT, "rowKey" TEXT, "rowVersion" TEXT NOT NULL,
  "patchVersion" TEXT NOT NULL, "refCounts" TEXT,
  PRIMARY KEY ("clientGroupID", "table", "rowKey")"#,
    ),
];

/// Creates the tables, and rebuilds those of a file written before they were `WITHOUT ROWID`
/// (or before `ttlClock` existed) with their records.
fn sqlite_schema(conn: &mut Connection) -> Result<(), CvrError> {
    let tx = conn.transaction()?;
    for (name, columns) in SQLITE_TABLES {
        let existing: Option<String> = tx
            .query_row(
                "SELECT sql FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [name],
                |r| r.get(0),
            )
            .optional()?;
        let create = format!(r#"CREATE TABLE "{name}" ({columns}) WITHOUT ROWID"#);
        match existing {
            None => tx.execute_batch(&create)?,
            Some(sql) if sql.to_ascii_uppercase().contains("WITHOUT ROWID") => {}
            Some(_) => {
                let old_columns: Vec<String> = {
                    let mut st =
                        tx.prepare(&format!(r#"SELECT name FROM pragma_table_info('{name}')"#))?;
                    st.query_map([], |r| r.get(0))?.collect::<Result<_, _>>()?
                };
                let list = old_columns
                    .iter()
                    .map(|c| format!(r#""{c}""#))
                    .collect::<Vec<_>>()
                    .join(", ");
                tx.execute_batch(&format!(
                    r#"ALTER TABLE "{name}" RENAME TO "{name}_old";
                       {create};
                       INSERT INTO "{name}" ({list}) SELECT {list} FROM "{name}_old";
                       DROP TABLE "{name}_old";"#
                ))?;
                info!(
                    table = name,
                    "client view record table rebuilt without rowid"
                );
            }
        }
    }
    // Appended to in `seq` order (a rowid table: appends fill its last page).
    tx.execute_batch(
        r#"CREATE TABLE IF NOT EXISTS log (seq INTEGER PRIMARY KEY, "clientGroupID" TEXT NOT NULL, entry TEXT NOT NULL)"#,
    )?;
    tx.commit()?;
    Ok(())
}

impl SqliteBackend {
    /// Opens (creating if needed) the file.
    pub fn open(path: &Path) -> Result<SqliteBackend, CvrError> {
        let mut conn = Connection::open(path)?;
        conn.pragma_update(None, "journal_mode", "wal")?;
        conn.pragma_update(None, "synchronous", "normal")?;
        conn.pragma_update(None, "busy_timeout", 30_000)?;
        conn.set_prepared_statement_cache_capacity(STATEMENT_CACHE);
        sqlite_schema(&mut conn)?;
        let mut w = Writer {
            conn,
            next_seq: 1,
            entries: 0,
            since: None,
        };
        // Whatever the last process left in the log (it is complete: entries are committed
        // before the pokes they record end).
        let unfolded = Mutex::new(HashMap::new());
        while fold(&mut w, &unfolded, FOLD_CHUNK)? {}
        let reader = Connection::open(path)?;
        reader.pragma_update(None, "busy_timeout", 30_000)?;
        Ok(SqliteBackend {
            conn: Arc::new(Mutex::new(w)),
            reader: Arc::new(Mutex::new(reader)),
            unfolded: Arc::new(unfolded),
        })
    }

    /// Reads a group's record in one read transaction; with `log`, its unfolded log entries
    /// are applied over the tables.
    fn load_sync(conn: &mut Connection, group: &str, log: bool) -> Result<Cvr, CvrError> {
        let tx = conn.transaction()?;
        let conn: &Connection = &tx;
        let mut l = Loader(Cvr::new(group));
        let logged: Vec<LogEntry> = if log {
            let mut st = conn.prepare_cached(
                r#"SELECT entry FROM log WHERE "clientGroupID" = ?1 ORDER BY seq"#,
            )?;
            let texts = st
                .query_map([group], |r| r.get::<_, String>(0))?
                .collect::<Result<Vec<_>, _>>()?;
            texts
                .iter()
                .map(|t| serde_json::from_str(t).map_err(data_err))
                .collect::<Result<_, _>>()?
        } else {
            Vec::new()
        };
        let inst = conn
            .query_row(
                r#"SELECT version, "replicaVersion", processed, "clientSchema", "ttlClock" FROM instances WHERE "clientGroupID" = ?1"#,
                [group],
                |r| {
                    Ok((
                        r.get::<_, String>(0)?,
                        r.get(1)?,
                        r.get(2)?,
                        r.get(3)?,
                        r.get(4)?,
                    ))
                },
            )
            .optional()?;
        match inst {
            Some((version, rv, processed, schema, clock)) => {
                l.instance(&version, rv, processed, schema, clock)?
            }
            None if logged.is_empty() => return Ok(l.done()),
            None => {}
        }
        let mut st =
            conn.prepare(r#"SELECT "clientID" FROM clients WHERE "clientGroupID" = ?1"#)?;
        l.0.clients = st
            .query_map([group], |r| r.get(0))?
            .collect::<Result<_, _>>()?;
        let mut st =
            conn.prepare(r#"SELECT "queryHash", data FROM queries WHERE "clientGroupID" = ?1"#)?;
        for r in st.query_map([group], |r| Ok((r.get(0)?, r.get::<_, String>(1)?)))? {
            let (h, d) = r?;
            l.query(h, &d)?;
        }
        let mut st = conn.prepare(
            r#"SELECT "clientID", "queryHash", data FROM desires WHERE "clientGroupID" = ?1"#,
        )?;
        for r in st.query_map([group], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, String>(2)?))
        })? {
            let (c, h, d) = r?;
            l.desire(c, h, &d)?;
        }
        let mut st = conn.prepare(
            r#"SELECT "table", "rowKey", "rowVersion", "patchVersion", "refCounts" FROM rows WHERE "clientGroupID" = ?1"#,
        )?;
        for r in st.query_map([group], |r| {
            Ok((
                r.get(0)?,
                r.get(1)?,
                r.get(2)?,
                r.get::<_, String>(3)?,
                r.get(4)?,
            ))
        })? {
            let (t, k, rv, pv, refs) = r?;
            l.row(t, k, rv, &pv, refs)?;
        }
        for (version, rv, processed, schema, clock, _, rows) in logged {
            let schema = schema.or_else(|| l.0.client_schema.as_ref().map(|s| s.to_string()));
            l.instance(&version, rv, processed, schema, Some(clock))?;
            for (t, k, rv, pv, refs) in rows {
                l.row(t, k, rv, &pv, refs)?;
            }
        }
        Ok(l.done())
    }

    /// Writes a batch: a small one as log entries, a large one (after folding the log, so
    /// records stay in order) into the tables.
    fn write_sync(
        w: &mut Writer,
        unfolded: &Mutex<HashMap<String, i64>>,
        deltas: &[Arc<CvrDelta>],
    ) -> Result<(), CvrError> {
        let now = crate::replica::now_ms();
        if deltas.len() > LOG_MAX_GROUPS {
            while fold(w, unfolded, FOLD_CHUNK)? {}
            let tx = w.conn.transaction()?;
            for d in deltas {
                Self::write_records(&tx, d)?;
            }
            let instances: Vec<InstanceCols<'_>> = deltas
                .iter()
                .map(|d| InstanceCols {
                    group: &d.group,
                    version: &d.version,
                    replica_version: d.replica_version.as_deref(),
                    processed: d.processed.as_deref(),
                    client_schema: d.client_schema.as_deref(),
                    last_active: now,
                    ttl_clock: d.ttl_clock,
                })
                .collect();
            let columns: Vec<(&str, &RowId, &str, String, Option<String>)> = deltas
                .iter()
                .flat_map(|d| {
                    d.rows.iter().map(|(id, r)| {
                        let (pv, refs) = row_columns(r);
                        (d.group.as_str(), id, r.row_version.as_str(), pv, refs)
                    })
                })
                .collect();
            let rows: Vec<RowCols<'_>> = columns
                .iter()
                .map(|(g, (t, k), rv, pv, refs)| {
                    (
                        *g,
                        t.as_str(),
                        k.as_str(),
                        *rv,
                        pv.as_str(),
                        refs.as_deref(),
                    )
                })
                .collect();
            upsert(&tx, &instances, &rows)?;
            tx.commit()?;
            return Ok(());
        }
        let first = w.next_seq;
        let entries: Vec<(i64, &str, String)> = deltas
            .iter()
            .zip(first..)
            .map(|(d, seq)| {
                let rows: Vec<(&str, &str, &str, String, Option<String>)> = d
                    .rows
                    .iter()
                    .map(|((t, k), r)| {
                        let (pv, refs) = row_columns(r);
                        (t.as_str(), k.as_str(), r.row_version.as_str(), pv, refs)
                    })
                    .collect();
                let entry = serde_json::to_string(&(
                    &d.version,
                    &d.replica_version,
                    &d.processed,
                    &d.client_schema,
                    d.ttl_clock,
                    now,
                    rows,
                ))
                .expect("CVR records serialize");
                (seq, d.group.as_str(), entry)
            })
            .collect();
        let tx = w.conn.transaction()?;
        for d in deltas {
            Self::write_records(&tx, d)?;
        }
        for chunk in entries.chunks(UPSERT_CHUNK) {
            let mut p: Vec<&dyn rusqlite::ToSql> = Vec::with_capacity(chunk.len() * 3);
            for (seq, group, entry) in chunk {
                p.extend([seq as &dyn rusqlite::ToSql, group, entry]);
            }
            tx.prepare_cached(&log_insert(chunk.len()))?
                .execute(p.as_slice())?;
        }
        tx.commit()?;
        w.next_seq = first + entries.len() as i64;
        w.entries += entries.len();
        w.since.get_or_insert_with(Instant::now);
        let mut unfolded = unfolded.lock().expect("cvr unfolded");
        for (seq, group, _) in &entries {
            unfolded.insert(group.to_string(), *seq);
        }
        Ok(())
    }

    /// Folds the log while it is due and no batch waits.
    fn maintain_sync(
        w: &mut Writer,
        unfolded: &Mutex<HashMap<String, i64>>,
        busy: &dyn Fn() -> bool,
    ) -> Result<(), CvrError> {
        let due = w.entries >= FOLD_ENTRIES || w.since.is_some_and(|t| t.elapsed() >= FOLD_AGE);
        if !due {
            return Ok(());
        }
        while !busy() && fold(w, unfolded, FOLD_CHUNK)? {}
        Ok(())
    }

    /// A group's clients, queries and desires (rarely changed: not on a plain poke).
    fn write_records(tx: &rusqlite::Transaction<'_>, d: &CvrDelta) -> Result<(), CvrError> {
        let g = d.group.as_str();
        if let Some(clients) = &d.clients {
            tx.prepare_cached(r#"DELETE FROM clients WHERE "clientGroupID" = ?1"#)?
                .execute([g])?;
            for c in clients {
                tx.prepare_cached(
                    r#"INSERT INTO clients ("clientGroupID", "clientID") VALUES (?1, ?2)"#,
                )?
                .execute([g, c])?;
            }
        }
        for (h, q) in &d.queries {
            match q {
                Some(q) => tx.prepare_cached(
                    r#"INSERT OR REPLACE INTO queries ("clientGroupID", "queryHash", data) VALUES (?1, ?2, ?3)"#,
                )?
                .execute(
                    params![g, h, q],
                )?,
                None => tx.prepare_cached(
                    r#"DELETE FROM queries WHERE "clientGroupID" = ?1 AND "queryHash" = ?2"#,
                )?
                .execute(
                    params![g, h],
                )?,
            };
        }
        for ((c, h), v) in &d.desires {
            match v {
                Some(v) => tx.prepare_cached(
                    r#"INSERT OR REPLACE INTO desires ("clientGroupID", "clientID", "queryHash", data) VALUES (?1, ?2, ?3, ?4)"#,
                )?
                .execute(
                    params![g, c, h, v],
                )?,
                None => tx.prepare_cached(
                    r#"DELETE FROM desires WHERE "clientGroupID" = ?1 AND "clientID" = ?2 AND "queryHash" = ?3"#,
                )?
                .execute(
                    params![g, c, h],
                )?,
            };
        }
        Ok(())
    }
}

impl CvrBackend for SqliteBackend {
    fn blocking_writes(&self) -> bool {
        true
    }

    fn write_batch_blocking(&self, deltas: &[Arc<CvrDelta>]) -> Result<(), CvrError> {
        Self::write_sync(
            &mut self.conn.lock().expect("cvr connection"),
            &self.unfolded,
            deltas,
        )
    }

    fn maintain_blocking(&self, busy: &dyn Fn() -> bool) {
        let r = Self::maintain_sync(
            &mut self.conn.lock().expect("cvr connection"),
            &self.unfolded,
            busy,
        );
        if let Err(e) = r {
            warn!(error = %e, "folding the client view record log failed; retrying later");
        }
    }

    fn load<'a>(&'a self, group: &'a str) -> BoxFut<'a, Result<Cvr, CvrError>> {
        let conn = self.reader.clone();
        let group = group.to_string();
        let log = self
            .unfolded
            .lock()
            .expect("cvr unfolded")
            .contains_key(&group);
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                Self::load_sync(&mut conn.lock().expect("cvr reader"), &group, log)
            })
            .await
            .map_err(|e| CvrError::Data(format!("CVR load task: {e}")))?
        })
    }

    fn write(&self, delta: Arc<CvrDelta>) -> BoxFut<'_, Result<(), CvrError>> {
        self.write_batch(vec![delta])
    }

    fn stored_asts(&self) -> BoxFut<'_, Result<Vec<String>, CvrError>> {
        let conn = self.reader.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = conn.lock().expect("cvr reader");
                let mut st = conn.prepare(
                    r#"SELECT DISTINCT json_extract(data, '$.ast') FROM queries WHERE json_type(data, '$.ast') = 'object'"#,
                )?;
                let asts = st
                    .query_map([], |r| r.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()?;
                Ok(asts)
            })
            .await
            .map_err(|e| CvrError::Data(format!("CVR read task: {e}")))?
        })
    }

    fn write_batch(&self, deltas: Vec<Arc<CvrDelta>>) -> BoxFut<'_, Result<(), CvrError>> {
        let conn = self.conn.clone();
        let unfolded = self.unfolded.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                Self::write_sync(
                    &mut conn.lock().expect("cvr connection"),
                    &unfolded,
                    &deltas,
                )
            })
            .await
            .map_err(|e| CvrError::Data(format!("CVR write task: {e}")))?
        })
    }

    fn inactive(&self, before_ms: i64, limit: usize) -> BoxFut<'_, Result<Vec<String>, CvrError>> {
        let conn = self.reader.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let conn = conn.lock().expect("cvr reader");
                let mut st = conn.prepare(
                    r#"SELECT "clientGroupID" FROM instances WHERE coalesce("lastActive", 0) < ?1
                       ORDER BY coalesce("lastActive", 0) LIMIT ?2"#,
                )?;
                let groups = st
                    .query_map(params![before_ms, limit as i64], |r| r.get(0))?
                    .collect::<Result<Vec<String>, _>>()?;
                Ok(groups)
            })
            .await
            .map_err(|e| CvrError::Data(format!("CVR read task: {e}")))?
        })
    }

    /// Nothing to do: the file belongs to this process alone, whose running groups are never
    /// collected.
    fn touch(&self, _groups: Vec<String>, _now_ms: i64) -> BoxFut<'_, Result<(), CvrError>> {
        Box::pin(async { Ok(()) })
    }

    fn purge(&self, groups: Vec<String>, before_ms: i64) -> BoxFut<'_, Result<usize, CvrError>> {
        let conn = self.conn.clone();
        let unfolded = self.unfolded.clone();
        Box::pin(async move {
            tokio::task::spawn_blocking(move || {
                let mut w = conn.lock().expect("cvr connection");
                // `lastActive` and the records must be current before anything is deleted.
                while fold(&mut w, &unfolded, FOLD_CHUNK)? {}
                let tx = w.conn.transaction()?;
                let mut n = 0;
                for g in &groups {
                    let gone = tx.execute(
                        r#"DELETE FROM instances WHERE "clientGroupID" = ?1 AND coalesce("lastActive", 0) < ?2"#,
                        params![g, before_ms],
                    )?;
                    if gone == 0 {
                        continue;
                    }
                    for t in ["clients", "queries", "desires", "rows"] {
                        tx.execute(
                            &format!(r#"DELETE FROM {t} WHERE "clientGroupID" = ?1"#),
                            [g],
                        )?;
                    }
                    n += 1;
                }
                tx.commit()?;
                Ok(n)
            })
            .await
            .map_err(|e| CvrError::Data(format!("CVR purge task: {e}")))?
        })
    }
}

/// Client view records in Postgres (`ZERO_CVR_DB`), schema `{app}_{shard}/cvr`.
pub struct PgBackend {
    pool: PgPool,
    schema: String,
    max_conns: usize,
}

/// Marks a CVR schema as written by this server; zero-cache's own layout differs.
const PG_FORMAT: &str = "zero-cache-rs/1";

impl PgBackend {
    /// Connects and creates the schema if needed. A schema left by another implementation
    /// (no format marker) is replaced: records are derived state, and clients then resync.
    pub async fn open(
        cfg: UpstreamConfig,
        schema: String,
        max_conns: usize,
    ) -> Result<PgBackend, CvrError> {
        let b = PgBackend {
            pool: PgPool::new(cfg, max_conns),
            schema,
            max_conns,
        };
        let mut c = b.pool.get().await?;
        let tx = c.transaction().await?;
        // Several view-syncers may start at once against one database.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&b.schema])
            .await?;
        let s = b.q("");
        let exists = tx
            .query_opt(
                "SELECT 1 FROM pg_namespace WHERE nspname = $1",
                &[&b.schema],
            )
            .await?
            .is_some();
        if exists {
            let ours = tx
                .query_opt(
                    "SELECT 1 FROM pg_tables WHERE schemaname = $1 AND tablename = 'storeFormat'",
                    &[&b.schema],
                )
                .await?
                .is_some()
                && tx
                    .query_opt(
                        &format!(r#"SELECT 1 FROM {s}"storeFormat" WHERE format = $1"#),
                        &[&PG_FORMAT],
                    )
                    .await?
                    .is_some();
            if !ours {
                warn!(schema = %b.schema, "replacing client view records of another format; their clients will resync");
                tx.batch_execute(&format!("DROP SCHEMA {} CASCADE", b.ident()))
                    .await?;
            }
        }
        tx.batch_execute(&format!(
            r#"CREATE SCHEMA IF NOT EXISTS {schema};
CREATE TABLE IF NOT EXISTS {s}"storeFormat" (format TEXT PRIMARY KEY);
INSERT INTO {s}"storeFormat" VALUES ('{PG_FORMAT}') ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {s}instances (
  "clientGroupID" TEXT PRIMARY KEY, version TEXT NOT NULL, "replicaVersion" TEXT,
  processed TEXT, "clientSchema" TEXT, "lastActive" BIGINT, "ttlClock" DOUBLE PRECISION);
ALTER TABLE {s}instances ADD COLUMN IF NOT EXISTS "ttlClock" DOUBLE PRECISION;
CREATE TABLE IF NOT EXISTS {s}clients (
  "clientGroupID" TEXT, "clientID" TEXT, PRIMARY KEY ("clientGroupID", "clientID"));
CREATE TABLE IF NOT EXISTS {s}queries (
  "clientGroupID" TEXT, "queryHash" TEXT, data TEXT NOT NULL,
  PRIMARY KEY ("clientGroupID", "queryHash"));
CREATE TABLE IF NOT EXISTS {s}desires (
  "clientGroupID" TEXT, "clientID" TEXT, "queryHash" TEXT, data TEXT NOT NULL,
  PRIMARY KEY ("clientGroupID", "clientID", "queryHash"));
CREATE TABLE IF NOT EXISTS {s}rows (
  "clientGroupID" TEXT, "table" TEXT, "rowKey" TEXT, "rowVersion" TEXT NOT NULL,
  "patchVersion" TEXT NOT NULL, "refCounts" TEXT,
  PRIMARY KEY ("clientGroupID", "table", "rowKey"));"#,
            schema = b.ident()
        ))
        .await?;
        tx.commit().await?;
        drop(c);
        Ok(b)
    }

    fn ident(&self) -> String {
        crate::upstream::quote_ident(&self.schema)
    }

    /// The schema-qualified prefix for table `t` (empty `t`: just the prefix).
    fn q(&self, t: &str) -> String {
        format!("{}.{t}", self.ident())
    }

    async fn load_pg(&self, group: &str) -> Result<Cvr, CvrError> {
        let c = self.pool.get().await?;
        let s = self.q("");
        let mut l = Loader(Cvr::new(group));
        let inst = c
            .query_opt(
                &format!(r#"SELECT version, "replicaVersion", processed, "clientSchema", "ttlClock" FROM {s}instances WHERE "clientGroupID" = $1"#),
                &[&group],
            )
            .await?;
        let Some(inst) = inst else {
            return Ok(l.done());
        };
        l.instance(
            &inst.get::<_, String>(0),
            inst.get(1),
            inst.get(2),
            inst.get(3),
            inst.get(4),
        )?;
        l.0.clients = c
            .query(
                &format!(r#"SELECT "clientID" FROM {s}clients WHERE "clientGroupID" = $1"#),
                &[&group],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        for r in c
            .query(
                &format!(r#"SELECT "queryHash", data FROM {s}queries WHERE "clientGroupID" = $1"#),
                &[&group],
            )
            .await?
        {
            l.query(r.get(0), r.get(1))?;
        }
        for r in c
            .query(
                &format!(r#"SELECT "clientID", "queryHash", data FROM {s}desires WHERE "clientGroupID" = $1"#),
                &[&group],
            )
            .await?
        {
            l.desire(r.get(0), r.get(1), r.get(2))?;
        }
        for r in c
            .query(
                &format!(r#"SELECT "table", "rowKey", "rowVersion", "patchVersion", "refCounts" FROM {s}rows WHERE "clientGroupID" = $1"#),
                &[&group],
            )
            .await?
        {
            l.row(r.get(0), r.get(1), r.get(2), r.get(3), r.get(4))?;
        }
        Ok(l.done())
    }

    async fn write_pg(&self, d: &CvrDelta) -> Result<(), CvrError> {
        let mut c = self.pool.get().await?;
        let s = self.q("");
        let tx = c.transaction().await?;
        let g = d.group.as_str();
        tx.execute(
            &format!(
                r#"INSERT INTO {s}instances AS i ("clientGroupID", version, "replicaVersion", processed, "clientSchema", "lastActive", "ttlClock")
                   VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT ("clientGroupID") DO UPDATE SET version = excluded.version,
                     "replicaVersion" = excluded."replicaVersion", processed = excluded.processed,
                     "clientSchema" = coalesce(excluded."clientSchema", i."clientSchema"), "lastActive" = excluded."lastActive",
                     "ttlClock" = excluded."ttlClock""#
            ),
            &[
                &g,
                &d.version,
                &d.replica_version,
                &d.processed,
                &d.client_schema,
                &crate::replica::now_ms(),
                &d.ttl_clock,
            ],
        )
        .await?;
        if let Some(clients) = &d.clients {
            tx.execute(
                &format!(r#"DELETE FROM {s}clients WHERE "clientGroupID" = $1"#),
                &[&g],
            )
            .await?;
            tx.execute(
                &format!(
                    r#"INSERT INTO {s}clients ("clientGroupID", "clientID") SELECT $1, unnest($2::text[])"#
                ),
                &[&g, clients],
            )
            .await?;
        }
        let (put_q, del_q): (Vec<_>, Vec<_>) = d.queries.iter().partition(|(_, v)| v.is_some());
        if !put_q.is_empty() {
            let hashes: Vec<&str> = put_q.iter().map(|(h, _)| h.as_str()).collect();
            let data: Vec<&str> = put_q.iter().filter_map(|(_, v)| v.as_deref()).collect();
            tx.execute(
                &format!(
                    r#"INSERT INTO {s}queries ("clientGroupID", "queryHash", data)
                       SELECT $1, * FROM unnest($2::text[], $3::text[])
                       ON CONFLICT ("clientGroupID", "queryHash") DO UPDATE SET data = excluded.data"#
                ),
                &[&g, &hashes, &data],
            )
            .await?;
        }
        if !del_q.is_empty() {
            let hashes: Vec<&str> = del_q.iter().map(|(h, _)| h.as_str()).collect();
            tx.execute(
                &format!(
                    r#"DELETE FROM {s}queries WHERE "clientGroupID" = $1 AND "queryHash" = ANY($2::text[])"#
                ),
                &[&g, &hashes],
            )
            .await?;
        }
        for ((client, hash), v) in &d.desires {
            match v {
                Some(v) => tx
                    .execute(
                        &format!(
                            r#"INSERT INTO {s}desires ("clientGroupID", "clientID", "queryHash", data) VALUES ($1, $2, $3, $4)
                               ON CONFLICT ("clientGroupID", "clientID", "queryHash") DO UPDATE SET data = excluded.data"#
                        ),
                        &[&g, client, hash, v],
                    )
                    .await?,
                None => tx
                    .execute(
                        &format!(
                            r#"DELETE FROM {s}desires WHERE "clientGroupID" = $1 AND "clientID" = $2 AND "queryHash" = $3"#
                        ),
                        &[&g, client, hash],
                    )
                    .await?,
            };
        }
        if !d.rows.is_empty() {
            let mut tables = Vec::with_capacity(d.rows.len());
            let mut keys = Vec::with_capacity(d.rows.len());
            let mut rvs = Vec::with_capacity(d.rows.len());
            let mut pvs = Vec::with_capacity(d.rows.len());
            let mut refs = Vec::with_capacity(d.rows.len());
            for ((t, k), r) in &d.rows {
                let (pv, rf) = row_columns(r);
                tables.push(t.as_str());
                keys.push(k.as_str());
                rvs.push(r.row_version.as_str());
                pvs.push(pv);
                refs.push(rf);
            }
            tx.execute(
                &format!(
                    r#"INSERT INTO {s}rows ("clientGroupID", "table", "rowKey", "rowVersion", "patchVersion", "refCounts")
                       SELECT $1, * FROM unnest($2::text[], $3::text[], $4::text[], $5::text[], $6::text[])
                       ON CONFLICT ("clientGroupID", "table", "rowKey") DO UPDATE SET
                         "rowVersion" = excluded."rowVersion", "patchVersion" = excluded."patchVersion",
                         "refCounts" = excluded."refCounts""#
                ),
                &[&g, &tables, &keys, &rvs, &pvs, &refs],
            )
            .await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

impl CvrBackend for PgBackend {
    fn load<'a>(&'a self, group: &'a str) -> BoxFut<'a, Result<Cvr, CvrError>> {
        Box::pin(self.load_pg(group))
    }

    fn write(&self, delta: Arc<CvrDelta>) -> BoxFut<'_, Result<(), CvrError>> {
        Box::pin(async move { self.write_pg(&delta).await })
    }

    fn stored_asts(&self) -> BoxFut<'_, Result<Vec<String>, CvrError>> {
        Box::pin(async move {
            let c = self.pool.get().await?;
            let s = self.q("");
            let rows = c
                .query(
                    &format!(
                        r#"SELECT DISTINCT (data::jsonb -> 'ast')::text FROM {s}queries WHERE jsonb_typeof(data::jsonb -> 'ast') = 'object'"#
                    ),
                    &[],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get::<_, String>(0)).collect())
        })
    }

    fn write_batch(&self, deltas: Vec<Arc<CvrDelta>>) -> BoxFut<'_, Result<(), CvrError>> {
        use futures::StreamExt;
        Box::pin(async move {
            // Groups are independent: write them on as many sessions as the pool allows.
            let results: Vec<Result<(), CvrError>> = futures::stream::iter(deltas)
                .map(|d| async move { self.write_pg(&d).await })
                .buffer_unordered(self.max_conns)
                .collect()
                .await;
            results.into_iter().collect()
        })
    }

    fn inactive(&self, before_ms: i64, limit: usize) -> BoxFut<'_, Result<Vec<String>, CvrError>> {
        Box::pin(async move {
            let c = self.pool.get().await?;
            let s = self.q("");
            let rows = c
                .query(
                    &format!(
                        r#"SELECT "clientGroupID" FROM {s}instances WHERE coalesce("lastActive", 0) < $1
                           ORDER BY coalesce("lastActive", 0) LIMIT $2"#
                    ),
                    &[&before_ms, &(limit as i64)],
                )
                .await?;
            Ok(rows.iter().map(|r| r.get(0)).collect())
        })
    }

    fn touch(&self, groups: Vec<String>, now_ms: i64) -> BoxFut<'_, Result<(), CvrError>> {
        Box::pin(async move {
            let c = self.pool.get().await?;
            let s = self.q("");
            c.execute(
                &format!(
                    r#"UPDATE {s}instances SET "lastActive" = $2 WHERE "clientGroupID" = ANY($1::text[])"#
                ),
                &[&groups, &now_ms],
            )
            .await?;
            Ok(())
        })
    }

    fn purge(&self, groups: Vec<String>, before_ms: i64) -> BoxFut<'_, Result<usize, CvrError>> {
        Box::pin(async move {
            let mut c = self.pool.get().await?;
            let s = self.q("");
            let tx = c.transaction().await?;
            // Only groups still inactive: another process may have touched or written one.
            let gone: Vec<String> = tx
                .query(
                    &format!(
                        r#"DELETE FROM {s}instances WHERE "clientGroupID" = ANY($1::text[])
                           AND coalesce("lastActive", 0) < $2 RETURNING "clientGroupID""#
                    ),
                    &[&groups, &before_ms],
                )
                .await?
                .iter()
                .map(|r| r.get(0))
                .collect();
            if !gone.is_empty() {
                for t in ["clients", "queries", "desires", "rows"] {
                    tx.execute(
                        &format!(r#"DELETE FROM {s}{t} WHERE "clientGroupID" = ANY($1::text[])"#),
                        &[&gone],
                    )
                    .await?;
                }
            }
            tx.commit().await?;
            Ok(gone.len())
        })
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::sync::cvr::RowId;

    /// Entries in the CVR file's log (not yet folded).
    fn log_len(file: &Path) -> i64 {
        Connection::open(file)
            .unwrap()
            .query_row("SELECT count(*) FROM log", [], |r| r.get(0))
            .unwrap()
    }

    #[tokio::test]
    async fn sqlite_store_round_trips_and_loads_after_queued_writes() {
        let dir = tempfile::tempdir().unwrap();
        let store = CvrStore::open(&dir.path().join("cvr.db"), None, "zero_0")
            .await
            .unwrap();
        let mut cvr = store.load("g").await.unwrap();
        assert!(!cvr.stored);
        let v1 = CvrVersion::parse("01").unwrap();
        let a: RowId = ("t".into(), r#"{"id":1}"#.into());
        cvr.set_query_rows("q1", &BTreeMap::from([(a.clone(), "01".to_string())]), &v1);
        cvr.add_client("c1");
        cvr.version = v1;
        let written = store.flush(&mut cvr);
        // Loads wait for the queued write of the same group.
        let back = store.load("g").await.unwrap();
        assert!(back.stored);
        assert_eq!(back.rows, cvr.rows);
        assert_eq!(back.query_rows, cvr.query_rows);
        assert_eq!(back.clients, cvr.clients);
        assert_eq!(back.version, cvr.version);
        written.await.expect("written");
        assert!(store.drain(Duration::from_secs(5)).await);
    }

    /// A fold stops at [`FOLD_ROWS`] (so a poke's write waits for a short transaction only)
    /// and the next one resumes after the last entry it took; loads in between see the
    /// folded tables with the rest of the log applied over them.
    #[tokio::test]
    async fn sqlite_folds_stop_at_the_row_cap_and_resume_in_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cvr.db");
        let backend = SqliteBackend::open(&file).unwrap();
        let mut cvr = Cvr::new("g");
        cvr.add_client("c1");
        let mut other = Cvr::new("h");
        other.add_client("c2");
        // Three versions of g, each replacing the query's rows with FOLD_ROWS / 2 + 1 others
        // (the first fold reaches the cap with the second entry), and before the third one
        // an entry of another group, left for the second fold.
        for v in 1..=3 {
            if v == 3 {
                let version = CvrVersion::parse("03").unwrap();
                let id: RowId = ("t".into(), r#"{"id":1}"#.into());
                other.set_query_rows("q1", &BTreeMap::from([(id, "03".into())]), &version);
                other.version = version;
                backend.write(Arc::new(other.take_delta())).await.unwrap();
            }
            let version = CvrVersion::parse(&format!("0{v}")).unwrap();
            let rows: BTreeMap<RowId, String> = (0..FOLD_ROWS / 2 + 1)
                .map(|i| {
                    let id: RowId = ("t".into(), format!(r#"{{"id":{}}}"#, v * 10_000 + i));
                    (id, format!("0{v}"))
                })
                .collect();
            cvr.set_query_rows("q1", &rows, &version);
            cvr.version = version;
            cvr.processed = Some(format!("0{v}"));
            backend.write(Arc::new(cvr.take_delta())).await.unwrap();
        }
        assert_eq!(log_len(&file), 4);
        let loaded = backend.load("g").await.unwrap();
        assert_eq!((&loaded.version, &loaded.rows), (&cvr.version, &cvr.rows));
        let more = {
            let mut w = backend.conn.lock().unwrap();
            fold(&mut w, &backend.unfolded, FOLD_CHUNK).unwrap()
        };
        assert!(more, "the cap leaves entries for the next fold");
        assert_eq!(log_len(&file), 2, "two entries reach the cap");
        let loaded = backend.load("g").await.unwrap();
        assert_eq!((&loaded.version, &loaded.rows), (&cvr.version, &cvr.rows));
        assert_eq!(loaded.processed, cvr.processed);
        let loaded = backend.load("h").await.unwrap();
        assert_eq!(
            (&loaded.version, &loaded.rows),
            (&other.version, &other.rows)
        );
        {
            let mut w = backend.conn.lock().unwrap();
            while fold(&mut w, &backend.unfolded, FOLD_CHUNK).unwrap() {}
        }
        assert_eq!(log_len(&file), 0);
        let loaded = backend.load("g").await.unwrap();
        assert_eq!((&loaded.version, &loaded.rows), (&cvr.version, &cvr.rows));
        assert_eq!(loaded.clients, cvr.clients);
        assert_eq!(
            loaded.rows.values().filter(|r| r.refs.is_some()).count(),
            FOLD_ROWS / 2 + 1,
            "only the last version's rows are live"
        );
        let loaded = backend.load("h").await.unwrap();
        assert_eq!(
            (&loaded.version, &loaded.rows),
            (&other.version, &other.rows)
        );
        assert_eq!(loaded.clients, other.clients);
    }

    /// Small batches go to the log, loads apply it, a large batch and a reopen fold it, and
    /// every way of reading gives the record as it was written last.
    #[tokio::test]
    async fn sqlite_log_entries_load_fold_and_keep_their_order() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cvr.db");
        let same = |a: &Cvr, b: &Cvr| {
            assert!(b.stored);
            assert_eq!(a.version, b.version);
            assert_eq!(a.processed, b.processed);
            assert_eq!(a.rows, b.rows);
            assert_eq!(a.query_rows, b.query_rows);
            assert_eq!(a.clients, b.clients);
            assert_eq!(a.client_schema, b.client_schema);
        };
        let a: RowId = ("t".into(), r#"{"id":1}"#.into());
        let b: RowId = ("t".into(), r#"{"id":2}"#.into());
        let mut cvr = Cvr::new("g");
        cvr.client_schema = Some(serde_json::json!({"tables": {}}));
        {
            let backend = SqliteBackend::open(&file).unwrap();
            let v1 = CvrVersion::parse("01").unwrap();
            cvr.set_query_rows(
                "q1",
                &BTreeMap::from([(a.clone(), "01".into()), (b.clone(), "01".into())]),
                &v1,
            );
            cvr.add_client("c1");
            cvr.version = v1.clone();
            cvr.processed = Some("01".into());
            backend.write(Arc::new(cvr.take_delta())).await.unwrap();
            let v2 = CvrVersion::parse("02").unwrap();
            cvr.set_query_rows("q1", &BTreeMap::from([(a.clone(), "02".into())]), &v2);
            cvr.version = v2;
            cvr.processed = Some("02".into());
            backend.write(Arc::new(cvr.take_delta())).await.unwrap();
            assert_eq!(log_len(&file), 2, "small batches are logged");
            same(&cvr, &backend.load("g").await.unwrap());
            assert!(cvr.rows[&b].refs.is_none(), "b is a tombstone");

            // A large batch folds the log first, then writes the tables.
            let v3 = CvrVersion::parse("03").unwrap();
            cvr.set_query_rows("q1", &BTreeMap::from([(b.clone(), "03".into())]), &v3);
            cvr.version = v3.clone();
            cvr.processed = Some("03".into());
            let mut batch = vec![Arc::new(cvr.take_delta())];
            for i in 0..LOG_MAX_GROUPS {
                let mut o = Cvr::new(&format!("o{i}"));
                o.version = v3.clone();
                batch.push(Arc::new(o.take_delta()));
            }
            backend.write_batch(batch).await.unwrap();
            assert_eq!(log_len(&file), 0);
            same(&cvr, &backend.load("g").await.unwrap());

            // Logged again, then left for the next process.
            let v4 = CvrVersion::parse("04").unwrap();
            cvr.set_query_rows("q1", &BTreeMap::from([(a.clone(), "04".into())]), &v4);
            cvr.version = v4;
            cvr.processed = Some("04".into());
            backend.write(Arc::new(cvr.take_delta())).await.unwrap();
            assert_eq!(log_len(&file), 1);
        }
        let backend = SqliteBackend::open(&file).unwrap();
        assert_eq!(log_len(&file), 0, "opening folds the log");
        same(&cvr, &backend.load("g").await.unwrap());
        // Upkeep folds a due log; garbage collection sees current records.
        let v5 = CvrVersion::parse("05").unwrap();
        cvr.version = v5;
        backend.write(Arc::new(cvr.take_delta())).await.unwrap();
        backend.conn.lock().unwrap().since = Some(Instant::now() - FOLD_AGE);
        backend.maintain_blocking(&|| false);
        assert_eq!(log_len(&file), 0, "a due log is folded");
        same(&cvr, &backend.load("g").await.unwrap());
        cvr.version = CvrVersion::parse("06").unwrap();
        backend.write(Arc::new(cvr.take_delta())).await.unwrap();
        let purged = backend
            .purge(vec!["g".into()], crate::replica::now_ms() - 60_000)
            .await
            .unwrap();
        assert_eq!(purged, 0, "written a moment ago: active");
        same(&cvr, &backend.load("g").await.unwrap());
    }

    #[tokio::test]
    async fn releases_run_once_the_groups_record_is_stored_and_before_its_waiters() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cvr.db");
        let store = CvrStore::open(&file, None, "zero_0").await.unwrap();
        let ran = Arc::new(Mutex::new(Vec::<(String, bool)>::new()));
        let mut waits = Vec::new();
        for i in 0..50 {
            let g = format!("g{i}");
            let mut cvr = store.load(&g).await.unwrap();
            cvr.add_client("c1");
            cvr.version = CvrVersion::parse("01").unwrap();
            waits.push((g.clone(), store.flush(&mut cvr)));
            let (ran, file, group) = (ran.clone(), file.clone(), g.clone());
            let release: Release = Box::new(move || {
                // The record is in the file (its tables or its log) when the release runs.
                let conn = Connection::open(&file).unwrap();
                let stored: bool = conn
                    .query_row(
                        r#"SELECT (SELECT count(*) FROM instances WHERE "clientGroupID" = ?1)
                                + (SELECT count(*) FROM log WHERE "clientGroupID" = ?1) > 0"#,
                        [&group],
                        |r| r.get(0),
                    )
                    .unwrap();
                ran.lock().unwrap().push((group, stored));
            });
            if let Some(r) = store.after_written(&g, release) {
                r();
            }
        }
        for (g, w) in waits {
            w.await.expect("written");
            // The waiter is told after the group's release ran.
            assert!(ran.lock().unwrap().iter().any(|(x, _)| *x == g), "{g}");
        }
        let ran = ran.lock().unwrap().clone();
        assert_eq!(ran.len(), 50);
        assert!(ran.iter().all(|(_, stored)| *stored), "{ran:?}");
        // Nothing left to write: the release comes back to run now.
        assert!(store.after_written("g0", Box::new(|| {})).is_some());
    }

    #[tokio::test]
    async fn many_groups_are_written_in_batches_and_their_shapes_listed() {
        let dir = tempfile::tempdir().unwrap();
        let store = CvrStore::open(&dir.path().join("cvr.db"), None, "zero_0")
            .await
            .unwrap();
        let v1 = CvrVersion::parse("01").unwrap();
        let mut waits = Vec::new();
        for i in 0..300 {
            let mut cvr = store.load(&format!("g{i}")).await.unwrap();
            cvr.add_client("c1");
            let ast = serde_json::json!({"table": "issue", "where": {"type": "simple", "op": "=",
                "left": {"type": "column", "name": "id"}, "right": {"type": "literal", "value": i % 3}}});
            cvr.queries.insert(
                "q".into(),
                crate::sync::cvr::QueryRecord {
                    ast: Some(ast),
                    name: None,
                    args: None,
                    got: false,
                    patch_version: None,
                    transformation_hash: None,
                },
            );
            cvr.touch_query("q");
            let a: RowId = ("t".into(), format!(r#"{{"id":{i}}}"#));
            cvr.set_query_rows("q", &BTreeMap::from([(a, "01".to_string())]), &v1);
            cvr.version = v1.clone();
            waits.push(store.flush(&mut cvr));
        }
        for w in waits {
            w.await.expect("written");
        }
        for i in [0, 149, 299] {
            let back = store.load(&format!("g{i}")).await.unwrap();
            assert!(back.stored);
            assert_eq!(back.rows.len(), 1);
            assert_eq!(back.version, v1);
        }
        let mut asts = store.stored_asts().await.unwrap();
        asts.sort();
        assert_eq!(asts.len(), 3, "{asts:?}");
        assert!(asts[0].contains(r#""table":"issue""#));
    }

    #[tokio::test]
    async fn a_file_with_rowid_tables_is_rebuilt_keeping_its_records() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("cvr.db");
        {
            // The layout of earlier files: rowid tables, no TTL clock.
            let conn = Connection::open(&file).unwrap();
            conn.execute_batch(
                r#"CREATE TABLE instances ("clientGroupID" TEXT PRIMARY KEY, version TEXT NOT NULL,
                     "replicaVersion" TEXT, processed TEXT, "clientSchema" TEXT, "lastActive" INTEGER);
                   CREATE TABLE clients ("clientGroupID" TEXT, "clientID" TEXT,
                     PRIMARY KEY ("clientGroupID", "clientID"));
                   CREATE TABLE queries ("clientGroupID" TEXT, "queryHash" TEXT, data TEXT NOT NULL,
                     PRIMARY KEY ("clientGroupID", "queryHash"));
                   CREATE TABLE desires ("clientGroupID" TEXT, "clientID" TEXT, "queryHash" TEXT,
                     data TEXT NOT NULL, PRIMARY KEY ("clientGroupID", "clientID", "queryHash"));
                   CREATE TABLE rows ("clientGroupID" TEXT, "table" TEXT, "rowKey" TEXT,
                     "rowVersion" TEXT NOT NULL, "patchVersion" TEXT NOT NULL, "refCounts" TEXT,
                     PRIMARY KEY ("clientGroupID", "table", "rowKey"));
                   INSERT INTO instances VALUES ('g', '05', 'rv', '05', NULL, 1);
                   INSERT INTO clients VALUES ('g', 'c1');
                   INSERT INTO rows VALUES ('g', 't', '{"id":1}', '04', '05', '["q1"]');"#,
            )
            .unwrap();
        }
        let store = CvrStore::open(&file, None, "zero_0").await.unwrap();
        let back = store.load("g").await.unwrap();
        assert!(back.stored);
        assert_eq!(back.version, CvrVersion::parse("05").unwrap());
        assert_eq!(back.clients.len(), 1);
        let row = &back.rows[&("t".to_string(), r#"{"id":1}"#.to_string())];
        assert_eq!(row.row_version, "04");
        assert_eq!(back.query_rows["q1"].len(), 1);
        drop(store);
        let conn = Connection::open(&file).unwrap();
        let rowid_tables: i64 = conn
            .query_row(
                // The log is appended to in rowid order on purpose.
                "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name <> 'log' AND sql NOT LIKE '%WITHOUT ROWID%'",
                [],
                |r| r.get(0),
            )
            .unwrap();
        assert_eq!(rowid_tables, 0);
    }
}
