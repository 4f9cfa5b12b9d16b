//! Logs (tracing, pretty or JSON) and metrics (OTLP over gRPC or HTTP/protobuf).
//!
//! With no endpoint configured (neither `telemetry.otlp_endpoint` nor the standard
//! `OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT`), meters come from a no-op provider: instruments
//! still work, nothing is exported and nothing is logged. (An SDK provider with no reader would
//! log an error for every observable gauge.)
//!
//! HTTPS (http/protobuf over reqwest+rustls) and gRPC over TLS (tonic+rustls) check the collector
//! against the platform roots, or only against the CA in `OTEL_EXPORTER_OTLP_(METRICS_)CERTIFICATE`
//! (the exporter does not read that variable itself). `OTEL_EXPORTER_OTLP_(METRICS_)HEADERS`
//! (`k=v,k2=v2`, values percent-decoded) are read here from the environment given to
//! [`Metrics::init`] and sent with every export (the exporter reads the same variables too).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::time::Duration;

use axum::http::{HeaderMap, HeaderName, HeaderValue};
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Meter, MeterProvider as _, NoopMeterProvider};
use opentelemetry_otlp::tonic_types::metadata::MetadataMap;
use opentelemetry_otlp::tonic_types::transport::{Certificate, ClientTlsConfig};
use opentelemetry_otlp::{MetricExporter, WithExportConfig, WithHttpConfig, WithTonicConfig};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::metrics::{PeriodicReader, SdkMeterProvider};
use serde::{Deserialize, Serialize};
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::validate::{Violation, positive};

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// A `tracing` filter such as `info` or `worker=debug,info`; `RUST_LOG` wins when set.
    pub level: String,
    pub format: LogFormat,
}

impl Default for LogConfig {
    fn default() -> Self {
        Self { level: "info".into(), format: LogFormat::Pretty }
    }
}

#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub enum OtlpProtocol {
    #[serde(rename = "grpc")]
    Grpc,
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct TelemetryConfig {
    /// OTLP base endpoint (`http://collector:4318`, or `:4317` for grpc). Unset, and with no
    /// `OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT` either, nothing is exported and nothing is logged.
    pub otlp_endpoint: Option<String>,
    pub otlp_protocol: OtlpProtocol,
    #[serde(with = "humantime_serde")]
    pub export_interval: Duration,
    /// Used only when neither `OTEL_SERVICE_NAME` nor `OTEL_RESOURCE_ATTRIBUTES` names one.
    pub service_name: String,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            export_interval: Duration::from_secs(60),
            service_name: "worker".into(),
        }
    }
}

impl LogConfig {
    /// Keys are relative to `[log]`.
    pub fn validate(&self) -> Result<(), Violation> {
        match EnvFilter::try_new(&self.level) {
            Ok(_) => Ok(()),
            Err(error) => Err(Violation::new(
                "level",
                format!("not a tracing filter ({error}): {}", self.level),
                "a level (error|warn|info|debug|trace) or directives such as `worker=debug,info`",
            )),
        }
    }
}

