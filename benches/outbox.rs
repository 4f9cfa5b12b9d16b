//! Outbox benchmarks (targets in BENCHMARKS.md#targets), against the real PostgreSQL and Redis,
//! every baseline measured in the same run:
//!
//! 1. Drain N due rows (default 200,000): the sweeper as its tick runs it (`Sweeper::drain`,
//!    `PIPELINE_DEPTH` batches in flight; one and two replicas, and one replica against a local Redis Cluster when
//!    `WORKER_TEST_REDIS_CLUSTER_URL` names one, as `scripts/bench.sh` does) and one batch at a
//!    time (`Sweeper::sweep`, the tick before the pipeline) versus the per-row baseline (claim
//!    one row, HSET, ZADD, DELETE, commit) and versus the SQL-only limit (the same claim + delete
//!    statements in batches, no Redis); plus Redis alone (the same pipelines, no SQL) to show
//!    which side limits. Then the target's ratio in pairs (SQL-only limit, then the tick, on a
//!    fresh outbox each, `--pairs` times; the median is the figure, a single pair is weather).
//! 2. Latency from `enqueue_task` to the task being in its sorted set, p50/p99 over single
//!    enqueues at a steady rate, with the NOTIFY wake and with polling only.
//!
//! `cargo bench --bench outbox -- [--rows N] [--baseline-rows N] [--batch N] [--samples N]
//! [--rate PER_SEC] [--pairs N]`; `scripts/bench.sh` runs it and prints the machine it ran on.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context;
use common::{BenchDb, Cpu, rate, table};
use fred::prelude::{Client, HashesInterface, SortedSetsInterface};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use worker::db::{self, Db, Exec};
use worker::health::Health;
use worker::outbox::OutboxConfig;
use worker::outbox::Sweeper;
use worker::outbox::scheduler;
use worker::outbox::sweeper::{CLAIM, Claimed, DELETE_DISPATCHED, DrainShape};
use worker::runtime::Runtime;
use worker::runtime::RuntimeConfig;

const QUEUES: usize = 4;
/// Where `scripts/bench.sh` (like `scripts/test.sh`) puts the local Redis Cluster's URL.
const CLUSTER_URL_VAR: &str = "WORKER_TEST_REDIS_CLUSTER_URL";

struct Args {
    rows: i64,
    baseline_rows: i64,
    batch: u32,
    samples: usize,
    rate: u32,
    pairs: usize,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args =
            Args { rows: 200_000, baseline_rows: 5_000, batch: 500, samples: 1_000, rate: 100, pairs: 5 };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--rows" => args.rows = value()?.parse()?,
                "--baseline-rows" => args.baseline_rows = value()?.parse()?,
                "--batch" => args.batch = value()?.parse()?,
                "--samples" => args.samples = value()?.parse()?,
                "--rate" => args.rate = value()?.parse()?,
                "--pairs" => args.pairs = value()?.parse()?,
                _ => {} // cargo bench passes --bench
            }
        }
        Ok(args)
    }
}

fn queues() -> Vec<String> {
    (0..QUEUES).map(|q| format!("q{q}")).collect()
}

/// `rows` due rows over the queues, with a ~100-byte payload; then VACUUM ANALYZE so every
/// variant starts from the same clean table, and a CHECKPOINT so none of them pays for one the
/// writes before it made due: a checkpoint (every `max_wal_size` of WAL, ~1 GB here, i.e. every
/// few fills) slows PostgreSQL for seconds, and after one the first change to each page writes
/// the whole page to the WAL; without it the SQL-only limit alone moved from 131k to 77k rows/s
/// between pairs of one run.
async fn fill(bench: &BenchDb, rows: i64) -> anyhow::Result<()> {
    let direct = bench.direct().await?;
    direct.batch_execute("TRUNCATE task_outbox").await?;
    let queues = QUEUES as i64;
    direct
        .exec(
            "INSERT INTO task_outbox (task_id, queue, payload, run_at) \
             SELECT 'task-' || g, 'q' || (g % $2), \
                    jsonb_build_object('n', g, 'kind', 'benchmark', 'body', repeat('x', 64)), \
                    now() - interval '1 hour' + g * interval '1 microsecond' \
             FROM generate_series(1, $1) AS g",
            &[(&rows, Type::INT8), (&queues, Type::INT8)],
        )
        .await?;
    direct.batch_execute("VACUUM ANALYZE task_outbox").await?;
    direct.batch_execute("CHECKPOINT").await?;
    Ok(())
}

