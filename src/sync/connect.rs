//! The WebSocket handshake (protocol §1.1–1.3): the connect path, its query parameters and the
//! `Sec-WebSocket-Protocol` header that carries the auth token and, when it fits,
//! `initConnection`.

use std::collections::HashMap;

use base64::Engine as _;
use serde_json::Value as Json;

use super::protocol::{InitConnectionBody, Upstream};

/// Oldest protocol version served (`MIN_SERVER_SUPPORTED_SYNC_PROTOCOL`, never raised).
pub const MIN_PROTOCOL_VERSION: u32 = 30;
/// Newest protocol version served (1.9.0's `PROTOCOL_VERSION`).
pub const PROTOCOL_VERSION: u32 = 51;

/// A handshake that cannot proceed: the upgrade completes, then the socket closes with 1002
/// and this text (so that browsers do not see a hanging connection).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct HandshakeError(pub String);

/// What the connect URL and headers say.
#[derive(Debug, Clone, PartialEq)]
pub struct ConnectParams {
    /// Protocol version from the path.
    pub protocol_version: u32,
    /// The connecting client.
    pub client_id: String,
    /// Its client group.
    pub client_group_id: String,
    /// Logged-in user, if any.
    pub user_id: Option<String>,
    /// The client's last cookie (`None` for a fresh client).
    pub base_cookie: Option<String>,
    /// Client timestamp (informational).
    pub timestamp: i64,
    /// Last mutation id the client has seen (parsed, unused, as in 1.9).
    pub lmid: i64,
    /// Connection id, echoed in `connected`.
    pub wsid: String,
    /// Stable profile id.
    pub profile_id: Option<String>,
    /// Auth token from the subprotocol header.
    pub auth_token: Option<String>,
    /// `initConnection` carried in the header, if any.
    pub init_connection: Option<InitConnectionBody>,
}

/// Splits `(/base)/sync/v{N}/connect` into the protocol version; anything else is a
/// handshake error.
pub fn parse_path(path: &str) -> Result<u32, HandshakeError> {
    let segs: Vec<&str> = path.split('/').filter(|s| !s.is_empty()).collect();
    let tail = match segs.len() {
        3 => &segs[..],
        4 => &segs[1..],
        _ => return Err(HandshakeError(format!("Invalid URL: {path}"))),
    };
    let (worker, version, action) = (tail[0], tail[1], tail[2]);
    if worker != "sync" {
        return Err(HandshakeError(format!(
            "Invalid URL: unsupported worker {worker:?}"
        )));
    }
    if action != "connect" {
        return Err(HandshakeError(format!(
            "Invalid URL: unsupported action {action:?}"
        )));
    }
    let digits = version
        .strip_prefix('v')
        .filter(|d| !d.is_empty() && d.bytes().all(|b| b.is_ascii_digit()))
        .ok_or_else(|| HandshakeError(format!("Invalid URL: bad version {version:?}")))?;
    digits
        .parse()
        .map_err(|_| HandshakeError(format!("Invalid URL: bad version {version:?}")))
}

/// Parses the connect request: path, query parameters and subprotocol header.
pub fn parse(
    path: &str,
    query: &HashMap<String, String>,
    sec_protocol: Option<&str>,
) -> Result<ConnectParams, HandshakeError> {
    let protocol_version = parse_path(path)?;
    let required = |k: &str| -> Result<String, HandshakeError> {
        match query.get(k) {
            Some(v) if !v.is_empty() => Ok(v.clone()),
            _ => Err(HandshakeError(format!("Missing query parameter: {k}"))),
        }
    };
    let int = |k: &str| -> Result<i64, HandshakeError> {
        let v = required(k)?;
        parse_int_prefix(&v).ok_or_else(|| HandshakeError(format!("Invalid {k}: {v:?}")))
    };
    let client_id = required("clientID")?;
    let client_group_id = required("clientGroupID")?;
    let timestamp = int("ts")?;
    let lmid = int("lmid")?;
    let base_cookie = query.get("baseCookie").filter(|c| !c.is_empty()).cloned();
    let header = sec_protocol
        .ok_or_else(|| HandshakeError("Missing Sec-WebSocket-Protocol header".into()))?;
    let (auth_token, init_connection) = decode_sec_protocol(header)?;
    Ok(ConnectParams {
        protocol_version,
        client_id,
        client_group_id,
        user_id: query.get("userID").filter(|u| !u.is_empty()).cloned(),
        base_cookie,
        timestamp,
        lmid,
        wsid: query.get("wsid").cloned().unwrap_or_default(),
        profile_id: query.get("profileID").filter(|p| !p.is_empty()).cloned(),
        auth_token,
        init_connection,
    })
}

