//! The replication manager: makes sure a valid replica exists (initial sync, or resync when the
//! old one cannot continue), then streams changes into it, reconnecting after transient
//! failures.

use std::path::Path;
use std::time::Duration;

use tokio::sync::watch;
use tracing::{error, info, warn};

use crate::initial_sync::{self, SyncError, SyncOptions};
use crate::pgconn::UpstreamConfig;
use crate::replica::{self, Applier, ReplicaError, ReplicaState};
use crate::replication::{StreamError, StreamOutcome, stream_changes};
use crate::upstream;
use crate::upstream::Shard;

/// Settings of the replication manager.
#[derive(Debug, Clone)]
pub struct ReplicatorConfig {
    /// Upstream database.
    pub upstream: UpstreamConfig,
    /// Shard identity.
    pub shard: Shard,
    /// Initial sync settings (including the replica file).
    pub sync: SyncOptions,
    /// Resync automatically when the replica cannot continue.
    pub auto_reset: bool,
    /// VACUUM the replica at startup when at least this many hours passed since the last one.
    pub vacuum_interval_hours: Option<f64>,
    /// How often to send a lag report through the replication stream (`None`: never).
    pub lag_report_interval: Option<std::time::Duration>,
    /// `ZERO_UPSTREAM_PG_STREAM_INBOUND_TIMEOUT_MS`: a stream silent this long (not even a
    /// keepalive) is presumed dead and reconnected; `None`: twice upstream's
    /// `wal_sender_timeout`; zero: never.
    pub stream_inbound_timeout_ms: Option<u64>,
    /// Counters the replicator keeps for monitoring.
    pub stats: std::sync::Arc<ReplicationStats>,
    /// Keep the change log in the replica for view syncers and backups (replication manager).
    pub change_log: bool,
    /// Restore a missing replica from this backup before falling back to initial sync.
    pub backup: Option<crate::backup::BackupConfig>,
    /// When set, the slot is acknowledged no further than this watermark (the newest one the
    /// backup holds), so that a restored replica can always continue from the slot.
    pub ack_limit: Option<watch::Receiver<String>>,
    /// `ZERO_CHANGE_DB` on a replication manager: the change log goes there instead of into
    /// the replica (see [`crate::change_db`]).
    pub change_db: Option<ChangeDbTarget>,
}

/// The change DB a replication manager writes, with its identity there.
#[derive(Clone)]
pub struct ChangeDbTarget {
    /// The pool.
    pub db: std::sync::Arc<crate::change_db::ChangeDb>,
    /// This manager's task id (`replicationState.owner`).
    pub owner: String,
    /// Its change streamer's `host:port` (`replicationState.ownerAddress`).
    pub address: String,
}

impl std::fmt::Debug for ChangeDbTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeDbTarget")
            .field("owner", &self.owner)
            .field("address", &self.address)
            .finish_non_exhaustive()
    }
}

/// Replication figures for monitoring (`/statz`, logs, tests).
#[derive(Debug, Default)]
pub struct ReplicationStats {
    /// Lag reports received back through the stream.
    pub lag_reports: std::sync::atomic::AtomicU64,
    /// Milliseconds between sending the latest lag report upstream and receiving it.
    pub last_lag_ms: std::sync::atomic::AtomicI64,
    /// Transactions applied to the replica.
    pub transactions: std::sync::atomic::AtomicU64,
}

