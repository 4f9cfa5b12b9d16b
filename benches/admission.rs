//! Fairness of chat admission (issue 19, "Fairness benchmark"; targets in
//! BENCHMARKS.md#targets): today's FIFO claim against the fair claim, in the same run, on the same
//! load, through the code that ships.
//!
//! # Part 1: the load of point 2, real workers, real agents
//!
//! Each run starts `--workers` (3) chat workers in this process, each with its own runtime, pool,
//! identity, lease row, LISTEN connection and lease guard, running the real `chats_acquire`,
//! `chats_heartbeat` and `chats_recover` loops (`rt.spawn(chats.acquire())`, …) with
//! `max_running` 50. The agent is a shell script that reads its input and sleeps `--turn-ms`
//! (200 ms), then exits 0 without output: the turn ends `waiting`. So what is measured is the
//! acquire loop, the claim, runner start-up and the turn's writes, as in the daemon.
//!
//! The load, in one transaction through the normal pending path: 200 chats of one heavy owner and
//! 3 chats each of 20 light owners are created `waiting`, `post_chat_message` posts a user
//! message to each (the chat becomes `pending`, NOTIFY `chat_pending` wakes the acquire loops at
//! commit), and `pending_since` is set to `t0` (the database clock just before commit) for the
//! light chats and to `t0 − 1 s` for the heavy owner's: the heavy owner's burst is older, so FIFO
//! serves all of it first. Everything becomes claimable at once (one commit), so all 260 chats
//! compete for the 150 runners from the first claim; with two commits the heavy burst would fill
//! every runner before the light chats exist, and the order of admission would not matter.
//!
//! Runs, each `--reps` times (5), interleaved so drift on a shared machine hits all alike, each
//! on fresh workers and a fresh load in the same database:
//!
//! 1. **FIFO** (`chats.admission = fifo`, no cap): today's behaviour, oldest wait first.
//! 2. **fair** (`chats.admission = fair`, no cap): work-conserving; this is the run whose
//!    throughput is compared with FIFO's.
//! 3. **fair + cap** (`max_running_per_owner = 5`, point 2's config; `--capped-reps`, 1): shown
//!    for completeness. A cap idles capacity when one owner is most of the load (here at most
//!    65 of 150 runners are busy while the heavy owner waits), so its throughput is not comparable
//!    and no target applies to it.
//!
//! `chats.acquire_interval` is `--acquire-interval-ms` (50 ms) instead of the shipped 1 s: a
//! runner that ends frees its slot without waking the acquire loop (only new pending chats
//! NOTIFY), so with 1 s every second-round claim would wait for the next tick, for FIFO and fair
//! alike, and the figures would measure the poll interval, not the order of admission.
//! `max_per_acquire` stays at its default (5): a claim takes 5 chats, and a loop with room drains
//! at once (`Progress::More`).
//!
//! Measured, from the database clock:
//!
//! - **wait** = `started_at − pending_since`, with `pending_since` as the load set it, except
//!   that the heavy owner's back-dating is not counted: every chat's wait starts at `t0`, when the
//!   load committed. (`pending_since` is cleared when a chat leaves pending, so `t0` is kept
//!   here.) `started_at` is the claim transaction's `now()`, its start, before the claim lock.
//! - **runner time** of a chat = `[started_at, updated_at]` of the ended turn (`FINISH_TURN`
//!   sets `updated_at`): the slot it held, agent start-up and writes included.
//! - **throughput** = chats / makespan, makespan = `t0` → the last turn's end.
//! - **Jain's index** over owners, in the contended window `W = [t0, t0 + one turn]`: all 260
//!   chats are pending at `t0` and only 150 can run, so who is handed runner time during the
//!   first turn is what the order of admission decides. Each owner's demand in `W` is
//!   `min(its chats, runners) × turn` runner-seconds; the runner-seconds actually handed out in
//!   `W` are water-filled over those demands (max-min fair: a light owner is owed at most its
//!   3 × 0.2 s, the heavy owner the rest); `x_i` = runner time owner `i` got in `W` / what it was
//!   owed, and Jain = `(Σx)² / (n Σx²)`. 1 = every owner got the same fraction of its fair share;
//!   `1/n` = one owner got everything. FIFO hands the first turn's runners to the heavy owner
//!   only: `1/21` ≈ 0.048. The fair order admits every light owner in the first claims: close
//!   to 1. The share is of what was handed out, not of the nominal 150 runners, so how fast the
//!   workers fill their runners (start-up, a loaded machine) does not pass for unfairness; runners
//!   left idle in `W` (start-up, or a cap: the capped run scores high because what it hands out
//!   is shared fairly) show in "runners busy in W" and in the throughput instead.
//!
//! `--timeline` prints each run's claims to stderr (start, heavy + light chats, first turn end):
//! on a loaded machine the workers are bound by the claim → runner start-up pipeline, not by the
//! 150 runners, and this shows it.
//!
//! # Part 2: the claim statement against a large backlog
//!
//! `--backlogs` (1k and 100k) pending chats of ONE owner (distinct `pending_since`) plus the 20
//! light owners' 3 each, `VACUUM ANALYZE`d; then `--samples` (300) calls of
//! `admission::claim` (the claim lock and the `CLAIM` statement, two round trips, as the acquire
//! loop runs them) with limit 5, each in a transaction rolled back, for the fair order with
//! `max_running_per_owner = 5`, the fair order without a cap, and FIFO. Each variant also runs
//! `EXPLAIN (ANALYZE, BUFFERS)` of `CLAIM` with the same parameters once (rolled back: the
//! statement writes): the table shows the buffers it touched and the largest `rows × loops` of any
//! plan node, and, from `--samples / 5` runs of `EXPLAIN (ANALYZE, TIMING OFF)`, the statement's
//! planning + execution time in the server, apart from round trips and the client's scheduling
//! (which the samples include: on a busy machine their tail is mostly that). An index-driven plan reads a bounded number
//! of the heavy owner's rows, so these are the same at 1k and at 100k; a plan that scanned the
//! backlog would show it there. The text plan of the fair claim with the cap at the largest
//! backlog is printed whole.
//!
//! `cargo bench --bench admission -- [--small] [--reps N] [--capped-reps N] [--workers N]
//! [--max-running N] [--cap N] [--heavy N] [--light-owners N] [--light-chats N] [--turn-ms N]
//! [--acquire-interval-ms N] [--max-per-acquire N] [--backlogs 1000,100000] [--samples N]
//! [--timeline]`;
//! `--small` is one rep of each run and backlogs of 1k and 10k with 50 samples (for a quick
//! dev-profile check). `scripts/bench.sh admission` runs it and prints the machine it ran on.

