//! The health port from the attacker's side (issue 18): 1,000 silent and 100 trickling
//! connections neither delay `/readyz` nor cost a database connection, and are closed by the
//! header-read timeout; connections past `health.max_connections` are closed at once and counted;
//! `/readyz` shows error labels unless `health.detail`; `worker health` (the real binary) exits 0
//! against a live port and 1 against a closed one.
//!
//! The server runs in the test process as the daemon runs it: `health::serve` plus the readiness
//! probe in a supervisor. Its pool has an application name of its own, so `pg_stat_activity`
//! shows exactly its connections.
//!
//! Each property was seen failing without its fix: with no header-read timeout the trickling
//! connections stay open past the deadline; with a ping per `/readyz` request the server's
//! connections grow from 1 to 10 under the separate client; with no cap the fourth connection is
//! served; with no write bound the slot of a client that never reads is never freed; with detail
//! forced on the body carries the database name and the loop's message.

mod common;

use std::net::SocketAddr;
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use common::metrics::MetricsProbe;
use common::process::{BIN, free_port, inherited_overrides};
use common::{TestDb, eventually};
use futures_util::future::join_all;
use opentelemetry::metrics::Meter;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use worker::db::{DatabaseConfig, Db, Exec};
use worker::health::{self, Health, HealthConfig, HealthServer, LoopFacts, TickError, TickRecord};
use worker::runtime::Supervisor;

/// `application_name` of the health server's pool.
const APP: &str = "worker_health_port";
/// The header-read timeout under attack (the default is 10 s; short so the test is).
const HEADER_TIMEOUT: Duration = Duration::from_secs(2);
/// What a separate client's `/readyz` must answer within.
const ANSWER_WITHIN: Duration = Duration::from_secs(1);
/// Scheduling slack on the closes (2 cores, shared with other test binaries).
const SLACK: Duration = Duration::from_secs(3);

/// A health server on an ephemeral loopback port with its readiness probe supervised, as
/// `daemon::run` starts them.
struct Port {
    server: HealthServer,
    stop: CancellationToken,
    supervisor: Supervisor,
}

impl Port {
    async fn start(config: HealthConfig, health: Health, db: Db, meter: &Meter) -> Self {
        let supervisor = Supervisor::default();
        let probe_health = health.clone();
        supervisor
            .task_set("health_probe", ())
            .start("readiness", (), |mut stop| async move {
                health::probe(probe_health, db, stop.stopped()).await;
            })
            .expect("the probe starts");
        let config = HealthConfig { listen: SocketAddr::from(([127, 0, 0, 1], 0)), ..config };
        let stop = CancellationToken::new();
        let server = health::serve(&config, health, meter, stop.clone()).await.expect("bind");
        Self { server, stop, supervisor }
    }

    fn addr(&self) -> SocketAddr {
        self.server.local_addr
    }

    /// Shutdown as the daemon does it: the probe is cancelled and awaited, then the server ends.
    async fn shut_down(self) {
        self.supervisor.cancel_all();
        tokio::time::timeout(Duration::from_secs(5), self.supervisor.wait())
            .await
            .expect("the readiness probe ends when the supervisor cancels it");
        self.stop.cancel();
        tokio::time::timeout(Duration::from_secs(10), self.server.task)
            .await
            .expect("the server ends after shutdown")
            .expect("the server task did not panic");
    }
}

/// The health server's own pool on the test database.
fn server_pool(test_db: &TestDb) -> Db {
    let url = format!("{}?application_name={APP}", test_db.url);
    Db::new(&DatabaseConfig { url, pool_size: 10, ..DatabaseConfig::default() }).expect("pool")
}

/// (open, busy) connections of the health server's pool, from `pg_stat_activity`.
async fn server_connections(test_db: &TestDb) -> (i64, i64) {
    let row = test_db
        .db
        .get()
        .await
        .expect("observer connection")
        .fetch_one(
            "SELECT count(*)::int8, (count(*) FILTER (WHERE state <> 'idle'))::int8 FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = $1",
            &[(&APP, Type::TEXT)],
        )
        .await
        .expect("pg_stat_activity");
    (row.get(0), row.get(1))
}

