//! Custom (named) queries (protocol §9): the API server at `ZERO_QUERY_URL` turns
//! `{id, name, args}` into an AST. Requests are `["transform", [...]]` POSTs with
//! `?schema={app}_{shard}&appID={app}` appended; the answer is a `QueryResponse` (or one of the
//! legacy shapes) with one result per query.
//!
//! The HTTP client is a minimal HTTP/1.0 one (plain `http://` only): the API servers this talks
//! to are the application's own, usually on the same host or network.

use std::time::Duration;

use serde_json::{Value as Json, json};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Why a whole transform request failed (every query in it is affected).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct TransformFailed {
    /// `http`, `timeout`, `parse` or `internal`.
    pub reason: &'static str,
    /// What happened.
    pub message: String,
    /// HTTP status when the server answered with an error.
    pub status: Option<u16>,
}

impl TransformFailed {
    fn new(reason: &'static str, message: impl Into<String>) -> TransformFailed {
        TransformFailed {
            reason,
            message: message.into(),
            status: None,
        }
    }

    /// The `TransformFailed` error body sent to affected clients.
    pub fn body(&self, query_ids: &[String]) -> Json {
        let mut b = json!({
            "kind": "TransformFailed",
            "origin": "zeroCache",
            "reason": self.reason,
            "message": self.message,
            "queryIDs": query_ids,
        });
        if let Some(s) = self.status {
            b["status"] = json!(s);
        }
        b
    }
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
    /// Configured URLs (the first is the default).
    pub urls: Vec<String>,
    /// `X-Api-Key`.
    pub api_key: Option<String>,
    /// `{app}_{shard}`.
    pub schema: String,
    /// `ZERO_APP_ID`.
    pub app_id: String,
}

impl QueryEndpoint {
    /// The URL to call: the client's choice if configured, else the first configured one.
    pub fn url_for(&self, client_url: Option<&str>) -> Result<String, TransformFailed> {
        choose_url(
            &self.urls,
            client_url,
            "ZERO_QUERY_URL",
            &self.schema,
            &self.app_id,
        )
        .map_err(|m| TransformFailed::new("internal", m))
    }

    /// Transforms `queries` (`(id, name, args)`), returning a result per id.
    pub async fn transform(
        &self,
        url: &str,
        auth: Option<&str>,
        queries: &[(String, String, Json)],
    ) -> Result<Vec<(String, QueryResult)>, TransformFailed> {
        let body = json!([
            "transform",
            queries
                .iter()
                .map(|(id, name, args)| json!({"id": id, "name": name, "args": args}))
                .collect::<Vec<_>>()
        ]);
        let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        if let Some(k) = &self.api_key {
            headers.push(("X-Api-Key".into(), k.clone()));
        }
        if let Some(t) = auth {
            headers.push(("Authorization".into(), format!("Bearer {t}")));
        }
        let (status, text) = tokio::time::timeout(
            Duration::from_secs(30),
            post(url, &headers, body.to_string().as_bytes()),
        )
        .await
        .map_err(|_| TransformFailed::new("timeout", format!("POST {url} timed out")))??;
        if !(200..300).contains(&status) {
            let mut preview = text.clone();
            if preview.len() > 512 {
                let mut cut = 512;
                while !preview.is_char_boundary(cut) {
                    cut -= 1;
                }
                preview.truncate(cut);
                preview.push_str("...");
            }
            return Err(TransformFailed {
                reason: "http",
                message: format!(
                    "Fetch from API server returned non-OK status {status}: {preview}"
                ),
                status: Some(status),
            });
        }
        parse_response(&text)
    }
}

/// Picks the API URL (the client's if it is one of the configured ones, else the first
/// configured one) and appends `schema` and `appID`.
pub(crate) fn choose_url(
    urls: &[String],
    client_url: Option<&str>,
    option: &str,
    schema: &str,
    app_id: &str,
) -> Result<String, String> {
    let strip = |u: &str| u.split(['?', '#']).next().unwrap_or(u).to_string();
    let base = match client_url {
        Some(u) => {
            if !urls.iter().any(|c| strip(c) == strip(u)) {
                return Err(format!(
                    "URL \"{u}\" is not allowed by the {option} configuration"
                ));
            }
            u.to_string()
        }
        None => urls
            .first()
            .cloned()
            .ok_or_else(|| format!("{option} is not configured"))?,
    };
    let sep = if base.contains('?') { '&' } else { '?' };
    Ok(format!("{base}{sep}schema={schema}&appID={app_id}"))
}

