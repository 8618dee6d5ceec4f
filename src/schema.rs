//! The published upstream schema and how it maps onto the replica: table and column names, the
//! row key, the SQLite declared type and the value conversion of each column.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use tracing::warn;

/// The schema of everything the publications cover, as `published_schema()` describes it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Default)]
pub struct PublishedSchema {
    /// Published tables, sorted by schema and name.
    pub tables: Vec<UpstreamTable>,
}

/// One published upstream table.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamTable {
    /// The table's oid; relation messages name tables by it.
    pub oid: i64,
    /// Upstream schema.
    pub schema: String,
    /// Upstream table name.
    pub name: String,
    /// `d`efault, `n`othing, `f`ull or `i`ndex.
    pub replica_identity: String,
    /// Published columns in attnum order.
    pub columns: Vec<UpstreamColumn>,
    /// Plain (non-partial, non-expression) indexes.
    pub indexes: Vec<UpstreamIndex>,
}

/// One published column.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamColumn {
    /// Position in the table; stable across renames, which is how renames are recognised.
    pub attnum: i32,
    /// Column name.
    pub name: String,
    /// Type name (domains resolved to their base; arrays as `elem[]`).
    #[serde(rename = "type")]
    pub type_name: String,
    /// Oid of the (base) type.
    pub type_oid: i64,
    /// Oid of the array element type, 0 if not an array.
    pub elem_oid: i64,
    /// Whether the (element) type is an enum.
    pub is_enum: bool,
    /// Whether the type is an array.
    pub is_array: bool,
    /// `NOT NULL` upstream.
    pub not_null: bool,
    /// Declared length of varchar/char.
    pub max_len: Option<i32>,
    /// Default expression text.
    pub default: Option<String>,
}

/// One upstream index.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct UpstreamIndex {
    /// Index name.
    pub name: String,
    /// Unique index.
    pub unique: bool,
    /// The primary key's index.
    pub primary: bool,
    /// Columns with direction (`ASC`/`DESC`).
    pub columns: Vec<(String, String)>,
    /// All columns are NOT NULL.
    pub not_null: bool,
}

/// How a column's upstream text (or binary) value becomes a replica value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ValueKind {
    /// int2, int4, int8, oid: SQLite INTEGER.
    Int,
    /// float4, float8, numeric: SQLite REAL (numeric is read like JavaScript's `Number()`).
    Float,
    /// bool: 0/1.
    Bool,
    /// text-like and other string-valued types, enums.
    Text,
    /// json and jsonb: JSON text.
    Json,
    /// jsonb, in binary COPY (a version byte precedes the text).
    Jsonb,
    /// uuid (binary COPY sends 16 bytes).
    Uuid,
    /// timestamp without time zone: epoch milliseconds as REAL.
    Timestamp,
    /// timestamptz: epoch milliseconds as REAL.
    TimestampTz,
    /// date: epoch milliseconds of UTC midnight.
    Date,
    /// time: milliseconds since midnight.
    Time,
    /// timetz: milliseconds since midnight (the zone is dropped, as Zero does).
    TimeTz,
    /// Any array: JSON text of the elements converted by the element kind.
    Array(ElemKind),
}

/// Element conversion inside arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ElemKind {
    /// Numbers.
    Number,
    /// Booleans.
    Bool,
    /// Strings.
    Text,
    /// Nested JSON values.
    Json,
    /// Timestamps as epoch ms.
    Timestamp,
    /// Dates as epoch ms.
    Date,
    /// Times as ms since midnight.
    Time,
}

/// The client-visible (ZQL) type of a column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ZqlType {
    /// Numbers, timestamps.
    Number,
    /// Booleans.
    Boolean,
    /// Strings.
    String,
    /// JSON, arrays.
    Json,
}

fn base_kind(type_name: &str, is_enum: bool) -> Option<ValueKind> {
    if is_enum {
        return Some(ValueKind::Text);
    }
    Some(match type_name {
        "int2" | "int4" | "int8" | "oid" | "smallserial" | "serial" | "bigserial" => ValueKind::Int,
        "float4" | "float8" | "numeric" => ValueKind::Float,
        "bool" => ValueKind::Bool,
        "text" | "varchar" | "bpchar" | "char" | "name" | "citext" | "inet" | "cidr"
        | "macaddr" | "macaddr8" | "pg_lsn" | "isbn" | "isbn13" | "issn" | "issn13" | "ean13"
        | "upc" | "ismn" | "ismn13" => ValueKind::Text,
        "uuid" => ValueKind::Uuid,
        "json" => ValueKind::Json,
        "jsonb" => ValueKind::Jsonb,
        "timestamp" => ValueKind::Timestamp,
        "timestamptz" => ValueKind::TimestampTz,
        "date" => ValueKind::Date,
        "time" => ValueKind::Time,
        "timetz" => ValueKind::TimeTz,
        _ => return None,
    })
}

