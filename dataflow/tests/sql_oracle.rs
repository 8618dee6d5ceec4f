//! A second, independent oracle: the queries crate's AST → SQLite translation, run on an
//! in-memory SQLite database holding the same random rows. It checks the reference evaluator
//! (the oracle of `oracle.rs`) and the engine's hierarchical view against SQL semantics on
//! random schemas and queries.

mod support;

use std::collections::BTreeMap;

use rand::Rng;
use rusqlite::Connection;
use rusqlite::types::Value as Sq;
use support::generate::Gen;
use zero_dataflow::plan::Catalog;
use zero_dataflow::reference::{Tables, evaluate, view_json};
use zero_dataflow::{Engine, EngineConfig, Op, TableChange};
use zero_queries::ast::{Ast, Condition, ExistsOp, System};
use zero_queries::schema::{ColumnType, Schema};
use zero_queries::sql::{SqlValue, Statement, quote_ident, to_sql, to_view_json};
use zero_queries::validate::{complete_ordering, validate};
use zero_queries::{Row, Value};

fn sq(v: &SqlValue) -> Sq {
    match v {
        SqlValue::Null => Sq::Null,
        SqlValue::Integer(i) => Sq::Integer(*i),
        SqlValue::Real(f) => Sq::Real(*f),
        SqlValue::Text(t) => Sq::Text(t.clone()),
    }
}

fn exec(conn: &Connection, st: &Statement) -> Result<Vec<Vec<SqlValue>>, rusqlite::Error> {
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
            let params: Vec<Sq> = r.iter().map(|v| sq(&to_sql(v))).collect();
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

#[test]
fn reference_and_engine_views_match_sqlite() {
    let mut compared = 0;
    let mut engine_views = 0;
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
            let key: Vec<Value> = pk_cols.iter().map(|&c| row[c].clone()).collect();
            let list = rows.entry(name.clone()).or_default();
            if list
                .iter()
                .any(|r| pk_cols.iter().map(|&c| r[c].clone()).collect::<Vec<_>>() == key)
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
            let ours = view_json(&catalog, &evaluate(&catalog, &completed, &tables).nodes);
            assert_eq!(
                ours,
                want,
                "seed {seed}: reference vs SQLite for {}",
                ast.to_json_string()
            );
            compared += 1;
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
        engine_views > 100,
        "only {engine_views} engine views compared"
    );
}
