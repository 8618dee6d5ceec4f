//! The streaming loop. It runs on its own thread because SQLite calls block; the replication
//! transport runs on the tokio runtime and is driven from here through a runtime handle.

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::Bytes;
use pgwire_replication::{Lsn as WireLsn, ReplicationClient, ReplicationEvent};
use tokio::sync::watch;
use tracing::{debug, info, warn};

use super::pgoutput::{self, Message, RelationColumn, TupleValue};
use crate::pgvalue;
use std::sync::atomic::Ordering;

use crate::replica::{Applier, ColumnValue, ReplicaError, ReplicaState};
use crate::replicator::{ReplicationStats, ReplicatorConfig};
use crate::schema::{PublishedSchema, ReplicaTable};
use crate::upstream::{self, Shard};
use crate::version::{Lsn, lexi_decode};

/// Why streaming stopped.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    /// The connection or the server failed; reconnecting may help.
    #[error("replication stream: {0}")]
    Transport(#[from] pgwire_replication::PgWireError),
    /// An SQL query to upstream failed.
    #[error("replication stream: {0}")]
    Pg(#[from] tokio_postgres::Error),
    /// The replica could not be written.
    #[error(transparent)]
    Replica(#[from] ReplicaError),
    /// A message could not be decoded or applied; the replica is left at its last commit.
    #[error("replication stream: {0}")]
    Data(String),
    /// The replica cannot continue from this upstream (see the message); a resync is needed.
    #[error("replica must be resynced: {0}")]
    ResetRequired(String),
    /// Nothing arrived for the inbound timeout: the connection is presumed dead.
    #[error(
        "replication stream: no message from upstream for {0} ms (ZERO_UPSTREAM_PG_STREAM_INBOUND_TIMEOUT_MS); the connection is presumed dead"
    )]
    Silent(u128),
}

/// How streaming ended without error.
#[derive(Debug, PartialEq, Eq)]
pub enum StreamOutcome {
    /// Shutdown was requested.
    Shutdown,
}

/// What the stream knows about a relation from its Relation message.
struct Relation {
    /// Replica table name, if the table is replicated.
    table: Option<String>,
    /// For each relation column, the replica column index it fills.
    map: Vec<Option<usize>>,
    columns: Vec<RelationColumn>,
}

