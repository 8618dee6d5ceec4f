//! Zero's query AST (`zero-protocol/src/ast.ts`, protocol §6), read from and written to Zero's
//! JSON.
//!
//! The types mirror the wire shape one to one so that an AST received from a client or an API
//! server can be stored, hashed and sent on without loss. Optional fields stay `Option`s rather
//! than defaulting, because `"related": []` and an absent `related` are different JSON and hash
//! differently.
//!
//! Serialization writes keys in the order Zero's own `transformAST` / `cmp` produce them:
//! `schema, table, alias, where, related, start, limit, orderBy` for an AST;
//! `correlation, hidden, subquery, system` for a related entry; `type, left, right, op` for a
//! simple condition; `type, related{system, correlation, subquery}, op, flip, scalar` for an
//! EXISTS condition. ASTs that come
//! from Zero's server-side mapping (for example custom-query ASTs) therefore round-trip byte for
//! byte. Key order of arbitrary client input is not kept by these types; use
//! [`crate::normalize::normalize_json`] when the exact client key order matters.

use std::fmt;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::value::Value;

/// Prefix of the aliases the client gives EXISTS subqueries (`zsubq_<relationship>`).
pub const SUBQ_PREFIX: &str = "zsubq_";

/// A ZQL query: one table, optionally filtered, ordered, limited and with related subqueries.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Ast {
    /// Unused by clients; internal queries set `""`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub schema: Option<String>,
    /// Server table name: `t` for the public schema, `s.t` otherwise.
    pub table: String,
    /// Required for subqueries: names the relationship in the result tree.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub alias: Option<String>,
    /// Row filter, possibly with EXISTS subqueries.
    #[serde(rename = "where", default, skip_serializing_if = "Option::is_none")]
    pub where_: Option<Condition>,
    /// Child queries whose rows hang off each result row.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub related: Option<Vec<CorrelatedSubquery>>,
    /// Cursor: output starts at (or after) this row in the completed ordering.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start: Option<Bound>,
    /// Maximum number of rows (per parent in a subquery).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub limit: Option<u64>,
    /// Sort order; the primary key is appended when the query is completed.
    #[serde(rename = "orderBy", default, skip_serializing_if = "Option::is_none")]
    pub order_by: Option<Vec<OrderPart>>,
}

/// One `[column, direction]` pair of an `orderBy`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct OrderPart(pub String, pub Direction);

impl OrderPart {
    /// Builds an order part.
    pub fn new(column: impl Into<String>, direction: Direction) -> OrderPart {
        OrderPart(column.into(), direction)
    }

    /// The column being sorted on.
    pub fn column(&self) -> &str {
        &self.0
    }

    /// The sort direction.
    pub fn direction(&self) -> Direction {
        self.1
    }
}

/// Sort direction of one `orderBy` column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Direction {
    /// Ascending (nulls first).
    Asc,
    /// Descending (nulls last).
    Desc,
}

impl Direction {
    /// The JSON spelling (`"asc"` / `"desc"`).
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::Asc => "asc",
            Direction::Desc => "desc",
        }
    }
}

/// The `start` cursor of a query.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Bound {
    /// Column values of the cursor row, in the order they arrived (the hash depends on it).
    pub row: RowObject,
    /// `true`: rows strictly after the cursor; `false`: the cursor row onwards.
    pub exclusive: bool,
}

/// A JSON object of column → value that keeps its key order.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Default)]
pub struct RowObject(pub Vec<(String, Value)>);

impl RowObject {
    /// The value of `column`, if present.
    pub fn get(&self, column: &str) -> Option<&Value> {
        self.0.iter().find(|(c, _)| c == column).map(|(_, v)| v)
    }
}

impl Serialize for RowObject {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeMap;
        let mut map = serializer.serialize_map(Some(self.0.len()))?;
        for (k, v) in &self.0 {
            map.serialize_entry(k, v)?;
        }
        map.end()
    }
}

