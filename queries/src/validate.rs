//! Checking an AST against a [`Schema`], binding static parameters, and the schema-dependent
//! rewrites Zero applies before running a query (`completeOrdering`, `simplifyCondition`).
//!
//! Validation rejects what cannot run or is certainly a mistake: unknown tables, columns and
//! relationships, operators that do not fit the column type (Zero's `compareValues` throws on
//! mixed types, LIKE needs strings, IN needs an array), `start` inside EXISTS, `limit` inside a
//! junction hop, subqueries without alias, mismatched correlations, and static parameters that
//! were never bound.

use thiserror::Error;

use crate::ast::{
    Anchor, Ast, Condition, CorrelatedSubquery, Direction, LiteralValue, Operand, OrderPart,
    Parameter, SimpleCondition, SimpleOp, ValuePosition,
};
use crate::schema::{ColumnType, Schema, TableSchema};
use crate::value::{Value, ValueKind};

/// A validation failure, with the path of the query node where it was found.
#[derive(Debug, Clone, PartialEq, Error)]
#[error("{kind} (at {path})")]
pub struct ValidationError {
    /// Query node path: the root table, then subquery aliases (`issue/comments/creator`).
    pub path: String,
    /// What is wrong.
    pub kind: ValidationErrorKind,
}

/// What a [`ValidationError`] found.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ValidationErrorKind {
    /// The table is not in the schema.
    #[error("unknown table \"{0}\"")]
    UnknownTable(String),
    /// The column is not in the table.
    #[error("table \"{table}\" has no column \"{column}\" (in {context})")]
    UnknownColumn {
        /// Table searched.
        table: String,
        /// Missing column.
        column: String,
        /// Where it was used (`where`, `orderBy`, ...).
        context: &'static str,
    },
    /// The operator does not apply to the column's type.
    #[error("operator {op} cannot be applied to column \"{column}\" of type {ty}")]
    BadOperator {
        /// Column.
        column: String,
        /// Operator.
        op: SimpleOp,
        /// Column type (its JSON spelling).
        ty: &'static str,
    },
    /// The literal's type does not fit the column or operator.
    #[error("operator {op} on \"{column}\" cannot take {found}{expected}")]
    BadLiteral {
        /// Column (or `literal` for a literal on the left).
        column: String,
        /// Operator.
        op: SimpleOp,
        /// What was given.
        found: String,
        /// What was expected, prefixed by `; expected` when known.
        expected: String,
    },
    /// A static parameter is still in the AST.
    #[error("static parameter {0} is not bound")]
    UnboundStatic(String),
    /// `start` inside an EXISTS subquery (Zero does not support it).
    #[error("start is not allowed in an EXISTS subquery")]
    StartInExists,
    /// `limit` inside a junction (two-hop) relationship (the client throws on it).
    #[error("limit is not supported in junction relationships")]
    LimitInJunction,
    /// A subquery without alias.
    #[error("subquery on table \"{0}\" has no alias")]
    MissingAlias(String),
    /// Correlation fields are empty or of different lengths.
    #[error("correlation must have non-empty parentField and childField of equal length")]
    BadCorrelation,
}

/// Checks `ast` against `schema`.
pub fn validate(ast: &Ast, schema: &Schema) -> Result<(), ValidationError> {
    let mut v = Validator {
        schema,
        path: vec![ast.table.clone()],
    };
    v.ast(ast, NodeKind::Root)
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum NodeKind {
    Root,
    Related { in_junction: bool },
    Exists,
}

struct Validator<'a> {
    schema: &'a Schema,
    path: Vec<String>,
}

impl<'a> Validator<'a> {
    fn err(&self, kind: ValidationErrorKind) -> ValidationError {
        ValidationError {
            path: self.path.join("/"),
            kind,
        }
    }

