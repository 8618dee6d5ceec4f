//! Test harness: one private Postgres cluster per test binary (initdb into a temp folder, a free
//! loopback port, `wal_level=logical`), a fresh database per test, and helpers to run the
//! replicator and compare the replica with upstream.

#![allow(dead_code, unreachable_pub)]

use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rusqlite::types::Value;
use tokio::sync::watch;
use zero_cache::devpg::{DevPgOptions, DevPostgres};
use zero_cache::initial_sync::SyncOptions;
use zero_cache::pgconn::UpstreamConfig;
use zero_cache::replicator::{ReplicatorConfig, ReplicatorError};
use zero_cache::schema::PublishedSchema;
use zero_cache::upstream::{Shard, quote_ident};

static CLUSTER: OnceLock<DevPostgres> = OnceLock::new();
static COUNTER: AtomicU32 = AtomicU32::new(0);

/// The cluster shared by this test binary.
pub fn cluster() -> &'static DevPostgres {
    CLUSTER.get_or_init(|| {
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info")),
            )
            .with_test_writer()
            .try_init();
        let dir = std::env::temp_dir().join(format!("zero-test-pg-{}", std::process::id()));
        let pg = DevPostgres::start(
            &dir,
            &DevPgOptions {
                port: None,
                fsync: false,
                remove_on_drop: true,
                settings: Vec::new(),
                hba: None,
            },
        )
        .expect("starting the test Postgres cluster");
        pg.stop_when_process_exits()
            .expect("installing the cluster cleanup");
        pg
    })
}

/// A database of its own for one test, with a scratch folder for replica files.
pub struct TestDb {
    /// Database name.
    pub name: String,
    /// URI of the database.
    pub uri: String,
    /// A connection to it.
    pub client: tokio_postgres::Client,
    /// Scratch folder.
    pub dir: tempfile::TempDir,
}

/// Creates a fresh database.
pub async fn test_db() -> TestDb {
    let pg = cluster();
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let name = format!("t{}_{n}", std::process::id());
    let admin = connect(&pg.uri("postgres")).await;
    admin
        .batch_execute(&format!("CREATE DATABASE {name}"))
        .await
        .expect("create database");
    let uri = pg.uri(&name);
    let client = connect(&uri).await;
    TestDb {
        name,
        uri,
        client,
        dir: tempfile::tempdir().expect("temp dir"),
    }
}

/// Connects with the session settings the server uses.
pub async fn connect(uri: &str) -> tokio_postgres::Client {
    UpstreamConfig::parse(uri)
        .expect("uri")
        .connect()
        .await
        .expect("connect to test postgres")
}

impl TestDb {
    /// Runs SQL statements.
    pub async fn exec(&self, sql: &str) {
        self.client.batch_execute(sql).await.unwrap_or_else(|e| {
            let mut s = sql.to_string();
            s.truncate(300);
            panic!("{s}: {e:?}")
        });
    }

    /// Replication slots of this database: a role that should not own a slot, or a restart
    /// that leaks one, shows up here.
    pub async fn replication_slot_count(&self) -> i64 {
        self.client
            .query_one(
                "SELECT count(*) FROM pg_replication_slots WHERE database = current_database()",
                &[],
            )
            .await
            .expect("slots")
            .get(0)
    }

    /// The replica file path in the scratch folder.
    pub fn replica_file(&self) -> PathBuf {
        self.dir.path().join("replica.db")
    }

