//! ZQL, the query language of Zero: the AST as Zero's JSON, normalization, hashing, parsing and
//! validation. This crate does no I/O so that every piece can be tested with plain `#[test]`s.
