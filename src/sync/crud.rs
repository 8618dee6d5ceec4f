//! Legacy CRUD mutations (protocol §8.5, `ZERO_ENABLE_CRUD_MUTATIONS`): this server runs them
//! itself, one upstream SERIALIZABLE transaction per mutation that also advances the client's
//! last mutation id in `{app}_{shard}.clients` — the same bookkeeping an API server does for
//! custom mutators, so results reach clients the same way, through replication.
//!
//! Write permissions come from `{app}.permissions` in the replica. A rule passes when the row,
//! filtered by the rule, exists: before the mutation (update `preMutation`, delete) in the
//! replica as it is, after it (insert, update `postMutation`) in the replica with the
//! mutation's rows substituted. The substitution happens inside the SQL statement (a CTE
//! named like the table shadows it), so the replica is only read. A mutation that fails the
//! rules still advances the LMID without writing, as zero-cache does; the client's optimistic
//! change is then rolled back.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use rusqlite::{Connection, OpenFlags};
use serde::Deserialize;
use serde_json::{Value as Json, json};
use tokio_postgres::IsolationLevel;
use tracing::{debug, warn};
use zero_queries::Value;
use zero_queries::ast::{Ast, Condition};
use zero_queries::permissions::Rule;
use zero_queries::schema::{ColumnType, Schema};
use zero_queries::sql::{SqlValue, quote_ident, select_statement, to_sql};
use zero_queries::validate::{StaticParams, bind_static, simplify_condition};

use super::protocol::{ErrorBody, ErrorKind};
use super::source::{from_rusqlite, to_rusqlite};
use crate::pgconn::UpstreamConfig;

/// Serialization failures are retried this often.
const MAX_SERIALIZATION_ATTEMPTS: usize = 10;

/// Write rules of one table (row and cell level).
#[derive(Debug, Clone, Default, Deserialize)]
struct WriteRules {
    #[serde(default)]
    insert: Option<Vec<Rule>>,
    #[serde(default)]
    update: Option<UpdateRules>,
    #[serde(default)]
    delete: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct UpdateRules {
    #[serde(default, rename = "preMutation")]
    pre: Option<Vec<Rule>>,
    #[serde(default, rename = "postMutation")]
    post: Option<Vec<Rule>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct TableRules {
    #[serde(default)]
    row: Option<WriteRules>,
    #[serde(default)]
    cell: Option<BTreeMap<String, WriteRules>>,
}

#[derive(Debug, Clone, Default, Deserialize)]
struct WritePermissions {
    #[serde(default)]
    tables: BTreeMap<String, TableRules>,
}

/// One CRUD operation as the client sends it.
#[derive(Debug, Clone, PartialEq)]
struct Op {
    op: String,
    table: String,
    primary_key: Vec<String>,
    value: serde_json::Map<String, Json>,
}

fn parse_ops(mutation: &Json) -> Result<Vec<Op>, String> {
    let ops = mutation["args"][0]["ops"]
        .as_array()
        .ok_or("CRUD mutation without ops")?;
    ops.iter()
        .map(|o| {
            let op = o["op"].as_str().ok_or("CRUD op without op")?.to_string();
            if !["insert", "upsert", "update", "delete"].contains(&op.as_str()) {
                return Err(format!("unknown CRUD op {op:?}"));
            }
            Ok(Op {
                op,
                table: o["tableName"]
                    .as_str()
                    .ok_or("CRUD op without tableName")?
                    .to_string(),
                primary_key: o["primaryKey"]
                    .as_array()
                    .ok_or("CRUD op without primaryKey")?
                    .iter()
                    .map(|c| c.as_str().map(str::to_string).ok_or("bad primaryKey"))
                    .collect::<Result<_, _>>()?,
                value: o["value"]
                    .as_object()
                    .cloned()
                    .ok_or("CRUD op without value")?,
            })
        })
        .collect()
}

/// The replica encoding of a client value for a column of type `ty`.
fn sql_value(ty: ColumnType, v: &Json) -> SqlValue {
    match (ty, v) {
        (_, Json::Null) => SqlValue::Null,
        (ColumnType::Json, v) => SqlValue::Text(v.to_string()),
        (_, v) => to_sql(&Value::from_json(v.clone())),
    }
}

/// Rows of one table after the mutation: key (JSON of the primary-key values) → the full row
/// in schema column order, or `None` when deleted.
type Overlay = BTreeMap<String, BTreeMap<String, Option<Vec<SqlValue>>>>;

/// The replica as the write authorizer reads it.
struct Authorizer<'a> {
    conn: &'a Connection,
    schema: &'a Schema,
    rules: Option<&'a WritePermissions>,
    auth_data: Option<&'a Json>,
}

impl Authorizer<'_> {
    fn key_of(&self, op: &Op) -> Result<Vec<(String, Json)>, String> {
        let t = self
            .schema
            .table(&op.table)
            .ok_or_else(|| format!("Table '{}' is not a valid table.", op.table))?;
        t.primary_key
            .iter()
            .map(|c| {
                op.value
                    .get(c)
                    .cloned()
                    .map(|v| (c.clone(), v))
                    .ok_or_else(|| {
                        format!(
                            "Primary key column '{c}' is missing from operation value for table {}",
                            op.table
                        )
                    })
            })
            .collect()
    }

