//! The counters loop against real PostgreSQL and Redis: which jobs it writes, clamping, jobs
//! missing from the hash, the skew histogram, two replicas behind pgbouncer in transaction
//! mode, a large hash read in HSCAN pages with poison fields in it, and ticks that skip the
//! statement while the hash stands still (and the resync that bounds it).

mod common;
mod outbox_support;

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use common::TestDb;
use common::metrics::MetricsProbe;
use common::pgbouncer::PgBouncer;
use fred::prelude::{HashesInterface, KeysInterface, Value};
use outbox_support::{Harness, connected};
use worker::counters::CountersConfig;
use worker::counters::{Counters, Skipped};
use worker::db::{Db, Exec};
use worker::runtime::{Loop, LoopError, Progress, Tick};

fn counters(
    h: &Harness,
    db: Db,
    redis: worker::redis::Client,
    meter: &opentelemetry::metrics::Meter,
) -> Counters {
    Counters::new(db, redis, h.prefix(), h.config.counters.clone(), meter)
}

async fn running_tasks(db: &Db) -> BTreeMap<String, i32> {
    let rows = db
        .get()
        .await
        .expect("conn")
        .fetch_all("SELECT id, running_tasks FROM jobs ORDER BY id", &[])
        .await
        .expect("jobs");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test]
async fn hash_values_land_in_running_tasks_of_active_jobs_only() {
    let h = Harness::new().await;
    let metrics = MetricsProbe::new();
    let sync = counters(&h, h.db().clone(), h.redis.clone(), &metrics.meter());
    h.exec(
        "INSERT INTO jobs (id, status, running_tasks) VALUES \
         ('a', 'running', 0), ('b', 'pending', 4), ('c', 'completed', 1), ('d', 'running', 5), \
         ('e', 'running', 2), ('f', 'canceled', 2), ('g', 'pending', 0), ('h', 'failed', 3)",
    )
    .await;
    h.exec("UPDATE jobs SET updated_at = now() - interval '1 hour'").await;
    let key = format!("{}:running", h.prefix());
    let _: () = h
        .redis
        .hset(
            &key,
            vec![
                ("a", "3"),
                ("b", "-2"),          // negative: clamped to 0
                ("c", "7"),           // completed: never touched
                ("e", "lots"),        // unreadable: that job keeps its count
                ("g", "99999999999"), // beyond int4: clamped
                ("h", "1"),           // failed: never touched
                ("ghost", "5"),       // no such job
            ],
        )
        .await
        .expect("hset");
    // d is active and missing from the hash: back to 0.

    assert_eq!(sync.tick(&Tick::detached(h.db())).await.expect("tick"), Progress::Done);
    let expected: BTreeMap<String, i32> =
        [("a", 3), ("b", 0), ("c", 1), ("d", 0), ("e", 2), ("f", 2), ("g", i32::MAX), ("h", 3)]
            .into_iter()
            .map(|(k, v)| (k.to_owned(), v))
            .collect();
    assert_eq!(running_tasks(h.db()).await, expected);
    assert_eq!(
        h.scalar("SELECT count(*) FROM jobs WHERE updated_at > now() - interval '1 minute'").await,
        4,
        "only the changed jobs (a, b, d, g) are written"
    );

    // Skew per active job (a 3, b 4, d 5, e 0, g i32::MAX), with no job-id attribute.
    let (skew, attributed) = metrics.histogram("counters.skew").await;
    assert_eq!(skew.count, 5);
    assert_eq!(skew.max, i32::MAX as u64);
    assert_eq!(skew.sum, 3 + 4 + 5 + i32::MAX as u64);
    assert!(!attributed, "the skew histogram carries no attributes (no job id)");

    let again = sync.sync().await.expect("sync");
    assert_eq!(
        (again.active_jobs, again.updated, again.max_skew),
        (5, 0, 0),
        "a second sync changes nothing"
    );
    assert_eq!(again.skipped, Skipped { not_a_number: 1, ..Skipped::default() }, "e's value");
}

