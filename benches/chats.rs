//! Chat benchmarks (the chats issue; targets in BENCHMARKS.md#targets), against the real
//! PostgreSQL, every baseline measured in the same run on the same rows:
//!
//! 1. One `chats_heartbeat` tick (`Heartbeat::beat`) with 1k/10k/100k running chats owned by one
//!    worker and registered in its `ChatLoops::runners()` (tasks that only await their
//!    stop signal: no agent subprocess), versus (a) the seed's per-chat-row batch heartbeat
//!    `UPDATE chats SET heartbeat_at = now() WHERE worker_id = $1 AND status = 'running'
//!    RETURNING id` (the column is added to the bench database only) and (b) one
//!    `UPDATE chats SET heartbeat_at = now() WHERE id = $1` per chat. Write statements and rows
//!    are counted with statement-level triggers (transition tables) on a separate, untimed tick.
//! 2. Memory: a fresh child process (this binary with `--registry-child`) that is a chat worker
//!    and nothing else reads its own VmRSS/VmHWM before and after registering the largest set of
//!    chats it owns and over a few heartbeats; the size of one real runner's future; the RSS of
//!    the real `worker` binary with chats enabled, idle and then running `--real-chats` (1000)
//!    real chats, each with its agent subprocess. The headline figure, the worker holding the
//!    largest set at its peak, is the real binary's idle peak plus the child's peak increase.
//! 3. Acquisition: two workers (two pools) claiming pending chats (each of its own owner) with
//!    the acquire loop's claim (`admission::claim`, batch 500; claims are serialised by its lock) and registering a runner per claimed chat, versus one
//!    claim per chat (`LIMIT 1`); every chat must end claimed exactly once (generation 1).
//!
//! `cargo bench --bench chats -- [--sizes 1000,10000,100000] [--samples N] [--per-chat-max N]
//! [--per-chat-samples N] [--acquire N] [--acquire-baseline N] [--batch N] [--real-chats N]`; `scripts/bench.sh
//! chats` runs it and prints the machine it ran on.

mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::Stdio;
use std::time::{Duration, Instant};

use anyhow::Context;
use common::{BenchDb, ms, quantile, rate, table};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::chats::admission::{self, Rules};
use worker::chats::runner::{self, ChatsContext, Claimed};
use worker::chats::{Agent, ChatLoops, ChatsConfig, RunnerConfig};
use worker::db::DatabaseConfig;
use worker::db::{self, Db, Exec};
use worker::health::Health;
use worker::identity::WorkerIdentity;
use worker::runtime::Runtime;
use worker::runtime::RuntimeConfig;
use worker::workers::{WorkerLease, WorkersConfig};

/// The seed's heartbeat: every running chat row of the worker rewritten each tick.
const BATCH_ROW_HEARTBEAT: &str =
    "UPDATE chats SET heartbeat_at = now() WHERE worker_id = $1 AND status = 'running' RETURNING id";
/// Each chat heartbeating on its own.
const PER_CHAT_HEARTBEAT: &str = "UPDATE chats SET heartbeat_at = now() WHERE id = $1";

struct Args {
    sizes: Vec<i64>,
    samples: usize,
    per_chat_max: i64,
    per_chat_samples: usize,
    acquire: i64,
    acquire_baseline: i64,
    batch: i64,
    real_chats: i64,
    /// Set in the child process of [`registry_memory`]: `(database url, chats)`.
    registry_child: Option<(String, i64)>,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Args {
            sizes: vec![1_000, 10_000, 100_000],
            samples: 15,
            per_chat_max: 10_000,
            per_chat_samples: 1,
            acquire: 10_000,
            acquire_baseline: 10_000,
            batch: 500,
            real_chats: 1_000,
            registry_child: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--sizes" => {
                    args.sizes = value()?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
                }
                "--samples" => args.samples = value()?.parse()?,
                "--per-chat-max" => args.per_chat_max = value()?.parse()?,
                "--per-chat-samples" => args.per_chat_samples = value()?.parse()?,
                "--acquire" => args.acquire = value()?.parse()?,
                "--acquire-baseline" => args.acquire_baseline = value()?.parse()?,
                "--batch" => args.batch = value()?.parse()?,
                "--real-chats" => args.real_chats = value()?.parse()?,
                "--registry-child" => {
                    let url = value()?;
                    args.registry_child = Some((url, value()?.parse()?));
                }
                _ => {} // cargo bench passes --bench
            }
        }
        anyhow::ensure!(!args.sizes.is_empty() && args.samples > 0, "nothing to measure");
        Ok(args)
    }
}

