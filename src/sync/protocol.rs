//! Wire types of Zero's sync protocol v51 (protocol §2, §3): every message is a JSON 2-tuple
//! `[name, body]`. Upstream bodies are parsed strictly (unknown keys are rejected, as zero-cache
//! does); downstream bodies omit absent fields, as `JSON.stringify` omits `undefined`.

use std::collections::BTreeMap;

use std::sync::Arc;

use serde::{Deserialize, Serialize, Serializer};
use serde_json::Value as Json;
use serde_json::value::RawValue;

/// `ttl` the server assumes when a `put` carries none (`DEFAULT_TTL_MS`).
pub const DEFAULT_TTL_MS: f64 = 300_000.0;
/// The longest TTL the server honours (10 minutes).
pub const MAX_TTL_MS: f64 = 600_000.0;

/// One desired-query change sent by a client.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op", rename_all = "lowercase", deny_unknown_fields)]
pub enum UpQueriesPatchOp {
    /// The client wants the query `hash`.
    Put {
        /// The client's query id, echoed everywhere.
        hash: String,
        /// Milliseconds the query stays after `del`.
        #[serde(default)]
        ttl: Option<f64>,
        /// A legacy query's AST (server names).
        #[serde(default)]
        ast: Option<Json>,
        /// A custom query's name.
        #[serde(default)]
        name: Option<String>,
        /// A custom query's arguments.
        #[serde(default)]
        args: Option<Vec<Json>>,
    },
    /// The client no longer wants the query.
    Del {
        /// The query id.
        hash: String,
    },
    /// The client wants none of its queries.
    Clear {},
}

/// Clients and groups a client reports as deleted.
#[derive(Debug, Clone, PartialEq, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct DeletedClients {
    /// Deleted client ids.
    #[serde(default, rename = "clientIDs", skip_serializing_if = "Option::is_none")]
    pub client_ids: Option<Vec<String>>,
    /// Deleted client-group ids (ignored, as in zero-cache).
    #[serde(
        default,
        rename = "clientGroupIDs",
        skip_serializing_if = "Option::is_none"
    )]
    pub client_group_ids: Option<Vec<String>>,
}

/// Body of `initConnection`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct InitConnectionBody {
    /// Initial desired-query changes.
    pub desired_queries_patch: Vec<UpQueriesPatchOp>,
    /// The client's schema; sent when the client has no cookie.
    #[serde(default)]
    pub client_schema: Option<Json>,
    /// Clients deleted on the client side.
    #[serde(default)]
    pub deleted: Option<DeletedClients>,
    /// Push URL chosen by the client.
    #[serde(default, rename = "userPushURL")]
    pub user_push_url: Option<String>,
    /// Headers for the push URL.
    #[serde(default)]
    pub user_push_headers: Option<BTreeMap<String, String>>,
    /// Query URL chosen by the client.
    #[serde(default, rename = "userQueryURL")]
    pub user_query_url: Option<String>,
    /// Headers for the query URL.
    #[serde(default)]
    pub user_query_headers: Option<BTreeMap<String, String>>,
    /// Clients of the group still alive on this device.
    #[serde(default)]
    pub active_clients: Option<Vec<String>>,
    /// W3C trace context.
    #[serde(default)]
    pub traceparent: Option<String>,
}

/// Body of `changeDesiredQueries`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct ChangeDesiredQueriesBody {
    /// Desired-query changes.
    pub desired_queries_patch: Vec<UpQueriesPatchOp>,
    /// W3C trace context.
    #[serde(default)]
    pub traceparent: Option<String>,
}

/// Body of `push` (mutations are kept as JSON: they are forwarded, not interpreted here).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PushBody {
    /// The pushing client's group.
    #[serde(rename = "clientGroupID")]
    pub client_group_id: String,
    /// Mutations, in order.
    pub mutations: Vec<Json>,
    /// Push protocol version.
    pub push_version: f64,
    /// Client schema version (legacy).
    #[serde(default)]
    pub schema_version: Option<f64>,
    /// Client time of the push.
    pub timestamp: f64,
    /// Request id.
    #[serde(rename = "requestID")]
    pub request_id: String,
    /// Deprecated auth token.
    #[serde(default)]
    pub auth: Option<String>,
    /// W3C trace context.
    #[serde(default)]
    pub traceparent: Option<String>,
}

