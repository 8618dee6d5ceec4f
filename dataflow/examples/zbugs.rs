//! Runs the engine on its own over a zbugs-like dataset and prints timings, so it doubles as
//! a benchmark:
//!
//! ```text
//! cargo run --release -p zero-dataflow --example zbugs -- [issues] [comments-per-issue] [workers]
//! ```
//!
//! It loads the tables at version 1, then measures (median / p95):
//! * hydration of a new query (add + one empty version) for the shapes zbugs uses: the issue
//!   list, the issue list filtered by a label (EXISTS through a junction), and the issue
//!   detail page (related comments with creators, labels through a junction);
//! * a one-row update (an issue edit, a new comment) until every live query's patches are out.

use std::time::{Duration, Instant};

use zero_dataflow::{Engine, EngineConfig, Op, TableChange};
use zero_queries::ast::Ast;
use zero_queries::schema::Schema;
use zero_queries::{Row, Value};

const SCHEMA: &str = r#"{"tables":{
 "user":{"columns":{"id":{"type":"string"},"name":{"type":"string"}},"primaryKey":["id"]},
 "issue":{"columns":{"id":{"type":"string"},"title":{"type":"string"},"open":{"type":"boolean"},
   "modified":{"type":"number"},"created":{"type":"number"},"creatorID":{"type":"string"}},"primaryKey":["id"]},
 "comment":{"columns":{"id":{"type":"string"},"issueID":{"type":"string"},"body":{"type":"string"},
   "created":{"type":"number"},"creatorID":{"type":"string"}},"primaryKey":["id"]},
 "label":{"columns":{"id":{"type":"string"},"name":{"type":"string"}},"primaryKey":["id"]},
 "issueLabel":{"columns":{"issueID":{"type":"string"},"labelID":{"type":"string"}},"primaryKey":["issueID","labelID"]}
},
"relationships":{
 "issue":{"creator":[{"sourceField":["creatorID"],"destField":["id"],"destSchema":"user"}],
   "comments":[{"sourceField":["id"],"destField":["issueID"],"destSchema":"comment"}],
   "labels":[{"sourceField":["id"],"destField":["issueID"],"destSchema":"issueLabel"},
             {"sourceField":["labelID"],"destField":["id"],"destSchema":"label"}]},
 "comment":{"creator":[{"sourceField":["creatorID"],"destField":["id"],"destSchema":"user"}]}
}}"#;

const LABELS: &[&str] = &[
    "bug", "feature", "docs", "perf", "ui", "zql", "sync", "infra",
];

struct Rng(u64);

impl Rng {
    fn next(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n
    }
}

fn s(x: impl Into<String>) -> Value {
    Value::from(x.into())
}

fn n(x: u64) -> Value {
    Value::Number(x as f64)
}

fn ins(table: &str, row: Vec<Value>) -> TableChange {
    TableChange {
        table: table.into(),
        op: Op::Insert,
        row: Row::from(row),
    }
}

fn issue_row(rng: &mut Rng, i: u64, modified: u64) -> Row {
    Row::from(vec![
        s(format!("i{i}")),
        s(format!("Issue number {i}")),
        Value::Bool(rng.next(3) != 0),
        n(modified),
        n(i),
        s(format!("u{}", rng.next(100))),
    ])
}

fn ast(json: &str) -> Ast {
    Ast::from_json_str(json).expect("benchmark ASTs are valid")
}

fn issue_list(open: bool) -> Ast {
    ast(&format!(
        r#"{{"table":"issue","where":{{"type":"simple","left":{{"type":"column","name":"open"}},"right":{{"type":"literal","value":{open}}},"op":"="}},
        "related":[{{"correlation":{{"parentField":["creatorID"],"childField":["id"]}},"subquery":{{"table":"user","alias":"creator"}}}},
          {{"correlation":{{"parentField":["id"],"childField":["issueID"]}},"hidden":true,"subquery":{{"table":"issueLabel","alias":"labels",
            "related":[{{"correlation":{{"parentField":["labelID"],"childField":["id"]}},"subquery":{{"table":"label","alias":"labels"}}}}]}}}}],
        "limit":50,"orderBy":[["modified","desc"]]}}"#
    ))
}

fn issues_with_label(label: &str) -> Ast {
    ast(&format!(
        r#"{{"table":"issue","where":{{"type":"correlatedSubquery","op":"EXISTS","related":{{"correlation":{{"parentField":["id"],"childField":["issueID"]}},
          "subquery":{{"table":"issueLabel","alias":"zsubq_labels","where":{{"type":"correlatedSubquery","op":"EXISTS","related":{{
            "correlation":{{"parentField":["labelID"],"childField":["id"]}},"subquery":{{"table":"label","alias":"zsubq_zhidden_labels",
            "where":{{"type":"simple","left":{{"type":"column","name":"name"}},"right":{{"type":"literal","value":"{label}"}},"op":"="}}}}}}}}}}}}}},
        "limit":50,"orderBy":[["modified","desc"]]}}"#
    ))
}

