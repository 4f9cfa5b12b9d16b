//! An in-test OTLP/HTTP receiver: what a collector would get from a real worker (metrics and
//! spans as protobuf) and from an agent that traces (spans as OTLP JSON).

use std::collections::BTreeMap;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value;
use prost::Message;
use tokio::sync::mpsc;

/// One span as received, ids in lowercase hex (empty when absent).
#[derive(Debug, Clone)]
pub struct ReceivedSpan {
    pub name: String,
    pub trace_id: String,
    pub span_id: String,
    pub parent_span_id: String,
    /// String, integer and boolean attributes, as text.
    pub attributes: BTreeMap<String, String>,
    /// (trace id, span id) of each link.
    pub links: Vec<(String, String)>,
    /// The span's status code (0 unset, 1 ok, 2 error).
    pub status: i32,
}

/// The receiver's base URL and what it has received so far, in order.
pub struct Otlp {
    pub endpoint: String,
    pub metrics: mpsc::UnboundedReceiver<ExportMetricsServiceRequest>,
    pub spans: mpsc::UnboundedReceiver<ReceivedSpan>,
}

/// Starts a receiver for `POST /v1/metrics`; returns its base URL and the decoded requests.
pub async fn otlp_http_receiver() -> (String, mpsc::UnboundedReceiver<ExportMetricsServiceRequest>) {
    let otlp = Otlp::start().await;
    (otlp.endpoint, otlp.metrics)
}

impl Otlp {
    /// Serves `POST /v1/metrics` (protobuf) and `POST /v1/traces` (protobuf, or JSON when the
    /// content type says so) on a free port.
    pub async fn start() -> Self {
        let (metrics_tx, metrics) = mpsc::unbounded_channel();
        let (spans_tx, spans) = mpsc::unbounded_channel();
        let app = axum::Router::new()
            .route(
                "/v1/metrics",
                post(move |body: Bytes| {
                    let tx = metrics_tx.clone();
                    async move {
                        let request = ExportMetricsServiceRequest::decode(body).expect("valid OTLP protobuf");
                        let _ = tx.send(request);
                        ExportMetricsServiceResponse::default().encode_to_vec()
                    }
                }),
            )
            .route(
                "/v1/traces",
                post(move |headers: HeaderMap, body: Bytes| {
                    let tx = spans_tx.clone();
                    async move {
                        let json = headers
                            .get("content-type")
                            .and_then(|v| v.to_str().ok())
                            .is_some_and(|v| v.starts_with("application/json"));
                        let received = if json { from_json(&body) } else { from_protobuf(body) };
                        for span in received {
                            let _ = tx.send(span);
                        }
                        ExportTraceServiceResponse::default().encode_to_vec()
                    }
                }),
            );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
        Self { endpoint: format!("http://{addr}"), metrics, spans }
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn from_protobuf(body: Bytes) -> Vec<ReceivedSpan> {
    let request = ExportTraceServiceRequest::decode(body).expect("valid OTLP protobuf");
    let mut spans = Vec::new();
    for resource in request.resource_spans {
        for scope in resource.scope_spans {
            for span in scope.spans {
                let attributes = span
                    .attributes
                    .iter()
                    .filter_map(|kv| {
                        let value = match kv.value.as_ref()?.value.as_ref()? {
                            any_value::Value::StringValue(s) => s.clone(),
                            any_value::Value::IntValue(i) => i.to_string(),
                            any_value::Value::BoolValue(b) => b.to_string(),
                            any_value::Value::DoubleValue(d) => d.to_string(),
                            _ => return None,
                        };
                        Some((kv.key.clone(), value))
                    })
                    .collect();
                spans.push(ReceivedSpan {
                    name: span.name,
                    trace_id: hex(&span.trace_id),
                    span_id: hex(&span.span_id),
                    parent_span_id: hex(&span.parent_span_id),
                    attributes,
                    links: span.links.iter().map(|l| (hex(&l.trace_id), hex(&l.span_id))).collect(),
                    status: span.status.map_or(0, |s| s.code),
                });
            }
        }
    }
    spans
}

/// OTLP/JSON (what the demo agent sends): ids are hex strings already.
fn from_json(body: &[u8]) -> Vec<ReceivedSpan> {
    let request: serde_json::Value = serde_json::from_slice(body).expect("valid OTLP JSON");
    let text = |v: &serde_json::Value, key: &str| v[key].as_str().unwrap_or_default().to_owned();
    let mut spans = Vec::new();
    for resource in request["resourceSpans"].as_array().into_iter().flatten() {
        for scope in resource["scopeSpans"].as_array().into_iter().flatten() {
            for span in scope["spans"].as_array().into_iter().flatten() {
                let attributes = span["attributes"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .map(|kv| (text(kv, "key"), text(&kv["value"], "stringValue")))
                    .collect();
                spans.push(ReceivedSpan {
                    name: text(span, "name"),
                    trace_id: text(span, "traceId"),
                    span_id: text(span, "spanId"),
                    parent_span_id: text(span, "parentSpanId"),
                    attributes,
                    links: Vec::new(),
                    status: 0,
                });
            }
        }
    }
    spans
}