/// Body of an upstream `pull` (unsupported by zero-cache; logged and ignored).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct PullBody {
    /// The group to pull.
    #[serde(rename = "clientGroupID")]
    pub client_group_id: String,
    /// The client's cookie.
    pub cookie: Option<Json>,
    /// Request id.
    #[serde(rename = "requestID")]
    pub request_id: String,
}

/// Body of `ackMutationResponses`: a mutation id.
#[derive(Debug, Clone, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct MutationId {
    /// Mutation number.
    pub id: f64,
    /// Client that made it.
    #[serde(rename = "clientID")]
    pub client_id: String,
}

/// Body of `updateAuth`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateAuthBody {
    /// The new token.
    pub auth: String,
}

/// Body of `inspect`: the inspector's request id and operation.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct InspectBody {
    /// Request id, echoed in the reply.
    pub id: String,
    /// What is asked.
    #[serde(flatten)]
    pub op: InspectOp,
}

/// The inspector's operations (`op`); any other is an invalid message, as in zero-cache.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(tag = "op")]
pub enum InspectOp {
    /// The group's queries (one client's when `clientID` is given).
    #[serde(rename = "queries")]
    Queries {
        /// Only this client's desires.
        #[serde(rename = "clientID", default)]
        client_id: Option<String>,
    },
    /// The group's hydration and update time digests.
    #[serde(rename = "metrics")]
    Metrics {},
    /// The server's version.
    #[serde(rename = "version")]
    Version {},
    /// The admin password, for the other operations.
    #[serde(rename = "authenticate")]
    Authenticate {
        /// The password.
        value: String,
    },
    /// Hydrate one query and report its rows and time.
    #[serde(rename = "analyze-query")]
    AnalyzeQuery {
        /// The query's AST.
        #[serde(default)]
        ast: Option<Json>,
        /// The AST (older clients).
        #[serde(default)]
        value: Option<Json>,
        /// A custom query's name (with `args`): transformed by the API server first.
        #[serde(default)]
        name: Option<String>,
        /// A custom query's arguments.
        #[serde(default)]
        args: Option<Vec<Json>>,
        /// What to include in the result.
        #[serde(default)]
        options: Option<AnalyzeOptions>,
    },
}

/// `analyze-query` options.
#[derive(Debug, Clone, PartialEq, Default, Deserialize)]
pub struct AnalyzeOptions {
    /// Include the synced rows (default true).
    #[serde(rename = "syncedRows", default)]
    pub synced_rows: Option<bool>,
    /// Include the rows read (zero-cache's SQLite reads; this server reads none).
    #[serde(rename = "vendedRows", default)]
    pub vended_rows: Option<bool>,
    /// Include the join planner's events (this server has no cost-based planner).
    #[serde(rename = "joinPlans", default)]
    pub join_plans: Option<bool>,
}

/// A message from the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Upstream {
    /// Start syncing.
    InitConnection(InitConnectionBody),
    /// Change the desired queries.
    ChangeDesiredQueries(ChangeDesiredQueriesBody),
    /// Forget clients.
    DeleteClients(DeletedClients),
    /// Mutations.
    Push(PushBody),
    /// Replicache pull (not supported by zero-cache).
    Pull(PullBody),
    /// Liveness probe.
    Ping,
    /// A new auth token.
    UpdateAuth(UpdateAuthBody),
    /// The client processed mutation results up to this id.
    AckMutationResponses(MutationId),
    /// Deprecated; ignored.
    CloseConnection,
    /// Inspector request.
    Inspect(InspectBody),
}

/// Why an upstream message was rejected (`InvalidMessage`).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ParseError(pub String);

impl Upstream {
    /// Parses one text frame.
    pub fn parse(text: &str) -> Result<Upstream, ParseError> {
        let (name, body): (String, Json) =
            serde_json::from_str(text).map_err(|e| ParseError(format!("invalid message: {e}")))?;
        fn body_of<T: for<'de> Deserialize<'de>>(name: &str, b: Json) -> Result<T, ParseError> {
            serde_json::from_value(b)
                .map_err(|e| ParseError(format!("invalid {name} message: {e}")))
        }
        Ok(match name.as_str() {
            "initConnection" => Upstream::InitConnection(body_of(&name, body)?),
            "changeDesiredQueries" => Upstream::ChangeDesiredQueries(body_of(&name, body)?),
            "deleteClients" => Upstream::DeleteClients(body_of(&name, body)?),
            "push" => Upstream::Push(body_of(&name, body)?),
            "pull" => Upstream::Pull(body_of(&name, body)?),
            "ping" => {
                let _: serde_json::Map<String, Json> = body_of(&name, body)?;
                Upstream::Ping
            }
            "updateAuth" => Upstream::UpdateAuth(body_of(&name, body)?),
            "ackMutationResponses" => Upstream::AckMutationResponses(body_of(&name, body)?),
            "closeConnection" => Upstream::CloseConnection,
            "inspect" => Upstream::Inspect(body_of(&name, body)?),
            other => return Err(ParseError(format!("unknown message type {other:?}"))),
        })
    }
}

