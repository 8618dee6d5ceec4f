//! Calls to the application's API server (protocol §8.1, §9): the push endpoint
//! (`ZERO_MUTATE_URL`) and the query-transform endpoint (`ZERO_QUERY_URL`) share URL
//! patterns, header forwarding, retries and the mapping of every failure to one error body.
//!
//! The configured URLs are URLPattern strings (`https://*.example.com/api/:v/mutate`); the URL a
//! client names in `userPushURL` / `userQueryURL` is only called when one of them matches it,
//! so a client cannot make the server post its users' tokens elsewhere. Connections are pooled
//! (HTTP keep-alive) and `https://` is served by rustls with the web PKI roots.

use std::collections::BTreeMap;
use std::sync::OnceLock;
use std::time::Duration;

use serde_json::{Value as Json, json};
use tracing::{debug, warn};
use urlpattern::{UrlPattern, UrlPatternInit, UrlPatternMatchInput};

/// Attempts per call: retried on 5xx answers and on network errors.
pub const MAX_ATTEMPTS: u32 = 4;
/// Longest wait for one attempt's answer.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(60);
/// Query parameters the server appends itself; a configured URL may not carry them.
const RESERVED_PARAMS: [&str; 2] = ["schema", "appID"];

/// The process-wide HTTP client (one connection pool for every API call).
pub fn http_client() -> &'static reqwest::Client {
    static CLIENT: OnceLock<reqwest::Client> = OnceLock::new();
    CLIENT.get_or_init(|| {
        reqwest::Client::builder()
            .pool_idle_timeout(Duration::from_secs(60))
            .tcp_nodelay(true)
            .build()
            .expect("the HTTP client's TLS set-up is static")
    })
}

/// A configured endpoint whose patterns cannot be compiled.
#[derive(Debug, thiserror::Error)]
#[error("Invalid URLPattern in {option} configuration: \"{pattern}\": {reason}")]
pub struct PatternError {
    /// The option (`ZERO_MUTATE_URL` / `ZERO_QUERY_URL`).
    pub option: &'static str,
    /// The offending pattern.
    pub pattern: String,
    /// Why it is invalid.
    pub reason: String,
}

/// One endpoint's configuration (`ZERO_MUTATE_*` or `ZERO_QUERY_*`).
#[derive(Debug)]
pub struct ApiConfig {
    /// The option name used in error messages.
    pub option: &'static str,
    /// The configured patterns as written; the first is the default URL.
    pub urls: Vec<String>,
    patterns: Vec<UrlPattern>,
    /// Sent as `X-Api-Key`.
    pub api_key: Option<String>,
    /// Forward the upgrade request's `Cookie` header.
    pub forward_cookies: bool,
    /// Lower-case names of `user*Headers` the client may set.
    pub allowed_client_headers: Vec<String>,
    /// Lower-case names of upgrade-request headers to forward.
    pub allowed_request_headers: Vec<String>,
}

impl ApiConfig {
    /// Compiles the patterns; an invalid one is a configuration error.
    pub fn new(
        option: &'static str,
        urls: Vec<String>,
        api_key: Option<String>,
        forward_cookies: bool,
        allowed_client_headers: &[String],
        allowed_request_headers: &[String],
    ) -> Result<ApiConfig, PatternError> {
        let mut patterns = Vec::new();
        for u in &urls {
            let err = |reason: String| PatternError {
                option,
                pattern: u.clone(),
                reason,
            };
            let init = UrlPatternInit::parse_constructor_string::<regex::Regex>(u, None)
                .map_err(|e| err(e.to_string()))?;
            let p = UrlPattern::parse(init, Default::default()).map_err(|e| err(e.to_string()))?;
            patterns.push(p);
        }
        let lower = |v: &[String]| -> Vec<String> {
            v.iter()
                .map(|h| h.trim().to_ascii_lowercase())
                .filter(|h| !h.is_empty())
                .collect()
        };
        Ok(ApiConfig {
            option,
            urls,
            patterns,
            api_key,
            forward_cookies,
            allowed_client_headers: lower(allowed_client_headers),
            allowed_request_headers: lower(allowed_request_headers),
        })
    }

    /// Whether `url` matches one of the configured patterns (search and hash are ignored).
    pub fn allows(&self, url: &str) -> bool {
        let Ok(parsed) = url::Url::parse(url) else {
            return false;
        };
        self.patterns
            .iter()
            .any(|p| matches!(p.test(UrlPatternMatchInput::Url(parsed.clone())), Ok(true)))
    }
}

