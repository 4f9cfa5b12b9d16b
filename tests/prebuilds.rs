//! The prebuilds reconciler (docs/prebuilds.md) against a real database: a cycle's writes, one
//! leader per cycle, the connection bound during the fan-out, idle presets skipped before a slot,
//! the claim race on delete, failures isolated per preset, `plan`/`status` through the real binary
//! (and `plan` matching what the next cycle does), the activation trigger, `invalidate` (every
//! prebuild replaced in one cycle, a claimed workspace untouched).
//!
//! Overlap is arranged with row locks, not sleeps: the test holds `FOR UPDATE` on the template
//! row (a prebuild insert's foreign-key check needs `FOR KEY SHARE` on it) or on the workspace
//! being deleted, waits until the reconciler's backends are seen waiting on it in
//! `pg_stat_activity`, then acts and releases.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use common::metrics::MetricsProbe;
use common::process::{cli, json, stdout};
use common::{TestDb, eventually};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::config::Concurrency;
use worker::db::{Db, Exec};
use worker::health::Health;
use worker::listen::ListenEvent;
use worker::prebuilds::config::DEFAULT_SYSTEM_USER_ID as SYSTEM;
use worker::prebuilds::reconciler::{self, CycleStats, DeleteOutcome};
use worker::prebuilds::{PrebuildsConfig, Reconciler};
use worker::runtime::RuntimeConfig;
use worker::runtime::{Outcome, Runtime, Tick};

/// Generous bound for conditions that should hold in milliseconds; reaching it is a failure.
const LIMIT: Duration = Duration::from_secs(15);

// ---------------------------------------------------------------------------------------------
// Fixtures

