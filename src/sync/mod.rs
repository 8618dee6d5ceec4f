//! The sync server: HTTP and WebSocket on `ZERO_PORT`, Zero's sync protocol (v30–v51), client
//! view records and pokes.
//!
//! # Layout
//! - [`http`]: the HTTP routes (`/`, `/keepalive`, `/statz`) and the WebSocket connection
//!   loop (handshake, framing, ping/pong, replacement of a client's older connection).
//! - [`connect`]: parsing of the connect URL and the `Sec-WebSocket-Protocol` header.
//! - [`protocol`]: the wire types of every upstream and downstream message.
//! - [`view_syncer`]: one actor per client group: CVR updates, hydration, advancement, pokes.
//! - [`cvr`]: the client view record; [`cvr_store`]: its SQLite or Postgres store, written in
//!   the background.
//! - `ivm`: the process's incremental view engine (`zero-dataflow`), shared by every group:
//!   it tails the replica's change log and sends each group its queries' row patches.
//! - [`source`]: SQL reads of the replica (permissions, LMIDs, mutation results, the client
//!   schema check) and the SQL re-evaluation [`source::ViewSource`].
//! - [`schema_check`]: the client-schema check against the replica.
//! - [`custom`]: custom (named) queries, transformed by the API server at `ZERO_QUERY_URL`.
//! - [`mutate`]: pushes forwarded to the API server at `ZERO_MUTATE_URL`.
//! - [`fetch`]: the API-server HTTP client (URL patterns, forwarded headers, retries).
//! - [`auth`]: tokens (opaque, or verified legacy JWTs) and their rules.
//! - [`crud`]: legacy CRUD mutations run upstream by this server, with write permissions.
//!
//! Client groups are spread over `ZERO_NUM_SYNC_WORKERS` threads (each a single-threaded
//! runtime) by a hash of the group id, so one slow group only delays the groups sharing its
//! worker, and the HTTP server stays responsive on the main runtime.

pub mod auth;
pub mod connect;
pub mod crud;
pub mod custom;
pub mod cvr;
pub mod cvr_gc;
pub mod cvr_store;
pub mod fetch;
pub mod http;
mod inspect;
pub(crate) mod ivm;
pub mod mutate;
pub mod protocol;
pub mod schema_check;
pub mod source;
mod table_rows;
pub mod view_syncer;

use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use tokio::sync::{mpsc, oneshot, watch};
use tracing::{error, info};

use crate::config::Config;
use view_syncer::{GroupCmd, Outbound, ViewSyncer};

/// Why the sync server could not run.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// The port could not be bound or the server failed.
    #[error("sync server I/O: {0}")]
    Io(#[from] std::io::Error),
    /// A setting cannot be used.
    #[error("{0}")]
    Config(String),
    /// The CVR store could not be opened.
    #[error(transparent)]
    Cvr(#[from] cvr::CvrError),
}

/// Settings of the sync server (derived from [`Config`]).
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// The replica file queries read.
    pub replica_file: PathBuf,
    /// The SQLite file holding client view records (when `cvr_db` is not set).
    pub cvr_file: PathBuf,
    /// `ZERO_CVR_DB`: Postgres for client view records instead of `cvr_file`.
    pub cvr_db: Option<String>,
    /// `ZERO_CVR_MAX_CONNS`.
    pub cvr_max_conns: u32,
    /// `ZERO_APP_ID`.
    pub app_id: String,
    /// `{app}_{shard}`: where `clients` and `mutations` live.
    pub shard_schema: String,
    /// Threads running view-syncers.
    pub num_workers: usize,
    /// `ZERO_ADMIN_PASSWORD`.
    pub admin_password: Option<String>,
    /// `NODE_ENV=development`: admin endpoints are open when no password is set.
    pub development: bool,
    /// Largest accepted inbound message.
    pub max_payload_bytes: usize,
    /// `ZERO_QUERY_URL`: API servers that transform custom queries.
    pub query_urls: Vec<String>,
    /// `ZERO_QUERY_API_KEY`.
    pub query_api_key: Option<String>,
    /// `ZERO_MUTATE_URL`: API servers that run custom mutators.
    pub mutate_urls: Vec<String>,
    /// `ZERO_MUTATE_API_KEY`.
    pub mutate_api_key: Option<String>,
    /// Header forwarding, auth and CRUD settings.
    pub writes: WriteAuthOptions,
    /// `ZERO_QUERY_HYDRATION_STATS`: log every hydration with its row count and time.
    pub hydration_stats: bool,
    /// `ZERO_LOG_SLOW_HYDRATE_THRESHOLD` (ms): hydrations at least this slow are logged as warnings.
    pub slow_hydrate_ms: f64,
    /// `ZERO_CVR_GARBAGE_COLLECTION_*`.
    pub cvr_gc: cvr_gc::CvrGcOptions,
    /// `ZERO_SERVER_VERSION`: the version the inspector reports (default: this build's).
    pub server_version: Option<String>,
}

