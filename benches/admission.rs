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
//! 1. **FIFO** (`chats.admission = fifo`, no cap): today's order, oldest wait first, through the
//!    new claim and its lock (part 3 compares the claim itself with the one before issue 19).
//! 2. **fair** (`chats.admission = fair`, no cap): work-conserving; this is the run whose
//!    throughput is compared with FIFO's.
//! 3. **fair + cap** (`max_running_per_owner = 5`, point 2's config; `--capped-reps`, 1): shown
//!    for completeness. A cap idles capacity when one owner is most of the load (here at most
//!    65 of 150 runners are busy while the heavy owner waits), so its throughput is not comparable
//!    and no target applies to it.
//!
//! `chats.acquire_interval` is the shipped 1 s (`--acquire-interval-ms` changes it): a turn that
//! ends wakes its worker's acquire loop into the free slot (`TaskSet::ended`), and new pending
//! chats NOTIFY, so the interval is only the fallback and the figures measure the order of
//! admission, not the poll interval.
//! `max_per_acquire` stays at its default (25, `--max-per-acquire` changes it): a claim takes up
//! to 25 chats, and a loop with room drains at once (`Progress::More`).
//!
//! Measured, from the database clock:
//!
//! - **wait** = `started_at − pending_since`, with `pending_since` as the load set it, except
//!   that the heavy owner's back-dating is not counted: every chat's wait starts at `t0`, when the
//!   load committed. (`pending_since` is cleared when a chat leaves pending, so `t0` is kept
//!   here.) `started_at`, like the `waited` the claim returns for the `chats.admission.wait`
//!   metric, is the `CLAIM` statement's `statement_timestamp()`: after the claim lock was granted.
//!   A second column measures the wait to the claim's rows being written: a bench-only statement
//!   trigger on `chats` logs, for every chat a claim makes `running`, the worker, the claim
//!   transaction's `now()` (its BEGIN, before the lock), `statement_timestamp()` and
//!   `clock_timestamp()` (its rows written). It costs each claim one small INSERT, in every run
//!   alike.
//! - **runner time** of a chat = from the claim statement to `updated_at` of the ended turn
//!   (`FINISH_TURN` sets it): the slot it held, agent start-up and writes included.
//! - **throughput** = chats / makespan, makespan = `t0` → the last turn's end.
//! - **where the claims' time went**, from the same log: the `CLAIM` statement, BEGIN → `CLAIM`
//!   (the claim lock's wait), and the lock's hand-off (a claim's statement end → the start of the
//!   next, already waiting, claim's statement: the holder's reply and COMMIT and the next one's
//!   LOCK reply and CLAIM, two client round trips inside the serialised section).
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
//! `--timeline` prints each run's claims to stderr (when, heavy + light chats, first turn end).
//!
//! # Part 2: the claim statement against a large backlog
//!
//! `--backlogs` (1k and 100k) pending chats of ONE owner (distinct `pending_since`) plus the 20
//! light owners' 3 each, `VACUUM ANALYZE`d; then `--samples` (300) calls of
//! `admission::claim` (the claim lock and the `CLAIM` statement, two round trips, as the acquire
//! loop runs them) with the `max_per_acquire` limit (25), each in a transaction rolled back, for the fair order with
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
//! # Part 3: the claim alone, against today's claim
//!
//! Part 1's FIFO run takes the claim lock and runs the new statement too (`admission = fifo`),
//! so it cannot show what the lock and the heavier statement cost the acquire path. Here
//! `--workers` claimers, each on its own connection, drain the same backlog (`--drain-heavy`
//! 1,000 chats of one owner, `--drain-light` 15 of each of 20) with no agent, a transaction per
//! claim as the acquire loop runs it, `max_per_acquire` per claim: the claim before issue 19 (V3's SKIP LOCKED
//! statement without a lock, ordered by V9's `pending_since` index), `admission::claim` in FIFO
//! and in fair order; then one claimer each for the old claim and the fair one, which separates
//! the statement's cost from the serialisation. Every chat must end claimed exactly once.
//!
//! `cargo bench --bench admission -- [--small] [--parts 1,2,3] [--reps N] [--capped-reps N] [--workers N]
//! [--max-running N] [--cap N] [--heavy N] [--light-owners N] [--light-chats N] [--turn-ms N]
//! [--acquire-interval-ms N] [--max-per-acquire N] [--backlogs 1000,100000] [--samples N]
//! [--drain-heavy N] [--drain-light N] [--timeline]`;
//! `--small` is one rep of each run, backlogs of 1k and 10k with 50 samples and a drain of 700
//! chats (for a quick dev-profile check). `scripts/bench.sh admission` runs it and prints the machine it ran on.

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
    /// Which parts run (1: the load with agents, 2: the claim statement, 3: the claim alone).
    parts: Vec<u8>,
    /// Part 3's backlog: chats of the heavy owner, chats of each light owner.
    drain_heavy: i64,
    drain_light: i64,
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
            acquire_interval: Duration::from_secs(1),
            max_per_acquire: worker::chats::config::DEFAULT_MAX_PER_ACQUIRE,
            reps: 5,
            capped_reps: 1,
            backlogs: vec![1_000, CLAIM_TARGET_BACKLOG],
            samples: 300,
            parts: vec![1, 2, 3],
            drain_heavy: 1_000,
            drain_light: 15,
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
                    args.drain_heavy = 500;
                    args.drain_light = 10;
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
                "--parts" => {
                    args.parts = value()?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
                }
                "--drain-heavy" => args.drain_heavy = value()?.parse()?,
                "--drain-light" => args.drain_light = value()?.parse()?,
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

    fn chats(&self) -> usize {
        (self.heavy + self.light_owners as i64 * self.light_chats) as usize
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
    let tx = db::begin(
        &mut conn,
        db::TxLimits { statement: Duration::from_secs(60), idle: Duration::from_secs(60) },
    )
    .await?;
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
    /// `started_at`: the `CLAIM` statement's start (after the claim lock).
    started: f64,
    /// When the claim statement wrote the chat `running` (the claim log's clock).
    claimed: f64,
    /// `updated_at` of the ended turn.
    end: f64,
}

