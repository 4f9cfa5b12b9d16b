//! `deploy/grafana/worker-overview.json` queries only metrics the code registers, under the
//! Prometheus names an OTLP→Prometheus pipeline gives them (see `deploy/grafana/README.md`), and
//! every registered metric has a panel. The registered names come from scanning `src/` for the
//! OpenTelemetry instrument builders, so the test follows the code.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde_json::Value;

const DASHBOARD: &str = "deploy/grafana/worker-overview.json";

/// How Prometheus renders an instrument: counters get `_total`, histograms
/// `_bucket`/`_sum`/`_count`, gauges and up-down counters nothing.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Instrument builder methods on `opentelemetry::metrics::Meter`, with how Prometheus renders
/// each. Up-down counters are non-monotonic sums, which become gauges.
const BUILDERS: &[(&str, Kind)] = &[
    ("u64_counter", Kind::Counter),
    ("f64_counter", Kind::Counter),
    ("u64_observable_counter", Kind::Counter),
    ("f64_observable_counter", Kind::Counter),
    ("i64_up_down_counter", Kind::Gauge),
    ("f64_up_down_counter", Kind::Gauge),
    ("i64_observable_up_down_counter", Kind::Gauge),
    ("f64_observable_up_down_counter", Kind::Gauge),
    ("u64_gauge", Kind::Gauge),
    ("i64_gauge", Kind::Gauge),
    ("f64_gauge", Kind::Gauge),
    ("u64_observable_gauge", Kind::Gauge),
    ("i64_observable_gauge", Kind::Gauge),
    ("f64_observable_gauge", Kind::Gauge),
    ("u64_histogram", Kind::Histogram),
    ("f64_histogram", Kind::Histogram),
];

#[derive(Debug)]
struct Instrument {
    name: String,
    kind: Kind,
    unit: Option<String>,
}

impl Instrument {
    /// The series names Prometheus stores for this instrument.
    fn prometheus_names(&self) -> Vec<String> {
        let mut base = self.name.replace('.', "_");
        if let Some(unit) = &self.unit {
            base.push('_');
            base.push_str(unit_suffix(unit));
        }
        match self.kind {
            Kind::Counter => vec![format!("{base}_total")],
            Kind::Gauge => vec![base],
            Kind::Histogram => ["bucket", "sum", "count"].iter().map(|s| format!("{base}_{s}")).collect(),
        }
    }
}

/// The suffix the OTLP→Prometheus translation appends for a UCUM unit. A unit not listed here
/// fails the test rather than being guessed: add it with the suffix the pipeline produces.
fn unit_suffix(unit: &str) -> &'static str {
    match unit {
        "s" => "seconds",
        "ms" => "milliseconds",
        "By" => "bytes",
        other => panic!("unit {other:?} has no known Prometheus suffix; add it to unit_suffix"),
    }
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("read src dir") {
        let path = entry.expect("dir entry").path();
        if path.is_dir() {
            rust_files(&path, out);
        } else if path.extension().is_some_and(|e| e == "rs") {
            out.push(path);
        }
    }
}

/// The string literal at the start of `s` (after whitespace), if any.
fn leading_literal(s: &str) -> Option<&str> {
    let rest = s.trim_start().strip_prefix('"')?;
    rest.find('"').map(|end| &rest[..end])
}

fn is_metric_name(s: &str) -> bool {
    s.contains('.')
        && s.split('.').all(|part| {
            !part.is_empty() && part.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        })
}

/// Names registered through a variable (`meter.u64_observable_gauge(name)` in a loop over a table)
/// come from the table: tuples whose first element is a dotted metric-name literal.
fn table_names(source: &str) -> Vec<String> {
    source
        .match_indices("(\"")
        .filter_map(|(at, _)| leading_literal(&source[at + 1..]))
        .filter(|name| is_metric_name(name))
        .map(str::to_owned)
        .collect()
}

