//! The change streamer: the replication manager's service (port `ZERO_CHANGE_STREAMER_PORT`,
//! default `ZERO_PORT + 1`) from which view syncers get a replica and then every committed
//! transaction, in order, without a replication slot of their own.
//!
//! # Protocol (both ends are this binary)
//! A WebSocket at `/replication/changes` (the version travels in `hello`, so that a mismatch
//! gets a clear error rather than a 404), JSON text frames unless noted.
//! 1. The subscriber sends `hello`: `{"type":"hello","protocol":1,"appID","shardNum",
//!    "replicaVersion"?,"watermark"?}` — the replica it already has, if any.
//! 2. The streamer answers with one of:
//!    - `{"type":"error","kind","message"}` and closes: `VersionMismatch` (other protocol
//!      version), `WrongShard` (other `ZERO_APP_ID` / `ZERO_SHARD_NUM`). Not retryable.
//!    - `{"type":"resume","replicaVersion","watermark"}`: the subscriber's replica is of the
//!      same initial sync and the log holds every transaction after its watermark.
//!    - `{"type":"snapshot","replicaVersion","watermark","size"}`, then the replica file in
//!      binary frames, then `{"type":"snapshotEnd"}`: a consistent copy (`VACUUM INTO`) to
//!      replace the subscriber's replica.
//! 3. Then `{"type":"tx","version","changes":[…]}` for every transaction after that
//!    watermark, oldest first (see [`crate::changelog`] for `changes`), and
//!    `{"type":"status","watermark"}` every few seconds while idle. `{"type":"reset"}` says the
//!    manager's replica was replaced (resync): the subscriber reconnects and gets a snapshot.
//!
//! Transactions are read from the durable log (the replica's, or the change DB's with
//! `ZERO_CHANGE_DB`: [`crate::change_db::LogStore`]), never buffered per subscriber beyond
//! one bounded batch; a slow subscriber slows only its own socket (TCP back pressure), and a
//! reconnect resumes from the subscriber's own committed watermark, so nothing is lost or
//! applied twice (replay skips versions at or below the watermark).

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::response::IntoResponse;
use axum::routing::get;
use futures::{SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncReadExt;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::replica;

/// Version of the protocol between replication manager and view syncers.
pub const CHANGE_STREAM_PROTOCOL: u32 = 1;

/// The WebSocket path of the change stream.
pub fn stream_path() -> String {
    "/replication/changes".to_string()
}

/// Transactions per read from the log.
const BATCH_ENTRIES: usize = 256;
/// About this many bytes of changes per read from the log.
const BATCH_BYTES: usize = 4 << 20;
/// Snapshot chunk size.
const CHUNK: usize = 1 << 20;
/// Status interval while idle.
const STATUS_EVERY: Duration = Duration::from_secs(5);

/// The subscriber's first message.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Hello {
    /// Always `"hello"`.
    #[serde(rename = "type")]
    pub kind: String,
    /// [`CHANGE_STREAM_PROTOCOL`] of the subscriber.
    pub protocol: u32,
    /// `ZERO_APP_ID`.
    #[serde(rename = "appID")]
    pub app_id: String,
    /// `ZERO_SHARD_NUM`.
    pub shard_num: u32,
    /// The subscriber's replica, if it has one.
    pub replica_version: Option<String>,
    /// Its watermark.
    pub watermark: Option<String>,
}

/// Messages from the streamer (all but `tx`, which is written as raw JSON).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "camelCase")]
pub enum Control {
    /// Refused; not retryable.
    Error {
        /// `VersionMismatch`, `WrongShard` or `Internal`.
        kind: String,
        /// Why.
        message: String,
    },
    /// Continue from the subscriber's watermark.
    #[serde(rename_all = "camelCase")]
    Resume {
        /// Replica identity.
        replica_version: String,
        /// Where the stream starts (exclusive).
        watermark: String,
    },
    /// A replica file follows in binary frames.
    #[serde(rename_all = "camelCase")]
    Snapshot {
        /// Replica identity.
        replica_version: String,
        /// The snapshot's watermark; the stream continues after it.
        watermark: String,
        /// Bytes that follow.
        size: u64,
    },
    /// End of the snapshot's binary frames.
    SnapshotEnd,
    /// The streamer's current watermark (heartbeat).
    Status {
        /// Latest committed watermark.
        watermark: String,
    },
    /// The manager's replica was replaced: get a new snapshot.
    Reset {
        /// Why.
        message: String,
    },
}

