//! Configuration: every `ZERO_*` variable of zero-cache 1.9.0, read from the environment (and a
//! `.env` file) or from the equivalent `--kebab-case` flag.
//!
//! Options that this server does not act on yet are still accepted, so that an existing
//! deployment's environment keeps working unchanged; `zero-cache --help` lists every one with its
//! environment name and default.

use std::path::PathBuf;

use clap::Parser;
use clap::builder::BoolishValueParser;

/// How log lines are written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log collectors.
    Json,
}

/// Minimum level of log lines written.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// Everything, including per-transaction detail.
    Debug,
    /// Status changes.
    Info,
    /// Unexpected but recoverable conditions.
    Warn,
    /// Failures only.
    Error,
}

impl LogLevel {
    /// The `tracing` filter directive for this level.
    pub fn as_filter(self) -> &'static str {
        match self {
            LogLevel::Debug => "debug",
            LogLevel::Info => "info",
            LogLevel::Warn => "warn",
            LogLevel::Error => "error",
        }
    }
}

/// The server's whole configuration.
///
/// Field names follow zero-cache's option names, so `upstream_db` is `--upstream-db` and
/// `ZERO_UPSTREAM_DB`.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "zero-cache",
    version,
    about = "Sync server for Zero apps: a drop-in replacement for zero-cache",
    long_about = None,
    max_term_width = 100,
    args_override_self = true
)]
pub struct Config {
    /// Upstream Postgres URI (postgres://user:password@host:port/db). Required.
    #[arg(long, env = "ZERO_UPSTREAM_DB", hide_env_values = true)]
    pub upstream_db: Option<String>,

    /// Maximum upstream connections, used by initial sync workers and writes.
    #[arg(long, env = "ZERO_UPSTREAM_MAX_CONNS", default_value_t = 20)]
    pub upstream_max_conns: u32,

    /// Create the replication slot with FAILOVER (Postgres 17+).
    #[arg(long, env = "ZERO_UPSTREAM_PG_REPLICATION_SLOT_FAILOVER", value_parser = BoolishValueParser::new(), default_value_t = false, action = clap::ArgAction::Set)]
    pub upstream_pg_replication_slot_failover: bool,

    /// A replication stream silent this long (ms; not even a keepalive) is presumed dead, e.g.
    /// behind a network path that dropped it without a reset, and is reconnected. Default:
    /// twice upstream's `wal_sender_timeout` (Postgres sends keepalives at half of it); 0: never.
    #[arg(long, env = "ZERO_UPSTREAM_PG_STREAM_INBOUND_TIMEOUT_MS")]
    pub upstream_pg_stream_inbound_timeout_ms: Option<u64>,

    /// Path of the SQLite replica file.
    #[arg(long, env = "ZERO_REPLICA_FILE", default_value = "zero.db")]
    pub replica_file: PathBuf,

    /// App id: names the upstream schemas, slots and publications (`[a-z0-9_]+`).
    #[arg(long, env = "ZERO_APP_ID", default_value = "zero")]
    pub app_id: String,

    /// Shard number within the app.
    #[arg(long, env = "ZERO_SHARD_NUM", default_value_t = 0)]
    pub shard_num: u32,

    /// Publications to replicate, comma separated. Default: all tables of schema `public`.
    #[arg(long, env = "ZERO_APP_PUBLICATIONS", value_delimiter = ',')]
    pub app_publications: Vec<String>,

