//! ZQL, the query language of Zero: the AST as Zero's JSON, normalization, hashing, parsing and
//! validation. This crate does no I/O so that every piece can be tested with plain `#[test]`s.
//!
//! # Layout
//!
//! * [`value`]: [`Value`] and [`Row`], with Zero's total comparator (keys for dataflow).
//! * [`ast`]: Zero's AST (protocol §6), reading and writing Zero's JSON.
//! * [`normalize`] and [`hash`]: Zero's `normalizeAST` and query ids (protocol §5).
//! * [`schema`]: tables, typed columns, primary keys and relationships, loaded from JSON.
//! * [`validate`]: checks an AST against a schema; binds static parameters; completes orderings.
//! * [`parse`]: ZQL as written in TypeScript (`issue.where('open', true)...`) into an AST.
//! * [`eval`]: row predicates with Zero's filter semantics (null rules, LIKE with escapes).
//! * [`sql`]: AST → SQLite SQL over the replica, and a tree evaluator over a caller's executor.
//! * [`memory`]: a naive whole-AST evaluator over in-memory rows (oracle for incremental views).
//! * [`plan`]: the plan IR for the dataflow engine, split into a template (shape) and params.
//! * [`permissions`]: read permission rules for legacy queries (protocol §15).

//!
//! # Example
//!
//! ```
//! use zero_queries::{hash, parse, plan, schema::Schema, sql, validate};
//!
//! let schema = Schema::from_json_str(r#"{
//!   "tables": {
//!     "issue": {"columns": {"id": {"type": "string"}, "open": {"type": "boolean"},
//!                           "modified": {"type": "number"}}, "primaryKey": ["id"]},
//!     "comment": {"columns": {"id": {"type": "string"}, "issueID": {"type": "string"}},
//!                 "primaryKey": ["id"]}},
//!   "relationships": {"issue": {"comments": [
//!     {"sourceField": ["id"], "destField": ["issueID"], "destSchema": "comment"}]}}
//! }"#)?;
//! let ast = parse::parse_query(
//!     "issue.where('open', true).related('comments').orderBy('modified', 'desc').limit(10)",
//!     &schema,
//! )?;
//! validate::validate(&ast, &schema)?;
//! let id = hash::hash_of_ast(&ast)?;            // what the client would use as the query id
//! let (template, params) = plan::plan_query(&ast, &schema)?;
//! assert_eq!(params.len(), template.param_count);
//! let stmt = sql::select_statement(&ast, &schema, None)?;
//! assert!(stmt.sql.starts_with("SELECT"));
//! # let _ = id;
//! # Ok::<(), Box<dyn std::error::Error>>(())
//! ```

#![warn(missing_docs)]

pub mod ast;
pub mod eval;
pub mod hash;
pub mod memory;
pub mod normalize;
pub mod parse;
pub mod permissions;
pub mod plan;
pub mod print;
pub mod row;
pub mod schema;
pub mod sql;
pub mod validate;
pub mod value;

pub use row::{Cols, Row, RowKey, RowKeyRef};
pub use value::Value;