/// The settings of API calls beyond URL and key, of auth, and of CRUD mutations.
#[derive(Debug, Clone)]
pub struct WriteAuthOptions {
    /// `ZERO_MUTATE_FORWARD_COOKIES`.
    pub mutate_forward_cookies: bool,
    /// `ZERO_MUTATE_ALLOWED_CLIENT_HEADERS`.
    pub mutate_allowed_client_headers: Vec<String>,
    /// `ZERO_MUTATE_ALLOWED_REQUEST_HEADERS`.
    pub mutate_allowed_request_headers: Vec<String>,
    /// `ZERO_QUERY_FORWARD_COOKIES`.
    pub query_forward_cookies: bool,
    /// `ZERO_QUERY_ALLOWED_CLIENT_HEADERS`.
    pub query_allowed_client_headers: Vec<String>,
    /// `ZERO_QUERY_ALLOWED_REQUEST_HEADERS`.
    pub query_allowed_request_headers: Vec<String>,
    /// `ZERO_AUTH_SECRET`.
    pub auth_secret: Option<String>,
    /// `ZERO_AUTH_JWK`.
    pub auth_jwk: Option<String>,
    /// `ZERO_AUTH_JWKS_URL`.
    pub auth_jwks_url: Option<String>,
    /// `ZERO_AUTH_ISSUER`.
    pub auth_issuer: Option<String>,
    /// `ZERO_AUTH_AUDIENCE`.
    pub auth_audience: Option<String>,
    /// `ZERO_AUTH_REVALIDATE_INTERVAL_SECONDS`.
    pub auth_revalidate_interval: std::time::Duration,
    /// `ZERO_AUTH_RETRANSFORM_INTERVAL_SECONDS`: custom queries are transformed again this often.
    pub auth_retransform_interval: std::time::Duration,
    /// Upstream URI for CRUD mutations; `None` disables them.
    pub upstream_db: Option<String>,
    /// `ZERO_ENABLE_CRUD_MUTATIONS`.
    pub enable_crud_mutations: bool,
    /// `ZERO_UPSTREAM_MAX_CONNS`: connections for CRUD mutations.
    pub upstream_max_conns: usize,
    /// `ZERO_PER_USER_MUTATION_LIMIT_MAX`.
    pub mutation_limit_max: Option<u32>,
    /// `ZERO_PER_USER_MUTATION_LIMIT_WINDOW_MS`.
    pub mutation_limit_window: std::time::Duration,
}

impl Default for WriteAuthOptions {
    fn default() -> WriteAuthOptions {
        WriteAuthOptions {
            mutate_forward_cookies: false,
            mutate_allowed_client_headers: Vec::new(),
            mutate_allowed_request_headers: Vec::new(),
            query_forward_cookies: false,
            query_allowed_client_headers: Vec::new(),
            query_allowed_request_headers: Vec::new(),
            auth_secret: None,
            auth_jwk: None,
            auth_jwks_url: None,
            auth_issuer: None,
            auth_audience: None,
            auth_revalidate_interval: std::time::Duration::from_secs(300),
            auth_retransform_interval: std::time::Duration::from_secs(300),
            upstream_db: None,
            enable_crud_mutations: true,
            upstream_max_conns: 20,
            mutation_limit_max: None,
            mutation_limit_window: std::time::Duration::from_secs(60),
        }
    }
}

