//! The incremental view engine: ZQL queries maintained by differential dataflow over the
//! replica's committed change batches. This crate does no I/O.
