//! The replication manager's change log in Postgres (`ZERO_CHANGE_DB`), in place of the log
//! kept inside the replica file ([`crate::changelog`]), and the change-streamer address that
//! view syncers discover (`ZERO_CHANGE_STREAMER_MODE=discover`).
//!
//! # Layout: schema `"{app}_{shard}/cdc"` (created idempotently; Zero's table names)
//! - `"changeLog"` (`watermark`, `pos`, `change` JSON, `precommit`, plus our `"writeTimeMs"`):
//!   our own row format: one row per upstream transaction, `pos = 0`, `change` = the JSON array
//!   of [`crate::changelog::Change`]s (the same recorded `Applier` calls as the SQLite log), so
//!   that replaying the rows through an `Applier` reproduces the replica exactly.
//! - `"replicationState"` (`lastWatermark`, `owner`, `ownerAddress`, `lock`): Zero's layout.
//!   `owner` is the writing manager's task id, `ownerAddress` the `host:port` of its change
//!   streamer, read by discovering view syncers (also by Zero's own).
//! - `"replicationConfig"` (`replicaVersion`, `publications`, `resetRequired`, `lock`, plus our
//!   `"minWatermark"`): the initial sync the log belongs to; the log holds every transaction
//!   committed after `minWatermark`.
//!
//! # Order of writes (no change lost or applied twice)
//! For each upstream transaction the `Applier` (see [`ChangeSink`]) first commits the log row
//! and `lastWatermark` in one Postgres statement, then commits the replica's SQLite
//! transaction, and only then is the slot acknowledged. A crash after the Postgres commit and
//! before the SQLite commit leaves the log ahead of the replica; the next start
//! ([`ChangeDb::claim`]) hands back the log rows after the replica's watermark, the replicator
//! replays them into the replica before streaming, and the stream then skips those
//! transactions when upstream sends them again (they are at or below the watermark). A log
//! that does not reach the replica's watermark (the change DB was replaced, or the log written
//! while it was off is missing) restarts at that watermark: subscribers behind it get a
//! snapshot. A log of another initial sync is cleared when the replica is fresh or
//! `ZERO_AUTO_RESET` is on, and is an error otherwise.
//!
//! Only one manager writes: [`ChangeDb::claim`] takes ownership, and every append checks it,
//! so a manager that another one replaced stops instead of writing a second history.

use std::path::PathBuf;
use std::sync::Arc;

use tracing::{info, warn};

use crate::pgconn::{PgPool, UpstreamConfig};
use crate::upstream::quote_ident;

/// Why the change DB cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ChangeDbError {
    /// Cannot connect.
    #[error("ZERO_CHANGE_DB: cannot connect to {db}: {source}")]
    Unreachable {
        /// The database (without password).
        db: String,
        /// Why.
        source: tokio_postgres::Error,
    },
    /// A statement failed.
    #[error("ZERO_CHANGE_DB: {0}")]
    Pg(#[from] tokio_postgres::Error),
    /// The log belongs to another initial sync and may not be cleared.
    #[error(
        "ZERO_CHANGE_DB holds the change log of replica version {log} but the replica is version {replica} at watermark {watermark}; set ZERO_AUTO_RESET=true to start a new change log, or point ZERO_CHANGE_DB at the replica's own change database"
    )]
    ReplicaVersionMismatch {
        /// The log's replica version.
        log: String,
        /// The replica's.
        replica: String,
        /// The replica's watermark.
        watermark: String,
    },
    /// Another manager took over the log.
    #[error(
        "ZERO_CHANGE_DB: another replication manager ({owner} at {address}) took over the change log; this one stops"
    )]
    Superseded {
        /// Its task id.
        owner: String,
        /// Its change-streamer address.
        address: String,
    },
    /// A log row could not be read back.
    #[error("ZERO_CHANGE_DB: {0}")]
    Data(String),
}

impl ChangeDbError {
    /// Whether retrying cannot help (the manager must stop).
    pub fn is_fatal(&self) -> bool {
        matches!(
            self,
            ChangeDbError::ReplicaVersionMismatch { .. } | ChangeDbError::Superseded { .. }
        )
    }
}

