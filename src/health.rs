//! `/healthz` (the process runs) and `/readyz` (the database answered the readiness probe and
//! every enabled loop completed a tick recently), with a JSON body that says what each loop is
//! doing; and `worker health`, the container's health check.
//!
//! The port is built to stay answerable when something hostile reaches it (it should not: keep
//! it off the public internet). A request handler never touches the database: one background
//! probe ([`probe`], a supervised task the daemon starts) pings it when nothing else showed it
//! answering for 10 s (a loop's pooled checkout counts; once a second while it does not answer)
//! and `/readyz` reads what it last found. The server is hyper's HTTP/1 connection driven directly,
//! because `axum::serve` has neither of the bounds that matter here:
//!
//! - `health.header_read_timeout`: a connection that has not sent a complete request head within
//!   it (a silent one, one that trickles a byte a second, an idle keep-alive) is closed;
//! - `health.request_timeout`: a handler that has not answered within it gets a 503, and a
//!   connection whose response cannot be written for that long (a client that does not read)
//!   is closed;
//! - `health.max_connections`: connections beyond it are accepted and closed at once (counted in
//!   `health.connections.refused`), so no number of them costs the process more than that many
//!   descriptors and buffers.
//!
//! The body shows error labels (`db_connection`, the loops' metric labels) unless
//! `health.detail = true`: error messages can hold host names, row ids and server text.

use std::collections::BTreeMap;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use chrono::{DateTime, Utc};
use hyper::server::conn::http1;
use hyper::service::Service as _;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use opentelemetry::metrics::{Counter, Meter};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::db::{Db, DbError};
use crate::validate::{Violation, check, positive};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Address of `/healthz` and `/readyz`.
    pub listen: SocketAddr,
    /// A connection that has not sent a complete request head within this is closed.
    #[serde(with = "humantime_serde")]
    pub header_read_timeout: Duration,
    /// A request not answered within this gets a 503; a response write blocked this long (the
    /// client does not read) closes the connection.
    #[serde(with = "humantime_serde")]
    pub request_timeout: Duration,
    /// Open connections beyond this are accepted and closed at once.
    pub max_connections: u32,
    /// Raw error messages on `/readyz` instead of error labels.
    pub detail: bool,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([0, 0, 0, 0], 8080)),
            header_read_timeout: Duration::from_secs(10),
            request_timeout: Duration::from_secs(5),
            max_connections: 2048,
            detail: false,
        }
    }
}

impl HealthConfig {
    /// Keys are relative to `[health]`.
    pub fn validate(&self) -> Result<(), Violation> {
        positive("header_read_timeout", self.header_read_timeout)?;
        positive("request_timeout", self.request_timeout)?;
        check(self.max_connections >= 1, "max_connections", self.max_connections, "at least 1")
    }
}

/// How often the readiness probe pings the database while the last ping failed (or before the
/// first), and how often it looks at the pool (no I/O) between pings.
pub const PROBE_INTERVAL: Duration = Duration::from_secs(1);
/// How old the last evidence that the database answers may grow before the probe pings: a
/// pooled checkout that opened or verified a connection ([`Db::last_answered`]: both are round
/// trips) counts as much as a `SELECT 1`, so a replica whose loops open or verify connections
/// pings rarely, and an idle one every 10 s at most. A database that dies turns `/readyz` 503 within this
/// plus [`DB_PING_TIMEOUT`] (12 s), and within a second of a loop's checkout finding it
/// unreachable ([`Db::unreachable`]).
pub const IDLE_PROBE_INTERVAL: Duration = Duration::from_secs(10);
/// How long the probe waits for `SELECT 1`.
const DB_PING_TIMEOUT: Duration = Duration::from_secs(2);
/// A probe result older than this no longer counts: the probe is stuck or gone (it pings every
/// `IDLE_PROBE_INTERVAL` at most, each ping bounded by `DB_PING_TIMEOUT`).
const PROBE_STALE_AFTER: Duration = Duration::from_secs(15);

/// What /readyz needs to know about a loop's schedule (the runtime fills it in).
#[derive(Debug, Clone, Copy)]
pub struct LoopFacts {
    pub interval: Duration,
    pub tick_timeout: Duration,
    /// How long after its last completed tick the loop still counts as ready.
    pub staleness_limit: Duration,
    pub leader_only: bool,
}

