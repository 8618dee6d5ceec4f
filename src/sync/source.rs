//! Where view rows come from. [`ViewSource`] is the seam between the view-syncer (CVR, pokes)
//! and query evaluation, so that the incremental engine (`zero-dataflow`) can replace the
//! first implementation, [`SqlViewSource`], which re-evaluates affected queries with the SQL
//! evaluator of `zero-queries` over a read snapshot of the replica.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use rusqlite::{Connection, OpenFlags, OptionalExtension};
use serde_json::Value as Json;
use tracing::{debug, warn};
use zero_queries::Value;
use zero_queries::ast::Ast;
use zero_queries::schema::Schema;
use zero_queries::sql::{self, SqlValue, Statement};

use crate::schema::{PublishedSchema, ReplicaTable, ZqlType};
use crate::sync::cvr::RowId;
use crate::sync::fetch::error_chain;
use crate::sync::protocol::RowJson;

/// Column carrying the version of the commit that last wrote a row.
pub const VERSION_COLUMN: &str = "_0_version";

/// Why evaluating or reading the replica failed.
#[derive(Debug, thiserror::Error)]
pub enum SourceError {
    /// SQLite failed.
    #[error("replica: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The replica is not (yet) complete.
    #[error("replica is not ready")]
    NotReady,
    /// The replica metadata could not be read.
    #[error(transparent)]
    Replica(#[from] crate::replica::ReplicaError),
    /// The query does not fit the replica.
    #[error("query: {0}")]
    Query(String),
}

/// One row a query syncs.
#[derive(Debug, Clone, PartialEq)]
pub struct SyncedRow {
    /// Replica table name.
    pub table: String,
    /// Primary-key JSON (client-schema key, in key order): the row's identity in the CVR.
    pub key: String,
    /// `_0_version`.
    pub version: String,
    /// The row as the client receives it (no `_0_version`), rendered once.
    pub value: RowJson,
}

impl SyncedRow {
    /// The CVR identity of the row.
    pub fn id(&self) -> RowId {
        (self.table.clone(), self.key.clone())
    }
}

/// What a snapshot of the replica looks like relative to the last one processed.
#[derive(Debug, Clone, PartialEq)]
pub struct SnapshotInfo {
    /// Replica state version (watermark).
    pub state_version: String,
    /// Replica identity (initial sync version).
    pub replica_version: String,
    /// Tables changed since the previous snapshot; `None` means everything (reset, schema
    /// change, first snapshot).
    pub changed: Option<BTreeSet<String>>,
}

/// The re-evaluated rows of the queries a change affected: per query hash, its rows or why
/// they could not be computed.
pub type Advanced = Vec<(String, Result<Vec<SyncedRow>, SourceError>)>;

/// Evaluates queries over the replica for one client group.
pub trait ViewSource: Send {
    /// Pins a read snapshot of the current replica state and reports what changed since the
    /// state version `since` (the one the group's rows reflect).
    fn begin(&mut self, since: Option<&str>) -> Result<SnapshotInfo, SourceError>;
    /// Adds (or replaces) query `hash` and returns all its rows at the snapshot.
    fn hydrate(&mut self, hash: &str, ast: &Ast) -> Result<Vec<SyncedRow>, SourceError>;
    /// The queries whose rows may differ after `info.changed`, with their rows at the snapshot.
    fn advance(&mut self, info: &SnapshotInfo) -> Result<Advanced, SourceError>;
    /// Forgets query `hash`.
    fn remove(&mut self, hash: &str);
    /// Whether query `hash` is loaded.
    fn has(&self, hash: &str) -> bool;
    /// Reads rows by key at the snapshot (`None` when gone), for catching clients up.
    fn lookup(&mut self, table: &str, key: &str) -> Result<Option<Json>, SourceError>;
    /// Reads raw SQL at the snapshot (internal queries: LMIDs, mutation results, permissions).
    fn query_json(&mut self, sql: &str, params: &[SqlValue])
    -> Result<Vec<Vec<Json>>, SourceError>;
    /// The replica's tables (for the client-schema check).
    fn tables(&self) -> &BTreeMap<String, ReplicaTable>;
    /// Whether a snapshot is pinned.
    fn active(&self) -> bool;
    /// Sets the client schema's primary keys, which identify rows and complete orderings.
    fn set_client_keys(&mut self, keys: BTreeMap<String, Vec<String>>);
    /// Releases the snapshot.
    fn end(&mut self);
}

/// Read connections to the replica shared by every client group, so that a group costs no file
/// descriptors of its own: a read takes a connection for the duration of one statement (or of
/// one pinned snapshot) and puts it back. Connections to a replaced replica file (a resync
/// renames a new file into place) are dropped rather than reused.
#[derive(Debug)]
pub struct ReaderPool {
    path: PathBuf,
    idle: Mutex<Vec<(Connection, u64)>>,
    max_idle: usize,
    /// The replica's tables and query schema (with the replica's own keys) for the latest
    /// published schema, shared by every group whose client keys equal the replica's: a copy
    /// per group would cost each of ten thousand groups its own.
    shared_schema: Mutex<Option<Arc<SourceSchema>>>,
}

/// A published schema as the SQL source uses it.
#[derive(Debug)]
struct SourceSchema {
    published: PublishedSchema,
    tables: BTreeMap<String, ReplicaTable>,
    schema: Schema,
}

/// A connection taken from a [`ReaderPool`]; it goes back when dropped.
pub struct PooledReader {
    pool: Arc<ReaderPool>,
    conn: Option<(Connection, u64)>,
}

impl std::ops::Deref for PooledReader {
    type Target = Connection;
    fn deref(&self) -> &Connection {
        &self.conn.as_ref().expect("held until drop").0
    }
}

impl Drop for PooledReader {
    fn drop(&mut self) {
        if let Some(c) = self.conn.take() {
            // A snapshot left open (an error between BEGIN and its end) must not be reused.
            if !c.0.is_autocommit() && c.0.execute_batch("ROLLBACK").is_err() {
                return;
            }
            let mut idle = self.pool.idle.lock().expect("reader pool");
            if idle.len() < self.pool.max_idle {
                idle.push(c);
            }
        }
    }
}

impl ReaderPool {
    /// A pool over the replica at `path` keeping at most `max_idle` idle connections.
    pub fn new(path: PathBuf, max_idle: usize) -> Arc<ReaderPool> {
        Arc::new(ReaderPool {
            path,
            idle: Mutex::new(Vec::new()),
            max_idle: max_idle.max(1),
            shared_schema: Mutex::new(None),
        })
    }

