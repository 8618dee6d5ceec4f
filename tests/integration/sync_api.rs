//! Custom queries (`ZERO_QUERY_URL`), pushes (`ZERO_MUTATE_URL`) and query TTLs.

use axum::Json as AxumJson;
use axum::http::StatusCode;
use axum::routing::post;
use serde_json::{Value as Json, json};

use crate::support::test_db;
use crate::sync_util::{
    ConnectOpts, allow_all, connect, connect_idle, init, serve_api, start_server, start_server_with,
};

fn issue_schema() -> Json {
    json!({"tables": {"issue": {"columns": {
        "id": {"type": "string"}, "title": {"type": "string"}}, "primaryKey": ["id"]}}})
}

const ISSUES: &str = "CREATE TABLE issue (id text PRIMARY KEY, title text);
     INSERT INTO issue VALUES ('a', 'first'), ('b', 'second');";

/// `byId(id)` → the issue with that id; anything else → an app error.
pub(crate) async fn transform(AxumJson(body): AxumJson<Json>) -> AxumJson<Json> {
    assert_eq!(body[0], "transform");
    let queries: Vec<Json> = body[1]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|q| {
            if q["name"] == "byId" {
                json!({"id": q["id"], "name": q["name"], "ast": {"table": "issue",
                    "where": {"type": "simple", "op": "=", "left": {"type": "column", "name": "id"},
                              "right": {"type": "literal", "value": q["args"][0]}}}})
            } else {
                json!({"error": "app", "id": q["id"], "name": q["name"], "message": "no such query"})
            }
        })
        .collect();
    AxumJson(json!({"kind": "QueryResponse", "queries": queries}))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn custom_queries_are_transformed_by_the_api_server() {
    let db = test_db().await;
    db.exec(ISSUES).await;
    let api = serve_api(axum::Router::new().route("/query", post(transform))).await;
    let server =
        start_server_with(&db, |o| o.query_urls = vec![format!("http://{api}/query")]).await;
    let puts = json!([
        {"op": "put", "hash": "cq1", "name": "byId", "args": ["a"]},
        {"op": "put", "hash": "cq2", "name": "nope", "args": []},
    ]);
    let mut c = connect(
        server.addr,
        ConnectOpts::new("c1", "g1", init(puts, Some(issue_schema()))),
    )
    .await
    .ok();
    let config = c.poke().await;
    assert_eq!(
        config.parts[0]["desiredQueriesPatches"]["c1"]
            .as_array()
            .map(Vec::len),
        Some(2)
    );
    let e = c.recv().await;
    assert_eq!(e[0], "transformError", "{e}");
    assert_eq!(e[1][0]["id"], "cq2");
    assert_eq!(e[1][0]["error"], "app");
    let p = c.poke().await;
    assert_eq!(
        p.all("gotQueriesPatch"),
        vec![json!({"op": "put", "hash": "cq1"})]
    );
    // Custom queries get no permission rules: the API server is trusted.
    assert_eq!(
        p.puts(),
        vec![("issue".to_string(), json!({"id": "a", "title": "first"}))]
    );
    c.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pushes_are_forwarded_and_failures_close_the_connection() {
    let db = test_db().await;
    db.exec(ISSUES).await;
    let push = |group: &str| {
        json!(["push", {"clientGroupID": group, "mutations": [{"type": "custom", "id": 1,
            "clientID": "c1", "name": "m", "args": [{}], "timestamp": 1}], "pushVersion": 1,
            "timestamp": 1, "requestID": "r1"}])
    };

    // No ZERO_MUTATE_URL.
    let server = start_server(&db).await;
    let mut c = connect_idle(server.addr, "c1", "g1", issue_schema()).await;
    c.send(push("g1")).await;
    c.expect_error("InvalidPush").await;
    let repl = server.stop_sync().await;
    repl.stop().await.expect("stop");

    // An API server that records pushes, and one that fails.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Json>();
    let ok = axum::Router::new()
        .route(
            "/mutate",
            post(move |AxumJson(b): AxumJson<Json>| {
                let tx = tx.clone();
                async move {
                    let _ = tx.send(b.clone());
                    AxumJson(json!({"kind": "MutateResponse", "mutations": [
                    {"id": {"id": 1, "clientID": "c1"}, "result": {}}]}))
                }
            }),
        )
        .route(
            "/broken",
            post(|| async { (StatusCode::INTERNAL_SERVER_ERROR, "database is down") }),
        );
    let api = serve_api(ok).await;
    let server = start_server_with(&db, |o| {
        o.mutate_urls = vec![
            format!("http://{api}/mutate"),
            format!("http://{api}/broken"),
        ]
    })
    .await;
    let mut c = connect_idle(server.addr, "c1", "g1", issue_schema()).await;
    c.send(push("g1")).await;
    let got = tokio::time::timeout(std::time::Duration::from_secs(10), rx.recv())
        .await
        .expect("push forwarded")
        .expect("body");
    assert_eq!(got, push("g1")[1], "forwarded as received");
    // Success sends nothing; the connection stays usable.
    c.send(json!(["ping", {}])).await;
    c.send(push("other-group")).await;
    c.expect_error("InvalidPush").await;

    let mut init_msg = init(json!([]), Some(issue_schema()));
    init_msg[1]["userPushURL"] = json!(format!("http://{api}/broken"));
    let mut c = connect(server.addr, ConnectOpts::new("c2", "g1", init_msg))
        .await
        .ok();
    c.poke().await;
    c.send(push("g1")).await;
    let e = c.recv().await;
    assert_eq!(e[0], "error");
    assert_eq!(e[1]["kind"], "PushFailed");
    assert_eq!(e[1]["reason"], "http");
    assert_eq!(e[1]["status"], 500);
    assert_eq!(e[1]["mutationIDs"], json!([{"id": 1, "clientID": "c1"}]));
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_queries_are_removed_when_their_ttl_expires() {
    let db = test_db().await;
    db.exec(ISSUES).await;
    let mut server = start_server(&db).await;
    allow_all(&db, &mut server, &["issue"]).await;
    let puts = json!([
        {"op": "put", "hash": "short", "ttl": 1000, "ast": {"table": "issue", "orderBy": [["id", "asc"]]}},
        {"op": "put", "hash": "keep", "ttl": 600000, "ast": {"table": "issue", "where":
            {"type": "simple", "op": "=", "left": {"type": "column", "name": "id"}, "right": {"type": "literal", "value": "a"}}}},
    ]);
    let mut c = connect(
        server.addr,
        ConnectOpts::new("c1", "g1", init(puts, Some(issue_schema()))),
    )
    .await
    .ok();
    c.poke().await;
    let p = c.poke().await;
    assert_eq!(p.puts().len(), 2);
    c.send(json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "del", "hash": "short"}, {"op": "del", "hash": "keep"}]}]))
        .await;
    let p = c.poke().await;
    assert_eq!(
        p.all("rowsPatch"),
        Vec::<Json>::new(),
        "rows stay while the TTL runs"
    );
    let p = c.poke().await;
    assert_eq!(
        p.all("gotQueriesPatch"),
        vec![json!({"op": "del", "hash": "short"})]
    );
    assert_eq!(
        p.dels(),
        vec![("issue".to_string(), json!({"id": "b"}))],
        "row a is still held by the query whose TTL runs on"
    );
    c.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ttl_clock_stops_while_the_group_is_disconnected() {
    let db = test_db().await;
    db.exec(ISSUES).await;
    let mut server = start_server(&db).await;
    allow_all(&db, &mut server, &["issue"]).await;
    let puts = json!([
        {"op": "put", "hash": "short", "ttl": 1500, "ast": {"table": "issue", "orderBy": [["id", "asc"]]}},
    ]);
    let mut c = connect(
        server.addr,
        ConnectOpts::new("c1", "g1", init(puts, Some(issue_schema()))),
    )
    .await
    .ok();
    c.poke().await;
    assert_eq!(c.poke().await.puts().len(), 2);
    c.send(
        json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "del", "hash": "short"}]}]),
    )
    .await;
    let cookie = c.poke().await.cookie();
    c.close().await;
    // Longer than the TTL with nobody connected: the query must not expire meanwhile.
    tokio::time::sleep(std::time::Duration::from_millis(2500)).await;
    let mut o = ConnectOpts::new("c1", "g1", init(json!([]), None));
    o.base_cookie = Some(&cookie);
    let mut c = connect(server.addr, o).await.ok();
    let reconnected = std::time::Instant::now();
    let pokes = c
        .pokes_until(|p| {
            p.all("gotQueriesPatch")
                .contains(&json!({"op": "del", "hash": "short"}))
        })
        .await;
    assert!(
        reconnected.elapsed() >= std::time::Duration::from_millis(700),
        "the query expired {:?} after the reconnect, so its TTL ran while disconnected",
        reconnected.elapsed()
    );
    assert_eq!(
        pokes.last().expect("poke").dels().len(),
        2,
        "its rows leave once the TTL has run while connected"
    );
    c.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}