/// One tick as /readyz records it.
#[derive(Debug, Clone, Copy)]
pub struct TickRecord<'a> {
    /// The `outcome` label of `worker.loop.ticks` (`ok`, `error`, `timeout`, `paused`, …).
    pub outcome: &'static str,
    /// The loop did what it is supposed to do (ok, not leader, paused): it counts as alive.
    pub completed: bool,
    pub error: Option<TickError<'a>>,
}

/// A failed tick: its fixed label (the `error` attribute of `worker.loop.ticks`) and its message.
#[derive(Debug, Clone, Copy)]
pub struct TickError<'a> {
    pub label: &'static str,
    pub message: &'a str,
}

/// The `outcome` of a paused tick; shown as `paused: true` on /readyz.
pub const PAUSED: &str = "paused";
const OK: &str = "ok";

/// An error as /readyz may show it: a fixed label, and the message only with `health.detail`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Failure {
    label: &'static str,
    message: String,
}

impl Failure {
    fn new(label: &'static str, message: impl Into<String>) -> Self {
        Self { label, message: message.into() }
    }

    fn shown(&self, detail: bool) -> String {
        if detail { self.message.clone() } else { self.label.to_owned() }
    }
}

/// What the readiness probe last found.
#[derive(Debug, Clone)]
struct Probed {
    at: Instant,
    database: Result<(), Failure>,
}

#[derive(Debug, Clone)]
struct LoopStatus {
    facts: LoopFacts,
    ticks: u64,
    last_outcome: Option<&'static str>,
    last_completed: Option<Instant>,
    last_success_at: Option<DateTime<Utc>>,
    last_error: Option<Failure>,
    last_error_at: Option<DateTime<Utc>>,
}

impl LoopStatus {
    /// Completed a tick within its staleness limit.
    fn ready_at(&self, now: Instant) -> bool {
        self.last_completed.is_some_and(|at| now.duration_since(at) <= self.facts.staleness_limit)
    }
}

#[derive(Debug, Default)]
struct State_ {
    loops: BTreeMap<&'static str, LoopStatus>,
    listener_connected: bool,
    draining: bool,
    info: BTreeMap<&'static str, serde_json::Value>,
    probed: Option<Probed>,
}

/// Health state shared by the runners and the probe (writers) and the HTTP handlers (readers).
#[derive(Clone, Default)]
pub struct Health {
    state: Arc<Mutex<State_>>,
}

