//! Read permissions for legacy AST queries (protocol §15, zero-cache `read-authorizer.ts`).
//!
//! The rules come from `{appID}.permissions.permissions`:
//! `{tables: {<table>: {row: {select: [["allow", Condition], ...]}}}}`. For the root query,
//! every `related` subquery and every EXISTS subquery, the transform sets
//! `where := simplify(AND(original where, OR(select rules)))`; a table without select rules gets
//! `OR()` (false), so it returns no rows. Static parameters (`authData.*`) are then bound.
//! Internal queries skip permissions entirely; that decision belongs to the caller.

use std::collections::BTreeMap;

use serde::Deserialize;

use crate::ast::{Ast, Condition, CorrelatedSubquery};
use crate::validate::{StaticParams, bind_static, simplify_condition};

/// The deployed permission rules (only the parts that affect reads are kept).
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct Permissions {
    /// Rules per table.
    #[serde(default)]
    pub tables: BTreeMap<String, TablePermissions>,
}

/// Rules of one table.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct TablePermissions {
    /// Row-level rules.
    #[serde(default)]
    pub row: Option<RowPermissions>,
}

/// Row-level rules of one table.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct RowPermissions {
    /// `select` rules: a row is readable when any rule's condition holds.
    #[serde(default)]
    pub select: Option<Vec<Rule>>,
}

/// `["allow", condition]`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Rule(pub String, pub Condition);

impl Permissions {
    /// Parses the JSON stored in the permissions table.
    pub fn from_json_str(text: &str) -> Result<Permissions, serde_json::Error> {
        serde_json::from_str(text)
    }

    /// The select rule conditions of `table`; `None` when there are none (no rows readable).
    fn select_rules(&self, table: &str) -> Option<Vec<Condition>> {
        let rules = self.tables.get(table)?.row.as_ref()?.select.as_ref()?;
        if rules.is_empty() {
            return None;
        }
        Some(rules.iter().map(|r| r.1.clone()).collect())
    }

    /// Tables queried by `ast` (at any depth) that have no select rules, for the warning Zero
    /// logs ("no rows will be returned").
    pub fn unreadable_tables(&self, ast: &Ast) -> Vec<String> {
        let mut out = Vec::new();
        ast.walk(&mut |a| {
            if self.select_rules(&a.table).is_none() && !out.contains(&a.table) {
                out.push(a.table.clone());
            }
        });
        out
    }
}

/// Adds the read rules to `ast` and binds `authData` (Zero's `transformQuery`).
pub fn transform_query(
    ast: &Ast,
    permissions: &Permissions,
    auth_data: Option<&serde_json::Value>,
) -> Ast {
    bind_static(
        &add_read_rules(ast, permissions),
        StaticParams {
            auth_data,
            pre_mutation_row: None,
        },
    )
}

/// Adds the read rules without binding (Zero's `transformQueryInternal`).
pub fn add_read_rules(ast: &Ast, permissions: &Permissions) -> Ast {
    let rules = permissions
        .select_rules(&ast.table)
        .unwrap_or_else(|| vec![Condition::false_()]);
    let mut conditions = Vec::new();
    if let Some(w) = &ast.where_ {
        conditions.push(transform_condition(w, permissions));
    }
    conditions.push(Condition::Or { conditions: rules });
    let mut out = ast.clone();
    out.where_ = Some(simplify_condition(&Condition::And { conditions }));
    out.related = ast.related.as_ref().map(|rel| {
        rel.iter()
            .map(|r| CorrelatedSubquery {
                subquery: Box::new(add_read_rules(&r.subquery, permissions)),
                ..r.clone()
            })
            .collect()
    });
    out
}

fn transform_condition(cond: &Condition, permissions: &Permissions) -> Condition {
    match cond {
        Condition::Simple(_) => cond.clone(),
        Condition::And { conditions } => Condition::And {
            conditions: conditions
                .iter()
                .map(|c| transform_condition(c, permissions))
                .collect(),
        },
        Condition::Or { conditions } => Condition::Or {
            conditions: conditions
                .iter()
                .map(|c| transform_condition(c, permissions))
                .collect(),
        },
        Condition::CorrelatedSubquery(c) => {
            // Rules apply inside EXISTS too, or EXISTS would reveal unreadable rows.
            let mut c = c.clone();
            c.related.subquery = Box::new(add_read_rules(&c.related.subquery, permissions));
            Condition::CorrelatedSubquery(c)
        }
    }
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn simple(col: &str, op: &str, right: serde_json::Value) -> serde_json::Value {
        json!({"type":"simple","left":{"type":"column","name":col},"right":right,"op":op})
    }

    fn perms() -> Permissions {
        let v = json!({"tables": {
            "issue": {"row": {"select": [
                ["allow", simple("creatorID", "=", json!({"type":"static","anchor":"authData","field":"sub"}))],
                ["allow", simple("open", "=", json!({"type":"literal","value":true}))]
            ]}},
            "comment": {"row": {"select": [["allow", {"type":"and","conditions":[]}]]}},
            "user": {"row": {}}
        }});
        Permissions::from_json_str(&v.to_string()).expect("permissions")
    }

    #[test]
    fn rules_are_anded_into_every_level_and_auth_is_bound() {
        let ast: Ast = serde_json::from_value(json!({"table":"issue",
            "where":{"type":"correlatedSubquery","op":"EXISTS","related":{"correlation":{"parentField":["id"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"zsubq_comments"}}},
            "related":[{"correlation":{"parentField":["creatorID"],"childField":["id"]},"subquery":{"table":"user","alias":"creator"}}]}))
        .expect("ast");
        let auth = json!({"sub": "u1"});
        let out = transform_query(&ast, &perms(), Some(&auth));
        let j = serde_json::to_value(&out).expect("json");
        // Root: and(exists(comment with `true` rule), or(creatorID = 'u1', open = true)).
        assert_eq!(j["where"]["type"], "and");
        let exists = &j["where"]["conditions"][0];
        assert_eq!(exists["type"], "correlatedSubquery");
        assert_eq!(
            exists["related"]["subquery"]["where"],
            json!({"type":"and","conditions":[]}),
            "an always-true rule stays true"
        );
        assert_eq!(
            j["where"]["conditions"][1],
            json!({"type":"or","conditions":[
                simple("creatorID","=",json!({"type":"literal","value":"u1"})),
                simple("open","=",json!({"type":"literal","value":true}))]})
        );
        // A table without select rules reads nothing.
        assert_eq!(
            j["related"][0]["subquery"]["where"],
            json!({"type":"or","conditions":[]})
        );
        assert_eq!(perms().unreadable_tables(&ast), vec!["user".to_owned()]);
    }

    #[test]
    fn missing_auth_binds_null() {
        let ast = Ast::new("issue");
        let out = transform_query(&ast, &perms(), None);
        let j = serde_json::to_value(&out).expect("json");
        assert_eq!(
            j["where"]["conditions"][0]["right"],
            json!({"type":"literal","value":null})
        );
    }
}
