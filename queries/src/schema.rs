//! The schema a query is checked and compiled against: tables, typed columns, primary keys
//! and named relationships.
//!
//! The JSON form extends Zero's `ClientSchema` (protocol §11.1) with Zero's relationship
//! description, so a client schema loads as is:
//!
//! ```json
//! {"tables": {"issue": {"columns": {"id": {"type": "string"}, "open": {"type": "boolean"}},
//!                       "primaryKey": ["id"]}},
//!  "relationships": {"issue": {
//!     "creator": [{"sourceField": ["creatorID"], "destField": ["id"], "destSchema": "user"}],
//!     "labels":  [{"sourceField": ["id"], "destField": ["issueID"], "destSchema": "issueLabel"},
//!                 {"sourceField": ["labelID"], "destField": ["id"], "destSchema": "label"}]}}}
//! ```
//!
//! A relationship has one hop (a foreign key) or two (many-to-many through a junction table).
//! Column order is the order of the JSON object: it is the order of values in a [`crate::Row`].

use std::collections::BTreeMap;

use serde::Deserialize;
use thiserror::Error;

use crate::value::{Value, ValueKind};

/// A ZQL column type (`string | number | boolean | null | json`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ColumnType {
    /// Text-like columns.
    String,
    /// Numeric and timestamp columns.
    Number,
    /// Booleans (0/1 in the replica).
    Boolean,
    /// A column that only holds nulls.
    Null,
    /// JSON and array columns (stored as JSON text in the replica).
    Json,
}

impl ColumnType {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ColumnType::String => "string",
            ColumnType::Number => "number",
            ColumnType::Boolean => "boolean",
            ColumnType::Null => "null",
            ColumnType::Json => "json",
        }
    }

    /// Whether a (non-null) value of `kind` may be compared with this column.
    pub fn accepts(self, kind: ValueKind) -> bool {
        matches!(
            (self, kind),
            (_, ValueKind::Null)
                | (ColumnType::Json, _)
                | (ColumnType::String, ValueKind::String)
                | (ColumnType::Number, ValueKind::Number)
                | (ColumnType::Boolean, ValueKind::Bool)
        )
    }
}

/// One column of a table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name (server name).
    pub name: String,
    /// ZQL type.
    pub ty: ColumnType,
    /// Whether the column may hold null (informational; replica columns are always nullable).
    pub optional: bool,
}

/// A table: its columns in row order and its primary key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TableSchema {
    /// Table name (`t`, or `s.t` outside the public schema).
    pub name: String,
    /// Columns in row order.
    pub columns: Vec<Column>,
    /// Primary-key columns; Zero appends them to every ordering.
    pub primary_key: Vec<String>,
}

impl TableSchema {
    /// The column called `name`.
    pub fn column(&self, name: &str) -> Option<&Column> {
        self.columns.iter().find(|c| c.name == name)
    }

    /// Position of column `name` in a row.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

/// One hop of a relationship: `source[sourceField] = dest[destField]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hop {
    /// Columns of the table the hop starts from.
    pub source_field: Vec<String>,
    /// Columns of the destination table.
    pub dest_field: Vec<String>,
    /// Destination table.
    pub dest_table: String,
    /// `one` or `many`; only affects the client's view format.
    pub cardinality: Cardinality,
}

/// How many destination rows a hop yields per source row.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum Cardinality {
    /// At most one.
    One,
    /// Any number (the default).
    #[default]
    Many,
}

/// A named relationship: one hop, or two through a junction table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relationship {
    /// Relationship name (what `related('name')` refers to).
    pub name: String,
    /// One or two hops.
    pub hops: Vec<Hop>,
}

impl Relationship {
    /// The table the relationship finally reaches.
    pub fn dest_table(&self) -> &str {
        self.hops.last().map_or("", |h| h.dest_table.as_str())
    }

    /// The junction table of a two-hop relationship.
    pub fn junction(&self) -> Option<&str> {
        (self.hops.len() == 2).then(|| self.hops[0].dest_table.as_str())
    }
}

/// Tables and relationships.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Schema {
    /// Tables by name.
    pub tables: BTreeMap<String, TableSchema>,
    /// Relationships by source table, then by name.
    pub relationships: BTreeMap<String, BTreeMap<String, Relationship>>,
}

