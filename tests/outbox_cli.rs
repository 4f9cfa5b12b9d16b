//! `worker outbox …` end to end: the real binary against a real database, tables by default and
//! JSON with `--json`.

mod common;

use std::process::Output;

use common::TestDb;
use common::process::{cli, json, stdout};
use worker::db::Exec;

fn worker(test_db: &TestDb, args: &[&str]) -> Output {
    cli(&test_db.url, args)
}

async fn exec(test_db: &TestDb, sql: &str) {
    test_db.db.get().await.expect("conn").exec(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn scalar(test_db: &TestDb, sql: &str) -> i64 {
    test_db.db.get().await.expect("conn").fetch_one(sql, &[]).await.expect("query").get(0)
}

/// Two queues of live rows (one retrying), and three dead letters: two recent, one 10 days old.
async fn seed(test_db: &TestDb) {
    exec(test_db, "SELECT count(enqueue_task('e' || g, 'emails', '{}')) FROM generate_series(1, 3) g").await;
    exec(test_db, "SELECT enqueue_task('later', 'builds', '{}', now() + interval '1 hour')").await;
    exec(test_db, "UPDATE task_outbox SET attempts = 2, last_error = 'WRONGTYPE x' WHERE task_id = 'e1'")
        .await;
    exec(test_db, "UPDATE task_outbox SET created_at = now() - interval '5 minutes' WHERE task_id = 'e2'")
        .await;
    exec(
        test_db,
        "INSERT INTO task_outbox_dead (id, original_id, task_id, job_id, queue, payload, run_at, attempts, \
         last_error, created_at, dead_lettered_at) VALUES \
         (101, 1, 'd1', 'job-1', 'emails', '{\"a\": 1}', now(), 10, 'ZADD p:sched:emails: WRONGTYPE Operation', now(), now()), \
         (102, 2, 'd2', NULL, 'builds', '{}', now(), 10, 'WRONGTYPE', now(), now() - interval '1 hour'), \
         (103, 3, 'd3', NULL, 'builds', '{}', now(), 10, 'WRONGTYPE', now(), now() - interval '10 days')",
    )
    .await;
}

#[tokio::test]
async fn stats_show_each_queue_and_the_totals_as_a_table_or_json() {
    let test_db = TestDb::new().await;
    seed(&test_db).await;

    let table = stdout(&worker(&test_db, &["outbox", "stats"]));
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("QUEUE") && lines[0].contains("OLDEST DUE"), "{table}");
    let row = |name: &str| -> Vec<String> {
        let line =
            lines.iter().find(|l| l.starts_with(name)).unwrap_or_else(|| panic!("no {name} row: {table}"));
        line.split_whitespace().map(str::to_owned).collect()
    };
    assert_eq!(row("builds")[1..4], ["1", "0", "0"], "{table}");
    assert_eq!(row("emails")[1..4], ["3", "3", "1"], "{table}");
    assert_eq!(row("emails").last().map(String::as_str), Some("1"), "one emails dead letter: {table}");
    assert_eq!(row("TOTAL")[1..4], ["4", "3", "1"], "{table}");
    assert!(row("emails")[4].starts_with("5m"), "oldest due age from created_at: {table}");

    let stats = json(&worker(&test_db, &["outbox", "stats", "--json"]));
    assert_eq!(stats["rows"], 4);
    assert_eq!(stats["due"], 3);
    assert_eq!(stats["dead"], 3);
    assert_eq!(stats["queues"].as_array().map(Vec::len), Some(2));
    assert!(stats["oldest_due_age_secs"].as_f64().is_some_and(|s| (299.0..400.0).contains(&s)), "{stats}");
}

#[tokio::test]
async fn dead_list_shows_the_newest_first_and_filters_by_queue() {
    let test_db = TestDb::new().await;
    seed(&test_db).await;

    let table = stdout(&worker(&test_db, &["outbox", "dead", "list"]));
    let ids: Vec<&str> = table.lines().skip(1).filter_map(|l| l.split_whitespace().next()).collect();
    assert_eq!(ids, ["101", "102", "103"], "{table}");
    assert!(table.contains("ZADD p:sched:emails: WRONGTYPE"), "{table}");
    assert!(table.contains("job-1"), "{table}");

    let listed = json(&worker(&test_db, &["outbox", "dead", "list", "--queue", "builds", "--json"]));
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["task_id"], "d2");
    assert_eq!(listed[0]["attempts"], 10);

    let empty = stdout(&worker(&test_db, &["outbox", "dead", "list", "--queue", "nope"]));
    assert!(empty.contains("(no dead letters)"), "{empty}");
}

