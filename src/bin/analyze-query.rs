//! `analyze-query`: hydrates one query over a replica file with the incremental engine and
//! reports the query as ZQL, what it synced, how many rows it read, how long hydration took and
//! the plan.
//!
//! ```text
//! analyze-query --replica-file FILE (--query 'ZQL' --schema FILE | --ast FILE|-)
//!               [--runs N] [--json] [--output-synced-rows] [--output-view]
//! ```
//!
//! Exit codes: 0 success, 2 bad input (AST, ZQL, schema, arguments), 1 other failures.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Instant;

use clap::Parser;
use zero_cache::replica;
use zero_cache::zql;
use zero_dataflow::{Engine, EngineConfig, Op, TableChange};
use zero_queries::ast::Ast;
use zero_queries::schema::Schema;

// The server's allocator, so peak memory is what the server would use.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

#[derive(Debug, Parser)]
#[command(
    name = "analyze-query",
    about = "Hydrate one ZQL query over a zero-cache replica and report rows, timings and plan"
)]
struct Args {
    /// Replica file written by zero-cache.
    #[arg(long, env = "ZERO_REPLICA_FILE")]
    replica_file: PathBuf,
    /// The query in ZQL, e.g. `issue.where('open', true).limit(10)` (needs --schema).
    #[arg(long, conflicts_with = "ast", requires = "schema")]
    query: Option<String>,
    /// Schema JSON with tables and relationships, used to parse --query.
    #[arg(long)]
    schema: Option<PathBuf>,
    /// The query as Zero's AST JSON, from a file or `-` for standard input.
    #[arg(long)]
    ast: Option<String>,
    /// Hydrations to time.
    #[arg(long, default_value_t = 1)]
    runs: usize,
    /// Print one JSON object on stdout.
    #[arg(long)]
    json: bool,
    /// Print the flat rows the client would receive.
    #[arg(long)]
    output_synced_rows: bool,
    /// Print the result as Zero's hierarchical view.
    #[arg(long)]
    output_view: bool,
}

/// A failure, with the exit code it maps to.
struct Failure {
    code: i32,
    message: String,
}

fn bad_input(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn failure(message: impl Into<String>) -> Failure {
    Failure {
        code: 1,
        message: message.into(),
    }
}

fn main() {
    let args = match Args::try_parse() {
        Ok(a) => a,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            std::process::exit(code);
        }
    };
    match run(args) {
        Ok(()) => {}
        Err(f) => {
            eprintln!("analyze-query: {}", f.message);
            std::process::exit(f.code);
        }
    }
}

/// Tables an AST reads (its table and every subquery's, recursively).
fn tables_of(ast: &Ast, out: &mut Vec<String>) {
    let v = serde_json::to_value(ast).expect("ASTs serialize");
    fn walk(v: &serde_json::Value, out: &mut Vec<String>) {
        match v {
            serde_json::Value::Object(m) => {
                if let Some(serde_json::Value::String(t)) = m.get("table")
                    && !out.contains(t)
                {
                    out.push(t.clone());
                }
                for x in m.values() {
                    walk(x, out);
                }
            }
            serde_json::Value::Array(a) => a.iter().for_each(|x| walk(x, out)),
            _ => {}
        }
    }
    walk(&v, out);
}