/// Why a schema description was rejected.
#[derive(Debug, Error)]
pub enum SchemaError {
    /// Not valid JSON, or not the expected shape.
    #[error("invalid schema JSON: {0}")]
    Json(#[from] serde_json::Error),
    /// A table without a primary key (Zero cannot sync it).
    #[error("table \"{0}\" has no primary key")]
    NoPrimaryKey(String),
    /// A primary-key or relationship column that the table does not have.
    #[error("table \"{table}\" has no column \"{column}\" (used in {context})")]
    UnknownColumn {
        /// The table.
        table: String,
        /// The missing column.
        column: String,
        /// Where it was referenced.
        context: String,
    },
    /// A relationship on, or to, a table that is not in the schema.
    #[error("relationship \"{relationship}\" refers to unknown table \"{table}\"")]
    UnknownTable {
        /// The relationship.
        relationship: String,
        /// The missing table.
        table: String,
    },
    /// A relationship whose shape Zero does not support.
    #[error("relationship \"{relationship}\" on \"{table}\" is invalid: {reason}")]
    BadRelationship {
        /// Source table.
        table: String,
        /// The relationship.
        relationship: String,
        /// What is wrong.
        reason: String,
    },
}

#[derive(Deserialize)]
struct RawSchema {
    tables: serde_json::Map<String, serde_json::Value>,
    #[serde(default)]
    relationships: BTreeMap<String, BTreeMap<String, Vec<RawHop>>>,
}

#[derive(Deserialize)]
struct RawTable {
    columns: serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "primaryKey")]
    primary_key: OneOrMany,
}

#[derive(Deserialize)]
struct RawColumn {
    #[serde(rename = "type")]
    ty: ColumnType,
    #[serde(default)]
    optional: bool,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum OneOrMany {
    One(String),
    Many(Vec<String>),
}

impl OneOrMany {
    fn into_vec(self) -> Vec<String> {
        match self {
            OneOrMany::One(s) => vec![s],
            OneOrMany::Many(v) => v,
        }
    }
}

#[derive(Deserialize)]
struct RawHop {
    #[serde(rename = "sourceField")]
    source_field: OneOrMany,
    #[serde(rename = "destField")]
    dest_field: OneOrMany,
    #[serde(rename = "destSchema")]
    dest_schema: String,
    #[serde(default)]
    cardinality: Cardinality,
}

impl Schema {
    /// Loads and checks a schema from its JSON description (see the module docs).
    pub fn from_json_str(text: &str) -> Result<Schema, SchemaError> {
        Schema::from_raw(serde_json::from_str(text)?)
    }

    /// Loads a schema from already-parsed JSON, such as the `clientSchema` of an
    /// `initConnection` message.
    pub fn from_json_value(value: &serde_json::Value) -> Result<Schema, SchemaError> {
        Schema::from_raw(RawSchema::deserialize(value)?)
    }

    fn from_raw(raw: RawSchema) -> Result<Schema, SchemaError> {
        let mut schema = Schema::default();
        for (name, table) in raw.tables {
            let table: RawTable = serde_json::from_value(table)?;
            let mut columns = Vec::new();
            for (cname, col) in table.columns {
                let col: RawColumn = serde_json::from_value(col)?;
                columns.push(Column {
                    name: cname,
                    ty: col.ty,
                    optional: col.optional,
                });
            }
            schema.add_table(TableSchema {
                name,
                columns,
                primary_key: table.primary_key.into_vec(),
            })?;
        }
        for (table, rels) in raw.relationships {
            for (name, hops) in rels {
                let hops = hops
                    .into_iter()
                    .map(|h| Hop {
                        source_field: h.source_field.into_vec(),
                        dest_field: h.dest_field.into_vec(),
                        dest_table: h.dest_schema,
                        cardinality: h.cardinality,
                    })
                    .collect();
                schema.add_relationship(&table, Relationship { name, hops })?;
            }
        }
        Ok(schema)
    }

    /// Adds a table after checking its primary key.
    pub fn add_table(&mut self, table: TableSchema) -> Result<(), SchemaError> {
        if table.primary_key.is_empty() {
            return Err(SchemaError::NoPrimaryKey(table.name));
        }
        for pk in &table.primary_key {
            if table.column(pk).is_none() {
                return Err(SchemaError::UnknownColumn {
                    table: table.name.clone(),
                    column: pk.clone(),
                    context: "primaryKey".to_owned(),
                });
            }
        }
        self.tables.insert(table.name.clone(), table);
        Ok(())
    }

