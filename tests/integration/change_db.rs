//! `ZERO_CHANGE_DB`: a replication manager that keeps its change log in a second Postgres
//! database of the harness cluster, view syncers that find it with
//! `ZERO_CHANGE_STREAMER_MODE=discover`, and kill -9 of the manager (including between its
//! change-DB commit and its replica commit) without loss or duplicates.

use std::path::{Path, PathBuf};
use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::json;

use crate::roles::{
    Node, SCHEMA, allow_issue, free_port, inode, manager, one, spawn, stderr_of, wait_http_ok,
    wait_replica, wait_rows_equal,
};
use crate::support::{
    TestDb, check_change_log, connect, replica_rows, replica_schema, test_db, try_replica_state,
};
use crate::sync_e2e::ViewProcess;
use crate::workload::{WORKLOAD_SCHEMA, run_workload};

const CDC: &str = "\"zero_0/cdc\"";

/// A second database in the harness cluster for the change log.
struct ChangeDb {
    name: String,
    uri: String,
    client: tokio_postgres::Client,
}

async fn change_db(db: &TestDb) -> ChangeDb {
    let pg = crate::support::cluster();
    let name = format!("{}_change", db.name);
    connect(&pg.uri("postgres"))
        .await
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create change database");
    let uri = pg.uri(&name);
    let client = connect(&uri).await;
    ChangeDb { name, uri, client }
}