/// Settings of the change streamer.
#[derive(Debug, Clone)]
pub struct ChangeStreamerOptions {
    /// Address to listen on.
    pub addr: SocketAddr,
    /// The manager's replica file.
    pub replica_file: PathBuf,
    /// `ZERO_APP_ID`.
    pub app_id: String,
    /// `ZERO_SHARD_NUM`.
    pub shard_num: u32,
    /// Where the transactions are read from (the replica's own log, or `ZERO_CHANGE_DB`).
    pub log: crate::change_db::LogStore,
}

struct Shared {
    opts: ChangeStreamerOptions,
    watermarks: watch::Receiver<String>,
    snapshots: AtomicU64,
    subscribers: AtomicU64,
    closing: watch::Receiver<bool>,
}

/// A bound change streamer.
pub struct ChangeStreamer {
    /// The address it listens on.
    pub addr: SocketAddr,
    listener: tokio::net::TcpListener,
    opts: ChangeStreamerOptions,
    watermarks: watch::Receiver<String>,
}

/// Binds the port.
pub async fn bind(
    opts: ChangeStreamerOptions,
    watermarks: watch::Receiver<String>,
) -> std::io::Result<ChangeStreamer> {
    let listener = tokio::net::TcpListener::bind(opts.addr).await?;
    let addr = listener.local_addr()?;
    info!(%addr, "change streamer listening");
    Ok(ChangeStreamer {
        addr,
        listener,
        opts,
        watermarks,
    })
}

impl ChangeStreamer {
    /// Serves until `shutdown` completes.
    pub async fn serve(
        self,
        shutdown: impl std::future::Future<Output = ()> + Send + 'static,
    ) -> std::io::Result<()> {
        let (close_tx, close_rx) = watch::channel(false);
        let shared = Arc::new(Shared {
            opts: self.opts,
            watermarks: self.watermarks,
            snapshots: AtomicU64::new(0),
            subscribers: AtomicU64::new(0),
            closing: close_rx,
        });
        let app = Router::new()
            .route("/", get(|| async { "OK" }))
            .route(
                "/keepalive",
                get(|| async {
                    crate::server::keepalive_hit();
                    "OK"
                }),
            )
            .route(&stream_path(), get(upgrade))
            .with_state(shared);
        axum::serve(self.listener, app)
            .with_graceful_shutdown(async move {
                shutdown.await;
                close_tx.send_replace(true);
            })
            .await
    }
}

async fn upgrade(State(st): State<Arc<Shared>>, ws: WebSocketUpgrade) -> impl IntoResponse {
    ws.max_message_size(1 << 20)
        .on_upgrade(move |socket| async move {
            st.subscribers.fetch_add(1, Ordering::Relaxed);
            if let Err(e) = session(socket, &st).await {
                debug!(error = %e, "change stream subscriber left");
            }
            st.subscribers.fetch_sub(1, Ordering::Relaxed);
        })
}