    /// A connection to the current replica file (opened when none is idle).
    pub fn get(self: &Arc<Self>) -> Result<PooledReader, SourceError> {
        use std::os::unix::fs::MetadataExt;
        let ino = std::fs::metadata(&self.path)
            .map_err(|_| SourceError::NotReady)?
            .ino();
        let reused = {
            let mut idle = self.idle.lock().expect("reader pool");
            idle.retain(|(_, i)| *i == ino);
            idle.pop()
        };
        let conn = match reused {
            Some(c) => c,
            None => {
                let conn = Connection::open_with_flags(
                    &self.path,
                    OpenFlags::SQLITE_OPEN_READ_WRITE | OpenFlags::SQLITE_OPEN_NO_MUTEX,
                )?;
                conn.pragma_update(None, "busy_timeout", 30_000)?;
                conn.pragma_update(None, "cache_size", -2048)?;
                (conn, ino)
            }
        };
        Ok(PooledReader {
            pool: self.clone(),
            conn: Some(conn),
        })
    }
}

/// [`ViewSource`] by SQL re-evaluation: each query's AST is evaluated with
/// `zero_queries::sql::evaluate`; on a new watermark every query that reads a changed table
/// is evaluated again and the view-syncer diffs the result against the CVR.
pub struct SqlViewSource {
    readers: Arc<ReaderPool>,
    /// The pinned snapshot (inside `BEGIN`) between `begin` and `end`.
    conn: Option<PooledReader>,
    /// The published schema, its tables and the query schema (shared through the pool when
    /// the client keys are the replica's).
    schema: Arc<SourceSchema>,
    /// Primary keys from the client schema, which override the replica's row keys.
    client_keys: BTreeMap<String, Vec<String>>,
    queries: HashMap<String, (Ast, BTreeSet<String>)>,
}

impl SqlViewSource {
    /// A source over the replica at `path`; `client_keys` are the client schema's primary keys.
    pub fn new(
        readers: Arc<ReaderPool>,
        client_keys: BTreeMap<String, Vec<String>>,
    ) -> SqlViewSource {
        SqlViewSource {
            readers,
            conn: None,
            schema: Arc::new(SourceSchema {
                published: PublishedSchema::default(),
                tables: BTreeMap::new(),
                schema: Schema::default(),
            }),
            client_keys,
            queries: HashMap::new(),
        }
    }

