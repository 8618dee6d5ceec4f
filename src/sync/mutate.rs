//! Custom mutations (protocol §8): each `push` is forwarded as received to the API server at
//! `ZERO_MUTATE_URL`, which runs the mutators upstream and records LMIDs and error results in
//! `{app}_{shard}.clients` / `.mutations`; those come back through replication as
//! `lastMutationIDChanges` / `mutationsPatch`. A successful push therefore sends nothing on
//! the socket; a failed one sends `PushFailed` and closes the connection so that the client
//! reconnects and pushes again.

use std::sync::Arc;

use serde_json::{Value as Json, json};

use super::fetch::{ApiConfig, ApiFailure, CallContext};

/// Where and how to call the API server's mutate endpoint.
#[derive(Debug, Clone)]
pub struct MutateEndpoint {
    /// `ZERO_MUTATE_*`.
    pub config: Arc<ApiConfig>,
    /// `{app}_{shard}`.
    pub schema: String,
    /// `ZERO_APP_ID`.
    pub app_id: String,
}

fn push_failed(reason: &str, origin: &str, message: String, ids: &Json) -> Json {
    json!({
        "kind": "PushFailed",
        "origin": origin,
        "reason": reason,
        "message": message,
        "mutationIDs": ids,
    })
}

/// `[{id, clientID}]` of a push's mutations.
pub fn mutation_ids(push: &Json) -> Json {
    Json::Array(
        push["mutations"]
            .as_array()
            .map(|ms| {
                ms.iter()
                    .map(|m| json!({"id": m["id"], "clientID": m["clientID"]}))
                    .collect()
            })
            .unwrap_or_default(),
    )
}

/// The outcome of a push that the API server handled.
#[derive(Debug, Clone, PartialEq)]
pub struct Pushed {
    /// `userID` of a `MutateResponse`: the user the API server validated.
    pub user_id: Option<Option<String>>,
}

/// A push that failed as a whole: the `PushFailed` body and whether the token was refused.
#[derive(Debug, Clone, PartialEq)]
pub struct PushError {
    /// The body sent to the client before its connection closes.
    pub body: Json,
    /// HTTP 401/403 or an auth error kind: the connection's auth is invalid.
    pub auth: bool,
}

impl MutateEndpoint {
    /// Forwards one (possibly merged) push.
    pub async fn push(&self, ctx: &CallContext, push: &Json) -> Result<Pushed, PushError> {
        let ids = mutation_ids(push);
        let v = match super::fetch::post_json(&self.config, ctx, &self.schema, &self.app_id, push)
            .await
        {
            Ok(v) => v,
            Err(f) => {
                return Err(PushError {
                    auth: f.is_auth_error(),
                    body: f.body("PushFailed", "mutationIDs", ids),
                });
            }
        };
        check_response(&v, &ids).map_err(|body| PushError {
            auth: matches!(
                body["kind"].as_str(),
                Some("Unauthorized" | "AuthInvalidated")
            ) || (body["reason"] == "http"
                && matches!(body["status"].as_u64(), Some(401 | 403))),
            body,
        })?;
        Ok(Pushed {
            user_id: (v["kind"] == "MutateResponse")
                .then(|| v.get("userID").map(|u| u.as_str().map(str::to_string)))
                .flatten(),
        })
    }

    /// Asks the API server to delete mutation results (`_zero_cleanupResults`): `single` up to a
    /// mutation id of one client, or `bulk` for deleted clients. Failures are only logged.
    pub async fn cleanup(&self, ctx: &CallContext, group: &str, client_id: &str, args: Json) {
        let now = crate::replica::now_ms();
        let request_id = if args["type"] == "bulk" {
            format!("cleanup-bulk-{group}-{now}")
        } else {
            format!("cleanup-{group}-{client_id}-{}", args["upToMutationID"])
        };
        let body = json!({
            "clientGroupID": group,
            "mutations": [{
                "type": "custom", "id": 0, "clientID": client_id, "name": "_zero_cleanupResults",
                "args": [args], "timestamp": now,
            }],
            "pushVersion": 1,
            "timestamp": now,
            "requestID": request_id,
        });
        if let Err(e) =
            super::fetch::post_json(&self.config, ctx, &self.schema, &self.app_id, &body).await
        {
            tracing::warn!(client_group = %group, error = %e, "mutation result cleanup failed");
        }
    }
}

