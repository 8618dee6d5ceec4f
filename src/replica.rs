//! The SQLite replica: its layout (Zero's, see the reference §12.2), the metadata tables, and
//! the applier that writes one upstream transaction as one SQLite transaction together with its
//! watermark and change-log entries.
//!
//! Invariant: a row's `_0_version`, its change-log entry and `replicationState.stateVersion`
//! are written in the same SQLite transaction, so the replica is always at exactly one upstream
//! commit.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};
use tracing::{debug, info};

use crate::schema::{PublishedSchema, ReplicaTable, ValueKind};
use crate::upstream::quote_ident;

/// Name of the row version column that Zero adds to every replicated table.
pub const ROW_VERSION_COLUMN: &str = "_0_version";

/// Errors from the replica.
#[derive(Debug, thiserror::Error)]
pub enum ReplicaError {
    /// SQLite failed.
    #[error("replica: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// A change refers to something the replica does not know.
    #[error("replica: {0}")]
    Inconsistent(String),
    /// Upstream changed in a way the replica can only follow by a full resync.
    #[error("{0}")]
    NeedsResync(String),
    /// The change DB did not take the transaction (it was rolled back in the replica).
    #[error(transparent)]
    ChangeDb(#[from] crate::change_db::ChangeDbError),
}

/// What the replica records about its origin and position.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaState {
    /// Version of the initial sync (lexi consistent point).
    pub replica_version: String,
    /// Publications replicated, sorted.
    pub publications: Vec<String>,
    /// Watermark of the last applied commit.
    pub watermark: String,
    /// Replication slot this replica streams from.
    pub slot: String,
    /// Upstream system identifier, so a replica is never resumed against another cluster.
    pub system_id: String,
    /// The published schema the replica currently mirrors.
    pub schema: PublishedSchema,
}

/// Opens (or creates) a replica file with the settings for serving and streaming.
pub fn open(path: &Path) -> Result<Connection, ReplicaError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    conn.pragma_update(None, "synchronous", "normal")?;
    conn.pragma_update(None, "busy_timeout", 30_000)?;
    conn.pragma_update(None, "cache_size", -64_000)?;
    Ok(conn)
}

/// Opens a file for initial sync: no journal, no syncs; the file is renamed into place only when
/// complete, so a crash leaves nothing half-written under the replica's name.
pub fn open_for_bulk_load(path: &Path) -> Result<Connection, ReplicaError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "off")?;
    conn.pragma_update(None, "synchronous", "off")?;
    conn.pragma_update(None, "cache_size", -256_000)?;
    conn.pragma_update(None, "temp_store", "memory")?;
    conn.pragma_update(None, "locking_mode", "exclusive")?;
    Ok(conn)
}

/// Creates Zero's metadata tables.
pub fn create_metadata_tables(conn: &Connection) -> Result<(), ReplicaError> {
    conn.execute_batch(
        r#"
CREATE TABLE "_zero.replicationConfig" (
  "replicaVersion" TEXT NOT NULL, "publications" TEXT NOT NULL, "initialSyncContext" TEXT,
  "lock" INT PRIMARY KEY DEFAULT 1 CHECK ("lock" = 1));
CREATE TABLE "_zero.replicationState" (
  "stateVersion" TEXT NOT NULL, "writeTimeMs" INTEGER,
  "lock" INT PRIMARY KEY DEFAULT 1 CHECK ("lock" = 1));
CREATE TABLE "_zero.changeLog2" (
  "stateVersion" TEXT NOT NULL, "pos" INTEGER NOT NULL, "table" TEXT NOT NULL,
  "rowKey" TEXT NOT NULL, "op" TEXT NOT NULL, "backfillingColumnVersions" TEXT DEFAULT '{}',
  PRIMARY KEY ("stateVersion", "pos"), UNIQUE ("table", "rowKey"));
CREATE TABLE "_zero.changeLog" (
  "stateVersion" TEXT NOT NULL, "table" TEXT, "rowKey" TEXT, "op" TEXT);
CREATE TABLE "_zero.runtimeEvents" ("event" TEXT PRIMARY KEY, "timestamp" TEXT);
CREATE TABLE "_zero.column_metadata" (
  "table_name" TEXT NOT NULL, "column_name" TEXT NOT NULL, "upstream_type" TEXT NOT NULL,
  "is_not_null" INTEGER NOT NULL, "is_enum" INTEGER NOT NULL, "is_array" INTEGER NOT NULL,
  "character_max_length" INTEGER, "backfill" TEXT,
  PRIMARY KEY ("table_name", "column_name"));
CREATE TABLE "_zero.tableMetadata" (
  "schema" TEXT NOT NULL, "table" TEXT NOT NULL, "minRowVersion" TEXT NOT NULL DEFAULT '00',
  "upstreamMetadata" TEXT, "metadata" TEXT, PRIMARY KEY ("schema", "table"));
CREATE TABLE "_zero.versionHistory" (
  "dataVersion" INTEGER NOT NULL, "schemaVersion" INTEGER NOT NULL,
  "minSafeVersion" INTEGER NOT NULL, "lock" INT PRIMARY KEY DEFAULT 1 CHECK ("lock" = 1));
INSERT INTO "_zero.versionHistory" ("dataVersion", "schemaVersion", "minSafeVersion") VALUES (7, 7, 1);
CREATE TABLE "_zero.upstreamSchema" (
  "schema" TEXT NOT NULL, "lock" INT PRIMARY KEY DEFAULT 1 CHECK ("lock" = 1));
"#,
    )?;
    Ok(())
}

