//! End-to-end sync benchmark: the real `zero-cache` binary over the harness Postgres with the
//! zbugs-like dataset (1,000 users, 100,000 issues, 500,000 comments, 20 labels, 150,000 issue
//! labels), and unmodified `@rocicorp/zero` 1.9.0 clients on Node 22 (`tests/e2e/bench.mjs`,
//! kvStore 'mem', each client its own group). Q1/Q2/Q3 are the engine issue's queries
//! (`benches/engine.rs`). Figures: hydration per query, update latency (Postgres commit →
//! the client's view shows it), 50 concurrent clients hydrated, a label rename reaching 50
//! views, and the server's RSS with 50 clients. Each is printed with its median, p95 and target.
//!
//! `cargo bench --bench sync` (set `BENCH_SCALE=small` for a quick run; `SYNC_BENCH=clients`
//! runs only the many-clients scenario, `BENCH_CLIENTS` sets its size, default 10,000;
//! `BENCH_TRACE=1` prints when each hydration's query change went out and its poke came back,
//! and wall-clock times of each update's steps to line up with `BENCH_SERVER_LOG=debug`;
//! `BENCH_NODE_PROF=DIR` writes the real clients' V8 CPU profiles to DIR).

use std::process::Stdio;
use std::time::{Duration, Instant};

use serde_json::{Value as Json, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, Command};

mod common;
use common::{e2e_dir, percentile};

fn report(name: &str, xs: Vec<f64>, unit: &str, target: &str) {
    let xs = common::sorted(xs);
    println!(
        "{name:<48} median {:>9.1} {unit}  p95 {:>9.1} {unit}  (n={:>3})  target: {target}",
        percentile(&xs, 0.5),
        percentile(&xs, 0.95),
        xs.len()
    );
}