    /// Replicator settings for this database.
    pub fn replicator_config(&self) -> ReplicatorConfig {
        ReplicatorConfig {
            upstream: UpstreamConfig::parse(&self.uri).expect("uri"),
            shard: Shard::new("zero", 0, &[]),
            sync: SyncOptions {
                replica_file: self.replica_file(),
                workers: 3,
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
}

/// A replicator running in this process.
pub struct Running {
    stop: watch::Sender<bool>,
    handle: tokio::task::JoinHandle<Result<(), ReplicatorError>>,
    /// Watermarks as they are committed.
    pub watermarks: watch::Receiver<String>,
}

/// Starts the replication manager as a task.
pub fn start(cfg: ReplicatorConfig) -> Running {
    let (wm_tx, wm_rx) = watch::channel(String::new());
    let (stop, stop_rx) = watch::channel(false);
    let handle = tokio::spawn(zero_cache::replicator::run(cfg, wm_tx, stop_rx));
    Running {
        stop,
        handle,
        watermarks: wm_rx,
    }
}

impl Running {
    /// Waits until the initial sync is done.
    pub async fn ready(&mut self) {
        let r = tokio::time::timeout(
            Duration::from_secs(60),
            self.watermarks.wait_for(|w| !w.is_empty()),
        )
        .await
        .expect("replica ready within 60 s")
        .is_ok();
        if !r {
            let result = (&mut self.handle).await;
            panic!("replicator stopped before the replica was ready: {result:?}");
        }
    }

    /// Stops the replicator and returns its result.
    pub async fn stop(self) -> Result<(), ReplicatorError> {
        self.stop.send_replace(true);
        self.handle.await.expect("replicator task")
    }

    /// Waits (up to 20 s) for the replicator to end on its own, and returns its result.
    pub async fn stopped_by_itself(self) -> Result<(), ReplicatorError> {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !self.finished() {
            assert!(Instant::now() < deadline, "the replicator kept running");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        self.stop().await
    }

    /// Whether the replicator task ended (e.g. with an error).
    pub fn finished(&self) -> bool {
        self.handle.is_finished()
    }
}

/// One table's rows in a canonical, comparable form.
pub type Rows = BTreeSet<Vec<String>>;

/// Canonical text of a replica value.
pub fn canon(v: &Value) -> String {
    match v {
        Value::Null => "null".into(),
        Value::Integer(i) => format!("{i}"),
        Value::Real(f) if f.fract() == 0.0 && f.abs() < 1e15 => format!("{}", *f as i64),
        Value::Real(f) => format!("{f:?}"),
        Value::Text(s) => format!("{s:?}"),
        Value::Blob(b) => format!("{b:?}"),
    }
}

/// Reads the schema recorded in a replica.
pub fn replica_schema(path: &Path) -> PublishedSchema {
    let conn = rusqlite::Connection::open(path).expect("open replica");
    zero_cache::replica::read_state(&conn)
        .expect("read state")
        .expect("complete replica")
        .schema
}

/// All rows of the replicated tables of `schema`, read from the replica.
pub fn replica_rows(path: &Path, schema: &PublishedSchema) -> BTreeMap<String, Rows> {
    let conn = rusqlite::Connection::open(path).expect("open replica");
    let mut out = BTreeMap::new();
    for (name, t) in schema.replica_tables() {
        if t.schema != "public" {
            continue;
        }
        let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let sql = format!("SELECT {} FROM {}", cols.join(", "), quote_ident(&name));
        // A table or column the replica does not have (yet) shows up as a difference.
        let Ok(mut stmt) = conn.prepare(&sql) else {
            out.insert(name, Rows::from([vec!["<missing in replica>".to_string()]]));
            continue;
        };
        let rows: Rows = stmt
            .query_map([], |r| {
                (0..cols.len())
                    .map(|i| r.get::<_, Value>(i).map(|v| canon(&v)))
                    .collect::<Result<Vec<_>, _>>()
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        out.insert(name, rows);
    }
    out
}

/// All rows of the same tables read from upstream, converted the way replication converts them.
pub async fn upstream_rows(
    client: &tokio_postgres::Client,
    schema: &PublishedSchema,
) -> BTreeMap<String, Rows> {
    let mut out = BTreeMap::new();
    for (name, t) in schema.replica_tables() {
        if t.schema != "public" {
            continue;
        }
        let cols: Vec<String> = t.columns.iter().map(|c| quote_ident(&c.name)).collect();
        let sql = format!(
            "SELECT {} FROM {}.{}",
            cols.join(", "),
            quote_ident(&t.schema),
            quote_ident(&t.upstream_name)
        );
        // The simple query protocol returns each value in its text output format, exactly as
        // pgoutput sends it.
        let msgs = client.simple_query(&sql).await.expect("query upstream");
        let mut set = Rows::new();
        for m in msgs {
            let tokio_postgres::SimpleQueryMessage::Row(r) = m else {
                continue;
            };
            let mut row = Vec::new();
            for (i, c) in t.columns.iter().enumerate() {
                let v = match r.get(i) {
                    None => Value::Null,
                    Some(s) => zero_cache::pgvalue::from_text(c.kind, s).expect("convert"),
                };
                row.push(canon(&v));
            }
            set.insert(row);
        }
        out.insert(name, set);
    }
    out
}

/// Waits until the replica holds exactly upstream's rows (and schema); panics with the
/// difference after `timeout`.
pub async fn wait_equal(db: &TestDb, timeout: Duration) {
    let deadline = Instant::now() + timeout;
    loop {
        let Some(state) = try_replica_state(&db.replica_file()) else {
            // Being (re)synced.
            assert!(
                Instant::now() < deadline,
                "no complete replica within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        let schema = state.schema;
        let up_schema =
            zero_cache::upstream::published_schema(&db.client, &Shard::new("zero", 0, &[]))
                .await
                .expect("upstream schema");
        let replica = replica_rows(&db.replica_file(), &up_schema);
        let upstream = upstream_rows(&db.client, &up_schema).await;
        if schema == up_schema && replica == upstream {
            return;
        }
        if Instant::now() > deadline {
            for (t, rows) in &upstream {
                let r = replica.get(t).cloned().unwrap_or_default();
                let missing: Vec<_> = rows.difference(&r).take(5).collect();
                let extra: Vec<_> = r.difference(rows).take(5).collect();
                if !missing.is_empty() || !extra.is_empty() {
                    eprintln!(
                        "table {t}: missing in replica {missing:?}; extra in replica {extra:?}"
                    );
                }
            }
            panic!(
                "replica did not converge to upstream within {timeout:?} (schemas equal: {})",
                schema == up_schema
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Reads a single value from the replica.
pub fn replica_query<T: rusqlite::types::FromSql>(path: &Path, sql: &str) -> T {
    let conn = rusqlite::Connection::open(path).expect("open replica");
    conn.query_row(sql, [], |r| r.get(0))
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
}

/// Checks the change log against the rows: every row changed since initial sync has exactly
/// one `s` entry at its `_0_version`; every other row is at the replica version with no entry;
/// `d` entries name rows that are absent. Returns the number of entries checked.
pub fn check_change_log(path: &Path) -> usize {
    let conn = rusqlite::Connection::open(path).expect("open replica");
    let state = zero_cache::replica::read_state(&conn)
        .expect("state")
        .expect("complete");
    let mut checked = 0;
    for (name, t) in state.schema.replica_tables() {
        let key_cols: Vec<String> = t.key.iter().map(|k| quote_ident(k)).collect();
        let sql = format!(
            "SELECT {}, \"_0_version\" FROM {}",
            key_cols.join(", "),
            quote_ident(&name)
        );
        let mut stmt = conn.prepare(&sql).expect("prepare");
        let rows: Vec<(String, String)> = stmt
            .query_map([], |r| {
                let mut obj = serde_json::Map::new();
                for (i, k) in t.key.iter().enumerate() {
                    let v: Value = r.get(i)?;
                    obj.insert(
                        k.clone(),
                        match v {
                            Value::Null => serde_json::Value::Null,
                            Value::Integer(i) => i.into(),
                            Value::Real(f) => f.into(),
                            Value::Text(s) => s.into(),
                            Value::Blob(_) => panic!("blob key"),
                        },
                    );
                }
                Ok((
                    serde_json::Value::Object(obj).to_string(),
                    r.get::<_, String>(t.key.len())?,
                ))
            })
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("rows");
        let mut log: BTreeMap<String, (String, String)> = conn
            .prepare("SELECT \"rowKey\", \"stateVersion\", op FROM \"_zero.changeLog2\" WHERE \"table\" = ?1 AND op IN ('s', 'd')")
            .expect("prepare")
            .query_map([&name], |r| Ok((r.get(0)?, (r.get(1)?, r.get(2)?))))
            .expect("query")
            .collect::<Result<_, _>>()
            .expect("log");
        let reset: Option<String> = conn
            .query_row(
                "SELECT max(\"stateVersion\") FROM \"_zero.changeLog2\" WHERE \"table\" = ?1 AND op IN ('t', 'r')",
                [&name],
                |r| r.get(0),
            )
            .expect("reset");
        for (key, version) in rows {
            match log.remove(&key) {
                Some((v, op)) => {
                    assert_eq!(op, "s", "{name} {key}: present row logged as {op}");
                    assert_eq!(
                        v, version,
                        "{name} {key}: log version differs from _0_version"
                    );
                }
                None => assert!(
                    version == state.replica_version
                        || reset.as_ref().is_some_and(|r| &version <= r),
                    "{name} {key}: row at version {version} has no change-log entry"
                ),
            }
            checked += 1;
        }
        for (key, (_, op)) in log {
            assert_eq!(op, "d", "{name} {key}: absent row logged as {op}");
            checked += 1;
        }
    }
    checked
}

/// The replica's state if the file is a complete replica.
pub fn try_replica_state(path: &Path) -> Option<zero_cache::replica::ReplicaState> {
    if !path.exists() {
        return None;
    }
    let conn = rusqlite::Connection::open(path).ok()?;
    zero_cache::replica::read_state(&conn).ok().flatten()
}
