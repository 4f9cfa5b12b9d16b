//! The outbox sweeper against real PostgreSQL and Redis: the happy path at 10,000 rows,
//! per-row settlement with dead letters, outages and hangs, concurrent sweepers, locks, the
//! payload bound and the byte budget of a batch, and the producer SQL functions. Time moves by updating rows; ticks are driven directly.

mod common;
mod outbox_support;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::metrics::MetricsProbe;
use fred::prelude::{ClientLike, KeysInterface, SortedSetsInterface};
use outbox_support::redis_server::{self, RedisServer};
use outbox_support::{Harness, connected};
use tokio_postgres::types::Type;
use worker::db::{self, Db, Exec};
use worker::health::Health;
use worker::outbox::sweeper::{BATCHES_PER_TICK, DrainShape};
use worker::outbox::{SweepError, Sweeper};
use worker::runtime::RuntimeConfig;
use worker::runtime::{Loop, Outcome, Progress, Runtime, Tick};

/// Generous bound for conditions that should hold in well under a second; reaching it fails.
const LIMIT: Duration = Duration::from_secs(20);

/// Ticks `sweeper` until a tick reports `Done`; returns the number of ticks.
async fn drain(sweeper: &Sweeper, db: &Db) -> usize {
    let tick = Tick::detached(db);
    for ticks in 1..=10_000 {
        match sweeper.tick(&tick).await.expect("tick") {
            Progress::More => continue,
            Progress::Done => return ticks,
        }
    }
    panic!("the outbox never drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ten_thousand_tasks_over_several_queues_all_land_in_redis() {
    let mut h = Harness::new().await;
    // 200 batches: one tick of BATCHES_PER_TICK full ones, then one that drains the rest.
    h.config.outbox.batch_size = 50;
    let metrics = MetricsProbe::new();
    let sweeper = h.sweeper(&metrics.meter());
    let queues = ["emails", "builds", "webhooks", "reports"];
    h.enqueue(10_000, &queues, None).await;
    let expected = h.expected().await;
    assert_eq!(expected.values().map(|q| q.len()).sum::<usize>(), 10_000);

    let ticks = drain(&sweeper, h.db()).await;
    assert_eq!(
        ticks,
        10_000 / 50 / BATCHES_PER_TICK + 1,
        "full ticks of full batches drain back to back, then a tick that ends short"
    );

    for queue in queues {
        let in_redis = h.scheduled(queue).await;
        assert_eq!(in_redis.len(), 2_500, "queue {queue}");
        assert!(
            in_redis == expected[queue],
            "queue {queue}: sorted set (score = run_at ms) and payloads match the rows"
        );
    }
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0, "the outbox is empty");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_eq!(metrics.counter("outbox.sweep.rows", &[("outcome", "dispatched")]).await, 10_000);
    assert_eq!(metrics.counter("outbox.sweep.rows", &[("outcome", "retried")]).await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_type_key_fails_only_its_queue_until_dead_lettered_and_requeue_brings_it_back() {
    let mut h = Harness::new().await;
    h.config.outbox.max_attempts = 4;
    let metrics = MetricsProbe::new();
    let sweeper = h.sweeper(&metrics.meter());
    let bad_key = worker::redis::key(h.prefix(), "sched", "bad");
    let _: () = h.redis.set(&bad_key, "not a sorted set", None, None, false).await.expect("set");
    h.enqueue(90, &["good", "bad", "other"], None).await;
    // The producers traced (enqueue_task's traceparent): a dead letter keeps it, a requeue
    // carries it back.
    let traced = "'00-' || md5(task_id) || '-' || substr(md5('s' || task_id), 1, 16) || '-01'";
    h.exec(&format!("UPDATE task_outbox SET traceparent = {traced}")).await;

    let first = sweeper.sweep().await.expect("sweep");
    assert_eq!(first.claimed, 90);
    assert_eq!(first.dispatched.len(), 60, "the other queues are dispatched in the same tick");
    assert_eq!(first.retried, 30);
    assert_eq!(h.scheduled("good").await.len(), 30);
    assert_eq!(h.scheduled("other").await.len(), 30);
    let rows = h
        .db()
        .get()
        .await
        .expect("conn")
        .fetch_all(
            "SELECT queue, attempts, last_error, extract(epoch FROM run_at - now())::float8 FROM task_outbox",
            &[],
        )
        .await
        .expect("rows");
    assert_eq!(rows.len(), 30);
    for r in &rows {
        assert_eq!(r.get::<_, String>(0), "bad");
        assert_eq!(r.get::<_, i32>(1), 1);
        let error: String = r.get(2);
        assert!(error.contains("WRONGTYPE") && error.contains(&bad_key), "{error}");
        let wait: f64 = r.get(3);
        assert!((0.7..=1.3).contains(&wait), "first retry after backoff_base (1s) ± jitter, got {wait}s");
    }

    // Move time instead of waiting for the backoff; each tick costs one attempt.
    for attempt in 2..=4 {
        h.exec("UPDATE task_outbox SET run_at = now()").await;
        let report = sweeper.sweep().await.expect("sweep");
        let (retried, dead) = if attempt < 4 { (30, 0) } else { (0, 30) };
        assert_eq!((report.retried, report.dead_lettered), (retried, dead), "tick {attempt}");
    }
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
    let dead = h
        .db()
        .get()
        .await
        .expect("conn")
        .fetch_all("SELECT attempts, last_error, queue FROM task_outbox_dead", &[])
        .await
        .expect("dead rows");
    assert_eq!(dead.len(), 30);
    for r in &dead {
        assert_eq!(r.get::<_, i32>(0), 4, "attempts = max_attempts");
        assert!(r.get::<_, String>(1).contains("WRONGTYPE"));
        assert_eq!(r.get::<_, String>(2), "bad");
    }
    assert_eq!(
        h.scalar(&format!("SELECT count(*) FROM task_outbox_dead WHERE traceparent = {traced}")).await,
        30
    );
    assert_eq!(metrics.counter("outbox.sweep.rows", &[("outcome", "dead_lettered")]).await, 30);
    assert_eq!(metrics.counter("outbox.sweep.rows", &[("outcome", "retried")]).await, 90);
    assert_eq!(metrics.counter("outbox.sweep.rows", &[("outcome", "dispatched")]).await, 60);

    let report = worker::outbox::dead::requeue(
        &h.db().get().await.expect("conn"),
        &worker::outbox::dead::Selection::All,
    )
    .await
    .expect("requeue");
    assert_eq!((report.removed, report.requeued), (30, 30));
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox WHERE attempts = 0 AND run_at <= now()").await, 30);
    assert_eq!(h.scalar(&format!("SELECT count(*) FROM task_outbox WHERE traceparent = {traced}")).await, 30);
    let _: i64 = h.redis.del(&bad_key).await.expect("del");
    assert_eq!(sweeper.sweep().await.expect("sweep").dispatched.len(), 30);
    assert_eq!(h.scheduled("bad").await.len(), 30);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
}

/// Attempts, errors and due times of every row, to compare before and after.
#[tokio::test]
async fn a_task_whose_payload_was_refused_is_never_scheduled() {
    let h = Harness::new().await;
    let sweeper = h.sweeper(&MetricsProbe::new().meter());
    let bad_payload_key = worker::redis::key(h.prefix(), "payload", "bad");
    let _: () = h.redis.set(&bad_payload_key, "not a hash", None, None, false).await.expect("set");
    h.enqueue(6, &["good", "bad"], None).await;

    let report = sweeper.sweep().await.expect("sweep");
    assert_eq!((report.dispatched.len(), report.retried), (3, 3));
    assert_eq!(h.scheduled("good").await.len(), 3);
    // A pipeline runs every command whatever the previous one answered: without the two-phase
    // send these three would sit in the sorted set with no payload for a consumer to read.
    let scheduled: i64 = h.redis.zcard(worker::redis::key(h.prefix(), "sched", "bad")).await.expect("zcard");
    assert_eq!(scheduled, 0, "tasks scheduled without their payload");
}

async fn row_states(db: &Db) -> Vec<(i64, i32, Option<String>, String)> {
    let rows = db
        .get()
        .await
        .expect("conn")
        .fetch_all("SELECT id, attempts, last_error, run_at::text FROM task_outbox ORDER BY id", &[])
        .await
        .expect("rows");
    rows.iter().map(|r| (r.get(0), r.get(1), r.get(2), r.get(3))).collect()
}

/// Ticks until one succeeds with nothing left in the outbox.
async fn drain_when_back(h: &Harness, sweeper: &Sweeper) {
    let deadline = Instant::now() + LIMIT;
    loop {
        if let Ok(Progress::Done) = sweeper.tick(&Tick::detached(h.db())).await
            && h.scalar("SELECT count(*) FROM task_outbox").await == 0
        {
            return;
        }
        assert!(Instant::now() < deadline, "the outbox did not drain after Redis came back");
    }
}

/// Three ticks against a Redis that is not there: each fails within the sub-deadline and
/// changes nothing.
async fn ticks_fail_without_consuming_attempts(h: &Harness, sweeper: &Sweeper) {
    let before = row_states(h.db()).await;
    assert!(!before.is_empty());
    for _ in 0..3 {
        let started = Instant::now();
        let error = sweeper.tick(&Tick::detached(h.db())).await.expect_err("no redis: the tick fails");
        assert!(matches!(error, SweepError::Redis(_)), "{error}");
        assert!(started.elapsed() < Duration::from_secs(3), "bounded by the sub-deadline");
    }
    assert_eq!(row_states(h.db()).await, before, "no row's attempts, error or due time changed");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox_dead").await, 0, "nothing dead-lettered");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unreachable_redis_consumes_no_attempts_and_everything_drains_when_it_returns() {
    let mut h = Harness::new().await;
    let port = redis_server::free_port();
    h.config.redis.url = redis_server::url_for(port);
    h.config.outbox.redis_timeout = Duration::from_millis(300);
    h.config.outbox.max_attempts = 1; // one counted failure would dead-letter at once
    // Nothing listens on the port yet: the worker starts during an outage.
    h.redis = worker::redis::connect(&h.config.redis).expect("client");
    let sweeper = h.sweeper(&MetricsProbe::new().meter());
    h.enqueue(50, &["a", "b"], None).await;
    ticks_fail_without_consuming_attempts(&h, &sweeper).await;

    let server = RedisServer::start_on(port).await;
    common::eventually(LIMIT, "the sweeper's client to reconnect", || async { h.redis.is_connected() }).await;
    // Nothing was queued while disconnected, so nothing is replayed now that Redis is back.
    let fresh = connected(&h.config.redis).await;
    let stats: String =
        fresh.custom(fred::cmd!("INFO"), vec!["commandstats"]).await.expect("INFO commandstats");
    assert!(!stats.contains("cmdstat_hset") && !stats.contains("cmdstat_zadd"), "replayed writes: {stats}");
    drain_when_back(&h, &sweeper).await;
    assert_eq!(h.scheduled("a").await.len() + h.scheduled("b").await.len(), 50);

    // And once more after a connection that worked was lost.
    drop(server);
    h.exec("SELECT count(enqueue_task('late' || g, 'a', '{}')) FROM generate_series(1, 20) g").await;
    ticks_fail_without_consuming_attempts(&h, &sweeper).await;
    let _server = RedisServer::start_on(port).await;
    drain_when_back(&h, &sweeper).await;
    assert_eq!(h.scheduled("a").await.len(), 20, "the new server holds what was sent after it started");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox_dead").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_redis_is_bounded_by_the_sub_deadline_and_the_rows_are_released_unchanged() {
    let mut h = Harness::new().await;
    let server = RedisServer::start_on(redis_server::free_port()).await;
    h.config.redis.url = server.url();
    h.config.outbox.redis_timeout = Duration::from_millis(500);
    h.config.outbox.base.tick_timeout = Duration::from_secs(10);
    h.redis = connected(&h.config.redis).await;
    h.enqueue(20, &["q"], None).await;
    let before = row_states(h.db()).await;
    let runtime = Runtime::new(
        h.db().clone(),
        Health::default(),
        &MetricsProbe::new().meter(),
        RuntimeConfig { jitter: 0.0, ..RuntimeConfig::default() },
    );
    let mut runner = runtime.runner(h.sweeper(&MetricsProbe::new().meter()));

    server.freeze();
    let started = Instant::now();
    let report = runner.tick_once().await;
    let elapsed = started.elapsed();
    server.thaw();
    assert_eq!(report.outcome, Outcome::Error, "the sub-deadline ends the tick, not the tick timeout");
    assert!(elapsed >= Duration::from_millis(500) && elapsed < Duration::from_secs(3), "took {elapsed:?}");
    assert_eq!(row_states(h.db()).await, before, "no attempt consumed for an unknown outcome");
    // The rows are not left locked: another transaction can lock every one of them at once.
    {
        let mut conn = h.db().get().await.expect("conn");
        let tx = db::begin(
            &mut conn,
            db::TxLimits { statement: Duration::from_secs(5), idle: Duration::from_secs(5) },
        )
        .await
        .expect("begin");
        let locked = tx
            .fetch_all("SELECT id FROM task_outbox FOR UPDATE NOWAIT", &[])
            .await
            .expect("no row is locked");
        assert_eq!(locked.len(), 20);
    }

    // The hung pipeline may still run when Redis wakes up; the re-send is idempotent.
    let report = runner.tick_once().await;
    assert_eq!(report.outcome, Outcome::Ok);
    assert_eq!(h.scheduled("q").await.len(), 20);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_redis_timeout_halves_the_batch_and_success_grows_it_back() {
    let mut h = Harness::new().await;
    let server = RedisServer::start_on(redis_server::free_port()).await;
    h.config.redis.url = server.url();
    h.config.outbox.redis_timeout = Duration::from_millis(300);
    h.config.outbox.batch_size = 8;
    h.redis = connected(&h.config.redis).await;
    h.enqueue(20, &["q"], None).await;
    let sweeper = h.sweeper(&MetricsProbe::new().meter());

    server.freeze();
    for expected in [4, 2] {
        let error = sweeper.sweep().await.expect_err("redis is frozen");
        assert!(error.to_string().contains("did not answer"), "{error}");
        assert_eq!(sweeper.batch_limit(), expected, "a batch too slow to send shrinks");
    }
    server.thaw();
    let report = sweeper.sweep().await.expect("sweep");
    assert_eq!(report.claimed, 2, "the next sweep claims the smaller batch");
    assert_eq!(sweeper.batch_limit(), 4, "and each success doubles it back");
    assert_eq!(sweeper.sweep().await.expect("sweep").claimed, 4);
    assert_eq!(sweeper.batch_limit(), 8);
    drain(&sweeper, h.db()).await;
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_sweepers_dispatch_twenty_thousand_tasks_each_exactly_once() {
    let h = Harness::new().await;
    h.enqueue(20_000, &["a", "b", "c"], None).await;
    let barrier = std::sync::Arc::new(tokio::sync::Barrier::new(3));
    let mut tasks = Vec::new();
    for _ in 0..3 {
        let redis = connected(&h.config.redis).await;
        let sweeper = Sweeper::new(
            h.test_db.another_pool(),
            redis,
            h.prefix(),
            h.config.outbox.clone(),
            &MetricsProbe::new().meter(),
        );
        let barrier = barrier.clone();
        tasks.push(tokio::spawn(async move {
            barrier.wait().await;
            let mut mine = Vec::new();
            loop {
                let report = sweeper.sweep().await.expect("sweep");
                if report.claimed == 0 {
                    return mine;
                }
                assert_eq!(report.dispatched.len(), report.claimed);
                mine.extend(report.dispatched);
            }
        }));
    }
    let mut all = HashSet::new();
    let mut total = 0;
    let mut per_sweeper = Vec::new();
    for task in tasks {
        let mine = task.await.expect("sweeper task");
        total += mine.len();
        per_sweeper.push(mine.len());
        all.extend(mine);
    }
    assert_eq!(total, 20_000, "total dispatched");
    assert_eq!(all.len(), 20_000, "no task dispatched by two sweepers");
    assert!(
        per_sweeper.iter().filter(|n| **n > 0).count() >= 2,
        "sweepers ran side by side: {per_sweeper:?}"
    );
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
    let mut in_redis = 0;
    for q in ["a", "b", "c"] {
        in_redis += h.scheduled(q).await.len();
    }
    assert_eq!(in_redis, 20_000);
}

#[tokio::test]
async fn a_row_locked_by_another_transaction_is_skipped_not_waited_for() {
    let h = Harness::new().await;
    let sweeper = h.sweeper(&MetricsProbe::new().meter());
    h.enqueue(5, &["q"], None).await;
    let mut conn = h.test_db.another_pool().get().await.expect("conn");
    let tx = db::begin(
        &mut conn,
        db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) },
    )
    .await
    .expect("begin");
    tx.fetch_one("SELECT id FROM task_outbox WHERE task_id = 't3' FOR UPDATE", &[]).await.expect("lock t3");

    let report = tokio::time::timeout(Duration::from_secs(5), sweeper.sweep())
        .await
        .expect("not blocked")
        .expect("sweep");
    assert_eq!((report.claimed, report.dispatched.len()), (4, 4));
    let scheduled = h.scheduled("q").await;
    assert!(!scheduled.contains_key("t3") && scheduled.len() == 4);
    assert_eq!(h.scalar("SELECT attempts::int8 FROM task_outbox WHERE task_id = 't3'").await, 0);

    tx.commit().await.expect("release");
    assert_eq!(sweeper.sweep().await.expect("sweep").dispatched.len(), 1);
    assert!(h.scheduled("q").await.contains_key("t3"));
}

#[tokio::test]
async fn a_tick_of_full_batches_asks_for_another_at_once_and_a_short_one_does_not() {
    let mut h = Harness::new().await;
    h.config.outbox.batch_size = 10;
    let sweeper = h.sweeper(&MetricsProbe::new().meter());
    let rows = 10 * BATCHES_PER_TICK as i64 + 1;
    h.enqueue(rows, &["q"], None).await;
    assert_eq!(sweeper.tick(&Tick::detached(h.db())).await.expect("tick"), Progress::More);
    assert_eq!(h.scheduled("q").await.len(), 10 * BATCHES_PER_TICK, "one tick, its batches all full");
    assert_eq!(sweeper.tick(&Tick::detached(h.db())).await.expect("tick"), Progress::Done);
    assert_eq!(h.scheduled("q").await.len() as i64, rows);
}

#[tokio::test]
async fn rows_that_are_not_due_yet_stay_in_the_outbox() {
    let h = Harness::new().await;
    let sweeper = h.sweeper(&MetricsProbe::new().meter());
    h.exec("SELECT enqueue_task('later', 'q', '{}', now() + interval '1 hour')").await;
    h.exec("SELECT enqueue_task('now', 'q', '{}')").await;
    let report = sweeper.sweep().await.expect("sweep");
    assert_eq!(report.claimed, 1);
    assert!(h.scheduled("q").await.contains_key("now"));
    h.exec("UPDATE task_outbox SET run_at = now() - interval '1 ms' WHERE task_id = 'later'").await;
    assert_eq!(sweeper.sweep().await.expect("sweep").claimed, 1);
    assert_eq!(h.scheduled("q").await.len(), 2);
}

#[tokio::test]
async fn the_probe_reports_backlog_oldest_due_age_and_dead_letters() {
    let mut h = Harness::new().await;
    h.config.outbox.batch_size = 2;
    let metrics = MetricsProbe::new();
    let sweeper = h.sweeper(&metrics.meter());
    h.enqueue(5, &["q"], None).await;
    h.exec("UPDATE task_outbox SET created_at = now() - interval '90 seconds' WHERE task_id = 't1'").await;
    h.exec(
        "INSERT INTO task_outbox_dead (original_id, task_id, queue, payload, run_at, attempts, created_at) \
         VALUES (1, 'x', 'q', '{}', now(), 10, now()), (2, 'y', 'q', '{}', now(), 10, now())",
    )
    .await;
    assert_eq!(metrics.gauge("outbox.backlog.due").await, None, "nothing observed before the first probe");

    sweeper.tick(&Tick::detached(h.db())).await.expect("tick"); // probes first, then sweeps 2 rows
    assert_eq!(metrics.gauge("outbox.backlog.due").await, Some(5.0));
    let age = metrics.gauge("outbox.backlog.oldest_due_age").await.expect("age observed");
    assert!((89.0..120.0).contains(&age), "oldest due age from created_at: {age}");
    assert_eq!(metrics.gauge("outbox.dead_letters").await, Some(2.0));

    // Within probe_interval (15s) the gauges are not refreshed: no query per tick.
    sweeper.tick(&Tick::detached(h.db())).await.expect("tick");
    assert_eq!(metrics.gauge("outbox.backlog.due").await, Some(5.0));
}

/// A probe that fails (here its statement times out behind a lock on the dead letters; in
/// production, a backlog of millions of rows) costs the gauges, not the drain: the tick sweeps
/// every due row, and the gauges are absent rather than stuck at the last figure.
#[tokio::test]
async fn a_failed_probe_leaves_the_backlog_gauges_absent_and_the_tick_still_drains() {
    let mut h = Harness::new().await;
    h.config.outbox.probe_interval = Duration::from_millis(1); // probe on every tick
    let mut database = h.test_db.database_config();
    database.statement_timeout = Duration::from_millis(300);
    let db = Db::new(&database).expect("pool");
    let metrics = MetricsProbe::new();
    let sweeper =
        Sweeper::new(db.clone(), h.redis.clone(), h.prefix(), h.config.outbox.clone(), &metrics.meter());
    h.enqueue(3, &["q"], None).await;
    sweeper.tick(&Tick::detached(&db)).await.expect("tick");
    assert_eq!(metrics.gauge("outbox.backlog.due").await, Some(3.0));

    h.exec("SELECT count(enqueue_task('late' || g, 'q', '{}')) FROM generate_series(1, 4) g").await;
    let mut blocker = h.db().get().await.expect("conn");
    let tx = blocker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE task_outbox_dead IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    sweeper.tick(&Tick::detached(&db)).await.expect("the tick drains though its probe failed");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0, "every due row swept");
    assert_eq!(metrics.gauge("outbox.backlog.due").await, None, "absent, not the stale 3");
    assert_eq!(metrics.gauge("outbox.dead_letters").await, None);
    tx.rollback().await.expect("unlock");

    sweeper.tick(&Tick::detached(&db)).await.expect("tick");
    assert_eq!(metrics.gauge("outbox.backlog.due").await, Some(0.0), "back once a probe succeeds");
}

#[tokio::test]
async fn enqueue_task_is_idempotent_on_task_id() {
    let h = Harness::new().await;
    let first = h.scalar("SELECT enqueue_task('same', 'q', '{\"v\": 1}')").await;
    let second = h.scalar("SELECT enqueue_task('same', 'other', '{\"v\": 2}')").await;
    assert_eq!(first, second, "the second call returns the first row's id");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 1);
    assert_eq!(h.scalar("SELECT (payload->>'v')::int8 FROM task_outbox WHERE queue = 'q'").await, 1);
}