    fn conn(&self) -> Result<&Connection, SourceError> {
        self.conn.as_deref().ok_or(SourceError::NotReady)
    }

    /// Runs `f` on the snapshot when one is pinned, else on a pooled connection (latest
    /// committed state) taken for this call only.
    fn with_conn<T>(
        &self,
        f: impl FnOnce(&Connection) -> Result<T, SourceError>,
    ) -> Result<T, SourceError> {
        match &self.conn {
            Some(c) => f(c),
            None => f(&*self.readers.get()?),
        }
    }

    /// Sets the schema for `published`: the pool's shared one when this group's client keys
    /// do not change any table's key, else one of its own.
    fn set_schema(&mut self, published: &PublishedSchema) {
        let tables = published.replica_tables();
        let own_keys = self.client_keys.iter().any(|(t, k)| {
            tables
                .get(t)
                .is_some_and(|rt| !crate::sync::ivm::same_key_columns(&rt.key, k))
        });
        if !own_keys {
            let mut shared = self.readers.shared_schema.lock().expect("schema cache");
            if let Some(s) = shared.as_ref()
                && &s.published == published
            {
                self.schema = s.clone();
                return;
            }
            let s = Arc::new(build_schema(published, tables, &BTreeMap::new()));
            *shared = Some(s.clone());
            self.schema = s;
            return;
        }
        self.schema = Arc::new(build_schema(published, tables, &self.client_keys));
    }

    fn key_of(&self, table: &str) -> Vec<String> {
        self.schema
            .schema
            .table(table)
            .map(|t| t.primary_key.clone())
            .unwrap_or_default()
    }

