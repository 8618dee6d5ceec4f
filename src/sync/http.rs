//! HTTP routes on `ZERO_PORT` and the WebSocket connection loop (protocol §1).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::extract::ws::{CloseFrame, Message, WebSocket, WebSocketUpgrade};
use axum::http::{HeaderMap, StatusCode, Uri, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use base64::Engine as _;
use futures::{SinkExt, StreamExt};
use subtle::ConstantTimeEq;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use super::SyncShared;
use super::connect::{self, ConnectParams, HandshakeError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use super::protocol::{ConnectedBody, Downstream, ErrorBody, ErrorKind, Upstream};
use super::view_syncer::{Connect, GroupCmd, Outbound};

/// Close code for handshake errors (`PROTOCOL_ERROR`).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// A pong is sent when nothing else went downstream for this long.
const IDLE_PONG: Duration = Duration::from_secs(6);

pub(crate) fn router(shared: Arc<SyncShared>) -> Router {
    Router::new()
        .route("/", get(ok))
        .route("/keepalive", get(ok))
        .route("/statz", get(statz))
        .fallback(websocket)
        .with_state(shared)
}

async fn ok() -> &'static str {
    "OK"
}

/// Whether the request carries the admin password (HTTP Basic, any user name), compared in
/// constant time. With no password configured, only development mode is let in.
fn admin_allowed(shared: &SyncShared, headers: &HeaderMap) -> bool {
    let Some(expected) = shared.admin_password.as_deref() else {
        return shared.development;
    };
    let given = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| {
            let (scheme, rest) = v.split_once(' ')?;
            scheme.eq_ignore_ascii_case("basic").then_some(rest.trim())
        })
        .and_then(|b64| base64::engine::general_purpose::STANDARD.decode(b64).ok())
        .and_then(|bytes| String::from_utf8(bytes).ok())
        .and_then(|s| s.split_once(':').map(|(_, p)| p.to_string()));
    match given {
        Some(p) => bool::from(p.as_bytes().ct_eq(expected.as_bytes())),
        None => false,
    }
}

