//! `worker run`: wires config, database, telemetry, loops and the health endpoint together,
//! then drains on the first SIGTERM/SIGINT.
//!
//! Shutdown order: stop starting ticks and cancel every supervised task (chat runners return
//! their chats) → wait for both, within `app.shutdown_timeout` → only if everything drained,
//! remove this worker's row; otherwise leave it, so the other replicas recover whatever this
//! worker still held once its lease is older than `stale_after` (removing it would hand that
//! work out while it may still be running here). A second signal exits at once (130) in every
//! phase, the deregister and the metrics flush included.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::Meter;
use tokio::signal::unix::{Signal, SignalKind, signal};
use tokio_util::sync::CancellationToken;

use crate::config::{Concurrency, Config};
use crate::db::{DatabaseConfig, Db};
use crate::health::Health;
use crate::identity::WorkerIdentity;
use crate::loops::{self, Shared};
use crate::migrate;
use crate::runtime::Runtime;
use crate::telemetry::traces::Traces;
use crate::telemetry::{Identity, Metrics};
use crate::workers::WorkerLease;

/// Exit code after a second signal forced the exit.
pub const EXIT_FORCED: i32 = 130;
/// Exit code when in-flight work did not finish within `app.shutdown_timeout`.
pub const EXIT_DRAIN_TIMEOUT: i32 = 1;

/// Runs the daemon until a signal; returns the process exit code.
pub async fn run(config: Config, env: BTreeMap<String, String>) -> anyhow::Result<i32> {
    // First: a signal while the worker starts (the migration lock, the Redis wait) ends the
    // start at once instead of killing the process (or waiting for a start it makes pointless).
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let me = WorkerIdentity::generate();
    let identity = Identity { worker_id: me.id, environment: config.app.env.clone() };
    let metrics = Metrics::init(&config.telemetry, &identity, &env)?;
    let traces = Traces::init(&config.telemetry, &identity, &env)?;
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
        // Nothing holds work yet: a signal here simply stops the process (a migration in
        // flight rolls back with its connection).
        match before_a_signal(migrate::run(&config.database), &mut term, &mut int).await {
            Ok(applied) => tracing::info!(applied = ?applied?, "migrations up to date"),
            Err(signal) => {
                tracing::info!(signal, "stopped while migrating; nothing was started");
                return Ok(0);
            }
        }
    }

    // With the chat loops, one connection of `pool_size` is the lease's alone: 200 runners
    // writing through the shared pool cannot make a renewal wait for a connection.
    let lease_reserved = config.chats.enabled;
    let shared = DatabaseConfig {
        pool_size: config.database.shared_pool_size(lease_reserved),
        ..config.database.clone()
    };
    let db = Db::new(&shared)?;
    let lease_db = if lease_reserved { Db::new(&config.database.lease_pool())? } else { db.clone() };
    let lease = WorkerLease::new(lease_db.clone(), me.clone(), config.workers.clone());
    lease.register().await?;

    let health = Health::default();
    health.set_info("worker_id", me.id.to_string().into());
    health.set_info("version", me.version.clone().into());
    health.set_info("build", crate::identity::build_info());
    health.set_info("concurrency", serde_json::to_value(concurrency)?);
    health.set_info(
        "pool",
        serde_json::json!({
            "shared": shared.pool_size,
            "lease_reserved": if lease_reserved { 1 } else { 0 },
        }),
    );
    register_gauges(&meter, &db, concurrency);

    let runtime = Runtime::for_worker(db.clone(), health.clone(), &meter, config.runtime.clone(), me.clone());
    let guard_program = std::env::current_exe()?;
    let shared = Shared {
        runtime: &runtime,
        config: &config,
        meter: &meter,
        db: db.clone(),
        lease_db,
        concurrency,
        guard_program: &guard_program,
    };
    // Bound before any loop starts: a taken port stops the worker before it holds any work.
    let server_stop = CancellationToken::new();
    let server = crate::health::serve(&config.health, health.clone(), &meter, server_stop.clone()).await?;
    // `loops::start` spawns its loops only after its last wait: a signal during a wait ends the
    // start before any loop runs, and the worker goes straight to the drain below (its row is
    // removed like any drained worker's).
    let listener_stop = CancellationToken::new();
    let (redis, signal_name) = match before_a_signal(loops::start(shared), &mut term, &mut int).await {
        Ok(redis) => {
            let redis = redis?;
            runtime.listener().start(config.database.listen_direct(), health.clone(), listener_stop.clone());
            start_readiness_probe(&runtime, health.clone(), db.clone())?;
            let signal_name = tokio::select! {
                _ = term.recv() => "SIGTERM",
                _ = int.recv() => "SIGINT",
            };
            (redis, signal_name)
        }
        Err(signal) => {
            tracing::info!(signal, "stopped while starting; no loop was started");
            (None, signal)
        }
    };
    tokio::spawn(exit_on_second_signal(term, int));
    let deadline = Instant::now() + config.app.shutdown_timeout;
    tracing::info!(
        signal = signal_name,
        timeout_ms = config.app.shutdown_timeout.as_millis() as u64,
        "draining"
    );
    health.set_draining();
    runtime.begin_shutdown();

    let drained = tokio::time::timeout(config.app.shutdown_timeout, runtime.drained()).await.is_ok();
    if drained {
        if let Err(error) = lease.deregister().await {
            tracing::warn!(%error, "could not remove this worker's row; it goes stale and is reaped");
        }
    } else {
        tracing::error!(
            running_tasks = runtime.supervisor().len(),
            "ticks or tasks did not finish within the shutdown timeout; leaving this worker's row \
             so other replicas recover its work once the lease is stale"
        );
    }
    if let Some(redis) = &redis {
        let _ = tokio::time::timeout(Duration::from_secs(1), fred::prelude::ClientLike::quit(redis)).await;
    }
    listener_stop.cancel();
    server_stop.cancel();
    let _ = server.task.await;
    // What is left of the budget goes to the last metrics and traces export.
    let left = deadline.saturating_duration_since(Instant::now()).max(Duration::from_millis(100));
    if tokio::time::timeout(left, async { tokio::join!(metrics.shutdown(), traces.shutdown()) })
        .await
        .is_err()
    {
        tracing::warn!("metrics and traces were not flushed within the shutdown timeout");
    }
    tracing::info!(drained, "worker stopped");
    Ok(if drained { 0 } else { EXIT_DRAIN_TIMEOUT })
}

/// The probe behind `/readyz` (a `SELECT 1` when no checkout succeeded for 10 s, every second
/// while it fails, so no request checks out a connection)
/// is a long-lived task: supervised, so the drain stops and awaits it with the others.
fn start_readiness_probe(runtime: &Runtime, health: Health, db: Db) -> anyhow::Result<()> {
    let probes = runtime.supervisor().task_set("health_probe", ());
    probes.start("readiness", (), |mut stop| async move {
        crate::health::probe(health, db, stop.stopped()).await;
    })?;
    Ok(())
}

/// `step`'s output, or the name of the stop signal that came first (`step` is then dropped).
async fn before_a_signal<T>(
    step: impl std::future::Future<Output = T>,
    term: &mut Signal,
    int: &mut Signal,
) -> Result<T, &'static str> {
    tokio::select! {
        output = step => Ok(output),
        _ = term.recv() => Err("SIGTERM"),
        _ = int.recv() => Err("SIGINT"),
    }
}

/// After the first signal: the next one ends the process at once, whatever phase it is in.
async fn exit_on_second_signal(mut term: Signal, mut int: Signal) {
    let signal = tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    };
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
