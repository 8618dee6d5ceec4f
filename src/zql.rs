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

/// Sorted indexes worth building while the replica loads, as `(table, key columns, ordering
/// column)`: for each upstream index other than the primary key's that is not led by text, its
/// last column under the columns before it. Such an index serves a filter on its leading
/// columns and an ORDER BY on the last (issues of one state by modification time), the shape
/// of a top-k query, whose first use would otherwise sort the whole table while every client
/// waits. Postgres reads an index in either direction, so the server cannot tell which one the
/// app's queries use: both are prepared (each costs a row pointer per row, about what the
/// replica's copy of the upstream index costs on disk). Indexes led by text are the
/// relationships' lookups (the sync server prepares lookups for those).
pub fn order_hints(
    published: &PublishedSchema,
    schema: &Schema,
) -> Vec<(String, Vec<String>, String)> {
    let mut out = Vec::new();
    for (name, ts, columns) in secondary_indexes(published, schema) {
        let Some(((last, _), rest)) = columns.split_last() else {
            continue;
        };
        let text_led = columns.first().is_some_and(|(c, _)| is_text(ts, c));
        let key: Vec<String> = rest.iter().map(|(c, _)| c.clone()).collect();
        let hint = (name, key, last.clone());
        if !text_led && !out.contains(&hint) {
            out.push(hint);
        }
    }
    out
}

/// Lookup indexes worth building while the replica loads, as `(table, column)`: the first
/// column of each upstream index other than the primary key's, when it is text. An app indexes
/// upstream the columns it correlates on (foreign keys such as `comment.issueID`), and text is
/// where ids live; an index led by a number or boolean (a time, a flag) serves ordering or
/// filtering, which needs a sorted index (see [`order_hints`]).
pub fn lookup_hints(published: &PublishedSchema, schema: &Schema) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for (name, ts, columns) in secondary_indexes(published, schema) {
        let Some((col, _)) = columns.first() else {
            continue;
        };
        let whole_key = ts.primary_key.len() == 1 && ts.primary_key[0] == *col;
        if is_text(ts, col) && !whole_key && !out.contains(&(name.clone(), col.clone())) {
            out.push((name, col.clone()));
        }
    }
    out
}

/// Each non-primary upstream index of a published table the engine knows, as the table's
/// replica name, its schema and the index's columns (with direction): the source of both kinds
/// of hints, so they agree on which tables and indexes count.
fn secondary_indexes<'a>(
    published: &'a PublishedSchema,
    schema: &'a Schema,
) -> impl Iterator<Item = (String, &'a TableSchema, &'a [(String, String)])> + 'a {
    published.tables.iter().flat_map(move |t| {
        let name = crate::schema::replica_name(&t.schema, &t.name);
        let ts = schema.table(&name);
        t.indexes
            .iter()
            .filter(move |i| !i.primary && ts.is_some())
            .filter_map(move |i| Some((name.clone(), ts?, i.columns.as_slice())))
    })
}

fn is_text(ts: &TableSchema, column: &str) -> bool {
    ts.column_index(column)
        .is_some_and(|i| ts.columns[i].ty == ColumnType::String)
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
    fn index_hints_sorted_for_non_text_led_and_lookups_for_text_led() {
        let col = |attnum: i32, name: &str, ty: &str, oid: i64| {
            serde_json::json!({"attnum": attnum, "name": name, "type": ty, "typeOid": oid,
                "elemOid": 0, "isEnum": false, "isArray": false, "notNull": true,
                "maxLen": null, "default": null})
        };
        let index = |name: &str, primary: bool, cols: &[&str]| {
            let cols: Vec<(&str, &str)> = cols.iter().map(|c| (*c, "ASC")).collect();
            serde_json::json!({"name": name, "unique": primary, "primary": primary,
                "columns": cols, "notNull": true})
        };
        let published: PublishedSchema = serde_json::from_value(serde_json::json!({"tables": [{
            "oid": 1, "schema": "public", "name": "issue", "replicaIdentity": "d",
            "columns": [col(1, "id", "text", 25), col(2, "open", "bool", 16),
                col(3, "modified", "float8", 701), col(4, "creatorID", "text", 25)],
            "indexes": [index("issue_pkey", true, &["id"]),
                index("issue_modified", false, &["modified"]),
                index("issue_open_modified", false, &["open", "modified"]),
                index("issue_creator_modified", false, &["creatorID", "modified"]),
                index("issue_modified_again", false, &["modified"])]
        }]}))
        .expect("published schema");
        let schema = replica_schema(&published);
        assert_eq!(
            order_hints(&published, &schema),
            vec![
                ("issue".to_string(), vec![], "modified".to_string()),
                (
                    "issue".to_string(),
                    vec!["open".to_string()],
                    "modified".to_string()
                ),
            ]
        );
        // The text-led index is a relationship's lookup instead (the primary key's column
        // never is: the primary-key index serves it).
        assert_eq!(
            lookup_hints(&published, &schema),
            vec![("issue".to_string(), "creatorID".to_string())]
        );
    }

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