async fn exec(db: &Db, sql: &str, params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)]) {
    db.get().await.expect("conn").exec(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn count(db: &Db, sql: &str, params: &[(&(dyn tokio_postgres::types::ToSql + Sync), Type)]) -> i64 {
    db.get().await.expect("conn").fetch_one(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

async fn uuids(db: &Db, sql: &str) -> BTreeSet<Uuid> {
    let rows =
        db.get().await.expect("conn").fetch_all(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().map(|r| r.get(0)).collect()
}

/// A template with one version, activated or not; returns (template, version).
async fn template(db: &Db, active: bool) -> (Uuid, Uuid) {
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
    if active {
        conn.exec(
            "UPDATE templates SET active_version_id = $1 WHERE id = $2",
            &[(&version, Type::UUID), (&template, Type::UUID)],
        )
        .await
        .expect("activate");
    }
    (template, version)
}

/// A preset on `version` wanting `desired` prebuilds, with an optional TTL in minutes.
async fn preset(db: &Db, version: Uuid, name: &str, desired: i32, ttl_minutes: Option<i32>) -> Uuid {
    let ttl = ttl_minutes.map(|m| m * 60);
    db.get()
        .await
        .expect("conn")
        .fetch_one(
            "INSERT INTO presets (template_version_id, name, desired_instances, invalidate_after_secs) \
             VALUES ($1, $2, $3, $4) RETURNING id",
            &[(&version, Type::UUID), (&name, Type::TEXT), (&desired, Type::INT4), (&ttl, Type::INT4)],
        )
        .await
        .expect("preset")
        .get(0)
}

/// A prebuild of `preset` owned by the system user, created `age_minutes` ago, whose only build
/// is a `start` with its job in `job_status`; returns (workspace, job).
async fn prebuild(db: &Db, preset: Uuid, job_status: &str, age_minutes: i32) -> (Uuid, Uuid) {
    let row = db
        .get()
        .await
        .expect("conn")
        .fetch_one(
            "WITH p AS (SELECT p.id, p.template_version_id, v.template_id FROM presets AS p \
                        JOIN template_versions AS v ON v.id = p.template_version_id WHERE p.id = $1), \
                  w AS (INSERT INTO workspaces (owner_id, template_id, preset_id, name, created_at) \
                        SELECT $2, template_id, id, 'fixture', now() - make_interval(mins => $3) FROM p \
                        RETURNING id), \
                  j AS (INSERT INTO provisioner_jobs (status, completed_at) \
                        VALUES ($4, CASE WHEN $4 IN ('pending', 'running') THEN NULL ELSE now() END) \
                        RETURNING id), \
                  b AS (INSERT INTO workspace_builds \
                        (workspace_id, template_version_id, preset_id, transition, build_number, job_id, initiator_id) \
                        SELECT w.id, p.template_version_id, p.id, 'start', 1, j.id, $2 FROM w, j, p \
                        RETURNING workspace_id, job_id) \
             SELECT workspace_id, job_id FROM b",
            &[(&preset, Type::UUID), (&SYSTEM, Type::UUID), (&age_minutes, Type::INT4), (&job_status, Type::TEXT)],
        )
        .await
        .expect("prebuild");
    (row.get(0), row.get(1))
}

fn config() -> PrebuildsConfig {
    PrebuildsConfig::default()
}

fn reconciler(concurrency: usize) -> Reconciler {
    Reconciler::new(config(), concurrency, &opentelemetry::global::meter("test"))
}

async fn cycle(db: &Db, reconciler: &Reconciler) -> CycleStats {
    reconciler.cycle(&Tick::detached(db)).await.expect("cycle")
}

fn runtime(db: Db, meter: &opentelemetry::metrics::Meter) -> Runtime {
    let settings =
        RuntimeConfig { jitter: 0.0, controls_refresh: Duration::ZERO, ..RuntimeConfig::default() };
    Runtime::new(db, Health::default(), meter, settings)
}

/// A direct connection (not `application_name = 'worker'`) with an open transaction holding
/// `lock_sql` (a `FOR UPDATE`) until `release` is called.
struct RowLock {
    client: tokio_postgres::Client,
}

impl RowLock {
    async fn hold(test_db: &TestDb, lock_sql: &str) -> Self {
        let client = worker::db::connect_direct(&test_db.url, "worker-tests").await.expect("direct");
        client.batch_execute(&format!("BEGIN; {lock_sql}")).await.expect("lock");
        Self { client }
    }

    async fn release(self) {
        self.client.batch_execute("COMMIT").await.expect("commit");
    }
}

/// The reconciler's (and the runtime's) backends in this database that are not idle: running a
/// statement, waiting on a lock, or idle inside a transaction (the leader lock's).
const BUSY: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND application_name = 'worker' AND state <> 'idle'";
const WAITING_ON_LOCK: &str = "SELECT count(*) FROM pg_stat_activity \
     WHERE datname = current_database() AND application_name = 'worker' AND wait_event_type = 'Lock'";

async fn direct_count(client: &tokio_postgres::Client, sql: &str) -> i64 {
    client.fetch_one(sql, &[]).await.expect("pg_stat_activity").get(0)
}

async fn wait_for_lock_waiters(test_db: &TestDb, waiters: i64) {
    let observer = worker::db::connect_direct(&test_db.url, "worker-tests").await.expect("direct");
    eventually(LIMIT, &format!("{waiters} reconciler backend(s) waiting on the test's lock"), || {
        let observer = &observer;
        async move { direct_count(observer, WAITING_ON_LOCK).await >= waiters }
    })
    .await;
}

// ---------------------------------------------------------------------------------------------
// A cycle's writes

#[tokio::test]
async fn a_cycle_creates_missing_prebuilds_deletes_expired_ones_and_cancels_pending_jobs_of_inactive_presets()
{
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (_, active_version) = template(db, true).await;
    let (_, old_version) = template(db, false).await;
    // Wants 2 (TTL 60 min): one fresh, one expired → delete the expired one, create 1.
    let ttl = preset(db, active_version, "ttl", 2, Some(60)).await;
    let (_fresh, _) = prebuild(db, ttl, "succeeded", 10).await;
    let (expired, _) = prebuild(db, ttl, "succeeded", 90).await;
    // A claimed workspace of the same preset: not the reconciler's, never counted or touched.
    let (claimed, _) = prebuild(db, ttl, "succeeded", 5).await;
    let user = Uuid::new_v4();
    exec(
        db,
        "UPDATE workspaces SET owner_id = $1 WHERE id = $2",
        &[(&user, Type::UUID), (&claimed, Type::UUID)],
    )
    .await;
    // Wants 1, has 1 running and 1 starting: nothing to do.
    let satisfied = preset(db, active_version, "satisfied", 1, None).await;
    prebuild(db, satisfied, "succeeded", 10).await;
    prebuild(db, satisfied, "running", 1).await;
    // Inactive: delete its running prebuild, cancel its pending start job.
    let inactive = preset(db, old_version, "inactive", 3, None).await;
    let (old_running, _) = prebuild(db, inactive, "succeeded", 10).await;
    let (_, pending_job) = prebuild(db, inactive, "pending", 1).await;

    let rt = runtime(db.clone(), &opentelemetry::global::meter("test"));
    let stop = CancellationToken::new();
    let stats = rt.listener().start(test_db.url.clone(), rt.health.clone(), stop.clone());
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("listening").expect("watch");
    let mut posted = rt.listener().subscribe(reconciler::JOB_POSTED_CHANNEL).await;

    let metrics = MetricsProbe::new();
    let reconciler = Reconciler::new(config(), 2, &metrics.meter());
    let stats = cycle(db, &reconciler).await;
    assert_eq!(
        (stats.presets_total, stats.skipped, stats.reconciled),
        (3, 0, 3),
        "no preset is idle: {stats:?}"
    );
    assert_eq!((stats.created, stats.deleted, stats.canceled, stats.claimed, stats.failed), (1, 2, 1, 0, 0));

    // The new prebuild: the system user's, a `start` build #1 on the active version, a pending job.
    let created = db
        .get()
        .await
        .expect("conn")
        .fetch_one(
            "SELECT w.owner_id, w.name, b.template_version_id, b.build_number, b.initiator_id, j.status, j.id \
             FROM workspaces AS w JOIN workspace_builds AS b ON b.workspace_id = w.id \
             JOIN provisioner_jobs AS j ON j.id = b.job_id WHERE w.name LIKE 'prebuild-%'",
            &[],
        )
        .await
        .expect("exactly one created prebuild");
    assert_eq!(created.get::<_, Uuid>(0), SYSTEM);
    assert_eq!(created.get::<_, String>(1).len(), "prebuild-".len() + 12);
    assert_eq!(created.get::<_, Uuid>(2), active_version);
    assert_eq!(created.get::<_, i32>(3), 1);
    assert_eq!(created.get::<_, Uuid>(4), SYSTEM);
    assert_eq!(created.get::<_, String>(5), "pending");
    let create_job: Uuid = created.get(6);

    // The deletes: a `delete` build #2 with a pending job each, on exactly the two workspaces.
    let deleted = uuids(
        db,
        "SELECT b.workspace_id FROM workspace_builds AS b JOIN provisioner_jobs AS j ON j.id = b.job_id \
         WHERE b.transition = 'delete' AND b.build_number = 2 AND j.status = 'pending'",
    )
    .await;
    assert_eq!(deleted, BTreeSet::from([expired, old_running]));
    let status = |job: Uuid| async move {
        count(
            db,
            "SELECT count(*) FROM provisioner_jobs WHERE id = $1 AND status = 'canceled' AND completed_at IS NOT NULL",
            &[(&job, Type::UUID)],
        )
        .await
    };
    assert_eq!(status(pending_job).await, 1, "the inactive preset's pending job is canceled");

    // One NOTIFY per posted job (the create's and the two deletes'), delivered at commit.
    let mut notified = BTreeSet::new();
    for _ in 0..3 {
        match tokio::time::timeout(LIMIT, posted.recv()).await.expect("a notification").expect("listener") {
            ListenEvent::Notification(payload) => notified.insert(payload),
            other => panic!("unexpected {other:?}"),
        };
    }
    assert!(notified.contains(&create_job.to_string()), "{notified:?}");
    let delete_jobs = uuids(db, "SELECT job_id FROM workspace_builds WHERE transition = 'delete'").await;
    assert!(delete_jobs.iter().all(|j| notified.contains(&j.to_string())), "{notified:?}");

    assert_eq!(metrics.counter("prebuilds.actions", &[("kind", "create")]).await, 1);
    assert_eq!(metrics.counter("prebuilds.actions", &[("kind", "delete")]).await, 2);
    assert_eq!(metrics.counter("prebuilds.actions", &[("kind", "cancel")]).await, 1);

    // The next cycle finds everything in progress and writes nothing; the idle inactive preset
    // (its prebuild deleting, its job canceled) is now skipped.
    let again = cycle(db, &reconciler).await;
    assert_eq!((again.created, again.deleted, again.canceled), (0, 0, 0), "{again:?}");
    assert_eq!(again.skipped, 1, "{again:?}");
    let owner: Uuid = db
        .get()
        .await
        .expect("conn")
        .fetch_one("SELECT owner_id FROM workspaces WHERE id = $1", &[(&claimed, Type::UUID)])
        .await
        .expect("claimed")
        .get(0);
    assert_eq!(owner, user, "the claimed workspace is untouched");
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// Acceptance 2: one leader per cycle

#[tokio::test]
async fn of_two_replicas_exactly_one_reconciles_a_cycle_and_the_other_skips_as_not_leader() {
    let test_db = TestDb::new().await;
    let (template_id, version) = template(&test_db.db, true).await;
    let wanted = preset(&test_db.db, version, "small", 1, None).await;
    let meter = opentelemetry::global::meter("test");
    let (rt_a, rt_b) = (runtime(test_db.db.clone(), &meter), runtime(test_db.another_pool(), &meter));
    let (a, b) = (reconciler(2), reconciler(2));
    let (last_a, last_b) = (a.last_cycle(), b.last_cycle());
    let (mut runner_a, mut runner_b) = (rt_a.runner(a), rt_b.runner(b));

    // A's create waits on the test's lock on the template row, inside A's tick (lock held).
    let lock =
        RowLock::hold(&test_db, &format!("SELECT 1 FROM templates WHERE id = '{template_id}' FOR UPDATE"))
            .await;
    let a_tick = tokio::spawn(async move { runner_a.tick_once().await });
    wait_for_lock_waiters(&test_db, 1).await;

    let report_b = runner_b.tick_once().await;
    assert_eq!(report_b.outcome, Outcome::SkippedNotLeader);
    assert_eq!(last_b.get(), None, "B did not reconcile");

    lock.release().await;
    let report_a = a_tick.await.expect("join");
    assert_eq!(report_a.outcome, Outcome::Ok);
    assert_eq!(last_a.get().expect("A reconciled").created, 1);

    // Leadership is per cycle: B leads the next one, and its snapshot (taken under the lock)
    // sees A's prebuild starting, so it creates no duplicate.
    assert_eq!(runner_b.tick_once().await.outcome, Outcome::Ok);
    assert_eq!(last_b.get().expect("B reconciled").created, 0);
    let prebuilds = count(
        &test_db.db,
        "SELECT count(*) FROM workspaces WHERE preset_id = $1 AND owner_id = $2",
        &[(&wanted, Type::UUID), (&SYSTEM, Type::UUID)],
    )
    .await;
    assert_eq!(prebuilds, 1);
}

// ---------------------------------------------------------------------------------------------
// Acceptance 3: connections during the fan-out

#[tokio::test]
async fn with_pool_size_6_fifty_presets_never_keep_more_than_concurrency_plus_one_connections_busy() {
    let test_db = TestDb::with_pool_size(6).await;
    let mut worker_config = test_db.config();
    worker_config.database.pool_size = 6;
    let concurrency = Concurrency::from_config(&worker_config).prebuilds;
    assert_eq!(concurrency, 3);

    let (template_id, version) = template(&test_db.db, true).await;
    for n in 0..50 {
        preset(&test_db.db, version, &format!("p{n}"), 1, None).await;
    }
    let rt = runtime(test_db.db.clone(), &opentelemetry::global::meter("test"));
    let reconciler = reconciler(concurrency);
    let last = reconciler.last_cycle();
    let mut runner = rt.runner(reconciler);

    // Sample pg_stat_activity for the whole tick.
    let peak = Arc::new(AtomicI64::new(0));
    let samples = Arc::new(AtomicI64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let sampler = {
        let (peak, samples, done) = (peak.clone(), samples.clone(), done.clone());
        let client = worker::db::connect_direct(&test_db.url, "worker-tests").await.expect("direct");
        tokio::spawn(async move {
            while !done.load(Ordering::Relaxed) {
                peak.fetch_max(direct_count(&client, BUSY).await, Ordering::Relaxed);
                samples.fetch_add(1, Ordering::Relaxed);
                tokio::task::yield_now().await;
            }
        })
    };

    // Every create waits on the test's lock: the fan-out fills all its slots and stays there.
    let lock =
        RowLock::hold(&test_db, &format!("SELECT 1 FROM templates WHERE id = '{template_id}' FOR UPDATE"))
            .await;
    let tick = tokio::spawn(async move { runner.tick_once().await });
    wait_for_lock_waiters(&test_db, 3).await;
    let observer = worker::db::connect_direct(&test_db.url, "worker-tests").await.expect("direct");
    for _ in 0..20 {
        // 3 executor connections blocked + the leader's transaction; never a 4th slot.
        assert_eq!(direct_count(&observer, BUSY).await, 4);
        assert_eq!(direct_count(&observer, WAITING_ON_LOCK).await, 3);
    }
    lock.release().await;
    let report = tick.await.expect("join");
    done.store(true, Ordering::Relaxed);
    sampler.await.expect("sampler");

    assert_eq!(report.outcome, Outcome::Ok);
    let stats = last.get().expect("a cycle");
    assert_eq!((stats.created, stats.failed), (50, 0), "{stats:?}");
    assert_eq!(stats.peak_in_flight, 3, "{stats:?}");
    let peak = peak.load(Ordering::Relaxed);
    assert!(samples.load(Ordering::Relaxed) > 20, "the sampler ran during the tick");
    assert!(peak <= concurrency as i64 + 1, "peak busy reconciler connections {peak} > {concurrency} + 1");
    assert_eq!(peak, 4, "the bound was reached, so the sampling saw the fan-out");
}

// ---------------------------------------------------------------------------------------------
// Acceptance 4: idle presets never take a slot

#[tokio::test]
async fn idle_presets_never_take_a_concurrency_slot() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (_, active) = template(db, true).await;
    let (_, old) = template(db, false).await;
    let mut idle = BTreeSet::new();
    for n in 0..20 {
        idle.insert(preset(db, old, &format!("idle{n}"), 2, Some(60)).await);
    }
    // A failure outside the failure window: no backoff any more, still idle.
    let failed_long_ago = preset(db, old, "failed-long-ago", 1, None).await;
    let (_, job) = prebuild(db, failed_long_ago, "failed", 200).await;
    exec(
        db,
        "UPDATE provisioner_jobs SET completed_at = now() - interval '2 hours' WHERE id = $1",
        &[(&job, Type::UUID)],
    )
    .await;
    idle.insert(failed_long_ago);
    // Not idle: inactive with a running prebuild; inactive in backoff; active (even wanting 0).
    let with_running = preset(db, old, "with-running", 0, None).await;
    prebuild(db, with_running, "succeeded", 5).await;
    let in_backoff = preset(db, old, "in-backoff", 1, None).await;
    prebuild(db, in_backoff, "failed", 1).await;
    let active_zero = preset(db, active, "active-zero", 0, None).await;

    let plan = reconciler::plan_from_snapshot(db, &config()).await.expect("plan");
    let slotted: BTreeSet<Uuid> = plan.reconcile.iter().map(|p| p.preset.id).collect();
    assert_eq!(slotted, BTreeSet::from([with_running, in_backoff, active_zero]));
    assert!(slotted.is_disjoint(&idle));

    let stats = cycle(db, &reconciler(2)).await;
    assert_eq!((stats.presets_total, stats.skipped, stats.reconciled), (24, 21, 3), "{stats:?}");
    assert_eq!(stats.slots_taken, 3, "only the three non-idle presets went through the executor");
    assert_eq!(stats.deleted, 1);
}

// ---------------------------------------------------------------------------------------------
// Acceptance 5: the claim race

#[tokio::test]
async fn a_prebuild_claimed_between_the_snapshot_and_its_delete_is_not_deleted() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (_, old) = template(db, false).await;
    let inactive = preset(db, old, "inactive", 1, None).await;
    let (workspace, _) = prebuild(db, inactive, "succeeded", 10).await;

    // The claim holds the workspace row (as the API tier's claim transaction would) while the
    // cycle's snapshot already saw it as the system user's and planned its delete.
    let claim =
        RowLock::hold(&test_db, &format!("SELECT 1 FROM workspaces WHERE id = '{workspace}' FOR UPDATE"))
            .await;
    let reconciler = reconciler(2);
    let tick_db = db.clone();
    let run = tokio::spawn(async move { reconciler.cycle(&Tick::detached(&tick_db)).await });
    wait_for_lock_waiters(&test_db, 1).await;
    let user = Uuid::new_v4();
    claim
        .client
        .batch_execute(&format!("UPDATE workspaces SET owner_id = '{user}' WHERE id = '{workspace}'"))
        .await
        .expect("claim");
    claim.release().await;

    let stats = run.await.expect("join").expect("cycle");
    assert_eq!((stats.deleted, stats.claimed, stats.failed), (0, 1, 0), "{stats:?}");
    let delete_builds =
        count(db, "SELECT count(*) FROM workspace_builds WHERE transition = 'delete'", &[]).await;
    assert_eq!(delete_builds, 0, "no delete build for a claimed workspace");
    assert_eq!(count(db, "SELECT count(*) FROM provisioner_jobs", &[]).await, 1, "no job posted");

    // The same, step by step: a claim that committed before the delete's lock.
    let (other, _) = prebuild(db, inactive, "succeeded", 10).await;
    exec(
        db,
        "UPDATE workspaces SET owner_id = $1 WHERE id = $2",
        &[(&user, Type::UUID), (&other, Type::UUID)],
    )
    .await;
    let mut conn = db.get().await.expect("conn");
    let outcome = reconciler::delete_prebuild(&mut conn, db.tx_limits(), SYSTEM, other).await;
    assert_eq!(outcome.expect("delete"), DeleteOutcome::Claimed);
}

// ---------------------------------------------------------------------------------------------
// One preset's failure never stops the cycle

#[tokio::test]
async fn a_preset_whose_writes_fail_is_counted_and_the_others_are_still_reconciled() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (_, version) = template(db, true).await;
    let broken = preset(db, version, "broken", 1, None).await;
    for n in 0..3 {
        preset(db, version, &format!("fine{n}"), 1, None).await;
    }
    let conn = db.get().await.expect("conn");
    conn.batch_execute(&format!(
        "CREATE FUNCTION test_refuse() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.preset_id = '{broken}' THEN RAISE EXCEPTION 'refused by the test'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER test_refuse BEFORE INSERT ON workspaces FOR EACH ROW EXECUTE FUNCTION test_refuse();"
    ))
    .await
    .expect("trigger");

    let rt = runtime(db.clone(), &opentelemetry::global::meter("test"));
    let reconciler = reconciler(1);
    let last = reconciler.last_cycle();
    let report = rt.runner(reconciler).tick_once().await;
    assert_eq!(report.outcome, Outcome::Ok, "a preset's failure does not fail the tick");
    let stats = last.get().expect("a cycle");
    assert_eq!((stats.created, stats.failed), (3, 1), "{stats:?}");
}

// ---------------------------------------------------------------------------------------------
// The activation trigger

#[tokio::test]
async fn activating_a_template_version_notifies_the_reconciler_channel() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (template_id, version) = template(db, false).await;
    let rt = runtime(db.clone(), &opentelemetry::global::meter("test"));
    let stop = CancellationToken::new();
    let stats = rt.listener().start(test_db.url.clone(), rt.health.clone(), stop.clone());
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("listening").expect("watch");
    let mut activated = rt.listener().subscribe(worker::prebuilds::WAKE_CHANNEL).await;

    // A change that is not an activation says nothing; the activation after it is the first event.
    exec(db, "UPDATE templates SET name = 'renamed' WHERE id = $1", &[(&template_id, Type::UUID)]).await;
    exec(
        db,
        "UPDATE templates SET active_version_id = $1 WHERE id = $2",
        &[(&version, Type::UUID), (&template_id, Type::UUID)],
    )
    .await;
    let event = tokio::time::timeout(LIMIT, activated.recv()).await.expect("in time").expect("listener");
    assert_eq!(event, ListenEvent::Notification(template_id.to_string()));
    stop.cancel();
}

// ---------------------------------------------------------------------------------------------
// The CLI through the real binary; acceptance 6: `plan --json` is what the next cycle does

fn worker_cli(test_db: &TestDb, args: &[&str]) -> Output {
    cli(&test_db.url, args)
}

fn uuid_set(value: &serde_json::Value) -> BTreeSet<Uuid> {
    value
        .as_array()
        .expect("an array")
        .iter()
        .map(|v| v.as_str().expect("a string").parse().expect("uuid"))
        .collect()
}

/// Every kind of work at once: creates, expired and extraneous deletes, an inactive preset's
/// deletes and cancels, a preset in backoff, idle presets.
async fn seed_mixed(db: &Db) {
    let (_, active) = template(db, true).await;
    let (_, old) = template(db, false).await;
    let wants_three = preset(db, active, "wants-three", 3, None).await;
    prebuild(db, wants_three, "succeeded", 5).await;
    let expiring = preset(db, active, "expiring", 1, Some(30)).await;
    prebuild(db, expiring, "succeeded", 45).await;
    let too_many = preset(db, active, "too-many", 1, None).await;
    for age in [10, 20, 30] {
        prebuild(db, too_many, "succeeded", age).await;
    }
    let failing = preset(db, active, "failing", 2, None).await;
    prebuild(db, failing, "failed", 0).await;
    let retired = preset(db, old, "retired", 2, None).await;
    prebuild(db, retired, "succeeded", 5).await;
    prebuild(db, retired, "pending", 1).await;
    for n in 0..5 {
        preset(db, old, &format!("idle{n}"), 1, None).await;
    }
}

#[tokio::test]
async fn plan_json_lists_exactly_what_the_next_cycle_then_does() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    seed_mixed(db).await;
    let jobs_before = uuids(db, "SELECT id FROM provisioner_jobs").await;

    let plan = json(&worker_cli(&test_db, &["prebuilds", "plan", "--json"]));
    assert_eq!(plan["presets_total"], 10);
    assert_eq!(plan["skipped"], 5);
    let mut planned_creates = BTreeMap::new();
    let mut planned_deletes = BTreeSet::new();
    let mut planned_cancels = BTreeSet::new();
    for a in plan["actions"].as_array().expect("actions") {
        let preset: Uuid = a["preset_id"].as_str().expect("id").parse().expect("uuid");
        let create = a["create"].as_i64().expect("create");
        if create > 0 {
            planned_creates.insert(preset, create);
        }
        planned_deletes.extend(uuid_set(&a["delete"]));
        planned_cancels.extend(uuid_set(&a["cancel_jobs"]));
    }
    assert_eq!(
        planned_creates.values().sum::<i64>(),
        2 + 1,
        "wants-three: 2, expiring: 1 (failing backs off)"
    );
    assert_eq!(planned_deletes.len(), 1 + 2 + 1, "expiring: 1, too-many: 2 oldest, retired: 1");
    assert_eq!(planned_cancels.len(), 1);
    assert_eq!(plan["totals"]["create"], 3);

    // Writing nothing: the plan left the database as it was.
    assert_eq!(uuids(db, "SELECT id FROM provisioner_jobs").await, jobs_before);

    let stats = cycle(db, &reconciler(2)).await;
    let rows = db
        .get()
        .await
        .expect("conn")
        .fetch_all(
            "SELECT preset_id, count(*) FROM workspaces WHERE name LIKE 'prebuild-%' GROUP BY preset_id",
            &[],
        )
        .await
        .expect("created");
    let created: BTreeMap<Uuid, i64> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    assert_eq!(created, planned_creates);
    let deleted = uuids(db, "SELECT workspace_id FROM workspace_builds WHERE transition = 'delete'").await;
    assert_eq!(deleted, planned_deletes);
    let canceled = uuids(db, "SELECT id FROM provisioner_jobs WHERE status = 'canceled'").await;
    assert_eq!(canceled, planned_cancels);
    assert_eq!((stats.created, stats.deleted, stats.canceled), (3, 4, 1));

    // Converged: the next plan (the table form) has nothing left to do, and the retired preset
    // (its prebuild deleting, its job canceled) is now idle.
    let table = stdout(&worker_cli(&test_db, &["prebuilds", "plan"]));
    assert_eq!(
        table.trim(),
        "presets: 10 total, 6 skipped (idle), 4 to reconcile; actions: 0 create, 0 delete, 0 cancel"
    );
}

#[tokio::test]
async fn status_json_shows_each_presets_counts_and_backoff() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    seed_mixed(db).await;

    let status = json(&worker_cli(&test_db, &["prebuilds", "status", "--json"]));
    let presets = status["presets"].as_array().expect("presets");
    assert_eq!(presets.len(), 10);
    let by_name = |name: &str| {
        presets.iter().find(|p| p["name"] == name).unwrap_or_else(|| panic!("no preset {name}: {status}"))
    };
    let counts = |name: &str| {
        let p = by_name(name);
        ["desired", "running", "expired", "starting", "pending"].map(|k| p[k].as_i64().expect(k))
    };
    assert_eq!(counts("wants-three"), [3, 1, 0, 0, 0]);
    assert_eq!(counts("expiring"), [1, 0, 1, 0, 0]);
    assert_eq!(counts("too-many"), [1, 3, 0, 0, 0]);
    assert_eq!(counts("retired"), [0, 1, 0, 1, 1], "inactive: the planner's target is 0");
    assert_eq!(by_name("retired")["active"], false);
    assert!(by_name("failing")["backoff_until"].is_string(), "one failure just now: in backoff");
    assert!(by_name("wants-three")["backoff_until"].is_null());

    let table = stdout(&worker_cli(&test_db, &["prebuilds", "status"]));
    assert!(
        table.lines().next().is_some_and(|h| h.starts_with("PRESET") && h.contains("BACKOFF UNTIL")),
        "{table}"
    );
    assert_eq!(table.lines().count(), 11, "a header and a line per preset: {table}");
}

#[tokio::test]
async fn a_cycle_counts_presets_by_condition_in_the_presets_gauge() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    seed_mixed(db).await;
    let metrics = MetricsProbe::new();
    let reconciler = Reconciler::new(config(), 2, &metrics.meter());
    assert!(metrics.gauge_points("prebuilds.presets").await.is_empty(), "nothing before a cycle");

    let stats = cycle(db, &reconciler).await;
    // Deficit: wants-three (1 of 3), expiring (its one prebuild expired), failing (in backoff,
    // none running). Excess: too-many (3 of 1), retired (inactive, one running). Backing off:
    // failing. Expired present: expiring. The idle presets are in no condition.
    let expected = [("deficit", 3.0), ("excess", 2.0), ("backing_off", 1.0), ("expired_present", 1.0)];
    for (condition, n) in expected {
        assert_eq!(
            metrics.gauge_at("prebuilds.presets", &[("condition", condition)]).await,
            Some(n),
            "{condition}: {stats:?}"
        );
    }
    assert_eq!(metrics.gauge_points("prebuilds.presets").await.len(), 4, "one series per condition");

    // The next cycle sees the creates and deletes in progress: no deficit or excess is left but
    // the failing preset's (still in backoff, nothing starting), and nothing expired is running.
    cycle(db, &reconciler).await;
    let expected = [("deficit", 1.0), ("excess", 0.0), ("backing_off", 1.0), ("expired_present", 0.0)];
    for (condition, n) in expected {
        assert_eq!(
            metrics.gauge_at("prebuilds.presets", &[("condition", condition)]).await,
            Some(n),
            "{condition}"
        );
    }
}

