//! Logs (tracing, pretty or JSON), metrics and traces (OTLP over gRPC or HTTP/protobuf).
//!
//! With no endpoint configured (neither `telemetry.otlp_endpoint` nor the standard
//! `OTEL_EXPORTER_OTLP_(METRICS_)ENDPOINT`), meters come from a no-op provider: instruments
//! still work, nothing is exported and nothing is logged. (An SDK provider with no reader would
//! log an error for every observable gauge.) Traces are exported only with `telemetry.traces =
//! true` ([`traces`]), to the same endpoint settings.
//!
//! HTTPS (http/protobuf over reqwest+rustls) and gRPC over TLS (tonic+rustls) check the collector
//! against the platform roots, or only against the CA in `OTEL_EXPORTER_OTLP_(METRICS_|TRACES_)
//! CERTIFICATE` (the exporter does not read that variable itself).
//! `OTEL_EXPORTER_OTLP_(METRICS_|TRACES_)HEADERS` (`k=v,k2=v2`, values percent-decoded) are read
//! here from the environment given to [`Metrics::init`] and sent with every export (the exporter
//! reads the same variables too).

pub mod traces;

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

use crate::validate::{Violation, check, positive};

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

/// A tick every second per loop adds up: one in ten is plenty to see where time goes.
pub const DEFAULT_TRACE_SAMPLE_RATIO: f64 = 0.1;

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
    /// Export spans (a tick, a chat turn, a GitHub request, an outbox sweep) over OTLP, to the
    /// same endpoint settings as metrics (docs/traces.md).
    pub traces: bool,
    /// The share of root spans (ticks) sampled, 0.0..=1.0; the spans under them follow their
    /// parent's decision.
    pub trace_sample_ratio: f64,
}

