//! Oracle tests: random schemas, data, queries (every construct, nested) and change streams.
//! At every version, each live query's maintained result (both the engine's row set and the
//! state a client builds from the patches) must equal a from-scratch evaluation over the
//! accumulated tables. Queries are added and removed mid-stream, duplicated, and re-added
//! with other literals, so sharing of instances and templates is exercised too.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zero_dataflow::plan::Catalog;
use zero_dataflow::reference::{Tables, evaluate};
use zero_dataflow::{Engine, EngineConfig, Op, RowPatch, TableChange};
use zero_queries::ast::{
    Ast, Bound, Condition, CorrelatedSubquery, CorrelatedSubqueryCondition, Correlation, Direction,
    ExistsOp, LiteralValue, OrderPart, RowObject, SimpleOp, System,
};
use zero_queries::schema::Schema;
use zero_queries::validate::{complete_ordering, validate};
use zero_queries::{Row, Value};

#[derive(Clone, Copy, PartialEq)]
enum Ty {
    Num,
    Str,
    Bool,
}

/// A generated table: name, columns with types, primary-key column names.
type GenTable = (String, Vec<(String, Ty)>, Vec<String>);

struct Gen {
    rng: StdRng,
    /// (name, columns (name, type), pk column names)
    tables: Vec<GenTable>,
    next_id: i64,
}

const STRINGS: &[&str] = &["a", "b", "ab", "A_b", "a%", "x\\y", "", "bA"];
const PATTERNS: &[&str] = &["a%", "%b", "_", "%", "a\\%", "A_b", "%\\_%", "x\\\\y", "b_"];

impl Gen {
    fn new(seed: u64) -> Gen {
        let mut rng = StdRng::seed_from_u64(seed);
        let ntables = rng.random_range(2..=4);
        let mut tables = Vec::new();
        for t in 0..ntables {
            let mut cols = vec![
                ("id".to_owned(), Ty::Num),
                ("r0".to_owned(), Ty::Num),
                ("r1".to_owned(), Ty::Num),
                ("s".to_owned(), Ty::Str),
                ("f".to_owned(), Ty::Bool),
            ];
            for extra in 0..rng.random_range(0..2) {
                let ty = [Ty::Num, Ty::Str, Ty::Bool][rng.random_range(0..3)];
                cols.push((format!("x{extra}"), ty));
            }
            // Shuffle columns so positions differ from names.
            for i in (1..cols.len()).rev() {
                let j = rng.random_range(0..=i);
                cols.swap(i, j);
            }
            // Some tables get a composite primary key.
            let pk = if rng.random_bool(0.3) {
                vec!["r0".to_owned(), "id".to_owned()]
            } else {
                vec!["id".to_owned()]
            };
            tables.push((format!("t{t}"), cols, pk));
        }
        Gen {
            rng,
            tables,
            next_id: 0,
        }
    }

    fn schema(&self) -> Schema {
        let mut tables = serde_json::Map::new();
        for (name, cols, pk) in &self.tables {
            let mut c = serde_json::Map::new();
            for (n, ty) in cols {
                let ty = match ty {
                    Ty::Num => "number",
                    Ty::Str => "string",
                    Ty::Bool => "boolean",
                };
                c.insert(n.clone(), serde_json::json!({"type": ty, "optional": true}));
            }
            tables.insert(
                name.clone(),
                serde_json::json!({"columns": c, "primaryKey": pk}),
            );
        }
        let text = serde_json::json!({ "tables": tables }).to_string();
        Schema::from_json_str(&text).expect("generated schema is valid")
    }

    fn value(&mut self, ty: Ty, nullable: bool) -> Value {
        if nullable && self.rng.random_bool(0.15) {
            return Value::Null;
        }
        match ty {
            Ty::Num => Value::Number(f64::from(self.rng.random_range(0..6))),
            Ty::Str => Value::from(STRINGS[self.rng.random_range(0..STRINGS.len())]),
            Ty::Bool => Value::Bool(self.rng.random_bool(0.5)),
        }
    }

    fn row(&mut self, t: usize, keep: Option<&Row>) -> Row {
        let cols = self.tables[t].1.clone();
        let pk = self.tables[t].2.clone();
        let mut row = Vec::new();
        for (i, (name, ty)) in cols.iter().enumerate() {
            if let Some(old) = keep
                && pk.contains(name)
            {
                row.push(old[i].clone());
                continue;
            }
            if name == "id" {
                self.next_id += 1;
                row.push(Value::Number(self.next_id as f64));
            } else {
                let nullable = !pk.contains(name);
                row.push(self.value(*ty, nullable));
            }
        }
        Arc::from(row)
    }