/// Why a session ended.
#[derive(Debug, thiserror::Error)]
enum SessionError {
    #[error("socket: {0}")]
    Socket(#[from] axum::Error),
    #[error(transparent)]
    Replica(#[from] replica::ReplicaError),
    #[error("{0}")]
    Other(String),
}

fn text(c: &Control) -> Message {
    Message::Text(serde_json::to_string(c).expect("serializes").into())
}

struct LogHead {
    replica_version: String,
    watermark: String,
}

fn log_head(path: &Path) -> Result<Option<LogHead>, replica::ReplicaError> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    let tx = conn.unchecked_transaction()?;
    let Some(state) = replica::read_state(&tx)? else {
        return Ok(None);
    };
    Ok(Some(LogHead {
        replica_version: state.replica_version,
        watermark: state.watermark,
    }))
}

/// Writes a consistent copy of the replica (without the change log) to `dest`.
pub fn snapshot_to(
    replica_file: &Path,
    dest: &Path,
) -> Result<SnapshotMade, replica::ReplicaError> {
    let _ = std::fs::remove_file(dest);
    let conn = rusqlite::Connection::open_with_flags(
        replica_file,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(Duration::from_secs(30))?;
    conn.execute("VACUUM INTO ?1", [dest.to_string_lossy()])?;
    drop(conn);
    let copy = rusqlite::Connection::open(dest)?;
    crate::changelog::disable(&copy)?;
    let state = replica::read_state(&copy)?.ok_or_else(|| {
        replica::ReplicaError::Inconsistent("the replica has no complete metadata".into())
    })?;
    Ok(SnapshotMade {
        replica_version: state.replica_version,
        watermark: state.watermark,
    })
}

/// Identity and position of a replica copy.
#[derive(Debug, Clone)]
pub struct SnapshotMade {
    /// Replica identity.
    pub replica_version: String,
    /// Its watermark.
    pub watermark: String,
}

async fn session(socket: WebSocket, st: &Shared) -> Result<(), SessionError> {
    let (mut tx, mut rx) = socket.split();
    let hello = match tokio::time::timeout(Duration::from_secs(10), rx.next()).await {
        Ok(Some(Ok(Message::Text(t)))) => serde_json::from_str::<Hello>(&t)
            .map_err(|e| SessionError::Other(format!("bad hello: {e}")))?,
        _ => return Err(SessionError::Other("no hello".into())),
    };
    if hello.protocol != CHANGE_STREAM_PROTOCOL {
        let msg = format!(
            "the replication manager speaks change-stream protocol v{CHANGE_STREAM_PROTOCOL} but this view syncer speaks v{}: run the same zero-cache version on both",
            hello.protocol
        );
        tx.send(text(&Control::Error {
            kind: "VersionMismatch".into(),
            message: msg,
        }))
        .await?;
        let _ = tx.close().await;
        return Ok(());
    }
    if hello.app_id != st.opts.app_id || hello.shard_num != st.opts.shard_num {
        let msg = format!(
            "the replication manager replicates app \"{}\" shard {} but this view syncer is configured for app \"{}\" shard {}: ZERO_APP_ID and ZERO_SHARD_NUM must match",
            st.opts.app_id, st.opts.shard_num, hello.app_id, hello.shard_num
        );
        tx.send(text(&Control::Error {
            kind: "WrongShard".into(),
            message: msg,
        }))
        .await?;
        let _ = tx.close().await;
        return Ok(());
    }
    // The subscriber's socket is read only to notice that it went away.
    let (gone_tx, mut gone) = watch::channel(false);
    tokio::spawn(async move {
        while let Some(Ok(m)) = rx.next().await {
            if matches!(m, Message::Close(_)) {
                break;
            }
        }
        gone_tx.send_replace(true);
    });
    let mut watermarks = st.watermarks.clone();
    let mut closing = st.closing.clone();
    // Wait for the manager's replica to be ready.
    tokio::select! {
        r = async { watermarks.wait_for(|w| !w.is_empty()).await.map(|_| ()) } => { r.map_err(|_| SessionError::Other("replicator stopped".into()))?; }
        _ = crate::changelog::until(&mut gone) => return Ok(()),
        _ = crate::changelog::until(&mut closing) => return Ok(()),
    }
    let path = st.opts.replica_file.clone();
    let head = {
        let p = path.clone();
        tokio::task::spawn_blocking(move || log_head(&p))
            .await
            .map_err(|e| SessionError::Other(e.to_string()))??
            .ok_or_else(|| SessionError::Other("replica not ready".into()))?
    };
    let min_version = st
        .opts
        .log
        .min_version(&head.replica_version)
        .await
        .map_err(SessionError::Other)?;
    let resumable = match (&hello.replica_version, &hello.watermark, &min_version) {
        (Some(rv), Some(w), Some(min)) => {
            rv == &head.replica_version && min <= w && w <= &head.watermark
        }
        _ => false,
    };
    let (replica_version, mut cursor) = if resumable {
        let w = hello.watermark.clone().expect("checked");
        tx.send(text(&Control::Resume {
            replica_version: head.replica_version.clone(),
            watermark: w.clone(),
        }))
        .await?;
        info!(watermark = %w, "view syncer resumes from its watermark");
        (head.replica_version, w)
    } else {
        let n = st.snapshots.fetch_add(1, Ordering::Relaxed);
        let mut dest = path.clone().into_os_string();
        dest.push(format!(".snapshot-{}-{n}", std::process::id()));
        let dest = PathBuf::from(dest);
        let (p, d) = (path.clone(), dest.clone());
        let made = tokio::task::spawn_blocking(move || snapshot_to(&p, &d))
            .await
            .map_err(|e| SessionError::Other(e.to_string()))?;
        let r = async {
            let made = made?;
            let size = tokio::fs::metadata(&dest)
                .await
                .map_err(|e| SessionError::Other(e.to_string()))?
                .len();
            info!(watermark = %made.watermark, bytes = size, "sending a replica snapshot to a view syncer");
            tx.send(text(&Control::Snapshot {
                replica_version: made.replica_version.clone(),
                watermark: made.watermark.clone(),
                size,
            }))
            .await?;
            let mut f = tokio::fs::File::open(&dest)
                .await
                .map_err(|e| SessionError::Other(e.to_string()))?;
            let mut buf = vec![0u8; CHUNK];
            loop {
                let n = f
                    .read(&mut buf)
                    .await
                    .map_err(|e| SessionError::Other(e.to_string()))?;
                if n == 0 {
                    break;
                }
                tx.send(Message::Binary(buf[..n].to_vec().into())).await?;
            }
            tx.send(text(&Control::SnapshotEnd)).await?;
            Ok::<_, SessionError>(made)
        }
        .await;
        let _ = tokio::fs::remove_file(&dest).await;
        let made = r?;
        (made.replica_version, made.watermark)
    };
    loop {
        let batch = st
            .opts
            .log
            .read_after(&replica_version, &cursor, BATCH_ENTRIES, BATCH_BYTES)
            .await
            .map_err(SessionError::Other)?;
        let batch = match batch {
            Ok(b) => b,
            Err(why) => {
                warn!(reason = %why, "telling a view syncer to reset");
                tx.send(text(&Control::Reset { message: why })).await?;
                let _ = tx.close().await;
                return Ok(());
            }
        };
        if batch.is_empty() {
            let current = watermarks.borrow_and_update().clone();
            if current > cursor {
                // Committed but not visible to our read yet; read again shortly.
                tokio::time::sleep(Duration::from_millis(2)).await;
                continue;
            }
            tokio::select! {
                r = watermarks.changed() => {
                    if r.is_err() { return Ok(()); }
                }
                _ = tokio::time::sleep(STATUS_EVERY) => {
                    tx.send(text(&Control::Status { watermark: current })).await?;
                }
                _ = crate::changelog::until(&mut gone) => return Ok(()),
                _ = crate::changelog::until(&mut closing) => {
                    let _ = tx.close().await;
                    return Ok(());
                }
            }
            continue;
        }
        for (version, changes) in batch {
            let frame = format!(
                r#"{{"type":"tx","version":{},"changes":{changes}}}"#,
                serde_json::Value::String(version.clone())
            );
            tx.send(Message::Text(frame.into())).await?;
            cursor = version;
        }
    }
}
