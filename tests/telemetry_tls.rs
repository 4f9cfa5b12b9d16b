//! OTLP over TLS: in-test receivers with a certificate from a throwaway CA; the worker's exporter
//! trusts that CA through `OTEL_EXPORTER_OTLP_CERTIFICATE` and sends the headers of
//! `OTEL_EXPORTER_OTLP_HEADERS`, over http/protobuf (HTTPS) and gRPC (TLS).

mod tls_support;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::body::Bytes;
use axum::http::HeaderMap;
use axum::routing::post;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use prost::Message;
use tls_support::TestPki;
use tokio::sync::mpsc;
use tokio_rustls::TlsAcceptor;
use tokio_rustls::rustls;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use worker::telemetry::OtlpProtocol;
use worker::telemetry::TelemetryConfig;
use worker::telemetry::{Identity, Metrics};

const LIMIT: Duration = Duration::from_secs(15);

/// What a receiver saw: the `x-api-key` header and the names of the metrics in one export.
#[derive(Debug)]
struct Received {
    api_key: Option<String>,
    metric_names: Vec<String>,
}

fn received(headers: &HeaderMap, request: &ExportMetricsServiceRequest) -> Received {
    Received {
        api_key: headers.get("x-api-key").and_then(|v| v.to_str().ok()).map(str::to_owned),
        metric_names: request
            .resource_metrics
            .iter()
            .flat_map(|r| &r.scope_metrics)
            .flat_map(|s| &s.metrics)
            .map(|m| m.name.clone())
            .collect(),
    }
}

fn tls_acceptor(pki: &TestPki, alpn: &[&[u8]]) -> TlsAcceptor {
    let certs = vec![CertificateDer::from_pem_slice(pki.cert_pem.as_bytes()).expect("certificate PEM")];
    let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).expect("key PEM");
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .expect("server certificate");
    config.alpn_protocols = alpn.iter().map(|p| p.to_vec()).collect();
    TlsAcceptor::from(Arc::new(config))
}

/// An HTTPS receiver for `POST /v1/metrics`; returns its base URL and what it received.
async fn otlp_https_receiver(pki: &TestPki) -> (String, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let app = axum::Router::new().route(
        "/v1/metrics",
        post(move |headers: HeaderMap, body: Bytes| {
            let tx = tx.clone();
            async move {
                let request = ExportMetricsServiceRequest::decode(body).expect("valid OTLP protobuf");
                let _ = tx.send(received(&headers, &request));
                ExportMetricsServiceResponse::default().encode_to_vec()
            }
        }),
    );
    let acceptor = tls_acceptor(pki, &[b"http/1.1"]);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, app) = (acceptor.clone(), app.clone());
            tokio::spawn(async move {
                // A client that refuses the certificate ends the handshake; nothing to serve.
                let Ok(tls) = acceptor.accept(tcp).await else { return };
                let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                    .serve_connection(TokioIo::new(tls), TowerToHyperService::new(app))
                    .await;
            });
        }
    });
    (format!("https://localhost:{port}"), rx)
}

fn env(pki: &TestPki) -> BTreeMap<String, String> {
    BTreeMap::from([
        ("OTEL_EXPORTER_OTLP_CERTIFICATE".to_owned(), pki.ca_file().display().to_string()),
        ("OTEL_EXPORTER_OTLP_HEADERS".to_owned(), "x-api-key=se%20cret".to_owned()),
    ])
}

fn config(endpoint: String, protocol: OtlpProtocol) -> TelemetryConfig {
    TelemetryConfig {
        otlp_endpoint: Some(endpoint),
        otlp_protocol: protocol,
        export_interval: Duration::from_secs(3600),
        ..TelemetryConfig::default()
    }
}

fn identity() -> Identity {
    Identity { worker_id: uuid::Uuid::new_v4(), environment: "test".into() }
}

async fn export_one_counter(metrics: &Metrics) {
    metrics.meter().u64_counter("tls.test.exports").build().add(1, &[]);
    metrics.flush().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reach_an_https_collector_signed_by_the_configured_ca_with_the_configured_headers() {
    let pki = TestPki::new("otlp test CA");
    let (endpoint, mut received) = otlp_https_receiver(&pki).await;
    let metrics = Metrics::init(&config(endpoint, OtlpProtocol::HttpProtobuf), &identity(), &env(&pki))
        .expect("metrics");
    export_one_counter(&metrics).await;

    let got = tokio::time::timeout(LIMIT, received.recv()).await.expect("an export").expect("receiver open");
    assert!(got.metric_names.iter().any(|n| n == "tls.test.exports"), "{got:?}");
    assert_eq!(got.api_key.as_deref(), Some("se cret"), "the header arrives, percent-decoded");
    metrics.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_collector_signed_by_another_ca_receives_nothing() {
    let pki = TestPki::new("otlp test CA");
    let other = TestPki::new("some other CA");
    let (endpoint, mut received) = otlp_https_receiver(&pki).await;
    let metrics = Metrics::init(&config(endpoint, OtlpProtocol::HttpProtobuf), &identity(), &env(&other))
        .expect("metrics");
    export_one_counter(&metrics).await;
    assert!(received.try_recv().is_err(), "the flush ended without an export reaching the receiver");
    metrics.shutdown().await;
}

/// A gRPC `MetricsService` that forwards what it receives to the test.
struct GrpcReceiver(mpsc::UnboundedSender<Received>);

#[tonic::async_trait]
impl MetricsService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let headers = request.metadata().clone().into_headers();
        let _ = self.0.send(received(&headers, request.get_ref()));
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

/// A gRPC receiver over TLS; returns its `https://` endpoint and what it received.
async fn otlp_grpc_tls_receiver(pki: &TestPki) -> (String, mpsc::UnboundedReceiver<Received>) {
    let (tx, rx) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let port = listener.local_addr().expect("addr").port();
    let identity = tonic::transport::Identity::from_pem(&pki.cert_pem, &pki.key_pem);
    let server = tonic::transport::Server::builder()
        .tls_config(tonic::transport::ServerTlsConfig::new().identity(identity))
        .expect("server TLS")
        .add_service(MetricsServiceServer::new(GrpcReceiver(tx)));
    let incoming = futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    });
    tokio::spawn(server.serve_with_incoming(incoming));
    (format!("https://localhost:{port}"), rx)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_reach_a_grpc_tls_collector_signed_by_the_configured_ca_with_the_configured_headers() {
    let pki = TestPki::new("otlp test CA");
    let (endpoint, mut received) = otlp_grpc_tls_receiver(&pki).await;
    let metrics =
        Metrics::init(&config(endpoint, OtlpProtocol::Grpc), &identity(), &env(&pki)).expect("metrics");
    export_one_counter(&metrics).await;

    let got = tokio::time::timeout(LIMIT, received.recv()).await.expect("an export").expect("receiver open");
    assert!(got.metric_names.iter().any(|n| n == "tls.test.exports"), "{got:?}");
    assert_eq!(got.api_key.as_deref(), Some("se cret"), "the header arrives as metadata, percent-decoded");
    metrics.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_tls_collector_signed_by_another_ca_receives_nothing() {
    let pki = TestPki::new("otlp test CA");
    let other = TestPki::new("some other CA");
    let (endpoint, mut received) = otlp_grpc_tls_receiver(&pki).await;
    let metrics =
        Metrics::init(&config(endpoint, OtlpProtocol::Grpc), &identity(), &env(&other)).expect("metrics");
    export_one_counter(&metrics).await;
    assert!(received.try_recv().is_err(), "the flush ended without an export reaching the receiver");
    metrics.shutdown().await;
}