/// Records where the replica came from and its initial watermark.
pub fn write_initial_state(conn: &Connection, state: &ReplicaState) -> Result<(), ReplicaError> {
    let ctx = serde_json::json!({"slot": state.slot, "systemId": state.system_id});
    conn.execute(
        r#"INSERT INTO "_zero.replicationConfig" ("replicaVersion", "publications", "initialSyncContext") VALUES (?1, ?2, ?3)"#,
        params![
            state.replica_version,
            serde_json::to_string(&state.publications).expect("strings serialize"),
            ctx.to_string()
        ],
    )?;
    conn.execute(
        r#"INSERT INTO "_zero.replicationState" ("stateVersion", "writeTimeMs") VALUES (?1, ?2)"#,
        params![state.watermark, now_ms()],
    )?;
    conn.execute(
        r#"INSERT INTO "_zero.runtimeEvents" ("event", "timestamp") VALUES ('sync', datetime('now'))"#,
        [],
    )?;
    write_schema(conn, &state.schema)?;
    Ok(())
}

fn write_schema(conn: &Connection, schema: &PublishedSchema) -> Result<(), ReplicaError> {
    conn.execute(
        r#"INSERT INTO "_zero.upstreamSchema" ("schema") VALUES (?1)
           ON CONFLICT ("lock") DO UPDATE SET "schema" = excluded."schema""#,
        params![serde_json::to_string(schema).expect("schema serializes")],
    )?;
    Ok(())
}

/// The replica's metadata as stored (publications, context and schema as JSON text).
#[derive(Debug)]
pub struct StoredState {
    pub replica_version: String,
    pub publications: String,
    pub context: Option<String>,
    pub watermark: String,
    pub schema: String,
}

/// Reads the replica's metadata without parsing it, `None` before it exists: the view engine
/// reads it on every watermark and compares the schema text instead of parsing the schema.
pub fn read_stored_state(conn: &Connection) -> Result<Option<StoredState>, ReplicaError> {
    let has: i64 = conn
        .prepare_cached(
            "SELECT count(*) FROM sqlite_master WHERE name IN ('_zero.replicationConfig', '_zero.replicationState', '_zero.upstreamSchema')",
        )?
        .query_row([], |r| r.get(0))?;
    if has != 3 {
        return Ok(None);
    }
    Ok(conn
        .prepare_cached(
            r#"SELECT c."replicaVersion", c."publications", c."initialSyncContext", s."stateVersion", u."schema"
               FROM "_zero.replicationConfig" c, "_zero.replicationState" s, "_zero.upstreamSchema" u"#,
        )?
        .query_row([], |r| {
            Ok(StoredState {
                replica_version: r.get(0)?,
                publications: r.get(1)?,
                context: r.get(2)?,
                watermark: r.get(3)?,
                schema: r.get(4)?,
            })
        })
        .optional()?)
}

