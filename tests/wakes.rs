//! The wake probe (`listen_probe`) in the real daemon: with a direct LISTEN connection NOTIFY
//! wakes are known to be delivered; with `database.listen_url` pointing at a transaction-mode
//! pgbouncer (LISTEN succeeds there and hears nothing) `/readyz` says `wakes: not_delivered`
//! within 10 s, the probe warns naming `database.listen_url`, and the outbox still drains by
//! polling.

mod common;

use std::process::Stdio;
use std::time::{Duration, Instant};

use common::pgbouncer::PgBouncer;
use common::process::{BIN, free_port, inherited_overrides, readyz, repo_path};
use common::{TestDb, eventually};
use fred::prelude::{ClientLike, SortedSetsInterface};
use worker::db::Exec;
use worker::redis::RedisConfig;

struct Daemon {
    child: tokio::process::Child,
    port: u16,
    /// The daemon's log (stdout).
    log: std::path::PathBuf,
    _dir: tempfile::TempDir,
}

/// `worker run` with `[outbox]` set to `outbox` (TOML lines) and LISTEN on `listen_url`.
fn start(test_db: &TestDb, redis: &RedisConfig, listen_url: &str, outbox: &str) -> Daemon {
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\nenv = \"test\"\nshutdown_timeout = \"10s\"\n\n[log]\nformat = \"json\"\n\n\
             [database]\nurl = \"{}\"\nlisten_url = \"{listen_url}\"\npool_size = 4\nmigrate_on_start = false\n\n\
             [redis]\nurl = \"{}\"\nprefix = \"{}\"\n\n[health]\nlisten = \"127.0.0.1:{port}\"\n\n\
             [outbox]\n{outbox}\n\n[listen]\nprobe_timeout = \"2s\"\n",
            test_db.url, redis.url, redis.prefix
        ),
    )
    .expect("write config");
    let log = dir.path().join("worker.log");
    let mut command = tokio::process::Command::new(BIN);
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    let child = command
        .args(["run", "--config", config.to_str().expect("utf-8 path")])
        .current_dir(repo_path(""))
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("start worker");
    Daemon { child, port, log, _dir: dir }
}

async fn wakes(port: u16) -> Option<String> {
    readyz(port).await.and_then(|(_, body)| body["wakes"].as_str().map(str::to_owned))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_direct_listen_connection_is_known_to_deliver_wakes() {
    let test_db = TestDb::new().await;
    let redis =
        RedisConfig { url: common::redis_url(), prefix: common::unique_prefix(), ..RedisConfig::default() };
    let mut daemon = start(&test_db, &redis, &test_db.url, "interval = \"1h\"");
    eventually(Duration::from_secs(10), "wakes: delivered", || async {
        wakes(daemon.port).await.as_deref() == Some("delivered")
    })
    .await;
    daemon.child.kill().await.expect("kill");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_listen_url_through_a_transaction_pooler_is_reported_and_the_outbox_still_drains() {
    let test_db = TestDb::new().await;
    let bouncer = PgBouncer::start(4).await;
    let redis =
        RedisConfig { url: common::redis_url(), prefix: common::unique_prefix(), ..RedisConfig::default() };
    let client = worker::redis::build(&redis).expect("client");
    client.init().await.expect("redis");
    let started = Instant::now();
    // An hour of fallback: only the fast interval can move the tasks, as wakes are not delivered.
    let outbox = "interval = \"200ms\"\nfallback_interval = \"1h\"";
    let mut daemon = start(&test_db, &redis, &bouncer.url(&test_db.name), outbox);

    eventually(Duration::from_secs(10), "wakes: not_delivered", || async {
        wakes(daemon.port).await.as_deref() == Some("not_delivered")
    })
    .await;
    let noticed = started.elapsed();
    println!("wakes: not_delivered {:.1} s after start", noticed.as_secs_f64());
    let log = std::fs::read_to_string(&daemon.log).expect("log");
    assert!(log.contains("database.listen_url"), "the warning names the key: {log}");

    // Nothing wakes the outbox now; its 200 ms polling (not the fallback) still moves every task.
    test_db
        .db
        .get()
        .await
        .expect("conn")
        .exec("SELECT count(enqueue_task('w' || g, 'wakes', '{}')) FROM generate_series(1, 50) g", &[])
        .await
        .expect("enqueue");
    let key = worker::redis::key(&redis.prefix, "sched", "wakes");
    eventually(Duration::from_secs(10), "50 tasks in Redis by polling", || {
        let (client, key) = (client.clone(), key.clone());
        async move { client.zcard::<u64, _>(key).await.is_ok_and(|n| n == 50) }
    })
    .await;
    daemon.child.kill().await.expect("kill");
}

/// The probe loop itself, in process: through a transaction-mode pgbouncer its NOTIFY never comes
/// back, the tick says `not_delivered` and `listen.wakes.not_delivered` counts it; on a direct
/// LISTEN connection the same probe is delivered and counts nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_probe_that_hears_nothing_is_counted_and_one_that_hears_its_notify_is_not() {
    use worker::health::Health;
    use worker::listen::Listener;
    use worker::runtime::{Loop, Tick};
    use worker::wakes::{Delivery, ListenConfig, Probe};

    let test_db = TestDb::new().await;
    let bouncer = PgBouncer::start(4).await;
    let config = ListenConfig { probe_timeout: Duration::from_millis(500), ..ListenConfig::default() };
    for (listen_url, expected, counted) in [
        (bouncer.url(&test_db.name), Delivery::NotDelivered, 1),
        (test_db.url.clone(), Delivery::Delivered, 0),
    ] {
        let metrics = common::metrics::MetricsProbe::new();
        let stop = tokio_util::sync::CancellationToken::new();
        let listener = Listener::default();
        listener.start(listen_url.as_str(), Health::default(), stop.clone());
        let probe = Probe::new(
            test_db.db.clone(),
            listener,
            Health::default(),
            uuid::Uuid::new_v4(),
            config.clone(),
            &metrics.meter(),
        );
        assert_eq!(probe.probe().await.expect("probe"), expected, "LISTEN on {listen_url}");
        probe.tick(&Tick::detached(&test_db.db)).await.expect("tick");
        assert_eq!(metrics.counter("listen.wakes.not_delivered", &[]).await, counted, "{listen_url}");
        stop.cancel();
    }
}

/// `Listener::on_connect` fires when the LISTEN connection comes up and again when it is
/// re-established after the server dropped it (what makes the probe run again at once).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_connect_fires_at_the_first_connection_and_after_each_reconnect() {
    use worker::health::Health;
    use worker::listen::Listener;

    let test_db = TestDb::new().await;
    let listener = Listener::default();
    let connected = listener.on_connect();
    let stop = tokio_util::sync::CancellationToken::new();
    listener.start(test_db.url.as_str(), Health::default(), stop.clone());
    tokio::time::timeout(Duration::from_secs(10), connected.notified()).await.expect("first connection");
    // A channel, so the listener holds a session the server can end.
    let _subscription = listener.subscribe("wakes_test").await;
    assert_eq!(test_db.terminate_listeners().await, 1);
    tokio::time::timeout(Duration::from_secs(10), connected.notified()).await.expect("reconnected");
    stop.cancel();
}