impl From<ApiFailure> for PushError {
    fn from(f: ApiFailure) -> PushError {
        PushError {
            auth: f.is_auth_error(),
            body: f.body("PushFailed", "mutationIDs", json!([])),
        }
    }
}

/// Interprets a push response: success, a whole-push failure, or an out-of-order mutation.
pub fn check_response(v: &Json, ids: &Json) -> Result<(), Json> {
    if v["kind"] == "PushFailed" {
        return Err(v.clone());
    }
    if let Some(e) = v.get("error").and_then(Json::as_str) {
        let mut b = match e {
            "http" => {
                let mut b = push_failed(
                    "http",
                    "zeroCache",
                    format!(
                        "Fetch from API server returned non-OK status {}",
                        v["status"]
                    ),
                    ids,
                );
                b["status"] = v["status"].clone();
                if let Some(d) = v.get("details") {
                    b["bodyPreview"] = d.clone();
                }
                b
            }
            "unsupportedPushVersion" => push_failed(
                "unsupportedPushVersion",
                "server",
                "Unsupported push version".into(),
                ids,
            ),
            "unsupportedSchemaVersion" => push_failed(
                "internal",
                "server",
                "Unsupported schema version".into(),
                ids,
            ),
            "zeroPusher" => push_failed(
                "internal",
                "server",
                v["details"].as_str().unwrap_or("zeroPusher").to_string(),
                ids,
            ),
            _ => push_failed(
                "internal",
                "server",
                "An unknown error occurred while pushing to the API server".into(),
                ids,
            ),
        };
        if let Some(m) = v.get("mutationIDs") {
            b["mutationIDs"] = m.clone();
        }
        return Err(b);
    }
    let Some(ms) = v["mutations"].as_array() else {
        return Err(push_failed(
            "parse",
            "zeroCache",
            "push response has no mutations".into(),
            ids,
        ));
    };
    if let Some(m) = ms.iter().find(|m| m["result"]["error"] == "oooMutation") {
        let client = &m["id"]["clientID"];
        let of_client: Vec<Json> = ms
            .iter()
            .filter(|x| &x["id"]["clientID"] == client)
            .map(|x| json!({"clientID": x["id"]["clientID"], "id": x["id"]["id"]}))
            .collect();
        let mut b = push_failed(
            "oooMutation",
            "server",
            "mutation was out of order".into(),
            &Json::Array(of_client),
        );
        if let Some(d) = m["result"].get("details") {
            b["details"] = d.clone();
        }
        return Err(b);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn responses() {
        let ids = json!([{"id": 1, "clientID": "c"}]);
        assert!(
            check_response(
                &json!({"kind": "MutateResponse", "mutations": [{"id": {"id": 1, "clientID": "c"}, "result": {}}]}),
                &ids
            )
            .is_ok()
        );
        assert!(check_response(&json!({"mutations": []}), &ids).is_ok());
        let e = check_response(
            &json!({"mutations": [{"id": {"id": 1, "clientID": "c"}, "result": {"error": "oooMutation"}}]}),
            &ids,
        )
        .unwrap_err();
        assert_eq!(e["reason"], "oooMutation");
        let e = check_response(&json!({"kind": "PushFailed", "origin": "server", "reason": "database", "message": "x", "mutationIDs": []}), &ids).unwrap_err();
        assert_eq!(e["reason"], "database");
        assert_eq!(
            check_response(&json!({"error": "unsupportedPushVersion"}), &ids).unwrap_err()["reason"],
            "unsupportedPushVersion"
        );
        assert_eq!(
            check_response(&json!({}), &ids).unwrap_err()["reason"],
            "parse"
        );
    }
}