impl TelemetryConfig {
    /// Keys are relative to `[telemetry]`.
    pub fn validate(&self) -> Result<(), Violation> {
        positive("export_interval", self.export_interval)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter `{filter}`: {error}")]
    Filter { filter: String, error: String },
    #[error("cannot build the OTLP metric exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("{var} `{}`: {problem}", path.display())]
    Certificate { var: &'static str, path: PathBuf, problem: String },
}

/// Bound of one export request (the OTLP default).
const EXPORT_TIMEOUT: Duration = Duration::from_secs(10);

/// Installs the global tracing subscriber. `RUST_LOG` wins over `log.level`.
pub fn init_tracing(config: &LogConfig) -> Result<(), TelemetryError> {
    let filter = match std::env::var("RUST_LOG") {
        Ok(value) if !value.is_empty() => value,
        _ => config.level.clone(),
    };
    let env_filter = EnvFilter::try_new(&filter)
        .map_err(|e| TelemetryError::Filter { filter: filter.clone(), error: e.to_string() })?;
    let registry = tracing_subscriber::registry().with(env_filter);
    // A second init (tests) is harmless: keep the first subscriber.
    let _ = match config.format {
        LogFormat::Pretty => registry.with(tracing_subscriber::fmt::layer().with_target(false)).try_init(),
        LogFormat::Json => {
            registry.with(tracing_subscriber::fmt::layer().json().flatten_event(true)).try_init()
        }
    };
    Ok(())
}

/// Facts about this process that go into the metrics resource.
#[derive(Debug, Clone)]
pub struct Identity {
    pub worker_id: uuid::Uuid,
    pub environment: String,
}

/// The meter provider; [`Metrics::shutdown`] flushes what is buffered.
pub struct Metrics {
    /// `None` when nothing is exported.
    provider: Option<SdkMeterProvider>,
}

impl Metrics {
    /// Builds the provider. `env` is the process environment (passed in for tests).
    pub fn init(
        config: &TelemetryConfig,
        identity: &Identity,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, TelemetryError> {
        let resource = resource(config, identity, env);
        let env_endpoint = ["OTEL_EXPORTER_OTLP_METRICS_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT"]
            .iter()
            .any(|k| env.get(*k).is_some_and(|v| !v.is_empty()));
        let endpoint = config.otlp_endpoint.as_deref().filter(|e| !e.is_empty());
        if endpoint.is_none() && !env_endpoint {
            return Ok(Self { provider: None });
        }
        let ca = ca_file(env)?;
        let headers = headers(env);
        let exporter = match config.otlp_protocol {
            OtlpProtocol::Grpc => {
                let tls = match &ca {
                    Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)),
                    None => ClientTlsConfig::new().with_native_roots(),
                };
                // tonic uses the TLS configuration only for https:// endpoints.
                let builder = MetricExporter::builder()
                    .with_tonic()
                    .with_tls_config(tls)
                    .with_metadata(grpc_metadata(&headers));
                match endpoint {
                    Some(e) => builder.with_endpoint(e).build()?,
                    None => builder.build()?,
                }
            }
            OtlpProtocol::HttpProtobuf => {
                let mut builder = MetricExporter::builder().with_http().with_headers(headers.clone());
                if let Some(ca) = ca {
                    builder = builder.with_http_client(http_client_trusting(ca)?);
                }
                match endpoint {
                    Some(e) => builder.with_endpoint(http_metrics_url(e)).build()?,
                    None => builder.build()?,
                }
            }
        };
        let reader = PeriodicReader::builder(exporter).with_interval(config.export_interval).build();
        let provider = SdkMeterProvider::builder().with_resource(resource).with_reader(reader).build();
        tracing::info!(
            endpoint = endpoint.unwrap_or("(from OTEL_EXPORTER_OTLP_* env)"),
            protocol = ?config.otlp_protocol,
            interval_ms = config.export_interval.as_millis() as u64,
            "exporting metrics over OTLP"
        );
        Ok(Self { provider: Some(provider) })
    }

    pub fn meter(&self) -> Meter {
        match &self.provider {
            Some(provider) => provider.meter("worker"),
            None => NoopMeterProvider::new().meter("worker"),
        }
    }

    pub fn exporting(&self) -> bool {
        self.provider.is_some()
    }

    /// Exports what is buffered now (tests, and the last export at shutdown).
    pub async fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        }
    }

    /// Flushes and stops the exporter. The SDK's shutdown blocks, so it runs off the runtime.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "metrics shutdown failed"),
            Err(error) => tracing::warn!(%error, "metrics shutdown panicked"),
        }
    }
}

/// The first of the variables naming a CA file, and the file's bytes.
struct CaFile {
    var: &'static str,
    path: PathBuf,
    pem: Vec<u8>,
}

