//! The outbox and counters loops inside the real daemon (`worker run`): wired, woken by
//! `enqueue_task`'s NOTIFY, visible on /readyz, pausable by name, drained on SIGTERM.

mod common;

use std::time::Duration;

use common::process::{BIN, free_port, readyz, start_worker};
use common::{TestDb, eventually};
use fred::prelude::{ClientLike, HashesInterface, SortedSetsInterface};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use worker::db::Exec;
use worker::redis::RedisConfig;

const LIMIT: Duration = Duration::from_secs(10);

fn loop_field(body: &serde_json::Value, name: &str, field: &str) -> serde_json::Value {
    body["loops"]
        .as_array()
        .and_then(|loops| loops.iter().find(|l| l["name"] == name))
        .map(|l| l[field].clone())
        .unwrap_or(serde_json::Value::Null)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_sweeps_enqueued_tasks_at_once_and_syncs_counters() {
    let test_db = TestDb::new().await;
    let redis_config =
        RedisConfig { url: common::redis_url(), prefix: common::unique_prefix(), ..RedisConfig::default() };
    let redis = worker::redis::build(&redis_config).expect("client");
    redis.init().await.expect("redis");
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = dir.path().join("worker.toml");
    // The outbox polls hourly: a task that arrives in seconds was woken by NOTIFY.
    std::fs::write(
        &config,
        format!(
            "[app]\nenv = \"test\"\nshutdown_timeout = \"10s\"\n\n[log]\nformat = \"json\"\n\n\
             [database]\nurl = \"{}\"\npool_size = 4\nmigrate_on_start = false\n\n\
             [redis]\nurl = \"{}\"\nprefix = \"{}\"\n\n[health]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [outbox]\ninterval = \"1h\"\n\n[counters]\ninterval = \"200ms\"\n",
            test_db.url, redis_config.url, redis_config.prefix
        ),
    )
    .expect("write config");

    let mut child = start_worker(&config, &[], &dir.path().join("worker.log"));

    eventually(LIMIT, "/readyz to answer 200 with the outbox and counters loops", || async {
        readyz(port).await.is_some_and(|(status, body)| {
            status == 200
                && loop_field(&body, "outbox", "ready") == true
                && loop_field(&body, "counters", "ready") == true
                && body["listener_connected"] == true
        })
    })
    .await;

    let conn = test_db.db.get().await.expect("conn");
    conn.exec("SELECT count(enqueue_task('d' || g, 'daemon', '{}')) FROM generate_series(1, 100) g", &[])
        .await
        .expect("enqueue");
    let key = worker::redis::key(&redis_config.prefix, "sched", "daemon");
    eventually(LIMIT, "100 tasks in the sorted set", || {
        let (redis, key) = (redis.clone(), key.clone());
        async move { redis.zcard::<u64, _>(key).await.is_ok_and(|n| n == 100) }
    })
    .await;

    conn.exec("INSERT INTO jobs (id, status) VALUES ('job-1', 'running')", &[]).await.expect("job");
    let _: () = redis.hset(format!("{}:running", redis_config.prefix), ("job-1", "4")).await.expect("hset");
    eventually(LIMIT, "jobs.running_tasks to follow the Redis counter", || {
        let db = test_db.db.clone();
        async move {
            let conn = db.get().await.expect("conn");
            let row =
                conn.fetch_one("SELECT running_tasks FROM jobs WHERE id = 'job-1'", &[]).await.expect("job");
            row.get::<_, i32>(0) == 4
        }
    })
    .await;

    let pause = std::process::Command::new(BIN)
        .args(["loop", "pause", "outbox", "--database-url", &test_db.url])
        .output()
        .expect("worker loop pause");
    assert!(pause.status.success(), "{}", String::from_utf8_lossy(&pause.stderr));
    conn.exec("SELECT enqueue_task('while-paused', 'daemon', '{}')", &[]).await.expect("enqueue");
    eventually(LIMIT, "the outbox loop to show paused", || async {
        readyz(port).await.is_some_and(|(_, body)| loop_field(&body, "outbox", "paused") == true)
    })
    .await;
    let pending =
        conn.fetch_one("SELECT count(*) FROM task_outbox", &[]).await.expect("count").get::<_, i64>(0);
    assert_eq!(pending, 1, "a paused outbox loop dispatches nothing");

    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(LIMIT, child.wait()).await.expect("exits in time").expect("wait");
    assert!(status.success(), "exit status {status:?}");
}