#[derive(Debug, Serialize)]
pub struct LoopReport {
    pub name: &'static str,
    pub ready: bool,
    pub paused: bool,
    pub leader_only: bool,
    pub ticks: u64,
    pub last_outcome: Option<&'static str>,
    pub last_success_at: Option<DateTime<Utc>>,
    /// The error's label (its `error` attribute in `worker.loop.ticks`); its message with
    /// `health.detail`.
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub interval_ms: u64,
    pub tick_timeout_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    /// `ok`, or why not: a label (`db_connection`, `db_timeout`, …), the message with detail.
    pub database: String,
    pub listener_connected: bool,
    pub draining: bool,
    pub loops: Vec<LoopReport>,
    #[serde(flatten)]
    pub info: BTreeMap<&'static str, serde_json::Value>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State_> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, name: &'static str, facts: LoopFacts) {
        self.lock().loops.insert(
            name,
            LoopStatus {
                facts,
                ticks: 0,
                last_outcome: None,
                last_completed: None,
                last_success_at: None,
                last_error: None,
                last_error_at: None,
            },
        );
    }

    pub fn record(&self, name: &'static str, tick: TickRecord<'_>) {
        let mut state = self.lock();
        let Some(status) = state.loops.get_mut(name) else { return };
        status.ticks += 1;
        status.last_outcome = Some(tick.outcome);
        if tick.completed {
            status.last_completed = Some(Instant::now());
        }
        if tick.outcome == OK {
            status.last_success_at = Some(Utc::now());
        }
        if let Some(error) = tick.error {
            status.last_error = Some(Failure::new(error.label, error.message));
            status.last_error_at = Some(Utc::now());
        }
    }

    pub fn set_listener_connected(&self, connected: bool) {
        self.lock().listener_connected = connected;
    }

    pub fn set_draining(&self) {
        self.lock().draining = true;
    }

    /// Static facts shown on /readyz (worker id, version, effective concurrency, …).
    pub fn set_info(&self, key: &'static str, value: serde_json::Value) {
        self.lock().info.insert(key, value);
    }

    /// What the readiness probe found at `at`.
    fn set_probed(&self, at: Instant, database: Result<(), Failure>) {
        self.lock().probed = Some(Probed { at, database });
    }

    /// Readiness given whether the database answered (`Err` = why not), with full messages: for
    /// tests that judge loops without a probe. `/readyz` uses [`Health::readyz`].
    #[cfg(any(test, feature = "test-support"))]
    pub fn readiness(&self, database: Result<(), String>) -> Readiness {
        self.report(database.map_err(|message| Failure::new("db_error", message)), true)
    }

    /// Readiness as /readyz shows it: the database as the probe last found it; messages only
    /// with `detail`, labels otherwise.
    pub fn readyz(&self, detail: bool) -> Readiness {
        let database = database_now(self.lock().probed.as_ref(), Instant::now());
        self.report(database, detail)
    }

    /// Whether `/readyz` would answer ready now, from the same state (no database work): read
    /// by the `worker.ready` gauge at each export.
    pub fn is_ready(&self) -> bool {
        let state = self.lock();
        let now = Instant::now();
        database_now(state.probed.as_ref(), now).is_ok()
            && !state.draining
            && state.loops.values().all(|s| s.ready_at(now))
    }

    fn report(&self, database: Result<(), Failure>, detail: bool) -> Readiness {
        let state = self.lock();
        let now = Instant::now();
        let loops: Vec<LoopReport> = state
            .loops
            .iter()
            .map(|(name, s)| LoopReport {
                name,
                ready: s.ready_at(now),
                paused: s.last_outcome == Some(PAUSED),
                leader_only: s.facts.leader_only,
                ticks: s.ticks,
                last_outcome: s.last_outcome,
                last_success_at: s.last_success_at,
                last_error: s.last_error.as_ref().map(|e| e.shown(detail)),
                last_error_at: s.last_error_at,
                interval_ms: s.facts.interval.as_millis() as u64,
                tick_timeout_ms: s.facts.tick_timeout.as_millis() as u64,
            })
            .collect();
        let ready = database.is_ok() && !state.draining && loops.iter().all(|l| l.ready);
        Readiness {
            ready,
            database: database.err().map_or_else(|| OK.to_owned(), |e| e.shown(detail)),
            listener_connected: state.listener_connected,
            draining: state.draining,
            loops,
            info: state.info.clone(),
        }
    }
}

/// The database as /readyz reports it at `now`: what the probe last found, unless there is no
/// result yet or it is too old to vouch for anything.
fn database_now(probed: Option<&Probed>, now: Instant) -> Result<(), Failure> {
    match probed {
        None => Err(Failure::new("not_probed", "the readiness probe has not pinged the database yet")),
        Some(p) if now.saturating_duration_since(p.at) > PROBE_STALE_AFTER => Err(Failure::new(
            "probe_stale",
            format!(
                "the readiness probe's last result is {:?} old (limit {PROBE_STALE_AFTER:?})",
                now.saturating_duration_since(p.at)
            ),
        )),
        Some(p) => p.database.clone(),
    }
}

/// The label of a failed ping.
fn ping_label(error: &DbError) -> &'static str {
    use deadpool_postgres::{PoolError, TimeoutType};
    match error {
        DbError::Url(_) => "db_config",
        // Every pooled connection busy for `database.acquire_timeout`.
        DbError::Pool(PoolError::Timeout(TimeoutType::Wait)) => "db_pool_timeout",
        // Connecting (or verifying an idle connection) failed or took too long.
        DbError::Pool(PoolError::Timeout(_) | PoolError::Backend(_)) | DbError::Postgres(_) => {
            "db_connection"
        }
        DbError::Pool(_) => "db_pool",
    }
}

async fn ping(db: &Db) -> Result<(), Failure> {
    match tokio::time::timeout(DB_PING_TIMEOUT, db.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(Failure::new(ping_label(&error), error.to_string())),
        Err(_) => {
            Err(Failure::new("db_timeout", format!("no answer to SELECT 1 within {DB_PING_TIMEOUT:?}")))
        }
    }
}