fn rss_mb(pid: u32) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).map(str::to_string))
        })
        .and_then(|kb| kb.parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

struct Driver {
    child: Child,
    lines: tokio::io::Lines<BufReader<tokio::process::ChildStdout>>,
}

impl Driver {
    async fn send(&mut self, cmd: Json) {
        let stdin = self.child.stdin.as_mut().expect("stdin");
        stdin
            .write_all(format!("{cmd}\n").as_bytes())
            .await
            .expect("write to node");
        stdin.flush().await.expect("flush");
    }

    async fn line(&mut self) -> Json {
        let line = tokio::time::timeout(Duration::from_secs(300), self.lines.next_line())
            .await
            .expect("node answers within 300 s")
            .expect("read")
            .expect("node is running");
        let v: Json = serde_json::from_str(&line).expect("json line");
        assert!(v.get("error").is_none(), "driver error: {v}");
        v
    }

    async fn call(&mut self, cmd: Json) -> Json {
        self.send(cmd).await;
        self.line().await
    }
}

async fn statz(port: u16) -> Option<Json> {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    // admin:bench
    s.write_all(
        b"GET /statz HTTP/1.1\r\nHost: x\r\nAuthorization: Basic YWRtaW46YmVuY2g=\r\nConnection: close\r\n\r\n",
    )
    .await
    .ok()?;
    let mut buf = Vec::new();
    tokio::io::AsyncReadExt::read_to_end(&mut s, &mut buf)
        .await
        .ok()?;
    let text = String::from_utf8_lossy(&buf);
    let body = text.split("\r\n\r\n").nth(1)?;
    serde_json::from_str(body).ok()
}

async fn watermark(port: u16) -> String {
    statz(port)
        .await
        .and_then(|s| s["replica"]["watermark"].as_str().map(str::to_string))
        .unwrap_or_default()
}

async fn wait_watermark_after(port: u16, before: &str) {
    let deadline = Instant::now() + Duration::from_secs(120);
    while watermark(port).await.as_str() <= before {
        assert!(Instant::now() < deadline, "replica did not advance");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::main]
async fn main() {
    let scale = common::scale_from_env();
    let node = common::node();
    assert!(
        node.exists(),
        "{} is missing: run `npm ci --ignore-scripts` in tests/e2e",
        node.display()
    );
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = common::start_postgres(dir.path(), Vec::new());
    common::load_zbugs(
        &pg,
        scale,
        "real zero-cache binary, @rocicorp/zero 1.9.0 clients on Node 22 (kvStore mem); 2-core machine",
    );

    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let replica = dir.path().join("zero.db");
    let mut server = start_server(&pg.uri("postgres"), &replica, port);
    let t = Instant::now();
    wait_watermark(port).await;
    println!(
        "(zero-cache ready with a replica after {:.1} s)",
        t.elapsed().as_secs_f64()
    );
    let (pgc, conn) = tokio_postgres::connect(&pg.uri("postgres"), tokio_postgres::NoTls)
        .await
        .expect("connect");
    tokio::spawn(conn);
    let rules: serde_json::Map<String, Json> = ["user", "issue", "comment", "label", "issueLabel"]
        .iter()
        .map(|t| {
            (
                t.to_string(),
                json!({"row": {"select": [["allow", {"type": "and", "conditions": []}]]}}),
            )
        })
        .collect();
    let before = watermark(port).await;
    pgc.execute(
        "UPDATE zero.permissions SET permissions = $1::text::jsonb",
        &[&json!({ "tables": rules }).to_string()],
    )
    .await
    .expect("permissions");
    wait_watermark_after(port, &before).await;
    // The engine loads the replica in the background; hydrations are measured after that.
    let mut pid = server.id().expect("server pid");
    wait_engine(port, pid).await;

    let only_clients = std::env::var("SYNC_BENCH").is_ok_and(|v| v == "clients");
    if !only_clients {
        real_clients(&node, port, pid, &pgc, scale.issues as usize).await;

        // First query of a shape after a restart: the server prepares the shapes of the
        // queries stored in its CVRs while it loads the replica.
        let _ = server.kill().await;
        let _ = server.wait().await;
        server = start_server(&pg.uri("postgres"), &replica, port);
        pid = server.id().expect("server pid");
        let t = Instant::now();
        wait_watermark(port).await;
        wait_engine(port, pid).await;
        println!(
            "(restarted zero-cache ready after {:.1} s)",
            t.elapsed().as_secs_f64()
        );
        let mut d = driver(&node, port);
        for (q, arg) in [
            ("q1", json!(250)),
            ("q2", json!("i77")),
            ("q3", json!("ui")),
        ] {
            let r = d.call(json!({"cmd": "hydrate", "q": q, "arg": arg})).await;
            let ms = r["ms"].as_f64().expect("ms");
            report(
                &format!("hydration {q} first of its shape after restart"),
                vec![ms],
                "ms",
                "<= 20 ms",
            );
        }
        d.send(json!({"cmd": "exit"})).await;
        let _ = tokio::time::timeout(Duration::from_secs(5), d.child.wait()).await;
    }

    // Many connected clients (protocol-level, each its own group, one shared query): update
    // latency from the Postgres UPDATE to each client's pokeEnd. BENCH_CLIENTS sets how many.
    let n: usize = std::env::var("BENCH_CLIENTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10_000);
    raw_clients(port, pid, &pgc, n).await;
    let _ = server.kill().await;
}

fn start_server(pg_uri: &str, replica: &std::path::Path, port: u16) -> Child {
    Command::new(env!("CARGO_BIN_EXE_zero-cache"))
        .env("ZERO_UPSTREAM_DB", pg_uri)
        .env("ZERO_REPLICA_FILE", replica)
        .env("ZERO_PORT", port.to_string())
        .env("ZERO_ADMIN_PASSWORD", "bench")
        .env(
            "ZERO_LOG_LEVEL",
            std::env::var("BENCH_SERVER_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::inherit())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start zero-cache")
}

async fn wait_watermark(port: u16) {
    let deadline = Instant::now() + Duration::from_secs(300);
    while watermark(port).await.is_empty() {
        assert!(Instant::now() < deadline, "zero-cache did not get ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn wait_engine(port: u16, pid: u32) {
    let t = Instant::now();
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let rows = statz(port).await.and_then(|s| s["engine"]["rows"].as_u64());
        if rows.is_some_and(|n| n > 0) {
            println!(
                "(engine loaded {} rows; waited {:.1} s; server RSS {:.0} MB before any client)",
                rows.unwrap_or_default(),
                t.elapsed().as_secs_f64(),
                rss_mb(pid)
            );
            return;
        }
        assert!(Instant::now() < deadline, "engine did not load");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn driver(node: &std::path::Path, port: u16) -> Driver {
    // BENCH_NODE_PROF=DIR: the driver writes a V8 CPU profile there (`node --cpu-prof`), to see
    // what the real client spends its time on.
    let mut cmd = Command::new(node);
    if let Ok(dir) = std::env::var("BENCH_NODE_PROF") {
        cmd.arg("--cpu-prof").arg(format!("--cpu-prof-dir={dir}"));
    }
    let mut child = cmd
        .arg(e2e_dir().join("bench.mjs"))
        .arg(format!("http://127.0.0.1:{port}"))
        .current_dir(e2e_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("start node");
    let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    Driver { child, lines }
}

/// The scenarios with real `@rocicorp/zero` clients (`tests/e2e/bench.mjs`).
async fn real_clients(
    node: &std::path::Path,
    port: u16,
    pid: u32,
    pgc: &tokio_postgres::Client,
    issues: usize,
) {
    let mut d = driver(node, port);

    // Hydration: each run a new client (a new group) with one query; the first run of a query
    // is the first of its shape in the engine.
    let labels = [
        "bug", "feature", "docs", "perf", "ui", "backend", "zql", "sync", "infra", "test", "p0",
    ];
    for (q, name, zc) in [
        ("q1", "Q1 open issues, limit 100, creator + labels", 207),
        ("q2", "Q2 issue + 100 latest comments + creators", 109),
        ("q3", "Q3 issues with label 'bug', limit 50", 274),
    ] {
        let mut times = Vec::new();
        let mut first = 0.0;
        for run in 0..11 {
            let arg = match q {
                "q1" => json!(100 + run),
                "q2" => json!(format!("i{}", 1 + run * 997 % issues)),
                _ => json!(labels[run % labels.len()]),
            };
            let r = d.call(json!({"cmd": "hydrate", "q": q, "arg": arg})).await;
            let ms = r["ms"].as_f64().expect("ms");
            if run == 0 {
                first = ms;
            } else {
                times.push(ms);
            }
        }
        println!("{name:<48} first of its shape {first:>9.1} ms");
        report(
            &format!("hydration {q} (shape live, new client)"),
            times,
            "ms",
            &format!("<= 20 ms (zero-cache {zc} ms)"),
        );
    }

    // Update latency: one client with Q1, Q2, Q3; time from the Postgres UPDATE to the view.
    let q2_issue = "i42";
    let open = d.call(json!({"cmd": "open", "q2id": q2_issue})).await;
    let q3_ids: Vec<String> = open["q3"]
        .as_array()
        .expect("q3 ids")
        .iter()
        .filter_map(|v| v.as_str().map(str::to_string))
        .collect();
    let q2_comments: Vec<String> = pgc
        .query(
            r#"SELECT id FROM comment WHERE "issueID" = $1 ORDER BY created DESC LIMIT 10"#,
            &[&q2_issue],
        )
        .await
        .expect("comments")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let open_issues: Vec<String> = pgc
        .query("SELECT id FROM issue WHERE open ORDER BY id LIMIT 200", &[])
        .await
        .expect("issues")
        .iter()
        .map(|r| r.get(0))
        .collect();
    let mut stamp = 2e12;
    for (q, zc) in [("q1", 30), ("q2", 18), ("q3", 21)] {
        let mut times = Vec::new();
        for k in 0..30 {
            stamp += 1000.0;
            let (expect, sql, params): (Json, &str, Vec<String>) = match q {
                "q1" => {
                    let id = open_issues[k * 7 % open_issues.len()].clone();
                    (
                        json!({"cmd": "expect", "kind": "q1top", "id": id, "v": stamp}),
                        "UPDATE issue SET modified = $2::text::float8 WHERE id = $1",
                        vec![id, stamp.to_string()],
                    )
                }
                "q2" => {
                    let id = q2_comments[k % q2_comments.len()].clone();
                    let body = format!("edited {k}");
                    (
                        json!({"cmd": "expect", "kind": "q2comment", "id": id, "v": body}),
                        "UPDATE comment SET body = $2 WHERE id = $1",
                        vec![id, body],
                    )
                }
                _ => {
                    let id = q3_ids[k % q3_ids.len()].clone();
                    let title = format!("renamed {k}");
                    (
                        json!({"cmd": "expect", "kind": "q3title", "id": id, "v": title}),
                        "UPDATE issue SET title = $2 WHERE id = $1",
                        vec![id, title],
                    )
                }
            };
            // Prepared before the clock starts: the time runs from the statement's execution
            // (which commits) to the view, without a parse round trip first.
            let stmt = pgc.prepare(sql).await.expect("prepare");
            let armed = d.call(expect).await;
            assert_eq!(armed["armed"], true);
            if std::env::var("BENCH_TRACE").is_ok_and(|v| v == "1") {
                // Lines up with the driver's `trace update` line and the server's log.
                let wall = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                eprintln!("trace update {q}: sent@{:.3}", wall.as_secs_f64() * 1000.0);
            }
            let t = Instant::now();
            pgc.execute(&stmt, &[&params[0], &params[1]])
                .await
                .expect("update");
            let done = d.line().await;
            assert_eq!(done["done"], true);
            times.push(t.elapsed().as_secs_f64() * 1000.0);
        }
        report(
            &format!("update latency {q} (Postgres commit -> view)"),
            times,
            "ms",
            &format!("p50 <= 5 ms (zero-cache {zc} ms)"),
        );
    }

    // 50 concurrent clients, each a new group with Q1. The CPU each side spends on them does
    // not depend on what else runs on the machine (the wall time does).
    let node_pid = d.child.id().unwrap_or_default().to_string();
    let cpu = (
        common::cpu_secs(&pid.to_string(), false),
        common::cpu_secs(&node_pid, false),
    );
    let r = d.call(json!({"cmd": "many", "count": 50})).await;
    report(
        "50 concurrent new clients with Q1 hydrated",
        vec![r["ms"].as_f64().expect("ms")],
        "ms",
        "<= 400 ms (zero-cache 8,400 ms)",
    );
    println!(
        "(CPU for the 50 hydrations: server {:.0} ms, the Node process with the 50 clients {:.0} ms)",
        (common::cpu_secs(&pid.to_string(), false) - cpu.0) * 1000.0,
        (common::cpu_secs(&node_pid, false) - cpu.1) * 1000.0
    );
    let rss = rss_mb(pid);

    // A label rename reaching the 50 views. Label l2 ('feature'), not 'bug': renaming away
    // the label a live Q3 filters on makes the engine re-walk all issues for a match on every
    // later label change (a known engine limitation, see README).
    let mut times = Vec::new();
    for k in 0..10 {
        let name = format!("feature-{k}");
        let armed = d
            .call(json!({"cmd": "expect", "kind": "label", "id": "l2", "v": name}))
            .await;
        assert_eq!(armed["armed"], true);
        let t = Instant::now();
        pgc.execute("UPDATE label SET name = $1 WHERE id = 'l2'", &[&name])
            .await
            .expect("rename");
        let done = d.line().await;
        assert_eq!(done["done"], true);
        times.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    report(
        "label rename reaching 50 views",
        times,
        "ms",
        "<= 50 ms (zero-cache 7,100 ms)",
    );
    report(
        "server RSS with 51 clients connected",
        vec![rss.max(rss_mb(pid))],
        "MB",
        "<= 400 MB (zero-cache 1,300 MB PSS)",
    );
    if let Some(s) = statz(port).await {
        println!(
            "(server: {} client groups, {} connections, engine {} queries / {} shapes / {} subscriptions)",
            s["sync"]["clientGroups"],
            s["sync"]["connections"],
            s["engine"]["queries"],
            s["engine"]["shapes"],
            s["engine"]["subscriptions"]
        );
    }
    d.send(json!({"cmd": "exit"})).await;
    let _ = tokio::time::timeout(Duration::from_secs(5), d.child.wait()).await;
}

fn open_fds(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd")).map_or(0, |d| d.count())
}

async fn raw_clients(port: u16, pid: u32, pgc: &tokio_postgres::Client, n: usize) {
    use futures::StreamExt;
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    // Each client is a socket here and one in the server.
    let limit = zero_cache::server::raise_open_files_limit().unwrap_or(0);
    if (limit as usize) < n + 100 {
        println!("(open files limit {limit} is below {n} clients; some will fail to connect)");
    }
    let schema = json!({"tables": {"issue": {"columns": {
        "id": {"type": "string"}, "title": {"type": "string"}}, "primaryKey": ["id"]}}});
    let query = json!([{"op": "put", "hash": "one", "ttl": 300000, "ast": {"table": "issue",
        "where": {"type": "simple", "op": "=", "left": {"type": "column", "name": "id"},
                  "right": {"type": "literal", "value": "i7"}},
        "orderBy": [["id", "asc"]]}}]);
    let init = json!(["initConnection", {"desiredQueriesPatch": query, "clientSchema": schema}]);
    // (title, when the poke carrying it ended) per client and poke.
    let (seen_tx, mut seen_rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let (connected_tx, mut connected_rx) = tokio::sync::mpsc::unbounded_channel::<()>();
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    // Handshakes in flight at once (the listen backlog is finite).
    let handshakes = std::sync::Arc::new(tokio::sync::Semaphore::new(256));
    let t = Instant::now();
    let rss_before = rss_mb(pid);
    let mut tasks = Vec::new();
    for i in 0..n {
        let proto = zero_cache::sync::connect::encode_sec_protocol(Some(&init), None);
        let url = format!(
            "ws://127.0.0.1:{port}/sync/v51/connect?clientID=c{i}&clientGroupID=raw{i}&userID=anon&baseCookie=&ts=1&lmid=0&wsid=w{i}"
        );
        let seen = seen_tx.clone();
        let connected = connected_tx.clone();
        let handshakes = handshakes.clone();
        let mut stop = stop_rx.clone();
        tasks.push(tokio::spawn(async move {
            let mut ws = None;
            for _attempt in 0..5 {
                let permit = handshakes.acquire().await.expect("semaphore");
                let mut req = url.as_str().into_client_request().expect("request");
                req.headers_mut()
                    .insert("Sec-WebSocket-Protocol", proto.parse().expect("header"));
                // A small read buffer, as the server uses: tungstenite zero-fills the whole
                // buffer (128 KiB by default) before every read.
                let config = tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
                    .read_buffer_size(4096);
                let r =
                    tokio_tungstenite::connect_async_with_config(req, Some(config), false).await;
                drop(permit);
                match r {
                    Ok((s, _)) => {
                        ws = Some(s);
                        break;
                    }
                    Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
                }
            }
            let Some(mut ws) = ws else { return false };
            let _ = connected.send(());
            let mut titles: Vec<String> = Vec::new();
            loop {
                tokio::select! {
                    m = ws.next() => {
                        let Some(Ok(m)) = m else { return false };
                        let Ok(text) = m.into_text() else { continue };
                        // Only parts are parsed: the clients share the machine with the server.
                        if text.starts_with(r#"["pokePart""#) {
                            let Ok(v) = serde_json::from_str::<Json>(&text) else { continue };
                            for p in v[1]["rowsPatch"].as_array().into_iter().flatten() {
                                if let Some(title) = p["value"]["title"].as_str() {
                                    titles.push(title.to_string());
                                }
                            }
                        } else if text.starts_with(r#"["pokeEnd""#) {
                            // The client adopts a poke at its end.
                            let at = Instant::now();
                            for title in titles.drain(..) {
                                let _ = seen.send((title, at));
                            }
                        }
                    }
                    _ = stop.changed() => {
                        let _ = ws.close(None).await;
                        return true;
                    }
                }
            }
        }));
        if i % 100 == 99 {
            tokio::task::yield_now().await;
        }
    }
    drop(seen_tx);
    drop(connected_tx);
    let deadline = Instant::now() + Duration::from_secs(600);
    let mut connected = 0;
    while connected < n {
        match tokio::time::timeout_at(deadline.into(), connected_rx.recv()).await {
            Ok(Some(())) => connected += 1,
            _ => break,
        }
    }
    let connect_s = t.elapsed().as_secs_f64();
    // Hydration: every client gets the row once.
    let mut hydrated = 0;
    while hydrated < connected {
        match tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await {
            Ok(Some(_)) => hydrated += 1,
            _ => break,
        }
    }
    println!(
        "({connected} of {n} protocol-level clients (v51, one group each, one shared query) connected in {connect_s:.1} s, {hydrated} hydrated after {:.1} s; server RSS {:.0} MB (was {rss_before:.0} MB), {} open files)",
        t.elapsed().as_secs_f64(),
        rss_mb(pid),
        open_fds(pid),
    );
    // Let the hydration's CVR writes and pokes settle.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut lat = Vec::new();
    let mut per_update = Vec::new();
    // CPU used per update, independent of what else runs on the machine: the server's, and
    // this process's (the clients reading their pokes).
    let (server_cpu, clients_cpu) = (
        common::cpu_secs(&pid.to_string(), false),
        common::cpu_secs("self", false),
    );
    for k in 0..20 {
        let title = format!("many clients {k}");
        let t0 = Instant::now();
        pgc.execute("UPDATE issue SET title = $1 WHERE id = 'i7'", &[&title])
            .await
            .expect("update");
        let mut got = 0;
        let deadline = Instant::now() + Duration::from_secs(60);
        while got < hydrated {
            match tokio::time::timeout_at(deadline.into(), seen_rx.recv()).await {
                Ok(Some((t, at))) if t == title => {
                    got += 1;
                    lat.push((at - t0).as_secs_f64() * 1000.0);
                }
                Ok(Some(_)) => {}
                _ => break,
            }
        }
        per_update.push(t0.elapsed().as_secs_f64() * 1000.0);
        if got < hydrated {
            println!("(update {k}: only {got} of {hydrated} clients got it within 60 s)");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let server_cpu = (common::cpu_secs(&pid.to_string(), false) - server_cpu) * 1000.0 / 20.0;
    let clients_cpu = (common::cpu_secs("self", false) - clients_cpu) * 1000.0 / 20.0;
    let sorted = common::sorted(lat.clone());
    if !sorted.is_empty() {
        println!(
            "(CPU per update, 200 ms pause included: server {server_cpu:.0} ms, the {hydrated} clients {clients_cpu:.0} ms)"
        );
        let p99 = percentile(&sorted, 0.99);
        report(
            &format!("update latency, {hydrated} connected clients"),
            lat,
            "ms",
            "p99 <= 100 ms with 10,000 clients",
        );
        println!(
            "(p99 {p99:.1} ms, max {:.1} ms; server RSS {:.0} MB)",
            sorted.last().copied().unwrap_or_default(),
            rss_mb(pid)
        );
        report(
            "  last client of an update",
            per_update,
            "ms",
            "(all clients poked)",
        );
    }
    stop_tx.send_replace(true);
    for t in tasks {
        let _ = t.await;
    }
}