/// Streams changes from `slot` into the applier until shutdown or an error. `watermarks`
/// receives each committed watermark.
pub fn stream_changes(
    rt: &tokio::runtime::Handle,
    rcfg: &ReplicatorConfig,
    state: &ReplicaState,
    applier: &mut Applier,
    watermarks: &watch::Sender<String>,
    mut shutdown: watch::Receiver<bool>,
) -> Result<StreamOutcome, StreamError> {
    let (up, shard, stats) = (&rcfg.upstream, &rcfg.shard, &*rcfg.stats);
    let lag_report_interval = rcfg.lag_report_interval;
    let slot = state.slot.as_str();
    let start = Lsn(lexi_decode(applier.watermark()).unwrap_or(0));
    let cfg = up
        .replication(slot, shard)
        .with_start_lsn(WireLsn(0))
        .with_buffer_size(16_384);
    let sql = rt.block_on(up.connect())?;
    let mut client = rt.block_on(ReplicationClient::connect_gated(cfg))?;
    let sys = rt.block_on(client.identify_system())?;
    if sys.system_id != state.system_id {
        return Err(StreamError::ResetRequired(format!(
            "upstream is a different cluster (system id {} instead of {})",
            sys.system_id, state.system_id
        )));
    }
    let inbound_timeout = match rcfg.stream_inbound_timeout_ms {
        Some(0) => None,
        Some(ms) => Some(Duration::from_millis(ms)),
        None => {
            let ms: i64 = rt
                .block_on(sql.query_one(
                    "SELECT setting::bigint FROM pg_settings WHERE name = 'wal_sender_timeout'",
                    &[],
                ))?
                .get(0);
            (ms > 0).then(|| Duration::from_millis(2 * ms as u64))
        }
    };
    rt.block_on(client.start())?;
    // The slot may still be held by a walsender of a previous (killed) process for a moment.
    rt.block_on(client.wait_started())?;
    // Our walsender: ended by us if the stream goes silent, so that the slot is free at once
    // for the next connection instead of after upstream's own timeout.
    let walsender: Option<i32> = rt
        .block_on(sql.query_opt(
            "SELECT active_pid FROM pg_replication_slots WHERE slot_name = $1",
            &[&slot],
        ))?
        .and_then(|r| r.get(0));
    // Ready: the replica is valid and streaming.
    watermarks.send_replace(applier.watermark().to_string());
    // Lag reports travel through the stream as non-transactional messages; the time between
    // sending and receiving one is the replication lag.
    let lag_task = lag_report_interval.map(|every| {
        let up = up.clone();
        let prefix = shard.lag_message_prefix();
        rt.spawn(async move {
            let Ok(client) = up.connect().await else {
                return;
            };
            let mut tick = tokio::time::interval(every);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                let body =
                    serde_json::json!({ "sendTimeMs": crate::replica::now_ms() }).to_string();
                if let Err(e) = client
                    .execute(
                        "SELECT pg_logical_emit_message(false, $1, $2)",
                        &[&prefix, &body],
                    )
                    .await
                {
                    debug!(error = %e, "cannot send a lag report");
                    return;
                }
            }
        })
    });
    info!(slot = %slot, watermark = %applier.watermark(), lsn = %start, "streaming changes");

    let mut s = Stream {
        rt,
        shard,
        sql,
        relations: HashMap::new(),
        skipping: false,
        in_txn: false,
        txn_started: Instant::now(),
        changes: 0,
        ddl_prefix: shard.ddl_message_prefix(),
        lag_prefix: shard.lag_message_prefix(),
        stats,
        pending: None,
        txn_span: tracing::Span::none(),
    };
    let result = loop {
        let ev = rt.block_on(async {
            let recv = async {
                match inbound_timeout {
                    Some(t) => tokio::time::timeout(t, client.recv()).await.ok(),
                    None => Some(client.recv().await),
                }
            };
            tokio::select! {
                ev = recv => Some(ev),
                _ = shutdown.wait_for(|s| *s) => None,
            }
        });
        let Some(ev) = ev else {
            break Ok(StreamOutcome::Shutdown);
        };
        let Some(ev) = ev else {
            let silent = inbound_timeout.unwrap_or_default();
            if let Some(pid) = walsender {
                end_walsender(rt, up, pid);
            }
            break Err(StreamError::Silent(silent.as_millis()));
        };
        let ev = match ev {
            Ok(Some(ev)) => ev,
            Ok(None) => break Err(StreamError::Data("replication stream ended".into())),
            Err(e) => break Err(e.into()),
        };
        match s.handle(ev, applier, start) {
            Ok(Some(end_lsn)) => {
                match &rcfg.ack_limit {
                    None => client.update_applied_lsn(end_lsn),
                    Some(limit) => {
                        // Only what the backup holds: a restored replica resumes from the slot.
                        let limit = lexi_decode(limit.borrow().as_str()).unwrap_or(0);
                        if limit > 0 {
                            client.update_applied_lsn(WireLsn(limit.min(end_lsn.0)));
                        }
                    }
                }
                watermarks.send_replace(applier.watermark().to_string());
            }
            Ok(None) => {}
            Err(e) => break Err(e),
        }
    };
    if let Some(t) = lag_task {
        t.abort();
    }
    applier.rollback()?;
    client.stop();
    // A dead connection may never answer the goodbye.
    let _ = rt.block_on(tokio::time::timeout(
        Duration::from_secs(5),
        client.shutdown(),
    ));
    result
}