    /// Parallel connections used to copy tables during initial sync.
    #[arg(
        long,
        env = "ZERO_INITIAL_SYNC_TABLE_COPY_WORKERS",
        default_value_t = 5
    )]
    pub initial_sync_table_copy_workers: u32,

    /// Copy tables in text format instead of binary during initial sync.
    #[arg(long, env = "ZERO_INITIAL_SYNC_TEXT_COPY", value_parser = BoolishValueParser::new(), default_value_t = false, action = clap::ArgAction::Set)]
    pub initial_sync_text_copy: bool,

    /// Wipe the replica and resync when replication cannot continue (lost slot, other upstream,
    /// schema change without DDL detection).
    #[arg(long, env = "ZERO_AUTO_RESET", value_parser = BoolishValueParser::new(), default_value_t = true, action = clap::ArgAction::Set)]
    pub auto_reset: bool,

    /// Run VACUUM on the replica at startup when this many hours passed since the last one.
    #[arg(long, env = "ZERO_REPLICA_VACUUM_INTERVAL_HOURS")]
    pub replica_vacuum_interval_hours: Option<f64>,

    /// Log level.
    #[arg(long, env = "ZERO_LOG_LEVEL", value_enum, default_value = "info")]
    pub log_level: LogLevel,

    /// Log format.
    #[arg(long, env = "ZERO_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Interval of replication lag reports (milliseconds); 0 or less disables them.
    #[arg(
        long,
        env = "ZERO_REPLICATION_LAG_REPORT_INTERVAL_MS",
        default_value_t = 30000,
        allow_negative_numbers = true
    )]
    pub replication_lag_report_interval_ms: i64,

    /// Port of the sync server (HTTP and WebSocket).
    #[arg(long, env = "ZERO_PORT", default_value_t = 4848)]
    pub port: u16,

    /// Port of the change streamer, served by a replication manager (ZERO_NUM_SYNC_WORKERS=0)
    /// for view syncers; default: port + 1.
    #[arg(long, env = "ZERO_CHANGE_STREAMER_PORT")]
    pub change_streamer_port: Option<u16>,

    /// URI of the replication manager's change streamer (http://host:4849). Set on view syncers:
    /// they replicate from it instead of from upstream (no replication slot of their own).
    #[arg(long, env = "ZERO_CHANGE_STREAMER_URI")]
    pub change_streamer_uri: Option<String>,

    /// How view syncers find the replication manager: `dedicated` (ZERO_CHANGE_STREAMER_URI) or
    /// `discover`: a node with sync workers and no ZERO_CHANGE_STREAMER_URI becomes a view
    /// syncer and reads the manager's address from `"{app}_{shard}/cdc"."replicationState"` in
    /// ZERO_CHANGE_DB (default: ZERO_UPSTREAM_DB), again after every disconnect.
    #[arg(long, env = "ZERO_CHANGE_STREAMER_MODE", default_value = "dedicated")]
    pub change_streamer_mode: String,

    /// The `host:port` a replication manager publishes for discovering view syncers. Default:
    /// the IPv4 address of this host's network interface (see
    /// ZERO_CHANGE_STREAMER_DISCOVERY_INTERFACE_PREFERENCES) and ZERO_CHANGE_STREAMER_PORT.
    #[arg(long, env = "ZERO_CHANGE_STREAMER_ADDRESS")]
    pub change_streamer_address: Option<String>,

    /// Interface name prefixes, in order of preference, whose address the replication manager
    /// publishes when ZERO_CHANGE_STREAMER_ADDRESS is not set.
    #[arg(
        long,
        env = "ZERO_CHANGE_STREAMER_DISCOVERY_INTERFACE_PREFERENCES",
        value_delimiter = ',',
        default_value = "eth,en"
    )]
    pub change_streamer_discovery_interface_preferences: Vec<String>,

    /// Number of sync workers; 0 runs only the replication manager (replication, change
    /// streamer, backups; no client sync). Default: cores - 1, at least 1.
    #[arg(long, env = "ZERO_NUM_SYNC_WORKERS")]
    pub num_sync_workers: Option<u32>,

    /// Password for the admin endpoints (`/statz`).
    #[arg(long, env = "ZERO_ADMIN_PASSWORD", hide_env_values = true)]
    pub admin_password: Option<String>,

    /// Postgres database for client view records; default: the replica's directory (SQLite).
    #[arg(long, env = "ZERO_CVR_DB", hide_env_values = true)]
    pub cvr_db: Option<String>,

    /// Maximum CVR database connections.
    #[arg(long, env = "ZERO_CVR_MAX_CONNS", default_value_t = 30)]
    pub cvr_max_conns: u32,

    /// Client view records whose group has not been connected for this many hours are
    /// deleted (a returning client then gets `ClientNotFound` and starts afresh), so the CVR
    /// store does not grow with every browser that ever connected.
    #[arg(
        long,
        env = "ZERO_CVR_GARBAGE_COLLECTION_INACTIVITY_THRESHOLD_HOURS",
        default_value_t = 48.0
    )]
    pub cvr_garbage_collection_inactivity_threshold_hours: f64,

    /// Seconds between CVR garbage-collection passes while passes find records to delete;
    /// the interval doubles (up to 16 minutes) while they find none.
    #[arg(
        long,
        env = "ZERO_CVR_GARBAGE_COLLECTION_INITIAL_INTERVAL_SECONDS",
        default_value_t = 60.0
    )]
    pub cvr_garbage_collection_initial_interval_seconds: f64,

    /// Inactive client view records deleted per pass at most; 0 disables garbage collection.
    #[arg(
        long,
        env = "ZERO_CVR_GARBAGE_COLLECTION_INITIAL_BATCH_SIZE",
        default_value_t = 25
    )]
    pub cvr_garbage_collection_initial_batch_size: u32,

    /// Postgres database for the replication manager's change log (schema `{app}_{shard}/cdc`):
    /// every committed transaction is stored there before the replica commits and the slot is
    /// acknowledged, and view syncers catch up from it. Default: the log stays inside the
    /// replica file. Also where discovering view syncers read the manager's address.
    #[arg(long, env = "ZERO_CHANGE_DB", hide_env_values = true)]
    pub change_db: Option<String>,

    /// Maximum change database connections (the replication manager's pool).
    #[arg(long, env = "ZERO_CHANGE_MAX_CONNS", default_value_t = 5)]
    pub change_max_conns: u32,

    /// Custom mutator endpoint(s) of the API server (URL patterns, comma separated).
    #[arg(long, env = "ZERO_MUTATE_URL", value_delimiter = ',')]
    pub mutate_url: Vec<String>,

    /// API key sent as `X-Api-Key` to the mutate endpoint.
    #[arg(long, env = "ZERO_MUTATE_API_KEY", hide_env_values = true)]
    pub mutate_api_key: Option<String>,

    /// Synced-query transform endpoint(s) of the API server (URL patterns, comma separated).
    #[arg(long, env = "ZERO_QUERY_URL", value_delimiter = ',')]
    pub query_url: Vec<String>,

    /// API key sent as `X-Api-Key` to the query endpoint.
    #[arg(long, env = "ZERO_QUERY_API_KEY", hide_env_values = true)]
    pub query_api_key: Option<String>,

    /// Forward the client's `Cookie` header to the mutate endpoint.
    #[arg(long, env = "ZERO_MUTATE_FORWARD_COOKIES", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub mutate_forward_cookies: Option<bool>,

    /// `userPushHeaders` the client may send to the mutate endpoint (comma separated).
    #[arg(
        long,
        env = "ZERO_MUTATE_ALLOWED_CLIENT_HEADERS",
        value_delimiter = ','
    )]
    pub mutate_allowed_client_headers: Option<Vec<String>>,

    /// Headers of the client's connect request forwarded to the mutate endpoint.
    #[arg(
        long,
        env = "ZERO_MUTATE_ALLOWED_REQUEST_HEADERS",
        value_delimiter = ','
    )]
    pub mutate_allowed_request_headers: Option<Vec<String>>,

    /// Deprecated alias of ZERO_MUTATE_URL (takes precedence when both are set).
    #[arg(long, env = "ZERO_PUSH_URL", value_delimiter = ',')]
    pub push_url: Vec<String>,

    /// Deprecated alias of ZERO_MUTATE_API_KEY.
    #[arg(long, env = "ZERO_PUSH_API_KEY", hide_env_values = true)]
    pub push_api_key: Option<String>,

    /// Deprecated alias of ZERO_MUTATE_FORWARD_COOKIES.
    #[arg(long, env = "ZERO_PUSH_FORWARD_COOKIES", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub push_forward_cookies: Option<bool>,

    /// Deprecated alias of ZERO_MUTATE_ALLOWED_CLIENT_HEADERS.
    #[arg(long, env = "ZERO_PUSH_ALLOWED_CLIENT_HEADERS", value_delimiter = ',')]
    pub push_allowed_client_headers: Option<Vec<String>>,

    /// Deprecated alias of ZERO_MUTATE_ALLOWED_REQUEST_HEADERS.
    #[arg(long, env = "ZERO_PUSH_ALLOWED_REQUEST_HEADERS", value_delimiter = ',')]
    pub push_allowed_request_headers: Option<Vec<String>>,

    /// Forward the client's `Cookie` header to the query endpoint.
    #[arg(long, env = "ZERO_QUERY_FORWARD_COOKIES", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub query_forward_cookies: Option<bool>,

    /// `userQueryHeaders` the client may send to the query endpoint (comma separated).
    #[arg(long, env = "ZERO_QUERY_ALLOWED_CLIENT_HEADERS", value_delimiter = ',')]
    pub query_allowed_client_headers: Option<Vec<String>>,

    /// Headers of the client's connect request forwarded to the query endpoint.
    #[arg(
        long,
        env = "ZERO_QUERY_ALLOWED_REQUEST_HEADERS",
        value_delimiter = ','
    )]
    pub query_allowed_request_headers: Option<Vec<String>>,

    /// Deprecated alias of ZERO_QUERY_URL (used when that is not set).
    #[arg(long, env = "ZERO_GET_QUERIES_URL", value_delimiter = ',')]
    pub get_queries_url: Vec<String>,

    /// Deprecated alias of ZERO_QUERY_API_KEY.
    #[arg(long, env = "ZERO_GET_QUERIES_API_KEY", hide_env_values = true)]
    pub get_queries_api_key: Option<String>,

    /// Deprecated alias of ZERO_QUERY_FORWARD_COOKIES.
    #[arg(long, env = "ZERO_GET_QUERIES_FORWARD_COOKIES", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub get_queries_forward_cookies: Option<bool>,

    /// Deprecated alias of ZERO_QUERY_ALLOWED_CLIENT_HEADERS.
    #[arg(
        long,
        env = "ZERO_GET_QUERIES_ALLOWED_CLIENT_HEADERS",
        value_delimiter = ','
    )]
    pub get_queries_allowed_client_headers: Option<Vec<String>>,

    /// Deprecated alias of ZERO_QUERY_ALLOWED_REQUEST_HEADERS.
    #[arg(
        long,
        env = "ZERO_GET_QUERIES_ALLOWED_REQUEST_HEADERS",
        value_delimiter = ','
    )]
    pub get_queries_allowed_request_headers: Option<Vec<String>>,

    /// Deprecated: JWK (JSON) that verifies legacy JWT auth tokens.
    #[arg(long, env = "ZERO_AUTH_JWK", hide_env_values = true)]
    pub auth_jwk: Option<String>,

    /// Deprecated: URL of a JWKS that verifies legacy JWT auth tokens.
    #[arg(long, env = "ZERO_AUTH_JWKS_URL")]
    pub auth_jwks_url: Option<String>,

    /// Deprecated: symmetric secret that verifies legacy JWT auth tokens (HS256/384/512).
    #[arg(long, env = "ZERO_AUTH_SECRET", hide_env_values = true)]
    pub auth_secret: Option<String>,

    /// Deprecated: required `iss` of legacy JWTs.
    #[arg(long, env = "ZERO_AUTH_ISSUER")]
    pub auth_issuer: Option<String>,

    /// Deprecated: required `aud` of legacy JWTs.
    #[arg(long, env = "ZERO_AUTH_AUDIENCE")]
    pub auth_audience: Option<String>,

    /// How often connections' tokens are revalidated (seconds).
    #[arg(
        long,
        env = "ZERO_AUTH_REVALIDATE_INTERVAL_SECONDS",
        default_value_t = 300
    )]
    pub auth_revalidate_interval_seconds: u64,

    /// How often custom queries are transformed again (seconds).
    #[arg(
        long,
        env = "ZERO_AUTH_RETRANSFORM_INTERVAL_SECONDS",
        default_value_t = 300
    )]
    pub auth_retransform_interval_seconds: u64,

    /// CRUD mutations a user may make per window; unset: no limit.
    #[arg(long, env = "ZERO_PER_USER_MUTATION_LIMIT_MAX")]
    pub per_user_mutation_limit_max: Option<u32>,

    /// The rate limit's sliding window (ms).
    #[arg(
        long,
        env = "ZERO_PER_USER_MUTATION_LIMIT_WINDOW_MS",
        default_value_t = 60000
    )]
    pub per_user_mutation_limit_window_ms: u64,

    /// Allow legacy CRUD mutations.
    #[arg(long, env = "ZERO_ENABLE_CRUD_MUTATIONS", value_parser = BoolishValueParser::new(), default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_crud_mutations: bool,

    /// Maximum WebSocket message size in bytes.
    #[arg(long, env = "ZERO_WEBSOCKET_MAX_PAYLOAD_BYTES", default_value_t = 10 * 1024 * 1024)]
    pub websocket_max_payload_bytes: usize,

    /// Replica backup location (`s3://bucket/path` or `file:///dir`). The replication manager
    /// writes snapshots and incremental change segments there; a node without a replica restores
    /// from it. S3 credentials come from AWS_* variables (AWS_ACCESS_KEY_ID,
    /// AWS_SECRET_ACCESS_KEY, AWS_REGION, AWS_ENDPOINT for S3-compatible stores).
    #[arg(long, env = "ZERO_LITESTREAM_BACKUP_URL")]
    pub litestream_backup_url: Option<String>,

    /// Minutes between incremental backups (change segments).
    #[arg(
        long,
        env = "ZERO_LITESTREAM_INCREMENTAL_BACKUP_INTERVAL_MINUTES",
        default_value_t = 15.0
    )]
    pub litestream_incremental_backup_interval_minutes: f64,

    /// Hours between full snapshot backups.
    #[arg(
        long,
        env = "ZERO_LITESTREAM_SNAPSHOT_BACKUP_INTERVAL_HOURS",
        default_value_t = 12.0
    )]
    pub litestream_snapshot_backup_interval_hours: f64,

    /// S3-compatible endpoint for the backup (overrides AWS_ENDPOINT).
    #[arg(long, env = "ZERO_LITESTREAM_ENDPOINT")]
    pub litestream_endpoint: Option<String>,

    /// Region of the backup bucket (overrides AWS_REGION).
    #[arg(long, env = "ZERO_LITESTREAM_REGION")]
    pub litestream_region: Option<String>,

    /// Litestream executable. No effect: backups are built in (no child process).
    #[arg(long, env = "ZERO_LITESTREAM_EXECUTABLE")]
    pub litestream_executable: Option<String>,

    /// Task id used in logs and slot ownership; default: random.
    #[arg(long, env = "ZERO_TASK_ID")]
    pub task_id: Option<String>,

    /// Enable anonymous telemetry (this server never sends any).
    #[arg(long, env = "ZERO_ENABLE_TELEMETRY", value_parser = BoolishValueParser::new(), default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_telemetry: bool,

    /// Other zero-cache options that are accepted for compatibility.
    #[command(flatten)]
    pub compat: CompatOptions,
}

