//! Auth (protocol §10) and legacy CRUD mutations (§8.5): JWT verification, `authData` in
//! permission rules across token changes, client-group pinning, expiry, and CRUD writes with
//! write permissions and the per-user rate limit — at the protocol level and with the real
//! client.

use std::net::SocketAddr;
use std::time::Duration;

use jsonwebtoken::{EncodingKey, Header, encode};
use serde_json::{Value as Json, json};
use zero_cache::sync::connect::encode_sec_protocol;

use crate::support::{TestDb, test_db};
use crate::sync_util::{Connected, Event, Server, connect_raw, init, start_server_with};
use crate::writes_e2e::{ITEMS, NodeProc};

const SECRET: &str = "test-secret";

fn now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64
}

fn jwt_with(secret: &str, claims: Json) -> String {
    encode(
        &Header::default(),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .unwrap()
}

/// A valid token for `sub` with extra claims.
fn jwt(sub: &str, iat: i64, extra: Json) -> String {
    let mut c =
        json!({"sub": sub, "iss": "zero-test", "aud": "app", "iat": iat, "exp": now() + 3600});
    for (k, v) in extra.as_object().unwrap() {
        c[k] = v.clone();
    }
    jwt_with(SECRET, c)
}

async fn connect_as(
    addr: SocketAddr,
    client: &str,
    group: &str,
    user: Option<&str>,
    token: Option<&str>,
    init_msg: Json,
) -> Connected {
    let user = user.map(|u| format!("&userID={u}")).unwrap_or_default();
    let url = format!(
        "/sync/v51/connect?clientID={client}&clientGroupID={group}{user}&baseCookie=&ts=1&lmid=0&wsid=w-{client}"
    );
    let proto = encode_sec_protocol(Some(&init_msg), token);
    connect_raw(addr, &url, Some(&proto)).await
}

fn item_schema() -> Json {
    json!({"tables": {"item": {"columns": {"id": {"type": "string"}, "title": {"type": "string"},
        "n": {"type": "number"}, "owner": {"type": "string"}}, "primaryKey": ["id"]}}})
}

fn all_items() -> Json {
    json!([{"op": "put", "hash": "all", "ast": {"table": "item", "orderBy": [["id", "asc"]]}}])
}

async fn set_permissions(db: &TestDb, server: &mut Server, item_rules: Json) {
    let before = server.watermark();
    db.exec(&format!(
        "UPDATE zero.permissions SET permissions = '{}'",
        json!({"tables": {"item": item_rules}})
    ))
    .await;
    server.wait_served_after(&before).await;
}

fn owner_is(field: &str) -> Json {
    json!(["allow", {"type": "simple", "op": "=", "left": {"type": "column", "name": "owner"},
        "right": {"type": "static", "anchor": "authData", "field": field}}])
}

/// The group refuses the connection (after `connected`, since pinning is the group's state).
async fn expect_unauthorized(c: Connected) {
    match c {
        Connected::Rejected(Some(m), _) => assert_eq!(m[1]["kind"], "Unauthorized", "{m}"),
        Connected::Ok(mut c) => {
            let m = c.recv().await;
            assert_eq!(m[0], "error", "{m}");
            assert_eq!(m[1]["kind"], "Unauthorized", "{m}");
            match c.next_event().await {
                Event::Close(close) => assert_eq!(close.map(|c| c.0), Some(3000)),
                Event::Msg(m) => panic!("expected close, got {m}"),
            }
        }
        Connected::Rejected(None, c) => panic!("closed without error: {c:?}"),
    }
}

fn rejected(c: Connected) -> (Json, Option<(u16, String)>) {
    match c {
        Connected::Ok(_) => panic!("connection accepted"),
        Connected::Rejected(m, close) => (m.expect("an error message"), close),
    }
}

async fn jwt_server(db: &TestDb, f: impl FnOnce(&mut zero_cache::sync::SyncOptions)) -> Server {
    start_server_with(db, |o| {
        o.writes.auth_secret = Some(SECRET.into());
        o.writes.auth_issuer = Some("zero-test".into());
        o.writes.auth_audience = Some("app".into());
        o.writes.auth_revalidate_interval = Duration::from_secs(1);
        f(o);
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwt_auth_data_pinning_and_expiry() {
    let db = test_db().await;
    db.exec(ITEMS).await;
    db.exec("INSERT INTO item VALUES ('a1', 'A', 1, 'team-a'), ('b1', 'B', 2, 'team-b')")
        .await;
    let mut server = jwt_server(&db, |_| {}).await;
    set_permissions(
        &db,
        &mut server,
        json!({"row": {"select": [owner_is("team")]}}),
    )
    .await;
    let addr = server.addr;
    let init_all = || init(all_items(), Some(item_schema()));

    // Tokens that fail verification, and a token without a userID.
    let good =
        json!({"sub": "u1", "iss": "zero-test", "aud": "app", "iat": 1, "exp": now() + 3600});
    let mut bad = Vec::new();
    bad.push(jwt_with("wrong-secret", good.clone()));
    for (k, v) in [
        ("iss", json!("other")),
        ("aud", json!("other")),
        ("exp", json!(now() - 10)),
        ("sub", json!("u2")),
    ] {
        let mut c = good.clone();
        c[k] = v;
        bad.push(jwt_with(SECRET, c));
    }
    for t in &bad {
        let (m, close) =
            rejected(connect_as(addr, "c0", "g0", Some("u1"), Some(t), init_all()).await);
        assert_eq!(m[1]["kind"], "AuthInvalidated", "{m}");
        assert_eq!(close.map(|c| c.0), Some(3000));
    }
    let (m, _) = rejected(connect_as(addr, "c0", "g0", None, Some(&bad[0]), init_all()).await);
    assert_eq!(m[1]["kind"], "Unauthorized", "{m}");

    // authData binds the select rule: team a sees a1 only.
    let t1 = jwt("u1", 100, json!({"team": "team-a"}));
    let mut c1 = connect_as(addr, "c1", "g1", Some("u1"), Some(&t1), init_all())
        .await
        .ok();
    let pokes = c1.pokes_until(|p| !p.puts().is_empty()).await;
    let puts: Vec<_> = pokes.iter().flat_map(|p| p.puts()).collect();
    assert_eq!(
        puts,
        vec![(
            "item".to_string(),
            json!({"id": "a1", "title": "A", "n": 1, "owner": "team-a"})
        )]
    );

    // A newer token for team b: a1 goes away, b1 arrives; nothing of team a is sent again.
    let t2 = jwt("u1", 200, json!({"team": "team-b"}));
    c1.send(json!(["updateAuth", {"auth": t2}])).await;
    let pokes = c1
        .pokes_until(|p| !p.dels().is_empty() || !p.puts().is_empty())
        .await;
    let last = pokes.last().unwrap();
    assert_eq!(
        last.puts(),
        vec![(
            "item".to_string(),
            json!({"id": "b1", "title": "B", "n": 2, "owner": "team-b"})
        )]
    );
    assert_eq!(last.dels(), vec![("item".to_string(), json!({"id": "a1"}))]);
    // An older token does not replace the newer one; a row change of team a stays invisible.
    c1.send(json!(["updateAuth", {"auth": t1}])).await;
    db.exec("UPDATE item SET title = 'A2' WHERE id = 'a1'; UPDATE item SET title = 'B2' WHERE id = 'b1'").await;
    let pokes = c1.pokes_until(|p| !p.puts().is_empty()).await;
    for p in &pokes {
        for (_, v) in p.puts() {
            assert_eq!(
                v["owner"], "team-b",
                "a row the permissions exclude was sent: {v}"
            );
        }
    }

    // Pinning: another user, or no token, cannot join the group.
    let other = jwt("u2", 100, json!({"team": "team-a"}));
    let c2 = connect_as(
        addr,
        "c2",
        "g1",
        Some("u2"),
        Some(&other),
        init(json!([]), None),
    )
    .await;
    expect_unauthorized(c2).await;
    let c3 = connect_as(addr, "c3", "g1", Some("u1"), None, init(json!([]), None)).await;
    expect_unauthorized(c3).await;
    // The group's own user is still served.
    c1.send(json!(["ping", {}])).await;

    // Expiry: the connection is closed at the next revalidation after `exp`.
    let short = jwt_with(
        SECRET,
        json!({"sub": "u1", "iss": "zero-test", "aud": "app", "exp": now() + 2, "team": "team-a"}),
    );
    let mut d = connect_as(addr, "d1", "g2", Some("u1"), Some(&short), init_all())
        .await
        .ok();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(8);
    loop {
        assert!(
            tokio::time::Instant::now() < deadline,
            "not closed after expiry"
        );
        match d.next_event().await {
            Event::Msg(m) if m[0] == "error" => {
                assert_eq!(m[1]["kind"], "AuthInvalidated", "{m}");
                break;
            }
            Event::Msg(_) => continue,
            Event::Close(c) => panic!("closed without error: {c:?}"),
        }
    }
    server.stop_sync().await.stop().await.expect("stop");
}

fn crud_push(group: &str, client: &str, id: u64, op: &str, value: Json) -> Json {
    json!(["push", {"clientGroupID": group, "mutations": [{"type": "crud", "id": id,
        "clientID": client, "name": "_zero_crud",
        "args": [{"ops": [{"op": op, "tableName": "item", "primaryKey": ["id"], "value": value}]}],
        "timestamp": 1}], "pushVersion": 1, "timestamp": 1, "requestID": format!("r{id}")}])
}

async fn items(db: &TestDb) -> Vec<(String, String, Option<String>)> {
    db.client
        .query("SELECT id, title, owner FROM item ORDER BY id", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| (r.get(0), r.get(1), r.get(2)))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn crud_mutations_permissions_and_rate_limit() {
    let db = test_db().await;
    db.exec(ITEMS).await;
    db.exec("INSERT INTO item VALUES ('o2', 'theirs', 0, 'u2')")
        .await;
    let uri = db.uri.clone();
    let mut server = jwt_server(&db, |o| {
        o.writes.upstream_db = Some(uri);
        o.writes.mutation_limit_max = Some(5);
        o.writes.mutation_limit_window = Duration::from_secs(60);
    })
    .await;
    let mine = || owner_is("sub");
    set_permissions(
        &db,
        &mut server,
        json!({"row": {"select": [["allow", {"type": "and", "conditions": []}]],
            "insert": [mine()], "update": {"preMutation": [mine()], "postMutation": [mine()]},
            "delete": [mine()]}}),
    )
    .await;
    let addr = server.addr;
    let t = jwt("u1", 1, json!({}));
    let mut c = connect_as(
        addr,
        "k1",
        "gk",
        Some("u1"),
        Some(&t),
        init(all_items(), Some(item_schema())),
    )
    .await
    .ok();
    c.pokes_until(|p| !p.puts().is_empty()).await;
    let mine_row = json!({"id": "m1", "title": "mine", "n": 1, "owner": "u1"});
    c.send(crud_push("gk", "k1", 1, "insert", mine_row)).await;
    c.pokes_until(|p| p.lmid("k1") == Some(1)).await;
    // Denied: inserting a row owned by someone else, updating it to another owner, deleting
    // another user's row. The LMID advances, nothing is written.
    c.send(crud_push(
        "gk",
        "k1",
        2,
        "insert",
        json!({"id": "x1", "title": "t", "n": 1, "owner": "u2"}),
    ))
    .await;
    c.send(crud_push(
        "gk",
        "k1",
        3,
        "update",
        json!({"id": "m1", "owner": "u2"}),
    ))
    .await;
    c.send(crud_push("gk", "k1", 4, "delete", json!({"id": "o2"})))
        .await;
    // Allowed: an upsert of own row.
    c.send(crud_push(
        "gk",
        "k1",
        5,
        "upsert",
        json!({"id": "m1", "title": "changed", "n": 2, "owner": "u1"}),
    ))
    .await;
    c.pokes_until(|p| p.lmid("k1") == Some(5)).await;
    assert_eq!(
        items(&db).await,
        vec![
            (
                "m1".to_string(),
                "changed".to_string(),
                Some("u1".to_string())
            ),
            (
                "o2".to_string(),
                "theirs".to_string(),
                Some("u2".to_string())
            ),
        ]
    );
    // The rate limit (5 per minute) is reached: MutationRateLimited, not fatal.
    c.send(crud_push(
        "gk",
        "k1",
        6,
        "insert",
        json!({"id": "m2", "n": 1, "owner": "u1"}),
    ))
    .await;
    let e = c.recv().await;
    assert_eq!(e[1]["kind"], "MutationRateLimited", "{e}");
    c.send(json!(["changeDesiredQueries", {"desiredQueriesPatch": [{"op": "put", "hash": "one",
        "ast": {"table": "item", "where": {"type": "simple", "op": "=", "left": {"type": "column", "name": "id"},
        "right": {"type": "literal", "value": "o2"}}}}]}])).await;
    c.poke().await;
    c.close().await;
    server.stop_sync().await.stop().await.expect("stop");

    // Without the limit: a failing statement is MutationFailed (non-fatal) and the LMID
    // advances; an out-of-order id is InvalidPush; the real client inserts through CRUD.
    let uri = db.uri.clone();
    let server = jwt_server(&db, |o| o.writes.upstream_db = Some(uri)).await;
    let addr = server.addr;
    let mut c = connect_as(
        addr,
        "k2",
        "gk2",
        Some("u1"),
        Some(&t),
        init(all_items(), Some(item_schema())),
    )
    .await
    .ok();
    c.pokes_until(|p| !p.puts().is_empty()).await;
    c.send(crud_push(
        "gk2",
        "k2",
        1,
        "insert",
        json!({"id": "m2", "n": 1, "owner": "u1"}),
    ))
    .await;
    // The failed mutation is recorded upstream (its LMID advances), so the poke of that version
    // may reach the client before or around the error.
    let e = c.recv_error().await;
    assert_eq!(e[1]["kind"], "MutationFailed", "{e}");
    assert!(
        e[1]["message"].as_str().unwrap().contains("null value"),
        "{e}"
    );
    c.pokes_until(|p| p.lmid("k2") == Some(1)).await;
    c.send(crud_push(
        "gk2",
        "k2",
        3,
        "insert",
        json!({"id": "m3", "title": "t", "n": 1, "owner": "u1"}),
    ))
    .await;
    c.expect_error("InvalidPush").await;

    let mut w = NodeProc::start(
        "writer.mjs",
        &[
            format!("http://{addr}"),
            "u1".into(),
            json!({"auth": t, "crudOnly": true}).to_string(),
        ],
    );
    w.wait(20, "hydrated", |v| v["type"] == "complete").await;
    w.send(json!({"cmd": "crud", "tag": "w1", "op": "insert", "args": {"id": "w1", "title": "real", "n": 3, "owner": "u1"}})).await;
    w.send(json!({"cmd": "crud", "tag": "w2", "op": "insert", "args": {"id": "w2", "title": "denied", "n": 3, "owner": "u2"}})).await;
    let has = |v: &Json, id: &str| {
        v["view"]
            .as_array()
            .is_some_and(|r| r.iter().any(|x| x["id"] == id))
    };
    w.wait(20, "w2 applied optimistically", |v| has(v, "w2"))
        .await;
    w.wait(20, "w2 rolled back, w1 kept", |v| {
        has(v, "w1") && !has(v, "w2")
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !items(&db).await.iter().any(|r| r.0 == "w1") {
        assert!(tokio::time::Instant::now() < deadline, "w1 not written");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(!items(&db).await.iter().any(|r| r.0 == "w2"));
    w.stop().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn opaque_tokens_are_validated_by_the_query_endpoint() {
    use axum::http::{HeaderMap, StatusCode};
    use axum::response::IntoResponse;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    let db = test_db().await;
    db.exec(ITEMS).await;
    // An API server that accepts only the token "good" (and counts validation requests).
    let checks = Arc::new(AtomicUsize::new(0));
    let checks2 = checks.clone();
    let api = crate::sync_util::serve_api(axum::Router::new().route(
        "/query",
        axum::routing::post(move |headers: HeaderMap, body: String| {
            let checks = checks2.clone();
            async move {
                let body: Json = serde_json::from_str(&body).unwrap_or_default();
                if body == json!(["transform", []]) {
                    checks.fetch_add(1, Ordering::SeqCst);
                }
                if headers.get("authorization").and_then(|v| v.to_str().ok()) != Some("Bearer good")
                {
                    return (StatusCode::UNAUTHORIZED, "bad token").into_response();
                }
                axum::Json(json!({"kind": "QueryResponse", "queries": []})).into_response()
            }
        }),
    ))
    .await;
    let server = start_server_with(&db, |o| {
        o.query_urls = vec![format!("http://{api}/query")];
        o.writes.auth_revalidate_interval = Duration::from_secs(1);
    })
    .await;
    let addr = server.addr;
    let bad = connect_as(
        addr,
        "b1",
        "gb",
        Some("u1"),
        Some("bad"),
        init(json!([]), Some(item_schema())),
    )
    .await;
    let Connected::Ok(mut bad) = bad else {
        panic!("rejected before connected")
    };
    // The config poke may come first; then the refusal.
    let e = loop {
        let m = bad.recv().await;
        if m[0].as_str().is_some_and(|k| k.starts_with("poke")) {
            continue;
        }
        break m;
    };
    assert_eq!(e[0], "error", "{e}");
    assert_eq!(e[1]["kind"], "TransformFailed", "{e}");
    assert_eq!(e[1]["status"], 401, "{e}");

    let mut good = connect_as(
        addr,
        "g1",
        "gg",
        Some("u1"),
        Some("good"),
        init(json!([]), Some(item_schema())),
    )
    .await
    .ok();
    good.poke().await;
    // Revalidated periodically while connected.
    let before = checks.load(Ordering::SeqCst);
    tokio::time::sleep(Duration::from_millis(2500)).await;
    assert!(checks.load(Ordering::SeqCst) > before, "no revalidation");
    good.send(json!(["ping", {}])).await;
    good.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jwks_url_keys_are_fetched_by_kid() {
    use base64::Engine as _;
    use zero_cache::sync::auth::{Auth, JwtConfig, resolve};
    let b64 = |s: &str| base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(s);
    let jwks = json!({"keys": [
        {"kty": "oct", "kid": "old", "k": b64("old-secret"), "alg": "HS256"},
        {"kty": "oct", "kid": "new", "k": b64("new-secret"), "alg": "HS256"},
    ]});
    let api = crate::sync_util::serve_api(axum::Router::new().route(
        "/jwks.json",
        axum::routing::get(move || {
            let j = jwks.clone();
            async move { axum::Json(j) }
        }),
    ))
    .await;
    let cfg = JwtConfig::from_options(
        None,
        None,
        Some(&format!("http://{api}/jwks.json")),
        None,
        None,
    )
    .unwrap()
    .unwrap();
    let signed = |kid: &str, secret: &str| {
        let h = Header {
            kid: Some(kid.into()),
            ..Default::default()
        };
        encode(
            &h,
            &json!({"sub": "u1", "exp": now() + 60}),
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    };
    let a = resolve(
        Some(&cfg),
        None,
        Some("u1"),
        Some(&signed("new", "new-secret")),
    )
    .await
    .unwrap();
    assert!(matches!(a, Some(Auth::Jwt { .. })));
    assert!(
        resolve(
            Some(&cfg),
            None,
            Some("u1"),
            Some(&signed("old", "old-secret"))
        )
        .await
        .is_ok()
    );
    let e = resolve(
        Some(&cfg),
        None,
        Some("u1"),
        Some(&signed("new", "old-secret")),
    )
    .await
    .unwrap_err();
    assert_eq!(
        e.kind,
        zero_cache::sync::protocol::ErrorKind::AuthInvalidated
    );
    let e = resolve(Some(&cfg), None, Some("u1"), Some(&signed("gone", "x")))
        .await
        .unwrap_err();
    assert!(e.message.contains("no matching key"), "{}", e.message);
}
