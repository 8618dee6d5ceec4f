//! The upstream Postgres as Zero lays it out: the app and shard schemas, the publications, the
//! DDL event triggers and the replication slot.
//!
//! Everything here is idempotent, so a restart (or a second replica) re-runs it safely. The
//! published schema is described by one SQL function installed in the shard schema; initial sync
//! calls it inside the snapshot and the DDL trigger calls it after every schema change, so both
//! paths see exactly the same description.

use tokio_postgres::Client;
use tokio_postgres::error::SqlState;
use tracing::{info, warn};

use crate::schema::PublishedSchema;

/// The identity of one shard of one app upstream: the names of everything it owns.
#[derive(Debug, Clone)]
pub struct Shard {
    /// `ZERO_APP_ID`.
    pub app_id: String,
    /// `ZERO_SHARD_NUM`.
    pub shard_num: u32,
    /// Publications named by the user; empty means the internal all-of-public publication.
    pub app_publications: Vec<String>,
}

impl Shard {
    /// Builds the shard identity from configuration values.
    pub fn new(app_id: &str, shard_num: u32, app_publications: &[String]) -> Shard {
        let mut pubs = app_publications.to_vec();
        pubs.sort();
        pubs.dedup();
        Shard {
            app_id: app_id.to_string(),
            shard_num,
            app_publications: pubs,
        }
    }

    /// The shard schema, `{app}_{num}`.
    pub fn schema(&self) -> String {
        format!("{}_{}", self.app_id, self.shard_num)
    }

    /// The default publication over schema `public`.
    pub fn default_publication(&self) -> String {
        format!("_{}_public_{}", self.app_id, self.shard_num)
    }

    /// The publication of the app's own metadata tables.
    pub fn metadata_publication(&self) -> String {
        format!("_{}_metadata_{}", self.app_id, self.shard_num)
    }

    /// Every publication that replication subscribes to, sorted.
    pub fn publications(&self) -> Vec<String> {
        let mut p = if self.app_publications.is_empty() {
            vec![self.default_publication()]
        } else {
            self.app_publications.clone()
        };
        p.push(self.metadata_publication());
        p.sort();
        p
    }

    /// The prefix of logical messages carrying DDL events.
    pub fn ddl_message_prefix(&self) -> String {
        format!("{}/{}/ddl", self.app_id, self.shard_num)
    }

    /// The prefix of lag-report messages.
    pub fn lag_message_prefix(&self) -> String {
        format!("{}/{}/lag", self.app_id, self.shard_num)
    }

    /// Prefix of replication slot names; slots are this plus a letter suffix.
    pub fn slot_prefix(&self) -> String {
        format!("{}_{}_", self.app_id, self.shard_num)
    }
}

/// Why the upstream cannot be used; each message says what to change.
#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    /// `wal_level` is not `logical`.
    #[error(
        "upstream wal_level is \"{0}\"; logical replication needs wal_level = logical (set it in postgresql.conf and restart Postgres)"
    )]
    WalLevel(String),
    /// The server is too old.
    #[error("upstream Postgres {0} is not supported; version 15 or newer is required")]
    Version(String),
    /// The role lacks a privilege we need.
    #[error("upstream role \"{role}\" {what}")]
    Privilege {
        /// Role name.
        role: String,
        /// What it cannot do, and how to grant it.
        what: String,
    },
    /// A configured publication is missing or does not publish all operations.
    #[error("publication \"{0}\" {1}")]
    Publication(String, String),
    /// Any Postgres error.
    #[error(transparent)]
    Pg(#[from] tokio_postgres::Error),
    /// The published schema could not be read.
    #[error("cannot read published schema: {0}")]
    Schema(String),
}

