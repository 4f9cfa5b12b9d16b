//! Metrics reach an OTLP/HTTP collector: an in-test receiver decodes the protobuf export and
//! finds `worker.loop.ticks` for the `workers` loop with the service resource attributes.

mod common;

use common::otlp::otlp_http_receiver;

use std::collections::BTreeMap;
use std::time::Duration;

use common::TestDb;
use opentelemetry_proto::tonic::collector::metrics::v1::metrics_service_server::{
    MetricsService, MetricsServiceServer,
};
use opentelemetry_proto::tonic::collector::metrics::v1::{
    ExportMetricsServiceRequest, ExportMetricsServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{AnyValue, KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::metric;
use tokio::sync::mpsc;
use worker::health::Health;
use worker::identity::WorkerIdentity;
use worker::runtime::{Outcome, Runtime};
use worker::telemetry::OtlpProtocol;
use worker::telemetry::TelemetryConfig;
use worker::telemetry::{Identity, Metrics};
use worker::workers::WorkerLease;

fn string_value(value: &Option<AnyValue>) -> Option<&str> {
    match value.as_ref()?.value.as_ref()? {
        any_value::Value::StringValue(s) => Some(s),
        _ => None,
    }
}

fn attr<'a>(attributes: &'a [KeyValue], key: &str) -> Option<&'a str> {
    attributes.iter().find(|kv| kv.key == key).and_then(|kv| string_value(&kv.value))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_ticks_are_exported_over_otlp_http_with_service_identity() {
    let test_db = TestDb::new().await;
    let (endpoint, mut requests) = otlp_http_receiver().await;
    let config = TelemetryConfig {
        otlp_endpoint: Some(endpoint),
        otlp_protocol: OtlpProtocol::HttpProtobuf,
        export_interval: Duration::from_secs(3600),
        ..TelemetryConfig::default()
    };
    let me = WorkerIdentity::generate();
    let identity = Identity { worker_id: me.id, environment: "test".into() };
    let metrics = Metrics::init(&config, &identity, &BTreeMap::new()).expect("metrics");
    assert!(metrics.exporting());

    let rt = Runtime::new(test_db.db.clone(), Health::default(), &metrics.meter(), Default::default());
    let lease = WorkerLease::new(test_db.db.clone(), me.clone(), Default::default());
    let mut runner = rt.runner(lease);
    assert_eq!(runner.tick_once().await.outcome, Outcome::Ok);
    metrics.flush().await;

    let request = tokio::time::timeout(Duration::from_secs(15), requests.recv())
        .await
        .expect("an export within 15s")
        .expect("receiver open");
    let resource_metrics = &request.resource_metrics[0];
    let resource = resource_metrics.resource.as_ref().expect("resource");
    let worker_id = me.id.to_string();
    assert_eq!(attr(&resource.attributes, "service.name"), Some("worker"));
    assert_eq!(attr(&resource.attributes, "service.instance.id"), Some(worker_id.as_str()));
    assert_eq!(attr(&resource.attributes, "deployment.environment.name"), Some("test"));

    let ticks = resource_metrics
        .scope_metrics
        .iter()
        .flat_map(|s| &s.metrics)
        .find(|m| m.name == "worker.loop.ticks")
        .expect("worker.loop.ticks exported");
    let Some(metric::Data::Sum(sum)) = &ticks.data else { panic!("worker.loop.ticks is a sum: {ticks:?}") };
    let point = sum
        .data_points
        .iter()
        .find(|p| {
            attr(&p.attributes, "loop") == Some("workers") && attr(&p.attributes, "outcome") == Some("ok")
        })
        .expect("a data point for loop=workers outcome=ok");
    assert_eq!(
        point.value,
        Some(opentelemetry_proto::tonic::metrics::v1::number_data_point::Value::AsInt(1))
    );
    metrics.shutdown().await;
}

/// A gRPC `MetricsService` that forwards every export request to the test.
struct GrpcReceiver(mpsc::UnboundedSender<ExportMetricsServiceRequest>);

#[tonic::async_trait]
impl MetricsService for GrpcReceiver {
    async fn export(
        &self,
        request: tonic::Request<ExportMetricsServiceRequest>,
    ) -> Result<tonic::Response<ExportMetricsServiceResponse>, tonic::Status> {
        let _ = self.0.send(request.into_inner());
        Ok(tonic::Response::new(ExportMetricsServiceResponse::default()))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn loop_ticks_are_exported_over_otlp_grpc() {
    let test_db = TestDb::new().await;
    let (tx, mut requests) = mpsc::unbounded_channel();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(
        tonic::transport::Server::builder()
            .add_service(MetricsServiceServer::new(GrpcReceiver(tx)))
            .serve_with_incoming(tokio_stream_from(listener)),
    );
    let config = TelemetryConfig {
        otlp_endpoint: Some(format!("http://{addr}")),
        otlp_protocol: OtlpProtocol::Grpc,
        export_interval: Duration::from_secs(3600),
        ..TelemetryConfig::default()
    };
    let me = WorkerIdentity::generate();
    let identity = Identity { worker_id: me.id, environment: "test".into() };
    let metrics = Metrics::init(&config, &identity, &BTreeMap::new()).expect("metrics");
    let rt = Runtime::new(test_db.db.clone(), Health::default(), &metrics.meter(), Default::default());
    let mut runner = rt.runner(WorkerLease::new(test_db.db.clone(), me.clone(), Default::default()));
    assert_eq!(runner.tick_once().await.outcome, Outcome::Ok);
    metrics.flush().await;
    let request = tokio::time::timeout(Duration::from_secs(15), requests.recv())
        .await
        .expect("a gRPC export within 15s")
        .expect("receiver open");
    let names: Vec<&str> = request
        .resource_metrics
        .iter()
        .flat_map(|r| &r.scope_metrics)
        .flat_map(|s| &s.metrics)
        .map(|m| m.name.as_str())
        .collect();
    assert!(names.contains(&"worker.loop.ticks"), "exported: {names:?}");
    metrics.shutdown().await;
}

fn tokio_stream_from(
    listener: tokio::net::TcpListener,
) -> impl futures_util::Stream<Item = std::io::Result<tokio::net::TcpStream>> {
    futures_util::stream::unfold(listener, |listener| async move {
        let accepted = listener.accept().await.map(|(stream, _)| stream);
        Some((accepted, listener))
    })
}

#[tokio::test]
async fn without_an_endpoint_nothing_is_exported() {
    let identity = Identity { worker_id: uuid::Uuid::new_v4(), environment: "test".into() };
    let metrics = Metrics::init(&TelemetryConfig::default(), &identity, &BTreeMap::new()).expect("metrics");
    assert!(!metrics.exporting());
    metrics.meter().u64_counter("x").build().add(1, &[]);
    metrics.shutdown().await;
}