    fn table(&self, name: &str) -> Result<&'a TableSchema, ValidationError> {
        let schema: &'a Schema = self.schema;
        schema
            .table(name)
            .ok_or_else(|| self.err(ValidationErrorKind::UnknownTable(name.to_owned())))
    }

    fn column(
        &self,
        table: &TableSchema,
        column: &str,
        context: &'static str,
    ) -> Result<ColumnType, ValidationError> {
        table.column(column).map(|c| c.ty).ok_or_else(|| {
            self.err(ValidationErrorKind::UnknownColumn {
                table: table.name.clone(),
                column: column.to_owned(),
                context,
            })
        })
    }

    fn ast(&mut self, ast: &Ast, kind: NodeKind) -> Result<(), ValidationError> {
        let table = self.table(&ast.table)?;
        if kind != NodeKind::Root && ast.alias.is_none() {
            return Err(self.err(ValidationErrorKind::MissingAlias(ast.table.clone())));
        }
        if let Some(w) = &ast.where_ {
            self.condition(table, w)?;
        }
        for OrderPart(col, _) in ast.order_by() {
            self.column(table, col, "orderBy")?;
        }
        if let Some(start) = &ast.start {
            if kind == NodeKind::Exists {
                return Err(self.err(ValidationErrorKind::StartInExists));
            }
            for (col, _) in &start.row.0 {
                self.column(table, col, "start")?;
            }
        }
        if ast.limit.is_some() && kind == (NodeKind::Related { in_junction: true }) {
            return Err(self.err(ValidationErrorKind::LimitInJunction));
        }
        let in_junction = matches!(kind, NodeKind::Related { in_junction: true });
        for r in ast.related() {
            let hidden = r.hidden == Some(true);
            if hidden && r.subquery.limit.is_some() {
                self.path.push(alias_of(r));
                return Err(self.err(ValidationErrorKind::LimitInJunction));
            }
            self.subquery(
                table,
                r,
                NodeKind::Related {
                    in_junction: in_junction || hidden,
                },
            )?;
        }
        Ok(())
    }

    fn subquery(
        &mut self,
        parent: &TableSchema,
        r: &CorrelatedSubquery,
        kind: NodeKind,
    ) -> Result<(), ValidationError> {
        self.path.push(alias_of(r));
        let c = &r.correlation;
        if c.parent_field.is_empty() || c.parent_field.len() != c.child_field.len() {
            return Err(self.err(ValidationErrorKind::BadCorrelation));
        }
        for f in &c.parent_field {
            self.column(parent, f, "correlation parentField")?;
        }
        let child = self.table(&r.subquery.table)?;
        for f in &c.child_field {
            self.column(child, f, "correlation childField")?;
        }
        self.ast(&r.subquery, kind)?;
        self.path.pop();
        Ok(())
    }

    fn condition(&mut self, table: &TableSchema, cond: &Condition) -> Result<(), ValidationError> {
        match cond {
            Condition::And { conditions } | Condition::Or { conditions } => {
                for c in conditions {
                    self.condition(table, c)?;
                }
                Ok(())
            }
            Condition::CorrelatedSubquery(c) => self.subquery(table, &c.related, NodeKind::Exists),
            Condition::Simple(s) => self.simple(table, s),
        }
    }

    fn simple(&self, table: &TableSchema, s: &SimpleCondition) -> Result<(), ValidationError> {
        let (name, left_ty) = match &s.left {
            ValuePosition::Column { name } => (name.clone(), self.column(table, name, "where")?),
            ValuePosition::Literal { value } => ("literal".to_owned(), literal_type(value)),
            ValuePosition::Static(p) => {
                return Err(self.err(ValidationErrorKind::UnboundStatic(param_name(p))));
            }
        };
        let right = match &s.right {
            Operand::Literal { value } => value,
            Operand::Static(p) => {
                return Err(self.err(ValidationErrorKind::UnboundStatic(param_name(p))));
            }
        };
        let bad_op = || {
            self.err(ValidationErrorKind::BadOperator {
                column: name.clone(),
                op: s.op,
                ty: left_ty.as_str(),
            })
        };
        let bad_literal = |found: String, expected: &str| {
            self.err(ValidationErrorKind::BadLiteral {
                column: name.clone(),
                op: s.op,
                found,
                expected: if expected.is_empty() {
                    String::new()
                } else {
                    format!("; expected {expected}")
                },
            })
        };
        match right {
            LiteralValue::Array(items) => {
                if !s.op.is_in() {
                    return Err(bad_literal("an array".to_owned(), "a single value"));
                }
                if left_ty == ColumnType::Json {
                    return Err(bad_op());
                }
                for item in items {
                    if !left_ty.accepts(item.kind()) {
                        return Err(bad_literal(describe(item), left_ty.as_str()));
                    }
                }
            }
            LiteralValue::Scalar(v) => {
                if s.op.is_in() {
                    return Err(bad_literal(describe(v), "an array"));
                }
                if s.op.is_like() {
                    if left_ty != ColumnType::String {
                        return Err(bad_op());
                    }
                    if !matches!(v.kind(), ValueKind::String | ValueKind::Null) {
                        return Err(bad_literal(describe(v), "a string pattern"));
                    }
                } else if s.op.is_ordering() && left_ty == ColumnType::Json {
                    return Err(bad_op());
                } else if !left_ty.accepts(v.kind()) {
                    return Err(bad_literal(describe(v), left_ty.as_str()));
                }
            }
        }
        Ok(())
    }
}