#[tokio::test]
async fn cancel_job_removes_that_jobs_rows_atomically_and_leaves_other_jobs_alone() {
    let h = Harness::new().await;
    h.exec("INSERT INTO jobs (id, status) VALUES ('j1', 'running'), ('j2', 'running'), ('j3', 'pending')")
        .await;
    for (job, n) in [("j1", 3), ("j2", 4), ("j3", 2)] {
        let sql = format!(
            "SELECT count(enqueue_task('{job}-' || g, 'q', '{{}}', now(), '{job}')) FROM generate_series(1, {n}) g"
        );
        h.exec(&sql).await;
    }
    h.exec("SELECT enqueue_task('jobless', 'q', '{}')").await;

    assert_eq!(h.scalar("SELECT cancel_job('j1')").await, 3);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox WHERE job_id = 'j1'").await, 0);
    assert_eq!(h.scalar("SELECT count(*) FROM jobs WHERE id = 'j1' AND status = 'canceled'").await, 1);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox WHERE job_id = 'j2'").await, 4);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox WHERE job_id IS NULL").await, 1);
    assert_eq!(h.scalar("SELECT count(*) FROM jobs WHERE id = 'j2' AND status = 'running'").await, 1);

    // All or nothing: when the delete cannot complete (a row is locked and the lock wait times
    // out), the status change is rolled back with it.
    let mut holder = h.test_db.another_pool().get().await.expect("conn");
    let hold = db::begin(
        &mut holder,
        db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) },
    )
    .await
    .expect("begin");
    hold.fetch_one("SELECT id FROM task_outbox WHERE task_id = 'j3-1' FOR UPDATE", &[]).await.expect("lock");
    let mut conn = h.db().get().await.expect("conn");
    let tx = db::begin(
        &mut conn,
        db::TxLimits { statement: Duration::from_secs(5), idle: Duration::from_secs(5) },
    )
    .await
    .expect("begin");
    tx.batch_execute("SET LOCAL lock_timeout = '200ms'").await.expect("lock timeout");
    let error =
        tx.fetch_one("SELECT cancel_job($1)", &[(&"j3", Type::TEXT)]).await.expect_err("lock timeout");
    assert_eq!(error.code(), Some("55P03"), "{error}");
    drop(tx);
    drop(hold);
    assert_eq!(h.scalar("SELECT count(*) FROM jobs WHERE id = 'j3' AND status = 'pending'").await, 1);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox WHERE job_id = 'j3'").await, 2);
    assert_eq!(h.scalar("SELECT cancel_job('j3')").await, 2);
    assert_eq!(h.scalar("SELECT count(*) FROM jobs WHERE id = 'j3' AND status = 'canceled'").await, 1);
}

