use std::time::Duration;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::support::{TestDb, check_change_log, start, test_db, wait_equal};

pub(crate) const WORKLOAD_SCHEMA: &str = "
CREATE TABLE a (id int PRIMARY KEY, v text, n int);
CREATE TABLE b (k1 text, k2 int, payload jsonb, PRIMARY KEY (k1, k2));
CREATE TABLE c (id text PRIMARY KEY, big text, small int);
CREATE TABLE d (u int NOT NULL, w text);
CREATE UNIQUE INDEX d_u ON d (u);";

/// One random statement over the workload tables.
pub(crate) fn random_statement(rng: &mut StdRng) -> String {
    let id = rng.random_range(0..200);
    match rng.random_range(0..100) {
        0..=19 => format!(
            "INSERT INTO a VALUES ({id}, 'v{}', {}) ON CONFLICT (id) DO UPDATE SET v = EXCLUDED.v, n = EXCLUDED.n",
            rng.random_range(0..1000),
            rng.random_range(-5..5)
        ),
        20..=29 => format!("UPDATE a SET n = n + 1 WHERE id % 7 = {}", id % 7),
        30..=34 => format!("UPDATE a SET id = id + 1000 WHERE id = {id}"),
        35..=44 => format!("DELETE FROM a WHERE id = {id}"),
        45..=59 => format!(
            "INSERT INTO b VALUES ('k{}', {}, '{{\"x\": {}}}') ON CONFLICT DO NOTHING",
            id % 10,
            id,
            rng.random_range(0..100)
        ),
        60..=64 => format!("DELETE FROM b WHERE k2 = {id}"),
        65..=74 => format!(
            "INSERT INTO c VALUES ('c{id}', repeat(md5('{}'), 200), 0) ON CONFLICT (id) DO UPDATE SET small = c.small + 1",
            rng.random_range(0..1000)
        ),
        // Updates that leave the TOASTed column unchanged.
        75..=84 => format!("UPDATE c SET small = small + 1 WHERE id = 'c{id}'"),
        85..=89 => {
            format!("INSERT INTO d VALUES ({id}, 'w') ON CONFLICT (u) DO UPDATE SET w = d.w || 'x'")
        }
        90..=92 => format!("DELETE FROM d WHERE u = {id}"),
        93..=94 => "TRUNCATE b".to_string(),
        95 => "TRUNCATE a, d".to_string(),
        _ => format!(
            "UPDATE b SET payload = '{{\"y\": {id}}}' WHERE k1 = 'k{}'",
            id % 10
        ),
    }
}

/// Runs `txns` random transactions of 1–10 statements.
pub(crate) async fn run_workload(db: &TestDb, rng: &mut StdRng, txns: usize) {
    for _ in 0..txns {
        let n = rng.random_range(1..=10);
        let stmts: Vec<String> = (0..n).map(|_| random_statement(rng)).collect();
        db.exec(&format!("BEGIN; {}; COMMIT;", stmts.join("; ")))
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn random_workload_ends_equal_with_a_consistent_change_log() {
    for seed in [1u64, 2, 3] {
        let db = test_db().await;
        db.exec(WORKLOAD_SCHEMA).await;
        let mut rng = StdRng::seed_from_u64(seed);
        run_workload(&db, &mut rng, 30).await;
        let mut r = start(db.replicator_config());
        r.ready().await;
        run_workload(&db, &mut rng, 150).await;
        wait_equal(&db, Duration::from_secs(20)).await;
        let checked = check_change_log(&db.replica_file());
        assert!(checked > 0, "seed {seed}: change log checked no rows");
        // A restart resumes from the watermark without resync and stays equal.
        r.stop().await.expect("clean stop");
        let version_before = crate::support::replica_query::<String>(
            &db.replica_file(),
            "SELECT \"replicaVersion\" FROM \"_zero.replicationConfig\"",
        );
        let mut r = start(db.replicator_config());
        r.ready().await;
        run_workload(&db, &mut rng, 50).await;
        wait_equal(&db, Duration::from_secs(20)).await;
        check_change_log(&db.replica_file());
        let version_after = crate::support::replica_query::<String>(
            &db.replica_file(),
            "SELECT \"replicaVersion\" FROM \"_zero.replicationConfig\"",
        );
        assert_eq!(
            version_before, version_after,
            "seed {seed}: restart must not resync"
        );
        r.stop().await.expect("clean stop");
    }
}