fn ca_file(env: &BTreeMap<String, String>) -> Result<Option<CaFile>, TelemetryError> {
    let found = ["OTEL_EXPORTER_OTLP_METRICS_CERTIFICATE", "OTEL_EXPORTER_OTLP_CERTIFICATE"]
        .into_iter()
        .find_map(|var| env.get(var).filter(|v| !v.is_empty()).map(|v| (var, PathBuf::from(v))));
    let Some((var, path)) = found else { return Ok(None) };
    match std::fs::read(&path) {
        Ok(pem) => Ok(Some(CaFile { var, path, pem })),
        Err(e) => Err(TelemetryError::Certificate { var, path, problem: e.to_string() }),
    }
}

/// A blocking reqwest client that trusts only `ca`. Built on a thread of its own: the blocking
/// client owns a runtime, which must not be created or dropped inside the caller's tokio runtime.
fn http_client_trusting(ca: CaFile) -> Result<reqwest::blocking::Client, TelemetryError> {
    let CaFile { var, path, pem } = ca;
    let error = |problem: String| TelemetryError::Certificate { var, path: path.clone(), problem };
    let certs = reqwest::Certificate::from_pem_bundle(&pem).map_err(|e| error(e.to_string()))?;
    if certs.is_empty() {
        return Err(error("no PEM certificate in it".into()));
    }
    std::thread::spawn(move || {
        reqwest::blocking::Client::builder().timeout(EXPORT_TIMEOUT).tls_certs_only(certs).build()
    })
    .join()
    .map_err(|_| error("building the HTTP client panicked".into()))?
    .map_err(|e| error(e.to_string()))
}

/// `OTEL_EXPORTER_OTLP_METRICS_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS`: `k=v,k2=v2`, values
/// percent-decoded (by the exporter's `with_headers`); entries without `=` are skipped.
fn headers(env: &BTreeMap<String, String>) -> HashMap<String, String> {
    ["OTEL_EXPORTER_OTLP_METRICS_HEADERS", "OTEL_EXPORTER_OTLP_HEADERS"]
        .into_iter()
        .find_map(|var| env.get(var).filter(|v| !v.trim().is_empty()))
        .map(|list| parse_headers(list))
        .unwrap_or_default()
}

fn parse_headers(list: &str) -> HashMap<String, String> {
    list.split(',')
        .filter_map(|pair| pair.split_once('='))
        .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
        .filter(|(k, _)| !k.is_empty())
        .collect()
}

/// gRPC metadata from the header pairs, values percent-decoded (tonic's `with_metadata` does not
/// decode); a pair that is not valid metadata is skipped with a warning.
fn grpc_metadata(headers: &HashMap<String, String>) -> MetadataMap {
    let mut map = HeaderMap::new();
    for (key, value) in headers {
        let decoded = percent_encoding::percent_decode_str(value).decode_utf8_lossy();
        match (HeaderName::try_from(key.as_str()), HeaderValue::try_from(decoded.as_ref())) {
            (Ok(key), Ok(value)) => {
                map.insert(key, value);
            }
            _ => tracing::warn!(header = %key, "skipping an OTLP header that is not valid gRPC metadata"),
        }
    }
    MetadataMap::from_headers(map)
}

/// The configured base endpoint gets the standard `/v1/metrics` path unless it has a path.
fn http_metrics_url(endpoint: &str) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    match url::Url::parse(trimmed) {
        Ok(url) if url.path() == "/" || url.path().is_empty() => format!("{trimmed}/v1/metrics"),
        _ => trimmed.to_owned(),
    }
}