/// Every instrument a source file registers.
fn instruments_in(path: &Path, source: &str) -> Vec<Instrument> {
    let mut found = Vec::new();
    for (builder, kind) in BUILDERS {
        let call = format!(".{builder}(");
        for (at, _) in source.match_indices(&call) {
            let args = &source[at + call.len()..];
            let chain = &args[..args.find(".build()").unwrap_or(args.len())];
            let unit =
                chain.find(".with_unit(").and_then(|u| leading_literal(&chain[u + ".with_unit(".len()..]));
            let unit = unit.map(str::to_owned);
            let names = match leading_literal(args) {
                Some(name) => vec![name.to_owned()],
                None => {
                    let names = table_names(source);
                    assert!(
                        !names.is_empty(),
                        "{}: `{call}` with a non-literal name and no (\"metric.name\", …) table; \
                         teach tests/dashboard.rs how this registration names its metric",
                        path.display()
                    );
                    names
                }
            };
            found.extend(names.into_iter().map(|name| Instrument { name, kind: *kind, unit: unit.clone() }));
        }
    }
    found
}

fn registered() -> Vec<Instrument> {
    let mut files = Vec::new();
    rust_files(&Path::new(env!("CARGO_MANIFEST_DIR")).join("src"), &mut files);
    files.sort();
    let mut all: Vec<Instrument> = Vec::new();
    for path in files {
        let source = std::fs::read_to_string(&path).expect("read source");
        for instrument in instruments_in(&path, &source) {
            if !all.iter().any(|i| i.name == instrument.name) {
                all.push(instrument);
            }
        }
    }
    all
}

/// Prometheus series name → the OTel instrument it comes from.
fn prometheus_index(instruments: &[Instrument]) -> BTreeMap<String, String> {
    instruments
        .iter()
        .flat_map(|i| i.prometheus_names().into_iter().map(move |p| (p, i.name.clone())))
        .collect()
}

/// PromQL words that are never metric names.
const KEYWORDS: &[&str] = &[
    "by",
    "without",
    "on",
    "ignoring",
    "group_left",
    "group_right",
    "offset",
    "bool",
    "and",
    "or",
    "unless",
];
/// Aggregations may be followed by `by (…)` / `without (…)` before their parenthesis.
const AGGREGATIONS: &[&str] = &[
    "sum",
    "min",
    "max",
    "avg",
    "group",
    "stddev",
    "stdvar",
    "count",
    "count_values",
    "bottomk",
    "topk",
    "quantile",
    "limitk",
    "limit_ratio",
];
/// Keywords followed by a parenthesised list of label names.
const LABEL_LISTS: &[&str] = &["by", "without", "on", "ignoring", "group_left", "group_right"];

/// Skips from an opening delimiter at `chars[i]` to just past its match, stepping over quoted
/// strings (label values may contain brackets).
fn skip_group(chars: &[char], mut i: usize, open: char, close: char) -> usize {
    let mut depth = 0;
    while i < chars.len() {
        match chars[i] {
            '"' | '\'' | '`' => i = skip_string(chars, i),
            c if c == open => {
                depth += 1;
                i += 1;
            }
            c if c == close => {
                depth -= 1;
                i += 1;
                if depth == 0 {
                    return i;
                }
            }
            _ => i += 1,
        }
    }
    i
}

fn skip_string(chars: &[char], i: usize) -> usize {
    let quote = chars[i];
    let mut j = i + 1;
    while j < chars.len() && chars[j] != quote {
        j += if chars[j] == '\\' { 2 } else { 1 };
    }
    j + 1
}

