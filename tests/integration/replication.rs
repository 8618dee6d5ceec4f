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

/// A TCP proxy whose open connections can be stalled: bytes stop flowing both ways while the
/// sockets stay open, which is what a dead network path (no reset) looks like to both ends.
/// Connections opened after a stall flow normally.
struct StallingProxy {
    port: u16,
    generation: std::sync::Arc<std::sync::atomic::AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl StallingProxy {
    async fn start(target: u16) -> StallingProxy {
        use std::sync::Arc;
        use std::sync::atomic::{AtomicU64, Ordering};
        use tokio::io::{AsyncReadExt, AsyncWriteExt};

        async fn pump(
            mut from: tokio::net::tcp::OwnedReadHalf,
            mut to: tokio::net::tcp::OwnedWriteHalf,
            stalled: impl Fn() -> bool,
        ) {
            let mut buf = vec![0u8; 16 * 1024];
            loop {
                let n = match from.read(&mut buf).await {
                    Ok(0) | Err(_) => return,
                    Ok(n) => n,
                };
                if stalled() {
                    // Hold both sockets open and let nothing through, ever.
                    let _keep = (from, to);
                    std::future::pending::<()>().await;
                    return;
                }
                if to.write_all(&buf[..n]).await.is_err() {
                    return;
                }
            }
        }

        let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let generation = Arc::new(AtomicU64::new(0));
        let g = generation.clone();
        let task = tokio::spawn(async move {
            while let Ok((inbound, _)) = listener.accept().await {
                let born = g.load(Ordering::SeqCst);
                let g = g.clone();
                tokio::spawn(async move {
                    let Ok(outbound) = tokio::net::TcpStream::connect(("127.0.0.1", target)).await
                    else {
                        return;
                    };
                    let (ri, wi) = inbound.into_split();
                    let (ro, wo) = outbound.into_split();
                    let g2 = g.clone();
                    tokio::join!(
                        pump(ri, wo, move || g.load(Ordering::SeqCst) != born),
                        pump(ro, wi, move || g2.load(Ordering::SeqCst) != born),
                    );
                });
            }
        });
        StallingProxy {
            port,
            generation,
            task,
        }
    }

    fn stall_open_connections(&self) {
        self.generation
            .fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

impl Drop for StallingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// A replication stream that goes silent (a dead network path) is given up after
/// ZERO_UPSTREAM_PG_STREAM_INBOUND_TIMEOUT_MS and reconnected; without the timeout the
/// replicator would wait on the dead connection forever.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_silent_replication_stream_is_reconnected() {
    let db = test_db().await;
    db.exec("CREATE TABLE t (id int PRIMARY KEY, v text); INSERT INTO t VALUES (1, 'a');")
        .await;
    let pg_port = support::cluster().uri("x");
    let pg_port: u16 = pg_port
        .rsplit_once(':')
        .and_then(|(_, rest)| rest.split('/').next())
        .and_then(|p| p.parse().ok())
        .expect("port");
    let proxy = StallingProxy::start(pg_port).await;
    let mut cfg = db.replicator_config();
    cfg.upstream = zero_cache::pgconn::UpstreamConfig::parse(
        &db.uri
            .replace(&format!(":{pg_port}/"), &format!(":{}/", proxy.port)),
    )
    .expect("proxy uri");
    cfg.stream_inbound_timeout_ms = Some(1_500);
    let mut r = start(cfg);
    r.ready().await;
    db.exec("INSERT INTO t VALUES (2, 'b');").await;
    wait_equal(&db, Duration::from_secs(10)).await;

    proxy.stall_open_connections();
    db.exec("INSERT INTO t VALUES (3, 'c'); UPDATE t SET v = 'z' WHERE id = 1;")
        .await;
    wait_equal(&db, Duration::from_secs(30)).await;
    r.stop().await.expect("clean stop");
}
