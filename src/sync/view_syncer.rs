//! One client group's view-syncer (protocol §4.5): an actor that owns the group's CVR, applies
//! desired-query changes, hydrates queries, advances them on every new replica watermark, and
//! pokes each connected client from its cookie to the CVR's version.
//!
//! Every operation runs to completion before the next command is read, so the CVR, the
//! clients' cookies and the pokes stay consistent without locks. Pokes are computed as a
//! catch-up from each client's version: rows, queries and desires whose patch version is newer
//! than the client's cookie, so a client that is current gets exactly the new changes and one
//! that reconnects with an old cookie gets everything it missed.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value as Json;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};
use zero_queries::ast::Ast;
use zero_queries::permissions::{self, Permissions};
use zero_queries::sql::SqlValue;

use super::SyncShared;
use super::auth::{Auth, TokenType, token_type};
use super::connect::PROTOCOL_VERSION;
use super::custom::QueryResult;
use super::cvr::{Cvr, CvrError, CvrVersion, DesireRecord, QueryRecord, RowId};
use super::cvr_store::Release;
use super::fetch::{CallContext, RequestInfo};
use super::inspect::{self, GroupMetrics, QueryMetrics};
use super::ivm::{Cmd, EngineMsg, QueryUpdate};
use super::protocol::{
    AnalyzeOptions, DEFAULT_TTL_MS, DeletedClients, Downstream, ErrorBody, ErrorKind,
    InitConnectionBody, InspectBody, InspectOp, MAX_TTL_MS, MutationPatchOp, PART_MAX_ENTRIES,
    PokeEndBody, PokePartBody, PokeStartBody, QueriesPatchOp, RowJson, RowPatchOp,
    UpQueriesPatchOp, Upstream,
};
use super::schema_check::check_client_schema;
use super::source::{SourceError, SqlViewSource, SyncedRow, ViewSource};

/// How long a view-syncer stays up after its last connection closes.
const KEEPALIVE: Duration = Duration::from_secs(5);

/// What the connection task sends to a client's socket.
#[derive(Debug)]
pub enum Outbound {
    /// A message.
    Msg(Downstream),
    /// Messages already rendered as text frames (a poke: rendered once by its group, written
    /// together with one flush).
    Frames(Vec<String>),
    /// Send the error message (if any), then close the socket.
    Close(Option<Downstream>),
}

/// A connection registering with its group.
#[derive(Debug)]
pub struct Connect {
    /// The client.
    pub client_id: String,
    /// The connection id the client chose (for logs).
    pub wsid: String,
    /// The server's id of this connection (unique, unlike `wsid`).
    pub conn_id: u64,
    /// The client's cookie at connect time.
    pub base_cookie: Option<String>,
    /// The connection's resolved token.
    pub auth: Option<Auth>,
    /// The connection's `userID`.
    pub user_id: Option<String>,
    /// The upgrade request (headers forwarded to the API server).
    pub request: RequestInfo,
    /// The sync protocol version the client connected with.
    pub protocol_version: u32,
    /// Messages to the socket.
    pub out: mpsc::UnboundedSender<Outbound>,
}

/// Commands to a group's view-syncer.
#[derive(Debug)]
pub enum GroupCmd {
    /// A new connection (replaces one of the same client). Boxed: every group's command
    /// channel allocates its slots at the size of the largest command.
    Connect(Box<Connect>),
    /// A message from a connection.
    Message {
        /// Sender.
        client_id: String,
        /// Sender's connection.
        conn_id: u64,
        /// The message.
        msg: Box<Upstream>,
    },
    /// A connection's token changed (`updateAuth`).
    Auth {
        /// The client.
        client_id: String,
        /// Its connection.
        conn_id: u64,
        /// The new token.
        auth: Option<Auth>,
    },
    /// A connection closed.
    Disconnect {
        /// The client.
        client_id: String,
        /// The connection that closed.
        conn_id: u64,
    },
}