/// zero-cache options that are accepted so that existing deployments start unchanged, but that
/// do not (yet) change this server's behaviour.
#[derive(Debug, Clone, clap::Args)]
pub struct CompatOptions {
    /// Query planner switch (cost-based flip planning).
    #[arg(long, env = "ZERO_ENABLE_QUERY_PLANNER", value_parser = BoolishValueParser::new(), default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_query_planner: bool,
    /// Maximum IVM time slice before yielding (ms).
    #[arg(long, env = "ZERO_YIELD_THRESHOLD_MS", default_value_t = 10.0)]
    pub yield_threshold_ms: f64,
    /// Log every query hydration with its table, row count and time (info level).
    #[arg(long, env = "ZERO_QUERY_HYDRATION_STATS", value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub query_hydration_stats: Option<bool>,
    /// Hydrations at least this slow (ms) are logged as warnings with their row counts.
    #[arg(long, env = "ZERO_LOG_SLOW_HYDRATE_THRESHOLD", default_value_t = 100.0)]
    pub log_slow_hydrate_threshold: f64,
    /// Slow row threshold (ms).
    #[arg(long, env = "ZERO_LOG_SLOW_ROW_THRESHOLD", default_value_t = 2.0)]
    pub log_slow_row_threshold: f64,
    /// Drain and exit when `GET /keepalive` (the load balancer's health check) has not been
    /// requested for this long (ms), so a task the balancer dropped hands its clients over.
    /// Default: off, or 20000 when `ECS_CONTAINER_METADATA_URI_V4` is set; 0: off.
    #[arg(long, env = "ZERO_KEEPALIVE_TIMEOUT_MS")]
    pub keepalive_timeout_ms: Option<u64>,
    /// Back pressure limit as a proportion of the heap. No effect: the change streamer reads each
    /// view syncer's stream from its durable log in bounded batches, so memory does not grow with
    /// a slow subscriber.
    #[arg(
        long,
        env = "ZERO_CHANGE_STREAMER_BACK_PRESSURE_LIMIT_HEAP_PROPORTION",
        default_value_t = 0.04
    )]
    pub change_streamer_back_pressure_limit_heap_proportion: f64,
    /// Litestream v0.5 executable (no effect: backups are built in).
    #[arg(long, env = "ZERO_LITESTREAM_EXECUTABLE_V5")]
    pub litestream_executable_v5: Option<String>,
    /// Restore with the v0.5 binary (no effect: backups are built in).
    #[arg(long, env = "ZERO_LITESTREAM_RESTORE_USING_V5", value_parser = BoolishValueParser::new(), default_value_t = true, action = clap::ArgAction::Set)]
    pub litestream_restore_using_v5: bool,
    /// Back up with the v0.5 binary (no effect: backups are built in).
    #[arg(long, env = "ZERO_LITESTREAM_BACKUP_USING_V5", value_parser = BoolishValueParser::new(), default_value_t = false, action = clap::ArgAction::Set)]
    pub litestream_backup_using_v5: bool,
    /// Litestream config template (no effect: backups are built in).
    #[arg(long, env = "ZERO_LITESTREAM_CONFIG_PATH")]
    pub litestream_config_path: Option<String>,
    /// Litestream VFS extension (no effect).
    #[arg(long, env = "ZERO_LITESTREAM_VFS_EXTENSION_PATH")]
    pub litestream_vfs_extension_path: Option<String>,
    /// Litestream VFS probe interval, ms (no effect).
    #[arg(
        long,
        env = "ZERO_LITESTREAM_VFS_PROBE_INTERVAL_MS",
        default_value_t = 30000
    )]
    pub litestream_vfs_probe_interval_ms: u64,
    /// Litestream VFS probe timeout, ms (no effect).
    #[arg(
        long,
        env = "ZERO_LITESTREAM_VFS_PROBE_TIMEOUT_MS",
        default_value_t = 30000
    )]
    pub litestream_vfs_probe_timeout_ms: u64,
    /// Litestream VFS log file (no effect).
    #[arg(long, env = "ZERO_LITESTREAM_VFS_LOG_FILE")]
    pub litestream_vfs_log_file: Option<String>,
    /// Litestream log level (no effect: backup logs follow ZERO_LOG_LEVEL).
    #[arg(long, env = "ZERO_LITESTREAM_LOG_LEVEL", default_value = "warn")]
    pub litestream_log_level: String,
    /// Litestream metrics port (no effect: no child process; default port + 2).
    #[arg(long, env = "ZERO_LITESTREAM_PORT")]
    pub litestream_port: Option<u16>,
    /// WAL checkpoint threshold, MB (no effect: SQLite's automatic checkpoints are used).
    #[arg(
        long,
        env = "ZERO_LITESTREAM_CHECKPOINT_THRESHOLD_MB",
        default_value_t = 40.0
    )]
    pub litestream_checkpoint_threshold_mb: f64,
    /// Minimum checkpoint page count (no effect).
    #[arg(long, env = "ZERO_LITESTREAM_MIN_CHECKPOINT_PAGE_COUNT")]
    pub litestream_min_checkpoint_page_count: Option<u64>,
    /// Maximum checkpoint page count (no effect).
    #[arg(long, env = "ZERO_LITESTREAM_MAX_CHECKPOINT_PAGE_COUNT")]
    pub litestream_max_checkpoint_page_count: Option<u64>,
    /// Restore parallelism (no effect: one download stream).
    #[arg(
        long,
        env = "ZERO_LITESTREAM_RESTORE_PARALLELISM",
        default_value_t = 48
    )]
    pub litestream_restore_parallelism: u32,
    /// Parts of a snapshot upload in flight at once.
    #[arg(
        long,
        env = "ZERO_LITESTREAM_MULTIPART_CONCURRENCY",
        default_value_t = 48
    )]
    pub litestream_multipart_concurrency: u32,
    /// Snapshot uploads larger than this many bytes go up in parts of this size (at least 5 MiB).
    #[arg(
        long,
        env = "ZERO_LITESTREAM_MULTIPART_SIZE",
        default_value_t = 16777216
    )]
    pub litestream_multipart_size: u64,
    /// Server version reported to clients and logs.
    #[arg(long, env = "ZERO_SERVER_VERSION")]
    pub server_version: Option<String>,
    /// Start on the first request.
    #[arg(long, env = "ZERO_LAZY_STARTUP", value_parser = BoolishValueParser::new(), default_value_t = false, action = clap::ArgAction::Set)]
    pub lazy_startup: bool,
    /// Change source type; only `pg` is served (a custom change source is rejected at start).
    #[arg(long, env = "ZERO_UPSTREAM_TYPE", hide = true, default_value = "pg")]
    pub upstream_type: String,
    /// Internal per-worker split of ZERO_UPSTREAM_MAX_CONNS (no effect: one shared pool).
    #[arg(long, env = "ZERO_UPSTREAM_MAX_CONNS_PER_WORKER", hide = true)]
    pub upstream_max_conns_per_worker: Option<u32>,
    /// Internal per-worker split of ZERO_CVR_MAX_CONNS (no effect: one shared pool).
    #[arg(long, env = "ZERO_CVR_MAX_CONNS_PER_WORKER", hide = true)]
    pub cvr_max_conns_per_worker: Option<u32>,
    /// Integrity checks after a corruption error (no effect).
    #[arg(long, env = "ZERO_SQLITE_CORRUPTION_CHECKS", hide = true, value_parser = BoolishValueParser::new(), default_value_t = false, action = clap::ArgAction::Set)]
    pub sqlite_corruption_checks: bool,
    /// Shadow-mode query covering statistics (no effect: log only in zero-cache).
    #[arg(long, env = "ZERO_ENABLE_QUERY_COVERING", value_parser = BoolishValueParser::new(), default_value_t = true, action = clap::ArgAction::Set)]
    pub enable_query_covering: bool,
    /// Change database statement timeout, ms (no effect).
    #[arg(
        long,
        env = "ZERO_CHANGE_STATEMENT_TIMEOUT_MS",
        hide = true,
        default_value_t = 20000
    )]
    pub change_statement_timeout_ms: u64,
    /// Rows per change-log insert (no effect: one row per transaction).
    #[arg(
        long,
        env = "ZERO_CHANGE_LOG_BATCH_SIZE",
        hide = true,
        default_value_t = 2000
    )]
    pub change_log_batch_size: u32,
    /// Sample one in N IVM runs for logs (no effect).
    #[arg(long, env = "ZERO_LOG_IVM_SAMPLING", default_value_t = 5000)]
    pub log_ivm_sampling: u32,
    /// Deprecated change-streamer URI scheme (no effect: ZERO_CHANGE_STREAMER_URI carries it).
    #[arg(
        long,
        env = "ZERO_CHANGE_STREAMER_PROTOCOL",
        hide = true,
        default_value = "ws"
    )]
    pub change_streamer_protocol: String,
    /// Takeover delay of a new replication manager, ms (no effect: a newer manager takes ownership at once and the old one stops).
    #[arg(
        long,
        env = "ZERO_CHANGE_STREAMER_STARTUP_DELAY_MS",
        default_value_t = 15000
    )]
    pub change_streamer_startup_delay_ms: u64,
    /// Flow-control padding (no effect: subscribers read the durable log at their own pace).
    #[arg(
        long,
        env = "ZERO_CHANGE_STREAMER_FLOW_CONTROL_CONSENSUS_PADDING_SECONDS",
        default_value_t = 1.0
    )]
    pub change_streamer_flow_control_consensus_padding_seconds: f64,
    /// permessage-deflate on client sockets (not supported: a warning is logged and sockets stay uncompressed, which clients accept).
    #[arg(long, env = "ZERO_WEBSOCKET_COMPRESSION", value_parser = BoolishValueParser::new(), default_value_t = false, action = clap::ArgAction::Set)]
    pub websocket_compression: bool,
    /// Options of permessage-deflate (no effect, see ZERO_WEBSOCKET_COMPRESSION).
    #[arg(long, env = "ZERO_WEBSOCKET_COMPRESSION_OPTIONS")]
    pub websocket_compression_options: Option<String>,
    /// Directory of operator temp storage (no effect: operators keep state in memory).
    #[arg(long, env = "ZERO_STORAGE_DB_TMP_DIR")]
    pub storage_db_tmp_dir: Option<String>,
    /// Profile initial-sync copies (no effect).
    #[arg(long, env = "ZERO_INITIAL_SYNC_PROFILE_COPY", hide = true, value_parser = BoolishValueParser::new(), action = clap::ArgAction::Set)]
    pub initial_sync_profile_copy: Option<bool>,
    /// Initial-sync canary (no effect).
    #[arg(long, env = "ZERO_SHADOW_SYNC_ENABLED", value_parser = BoolishValueParser::new(), default_value_t = false, action = clap::ArgAction::Set)]
    pub shadow_sync_enabled: bool,
    /// Initial-sync canary interval (no effect).
    #[arg(long, env = "ZERO_SHADOW_SYNC_INTERVAL_HOURS", default_value_t = 12.0)]
    pub shadow_sync_interval_hours: f64,
    /// Initial-sync canary sample rate (no effect).
    #[arg(long, env = "ZERO_SHADOW_SYNC_SAMPLE_RATE", default_value_t = 0.1)]
    pub shadow_sync_sample_rate: f64,
    /// Initial-sync canary rows per table (no effect).
    #[arg(
        long,
        env = "ZERO_SHADOW_SYNC_MAX_ROWS_PER_TABLE",
        default_value_t = 10000
    )]
    pub shadow_sync_max_rows_per_table: u64,
    /// Deprecated and unused by zero-cache too.
    #[arg(
        long,
        env = "ZERO_TARGET_CLIENT_ROW_COUNT",
        hide = true,
        default_value_t = 20000
    )]
    pub target_client_row_count: u64,
    /// Name of a variable holding a CloudEvents sink URI (no effect: no events are published).
    #[arg(long, env = "ZERO_CLOUD_EVENT_SINK_ENV")]
    pub cloud_event_sink_env: Option<String>,
    /// Name of a variable holding CloudEvents extensions (no effect).
    #[arg(long, env = "ZERO_CLOUD_EVENT_EXTENSION_OVERRIDES_ENV")]
    pub cloud_event_extension_overrides_env: Option<String>,
}

