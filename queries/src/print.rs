//! ZQL text for an AST, in the form Zero's `astToZQL` gives it: the inspector shows a query
//! after permissions this way, and people read it more easily than AST JSON.
//!
//! ```text
//! issue.where('open', true).whereExists('labels', q => q.where('name', 'bug')).orderBy('id', 'asc')
//! ```
//!
//! Relationships are named by their aliases (`zsubq_` stripped from EXISTS subqueries), hidden
//! junction hops are skipped, top-level `and`s become chained `where`s, `or` and nested
//! conditions become `where(({cmp, or}) => ...)`, and parameters print as `authParam(...)`.
//! For queries without parameters, [`crate::parse::parse_query`] reads the text back into the
//! same AST.

use std::collections::BTreeSet;

use crate::ast::{
    Ast, Condition, CorrelatedSubquery, CorrelatedSubqueryCondition, ExistsOp, LiteralValue,
    Operand, ParamField, Parameter, SUBQ_PREFIX, SimpleCondition, SimpleOp, ValuePosition,
};
use crate::value::Value;

/// The query as ZQL, starting with its table.
pub fn to_zql(ast: &Ast) -> String {
    format!("{}{}", ast.table, chain(ast))
}

/// The method chain after the table (`.where(...).orderBy(...)`).
fn chain(ast: &Ast) -> String {
    let mut out = String::new();
    if let Some(w) = &ast.where_ {
        out.push_str(&condition(w, true, &mut BTreeSet::new()));
    }
    for r in ast.related.iter().flatten() {
        if r.hidden == Some(true) {
            // A junction hop: the relationship is its one child.
            if let Some(inner) = r.subquery.related.as_ref().and_then(|v| v.first()) {
                out.push_str(&related(inner));
            }
        } else {
            out.push_str(&related(r));
        }
    }
    for o in ast.order_by.iter().flatten() {
        out.push_str(&format!(".orderBy({}, '{}')", quote(&o.0), o.1.as_str()));
    }
    if let Some(n) = ast.limit {
        out.push_str(&format!(".limit({n})"));
    }
    if let Some(b) = &ast.start {
        let row = serde_json::to_string(&b.row).expect("rows serialize");
        if b.exclusive {
            out.push_str(&format!(".start({row})"));
        } else {
            out.push_str(&format!(".start({row}, {{ inclusive: true }})"));
        }
    }
    out
}

/// Whether a subquery needs a callback (`q => q...`) to say what it adds.
fn has_body(ast: &Ast) -> bool {
    ast.where_.is_some()
        || ast.related.as_ref().is_some_and(|r| !r.is_empty())
        || ast.order_by.is_some()
        || ast.limit.is_some()
}

fn related(r: &CorrelatedSubquery) -> String {
    let Some(alias) = &r.subquery.alias else {
        return String::new();
    };
    if has_body(&r.subquery) {
        format!(".related({}, q => q{})", quote(alias), chain(&r.subquery))
    } else {
        format!(".related({})", quote(alias))
    }
}

/// `top`: the condition is a `.where` of the query (else an argument inside a callback, whose
/// helpers are collected in `helpers`).
fn condition(c: &Condition, top: bool, helpers: &mut BTreeSet<&'static str>) -> String {
    match c {
        Condition::Simple(s) => simple(s, top),
        Condition::And { conditions } | Condition::Or { conditions } if conditions.len() == 1 => {
            condition(&conditions[0], top, helpers)
        }
        Condition::And { conditions } if top => conditions
            .iter()
            .map(|c| condition(c, true, helpers))
            .collect(),
        Condition::And { conditions } => {
            helpers.insert("and");
            let parts: Vec<String> = conditions
                .iter()
                .map(|c| condition(c, false, helpers))
                .collect();
            format!("and({})", parts.join(", "))
        }
        Condition::Or { conditions } => {
            let mut inner = BTreeSet::new();
            let parts: Vec<String> = conditions
                .iter()
                .map(|c| condition(c, false, &mut inner))
                .collect();
            inner.insert("cmp");
            inner.insert("or");
            let list: Vec<&str> = inner.into_iter().collect();
            let expr = format!("or({})", parts.join(", "));
            if top {
                format!(".where(({{{}}}) => {expr})", list.join(", "))
            } else {
                // Nested: the enclosing callback destructures the helpers.
                helpers.extend(list);
                expr
            }
        }
        Condition::CorrelatedSubquery(e) => exists(e, top, helpers),
    }
}