/// One worker of the benchmark: a runtime with its own pool and identity, its lease row, and its
/// chat loops (whose agent never runs: runners are registered by hand).
struct BenchWorker {
    rt: Runtime,
    chats: ChatLoops,
    me: WorkerIdentity,
    db: Db,
}

fn chats_config() -> ChatsConfig {
    ChatsConfig {
        enabled: true,
        max_running: 1_000_000,
        runner: RunnerConfig { command: vec!["true".into()], ..RunnerConfig::default() },
        ..ChatsConfig::default()
    }
}

impl BenchWorker {
    async fn start(url: &str, pool_size: usize) -> anyhow::Result<Self> {
        let db = Db::new(&DatabaseConfig { url: url.to_owned(), pool_size, ..DatabaseConfig::default() })?;
        let me = WorkerIdentity::generate();
        let meter = opentelemetry::global::meter("bench");
        let rt =
            Runtime::for_worker(db.clone(), Health::default(), &meter, RuntimeConfig::default(), me.clone());
        WorkerLease::new(db.clone(), me.clone(), WorkersConfig::default())
            .publishing_to(rt.lease_publisher())
            .register()
            .await?;
        let chats =
            ChatLoops::new(&rt, chats_config(), &meter, Path::new(env!("CARGO_BIN_EXE_worker"))).await?;
        Ok(Self { rt, chats, me, db })
    }

    fn lease(&self) -> WorkerLease {
        WorkerLease::new(self.db.clone(), self.me.clone(), WorkersConfig::default())
            .publishing_to(self.rt.lease_publisher())
    }

    /// A runner per chat whose task only awaits its stop signal.
    fn register(&self, chats: impl IntoIterator<Item = (Uuid, i64)>) -> anyhow::Result<()> {
        for (id, generation) in chats {
            self.chats.runners().start(id, generation, |mut signal| async move { signal.stopped().await })?;
        }
        Ok(())
    }

