//! Custom-mutation benchmark: the real `@rocicorp/zero` 1.9.0 client (Node 22, `tests/e2e`)
//! pushes `item.create` through this server to a real API server built on
//! `@rocicorp/zero/server` (postgres.js adapter), against a private Postgres started here.
//!
//! Measures confirmation latency (client call → `.server` resolved, i.e. the LMID came back
//! through replication and a poke) one mutation at a time from one client, and confirmed
//! mutations per second from 50 clients writing at once.
//!
//! Workload choices (printed with the figures): clients materialize no query, as a client that
//! views only its own or related data would not see the other clients' rows, so a confirmation
//! costs each client its own poke only; Postgres runs with production durability (fsync,
//! synchronous commit, full page writes) unless `BENCH_PG_FSYNC=off`.
//!
//! `cargo bench --bench writes` (needs `npm ci` in tests/e2e, as `scripts/test.sh` does).
//! `BENCH_API_WORKERS=N` runs the API server as N processes sharing its port (default 1);
//! `BENCH_INFLIGHT=N` mutations in flight per client (default 8); `BENCH_CLIENT_PROCS=N` Node
//! processes sharing the 50 clients (default 1).

use std::process::Stdio;
use std::time::Duration;

use serde_json::Value as Json;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::Command;
use tokio::sync::watch;
use zero_cache::replicator;
use zero_cache::sync::{self, SyncOptions, WriteAuthOptions};

mod common;
use common::{cpu_secs, e2e_dir, node, percentile};

/// Runs a Node script to its end and returns its JSON output lines.
async fn run_node(script: &str, args: &[String]) -> Vec<Json> {
    run_node_env(script, args, &[]).await
}

/// [`run_node`] with extra environment variables.
async fn run_node_env(script: &str, args: &[String], env: &[(&str, String)]) -> Vec<Json> {
    let mut child = Command::new(node())
        .arg(e2e_dir().join(script))
        .args(args)
        .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
        .current_dir(e2e_dir())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .expect("node");
    let mut lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
    let mut out = Vec::new();
    while let Ok(Ok(Some(l))) =
        tokio::time::timeout(Duration::from_secs(300), lines.next_line()).await
    {
        if let Ok(v) = serde_json::from_str::<Json>(&l) {
            if v.get("error").is_some() {
                panic!("client error: {v}");
            }
            out.push(v);
        }
    }
    let _ = child.wait().await;
    out
}

fn times(lines: &[Json]) -> (Vec<f64>, f64, usize) {
    let done = lines
        .iter()
        .find(|l| l.get("done").is_some())
        .expect("done line");
    let mut t: Vec<f64> = done["times"]
        .as_array()
        .expect("times")
        .iter()
        .filter_map(Json::as_f64)
        .collect();
    t.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    (
        t,
        done["ms"].as_f64().expect("ms"),
        done["done"].as_u64().unwrap_or(0) as usize,
    )
}

/// CPU seconds of the process tree rooted at `root` (its live descendants included).
fn tree_cpu_secs(root: u32) -> f64 {
    let mut parents: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(pid) = e.file_name().to_str().and_then(|n| n.parse::<u32>().ok()) else {
                continue;
            };
            let ppid = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .ok()
                .and_then(|s| {
                    s.rsplit_once(')')
                        .and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok())
                });
            if let Some(ppid) = ppid {
                parents.push((pid, ppid));
            }
        }
    }
    let mut tree = vec![root];
    let mut i = 0;
    while i < tree.len() {
        let p = tree[i];
        tree.extend(parents.iter().filter(|(_, pp)| *pp == p).map(|(c, _)| *c));
        i += 1;
    }
    tree.iter().map(|p| cpu_secs(&p.to_string(), false)).sum()
}

fn env_num(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The 1-minute load average, to print beside the figures (the machine is shared).
fn load_avg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .and_then(|s| s.split_whitespace().next().map(str::to_string))
        .unwrap_or_else(|| "?".into())
}