impl ChangeDb {
    async fn count(&self, sql: &str) -> i64 {
        self.client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|e| panic!("{sql}: {e}"))
            .get(0)
    }

    /// The log's watermarks, oldest first.
    async fn log(&self) -> Vec<String> {
        self.client
            .query(
                &format!(r#"SELECT watermark FROM {CDC}."changeLog" ORDER BY watermark"#),
                &[],
            )
            .await
            .expect("changeLog")
            .iter()
            .map(|r| r.get(0))
            .collect()
    }

    async fn wait_owner_address(&self) -> String {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            let r = self
                .client
                .query_opt(
                    &format!(r#"SELECT "ownerAddress" FROM {CDC}."replicationState""#),
                    &[],
                )
                .await;
            if let Ok(Some(row)) = r
                && let Some(a) = row.get::<_, Option<String>>(0)
            {
                return a;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "no ownerAddress published"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

fn manager_env(cdb: &ChangeDb, cs: u16) -> Vec<(&'static str, String)> {
    vec![
        ("ZERO_CHANGE_DB", cdb.uri.clone()),
        ("ZERO_CHANGE_MAX_CONNS", "2".to_string()),
        ("ZERO_CHANGE_STREAMER_ADDRESS", format!("127.0.0.1:{cs}")),
    ]
}

/// A view syncer that finds the manager through the change DB (no ZERO_CHANGE_STREAMER_URI).
fn discovering_view_syncer(
    db: &TestDb,
    cdb: &ChangeDb,
    replica: &Path,
    port: u16,
) -> tokio::process::Child {
    spawn(
        db,
        &[
            ("ZERO_REPLICA_FILE", replica.display().to_string()),
            ("ZERO_CHANGE_STREAMER_MODE", "discover".into()),
            ("ZERO_CHANGE_DB", cdb.uri.clone()),
            ("ZERO_PORT", port.to_string()),
            ("ZERO_NUM_SYNC_WORKERS", "1".into()),
        ],
    )
}

/// A manager keeping its log in the change DB and a view syncer that finds it there, each with
/// its replica in the test's directory (the view syncer is started, not yet caught up).
struct DiscoveredPair {
    m: Node,
    v: tokio::process::Child,
    m_file: PathBuf,
    v_file: PathBuf,
    cs: u16,
    env: Vec<(&'static str, String)>,
}

async fn manager_and_discovering_view_syncer(db: &TestDb, cdb: &ChangeDb) -> DiscoveredPair {
    let dir = db.dir.path();
    let (m_file, v_file) = (dir.join("m.db"), dir.join("v.db"));
    let cs = free_port();
    let env = manager_env(cdb, cs);
    let m = manager(db, &m_file, cs, &env);
    wait_replica(&m_file).await;
    cdb.wait_owner_address().await;
    let v = discovering_view_syncer(db, cdb, &v_file, free_port());
    DiscoveredPair {
        m,
        v,
        m_file,
        v_file,
        cs,
        env,
    }
}

fn has_sqlite_log(path: &Path) -> bool {
    let conn = rusqlite::Connection::open(path).expect("open replica");
    conn.query_row(
        "SELECT count(*) FROM sqlite_master WHERE name = '_zero.changeStream'",
        [],
        |r| r.get::<_, i64>(0),
    )
    .expect("sqlite_master")
        > 0
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_with_change_db_feeds_a_discovering_view_syncer_across_restarts() {
    let db = test_db().await;
    db.exec(SCHEMA).await;
    let cdb = change_db(&db).await;
    let dir = db.dir.path().to_path_buf();
    let (m_file, v_file) = (dir.join("m.db"), dir.join("v.db"));
    let cs = free_port();
    let _m = manager(&db, &m_file, cs, &manager_env(&cdb, cs));
    wait_http_ok(cs, "/keepalive").await;
    wait_replica(&m_file).await;
    assert_eq!(cdb.wait_owner_address().await, format!("127.0.0.1:{cs}"));
    allow_issue(&db).await;

    let port = free_port();
    let mut v = discovering_view_syncer(&db, &cdb, &v_file, port);
    wait_http_ok(port, "/keepalive").await;
    let mut client = ViewProcess::start(&format!("http://127.0.0.1:{port}"));
    client.wait_for(&json!([one("i1", "one", 1)])).await;
    let n0 = cdb.log().await.len();

    db.exec("INSERT INTO issue VALUES ('i2', 'two', true, 2, NULL);")
        .await;
    client
        .wait_for(&json!([one("i1", "one", 1), one("i2", "two", 2)]))
        .await;
    // The log is in the change DB, not in the replica.
    assert_eq!(cdb.log().await.len(), n0 + 1, "{:?}", cdb.log().await);
    assert!(!has_sqlite_log(&m_file));

    // The view syncer dies; upstream moves on; it restarts, discovers the manager again and
    // catches up from the change DB on its own replica (no snapshot).
    let ino = inode(&v_file);
    v.kill().await.expect("kill view syncer");
    db.exec("UPDATE issue SET title = 'TWO' WHERE id = 'i2';")
        .await;
    db.exec("INSERT INTO issue VALUES ('i3', 'three', true, 3, NULL);")
        .await;
    let _v = discovering_view_syncer(&db, &cdb, &v_file, port);
    client
        .wait_for(&json!([
            one("i1", "one", 1),
            one("i2", "TWO", 2),
            one("i3", "three", 3)
        ]))
        .await;
    assert_eq!(inode(&v_file), ino, "the view syncer resumed its replica");
    wait_rows_equal(&db, &m_file).await;
    wait_rows_equal(&db, &v_file).await;
    assert_eq!(
        replica_rows(&v_file, &replica_schema(&v_file)),
        replica_rows(&m_file, &replica_schema(&m_file))
    );
    check_change_log(&v_file);
    assert_eq!(cdb.log().await.len(), n0 + 3);

    // The pool stays within ZERO_CHANGE_MAX_CONNS (the test's own session excluded).
    let conns = cdb
        .count(&format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = '{}' AND pid <> pg_backend_pid()",
            cdb.name
        ))
        .await;
    assert!((1..=2).contains(&conns), "{conns} change DB connections");
    client.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_that_died_between_change_db_and_replica_commits_loses_and_repeats_nothing() {
    let db = test_db().await;
    db.exec(SCHEMA).await;
    let cdb = change_db(&db).await;
    let dir = db.dir.path().to_path_buf();
    let DiscoveredPair {
        mut m,
        v: _v,
        m_file,
        v_file,
        cs,
        env,
    } = manager_and_discovering_view_syncer(&db, &cdb).await;
    wait_rows_equal(&db, &v_file).await;
    let v_ino = inode(&v_file);

    // The replica as it was before the next transaction.
    m.child.kill().await.expect("kill manager");
    let before = dir.join("before");
    std::fs::create_dir(&before).expect("mkdir");
    let copy = |from: &Path, to: &Path| {
        for ext in ["", "-wal", "-shm"] {
            let (a, b) = (
                format!("{}{ext}", from.display()),
                format!("{}{ext}", to.display()),
            );
            let _ = std::fs::remove_file(&b);
            if Path::new(&a).exists() {
                std::fs::copy(&a, &b).expect("copy replica");
            }
        }
    };
    copy(&m_file, &before.join("m.db"));
    let w1 = try_replica_state(&m_file).expect("state").watermark;

    // The transaction reaches the change DB and the replica; then the replica is put back:
    // the state a kill between the two commits leaves (only the change DB has it).
    let mut m = manager(&db, &m_file, cs, &env);
    let lsn: String = db
        .client
        .query_one("SELECT pg_current_wal_lsn()::text", &[])
        .await
        .expect("lsn")
        .get(0);
    db.exec("INSERT INTO issue VALUES ('i2', 'two', true, 2, NULL);")
        .await;
    wait_rows_equal(&db, &m_file).await;
    wait_rows_equal(&db, &v_file).await;
    // Once the slot has acknowledged it, upstream will not send the transaction again: after
    // the rollback below only the change DB can bring it back.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let acked: bool = db
            .client
            .query_one(
                "SELECT bool_or(confirmed_flush_lsn > $1::text::pg_lsn) FROM pg_replication_slots WHERE database = current_database()",
                &[&lsn],
            )
            .await
            .expect("slot")
            .get(0);
        if acked {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "slot never acknowledged"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    m.child.kill().await.expect("kill manager");
    copy(&before.join("m.db"), &m_file);
    assert_eq!(try_replica_state(&m_file).expect("state").watermark, w1);
    let ahead = cdb.log().await.into_iter().filter(|w| *w > w1).count();
    assert!(ahead >= 1, "the change DB is ahead of the replica");

    // More upstream changes while it is down; on restart the replica takes the missing
    // transaction from the change DB, then streams the rest exactly once.
    db.exec("UPDATE issue SET n = 10 WHERE id = 'i1'; INSERT INTO issue VALUES ('i3', 'three', true, 3, NULL);")
        .await;
    let mut m = manager(&db, &m_file, cs, &env);
    wait_rows_equal(&db, &m_file).await;
    wait_rows_equal(&db, &v_file).await;
    let m_rows = replica_rows(&m_file, &replica_schema(&m_file));
    assert_eq!(m_rows["issue"].len(), 3);
    assert_eq!(replica_rows(&v_file, &replica_schema(&v_file)), m_rows);
    let log = cdb.log().await;
    assert!(log.len() > ahead, "{log:?}");
    assert_eq!(
        try_replica_state(&m_file).expect("state").watermark,
        *log.last().expect("log"),
        "the replica is at the log's last transaction"
    );
    check_change_log(&m_file);
    check_change_log(&v_file);
    assert_eq!(
        inode(&v_file),
        v_ino,
        "the view syncer never needed a snapshot"
    );
    m.child.kill().await.expect("kill manager");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_manager_with_change_db_mid_stream_loses_and_repeats_nothing() {
    let db = test_db().await;
    db.exec(WORKLOAD_SCHEMA).await;
    let cdb = change_db(&db).await;
    let DiscoveredPair {
        m,
        v: _v,
        m_file,
        v_file,
        cs,
        env,
    } = manager_and_discovering_view_syncer(&db, &cdb).await;
    wait_replica(&v_file).await;
    let v_ino = inode(&v_file);

    let writer_uri = db.uri.clone();
    let writer = tokio::spawn(async move {
        let db = TestDb {
            name: String::new(),
            uri: writer_uri.clone(),
            client: connect(&writer_uri).await,
            dir: tempfile::tempdir().expect("temp dir"),
        };
        let mut rng = StdRng::seed_from_u64(11);
        for _ in 0..25 {
            run_workload(&db, &mut rng, 4).await;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    let mut rng = StdRng::seed_from_u64(5);
    let mut m = m;
    let mut kills = 0;
    while !writer.is_finished() {
        tokio::time::sleep(Duration::from_millis(rng.random_range(100..400))).await;
        m.child.kill().await.expect("kill -9 manager");
        kills += 1;
        m = manager(&db, &m_file, cs, &env);
    }
    writer.await.expect("writer");
    assert!(kills >= 3, "only {kills} kills happened");

    // Both replicas converge to upstream; the view syncer got every transaction from the
    // change DB log (never a snapshot), so the log has no gap; versions are unique (key).
    let up_schema = zero_cache::upstream::published_schema(
        &db.client,
        &zero_cache::upstream::Shard::new("zero", 0, &[]),
    )
    .await
    .expect("schema");
    let want = crate::support::upstream_rows(&db.client, &up_schema).await;
    for f in [&m_file, &v_file] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        while try_replica_state(f).is_none() || replica_rows(f, &up_schema) != want {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{} did not converge",
                f.display()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        check_change_log(f);
    }
    assert_eq!(
        inode(&v_file),
        v_ino,
        "the view syncer never needed a snapshot"
    );
    let log = cdb.log().await;
    assert_eq!(
        try_replica_state(&m_file).expect("state").watermark,
        *log.last().expect("log"),
    );
    m.child.kill().await.expect("kill manager");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_db_errors_are_clear_and_purge_moves_the_log_start() {
    let db = test_db().await;
    db.exec(SCHEMA).await;
    let dir = db.dir.path().to_path_buf();

    // Unreachable change DB: the manager stops at once, naming the setting.
    let closed = free_port();
    let child = spawn(
        &db,
        &[
            ("ZERO_REPLICA_FILE", dir.join("x.db").display().to_string()),
            ("ZERO_NUM_SYNC_WORKERS", "0".into()),
            ("ZERO_PORT", free_port().to_string()),
            (
                "ZERO_CHANGE_DB",
                format!("postgres://postgres@127.0.0.1:{closed}/change"),
            ),
        ],
    );
    let (status, err) = stderr_of(child).await;
    assert!(!status.success());
    assert!(
        err.contains("ZERO_CHANGE_DB: cannot connect to") && err.contains(&closed.to_string()),
        "{err}"
    );

    // A log of another initial sync with ZERO_AUTO_RESET off: a clear error.
    let cdb = change_db(&db).await;
    let cfg = zero_cache::pgconn::UpstreamConfig::parse(&cdb.uri).expect("uri");
    let store = zero_cache::change_db::ChangeDb::open(cfg, "zero_0/cdc".into(), 2)
        .await
        .expect("open");
    let pubs = vec!["_zero_public_0".to_string()];
    let c = store
        .claim("a", "127.0.0.1:1", "00", &pubs, "00", false)
        .await
        .expect("claim");
    assert_eq!(c.min_watermark, "00");
    for v in ["01", "02", "03"] {
        store.append("a", v, "[]").await.expect("append");
    }
    // Another owner takes over; the first one's appends now fail.
    store
        .claim("b", "127.0.0.1:2", "00", &pubs, "03", false)
        .await
        .expect("claim b");
    let e = store.append("a", "04", "[]").await.expect_err("superseded");
    assert!(e.is_fatal() && e.to_string().contains("127.0.0.1:2"), "{e}");
    let e = store
        .claim("c", "127.0.0.1:3", "10", &pubs, "15", false)
        .await
        .expect_err("mismatch");
    assert!(
        e.to_string().contains("replica version 00") && e.to_string().contains("ZERO_AUTO_RESET"),
        "{e}"
    );
    // A replica behind the log gets the log's later transactions back.
    let c = store
        .claim("b", "127.0.0.1:2", "00", &pubs, "01", false)
        .await
        .expect("claim");
    let pending: Vec<_> = c.pending.iter().map(|(v, _)| v.as_str()).collect();
    assert_eq!(pending, ["02", "03"]);

    // Purge drops entries up to the given watermark (written before the cut-off) and moves
    // the start; reading before the start is refused.
    let n = store
        .purge("02", zero_cache::replica::now_ms() + 1000)
        .await
        .expect("purge");
    assert_eq!(n, 2);
    assert_eq!(cdb.log().await, ["03"]);
    assert!(
        store
            .read_after("00", "01", 10, 1 << 20)
            .await
            .expect("read")
            .is_err()
    );
    let r = store
        .read_after("00", "02", 10, 1 << 20)
        .await
        .expect("read")
        .expect("reaches back");
    assert_eq!(r.len(), 1);
    assert_eq!(r[0].0, "03");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_change_db_view_syncers_discover_the_manager_through_upstream() {
    let db = test_db().await;
    db.exec(SCHEMA).await;
    let dir = db.dir.path().to_path_buf();
    let (m_file, v_file) = (dir.join("m.db"), dir.join("v.db"));
    let cs = free_port();
    let _m = manager(
        &db,
        &m_file,
        cs,
        &[("ZERO_CHANGE_STREAMER_ADDRESS", format!("127.0.0.1:{cs}"))],
    );
    wait_replica(&m_file).await;
    // The log stays in the replica; the address is published in the upstream database.
    let port = free_port();
    let _v = spawn(
        &db,
        &[
            ("ZERO_REPLICA_FILE", v_file.display().to_string()),
            ("ZERO_CHANGE_STREAMER_MODE", "discover".into()),
            ("ZERO_PORT", port.to_string()),
        ],
    );
    wait_http_ok(port, "/keepalive").await;
    db.exec("INSERT INTO issue VALUES ('i2', 'two', true, 2, NULL);")
        .await;
    wait_rows_equal(&db, &v_file).await;
    assert!(has_sqlite_log(&m_file));
    let addr: String = db
        .client
        .query_one(
            &format!(r#"SELECT "ownerAddress" FROM {CDC}."replicationState""#),
            &[],
        )
        .await
        .expect("replicationState")
        .get(0);
    assert_eq!(addr, format!("127.0.0.1:{cs}"));
}
