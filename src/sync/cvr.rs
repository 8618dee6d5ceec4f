//! The client view record (protocol §4, §12.4): what a client group has been sent, so that any
//! client at any older cookie can be caught up with exact puts and dels.
//!
//! The record lives in memory while the group's view-syncer runs and is written through to a
//! SQLite file (`<replica>-cvr.db` by default) after every change, so it survives view-syncer
//! shutdown and server restarts. Every desire, query and row carries the version at which it
//! last changed (`patch_version`); removed ones stay as tombstones with that version.

use serde::{Deserialize, Serialize};
use serde_json::Value as Json;
use std::cmp::Ordering;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use crate::version::{lexi_decode, lexi_encode};

/// Why the CVR store failed.
#[derive(Debug, thiserror::Error)]
pub enum CvrError {
    /// SQLite failed.
    #[error("CVR database: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// Postgres (`ZERO_CVR_DB`) failed.
    #[error("CVR database: {0}")]
    Pg(#[from] tokio_postgres::Error),
    /// A stored value could not be read.
    #[error("CVR data: {0}")]
    Data(String),
}

/// A CVR version: the replica state version its rows reflect plus a count of config-only
/// changes since then. Encoded as `state` or `state:lexi(config)`; that string is the cookie.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CvrVersion {
    /// Replica state version (lexi watermark); `00` before any rows.
    pub state: String,
    /// Config changes since `state`.
    pub config: u64,
}

impl CvrVersion {
    /// The version of a new CVR.
    pub fn initial() -> CvrVersion {
        CvrVersion {
            state: "00".into(),
            config: 0,
        }
    }

    /// Parses a cookie.
    pub fn parse(cookie: &str) -> Option<CvrVersion> {
        let (state, config) = match cookie.split_once(':') {
            Some((s, c)) => (s, lexi_decode(c)?),
            None => (cookie, 0),
        };
        lexi_decode(state.split('.').next()?)?;
        Some(CvrVersion {
            state: state.to_string(),
            config,
        })
    }

    /// The next config-only version.
    pub fn next_config(&self) -> CvrVersion {
        CvrVersion {
            state: self.state.clone(),
            config: self.config + 1,
        }
    }
}

impl fmt::Display for CvrVersion {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.config == 0 {
            f.write_str(&self.state)
        } else {
            write!(f, "{}:{}", self.state, lexi_encode(self.config))
        }
    }
}

impl Ord for CvrVersion {
    fn cmp(&self, other: &Self) -> Ordering {
        self.state
            .cmp(&other.state)
            .then(self.config.cmp(&other.config))
    }
}

impl PartialOrd for CvrVersion {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}

impl Serialize for CvrVersion {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for CvrVersion {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        CvrVersion::parse(&s).ok_or_else(|| serde::de::Error::custom(format!("bad version {s}")))
    }
}

/// A query the group asked for.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QueryRecord {
    /// Legacy AST (server names).
    pub ast: Option<Json>,
    /// Custom query name.
    pub name: Option<String>,
    /// Custom query arguments.
    pub args: Option<Vec<Json>>,
    /// Hydrated and announced in `gotQueriesPatch`.
    pub got: bool,
    /// Version of the last got put/del (`None`: never got).
    pub patch_version: Option<CvrVersion>,
    /// Hash of the AST that was hydrated (after permissions / transform).
    pub transformation_hash: Option<String>,
}

/// One client's desire for one query.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DesireRecord {
    /// Version of the last put/del.
    pub patch_version: CvrVersion,
    /// The client dropped it (a tombstone for catch-up).
    pub deleted: bool,
    /// Time to live after `del`, ms.
    pub ttl_ms: f64,
    /// The group's TTL clock (ms, see `Cvr::ttl_clock`) when it was dropped.
    pub inactivated_at: Option<f64>,
}

/// A row the group was sent.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RowRecord {
    /// `_0_version` of the row when sent.
    pub row_version: String,
    /// Version of the last put/del.
    pub patch_version: CvrVersion,
    /// Queries holding the row; `None` once deleted (tombstone).
    pub refs: Option<BTreeSet<String>>,
}

/// A row's identity: replica table and its primary-key JSON (client-schema key order).
pub type RowId = (String, String);