async fn remaining(db: &Db) -> anyhow::Result<i64> {
    Ok(db.get().await?.fetch_one("SELECT count(*) FROM task_outbox", &[]).await?.get(0))
}

/// Runs `work`, returning its result, wall time and the CPU it cost the machine.
async fn measured<T>(work: impl Future<Output = anyhow::Result<T>>) -> anyhow::Result<(T, Duration, Cpu)> {
    let port = common::redis_port();
    let before = Cpu::now(port);
    let started = Instant::now();
    let value = work.await?;
    let elapsed = started.elapsed();
    Ok((value, elapsed, Cpu::now(port).since(before)))
}

/// The claim's byte budget in the baselines: the sweeper's default (`outbox.max_batch_bytes`).
const BUDGET: i64 = worker::outbox::config::DEFAULT_MAX_BATCH_BYTES as i64;

/// The SQL-only limit: the sweeper's claim and delete statements in its transaction shape.
async fn sql_only(db: &Db, batch: u32) -> anyhow::Result<u64> {
    let limit = i64::from(batch);
    let mut total = 0;
    loop {
        let mut conn = db.get().await?;
        let tx = db::begin(&mut conn, db.tx_limits()).await?;
        let ids: Vec<i64> = tx
            .fetch_all(CLAIM, &[(&limit, Type::INT8), (&BUDGET, Type::INT8)])
            .await?
            .iter()
            .map(|r| r.get(0))
            .collect();
        if ids.is_empty() {
            return Ok(total);
        }
        tx.exec(DELETE_DISPATCHED, &[(&ids, Type::INT8_ARRAY)]).await?;
        tx.commit().await?;
        total += ids.len() as u64;
    }
}

/// The per-row baseline: one transaction per row, each Redis command awaited on its own.
async fn per_row(db: &Db, redis: &Client, prefix: &str) -> anyhow::Result<u64> {
    let one = 1i64;
    let mut total = 0;
    loop {
        let mut conn = db.get().await?;
        let tx = db::begin(&mut conn, db.tx_limits()).await?;
        let Some(row) = tx.fetch_opt(CLAIM, &[(&one, Type::INT8), (&BUDGET, Type::INT8)]).await? else {
            return Ok(total);
        };
        let (id, task_id, queue, payload, score): (i64, String, String, String, i64) =
            (row.get(0), row.get(1), row.get(2), row.get(3), row.get(4));
        let _: i64 =
            redis.hset(worker::redis::key(prefix, "payload", &queue), (task_id.as_str(), payload)).await?;
        let _: i64 = redis
            .zadd(
                worker::redis::key(prefix, "sched", &queue),
                None,
                None,
                false,
                false,
                (score as f64, task_id),
            )
            .await?;
        tx.exec(DELETE_DISPATCHED, &[(&vec![id], Type::INT8_ARRAY)]).await?;
        tx.commit().await?;
        total += 1;
    }
}

/// Redis alone: the sweeper's pipelines for `rows` in-memory rows, no SQL; `per_row` sends one
/// HSET/ZADD pair per row instead of one per queue chunk.
async fn redis_only(
    redis: &Client,
    prefix: &str,
    rows: i64,
    batch: u32,
    per_row: bool,
) -> anyhow::Result<u64> {
    let mut total = 0;
    let mut next = 1i64;
    while next <= rows {
        let end = (next + i64::from(batch)).min(rows + 1);
        let claimed: Vec<Claimed> = (next..end)
            .map(|g| Claimed {
                id: g,
                task_id: format!("task-{g}"),
                queue: format!("q{}", g % QUEUES as i64),
                payload: format!(r#"{{"n": {g}, "body": "{}", "kind": "benchmark"}}"#, "x".repeat(64)),
                run_at_ms: 1_700_000_000_000 + g,
                attempts: 0,
            })
            .collect();
        if per_row {
            one_pair_per_row(redis, prefix, &claimed).await?;
        } else {
            let outcomes = scheduler::dispatch(redis, prefix, &claimed, Duration::from_secs(10)).await?;
            anyhow::ensure!(
                outcomes.iter().all(|o| *o == scheduler::RowOutcome::Written),
                "redis refused writes"
            );
        }
        total += claimed.len() as u64;
        next = end;
    }
    Ok(total)
}

/// The shape the sweeper does not use: one HSET + ZADD pair per row in one pipeline.
async fn one_pair_per_row(redis: &Client, prefix: &str, rows: &[Claimed]) -> anyhow::Result<()> {
    let pipeline = redis.pipeline();
    for row in rows {
        let payload_key = worker::redis::key(prefix, "payload", &row.queue);
        let sched_key = worker::redis::key(prefix, "sched", &row.queue);
        let _: Result<(), _> = pipeline.hset(payload_key, (row.task_id.as_str(), row.payload.as_str())).await;
        let _: Result<(), _> = pipeline
            .zadd(sched_key, None, None, false, false, (row.run_at_ms as f64, row.task_id.as_str()))
            .await;
    }
    let answers = pipeline.try_all::<fred::prelude::Value>().await;
    anyhow::ensure!(answers.len() == rows.len() * 2, "short pipeline answer");
    for answer in answers {
        answer.context("redis refused a write")?;
    }
    Ok(())
}

/// How the sweepers of a variant sweep.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Sweep {
    /// `Sweeper::sweep` in a loop: claim, Redis, settle, commit, then the next batch.
    OneBatchAtATime,
    /// `Sweeper::drain` in a loop with this shape (`DrainShape::TICK` is what the tick does).
    Pipelined(DrainShape),
}