/// One claim, from the claim log: its transaction's start, its `CLAIM` statement's start (after
/// the claim lock) and end, in seconds since `t0`.
#[derive(Clone, Copy)]
struct ClaimTimes {
    worker: Uuid,
    began: f64,
    stmt: f64,
    done: f64,
}

/// A bench-only statement trigger logs every chat a claim makes `running`: the worker, the claim
/// transaction's `now()` (its BEGIN, before the claim lock), `statement_timestamp()` (the `CLAIM`
/// statement's start, after the claim lock: READ COMMITTED takes its snapshot then; =
/// `started_at`) and `clock_timestamp()` (its rows written). It costs the claim one small INSERT, in every run alike.
const CLAIM_LOG: &str = "CREATE TABLE bench_claimed (id uuid, worker uuid, began timestamptz, \
                                                     stmt timestamptz, done timestamptz); \
     CREATE FUNCTION bench_log_claim() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
       INSERT INTO bench_claimed \
       SELECT id, worker_id, now(), statement_timestamp(), clock_timestamp() \
       FROM new_rows WHERE status = 'running' AND started_at = statement_timestamp(); \
       RETURN NULL; END $$; \
     CREATE TRIGGER bench_log_claim AFTER UPDATE ON chats REFERENCING NEW TABLE AS new_rows \
       FOR EACH STATEMENT EXECUTE FUNCTION bench_log_claim()";
const CLAIM_LOG_DROP: &str =
    "DROP TRIGGER bench_log_claim ON chats; DROP FUNCTION bench_log_claim(); DROP TABLE bench_claimed";

/// What one run measured.
struct RunResult {
    variant: Variant,
    /// Waits (`started_at − t0`), sorted.
    heavy_waits: Vec<f64>,
    light_waits: Vec<f64>,
    /// Waits to the claim statement, sorted.
    heavy_claimed: Vec<f64>,
    light_claimed: Vec<f64>,
    makespan: f64,
    chats: usize,
    jain: f64,
    /// Runner-seconds each class got in the window, over what it was owed.
    heavy_served: f64,
    light_served: f64,
    peak_running: usize,
    /// Runner time handed out in W over W's capacity (runners × W).
    busy: f64,
    pipeline: Pipeline,
}