/// The schema of the shard's change DB tables.
pub fn cdc_schema(app_id: &str, shard_num: u32) -> String {
    format!("{app_id}_{shard_num}/cdc")
}

/// The change DB: a pool of at most `ZERO_CHANGE_MAX_CONNS` sessions.
pub struct ChangeDb {
    pool: PgPool,
    schema: String,
}

impl std::fmt::Debug for ChangeDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChangeDb")
            .field("db", &self.pool.display())
            .field("schema", &self.schema)
            .finish()
    }
}

/// What [`ChangeDb::claim`] found.
#[derive(Debug, Clone)]
pub struct Claimed {
    /// The log holds every transaction after this version.
    pub min_watermark: String,
    /// Log rows after the replica's watermark (version, changes JSON), oldest first: committed
    /// to the change DB but not to the replica before the last stop. Replay them.
    pub pending: Vec<(String, String)>,
}

impl ChangeDb {
    /// Connects (failing with [`ChangeDbError::Unreachable`]) and creates the tables if missing.
    pub async fn open(
        cfg: UpstreamConfig,
        schema: String,
        max_conns: usize,
    ) -> Result<Arc<ChangeDb>, ChangeDbError> {
        let db = ChangeDb {
            pool: PgPool::new(cfg, max_conns),
            schema,
        };
        let mut c = db.connect().await?;
        let tx = c.transaction().await?;
        // Managers and view syncers may start at once against one database.
        tx.execute("SELECT pg_advisory_xact_lock(hashtext($1))", &[&db.schema])
            .await?;
        tx.batch_execute(&format!(
            r#"CREATE SCHEMA IF NOT EXISTS {s};
               CREATE TABLE IF NOT EXISTS {s}."changeLog" (
                 watermark TEXT, pos INT8, change JSON NOT NULL, precommit TEXT,
                 PRIMARY KEY (watermark, pos));
               ALTER TABLE {s}."changeLog" ADD COLUMN IF NOT EXISTS "writeTimeMs" INT8 NOT NULL DEFAULT 0;
               CREATE TABLE IF NOT EXISTS {s}."replicationState" (
                 "lastWatermark" TEXT NOT NULL, "owner" TEXT, "ownerAddress" TEXT,
                 "lock" INTEGER PRIMARY KEY DEFAULT 1 CHECK (lock=1));
               CREATE TABLE IF NOT EXISTS {s}."replicationConfig" (
                 "replicaVersion" TEXT NOT NULL, "publications" TEXT[] NOT NULL,
                 "resetRequired" BOOL, "lock" INTEGER PRIMARY KEY DEFAULT 1 CHECK (lock=1));
               ALTER TABLE {s}."replicationConfig" ADD COLUMN IF NOT EXISTS "minWatermark" TEXT;"#,
            s = quote_ident(&db.schema)
        ))
        .await?;
        tx.commit().await?;
        drop(c);
        Ok(Arc::new(db))
    }

    /// The database (without password), for logs.
    pub fn display(&self) -> String {
        self.pool.display()
    }