/// `replicas` sweepers (separate pools and Redis clients, the Redis at `redis_url`) side by side
/// until the outbox is empty.
async fn sweepers(
    bench: &BenchDb,
    redis_url: &str,
    prefix: &str,
    replicas: usize,
    batch: u32,
    sweep: Sweep,
) -> anyhow::Result<u64> {
    let config = OutboxConfig { batch_size: batch, ..OutboxConfig::default() };
    let meter = opentelemetry::global::meter("bench");
    let mut sweepers = Vec::new();
    for _ in 0..replicas {
        let db = Db::new(&worker::db::DatabaseConfig {
            url: bench.url.clone(),
            // Room for the deepest drain measured (each batch in flight holds one).
            pool_size: 4,
            ..Default::default()
        })?;
        let (redis, _) = common::redis_at(redis_url, prefix).await?;
        sweepers.push(Sweeper::new(db, redis, prefix, config.clone(), &meter));
    }
    let runs = sweepers.into_iter().map(|sweeper| {
        tokio::spawn(async move {
            let mut total = 0u64;
            loop {
                let reports = match sweep {
                    Sweep::OneBatchAtATime => vec![sweeper.sweep().await?],
                    Sweep::Pipelined(shape) => sweeper.drain(|| config.redis_timeout, shape).await?,
                };
                for report in &reports {
                    anyhow::ensure!(
                        report.untouched == 0 && report.retried == 0,
                        "unexpected failures: {report:?}"
                    );
                    total += report.dispatched.len() as u64;
                }
                if reports.iter().all(|r| r.claimed == 0) {
                    return Ok(total);
                }
            }
        })
    });
    let mut total = 0;
    for run in futures_util::future::join_all(runs).await {
        total += run??;
    }
    Ok(total)
}

/// One measured drain: `args.rows` fresh due rows, `replicas` sweepers against the Redis at
/// `redis_url` until the outbox is empty; checks every row reached Redis, then clears the keys.
async fn drained(
    bench: &BenchDb,
    args: &Args,
    redis_url: &str,
    prefix: &str,
    replicas: usize,
    sweep: Sweep,
) -> anyhow::Result<(u64, Duration, Cpu)> {
    let (target, _) = common::redis_at(redis_url, prefix).await?;
    fill(bench, args.rows).await?;
    let (n, elapsed, cpu) = measured(sweepers(bench, redis_url, prefix, replicas, args.batch, sweep)).await?;
    anyhow::ensure!(remaining(&bench.db).await? == 0, "the sweepers left rows behind");
    let mut in_redis = 0u64;
    for queue in queues() {
        in_redis += target.zcard::<u64, _>(worker::redis::key(prefix, "sched", &queue)).await?;
    }
    anyhow::ensure!(in_redis == n, "{in_redis} tasks in Redis after dispatching {n}");
    common::delete_keys(&target, prefix, &["payload", "sched"], &queues()).await?;
    Ok((n, elapsed, cpu))
}

