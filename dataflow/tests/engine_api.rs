//! The engine's bookkeeping: sharing of instances and templates, removal, late subscribers,
//! and the errors callers can cause.

use zero_dataflow::{Engine, EngineConfig, EngineError, Op, RowPatch, TableChange};
use zero_queries::parse::parse_query;
use zero_queries::schema::Schema;
use zero_queries::{Row, Value};

fn schema() -> Schema {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/schema.json"),
    )
    .expect("schema file");
    Schema::from_json_str(&text).expect("schema")
}

fn issue(id: &str, modified: f64) -> Row {
    Row::from(vec![
        Value::from(id),
        Value::from("t"),
        Value::Bool(true),
        Value::Number(modified),
        Value::Null,
    ])
}

/// The first primary-key column of each put, sorted.
fn put_ids<'a>(patches: impl IntoIterator<Item = &'a RowPatch>) -> Vec<Value> {
    let mut ids: Vec<Value> = patches
        .into_iter()
        .filter_map(|p| match p {
            RowPatch::Put { pk, .. } => Some(pk[0].clone()),
            RowPatch::Del { .. } => None,
        })
        .collect();
    ids.sort();
    ids
}

fn insert(row: Row) -> TableChange {
    TableChange {
        table: "issue".into(),
        op: Op::Insert,
        row,
    }
}

#[test]
fn identical_queries_share_an_instance_and_shapes_share_a_template() {
    let schema = schema();
    let mut e = Engine::new(EngineConfig { workers: 1 }, &schema).expect("engine");
    let q = |s: &str| parse_query(s, &schema).expect("query");
    e.add_query("a", &q("issue.where('id', 'i1')"))
        .expect("add");
    e.add_query("b", &q("issue.where('id', 'i1')"))
        .expect("add");
    e.add_query("c", &q("issue.where('id', 'i2')"))
        .expect("add");
    e.add_query("d", &q("issue.orderBy('modified', 'desc').limit(1)"))
        .expect("add");
    assert_eq!(e.instance_count(), 3);
    assert_eq!(e.template_count(), 2);
    e.apply(1, vec![insert(issue("i1", 1.0)), insert(issue("i2", 2.0))])
        .expect("apply");
    let diffs = e.step_until(1).expect("step");
    let mut got: Vec<(String, usize, bool)> = diffs
        .iter()
        .map(|d| (d.query.clone(), d.patches.len(), d.initial))
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            ("a".into(), 1, true),
            ("b".into(), 1, true),
            ("c".into(), 1, true),
            ("d".into(), 1, true)
        ]
    );

    // A late subscriber to a live instance gets the whole result with the next version.
    e.add_query("late", &q("issue.where('id', 'i1')"))
        .expect("add");
    assert_eq!(e.instance_count(), 3);
    e.apply(2, vec![]).expect("apply");
    let diffs = e.step_until(2).expect("step");
    assert_eq!(diffs.len(), 1);
    assert_eq!(diffs[0].query, "late");
    assert!(diffs[0].initial);
    assert!(
        matches!(&diffs[0].patches[..], [RowPatch::Put { pk, .. }] if pk[0] == Value::from("i1"))
    );

    // Removing queries frees instances, and a template with no instances is dropped.
    assert!(e.remove_query("a").expect("remove"));
    assert!(e.remove_query("b").expect("remove"));
    assert_eq!(e.instance_count(), 3, "\"late\" still holds the instance");
    assert!(e.remove_query("late").expect("remove"));
    assert!(e.remove_query("c").expect("remove"));
    assert_eq!(e.template_count(), 1);
    assert!(!e.remove_query("c").expect("remove"));
    e.apply(3, vec![insert(issue("i3", 3.0))]).expect("apply");
    let diffs = e.step_until(3).expect("step");
    assert_eq!(diffs.len(), 1);
    assert_eq!(diffs[0].query, "d");
    assert_eq!(diffs[0].patches.len(), 2, "i3 replaces i2 at the top");
    assert!(e.view("a").is_none());

    // The same shape can come back after its template was dropped.
    e.add_query("again", &q("issue.where('id', 'i3')"))
        .expect("add");
    e.apply(4, vec![]).expect("apply");
    let diffs = e.step_until(4).expect("step");
    assert_eq!(diffs.len(), 1);
    assert_eq!(diffs[0].patches.len(), 1);
    assert_eq!(
        e.view("again").expect("live"),
        serde_json::json!([{"id": "i3", "title": "t", "open": true, "modified": 3, "creatorID": null}])
    );
}

