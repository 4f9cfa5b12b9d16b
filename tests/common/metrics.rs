//! An in-memory meter provider for asserting on instruments without an OTLP collector.

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

pub struct MetricsProbe {
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
}

impl MetricsProbe {
    pub fn new() -> Self {
        let exporter = InMemoryMetricExporter::default();
        let reader = PeriodicReader::builder(exporter.clone()).build();
        Self { provider: SdkMeterProvider::builder().with_reader(reader).build(), exporter }
    }

    pub fn meter(&self) -> Meter {
        self.provider.meter("test")
    }

    /// The cumulative value of u64 counter `name` at the data point whose attributes include
    /// every `(key, value)` of `attributes` (summed over matching points).
    pub async fn counter(&self, name: &str, attributes: &[(&str, &str)]) -> u64 {
        let provider = self.provider.clone();
        tokio::task::spawn_blocking(move || provider.force_flush()).await.expect("join").expect("flush");
        let finished = self.exporter.get_finished_metrics().expect("finished metrics");
        let Some(last) = finished.last() else { return 0 };
        let mut total = 0;
        for metric in last.scope_metrics().flat_map(|s| s.metrics()).filter(|m| m.name() == name) {
            if let AggregatedMetrics::U64(MetricData::Sum(sum)) = metric.data() {
                for point in sum.data_points() {
                    let matches = attributes.iter().all(|(k, v)| {
                        point.attributes().any(|kv| kv.key.as_str() == *k && kv.value.as_str() == *v)
                    });
                    if matches {
                        total += point.value();
                    }
                }
            }
        }
        total
    }
}
