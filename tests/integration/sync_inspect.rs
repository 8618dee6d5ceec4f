//! The inspector protocol (`inspect` messages): authentication with the admin password, the
//! group's queries, server metrics, the version, and query analysis.

use axum::routing::post;
use serde_json::{Value as Json, json};

use crate::support::test_db;
use crate::sync_e2e::ISSUE_TABLES;
use crate::sync_util::{
    ADMIN_PASSWORD, Client, ConnectOpts, allow_all, connect, connect_idle, init, serve_api,
    start_server_with,
};
use crate::writes_e2e::NodeProc;

fn issue_schema() -> Json {
    json!({"tables": {"issue": {"columns": {
        "id": {"type": "string"}, "title": {"type": "string"}}, "primaryKey": ["id"]}}})
}

const ISSUES: &str = "CREATE TABLE issue (id text PRIMARY KEY, title text);
     INSERT INTO issue VALUES ('a', 'first'), ('b', 'second');";

/// Sends an inspector request and returns the reply's body (pokes arriving meanwhile are
/// skipped).
async fn ask(c: &mut Client, id: &str, body: Json) -> Json {
    let mut body = body;
    body["id"] = json!(id);
    c.send(json!(["inspect", body])).await;
    loop {
        let m = c.recv().await;
        if m[0] == "inspect" {
            assert_eq!(m[1]["id"], id, "{m}");
            return m[1].clone();
        }
        assert!(
            ["pokeStart", "pokePart", "pokeEnd"].contains(&m[0].as_str().unwrap_or_default()),
            "unexpected {m}"
        );
    }
}

/// Authenticates the client's group with the admin password; returns the reply's body.
async fn login(c: &mut Client, id: &str) -> Json {
    ask(
        c,
        id,
        json!({"op": "authenticate", "value": ADMIN_PASSWORD}),
    )
    .await
}