/// The record of one client group.
#[derive(Debug, Clone)]
pub struct Cvr {
    /// Client group.
    pub group: String,
    /// Current version (the newest cookie).
    pub version: CvrVersion,
    /// Replica version (initial-sync identity) the rows came from.
    pub replica_version: Option<String>,
    /// Replica state version the rows reflect.
    pub processed: Option<String>,
    /// The group's client schema.
    pub client_schema: Option<Json>,
    /// Known clients.
    pub clients: BTreeSet<String>,
    /// Queries by hash.
    pub queries: BTreeMap<String, QueryRecord>,
    /// Desires by (client, hash).
    pub desires: BTreeMap<(String, String), DesireRecord>,
    /// Rows.
    pub rows: BTreeMap<RowId, RowRecord>,
    /// Rows per query (derived from `rows[..].refs`).
    pub query_rows: BTreeMap<String, BTreeSet<RowId>>,
    /// Whether the record exists in the store (false for a new group).
    pub stored: bool,
    /// The group's TTL clock (ms): it runs only while the group has a connection, so queries a
    /// client dropped do not expire while nobody is connected (protocol §4). Inactivation times
    /// of desires are on this clock. Starts at the wall clock.
    pub ttl_clock: f64,
    dirty_rows: BTreeSet<RowId>,
    dirty_queries: BTreeSet<String>,
    dirty_desires: BTreeSet<(String, String)>,
    dirty_clients: bool,
    /// `client_schema` is in the store (it never changes once set, so deltas omit it).
    pub(crate) schema_written: bool,
}

impl Cvr {
    /// An empty record.
    pub fn new(group: &str) -> Cvr {
        Cvr {
            group: group.to_string(),
            version: CvrVersion::initial(),
            replica_version: None,
            processed: None,
            client_schema: None,
            schema_written: false,
            clients: BTreeSet::new(),
            queries: BTreeMap::new(),
            desires: BTreeMap::new(),
            rows: BTreeMap::new(),
            query_rows: BTreeMap::new(),
            stored: false,
            ttl_clock: crate::replica::now_ms() as f64,
            dirty_rows: BTreeSet::new(),
            dirty_queries: BTreeSet::new(),
            dirty_desires: BTreeSet::new(),
            dirty_clients: false,
        }
    }

    /// Records a query change.
    pub fn put_query(&mut self, hash: &str, q: QueryRecord) {
        self.queries.insert(hash.to_string(), q);
        self.dirty_queries.insert(hash.to_string());
    }

    /// Marks a query as changed in place.
    pub fn touch_query(&mut self, hash: &str) {
        self.dirty_queries.insert(hash.to_string());
    }

    /// Records a desire change.
    pub fn put_desire(&mut self, client: &str, hash: &str, d: DesireRecord) {
        let k = (client.to_string(), hash.to_string());
        self.desires.insert(k.clone(), d);
        self.dirty_desires.insert(k);
    }

    /// Adds a client; true when new.
    pub fn add_client(&mut self, client: &str) -> bool {
        let new = self.clients.insert(client.to_string());
        self.dirty_clients |= new;
        new
    }

    /// Removes a client; true when it was known.
    pub fn remove_client(&mut self, client: &str) -> bool {
        let had = self.clients.remove(client);
        self.dirty_clients |= had;
        had
    }

    /// Sets the rows of query `hash` to `rows` (id → `_0_version`) at version `v`. Returns the
    /// row ids whose contents must be sent (`put`) and those that left the group (`del`).
    pub fn set_query_rows(
        &mut self,
        hash: &str,
        rows: &BTreeMap<RowId, String>,
        v: &CvrVersion,
    ) -> (Vec<RowId>, Vec<RowId>) {
        let old = self.query_rows.remove(hash).unwrap_or_default();
        let mut puts = Vec::new();
        let mut dels = Vec::new();
        for (id, version) in rows {
            if self.reference_row(id, hash, version, v) {
                puts.push(id.clone());
            }
        }
        for id in old.difference(&rows.keys().cloned().collect()) {
            if self.release_row(id, hash, v) {
                dels.push(id.clone());
            }
        }
        if !rows.is_empty() {
            self.query_rows
                .insert(hash.to_string(), rows.keys().cloned().collect());
        }
        (puts, dels)
    }

