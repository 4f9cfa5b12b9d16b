//! Reliability suite, scenario 6 (docs/reliability.md, `scripts/chaos.sh`): the network path to
//! PostgreSQL freezes for 20 s — half-open, no RST, no FIN — under a worker running every loop
//! that needs no outside service. Every tick stays bounded by its timeout, the pool recovers
//! when the path thaws, and no loop wedges.
//!
//! Scenario 6b: the path goes silent for 60 s — every packet dropped, nothing acknowledged — and
//! every connection the worker had on it notices by itself (keepalives, `tcp_user_timeout`)
//! within `keepalives_idle + tcp_user_timeout`, while a connection with the driver's defaults
//! does not notice at all; the worker is ready within 5 s of the path returning and nothing is
//! lost.

mod chaos_support;
mod chats_support;
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chaos_support::silent_path::SilentPath;
use chaos_support::{
    FreezingProxy, LIMIT, Replica, WorkerConfig, agent, redis_client, report, scalar, scenario_dir,
};
use common::{TestDb, eventually};
use worker::db::{self, Db, Exec};

const FREEZE: Duration = Duration::from_secs(20);
const TICK_TIMEOUT: &str = "5s";

/// Each loop's tick count and last outcome, from /readyz.
async fn loops(replica: &Replica) -> BTreeMap<String, (u64, String)> {
    let (_, body) = replica.readyz().await.expect("/readyz answers");
    body["loops"]
        .as_array()
        .expect("loops")
        .iter()
        .map(|l| {
            let name = l["name"].as_str().expect("name").to_owned();
            let ticks = l["ticks"].as_u64().expect("ticks");
            let outcome = l["last_outcome"].as_str().unwrap_or("").to_owned();
            (name, (ticks, outcome))
        })
        .collect()
}

/// A worker running every loop that needs no outside service, its database connections (pool,
/// lease and LISTEN) through `url`, every tick bounded by [`TICK_TIMEOUT`] and every checkout,
/// connect and statement by 2 s.
fn every_loop_through(test_db: &TestDb, url: &str, dir: &std::path::Path) -> WorkerConfig {
    let quick_agent = agent(
        dir,
        "agent",
        "cat >/dev/null\necho '{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"hi\"}'",
    );
    let mut config = WorkerConfig::for_test(test_db)
        .set("database.url", url)
        .set("database.listen_url", url)
        .set("database.connect_timeout", "2s")
        .set("database.acquire_timeout", "2s")
        .set("database.statement_timeout", "2s")
        .set("outbox.enabled", true)
        .set("counters.enabled", true)
        .set("counters.interval", "500ms")
        .set("chats.enabled", true)
        .set("chats.acquire_interval", "200ms")
        // Short fallbacks: the scenario bounds recovery, and the slow cadence must not hide in it.
        .set("chats.acquire_fallback_interval", "1s")
        .set("outbox.fallback_interval", "1s")
        .set("prebuilds.fallback_interval", "1s")
        .set("runtime.controls_fallback_refresh", "1s")
        .set("chats.heartbeat_interval", "1s")
        .set("chats.recover_interval", "1s")
        .set("chats.runner.command", vec![quick_agent])
        .set("prebuilds.enabled", true)
        .set("prebuilds.interval", "1s")
        .set("gitsync.enabled", true)
        .set("gitsync.interval", "1s")
        .set("retention.interval", "1s")
        .set("listen.probe_interval", "1s")
        .set("listen.probe_timeout", "500ms");
    for key in [
        "outbox.tick_timeout",
        "counters.tick_timeout",
        "prebuilds.tick_timeout",
        "gitsync.tick_timeout",
        "chats.acquire_tick_timeout",
        "chats.recover_tick_timeout",
        "retention.tick_timeout",
    ] {
        config = config.set(key, TICK_TIMEOUT);
    }
    config
}

/// A pool of `size` through `proxy`, connects and checkouts bounded by 1 s.
fn through_proxy(test_db: &TestDb, proxy: &FreezingProxy, size: usize) -> worker::db::DatabaseConfig {
    let url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, test_db.name);
    worker::db::DatabaseConfig {
        connect_timeout: Duration::from_secs(1),
        acquire_timeout: Duration::from_secs(1),
        ..TestDb::database_config_for(&url, size)
    }
}

