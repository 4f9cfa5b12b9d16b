//! The operator metrics on a real run: a `worker run` process (workers, outbox, gitsync against
//! the fake GitHub, prebuilds) exporting OTLP/HTTP to an in-test receiver, which must see each of
//! them with its documented attributes: `worker.ready`, `workers.lease.age_at_renewal`,
//! `outbox.queue.*{queue}`, `gitsync.due*{provider}`, `gitsync.rate_limit.*{provider}`,
//! `prebuilds.presets{condition}`, and the chats' admission metrics (`chats.pending`,
//! `chats.pending.oldest_age`, `chats.admission.wait`, `chats.admission.capped{cap}`); and, with
//! `database.listen_url` through a transaction-mode pgbouncer, `listen.wakes.not_delivered`.

mod chaos_support;
mod common;

use common::otlp::otlp_http_receiver;
mod gitsync_support;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use chaos_support::{Replica, WorkerConfig};
use common::TestDb;
use gitsync_support::FakeGitHub;
use opentelemetry_proto::tonic::collector::metrics::v1::ExportMetricsServiceRequest;
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use opentelemetry_proto::tonic::metrics::v1::{metric, number_data_point};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::{Db, Exec};

/// A data point's attributes as `key=value` strings, sorted.
fn labels(attributes: &[KeyValue]) -> String {
    let mut out: Vec<String> = attributes
        .iter()
        .map(|kv| {
            let value = match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
                Some(any_value::Value::StringValue(s)) => s.clone(),
                other => format!("{other:?}"),
            };
            format!("{}={value}", kv.key)
        })
        .collect();
    out.sort();
    out.join(",")
}

fn number(value: &Option<number_data_point::Value>) -> f64 {
    match value {
        Some(number_data_point::Value::AsInt(n)) => *n as f64,
        Some(number_data_point::Value::AsDouble(x)) => *x,
        None => f64::NAN,
    }
}

/// Every (metric, labels) → the largest value seen in any export (a counter's value is its
/// cumulative sum, a histogram's its count).
fn points(request: &ExportMetricsServiceRequest, into: &mut BTreeMap<(String, String), f64>) {
    for metric in request.resource_metrics.iter().flat_map(|r| &r.scope_metrics).flat_map(|s| &s.metrics) {
        match &metric.data {
            Some(metric::Data::Gauge(g)) => {
                for p in &g.data_points {
                    let entry = into.entry((metric.name.clone(), labels(&p.attributes))).or_insert(f64::MIN);
                    *entry = entry.max(number(&p.value));
                }
            }
            Some(metric::Data::Sum(sum)) => {
                for p in &sum.data_points {
                    let entry = into.entry((metric.name.clone(), labels(&p.attributes))).or_insert(f64::MIN);
                    *entry = entry.max(number(&p.value));
                }
            }
            Some(metric::Data::Histogram(h)) => {
                for p in &h.data_points {
                    let entry = into.entry((metric.name.clone(), labels(&p.attributes))).or_insert(f64::MIN);
                    *entry = entry.max(p.count as f64);
                }
            }
            _ => {}
        }
    }
}