/// The replica and state versions, read only if the stored upstream schema equals `schema`
/// (compared inside SQLite, so the text is not copied out): the view engine's check on every
/// commit. `None` when it differs; an error also when the metadata tables are missing.
pub fn read_versions_if_schema(
    conn: &Connection,
    schema: &str,
) -> Result<Option<(String, String)>, ReplicaError> {
    Ok(conn
        .prepare_cached(
            r#"SELECT c."replicaVersion", s."stateVersion", u."schema" = ?1
               FROM "_zero.replicationConfig" c, "_zero.replicationState" s, "_zero.upstreamSchema" u"#,
        )?
        .query_row([schema], |r| {
            Ok((r.get(0)?, r.get(1)?, r.get::<_, bool>(2)?))
        })
        .optional()?
        .and_then(|(replica_version, watermark, same)| same.then_some((replica_version, watermark))))
}

/// Reads the replica's state; `None` if the file is not a complete replica.
pub fn read_state(conn: &Connection) -> Result<Option<ReplicaState>, ReplicaError> {
    let Some(StoredState {
        replica_version,
        publications: pubs,
        context: ctx,
        watermark,
        schema,
    }) = read_stored_state(conn)?
    else {
        return Ok(None);
    };
    let bad =
        |what: &str| ReplicaError::Inconsistent(format!("unreadable {what} in replica metadata"));
    let publications: Vec<String> = serde_json::from_str(&pubs).map_err(|_| bad("publications"))?;
    let ctx: serde_json::Value = serde_json::from_str(ctx.as_deref().unwrap_or("{}"))
        .map_err(|_| bad("initialSyncContext"))?;
    let schema: PublishedSchema = serde_json::from_str(&schema).map_err(|_| bad("schema"))?;
    Ok(Some(ReplicaState {
        replica_version,
        publications,
        watermark,
        slot: ctx["slot"].as_str().unwrap_or_default().to_string(),
        system_id: ctx["systemId"].as_str().unwrap_or_default().to_string(),
        schema,
    }))
}

/// Runs VACUUM when the last one (or the initial sync) is at least `hours` old, and records it.
/// Deletes and updates leave free pages that only VACUUM returns to the file system.
pub fn vacuum_if_due(path: &Path, hours: f64) -> Result<bool, ReplicaError> {
    let conn = open(path)?;
    let age_hours: Option<f64> = conn
        .query_row(
            r#"SELECT (julianday('now') - julianday(max("timestamp"))) * 24 FROM "_zero.runtimeEvents" WHERE "event" IN ('vacuum', 'sync')"#,
            [],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    if age_hours.is_some_and(|a| a < hours) {
        return Ok(false);
    }
    let started = std::time::Instant::now();
    conn.execute_batch("VACUUM")?;
    conn.execute(
        r#"INSERT INTO "_zero.runtimeEvents" ("event", "timestamp") VALUES ('vacuum', datetime('now'))
           ON CONFLICT ("event") DO UPDATE SET "timestamp" = excluded."timestamp""#,
        [],
    )?;
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "vacuumed replica"
    );
    Ok(true)
}

/// `CREATE TABLE` for a replicated table: no primary key declared, `_0_version` last.
pub fn create_table_sql(t: &ReplicaTable, initial_version: &str) -> String {
    let mut cols: Vec<String> = t
        .columns
        .iter()
        .map(|c| format!("{} {}", quote_ident(&c.name), quote_ident(&c.declared_type)))
        .collect();
    cols.push(format!(
        "{} TEXT DEFAULT '{}'",
        quote_ident(ROW_VERSION_COLUMN),
        initial_version.replace('\'', "''")
    ));
    format!(
        "CREATE TABLE {} ({})",
        quote_ident(&t.name),
        cols.join(", ")
    )
}

/// Creates the table's indexes, including the unique index over its row key.
pub fn create_indexes(conn: &Connection, t: &ReplicaTable) -> Result<(), ReplicaError> {
    let mut key_covered = false;
    for i in &t.indexes {
        let cols: Vec<String> = i
            .columns
            .iter()
            .map(|(c, dir)| {
                format!(
                    "{} {}",
                    quote_ident(c),
                    if dir == "DESC" { "DESC" } else { "ASC" }
                )
            })
            .collect();
        let is_key = i.unique && i.columns.iter().map(|(c, _)| c).eq(t.key.iter());
        key_covered |= is_key;
        conn.execute_batch(&format!(
            "CREATE {}INDEX IF NOT EXISTS {} ON {} ({})",
            if i.unique { "UNIQUE " } else { "" },
            quote_ident(&i.name),
            quote_ident(&t.name),
            cols.join(", ")
        ))?;
    }
    if !key_covered {
        conn.execute_batch(&format!(
            "CREATE UNIQUE INDEX IF NOT EXISTS {} ON {} ({})",
            quote_ident(&format!("{}_key", t.name)),
            quote_ident(&t.name),
            t.key
                .iter()
                .map(|c| quote_ident(c))
                .collect::<Vec<_>>()
                .join(", ")
        ))?;
    }
    Ok(())
}