/// A query change sent to clients.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum QueriesPatchOp {
    /// The query is desired / got.
    Put {
        /// Query id.
        hash: String,
    },
    /// The query is no longer desired / got.
    Del {
        /// Query id.
        hash: String,
    },
}

/// A row's JSON text, rendered once per replica version and shared by every client group
/// that is sent the row: a poke copies the text into its frame instead of cloning and
/// serializing a JSON value per client.
#[derive(Clone)]
pub struct RowJson(Arc<RawValue>);

impl RowJson {
    /// Renders `value` (an object of the row's columns).
    pub fn new(value: &Json) -> RowJson {
        let raw = serde_json::value::to_raw_value(value).expect("JSON values serialize");
        RowJson(Arc::from(raw))
    }

    /// The JSON text.
    pub fn get(&self) -> &str {
        self.0.get()
    }

    /// The row as a JSON value (for callers that inspect it).
    pub fn to_value(&self) -> Json {
        serde_json::from_str(self.get()).expect("rendered from a JSON value")
    }
}

impl std::fmt::Debug for RowJson {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.get())
    }
}

impl PartialEq for RowJson {
    fn eq(&self, other: &RowJson) -> bool {
        self.get() == other.get()
    }
}

impl Serialize for RowJson {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        self.0.serialize(s)
    }
}

/// A row change sent to clients.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum RowPatchOp {
    /// The full current row.
    Put {
        /// Replica table name.
        #[serde(rename = "tableName")]
        table_name: String,
        /// Row as JSON, without `_0_version`.
        value: RowJson,
    },
    /// The row left every query of the group.
    Del {
        /// Replica table name.
        #[serde(rename = "tableName")]
        table_name: String,
        /// Primary-key columns of the row.
        id: Json,
    },
}

/// A mutation result change.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum MutationPatchOp {
    /// A result arrived.
    Put {
        /// `{id: {id, clientID}, result}`.
        mutation: Json,
    },
    /// A result was cleaned up.
    Del {
        /// `{id, clientID}`.
        id: Json,
    },
}

/// `pokeStart` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PokeStartBody {
    /// Id of the poke (the cookie it heads to).
    #[serde(rename = "pokeID")]
    pub poke_id: String,
    /// The cookie the poke applies on top of; null for a fresh client.
    pub base_cookie: Option<String>,
}

/// `pokePart` body.
#[derive(Debug, Clone, PartialEq, Default, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PokePartBody {
    /// Id of the poke.
    #[serde(rename = "pokeID")]
    pub poke_id: String,
    /// New last mutation ids per client.
    #[serde(
        rename = "lastMutationIDChanges",
        skip_serializing_if = "BTreeMap::is_empty"
    )]
    pub last_mutation_id_changes: BTreeMap<String, i64>,
    /// Desired-query changes per client.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub desired_queries_patches: BTreeMap<String, Vec<QueriesPatchOp>>,
    /// Got-query changes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub got_queries_patch: Vec<QueriesPatchOp>,
    /// Row changes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub rows_patch: Vec<RowPatchOp>,
    /// Mutation result changes.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub mutations_patch: Vec<MutationPatchOp>,
}

impl PokePartBody {
    /// Whether the part carries no change.
    pub fn is_empty(&self) -> bool {
        self.last_mutation_id_changes.is_empty()
            && self.desired_queries_patches.is_empty()
            && self.got_queries_patch.is_empty()
            && self.rows_patch.is_empty()
            && self.mutations_patch.is_empty()
    }