/// Ends upstream's walsender `pid` over a new connection (the stream's may be dead), bounded
/// in time; failures only mean the slot frees itself later, at upstream's timeout.
fn end_walsender(rt: &tokio::runtime::Handle, up: &crate::pgconn::UpstreamConfig, pid: i32) {
    let ended = rt.block_on(tokio::time::timeout(Duration::from_secs(5), async {
        let c = up.connect().await?;
        c.execute("SELECT pg_terminate_backend($1)", &[&pid]).await
    }));
    match ended {
        Ok(Ok(_)) => info!(pid, "silent replication connection ended upstream"),
        Ok(Err(e)) => warn!(pid, error = %e, "cannot end the silent replication connection"),
        Err(_) => warn!(
            pid,
            "cannot reach upstream to end the silent replication connection"
        ),
    }
}

struct Stream<'a> {
    rt: &'a tokio::runtime::Handle,
    shard: &'a Shard,
    sql: tokio_postgres::Client,
    relations: HashMap<u32, Relation>,
    /// Inside a transaction the replica already has (at or below its watermark).
    skipping: bool,
    in_txn: bool,
    txn_started: Instant,
    changes: u64,
    ddl_prefix: String,
    lag_prefix: String,
    stats: &'a ReplicationStats,
    /// The latest schema announced by a DDL message of the open transaction, not yet applied.
    pending: Option<Ddl>,
    /// The open transaction's `replicate.transaction` span (exported with OpenTelemetry when
    /// configured): from its Begin to its replica commit.
    txn_span: tracing::Span,
}

/// A DDL message from the event trigger.
#[derive(serde::Deserialize)]
struct Ddl {
    tag: String,
    /// Oids of tables created by this command (empty for other commands).
    #[serde(default)]
    created: Vec<i64>,
    schema: PublishedSchema,
}