impl Default for TelemetryConfig {
    fn default() -> Self {
        Self {
            otlp_endpoint: None,
            otlp_protocol: OtlpProtocol::HttpProtobuf,
            export_interval: Duration::from_secs(60),
            service_name: "worker".into(),
            traces: false,
            trace_sample_ratio: DEFAULT_TRACE_SAMPLE_RATIO,
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
        positive("export_interval", self.export_interval)?;
        check(
            (0.0..=1.0).contains(&self.trace_sample_ratio),
            "trace_sample_ratio",
            self.trace_sample_ratio,
            "a share between 0.0 and 1.0 (1.0 samples every tick)",
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TelemetryError {
    #[error("invalid log filter `{filter}`: {error}")]
    Filter { filter: String, error: String },
    #[error("cannot build the OTLP metric exporter: {0}")]
    Exporter(#[from] opentelemetry_otlp::ExporterBuildError),
    #[error("cannot build the OTLP span exporter: {0}")]
    SpanExporter(opentelemetry_otlp::ExporterBuildError),
    #[error(
        "telemetry.traces is true but no endpoint is set: set telemetry.otlp_endpoint or \
         OTEL_EXPORTER_OTLP_TRACES_ENDPOINT / OTEL_EXPORTER_OTLP_ENDPOINT"
    )]
    NoTraceEndpoint,
    #[error("{var} `{}`: {problem}", path.display())]
    Certificate { var: String, path: PathBuf, problem: String },
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
        let Some(export) = Export::resolve(config, Signal::Metrics, env)? else {
            return Ok(Self { provider: None });
        };
        let exporter = match config.otlp_protocol {
            OtlpProtocol::Grpc => export.tonic(MetricExporter::builder().with_tonic()).build()?,
            OtlpProtocol::HttpProtobuf => export.http(MetricExporter::builder().with_http())?.build()?,
        };
        let reader = PeriodicReader::builder(exporter).with_interval(config.export_interval).build();
        let resource = resource(config, identity, env);
        let provider = SdkMeterProvider::builder().with_resource(resource).with_reader(reader).build();
        tracing::info!(
            endpoint = export.endpoint_text(),
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

/// What is exported: each has its own `OTEL_EXPORTER_OTLP_{SIGNAL}_*` variables (which win over
/// the general ones) and its own path under an HTTP base endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Signal {
    Metrics,
    Traces,
}

impl Signal {
    /// The signal's own variable, then the general one.
    fn vars(self, what: &str) -> [String; 2] {
        let signal = match self {
            Signal::Metrics => "METRICS",
            Signal::Traces => "TRACES",
        };
        [format!("OTEL_EXPORTER_OTLP_{signal}_{what}"), format!("OTEL_EXPORTER_OTLP_{what}")]
    }

    /// The first of [`Signal::vars`] set to something non-blank, and its value.
    fn env<'e>(self, what: &str, env: &'e BTreeMap<String, String>) -> Option<(String, &'e str)> {
        self.vars(what)
            .into_iter()
            .find_map(|var| env.get(&var).filter(|v| !v.trim().is_empty()).map(|v| (var, v.as_str())))
    }

    fn http_path(self) -> &'static str {
        match self {
            Signal::Metrics => "/v1/metrics",
            Signal::Traces => "/v1/traces",
        }
    }
}

/// Where and how one signal is exported: shared by the metric and the span exporter.
struct Export {
    signal: Signal,
    /// `telemetry.otlp_endpoint`; `None` leaves it to the exporter's `OTEL_EXPORTER_OTLP_*`.
    endpoint: Option<String>,
    ca: Option<CaFile>,
    headers: HashMap<String, String>,
}

impl Export {
    /// `None` when no endpoint is configured for `signal`, in the config or the environment.
    fn resolve(
        config: &TelemetryConfig,
        signal: Signal,
        env: &BTreeMap<String, String>,
    ) -> Result<Option<Self>, TelemetryError> {
        let endpoint = config.otlp_endpoint.clone().filter(|e| !e.is_empty());
        if endpoint.is_none() && signal.env("ENDPOINT", env).is_none() {
            return Ok(None);
        }
        Ok(Some(Self { signal, endpoint, ca: ca_file(signal, env)?, headers: headers(signal, env) }))
    }

    fn endpoint_text(&self) -> &str {
        self.endpoint.as_deref().unwrap_or("(from OTEL_EXPORTER_OTLP_* env)")
    }

    /// gRPC: TLS against the CA file or the platform roots, the headers as metadata. tonic uses
    /// the TLS configuration only for https:// endpoints.
    fn tonic<B: WithTonicConfig + WithExportConfig>(&self, builder: B) -> B {
        let tls = match &self.ca {
            Some(ca) => ClientTlsConfig::new().ca_certificate(Certificate::from_pem(&ca.pem)),
            None => ClientTlsConfig::new().with_native_roots(),
        };
        let builder = builder.with_tls_config(tls).with_metadata(grpc_metadata(&self.headers));
        match &self.endpoint {
            Some(e) => builder.with_endpoint(e.clone()),
            None => builder,
        }
    }

    /// HTTP/protobuf: the headers, a client trusting only the CA file when there is one, and the
    /// signal's path under a base endpoint.
    fn http<B: WithHttpConfig + WithExportConfig>(&self, builder: B) -> Result<B, TelemetryError> {
        let mut builder = builder.with_headers(self.headers.clone());
        if let Some(ca) = &self.ca {
            builder = builder.with_http_client(http_client_trusting(ca)?);
        }
        Ok(match &self.endpoint {
            Some(e) => builder.with_endpoint(http_signal_url(e, self.signal)),
            None => builder,
        })
    }
}

/// The first of the variables naming a CA file, and the file's bytes.
struct CaFile {
    var: String,
    path: PathBuf,
    pem: Vec<u8>,
}

fn ca_file(signal: Signal, env: &BTreeMap<String, String>) -> Result<Option<CaFile>, TelemetryError> {
    let Some((var, path)) = signal.env("CERTIFICATE", env) else { return Ok(None) };
    let path = PathBuf::from(path);
    match std::fs::read(&path) {
        Ok(pem) => Ok(Some(CaFile { var, path, pem })),
        Err(e) => Err(TelemetryError::Certificate { var, path, problem: e.to_string() }),
    }
}

/// A blocking reqwest client that trusts only `ca`. Built on a thread of its own: the blocking
/// client owns a runtime, which must not be created or dropped inside the caller's tokio runtime.
fn http_client_trusting(ca: &CaFile) -> Result<reqwest::blocking::Client, TelemetryError> {
    let CaFile { var, path, pem } = ca;
    let error =
        |problem: String| TelemetryError::Certificate { var: var.clone(), path: path.clone(), problem };
    let certs = reqwest::Certificate::from_pem_bundle(pem).map_err(|e| error(e.to_string()))?;
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

/// `OTEL_EXPORTER_OTLP_{SIGNAL}_HEADERS`, else `OTEL_EXPORTER_OTLP_HEADERS`: `k=v,k2=v2`, values
/// percent-decoded (by the exporter's `with_headers`); entries without `=` are skipped.
fn headers(signal: Signal, env: &BTreeMap<String, String>) -> HashMap<String, String> {
    signal.env("HEADERS", env).map(|(_, list)| parse_headers(list)).unwrap_or_default()
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

/// The configured base endpoint gets the signal's standard path (`/v1/metrics`, `/v1/traces`)
/// unless it has a path.
fn http_signal_url(endpoint: &str, signal: Signal) -> String {
    let trimmed = endpoint.trim_end_matches('/');
    match url::Url::parse(trimmed) {
        Ok(url) if url.path() == "/" || url.path().is_empty() => format!("{trimmed}{}", signal.http_path()),
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
    fn http_endpoint_gets_the_signal_path_only_when_it_has_none() {
        assert_eq!(http_signal_url("http://c:4318", Signal::Metrics), "http://c:4318/v1/metrics");
        assert_eq!(http_signal_url("http://c:4318/", Signal::Metrics), "http://c:4318/v1/metrics");
        assert_eq!(http_signal_url("http://c:4318/", Signal::Traces), "http://c:4318/v1/traces");
        assert_eq!(http_signal_url("http://c:4318/custom", Signal::Traces), "http://c:4318/custom");
    }

    #[test]
    fn headers_are_comma_separated_pairs_and_the_signal_variable_wins() {
        let parsed = parse_headers(" x-api-key = s%3Dcret ,broken, a=b=c,=v");
        assert_eq!(parsed.len(), 2, "{parsed:?}");
        assert_eq!(parsed["x-api-key"], "s%3Dcret", "percent-decoding is left to with_headers");
        assert_eq!(parsed["a"], "b=c");
        let mut env = BTreeMap::new();
        env.insert("OTEL_EXPORTER_OTLP_HEADERS".to_owned(), "k=general".to_owned());
        assert_eq!(headers(Signal::Metrics, &env)["k"], "general");
        env.insert("OTEL_EXPORTER_OTLP_METRICS_HEADERS".to_owned(), "k=metrics".to_owned());
        assert_eq!(headers(Signal::Metrics, &env)["k"], "metrics");
        assert_eq!(headers(Signal::Traces, &env)["k"], "general", "the metrics variable is not the traces'");
    }

    #[test]
    fn an_unreadable_certificate_file_names_the_variable() {
        let mut env = BTreeMap::new();
        env.insert("OTEL_EXPORTER_OTLP_CERTIFICATE".to_owned(), "/nonexistent/ca.pem".to_owned());
        let Err(error) = ca_file(Signal::Traces, &env) else { panic!("unreadable file accepted") };
        let text = error.to_string();
        assert!(
            text.contains("OTEL_EXPORTER_OTLP_CERTIFICATE") && text.contains("/nonexistent/ca.pem"),
            "{text}"
        );
    }

    #[test]
    fn a_sample_ratio_outside_zero_to_one_is_refused_by_its_key() {
        for ratio in [-0.1, 1.5, f64::NAN] {
            let config = TelemetryConfig { trace_sample_ratio: ratio, ..TelemetryConfig::default() };
            let error = config.validate().expect_err("refused");
            assert_eq!(error.key, "trace_sample_ratio", "{error:?}");
        }
        for ratio in [0.0, DEFAULT_TRACE_SAMPLE_RATIO, 1.0] {
            let config = TelemetryConfig { trace_sample_ratio: ratio, ..TelemetryConfig::default() };
            assert!(config.validate().is_ok(), "{ratio}");
        }
    }

    #[test]
    fn traces_asked_for_with_nowhere_to_send_them_are_an_error_naming_the_keys() {
        let identity = Identity { worker_id: uuid::Uuid::nil(), environment: "test".into() };
        let config = TelemetryConfig { traces: true, ..TelemetryConfig::default() };
        let Err(error) = traces::Traces::init(&config, &identity, &BTreeMap::new()) else {
            panic!("traces without an endpoint accepted")
        };
        let text = error.to_string();
        assert!(text.contains("telemetry.traces") && text.contains("telemetry.otlp_endpoint"), "{text}");
        // Off, nothing is needed and nothing is installed.
        let off = traces::Traces::init(&TelemetryConfig::default(), &identity, &BTreeMap::new());
        assert!(off.is_ok() && !traces::enabled());
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