    /// The row as the replica has it (schema column order).
    fn current_row(&self, op: &Op) -> Result<Option<Vec<SqlValue>>, String> {
        let t = self.schema.table(&op.table).ok_or("unknown table")?;
        let key = self.key_of(op)?;
        let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let mut params = Vec::new();
        let preds: Vec<String> = key
            .iter()
            .map(|(c, v)| {
                let ty = t.columns.iter().find(|x| &x.name == c).map(|x| x.ty);
                params.push(to_rusqlite(&sql_value(ty.unwrap_or(ColumnType::String), v)));
                format!("{} = ?{}", quote_ident(c), params.len())
            })
            .collect();
        let sql = format!(
            "SELECT {} FROM main.{} WHERE {}",
            cols.join(", "),
            quote_ident(&op.table),
            preds.join(" AND ")
        );
        let mut st = self.conn.prepare(&sql).map_err(|e| e.to_string())?;
        let mut rows = st
            .query(rusqlite::params_from_iter(params))
            .map_err(|e| e.to_string())?;
        match rows.next().map_err(|e| e.to_string())? {
            None => Ok(None),
            Some(r) => Ok(Some(
                (0..cols.len())
                    .map(|i| r.get::<_, rusqlite::types::Value>(i).map(from_rusqlite))
                    .collect::<Result<_, _>>()
                    .map_err(|e| e.to_string())?,
            )),
        }
    }

