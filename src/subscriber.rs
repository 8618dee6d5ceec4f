//! The view-syncer role's replica (`ZERO_CHANGE_STREAMER_URI` set): no replication slot of its
//! own; it gets a replica from the replication manager's change streamer (or from the backup,
//! see [`crate::backup`]) and then commits the stream of transactions to it through the same
//! [`Applier`] the replicator uses. The rest of the server sees exactly what it sees in a
//! single node: the replica file, its change log and the watermark notifications.
//!
//! Reconnects resume from the replica's own committed watermark; a replica the manager can no
//! longer continue (other initial sync, log purged) is replaced by a snapshot. Configuration
//! mismatches (protocol version, app or shard) stop the process with the manager's message.

use std::path::{Path, PathBuf};
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, watch};
use tokio_tungstenite::tungstenite::Message;
use tracing::{error, info, warn};

use crate::change_streamer::{CHANGE_STREAM_PROTOCOL, Control, Hello, stream_path};
use crate::changelog::{self, Change};
use crate::initial_sync::remove_replica_files;
use crate::replica::{self, Applier, ReplicaError, ReplicaState};

/// Settings of the view-syncer role's replica.
#[derive(Debug, Clone)]
pub struct SubscriberConfig {
    /// Where the change streamer is.
    pub source: StreamerSource,
    /// Local replica file.
    pub replica_file: PathBuf,
    /// `ZERO_APP_ID`.
    pub app_id: String,
    /// `ZERO_SHARD_NUM`.
    pub shard_num: u32,
    /// Where to restore a missing replica from before subscribing (`ZERO_LITESTREAM_BACKUP_URL`).
    pub backup: Option<crate::backup::BackupConfig>,
}

/// How the view syncer finds the replication manager's change streamer.
#[derive(Debug, Clone)]
pub enum StreamerSource {
    /// `ZERO_CHANGE_STREAMER_URI` (`http://host:port`).
    Uri(String),
    /// `ZERO_CHANGE_STREAMER_MODE=discover`: the address the manager published in `schema`
    /// (`"{app}_{shard}/cdc"`) of `db` (`ZERO_CHANGE_DB`, else upstream), read again before
    /// every connection so that a manager that moved is found.
    Discover {
        /// The database to read.
        db: Box<crate::pgconn::UpstreamConfig>,
        /// Its cdc schema.
        schema: String,
    },
}

impl StreamerSource {
    async fn url(&self) -> Result<String, SubscriberError> {
        match self {
            StreamerSource::Uri(u) => stream_url(u),
            StreamerSource::Discover { db, schema } => {
                let uri = crate::change_db::discover(db, schema)
                    .await
                    .map_err(SubscriberError::Transient)?;
                info!(uri = %uri, "discovered the replication manager");
                stream_url(&uri)
            }
        }
    }
}

/// Errors that stop the view-syncer role.
#[derive(Debug, thiserror::Error)]
pub enum SubscriberError {
    /// The configuration cannot work (retrying will not help).
    #[error("change streamer: {0}")]
    Fatal(String),
    /// The replica failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A transient failure (connection, I/O): reconnect.
    #[error("change streamer: {0}")]
    Transient(String),
}

/// The WebSocket URL of the change stream behind `ZERO_CHANGE_STREAMER_URI`.
pub fn stream_url(uri: &str) -> Result<String, SubscriberError> {
    let rest = if let Some(r) = uri.strip_prefix("http://") {
        r
    } else if let Some(r) = uri.strip_prefix("ws://") {
        r
    } else {
        return Err(SubscriberError::Fatal(format!(
            "ZERO_CHANGE_STREAMER_URI {uri:?} must be an http:// (or ws://) URL of the replication manager's change-streamer port"
        )));
    };
    Ok(format!(
        "ws://{}{}",
        rest.trim_end_matches('/'),
        stream_path()
    ))
}