mod common;

use std::collections::HashMap;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::Context;
use chrono::{DateTime, Utc};
use common::{BenchDb, ms, quantile, table};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::chats::admission::{self, CLAIM, CLAIM_LOCK_KEY, LOCK, OLDEST_HEAD, OWNER_SWEEP, Order, Rules};
use worker::chats::{ChatLoops, ChatsConfig, RunnerConfig};
use worker::db::{self, DatabaseConfig, Db, Exec};
use worker::health::Health;
use worker::identity::WorkerIdentity;
use worker::runtime::{Runtime, RuntimeConfig};
use worker::workers::{WorkerLease, WorkersConfig};

/// The targets of the issue.
const LIGHT_P99_RATIO_TARGET: f64 = 0.2;
const THROUGHPUT_RATIO_TARGET: f64 = 0.95;
const CLAIM_P99_TARGET: Duration = Duration::from_millis(5);
const CLAIM_TARGET_BACKLOG: i64 = 100_000;

struct Args {
    workers: usize,
    max_running: u32,
    cap: u32,
    heavy: i64,
    light_owners: usize,
    light_chats: i64,
    turn: Duration,
    acquire_interval: Duration,
    max_per_acquire: u32,
    reps: usize,
    capped_reps: usize,
    backlogs: Vec<i64>,
    samples: usize,
    /// Print each run's claims (start instant, heavy and light chats) to stderr.
    timeline: bool,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Args {
            workers: 3,
            max_running: 50,
            cap: 5,
            heavy: 200,
            light_owners: 20,
            light_chats: 3,
            turn: Duration::from_millis(200),
            acquire_interval: Duration::from_millis(50),
            max_per_acquire: 5,
            reps: 5,
            capped_reps: 1,
            backlogs: vec![1_000, CLAIM_TARGET_BACKLOG],
            samples: 300,
            timeline: false,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--small" => {
                    args.reps = 1;
                    args.capped_reps = 1;
                    args.backlogs = vec![1_000, 10_000];
                    args.samples = 50;
                }
                "--workers" => args.workers = value()?.parse()?,
                "--max-running" => args.max_running = value()?.parse()?,
                "--cap" => args.cap = value()?.parse()?,
                "--heavy" => args.heavy = value()?.parse()?,
                "--light-owners" => args.light_owners = value()?.parse()?,
                "--light-chats" => args.light_chats = value()?.parse()?,
                "--turn-ms" => args.turn = Duration::from_millis(value()?.parse()?),
                "--acquire-interval-ms" => args.acquire_interval = Duration::from_millis(value()?.parse()?),
                "--max-per-acquire" => args.max_per_acquire = value()?.parse()?,
                "--reps" => args.reps = value()?.parse()?,
                "--capped-reps" => args.capped_reps = value()?.parse()?,
                "--backlogs" => {
                    args.backlogs =
                        value()?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
                }
                "--samples" => args.samples = value()?.parse()?,
                "--timeline" => args.timeline = true,
                _ => {} // cargo bench passes --bench
            }
        }
        anyhow::ensure!(
            args.workers > 0 && args.max_running > 0 && args.reps > 0 && args.samples > 0,
            "nothing to measure"
        );
        Ok(args)
    }

    fn runners(&self) -> usize {
        self.workers * self.max_running as usize
    }
}

/// The three runs of part 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
enum Variant {
    Fifo,
    Fair,
    FairCapped,
}

impl Variant {
    fn label(self, args: &Args) -> String {
        match self {
            Variant::Fifo => "FIFO (admission = fifo, no cap)".into(),
            Variant::Fair => "fair (admission = fair, no cap)".into(),
            Variant::FairCapped => format!("fair + max_running_per_owner = {}", args.cap),
        }
    }

