use std::time::Duration;

use rusqlite::types::Value;

use crate::support::{canon, start, test_db, wait_equal};

const TYPES_TABLE: &str = "
CREATE TYPE mood AS ENUM ('sad', 'ok', 'happy');
CREATE DOMAIN posint AS int4 CHECK (VALUE > 0);
CREATE TABLE types (
  id int PRIMARY KEY, i2 int2, i4 int4, i8 int8, f4 float4, f8 float8, num numeric, b bool,
  t text, vc varchar(10), c char(3), u uuid, j json, jb jsonb, ts timestamp, tstz timestamptz,
  d date, tm time, tmtz timetz, e mood, ia int4[], ta text[], ba bool[], ip inet, dom posint,
  raw bytea, iv interval);";

/// Rows as (SQL values list without id, expected replica values in column order without id).
fn cases() -> Vec<(String, Vec<&'static str>)> {
    let big_json = format!(
        "{{\"items\": [{}]}}",
        (0..5000)
            .map(|i| format!("{{\"k\": {i}, \"s\": \"ü{i}\"}}"))
            .collect::<Vec<_>>()
            .join(", ")
    );
    vec![
        (
            "1, 2, 3, 1.5, 2.25, 3.5, true, 'hello', 'abc', 'ab', 'a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11', \
             '{\"a\": 1}', '{\"b\": [1, 2]}', '2024-01-02 03:04:05.678', '2024-01-02 03:04:05.678+02', \
             '2024-01-02', '01:02:03.5', '01:02:03+05', 'happy', '{1,2,3}', '{\"a b\",c,NULL}', '{t,f}', \
             '192.168.0.1', 7, '\\x0102', '1 day'"
                .to_string(),
            vec![
                "1", "2", "3", "1.5", "2.25", "3.5", "1", "\"hello\"", "\"abc\"", "\"ab \"",
                "\"a0eebc99-9c0b-4ef8-bb6d-6bb9bd380a11\"", "\"{\\\"a\\\": 1}\"",
                "\"{\\\"b\\\": [1, 2]}\"", "1704164645678", "1704157445678", "1704153600000",
                "3723500", "3723000", "\"happy\"", "\"[1,2,3]\"", "\"[\\\"a b\\\",\\\"c\\\",null]\"",
                "\"[true,false]\"", "\"192.168.0.1\"", "7",
            ],
        ),
        (
            "NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, \
             NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL"
                .to_string(),
            vec!["null"; 24],
        ),
        (
            "32767, -2147483648, 9007199254740991, -0.25, 1e300, 123456789.125, false, '', 'xxxxxxxxxx', \
             'abc', '00000000-0000-0000-0000-000000000000', '[]', 'null', '1970-01-01 00:00:00', \
             '1969-12-31 23:59:59.999+00', '1900-03-01', '23:59:59.999999', '00:00:00-08', 'sad', '{}', \
             '{}', '{}', '::1', 2147483647, '\\x', '-1 year'"
                .to_string(),
            vec![
                "32767", "-2147483648", "9007199254740991", "-0.25", "1e300", "123456789.125", "0",
                "\"\"", "\"xxxxxxxxxx\"", "\"abc\"", "\"00000000-0000-0000-0000-000000000000\"",
                "\"[]\"", "\"null\"", "0", "-1", "-2203891200000", "86399999.999", "0", "\"sad\"",
                "\"[]\"", "\"[]\"", "\"[]\"", "\"::1\"", "2147483647",
            ],
        ),
        (
            format!(
                "-1, 0, -9007199254740991, 0, -1e-300, -0.5, true, '日本語 🚀 \"quoted\" \\ back\ttab\nline', \
                 'ñ', 'ü', 'ffffffff-ffff-ffff-ffff-ffffffffffff', '{}', '{}', '2262-04-11 23:47:16', \
                 'infinity', '9999-12-31', '00:00:00', '12:00:00+14', 'ok', '{{{{1,2}},{{3,4}}}}', \
                 '{{\"x,y\",\"q\\\"q\"}}', '{{t}}', '10.0.0.0/8', 1, NULL, NULL",
                big_json.replace('\'', "''"),
                big_json.replace('\'', "''")
            ),
            Vec::new(),
        ),
    ]
}

