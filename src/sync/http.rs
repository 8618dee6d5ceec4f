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
use super::auth::{self, Auth};
use super::connect::{self, ConnectParams, HandshakeError, MIN_PROTOCOL_VERSION, PROTOCOL_VERSION};
use super::crud::CrudError;
use super::fetch::{CallContext, RequestInfo};
use super::protocol::{ConnectedBody, Downstream, ErrorBody, ErrorKind, Upstream};
use super::view_syncer::{Connect, GroupCmd, Outbound};

/// Close code for handshake errors (`PROTOCOL_ERROR`).
pub const CLOSE_PROTOCOL_ERROR: u16 = 1002;
/// Close code for connections whose auth is rejected.
pub const CLOSE_AUTH: u16 = 3000;
/// A pong is sent when nothing else went downstream for this long.
const IDLE_PONG: Duration = Duration::from_secs(6);

pub(crate) fn router(shared: Arc<SyncShared>) -> Router {
    Router::new()
        .route("/", get(ok))
        .route("/keepalive", get(keepalive))
        .route("/statz", get(statz))
        .route("/heapz", get(heapz))
        .fallback(websocket)
        .with_state(shared)
}

async fn ok() -> &'static str {
    "OK"
}

async fn keepalive() -> &'static str {
    crate::server::keepalive_hit();
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

/// The answer to an admin request without the right password, as zero-cache gives it.
fn unauthorized() -> Response {
    (
        StatusCode::UNAUTHORIZED,
        [(
            header::WWW_AUTHENTICATE,
            "Basic realm=\"Statz Protected Area\"",
        )],
        "Unauthorized",
    )
        .into_response()
}

async fn statz(State(shared): State<Arc<SyncShared>>, headers: HeaderMap) -> Response {
    if !admin_allowed(&shared, &headers) {
        return unauthorized();
    }
    let body = serde_json::json!({
        "replica": {"watermark": *shared.watermarks.borrow()},
        "sync": {
            "clientGroups": shared.groups(),
            "connections": shared.connections.load(std::sync::atomic::Ordering::Relaxed),
        },
        "cvr": {
            "pendingGroups": shared.cvr.pending(),
            "purgedGroups": shared.cvr.purged(),
        },
        "engine": {
            "queries": shared.engine.stats.queries.load(std::sync::atomic::Ordering::Relaxed),
            "shapes": shared.engine.stats.shapes.load(std::sync::atomic::Ordering::Relaxed),
            "instances": shared.engine.stats.instances.load(std::sync::atomic::Ordering::Relaxed),
            "rows": shared.engine.stats.rows.load(std::sync::atomic::Ordering::Relaxed),
            "engines": shared.engine.stats.engines.load(std::sync::atomic::Ordering::Relaxed),
            "subscriptions": shared.engine.stats.subscriptions.load(std::sync::atomic::Ordering::Relaxed),
            "version": *shared.engine.stats.version.lock().unwrap_or_else(|e| e.into_inner()),
        },
    });
    (
        [(header::CONTENT_TYPE, "application/json")],
        body.to_string(),
    )
        .into_response()
}

