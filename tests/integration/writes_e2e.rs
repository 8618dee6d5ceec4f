//! Writes end to end: the unmodified `@rocicorp/zero` 1.9.0 client (Node 22) pushing custom
//! mutations through this server to a real API server built on `@rocicorp/zero/server`
//! (`handleMutateRequest` with the postgres.js adapter it ships), and legacy CRUD mutations
//! that this server runs itself.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde_json::{Value as Json, json};
use tokio::io::AsyncWriteExt;
use tokio::process::{Child, ChildStdin};

use crate::support::{TestDb, test_db};
use crate::sync_util::{Server, allow_all, spawn_node, start_server_with};

/// A Node process speaking JSON lines.
pub(crate) struct NodeProc {
    child: Child,
    stdin: Option<ChildStdin>,
    lines: tokio::sync::mpsc::UnboundedReceiver<Json>,
    /// Every line seen so far.
    pub(crate) seen: Arc<Mutex<Vec<Json>>>,
}

impl NodeProc {
    pub(crate) fn start(script: &str, args: &[String]) -> NodeProc {
        let (mut child, mut reader) = spawn_node(script, args);
        let stdin = child.stdin.take();
        let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let seen2 = seen.clone();
        tokio::spawn(async move {
            while let Ok(Some(l)) = reader.next_line().await {
                let Ok(v) = serde_json::from_str::<Json>(&l) else {
                    continue;
                };
                seen2.lock().unwrap().push(v.clone());
                let _ = tx.send(v);
            }
        });
        NodeProc {
            child,
            stdin,
            lines: rx,
            seen,
        }
    }

    pub(crate) async fn send(&mut self, v: Json) {
        let s = self.stdin.as_mut().expect("stdin");
        s.write_all(format!("{v}\n").as_bytes())
            .await
            .expect("write");
        s.flush().await.expect("flush");
    }

    /// The next line satisfying `pred` (within `secs`), skipping others.
    pub(crate) async fn wait(
        &mut self,
        secs: u64,
        what: &str,
        mut pred: impl FnMut(&Json) -> bool,
    ) -> Json {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        let mut last = Json::Null;
        loop {
            match tokio::time::timeout_at(deadline, self.lines.recv()).await {
                Err(_) => panic!("timed out waiting for {what}; last line: {last}"),
                Ok(None) => panic!("node process ended while waiting for {what}; last: {last}"),
                Ok(Some(v)) => {
                    if pred(&v) {
                        return v;
                    }
                    last = v;
                }
            }
        }
    }

    /// Waits until the latest line with a `view` satisfies `pred` (whenever it arrived).
    pub(crate) async fn wait_view(&mut self, secs: u64, what: &str, pred: impl Fn(&Json) -> bool) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
        loop {
            let last = self
                .seen
                .lock()
                .unwrap()
                .iter()
                .rev()
                .find(|v| v.get("view").is_some())
                .cloned();
            if last.as_ref().is_some_and(&pred) {
                return;
            }
            if tokio::time::Instant::now() > deadline {
                panic!("timed out waiting for {what}; last view: {last:?}");
            }
            let _ = tokio::time::timeout(Duration::from_millis(50), self.lines.recv()).await;
        }
    }

    pub(crate) async fn stop(mut self) {
        drop(self.stdin.take());
        let _ = tokio::time::timeout(Duration::from_secs(5), self.child.wait()).await;
        let _ = self.child.kill().await;
    }
}

/// The API server process.
pub(crate) struct ApiServer {
    pub(crate) proc: NodeProc,
    pub(crate) port: u16,
}

