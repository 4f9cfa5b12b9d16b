//! Dead-letter requeue against a real database: which copy of a task comes back, which dead
//! letters stay (their job is over), and how requeue and `cancel_job` interleave. Also the one
//! documented corner of `enqueue_task` (migrations/V2): it returns NULL when the row it conflicted
//! with leaves the outbox before it is read back.

mod common;

use std::time::Duration;

use common::{TestDb, eventually};
use tokio_postgres::types::Type;
use worker::db::{self, Exec};
use worker::outbox::dead::{self, Selection};

async fn exec(test_db: &TestDb, sql: &str) {
    test_db.db.get().await.expect("conn").exec(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar(test_db: &TestDb, sql: &str) -> i64 {
    test_db
        .db
        .get()
        .await
        .expect("conn")
        .fetch_one(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"))
        .get(0)
}

async fn texts(test_db: &TestDb, sql: &str) -> Vec<String> {
    let rows = test_db
        .db
        .get()
        .await
        .expect("conn")
        .fetch_all(sql, &[])
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
    rows.iter().map(|r| r.get(0)).collect()
}

/// One dead letter with an explicit id (ids order the copies of a task: higher = newer).
async fn dead_letter(test_db: &TestDb, id: i64, task_id: &str, job_id: Option<&str>, payload: &str) {
    let conn = test_db.db.get().await.expect("conn");
    conn.exec(
        "INSERT INTO task_outbox_dead (id, original_id, task_id, job_id, queue, payload, run_at, attempts, \
         last_error, created_at, dead_lettered_at) \
         VALUES ($1, $1, $2, $3, 'q', $4::text::jsonb, now(), 10, 'WRONGTYPE', now(), now())",
        &[(&id, Type::INT8), (&task_id, Type::TEXT), (&job_id, Type::TEXT), (&payload, Type::TEXT)],
    )
    .await
    .expect("insert dead letter");
}

/// Sessions of this database waiting on a lock (row or advisory), other than the asking one.
async fn lock_waiters(test_db: &TestDb) -> i64 {
    scalar(
        test_db,
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
         AND wait_event_type = 'Lock' AND pid <> pg_backend_pid()",
    )
    .await
}

#[tokio::test]
async fn requeue_brings_back_the_newest_dead_copy_of_a_task_and_removes_the_superseded_ones() {
    let test_db = TestDb::new().await;
    dead_letter(&test_db, 1, "t", None, r#"{"v": "old"}"#).await;
    dead_letter(&test_db, 2, "t", None, r#"{"v": "new"}"#).await;
    dead_letter(&test_db, 3, "u", None, r#"{"v": "only"}"#).await;

    let report =
        dead::requeue(&test_db.db.get().await.expect("conn"), &Selection::All).await.expect("requeue");
    assert_eq!(
        texts(&test_db, "SELECT task_id || '=' || (payload->>'v') FROM task_outbox ORDER BY task_id").await,
        ["t=new", "u=only"]
    );
    // The older copy is gone with it: a later `requeue --all` (after the new one was dispatched)
    // must not resurrect the stale payload.
    assert_eq!(scalar(&test_db, "SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_eq!((report.removed, report.requeued, report.superseded, report.already_pending), (3, 2, 1, 0));

    // By id: the newest of the chosen copies wins, whatever order they were given in.
    exec(&test_db, "DELETE FROM task_outbox").await;
    dead_letter(&test_db, 10, "t", None, r#"{"v": "old"}"#).await;
    dead_letter(&test_db, 11, "t", None, r#"{"v": "new"}"#).await;
    let report = dead::requeue(&test_db.db.get().await.expect("conn"), &Selection::Ids(vec![11, 10]))
        .await
        .expect("requeue");
    assert_eq!(texts(&test_db, "SELECT payload->>'v' FROM task_outbox WHERE task_id = 't'").await, ["new"]);
    assert_eq!((report.removed, report.requeued, report.superseded), (2, 1, 1));

    // Already back in the outbox: every dead copy of that task is removed, none requeued.
    dead_letter(&test_db, 20, "t", None, r#"{"v": "older"}"#).await;
    dead_letter(&test_db, 21, "t", None, r#"{"v": "old"}"#).await;
    let report =
        dead::requeue(&test_db.db.get().await.expect("conn"), &Selection::All).await.expect("requeue");
    assert_eq!((report.removed, report.requeued, report.superseded, report.already_pending), (2, 0, 0, 2));
    assert_eq!(texts(&test_db, "SELECT payload->>'v' FROM task_outbox WHERE task_id = 't'").await, ["new"]);
}

#[tokio::test]
async fn requeue_keeps_dead_letters_of_jobs_that_are_over_and_requeues_the_rest() {
    let test_db = TestDb::new().await;
    exec(
        &test_db,
        "INSERT INTO jobs (id, status) VALUES ('pending', 'pending'), ('running', 'running'), \
         ('canceled', 'running'), ('completed', 'completed'), ('failed', 'failed')",
    )
    .await;
    for (id, job) in [
        (1, Some("pending")),
        (2, Some("running")),
        (3, Some("canceled")),
        (4, Some("canceled")),
        (5, Some("completed")),
        (6, Some("failed")),
        (7, Some("not-in-jobs")),
        (8, None),
    ] {
        dead_letter(&test_db, id, &format!("t{id}"), job, "{}").await;
    }
    exec(&test_db, "SELECT enqueue_task('live', 'q', '{}', now(), 'canceled')").await;
    // cancel_job leaves the dead letters alone: they are the record of what failed.
    assert_eq!(scalar(&test_db, "SELECT cancel_job('canceled')").await, 1);
    assert_eq!(scalar(&test_db, "SELECT count(*) FROM task_outbox_dead").await, 8);

    let report =
        dead::requeue(&test_db.db.get().await.expect("conn"), &Selection::All).await.expect("requeue");
    assert_eq!(
        texts(&test_db, "SELECT task_id FROM task_outbox ORDER BY task_id").await,
        ["t1", "t2", "t7", "t8"],
        "tasks of pending/running jobs, of unknown jobs and without a job come back"
    );
    assert_eq!(
        texts(&test_db, "SELECT task_id FROM task_outbox_dead ORDER BY id").await,
        ["t3", "t4", "t5", "t6"],
        "dead letters of canceled/completed/failed jobs stay where they are"
    );
    assert_eq!((report.removed, report.requeued, report.skipped), (4, 4, 4));
    let by_status: Vec<(&str, u64)> =
        report.skipped_by_job_status.iter().map(|(s, n)| (s.as_str(), *n)).collect();
    assert_eq!(by_status, [("canceled", 2), ("completed", 1), ("failed", 1)]);

    // By id, too; a skipped id is not "not found".
    let report = dead::requeue(&test_db.db.get().await.expect("conn"), &Selection::Ids(vec![3, 5, 99]))
        .await
        .expect("requeue");
    assert_eq!((report.removed, report.requeued, report.skipped), (0, 0, 2));
    assert_eq!(report.not_found, [99]);
    assert_eq!(scalar(&test_db, "SELECT count(*) FROM task_outbox_dead").await, 4);
}

/// `cancel_job` commits while requeue is running: requeue must see the job canceled, not the
/// status it had when requeue's statement started, or the canceled task comes back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requeue_racing_cancel_job_does_not_bring_the_canceled_task_back() {
    let test_db = TestDb::new().await;
    exec(&test_db, "INSERT INTO jobs (id, status) VALUES ('j', 'running')").await;
    dead_letter(&test_db, 1, "j-task", Some("j"), "{}").await;
    dead_letter(&test_db, 2, "free-task", None, "{}").await;

    let mut canceling = test_db.db.get().await.expect("conn");
    let cancel = db::begin(
        &mut canceling,
        db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) },
    )
    .await
    .expect("begin");
    cancel.fetch_one("SELECT cancel_job('j')", &[]).await.expect("cancel_job");

    let requeue = tokio::spawn({
        let db = test_db.db.clone();
        async move { dead::requeue(&db.get().await?, &Selection::All).await }
    });
    // Either requeue waits for the job's row lock (correct) or it already finished (the bug).
    eventually(Duration::from_secs(10), "requeue to wait for cancel_job or finish", || async {
        requeue.is_finished() || lock_waiters(&test_db).await > 0
    })
    .await;
    cancel.commit().await.expect("commit cancel_job");
    let report = requeue.await.expect("join").expect("requeue");

    assert_eq!(texts(&test_db, "SELECT task_id FROM task_outbox").await, ["free-task"]);
    assert_eq!(texts(&test_db, "SELECT task_id FROM task_outbox_dead").await, ["j-task"]);
    assert_eq!((report.requeued, report.skipped), (1, 1));
}

/// The other order: `cancel_job` starts while requeue holds the job (a trigger keeps requeue's
/// statement open after its INSERT). cancel_job waits for requeue to commit, then deletes the task
/// requeue brought back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancel_job_that_starts_while_requeue_runs_deletes_what_requeue_brought_back() {
    let test_db = TestDb::new().await;
    exec(&test_db, "INSERT INTO jobs (id, status) VALUES ('j', 'running')").await;
    dead_letter(&test_db, 1, "j-task", Some("j"), "{}").await;
    hold_inserts_on_gate(&test_db).await;

    let mut gate_conn = test_db.db.get().await.expect("conn");
    let gate = db::begin(
        &mut gate_conn,
        db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) },
    )
    .await
    .expect("begin");
    gate.fetch_one("SELECT 1::int4 FROM pg_advisory_xact_lock(4242)", &[]).await.expect("take the gate");

    let requeue = tokio::spawn({
        let db = test_db.db.clone();
        async move { dead::requeue(&db.get().await?, &Selection::All).await }
    });
    eventually(Duration::from_secs(10), "requeue to reach its INSERT", || async {
        lock_waiters(&test_db).await == 1
    })
    .await;
    let cancel = tokio::spawn({
        let db = test_db.db.clone();
        async move {
            let conn = db.get().await.expect("conn");
            conn.fetch_one("SELECT cancel_job('j')", &[]).await.expect("cancel_job").get::<_, i64>(0)
        }
    });
    eventually(Duration::from_secs(10), "cancel_job to wait for requeue's lock on the job", || async {
        lock_waiters(&test_db).await == 2
    })
    .await;
    gate.commit().await.expect("open the gate");

    let report = requeue.await.expect("join").expect("requeue");
    assert_eq!(report.requeued, 1, "the job was running when requeue locked it");
    assert_eq!(cancel.await.expect("join"), 1, "cancel_job deleted the requeued row");
    assert_eq!(scalar(&test_db, "SELECT count(*) FROM task_outbox").await, 0);
    assert_eq!(texts(&test_db, "SELECT status FROM jobs").await, ["canceled"]);
}

/// A statement-level trigger that makes every INSERT into task_outbox wait, before its statement
/// ends, for advisory lock 4242 (the test's "gate").
async fn hold_inserts_on_gate(test_db: &TestDb) {
    exec(
        test_db,
        "CREATE FUNCTION hold_after_insert() RETURNS trigger LANGUAGE plpgsql AS $$ \
         BEGIN PERFORM pg_advisory_xact_lock(4242); RETURN NULL; END $$",
    )
    .await;
    exec(
        test_db,
        "CREATE TRIGGER hold AFTER INSERT ON task_outbox FOR EACH STATEMENT EXECUTE FUNCTION hold_after_insert()",
    )
    .await;
}

/// The NULL documented on `enqueue_task`: its INSERT conflicts with a row that a sweeper then
/// dispatches (deletes) before the function's SELECT reads it back. A statement-level trigger holds
/// the function between the two statements so the interleaving is deterministic.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enqueue_task_returns_null_when_the_conflicting_row_is_dispatched_before_it_is_read_back() {
    let test_db = TestDb::new().await;
    assert!(scalar(&test_db, "SELECT enqueue_task('x', 'q', '{}')").await > 0);
    hold_inserts_on_gate(&test_db).await;

    let mut gate_conn = test_db.db.get().await.expect("conn");
    let gate = db::begin(
        &mut gate_conn,
        db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) },
    )
    .await
    .expect("begin");
    gate.fetch_one("SELECT 1::int4 FROM pg_advisory_xact_lock(4242)", &[]).await.expect("take the gate");

    let enqueue = tokio::spawn({
        let db = test_db.db.clone();
        async move {
            let conn = db.get().await.expect("conn");
            let row = conn.fetch_one("SELECT enqueue_task('x', 'q', '{\"again\": true}')", &[]).await;
            row.expect("enqueue_task").get::<_, Option<i64>>(0)
        }
    });
    eventually(Duration::from_secs(10), "enqueue_task to pass its INSERT", || async {
        lock_waiters(&test_db).await > 0
    })
    .await;
    // What a sweeper's DELETE_DISPATCHED does, committed while enqueue_task sits between statements.
    exec(&test_db, "DELETE FROM task_outbox WHERE task_id = 'x'").await;
    gate.commit().await.expect("open the gate");

    assert_eq!(enqueue.await.expect("join"), None, "NULL: the task was already dispatched");
    assert_eq!(scalar(&test_db, "SELECT count(*) FROM task_outbox").await, 0, "and nothing was enqueued");
}
