//! `zero-cache-dev`: runs zero-cache for development. Without `ZERO_UPSTREAM_DB` it starts a
//! private Postgres under a data folder (default `./.zero-dev`), loads the demo schema and data
//! once, and runs zero-cache against it. Ctrl-C stops everything it started.

use std::path::PathBuf;

use anyhow::Context;
use zero_cache::config::Config;
use zero_cache::demo;
use zero_cache::devpg::{DevPgOptions, DevPostgres};

// jemalloc returns freed pages to the system and fragments less than glibc's malloc under the
// engine's many small, long-lived allocations (rows, index keys), which is most of the RSS.
#[global_allocator]
static ALLOC: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    zero_cache::procstat::start_allocator_purging();
    let _ = dotenvy::dotenv();
    let data_dir =
        PathBuf::from(std::env::var("ZERO_DEV_DATA_DIR").unwrap_or_else(|_| ".zero-dev".into()));
    // zero-cache-dev's own defaults, as in Zero; passed as flags before the user's own, which
    // override them.
    let mut args: Vec<String> = vec!["zero-cache".into()];
    for (k, flag, v) in [
        ("ZERO_NUM_SYNC_WORKERS", "--num-sync-workers", "3"),
        ("ZERO_CVR_MAX_CONNS", "--cvr-max-conns", "6"),
        ("ZERO_UPSTREAM_MAX_CONNS", "--upstream-max-conns", "6"),
    ] {
        if std::env::var_os(k).is_none() {
            args.extend([flag.to_string(), v.to_string()]);
        }
    }
    let mut _cluster = None;
    if std::env::var_os("ZERO_UPSTREAM_DB").is_none() {
        std::fs::create_dir_all(&data_dir)
            .with_context(|| format!("creating {}", data_dir.display()))?;
        let pg_dir = data_dir.join("pg");
        let fresh = !pg_dir.join("PG_VERSION").exists();
        let port = std::env::var("ZERO_DEV_PG_PORT")
            .ok()
            .and_then(|p| p.parse().ok());
        eprintln!("zero-cache-dev: starting Postgres in {}", pg_dir.display());
        let pg = DevPostgres::start(
            &pg_dir,
            &DevPgOptions {
                port,
                fsync: true,
                remove_on_drop: false,
                settings: Vec::new(),
                hba: None,
            },
        )
        .context("starting the development Postgres")?;
        if fresh {
            eprintln!("zero-cache-dev: loading the demo schema and data");
            pg.psql("postgres", demo::SCHEMA_SQL)?;
            // ZERO_DEV_SCALE=bench loads the benchmark dataset instead of the small one.
            let scale = match std::env::var("ZERO_DEV_SCALE").as_deref() {
                Ok("bench") => demo::Scale::BENCH,
                _ => demo::Scale::DEV,
            };
            pg.psql("postgres", &demo::data_sql(scale))?;
        }
        let uri = pg.uri("postgres");
        eprintln!("zero-cache-dev: upstream is {uri}");
        args.extend(["--upstream-db".to_string(), uri]);
        if std::env::var_os("ZERO_REPLICA_FILE").is_none() {
            args.extend([
                "--replica-file".to_string(),
                data_dir.join("zero.db").to_string_lossy().into_owned(),
            ]);
        }
        _cluster = Some(pg);
    }
    args.extend(std::env::args().skip(1));
    let config = Config::from_args(args);
    let telemetry = zero_cache::server::init_logging(&config)?;
    let rt = tokio::runtime::Runtime::new()?;
    let result = rt.block_on(zero_cache::server::run(config, async {
        let _ = tokio::signal::ctrl_c().await;
    }));
    drop(rt);
    if let Some(t) = telemetry {
        t.shutdown();
    }
    // Dropping the cluster stops Postgres.
    drop(_cluster);
    result.map_err(Into::into)
}
