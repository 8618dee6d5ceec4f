//! The process supervisor: validates configuration, starts what this process's role runs
//! (see [`Role`]) and stops everything when the shutdown future completes.
//!
//! - Single node: replicator + sync server.
//! - Replication manager (`ZERO_NUM_SYNC_WORKERS=0`): replicator with the change log (in the
//!   replica, or in `ZERO_CHANGE_DB`), change streamer on `ZERO_CHANGE_STREAMER_PORT` (address
//!   published for discovery), backups; no client sync.
//! - View syncer (`ZERO_CHANGE_STREAMER_URI`, or `ZERO_CHANGE_STREAMER_MODE=discover`):
//!   subscriber (replica from the manager) + sync server.

use std::future::Future;

use tokio::sync::watch;
use tracing::info;

use crate::config::{Config, ConfigError, Role};
use crate::initial_sync::SyncOptions;
use crate::pgconn::{UpstreamConfig, UriError};
use crate::replicator::{self, ReplicatorConfig, ReplicatorError};

/// Why the server stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    /// The configuration is not usable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The upstream URI is not usable.
    #[error(transparent)]
    Uri(#[from] UriError),
    /// Replication failed.
    #[error(transparent)]
    Replicator(#[from] ReplicatorError),
    /// The sync server failed.
    #[error(transparent)]
    Sync(#[from] crate::sync::SyncError),
    /// The view syncer cannot follow the replication manager.
    #[error(transparent)]
    Subscriber(#[from] crate::subscriber::SubscriberError),
    /// The change streamer could not serve.
    #[error("change streamer: {0}")]
    ChangeStreamer(std::io::Error),
    /// The change DB cannot be used.
    #[error(transparent)]
    ChangeDb(#[from] crate::change_db::ChangeDbError),
}

/// Builds the replication manager's settings from the configuration.
pub fn replicator_config(config: &Config) -> Result<ReplicatorConfig, ServerError> {
    config.validate()?;
    Ok(ReplicatorConfig {
        upstream: UpstreamConfig::parse(config.upstream())?,
        shard: config.shard(),
        sync: SyncOptions {
            replica_file: config.replica_file.clone(),
            // Copy workers share the upstream connection budget with the replicator's own two.
            workers: config
                .initial_sync_table_copy_workers
                .min(config.upstream_max_conns.saturating_sub(2).max(1))
                as usize,
            text_copy: config.initial_sync_text_copy,
            failover: config.upstream_pg_replication_slot_failover,
        },
        auto_reset: config.auto_reset,
        vacuum_interval_hours: config.replica_vacuum_interval_hours,
        stream_inbound_timeout_ms: config.upstream_pg_stream_inbound_timeout_ms,
        lag_report_interval: (config.replication_lag_report_interval_ms > 0).then(|| {
            std::time::Duration::from_millis(config.replication_lag_report_interval_ms as u64)
        }),
        stats: Default::default(),
        change_log: config.role() == Role::ReplicationManager,
        backup: config.backup(),
        ack_limit: None,
        change_db: None,
    })
}

/// Runs the server until `shutdown` completes or a fatal error occurs.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let mut rcfg = replicator_config(&config)?;
    let role = config.role();
    info!(
        upstream = %rcfg.upstream.display(),
        app_id = %config.app_id,
        shard_num = config.shard_num,
        replica_file = %config.replica_file.display(),
        role = ?role,
        "starting zero-cache"
    );
    if config.compat.websocket_compression {
        tracing::warn!(
            "ZERO_WEBSOCKET_COMPRESSION is not supported: client sockets stay uncompressed (clients accept that)"
        );
    }
    let (wm_tx, wm_rx) = watch::channel(String::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut tasks: Vec<tokio::task::JoinHandle<()>> = Vec::new();
    // Servers bind first so that a taken port fails fast, before any replication.
    if role != Role::ReplicationManager {
        let sync_server = crate::sync::bind(
            crate::sync::SyncOptions::from_config(&config),
            wm_rx.clone(),
        )
        .await?;
        let mut sync_stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let _ = sync_server
                .serve(async move {
                    let _ = sync_stop.wait_for(|s| *s).await;
                })
                .await;
        }));
    }
    let main: tokio::task::JoinHandle<Result<(), ServerError>> = match role {
        Role::ViewSyncer => {
            let source = match &config.change_streamer_uri {
                Some(uri) => crate::subscriber::StreamerSource::Uri(uri.clone()),
                None => crate::subscriber::StreamerSource::Discover {
                    db: Box::new(config.discovery_db()?),
                    schema: crate::change_db::cdc_schema(&config.app_id, config.shard_num),
                },
            };
            let scfg = crate::subscriber::SubscriberConfig {
                source,
                replica_file: config.replica_file.clone(),
                app_id: config.app_id.clone(),
                shard_num: config.shard_num,
                backup: config.backup(),
            };
            tokio::spawn(
                async move { Ok(crate::subscriber::run(scfg, wm_tx, stop_rx.clone()).await?) },
            )
        }
        Role::SingleNode => {
            tokio::spawn(async move { Ok(replicator::run(rcfg, wm_tx, stop_rx.clone()).await?) })
        }
        Role::ReplicationManager => {
            let addr = std::net::SocketAddr::new(
                std::net::IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED),
                config.change_streamer_port(),
            );
            let schema = crate::change_db::cdc_schema(&config.app_id, config.shard_num);
            let address = config.change_streamer_address();
            let owner = format!(
                "{address}/{}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            );
            let log = match config.change_db() {
                Some(cdb) => {
                    let db = crate::change_db::ChangeDb::open(
                        cdb,
                        schema.clone(),
                        config.change_max_conns as usize,
                    )
                    .await?;
                    info!(change_db = %db.display(), schema = %schema, address = %address, "change log in the change DB");
                    rcfg.change_db = Some(replicator::ChangeDbTarget {
                        db: db.clone(),
                        owner: owner.clone(),
                        address: address.clone(),
                    });
                    crate::change_db::LogStore::ChangeDb(db)
                }
                None => {
                    // The log stays in the replica; the address is still published (in the
                    // upstream database, Zero's default change DB) for discovering view syncers.
                    let db_cfg = config.discovery_db()?;
                    let (wm, sd) = (wm_rx.clone(), stop_rx.clone());
                    let (schema, owner, address) = (schema.clone(), owner.clone(), address.clone());
                    tasks.push(tokio::spawn(publish_address(
                        db_cfg, schema, owner, address, wm, sd,
                    )));
                    crate::change_db::LogStore::Replica(config.replica_file.clone())
                }
            };
            let streamer = crate::change_streamer::bind(
                crate::change_streamer::ChangeStreamerOptions {
                    addr,
                    replica_file: config.replica_file.clone(),
                    app_id: config.app_id.clone(),
                    shard_num: config.shard_num,
                    log: log.clone(),
                },
                wm_rx.clone(),
            )
            .await
            .map_err(ServerError::ChangeStreamer)?;
            let mut cs_stop = stop_rx.clone();
            tasks.push(tokio::spawn(async move {
                let _ = streamer
                    .serve(async move {
                        let _ = cs_stop.wait_for(|s| *s).await;
                    })
                    .await;
            }));
            let (backed_tx, backed_rx) = watch::channel(String::new());
            if let Some(b) = config.backup() {
                rcfg.ack_limit = Some(backed_rx.clone());
                let (file, wm, sd) = (config.replica_file.clone(), wm_rx.clone(), stop_rx.clone());
                let log = log.clone();
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = crate::backup::run(b, file, log, wm, backed_tx, sd).await {
                        tracing::error!(error = %e, "backups stopped");
                    }
                }));
            }
            tasks.push(tokio::spawn(purge_change_log(
                log,
                rcfg.ack_limit.clone(),
                wm_rx.clone(),
                stop_rx.clone(),
            )));
            tokio::spawn(async move { Ok(replicator::run(rcfg, wm_tx, stop_rx.clone()).await?) })
        }
    };
    tokio::pin!(shutdown);
    tokio::pin!(main);
    let lapsed = keepalive_lapsed(keepalive_timeout(&config));
    let result = tokio::select! {
        _ = &mut shutdown => {
            info!("shutting down");
            stop_tx.send_replace(true);
            let _ = (&mut main).await;
            Ok(())
        }
        _ = lapsed => {
            stop_tx.send_replace(true);
            let _ = (&mut main).await;
            Ok(())
        }
        r = &mut main => {
            match r {
                Ok(r) => r,
                Err(e) => Err(ServerError::Replicator(ReplicatorError::Stream(
                    crate::replication::StreamError::Data(format!("replicator task: {e}")),
                ))),
            }
        }
    };
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
    result
}

