//! A private Postgres cluster for development and tests: `initdb` into a folder, started on a
//! loopback port with `wal_level=logical`, stopped on drop.
//!
//! Postgres refuses to run as root, so as root every Postgres command runs through
//! `runuser -u postgres` and the folder is handed to that user.

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Errors starting or stopping the cluster; each says what to install or fix.
#[derive(Debug, thiserror::Error)]
pub enum DevPgError {
    /// No Postgres binaries were found.
    #[error(
        "cannot find Postgres binaries (initdb, pg_ctl): install Postgres (e.g. apt-get install postgresql) or set PG_BINDIR"
    )]
    NoBinaries,
    /// A Postgres command failed.
    #[error("{command} failed: {output}")]
    Command {
        /// The command.
        command: String,
        /// Its output.
        output: String,
    },
    /// File system error.
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A running private cluster.
pub struct DevPostgres {
    dir: PathBuf,
    port: u16,
    bindir: PathBuf,
    as_postgres: bool,
    remove_on_drop: bool,
    stopped: bool,
}

/// Options of a private cluster.
#[derive(Debug, Clone)]
pub struct DevPgOptions {
    /// Port; `None` picks a free one.
    pub port: Option<u16>,
    /// Turn off fsync (tests).
    pub fsync: bool,
    /// Remove the folder when dropped (tests).
    pub remove_on_drop: bool,
    /// Extra server settings (`name`, `value`), overriding the defaults.
    pub settings: Vec<(String, String)>,
    /// Replaces `pg_hba.conf` (e.g. to allow only TLS connections).
    pub hba: Option<String>,
}