fn alias_of(r: &CorrelatedSubquery) -> String {
    r.subquery
        .alias
        .clone()
        .unwrap_or_else(|| r.subquery.table.clone())
}

fn literal_type(v: &LiteralValue) -> ColumnType {
    match v {
        LiteralValue::Array(_) => ColumnType::Json,
        LiteralValue::Scalar(s) => match s.kind() {
            ValueKind::Null => ColumnType::Null,
            ValueKind::Bool => ColumnType::Boolean,
            ValueKind::Number => ColumnType::Number,
            ValueKind::String => ColumnType::String,
            ValueKind::Json => ColumnType::Json,
        },
    }
}

fn describe(v: &Value) -> String {
    let kind = match v.kind() {
        ValueKind::Null => "null",
        ValueKind::Bool => "boolean",
        ValueKind::Number => "number",
        ValueKind::String => "string",
        ValueKind::Json => "json",
    };
    format!("{kind} {v}")
}

fn param_name(p: &Parameter) -> String {
    format!("{}.{}", p.anchor.as_str(), p.field.path().join("."))
}

/// Values for static parameters: the connection's auth data (decoded JWT payload) and, for
/// write permissions, the row before the mutation.
#[derive(Debug, Clone, Copy)]
pub struct StaticParams<'a> {
    /// `authData`; `{}` when the connection has no JWT.
    pub auth_data: Option<&'a serde_json::Value>,
    /// `preMutationRow`; only for CRUD write permissions.
    pub pre_mutation_row: Option<&'a serde_json::Value>,
}

/// Replaces every static parameter with the literal it refers to. A missing anchor or field
/// binds to null, as in Zero. Arrays of scalars become array literals (usable with `IN`).
pub fn bind_static(ast: &Ast, params: StaticParams<'_>) -> Ast {
    map_ast(ast, &mut |cond| bind_condition(cond, params))
}

fn resolve(p: &Parameter, params: StaticParams<'_>) -> LiteralValue {
    let anchor = match p.anchor {
        Anchor::AuthData => params.auth_data,
        Anchor::PreMutationRow => params.pre_mutation_row,
    };
    let mut cur = anchor;
    for f in p.field.path() {
        cur = cur.and_then(|c| c.get(f));
    }
    match cur {
        Some(serde_json::Value::Array(items))
            if items
                .iter()
                .all(|i| !(i.is_array() || i.is_object() || i.is_null())) =>
        {
            LiteralValue::Array(items.iter().cloned().map(Value::from_json).collect())
        }
        Some(v) => LiteralValue::Scalar(Value::from_json(v.clone())),
        None => LiteralValue::Scalar(Value::Null),
    }
}

fn bind_condition(cond: &Condition, params: StaticParams<'_>) -> Condition {
    match cond {
        Condition::Simple(s) => {
            let left = match &s.left {
                ValuePosition::Static(p) => ValuePosition::Literal {
                    value: resolve(p, params),
                },
                other => other.clone(),
            };
            let right = match &s.right {
                Operand::Static(p) => Operand::Literal {
                    value: resolve(p, params),
                },
                other => other.clone(),
            };
            Condition::Simple(SimpleCondition {
                left,
                right,
                op: s.op,
            })
        }
        other => other.clone(),
    }
}

/// Rebuilds an AST, applying `f` to every simple or EXISTS condition (after recursing into
/// EXISTS subqueries) and to nothing else.
fn map_ast(ast: &Ast, f: &mut dyn FnMut(&Condition) -> Condition) -> Ast {
    let mut out = ast.clone();
    out.where_ = ast.where_.as_ref().map(|w| map_condition(w, f));
    out.related = ast.related.as_ref().map(|rel| {
        rel.iter()
            .map(|r| CorrelatedSubquery {
                subquery: Box::new(map_ast(&r.subquery, f)),
                ..r.clone()
            })
            .collect()
    });
    out
}

