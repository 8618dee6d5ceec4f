//! The client-schema check (protocol §11.2): every table and column the client declares must be
//! replicated with the same ZQL type, and its primary key must be the column set of a unique
//! index. Any problem gives `SchemaVersionNotSupported`, one line per problem.

use std::collections::{BTreeMap, BTreeSet};

use serde::Deserialize;
use serde_json::Value as Json;

use super::protocol::{ErrorBody, ErrorKind};
use crate::schema::{ReplicaTable, ZqlType};

#[derive(Deserialize)]
struct ClientSchema {
    tables: BTreeMap<String, ClientTable>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ClientTable {
    columns: BTreeMap<String, ClientColumn>,
    primary_key: Vec<String>,
}

#[derive(Deserialize)]
struct ClientColumn {
    #[serde(rename = "type")]
    ty: String,
}

fn zql_name(t: ZqlType) -> &'static str {
    match t {
        ZqlType::Number => "number",
        ZqlType::Boolean => "boolean",
        ZqlType::String => "string",
        ZqlType::Json => "json",
    }
}

/// Checks `schema` against the replica's tables; on success returns each client table's
/// primary key (which overrides the replica's row key for ordering and row identity).
pub fn check_client_schema(
    schema: &Json,
    tables: &BTreeMap<String, ReplicaTable>,
) -> Result<BTreeMap<String, Vec<String>>, ErrorBody> {
    let cs: ClientSchema = serde_json::from_value(schema.clone()).map_err(|e| {
        ErrorBody::new(
            ErrorKind::InvalidConnectionRequest,
            format!("invalid clientSchema: {e}"),
        )
    })?;
    if tables.is_empty() {
        return Err(ErrorBody::new(
            ErrorKind::Internal,
            "No tables have been synced from upstream. Please check that the ZERO_UPSTREAM_DB has been properly set.",
        ));
    }
    let mut problems = Vec::new();
    let mut keys = BTreeMap::new();
    for (name, ct) in &cs.tables {
        let Some(t) = tables.get(name) else {
            let known: Vec<&str> = tables.keys().map(String::as_str).collect();
            problems.push(format!(
                "The \"{name}\" table does not exist or is not one of the replicated tables: {}.",
                known
                    .iter()
                    .map(|k| format!("\"{k}\""))
                    .collect::<Vec<_>>()
                    .join(",")
            ));
            continue;
        };
        for (cname, cc) in &ct.columns {
            match t.columns.iter().find(|c| &c.name == cname) {
                None => problems.push(format!(
                    "The \"{name}\".\"{cname}\" column does not exist or is not one of the replicated columns."
                )),
                Some(c) => {
                    let server = zql_name(c.kind.zql_type());
                    if cc.ty != server && cc.ty != "null" {
                        problems.push(format!(
                            "The \"{name}\".\"{cname}\" column's upstream type \"{server}\" does not match the client type \"{}\".",
                            cc.ty
                        ));
                    }
                }
            }
        }
        let pk: BTreeSet<&String> = ct.primary_key.iter().collect();
        let unique = t.key.iter().collect::<BTreeSet<_>>() == pk
            || t.indexes.iter().any(|i| {
                i.unique && i.columns.iter().map(|(c, _)| c).collect::<BTreeSet<_>>() == pk
            });
        if !unique {
            problems.push(format!(
                "The primary key of the \"{name}\" table ({}) is not a unique index upstream.",
                ct.primary_key.join(", ")
            ));
        }
        keys.insert(name.clone(), ct.primary_key.clone());
    }
    if problems.is_empty() {
        Ok(keys)
    } else {
        Err(ErrorBody::new(
            ErrorKind::SchemaVersionNotSupported,
            problems.join("\n"),
        ))
    }
}