/// The metric names a PromQL expression selects: identifiers outside label matchers, ranges,
/// strings and label lists that are neither functions (followed by `(`), aggregations nor
/// keywords. Grafana variables (`$x`, `${x}`) are skipped. A `__name__` matcher is an error: it
/// would select metrics this check cannot see.
fn metric_names(expr: &str) -> Result<BTreeSet<String>, String> {
    if expr.contains("__name__") {
        return Err(format!("`__name__` matchers hide the metric name: {expr}"));
    }
    let chars: Vec<char> = expr.chars().collect();
    let mut names = BTreeSet::new();
    let mut i = 0;
    while i < chars.len() {
        let c = chars[i];
        match c {
            '"' | '\'' | '`' => i = skip_string(&chars, i),
            '{' => i = skip_group(&chars, i, '{', '}'),
            '[' => i = skip_group(&chars, i, '[', ']'),
            '$' if chars.get(i + 1) == Some(&'{') => i = skip_group(&chars, i + 1, '{', '}'),
            '$' => {
                i += 1;
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '_') {
                    i += 1;
                }
            }
            c if c.is_ascii_digit() || c == '.' => {
                while i < chars.len() && (chars[i].is_ascii_alphanumeric() || chars[i] == '.') {
                    i += 1;
                }
            }
            c if c.is_ascii_alphabetic() || c == '_' || c == ':' => {
                let start = i;
                while i < chars.len()
                    && (chars[i].is_ascii_alphanumeric() || chars[i] == '_' || chars[i] == ':')
                {
                    i += 1;
                }
                let word: String = chars[start..i].iter().collect();
                let mut next = i;
                while next < chars.len() && chars[next].is_whitespace() {
                    next += 1;
                }
                let paren_follows = chars.get(next) == Some(&'(');
                if LABEL_LISTS.contains(&word.as_str()) && paren_follows {
                    i = skip_group(&chars, next, '(', ')');
                } else if !(paren_follows
                    || KEYWORDS.contains(&word.as_str())
                    || AGGREGATIONS.contains(&word.as_str()))
                {
                    names.insert(word);
                }
            }
            _ => i += 1,
        }
    }
    Ok(names)
}

/// Every metric `exprs` reference that is not a series of a registered instrument.
fn unknown_metrics<'a>(
    exprs: impl IntoIterator<Item = &'a str>,
    known: &BTreeMap<String, String>,
) -> Vec<String> {
    let mut unknown = Vec::new();
    for expr in exprs {
        match metric_names(expr) {
            Ok(names) => unknown.extend(
                names.into_iter().filter(|n| !known.contains_key(n)).map(|n| format!("{n} in {expr}")),
            ),
            Err(e) => unknown.push(e),
        }
    }
    unknown
}

fn dashboard() -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join(DASHBOARD);
    let text = std::fs::read_to_string(&path).expect("read dashboard");
    serde_json::from_str(&text).expect("dashboard is valid JSON")
}

/// Panels, with the panels nested in collapsed rows.
fn panels(dashboard: &Value) -> Vec<&Value> {
    fn walk<'a>(list: &'a Value, out: &mut Vec<&'a Value>) {
        for panel in list.as_array().into_iter().flatten() {
            out.push(panel);
            walk(&panel["panels"], out);
        }
    }
    let mut out = Vec::new();
    walk(&dashboard["panels"], &mut out);
    out
}

fn is_row(panel: &Value) -> bool {
    panel["type"] == "row"
}

/// The PromQL of every panel target and of every templating query (`label_values(selector,
/// label)` contributes its selector).
fn exprs(dashboard: &Value) -> Vec<String> {
    let mut out: Vec<String> = panels(dashboard)
        .into_iter()
        .flat_map(|p| p["targets"].as_array().into_iter().flatten())
        .filter_map(|t| t["expr"].as_str().map(str::to_owned))
        .collect();
    for var in dashboard["templating"]["list"].as_array().into_iter().flatten() {
        let query = match &var["query"] {
            Value::String(q) if var["type"] == "query" => q.as_str(),
            Value::Object(q) => q.get("query").and_then(Value::as_str).unwrap_or_default(),
            _ => continue,
        };
        let query = match query.strip_prefix("label_values(").and_then(|q| q.strip_suffix(')')) {
            Some(args) => args.rsplit_once(',').map_or(args, |(selector, _label)| selector),
            None => query,
        };
        out.push(query.to_owned());
    }
    out
}