async fn throughput(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let prefix = format!("bench:{}", uuid::Uuid::new_v4().simple());
    let (redis, _) = common::redis(&prefix).await?;
    let kinds = ["payload", "sched"];
    let mut results: Vec<(String, u64, Duration, Cpu)> = Vec::new();

    fill(bench, args.baseline_rows).await?;
    let (n, elapsed, cpu) = measured(per_row(&bench.db, &redis, &prefix)).await?;
    results.push(("per-row baseline: claim 1, HSET, ZADD, DELETE, commit".into(), n, elapsed, cpu));
    common::delete_keys(&redis, &prefix, &kinds, &queues()).await?;

    fill(bench, args.rows).await?;
    let (n, elapsed, cpu) = measured(sql_only(&bench.db, args.batch)).await?;
    results.push((
        format!("SQL-only limit: claim + delete, batch {}, no Redis", args.batch),
        n,
        elapsed,
        cpu,
    ));

    for per_row in [true, false] {
        let (n, elapsed, cpu) = measured(redis_only(&redis, &prefix, args.rows, args.batch, per_row)).await?;
        let shape = if per_row {
            "one HSET + ZADD per row"
        } else {
            "the sweeper's HSET then ZADD pipelines, a command per queue chunk"
        };
        results.push((
            format!("Redis only: pipelines of {} rows, {shape}, no SQL", args.batch),
            n,
            elapsed,
            cpu,
        ));
        common::delete_keys(&redis, &prefix, &kinds, &queues()).await?;
    }

    let cluster = std::env::var(CLUSTER_URL_VAR).ok().filter(|url| !url.is_empty());
    let single = common::redis_url();
    let tick = DrainShape::TICK;
    let deeper = DrainShape { depth: tick.depth + 1, ..tick };
    let longer = DrainShape { batches: tick.batches * 4, ..tick };
    let mut variants = vec![
        (
            single.as_str(),
            1,
            Sweep::OneBatchAtATime,
            "one batch at a time (the tick before the pipeline)".to_owned(),
        ),
        (
            single.as_str(),
            1,
            Sweep::Pipelined(tick),
            format!("the tick: {} in flight, {} per drain", tick.depth, tick.batches),
        ),
        (
            single.as_str(),
            1,
            Sweep::Pipelined(deeper),
            format!("{} in flight, {} per drain", deeper.depth, deeper.batches),
        ),
        (
            single.as_str(),
            1,
            Sweep::Pipelined(longer),
            format!("{} in flight, {} per drain", longer.depth, longer.batches),
        ),
        (single.as_str(), 2, Sweep::Pipelined(tick), "the tick, on each replica".to_owned()),
    ];
    match &cluster {
        Some(url) => variants.push((
            url.as_str(),
            1,
            Sweep::Pipelined(tick),
            "the tick, Redis Cluster of 3 masters".to_owned(),
        )),
        None => println!("(no Redis Cluster row: {CLUSTER_URL_VAR} is not set; scripts/bench.sh sets it)\n"),
    }
    for (url, replicas, sweep, what) in variants {
        let (n, elapsed, cpu) = drained(bench, args, url, &prefix, replicas, sweep).await?;
        let label = format!(
            "sweeper, {replicas} replica{}, batch {}, {what}",
            if replicas > 1 { "s" } else { "" },
            args.batch
        );
        results.push((label, n, elapsed, cpu));
    }

    let per_row_rate = rate(results[0].1, results[0].2);
    let sql_rate = rate(results[1].1, results[1].2);
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(label, n, elapsed, _)| {
            let r = rate(*n, *elapsed);
            vec![
                label.clone(),
                n.to_string(),
                format!("{:.2}", elapsed.as_secs_f64()),
                format!("{r:.0}"),
                format!("{:.1}×", r / per_row_rate),
                format!("{:.2}", r / sql_rate),
            ]
        })
        .collect();
    table(
        "Outbox drain (rows/s)",
        &["variant", "rows", "seconds", "rows/s", "vs per-row", "vs SQL-only"],
        &rows,
    );
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get()) as f64;
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(label, _, elapsed, cpu)| {
            let wall = elapsed.as_secs_f64();
            let rest = (cpu.machine - cpu.own - cpu.redis).max(0.0);
            vec![
                label.clone(),
                format!("{:.0}%", 100.0 * cpu.machine / (wall * cores)),
                format!("{:.2}", cpu.own),
                format!("{:.2}", cpu.redis),
                format!("{rest:.2}"),
            ]
        })
        .collect();
    table(
        &format!("Where the CPU went (seconds of CPU; {cores} cores, all processes on this machine)"),
        &["variant", "machine busy", "benchmark process", "redis-server", "rest (PostgreSQL, kernel)"],
        &rows,
    );
    Ok(())
}