    fn config(self, args: &Args, agent: &[String]) -> ChatsConfig {
        let (admission, cap) = match self {
            Variant::Fifo => (Order::Fifo, 0),
            Variant::Fair => (Order::Fair, 0),
            Variant::FairCapped => (Order::Fair, args.cap),
        };
        ChatsConfig {
            enabled: true,
            max_running: args.max_running,
            max_per_acquire: args.max_per_acquire,
            acquire_interval: args.acquire_interval,
            max_running_per_owner: cap,
            admission,
            runner: RunnerConfig {
                command: agent.to_vec(),
                kill_grace: Duration::from_secs(2),
                ..RunnerConfig::default()
            },
            ..ChatsConfig::default()
        }
    }
}

/// One chat worker of the benchmark, as the daemon runs it: runtime (own pool, identity), lease
/// row, LISTEN connection, chat loops ticking.
struct BenchWorker {
    rt: Runtime,
    id: Uuid,
    _chats: ChatLoops,
    listener_stop: CancellationToken,
}

impl BenchWorker {
    async fn start(url: &str, config: ChatsConfig) -> anyhow::Result<Self> {
        let db = Db::new(&DatabaseConfig { url: url.to_owned(), ..DatabaseConfig::default() })?;
        let me = WorkerIdentity::generate();
        let meter = opentelemetry::global::meter("bench-admission");
        let health = Health::default();
        let rt =
            Runtime::for_worker(db.clone(), health.clone(), &meter, RuntimeConfig::default(), me.clone());
        let lease = || {
            WorkerLease::new(db.clone(), me.clone(), WorkersConfig::default())
                .publishing_to(rt.lease_publisher())
        };
        lease().register().await?;
        let chats = ChatLoops::new(&rt, config, &meter, Path::new(env!("CARGO_BIN_EXE_worker"))).await?;
        rt.spawn(chats.acquire());
        rt.spawn(chats.heartbeat(lease()));
        rt.spawn(chats.recover(Duration::from_secs(3600)));
        // The loops' wakes are subscribed above, so the first connection LISTENs on them before
        // it counts as connected.
        let listener_stop = CancellationToken::new();
        let mut connects = rt.listener().start(url.to_owned(), health, listener_stop.clone()).connects;
        tokio::time::timeout(Duration::from_secs(10), connects.wait_for(|n| *n > 0))
            .await
            .context("the LISTEN connection did not come up")??;
        Ok(Self { rt, id: me.id, _chats: chats, listener_stop })
    }

    async fn stop(self) {
        self.rt.begin_shutdown();
        self.rt.drained().await;
        self.listener_stop.cancel();
    }
}

/// Writes the agent: reads its input, sleeps one turn, exits 0 without output (→ `waiting`).
fn write_agent(dir: &Path, turn: Duration) -> anyhow::Result<Vec<String>> {
    let path = dir.join("agent");
    // `read` is a builtin: the turn costs two execs (sh, sleep), as little CPU as an agent can.
    let body = format!("#!/bin/sh\nwhile read -r _; do :; done\nexec sleep {:.3}\n", turn.as_secs_f64());
    std::fs::write(&path, body)?;
    let mut permissions = std::fs::metadata(&path)?.permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&path, permissions)?;
    Ok(vec![path.to_string_lossy().into_owned()])
}

/// The owners of the load: one heavy, `light_owners` light.
struct Owners {
    heavy: Uuid,
    light: Vec<Uuid>,
}

impl Owners {
    fn new(args: &Args) -> Self {
        Self { heavy: Uuid::new_v4(), light: (0..args.light_owners).map(|_| Uuid::new_v4()).collect() }
    }

    fn all(&self) -> impl Iterator<Item = Uuid> + '_ {
        std::iter::once(self.heavy).chain(self.light.iter().copied())
    }
}

/// Creates the load in one transaction through `post_chat_message` and returns `t0` (database
/// clock, just before the commit that makes it all claimable).
async fn make_pending(bench: &BenchDb, owners: &Owners, args: &Args) -> anyhow::Result<DateTime<Utc>> {
    let mut list: Vec<Uuid> = vec![owners.heavy; args.heavy as usize];
    for owner in &owners.light {
        list.extend(std::iter::repeat_n(*owner, args.light_chats as usize));
    }
    let mut conn = bench.db.get().await?;
    let tx = db::begin(&mut conn, Duration::from_secs(60)).await?;
    tx.exec(
        "INSERT INTO chats (owner_id, title) SELECT o, 'admission bench' FROM unnest($1::uuid[]) AS o",
        &[(&list, Type::UUID_ARRAY)],
    )
    .await?;
    let posted: i64 = tx
        .fetch_one(
            "SELECT count(post_chat_message(id, 'user', '\"go\"'::jsonb))::int8 FROM chats WHERE status = 'waiting'",
            &[],
        )
        .await?
        .get(0);
    anyhow::ensure!(posted == list.len() as i64, "posted {posted} of {}", list.len());
    let t0: DateTime<Utc> = tx.fetch_one("SELECT clock_timestamp()", &[]).await?.get(0);
    let set = tx
        .exec(
            "UPDATE chats SET pending_since = $1 - CASE WHEN owner_id = $2 THEN interval '1 second' \
                                                       ELSE interval '0 seconds' END \
             WHERE status = 'pending'",
            &[(&t0, Type::TIMESTAMPTZ), (&owners.heavy, Type::UUID)],
        )
        .await?;
    anyhow::ensure!(set == list.len() as u64, "pending_since set on {set} of {}", list.len());
    db::commit(tx).await?;
    Ok(t0)
}

