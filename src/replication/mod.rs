//! Streaming replication: the pgoutput stream of the replica's slot applied to the replica, one
//! upstream transaction per SQLite transaction, acknowledged to Postgres only once durable.

pub mod pgoutput;
mod stream;

pub use stream::{StreamError, StreamOutcome, stream_changes};