async fn statz(State(shared): State<Arc<SyncShared>>, headers: HeaderMap) -> Response {
    if !admin_allowed(&shared, &headers) {
        return (
            StatusCode::UNAUTHORIZED,
            [(
                header::WWW_AUTHENTICATE,
                "Basic realm=\"Statz Protected Area\"",
            )],
            "Unauthorized",
        )
            .into_response();
    }
    let body = serde_json::json!({
        "replica": {"watermark": *shared.watermarks.borrow()},
        "sync": {
            "clientGroups": shared.groups(),
            "connections": shared.connections.load(std::sync::atomic::Ordering::Relaxed),
        },
        "engine": {
            "queries": shared.engine.stats.queries.load(std::sync::atomic::Ordering::Relaxed),
            "shapes": shared.engine.stats.shapes.load(std::sync::atomic::Ordering::Relaxed),
            "subscriptions": shared.engine.stats.subscriptions.load(std::sync::atomic::Ordering::Relaxed),
        },
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// Splits a query string into decoded pairs (`+` is a space, as in URLSearchParams).
fn parse_query(q: Option<&str>) -> HashMap<String, String> {
    let mut out = HashMap::new();
    for pair in q.unwrap_or_default().split('&').filter(|p| !p.is_empty()) {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        let dec = |s: &str| connect::percent_decode(&s.replace('+', " "));
        if let (Some(k), Some(v)) = (dec(k), dec(v)) {
            out.entry(k).or_insert(v);
        }
    }
    out
}

async fn websocket(
    State(shared): State<Arc<SyncShared>>,
    uri: Uri,
    headers: HeaderMap,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    let Ok(ws) = ws else {
        return (StatusCode::NOT_FOUND, "Not Found").into_response();
    };
    let protocol = headers
        .get(header::SEC_WEBSOCKET_PROTOCOL)
        .and_then(|v| v.to_str().ok())
        .map(str::to_string);
    let params = connect::parse(uri.path(), &parse_query(uri.query()), protocol.as_deref());
    let mut ws = ws
        // Oversize messages are answered with InvalidMessage by the loop; the transport limit
        // is a backstop for frames far beyond that.
        .max_message_size(shared.max_payload_bytes.saturating_mul(2).max(1 << 20))
        .max_frame_size(shared.max_payload_bytes.saturating_mul(2).max(1 << 20));
    if let Some(p) = protocol {
        // Echo the client's single subprotocol, as the `ws` library does.
        ws = ws.protocols([p]);
    }
    ws.on_upgrade(move |socket| connection(shared, socket, params))
}

fn close_frame(code: u16, reason: &str) -> Message {
    let mut r = reason.to_string();
    if r.len() > 123 {
        let mut cut = 123;
        while !r.is_char_boundary(cut) {
            cut -= 1;
        }
        r.truncate(cut);
    }
    Message::Close(Some(CloseFrame {
        code,
        reason: r.into(),
    }))
}

fn text(m: &Downstream) -> Message {
    Message::Text(m.to_text().into())
}

async fn connection(
    shared: Arc<SyncShared>,
    mut socket: WebSocket,
    params: Result<ConnectParams, HandshakeError>,
) {
    let params = match params {
        Ok(p) => p,
        Err(e) => {
            debug!(error = %e, "handshake rejected");
            let _ = socket.send(close_frame(CLOSE_PROTOCOL_ERROR, &e.0)).await;
            return;
        }
    };
    if !(MIN_PROTOCOL_VERSION..=PROTOCOL_VERSION).contains(&params.protocol_version) {
        let e = ErrorBody::new(
            ErrorKind::VersionNotSupported,
            format!(
                "server is at sync protocol v{PROTOCOL_VERSION} and does not support v{}",
                params.protocol_version
            ),
        );
        let _ = socket.send(text(&Downstream::Error(e))).await;
        let _ = socket.send(Message::Close(None)).await;
        return;
    }
    if params.auth_token.is_some() && params.user_id.is_none() {
        let e = ErrorBody::new(
            ErrorKind::Unauthorized,
            "Authenticated connections require a userID",
        );
        let _ = socket.send(text(&Downstream::Error(e))).await;
        let _ = socket.send(close_frame(3000, "Unauthorized")).await;
        return;
    }
    let connected = Downstream::Connected(ConnectedBody {
        wsid: params.wsid.clone(),
        timestamp: crate::replica::now_ms(),
    });
    if socket.send(text(&connected)).await.is_err() {
        return;
    }
    info!(client_group = %params.client_group_id, client = %params.client_id, wsid = %params.wsid, "client connected");
    shared.connection_opened();
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Outbound>();
    let group = params.client_group_id.clone();
    let client_id = params.client_id.clone();
    let wsid = params.wsid.clone();
    let conn_id = shared.next_conn_id();
    shared.dispatch(
        &group,
        GroupCmd::Connect(Connect {
            client_id: client_id.clone(),
            wsid: wsid.clone(),
            conn_id,
            base_cookie: params.base_cookie.clone(),
            auth: params.auth_token.clone(),
            out: out_tx.clone(),
        }),
    );
    let push_url = params
        .init_connection
        .as_ref()
        .and_then(|i| i.user_push_url.clone());
    if let Some(init) = params.init_connection {
        shared.dispatch(
            &group,
            GroupCmd::Message {
                client_id: client_id.clone(),
                conn_id,
                msg: Box::new(Upstream::InitConnection(init)),
            },
        );
    }
    let (sink, stream) = socket.split();
    let writer = write_loop(sink, out_rx);
    let pusher = Pusher {
        shared: shared.clone(),
        group: group.clone(),
        client_id: client_id.clone(),
        url: push_url,
        auth: params.auth_token.clone(),
        queue: None,
        out: out_tx.clone(),
    };
    let reader = read_loop(&shared, stream, &out_tx, pusher, conn_id);
    let mut closing = shared.closing.subscribe();
    tokio::pin!(writer);
    tokio::select! {
        _ = &mut writer => {}
        _ = reader => {}
        _ = async { drop(closing.wait_for(|c| *c).await) } => {
            // The writer owns the sink; it sends the close frame.
            let _ = out_tx.send(Outbound::Close(None));
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
        }
    }
    shared.dispatch(
        &group,
        GroupCmd::Disconnect {
            client_id: client_id.clone(),
            conn_id,
        },
    );
    shared.connection_closed();
    info!(client_group = %group, client = %client_id, %wsid, "client disconnected");
}

async fn write_loop(
    mut sink: futures::stream::SplitSink<WebSocket, Message>,
    mut rx: mpsc::UnboundedReceiver<Outbound>,
) {
    loop {
        let next = tokio::time::timeout(IDLE_PONG, rx.recv()).await;
        let m = match next {
            Err(_) => Outbound::Msg(Downstream::Pong),
            Ok(None) => return,
            Ok(Some(m)) => m,
        };
        match m {
            Outbound::Msg(m) => {
                if sink.send(text(&m)).await.is_err() {
                    return;
                }
            }
            Outbound::Close(e) => {
                if let Some(e) = e {
                    let _ = sink.send(text(&e)).await;
                }
                let _ = sink.send(Message::Close(None)).await;
                // Give the client a moment to answer the close handshake.
                let _ = tokio::time::timeout(Duration::from_secs(1), sink.flush()).await;
                return;
            }
        }
    }
}

/// Forwards a connection's pushes, in order, to the API server (protocol §8).
struct Pusher {
    shared: Arc<SyncShared>,
    group: String,
    client_id: String,
    url: Option<String>,
    auth: Option<String>,
    queue: Option<mpsc::UnboundedSender<serde_json::Value>>,
    out: mpsc::UnboundedSender<Outbound>,
}

impl Pusher {
    fn fail(&self, kind: ErrorKind, message: &str) {
        let _ = self
            .out
            .send(Outbound::Close(Some(Downstream::Error(ErrorBody::new(
                kind, message,
            )))));
    }

    /// Queues one push (the body as received); `false` when the connection must close.
    fn push(&mut self, body: serde_json::Value) -> bool {
        if body["clientGroupID"].as_str() != Some(self.group.as_str()) {
            self.fail(
                ErrorKind::InvalidPush,
                "clientGroupID in mutation does not match the connection",
            );
            return false;
        }
        let crud = body["mutations"]
            .as_array()
            .is_some_and(|ms| ms.iter().any(|m| m["type"] == "crud"));
        if crud {
            self.fail(ErrorKind::InvalidPush, "CRUD mutations are not supported");
            return false;
        }
        let Some(endpoint) = self.shared.mutate_endpoint.clone() else {
            self.fail(
                ErrorKind::InvalidPush,
                "A ZERO_MUTATE_URL must be set in order to process custom mutations.",
            );
            return false;
        };
        let queue = self.queue.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<serde_json::Value>();
            let url = self.url.clone();
            let auth = self.auth.clone();
            let out = self.out.clone();
            let client = self.client_id.clone();
            tokio::spawn(async move {
                while let Some(push) = rx.recv().await {
                    if let Err(e) = endpoint.push(url.as_deref(), auth.as_deref(), &push).await {
                        warn!(%client, error = %e, "push failed");
                        let _ = out.send(Outbound::Close(Some(Downstream::ErrorJson(e))));
                        return;
                    }
                }
            });
            tx
        });
        let _ = queue.send(body);
        true
    }

    /// Asks the API server to delete mutation results the client has processed.
    fn cleanup(&self, client_id: &str, up_to: f64) {
        let Some(endpoint) = self.shared.mutate_endpoint.clone() else {
            return;
        };
        let now = crate::replica::now_ms();
        let body = serde_json::json!({
            "clientGroupID": self.group,
            "mutations": [{
                "type": "custom", "id": 0, "clientID": client_id, "name": "_zero_cleanupResults",
                "args": [{"type": "single", "clientGroupID": self.group, "clientID": client_id,
                          "upToMutationID": up_to}],
                "timestamp": now,
            }],
            "pushVersion": 1,
            "timestamp": now,
            "requestID": format!("cleanup-{}-{client_id}-{up_to}", self.group),
        });
        let (url, auth) = (self.url.clone(), self.auth.clone());
        tokio::spawn(async move {
            if let Err(e) = endpoint.push(url.as_deref(), auth.as_deref(), &body).await {
                debug!(error = %e, "mutation result cleanup failed");
            }
        });
    }
}

async fn read_loop(
    shared: &Arc<SyncShared>,
    mut stream: futures::stream::SplitStream<WebSocket>,
    out: &mpsc::UnboundedSender<Outbound>,
    mut pusher: Pusher,
    conn_id: u64,
) {
    let group = pusher.group.clone();
    let client_id = pusher.client_id.clone();
    let (group, client_id) = (group.as_str(), client_id.as_str());
    let invalid = |msg: String| {
        let _ = out.send(Outbound::Close(Some(Downstream::Error(ErrorBody::new(
            ErrorKind::InvalidMessage,
            msg,
        )))));
    };
    let mut closing = false;
    while let Some(m) = stream.next().await {
        let t = match m {
            Ok(Message::Text(t)) => t,
            Ok(Message::Binary(_)) => {
                invalid("binary messages are not supported".into());
                closing = true;
                break;
            }
            Ok(Message::Close(_)) => break,
            Ok(_) => continue,
            Err(e) => {
                warn!(client = %client_id, error = %e, "websocket read failed");
                invalid(format!("invalid message: {e}"));
                closing = true;
                break;
            }
        };
        if t.len() > shared.max_payload_bytes {
            invalid(format!(
                "message of {} bytes exceeds the maximum payload of {} bytes",
                t.len(),
                shared.max_payload_bytes
            ));
            closing = true;
            break;
        }
        match Upstream::parse(t.as_str()) {
            Ok(Upstream::Ping) => {
                let _ = out.send(Outbound::Msg(Downstream::Pong));
            }
            Ok(Upstream::Push(_)) => {
                // Forwarded exactly as received.
                let body = serde_json::from_str::<serde_json::Value>(t.as_str())
                    .map(|mut v| v[1].take())
                    .unwrap_or_default();
                if !pusher.push(body) {
                    closing = true;
                    break;
                }
            }
            Ok(Upstream::AckMutationResponses(m)) => pusher.cleanup(&m.client_id, m.id),
            Ok(msg) => {
                if let Upstream::InitConnection(i) = &msg
                    && i.user_push_url.is_some()
                {
                    pusher.url = i.user_push_url.clone();
                }
                shared.dispatch(
                    group,
                    GroupCmd::Message {
                        client_id: client_id.to_string(),
                        conn_id,
                        msg: Box::new(msg),
                    },
                )
            }
            Err(e) => {
                debug!(client = %client_id, error = %e, "invalid message");
                invalid(e.0);
                closing = true;
                break;
            }
        }
    }
    if closing {
        // Let the writer deliver the error and close before the connection ends.
        let _ = tokio::time::timeout(Duration::from_secs(2), out.closed()).await;
    }
}