/// Checks server version, `wal_level` and the role's replication privilege.
pub async fn check_requirements(client: &Client) -> Result<(), UpstreamError> {
    let row = client
        .query_one(
            "SELECT current_setting('server_version_num')::int, current_setting('server_version'), \
             current_setting('wal_level'), r.rolname::text, r.rolsuper, r.rolreplication \
             FROM pg_roles r WHERE r.rolname = current_user",
            &[],
        )
        .await?;
    let num: i32 = row.get(0);
    let version: String = row.get(1);
    let wal_level: String = row.get(2);
    let role: String = row.get(3);
    let superuser: bool = row.get(4);
    let replication: bool = row.get(5);
    if num < 150000 {
        return Err(UpstreamError::Version(version));
    }
    if wal_level != "logical" {
        return Err(UpstreamError::WalLevel(wal_level));
    }
    if !superuser && !replication {
        // zero-cache grants itself REPLICATION once; that works where the role may alter itself.
        let sql = format!("ALTER ROLE {} WITH REPLICATION", quote_ident(&role));
        if let Err(e) = client.batch_execute(&sql).await {
            if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) {
                return Err(UpstreamError::Privilege {
                    role,
                    what: "cannot create replication slots: grant it with ALTER ROLE ... WITH REPLICATION".into(),
                });
            }
            return Err(e.into());
        }
        info!(role = %role, "granted REPLICATION to upstream role");
    }
    Ok(())
}

/// Creates (or updates) the app and shard schemas, publications and DDL triggers. Returns
/// whether DDL detection through event triggers is available.
pub async fn setup(client: &mut Client, shard: &Shard) -> Result<bool, UpstreamError> {
    let app = quote_ident(&shard.app_id);
    let sh = quote_ident(&shard.schema());
    let tx = client.transaction().await?;
    tx.execute(
        "SELECT pg_advisory_xact_lock(hashtext($1))",
        &[&format!("{}_setup", shard.schema())],
    )
    .await?;
    let ddl = format!(
        r#"
CREATE SCHEMA IF NOT EXISTS {app};
CREATE TABLE IF NOT EXISTS {app}.permissions (
  permissions JSONB, hash TEXT, lock BOOL PRIMARY KEY DEFAULT true CHECK (lock));
CREATE OR REPLACE FUNCTION {app}.set_permissions_hash() RETURNS TRIGGER AS $$
BEGIN NEW.hash = md5(NEW.permissions::text); RETURN NEW; END $$ LANGUAGE plpgsql;
CREATE OR REPLACE TRIGGER on_set_permissions BEFORE INSERT OR UPDATE ON {app}.permissions
  FOR EACH ROW EXECUTE FUNCTION {app}.set_permissions_hash();
INSERT INTO {app}.permissions (permissions) VALUES (NULL) ON CONFLICT DO NOTHING;
CREATE SCHEMA IF NOT EXISTS {sh};
CREATE TABLE IF NOT EXISTS {sh}.clients (
  "clientGroupID" TEXT NOT NULL, "clientID" TEXT NOT NULL, "lastMutationID" BIGINT NOT NULL,
  "userID" TEXT, PRIMARY KEY ("clientGroupID", "clientID"));
CREATE TABLE IF NOT EXISTS {sh}.mutations (
  "clientGroupID" TEXT, "clientID" TEXT, "mutationID" BIGINT, result JSON NOT NULL,
  PRIMARY KEY ("clientGroupID", "clientID", "mutationID"));
CREATE TABLE IF NOT EXISTS {sh}."shardConfig" (
  publications TEXT[] NOT NULL, "ddlDetection" BOOL NOT NULL,
  lock BOOL PRIMARY KEY DEFAULT true CHECK (lock));
CREATE TABLE IF NOT EXISTS {sh}.replicas (
  id TEXT PRIMARY KEY, rank BIGSERIAL, slot TEXT NOT NULL, version TEXT NOT NULL,
  "initialSchema" JSON, "initialSyncContext" JSON, "subscriberContext" JSON);
CREATE TABLE IF NOT EXISTS {sh}."schemaVersions" (
  "minSupportedVersion" INT4, "maxSupportedVersion" INT4,
  lock BOOL PRIMARY KEY DEFAULT true CHECK (lock));
INSERT INTO {sh}."schemaVersions" VALUES (1, 1) ON CONFLICT DO NOTHING;
CREATE TABLE IF NOT EXISTS {sh}."versionHistory" (
  "dataVersion" INT NOT NULL, "schemaVersion" INT NOT NULL, "minSafeVersion" INT NOT NULL,
  lock char(1) NOT NULL DEFAULT 'v' CHECK (lock = 'v') PRIMARY KEY);
INSERT INTO {sh}."versionHistory" VALUES (23, 23, 1) ON CONFLICT DO NOTHING;
"#
    );
    tx.batch_execute(&ddl).await?;
    tx.batch_execute(&schema_function_sql(shard)).await?;

    // Publications.
    if shard.app_publications.is_empty() {
        let name = shard.default_publication();
        if !publication_exists(&tx, &name).await? {
            tx.batch_execute(&format!(
                "CREATE PUBLICATION {} FOR TABLES IN SCHEMA public WITH (publish_via_partition_root = true)",
                quote_ident(&name)
            ))
            .await?;
        }
    } else {
        for name in &shard.app_publications {
            let row = tx
                .query_opt(
                    "SELECT pubinsert AND pubupdate AND pubdelete AND pubtruncate FROM pg_publication WHERE pubname = $1",
                    &[name],
                )
                .await?;
            match row {
                None => {
                    return Err(UpstreamError::Publication(
                        name.clone(),
                        "does not exist upstream (ZERO_APP_PUBLICATIONS)".into(),
                    ));
                }
                Some(r) if !r.get::<_, bool>(0) => {
                    return Err(UpstreamError::Publication(
                        name.clone(),
                        "must publish insert, update, delete and truncate".into(),
                    ));
                }
                Some(_) => {}
            }
        }
    }
    let meta = shard.metadata_publication();
    if !publication_exists(&tx, &meta).await? {
        tx.batch_execute(&format!(
            "CREATE PUBLICATION {} FOR TABLE {app}.permissions, {sh}.clients, {sh}.mutations",
            quote_ident(&meta)
        ))
        .await?;
    }

    // Event triggers need superuser; without them schema changes are found from relation
    // messages instead.
    tx.batch_execute("SAVEPOINT ddl").await?;
    let ddl_detection = match tx.batch_execute(&event_trigger_sql(shard)).await {
        Ok(()) => true,
        Err(e) if e.code() == Some(&SqlState::INSUFFICIENT_PRIVILEGE) => {
            tx.batch_execute("ROLLBACK TO SAVEPOINT ddl").await?;
            warn!(
                "cannot create event triggers (not a superuser): schema changes are detected from relation messages"
            );
            false
        }
        Err(e) => return Err(e.into()),
    };
    tx.execute(
        &format!(
            "INSERT INTO {sh}.\"shardConfig\" (publications, \"ddlDetection\") VALUES ($1, $2) \
             ON CONFLICT (lock) DO UPDATE SET publications = EXCLUDED.publications, \"ddlDetection\" = EXCLUDED.\"ddlDetection\""
        ),
        &[&shard.publications(), &ddl_detection],
    )
    .await?;
    fix_replica_identities(&tx, shard).await?;
    tx.commit().await?;
    Ok(ddl_detection)
}

