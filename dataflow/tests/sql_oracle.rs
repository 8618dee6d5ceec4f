//! A second, independent oracle: the queries crate's AST → SQLite translation, run on an
//! in-memory SQLite database holding the same random rows. It checks the reference evaluator
//! (the oracle of `oracle.rs`) and the engine's hierarchical view against SQL semantics on
//! random schemas and queries, and the rows each of them syncs (view rows plus EXISTS
//! witnesses) against [`zero_queries::sql::synced_rows`].

mod support;

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
use rusqlite::Connection;
#[path = "../../queries/tests/common/sqlite_exec.rs"]
mod sqlite_exec;
use rusqlite::types::Value as Sq;
use sqlite_exec::{exec, sq};
use support::generate::Gen;
use zero_dataflow::plan::Catalog;
use zero_dataflow::reference::{Tables, evaluate, view_json};
use zero_dataflow::{Engine, EngineConfig, Op, TableChange};
use zero_queries::ast::{Ast, Condition, ExistsOp, System};
use zero_queries::schema::{ColumnType, Schema};
use zero_queries::sql::{Statement, quote_ident, synced_rows, to_sql, to_view_json};
use zero_queries::validate::{complete_ordering, validate};
use zero_queries::{Row, Value};

fn sqlite(schema: &Schema, rows: &BTreeMap<String, Vec<Row>>) -> Connection {
    let conn = Connection::open_in_memory().expect("sqlite");
    for t in schema.tables.values() {
        let cols: Vec<String> = t
            .columns
            .iter()
            .map(|c| {
                let ty = match c.ty {
                    ColumnType::String | ColumnType::Null => "text",
                    ColumnType::Number => "float8",
                    ColumnType::Boolean => "bool",
                    ColumnType::Json => "jsonb",
                };
                format!("{} {ty}", quote_ident(&c.name))
            })
            .collect();
        conn.execute_batch(&format!(
            "CREATE TABLE {} ({});",
            quote_ident(&t.name),
            cols.join(", ")
        ))
        .expect("create");
        let marks: Vec<String> = (1..=t.columns.len()).map(|i| format!("?{i}")).collect();
        let insert = format!(
            "INSERT INTO {} VALUES ({})",
            quote_ident(&t.name),
            marks.join(", ")
        );
        for r in rows.get(&t.name).into_iter().flatten() {
            let params: Vec<Sq> = r.iter().map(|v| sq(&to_sql(&v))).collect();
            conn.execute(&insert, rusqlite::params_from_iter(params))
                .expect("insert");
        }
    }
    conn
}

/// Whether the client-side view over the synced rows can differ from the full evaluation:
/// NOT EXISTS children and permission rows are not synced.
fn view_needs_unsynced_rows(ast: &Ast) -> bool {
    fn cond(c: &Condition) -> bool {
        match c {
            Condition::Simple(_) => false,
            Condition::And { conditions } | Condition::Or { conditions } => {
                conditions.iter().any(cond)
            }
            Condition::CorrelatedSubquery(c) => {
                c.op == ExistsOp::NotExists
                    || c.related.system == Some(System::Permissions)
                    || view_needs_unsynced_rows(&c.related.subquery)
            }
        }
    }
    ast.where_.as_ref().is_some_and(cond)
        || ast
            .related()
            .iter()
            .any(|r| view_needs_unsynced_rows(&r.subquery))
}

/// Whether some non-permission EXISTS / NOT EXISTS of `ast` sits under an OR or is a NOT
/// EXISTS: the witnesses that only the Zero rule (every condition, at any depth) syncs.
fn has_witnesses(ast: &Ast) -> bool {
    fn cond(c: &Condition, under_or: bool) -> bool {
        match c {
            Condition::Simple(_) => false,
            Condition::And { conditions } => conditions.iter().any(|c| cond(c, under_or)),
            Condition::Or { conditions } => conditions.iter().any(|c| cond(c, true)),
            Condition::CorrelatedSubquery(c) => {
                c.related.system != Some(System::Permissions)
                    && (under_or
                        || c.op == ExistsOp::NotExists
                        || has_witnesses(&c.related.subquery))
            }
        }
    }
    ast.where_.as_ref().is_some_and(|w| cond(w, false))
        || ast.related().iter().any(|r| has_witnesses(&r.subquery))
}