fn resource(config: &TelemetryConfig, identity: &Identity, env: &BTreeMap<String, String>) -> Resource {
    let mut builder = Resource::builder();
    // with_service_name overrides OTEL_SERVICE_NAME / OTEL_RESOURCE_ATTRIBUTES: only default it.
    let named_by_env = env.get("OTEL_SERVICE_NAME").is_some_and(|v| !v.is_empty())
        || env.get("OTEL_RESOURCE_ATTRIBUTES").is_some_and(|v| v.contains("service.name="));
    if !named_by_env {
        builder = builder.with_service_name(config.service_name.clone());
    }
    let mut attributes = vec![
        KeyValue::new("service.instance.id", identity.worker_id.to_string()),
        KeyValue::new("service.version", crate::identity::VERSION),
        // OpenTelemetry's semantic convention for the commit a service was built from.
        KeyValue::new("vcs.ref.head.revision", crate::identity::COMMIT),
        KeyValue::new("deployment.environment.name", identity.environment.clone()),
    ];
    for (var, key) in [("FLY_APP_NAME", "fly.app.name"), ("FLY_MACHINE_ID", "fly.machine.id")] {
        if let Some(value) = env.get(var).filter(|v| !v.is_empty()) {
            attributes.push(KeyValue::new(key, value.clone()));
        }
    }
    builder.with_attributes(attributes).build()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_endpoint_gets_the_metrics_path_only_when_it_has_none() {
        assert_eq!(http_metrics_url("http://c:4318"), "http://c:4318/v1/metrics");
        assert_eq!(http_metrics_url("http://c:4318/"), "http://c:4318/v1/metrics");
        assert_eq!(http_metrics_url("http://c:4318/custom"), "http://c:4318/custom");
    }

    #[test]
    fn headers_are_comma_separated_pairs_and_the_metrics_variable_wins() {
        let parsed = parse_headers(" x-api-key = s%3Dcret ,broken, a=b=c,=v");
        assert_eq!(parsed.len(), 2, "{parsed:?}");
        assert_eq!(parsed["x-api-key"], "s%3Dcret", "percent-decoding is left to with_headers");
        assert_eq!(parsed["a"], "b=c");
        let mut env = BTreeMap::new();
        env.insert("OTEL_EXPORTER_OTLP_HEADERS".to_owned(), "k=general".to_owned());
        assert_eq!(headers(&env)["k"], "general");
        env.insert("OTEL_EXPORTER_OTLP_METRICS_HEADERS".to_owned(), "k=metrics".to_owned());
        assert_eq!(headers(&env)["k"], "metrics");
    }

    #[test]
    fn an_unreadable_certificate_file_names_the_variable() {
        let mut env = BTreeMap::new();
        env.insert("OTEL_EXPORTER_OTLP_CERTIFICATE".to_owned(), "/nonexistent/ca.pem".to_owned());
        let Err(error) = ca_file(&env) else { panic!("unreadable file accepted") };
        let text = error.to_string();
        assert!(
            text.contains("OTEL_EXPORTER_OTLP_CERTIFICATE") && text.contains("/nonexistent/ca.pem"),
            "{text}"
        );
    }

    fn attr(resource: &Resource, key: &'static str) -> Option<String> {
        resource.get(&opentelemetry::Key::from_static_str(key)).map(|v| v.to_string())
    }

    #[test]
    fn resource_names_the_service_and_instance_but_lets_env_override_the_name() {
        let identity = Identity { worker_id: uuid::Uuid::nil(), environment: "test".into() };
        let mut env = BTreeMap::new();
        env.insert("FLY_APP_NAME".to_owned(), "app".to_owned());
        let r = resource(&TelemetryConfig::default(), &identity, &env);
        assert_eq!(attr(&r, "service.instance.id").as_deref(), Some(uuid::Uuid::nil().to_string().as_str()));
        assert_eq!(attr(&r, "deployment.environment.name").as_deref(), Some("test"));
        assert_eq!(attr(&r, "fly.app.name").as_deref(), Some("app"));
        assert!(attr(&r, "fly.machine.id").is_none());
        assert_eq!(attr(&r, "service.name").as_deref(), Some("worker"));
        // Named by the environment: our default must not be applied (the SDK reads the name).
        env.insert("OTEL_SERVICE_NAME".to_owned(), "from-env".to_owned());
        let r = resource(&TelemetryConfig::default(), &identity, &env);
        assert_ne!(attr(&r, "service.name").as_deref(), Some("worker"));
    }
}