async fn exec(db: &Db, sql: &str, params: &[worker::db::Param<'_>]) {
    db.get().await.expect("conn").exec(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// An active template version with one hard-limited preset wanting a prebuild: a deficit every
/// cycle (it creates nothing).
async fn preset(db: &Db) {
    let conn = db.get().await.expect("conn");
    let template: Uuid = conn
        .fetch_one("INSERT INTO templates (name) VALUES ('t') RETURNING id", &[])
        .await
        .expect("template")
        .get(0);
    let version: Uuid = conn
        .fetch_one(
            "INSERT INTO template_versions (template_id, name) VALUES ($1, 'v1') RETURNING id",
            &[(&template, Type::UUID)],
        )
        .await
        .expect("version")
        .get(0);
    conn.exec(
        "UPDATE templates SET active_version_id = $1 WHERE id = $2",
        &[(&version, Type::UUID), (&template, Type::UUID)],
    )
    .await
    .expect("activate");
    conn.exec(
        "INSERT INTO presets (template_version_id, name, desired_instances, prebuild_status) \
         VALUES ($1, 'p', 1, 'hard_limited')",
        &[(&version, Type::UUID)],
    )
    .await
    .expect("preset");
}

fn github_provider(fake: &FakeGitHub) -> toml::Value {
    let mut provider = toml::Table::new();
    provider.insert("id".into(), "github".into());
    provider.insert("kind".into(), "github".into());
    provider.insert("api_base_url".into(), fake.base_url.clone().into());
    provider.insert("origin_host".into(), "github.com".into());
    provider.insert("allow_insecure_http".into(), true.into());
    toml::Value::Array(vec![toml::Value::Table(provider)])
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_operator_metric_is_exported_by_a_real_run_with_its_documented_attributes() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let fake = FakeGitHub::start().await;
    let (endpoint, mut requests) = otlp_http_receiver().await;

    // Due outbox rows in one queue; a due diff status whose PR the fake serves, its owner's token;
    // a preset short of prebuilds.
    exec(
        db,
        "SELECT enqueue_task('t' || g, 'emails', '{}'::jsonb, now(), NULL) FROM generate_series(1, 5) AS g",
        &[],
    )
    .await;
    let owner = Uuid::new_v4();
    let token = format!("tok-{owner}");
    exec(
        db,
        "INSERT INTO external_auth_links (user_id, provider_id, access_token) VALUES ($1, 'github', $2)",
        &[(&owner, Type::UUID), (&token, Type::TEXT)],
    )
    .await;
    fake.pr("octocat", "Hello-World", "topic", 7);
    exec(
        db,
        "WITH c AS (INSERT INTO chats (owner_id) VALUES ($1) RETURNING id) \
         SELECT mark_diff_stale(c.id, 'https://github.com/octocat/Hello-World', 'topic') FROM c",
        &[(&owner, Type::UUID)],
    )
    .await;
    preset(db).await;
    // Two pending chats of one owner capped at one running: one is claimed (its wait is
    // recorded), the other waits with its owner at the cap.
    exec(
        db,
        "WITH c AS (INSERT INTO chats (owner_id) SELECT $1 FROM generate_series(1, 2) RETURNING id) \
         SELECT post_chat_message(c.id, 'user', '\"hi\"') FROM c",
        &[(&Uuid::new_v4(), Type::UUID)],
    )
    .await;
    let agent = chaos_support::agent(dir.path(), "agent", "cat >/dev/null\nsleep 60");

    let config = WorkerConfig::for_test(&test_db)
        .set("telemetry.otlp_endpoint", endpoint)
        .set("telemetry.export_interval", "300ms")
        .set("workers.interval", "200ms")
        .set("outbox.enabled", true)
        .set("gitsync.enabled", true)
        .set("gitsync.interval", "200ms")
        .set("gitsync.providers", github_provider(&fake))
        .set("prebuilds.enabled", true)
        .set("chats.enabled", true)
        .set("chats.max_running_per_owner", 1)
        .set("chats.runner.command", vec![agent]);
    let mut replica = Replica::start(dir.path(), "replica", &config);
    replica.ready().await;

    let wanted: BTreeSet<(&str, &str)> = [
        ("worker.ready", ""),
        ("workers.lease.age_at_renewal", ""),
        ("outbox.queue.backlog", "queue=emails"),
        ("outbox.queue.backlog", "queue=other"),
        ("outbox.queue.oldest_due_age", "queue=emails"),
        ("outbox.queue.oldest_due_age", "queue=other"),
        ("gitsync.due", "provider=github"),
        ("gitsync.due", "provider=none"),
        ("gitsync.due.oldest_age", "provider=github"),
        ("gitsync.due.oldest_age", "provider=none"),
        ("gitsync.rate_limit.remaining", "provider=github"),
        ("gitsync.rate_limit.reset", "provider=github"),
        ("prebuilds.presets", "condition=deficit"),
        ("prebuilds.presets", "condition=excess"),
        ("prebuilds.presets", "condition=backing_off"),
        ("prebuilds.presets", "condition=expired_present"),
        ("chats.pending", ""),
        ("chats.pending.oldest_age", ""),
        ("chats.admission.wait", ""),
        ("chats.admission.capped", "cap=owner_cap"),
    ]
    .into_iter()
    .collect();
    let mut seen: BTreeMap<(String, String), f64> = BTreeMap::new();
    let missing = |seen: &BTreeMap<(String, String), f64>| -> Vec<(&str, &str)> {
        wanted
            .iter()
            .copied()
            .filter(|(m, l)| !seen.contains_key(&((*m).to_owned(), (*l).to_owned())))
            .collect()
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !missing(&seen).is_empty() || seen.get(&("worker.ready".into(), String::new())) != Some(&1.0) {
        let request = tokio::time::timeout_at(deadline, requests.recv())
            .await
            .unwrap_or_else(|_| {
                panic!("not exported within 30 s: {:?}\n{}", missing(&seen), replica.log_tail(40))
            })
            .expect("receiver open");
        points(&request, &mut seen);
    }
    let new_metrics: BTreeSet<&str> = wanted.iter().map(|(m, _)| *m).collect();
    // Every attribute value of the new metrics is one of the documented ones.
    for (metric, labels) in seen.keys() {
        if new_metrics.contains(metric.as_str()) {
            assert!(
                wanted.contains(&(metric.as_str(), labels.as_str())),
                "{metric}{{{labels}}} undocumented"
            );
        }
    }
    assert_eq!(seen[&("outbox.queue.backlog".to_owned(), "queue=emails".to_owned())], 5.0, "{seen:?}");
    assert_eq!(seen[&("prebuilds.presets".to_owned(), "condition=deficit".to_owned())], 1.0, "{seen:?}");
    let remaining = seen[&("gitsync.rate_limit.remaining".to_owned(), "provider=github".to_owned())];
    assert!(remaining < gitsync_support::RATE_LIMIT as f64, "{remaining}");
    assert!(seen[&("workers.lease.age_at_renewal".to_owned(), String::new())] >= 1.0);
    assert_eq!(seen[&("chats.admission.wait".to_owned(), String::new())], 1.0, "one chat claimed: {seen:?}");
    assert!(seen[&("chats.admission.capped".to_owned(), "cap=owner_cap".to_owned())] >= 1.0);
    replica.sigterm(Duration::from_secs(20)).await;
}

/// `listen.wakes.not_delivered` on a real run: `database.listen_url` through a transaction-mode
/// pgbouncer, where LISTEN succeeds and hears nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_url_that_hears_nothing_is_counted_by_a_real_run() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let bouncer = common::pgbouncer::PgBouncer::start(4).await;
    let (endpoint, mut requests) = otlp_http_receiver().await;
    let config = WorkerConfig::for_test(&test_db)
        .set("telemetry.otlp_endpoint", endpoint)
        .set("telemetry.export_interval", "300ms")
        .set("database.listen_url", bouncer.url(&test_db.name))
        .set("listen.probe_timeout", "1s");
    let mut replica = Replica::start(dir.path(), "replica", &config);
    replica.ready().await;

    let key = ("listen.wakes.not_delivered".to_owned(), String::new());
    let mut seen: BTreeMap<(String, String), f64> = BTreeMap::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    while seen.get(&key).is_none_or(|n| *n < 1.0) {
        let request = tokio::time::timeout_at(deadline, requests.recv())
            .await
            .unwrap_or_else(|_| panic!("not counted within 20 s: {seen:?}\n{}", replica.log_tail(40)))
            .expect("receiver open");
        points(&request, &mut seen);
    }
    replica.sigterm(Duration::from_secs(20)).await;
}