    fn cols_of(&self, t: usize, ty: Ty) -> Vec<String> {
        self.tables[t]
            .1
            .iter()
            .filter(|(_, c)| *c == ty)
            .map(|(n, _)| n.clone())
            .collect()
    }

    fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.rng.random_range(0..v.len())].clone()
    }

    fn simple(&mut self, t: usize) -> Condition {
        if self.rng.random_bool(0.05) {
            // A literal on the left (`cmpLit`): constant truth either way.
            let a = self.value(Ty::Num, false);
            let b = self.value(Ty::Num, true);
            let op = self.pick(&[SimpleOp::Eq, SimpleOp::Lt, SimpleOp::IsNot]);
            return Condition::Simple(zero_queries::ast::SimpleCondition {
                left: zero_queries::ast::ValuePosition::Literal {
                    value: LiteralValue::Scalar(a),
                },
                right: zero_queries::ast::Operand::literal(b),
                op,
            });
        }
        let (name, ty) = {
            let cols = self.tables[t].1.clone();
            self.pick(&cols)
        };
        let op = match ty {
            Ty::Num => self.pick(&[
                SimpleOp::Eq,
                SimpleOp::Ne,
                SimpleOp::Lt,
                SimpleOp::Le,
                SimpleOp::Gt,
                SimpleOp::Ge,
                SimpleOp::Is,
                SimpleOp::IsNot,
                SimpleOp::In,
                SimpleOp::NotIn,
            ]),
            Ty::Str => self.pick(&[
                SimpleOp::Eq,
                SimpleOp::Ne,
                SimpleOp::Lt,
                SimpleOp::Like,
                SimpleOp::NotLike,
                SimpleOp::ILike,
                SimpleOp::NotILike,
                SimpleOp::In,
                SimpleOp::Is,
            ]),
            Ty::Bool => self.pick(&[SimpleOp::Eq, SimpleOp::Ne, SimpleOp::Is, SimpleOp::IsNot]),
        };
        let lit: LiteralValue = if matches!(op, SimpleOp::In | SimpleOp::NotIn) {
            let n = self.rng.random_range(0..3);
            LiteralValue::Array((0..n).map(|_| self.value(ty, false)).collect())
        } else if matches!(
            op,
            SimpleOp::Like | SimpleOp::NotLike | SimpleOp::ILike | SimpleOp::NotILike
        ) {
            LiteralValue::Scalar(Value::from(self.pick(PATTERNS)))
        } else if matches!(op, SimpleOp::Is | SimpleOp::IsNot) {
            LiteralValue::Scalar(self.value(ty, true))
        } else {
            let nullable = self.rng.random_bool(0.05);
            LiteralValue::Scalar(self.value(ty, nullable))
        };
        Condition::cmp(name, op, lit)
    }

    fn correlation(&mut self, parent: usize, child: usize) -> Correlation {
        let pc = self.cols_of(parent, Ty::Num);
        let cc = self.cols_of(child, Ty::Num);
        let n = if self.rng.random_bool(0.2) { 2 } else { 1 };
        let mut parent_field = Vec::new();
        let mut child_field = Vec::new();
        for _ in 0..n {
            parent_field.push(self.pick(&pc));
            child_field.push(self.pick(&cc));
        }
        Correlation {
            parent_field,
            child_field,
        }
    }

    fn cond(&mut self, t: usize, depth: u32, alias_n: &mut u32) -> Condition {
        let roll = self.rng.random_range(0..10);
        if depth == 0 || roll < 4 {
            return self.simple(t);
        }
        if roll < 7 {
            let child = self.rng.random_range(0..self.tables.len());
            let corr = self.correlation(t, child);
            *alias_n += 1;
            let mut sub = Ast::new(self.tables[child].0.clone());
            sub.alias = Some(format!("zsubq_e{alias_n}"));
            if self.rng.random_bool(0.6) {
                sub.where_ = Some(self.cond(child, depth - 1, alias_n));
            }
            if self.rng.random_bool(0.3) {
                sub.order_by = Some(self.order(child));
            }
            if self.rng.random_bool(0.1) {
                sub.limit = Some(self.rng.random_range(0..2));
            }
            let system = if self.rng.random_bool(0.15) {
                Some(System::Permissions)
            } else {
                Some(System::Client)
            };
            return Condition::CorrelatedSubquery(CorrelatedSubqueryCondition {
                related: CorrelatedSubquery {
                    correlation: corr,
                    hidden: None,
                    subquery: Box::new(sub),
                    system,
                },
                op: if self.rng.random_bool(0.3) {
                    ExistsOp::NotExists
                } else {
                    ExistsOp::Exists
                },
                flip: if self.rng.random_bool(0.2) {
                    Some(true)
                } else {
                    None
                },
                scalar: if self.rng.random_bool(0.1) {
                    Some(true)
                } else {
                    None
                },
            });
        }
        let n = self.rng.random_range(0..=3);
        let conditions = (0..n).map(|_| self.cond(t, depth - 1, alias_n)).collect();
        if roll < 9 {
            Condition::And { conditions }
        } else {
            Condition::Or { conditions }
        }
    }

    fn order(&mut self, t: usize) -> Vec<OrderPart> {
        let cols = self.tables[t].1.clone();
        let n = self.rng.random_range(0..=2);
        let mut out: Vec<OrderPart> = Vec::new();
        for _ in 0..n {
            let (c, _) = self.pick(&cols);
            if out.iter().any(|p| p.0 == c) {
                continue;
            }
            let d = if self.rng.random_bool(0.5) {
                Direction::Asc
            } else {
                Direction::Desc
            };
            out.push(OrderPart::new(c, d));
        }
        out
    }

    fn query(&mut self, t: usize, depth: u32, alias: Option<String>, junction: bool) -> Ast {
        let mut ast = Ast::new(self.tables[t].0.clone());
        ast.alias = alias;
        let mut n = 0;
        if self.rng.random_bool(0.7) {
            ast.where_ = Some(self.cond(t, depth.min(2), &mut n));
        }
        if self.rng.random_bool(0.7) {
            ast.order_by = Some(self.order(t));
        }
        if !junction && self.rng.random_bool(0.6) {
            ast.limit = Some(self.rng.random_range(0..5));
        }
        if self.rng.random_bool(0.2) {
            let order = ast.order_by.clone().unwrap_or_default();
            let mut row = Vec::new();
            for p in &order {
                let ty = self.tables[t]
                    .1
                    .iter()
                    .find(|(n, _)| *n == p.0)
                    .map(|c| c.1);
                if let Some(ty) = ty {
                    row.push((p.0.clone(), self.value(ty, true)));
                }
            }
            for pk in self.tables[t].2.clone() {
                if !row.iter().any(|(n, _)| *n == pk) {
                    row.push((pk, self.value(Ty::Num, false)));
                }
            }
            ast.start = Some(Bound {
                row: RowObject(row),
                exclusive: self.rng.random_bool(0.5),
            });
        }
        if depth > 0 {
            let nrel = self.rng.random_range(0..=2);
            let mut related = Vec::new();
            for i in 0..nrel {
                let child = self.rng.random_range(0..self.tables.len());
                let corr = self.correlation(t, child);
                let alias = format!("rel{depth}_{i}");
                if self.rng.random_bool(0.3) {
                    // A hidden junction hop with the destination below it.
                    let dest = self.rng.random_range(0..self.tables.len());
                    let inner_corr = self.correlation(child, dest);
                    let inner = self.query(dest, 0, Some(alias.clone()), true);
                    let mut junction = Ast::new(self.tables[child].0.clone());
                    junction.alias = Some(alias);
                    junction.related = Some(vec![CorrelatedSubquery {
                        correlation: inner_corr,
                        hidden: None,
                        subquery: Box::new(inner),
                        system: Some(System::Client),
                    }]);
                    related.push(CorrelatedSubquery {
                        correlation: corr,
                        hidden: Some(true),
                        subquery: Box::new(junction),
                        system: Some(System::Client),
                    });
                } else {
                    let sub = self.query(child, depth - 1, Some(alias), false);
                    related.push(CorrelatedSubquery {
                        correlation: corr,
                        hidden: None,
                        subquery: Box::new(sub),
                        system: Some(System::Client),
                    });
                }
            }
            if !related.is_empty() {
                ast.related = Some(related);
            }
        }
        ast
    }
}

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
                let pk: Vec<Value> = pk_cols[t].iter().map(|&c| row[c].clone()).collect();
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
