use std::net::SocketAddr;

use serde_json::json;

use crate::support::{TestDb, test_db};
use crate::sync_util::{
    ADMIN_PASSWORD, Client, ConnectOpts, Connected, Server, allow_all, connect, connect_idle,
    connect_raw, engine_stats, http_get, init, start_server,
};
use zero_cache::sync::connect::encode_sec_protocol;

fn issue_schema() -> serde_json::Value {
    json!({"tables": {"issue": {"columns": {
        "id": {"type": "string"}, "title": {"type": "string"}, "open": {"type": "boolean"},
        "n": {"type": "number"}, "meta": {"type": "json"}}, "primaryKey": ["id"]}}})
}

const ISSUES: &str = "CREATE TABLE issue (id text PRIMARY KEY, title text, open bool, n int8, meta jsonb);
     INSERT INTO issue VALUES ('a', 'first', true, 1, '{\"x\": [1, 2]}'), ('b', 'second', false, 2, NULL);";

fn all_issues() -> serde_json::Value {
    json!([{"op": "put", "hash": "q1", "ttl": 60000,
            "ast": {"table": "issue", "orderBy": [["id", "asc"]]}}])
}

/// A test database with the `issue` table and its two rows, and a server over it; `allow`
/// deploys allow-all read permissions for `issue`.
async fn issues_server(allow: bool) -> (TestDb, Server) {
    let db = test_db().await;
    db.exec(ISSUES).await;
    let mut server = start_server(&db).await;
    if allow {
        allow_all(&db, &mut server, &["issue"]).await;
    }
    (db, server)
}

