use std::process::{Child, Command, Stdio};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::{TestDb, check_change_log, test_db, wait_equal};
use crate::workload::{WORKLOAD_SCHEMA, run_workload};

fn spawn_server(db: &TestDb) -> Child {
    Command::new(env!("CARGO_BIN_EXE_zero-cache"))
        .env("ZERO_UPSTREAM_DB", &db.uri)
        .env("ZERO_REPLICA_FILE", db.replica_file())
        .env("ZERO_LOG_LEVEL", "warn")
        .env("ZERO_INITIAL_SYNC_TABLE_COPY_WORKERS", "2")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn zero-cache")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_points_loses_and_repeats_nothing() {
    let db = test_db().await;
    db.exec(WORKLOAD_SCHEMA).await;
    // Enough rows that some kills land inside initial sync.
    db.exec(
        "INSERT INTO c SELECT 'seed' || g, repeat(md5(g::text), 20), g FROM generate_series(1, 20000) g;",
    )
    .await;
    let mut rng = StdRng::seed_from_u64(42);
    let writer_uri = db.uri.clone();
    let writer = tokio::spawn(async move {
        let db = TestDb {
            name: String::new(),
            uri: writer_uri.clone(),
            client: crate::support::connect(&writer_uri).await,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..40 {
            run_workload(&db, &mut rng, 10).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut kills = 0;
    while !writer.is_finished() {
        let mut child = spawn_server(&db);
        let ms = if kills == 0 {
            30
        } else {
            rng.random_range(50..400)
        };
        tokio::time::sleep(Duration::from_millis(ms)).await;
        child.kill().expect("kill -9");
        child.wait().expect("reap");
        kills += 1;
    }
    writer.await.expect("writer");
    assert!(kills >= 3, "only {kills} kills happened");

    let mut child = spawn_server(&db);
    // The server may need a resync if a kill landed between sync and registration; allow time.
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while crate::support::try_replica_state(&db.replica_file()).is_none() {
        assert!(
            std::time::Instant::now() < deadline,
            "no replica after restart"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    wait_equal(&db, Duration::from_secs(30)).await;
    child.kill().expect("kill");
    child.wait().expect("reap");
    let checked = check_change_log(&db.replica_file());
    assert!(checked > 20_000, "checked only {checked} rows");
    // No leftover slots: exactly one slot serves this database.
    let slots = db.replication_slot_count().await;
    assert_eq!(slots, 1, "stale replication slots left behind");
}