    /// Whether `policy` lets the row of `op` through, in the replica plus `overlay`.
    fn passes(
        &self,
        policy: Option<&Vec<Rule>>,
        op: &Op,
        overlay: &Overlay,
    ) -> Result<bool, String> {
        let Some(policy) = policy.filter(|p| !p.is_empty()) else {
            return Ok(false);
        };
        let key = self.key_of(op)?;
        let mut conds: Vec<Json> = key
            .iter()
            .map(|(c, v)| {
                json!({"type": "simple", "op": "=", "left": {"type": "column", "name": c},
                       "right": {"type": "literal", "value": v}})
            })
            .collect();
        let rules: Vec<Json> = policy
            .iter()
            .map(|r| serde_json::to_value(&r.1).unwrap_or(Json::Null))
            .collect();
        conds.push(json!({"type": "or", "conditions": rules}));
        let ast: Ast = serde_json::from_value(json!({
            "table": op.table,
            "where": {"type": "and", "conditions": conds},
        }))
        .map_err(|e| format!("permission rule: {e}"))?;
        let mut ast = bind_static(
            &ast,
            StaticParams {
                auth_data: self.auth_data,
                pre_mutation_row: None,
            },
        );
        ast.where_ = ast.where_.as_ref().map(simplify_condition);
        if matches!(&ast.where_, Some(Condition::Or { conditions }) if conditions.is_empty()) {
            return Ok(false);
        }
        let stmt = select_statement(&ast, self.schema, None).map_err(|e| e.to_string())?;
        let mut params: Vec<rusqlite::types::Value> = stmt.params.iter().map(to_rusqlite).collect();
        let mut ctes = Vec::new();
        for (table, rows) in overlay {
            let Some(t) = self.schema.table(table) else {
                continue;
            };
            let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(&c.name)).collect();
            let mut sql = format!(
                "SELECT {} FROM main.{}",
                cols.join(", "),
                quote_ident(table)
            );
            let mut excluded = Vec::new();
            for k in rows.keys() {
                let key: Vec<(String, Json)> = serde_json::from_str(k).unwrap_or_default();
                let preds: Vec<String> = key
                    .iter()
                    .map(|(c, v)| {
                        let ty = t.columns.iter().find(|x| &x.name == c).map(|x| x.ty);
                        params.push(to_rusqlite(&sql_value(ty.unwrap_or(ColumnType::String), v)));
                        format!("{} IS ?{}", quote_ident(c), params.len())
                    })
                    .collect();
                excluded.push(format!("({})", preds.join(" AND ")));
            }
            if !excluded.is_empty() {
                sql.push_str(&format!(" WHERE NOT ({})", excluded.join(" OR ")));
            }
            for row in rows.values().flatten() {
                let vals: Vec<String> = row
                    .iter()
                    .zip(&cols)
                    .map(|(v, c)| {
                        params.push(to_rusqlite(v));
                        format!("?{} AS {c}", params.len())
                    })
                    .collect();
                sql.push_str(&format!(" UNION ALL SELECT {}", vals.join(", ")));
            }
            ctes.push(format!("{} AS ({sql})", quote_ident(table)));
        }
        let sql = if ctes.is_empty() {
            stmt.sql.clone()
        } else {
            format!("WITH {} {}", ctes.join(", "), stmt.sql)
        };
        let mut st = self.conn.prepare(&sql).map_err(|e| e.to_string())?;
        let mut rows = st
            .query(rusqlite::params_from_iter(params))
            .map_err(|e| e.to_string())?;
        Ok(rows.next().map_err(|e| e.to_string())?.is_some())
    }

    fn table_rules(&self, table: &str) -> (Option<&WriteRules>, Vec<(&String, &WriteRules)>) {
        let t = self.rules.and_then(|r| r.tables.get(table));
        (
            t.and_then(|t| t.row.as_ref()),
            t.and_then(|t| t.cell.as_ref())
                .map(|c| c.iter().collect())
                .unwrap_or_default(),
        )
    }

    /// Zero's `canPreMutation && canPostMutation` for a mutation's ops.
    fn allowed(&self, ops: &[Op]) -> Result<bool, String> {
        // Upserts become updates of existing rows or inserts of new ones.
        let mut normalized = Vec::new();
        for op in ops {
            let mut op = op.clone();
            if op.op == "upsert" {
                op.op = if self.current_row(&op)?.is_some() {
                    "update"
                } else {
                    "insert"
                }
                .into();
            }
            normalized.push(op);
        }
        let empty = Overlay::new();
        for op in &normalized {
            let (row, cells) = self.table_rules(&op.table);
            let mut policies: Vec<Option<&Vec<Rule>>> = Vec::new();
            match op.op.as_str() {
                "update" => {
                    policies.push(
                        row.and_then(|r| r.update.as_ref())
                            .and_then(|u| u.pre.as_ref()),
                    );
                    for (c, p) in &cells {
                        if op.value.contains_key(c.as_str())
                            && let Some(pre) = p.update.as_ref().and_then(|u| u.pre.as_ref())
                        {
                            policies.push(Some(pre));
                        }
                    }
                }
                "delete" => {
                    policies.push(row.and_then(|r| r.delete.as_ref()));
                    for (_, p) in &cells {
                        if let Some(d) = &p.delete {
                            policies.push(Some(d));
                        }
                    }
                }
                _ => continue,
            }
            for p in policies {
                if !self.passes(p, op, &empty)? {
                    debug!(table = %op.table, op = %op.op, "write permission denied before the mutation");
                    return Ok(false);
                }
            }
        }
        // The state after every op.
        let mut overlay = Overlay::new();
        for op in &normalized {
            let t = self.schema.table(&op.table).ok_or("unknown table")?;
            let key = serde_json::to_string(&self.key_of(op)?).map_err(|e| e.to_string())?;
            let entry = overlay.entry(op.table.clone()).or_default();
            let before = match entry.get(&key) {
                Some(r) => r.clone(),
                None => self.current_row(op)?,
            };
            let after = match op.op.as_str() {
                "delete" => None,
                _ => {
                    let mut row = before
                        .filter(|_| op.op == "update")
                        .unwrap_or_else(|| vec![SqlValue::Null; t.columns.len()]);
                    for (i, c) in t.columns.iter().enumerate() {
                        if let Some(v) = op.value.get(&c.name) {
                            row[i] = sql_value(c.ty, v);
                        }
                    }
                    Some(row)
                }
            };
            entry.insert(key, after);
        }
        for op in &normalized {
            let (row, cells) = self.table_rules(&op.table);
            let mut policies: Vec<Option<&Vec<Rule>>> = Vec::new();
            match op.op.as_str() {
                "insert" => {
                    policies.push(row.and_then(|r| r.insert.as_ref()));
                    for (_, p) in &cells {
                        if let Some(i) = &p.insert {
                            policies.push(Some(i));
                        }
                    }
                }
                "update" => {
                    policies.push(
                        row.and_then(|r| r.update.as_ref())
                            .and_then(|u| u.post.as_ref()),
                    );
                    for (c, p) in &cells {
                        if op.value.contains_key(c.as_str())
                            && let Some(post) = p.update.as_ref().and_then(|u| u.post.as_ref())
                        {
                            policies.push(Some(post));
                        }
                    }
                }
                _ => continue,
            }
            for p in policies {
                if !self.passes(p, op, &overlay)? {
                    debug!(table = %op.table, op = %op.op, "write permission denied after the mutation");
                    return Ok(false);
                }
            }
        }
        Ok(true)
    }
}

