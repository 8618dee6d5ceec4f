//! The sync server: HTTP and WebSocket on `ZERO_PORT`, Zero's sync protocol (v30–v51), client
//! view records and pokes.