fn replica_row(path: &std::path::Path, id: i64) -> Vec<String> {
    let conn = rusqlite::Connection::open(path).expect("open replica");
    let mut stmt = conn
        .prepare("SELECT * FROM types WHERE id = ?1")
        .expect("prepare");
    let n = stmt.column_count();
    let names: Vec<String> = stmt.column_names().map(|s| s.to_string()).collect();
    assert!(
        !names.contains(&"raw".to_string()),
        "bytea column must not be synced"
    );
    assert!(
        !names.contains(&"iv".to_string()),
        "interval column must not be synced"
    );
    assert_eq!(names.last().map(String::as_str), Some("_0_version"));
    stmt.query_row([id], |r| {
        // Skip id and _0_version.
        (1..n - 1)
            .map(|i| r.get::<_, Value>(i).map(|v| canon(&v)))
            .collect::<Result<Vec<_>, _>>()
    })
    .expect("row present")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_type_round_trips_through_copy_and_stream() {
    let db = test_db().await;
    db.exec(TYPES_TABLE).await;
    let cases = cases();
    for (i, (values, _)) in cases.iter().enumerate() {
        db.exec(&format!("INSERT INTO types VALUES ({i}, {values})"))
            .await;
    }
    let mut r = start(db.replicator_config());
    r.ready().await;
    for (i, (values, _)) in cases.iter().enumerate() {
        db.exec(&format!("INSERT INTO types VALUES ({}, {values})", 100 + i))
            .await;
    }
    wait_equal(&db, Duration::from_secs(15)).await;
    for (i, (_, expected)) in cases.iter().enumerate() {
        let copied = replica_row(&db.replica_file(), i as i64);
        let streamed = replica_row(&db.replica_file(), 100 + i as i64);
        assert_eq!(
            copied, streamed,
            "row {i}: binary COPY and pgoutput disagree"
        );
        if !expected.is_empty() {
            assert_eq!(copied, *expected, "row {i}");
        }
    }
    // The large JSON document and the unicode text survive intact.
    let big = replica_row(&db.replica_file(), 103);
    assert!(big[7].contains("日本語 🚀"));
    assert!(big[11].len() > 100_000);
    assert_eq!(big[14], "inf");

    // Declared types carry Zero's attribute tags.
    let conn = rusqlite::Connection::open(db.replica_file()).expect("open");
    let decl: Vec<(String, String)> = conn
        .prepare("SELECT name, type FROM pragma_table_info('types')")
        .expect("prepare")
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))
        .expect("query")
        .collect::<Result<_, _>>()
        .expect("rows");
    let ty = |n: &str| decl.iter().find(|(c, _)| c == n).map(|(_, t)| t.clone());
    assert_eq!(ty("id").as_deref(), Some("int4|NOT_NULL"));
    assert_eq!(ty("e").as_deref(), Some("mood|TEXT_ENUM"));
    assert_eq!(ty("ia").as_deref(), Some("int4[]|TEXT_ARRAY"));
    assert_eq!(ty("dom").as_deref(), Some("int4"));
    r.stop().await.expect("clean stop");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn text_copy_gives_the_same_replica_as_binary_copy() {
    let db = test_db().await;
    db.exec(TYPES_TABLE).await;
    for (i, (values, _)) in cases().iter().enumerate() {
        db.exec(&format!("INSERT INTO types VALUES ({i}, {values})"))
            .await;
    }
    let mut cfg = db.replicator_config();
    cfg.sync.text_copy = true;
    let mut r = start(cfg);
    r.ready().await;
    wait_equal(&db, Duration::from_secs(15)).await;
    for (i, (_, expected)) in cases().iter().enumerate() {
        if !expected.is_empty() {
            assert_eq!(
                replica_row(&db.replica_file(), i as i64),
                *expected,
                "row {i}"
            );
        }
    }
    r.stop().await.expect("clean stop");
}