/// The ratio the target is about, measured in pairs: the SQL-only limit, then the tick on one
/// replica, each on a freshly filled outbox, `pairs` times in a row. One drain takes a few
/// seconds, and on a shared machine the two sides of a single pair can land in different
/// weather; the median over the pairs is the figure to compare with the target.
async fn paired(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let prefix = format!("bench:{}", uuid::Uuid::new_v4().simple());
    let single = common::redis_url();
    let tick = DrainShape::TICK;
    let mut rows = Vec::new();
    let mut ratios = Vec::new();
    for pair in 1..=args.pairs {
        fill(bench, args.rows).await?;
        let (sql, sql_elapsed, _) = measured(sql_only(&bench.db, args.batch)).await?;
        let (n, elapsed, _) = drained(bench, args, &single, &prefix, 1, Sweep::Pipelined(tick)).await?;
        let (sql_rate, tick_rate) = (rate(sql, sql_elapsed), rate(n, elapsed));
        ratios.push(tick_rate / sql_rate);
        rows.push(vec![
            pair.to_string(),
            format!("{sql_rate:.0}"),
            format!("{tick_rate:.0}"),
            format!("{:.2}", tick_rate / sql_rate),
        ]);
    }
    table(
        &format!(
            "The tick ({} in flight, {} per drain, 1 replica) against the SQL-only limit, {} rows, in pairs",
            tick.depth, tick.batches, args.rows
        ),
        &["pair", "SQL-only rows/s", "the tick rows/s", "ratio"],
        &rows,
    );
    ratios.sort_by(f64::total_cmp);
    if let (Some(min), Some(max)) = (ratios.first(), ratios.last()) {
        println!(
            "ratio over {} pairs: median {:.2}, min {min:.2}, max {max:.2}\n",
            ratios.len(),
            ratios[ratios.len() / 2]
        );
    }
    Ok(())
}

/// Enqueue → visible in the sorted set. A watcher blocks in BZPOPMIN on the queue, so the time a
/// task becomes visible is taken without polling.
async fn latency(bench: &BenchDb, args: &Args, wake: bool) -> anyhow::Result<common::Visibility> {
    let prefix = format!("bench:{}", uuid::Uuid::new_v4().simple());
    let (redis, _) = common::redis(&prefix).await?;
    let (watcher, _) = common::redis(&prefix).await?;
    let meter = opentelemetry::global::meter("bench");
    let runtime = Runtime::new(bench.db.clone(), Health::default(), &meter, RuntimeConfig::default());
    let shutdown = CancellationToken::new();
    let sweeper = Sweeper::new(bench.db.clone(), redis, &prefix, OutboxConfig::default(), &meter);
    runtime.spawn(sweeper);
    if wake {
        let stats = runtime.listener().start(bench.url.clone(), runtime.health.clone(), shutdown.clone());
        let mut connects = stats.connects.clone();
        tokio::time::timeout(Duration::from_secs(10), connects.wait_for(|n| *n >= 1)).await??;
    }

    let key = worker::redis::key(&prefix, "sched", "latency");
    let label = if wake { "lat-wake" } else { "lat-poll" };
    let latencies =
        common::enqueue_to_visible(&bench.db, (watcher, key), ("latency", label), args.samples, args.rate)
            .await?;
    shutdown.cancel();
    runtime.begin_shutdown();
    runtime.drained().await;
    Ok(latencies)
}

async fn latencies(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let mut rows = Vec::new();
    for wake in [true, false] {
        let mut row =
            vec![if wake { "NOTIFY wake + 200ms poll" } else { "200ms poll only (±10% jitter)" }.to_owned()];
        row.extend(latency(bench, args, wake).await?.row());
        rows.push(row);
    }
    table(
        &format!(
            "enqueue_task → visible in the sorted set, {} single enqueues at {}/s",
            args.samples, args.rate
        ),
        &common::Visibility::headers("mode"),
        &rows,
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let bench = BenchDb::create(8).await?;
    let result = async {
        throughput(&bench, &args).await?;
        paired(&bench, &args).await?;
        latencies(&bench, &args).await
    }
    .await;
    bench.drop_now().await?;
    result
}
