//! The production deployment: a replication manager (`ZERO_NUM_SYNC_WORKERS=0`) and view
//! syncers (`ZERO_CHANGE_STREAMER_URI`) as separate `zero-cache` processes against the harness
//! Postgres, with the real client on each view syncer; kills and restarts; configuration
//! mismatches; backup to `file://` and restore.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use serde_json::{Value as Json, json};
use tokio::process::{Child, Command};

use crate::support::{TestDb, replica_rows, replica_schema, test_db, try_replica_state};
use crate::sync_e2e::{ViewProcess, issue};

pub(crate) fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port()
}

pub(crate) struct Node {
    pub(crate) child: Child,
    pub(crate) port: u16,
}

pub(crate) fn spawn(db: &TestDb, envs: &[(&str, String)]) -> Child {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_zero-cache"));
    cmd.env("ZERO_UPSTREAM_DB", &db.uri)
        .env("ZERO_LOG_LEVEL", "warn")
        .env("ZERO_ADMIN_PASSWORD", "pw")
        .env("ZERO_INITIAL_SYNC_TABLE_COPY_WORKERS", "2")
        .env("ZERO_REPLICATION_LAG_REPORT_INTERVAL_MS", "0")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.spawn().expect("spawn zero-cache")
}

pub(crate) fn manager(db: &TestDb, replica: &Path, cs_port: u16, extra: &[(&str, String)]) -> Node {
    let port = free_port();
    let mut envs = vec![
        ("ZERO_REPLICA_FILE", replica.display().to_string()),
        ("ZERO_NUM_SYNC_WORKERS", "0".to_string()),
        ("ZERO_PORT", port.to_string()),
        ("ZERO_CHANGE_STREAMER_PORT", cs_port.to_string()),
    ];
    envs.extend(extra.iter().cloned());
    Node {
        child: spawn(db, &envs),
        port: cs_port,
    }
}

fn view_syncer(db: &TestDb, replica: &Path, cs_port: u16, port: u16) -> Node {
    let envs = vec![
        ("ZERO_REPLICA_FILE", replica.display().to_string()),
        (
            "ZERO_CHANGE_STREAMER_URI",
            format!("http://127.0.0.1:{cs_port}"),
        ),
        ("ZERO_PORT", port.to_string()),
        ("ZERO_NUM_SYNC_WORKERS", "1".to_string()),
        ("ZERO_CVR_DB", db.uri.clone()),
        ("ZERO_CVR_MAX_CONNS", "4".to_string()),
    ];
    Node {
        child: spawn(db, &envs),
        port,
    }
}