async fn publication_exists(
    tx: &tokio_postgres::Transaction<'_>,
    name: &str,
) -> Result<bool, tokio_postgres::Error> {
    Ok(tx
        .query_opt("SELECT 1 FROM pg_publication WHERE pubname = $1", &[&name])
        .await?
        .is_some())
}

/// Gives published tables without a primary key a replica identity over a non-null unique
/// index, so that updates and deletes carry their key.
async fn fix_replica_identities(
    tx: &tokio_postgres::Transaction<'_>,
    shard: &Shard,
) -> Result<(), tokio_postgres::Error> {
    let rows = tx
        .query(
            "SELECT DISTINCT ON (c.oid) n.nspname::text, c.relname::text, ic.relname::text
             FROM pg_publication_tables pt
             JOIN pg_namespace n ON n.nspname = pt.schemaname
             JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = pt.tablename
             JOIN pg_index i ON i.indrelid = c.oid
             JOIN pg_class ic ON ic.oid = i.indexrelid
             WHERE pt.pubname = ANY($1) AND c.relreplident = 'd'
               AND NOT EXISTS (SELECT 1 FROM pg_index p WHERE p.indrelid = c.oid AND p.indisprimary)
               AND i.indisunique AND i.indimmediate AND i.indpred IS NULL AND i.indexprs IS NULL
               AND NOT EXISTS (SELECT 1 FROM unnest(i.indkey) k JOIN pg_attribute a
                               ON a.attrelid = c.oid AND a.attnum = k WHERE NOT a.attnotnull)
             ORDER BY c.oid, ic.relname",
            &[&shard.publications()],
        )
        .await?;
    for r in rows {
        let (schema, table, index): (String, String, String) = (r.get(0), r.get(1), r.get(2));
        info!(table = %format!("{schema}.{table}"), index = %index, "setting replica identity to unique index");
        tx.batch_execute(&format!(
            "ALTER TABLE {}.{} REPLICA IDENTITY USING INDEX {}",
            quote_ident(&schema),
            quote_ident(&table),
            quote_ident(&index)
        ))
        .await?;
    }
    Ok(())
}