    fn evaluate(&self, ast: &Ast) -> Result<Vec<SyncedRow>, SourceError> {
        let conn = self.conn()?;
        let schema = &self.schema.schema;
        let nodes = sql::evaluate(ast, schema, |stmt: &Statement| run(conn, stmt))
            .map_err(|e| SourceError::Query(error_chain(&e)))?;
        let mut out = Vec::new();
        for (table, row) in sql::synced_rows(&nodes) {
            let Some(t) = schema.table(&table) else {
                continue;
            };
            let mut obj = serde_json::Map::new();
            let mut version = String::new();
            for (c, v) in t.columns.iter().zip(row.iter()) {
                if c.name == VERSION_COLUMN {
                    version = v.as_str().unwrap_or_default().to_string();
                } else {
                    obj.insert(c.name.clone(), v.to_json());
                }
            }
            let mut key = serde_json::Map::new();
            for k in crate::sync::ivm::sorted_key(&t.primary_key) {
                key.insert(k.clone(), obj.get(k).cloned().unwrap_or(Json::Null));
            }
            out.push(SyncedRow {
                table,
                key: Json::Object(key).to_string(),
                version,
                value: RowJson::new(&Json::Object(obj)),
            });
        }
        Ok(out)
    }
}

/// The query schema of the replica's `tables`, with `client_keys` overriding their keys.
fn build_schema(
    published: &PublishedSchema,
    tables: BTreeMap<String, ReplicaTable>,
    client_keys: &BTreeMap<String, Vec<String>>,
) -> SourceSchema {
    let mut out = serde_json::Map::new();
    for (name, t) in &tables {
        let mut cols = serde_json::Map::new();
        for c in &t.columns {
            let ty = match c.kind.zql_type() {
                ZqlType::Number => "number",
                ZqlType::Boolean => "boolean",
                ZqlType::String => "string",
                ZqlType::Json => "json",
            };
            cols.insert(c.name.clone(), serde_json::json!({ "type": ty }));
        }
        cols.insert(VERSION_COLUMN.into(), serde_json::json!({"type": "string"}));
        let pk = client_keys
            .get(name)
            .cloned()
            .unwrap_or_else(|| t.key.clone());
        out.insert(
            name.clone(),
            serde_json::json!({"columns": cols, "primaryKey": pk}),
        );
    }
    let schema = match Schema::from_json_value(&serde_json::json!({ "tables": out })) {
        Ok(s) => s,
        Err(e) => {
            warn!(error = %e, "replica schema could not be loaded for queries");
            Schema::default()
        }
    };
    SourceSchema {
        published: published.clone(),
        tables,
        schema,
    }
}

/// A replica SQL value as a SQLite parameter (shared with the CRUD mutations' replica reads).
pub(crate) fn to_rusqlite(v: &SqlValue) -> rusqlite::types::Value {
    match v {
        SqlValue::Null => rusqlite::types::Value::Null,
        SqlValue::Integer(i) => rusqlite::types::Value::Integer(*i),
        SqlValue::Real(f) => rusqlite::types::Value::Real(*f),
        SqlValue::Text(t) => rusqlite::types::Value::Text(t.clone()),
    }
}

/// A SQLite value read from the replica (blobs are not replicated; they read as null).
pub(crate) fn from_rusqlite(v: rusqlite::types::Value) -> SqlValue {
    match v {
        rusqlite::types::Value::Null | rusqlite::types::Value::Blob(_) => SqlValue::Null,
        rusqlite::types::Value::Integer(i) => SqlValue::Integer(i),
        rusqlite::types::Value::Real(f) => SqlValue::Real(f),
        rusqlite::types::Value::Text(t) => SqlValue::Text(t),
    }
}

fn run(conn: &Connection, stmt: &Statement) -> Result<Vec<Vec<SqlValue>>, rusqlite::Error> {
    let mut st = conn.prepare_cached(&stmt.sql)?;
    let params: Vec<rusqlite::types::Value> = stmt.params.iter().map(to_rusqlite).collect();
    let n = stmt.columns.len();
    let rows = st.query_map(rusqlite::params_from_iter(params), |r| {
        (0..n)
            .map(|i| r.get::<_, rusqlite::types::Value>(i).map(from_rusqlite))
            .collect::<Result<Vec<_>, _>>()
    })?;
    rows.collect()
}

fn sql_to_json(v: rusqlite::types::Value) -> Json {
    match v {
        rusqlite::types::Value::Null | rusqlite::types::Value::Blob(_) => Json::Null,
        rusqlite::types::Value::Integer(i) => Json::from(i),
        rusqlite::types::Value::Real(f) => zero_queries::value::number_to_json(f),
        rusqlite::types::Value::Text(t) => Json::String(t),
    }
}

fn tables_of(ast: &Ast) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    ast.walk(&mut |a| {
        out.insert(a.table.clone());
    });
    out
}

impl ViewSource for SqlViewSource {
    fn begin(&mut self, since: Option<&str>) -> Result<SnapshotInfo, SourceError> {
        self.end();
        let conn = self.readers.get()?;
        conn.execute_batch("BEGIN")?;
        let state = crate::replica::read_state(&conn)?.ok_or(SourceError::NotReady)?;
        let mut changed: Option<BTreeSet<String>> = None;
        if let Some(since) = since {
            let mut set = BTreeSet::new();
            let mut reset = false;
            let mut st = conn.prepare(
                r#"SELECT DISTINCT "table", op FROM "_zero.changeLog2" WHERE "stateVersion" > ?1"#,
            )?;
            for r in st.query_map([since], |r| {
                Ok((r.get::<_, String>(0)?, r.get::<_, String>(1)?))
            })? {
                let (t, op) = r?;
                reset |= op == "r";
                set.insert(t);
            }
            if !reset {
                changed = Some(set);
            }
        }
        if self.schema.published != state.schema || self.schema.tables.is_empty() {
            self.set_schema(&state.schema);
            changed = None;
        }
        self.conn = Some(conn);
        Ok(SnapshotInfo {
            state_version: state.watermark,
            replica_version: state.replica_version,
            changed,
        })
    }

