//! Connections to the upstream Postgres: ordinary SQL sessions and replication sessions, both
//! from the one `ZERO_UPSTREAM_DB` URI, both pinned to the text formats that `pgvalue` parses.

use std::str::FromStr;

use pgwire_replication::{ReplicationConfig, TlsConfig};
use tokio_postgres::config::Host;

use crate::upstream::Shard;

/// Session settings that make value output predictable: ISO dates in UTC and round-tripping
/// floats.
const SESSION_OPTIONS: &str =
    "-c DateStyle=ISO -c TimeZone=UTC -c extra_float_digits=3 -c IntervalStyle=iso_8601";

/// The upstream database, parsed once from its URI.
#[derive(Clone)]
pub struct UpstreamConfig {
    pg: tokio_postgres::Config,
}

impl std::fmt::Debug for UpstreamConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the password.
        write!(f, "UpstreamConfig({})", self.display())
    }
}

/// A URI that cannot be used.
#[derive(Debug, thiserror::Error)]
#[error("invalid upstream URI: {0}")]
pub struct UriError(String);

impl UpstreamConfig {
    /// Parses a `postgres://` URI (or key=value connection string).
    pub fn parse(uri: &str) -> Result<UpstreamConfig, UriError> {
        let mut pg = tokio_postgres::Config::from_str(uri).map_err(|e| UriError(e.to_string()))?;
        if pg.get_hosts().is_empty() {
            pg.host("localhost");
        }
        if pg.get_user().is_none() {
            pg.user(std::env::var("USER").unwrap_or_else(|_| "postgres".into()));
        }
        pg.options(SESSION_OPTIONS);
        pg.application_name("zero-cache");
        Ok(UpstreamConfig { pg })
    }

    /// `user@host:port/db`, for logs.
    pub fn display(&self) -> String {
        format!(
            "{}@{}:{}/{}",
            self.pg.get_user().unwrap_or_default(),
            self.host(),
            self.port(),
            self.dbname()
        )
    }

    fn host(&self) -> String {
        match self.pg.get_hosts().first() {
            Some(Host::Tcp(h)) => h.clone(),
            Some(Host::Unix(p)) => p.to_string_lossy().into_owned(),
            None => "localhost".into(),
        }
    }

    fn port(&self) -> u16 {
        self.pg.get_ports().first().copied().unwrap_or(5432)
    }

    fn dbname(&self) -> String {
        self.pg
            .get_dbname()
            .or(self.pg.get_user())
            .unwrap_or("postgres")
            .to_string()
    }

    /// Opens an SQL session, driven on a background task.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
        let (client, conn) = self.pg.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(async move {
            if let Err(e) = conn.await {
                tracing::debug!(error = %e, "upstream connection closed");
            }
        });
        Ok(client)
    }

    /// The configuration of a replication session on `slot` for the shard's publications.
    pub fn replication(&self, slot: &str, shard: &Shard) -> ReplicationConfig {
        let password = self
            .pg
            .get_password()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .unwrap_or_default();
        ReplicationConfig::new(
            self.host(),
            self.pg.get_user().unwrap_or("postgres"),
            password,
            self.dbname(),
            slot,
            shard.publications(),
        )
        .with_port(self.port())
        .with_tls(TlsConfig::disabled())
        .with_options(SESSION_OPTIONS)
        .with_application_name("zero-cache-replication")
        .with_status_interval(std::time::Duration::from_secs(1))
    }
}