pub(crate) async fn wait_http_ok(port: u16, path: &str) {
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            let (status, _, body) = crate::sync_util::http_get(addr, path, None).await;
            if status == 200 {
                assert_eq!(body, "OK");
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} does not answer {path}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn wait_replica(path: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while try_replica_state(path).is_none() {
        assert!(
            tokio::time::Instant::now() < deadline,
            "no replica at {}",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Waits until `path` has the same `issue` rows as upstream.
pub(crate) async fn wait_rows_equal(db: &TestDb, path: &Path) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let want: i64 = db
            .client
            .query_one("SELECT count(*) FROM issue", &[])
            .await
            .expect("count")
            .get(0);
        if let Some(s) = try_replica_state(path) {
            let _ = s;
            let schema = replica_schema(path);
            let rows = replica_rows(path, &schema);
            if rows.get("issue").map(|r| r.len() as i64) == Some(want) {
                return;
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{} never caught up",
            path.display()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub(crate) async fn allow_issue(db: &TestDb) {
    let rules = json!({"tables": {
        "issue": {"row": {"select": [["allow", {"type": "and", "conditions": []}]]}},
        "comment": {"row": {"select": [["allow", {"type": "and", "conditions": []}]]}},
    }});
    db.exec(&format!(
        "UPDATE zero.permissions SET permissions = '{rules}'"
    ))
    .await;
}

pub(crate) const SCHEMA: &str = "CREATE TABLE issue (id text PRIMARY KEY, title text NOT NULL, open bool NOT NULL, n int4, meta jsonb);
     CREATE TABLE comment (id text PRIMARY KEY, \"issueID\" text NOT NULL, body text NOT NULL);
     INSERT INTO issue VALUES ('i1', 'one', true, 1, NULL);";

pub(crate) fn one(id: &str, title: &str, n: i64) -> Json {
    issue(id, title, Some(n), Json::Null, json!([]))
}

pub(crate) fn inode(p: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(p).expect("replica").ino()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manager_and_two_view_syncers_serve_real_clients_through_kills_and_restarts() {
    let db = test_db().await;
    db.exec(SCHEMA).await;
    let dir = db.dir.path().to_path_buf();
    let (m_file, v1_file, v2_file) = (dir.join("m.db"), dir.join("v1.db"), dir.join("v2.db"));
    let cs = free_port();
    let mut m = manager(&db, &m_file, cs, &[]);
    wait_http_ok(m.port, "/keepalive").await;
    wait_replica(&m_file).await;
    allow_issue(&db).await;
    let (p1, p2) = (free_port(), free_port());
    let mut v1 = view_syncer(&db, &v1_file, cs, p1);
    let v2 = view_syncer(&db, &v2_file, cs, p2);
    wait_http_ok(v1.port, "/keepalive").await;
    wait_http_ok(v2.port, "/keepalive").await;
    let mut c1 = ViewProcess::start(&format!("http://127.0.0.1:{p1}"));
    let mut c2 = ViewProcess::start(&format!("http://127.0.0.1:{p2}"));
    let expect = json!([one("i1", "one", 1)]);
    c1.wait_for(&expect).await;
    c2.wait_for(&expect).await;
    // The view syncers have no replication slot of their own: only the manager's exists.
    let slots = db.replication_slot_count().await;
    assert_eq!(slots, 1);

    db.exec("INSERT INTO issue VALUES ('i2', 'two', true, 2, NULL);")
        .await;
    let expect = json!([one("i1", "one", 1), one("i2", "two", 2)]);
    c1.wait_for(&expect).await;
    c2.wait_for(&expect).await;

    // kill -9 a view syncer; upstream changes meanwhile; it restarts on its own replica
    // (resumed from its watermark, not replaced by a snapshot) and its client catches up.
    let ino = inode(&v1_file);
    v1.child.kill().await.expect("kill view syncer");
    db.exec("UPDATE issue SET title = 'TWO' WHERE id = 'i2';")
        .await;
    let expect = json!([one("i1", "one", 1), one("i2", "TWO", 2)]);
    c2.wait_for(&expect).await;
    let _v1 = view_syncer(&db, &v1_file, cs, p1);
    c1.wait_for(&expect).await;
    assert_eq!(inode(&v1_file), ino, "the view syncer resumed its replica");

    // kill -9 the manager; upstream changes meanwhile; it restarts and both view syncers
    // reconnect and get the transactions they missed, exactly once.
    m.child.kill().await.expect("kill manager");
    db.exec("DELETE FROM issue WHERE id = 'i1'; INSERT INTO issue VALUES ('i3', 'three', true, 3, NULL);")
        .await;
    let _m = manager(&db, &m_file, cs, &[]);
    let expect = json!([one("i2", "TWO", 2), one("i3", "three", 3)]);
    c1.wait_for(&expect).await;
    c2.wait_for(&expect).await;
    for f in [&m_file, &v1_file, &v2_file] {
        wait_rows_equal(&db, f).await;
    }
    let m_rows = replica_rows(&m_file, &replica_schema(&m_file));
    for f in [&v1_file, &v2_file] {
        assert_eq!(
            replica_rows(f, &replica_schema(f)),
            m_rows,
            "{} equals the manager's replica",
            f.display()
        );
        crate::support::check_change_log(f);
    }
    c1.stop().await;
    c2.stop().await;
}

pub(crate) async fn stderr_of(mut child: Child) -> (std::process::ExitStatus, String) {
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("process exits by itself")
        .expect("wait");
    let mut err = String::new();
    use tokio::io::AsyncReadExt;
    child
        .stderr
        .take()
        .expect("stderr")
        .read_to_string(&mut err)
        .await
        .expect("read stderr");
    (status, err)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mismatched_configurations_stop_with_clear_errors() {
    let db = test_db().await;
    db.exec(SCHEMA).await;
    let dir = db.dir.path().to_path_buf();
    let cs = free_port();
    let _m = manager(&db, &dir.join("m.db"), cs, &[]);
    wait_http_ok(cs, "/keepalive").await;
    wait_replica(&dir.join("m.db")).await;

    // Another app id than the manager's.
    let child = spawn(
        &db,
        &[
            ("ZERO_REPLICA_FILE", dir.join("x.db").display().to_string()),
            ("ZERO_CHANGE_STREAMER_URI", format!("http://127.0.0.1:{cs}")),
            ("ZERO_PORT", free_port().to_string()),
            ("ZERO_APP_ID", "other".into()),
        ],
    );
    let (status, err) = stderr_of(child).await;
    assert!(!status.success());
    assert!(
        err.contains("WrongShard") && err.contains("ZERO_APP_ID"),
        "{err}"
    );

    // A URI that is not a change streamer (the manager's sync port is not served; use a
    // view syncer-less HTTP server: the change streamer's own keepalive path is not it).
    let api = crate::sync_util::serve_api(axum::Router::new()).await;
    let child = spawn(
        &db,
        &[
            ("ZERO_REPLICA_FILE", dir.join("y.db").display().to_string()),
            ("ZERO_CHANGE_STREAMER_URI", format!("http://{api}")),
            ("ZERO_PORT", free_port().to_string()),
        ],
    );
    let (status, err) = stderr_of(child).await;
    assert!(!status.success());
    assert!(err.contains("ZERO_CHANGE_STREAMER_URI must point"), "{err}");

    // Both roles at once.
    let child = spawn(
        &db,
        &[
            ("ZERO_REPLICA_FILE", dir.join("z.db").display().to_string()),
            ("ZERO_CHANGE_STREAMER_URI", format!("http://127.0.0.1:{cs}")),
            ("ZERO_NUM_SYNC_WORKERS", "0".into()),
        ],
    );
    let (status, err) = stderr_of(child).await;
    assert!(!status.success());
    assert!(err.contains("ZERO_NUM_SYNC_WORKERS"), "{err}");
}

/// A protocol-version mismatch, spoken directly to the change streamer.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn change_streamer_rejects_another_protocol_version() {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let db = test_db().await;
    db.exec(SCHEMA).await;
    let dir = db.dir.path().to_path_buf();
    let cs = free_port();
    let _m = manager(&db, &dir.join("m.db"), cs, &[]);
    wait_http_ok(cs, "/").await;
    let url = zero_cache::subscriber::stream_url(&format!("http://127.0.0.1:{cs}")).expect("url");
    let (mut ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    ws.send(Message::Text(
        json!({"type": "hello", "protocol": 999, "appID": "zero", "shardNum": 0})
            .to_string()
            .into(),
    ))
    .await
    .expect("send");
    let reply = loop {
        match ws.next().await.expect("reply").expect("frame") {
            Message::Text(t) => break serde_json::from_str::<Json>(&t).expect("json"),
            _ => continue,
        }
    };
    assert_eq!(reply["type"], "error");
    assert_eq!(reply["kind"], "VersionMismatch", "{reply}");
    assert!(
        reply["message"]
            .as_str()
            .unwrap_or_default()
            .contains("v999"),
        "{reply}"
    );
}

fn backup_env(url: &str) -> Vec<(&'static str, String)> {
    vec![
        ("ZERO_LITESTREAM_BACKUP_URL", url.to_string()),
        // 0.3 s between incremental backups; a snapshot only at start.
        (
            "ZERO_LITESTREAM_INCREMENTAL_BACKUP_INTERVAL_MINUTES",
            "0.005".to_string(),
        ),
    ]
}

fn files_under(dir: &Path, ext: &str) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if p.extension().is_some_and(|x| x == ext) {
                out.push(p);
            }
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lost_replicas_are_restored_from_a_file_backup_and_resume_streaming() {
    let db = test_db().await;
    db.exec(SCHEMA).await;
    let dir = db.dir.path().to_path_buf();
    let backup = dir.join("backup");
    let url = format!("file://{}", backup.display());
    let m_file = dir.join("m.db");
    let cs = free_port();
    let mut m = manager(&db, &m_file, cs, &backup_env(&url));
    wait_replica(&m_file).await;
    // A snapshot, then incremental segments as upstream changes.
    let wait_for = |ext: &'static str| {
        let backup = backup.clone();
        async move {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
            while files_under(&backup, ext).is_empty() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "no .{ext} in {}",
                    backup.display()
                );
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    };
    wait_for("db").await;
    db.exec("INSERT INTO issue VALUES ('i2', 'two', true, 2, NULL);")
        .await;
    wait_for("json").await;
    let replica_version = try_replica_state(&m_file).expect("state").replica_version;

    // The manager loses its replica: it restores (same initial sync, no new one) and streams.
    m.child.kill().await.expect("kill manager");
    zero_cache::initial_sync::remove_replica_files(&m_file).expect("rm zero.db*");
    db.exec("INSERT INTO issue VALUES ('i3', 'three', true, 3, NULL);")
        .await;
    let _m = manager(&db, &m_file, cs, &backup_env(&url));
    wait_rows_equal(&db, &m_file).await;
    assert_eq!(
        try_replica_state(&m_file).expect("state").replica_version,
        replica_version,
        "restored, not synced again"
    );
    let m_rows = replica_rows(&m_file, &replica_schema(&m_file));
    assert_eq!(m_rows["issue"].len(), 3);

    // A new view syncer bootstraps from the backup, then follows the manager.
    let v_file = dir.join("v.db");
    let port = free_port();
    let mut child = spawn(
        &db,
        &[
            ("ZERO_REPLICA_FILE", v_file.display().to_string()),
            ("ZERO_CHANGE_STREAMER_URI", format!("http://127.0.0.1:{cs}")),
            ("ZERO_PORT", port.to_string()),
            ("ZERO_LITESTREAM_BACKUP_URL", url.clone()),
            ("ZERO_LOG_LEVEL", "info".into()),
        ],
    );
    wait_http_ok(port, "/keepalive").await;
    db.exec("INSERT INTO issue VALUES ('i4', 'four', true, 4, NULL);")
        .await;
    wait_rows_equal(&db, &v_file).await;
    wait_rows_equal(&db, &m_file).await;
    assert_eq!(
        replica_rows(&v_file, &replica_schema(&v_file)),
        replica_rows(&m_file, &replica_schema(&m_file))
    );
    child.kill().await.expect("kill");
    let (_, err) = stderr_of(child).await;
    assert!(err.contains("replica restored from backup"), "{err}");
}

/// ZERO_KEEPALIVE_TIMEOUT_MS: a node keeps running while its load balancer requests
/// `/keepalive`, and drains (clients told to go away) and exits cleanly once it stops.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_whose_keepalive_lapses_drains_and_exits() {
    let db = test_db().await;
    db.exec("CREATE TABLE issue (id text PRIMARY KEY, title text);")
        .await;
    let port = free_port();
    let mut child = spawn(
        &db,
        &[
            ("ZERO_REPLICA_FILE", db.replica_file().display().to_string()),
            ("ZERO_PORT", port.to_string()),
            ("ZERO_CHANGE_STREAMER_PORT", free_port().to_string()),
            ("ZERO_NUM_SYNC_WORKERS", "1".into()),
            ("ZERO_KEEPALIVE_TIMEOUT_MS", "1500".into()),
        ],
    );
    wait_http_ok(port, "/keepalive").await;
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let schema = json!({"tables": {"issue": {"columns": {"id": {"type": "string"},
        "title": {"type": "string"}}, "primaryKey": ["id"]}}});
    let mut c = crate::sync_util::connect(
        addr,
        crate::sync_util::ConnectOpts::new(
            "c1",
            "g1",
            crate::sync_util::init(json!([]), Some(schema)),
        ),
    )
    .await
    .ok();
    c.poke().await;

    // Checked every 300 ms for twice the timeout: still serving.
    for _ in 0..10 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let (status, _, _) = crate::sync_util::http_get(addr, "/keepalive", None).await;
        assert_eq!(status, 200);
        assert!(
            child.try_wait().expect("wait").is_none(),
            "exited while checked"
        );
    }

    // Unchecked: the client is told to go away and the process exits cleanly.
    let closed = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            if let crate::sync_util::Event::Close(_) = c.next_event().await {
                return;
            }
        }
    })
    .await;
    assert!(closed.is_ok(), "the client's socket was not closed");
    let status = tokio::time::timeout(Duration::from_secs(30), child.wait())
        .await
        .expect("the node did not exit")
        .expect("wait");
    assert!(status.success(), "exit status {status}");
}