/// Work that arrives during a fault, straight to PostgreSQL (not through the faulty path): 1,000
/// tasks in the outbox and a pending chat, whose id is returned.
async fn work_arrives(test_db: &TestDb) -> uuid::Uuid {
    test_db
        .db
        .get()
        .await
        .expect("conn")
        .exec(
            "SELECT count(enqueue_task('task-' || g, 'q', '{}'::jsonb)) FROM generate_series(1, 1000) g",
            &[],
        )
        .await
        .expect("enqueue");
    chats_support::pending_chat(&test_db.db, "hello").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_6_a_frozen_network_path_bounds_every_tick_and_every_loop_recovers() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let proxy = FreezingProxy::start("127.0.0.1:5432").await;
    let through_proxy = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, test_db.name);
    let config = every_loop_through(&test_db, &through_proxy, dir.path());
    let mut replica = Replica::start(dir.path(), "replica", &config);
    replica.ready().await;
    let before = loops(&replica).await;

    proxy.freeze();
    let frozen_at = Instant::now();
    // Work arrives during the freeze (straight to PostgreSQL, not through the frozen path).
    let chat = work_arrives(&test_db).await;
    eventually(LIMIT, "/readyz to report the frozen database", || async {
        matches!(replica.readyz().await, Some((503, _)))
    })
    .await;
    let unready_after = frozen_at.elapsed();
    // Ticks keep ending (by their timeout) while the path is frozen: a wedged loop's count stops.
    let mid = loops(&replica).await;
    tokio::time::sleep(FREEZE.saturating_sub(frozen_at.elapsed())).await;
    let during = loops(&replica).await;
    replica.assert_alive();
    let wedged_during: Vec<&String> =
        during.iter().filter(|(name, (ticks, _))| *ticks <= mid[*name].0).map(|(name, _)| name).collect();
    let timeouts = during.values().filter(|(_, outcome)| outcome != "ok").count();

    proxy.thaw();
    let thawed_at = Instant::now();
    let unready = replica.ready().await;
    let ready_after = thawed_at.elapsed();
    eventually(LIMIT, "the outbox to drain after the thaw", || async {
        scalar(&test_db.db, "SELECT count(*)::int8 FROM task_outbox").await == 0
    })
    .await;
    eventually(LIMIT, "the chat sent during the freeze to be answered", || async {
        chats_support::chat(&test_db.db, chat).await.status == "waiting"
    })
    .await;
    let after = loops(&replica).await;
    let stuck_after: Vec<&String> =
        after.iter().filter(|(name, (ticks, _))| *ticks <= during[*name].0).map(|(name, _)| name).collect();
    let dead = scalar(&test_db.db, "SELECT count(*)::int8 FROM task_outbox_dead").await;
    let lost = 1000 - outbox_in_redis(&config).await;
    report(
        6,
        "network-freeze",
        &[
            ("loops", before.len().to_string()),
            ("freeze_s", FREEZE.as_secs().to_string()),
            ("proxy_connections", proxy.connections().to_string()),
            ("unready_after_s", format!("{:.1}", unready_after.as_secs_f64())),
            ("loops_not_ok_at_thaw", timeouts.to_string()),
            ("wedged_during", wedged_during.len().to_string()),
            ("wedged_after", stuck_after.len().to_string()),
            ("ready_after_thaw_s", format!("{:.1}", ready_after.as_secs_f64())),
            ("dead_lettered", dead.to_string()),
            ("lost", lost.to_string()),
        ],
    );
    assert!(wedged_during.is_empty(), "loops whose ticks stopped ending while frozen: {wedged_during:?}");
    assert!(stuck_after.is_empty(), "loops that did not tick after the thaw: {stuck_after:?}");
    // Every loop retries within seconds once a tick failed: the next checkout verifies its
    // warm connection, the check and the new connect fail, the database reads as unreachable.
    assert!(
        ready_after <= READY_AFTER_RESTORE,
        "ready {ready_after:?} after the thaw; last /readyz before: {unready:#?}"
    );
    assert_eq!((lost, dead), (0, 0));
    assert_eq!(replica.sigterm(LIMIT).await.code(), Some(0));
}