/// zero-cache's `/heapz` writes a V8 heap snapshot; this process has no JS heap, so it reports
/// its memory instead: resident set, peak, and the allocator's live and resident bytes (the
/// difference is fragmentation and retained pages).
async fn heapz(State(shared): State<Arc<SyncShared>>, headers: HeaderMap) -> Response {
    if !admin_allowed(&shared, &headers) {
        return unauthorized();
    }
    let (allocated, resident) = crate::procstat::heap_bytes();
    let body = serde_json::json!({
        "rssBytes": crate::procstat::rss_bytes(),
        "peakRssBytes": crate::procstat::peak_rss_bytes(),
        "heapAllocatedBytes": allocated,
        "heapResidentBytes": resident,
        "engineRows": shared.engine.stats.rows.load(std::sync::atomic::Ordering::Relaxed),
        "clientGroups": shared.groups(),
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

/// Initial WebSocket read buffer per connection.
const READ_BUFFER_BYTES: usize = 4096;

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
    let request = RequestInfo::from_headers(&headers);
    let mut ws = ws
        // Oversize messages are answered with InvalidMessage by the loop; the transport limit
        // is a backstop for frames far beyond that.
        .max_message_size(shared.max_payload_bytes.saturating_mul(2).max(1 << 20))
        .max_frame_size(shared.max_payload_bytes.saturating_mul(2).max(1 << 20))
        // Every connection holds its read buffer for life (128 KiB by default): with 10,000
        // clients that alone would be 1.3 GB. Client messages are small; larger ones grow it.
        .read_buffer_size(READ_BUFFER_BYTES);
    if let Some(p) = protocol {
        // Echo the client's single subprotocol, as the `ws` library does.
        ws = ws.protocols([p]);
    }
    ws.on_upgrade(move |socket| connection(shared, socket, params, request))
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
    request: RequestInfo,
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
    // Boxed: a JWKS fetch's state is large, and every connection's task would carry its size.
    let auth = match Box::pin(auth::resolve(
        shared.jwt.as_deref(),
        None,
        params.user_id.as_deref(),
        params.auth_token.as_deref(),
    ))
    .await
    {
        Ok(a) => a,
        Err(e) => {
            debug!(client = %params.client_id, error = %e.message, "connection auth rejected");
            let _ = socket.send(text(&Downstream::Error(e))).await;
            let _ = socket.send(close_frame(CLOSE_AUTH, "Unauthorized")).await;
            return;
        }
    };
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
        GroupCmd::Connect(Box::new(Connect {
            client_id: client_id.clone(),
            wsid: wsid.clone(),
            conn_id,
            base_cookie: params.base_cookie.clone(),
            auth: auth.clone(),
            user_id: params.user_id.clone(),
            request: request.clone(),
            protocol_version: params.protocol_version,
            out: out_tx.clone(),
        })),
    );
    let mut pusher = Pusher {
        shared: shared.clone(),
        group: group.clone(),
        client_id: client_id.clone(),
        user_id: params.user_id.clone(),
        auth,
        ctx: std::sync::Arc::new(CallContext {
            request,
            auth: None,
            ..Default::default()
        }),
        queue: None,
        out: out_tx.clone(),
    };
    pusher.set_auth(pusher.auth.clone());
    if let Some(init) = params.init_connection {
        pusher.init(&init);
        if let Some(d) = &init.deleted {
            pusher.bulk_cleanup(d);
        }
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
    // The writer is a task of its own: a poke then wakes only it. Polled together with the
    // reader in one task, every poke of every client also polled the reader (which locks the
    // socket's halves and tries a read) and the shutdown watch.
    let mut writer = tokio::spawn(write_loop(sink, out_rx));
    let reader = read_loop(&shared, stream, &out_tx, pusher, conn_id);
    let mut closing = shared.closing.subscribe();
    tokio::select! {
        _ = &mut writer => {}
        _ = reader => {}
        _ = async { drop(closing.wait_for(|c| *c).await) } => {
            // The writer owns the sink; it sends the close frame.
            let _ = out_tx.send(Outbound::Close(None));
            let _ = tokio::time::timeout(Duration::from_secs(2), &mut writer).await;
        }
    }
    // When the reader ended first, the socket is done: drop the writer as before.
    writer.abort();
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
    // One timer for the connection's life, moved only when it fires: a timeout per message
    // put every poke of every client through the timer wheel twice.
    let idle = tokio::time::sleep(IDLE_PONG);
    tokio::pin!(idle);
    let mut last = std::time::Instant::now();
    loop {
        let m = tokio::select! {
            m = rx.recv() => match m {
                None => return,
                Some(m) => m,
            },
            _ = &mut idle => {
                let quiet = last.elapsed();
                if quiet < IDLE_PONG {
                    idle.as_mut().reset(tokio::time::Instant::now() + (IDLE_PONG - quiet));
                    continue;
                }
                idle.as_mut().reset(tokio::time::Instant::now() + IDLE_PONG);
                Outbound::Msg(Downstream::Pong)
            }
        };
        last = std::time::Instant::now();
        match m {
            m @ (Outbound::Msg(_) | Outbound::Frames(_)) => {
                // A poke is several messages: write what is queued, then flush once.
                if !feed(&mut sink, m).await {
                    return;
                }
                let mut close = None;
                while let Ok(next) = rx.try_recv() {
                    match next {
                        c @ Outbound::Close(_) => {
                            close = Some(c);
                            break;
                        }
                        m => {
                            if !feed(&mut sink, m).await {
                                return;
                            }
                        }
                    }
                }
                if sink.flush().await.is_err() {
                    return;
                }
                if let Some(Outbound::Close(e)) = close {
                    close_with(&mut sink, e).await;
                    return;
                }
            }
            Outbound::Close(e) => {
                close_with(&mut sink, e).await;
                return;
            }
        }
    }
}

/// Queues a message's frames on the socket without flushing; false when the socket failed.
async fn feed(sink: &mut futures::stream::SplitSink<WebSocket, Message>, m: Outbound) -> bool {
    match m {
        Outbound::Msg(m) => sink.feed(text(&m)).await.is_ok(),
        Outbound::Frames(frames) => {
            for f in frames {
                if sink.feed(Message::Text(f.into())).await.is_err() {
                    return false;
                }
            }
            true
        }
        Outbound::Close(_) => true,
    }
}

/// Sends the error (if any) and the close frame.
async fn close_with(
    sink: &mut futures::stream::SplitSink<WebSocket, Message>,
    e: Option<Downstream>,
) {
    // Auth rejections close with 3000, like the handshake's (protocol §18).
    let auth = matches!(
        &e,
        Some(Downstream::Error(b))
            if matches!(b.kind, ErrorKind::Unauthorized | ErrorKind::AuthInvalidated)
    );
    if let Some(e) = e {
        let _ = sink.send(text(&e)).await;
    }
    let close = if auth {
        close_frame(CLOSE_AUTH, "Unauthorized")
    } else {
        Message::Close(None)
    };
    let _ = sink.send(close).await;
    // Give the client a moment to answer the close handshake.
    let _ = tokio::time::timeout(Duration::from_secs(1), sink.flush()).await;
}

/// A queued push with the call context it was received under.
struct Queued {
    push: serde_json::Value,
    ctx: std::sync::Arc<CallContext>,
    crud: bool,
    auth_data: Option<serde_json::Value>,
}

/// Forwards a connection's pushes, in order, to the API server (protocol §8), or runs its CRUD
/// mutations (§8.5).
struct Pusher {
    shared: Arc<SyncShared>,
    group: String,
    client_id: String,
    user_id: Option<String>,
    auth: Option<Auth>,
    /// URL, headers and token of this connection's calls; replaced (not mutated) when they
    /// change, so that pushes queued under one context are merged only with each other.
    ctx: std::sync::Arc<CallContext>,
    queue: Option<mpsc::UnboundedSender<Queued>>,
    out: mpsc::UnboundedSender<Outbound>,
}

/// Merges consecutive custom pushes received under the same context (one request instead of
/// many when the API server is slower than the client).
fn merge(batch: Vec<Queued>) -> Vec<Queued> {
    let mut out: Vec<Queued> = Vec::new();
    for q in batch {
        if let Some(last) = out.last_mut()
            && !q.crud
            && !last.crud
            && std::sync::Arc::ptr_eq(&last.ctx, &q.ctx)
            && last.push["pushVersion"] == q.push["pushVersion"]
            && last.push["schemaVersion"] == q.push["schemaVersion"]
            && let (Some(into), Some(more)) = (
                last.push["mutations"].as_array_mut().map(std::mem::take),
                q.push["mutations"].as_array().cloned(),
            )
        {
            let mut all = into;
            all.extend(more);
            last.push["mutations"] = serde_json::Value::Array(all);
            continue;
        }
        out.push(q);
    }
    out
}

impl Pusher {
    fn fail(&self, kind: ErrorKind, message: &str) {
        let _ = self
            .out
            .send(Outbound::Close(Some(Downstream::Error(ErrorBody::new(
                kind, message,
            )))));
    }

    /// Takes `userPushURL` / `userPushHeaders` from an initConnection.
    fn init(&mut self, init: &super::protocol::InitConnectionBody) {
        let mut ctx = (*self.ctx).clone();
        if let Some(u) = &init.user_push_url {
            ctx.url = Some(u.clone());
        }
        if let Some(h) = &init.user_push_headers {
            ctx.client_headers = h.clone();
        }
        self.ctx = std::sync::Arc::new(ctx);
    }

    fn set_auth(&mut self, auth: Option<Auth>) {
        let mut ctx = (*self.ctx).clone();
        ctx.auth = auth.as_ref().map(|a| a.raw().to_string());
        self.ctx = std::sync::Arc::new(ctx);
        self.auth = auth;
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
        if crud && self.shared.crud.is_none() {
            self.fail(
                ErrorKind::InvalidPush,
                "CRUD mutations are not enabled (ZERO_ENABLE_CRUD_MUTATIONS)",
            );
            return false;
        }
        if !crud && self.shared.mutate_endpoint.is_none() {
            self.fail(
                ErrorKind::InvalidPush,
                "A ZERO_MUTATE_URL must be set in order to process custom mutations.",
            );
            return false;
        }
        let queue = self.queue.get_or_insert_with(|| {
            let (tx, mut rx) = mpsc::unbounded_channel::<Queued>();
            let shared = self.shared.clone();
            let out = self.out.clone();
            let client = self.client_id.clone();
            let group = self.group.clone();
            let user_id = self.user_id.clone();
            let user = self
                .user_id
                .clone()
                .unwrap_or_else(|| format!("cg:{group}"));
            tokio::spawn(async move {
                while let Some(first) = rx.recv().await {
                    let mut batch = vec![first];
                    while let Ok(more) = rx.try_recv() {
                        batch.push(more);
                    }
                    for q in merge(batch) {
                        if q.crud {
                            let Some(crud) = shared.crud.clone() else {
                                return;
                            };
                            match crud
                                .push(&group, &user, q.auth_data.as_ref(), &q.push)
                                .await
                            {
                                Ok(()) => {}
                                Err(CrudError::NonFatal(e)) => {
                                    warn!(%client, error = %e.message, "CRUD mutation failed");
                                    let _ = out.send(Outbound::Msg(Downstream::Error(e)));
                                }
                                Err(CrudError::Fatal(e)) => {
                                    warn!(%client, error = %e.message, "CRUD push rejected");
                                    let _ = out.send(Outbound::Close(Some(Downstream::Error(e))));
                                    return;
                                }
                            }
                            continue;
                        }
                        let Some(endpoint) = shared.mutate_endpoint.clone() else {
                            return;
                        };
                        match endpoint.push(&q.ctx, &q.push).await {
                            Err(e) => {
                                warn!(%client, error = %e.body, "push failed");
                                let _ = out.send(Outbound::Close(Some(Downstream::ErrorJson(e.body))));
                                return;
                            }
                            // The API server names the user it validated: it must be the
                            // connection's.
                            Ok(p) => {
                                if let Some(validated) = p.user_id
                                    && validated.as_deref() != user_id.as_deref()
                                {
                                    warn!(%client, ?validated, "API server validated another user");
                                    let _ = out.send(Outbound::Close(Some(Downstream::Error(
                                        ErrorBody::new(
                                            ErrorKind::Unauthorized,
                                            "Connection userID does not match validated server userID.",
                                        ),
                                    ))));
                                    return;
                                }
                            }
                        }
                    }
                }
            });
            tx
        });
        let _ = queue.send(Queued {
            push: body,
            ctx: self.ctx.clone(),
            crud,
            auth_data: self.auth.as_ref().and_then(|a| a.claims().cloned()),
        });
        true
    }

    /// Deletes the mutation results of deleted clients.
    fn bulk_cleanup(&self, d: &super::protocol::DeletedClients) {
        let ids: Vec<&String> = d
            .client_ids
            .iter()
            .flatten()
            .filter(|c| **c != self.client_id)
            .collect();
        if let Some(first) = ids.first() {
            self.cleanup(
                first,
                serde_json::json!({"type": "bulk", "clientGroupID": self.group, "clientIDs": ids}),
            );
        }
    }

    /// Asks the API server to delete mutation results (fire and forget).
    fn cleanup(&self, client_id: &str, args: serde_json::Value) {
        let Some(endpoint) = self.shared.mutate_endpoint.clone() else {
            return;
        };
        let (ctx, group, client_id) = (self.ctx.clone(), self.group.clone(), client_id.to_string());
        tokio::spawn(async move { endpoint.cleanup(&ctx, &group, &client_id, args).await });
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
            Ok(Upstream::AckMutationResponses(m)) => pusher.cleanup(
                &m.client_id,
                serde_json::json!({"type": "single", "clientGroupID": group,
                    "clientID": m.client_id, "upToMutationID": m.id}),
            ),
            Ok(Upstream::UpdateAuth(a)) => {
                match Box::pin(auth::resolve(
                    shared.jwt.as_deref(),
                    pusher.auth.as_ref(),
                    pusher.user_id.as_deref(),
                    Some(&a.auth),
                ))
                .await
                {
                    Ok(next) => {
                        if next != pusher.auth {
                            pusher.set_auth(next.clone());
                            shared.dispatch(
                                group,
                                GroupCmd::Auth {
                                    client_id: client_id.to_string(),
                                    conn_id,
                                    auth: next,
                                },
                            );
                        }
                    }
                    Err(e) => {
                        debug!(client = %client_id, error = %e.message, "updateAuth rejected");
                        let _ = out.send(Outbound::Close(Some(Downstream::Error(e))));
                        closing = true;
                        break;
                    }
                }
            }
            Ok(msg) => {
                if let Upstream::InitConnection(i) = &msg {
                    pusher.init(i);
                    if let Some(d) = &i.deleted {
                        pusher.bulk_cleanup(d);
                    }
                }
                if let Upstream::DeleteClients(d) = &msg {
                    pusher.bulk_cleanup(d);
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