#[test]
fn caller_errors_are_reported() {
    let schema = schema();
    let mut e = Engine::new(EngineConfig { workers: 1 }, &schema).expect("engine");
    let q = parse_query("issue.where('id', 'i1')", &schema).expect("query");
    e.add_query("a", &q).expect("add");
    assert!(matches!(
        e.add_query("a", &q),
        Err(EngineError::DuplicateQuery(_))
    ));
    let bad = zero_queries::ast::Ast::new("nope");
    assert!(matches!(
        e.add_query("b", &bad),
        Err(EngineError::InvalidQuery(_))
    ));
    assert!(matches!(
        e.apply(
            1,
            vec![TableChange {
                table: "nope".into(),
                op: Op::Insert,
                row: issue("x", 1.0)
            }]
        ),
        Err(EngineError::UnknownTable(_))
    ));
    assert!(matches!(
        e.apply(
            1,
            vec![TableChange {
                table: "user".into(),
                op: Op::Insert,
                row: issue("x", 1.0)
            }]
        ),
        Err(EngineError::RowArity { .. })
    ));
    assert!(matches!(
        e.step_until(1),
        Err(EngineError::VersionNotApplied(1))
    ));
    e.apply(5, vec![]).expect("apply");
    assert!(matches!(
        e.apply(5, vec![]),
        Err(EngineError::VersionNotIncreasing { .. })
    ));
    // `poll` never blocks; the version's result shows up once the workers finish it.
    let mut got = Vec::new();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while got.is_empty() && std::time::Instant::now() < deadline {
        got = e.poll().expect("poll");
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].version, 5);
    assert!(e.poll().expect("poll").is_empty());
    assert_eq!(e.last_version(), Some(5));
}

/// Runs query `top` (the 3 latest issues) over 20 issues loaded at version 1 and then one
/// issue moved to the top per version up to `last`; checks the result after every version when
/// `each`, else once at the end.
fn top3_through_an_update_stream(e: &mut Engine, schema: &Schema, last: u32, each: bool) {
    let q = parse_query("issue.orderBy('modified', 'desc').limit(3)", schema).expect("query");
    e.add_query("top", &q).expect("add");
    let mut rows: Vec<Row> = (0..20)
        .map(|i| issue(&format!("i{i:02}"), f64::from(i)))
        .collect();
    e.apply(1, rows.iter().cloned().map(insert).collect())
        .expect("apply");
    e.step_until(1).expect("step");
    let check = |e: &Engine, rows: &[Row], v: u32| {
        let mut want = rows.to_vec();
        want.sort_by(|a, b| b.cmp_cols(3, a, 3));
        want.truncate(3);
        want.sort();
        let got: Vec<Row> = e
            .rows("top")
            .expect("live")
            .into_iter()
            .map(|(_, r)| r)
            .collect();
        assert_eq!(got, want, "version {v}");
    };
    for v in 2..=last {
        let i = (v as usize * 7) % rows.len();
        let old = rows[i].clone();
        let new = issue(&format!("i{i:02}"), f64::from(v));
        rows[i] = new.clone();
        let delete = TableChange {
            table: "issue".into(),
            op: Op::Delete,
            row: old,
        };
        e.apply(u64::from(v), vec![delete, insert(new)])
            .expect("apply");
        if each {
            e.step_until(u64::from(v)).expect("step");
            check(e, &rows, v);
        }
    }
    e.step_until(u64::from(last)).expect("step");
    check(e, &rows, last);
}

#[test]
fn long_update_streams_keep_results_exact() {
    // Many versions through one window: compaction must not lose or duplicate anything.
    let schema = schema();
    let mut e = Engine::new(EngineConfig { workers: 2 }, &schema).expect("engine");
    top3_through_an_update_stream(&mut e, &schema, 299, false);
}

