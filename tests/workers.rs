//! The `workers` loop keeps this worker's lease fresh with the database clock, re-registers a
//! worker that was reaped, and deletes rows unseen for longer than the retention.

mod common;

use common::TestDb;
use common::metrics::MetricsProbe;
use tokio_postgres::types::Type;
use worker::db::{Db, Exec};
use worker::identity::WorkerIdentity;
use worker::runtime::{LeasePublisher, LeaseStatus, Loop, Progress, Tick};
use worker::workers::{WorkerLease, WorkersConfig};

async fn seconds_since_seen(db: &Db, id: uuid::Uuid) -> Option<f64> {
    let conn = db.get().await.expect("conn");
    conn.fetch_opt(
        "SELECT extract(epoch FROM now() - last_seen_at)::float8 FROM workers WHERE id = $1",
        &[(&id, Type::UUID)],
    )
    .await
    .expect("query")
    .map(|r| r.get(0))
}

async fn run(db: &Db, sql: &str) {
    db.get().await.expect("conn").exec(sql, &[]).await.expect(sql);
}

#[tokio::test]
async fn a_tick_renews_the_lease_with_the_database_clock() {
    let test_db = TestDb::new().await;
    let me = WorkerIdentity::generate();
    let lease = WorkerLease::new(test_db.db.clone(), me.clone(), WorkersConfig::default());
    lease.register().await.expect("register");
    run(&test_db.db, "UPDATE workers SET last_seen_at = now() - interval '1 hour'").await;
    assert!(seconds_since_seen(&test_db.db, me.id).await.expect("row") >= 3600.0);

    assert_eq!(lease.tick(&Tick::detached(&test_db.db)).await.expect("tick"), Progress::Done);
    assert!(seconds_since_seen(&test_db.db, me.id).await.expect("row") < 60.0, "lease renewed");
}

#[tokio::test]
async fn a_reaped_worker_registers_again_on_its_next_tick() {
    let test_db = TestDb::new().await;
    let me = WorkerIdentity::generate();
    let lease = WorkerLease::new(test_db.db.clone(), me.clone(), WorkersConfig::default());
    lease.register().await.expect("register");
    run(&test_db.db, "DELETE FROM workers").await;
    lease.tick(&Tick::detached(&test_db.db)).await.expect("tick");
    assert!(seconds_since_seen(&test_db.db, me.id).await.is_some(), "registered again");
}

#[tokio::test]
async fn rows_unseen_past_the_retention_are_deleted_and_others_kept() {
    let test_db = TestDb::new().await;
    let me = WorkerIdentity::generate();
    let lease = WorkerLease::new(test_db.db.clone(), me.clone(), WorkersConfig::default());
    lease.register().await.expect("register");
    run(
        &test_db.db,
        "INSERT INTO workers (id, hostname, version, last_seen_at) VALUES \
         ('00000000-0000-0000-0000-000000000001', 'dead', 'x', now() - interval '25 hours'), \
         ('00000000-0000-0000-0000-000000000002', 'stale', 'x', now() - interval '23 hours')",
    )
    .await;
    lease.tick(&Tick::detached(&test_db.db)).await.expect("tick");
    let conn = test_db.db.get().await.expect("conn");
    let rows = conn.fetch_all("SELECT hostname FROM workers ORDER BY hostname", &[]).await.expect("rows");
    let names: Vec<String> = rows.iter().map(|r| r.get(0)).collect();
    let mut expected = vec![me.hostname.clone(), "stale".to_owned()];
    expected.sort();
    assert_eq!(names, expected, "the 25-hour-old row is gone, the 23-hour-old one kept");
}