/// Why an operation failed.
#[derive(Debug, thiserror::Error)]
enum OpError {
    #[error(transparent)]
    Cvr(#[from] CvrError),
    #[error(transparent)]
    Source(#[from] SourceError),
    /// A protocol error for one client.
    #[error("{}", .0.message)]
    Client(ErrorBody),
}

struct Conn {
    wsid: String,
    conn_id: u64,
    out: mpsc::UnboundedSender<Outbound>,
    base: Option<CvrVersion>,
    /// The version this client has (after its pokes).
    version: Option<CvrVersion>,
    initialized: bool,
    poked: bool,
    auth: Option<Auth>,
    request: RequestInfo,
    protocol_version: u32,
}

impl Conn {
    /// Callers settle first (`ViewSyncer::settle`): a message must not overtake the end of a
    /// poke that the CVR writer still holds.
    fn send(&self, m: Downstream) {
        let _ = self.out.send(Outbound::Msg(m));
    }
    fn close(&self, e: Option<ErrorBody>) {
        let _ = self.out.send(Outbound::Close(e.map(Downstream::Error)));
    }
}

/// The view-syncer of one client group.
pub(crate) struct ViewSyncer {
    id: String,
    shared: Arc<SyncShared>,
    cvr: Cvr,
    source: Box<dyn ViewSource>,
    conns: HashMap<String, Conn>,
    /// Row contents read at the current snapshot (saves re-reading them for pokes), as
    /// rendered once by the engine for every group.
    fresh: HashMap<RowId, RowJson>,
    permissions_text: Option<String>,
    permissions: Permissions,
    /// Transformed custom queries: the AST, or the error the API server returned.
    custom: HashMap<String, Result<Json, Json>>,
    /// `userQueryURL` / `userQueryHeaders` from the latest initConnection.
    query_url: Option<String>,
    query_headers: BTreeMap<String, String>,
    /// The latest token: custom queries are transformed with it, and legacy queries' permission
    /// rules read its claims (`authData`).
    auth: Option<Auth>,
    /// The connection whose request and token custom-query transforms use.
    auth_conn: Option<String>,
    /// The user and token type this group is pinned to (protocol §10).
    pinned: Option<(Option<String>, TokenType)>,
    last_revalidation: Instant,
    last_retransform: Instant,
    /// Messages from the view engine (in order: they move the group from version to version).
    engine_rx: mpsc::UnboundedReceiver<EngineMsg>,
    /// Set while the group has a connection: the engine sends this group's messages first.
    connected: Arc<std::sync::atomic::AtomicBool>,
    /// Queries subscribed in the engine, with the hash of the AST they run.
    subscribed: HashMap<String, String>,
    /// Subscribed queries whose rows have not arrived yet.
    awaiting: BTreeSet<String>,
    /// A fetch is outstanding.
    fetching: bool,
    /// A sync found no replica yet: sync again on the next engine message.
    resync: bool,
    /// The client schema's primary keys where they differ from the replica's.
    client_keys: Arc<BTreeMap<String, Vec<String>>>,
    /// Since when the group has had a connection (its TTL clock runs only then).
    clock_since: Option<Instant>,
    /// When each awaited subscription was sent (hydration time, `ZERO_QUERY_HYDRATION_STATS`).
    hydrating: HashMap<String, Instant>,
    /// Server times of each subscribed query, for the inspector.
    query_metrics: HashMap<String, QueryMetrics>,
    /// Server times of all of the group's queries, for the inspector.
    group_metrics: GroupMetrics,
    /// Completes when the latest queued CVR write is stored: `pokeEnd` (which makes the client
    /// adopt the new cookie) waits for it, the poke's parts do not.
    durable: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Completes when the pokes' ends handed to the CVR writer (with the write this receiver
    /// belongs to) are sent: frames sent directly wait for it.
    handoff: Option<tokio::sync::oneshot::Receiver<()>>,
    /// The replica version of the group's first engine message: every later change to its
    /// LMIDs / mutation results is flagged by the engine.
    lmid_since: Option<String>,
    /// The latest replica version flagged with such a change.
    lmid_changed: Option<String>,
    /// The last LMID / mutation-result read, by its bounds (`from` state, `upto`): an engine
    /// message that only changed LMIDs reads them to decide whether to poke, and the poke's
    /// catch-up asks for the same range; kept until the message is handled.
    lmid_read: Option<(Option<String>, String, PokePartBody)>,
}

impl ViewSyncer {
    /// Loads the group's CVR.
    pub(crate) async fn open(id: &str, shared: Arc<SyncShared>) -> Result<ViewSyncer, CvrError> {
        let cvr = shared.cvr.load(id).await?;
        let keys = cvr
            .client_schema
            .as_ref()
            .map(client_keys)
            .unwrap_or_default();
        let source = Box::new(SqlViewSource::new(shared.readers.clone(), keys));
        let (engine_tx, engine_rx) = mpsc::unbounded_channel();
        let connected = Arc::new(std::sync::atomic::AtomicBool::new(false));
        shared.engine.send(Cmd::Register {
            group: id.to_string(),
            out: engine_tx,
            connected: connected.clone(),
        });
        Ok(ViewSyncer {
            id: id.to_string(),
            shared,
            cvr,
            source,
            conns: HashMap::new(),
            fresh: HashMap::new(),
            permissions_text: None,
            permissions: Permissions::default(),
            custom: HashMap::new(),
            query_url: None,
            query_headers: BTreeMap::new(),
            auth: None,
            auth_conn: None,
            pinned: None,
            last_revalidation: Instant::now(),
            last_retransform: Instant::now(),
            engine_rx,
            connected,
            subscribed: HashMap::new(),
            awaiting: BTreeSet::new(),
            fetching: false,
            resync: false,
            client_keys: Arc::new(BTreeMap::new()),
            clock_since: None,
            hydrating: HashMap::new(),
            query_metrics: HashMap::new(),
            group_metrics: GroupMetrics::default(),
            durable: None,
            handoff: None,
            lmid_since: None,
            lmid_changed: None,
            lmid_read: None,
        })
    }

    /// Runs until the group has had no connection for [`KEEPALIVE`] and no command is pending.
    pub(crate) async fn run(mut self, mut rx: mpsc::UnboundedReceiver<GroupCmd>) {
        // One timer per group, set to the next thing due (not a tick every second: 10,000
        // groups would wake 10,000 times a second for nothing).
        let tick = tokio::time::sleep(Duration::from_secs(1));
        tokio::pin!(tick);
        let mut idle_since: Option<Instant> = Some(Instant::now());
        info!(client_group = %self.id, "view-syncer started");
        loop {
            self.track_connected();
            let now = Instant::now();
            let set = tick.deadline().into_std();
            let next = match self.next_due(idle_since) {
                // Due (or overdue, e.g. a retirement that commands prevented): check again
                // within a second, without moving a deadline that is still ahead.
                at if at <= now => {
                    if set > now && set <= now + Duration::from_secs(1) {
                        set
                    } else {
                        now + Duration::from_secs(1)
                    }
                }
                at => at,
            };
            let moved = next
                .saturating_duration_since(set)
                .max(set.saturating_duration_since(next));
            if moved > Duration::from_millis(1) {
                tick.as_mut().reset(tokio::time::Instant::from_std(next));
            }
            tokio::select! {
                cmd = rx.recv() => {
                    let Some(cmd) = cmd else { break };
                    self.handle(cmd).await;
                    idle_since = if self.conns.is_empty() { Some(idle_since.unwrap_or_else(Instant::now)) } else { None };
                }
                msg = self.engine_rx.recv() => {
                    let Some(msg) = msg else { break };
                    self.on_engine(msg).await;
                }
                _ = &mut tick => {
                    if self.last_revalidation.elapsed() >= self.shared.revalidate_interval {
                        self.last_revalidation = Instant::now();
                        self.revalidate().await;
                    }
                    if self.last_retransform.elapsed() >= self.shared.retransform_interval {
                        self.last_retransform = Instant::now();
                        // The API server's answer may depend on time or on data: transform the
                        // custom queries again (changed ASTs are re-subscribed by the sync).
                        if !self.custom.is_empty() {
                            self.custom.clear();
                            self.sync_and_poke().await;
                        }
                    }
                    if self.ttl_expired() {
                        self.sync_and_poke().await;
                    }
                    if let Some(t) = idle_since
                        && t.elapsed() >= KEEPALIVE
                        && self.shared.retire(&self.id, &rx)
                    {
                        break;
                    }
                }
            }
        }
        self.track_connected();
        self.shared.engine.send(Cmd::Leave {
            group: self.id.clone(),
        });
        info!(client_group = %self.id, "view-syncer stopped");
    }

    /// When the group next has something to do on its own: revalidate tokens, transform
    /// custom queries again, expire an inactive query's TTL, or retire after [`KEEPALIVE`].
    fn next_due(&self, idle_since: Option<Instant>) -> Instant {
        let mut at = (self.last_revalidation + self.shared.revalidate_interval)
            .min(self.last_retransform + self.shared.retransform_interval);
        if let Some(t) = idle_since {
            at = at.min(t + KEEPALIVE);
        }
        // The TTL clock runs only while connected: then an inactive desire expires at a fixed
        // wall-clock time.
        if let Some(since) = self.clock_since {
            for d in self.cvr.desires.values() {
                if let (true, Some(inactive)) = (d.deleted, d.inactivated_at) {
                    let left_ms = inactive + d.ttl_ms - self.cvr.ttl_clock;
                    let left = Duration::try_from_secs_f64(left_ms.max(0.0) / 1000.0)
                        .unwrap_or(Duration::MAX);
                    if let Some(t) = since.checked_add(left) {
                        at = at.min(t);
                    }
                }
            }
        }
        at
    }

    /// Starts or stops the TTL clock as the group gains its first or loses its last
    /// connection; a stopped clock is stored so that it stays stopped across restarts.
    fn track_connected(&mut self) {
        self.connected
            .store(!self.conns.is_empty(), std::sync::atomic::Ordering::Relaxed);
        match (!self.conns.is_empty(), self.clock_since.is_some()) {
            (true, false) => self.clock_since = Some(Instant::now()),
            (false, true) => {
                self.fold_clock();
                self.clock_since = None;
                if self.cvr.stored {
                    self.flush();
                }
            }
            _ => {}
        }
    }

    /// The group's TTL clock now (ms).
    fn ttl_now(&self) -> f64 {
        self.cvr.ttl_clock
            + self
                .clock_since
                .map_or(0.0, |t| t.elapsed().as_secs_f64() * 1000.0)
    }

    /// Moves the running clock's elapsed time into the record.
    fn fold_clock(&mut self) {
        if let Some(t) = self.clock_since {
            self.cvr.ttl_clock += t.elapsed().as_secs_f64() * 1000.0;
            self.clock_since = Some(Instant::now());
        }
    }

    /// Queues the record's changes (with the TTL clock) for the store; never waits.
    fn flush(&mut self) {
        self.fold_clock();
        // A group with no initialized client has no poke waiting on this write: it must not
        // be written ahead of (and in a batch before) the groups that do.
        self.durable = Some(if self.conns.values().any(|c| c.initialized) {
            self.shared.cvr.flush(&mut self.cvr)
        } else {
            self.shared.cvr.flush_lazily(&mut self.cvr)
        });
    }

    async fn handle(&mut self, cmd: GroupCmd) {
        match cmd {
            GroupCmd::Connect(c) => {
                let c = *c;
                if let Some(old) = self.conns.remove(&c.client_id) {
                    debug!(client = %c.client_id, old = %old.wsid, "connection replaced");
                    old.close(None);
                }
                let base = c.base_cookie.as_deref().map(CvrVersion::parse);
                if let Err(e) = self.pin(c.user_id.as_deref(), c.auth.as_ref()) {
                    let _ = c.out.send(Outbound::Close(Some(Downstream::Error(e))));
                    return;
                }
                self.auth = c.auth.clone();
                self.auth_conn = Some(c.client_id.clone());
                let conn = Conn {
                    wsid: c.wsid,
                    conn_id: c.conn_id,
                    out: c.out,
                    base: base.clone().flatten(),
                    version: base.clone().flatten(),
                    initialized: false,
                    poked: false,
                    auth: c.auth,
                    request: c.request,
                    protocol_version: c.protocol_version,
                };
                if let Some(None) = base {
                    conn.close(Some(ErrorBody::new(
                        ErrorKind::InvalidConnectionRequestBaseCookie,
                        format!("Invalid baseCookie {:?}", c.base_cookie.unwrap_or_default()),
                    )));
                    return;
                }
                self.conns.insert(c.client_id, conn);
            }
            GroupCmd::Auth {
                client_id,
                conn_id,
                auth,
            } => {
                if self
                    .conns
                    .get(&client_id)
                    .is_none_or(|c| c.conn_id != conn_id)
                {
                    return;
                }
                let user = self.pinned.clone().and_then(|p| p.0);
                if let Err(e) = self.pin(user.as_deref(), auth.as_ref()) {
                    if let Some(c) = self.conns.remove(&client_id) {
                        c.close(Some(e));
                    }
                    return;
                }
                if let Some(c) = self.conns.get_mut(&client_id) {
                    c.auth = auth.clone();
                }
                if self.auth != auth {
                    info!(client_group = %self.id, client = %client_id, "auth changed; queries are transformed again");
                    self.auth = auth;
                    self.auth_conn = Some(client_id);
                    // Custom queries are transformed with the new token, and legacy queries'
                    // permission rules are bound to its claims on the next sync.
                    self.custom.clear();
                    if self.conns.values().any(|c| c.initialized) {
                        self.sync_and_poke().await;
                    }
                }
            }
            GroupCmd::Disconnect { client_id, conn_id } => {
                if self
                    .conns
                    .get(&client_id)
                    .is_some_and(|c| c.conn_id == conn_id)
                {
                    self.conns.remove(&client_id);
                }
            }
            GroupCmd::Message {
                client_id,
                conn_id,
                msg,
            } => {
                let Some(conn) = self.conns.get(&client_id) else {
                    return;
                };
                if conn.conn_id != conn_id {
                    return;
                }
                let initialized = conn.initialized;
                let r = match *msg {
                    Upstream::InitConnection(body) => {
                        if initialized {
                            Err(OpError::Client(ErrorBody::new(
                                ErrorKind::InvalidMessage,
                                "Duplicate initConnection message",
                            )))
                        } else {
                            self.init_connection(&client_id, body).await
                        }
                    }
                    // Messages before initConnection have no handler yet (as in zero-cache).
                    _ if !initialized => Ok(()),
                    Upstream::ChangeDesiredQueries(body) => {
                        self.change_desired(&client_id, &body.desired_queries_patch)
                            .await
                    }
                    Upstream::DeleteClients(body) => self.delete_clients(&client_id, &body).await,
                    // Pushes are forwarded by the connection itself (`http::Pusher`).
                    Upstream::Push(_) => Ok(()),
                    Upstream::Pull(_) => {
                        warn!(client_group = %self.id, "pull is not supported");
                        Ok(())
                    }
                    Upstream::Inspect(body) => {
                        let reply = self.inspect(&client_id, body).await;
                        self.settle().await;
                        if let Some(c) = self.conns.get(&client_id) {
                            c.send(Downstream::Inspect(reply));
                        }
                        Ok(())
                    }
                    Upstream::Ping
                    | Upstream::UpdateAuth(_)
                    | Upstream::AckMutationResponses(_)
                    | Upstream::CloseConnection => Ok(()),
                };
                if let Err(e) = r {
                    self.fail(&client_id, e);
                }
            }
        }
    }

    fn fail(&mut self, client_id: &str, e: OpError) {
        let body = match e {
            OpError::Client(b) => b,
            other => {
                warn!(client_group = %self.id, error = %other, "view-syncer operation failed");
                ErrorBody::new(ErrorKind::Internal, other.to_string())
            }
        };
        if let Some(c) = self.conns.remove(client_id) {
            c.close(Some(body));
        }
    }

    async fn init_connection(
        &mut self,
        client_id: &str,
        body: InitConnectionBody,
    ) -> Result<(), OpError> {
        let base = self.conns[client_id].base.clone();
        if let Some(b) = &base {
            if !self.cvr.stored {
                return Err(OpError::Client(ErrorBody::new(
                    ErrorKind::ClientNotFound,
                    "Client not found",
                )));
            }
            if b > &self.cvr.version {
                return Err(OpError::Client(ErrorBody::new(
                    ErrorKind::InvalidConnectionRequestBaseCookie,
                    format!(
                        "CVR is at version {} but the client has {b}",
                        self.cvr.version
                    ),
                )));
            }
        }
        match (&self.cvr.client_schema, &body.client_schema) {
            (None, None) => {
                return Err(OpError::Client(ErrorBody::new(
                    ErrorKind::InvalidConnectionRequest,
                    "The initConnection message for a new client group must include client schema.",
                )));
            }
            (Some(stored), Some(given)) if stored != given => {
                return Err(OpError::Client(ErrorBody::new(
                    ErrorKind::InvalidConnectionRequest,
                    "Provided schema does not match previous schema.",
                )));
            }
            _ => {}
        }
        let schema = body
            .client_schema
            .clone()
            .or_else(|| self.cvr.client_schema.clone())
            .expect("checked above");
        let mut info = self.source.begin(None);
        if matches!(info, Err(SourceError::NotReady)) {
            // Clients may connect while the replica is still being synced: wait for it.
            let mut wm = self.shared.watermarks.clone();
            let _ = wm.wait_for(|w| !w.is_empty()).await;
            info = self.source.begin(None);
        }
        let checked = match info {
            Ok(_) => check_client_schema(&schema, self.source.tables()),
            Err(e) => Err(ErrorBody::new(ErrorKind::Internal, e.to_string())),
        };
        let keys = checked.map_err(OpError::Client)?;
        // Only keys that differ from the replica's (in their columns, not their order)
        // select another engine.
        let differing: BTreeMap<String, Vec<String>> = keys
            .iter()
            .filter(|(t, k)| {
                self.source
                    .tables()
                    .get(*t)
                    .is_some_and(|rt| !crate::sync::ivm::same_key_columns(&rt.key, k))
            })
            .map(|(t, k)| (t.clone(), k.clone()))
            .collect();
        self.source.end();
        if *self.client_keys != differing {
            self.client_keys = Arc::new(differing);
        }
        self.source.set_client_keys(keys);
        if self.cvr.client_schema.is_none() {
            self.cvr.client_schema = Some(schema);
        }
        if let Some(c) = self.conns.get_mut(client_id) {
            c.initialized = true;
        }
        if body.user_query_url.is_some() {
            self.query_url = body.user_query_url.clone();
        }
        if let Some(h) = &body.user_query_headers {
            self.query_headers = h.clone();
        }
        // Custom queries are transformed again for every new connection (auth may differ).
        self.custom.clear();
        let mut changed = self.cvr.add_client(client_id);
        let new_version = self.cvr.version.next_config();
        changed |= self.apply_patch(client_id, &body.desired_queries_patch, &new_version);
        let mut deleted = Vec::new();
        if let Some(active) = &body.active_clients {
            let gone: Vec<String> = self
                .cvr
                .clients
                .iter()
                .filter(|c| *c != client_id && !active.contains(c))
                .cloned()
                .collect();
            for c in gone {
                changed |= self.remove_client(&c, &new_version);
            }
        }
        if let Some(d) = &body.deleted {
            for c in d.client_ids.iter().flatten() {
                if c != client_id && self.remove_client(c, &new_version) {
                    changed = true;
                    deleted.push(c.clone());
                }
            }
        }
        if changed || !self.cvr.stored {
            self.cvr.version = new_version;
            self.flush();
        }
        // Messages go after the pokes handed to the CVR writer.
        self.settle().await;
        if !deleted.is_empty()
            && let Some(c) = self.conns.get(client_id)
        {
            c.send(Downstream::DeleteClients(DeletedClients {
                client_ids: Some(deleted),
                client_group_ids: None,
            }));
        }
        self.poke_all().await?;
        if !self.validate_connection(client_id).await {
            return Ok(());
        }
        self.prepare_custom().await;
        self.sync().await
    }

    /// Asks the query endpoint whether a new connection's opaque token is valid (an empty
    /// transform, as zero-cache does); a 401/403 closes the connection with that
    /// `TransformFailed`, which the client treats as "needs auth". False when it was closed.
    async fn validate_connection(&mut self, client_id: &str) -> bool {
        let Some(endpoint) = self.shared.query_endpoint.clone() else {
            return true;
        };
        if !matches!(
            self.conns.get(client_id).and_then(|c| c.auth.as_ref()),
            Some(Auth::Opaque { .. })
        ) {
            return true;
        }
        let ctx = self.query_context(Some(client_id));
        // Boxed: an API call's state is large, and every group's task would carry its size.
        match Box::pin(endpoint.transform(&ctx, &[])).await {
            Err(f) if f.is_auth_error() => {
                warn!(client_group = %self.id, client = %client_id, "the API server refused the token");
                if let Some(c) = self.conns.remove(client_id) {
                    let _ = c.out.send(Outbound::Close(Some(Downstream::ErrorJson(
                        f.transform_body(&[]),
                    ))));
                }
                false
            }
            _ => true,
        }
    }

    async fn change_desired(
        &mut self,
        client_id: &str,
        ops: &[UpQueriesPatchOp],
    ) -> Result<(), OpError> {
        let new_version = self.cvr.version.next_config();
        if self.apply_patch(client_id, ops, &new_version) {
            self.cvr.version = new_version;
            self.flush();
            // New queries hydrate in the engine while this poke waits for its CVR write.
            self.presubscribe();
            self.poke_all().await?;
        }
        self.prepare_custom().await;
        self.sync().await
    }

    /// Subscribes the wanted queries that have an AST and no subscription yet, without waiting
    /// for their rows: [`Self::sync`] finds them subscribed and waits for them in order (and
    /// reports whatever goes wrong here, such as a failed permissions read, when it meets it).
    fn presubscribe(&mut self) {
        if self.shared.watermarks.borrow().is_empty() {
            return;
        }
        self.source.end();
        if self.load_permissions().is_err() {
            return;
        }
        for h in self.wanted() {
            if self.subscribed.contains_key(&h) {
                continue;
            }
            let Some(ast) = self.cvr.queries.get(&h).and_then(|q| self.transform(&h, q)) else {
                continue;
            };
            let th = zero_queries::hash::h64_base36(&ast.to_json_string());
            self.subscribe(h, ast, th);
        }
    }

    /// Asks the engine for a query's rows; they arrive in order with the group's other engine
    /// messages, and the query counts as hydrating until they do.
    fn subscribe(&mut self, h: String, ast: Ast, th: String) {
        self.shared.engine.send(Cmd::Subscribe {
            group: self.id.clone(),
            hash: h.clone(),
            ast: Box::new(ast),
            keys: self.client_keys.clone(),
        });
        self.subscribed.insert(h.clone(), th);
        self.hydrating.insert(h.clone(), Instant::now());
        self.awaiting.insert(h);
    }

    /// Transforms wanted custom queries that have no AST yet through the API server. Per-query
    /// errors go to the clients that want those queries as `transformError`; a failed request
    /// closes those clients' connections with `TransformFailed`.
    async fn prepare_custom(&mut self) {
        let wanted = self.wanted();
        let pending: Vec<(String, String, Json)> = wanted
            .iter()
            .filter(|h| !self.custom.contains_key(*h))
            .filter_map(|h| {
                let q = self.cvr.queries.get(h)?;
                if q.ast.is_some() {
                    return None;
                }
                let name = q.name.clone()?;
                Some((
                    h.clone(),
                    name,
                    Json::Array(q.args.clone().unwrap_or_default()),
                ))
            })
            .collect();
        if pending.is_empty() {
            return;
        }
        let Some(endpoint) = self.shared.query_endpoint.clone() else {
            warn!(client_group = %self.id, queries = pending.len(), "custom queries need ZERO_QUERY_URL; they will not be synced");
            return;
        };
        let desiring = |this: &Self, ids: &[String]| -> Vec<String> {
            this.cvr
                .desires
                .iter()
                .filter(|((_, h), d)| !d.deleted && ids.contains(h))
                .map(|((c, _), _)| c.clone())
                .collect()
        };
        let ids: Vec<String> = pending.iter().map(|(h, _, _)| h.clone()).collect();
        let ctx = self.query_context(None);
        // Boxed (see `validate_connection`).
        let result = Box::pin(endpoint.transform(&ctx, &pending)).await;
        match result {
            Ok(results) => {
                let mut errors: Vec<Json> = Vec::new();
                for (id, r) in results {
                    match r {
                        super::custom::QueryResult::Ast(a) => {
                            self.custom.insert(id, Ok(a));
                        }
                        super::custom::QueryResult::Error(e) => {
                            self.custom.insert(id, Err(e.clone()));
                            errors.push(e);
                        }
                    }
                }
                if !errors.is_empty() {
                    self.settle().await;
                }
                for e in &errors {
                    let id = e["id"].as_str().unwrap_or_default().to_string();
                    for c in desiring(self, std::slice::from_ref(&id)) {
                        if let Some(conn) = self.conns.get(&c) {
                            conn.send(Downstream::TransformError(Json::Array(vec![e.clone()])));
                        }
                    }
                }
            }
            Err(f) => {
                warn!(client_group = %self.id, error = %f, "transforming custom queries failed");
                for c in desiring(self, &ids) {
                    if let Some(conn) = self.conns.remove(&c) {
                        let _ = conn.out.send(Outbound::Close(Some(Downstream::ErrorJson(
                            f.transform_body(&ids),
                        ))));
                    }
                }
            }
        }
    }

    /// The context of custom-query calls: the latest `userQueryURL` and headers, with the
    /// request and token of `client` (default: the connection that set the group's token).
    fn query_context(&self, client: Option<&str>) -> CallContext {
        let conn = client
            .or(self.auth_conn.as_deref())
            .and_then(|c| self.conns.get(c))
            .or_else(|| self.conns.values().next());
        let auth = match client {
            Some(_) => conn.and_then(|c| c.auth.as_ref()),
            None => self.auth.as_ref(),
        };
        CallContext {
            url: self.query_url.clone(),
            client_headers: self.query_headers.clone(),
            request: conn.map(|c| c.request.clone()).unwrap_or_default(),
            auth: auth.map(|a| a.raw().to_string()),
        }
    }

    /// Pins the group to the first user and token type it sees (protocol §10): another user,
    /// another token type, or no token in a group that had one is `Unauthorized`.
    fn pin(&mut self, user: Option<&str>, auth: Option<&Auth>) -> Result<(), ErrorBody> {
        let kind = token_type(auth);
        let Some((pinned_user, pinned_kind)) = &self.pinned else {
            self.pinned = Some((user.map(str::to_string), kind));
            return Ok(());
        };
        if pinned_user.as_deref() != user {
            return Err(ErrorBody::new(
                ErrorKind::Unauthorized,
                "Client groups are pinned to a single userID. Connection userID does not match existing client group userID.",
            ));
        }
        match (*pinned_kind, kind) {
            (a, b) if a == b => Ok(()),
            (TokenType::None, _) => {
                self.pinned = Some((pinned_user.clone(), kind));
                Ok(())
            }
            (_, TokenType::None) => Err(ErrorBody::new(
                ErrorKind::Unauthorized,
                "No token provided. An unauthenticated client cannot connect to an authenticated client group.",
            )),
            _ => Err(ErrorBody::new(
                ErrorKind::Unauthorized,
                "Token type cannot change. Client groups are pinned to a single token type.",
            )),
        }
    }

    /// `ZERO_AUTH_REVALIDATE_INTERVAL_SECONDS`: closes connections whose JWT has expired, and
    /// asks the query endpoint (an empty transform) whether opaque tokens are still valid.
    async fn revalidate(&mut self) {
        let now_s = crate::replica::now_ms() as f64 / 1000.0;
        let mut failed: Vec<(String, Downstream)> = Vec::new();
        let mut opaque: Vec<String> = Vec::new();
        for (id, c) in &self.conns {
            match &c.auth {
                Some(a @ Auth::Jwt { .. }) if a.expires_at().is_some_and(|exp| exp <= now_s) => {
                    failed.push((
                        id.clone(),
                        Downstream::Error(ErrorBody::new(
                            ErrorKind::AuthInvalidated,
                            "Failed to decode auth token: \"exp\" claim timestamp check failed",
                        )),
                    ));
                }
                Some(Auth::Jwt { .. }) => {}
                Some(Auth::Opaque { .. }) => opaque.push(id.clone()),
                None => {}
            }
        }
        if let Some(endpoint) = self.shared.query_endpoint.clone() {
            for id in opaque {
                let ctx = self.query_context(Some(&id));
                if let Err(f) = Box::pin(endpoint.transform(&ctx, &[])).await
                    && f.is_auth_error()
                {
                    failed.push((id, Downstream::ErrorJson(f.transform_body(&[]))));
                }
            }
        }
        for (id, e) in failed {
            if let Some(c) = self.conns.remove(&id) {
                warn!(client_group = %self.id, client = %id, "auth no longer valid; closing the connection");
                let _ = c.out.send(Outbound::Close(Some(e)));
            }
        }
    }

    /// Answers an inspector request; the result is the reply's body.
    async fn inspect(&mut self, client_id: &str, body: InspectBody) -> Json {
        let shared = self.shared.clone();
        let id = body.id;
        if !matches!(body.op, InspectOp::Authenticate { .. })
            && !shared.inspector.allowed(&self.id, shared.development)
        {
            info!(client_group = %self.id, client = %client_id, "inspector request before authentication: sending the challenge");
            return serde_json::json!({"id": id, "op": "authenticated", "value": false});
        }
        let r: Result<(&str, Json), String> = match body.op {
            InspectOp::Authenticate { value } => {
                let ok = shared.inspector.authenticate(
                    &self.id,
                    &value,
                    shared.admin_password.as_deref(),
                    shared.development,
                );
                if !ok {
                    warn!(client_group = %self.id, client = %client_id, "inspector authentication failed");
                }
                Ok(("authenticated", Json::Bool(ok)))
            }
            InspectOp::Version {} => Ok(("version", Json::String(shared.server_version.clone()))),
            InspectOp::Metrics {} => Ok(("metrics", self.group_metrics.to_json())),
            InspectOp::Queries { client_id: only } => {
                let protocol = self
                    .conns
                    .get(client_id)
                    .map_or(PROTOCOL_VERSION, |c| c.protocol_version);
                let server_asts =
                    |h: &str| self.custom.get(h).and_then(|r| r.as_ref().ok().cloned());
                let rows = inspect::query_rows(
                    &self.cvr,
                    only.as_deref(),
                    self.ttl_now(),
                    &self.query_metrics,
                    &server_asts,
                    protocol,
                );
                Ok(("queries", Json::Array(rows)))
            }
            InspectOp::AnalyzeQuery {
                ast,
                value,
                name,
                args,
                options,
            } => self
                .analyze(
                    client_id,
                    ast.or(value),
                    name,
                    args,
                    options.unwrap_or_default(),
                )
                .await
                .map(|v| ("analyze-query", v)),
        };
        match r {
            Ok((op, value)) => serde_json::json!({"id": id, "op": op, "value": value}),
            Err(e) => {
                warn!(client_group = %self.id, client = %client_id, error = %e, "inspector request failed");
                serde_json::json!({"id": id, "op": "error", "value": e})
            }
        }
    }

    /// `analyze-query`: the query as this group would run it (legacy queries with the read
    /// permissions and the group's token, custom ones as the API server transforms them),
    /// hydrated once by the view engine.
    async fn analyze(
        &mut self,
        client_id: &str,
        ast: Option<Json>,
        name: Option<String>,
        args: Option<Vec<Json>>,
        options: AnalyzeOptions,
    ) -> Result<Json, String> {
        let started_ms = crate::replica::now_ms() as f64;
        let mut warnings = Vec::new();
        let mut after_permissions = None;
        let ast: Ast = match (name, args) {
            (Some(name), Some(args)) => {
                let endpoint = self.shared.query_endpoint.clone().ok_or(
                    "Custom query transformation requested but ZERO_QUERY_URL is not configured",
                )?;
                let args = Json::Array(args);
                let hash = zero_queries::hash::hash_of_name_and_args(&name, &args);
                let ctx = self.query_context(Some(client_id));
                // Boxed (see `validate_connection`).
                let results = Box::pin(endpoint.transform(&ctx, &[(hash, name.clone(), args)]))
                    .await
                    .map_err(|f| f.to_string())?;
                match results.into_iter().next() {
                    Some((_, QueryResult::Ast(a))) => serde_json::from_value(a)
                        .map_err(|e| format!("the API server returned an invalid AST: {e}"))?,
                    Some((_, QueryResult::Error(e))) => {
                        return Err(format!(
                            "Error transforming custom query {name} ({}): {} {}",
                            e["error"].as_str().unwrap_or("app"),
                            e["message"]
                                .as_str()
                                .unwrap_or("Unknown application error from custom query"),
                            e.get("details").map_or("undefined".into(), Json::to_string),
                        ));
                    }
                    None => return Err("No transformation result returned".into()),
                }
            }
            _ => {
                let ast = ast.ok_or(
                    "AST is required for analyze-query operation. Either provide an AST directly or ensure custom query transformation is configured.",
                )?;
                let ast: Ast =
                    serde_json::from_value(ast).map_err(|e| format!("invalid query AST: {e}"))?;
                let loaded = self.load_permissions();
                self.source.end();
                loaded.map_err(|e| e.to_string())?;
                if self.permissions_text.is_some() {
                    if self.auth.as_ref().and_then(Auth::claims).is_none() {
                        warnings.push("No auth data provided. Permission rules will compare to `NULL` wherever an auth data field is referenced.".to_string());
                    }
                    let t = self.with_permissions(&ast);
                    after_permissions = Some(zero_queries::print::to_zql(&t));
                    t
                } else {
                    warnings.push(
                        "No permissions are deployed: the query was analyzed without read permissions."
                            .to_string(),
                    );
                    ast
                }
            }
        };
        if options.vended_rows == Some(true) {
            warnings.push("Rows read are not reported: this server hydrates queries from in-memory indexes, not SQLite scans.".to_string());
        }
        if options.join_plans == Some(true) {
            warnings.push(
                "Join plans are not reported: this server has no cost-based join planner."
                    .to_string(),
            );
        }
        let (tx, rx) = tokio::sync::oneshot::channel();
        if !self.shared.engine.send(Cmd::Analyze {
            ast: Box::new(ast),
            keys: self.client_keys.clone(),
            reply: tx,
        }) {
            return Err("the view engine is not running".into());
        }
        let analysis = rx
            .await
            .map_err(|_| "the view engine stopped".to_string())??;
        Ok(inspect::analysis_json(
            &analysis,
            started_ms,
            options.synced_rows != Some(false),
            after_permissions,
            warnings,
        ))
    }

    async fn delete_clients(
        &mut self,
        client_id: &str,
        body: &DeletedClients,
    ) -> Result<(), OpError> {
        let new_version = self.cvr.version.next_config();
        let mut deleted = Vec::new();
        for c in body.client_ids.iter().flatten() {
            if c == client_id {
                continue;
            }
            if self.remove_client(c, &new_version) {
                deleted.push(c.clone());
            }
            if let Some(conn) = self.conns.remove(c) {
                conn.close(None);
            }
        }
        if !deleted.is_empty() {
            self.cvr.version = new_version;
            self.flush();
            self.poke_all().await?;
        }
        self.settle().await;
        if let Some(c) = self.conns.get(client_id) {
            c.send(Downstream::DeleteClients(DeletedClients {
                client_ids: (!deleted.is_empty()).then_some(deleted),
                client_group_ids: None,
            }));
        }
        self.prepare_custom().await;
        self.sync().await
    }

    /// Removes a client and inactivates its desires; true when it was known.
    fn remove_client(&mut self, client: &str, v: &CvrVersion) -> bool {
        let had = self.cvr.remove_client(client);
        let desires: Vec<String> = self
            .cvr
            .desires
            .iter()
            .filter(|((c, _), d)| c == client && !d.deleted)
            .map(|((_, h), _)| h.clone())
            .collect();
        for h in &desires {
            self.set_desire_deleted(client, h, v);
        }
        had || !desires.is_empty()
    }

    fn set_desire_deleted(&mut self, client: &str, hash: &str, v: &CvrVersion) -> bool {
        let key = (client.to_string(), hash.to_string());
        let now = self.ttl_now();
        match self.cvr.desires.get(&key) {
            Some(d) if !d.deleted => {
                let mut d = d.clone();
                d.deleted = true;
                d.patch_version = v.clone();
                d.inactivated_at = Some(now);
                self.cvr.put_desire(client, hash, d);
                true
            }
            _ => false,
        }
    }

    /// Applies a desired-queries patch at version `v`; true when anything changed.
    fn apply_patch(&mut self, client: &str, ops: &[UpQueriesPatchOp], v: &CvrVersion) -> bool {
        let mut changed = false;
        for op in ops {
            match op {
                UpQueriesPatchOp::Put {
                    hash,
                    ttl,
                    ast,
                    name,
                    args,
                } => {
                    if hash == "lmids" || hash == "mutationResults" {
                        warn!(client_group = %self.id, %hash, "reserved query id ignored");
                        continue;
                    }
                    let ttl = match ttl {
                        Some(t) if *t >= 0.0 => t.min(MAX_TTL_MS),
                        Some(_) => MAX_TTL_MS,
                        None => DEFAULT_TTL_MS,
                    };
                    if !self.cvr.queries.contains_key(hash) {
                        self.cvr.put_query(
                            hash,
                            QueryRecord {
                                ast: ast.clone(),
                                name: name.clone(),
                                args: args.clone(),
                                got: false,
                                patch_version: None,
                                transformation_hash: None,
                            },
                        );
                    }
                    let key = (client.to_string(), hash.clone());
                    let needs = match self.cvr.desires.get(&key) {
                        None => true,
                        Some(d) => d.deleted || ttl > d.ttl_ms,
                    };
                    if needs {
                        self.cvr.put_desire(
                            client,
                            hash,
                            DesireRecord {
                                patch_version: v.clone(),
                                deleted: false,
                                ttl_ms: ttl,
                                inactivated_at: None,
                            },
                        );
                        changed = true;
                    }
                }
                UpQueriesPatchOp::Del { hash } => {
                    changed |= self.set_desire_deleted(client, hash, v);
                }
                UpQueriesPatchOp::Clear {} => {
                    let hashes: Vec<String> = self
                        .cvr
                        .desires
                        .keys()
                        .filter(|(c, _)| c == client)
                        .map(|(_, h)| h.clone())
                        .collect();
                    for h in hashes {
                        changed |= self.set_desire_deleted(client, &h, v);
                    }
                }
            }
        }
        changed
    }

    /// Queries that some client wants, or whose TTL has not yet run out.
    fn wanted(&self) -> BTreeSet<String> {
        let now = self.ttl_now();
        self.cvr
            .desires
            .iter()
            .filter(|(_, d)| !d.deleted || d.inactivated_at.is_some_and(|at| now < at + d.ttl_ms))
            .map(|((_, h), _)| h.clone())
            .collect()
    }

    /// Runs every second in every group: allocates nothing (10,000 groups tick 10,000 times a
    /// second).
    fn ttl_expired(&self) -> bool {
        let now = self.ttl_now();
        let wanted = |hash: &str| {
            self.cvr.desires.iter().any(|((_, h), d)| {
                h == hash && (!d.deleted || d.inactivated_at.is_some_and(|at| now < at + d.ttl_ms))
            })
        };
        self.cvr.queries.iter().any(|(h, q)| q.got && !wanted(h))
    }

    async fn sync_and_poke(&mut self) {
        self.prepare_custom().await;
        if let Err(e) = self.sync().await {
            self.fail_all(e);
        }
    }

    fn load_permissions(&mut self) -> Result<(), SourceError> {
        let table = format!("{}.permissions", self.shared.app_id);
        let rows = self.source.query_json(
            &format!(
                "SELECT permissions FROM {} LIMIT 1",
                zero_queries::sql::quote_ident(&table)
            ),
            &[],
        );
        let text = match rows {
            Ok(r) => r
                .into_iter()
                .next()
                .and_then(|mut r| r.pop())
                .and_then(|v| v.as_str().map(str::to_string)),
            Err(_) => None,
        };
        if text != self.permissions_text {
            self.permissions = match text.as_deref().map(Permissions::from_json_str) {
                Some(Ok(p)) => p,
                Some(Err(e)) => {
                    warn!(error = %e, "permissions could not be parsed; legacy queries get no rows");
                    Permissions::default()
                }
                None => Permissions::default(),
            };
            self.permissions_text = text;
        }
        Ok(())
    }

    /// A legacy query with the read permissions, bound to the group's token claims.
    fn with_permissions(&self, ast: &Ast) -> Ast {
        let auth_data = self.auth.as_ref().and_then(Auth::claims);
        permissions::transform_query(ast, &self.permissions, auth_data)
    }

    /// The server-side AST of a query, or `None` when it cannot be hydrated (yet).
    fn transform(&self, hash: &str, q: &QueryRecord) -> Option<Ast> {
        let Some(ast_json) = q.ast.as_ref() else {
            // Custom queries: the API server's AST, without permission rules (it is trusted).
            let ast = self.custom.get(hash)?.as_ref().ok()?;
            return match serde_json::from_value::<Ast>(ast.clone()) {
                Ok(a) => Some(a),
                Err(e) => {
                    warn!(client_group = %self.id, query = %hash, error = %e, "API server returned an invalid AST");
                    None
                }
            };
        };
        match serde_json::from_value::<Ast>(ast_json.clone()) {
            Ok(ast) => {
                let unreadable = self.permissions.unreadable_tables(&ast);
                if !unreadable.is_empty() {
                    debug!(query = %hash, tables = ?unreadable, "no select permission; no rows will be returned");
                }
                Some(self.with_permissions(&ast))
            }
            Err(e) => {
                warn!(client_group = %self.id, query = %hash, error = %e, "invalid query AST");
                None
            }
        }
    }

    /// Brings the group's subscriptions in the engine in line with its desired queries:
    /// unwanted queries are dropped from the CVR and the engine, new (or newly transformed)
    /// ones are subscribed and their rows awaited; then every client is poked.
    async fn sync(&mut self) -> Result<(), OpError> {
        self.lmid_read = None;
        let r = self.sync_inner().await;
        self.source.end();
        self.fresh.clear();
        self.lmid_read = None;
        r
    }

    async fn sync_inner(&mut self) -> Result<(), OpError> {
        if self.shared.watermarks.borrow().is_empty() {
            // The replica file can be complete (and the engine loaded from it) before the
            // replicator publishes its first watermark; a group deferring to the next engine
            // message could then wait for the next upstream commit. Wait, as a connect does.
            let mut wm = self.shared.watermarks.clone();
            if wm.wait_for(|w| !w.is_empty()).await.is_err() {
                self.resync = true;
                return Ok(());
            }
        }
        // Reads outside a snapshot see the latest commit; permissions need nothing more.
        self.source.end();
        self.load_permissions()?;
        let wanted = self.wanted();

        // Queries to add (new or with a new transformation) and to remove.
        let mut to_add: Vec<(String, Ast, String)> = Vec::new();
        let mut failed: BTreeSet<String> = BTreeSet::new();
        for h in &wanted {
            let Some(q) = self.cvr.queries.get(h) else {
                continue;
            };
            let Some(ast) = self.transform(h, q) else {
                failed.insert(h.clone());
                continue;
            };
            let th = zero_queries::hash::h64_base36(&ast.to_json_string());
            if self.subscribed.get(h) != Some(&th) {
                to_add.push((h.clone(), ast, th));
            }
        }
        let to_remove: Vec<String> = self
            .cvr
            .queries
            .iter()
            .filter(|(h, q)| {
                (!wanted.contains(*h) || failed.contains(*h))
                    && (q.got || self.subscribed.contains_key(*h))
            })
            .map(|(h, _)| h.clone())
            .collect();
        if !to_remove.is_empty() {
            let new_version = self.cvr.version.next_config();
            let mut patched = false;
            for h in &to_remove {
                self.unsubscribe(h);
                let dels = self.cvr.drop_query_rows(h, &new_version);
                patched |= !dels.is_empty();
                if let Some(q) = self.cvr.queries.get_mut(h)
                    && q.got
                {
                    q.got = false;
                    q.patch_version = Some(new_version.clone());
                    q.transformation_hash = None;
                    patched = true;
                }
                // Forget queries nobody desires any more.
                let desired = self.cvr.desires.keys().any(|(_, dh)| dh == h);
                let announced = self
                    .cvr
                    .queries
                    .get(h)
                    .is_some_and(|q| q.patch_version.is_some());
                if !desired && !announced {
                    self.cvr.queries.remove(h);
                }
                self.cvr.touch_query(h);
            }
            if patched {
                self.cvr.version = new_version;
            }
            self.flush();
        }
        for (h, ast, th) in to_add {
            self.subscribe(h, ast, th);
        }
        // Rows of new subscriptions arrive in order with the group's other engine messages.
        let started = Instant::now();
        let hydrating = self.awaiting.len();
        while !self.awaiting.is_empty() {
            let Some(msg) = self.engine_rx.recv().await else {
                break;
            };
            self.apply_engine_msg(msg)?;
        }
        let engine_ms = started.elapsed().as_secs_f64() * 1000.0;
        self.flush();
        let flushed_ms = started.elapsed().as_secs_f64() * 1000.0;
        let r = self.poke_all().await;
        if hydrating > 0 {
            debug!(
                client_group = %self.id,
                queries = hydrating,
                engine_ms,
                flushed_ms,
                poked_ms = started.elapsed().as_secs_f64() * 1000.0,
                "hydrated"
            );
        }
        r
    }

    fn unsubscribe(&mut self, hash: &str) {
        if self.subscribed.remove(hash).is_some() {
            self.shared.engine.send(Cmd::Unsubscribe {
                group: self.id.clone(),
                hash: hash.to_string(),
            });
        }
        self.awaiting.remove(hash);
        self.hydrating.remove(hash);
        self.query_metrics.remove(hash);
    }

    /// Applies every engine message that is already queued after `first`, then flushes the CVR
    /// and pokes: each message leaves the group at one replica version, so the poke does too.
    async fn on_engine(&mut self, first: EngineMsg) {
        if self.conns.is_empty() {
            // Nobody to poke (the group outlives its last connection by KEEPALIVE): let the
            // groups of this worker that have clients apply the version and queue their CVR
            // writes first, so their pokes do not wait behind this one's bookkeeping.
            tokio::task::yield_now().await;
        }
        self.lmid_read = None;
        let mut r = self.apply_engine_msg(first);
        while r.is_ok()
            && let Ok(m) = self.engine_rx.try_recv()
        {
            r = self.apply_engine_msg(m);
        }
        if r.is_ok() && self.resync {
            // An earlier sync found no replica; now that the engine has one, subscribe.
            self.resync = false;
            self.prepare_custom().await;
            r = self.sync_inner().await;
        }
        // Engine messages alone never create a CVR (only a connection does). The write is
        // queued, not awaited: the poke's parts go out meanwhile and only its end waits.
        if self.cvr.stored {
            self.flush();
        }
        let r = match r {
            Ok(()) if self.conns.values().any(|c| c.initialized) => self.poke_all().await,
            other => other,
        };
        self.source.end();
        self.fresh.clear();
        self.lmid_read = None;
        if let Err(e) = r {
            self.fail_all(e);
        }
    }

    fn fail_all(&mut self, e: OpError) {
        warn!(client_group = %self.id, error = %e, "sync failed");
        let body = match e {
            OpError::Client(b) => b,
            other => ErrorBody::new(ErrorKind::Internal, other.to_string()),
        };
        for (_, c) in self.conns.drain() {
            c.close(Some(body.clone()));
        }
    }

    /// Moves the CVR to the message's replica version: full results replace a query's rows,
    /// patches change them, and LMID / mutation-result changes up to that version count too.
    fn apply_engine_msg(&mut self, msg: EngineMsg) -> Result<(), OpError> {
        if let Some(rv) = &self.cvr.replica_version
            && rv > &msg.replica_version
        {
            return Err(OpError::Client(ErrorBody::new(
                ErrorKind::ClientNotFound,
                "The replica is older than the client view record",
            )));
        }
        let new_version = if msg.state_version > self.cvr.version.state {
            CvrVersion {
                state: msg.state_version.clone(),
                config: 0,
            }
        } else {
            self.cvr.version.next_config()
        };
        let mut patched = false;
        for (h, u) in msg.updates {
            if !self.subscribed.contains_key(&h) {
                // Unsubscribed meanwhile.
                continue;
            }
            match u {
                QueryUpdate::Full(rows) => {
                    self.awaiting.remove(&h);
                    let hydrated = self
                        .hydrating
                        .remove(&h)
                        .map(|t| t.elapsed().as_secs_f64() * 1000.0);
                    if let Some(ms) = hydrated {
                        self.query_metrics.entry(h.clone()).or_default().hydrate_ms = Some(ms);
                        self.group_metrics.hydrate.add(ms);
                    }
                    let ms = hydrated.unwrap_or(0.0);
                    if ms >= self.shared.slow_hydrate_ms {
                        warn!(client_group = %self.id, query = %h, rows = rows.len(), hydrate_ms = ms, "slow query hydration");
                    } else if self.shared.hydration_stats {
                        info!(client_group = %self.id, query = %h, rows = rows.len(), hydrate_ms = ms, "query hydrated");
                    }
                    patched |= self.apply_rows(&h, &rows, &new_version);
                    let th = self.subscribed.get(&h).cloned();
                    if let Some(q) = self.cvr.queries.get_mut(&h) {
                        if !q.got {
                            q.got = true;
                            q.patch_version = Some(new_version.clone());
                            patched = true;
                        }
                        q.transformation_hash = th;
                    }
                    self.cvr.touch_query(&h);
                }
                QueryUpdate::Patch(rows) => {
                    if self.awaiting.contains(&h) {
                        continue;
                    }
                    let mut puts = Vec::new();
                    let mut dels = Vec::new();
                    for r in rows.iter() {
                        match &r.put {
                            Some((version, value)) => {
                                puts.push((r.id.clone(), version.clone()));
                                self.fresh.insert(r.id.clone(), value.clone());
                            }
                            None => dels.push(r.id.clone()),
                        }
                    }
                    patched |= self.cvr.patch_query_rows(&h, &puts, &dels, &new_version);
                    self.query_metrics
                        .entry(h)
                        .or_default()
                        .update
                        .add(msg.step_ms);
                    self.group_metrics.update.add(msg.step_ms);
                }
                QueryUpdate::Failed(e) => {
                    warn!(client_group = %self.id, query = %h, error = %e, "query could not be hydrated");
                    self.awaiting.remove(&h);
                    self.subscribed.remove(&h);
                }
            }
        }
        if self.lmid_since.is_none() {
            self.lmid_since = Some(msg.state_version.clone());
        }
        if msg.lmids {
            self.lmid_changed = Some(msg.state_version.clone());
        }
        let advanced = self.cvr.processed.as_deref() != Some(msg.state_version.as_str());
        if advanced && !patched && msg.lmids {
            // LMID and mutation-result changes of this group also need a poke.
            let from = CvrVersion {
                state: self.cvr.processed.clone().unwrap_or_else(|| "00".into()),
                config: 0,
            };
            self.cvr.processed = Some(msg.state_version.clone());
            // Reads see the latest commit (at or after the engine's version) and are bounded
            // by the group's version.
            self.source.end();
            let part = self.mutation_changes(Some(&from), &new_version.to_string())?;
            patched = !part.is_empty();
        }
        self.cvr.processed = Some(msg.state_version);
        self.cvr.replica_version = Some(msg.replica_version);
        if patched {
            self.cvr.version = new_version;
        }
        if msg.fetched {
            self.fetching = false;
        }
        if msg.permissions {
            // Transform legacy queries again once this batch is applied.
            self.resync = true;
        }
        Ok(())
    }

    fn apply_rows(&mut self, hash: &str, rows: &[SyncedRow], v: &CvrVersion) -> bool {
        let mut ids = BTreeMap::new();
        for r in rows {
            let id = r.id();
            ids.insert(id.clone(), r.version.clone());
            self.fresh.insert(id, r.value.clone());
        }
        let (puts, dels) = self.cvr.set_query_rows(hash, &ids, v);
        !puts.is_empty() || !dels.is_empty()
    }

    /// LMID and mutation-result changes for this group after `from` (all when `None`).
    fn mutation_changes(
        &mut self,
        from: Option<&CvrVersion>,
        poke_id: &str,
    ) -> Result<PokePartBody, SourceError> {
        let after = from.map(|v| v.state.clone()).unwrap_or_default();
        let bound = self.cvr.processed.clone().unwrap_or_else(|| "~".into());
        let bounds = (from.map(|v| v.state.clone()), bound);
        if let Some((f, u, part)) = &self.lmid_read
            && (f, u) == (&bounds.0, &bounds.1)
        {
            return Ok(PokePartBody {
                poke_id: poke_id.to_string(),
                ..part.clone()
            });
        }
        let mut part = PokePartBody {
            poke_id: poke_id.to_string(),
            ..Default::default()
        };
        let shard = &self.shared.shard_schema;
        let clients = zero_queries::sql::quote_ident(&format!("{shard}.clients"));
        let mutations = zero_queries::sql::quote_ident(&format!("{shard}.mutations"));
        let g = SqlValue::Text(self.id.clone());
        let a = SqlValue::Text(after.clone());
        // Nothing newer than the version the group's rows are at: a poke is one replica state.
        let upto = SqlValue::Text(bounds.1.clone());
        if let Ok(rows) = self.source.query_json(
            &format!(r#"SELECT "clientID", "lastMutationID" FROM {clients} WHERE "clientGroupID" = ?1 AND "_0_version" > ?2 AND "_0_version" <= ?3"#),
            &[g.clone(), a.clone(), upto.clone()],
        ) {
            for r in rows {
                if let (Some(c), Some(n)) = (r[0].as_str(), r[1].as_i64()) {
                    part.last_mutation_id_changes.insert(c.to_string(), n);
                }
            }
        }
        if let Ok(rows) = self.source.query_json(
            &format!(r#"SELECT "clientID", "mutationID", "result" FROM {mutations} WHERE "clientGroupID" = ?1 AND "_0_version" > ?2 AND "_0_version" <= ?3"#),
            &[g, a.clone(), upto.clone()],
        ) {
            for r in rows {
                let result = match &r[2] {
                    Json::String(s) => serde_json::from_str(s).unwrap_or(Json::Null),
                    other => other.clone(),
                };
                part.mutations_patch.push(MutationPatchOp::Put {
                    mutation: serde_json::json!({
                        "id": {"clientID": r[0], "id": r[1]},
                        "result": result,
                    }),
                });
            }
        }
        // `+"table"` keeps SQLite on the stateVersion key: the (table, rowKey) index would scan
        // every mutation the change log still holds, on every poke of every group.
        if from.is_some()
            && let Ok(rows) = self.source.query_json(
                r#"SELECT "rowKey" FROM "_zero.changeLog2" WHERE +"table" = ?1 AND op = 'd' AND "stateVersion" > ?2 AND "stateVersion" <= ?3"#,
                &[SqlValue::Text(format!("{shard}.mutations")), a, upto],
            )
        {
            for r in rows {
                let Some(key) = r[0].as_str().and_then(|k| serde_json::from_str::<Json>(k).ok()) else {
                    continue;
                };
                if key["clientGroupID"].as_str() == Some(self.id.as_str()) {
                    part.mutations_patch.push(MutationPatchOp::Del {
                        id: serde_json::json!({"clientID": key["clientID"], "id": key["mutationID"]}),
                    });
                }
            }
        }
        self.lmid_read = Some((bounds.0, bounds.1, part.clone()));
        Ok(part)
    }

    /// Pokes every initialized client that is behind the CVR (or not yet poked since it
    /// connected) with the changes since its version. Row contents come from the engine
    /// messages just applied; when a client needs rows that are not among them (a reconnect
    /// from an older cookie, a new client of the group), the group first fetches its queries'
    /// rows from the engine, which may move the whole group to a newer replica version.
    async fn poke_all(&mut self) -> Result<(), OpError> {
        let mut fetched = false;
        loop {
            let target = self.cvr.version.clone();
            let ids: Vec<String> = self
                .conns
                .iter()
                .filter(|(_, c)| c.initialized && (!c.poked || c.version.as_ref() != Some(&target)))
                .map(|(id, _)| id.clone())
                .collect();
            if ids.is_empty() {
                return Ok(());
            }
            let oldest = ids
                .iter()
                .map(|id| self.conns[id].version.clone())
                .min()
                .flatten();
            let behind = ids
                .iter()
                .any(|id| self.conns[id].version.as_ref() != Some(&target));
            if behind && !fetched && self.missing_contents(oldest.as_ref()) {
                fetched = true;
                self.fetch().await?;
                continue;
            }
            if behind {
                // LMIDs are read at the latest commit, bounded by the group's version.
                self.source.end();
            }
            let poke_id = target.to_string();
            // Small pokes (one part) go out whole once the CVR is written: one socket write
            // per client instead of two, which is what bounds fan-out to many clients. Larger
            // ones send their parts now, so the client receives them during the write. Frames
            // are rendered here, once per distinct starting version (clients of a group that
            // are at the same version get the same text).
            let mut held: Vec<(mpsc::UnboundedSender<Outbound>, Vec<String>)> = Vec::new();
            let mut direct: Vec<(String, Vec<String>)> = Vec::new();
            let mut rendered: Vec<(Option<CvrVersion>, Vec<String>)> = Vec::new();
            for id in &ids {
                let from = self.conns[id].version.clone();
                let frames = match rendered.iter().find(|(f, _)| *f == from) {
                    Some((_, frames)) => frames.clone(),
                    None => {
                        let parts = if from.as_ref() == Some(&target) {
                            Vec::new()
                        } else {
                            self.catchup(from.as_ref(), &target)?
                        };
                        let mut frames = Vec::with_capacity(parts.len() + 2);
                        frames.push(
                            Downstream::PokeStart(PokeStartBody {
                                poke_id: poke_id.clone(),
                                base_cookie: from.as_ref().map(CvrVersion::to_string),
                            })
                            .to_text(),
                        );
                        frames.extend(
                            parts
                                .into_iter()
                                .map(|p| Downstream::PokePart(Box::new(p)).to_text()),
                        );
                        if ids.len() > 1 {
                            rendered.push((from, frames.clone()));
                        }
                        frames
                    }
                };
                if frames.len() <= 2 {
                    held.push((self.conns[id].out.clone(), frames));
                } else {
                    direct.push((id.clone(), frames));
                }
            }
            if !direct.is_empty() {
                // Frames handed to the CVR writer earlier go first.
                self.settle().await;
                for (id, frames) in direct {
                    let out = &self.conns[&id].out;
                    let _ = out.send(Outbound::Frames(frames));
                    held.push((out.clone(), Vec::new()));
                }
            }
            let end = Downstream::PokeEnd(PokeEndBody {
                poke_id: poke_id.clone(),
                cookie: poke_id.clone(),
                cancel: false,
            })
            .to_text();
            // A client must never hold a cookie the stored CVR does not reach (after a crash
            // it could not resume): the poke ends once the record's write is done. The CVR
            // writer sends the ends itself, so this view-syncer is not woken only to forward
            // them.
            let release: Release = Box::new(move || {
                for (out, mut frames) in held {
                    frames.push(end.clone());
                    let _ = out.send(Outbound::Frames(frames));
                }
            });
            let release = match self.durable.take() {
                Some(written) => match self.shared.cvr.after_written(&self.id, release) {
                    None => {
                        self.handoff = Some(written);
                        None
                    }
                    Some(r) => Some(r),
                },
                None => Some(release),
            };
            if let Some(release) = release {
                self.settle().await;
                release();
            }
            debug!(client_group = %self.id, poke = %poke_id, clients = ids.len(), "poke end queued");
            for id in ids {
                if let Some(conn) = self.conns.get_mut(&id) {
                    conn.version = Some(target.clone());
                    conn.poked = true;
                }
            }
            return Ok(());
        }
    }

    /// Waits until the frames handed to the CVR writer with an earlier poke are sent, so that
    /// frames this view-syncer sends itself come after them.
    async fn settle(&mut self) {
        if let Some(h) = self.handoff.take() {
            let _ = h.await;
        }
    }

    /// Whether a catch-up from `from` needs row contents that were not received with the
    /// latest engine messages.
    fn missing_contents(&self, from: Option<&CvrVersion>) -> bool {
        self.cvr.rows.iter().any(|(id, r)| {
            r.refs.is_some()
                && from.is_none_or(|f| &r.patch_version > f)
                && !self.fresh.contains_key(id)
        })
    }

    /// Asks the engine for every subscribed query's rows and applies the messages up to the
    /// answer.
    async fn fetch(&mut self) -> Result<(), OpError> {
        if self.subscribed.is_empty() {
            return Ok(());
        }
        self.fetching = true;
        self.shared.engine.send(Cmd::Fetch {
            group: self.id.clone(),
        });
        while self.fetching {
            let Some(msg) = self.engine_rx.recv().await else {
                self.fetching = false;
                break;
            };
            self.apply_engine_msg(msg)?;
        }
        self.flush();
        Ok(())
    }

    /// The poke parts that bring a client from `from` to `to`.
    fn catchup(
        &mut self,
        from: Option<&CvrVersion>,
        to: &CvrVersion,
    ) -> Result<Vec<PokePartBody>, OpError> {
        let poke_id = to.to_string();
        let newer = |v: &CvrVersion| from.is_none_or(|f| v > f);
        let mut parts = Vec::new();
        let mut part = PokePartBody {
            poke_id: poke_id.clone(),
            ..Default::default()
        };
        let flush = |part: &mut PokePartBody, parts: &mut Vec<PokePartBody>| {
            if part.len() >= PART_MAX_ENTRIES {
                let full = std::mem::replace(
                    part,
                    PokePartBody {
                        poke_id: part.poke_id.clone(),
                        ..Default::default()
                    },
                );
                parts.push(full);
            }
        };
        for ((client, hash), d) in &self.cvr.desires {
            if !newer(&d.patch_version) || (from.is_none() && d.deleted) {
                continue;
            }
            let op = if d.deleted {
                QueriesPatchOp::Del { hash: hash.clone() }
            } else {
                QueriesPatchOp::Put { hash: hash.clone() }
            };
            part.desired_queries_patches
                .entry(client.clone())
                .or_default()
                .push(op);
        }
        flush(&mut part, &mut parts);
        for (hash, q) in &self.cvr.queries {
            let Some(pv) = &q.patch_version else { continue };
            if !newer(pv) || (from.is_none() && !q.got) {
                continue;
            }
            part.got_queries_patch.push(if q.got {
                QueriesPatchOp::Put { hash: hash.clone() }
            } else {
                QueriesPatchOp::Del { hash: hash.clone() }
            });
        }
        flush(&mut part, &mut parts);
        if self.shared_state_ready() && self.lmids_may_differ(from) {
            let m = self.mutation_changes(from, &poke_id)?;
            part.last_mutation_id_changes = m.last_mutation_id_changes;
            part.mutations_patch = m.mutations_patch;
        }
        let rows: Vec<(RowId, bool)> = self
            .cvr
            .rows
            .iter()
            .filter(|(_, r)| newer(&r.patch_version) && !(from.is_none() && r.refs.is_none()))
            .map(|(id, r)| (id.clone(), r.refs.is_some()))
            .collect();
        for ((table, key), present) in rows {
            let id = (table.clone(), key.clone());
            if present {
                let value = match self.fresh.get(&id) {
                    Some(v) => Some(v.clone()),
                    None => self.source.lookup(&table, &key)?.map(|v| RowJson::new(&v)),
                };
                match value {
                    Some(value) => part.rows_patch.push(RowPatchOp::Put {
                        table_name: table,
                        value,
                    }),
                    None => continue,
                }
            } else {
                let id = serde_json::from_str(&key).unwrap_or(Json::Null);
                part.rows_patch.push(RowPatchOp::Del {
                    table_name: table,
                    id,
                });
            }
            flush(&mut part, &mut parts);
        }
        if !part.is_empty() {
            parts.push(part);
        }
        Ok(parts)
    }

    /// Whether this group's LMIDs or mutation results may have changed after `from`: the
    /// engine flags the versions that touch them ([`EngineMsg::lmids`]), so a client that is
    /// current since the group's first engine message is poked without reading them.
    fn lmids_may_differ(&self, from: Option<&CvrVersion>) -> bool {
        let (Some(from), Some(since)) = (from, &self.lmid_since) else {
            return true;
        };
        from.state < *since || self.lmid_changed.as_ref().is_some_and(|c| *c > from.state)
    }

    fn shared_state_ready(&self) -> bool {
        self.cvr.processed.is_some()
    }
}

/// The client schema's primary keys per table.
fn client_keys(schema: &Json) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    if let Some(tables) = schema["tables"].as_object() {
        for (t, v) in tables {
            if let Some(pk) = v["primaryKey"].as_array() {
                out.insert(
                    t.clone(),
                    pk.iter()
                        .filter_map(|c| c.as_str().map(str::to_string))
                        .collect(),
                );
            }
        }
    }
    out
}
