//! Traces (`telemetry.traces = true`; docs/traces.md): a span per tick, per chat turn, per GitHub
//! request and per outbox sweep, exported over OTLP with the metrics' endpoint settings.
//!
//! The provider is OpenTelemetry's global one, as for any instrumented library: the runtime, the
//! chat runner, the GitHub client and the sweeper start their spans from the context of the code
//! that calls them ([`Context::current`], which the runner sets for the whole tick). With traces
//! off nothing is installed and [`enabled`] is false, so the code that builds spans skips it
//! altogether: a tick then costs no allocation for tracing.
//!
//! The W3C `traceparent` crosses two boundaries: out to the agent (its `TRACEPARENT`
//! environment variable, so an agent that traces joins the turn) and in from `enqueue_task`
//! (the sweep's span links to the producer's span).

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, Ordering};

use opentelemetry::global::{self, BoxedTracer};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{SpanBuilder, SpanContext, TraceContextExt, Tracer};
use opentelemetry::{Context, KeyValue};
use opentelemetry_otlp::SpanExporter;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::{Sampler, SdkTracerProvider};

use super::{Export, Identity, OtlpProtocol, Signal, TelemetryConfig, TelemetryError, resource};

/// Whether a tracer provider is installed (spans are worth building).
static ENABLED: AtomicBool = AtomicBool::new(false);

/// The instrumentation scope of every span.
const SCOPE: &str = "worker";

/// The installed tracer provider; [`Traces::shutdown`] exports what is buffered.
pub struct Traces {
    /// `None` when traces are off.
    provider: Option<SdkTracerProvider>,
}

impl Traces {
    /// With `telemetry.traces`, builds the exporter and installs the global provider. An endpoint
    /// must be configured (here or in the environment): asking for traces that go nowhere is a
    /// configuration error, not a silent no-op.
    pub fn init(
        config: &TelemetryConfig,
        identity: &Identity,
        env: &BTreeMap<String, String>,
    ) -> Result<Self, TelemetryError> {
        if !config.traces {
            return Ok(Self { provider: None });
        }
        let export = Export::resolve(config, Signal::Traces, env)?.ok_or(TelemetryError::NoTraceEndpoint)?;
        let exporter = match config.otlp_protocol {
            OtlpProtocol::Grpc => export.tonic(SpanExporter::builder().with_tonic()).build(),
            OtlpProtocol::HttpProtobuf => export.http(SpanExporter::builder().with_http())?.build(),
        }
        .map_err(TelemetryError::SpanExporter)?;
        let sampler = Sampler::ParentBased(Box::new(Sampler::TraceIdRatioBased(config.trace_sample_ratio)));
        let provider = SdkTracerProvider::builder()
            .with_resource(resource(config, identity, env))
            .with_sampler(sampler)
            .with_batch_exporter(exporter)
            .build();
        global::set_tracer_provider(provider.clone());
        ENABLED.store(true, Ordering::Release);
        tracing::info!(
            endpoint = export.endpoint_text(),
            protocol = ?config.otlp_protocol,
            sample_ratio = config.trace_sample_ratio,
            "exporting traces over OTLP"
        );
        Ok(Self { provider: Some(provider) })
    }

    /// Exports what is buffered now (tests).
    pub async fn flush(&self) {
        if let Some(provider) = self.provider.clone() {
            let _ = tokio::task::spawn_blocking(move || provider.force_flush()).await;
        }
    }

    /// Exports what is buffered and stops the exporter. The SDK's shutdown blocks, so it runs
    /// off the runtime.
    pub async fn shutdown(self) {
        let Some(provider) = self.provider else { return };
        ENABLED.store(false, Ordering::Release);
        match tokio::task::spawn_blocking(move || provider.shutdown()).await {
            Ok(Ok(())) => {}
            Ok(Err(error)) => tracing::warn!(%error, "traces shutdown failed"),
            Err(error) => tracing::warn!(%error, "traces shutdown panicked"),
        }
    }
}

/// Whether spans are exported at all; code that builds spans checks this first.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Acquire)
}

/// The tracer every span of this crate comes from.
pub fn tracer() -> BoxedTracer {
    global::tracer(SCOPE)
}

/// A context holding a new span `name`, a child of `parent`; `None` with traces off. The span
/// ends when the caller ends it (`cx.span().end()`) or when the last context holding it drops.
pub fn start_span(parent: &Context, builder: SpanBuilder) -> Option<Context> {
    enabled().then(|| {
        let span = tracer().build_with_context(builder, parent);
        parent.with_span(span)
    })
}

/// Sets attributes on the span of `cx` (nothing if there is none).
pub fn set_attributes(cx: Option<&Context>, attributes: impl IntoIterator<Item = KeyValue>) {
    if let Some(cx) = cx {
        cx.span().set_attributes(attributes);
    }
}

/// The W3C `traceparent` of the span in `cx`, if it holds a valid one.
pub fn traceparent(cx: &Context) -> Option<String> {
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(cx, &mut carrier);
    carrier.remove("traceparent")
}

/// The span a W3C `traceparent` names, if it is a valid one.
pub fn remote_span(traceparent: &str) -> Option<SpanContext> {
    let carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    let span = cx.span().span_context().clone();
    span.is_valid().then_some(span)
}

#[cfg(test)]
mod tests {
    use opentelemetry::trace::{SpanId, TraceFlags, TraceId, TraceState};

    use super::*;

    #[test]
    fn a_traceparent_round_trips_and_nonsense_is_no_span() {
        let span = SpanContext::new(
            TraceId::from_hex("4bf92f3577b34da6a3ce929d0e0e4736").unwrap(),
            SpanId::from_hex("00f067aa0ba902b7").unwrap(),
            TraceFlags::SAMPLED,
            true,
            TraceState::default(),
        );
        let cx = Context::new().with_remote_span_context(span.clone());
        let text = traceparent(&cx).expect("a valid span has a traceparent");
        assert_eq!(text, "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01");
        let back = remote_span(&text).expect("parses back");
        assert_eq!((back.trace_id(), back.span_id()), (span.trace_id(), span.span_id()));
        for bad in ["", "00-0-0-01", "00-00000000000000000000000000000000-00f067aa0ba902b7-01", "garbage"] {
            assert!(remote_span(bad).is_none(), "{bad:?}");
        }
        assert!(traceparent(&Context::new()).is_none(), "no span, no traceparent");
    }
}