#[tokio::test]
async fn dead_letter_columns_have_exactly_the_outbox_column_types() {
    let h = Harness::new().await;
    let columns = |table: &'static str| {
        let db = h.db().clone();
        async move {
            let rows = db
                .get()
                .await
                .expect("conn")
                .fetch_all(
                    "SELECT column_name::text, data_type::text, udt_name::text FROM information_schema.columns \
                     WHERE table_schema = 'public' AND table_name = $1 ORDER BY ordinal_position",
                    &[(&table, Type::TEXT)],
                )
                .await
                .expect("columns");
            rows.iter()
                .map(|r| (r.get::<_, String>(0), (r.get::<_, String>(1), r.get::<_, String>(2))))
                .collect::<Vec<_>>()
        }
    };
    let outbox = columns("task_outbox").await;
    let dead: std::collections::BTreeMap<_, _> = columns("task_outbox_dead").await.into_iter().collect();
    assert_eq!(outbox.len(), 10, "{outbox:?}");
    for (name, ty) in &outbox {
        assert_eq!(dead.get(name), Some(ty), "task_outbox_dead.{name} has the type of task_outbox.{name}");
    }
    assert_eq!(dead.get("original_id").map(|t| t.1.as_str()), Some("int8"));
    assert_eq!(dead.get("dead_lettered_at").map(|t| t.1.as_str()), Some("timestamptz"));
    assert_eq!(dead.len(), outbox.len() + 2, "only original_id and dead_lettered_at are added");
}