    /// Drops query `hash` from a row; true when the row left the group (now a tombstone).
    /// Records that query `hash` holds row `id` at `_0_version` `version`; true when the row is
    /// new to the group or its contents changed, so it must be sent (patch version `v`).
    fn reference_row(&mut self, id: &RowId, hash: &str, version: &str, v: &CvrVersion) -> bool {
        match self.rows.get_mut(id) {
            Some(r) if r.refs.is_some() => {
                let refs = r.refs.as_mut().expect("checked");
                let mut dirty = refs.insert(hash.to_string());
                let changed = r.row_version != version;
                if changed {
                    r.row_version = version.to_string();
                    r.patch_version = v.clone();
                    dirty = true;
                }
                if dirty {
                    self.dirty_rows.insert(id.clone());
                }
                changed
            }
            _ => {
                self.rows.insert(
                    id.clone(),
                    RowRecord {
                        row_version: version.to_string(),
                        patch_version: v.clone(),
                        refs: Some(BTreeSet::from([hash.to_string()])),
                    },
                );
                self.dirty_rows.insert(id.clone());
                true
            }
        }
    }

    fn release_row(&mut self, id: &RowId, hash: &str, v: &CvrVersion) -> bool {
        let Some(r) = self.rows.get_mut(id) else {
            return false;
        };
        let Some(refs) = r.refs.as_mut() else {
            return false;
        };
        refs.remove(hash);
        self.dirty_rows.insert(id.clone());
        if refs.is_empty() {
            r.refs = None;
            r.patch_version = v.clone();
            true
        } else {
            false
        }
    }

    /// Applies row changes of query `hash` at version `v`: `puts` (id → `_0_version`) are in
    /// its result now (new or changed), `dels` left it. Costs in proportion to the changes, not
    /// to the query's size. Returns whether a client-visible row changed.
    pub fn patch_query_rows(
        &mut self,
        hash: &str,
        puts: &[(RowId, String)],
        dels: &[RowId],
        v: &CvrVersion,
    ) -> bool {
        let mut changed = false;
        for id in dels {
            let had = self
                .query_rows
                .get_mut(hash)
                .is_some_and(|set| set.remove(id));
            if had {
                changed |= self.release_row(id, hash, v);
            }
        }
        for (id, version) in puts {
            self.query_rows
                .entry(hash.to_string())
                .or_default()
                .insert(id.clone());
            changed |= self.reference_row(id, hash, version, v);
        }
        if self.query_rows.get(hash).is_some_and(|s| s.is_empty()) {
            self.query_rows.remove(hash);
        }
        changed
    }

    /// Removes all rows of query `hash`; returns rows that left the group.
    pub fn drop_query_rows(&mut self, hash: &str, v: &CvrVersion) -> Vec<RowId> {
        self.set_query_rows(hash, &BTreeMap::new(), v).1
    }
}

/// The changes of one group's record since its last flush, owned so that a background writer
/// can store them while the view-syncer goes on poking. Later deltas of the same group
/// [`merge`](CvrDelta::merge) over earlier ones, so a slow store coalesces instead of queueing.
#[derive(Debug, Clone, Default)]
pub struct CvrDelta {
    /// Client group.
    pub group: String,
    /// `version` (cookie) of the record.
    pub version: String,
    /// Replica version the rows came from.
    pub replica_version: Option<String>,
    /// Replica state version the rows reflect.
    pub processed: Option<String>,
    /// Client schema JSON.
    pub client_schema: Option<String>,
    /// The group's TTL clock (ms).
    pub ttl_clock: f64,
    /// The full client list, when it changed.
    pub clients: Option<Vec<String>>,
    /// Query records (JSON) by hash; `None` deletes.
    pub queries: BTreeMap<String, Option<String>>,
    /// Desire records (JSON) by (client, hash); `None` deletes.
    pub desires: BTreeMap<(String, String), Option<String>>,
    /// Row records; rows are never deleted (a removed row is a tombstone).
    pub rows: BTreeMap<RowId, RowRecord>,
}

impl CvrDelta {
    /// Folds a later delta of the same group into this one.
    pub fn merge(&mut self, later: CvrDelta) {
        self.version = later.version;
        self.replica_version = later.replica_version;
        self.processed = later.processed;
        if later.client_schema.is_some() {
            self.client_schema = later.client_schema;
        }
        self.ttl_clock = later.ttl_clock;
        if later.clients.is_some() {
            self.clients = later.clients;
        }
        self.queries.extend(later.queries);
        self.desires.extend(later.desires);
        self.rows.extend(later.rows);
    }
}