#[tokio::test]
async fn dead_requeue_by_id_or_all_resets_attempts_and_makes_rows_due_now() {
    let test_db = TestDb::new().await;
    seed(&test_db).await;

    let out = stdout(&worker(&test_db, &["outbox", "dead", "requeue", "--id", "101", "999"]));
    assert!(out.contains("requeued 1 dead letter"), "{out}");
    assert!(out.contains("not found: 999"), "{out}");
    assert_eq!(
        scalar(&test_db, "SELECT count(*) FROM task_outbox WHERE task_id = 'd1' AND attempts = 0 AND run_at <= now() AND job_id = 'job-1'").await,
        1
    );
    assert_eq!(scalar(&test_db, "SELECT count(*) FROM task_outbox_dead").await, 2);

    // d2's task id is back in the outbox already (re-enqueued): its dead copy is just removed.
    exec(&test_db, "SELECT enqueue_task('d2', 'builds', '{\"fresh\": true}')").await;
    let report = json(&worker(&test_db, &["outbox", "dead", "requeue", "--all", "--json"]));
    assert_eq!(report["removed"], 2);
    assert_eq!(report["requeued"], 1);
    assert_eq!(scalar(&test_db, "SELECT count(*) FROM task_outbox_dead").await, 0);
    assert_eq!(
        scalar(&test_db, "SELECT count(*) FROM task_outbox WHERE task_id = 'd2' AND payload ? 'fresh'").await,
        1
    );

    let usage = worker(&test_db, &["outbox", "dead", "requeue"]);
    assert_eq!(usage.status.code(), Some(2), "neither --id nor --all is a usage error");
    let both = worker(&test_db, &["outbox", "dead", "requeue", "--all", "--id", "1"]);
    assert_eq!(both.status.code(), Some(2), "--id and --all together is a usage error");
}

/// Two copies of one task (the newest comes back, the older is removed) and dead letters of jobs
/// that are over (kept, and the output says so and why).
#[tokio::test]
async fn dead_requeue_reports_superseded_copies_and_skipped_dead_letters_of_finished_jobs() {
    let test_db = TestDb::new().await;
    let seed = "INSERT INTO jobs (id, status) VALUES ('live', 'running'), ('gone', 'running'), ('done', 'completed'); \
         INSERT INTO task_outbox_dead (id, original_id, task_id, job_id, queue, payload, run_at, attempts, \
         last_error, created_at) VALUES \
         (1, 1, 't', 'live', 'q', '{\"v\": \"old\"}', now(), 10, 'WRONGTYPE', now()), \
         (2, 2, 't', 'live', 'q', '{\"v\": \"new\"}', now(), 10, 'WRONGTYPE', now()), \
         (3, 3, 'g1', 'gone', 'q', '{}', now(), 10, 'WRONGTYPE', now()), \
         (4, 4, 'g2', 'gone', 'q', '{}', now(), 10, 'WRONGTYPE', now()), \
         (5, 5, 'd1', 'done', 'q', '{}', now(), 10, 'WRONGTYPE', now()); \
         SELECT cancel_job('gone')";
    for statement in seed.split("; ") {
        exec(&test_db, statement).await;
    }

    let out = stdout(&worker(&test_db, &["outbox", "dead", "requeue", "--id", "1", "2", "3", "5"]));
    assert!(out.contains("requeued 1 dead letter"), "{out}");
    assert!(out.contains("removed 1 older dead letter(s) superseded by a newer copy"), "{out}");
    assert!(
        out.contains(
            "skipped 2 dead letter(s) whose job is over (canceled: 1, completed: 1); kept as dead letters"
        ),
        "{out}"
    );
    assert!(!out.contains("not found"), "a skipped id is not 'not found': {out}");
    assert_eq!(
        scalar(&test_db, "SELECT count(*) FROM task_outbox WHERE task_id = 't' AND payload->>'v' = 'new'")
            .await,
        1
    );
    assert_eq!(scalar(&test_db, "SELECT sum(id)::int8 FROM task_outbox_dead").await, 3 + 4 + 5);

    let report = json(&worker(&test_db, &["outbox", "dead", "requeue", "--all", "--json"]));
    assert_eq!(report["removed"], 0, "{report}");
    assert_eq!(report["requeued"], 0, "{report}");
    assert_eq!(report["superseded"], 0, "{report}");
    assert_eq!(report["already_pending"], 0, "{report}");
    assert_eq!(report["skipped"], 3, "{report}");
    assert_eq!(
        report["skipped_by_job_status"],
        serde_json::json!({ "canceled": 2, "completed": 1 }),
        "{report}"
    );
    assert_eq!(report["not_found"], serde_json::json!([]), "{report}");
    assert_eq!(scalar(&test_db, "SELECT count(*) FROM task_outbox_dead").await, 3);
}

#[tokio::test]
async fn dead_purge_deletes_only_dead_letters_older_than_the_duration() {
    let test_db = TestDb::new().await;
    seed(&test_db).await;
    let out = stdout(&worker(&test_db, &["outbox", "dead", "purge", "--older-than", "7d"]));
    assert!(out.contains("purged 1 dead letter"), "{out}");
    let ids = scalar(&test_db, "SELECT sum(id)::int8 FROM task_outbox_dead").await;
    assert_eq!(ids, 101 + 102);
    let report = json(&worker(&test_db, &["outbox", "dead", "purge", "--older-than", "30m", "--json"]));
    assert_eq!(report["purged"], 1);
    let bad = worker(&test_db, &["outbox", "dead", "purge", "--older-than", "a while"]);
    assert_eq!(bad.status.code(), Some(2), "a bad duration is a usage error");
}