fn issue_detail(i: u64) -> Ast {
    ast(&format!(
        r#"{{"table":"issue","where":{{"type":"simple","left":{{"type":"column","name":"id"}},"right":{{"type":"literal","value":"i{i}"}},"op":"="}},
        "related":[{{"correlation":{{"parentField":["id"],"childField":["issueID"]}},"subquery":{{"table":"comment","alias":"comments",
            "related":[{{"correlation":{{"parentField":["creatorID"],"childField":["id"]}},"subquery":{{"table":"user","alias":"creator"}}}}],
            "limit":100,"orderBy":[["created","desc"]]}}}},
          {{"correlation":{{"parentField":["id"],"childField":["issueID"]}},"hidden":true,"subquery":{{"table":"issueLabel","alias":"labels",
            "related":[{{"correlation":{{"parentField":["labelID"],"childField":["id"]}},"subquery":{{"table":"label","alias":"labels"}}}}]}}}}],
        "limit":1}}"#
    ))
}

fn stats(name: &str, mut v: Vec<Duration>) {
    if v.is_empty() {
        return;
    }
    v.sort();
    let ms = |d: Duration| d.as_secs_f64() * 1000.0;
    let med = v[v.len() / 2];
    let p95 = v[(v.len() * 95 / 100).min(v.len() - 1)];
    println!(
        "{name:<44} n={:<4} median {:>8.3} ms   p95 {:>8.3} ms",
        v.len(),
        ms(med),
        ms(p95)
    );
}

