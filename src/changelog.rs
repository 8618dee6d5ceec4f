//! The replication manager's log of committed transactions, kept in the replica file so that
//! view syncers (and backups) can replay them.
//!
//! A transaction is recorded at the level of [`crate::replica::Applier`] calls (upserts,
//! deletes, truncates, schema changes, in call order), so replaying it through another
//! `Applier` over a copy of the replica at the previous watermark produces the same rows,
//! change-log entries and watermark. The entry is written in the same SQLite transaction as
//! the changes, so the log and the replica can never disagree, whenever the process dies.
//!
//! With `ZERO_CHANGE_DB` the same entries go to Postgres instead ([`crate::change_db`]) and the
//! replica keeps no log.
//!
//! Tables (ours, next to Zero's `_zero.*` metadata):
//! - `"_zero.changeStream"`: one row per transaction: `stateVersion`, `changes` (JSON array),
//!   `writeTimeMs`.
//! - `"_zero.changeStreamState"`: `minVersion`: the log holds every transaction committed
//!   after this version (older ones were purged, or were committed before the log existed).

use rusqlite::types::Value;
use rusqlite::{Connection, OptionalExtension, params};
use serde::{Deserialize, Serialize};

use crate::replica::{ColumnValue, ReplicaError};
use crate::schema::PublishedSchema;

/// One recorded `Applier` call.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "camelCase")]
pub enum Change {
    /// `Applier::upsert`.
    Upsert {
        /// Replica table.
        table: String,
        /// Values in table column order.
        row: Vec<WireValue>,
    },
    /// `Applier::delete`.
    Delete {
        /// Replica table.
        table: String,
        /// The old row (key columns are what matters).
        old: Vec<WireValue>,
    },
    /// `Applier::truncate`.
    Truncate {
        /// Replica table.
        table: String,
    },
    /// `Applier::apply_schema` that changed the schema.
    Schema {
        /// The new published schema.
        schema: Box<PublishedSchema>,
    },
}

/// A column value on the wire: JSON null, integer, string, or a tagged float (bit pattern,
/// so that every float including infinities round-trips), blob (hex) or "unchanged".
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum WireValue {
    /// SQL NULL.
    Null(()),
    /// INTEGER.
    Int(i64),
    /// TEXT.
    Text(String),
    /// REAL, BLOB or "unchanged".
    Tagged(Tagged),
}

/// The values JSON has no exact form for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum Tagged {
    /// REAL as `f64::to_bits`.
    #[serde(rename = "r")]
    Real(u64),
    /// BLOB as lower-case hex.
    #[serde(rename = "b")]
    Blob(String),
    /// A TOASTed value the change left out: keep the stored one.
    #[serde(rename = "u")]
    Unchanged(u8),
}

impl From<&ColumnValue> for WireValue {
    fn from(v: &ColumnValue) -> WireValue {
        match v {
            ColumnValue::Unchanged => WireValue::Tagged(Tagged::Unchanged(0)),
            ColumnValue::Set(Value::Null) => WireValue::Null(()),
            ColumnValue::Set(Value::Integer(i)) => WireValue::Int(*i),
            ColumnValue::Set(Value::Real(f)) => WireValue::Tagged(Tagged::Real(f.to_bits())),
            ColumnValue::Set(Value::Text(s)) => WireValue::Text(s.clone()),
            ColumnValue::Set(Value::Blob(b)) => {
                WireValue::Tagged(Tagged::Blob(b.iter().map(|x| format!("{x:02x}")).collect()))
            }
        }
    }
}