impl<'de> Deserialize<'de> for RowObject {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        // serde_json's map keeps insertion order (the `preserve_order` feature is on).
        let map = serde_json::Map::<String, serde_json::Value>::deserialize(deserializer)?;
        Ok(RowObject(
            map.into_iter()
                .map(|(k, v)| (k, Value::from_json(v)))
                .collect(),
        ))
    }
}

/// A `related` entry (or the subquery of an EXISTS): a child query joined on equal keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct CorrelatedSubquery {
    /// Parent and child key columns; equality only.
    pub correlation: Correlation,
    /// A junction hop that the client hides from its view (its rows are still synced).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hidden: Option<bool>,
    /// The child query; its `alias` names the relationship.
    pub subquery: Box<Ast>,
    /// Who added the subquery; rows reached through `permissions` are never synced.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub system: Option<System>,
}

/// Compound join key: `parent[parentField[i]] == child[childField[i]]` for every i.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Correlation {
    /// Columns of the parent table.
    #[serde(rename = "parentField")]
    pub parent_field: Vec<String>,
    /// Columns of the child table, same length as `parent_field`.
    #[serde(rename = "childField")]
    pub child_field: Vec<String>,
}

/// Origin of a subquery.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum System {
    /// Added by a permission rule: evaluated but never synced.
    Permissions,
    /// Written by the application (the default).
    Client,
    /// Used by Zero's tests.
    Test,
}

/// A filter condition (`where`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Condition {
    /// `left op right`.
    #[serde(rename = "simple")]
    Simple(SimpleCondition),
    /// All of the conditions; an empty `and` is true.
    #[serde(rename = "and")]
    And {
        /// The conjuncts.
        conditions: Vec<Condition>,
    },
    /// Any of the conditions; an empty `or` is false.
    #[serde(rename = "or")]
    Or {
        /// The disjuncts.
        conditions: Vec<Condition>,
    },
    /// `EXISTS` / `NOT EXISTS` over a correlated child query.
    #[serde(rename = "correlatedSubquery")]
    CorrelatedSubquery(CorrelatedSubqueryCondition),
}

/// A comparison between a value position and a literal or static parameter.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct SimpleCondition {
    /// Usually a column; literals and static parameters are allowed too.
    pub left: ValuePosition,
    /// A literal or a static parameter, never a column.
    pub right: Operand,
    /// The operator.
    pub op: SimpleOp,
}

/// `EXISTS`-style condition.
///
/// Serialized as `type, related, op, flip, scalar`, with `related` written
/// `system, correlation, hidden, subquery`: the order the client's `exists()` builds and that
/// Zero's normalization and name mapping keep (they spread the object), unlike `related`
/// entries of an AST, which normalization rebuilds as `correlation, hidden, subquery, system`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Deserialize)]
pub struct CorrelatedSubqueryCondition {
    /// The child query and how it correlates with the row being filtered.
    pub related: CorrelatedSubquery,
    /// `EXISTS` or `NOT EXISTS`.
    pub op: ExistsOp,
    /// Evaluate child-first (`FlippedJoin`); set by the client or the planner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub flip: Option<bool>,
    /// Marks a one-row lookup the server may resolve to a constant.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scalar: Option<bool>,
}

impl Serialize for CorrelatedSubqueryCondition {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let n = 2 + usize::from(self.flip.is_some()) + usize::from(self.scalar.is_some());
        let mut st = serializer.serialize_struct("CorrelatedSubqueryCondition", n)?;
        st.serialize_field("related", &ExistsRelated(&self.related))?;
        st.serialize_field("op", &self.op)?;
        if let Some(flip) = self.flip {
            st.serialize_field("flip", &flip)?;
        }
        if let Some(scalar) = self.scalar {
            st.serialize_field("scalar", &scalar)?;
        }
        st.end()
    }
}

/// The `related` of an EXISTS condition, in the client builder's key order.
struct ExistsRelated<'a>(&'a CorrelatedSubquery);