/// Connects `client` of `group` with query `q1` (every issue) and the issue schema.
async fn connect_issues(addr: SocketAddr, client: &str, group: &str) -> Client {
    connect(
        addr,
        ConnectOpts::new(client, group, init(all_issues(), Some(issue_schema()))),
    )
    .await
    .ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http_endpoints_and_statz_auth() {
    let db = test_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY);").await;
    let server = start_server(&db).await;
    let (s, _, body) = http_get(server.addr, "/", None).await;
    assert_eq!((s, body.as_str()), (200, "OK"));
    let (s, _, body) = http_get(server.addr, "/keepalive", None).await;
    assert_eq!((s, body.as_str()), (200, "OK"));
    let (s, head, _) = http_get(server.addr, "/statz", None).await;
    assert_eq!(s, 401);
    assert!(
        head.to_ascii_lowercase()
            .contains("www-authenticate: basic realm=\"statz protected area\""),
        "{head}"
    );
    let (s, _, _) = http_get(server.addr, "/statz", Some("admin:wrong")).await;
    assert_eq!(s, 401);
    let (s, _, body) = http_get(
        server.addr,
        "/statz",
        Some(&format!("anyone:{ADMIN_PASSWORD}")),
    )
    .await;
    assert_eq!(s, 200);
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["replica"]["watermark"], server.watermark());
    let (s, _, _) = http_get(server.addr, "/heapz", None).await;
    assert_eq!(s, 401);
    let (s, _, body) = http_get(server.addr, "/heapz", Some(&format!("a:{ADMIN_PASSWORD}"))).await;
    assert_eq!(s, 200);
    let heap: serde_json::Value = serde_json::from_str(&body).expect("json");
    let rss = heap["rssBytes"].as_u64().expect("rssBytes");
    assert!(rss > 0, "{heap}");
    assert!(
        heap["peakRssBytes"].as_u64().expect("peak") >= rss,
        "{heap}"
    );
    let (s, _, _) = http_get(server.addr, "/nope", None).await;
    assert_eq!(s, 404);
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn handshake_errors_close_with_1002_or_error() {
    let db = test_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY);").await;
    let server = start_server(&db).await;
    let proto = encode_sec_protocol(None, None);
    let q = "clientID=c&clientGroupID=g&baseCookie=&ts=1&lmid=0&wsid=w";
    let expect_1002 = |r: Connected, needle: &str| match r {
        Connected::Rejected(None, Some((1002, reason))) => {
            assert!(reason.contains(needle), "{reason} should mention {needle}");
            assert!(reason.len() <= 123);
        }
        Connected::Rejected(m, c) => panic!("expected close 1002, got {m:?} {c:?}"),
        Connected::Ok(_) => panic!("expected close 1002, got connected"),
    };
    expect_1002(
        connect_raw(server.addr, &format!("/sync/vx/connect?{q}"), Some(&proto)).await,
        "version",
    );
    expect_1002(
        connect_raw(
            server.addr,
            &format!("/a/b/sync/v51/connect?{q}"),
            Some(&proto),
        )
        .await,
        "URL",
    );
    expect_1002(
        connect_raw(
            server.addr,
            "/sync/v51/connect?clientGroupID=g&ts=1&lmid=0",
            Some(&proto),
        )
        .await,
        "clientID",
    );
    expect_1002(
        connect_raw(
            server.addr,
            "/sync/v51/connect?clientID=c&clientGroupID=g&lmid=0",
            Some(&proto),
        )
        .await,
        "ts",
    );
    expect_1002(
        connect_raw(server.addr, &format!("/sync/v51/connect?{q}"), None).await,
        "Sec-WebSocket-Protocol",
    );
    expect_1002(
        connect_raw(
            server.addr,
            &format!("/sync/v51/connect?{q}"),
            Some("bm90IGpzb24"),
        )
        .await,
        "Sec-WebSocket-Protocol",
    );
    for v in [29, 52, 100] {
        match connect_raw(
            server.addr,
            &format!("/sync/v{v}/connect?{q}"),
            Some(&proto),
        )
        .await
        {
            Connected::Rejected(Some(m), _) => {
                assert_eq!(m[0], "error");
                assert_eq!(m[1]["kind"], "VersionNotSupported");
                assert_eq!(m[1]["origin"], "zeroCache");
            }
            _ => panic!("v{v} should be rejected with VersionNotSupported"),
        }
    }
    // Every supported version, with or without a base path, connects.
    for path in ["/sync/v30/connect", "/zero/sync/v51/connect"] {
        match connect_raw(server.addr, &format!("{path}?{q}"), Some(&proto)).await {
            Connected::Ok(c) => c.close().await,
            Connected::Rejected(m, c) => panic!("{path}: {m:?} {c:?}"),
        }
    }
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_messages_get_invalid_message_and_ping_gets_pong() {
    let (_db, server) = issues_server(false).await;
    let mut c = connect_idle(server.addr, "c1", "g1", issue_schema()).await;
    c.send(json!(["ping", {}])).await;
    // The idle pongs are skipped by the helper; a ping must be answered at once.
    c.send_text("[\"ping\",{}]".into()).await;
    c.send_text("not json".into()).await;
    let e = c.expect_error("InvalidMessage").await;
    assert_eq!(e[1]["origin"], "zeroCache");

    for bad in [
        json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "put"}]}]),
        json!(["noSuchMessage", {}]),
        json!(["changeDesiredQueries", {"desiredQueriesPatch": [], "extra": 1}]),
    ] {
        let mut c = connect_idle(server.addr, "c2", "g2", issue_schema()).await;
        c.send(bad).await;
        c.expect_error("InvalidMessage").await;
    }

    // Oversize frames (the test server allows 64 KiB).
    let mut c = connect_idle(server.addr, "c3", "g3", issue_schema()).await;
    let big = format!(
        "[\"changeDesiredQueries\",{{\"desiredQueriesPatch\":[],\"traceparent\":\"{}\"}}]",
        "x".repeat(100_000)
    );
    c.send_text(big).await;
    c.expect_error("InvalidMessage").await;

    // The server is still serving.
    let (s, _, _) = http_get(server.addr, "/", None).await;
    assert_eq!(s, 200);
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hydration_then_one_poke_per_commit() {
    let (db, server) = issues_server(true).await;
    let mut c = connect_issues(server.addr, "c1", "g1").await;
    let config = c.poke().await;
    assert_eq!(config.base(), json!(null));
    assert_eq!(config.cookie(), "00:01");
    assert_eq!(
        config.parts[0]["desiredQueriesPatches"],
        json!({"c1": [{"op": "put", "hash": "q1"}]})
    );
    let hydrate = c.poke().await;
    assert_eq!(hydrate.base(), json!("00:01"));
    assert_eq!(hydrate.cookie(), server.watermark());
    assert_eq!(
        hydrate.all("gotQueriesPatch"),
        vec![json!({"op": "put", "hash": "q1"})]
    );
    assert_eq!(
        hydrate.puts(),
        vec![
            (
                "issue".to_string(),
                json!({"id": "a", "title": "first", "open": true, "n": 1, "meta": {"x": [1, 2]}})
            ),
            (
                "issue".to_string(),
                json!({"id": "b", "title": "second", "open": false, "n": 2, "meta": null})
            ),
        ]
    );

    let mut cookie = hydrate.cookie();
    db.exec("INSERT INTO issue VALUES ('c', 'third', true, 3, '[]')")
        .await;
    let p = c.poke().await;
    assert_eq!(p.base(), json!(cookie));
    assert_eq!(
        p.puts(),
        vec![(
            "issue".to_string(),
            json!({"id": "c", "title": "third", "open": true, "n": 3, "meta": []})
        )]
    );
    cookie = p.cookie();
    db.exec("UPDATE issue SET title = 'changed' WHERE id = 'a'")
        .await;
    let p = c.poke().await;
    assert_eq!(p.base(), json!(cookie));
    assert_eq!(p.puts().len(), 1);
    assert_eq!(p.puts()[0].1["title"], "changed");
    cookie = p.cookie();
    db.exec("DELETE FROM issue WHERE id = 'b'").await;
    let p = c.poke().await;
    assert_eq!(p.base(), json!(cookie));
    assert_eq!(p.dels(), vec![("issue".to_string(), json!({"id": "b"}))]);
    assert!(p.cookie() > cookie);

    // Removing the query: a config poke with the desire deleted; rows stay until the TTL.
    c.send(json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "del", "hash": "q1"}]}]))
        .await;
    let p = c.poke().await;
    assert_eq!(
        p.parts[0]["desiredQueriesPatches"],
        json!({"c1": [{"op": "del", "hash": "q1"}]})
    );
    assert!(p.all("rowsPatch").is_empty());
    c.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn legacy_queries_without_permissions_sync_no_rows() {
    let (db, server) = issues_server(false).await;
    let mut c = connect_issues(server.addr, "c1", "g1").await;
    c.poke().await;
    let p = c.poke().await;
    assert_eq!(
        p.all("gotQueriesPatch"),
        vec![json!({"op": "put", "hash": "q1"})]
    );
    assert!(p.puts().is_empty(), "no permissions deployed: no rows");

    // Deploying permissions while the client is connected re-transforms its queries.
    let mut server = server;
    allow_all(&db, &mut server, &["issue"]).await;
    let pokes = c.pokes_until(|p| !p.puts().is_empty()).await;
    let puts: Vec<_> = pokes.iter().flat_map(|p| p.puts()).collect();
    assert_eq!(puts.len(), 2, "{puts:?}");
    c.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_catches_up_from_the_cookie_and_bad_cookies_are_rejected() {
    reconnect_scenario(false).await;
}

/// The same with client view records in Postgres (`ZERO_CVR_DB`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_catches_up_from_the_cookie_with_cvr_in_postgres() {
    reconnect_scenario(true).await;
}