impl WireValue {
    /// The column value this stands for.
    pub fn to_column(&self) -> Result<ColumnValue, ReplicaError> {
        Ok(match self {
            WireValue::Null(()) => ColumnValue::Set(Value::Null),
            WireValue::Int(i) => ColumnValue::Set(Value::Integer(*i)),
            WireValue::Text(s) => ColumnValue::Set(Value::Text(s.clone())),
            WireValue::Tagged(Tagged::Real(bits)) => {
                ColumnValue::Set(Value::Real(f64::from_bits(*bits)))
            }
            WireValue::Tagged(Tagged::Unchanged(_)) => ColumnValue::Unchanged,
            WireValue::Tagged(Tagged::Blob(hex)) => {
                let bytes = (0..hex.len())
                    .step_by(2)
                    .map(|i| u8::from_str_radix(hex.get(i..i + 2).unwrap_or("zz"), 16))
                    .collect::<Result<Vec<u8>, _>>()
                    .map_err(|_| ReplicaError::Inconsistent(format!("bad blob {hex:?}")))?;
                ColumnValue::Set(Value::Blob(bytes))
            }
        })
    }
}

/// Converts a row for recording.
pub fn wire_row(row: &[ColumnValue]) -> Vec<WireValue> {
    row.iter().map(WireValue::from).collect()
}

/// Converts a recorded row back.
pub fn column_row(row: &[WireValue]) -> Result<Vec<ColumnValue>, ReplicaError> {
    row.iter().map(WireValue::to_column).collect()
}

/// Creates the log tables if missing; a new log starts at `watermark`.
pub fn enable(conn: &Connection, watermark: &str) -> Result<(), ReplicaError> {
    conn.execute_batch(
        r#"CREATE TABLE IF NOT EXISTS "_zero.changeStream" (
             "stateVersion" TEXT PRIMARY KEY, "changes" TEXT NOT NULL, "writeTimeMs" INTEGER NOT NULL);
           CREATE TABLE IF NOT EXISTS "_zero.changeStreamState" (
             "minVersion" TEXT NOT NULL, "lock" INT PRIMARY KEY DEFAULT 1 CHECK ("lock" = 1));"#,
    )?;
    conn.execute(
        r#"INSERT INTO "_zero.changeStreamState" ("minVersion") VALUES (?1) ON CONFLICT DO NOTHING"#,
        [watermark],
    )?;
    Ok(())
}

/// Removes the log (a node that does not serve it must not leave a log with a gap behind).
pub fn disable(conn: &Connection) -> Result<(), ReplicaError> {
    conn.execute_batch(
        r#"DROP TABLE IF EXISTS "_zero.changeStream"; DROP TABLE IF EXISTS "_zero.changeStreamState";"#,
    )?;
    Ok(())
}

/// Whether the replica has a log.
pub fn enabled(conn: &Connection) -> Result<bool, ReplicaError> {
    Ok(conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name = '_zero.changeStreamState'",
        [],
        |r| r.get::<_, i64>(0),
    )? == 1)
}

/// The version after which the log is complete, if the replica has a log.
pub fn min_version(conn: &Connection) -> Result<Option<String>, ReplicaError> {
    if !enabled(conn)? {
        return Ok(None);
    }
    Ok(conn
        .query_row(
            r#"SELECT "minVersion" FROM "_zero.changeStreamState""#,
            [],
            |r| r.get(0),
        )
        .optional()?)
}

/// Appends a transaction (inside the replica's open SQLite transaction).
pub fn append(conn: &Connection, version: &str, changes: &[Change]) -> Result<(), ReplicaError> {
    let json = serde_json::to_string(changes).expect("changes serialize");
    conn.prepare_cached(
        r#"INSERT OR REPLACE INTO "_zero.changeStream" ("stateVersion", "changes", "writeTimeMs") VALUES (?1, ?2, ?3)"#,
    )?
    .execute(params![version, json, crate::replica::now_ms()])?;
    Ok(())
}