#[tokio::test]
async fn deregistering_removes_only_this_workers_row() {
    let test_db = TestDb::new().await;
    let (a, b) = (WorkerIdentity::generate(), WorkerIdentity::generate());
    let lease_a = WorkerLease::new(test_db.db.clone(), a.clone(), WorkersConfig::default());
    let lease_b = WorkerLease::new(test_db.db.clone(), b.clone(), WorkersConfig::default());
    lease_a.register().await.expect("register a");
    lease_b.register().await.expect("register b");
    lease_a.deregister().await.expect("deregister");
    assert!(seconds_since_seen(&test_db.db, a.id).await.is_none());
    assert!(seconds_since_seen(&test_db.db, b.id).await.is_some());
}

#[tokio::test]
async fn the_lease_state_goes_failing_on_an_error_and_lost_then_healthy_when_reaped() {
    let test_db = TestDb::new().await;
    let me = WorkerIdentity::generate();
    let publisher = LeasePublisher::default();
    let watch = publisher.watch();
    let lease = WorkerLease::new(test_db.db.clone(), me.clone(), WorkersConfig::default())
        .publishing_to(publisher.clone());
    assert!(!watch.current().is_healthy(), "no renewal yet");
    lease.register().await.expect("register");
    assert!(watch.current().is_healthy(), "the registration is the first renewal");
    let registered_at = watch.current().renewed_at.expect("renewed");
    let tick = Tick::detached(&test_db.db);
    lease.tick(&tick).await.expect("tick");
    let state = watch.current();
    assert_eq!((state.status, state.epoch), (LeaseStatus::Healthy, 0));
    assert!(state.renewed_at.expect("renewed") > registered_at, "each renewal moves the deadline");

    // Reaped as dead by another replica: the tick registers again under a new epoch, so whatever
    // this worker ran under epoch 0 knows it was lost even though the lease is healthy again.
    run(&test_db.db, "DELETE FROM workers").await;
    lease.tick(&tick).await.expect("tick");
    let state = watch.current();
    assert_eq!((state.status, state.epoch), (LeaseStatus::Healthy, 1));
    assert!(seconds_since_seen(&test_db.db, me.id).await.is_some(), "registered again");

    // A renewal that fails (here: the table is gone) marks the lease failing.
    run(&test_db.db, "ALTER TABLE workers RENAME TO workers_gone").await;
    lease.tick(&tick).await.expect_err("no table, no renewal");
    assert!(matches!(watch.current().status, LeaseStatus::Failing), "{:?}", watch.current());
    run(&test_db.db, "ALTER TABLE workers_gone RENAME TO workers").await;
    lease.tick(&tick).await.expect("tick");
    assert_eq!(watch.current().status, LeaseStatus::Healthy);
}

#[tokio::test]
async fn each_renewal_records_the_age_the_lease_had_just_before_it() {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let me = WorkerIdentity::generate();
    let lease = WorkerLease::new(test_db.db.clone(), me.clone(), WorkersConfig::default())
        .measured_by(&metrics.meter());
    lease.register().await.expect("register");
    assert_eq!(
        metrics.histogram("workers.lease.age_at_renewal").await.0.count,
        0,
        "a registration is no renewal"
    );

    // The last renewal 40 s ago on the database clock: this one finds the lease 40 s old.
    run(&test_db.db, "UPDATE workers SET last_seen_at = now() - interval '40 seconds'").await;
    let tick = Tick::detached(&test_db.db);
    lease.tick(&tick).await.expect("tick");
    let (point, attributed) = metrics.histogram("workers.lease.age_at_renewal").await;
    assert_eq!(point.count, 1);
    assert!((40..60).contains(&point.max), "age at renewal {}", point.max);
    assert!(!attributed, "no attributes");

    // At once again: a fresh lease.
    lease.tick(&tick).await.expect("tick");
    let (point, _) = metrics.histogram("workers.lease.age_at_renewal").await;
    assert_eq!(point.count, 2);
    assert!((40..100).contains(&point.sum), "the second age is small: sum {}", point.sum);

    // Reaped: the tick registers again and records nothing (there was no lease to renew).
    run(&test_db.db, "DELETE FROM workers").await;
    lease.tick(&tick).await.expect("tick");
    assert_eq!(metrics.histogram("workers.lease.age_at_renewal").await.0.count, 2);
}