    async fn unregister_all(&self) {
        self.chats.runners().stop_all(runner::SHUTDOWN_CAUSE);
        while !self.chats.runners().is_empty() {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }
}

/// One `kB` field of `/proc/<pid>/status`.
fn status_field(pid: &str, name: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
    Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
}

/// The real binary's memory (KiB): idle, then holding `running` real chats.
struct RealWorkerMemory {
    /// VmRSS, VmHWM, RssAnon, RssFile while idle.
    idle: [u64; 4],
    /// The same with `running` chats running (each with its agent subprocess).
    busy: Option<(i64, [u64; 4])>,
}

fn memory_fields(pid: &str) -> anyhow::Result<[u64; 4]> {
    Ok([
        status_field(pid, "VmRSS:")?,
        status_field(pid, "VmHWM:")?,
        status_field(pid, "RssAnon:")?,
        status_field(pid, "RssFile:")?,
    ])
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

/// `n` chats `running` under `owner` (generation 1), or `pending` when `owner` is None; then
/// VACUUM ANALYZE so every variant starts from the same clean table.
async fn fill(bench: &BenchDb, n: i64, owner: Option<Uuid>) -> anyhow::Result<()> {
    let direct = bench.direct().await?;
    direct.batch_execute("TRUNCATE chats CASCADE").await?;
    direct
        .exec(
            "INSERT INTO chats (owner_id, status, worker_id, generation, started_at, created_at) \
             SELECT gen_random_uuid(), CASE WHEN $1::uuid IS NULL THEN 'pending' ELSE 'running' END, \
                    $1, CASE WHEN $1::uuid IS NULL THEN 0 ELSE 1 END, \
                    CASE WHEN $1::uuid IS NULL THEN NULL ELSE now() END, \
                    now() - interval '1 hour' + g * interval '1 microsecond' \
             FROM generate_series(1, $2) AS g",
            &[(&owner, Type::UUID), (&n, Type::INT8)],
        )
        .await?;
    direct.batch_execute("VACUUM ANALYZE chats").await?;
    Ok(())
}

/// The bench database's extras: the seed's `heartbeat_at` column and a statement log fed by
/// statement-level triggers (created and dropped around each counted run).
async fn prepare(bench: &BenchDb) -> anyhow::Result<()> {
    bench
        .direct()
        .await?
        .batch_execute(
            "ALTER TABLE chats ADD COLUMN heartbeat_at timestamptz; \
             CREATE TABLE stmt_log (tbl text NOT NULL, op text NOT NULL, rows int8); \
             CREATE FUNCTION log_update() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN INSERT INTO stmt_log SELECT TG_TABLE_NAME, TG_OP, count(*) FROM new_rows; RETURN NULL; END $$; \
             CREATE FUNCTION log_other() RETURNS trigger LANGUAGE plpgsql AS \
             $$ BEGIN INSERT INTO stmt_log VALUES (TG_TABLE_NAME, TG_OP, NULL); RETURN NULL; END $$",
        )
        .await?;
    Ok(())
}

const LOGGED_TABLES: [&str; 4] = ["workers", "chats", "workspaces", "chat_messages"];

/// Write statements and rows per table while `work` runs.
#[derive(Debug, Default)]
struct Writes(BTreeMap<String, (i64, i64)>);

impl Writes {
    fn describe(&self) -> String {
        if self.0.is_empty() {
            return "none".into();
        }
        self.0.iter().map(|(t, (s, r))| format!("{t}: {s} stmt / {r} rows")).collect::<Vec<_>>().join(", ")
    }

    fn rows(&self, tbl: &str) -> i64 {
        self.0.get(tbl).map_or(0, |(_, r)| *r)
    }

    fn statements(&self) -> i64 {
        self.0.values().map(|(s, _)| s).sum()
    }
}

async fn counted<T>(
    bench: &BenchDb,
    work: impl Future<Output = anyhow::Result<T>>,
) -> anyhow::Result<(T, Writes)> {
    let direct = bench.direct().await?;
    for t in LOGGED_TABLES {
        direct
            .batch_execute(&format!(
                "CREATE TRIGGER log_u_{t} AFTER UPDATE ON {t} REFERENCING NEW TABLE AS new_rows \
                 FOR EACH STATEMENT EXECUTE FUNCTION log_update(); \
                 CREATE TRIGGER log_o_{t} AFTER INSERT OR DELETE ON {t} \
                 FOR EACH STATEMENT EXECUTE FUNCTION log_other()"
            ))
            .await?;
    }
    let value = work.await;
    let rows = direct
        .fetch_all(
            "SELECT tbl || CASE WHEN op = 'UPDATE' THEN '' ELSE ' ' || lower(op) END, \
                    count(*)::int8, coalesce(sum(rows), 0)::int8 FROM stmt_log GROUP BY 1",
            &[],
        )
        .await?;
    let mut ddl = String::from("TRUNCATE stmt_log;");
    for t in LOGGED_TABLES {
        ddl.push_str(&format!("DROP TRIGGER log_u_{t} ON {t}; DROP TRIGGER log_o_{t} ON {t};"));
    }
    direct.batch_execute(&ddl).await?;
    let writes = Writes(rows.iter().map(|r| (r.get(0), (r.get(1), r.get(2)))).collect());
    Ok((value?, writes))
}

/// Cluster-wide WAL position (other sessions on the cluster write too: medians, not exact).
async fn wal_lsn(db: &Db) -> anyhow::Result<String> {
    Ok(db.get().await?.fetch_one("SELECT pg_current_wal_insert_lsn()::text", &[]).await?.get(0))
}

async fn wal_since(db: &Db, lsn: &str) -> anyhow::Result<i64> {
    Ok(db
        .get()
        .await?
        .fetch_one(
            "SELECT pg_wal_lsn_diff(pg_current_wal_insert_lsn(), $1::pg_lsn)::int8",
            &[(&lsn, Type::TEXT)],
        )
        .await?
        .get(0))
}

/// Durations and WAL bytes of `samples` runs of `run`.
struct Samples {
    times: Vec<Duration>,
    wal: Vec<i64>,
}

impl Samples {
    fn median(&self) -> Duration {
        quantile(&self.times, 0.5)
    }

    fn p95(&self) -> Duration {
        quantile(&self.times, 0.95)
    }

    fn median_wal(&self) -> i64 {
        let mut wal = self.wal.clone();
        wal.sort_unstable();
        wal.get(wal.len() / 2).copied().unwrap_or(0)
    }
}

async fn sampled<F, Fut>(db: &Db, samples: usize, mut run: F) -> anyhow::Result<Samples>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<()>>,
{
    let mut result = Samples { times: Vec::with_capacity(samples), wal: Vec::with_capacity(samples) };
    for _ in 0..samples {
        let lsn = wal_lsn(db).await?;
        let started = Instant::now();
        run().await?;
        result.times.push(started.elapsed());
        result.wal.push(wal_since(db, &lsn).await?);
    }
    result.times.sort();
    Ok(result)
}

async fn batch_row_heartbeat(db: &Db, worker: Uuid, expected: i64) -> anyhow::Result<()> {
    let mut conn = db.get().await?;
    let tx = db::begin(
        &mut conn,
        db::TxLimits { statement: Duration::from_secs(600), idle: Duration::from_secs(600) },
    )
    .await?;
    let n = tx.fetch_all(BATCH_ROW_HEARTBEAT, &[(&worker, Type::UUID)]).await?.len();
    db::commit(tx).await?;
    anyhow::ensure!(n as i64 == expected, "batch heartbeat returned {n} rows, expected {expected}");
    Ok(())
}

/// One autocommit UPDATE per chat, one after another on one connection.
async fn per_chat_heartbeat(db: &Db, ids: &[Uuid]) -> anyhow::Result<()> {
    let conn = db.get().await?;
    for id in ids {
        anyhow::ensure!(
            conn.exec(PER_CHAT_HEARTBEAT, &[(id, Type::UUID)]).await? == 1,
            "chat {id} not updated"
        );
    }
    Ok(())
}

struct HeartbeatResult {
    n: i64,
    beat: Samples,
    beat_writes: Writes,
    batch: Samples,
    batch_writes: Writes,
    per_chat: Samples,
    per_chat_measured: i64,
}

async fn heartbeat_at(
    bench: &BenchDb,
    w: &BenchWorker,
    n: i64,
    args: &Args,
) -> anyhow::Result<HeartbeatResult> {
    fill(bench, n, Some(w.me.id)).await?;
    let chats: Vec<(Uuid, i64)> =
        w.db.get()
            .await?
            .fetch_all("SELECT id, generation FROM chats ORDER BY created_at, id", &[])
            .await?
            .iter()
            .map(|r| (r.get(0), r.get(1)))
            .collect();
    let ids: Vec<Uuid> = chats.iter().map(|(id, _)| *id).collect();

    w.register(chats)?;
    let heartbeat = w.chats.heartbeat(w.lease());
    let report = heartbeat.beat().await?;
    anyhow::ensure!(
        (report.owned as i64, report.interrupted, report.released) == (n, 0, 0),
        "heartbeat found {report:?} with {n} chats registered and owned"
    );

    let beat = sampled(&w.db, args.samples, || async {
        heartbeat.beat().await?;
        Ok(())
    })
    .await?;
    let (_, beat_writes) = counted(bench, async { Ok(heartbeat.beat().await?) }).await?;

    let batch = sampled(&w.db, args.samples, || batch_row_heartbeat(&w.db, w.me.id, n)).await?;
    let (_, batch_writes) = counted(bench, batch_row_heartbeat(&w.db, w.me.id, n)).await?;

    let measured = n.min(args.per_chat_max);
    let subset = &ids[..measured as usize];
    let per_chat = sampled(&w.db, args.per_chat_samples.max(1), || per_chat_heartbeat(&w.db, subset)).await?;

    w.unregister_all().await;
    Ok(HeartbeatResult { n, beat, beat_writes, batch, batch_writes, per_chat, per_chat_measured: measured })
}

fn heartbeat_tables(results: &[HeartbeatResult]) {
    let mut rows = Vec::new();
    for r in results {
        let scale = r.n as f64 / r.per_chat_measured as f64;
        let per_chat_median = r.per_chat.median().mul_f64(scale);
        let beat = r.beat.median().as_secs_f64();
        let extrapolated = if r.per_chat_measured < r.n {
            format!(" (extrapolated ×{scale:.0} from {} chats)", r.per_chat_measured)
        } else {
            String::new()
        };
        rows.push(vec![
            format!("**heartbeat tick (`Heartbeat::beat`)**, {} chats", r.n),
            r.beat.times.len().to_string(),
            format!("**{}**", ms(r.beat.median())),
            ms(r.beat.p95()),
            r.beat_writes.describe(),
            format!("{:.1}", r.beat.median_wal() as f64 / 1024.0),
            format!("{:.1}×", r.batch.median().as_secs_f64() / beat),
            format!("{:.0}×", per_chat_median.as_secs_f64() / beat),
        ]);
        rows.push(vec![
            format!("(a) per-chat-row batch `UPDATE … RETURNING id`, {} chats", r.n),
            r.batch.times.len().to_string(),
            ms(r.batch.median()),
            ms(r.batch.p95()),
            r.batch_writes.describe(),
            format!("{:.1}", r.batch.median_wal() as f64 / 1024.0),
            "1×".into(),
            String::new(),
        ]);
        rows.push(vec![
            format!("(b) one `UPDATE … WHERE id = $1` per chat, {} chats{extrapolated}", r.n),
            r.per_chat.times.len().to_string(),
            ms(per_chat_median),
            ms(r.per_chat.p95().mul_f64(scale)),
            format!("chats: {} stmt / {} rows", r.n, r.n),
            format!("{:.1}", r.per_chat.median_wal() as f64 * scale / 1024.0),
            String::new(),
            "1×".into(),
        ]);
    }
    table(
        "Heartbeat tick with N registered running chats (one worker)",
        &[
            "variant",
            "samples",
            "median ms",
            "p95 ms",
            "writes per tick",
            "WAL KiB (median)",
            "(a) / this",
            "(b) / this",
        ],
        &rows,
    );
    for r in results {
        let chat_rows = r.beat_writes.rows("chats");
        println!(
            "\n{} chats: the heartbeat tick ran {} write statement(s), {chat_rows} chat row(s) written; \
             (a) wrote {} chat rows in {} statement(s).",
            r.n,
            r.beat_writes.statements(),
            r.batch_writes.rows("chats"),
            r.batch_writes.statements(),
        );
    }
}

/// The bytes one real runner task holds besides its agent: `runner::run`'s future, unpolled.
async fn runner_future_size(w: &BenchWorker) -> anyhow::Result<usize> {
    let meter = opentelemetry::global::meter("bench");
    let config = chats_config();
    let command = config.runner.agent_command().context("no agent command")?;
    let runners = w.chats.runners().clone();
    let ctx = std::sync::Arc::new(ChatsContext {
        db: w.db.clone(),
        worker_id: w.me.id,
        agent: Agent::new(command, config.runner.limits()),
        metrics: worker::chats::metrics::ChatMetrics::new(&meter, move || runners.len()),
        config,
        lease: w.rt.lease(),
        guard: worker::chats::guard::LeaseGuard::start(Path::new(env!("CARGO_BIN_EXE_worker"))).await?,
    });
    let chat = Claimed {
        id: Uuid::new_v4(),
        generation: 1,
        owner_id: Uuid::new_v4(),
        workspace_id: None,
        title: String::new(),
    };
    // A signal comes only with a registered task: a throwaway set's task takes the real future's
    // measure and ends without polling it.
    let supervisor = worker::runtime::Supervisor::default();
    let set: worker::chats::runner::Runners = supervisor.task_set("size", runner::SHUTDOWN_CAUSE);
    let mut size = 0;
    let lease = ctx.lease.current();
    set.start(chat.id, 1, |signal| {
        size = std::mem::size_of_val(&runner::run(ctx, chat, lease, signal, opentelemetry::Context::new()));
        async {}
    })?;
    Ok(size)
}

/// The real binary, chats enabled with room for 100k chats: its memory once `/readyz` answers
/// 200 and its loops have ticked for a few seconds, then again holding `running` real chats
/// (each turn a real runner with an agent subprocess that reads its input and sleeps).
async fn real_worker_memory(bench: &BenchDb, running: i64) -> anyhow::Result<RealWorkerMemory> {
    let sets = [
        "chats.max_running=100000".to_owned(),
        "chats.max_per_acquire=10000".to_owned(),
        r#"chats.runner.command=["/bin/sh", "-c", "cat >/dev/null; exec sleep 600"]"#.to_owned(),
    ];
    let mut child = common::start_worker(&bench.url, &sets, Stdio::null(), Duration::from_secs(30)).await?;
    let pid = child.id().context("worker exited at once")?;
    tokio::time::sleep(Duration::from_secs(5)).await;
    let idle = memory_fields(&pid.to_string())?;
    let busy = if running > 0 {
        fill(bench, running, None).await?;
        let direct = bench.direct().await?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            let n: i64 = direct
                .fetch_one("SELECT count(*)::int8 FROM chats WHERE status = 'running'", &[])
                .await?
                .get(0);
            if n == running {
                break;
            }
            anyhow::ensure!(Instant::now() < deadline, "only {n} of {running} chats started running");
            anyhow::ensure!(child.try_wait()?.is_none(), "the worker binary exited");
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
        // Every runner has spawned its agent and fed it its input by now; let it settle.
        tokio::time::sleep(Duration::from_secs(5)).await;
        Some((running, memory_fields(&pid.to_string())?))
    } else {
        None
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGTERM)?;
    tokio::time::timeout(Duration::from_secs(60), child.wait()).await??;
    bench.direct().await?.batch_execute("TRUNCATE chats CASCADE").await?;
    Ok(RealWorkerMemory { idle, busy })
}

/// The id of the `i`th chat of [`registry_child`], spread like random ids (the registry hashes
/// them) but computed, so the child holds no list of them.
fn chat_id(i: i64) -> Uuid {
    fn mix(mut x: u64) -> u64 {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        x ^ (x >> 31)
    }
    Uuid::from_u64_pair(mix(i as u64), mix(!(i as u64)))
}

/// Memory (KiB: VmRSS, VmHWM, RssAnon, RssFile) of a fresh chat worker process around
/// registering `n` chats.
struct RegistryMemory {
    n: i64,
    before: [u64; 4],
    registered: [u64; 4],
    after_beats: [u64; 4],
}

/// How many heartbeats [`registry_child`] runs over its chats before it reads its peak.
const CHILD_BEATS: usize = 5;

/// The child of [`registry_memory`]: a process that is a chat worker and nothing else (runtime,
/// pool of 4, chat loops, lease), with no heap left over from other measurements. It inserts `n`
/// chats running under itself (ids from [`chat_id`]), registers a runner per chat whose task only
/// awaits its stop signal, then runs [`CHILD_BEATS`] heartbeats; prints its memory at each step.
async fn registry_child(url: &str, n: i64) -> anyhow::Result<()> {
    let w = BenchWorker::start(url, 4).await?;
    let direct = db::connect_direct(url, "bench registry child").await?;
    const CHUNK: i64 = 10_000;
    for start in (0..n).step_by(CHUNK as usize) {
        let ids: Vec<Uuid> = (start..(start + CHUNK).min(n)).map(chat_id).collect();
        direct
            .exec(
                "INSERT INTO chats (id, owner_id, status, worker_id, generation, started_at) \
                 SELECT u, gen_random_uuid(), 'running', $2, 1, now() FROM unnest($1::uuid[]) AS u",
                &[(&ids, Type::UUID_ARRAY), (&w.me.id, Type::UUID)],
            )
            .await?;
    }
    direct.batch_execute("VACUUM ANALYZE chats").await?;
    // Every pooled connection opened, as a long-running worker's are.
    let warm: Vec<_> = futures_util::future::try_join_all((0..4).map(|_| w.db.get())).await?;
    drop(warm);
    let before = memory_fields("self")?;
    w.register((0..n).map(|i| (chat_id(i), 1)))?;
    let registered = memory_fields("self")?;
    let heartbeat = w.chats.heartbeat(w.lease());
    for _ in 0..CHILD_BEATS {
        let report = heartbeat.beat().await?;
        anyhow::ensure!(
            (report.owned as i64, report.interrupted, report.released) == (n, 0, 0),
            "heartbeat found {report:?} with {n} chats registered and owned"
        );
    }
    let after_beats = memory_fields("self")?;
    let line = [before, registered, after_beats].iter().flatten().map(u64::to_string).collect::<Vec<_>>();
    println!("{}", line.join(" "));
    Ok(())
}

/// Runs [`registry_child`] in a child process (this benchmark binary again) and reads its line.
async fn registry_memory(bench: &BenchDb, n: i64) -> anyhow::Result<RegistryMemory> {
    bench.direct().await?.batch_execute("TRUNCATE chats CASCADE").await?;
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--registry-child", &bench.url, &n.to_string()])
        .stderr(Stdio::inherit())
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "the registry child failed: {}", output.status);
    bench.direct().await?.batch_execute("TRUNCATE chats CASCADE").await?;
    let text = String::from_utf8(output.stdout)?;
    let fields: Vec<u64> = text.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    let step = |i: usize| -> anyhow::Result<[u64; 4]> {
        fields
            .get(i * 4..i * 4 + 4)
            .and_then(|f| f.try_into().ok())
            .with_context(|| format!("child said {text:?}"))
    };
    Ok(RegistryMemory { n, before: step(0)?, registered: step(1)?, after_beats: step(2)? })
}

fn memory_table(registry: &RegistryMemory, future_size: usize, real: Option<&RealWorkerMemory>) {
    let n = registry.n;
    let before = registry.before;
    let per_chat = |kib: u64| format!("{:.0}", kib.saturating_sub(before[0]) as f64 * 1024.0 / n as f64);
    let mut rows = vec![
        vec![
            "fresh chat worker process (runtime, pool of 4 open, chat loops, lease), nothing registered"
                .into(),
            mib(before[0]),
            mib(before[1]),
            String::new(),
            String::new(),
        ],
        vec![
            format!("… with {n} chats registered (a supervised task + registry entry each)"),
            mib(registry.registered[0]),
            mib(registry.registered[1]),
            format!("**+{}**", mib(registry.registered[0].saturating_sub(before[0]))),
            per_chat(registry.registered[0]),
        ],
        vec![
            format!("… after {CHILD_BEATS} heartbeats over the {n} chats (VmHWM: the peak, ticks included)"),
            mib(registry.after_beats[0]),
            mib(registry.after_beats[1]),
            format!(
                "+{} (peak +{})",
                mib(registry.after_beats[0].saturating_sub(before[0])),
                mib(registry.after_beats[1].saturating_sub(before[0]))
            ),
            per_chat(registry.after_beats[1]),
        ],
    ];
    let mut headline = None;
    match real {
        Some(real) => {
            let [rss, hwm, anon, file] = real.idle;
            rows.push(vec![
                format!(
                    "real `worker` binary, chats enabled (max_running 100000), idle, all default loops \
                     (anonymous {}, file-backed {})",
                    mib(anon),
                    mib(file)
                ),
                mib(rss),
                mib(hwm),
                String::new(),
                String::new(),
            ]);
            headline = Some(hwm.max(rss) + registry.after_beats[1].saturating_sub(before[0]));
            if let Some((n, [busy_rss, busy_hwm, busy_anon, _])) = real.busy {
                let per_chat = busy_rss.saturating_sub(rss) as f64 * 1024.0 / n as f64;
                rows.push(vec![
                    format!(
                        "… the same binary running {n} real chats (runner + agent subprocess each; \
                         anonymous +{})",
                        mib(busy_anon.saturating_sub(anon))
                    ),
                    mib(busy_rss),
                    mib(busy_hwm),
                    format!("+{}", mib(busy_rss.saturating_sub(rss))),
                    format!("{per_chat:.0}"),
                ]);
            }
        }
        None => rows.push(vec![
            "real `worker` binary: not measured (see stderr)".into(),
            String::new(),
            String::new(),
            String::new(),
            String::new(),
        ]),
    }
    table(
        "Memory (MiB, from /proc/<pid>/status)",
        &["what", "VmRSS", "VmHWM", "increase", "bytes per chat"],
        &rows,
    );
    if let Some(kib) = headline {
        println!(
            "\nThe worker holding {n} registered chats, at its peak: the real binary's idle peak + the \
             registry's peak increase = **{} MiB** ({:.1} MB).",
            mib(kib),
            kib as f64 * 1024.0 / 1e6
        );
    }
    println!(
        "\nOne real runner's task future (`runner::run`, unpolled) is {future_size} bytes; the registered \
         task measured here holds a future of a few dozen bytes instead. Every real runner also owns an agent \
         subprocess, which this does not count."
    );
}

/// Claims with the acquire loop's statement until nothing is pending, registering a runner per
/// claimed chat like the loop does.
async fn claim_all(w: &BenchWorker, limit: i64) -> anyhow::Result<u64> {
    let mut total = 0u64;
    loop {
        let mut conn = w.db.get().await?;
        let tx = db::begin(&mut conn, w.db.tx_limits()).await?;
        let rules = Rules::of(&ChatsConfig::default());
        let admitted = admission::claim(&tx, w.me.id, u32::try_from(limit)?, rules).await?;
        db::commit(tx).await?;
        if admitted.chats.is_empty() {
            return Ok(total);
        }
        total += admitted.chats.len() as u64;
        w.register(admitted.chats.iter().map(|(c, _)| (c.id, c.generation)))?;
    }
}

struct AcquireResult {
    label: String,
    claimed: u64,
    elapsed: Duration,
    split: (u64, u64),
}

async fn acquire(
    bench: &BenchDb,
    workers: &[BenchWorker; 2],
    m: i64,
    limit: i64,
) -> anyhow::Result<AcquireResult> {
    fill(bench, m, None).await?;
    let started = Instant::now();
    let (a, b) = tokio::try_join!(claim_all(&workers[0], limit), claim_all(&workers[1], limit))?;
    let elapsed = started.elapsed();
    let check = bench
        .db
        .get()
        .await?
        .fetch_one(
            "SELECT count(*) FILTER (WHERE status = 'running')::int8, \
                    count(*) FILTER (WHERE generation = 1)::int8, count(*)::int8 FROM chats",
            &[],
        )
        .await?;
    let (running, first_generation, all): (i64, i64, i64) = (check.get(0), check.get(1), check.get(2));
    anyhow::ensure!(
        running == m && first_generation == m && all == m && (a + b) as i64 == m,
        "claims: {a} + {b}, running {running}, generation 1: {first_generation} of {all}"
    );
    for w in workers {
        w.unregister_all().await;
    }
    Ok(AcquireResult {
        label: format!("{m} pending, the claim with LIMIT {limit}"),
        claimed: a + b,
        elapsed,
        split: (a, b),
    })
}

async fn acquisition(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let workers = [BenchWorker::start(&bench.url, 2).await?, BenchWorker::start(&bench.url, 2).await?];
    let baseline = acquire(bench, &workers, args.acquire_baseline, 1).await?;
    let batched = acquire(bench, &workers, args.acquire, args.batch).await?;
    let base_rate = rate(baseline.claimed, baseline.elapsed);
    let rows: Vec<Vec<String>> = [&baseline, &batched]
        .iter()
        .map(|r| {
            let chats_per_s = rate(r.claimed, r.elapsed);
            vec![
                r.label.clone(),
                format!("{} + {}", r.split.0, r.split.1),
                format!("{:.2}", r.elapsed.as_secs_f64()),
                format!("{chats_per_s:.0}"),
                format!("{:.1}×", chats_per_s / base_rate),
            ]
        })
        .collect();
    table(
        "Acquisition, pending → running, two workers side by side (two pools, SKIP LOCKED)",
        &["variant", "claimed by A + B", "seconds", "chats/s", "vs LIMIT 1"],
        &rows,
    );
    println!("\nEvery chat ended `running` with generation 1: none was claimed twice.");
    for w in &workers {
        w.rt.begin_shutdown();
        w.rt.drained().await;
    }
    Ok(())
}

async fn run(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    prepare(bench).await?;
    let real = match real_worker_memory(bench, args.real_chats).await {
        Ok(memory) => Some(memory),
        Err(error) => {
            eprintln!("real worker RSS not measured: {error:#}");
            None
        }
    };
    let largest = args.sizes.iter().copied().max().unwrap_or(0);
    let registry = registry_memory(bench, largest).await?;
    let w = BenchWorker::start(&bench.url, 4).await?;
    let mut results = Vec::new();
    for &n in &args.sizes {
        results.push(heartbeat_at(bench, &w, n, args).await?);
    }
    heartbeat_tables(&results);
    memory_table(&registry, runner_future_size(&w).await?, real.as_ref());
    w.rt.begin_shutdown();
    w.rt.drained().await;
    acquisition(bench, args).await
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    if let Some((url, n)) = &args.registry_child {
        return registry_child(url, *n).await;
    }
    let bench = BenchDb::create(4).await?;
    let result = run(&bench, &args).await;
    bench.drop_now().await?;
    result
}