impl Serialize for ExistsRelated<'_> {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        use serde::ser::SerializeStruct;
        let r = self.0;
        let n = 2 + usize::from(r.system.is_some()) + usize::from(r.hidden.is_some());
        let mut st = serializer.serialize_struct("CorrelatedSubquery", n)?;
        if let Some(system) = r.system {
            st.serialize_field("system", &system)?;
        }
        st.serialize_field("correlation", &r.correlation)?;
        if let Some(hidden) = r.hidden {
            st.serialize_field("hidden", &hidden)?;
        }
        st.serialize_field("subquery", &r.subquery)?;
        st.end()
    }
}

/// Operator of an EXISTS condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum ExistsOp {
    /// At least one related child row.
    #[serde(rename = "EXISTS")]
    Exists,
    /// No related child row.
    #[serde(rename = "NOT EXISTS")]
    NotExists,
}

impl ExistsOp {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            ExistsOp::Exists => "EXISTS",
            ExistsOp::NotExists => "NOT EXISTS",
        }
    }

    /// The opposite operator (what `not(exists(..))` produces).
    pub fn negate(self) -> ExistsOp {
        match self {
            ExistsOp::Exists => ExistsOp::NotExists,
            ExistsOp::NotExists => ExistsOp::Exists,
        }
    }
}

/// Operator of a simple condition.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub enum SimpleOp {
    /// `=`; false when either side is null.
    #[serde(rename = "=")]
    Eq,
    /// `!=`; false when either side is null.
    #[serde(rename = "!=")]
    Ne,
    /// Null-safe equality.
    #[serde(rename = "IS")]
    Is,
    /// Null-safe inequality.
    #[serde(rename = "IS NOT")]
    IsNot,
    /// `<`.
    #[serde(rename = "<")]
    Lt,
    /// `>`.
    #[serde(rename = ">")]
    Gt,
    /// `<=`.
    #[serde(rename = "<=")]
    Le,
    /// `>=`.
    #[serde(rename = ">=")]
    Ge,
    /// Case-sensitive pattern match (`%`, `_`, `\` escapes).
    #[serde(rename = "LIKE")]
    Like,
    /// Negated `LIKE`.
    #[serde(rename = "NOT LIKE")]
    NotLike,
    /// Case-insensitive pattern match.
    #[serde(rename = "ILIKE")]
    ILike,
    /// Negated `ILIKE`.
    #[serde(rename = "NOT ILIKE")]
    NotILike,
    /// Membership in an array literal.
    #[serde(rename = "IN")]
    In,
    /// Non-membership in an array literal.
    #[serde(rename = "NOT IN")]
    NotIn,
}

impl SimpleOp {
    /// Every operator, in declaration order.
    pub const ALL: [SimpleOp; 14] = [
        SimpleOp::Eq,
        SimpleOp::Ne,
        SimpleOp::Is,
        SimpleOp::IsNot,
        SimpleOp::Lt,
        SimpleOp::Gt,
        SimpleOp::Le,
        SimpleOp::Ge,
        SimpleOp::Like,
        SimpleOp::NotLike,
        SimpleOp::ILike,
        SimpleOp::NotILike,
        SimpleOp::In,
        SimpleOp::NotIn,
    ];