#[tokio::test]
async fn the_claim_is_an_index_range_scan_in_run_at_id_order() {
    let h = Harness::new().await;
    h.enqueue(20_000, &["q"], None).await;
    h.exec("ANALYZE task_outbox").await;
    let budget = 16i64 << 20;
    let plan: Vec<String> = h
        .db()
        .get()
        .await
        .expect("conn")
        .fetch_all(
            &format!("EXPLAIN {}", worker::outbox::sweeper::CLAIM),
            &[(&500i64, Type::INT8), (&budget, Type::INT8)],
        )
        .await
        .expect("explain")
        .iter()
        .map(|r| r.get(0))
        .collect();
    // The locking scan and what is under it: the lines after `LockRows` indented deeper. The
    // byte budget's window sorts the (at most 500) locked rows above it, never the due rows.
    let indent = |line: &str| line.len() - line.trim_start().len();
    let lock = plan.iter().position(|l| l.contains("LockRows")).unwrap_or_else(|| panic!("{plan:#?}"));
    let locking: Vec<&String> =
        plan[lock + 1..].iter().take_while(|l| indent(l) > indent(&plan[lock])).collect();
    let text = plan.join("\n");
    assert!(locking.iter().any(|l| l.contains("Index Scan using task_outbox_run_at_id_idx")), "{text}");
    assert!(!locking.iter().any(|l| l.contains("Sort")), "no sort over the due rows: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_wakes_a_running_sweeper_through_notify_long_before_its_interval() {
    let mut h = Harness::new().await;
    h.config.outbox.base.interval = Duration::from_secs(3600);
    let metrics = MetricsProbe::new();
    let runtime = Runtime::new(
        h.db().clone(),
        Health::default(),
        &metrics.meter(),
        RuntimeConfig { jitter: 0.0, ..RuntimeConfig::default() },
    );
    let shutdown = tokio_util::sync::CancellationToken::new();
    runtime.spawn(h.sweeper(&metrics.meter()));
    let stats = runtime.listener().start(h.test_db.url.clone(), runtime.health.clone(), shutdown.clone());
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("listening").expect("watch");
    // The first tick (at start) and the wake-on-connect tick find nothing; after them the next
    // tick is an hour away unless the NOTIFY wakes the loop.
    let ticks = |health: &Health| health.readiness(Ok(())).loops.iter().map(|l| l.ticks).sum::<u64>();
    common::eventually(LIMIT, "the start and wake-on-connect ticks", || {
        let health = runtime.health.clone();
        async move { ticks(&health) >= 2 }
    })
    .await;
    let mut received = stats.received.clone();
    let seen = *received.borrow();

    h.exec("SELECT enqueue_task('woken', 'q', '{}')").await;
    tokio::time::timeout(LIMIT, received.wait_for(|n| *n > seen)).await.expect("notified").expect("watch");
    let key = worker::redis::key(h.prefix(), "sched", "q");
    let started = Instant::now();
    common::eventually(LIMIT, "the task in its sorted set", || {
        let redis = h.redis.clone();
        let key = key.clone();
        async move { redis.zscore::<Option<f64>, _, _>(key, "woken").await.ok().flatten().is_some() }
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5));
    // The task is in Redis before its tick commits and records itself: wait for the record.
    common::eventually(LIMIT, "the woken tick to be recorded", || {
        let health = runtime.health.clone();
        async move { ticks(&health) >= 3 }
    })
    .await;
    assert_eq!(ticks(&runtime.health), 3, "exactly one tick, woken by the NOTIFY");
    shutdown.cancel();
    runtime.begin_shutdown();
    runtime.drained().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_finite_run_at_is_refused_by_name_and_v6_settles_rows_that_have_one() {
    let h = Harness::new().await;
    let conn = h.db().get().await.expect("conn");
    for when in ["-infinity", "infinity"] {
        let error = conn
            .exec(&format!("SELECT enqueue_task('t-{when}', 'q', '{{}}', '{when}')"), &[])
            .await
            .expect_err("a non-finite run_at is refused");
        let message = error.server_message().unwrap_or_default().to_owned();
        assert!(message.contains("run_at must be a finite time") && message.contains(when), "{message}");
    }
    let direct = conn
        .exec(
            "INSERT INTO task_outbox (task_id, queue, payload, run_at) VALUES ('d', 'q', '{}', '-infinity')",
            &[],
        )
        .await
        .expect_err("the table refuses one too");
    assert!(direct.to_string().contains("task_outbox_run_at_finite"), "{direct}");

    // Rows written before V6 (the constraint dropped to let them in), then V6's own SQL again.
    conn.batch_execute("ALTER TABLE task_outbox DROP CONSTRAINT task_outbox_run_at_finite")
        .await
        .expect("drop");
    h.exec(
        "INSERT INTO task_outbox (task_id, queue, payload, run_at) VALUES \
         ('past', 'q', '{}', '-infinity'), ('never', 'q', '{}', 'infinity'), ('ok', 'q', '{}', now())",
    )
    .await;
    let v6 = std::fs::read_to_string(common::process::repo_path("migrations/V6__outbox_finite_run_at.sql"))
        .expect("V6");
    conn.batch_execute(&v6).await.expect("V6 applies to rows that predate it");
    assert_eq!(
        h.scalar("SELECT count(*)::int8 FROM task_outbox WHERE isfinite(run_at)").await,
        2,
        "past, ok"
    );
    assert_eq!(
        h.scalar("SELECT count(*)::int8 FROM task_outbox WHERE task_id = 'past' AND run_at <= now()").await,
        1
    );
    assert_eq!(
        h.scalar("SELECT count(*)::int8 FROM task_outbox_dead WHERE task_id = 'never' AND last_error LIKE '%infinity%'")
            .await,
        1,
        "the never-due task is dead-lettered with the reason, not lost"
    );
}

#[tokio::test]
async fn a_payload_over_max_payload_bytes_is_refused_at_enqueue_task_with_its_size() {
    let mut h = Harness::new().await;
    let conn = h.db().get().await.expect("conn");
    // Before any worker wrote its setting, the migration's default (1 MiB) holds.
    let error = conn
        .exec(
            "SELECT enqueue_task('two-mib', 'q', jsonb_build_object('pad', repeat('x', 2 * 1024 * 1024)))",
            &[],
        )
        .await
        .expect_err("a 2 MiB payload is refused");
    assert_eq!(error.code(), Some("54000"), "{error}");
    let message = error.server_message().unwrap_or_default().to_owned();
    assert!(
        message.contains("enqueue_task(two-mib)")
            && message.contains("payload is 2097163 bytes")
            && message.contains("limit of 1048576 bytes"),
        "{message}"
    );
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0, "nothing enqueued");
    h.exec("SELECT enqueue_task('900-kib', 'q', jsonb_build_object('pad', repeat('x', 921600 - 11)))").await;
    assert_eq!(h.scalar("SELECT octet_length(payload::text)::int8 FROM task_outbox").await, 921_600);

    // The worker's own setting reaches the database on the loop's first tick.
    h.config.outbox.max_payload_bytes = 4096;
    let metrics = MetricsProbe::new();
    let sweeper = h.sweeper(&metrics.meter());
    sweeper.tick(&Tick::detached(h.db())).await.expect("tick");
    assert_eq!(h.scalar("SELECT max_payload_bytes FROM outbox_settings").await, 4096);
    assert_eq!(sweeper.publish_payload_limit().await.expect("publish"), None, "unchanged: nothing written");
    let five_k = "SELECT enqueue_task('5k', 'q', jsonb_build_object('pad', repeat('x', 5000)))";
    let error = conn.exec(five_k, &[]).await.expect_err("over the worker's limit");
    let message = error.server_message().unwrap_or_default().to_owned();
    assert!(message.contains("enqueue_task(5k): payload is 5011 bytes, over the limit of 4096"), "{message}");

    // Another replica with another setting: the last writer wins and says what it replaced.
    let mut other = h.config.outbox.clone();
    other.max_payload_bytes = 8192;
    let replica =
        Sweeper::new(h.test_db.another_pool(), h.redis.clone(), h.prefix(), other, &metrics.meter());
    assert_eq!(replica.publish_payload_limit().await.expect("publish"), Some(4096));
    conn.exec(five_k, &[]).await.expect("within 8192 bytes");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn five_hundred_payloads_of_900_kib_are_claimed_in_batches_within_the_byte_budget() {
    const PAYLOAD: u64 = 900 * 1024;
    const TASKS: usize = 500;
    let h = Harness::new().await;
    let budget = h.config.outbox.max_batch_bytes;
    assert_eq!(budget, 16 << 20, "the default budget");
    let sweeper = h.sweeper(&MetricsProbe::new().meter());
    h.exec(&format!(
        "SELECT count(enqueue_task('big' || g, 'q', jsonb_build_object('pad', repeat('x', {PAYLOAD} - 11)))) \
         FROM generate_series(1, {TASKS}) g"
    ))
    .await;
    let payloads = worker::redis::key(h.prefix(), "payload", "q");
    let sched = worker::redis::key(h.prefix(), "sched", "q");

    let per_batch = (budget / PAYLOAD) as usize; // 18
    let mut batches = Vec::new();
    loop {
        let report = sweeper.sweep().await.expect("sweep");
        if report.claimed == 0 {
            break;
        }
        assert_eq!(report.dispatched.len(), report.claimed);
        assert_eq!(report.bytes, report.claimed as u64 * PAYLOAD, "{report:?}");
        assert!(report.bytes <= budget, "a batch of {} bytes, over the budget", report.bytes);
        if batches.is_empty() {
            // Locking 500 rows to keep 18 is work thrown away: the next claim locks twice what fit.
            assert_eq!(sweeper.batch_limit() as usize, 2 * per_batch);
        }
        batches.push(report.claimed);
        // Consumed as a consumer would: Redis holds one batch of payloads at a time.
        let _: i64 = h.redis.del(&payloads).await.expect("del");
        assert!(batches.len() <= TASKS, "the outbox never drained");
    }
    assert_eq!(batches.iter().sum::<usize>(), TASKS);
    let (last, full) = batches.split_last().expect("batches");
    assert!(
        full.iter().all(|n| *n == per_batch) && *last <= per_batch,
        "each batch as full as the budget allows, no more: {batches:?}"
    );
    let scheduled: i64 = h.redis.zcard(&sched).await.expect("zcard");
    assert_eq!(scheduled, TASKS as i64, "every task scheduled");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
    let _: i64 = h.redis.del(&sched).await.expect("del");
}

#[tokio::test]
async fn a_payload_larger_than_the_byte_budget_still_moves_in_a_batch_of_its_own() {
    let mut h = Harness::new().await;
    h.config.outbox.max_batch_bytes = 1024;
    let sweeper = h.sweeper(&MetricsProbe::new().meter());
    h.exec(
        "SELECT count(enqueue_task('big' || g, 'q', jsonb_build_object('pad', repeat('x', 2000)), \
         now() - make_interval(secs => 100 - g))) FROM generate_series(1, 3) g",
    )
    .await;
    h.exec("SELECT count(enqueue_task('small' || g, 'q', '{}', now() - interval '1 second')) FROM generate_series(1, 10) g")
        .await;
    for n in 1..=3 {
        let report = sweeper.sweep().await.expect("sweep");
        assert_eq!(report.claimed, 1, "sweep {n}: {report:?}");
        assert!(report.bytes > 1024 && report.cut_by_bytes && report.full, "sweep {n}: {report:?}");
        assert!(h.scheduled("q").await.contains_key(&format!("big{n}")), "oldest first");
    }
    drain(&sweeper, h.db()).await;
    assert_eq!(h.scheduled("q").await.len(), 13);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
}

#[tokio::test]
async fn the_probe_reports_the_busiest_queues_by_name_and_sums_the_rest_as_other() {
    let mut h = Harness::new().await;
    h.config.outbox.metrics_queues = 3;
    h.config.outbox.batch_size = 1;
    let metrics = MetricsProbe::new();
    let sweeper = h.sweeper(&metrics.meter());
    // Due rows: busy 5 (a sixth is not due), second 3, a queue literally named `other` 2, old 1
    // (its row 300 s old).
    h.enqueue(6, &["busy"], None).await;
    h.exec("UPDATE task_outbox SET task_id = 'busy-' || task_id").await;
    h.enqueue(3, &["second"], None).await;
    h.exec("UPDATE task_outbox SET task_id = 'second-' || task_id WHERE queue = 'second'").await;
    h.enqueue(3, &["old", "other"], None).await;
    h.exec("UPDATE task_outbox SET created_at = now() - interval '300 seconds' WHERE queue = 'old'").await;
    h.exec("UPDATE task_outbox SET run_at = now() + interval '1 hour' WHERE task_id = 'busy-t1'").await;
    assert!(metrics.gauge_points("outbox.queue.backlog").await.is_empty(), "nothing before the first probe");

    sweeper.tick(&Tick::detached(h.db())).await.expect("tick"); // probes, then sweeps one row
    let backlog = |q: &'static str| {
        let metrics = &metrics;
        async move { metrics.gauge_at("outbox.queue.backlog", &[("queue", q)]).await }
    };
    assert_eq!(backlog("busy").await, Some(5.0));
    assert_eq!(backlog("second").await, Some(3.0));
    // The queue named `other` is third busiest, but shares its series with the rest (`old`):
    // one `other` series, never two.
    assert_eq!(backlog("other").await, Some(3.0));
    assert_eq!(backlog("old").await, None, "not among the 3 busiest: no series of its own");
    assert_eq!(metrics.gauge_points("outbox.queue.backlog").await.len(), 3);
    let age =
        metrics.gauge_at("outbox.queue.oldest_due_age", &[("queue", "other")]).await.expect("other age");
    assert!((299.0..360.0).contains(&age), "the oldest among the rest: {age}");
    let busy_age =
        metrics.gauge_at("outbox.queue.oldest_due_age", &[("queue", "busy")]).await.expect("busy age");
    assert!((0.0..60.0).contains(&busy_age), "{busy_age}");
    // The totals agree with the per-queue gauges.
    assert_eq!(metrics.gauge("outbox.backlog.due").await, Some(11.0));
}

#[tokio::test]
async fn with_1000_queues_the_per_queue_gauges_never_exceed_metrics_queues_plus_one_series() {
    let mut h = Harness::new().await;
    h.config.outbox.probe_interval = Duration::from_millis(1); // probe on every tick
    h.config.outbox.batch_size = 300;
    let limit = h.config.outbox.metrics_queues as usize + 1;
    assert_eq!(limit, 21, "the default");
    let metrics = MetricsProbe::new();
    let sweeper = h.sweeper(&metrics.meter());
    let queues: Vec<String> = (0..1000).map(|i| format!("q{i:04}")).collect();
    let names: Vec<&str> = queues.iter().map(String::as_str).collect();
    // 1,500 rows round-robin: q0001..q0500 get 2 rows, the other 500 queues 1.
    h.enqueue(1500, &names, None).await;

    let tick = Tick::detached(h.db());
    sweeper.tick(&tick).await.expect("tick");
    let points = metrics.gauge_points("outbox.queue.backlog").await;
    assert_eq!(points.len(), limit, "{} series", points.len());
    let expected_top: Vec<String> = (1..=20).map(|i| format!("q{i:04}")).collect();
    for queue in &expected_top {
        assert_eq!(metrics.gauge_at("outbox.queue.backlog", &[("queue", queue)]).await, Some(2.0), "{queue}");
    }
    assert_eq!(metrics.gauge_at("outbox.queue.backlog", &[("queue", "other")]).await, Some(1460.0));
    assert_eq!(metrics.gauge_points("outbox.queue.oldest_due_age").await.len(), limit);

    // As the sweeps drain it the busiest change: still never more than 21 series at an export,
    // and the queues that dropped out are no longer reported.
    loop {
        let progress = sweeper.tick(&tick).await.expect("tick");
        let points = metrics.gauge_points("outbox.queue.backlog").await;
        assert!(points.len() <= limit, "{} series", points.len());
        assert_eq!(metrics.gauge_points("outbox.queue.oldest_due_age").await.len(), points.len());
        if progress == Progress::Done {
            break;
        }
    }
    sweeper.tick(&tick).await.expect("tick"); // probes the empty outbox
    let points = metrics.gauge_points("outbox.queue.backlog").await;
    assert_eq!(points, vec![(vec![("queue".to_owned(), "other".to_owned())], 0.0)]);
}

/// 1,000 due rows in queue `q`, and a sweeper of batches of 100 whose statements may wait on a
/// lock the test holds: its statement timeout is far beyond the test's bound.
async fn held_drain_harness() -> (Harness, Sweeper) {
    let mut h = Harness::new().await;
    h.config.outbox.batch_size = 100;
    let patient = Db::new(&worker::db::DatabaseConfig {
        statement_timeout: Duration::from_secs(120),
        ..h.test_db.database_config()
    })
    .expect("pool");
    let sweeper = Sweeper::new(
        patient,
        h.redis.clone(),
        h.prefix(),
        h.config.outbox.clone(),
        &MetricsProbe::new().meter(),
    );
    h.enqueue(1_000, &["q"], None).await;
    (h, sweeper)
}

/// The pipeline of a drain: the next batches are claimed and sent to Redis while the one before
/// them has not committed, and no more than `PIPELINE_DEPTH` (3) are in flight. A trigger (test
/// setup, not the worker's) makes every sweep's DELETE wait for an advisory lock the test holds:
/// with the first batch stuck before its commit, later batches' rows reach Redis only if they
/// were claimed and dispatched alongside; once three DELETEs wait on the lock, none of the three
/// batches can end, so a fourth batch must not have started (exactly 300 rows in Redis).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_claims_and_sends_the_next_batch_while_the_one_before_has_not_committed() {
    let (h, sweeper) = held_drain_harness().await;
    h.exec(
        "CREATE FUNCTION hold_delete() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN OLD; END $$",
    )
    .await;
    h.exec("CREATE TRIGGER hold_delete BEFORE DELETE ON task_outbox FOR EACH STATEMENT EXECUTE FUNCTION hold_delete()")
        .await;
    let mut holder = h.db().get().await.expect("conn");
    let hold = db::begin(
        &mut holder,
        db::TxLimits { statement: Duration::from_secs(60), idle: Duration::from_secs(60) },
    )
    .await
    .expect("begin");
    hold.exec("SELECT pg_advisory_xact_lock(4242)", &[]).await.expect("lock");

    let draining = sweeper.drain(|| Duration::from_secs(10), DrainShape { batches: 4, ..DrainShape::TICK });
    tokio::pin!(draining);
    let waiting = "SELECT count(*) FROM pg_locks WHERE locktype = 'advisory' AND classid = 0 AND objid = 4242 \
                   AND objsubid = 1 AND NOT granted \
                   AND database = (SELECT oid FROM pg_database WHERE datname = current_database())";
    tokio::select! {
        done = &mut draining => panic!("the drain ended while every commit was held: {done:?}"),
        () = common::eventually(LIMIT, "three batches' DELETEs waiting on the held lock", || async {
            h.scalar(waiting).await >= 3
        }) => {}
    }
    assert_eq!(h.scalar(waiting).await, 3, "three batches in flight, no more");
    assert_eq!(h.scheduled("q").await.len(), 300, "three batches in Redis, no fourth started");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 1_000, "nothing committed yet");
    hold.commit().await.expect("release");
    let reports = draining.await.expect("drain");
    assert_eq!(reports.len(), 4, "four full batches");
    let ids: HashSet<i64> = reports.iter().flat_map(|r| r.dispatched.iter().copied()).collect();
    assert_eq!(ids.len(), 400, "disjoint batches: {reports:?}");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 600);
    assert_eq!(h.scheduled("q").await.len(), 400);
}