/// Where the claims' time went (seconds, unsorted; pooled over reps by [`summarize`]).
#[derive(Default)]
struct Pipeline {
    claims: usize,
    /// BEGIN → the `CLAIM` statement's start: `SET LOCAL` and the claim lock's wait.
    lock_wait: Vec<f64>,
    /// The `CLAIM` statement, start to rows written.
    statement: Vec<f64>,
    /// Claims run one at a time: when the next one already waited, the time from this
    /// statement's end to the next one's start. Spent outside the server while the lock is held:
    /// this claim's reply and its COMMIT, the next one's LOCK reply and its CLAIM.
    handoff: Vec<f64>,
}

impl Pipeline {
    fn of(claims: &[ClaimTimes]) -> Self {
        let mut sorted = claims.to_vec();
        sorted.sort_by(|a, b| a.stmt.total_cmp(&b.stmt));
        let mut pipeline = Pipeline { claims: sorted.len(), ..Pipeline::default() };
        for c in &sorted {
            pipeline.lock_wait.push(c.stmt - c.began);
            pipeline.statement.push(c.done - c.stmt);
        }
        for pair in sorted.windows(2) {
            if pair[1].began < pair[0].done {
                pipeline.handoff.push(pair[1].stmt - pair[0].done);
            }
        }
        pipeline
    }
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
            "SELECT c.owner_id, extract(epoch FROM c.started_at - $1)::float8, \
                    extract(epoch FROM l.done - $1)::float8, extract(epoch FROM c.updated_at - $1)::float8, \
                    c.generation, l.worker, extract(epoch FROM l.began - $1)::float8, \
                    extract(epoch FROM l.stmt - $1)::float8 \
             FROM chats AS c JOIN bench_claimed AS l ON l.id = c.id",
            &[(&t0, Type::TIMESTAMPTZ)],
        )
        .await?;
    anyhow::ensure!(rows.len() == args.chats(), "{} of {} chats in the claim log", rows.len(), args.chats());
    let mut turns = Vec::with_capacity(rows.len());
    let mut claims: HashMap<(Uuid, u64), ClaimTimes> = HashMap::new();
    for row in &rows {
        let generation: i64 = row.get(4);
        anyhow::ensure!(generation == 1, "a chat was claimed {generation} times");
        turns.push(Turn { owner: row.get(0), started: row.get(1), claimed: row.get(2), end: row.get(3) });
        let times = ClaimTimes { worker: row.get(5), began: row.get(6), stmt: row.get(7), done: row.get(2) };
        claims.insert((times.worker, times.began.to_bits()), times);
    }
    let claims: Vec<ClaimTimes> = claims.into_values().collect();
    if args.timeline {
        print_timeline(variant, &turns, owners, args);
    }
    conn.exec("DELETE FROM workers WHERE id = ANY($1)", &[(&ids, Type::UUID_ARRAY)]).await?;
    conn.exec("DELETE FROM chats", &[]).await?;
    conn.exec("DELETE FROM bench_claimed", &[]).await?;
    Ok(measure(variant, &turns, &claims, owners, args))
}

