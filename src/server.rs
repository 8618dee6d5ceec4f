//! The process supervisor: validates configuration, starts what this process's role runs
//! (see [`Role`]) and stops everything when the shutdown future completes.
//!
//! - Single node: replicator + sync server.
//! - Replication manager (`ZERO_NUM_SYNC_WORKERS=0`): replicator with the change log, change
//!   streamer on `ZERO_CHANGE_STREAMER_PORT`, backups; no client sync.
//! - View syncer (`ZERO_CHANGE_STREAMER_URI`): subscriber (replica from the manager) + sync
//!   server.

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
        lag_report_interval: (config.replication_lag_report_interval_ms > 0).then(|| {
            std::time::Duration::from_millis(config.replication_lag_report_interval_ms as u64)
        }),
        stats: Default::default(),
        change_log: config.role() == Role::ReplicationManager,
        backup: config.backup(),
        ack_limit: None,
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
    if config.change_streamer_mode == "discover" && role != Role::ReplicationManager {
        tracing::warn!(
            "ZERO_CHANGE_STREAMER_MODE=discover is not supported: set ZERO_CHANGE_STREAMER_URI on view syncers"
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
            let scfg = crate::subscriber::SubscriberConfig {
                uri: config
                    .change_streamer_uri
                    .clone()
                    .expect("the view-syncer role has a URI"),
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
            let streamer = crate::change_streamer::bind(
                crate::change_streamer::ChangeStreamerOptions {
                    addr,
                    replica_file: config.replica_file.clone(),
                    app_id: config.app_id.clone(),
                    shard_num: config.shard_num,
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
                tasks.push(tokio::spawn(async move {
                    if let Err(e) = crate::backup::run(b, file, wm, backed_tx, sd).await {
                        tracing::error!(error = %e, "backups stopped");
                    }
                }));
            }
            tasks.push(tokio::spawn(purge_change_log(
                config.replica_file.clone(),
                rcfg.ack_limit.clone(),
                wm_rx.clone(),
                stop_rx.clone(),
            )));
            tokio::spawn(async move { Ok(replicator::run(rcfg, wm_tx, stop_rx.clone()).await?) })
        }
    };
    tokio::pin!(shutdown);
    tokio::pin!(main);
    let result = tokio::select! {
        _ = &mut shutdown => {
            info!("shutting down");
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

/// How long the replication manager keeps transactions in its change log for view syncers that
/// reconnect (older ones get a snapshot instead).
const CHANGE_LOG_RETENTION: std::time::Duration = std::time::Duration::from_secs(3600);

/// Purges the change log every minute: entries older than [`CHANGE_LOG_RETENTION`] and, with
/// backups, only those the backup already holds.
async fn purge_change_log(
    replica_file: std::path::PathBuf,
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
        let file = replica_file.clone();
        let r = tokio::task::spawn_blocking(move || {
            let conn = crate::replica::open(&file)?;
            let before = crate::replica::now_ms() - CHANGE_LOG_RETENTION.as_millis() as i64;
            crate::changelog::purge(&conn, &upto, before)
        })
        .await;
        match r {
            Ok(Ok(n)) if n > 0 => tracing::debug!(entries = n, "change log purged"),
            Ok(Err(e)) => tracing::warn!(error = %e, "purging the change log failed"),
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

/// Installs the `tracing` subscriber for the configured level and format.
pub fn init_logging(config: &Config) {
    use tracing_subscriber::EnvFilter;
    let filter = EnvFilter::try_from_env("RUST_LOG").unwrap_or_else(|_| {
        EnvFilter::new(format!(
            "{},pgwire_replication=warn,tokio_postgres=warn",
            config.log_level.as_filter()
        ))
    });
    use std::io::IsTerminal;
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    match config.log_format {
        crate::config::LogFormat::Json => builder.json().init(),
        crate::config::LogFormat::Text => builder.init(),
    }
}
