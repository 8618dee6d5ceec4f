//! Zero's `normalizeAST` (protocol §5.3): the canonical form that query hashes are computed
//! from.
//!
//! * AST keys are rebuilt in the order `schema, table, alias, where, related, start, limit,
//!   orderBy`; related entries as `correlation{parentField, childField}, hidden, subquery,
//!   system`, sorted by subquery alias (UTF-8 order, stable).
//! * `where` is flattened: children of the same and/or type are lifted one level, singleton
//!   and/or become their child, empty and/or disappear. Zero's flattening looks only one level
//!   down for same-type children (`and(and(and(a,b),c))` keeps an inner `and`); this is
//!   reproduced because the hash depends on it.
//! * and/or conditions are sorted: simple first (by left, op, right), then EXISTS (by alias, op,
//!   flip, scalar), then and/or (by type, then element-wise, shorter first).
//! * Simple and EXISTS condition objects keep their own key order; only the nested subquery AST
//!   and the correlation are rebuilt. [`normalize_json`] keeps that order; [`normalize`] works on
//!   the typed AST, whose serialization uses Zero's builder order.

use std::cell::Cell;
use std::cmp::Ordering;

use thiserror::Error;

use crate::ast::{Ast, Condition, LiteralValue, Operand, ValuePosition};
use crate::hash::js_number_to_string;
use crate::value::Value;

/// Why an AST could not be normalized.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum NormalizeError {
    /// Two static parameters had to be compared while sorting; Zero requires binding first.
    #[error("static parameters should be resolved before normalization")]
    StaticParameter,
    /// A related subquery has no alias, which Zero requires for sorting.
    #[error("related subquery on table \"{0}\" has no alias")]
    MissingAlias(String),
    /// The JSON was not a valid AST.
    #[error("invalid AST JSON: {0}")]
    Json(String),
}

