//! The `retention` loop against real PostgreSQL: dead letters past `outbox.dead_retention` and
//! audit rows past `audit.retention` go in batches, oldest first, newer rows stay, and each tick
//! records what it removed for `worker status`.

mod common;

use std::time::Duration;

use common::TestDb;
use common::process::cli;
use worker::db::{Db, Exec};
use worker::retention::{Retention, RetentionConfig};
use worker::runtime::{Loop, Progress, Tick};

async fn exec(db: &Db, sql: &str) {
    db.get().await.expect("conn").exec(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

async fn count(db: &Db, sql: &str) -> i64 {
    db.get().await.expect("conn").fetch_one(sql, &[]).await.expect(sql).get(0)
}

#[tokio::test]
async fn rows_past_their_retention_go_in_batches_and_each_tick_is_recorded() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    // 25 dead letters 40 days old and 5 of yesterday; 12 audit rows 200 days old and 3 recent.
    exec(
        db,
        "INSERT INTO task_outbox_dead (original_id, task_id, queue, payload, run_at, attempts, created_at, dead_lettered_at) \
         SELECT g, 't' || g, 'q', '{}', now(), 10, now(), \
                now() - CASE WHEN g <= 25 THEN interval '40 days' ELSE interval '1 day' END \
         FROM generate_series(1, 30) AS g",
    )
    .await;
    exec(
        db,
        "INSERT INTO operator_actions (actor, command, outcome, at) \
         SELECT 'ops', 'loop pause', 'ok', \
                now() - CASE WHEN g <= 12 THEN interval '200 days' ELSE interval '1 day' END \
         FROM generate_series(1, 15) AS g",
    )
    .await;
    let config = RetentionConfig { batch_size: 10, ..RetentionConfig::default() };
    let retention = Retention::new(
        db.clone(),
        config,
        Duration::from_secs(30 * 86_400),
        Duration::from_secs(180 * 86_400),
    );

    let mut ticks = Vec::new();
    loop {
        let progress = retention.tick(&Tick::detached(db)).await.expect("tick");
        ticks.push((
            count(db, "SELECT count(*)::int8 FROM task_outbox_dead").await,
            count(db, "SELECT count(*)::int8 FROM operator_actions").await,
        ));
        if progress == Progress::Done {
            break;
        }
        assert!(ticks.len() < 10, "drains: {ticks:?}");
    }
    // Ten of each per tick while there are more; a short batch ends the drain.
    assert_eq!(ticks, [(20, 5), (10, 3), (5, 3)], "rows left after each tick");
    assert_eq!(
        count(
            db,
            "SELECT count(*)::int8 FROM task_outbox_dead WHERE dead_lettered_at < now() - interval '2 days'"
        )
        .await,
        0
    );

    let out = cli(&test_db.url, &["status", "--json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let status: serde_json::Value = serde_json::from_slice(&out.stdout).expect("json");
    let runs: Vec<(String, i64, i64)> = status["retention"]
        .as_array()
        .expect("retention runs")
        .iter()
        .map(|r| {
            (
                r["table"].as_str().unwrap_or_default().to_owned(),
                r["last_removed"].as_i64().unwrap_or(-1),
                r["total_removed"].as_i64().unwrap_or(-1),
            )
        })
        .collect();
    assert_eq!(runs, [("operator_actions".into(), 0, 12), ("task_outbox_dead".into(), 5, 25)]);
    let out = cli(&test_db.url, &["status"]);
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("task_outbox_dead") && text.contains("removed 5 (25 in all)"), "{text}");
}
