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