    /// Adds a relationship on `table` after checking its tables, columns and shape.
    pub fn add_relationship(&mut self, table: &str, rel: Relationship) -> Result<(), SchemaError> {
        let bad = |reason: &str| SchemaError::BadRelationship {
            table: table.to_owned(),
            relationship: rel.name.clone(),
            reason: reason.to_owned(),
        };
        if rel.hops.is_empty() || rel.hops.len() > 2 {
            return Err(bad("a relationship has one or two hops"));
        }
        if rel.name.starts_with(crate::ast::SUBQ_PREFIX) {
            return Err(bad("the \"zsubq_\" prefix is reserved"));
        }
        let mut source = table.to_owned();
        for hop in &rel.hops {
            let src = self
                .tables
                .get(&source)
                .ok_or_else(|| SchemaError::UnknownTable {
                    relationship: rel.name.clone(),
                    table: source.clone(),
                })?;
            let dest =
                self.tables
                    .get(&hop.dest_table)
                    .ok_or_else(|| SchemaError::UnknownTable {
                        relationship: rel.name.clone(),
                        table: hop.dest_table.clone(),
                    })?;
            if hop.source_field.is_empty() || hop.source_field.len() != hop.dest_field.len() {
                return Err(bad(
                    "sourceField and destField must be non-empty and of equal length",
                ));
            }
            for (t, cols) in [(src, &hop.source_field), (dest, &hop.dest_field)] {
                for c in cols {
                    if t.column(c).is_none() {
                        return Err(SchemaError::UnknownColumn {
                            table: t.name.clone(),
                            column: c.clone(),
                            context: format!("relationship \"{}\"", rel.name),
                        });
                    }
                }
            }
            source = hop.dest_table.clone();
        }
        self.relationships
            .entry(table.to_owned())
            .or_default()
            .insert(rel.name.clone(), rel);
        Ok(())
    }

    /// The table called `name`.
    pub fn table(&self, name: &str) -> Option<&TableSchema> {
        self.tables.get(name)
    }

    /// The relationship `name` of `table`.
    pub fn relationship(&self, table: &str, name: &str) -> Option<&Relationship> {
        self.relationships.get(table)?.get(name)
    }

    /// A row as the client receives it in a `rowsPatch` `put`: a JSON object of every column,
    /// in column order.
    pub fn row_to_json<R: crate::Cols + ?Sized>(
        &self,
        table: &str,
        row: &R,
    ) -> Option<serde_json::Value> {
        let t = self.table(table)?;
        Some(serde_json::Value::Object(
            t.columns
                .iter()
                .take(row.col_count())
                .enumerate()
                .map(|(i, c)| (c.name.clone(), row.col(i).to_json()))
                .collect(),
        ))
    }

    /// The primary-key object of a row (the `id` of a `rowsPatch` `del`), in key order.
    pub fn row_key_json<R: crate::Cols + ?Sized>(
        &self,
        table: &str,
        row: &R,
    ) -> Option<serde_json::Value> {
        let t = self.table(table)?;
        let mut key = serde_json::Map::new();
        for pk in &t.primary_key {
            let i = t.column_index(pk).filter(|&i| i < row.col_count())?;
            key.insert(pk.clone(), row.col(i).to_json());
        }
        Some(serde_json::Value::Object(key))
    }

    /// The primary-key values of a row, in key order (a compact identity for refcounts).
    pub fn row_key<R: crate::Cols + ?Sized>(&self, table: &str, row: &R) -> Option<Vec<Value>> {
        let t = self.table(table)?;
        t.primary_key
            .iter()
            .map(|pk| {
                t.column_index(pk)
                    .filter(|&i| i < row.col_count())
                    .map(|i| row.col(i).into_owned())
            })
            .collect()
    }