impl SyncOptions {
    /// Options from the configuration: port `ZERO_PORT` on all interfaces, CVRs in
    /// `ZERO_CVR_DB` or next to the replica (`<replica>-cvr.db`), workers `ZERO_NUM_SYNC_WORKERS` (default cores − 1, at
    /// least 1).
    pub fn from_config(config: &Config) -> SyncOptions {
        let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
        let mut cvr = config.replica_file.clone().into_os_string();
        cvr.push("-cvr.db");
        SyncOptions {
            addr: SocketAddr::new(IpAddr::V4(Ipv4Addr::UNSPECIFIED), config.port),
            replica_file: config.replica_file.clone(),
            cvr_file: PathBuf::from(cvr),
            cvr_db: config.cvr_db.clone(),
            cvr_max_conns: config.cvr_max_conns,
            app_id: config.app_id.clone(),
            shard_schema: config.shard().schema(),
            num_workers: config
                .num_sync_workers
                .map_or(cores.saturating_sub(1).max(1), |n| n.max(1) as usize),
            admin_password: config.admin_password.clone(),
            development: std::env::var("NODE_ENV").is_ok_and(|v| v == "development"),
            max_payload_bytes: config.websocket_max_payload_bytes,
            query_urls: if config.query_url.is_empty() {
                config.get_queries_url.clone()
            } else {
                config.query_url.clone()
            },
            query_api_key: config
                .query_api_key
                .clone()
                .or_else(|| config.get_queries_api_key.clone()),
            mutate_urls: if config.push_url.is_empty() {
                config.mutate_url.clone()
            } else {
                config.push_url.clone()
            },
            mutate_api_key: config
                .mutate_api_key
                .clone()
                .or_else(|| config.push_api_key.clone()),
            writes: WriteAuthOptions {
                mutate_forward_cookies: config
                    .mutate_forward_cookies
                    .or(config.push_forward_cookies)
                    .unwrap_or(false),
                mutate_allowed_client_headers: config
                    .mutate_allowed_client_headers
                    .clone()
                    .or_else(|| config.push_allowed_client_headers.clone())
                    .unwrap_or_default(),
                mutate_allowed_request_headers: config
                    .mutate_allowed_request_headers
                    .clone()
                    .or_else(|| config.push_allowed_request_headers.clone())
                    .unwrap_or_default(),
                query_forward_cookies: config
                    .query_forward_cookies
                    .or(config.get_queries_forward_cookies)
                    .unwrap_or(false),
                query_allowed_client_headers: config
                    .query_allowed_client_headers
                    .clone()
                    .or_else(|| config.get_queries_allowed_client_headers.clone())
                    .unwrap_or_default(),
                query_allowed_request_headers: config
                    .query_allowed_request_headers
                    .clone()
                    .or_else(|| config.get_queries_allowed_request_headers.clone())
                    .unwrap_or_default(),
                auth_secret: config.auth_secret.clone(),
                auth_jwk: config.auth_jwk.clone(),
                auth_jwks_url: config.auth_jwks_url.clone(),
                auth_issuer: config.auth_issuer.clone(),
                auth_audience: config.auth_audience.clone(),
                auth_revalidate_interval: std::time::Duration::from_secs(
                    config.auth_revalidate_interval_seconds,
                ),
                auth_retransform_interval: std::time::Duration::from_secs(
                    config.auth_retransform_interval_seconds,
                ),
                upstream_db: config.upstream_db.clone(),
                enable_crud_mutations: config.enable_crud_mutations,
                upstream_max_conns: config.upstream_max_conns.max(1) as usize,
                mutation_limit_max: config.per_user_mutation_limit_max,
                mutation_limit_window: std::time::Duration::from_millis(
                    config.per_user_mutation_limit_window_ms,
                ),
            },
            hydration_stats: config.compat.query_hydration_stats.unwrap_or(false),
            slow_hydrate_ms: config.compat.log_slow_hydrate_threshold,
            cvr_gc: cvr_gc::CvrGcOptions {
                inactivity: std::time::Duration::from_secs_f64(
                    config
                        .cvr_garbage_collection_inactivity_threshold_hours
                        .max(0.0)
                        * 3600.0,
                ),
                interval: std::time::Duration::from_secs_f64(
                    config
                        .cvr_garbage_collection_initial_interval_seconds
                        .max(0.0),
                ),
                batch: config.cvr_garbage_collection_initial_batch_size as usize,
            },
            server_version: config.compat.server_version.clone(),
        }
    }
}