/// One chat's turn, in seconds since `t0`.
struct Turn {
    owner: Uuid,
    start: f64,
    end: f64,
}

/// What one run measured.
struct RunResult {
    variant: Variant,
    heavy_waits: Vec<f64>,
    light_waits: Vec<f64>,
    makespan: f64,
    chats: usize,
    jain: f64,
    /// Runner-seconds each class got in the window, over what it was owed.
    heavy_served: f64,
    light_served: f64,
    peak_running: usize,
    /// Runner time handed out in W over W's capacity (runners × W).
    busy: f64,
}

/// Waits until every chat of the load has ended its turn; fails on a chat in `error`.
async fn wait_all_ended(bench: &BenchDb, limit: Duration) -> anyhow::Result<()> {
    let conn = bench.db.get().await?;
    let deadline = Instant::now() + limit;
    loop {
        let row = conn
            .fetch_one(
                "SELECT count(*) FILTER (WHERE status IN ('pending', 'running'))::int8, \
                        count(*) FILTER (WHERE status NOT IN ('pending', 'running', 'waiting'))::int8, \
                        max(last_error) FROM chats",
                &[],
            )
            .await?;
        let (open, failed, error): (i64, i64, Option<String>) = (row.get(0), row.get(1), row.get(2));
        anyhow::ensure!(failed == 0, "{failed} chats did not end waiting: {error:?}");
        if open == 0 {
            return Ok(());
        }
        anyhow::ensure!(Instant::now() < deadline, "{open} chats still pending or running after {limit:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn run_once(
    bench: &BenchDb,
    variant: Variant,
    args: &Args,
    agent: &[String],
    owners: &Owners,
) -> anyhow::Result<RunResult> {
    let mut workers = Vec::with_capacity(args.workers);
    for _ in 0..args.workers {
        workers.push(BenchWorker::start(&bench.url, variant.config(args, agent)).await?);
    }
    // Let the first ticks (census, lease) pass: the workers are idle when the load lands.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let t0 = make_pending(bench, owners, args).await?;
    let result = wait_all_ended(bench, Duration::from_secs(300)).await;
    let ids: Vec<Uuid> = workers.iter().map(|w| w.id).collect();
    for w in workers {
        w.stop().await;
    }
    result?;
    let conn = bench.db.get().await?;
    let rows = conn
        .fetch_all(
            "SELECT owner_id, extract(epoch FROM started_at - $1)::float8, \
                    extract(epoch FROM updated_at - $1)::float8, generation FROM chats",
            &[(&t0, Type::TIMESTAMPTZ)],
        )
        .await?;
    let mut turns = Vec::with_capacity(rows.len());
    for row in &rows {
        let generation: i64 = row.get(3);
        anyhow::ensure!(generation == 1, "a chat was claimed {generation} times");
        turns.push(Turn { owner: row.get(0), start: row.get(1), end: row.get(2) });
    }
    if args.timeline {
        print_timeline(variant, &turns, owners, args);
    }
    conn.exec("DELETE FROM workers WHERE id = ANY($1)", &[(&ids, Type::UUID_ARRAY)]).await?;
    conn.exec("DELETE FROM chats", &[]).await?;
    Ok(measure(variant, &turns, owners, args))
}

/// Each claim (chats sharing a `started_at`: the claim transaction's `now()`) in start order:
/// when, how many heavy and light chats, and when its first turn ended.
fn print_timeline(variant: Variant, turns: &[Turn], owners: &Owners, args: &Args) {
    let mut claims: Vec<(f64, usize, usize, f64)> = Vec::new();
    let mut sorted: Vec<&Turn> = turns.iter().collect();
    sorted.sort_by(|a, b| a.start.total_cmp(&b.start));
    for t in sorted {
        let heavy = usize::from(t.owner == owners.heavy);
        match claims.last_mut() {
            Some(last) if last.0 == t.start => {
                last.1 += heavy;
                last.2 += 1 - heavy;
                last.3 = last.3.min(t.end);
            }
            _ => claims.push((t.start, heavy, 1 - heavy, t.end)),
        }
    }
    eprintln!("{}: {} claims (start ms: heavy+light, first end ms)", variant.label(args), claims.len());
    let line: Vec<String> =
        claims.iter().map(|(at, h, l, end)| format!("{:.0}:{h}+{l}→{:.0}", at * 1e3, end * 1e3)).collect();
    eprintln!("{}", line.join(" "));
}

/// Max-min fair allocation of `capacity` over `demands` (water-filling).
fn water_fill(capacity: f64, demands: &[f64]) -> Vec<f64> {
    let mut order: Vec<usize> = (0..demands.len()).collect();
    order.sort_by(|&a, &b| demands[a].total_cmp(&demands[b]));
    let mut shares = vec![0.0; demands.len()];
    let mut left = capacity;
    for (done, &i) in order.iter().enumerate() {
        let level = left / (demands.len() - done) as f64;
        shares[i] = demands[i].min(level);
        left -= shares[i];
    }
    shares
}

fn jain(x: &[f64]) -> f64 {
    let sum: f64 = x.iter().sum();
    let squares: f64 = x.iter().map(|v| v * v).sum();
    if squares == 0.0 { 0.0 } else { sum * sum / (x.len() as f64 * squares) }
}

fn measure(variant: Variant, turns: &[Turn], owners: &Owners, args: &Args) -> RunResult {
    let window = args.turn.as_secs_f64();
    let runners = args.runners();
    let owner_list: Vec<Uuid> = owners.all().collect();
    let mut chats_of: HashMap<Uuid, usize> = HashMap::new();
    let mut served: HashMap<Uuid, f64> = HashMap::new();
    let (mut heavy_waits, mut light_waits) = (Vec::new(), Vec::new());
    for t in turns {
        *chats_of.entry(t.owner).or_default() += 1;
        *served.entry(t.owner).or_default() += (t.end.min(window) - t.start.max(0.0)).max(0.0);
        if t.owner == owners.heavy { &mut heavy_waits } else { &mut light_waits }.push(t.start);
    }
    heavy_waits.sort_by(f64::total_cmp);
    light_waits.sort_by(f64::total_cmp);
    let demands: Vec<f64> = owner_list
        .iter()
        .map(|o| chats_of.get(o).copied().unwrap_or(0).min(runners) as f64 * window)
        .collect();
    // The runner time actually handed out in W, shared max-min fairly over the demands: the
    // index judges how what was handed out was shared, not how fast the workers filled their
    // runners (that, and runners a cap leaves idle, show in `busy` and the throughput).
    let delivered: f64 = served.values().sum();
    let owed = water_fill(delivered, &demands);
    let x: Vec<f64> = owner_list
        .iter()
        .zip(&owed)
        .map(|(o, owed)| if *owed > 0.0 { served.get(o).copied().unwrap_or(0.0) / owed } else { 1.0 })
        .collect();
    let light_owed: f64 = owed[1..].iter().sum();
    let light_served: f64 = owner_list[1..].iter().map(|o| served.get(o).copied().unwrap_or(0.0)).sum();
    // Peak concurrency: +1 at each start, −1 at each end.
    let mut events: Vec<(f64, i32)> = turns.iter().flat_map(|t| [(t.start, 1), (t.end, -1)]).collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut running, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        running += delta;
        peak = peak.max(running);
    }
    RunResult {
        variant,
        heavy_waits,
        light_waits,
        makespan: turns.iter().map(|t| t.end).fold(0.0, f64::max),
        chats: turns.len(),
        jain: jain(&x),
        heavy_served: x[0],
        light_served: if light_owed > 0.0 { light_served / light_owed } else { 1.0 },
        peak_running: peak.max(0) as usize,
        busy: delivered / (runners as f64 * window),
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn quantile_s(sorted: &[f64], q: f64) -> f64 {
    let durations: Vec<Duration> = sorted.iter().map(|s| secs(*s)).collect();
    quantile(&durations, q).as_secs_f64()
}

fn median(mut values: Vec<f64>) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Pooled over the reps of one variant.
struct Summary {
    heavy_waits: Vec<f64>,
    light_waits: Vec<f64>,
    reps: usize,
    chats: usize,
    makespan: f64,
    throughput: f64,
    jain: f64,
    heavy_served: f64,
    light_served: f64,
    peak_running: usize,
    busy: f64,
}

fn summarize(results: &[RunResult], variant: Variant) -> Option<Summary> {
    let runs: Vec<&RunResult> = results.iter().filter(|r| r.variant == variant).collect();
    if runs.is_empty() {
        return None;
    }
    let mut heavy_waits: Vec<f64> = runs.iter().flat_map(|r| r.heavy_waits.iter().copied()).collect();
    let mut light_waits: Vec<f64> = runs.iter().flat_map(|r| r.light_waits.iter().copied()).collect();
    heavy_waits.sort_by(f64::total_cmp);
    light_waits.sort_by(f64::total_cmp);
    Some(Summary {
        heavy_waits,
        light_waits,
        reps: runs.len(),
        chats: runs[0].chats,
        makespan: median(runs.iter().map(|r| r.makespan).collect()),
        throughput: median(runs.iter().map(|r| r.chats as f64 / r.makespan.max(f64::EPSILON)).collect()),
        jain: median(runs.iter().map(|r| r.jain).collect()),
        heavy_served: median(runs.iter().map(|r| r.heavy_served).collect()),
        light_served: median(runs.iter().map(|r| r.light_served).collect()),
        peak_running: runs.iter().map(|r| r.peak_running).max().unwrap_or(0),
        busy: median(runs.iter().map(|r| r.busy).collect()),
    })
}

fn ms_s(s: f64) -> String {
    ms(secs(s))
}

async fn fairness(bench: &BenchDb, args: &Args) -> anyhow::Result<Vec<(Variant, Summary)>> {
    let dir = tempfile::tempdir()?;
    let agent = write_agent(dir.path(), args.turn)?;
    let owners = Owners::new(args);
    let mut results = Vec::new();
    for rep in 0..args.reps.max(args.capped_reps) {
        let mut variants = Vec::new();
        if rep < args.reps {
            variants.extend([Variant::Fifo, Variant::Fair]);
        }
        if rep < args.capped_reps {
            variants.push(Variant::FairCapped);
        }
        for variant in variants {
            let started = Instant::now();
            let result = run_once(bench, variant, args, &agent, &owners).await?;
            eprintln!(
                "rep {}: {}: makespan {:.2} s, light p99 {} ms, Jain {:.3} ({:.1} s)",
                rep + 1,
                variant.label(args),
                result.makespan,
                ms_s(quantile_s(&result.light_waits, 0.99)),
                result.jain,
                started.elapsed().as_secs_f64()
            );
            results.push(result);
        }
    }
    let summaries: Vec<(Variant, Summary)> = [Variant::Fifo, Variant::Fair, Variant::FairCapped]
        .into_iter()
        .filter_map(|v| summarize(&results, v).map(|s| (v, s)))
        .collect();

    let light_total = args.light_owners as i64 * args.light_chats;
    let mut rows = Vec::new();
    for (variant, s) in &summaries {
        for (class, waits) in [
            (format!("heavy owner ({} chats)", args.heavy), &s.heavy_waits),
            (format!("light owners ({} × {} chats)", args.light_owners, args.light_chats), &s.light_waits),
        ] {
            rows.push(vec![
                variant.label(args),
                class,
                waits.len().to_string(),
                ms_s(quantile_s(waits, 0.5)),
                format!("**{}**", ms_s(quantile_s(waits, 0.99))),
                ms_s(waits.last().copied().unwrap_or(0.0)),
            ]);
        }
    }
    table(
        &format!(
            "Wait from pending to running (ms; {} workers × max_running {}, agents of {} ms, {} + {} chats \
             pending at once; pooled over the reps)",
            args.workers,
            args.max_running,
            args.turn.as_millis(),
            args.heavy,
            light_total
        ),
        &["run", "class", "chats", "p50", "p99", "max"],
        &rows,
    );

    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|(variant, s)| {
            vec![
                variant.label(args),
                s.reps.to_string(),
                s.chats.to_string(),
                format!("{:.2}", s.makespan),
                if *variant == Variant::FairCapped {
                    format!("{:.0} (not comparable: the cap idles runners)", s.throughput)
                } else {
                    format!("**{:.0}**", s.throughput)
                },
                format!("{} of {}", s.peak_running, args.runners()),
                format!("{:.0} %", s.busy * 100.0),
                format!("{:.2} / {:.2}", s.heavy_served, s.light_served),
                format!("**{:.3}**", s.jain),
            ]
        })
        .collect();
    table(
        "Throughput and fairness (medians over the reps)",
        &[
            "run",
            "reps",
            "chats",
            "makespan s",
            "throughput chats/s",
            "peak running",
            "runners busy in W",
            "got/owed in W: heavy / light",
            "Jain's index",
        ],
        &rows,
    );
    println!(
        "\nJain's index over the {} owners' runner time in the first turn after the load landed (W = [t0, t0 + \
         {} ms]; all {} chats pending at t0, {} runners): x_i = runner-seconds owner i held in W / its max-min \
         fair share of the runner-seconds handed out in W (water-filled over each owner's demand, min(chats, \
         runners) × turn); index = (Σx)² / (n·Σx²): 1 = every owner got the same fraction of its share, 1/{} = \
         one owner got everything. Runners left idle in W (start-up, a cap) are not in the index: see \
         \"runners busy in W\" and the throughput. Throughput = chats / makespan (t0 → the last turn's end). \
         Every wait starts at t0 (the heavy owner's pending_since is back-dated by 1 s only to order it first).",
        args.light_owners + 1,
        args.turn.as_millis(),
        args.heavy + light_total,
        args.runners(),
        args.light_owners + 1,
    );
    Ok(summaries)
}

/// `n` pending chats of `heavy` (oldest first, distinct `pending_since`), the light owners'
/// chats after them, `VACUUM ANALYZE`d.
async fn fill_backlog(bench: &BenchDb, owners: &Owners, n: i64, args: &Args) -> anyhow::Result<()> {
    let direct = bench.direct().await?;
    direct.batch_execute("TRUNCATE chats CASCADE").await?;
    direct
        .exec(
            "INSERT INTO chats (owner_id, status, pending_since) \
             SELECT $1, 'pending', now() - interval '1 day' + g * interval '1 millisecond' \
             FROM generate_series(1, $2) AS g",
            &[(&owners.heavy, Type::UUID), (&n, Type::INT8)],
        )
        .await?;
    direct
        .exec(
            "INSERT INTO chats (owner_id, status, pending_since) \
             SELECT o, 'pending', now() FROM unnest($1::uuid[]) AS o, generate_series(1, $2) AS g",
            &[(&owners.light, Type::UUID_ARRAY), (&args.light_chats, Type::INT8)],
        )
        .await?;
    direct.batch_execute("VACUUM ANALYZE chats").await?;
    Ok(())
}

/// `EXPLAIN (ANALYZE, BUFFERS[, FORMAT JSON])` of `CLAIM` with the parameters `admission::claim`
/// would pass, after the claim lock, in a transaction rolled back.
async fn explain(
    db: &Db,
    worker: Uuid,
    limit: u32,
    rules: Rules,
    options: &str,
) -> anyhow::Result<Vec<String>> {
    let json = options.contains("JSON");
    let mut conn = db.get().await?;
    let tx = db::begin(&mut conn, Duration::from_secs(60)).await?;
    tx.exec(LOCK, &[(&CLAIM_LOCK_KEY, Type::INT8)]).await?;
    let limit = i64::from(limit);
    let owner_cap = i32::try_from(rules.owner_cap)?;
    let org_cap = i32::try_from(rules.org_cap)?;
    let fair = rules.order == Order::Fair;
    let sweep_from = Uuid::new_v4();
    let rows = tx
        .fetch_all(
            &format!("EXPLAIN ({options}) {CLAIM}"),
            &[
                (&worker, Type::UUID),
                (&limit, Type::INT8),
                (&owner_cap, Type::INT4),
                (&org_cap, Type::INT4),
                (&fair, Type::BOOL),
                (&sweep_from, Type::UUID),
                (&OWNER_SWEEP, Type::INT4),
                (&OLDEST_HEAD, Type::INT8),
            ],
        )
        .await?;
    tx.rollback().await?;
    Ok(rows
        .iter()
        .map(|r| if json { r.get::<_, serde_json::Value>(0).to_string() } else { r.get::<_, String>(0) })
        .collect())
}

/// What one `EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON)` says.
struct PlanFigures {
    /// The largest `Actual Rows × Actual Loops` of any node.
    largest_node: f64,
    /// Shared buffers the whole plan touched (hit + read).
    buffers: i64,
    planning_ms: f64,
    execution_ms: f64,
}

fn plan_figures(json: &str) -> anyhow::Result<PlanFigures> {
    fn walk(node: &serde_json::Value, largest: &mut f64) {
        let rows = node["Actual Rows"].as_f64().unwrap_or(0.0) * node["Actual Loops"].as_f64().unwrap_or(1.0);
        *largest = largest.max(rows);
        if let Some(children) = node["Plans"].as_array() {
            for child in children {
                walk(child, largest);
            }
        }
    }
    let value: serde_json::Value = serde_json::from_str(json)?;
    let plan = &value[0]["Plan"];
    let mut largest = 0.0;
    walk(plan, &mut largest);
    let buffers =
        ["Shared Hit Blocks", "Shared Read Blocks"].iter().map(|k| plan[*k].as_i64().unwrap_or(0)).sum();
    Ok(PlanFigures {
        largest_node: largest,
        buffers,
        planning_ms: value[0]["Planning Time"].as_f64().unwrap_or(0.0),
        execution_ms: value[0]["Execution Time"].as_f64().unwrap_or(0.0),
    })
}

struct ClaimResult {
    backlog: i64,
    label: String,
    fair: bool,
    samples: Vec<Duration>,
    /// Planning + execution in the server, from `EXPLAIN (ANALYZE, TIMING OFF)`, sorted.
    server: Vec<Duration>,
    plan: PlanFigures,
}

async fn claim_statement(bench: &BenchDb, args: &Args) -> anyhow::Result<Vec<ClaimResult>> {
    let owners = Owners::new(args);
    let limit = args.max_per_acquire;
    let worker = Uuid::new_v4();
    let variants = [
        (
            format!("fair, max_running_per_owner = {}", args.cap),
            Rules { owner_cap: args.cap, org_cap: 0, order: Order::Fair },
        ),
        ("fair, no cap".to_owned(), Rules { owner_cap: 0, org_cap: 0, order: Order::Fair }),
        ("FIFO, no cap".to_owned(), Rules { owner_cap: 0, org_cap: 0, order: Order::Fifo }),
    ];
    let largest_backlog = args.backlogs.iter().copied().max().unwrap_or(0);
    let mut results = Vec::new();
    let mut printed_plan = None;
    for &backlog in &args.backlogs {
        fill_backlog(bench, &owners, backlog, args).await?;
        for (label, rules) in &variants {
            let direct = bench.direct().await?;
            direct.batch_execute("VACUUM chats").await?;
            let mut conn = bench.db.get().await?;
            let mut samples = Vec::with_capacity(args.samples);
            for i in 0..args.samples + 10 {
                let tx = db::begin(&mut conn, Duration::from_secs(60)).await?;
                let started = Instant::now();
                let admitted = admission::claim(&tx, worker, limit, *rules).await?;
                let elapsed = started.elapsed();
                tx.rollback().await?;
                anyhow::ensure!(
                    admitted.chats.len() == limit as usize,
                    "{label}: claimed {} of {limit}",
                    admitted.chats.len()
                );
                if i >= 10 {
                    samples.push(elapsed);
                }
            }
            drop(conn);
            samples.sort();
            // The statement's own time in the server (planning + execution), apart from the
            // round trips and the client's scheduling that the samples above include.
            let mut server = Vec::new();
            for _ in 0..(args.samples / 5).max(10) {
                let json =
                    explain(&bench.db, worker, limit, *rules, "ANALYZE, TIMING OFF, FORMAT JSON").await?;
                let figures = plan_figures(&json.concat())?;
                server.push(Duration::from_secs_f64((figures.planning_ms + figures.execution_ms) / 1000.0));
            }
            server.sort();
            let json = explain(&bench.db, worker, limit, *rules, "ANALYZE, BUFFERS, FORMAT JSON").await?;
            let plan = plan_figures(&json.concat())?;
            if backlog == largest_backlog && rules.order == Order::Fair && rules.owner_cap > 0 {
                printed_plan = Some((
                    label.clone(),
                    explain(&bench.db, worker, limit, *rules, "ANALYZE, BUFFERS").await?,
                ));
            }
            results.push(ClaimResult {
                backlog,
                label: label.clone(),
                fair: rules.order == Order::Fair,
                samples,
                server,
                plan,
            });
        }
    }
    bench.direct().await?.batch_execute("TRUNCATE chats CASCADE").await?;

    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|r| {
            vec![
                r.backlog.to_string(),
                r.label.clone(),
                r.samples.len().to_string(),
                ms(quantile(&r.samples, 0.5)),
                format!("**{}**", ms(quantile(&r.samples, 0.99))),
                ms(r.samples.last().copied().unwrap_or_default()),
                format!(
                    "{} / {} ({} runs)",
                    ms(quantile(&r.server, 0.5)),
                    ms(quantile(&r.server, 0.99)),
                    r.server.len()
                ),
                format!("{:.0}", r.plan.largest_node),
                r.plan.buffers.to_string(),
            ]
        })
        .collect();
    table(
        &format!(
            "The claim (`admission::claim`: claim lock + `CLAIM`, limit {limit}) with N pending chats of one owner \
             and {} light owners × {} pending, each sample rolled back (ms)",
            args.light_owners, args.light_chats
        ),
        &[
            "N pending of the heavy owner",
            "order, caps",
            "samples",
            "p50",
            "p99",
            "max",
            "in the server: planning + execution p50 / p99",
            "largest plan node (rows × loops)",
            "buffers",
        ],
        &rows,
    );
    if let Some((label, plan)) = printed_plan {
        println!(
            "\n`EXPLAIN (ANALYZE, BUFFERS)` of `CLAIM` ({label}, limit {limit}, {largest_backlog} pending chats of \
             one owner; rolled back):\n\n```"
        );
        for line in plan {
            println!("{line}");
        }
        println!("```");
    }
    Ok(results)
}

fn verdict(pass: bool) -> &'static str {
    if pass { "**PASS**" } else { "**FAIL**" }
}