/// A second version of `template`, not activated.
async fn other_version(db: &Db, template: Uuid) -> Uuid {
    db.get()
        .await
        .expect("conn")
        .fetch_one(
            "INSERT INTO template_versions (template_id, name) VALUES ($1, 'v2') RETURNING id",
            &[(&template, Type::UUID)],
        )
        .await
        .expect("version")
        .get(0)
}

#[tokio::test]
async fn status_json_shows_the_planners_target_desired_0_for_inactive_presets() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (template_id, active) = template(db, true).await;
    let inactive_version = other_version(db, template_id).await;
    let (deprecated_template, deprecated_version) = template(db, true).await;
    exec(db, "UPDATE templates SET deprecated = true WHERE id = $1", &[(&deprecated_template, Type::UUID)])
        .await;

    let plain = preset(db, active, "plain", 2, None).await;
    let scheduled = preset(db, active, "scheduled", 2, None).await;
    let old_version = preset(db, inactive_version, "old-version", 2, None).await;
    let deprecated = preset(db, deprecated_version, "deprecated", 2, None).await;
    // A schedule matching every minute applies to an active preset only.
    for id in [scheduled, old_version] {
        exec(
            db,
            "INSERT INTO preset_schedules (preset_id, cron_expression, desired_instances) VALUES ($1, '* * * * *', 5)",
            &[(&id, Type::UUID)],
        )
        .await;
    }
    prebuild(db, deprecated, "succeeded", 10).await;

    let status = json(&worker_cli(&test_db, &["prebuilds", "status", "--json"]));
    let desired: BTreeMap<Uuid, (i64, bool)> = status["presets"]
        .as_array()
        .expect("presets")
        .iter()
        .map(|p| {
            let id = p["id"].as_str().expect("id").parse().expect("uuid");
            (id, (p["desired"].as_i64().expect("desired"), p["active"].as_bool().expect("active")))
        })
        .collect();
    assert_eq!(
        desired,
        BTreeMap::from([
            (plain, (2, true)),
            (scheduled, (5, true)),
            (old_version, (0, false)),
            (deprecated, (0, false)),
        ]),
        "{status}"
    );

    // The planner agrees: creates only for the active presets, the deprecated one's prebuild goes.
    let plan = json(&worker_cli(&test_db, &["prebuilds", "plan", "--json"]));
    let creates: BTreeMap<Uuid, i64> = plan["actions"]
        .as_array()
        .expect("actions")
        .iter()
        .map(|a| {
            (a["preset_id"].as_str().expect("id").parse().expect("uuid"), a["create"].as_i64().expect("n"))
        })
        .filter(|&(_, n)| n > 0)
        .collect();
    assert_eq!(creates, BTreeMap::from([(plain, 2), (scheduled, 5)]), "{plan}");
    assert_eq!(plan["totals"]["delete"], 1, "{plan}");
}

