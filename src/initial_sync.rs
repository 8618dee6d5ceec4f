//! Initial sync: a new replication slot's exported snapshot is copied into a fresh replica file.
//!
//! Tables are copied in parallel over `ZERO_INITIAL_SYNC_TABLE_COPY_WORKERS` connections that all
//! import the slot's snapshot, with binary COPY streamed in bounded batches to one SQLite writer
//! thread. The file is built under a temporary name and renamed into place only when complete,
//! so a crash at any point leaves either no replica or a whole one.

use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Instant;

use bytes::{Buf, BytesMut};
use futures::StreamExt;
use rusqlite::types::Value;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::pgconn::UpstreamConfig;
use crate::pgvalue;
use crate::replica::{self, ReplicaState};
use crate::schema::{ReplicaColumn, ReplicaTable, ValueKind};
use crate::upstream::{self, Shard, UpstreamError, quote_ident, quote_literal};
use crate::version::Lsn;

/// Errors of initial sync.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// Upstream set-up or a query failed.
    #[error(transparent)]
    Upstream(#[from] UpstreamError),
    /// Postgres failed.
    #[error("initial sync: {0}")]
    Pg(#[from] tokio_postgres::Error),
    /// The replication session failed.
    #[error("initial sync: replication session: {0}")]
    Replication(#[from] pgwire_replication::PgWireError),
    /// The replica could not be written.
    #[error("initial sync: {0}")]
    Replica(#[from] replica::ReplicaError),
    /// The COPY data could not be read.
    #[error("initial sync: table \"{table}\": {reason}")]
    Copy {
        /// Table being copied.
        table: String,
        /// What went wrong.
        reason: String,
    },
    /// File system error.
    #[error("initial sync: {0}")]
    Io(#[from] std::io::Error),
    /// SQLite failed.
    #[error("initial sync: replica: {0}")]
    Sqlite(#[from] rusqlite::Error),
}

/// Options of one initial sync.
#[derive(Debug, Clone)]
pub struct SyncOptions {
    /// Replica file to create.
    pub replica_file: PathBuf,
    /// Copy connections.
    pub workers: usize,
    /// Text instead of binary COPY.
    pub text_copy: bool,
    /// Create the slot with `FAILOVER` (Postgres 17+), so it survives a failover to a standby.
    pub failover: bool,
}

/// Rows per batch sent from a copy worker to the writer.
const BATCH_ROWS: usize = 2_000;

struct Batch {
    table: usize,
    rows: Vec<Vec<Value>>,
}

/// Runs initial sync and returns the new replica's state. The replica file is replaced. The
/// upstream must have been set up (`upstream::setup`).
pub async fn run(
    up: &UpstreamConfig,
    shard: &Shard,
    opts: &SyncOptions,
) -> Result<ReplicaState, SyncError> {
    let started = Instant::now();
    let client = up.connect().await?;

    // Another replica of the same app may create a slot at the same moment: on a name clash,
    // take the next free name.
    let mut tried = Vec::new();
    let (slot, repl, system, rows) = loop {
        let slot = choose_slot_name(&client, shard, &tried).await?;
        let mut repl =
            pgwire_replication::ReplicationClient::connect_gated(up.replication(&slot, shard))
                .await?;
        let system = repl.identify_system().await?;
        match repl
            .simple_query(&format!(
                "CREATE_REPLICATION_SLOT {} LOGICAL pgoutput (SNAPSHOT 'export'{})",
                quote_ident(&slot),
                if opts.failover { ", FAILOVER" } else { "" }
            ))
            .await
        {
            Ok(rows) => break (slot, repl, system, rows),
            Err(e) if e.to_string().contains("42710") && tried.len() < 50 => {
                tried.push(slot);
            }
            Err(e) => return Err(e.into()),
        }
    };
    let row = rows.into_iter().next().ok_or_else(|| SyncError::Copy {
        table: String::new(),
        reason: "CREATE_REPLICATION_SLOT returned no row".into(),
    })?;
    let text = |i: usize| {
        row.get(i)
            .and_then(|v| v.as_ref())
            .map(|b| String::from_utf8_lossy(b).into_owned())
            .unwrap_or_default()
    };
    let consistent_point = Lsn::parse(&text(1)).unwrap_or_default();
    let snapshot = text(2);
    let replica_version = consistent_point.to_version();
    info!(slot = %slot, consistent_point = %consistent_point, "created replication slot");

    let result = copy_snapshot(
        up,
        shard,
        opts,
        &snapshot,
        repl,
        &slot,
        &replica_version,
        &system.system_id,
    )
    .await;
    match result {
        Ok(state) => {
            record_replica(&client, shard, &state).await?;
            drop_other_slots(&client, shard, &slot).await;
            info!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                replica_version = %state.replica_version,
                "initial sync complete"
            );
            Ok(state)
        }
        Err(e) => {
            // Leave nothing behind: the slot would hold WAL forever.
            let _ = client
                .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
                .await;
            Err(e)
        }
    }
}

#[allow(clippy::too_many_arguments)]
async fn copy_snapshot(
    up: &UpstreamConfig,
    shard: &Shard,
    opts: &SyncOptions,
    snapshot: &str,
    repl: pgwire_replication::ReplicationClient,
    slot: &str,
    replica_version: &str,
    system_id: &str,
) -> Result<ReplicaState, SyncError> {
    // Every worker imports the snapshot before the exporting session goes away.
    let mut conns = Vec::new();
    for _ in 0..opts.workers.max(1) {
        let c = up.connect().await?;
        c.batch_execute(&format!(
            "BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY; SET TRANSACTION SNAPSHOT {}",
            quote_literal(snapshot)
        ))
        .await?;
        conns.push(c);
    }
    let schema = upstream::published_schema(&conns[0], shard).await?;
    drop(repl);

    let tables: Vec<ReplicaTable> = schema.replica_tables().into_values().collect();
    let mut sizes = Vec::new();
    for t in &tables {
        let r = conns[0]
            .query_one(
                "SELECT coalesce(sum(pg_relation_size(c.oid)), 0)::int8 FROM pg_class c \
                 WHERE c.oid = $1::int8::oid OR c.oid IN (SELECT inhrelid FROM pg_inherits WHERE inhparent = $1::int8::oid)",
                &[&t.oid],
            )
            .await?;
        sizes.push(r.get::<_, i64>(0));
    }
    let mut order: Vec<usize> = (0..tables.len()).collect();
    order.sort_by_key(|&i| std::cmp::Reverse(sizes[i]));
    conns.truncate(tables.len().max(1));

    let tmp = tmp_path(&opts.replica_file);
    remove_replica_files(&tmp)?;
    let (tx, rx) = mpsc::channel::<Batch>(64);
    let writer = {
        let tables = tables.clone();
        let tmp = tmp.clone();
        let replica_version = replica_version.to_string();
        std::thread::Builder::new()
            .name("initial-sync-writer".into())
            .spawn(move || write_replica(&tmp, &tables, &replica_version, rx))?
    };

    let queue = Arc::new(Mutex::new(order.into_iter().collect::<VecDeque<_>>()));
    let tables = Arc::new(tables);
    let mut tasks = Vec::new();
    for c in conns {
        let queue = Arc::clone(&queue);
        let tables = Arc::clone(&tables);
        let tx = tx.clone();
        let text_copy = opts.text_copy;
        tasks.push(tokio::spawn(async move {
            loop {
                let next = queue.lock().expect("queue lock").pop_front();
                let Some(i) = next else { break };
                copy_table(&c, &tables[i], i, text_copy, &tx).await?;
            }
            c.batch_execute("COMMIT").await?;
            Ok::<_, SyncError>(())
        }));
    }
    drop(tx);
    let mut first_err = None;
    for t in tasks {
        let r = t.await.map_err(|e| SyncError::Copy {
            table: String::new(),
            reason: format!("copy task failed: {e}"),
        });
        if let Err(e) = r.and_then(|r| r)
            && first_err.is_none()
        {
            first_err = Some(e);
        }
    }
    let written = writer.join().map_err(|_| SyncError::Copy {
        table: String::new(),
        reason: "writer thread panicked".into(),
    })?;
    if let Some(e) = first_err {
        let _ = remove_replica_files(&tmp);
        return Err(e);
    }
    let conn = match written {
        Ok(c) => c,
        Err(e) => {
            let _ = remove_replica_files(&tmp);
            return Err(e);
        }
    };
    let state = ReplicaState {
        replica_version: replica_version.to_string(),
        publications: shard.publications(),
        watermark: replica_version.to_string(),
        slot: slot.to_string(),
        system_id: system_id.to_string(),
        schema: schema.clone(),
    };
    replica::write_initial_state(&conn, &state)?;
    conn.pragma_update(None, "locking_mode", "normal")?;
    conn.pragma_update(None, "journal_mode", "wal")?;
    drop(conn);
    std::fs::File::open(&tmp)?.sync_all()?;
    remove_replica_files(&opts.replica_file)?;
    std::fs::rename(&tmp, &opts.replica_file)?;
    if let Some(dir) = opts
        .replica_file
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
    {
        // Make the rename durable.
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
    }
    Ok(state)
}

fn tmp_path(replica: &Path) -> PathBuf {
    let mut s = replica.as_os_str().to_owned();
    s.push(".initial-sync");
    PathBuf::from(s)
}

/// Removes a SQLite file together with its WAL and shared-memory files.
pub fn remove_replica_files(path: &Path) -> std::io::Result<()> {
    for suffix in ["", "-wal", "-shm", "-journal"] {
        let mut p = path.as_os_str().to_owned();
        p.push(suffix);
        match std::fs::remove_file(PathBuf::from(p)) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

fn write_replica(
    path: &Path,
    tables: &[ReplicaTable],
    replica_version: &str,
    mut rx: mpsc::Receiver<Batch>,
) -> Result<rusqlite::Connection, SyncError> {
    let conn = replica::open_for_bulk_load(path)?;
    conn.execute_batch("BEGIN")?;
    replica::create_metadata_tables(&conn)?;
    for t in tables {
        conn.execute_batch(&replica::create_table_sql(t, replica_version))?;
    }
    let inserts: Vec<String> = tables
        .iter()
        .map(|t| {
            format!(
                "INSERT INTO {} ({}) VALUES ({})",
                quote_ident(&t.name),
                t.columns
                    .iter()
                    .map(|c| quote_ident(&c.name))
                    .collect::<Vec<_>>()
                    .join(", "),
                vec!["?"; t.columns.len()].join(", ")
            )
        })
        .collect();
    let mut counts = vec![0u64; tables.len()];
    while let Some(batch) = rx.blocking_recv() {
        let mut stmt = conn.prepare_cached(&inserts[batch.table])?;
        for row in &batch.rows {
            for (i, v) in row.iter().enumerate() {
                stmt.raw_bind_parameter(i + 1, v)?;
            }
            stmt.raw_execute()?;
        }
        counts[batch.table] += batch.rows.len() as u64;
    }
    let started = Instant::now();
    for t in tables {
        replica::create_indexes(&conn, t)?;
        replica::write_table_metadata(&conn, t)?;
    }
    conn.execute_batch("COMMIT")?;
    for (t, n) in tables.iter().zip(&counts) {
        info!(table = %t.name, rows = n, "copied table");
    }
    info!(
        elapsed_ms = started.elapsed().as_millis() as u64,
        "created indexes"
    );
    Ok(conn)
}

/// Whether binary COPY sends this column in a form [`pgvalue::from_binary`] reads.
fn binary_direct(c: &ReplicaColumn) -> bool {
    match c.kind {
        ValueKind::Text => {
            c.upstream.is_enum
                || matches!(
                    c.upstream.type_name.as_str(),
                    "text" | "varchar" | "bpchar" | "char" | "name" | "citext"
                )
        }
        ValueKind::Float => c.upstream.type_name != "numeric",
        ValueKind::Array(_) => false,
        _ => pgvalue::binary_supported(c.kind),
    }
}

async fn copy_table(
    client: &tokio_postgres::Client,
    t: &ReplicaTable,
    index: usize,
    text_copy: bool,
    tx: &mpsc::Sender<Batch>,
) -> Result<(), SyncError> {
    let started = Instant::now();
    let select: Vec<String> = t
        .columns
        .iter()
        .map(|c| {
            if text_copy || binary_direct(c) {
                quote_ident(&c.name)
            } else {
                // format() renders with the type's output function, exactly as pgoutput does
                // (a plain ::text cast differs for some types, e.g. inet).
                let col = quote_ident(&c.name);
                format!("CASE WHEN {col} IS NULL THEN NULL ELSE format('%s', {col}) END")
            }
        })
        .collect();
    let sql = format!(
        "COPY (SELECT {} FROM {}.{}) TO STDOUT{}",
        select.join(", "),
        quote_ident(&t.schema),
        quote_ident(&t.upstream_name),
        if text_copy { "" } else { " (FORMAT binary)" }
    );
    let kinds: Vec<(ValueKind, bool)> = t
        .columns
        .iter()
        .map(|c| (c.kind, !text_copy && binary_direct(c)))
        .collect();
    let stream = client.copy_out(&sql).await?;
    futures::pin_mut!(stream);
    let mut parser = CopyParser::new(!text_copy, kinds);
    let mut rows = Vec::with_capacity(BATCH_ROWS);
    let mut total = 0u64;
    let fail = |reason: String| SyncError::Copy {
        table: t.name.clone(),
        reason,
    };
    while let Some(chunk) = stream.next().await {
        parser.push(&chunk?);
        while let Some(row) = parser.next_row().map_err(fail)? {
            rows.push(row);
            if rows.len() == BATCH_ROWS {
                total += rows.len() as u64;
                let batch = std::mem::replace(&mut rows, Vec::with_capacity(BATCH_ROWS));
                tx.send(Batch {
                    table: index,
                    rows: batch,
                })
                .await
                .map_err(|_| fail("replica writer stopped".into()))?;
            }
        }
    }
    if !parser.finished() {
        return Err(fail("COPY data ended early".into()));
    }
    total += rows.len() as u64;
    if !rows.is_empty() {
        tx.send(Batch { table: index, rows })
            .await
            .map_err(|_| fail("replica writer stopped".into()))?;
    }
    tracing::debug!(table = %t.name, rows = total, elapsed_ms = started.elapsed().as_millis() as u64, "copied");
    Ok(())
}

/// Incremental parser of COPY output (binary or text format) into replica rows.
pub struct CopyParser {
    buf: BytesMut,
    binary: bool,
    header_done: bool,
    done: bool,
    /// Per column: kind and whether the value comes in binary format.
    kinds: Vec<(ValueKind, bool)>,
}

const BINARY_SIGNATURE: &[u8] = b"PGCOPY\n\xff\r\n\0";

impl CopyParser {
    /// A parser for rows with these column conversions.
    pub fn new(binary: bool, kinds: Vec<(ValueKind, bool)>) -> CopyParser {
        CopyParser {
            buf: BytesMut::new(),
            binary,
            header_done: !binary,
            done: false,
            kinds,
        }
    }

    /// Appends received data.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// Whether the end of the data was seen (binary: the trailer; text: all input consumed).
    pub fn finished(&self) -> bool {
        if self.binary {
            self.done
        } else {
            self.buf.is_empty()
        }
    }

    /// The next complete row, if buffered.
    pub fn next_row(&mut self) -> Result<Option<Vec<Value>>, String> {
        if self.binary {
            self.next_binary()
        } else {
            self.next_text()
        }
    }

    fn next_binary(&mut self) -> Result<Option<Vec<Value>>, String> {
        if !self.header_done {
            if self.buf.len() < 19 {
                return Ok(None);
            }
            if &self.buf[..11] != BINARY_SIGNATURE {
                return Err("bad binary COPY signature".into());
            }
            let ext = u32::from_be_bytes(self.buf[15..19].try_into().expect("4 bytes")) as usize;
            if self.buf.len() < 19 + ext {
                return Ok(None);
            }
            self.buf.advance(19 + ext);
            self.header_done = true;
        }
        if self.done || self.buf.len() < 2 {
            return Ok(None);
        }
        let n = i16::from_be_bytes([self.buf[0], self.buf[1]]);
        if n == -1 {
            self.done = true;
            self.buf.advance(2);
            return Ok(None);
        }
        if n as usize != self.kinds.len() {
            return Err(format!("expected {} fields, got {n}", self.kinds.len()));
        }
        // Check the whole tuple is buffered before converting anything.
        let mut off = 2;
        for _ in 0..n {
            if self.buf.len() < off + 4 {
                return Ok(None);
            }
            let len = i32::from_be_bytes(self.buf[off..off + 4].try_into().expect("4 bytes"));
            off += 4 + len.max(0) as usize;
        }
        if self.buf.len() < off {
            return Ok(None);
        }
        let tuple = self.buf.split_to(off);
        let mut row = Vec::with_capacity(self.kinds.len());
        let mut p = 2;
        for &(kind, bin) in &self.kinds {
            let len = i32::from_be_bytes(tuple[p..p + 4].try_into().expect("4 bytes"));
            p += 4;
            if len < 0 {
                row.push(Value::Null);
                continue;
            }
            let v = &tuple[p..p + len as usize];
            p += len as usize;
            row.push(if bin {
                pgvalue::from_binary(kind, v).map_err(|e| e.to_string())?
            } else {
                let s = std::str::from_utf8(v).map_err(|_| "invalid utf-8".to_string())?;
                pgvalue::from_text(kind, s).map_err(|e| e.to_string())?
            });
        }
        Ok(Some(row))
    }

    fn next_text(&mut self) -> Result<Option<Vec<Value>>, String> {
        let Some(nl) = self.buf.iter().position(|&b| b == b'\n') else {
            return Ok(None);
        };
        let line = self.buf.split_to(nl + 1);
        let line = &line[..nl];
        let mut row = Vec::with_capacity(self.kinds.len());
        let mut fields = line.split(|&b| b == b'\t');
        for &(kind, _) in &self.kinds {
            let f = fields.next().ok_or("too few fields")?;
            if f == b"\\N" {
                row.push(Value::Null);
                continue;
            }
            let s = unescape_copy_text(f)?;
            row.push(pgvalue::from_text(kind, &s).map_err(|e| e.to_string())?);
        }
        if fields.next().is_some() {
            return Err("too many fields".into());
        }
        Ok(Some(row))
    }
}

fn unescape_copy_text(f: &[u8]) -> Result<String, String> {
    if !f.contains(&b'\\') {
        return String::from_utf8(f.to_vec()).map_err(|_| "invalid utf-8".into());
    }
    let mut out = Vec::with_capacity(f.len());
    let mut i = 0;
    while i < f.len() {
        if f[i] != b'\\' || i + 1 == f.len() {
            out.push(f[i]);
            i += 1;
            continue;
        }
        i += 1;
        match f[i] {
            b'n' => out.push(b'\n'),
            b't' => out.push(b'\t'),
            b'r' => out.push(b'\r'),
            b'b' => out.push(8),
            b'f' => out.push(12),
            b'v' => out.push(11),
            b'x' => {
                let n = f[i + 1..]
                    .iter()
                    .take(2)
                    .take_while(|b| b.is_ascii_hexdigit())
                    .count();
                let s = std::str::from_utf8(&f[i + 1..i + 1 + n]).map_err(|_| "bad escape")?;
                out.push(u8::from_str_radix(s, 16).map_err(|_| "bad escape")?);
                i += n;
            }
            b'0'..=b'7' => {
                let n = f[i..]
                    .iter()
                    .take(3)
                    .take_while(|b| (b'0'..=b'7').contains(b))
                    .count();
                let s = std::str::from_utf8(&f[i..i + n]).map_err(|_| "bad escape")?;
                out.push(u8::from_str_radix(s, 8).map_err(|_| "bad escape")?);
                i += n - 1;
            }
            c => out.push(c),
        }
        i += 1;
    }
    String::from_utf8(out).map_err(|_| "invalid utf-8".into())
}

async fn choose_slot_name(
    client: &tokio_postgres::Client,
    shard: &Shard,
    taken: &[String],
) -> Result<String, tokio_postgres::Error> {
    let existing: Vec<String> = client
        .query(
            "SELECT slot_name::text FROM pg_replication_slots WHERE starts_with(slot_name, $1)",
            &[&shard.slot_prefix()],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut n = 0u32;
    loop {
        let name = format!("{}{}", shard.slot_prefix(), suffix(n));
        if !existing.contains(&name) && !taken.contains(&name) {
            return Ok(name);
        }
        n += 1;
    }
}

/// `a`..`z`, `aa`, `ab`, ...
fn suffix(mut n: u32) -> String {
    let mut s = Vec::new();
    loop {
        s.push(b'a' + (n % 26) as u8);
        if n < 26 {
            break;
        }
        n = n / 26 - 1;
    }
    s.reverse();
    String::from_utf8(s).expect("ascii")
}

async fn record_replica(
    client: &tokio_postgres::Client,
    shard: &Shard,
    state: &ReplicaState,
) -> Result<(), SyncError> {
    let schema = serde_json::to_string(&state.schema).expect("schema serializes");
    client
        .execute(
            &format!(
                "INSERT INTO {}.replicas (id, slot, version, \"initialSchema\") VALUES ($1, $2, $3, $4::text::json) \
                 ON CONFLICT (id) DO UPDATE SET slot = EXCLUDED.slot, version = EXCLUDED.version",
                quote_ident(&shard.schema())
            ),
            &[
                &format!("{}-{}", state.slot, state.replica_version),
                &state.slot,
                &state.replica_version,
                &schema,
            ],
        )
        .await?;
    Ok(())
}

/// Drops the shard's other slots that no session holds: they belong to replicas that were
/// replaced and would otherwise pin WAL forever.
pub(crate) async fn drop_other_slots(client: &tokio_postgres::Client, shard: &Shard, keep: &str) {
    let res = client
        .query(
            "SELECT slot_name::text, pg_drop_replication_slot(slot_name) FROM pg_replication_slots \
             WHERE starts_with(slot_name, $1) AND slot_name <> $2 AND NOT active \
               AND database = current_database()",
            &[&shard.slot_prefix(), &keep],
        )
        .await;
    match res {
        Ok(rows) => {
            for r in rows {
                info!(slot = %r.get::<_, String>(0), "dropped unused replication slot");
            }
        }
        Err(e) => warn!(error = %e, "could not drop unused replication slots"),
    }
    let _ = client
        .execute(
            &format!(
                "DELETE FROM {}.replicas WHERE slot <> $1",
                quote_ident(&shard.schema())
            ),
            &[&keep],
        )
        .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slot_suffixes() {
        assert_eq!(suffix(0), "a");
        assert_eq!(suffix(25), "z");
        assert_eq!(suffix(26), "aa");
        assert_eq!(suffix(27), "ab");
        assert_eq!(suffix(26 + 26 * 26), "aaa");
    }

    #[test]
    fn text_copy_rows() {
        let mut p = CopyParser::new(
            false,
            vec![(ValueKind::Int, false), (ValueKind::Text, false)],
        );
        p.push(b"1\ta\\tb\\\\c\n2\t\\N\n3\tx");
        assert_eq!(
            p.next_row().unwrap(),
            Some(vec![Value::Integer(1), Value::Text("a\tb\\c".into())])
        );
        assert_eq!(
            p.next_row().unwrap(),
            Some(vec![Value::Integer(2), Value::Null])
        );
        assert_eq!(p.next_row().unwrap(), None);
        p.push(b"\n");
        assert_eq!(
            p.next_row().unwrap(),
            Some(vec![Value::Integer(3), Value::Text("x".into())])
        );
        assert!(p.finished());
    }

    #[test]
    fn binary_copy_rows_across_chunks() {
        let mut data = BINARY_SIGNATURE.to_vec();
        data.extend(0i32.to_be_bytes());
        data.extend(0i32.to_be_bytes());
        data.extend(2i16.to_be_bytes());
        data.extend(8i32.to_be_bytes());
        data.extend(42i64.to_be_bytes());
        data.extend((-1i32).to_be_bytes());
        data.extend((-1i16).to_be_bytes());
        let mut p = CopyParser::new(true, vec![(ValueKind::Int, true), (ValueKind::Text, true)]);
        let mut rows = Vec::new();
        for b in data.chunks(3) {
            p.push(b);
            while let Some(r) = p.next_row().unwrap() {
                rows.push(r);
            }
        }
        assert_eq!(rows, vec![vec![Value::Integer(42), Value::Null]]);
        assert!(p.finished());
    }
}
