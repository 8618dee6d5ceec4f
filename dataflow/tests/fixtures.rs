//! Data-driven fixtures for the tricky parts of ZQL maintenance: limits refilling, start
//! cursors, EXISTS witnesses, junction relations, null correlation keys, and edits that move
//! rows across a window boundary.
//!
//! Each file in `tests/fixtures/cases/` holds ZQL queries (TypeScript syntax, parsed with the
//! schema in `tests/fixtures/schema.json`) and steps. A step is one version: rows to insert,
//! update (partial rows merged into the current row by primary key) and delete (primary keys),
//! then the expected result per query:
//!
//! * `tree`: the view with each row reduced to its `id` (a bare id when the row has no
//!   relationships, else `{"id": .., "<alias>": [..]}`);
//! * `synced`: the primary keys of every synced row per table (order-free; a composite key
//!   is an array).
//!
//! Every case runs with 1 and 2 workers, and every step is also checked against the
//! reference evaluator and against the state a client builds from the patches.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use zero_dataflow::plan::Catalog;
use zero_dataflow::reference::{Tables, evaluate};
use zero_dataflow::{Engine, EngineConfig, Op, RowPatch, TableChange};
use zero_queries::Row;
use zero_queries::parse::parse_query;
use zero_queries::schema::Schema;
use zero_queries::validate::complete_ordering;

fn tree(v: &serde_json::Value) -> serde_json::Value {
    match v {
        serde_json::Value::Array(items) => {
            serde_json::Value::Array(items.iter().map(tree).collect())
        }
        serde_json::Value::Object(obj) => {
            let rels: Vec<(&String, &serde_json::Value)> =
                obj.iter().filter(|(_, v)| v.is_array()).collect();
            let id = obj.get("id").cloned().unwrap_or(serde_json::Value::Null);
            if rels.is_empty() {
                id
            } else {
                let mut out = serde_json::Map::new();
                out.insert("id".into(), id);
                for (k, v) in rels {
                    out.insert(k.clone(), tree(v));
                }
                serde_json::Value::Object(out)
            }
        }
        other => other.clone(),
    }
}

fn pk_json(pk: &[zero_queries::Value]) -> serde_json::Value {
    if pk.len() == 1 {
        pk[0].to_json()
    } else {
        serde_json::Value::Array(pk.iter().map(zero_queries::Value::to_json).collect())
    }
}

fn synced_json(rows: &BTreeSet<(String, String)>) -> BTreeMap<String, BTreeSet<String>> {
    let mut out: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (t, pk) in rows {
        out.entry(t.clone()).or_default().insert(pk.clone());
    }
    out
}

