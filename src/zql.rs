//! The bridge between the replica and ZQL: the replica's tables as a `zero_queries` schema, and
//! replica rows as ZQL values (booleans from 0/1, JSON parsed from text), the form that the
//! view engine and the client see.

use std::collections::BTreeMap;

use rusqlite::Connection;
use rusqlite::types::Value as SqlValue;
use zero_queries::schema::{Column, ColumnType, Schema, TableSchema};
use zero_queries::{Row, Value};

use crate::schema::{PublishedSchema, ZqlType};
use crate::upstream::quote_ident;

/// The ZQL schema of the replica's tables (no relationships: the replica has none).
pub fn replica_schema(published: &PublishedSchema) -> Schema {
    let mut tables = BTreeMap::new();
    for (name, t) in published.replica_tables() {
        tables.insert(
            name.clone(),
            TableSchema {
                name,
                columns: t
                    .columns
                    .iter()
                    .map(|c| Column {
                        name: c.name.clone(),
                        ty: column_type(c.kind.zql_type()),
                        optional: !c.upstream.not_null,
                    })
                    .collect(),
                primary_key: t.key.clone(),
            },
        );
    }
    Schema {
        tables,
        relationships: BTreeMap::new(),
    }
}

fn column_type(t: ZqlType) -> ColumnType {
    match t {
        ZqlType::Number => ColumnType::Number,
        ZqlType::Boolean => ColumnType::Boolean,
        ZqlType::String => ColumnType::String,
        ZqlType::Json => ColumnType::Json,
    }
}

/// Converts one replica value to the ZQL value of a column of type `ty` (the queries crate's
/// decoding, so the engine, the SQL oracle and the wire agree).
pub fn value_from_sqlite(ty: ColumnType, v: SqlValue) -> Value {
    use zero_queries::sql::SqlValue as Q;
    let q = match v {
        SqlValue::Null => Q::Null,
        SqlValue::Integer(i) => Q::Integer(i),
        SqlValue::Real(f) => Q::Real(f),
        SqlValue::Text(s) => Q::Text(s),
        SqlValue::Blob(b) => Q::Text(String::from_utf8_lossy(&b).into_owned()),
    };
    zero_queries::sql::from_sql(ty, q)
}

/// Reads every row of `table` in the schema's column order.
pub fn read_table(conn: &Connection, t: &TableSchema) -> rusqlite::Result<Vec<Row>> {
    let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(&c.name)).collect();
    let sql = format!("SELECT {} FROM {}", cols.join(", "), quote_ident(&t.name));
    let mut stmt = conn.prepare(&sql)?;
    let types: Vec<ColumnType> = t.columns.iter().map(|c| c.ty).collect();
    let rows = stmt.query_map([], |r| {
        let mut row = Vec::with_capacity(types.len());
        for (i, ty) in types.iter().enumerate() {
            row.push(value_from_sqlite(*ty, r.get::<_, SqlValue>(i)?));
        }
        Ok(Row::from(row))
    })?;
    rows.collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_values_become_zql_values() {
        assert_eq!(
            value_from_sqlite(ColumnType::Boolean, SqlValue::Integer(1)),
            Value::Bool(true)
        );
        assert_eq!(
            value_from_sqlite(ColumnType::Number, SqlValue::Integer(3)),
            Value::Number(3.0)
        );
        assert_eq!(
            value_from_sqlite(ColumnType::Json, SqlValue::Text("[1,2]".into())),
            Value::from_json(serde_json::json!([1, 2]))
        );
        assert_eq!(
            value_from_sqlite(ColumnType::String, SqlValue::Null),
            Value::Null
        );
    }
}
