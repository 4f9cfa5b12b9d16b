//! Reliability requirement 1 (docs/reliability.md#requirements): `kill -9` of a replica in the
//! middle of draining the outbox loses nothing — every task ends in Redis or in the outbox, and a
//! replica started afterwards finishes the job with each task scheduled exactly once.

mod common;
mod outbox_support;

use std::collections::BTreeSet;
use std::process::Stdio;
use std::time::Duration;

use common::process::{BIN, free_port, inherited_overrides, repo_path};
use common::{TestDb, eventually};
use fred::prelude::SortedSetsInterface;
use outbox_support::connected;
use worker::config::Config;
use worker::db::Exec;

const TASKS: i64 = 20_000;
const QUEUES: [&str; 2] = ["q0", "q1"];
const LIMIT: Duration = Duration::from_secs(30);

fn start(config: &std::path::Path) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(BIN);
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .current_dir(repo_path(""))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start worker")
}

async fn in_redis(redis: &fred::prelude::Client, config: &Config) -> BTreeSet<String> {
    let mut ids = BTreeSet::new();
    for queue in QUEUES {
        let key = worker::redis::key(&config.redis.prefix, "sched", queue);
        let members: Vec<String> = redis.zrange(key, 0, -1, None, false, None, false).await.expect("zrange");
        ids.extend(members);
    }
    ids
}

async fn in_outbox(test_db: &TestDb) -> BTreeSet<String> {
    let conn = test_db.db.get().await.expect("conn");
    let rows = conn.fetch_all("SELECT task_id FROM task_outbox", &[]).await.expect("outbox");
    rows.iter().map(|r| r.get(0)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_sweep_loses_nothing_and_the_next_replica_finishes_exactly_once() {
    let test_db = TestDb::new().await;
    let config = test_db.config();
    let redis = connected(&config.redis).await;
    let dir = tempfile::tempdir().expect("dir");
    let path = dir.path().join("worker.toml");
    std::fs::write(
        &path,
        format!(
            "[database]\nurl = \"{}\"\npool_size = 4\nmigrate_on_start = false\n\n\
             [redis]\nurl = \"{}\"\nprefix = \"{}\"\n\n[health]\nlisten = \"127.0.0.1:{}\"\n\n\
             [outbox]\nbatch_size = 50\n",
            test_db.url,
            config.redis.url,
            config.redis.prefix,
            free_port()
        ),
    )
    .expect("config");
    let conn = test_db.db.get().await.expect("conn");
    conn.exec(
        "SELECT count(enqueue_task('task-' || g, 'q' || (g % 2), jsonb_build_object('n', g))) \
         FROM generate_series(1, 20000) g",
        &[],
    )
    .await
    .expect("enqueue");
    let all: BTreeSet<String> = (1..=TASKS).map(|g| format!("task-{g}")).collect();

    // Kill the first replica once it has dispatched some tasks but not all of them.
    let mut first = start(&path);
    eventually(LIMIT, "the first replica to be part-way through the outbox", || async {
        !in_redis(&redis, &config).await.is_empty()
    })
    .await;
    first.start_kill().expect("SIGKILL");
    first.wait().await.expect("reaped");
    let (sent, left) = (in_redis(&redis, &config).await, in_outbox(&test_db).await);
    assert!(!left.is_empty(), "the kill came too late to be mid-drain; enqueue more tasks");
    let accounted: BTreeSet<String> = sent.union(&left).cloned().collect();
    assert_eq!(accounted, all, "every task is in Redis or still in the outbox");

    // A new replica drains the rest; re-sends of rows the killed sweep had written are idempotent.
    let mut second = start(&path);
    eventually(LIMIT, "the second replica to drain the outbox", || async {
        in_outbox(&test_db).await.is_empty()
    })
    .await;
    second.start_kill().expect("stop");
    let mut total = 0;
    for queue in QUEUES {
        let key = worker::redis::key(&config.redis.prefix, "sched", queue);
        let n: i64 = redis.zcard(key).await.expect("zcard");
        total += n;
    }
    assert_eq!(total, TASKS, "each task scheduled exactly once");
    assert_eq!(in_redis(&redis, &config).await, all);
    let dead = conn.fetch_one("SELECT count(*)::int8 FROM task_outbox_dead", &[]).await.expect("dead");
    assert_eq!(dead.get::<_, i64>(0), 0, "nothing dead-lettered");
}
