//! Shared pieces of the benchmarks (`scripts/bench.sh`): a throwaway migrated database, Redis
//! key cleanup, timing and markdown tables. Each benchmark is a `harness = false` target that
//! prints its tables to stdout; `scripts/bench.sh` adds the machine description.
#![allow(dead_code)] // each bench target uses a different subset

use std::time::Duration;

use fred::prelude::{Client, ClientLike, KeysInterface, SortedSetsInterface};
use worker::db::DatabaseConfig;
use worker::db::Db;
use worker::redis::RedisConfig;

pub fn admin_url() -> String {
    std::env::var("WORKER_BENCH_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("WORKER_BENCH_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// A migrated database of its own, dropped by [`BenchDb::drop_now`].
pub struct BenchDb {
    pub name: String,
    pub url: String,
    pub db: Db,
    admin: tokio_postgres::Client,
}

impl BenchDb {
    pub async fn create(pool_size: usize) -> anyhow::Result<Self> {
        let admin = worker::db::connect_direct(&admin_url(), "worker-bench").await?;
        let name = format!("worker_bench_{}", uuid::Uuid::new_v4().simple());
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await?;
        let mut url = url::Url::parse(&admin_url())?;
        url.set_path(&format!("/{name}"));
        let url = url.to_string();
        worker::migrate::run(&url).await?;
        let config = DatabaseConfig { url: url.clone(), pool_size, ..DatabaseConfig::default() };
        Ok(Self { name, url, db: Db::new(&config)?, admin })
    }

    /// A direct connection for maintenance statements (VACUUM cannot run in a transaction).
    pub async fn direct(&self) -> anyhow::Result<tokio_postgres::Client> {
        Ok(worker::db::connect_direct(&self.url, "worker-bench").await?)
    }

    pub async fn drop_now(self) -> anyhow::Result<()> {
        let Self { name, db, admin, .. } = self;
        drop(db);
        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await?;
        Ok(())
    }
}

pub async fn redis(prefix: &str) -> anyhow::Result<(Client, RedisConfig)> {
    redis_at(&redis_url(), prefix).await
}

/// A connected client for the Redis (or `redis-cluster://` Redis Cluster) at `url`.
pub async fn redis_at(url: &str, prefix: &str) -> anyhow::Result<(Client, RedisConfig)> {
    let config = RedisConfig { url: url.to_owned(), prefix: prefix.to_owned(), ..RedisConfig::default() };
    let client = worker::redis::build(&config)?;
    client.init().await?;
    Ok((client, config))
}

/// Deletes `{prefix}:{kind}:{queue}` for the given kinds and queues.
pub async fn delete_keys(
    client: &Client,
    prefix: &str,
    kinds: &[&str],
    queues: &[String],
) -> anyhow::Result<()> {
    for kind in kinds {
        for queue in queues {
            let _: i64 = client.del(worker::redis::key(prefix, kind, queue)).await?;
        }
    }
    Ok(())
}

pub fn rate(rows: u64, elapsed: Duration) -> f64 {
    rows as f64 / elapsed.as_secs_f64().max(f64::EPSILON)
}

/// The `q`-th quantile (0..=1) of sorted durations.
pub fn quantile(sorted: &[Duration], q: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let index = ((sorted.len() - 1) as f64 * q).round() as usize;
    sorted[index.min(sorted.len() - 1)]
}

pub fn ms(d: Duration) -> String {
    format!("{:.2}", d.as_secs_f64() * 1000.0)
}

/// Prints a markdown table.
pub fn table(title: &str, header: &[&str], rows: &[Vec<String>]) {
    println!("\n### {title}\n");
    println!("| {} |", header.join(" | "));
    println!("|{}|", header.iter().map(|_| "---").collect::<Vec<_>>().join("|"));
    for row in rows {
        println!("| {} |", row.join(" | "));
    }
}

/// CPU seconds consumed so far: the whole machine (busy time over all cores), this process, and
/// the redis-server listening on `redis_port`; PostgreSQL is most of the rest.
#[derive(Debug, Clone, Copy, Default)]
pub struct Cpu {
    pub machine: f64,
    pub own: f64,
    pub redis: f64,
}

/// `sysconf(_SC_CLK_TCK)` on every Linux this runs on.
const TICKS_PER_SEC: f64 = 100.0;

fn proc_stat_cpu(path: &str) -> Option<f64> {
    let text = std::fs::read_to_string(path).ok()?;
    // Fields after the parenthesised command name: state is field 3; utime, stime are 14, 15.
    let rest = &text[text.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let utime: f64 = fields.get(11)?.parse().ok()?;
    let stime: f64 = fields.get(12)?.parse().ok()?;
    Some((utime + stime) / TICKS_PER_SEC)
}

fn redis_pid(port: u16) -> Option<String> {
    let needle = format!(":{port}");
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|entry| {
        let pid = entry.file_name().to_string_lossy().into_owned();
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        let cmdline = std::fs::read_to_string(format!("/proc/{pid}/cmdline")).ok()?;
        (comm.trim() == "redis-server" && cmdline.contains(&needle)).then_some(pid)
    })
}

impl Cpu {
    pub fn now(redis_port: u16) -> Self {
        let machine = std::fs::read_to_string("/proc/stat")
            .ok()
            .and_then(|text| {
                let line = text.lines().next()?.to_owned();
                let v: Vec<f64> = line.split_whitespace().skip(1).filter_map(|f| f.parse().ok()).collect();
                // user nice system idle iowait irq softirq steal
                Some([0, 1, 2, 5, 6, 7].iter().filter_map(|&i| v.get(i)).sum::<f64>() / TICKS_PER_SEC)
            })
            .unwrap_or(0.0);
        let redis =
            redis_pid(redis_port).and_then(|pid| proc_stat_cpu(&format!("/proc/{pid}/stat"))).unwrap_or(0.0);
        Self { machine, own: proc_stat_cpu("/proc/self/stat").unwrap_or(0.0), redis }
    }

    pub fn since(self, before: Cpu) -> Cpu {
        Cpu {
            machine: self.machine - before.machine,
            own: self.own - before.own,
            redis: self.redis - before.redis,
        }
    }
}

pub fn redis_port() -> u16 {
    url::Url::parse(&redis_url()).ok().and_then(|u| u.port()).unwrap_or(6379)
}

/// The real binary, `worker run` on `database_url` with `config/worker.toml` and `sets` (each
/// `KEY=VALUE`) on top: a health port and a Redis prefix of its own, log level warn, no
/// migrations, none of the developer's WORKER*/OTEL_*/URL variables; stderr to `stderr`.
/// Returns once `/readyz` answers 200, at most `limit` after the start.
pub async fn start_worker(
    database_url: &str,
    sets: &[String],
    stderr: std::process::Stdio,
    limit: Duration,
) -> anyhow::Result<tokio::process::Child> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    start_worker_at(port, database_url, sets, stderr, limit).await
}

/// [`start_worker`] with its health port (`/readyz`) on `port`, for a caller that reads it too.
pub async fn start_worker_at(
    port: u16,
    database_url: &str,
    sets: &[String],
    stderr: std::process::Stdio,
    limit: Duration,
) -> anyhow::Result<tokio::process::Child> {
    use anyhow::Context;
    let mut command = tokio::process::Command::new(env!("CARGO_BIN_EXE_worker"));
    for (key, _) in std::env::vars() {
        if key.starts_with("WORKER")
            || key.starts_with("OTEL_")
            || ["DATABASE_URL", "REDIS_URL", "APP_ENV", "RUST_LOG"].contains(&key.as_str())
        {
            command.env_remove(key);
        }
    }
    command
        // The environment, not `--database-url`: a URL in argv is readable by every user (the
        // worker warns about it).
        .env("DATABASE_URL", database_url)
        .args(["run", "--config", "config/worker.toml"])
        .args(["--set", &format!("health.listen=127.0.0.1:{port}")])
        .args(["--set", &format!("redis.prefix=bench:{}", uuid::Uuid::new_v4().simple())])
        .args(["--set", "log.level=warn", "--set", "database.migrate_on_start=false"]);
    for set in sets {
        command.args(["--set", set]);
    }
    command
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .stdout(std::process::Stdio::null())
        .stderr(stderr)
        .kill_on_drop(true);
    let mut child = command.spawn().context("start the worker binary")?;
    let deadline = std::time::Instant::now() + limit;
    loop {
        let ready = match reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await {
            Ok(response) => response.status().is_success(),
            Err(_) => false,
        };
        if ready {
            return Ok(child);
        }
        if let Some(status) = child.try_wait()? {
            anyhow::bail!("the worker exited ({status})");
        }
        anyhow::ensure!(
            std::time::Instant::now() < deadline,
            "the worker never became ready within {limit:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Enqueue → visible, each part sorted on its own: `total` from the call of `enqueue_task` to the
/// pop; `commit` the call itself (its round trip, including the commit's WAL flush); `after`
/// from the call's return to the pop (the NOTIFY, the sweep and Redis; zero when the sweeper
/// wrote before the client heard its commit). Splitting them says whether a slow sample was the
/// database committing the enqueue or the wake path after it.
pub struct Visibility {
    pub total: Vec<Duration>,
    pub commit: Vec<Duration>,
    pub after: Vec<Duration>,
    /// The slowest sample's (commit, after).
    pub slowest: (Duration, Duration),
}

impl Visibility {
    /// `[samples, p50, p99, max]` of `total`, then p50/p99 of `commit` and `after`, in ms.
    pub fn row(&self) -> Vec<String> {
        let at = |d: &[Duration], q: f64| ms(quantile(d, q));
        vec![
            self.total.len().to_string(),
            at(&self.total, 0.5),
            at(&self.total, 0.99),
            format!("{} ({} + {})", at(&self.total, 1.0), ms(self.slowest.0), ms(self.slowest.1)),
            at(&self.commit, 0.5),
            at(&self.commit, 0.99),
            at(&self.after, 0.5),
            at(&self.after, 0.99),
        ]
    }

    /// Headers of [`Visibility::row`], after `first` (the caller's first column).
    pub fn headers(first: &str) -> Vec<&str> {
        let mut headers = vec![first];
        headers.extend(Self::HEADERS);
        headers
    }

    const HEADERS: [&str; 8] = [
        "samples",
        "p50 ms",
        "p99 ms",
        "max ms (call + after)",
        "enqueue call p50",
        "enqueue call p99",
        "after the call p50",
        "after the call p99",
    ];
}

/// Enqueue → visible in a queue's sorted set: `samples` single `enqueue_task` calls on `db` at
/// `rate` a second into `queue` (task ids `{label}-{i}`), each timed until a watcher blocked in
/// BZPOPMIN on `watcher` pops it from `key`, so visibility is taken without polling.
pub async fn enqueue_to_visible(
    db: &Db,
    (watcher, key): (Client, String),
    (queue, label): (&str, &str),
    samples: usize,
    rate: u32,
) -> anyhow::Result<Visibility> {
    use std::collections::HashMap;
    use std::sync::{Arc, Mutex};
    use std::time::Instant;

    use anyhow::Context;
    use tokio_postgres::types::Type;
    use worker::db::Exec;

    let popped_at: Arc<Mutex<HashMap<String, Instant>>> = Arc::default();
    let watch = {
        let popped_at = popped_at.clone();
        tokio::spawn(async move {
            for _ in 0..samples {
                let popped: Option<(String, String, f64)> = watcher.bzpopmin(&key, 10.0).await?;
                let (_, task, _) = popped.context("no task became visible within 10s")?;
                let again =
                    popped_at.lock().unwrap_or_else(|e| e.into_inner()).insert(task.clone(), Instant::now());
                anyhow::ensure!(again.is_none(), "{task} was popped twice");
            }
            anyhow::Ok(())
        })
    };
    let mut ticker = tokio::time::interval(Duration::from_secs(1) / rate);
    ticker.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let conn = db.get().await?;
    let mut calls = Vec::with_capacity(samples);
    for i in 0..samples {
        ticker.tick().await;
        let task = format!("{label}-{i}");
        let called = Instant::now();
        conn.fetch_one("SELECT enqueue_task($1, $2, '{}')", &[(&task, Type::TEXT), (&queue, Type::TEXT)])
            .await?;
        calls.push((task, called, Instant::now()));
    }
    watch.await??;
    let popped_at = std::mem::take(&mut *popped_at.lock().unwrap_or_else(|e| e.into_inner()));
    let mut seen =
        Visibility { total: Vec::new(), commit: Vec::new(), after: Vec::new(), slowest: Default::default() };
    let mut slowest = Duration::ZERO;
    for (task, called, returned) in calls {
        let popped = *popped_at.get(&task).with_context(|| format!("{task} was never popped"))?;
        let total = popped.saturating_duration_since(called);
        let (commit, after) =
            (returned.saturating_duration_since(called), popped.saturating_duration_since(returned));
        if total > slowest {
            (slowest, seen.slowest) = (total, (commit, after));
        }
        seen.total.push(total);
        seen.commit.push(commit);
        seen.after.push(after);
    }
    for part in [&mut seen.total, &mut seen.commit, &mut seen.after] {
        part.sort();
    }
    Ok(seen)
}