fn drop_indexes(conn: &Connection, table: &str) -> Result<(), ReplicaError> {
    let names: Vec<String> = conn
        .prepare("SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 AND sql IS NOT NULL")?
        .query_map([table], |r| r.get(0))?
        .collect::<Result<_, _>>()?;
    for n in names {
        conn.execute_batch(&format!("DROP INDEX {}", quote_ident(&n)))?;
    }
    Ok(())
}

/// Writes `_zero.column_metadata` and `_zero.tableMetadata` rows for a table.
pub fn write_table_metadata(conn: &Connection, t: &ReplicaTable) -> Result<(), ReplicaError> {
    conn.execute(
        r#"DELETE FROM "_zero.column_metadata" WHERE "table_name" = ?1"#,
        [&t.name],
    )?;
    let mut stmt = conn.prepare(
        r#"INSERT INTO "_zero.column_metadata" ("table_name", "column_name", "upstream_type", "is_not_null", "is_enum", "is_array", "character_max_length")
           VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)"#,
    )?;
    for c in &t.columns {
        stmt.execute(params![
            t.name,
            c.name,
            c.upstream.type_name,
            c.upstream.not_null,
            c.upstream.is_enum,
            c.upstream.is_array,
            c.upstream.max_len
        ])?;
    }
    conn.execute(
        r#"INSERT INTO "_zero.tableMetadata" ("schema", "table", "upstreamMetadata") VALUES (?1, ?2, ?3)
           ON CONFLICT DO UPDATE SET "upstreamMetadata" = excluded."upstreamMetadata""#,
        params![
            t.schema,
            t.upstream_name,
            serde_json::json!({"oid": t.oid, "key": t.key}).to_string()
        ],
    )?;
    Ok(())
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// One row value as a change carries it: a value, or "unchanged" (a TOASTed value left out).
#[derive(Debug, Clone, PartialEq)]
pub enum ColumnValue {
    /// The new value.
    Set(Value),
    /// Keep the stored value.
    Unchanged,
}

/// Writes upstream transactions into the replica.
pub struct Applier {
    conn: Connection,
    /// Tables by replica name.
    tables: BTreeMap<String, ReplicaTable>,
    /// Replica name by upstream oid.
    by_oid: HashMap<i64, String>,
    schema: PublishedSchema,
    /// Watermark of the open transaction, if any.
    open: Option<String>,
    /// Position of the next change-log entry in the open transaction.
    pos: i64,
    watermark: String,
    /// The open transaction's calls, when the replica keeps a change log (`changelog`).
    log: Option<Vec<crate::changelog::Change>>,
    logging: bool,
    /// Where the log goes instead of the replica's own change log (`ZERO_CHANGE_DB`).
    sink: Option<crate::change_db::ChangeSink>,
}

impl Applier {
    /// Takes over an open replica connection whose state was read as `state`. Transactions
    /// are also appended to the replica's change log if it has one (`changelog::enable`).
    pub fn new(conn: Connection, state: &ReplicaState) -> Applier {
        let logging = crate::changelog::enabled(&conn).unwrap_or(false);
        let mut a = Applier {
            log: None,
            logging,
            sink: None,
            conn,
            tables: BTreeMap::new(),
            by_oid: HashMap::new(),
            schema: PublishedSchema::default(),
            open: None,
            pos: 0,
            watermark: state.watermark.clone(),
        };
        a.set_schema(state.schema.clone());
        a
    }

    fn set_schema(&mut self, schema: PublishedSchema) {
        self.tables = schema.replica_tables();
        self.by_oid = self
            .tables
            .values()
            .map(|t| (t.oid, t.name.clone()))
            .collect();
        self.schema = schema;
    }