#[tokio::test]
async fn invalidate_replaces_every_prebuild_of_the_preset_in_one_cycle_and_a_claimed_workspace_is_untouched()
{
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (template_id, version) = template(db, true).await;
    let invalidated = preset(db, version, "invalidated", 3, None).await;
    let mut old = BTreeSet::new();
    for age in [30, 20, 10] {
        old.insert(prebuild(db, invalidated, "succeeded", age).await.0);
    }
    // A workspace that was a prebuild of the preset and is now a user's (the claim changed the
    // owner; preset_id stays).
    let (claimed, _) = prebuild(db, invalidated, "succeeded", 40).await;
    let user = Uuid::new_v4();
    exec(
        db,
        "UPDATE workspaces SET owner_id = $1 WHERE id = $2",
        &[(&user, Type::UUID), (&claimed, Type::UUID)],
    )
    .await;
    // Another preset of the same version: satisfied, and not invalidated.
    let other = preset(db, version, "other", 1, None).await;
    let (other_prebuild, _) = prebuild(db, other, "succeeded", 30).await;

    let rt = runtime(db.clone(), &opentelemetry::global::meter("test"));
    let stop = CancellationToken::new();
    let stats = rt.listener().start(test_db.url.clone(), rt.health.clone(), stop.clone());
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("listening").expect("watch");
    let mut wake = rt.listener().subscribe(worker::prebuilds::WAKE_CHANNEL).await;

    let reconciler = reconciler(2);
    let before = cycle(db, &reconciler).await;
    assert_eq!((before.created, before.deleted), (0, 0), "converged before the invalidation: {before:?}");

    let id = invalidated.to_string();
    let report = json(&worker_cli(&test_db, &["prebuilds", "invalidate", &id, "--json"]));
    assert_eq!(report["preset_id"], id.as_str(), "{report}");
    assert_eq!(report["preset"], "invalidated", "{report}");
    assert_eq!((report["expired"].as_i64(), report["starting"].as_i64()), (Some(3), Some(0)), "{report}");
    assert!(report["invalidated_at"].is_string(), "{report}");
    // The reconciler's wake channel, with the template id as the activation trigger sends it.
    let event = tokio::time::timeout(LIMIT, wake.recv()).await.expect("woken in time").expect("listener");
    assert_eq!(event, ListenEvent::Notification(template_id.to_string()));

    let status = json(&worker_cli(&test_db, &["prebuilds", "status", "--json"]));
    let row = status["presets"]
        .as_array()
        .expect("presets")
        .iter()
        .find(|p| p["id"] == id.as_str())
        .cloned()
        .expect("the preset");
    assert_eq!((row["running"].as_i64(), row["expired"].as_i64()), (Some(0), Some(3)), "{row}");
    assert_eq!(row["last_invalidated_at"], report["invalidated_at"], "{row}");

    // One cycle: every old prebuild gets a `delete` build with a pending job, and as many
    // replacements are created.
    let stats = cycle(db, &reconciler).await;
    assert_eq!((stats.deleted, stats.created, stats.claimed, stats.failed), (3, 3, 0, 0), "{stats:?}");
    let deleted = uuids(
        db,
        "SELECT b.workspace_id FROM workspace_builds AS b JOIN provisioner_jobs AS j ON j.id = b.job_id \
         WHERE b.transition = 'delete' AND b.build_number = 2 AND j.status = 'pending'",
    )
    .await;
    assert_eq!(deleted, old);
    let replacements = count(
        db,
        "SELECT count(*) FROM workspaces AS w JOIN workspace_builds AS b ON b.workspace_id = w.id \
         WHERE w.preset_id = $1 AND w.owner_id = $2 AND w.name LIKE 'prebuild-%' \
           AND b.transition = 'start' AND b.build_number = 1",
        &[(&invalidated, Type::UUID), (&SYSTEM, Type::UUID)],
    )
    .await;
    assert_eq!(replacements, 3);

    // The claimed workspace: still the user's, no new build; the other preset: untouched.
    let builds = |workspace: Uuid| async move {
        count(
            db,
            "SELECT count(*) FROM workspace_builds WHERE workspace_id = $1",
            &[(&workspace, Type::UUID)],
        )
        .await
    };
    assert_eq!(builds(claimed).await, 1, "no build for the claimed workspace");
    assert_eq!(builds(other_prebuild).await, 1, "no build for another preset's prebuild");
    let owner = count(
        db,
        "SELECT count(*) FROM workspaces WHERE id = $1 AND owner_id = $2 AND NOT deleted",
        &[(&claimed, Type::UUID), (&user, Type::UUID)],
    )
    .await;
    assert_eq!(owner, 1, "the claimed workspace is still the user's");

    // The replacements postdate the invalidation: once running they are live, not expired, and
    // the preset is converged.
    exec(
        db,
        "UPDATE provisioner_jobs AS j SET status = 'succeeded', completed_at = now() \
         FROM workspace_builds AS b JOIN workspaces AS w ON w.id = b.workspace_id \
         WHERE b.job_id = j.id AND w.preset_id = $1 AND w.name LIKE 'prebuild-%'",
        &[(&invalidated, Type::UUID)],
    )
    .await;
    let after = cycle(db, &reconciler).await;
    assert_eq!((after.created, after.deleted), (0, 0), "{after:?}");
    stop.cancel();
}