    /// The JSON (and ZQL) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            SimpleOp::Eq => "=",
            SimpleOp::Ne => "!=",
            SimpleOp::Is => "IS",
            SimpleOp::IsNot => "IS NOT",
            SimpleOp::Lt => "<",
            SimpleOp::Gt => ">",
            SimpleOp::Le => "<=",
            SimpleOp::Ge => ">=",
            SimpleOp::Like => "LIKE",
            SimpleOp::NotLike => "NOT LIKE",
            SimpleOp::ILike => "ILIKE",
            SimpleOp::NotILike => "NOT ILIKE",
            SimpleOp::In => "IN",
            SimpleOp::NotIn => "NOT IN",
        }
    }

    /// Parses the JSON spelling.
    pub fn parse(s: &str) -> Option<SimpleOp> {
        SimpleOp::ALL.into_iter().find(|op| op.as_str() == s)
    }

    /// The operator Zero's `not()` produces (`<` becomes `>=`, and so on).
    pub fn negate(self) -> SimpleOp {
        match self {
            SimpleOp::Eq => SimpleOp::Ne,
            SimpleOp::Ne => SimpleOp::Eq,
            SimpleOp::Is => SimpleOp::IsNot,
            SimpleOp::IsNot => SimpleOp::Is,
            SimpleOp::Lt => SimpleOp::Ge,
            SimpleOp::Gt => SimpleOp::Le,
            SimpleOp::Le => SimpleOp::Gt,
            SimpleOp::Ge => SimpleOp::Lt,
            SimpleOp::Like => SimpleOp::NotLike,
            SimpleOp::NotLike => SimpleOp::Like,
            SimpleOp::ILike => SimpleOp::NotILike,
            SimpleOp::NotILike => SimpleOp::ILike,
            SimpleOp::In => SimpleOp::NotIn,
            SimpleOp::NotIn => SimpleOp::In,
        }
    }

    /// `<`, `>`, `<=`, `>=`.
    pub fn is_ordering(self) -> bool {
        matches!(
            self,
            SimpleOp::Lt | SimpleOp::Gt | SimpleOp::Le | SimpleOp::Ge
        )
    }

    /// The four LIKE variants.
    pub fn is_like(self) -> bool {
        matches!(
            self,
            SimpleOp::Like | SimpleOp::NotLike | SimpleOp::ILike | SimpleOp::NotILike
        )
    }

    /// `IN` / `NOT IN` (the right side must be an array).
    pub fn is_in(self) -> bool {
        matches!(self, SimpleOp::In | SimpleOp::NotIn)
    }
}

impl fmt::Display for SimpleOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The left side of a simple condition.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum ValuePosition {
    /// A constant.
    #[serde(rename = "literal")]
    Literal {
        /// The constant.
        value: LiteralValue,
    },
    /// A column of the current table.
    #[serde(rename = "column")]
    Column {
        /// Column name.
        name: String,
    },
    /// A value bound when the pipeline is built (auth data, pre-mutation row).
    #[serde(rename = "static")]
    Static(Parameter),
}

/// The right side of a simple condition: never a column.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "type")]
pub enum Operand {
    /// A constant.
    #[serde(rename = "literal")]
    Literal {
        /// The constant.
        value: LiteralValue,
    },
    /// A value bound when the pipeline is built.
    #[serde(rename = "static")]
    Static(Parameter),
}

impl Operand {
    /// A literal operand.
    pub fn literal(value: impl Into<LiteralValue>) -> Operand {
        Operand::Literal {
            value: value.into(),
        }
    }
}

impl ValuePosition {
    /// A column reference.
    pub fn column(name: impl Into<String>) -> ValuePosition {
        ValuePosition::Column { name: name.into() }
    }
}

/// A static parameter: `{type:"static", anchor, field}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Parameter {
    /// Where the value comes from.
    pub anchor: Anchor,
    /// Field name, or a path into nested auth data.
    pub field: ParamField,
}

/// Namespace of a static parameter.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Anchor {
    /// The decoded JWT payload of the connection.
    #[serde(rename = "authData")]
    AuthData,
    /// The row before a CRUD mutation (write permissions only).
    #[serde(rename = "preMutationRow")]
    PreMutationRow,
}

impl Anchor {
    /// The JSON spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Anchor::AuthData => "authData",
            Anchor::PreMutationRow => "preMutationRow",
        }
    }
}

/// `field` of a static parameter: a name or a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ParamField {
    /// A single field name.
    Name(String),
    /// A path into nested data.
    Path(Vec<String>),
}

impl ParamField {
    /// The path components (one for a plain name).
    pub fn path(&self) -> Vec<&str> {
        match self {
            ParamField::Name(n) => vec![n.as_str()],
            ParamField::Path(p) => p.iter().map(String::as_str).collect(),
        }
    }
}

/// A literal: a scalar, or an array of scalars (the right side of `IN`).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum LiteralValue {
    /// `string | number | boolean | null`.
    Scalar(Value),
    /// `(string | number | boolean)[]`.
    Array(Vec<Value>),
}

