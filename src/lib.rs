//! `zero-cache`: a sync server for Zero apps, a drop-in replacement for Rocicorp's zero-cache.
//!
//! # Layout
//! - [`config`]: every `ZERO_*` option, from environment, `.env` and flags.
//! - [`upstream`]: the app and shard schemas, publications, DDL triggers and slots upstream.
//! - [`pgconn`]: SQL and replication connections to upstream.
//! - [`schema`]: the published schema and its mapping onto replica tables and types.
//! - [`procstat`]: this process's memory figures.
//! - [`pgvalue`]: conversion of upstream values into replica values.
//! - [`initial_sync`]: copying a slot's snapshot into a new replica file.
//! - [`replication`]: decoding pgoutput and applying the stream to the replica.
//! - [`replica`]: the SQLite replica's layout and its transactional applier.
//! - [`replicator`]: the replication manager tying these together.
//! - [`changelog`]: the replication manager's log of committed transactions (in the replica).
//! - [`change_streamer`]: the replication manager's service for view syncers (port 4849).
//! - [`subscriber`]: the view-syncer role's replica, fed by the change streamer.
//! - [`backup`]: replica snapshots and change segments in an object store; restore.
//! - [`sync`]: the sync server (HTTP/WebSocket, protocol, CVRs, pokes).
//! - [`server`]: the process supervisor (`server::run`).
//! - [`demo`]: the zbugs-like demo and benchmark dataset.
//! - [`devpg`]: a private Postgres cluster for `zero-cache-dev` and tests.
//! - [`version`]: LSNs and lexi-encoded versions.
//! - [`zql`]: the replica as a ZQL schema and rows of ZQL values.

pub mod backup;
pub mod change_db;
pub mod change_streamer;
pub mod changelog;
pub mod config;
pub mod demo;
pub mod devpg;
pub mod initial_sync;
pub mod pgconn;
pub mod pgvalue;
pub mod procstat;
pub mod replica;
pub mod replication;
pub mod replicator;
pub mod schema;
pub mod server;
pub mod subscriber;
pub mod sync;
pub mod telemetry;
pub mod upstream;
pub mod version;
pub mod zql;
