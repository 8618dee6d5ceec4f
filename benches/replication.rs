//! Replication benchmark on the zbugs-like dataset (1,000 users, 100,000 issues, 500,000
//! comments, 20 labels, 150,000 issue labels), against a private Postgres started here.
//!
//! Measures: initial sync, warm restart to a ready replica, sustained streaming throughput
//! (catching up on 200,000 row changes), and commit-to-replica latency under light load.
//! Prints each figure (median, p95) beside zero-cache 1.9.0's and the target.
//!
//! `cargo bench --bench replication` (set `BENCH_SCALE=small` for a quick run).

use std::time::{Duration, Instant};

use tokio::sync::watch;
use zero_cache::initial_sync::remove_replica_files;
use zero_cache::replicator;

mod common;
use common::percentile;

fn report(name: &str, unit: &str, xs: Vec<f64>, reference: &str, target: &str) {
    let xs = common::sorted(xs);
    println!(
        "{name:<44} median {:>10.2} {unit:<6} p95 {:>10.2} {unit:<6} (n={:>3})  zero-cache 1.9.0: {reference:<8} target: {target}",
        percentile(&xs, 0.5),
        percentile(&xs, 0.95),
        xs.len()
    );
}

fn rss_mb() -> f64 {
    zero_cache::procstat::peak_rss_bytes() as f64 / (1024.0 * 1024.0)
}

async fn wait_ready(wm: &mut watch::Receiver<String>) {
    tokio::time::timeout(Duration::from_secs(300), wm.wait_for(|w| !w.is_empty()))
        .await
        .expect("ready in time")
        .expect("replicator alive");
}

#[tokio::main]
async fn main() {
    let scale = common::scale_from_env();
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = common::start_postgres(dir.path(), vec![("max_wal_size".into(), "4GB".into())]);
    let t = Instant::now();
    common::load_zbugs(&pg, scale, "2-core machine");
    println!(
        "(dataset generated upstream in {:.1} s)",
        t.elapsed().as_secs_f64()
    );

    let replica = dir.path().join("zero.db");
    let cfg = common::replicator_config(&pg.uri("postgres"), &replica, 5);

    // Initial sync: a fresh replica each run (the previous slot is dropped by the next sync).
    let mut syncs = Vec::new();
    for _ in 0..3 {
        remove_replica_files(&replica).expect("remove replica");
        let t = Instant::now();
        replicator::ensure_replica(&cfg)
            .await
            .expect("initial sync");
        syncs.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    let size_mb = std::fs::metadata(&replica).map(|m| m.len()).unwrap_or(0) as f64 / 1e6;
    report("initial sync", "ms", syncs, "8900 ms", "<= 3000 ms");
    println!("(replica file {size_mb:.0} MB)");

    // Warm restart: existing replica validated, streaming started.
    let mut restarts = Vec::new();
    for _ in 0..7 {
        let (wm_tx, mut wm_rx) = watch::channel(String::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let t = Instant::now();
        let h = tokio::spawn(replicator::run(cfg.clone(), wm_tx, stop_rx));
        wait_ready(&mut wm_rx).await;
        restarts.push(t.elapsed().as_secs_f64() * 1000.0);
        stop_tx.send_replace(true);
        h.await.expect("task").expect("clean stop");
        // Let the walsender release the slot before the next start.
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report(
        "warm restart to ready replica",
        "ms",
        restarts,
        "8900 ms",
        "<= 500 ms",
    );

    // Streaming: 200 transactions x 1,000 row updates generated while stopped, then caught up.
    let client = cfg.upstream.connect().await.expect("connect");
    client
        .batch_execute("CREATE TABLE IF NOT EXISTS bench_marker (id int PRIMARY KEY, n int)")
        .await
        .expect("marker");
    // Let the new table reach the replica before measuring.
    {
        let (wm_tx, mut wm_rx) = watch::channel(String::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let h = tokio::spawn(replicator::run(cfg.clone(), wm_tx, stop_rx));
        wait_ready(&mut wm_rx).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        stop_tx.send_replace(true);
        h.await.expect("task").expect("clean stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut throughputs = Vec::new();
    for round in 0..3 {
        let txns = if common::small() { 20 } else { 200 };
        let per = 1000;
        for i in 0..txns {
            let lo = (round * txns + i) * per % scale.comments.max(1) as usize;
            client
                .batch_execute(&format!(
                    "UPDATE comment SET body = body || '.' WHERE id IN (SELECT 'c' || g FROM generate_series({}, {}) g)",
                    lo + 1,
                    lo + per
                ))
                .await
                .expect("update");
        }
        client
            .batch_execute(&format!(
                "INSERT INTO bench_marker VALUES (1, {round}) ON CONFLICT (id) DO UPDATE SET n = {round}"
            ))
            .await
            .expect("marker");
        let rows = (txns * per) as f64;
        let (wm_tx, _wm_rx) = watch::channel(String::new());
        let (stop_tx, stop_rx) = watch::channel(false);
        let t = Instant::now();
        let h = tokio::spawn(replicator::run(cfg.clone(), wm_tx, stop_rx));
        let conn = loop {
            if let Ok(c) = rusqlite::Connection::open(&replica) {
                break c;
            }
        };
        loop {
            let n: Option<i64> = conn
                .query_row("SELECT n FROM bench_marker WHERE id = 1", [], |r| r.get(0))
                .ok();
            if n == Some(round as i64) {
                break;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        throughputs.push(rows / t.elapsed().as_secs_f64());
        stop_tx.send_replace(true);
        h.await.expect("task").expect("clean stop");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    report(
        "streaming catch-up (1,000-row transactions)",
        "rows/s",
        throughputs,
        "n/a",
        ">= 20000 rows/s",
    );

    // Latency: single-row commits, one at a time.
    let (wm_tx, mut wm_rx) = watch::channel(String::new());
    let (stop_tx, stop_rx) = watch::channel(false);
    let h = tokio::spawn(replicator::run(cfg.clone(), wm_tx, stop_rx));
    wait_ready(&mut wm_rx).await;
    let mut latencies = Vec::new();
    for i in 0..300 {
        wm_rx.borrow_and_update();
        let t = Instant::now();
        client
            .execute(
                "UPDATE issue SET modified = modified + 1 WHERE id = $1",
                &[&format!("i{}", 1 + i)],
            )
            .await
            .expect("update");
        wm_rx.changed().await.expect("watermark");
        latencies.push(t.elapsed().as_secs_f64() * 1000.0);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    report(
        "commit-to-replica latency (single-row txns)",
        "ms",
        latencies,
        "n/a",
        "p50 <= 2 ms",
    );
    stop_tx.send_replace(true);
    h.await.expect("task").expect("clean stop");
    println!("peak RSS of this process: {:.0} MB", rss_mb());
}