fn simple(s: &SimpleCondition, top: bool) -> String {
    let name = if top { ".where" } else { "cmp" };
    let left = position(&s.left);
    let right = match &s.right {
        Operand::Literal { value } => literal(value),
        Operand::Static(p) => param(p),
    };
    if s.op == SimpleOp::Eq {
        format!("{name}({left}, {right})")
    } else {
        format!("{name}({left}, '{}', {right})", s.op.as_str())
    }
}

fn exists(
    e: &CorrelatedSubqueryCondition,
    top: bool,
    helpers: &mut BTreeSet<&'static str>,
) -> String {
    let sub = exists_subquery(&e.related);
    let alias = sub_alias(&e.related);
    let mut opts = Vec::new();
    if let Some(f) = e.flip {
        opts.push(format!("flip: {f}"));
    }
    if let Some(s) = e.scalar {
        opts.push(format!("scalar: {s}"));
    }
    let opts = if opts.is_empty() {
        String::new()
    } else {
        format!(", {{{}}}", opts.join(", "))
    };
    let body = if has_body(sub) {
        format!(", q => q{}", chain(sub))
    } else {
        String::new()
    };
    let call = format!("exists({}{body}{opts})", quote(&alias));
    match (e.op, top) {
        (ExistsOp::Exists, true) => format!(".whereExists({}{body}{opts})", quote(&alias)),
        (ExistsOp::Exists, false) => {
            helpers.insert("exists");
            call
        }
        (ExistsOp::NotExists, true) => format!(".where(({{exists, not}}) => not({call}))"),
        (ExistsOp::NotExists, false) => {
            helpers.insert("exists");
            helpers.insert("not");
            format!("not({call})")
        }
    }
}

/// The subquery an EXISTS is about: behind a junction, both hops carry the relationship's
/// alias and the first only leads to the second.
fn exists_subquery(r: &CorrelatedSubquery) -> &Ast {
    if let Some(Condition::CorrelatedSubquery(inner)) = &r.subquery.where_
        && inner
            .related
            .subquery
            .alias
            .as_deref()
            .is_some_and(|a| a.starts_with(&format!("{SUBQ_PREFIX}zhidden_")))
    {
        return exists_subquery(&inner.related);
    }
    &r.subquery
}

fn sub_alias(r: &CorrelatedSubquery) -> String {
    let alias = r.subquery.alias.as_deref().unwrap_or(&r.subquery.table);
    alias.strip_prefix(SUBQ_PREFIX).unwrap_or(alias).to_string()
}

fn position(v: &ValuePosition) -> String {
    match v {
        ValuePosition::Literal { value } => literal(value),
        ValuePosition::Column { name } => quote(name),
        ValuePosition::Static(p) => param(p),
    }
}

fn param(p: &Parameter) -> String {
    match &p.field {
        ParamField::Name(n) => format!("authParam({})", quote(n)),
        ParamField::Path(path) => {
            let parts: Vec<String> = path.iter().map(|f| quote(f)).collect();
            format!("authParam([{}])", parts.join(", "))
        }
    }
}

fn literal(v: &LiteralValue) -> String {
    match v {
        LiteralValue::Scalar(Value::String(s)) => quote(s),
        LiteralValue::Scalar(Value::Null) => "null".into(),
        LiteralValue::Scalar(other) => other.to_json().to_string(),
        LiteralValue::Array(items) => {
            serde_json::Value::Array(items.iter().map(Value::to_json).collect()).to_string()
        }
    }
}

