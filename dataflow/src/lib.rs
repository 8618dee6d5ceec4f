//! The incremental view engine: ZQL queries maintained by differential dataflow over the
//! replica's committed change batches. This crate does no I/O, so it can be driven and tested
//! on its own.
//!
//! # Model
//!
//! * **Tables** are input collections of `(primary key, row)`, fed by committed change batches
//!   ([`Engine::apply`]) at strictly increasing `u64` versions. Each table is arranged once by
//!   primary key; the correlation indexes of the schema's relationships, and those a host
//!   prepares before the first version or shape, are arranged with the tables in one
//!   dataflow; other arrangements (equality seeks, whole-table scans, sorted indexes for
//!   top-k) are built when a shape first needs them. All are **shared** by every query. Each
//!   new version compacts their history up to it (physically, up to the version before), so
//!   memory stays bounded under a long update stream.
//! * **Queries are data.** [`Engine::add_query`] validates the AST, completes its orderings,
//!   and splits it into a *shape* (literals, limits and start cursors replaced by slots) and
//!   parameters ([`plan`]). One dataflow (a *template*) runs per distinct shape; each distinct
//!   `(shape, parameters)` is one parameter row in it (an *instance*); query ids with identical
//!   queries share the instance. Cost grows with shapes and changed rows, not with clients.
//! * **Results** are the rows Zero syncs: the view's rows at every level (hidden junction rows
//!   included), plus up to [`plan::EXISTS_LIMIT`] EXISTS witnesses per parent (all of them for
//!   `flip`, none for permission subqueries). [`Engine::step_until`] returns, per version and
//!   query, the row patches (put/del by table and primary key); a version's patches are
//!   complete and atomic ([`Engine::poll`] is the non-blocking form). [`Engine::view`]
//!   renders the current result as Zero's hierarchical view; [`Engine::rows`] lists it flat.
//! * **Threads.** With one worker ([`EngineConfig::workers`]) the caller's thread runs it:
//!   [`Engine::step_until`] steps it until the version is complete, so a version costs no
//!   thread hand-off, and the engine stays on the thread that created it (it is not `Send`).
//!   With more, timely workers run on their own threads; every command goes to every worker
//!   in the same order, and each worker reports its output and its frontiers on one channel,
//!   in one message per timely step (so the engine thread wakes once per step, not per
//!   template). Either way the API is synchronous and the caller bridges it to async code
//!   with channels or a thread of its own.
//!
//! ```no_run
//! # use zero_dataflow::{Engine, EngineConfig, TableChange, Op};
//! # fn demo(schema: &zero_queries::schema::Schema, ast: &zero_queries::ast::Ast,
//! #         row: zero_queries::Row) -> Result<(), zero_dataflow::EngineError> {
//! let mut engine = Engine::new(EngineConfig { workers: 1 }, schema)?;
//! engine.add_query("q1", ast)?;
//! engine.apply(1, vec![TableChange { table: "issue".into(), op: Op::Insert, row }])?;
//! for diff in engine.step_until(1)? {
//!     println!("{} at {}: {} patches", diff.query, diff.version, diff.patches.len());
//! }
//! let view = engine.view("q1");
//! # Ok(()) }
//! ```
//!
//! # Semantics (protocol §7)
//!
//! Orderings end with the primary key and use [`zero_queries::Value`]'s order (nulls first;
//! `desc` reverses). `start` filters before the limit; limits in `related` count per parent.
//! Comparisons with null are false except `IS` / `IS NOT`; a null correlation key never
//! matches. EXISTS over `limit 0` is constant. Like Zero's builder, every EXISTS / NOT EXISTS
//! anywhere in a `where` (under OR too) joins its children to each output row, so each output
//! row syncs up to [`plan::EXISTS_LIMIT`] witnesses per condition; a flipped EXISTS syncs all
//! children (up to the subquery's own limit); permission subqueries sync nothing. Witnesses
//! are the first children in the child's ordering (Zero's `Cap` keeps whichever rows it saw
//! first; this engine picks deterministically).
//!
//! # How a template runs
//!
//! * **Candidates** of the root come from an index seek on a top-level `col = ?` / `IN ?`, or
//!   are driven from a selective EXISTS child (Zero's flipped join), or scan the table.
//! * **Root limits** run as `lookup_topk`: a custom operator that keeps O(limit) state per
//!   instance and walks a shared *sorted* index (rows under each key in ORDER BY order) until
//!   the limit is filled. On a single worker it decides EXISTS by probing the children's
//!   shared indexes during the walk, so hydrating `issues with label X order by modified
//!   limit 50` reads about 50 / selectivity rows. Changes to the table update windows in
//!   place (only rows that pass the filter and sort inside the window matter); a walk happens
//!   on hydration, when a child table of an EXISTS changes, or to refill a shrunken window.
//!   Witnesses and `related` then hang off the few output rows.
//! * **Other limits** (per parent in `related`, EXISTS witness caps, and root limits with EXISTS
//!   on several workers) use `reduce`; whole-instance groups get one hash-bucket stage first.
//! * EXISTS in other positions are (anti)semijoins against the child's keys, after the pure
//!   conjuncts have filtered in one closure; OR with EXISTS unions its branches and `distinct`s.
//!
//! # Limits of this version
//!
//! * `scalar` EXISTS runs as a plain EXISTS; Zero's companion rows for resolved scalar
//!   subqueries are not produced.
//! * `related` inside an EXISTS subquery is ignored (Zero's client never builds it).
//! * [`Engine::view`] always gives arrays (also for `one()` and one-cardinality
//!   relationships), and runs the query over the synced rows as the client does; a NOT EXISTS
//!   whose child is not synced can therefore look true there.
//! * Shared indexes live as long as the engine (they are few: one per table and column set).
//! * With several workers, EXISTS under a root limit uses the join pipeline (probing needs
//!   every child row on one worker).
//! * A change to a table read by a probed EXISTS re-walks the instances of that template whose
//!   child conditions the changed rows can pass (before or after the change); an instance
//!   whose EXISTS seeks a value no child row has (a renamed label) is empty without a walk.
//! * The first query of a shape pays for building the indexes it needs that are not built yet
//!   (a lookup index about 0.1–0.4 s per 100k rows, a sorted index for a top-k about 40 ms,
//!   see `sort_batcher`): the schema's relationships are indexed at start, and
//!   [`Engine::prepare`] builds a known shape's indexes ahead (e.g. while the replica loads);
//!   later queries of that shape, or of any shape with the same table, key and ordering,
//!   share them.
//!
//! # Layout
//!
//! * [`engine`]: the synchronous API; owns the workers and collects output.
//! * [`plan`]: AST → shape + parameters.
//! * [`expr`]: row-level semantics (operators, LIKE, sort keys, start cursors).
//! * `render`: shape → differential operators (seeks, lookups, (anti)semijoins, top-k,
//!   `lookup_topk`).
//! * `worker`: the timely worker loop (inputs, shared indexes, templates, output sinks).
//! * [`mod@reference`]: a from-scratch evaluator (the tests' oracle) and the view format.

pub mod engine;
pub mod error;
pub mod expr;
mod lean;
pub mod plan;
pub mod reference;
mod render;
mod sort_batcher;
mod worker;

pub use engine::{Engine, EngineConfig, IndexStats, Op, QueryDiff, RowPatch, TableChange};
pub use error::EngineError;