/// Runs until `shutdown` turns true; `watermarks` gets the replica's watermark once it is ready
/// and after every commit.
pub async fn run(
    cfg: SubscriberConfig,
    watermarks: watch::Sender<String>,
    shutdown: watch::Receiver<bool>,
) -> Result<(), SubscriberError> {
    if let StreamerSource::Uri(u) = &cfg.source {
        stream_url(u)?;
    }
    if let Some(b) = &cfg.backup
        && existing(&cfg.replica_file)?.is_none()
    {
        match crate::backup::restore(b, &cfg.replica_file).await {
            Ok(Some(state)) => {
                info!(watermark = %state.watermark, "replica restored from the backup")
            }
            Ok(None) => info!("no backup to restore; the replica comes from the change streamer"),
            Err(e) => {
                warn!(error = %e, "restoring from the backup failed; the replica comes from the change streamer")
            }
        }
    }
    let mut backoff = Duration::from_millis(100);
    loop {
        if *shutdown.borrow() {
            return Ok(());
        }
        let r = match cfg.source.url().await {
            Ok(url) => session(&cfg, &url, &watermarks, shutdown.clone()).await,
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => return Ok(()),
            Err(SubscriberError::Transient(e)) => {
                warn!(error = %e, retry_ms = backoff.as_millis() as u64, "change stream interrupted; reconnecting");
            }
            Err(e) => {
                error!(error = %e, "view syncer cannot follow the replication manager");
                return Err(e);
            }
        }
        let mut sd = shutdown.clone();
        tokio::select! {
            _ = tokio::time::sleep(backoff) => {}
            _ = crate::changelog::until(&mut sd) => return Ok(()),
        }
        backoff = (backoff * 2).min(Duration::from_secs(5));
    }
}

fn existing(path: &Path) -> Result<Option<ReplicaState>, ReplicaError> {
    if !path.exists() {
        return Ok(None);
    }
    replica::read_state(&replica::open(path)?)
}

fn transient(e: impl std::fmt::Display) -> SubscriberError {
    SubscriberError::Transient(e.to_string())
}

async fn session(
    cfg: &SubscriberConfig,
    url: &str,
    watermarks: &watch::Sender<String>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), SubscriberError> {
    let have = existing(&cfg.replica_file)?;
    let ws_cfg = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(None)
        .max_frame_size(None);
    let (mut ws, _) = match tokio_tungstenite::connect_async_with_config(url, Some(ws_cfg), false)
        .await
    {
        Ok(c) => c,
        Err(tokio_tungstenite::tungstenite::Error::Http(resp)) => {
            return Err(SubscriberError::Fatal(format!(
                "{url} answered HTTP {}: ZERO_CHANGE_STREAMER_URI must point at the replication manager's change-streamer port (ZERO_CHANGE_STREAMER_PORT, default 4849)",
                resp.status()
            )));
        }
        Err(e) => return Err(transient(format!("{url}: {e}"))),
    };
    let hello = Hello {
        kind: "hello".into(),
        protocol: CHANGE_STREAM_PROTOCOL,
        app_id: cfg.app_id.clone(),
        shard_num: cfg.shard_num,
        replica_version: have.as_ref().map(|s| s.replica_version.clone()),
        watermark: have.as_ref().map(|s| s.watermark.clone()),
    };
    ws.send(Message::Text(
        serde_json::to_string(&hello).expect("serializes").into(),
    ))
    .await
    .map_err(transient)?;
    let first = next_control(&mut ws).await?;
    match first {
        Control::Error { kind, message } => {
            return Err(SubscriberError::Fatal(format!("{kind}: {message}")));
        }
        Control::Resume { watermark, .. } => {
            info!(watermark = %watermark, "resuming the change stream");
        }
        Control::Snapshot {
            replica_version,
            watermark,
            size,
        } => {
            info!(%replica_version, %watermark, bytes = size, "receiving a replica snapshot");
            receive_snapshot(&mut ws, &cfg.replica_file, size).await?;
        }
        other => return Err(transient(format!("unexpected first message {other:?}"))),
    }
    let state = existing(&cfg.replica_file)?
        .ok_or_else(|| transient("the replica is incomplete after the snapshot"))?;
    // One thread applies transactions; the bounded channel stops reading the socket (and so the
    // manager's sending) while it is behind.
    let (tx_send, mut tx_recv) = mpsc::channel::<(String, Vec<Change>)>(16);
    let path = cfg.replica_file.clone();
    let wm = watermarks.clone();
    let applier = tokio::task::spawn_blocking(move || {
        let conn = replica::open(&path)?;
        let mut applier = Applier::new(conn, &state);
        wm.send_replace(applier.watermark().to_string());
        while let Some((version, changes)) = tx_recv.blocking_recv() {
            if changelog::replay(&mut applier, &version, &changes)? {
                wm.send_replace(version);
            }
        }
        Ok::<(), ReplicaError>(())
    });
    let result = loop {
        let msg = tokio::select! {
            m = ws.next() => m,
            _ = crate::changelog::until(&mut shutdown) => {
                let _ = ws.close(None).await;
                break Ok(());
            }
        };
        let text = match msg {
            Some(Ok(Message::Text(t))) => t,
            Some(Ok(Message::Close(_))) | None => {
                break Err(transient("the replication manager closed the stream"));
            }
            Some(Ok(_)) => continue,
            Some(Err(e)) => break Err(transient(e)),
        };
        #[derive(serde::Deserialize)]
        struct Tx {
            #[serde(rename = "type")]
            kind: String,
            version: Option<String>,
            changes: Option<Vec<Change>>,
        }
        let tx: Tx = match serde_json::from_str(&text) {
            Ok(t) => t,
            Err(e) => break Err(transient(format!("bad message: {e}"))),
        };
        match (tx.kind.as_str(), tx.version, tx.changes) {
            ("tx", Some(v), Some(c)) => {
                if tx_send.send((v, c)).await.is_err() {
                    break Err(transient("the replica applier stopped"));
                }
            }
            ("status", ..) => {}
            ("reset", ..) => {
                warn!("the replication manager's replica was replaced; getting a new snapshot");
                drop(tx_send);
                let _ = applier.await;
                remove_replica_files(&cfg.replica_file).map_err(transient)?;
                return Err(transient("reset by the replication manager"));
            }
            (other, ..) => break Err(transient(format!("unexpected message type {other:?}"))),
        }
    };
    drop(tx_send);
    match applier.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e.into()),
        Err(e) => return Err(transient(format!("applier thread: {e}"))),
    }
    result
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