    async fn connect(&self) -> Result<crate::pgconn::Pooled<'_>, ChangeDbError> {
        self.pool
            .get()
            .await
            .map_err(|source| ChangeDbError::Unreachable {
                db: self.pool.display(),
                source,
            })
    }

    fn t(&self, table: &str) -> String {
        format!("{}.{}", quote_ident(&self.schema), quote_ident(table))
    }

    /// Records `owner` and its change-streamer `address` for discovery, without a log (a
    /// manager that keeps its log in the replica).
    pub async fn publish_address(
        &self,
        owner: &str,
        address: &str,
        watermark: &str,
    ) -> Result<(), ChangeDbError> {
        let c = self.connect().await?;
        c.execute(
            &format!(
                r#"INSERT INTO {} ("lastWatermark", "owner", "ownerAddress") VALUES ($1, $2, $3)
                   ON CONFLICT (lock) DO UPDATE SET "owner" = $2, "ownerAddress" = $3"#,
                self.t("replicationState")
            ),
            &[&watermark, &owner, &address],
        )
        .await?;
        Ok(())
    }

    /// Takes ownership of the log for the replica (`replica_version`, `publications`, at
    /// `watermark`) and reconciles it with the replica (see the module doc). `allow_reset`:
    /// a log of another initial sync may be cleared.
    pub async fn claim(
        &self,
        owner: &str,
        address: &str,
        replica_version: &str,
        publications: &[String],
        watermark: &str,
        allow_reset: bool,
    ) -> Result<Claimed, ChangeDbError> {
        let mut c = self.connect().await?;
        let tx = c.transaction().await?;
        tx.execute(
            "SELECT pg_advisory_xact_lock(hashtext($1))",
            &[&self.schema],
        )
        .await?;
        let config = tx
            .query_opt(
                &format!(
                    r#"SELECT "replicaVersion", "minWatermark" FROM {} FOR UPDATE"#,
                    self.t("replicationConfig")
                ),
                &[],
            )
            .await?
            .map(|r| (r.get::<_, String>(0), r.get::<_, Option<String>>(1)));
        let last: Option<String> = tx
            .query_one(
                &format!("SELECT max(watermark) FROM {}", self.t("changeLog")),
                &[],
            )
            .await?
            .get(0);
        let restart_at_replica = match &config {
            None => true,
            Some((v, min)) if v != replica_version || min.is_none() => {
                let fresh = watermark == replica_version;
                if !(fresh || allow_reset) {
                    return Err(ChangeDbError::ReplicaVersionMismatch {
                        log: v.clone(),
                        replica: replica_version.to_string(),
                        watermark: watermark.to_string(),
                    });
                }
                warn!(log_version = %v, replica_version, "the change DB holds the log of another initial sync; starting a new one");
                true
            }
            Some((_, min)) => {
                let min = min.clone().unwrap_or_default();
                let last = last.clone().unwrap_or_else(|| min.clone());
                if min.as_str() > watermark || last.as_str() < watermark {
                    warn!(log_from = %min, log_to = %last, watermark, "the change log does not reach the replica's watermark; it restarts there");
                    true
                } else {
                    false
                }
            }
        };
        if restart_at_replica {
            tx.batch_execute(&format!(
                "DELETE FROM {}; DELETE FROM {};",
                self.t("changeLog"),
                self.t("replicationConfig")
            ))
            .await?;
            tx.execute(
                &format!(
                    r#"INSERT INTO {} ("replicaVersion", "publications", "resetRequired", "minWatermark") VALUES ($1, $2, false, $3)"#,
                    self.t("replicationConfig")
                ),
                &[&replica_version, &publications, &watermark],
            )
            .await?;
        }
        let previous = tx
            .query_opt(
                &format!(
                    r#"SELECT "owner", "ownerAddress" FROM {}"#,
                    self.t("replicationState")
                ),
                &[],
            )
            .await?
            .map(|r| (r.get::<_, Option<String>>(0), r.get::<_, Option<String>>(1)));
        if let Some((Some(o), a)) = &previous
            && o != owner
        {
            info!(previous_owner = %o, previous_address = a.as_deref().unwrap_or(""), "taking over the change DB");
        }
        let last_now = if restart_at_replica {
            watermark.to_string()
        } else {
            last.clone()
                .filter(|l| l.as_str() > watermark)
                .unwrap_or_else(|| watermark.to_string())
        };
        tx.execute(
            &format!(
                r#"INSERT INTO {} ("lastWatermark", "owner", "ownerAddress") VALUES ($1, $2, $3)
                   ON CONFLICT (lock) DO UPDATE SET "lastWatermark" = $1, "owner" = $2, "ownerAddress" = $3"#,
                self.t("replicationState")
            ),
            &[&last_now, &owner, &address],
        )
        .await?;
        let pending = if restart_at_replica {
            Vec::new()
        } else {
            tx.query(
                &format!(
                    "SELECT watermark, change::text FROM {} WHERE watermark > $1 ORDER BY watermark, pos",
                    self.t("changeLog")
                ),
                &[&watermark],
            )
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect()
        };
        let min_watermark: String = tx
            .query_one(
                &format!(
                    r#"SELECT "minWatermark" FROM {}"#,
                    self.t("replicationConfig")
                ),
                &[],
            )
            .await?
            .get(0);
        tx.commit().await?;
        Ok(Claimed {
            min_watermark,
            pending,
        })
    }

    /// Appends one transaction (after its rows reached the replica's open SQLite transaction,
    /// before that commits), in one statement with the owner check and `lastWatermark`.
    pub async fn append(
        &self,
        owner: &str,
        version: &str,
        changes_json: &str,
    ) -> Result<(), ChangeDbError> {
        let c = self.connect().await?;
        let sql = format!(
            r#"WITH s AS (UPDATE {state} SET "lastWatermark" = $1 WHERE "owner" = $3 RETURNING 1),
                        i AS (INSERT INTO {log} (watermark, pos, change, "writeTimeMs")
                              SELECT $1, 0, $2::text::json, $4 WHERE EXISTS (SELECT 1 FROM s)
                              ON CONFLICT DO NOTHING RETURNING 1)
                   SELECT (SELECT count(*) FROM s), (SELECT count(*) FROM i)"#,
            state = self.t("replicationState"),
            log = self.t("changeLog"),
        );
        let now = crate::replica::now_ms();
        // Typed parameters: one round trip, no separate prepare.
        use tokio_postgres::types::Type;
        let rows = c
            .query_typed(
                &sql,
                &[
                    (&version, Type::TEXT),
                    (&changes_json, Type::TEXT),
                    (&owner, Type::TEXT),
                    (&now, Type::INT8),
                ],
            )
            .await?;
        let row = rows
            .first()
            .ok_or_else(|| ChangeDbError::Data("no result from the log append".into()))?;
        if row.get::<_, i64>(0) == 0 {
            let (o, a) = self.owner().await?;
            return Err(ChangeDbError::Superseded {
                owner: o.unwrap_or_default(),
                address: a.unwrap_or_default(),
            });
        }
        Ok(())
    }

    /// The current owner and its address.
    pub async fn owner(&self) -> Result<(Option<String>, Option<String>), ChangeDbError> {
        let c = self.connect().await?;
        Ok(c.query_opt(
            &format!(
                r#"SELECT "owner", "ownerAddress" FROM {}"#,
                self.t("replicationState")
            ),
            &[],
        )
        .await?
        .map(|r| (r.get(0), r.get(1)))
        .unwrap_or((None, None)))
    }

    /// The log's replica version and `minWatermark`, if it has been claimed.
    pub async fn head(&self) -> Result<Option<(String, String)>, ChangeDbError> {
        let c = self.connect().await?;
        Ok(c.query_opt(
            &format!(
                r#"SELECT "replicaVersion", "minWatermark" FROM {}"#,
                self.t("replicationConfig")
            ),
            &[],
        )
        .await?
        .and_then(|r| Some((r.get(0), r.get::<_, Option<String>>(1)?))))
    }

    /// Transactions after `after` (up to `max_entries` or about `max_bytes`), if the log is
    /// still of `replica_version` and reaches back to `after`; otherwise why not.
    pub async fn read_after(
        &self,
        replica_version: &str,
        after: &str,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Result<Vec<(String, String)>, String>, ChangeDbError> {
        let mut c = self.connect().await?;
        let tx = c
            .build_transaction()
            .isolation_level(tokio_postgres::IsolationLevel::RepeatableRead)
            .read_only(true)
            .start()
            .await?;
        let head = tx
            .query_opt(
                &format!(
                    r#"SELECT "replicaVersion", "minWatermark" FROM {}"#,
                    self.t("replicationConfig")
                ),
                &[],
            )
            .await?;
        match head {
            Some(r) if r.get::<_, String>(0) == replica_version => {
                match r.get::<_, Option<String>>(1) {
                    Some(min) if min.as_str() <= after => {}
                    _ => {
                        return Ok(Err(
                            "the change log no longer reaches back to this watermark".into(),
                        ));
                    }
                }
            }
            _ => return Ok(Err("the replication manager's replica was replaced".into())),
        }
        let rows = tx
            .query(
                &format!(
                    "SELECT watermark, change::text FROM {} WHERE watermark > $1 ORDER BY watermark, pos LIMIT $2",
                    self.t("changeLog")
                ),
                &[&after, &(max_entries as i64)],
            )
            .await?;
        tx.commit().await?;
        let mut out = Vec::with_capacity(rows.len());
        let mut bytes = 0;
        for r in rows {
            let c: String = r.get(1);
            bytes += c.len();
            out.push((r.get(0), c));
            if bytes >= max_bytes {
                break;
            }
        }
        Ok(Ok(out))
    }

    /// Drops transactions at or below `upto` written before `before_ms` and moves
    /// `minWatermark`; returns how many were dropped.
    pub async fn purge(&self, upto: &str, before_ms: i64) -> Result<u64, ChangeDbError> {
        let mut c = self.connect().await?;
        let tx = c.transaction().await?;
        let last: Option<String> = tx
            .query_one(
                &format!(
                    r#"SELECT max(watermark) FROM {} WHERE watermark <= $1 AND "writeTimeMs" < $2"#,
                    self.t("changeLog")
                ),
                &[&upto, &before_ms],
            )
            .await?
            .get(0);
        let Some(last) = last else { return Ok(0) };
        let n = tx
            .execute(
                &format!("DELETE FROM {} WHERE watermark <= $1", self.t("changeLog")),
                &[&last],
            )
            .await?;
        tx.execute(
            &format!(
                r#"UPDATE {} SET "minWatermark" = $1 WHERE "minWatermark" < $1"#,
                self.t("replicationConfig")
            ),
            &[&last],
        )
        .await?;
        tx.commit().await?;
        Ok(n)
    }
}

