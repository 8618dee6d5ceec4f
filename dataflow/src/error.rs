//! Errors the engine reports to its caller.
//!
//! Only conditions the caller can cause are errors: a query that does not fit the schema, a
//! change for an unknown table, versions that go backwards. A bug inside the engine is a panic
//! with context, as `style.md` asks of the no-I/O crates.

use thiserror::Error;

/// Why the engine refused a request.
#[derive(Debug, Error)]
pub enum EngineError {
    /// The query does not validate against the schema.
    #[error("invalid query: {0}")]
    InvalidQuery(#[from] zero_queries::validate::ValidationError),
    /// The query uses something the engine cannot run (for example an unbound static parameter).
    #[error("unsupported query: {0}")]
    Unsupported(String),
    /// A change names a table the engine was not built with.
    #[error("unknown table \"{0}\"")]
    UnknownTable(String),
    /// A row whose length does not match its table.
    #[error("row for table \"{table}\" has {found} values, expected {expected}")]
    RowArity {
        /// The table.
        table: String,
        /// Values in the row.
        found: usize,
        /// Columns of the table.
        expected: usize,
    },
    /// Versions must increase strictly from one `apply` to the next.
    #[error("version {version} is not after the last applied version {last}")]
    VersionNotIncreasing {
        /// The version that was passed.
        version: u64,
        /// The last version applied.
        last: u64,
    },
    /// `step_until` was asked for a version that was never applied, which would wait forever.
    #[error("version {0} has not been applied")]
    VersionNotApplied(u64),
    /// A query id that is already registered.
    #[error("query \"{0}\" is already registered")]
    DuplicateQuery(String),
    /// The worker threads are gone (one of them panicked).
    #[error("dataflow workers stopped")]
    WorkersStopped,
}