/// What the readiness probe does when it looks (every [`PROBE_INTERVAL`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProbeStep {
    /// `SELECT 1` now.
    Ping,
    /// A checkout newer than what `/readyz` shows succeeded: publish it as the evidence, no I/O.
    Vouch,
    Wait,
}

/// The probe's decision: `published_ok` is whether `/readyz` shows the database answering,
/// `since_published` the age of that evidence, `since_answered` the age of the last successful
/// checkout. While the database answers, a newer checkout is vouched for and a ping is sent only
/// when the evidence is [`IDLE_PROBE_INTERVAL`] old; otherwise (a failed ping, no ping yet, a
/// loop's checkout found the database unreachable) it pings at every look.
pub fn probe_step(
    published_ok: bool,
    since_published: Duration,
    since_answered: Option<Duration>,
    database_unreachable: bool,
) -> ProbeStep {
    if !published_ok || database_unreachable {
        ProbeStep::Ping
    } else if since_answered.is_some_and(|answered| answered < since_published) {
        ProbeStep::Vouch
    } else if since_published >= IDLE_PROBE_INTERVAL {
        ProbeStep::Ping
    } else {
        ProbeStep::Wait
    }
}

/// The readiness probe: publishes for `/readyz` whether the database answers, from a `SELECT 1`
/// on one pooled connection or a loop's successful checkout ([`probe_step`]), looks again every
/// [`PROBE_INTERVAL`], until `stop` resolves. A long-lived task: the daemon starts it in the
/// runtime's supervisor, which stops and awaits it at shutdown.
pub async fn probe(health: Health, db: Db, stop: impl Future<Output = ()>) {
    let mut stop = std::pin::pin!(stop);
    // When the evidence `/readyz` shows was gathered, and whether the database answered then.
    let mut published: Option<(Instant, bool)> = None;
    loop {
        let now = Instant::now();
        let (published_ok, since_published) =
            published.map_or((false, Duration::MAX), |(at, ok)| (ok, now.saturating_duration_since(at)));
        let answered = db.last_answered();
        let since_answered = answered.map(|at| now.saturating_duration_since(at));
        match probe_step(published_ok, since_published, since_answered, db.unreachable()) {
            ProbeStep::Ping => {
                let database = tokio::select! {
                    biased;
                    () = &mut stop => return,
                    database = ping(&db) => database,
                };
                if let Err(failure) = &database {
                    tracing::debug!(label = failure.label, error = %failure.message, "readiness probe: database not ready");
                }
                let at = Instant::now();
                published = Some((at, database.is_ok()));
                health.set_probed(at, database);
            }
            ProbeStep::Vouch => {
                if let Some(at) = answered {
                    published = Some((at, true));
                    health.set_probed(at, Ok(()));
                }
            }
            ProbeStep::Wait => {}
        }
        tokio::select! {
            biased;
            () = &mut stop => return,
            () = tokio::time::sleep(PROBE_INTERVAL) => {}
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    detail: bool,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let readiness = app.health.readyz(app.detail);
    let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(readiness))
}

/// The health server, bound and serving.
pub struct HealthServer {
    /// The bound address (the port the OS chose for `:0`).
    pub local_addr: SocketAddr,
    /// Ends after shutdown once every connection has ended (each within `request_timeout`).
    pub task: tokio::task::JoinHandle<()>,
}

/// Read buffer limit per connection (hyper's default is ~400 KiB): a request head longer than
/// this is refused, so `max_connections` connections cost at most that many of these.
const MAX_BUFFER: usize = 16 * 1024;

/// Pause after an accept error that is not about one connection (out of descriptors), so the
/// loop does not spin on it.
const ACCEPT_ERROR_PAUSE: Duration = Duration::from_secs(1);

/// Binds `config.listen` and serves until `shutdown`. Binding errors are returned at once so a
/// port conflict fails start-up instead of leaving a daemon nobody can probe.
pub async fn serve(
    config: &HealthConfig,
    health: Health,
    meter: &Meter,
    shutdown: CancellationToken,
) -> std::io::Result<HealthServer> {
    let listener = TcpListener::bind(config.listen).await?;
    let local_addr = listener.local_addr()?;
    let ready = health.clone();
    meter
        .u64_observable_gauge("worker.ready")
        .with_description("1 when this worker's /readyz answers ready, else 0")
        .with_callback(move |o| o.observe(u64::from(ready.is_ready()), &[]))
        .build();
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, detail: config.detail });
    let refused = meter
        .u64_counter("health.connections.refused")
        .with_description("Connections to the health port closed at once: health.max_connections were open")
        .build();
    tracing::info!(
        addr = %local_addr,
        max_connections = config.max_connections,
        header_read_timeout_ms = config.header_read_timeout.as_millis() as u64,
        request_timeout_ms = config.request_timeout.as_millis() as u64,
        "health endpoint listening"
    );
    let server = Server {
        app,
        bounds: Bounds { header_read: config.header_read_timeout, request: config.request_timeout },
        slots: Arc::new(Semaphore::new(config.max_connections as usize)),
        refused,
    };
    Ok(HealthServer { local_addr, task: tokio::spawn(server.run(listener, shutdown)) })
}