#[test]
fn the_source_scan_finds_the_instruments_the_code_registers() {
    let index = prometheus_index(&registered());
    for series in [
        "worker_loop_ticks_total",
        "worker_loop_tick_duration_seconds_bucket",
        "worker_db_pool_waiting",
        "outbox_backlog_oldest_due_age_seconds",
        "gitsync_http_requests_total",
        "counters_skew_count",
        "prebuilds_cycle_presets",
        // The operator metrics, under the names alert rules use.
        "worker_ready",
        "workers_lease_age_at_renewal_seconds_bucket",
        "outbox_queue_backlog",
        "outbox_queue_oldest_due_age_seconds",
        "gitsync_due",
        "gitsync_due_oldest_age_seconds",
        "gitsync_rate_limit_remaining",
        "gitsync_rate_limit_reset_seconds",
        "prebuilds_presets",
    ] {
        assert!(index.contains_key(series), "{series} missing from {:?}", index.keys());
    }
}

#[test]
fn the_expression_tokenizer_finds_metric_names_and_nothing_else() {
    let expr = r#"histogram_quantile(0.95, sum by (le, loop) (rate(a_b_bucket{loop=~"x|y", e="{[q]}"}[$__rate_interval])))
        / on (loop) group_left max without (instance) (c_d offset 5m) + sum(rate(e_total[${win}])) > bool 1e3"#;
    let names: Vec<String> = metric_names(expr).expect("tokenizes").into_iter().collect();
    assert_eq!(names, ["a_b_bucket", "c_d", "e_total"]);
    assert!(metric_names(r#"{__name__=~"worker_.*"}"#).is_err());
}

#[test]
fn a_query_for_a_metric_the_code_does_not_register_is_rejected() {
    let index = prometheus_index(&registered());
    let good = "sum(rate(worker_loop_ticks_total[5m]))";
    assert!(unknown_metrics([good], &index).is_empty());
    let bad = r#"sum by (loop) (rate(worker_bogus_total{loop="outbox"}[5m]))"#;
    let unknown = unknown_metrics([good, bad], &index);
    assert_eq!(unknown.len(), 1, "{unknown:?}");
    assert!(unknown[0].starts_with("worker_bogus_total"), "{unknown:?}");
    // The OTel name, or a counter without its `_total`, is not what Prometheus stores.
    assert_eq!(unknown_metrics(["worker_loop_ticks", "rate(chats_turns[5m])"], &index).len(), 2);
}

#[test]
fn every_dashboard_query_uses_a_metric_the_code_registers() {
    let index = prometheus_index(&registered());
    let dashboard = dashboard();
    let exprs = exprs(&dashboard);
    assert!(!exprs.is_empty());
    let unknown = unknown_metrics(exprs.iter().map(String::as_str), &index);
    assert!(
        unknown.is_empty(),
        "the dashboard queries metrics the code does not register:\n{}",
        unknown.join("\n")
    );
}

#[test]
fn every_registered_metric_has_a_panel() {
    let instruments = registered();
    let index = prometheus_index(&instruments);
    let dashboard = dashboard();
    let used: HashSet<String> =
        exprs(&dashboard).iter().flat_map(|e| metric_names(e).unwrap_or_default()).collect();
    let covered: HashSet<&String> = used.iter().filter_map(|series| index.get(series)).collect();
    let missing: Vec<&String> =
        instruments.iter().map(|i| &i.name).filter(|n| !covered.contains(n)).collect();
    assert!(missing.is_empty(), "registered metrics with no panel in {DASHBOARD}: {missing:?}");
}

#[test]
fn the_dashboard_has_a_uid_a_title_and_panels_that_query_something() {
    let dashboard = dashboard();
    let uid = dashboard["uid"].as_str().expect("uid");
    assert!(!uid.is_empty() && uid.len() <= 40, "Grafana uids are 1..=40 characters: {uid:?}");
    assert!(dashboard["title"].as_str().is_some_and(|t| !t.is_empty()));
    let panels = panels(&dashboard);
    let queries: Vec<&Value> = panels.iter().copied().filter(|p| !is_row(p)).collect();
    assert!(!queries.is_empty());
    let mut ids = HashSet::new();
    for panel in &panels {
        let title = panel["title"].as_str().unwrap_or_default();
        assert!(!title.is_empty(), "panel without a title: {panel}");
        assert!(ids.insert(panel["id"].as_u64().expect("panel id")), "duplicate panel id in {title:?}");
    }
    for panel in queries {
        let title = panel["title"].as_str().unwrap_or_default();
        let targets = panel["targets"].as_array().map(Vec::as_slice).unwrap_or_default();
        assert!(!targets.is_empty(), "panel {title:?} has no target");
        for target in targets {
            assert!(
                target["expr"].as_str().is_some_and(|e| !e.trim().is_empty()),
                "panel {title:?}: target without expr"
            );
        }
        assert_eq!(
            panel["datasource"]["uid"], "${datasource}",
            "panel {title:?} must use the datasource variable"
        );
    }
}

const ALERTS: &str = "deploy/prometheus/alerts.yml";
const RUNBOOK: &str = "docs/runbook.md";

/// One alerting rule of `deploy/prometheus/alerts.yml` (the file keeps each field on one line).
#[derive(Debug, Default)]
struct AlertRule {
    name: String,
    expr: String,
    runbook_url: String,
}

fn alert_rules() -> Vec<AlertRule> {
    let text = std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(ALERTS)).expect(ALERTS);
    let mut rules: Vec<AlertRule> = Vec::new();
    for line in text.lines().map(str::trim) {
        if let Some(name) = line.strip_prefix("- alert: ") {
            rules.push(AlertRule { name: name.to_owned(), ..AlertRule::default() });
        } else if let Some(rule) = rules.last_mut() {
            if let Some(expr) = line.strip_prefix("expr: ") {
                rule.expr = expr.to_owned();
            } else if let Some(url) = line.strip_prefix("runbook_url: ") {
                rule.runbook_url = url.to_owned();
            }
        }
    }
    rules
}

/// GitHub's anchor of a markdown heading: lower case, spaces to hyphens, other punctuation gone.
fn anchor(heading: &str) -> String {
    heading
        .trim()
        .to_lowercase()
        .chars()
        .filter_map(|c| match c {
            ' ' => Some('-'),
            c if c.is_alphanumeric() || c == '-' || c == '_' => Some(c),
            _ => None,
        })
        .collect()
}

#[test]
fn every_alert_queries_metrics_the_code_registers_and_links_its_runbook_section() {
    let rules = alert_rules();
    assert!(rules.len() >= 9, "the alerts of the operator-plane issue: {rules:?}");
    let index = prometheus_index(&registered());
    let unknown = unknown_metrics(rules.iter().map(|r| r.expr.as_str()), &index);
    assert!(
        unknown.is_empty(),
        "{ALERTS} queries metrics the code does not register:\n{}",
        unknown.join("\n")
    );

    let runbook =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join(RUNBOOK)).expect(RUNBOOK);
    let sections: HashSet<String> =
        runbook.lines().filter_map(|l| l.strip_prefix("## ")).map(anchor).collect();
    for rule in &rules {
        assert!(!rule.expr.is_empty(), "{} has no one-line expr", rule.name);
        let (page, section) = rule.runbook_url.rsplit_once('#').unwrap_or_default();
        assert!(
            page.ends_with(RUNBOOK),
            "{}: runbook_url {:?} is not into {RUNBOOK}",
            rule.name,
            rule.runbook_url
        );
        assert!(sections.contains(section), "{}: {RUNBOOK} has no section #{section}", rule.name);
        assert_eq!(section, anchor(&rule.name), "{}: its section is named after the alert", rule.name);
    }
}