/// The deployment role of a process (see the production guide).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    /// Replication and client sync in one process (the default).
    SingleNode,
    /// `ZERO_NUM_SYNC_WORKERS=0`: replication, change streamer and backups; no client sync.
    ReplicationManager,
    /// `ZERO_CHANGE_STREAMER_URI` set, or `ZERO_CHANGE_STREAMER_MODE=discover` with sync
    /// workers: replica from the replication manager, client sync.
    ViewSyncer,
}

/// A configuration that cannot be used, with the option at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// A required option is missing.
    #[error("missing required option {env} (--{flag})")]
    Missing {
        /// Environment name.
        env: &'static str,
        /// Flag name.
        flag: &'static str,
    },
    /// An option's value is not acceptable.
    #[error("invalid value for {env}: {reason}")]
    Invalid {
        /// Environment name.
        env: &'static str,
        /// What is wrong.
        reason: String,
    },
}

impl Config {
    /// Parses flags and environment (after loading `.env` if present).
    pub fn from_env_and_args() -> Self {
        // A missing .env file is the normal case, so the result is deliberately ignored.
        let _ = dotenvy::dotenv();
        if std::env::var_os("ZERO_SHARD_ID").is_some() {
            eprintln!("ZERO_SHARD_ID is no longer supported: use ZERO_APP_ID");
            std::process::exit(2);
        }
        Config::parse_ignoring_empty_env(std::env::args_os())
    }

