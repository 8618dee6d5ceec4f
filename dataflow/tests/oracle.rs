//! Oracle tests: random schemas, data, queries (every construct, nested) and change streams.
//! At every version, each live query's maintained result (both the engine's row set and the
//! state a client builds from the patches) must equal a from-scratch evaluation over the
//! accumulated tables. Queries are added and removed mid-stream, duplicated, and re-added
//! with other literals, so sharing of instances and templates is exercised too.

use std::collections::{BTreeMap, BTreeSet};

use rand::Rng;
mod support;

use support::generate::{Gen, Ty};
use zero_dataflow::plan::Catalog;
use zero_dataflow::reference::{Tables, evaluate};
use zero_dataflow::{Engine, EngineConfig, Op, RowPatch, TableChange};
use zero_queries::ast::{Ast, Condition, LiteralValue};
use zero_queries::validate::{complete_ordering, validate};
use zero_queries::{Row, Value};

/// Replaces literals in simple conditions with fresh random ones of the same type, keeping the
/// shape (the engine must then share the template).
fn reliteral(g: &mut Gen, c: &Condition) -> Condition {
    match c {
        Condition::Simple(s) => {
            let mut s = s.clone();
            if let zero_queries::ast::Operand::Literal {
                value: LiteralValue::Scalar(v),
            } = &s.right
            {
                let nv = match v.kind() {
                    zero_queries::value::ValueKind::Number => g.value(Ty::Num, false),
                    zero_queries::value::ValueKind::Bool => g.value(Ty::Bool, false),
                    _ => v.clone(),
                };
                s.right = zero_queries::ast::Operand::literal(nv);
            }
            Condition::Simple(s)
        }
        Condition::And { conditions } => Condition::And {
            conditions: conditions.iter().map(|c| reliteral(g, c)).collect(),
        },
        Condition::Or { conditions } => Condition::Or {
            conditions: conditions.iter().map(|c| reliteral(g, c)).collect(),
        },
        other => other.clone(),
    }
}

struct Live {
    ast: Ast,
    client: BTreeMap<(String, Vec<Value>), Row>,
}

