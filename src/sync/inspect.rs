//! The inspector protocol (`inspect` messages, protocol §2–§3): what `zero.inspector` in the
//! client asks a running server — the group's queries with their row counts and server times,
//! server-wide time digests, the server version, and one-off query analyses.
//!
//! Everything but `authenticate` needs the admin password first (`ZERO_ADMIN_PASSWORD`, or
//! nothing in development mode). As in zero-cache, a group that authenticated once stays
//! authenticated in this process, whichever of its clients asks, until a wrong password.
//!
//! Times are in milliseconds, as t-digests in Zero's wire form (`[compression, mean, weight,
//! …]`), and belong to the client group, as zero-cache keeps them per view-syncer. A query's
//! hydration time runs from its subscription to its rows reaching the group; its update time is
//! the engine's time to apply each version that changed its rows (the engine applies a version
//! for every query at once, so queries updated together share the figure).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Mutex;

use serde_json::{Value as Json, json};
use subtle::ConstantTimeEq;
use tdigest::TDigest;

use super::cvr::Cvr;
use super::ivm::Analysis;

/// Centroids a digest keeps: enough for the medians and tails the inspector shows, small
/// enough for one digest per query in every group (about 0.8 KB at most).
const DIGEST_SIZE: usize = 32;
/// Samples buffered before they are merged into the centroids.
const DIGEST_BATCH: usize = 32;

/// A t-digest of times that takes one sample at a time.
#[derive(Debug, Default, Clone)]
pub(crate) struct Digest {
    merged: Option<TDigest>,
    pending: Vec<f64>,
}

impl Digest {
    /// Records one sample (non-finite ones are dropped).
    pub(crate) fn add(&mut self, v: f64) {
        if !v.is_finite() {
            return;
        }
        self.pending.push(v);
        if self.pending.len() >= DIGEST_BATCH {
            let base = self
                .merged
                .take()
                .unwrap_or_else(|| TDigest::new_with_size(DIGEST_SIZE));
            let batch = std::mem::replace(&mut self.pending, Vec::with_capacity(DIGEST_BATCH));
            self.merged = Some(base.merge_unsorted(batch));
        }
    }

    /// Samples recorded.
    #[cfg(test)]
    fn count(&self) -> usize {
        self.merged.as_ref().map_or(0, |d| d.count() as usize) + self.pending.len()
    }

    /// Zero's wire form: the compression, then each centroid's mean and weight.
    pub(crate) fn to_json(&self) -> Json {
        let base = self
            .merged
            .clone()
            .unwrap_or_else(|| TDigest::new_with_size(DIGEST_SIZE));
        let d = if self.pending.is_empty() {
            base
        } else {
            base.merge_unsorted(self.pending.clone())
        };
        let mut out = Vec::with_capacity(1 + 2 * d.centroids().len());
        out.push(json!(DIGEST_SIZE));
        for c in d.centroids() {
            out.push(json!(c.mean()));
            out.push(json!(c.weight()));
        }
        Json::Array(out)
    }
}

/// One query's server times in a group.
#[derive(Debug, Default)]
pub(crate) struct QueryMetrics {
    /// The latest hydration.
    pub hydrate_ms: Option<f64>,
    /// Every update since.
    pub update: Digest,
}

impl QueryMetrics {
    /// The `metrics` of an inspector query row: protocol 51 sends the hydration time as a
    /// number, older clients read a one-sample digest under another name.
    fn to_json(&self, protocol: u32) -> Json {
        if protocol >= 51 {
            let mut m = serde_json::Map::new();
            if let Some(ms) = self.hydrate_ms {
                m.insert("query-hydration-server-ms".into(), json!(ms));
            }
            m.insert("query-update-server".into(), self.update.to_json());
            Json::Object(m)
        } else {
            let mut hydrate = Digest::default();
            if let Some(ms) = self.hydrate_ms {
                hydrate.add(ms);
            }
            json!({
                "query-materialization-server": hydrate.to_json(),
                "query-update-server": self.update.to_json(),
            })
        }
    }
}

/// Who may use the inspector: the groups that gave the admin password (process-wide, as in
/// zero-cache).
#[derive(Debug, Default)]
pub(crate) struct Inspector {
    authenticated: Mutex<HashSet<String>>,
}

impl Inspector {
    /// Whether `group` may use the inspector.
    pub(crate) fn allowed(&self, group: &str, development: bool) -> bool {
        development || self.lock().contains(group)
    }