/// When `GET /keepalive` was last requested on either port (ms since the Unix epoch).
static LAST_KEEPALIVE_MS: std::sync::atomic::AtomicI64 = std::sync::atomic::AtomicI64::new(0);

/// Records a `GET /keepalive` (see [`Config`]'s `keepalive_timeout_ms`).
pub fn keepalive_hit() {
    LAST_KEEPALIVE_MS.store(
        crate::replica::now_ms(),
        std::sync::atomic::Ordering::Relaxed,
    );
}

/// `ZERO_KEEPALIVE_TIMEOUT_MS`, defaulting to 20 s on ECS as zero-cache does.
fn keepalive_timeout(config: &Config) -> Option<std::time::Duration> {
    let ms = match config.compat.keepalive_timeout_ms {
        Some(ms) => ms,
        None if std::env::var_os("ECS_CONTAINER_METADATA_URI_V4").is_some() => 20_000,
        None => 0,
    };
    (ms > 0).then(|| std::time::Duration::from_millis(ms))
}

/// Completes once `/keepalive` has gone unrequested for `timeout` (counted from now at the
/// start); never without a timeout.
async fn keepalive_lapsed(timeout: Option<std::time::Duration>) {
    let Some(timeout) = timeout else {
        return std::future::pending().await;
    };
    keepalive_hit();
    let check = (timeout / 4).clamp(
        std::time::Duration::from_millis(10),
        std::time::Duration::from_secs(1),
    );
    loop {
        tokio::time::sleep(check).await;
        let idle =
            crate::replica::now_ms() - LAST_KEEPALIVE_MS.load(std::sync::atomic::Ordering::Relaxed);
        if idle > timeout.as_millis() as i64 {
            tracing::warn!(
                idle_ms = idle,
                timeout_ms = timeout.as_millis() as u64,
                "no /keepalive request within ZERO_KEEPALIVE_TIMEOUT_MS: draining and exiting"
            );
            return;
        }
    }
}