    /// Parses the given arguments (first is the program name) and the environment.
    pub fn from_args(args: Vec<String>) -> Self {
        Config::parse_ignoring_empty_env(args)
    }

    /// Parses like clap, except that a variable set to nothing (`ZERO_NUM_SYNC_WORKERS=` in an
    /// env file, as the production guide writes "auto-detect") counts as unset, as it does for
    /// zero-cache, instead of failing as an invalid number.
    fn parse_ignoring_empty_env<I, T>(args: I) -> Self
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        use clap::{CommandFactory, FromArgMatches};
        let mut cmd = Config::command();
        let empty: Vec<clap::Id> = cmd
            .get_arguments()
            .filter(|a| {
                a.get_env()
                    .and_then(std::env::var_os)
                    .is_some_and(|v| v.to_string_lossy().trim().is_empty())
            })
            .map(|a| a.get_id().clone())
            .collect();
        for id in empty {
            cmd = cmd.mut_arg(id, |a| a.env(None::<&'static str>));
        }
        let matches = cmd.get_matches_from(args);
        Config::from_arg_matches(&matches).unwrap_or_else(|e| e.exit())
    }

    /// Checks the values that clap cannot check on its own.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.upstream_db.is_none() {
            return Err(ConfigError::Missing {
                env: "ZERO_UPSTREAM_DB",
                flag: "upstream-db",
            });
        }
        if self.app_id.is_empty()
            || !self
                .app_id
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
        {
            return Err(ConfigError::Invalid {
                env: "ZERO_APP_ID",
                reason: format!(
                    "\"{}\" must consist of lower-case letters, digits and underscores",
                    self.app_id
                ),
            });
        }
        for p in &self.app_publications {
            let ok = !p.is_empty()
                && p.len() <= 63
                && !p.starts_with('_')
                && p.bytes().next().is_some_and(|b| b.is_ascii_alphabetic())
                && p.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_');
            if !ok {
                return Err(ConfigError::Invalid {
                    env: "ZERO_APP_PUBLICATIONS",
                    reason: format!(
                        "\"{p}\" is not a valid publication name ([A-Za-z][A-Za-z0-9_]*, at most 63 characters, no leading underscore)"
                    ),
                });
            }
        }
        if self.change_streamer_uri.is_some() && self.num_sync_workers == Some(0) {
            return Err(ConfigError::Invalid {
                env: "ZERO_NUM_SYNC_WORKERS",
                reason: "0 makes this node a replication manager, but ZERO_CHANGE_STREAMER_URI makes it a view syncer; set only one".into(),
            });
        }
        if let Some(u) = &self.change_streamer_uri
            && !(u.starts_with("http://") || u.starts_with("ws://"))
        {
            return Err(ConfigError::Invalid {
                env: "ZERO_CHANGE_STREAMER_URI",
                reason: format!(
                    "{u:?} must be an http:// URL of the replication manager (e.g. http://replication-manager:4849)"
                ),
            });
        }
        if self.change_streamer_mode != "dedicated" && self.change_streamer_mode != "discover" {
            return Err(ConfigError::Invalid {
                env: "ZERO_CHANGE_STREAMER_MODE",
                reason: format!(
                    "{:?} must be dedicated or discover",
                    self.change_streamer_mode
                ),
            });
        }
        if let Some(u) = &self.litestream_backup_url
            && !(u.starts_with("s3://") || u.starts_with("file://"))
        {
            return Err(ConfigError::Invalid {
                env: "ZERO_LITESTREAM_BACKUP_URL",
                reason: format!("{u:?} must be an s3:// or file:// URL"),
            });
        }
        for (env, v) in [
            (
                "ZERO_LITESTREAM_INCREMENTAL_BACKUP_INTERVAL_MINUTES",
                self.litestream_incremental_backup_interval_minutes,
            ),
            (
                "ZERO_LITESTREAM_SNAPSHOT_BACKUP_INTERVAL_HOURS",
                self.litestream_snapshot_backup_interval_hours,
            ),
            (
                "ZERO_CVR_GARBAGE_COLLECTION_INACTIVITY_THRESHOLD_HOURS",
                self.cvr_garbage_collection_inactivity_threshold_hours,
            ),
            (
                "ZERO_CVR_GARBAGE_COLLECTION_INITIAL_INTERVAL_SECONDS",
                self.cvr_garbage_collection_initial_interval_seconds,
            ),
        ] {
            if !(v > 0.0 && v.is_finite()) {
                return Err(ConfigError::Invalid {
                    env,
                    reason: format!("{v} must be a positive number"),
                });
            }
        }
        if self.compat.upstream_type != "pg" {
            return Err(ConfigError::Invalid {
                env: "ZERO_UPSTREAM_TYPE",
                reason: format!(
                    "{:?} is not supported: this server replicates from Postgres only (pg)",
                    self.compat.upstream_type
                ),
            });
        }
        if let Some(u) = &self.change_db {
            crate::pgconn::UpstreamConfig::parse(u).map_err(|e| ConfigError::Invalid {
                env: "ZERO_CHANGE_DB",
                reason: e.to_string(),
            })?;
        }
        if self.change_max_conns == 0 {
            return Err(ConfigError::Invalid {
                env: "ZERO_CHANGE_MAX_CONNS",
                reason: "must be at least 1".into(),
            });
        }
        if let Some(a) = &self.change_streamer_address
            && a.rsplit_once(':')
                .is_none_or(|(h, p)| h.is_empty() || p.parse::<u16>().is_err())
        {
            return Err(ConfigError::Invalid {
                env: "ZERO_CHANGE_STREAMER_ADDRESS",
                reason: format!("{a:?} must be host:port (e.g. 10.0.0.5:4849)"),
            });
        }
        if self.initial_sync_table_copy_workers == 0 {
            return Err(ConfigError::Invalid {
                env: "ZERO_INITIAL_SYNC_TABLE_COPY_WORKERS",
                reason: "must be at least 1".into(),
            });
        }
        Ok(())
    }

    /// The upstream URI; only call after [`Config::validate`].
    pub fn upstream(&self) -> &str {
        self.upstream_db
            .as_deref()
            .expect("validate() checked that ZERO_UPSTREAM_DB is set")
    }

    /// What this process runs.
    pub fn role(&self) -> Role {
        if self.change_streamer_uri.is_some() {
            Role::ViewSyncer
        } else if self.num_sync_workers == Some(0) {
            Role::ReplicationManager
        } else if self.change_streamer_mode == "discover" {
            Role::ViewSyncer
        } else {
            Role::SingleNode
        }
    }

    /// Port of the change streamer (`ZERO_CHANGE_STREAMER_PORT`, default `ZERO_PORT + 1`).
    pub fn change_streamer_port(&self) -> u16 {
        self.change_streamer_port
            .unwrap_or_else(|| self.port.wrapping_add(1))
    }

    /// The change DB, when `ZERO_CHANGE_DB` is set; only call after [`Config::validate`].
    pub fn change_db(&self) -> Option<crate::pgconn::UpstreamConfig> {
        self.change_db.as_deref().map(|u| {
            crate::pgconn::UpstreamConfig::parse(u).expect("validate() checked ZERO_CHANGE_DB")
        })
    }

    /// Where discovering view syncers read the manager's address, and where a manager
    /// publishes it: `ZERO_CHANGE_DB`, else the upstream database.
    pub fn discovery_db(&self) -> Result<crate::pgconn::UpstreamConfig, crate::pgconn::UriError> {
        crate::pgconn::UpstreamConfig::parse(self.change_db.as_deref().unwrap_or(self.upstream()))
    }

    /// The `host:port` a replication manager publishes for discovery.
    pub fn change_streamer_address(&self) -> String {
        self.change_streamer_address.clone().unwrap_or_else(|| {
            format!(
                "{}:{}",
                crate::change_db::host_ip(&self.change_streamer_discovery_interface_preferences),
                self.change_streamer_port()
            )
        })
    }

    /// Backup settings, when `ZERO_LITESTREAM_BACKUP_URL` is set.
    pub fn backup(&self) -> Option<crate::backup::BackupConfig> {
        let url = self.litestream_backup_url.clone()?;
        Some(crate::backup::BackupConfig {
            url,
            incremental_interval: std::time::Duration::from_secs_f64(
                self.litestream_incremental_backup_interval_minutes * 60.0,
            ),
            snapshot_interval: std::time::Duration::from_secs_f64(
                self.litestream_snapshot_backup_interval_hours * 3600.0,
            ),
            endpoint: self.litestream_endpoint.clone(),
            region: self.litestream_region.clone(),
            multipart_size: self.compat.litestream_multipart_size as usize,
            multipart_concurrency: self.compat.litestream_multipart_concurrency as usize,
        })
    }

    /// The shard identity derived from app id and shard number.
    pub fn shard(&self) -> crate::upstream::Shard {
        crate::upstream::Shard::new(&self.app_id, self.shard_num, &self.app_publications)
    }
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every option of zero-cache 1.9.0 (its option table; `ZERO_SHARD_ID` is refused on
    /// purpose): an existing deployment's environment must keep working unchanged.
    const ZERO_CACHE_OPTIONS: &[&str] = &[
        "ZERO_ADMIN_PASSWORD",
        "ZERO_APP_ID",
        "ZERO_APP_PUBLICATIONS",
        "ZERO_AUTH_AUDIENCE",
        "ZERO_AUTH_ISSUER",
        "ZERO_AUTH_JWK",
        "ZERO_AUTH_JWKS_URL",
        "ZERO_AUTH_RETRANSFORM_INTERVAL_SECONDS",
        "ZERO_AUTH_REVALIDATE_INTERVAL_SECONDS",
        "ZERO_AUTH_SECRET",
        "ZERO_AUTO_RESET",
        "ZERO_CHANGE_DB",
        "ZERO_CHANGE_LOG_BATCH_SIZE",
        "ZERO_CHANGE_MAX_CONNS",
        "ZERO_CHANGE_STATEMENT_TIMEOUT_MS",
        "ZERO_CHANGE_STREAMER_ADDRESS",
        "ZERO_CHANGE_STREAMER_BACK_PRESSURE_LIMIT_HEAP_PROPORTION",
        "ZERO_CHANGE_STREAMER_DISCOVERY_INTERFACE_PREFERENCES",
        "ZERO_CHANGE_STREAMER_FLOW_CONTROL_CONSENSUS_PADDING_SECONDS",
        "ZERO_CHANGE_STREAMER_MODE",
        "ZERO_CHANGE_STREAMER_PORT",
        "ZERO_CHANGE_STREAMER_PROTOCOL",
        "ZERO_CHANGE_STREAMER_STARTUP_DELAY_MS",
        "ZERO_CHANGE_STREAMER_URI",
        "ZERO_CLOUD_EVENT_EXTENSION_OVERRIDES_ENV",
        "ZERO_CLOUD_EVENT_SINK_ENV",
        "ZERO_CVR_DB",
        "ZERO_CVR_GARBAGE_COLLECTION_INACTIVITY_THRESHOLD_HOURS",
        "ZERO_CVR_GARBAGE_COLLECTION_INITIAL_BATCH_SIZE",
        "ZERO_CVR_GARBAGE_COLLECTION_INITIAL_INTERVAL_SECONDS",
        "ZERO_CVR_MAX_CONNS",
        "ZERO_CVR_MAX_CONNS_PER_WORKER",
        "ZERO_ENABLE_CRUD_MUTATIONS",
        "ZERO_ENABLE_QUERY_COVERING",
        "ZERO_ENABLE_QUERY_PLANNER",
        "ZERO_ENABLE_TELEMETRY",
        "ZERO_GET_QUERIES_ALLOWED_CLIENT_HEADERS",
        "ZERO_GET_QUERIES_ALLOWED_REQUEST_HEADERS",
        "ZERO_GET_QUERIES_API_KEY",
        "ZERO_GET_QUERIES_FORWARD_COOKIES",
        "ZERO_GET_QUERIES_URL",
        "ZERO_INITIAL_SYNC_PROFILE_COPY",
        "ZERO_INITIAL_SYNC_TABLE_COPY_WORKERS",
        "ZERO_INITIAL_SYNC_TEXT_COPY",
        "ZERO_KEEPALIVE_TIMEOUT_MS",
        "ZERO_LAZY_STARTUP",
        "ZERO_LITESTREAM_BACKUP_URL",
        "ZERO_LITESTREAM_BACKUP_USING_V5",
        "ZERO_LITESTREAM_CHECKPOINT_THRESHOLD_MB",
        "ZERO_LITESTREAM_CONFIG_PATH",
        "ZERO_LITESTREAM_ENDPOINT",
        "ZERO_LITESTREAM_EXECUTABLE",
        "ZERO_LITESTREAM_EXECUTABLE_V5",
        "ZERO_LITESTREAM_INCREMENTAL_BACKUP_INTERVAL_MINUTES",
        "ZERO_LITESTREAM_LOG_LEVEL",
        "ZERO_LITESTREAM_MAX_CHECKPOINT_PAGE_COUNT",
        "ZERO_LITESTREAM_MIN_CHECKPOINT_PAGE_COUNT",
        "ZERO_LITESTREAM_MULTIPART_CONCURRENCY",
        "ZERO_LITESTREAM_MULTIPART_SIZE",
        "ZERO_LITESTREAM_PORT",
        "ZERO_LITESTREAM_REGION",
        "ZERO_LITESTREAM_RESTORE_PARALLELISM",
        "ZERO_LITESTREAM_RESTORE_USING_V5",
        "ZERO_LITESTREAM_SNAPSHOT_BACKUP_INTERVAL_HOURS",
        "ZERO_LITESTREAM_VFS_EXTENSION_PATH",
        "ZERO_LITESTREAM_VFS_LOG_FILE",
        "ZERO_LITESTREAM_VFS_PROBE_INTERVAL_MS",
        "ZERO_LITESTREAM_VFS_PROBE_TIMEOUT_MS",
        "ZERO_LOG_FORMAT",
        "ZERO_LOG_IVM_SAMPLING",
        "ZERO_LOG_LEVEL",
        "ZERO_LOG_SLOW_HYDRATE_THRESHOLD",
        "ZERO_LOG_SLOW_ROW_THRESHOLD",
        "ZERO_MUTATE_ALLOWED_CLIENT_HEADERS",
        "ZERO_MUTATE_ALLOWED_REQUEST_HEADERS",
        "ZERO_MUTATE_API_KEY",
        "ZERO_MUTATE_FORWARD_COOKIES",
        "ZERO_MUTATE_URL",
        "ZERO_NUM_SYNC_WORKERS",
        "ZERO_PER_USER_MUTATION_LIMIT_MAX",
        "ZERO_PER_USER_MUTATION_LIMIT_WINDOW_MS",
        "ZERO_PORT",
        "ZERO_PUSH_ALLOWED_CLIENT_HEADERS",
        "ZERO_PUSH_ALLOWED_REQUEST_HEADERS",
        "ZERO_PUSH_API_KEY",
        "ZERO_PUSH_FORWARD_COOKIES",
        "ZERO_PUSH_URL",
        "ZERO_QUERY_ALLOWED_CLIENT_HEADERS",
        "ZERO_QUERY_ALLOWED_REQUEST_HEADERS",
        "ZERO_QUERY_API_KEY",
        "ZERO_QUERY_FORWARD_COOKIES",
        "ZERO_QUERY_HYDRATION_STATS",
        "ZERO_QUERY_URL",
        "ZERO_REPLICATION_LAG_REPORT_INTERVAL_MS",
        "ZERO_REPLICA_FILE",
        "ZERO_REPLICA_VACUUM_INTERVAL_HOURS",
        "ZERO_SERVER_VERSION",
        "ZERO_SHADOW_SYNC_ENABLED",
        "ZERO_SHADOW_SYNC_INTERVAL_HOURS",
        "ZERO_SHADOW_SYNC_MAX_ROWS_PER_TABLE",
        "ZERO_SHADOW_SYNC_SAMPLE_RATE",
        "ZERO_SHARD_NUM",
        "ZERO_SQLITE_CORRUPTION_CHECKS",
        "ZERO_STORAGE_DB_TMP_DIR",
        "ZERO_TARGET_CLIENT_ROW_COUNT",
        "ZERO_TASK_ID",
        "ZERO_UPSTREAM_DB",
        "ZERO_UPSTREAM_MAX_CONNS",
        "ZERO_UPSTREAM_MAX_CONNS_PER_WORKER",
        "ZERO_UPSTREAM_PG_REPLICATION_SLOT_FAILOVER",
        "ZERO_UPSTREAM_PG_STREAM_INBOUND_TIMEOUT_MS",
        "ZERO_UPSTREAM_TYPE",
        "ZERO_WEBSOCKET_COMPRESSION",
        "ZERO_WEBSOCKET_COMPRESSION_OPTIONS",
        "ZERO_WEBSOCKET_MAX_PAYLOAD_BYTES",
        "ZERO_YIELD_THRESHOLD_MS",
    ];

    #[test]
    fn every_zero_cache_option_is_accepted() {
        let cmd = Config::command();
        let mut envs = Vec::new();
        fn walk(cmd: &clap::Command, envs: &mut Vec<String>) {
            for a in cmd.get_arguments() {
                if let Some(e) = a.get_env() {
                    envs.push(e.to_string_lossy().into_owned());
                }
            }
            for s in cmd.get_subcommands() {
                walk(s, envs);
            }
        }
        walk(&cmd, &mut envs);
        let missing: Vec<_> = ZERO_CACHE_OPTIONS
            .iter()
            .filter(|n| !envs.iter().any(|e| e == *n))
            .collect();
        assert!(missing.is_empty(), "options not accepted: {missing:?}");
    }

    #[test]
    fn cvr_garbage_collection_settings_are_checked() {
        let parse = |extra: &[&str]| {
            let mut args = vec!["zero-cache", "--upstream-db", "postgres://u@127.0.0.1/db"];
            args.extend_from_slice(extra);
            Config::from_args(args.into_iter().map(String::from).collect())
        };
        let c = parse(&[]);
        assert_eq!(c.cvr_garbage_collection_inactivity_threshold_hours, 48.0);
        assert_eq!(c.cvr_garbage_collection_initial_interval_seconds, 60.0);
        assert_eq!(c.cvr_garbage_collection_initial_batch_size, 25);
        c.validate().expect("defaults are valid");
        for bad in ["0", "-2", "inf"] {
            let flag = format!("--cvr-garbage-collection-inactivity-threshold-hours={bad}");
            let c = parse(&[&flag]);
            let e = c.validate().expect_err(bad).to_string();
            assert!(
                e.contains("ZERO_CVR_GARBAGE_COLLECTION_INACTIVITY_THRESHOLD_HOURS"),
                "{e}"
            );
        }
        let c = parse(&["--upstream-type", "custom"]);
        assert!(
            c.validate()
                .expect_err("custom")
                .to_string()
                .contains("ZERO_UPSTREAM_TYPE")
        );
    }
}