/// Total weight of a t-digest in Zero's wire form (`[compression, mean, weight, ...]`).
fn digest_count(d: &Json) -> f64 {
    let a = d.as_array().expect("digest array");
    assert!(a[0].as_f64().is_some_and(|c| c > 0.0), "{d}");
    a[1..].chunks(2).map(|c| c[1].as_f64().expect("w")).sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inspector_needs_the_admin_password_and_reports_queries_metrics_and_version() {
    let db = test_db().await;
    db.exec(ISSUES).await;
    let mut server = start_server_with(&db, |o| o.server_version = Some("9.9.9-test".into())).await;
    allow_all(&db, &mut server, &["issue"]).await;
    let q1 = json!({"table": "issue", "orderBy": [["id", "asc"]]});
    let puts = json!([{"op": "put", "hash": "q1", "ttl": 60000, "ast": q1}]);
    let mut c = connect(
        server.addr,
        ConnectOpts::new("c1", "g1", init(puts, Some(issue_schema()))),
    )
    .await
    .ok();
    c.pokes_until(|p| p.puts().len() == 2).await;

    // Before authenticating, every operation but `authenticate` gets the challenge.
    for (i, op) in ["version", "metrics", "queries"].iter().enumerate() {
        let r = ask(&mut c, &format!("pre{i}"), json!({"op": op})).await;
        assert_eq!(r["op"], "authenticated", "{r}");
        assert_eq!(r["value"], false, "{r}");
    }
    let r = ask(
        &mut c,
        "a1",
        json!({"op": "authenticate", "value": "wrong"}),
    )
    .await;
    assert_eq!(
        (r["op"].clone(), r["value"].clone()),
        (json!("authenticated"), json!(false))
    );
    let r = ask(&mut c, "v0", json!({"op": "version"})).await;
    assert_eq!(r["op"], "authenticated");
    let r = login(&mut c, "a2").await;
    assert_eq!(r["value"], true, "{r}");

    let r = ask(&mut c, "v1", json!({"op": "version"})).await;
    assert_eq!(
        (r["op"].clone(), r["value"].clone()),
        (json!("version"), json!("9.9.9-test"))
    );

    let r = ask(&mut c, "q", json!({"op": "queries"})).await;
    assert_eq!(r["op"], "queries", "{r}");
    let rows = r["value"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "{r}");
    let row = &rows[0];
    assert_eq!(row["clientID"], "c1");
    assert_eq!(row["queryID"], "q1");
    assert_eq!(row["ast"], q1);
    assert_eq!(row["name"], Json::Null);
    assert_eq!(row["args"], Json::Null);
    assert_eq!(row["got"], true);
    assert_eq!(row["deleted"], false);
    assert_eq!(row["ttl"], 60000.0);
    assert_eq!(row["inactivatedAt"], Json::Null);
    assert_eq!(row["rowCount"], 2);
    let hydrate = row["metrics"]["query-hydration-server-ms"]
        .as_f64()
        .expect("hydration ms");
    assert!(hydrate >= 0.0, "{row}");
    assert_eq!(digest_count(&row["metrics"]["query-update-server"]), 0.0);
    // Another client's queries only.
    let r = ask(&mut c, "q2", json!({"op": "queries", "clientID": "c2"})).await;
    assert_eq!(r["value"], json!([]));

    // An upstream change updates the query: one update sample for it and server-wide.
    let before = ask(&mut c, "m0", json!({"op": "metrics"})).await;
    assert_eq!(before["op"], "metrics", "{before}");
    assert!(digest_count(&before["value"]["query-materialization-server"]) >= 1.0);
    let updates_before = digest_count(&before["value"]["query-update-server"]);
    db.exec("INSERT INTO issue VALUES ('c', 'third')").await;
    c.pokes_until(|p| p.puts().iter().any(|(_, v)| v["id"] == "c"))
        .await;
    let after = ask(&mut c, "m1", json!({"op": "metrics"})).await;
    assert_eq!(
        digest_count(&after["value"]["query-update-server"]),
        updates_before + 1.0,
        "{after}"
    );
    let r = ask(&mut c, "q3", json!({"op": "queries", "clientID": "c1"})).await;
    let row = &r["value"][0];
    assert_eq!(row["rowCount"], 3, "{r}");
    assert_eq!(digest_count(&row["metrics"]["query-update-server"]), 1.0);

    // A dropped query is listed as deleted until its TTL runs out; then it is left out.
    let q2 = json!({"table": "issue", "where": {"type": "simple", "op": "=",
        "left": {"type": "column", "name": "id"}, "right": {"type": "literal", "value": "a"}},
        "orderBy": [["id", "asc"]]});
    c.send(json!(["changeDesiredQueries", {"desiredQueriesPatch": [
        {"op": "put", "hash": "q2", "ttl": 1, "ast": q2}]}]))
        .await;
    c.pokes_until(|p| {
        p.all("gotQueriesPatch")
            .contains(&json!({"op": "put", "hash": "q2"}))
    })
    .await;
    c.send(json!(["changeDesiredQueries", {"desiredQueriesPatch": [
        {"op": "del", "hash": "q1"}, {"op": "del", "hash": "q2"}]}]))
        .await;
    c.poke().await;
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    let r = ask(&mut c, "q4", json!({"op": "queries"})).await;
    let rows = r["value"].as_array().expect("rows");
    assert_eq!(rows.len(), 1, "only q1 is left: {r}");
    assert_eq!(rows[0]["queryID"], "q1", "{r}");
    assert_eq!(rows[0]["deleted"], true, "{r}");
    assert!(rows[0]["inactivatedAt"].as_f64().is_some(), "{r}");

    // Authentication is per client group.
    let mut other = connect_idle(server.addr, "c9", "g9", issue_schema()).await;
    let r = ask(&mut other, "o1", json!({"op": "queries"})).await;
    assert_eq!(
        (r["op"].clone(), r["value"].clone()),
        (json!("authenticated"), json!(false))
    );
    // Metrics are the group's own, as zero-cache keeps them per view-syncer.
    let r = login(&mut other, "o2").await;
    assert_eq!(r["value"], true);
    let r = ask(&mut other, "o3", json!({"op": "metrics"})).await;
    assert_eq!(
        digest_count(&r["value"]["query-materialization-server"]),
        0.0,
        "{r}"
    );
    assert_eq!(digest_count(&r["value"]["query-update-server"]), 0.0, "{r}");
    // A wrong password revokes the group's earlier success.
    let r = ask(&mut c, "a3", json!({"op": "authenticate", "value": "nope"})).await;
    assert_eq!(r["value"], false);
    let r = ask(&mut c, "v2", json!({"op": "version"})).await;
    assert_eq!(r["op"], "authenticated");

    // An unknown operation is an invalid message.
    c.send(json!(["inspect", {"id": "x", "op": "explode"}]))
        .await;
    let e = c.expect_error("InvalidMessage").await;
    assert!(
        e[1]["message"]
            .as_str()
            .unwrap_or_default()
            .contains("inspect"),
        "{e}"
    );
    other.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_query_hydrates_legacy_queries_with_permissions_and_custom_ones_through_the_api() {
    let db = test_db().await;
    db.exec(ISSUES).await;
    let api =
        serve_api(axum::Router::new().route("/query", post(crate::sync_api::transform))).await;
    let mut server = start_server_with(&db, |o| {
        o.query_urls = vec![format!("http://{api}/query")];
    })
    .await;
    let mut c = connect_idle(server.addr, "c1", "g1", issue_schema()).await;
    let r = login(&mut c, "a").await;
    assert_eq!(r["value"], true);
    let by_id = json!({"table": "issue", "where": {"type": "simple", "op": "=",
        "left": {"type": "column", "name": "id"}, "right": {"type": "literal", "value": "b"}},
        "orderBy": [["id", "asc"]]});

    // No permissions deployed yet: analyzed as is, with a warning.
    let r = ask(&mut c, "1", json!({"op": "analyze-query", "ast": by_id})).await;
    assert_eq!(r["op"], "analyze-query", "{r}");
    let v = &r["value"];
    assert_eq!(v["syncedRowCount"], 1, "{v}");
    assert_eq!(
        v["syncedRows"]["issue"],
        json!([{"id": "b", "title": "second"}])
    );
    assert!(v["elapsed"].as_f64().is_some_and(|e| e >= 0.0), "{v}");
    let span = v["end"].as_f64().expect("end") - v["start"].as_f64().expect("start");
    assert!(
        (span - v["elapsed"].as_f64().expect("elapsed")).abs() < 1e-3,
        "{v}"
    );
    assert!(v.get("afterPermissions").is_none(), "{v}");
    assert!(
        v["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .contains("No permissions"),
        "{v}"
    );

    // With read permissions: the transformed AST is reported and applied (allow-all here), and
    // without a token the rules compare to NULL.
    allow_all(&db, &mut server, &["issue"]).await;
    let r = ask(
        &mut c,
        "2",
        json!({"op": "analyze-query", "value": {"table": "issue"}, "options": {"syncedRows": false}}),
    )
    .await;
    let v = &r["value"];
    assert_eq!(v["syncedRowCount"], 2, "{v}");
    assert!(v.get("syncedRows").is_none(), "{v}");
    assert!(
        v["afterPermissions"]
            .as_str()
            .is_some_and(|s| s.starts_with("issue")),
        "{v}"
    );
    assert!(
        v["warnings"][0]
            .as_str()
            .unwrap_or_default()
            .contains("No auth data"),
        "{v}"
    );

    // A custom query is transformed by the API server first.
    let r = ask(
        &mut c,
        "3",
        json!({"op": "analyze-query", "name": "byId", "args": ["a"]}),
    )
    .await;
    assert_eq!(r["op"], "analyze-query", "{r}");
    assert_eq!(
        r["value"]["syncedRows"]["issue"],
        json!([{"id": "a", "title": "first"}])
    );
    let r = ask(
        &mut c,
        "4",
        json!({"op": "analyze-query", "name": "nope", "args": []}),
    )
    .await;
    assert_eq!(r["op"], "error", "{r}");
    assert!(
        r["value"]
            .as_str()
            .unwrap_or_default()
            .contains("no such query"),
        "{r}"
    );

    // Bad queries are errors of the request, not of the connection.
    let r = ask(
        &mut c,
        "5",
        json!({"op": "analyze-query", "ast": {"table": "nope"}}),
    )
    .await;
    assert_eq!(r["op"], "error", "{r}");
    let r = ask(&mut c, "6", json!({"op": "analyze-query"})).await;
    assert_eq!(r["op"], "error", "{r}");
    assert!(
        r["value"]
            .as_str()
            .unwrap_or_default()
            .contains("AST is required")
    );

    // The analyses left nothing running in the engine.
    let stats = crate::sync_util::engine_stats(server.addr).await;
    assert_eq!(stats["instances"], 0, "{stats}");

    // A query the group runs already is read, not hydrated again, and keeps running.
    let all = json!({"table": "issue", "orderBy": [["id", "asc"]]});
    c.send(json!(["changeDesiredQueries", {"desiredQueriesPatch": [
        {"op": "put", "hash": "q1", "ast": all}]}]))
        .await;
    c.pokes_until(|p| p.puts().len() == 2).await;
    let r = ask(&mut c, "8", json!({"op": "analyze-query", "ast": all})).await;
    let v = &r["value"];
    assert_eq!(v["syncedRowCount"], 2, "{v}");
    let warned = v["warnings"].as_array().is_some_and(|w| {
        w.iter()
            .any(|w| w.as_str().unwrap_or_default().contains("already running"))
    });
    assert!(warned, "{v}");
    let stats = crate::sync_util::engine_stats(server.addr).await;
    assert_eq!(stats["instances"], 1, "{stats}");

    // The connection still works.
    let r = ask(&mut c, "7", json!({"op": "version"})).await;
    assert_eq!(r["value"], env!("CARGO_PKG_VERSION"));
    c.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_clients_inspector_works_against_this_server() {
    let db = test_db().await;
    db.exec(ISSUE_TABLES).await;
    db.exec(
        "INSERT INTO issue VALUES ('i1', 'one', true, 1, NULL), ('i2', 'two', false, 2, NULL),
                                  ('i3', 'three', true, 3, NULL);
         INSERT INTO comment VALUES ('c1', 'i1', 'hello'), ('c2', 'i3', 'world');",
    )
    .await;
    let mut server = start_server_with(&db, |_| {}).await;
    allow_all(&db, &mut server, &["issue", "comment"]).await;
    let mut node = NodeProc::start(
        "inspect.mjs",
        &[
            format!("http://{}", server.addr),
            ADMIN_PASSWORD.to_string(),
        ],
    );
    step(&mut node, "hydrated").await;
    let r = step(&mut node, "before-auth").await;
    assert!(r.get("error").is_some(), "{r}");
    assert_eq!(step(&mut node, "auth-wrong").await["value"], false);
    assert_eq!(step(&mut node, "auth").await["value"], true);
    assert_eq!(
        step(&mut node, "version").await["value"],
        env!("CARGO_PKG_VERSION")
    );
    let r = step(&mut node, "queries").await;
    let qs = r["value"].as_array().expect("queries");
    assert_eq!(qs.len(), 1, "{r}");
    assert_eq!(qs[0]["got"], true, "{r}");
    assert_eq!(qs[0]["deleted"], false, "{r}");
    // Two open issues and their two comments.
    assert_eq!(qs[0]["rowCount"], 4, "{r}");
    assert!(
        qs[0]["serverZQL"]
            .as_str()
            .is_some_and(|z| z.starts_with("issue")),
        "{r}"
    );
    assert!(qs[0]["hydrateServer"].as_f64().is_some(), "{r}");
    let r = step(&mut node, "metrics").await;
    assert!(r["hydrations"].as_f64().is_some_and(|n| n >= 1.0), "{r}");
    let r = step(&mut node, "analyze").await;
    let a = &r["value"];
    assert_eq!(a["syncedRowCount"], 2, "{r}");
    assert_eq!(
        a["syncedRows"]["issue"]
            .as_array()
            .map(|rows| rows.iter().map(|x| x["id"].clone()).collect::<Vec<_>>()),
        Some(vec![json!("i1"), json!("i3")]),
        "{r}"
    );
    node.stop().await;
}

/// The next line of the inspector script's `name` step.
async fn step(node: &mut NodeProc, name: &str) -> Json {
    node.wait(30, &format!("inspector step {name}"), |v| v["step"] == name)
        .await
}