/// How long the replication manager keeps transactions in its change log for view syncers that
/// reconnect (older ones get a snapshot instead).
const CHANGE_LOG_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

/// Purges the change log every minute: entries older than [`CHANGE_LOG_RETENTION`] and, with
/// backups, only those the backup already holds.
async fn purge_change_log(
    log: crate::change_db::LogStore,
    backed_up: Option<watch::Receiver<String>>,
    watermarks: watch::Receiver<String>,
    mut stop: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            _ = tokio::time::sleep(std::time::Duration::from_secs(60)) => {}
            _ = stop.wait_for(|s| *s) => return,
        }
        let upto = match &backed_up {
            Some(b) => b.borrow().clone(),
            None => watermarks.borrow().clone(),
        };
        if upto.is_empty() {
            continue;
        }
        let before = crate::replica::now_ms() - CHANGE_LOG_RETENTION.as_millis() as i64;
        match log.purge(&upto, before).await {
            Ok(n) if n > 0 => tracing::debug!(entries = n, "change log purged"),
            Err(e) => tracing::warn!(error = %e, "purging the change log failed"),
            _ => {}
        }
    }
}

/// Raises the soft limit on open files to the hard limit, as production servers do: every
/// client connection is a socket, and the default soft limit (often 1,024) would cap the
/// number of connected clients far below what the server can serve. Returns the limit now in
/// force (`None` when it cannot be read).
pub fn raise_open_files_limit() -> Option<u64> {
    use rustix::process::{Resource, Rlimit, getrlimit, setrlimit};
    let lim = getrlimit(Resource::Nofile);
    let (Some(cur), hard) = (lim.current, lim.maximum) else {
        return None;
    };
    let target = hard.unwrap_or(cur.max(1 << 20));
    if target > cur {
        let raised = Rlimit {
            current: Some(target),
            maximum: hard,
        };
        if setrlimit(Resource::Nofile, raised).is_ok() {
            return Some(target);
        }
    }
    Some(cur)
}

/// Publishes the change streamer's address in `"{app}_{shard}/cdc"."replicationState"` of
/// the upstream database once the replica is ready, for view syncers in discover mode (a
/// manager with `ZERO_CHANGE_DB` publishes it there when it claims the log). Failures are
/// logged: dedicated view syncers do not need it.
async fn publish_address(
    db: crate::pgconn::UpstreamConfig,
    schema: String,
    owner: String,
    address: String,
    mut watermarks: watch::Receiver<String>,
    mut stop: watch::Receiver<bool>,
) {
    tokio::select! {
        r = watermarks.wait_for(|w| !w.is_empty()) => { if r.is_err() { return; } }
        _ = stop.wait_for(|s| *s) => return,
    }
    let wm = watermarks.borrow().clone();
    let r = async {
        let db = crate::change_db::ChangeDb::open(db, schema, 1).await?;
        db.publish_address(&owner, &address, &wm).await
    }
    .await;
    match r {
        Ok(()) => info!(address = %address, "change streamer address published for discovery"),
        Err(e) => {
            tracing::warn!(error = %e, "cannot publish the change streamer address for discovery")
        }
    }
}

/// Installs the `tracing` subscriber for the configured level and format, plus OpenTelemetry
/// trace export when the `OTEL_*` environment asks for it (see [`crate::telemetry`]); the
/// returned handle flushes buffered spans at shutdown.
pub fn init_logging(
    config: &Config,
) -> Result<Option<crate::telemetry::Telemetry>, crate::telemetry::TelemetryError> {
    use tracing_subscriber::filter::Targets;
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::{EnvFilter, Layer};
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},pgwire_replication=warn,tokio_postgres=warn",
            config.log_level.as_filter()
        ))
    });
    use std::io::IsTerminal;
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match config.log_format {
        crate::config::LogFormat::Json => fmt.json().with_filter(filter).boxed(),
        crate::config::LogFormat::Text => fmt.with_filter(filter).boxed(),
    };
    let (otel, telemetry) = match crate::telemetry::layer()? {
        Some((layer, t)) => (
            Some(layer.with_filter(Targets::new().with_target("zero_cache", tracing::Level::INFO))),
            Some(t),
        ),
        None => (None, None),
    };
    tracing_subscriber::registry().with(fmt).with(otel).init();
    if telemetry.is_some() {
        info!("exporting traces over OTLP");
    }
    Ok(telemetry)
}
