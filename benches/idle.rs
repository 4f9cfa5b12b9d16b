//! What one idle replica costs PostgreSQL (issue 21), against the real PostgreSQL and Redis, both
//! variants in the same run:
//!
//! 1. Transactions a second (`xact_commit + xact_rollback` of the benchmark's own database in
//!    `pg_stat_database`) of one idle `worker run` with every loop enabled and the shipped
//!    `config/worker.toml`, for `--seconds` (60) after the daemon is ready and its wake probe has
//!    said `delivered`: with the fallback intervals disabled (each set to its fast interval, as
//!    before them) and with the defaults. A checkout of a connection idle longer than
//!    `database.verify_after_idle` counts twice: the pool first sends it an empty query, which
//!    PostgreSQL counts as a transaction of its own.
//! 2. Latency from `enqueue_task` to the task being in its sorted set, p50/p99 over `--samples`
//!    (600: the p99 is then the 7th slowest, not the 3rd) single enqueues at `--rate` (10/s)
//!    against the same daemon with the default (slow) fallback: the NOTIFY path, which the
//!    fallback must leave as fast as before. Each sample is split into the `enqueue_task` call
//!    (PostgreSQL committing the enqueue, WAL flush included) and what follows it (the NOTIFY,
//!    the sweep, Redis), so a disk slow to flush a commit shows in the first part, not the
//!    worker's (BENCHMARKS.md, "Idle replica").
//!
//! `cargo bench --bench idle -- [--seconds N] [--samples N] [--rate PER_SEC]`;
//! `scripts/bench.sh idle` runs it and prints the machine it ran on.

mod common;

use std::time::{Duration, Instant};

use anyhow::Context;
use common::{BenchDb, table};

struct Args {
    seconds: u64,
    samples: usize,
    rate: u32,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Self { seconds: 60, samples: 600, rate: 10 };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--seconds" => args.seconds = value()?.parse()?,
                "--samples" => args.samples = value()?.parse()?,
                "--rate" => args.rate = value()?.parse()?,
                "--bench" => {} // passed by `cargo bench`
                other => anyhow::bail!("unknown argument {other}"),
            }
        }
        anyhow::ensure!(args.seconds > 0 && args.samples > 0 && args.rate > 0, "arguments must be > 0");
        Ok(args)
    }
}

/// Each fallback set to the fast interval it stands in for (`config/worker.toml`'s): the cadence
/// of every loop before the fallback existed.
const FALLBACK_DISABLED: &[&str] = &[
    "outbox.fallback_interval=200ms",
    "chats.acquire_fallback_interval=1s",
    "prebuilds.fallback_interval=1m",
    "runtime.controls_fallback_refresh=1s",
];

/// A daemon of the benchmark's database, with its health port and Redis prefix known.
struct Daemon {
    child: tokio::process::Child,
    port: u16,
    prefix: String,
}

async fn start(bench: &BenchDb, extra: &[&str]) -> anyhow::Result<Daemon> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let prefix = format!("bench:{}", uuid::Uuid::new_v4().simple());
    let mut sets = vec![format!("redis.prefix={prefix}")];
    sets.extend(extra.iter().map(|s| (*s).to_owned()));
    let stderr = std::process::Stdio::inherit();
    let child = common::start_worker_at(port, &bench.url, &sets, stderr, Duration::from_secs(60)).await?;
    let daemon = Daemon { child, port, prefix };
    // The fallback applies once the wake probe has heard its NOTIFY (at start, within a second).
    let deadline = Instant::now() + Duration::from_secs(30);
    while daemon.wakes().await?.as_deref() != Some("delivered") {
        anyhow::ensure!(Instant::now() < deadline, "the wake probe never said delivered");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(daemon)
}

impl Daemon {
    async fn wakes(&self) -> anyhow::Result<Option<String>> {
        let body: serde_json::Value =
            reqwest::get(format!("http://127.0.0.1:{}/readyz", self.port)).await?.json().await?;
        Ok(body["wakes"].as_str().map(str::to_owned))
    }

    async fn stop(mut self) -> anyhow::Result<()> {
        self.child.kill().await?;
        Ok(())
    }
}

/// Transactions of the benchmark's database so far, as the statistics collector has them.
async fn transactions(admin: &tokio_postgres::Client, name: &str) -> anyhow::Result<i64> {
    let row = admin
        .query_one(
            "SELECT (xact_commit + xact_rollback)::int8 FROM pg_stat_database WHERE datname = $1",
            &[&name],
        )
        .await?;
    Ok(row.get(0))
}

/// Transactions a second of an idle daemon with `extra` settings, over `seconds`.
async fn idle_rate(
    bench: &BenchDb,
    admin: &tokio_postgres::Client,
    extra: &[&str],
    seconds: u64,
) -> anyhow::Result<(i64, f64)> {
    let daemon = start(bench, extra).await?;
    // Past the start-up work (first ticks, the outbox's payload bound, the first census).
    tokio::time::sleep(Duration::from_secs(5)).await;
    let (before, started) = (transactions(admin, &bench.name).await?, Instant::now());
    tokio::time::sleep(Duration::from_secs(seconds)).await;
    let (after, elapsed) = (transactions(admin, &bench.name).await?, started.elapsed());
    daemon.stop().await?;
    let count = after - before;
    Ok((count, count as f64 / elapsed.as_secs_f64()))
}

/// Enqueue → visible in the sorted set, against a daemon with the default (slow) fallback. A
/// watcher blocks in BZPOPMIN on the queue, so the time a task becomes visible is taken without
/// polling.
async fn latency(bench: &BenchDb, args: &Args) -> anyhow::Result<common::Visibility> {
    let daemon = start(bench, &[]).await?;
    let (watcher, _) = common::redis(&daemon.prefix).await?;
    let key = worker::redis::key(&daemon.prefix, "sched", "idle");
    let latencies =
        common::enqueue_to_visible(&bench.db, (watcher, key), ("idle", "idle"), args.samples, args.rate)
            .await?;
    daemon.stop().await?;
    Ok(latencies)
}

async fn run(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let admin = worker::db::connect_direct(&common::admin_url(), "worker-bench").await?;
    let mut rows = Vec::new();
    for (label, extra) in
        [("fallback disabled (= fast intervals)", FALLBACK_DISABLED), ("fallback (defaults)", &[][..])]
    {
        let (count, per_second) = idle_rate(bench, &admin, extra, args.seconds).await?;
        rows.push(vec![
            label.to_owned(),
            args.seconds.to_string(),
            count.to_string(),
            format!("{per_second:.2}"),
        ]);
    }
    table(
        "One idle replica, every loop enabled, config/worker.toml (target: ≤ 1 transaction/s)",
        &["variant", "seconds", "transactions", "transactions/s"],
        &rows,
    );

    let seen = latency(bench, args).await?;
    let mut row = vec!["NOTIFY wake, 5 s fallback poll".to_owned()];
    row.extend(seen.row());
    table(
        &format!(
            "enqueue_task → visible in the sorted set with the default fallback, {} single enqueues at {}/s (target: p99 < 10 ms)",
            args.samples, args.rate
        ),
        &common::Visibility::headers("mode"),
        &[row],
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let bench = BenchDb::create(2).await?;
    let result = run(&bench, &args).await;
    bench.drop_now().await?;
    result
}