fn map_condition(cond: &Condition, f: &mut dyn FnMut(&Condition) -> Condition) -> Condition {
    match cond {
        Condition::And { conditions } => Condition::And {
            conditions: conditions.iter().map(|c| map_condition(c, f)).collect(),
        },
        Condition::Or { conditions } => Condition::Or {
            conditions: conditions.iter().map(|c| map_condition(c, f)).collect(),
        },
        Condition::CorrelatedSubquery(c) => {
            let mut c = c.clone();
            c.related.subquery = Box::new(map_ast(&c.related.subquery, f));
            f(&Condition::CorrelatedSubquery(c))
        }
        Condition::Simple(_) => f(cond),
    }
}

/// Zero's `simplifyCondition`: singleton and/or collapse, same-type children are lifted, an
/// `and` containing false is false and an `or` containing true is true.
pub fn simplify_condition(c: &Condition) -> Condition {
    let (is_and, conditions) = match c {
        Condition::Simple(_) | Condition::CorrelatedSubquery(_) => return c.clone(),
        Condition::And { conditions } => (true, conditions),
        Condition::Or { conditions } => (false, conditions),
    };
    if conditions.len() == 1 {
        return simplify_condition(&conditions[0]);
    }
    let mut flat = Vec::new();
    for s in conditions.iter().map(simplify_condition) {
        match (is_and, s) {
            (true, Condition::And { conditions }) | (false, Condition::Or { conditions }) => {
                flat.extend(conditions);
            }
            (_, other) => flat.push(other),
        }
    }
    let always_false =
        |c: &Condition| matches!(c, Condition::Or { conditions } if conditions.is_empty());
    let always_true =
        |c: &Condition| matches!(c, Condition::And { conditions } if conditions.is_empty());
    if is_and && flat.iter().any(always_false) {
        return Condition::false_();
    }
    if !is_and && flat.iter().any(always_true) {
        return Condition::true_();
    }
    if is_and {
        Condition::And { conditions: flat }
    } else {
        Condition::Or { conditions: flat }
    }
}

/// Zero's `completeOrdering`: appends the primary-key columns (ascending) that are missing from
/// the `orderBy` of the root, every related subquery and every EXISTS subquery.
pub fn complete_ordering(ast: &Ast, schema: &Schema) -> Result<Ast, ValidationError> {
    let table = schema.table(&ast.table).ok_or_else(|| ValidationError {
        path: ast.table.clone(),
        kind: ValidationErrorKind::UnknownTable(ast.table.clone()),
    })?;
    let mut order: Vec<OrderPart> = ast.order_by().to_vec();
    for pk in &table.primary_key {
        if !order.iter().any(|p| &p.0 == pk) {
            order.push(OrderPart::new(pk.clone(), Direction::Asc));
        }
    }
    let mut out = ast.clone();
    out.order_by = Some(order);
    out.where_ = match &ast.where_ {
        Some(w) => Some(complete_condition(w, schema)?),
        None => None,
    };
    out.related = match &ast.related {
        Some(rel) => Some(
            rel.iter()
                .map(|r| {
                    Ok(CorrelatedSubquery {
                        subquery: Box::new(complete_ordering(&r.subquery, schema)?),
                        ..r.clone()
                    })
                })
                .collect::<Result<Vec<_>, ValidationError>>()?,
        ),
        None => None,
    };
    Ok(out)
}