#[tokio::test]
async fn an_empty_hash_zeroes_every_active_job() {
    let h = Harness::new().await;
    let sync = counters(&h, h.db().clone(), h.redis.clone(), &MetricsProbe::new().meter());
    h.exec("INSERT INTO jobs (id, status, running_tasks) VALUES ('a', 'running', 3), ('b', 'completed', 2)")
        .await;
    let report = sync.sync().await.expect("sync");
    assert_eq!((report.entries, report.updated), (0, 1));
    assert_eq!(running_tasks(h.db()).await, BTreeMap::from([("a".into(), 0), ("b".into(), 2)]));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_sync_through_pgbouncer_transaction_mode_without_errors() {
    let h = Harness::new().await;
    let bouncer = PgBouncer::start(2).await;
    let bounced = || Db::new(&TestDb::database_config_for(&bouncer.url(&h.test_db.name), 4)).expect("pool");
    h.exec(
        "INSERT INTO jobs (id, status) SELECT 'job-' || lpad(g::text, 4, '0'), 'running' \
         FROM generate_series(1, 500) g",
    )
    .await;
    let key = format!("{}:running", h.prefix());
    let replicas = [
        counters(&h, bounced(), connected(&h.config.redis).await, &MetricsProbe::new().meter()),
        counters(&h, bounced(), connected(&h.config.redis).await, &MetricsProbe::new().meter()),
    ];
    for round in 0..20i64 {
        // Every job in the hash except one that rotates out (→ 0).
        let values: Vec<(String, String)> = (1..=500i64)
            .filter(|g| g % 50 != round % 50)
            .map(|g| (format!("job-{g:04}"), ((g + round) % 7 - 1).to_string()))
            .collect();
        let _: i64 = h.redis.del(&key).await.expect("del");
        let _: () = h.redis.hset(&key, values).await.expect("hset");
        let (a, b) = tokio::join!(replicas[0].sync(), replicas[1].sync());
        a.expect("replica 1 through pgbouncer");
        b.expect("replica 2 through pgbouncer");
    }
    let last = 19i64;
    let expected: BTreeMap<String, i32> = (1..=500i64)
        .map(|g| {
            let n = if g % 50 == last % 50 { 0 } else { ((g + last) % 7 - 1).max(0) as i32 };
            (format!("job-{g:04}"), n)
        })
        .collect();
    assert_eq!(running_tasks(h.db()).await, expected);
}

#[tokio::test]
async fn an_unreachable_redis_fails_the_tick_and_zeroes_nothing() {
    let mut h = Harness::new().await;
    h.config.redis.url = outbox_support::redis_server::url_for(outbox_support::redis_server::free_port());
    h.config.counters.base.tick_timeout = Duration::from_millis(600);
    let redis = worker::redis::connect(&h.config.redis).expect("client");
    let sync = counters(&h, h.db().clone(), redis, &MetricsProbe::new().meter());
    h.exec("INSERT INTO jobs (id, status, running_tasks) VALUES ('a', 'running', 3)").await;
    let error = sync.tick(&Tick::detached(h.db())).await.expect_err("no redis: the tick fails");
    assert!(error.to_string().contains("not connected"), "{error}");
    assert_eq!(
        running_tasks(h.db()).await,
        BTreeMap::from([("a".into(), 3)]),
        "no answer is not an empty hash"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hash_of_200k_fields_with_3_poison_fields_is_read_in_pages_and_syncs_the_rest() {
    const JOBS: i64 = 200_000;
    let h = Harness::new().await;
    let sync = counters(&h, h.db().clone(), h.redis.clone(), &MetricsProbe::new().meter());
    // Most jobs already hold their hash value: one statement updating 200k rows takes longer than
    // the 5 s statement timeout on a busy 2-core machine, and that is not what this test is about.
    // Every 50th job and the last three hold 7 instead, so 4,001 rows change.
    h.exec(&format!(
        "INSERT INTO jobs (id, status, running_tasks) \
         SELECT 'job-' || g, 'running', CASE WHEN g % 50 = 0 OR g >= {JOBS} - 2 THEN 7 ELSE g % 5 END \
         FROM generate_series(1, {JOBS}) g"
    ))
    .await;
    let key = format!("{}:running", h.prefix());
    // Jobs 1 ..= JOBS - 3 count g % 5; job JOBS - 2 holds a value that is no number; jobs JOBS - 1
    // and JOBS are not in the hash (→ 0). Two more fields are no job id PostgreSQL can hold: 200k
    // fields in all.
    for from in (1..=JOBS - 3).step_by(10_000) {
        let fields: Vec<(String, String)> = (from..(from + 10_000).min(JOBS - 2))
            .map(|g| (format!("job-{g}"), (g % 5).to_string()))
            .collect();
        let _: () = h.redis.hset(&key, fields).await.expect("hset");
    }
    let not_a_number = format!("job-{}", JOBS - 2);
    let not_utf8: &[u8] = b"job-\xff\xfe";
    let _: () = h.redis.hset(&key, vec![(not_a_number.as_str(), "lots")]).await.expect("hset");
    let _: () = h.redis.hset(&key, vec![(not_utf8, "1")]).await.expect("hset");
    let _: () = h.redis.hset(&key, vec![("job-\0-1", "1")]).await.expect("hset");
    let fields: i64 = h.redis.hlen(&key).await.expect("hlen");
    assert_eq!(fields, JOBS);

    // Without the fix: the whole-hash read fails on the one field that is not UTF-8, and a NUL
    // in a job id fails any statement it is sent in (so every job's sync with it).
    let whole: Result<HashMap<String, Value>, _> = h.redis.hgetall(&key).await;
    assert!(whole.is_err(), "HGETALL into strings fails on a non-UTF-8 field");
    let conn = h.db().get().await.expect("conn");
    let refused =
        conn.fetch_one("SELECT $1::text", &[(&"job-\0-1", tokio_postgres::types::Type::TEXT)]).await;
    assert!(refused.is_err(), "PostgreSQL text holds no NUL");
    drop(conn);

    let report = sync.sync().await.expect("the sync does not fail on poison fields");
    assert_eq!(report.entries, JOBS as usize);
    assert_eq!(report.skipped, Skipped { not_utf8: 1, nul: 1, not_a_number: 1 });
    assert_eq!(report.skipped.total(), 3);
    assert!(report.pages >= 100, "read in pages of about scan_count (1000) fields: {} pages", report.pages);
    assert_eq!(report.active_jobs, JOBS as u64);
    assert_eq!(report.updated, (JOBS - 3) as u64 / 50 + 2, "every 50th job, and the two not in the hash");
    let wrong = h
        .scalar(&format!(
            "SELECT count(*) FROM (SELECT split_part(id, '-', 2)::int8 AS g, running_tasks FROM jobs) j \
             WHERE running_tasks <> CASE WHEN g <= {JOBS} - 3 THEN g % 5 WHEN g = {JOBS} - 2 THEN 7 ELSE 0 END"
        ))
        .await;
    assert_eq!(wrong, 0, "every valid field synced; the job with a bad value kept its count");
    let _: i64 = h.redis.del(&key).await.expect("del");
}

/// A tick that should not reach PostgreSQL gets this long before the test calls it a failure
/// (a tick that waits on the table lock ends only at the loop's 1 s statement timeout).
const AT_ONCE: Duration = Duration::from_millis(500);

/// A pool for the loop whose statements give up after 1 s: a sync that waits on a table lock
/// fails the test rather than hanging it.
fn impatient_pool(h: &Harness) -> Db {
    let config = worker::db::DatabaseConfig {
        statement_timeout: Duration::from_secs(1),
        ..h.test_db.database_config()
    };
    Db::new(&config).expect("pool")
}

/// The counts of jobs `a` and `b` in the hash.
async fn set_hash(h: &Harness, a: &str, b: &str) {
    let key = format!("{}:running", h.prefix());
    let _: () = h.redis.hset(&key, vec![("a", a), ("b", b)]).await.expect("hset");
}

#[tokio::test]
async fn an_unchanged_hash_skips_the_statement_until_it_changes_and_a_failed_sync_forgets_it() {
    let h = Harness::new().await;
    let db = impatient_pool(&h);
    let sync = counters(&h, db.clone(), h.redis.clone(), &MetricsProbe::new().meter());
    let budget = Duration::from_secs(5);
    h.exec("INSERT INTO jobs (id, status, running_tasks) VALUES ('a', 'running', 0), ('b', 'pending', 0)")
        .await;
    set_hash(&h, "2", "1").await;

    let first = sync.sync_if_due(budget).await.expect("first sync").expect("the first tick syncs");
    assert_eq!(first.updated, 2);
    let settle =
        sync.sync_if_due(budget).await.expect("sync").expect("a sync that changed rows is checked again");
    assert_eq!(settle.updated, 0, "PostgreSQL is in step");
    assert_eq!(sync.sync_if_due(budget).await.expect("tick"), None, "unchanged and settled: skipped");

    // Hold the jobs table: any statement on it waits, so a tick that ran one could not return.
    let mut blocker = h.db().get().await.expect("conn");
    let lock = blocker.transaction().await.expect("begin");
    lock.exec("LOCK TABLE jobs IN ACCESS EXCLUSIVE MODE", &[]).await.expect("lock");
    {
        // What the sync statement would meet: the lock (55P03 once lock_timeout runs out).
        let mut probe = h.db().get().await.expect("conn");
        let probe = probe.transaction().await.expect("begin");
        probe.exec("SET LOCAL lock_timeout = '50ms'", &[]).await.expect("lock_timeout");
        let blocked =
            probe.fetch_one("SELECT count(*) FROM jobs", &[]).await.expect_err("the table is locked");
        assert_eq!(blocked.code(), Some("55P03"), "{blocked}");
    }
    let tick = tokio::time::timeout(AT_ONCE, sync.tick(&Tick::detached(&db)))
        .await
        .expect("the tick waited on the table lock: it ran the statement for an unchanged hash");
    assert_eq!(tick.expect("tick"), Progress::Done);

    // A changed hash is synced: here it meets the lock and fails at the statement timeout.
    set_hash(&h, "5", "1").await;
    let failed = tokio::time::timeout(Duration::from_secs(10), sync.tick(&Tick::detached(&db)))
        .await
        .expect("bounded by the 1 s statement timeout")
        .expect_err("a changed hash runs the statement, which waits on the lock");
    assert_eq!(failed.metric_label(), "db_statement_timeout", "{failed}");
    lock.rollback().await.expect("release");
    drop(blocker);

    // The hash as it was at the last successful sync: after the failure nothing is remembered,
    // so this read is synced, not compared with the read before the failure.
    set_hash(&h, "2", "1").await;
    let after_failure =
        sync.sync_if_due(budget).await.expect("sync").expect("a failed sync forgets the last read");
    assert_eq!(after_failure.updated, 0);
    assert_eq!(sync.sync_if_due(budget).await.expect("tick"), None, "and remembers this one");

    set_hash(&h, "5", "1").await;
    assert_eq!(sync.tick(&Tick::detached(&db)).await.expect("tick"), Progress::Done);
    assert_eq!(running_tasks(h.db()).await, BTreeMap::from([("a".into(), 5), ("b".into(), 1)]));
}

#[tokio::test]
async fn drift_while_the_hash_stands_still_lasts_until_the_resync_which_repairs_it() {
    let mut h = Harness::new().await;
    let meter = MetricsProbe::new().meter();
    h.exec("INSERT INTO jobs (id, status, running_tasks) VALUES ('a', 'running', 0), ('b', 'pending', 0)")
        .await;
    set_hash(&h, "2", "1").await;
    let budget = Duration::from_secs(5);
    let drift = "UPDATE jobs SET running_tasks = 9 WHERE id = 'a'";
    let synced = BTreeMap::from([("a".into(), 2), ("b".into(), 1)]);

    // The default resync (1 m): a manual UPDATE stays until the hash changes or a minute passes.
    assert_eq!(h.config.counters.resync_interval(), Duration::from_secs(60));
    let patient = counters(&h, h.db().clone(), h.redis.clone(), &meter);
    patient.sync_if_due(budget).await.expect("sync").expect("first");
    patient.sync_if_due(budget).await.expect("sync").expect("settling");
    assert_eq!(running_tasks(h.db()).await, synced);
    h.exec(drift).await;
    assert_eq!(patient.sync_if_due(budget).await.expect("tick"), None, "the hash did not change");
    assert_eq!(running_tasks(h.db()).await["a"], 9, "the drift stays until the resync");

    // A resync that is always due (`validate` refuses 0; the loop is built without it, so every
    // unchanged read is past the bound whatever the clock does).
    h.config.counters = CountersConfig { resync_interval: Some(Duration::ZERO), ..h.config.counters.clone() };
    let eager = counters(&h, h.db().clone(), h.redis.clone(), &meter);
    eager.sync_if_due(budget).await.expect("sync").expect("first");
    eager.sync_if_due(budget).await.expect("sync").expect("settling");
    assert_eq!(running_tasks(h.db()).await, synced);
    h.exec(drift).await;
    let resync =
        eager.sync_if_due(budget).await.expect("sync").expect("unchanged and settled, but the resync is due");
    assert_eq!((resync.updated, resync.max_skew), (1, 7), "a: 9 → 2");
    assert_eq!(running_tasks(h.db()).await, synced);
}