/// Reads the change streamer's address published in `"{app}_{shard}/cdc"."replicationState"`
/// of `db` (`ZERO_CHANGE_DB`, or the upstream database), as an `http://` URI.
pub async fn discover(db: &UpstreamConfig, schema: &str) -> Result<String, String> {
    let c = db.connect().await.map_err(|e| {
        format!(
            "cannot connect to {} to discover the replication manager: {e}",
            db.display()
        )
    })?;
    let row = c
        .query_opt(
            &format!(
                r#"SELECT "ownerAddress" FROM {}."replicationState""#,
                quote_ident(schema)
            ),
            &[],
        )
        .await
        .map_err(|e| {
            format!(
                "no replication manager has published its address in {} (schema \"{schema}\"): {e}",
                db.display()
            )
        })?;
    let addr: Option<String> = row.and_then(|r| r.get(0));
    let Some(addr) = addr.filter(|a| !a.is_empty()) else {
        return Err(format!(
            "no replication manager has published its address in {} yet",
            db.display()
        ));
    };
    Ok(if addr.contains("://") {
        addr
    } else {
        format!("http://{addr}")
    })
}

/// The host part of the address a manager publishes when `ZERO_CHANGE_STREAMER_ADDRESS` is not
/// set: the IPv4 address of the first network interface whose name starts with one of
/// `preferences` (in their order), else of any interface that is up and not loopback, else the
/// loopback address.
pub fn host_ip(preferences: &[String]) -> String {
    let addrs: Vec<(String, std::net::Ipv4Addr)> = nix::ifaddrs::getifaddrs()
        .map(|it| {
            it.filter_map(|a| {
                let ip = a.address?.as_sockaddr_in()?.ip();
                (!ip.is_loopback()).then_some((a.interface_name, ip))
            })
            .collect()
        })
        .unwrap_or_default();
    for p in preferences {
        if let Some((_, ip)) = addrs.iter().find(|(n, _)| n.starts_with(p.as_str())) {
            return ip.to_string();
        }
    }
    addrs
        .first()
        .map(|(_, ip)| ip.to_string())
        .unwrap_or_else(|| "127.0.0.1".to_string())
}