/// Two sweepers draining side by side, each with its batches in flight: every row lands once.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_draining_sweepers_dispatch_every_row_exactly_once() {
    let mut h = Harness::new().await;
    h.config.outbox.batch_size = 50;
    let metrics = MetricsProbe::new();
    let sweepers = [h.sweeper(&metrics.meter()), h.sweeper(&metrics.meter())];
    h.enqueue(3_000, &["a", "b", "c"], None).await;
    let expected = h.expected().await;
    let runs = sweepers.iter().map(|sweeper| async move {
        let mut dispatched = Vec::new();
        loop {
            let reports = sweeper.drain(|| Duration::from_secs(10), DrainShape::TICK).await.expect("drain");
            if reports.iter().all(|r| r.claimed == 0) {
                return dispatched;
            }
            dispatched.extend(reports.into_iter().flat_map(|r| r.dispatched));
        }
    });
    let [first, second]: [Vec<i64>; 2] =
        futures_util::future::join_all(runs).await.try_into().expect("two sweepers");
    assert!(!first.is_empty() && !second.is_empty(), "both took part: {} and {}", first.len(), second.len());
    let all: HashSet<i64> = first.iter().chain(&second).copied().collect();
    assert_eq!(first.len() + second.len(), 3_000, "no row dispatched twice");
    assert_eq!(all.len(), 3_000);
    for queue in ["a", "b", "c"] {
        assert!(h.scheduled(queue).await == expected[queue], "queue {queue}");
    }
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
    assert_eq!(metrics.counter("outbox.sweep.rows", &[("outcome", "dispatched")]).await, 3_000);
}