#[test]
fn reference_and_engine_views_match_sqlite() {
    let mut compared = 0;
    let mut engine_views = 0;
    let mut with_witnesses = 0;
    let mut beyond_root = 0;
    let seeds: u64 = std::env::var("ORACLE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(30);
    for seed in 0..seeds {
        let mut g = Gen::new(1000 + seed);
        let schema = g.schema();
        let catalog = Catalog::new(&schema);
        let mut rows: BTreeMap<String, Vec<Row>> = BTreeMap::new();
        let mut changes = Vec::new();
        let ntables = g.tables.len();
        for _ in 0..50 {
            let t = g.rng.random_range(0..ntables);
            let row = g.row(t, None);
            let name = g.tables[t].0.clone();
            // Composite keys may repeat; keep the first row per key.
            let pk_cols = &catalog.tables[catalog.table_id(&name).expect("table")].pk;
            let key: Vec<Value> = pk_cols.iter().map(|&c| row.get(c)).collect();
            let list = rows.entry(name.clone()).or_default();
            if list
                .iter()
                .any(|r| pk_cols.iter().map(|&c| r.get(c)).collect::<Vec<_>>() == key)
            {
                continue;
            }
            list.push(row.clone());
            changes.push(TableChange {
                table: name,
                op: Op::Insert,
                row,
            });
        }
        let conn = sqlite(&schema, &rows);
        let mut tables = Tables {
            rows: vec![Vec::new(); catalog.tables.len()],
        };
        for (name, list) in &rows {
            tables.rows[catalog.table_id(name).expect("table")] = list.clone();
        }
        let mut engine = Engine::new(EngineConfig { workers: 1 }, &schema).expect("engine");
        let mut queries = Vec::new();
        for q in 0..8 {
            let t = g.rng.random_range(0..ntables);
            let ast = g.query(t, 2, None, false);
            if validate(&ast, &schema).is_err() {
                continue;
            }
            let id = format!("q{q}");
            engine.add_query(&id, &ast).expect("add");
            queries.push((id, ast));
        }
        engine.apply(1, changes).expect("apply");
        engine.step_until(1).expect("step");
        for (id, ast) in &queries {
            let sql_nodes =
                zero_queries::sql::evaluate(ast, &schema, |st: &Statement| exec(&conn, st))
                    .unwrap_or_else(|e| panic!("sql for {}: {e:?}", ast.to_json_string()));
            let want = to_view_json(&sql_nodes, &schema);
            let completed = complete_ordering(ast, &schema).expect("complete");
            let reference = evaluate(&catalog, &completed, &tables);
            let ours = view_json(&catalog, &reference.nodes);
            assert_eq!(
                ours,
                want,
                "seed {seed}: reference vs SQLite for {}",
                ast.to_json_string()
            );
            compared += 1;
            // The synced rows: the view's rows plus the witnesses of every EXISTS / NOT EXISTS
            // (under OR too), without permission subqueries.
            let want_rows = synced_rows(&sql_nodes);
            let reference_rows: BTreeSet<(String, Row)> = reference
                .synced
                .iter()
                .map(|(t, r)| (catalog.tables[*t].name.to_string(), r.clone()))
                .collect();
            assert_eq!(
                reference_rows,
                want_rows,
                "seed {seed}: reference synced rows vs SQLite for {}",
                ast.to_json_string()
            );
            let engine_rows: BTreeSet<(String, Row)> = engine
                .rows(id)
                .expect("live query")
                .into_iter()
                .map(|(t, r)| (t.to_string(), r))
                .collect();
            assert_eq!(
                engine_rows,
                want_rows,
                "seed {seed}: engine synced rows vs SQLite for {}",
                ast.to_json_string()
            );
            if has_witnesses(ast) {
                with_witnesses += 1;
            }
            if want_rows.len() > ours.as_array().map_or(0, Vec::len) {
                beyond_root += 1;
            }
            if !view_needs_unsynced_rows(ast) {
                let view = engine.view(id).expect("live query");
                assert_eq!(
                    view,
                    want,
                    "seed {seed}: engine view vs SQLite for {}",
                    ast.to_json_string()
                );
                engine_views += 1;
            }
        }
    }
    assert!(compared > 150, "only {compared} queries compared");
    assert!(
        with_witnesses > 20,
        "only {with_witnesses} queries with EXISTS under OR / NOT EXISTS"
    );
    assert!(
        beyond_root > 50,
        "only {beyond_root} queries synced more rows than their root rows"
    );
    assert!(
        engine_views > 100,
        "only {engine_views} engine views compared"
    );
}

fn fixture_schema() -> Schema {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema.json"),
    )
    .expect("schema file");
    Schema::from_json_str(&text).expect("schema")
}

