//! Reliability suite, scenario 4 (docs/database.md#statement-policy, docs/reliability.md,
//! `scripts/chaos.sh`): two real replicas whose pooled connections go through a private pgbouncer
//! in transaction mode (LISTEN and migrations direct, as `database.listen_url` /
//! `database.migrate_url` are meant for), running every loop for 60 s on short intervals while the
//! test keeps feeding them work the way the API tier would (outbox tasks, chats and user messages,
//! running-task counters, diff-status marks, template activations, a fake provisioner finishing
//! jobs and users claiming prebuilds) and an operator runs the CLI through the same pgbouncer
//! (pauses, resumes, stats, plans, chats).
//!
//! Then: both replicas alive and ready, the work done (outbox drained into Redis, every chat
//! answered, counters in sync, diff statuses refreshed, prebuilds created and deleted), a clean
//! SIGTERM exit for both, and logs without SQLSTATE 42P05 / 26000 or any other WARN/ERROR.

mod chaos_support;
mod common;
mod gitsync_support;

use std::collections::{BTreeMap, HashMap};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use chaos_support::{LIMIT, Replica, WorkerConfig, report};
use common::TestDb;
use common::pgbouncer::PgBouncer;
use common::process::{BIN, inherited_overrides, repo_path};
use fred::prelude::{Builder, ClientLike, Config as RedisConfig, HashesInterface, SortedSetsInterface};
use gitsync_support::FakeGitHub;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::{Db, Exec, Param};

/// How long the replicas run under load.
const RUN: Duration = Duration::from_secs(60);
/// One feeding round.
const ROUND: Duration = Duration::from_millis(100);
/// Server connections pgbouncer keeps to PostgreSQL for the test database (shared by the two
/// replicas' pools of POOL each, the test's feeder and the CLI).
const BOUNCER_POOL: u32 = 6;
const POOL: i64 = 6;
const QUEUES: [&str; 4] = ["q0", "q1", "q2", "q3"];
const JOBS: usize = 40;
const GITSYNC_OWNERS: usize = 10;
const GITSYNC_ROWS_PER_OWNER: usize = 3;
const TEMPLATES: usize = 3;
/// Every loop of a replica with chats enabled (the chat heartbeat renews the worker lease, so
/// the separate `workers` loop does not run).
const LOOPS: [&str; 9] = [
    "chats_heartbeat",
    "chats_acquire",
    "chats_recover",
    "outbox",
    "counters",
    "gitsync",
    "prebuilds",
    "retention",
    "listen_probe",
];
/// Agent: reads its input, sets a title, writes a tool message and an answer, exits 0.
const AGENT: &str = "cat >/dev/null\n\
     echo '{\"type\":\"title\",\"title\":\"chaos\"}'\n\
     echo '{\"type\":\"message\",\"role\":\"tool\",\"content\":{\"tool\":\"noop\"}}'\n\
     echo '{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"done\"}'";

// ---------------------------------------------------------------------------------------------
// Database helpers (the feeder's pool goes through pgbouncer too: typed statements only)