/// Normalizes a typed AST.
pub fn normalize(ast: &Ast) -> Result<Ast, NormalizeError> {
    let err = Cell::new(None);
    let out = normalize_ast(ast, &err);
    match err.into_inner() {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

type ErrCell = Cell<Option<NormalizeError>>;

fn fail(err: &ErrCell, e: NormalizeError) {
    // Keep the first error; later ones are consequences.
    let prev = err.take();
    err.set(Some(prev.unwrap_or(e)));
}

fn normalize_ast(ast: &Ast, err: &ErrCell) -> Ast {
    let where_ = ast
        .where_
        .as_ref()
        .and_then(flattened)
        .map(|w| transform_where(&w, err));
    let related = ast.related.as_ref().map(|rel| {
        let mut rel: Vec<_> = rel
            .iter()
            .map(|r| {
                // Zero's comparator requires aliases, but a single entry is never compared.
                if rel.len() > 1 && r.subquery.alias.is_none() {
                    fail(err, NormalizeError::MissingAlias(r.subquery.table.clone()));
                }
                crate::ast::CorrelatedSubquery {
                    correlation: r.correlation.clone(),
                    hidden: r.hidden,
                    subquery: Box::new(normalize_ast(&r.subquery, err)),
                    system: r.system,
                }
            })
            .collect();
        rel.sort_by(|a, b| a.subquery.alias.cmp(&b.subquery.alias));
        rel
    });
    Ast {
        schema: ast.schema.clone(),
        table: ast.table.clone(),
        alias: ast.alias.clone(),
        where_,
        related,
        start: ast.start.clone(),
        limit: ast.limit,
        order_by: ast.order_by.clone(),
    }
}

/// Zero's `flattened`: one level of same-type lifting, singleton collapse, empty removal.
fn flattened(cond: &Condition) -> Option<Condition> {
    let (is_and, conditions) = match cond {
        Condition::Simple(_) | Condition::CorrelatedSubquery(_) => return Some(cond.clone()),
        Condition::And { conditions } => (true, conditions),
        Condition::Or { conditions } => (false, conditions),
    };
    let mut out = Vec::new();
    for c in conditions {
        match (is_and, c) {
            (true, Condition::And { conditions: inner })
            | (false, Condition::Or { conditions: inner }) => {
                out.extend(inner.iter().filter_map(flattened));
            }
            _ => out.extend(flattened(c)),
        }
    }
    match out.len() {
        0 => None,
        1 => out.pop(),
        _ if is_and => Some(Condition::And { conditions: out }),
        _ => Some(Condition::Or { conditions: out }),
    }
}

fn transform_where(cond: &Condition, err: &ErrCell) -> Condition {
    match cond {
        Condition::Simple(_) => cond.clone(),
        Condition::CorrelatedSubquery(c) => {
            let mut c = c.clone();
            c.related.subquery = Box::new(normalize_ast(&c.related.subquery, err));
            Condition::CorrelatedSubquery(c)
        }
        Condition::And { conditions } => Condition::And {
            conditions: sorted_conditions(conditions, err),
        },
        Condition::Or { conditions } => Condition::Or {
            conditions: sorted_conditions(conditions, err),
        },
    }
}

fn sorted_conditions(conditions: &[Condition], err: &ErrCell) -> Vec<Condition> {
    let mut out: Vec<_> = conditions.iter().map(|c| transform_where(c, err)).collect();
    out.sort_by(|a, b| cmp_condition(a, b, err));
    out
}

/// Zero's `cmpCondition`.
pub(crate) fn cmp_condition(a: &Condition, b: &Condition, err: &ErrCell) -> Ordering {
    match (a, b) {
        (Condition::Simple(x), Condition::Simple(y)) => {
            cmp_position(&position_of_left(&x.left), &position_of_left(&y.left), err)
                .then_with(|| x.op.as_str().cmp(y.op.as_str()))
                .then_with(|| {
                    cmp_position(
                        &position_of_right(&x.right),
                        &position_of_right(&y.right),
                        err,
                    )
                })
        }
        (Condition::Simple(_), _) => Ordering::Less,
        (_, Condition::Simple(_)) => Ordering::Greater,
        (Condition::CorrelatedSubquery(x), Condition::CorrelatedSubquery(y)) => {
            for sub in [&x.related.subquery, &y.related.subquery] {
                if sub.alias.is_none() {
                    fail(err, NormalizeError::MissingAlias(sub.table.clone()));
                }
            }
            x.related
                .subquery
                .alias
                .cmp(&y.related.subquery.alias)
                .then_with(|| x.op.as_str().cmp(y.op.as_str()))
                .then_with(|| x.flip.cmp(&y.flip))
                .then_with(|| x.scalar.cmp(&y.scalar))
        }
        (Condition::CorrelatedSubquery(_), _) => Ordering::Less,
        (_, Condition::CorrelatedSubquery(_)) => Ordering::Greater,
        (
            Condition::And { conditions: xs } | Condition::Or { conditions: xs },
            Condition::And { conditions: ys } | Condition::Or { conditions: ys },
        ) => a.type_name().cmp(b.type_name()).then_with(|| {
            for (l, r) in xs.iter().zip(ys.iter()) {
                let o = cmp_condition(l, r, err);
                if o != Ordering::Equal {
                    return o;
                }
            }
            xs.len().cmp(&ys.len())
        }),
    }
}

/// A value position reduced to what the comparator looks at.
enum Pos<'a> {
    Column(&'a str),
    Literal(&'a LiteralValue),
    Static,
}

impl Pos<'_> {
    fn type_name(&self) -> &'static str {
        match self {
            Pos::Column(_) => "column",
            Pos::Literal(_) => "literal",
            Pos::Static => "static",
        }
    }
}

fn position_of_left(p: &ValuePosition) -> Pos<'_> {
    match p {
        ValuePosition::Column { name } => Pos::Column(name),
        ValuePosition::Literal { value } => Pos::Literal(value),
        ValuePosition::Static(_) => Pos::Static,
    }
}

fn position_of_right(p: &Operand) -> Pos<'_> {
    match p {
        Operand::Literal { value } => Pos::Literal(value),
        Operand::Static(_) => Pos::Static,
    }
}

