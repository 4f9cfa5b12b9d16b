//! An in-test OTLP/HTTP metrics receiver: what a collector would get from a real worker.

use axum::body::Bytes;
use axum::routing::post;
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use tokio::sync::mpsc;

/// Starts a receiver for `POST /v1/metrics`; returns its base URL and the decoded requests.
pub async fn otlp_http_receiver() -> (String, mpsc::UnboundedReceiver<ExportMetricsServiceRequest>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/v1/metrics",
        post(move |body: Bytes| {
            let tx = tx.clone();
            async move {
                let request = ExportMetricsServiceRequest::decode(body).expect("valid OTLP protobuf");
                let _ = tx.send(request);
                ExportMetricsServiceResponse::default().encode_to_vec()
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move { axum::serve(listener, app).await.expect("serve") });
    (format!("http://{addr}"), rx)
}
