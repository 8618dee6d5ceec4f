//! Custom (named) queries (protocol §9): the API server at `ZERO_QUERY_URL` turns
//! `{id, name, args}` into an AST. Requests are `["transform", [...]]` POSTs with
//! `?schema={app}_{shard}&appID={app}` appended; the answer is a `QueryResponse` (or one of the
//! legacy shapes) with one result per query.
//! HTTP, URL patterns, headers and retries are [`super::fetch`]'s.

use std::sync::Arc;

use serde_json::{Value as Json, json};

use super::fetch::{ApiConfig, ApiFailure, CallContext};

/// Why a whole transform request failed (every query in it is affected).
pub type TransformFailed = ApiFailure;

impl ApiFailure {
    /// The `TransformFailed` error body sent to affected clients.
    pub fn transform_body(&self, query_ids: &[String]) -> Json {
        self.body("TransformFailed", "queryIDs", json!(query_ids))
    }
}

fn failed(reason: &str, message: impl Into<String>) -> TransformFailed {
    ApiFailure::zero_cache(reason, message)
}

/// The outcome for one query.
#[derive(Debug, Clone, PartialEq)]
pub enum QueryResult {
    /// The AST to hydrate (server names).
    Ast(Json),
    /// An application or parse error: sent to clients in `transformError`.
    Error(Json),
}

/// Where and how to call the API server.
#[derive(Debug, Clone)]
pub struct QueryEndpoint {
    /// `ZERO_QUERY_*`.
    pub config: Arc<ApiConfig>,
    /// `{app}_{shard}`.
    pub schema: String,
    /// `ZERO_APP_ID`.
    pub app_id: String,
}

impl QueryEndpoint {
    /// Transforms `queries` (`(id, name, args)`), returning a result per id. An empty list is
    /// the validation request that checks a connection's token.
    pub async fn transform(
        &self,
        ctx: &CallContext,
        queries: &[(String, String, Json)],
    ) -> Result<Vec<(String, QueryResult)>, TransformFailed> {
        let body = json!([
            "transform",
            queries
                .iter()
                .map(|(id, name, args)| json!({"id": id, "name": name, "args": args}))
                .collect::<Vec<_>>()
        ]);
        let v =
            super::fetch::post_json(&self.config, ctx, &self.schema, &self.app_id, &body).await?;
        parse_response(&v)
    }
}

/// Parses a transform response in any of its shapes.
pub fn parse_response(v: &Json) -> Result<Vec<(String, QueryResult)>, TransformFailed> {
    let results = match v {
        Json::Object(o) if o.get("kind").and_then(Json::as_str) == Some("QueryResponse") => {
            o.get("queries").cloned().unwrap_or(Json::Null)
        }
        Json::Object(o) if o.get("kind").and_then(Json::as_str) == Some("TransformFailed") => {
            return Err(server_failure(v));
        }
        Json::Array(a) if a.len() == 2 && a[0] == "transformed" => a[1].clone(),
        Json::Array(a) if a.len() == 2 && a[0] == "transformFailed" => {
            return Err(server_failure(&a[1]));
        }
        _ => Json::Null,
    };
    let Json::Array(items) = results else {
        return Err(failed("parse", "transform response has no query results"));
    };
    let mut out = Vec::new();
    for item in items {
        let Some(id) = item["id"].as_str().map(str::to_string) else {
            return Err(failed("parse", "query result without id"));
        };
        if item.get("error").is_some() {
            out.push((id, QueryResult::Error(item)));
        } else if let Some(ast) = item.get("ast") {
            out.push((id, QueryResult::Ast(ast.clone())));
        } else {
            return Err(failed(
                "parse",
                format!("query result {id} has neither ast nor error"),
            ));
        }
    }
    Ok(out)
}

/// A `TransformFailed` body sent by the API server itself.
fn server_failure(b: &Json) -> TransformFailed {
    ApiFailure {
        origin: if b["origin"] == "zeroCache" {
            "zeroCache"
        } else {
            "server"
        },
        reason: b["reason"].as_str().unwrap_or("internal").to_string(),
        message: b["message"]
            .as_str()
            .unwrap_or("transform failed")
            .to_string(),
        status: b["status"].as_u64().map(|s| s as u16),
        body_preview: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_shapes() {
        let p = |t: &str| parse_response(&serde_json::from_str(t).unwrap());
        let r = p(r#"{"kind":"QueryResponse","queries":[{"id":"a","name":"n","ast":{"table":"t"}},{"error":"app","id":"b","name":"m","message":"no"}],"userID":"anon"}"#).unwrap();
        assert_eq!(r[0], ("a".into(), QueryResult::Ast(json!({"table": "t"}))));
        assert!(matches!(&r[1], (id, QueryResult::Error(_)) if id == "b"));
        let r = p(r#"["transformed",[{"id":"a","name":"n","ast":{"table":"t"}}]]"#).unwrap();
        assert_eq!(r.len(), 1);
        let e = p(r#"["transformFailed",{"message":"x","reason":"database"}]"#).unwrap_err();
        assert_eq!((e.origin, e.reason.as_str()), ("server", "database"));
        assert_eq!(p(r#"{"x": 1}"#).unwrap_err().reason, "parse");
    }
}