#[derive(Debug, Clone, Copy)]
struct Bounds {
    header_read: Duration,
    request: Duration,
}

struct Server {
    app: axum::Router,
    bounds: Bounds,
    /// One permit per open connection.
    slots: Arc<Semaphore>,
    refused: Counter<u64>,
}

impl Server {
    async fn run(self, listener: TcpListener, shutdown: CancellationToken) {
        let connections = TaskTracker::new();
        loop {
            let accepted = tokio::select! {
                biased;
                () = shutdown.cancelled() => break,
                accepted = listener.accept() => accepted,
            };
            let stream = match accepted {
                Ok((stream, _)) => stream,
                // The peer gave up between its SYN and our accept: nothing to do.
                Err(error) if is_connection_error(&error) => continue,
                Err(error) => {
                    tracing::warn!(%error, "health endpoint: accept failed");
                    tokio::select! {
                        () = shutdown.cancelled() => break,
                        () = tokio::time::sleep(ACCEPT_ERROR_PAUSE) => continue,
                    }
                }
            };
            let Ok(slot) = self.slots.clone().try_acquire_owned() else {
                // Closed at once: the connection costs this process nothing past this line. Not
                // logged (whoever opens them would decide our log volume); counted.
                self.refused.add(1, &[]);
                drop(stream);
                continue;
            };
            connections.spawn(serve_connection(
                stream,
                self.app.clone(),
                self.bounds,
                shutdown.clone(),
                slot,
            ));
        }
        drop(listener);
        connections.close();
        connections.wait().await;
    }
}

fn is_connection_error(error: &std::io::Error) -> bool {
    use std::io::ErrorKind::{ConnectionAborted, ConnectionRefused, ConnectionReset};
    matches!(error.kind(), ConnectionAborted | ConnectionRefused | ConnectionReset)
}

/// One connection, holding its `slot` until it ends: hyper closes it when a request head takes
/// longer than `header_read` (the first and every keep-alive one); a handler gets `request` to
/// answer, and a response write may stay blocked that long. At shutdown it finishes the request
/// in flight (within `request`) and closes.
async fn serve_connection(
    stream: TcpStream,
    app: axum::Router,
    bounds: Bounds,
    shutdown: CancellationToken,
    _slot: OwnedSemaphorePermit,
) {
    let app = TowerToHyperService::new(app);
    let service = hyper::service::service_fn(move |request| {
        let response = app.call(request);
        async move {
            match tokio::time::timeout(bounds.request, response).await {
                Ok(response) => response,
                Err(_) => Ok((StatusCode::SERVICE_UNAVAILABLE, "request timeout\n").into_response()),
            }
        }
    });
    let mut builder = http1::Builder::new();
    builder.timer(TokioTimer::new()).header_read_timeout(bounds.header_read).max_buf_size(MAX_BUFFER);
    let stream = BoundedWrites { stream, stall: bounds.request, stalled: None };
    let connection = builder.serve_connection(TokioIo::new(stream), service);
    let mut connection = std::pin::pin!(connection);
    let result = tokio::select! {
        result = connection.as_mut() => result,
        () = shutdown.cancelled() => {
            connection.as_mut().graceful_shutdown();
            match tokio::time::timeout(bounds.request, connection).await {
                Ok(result) => result,
                Err(_) => return,
            }
        }
    };
    // A client that went away or was timed out is that client's business: debug only.
    if let Err(error) = result {
        tracing::debug!(%error, "health endpoint: connection ended with an error");
    }
}