async fn reconnect_scenario(cvr_in_pg: bool) {
    let db = test_db().await;
    db.exec(ISSUES).await;
    let cvr_db = cvr_in_pg.then(|| db.uri.clone());
    let mut server = crate::sync_util::start_server_with(&db, |o| {
        o.cvr_db = cvr_db;
        o.cvr_max_conns = 2;
    })
    .await;
    allow_all(&db, &mut server, &["issue"]).await;
    let mut c = connect_issues(server.addr, "c1", "g1").await;
    // The cookie of the poke that brought the rows (not necessarily the second one).
    let hydrated = c.pokes_until(|p| !p.puts().is_empty()).await;
    let cookie = hydrated.last().expect("poke").cookie();
    c.close().await;

    let before = server.watermark();
    db.exec(
        "INSERT INTO issue VALUES ('c', 'third', true, 3, NULL); DELETE FROM issue WHERE id = 'a';",
    )
    .await;
    server.wait_watermark_after(&before).await;

    // Same client, with its cookie and no schema (the client sends none when it has a cookie).
    let mut o = ConnectOpts::new("c1", "g1", init(all_issues(), None));
    o.base_cookie = Some(&cookie);
    let mut c = connect(server.addr, o).await.ok();
    let pokes = c.pokes_until(|p| !p.dels().is_empty()).await;
    let last = pokes.last().expect("poke");
    assert_eq!(pokes[0].base(), json!(cookie));
    assert_eq!(last.dels(), vec![("issue".to_string(), json!({"id": "a"}))]);
    let puts: Vec<_> = pokes.iter().flat_map(|p| p.puts()).collect();
    assert_eq!(puts.len(), 1, "only the new row is sent: {puts:?}");
    assert_eq!(puts[0].1["id"], "c");
    c.close().await;

    // A cookie ahead of the CVR.
    let mut o = ConnectOpts::new("c1", "g1", init(json!([]), None));
    o.base_cookie = Some("zzzzzzzz");
    let mut c = connect(server.addr, o).await.ok();
    c.expect_error("InvalidConnectionRequestBaseCookie").await;

    // A cookie for a group the server never saw.
    let mut o = ConnectOpts::new("c9", "unknown-group", init(json!([]), None));
    o.base_cookie = Some(&cookie);
    let mut c = connect(server.addr, o).await.ok();
    c.expect_error("ClientNotFound").await;

    // A new group without a client schema.
    let mut c = connect(
        server.addr,
        ConnectOpts::new("c8", "new-group", init(json!([]), None)),
    )
    .await
    .ok();
    c.expect_error("InvalidConnectionRequest").await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn client_schema_is_checked_against_the_replica() {
    let (_db, server) = issues_server(false).await;
    let bad = json!({"tables": {
        "nope": {"columns": {"id": {"type": "string"}}, "primaryKey": ["id"]},
        "issue": {"columns": {"id": {"type": "string"}, "open": {"type": "string"},
                              "missing": {"type": "number"}}, "primaryKey": ["title"]}}});
    let mut c = connect(
        server.addr,
        ConnectOpts::new("c1", "g1", init(json!([]), Some(bad))),
    )
    .await
    .ok();
    let e = c.expect_error("SchemaVersionNotSupported").await;
    let msg = e[1]["message"].as_str().expect("message");
    for needle in [
        "\"nope\"",
        "\"issue\".\"open\"",
        "\"issue\".\"missing\"",
        "primary key",
    ] {
        assert!(msg.contains(needle), "{msg} should mention {needle}");
    }
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn second_connection_of_a_client_replaces_the_first_and_lmids_are_poked() {
    let (db, server) = issues_server(true).await;
    let mut first = connect_issues(server.addr, "c1", "g1").await;
    first.poke().await;
    first.poke().await;
    let mut second = connect_issues(server.addr, "c1", "g1").await;
    // The first socket is closed by the server.
    loop {
        match first.next_event().await {
            crate::sync_util::Event::Close(_) => break,
            crate::sync_util::Event::Msg(m) => assert_ne!(m[0], "error", "{m}"),
        }
    }
    let p = second.poke().await;
    assert_eq!(p.base(), json!(null));
    let p = if p.puts().is_empty() {
        second.poke().await
    } else {
        p
    };
    assert_eq!(p.puts().len(), 2, "a fresh connection gets every row");

    // A mutation processed by an API server bumps the client's LMID upstream.
    db.exec(r#"INSERT INTO zero_0.clients ("clientGroupID", "clientID", "lastMutationID") VALUES ('g1', 'c1', 1), ('other', 'c1', 7)"#)
        .await;
    let p = second.poke().await;
    assert_eq!(p.parts[0]["lastMutationIDChanges"], json!({"c1": 1}));
    db.exec(r#"INSERT INTO zero_0.mutations ("clientGroupID", "clientID", "mutationID", "result") VALUES ('g1', 'c1', 2, '{"error":"app","message":"nope"}')"#)
        .await;
    let p = second.poke().await;
    assert_eq!(
        p.all("mutationsPatch"),
        vec![
            json!({"op": "put", "mutation": {"id": {"clientID": "c1", "id": 2}, "result": {"error": "app", "message": "nope"}}})
        ]
    );
    db.exec(r#"DELETE FROM zero_0.mutations"#).await;
    let p = second.poke().await;
    assert_eq!(
        p.all("mutationsPatch"),
        vec![json!({"op": "del", "id": {"clientID": "c1", "id": 2}})]
    );
    second.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn clients_of_a_group_share_rows_and_see_each_others_desires() {
    let (_db, server) = issues_server(true).await;
    let mut c1 = connect_issues(server.addr, "c1", "g1").await;
    c1.poke().await;
    c1.poke().await;
    let mut c2 = connect(
        server.addr,
        ConnectOpts::new("c2", "g1", init(json!([]), Some(issue_schema()))),
    )
    .await
    .ok();
    // c1 sees c2 join (a config change without desires) ...
    let p = c1.poke().await;
    assert!(p.all("rowsPatch").is_empty());
    // ... and c2 gets the group's whole state from scratch.
    let p = c2.poke().await;
    assert_eq!(p.base(), json!(null));
    assert_eq!(
        p.parts
            .iter()
            .find_map(|x| x.get("desiredQueriesPatches").cloned()),
        Some(json!({"c1": [{"op": "put", "hash": "q1"}]}))
    );
    assert_eq!(
        p.all("gotQueriesPatch"),
        vec![json!({"op": "put", "hash": "q1"})]
    );
    assert_eq!(p.puts().len(), 2);

    // A query of c2 is announced to both clients; its rows are already in the group.
    c2.send(json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "put", "hash": "q2",
        "ast": {"table": "issue", "where": {"type": "simple", "op": "=",
            "left": {"type": "column", "name": "id"}, "right": {"type": "literal", "value": "a"}}}}]}]))
        .await;
    for c in [&mut c1, &mut c2] {
        let config = c.poke().await;
        assert_eq!(
            config.parts[0]["desiredQueriesPatches"],
            json!({"c2": [{"op": "put", "hash": "q2"}]})
        );
        let hydrate = c.poke().await;
        assert_eq!(
            hydrate.all("gotQueriesPatch"),
            vec![json!({"op": "put", "hash": "q2"})]
        );
        assert!(
            hydrate.puts().is_empty(),
            "rows are per group, not per query"
        );
    }

    // c1 deletes c2: c2's desires go, c2's connection closes, c1 gets the acknowledgement.
    c1.send(json!(["deleteClients", {"clientIDs": ["c2"]}]))
        .await;
    let p = c1.poke().await;
    assert_eq!(
        p.parts[0]["desiredQueriesPatches"],
        json!({"c2": [{"op": "del", "hash": "q2"}]})
    );
    let ack = c1.recv().await;
    assert_eq!(ack, json!(["deleteClients", {"clientIDs": ["c2"]}]));
    loop {
        match c2.next_event().await {
            crate::sync_util::Event::Close(_) => break,
            crate::sync_util::Event::Msg(m) => assert_ne!(m[0], "error", "{m}"),
        }
    }
    c1.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

/// Waits until the engine's counters are `(queries, subscriptions)`; panics with the last
/// figures after 10 s.
async fn wait_engine(addr: std::net::SocketAddr, queries: u64, subscriptions: u64) {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(10);
    loop {
        let e = engine_stats(addr).await;
        if e["queries"] == queries && e["subscriptions"] == subscriptions {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "engine state {e}, expected {queries} queries / {subscriptions} subscriptions"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn groups_share_engine_queries_and_removal_or_ttl_expiry_releases_them() {
    let (db, server) = issues_server(true).await;
    let open_issues = |ttl: u64| {
        json!([{"op": "put", "hash": "open", "ttl": ttl,
                "ast": {"table": "issue", "where": {"type": "simple", "op": "=",
                        "left": {"type": "column", "name": "open"},
                        "right": {"type": "literal", "value": true}},
                        "orderBy": [["id", "asc"]]}}])
    };
    // Two groups with the same query: one query in the engine, two subscriptions.
    let mut c1 = connect(
        server.addr,
        ConnectOpts::new("c1", "g1", init(open_issues(1000), Some(issue_schema()))),
    )
    .await
    .ok();
    let mut c2 = connect(
        server.addr,
        ConnectOpts::new("c2", "g2", init(open_issues(0), Some(issue_schema()))),
    )
    .await
    .ok();
    for c in [&mut c1, &mut c2] {
        let pokes = c
            .pokes_until(|p| !p.all("gotQueriesPatch").is_empty())
            .await;
        let puts: Vec<_> = pokes.iter().flat_map(|p| p.puts()).collect();
        assert_eq!(puts.len(), 1, "{puts:?}");
        assert_eq!(puts[0].1["id"], "a");
    }
    wait_engine(server.addr, 1, 2).await;

    // Both views follow one change computed once.
    db.exec("UPDATE issue SET open = true WHERE id = 'b'").await;
    for c in [&mut c1, &mut c2] {
        let p = c.pokes_until(|p| !p.puts().is_empty()).await;
        assert_eq!(p.last().expect("poke").puts()[0].1["id"], "b");
    }

    // Removal with TTL 0 releases g2's subscription at once, and its rows.
    c2.send(
        json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "del", "hash": "open"}]}]),
    )
    .await;
    let pokes = c2
        .pokes_until(|p| {
            p.all("gotQueriesPatch")
                .contains(&json!({"op": "del", "hash": "open"}))
        })
        .await;
    let dels: Vec<_> = pokes.iter().flat_map(|p| p.dels()).collect();
    assert_eq!(dels.len(), 2, "{dels:?}");
    wait_engine(server.addr, 1, 1).await;

    // g1's query stays until its TTL (1 s) runs out, then the engine drops it.
    c1.send(
        json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "del", "hash": "open"}]}]),
    )
    .await;
    let pokes = c1
        .pokes_until(|p| {
            p.all("gotQueriesPatch")
                .contains(&json!({"op": "del", "hash": "open"}))
        })
        .await;
    assert!(
        pokes[0].all("gotQueriesPatch").is_empty(),
        "the desire goes first, the query only when its TTL expires"
    );
    wait_engine(server.addr, 0, 0).await;
    let e = engine_stats(server.addr).await;
    assert_eq!(e["shapes"], 0, "{e}");

    // Writes after the release reach nobody and break nothing.
    db.exec("INSERT INTO issue VALUES ('z', 'late', true, 9, NULL)")
        .await;
    c1.close().await;
    c2.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn truncate_and_schema_change_rebuild_the_engine_without_losing_clients() {
    let (db, server) = issues_server(true).await;
    let mut c = connect_issues(server.addr, "c1", "g1").await;
    let pokes = c.pokes_until(|p| !p.puts().is_empty()).await;
    let cookie = pokes.last().expect("poke").cookie();

    // A truncate empties the view with an ordinary poke from the client's cookie.
    db.exec("TRUNCATE issue").await;
    let pokes = c.pokes_until(|p| !p.dels().is_empty()).await;
    assert_eq!(pokes[0].base(), json!(cookie));
    let mut dels: Vec<_> = pokes.iter().flat_map(|p| p.dels()).collect();
    dels.sort_by_key(|(_, id)| id.to_string());
    assert_eq!(
        dels,
        vec![
            ("issue".to_string(), json!({"id": "a"})),
            ("issue".to_string(), json!({"id": "b"}))
        ]
    );
    db.exec("INSERT INTO issue VALUES ('c', 'third', true, 3, NULL)")
        .await;
    let p = c.pokes_until(|p| !p.puts().is_empty()).await;
    assert_eq!(p.last().expect("poke").puts()[0].1["id"], "c");

    // A schema change rebuilds the engine; the client keeps its state and later changes flow.
    db.exec("ALTER TABLE issue ADD COLUMN extra text; UPDATE issue SET title = 'changed' WHERE id = 'c'; INSERT INTO issue VALUES ('d', 'fourth', false, 4, NULL, 'x')")
        .await;
    let pokes = c
        .pokes_until(|p| p.puts().iter().any(|(_, v)| v["id"] == "d"))
        .await;
    let puts: Vec<_> = pokes.iter().flat_map(|p| p.puts()).collect();
    assert!(
        puts.iter()
            .any(|(_, v)| v["id"] == "c" && v["title"] == "changed"),
        "{puts:?}"
    );
    assert!(pokes.iter().all(|p| p.base().is_string()), "no reset");
    c.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

/// Zero's clients send primary keys sorted: a table keyed `("labelID", "issueID")` upstream
/// arrives as `["issueID", "labelID"]`. That is the same key, so the group's queries run in the
/// process's one engine (a second one would hold every row again), and row ids read the same.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_key_in_another_column_order_shares_the_engine() {
    let db = test_db().await;
    db.exec(
        "CREATE TABLE \"issueLabel\" (\"labelID\" text NOT NULL, \"issueID\" text NOT NULL, note text,
           PRIMARY KEY (\"labelID\", \"issueID\"));
         INSERT INTO \"issueLabel\" VALUES ('l1', 'i1', 'x'), ('l2', 'i1', 'y');",
    )
    .await;
    let mut server = start_server(&db).await;
    allow_all(&db, &mut server, &["issueLabel"]).await;
    let schema = json!({"tables": {"issueLabel": {"columns": {
        "labelID": {"type": "string"}, "issueID": {"type": "string"}, "note": {"type": "string"}},
        "primaryKey": ["issueID", "labelID"]}}});
    let query = json!([{"op": "put", "hash": "q1", "ttl": 60000,
        "ast": {"table": "issueLabel", "orderBy": [["issueID", "asc"], ["labelID", "asc"]]}}]);
    let mut c = connect(
        server.addr,
        ConnectOpts::new("c1", "g1", init(query, Some(schema))),
    )
    .await
    .ok();
    let _config = c.poke().await;
    let hydrate = c.poke().await;
    assert_eq!(hydrate.puts().len(), 2, "{:?}", hydrate.parts);
    let e = engine_stats(server.addr).await;
    assert_eq!(e["engines"], 1, "one engine for the replica's keys: {e}");
    assert_eq!(e["queries"], 1, "{e}");

    db.exec("DELETE FROM \"issueLabel\" WHERE \"labelID\" = 'l2'")
        .await;
    let p = c.poke().await;
    assert_eq!(
        p.dels(),
        vec![(
            "issueLabel".to_string(),
            json!({"issueID": "i1", "labelID": "l2"})
        )]
    );
    db.exec("UPDATE \"issueLabel\" SET note = 'z' WHERE \"labelID\" = 'l1'")
        .await;
    let p = c.poke().await;
    assert_eq!(
        p.puts(),
        vec![(
            "issueLabel".to_string(),
            json!({"labelID": "l1", "issueID": "i1", "note": "z"})
        )]
    );
    c.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}
