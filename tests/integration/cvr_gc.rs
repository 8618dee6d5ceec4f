//! Garbage collection of client view records (`ZERO_CVR_GARBAGE_COLLECTION_*`): records of
//! groups inactive past the threshold are deleted and their clients told `ClientNotFound`;
//! groups with a running view-syncer are kept however old their record is.

use std::net::SocketAddr;
use std::time::Duration;

use serde_json::json;
use zero_cache::sync::cvr_gc::CvrGcOptions;

use crate::support::test_db;
use crate::sync_util::{ADMIN_PASSWORD, Client, ConnectOpts, allow_all, connect, http_get, init};

fn schema() -> serde_json::Value {
    json!({"tables": {"issue": {"columns": {"id": {"type": "string"}, "title": {"type": "string"}},
        "primaryKey": ["id"]}}})
}

fn all_issues() -> serde_json::Value {
    json!([{"op": "put", "hash": "q1", "ttl": 60000,
            "ast": {"table": "issue", "orderBy": [["id", "asc"]]}}])
}

/// Connects a new client of a new group and returns it with the cookie of its hydration.
async fn hydrated(addr: SocketAddr, client: &str, group: &str) -> (Client, String) {
    let mut c = connect(
        addr,
        ConnectOpts::new(client, group, init(all_issues(), Some(schema()))),
    )
    .await
    .ok();
    let pokes = c.pokes_until(|p| !p.puts().is_empty()).await;
    let cookie = pokes.last().expect("poke").cookie();
    (c, cookie)
}

async fn purged_groups(addr: SocketAddr) -> u64 {
    let (s, _, body) = http_get(addr, "/statz", Some(&format!("a:{ADMIN_PASSWORD}"))).await;
    assert_eq!(s, 200, "{body}");
    let stats: serde_json::Value = serde_json::from_str(&body).expect("json");
    stats["cvr"]["purgedGroups"].as_u64().expect("purgedGroups")
}

async fn scenario(cvr_in_pg: bool) {
    let db = test_db().await;
    db.exec("CREATE TABLE issue (id text PRIMARY KEY, title text); INSERT INTO issue VALUES ('a', 'first');")
        .await;
    let cvr_db = cvr_in_pg.then(|| db.uri.clone());
    let mut server = crate::sync_util::start_server_with(&db, |o| {
        o.cvr_db = cvr_db;
        o.cvr_max_conns = 2;
        o.cvr_gc = CvrGcOptions {
            inactivity: Duration::from_millis(300),
            interval: Duration::from_millis(100),
            batch: 25,
        };
    })
    .await;
    allow_all(&db, &mut server, &["issue"]).await;

    // g1 goes away; g2 stays connected (and idle) far longer than the threshold.
    let (c1, gone_cookie) = hydrated(server.addr, "c1", "g1").await;
    c1.close().await;
    let (mut c2, kept_cookie) = hydrated(server.addr, "c2", "g2").await;

    // g1's view-syncer stops a few seconds after its last connection; then its record goes.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while purged_groups(server.addr).await < 1 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the inactive group's record was not collected"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        purged_groups(server.addr).await,
        1,
        "only g1 was collectable"
    );

    let mut o = ConnectOpts::new("c1", "g1", init(all_issues(), None));
    o.base_cookie = Some(&gone_cookie);
    let mut back = connect(server.addr, o).await.ok();
    back.expect_error("ClientNotFound").await;

    // The connected group still gets pokes, and resumes from its cookie after a reconnect.
    let before = server.watermark();
    db.exec("INSERT INTO issue VALUES ('b', 'second');").await;
    server.wait_watermark_after(&before).await;
    let pokes = c2.pokes_until(|p| !p.puts().is_empty()).await;
    assert_eq!(pokes.last().expect("poke").puts()[0].1["id"], "b");
    c2.close().await;
    let mut o = ConnectOpts::new("c2", "g2", init(all_issues(), None));
    o.base_cookie = Some(&kept_cookie);
    let mut c2 = connect(server.addr, o).await.ok();
    let pokes = c2.pokes_until(|p| !p.puts().is_empty()).await;
    assert_eq!(pokes[0].base(), json!(kept_cookie));
    let puts: Vec<_> = pokes.iter().flat_map(|p| p.puts()).collect();
    assert_eq!(puts.len(), 1, "only the row it missed: {puts:?}");
    c2.close().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_records_are_collected_and_running_groups_kept() {
    scenario(false).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn inactive_records_are_collected_from_postgres() {
    scenario(true).await;
}