    fn hydrate(&mut self, hash: &str, ast: &Ast) -> Result<Vec<SyncedRow>, SourceError> {
        self.queries
            .insert(hash.to_string(), (ast.clone(), tables_of(ast)));
        let rows = self.evaluate(ast);
        if rows.is_err() {
            self.queries.remove(hash);
        }
        rows
    }

    fn advance(&mut self, info: &SnapshotInfo) -> Result<Advanced, SourceError> {
        let mut out = Vec::new();
        let mut hashes: Vec<&String> = self.queries.keys().collect();
        hashes.sort();
        for h in hashes {
            let (ast, tables) = &self.queries[h];
            let affected = match &info.changed {
                None => true,
                Some(c) => tables.iter().any(|t| c.contains(t)),
            };
            if affected {
                debug!(query = %h, "re-evaluating");
                out.push((h.clone(), self.evaluate(ast)));
            }
        }
        Ok(out)
    }

    fn remove(&mut self, hash: &str) {
        self.queries.remove(hash);
    }

    fn has(&self, hash: &str) -> bool {
        self.queries.contains_key(hash)
    }

    fn lookup(&mut self, table: &str, key: &str) -> Result<Option<Json>, SourceError> {
        let Some(t) = self.schema.schema.table(table) else {
            return Ok(None);
        };
        let key: serde_json::Map<String, Json> =
            serde_json::from_str(key).map_err(|e| SourceError::Query(e.to_string()))?;
        let cols: Vec<zero_queries::schema::Column> = t
            .columns
            .iter()
            .filter(|c| c.name != VERSION_COLUMN)
            .cloned()
            .collect();
        let names: Vec<String> = cols.iter().map(|c| sql::quote_ident(&c.name)).collect();
        let mut conds = Vec::new();
        let mut params = Vec::new();
        for (i, k) in self.key_of(table).iter().enumerate() {
            conds.push(format!("{} = ?{}", sql::quote_ident(k), i + 1));
            let v = Value::from_json(key.get(k).cloned().unwrap_or(Json::Null));
            params.push(to_rusqlite(&sql::to_sql(&v)));
        }
        if conds.is_empty() {
            return Ok(None);
        }
        let q = format!(
            "SELECT {} FROM {} WHERE {}",
            names.join(", "),
            sql::quote_ident(table),
            conds.join(" AND ")
        );
        self.with_conn(|conn| {
            let mut st = conn.prepare_cached(&q)?;
            let row = st
                .query_row(rusqlite::params_from_iter(params), |r| {
                    let mut obj = serde_json::Map::new();
                    for (i, c) in cols.iter().enumerate() {
                        let v = from_rusqlite(r.get::<_, rusqlite::types::Value>(i)?);
                        obj.insert(c.name.clone(), sql::from_sql(c.ty, v).to_json());
                    }
                    Ok(Json::Object(obj))
                })
                .optional()?;
            Ok(row)
        })
    }

    fn query_json(&mut self, q: &str, params: &[SqlValue]) -> Result<Vec<Vec<Json>>, SourceError> {
        self.with_conn(|conn| {
            let mut st = conn.prepare_cached(q)?;
            let n = st.column_count();
            let rows = st.query_map(
                rusqlite::params_from_iter(params.iter().map(to_rusqlite)),
                |r| {
                    (0..n)
                        .map(|i| r.get::<_, rusqlite::types::Value>(i).map(sql_to_json))
                        .collect::<Result<Vec<_>, _>>()
                },
            )?;
            Ok(rows.collect::<Result<_, _>>()?)
        })
    }

    fn tables(&self) -> &BTreeMap<String, ReplicaTable> {
        &self.schema.tables
    }

    fn active(&self) -> bool {
        self.conn.is_some()
    }

    fn set_client_keys(&mut self, keys: BTreeMap<String, Vec<String>>) {
        if keys != self.client_keys {
            self.client_keys = keys;
            let published = self.schema.published.clone();
            if !self.schema.tables.is_empty() {
                self.set_schema(&published);
            }
        }
    }

    fn end(&mut self) {
        if let Some(c) = self.conn.take() {
            let _ = c.execute_batch("COMMIT");
        }
    }
}