impl LiteralValue {
    /// The scalar, if this is not an array.
    pub fn as_scalar(&self) -> Option<&Value> {
        match self {
            LiteralValue::Scalar(v) => Some(v),
            LiteralValue::Array(_) => None,
        }
    }

    /// The value as Zero's IVM sees it (an array becomes a JSON array value).
    pub fn to_value(&self) -> Value {
        match self {
            LiteralValue::Scalar(v) => v.clone(),
            LiteralValue::Array(items) => Value::Json(std::sync::Arc::new(
                serde_json::Value::Array(items.iter().map(Value::to_json).collect()),
            )),
        }
    }
}

impl<T: Into<Value>> From<T> for LiteralValue {
    fn from(v: T) -> Self {
        LiteralValue::Scalar(v.into())
    }
}

impl Serialize for LiteralValue {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        match self {
            LiteralValue::Scalar(v) => v.serialize(serializer),
            LiteralValue::Array(items) => items.serialize(serializer),
        }
    }
}

impl<'de> Deserialize<'de> for LiteralValue {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        match serde_json::Value::deserialize(deserializer)? {
            serde_json::Value::Array(items) => items
                .into_iter()
                .map(|item| match item {
                    serde_json::Value::Array(_)
                    | serde_json::Value::Object(_)
                    | serde_json::Value::Null => Err(D::Error::custom(
                        "array literals may hold only strings, numbers and booleans",
                    )),
                    scalar => Ok(Value::from_json(scalar)),
                })
                .collect::<Result<Vec<_>, _>>()
                .map(LiteralValue::Array),
            serde_json::Value::Object(_) => Err(D::Error::custom("a literal cannot be an object")),
            scalar => Ok(LiteralValue::Scalar(Value::from_json(scalar))),
        }
    }
}

impl Ast {
    /// A query over `table` with nothing else set.
    pub fn new(table: impl Into<String>) -> Ast {
        Ast {
            schema: None,
            table: table.into(),
            alias: None,
            where_: None,
            related: None,
            start: None,
            limit: None,
            order_by: None,
        }
    }

    /// Parses Zero's AST JSON.
    pub fn from_json_str(s: &str) -> Result<Ast, serde_json::Error> {
        serde_json::from_str(s)
    }

    /// Serializes to Zero's AST JSON (compact, Zero's key order).
    pub fn to_json_string(&self) -> String {
        // Serializing these types cannot fail: every map key is a string.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// The `related` entries (empty when absent).
    pub fn related(&self) -> &[CorrelatedSubquery] {
        self.related.as_deref().unwrap_or(&[])
    }

    /// The `orderBy` entries (empty when absent).
    pub fn order_by(&self) -> &[OrderPart] {
        self.order_by.as_deref().unwrap_or(&[])
    }

    /// Calls `f` on this AST and every nested AST (related and EXISTS subqueries), depth first.
    pub fn walk<'a>(&'a self, f: &mut dyn FnMut(&'a Ast)) {
        f(self);
        if let Some(w) = &self.where_ {
            w.walk_subqueries(f);
        }
        for r in self.related() {
            r.subquery.walk(f);
        }
    }
}

impl Condition {
    /// `left op right` with a column on the left and a literal on the right.
    pub fn cmp(
        column: impl Into<String>,
        op: SimpleOp,
        value: impl Into<LiteralValue>,
    ) -> Condition {
        Condition::Simple(SimpleCondition {
            left: ValuePosition::column(column),
            right: Operand::literal(value),
            op,
        })
    }

    /// The always-true condition (`and` of nothing).
    pub fn true_() -> Condition {
        Condition::And { conditions: vec![] }
    }

    /// The always-false condition (`or` of nothing).
    pub fn false_() -> Condition {
        Condition::Or { conditions: vec![] }
    }

    /// The JSON `type` tag.
    pub fn type_name(&self) -> &'static str {
        match self {
            Condition::Simple(_) => "simple",
            Condition::And { .. } => "and",
            Condition::Or { .. } => "or",
            Condition::CorrelatedSubquery(_) => "correlatedSubquery",
        }
    }