/// A client that opens a new connection per request (and ignores any proxy settings).
fn client() -> reqwest::Client {
    reqwest::Client::builder().no_proxy().pool_max_idle_per_host(0).build().expect("client")
}

async fn get(client: &reqwest::Client, addr: SocketAddr, path: &str) -> Option<(u16, String)> {
    let response = client.get(format!("http://{addr}{path}")).send().await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.text().await.ok()?))
}

/// Reads until the server closes the connection (EOF, or a reset after its close).
async fn until_closed(stream: &mut TcpStream) {
    let mut buf = [0u8; 1024];
    while let Ok(n) = stream.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

/// The test process holds ~2,300 descriptors (each connection on both ends).
fn raise_open_file_limit(wanted: u64) {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
    assert!(hard >= wanted, "RLIMIT_NOFILE hard limit {hard} is under the {wanted} this test needs");
    if soft < wanted {
        setrlimit(Resource::RLIMIT_NOFILE, wanted, hard).expect("setrlimit");
    }
}

/// One silent attacker's connection, opened at `opened`: sends nothing. Returns how long the
/// server let it stay open (`None` if it was still open at `stop`); counts its close in `closed`.
async fn silent(
    mut stream: TcpStream,
    opened: Instant,
    stop: CancellationToken,
    closed: Arc<AtomicUsize>,
) -> Option<Duration> {
    tokio::select! {
        () = stop.cancelled() => None,
        () = until_closed(&mut stream) => {
            closed.fetch_add(1, Ordering::SeqCst);
            Some(opened.elapsed())
        }
    }
}

/// Opens a connection and notes when. One at a time: a burst of SYNs past the listen backlog
/// would be answered with SYN cookies and some "connections" would exist on the client only.
async fn open(addr: SocketAddr) -> (TcpStream, Instant) {
    let stream = TcpStream::connect(addr).await.expect("connect");
    (stream, Instant::now())
}

/// One trickling attacker: sends a request head one byte a second (it would take 38 s) and
/// returns how long the server let the connection stay open.
async fn trickle(mut stream: TcpStream, opened: Instant) -> Duration {
    const HEAD: &[u8] = b"GET /readyz HTTP/1.1\r\nHost: health\r\n\r\n";
    let (mut reader, mut writer) = stream.split();
    let mut byte_a_second = tokio::time::interval(Duration::from_secs(1));
    let mut sent = 0;
    let mut buf = [0u8; 1024];
    loop {
        tokio::select! {
            read = reader.read(&mut buf) => match read {
                Ok(0) | Err(_) => return opened.elapsed(),
                Ok(_) => {} // an error response before the close
            },
            _ = byte_a_second.tick(), if sent < HEAD.len() => {
                if writer.write_all(&HEAD[sent..=sent]).await.is_err() {
                    return opened.elapsed();
                }
                sent += 1;
            }
        }
    }
}

/// One `/readyz` of the separate client, which must answer 200 within [`ANSWER_WITHIN`].
async fn readyz_in_time(client: &reqwest::Client, addr: SocketAddr) -> Duration {
    let started = Instant::now();
    let answer = tokio::time::timeout(ANSWER_WITHIN, get(client, addr, "/readyz"))
        .await
        .unwrap_or_else(|_| panic!("/readyz did not answer within {ANSWER_WITHIN:?} under attack"));
    let (status, body) = answer.expect("/readyz answers");
    assert_eq!(status, 200, "{body}");
    started.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_thousand_silent_and_a_hundred_trickling_connections_neither_delay_readyz_nor_take_a_database_connection()
 {
    raise_open_file_limit(4096);
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let config = HealthConfig { header_read_timeout: HEADER_TIMEOUT, ..HealthConfig::default() };
    let port = Port::start(config, Health::default(), server_pool(&test_db), &metrics.meter()).await;
    let addr = port.addr();
    let client = client();
    eventually(Duration::from_secs(10), "/readyz 200", || async {
        get(&client, addr, "/readyz").await.is_some_and(|(status, _)| status == 200)
    })
    .await;
    let before = server_connections(&test_db).await;

    let stop = CancellationToken::new();
    let closed = Arc::new(AtomicUsize::new(0));
    let mut attackers = Vec::new();
    for _ in 0..1000 {
        let (stream, opened) = open(addr).await;
        attackers.push(tokio::spawn(silent(stream, opened, stop.clone(), closed.clone())));
    }
    let mut trickling = Vec::new();
    for _ in 0..100 {
        let (stream, opened) = open(addr).await;
        trickling.push(trickle(stream, opened));
    }
    let trickling = tokio::spawn(join_all(trickling));

    // The separate client, in rounds of 20 concurrent requests, for as long as the trickling
    // connections are open: without a header-read timeout that is forever and the deadline fails.
    let attack_started = Instant::now();
    let mut latencies = Vec::new();
    let mut during = before;
    let mut pace = tokio::time::interval(Duration::from_millis(250));
    while !trickling.is_finished() {
        assert!(
            attack_started.elapsed() < HEADER_TIMEOUT + SLACK,
            "the trickling connections were still open after {:?}",
            attack_started.elapsed()
        );
        pace.tick().await;
        latencies.extend(join_all((0..20).map(|_| readyz_in_time(&client, addr))).await);
        let now = server_connections(&test_db).await;
        during = (during.0.max(now.0), during.1.max(now.1));
    }
    let trickled = trickling.await.expect("trickling attackers");
    // They were opened before the trickling ones, so the server closes them first: within the
    // slack at the latest.
    let all_closed = common::within(SLACK, || async { closed.load(Ordering::SeqCst) == 1000 }).await;
    stop.cancel();
    let holds: Vec<Option<Duration>> =
        join_all(attackers).await.into_iter().map(|r| r.expect("silent attacker")).collect();

    assert!(!latencies.is_empty(), "the separate client made no request");
    latencies.sort();
    let slowest_trickle = trickled.iter().max().copied().unwrap_or_default();
    let fastest_trickle = trickled.iter().min().copied().unwrap_or_default();
    let silent_closed: Vec<Duration> = holds.iter().flatten().copied().collect();
    let slowest_silent = silent_closed.iter().max().copied().unwrap_or_default();
    let refused = metrics.counter("health.connections.refused", &[]).await;
    println!(
        "health port under attack: readyz {} answers, p50 {:?}, max {:?}; server connections before \
         {before:?}, during {during:?} (open, busy); trickling closed after {fastest_trickle:?}..{slowest_trickle:?}; \
         silent closed: {}/1000, slowest after {slowest_silent:?}; refused {refused}",
        latencies.len(),
        latencies[latencies.len() / 2],
        latencies[latencies.len() - 1],
        silent_closed.len(),
    );

    assert!(before.0 >= 1, "the probe holds a pooled connection: {before:?}");
    assert!(
        during.0 <= before.0 && during.1 <= 1,
        "the server's database connections grew under attack: before {before:?}, during {during:?}"
    );
    let margin = Duration::from_millis(100);
    assert!(
        fastest_trickle + margin >= HEADER_TIMEOUT,
        "a trickling connection was closed before the header-read timeout: {fastest_trickle:?}"
    );
    assert!(slowest_trickle <= HEADER_TIMEOUT + SLACK, "{slowest_trickle:?}");
    assert!(all_closed && silent_closed.len() == 1000, "every silent connection was closed by the server");
    assert!(slowest_silent <= HEADER_TIMEOUT + SLACK, "a silent connection stayed {slowest_silent:?}");
    assert_eq!(refused, 0, "1,101 connections are under the default max_connections");
    port.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_beyond_max_connections_are_closed_at_once_and_counted() {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let config = HealthConfig {
        max_connections: 3,
        header_read_timeout: Duration::from_secs(60),
        ..HealthConfig::default()
    };
    let port = Port::start(config, Health::default(), server_pool(&test_db), &metrics.meter()).await;
    let addr = port.addr();

    // Connections are accepted in the order they were made: the three take the three slots
    // before the server accepts the fourth.
    let mut held = Vec::new();
    for _ in 0..3 {
        held.push(TcpStream::connect(addr).await.expect("connect"));
    }
    let mut excess = TcpStream::connect(addr).await.expect("the kernel completes the handshake");
    let started = Instant::now();
    tokio::time::timeout(Duration::from_secs(1), until_closed(&mut excess))
        .await
        .expect("the connection past max_connections is closed at once");
    println!("the fourth connection was closed after {:?}", started.elapsed());
    assert!(
        tokio::time::timeout(Duration::from_millis(500), until_closed(&mut held[2])).await.is_err(),
        "a connection within the cap stays open"
    );
    eventually(Duration::from_secs(5), "health.connections.refused = 1", || async {
        metrics.counter("health.connections.refused", &[]).await == 1
    })
    .await;

    // A held connection is served; when it ends, its slot is free for the next client.
    let first = &mut held[0];
    first
        .write_all(b"GET /healthz HTTP/1.1\r\nHost: health\r\nConnection: close\r\n\r\n")
        .await
        .expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut response))
        .await
        .expect("answered and closed")
        .expect("read");
    let response = String::from_utf8_lossy(&response);
    assert!(response.starts_with("HTTP/1.1 200"), "{response}");
    let client = client();
    eventually(Duration::from_secs(5), "a new connection served once a slot is free", || async {
        get(&client, addr, "/healthz").await.is_some_and(|(status, _)| status == 200)
    })
    .await;
    drop(held);
    port.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_sends_requests_but_never_reads_loses_its_connection_after_the_request_timeout() {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let request_timeout = Duration::from_secs(1);
    // One slot, and a header-read timeout far beyond the test: only the write bound can free it.
    let config = HealthConfig {
        max_connections: 1,
        request_timeout,
        header_read_timeout: Duration::from_secs(120),
        ..HealthConfig::default()
    };
    let port = Port::start(config, Health::default(), server_pool(&test_db), &metrics.meter()).await;
    let addr = port.addr();

    // A small receive window and pipelined requests whose responses are never read: the
    // server's writes block once the socket buffers are full.
    let socket = tokio::net::TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let started = Instant::now();
    let stream = socket.connect(addr).await.expect("connect");
    let (unread, mut writer) = stream.into_split();
    let flood = tokio::spawn(async move {
        for _ in 0..100_000 {
            if writer.write_all(b"GET /healthz HTTP/1.1\r\nHost: health\r\n\r\n").await.is_err() {
                break;
            }
        }
    });
    let client = client();
    eventually(Duration::from_secs(20), "the slot of the connection that does not read is free", || async {
        get(&client, addr, "/healthz").await.is_some_and(|(status, _)| status == 200)
    })
    .await;
    let held = started.elapsed();
    println!("a connection that stopped reading held its slot for {held:?}");
    assert!(
        held >= request_timeout,
        "freed before its writes could have stalled for request_timeout: {held:?}"
    );
    assert!(metrics.counter("health.connections.refused", &[]).await >= 1, "the slot was taken meanwhile");
    flood.abort();
    drop(unread);
    port.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readyz_shows_error_labels_and_raw_messages_only_with_detail() {
    // A database that does not exist: the server's refusal names it, and a loop error names a
    // secret; neither may reach the body by default.
    let missing = format!("worker_no_such_db_{}", uuid::Uuid::new_v4().simple());
    let db = Db::new(&DatabaseConfig {
        url: common::url_for(&missing),
        pool_size: 2,
        ..DatabaseConfig::default()
    })
    .expect("pool");
    let health = Health::default();
    let facts = LoopFacts {
        interval: Duration::from_secs(1),
        tick_timeout: Duration::from_secs(1),
        staleness_limit: Duration::from_secs(3),
        leader_only: false,
    };
    health.register("outbox", facts);
    let error = TickError { label: "db_statement", message: "task 7: password=hunter2" };
    health.record("outbox", TickRecord { outcome: "error", completed: false, error: Some(error) });
    let metrics = MetricsProbe::new();
    let labels = Port::start(HealthConfig::default(), health.clone(), db.clone(), &metrics.meter()).await;
    let detail = HealthConfig { detail: true, ..HealthConfig::default() };
    let detailed = Port::start(detail, health, db, &metrics.meter()).await;
    let client = client();

    let probed = |addr: SocketAddr| {
        let client = client.clone();
        async move {
            let (status, body) = get(&client, addr, "/readyz").await?;
            let json: serde_json::Value = serde_json::from_str(&body).ok()?;
            (json["database"] != "not_probed").then_some((status, body, json))
        }
    };
    let mut answers = Vec::new();
    for port in [&labels, &detailed] {
        eventually(Duration::from_secs(10), "the probe's first result", || async {
            probed(port.addr()).await.is_some()
        })
        .await;
        answers.push(probed(port.addr()).await.expect("/readyz"));
    }
    let [(status, body, json), (detail_status, detail_body, detail_json)] =
        <[_; 2]>::try_from(answers).expect("two answers");

    assert_eq!((status, detail_status), (503, 503));
    assert_eq!(json["database"], "db_connection", "{body}");
    assert_eq!(json["loops"][0]["last_error"], "db_statement", "{body}");
    for secret in [missing.as_str(), "does not exist", "hunter2"] {
        assert!(!body.contains(secret), "`{secret}` in the label-only body: {body}");
    }
    let database = detail_json["database"].as_str().unwrap_or_default();
    assert!(database.contains(&missing) && database.contains("does not exist"), "{detail_body}");
    assert_eq!(detail_json["loops"][0]["last_error"], "task 7: password=hunter2", "{detail_body}");
    labels.shut_down().await;
    detailed.shut_down().await;
}

/// `worker health` with `health.listen = LISTEN`, no config file, and a proxy in its environment
/// that would fail every request it carried.
async fn worker_health(listen: &str) -> Output {
    let dir = tempfile::tempdir().expect("dir");
    let mut command = tokio::process::Command::new(BIN);
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command
        .args(["health", "--set", &format!("health.listen={listen}")])
        .current_dir(dir.path())
        .env("RUST_LOG", "warn")
        .env("HTTP_PROXY", "http://127.0.0.1:9")
        .env("http_proxy", "http://127.0.0.1:9")
        .output()
        .await
        .expect("run worker health")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_health_exits_0_against_a_live_health_port_and_1_against_a_closed_one() {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let port =
        Port::start(HealthConfig::default(), Health::default(), server_pool(&test_db), &metrics.meter())
            .await;

    // Listening on every address, the check goes through loopback (where this server listens).
    let live = worker_health(&format!("0.0.0.0:{}", port.addr().port())).await;
    let stdout = String::from_utf8_lossy(&live.stdout);
    assert_eq!(live.status.code(), Some(0), "{stdout}{}", String::from_utf8_lossy(&live.stderr));
    assert!(stdout.contains(&format!("http://127.0.0.1:{}/healthz", port.addr().port())), "{stdout}");

    let closed = worker_health(&format!("127.0.0.1:{}", free_port())).await;
    let stderr = String::from_utf8_lossy(&closed.stderr);
    assert_eq!(closed.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("/healthz") && stderr.contains("failed"), "{stderr}");
    println!("closed port: {}", stderr.trim());
    port.shut_down().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ready_gauge_follows_what_readyz_answers() {
    let test_db = TestDb::new().await;
    let health = Health::default();
    let facts = LoopFacts {
        interval: Duration::from_secs(1),
        tick_timeout: Duration::from_secs(1),
        staleness_limit: Duration::from_secs(60),
        leader_only: false,
    };
    health.register("outbox", facts);
    let metrics = MetricsProbe::new();
    let port =
        Port::start(HealthConfig::default(), health.clone(), server_pool(&test_db), &metrics.meter()).await;
    let client = client();
    let readyz = || async { get(&client, port.addr(), "/readyz").await.expect("/readyz").0 };

    // The database answers, but the loop has not completed a tick: not ready.
    eventually(Duration::from_secs(10), "the probe's first result", || async {
        let (_, body) = get(&client, port.addr(), "/readyz").await.expect("/readyz");
        !body.contains("not_probed")
    })
    .await;
    assert_eq!(readyz().await, 503);
    assert_eq!(metrics.gauge("worker.ready").await, Some(0.0));
    assert_eq!(
        metrics.gauge_points("worker.ready").await[0].0,
        Vec::<(String, String)>::new(),
        "no attributes"
    );

    health.record("outbox", TickRecord { outcome: "ok", completed: true, error: None });
    assert_eq!(readyz().await, 200);
    assert_eq!(metrics.gauge("worker.ready").await, Some(1.0));

    health.set_draining();
    assert_eq!(readyz().await, 503);
    assert_eq!(metrics.gauge("worker.ready").await, Some(0.0));
    port.shut_down().await;
}