/// Parses a transform response in any of its shapes.
pub fn parse_response(text: &str) -> Result<Vec<(String, QueryResult)>, TransformFailed> {
    let v: Json = serde_json::from_str(text)
        .map_err(|e| TransformFailed::new("parse", format!("invalid transform response: {e}")))?;
    let results = match &v {
        Json::Object(o) if o.get("kind").and_then(Json::as_str) == Some("QueryResponse") => {
            o.get("queries").cloned().unwrap_or(Json::Null)
        }
        Json::Object(o) if o.get("kind").and_then(Json::as_str) == Some("TransformFailed") => {
            return Err(TransformFailed::new(
                "internal",
                o.get("message")
                    .and_then(Json::as_str)
                    .unwrap_or("transform failed")
                    .to_string(),
            ));
        }
        Json::Array(a) if a.len() == 2 && a[0] == "transformed" => a[1].clone(),
        Json::Array(a) if a.len() == 2 && a[0] == "transformFailed" => {
            return Err(TransformFailed::new(
                "internal",
                a[1]["message"]
                    .as_str()
                    .unwrap_or("transform failed")
                    .to_string(),
            ));
        }
        _ => Json::Null,
    };
    let Json::Array(items) = results else {
        return Err(TransformFailed::new(
            "parse",
            "transform response has no query results",
        ));
    };
    let mut out = Vec::new();
    for item in items {
        let Some(id) = item["id"].as_str().map(str::to_string) else {
            return Err(TransformFailed::new("parse", "query result without id"));
        };
        if item.get("error").is_some() {
            out.push((id, QueryResult::Error(item)));
        } else if let Some(ast) = item.get("ast") {
            out.push((id, QueryResult::Ast(ast.clone())));
        } else {
            return Err(TransformFailed::new(
                "parse",
                format!("query result {id} has neither ast nor error"),
            ));
        }
    }
    Ok(out)
}

/// POSTs `body` over HTTP/1.0 (no chunked replies) and returns status and body.
pub(crate) async fn post(
    url: &str,
    headers: &[(String, String)],
    body: &[u8],
) -> Result<(u16, String), TransformFailed> {
    let fail = |m: String| TransformFailed::new("http", m);
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        TransformFailed::new(
            "internal",
            format!("unsupported URL {url}: only http:// is supported"),
        )
    })?;
    let (hostport, path) = match rest.find('/') {
        Some(i) => (&rest[..i], &rest[i..]),
        None => match rest.find('?') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, "/"),
        },
    };
    let path = if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    let addr = if hostport.contains(':') {
        hostport.to_string()
    } else {
        format!("{hostport}:80")
    };
    let mut s = tokio::net::TcpStream::connect(&addr)
        .await
        .map_err(|e| fail(format!("fetch failed: {addr}: {e}")))?;
    let mut req = format!(
        "POST {path} HTTP/1.0\r\nHost: {hostport}\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes())
        .await
        .map_err(|e| fail(format!("fetch failed: {e}")))?;
    s.write_all(body)
        .await
        .map_err(|e| fail(format!("fetch failed: {e}")))?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp)
        .await
        .map_err(|e| fail(format!("fetch failed: {e}")))?;
    let text = String::from_utf8_lossy(&resp);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| fail("malformed HTTP response".into()))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail("malformed HTTP status line".into()))?;
    Ok((status, body.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn response_shapes() {
        let r = parse_response(r#"{"kind":"QueryResponse","queries":[{"id":"a","name":"n","ast":{"table":"t"}},{"error":"app","id":"b","name":"m","message":"no"}],"userID":"anon"}"#).unwrap();
        assert_eq!(r[0], ("a".into(), QueryResult::Ast(json!({"table": "t"}))));
        assert!(matches!(&r[1], (id, QueryResult::Error(_)) if id == "b"));
        let r = parse_response(r#"["transformed",[{"id":"a","name":"n","ast":{"table":"t"}}]]"#)
            .unwrap();
        assert_eq!(r.len(), 1);
        assert!(parse_response(r#"["transformFailed",{"message":"x"}]"#).is_err());
        assert_eq!(parse_response("nope").unwrap_err().reason, "parse");
    }

    #[test]
    fn urls() {
        let e = QueryEndpoint {
            urls: vec!["http://api/query".into()],
            api_key: None,
            schema: "zero_0".into(),
            app_id: "zero".into(),
        };
        assert_eq!(
            e.url_for(None).unwrap(),
            "http://api/query?schema=zero_0&appID=zero"
        );
        assert_eq!(
            e.url_for(Some("http://api/query?x=1")).unwrap(),
            "http://api/query?x=1&schema=zero_0&appID=zero"
        );
        assert!(e.url_for(Some("http://evil/query")).is_err());
    }
}