/// Reads the replica and checks a mutation's ops against the deployed write permissions.
fn authorize(
    replica: &std::path::Path,
    app_id: &str,
    ops: &[Op],
    auth_data: Option<&Json>,
) -> Result<bool, String> {
    let conn = Connection::open_with_flags(
        replica,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .map_err(|e| e.to_string())?;
    conn.pragma_update(None, "busy_timeout", 30_000)
        .map_err(|e| e.to_string())?;
    conn.execute_batch("BEGIN").map_err(|e| e.to_string())?;
    let state = crate::replica::read_state(&conn)
        .map_err(|e| e.to_string())?
        .ok_or("the replica is not ready")?;
    let schema = crate::zql::replica_schema(&state.schema);
    for op in ops {
        if schema.table(&op.table).is_none() {
            return Err(format!("Table '{}' is not a valid table.", op.table));
        }
    }
    let text: Option<String> = conn
        .query_row(
            &format!(
                "SELECT permissions FROM {} LIMIT 1",
                quote_ident(&format!("{app_id}.permissions"))
            ),
            [],
            |r| r.get(0),
        )
        .ok()
        .flatten();
    let rules = match text
        .as_deref()
        .map(serde_json::from_str::<WritePermissions>)
    {
        Some(Ok(p)) => Some(p),
        Some(Err(e)) => {
            warn!(error = %e, "permissions could not be parsed; CRUD mutations are denied");
            None
        }
        None => None,
    };
    Authorizer {
        conn: &conn,
        schema: &schema,
        rules: rules.as_ref(),
        auth_data,
    }
    .allowed(ops)
}

/// Quotes a table name for Postgres: `s.t` is table `t` of schema `s`.
fn pg_table(name: &str) -> String {
    match name.split_once('.') {
        Some((s, t)) => format!("{}.{}", quote_ident(s), quote_ident(t)),
        None => quote_ident(name),
    }
}

/// Why a CRUD mutation stopped.
#[derive(Debug)]
pub enum CrudError {
    /// Sent to the client; the connection stays open (`MutationFailed`, `MutationRateLimited`).
    NonFatal(ErrorBody),
    /// Sent to the client, then the connection closes (`InvalidPush`).
    Fatal(ErrorBody),
}

/// Runs CRUD pushes upstream.
pub struct CrudExecutor {
    upstream: UpstreamConfig,
    pool: tokio::sync::Mutex<Vec<tokio_postgres::Client>>,
    permits: tokio::sync::Semaphore,
    shard_schema: String,
    app_id: String,
    replica_file: PathBuf,
    limit: Option<(u32, Duration)>,
    windows: Mutex<HashMap<String, VecDeque<Instant>>>,
    column_types: tokio::sync::Mutex<HashMap<String, HashMap<String, String>>>,
}

impl std::fmt::Debug for CrudExecutor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CrudExecutor")
            .field("shard_schema", &self.shard_schema)
            .finish_non_exhaustive()
    }
}