    /// Stores every later transaction in the change DB before its SQLite commit (a failure
    /// there rolls the replica's transaction back), instead of in the replica's own log.
    pub fn set_sink(&mut self, sink: crate::change_db::ChangeSink) {
        self.logging = true;
        self.sink = Some(sink);
    }

    /// The watermark of the last committed transaction.
    pub fn watermark(&self) -> &str {
        &self.watermark
    }

    /// The schema the replica mirrors now.
    pub fn schema(&self) -> &PublishedSchema {
        &self.schema
    }

    /// The replicated table with this upstream oid.
    pub fn table_by_oid(&self, oid: i64) -> Option<&ReplicaTable> {
        self.by_oid.get(&oid).and_then(|n| self.tables.get(n))
    }

    /// Starts the SQLite transaction for an upstream transaction committing at `version`.
    pub fn begin(&mut self, version: String) -> Result<(), ReplicaError> {
        if self.open.is_some() {
            return Err(ReplicaError::Inconsistent(
                "begin inside an open transaction".into(),
            ));
        }
        self.conn.execute_batch("BEGIN IMMEDIATE")?;
        self.open = Some(version);
        self.pos = 0;
        self.log = self.logging.then(Vec::new);
        Ok(())
    }

    fn version(&self) -> Result<&str, ReplicaError> {
        self.open
            .as_deref()
            .ok_or_else(|| ReplicaError::Inconsistent("change outside a transaction".into()))
    }

    fn log(&mut self, table: &str, row_key: &str, op: &str) -> Result<(), ReplicaError> {
        let version = self.version()?.to_string();
        let pos = self.pos;
        self.pos += 1;
        self.conn
            .prepare_cached(
                r#"INSERT OR REPLACE INTO "_zero.changeLog2" ("stateVersion", "pos", "table", "rowKey", "op") VALUES (?1, ?2, ?3, ?4, ?5)"#,
            )?
            .execute(params![version, pos, table, row_key, op])?;
        Ok(())
    }