    /// True if the condition (recursively) contains an EXISTS.
    pub fn has_subquery(&self) -> bool {
        match self {
            Condition::Simple(_) => false,
            Condition::CorrelatedSubquery(_) => true,
            Condition::And { conditions } | Condition::Or { conditions } => {
                conditions.iter().any(Condition::has_subquery)
            }
        }
    }

    /// Calls `f` on the subquery AST of every EXISTS (and, recursively, their nested ASTs).
    pub fn walk_subqueries<'a>(&'a self, f: &mut dyn FnMut(&'a Ast)) {
        match self {
            Condition::Simple(_) => {}
            Condition::CorrelatedSubquery(c) => c.related.subquery.walk(f),
            Condition::And { conditions } | Condition::Or { conditions } => {
                for c in conditions {
                    c.walk_subqueries(f);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Re-serializes through `serde_json::Value` (which keeps key order) to get canonical text.
    fn compact(json: &str) -> String {
        let v: serde_json::Value = serde_json::from_str(json).expect("valid json");
        serde_json::to_string(&v).expect("serialize")
    }

    fn round_trip(json: &str) {
        let ast = Ast::from_json_str(json).expect("parse ast");
        assert_eq!(ast.to_json_string(), compact(json));
        let again = Ast::from_json_str(&ast.to_json_string()).expect("reparse");
        assert_eq!(again, ast);
    }

    const OPEN_ISSUES: &str = r#"{"table":"issue","where":{"type":"simple","left":{"type":"column","name":"open"},"right":{"type":"literal","value":true},"op":"="},"related":[{"correlation":{"parentField":["creatorID"],"childField":["id"]},"subquery":{"table":"user","alias":"creator"},"system":"client"},{"correlation":{"parentField":["id"],"childField":["issueID"]},"hidden":true,"subquery":{"table":"issueLabel","alias":"labels","related":[{"correlation":{"parentField":["labelID"],"childField":["id"]},"subquery":{"table":"label","alias":"labels"},"system":"client"}]},"system":"client"}],"limit":10,"orderBy":[["modified","desc"],["id","desc"]]}"#;

    const ISSUE_DETAIL: &str = r#"{"table":"issue","where":{"type":"simple","left":{"type":"column","name":"id"},"right":{"type":"literal","value":"zddfabskzg"},"op":"="},"related":[{"correlation":{"parentField":["id"],"childField":["issueID"]},"subquery":{"table":"comment","alias":"comments","related":[{"correlation":{"parentField":["creatorID"],"childField":["id"]},"subquery":{"table":"user","alias":"creator"},"system":"client"}],"limit":100,"orderBy":[["created","desc"],["id","desc"]]},"system":"client"}],"limit":1}"#;

    #[test]
    fn api_trace_asts_round_trip_exactly() {
        round_trip(OPEN_ISSUES);
        round_trip(ISSUE_DETAIL);
        let ast = Ast::from_json_str(OPEN_ISSUES).expect("parse");
        assert_eq!(ast.limit, Some(10));
        assert_eq!(ast.related().len(), 2);
        assert_eq!(ast.related()[1].hidden, Some(true));
        assert_eq!(
            ast.order_by()[0],
            OrderPart::new("modified", Direction::Desc)
        );
    }

    #[test]
    fn fixture_file_asts_round_trip() {
        // Every AST in the recorded API-server trace must survive a round trip byte for byte.
        let text = include_str!("../../../shared/fixtures/zero-1.9/api-trace.jsonl");
        let mut seen = 0;
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let v: serde_json::Value = serde_json::from_str(line).expect("jsonl line");
            let Some(queries) = v.pointer("/response/queries").and_then(|q| q.as_array()) else {
                continue;
            };
            for q in queries {
                if let Some(ast) = q.get("ast") {
                    round_trip(&serde_json::to_string(ast).expect("ser"));
                    seen += 1;
                }
            }
        }
        assert!(seen >= 2, "expected ASTs in the fixture, saw {seen}");
    }

    #[test]
    fn every_condition_kind_round_trips() {
        let json = r#"{"schema":"","table":"issue","alias":"x","where":{"type":"or","conditions":[
            {"type":"simple","left":{"type":"column","name":"a"},"right":{"type":"literal","value":null},"op":"IS"},
            {"type":"simple","left":{"type":"column","name":"a"},"right":{"type":"literal","value":[1,"b",true]},"op":"NOT IN"},
            {"type":"simple","left":{"type":"literal","value":1.5},"right":{"type":"static","anchor":"authData","field":"sub"},"op":"<="},
            {"type":"simple","left":{"type":"static","anchor":"preMutationRow","field":["a","b"]},"right":{"type":"literal","value":"x%"},"op":"NOT ILIKE"},
            {"type":"and","conditions":[]},
            {"type":"correlatedSubquery","related":{"system":"permissions","correlation":{"parentField":["id","p"],"childField":["issueID","q"]},"subquery":{"table":"comment","alias":"zsubq_comments","orderBy":[["id","asc"]]}},"op":"NOT EXISTS","flip":true,"scalar":false}
        ]},"start":{"row":{"modified":5,"id":"a"},"exclusive":false},"limit":0,"orderBy":[["modified","desc"],["id","asc"]]}"#;
        round_trip(json);
        let ast = Ast::from_json_str(json).expect("parse");
        let Some(Condition::Or { conditions }) = &ast.where_ else {
            panic!("expected or");
        };
        assert_eq!(conditions.len(), 6);
        let Condition::Simple(s) = &conditions[1] else {
            panic!("expected simple");
        };
        assert_eq!(s.op, SimpleOp::NotIn);
        assert_eq!(
            s.right,
            Operand::Literal {
                value: LiteralValue::Array(vec![
                    Value::from(1),
                    Value::from("b"),
                    Value::Bool(true)
                ])
            }
        );
        let start = ast.start.as_ref().expect("start");
        assert_eq!(start.row.0[0].0, "modified", "start row keeps key order");
        assert!(!start.exclusive);
    }

