//! `worker run`: wires config, database, telemetry, loops and the health endpoint together,
//! then drains on the first SIGTERM/SIGINT (a second one exits at once).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::{Concurrency, Config};
use crate::counters::Counters;
use crate::db::Db;
use crate::health::Health;
use crate::outbox::Sweeper;
use crate::runtime::Runtime;
use crate::telemetry::{Identity, Metrics};
use crate::workers::{WorkerIdentity, WorkerLease};
use crate::{listen, migrate};

/// Exit code after a second signal forced the exit.
pub const EXIT_FORCED: i32 = 130;
/// Exit code when in-flight work did not finish within `app.shutdown_timeout`.
pub const EXIT_DRAIN_TIMEOUT: i32 = 1;

/// Runs the daemon until a signal; returns the process exit code.
pub async fn run(config: Config, env: BTreeMap<String, String>) -> anyhow::Result<i32> {
    let me = WorkerIdentity::new();
    let identity = Identity { worker_id: me.id, environment: config.app.env.clone() };
    let metrics = Metrics::init(&config.telemetry, &identity, &env)?;
    let meter = metrics.meter();
    let concurrency = Concurrency::from_config(&config);
    tracing::info!(
        worker_id = %me.id,
        version = %me.version,
        environment = %config.app.env,
        pool_size = config.database.pool_size,
        prebuilds_concurrency = concurrency.prebuilds,
        gitsync_concurrency = concurrency.gitsync,
        "worker starting"
    );

    if config.database.migrate_on_start {
        let applied = migrate::run(config.database.migrate_url()).await?;
        tracing::info!(applied = ?applied, "migrations up to date");
    }

    let db = Db::new(&config.database)?;
    let lease = WorkerLease::new(db.clone(), me.clone(), config.workers.clone());
    lease.register().await?;

    let health = Health::default();
    health.set_info("worker_id", me.id.to_string().into());
    health.set_info("version", me.version.clone().into());
    health.set_info("concurrency", serde_json::to_value(concurrency)?);
    register_gauges(&meter, &db, concurrency);

    let shutdown = CancellationToken::new();
    let tracker = TaskTracker::new();
    let runtime = Runtime::new(db.clone(), health.clone(), &meter, config.runtime.clone());
    if config.workers.enabled {
        runtime.spawn(
            WorkerLease::new(db.clone(), me.clone(), config.workers.clone()),
            &tracker,
            shutdown.clone(),
        );
    }
    let redis = if config.outbox.enabled || config.counters.enabled {
        Some(crate::redis::connect_and_wait(&config.redis).await?)
    } else {
        None
    };
    if let Some(redis) = redis.as_ref().filter(|_| config.outbox.enabled) {
        let sweeper =
            Sweeper::new(db.clone(), redis.clone(), &config.redis.prefix, config.outbox.clone(), &meter);
        runtime.spawn(sweeper, &tracker, shutdown.clone());
    }
    if let Some(redis) = redis.as_ref().filter(|_| config.counters.enabled) {
        let counters =
            Counters::new(db.clone(), redis.clone(), &config.redis.prefix, config.counters.clone(), &meter);
        runtime.spawn(counters, &tracker, shutdown.clone());
    }
    tracker.close();

    listen::spawn(
        config.database.listen_url().to_owned(),
        runtime.wakes().clone(),
        health.clone(),
        shutdown.clone(),
    );
    let server_stop = CancellationToken::new();
    let server =
        crate::health::serve(config.health.listen, health.clone(), db.clone(), server_stop.clone()).await?;

    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let signal_name = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
    let deadline = Instant::now() + config.app.shutdown_timeout;
    tracing::info!(
        signal = signal_name,
        timeout_ms = config.app.shutdown_timeout.as_millis() as u64,
        "draining"
    );
    health.set_draining();
    shutdown.cancel();

    let drained = tokio::select! {
        drained = tokio::time::timeout(config.app.shutdown_timeout, tracker.wait()) => drained.is_ok(),
        _ = term.recv() => force_exit("SIGTERM"),
        _ = int.recv() => force_exit("SIGINT"),
    };
    if !drained {
        tracing::error!("in-flight ticks did not finish within the shutdown timeout");
    }
    if let Some(redis) = &redis {
        let _ = tokio::time::timeout(Duration::from_secs(1), fred::prelude::ClientLike::quit(redis)).await;
    }
    if let Err(error) = lease.deregister().await {
        tracing::warn!(%error, "could not remove this worker's row");
    }
    server_stop.cancel();
    let _ = server.await;
    // What is left of the budget goes to the last metrics export.
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
    if tokio::time::timeout(left, metrics.shutdown()).await.is_err() {
        tracing::warn!("metrics were not flushed within the shutdown timeout");
    }
    tracing::info!(drained, "worker stopped");
    Ok(if drained { 0 } else { EXIT_DRAIN_TIMEOUT })
}

fn force_exit(signal: &str) -> bool {
    tracing::warn!(signal, "second signal: exiting now");
    std::process::exit(EXIT_FORCED);
}

fn register_gauges(meter: &Meter, db: &Db, concurrency: Concurrency) {
    type Read = fn(&deadpool_postgres::Status) -> usize;
    let pool_gauges: [(&'static str, &'static str, Read); 4] = [
        ("worker.db.pool.size", "Open connections", |s| s.size),
        ("worker.db.pool.idle", "Idle connections", |s| s.available),
        ("worker.db.pool.waiting", "Tasks waiting for a connection", |s| s.waiting),
        ("worker.db.pool.max", "Pool limit", |s| s.max_size),
    ];
    for (name, description, read) in pool_gauges {
        let db = db.clone();
        meter
            .u64_observable_gauge(name)
            .with_description(description)
            .with_callback(move |observer| observer.observe(read(&db.status()) as u64, &[]))
            .build();
    }
    meter
        .u64_observable_gauge("worker.loop.concurrency")
        .with_description("Effective fan-out of the loops that fan out")
        .with_callback(move |observer| {
            observer.observe(concurrency.prebuilds as u64, &[KeyValue::new("loop", "prebuilds")]);
            observer.observe(concurrency.gitsync as u64, &[KeyValue::new("loop", "gitsync")]);
        })
        .build();
}