    /// Number of patch entries (parts are flushed after [`PART_MAX_ENTRIES`]).
    pub fn len(&self) -> usize {
        self.last_mutation_id_changes.len()
            + self
                .desired_queries_patches
                .values()
                .map(Vec::len)
                .sum::<usize>()
            + self.got_queries_patch.len()
            + self.rows_patch.len()
            + self.mutations_patch.len()
    }
}

/// Entries after which a `pokePart` is flushed.
pub const PART_MAX_ENTRIES: usize = 100;

/// `pokeEnd` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct PokeEndBody {
    /// Id of the poke.
    #[serde(rename = "pokeID")]
    pub poke_id: String,
    /// The cookie the client has after this poke.
    pub cookie: String,
    /// The poke is dropped.
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub cancel: bool,
}

/// Error kinds of the protocol (§3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum ErrorKind {
    /// Token could not be verified.
    AuthInvalidated,
    /// The CVR has no state for this client.
    ClientNotFound,
    /// Bad handshake or schema mismatch.
    InvalidConnectionRequest,
    /// The client's cookie is ahead of the CVR.
    InvalidConnectionRequestBaseCookie,
    /// The client's mutation id is ahead.
    InvalidConnectionRequestLastMutationID,
    /// The client was deleted.
    InvalidConnectionRequestClientDeleted,
    /// An upstream message could not be parsed.
    InvalidMessage,
    /// A push was rejected.
    InvalidPush,
    /// A CRUD mutation failed.
    MutationFailed,
    /// CRUD rate limit.
    MutationRateLimited,
    /// Not allowed.
    Unauthorized,
    /// Protocol version out of range.
    VersionNotSupported,
    /// Client schema incompatible with the replica.
    SchemaVersionNotSupported,
    /// Unhandled server error.
    Internal,
    /// Reconnect elsewhere / later.
    Rehome,
}

/// A basic error body: `{kind, message, origin: "zeroCache"}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ErrorBody {
    /// Error kind.
    pub kind: ErrorKind,
    /// Human-readable message.
    pub message: String,
    /// Always `zeroCache` for errors raised here.
    pub origin: &'static str,
}

impl ErrorBody {
    /// An error raised by this server.
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> ErrorBody {
        ErrorBody {
            kind,
            message: message.into(),
            origin: "zeroCache",
        }
    }
}

/// `connected` body.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ConnectedBody {
    /// The connection's wsid, echoed.
    pub wsid: String,
    /// Server time, epoch ms.
    pub timestamp: i64,
}

/// A message to the client.
#[derive(Debug, Clone, PartialEq)]
pub enum Downstream {
    /// The handshake succeeded.
    Connected(ConnectedBody),
    /// A poke begins.
    PokeStart(PokeStartBody),
    /// A part of a poke (boxed: it is by far the largest body, and queued messages take the
    /// size of the largest).
    PokePart(Box<PokePartBody>),
    /// A poke ends.
    PokeEnd(PokeEndBody),
    /// Liveness reply.
    Pong,
    /// A fatal (or, for mutation errors, non-fatal) error.
    Error(ErrorBody),
    /// Acknowledges deleted clients.
    DeleteClients(DeletedClients),
    /// Inspector reply.
    Inspect(Json),
    /// Per-query transform errors of custom queries (non-fatal).
    TransformError(Json),
    /// An error whose body is already shaped (e.g. `TransformFailed`).
    ErrorJson(Json),
}

impl Serialize for Downstream {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            Downstream::Connected(b) => ("connected", b).serialize(s),
            Downstream::PokeStart(b) => ("pokeStart", b).serialize(s),
            Downstream::PokePart(b) => ("pokePart", b).serialize(s),
            Downstream::PokeEnd(b) => ("pokeEnd", b).serialize(s),
            Downstream::Pong => ("pong", serde_json::json!({})).serialize(s),
            Downstream::Error(b) => ("error", b).serialize(s),
            Downstream::DeleteClients(b) => ("deleteClients", b).serialize(s),
            Downstream::Inspect(b) => ("inspect", b).serialize(s),
            Downstream::TransformError(b) => ("transformError", b).serialize(s),
            Downstream::ErrorJson(b) => ("error", b).serialize(s),
        }
    }
}