/// Tasks of the scenario's queue that reached Redis.
async fn outbox_in_redis(config: &WorkerConfig) -> i64 {
    use fred::prelude::SortedSetsInterface;
    let client = redis_client(&common::redis_url()).await;
    client.zcard(worker::redis::key(&config.redis_prefix(), "sched", "q")).await.expect("zcard")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pool_checkout_on_a_frozen_path_ends_within_its_timeouts() {
    let test_db = TestDb::new().await;
    let proxy = FreezingProxy::start("127.0.0.1:5432").await;
    let config = worker::db::DatabaseConfig {
        // Every checkout is checked (the default checks only connections idle for 30 s: see
        // `a_warm_connection_is_handed_out_without_a_round_trip_unless_a_failed_tick_doubted_the_pool`).
        verify_after_idle: Duration::ZERO,
        ..through_proxy(&test_db, &proxy, 2)
    };
    let db = Db::new(&config).expect("pool");
    // One pooled connection, idle, then the path freezes under it.
    scalar(&db, "SELECT 1::int8").await;
    proxy.freeze();
    let started = Instant::now();
    let checkout = tokio::time::timeout(Duration::from_secs(15), db.get()).await;
    let took = started.elapsed();
    assert!(checkout.is_ok(), "the checkout still waits after {took:?}: the recycle check has no bound");
    assert!(checkout.expect("ended").is_err(), "no connection can be had while the path is frozen");
    proxy.thaw();
    assert_eq!(scalar(&db, "SELECT 1::int8").await, 1, "the pool serves again after the thaw");
}

/// What the default `database.verify_after_idle` buys a quiet replica: a connection used within
/// it is handed out on its open socket, with no round trip (none could cross a frozen path), so
/// no empty-query transaction per checkout. (A connection the server closed is still replaced:
/// `tests/runtime.rs`, `a_loop_recovers_by_itself_after_its_database_connections_are_killed`.)
/// And its limit: after a failed tick the runtime doubts the pool (`Db::verify_next_checkout`),
/// so the warm connection a frozen path would hang is checked, fails, and the pool's attempt to
/// connect anew fails too, which marks the database unreachable (loops then retry within
/// seconds). Once a checkout proves the path, warm connections go out unchecked again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_warm_connection_is_handed_out_without_a_round_trip_unless_a_failed_tick_doubted_the_pool() {
    let test_db = TestDb::new().await;
    let proxy = FreezingProxy::start("127.0.0.1:5432").await;
    let config = through_proxy(&test_db, &proxy, 1);
    assert!(config.verify_after_idle >= Duration::from_secs(1), "the default checks only idle connections");
    let db = Db::new(&config).expect("pool");
    scalar(&db, "SELECT 1::int8").await;
    let warm_checkout = async || tokio::time::timeout(Duration::from_millis(500), db.get()).await;

    proxy.freeze();
    let warm = warm_checkout().await.expect("a warm checkout does not wait on the network");
    assert!(warm.is_ok(), "the connection used a moment ago is handed out without a check");
    drop(warm);
    db.verify_next_checkout();
    let checkout = tokio::time::timeout(Duration::from_secs(10), db.get()).await.expect("bounded checkout");
    assert!(checkout.is_err(), "the doubted warm connection was handed out on a frozen path");
    assert!(db.unreachable(), "the failed check made the pool connect, and that failed too");
    proxy.thaw();
    assert_eq!(scalar(&db, "SELECT 1::int8").await, 1, "a new connection after the thaw");
    assert!(!db.unreachable());

    proxy.freeze();
    let warm = warm_checkout().await.expect("no check once a connection proved the path");
    assert!(warm.is_ok(), "the warm connection goes out unchecked again");
    drop(warm);
    proxy.thaw();
}

