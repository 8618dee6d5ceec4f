//! Backup and restore of the replica (`ZERO_LITESTREAM_BACKUP_URL`), in place of zero-cache's
//! Litestream child process: the replication manager writes snapshots of the replica and,
//! between them, incremental segments of its change log ([`crate::changelog`]) to an object
//! store (`file://` or `s3://`, through the `object_store` crate). A node whose replica is
//! missing restores the newest snapshot plus the segments after it, then resumes streaming from
//! that watermark instead of running a full initial sync.
//!
//! Layout under the URL's path, per initial sync (replica version):
//! - `{replicaVersion}/snapshots/{watermark}.db`: a consistent copy (`VACUUM INTO`);
//! - `{replicaVersion}/changes/{from}-{to}.json`: every transaction after `from` up to `to`,
//!   one JSON object `{"version","changes"}` per line.
//!
//! Watermarks are lexi-encoded, so names sort in commit order. The replication slot is only
//! acknowledged up to the newest backed-up watermark while backups are on, so a restored
//! replica can always continue from the slot.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures::StreamExt;
use object_store::path::Path as ObjPath;
use object_store::{ObjectStore, ObjectStoreExt, PutPayload};
use tokio::io::AsyncWriteExt;
use tokio::sync::watch;
use tracing::{info, warn};

use crate::changelog::{self, Change};
use crate::replica::{self, Applier, ReplicaError, ReplicaState};

/// Backup settings.
#[derive(Debug, Clone)]
pub struct BackupConfig {
    /// `ZERO_LITESTREAM_BACKUP_URL`.
    pub url: String,
    /// `ZERO_LITESTREAM_INCREMENTAL_BACKUP_INTERVAL_MINUTES`.
    pub incremental_interval: Duration,
    /// `ZERO_LITESTREAM_SNAPSHOT_BACKUP_INTERVAL_HOURS`.
    pub snapshot_interval: Duration,
    /// `ZERO_LITESTREAM_ENDPOINT`: S3-compatible endpoint (overrides `AWS_ENDPOINT`).
    pub endpoint: Option<String>,
    /// `ZERO_LITESTREAM_REGION` (overrides `AWS_REGION`).
    pub region: Option<String>,
    /// `ZERO_LITESTREAM_MULTIPART_SIZE`: snapshots larger than this upload in parts of it.
    pub multipart_size: usize,
    /// `ZERO_LITESTREAM_MULTIPART_CONCURRENCY`: parts in flight at once.
    pub multipart_concurrency: usize,
}