fn run(args: Args) -> Result<(), Failure> {
    if !args.replica_file.exists() {
        return Err(bad_input(format!(
            "replica file {} does not exist",
            args.replica_file.display()
        )));
    }
    let conn = replica::open(&args.replica_file)
        .map_err(|e| failure(format!("cannot open replica: {e}")))?;
    let state = replica::read_state(&conn)
        .map_err(|e| failure(format!("cannot read replica: {e}")))?
        .ok_or_else(|| bad_input("the file is not a complete zero-cache replica"))?;
    let schema = zql::replica_schema(&state.schema);

    let ast: Ast = match (&args.query, &args.ast) {
        (Some(q), None) => {
            let path = args
                .schema
                .as_ref()
                .expect("clap requires --schema with --query");
            let text = std::fs::read_to_string(path)
                .map_err(|e| bad_input(format!("cannot read schema {}: {e}", path.display())))?;
            let query_schema = Schema::from_json_str(&text)
                .map_err(|e| bad_input(format!("bad schema {}: {e}", path.display())))?;
            zero_queries::parse::parse_query(q, &query_schema).map_err(|e| {
                let at = e.offset.min(q.len());
                bad_input(format!(
                    "bad query at byte {}: {}\n  {}\n  {}^",
                    e.offset,
                    e.message,
                    q,
                    " ".repeat(q[..at].chars().count())
                ))
            })?
        }
        (None, Some(src)) => {
            let mut text = String::new();
            if src == "-" {
                std::io::stdin()
                    .read_to_string(&mut text)
                    .map_err(|e| bad_input(format!("cannot read standard input: {e}")))?;
            } else {
                text = std::fs::read_to_string(src)
                    .map_err(|e| bad_input(format!("cannot read {src}: {e}")))?;
            }
            serde_json::from_str(&text).map_err(|e| bad_input(format!("bad AST: {e}")))?
        }
        _ => return Err(bad_input("give either --query with --schema, or --ast")),
    };
    zero_queries::validate::validate(&ast, &schema)
        .map_err(|e| bad_input(format!("invalid query: {e}")))?;

    // Load the tables the query reads into the engine at version 1.
    let mut tables = Vec::new();
    tables_of(&ast, &mut tables);
    let mut engine = Engine::new(EngineConfig { workers: 1 }, &schema)
        .map_err(|e| failure(format!("engine: {e}")))?;
    let load = Instant::now();
    let mut rows_read = 0usize;
    let mut changes = Vec::new();
    for t in &tables {
        let ts = schema
            .table(t)
            .ok_or_else(|| bad_input(format!("unknown table \"{t}\"")))?;
        let rows =
            zql::read_table(&conn, ts).map_err(|e| failure(format!("reading \"{t}\": {e}")))?;
        rows_read += rows.len();
        changes.extend(rows.into_iter().map(|row| TableChange {
            table: t.clone(),
            op: Op::Insert,
            row,
        }));
    }
    engine
        .apply(1, changes)
        .map_err(|e| failure(format!("engine: {e}")))?;
    engine
        .step_until(1)
        .map_err(|e| failure(format!("engine: {e}")))?;
    let load_ms = load.elapsed().as_secs_f64() * 1000.0;

    // Hydrate: each run adds the query anew at the next version.
    let mut times = Vec::new();
    let mut synced: BTreeMap<Arc<str>, Vec<serde_json::Value>> = BTreeMap::new();
    let mut version = 1;
    for run in 0..args.runs.max(1) {
        let id = format!("q{run}");
        version += 1;
        let t = Instant::now();
        engine
            .add_query(&id, &ast)
            .map_err(|e| bad_input(format!("invalid query: {e}")))?;
        engine
            .apply(version, Vec::new())
            .map_err(|e| failure(format!("engine: {e}")))?;
        engine
            .step_until(version)
            .map_err(|e| failure(format!("engine: {e}")))?;
        times.push(t.elapsed().as_secs_f64() * 1000.0);
        if run == 0 {
            for (table, row) in engine.rows(&id).unwrap_or_default() {
                let json = schema
                    .row_to_json(&table, &row)
                    .unwrap_or(serde_json::Value::Null);
                synced.entry(table).or_default().push(json);
            }
        }
        if run + 1 < args.runs.max(1) {
            engine
                .remove_query(&id)
                .map_err(|e| failure(format!("engine: {e}")))?;
        }
    }
    let first = times[0];
    let mut sorted = times.clone();
    sorted.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    let median = sorted[sorted.len() / 2];
    let last_id = format!("q{}", args.runs.max(1) - 1);
    let view = engine.view(&last_id).unwrap_or(serde_json::Value::Null);
    let rows_by_table: BTreeMap<String, usize> = synced
        .iter()
        .map(|(t, rows)| (t.to_string(), rows.len()))
        .collect();
    let synced_count: usize = rows_by_table.values().sum();
    // The query as ZQL: an AST given as JSON is easier to recognize this way.
    let zql = zero_queries::print::to_zql(&ast);
    let plan = format!(
        "incremental dataflow: {} template(s), {} instance(s); tables {}",
        engine.template_count(),
        engine.instance_count(),
        tables.join(", ")
    );

    if args.json {
        let mut out = serde_json::json!({
            "query": zql,
            "syncedRowCount": synced_count,
            "rowsByTable": rows_by_table,
            "rowsRead": rows_read,
            "hydrationMs": {"first": first, "median": median},
            "loadMs": load_ms,
            "peakMemoryBytes": zero_cache::procstat::peak_rss_bytes(),
            "plan": plan,
        });
        if args.output_view {
            out["view"] = view;
        }
        if args.output_synced_rows {
            out["syncedRows"] = serde_json::to_value(&synced).expect("json values serialize");
        }
        println!("{out}");
    } else {
        println!("query: {zql}");
        println!("plan: {plan}");
        println!("rows read: {rows_read} (loaded in {load_ms:.1} ms)");
        println!("synced rows: {synced_count}");
        for (t, n) in &rows_by_table {
            println!("  {t}: {n}");
        }
        println!(
            "hydration: first {first:.2} ms, median {median:.2} ms over {} run(s)",
            times.len()
        );
        println!(
            "peak memory: {} MB",
            zero_cache::procstat::peak_rss_bytes() / (1024 * 1024)
        );
        if args.output_view {
            println!(
                "{}",
                serde_json::to_string_pretty(&view).expect("json values serialize")
            );
        }
        if args.output_synced_rows {
            println!(
                "{}",
                serde_json::to_string_pretty(&synced).expect("json values serialize")
            );
        }
    }
    Ok(())
}