fn run(seed: u64, workers: usize, versions: u64) -> usize {
    let mut g = Gen::new(seed);
    let schema = g.schema();
    let catalog = Catalog::new(&schema);
    let mut engine = Engine::new(EngineConfig { workers }, &schema).expect("engine starts");
    let ntables = g.tables.len();
    let mut db: Vec<BTreeMap<Vec<Value>, Row>> = vec![BTreeMap::new(); ntables];
    let mut live: BTreeMap<String, Live> = BTreeMap::new();
    let mut next_q = 0;
    let mut checked = 0;
    let pk_cols: Vec<Vec<usize>> = (0..ntables)
        .map(|t| {
            let tid = catalog.table_id(&g.tables[t].0).expect("table");
            catalog.tables[tid].pk.clone()
        })
        .collect();
    for v in 1..=versions {
        // Add queries: new random ones, duplicates, and same-shape variants.
        let adds = if v == 1 {
            4
        } else {
            usize::from(g.rng.random_bool(0.3))
        };
        for _ in 0..adds {
            let ast = if !live.is_empty() && g.rng.random_bool(0.3) {
                let keys: Vec<String> = live.keys().cloned().collect();
                let k = g.pick(&keys);
                let mut a = live[&k].ast.clone();
                if g.rng.random_bool(0.5) {
                    a.where_ = a.where_.as_ref().map(|w| reliteral(&mut g, w));
                    if a.limit.is_some() {
                        a.limit = Some(g.rng.random_range(0..5));
                    }
                }
                a
            } else {
                let t = g.rng.random_range(0..ntables);
                g.query(t, 2, None, false)
            };
            if validate(&ast, &schema).is_err() {
                continue;
            }
            let id = format!("q{next_q}");
            next_q += 1;
            engine
                .add_query(&id, &ast)
                .expect("valid query is accepted");
            live.insert(
                id,
                Live {
                    ast: complete_ordering(&ast, &schema).expect("complete"),
                    client: BTreeMap::new(),
                },
            );
        }
        if v > 2 && !live.is_empty() && g.rng.random_bool(0.2) {
            let keys: Vec<String> = live.keys().cloned().collect();
            let k = g.pick(&keys);
            assert!(engine.remove_query(&k).expect("remove"));
            live.remove(&k);
        }
        // Changes.
        let n = if v == 1 {
            60
        } else {
            g.rng.random_range(0..10)
        };
        let mut changes = Vec::new();
        let mut touched: BTreeSet<(usize, Vec<Value>)> = BTreeSet::new();
        for _ in 0..n {
            let t = g.rng.random_range(0..ntables);
            let roll = g.rng.random_range(0..10);
            let name = g.tables[t].0.clone();
            if db[t].len() < 4 || roll < 4 {
                let row = g.row(t, None);
                let pk: Vec<Value> = pk_cols[t].iter().map(|&c| row.get(c)).collect();
                if db[t].contains_key(&pk) || touched.contains(&(t, pk.clone())) {
                    continue;
                }
                touched.insert((t, pk.clone()));
                db[t].insert(pk, row.clone());
                changes.push(TableChange {
                    table: name,
                    op: Op::Insert,
                    row,
                });
            } else {
                let keys: Vec<Vec<Value>> = db[t].keys().cloned().collect();
                let pk = g.pick(&keys);
                if touched.contains(&(t, pk.clone())) {
                    continue;
                }
                touched.insert((t, pk.clone()));
                let old = db[t].remove(&pk).expect("present");
                changes.push(TableChange {
                    table: name.clone(),
                    op: Op::Delete,
                    row: old.clone(),
                });
                if roll < 8 {
                    let new = g.row(t, Some(&old));
                    db[t].insert(pk, new.clone());
                    changes.push(TableChange {
                        table: name,
                        op: Op::Insert,
                        row: new,
                    });
                }
            }
        }
        engine.apply(v, changes).expect("apply");
        let diffs = engine.step_until(v).expect("step");
        for d in diffs {
            assert_eq!(d.version, v);
            let Some(l) = live.get_mut(&d.query) else {
                panic!("diff for unknown query {}", d.query);
            };
            if d.initial {
                l.client.clear();
            }
            for p in d.patches {
                match p {
                    RowPatch::Put { table, pk, row } => {
                        l.client.insert((table.to_string(), pk), row);
                    }
                    RowPatch::Del { table, pk } => {
                        assert!(
                            l.client.remove(&(table.to_string(), pk)).is_some(),
                            "delete of a row the client does not hold"
                        );
                    }
                }
            }
        }
        // Oracle.
        let mut tables = Tables {
            rows: vec![Vec::new(); catalog.tables.len()],
        };
        for (t, rows) in db.iter().enumerate() {
            let tid = catalog.table_id(&g.tables[t].0).expect("table");
            tables.rows[tid] = rows.values().cloned().collect();
        }
        for (id, l) in &live {
            let expect = evaluate(&catalog, &l.ast, &tables);
            let expect_rows: BTreeSet<(String, Row)> = expect
                .synced
                .iter()
                .map(|(t, r)| (catalog.tables[*t].name.to_string(), r.clone()))
                .collect();
            let got: BTreeSet<(String, Row)> = engine
                .rows(id)
                .expect("live query")
                .into_iter()
                .map(|(t, r)| (t.to_string(), r))
                .collect();
            assert_eq!(
                got,
                expect_rows,
                "seed {seed} workers {workers} version {v} query {id}: {}",
                l.ast.to_json_string()
            );
            let client: BTreeSet<(String, Row)> = l
                .client
                .iter()
                .map(|((t, _), r)| (t.clone(), r.clone()))
                .collect();
            assert_eq!(
                client, expect_rows,
                "client state, seed {seed} version {v} query {id}"
            );
            checked += 1;
            if std::env::var("ORACLE_DEBUG").is_ok() {
                eprintln!(
                    "v{v} {id} rows={} {}",
                    expect_rows.len(),
                    l.ast.to_json_string()
                );
            }
        }
    }
    checked
}

/// Seeds per test; `ORACLE_SEEDS=n` widens the sweep when hunting bugs locally.
fn seeds(default: u64) -> u64 {
    std::env::var("ORACLE_SEEDS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(default)
}

#[test]
fn random_queries_match_oracle_one_worker() {
    let mut checked = 0;
    for seed in 0..seeds(24) {
        checked += run(seed, 1, 30);
    }
    assert!(checked > 1000, "only {checked} query-versions checked");
}

#[test]
fn random_queries_match_oracle_two_workers() {
    let mut checked = 0;
    for seed in 100..100 + seeds(12) {
        checked += run(seed, 2, 25);
    }
    assert!(checked > 400, "only {checked} query-versions checked");
}
