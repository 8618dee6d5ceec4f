//! `server::run` starts the sync server on `ZERO_PORT` next to the replicator.

use std::time::Duration;

use serde_json::json;
use zero_cache::config::Config;

use crate::support::test_db;
use crate::sync_util::{ConnectOpts, connect, http_get, init};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_run_serves_http_and_sync_on_zero_port() {
    let db = test_db().await;
    db.exec("CREATE TABLE issue (id text PRIMARY KEY, title text); INSERT INTO issue VALUES ('a', 'x');")
        .await;
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .expect("free port")
        .local_addr()
        .expect("addr")
        .port();
    let replica = db.replica_file();
    let config = Config::from_args(
        [
            "zero-cache",
            "--upstream-db",
            &db.uri,
            "--replica-file",
            replica.to_str().expect("path"),
            "--port",
            &port.to_string(),
            "--admin-password",
            "pw",
            "--num-sync-workers",
            "1",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect(),
    );
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let run = tokio::spawn(zero_cache::server::run(config, async {
        let _ = stopped.await;
    }));
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if tokio::net::TcpStream::connect(addr).await.is_ok() {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "port {port} not served"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let (status, _, body) = http_get(addr, "/keepalive", None).await;
    assert_eq!((status, body.as_str()), (200, "OK"));
    let (status, _, _) = http_get(addr, "/statz", Some("admin:pw")).await;
    assert_eq!(status, 200);

    let schema = json!({"tables": {"issue": {"columns": {"id": {"type": "string"},
        "title": {"type": "string"}}, "primaryKey": ["id"]}}});
    let puts = json!([{"op": "put", "hash": "q", "ast": {"table": "issue"}}]);
    let mut c = connect(addr, ConnectOpts::new("c1", "g1", init(puts, Some(schema))))
        .await
        .ok();
    c.poke().await;
    // Hydration once the replica is ready (no permissions deployed: got, but no rows).
    let p = c.poke().await;
    assert_eq!(
        p.all("gotQueriesPatch"),
        vec![json!({"op": "put", "hash": "q"})]
    );
    assert!(p.puts().is_empty());
    c.close().await;

    let _ = stop.send(());
    tokio::time::timeout(Duration::from_secs(20), run)
        .await
        .expect("server stops")
        .expect("task")
        .expect("clean stop");
}