/// Errors that stop the replication manager.
#[derive(Debug, thiserror::Error)]
pub enum ReplicatorError {
    /// Initial sync failed.
    #[error(transparent)]
    Sync(#[from] SyncError),
    /// The replica file failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The replica cannot continue and `ZERO_AUTO_RESET` is off.
    #[error("{0}; set ZERO_AUTO_RESET=true to resync automatically, or delete the replica file")]
    ResetDisabled(String),
    /// Streaming failed permanently.
    #[error(transparent)]
    Stream(#[from] StreamError),
    /// The change DB cannot be used (another manager took it over, or it holds the log of
    /// another replica).
    #[error(transparent)]
    ChangeDb(#[from] crate::change_db::ChangeDbError),
}

/// Ensures the upstream is set up and a valid replica exists, syncing (or resyncing) if needed;
/// returns its state.
pub async fn ensure_replica(cfg: &ReplicatorConfig) -> Result<ReplicaState, ReplicatorError> {
    let mut client = cfg.upstream.connect().await.map_err(SyncError::from)?;
    upstream::check_requirements(&client)
        .await
        .map_err(SyncError::from)?;
    upstream::setup(&mut client, &cfg.shard)
        .await
        .map_err(SyncError::from)?;
    let path = &cfg.sync.replica_file;
    if let Some(b) = &cfg.backup
        && existing_state(path)?.is_none()
    {
        match crate::backup::restore(b, path).await {
            Ok(Some(_)) => {}
            Ok(None) => info!("no backup to restore from; running initial sync"),
            Err(e) => warn!(error = %e, "restoring from the backup failed; running initial sync"),
        }
    }
    if let Some(state) = existing_state(path)? {
        match invalid_reason(&client, cfg, &state)
            .await
            .map_err(SyncError::from)?
        {
            None => {
                // Slots of replicas replaced while a killed process still held them.
                initial_sync::drop_other_slots(&client, &cfg.shard, &state.slot).await;
                if let Some(hours) = cfg.vacuum_interval_hours {
                    replica::vacuum_if_due(path, hours)?;
                }
                return Ok(state);
            }
            Some(why) => {
                if !cfg.auto_reset {
                    return Err(ReplicatorError::ResetDisabled(why));
                }
                warn!(reason = %why, "resyncing replica");
            }
        }
    }
    Ok(initial_sync::run(&cfg.upstream, &cfg.shard, &cfg.sync).await?)
}

/// Why an existing replica cannot continue from this upstream, if it cannot.
async fn invalid_reason(
    client: &tokio_postgres::Client,
    cfg: &ReplicatorConfig,
    state: &ReplicaState,
) -> Result<Option<String>, tokio_postgres::Error> {
    if state.publications != cfg.shard.publications() {
        return Ok(Some(format!(
            "replica publications {:?} differ from the configured {:?}",
            state.publications,
            cfg.shard.publications()
        )));
    }
    let slot = client
        .query_opt(
            "SELECT 1 FROM pg_replication_slots WHERE slot_name = $1 AND database = current_database()",
            &[&state.slot],
        )
        .await?;
    if slot.is_none() {
        return Ok(Some(format!(
            "replication slot \"{}\" no longer exists upstream",
            state.slot
        )));
    }
    let registered = client
        .query_opt(
            &format!(
                "SELECT 1 FROM {}.replicas WHERE slot = $1 AND version = $2",
                upstream::quote_ident(&cfg.shard.schema())
            ),
            &[&state.slot, &state.replica_version],
        )
        .await?;
    if registered.is_none() {
        return Ok(Some(format!(
            "replica version {} is not registered upstream (the replica belongs to another upstream)",
            state.replica_version
        )));
    }
    Ok(None)
}

fn existing_state(path: &Path) -> Result<Option<ReplicaState>, ReplicaError> {
    if !path.exists() {
        return Ok(None);
    }
    let conn = replica::open(path)?;
    let state = replica::read_state(&conn)?;
    if state.is_none() {
        warn!(file = %path.display(), "replica file is incomplete; it will be replaced");
    }
    Ok(state)
}

/// Runs the replication manager until `shutdown` turns true. `watermarks` receives the replica's
/// watermark once it is ready (valid and streaming) and after every commit.
pub async fn run(
    cfg: ReplicatorConfig,
    watermarks: watch::Sender<String>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), ReplicatorError> {
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let state = ensure_replica(&cfg).await?;
        info!(
            replica_version = %state.replica_version,
            watermark = %state.watermark,
            file = %cfg.sync.replica_file.display(),
            "replica ready"
        );
        // The change DB is reconciled with the replica before anything streams.
        let claimed = match &cfg.change_db {
            None => None,
            Some(t) => match t
                .db
                .claim(
                    &t.owner,
                    &t.address,
                    &state.replica_version,
                    &state.publications,
                    &state.watermark,
                    cfg.auto_reset,
                )
                .await
            {
                Ok(c) => Some(c),
                Err(e) if e.is_fatal() => return Err(e.into()),
                Err(e) => {
                    error!(error = %e, retry_ms = backoff.as_millis() as u64, "change DB unavailable; retrying");
                    if !wait_before_retry(&mut backoff, &shutdown).await {
                        return Ok(());
                    }
                    continue;
                }
            },
        };
        let rt = tokio::runtime::Handle::current();
        let thread_cfg = cfg.clone();
        let thread_wm = watermarks.clone();
        let thread_shutdown = shutdown.clone();
        let result = tokio::task::spawn_blocking(move || {
            let conn = replica::open(&thread_cfg.sync.replica_file)?;
            if thread_cfg.change_log && thread_cfg.change_db.is_none() {
                crate::changelog::enable(&conn, &state.watermark)?;
            } else {
                // A log that stops being written would have a gap: drop it.
                crate::changelog::disable(&conn)?;
            }
            let mut applier = Applier::new(conn, &state);
            if let (Some(t), Some(claimed)) = (&thread_cfg.change_db, claimed) {
                let n = claimed.pending.len();
                for (version, json) in claimed.pending {
                    let changes: Vec<crate::changelog::Change> = serde_json::from_str(&json)
                        .map_err(|e| {
                            StreamError::Data(format!("change DB entry {version}: {e}"))
                        })?;
                    crate::changelog::replay(&mut applier, &version, &changes)?;
                }
                if n > 0 {
                    info!(
                        transactions = n,
                        watermark = %applier.watermark(),
                        "replica caught up with the change DB"
                    );
                }
                applier.set_sink(crate::change_db::ChangeSink::new(
                    rt.clone(),
                    t.db.clone(),
                    t.owner.clone(),
                ));
            }
            let r = stream_changes(
                &rt,
                &thread_cfg,
                &state,
                &mut applier,
                &thread_wm,
                thread_shutdown,
            );
            Ok::<_, ReplicatorError>(r)
        })
        .await
        .map_err(|e| ReplicatorError::Stream(StreamError::Data(format!("stream thread: {e}"))))??;
        match result {
            Ok(StreamOutcome::Shutdown) => return Ok(()),
            Err(StreamError::Replica(ReplicaError::ChangeDb(e))) if e.is_fatal() => {
                return Err(e.into());
            }
            Err(StreamError::ResetRequired(why)) => {
                if !cfg.auto_reset {
                    return Err(ReplicatorError::ResetDisabled(why));
                }
                warn!(reason = %why, "replica cannot continue; resyncing");
                initial_sync::remove_replica_files(&cfg.sync.replica_file)
                    .map_err(|e| ReplicatorError::Sync(SyncError::Io(e)))?;
            }
            Err(e) => {
                error!(error = %e, retry_ms = backoff.as_millis() as u64, "replication stream failed; reconnecting");
                if !wait_before_retry(&mut backoff, &shutdown).await {
                    return Ok(());
                }
                continue;
            }
        }
        backoff = Duration::from_millis(100);
    }
}

/// Sleeps for `backoff` and doubles it (up to 10 s), so a flapping upstream or change DB is
/// retried without a busy loop; false when shutdown was asked for meanwhile.
async fn wait_before_retry(backoff: &mut Duration, shutdown: &watch::Receiver<bool>) -> bool {
    let mut sd = shutdown.clone();
    tokio::select! {
        _ = tokio::time::sleep(*backoff) => {}
        _ = sd.wait_for(|s| *s) => return false,
    }
    *backoff = (*backoff * 2).min(Duration::from_secs(10));
    true
}
