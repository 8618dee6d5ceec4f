use std::time::Duration;

use crate::support::{self, start, test_db, wait_equal};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn initial_sync_then_streaming_keeps_replica_equal() {
    let db = test_db().await;
    db.exec(
        "CREATE TABLE issue (id text PRIMARY KEY, title text NOT NULL, n int, open bool, modified timestamptz);
         INSERT INTO issue SELECT 'i' || g, 'title ' || g, g, g % 2 = 0, '2024-01-01'::timestamptz + g * interval '1 minute' FROM generate_series(1, 500) g;",
    )
    .await;
    let mut r = start(db.replicator_config());
    r.ready().await;
    wait_equal(&db, Duration::from_secs(10)).await;

    db.exec(
        "INSERT INTO issue VALUES ('new', 'x', 1, true, now());
         UPDATE issue SET title = 'changed' WHERE n < 10;
         DELETE FROM issue WHERE n > 490;
         UPDATE issue SET id = 'renamed' WHERE id = 'i20';",
    )
    .await;
    wait_equal(&db, Duration::from_secs(10)).await;
    let v: String = support::replica_query(
        &db.replica_file(),
        "SELECT \"_0_version\" FROM issue WHERE id = 'new'",
    );
    let wm: String = support::replica_query(
        &db.replica_file(),
        "SELECT \"stateVersion\" FROM \"_zero.replicationState\"",
    );
    assert!(v <= wm, "row version {v} must not exceed watermark {wm}");
    r.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replica_is_vacuumed_at_startup_when_due() {
    let db = test_db().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, body text);
         INSERT INTO t SELECT g, repeat('x', 500) FROM generate_series(1, 5000) g;",
    )
    .await;
    let mut r = start(db.replicator_config());
    r.ready().await;
    db.exec("DELETE FROM t WHERE id > 10;").await;
    wait_equal(&db, Duration::from_secs(10)).await;
    r.stop().await.expect("clean stop");
    let before = std::fs::metadata(db.replica_file()).expect("size").len();
    let mut cfg = db.replicator_config();
    cfg.vacuum_interval_hours = Some(0.0);
    let mut r = start(cfg);
    r.ready().await;
    r.stop().await.expect("clean stop");
    let after = std::fs::metadata(db.replica_file()).expect("size").len();
    assert!(
        after < before / 2,
        "vacuum shrank {before} to {after} bytes"
    );
    let events: i64 = support::replica_query(
        &db.replica_file(),
        "SELECT count(*) FROM \"_zero.runtimeEvents\" WHERE event = 'vacuum'",
    );
    assert_eq!(events, 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_reports_travel_through_the_stream() {
    use std::sync::atomic::Ordering;
    let db = test_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY);").await;
    let mut cfg = db.replicator_config();
    cfg.lag_report_interval = Some(Duration::from_millis(100));
    let stats = std::sync::Arc::clone(&cfg.stats);
    let mut r = start(cfg);
    r.ready().await;
    db.exec("INSERT INTO t VALUES (1); INSERT INTO t VALUES (2);")
        .await;
    wait_equal(&db, Duration::from_secs(10)).await;
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while stats.lag_reports.load(Ordering::Relaxed) < 3 {
        assert!(
            std::time::Instant::now() < deadline,
            "no lag reports came back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let lag = stats.last_lag_ms.load(Ordering::Relaxed);
    assert!((0..5_000).contains(&lag), "lag {lag} ms");
    assert!(stats.transactions.load(Ordering::Relaxed) >= 1);
    r.stop().await.expect("clean stop");
}