/// What a connection contributes to its API calls: the upgrade request's headers, cookie and
/// origin (captured once at connect time).
#[derive(Debug, Clone, Default)]
pub struct RequestInfo {
    /// Every upgrade-request header (lower-case names), filtered per endpoint at call time.
    pub headers: Vec<(String, String)>,
    /// The `Cookie` header.
    pub cookie: Option<String>,
    /// The `Origin` header.
    pub origin: Option<String>,
}

impl RequestInfo {
    /// Captures the parts of an upgrade request that API calls may forward.
    pub fn from_headers(h: &axum::http::HeaderMap) -> RequestInfo {
        let get = |name: axum::http::HeaderName| {
            h.get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        };
        RequestInfo {
            // The WebSocket handshake's own headers are never forwarded; the protocol header
            // carries the whole initConnection, which every connection would otherwise keep.
            headers: h
                .iter()
                .filter(|(k, _)| !k.as_str().starts_with("sec-websocket-"))
                .filter_map(|(k, v)| Some((k.as_str().to_string(), v.to_str().ok()?.to_string())))
                .collect(),
            cookie: get(axum::http::header::COOKIE),
            origin: get(axum::http::header::ORIGIN),
        }
    }
}

/// One call's context: the client's URL choice and headers, the connection's request and token.
#[derive(Debug, Clone, Default)]
pub struct CallContext {
    /// `userPushURL` / `userQueryURL`.
    pub url: Option<String>,
    /// `userPushHeaders` / `userQueryHeaders` (filtered by the allowed client headers).
    pub client_headers: BTreeMap<String, String>,
    /// The upgrade request.
    pub request: RequestInfo,
    /// The raw auth token, sent as `Authorization: Bearer`.
    pub auth: Option<String>,
}

/// Why a call failed: becomes a `PushFailed` or `TransformFailed` body.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{message}")]
pub struct ApiFailure {
    /// `server` (the API server said so) or `zeroCache`.
    pub origin: &'static str,
    /// `http`, `timeout`, `parse`, `internal`, ...
    pub reason: String,
    /// What happened.
    pub message: String,
    /// The HTTP status of a non-OK answer.
    pub status: Option<u16>,
    /// The start of a non-OK answer's body.
    pub body_preview: Option<String>,
}

impl ApiFailure {
    /// A failure detected by this server.
    pub fn zero_cache(reason: &str, message: impl Into<String>) -> ApiFailure {
        ApiFailure {
            origin: "zeroCache",
            reason: reason.to_string(),
            message: message.into(),
            status: None,
            body_preview: None,
        }
    }

    /// The error body: `kind` is `PushFailed` (ids under `mutationIDs`) or `TransformFailed`
    /// (`queryIDs`).
    pub fn body(&self, kind: &str, ids_key: &str, ids: Json) -> Json {
        let mut b = json!({
            "kind": kind,
            "origin": self.origin,
            "reason": self.reason,
            "message": self.message,
        });
        if let Some(s) = self.status {
            b["status"] = json!(s);
        }
        if let Some(p) = &self.body_preview {
            b["bodyPreview"] = json!(p);
        }
        b[ids_key] = ids;
        b
    }

    /// HTTP 401/403: the token was refused, so the connection's auth is invalid.
    pub fn is_auth_error(&self) -> bool {
        self.reason == "http" && matches!(self.status, Some(401 | 403))
    }
}

/// Keeps the headers whose (case-insensitive) names are allowed.
fn filter_headers<'a>(
    headers: impl IntoIterator<Item = (&'a String, &'a String)>,
    allowed: &[String],
) -> Vec<(String, String)> {
    headers
        .into_iter()
        .filter(|(k, _)| allowed.iter().any(|a| a.eq_ignore_ascii_case(k)))
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect()
}

/// The final URL: the client's choice (when a pattern allows it) or the first configured URL,
/// with `schema` and `appID` appended.
pub fn resolve_url(
    cfg: &ApiConfig,
    client_url: Option<&str>,
    schema: &str,
    app_id: &str,
) -> Result<String, ApiFailure> {
    let url = match client_url {
        Some(u) => u.to_string(),
        None => cfg.urls.first().cloned().ok_or_else(|| {
            ApiFailure::zero_cache("internal", format!("{} is not set", cfg.option))
        })?,
    };
    if !cfg.allows(&url) {
        return Err(ApiFailure::zero_cache(
            "internal",
            format!(
                "URL \"{url}\" is not allowed by the {} configuration",
                cfg.option
            ),
        ));
    }
    let mut parsed = url::Url::parse(&url)
        .map_err(|e| ApiFailure::zero_cache("internal", format!("invalid URL \"{url}\": {e}")))?;
    if let Some(p) = parsed
        .query_pairs()
        .find(|(k, _)| RESERVED_PARAMS.contains(&k.as_ref()))
    {
        return Err(ApiFailure::zero_cache(
            "internal",
            format!(
                "The URL cannot contain the reserved query param \"{}\"",
                p.0
            ),
        ));
    }
    parsed
        .query_pairs_mut()
        .append_pair("schema", schema)
        .append_pair("appID", app_id);
    Ok(parsed.to_string())
}