/// A transaction the path cut off after it took a row lock: PostgreSQL, which cannot tell that
/// its client is gone (the path is silent, its own socket looks healthy), ends the transaction
/// once it has idled `database.idle_in_transaction_timeout`, so the lock does not outlive the
/// path. Without that bound the lock stays until the server's TCP notices, hours by default: here,
/// the other transaction's `lock_timeout` would end it with an error.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_transaction_cut_off_by_a_silent_path_releases_its_locks_after_the_idle_bound() {
    let test_db = TestDb::new().await;
    let mut path = SilentPath::start("127.0.0.1:5432").await;
    let url = format!("postgres://postgres@127.0.0.1:{}/{}", path.port, test_db.name);
    let idle = Duration::from_secs(2);
    let config = worker::db::DatabaseConfig {
        idle_in_transaction_timeout: idle,
        ..TestDb::database_config_for(&url, 1)
    };
    let db = Db::new(&config).expect("pool");
    let direct = &test_db.db;
    direct
        .get()
        .await
        .expect("conn")
        .batch_execute("CREATE TABLE contested (id int PRIMARY KEY, n int NOT NULL); INSERT INTO contested VALUES (1, 0)")
        .await
        .expect("table");
    const TAKE_ROW: &str = "UPDATE contested SET n = n + 1 WHERE id = 1";
    let mut cut_off = db.get().await.expect("conn through the path");
    let held = db::begin(&mut cut_off, db.tx_limits()).await.expect("begin");
    held.exec(TAKE_ROW, &[]).await.expect("the row is taken");

    path.silence();
    let silenced_at = Instant::now();
    let mut waiting = direct.get().await.expect("direct conn");
    let limits = db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) };
    let tx = db::begin(&mut waiting, limits).await.expect("begin");
    tx.batch_execute("SET LOCAL lock_timeout = '20s'").await.expect("lock_timeout");
    let taken = tx.exec(TAKE_ROW, &[]).await;
    let waited = silenced_at.elapsed();
    db::commit(tx).await.expect("commit");
    eprintln!(
        "a cut-off transaction's lock was released {:.1}s after the silence (idle bound {idle:?})",
        waited.as_secs_f64()
    );
    assert_eq!(taken.expect("the row is free once the server ends the cut-off transaction"), 1);
    let n = scalar(direct, "SELECT n::int8 FROM contested").await;
    assert_eq!(n, 1, "the cut-off transaction was rolled back, not committed");
    path.restore();
    drop(held);
}