impl ApiServer {
    pub(crate) async fn start(db: &TestDb) -> ApiServer {
        let mut proc = NodeProc::start("api-server.mjs", std::slice::from_ref(&db.uri));
        let p = proc
            .wait(20, "api server port", |v| v["port"].is_u64())
            .await;
        ApiServer {
            port: p["port"].as_u64().unwrap() as u16,
            proc,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("http://127.0.0.1:{}/mutate", self.port)
    }

    pub(crate) async fn mode(&self, mode: &str) {
        let r = reqwest::Client::new()
            .post(format!("http://127.0.0.1:{}/control", self.port))
            .body(json!({ "mode": mode }).to_string())
            .send()
            .await
            .expect("control");
        assert!(r.status().is_success());
    }

    /// Requests to /mutate recorded so far.
    pub(crate) fn requests(&self) -> Vec<Json> {
        self.proc
            .seen
            .lock()
            .unwrap()
            .iter()
            .filter(|v| v["path"].as_str().is_some_and(|p| p.ends_with("/mutate")))
            .cloned()
            .collect()
    }

    /// How many recorded requests carry a mutation with this id value `arg_id`.
    pub(crate) fn attempts_for(&self, arg_id: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| {
                r["body"]["mutations"]
                    .as_array()
                    .is_some_and(|ms| ms.iter().any(|m| m["args"][0]["id"] == arg_id))
            })
            .count()
    }
}

pub(crate) const ITEMS: &str =
    "CREATE TABLE item (id text PRIMARY KEY, title text NOT NULL, n float8 NOT NULL, owner text);";