enum TxError {
    AlreadyProcessed,
    Fatal(ErrorBody),
    Pg(tokio_postgres::Error),
}

impl From<tokio_postgres::Error> for TxError {
    fn from(e: tokio_postgres::Error) -> TxError {
        TxError::Pg(e)
    }
}

impl CrudExecutor {
    /// An executor over the upstream at `uri` (connections are opened on demand).
    pub fn new(
        uri: &str,
        shard_schema: &str,
        app_id: &str,
        replica_file: PathBuf,
        max_conns: usize,
        limit: Option<(u32, Duration)>,
    ) -> Result<CrudExecutor, String> {
        Ok(CrudExecutor {
            upstream: UpstreamConfig::parse(uri).map_err(|e| e.to_string())?,
            pool: tokio::sync::Mutex::new(Vec::new()),
            permits: tokio::sync::Semaphore::new(max_conns.max(1)),
            shard_schema: shard_schema.to_string(),
            app_id: app_id.to_string(),
            replica_file,
            limit,
            windows: Mutex::new(HashMap::new()),
            column_types: tokio::sync::Mutex::new(HashMap::new()),
        })
    }

    /// Sliding-window rate limit per user (`ZERO_PER_USER_MUTATION_LIMIT_*`).
    fn can_do(&self, user: &str) -> bool {
        let Some((max, window)) = self.limit else {
            return true;
        };
        let now = Instant::now();
        let mut w = self.windows.lock().expect("rate limit lock");
        let q = w.entry(user.to_string()).or_default();
        while q.front().is_some_and(|t| now.duration_since(*t) >= window) {
            q.pop_front();
        }
        if q.len() >= max as usize {
            return false;
        }
        q.push_back(now);
        true
    }

    /// Runs a push's CRUD mutations in order. `user` keys the rate limit; `auth_data` is the
    /// connection's JWT payload.
    pub async fn push(
        &self,
        group: &str,
        user: &str,
        auth_data: Option<&Json>,
        push: &Json,
    ) -> Result<(), CrudError> {
        for m in push["mutations"].as_array().into_iter().flatten() {
            if m["type"] != "crud" {
                return Err(CrudError::Fatal(ErrorBody::new(
                    ErrorKind::InvalidPush,
                    "Custom mutations need a ZERO_MUTATE_URL",
                )));
            }
            if !self.can_do(user) {
                return Err(CrudError::NonFatal(ErrorBody::new(
                    ErrorKind::MutationRateLimited,
                    "Rate limit exceeded",
                )));
            }
            self.mutation(group, auth_data, m).await?;
        }
        Ok(())
    }