#[tokio::test]
async fn invalidate_counts_starting_prebuilds_and_names_a_malformed_or_unknown_preset() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (_, version) = template(db, true).await;
    let id = preset(db, version, "starting", 2, None).await;
    prebuild(db, id, "succeeded", 20).await;
    prebuild(db, id, "pending", 10).await;

    let text = stdout(&worker_cli(&test_db, &["prebuilds", "invalidate", &id.to_string()]));
    assert!(text.starts_with(&format!("preset {id} (starting) invalidated at ")), "{text}");
    assert!(text.contains("1 running prebuild(s) expired") && text.contains("1 still starting"), "{text}");
    // The starting one counts towards the target while it starts: one delete, one create.
    let stats = cycle(db, &reconciler(1)).await;
    assert_eq!((stats.deleted, stats.created), (1, 1), "{stats:?}");

    let failing = |args: &[&str]| {
        let output = worker_cli(&test_db, args);
        assert_eq!(output.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&output.stdout));
        String::from_utf8(output.stderr).expect("utf-8")
    };
    let error = failing(&["prebuilds", "invalidate", "not-a-uuid"]);
    assert!(error.contains("`not-a-uuid`"), "{error}");
    let unknown = Uuid::new_v4();
    let error = failing(&["prebuilds", "invalidate", &unknown.to_string(), "--json"]);
    assert!(error.contains(&format!("preset {unknown} does not exist")), "{error}");
}