/// Each claim in order (chats sharing a `started_at`): its start, heavy + light chats, the end of
/// its first turn (ms since `t0`).
fn print_timeline(variant: Variant, turns: &[Turn], owners: &Owners, args: &Args) {
    let mut claims: Vec<(f64, usize, usize, f64)> = Vec::new();
    let mut sorted: Vec<&Turn> = turns.iter().collect();
    sorted.sort_by(|a, b| a.claimed.total_cmp(&b.claimed).then(a.started.total_cmp(&b.started)));
    for t in sorted {
        let heavy = usize::from(t.owner == owners.heavy);
        match claims.last_mut() {
            Some(last) if last.0 == t.claimed => {
                last.1 += heavy;
                last.2 += 1 - heavy;
                last.3 = last.3.min(t.end);
            }
            _ => claims.push((t.claimed, heavy, 1 - heavy, t.end)),
        }
    }
    eprintln!("{}: {} claims (claimed ms: heavy+light → first end ms)", variant.label(args), claims.len());
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

fn sorted(mut values: Vec<f64>) -> Vec<f64> {
    values.sort_by(f64::total_cmp);
    values
}

fn measure(
    variant: Variant,
    turns: &[Turn],
    claims: &[ClaimTimes],
    owners: &Owners,
    args: &Args,
) -> RunResult {
    let window = args.turn.as_secs_f64();
    let runners = args.runners();
    let owner_list: Vec<Uuid> = owners.all().collect();
    let mut chats_of: HashMap<Uuid, usize> = HashMap::new();
    let mut served: HashMap<Uuid, f64> = HashMap::new();
    let is_heavy = |t: &&Turn| t.owner == owners.heavy;
    for t in turns {
        *chats_of.entry(t.owner).or_default() += 1;
        // The runner is held from the claim to the turn's end.
        *served.entry(t.owner).or_default() += (t.end.min(window) - t.claimed.max(0.0)).max(0.0);
    }
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
    // Peak concurrency: +1 at each claim, −1 at each end.
    let mut events: Vec<(f64, i32)> = turns.iter().flat_map(|t| [(t.claimed, 1), (t.end, -1)]).collect();
    events.sort_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    let (mut running, mut peak) = (0i32, 0i32);
    for (_, delta) in events {
        running += delta;
        peak = peak.max(running);
    }
    RunResult {
        variant,
        heavy_waits: sorted(turns.iter().filter(is_heavy).map(|t| t.started).collect()),
        light_waits: sorted(turns.iter().filter(|t| !is_heavy(t)).map(|t| t.started).collect()),
        heavy_claimed: sorted(turns.iter().filter(is_heavy).map(|t| t.claimed).collect()),
        light_claimed: sorted(turns.iter().filter(|t| !is_heavy(t)).map(|t| t.claimed).collect()),
        makespan: turns.iter().map(|t| t.end).fold(0.0, f64::max),
        chats: turns.len(),
        jain: jain(&x),
        heavy_served: x[0],
        light_served: if light_owed > 0.0 { light_served / light_owed } else { 1.0 },
        peak_running: peak.max(0) as usize,
        busy: delivered / (runners as f64 * window),
        pipeline: Pipeline::of(claims),
    }
}

fn secs(s: f64) -> Duration {
    Duration::from_secs_f64(s.max(0.0))
}

fn quantile_s(sorted: &[f64], q: f64) -> f64 {
    let durations: Vec<Duration> = sorted.iter().map(|s| secs(*s)).collect();
    quantile(&durations, q).as_secs_f64()
}

fn median(values: Vec<f64>) -> f64 {
    let values = sorted(values);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

/// Pooled over the reps of one variant.
struct Summary {
    heavy_waits: Vec<f64>,
    light_waits: Vec<f64>,
    heavy_claimed: Vec<f64>,
    light_claimed: Vec<f64>,
    reps: usize,
    chats: usize,
    makespan: f64,
    throughput: f64,
    jain: f64,
    heavy_served: f64,
    light_served: f64,
    peak_running: usize,
    busy: f64,
    /// Median claims per rep; the rest pooled and sorted.
    pipeline: Pipeline,
}

fn summarize(results: &[RunResult], variant: Variant) -> Option<Summary> {
    let runs: Vec<&RunResult> = results.iter().filter(|r| r.variant == variant).collect();
    if runs.is_empty() {
        return None;
    }
    let pooled =
        |f: fn(&RunResult) -> &Vec<f64>| sorted(runs.iter().flat_map(|r| f(r).iter().copied()).collect());
    Some(Summary {
        heavy_waits: pooled(|r| &r.heavy_waits),
        light_waits: pooled(|r| &r.light_waits),
        heavy_claimed: pooled(|r| &r.heavy_claimed),
        light_claimed: pooled(|r| &r.light_claimed),
        reps: runs.len(),
        chats: runs[0].chats,
        makespan: median(runs.iter().map(|r| r.makespan).collect()),
        throughput: median(runs.iter().map(|r| r.chats as f64 / r.makespan.max(f64::EPSILON)).collect()),
        jain: median(runs.iter().map(|r| r.jain).collect()),
        heavy_served: median(runs.iter().map(|r| r.heavy_served).collect()),
        light_served: median(runs.iter().map(|r| r.light_served).collect()),
        peak_running: runs.iter().map(|r| r.peak_running).max().unwrap_or(0),
        busy: median(runs.iter().map(|r| r.busy).collect()),
        pipeline: Pipeline {
            claims: median(runs.iter().map(|r| r.pipeline.claims as f64).collect()) as usize,
            lock_wait: pooled(|r| &r.pipeline.lock_wait),
            statement: pooled(|r| &r.pipeline.statement),
            handoff: pooled(|r| &r.pipeline.handoff),
        },
    })
}

fn ms_s(s: f64) -> String {
    ms(secs(s))
}

/// `p50 / p90` (or the given quantiles) of sorted seconds, in ms.
fn spread(sorted: &[f64], low: f64, high: f64) -> String {
    format!("{} / {}", ms_s(quantile_s(sorted, low)), ms_s(quantile_s(sorted, high)))
}

async fn fairness(bench: &BenchDb, args: &Args) -> anyhow::Result<Vec<(Variant, Summary)>> {
    let dir = tempfile::tempdir()?;
    let agent = write_agent(dir.path(), args.turn)?;
    let owners = Owners::new(args);
    bench.direct().await?.batch_execute(CLAIM_LOG).await?;
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
                "rep {}: {}: makespan {:.2} s, light p99 {} ms, Jain {:.3}, {} claims, lock hand-off p50 {} ms \
                 ({:.1} s)",
                rep + 1,
                variant.label(args),
                result.makespan,
                ms_s(quantile_s(&result.light_waits, 0.99)),
                result.jain,
                result.pipeline.claims,
                ms_s(median(result.pipeline.handoff.clone())),
                started.elapsed().as_secs_f64()
            );
            results.push(result);
        }
    }
    bench.direct().await?.batch_execute(CLAIM_LOG_DROP).await?;
    let summaries: Vec<(Variant, Summary)> = [Variant::Fifo, Variant::Fair, Variant::FairCapped]
        .into_iter()
        .filter_map(|v| summarize(&results, v).map(|s| (v, s)))
        .collect();

    let light_total = args.light_owners as i64 * args.light_chats;
    let mut rows = Vec::new();
    for (variant, s) in &summaries {
        for (class, waits, claimed) in [
            (format!("heavy owner ({} chats)", args.heavy), &s.heavy_waits, &s.heavy_claimed),
            (
                format!("light owners ({} × {} chats)", args.light_owners, args.light_chats),
                &s.light_waits,
                &s.light_claimed,
            ),
        ] {
            rows.push(vec![
                variant.label(args),
                class,
                waits.len().to_string(),
                ms_s(quantile_s(waits, 0.5)),
                format!("**{}**", ms_s(quantile_s(waits, 0.99))),
                ms_s(waits.last().copied().unwrap_or(0.0)),
                spread(claimed, 0.5, 0.99),
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
        &["run", "class", "chats", "p50", "p99", "max", "to the claim statement: p50 / p99"],
        &rows,
    );
    println!(
        "\nWait = started_at − t0, as the product records it (started_at and the `chats.admission.wait` metric \
         take the CLAIM statement's start, after the claim lock). \"To the claim statement\" = \
         when the CLAIM statement wrote the chat running (a bench-only trigger's clock_timestamp()). Every wait starts at t0 (the heavy owner's pending_since is back-dated \
         by 1 s only to order it first)."
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
         {} ms]; all {} chats pending at t0, {} runners; a runner is held from the claim statement to the \
         turn's end): x_i = runner-seconds owner i held in W / its max-min fair share of the runner-seconds \
         handed out in W (water-filled over each owner's demand, min(chats, runners) × turn); index = (Σx)² / \
         (n·Σx²): 1 = every owner got the same fraction of its share, 1/{} = one owner got everything. \
         Runners left idle in W (start-up, a cap) are not in the index: see \"runners busy in W\" and the \
         throughput. Throughput = chats / makespan (t0 → the last turn's end).",
        args.light_owners + 1,
        args.turn.as_millis(),
        args.heavy + light_total,
        args.runners(),
        args.light_owners + 1,
    );

    let rows: Vec<Vec<String>> = summaries
        .iter()
        .map(|(variant, s)| {
            let p = &s.pipeline;
            vec![
                variant.label(args),
                p.claims.to_string(),
                spread(&p.statement, 0.5, 0.9),
                spread(&p.lock_wait, 0.5, 0.9),
                format!(
                    "{} ({} of {} claims waited)",
                    spread(&p.handoff, 0.5, 0.9),
                    p.handoff.len(),
                    p.statement.len()
                ),
            ]
        })
        .collect();
    table(
        &format!(
            "Where the claims' time went (ms, p50 / p90 pooled over the reps; {} per claim at most)",
            args.max_per_acquire
        ),
        &[
            "run",
            "claims per rep",
            "CLAIM statement",
            "BEGIN → CLAIM (claim lock wait)",
            "lock hand-off: a CLAIM's end → the waiting next CLAIM's start",
        ],
        &rows,
    );
    println!(
        "\nClaims are serialised by the claim lock, held from LOCK to COMMIT. The hand-off is the part of the \
         serialised section spent outside the server: the holder's reply and COMMIT, the next one's LOCK reply \
         and CLAIM, i.e. two client round trips, with this process's scheduling in them (the {} workers share \
         its cores).",
        args.workers
    );
    Ok(summaries)
}