    async fn mutation(
        &self,
        group: &str,
        auth_data: Option<&Json>,
        m: &Json,
    ) -> Result<(), CrudError> {
        let client_id = m["clientID"].as_str().unwrap_or_default().to_string();
        let id = m["id"].as_i64().unwrap_or(-1);
        let ops = parse_ops(m);
        let allowed = match &ops {
            Ok(ops) => {
                let (replica, app, ops2, ad) = (
                    self.replica_file.clone(),
                    self.app_id.clone(),
                    ops.clone(),
                    auth_data.cloned(),
                );
                tokio::task::spawn_blocking(move || authorize(&replica, &app, &ops2, ad.as_ref()))
                    .await
                    .map_err(|e| e.to_string())
                    .and_then(|r| r)
            }
            Err(e) => Err(e.clone()),
        };
        let (ops, mut error) = match (ops, allowed) {
            (Ok(ops), Ok(true)) => (ops, None),
            (Ok(_), Ok(false)) => (Vec::new(), None),
            (_, Err(e)) | (Err(e), _) => (Vec::new(), Some(e)),
        };
        // Like zero-cache: on an error, run again with only the LMID bookkeeping.
        let mut error_mode = error.is_some();
        let _permit = self.permits.acquire().await.expect("semaphore open");
        let mut client = match self.pool.lock().await.pop() {
            Some(c) if !c.is_closed() => c,
            _ => self.upstream.connect().await.map_err(|e| {
                CrudError::NonFatal(ErrorBody::new(
                    ErrorKind::MutationFailed,
                    format!("upstream: {e}"),
                ))
            })?,
        };
        let mut attempt = 0;
        let result = loop {
            attempt += 1;
            let ops_now: &[Op] = if error_mode { &[] } else { &ops };
            match self
                .run_tx(&mut client, group, &client_id, id, ops_now)
                .await
            {
                Ok(()) => break Ok(()),
                Err(TxError::AlreadyProcessed) => {
                    debug!(client = %client_id, id, "mutation already processed");
                    break Ok(());
                }
                Err(TxError::Fatal(b)) => break Err(CrudError::Fatal(b)),
                Err(TxError::Pg(e)) => {
                    let serialization = e.code()
                        == Some(&tokio_postgres::error::SqlState::T_R_SERIALIZATION_FAILURE);
                    if serialization && attempt < MAX_SERIALIZATION_ATTEMPTS {
                        continue;
                    }
                    if client.is_closed() || error_mode {
                        break Err(CrudError::NonFatal(ErrorBody::new(
                            ErrorKind::MutationFailed,
                            e.as_db_error()
                                .map_or_else(|| e.to_string(), |d| d.message().to_string()),
                        )));
                    }
                    warn!(client = %client_id, id, error = %e, "CRUD mutation failed; recording it without its changes");
                    error = Some(
                        e.as_db_error()
                            .map_or_else(|| e.to_string(), |d| d.message().to_string()),
                    );
                    error_mode = true;
                }
            }
        };
        if !client.is_closed() {
            self.pool.lock().await.push(client);
        }
        result?;
        match error {
            Some(e) => Err(CrudError::NonFatal(ErrorBody::new(
                ErrorKind::MutationFailed,
                e,
            ))),
            None => Ok(()),
        }
    }

    async fn types_of(
        &self,
        client: &tokio_postgres::Client,
        table: &str,
    ) -> Result<HashMap<String, String>, tokio_postgres::Error> {
        if let Some(t) = self.column_types.lock().await.get(table) {
            return Ok(t.clone());
        }
        let rows = client
            .query(
                "SELECT attname::text, format_type(atttypid, atttypmod) FROM pg_attribute \
                 WHERE attrelid = $1::text::regclass AND attnum > 0 AND NOT attisdropped",
                &[&pg_table(table)],
            )
            .await?;
        let t: HashMap<String, String> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
        self.column_types
            .lock()
            .await
            .insert(table.to_string(), t.clone());
        Ok(t)
    }