/// Why a backup or restore failed.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    /// The URL cannot be used.
    #[error("ZERO_LITESTREAM_BACKUP_URL: {0}")]
    Url(String),
    /// The object store failed.
    #[error("backup store: {0}")]
    Store(#[from] object_store::Error),
    /// Local files failed.
    #[error("backup: {0}")]
    Io(#[from] std::io::Error),
    /// The replica failed.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// The backup's contents are not usable.
    #[error("backup: {0}")]
    Data(String),
}

/// Opens the object store of a backup URL; returns it and the path prefix inside it.
pub fn open_store(cfg: &BackupConfig) -> Result<(Arc<dyn ObjectStore>, ObjPath), BackupError> {
    let url = url::Url::parse(&cfg.url).map_err(|e| BackupError::Url(format!("{e}")))?;
    match url.scheme() {
        "file" => {
            let dir = url
                .to_file_path()
                .map_err(|_| BackupError::Url(format!("{} is not a local path", cfg.url)))?;
            std::fs::create_dir_all(&dir)?;
            let store = object_store::local::LocalFileSystem::new_with_prefix(&dir)?;
            Ok((Arc::new(store), ObjPath::default()))
        }
        "s3" => {
            let mut b = object_store::aws::AmazonS3Builder::from_env().with_url(cfg.url.clone());
            if let Some(e) = &cfg.endpoint {
                b = b.with_endpoint(e);
                if e.starts_with("http://") {
                    b = b.with_allow_http(true);
                }
            }
            if let Some(r) = &cfg.region {
                b = b.with_region(r);
            }
            let store = b.build()?;
            let prefix = ObjPath::from(url.path().trim_matches('/'));
            Ok((Arc::new(store), prefix))
        }
        other => Err(BackupError::Url(format!(
            "unsupported scheme {other:?} (use s3:// or file://)"
        ))),
    }
}

fn child(prefix: &ObjPath, parts: &[&str]) -> ObjPath {
    let mut p = prefix.clone();
    for part in parts {
        p = p.clone().join(*part);
    }
    p
}

/// What a backup holds for one replica version.
#[derive(Debug, Default)]
struct Listing {
    /// Snapshot watermarks, sorted.
    snapshots: Vec<String>,
    /// Segments `(from, to)`, sorted.
    segments: Vec<(String, String)>,
}

async fn list(
    store: &dyn ObjectStore,
    prefix: &ObjPath,
) -> Result<std::collections::BTreeMap<String, Listing>, BackupError> {
    let mut out: std::collections::BTreeMap<String, Listing> = Default::default();
    let mut s = store.list(Some(prefix));
    let skip = prefix.parts().count();
    while let Some(meta) = s.next().await {
        let meta = meta?;
        let parts: Vec<String> = meta
            .location
            .parts()
            .skip(skip)
            .map(|p| p.as_ref().to_string())
            .collect();
        let [rv, kind, name] = parts.as_slice() else {
            continue;
        };
        let entry = out.entry(rv.clone()).or_default();
        match kind.as_str() {
            "snapshots" => {
                if let Some(w) = name.strip_suffix(".db") {
                    entry.snapshots.push(w.to_string());
                }
            }
            "changes" => {
                if let Some((f, t)) = name.strip_suffix(".json").and_then(|n| n.split_once('-')) {
                    entry.segments.push((f.to_string(), t.to_string()));
                }
            }
            _ => {}
        }
    }
    for l in out.values_mut() {
        l.snapshots.sort();
        l.segments.sort();
    }
    Ok(out)
}

/// Restores `replica_file` from the newest snapshot of the newest replica version plus the
/// segments after it. `None` when the backup is empty.
pub async fn restore(
    cfg: &BackupConfig,
    replica_file: &Path,
) -> Result<Option<ReplicaState>, BackupError> {
    let (store, prefix) = open_store(cfg)?;
    let all = list(&*store, &prefix).await?;
    let Some((rv, listing)) = all.iter().rev().find(|(_, l)| !l.snapshots.is_empty()) else {
        return Ok(None);
    };
    let snap = listing.snapshots.last().expect("non-empty");
    let started = Instant::now();
    let mut tmp = replica_file.as_os_str().to_owned();
    tmp.push(".restore");
    let tmp = PathBuf::from(tmp);
    {
        let got = store
            .get(&child(&prefix, &[rv, "snapshots", &format!("{snap}.db")]))
            .await?;
        let mut f = tokio::fs::File::create(&tmp).await?;
        let mut s = got.into_stream();
        while let Some(chunk) = s.next().await {
            f.write_all(&chunk?).await?;
        }
        f.sync_all().await?;
    }
    // Replay the segments after the snapshot onto the copy.
    let mut segments = Vec::new();
    for (from, to) in &listing.segments {
        if to.as_str() <= snap.as_str() {
            continue;
        }
        let body = store
            .get(&child(
                &prefix,
                &[rv, "changes", &format!("{from}-{to}.json")],
            ))
            .await?
            .bytes()
            .await?;
        segments.push((from.clone(), body));
    }
    let t = tmp.clone();
    let state = tokio::task::spawn_blocking(move || -> Result<ReplicaState, BackupError> {
        let conn = replica::open(&t)?;
        let state = replica::read_state(&conn)?
            .ok_or_else(|| BackupError::Data("snapshot without replica metadata".into()))?;
        let mut applier = Applier::new(conn, &state);
        for (from, body) in segments {
            if from.as_str() > applier.watermark() {
                // A gap: stop at the last contiguous watermark (the stream fills in the rest).
                warn!(from = %from, watermark = %applier.watermark(), "gap in the backup's change segments");
                break;
            }
            for line in body.split(|b| *b == b'\n').filter(|l| !l.is_empty()) {
                #[derive(serde::Deserialize)]
                struct Entry {
                    version: String,
                    changes: Vec<Change>,
                }
                let e: Entry = serde_json::from_slice(line)
                    .map_err(|e| BackupError::Data(format!("bad change segment: {e}")))?;
                changelog::replay(&mut applier, &e.version, &e.changes)?;
            }
        }
        let watermark = applier.watermark().to_string();
        drop(applier);
        Ok(ReplicaState { watermark, ..state })
    })
    .await
    .map_err(|e| BackupError::Data(format!("restore task: {e}")))??;
    crate::subscriber::install(&tmp, replica_file)?;
    info!(
        replica_version = %state.replica_version,
        snapshot = %snap,
        watermark = %state.watermark,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "replica restored from backup"
    );
    Ok(Some(state))
}

/// Runs backups until `shutdown` turns true. `backed_up` is set to the newest watermark the
/// backup holds (the replicator acknowledges the slot no further, and the change log is purged
/// no further).
pub async fn run(
    cfg: BackupConfig,
    replica_file: PathBuf,
    log: crate::change_db::LogStore,
    mut watermarks: watch::Receiver<String>,
    backed_up: watch::Sender<String>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<(), BackupError> {
    let (store, prefix) = open_store(&cfg)?;
    tokio::select! {
        _ = async { let _ = watermarks.wait_for(|w| !w.is_empty()).await; } => {}
        _ = crate::changelog::until(&mut shutdown) => return Ok(()),
    }
    let mut last_snapshot: Option<Instant> = None;
    loop {
        match backup_once(
            &cfg,
            &store,
            &prefix,
            &replica_file,
            &log,
            &mut last_snapshot,
        )
        .await
        {
            Ok(Some(w)) => {
                backed_up.send_replace(w);
            }
            Ok(None) => {}
            Err(e) => warn!(error = %e, "backup failed; retrying at the next interval"),
        }
        tokio::select! {
            _ = tokio::time::sleep(cfg.incremental_interval) => {}
            _ = crate::changelog::until(&mut shutdown) => return Ok(()),
        }
    }
}

async fn backup_once(
    cfg: &BackupConfig,
    store: &Arc<dyn ObjectStore>,
    prefix: &ObjPath,
    replica_file: &Path,
    log: &crate::change_db::LogStore,
    last_snapshot: &mut Option<Instant>,
) -> Result<Option<String>, BackupError> {
    let path = replica_file.to_path_buf();
    let (rv, watermark) = tokio::task::spawn_blocking(move || {
        let conn = replica::open(&path)?;
        let st = replica::read_state(&conn)?
            .ok_or_else(|| BackupError::Data("replica not ready".into()))?;
        Ok::<_, BackupError>((st.replica_version, st.watermark))
    })
    .await
    .map_err(|e| BackupError::Data(e.to_string()))??;
    let min = log.min_version(&rv).await.map_err(BackupError::Data)?;
    let all = list(&**store, prefix).await?;
    let mine = all.get(&rv);
    let newest = mine.and_then(|l| {
        let snap = l.snapshots.last()?;
        let seg = l.segments.last().map(|(_, t)| t).filter(|t| *t > snap);
        Some(seg.unwrap_or(snap).clone())
    });
    let snapshot_due = match (&newest, &*last_snapshot) {
        (None, _) => true,
        (Some(_), None) => false,
        (Some(_), Some(at)) => at.elapsed() >= cfg.snapshot_interval,
    };
    // The log must still reach back to the newest backed-up watermark for a segment.
    let log_covers = match (&newest, &min) {
        (Some(n), Some(m)) => m <= n,
        _ => false,
    };
    if snapshot_due || !log_covers {
        let w = snapshot(cfg, store, prefix, replica_file).await?;
        *last_snapshot = Some(Instant::now());
        // Older replica versions and what the new snapshot supersedes are no longer needed.
        for (other, l) in &all {
            for s in &l.snapshots {
                if other != &rv || s < &w {
                    let _ = store
                        .delete(&child(prefix, &[other, "snapshots", &format!("{s}.db")]))
                        .await;
                }
            }
            for (f, t) in &l.segments {
                if other != &rv || t <= &w {
                    let _ = store
                        .delete(&child(
                            prefix,
                            &[other, "changes", &format!("{f}-{t}.json")],
                        ))
                        .await;
                }
            }
        }
        return Ok(Some(w));
    }
    let from = newest.expect("log_covers implies a backup");
    if from >= watermark {
        return Ok(Some(from));
    }
    if last_snapshot.is_none() {
        *last_snapshot = Some(Instant::now());
    }
    // One segment with every transaction after `from`, up to the replica's watermark (a
    // change DB may be one transaction ahead of the replica for a moment).
    let mut body = Vec::new();
    let mut cursor = from.clone();
    'read: loop {
        let batch = log
            .read_after(&rv, &cursor, 1024, 16 << 20)
            .await
            .map_err(BackupError::Data)?
            .map_err(BackupError::Data)?;
        if batch.is_empty() {
            break;
        }
        for (v, c) in batch {
            if v > watermark {
                break 'read;
            }
            body.extend_from_slice(
                format!(
                    "{{\"version\":{},\"changes\":{c}}}\n",
                    serde_json::Value::String(v.clone())
                )
                .as_bytes(),
            );
            cursor = v;
        }
    }
    let to = cursor;
    if to == from {
        return Ok(Some(from));
    }
    store
        .put(
            &child(prefix, &[&rv, "changes", &format!("{from}-{to}.json")]),
            PutPayload::from(body),
        )
        .await?;
    info!(from = %from, to = %to, "incremental backup written");
    Ok(Some(to))
}

async fn snapshot(
    cfg: &BackupConfig,
    store: &Arc<dyn ObjectStore>,
    prefix: &ObjPath,
    replica_file: &Path,
) -> Result<String, BackupError> {
    let mut tmp = replica_file.as_os_str().to_owned();
    tmp.push(".backup");
    let tmp = PathBuf::from(tmp);
    let (src, dst) = (replica_file.to_path_buf(), tmp.clone());
    let made = tokio::task::spawn_blocking(move || crate::change_streamer::snapshot_to(&src, &dst))
        .await
        .map_err(|e| BackupError::Data(e.to_string()))??;
    let r = async {
        // Streamed: large replicas go up as a multipart upload, never whole in memory.
        let dest = child(
            prefix,
            &[
                &made.replica_version,
                "snapshots",
                &format!("{}.db", made.watermark),
            ],
        );
        let mut w = object_store::buffered::BufWriter::with_capacity(
            store.clone(),
            dest,
            cfg.multipart_size.max(5 << 20),
        )
        .with_max_concurrency(cfg.multipart_concurrency.max(1));
        let mut f = tokio::fs::File::open(&tmp).await?;
        let size = tokio::io::copy(&mut f, &mut w).await?;
        w.shutdown().await?;
        info!(watermark = %made.watermark, bytes = size, "snapshot backup written");
        Ok::<_, BackupError>(())
    }
    .await;
    let _ = tokio::fs::remove_file(&tmp).await;
    r?;
    Ok(made.watermark)
}