const SILENCE: Duration = Duration::from_secs(60);
/// The socket settings of scenario 6b: short, so every connection notices well inside the
/// silence. A connection notices within `keepalives_idle + tcp_user_timeout`.
const KEEPALIVES_IDLE: Duration = Duration::from_secs(5);
const TCP_USER_TIMEOUT: Duration = Duration::from_secs(10);
/// How soon after the path returns the worker must be ready (acceptance 6).
const READY_AFTER_RESTORE: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_6b_a_silent_path_is_noticed_by_every_connection_and_the_worker_is_ready_within_5s() {
    let test_db = TestDb::new().await;
    let dir = scenario_dir();
    let mut path = SilentPath::start("127.0.0.1:5432").await;
    let through_path = format!("postgres://postgres@127.0.0.1:{}/{}", path.port, test_db.name);
    let config = every_loop_through(&test_db, &through_path, dir.path())
        .set("database.keepalives_idle", humantime::format_duration(KEEPALIVES_IDLE).to_string())
        .set("database.keepalives_interval", "2s")
        .set("database.keepalives_retries", 3i64)
        .set("database.tcp_user_timeout", humantime::format_duration(TCP_USER_TIMEOUT).to_string())
        // A transaction the silence cuts off holds its row locks on the server until this
        // bound: well inside the silence, above the 5 s ticks that keep a transaction open.
        .set("database.idle_in_transaction_timeout", "10s");
    let mut replica = Replica::start(dir.path(), "replica", &config);
    replica.ready().await;
    // A connection with the driver's defaults (keepalive after 2 h, no user timeout), idle on
    // the same path: the control that shows the silence is real and noticing it is not free.
    let (control, control_driver) =
        tokio_postgres::connect(&format!("{through_path}?sslmode=disable"), tokio_postgres::NoTls)
            .await
            .expect("control connection");
    let control_driver = tokio::spawn(control_driver);
    control.simple_query("SELECT 1").await.expect("control answers");
    let test_pid = std::process::id() as i32;
    let control_ports: Vec<u16> = path.connections_of(test_pid).into_keys().collect();
    assert_eq!(control_ports.len(), 1, "the test holds one connection on the path");
    // Every connection the worker holds on the path when it goes silent (pool, lease, LISTEN).
    eventually(LIMIT, "the LISTEN connection to be up", || async {
        replica.readyz().await.is_some_and(|(_, body)| body["listener_connected"] == true)
    })
    .await;
    let worker_connections: Vec<u16> =
        path.connections_of(replica.pid()).into_iter().filter(|(_, up)| *up).map(|(port, _)| port).collect();
    assert!(worker_connections.len() >= 2, "the pool and LISTEN hold connections: {worker_connections:?}");
    let log_before = replica.log().len();

    path.silence();
    let silenced_at = Instant::now();
    // Work arrives during the silence (straight to PostgreSQL, not through the path).
    let chat = work_arrives(&test_db).await;
    // When each connection left ESTABLISHED (the kernel gave up on it, or the worker closed it),
    // and when the worker logged that its LISTEN connection failed.
    let mut noticed: BTreeMap<u16, Duration> = BTreeMap::new();
    let mut listen_noticed = None;
    while silenced_at.elapsed() < SILENCE {
        let now = path.connections_of(replica.pid());
        for port in &worker_connections {
            if !noticed.contains_key(port) && now.get(port) != Some(&true) {
                noticed.insert(*port, silenced_at.elapsed());
            }
        }
        if listen_noticed.is_none()
            && replica.log().get(log_before..).is_some_and(|new| new.contains("LISTEN connection"))
        {
            listen_noticed = Some(silenced_at.elapsed());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    replica.assert_alive();
    let control_noticed =
        control_ports.iter().any(|port| path.connections_of(test_pid).get(port) != Some(&true));

    path.restore();
    let restored_at = Instant::now();
    let unready = replica.ready().await;
    let ready_after = restored_at.elapsed();
    let log_after_restore = replica.log().get(log_before..).unwrap_or_default().to_owned();
    eventually(LIMIT, "the outbox to drain after the path returned", || async {
        scalar(&test_db.db, "SELECT count(*)::int8 FROM task_outbox").await == 0
    })
    .await;
    eventually(LIMIT, "the chat sent during the silence to be answered", || async {
        chats_support::chat(&test_db.db, chat).await.status == "waiting"
    })
    .await;
    let dead = scalar(&test_db.db, "SELECT count(*)::int8 FROM task_outbox_dead").await;
    let lost = 1000 - outbox_in_redis(&config).await;
    let bound = KEEPALIVES_IDLE + TCP_USER_TIMEOUT;
    let slowest = noticed.values().max().copied();
    let seconds = |d: Option<Duration>| d.map_or("never".to_owned(), |d| format!("{:.1}", d.as_secs_f64()));
    report(
        6,
        "network-silent",
        &[
            ("silence_s", SILENCE.as_secs().to_string()),
            ("connections", worker_connections.len().to_string()),
            ("noticed", noticed.len().to_string()),
            ("noticed_max_s", seconds(slowest)),
            ("listen_noticed_s", seconds(listen_noticed)),
            ("bound_s", bound.as_secs().to_string()),
            ("control_noticed", control_noticed.to_string()),
            ("ready_after_restore_s", format!("{:.1}", ready_after.as_secs_f64())),
            ("proxy_connections", path.connections().to_string()),
            ("dead_lettered", dead.to_string()),
            ("lost", lost.to_string()),
        ],
    );
    assert_eq!(noticed.len(), worker_connections.len(), "connections that never noticed: {noticed:?}");
    assert!(
        slowest.is_some_and(|s| s <= bound),
        "a connection noticed only after {slowest:?} (bound {bound:?})"
    );
    assert!(listen_noticed.is_some_and(|s| s <= bound), "LISTEN noticed after {listen_noticed:?}");
    assert!(!control_noticed, "the control connection noticed: the path was not silent, or not only");
    assert!(
        ready_after <= READY_AFTER_RESTORE,
        "ready {ready_after:?} after the path returned; last /readyz before: {unready:#?}\nlog since the silence:\n{log_after_restore}"
    );
    assert_eq!((lost, dead), (0, 0));
    assert_eq!(replica.sigterm(LIMIT).await.code(), Some(0));
    control_driver.abort();
}