fn cmp_position(a: &Pos<'_>, b: &Pos<'_>, err: &ErrCell) -> Ordering {
    match (a, b) {
        (Pos::Column(x), Pos::Column(y)) => x.cmp(y),
        (Pos::Literal(x), Pos::Literal(y)) => js_string_of_literal(x).cmp(&js_string_of_literal(y)),
        (Pos::Static, Pos::Static) => {
            fail(err, NormalizeError::StaticParameter);
            Ordering::Equal
        }
        _ => a.type_name().cmp(b.type_name()),
    }
}

/// JavaScript's `String(value)` of a literal, which is what Zero sorts literals by.
pub fn js_string_of_literal(v: &LiteralValue) -> String {
    match v {
        LiteralValue::Scalar(s) => js_string_of_value(s),
        LiteralValue::Array(items) => items
            .iter()
            .map(js_string_of_value)
            .collect::<Vec<_>>()
            .join(","),
    }
}

fn js_string_of_value(v: &Value) -> String {
    match v {
        Value::Null => "null".to_owned(),
        Value::Bool(b) => b.to_string(),
        Value::Number(n) => {
            if n.is_nan() {
                "NaN".to_owned()
            } else if n.is_infinite() {
                if *n > 0.0 { "Infinity" } else { "-Infinity" }.to_owned()
            } else {
                js_number_to_string(*n)
            }
        }
        Value::String(s) => s.to_string(),
        Value::Json(j) => match &**j {
            serde_json::Value::Array(items) => items
                .iter()
                .map(|i| js_string_of_value(&Value::from_json(i.clone())))
                .collect::<Vec<_>>()
                .join(","),
            serde_json::Value::Object(_) => "[object Object]".to_owned(),
            other => js_string_of_value(&Value::from_json(other.clone())),
        },
    }
}

/// Normalizes an AST given as JSON, keeping the key order of condition objects exactly as Zero
/// does, so that [`crate::hash::js_stringify`] of the result is the text Zero hashes.
pub fn normalize_json(ast: &serde_json::Value) -> Result<serde_json::Value, NormalizeError> {
    let err = Cell::new(None);
    let out = normalize_ast_json(ast, &err)?;
    match err.into_inner() {
        Some(e) => Err(e),
        None => Ok(out),
    }
}

type JsonMap = serde_json::Map<String, serde_json::Value>;

fn as_object(v: &serde_json::Value) -> Result<&JsonMap, NormalizeError> {
    v.as_object()
        .ok_or_else(|| NormalizeError::Json(format!("expected an object, got {v}")))
}