/// Reads the published schema through the shard's schema function. Call it inside the initial
/// sync snapshot to get the schema that matches the copied rows.
pub async fn published_schema(
    client: &impl tokio_postgres::GenericClient,
    shard: &Shard,
) -> Result<PublishedSchema, UpstreamError> {
    let row = client
        .query_one(
            &format!(
                "SELECT {}.published_schema($1)::text",
                quote_ident(&shard.schema())
            ),
            &[&shard.publications()],
        )
        .await?;
    let text: String = row.get(0);
    serde_json::from_str(&text).map_err(|e| UpstreamError::Schema(e.to_string()))
}

/// The SQL of `{shard}.published_schema(pubs)`: tables, columns (with attnum, so renames are
/// recognisable) and unique indexes of everything the publications cover.
fn schema_function_sql(shard: &Shard) -> String {
    let sh = quote_ident(&shard.schema());
    format!(
        r#"
CREATE OR REPLACE FUNCTION {sh}.published_schema(pubs text[]) RETURNS json AS $$
  WITH pt AS (
    SELECT DISTINCT ON (c.oid) c.oid AS relid, ppt.schemaname::text AS schema,
           ppt.tablename::text AS name, ppt.attnames AS attnames, c.relreplident::text AS replident
    FROM pg_publication_tables ppt
    JOIN pg_namespace n ON n.nspname = ppt.schemaname
    JOIN pg_class c ON c.relnamespace = n.oid AND c.relname = ppt.tablename
    WHERE ppt.pubname = ANY(pubs)
    ORDER BY c.oid, ppt.pubname
  ),
  cols AS (
    SELECT pt.relid, json_agg(json_build_object(
      'attnum', a.attnum,
      'name', a.attname::text,
      'type', CASE WHEN et.oid IS NOT NULL THEN et.typname::text || '[]'
                   ELSE coalesce(bt.typname, t.typname)::text END,
      'typeOid', coalesce(bt.oid, t.oid)::int8,
      'elemOid', coalesce(et.oid, 0)::int8,
      'isEnum', coalesce(bt.typtype, t.typtype) = 'e' OR coalesce(et.typtype, 'b') = 'e',
      'isArray', et.oid IS NOT NULL,
      'notNull', a.attnotnull,
      'maxLen', CASE WHEN a.atttypmod > 4 AND coalesce(bt.typname, t.typname) IN ('varchar','bpchar')
                     THEN a.atttypmod - 4 ELSE NULL END,
      'default', pg_get_expr(d.adbin, d.adrelid)
    ) ORDER BY a.attnum) AS columns
    FROM pt
    JOIN pg_attribute a ON a.attrelid = pt.relid AND a.attnum > 0 AND NOT a.attisdropped
      AND a.attgenerated = ''
      AND (pt.attnames IS NULL OR a.attname = ANY(pt.attnames))
    JOIN pg_type t ON t.oid = a.atttypid
    LEFT JOIN pg_type bt ON t.typtype = 'd' AND bt.oid = t.typbasetype
    LEFT JOIN pg_type et ON et.oid = coalesce(bt.typelem, t.typelem) AND coalesce(bt.typcategory, t.typcategory) = 'A'
    LEFT JOIN pg_attrdef d ON d.adrelid = a.attrelid AND d.adnum = a.attnum
    GROUP BY pt.relid
  ),
  idx AS (
    SELECT pt.relid, json_agg(json_build_object(
      'name', ic.relname::text,
      'unique', i.indisunique,
      'primary', i.indisprimary,
      'columns', (SELECT json_agg(json_build_array(a.attname::text,
                     CASE WHEN (i.indoption[k.ord - 1] & 1) = 1 THEN 'DESC' ELSE 'ASC' END) ORDER BY k.ord)
                  FROM unnest(i.indkey) WITH ORDINALITY AS k(attnum, ord)
                  JOIN pg_attribute a ON a.attrelid = pt.relid AND a.attnum = k.attnum),
      'notNull', NOT EXISTS (SELECT 1 FROM unnest(i.indkey) k JOIN pg_attribute a
                   ON a.attrelid = pt.relid AND a.attnum = k WHERE NOT a.attnotnull)
    ) ORDER BY ic.relname) AS indexes
    FROM pt
    JOIN pg_index i ON i.indrelid = pt.relid AND i.indpred IS NULL AND i.indexprs IS NULL
      AND i.indisvalid AND NOT (0 = ANY(i.indkey))
    JOIN pg_class ic ON ic.oid = i.indexrelid
    GROUP BY pt.relid
  )
  SELECT json_build_object('tables', coalesce(json_agg(json_build_object(
    'oid', pt.relid::int8,
    'schema', pt.schema,
    'name', pt.name,
    'replicaIdentity', pt.replident,
    'columns', coalesce(cols.columns, '[]'::json),
    'indexes', coalesce(idx.indexes, '[]'::json)
  ) ORDER BY pt.schema, pt.name), '[]'::json))
  FROM pt LEFT JOIN cols ON cols.relid = pt.relid LEFT JOIN idx ON idx.relid = pt.relid
$$ LANGUAGE sql STABLE;
"#
    )
}