/// A connection's socket whose writes must make progress: a write, flush or shutdown that stays
/// blocked for `stall` fails, so a client that sends requests but never reads the responses
/// cannot hold its slot once the socket buffers are full (hyper has no write timeout, and the
/// header-read timeout does not run while hyper waits to write).
struct BoundedWrites {
    stream: TcpStream,
    stall: Duration,
    /// Armed when a write first blocks; cleared by any write that gets through.
    stalled: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl BoundedWrites {
    fn bound<T>(&mut self, cx: &mut Context<'_>, polled: Poll<io::Result<T>>) -> Poll<io::Result<T>> {
        if polled.is_ready() {
            self.stalled = None;
            return polled;
        }
        let stall = self.stall;
        let timer = self.stalled.get_or_insert_with(|| Box::pin(tokio::time::sleep(stall)));
        match timer.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!("the client has not read its response for {stall:?}"),
            ))),
            Poll::Pending => Poll::Pending,
        }
    }
}

impl AsyncRead for BoundedWrites {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.stream).poll_read(cx, buf)
    }
}

impl AsyncWrite for BoundedWrites {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write(cx, buf);
        self.bound(cx, polled)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.stream).poll_write_vectored(cx, bufs);
        self.bound(cx, polled)
    }

    fn is_write_vectored(&self) -> bool {
        self.stream.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_flush(cx);
        self.bound(cx, polled)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let polled = Pin::new(&mut self.stream).poll_shutdown(cx);
        self.bound(cx, polled)
    }
}

/// How long `worker health` waits for `/healthz` (the Dockerfile's HEALTHCHECK gives it 3 s).
pub const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

/// Why `worker health` failed.
#[derive(Debug, thiserror::Error)]
pub enum CheckError {
    #[error("GET {url} failed")]
    Request {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("GET {url}: status {status}, expected 200")]
    Status { url: String, status: u16 },
}

/// Where this worker's own health port is reached from inside its host or container: the
/// loopback address of the same family when it listens on every address.
pub fn own_address(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(Ipv4Addr::LOCALHOST.into(), listen.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(Ipv6Addr::LOCALHOST.into(), listen.port()),
        _ => listen,
    }
}