/// Where the replication manager's change log lives: in the replica file, or in the change DB.
#[derive(Clone, Debug)]
pub enum LogStore {
    /// `_zero.changeStream` in this replica file.
    Replica(PathBuf),
    /// `ZERO_CHANGE_DB`.
    ChangeDb(Arc<ChangeDb>),
}

impl LogStore {
    /// The version after which the log of `replica_version` is complete, if there is one.
    pub async fn min_version(&self, replica_version: &str) -> Result<Option<String>, String> {
        match self {
            LogStore::Replica(path) => {
                let path = path.clone();
                tokio::task::spawn_blocking(move || {
                    let conn = crate::replica::open(&path)?;
                    crate::changelog::min_version(&conn)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
            LogStore::ChangeDb(db) => Ok(db
                .head()
                .await
                .map_err(|e| e.to_string())?
                .filter(|(v, _)| v == replica_version)
                .map(|(_, m)| m)),
        }
    }

    /// Transactions after `after`: see [`ChangeDb::read_after`].
    pub async fn read_after(
        &self,
        replica_version: &str,
        after: &str,
        max_entries: usize,
        max_bytes: usize,
    ) -> Result<Result<Vec<(String, String)>, String>, String> {
        match self {
            LogStore::Replica(path) => {
                let (path, rv, after) =
                    (path.clone(), replica_version.to_string(), after.to_string());
                tokio::task::spawn_blocking(move || {
                    read_replica_log(&path, &rv, &after, max_entries, max_bytes)
                })
                .await
                .map_err(|e| e.to_string())?
                .map_err(|e| e.to_string())
            }
            LogStore::ChangeDb(db) => db
                .read_after(replica_version, after, max_entries, max_bytes)
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Purges: see [`crate::changelog::purge`].
    pub async fn purge(&self, upto: &str, before_ms: i64) -> Result<u64, String> {
        match self {
            LogStore::Replica(path) => {
                let (path, upto) = (path.clone(), upto.to_string());
                tokio::task::spawn_blocking(move || {
                    let conn = crate::replica::open(&path)?;
                    crate::changelog::purge(&conn, &upto, before_ms)
                })
                .await
                .map_err(|e| e.to_string())?
                .map(|n| n as u64)
                .map_err(|e| e.to_string())
            }
            LogStore::ChangeDb(db) => db.purge(upto, before_ms).await.map_err(|e| e.to_string()),
        }
    }
}

fn read_replica_log(
    path: &std::path::Path,
    replica_version: &str,
    after: &str,
    max_entries: usize,
    max_bytes: usize,
) -> Result<Result<Vec<(String, String)>, String>, crate::replica::ReplicaError> {
    let conn = rusqlite::Connection::open_with_flags(
        path,
        rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY | rusqlite::OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )?;
    conn.busy_timeout(std::time::Duration::from_secs(30))?;
    let tx = conn.unchecked_transaction()?;
    match crate::replica::read_state(&tx)? {
        Some(s) if s.replica_version == replica_version => {}
        _ => return Ok(Err("the replication manager's replica was replaced".into())),
    }
    match crate::changelog::min_version(&tx)? {
        Some(min) if min.as_str() <= after => {}
        _ => {
            return Ok(Err(
                "the change log no longer reaches back to this watermark".into(),
            ));
        }
    }
    Ok(Ok(crate::changelog::read_after(
        &tx,
        after,
        max_entries,
        max_bytes,
    )?))
}

/// The `Applier`'s hook that stores each transaction in the change DB before the replica's
/// SQLite transaction commits (see the module doc for why in that order).
pub struct ChangeSink {
    rt: tokio::runtime::Handle,
    db: Arc<ChangeDb>,
    owner: String,
}

impl ChangeSink {
    /// A sink on the streaming thread (`rt` drives the Postgres calls).
    pub fn new(rt: tokio::runtime::Handle, db: Arc<ChangeDb>, owner: String) -> ChangeSink {
        ChangeSink { rt, db, owner }
    }

    /// Stores one transaction durably; an error means it was not stored (or the manager was
    /// replaced) and the replica's transaction must roll back.
    pub fn store(
        &mut self,
        version: &str,
        changes: &[crate::changelog::Change],
    ) -> Result<(), ChangeDbError> {
        let json = serde_json::to_string(changes).expect("changes serialize");
        self.rt
            .block_on(self.db.append(&self.owner, version, &json))
    }
}