    /// Checks `password` against `ZERO_ADMIN_PASSWORD` in constant time and records the
    /// outcome for `group` (a wrong password revokes an earlier success).
    pub(crate) fn authenticate(
        &self,
        group: &str,
        password: &str,
        expected: Option<&str>,
        development: bool,
    ) -> bool {
        let ok = match expected.filter(|e| !e.is_empty()) {
            // Zero lets an empty password in only in development mode, with no admin password.
            None => development && password.is_empty(),
            Some(e) => bool::from(password.as_bytes().ct_eq(e.as_bytes())),
        };
        let mut set = self.lock();
        if ok {
            set.insert(group.to_string());
        } else {
            set.remove(group);
        }
        ok
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.authenticated.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// A group's hydration and update times over all of its queries (the `metrics` reply).
#[derive(Debug, Default)]
pub(crate) struct GroupMetrics {
    /// Every hydration.
    pub hydrate: Digest,
    /// Every query update.
    pub update: Digest,
}

impl GroupMetrics {
    /// The `metrics` reply's value.
    pub(crate) fn to_json(&self) -> Json {
        json!({
            "query-materialization-server": self.hydrate.to_json(),
            "query-update-server": self.update.to_json(),
        })
    }
}

/// The `queries` reply's rows: each live desire of the group (of `client` only when given) with
/// its query, ordered by client and query hash. Desires whose TTL ran out are left out.
pub(crate) fn query_rows(
    cvr: &Cvr,
    client: Option<&str>,
    ttl_now: f64,
    metrics: &HashMap<String, QueryMetrics>,
    server_asts: &dyn Fn(&str) -> Option<Json>,
    protocol: u32,
) -> Vec<Json> {
    cvr.desires
        .iter()
        .filter(|((c, _), _)| client.is_none_or(|want| want == c))
        .filter(|(_, d)| d.inactivated_at.is_none_or(|at| at + d.ttl_ms > ttl_now))
        .map(|((c, h), d)| {
            let q = cvr.queries.get(h);
            let ast = q
                .and_then(|q| q.ast.clone())
                .or_else(|| server_asts(h))
                .unwrap_or(Json::Null);
            json!({
                "clientID": c,
                "queryID": h,
                "ast": ast,
                "name": q.and_then(|q| q.name.clone()),
                "args": q.and_then(|q| q.args.clone()),
                "got": q.is_some_and(|q| q.got),
                "deleted": d.deleted,
                "ttl": d.ttl_ms,
                "inactivatedAt": d.inactivated_at,
                "rowCount": cvr.query_rows.get(h).map_or(0, |r| r.len()),
                "metrics": metrics.get(h).map(|m| m.to_json(protocol)),
            })
        })
        .collect()
}

/// The `analyze-query` reply's value, in zero-cache's `AnalyzeQueryResult` shape. This server
/// hydrates from in-memory indexes, not SQLite scans, so it reports no rows read and no
/// SQLite plans.
pub(crate) fn analysis_json(
    a: &Analysis,
    started_ms: f64,
    synced_rows: bool,
    after_permissions: Option<String>,
    mut warnings: Vec<String>,
) -> Json {
    if a.already_running {
        warnings.push("An identical query was already running: its rows were read, not hydrated again, so the time is not a hydration time.".to_string());
    }
    let mut by_table: BTreeMap<&str, Vec<Json>> = BTreeMap::new();
    let mut seen = HashSet::new();
    for r in &a.rows {
        if seen.insert((r.table.as_str(), r.key.as_str())) && synced_rows {
            by_table
                .entry(r.table.as_str())
                .or_default()
                .push(r.value.to_value());
        }
    }
    let mut out = serde_json::Map::new();
    out.insert("warnings".into(), json!(warnings));
    if synced_rows {
        out.insert("syncedRows".into(), json!(by_table));
    }
    out.insert("syncedRowCount".into(), json!(seen.len()));
    out.insert("start".into(), json!(started_ms));
    out.insert("end".into(), json!(started_ms + a.elapsed_ms));
    out.insert("elapsed".into(), json!(a.elapsed_ms));
    if let Some(p) = after_permissions {
        out.insert("afterPermissions".into(), json!(p));
    }
    out.insert("readRowCountsByQuery".into(), json!({}));
    out.insert("readRowCount".into(), json!(0));
    out.insert("sqlitePlans".into(), json!({}));
    Json::Object(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn digests_keep_every_sample_in_zero_wire_form() {
        let mut d = Digest::default();
        for i in 0..200 {
            d.add(f64::from(i % 10));
        }
        d.add(f64::NAN);
        assert_eq!(d.count(), 200);
        let j = d.to_json();
        let a = j.as_array().expect("array");
        assert_eq!(a[0], json!(DIGEST_SIZE));
        assert_eq!(a.len() % 2, 1);
        let weights: f64 = a[1..].chunks(2).map(|c| c[1].as_f64().expect("w")).sum();
        assert_eq!(weights, 200.0);
        let means: Vec<f64> = a[1..]
            .chunks(2)
            .map(|c| c[0].as_f64().expect("m"))
            .collect();
        assert!(means.windows(2).all(|w| w[0] <= w[1]), "{means:?}");
        assert!(means.iter().all(|m| (0.0..=9.0).contains(m)));
    }

    #[test]
    fn authentication_is_per_group_and_a_wrong_password_revokes_it() {
        let i = Inspector::default();
        assert!(!i.allowed("g", false));
        assert!(i.allowed("g", true));
        assert!(!i.authenticate("g", "nope", Some("pw"), false));
        assert!(i.authenticate("g", "pw", Some("pw"), false));
        assert!(i.allowed("g", false));
        assert!(!i.allowed("other", false));
        assert!(!i.authenticate("g", "pw2", Some("pw"), false));
        assert!(!i.allowed("g", false));
        // No password configured: only development mode lets an empty one in.
        assert!(!i.authenticate("g", "", None, false));
        assert!(i.authenticate("g", "", None, true));
        assert!(!i.authenticate("g", "x", None, true));
        // An empty admin password is no password.
        assert!(!i.authenticate("g", "", Some(""), false));
    }

    #[test]
    fn old_protocols_get_the_hydration_time_as_a_digest() {
        let mut m = QueryMetrics {
            hydrate_ms: Some(3.5),
            ..Default::default()
        };
        m.update.add(1.0);
        let new = m.to_json(51);
        assert_eq!(new["query-hydration-server-ms"], json!(3.5));
        assert_eq!(new["query-update-server"], json!([DIGEST_SIZE, 1.0, 1.0]));
        let old = m.to_json(50);
        assert_eq!(
            old["query-materialization-server"],
            json!([DIGEST_SIZE, 3.5, 1.0])
        );
        assert!(old.get("query-hydration-server-ms").is_none());
    }
}