/// Engine, reference and SQLite sync the same rows for `src` over `rows`; returns the ids (first
/// column) of the synced rows of `table`.
fn synced_ids(
    schema: &Schema,
    rows: &BTreeMap<String, Vec<Row>>,
    ast: &Ast,
    table: &str,
) -> Vec<String> {
    let ast = ast.clone();
    let src = ast.to_json_string();
    let catalog = Catalog::new(schema);
    let conn = sqlite(schema, rows);
    let nodes =
        zero_queries::sql::evaluate(&ast, schema, |st: &Statement| exec(&conn, st)).expect("sql");
    let want = synced_rows(&nodes);
    let mut tables = Tables {
        rows: vec![Vec::new(); catalog.tables.len()],
    };
    let mut changes = Vec::new();
    for (name, list) in rows {
        tables.rows[catalog.table_id(name).expect("table")] = list.clone();
        for row in list {
            changes.push(TableChange {
                table: name.clone(),
                op: Op::Insert,
                row: row.clone(),
            });
        }
    }
    let completed = complete_ordering(&ast, schema).expect("complete");
    let reference: BTreeSet<(String, Row)> = evaluate(&catalog, &completed, &tables)
        .synced
        .into_iter()
        .map(|(t, r)| (catalog.tables[t].name.to_string(), r))
        .collect();
    assert_eq!(reference, want, "reference vs SQLite for {src}");
    let mut engine = Engine::new(EngineConfig { workers: 1 }, schema).expect("engine");
    engine.add_query("q", &ast).expect("add");
    engine.apply(1, changes).expect("apply");
    engine.step_until(1).expect("step");
    let got: BTreeSet<(String, Row)> = engine
        .rows("q")
        .expect("live query")
        .into_iter()
        .map(|(t, r)| (t.to_string(), r))
        .collect();
    assert_eq!(got, want, "engine vs SQLite for {src}");
    want.iter()
        .filter(|(t, _)| t == table)
        .map(|(_, r)| r.get(0).as_str().unwrap_or_default().to_owned())
        .collect()
}

#[test]
fn witnesses_of_every_exists_and_not_exists_are_synced() {
    let schema = fixture_schema();
    let s = |v: &str| Value::from(v);
    let mut rows: BTreeMap<String, Vec<Row>> = BTreeMap::new();
    rows.insert(
        "issue".into(),
        [("i1", true), ("i2", false), ("i3", true), ("i4", false)]
            .into_iter()
            .map(|(id, open)| {
                Row::from(vec![
                    s(id),
                    s("t"),
                    Value::Bool(open),
                    Value::Number(1.0),
                    Value::Null,
                ])
            })
            .collect(),
    );
    rows.insert(
        "comment".into(),
        [
            ("c1", "i1", 4.0),
            ("c2", "i1", 3.0),
            ("c3", "i1", 2.0),
            ("c4", "i1", 1.0),
            ("c5", "i2", 1.0),
            ("c6", "i4", 9.0),
        ]
        .into_iter()
        .map(|(id, issue, created)| {
            Row::from(vec![s(id), s(issue), s("b"), Value::Number(created)])
        })
        .collect(),
    );
    let parse = |src: &str| zero_queries::parse::parse_query(src, &schema).expect("query");
    let comments = |src: &str| synced_ids(&schema, &rows, &parse(src), "comment");
    // A top-level EXISTS: the first 3 children in the child's ordering.
    assert_eq!(
        comments("issue.whereExists('comments')"),
        ["c1", "c2", "c3", "c5", "c6"]
    );
    assert_eq!(
        comments("issue.whereExists('comments', c => c.orderBy('created', 'asc'))"),
        ["c2", "c3", "c4", "c5", "c6"]
    );
    assert_eq!(
        comments("issue.whereExists('comments', {flip: true})"),
        ["c1", "c2", "c3", "c4", "c5", "c6"]
    );
    // Under OR, for every output row, whether or not the condition holds for it.
    assert_eq!(
        comments(
            "issue.where(({or, cmp, exists}) => or(cmp('id', 'i2'), exists('comments', c => c.where('created', '>', 5))))"
        ),
        ["c6"]
    );
    // A NOT EXISTS that fails under OR syncs the children that make it fail.
    assert_eq!(
        comments(
            "issue.where(({or, not, cmp, exists}) => or(cmp('open', false), not(exists('comments'))))"
        ),
        ["c5", "c6"]
    );
    // Under an AND inside an OR: rows that reach the output through the other branch have
    // witnesses too (i2 fails `open` but its comment is synced).
    assert_eq!(
        comments(
            "issue.where(({or, and, cmp, exists}) => or(and(cmp('open', true), exists('comments')), cmp('id', 'i2')))"
        ),
        ["c1", "c2", "c3", "c5"]
    );
    // A constant-true branch does not make the condition's witnesses go away.
    // (The query builder folds such constants away, so the AST is built by hand.)
    let mut ast = parse("issue.whereExists('comments')");
    ast.where_ = Some(Condition::Or {
        conditions: vec![ast.where_.take().expect("exists"), Condition::true_()],
    });
    assert_eq!(
        synced_ids(&schema, &rows, &ast, "comment"),
        ["c1", "c2", "c3", "c5", "c6"]
    );
    // A NOT EXISTS that holds has nothing to witness.
    assert!(comments("issue.where(({not, exists}) => not(exists('comments')))").is_empty());
}
