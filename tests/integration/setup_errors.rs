use std::process::{Command, Stdio};
use std::time::Duration;

use zero_cache::devpg::{DevPgOptions, DevPostgres};
use zero_cache::replicator::ReplicatorError;

use crate::support::{start, test_db, wait_equal};

/// Runs the server binary with `env` and returns (exit code, stderr).
fn run_server(env: &[(&str, String)]) -> (i32, String) {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zero-cache"));
    // A free port each time: the default one may be taken by another test's server.
    let port = crate::roles::free_port();
    cmd.env_remove("ZERO_UPSTREAM_DB")
        .env("ZERO_LOG_LEVEL", "error")
        .env("ZERO_PORT", port.to_string())
        .env(
            "ZERO_CHANGE_STREAMER_PORT",
            crate::roles::free_port().to_string(),
        )
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run zero-cache");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_configuration_is_rejected_with_the_option_named() {
    let (code, err) = run_server(&[]);
    assert_ne!(code, 0);
    assert!(err.contains("ZERO_UPSTREAM_DB"), "{err}");
    // Variables set to nothing count as unset (the production guide's "auto-detect").
    let (code, err) = run_server(&[
        ("ZERO_NUM_SYNC_WORKERS", String::new()),
        ("ZERO_CVR_MAX_CONNS", " ".into()),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("ZERO_UPSTREAM_DB"), "{err}");

    let db = test_db().await;
    let file = db.replica_file().to_string_lossy().into_owned();
    let (code, err) = run_server(&[
        ("ZERO_UPSTREAM_DB", db.uri.clone()),
        ("ZERO_REPLICA_FILE", file.clone()),
        ("ZERO_APP_ID", "Bad-App".into()),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("ZERO_APP_ID"), "{err}");

    let (code, err) = run_server(&[
        ("ZERO_UPSTREAM_DB", db.uri.clone()),
        ("ZERO_REPLICA_FILE", file.clone()),
        ("ZERO_APP_PUBLICATIONS", "missing_pub".into()),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("publication \"missing_pub\" does not exist"),
        "{err}"
    );

    let (code, err) = run_server(&[
        ("ZERO_UPSTREAM_DB", db.uri.clone()),
        ("ZERO_AUTO_RESET", "maybe".into()),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("auto-reset") || err.contains("AUTO_RESET"),
        "{err}"
    );

    let (code, err) = run_server(&[
        ("ZERO_UPSTREAM_DB", db.uri.clone()),
        ("ZERO_UPSTREAM_TYPE", "custom".into()),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("ZERO_UPSTREAM_TYPE"), "{err}");

    let (code, err) = run_server(&[
        ("ZERO_UPSTREAM_DB", db.uri.clone()),
        (
            "ZERO_CVR_GARBAGE_COLLECTION_INACTIVITY_THRESHOLD_HOURS",
            "-1".into(),
        ),
    ]);
    assert_ne!(code, 0);
    assert!(
        err.contains("ZERO_CVR_GARBAGE_COLLECTION_INACTIVITY_THRESHOLD_HOURS"),
        "{err}"
    );

    let (code, err) = run_server(&[("ZERO_UPSTREAM_DB", "not a uri".into())]);
    assert_ne!(code, 0);
    assert!(err.contains("invalid upstream URI"), "{err}");
    assert!(
        !std::path::Path::new(&file).exists(),
        "no replica for a failed start"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wal_level_other_than_logical_is_a_clear_error() {
    let dir = tempfile::tempdir().expect("temp dir");
    let pg = DevPostgres::start(
        &dir.path().join("pg"),
        &DevPgOptions {
            port: None,
            fsync: false,
            remove_on_drop: true,
            settings: vec![("wal_level".into(), "replica".into())],
            hba: None,
        },
    )
    .expect("start cluster");
    let (code, err) = run_server(&[
        ("ZERO_UPSTREAM_DB", pg.uri("postgres")),
        (
            "ZERO_REPLICA_FILE",
            dir.path().join("r.db").to_string_lossy().into_owned(),
        ),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("wal_level is \"replica\""), "{err}");
    assert!(err.contains("wal_level = logical"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_role_without_replication_privilege_is_a_clear_error() {
    let db = test_db().await;
    let role = format!("norepl_{}", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN; GRANT CREATE ON DATABASE {} TO {role};",
        db.name
    ))
    .await;
    let (code, err) = run_server(&[
        (
            "ZERO_UPSTREAM_DB",
            format!(
                "postgres://{role}@127.0.0.1:{}/{}",
                crate::support::cluster().port(),
                db.name
            ),
        ),
        (
            "ZERO_REPLICA_FILE",
            db.replica_file().to_string_lossy().into_owned(),
        ),
    ]);
    assert_ne!(code, 0);
    assert!(err.contains("cannot create replication slots"), "{err}");
    assert!(err.contains("REPLICATION"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lost_slot_resyncs_with_auto_reset_and_stops_without_it() {
    let db = test_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
        .await;
    let mut r = start(db.replicator_config());
    r.ready().await;
    r.stop().await.expect("clean stop");
    let slot: String = db
        .client
        .query_one(
            "SELECT slot_name::text FROM pg_replication_slots WHERE database = current_database()",
            &[],
        )
        .await
        .expect("slot")
        .get(0);
    // The walsender of the stopped stream may hold the slot for a moment.
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while let Err(e) = db
        .client
        .execute("SELECT pg_drop_replication_slot($1)", &[&slot])
        .await
    {
        assert!(std::time::Instant::now() < deadline, "drop slot: {e}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    db.exec("INSERT INTO t VALUES (2, 'b');").await;

    let mut cfg = db.replicator_config();
    cfg.auto_reset = false;
    let r = start(cfg);
    let result = r.stopped_by_itself().await;
    match result {
        Err(ReplicatorError::ResetDisabled(msg)) => {
            assert!(msg.contains("no longer exists"), "{msg}")
        }
        other => panic!("expected a reset error, got {other:?}"),
    }

    let mut r = start(db.replicator_config());
    r.ready().await;
    wait_equal(&db, Duration::from_secs(20)).await;
    r.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_of_another_database_is_replaced() {
    let a = test_db().await;
    let b = test_db().await;
    a.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (1);")
        .await;
    b.exec("CREATE TABLE t (id int PRIMARY KEY); INSERT INTO t VALUES (2), (3);")
        .await;
    let mut r = start(a.replicator_config());
    r.ready().await;
    r.stop().await.expect("clean stop");
    // Point b's server at a's replica file.
    std::fs::copy(a.replica_file(), b.replica_file()).expect("copy replica");
    let mut cfg = b.replicator_config();
    cfg.auto_reset = false;
    let r = start(cfg);
    let result = r.stopped_by_itself().await;
    assert!(
        matches!(result, Err(ReplicatorError::ResetDisabled(_))),
        "{result:?}"
    );
    let mut r = start(b.replicator_config());
    r.ready().await;
    wait_equal(&b, Duration::from_secs(20)).await;
    r.stop().await.expect("clean stop");
}