/// The LISTEN connection is lost for good (its backend terminated, its role no longer allowed to
/// log in): the outbox, which polled only every hour while wakes were delivered, returns to its
/// 200 ms interval at once, and a task enqueued afterwards (its NOTIFY heard by no one) reaches
/// Redis by polling.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_listen_connection_is_lost_the_outbox_polls_at_its_fast_interval_again() {
    let test_db = TestDb::new().await;
    let role = format!("worker_listen_{}", uuid::Uuid::new_v4().simple());
    test_db
        .db
        .get()
        .await
        .expect("conn")
        .exec(&format!("CREATE ROLE {role} LOGIN"), &[])
        .await
        .expect("role");
    let listen_url = format!("postgres://{role}@127.0.0.1:5432/{}", test_db.name);
    let redis =
        RedisConfig { url: common::redis_url(), prefix: common::unique_prefix(), ..RedisConfig::default() };
    let client = worker::redis::build(&redis).expect("client");
    client.init().await.expect("redis");
    let outbox = "interval = \"200ms\"\nfallback_interval = \"1h\"";
    let mut daemon = start(&test_db, &redis, &listen_url, outbox);
    eventually(Duration::from_secs(10), "wakes: delivered", || async {
        wakes(daemon.port).await.as_deref() == Some("delivered")
    })
    .await;

    let conn = test_db.db.get().await.expect("conn");
    conn.exec(&format!("ALTER ROLE {role} NOLOGIN"), &[]).await.expect("no more logins");
    assert_eq!(test_db.terminate_listeners().await, 1, "the daemon's one LISTEN connection");
    eventually(Duration::from_secs(10), "listener_connected: false", || async {
        readyz(daemon.port).await.is_some_and(|(_, body)| body["listener_connected"] == false)
    })
    .await;
    conn.exec("SELECT enqueue_task('lost-listen', 'wakes', '{}')", &[]).await.expect("enqueue");
    let key = worker::redis::key(&redis.prefix, "sched", "wakes");
    // Far below the hour of fallback: only the fast interval gets it there.
    eventually(Duration::from_secs(10), "the task in Redis by polling", || {
        let (client, key) = (client.clone(), key.clone());
        async move { client.zcard::<u64, _>(key).await.is_ok_and(|n| n == 1) }
    })
    .await;

    daemon.child.kill().await.expect("kill");
    let _ = daemon.child.wait().await;
    conn.exec(&format!("DROP ROLE {role}"), &[]).await.expect("drop role");
}