impl Stream<'_> {
    /// Handles one event; returns the LSN to acknowledge after a commit.
    fn handle(
        &mut self,
        ev: ReplicationEvent,
        applier: &mut Applier,
        start: Lsn,
    ) -> Result<Option<WireLsn>, StreamError> {
        match ev {
            ReplicationEvent::Begin { final_lsn, .. } => {
                self.in_txn = true;
                self.pending = None;
                self.changes = 0;
                self.txn_started = Instant::now();
                let lsn = Lsn(final_lsn.0);
                self.skipping = lsn <= start || lsn.to_version().as_str() <= applier.watermark();
                if !self.skipping {
                    self.txn_span = tracing::info_span!(
                        "replicate.transaction",
                        version = %lsn.to_version(),
                        changes = tracing::field::Empty,
                    );
                    applier.begin(lsn.to_version())?;
                }
                Ok(None)
            }
            ReplicationEvent::Commit { end_lsn, lsn, .. } => {
                self.in_txn = false;
                if !self.skipping {
                    self.flush_ddl(applier)?;
                }
                if self.skipping {
                    self.skipping = false;
                    debug!(lsn = %Lsn(lsn.0), "skipped transaction already in the replica");
                    return Ok(Some(end_lsn));
                }
                let v = applier.commit()?;
                self.txn_span.record("changes", self.changes);
                self.txn_span = tracing::Span::none();
                self.stats.transactions.fetch_add(1, Ordering::Relaxed);
                debug!(
                    watermark = %v,
                    changes = self.changes,
                    elapsed_us = self.txn_started.elapsed().as_micros() as u64,
                    "committed"
                );
                Ok(Some(end_lsn))
            }
            ReplicationEvent::XLogData { data, .. } => {
                if self.skipping {
                    // Relation messages are sent once per session, possibly inside a transaction
                    // the replica already has: remember them, skip everything else.
                    if let Ok(Some(Message::Relation { oid, columns, .. })) = pgoutput::decode(data)
                    {
                        self.relations.insert(
                            oid,
                            Relation {
                                table: None,
                                map: Vec::new(),
                                columns,
                            },
                        );
                        self.remap(applier);
                    }
                    return Ok(None);
                }
                self.flush_ddl(applier)?;
                self.data(data, applier)?;
                Ok(None)
            }
            ReplicationEvent::Message {
                prefix,
                content,
                transactional,
                ..
            } => {
                if prefix == self.lag_prefix && !transactional {
                    #[derive(serde::Deserialize)]
                    #[serde(rename_all = "camelCase")]
                    struct Lag {
                        send_time_ms: i64,
                    }
                    if let Ok(lag) = serde_json::from_slice::<Lag>(&content) {
                        let ms = crate::replica::now_ms() - lag.send_time_ms;
                        self.stats.last_lag_ms.store(ms, Ordering::Relaxed);
                        self.stats.lag_reports.fetch_add(1, Ordering::Relaxed);
                        if ms > 10_000 {
                            warn!(lag_ms = ms, "replication lag");
                        } else {
                            debug!(lag_ms = ms, "replication lag");
                        }
                    }
                    return Ok(None);
                }
                if prefix == self.ddl_prefix && transactional && self.in_txn && !self.skipping {
                    let ddl: Ddl = serde_json::from_slice(&content)
                        .map_err(|e| StreamError::Data(format!("bad DDL message: {e}")))?;
                    // Applied before the next change or at commit, so that the intermediate
                    // states of a multi-statement DDL transaction (e.g. a primary key being
                    // replaced) never reach the replica.
                    let mut created = self.pending.take().map(|p| p.created).unwrap_or_default();
                    created.extend(ddl.created.iter().copied());
                    self.pending = Some(Ddl { created, ..ddl });
                }
                Ok(None)
            }
            ReplicationEvent::KeepAlive { .. } | ReplicationEvent::StoppedAt { .. } => Ok(None),
        }
    }

    fn data(&mut self, data: Bytes, applier: &mut Applier) -> Result<(), StreamError> {
        let msg = pgoutput::decode(data).map_err(|e| StreamError::Data(e.to_string()))?;
        let Some(msg) = msg else { return Ok(()) };
        match msg {
            Message::Relation {
                oid,
                namespace,
                name,
                columns,
                ..
            } => {
                let rel = Relation {
                    table: None,
                    map: Vec::new(),
                    columns,
                };
                self.relations.insert(oid, rel);
                if !self.relation_matches(oid, applier) {
                    // The schema changed without a DDL message (no event triggers): read it from
                    // upstream and apply it now.
                    info!(table = %format!("{namespace}.{name}"), "relation changed; reloading upstream schema");
                    let schema = self
                        .rt
                        .block_on(upstream::published_schema(&self.sql, self.shard))
                        .map_err(|e| StreamError::Data(e.to_string()))?;
                    self.apply_schema(applier, schema, &[])?;
                }
                self.remap(applier);
            }
            Message::Insert { oid, new } => {
                self.changes += 1;
                let Some((table, row)) = self.row(oid, &new, applier)? else {
                    return Ok(());
                };
                applier.upsert(&table, &row)?;
            }
            Message::Update { oid, old, new } => {
                self.changes += 1;
                let Some((table, row)) = self.row(oid, &new, applier)? else {
                    return Ok(());
                };
                if let Some(old) = old
                    && let Some((_, old_row)) = self.row(oid, &old, applier)?
                    && !applier.same_key(&table, &old_row, &row)
                {
                    applier.delete(&table, &old_row)?;
                }
                applier.upsert(&table, &row)?;
            }
            Message::Delete { oid, old } => {
                self.changes += 1;
                let Some((table, row)) = self.row(oid, &old, applier)? else {
                    return Ok(());
                };
                applier.delete(&table, &row)?;
            }
            Message::Truncate { oids } => {
                for oid in oids {
                    if let Some(t) = self.relations.get(&oid).and_then(|r| r.table.clone()) {
                        applier.truncate(&t)?;
                    } else if let Some(t) = applier.table_by_oid(oid as i64) {
                        let name = t.name.clone();
                        applier.truncate(&name)?;
                    }
                }
            }
            Message::Type { .. } | Message::Origin => {}
        }
        Ok(())
    }

    fn flush_ddl(&mut self, applier: &mut Applier) -> Result<(), StreamError> {
        if let Some(ddl) = self.pending.take() {
            self.apply_schema(applier, ddl.schema, &ddl.created)?;
            info!(tag = %ddl.tag, "applied upstream schema change");
        }
        Ok(())
    }

    /// Applies a schema. A table that becomes replicated without having been created in this
    /// transaction (primary key added, publication changed, or seen without DDL detection) may
    /// already hold rows that the stream will never send, so it needs a resync.
    fn apply_schema(
        &mut self,
        applier: &mut Applier,
        schema: PublishedSchema,
        created: &[i64],
    ) -> Result<(), StreamError> {
        for (oid, name) in applier.new_tables(&schema) {
            if !created.contains(&oid) {
                return Err(StreamError::ResetRequired(format!(
                    "table \"{name}\" became replicated with rows that were never streamed"
                )));
            }
        }
        match applier.apply_schema(schema) {
            Ok(true) => self.remap(applier),
            Ok(false) => {}
            Err(ReplicaError::NeedsResync(why)) => return Err(StreamError::ResetRequired(why)),
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Whether the relation's columns are the ones the replica's schema has for it.
    fn relation_matches(&self, oid: u32, applier: &Applier) -> bool {
        let rel = &self.relations[&oid];
        let Some(up) = applier.schema().tables.iter().find(|t| t.oid == oid as i64) else {
            // Unknown table: it matches only if the current upstream schema lacks it too,
            // which we cannot know without asking, so ask.
            return false;
        };
        up.columns.len() == rel.columns.len()
            && up
                .columns
                .iter()
                .zip(&rel.columns)
                .all(|(a, b)| a.name == b.name)
    }

    /// Recomputes every relation's column mapping after a schema change.
    fn remap(&mut self, applier: &Applier) {
        for (oid, rel) in self.relations.iter_mut() {
            match applier.table_by_oid(*oid as i64) {
                Some(t) => {
                    rel.table = Some(t.name.clone());
                    rel.map = rel
                        .columns
                        .iter()
                        .map(|c| t.column_index(&c.name))
                        .collect();
                }
                None => {
                    rel.table = None;
                    rel.map.clear();
                }
            }
        }
    }

    /// Converts a tuple into replica column order; `None` for tables that are not replicated.
    fn row(
        &mut self,
        oid: u32,
        tuple: &[TupleValue],
        applier: &Applier,
    ) -> Result<Option<(String, Vec<ColumnValue>)>, StreamError> {
        let Some(rel) = self.relations.get(&oid) else {
            return Err(StreamError::Data(format!(
                "change for relation {oid} before its Relation message"
            )));
        };
        let Some(table_name) = &rel.table else {
            return Ok(None);
        };
        let t: &ReplicaTable = applier
            .table_by_oid(oid as i64)
            .ok_or_else(|| StreamError::Data(format!("relation {oid} lost its table")))?;
        let mut row = vec![ColumnValue::Set(rusqlite::types::Value::Null); t.columns.len()];
        for (i, v) in tuple.iter().enumerate() {
            let Some(Some(ci)) = rel.map.get(i) else {
                continue;
            };
            row[*ci] = match v {
                TupleValue::Null => ColumnValue::Set(rusqlite::types::Value::Null),
                TupleValue::Unchanged => ColumnValue::Unchanged,
                TupleValue::Text(b) => {
                    let s = std::str::from_utf8(b)
                        .map_err(|_| StreamError::Data("invalid utf-8 in tuple".into()))?;
                    ColumnValue::Set(pgvalue::from_text(t.columns[*ci].kind, s).map_err(|e| {
                        StreamError::Data(format!(
                            "table \"{}\" column \"{}\": {e}",
                            t.name, t.columns[*ci].name
                        ))
                    })?)
                }
                TupleValue::Binary(_) => {
                    return Err(StreamError::Data(
                        "binary tuple data was not requested".into(),
                    ));
                }
            };
        }
        if tuple.len() != rel.map.len() {
            warn!(table = %t.name, "tuple and relation column counts differ");
        }
        Ok(Some((table_name.clone(), row)))
    }
}
