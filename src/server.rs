//! The process supervisor: validates configuration, starts the replication manager and stops
//! everything when the shutdown future completes.

use std::future::Future;

use tokio::sync::watch;
use tracing::info;

use crate::config::{Config, ConfigError};
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
    })
}

/// Runs the server until `shutdown` completes or a fatal error occurs.
pub async fn run(config: Config, shutdown: impl Future<Output = ()>) -> Result<(), ServerError> {
    let rcfg = replicator_config(&config)?;
    info!(
        upstream = %rcfg.upstream.display(),
        app_id = %config.app_id,
        shard_num = config.shard_num,
        replica_file = %config.replica_file.display(),
        "starting zero-cache"
    );
    let (wm_tx, wm_rx) = watch::channel(String::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    // The sync server binds first so that a taken port fails fast, before any replication.
    let sync_server =
        crate::sync::bind(crate::sync::SyncOptions::from_config(&config), wm_rx).await?;
    let mut sync_stop = stop_rx.clone();
    let sync_task = tokio::spawn(sync_server.serve(async move {
        let _ = sync_stop.wait_for(|s| *s).await;
    }));
    let repl = tokio::spawn(replicator::run(rcfg, wm_tx, stop_rx));
    tokio::pin!(shutdown);
    tokio::pin!(repl);
    tokio::select! {
        _ = &mut shutdown => {
            info!("shutting down");
            stop_tx.send_replace(true);
            let _ = repl.await;
            let _ = sync_task.await;
            Ok(())
        }
        r = &mut repl => {
            stop_tx.send_replace(true);
            match r {
                Ok(r) => Ok(r?),
                Err(e) => Err(ServerError::Replicator(ReplicatorError::Stream(
                    crate::replication::StreamError::Data(format!("replicator task: {e}")),
                ))),
            }
        }
    }
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