    /// Inserts or replaces a row given in table column order.
    pub fn upsert(&mut self, table: &str, row: &[ColumnValue]) -> Result<(), ReplicaError> {
        let t = self
            .tables
            .get(table)
            .ok_or_else(|| ReplicaError::Inconsistent(format!("unknown table \"{table}\"")))?;
        let version = self.version()?.to_string();
        let mut names = Vec::with_capacity(row.len() + 1);
        let mut values: Vec<&Value> = Vec::with_capacity(row.len() + 1);
        for (c, v) in t.columns.iter().zip(row) {
            if let ColumnValue::Set(v) = v {
                names.push(quote_ident(&c.name));
                values.push(v);
            }
        }
        let key = row_key(t, row)?;
        names.push(quote_ident(ROW_VERSION_COLUMN));
        let version_value = Value::Text(version);
        values.push(&version_value);
        let updates: Vec<String> = names
            .iter()
            .map(|n| format!("{n} = excluded.{n}"))
            .collect();
        let sql = format!(
            "INSERT INTO {} ({}) VALUES ({}) ON CONFLICT ({}) DO UPDATE SET {}",
            quote_ident(&t.name),
            names.join(", "),
            vec!["?"; names.len()].join(", "),
            t.key
                .iter()
                .map(|k| quote_ident(k))
                .collect::<Vec<_>>()
                .join(", "),
            updates.join(", ")
        );
        self.conn
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(values))?;
        let name = t.name.clone();
        if let Some(log) = &mut self.log {
            log.push(crate::changelog::Change::Upsert {
                table: name.clone(),
                row: crate::changelog::wire_row(row),
            });
        }
        self.log(&name, &key, "s")
    }

    /// Deletes the row with the key found in `old` (table column order; non-key columns ignored).
    pub fn delete(&mut self, table: &str, old: &[ColumnValue]) -> Result<(), ReplicaError> {
        let t = self
            .tables
            .get(table)
            .ok_or_else(|| ReplicaError::Inconsistent(format!("unknown table \"{table}\"")))?;
        let key = row_key(t, old)?;
        let mut vals = Vec::new();
        for k in &t.key {
            let i = t.column_index(k).expect("key columns are synced columns");
            match &old[i] {
                ColumnValue::Set(v) => vals.push(v.clone()),
                ColumnValue::Unchanged => {
                    return Err(ReplicaError::Inconsistent(format!(
                        "delete from \"{table}\" without key column \"{k}\""
                    )));
                }
            }
        }
        let sql = format!(
            "DELETE FROM {} WHERE {}",
            quote_ident(&t.name),
            t.key
                .iter()
                .map(|k| format!("{} IS ?", quote_ident(k)))
                .collect::<Vec<_>>()
                .join(" AND ")
        );
        self.conn
            .prepare_cached(&sql)?
            .execute(rusqlite::params_from_iter(vals))?;
        let name = t.name.clone();
        if let Some(log) = &mut self.log {
            log.push(crate::changelog::Change::Delete {
                table: name.clone(),
                old: crate::changelog::wire_row(old),
            });
        }
        self.log(&name, &key, "d")
    }

    /// Whether `old` and `new` have the same row key.
    pub fn same_key(&self, table: &str, old: &[ColumnValue], new: &[ColumnValue]) -> bool {
        match self.tables.get(table) {
            Some(t) => t.key.iter().all(|k| {
                let i = t.column_index(k).expect("key columns are synced columns");
                matches!(old[i], ColumnValue::Unchanged) || old[i] == new[i]
            }),
            None => true,
        }
    }

    /// Removes every row of a table.
    pub fn truncate(&mut self, table: &str) -> Result<(), ReplicaError> {
        if let Some(log) = &mut self.log {
            log.push(crate::changelog::Change::Truncate {
                table: table.to_string(),
            });
        }
        self.conn
            .execute_batch(&format!("DELETE FROM {}", quote_ident(table)))?;
        self.conn.execute(
            r#"DELETE FROM "_zero.changeLog2" WHERE "table" = ?1"#,
            [table],
        )?;
        let version = self.version()?.to_string();
        self.log(table, &version, "t")
    }

    fn reset(&mut self, table: &str) -> Result<(), ReplicaError> {
        self.conn.execute(
            r#"DELETE FROM "_zero.changeLog2" WHERE "table" = ?1"#,
            [table],
        )?;
        let version = self.version()?.to_string();
        self.log(table, &version, "r")
    }

    /// Commits the open transaction and makes its version the watermark.
    pub fn commit(&mut self) -> Result<String, ReplicaError> {
        let version = self
            .open
            .take()
            .ok_or_else(|| ReplicaError::Inconsistent("commit without begin".into()))?;
        self.conn
            .prepare_cached(
                r#"UPDATE "_zero.replicationState" SET "stateVersion" = ?1, "writeTimeMs" = ?2"#,
            )?
            .execute(params![version, now_ms()])?;
        if let Some(log) = self.log.take() {
            match &mut self.sink {
                Some(sink) => {
                    // Durable in the change DB first: see `change_db` for the restart rule.
                    if let Err(e) = sink.store(&version, &log) {
                        self.open = Some(version);
                        self.rollback()?;
                        return Err(e.into());
                    }
                }
                None => crate::changelog::append(&self.conn, &version, &log)?,
            }
        }
        self.conn.execute_batch("COMMIT")?;
        self.watermark = version.clone();
        Ok(version)
    }

    /// Abandons the open transaction (the connection to upstream broke mid-transaction).
    pub fn rollback(&mut self) -> Result<(), ReplicaError> {
        self.log = None;
        if self.open.take().is_some() {
            self.conn.execute_batch("ROLLBACK")?;
            // Cached statements may describe tables whose DDL was rolled back.
            self.conn.flush_prepared_statement_cache();
            if let Some(state) = read_state(&self.conn)? {
                self.set_schema(state.schema);
            }
        }
        Ok(())
    }

    /// Brings the replica's tables to `new` inside the open transaction: creates, drops and
    /// renames tables, adds, drops, renames and retypes columns, and rebuilds indexes. Tables
    /// whose shape changed get a reset entry in the change log.
    pub fn apply_schema(&mut self, new: PublishedSchema) -> Result<bool, ReplicaError> {
        if new == self.schema {
            return Ok(false);
        }
        if let Some(log) = &mut self.log {
            log.push(crate::changelog::Change::Schema {
                schema: Box::new(new.clone()),
            });
        }
        self.apply_schema_inner(new)?;
        Ok(true)
    }

    /// Tables (by oid) that are replicated under `new` but not now.
    pub fn new_tables(&self, new: &PublishedSchema) -> Vec<(i64, String)> {
        new.replica_tables()
            .into_values()
            .filter(|t| !self.by_oid.contains_key(&t.oid))
            .map(|t| (t.oid, t.name))
            .collect()
    }

    fn apply_schema_inner(&mut self, new: PublishedSchema) -> Result<(), ReplicaError> {
        let version = self.version()?.to_string();
        let old_tables: HashMap<i64, ReplicaTable> =
            self.tables.values().map(|t| (t.oid, t.clone())).collect();
        let new_tables = new.replica_tables();
        let new_by_oid: HashMap<i64, &ReplicaTable> =
            new_tables.values().map(|t| (t.oid, t)).collect();
        let mut reset = Vec::new();
        // Drops first, so that a table replaced under the same name can be created.
        for (oid, t) in &old_tables {
            if !new_by_oid.contains_key(oid) {
                info!(table = %t.name, "dropping table from replica");
                self.conn
                    .execute_batch(&format!("DROP TABLE IF EXISTS {}", quote_ident(&t.name)))?;
                self.conn.execute(
                    r#"DELETE FROM "_zero.column_metadata" WHERE "table_name" = ?1"#,
                    [&t.name],
                )?;
                self.conn.execute(
                    r#"DELETE FROM "_zero.tableMetadata" WHERE "schema" = ?1 AND "table" = ?2"#,
                    [&t.schema, &t.upstream_name],
                )?;
                reset.push(t.name.clone());
            }
        }
        for (oid, nt) in &new_by_oid {
            match old_tables.get(oid) {
                None => {
                    info!(table = %nt.name, "creating table in replica");
                    self.conn.execute_batch(&create_table_sql(nt, &version))?;
                    create_indexes(&self.conn, nt)?;
                    write_table_metadata(&self.conn, nt)?;
                }
                Some(ot) if ot != *nt => {
                    self.alter_table(ot, nt, &new)?;
                    reset.push(nt.name.clone());
                }
                Some(_) => {}
            }
        }
        self.conn.flush_prepared_statement_cache();
        write_schema(&self.conn, &new)?;
        self.set_schema(new);
        for t in reset {
            self.reset(&t)?;
        }
        Ok(())
    }

    fn alter_table(
        &mut self,
        ot: &ReplicaTable,
        nt: &ReplicaTable,
        new: &PublishedSchema,
    ) -> Result<(), ReplicaError> {
        info!(table = %nt.name, "altering table in replica");
        drop_indexes(&self.conn, &ot.name)?;
        if ot.name != nt.name {
            self.conn.execute_batch(&format!(
                "ALTER TABLE {} RENAME TO {}",
                quote_ident(&ot.name),
                quote_ident(&nt.name)
            ))?;
            self.conn.execute(
                r#"DELETE FROM "_zero.changeLog2" WHERE "table" = ?1"#,
                [&ot.name],
            )?;
            self.conn.execute(
                r#"DELETE FROM "_zero.tableMetadata" WHERE "schema" = ?1 AND "table" = ?2"#,
                [&ot.schema, &ot.upstream_name],
            )?;
        }
        let table = quote_ident(&nt.name);
        for oc in &ot.columns {
            match nt.columns.iter().find(|c| c.attnum == oc.attnum) {
                None => {
                    self.conn.execute_batch(&format!(
                        "ALTER TABLE {table} DROP COLUMN {}",
                        quote_ident(&oc.name)
                    ))?;
                }
                Some(nc) => {
                    if nc.name != oc.name {
                        self.conn.execute_batch(&format!(
                            "ALTER TABLE {table} RENAME COLUMN {} TO {}",
                            quote_ident(&oc.name),
                            quote_ident(&nc.name)
                        ))?;
                    }
                    if nc.declared_type != oc.declared_type {
                        // SQLite cannot change a declared type: copy through a new column.
                        let tmp = quote_ident(&format!("{}__zero_tmp", nc.name));
                        let col = quote_ident(&nc.name);
                        let cast = match nc.kind {
                            ValueKind::Int => format!("CAST({col} AS INTEGER)"),
                            ValueKind::Float => format!("CAST({col} AS REAL)"),
                            ValueKind::Text
                            | ValueKind::Uuid
                            | ValueKind::Json
                            | ValueKind::Jsonb => {
                                format!("CAST({col} AS TEXT)")
                            }
                            _ => col.clone(),
                        };
                        self.conn.execute_batch(&format!(
                            "ALTER TABLE {table} ADD COLUMN {tmp} {ty};
                             UPDATE {table} SET {tmp} = {cast};
                             ALTER TABLE {table} DROP COLUMN {col};
                             ALTER TABLE {table} RENAME COLUMN {tmp} TO {col};",
                            ty = quote_ident(&nc.declared_type),
                        ))?;
                    }
                }
            }
        }
        let upstream = new
            .tables
            .iter()
            .find(|t| t.oid == nt.oid)
            .expect("replica tables come from the schema");
        for nc in &nt.columns {
            if !ot.columns.iter().any(|c| c.attnum == nc.attnum) {
                // Existing rows get the value Postgres fills in for them (attmissingval), which
                // the schema function reports as the column default when it is a constant.
                let expr = upstream
                    .columns
                    .iter()
                    .find(|c| c.attnum == nc.attnum)
                    .and_then(|c| c.default.as_deref());
                let default = match expr {
                    None => None,
                    Some(d) => match constant_default(nc.kind, d) {
                        Some(v) => Some(v),
                        // Postgres computed a value per existing row (e.g. a sequence), which
                        // the stream never carries.
                        None => {
                            return Err(ReplicaError::NeedsResync(format!(
                                "column \"{}\" of \"{}\" was added with the non-constant default {d}",
                                nc.name, nt.name
                            )));
                        }
                    },
                };
                self.conn.execute_batch(&format!(
                    "ALTER TABLE {table} ADD COLUMN {} {}",
                    quote_ident(&nc.name),
                    quote_ident(&nc.declared_type)
                ))?;
                if let Some(v) = default {
                    self.conn.execute(
                        &format!("UPDATE {table} SET {} = ?1", quote_ident(&nc.name)),
                        [v],
                    )?;
                }
            }
        }
        // Reorder nothing: SQLite keeps added columns at the end, and `_0_version` with them.
        create_indexes(&self.conn, nt)?;
        write_table_metadata(&self.conn, nt)?;
        debug!(table = %nt.name, "table altered");
        Ok(())
    }
}