fn complete_condition(c: &Condition, schema: &Schema) -> Result<Condition, ValidationError> {
    Ok(match c {
        Condition::Simple(_) => c.clone(),
        Condition::And { conditions } => Condition::And {
            conditions: conditions
                .iter()
                .map(|c| complete_condition(c, schema))
                .collect::<Result<_, _>>()?,
        },
        Condition::Or { conditions } => Condition::Or {
            conditions: conditions
                .iter()
                .map(|c| complete_condition(c, schema))
                .collect::<Result<_, _>>()?,
        },
        Condition::CorrelatedSubquery(csq) => {
            let mut csq = csq.clone();
            csq.related.subquery = Box::new(complete_ordering(&csq.related.subquery, schema)?);
            Condition::CorrelatedSubquery(csq)
        }
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::schema::tests::zbugs;

    fn ast(v: serde_json::Value) -> Ast {
        serde_json::from_value(v).expect("ast")
    }

    fn simple(col: &str, op: &str, v: serde_json::Value) -> serde_json::Value {
        json!({"type":"simple","left":{"type":"column","name":col},"right":{"type":"literal","value":v},"op":op})
    }

    fn err(v: serde_json::Value) -> String {
        validate(&ast(v), &zbugs())
            .expect_err("should fail")
            .to_string()
    }

    #[test]
    fn accepts_the_recorded_queries() {
        let open_issues = json!({"table":"issue","where":simple("open","=",json!(true)),"related":[{"correlation":{"parentField":["creatorID"],"childField":["id"]},"subquery":{"table":"user","alias":"creator"},"system":"client"},{"correlation":{"parentField":["id"],"childField":["issueID"]},"hidden":true,"subquery":{"table":"issueLabel","alias":"labels","related":[{"correlation":{"parentField":["labelID"],"childField":["id"]},"subquery":{"table":"label","alias":"labels"},"system":"client"}]},"system":"client"}],"limit":10,"orderBy":[["modified","desc"],["id","desc"]]});
        validate(&ast(open_issues), &zbugs()).expect("valid");
        let ops = json!({"table":"issue","where":{"type":"and","conditions":[
            simple("title","ILIKE",json!("%bug%")), simple("modified",">=",json!(5)), simple("id","IN",json!(["a","b"])),
            simple("assigneeID","IS",json!(null)), simple("meta","IS NOT",json!(null)), simple("open","!=",json!(false)),
            {"type":"correlatedSubquery","op":"NOT EXISTS","related":{"correlation":{"parentField":["id"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"zsubq_comments","limit":0}}}
        ]},"start":{"row":{"id":"x"},"exclusive":true}});
        validate(&ast(ops), &zbugs()).expect("valid");
    }

    #[test]
    fn reports_unknown_names_with_paths() {
        assert_eq!(
            err(json!({"table":"nope"})),
            "unknown table \"nope\" (at nope)"
        );
        assert_eq!(
            err(json!({"table":"issue","orderBy":[["nope","asc"]]})),
            "table \"issue\" has no column \"nope\" (in orderBy) (at issue)"
        );
        assert_eq!(
            err(
                json!({"table":"issue","related":[{"correlation":{"parentField":["id"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"comments","where":simple("bogus","=",json!(1))}}]})
            ),
            "table \"comment\" has no column \"bogus\" (in where) (at issue/comments)"
        );
        assert_eq!(
            err(
                json!({"table":"issue","related":[{"correlation":{"parentField":["idx"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"comments"}}]})
            ),
            "table \"issue\" has no column \"idx\" (in correlation parentField) (at issue/comments)"
        );
    }

    #[test]
    fn rejects_operators_that_do_not_fit_the_type() {
        assert!(
            err(json!({"table":"issue","where":simple("modified","LIKE",json!("1%"))}))
                .starts_with(
                    "operator LIKE cannot be applied to column \"modified\" of type number"
                )
        );
        assert!(
            err(json!({"table":"issue","where":simple("title","=",json!(5))}))
                .starts_with("operator = on \"title\" cannot take number 5; expected string")
        );
        assert!(
            err(json!({"table":"issue","where":simple("id","IN",json!("a"))}))
                .starts_with("operator IN on \"id\" cannot take string \"a\"; expected an array")
        );
        assert!(
            err(json!({"table":"issue","where":simple("id","=",json!(["a"]))}))
                .starts_with("operator = on \"id\" cannot take an array")
        );
        assert!(
            err(json!({"table":"issue","where":simple("modified","IN",json!([1,"2"]))}))
                .starts_with("operator IN on \"modified\" cannot take string \"2\"")
        );
        assert!(
            err(json!({"table":"issue","where":simple("meta",">",json!(1))}))
                .starts_with("operator > cannot be applied to column \"meta\" of type json")
        );
    }

    #[test]
    fn rejects_structural_problems() {
        let exists_with_start = json!({"table":"issue","where":{"type":"correlatedSubquery","op":"EXISTS","related":{"correlation":{"parentField":["id"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"zsubq_comments","start":{"row":{"id":"a"},"exclusive":false}}}}});
        assert_eq!(
            err(exists_with_start),
            "start is not allowed in an EXISTS subquery (at issue/zsubq_comments)"
        );
        let junction_limit = json!({"table":"issue","related":[{"correlation":{"parentField":["id"],"childField":["issueID"]},"hidden":true,"subquery":{"table":"issueLabel","alias":"labels","related":[{"correlation":{"parentField":["labelID"],"childField":["id"]},"subquery":{"table":"label","alias":"labels","limit":3}}]}}]});
        assert_eq!(
            err(junction_limit),
            "limit is not supported in junction relationships (at issue/labels/labels)"
        );
        let no_alias = json!({"table":"issue","related":[{"correlation":{"parentField":["id"],"childField":["issueID"]},"subquery":{"table":"comment"}}]});
        assert_eq!(
            err(no_alias),
            "subquery on table \"comment\" has no alias (at issue/comment)"
        );
        let bad_corr = json!({"table":"issue","related":[{"correlation":{"parentField":["id","title"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"c"}}]});
        assert!(err(bad_corr).starts_with("correlation must have"));
    }

    #[test]
    fn static_parameters_must_be_bound() {
        let q = json!({"table":"issue","where":{"type":"and","conditions":[
            {"type":"simple","left":{"type":"column","name":"creatorID"},"right":{"type":"static","anchor":"authData","field":"sub"},"op":"="},
            {"type":"simple","left":{"type":"column","name":"id"},"right":{"type":"static","anchor":"authData","field":["teams","ids"]},"op":"IN"},
            {"type":"simple","left":{"type":"static","anchor":"preMutationRow","field":"x"},"right":{"type":"literal","value":null},"op":"IS"}
        ]}});
        assert_eq!(
            err(q.clone()),
            "static parameter authData.sub is not bound (at issue)"
        );
        let auth = json!({"sub": "u1", "teams": {"ids": ["a", "b"]}});
        let bound = bind_static(
            &ast(q),
            StaticParams {
                auth_data: Some(&auth),
                pre_mutation_row: None,
            },
        );
        validate(&bound, &zbugs()).expect("bound query is valid");
        let want = json!({"table":"issue","where":{"type":"and","conditions":[
            simple("creatorID","=",json!("u1")),
            simple("id","IN",json!(["a","b"])),
            {"type":"simple","left":{"type":"literal","value":null},"right":{"type":"literal","value":null},"op":"IS"}
        ]}});
        assert_eq!(bound, ast(want));
    }

    #[test]
    fn simplify_matches_zero() {
        let a = Condition::cmp("a", SimpleOp::Eq, 1);
        let b = Condition::cmp("b", SimpleOp::Eq, 2);
        let and = |c: Vec<Condition>| Condition::And { conditions: c };
        let or = |c: Vec<Condition>| Condition::Or { conditions: c };
        assert_eq!(simplify_condition(&and(vec![a.clone()])), a);
        assert_eq!(
            simplify_condition(&and(vec![a.clone(), and(vec![b.clone(), a.clone()])])),
            and(vec![a.clone(), b.clone(), a.clone()])
        );
        assert_eq!(
            simplify_condition(&and(vec![a.clone(), or(vec![])])),
            Condition::false_()
        );
        assert_eq!(
            simplify_condition(&or(vec![a.clone(), and(vec![])])),
            Condition::true_()
        );
    }

    #[test]
    fn complete_ordering_appends_primary_keys_everywhere() {
        let q = ast(json!({"table":"issueLabel","orderBy":[["labelID","desc"]],
            "where":{"type":"correlatedSubquery","op":"EXISTS","related":{"correlation":{"parentField":["labelID"],"childField":["id"]},"subquery":{"table":"label","alias":"zsubq_label"}}},
            "related":[{"correlation":{"parentField":["issueID"],"childField":["id"]},"subquery":{"table":"issue","alias":"issue","orderBy":[["id","desc"]]}}]}));
        let done = complete_ordering(&q, &zbugs()).expect("complete");
        assert_eq!(
            done.order_by(),
            &[
                OrderPart::new("labelID", Direction::Desc),
                OrderPart::new("issueID", Direction::Asc)
            ]
        );
        assert_eq!(
            done.related()[0].subquery.order_by(),
            &[OrderPart::new("id", Direction::Desc)]
        );
        let Some(Condition::CorrelatedSubquery(c)) = &done.where_ else {
            panic!("exists");
        };
        assert_eq!(
            c.related.subquery.order_by(),
            &[OrderPart::new("id", Direction::Asc)]
        );
    }
}