fn targets(args: &Args, fairness: &[(Variant, Summary)], claims: &[ClaimResult]) {
    let get = |v: Variant| fairness.iter().find(|(variant, _)| *variant == v).map(|(_, s)| s);
    let mut rows = Vec::new();
    if let (Some(fifo), Some(fair)) = (get(Variant::Fifo), get(Variant::Fair)) {
        let (fifo_p99, fair_p99) = (quantile_s(&fifo.light_waits, 0.99), quantile_s(&fair.light_waits, 0.99));
        let ratio = fair_p99 / fifo_p99.max(f64::EPSILON);
        rows.push(vec![
            "light owners' p99 wait, fair ≤ 1/5 of FIFO's".to_owned(),
            format!("{} ms vs {} ms: {ratio:.3}×", ms_s(fair_p99), ms_s(fifo_p99)),
            verdict(ratio <= LIGHT_P99_RATIO_TARGET).to_owned(),
        ]);
        let ratio = fair.throughput / fifo.throughput.max(f64::EPSILON);
        rows.push(vec![
            "throughput, fair ≥ 0.95 × FIFO's".to_owned(),
            format!("{:.0} vs {:.0} chats/s: {ratio:.3}×", fair.throughput, fifo.throughput),
            verdict(ratio >= THROUGHPUT_RATIO_TARGET).to_owned(),
        ]);
    }
    let largest = args.backlogs.iter().copied().max().unwrap_or(0);
    let at_target = claims.iter().filter(|c| c.fair && c.backlog == largest);
    let worst = at_target.max_by_key(|c| quantile(&c.samples, 0.99));
    if let Some(worst) = worst {
        let p99 = quantile(&worst.samples, 0.99);
        let note = if largest == CLAIM_TARGET_BACKLOG {
            String::new()
        } else {
            format!(" (measured at {largest}, not {CLAIM_TARGET_BACKLOG}: not the target's backlog)")
        };
        rows.push(vec![
            format!("fair claim p99 ≤ 5 ms with {CLAIM_TARGET_BACKLOG} pending chats of one owner"),
            format!(
                "{} ms (worst fair variant: {}, {largest} pending; its p99 in the server: {} ms){note}",
                ms(p99),
                worst.label,
                ms(quantile(&worst.server, 0.99))
            ),
            verdict(p99 <= CLAIM_P99_TARGET && largest == CLAIM_TARGET_BACKLOG).to_owned(),
        ]);
    }
    table("Targets (from this run)", &["target", "measured", "result"], &rows);
}

async fn run(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let summaries = fairness(bench, args).await?;
    let claims = claim_statement(bench, args).await?;
    targets(args, &summaries, &claims);
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    let bench = BenchDb::create(4).await?;
    let result = run(&bench, &args).await;
    bench.drop_now().await?;
    result
}