/// `n` pending chats of `heavy` (oldest first, distinct `pending_since`), the light owners'
/// chats after them, `VACUUM ANALYZE`d.
async fn fill_backlog(bench: &BenchDb, owners: &Owners, n: i64, light_chats: i64) -> anyhow::Result<()> {
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
            &[(&owners.light, Type::UUID_ARRAY), (&light_chats, Type::INT8)],
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
    let tx = db::begin(
        &mut conn,
        db::TxLimits { statement: Duration::from_secs(60), idle: Duration::from_secs(60) },
    )
    .await?;
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
        fill_backlog(bench, &owners, backlog, args.light_chats).await?;
        for (label, rules) in &variants {
            let direct = bench.direct().await?;
            direct.batch_execute("VACUUM chats").await?;
            let mut conn = bench.db.get().await?;
            let mut samples = Vec::with_capacity(args.samples);
            for i in 0..args.samples + 10 {
                let tx = db::begin(
                    &mut conn,
                    db::TxLimits { statement: Duration::from_secs(60), idle: Duration::from_secs(60) },
                )
                .await?;
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

/// The claim before issue 19 (migration V3's statement, ordered by V9's `pending_since` index
/// instead of `created_at`, whose index V9 replaced): no claim lock, so claimers run side by side,
/// each skipping the rows another holds.
const PRE_V9_CLAIM: &str = "WITH picked AS (\
       SELECT id FROM chats WHERE status = 'pending' AND NOT archived \
       ORDER BY pending_since, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
     UPDATE chats AS c SET status = 'running', worker_id = $1, generation = c.generation + 1, \
       started_at = now(), updated_at = now(), last_error = NULL \
     FROM picked WHERE c.id = picked.id \
     RETURNING c.id";

#[derive(Clone, Copy)]
enum Claimer {
    PreV9,
    Admission(Rules),
}

/// Claims until a claim finds nothing, a transaction per claim as the acquire loop runs it
/// (BEGIN, `SET LOCAL statement_timeout`, the claim, COMMIT). Returns the chats claimed.
async fn drain(db: &Db, claimer: Claimer, limit: u32) -> anyhow::Result<u64> {
    let worker = Uuid::new_v4();
    let mut conn = db.get().await?;
    let mut chats = 0;
    loop {
        let tx = db::begin(&mut conn, db.tx_limits()).await?;
        let n = match claimer {
            Claimer::PreV9 => {
                let limit = i64::from(limit);
                tx.fetch_all(PRE_V9_CLAIM, &[(&worker, Type::UUID), (&limit, Type::INT8)]).await?.len()
            }
            Claimer::Admission(rules) => admission::claim(&tx, worker, limit, rules).await?.chats.len(),
        };
        db::commit(tx).await?;
        if n == 0 {
            return Ok(chats);
        }
        chats += n as u64;
    }
}

/// Part 3: the claim alone, without agents: `--workers` claimers on connections of their own
/// drain the same backlog with today's (pre-issue-19) claim, the claim in FIFO order and in the
/// fair order. What the claim lock costs the acquire path, which the FIFO run of part 1 (the same
/// locked statement) cannot show.
async fn claim_throughput(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let owners = Owners::new(args);
    let (heavy, light) = (args.drain_heavy, args.drain_light);
    let total = heavy + owners.light.len() as i64 * light;
    let limit = args.max_per_acquire;
    let db = Db::new(&DatabaseConfig {
        url: bench.url.clone(),
        pool_size: args.workers,
        ..DatabaseConfig::default()
    })?;
    let variants = [
        ("pre-issue-19 claim (SKIP LOCKED, no claim lock)", Claimer::PreV9, args.workers),
        (
            "admission::claim, FIFO, no cap",
            Claimer::Admission(Rules { owner_cap: 0, org_cap: 0, order: Order::Fifo }),
            args.workers,
        ),
        (
            "admission::claim, fair, no cap",
            Claimer::Admission(Rules { owner_cap: 0, org_cap: 0, order: Order::Fair }),
            args.workers,
        ),
        ("pre-issue-19 claim, one claimer", Claimer::PreV9, 1),
        (
            "admission::claim, fair, no cap, one claimer",
            Claimer::Admission(Rules { owner_cap: 0, org_cap: 0, order: Order::Fair }),
            1,
        ),
    ];
    let mut rows = Vec::new();
    let mut base = None;
    for (label, claimer, claimers) in variants {
        fill_backlog(bench, &owners, heavy, light).await?;
        // Every claimer's connection open before the clock starts.
        drop(futures_util::future::try_join_all((0..claimers).map(|_| db.get())).await?);
        let started = Instant::now();
        let claimed: u64 =
            futures_util::future::try_join_all((0..claimers).map(|_| drain(&db, claimer, limit)))
                .await?
                .iter()
                .sum();
        let elapsed = started.elapsed();
        let check = bench
            .db
            .get()
            .await?
            .fetch_one(
                "SELECT count(*) FILTER (WHERE status = 'running' AND generation = 1)::int8 FROM chats",
                &[],
            )
            .await?;
        let running: i64 = check.get(0);
        anyhow::ensure!(
            claimed == total as u64 && running == total,
            "{label}: claimed {claimed}, running once {running}, of {total}"
        );
        let per_s = common::rate(claimed, elapsed);
        let base = *base.get_or_insert(per_s);
        rows.push(vec![
            label.to_owned(),
            claimers.to_string(),
            format!("{:.2}", elapsed.as_secs_f64()),
            format!("**{per_s:.0}**"),
            format!("{:.2}×", per_s / base),
        ]);
    }
    bench.direct().await?.batch_execute("TRUNCATE chats CASCADE").await?;
    table(
        &format!(
            "The claim alone: claimers (each its own connection) draining {total} pending chats ({heavy} of one \
             owner, {light} each of {}), {limit} per claim, a transaction per claim (BEGIN, SET LOCAL, [claim \
             lock,] claim, COMMIT)",
            owners.light.len()
        ),
        &["claim", "claimers", "seconds", "chats/s", "vs pre-issue-19"],
        &rows,
    );
    println!(
        "\nEvery chat ended running with generation 1 (claimed once). Part 1 compares the fair order with \
         FIFO under the same claim lock and statement; this is what the lock and the new statement cost the \
         acquire path against the claim before issue 19, with no agent running: the one-claimer rows are the \
         statement's cost alone, the rows with more claimers add the serialisation (the lock is held from LOCK to \
         COMMIT, over two client round trips).",
    );
    Ok(())
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
        let (fifo_p99, fair_p99) =
            (quantile_s(&fifo.light_claimed, 0.99), quantile_s(&fair.light_claimed, 0.99));
        let ratio = fair_p99 / fifo_p99.max(f64::EPSILON);
        rows.push(vec![
            "… the same, waits measured to the claim statement (the claim lock's wait included)".to_owned(),
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
    if !rows.is_empty() {
        table("Targets (from this run)", &["target", "measured", "result"], &rows);
    }
}

async fn run(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let summaries = if args.parts.contains(&1) { fairness(bench, args).await? } else { Vec::new() };
    let claims = if args.parts.contains(&2) { claim_statement(bench, args).await? } else { Vec::new() };
    if args.parts.contains(&3) {
        claim_throughput(bench, args).await?;
    }
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