/// The backoff before attempt `attempt + 1`: `min(1000, 100·2^(attempt-1) + jitter)` ms.
pub fn backoff(attempt: u32) -> Duration {
    let jitter: u64 = rand::random_range(0..100);
    Duration::from_millis(
        (100u64 << (attempt.saturating_sub(1)).min(10))
            .saturating_add(jitter)
            .min(1000),
    )
}

/// POSTs `body` as JSON and returns the parsed JSON answer. Retries 5xx answers and network
/// errors ([`MAX_ATTEMPTS`] in all); every other failure is returned at once.
///
/// The call is one `api_server.post` span (exported with OpenTelemetry when configured), whose
/// trace context goes to the API server as `traceparent`.
pub async fn post_json(
    cfg: &ApiConfig,
    ctx: &CallContext,
    schema: &str,
    app_id: &str,
    body: &Json,
) -> Result<Json, ApiFailure> {
    use tracing::Instrument;
    let span = tracing::info_span!(
        "api_server.post",
        option = cfg.option,
        url = tracing::field::Empty,
        status = tracing::field::Empty,
        attempts = tracing::field::Empty,
        otel.kind = "client",
    );
    post_json_in_span(cfg, ctx, schema, app_id, body)
        .instrument(span)
        .await
}

async fn post_json_in_span(
    cfg: &ApiConfig,
    ctx: &CallContext,
    schema: &str,
    app_id: &str,
    body: &Json,
) -> Result<Json, ApiFailure> {
    let url = resolve_url(cfg, ctx.url.as_deref(), schema, app_id)?;
    let span = tracing::Span::current();
    span.record("url", url.as_str());
    let mut headers = reqwest::header::HeaderMap::new();
    let mut add = |k: &str, v: &str| {
        if let (Ok(k), Ok(v)) = (
            reqwest::header::HeaderName::from_bytes(k.as_bytes()),
            reqwest::header::HeaderValue::from_str(v),
        ) {
            headers.insert(k, v);
        }
    };
    add("content-type", "application/json");
    if let Some(k) = &cfg.api_key {
        add("x-api-key", k);
    }
    for (k, v) in filter_headers(&ctx.client_headers, &cfg.allowed_client_headers) {
        add(&k, &v);
    }
    let req_headers = ctx.request.headers.iter().map(|(k, v)| (k, v));
    for (k, v) in filter_headers(req_headers, &cfg.allowed_request_headers) {
        add(&k, &v);
    }
    if let Some(t) = &ctx.auth {
        add("authorization", &format!("Bearer {t}"));
    }
    if cfg.forward_cookies
        && let Some(c) = &ctx.request.cookie
    {
        add("cookie", c);
    }
    if let Some(o) = &ctx.request.origin {
        add("origin", o);
    }
    for (k, v) in crate::telemetry::trace_headers() {
        add(&k, &v);
    }
    let payload = body.to_string();
    let client = http_client();
    let mut attempt = 1;
    loop {
        let sent = tokio::time::timeout(
            ATTEMPT_TIMEOUT,
            client
                .post(&url)
                .headers(headers.clone())
                .body(payload.clone())
                .send(),
        )
        .await;
        let response = match sent {
            Err(_) => {
                return Err(ApiFailure::zero_cache(
                    "timeout",
                    format!(
                        "Fetch from API server timed out after {} s",
                        ATTEMPT_TIMEOUT.as_secs()
                    ),
                ));
            }
            Ok(Err(e)) => {
                warn!(%url, attempt, error = %e, "fetch from API server failed");
                if attempt < MAX_ATTEMPTS && (e.is_connect() || e.is_request() || e.is_body()) {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
                return Err(ApiFailure::zero_cache(
                    "internal",
                    format!(
                        "Fetch from API server threw error: fetch failed: {}",
                        error_chain(&e)
                    ),
                ));
            }
            Ok(Ok(r)) => r,
        };
        let status = response.status().as_u16();
        span.record("status", status);
        span.record("attempts", attempt);
        let text = match tokio::time::timeout(ATTEMPT_TIMEOUT, response.text()).await {
            Ok(Ok(t)) => t,
            Ok(Err(e)) => {
                if attempt < MAX_ATTEMPTS {
                    tokio::time::sleep(backoff(attempt)).await;
                    attempt += 1;
                    continue;
                }
                return Err(ApiFailure::zero_cache(
                    "internal",
                    format!("Fetch from API server threw error: {}", error_chain(&e)),
                ));
            }
            Err(_) => {
                return Err(ApiFailure::zero_cache(
                    "timeout",
                    "Reading the API server's answer timed out",
                ));
            }
        };
        if !(200..300).contains(&status) {
            warn!(%url, attempt, status, "fetch from API server returned non-OK status");
            if (500..600).contains(&status) && attempt < MAX_ATTEMPTS {
                tokio::time::sleep(backoff(attempt)).await;
                attempt += 1;
                continue;
            }
            let mut preview = text;
            if preview.chars().count() > 512 {
                preview = preview.chars().take(512).collect::<String>() + "...";
            }
            return Err(ApiFailure {
                origin: "zeroCache",
                reason: "http".into(),
                message: format!("Fetch from API server returned non-OK status {status}"),
                status: Some(status),
                body_preview: Some(preview),
            });
        }
        debug!(%url, attempt, "fetch from API server succeeded");
        return serde_json::from_str(&text).map_err(|e| {
            ApiFailure::zero_cache(
                "parse",
                format!("Failed to parse response from API server: {e}"),
            )
        });
    }
}

/// The error and its sources joined with ": ", for messages that must name the root cause.
pub(crate) fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(urls: &[&str]) -> ApiConfig {
        ApiConfig::new(
            "ZERO_MUTATE_URL",
            urls.iter().map(|s| s.to_string()).collect(),
            None,
            false,
            &[],
            &[],
        )
        .unwrap()
    }

    #[test]
    fn patterns() {
        let c = cfg(&[
            "https://api.example.com/mutate",
            "https://*.preview.example.com/api/:v/mutate",
            "http://localhost:*/push",
        ]);
        assert!(c.allows("https://api.example.com/mutate"));
        assert!(
            c.allows("https://api.example.com/mutate?x=1#h"),
            "search and hash are ignored"
        );
        assert!(!c.allows("https://api.example.com/mutate/more"));
        assert!(!c.allows("http://api.example.com/mutate"));
        assert!(c.allows("https://pr-12.preview.example.com/api/v2/mutate"));
        assert!(!c.allows("https://evil.com/api/v2/mutate"));
        assert!(c.allows("http://localhost:3000/push"));
        assert!(!c.allows("not a url"));
        assert!(
            ApiConfig::new(
                "ZERO_QUERY_URL",
                vec!["https://a/(".into()],
                None,
                false,
                &[],
                &[]
            )
            .is_err()
        );
    }

    #[test]
    fn urls() {
        let c = cfg(&["http://api/mutate"]);
        assert_eq!(
            resolve_url(&c, None, "zero_0", "zero").unwrap(),
            "http://api/mutate?schema=zero_0&appID=zero"
        );
        assert_eq!(
            resolve_url(&c, Some("http://api/mutate?x=1"), "zero_0", "zero").unwrap(),
            "http://api/mutate?x=1&schema=zero_0&appID=zero"
        );
        let e = resolve_url(&c, Some("http://evil/mutate"), "zero_0", "zero").unwrap_err();
        assert_eq!(
            e.message,
            "URL \"http://evil/mutate\" is not allowed by the ZERO_MUTATE_URL configuration"
        );
        assert_eq!(e.reason, "internal");
        assert!(resolve_url(&c, Some("http://api/mutate?schema=x"), "zero_0", "zero").is_err());
    }

    #[test]
    fn header_filter_and_backoff() {
        let h: BTreeMap<String, String> = [
            ("X-Tenant".to_string(), "t".to_string()),
            ("X-Other".into(), "o".into()),
        ]
        .into();
        assert_eq!(
            filter_headers(&h, &["x-tenant".to_string()]),
            vec![("X-Tenant".to_string(), "t".to_string())]
        );
        assert!(filter_headers(&h, &[]).is_empty());
        for a in 1..5 {
            let d = backoff(a).as_millis() as u64;
            let base = 100u64 << (a - 1);
            assert!(
                d >= base.min(1000) && d <= (base + 100).min(1000),
                "{a}: {d}"
            );
        }
    }
}