async fn next_control(ws: &mut Ws) -> Result<Control, SubscriberError> {
    loop {
        match tokio::time::timeout(Duration::from_secs(600), ws.next()).await {
            Err(_) => return Err(transient("no answer from the replication manager")),
            Ok(Some(Ok(Message::Text(t)))) => {
                return serde_json::from_str(&t)
                    .map_err(|e| transient(format!("bad control message: {e}")));
            }
            Ok(Some(Ok(Message::Close(_)))) | Ok(None) => {
                return Err(transient("the replication manager closed the stream"));
            }
            Ok(Some(Ok(_))) => continue,
            Ok(Some(Err(e))) => return Err(transient(e)),
        }
    }
}

async fn receive_snapshot(ws: &mut Ws, replica: &Path, size: u64) -> Result<(), SubscriberError> {
    let mut tmp = replica.as_os_str().to_owned();
    tmp.push(".download");
    let tmp = PathBuf::from(tmp);
    let mut f = tokio::fs::File::create(&tmp).await.map_err(transient)?;
    let mut got = 0u64;
    loop {
        match ws.next().await {
            Some(Ok(Message::Binary(b))) => {
                got += b.len() as u64;
                f.write_all(&b).await.map_err(transient)?;
            }
            Some(Ok(Message::Text(t))) => match serde_json::from_str::<Control>(&t) {
                Ok(Control::SnapshotEnd) => break,
                _ => return Err(transient(format!("unexpected message in snapshot: {t}"))),
            },
            Some(Ok(_)) => continue,
            Some(Err(e)) => return Err(transient(e)),
            None => return Err(transient("stream closed during the snapshot")),
        }
    }
    if got != size {
        return Err(transient(format!(
            "snapshot of {got} bytes, expected {size}"
        )));
    }
    f.sync_all().await.map_err(transient)?;
    drop(f);
    install(&tmp, replica).map_err(transient)?;
    Ok(())
}

/// Moves a complete replica file into place (replacing any old one with its WAL).
pub fn install(tmp: &Path, replica: &Path) -> std::io::Result<()> {
    remove_replica_files(replica)?;
    std::fs::rename(tmp, replica)?;
    if let Some(dir) = replica.parent().filter(|d| !d.as_os_str().is_empty())
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(())
}