#[test]
fn indexes_prepared_before_loading_serve_queries_across_workers() {
    // Asked for before the first version, the indexes are arranged in each worker's tables
    // dataflow; every worker must build the same dataflows in the same order.
    let schema = schema();
    let mut e = Engine::new(EngineConfig { workers: 2 }, &schema).expect("engine");
    e.prepare_index("issue", &["title".to_string()])
        .expect("prepare index");
    e.prepare_order("issue", &[], &[("modified".to_string(), true)])
        .expect("prepare ordering");
    top3_through_an_update_stream(&mut e, &schema, 59, true);
    let stats = e.index_stats().expect("stats");
    assert!(stats.iter().any(|s| s.name == "issue[1]" && s.vals >= 20));
    assert!(
        stats
            .iter()
            .any(|s| s.name.starts_with("issue[] sorted") && s.vals >= 20)
    );
}

#[test]
fn a_prepared_shape_is_built_before_its_first_query_and_kept_after_its_last() {
    let schema = schema();
    let mut e = Engine::new(EngineConfig { workers: 1 }, &schema).expect("engine");
    let q = |s: &str| parse_query(s, &schema).expect("query");
    // Prepared in the empty engine, as the sync server does while it loads the replica.
    e.prepare(&q("issue.orderBy('modified', 'desc').limit(5)"))
        .expect("prepare");
    assert_eq!(e.template_count(), 1, "the shape's dataflow exists already");
    assert_eq!(e.instance_count(), 0);
    e.apply(1, vec![insert(issue("i1", 1.0)), insert(issue("i2", 2.0))])
        .expect("apply");
    assert!(e.step_until(1).expect("step").is_empty());

    // A query of that shape (another limit) uses it, and hydrates from the rows loaded before.
    e.add_query("top", &q("issue.orderBy('modified', 'desc').limit(1)"))
        .expect("add");
    assert_eq!(
        e.template_count(),
        1,
        "no new dataflow for a prepared shape"
    );
    e.apply(2, vec![]).expect("apply");
    let diffs = e.step_until(2).expect("step");
    assert_eq!(diffs.len(), 1);
    assert!(diffs[0].initial);
    assert!(
        matches!(&diffs[0].patches[..], [RowPatch::Put { pk, .. }] if pk[0] == Value::from("i2"))
    );

    // Removing the last query keeps the prepared dataflow, which stays current.
    assert!(e.remove_query("top").expect("remove"));
    assert_eq!(e.template_count(), 1);
    e.apply(3, vec![insert(issue("i3", 3.0))]).expect("apply");
    assert!(e.step_until(3).expect("step").is_empty());
    e.add_query("again", &q("issue.orderBy('modified', 'desc').limit(2)"))
        .expect("add");
    e.apply(4, vec![]).expect("apply");
    let diffs = e.step_until(4).expect("step");
    assert_eq!(diffs.len(), 1);
    let ids = put_ids(&diffs[0].patches);
    assert_eq!(ids, vec![Value::from("i2"), Value::from("i3")]);
    // Preparing a shape that is already there changes nothing.
    e.prepare(&q("issue.orderBy('modified', 'desc').limit(9)"))
        .expect("prepare");
    assert_eq!(e.template_count(), 1);
}

