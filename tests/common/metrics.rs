//! An in-memory meter provider for asserting on instruments (counters, gauges, histograms)
//! without an OTLP collector.

use opentelemetry::metrics::{Meter, MeterProvider as _};
use opentelemetry_sdk::metrics::data::{AggregatedMetrics, MetricData, ResourceMetrics};
use opentelemetry_sdk::metrics::{InMemoryMetricExporter, PeriodicReader, SdkMeterProvider};

pub struct MetricsProbe {
    provider: SdkMeterProvider,
    exporter: InMemoryMetricExporter,
}

/// One histogram's data point (summed over attribute sets).
#[derive(Debug, Default, Clone, Copy, PartialEq)]
pub struct HistogramPoint {
    pub count: u64,
    pub sum: u64,
    pub max: u64,
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

    async fn with_last<T>(&self, read: impl FnOnce(&ResourceMetrics) -> T) -> Option<T> {
        let provider = self.provider.clone();
        tokio::task::spawn_blocking(move || provider.force_flush()).await.expect("join").expect("flush");
        let finished = self.exporter.get_finished_metrics().expect("finished metrics");
        finished.last().map(read)
    }

    /// Cumulative value of u64 counter `name`, summed over the data points whose attributes
    /// include every `(key, value)` of `attributes`.
    pub async fn counter(&self, name: &str, attributes: &[(&str, &str)]) -> u64 {
        self.with_last(|rm| {
            let mut total = 0;
            for m in rm.scope_metrics().flat_map(|s| s.metrics()).filter(|m| m.name() == name) {
                if let AggregatedMetrics::U64(MetricData::Sum(sum)) = m.data() {
                    total += sum
                        .data_points()
                        .filter(|p| {
                            attributes.iter().all(|(k, v)| {
                                p.attributes().any(|kv| kv.key.as_str() == *k && kv.value.as_str() == *v)
                            })
                        })
                        .map(|p| p.value())
                        .sum::<u64>();
                }
            }
            total
        })
        .await
        .unwrap_or(0)
    }

    /// The value of a gauge (u64 or f64, as f64), if it was observed.
    pub async fn gauge(&self, name: &str) -> Option<f64> {
        self.with_last(|rm| {
            rm.scope_metrics().flat_map(|s| s.metrics()).filter(|m| m.name() == name).find_map(|m| {
                match m.data() {
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => {
                        g.data_points().next().map(|p| p.value() as f64)
                    }
                    AggregatedMetrics::F64(MetricData::Gauge(g)) => g.data_points().next().map(|p| p.value()),
                    _ => None,
                }
            })
        })
        .await
        .flatten()
    }

    /// Every data point of gauge `name` (u64, i64 or f64, as f64) in the last export, each with
    /// its attributes as (key, value) pairs sorted by key.
    pub async fn gauge_points(&self, name: &str) -> Vec<(Vec<(String, String)>, f64)> {
        fn attrs<'a>(kvs: impl Iterator<Item = &'a opentelemetry::KeyValue>) -> Vec<(String, String)> {
            let mut out: Vec<(String, String)> =
                kvs.map(|kv| (kv.key.as_str().to_owned(), kv.value.as_str().into_owned())).collect();
            out.sort();
            out
        }
        self.with_last(|rm| {
            let mut points = Vec::new();
            for m in rm.scope_metrics().flat_map(|s| s.metrics()).filter(|m| m.name() == name) {
                match m.data() {
                    AggregatedMetrics::U64(MetricData::Gauge(g)) => {
                        points.extend(g.data_points().map(|p| (attrs(p.attributes()), p.value() as f64)))
                    }
                    AggregatedMetrics::I64(MetricData::Gauge(g)) => {
                        points.extend(g.data_points().map(|p| (attrs(p.attributes()), p.value() as f64)))
                    }
                    AggregatedMetrics::F64(MetricData::Gauge(g)) => {
                        points.extend(g.data_points().map(|p| (attrs(p.attributes()), p.value())))
                    }
                    _ => {}
                }
            }
            points
        })
        .await
        .unwrap_or_default()
    }

    /// The value of gauge `name` at the data point whose attributes are exactly `attributes`.
    pub async fn gauge_at(&self, name: &str, attributes: &[(&str, &str)]) -> Option<f64> {
        let mut want: Vec<(String, String)> =
            attributes.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect();
        want.sort();
        self.gauge_points(name).await.into_iter().find(|(a, _)| *a == want).map(|(_, v)| v)
    }

    /// The histogram `name` (u64, or f64 with its sum and max truncated); also reports whether
    /// any point carries an attribute.
    pub async fn histogram(&self, name: &str) -> (HistogramPoint, bool) {
        self.with_last(|rm| {
            let mut point = HistogramPoint::default();
            let mut attributed = false;
            for m in rm.scope_metrics().flat_map(|s| s.metrics()).filter(|m| m.name() == name) {
                match m.data() {
                    AggregatedMetrics::U64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            point.count += p.count();
                            point.sum += p.sum();
                            point.max = point.max.max(p.max().unwrap_or(0));
                            attributed |= p.attributes().next().is_some();
                        }
                    }
                    AggregatedMetrics::F64(MetricData::Histogram(h)) => {
                        for p in h.data_points() {
                            point.count += p.count();
                            point.sum += p.sum() as u64;
                            point.max = point.max.max(p.max().unwrap_or(0.0) as u64);
                            attributed |= p.attributes().next().is_some();
                        }
                    }
                    _ => {}
                }
            }
            (point, attributed)
        })
        .await
        .unwrap_or_default()
    }
}
