//! Replays the recorded session of the real client against the real zero-cache 1.9.0
//! (`tests/fixtures/zero-1.9/trace.jsonl`, copied from the shared fixtures) against this
//! server: same upstream rows, same API-server answers (`api-trace.jsonl`), same client
//! messages; the server must answer with the same message sequence and equal contents, up to
//! cookies (ours come from our own LSNs) and timestamps. The recorded custom mutation goes to a
//! fake API server that writes upstream what `@rocicorp/zero/server` would (the row and the
//! client's LMID in one transaction).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;

use axum::Json as AxumJson;
use base64::Engine as _;
use serde_json::{Value as Json, json};

use crate::support::test_db;
use crate::sync_util::{Client, Event, connect_raw, options};
use zero_cache::sync;

fn fixture(name: &str) -> Vec<Json> {
    let p = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures/zero-1.9")
        .join(name);
    std::fs::read_to_string(&p)
        .unwrap_or_else(|e| panic!("{}: {e}", p.display()))
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect()
}

fn decode_protocol(p: &str) -> Json {
    let b64 = zero_cache::sync::connect::percent_decode(p).expect("percent");
    let bytes = base64::engine::general_purpose::STANDARD
        .decode(b64)
        .expect("base64");
    serde_json::from_slice(&bytes).expect("json")
}

fn pg_type(zql: &str) -> &'static str {
    match zql {
        "string" => "text",
        "number" => "float8",
        "boolean" => "bool",
        _ => "jsonb",
    }
}

fn sql_literal(v: &Json) -> String {
    match v {
        Json::Null => "NULL".into(),
        Json::Bool(b) => b.to_string(),
        Json::Number(n) => n.to_string(),
        Json::String(s) => format!("'{}'", s.replace('\'', "''")),
        other => format!("'{}'", other.to_string().replace('\'', "''")),
    }
}

/// JSON text with object keys sorted (row objects keep upstream column order on both sides,
/// and our upstream tables are created in the client schema's order).
fn canon(v: &Json) -> String {
    fn sort(v: &Json) -> Json {
        match v {
            Json::Object(o) => {
                let mut keys: Vec<&String> = o.keys().collect();
                keys.sort();
                Json::Object(keys.into_iter().map(|k| (k.clone(), sort(&o[k]))).collect())
            }
            Json::Array(a) => Json::Array(a.iter().map(sort).collect()),
            other => other.clone(),
        }
    }
    sort(v).to_string()
}

/// A poke flattened for comparison: patches of all parts concatenated, rows sorted.
#[derive(Debug, PartialEq)]
struct FlatPoke {
    config_only: bool,
    fresh: bool,
    desired: Json,
    got: Vec<Json>,
    rows: Vec<String>,
    lmids: Json,
}

fn flatten(start: &Json, parts: &[Json], end: &Json) -> FlatPoke {
    let mut desired = serde_json::Map::new();
    let mut got = Vec::new();
    let mut rows = Vec::new();
    let mut lmids = serde_json::Map::new();
    for p in parts {
        if let Some(d) = p["desiredQueriesPatches"].as_object() {
            for (c, ops) in d {
                let e = desired.entry(c.clone()).or_insert_with(|| json!([]));
                e.as_array_mut()
                    .expect("array")
                    .extend(ops.as_array().cloned().unwrap_or_default());
            }
        }
        got.extend(p["gotQueriesPatch"].as_array().cloned().unwrap_or_default());
        rows.extend(
            p["rowsPatch"]
                .as_array()
                .cloned()
                .unwrap_or_default()
                .iter()
                .map(canon),
        );
        if let Some(l) = p["lastMutationIDChanges"].as_object() {
            lmids.extend(l.clone());
        }
    }
    rows.sort();
    FlatPoke {
        config_only: end["cookie"].as_str().is_some_and(|c| c.contains(':')),
        fresh: start["baseCookie"].is_null(),
        desired: Json::Object(desired),
        got,
        rows,
        lmids: Json::Object(lmids),
    }
}