/// Transactions after `after`, oldest first, up to `max_entries` or about `max_bytes`:
/// `(version, changes JSON)`.
pub fn read_after(
    conn: &Connection,
    after: &str,
    max_entries: usize,
    max_bytes: usize,
) -> Result<Vec<(String, String)>, ReplicaError> {
    let mut st = conn.prepare_cached(
        r#"SELECT "stateVersion", "changes" FROM "_zero.changeStream" WHERE "stateVersion" > ?1 ORDER BY "stateVersion" LIMIT ?2"#,
    )?;
    let mut out = Vec::new();
    let mut bytes = 0;
    let mut rows = st.query(params![after, max_entries as i64])?;
    while let Some(r) = rows.next()? {
        let v: String = r.get(0)?;
        let c: String = r.get(1)?;
        bytes += c.len();
        out.push((v, c));
        if bytes >= max_bytes {
            break;
        }
    }
    Ok(out)
}

/// Drops transactions at or below `upto` that were written before `before_ms`, and moves
/// `minVersion` accordingly; returns how many were dropped.
pub fn purge(conn: &Connection, upto: &str, before_ms: i64) -> Result<usize, ReplicaError> {
    let tx = conn.unchecked_transaction()?;
    let last: Option<String> = tx
        .query_row(
            r#"SELECT max("stateVersion") FROM "_zero.changeStream" WHERE "stateVersion" <= ?1 AND "writeTimeMs" < ?2"#,
            params![upto, before_ms],
            |r| r.get(0),
        )
        .optional()?
        .flatten();
    let Some(last) = last else { return Ok(0) };
    let n = tx.execute(
        r#"DELETE FROM "_zero.changeStream" WHERE "stateVersion" <= ?1"#,
        [&last],
    )?;
    tx.execute(
        r#"UPDATE "_zero.changeStreamState" SET "minVersion" = ?1 WHERE "minVersion" < ?1"#,
        [&last],
    )?;
    tx.commit()?;
    Ok(n)
}

/// Completes when the flag turns true (or its sender is gone); holds no borrow across awaits,
/// so futures using it stay `Send`.
pub async fn until(flag: &mut tokio::sync::watch::Receiver<bool>) {
    let _ = flag.wait_for(|v| *v).await;
}

/// Replays one recorded transaction through `applier` (skipping it if the replica already has
/// it); returns whether it was applied.
pub fn replay(
    applier: &mut crate::replica::Applier,
    version: &str,
    changes: &[Change],
) -> Result<bool, ReplicaError> {
    if version <= applier.watermark() {
        return Ok(false);
    }
    applier.begin(version.to_string())?;
    let r = (|| {
        for c in changes {
            match c {
                Change::Upsert { table, row } => applier.upsert(table, &column_row(row)?)?,
                Change::Delete { table, old } => applier.delete(table, &column_row(old)?)?,
                Change::Truncate { table } => applier.truncate(table)?,
                Change::Schema { schema } => {
                    applier.apply_schema((**schema).clone())?;
                }
            }
        }
        Ok::<(), ReplicaError>(())
    })();
    match r {
        Ok(()) => {
            applier.commit()?;
            Ok(true)
        }
        Err(e) => {
            applier.rollback()?;
            Err(e)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_round_trip_through_json() {
        let row = vec![
            ColumnValue::Set(Value::Null),
            ColumnValue::Set(Value::Integer(-5)),
            ColumnValue::Set(Value::Real(f64::INFINITY)),
            ColumnValue::Set(Value::Real(0.1)),
            ColumnValue::Set(Value::Text("x\"y".into())),
            ColumnValue::Set(Value::Blob(vec![0, 255, 16])),
            ColumnValue::Unchanged,
        ];
        let c = Change::Upsert {
            table: "t".into(),
            row: wire_row(&row),
        };
        let json = serde_json::to_string(&vec![c]).unwrap();
        let back: Vec<Change> = serde_json::from_str(&json).unwrap();
        let Change::Upsert { row: back, .. } = &back[0] else {
            panic!("{json}")
        };
        assert_eq!(column_row(back).unwrap(), row, "{json}");
    }
}