/// State shared by the HTTP handlers and the view-syncers.
pub(crate) struct SyncShared {
    /// Replica read connections shared by every group (a group holds none of its own).
    pub(crate) readers: Arc<source::ReaderPool>,
    pub(crate) cvr: Arc<cvr_store::CvrStore>,
    pub(crate) app_id: String,
    pub(crate) shard_schema: String,
    pub(crate) watermarks: watch::Receiver<String>,
    pub(crate) admin_password: Option<String>,
    pub(crate) development: bool,
    pub(crate) max_payload_bytes: usize,
    pub(crate) query_endpoint: Option<custom::QueryEndpoint>,
    pub(crate) mutate_endpoint: Option<mutate::MutateEndpoint>,
    /// The view engine every group's queries run in.
    pub(crate) engine: ivm::EngineHandle,
    /// Legacy JWT verification, when configured.
    pub(crate) jwt: Option<Arc<auth::JwtConfig>>,
    /// CRUD mutations, when enabled.
    pub(crate) crud: Option<Arc<crud::CrudExecutor>>,
    /// `ZERO_AUTH_REVALIDATE_INTERVAL_SECONDS`.
    pub(crate) revalidate_interval: std::time::Duration,
    /// `ZERO_AUTH_RETRANSFORM_INTERVAL_SECONDS`.
    pub(crate) retransform_interval: std::time::Duration,
    pub(crate) connections: AtomicUsize,
    pub(crate) hydration_stats: bool,
    pub(crate) slow_hydrate_ms: f64,
    /// The version the inspector reports.
    pub(crate) server_version: String,
    /// Inspector logins (the time digests live in each view-syncer).
    pub(crate) inspector: inspect::Inspector,
    /// Set when the server shuts down: every connection closes.
    pub(crate) closing: watch::Sender<bool>,
    conn_ids: std::sync::atomic::AtomicU64,
    registry: Mutex<HashMap<String, mpsc::UnboundedSender<GroupCmd>>>,
    workers: Vec<tokio::runtime::Handle>,
}

/// One AST per distinct query shape among `texts` (queries that differ only in literal
/// values share a shape), at most [`MAX_PREPARED_SHAPES`].
fn distinct_shapes(texts: &[String]) -> Vec<zero_queries::ast::Ast> {
    fn blank_literals(v: &mut serde_json::Value) {
        match v {
            serde_json::Value::Object(m) => {
                if m.get("type").and_then(|t| t.as_str()) == Some("literal") {
                    m.insert("value".into(), serde_json::Value::Null);
                }
                m.values_mut().for_each(blank_literals);
            }
            serde_json::Value::Array(a) => a.iter_mut().for_each(blank_literals),
            _ => {}
        }
    }
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for t in texts {
        let Ok(mut v) = serde_json::from_str::<serde_json::Value>(t) else {
            continue;
        };
        let Ok(ast) = serde_json::from_value::<zero_queries::ast::Ast>(v.clone()) else {
            continue;
        };
        blank_literals(&mut v);
        if seen.insert(v.to_string()) {
            out.push(ast);
            if out.len() >= MAX_PREPARED_SHAPES {
                break;
            }
        }
    }
    out
}

/// Bounds the work of preparing stored shapes at startup.
const MAX_PREPARED_SHAPES: usize = 1000;