/// `worker health`: GET `/healthz` on this worker's own health port; the URL on success.
pub async fn check_own(config: &HealthConfig) -> Result<String, CheckError> {
    let url = format!("http://{}/healthz", own_address(config.listen));
    let request = |source| CheckError::Request { url: url.clone(), source };
    // No proxy: an HTTP_PROXY in the container's environment must not answer for the worker.
    let client = reqwest::Client::builder().no_proxy().timeout(CHECK_TIMEOUT).build().map_err(request)?;
    let response = client.get(&url).send().await.map_err(request)?;
    match response.status().as_u16() {
        200 => Ok(url),
        status => Err(CheckError::Status { url, status }),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_ready_only_after_a_completed_tick() {
        let health = Health::default();
        let facts = LoopFacts {
            interval: Duration::from_secs(10),
            tick_timeout: Duration::from_secs(5),
            staleness_limit: Duration::from_secs(30),
            leader_only: false,
        };
        health.register("a", facts);
        assert!(!health.readiness(Ok(())).ready);
        let boom = TickError { label: "db_statement", message: "boom" };
        health.record("a", TickRecord { outcome: "error", completed: false, error: Some(boom) });
        let r = health.readiness(Ok(()));
        assert!(!r.ready);
        assert_eq!(r.loops[0].last_error.as_deref(), Some("boom"));
        health.record("a", TickRecord { outcome: "skipped_not_leader", completed: true, error: None });
        assert!(health.readiness(Ok(())).ready);
        assert!(!health.readiness(Err("down".into())).ready, "database down is not ready");
        health.record("a", TickRecord { outcome: PAUSED, completed: true, error: None });
        let r = health.readiness(Ok(()));
        assert!(r.ready && r.loops[0].paused);
        health.set_draining();
        assert!(!health.readiness(Ok(())).ready, "draining is not ready");
    }

    #[test]
    fn readyz_shows_labels_and_messages_only_with_detail() {
        let health = Health::default();
        let facts = LoopFacts {
            interval: Duration::from_secs(1),
            tick_timeout: Duration::from_secs(1),
            staleness_limit: Duration::from_secs(3),
            leader_only: false,
        };
        health.register("a", facts);
        let error = TickError { label: "db_statement", message: "row 42 at postgres://u:pw@db" };
        health.record("a", TickRecord { outcome: "error", completed: false, error: Some(error) });
        health.set_probed(Instant::now(), Err(Failure::new("db_connection", "db.internal:5432: refused")));
        let labels = health.readyz(false);
        assert_eq!(labels.database, "db_connection");
        assert_eq!(labels.loops[0].last_error.as_deref(), Some("db_statement"));
        let detail = health.readyz(true);
        assert_eq!(detail.database, "db.internal:5432: refused");
        assert_eq!(detail.loops[0].last_error.as_deref(), Some("row 42 at postgres://u:pw@db"));
    }

    #[test]
    fn the_database_counts_only_while_the_probe_result_is_fresh() {
        let now = Instant::now();
        assert_eq!(database_now(None, now).map_err(|e| e.label), Err("not_probed"));
        let fresh = Probed { at: now, database: Ok(()) };
        assert_eq!(database_now(Some(&fresh), now + PROBE_STALE_AFTER), Ok(()));
        let stale = database_now(Some(&fresh), now + PROBE_STALE_AFTER + Duration::from_millis(1));
        assert_eq!(
            stale.map_err(|e| e.label),
            Err("probe_stale"),
            "a stuck probe does not vouch for anything"
        );
        let failed = Probed { at: now, database: Err(Failure::new("db_timeout", "slow")) };
        assert_eq!(database_now(Some(&failed), now).map_err(|e| e.label), Err("db_timeout"));
    }

    #[test]
    fn the_probe_pings_only_when_nothing_else_showed_the_database_answering_for_a_while() {
        use ProbeStep::{Ping, Vouch, Wait};
        let s = Duration::from_secs;
        let idle = IDLE_PROBE_INTERVAL;
        // (published ok, its age, last checkout's age, a loop found the database unreachable, step)
        let table = [
            (false, Duration::MAX, None, false, Ping),
            (false, s(1), Some(Duration::ZERO), false, Ping),
            (true, s(3), Some(s(1)), false, Vouch),
            (true, s(3), Some(s(3)), false, Wait),
            (true, idle - s(1), None, false, Wait),
            (true, idle, None, false, Ping),
            (true, idle, Some(idle + s(1)), false, Ping),
            (true, s(1), Some(Duration::ZERO), true, Ping),
        ];
        for (i, (ok, since, answered, unreachable, step)) in table.into_iter().enumerate() {
            assert_eq!(probe_step(ok, since, answered, unreachable), step, "row {i}");
        }
        assert!(
            IDLE_PROBE_INTERVAL + DB_PING_TIMEOUT < PROBE_STALE_AFTER,
            "a healthy probe's result never goes stale between pings"
        );
    }

    #[test]
    fn the_health_check_reaches_an_unspecified_address_through_loopback() {
        let cases = [
            ("0.0.0.0:8080", "127.0.0.1:8080"),
            ("[::]:8080", "[::1]:8080"),
            ("127.0.0.1:9090", "127.0.0.1:9090"),
            ("10.1.2.3:80", "10.1.2.3:80"),
        ];
        for (listen, reached) in cases {
            let listen: SocketAddr = listen.parse().expect("address");
            assert_eq!(own_address(listen).to_string(), reached, "{listen}");
        }
    }

    #[test]
    fn the_new_keys_are_validated_by_name() {
        assert_eq!(HealthConfig::default().validate(), Ok(()));
        let zero = HealthConfig { header_read_timeout: Duration::ZERO, ..HealthConfig::default() };
        assert_eq!(zero.validate().map_err(|v| v.key), Err("header_read_timeout".to_owned()));
        let zero = HealthConfig { request_timeout: Duration::ZERO, ..HealthConfig::default() };
        assert_eq!(zero.validate().map_err(|v| v.key), Err("request_timeout".to_owned()));
        let none = HealthConfig { max_connections: 0, ..HealthConfig::default() };
        assert_eq!(none.validate().map_err(|v| v.key), Err("max_connections".to_owned()));
    }
}