    #[test]
    fn all_operators_round_trip() {
        for op in SimpleOp::ALL {
            let json = serde_json::to_string(&op).expect("ser");
            assert_eq!(json, format!("\"{}\"", op.as_str()));
            let back: SimpleOp = serde_json::from_str(&json).expect("de");
            assert_eq!(back, op);
            assert_eq!(op.negate().negate(), op);
            assert_eq!(SimpleOp::parse(op.as_str()), Some(op));
        }
    }

    #[test]
    fn invalid_asts_are_rejected() {
        // A column on the right side is not allowed.
        assert!(Ast::from_json_str(
            r#"{"table":"t","where":{"type":"simple","left":{"type":"column","name":"a"},"right":{"type":"column","name":"b"},"op":"="}}"#
        )
        .is_err());
        assert!(Ast::from_json_str(
            r#"{"table":"t","where":{"type":"simple","left":{"type":"column","name":"a"},"right":{"type":"literal","value":{"x":1}},"op":"="}}"#
        )
        .is_err());
        assert!(Ast::from_json_str(
            r#"{"table":"t","where":{"type":"simple","left":{"type":"column","name":"a"},"right":{"type":"literal","value":1},"op":"=="}}"#
        )
        .is_err());
        assert!(Ast::from_json_str(r#"{"table":"t","limit":-1}"#).is_err());
        assert!(Ast::from_json_str(r#"{"table":"t","orderBy":[["a","up"]]}"#).is_err());
        assert!(Ast::from_json_str(r#"{"where":{"type":"and","conditions":[]}}"#).is_err());
    }

    #[test]
    fn walk_visits_nested_subqueries() {
        let ast = Ast::from_json_str(OPEN_ISSUES).expect("parse");
        let mut tables = vec![];
        ast.walk(&mut |a| tables.push(a.table.clone()));
        assert_eq!(tables, vec!["issue", "user", "issueLabel", "label"]);
    }
}