impl SyncShared {
    /// Sends a command to a group's view-syncer, starting one if the group has none.
    pub(crate) fn dispatch(self: &Arc<Self>, group: &str, cmd: GroupCmd) {
        let mut reg = self.registry.lock().expect("registry lock");
        let cmd = match reg.get(group) {
            Some(tx) => match tx.send(cmd) {
                Ok(()) => return,
                Err(e) => e.0,
            },
            None => cmd,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let _ = tx.send(cmd);
        reg.insert(group.to_string(), tx);
        let worker = zero_queries::hash::h32(group) as usize % self.workers.len();
        let shared = self.clone();
        let group = group.to_string();
        self.workers[worker].spawn(async move {
            match ViewSyncer::open(&group, shared.clone()).await {
                Ok(vs) => vs.run(rx).await,
                Err(e) => {
                    error!(client_group = %group, error = %e, "view-syncer could not start");
                    shared
                        .registry
                        .lock()
                        .expect("registry lock")
                        .remove(&group);
                    let mut rx = rx;
                    while let Ok(cmd) = rx.try_recv() {
                        if let GroupCmd::Connect(c) = cmd {
                            let _ = c.out.send(Outbound::Close(Some(protocol::Downstream::Error(
                                protocol::ErrorBody::new(
                                    protocol::ErrorKind::Internal,
                                    e.to_string(),
                                ),
                            ))));
                        }
                    }
                }
            }
        });
    }

    /// Removes a view-syncer that wants to stop; false when commands arrived meanwhile (it
    /// must keep running). Holding the registry lock makes this atomic with `dispatch`.
    pub(crate) fn retire(&self, group: &str, rx: &mpsc::UnboundedReceiver<GroupCmd>) -> bool {
        let mut reg = self.registry.lock().expect("registry lock");
        if !rx.is_empty() {
            return false;
        }
        reg.remove(group);
        true
    }

    /// Number of running view-syncers.
    pub(crate) fn groups(&self) -> usize {
        self.registry.lock().expect("registry lock").len()
    }

    /// Whether the group's view-syncer runs in this process.
    pub(crate) fn is_live(&self, group: &str) -> bool {
        self.registry
            .lock()
            .expect("registry lock")
            .contains_key(group)
    }

    /// The groups whose view-syncers run in this process.
    pub(crate) fn live_groups(&self) -> Vec<String> {
        self.registry
            .lock()
            .expect("registry lock")
            .keys()
            .cloned()
            .collect()
    }

    pub(crate) fn next_conn_id(&self) -> u64 {
        self.conn_ids.fetch_add(1, Ordering::Relaxed)
    }

    pub(crate) fn connection_opened(&self) {
        self.connections.fetch_add(1, Ordering::Relaxed);
    }

    pub(crate) fn connection_closed(&self) {
        self.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// A bound sync server.
pub struct SyncServer {
    /// The address it listens on (useful with port 0).
    pub addr: SocketAddr,
    listener: tokio::net::TcpListener,
    shared: Arc<SyncShared>,
    stops: Vec<oneshot::Sender<()>>,
}

/// Binds the port and starts the sync workers.
pub async fn bind(
    opts: SyncOptions,
    watermarks: watch::Receiver<String>,
) -> Result<SyncServer, SyncError> {
    let listener = tokio::net::TcpListener::bind(opts.addr).await?;
    let cvr = cvr_store::CvrStore::open(
        &opts.cvr_file,
        opts.cvr_db.as_deref().map(|db| (db, opts.cvr_max_conns)),
        &opts.shard_schema,
    )
    .await?;
    let addr = listener.local_addr()?;
    let mut workers = Vec::new();
    let mut stops = Vec::new();
    for i in 0..opts.num_workers.max(1) {
        // Groups' CVR flushes on a worker wake the writer when the worker runs out of work,
        // so one replica version's groups are stored together (`cvr_store::wake_deferred`).
        let parked = Arc::downgrade(&cvr);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(move || {
                if let Some(cvr) = parked.upgrade() {
                    cvr.wake_deferred();
                }
            })
            .build()?;
        workers.push(rt.handle().clone());
        let (stop_tx, stop_rx) = oneshot::channel::<()>();
        stops.push(stop_tx);
        std::thread::Builder::new()
            .name(format!("sync-worker-{i}"))
            .spawn(move || {
                cvr_store::defer_wakes_on_this_thread();
                rt.block_on(async {
                    let _ = stop_rx.await;
                });
            })?;
    }
    let w = &opts.writes;
    let cfg_err = |e: fetch::PatternError| SyncError::Config(e.to_string());
    let query_endpoint = if opts.query_urls.is_empty() {
        None
    } else {
        Some(custom::QueryEndpoint {
            config: Arc::new(
                fetch::ApiConfig::new(
                    "ZERO_QUERY_URL",
                    opts.query_urls.clone(),
                    opts.query_api_key.clone(),
                    w.query_forward_cookies,
                    &w.query_allowed_client_headers,
                    &w.query_allowed_request_headers,
                )
                .map_err(cfg_err)?,
            ),
            schema: opts.shard_schema.clone(),
            app_id: opts.app_id.clone(),
        })
    };
    let mutate_endpoint = if opts.mutate_urls.is_empty() {
        None
    } else {
        Some(mutate::MutateEndpoint {
            config: Arc::new(
                fetch::ApiConfig::new(
                    "ZERO_MUTATE_URL",
                    opts.mutate_urls.clone(),
                    opts.mutate_api_key.clone(),
                    w.mutate_forward_cookies,
                    &w.mutate_allowed_client_headers,
                    &w.mutate_allowed_request_headers,
                )
                .map_err(cfg_err)?,
            ),
            schema: opts.shard_schema.clone(),
            app_id: opts.app_id.clone(),
        })
    };
    let jwt = auth::JwtConfig::from_options(
        w.auth_secret.as_deref(),
        w.auth_jwk.as_deref(),
        w.auth_jwks_url.as_deref(),
        w.auth_issuer.as_deref(),
        w.auth_audience.as_deref(),
    )
    .map_err(|e| SyncError::Config(e.to_string()))?
    .map(Arc::new);
    let crud = match (&w.upstream_db, w.enable_crud_mutations) {
        (Some(uri), true) => Some(Arc::new(
            crud::CrudExecutor::new(
                uri,
                &opts.shard_schema,
                &opts.app_id,
                opts.replica_file.clone(),
                w.upstream_max_conns,
                w.mutation_limit_max.map(|m| (m, w.mutation_limit_window)),
            )
            .map_err(SyncError::Config)?,
        )),
        _ => None,
    };
    let revalidate_interval = w.auth_revalidate_interval;
    let retransform_interval = w.auth_retransform_interval;
    // Every new watermark reaches the engine directly; groups hear from the engine.
    let engine = ivm::EngineHandle::start(
        opts.replica_file.clone(),
        opts.app_id.clone(),
        opts.shard_schema.clone(),
        1,
        watermarks.clone(),
    )?;
    // Shapes of the queries stored in the CVRs are prepared while the replica loads.
    match cvr.stored_asts().await {
        Ok(texts) => {
            let asts = distinct_shapes(&texts);
            if !asts.is_empty() {
                info!(shapes = asts.len(), "preparing the stored queries' shapes");
                engine.send(ivm::Cmd::Prepare { asts });
            }
        }
        Err(e) => {
            tracing::warn!(error = %e, "stored queries could not be read; their shapes are not prepared")
        }
    }
    let readers = source::ReaderPool::new(opts.replica_file.clone(), opts.num_workers * 2 + 2);
    let shared = Arc::new(SyncShared {
        readers,
        cvr,
        app_id: opts.app_id,
        shard_schema: opts.shard_schema,
        watermarks,
        admin_password: opts.admin_password,
        development: opts.development,
        max_payload_bytes: opts.max_payload_bytes,
        query_endpoint,
        mutate_endpoint,
        engine,
        jwt,
        crud,
        revalidate_interval,
        retransform_interval,
        connections: AtomicUsize::new(0),
        hydration_stats: opts.hydration_stats,
        slow_hydrate_ms: opts.slow_hydrate_ms,
        server_version: opts
            .server_version
            .unwrap_or_else(|| env!("CARGO_PKG_VERSION").to_string()),
        inspector: inspect::Inspector::default(),
        closing: watch::channel(false).0,
        conn_ids: std::sync::atomic::AtomicU64::new(1),
        registry: Mutex::new(HashMap::new()),
        workers,
    });
    tokio::spawn(cvr_gc::run(Arc::downgrade(&shared), opts.cvr_gc));
    info!(%addr, workers = stops.len(), "sync server listening");
    Ok(SyncServer {
        addr,
        listener,
        shared,
        stops,
    })
}

impl SyncServer {
    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), SyncError> {
        let app = http::router(self.shared.clone());
        let shared = self.shared.clone();
        // WebSocket connections outlive graceful HTTP shutdown; they are closed explicitly
        // (with "going away") so that clients reconnect to the next server.
        let shutdown = async move {
            shutdown.await;
            shared.closing.send_replace(true);
        };
        // Pokes are several small frames: without TCP_NODELAY, Nagle's algorithm holds the
        // next one until the client's delayed ACK (about 40 ms).
        use axum::serve::ListenerExt;
        let listener = self.listener.tap_io(|tcp| {
            if let Err(e) = tcp.set_nodelay(true) {
                tracing::debug!(error = %e, "TCP_NODELAY could not be set");
            }
        });
        let r = axum::serve(listener, app)
            .with_graceful_shutdown(shutdown)
            .await;
        for s in self.stops {
            let _ = s.send(());
        }
        self.shared.engine.send(ivm::Cmd::Stop);
        // Clients were poked versions whose records may still be queued: write them before
        // exiting, so that a restarted server resumes those clients.
        if !self
            .shared
            .cvr
            .drain(std::time::Duration::from_secs(30))
            .await
        {
            error!(
                groups = self.shared.cvr.pending(),
                "client view records not written at shutdown"
            );
        }
        Ok(r?)
    }
}

/// Binds and serves until `shutdown` completes.
pub async fn serve(
    opts: SyncOptions,
    watermarks: watch::Receiver<String>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), SyncError> {
    bind(opts, watermarks).await?.serve(shutdown).await
}