/// A single-quoted JavaScript string.
fn quote(s: &str) -> String {
    format!("'{}'", s.replace('\\', "\\\\").replace('\'', "\\'"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::parse::parse_query;
    use crate::schema::tests::zbugs;

    fn round_trip(src: &str) -> String {
        let schema = zbugs();
        let ast = parse_query(src, &schema).unwrap_or_else(|e| panic!("{src}: {e}"));
        let text = to_zql(&ast);
        let again = parse_query(&text, &schema).unwrap_or_else(|e| panic!("{text}: {e}"));
        assert_eq!(again, ast, "{src} printed as {text}");
        text
    }

    #[test]
    fn printed_queries_parse_back_to_the_same_ast() {
        for src in [
            "issue",
            "issue.where('open', true).where('title', 'LIKE', '%it\\'s%').limit(10)",
            "issue.where(({cmp, or}) => or(cmp('open', true), cmp('modified', '>', 5)))",
            "issue.where(({cmp, or, and}) => or(and(cmp('open', true), cmp('id', 'a')), cmp('modified', '<=', 3)))",
            "issue.whereExists('comments', c => c.where('body', 'LIKE', '%x%'))",
            "issue.whereExists('comments', c => c.where('body', 'bug'), {flip: true, scalar: false})",
            "issue.where(({exists, not}) => not(exists('comments')))",
            "issue.where(({cmp, exists, or}) => or(exists('comments'), cmp('open', false)))",
            "issue.where(({cmp, exists, not, or}) => or(not(exists('creator')), cmp('open', false)))",
            "issue.related('creator').related('comments', c => c.orderBy('created', 'desc').limit(3)).orderBy('modified', 'desc')",
            "issue.related('creator').where('id', 'IN', ['a', 'b'])",
            "issue.orderBy('id', 'asc').start({id: 'x'}, {inclusive: true}).limit(5)",
            "issue.orderBy('id', 'asc').start({id: 'x'})",
        ] {
            round_trip(src);
        }
    }

    #[test]
    fn text_reads_like_zero_writes_it() {
        assert_eq!(
            round_trip("issue.where('open', true).where('modified', '>', 5).limit(10)"),
            "issue.where('open', true).where('modified', '>', 5).orderBy('id', 'asc').limit(10)"
        );
        assert_eq!(
            round_trip("issue.whereExists('comments', c => c.where('body', 'bug'))"),
            "issue.whereExists('comments', q => q.where('body', 'bug').orderBy('id', 'asc')).orderBy('id', 'asc')"
        );
        // Behind a junction, the relationship prints once (parsing it back would reject the
        // junction's ordering, as Zero's client does).
        let ast = parse_query(
            "issue.whereExists('labels', l => l.where('name', 'bug'))",
            &zbugs(),
        )
        .expect("parse");
        assert_eq!(
            to_zql(&ast),
            "issue.whereExists('labels', q => q.where('name', 'bug').orderBy('id', 'asc')).orderBy('id', 'asc')"
        );
        let ast = parse_query("issue.related('labels')", &zbugs()).expect("parse");
        assert_eq!(
            to_zql(&ast),
            "issue.related('labels', q => q.orderBy('id', 'asc')).orderBy('id', 'asc')"
        );
    }

    #[test]
    fn parameters_print_as_auth_params() {
        let ast: Ast = serde_json::from_value(serde_json::json!({"table": "issue", "where": {
            "type": "or", "conditions": [
                {"type": "simple", "op": "=", "left": {"type": "column", "name": "creatorID"},
                 "right": {"type": "static", "anchor": "authData", "field": "sub"}},
                {"type": "simple", "op": "IS NOT", "left": {"type": "static", "anchor": "authData", "field": ["role", "name"]},
                 "right": {"type": "literal", "value": null}}]}}))
        .expect("ast");
        assert_eq!(
            to_zql(&ast),
            "issue.where(({cmp, or}) => or(cmp('creatorID', authParam('sub')), cmp(authParam(['role', 'name']), 'IS NOT', null)))"
        );
    }
}
