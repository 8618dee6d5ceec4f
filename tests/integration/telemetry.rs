//! OpenTelemetry export as the production guide configures it: the `zero-cache` binary with
//! `OTEL_EXPORTER_OTLP_ENDPOINT` sends its spans over OTLP/HTTP to a collector (here a real
//! HTTP server decoding the protobuf requests), with `OTEL_RESOURCE_ATTRIBUTES` on them, and
//! API-server calls carry a `traceparent` of the exported trace.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::trace::v1::ExportTraceServiceRequest;
use opentelemetry_proto::tonic::common::v1::any_value::Value as AnyValue;
use prost::Message;
use serde_json::{Value as Json, json};

use crate::roles::{free_port, spawn, wait_http_ok, wait_replica};
use crate::support::test_db;
use crate::sync_util::{ConnectOpts, connect, init, serve_api};

/// One exported span: its name, trace id (hex) and its resource's string attributes.
#[derive(Debug, Clone)]
struct Exported {
    name: String,
    trace_id: String,
    resource: Vec<(String, String)>,
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// A collector: every span of every `/v1/traces` request.
async fn collector() -> (std::net::SocketAddr, Arc<Mutex<Vec<Exported>>>) {
    let spans = Arc::new(Mutex::new(Vec::new()));
    let store = spans.clone();
    let router = axum::Router::new().route(
        "/v1/traces",
        post(move |body: Bytes| {
            let store = store.clone();
            async move {
                let req = ExportTraceServiceRequest::decode(body).expect("OTLP protobuf");
                let mut out = store.lock().unwrap();
                for rs in req.resource_spans {
                    let resource: Vec<(String, String)> = rs
                        .resource
                        .iter()
                        .flat_map(|r| r.attributes.iter())
                        .filter_map(|kv| match kv.value.as_ref()?.value.as_ref()? {
                            AnyValue::StringValue(s) => Some((kv.key.clone(), s.clone())),
                            _ => None,
                        })
                        .collect();
                    for ss in rs.scope_spans {
                        for s in ss.spans {
                            out.push(Exported {
                                name: s.name,
                                trace_id: hex(&s.trace_id),
                                resource: resource.clone(),
                            });
                        }
                    }
                }
                (
                    [("content-type", "application/x-protobuf")],
                    Vec::<u8>::new(),
                )
            }
        }),
    );
    (serve_api(router).await, spans)
}

async fn wait_span(
    spans: &Arc<Mutex<Vec<Exported>>>,
    log: &Arc<Mutex<String>>,
    what: &str,
    pred: impl Fn(&Exported) -> bool,
) -> Exported {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(s) = spans.lock().unwrap().iter().find(|s| pred(s)) {
            return s.clone();
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no exported span {what}; got {:?}; server log:\n{}",
            spans.lock().unwrap(),
            log.lock().unwrap()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spans_are_exported_over_otlp_and_api_calls_carry_their_trace() {
    let db = test_db().await;
    db.exec("CREATE TABLE issue (id text PRIMARY KEY, title text);")
        .await;
    let (otlp, spans) = collector().await;
    // An API server that records the trace context of each push.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Option<String>>();
    let api = serve_api(axum::Router::new().route(
        "/mutate",
        post(
            move |headers: HeaderMap, axum::Json(_b): axum::Json<Json>| {
                let tx = tx.clone();
                async move {
                    let tp = headers
                        .get("traceparent")
                        .and_then(|v| v.to_str().ok())
                        .map(String::from);
                    let _ = tx.send(tp);
                    axum::Json(json!({"kind": "MutateResponse", "mutations": [
                    {"id": {"id": 1, "clientID": "c1"}, "result": {}}]}))
                }
            },
        ),
    ))
    .await;
    let port = free_port();
    let mut server = spawn(
        &db,
        &[
            ("ZERO_REPLICA_FILE", db.replica_file().display().to_string()),
            ("ZERO_PORT", port.to_string()),
            ("ZERO_NUM_SYNC_WORKERS", "1".into()),
            ("ZERO_MUTATE_URL", format!("http://{api}/mutate")),
            ("OTEL_EXPORTER_OTLP_ENDPOINT", format!("http://{otlp}")),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test".into(),
            ),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".into()),
            ("ZERO_LOG_LEVEL", "info".into()),
        ],
    );
    // The server's log, shown when an assertion fails.
    let log = Arc::new(Mutex::new(String::new()));
    {
        use tokio::io::AsyncBufReadExt;
        let stderr = server.stderr.take().expect("stderr");
        let log = log.clone();
        tokio::spawn(async move {
            let mut lines = tokio::io::BufReader::new(stderr).lines();
            while let Ok(Some(l)) = lines.next_line().await {
                log.lock().unwrap().push_str(&(l + "\n"));
            }
        });
    }
    wait_http_ok(port, "/keepalive").await;
    wait_replica(&db.replica_file()).await;

    // A replicated transaction is a span, with the configured resource.
    db.exec("INSERT INTO issue VALUES ('a', 'first');").await;
    let txn = wait_span(&spans, &log, "replicate.transaction", |s| {
        s.name == "replicate.transaction"
    })
    .await;
    let attr = |k: &str| {
        txn.resource
            .iter()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
    };
    assert_eq!(attr("service.name").as_deref(), Some("zero-cache"));
    assert_eq!(attr("deployment.environment").as_deref(), Some("test"));

    // A push goes to the API server with a traceparent of an exported span.
    let addr: std::net::SocketAddr = format!("127.0.0.1:{port}").parse().expect("addr");
    let schema = json!({"tables": {"issue": {"columns": {"id": {"type": "string"},
        "title": {"type": "string"}}, "primaryKey": ["id"]}}});
    let mut c = connect(
        addr,
        ConnectOpts::new("c1", "g1", init(json!([]), Some(schema))),
    )
    .await
    .ok();
    c.poke().await;
    c.send(
        json!(["push", {"clientGroupID": "g1", "mutations": [{"type": "custom", "id": 1,
        "clientID": "c1", "name": "m", "args": [{}], "timestamp": 1}], "pushVersion": 1,
        "timestamp": 1, "requestID": "r1"}]),
    )
    .await;
    let tp = tokio::time::timeout(Duration::from_secs(10), rx.recv())
        .await
        .expect("push forwarded")
        .expect("sender")
        .expect("a traceparent header");
    let parts: Vec<&str> = tp.split('-').collect();
    assert_eq!(parts.len(), 4, "{tp}");
    assert_eq!(
        (parts[0], parts[1].len(), parts[2].len()),
        ("00", 32, 16),
        "{tp}"
    );
    let trace_id = parts[1].to_string();
    let call = wait_span(&spans, &log, "api_server.post of that trace", |s| {
        s.name == "api_server.post" && s.trace_id == trace_id
    })
    .await;
    assert_eq!(call.trace_id, trace_id);
    c.close().await;
}