#[tokio::main]
async fn main() {
    assert!(node().exists(), "run `npm ci` in tests/e2e first");
    let dir = tempfile::tempdir().expect("temp dir");
    let fsync = std::env::var("BENCH_PG_FSYNC").as_deref() != Ok("off");
    let pg = common::start_postgres_durable(dir.path(), Vec::new(), fsync);
    let uri = pg.uri("postgres");
    pg.psql(
        "postgres",
        "CREATE TABLE item (id text PRIMARY KEY, title text NOT NULL, n float8 NOT NULL, owner text);",
    )
    .expect("schema");
    let replica_file = dir.path().join("zero.db");
    let cfg = common::replicator_config(&uri, &replica_file, 2);
    let (wm_tx, mut wm_rx) = watch::channel(String::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let repl = tokio::spawn(replicator::run(cfg, wm_tx, stop_rx));
    tokio::time::timeout(Duration::from_secs(60), wm_rx.wait_for(|w| !w.is_empty()))
        .await
        .expect("replica ready")
        .expect("replicator alive");
    pg.psql(
        "postgres",
        r#"UPDATE zero.permissions SET permissions = '{"tables":{"item":{"row":{"select":[["allow",{"type":"and","conditions":[]}]]}}}}'"#,
    )
    .expect("permissions");

    // The API server.
    let api_workers: usize = env_num("BENCH_API_WORKERS", 1);
    let mut api = Command::new(node())
        .arg(e2e_dir().join("api-server.mjs"))
        .arg(&uri)
        .env("API_WORKERS", api_workers.to_string())
        .current_dir(e2e_dir())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("api server");
    let mut api_lines = BufReader::new(api.stdout.take().expect("stdout")).lines();
    let first = api_lines
        .next_line()
        .await
        .expect("read")
        .expect("port line");
    let port = serde_json::from_str::<Json>(&first).expect("json")["port"]
        .as_u64()
        .expect("port");
    // Drain the request log so that the API server never blocks on a full pipe.
    tokio::spawn(async move { while let Ok(Some(_)) = api_lines.next_line().await {} });

    let mut cvr = replica_file.clone().into_os_string();
    cvr.push("-cvr.db");
    let opts = SyncOptions {
        addr: "127.0.0.1:0".parse().expect("addr"),
        replica_file: replica_file.clone(),
        cvr_file: cvr.into(),
        app_id: "zero".into(),
        shard_schema: "zero_0".into(),
        num_workers: 1,
        admin_password: None,
        development: true,
        max_payload_bytes: 10 << 20,
        query_urls: Vec::new(),
        query_api_key: None,
        mutate_urls: vec![format!("http://127.0.0.1:{port}/mutate")],
        mutate_api_key: None,
        writes: WriteAuthOptions::default(),
        cvr_db: None,
        cvr_max_conns: 4,
        hydration_stats: false,
        slow_hydrate_ms: 100.0,
        cvr_gc: Default::default(),
        server_version: None,
    };
    let server = sync::bind(opts, wm_rx.clone()).await.expect("bind");
    let addr = server.addr;
    let (stop_sync, mut stop_sync_rx) = watch::channel(false);
    let serving = tokio::spawn(server.serve(async move {
        let _ = stop_sync_rx.wait_for(|s| *s).await;
    }));
    let url = format!("http://{addr}");
    println!(
        "dataset: table item (4 columns); custom mutator item.create (one INSERT) through @rocicorp/zero/server \
         + postgres.js (pool of 10 per process); API server processes: {api_workers} (BENCH_API_WORKERS); \
         Postgres local, {durability}; clients materialize no query (each views only its own data: \
         a confirmation is its own LMID poke); 1 sync worker; 2-core machine shared with the Node \
         clients and API server; load average at start {}",
        load_avg(),
        durability = if fsync {
            "fsync on, synchronous_commit on (production durability)"
        } else {
            "fsync off (BENCH_PG_FSYNC=off: not a production setting)"
        },
    );

    // Latency: one client, one mutation at a time (first 20 are warm-up).
    let lines = run_node(
        "multi.mjs",
        &[
            url.clone(),
            "1".into(),
            "220".into(),
            "1".into(),
            "lat".into(),
            "none".into(),
        ],
    )
    .await;
    let (t, _, _) = times(&lines);
    let t: Vec<f64> = t.into_iter().collect();
    let mut warm = t.clone();
    warm.drain(..warm.len().min(20));
    println!(
        "custom mutation confirmation latency (1 client)   median {:>7.2} ms  p95 {:>7.2} ms  (n={})  zero-cache 1.9.0: 39 ms   target: <= 10 ms median",
        percentile(&warm, 0.5),
        percentile(&warm, 0.95),
        warm.len()
    );

    // Throughput: 50 clients, BENCH_INFLIGHT mutations in flight each; three rounds.
    let inflight: usize = env_num("BENCH_INFLIGHT", 8);
    let procs: usize = env_num("BENCH_CLIENT_PROCS", 1).clamp(1, 50);
    let (clients, per) = (50usize, 60usize);
    let mut rates = Vec::new();
    let mut lat = Vec::new();
    let postmaster: Option<u32> = std::fs::read_to_string(pg.dir().join("postmaster.pid"))
        .ok()
        .and_then(|s| s.lines().next()?.trim().parse().ok());
    let api_pid = api.id().expect("API server running");
    let cpu0 = (
        cpu_secs("self", false),
        tree_cpu_secs(api_pid),
        postmaster.map_or(0.0, tree_cpu_secs),
        cpu_secs("self", true),
    );
    for round in 0..3 {
        // Every process starts its first call at the same moment, once all are connected.
        let start_at = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .expect("clock")
            .as_millis()
            + 3000
            + 40 * clients as u128;
        let runs = (0..procs).map(|p| {
            let n = clients / procs + usize::from(p < clients % procs);
            let args = vec![
                url.clone(),
                n.to_string(),
                per.to_string(),
                inflight.to_string(),
                format!("tp{round}p{p}"),
                "none".into(),
            ];
            async move {
                run_node_env(
                    "multi.mjs",
                    &args,
                    &[("MULTI_START_AT", start_at.to_string())],
                )
                .await
            }
        });
        let outs = futures::future::join_all(runs).await;
        let (mut first, mut last, mut n) = (f64::MAX, 0f64, 0usize);
        for lines in &outs {
            let (t, _, k) = times(lines);
            let done = lines
                .iter()
                .find(|l| l.get("done").is_some())
                .expect("done");
            first = first.min(done["start"].as_f64().expect("start"));
            last = last.max(done["end"].as_f64().expect("end"));
            n += k;
            lat.extend(t);
        }
        assert_eq!(n, clients * per, "every mutation confirmed");
        rates.push(n as f64 / ((last - first) / 1000.0));
    }
    let rates = common::sorted(rates);
    let lat = common::sorted(lat);
    println!(
        "confirmed mutations/s ({clients} clients x {per}, {inflight} in flight each, {procs} client process(es))  median {:>7.0}/s  worst {:>7.0}/s  (3 rounds, window: first call to last confirmation; confirmation p50 {:.1} ms, p95 {:.1} ms)  target: >= 2000/s",
        percentile(&rates, 0.5),
        rates[0],
        percentile(&lat, 0.5),
        percentile(&lat, 0.95)
    );
    // Where the CPU of those rounds went: ms per confirmed mutation, and the rate the machine's
    // cores could sustain at that cost if nothing else ran on them.
    let n = (3 * clients * per) as f64 / 1000.0;
    let ours = (cpu_secs("self", false) - cpu0.0) / n;
    let api_ms = (tree_cpu_secs(api_pid) - cpu0.1) / n;
    let pg_ms = (postmaster.map_or(0.0, tree_cpu_secs) - cpu0.2) / n;
    let clients_ms = (cpu_secs("self", true) - cpu0.3) / n;
    println!(
        "CPU per confirmed mutation: this server (sync + replicator) {ours:.2} ms, API server {api_ms:.2} ms, Postgres {pg_ms:.2} ms, Zero clients {clients_ms:.2} ms"
    );
    let cores = std::thread::available_parallelism().map_or(1, |c| c.get()) as f64;
    let all = ours + api_ms + pg_ms + clients_ms;
    let server_side = ours + api_ms + pg_ms;
    println!(
        "CPU ceiling on {cores} cores: {:.0}/s with the clients on this machine ({all:.2} ms per mutation), {:.0}/s for the server side alone (clients on their own machines, {server_side:.2} ms), {:.0}/s for this server alone ({ours:.2} ms)  target: >= 2000/s",
        cores * 1000.0 / all,
        cores * 1000.0 / server_side,
        cores * 1000.0 / ours,
    );

    // The API server alone, driven the same way (50 senders), for comparison.
    let mut alone = Vec::new();
    for _ in 0..3 {
        let lines = run_node(
            "api-probe.mjs",
            &[
                format!("http://127.0.0.1:{port}/mutate"),
                "50".into(),
                "60".into(),
            ],
        )
        .await;
        alone.push(
            lines.last().expect("probe result")["rate"]
                .as_f64()
                .expect("rate"),
        );
    }
    let alone = common::sorted(alone);
    println!(
        "the API server alone (50 senders x 60 pushes, no zero-cache)  median {:>7.0}/s  worst {:>7.0}/s  (the ceiling of the figure above)",
        percentile(&alone, 0.5),
        alone[0]
    );

    stop_sync.send_replace(true);
    let _ = tokio::time::timeout(Duration::from_secs(5), serving).await;
    stop_tx.send_replace(true);
    let _ = repl.await;
    drop(api.stdin.take());
    let _ = api.kill().await;
}