fn find_bindir() -> Option<PathBuf> {
    if let Ok(d) = std::env::var("PG_BINDIR") {
        return Some(PathBuf::from(d));
    }
    if let Ok(out) = Command::new("pg_config").arg("--bindir").output()
        && out.status.success()
    {
        let d = PathBuf::from(String::from_utf8_lossy(&out.stdout).trim());
        if d.join("initdb").exists() {
            return Some(d);
        }
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .ok()?
        .filter_map(|e| e.ok())
        .filter_map(|e| {
            let v = e.file_name().to_string_lossy().parse::<u32>().ok()?;
            let bin = e.path().join("bin");
            bin.join("initdb").exists().then_some((v, bin))
        })
        .collect();
    versions.sort();
    versions.pop().map(|(_, b)| b)
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
        .unwrap_or(false)
}

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl DevPostgres {
    /// Creates the cluster in `dir` if it has none, and starts it.
    pub fn start(dir: &Path, opts: &DevPgOptions) -> Result<DevPostgres, DevPgError> {
        let bindir = find_bindir().ok_or(DevPgError::NoBinaries)?;
        std::fs::create_dir_all(dir)?;
        let dir = dir.canonicalize()?;
        let as_postgres = is_root();
        let mut pg = DevPostgres {
            dir,
            port: 0,
            bindir,
            as_postgres,
            remove_on_drop: opts.remove_on_drop,
            stopped: true,
        };
        if as_postgres {
            pg.run(
                "chown",
                &["-R", "postgres:postgres", &pg.dir.to_string_lossy()],
                false,
            )?;
        }
        if !pg.dir.join("PG_VERSION").exists() {
            let d = pg.dir.to_string_lossy().into_owned();
            pg.run(
                "initdb",
                &[
                    "-D",
                    &d,
                    "-U",
                    "postgres",
                    "-A",
                    "trust",
                    "-E",
                    "UTF8",
                    "--no-sync",
                    "--locale=C",
                ],
                true,
            )?;
        }
        if let Some(hba) = &opts.hba {
            std::fs::write(pg.dir.join("pg_hba.conf"), hba)?;
            if as_postgres {
                let f = pg.dir.join("pg_hba.conf").to_string_lossy().into_owned();
                pg.run("chown", &["postgres:postgres", &f], false)?;
            }
        }
        // Another cluster may take the port between our probe and its bind: retry.
        let mut last = None;
        for _ in 0..5 {
            let port = match opts.port {
                Some(p) => p,
                None => free_port()?,
            };
            pg.port = port;
            let mut o = format!(
                "-p {port} -k {dir} -c listen_addresses=127.0.0.1 -c wal_level=logical \
                 -c max_replication_slots=64 -c max_wal_senders=64 -c max_connections=300 \
                 -c fsync={fsync} -c full_page_writes={fsync} \
                 -c wal_sender_timeout=60s -c shared_buffers=256MB",
                dir = pg.dir.display(),
                fsync = if opts.fsync { "on" } else { "off" },
            );
            for (k, v) in &opts.settings {
                o.push_str(&format!(" -c {k}={v}"));
            }
            let d = pg.dir.to_string_lossy().into_owned();
            let log = pg.dir.join("postgres.log").to_string_lossy().into_owned();
            match pg.run(
                "pg_ctl",
                &["start", "-D", &d, "-w", "-t", "60", "-l", &log, "-o", &o],
                true,
            ) {
                Ok(()) => {
                    pg.stopped = false;
                    pg.wait_ready()?;
                    return Ok(pg);
                }
                Err(e) => {
                    last = Some(e);
                    if opts.port.is_some() {
                        break;
                    }
                }
            }
        }
        Err(last.expect("at least one attempt"))
    }

    fn wait_ready(&self) -> Result<(), DevPgError> {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if std::net::TcpStream::connect(("127.0.0.1", self.port)).is_ok() {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(DevPgError::Command {
                    command: "postgres".into(),
                    output: format!("did not accept connections on port {}", self.port),
                });
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    fn run(&self, program: &str, args: &[&str], pg_binary: bool) -> Result<(), DevPgError> {
        let exe = if pg_binary {
            self.bindir.join(program).to_string_lossy().into_owned()
        } else {
            program.to_string()
        };
        let mut cmd = if self.as_postgres && pg_binary {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--", &exe]);
            c
        } else {
            Command::new(&exe)
        };
        cmd.args(args)
            .current_dir(&self.dir)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let out = cmd.output()?;
        if !out.status.success() {
            let mut output = String::from_utf8_lossy(&out.stderr).into_owned();
            output.push_str(&String::from_utf8_lossy(&out.stdout));
            if program == "pg_ctl"
                && let Ok(log) = std::fs::read_to_string(self.dir.join("postgres.log"))
            {
                let tail: Vec<&str> = log.lines().rev().take(10).collect();
                output.push_str(&tail.into_iter().rev().collect::<Vec<_>>().join("\n"));
            }
            return Err(DevPgError::Command {
                command: format!("{program} {}", args.join(" ")),
                output,
            });
        }
        Ok(())
    }

    /// The TCP port.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The cluster's folder.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// A connection URI for database `db` as the superuser `postgres`.
    pub fn uri(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Runs SQL through `psql` (for set-up scripts).
    pub fn psql(&self, db: &str, sql: &str) -> Result<(), DevPgError> {
        let port = self.port.to_string();
        let out = Command::new(self.bindir.join("psql"))
            .args([
                "-h",
                "127.0.0.1",
                "-p",
                &port,
                "-U",
                "postgres",
                "-d",
                db,
                "-v",
                "ON_ERROR_STOP=1",
                "-q",
                "-c",
                sql,
            ])
            .stdin(Stdio::null())
            .output()?;
        if !out.status.success() {
            return Err(DevPgError::Command {
                command: "psql".into(),
                output: String::from_utf8_lossy(&out.stderr).into_owned(),
            });
        }
        Ok(())
    }

    /// Makes sure the cluster is stopped and its folder removed when this process exits, even
    /// without running destructors (tests keep one cluster in a `static`).
    pub fn stop_when_process_exits(&self) -> Result<(), DevPgError> {
        let pg_ctl = self.bindir.join("pg_ctl");
        let stop = if self.as_postgres {
            format!(
                "runuser -u postgres -- {} stop -D '{}' -m immediate",
                pg_ctl.display(),
                self.dir.display()
            )
        } else {
            format!(
                "{} stop -D '{}' -m immediate",
                pg_ctl.display(),
                self.dir.display()
            )
        };
        let script = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 0.5; done; {stop} >/dev/null 2>&1; rm -rf '{dir}'",
            pid = std::process::id(),
            dir = self.dir.display()
        );
        Command::new("sh")
            .args(["-c", &script])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()?;
        Ok(())
    }

    /// Whether Postgres commands run as the `postgres` user (we are root).
    pub fn runs_as_postgres(&self) -> bool {
        self.as_postgres
    }

    /// Stops the cluster (fast shutdown).
    pub fn stop(&mut self) -> Result<(), DevPgError> {
        if self.stopped {
            return Ok(());
        }
        let d = self.dir.to_string_lossy().into_owned();
        let mode = if self.remove_on_drop {
            "immediate"
        } else {
            "fast"
        };
        self.run("pg_ctl", &["stop", "-D", &d, "-m", mode, "-w"], true)?;
        self.stopped = true;
        Ok(())
    }
}

impl Drop for DevPostgres {
    fn drop(&mut self) {
        if let Err(e) = self.stop() {
            eprintln!("stopping postgres: {e}");
        }
        if self.remove_on_drop {
            let _ = std::fs::remove_dir_all(&self.dir);
        }
    }
}