/// Evaluates a column default that is a constant literal (`'abc'::text`, `42`, `true`).
fn constant_default(kind: ValueKind, expr: &str) -> Option<Value> {
    let expr = expr.trim();
    let literal = if let Some(rest) = expr.strip_prefix('\'') {
        let end = rest.rfind('\'')?;
        let tail = &rest[end + 1..];
        if !(tail.is_empty() || tail.starts_with("::")) {
            return None;
        }
        rest[..end].replace("''", "'")
    } else if expr
        .bytes()
        .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.' | b'e' | b'E'))
        || expr == "true"
        || expr == "false"
    {
        expr.to_string()
    } else {
        let (lit, _) = expr.split_once("::")?;
        let lit = lit.trim_matches(|c| c == '(' || c == ')');
        if lit
            .bytes()
            .all(|b| b.is_ascii_digit() || matches!(b, b'-' | b'.'))
        {
            lit.to_string()
        } else {
            return None;
        }
    };
    crate::pgvalue::from_text(kind, &literal).ok()
}

/// The change-log key of a row: a JSON object of its key columns in key order.
pub fn row_key(t: &ReplicaTable, row: &[ColumnValue]) -> Result<String, ReplicaError> {
    let mut obj = serde_json::Map::new();
    for k in &t.key {
        let i = t.column_index(k).expect("key columns are synced columns");
        let v = match row.get(i) {
            Some(ColumnValue::Set(v)) => sql_to_json(v),
            _ => {
                return Err(ReplicaError::Inconsistent(format!(
                    "row of \"{}\" lacks key column \"{k}\"",
                    t.name
                )));
            }
        };
        obj.insert(k.clone(), v);
    }
    Ok(serde_json::Value::Object(obj).to_string())
}

fn sql_to_json(v: &Value) -> serde_json::Value {
    match v {
        Value::Null => serde_json::Value::Null,
        Value::Integer(i) => (*i).into(),
        Value::Real(f) => serde_json::Number::from_f64(*f)
            .map(serde_json::Value::Number)
            .unwrap_or(serde_json::Value::Null),
        Value::Text(s) => s.clone().into(),
        Value::Blob(b) => serde_json::Value::String(b.iter().map(|x| format!("{x:02x}")).collect()),
    }
}