async fn exec(db: &Db, sql: &str, params: &[Param<'_>]) -> u64 {
    db.get().await.expect("conn").exec(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}"))
}

async fn scalar(db: &Db, sql: &str, params: &[Param<'_>]) -> i64 {
    db.get().await.expect("conn").fetch_one(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

async fn uuid(db: &Db, sql: &str, params: &[Param<'_>]) -> Uuid {
    db.get().await.expect("conn").fetch_one(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// A chat with a first user message (`pending`).
async fn pending_chat(db: &Db, text: &str) -> Uuid {
    let chat = uuid(db, "INSERT INTO chats (owner_id) VALUES (gen_random_uuid()) RETURNING id", &[]).await;
    post(db, chat, text).await;
    chat
}

async fn post(db: &Db, chat: Uuid, text: &str) {
    let content = serde_json::json!(text);
    exec(db, "SELECT post_chat_message($1, 'user', $2)", &[(&chat, Type::UUID), (&content, Type::JSONB)])
        .await;
}

async fn mark(db: &Db, chat: Uuid, origin: &str, branch: &str) {
    exec(
        db,
        "SELECT mark_diff_stale($1, $2, $3)",
        &[(&chat, Type::UUID), (&origin, Type::TEXT), (&branch, Type::TEXT)],
    )
    .await;
}

/// `template` gets a new version `name` with a preset that wants 2 prebuilds living 6 s, and
/// the version is activated (the trigger NOTIFYs `template_version_activated`).
async fn activate_new_version(db: &Db, template: Uuid, name: &str) {
    exec(
        db,
        "WITH v AS (INSERT INTO template_versions (template_id, name) VALUES ($1, $2) RETURNING id), \
              p AS (INSERT INTO presets (template_version_id, name, desired_instances, invalidate_after_secs) \
                    SELECT id, $2, 2, 6 FROM v RETURNING template_version_id) \
         UPDATE templates SET active_version_id = (SELECT template_version_id FROM p) WHERE id = $1",
        &[(&template, Type::UUID), (&name, Type::TEXT)],
    )
    .await;
}

// ---------------------------------------------------------------------------------------------
// The world the replicas work on

struct World {
    test_db: TestDb,
    bouncer: PgBouncer,
    /// The feeder's pool, through pgbouncer.
    db: Db,
    redis: fred::prelude::Client,
    prefix: String,
    fake: FakeGitHub,
    /// Every chat the test made (they get user messages).
    chats: Mutex<Vec<Uuid>>,
    /// Diff-status chats with their origin.
    gitsync_rows: Vec<(Uuid, String)>,
    templates: Vec<Uuid>,
    /// Tasks enqueued so far (`task-1` … `task-n`).
    tasks: Mutex<i64>,
    /// Counters written into Redis, per job (the last value wins).
    counters: Mutex<BTreeMap<String, i64>>,
    /// CLI commands run, and the ones that failed or wrote to stderr (with their output).
    cli_runs: Mutex<usize>,
    cli_problems: Mutex<Vec<String>>,
    /// Counts of what the feeder did.
    fed: Mutex<HashMap<&'static str, i64>>,
}

impl World {
    async fn new() -> Self {
        let test_db = TestDb::new().await;
        let bouncer = PgBouncer::start(BOUNCER_POOL).await;
        let mut config = TestDb::database_config_for(&bouncer.url(&test_db.name), 4);
        config.statement_timeout = Duration::from_secs(5);
        let db = Db::new(&config).expect("feeder pool through pgbouncer");
        let redis = Builder::from_config(RedisConfig::from_url(&common::redis_url()).expect("redis url"))
            .build()
            .expect("redis client");
        redis.init().await.expect("redis connects");
        let fake = FakeGitHub::start().await;
        let mut world = Self {
            test_db,
            bouncer,
            db,
            redis,
            prefix: common::unique_prefix(),
            fake,
            chats: Mutex::new(Vec::new()),
            gitsync_rows: Vec::new(),
            templates: Vec::new(),
            tasks: Mutex::new(0),
            counters: Mutex::new(BTreeMap::new()),
            cli_runs: Mutex::new(0),
            cli_problems: Mutex::new(Vec::new()),
            fed: Mutex::new(HashMap::new()),
        };
        world.seed().await;
        world
    }

    /// Jobs for the counters, owners with tokens and due diff statuses for gitsync, templates
    /// with active presets for the reconciler, a few pending chats.
    async fn seed(&mut self) {
        let db = &self.db;
        exec(
            db,
            "INSERT INTO jobs (id, status) SELECT 'job-' || g, 'running' FROM generate_series(1, $1::int4) g",
            &[(&(JOBS as i32), Type::INT4)],
        )
        .await;
        for o in 0..GITSYNC_OWNERS {
            let owner = Uuid::new_v4();
            let token = format!("tok-{o}");
            exec(
                db,
                "INSERT INTO external_auth_links (user_id, provider_id, access_token) VALUES ($1, 'github', $2)",
                &[(&owner, Type::UUID), (&token, Type::TEXT)],
            )
            .await;
            let origin = format!("https://github.com/org{o}/repo");
            for r in 0..GITSYNC_ROWS_PER_OWNER {
                let branch = format!("b{r}");
                self.fake.pr(&format!("org{o}"), "repo", &branch, r as i64 + 1);
                let chat = uuid(
                    db,
                    "INSERT INTO chats (owner_id) VALUES ($1) RETURNING id",
                    &[(&owner, Type::UUID)],
                )
                .await;
                mark(db, chat, &origin, &branch).await;
                self.gitsync_rows.push((chat, origin.clone()));
            }
        }
        for t in 0..TEMPLATES {
            let name = format!("template-{t}");
            let template =
                uuid(db, "INSERT INTO templates (name) VALUES ($1) RETURNING id", &[(&name, Type::TEXT)])
                    .await;
            activate_new_version(db, template, "v0").await;
            self.templates.push(template);
        }
        for i in 0..5 {
            let chat = pending_chat(db, &format!("hello {i}")).await;
            self.chats.lock().expect("chats").push(chat);
        }
    }

    fn count(&self, what: &'static str, n: i64) {
        *self.fed.lock().expect("fed").entry(what).or_default() += n;
    }

    fn fed(&self, what: &str) -> i64 {
        self.fed.lock().expect("fed").get(what).copied().unwrap_or(0)
    }

    fn random_chat(&self) -> Uuid {
        let chats = self.chats.lock().expect("chats");
        chats[rand::random_range(0..chats.len())]
    }

    /// The replicas' config: pooled through pgbouncer, LISTEN and migrations direct, every
    /// loop on, short intervals.
    fn config(&self, agent: &str) -> WorkerConfig {
        WorkerConfig::new(&self.bouncer.url(&self.test_db.name), &common::redis_url(), &self.prefix)
            .set("database.listen_url", self.test_db.url.clone())
            .set("database.migrate_url", self.test_db.url.clone())
            .set("database.migrate_on_start", true)
            .set("database.pool_size", POOL)
            .set("outbox.enabled", true)
            .set("outbox.interval", "200ms")
            .set("outbox.fallback_interval", "1s")
            .set("counters.enabled", true)
            .set("counters.interval", "200ms")
            .set("chats.enabled", true)
            .set("chats.acquire_interval", "200ms")
            .set("chats.acquire_fallback_interval", "1s")
            .set("chats.heartbeat_interval", "1s")
            .set("chats.stale_after", "10s")
            .set("chats.recover_interval", "1s")
            .set("chats.runner.command", vec![agent.to_owned()])
            .set("chats.runner.kill_grace", "2s")
            .set("gitsync.enabled", true)
            .set("gitsync.interval", "500ms")
            .set("gitsync.tick_timeout", "10s")
            .set("gitsync.lease", "30s")
            .set("gitsync.ttl", "2s")
            .set("gitsync.no_pr_backoff", "1s")
            .set("gitsync.providers", self.fake.providers_config())
            .set("prebuilds.enabled", true)
            .set("prebuilds.interval", "1s")
            .set("prebuilds.fallback_interval", "1s")
            .set("runtime.controls_fallback_refresh", "1s")
            .set("prebuilds.tick_timeout", "10s")
            .set("retention.interval", "1s")
            .set("listen.probe_interval", "1s")
            .set("listen.probe_timeout", "500ms")
    }

    // -----------------------------------------------------------------------------------------
    // Feeding

    /// One round of API-tier traffic; `round` decides what besides the every-round work.
    async fn feed_round(&self, round: u64) {
        let db = &self.db;
        // Outbox: 25 tasks due now in one transaction, every 10th round 5 due in a second.
        let from = {
            let mut tasks = self.tasks.lock().expect("tasks");
            let from = *tasks + 1;
            *tasks += if round.is_multiple_of(10) { 30 } else { 25 };
            from
        };
        let to = from + 24;
        exec(
            db,
            "SELECT count(enqueue_task('task-' || g, 'q' || (g % 4), jsonb_build_object('n', g))) \
             FROM generate_series($1::int8, $2::int8) g",
            &[(&from, Type::INT8), (&to, Type::INT8)],
        )
        .await;
        if round.is_multiple_of(10) {
            let (from, to) = (to + 1, to + 5);
            exec(
                db,
                "SELECT count(enqueue_task('task-' || g, 'q' || (g % 4), '{}'::jsonb, now() + interval '1 second')) \
                 FROM generate_series($1::int8, $2::int8) g",
                &[(&from, Type::INT8), (&to, Type::INT8)],
            )
            .await;
        }

        // Counters: three jobs get a new running-task count (sometimes negative: clamped).
        let key = format!("{}:running", self.prefix);
        let updates: Vec<(String, i64)> = (0..3)
            .map(|_| (format!("job-{}", rand::random_range(1..=JOBS)), rand::random_range(-1..10)))
            .collect();
        let _: () = self.redis.hset(&key, updates.clone()).await.expect("hset");
        self.counters.lock().expect("counters").extend(updates);
        if round % 20 == 7 {
            let job = format!("job-{}", rand::random_range(1..=JOBS));
            let _: i64 = self.redis.hdel(&key, &job).await.expect("hdel");
            self.counters.lock().expect("counters").remove(&job);
        }

        // Chats: a user message to some chat every round, a new chat every third.
        post(db, self.random_chat(), &format!("round {round}")).await;
        self.count("messages", 1);
        if round.is_multiple_of(3) {
            let chat = pending_chat(db, &format!("new in round {round}")).await;
            self.chats.lock().expect("chats").push(chat);
            self.count("messages", 1);
        }

        // Gitsync: a chat moves to a new branch (with a PR) every fifth round.
        if round.is_multiple_of(5) {
            let (chat, origin) = &self.gitsync_rows[rand::random_range(0..self.gitsync_rows.len())];
            let org = origin.trim_start_matches("https://github.com/").trim_end_matches("/repo");
            let branch = format!("r{round}");
            self.fake.pr(org, "repo", &branch, 1000 + round as i64);
            mark(db, *chat, origin, &branch).await;
            self.count("marks", 1);
        }

        // Prebuilds: a fake provisioner finishes jobs, users claim prebuilds, templates move on.
        if round % 5 == 2 {
            let finished = exec(
                db,
                "UPDATE provisioner_jobs SET status = 'succeeded', started_at = now(), completed_at = now() \
                 WHERE status IN ('pending', 'running') AND created_at < now() - interval '300 milliseconds'",
                &[],
            )
            .await;
            self.count("jobs_finished", finished as i64);
            // A finished delete removes the workspace.
            exec(
                db,
                "UPDATE workspaces AS w SET deleted = true FROM workspace_builds AS b \
                 JOIN provisioner_jobs AS j ON j.id = b.job_id \
                 WHERE b.workspace_id = w.id AND b.transition = 'delete' AND j.status = 'succeeded' \
                   AND NOT w.deleted",
                &[],
            )
            .await;
        }
        if round % 20 == 11 {
            let claimed = exec(
                db,
                "UPDATE workspaces SET owner_id = gen_random_uuid() WHERE id = (\
                   SELECT w.id FROM workspaces AS w \
                   JOIN LATERAL (SELECT job_id, transition FROM workspace_builds \
                                 WHERE workspace_id = w.id ORDER BY build_number DESC LIMIT 1) AS b ON true \
                   JOIN provisioner_jobs AS j ON j.id = b.job_id \
                   WHERE w.owner_id = $1 AND NOT w.deleted AND b.transition = 'start' AND j.status = 'succeeded' \
                   ORDER BY random() LIMIT 1)",
                &[(&worker::prebuilds::config::DEFAULT_SYSTEM_USER_ID, Type::UUID)],
            )
            .await;
            self.count("claims", claimed as i64);
        }
        if round % 100 == 50 {
            let template = self.templates[(round / 100) as usize % self.templates.len()];
            activate_new_version(db, template, &format!("v{round}")).await;
            self.count("activations", 1);
        }
    }

    /// Feeds a round every [`ROUND`] until `until`.
    async fn feed(&self, until: Instant) {
        let mut every = tokio::time::interval(ROUND);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut round = 0;
        while Instant::now() < until {
            every.tick().await;
            self.feed_round(round).await;
            round += 1;
        }
        self.count("rounds", round as i64);
    }

    // -----------------------------------------------------------------------------------------
    // The operator: the CLI through pgbouncer

    /// Runs `worker ARGS` against the database through pgbouncer; returns its stdout. A failed
    /// command or one that wrote to stderr is recorded as a problem.
    async fn cli(&self, args: &[&str]) -> String {
        let mut command = tokio::process::Command::new(BIN);
        for key in inherited_overrides() {
            command.env_remove(key);
        }
        // The URL through the environment: `--database-url` warns (argv is visible to other users)
        // on stderr, which this scenario counts as a problem.
        let output = command
            .env("DATABASE_URL", self.bouncer.url(&self.test_db.name))
            .args(args)
            .env("RUST_LOG", "warn")
            .current_dir(repo_path(""))
            .output()
            .await
            .expect("run worker CLI");
        *self.cli_runs.lock().expect("cli runs") += 1;
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() || !stderr.trim().is_empty() {
            self.cli_problems
                .lock()
                .expect("cli problems")
                .push(format!("{args:?}: {}: {stderr}", output.status));
        }
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// One CLI step a second until `until`: each loop in turn is paused and resumed two seconds
    /// later on every replica, and in between the read-only and chat commands run. Ends with
    /// every loop resumed.
    async fn operate(&self, until: Instant) {
        let mut every = tokio::time::interval(Duration::from_secs(1));
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut step = 0usize;
        let mut paused: Option<&str> = None;
        while Instant::now() < until {
            every.tick().await;
            match step % 6 {
                0 => {
                    // Every loop that can be paused (the lease loop cannot: it is refused).
                    let pausable: Vec<&str> = LOOPS
                        .into_iter()
                        .filter(|name| worker::loops::find(name).is_some_and(|info| info.pausable))
                        .collect();
                    let name = pausable[(step / 6) % pausable.len()];
                    self.cli(&["loop", "pause", name, "--reason", "chaos"]).await;
                    paused = Some(name);
                    self.count("pauses", 1);
                }
                1 => {
                    self.cli(&["status", "--json"]).await;
                    self.cli(&["outbox", "stats", "--json"]).await;
                }
                2 => {
                    if let Some(name) = paused.take() {
                        self.cli(&["loop", "resume", name]).await;
                    }
                }
                3 => {
                    let out =
                        self.cli(&["chat", "create", "--title", "from the cli", "hello from the cli"]).await;
                    if let Ok(chat) = Uuid::parse_str(out.trim()) {
                        self.count("messages", 1);
                        self.cli(&["chat", "send", &chat.to_string(), "and more"]).await;
                        self.count("messages", 1);
                        self.cli(&["chat", "tail", &chat.to_string(), "--json"]).await;
                        self.chats.lock().expect("chats").push(chat);
                    }
                }
                4 => {
                    let (chat, _) = &self.gitsync_rows[rand::random_range(0..self.gitsync_rows.len())];
                    self.cli(&["gitsync", "refresh", &chat.to_string()]).await;
                    self.cli(&["gitsync", "stats", "--json"]).await;
                }
                _ => {
                    self.cli(&["prebuilds", "plan", "--json"]).await;
                    self.cli(&["prebuilds", "status", "--json"]).await;
                    self.cli(&["loop", "list", "--json"]).await;
                    self.cli(&["chat", "list", "--json", "--limit", "5"]).await;
                }
            }
            step += 1;
        }
        if let Some(name) = paused {
            self.cli(&["loop", "resume", name]).await;
        }
    }

    // -----------------------------------------------------------------------------------------
    // What the replicas did

    async fn in_redis(&self) -> i64 {
        let mut total = 0;
        for queue in QUEUES {
            let n: i64 =
                self.redis.zcard(worker::redis::key(&self.prefix, "sched", queue)).await.expect("zcard");
            total += n;
        }
        total
    }

    async fn outbox_left(&self) -> i64 {
        scalar(&self.db, "SELECT count(*)::int8 FROM task_outbox", &[]).await
    }

    /// Chats with messages that are not `waiting` with an assistant message last.
    async fn chats_unsettled(&self) -> i64 {
        scalar(
            &self.db,
            "SELECT count(*)::int8 FROM chats AS c \
             WHERE EXISTS (SELECT 1 FROM chat_messages WHERE chat_id = c.id) \
               AND (c.status <> 'waiting' OR (SELECT role FROM chat_messages WHERE chat_id = c.id \
                                               ORDER BY id DESC LIMIT 1) <> 'assistant')",
            &[],
        )
        .await
    }

    /// Jobs whose `running_tasks` differs from what the test last wrote into Redis.
    async fn counters_off(&self) -> usize {
        let expected = self.counters.lock().expect("counters").clone();
        let rows = self
            .db
            .get()
            .await
            .expect("conn")
            .fetch_all("SELECT id, running_tasks FROM jobs", &[])
            .await
            .expect("jobs");
        rows.iter()
            .filter(|r| {
                let id: String = r.get(0);
                let want = expected.get(&id).copied().unwrap_or(0).clamp(0, i64::from(i32::MAX));
                i64::from(r.get::<_, i32>(1)) != want
            })
            .count()
    }

    /// Diff statuses not refreshed successfully since their last mark (a 304 on a cached ETag
    /// is a success: `not_modified`), by outcome.
    async fn gitsync_not_ok(&self) -> Option<String> {
        let rows = self
            .db
            .get()
            .await
            .expect("conn")
            .fetch_all(
                "SELECT coalesce(last_outcome, 'never'), count(*)::int8, max(last_error) FROM chat_diff_statuses \
                 WHERE last_outcome IS NULL OR last_outcome NOT IN ('ok', 'not_modified') OR last_error IS NOT NULL \
                 GROUP BY 1 ORDER BY 1",
                &[],
            )
            .await
            .expect("diff statuses");
        let not_ok: Vec<String> = rows
            .iter()
            .map(|r| {
                format!(
                    "{}={} ({:?})",
                    r.get::<_, String>(0),
                    r.get::<_, i64>(1),
                    r.get::<_, Option<String>>(2)
                )
            })
            .collect();
        (!not_ok.is_empty()).then(|| not_ok.join(", "))
    }
}

/// Waits until `check` returns `None` (done); on timeout fails with the last state it described.
async fn settle<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<String>>,
{
    let deadline = Instant::now() + LIMIT;
    loop {
        match check().await {
            None => return,
            Some(state) => {
                assert!(Instant::now() < deadline, "timed out after {LIMIT:?} waiting for {what}: {state}")
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

// ---------------------------------------------------------------------------------------------
// Logs

/// What a replica's log says about errors.
#[derive(Debug, Default)]
struct LogFindings {
    /// Lines naming SQLSTATE 42P05 or its message (`prepared statement "s0" already exists`).
    duplicate_statement: usize,
    /// Lines naming SQLSTATE 26000 or its message (`prepared statement "s1" does not exist`).
    missing_statement: usize,
    /// Every WARN/ERROR record and every line that is not a JSON record.
    other: Vec<String>,
}

fn scan(log: &str) -> LogFindings {
    let mut findings = LogFindings::default();
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let lower = line.to_lowercase();
        let statement = lower.contains("prepared statement") || lower.contains("portal");
        // A bare code counts only in a problem line: "26000" is also a substring of chat ids,
        // trace ids and row counts in INFO records (a false positive once failed CI).
        let problem = match serde_json::from_str::<serde_json::Value>(line) {
            Ok(record) => matches!(record["level"].as_str(), Some("WARN" | "ERROR")),
            Err(_) => true,
        };
        if (problem && line.contains("42P05")) || (statement && lower.contains("already exists")) {
            findings.duplicate_statement += 1;
        } else if (problem && line.contains("26000")) || (statement && lower.contains("does not exist")) {
            findings.missing_statement += 1;
        }
        if problem {
            findings.other.push(line.to_owned());
        }
    }
    findings
}

/// Each loop's tick count and last error on a replica's `/readyz`.
fn loops_of(body: &serde_json::Value) -> BTreeMap<String, (u64, Option<String>)> {
    body["loops"]
        .as_array()
        .expect("loops on /readyz")
        .iter()
        .map(|l| {
            let name = l["name"].as_str().expect("name").to_owned();
            (name, (l["ticks"].as_u64().expect("ticks"), l["last_error"].as_str().map(str::to_owned)))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn scenario_4_two_replicas_through_pgbouncer_in_transaction_mode_run_every_loop_without_errors() {
    let world = World::new().await;
    let mut dir = tempfile::Builder::new().prefix("chaos-pgbouncer-").tempdir().expect("dir");
    // WORKER_CHAOS_KEEP=1 keeps the configs and logs of the replicas for a look afterwards.
    dir.disable_cleanup(std::env::var_os("WORKER_CHAOS_KEEP").is_some());
    println!("replica configs and logs: {}", dir.path().display());
    let agent = chaos_support::agent(dir.path(), "agent", AGENT);
    let config = world.config(&agent);
    let commits_before = scalar(
        &world.test_db.db,
        "SELECT xact_commit::int8 FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .await;

    let mut replicas =
        [Replica::start(dir.path(), "replica-a", &config), Replica::start(dir.path(), "replica-b", &config)];
    for replica in &replicas {
        replica.ready().await;
    }

    // 60 s of traffic and operator commands.
    let started = Instant::now();
    let until = started + RUN;
    // Server connections to the test database while it runs: the pooled ones are pgbouncer's.
    let peak_backends = chaos_support::peak_while(
        Duration::from_millis(250),
        || chaos_support::backends(&world.test_db.name),
        async {
            tokio::join!(world.feed(until), world.operate(until));
        },
    )
    .await;
    let ran = started.elapsed();
    for replica in &mut replicas {
        replica.assert_alive();
    }

    // Everything fed has been worked off.
    let settling = Instant::now();
    let tasks = *world.tasks.lock().expect("tasks");
    settle("the outbox to drain", || async {
        let left = world.outbox_left().await;
        (left > 0).then(|| format!("{left} rows left"))
    })
    .await;
    settle("every task to be scheduled in Redis", || async {
        let scheduled = world.in_redis().await;
        (scheduled != tasks).then(|| format!("{scheduled} of {tasks} scheduled"))
    })
    .await;
    settle("every chat to be answered and waiting", || async {
        let unsettled = world.chats_unsettled().await;
        (unsettled > 0).then(|| format!("{unsettled} chats not answered"))
    })
    .await;
    settle("jobs.running_tasks to match Redis", || async {
        let off = world.counters_off().await;
        (off > 0).then(|| format!("{off} jobs differ"))
    })
    .await;
    settle("every diff status to be refreshed", || world.gitsync_not_ok()).await;
    let settled_in = settling.elapsed();

    let db = &world.db;
    let dead = scalar(db, "SELECT count(*)::int8 FROM task_outbox_dead", &[]).await;
    let chats = scalar(
        db,
        "SELECT count(*)::int8 FROM chats AS c WHERE EXISTS (SELECT 1 FROM chat_messages WHERE chat_id = c.id)",
        &[],
    )
    .await;
    let turns = scalar(db, "SELECT coalesce(sum(generation), 0)::int8 FROM chats", &[]).await;
    let answers = scalar(db, "SELECT count(*)::int8 FROM chat_messages WHERE role = 'assistant'", &[]).await;
    let chat_errors =
        scalar(db, "SELECT count(*)::int8 FROM chats WHERE status = 'error' OR last_error IS NOT NULL", &[])
            .await;
    let prebuilds_created =
        scalar(db, "SELECT count(*)::int8 FROM workspaces WHERE preset_id IS NOT NULL", &[]).await;
    let prebuilds_deleted =
        scalar(db, "SELECT count(*)::int8 FROM workspace_builds WHERE transition = 'delete'", &[]).await;
    let jobs_canceled =
        scalar(db, "SELECT count(*)::int8 FROM provisioner_jobs WHERE status = 'canceled'", &[]).await;
    let pr_fetches = world
        .fake
        .seen()
        .iter()
        .filter(|s| {
            let parts: Vec<&str> = s.path.trim_start_matches('/').split('/').collect();
            matches!(parts.as_slice(), ["repos", _, _, "pulls", n] if n.parse::<u64>().is_ok())
        })
        .count();
    let github_requests = world.fake.seen().len();
    let commits = scalar(
        &world.test_db.db,
        "SELECT xact_commit::int8 FROM pg_stat_database WHERE datname = current_database()",
        &[],
    )
    .await
        - commits_before;

    // Both replicas ran every loop many times and none of them ever recorded an error.
    let mut ticks_total = 0;
    let mut ticks_per_loop: BTreeMap<String, u64> = BTreeMap::new();
    let mut loop_errors = Vec::new();
    for replica in &mut replicas {
        replica.assert_alive();
        let (status, body) = replica.readyz().await.expect("/readyz answers");
        assert_eq!(status, 200, "{} /readyz: {body}", replica.name);
        let loops = loops_of(&body);
        let names: Vec<&str> = loops.keys().map(String::as_str).collect();
        let mut expected = LOOPS.to_vec();
        expected.sort_unstable();
        assert_eq!(names, expected, "{}: every loop runs", replica.name);
        for (name, (ticks, error)) in loops {
            ticks_total += ticks;
            *ticks_per_loop.entry(name.clone()).or_default() += ticks;
            if let Some(error) = error {
                loop_errors.push(format!("{} {name}: {error}", replica.name));
            }
            // The slowest loops tick every second; one pause of 2 s each.
            assert!(ticks >= 20, "{} {name}: only {ticks} ticks in {ran:?}", replica.name);
        }
    }

    let mut exits = Vec::new();
    for replica in &mut replicas {
        exits.push(replica.sigterm(LIMIT).await.code());
    }

    let mut duplicate = 0;
    let mut missing = 0;
    let mut other = Vec::new();
    for replica in &replicas {
        let findings = scan(&replica.log());
        duplicate += findings.duplicate_statement;
        missing += findings.missing_statement;
        other.extend(findings.other.into_iter().map(|line| format!("{}: {line}", replica.name)));
    }
    let cli_runs = *world.cli_runs.lock().expect("cli runs");
    let cli_problems = world.cli_problems.lock().expect("cli problems").clone();
    let per_loop: Vec<String> = ticks_per_loop.iter().map(|(name, n)| format!("{name}:{n}")).collect();

    report(
        4,
        "pgbouncer",
        &[
            ("replicas", "2".into()),
            ("seconds", ran.as_secs().to_string()),
            ("bouncer_pool", BOUNCER_POOL.to_string()),
            ("ticks", ticks_total.to_string()),
            ("ticks_per_loop", per_loop.join(",")),
            ("db_commits", commits.to_string()),
            ("peak_backends", peak_backends.to_string()),
            ("tasks", tasks.to_string()),
            ("dead_lettered", dead.to_string()),
            ("chats", chats.to_string()),
            ("user_messages", world.fed("messages").to_string()),
            ("turns", turns.to_string()),
            ("answers", answers.to_string()),
            ("gitsync_marks", world.fed("marks").to_string()),
            ("gitsync_pr_fetches", pr_fetches.to_string()),
            ("github_requests", github_requests.to_string()),
            ("prebuilds_created", prebuilds_created.to_string()),
            ("prebuilds_deleted", prebuilds_deleted.to_string()),
            ("prebuild_jobs_canceled", jobs_canceled.to_string()),
            ("prebuilds_claimed", world.fed("claims").to_string()),
            ("activations", world.fed("activations").to_string()),
            ("cli_commands", cli_runs.to_string()),
            ("loop_pauses", world.fed("pauses").to_string()),
            ("settled_s", format!("{:.1}", settled_in.as_secs_f64())),
            ("errors_42P05", duplicate.to_string()),
            ("errors_26000", missing.to_string()),
            ("other_errors", (other.len() + loop_errors.len() + cli_problems.len()).to_string()),
        ],
    );
    assert_eq!(
        (duplicate, missing),
        (0, 0),
        "named statements failed behind pgbouncer:\n{}",
        other.join("\n")
    );
    assert!(other.is_empty(), "WARN/ERROR (or non-JSON) lines in the replicas' logs:\n{}", other.join("\n"));
    assert!(loop_errors.is_empty(), "loops recorded errors on /readyz:\n{}", loop_errors.join("\n"));
    assert!(cli_problems.is_empty(), "CLI commands through pgbouncer failed:\n{}", cli_problems.join("\n"));
    assert_eq!(exits, [Some(0), Some(0)], "both replicas drain on SIGTERM");
    // pgbouncer's server connections, the two LISTEN connections and the test's direct one.
    assert!(
        peak_backends <= i64::from(BOUNCER_POOL) + 3,
        "{peak_backends} server connections: the replicas' pools did not go through pgbouncer"
    );
    assert_eq!((dead, chat_errors), (0, 0), "nothing dead-lettered, no chat in error");
    assert!(turns >= chats && answers >= chats, "every chat had a turn: {turns} turns, {answers} answers");
    assert!(
        pr_fetches as i64 > world.gitsync_rows.len() as i64 * 5,
        "gitsync refreshed rows again and again"
    );
    assert!(prebuilds_created > TEMPLATES as i64 * 2, "prebuilds were created and replaced");
    assert!(prebuilds_deleted > 0, "expired prebuilds were deleted");
}

#[test]
fn the_log_scan_finds_failed_named_statements_and_any_warning() {
    let log = concat!(
        r#"{"level":"INFO","message":"NOTICE: relation \"refinery_schema_history\" already exists, skipping"}"#,
        "\n",
        r#"{"level":"WARN","message":"tick failed","error":"db error: ERROR: prepared statement \"s0\" already exists"}"#,
        "\n",
        r#"{"level":"ERROR","message":"tick failed","error":"db error: ERROR: prepared statement \"s165\" does not exist"}"#,
        "\n",
        r#"{"level":"INFO","message":"turn finished"}"#,
        "\n",
        r#"{"level":"INFO","message":"chat acquired","chat_id":"5f326000-4a1b-4c2d-8e3f-1a2b3c4d5e6f","rows":26000}"#,
        "\n",
        r#"{"level":"ERROR","message":"tick failed","error":"db error { code: SqlState(E26000) }"}"#,
        "\nthread 'main' panicked\n",
    );
    let findings = scan(log);
    assert_eq!((findings.duplicate_statement, findings.missing_statement), (1, 2));
    assert_eq!(findings.other.len(), 4, "{:?}", findings.other);
}