/// Reads one poke from our server.
async fn our_poke(c: &mut Client, last_cookie: &mut Option<String>) -> FlatPoke {
    let p = c.poke().await;
    assert_eq!(
        p.start["baseCookie"].as_str().map(str::to_string),
        *last_cookie,
        "pokes must continue from the previous cookie"
    );
    assert_eq!(p.start["pokeID"], p.end["cookie"]);
    let cookie = p.cookie();
    if let Some(l) = last_cookie.as_ref() {
        assert!(&cookie >= l, "cookie {cookie} must not go back from {l}");
    }
    *last_cookie = Some(cookie);
    flatten(&p.start, &p.parts, &p.end)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn recorded_session_replays_with_equal_messages() {
    let trace = fixture("trace.jsonl");
    let api = fixture("api-trace.jsonl");

    // The API server: the recorded answer for each (name, args).
    let mut answers: BTreeMap<String, Json> = BTreeMap::new();
    for a in &api {
        if a["path"] == "/query" {
            for q in a["response"]["queries"]
                .as_array()
                .cloned()
                .unwrap_or_default()
            {
                let req = a["request"][1]
                    .as_array()
                    .and_then(|r| r.iter().find(|r| r["id"] == q["id"]).cloned())
                    .expect("request for answer");
                answers.insert(format!("{}:{}", req["name"], req["args"]), q["ast"].clone());
            }
        }
    }
    let answers = Arc::new(answers);
    let db = test_db().await;
    let writer = Arc::new(tokio::sync::Mutex::new(
        crate::support::connect(&db.uri).await,
    ));
    let mutate = axum::routing::post(move |AxumJson(push): AxumJson<Json>| {
        let writer = writer.clone();
        async move {
            let mut w = writer.lock().await;
            let tx = w.transaction().await.expect("begin");
            let group = push["clientGroupID"].as_str().expect("group").to_string();
            let mut results = Vec::new();
            for m in push["mutations"].as_array().cloned().unwrap_or_default() {
                assert_eq!(m["name"], "issue.setTitle", "only the recorded mutator");
                let a = &m["args"][0];
                tx.execute(
                    "UPDATE issue SET title = $1, modified = $2 WHERE id = $3",
                    &[
                        &a["title"].as_str().expect("title"),
                        &a["modified"].as_f64().expect("modified"),
                        &a["id"].as_str().expect("id"),
                    ],
                )
                .await
                .expect("update");
                let client = m["clientID"].as_str().expect("client").to_string();
                tx.execute(
                    r#"INSERT INTO zero_0.clients ("clientGroupID", "clientID", "lastMutationID") VALUES ($1, $2, 1)
                       ON CONFLICT ("clientGroupID", "clientID") DO UPDATE SET "lastMutationID" = zero_0.clients."lastMutationID" + 1"#,
                    &[&group, &client],
                )
                .await
                .expect("lmid");
                results.push(json!({"id": {"clientID": client, "id": m["id"]}, "result": {}}));
            }
            tx.commit().await.expect("commit");
            AxumJson(json!({"kind": "MutateResponse", "mutations": results, "userID": "anon"}))
        }
    });
    let app = axum::Router::new().route("/mutate", mutate).route(
        "/query",
        axum::routing::post(move |AxumJson(body): AxumJson<Json>| {
            let answers = answers.clone();
            async move {
                let queries: Vec<Json> = body[1]
                    .as_array()
                    .cloned()
                    .unwrap_or_default()
                    .into_iter()
                    .map(|q| {
                        let ast = answers
                            .get(&format!("{}:{}", q["name"], q["args"]))
                            .cloned()
                            .expect("recorded query");
                        json!({"id": q["id"], "name": q["name"], "ast": ast})
                    })
                    .collect();
                AxumJson(json!({"kind": "QueryResponse", "queries": queries, "userID": "anon"}))
            }
        }),
    );
    let api_listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind api");
    let api_addr = api_listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(api_listener, app).await });

    // Upstream: the client's tables with every row the recording synced (first version).
    let open = trace.iter().find(|e| e["dir"] == "open").expect("open");
    let protocol = open["secWebSocketProtocol"].as_str().expect("protocol");
    let header = decode_protocol(protocol);
    let schema = &header["initConnectionMessage"][1]["clientSchema"];
    let mut ddl = String::new();
    for (t, def) in schema["tables"].as_object().expect("tables") {
        let cols: Vec<String> = def["columns"]
            .as_object()
            .expect("columns")
            .iter()
            .map(|(c, ty)| format!("\"{c}\" {}", pg_type(ty["type"].as_str().unwrap_or("json"))))
            .collect();
        let pk: Vec<String> = def["primaryKey"]
            .as_array()
            .expect("pk")
            .iter()
            .map(|c| format!("\"{}\"", c.as_str().expect("pk col")))
            .collect();
        ddl.push_str(&format!(
            "CREATE TABLE \"{t}\" ({}, PRIMARY KEY ({}));\n",
            cols.join(", "),
            pk.join(", ")
        ));
    }
    db.exec(&ddl).await;
    let mut seen = std::collections::BTreeSet::new();
    let mut inserts = String::new();
    for e in &trace {
        if e["dir"] != "s2c" || e["msg"][0] != "pokePart" {
            continue;
        }
        for r in e["msg"][1]["rowsPatch"]
            .as_array()
            .cloned()
            .unwrap_or_default()
        {
            let t = r["tableName"].as_str().expect("table").to_string();
            let pk: Vec<String> = schema["tables"][&t]["primaryKey"]
                .as_array()
                .expect("pk")
                .iter()
                .map(|c| r["value"][c.as_str().expect("col")].to_string())
                .collect();
            if !seen.insert((t.clone(), pk)) {
                continue;
            }
            let obj = r["value"].as_object().expect("row");
            let cols: Vec<String> = obj.keys().map(|c| format!("\"{c}\"")).collect();
            let vals: Vec<String> = obj.values().map(sql_literal).collect();
            inserts.push_str(&format!(
                "INSERT INTO \"{t}\" ({}) VALUES ({});\n",
                cols.join(", "),
                vals.join(", ")
            ));
        }
    }
    db.exec(&inserts).await;

    let mut repl = crate::support::start(db.replicator_config());
    repl.ready().await;
    let mut opts = options(&db);
    opts.query_urls = vec![format!("http://{api_addr}/query")];
    opts.mutate_urls = vec![format!("http://{api_addr}/mutate")];
    let server = sync::bind(opts, repl.watermarks.clone())
        .await
        .expect("bind");
    let addr = server.addr;
    let (stop, mut stop_rx) = tokio::sync::watch::channel(false);
    let task = tokio::spawn(server.serve(async move {
        let _ = stop_rx.wait_for(|s| *s).await;
    }));

    let url = open["url"].as_str().expect("url");
    let mut client = match connect_raw(addr, url, Some(protocol)).await {
        crate::sync_util::Connected::Ok(c) => *c,
        crate::sync_util::Connected::Rejected(m, c) => panic!("rejected: {m:?} {c:?}"),
    };

    // Walk the recording: client messages are sent, server pokes compared, marks executed.
    let mut last_cookie: Option<String> = None;
    let mut i = 0;
    let mut compared = 0;
    while i < trace.len() {
        let e = &trace[i];
        i += 1;
        match (e["dir"].as_str(), e["step"].as_str()) {
            (Some("mark"), Some("upstream-update")) => {
                let before = repl.watermarks.borrow().clone();
                db.client
                    .execute(
                        "UPDATE issue SET title=$1 WHERE id=$2",
                        &[
                            &e["title"].as_str().expect("title"),
                            &e["id"].as_str().expect("id"),
                        ],
                    )
                    .await
                    .expect("update");
                let _ = tokio::time::timeout(
                    std::time::Duration::from_secs(20),
                    repl.watermarks.wait_for(|w| *w > before),
                )
                .await;
            }
            (Some("c2s"), _) => client.send(e["msg"].clone()).await,
            (Some("s2c"), _) => match e["msg"][0].as_str() {
                Some("connected") => {}
                Some("pokeStart") => {
                    let start = e["msg"][1].clone();
                    let mut parts = Vec::new();
                    let end = loop {
                        let m = &trace[i]["msg"];
                        i += 1;
                        if m[0] == "pokeEnd" {
                            break m[1].clone();
                        }
                        parts.push(m[1].clone());
                    };
                    let want = flatten(&start, &parts, &end);
                    let got = our_poke(&mut client, &mut last_cookie).await;
                    assert_eq!(got, want, "poke {compared} differs from the recording");
                    compared += 1;
                }
                other => panic!("unexpected recorded message {other:?}"),
            },
            (Some("close"), _) => break,
            _ => {}
        }
    }
    assert_eq!(compared, 8, "every recorded poke was compared");
    // Nothing else arrives (idle pongs aside).
    client.send(json!(["ping", {}])).await;
    match tokio::time::timeout(std::time::Duration::from_secs(1), client.next_event()).await {
        Err(_) => {}
        Ok(Event::Msg(m)) => panic!("unexpected message {m}"),
        Ok(Event::Close(c)) => panic!("unexpected close {c:?}"),
    }
    client.close().await;
    stop.send_replace(true);
    let _ = task.await;
    repl.stop().await.expect("stop");
}