    async fn run_tx(
        &self,
        client: &mut tokio_postgres::Client,
        group: &str,
        client_id: &str,
        id: i64,
        ops: &[Op],
    ) -> Result<(), TxError> {
        let mut types = HashMap::new();
        for op in ops {
            if !types.contains_key(&op.table) {
                types.insert(op.table.clone(), self.types_of(client, &op.table).await?);
            }
        }
        let tx = client
            .build_transaction()
            .isolation_level(IsolationLevel::Serializable)
            .start()
            .await?;
        let clients = format!("{}.clients", quote_ident(&self.shard_schema));
        let row = tx
            .query_one(
                &format!(
                    r#"INSERT INTO {clients} AS current ("clientGroupID", "clientID", "lastMutationID")
                       VALUES ($1, $2, 1)
                       ON CONFLICT ("clientGroupID", "clientID")
                       DO UPDATE SET "lastMutationID" = current."lastMutationID" + 1
                       RETURNING "lastMutationID""#
                ),
                &[&group, &client_id],
            )
            .await?;
        let lmid: i64 = row.get(0);
        if id < lmid {
            return Err(TxError::AlreadyProcessed);
        }
        if id > lmid {
            return Err(TxError::Fatal(ErrorBody::new(
                ErrorKind::InvalidPush,
                format!(
                    "Push contains unexpected mutation id {id} for client {client_id}. Expected mutation id {lmid}."
                ),
            )));
        }
        for op in ops {
            let sql = op_sql(op, &types[&op.table]);
            let value = Json::Object(op.value.clone()).to_string();
            tx.execute(&sql, &[&value]).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}

/// The statement of one op; `$1` is the op's value as JSON text.
fn op_sql(op: &Op, types: &HashMap<String, String>) -> String {
    let t = pg_table(&op.table);
    let rec = format!("json_populate_record(NULL::{t}, $1::text::json) AS r");
    let expr = |c: &str| -> String {
        let ty = types.get(c).map(String::as_str).unwrap_or("");
        let numeric = op.value.get(c).is_some_and(Json::is_number);
        if numeric && (ty.starts_with("timestamp") || ty == "date") {
            // Clients send timestamps as epoch milliseconds.
            format!(
                "to_timestamp(($1::text::json->>{})::float8 / 1000)::{ty}",
                pg_literal(c)
            )
        } else {
            format!("r.{}", quote_ident(c))
        }
    };
    let cols: Vec<&String> = op.value.keys().collect();
    let col_list = cols
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let exprs = cols.iter().map(|c| expr(c)).collect::<Vec<_>>().join(", ");
    let pk = op
        .primary_key
        .iter()
        .map(|c| quote_ident(c))
        .collect::<Vec<_>>()
        .join(", ");
    let non_pk: Vec<&&String> = cols
        .iter()
        .filter(|c| !op.primary_key.contains(c))
        .collect();
    let key_match = op
        .primary_key
        .iter()
        .map(|c| format!("t.{} = {}", quote_ident(c), expr(c)))
        .collect::<Vec<_>>()
        .join(" AND ");
    match op.op.as_str() {
        "insert" => format!(
            "INSERT INTO {t} ({col_list}) SELECT {exprs} FROM {rec} ON CONFLICT ({pk}) DO NOTHING"
        ),
        "upsert" if non_pk.is_empty() => {
            format!(
                "INSERT INTO {t} ({col_list}) SELECT {exprs} FROM {rec} ON CONFLICT ({pk}) DO NOTHING"
            )
        }
        "upsert" => format!(
            "INSERT INTO {t} ({col_list}) SELECT {exprs} FROM {rec} ON CONFLICT ({pk}) DO UPDATE SET {}",
            non_pk
                .iter()
                .map(|c| format!("{0} = EXCLUDED.{0}", quote_ident(c)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        "update" if non_pk.is_empty() => format!("SELECT 1 FROM {rec}"),
        "update" => format!(
            "UPDATE {t} AS t SET {} FROM {rec} WHERE {key_match}",
            non_pk
                .iter()
                .map(|c| format!("{} = {}", quote_ident(c), expr(c)))
                .collect::<Vec<_>>()
                .join(", ")
        ),
        _ => format!("DELETE FROM {t} AS t USING {rec} WHERE {key_match}"),
    }
}

fn pg_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements() {
        let op = |kind: &str, value: Json| Op {
            op: kind.into(),
            table: "issue".into(),
            primary_key: vec!["id".into()],
            value: value.as_object().unwrap().clone(),
        };
        let types: HashMap<String, String> = [(
            "created".to_string(),
            "timestamp with time zone".to_string(),
        )]
        .into();
        let s = op_sql(&op("insert", json!({"id": "a", "title": "t"})), &types);
        assert_eq!(
            s,
            r#"INSERT INTO "issue" ("id", "title") SELECT r."id", r."title" FROM json_populate_record(NULL::"issue", $1::text::json) AS r ON CONFLICT ("id") DO NOTHING"#
        );
        let s = op_sql(&op("update", json!({"id": "a", "created": 1000})), &types);
        assert!(s.contains(r#"SET "created" = to_timestamp(($1::text::json->>'created')::float8 / 1000)::timestamp with time zone"#), "{s}");
        let s = op_sql(&op("delete", json!({"id": "a"})), &types);
        assert!(s.starts_with(r#"DELETE FROM "issue" AS t USING"#), "{s}");
        assert_eq!(pg_table("s.t"), r#""s"."t""#);
        let s = op_sql(&op("upsert", json!({"id": "a", "title": "t"})), &types);
        assert!(
            s.ends_with(r#"DO UPDATE SET "title" = EXCLUDED."title""#),
            "{s}"
        );
    }

    #[test]
    fn rate_limit() {
        let e = CrudExecutor::new(
            "postgres://u@localhost/db",
            "zero_0",
            "zero",
            "x".into(),
            1,
            Some((2, Duration::from_secs(60))),
        )
        .unwrap();
        assert!(e.can_do("u1"));
        assert!(e.can_do("u1"));
        assert!(!e.can_do("u1"));
        assert!(e.can_do("u2"));
    }
}