fn main() -> Result<(), zero_dataflow::EngineError> {
    let args: Vec<u64> = std::env::args()
        .skip(1)
        .map(|a| a.parse().expect("numeric arguments"))
        .collect();
    let issues = args.first().copied().unwrap_or(100_000);
    let per_issue = args.get(1).copied().unwrap_or(5);
    let workers = usize::try_from(args.get(2).copied().unwrap_or(1)).unwrap_or(1);
    let schema = Schema::from_json_str(SCHEMA).expect("valid schema");
    let mut engine = Engine::new(EngineConfig { workers }, &schema)?;
    let mut rng = Rng(0x9E37_79B9_7F4A_7C15);

    let mut batch = Vec::new();
    for u in 0..100 {
        batch.push(ins(
            "user",
            vec![s(format!("u{u}")), s(format!("User {u}"))],
        ));
    }
    for (l, name) in LABELS.iter().enumerate() {
        batch.push(ins("label", vec![s(format!("l{l}")), s(*name)]));
    }
    let mut issue_rows = Vec::new();
    let mut comments = 0u64;
    for i in 0..issues {
        let modified = rng.next(1_000_000_000);
        let row = issue_row(&mut rng, i, modified);
        issue_rows.push(row.clone());
        batch.push(TableChange {
            table: "issue".into(),
            op: Op::Insert,
            row,
        });
        let a = rng.next(LABELS.len() as u64);
        let b = rng.next(LABELS.len() as u64);
        batch.push(ins(
            "issueLabel",
            vec![s(format!("i{i}")), s(format!("l{a}"))],
        ));
        if b != a {
            batch.push(ins(
                "issueLabel",
                vec![s(format!("i{i}")), s(format!("l{b}"))],
            ));
        }
        for _ in 0..per_issue {
            batch.push(ins(
                "comment",
                vec![
                    s(format!("c{comments}")),
                    s(format!("i{i}")),
                    s("a comment body"),
                    n(comments),
                    s(format!("u{}", rng.next(100))),
                ],
            ));
            comments += 1;
        }
    }
    let rows = batch.len();
    println!(
        "dataset: {issues} issues, {comments} comments, {} labels, 100 users ({rows} rows); {workers} worker(s)",
        LABELS.len()
    );
    let t = Instant::now();
    engine.apply(1, batch)?;
    engine.step_until(1)?;
    println!(
        "load: {:.1} ms (tables and relationship indexes), rss {:.0} MiB",
        t.elapsed().as_secs_f64() * 1000.0,
        rss_mib()
    );

    let mut version = 1;
    let mut hydrate = |engine: &mut Engine, id: String, q: &Ast| {
        let t = Instant::now();
        engine.add_query(&id, q)?;
        version += 1;
        engine.apply(version, vec![])?;
        let diffs = engine.step_until(version)?;
        let d = t.elapsed();
        let rows: usize = diffs.iter().map(|d| d.patches.len()).sum();
        Ok::<_, zero_dataflow::EngineError>((d, rows))
    };
    let (d, r) = hydrate(&mut engine, "list-open".into(), &issue_list(true))?;
    println!(
        "hydrate issue list (first of its shape): {:.3} ms, {r} rows",
        d.as_secs_f64() * 1000.0
    );
    let (d, r) = hydrate(&mut engine, "list-closed".into(), &issue_list(false))?;
    println!(
        "hydrate issue list (shape shared):       {:.3} ms, {r} rows",
        d.as_secs_f64() * 1000.0
    );
    let mut times = Vec::new();
    let labels: &[&str] = if std::env::var("ZBUGS_SKIP_LABELS").is_ok() {
        &[]
    } else {
        LABELS
    };
    for (l, name) in labels.iter().enumerate() {
        let (d, _) = hydrate(&mut engine, format!("label-{l}"), &issues_with_label(name))?;
        times.push(d);
    }
    stats("hydrate issues with label (EXISTS, junction)", times);
    let mut times = Vec::new();
    for k in 0..40 {
        let i = rng.next(issues);
        let (d, _) = hydrate(&mut engine, format!("detail-{k}"), &issue_detail(i))?;
        times.push(d);
    }
    stats("hydrate issue detail", times);
    println!(
        "live: {} queries in {} templates, rss {:.0} MiB",
        engine.instance_count(),
        engine.template_count(),
        rss_mib()
    );

    let mut empty_times = Vec::new();
    for _ in 0..100 {
        version += 1;
        let t = Instant::now();
        engine.apply(version, vec![])?;
        engine.step_until(version)?;
        empty_times.push(t.elapsed());
    }
    stats("empty version (fixed cost per version)", empty_times);

    let mut edit_times = Vec::new();
    let mut comment_times = Vec::new();
    for k in 0..200 {
        let i = rng.next(issues);
        let old = issue_row_at(&issue_rows, i);
        let mut new: Vec<Value> = old.to_vec();
        new[3] = n(1_000_000_000 + k);
        let new = Row::from(new);
        issue_rows[usize::try_from(i).expect("small index")] = new.clone();
        version += 1;
        let t = Instant::now();
        engine.apply(
            version,
            vec![
                TableChange {
                    table: "issue".into(),
                    op: Op::Delete,
                    row: old,
                },
                TableChange {
                    table: "issue".into(),
                    op: Op::Insert,
                    row: new,
                },
            ],
        )?;
        engine.step_until(version)?;
        edit_times.push(t.elapsed());

        version += 1;
        let t = Instant::now();
        engine.apply(
            version,
            vec![ins(
                "comment",
                vec![
                    s(format!("c{comments}")),
                    s(format!("i{}", rng.next(issues))),
                    s("new comment"),
                    n(comments),
                    s("u1"),
                ],
            )],
        )?;
        comments += 1;
        engine.step_until(version)?;
        comment_times.push(t.elapsed());
    }
    stats("update: edit an issue (moves into the list)", edit_times);
    stats("update: insert a comment", comment_times);
    println!("rss after updates: {:.0} MiB", rss_mib());

    // Many clients: 1,000 more issue-detail queries (one template), added in one version.
    let t = Instant::now();
    for k in 0..1000 {
        let i = rng.next(issues);
        engine.add_query(&format!("many-{k}"), &issue_detail(i))?;
    }
    version += 1;
    engine.apply(version, vec![])?;
    engine.step_until(version)?;
    println!(
        "hydrate 1000 more issue-detail queries in one version: {:.1} ms; live: {} queries in {} templates, rss {:.0} MiB",
        t.elapsed().as_secs_f64() * 1000.0,
        engine.instance_count(),
        engine.template_count(),
        rss_mib()
    );
    let mut comment_times = Vec::new();
    for _ in 0..200 {
        version += 1;
        let t = Instant::now();
        engine.apply(
            version,
            vec![ins(
                "comment",
                vec![
                    s(format!("c{comments}")),
                    s(format!("i{}", rng.next(issues))),
                    s("new comment"),
                    n(comments),
                    s("u1"),
                ],
            )],
        )?;
        comments += 1;
        engine.step_until(version)?;
        comment_times.push(t.elapsed());
    }
    stats("update: insert a comment (1,050 queries)", comment_times);
    Ok(())
}

/// Resident set size, from `/proc/self/statm` (0 where that file does not exist).
fn rss_mib() -> f64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
    let pages: f64 = statm
        .split_whitespace()
        .nth(1)
        .and_then(|x| x.parse().ok())
        .unwrap_or(0.0);
    pages * 4096.0 / (1024.0 * 1024.0)
}

fn issue_row_at(rows: &[Row], i: u64) -> Row {
    rows[usize::try_from(i).expect("small index")].clone()
}