impl UpstreamColumn {
    /// The conversion for this column; `None` when the type cannot be synced.
    pub fn kind(&self) -> Option<ValueKind> {
        if self.is_array {
            let elem = self.type_name.trim_end_matches("[]");
            let e = match base_kind(elem, self.is_enum)? {
                ValueKind::Int | ValueKind::Float => ElemKind::Number,
                ValueKind::Bool => ElemKind::Bool,
                ValueKind::Text | ValueKind::Uuid => ElemKind::Text,
                ValueKind::Json | ValueKind::Jsonb => ElemKind::Json,
                ValueKind::Timestamp | ValueKind::TimestampTz => ElemKind::Timestamp,
                ValueKind::Date => ElemKind::Date,
                ValueKind::Time | ValueKind::TimeTz => ElemKind::Time,
                ValueKind::Array(_) => return None,
            };
            return Some(ValueKind::Array(e));
        }
        base_kind(&self.type_name, self.is_enum)
    }

    /// The declared SQLite type: upstream type name plus Zero's attribute tags.
    pub fn declared_type(&self) -> String {
        let mut t = self.type_name.clone();
        if self.not_null {
            t.push_str("|NOT_NULL");
        }
        if self.is_enum {
            t.push_str("|TEXT_ENUM");
        }
        if self.is_array {
            t.push_str("|TEXT_ARRAY");
        }
        t
    }
}

impl ValueKind {
    /// The ZQL type clients see.
    pub fn zql_type(self) -> ZqlType {
        match self {
            ValueKind::Int
            | ValueKind::Float
            | ValueKind::Timestamp
            | ValueKind::TimestampTz
            | ValueKind::Date
            | ValueKind::Time
            | ValueKind::TimeTz => ZqlType::Number,
            ValueKind::Bool => ZqlType::Boolean,
            ValueKind::Text | ValueKind::Uuid => ZqlType::String,
            ValueKind::Json | ValueKind::Jsonb | ValueKind::Array(_) => ZqlType::Json,
        }
    }
}

/// A replicated table: what the replica stores and how to convert its values.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaTable {
    /// Upstream oid.
    pub oid: i64,
    /// Upstream schema.
    pub schema: String,
    /// Upstream name.
    pub upstream_name: String,
    /// Name in the replica: `name` for schema `public`, else `schema.name`.
    pub name: String,
    /// Synced columns.
    pub columns: Vec<ReplicaColumn>,
    /// Row key columns (primary key, else a non-null unique index).
    pub key: Vec<String>,
    /// Indexes to create in the replica (replica index name, unique, columns with direction).
    pub indexes: Vec<ReplicaIndex>,
}

/// A synced column.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaColumn {
    /// Upstream attnum.
    pub attnum: i32,
    /// Column name (same as upstream).
    pub name: String,
    /// Value conversion.
    pub kind: ValueKind,
    /// SQLite declared type.
    pub declared_type: String,
    /// The upstream column it came from.
    pub upstream: UpstreamColumn,
}

/// An index in the replica.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaIndex {
    /// Replica index name.
    pub name: String,
    /// Unique.
    pub unique: bool,
    /// Columns with direction.
    pub columns: Vec<(String, String)>,
}

/// The replica name of an upstream table or index.
pub fn replica_name(schema: &str, name: &str) -> String {
    if schema == "public" {
        name.to_string()
    } else {
        format!("{schema}.{name}")
    }
}

impl UpstreamTable {
    /// Maps this table onto the replica; `None` (with a warning) when it cannot be synced.
    pub fn to_replica(&self) -> Option<ReplicaTable> {
        let name = replica_name(&self.schema, &self.name);
        let mut columns = Vec::new();
        for c in &self.columns {
            match c.kind() {
                Some(kind) => columns.push(ReplicaColumn {
                    attnum: c.attnum,
                    name: c.name.clone(),
                    kind,
                    declared_type: c.declared_type(),
                    upstream: c.clone(),
                }),
                None => warn!(
                    table = %name,
                    column = %c.name,
                    r#type = %c.type_name,
                    "column has an unsupported type and is not synced"
                ),
            }
        }
        let synced = |cols: &[(String, String)]| {
            cols.iter()
                .all(|(n, _)| columns.iter().any(|c| &c.name == n))
        };
        let key = self
            .indexes
            .iter()
            .find(|i| i.primary && synced(&i.columns))
            .or_else(|| {
                self.indexes
                    .iter()
                    .filter(|i| i.unique && i.not_null && synced(&i.columns))
                    .min_by_key(|i| (i.columns.len(), i.name.clone()))
            })
            .map(|i| i.columns.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>());
        let Some(key) = key else {
            warn!(
                table = %name,
                "table has no primary key or non-null unique index (of synced columns) and is not synced"
            );
            return None;
        };
        let indexes = self
            .indexes
            .iter()
            .filter(|i| synced(&i.columns))
            .map(|i| ReplicaIndex {
                name: replica_name(&self.schema, &i.name),
                unique: i.unique,
                columns: i.columns.clone(),
            })
            .collect();
        Some(ReplicaTable {
            oid: self.oid,
            schema: self.schema.clone(),
            upstream_name: self.name.clone(),
            name,
            columns,
            key,
            indexes,
        })
    }
}

impl ReplicaTable {
    /// Position of a column by name.
    pub fn column_index(&self, name: &str) -> Option<usize> {
        self.columns.iter().position(|c| c.name == name)
    }
}

impl PublishedSchema {
    /// All syncable tables by replica name.
    pub fn replica_tables(&self) -> BTreeMap<String, ReplicaTable> {
        self.tables
            .iter()
            .filter_map(UpstreamTable::to_replica)
            .map(|t| (t.name.clone(), t))
            .collect()
    }
}