fn normalize_ast_json(
    ast: &serde_json::Value,
    err: &ErrCell,
) -> Result<serde_json::Value, NormalizeError> {
    let obj = as_object(ast)?;
    let mut out = JsonMap::new();
    for key in ["schema", "table", "alias"] {
        if let Some(v) = obj.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    if let Some(w) = obj.get("where")
        && let Some(f) = flattened_json(w)?
    {
        out.insert("where".to_owned(), transform_where_json(&f, err)?);
    }
    if let Some(rel) = obj.get("related") {
        let items = rel
            .as_array()
            .ok_or_else(|| NormalizeError::Json("related must be an array".to_owned()))?;
        let mut entries = Vec::new();
        for r in items {
            let r = as_object(r)?;
            let mut e = JsonMap::new();
            e.insert(
                "correlation".to_owned(),
                correlation_json(r.get("correlation"))?,
            );
            if let Some(h) = r.get("hidden") {
                e.insert("hidden".to_owned(), h.clone());
            }
            let sub = r
                .get("subquery")
                .ok_or_else(|| NormalizeError::Json("related entry without subquery".to_owned()))?;
            let alias = sub.get("alias").and_then(|a| a.as_str()).map(str::to_owned);
            if items.len() > 1 && alias.is_none() {
                // Zero's comparator requires aliases, but a single entry is never compared.
                return Err(NormalizeError::MissingAlias(
                    sub.get("table")
                        .and_then(|t| t.as_str())
                        .unwrap_or_default()
                        .to_owned(),
                ));
            }
            e.insert("subquery".to_owned(), normalize_ast_json(sub, err)?);
            if let Some(s) = r.get("system") {
                e.insert("system".to_owned(), s.clone());
            }
            entries.push((alias, serde_json::Value::Object(e)));
        }
        entries.sort_by(|a, b| a.0.cmp(&b.0));
        out.insert(
            "related".to_owned(),
            serde_json::Value::Array(entries.into_iter().map(|(_, e)| e).collect()),
        );
    }
    for key in ["start", "limit", "orderBy"] {
        if let Some(v) = obj.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    Ok(serde_json::Value::Object(out))
}

fn correlation_json(c: Option<&serde_json::Value>) -> Result<serde_json::Value, NormalizeError> {
    let c = c.ok_or_else(|| NormalizeError::Json("missing correlation".to_owned()))?;
    let c = as_object(c)?;
    let mut out = JsonMap::new();
    for key in ["parentField", "childField"] {
        if let Some(v) = c.get(key) {
            out.insert(key.to_owned(), v.clone());
        }
    }
    Ok(serde_json::Value::Object(out))
}

fn cond_type(c: &serde_json::Value) -> Result<&str, NormalizeError> {
    c.get("type")
        .and_then(|t| t.as_str())
        .ok_or_else(|| NormalizeError::Json(format!("condition without type: {c}")))
}

fn cond_children(c: &serde_json::Value) -> Result<&Vec<serde_json::Value>, NormalizeError> {
    c.get("conditions")
        .and_then(|t| t.as_array())
        .ok_or_else(|| NormalizeError::Json(format!("and/or without conditions: {c}")))
}

fn flattened_json(cond: &serde_json::Value) -> Result<Option<serde_json::Value>, NormalizeError> {
    let ty = cond_type(cond)?;
    if ty != "and" && ty != "or" {
        return Ok(Some(cond.clone()));
    }
    let mut out = Vec::new();
    for c in cond_children(cond)? {
        if cond_type(c)? == ty {
            for gc in cond_children(c)? {
                out.extend(flattened_json(gc)?);
            }
        } else {
            out.extend(flattened_json(c)?);
        }
    }
    Ok(match out.len() {
        0 => None,
        1 => out.pop(),
        _ => Some(and_or_json(ty, out)),
    })
}

fn and_or_json(ty: &str, conditions: Vec<serde_json::Value>) -> serde_json::Value {
    let mut m = JsonMap::new();
    m.insert("type".to_owned(), serde_json::Value::String(ty.to_owned()));
    m.insert(
        "conditions".to_owned(),
        serde_json::Value::Array(conditions),
    );
    serde_json::Value::Object(m)
}

fn transform_where_json(
    cond: &serde_json::Value,
    err: &ErrCell,
) -> Result<serde_json::Value, NormalizeError> {
    let ty = cond_type(cond)?;
    match ty {
        "and" | "or" => {
            let mut items = Vec::new();
            for c in cond_children(cond)? {
                let json = transform_where_json(c, err)?;
                // The typed form is only used as the sort key; the JSON keeps its key order.
                let typed: Condition = serde_json::from_value(json.clone())
                    .map_err(|e| NormalizeError::Json(e.to_string()))?;
                items.push((typed, json));
            }
            items.sort_by(|a, b| cmp_condition(&a.0, &b.0, err));
            Ok(and_or_json(ty, items.into_iter().map(|(_, j)| j).collect()))
        }
        "correlatedSubquery" => {
            let mut obj = as_object(cond)?.clone();
            let related = obj
                .get("related")
                .ok_or_else(|| NormalizeError::Json("EXISTS without related".to_owned()))?;
            let mut related = as_object(related)?.clone();
            let correlation = correlation_json(related.get("correlation"))?;
            related.insert("correlation".to_owned(), correlation);
            let sub = related
                .get("subquery")
                .ok_or_else(|| NormalizeError::Json("EXISTS without subquery".to_owned()))?;
            let sub = normalize_ast_json(sub, err)?;
            related.insert("subquery".to_owned(), sub);
            obj.insert("related".to_owned(), serde_json::Value::Object(related));
            Ok(serde_json::Value::Object(obj))
        }
        _ => Ok(cond.clone()),
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;
    use crate::hash::{hash_of_ast, hash_of_ast_json, js_stringify};

    fn simple(col: &str, op: &str, v: serde_json::Value) -> serde_json::Value {
        json!({"type":"simple","left":{"type":"column","name":col},"right":{"type":"literal","value":v},"op":op})
    }

    fn norm_typed(v: &serde_json::Value) -> String {
        let ast: Ast = serde_json::from_value(v.clone()).expect("ast");
        js_stringify(&serde_json::to_value(normalize(&ast).expect("normalize")).expect("json"))
    }

    fn norm_json(v: &serde_json::Value) -> String {
        js_stringify(&normalize_json(v).expect("normalize"))
    }

    #[test]
    fn key_order_is_rebuilt() {
        let v = json!({"orderBy":[["id","asc"]],"limit":5,"where":simple("a","=",json!(1)),"table":"t","alias":"x","schema":""});
        let want = r#"{"schema":"","table":"t","alias":"x","where":{"type":"simple","left":{"type":"column","name":"a"},"right":{"type":"literal","value":1},"op":"="},"limit":5,"orderBy":[["id","asc"]]}"#;
        assert_eq!(norm_typed(&v), want);
        assert_eq!(norm_json(&v), want);
    }

    #[test]
    fn related_is_sorted_by_alias_and_rebuilt() {
        let v = json!({"table":"issue","related":[
            {"system":"client","correlation":{"childField":["id"],"parentField":["creatorID"]},"subquery":{"table":"user","alias":"zeta"}},
            {"subquery":{"table":"comment","alias":"alpha"},"correlation":{"parentField":["id"],"childField":["issueID"]},"hidden":false}
        ]});
        let want = r#"{"table":"issue","related":[{"correlation":{"parentField":["id"],"childField":["issueID"]},"hidden":false,"subquery":{"table":"comment","alias":"alpha"}},{"correlation":{"parentField":["creatorID"],"childField":["id"]},"subquery":{"table":"user","alias":"zeta"},"system":"client"}]}"#;
        assert_eq!(norm_typed(&v), want);
        assert_eq!(norm_json(&v), want);
    }

    #[test]
    fn conditions_are_flattened_and_sorted() {
        let exists = json!({"type":"correlatedSubquery","related":{"correlation":{"parentField":["id"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"zsubq_comments"}},"op":"EXISTS"});
        let v = json!({"table":"t","where":{"type":"and","conditions":[
            {"type":"or","conditions":[simple("b","=",json!(2)), simple("a","=",json!(1))]},
            exists,
            {"type":"and","conditions":[simple("z","<",json!(10)), {"type":"or","conditions":[]}]},
            simple("c","=",json!("x")),
            {"type":"and","conditions":[simple("a",">",json!(true))]}
        ]}});
        let want = json!({"table":"t","where":{"type":"and","conditions":[
            simple("a",">",json!(true)),
            simple("c","=",json!("x")),
            simple("z","<",json!(10)),
            exists,
            {"type":"or","conditions":[simple("a","=",json!(1)), simple("b","=",json!(2))]}
        ]}});
        assert_eq!(norm_typed(&v), js_stringify(&want));
        assert_eq!(norm_json(&v), js_stringify(&want));
    }

    #[test]
    fn flattening_looks_only_one_level_deep_like_zero() {
        // and(and(and(a,b),c), d): the outer lift yields [and(a,b) (itself kept), c, d].
        let a = simple("a", "=", json!(1));
        let b = simple("b", "=", json!(1));
        let c = simple("c", "=", json!(1));
        let d = simple("d", "=", json!(1));
        let v = json!({"table":"t","where":{"type":"and","conditions":[
            {"type":"and","conditions":[{"type":"and","conditions":[a, b]}, c]}, d]}});
        let want = json!({"table":"t","where":{"type":"and","conditions":[c, d, {"type":"and","conditions":[a, b]}]}});
        assert_eq!(norm_typed(&v), js_stringify(&want));
        assert_eq!(norm_json(&v), js_stringify(&want));
    }

    #[test]
    fn singleton_and_empty_conditions() {
        let a = simple("a", "=", json!(1));
        let v = json!({"table":"t","where":{"type":"or","conditions":[a]}});
        assert_eq!(
            norm_typed(&v),
            js_stringify(&json!({"table":"t","where":a}))
        );
        let v = json!({"table":"t","where":{"type":"and","conditions":[]}});
        assert_eq!(norm_typed(&v), r#"{"table":"t"}"#);
        assert_eq!(norm_json(&v), r#"{"table":"t"}"#);
    }

    #[test]
    fn literals_sort_by_their_javascript_string() {
        // String(10) = "10" sorts before String(9) = "9"; arrays join with commas.
        let v = json!({"table":"t","where":{"type":"or","conditions":[
            simple("a","=",json!(9)), simple("a","=",json!(10)), simple("a","IN",json!([1,2])), simple("a","=",json!(null))
        ]}});
        let want = json!({"table":"t","where":{"type":"or","conditions":[
            simple("a","=",json!(10)), simple("a","=",json!(9)), simple("a","=",json!(null)), simple("a","IN",json!([1,2]))
        ]}});
        // The op is compared before the right side ("=" < "IN"); then "10" < "9" < "null".
        assert_eq!(norm_typed(&v), js_stringify(&want));
    }

    #[test]
    fn condition_key_order_is_preserved_by_the_json_path() {
        // `not()` in the client builds {type, op, left, right}; the hash depends on it.
        let cond = json!({"type":"simple","op":"!=","left":{"type":"column","name":"a"},"right":{"type":"literal","value":1}});
        let v = json!({"table":"t","where":cond});
        assert_eq!(
            norm_json(&v),
            r#"{"table":"t","where":{"type":"simple","op":"!=","left":{"type":"column","name":"a"},"right":{"type":"literal","value":1}}}"#
        );
        // The typed path writes the builder's order, so its hash differs only in that case.
        let typed_hash = hash_of_ast(&serde_json::from_value(v.clone()).expect("ast")).expect("h");
        assert_ne!(typed_hash, hash_of_ast_json(&v).expect("h"));
        let builder_order = json!({"table":"t","where":simple("a","!=",json!(1))});
        assert_eq!(typed_hash, hash_of_ast_json(&builder_order).expect("h"));
    }

    #[test]
    fn static_parameters_in_compared_positions_are_rejected() {
        let st = json!({"type":"simple","left":{"type":"column","name":"a"},"right":{"type":"static","anchor":"authData","field":"sub"},"op":"="});
        let v = json!({"table":"t","where":{"type":"or","conditions":[st, st]}});
        let ast: Ast = serde_json::from_value(v.clone()).expect("ast");
        assert_eq!(normalize(&ast), Err(NormalizeError::StaticParameter));
        assert_eq!(normalize_json(&v), Err(NormalizeError::StaticParameter));
        // A single static parameter is never compared, so it is fine.
        let single = json!({"table":"t","where":st});
        assert!(normalize_json(&single).is_ok());
    }

    #[test]
    fn exists_conditions_sort_by_alias_op_flip_scalar() {
        let ex = |alias: &str, op: &str, flip: Option<bool>| {
            let mut c = json!({"type":"correlatedSubquery","related":{"correlation":{"parentField":["id"],"childField":["x"]},"subquery":{"table":"c","alias":alias}},"op":op});
            if let Some(f) = flip {
                c["flip"] = json!(f);
            }
            c
        };
        let v = json!({"table":"t","where":{"type":"or","conditions":[
            ex("b","EXISTS",None), ex("a","NOT EXISTS",None), ex("a","EXISTS",Some(true)), ex("a","EXISTS",Some(false)), ex("a","EXISTS",None)
        ]}});
        let want = json!({"table":"t","where":{"type":"or","conditions":[
            ex("a","EXISTS",None), ex("a","EXISTS",Some(false)), ex("a","EXISTS",Some(true)), ex("a","NOT EXISTS",None), ex("b","EXISTS",None)
        ]}});
        assert_eq!(norm_typed(&v), js_stringify(&want));
        assert_eq!(norm_json(&v), js_stringify(&want));
    }

    #[test]
    fn nested_subqueries_are_normalized() {
        let v = json!({"table":"t","where":{"type":"correlatedSubquery","op":"EXISTS","related":{"subquery":{"orderBy":[["id","asc"]],"table":"c","alias":"zsubq_c","where":{"type":"and","conditions":[simple("b","=",json!(1)),simple("a","=",json!(1))]}},"correlation":{"childField":["x"],"parentField":["id"]},"system":"client"}}});
        let want = r#"{"table":"t","where":{"type":"correlatedSubquery","op":"EXISTS","related":{"subquery":{"table":"c","alias":"zsubq_c","where":{"type":"and","conditions":[{"type":"simple","left":{"type":"column","name":"a"},"right":{"type":"literal","value":1},"op":"="},{"type":"simple","left":{"type":"column","name":"b"},"right":{"type":"literal","value":1},"op":"="}]},"orderBy":[["id","asc"]]},"correlation":{"parentField":["id"],"childField":["x"]},"system":"client"}}}"#;
        assert_eq!(norm_json(&v), want);
    }

    #[test]
    fn zero_ast_test_cases() {
        // Cases from Zero's ast.test.ts: sorting by column, then by literal, then by op.
        let v = json!({"table":"table","where":{"type":"and","conditions":[simple("b","=",json!("value")), simple("a","=",json!("value"))]}});
        let want = json!({"table":"table","where":{"type":"and","conditions":[simple("a","=",json!("value")), simple("b","=",json!("value"))]}});
        assert_eq!(norm_json(&v), js_stringify(&want));
        let v = json!({"table":"table","where":{"type":"and","conditions":[simple("a","=",json!("y")), simple("a","=",json!("x"))]}});
        let want = json!({"table":"table","where":{"type":"and","conditions":[simple("a","=",json!("x")), simple("a","=",json!("y"))]}});
        assert_eq!(norm_typed(&v), js_stringify(&want));
        let v = json!({"table":"table","where":{"type":"and","conditions":[simple("a","<",json!("x")), simple("a",">",json!("y"))]}});
        assert_eq!(norm_typed(&v), js_stringify(&v));
        // Undefined fields vanish, so key order and absent fields do not change the text.
        let a = json!({"alias":"alias","table":"table"});
        let b = json!({"table":"table","alias":"alias"});
        assert_eq!(norm_json(&a), norm_json(&b));
        let a = json!({"schema":"schema","alias":"alias","limit":10,"orderBy":[],"related":[],"table":"table"});
        let b = json!({"related":[],"schema":"schema","limit":10,"table":"table","orderBy":[],"alias":"alias"});
        assert_eq!(norm_json(&a), norm_json(&b));
        assert_eq!(norm_typed(&a), norm_json(&b));
    }

    /// Deterministic generator for the property tests below.
    struct Rng(u64);

    impl Rng {
        fn below(&mut self, n: usize) -> usize {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            (self.0 % n as u64) as usize
        }

        fn shuffle<T>(&mut self, items: &mut [T]) {
            for i in (1..items.len()).rev() {
                items.swap(i, self.below(i + 1));
            }
        }
    }

    /// A random condition whose siblings never tie in Zero's comparator (unique literals and
    /// aliases), so that its normalized form cannot depend on input order.
    fn random_condition(rng: &mut Rng, depth: u32, counter: &mut usize) -> serde_json::Value {
        *counter += 1;
        let n = *counter;
        match if depth >= 3 {
            rng.below(2)
        } else {
            rng.below(5)
        } {
            0 => {
                let ops = ["=", "!=", "<", ">=", "LIKE", "IS NOT"];
                let value = match rng.below(3) {
                    0 => json!(n),
                    1 => json!(format!("s{n}")),
                    _ => json!(n as f64 + 0.5),
                };
                simple(
                    &format!("c{}", rng.below(4)),
                    ops[rng.below(ops.len())],
                    value,
                )
            }
            1 => simple(
                &format!("c{}", rng.below(4)),
                "IN",
                json!([n, format!("x{n}")]),
            ),
            2 => {
                json!({"type":"correlatedSubquery","related":{"correlation":{"parentField":["id"],"childField":["pid"]},
                "subquery":{"table":"child","alias":format!("zsubq_{n}"),"where":random_condition(rng, depth + 1, counter)}},
                "op": if rng.below(2) == 0 { "EXISTS" } else { "NOT EXISTS" }})
            }
            k => {
                let len = rng.below(4);
                let items: Vec<_> = (0..len)
                    .map(|_| random_condition(rng, depth + 1, counter))
                    .collect();
                json!({"type": if k == 3 { "and" } else { "or" }, "conditions": items})
            }
        }
    }

    fn random_ast(rng: &mut Rng, counter: &mut usize) -> serde_json::Value {
        let mut ast = json!({"table":"t","where":random_condition(rng, 0, counter)});
        let related: Vec<_> = (0..rng.below(4))
            .map(|i| json!({"correlation":{"parentField":["id"],"childField":["pid"]},
                "subquery":{"table":"child","alias":format!("r{i}"),"where":random_condition(rng, 2, counter)}}))
            .collect();
        if !related.is_empty() {
            ast["related"] = json!(related);
        }
        ast
    }

    /// Shuffles every and/or condition list and every related list, recursively.
    fn shuffled(v: &serde_json::Value, rng: &mut Rng) -> serde_json::Value {
        match v {
            serde_json::Value::Object(m) => {
                let mut out = m.clone();
                for (k, child) in m {
                    let mut c = shuffled(child, rng);
                    if (k == "conditions" || k == "related")
                        && let serde_json::Value::Array(items) = &mut c
                    {
                        rng.shuffle(items);
                    }
                    out.insert(k.clone(), c);
                }
                serde_json::Value::Object(out)
            }
            serde_json::Value::Array(items) => {
                serde_json::Value::Array(items.iter().map(|i| shuffled(i, rng)).collect())
            }
            other => other.clone(),
        }
    }

    #[test]
    fn random_asts_normalize_consistently() {
        let mut rng = Rng(0x2545_F491_4F6C_DD1D);
        for _ in 0..300 {
            let mut counter = 0;
            let v = random_ast(&mut rng, &mut counter);
            let typed = norm_typed(&v);
            // The typed and JSON paths agree on builder-ordered input.
            assert_eq!(typed, norm_json(&v), "{v}");
            // Zero's one-level flattening can leave a same-type and/or nested, which the next
            // pass lifts; so normalization is not idempotent, but it reaches a fixpoint.
            let mut cur = typed.clone();
            for _ in 0..5 {
                let parsed: serde_json::Value = serde_json::from_str(&cur).expect("json");
                let next = norm_json(&parsed);
                assert_eq!(next, norm_typed(&parsed));
                if next == cur {
                    break;
                }
                cur = next;
            }
            let fixpoint: serde_json::Value = serde_json::from_str(&cur).expect("json");
            assert_eq!(norm_json(&fixpoint), cur, "no fixpoint for {v}");
            // Independent of the order conditions and related entries were written in.
            let s = shuffled(&v, &mut rng);
            assert_eq!(norm_typed(&s), typed, "{v}\nshuffled: {s}");
            assert_eq!(
                hash_of_ast_json(&s).expect("hash"),
                hash_of_ast_json(&v).expect("hash")
            );
        }
    }

    #[test]
    fn normalization_is_idempotent() {
        let v = json!({"table":"t","where":{"type":"and","conditions":[
            {"type":"or","conditions":[simple("b","=",json!(2)), simple("a","=",json!(1))]},
            simple("c","=",json!("x"))]},"related":[{"correlation":{"parentField":["a"],"childField":["b"]},"subquery":{"table":"u","alias":"b"}},{"correlation":{"parentField":["a"],"childField":["b"]},"subquery":{"table":"u","alias":"a"}}]});
        let once = normalize_json(&v).expect("n1");
        assert_eq!(normalize_json(&once).expect("n2"), once);
        let ast: Ast = serde_json::from_value(v).expect("ast");
        let n = normalize(&ast).expect("n");
        assert_eq!(normalize(&n).expect("n"), n);
    }
}
