//! Runs the SQL translation's statements on SQLite: the executor both crates' SQL-oracle tests
//! hand to `zero_queries::sql` (shared by path so the oracle is the same in both).

use rusqlite::Connection;
use rusqlite::types::Value as Sq;
use zero_queries::sql::{SqlValue, Statement};

/// One SQL value as a SQLite parameter.
pub(crate) fn sq(v: &SqlValue) -> Sq {
    match v {
        SqlValue::Null => Sq::Null,
        SqlValue::Integer(i) => Sq::Integer(*i),
        SqlValue::Real(f) => Sq::Real(*f),
        SqlValue::Text(t) => Sq::Text(t.clone()),
    }
}

/// Runs `st` and returns its rows (blobs read as NULL: the translation never selects one).
pub(crate) fn exec(
    conn: &Connection,
    st: &Statement,
) -> Result<Vec<Vec<SqlValue>>, rusqlite::Error> {
    let mut stmt = conn.prepare_cached(&st.sql)?;
    let params: Vec<Sq> = st.params.iter().map(sq).collect();
    let n = st.columns.len();
    let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
        (0..n)
            .map(|i| {
                r.get::<_, Sq>(i).map(|v| match v {
                    Sq::Null | Sq::Blob(_) => SqlValue::Null,
                    Sq::Integer(i) => SqlValue::Integer(i),
                    Sq::Real(f) => SqlValue::Real(f),
                    Sq::Text(t) => SqlValue::Text(t),
                })
            })
            .collect::<Result<Vec<_>, _>>()
    })?;
    rows.collect()
}