impl Cvr {
    /// Takes the changes since the last call, leaving the record clean (and `stored`).
    pub fn take_delta(&mut self) -> CvrDelta {
        let ser = |v: Result<String, serde_json::Error>| v.expect("CVR records serialize");
        let delta = CvrDelta {
            group: self.group.clone(),
            version: self.version.to_string(),
            replica_version: self.replica_version.clone(),
            processed: self.processed.clone(),
            client_schema: if self.schema_written {
                None
            } else {
                self.client_schema.as_ref().map(|s| s.to_string())
            },
            ttl_clock: self.ttl_clock,
            clients: self
                .dirty_clients
                .then(|| self.clients.iter().cloned().collect()),
            queries: std::mem::take(&mut self.dirty_queries)
                .into_iter()
                .map(|h| {
                    let q = self.queries.get(&h).map(|q| ser(serde_json::to_string(q)));
                    (h, q)
                })
                .collect(),
            desires: std::mem::take(&mut self.dirty_desires)
                .into_iter()
                .map(|k| {
                    let d = self.desires.get(&k).map(|d| ser(serde_json::to_string(d)));
                    (k, d)
                })
                .collect(),
            rows: std::mem::take(&mut self.dirty_rows)
                .into_iter()
                .filter_map(|id| self.rows.get(&id).map(|r| (id, r.clone())))
                .collect(),
        };
        self.dirty_clients = false;
        self.stored = true;
        self.schema_written |= delta.client_schema.is_some();
        delta
    }

    /// Rebuilds the derived per-query row index after loading.
    pub fn rebuild_index(&mut self) {
        self.query_rows.clear();
        for (id, r) in &self.rows {
            for h in r.refs.iter().flatten() {
                self.query_rows
                    .entry(h.clone())
                    .or_default()
                    .insert(id.clone());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_compare_and_print_like_zero() {
        let v = CvrVersion::initial();
        assert_eq!(v.to_string(), "00");
        assert_eq!(v.next_config().to_string(), "00:01");
        assert_eq!(CvrVersion::parse("55nkx4w:02").unwrap().config, 2);
        assert!(CvrVersion::parse("55nkx4w:01").unwrap() > CvrVersion::parse("55nkx4w").unwrap());
        assert!(CvrVersion::parse("55nw7aw").unwrap() > CvrVersion::parse("55nkx4w:02").unwrap());
        assert!(CvrVersion::parse("bogus").is_none());
        assert!(CvrVersion::parse("00:zz").is_none());
    }

    #[test]
    fn refcounts_tombstones_and_deltas() {
        let mut cvr = Cvr::new("g");
        let v1 = CvrVersion::parse("01").unwrap();
        let a: RowId = ("t".into(), r#"{"id":1}"#.into());
        let b: RowId = ("t".into(), r#"{"id":2}"#.into());
        let rows = BTreeMap::from([(a.clone(), "01".to_string()), (b.clone(), "01".to_string())]);
        let (puts, dels) = cvr.set_query_rows("q1", &rows, &v1);
        assert_eq!((puts.len(), dels.len()), (2, 0));
        let (puts, _) = cvr.set_query_rows("q2", &BTreeMap::from([(a.clone(), "01".into())]), &v1);
        assert!(puts.is_empty(), "same version: nothing to send");
        cvr.add_client("c1");
        let mut d = cvr.take_delta();
        assert_eq!(d.rows.len(), 2);
        assert_eq!(d.clients, Some(vec!["c1".to_string()]));
        let v2 = CvrVersion::parse("02").unwrap();
        let dels = cvr.drop_query_rows("q1", &v2);
        assert_eq!(dels, vec![b.clone()], "a is still held by q2");
        assert!(cvr.rows[&b].refs.is_none());
        cvr.version = v2;
        let later = cvr.take_delta();
        assert_eq!(later.clients, None, "clients unchanged");
        d.merge(later);
        assert_eq!(d.version, "02");
        assert_eq!(d.clients, Some(vec!["c1".to_string()]));
        assert!(d.rows[&b].refs.is_none(), "the later record wins");
        assert!(cvr.take_delta().rows.is_empty(), "nothing left to flush");
    }
}
