//! Custom mutations (protocol §8): each `push` is forwarded as received to the API server at
//! `ZERO_MUTATE_URL`, which runs the mutators upstream and records LMIDs and error results in
//! `{app}_{shard}.clients` / `.mutations`; those come back through replication as
//! `lastMutationIDChanges` / `mutationsPatch`. A successful push therefore sends nothing on
//! the socket; a failed one sends `PushFailed` and closes the connection so that the client
//! reconnects and pushes again.

use std::time::Duration;

use serde_json::{Value as Json, json};

use super::custom::{choose_url, post};

/// Where and how to call the API server's mutate endpoint.
#[derive(Debug, Clone)]
pub struct MutateEndpoint {
    /// Configured URLs (the first is the default).
    pub urls: Vec<String>,
    /// `X-Api-Key`.
    pub api_key: Option<String>,
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
fn mutation_ids(push: &Json) -> Json {
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

impl MutateEndpoint {
    /// Forwards one push; `Err` carries the `PushFailed` body to send before closing.
    pub async fn push(
        &self,
        client_url: Option<&str>,
        auth: Option<&str>,
        push: &Json,
    ) -> Result<(), Json> {
        let ids = mutation_ids(push);
        let url = choose_url(
            &self.urls,
            client_url,
            "ZERO_MUTATE_URL",
            &self.schema,
            &self.app_id,
        )
        .map_err(|m| push_failed("internal", "zeroCache", m, &ids))?;
        let mut headers = vec![("Content-Type".to_string(), "application/json".to_string())];
        if let Some(k) = &self.api_key {
            headers.push(("X-Api-Key".into(), k.clone()));
        }
        if let Some(t) = auth {
            headers.push(("Authorization".into(), format!("Bearer {t}")));
        }
        let (status, text) = match tokio::time::timeout(
            Duration::from_secs(60),
            post(&url, &headers, push.to_string().as_bytes()),
        )
        .await
        {
            Err(_) => {
                return Err(push_failed(
                    "timeout",
                    "zeroCache",
                    format!("POST {url} timed out"),
                    &ids,
                ));
            }
            Ok(Err(e)) => {
                return Err(push_failed(e.reason, "zeroCache", e.message, &ids));
            }
            Ok(Ok(r)) => r,
        };
        if !(200..300).contains(&status) {
            let mut preview = text.clone();
            if preview.len() > 512 {
                let mut cut = 512;
                while !preview.is_char_boundary(cut) {
                    cut -= 1;
                }
                preview.truncate(cut);
                preview.push_str("...");
            }
            let mut b = push_failed(
                "http",
                "zeroCache",
                format!("Fetch from API server returned non-OK status {status}"),
                &ids,
            );
            b["status"] = json!(status);
            b["bodyPreview"] = json!(preview);
            return Err(b);
        }
        let v: Json = serde_json::from_str(&text).map_err(|e| {
            push_failed(
                "parse",
                "zeroCache",
                format!("invalid push response: {e}"),
                &ids,
            )
        })?;
        check_response(&v, &ids)
    }
}

/// Interprets a push response: success, a whole-push failure, or an out-of-order mutation.
pub fn check_response(v: &Json, ids: &Json) -> Result<(), Json> {
    if v["kind"] == "PushFailed" {
        return Err(v.clone());
    }
    if let Some(e) = v.get("error").and_then(Json::as_str) {
        let reason = match e {
            "unsupportedPushVersion" => "unsupportedPushVersion",
            "http" => "http",
            _ => "internal",
        };
        let origin = if reason == "http" {
            "zeroCache"
        } else {
            "server"
        };
        return Err(push_failed(
            reason,
            origin,
            format!("push failed: {e}"),
            ids,
        ));
    }
    let Some(ms) = v["mutations"].as_array() else {
        return Err(push_failed(
            "parse",
            "zeroCache",
            "push response has no mutations".into(),
            ids,
        ));
    };
    let ooo: Vec<Json> = ms
        .iter()
        .filter(|m| m["result"]["error"] == "oooMutation")
        .map(|m| m["id"].clone())
        .collect();
    if !ooo.is_empty() {
        return Err(push_failed(
            "oooMutation",
            "server",
            "mutation was out of order".into(),
            &Json::Array(ooo),
        ));
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