    /// Converts a JSON row object (as the client sees rows) into a [`crate::Row`] in column order;
    /// missing columns become null.
    pub fn row_from_json(&self, table: &str, row: &serde_json::Value) -> Option<crate::Row> {
        let t = self.table(table)?;
        Some(
            t.columns
                .iter()
                .map(|c| {
                    row.get(&c.name)
                        .cloned()
                        .map_or(Value::Null, Value::from_json)
                })
                .collect(),
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// The zbugs-like schema of the recorded 1.9 trace, with relationships.
    pub(crate) const ZBUGS: &str = include_str!("../tests/fixtures/zbugs-schema.json");

    pub(crate) fn zbugs() -> Schema {
        Schema::from_json_str(ZBUGS).expect("zbugs schema")
    }

    #[test]
    fn loads_tables_columns_and_relationships() {
        let s = zbugs();
        let issue = s.table("issue").expect("issue");
        assert_eq!(issue.columns[0].name, "id");
        assert_eq!(issue.column_index("open"), Some(3));
        assert_eq!(
            issue.column("open").map(|c| c.ty),
            Some(ColumnType::Boolean)
        );
        assert!(issue.column("assigneeID").is_some_and(|c| c.optional));
        let labels = s.relationship("issue", "labels").expect("labels");
        assert_eq!(labels.junction(), Some("issueLabel"));
        assert_eq!(labels.dest_table(), "label");
        let creator = s.relationship("comment", "creator").expect("creator");
        assert_eq!(creator.hops[0].source_field, vec!["creatorID"]);
        assert_eq!(creator.hops[0].cardinality, Cardinality::One);
    }

    #[test]
    fn loads_a_client_schema_from_the_trace() {
        let text = r#"{"tables":{"comment":{"columns":{"body":{"type":"string"},"created":{"type":"number"},"creatorID":{"type":"string"},"id":{"type":"string"},"issueID":{"type":"string"}},"primaryKey":["id"]},"issueLabel":{"columns":{"issueID":{"type":"string"},"labelID":{"type":"string"}},"primaryKey":["issueID","labelID"]}}}"#;
        let s = Schema::from_json_str(text).expect("client schema");
        assert_eq!(s.tables.len(), 2);
        let v: serde_json::Value = serde_json::from_str(text).expect("json");
        assert_eq!(Schema::from_json_value(&v).expect("from value"), s);
        assert!(s.relationships.is_empty());
    }

    #[test]
    fn rejects_bad_schemas() {
        let cases = [
            (
                r#"{"tables":{"t":{"columns":{"a":{"type":"string"}},"primaryKey":[]}}}"#,
                "table \"t\" has no primary key",
            ),
            (
                r#"{"tables":{"t":{"columns":{"a":{"type":"string"}},"primaryKey":["b"]}}}"#,
                "table \"t\" has no column \"b\" (used in primaryKey)",
            ),
            (
                r#"{"tables":{"t":{"columns":{"a":{"type":"text"}},"primaryKey":["a"]}}}"#,
                "invalid schema JSON",
            ),
            (
                r#"{"tables":{"t":{"columns":{"a":{"type":"string"}},"primaryKey":["a"]}},"relationships":{"t":{"r":[{"sourceField":["a"],"destField":["a"],"destSchema":"u"}]}}}"#,
                "relationship \"r\" refers to unknown table \"u\"",
            ),
            (
                r#"{"tables":{"t":{"columns":{"a":{"type":"string"}},"primaryKey":["a"]}},"relationships":{"t":{"r":[{"sourceField":["a"],"destField":["a","a"],"destSchema":"t"}]}}}"#,
                "relationship \"r\" on \"t\" is invalid",
            ),
            (
                r#"{"tables":{"t":{"columns":{"a":{"type":"string"}},"primaryKey":["a"]}},"relationships":{"t":{"r":[{"sourceField":["x"],"destField":["a"],"destSchema":"t"}]}}}"#,
                "table \"t\" has no column \"x\" (used in relationship \"r\")",
            ),
        ];
        for (text, want) in cases {
            let err = Schema::from_json_str(text).expect_err(text).to_string();
            assert!(err.starts_with(want), "{err} should start with {want}");
        }
    }

    #[test]
    fn rows_from_json_follow_column_order() {
        let s = zbugs();
        let row = s
            .row_from_json("label", &serde_json::json!({"name": "bug", "id": "l1"}))
            .expect("row");
        assert_eq!(row.to_vec(), vec![Value::from("l1"), Value::from("bug")]);
        assert_eq!(
            s.row_to_json("label", &row),
            Some(serde_json::json!({"id": "l1", "name": "bug"}))
        );
        let link = s
            .row_from_json(
                "issueLabel",
                &serde_json::json!({"labelID": "l1", "issueID": "i1"}),
            )
            .expect("row");
        assert_eq!(
            s.row_key_json("issueLabel", &link).map(|k| k.to_string()),
            Some(r#"{"issueID":"i1","labelID":"l1"}"#.to_owned())
        );
        assert_eq!(
            s.row_key("issueLabel", &link),
            Some(vec![Value::from("i1"), Value::from("l1")])
        );
        assert_eq!(s.row_key("nope", &link), None);
    }
}