fn run_case(path: &Path, schema: &Schema, workers: usize) {
    let name = path.display().to_string();
    let text = std::fs::read_to_string(path).expect("fixture readable");
    let case: serde_json::Value = serde_json::from_str(&text).expect("fixture is JSON");
    let catalog = Catalog::new(schema);
    let mut engine = Engine::new(EngineConfig { workers }, schema).expect("engine");
    let queries = case["queries"].as_object().expect("queries object");
    let mut asts = BTreeMap::new();
    for (qname, src) in queries {
        let ast = parse_query(src.as_str().expect("query text"), schema)
            .unwrap_or_else(|e| panic!("{name}: query {qname}: {e}"));
        engine
            .add_query(qname, &ast)
            .unwrap_or_else(|e| panic!("{name}: query {qname}: {e}"));
        asts.insert(
            qname.clone(),
            complete_ordering(&ast, schema).expect("complete"),
        );
    }
    // Current rows: table -> pk JSON text -> row object.
    let mut db: BTreeMap<String, BTreeMap<String, serde_json::Value>> = BTreeMap::new();
    let mut clients: BTreeMap<String, BTreeMap<(String, String), Row>> = BTreeMap::new();
    let pk_of = |table: &str, obj: &serde_json::Value| -> String {
        let t = schema.table(table).expect("table in schema");
        let pk: Vec<serde_json::Value> = t.primary_key.iter().map(|c| obj[c].clone()).collect();
        serde_json::Value::Array(pk).to_string()
    };
    let to_row = |table: &str, obj: &serde_json::Value| -> Row {
        schema.row_from_json(table, obj).expect("table in schema")
    };
    for (i, step) in case["steps"].as_array().expect("steps").iter().enumerate() {
        let version = i as u64 + 1;
        let mut changes = Vec::new();
        if let Some(ins) = step.get("insert").and_then(|v| v.as_object()) {
            for (table, rows) in ins {
                for obj in rows.as_array().expect("rows") {
                    db.entry(table.clone())
                        .or_default()
                        .insert(pk_of(table, obj), obj.clone());
                    changes.push(TableChange {
                        table: table.clone(),
                        op: Op::Insert,
                        row: to_row(table, obj),
                    });
                }
            }
        }
        if let Some(upd) = step.get("update").and_then(|v| v.as_object()) {
            for (table, rows) in upd {
                for patch in rows.as_array().expect("rows") {
                    let key = pk_of(table, patch);
                    let old = db
                        .get(table)
                        .and_then(|t| t.get(&key))
                        .cloned()
                        .unwrap_or_else(|| panic!("{name}: update of missing {table} {key}"));
                    let mut new = old.clone();
                    for (k, v) in patch.as_object().expect("object") {
                        new[k] = v.clone();
                    }
                    changes.push(TableChange {
                        table: table.clone(),
                        op: Op::Delete,
                        row: to_row(table, &old),
                    });
                    changes.push(TableChange {
                        table: table.clone(),
                        op: Op::Insert,
                        row: to_row(table, &new),
                    });
                    db.entry(table.clone()).or_default().insert(key, new);
                }
            }
        }
        if let Some(del) = step.get("delete").and_then(|v| v.as_object()) {
            for (table, keys) in del {
                for k in keys.as_array().expect("keys") {
                    let key = match k {
                        serde_json::Value::Array(_) => k.to_string(),
                        scalar => serde_json::Value::Array(vec![scalar.clone()]).to_string(),
                    };
                    let old = db
                        .get_mut(table)
                        .and_then(|t| t.remove(&key))
                        .unwrap_or_else(|| panic!("{name}: delete of missing {table} {key}"));
                    changes.push(TableChange {
                        table: table.clone(),
                        op: Op::Delete,
                        row: to_row(table, &old),
                    });
                }
            }
        }
        engine.apply(version, changes).expect("apply");
        for d in engine.step_until(version).expect("step") {
            let c = clients.entry(d.query.clone()).or_default();
            for p in d.patches {
                match p {
                    RowPatch::Put { table, pk, row } => {
                        c.insert((table.to_string(), pk_json(&pk).to_string()), row);
                    }
                    RowPatch::Del { table, pk } => {
                        c.remove(&(table.to_string(), pk_json(&pk).to_string()));
                    }
                }
            }
        }
        let mut tables = Tables {
            rows: vec![Vec::new(); catalog.tables.len()],
        };
        for (table, rows) in &db {
            let t = catalog.table_id(table).expect("table");
            tables.rows[t] = rows.values().map(|o| to_row(table, o)).collect();
        }
        let expect = step["expect"].as_object().expect("expect object");
        for (qname, ast) in &asts {
            let ctx = format!("{name} step {i} query {qname} workers {workers}");
            let got_rows: BTreeSet<(String, String)> = engine
                .rows(qname)
                .expect("live query")
                .into_iter()
                .map(|(t, r)| {
                    let tid = catalog.table_id(&t).expect("table");
                    (t.to_string(), pk_json(&catalog.pk_of(tid, &r)).to_string())
                })
                .collect();
            let oracle: BTreeSet<(String, String)> = evaluate(&catalog, ast, &tables)
                .synced
                .into_iter()
                .map(|(t, r)| {
                    (
                        catalog.tables[t].name.to_string(),
                        pk_json(&catalog.pk_of(t, &r)).to_string(),
                    )
                })
                .collect();
            assert_eq!(got_rows, oracle, "{ctx}: engine vs reference evaluator");
            let client: BTreeSet<(String, String)> = clients
                .get(qname)
                .map(|c| c.keys().map(|(t, pk)| (t.clone(), pk.clone())).collect())
                .unwrap_or_default();
            assert_eq!(client, got_rows, "{ctx}: client state from patches");
            let Some(want) = expect.get(qname) else {
                continue;
            };
            if let Some(t) = want.get("tree") {
                let view = engine.view(qname).expect("live query");
                assert_eq!(&tree(&view), t, "{ctx}: tree");
            }
            if let Some(s) = want.get("synced") {
                let mut want_rows = BTreeSet::new();
                for (table, pks) in s.as_object().expect("synced object") {
                    for pk in pks.as_array().expect("pk list") {
                        want_rows.insert((table.clone(), pk.to_string()));
                    }
                }
                assert_eq!(
                    synced_json(&got_rows),
                    synced_json(&want_rows),
                    "{ctx}: synced rows"
                );
            }
        }
    }
}

#[test]
fn fixtures() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let schema_text = std::fs::read_to_string(dir.join("schema.json")).expect("schema file");
    let schema = Schema::from_json_str(&schema_text).expect("schema");
    let mut files: Vec<_> = std::fs::read_dir(dir.join("cases"))
        .expect("cases dir")
        .map(|e| e.expect("dir entry").path())
        .filter(|p| p.extension().is_some_and(|e| e == "json"))
        .collect();
    files.sort();
    assert!(
        files.len() >= 6,
        "expected fixture files, found {}",
        files.len()
    );
    for f in &files {
        for workers in [1, 2] {
            run_case(f, &schema, workers);
        }
    }
}
