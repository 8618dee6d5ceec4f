//! A seeded generator of random schemas, rows and ZQL queries covering every construct
//! (filters of every operator with nulls, LIKE escapes, AND/OR nesting, EXISTS and NOT EXISTS
//! incl. flipped, scalar and permission ones, orderings, limits, start cursors, related to
//! depth 2 with hidden junction hops), shared by the oracle tests.

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use zero_queries::ast::{
    Ast, Bound, Condition, CorrelatedSubquery, CorrelatedSubqueryCondition, Correlation, Direction,
    ExistsOp, LiteralValue, OrderPart, RowObject, SimpleOp, System,
};
use zero_queries::schema::Schema;
use zero_queries::{Row, Value};

/// A column type of the generated schemas.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Ty {
    /// `number`.
    Num,
    /// `string`.
    Str,
    /// `boolean`.
    Bool,
}

/// A generated table: name, columns with types, primary-key column names.
pub(crate) type GenTable = (String, Vec<(String, Ty)>, Vec<String>);

pub(crate) struct Gen {
    pub(crate) rng: StdRng,
    /// (name, columns (name, type), pk column names)
    pub(crate) tables: Vec<GenTable>,
    next_id: i64,
}

const STRINGS: &[&str] = &["a", "b", "ab", "A_b", "a%", "x\\y", "", "bA"];
const PATTERNS: &[&str] = &["a%", "%b", "_", "%", "a\\%", "A_b", "%\\_%", "x\\\\y", "b_"];

impl Gen {
    pub(crate) fn new(seed: u64) -> Gen {
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

    pub(crate) fn schema(&self) -> Schema {
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

    pub(crate) fn value(&mut self, ty: Ty, nullable: bool) -> Value {
        if nullable && self.rng.random_bool(0.15) {
            return Value::Null;
        }
        match ty {
            Ty::Num => Value::Number(f64::from(self.rng.random_range(0..6))),
            Ty::Str => Value::from(STRINGS[self.rng.random_range(0..STRINGS.len())]),
            Ty::Bool => Value::Bool(self.rng.random_bool(0.5)),
        }
    }

    pub(crate) fn row(&mut self, t: usize, keep: Option<&Row>) -> Row {
        let cols = self.tables[t].1.clone();
        let pk = self.tables[t].2.clone();
        let mut row = Vec::new();
        for (i, (name, ty)) in cols.iter().enumerate() {
            if let Some(old) = keep
                && pk.contains(name)
            {
                row.push(old.get(i));
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
        Row::from(row)
    }

    pub(crate) fn cols_of(&self, t: usize, ty: Ty) -> Vec<String> {
        self.tables[t]
            .1
            .iter()
            .filter(|(_, c)| *c == ty)
            .map(|(n, _)| n.clone())
            .collect()
    }

    pub(crate) fn pick<T: Clone>(&mut self, v: &[T]) -> T {
        v[self.rng.random_range(0..v.len())].clone()
    }

    pub(crate) fn simple(&mut self, t: usize) -> Condition {
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

    pub(crate) fn correlation(&mut self, parent: usize, child: usize) -> Correlation {
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

    pub(crate) fn cond(&mut self, t: usize, depth: u32, alias_n: &mut u32) -> Condition {
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

    pub(crate) fn order(&mut self, t: usize) -> Vec<OrderPart> {
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

    pub(crate) fn query(
        &mut self,
        t: usize,
        depth: u32,
        alias: Option<String>,
        junction: bool,
    ) -> Ast {
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
