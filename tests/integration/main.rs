//! The integration test binary: every test here runs against a real Postgres cluster started by
//! the harness in `tests/support`.

#[path = "../support/mod.rs"]
mod support;

/// Initial sync, streaming and restart of the replica.
mod replication;

/// Zero's type mapping, through binary COPY, text COPY and pgoutput.
mod types;

/// Random inserts, updates, deletes and truncates over several tables.
mod workload;

/// kill -9 of the server at random points, then restart.
mod crash;

/// Upstream DDL while streaming, with and without event triggers.
mod schema_changes;

/// Bad configuration and bad upstream set-ups, and replicas that cannot continue.
mod setup_errors;

/// The analyze-query tool against the SQL oracle.
mod analyze_query;

/// Helpers for the sync-server tests (server start-up, a WebSocket client).
mod sync_util;

/// The sync protocol: HTTP endpoints, handshakes, messages, pokes, catch-up.
mod sync_protocol;

/// Garbage collection of client view records.
mod cvr_gc;

/// OpenTelemetry trace export (`OTEL_*`).
mod telemetry;

/// Upstream connections over TLS (`sslmode`, `sslrootcert`).
mod tls;

/// The real @rocicorp/zero client (Node) against the sync server.
mod sync_e2e;

/// The recorded real-client session replayed against the sync server.
mod sync_trace;

/// Custom queries, pushes and TTLs with fake API servers.
mod sync_api;

/// The inspector protocol: authentication, queries, metrics, version, analyze-query.
mod sync_inspect;

/// `server::run` with the sync server on `ZERO_PORT`.
mod sync_server;

/// Writes with the real client and a real API server (`@rocicorp/zero/server`).
mod writes_e2e;

/// JWT auth, pinning, expiry, CRUD mutations with write permissions and rate limits.
mod sync_auth;

/// Replication manager + view syncers as separate processes; backup and restore.
mod roles;

/// `ZERO_CHANGE_DB`, change-streamer discovery, kill -9 of the manager.
mod change_db;