/// JavaScript `parseInt`: an optional sign and the leading digits (`"1127.04"` → 1127).
fn parse_int_prefix(s: &str) -> Option<i64> {
    let t = s.trim_start();
    let (neg, rest) = match t.strip_prefix('-') {
        Some(r) => (true, r),
        None => (false, t.strip_prefix('+').unwrap_or(t)),
    };
    let digits: String = rest.chars().take_while(char::is_ascii_digit).collect();
    let n: i64 = digits.parse().ok()?;
    Some(if neg { -n } else { n })
}

/// Decodes the subprotocol: URI-decode, base64, UTF-8, JSON
/// `{initConnectionMessage?: ["initConnection", body], authToken?: string}`.
pub fn decode_sec_protocol(
    header: &str,
) -> Result<(Option<String>, Option<InitConnectionBody>), HandshakeError> {
    let bad = |why: String| HandshakeError(format!("Invalid Sec-WebSocket-Protocol: {why}"));
    let b64 = percent_decode(header).ok_or_else(|| bad("bad percent-encoding".into()))?;
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64.trim())
        .map_err(|e| bad(e.to_string()))?;
    let json: Json = serde_json::from_slice(&bytes).map_err(|e| bad(e.to_string()))?;
    let Json::Object(obj) = json else {
        return Err(bad("not an object".into()));
    };
    let auth_token = match obj.get("authToken") {
        None | Some(Json::Null) => None,
        Some(Json::String(s)) => Some(s.clone()),
        Some(_) => return Err(bad("authToken is not a string".into())),
    };
    let init = match obj.get("initConnectionMessage") {
        None | Some(Json::Null) => None,
        Some(m) => match Upstream::parse(&m.to_string()) {
            Ok(Upstream::InitConnection(b)) => Some(b),
            Ok(_) => return Err(bad("initConnectionMessage is not initConnection".into())),
            Err(e) => return Err(bad(e.0)),
        },
    };
    Ok((auth_token, init))
}

/// Encodes a subprotocol the way the client does (for tests and tools).
pub fn encode_sec_protocol(init: Option<&Json>, auth_token: Option<&str>) -> String {
    let mut obj = serde_json::Map::new();
    if let Some(i) = init {
        obj.insert("initConnectionMessage".into(), i.clone());
    }
    if let Some(t) = auth_token {
        obj.insert("authToken".into(), Json::String(t.into()));
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(Json::Object(obj).to_string());
    b64.replace('+', "%2B")
        .replace('/', "%2F")
        .replace('=', "%3D")
}

/// Decodes `%XX` escapes; `None` for bad escapes or non-UTF-8 results.
pub fn percent_decode(s: &str) -> Option<String> {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = std::str::from_utf8(b.get(i + 1..i + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn q(pairs: &[(&str, &str)]) -> HashMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn paths() {
        assert_eq!(parse_path("/sync/v51/connect"), Ok(51));
        assert_eq!(parse_path("/zero/sync/v30/connect"), Ok(30));
        assert!(parse_path("/a/b/sync/v51/connect").is_err());
        assert!(parse_path("/sync/vx/connect").is_err());
        assert!(parse_path("/mutate/v51/connect").is_err());
        assert!(parse_path("/sync/v51/pull").is_err());
    }

    #[test]
    fn recorded_handshake() {
        let header = "eyJpbml0Q29ubmVjdGlvbk1lc3NhZ2UiOlsiaW5pdENvbm5lY3Rpb24iLHsiZGVzaXJlZFF1ZXJpZXNQYXRjaCI6W119XX0%3D";
        let p = parse(
            "/sync/v51/connect",
            &q(&[
                ("clientID", "c"),
                ("clientGroupID", "g"),
                ("userID", "anon"),
                ("baseCookie", ""),
                ("ts", "1127.042001"),
                ("lmid", "0"),
                ("wsid", "w"),
            ]),
            Some(header),
        )
        .unwrap();
        assert_eq!(p.timestamp, 1127);
        assert_eq!(p.base_cookie, None);
        assert_eq!(p.init_connection.unwrap().desired_queries_patch, vec![]);
        let round = encode_sec_protocol(
            Some(&serde_json::json!(["initConnection", {"desiredQueriesPatch": []}])),
            Some("tok"),
        );
        let (tok, init) = decode_sec_protocol(&round).unwrap();
        assert_eq!(tok.as_deref(), Some("tok"));
        assert!(init.is_some());
    }

    #[test]
    fn missing_parameters() {
        let header = encode_sec_protocol(None, None);
        let base = [
            ("clientID", "c"),
            ("clientGroupID", "g"),
            ("ts", "1"),
            ("lmid", "0"),
        ];
        assert!(parse("/sync/v51/connect", &q(&base), Some(&header)).is_ok());
        assert!(parse("/sync/v51/connect", &q(&base), None).is_err());
        for skip in 0..base.len() {
            let mut v = base.to_vec();
            v.remove(skip);
            let e = parse("/sync/v51/connect", &q(&v), Some(&header)).unwrap_err();
            assert!(e.0.contains(base[skip].0), "{e}");
        }
        assert!(parse("/sync/v51/connect", &q(&base), Some("%%%")).is_err());
    }
}
