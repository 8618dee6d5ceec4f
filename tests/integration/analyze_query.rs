use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use zero_cache::demo;
use zero_queries::schema::Schema;
use zero_queries::sql::{SqlValue, Statement};

use crate::support::{start, test_db, wait_equal};

const QUERIES: &[&str] = &[
    "issue.where('open', true).related('creator').related('labels').orderBy('modified', 'desc').limit(20)",
    "issue.where('id', 'i7').related('comments', c => c.related('creator').orderBy('created', 'desc').limit(100)).one()",
    "issue.whereExists('labels', l => l.where('name', 'bug')).orderBy('created', 'asc').limit(10)",
    "issue.where('title', 'LIKE', '%1%').where('assigneeID', 'IS', null).orderBy('shortID', 'desc').start({id: 'i150', shortID: 150}).limit(7)",
    "user.related('issues_none_here', x => x)",
];

fn exec(
    conn: &rusqlite::Connection,
    st: &Statement,
) -> Result<Vec<Vec<SqlValue>>, rusqlite::Error> {
    let params: Vec<rusqlite::types::Value> = st
        .params
        .iter()
        .map(|p| match p {
            SqlValue::Null => rusqlite::types::Value::Null,
            SqlValue::Integer(i) => rusqlite::types::Value::Integer(*i),
            SqlValue::Real(f) => rusqlite::types::Value::Real(*f),
            SqlValue::Text(s) => rusqlite::types::Value::Text(s.clone()),
        })
        .collect();
    let mut stmt = conn.prepare(&st.sql)?;
    let n = st.columns.len();
    let rows = stmt.query_map(rusqlite::params_from_iter(params), |r| {
        (0..n)
            .map(|i| {
                Ok(match r.get::<_, rusqlite::types::Value>(i)? {
                    rusqlite::types::Value::Null => SqlValue::Null,
                    rusqlite::types::Value::Integer(i) => SqlValue::Integer(i),
                    rusqlite::types::Value::Real(f) => SqlValue::Real(f),
                    rusqlite::types::Value::Text(s) => SqlValue::Text(s),
                    rusqlite::types::Value::Blob(_) => SqlValue::Null,
                })
            })
            .collect::<Result<Vec<_>, rusqlite::Error>>()
    })?;
    rows.collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn analyze_query_matches_the_sql_oracle_and_rejects_bad_input() {
    let db = test_db().await;
    db.exec(demo::SCHEMA_SQL).await;
    db.exec(&demo::data_sql(demo::Scale {
        users: 20,
        issues: 200,
        comments: 1000,
        labels: 5,
        issue_labels: 300,
    }))
    .await;
    let mut r = start(db.replicator_config());
    r.ready().await;
    wait_equal(&db, Duration::from_secs(20)).await;
    r.stop().await.expect("clean stop");

    let schema_file = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/zbugs-schema.json");
    let schema = Schema::from_json_str(&std::fs::read_to_string(schema_file).expect("schema"))
        .expect("parse schema");
    let conn = rusqlite::Connection::open(db.replica_file()).expect("open replica");
    for q in QUERIES.iter().take(4) {
        let out = Command::new(env!("CARGO_BIN_EXE_analyze-query"))
            .args(["--replica-file"])
            .arg(db.replica_file())
            .args([
                "--schema",
                schema_file,
                "--query",
                q,
                "--runs",
                "3",
                "--json",
            ])
            .args(["--output-view", "--output-synced-rows"])
            .output()
            .expect("run analyze-query");
        assert!(
            out.status.success(),
            "{q}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json report");

        let ast = zero_queries::parse::parse_query(q, &schema).expect("parse");
        let nodes =
            zero_queries::sql::evaluate(&ast, &schema, |st| exec(&conn, st)).expect("oracle");
        let want_view = zero_queries::sql::to_view_json(&nodes, &schema);
        let want_rows = zero_queries::sql::synced_rows(&nodes);
        let mut want_by_table: BTreeMap<String, usize> = BTreeMap::new();
        for (t, _) in &want_rows {
            *want_by_table.entry(t.clone()).or_default() += 1;
        }
        let got_view = report["view"].clone();
        // `one()` views are a single row (or null) rather than an array.
        let got_view = if got_view.is_array() {
            got_view
        } else if got_view.is_null() {
            serde_json::json!([])
        } else {
            serde_json::json!([got_view])
        };
        assert_eq!(got_view, want_view, "{q}: view differs from the SQL oracle");
        let got_by_table: BTreeMap<String, usize> =
            serde_json::from_value(report["rowsByTable"].clone()).expect("rowsByTable");
        assert_eq!(got_by_table, want_by_table, "{q}: synced rows differ");
        assert_eq!(
            report["syncedRowCount"].as_u64(),
            Some(want_rows.len() as u64),
            "{q}"
        );
        assert!(report["rowsRead"].as_u64().unwrap_or(0) > 0, "{q}");
        assert!(report["hydrationMs"]["median"].as_f64().is_some(), "{q}");
        assert!(report["peakMemoryBytes"].as_u64().unwrap_or(0) > 0, "{q}");
        let synced_issue = report["syncedRows"]["issue"].as_array().map(Vec::len);
        assert_eq!(synced_issue, want_by_table.get("issue").copied(), "{q}");
    }

    // Bad ZQL: exit code 2 and a message pointing at the text.
    let out = Command::new(env!("CARGO_BIN_EXE_analyze-query"))
        .arg("--replica-file")
        .arg(db.replica_file())
        .args(["--schema", schema_file, "--query", QUERIES[4]])
        .output()
        .expect("run analyze-query");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("issues_none_here"), "{err}");

    // Bad AST JSON from standard input.
    let mut child = Command::new(env!("CARGO_BIN_EXE_analyze-query"))
        .arg("--replica-file")
        .arg(db.replica_file())
        .args(["--ast", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("spawn");
    {
        use std::io::Write;
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(br#"{"table": "nope"}"#).expect("write ast");
    }
    let out = child.wait_with_output().expect("wait");
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nope"), "{err}");

    // A good AST from a file.
    let ast_file = db.dir.path().join("q.json");
    std::fs::write(
        &ast_file,
        r#"{"table": "label", "orderBy": [["name", "asc"]], "limit": 3}"#,
    )
    .expect("write");
    let out = Command::new(env!("CARGO_BIN_EXE_analyze-query"))
        .arg("--replica-file")
        .arg(db.replica_file())
        .arg("--ast")
        .arg(&ast_file)
        .args(["--json", "--output-view"])
        .output()
        .expect("run");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    assert_eq!(report["syncedRowCount"], 3);
    assert_eq!(report["view"][0]["name"], "bug");
    assert_eq!(
        report["query"], "label.orderBy('name', 'asc').limit(3)",
        "{report}"
    );
}
