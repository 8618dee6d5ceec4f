//! The unmodified `@rocicorp/zero` 1.9.0 client (Node 22 from `tests/e2e`, set up by
//! `scripts/test.sh`) against this server: the materialized view must equal the expected rows
//! after hydration and after upstream inserts, updates and deletes.

use std::time::Duration;

use serde_json::{Value as Json, json};

use crate::support::test_db;
use crate::sync_util::{allow_all, start_server, start_server_with};
use crate::writes_e2e::NodeProc;

/// `view.mjs`: one real client materializing open issues with their comments.
pub(crate) struct ViewProcess(NodeProc);

impl ViewProcess {
    pub(crate) fn start(server: &str) -> ViewProcess {
        ViewProcess(NodeProc::start("view.mjs", &[server.to_string()]))
    }

    /// Reads view updates until a complete one equals `expected`; panics with the last view
    /// after 20 s.
    pub(crate) async fn wait_for(&mut self, expected: &Json) {
        self.0
            .wait(20, &format!("the view to become {expected}"), |v| {
                v["type"] == "complete" && &v["data"] == expected
            })
            .await;
    }

    pub(crate) async fn stop(self) {
        self.0.stop().await;
    }
}

/// The `issue` and `comment` tables of the real-client tests (`tests/e2e/issues.mjs`).
pub(crate) const ISSUE_TABLES: &str = "CREATE TABLE issue (id text PRIMARY KEY, title text NOT NULL, open bool NOT NULL, n int4, meta jsonb);
     CREATE TABLE comment (id text PRIMARY KEY, \"issueID\" text NOT NULL, body text NOT NULL);";

pub(crate) fn issue(id: &str, title: &str, n: Option<i64>, meta: Json, comments: Json) -> Json {
    json!({"id": id, "title": title, "open": true, "n": n, "meta": meta, "comments": comments})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_client_view_follows_upstream_changes() {
    let db = test_db().await;
    db.exec(ISSUE_TABLES).await;
    db.exec(
        "INSERT INTO issue VALUES ('i1', 'one', true, 1, '{\"tags\": [\"a\"]}'), ('i2', 'two', false, 2, NULL),
                                  ('i3', 'three', true, NULL, '[1, 2]');
         INSERT INTO comment VALUES ('c1', 'i1', 'hello'), ('c2', 'i1', 'world'), ('c3', 'i2', 'hidden');",
    )
    .await;
    let mut server = start_server(&db).await;
    allow_all(&db, &mut server, &["issue", "comment"]).await;
    let mut view = ViewProcess::start(&format!("http://{}", server.addr));

    let c = |id: &str, issue: &str, body: &str| json!({"id": id, "issueID": issue, "body": body});
    view.wait_for(&json!([
        issue(
            "i1",
            "one",
            Some(1),
            json!({"tags": ["a"]}),
            json!([c("c1", "i1", "hello"), c("c2", "i1", "world")])
        ),
        issue("i3", "three", None, json!([1, 2]), json!([])),
    ]))
    .await;

    db.exec("INSERT INTO issue VALUES ('i4', 'four', true, 4, NULL); INSERT INTO comment VALUES ('c4', 'i3', 'new');")
        .await;
    view.wait_for(&json!([
        issue(
            "i1",
            "one",
            Some(1),
            json!({"tags": ["a"]}),
            json!([c("c1", "i1", "hello"), c("c2", "i1", "world")])
        ),
        issue(
            "i3",
            "three",
            None,
            json!([1, 2]),
            json!([c("c4", "i3", "new")])
        ),
        issue("i4", "four", Some(4), Json::Null, json!([])),
    ]))
    .await;

    db.exec("UPDATE issue SET title = 'ONE' WHERE id = 'i1'; UPDATE issue SET open = true WHERE id = 'i2';")
        .await;
    view.wait_for(&json!([
        issue(
            "i1",
            "ONE",
            Some(1),
            json!({"tags": ["a"]}),
            json!([c("c1", "i1", "hello"), c("c2", "i1", "world")])
        ),
        issue(
            "i2",
            "two",
            Some(2),
            Json::Null,
            json!([c("c3", "i2", "hidden")])
        ),
        issue(
            "i3",
            "three",
            None,
            json!([1, 2]),
            json!([c("c4", "i3", "new")])
        ),
        issue("i4", "four", Some(4), Json::Null, json!([])),
    ]))
    .await;

    db.exec("DELETE FROM comment WHERE id = 'c1'; DELETE FROM issue WHERE id = 'i3'; UPDATE issue SET open = false WHERE id = 'i4';")
        .await;
    view.wait_for(&json!([
        issue(
            "i1",
            "ONE",
            Some(1),
            json!({"tags": ["a"]}),
            json!([c("c2", "i1", "world")])
        ),
        issue(
            "i2",
            "two",
            Some(2),
            Json::Null,
            json!([c("c3", "i2", "hidden")])
        ),
    ]))
    .await;

    view.stop().await;
    server.stop_sync().await.stop().await.expect("stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_client_catches_up_after_a_server_restart() {
    restart_scenario(false).await;
}

/// The same with client view records in Postgres (`ZERO_CVR_DB`): the new server process has
/// no local CVR file at all.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn real_client_catches_up_after_a_server_restart_with_cvr_in_postgres() {
    restart_scenario(true).await;
}

async fn restart_scenario(cvr_in_pg: bool) {
    let db = test_db().await;
    let cvr_db = cvr_in_pg.then(|| db.uri.clone());
    db.exec(ISSUE_TABLES).await;
    db.exec("INSERT INTO issue VALUES ('i1', 'one', true, 1, NULL), ('i2', 'two', true, 2, NULL);")
        .await;
    let c = cvr_db.clone();
    let mut server = start_server_with(&db, |o| o.cvr_db = c).await;
    allow_all(&db, &mut server, &["issue", "comment"]).await;
    let mut view = ViewProcess::start(&format!("http://{}", server.addr));
    view.wait_for(&json!([
        issue("i1", "one", Some(1), Json::Null, json!([])),
        issue("i2", "two", Some(2), Json::Null, json!([])),
    ]))
    .await;

    // The server goes away; upstream changes meanwhile; a new server process (same replica and
    // CVR files) serves the client's reconnect from its cookie.
    let addr = server.addr;
    let mut repl = server.stop_sync().await;
    let before = repl.watermarks.borrow().clone();
    db.exec("UPDATE issue SET title = 'ONE' WHERE id = 'i1'; DELETE FROM issue WHERE id = 'i2';")
        .await;
    let _ = tokio::time::timeout(
        Duration::from_secs(20),
        repl.watermarks.wait_for(|w| *w > before),
    )
    .await;
    let cvr_file = crate::sync_util::options(&db).cvr_file;
    assert_eq!(cvr_file.exists(), !cvr_in_pg, "{}", cvr_file.display());
    let c = cvr_db.clone();
    let server = crate::sync_util::start_sync_at_with(&db, repl, addr, |o| o.cvr_db = c).await;
    view.wait_for(&json!([issue("i1", "ONE", Some(1), Json::Null, json!([]))]))
        .await;
    if cvr_in_pg {
        let n: i64 = db
            .client
            .query_one(r#"SELECT count(*) FROM "zero_0/cvr".instances"#, &[])
            .await
            .expect("CVR schema in Postgres")
            .get(0);
        assert_eq!(n, 1, "one client group recorded in Postgres");
    }
    view.stop().await;
    server.stop_sync().await.stop().await.expect("stop");
}

/// `many.mjs`: N real clients (N client groups) in one Node process.
struct ManyProcess {
    node: NodeProc,
    n: u64,
}

impl ManyProcess {
    fn start(server: &str, n: u64) -> ManyProcess {
        let node = NodeProc::start("many.mjs", &[server.to_string(), n.to_string()]);
        ManyProcess { node, n }
    }

    /// Reads summaries until every view is complete and equal to `expected`; panics with the
    /// last summary after 60 s.
    async fn wait_all(&mut self, expected: &Json) {
        let n = self.n;
        let what = format!("the {n} views to all become {expected}");
        self.node
            .wait(60, &what, |v| {
                v["complete"] == n && v["distinct"] == json!([expected])
            })
            .await;
    }

    async fn stop(self) {
        self.node.stop().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hundred_real_clients_at_once() {
    let db = test_db().await;
    db.exec(ISSUE_TABLES).await;
    db.exec(
        "INSERT INTO issue VALUES ('i1', 'one', true, 1, NULL), ('i2', 'two', false, 2, NULL);
         INSERT INTO comment VALUES ('c1', 'i1', 'hello');",
    )
    .await;
    let mut server = start_server(&db).await;
    allow_all(&db, &mut server, &["issue", "comment"]).await;
    let mut many = ManyProcess::start(&format!("http://{}", server.addr), 100);
    let c = |id: &str, issue: &str, body: &str| json!({"id": id, "issueID": issue, "body": body});
    many.wait_all(&json!([issue(
        "i1",
        "one",
        Some(1),
        Json::Null,
        json!([c("c1", "i1", "hello")])
    )]))
    .await;

    // 100 client groups, one query in the engine.
    let (_, _, body) = crate::sync_util::http_get(
        server.addr,
        "/statz",
        Some(&format!("a:{}", crate::sync_util::ADMIN_PASSWORD)),
    )
    .await;
    let stats: Json = serde_json::from_str(&body).expect("json");
    assert_eq!(stats["sync"]["clientGroups"], 100, "{stats}");
    assert_eq!(stats["engine"]["subscriptions"], 100, "{stats}");
    assert_eq!(stats["engine"]["queries"], 1, "{stats}");

    db.exec("UPDATE issue SET open = true WHERE id = 'i2'; INSERT INTO comment VALUES ('c2', 'i2', 'new'); UPDATE issue SET title = 'ONE' WHERE id = 'i1';")
        .await;
    many.wait_all(&json!([
        issue(
            "i1",
            "ONE",
            Some(1),
            Json::Null,
            json!([c("c1", "i1", "hello")])
        ),
        issue(
            "i2",
            "two",
            Some(2),
            Json::Null,
            json!([c("c2", "i2", "new")])
        ),
    ]))
    .await;

    db.exec("DELETE FROM issue WHERE id = 'i1'").await;
    many.wait_all(&json!([issue(
        "i2",
        "two",
        Some(2),
        Json::Null,
        json!([c("c2", "i2", "new")])
    )]))
    .await;
    many.stop().await;
    server.stop_sync().await.stop().await.expect("stop");
}