impl Downstream {
    /// The JSON text frame.
    pub fn to_text(&self) -> String {
        serde_json::to_string(self).expect("downstream messages serialize")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_every_upstream_message_of_the_trace() {
        let m = Upstream::parse(r#"["changeDesiredQueries",{"desiredQueriesPatch":[{"op":"put","hash":"3re8590kr6tsx","name":"openIssues","args":[{"limit":10}],"ttl":300000}]}]"#).unwrap();
        let Upstream::ChangeDesiredQueries(b) = m else {
            panic!("wrong type")
        };
        assert!(
            matches!(&b.desired_queries_patch[0], UpQueriesPatchOp::Put { hash, ttl: Some(t), .. } if hash == "3re8590kr6tsx" && *t == 300000.0)
        );
        let m = Upstream::parse(r#"["push",{"timestamp":1795704973726,"clientGroupID":"g","mutations":[{"type":"custom","timestamp":1,"id":1,"clientID":"c","name":"n","args":[{}]}],"pushVersion":1,"requestID":"r"}]"#).unwrap();
        assert!(matches!(m, Upstream::Push(_)));
        assert_eq!(Upstream::parse(r#"["ping",{}]"#).unwrap(), Upstream::Ping);
        assert!(matches!(
            Upstream::parse(r#"["changeDesiredQueries",{"desiredQueriesPatch":[{"op":"clear"}]}]"#)
                .unwrap(),
            Upstream::ChangeDesiredQueries(_)
        ));
        assert!(matches!(
            Upstream::parse(r#"["ackMutationResponses",{"id":3,"clientID":"c"}]"#).unwrap(),
            Upstream::AckMutationResponses(_)
        ));
        let Upstream::DeleteClients(d) =
            Upstream::parse(r#"["deleteClients",{"clientIDs":["a"],"clientGroupIDs":["g"]}]"#)
                .unwrap()
        else {
            panic!("wrong type")
        };
        assert_eq!(d.client_ids, Some(vec!["a".to_string()]));
        let Upstream::InitConnection(i) = Upstream::parse(
            r#"["initConnection",{"desiredQueriesPatch":[],"deleted":{"clientIDs":["x"]},"activeClients":["c"]}]"#,
        )
        .unwrap() else {
            panic!("wrong type")
        };
        assert_eq!(i.deleted.unwrap().client_ids, Some(vec!["x".to_string()]));
        assert_eq!(
            Downstream::DeleteClients(DeletedClients {
                client_ids: Some(vec!["a".into()]),
                client_group_ids: None
            })
            .to_text(),
            r#"["deleteClients",{"clientIDs":["a"]}]"#
        );
    }

    #[test]
    fn rejects_malformed_messages() {
        for bad in [
            "",
            "{}",
            "[1,2]",
            r#"["nope",{}]"#,
            r#"["ping"]"#,
            r#"["changeDesiredQueries",{"desiredQueriesPatch":[{"op":"put"}]}]"#,
            r#"["initConnection",{"desiredQueriesPatch":[],"bogus":1}]"#,
            r#"["changeDesiredQueries",{"desiredQueriesPatch":[{"op":"zap","hash":"h"}]}]"#,
        ] {
            assert!(Upstream::parse(bad).is_err(), "{bad} should be rejected");
        }
    }

    #[test]
    fn downstream_json_matches_zero() {
        let part = PokePartBody {
            poke_id: "00:02".into(),
            desired_queries_patches: BTreeMap::from([(
                "c".to_string(),
                vec![QueriesPatchOp::Put { hash: "h".into() }],
            )]),
            ..Default::default()
        };
        assert_eq!(
            Downstream::PokePart(Box::new(part)).to_text(),
            r#"["pokePart",{"pokeID":"00:02","desiredQueriesPatches":{"c":[{"op":"put","hash":"h"}]}}]"#
        );
        assert_eq!(
            Downstream::PokeStart(PokeStartBody {
                poke_id: "00:01".into(),
                base_cookie: None
            })
            .to_text(),
            r#"["pokeStart",{"pokeID":"00:01","baseCookie":null}]"#
        );
        assert_eq!(
            Downstream::PokeEnd(PokeEndBody {
                poke_id: "a".into(),
                cookie: "a".into(),
                cancel: false
            })
            .to_text(),
            r#"["pokeEnd",{"pokeID":"a","cookie":"a"}]"#
        );
        assert_eq!(Downstream::Pong.to_text(), r#"["pong",{}]"#);
        assert_eq!(
            Downstream::Error(ErrorBody::new(ErrorKind::InvalidMessage, "x")).to_text(),
            r#"["error",{"kind":"InvalidMessage","message":"x","origin":"zeroCache"}]"#
        );
    }
}