#[test]
fn a_prepared_lookup_index_fills_as_the_rows_load() {
    let schema = schema();
    let mut other = issue("i3", 3.0).to_vec();
    other[1] = Value::from("u");
    let rows = vec![
        insert(issue("i1", 1.0)),
        insert(issue("i2", 2.0)),
        insert(Row::from(other)),
    ];
    // The same rows without the index, for the count of the other indexes.
    let mut plain = Engine::new(EngineConfig { workers: 1 }, &schema).expect("engine");
    plain.apply(1, rows.clone()).expect("apply");
    plain.step_until(1).expect("step");
    let before = plain.index_stats().expect("stats");
    assert!(
        before.iter().all(|s| s.name != "issue[1]"),
        "no relationship indexes the title"
    );
    let before = before.len();
    let mut e = Engine::new(EngineConfig { workers: 1 }, &schema).expect("engine");
    // Prepared before any row, as the sync server does with the upstream indexes: it is
    // arranged in the tables' own dataflow.
    e.prepare_index("issue", &["title".to_string()])
        .expect("prepare index");
    e.apply(1, rows).expect("apply");
    e.step_until(1).expect("step");
    let stats = e.index_stats().expect("stats");
    assert_eq!(stats.len(), before + 1);
    let idx = stats
        .iter()
        .find(|s| s.name == "issue[1]")
        .expect("the index on the title exists");
    // Two titles: two rows under one, one under the other.
    assert_eq!((idx.keys, idx.vals), (2, 3));
    // Preparing it again builds nothing new.
    e.prepare_index("issue", &["title".to_string()])
        .expect("prepare index");
    assert_eq!(e.index_stats().expect("stats").len(), before + 1);
    assert!(matches!(
        e.prepare_index("issue", &["nope".to_string()]),
        Err(EngineError::Unsupported(_))
    ));
    assert!(matches!(
        e.prepare_index("nope", &["id".to_string()]),
        Err(EngineError::UnknownTable(_))
    ));
}

#[test]
fn a_prepared_ordering_fills_as_the_rows_load_and_serves_its_top_k_queries() {
    let schema = schema();
    let mut e = Engine::new(EngineConfig { workers: 1 }, &schema).expect("engine");
    let q = |s: &str| parse_query(s, &schema).expect("query");
    let sorted = |e: &Engine| -> Vec<(String, usize, usize)> {
        e.index_stats()
            .expect("stats")
            .into_iter()
            .filter(|s| s.name.contains("sorted"))
            .map(|s| (s.name, s.keys, s.vals))
            .collect()
    };
    assert!(sorted(&e).is_empty());
    // Prepared before any row, as the sync server does with an upstream index on
    // `(open, modified)`: the ordering is completed with the primary key.
    e.prepare_order(
        "issue",
        &["open".to_string()],
        &[("modified".to_string(), true)],
    )
    .expect("prepare ordering");
    let mut closed = issue("i4", 4.0).to_vec();
    closed[2] = Value::Bool(false);
    e.apply(
        1,
        vec![
            insert(issue("i1", 1.0)),
            insert(issue("i2", 3.0)),
            insert(issue("i3", 2.0)),
            insert(Row::from(closed)),
        ],
    )
    .expect("apply");
    e.step_until(1).expect("step");
    let built = vec![("issue[2] sorted [(3, true), (0, false)]".to_string(), 2, 4)];
    assert_eq!(sorted(&e), built, "open and closed issues, all four rows");

    // A top-k query seeking `open` ordered by `modified desc` reads that index: none is built.
    e.add_query(
        "top",
        &q("issue.where('open', true).orderBy('modified', 'desc').limit(2)"),
    )
    .expect("add");
    e.apply(2, vec![]).expect("apply");
    let diffs = e.step_until(2).expect("step");
    assert_eq!(sorted(&e), built);
    let ids = put_ids(diffs.iter().flat_map(|d| &d.patches));
    assert_eq!(ids, vec![Value::from("i2"), Value::from("i3")]);

    // The other direction is another index; preparing one that exists builds nothing.
    e.prepare_order(
        "issue",
        &["open".to_string()],
        &[("modified".to_string(), true)],
    )
    .expect("prepare ordering");
    assert_eq!(sorted(&e).len(), 1);
    e.prepare_order(
        "issue",
        &["open".to_string()],
        &[("modified".to_string(), false)],
    )
    .expect("prepare ordering");
    assert_eq!(sorted(&e).len(), 2);
    assert!(matches!(
        e.prepare_order("issue", &[], &[("nope".to_string(), false)]),
        Err(EngineError::Unsupported(_))
    ));
    assert!(matches!(
        e.prepare_order("nope", &[], &[("id".to_string(), false)]),
        Err(EngineError::UnknownTable(_))
    ));
}