/// A batch that fails while the next one is in flight: the drain returns the error and the
/// other batch still commits. The failure is the first batch's DELETE, refused by a trigger (test
/// setup) for its oldest task, after waiting for an advisory lock the test holds until the
/// second batch has committed (else the first could fail before the second even started, and
/// rightly no batch starts after a failure).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_batch_ends_the_drain_with_its_error_and_the_batch_beside_it_still_commits() {
    let (h, sweeper) = held_drain_harness().await;
    h.exec(
        "CREATE FUNCTION refuse_t1() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN IF OLD.task_id = 't1000' THEN \
           PERFORM pg_advisory_xact_lock_shared(4243); RAISE EXCEPTION 'refused by the test'; \
         END IF; RETURN OLD; END $$",
    )
    .await;
    h.exec("CREATE TRIGGER refuse_t1 BEFORE DELETE ON task_outbox FOR EACH ROW EXECUTE FUNCTION refuse_t1()")
        .await;
    let mut holder = h.db().get().await.expect("conn");
    let hold = db::begin(
        &mut holder,
        db::TxLimits { statement: Duration::from_secs(60), idle: Duration::from_secs(60) },
    )
    .await
    .expect("begin");
    hold.exec("SELECT pg_advisory_xact_lock(4243)", &[]).await.expect("lock");

    let draining = sweeper.drain(|| Duration::from_secs(10), DrainShape { batches: 2, ..DrainShape::TICK });
    tokio::pin!(draining);
    tokio::select! {
        done = &mut draining => panic!("the drain ended while the first batch was held: {done:?}"),
        () = common::eventually(LIMIT, "the second batch committed", || async {
            h.scalar("SELECT count(*) FROM task_outbox").await == 900
        }) => {}
    }
    hold.commit().await.expect("release");
    let error = draining.await.expect_err("a batch failed");
    assert!(error.to_string().contains("refused by the test"), "{error}");
    // Enqueue dates task g at now() - g ms: t901..t1000 are the oldest, the first batch's.
    let first_batch = "SELECT count(*) FROM task_outbox WHERE task_id IN \
                       (SELECT 't' || g FROM generate_series(901, 1000) AS g)";
    assert_eq!(h.scalar(first_batch).await, 100, "the failed batch rolled back whole");
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 900, "the other batch stayed committed");
    assert_eq!(
        h.scheduled("q").await.len(),
        200,
        "both batches were sent; the failed one's rows move again later"
    );
    assert_eq!(h.scalar("SELECT attempts::int8 FROM task_outbox WHERE task_id = 't1000'").await, 0);
}