async fn upstream_items(db: &TestDb) -> Vec<(String, String)> {
    db.client
        .query("SELECT id, title FROM item ORDER BY id", &[])
        .await
        .expect("items")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn view_has(v: &Json, id: &str, title: &str) -> bool {
    v["view"]
        .as_array()
        .is_some_and(|rows| rows.iter().any(|r| r["id"] == id && r["title"] == title))
}

async fn start(db: &TestDb, api: &ApiServer) -> Server {
    let url = api.url();
    let mut server = start_server_with(db, |o| {
        // The first entry is the default URL; the second, a URLPattern, allows per-tenant
        // paths on any port of 127.0.0.1 (for clients that name their push URL).
        o.mutate_urls = vec![url, "http://127.0.0.1:*/:tenant/mutate".into()];
        o.writes.mutate_forward_cookies = true;
        o.writes.mutate_allowed_client_headers = vec!["X-User-ID".into()];
        o.writes.mutate_allowed_request_headers = vec!["user-agent".into()];
    })
    .await;
    allow_all(db, &mut server, &["item"]).await;
    server
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_mutations_are_confirmed_rejected_and_retried() {
    let db = test_db().await;
    db.exec(ITEMS).await;
    db.exec("INSERT INTO item VALUES ('a0', 'seed', 0, NULL)")
        .await;
    let api = ApiServer::start(&db).await;
    let server = start(&db, &api).await;
    let opts = json!({"mutateHeaders": {"X-User-ID": "u1", "X-Secret": "no"}});
    let mut w = NodeProc::start(
        "writer.mjs",
        &[
            format!("http://{}", server.addr),
            "u1".into(),
            opts.to_string(),
        ],
    );
    w.wait(20, "hydrated view", |v| view_has(v, "a0", "seed"))
        .await;

    // Optimistic write, then server confirmation; the row is in Postgres.
    w.send(json!({"cmd": "create", "tag": "a1", "args": {"id": "a1", "title": "first", "n": 1}}))
        .await;
    w.wait(10, "optimistic a1", |v| view_has(v, "a1", "first"))
        .await;
    let r = w
        .wait(20, "a1 confirmed", |v| {
            v["tag"] == "a1" && v.get("server").is_some()
        })
        .await;
    assert_eq!(r["server"]["type"], "success", "{r}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(5);
    loop {
        let items = upstream_items(&db).await;
        if items.contains(&("a1".into(), "first".into())) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{items:?} {:?}",
            api.requests()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let req = api
        .requests()
        .into_iter()
        .find(|r| r["body"]["mutations"][0]["args"][0]["id"] == "a1")
        .unwrap();
    assert_eq!(req["search"], "?schema=zero_0&appID=zero");
    assert_eq!(
        req["headers"]["x-user-id"], "u1",
        "allowed client header forwarded"
    );
    assert!(
        req["headers"].get("x-secret").is_none(),
        "other client headers are not"
    );
    // reqwest sends no User-Agent of its own: this one is the client's upgrade request's.
    assert!(
        req["headers"]["user-agent"].is_string(),
        "allowed request header forwarded: {req}"
    );

    // An application error reaches the client; the optimistic change is rolled back and the
    // mutation result is cleaned up after the client acknowledged it.
    w.send(json!({"cmd": "setTitle", "tag": "r1", "args": {"id": "a1", "title": "reject"}}))
        .await;
    let r = w
        .wait(20, "r1 result", |v| {
            v["tag"] == "r1" && v.get("server").is_some()
        })
        .await;
    assert_eq!(r["server"]["type"], "error", "{r}");
    assert!(
        r["server"]["error"]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("title rejected"),
        "{r}"
    );
    w.wait_view(10, "rollback", |v| view_has(v, "a1", "first"))
        .await;
    assert!(
        upstream_items(&db)
            .await
            .contains(&("a1".into(), "first".into()))
    );
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !api
        .requests()
        .iter()
        .any(|r| r["body"]["mutations"][0]["name"] == "_zero_cleanupResults")
    {
        assert!(tokio::time::Instant::now() < deadline, "no cleanup call");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    // The API server fails (500, garbage, dropped connections): each push is retried (4
    // attempts for 5xx and network errors), then the client gets PushFailed (its `.server`
    // result is that error) and stops (the 1.9 client's "error" state). When the app
    // reconnects, the pending mutation is pushed again and lands.
    for (mode, id, message) in [
        (
            "500",
            "b1",
            "Fetch from API server returned non-OK status 500",
        ),
        ("garbage", "b2", "Failed to parse response from API server"),
        ("drop", "b3", "Fetch from API server threw error"),
    ] {
        api.mode(mode).await;
        w.send(json!({"cmd": "create", "tag": id, "args": {"id": id, "title": mode, "n": 2}}))
            .await;
        let r = w
            .wait(30, "push failure", |v| {
                v["tag"] == id && v.get("server").is_some()
            })
            .await;
        assert_eq!(r["server"]["type"], "error", "{mode}: {r}");
        assert!(
            r["server"]["error"]["message"]
                .as_str()
                .unwrap_or_default()
                .contains(message),
            "{mode}: {r}"
        );
        let want = if mode == "garbage" { 1 } else { 4 };
        assert!(
            api.attempts_for(id) >= want,
            "{mode}: {} attempts",
            api.attempts_for(id)
        );
        api.mode("ok").await;
        w.send(json!({"cmd": "connect", "tag": format!("reconnect-{id}")}))
            .await;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while !upstream_items(&db)
            .await
            .contains(&(id.into(), mode.into()))
        {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{mode}: not pushed again after recovery"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        w.wait_view(20, "row confirmed in the view", |v| view_has(v, id, mode))
            .await;
    }

    // A slow API server: pushes that arrive while one is in flight are merged into one request,
    // in order, and every mutation is confirmed.
    api.mode("slow").await;
    let ids: Vec<String> = (0..5).map(|i| format!("s{i}")).collect();
    for id in &ids {
        w.send(json!({"cmd": "create", "tag": id, "args": {"id": id, "title": "slow", "n": 3}}))
            .await;
    }
    for id in &ids {
        let r = w
            .wait(30, "slow confirmation", |v| {
                v["tag"] == id.as_str() && v.get("server").is_some()
            })
            .await;
        assert_eq!(r["server"]["type"], "success", "{r}");
    }
    let batches: Vec<Vec<String>> = api
        .requests()
        .iter()
        .map(|r| {
            r["body"]["mutations"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(|m| m["args"][0]["id"].as_str().map(str::to_string))
                .filter(|id| id.starts_with('s'))
                .collect::<Vec<String>>()
        })
        .filter(|b| !b.is_empty())
        .collect();
    assert!(
        batches.iter().any(|b| b.len() > 1),
        "no merged push: {batches:?}"
    );
    assert_eq!(batches.concat(), ids, "each mutation sent once, in order");
    w.stop().await;
    api.proc.stop().await;
    server.stop_sync().await.stop().await.expect("stop");
}

/// A push of one `item.create` mutation from `client` with mutation id `id`.
fn create_push(group: &str, client: &str, id: u64, item: &str) -> Json {
    json!(["push", {"clientGroupID": group, "mutations": [{"type": "custom", "id": id,
        "clientID": client, "name": "item.create",
        "args": [{"id": item, "title": "p", "n": id}], "timestamp": 1}],
        "pushVersion": 1, "timestamp": 1, "requestID": format!("r{id}")}])
}

fn item_schema() -> Json {
    json!({"tables": {"item": {"columns": {"id": {"type": "string"}, "title": {"type": "string"},
        "n": {"type": "number"}, "owner": {"type": "string"}}, "primaryKey": ["id"]}}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn duplicate_and_out_of_order_pushes() {
    use crate::sync_util::{ConnectOpts, connect, connect_with_headers, init};
    let db = test_db().await;
    db.exec(ITEMS).await;
    let api = ApiServer::start(&db).await;
    let server = start(&db, &api).await;
    // The client names its push URL (allowed by the pattern), and its upgrade request carries
    // a cookie and an origin: with ZERO_MUTATE_FORWARD_COOKIES both reach the API server.
    let mut init_msg = init(json!([]), Some(item_schema()));
    init_msg[1]["userPushURL"] =
        json!(format!("http://127.0.0.1:{}/t1/mutate?region=eu", api.port));
    let proto = zero_cache::sync::connect::encode_sec_protocol(Some(&init_msg), None);
    let mut c = connect_with_headers(
        server.addr,
        "/sync/v51/connect?clientID=x1&clientGroupID=gx&userID=anon&baseCookie=&ts=1&lmid=0&wsid=w1",
        Some(&proto),
        &[("Cookie", "session=abc"), ("Origin", "https://app.example")],
    )
    .await
    .ok();
    c.poke().await;
    c.send(create_push("gx", "x1", 1, "p1")).await;
    let pokes = c.pokes_until(|p| p.lmid("x1") == Some(1)).await;
    assert!(!pokes.is_empty());
    let req = api
        .requests()
        .into_iter()
        .find(|r| r["body"]["mutations"][0]["args"][0]["id"] == "p1")
        .expect("push forwarded");
    assert_eq!(req["path"], "/t1/mutate");
    assert_eq!(req["search"], "?region=eu&schema=zero_0&appID=zero");
    assert_eq!(req["headers"]["cookie"], "session=abc");
    assert_eq!(req["headers"]["origin"], "https://app.example");

    // A push URL outside the configured patterns is refused before any request is made.
    let mut bad_init = init(json!([]), Some(item_schema()));
    bad_init[1]["userPushURL"] = json!("http://127.0.0.1:9/elsewhere");
    let mut bad = connect(server.addr, ConnectOpts::new("y1", "gy", bad_init))
        .await
        .ok();
    bad.poke().await;
    bad.send(create_push("gy", "y1", 1, "never")).await;
    let e = bad.recv().await;
    assert_eq!(e[1]["kind"], "PushFailed", "{e}");
    assert_eq!(
        e[1]["message"],
        "URL \"http://127.0.0.1:9/elsewhere\" is not allowed by the ZERO_MUTATE_URL configuration"
    );
    assert_eq!(api.attempts_for("never"), 0);
    // Deleting other clients of the group deletes their mutation results (bulk cleanup).
    c.send(json!(["deleteClients", {"clientIDs": ["old1", "old2"]}]))
        .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let bulk = api.requests().into_iter().find(|r| {
            r["body"]["mutations"][0]["name"] == "_zero_cleanupResults"
                && r["body"]["mutations"][0]["args"][0]["type"] == "bulk"
        });
        if let Some(b) = bulk {
            let args = &b["body"]["mutations"][0]["args"][0];
            assert_eq!(args["clientGroupID"], "gx", "{b}");
            assert_eq!(args["clientIDs"], json!(["old1", "old2"]), "{b}");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "no bulk cleanup");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let m = c.recv().await;
    assert_eq!(m[0], "deleteClients", "{m}");

    // The same mutation again: already processed, nothing happens, the connection stays.
    c.send(create_push("gx", "x1", 1, "p1-again")).await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while api.attempts_for("p1-again") < 1 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    // Mutation 3 before 2: out of order, PushFailed from the server, connection closed.
    c.send(create_push("gx", "x1", 3, "p3")).await;
    let e = c.recv().await;
    assert_eq!(e[0], "error", "{e}");
    assert_eq!(e[1]["kind"], "PushFailed", "{e}");
    assert_eq!(e[1]["reason"], "oooMutation", "{e}");
    assert_eq!(e[1]["origin"], "server", "{e}");
    assert_eq!(
        e[1]["mutationIDs"],
        json!([{"clientID": "x1", "id": 3}]),
        "{e}"
    );
    let items = upstream_items(&db).await;
    assert_eq!(
        items,
        vec![("p1".to_string(), "p".to_string())],
        "only the first push wrote"
    );

    // The API server validates another user than the connection's: Unauthorized.
    let mut init_msg = init(json!([]), Some(item_schema()));
    init_msg[1]["userPushHeaders"] = json!({"X-User-ID": "mallory"});
    let mut m = connect(server.addr, ConnectOpts::new("z1", "gz", init_msg))
        .await
        .ok();
    m.poke().await;
    m.send(create_push("gz", "z1", 1, "z-item")).await;
    // A poke of the group's (empty) state may still come first.
    let e = loop {
        let msg = m.recv().await;
        if !msg[0].as_str().is_some_and(|k| k.starts_with("poke")) {
            break msg;
        }
    };
    assert_eq!(e[1]["kind"], "Unauthorized", "{e}");
    api.proc.stop().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn twenty_concurrent_writers_converge() {
    let db = test_db().await;
    db.exec(ITEMS).await;
    let api = ApiServer::start(&db).await;
    let server = start(&db, &api).await;
    let (clients, per) = (20usize, 5usize);
    let mut m = NodeProc::start(
        "multi.mjs",
        &[
            format!("http://{}", server.addr),
            clients.to_string(),
            per.to_string(),
            "2".into(),
            "cw".into(),
            "all".into(),
        ],
    );
    m.wait(60, "all clients ready", |v| v["ready"].is_u64())
        .await;
    let done = m
        .wait(90, "all mutations confirmed", |v| v["done"].is_u64())
        .await;
    assert_eq!(done["done"], clients * per);
    let views = m.wait(60, "views", |v| v["views"].is_array()).await;
    let rows: Vec<Json> = db
        .client
        .query(
            "SELECT id, title, n FROM item ORDER BY id COLLATE \"C\"",
            &[],
        )
        .await
        .unwrap()
        .iter()
        .map(|r| {
            json!([
                r.get::<_, String>(0),
                r.get::<_, String>(1),
                r.get::<_, f64>(2) as i64
            ])
        })
        .collect();
    assert_eq!(rows.len(), clients * per);
    for (i, v) in views["views"].as_array().unwrap().iter().enumerate() {
        assert_eq!(
            v.as_array().unwrap(),
            &rows,
            "client {i} differs from Postgres"
        );
    }
    m.stop().await;
    api.proc.stop().await;
    server.stop_sync().await.stop().await.expect("stop");
}
