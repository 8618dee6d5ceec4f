use std::time::Duration;

use crate::support::{start, test_db, wait_equal};

fn replica_columns(path: &std::path::Path, table: &str) -> Vec<(String, String)> {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.prepare("SELECT name, type FROM pragma_table_info(?1)")
        .expect("prepare")
        .query_map([table], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows")
}

fn replica_indexes(path: &std::path::Path, table: &str) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).expect("open");
    conn.prepare(
        "SELECT name FROM sqlite_master WHERE type = 'index' AND tbl_name = ?1 ORDER BY name",
    )
    .expect("prepare")
    .query_map([table], |r| r.get(0))
    .expect("query")
    .collect::<Result<_, _>>()
    .expect("rows")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_reach_the_replica_without_resync() {
    let db = test_db().await;
    db.exec(
        "CREATE TABLE t (id int PRIMARY KEY, a text, b int);
         INSERT INTO t SELECT g, 'a' || g, g FROM generate_series(1, 100) g;",
    )
    .await;
    let mut r = start(db.replicator_config());
    r.ready().await;
    let version = |db: &crate::support::TestDb| {
        crate::support::replica_query::<String>(
            &db.replica_file(),
            "SELECT \"replicaVersion\" FROM \"_zero.replicationConfig\"",
        )
    };
    let v0 = version(&db);
    let file = db.replica_file();

    db.exec("CREATE TABLE n (id text PRIMARY KEY, x int); INSERT INTO n VALUES ('one', 1);")
        .await;
    wait_equal(&db, Duration::from_secs(10)).await;

    db.exec("ALTER TABLE t ADD COLUMN c int DEFAULT 5; ALTER TABLE t ADD COLUMN d text; UPDATE t SET d = 'dd' WHERE id < 10;")
        .await;
    wait_equal(&db, Duration::from_secs(10)).await;
    let five: i64 = crate::support::replica_query(&file, "SELECT c FROM t WHERE id = 50");
    assert_eq!(five, 5, "existing rows get the added column's default");

    db.exec("ALTER TABLE t RENAME COLUMN a TO a2; UPDATE t SET a2 = 'renamed' WHERE id = 1;")
        .await;
    wait_equal(&db, Duration::from_secs(10)).await;
    assert!(replica_columns(&file, "t").iter().any(|(c, _)| c == "a2"));

    db.exec("ALTER TABLE t DROP COLUMN b; INSERT INTO t (id, a2) VALUES (1000, 'new');")
        .await;
    wait_equal(&db, Duration::from_secs(10)).await;
    assert!(!replica_columns(&file, "t").iter().any(|(c, _)| c == "b"));

    db.exec("ALTER TABLE t ALTER COLUMN c TYPE bigint; UPDATE t SET c = 9000000000 WHERE id = 2;")
        .await;
    wait_equal(&db, Duration::from_secs(10)).await;
    assert!(
        replica_columns(&file, "t")
            .iter()
            .any(|(c, ty)| c == "c" && ty == "int8"),
        "{:?}",
        replica_columns(&file, "t")
    );

    db.exec("CREATE INDEX t_d_idx ON t (d DESC);").await;
    wait_equal(&db, Duration::from_secs(10)).await;
    assert!(replica_indexes(&file, "t").contains(&"t_d_idx".to_string()));

    db.exec("ALTER TABLE n RENAME TO n2; INSERT INTO n2 VALUES ('two', 2);")
        .await;
    wait_equal(&db, Duration::from_secs(10)).await;

    db.exec("DROP TABLE n2;").await;
    wait_equal(&db, Duration::from_secs(10)).await;
    assert!(replica_columns(&file, "n2").is_empty());

    // A key change: the primary key moves to another column.
    db.exec(
        "ALTER TABLE t ADD COLUMN k int; UPDATE t SET k = id * 10; ALTER TABLE t ALTER COLUMN k SET NOT NULL;
         ALTER TABLE t DROP CONSTRAINT t_pkey; ALTER TABLE t ADD PRIMARY KEY (k);",
    )
    .await;
    db.exec("UPDATE t SET id = id + 1 WHERE id = 3;").await;
    wait_equal(&db, Duration::from_secs(10)).await;
    let key: String = crate::support::replica_query(
        &file,
        "SELECT \"upstreamMetadata\" FROM \"_zero.tableMetadata\" WHERE \"table\" = 't'",
    );
    assert!(
        key.contains("[\"k\"]"),
        "row key follows the new primary key: {key}"
    );

    assert_eq!(v0, version(&db), "schema changes must not resync");

    // A column whose existing values Postgres computes per row cannot be followed from the
    // stream: the replica is resynced, and ends equal.
    db.exec("ALTER TABLE t ADD COLUMN s serial;").await;
    wait_equal(&db, Duration::from_secs(20)).await;
    assert_ne!(v0, version(&db), "a volatile default forces a resync");
    r.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn schema_changes_without_event_triggers_are_found_from_relation_messages() {
    let db = test_db().await;
    let role = format!("app_{}", db.name);
    db.exec(&format!(
        "CREATE ROLE {role} LOGIN REPLICATION;
         GRANT CREATE ON DATABASE {name} TO {role};
         GRANT ALL ON SCHEMA public TO {role};
         SET ROLE {role};
         CREATE TABLE t (id int PRIMARY KEY, a text);
         INSERT INTO t VALUES (1, 'x');
         RESET ROLE;
         CREATE PUBLICATION app_pub FOR TABLES IN SCHEMA public;",
        name = db.name
    ))
    .await;
    let mut cfg = db.replicator_config();
    cfg.upstream = zero_cache::pgconn::UpstreamConfig::parse(&format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        crate::support::cluster().port(),
        db.name
    ))
    .expect("uri");
    cfg.shard = zero_cache::upstream::Shard::new("zero", 0, &["app_pub".to_string()]);
    let mut r = start(cfg);
    r.ready().await;
    let ddl: bool = db
        .client
        .query_one("SELECT \"ddlDetection\" FROM zero_0.\"shardConfig\"", &[])
        .await
        .expect("shard config")
        .get(0);
    assert!(!ddl, "a non-superuser cannot create event triggers");

    let app = crate::support::connect(&format!(
        "postgres://{role}@127.0.0.1:{}/{}",
        crate::support::cluster().port(),
        db.name
    ))
    .await;
    app.batch_execute(
        "ALTER TABLE t ADD COLUMN b int; INSERT INTO t VALUES (2, 'y', 7);
         CREATE TABLE u (id int PRIMARY KEY); INSERT INTO u VALUES (1);",
    )
    .await
    .expect("ddl as app role");
    let file = db.replica_file();
    let shard = zero_cache::upstream::Shard::new("zero", 0, &["app_pub".to_string()]);
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let up = zero_cache::upstream::published_schema(&db.client, &shard)
            .await
            .expect("schema");
        let rows = crate::support::replica_rows(&file, &up);
        let want = crate::support::upstream_rows(&db.client, &up).await;
        if rows == want && rows.contains_key("u") {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "replica: {rows:?}, upstream: {want:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    r.stop().await.expect("clean stop");
}