/// Event triggers that emit the whole published schema as a transactional logical message
/// after every DDL command that could change it.
fn event_trigger_sql(shard: &Shard) -> String {
    let sh = quote_ident(&shard.schema());
    let pubs = shard
        .publications()
        .iter()
        .map(|p| quote_literal(p))
        .collect::<Vec<_>>()
        .join(",");
    let prefix = quote_literal(&shard.ddl_message_prefix());
    let trigger = quote_ident(&format!("{}_ddl_end_{}", shard.app_id, shard.shard_num));
    format!(
        r#"
CREATE OR REPLACE FUNCTION {sh}.emit_ddl_end() RETURNS event_trigger AS $$
DECLARE
  pubs text[];
BEGIN
  SELECT publications INTO pubs FROM {sh}."shardConfig";
  IF pubs IS NULL THEN pubs := ARRAY[{pubs}]; END IF;
  PERFORM pg_logical_emit_message(true, {prefix}, json_build_object(
    'tag', tg_tag,
    'created', (SELECT coalesce(json_agg(objid::int8), '[]'::json) FROM pg_event_trigger_ddl_commands()
                WHERE object_type = 'table' AND command_tag = 'CREATE TABLE'),
    'schema', {sh}.published_schema(pubs))::text);
END $$ LANGUAGE plpgsql;
DROP EVENT TRIGGER IF EXISTS {trigger};
CREATE EVENT TRIGGER {trigger} ON ddl_command_end
  WHEN TAG IN ('CREATE TABLE', 'CREATE TABLE AS', 'SELECT INTO', 'ALTER TABLE', 'DROP TABLE',
               'CREATE INDEX', 'ALTER INDEX', 'DROP INDEX', 'CREATE PUBLICATION',
               'ALTER PUBLICATION', 'DROP PUBLICATION', 'ALTER TYPE', 'DROP TYPE',
               'ALTER SCHEMA', 'DROP SCHEMA', 'CREATE SCHEMA', 'ALTER DOMAIN', 'DROP DOMAIN')
  EXECUTE FUNCTION {sh}.emit_ddl_end();
"#
    )
}

/// Quotes an SQL identifier for Postgres and SQLite alike.
pub fn quote_ident(s: &str) -> String {
    format!("\"{}\"", s.replace('"', "\"\""))
}

/// Quotes an SQL string literal.
pub fn quote_literal(s: &str) -> String {
    format!("'{}'", s.replace('\'', "''"))
}
