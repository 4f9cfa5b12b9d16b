//! The shared tick runner, driven with a probe loop against a real database: overlap,
//! timeouts, leader-only mode, shutdown, NOTIFY wakes and pause/resume across replicas.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::TestDb;
use common::metrics::MetricsProbe;
use tokio::sync::{Semaphore, watch};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use worker::config::RuntimeConfig;
use worker::db::{Db, Exec};
use worker::health::Health;
use worker::listen;
use worker::runtime::{Loop, Outcome, Progress, Runtime, Schedule, Tick};

/// Generous bound for conditions that should hold in milliseconds; reaching it is a failure.
const LIMIT: Duration = Duration::from_secs(15);

/// What a probe tick does after announcing that it started.
#[derive(Clone, Copy)]
enum Behaviour {
    Return,
    /// Wait for a permit from `gate` (the test hands them out).
    Gated,
    /// Never finish (only a timeout or cancellation ends the tick).
    Hang,
    /// Take this long (simulated work).
    Take(Duration),
    /// Report a full batch (`Progress::More`) for the first N ticks, then `Done`.
    FullBatches(u64),
}

struct ProbeState {
    behaviour: std::sync::Mutex<Behaviour>,
    gate: Semaphore,
    in_flight: AtomicU64,
    max_in_flight: AtomicU64,
    started: watch::Sender<u64>,
    finished: watch::Sender<u64>,
    cancelled: AtomicU64,
}

impl ProbeState {
    fn new(behaviour: Behaviour) -> Arc<Self> {
        Arc::new(Self {
            behaviour: std::sync::Mutex::new(behaviour),
            gate: Semaphore::new(0),
            in_flight: AtomicU64::new(0),
            max_in_flight: AtomicU64::new(0),
            started: watch::channel(0).0,
            finished: watch::channel(0).0,
            cancelled: AtomicU64::new(0),
        })
    }

    fn set(&self, behaviour: Behaviour) {
        *self.behaviour.lock().unwrap() = behaviour;
    }

    fn started(&self) -> u64 {
        *self.started.borrow()
    }

    async fn wait_started(&self, n: u64) {
        let mut rx = self.started.subscribe();
        tokio::time::timeout(LIMIT, rx.wait_for(|s| *s >= n))
            .await
            .unwrap_or_else(|_| panic!("tick {n} never started (runner stuck or not woken?)"))
            .expect("watch");
    }

    async fn wait_finished(&self, n: u64) {
        let mut rx = self.finished.subscribe();
        tokio::time::timeout(LIMIT, rx.wait_for(|s| *s >= n))
            .await
            .unwrap_or_else(|_| panic!("tick {n} never finished"))
            .expect("watch");
    }
}

/// Counts in-flight ticks; if the tick future is dropped mid-way, records a cancellation.
struct InFlight<'a>(&'a ProbeState, bool);

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        self.0.in_flight.fetch_sub(1, Ordering::SeqCst);
        if !self.1 {
            self.0.cancelled.fetch_add(1, Ordering::SeqCst);
        }
    }
}

struct Probe {
    name: &'static str,
    schedule: Schedule,
    state: Arc<ProbeState>,
}

#[derive(Debug, thiserror::Error)]
#[error("probe failed")]
struct ProbeError;

impl Loop for Probe {
    type Error = ProbeError;

    fn name(&self) -> &'static str {
        self.name
    }

    fn schedule(&self) -> Schedule {
        self.schedule.clone()
    }

    async fn tick(&self, _tick: &Tick<'_>) -> Result<Progress, ProbeError> {
        let state = &self.state;
        let now = state.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        state.max_in_flight.fetch_max(now, Ordering::SeqCst);
        let mut guard = InFlight(state, false);
        state.started.send_modify(|n| *n += 1);
        let behaviour = *state.behaviour.lock().unwrap();
        let mut progress = Progress::Done;
        match behaviour {
            Behaviour::Return => {}
            Behaviour::FullBatches(n) => {
                if *state.started.borrow() <= n {
                    progress = Progress::More;
                }
            }
            Behaviour::Gated => state.gate.acquire().await.expect("gate").forget(),
            Behaviour::Hang => std::future::pending::<()>().await,
            Behaviour::Take(d) => tokio::time::sleep(d).await,
        }
        guard.1 = true;
        drop(guard);
        state.finished.send_modify(|n| *n += 1);
        Ok(progress)
    }
}

/// A fresh database, an in-memory meter, and a runtime over both.
async fn setup() -> (TestDb, MetricsProbe, Runtime) {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let rt = runtime_for(test_db.db.clone(), &metrics.meter());
    (test_db, metrics, rt)
}

fn runtime_for(db: Db, meter: &opentelemetry::metrics::Meter) -> Runtime {
    let settings = RuntimeConfig { jitter: 0.0, ..RuntimeConfig::default() };
    Runtime::new(db, Health::default(), meter, settings)
}

/// Runners ticking in the background until `stop`.
struct Background {
    shutdown: CancellationToken,
    tracker: TaskTracker,
}

impl Background {
    fn new() -> Self {
        Self { shutdown: CancellationToken::new(), tracker: TaskTracker::new() }
    }

    fn start<L: Loop>(rt: &Runtime, job: L) -> Self {
        let background = Self::new();
        background.add(rt, job);
        background
    }

    fn add<L: Loop>(&self, rt: &Runtime, job: L) {
        rt.spawn(job, &self.tracker, self.shutdown.clone());
    }

    async fn stop(self) {
        self.shutdown.cancel();
        self.tracker.close();
        self.tracker.wait().await;
    }
}

fn probe(name: &'static str, schedule: Schedule, behaviour: Behaviour) -> (Probe, Arc<ProbeState>) {
    let state = ProbeState::new(behaviour);
    (Probe { name, schedule, state: state.clone() }, state)
}

#[tokio::test]
async fn ticks_never_overlap_even_when_a_tick_outlasts_the_interval() {
    let (_test_db, _metrics, rt) = setup().await;
    let schedule = Schedule::every(Duration::from_millis(1), Duration::from_secs(30));
    let (job, state) = probe("overlap", schedule, Behaviour::Gated);
    let background = Background::start(&rt, job);
    for n in 1..=25 {
        state.wait_started(n).await;
        // The interval (1ms) has long passed while this tick waits on the gate.
        assert_eq!(state.in_flight.load(Ordering::SeqCst), 1, "tick {n}: another tick started meanwhile");
        state.gate.add_permits(1);
    }
    background.shutdown.cancel();
    state.gate.add_permits(1000);
    background.stop().await;
    assert_eq!(state.max_in_flight.load(Ordering::SeqCst), 1);
}

#[tokio::test]
async fn a_full_batch_ticks_again_at_once_instead_of_waiting_for_the_interval() {
    let (_test_db, _metrics, rt) = setup().await;
    // An hour-long interval: only drain mode can produce ticks 2..=6.
    let schedule = Schedule::every(Duration::from_secs(3600), Duration::from_secs(30));
    let (job, state) = probe("drainer", schedule, Behaviour::FullBatches(5));
    let background = Background::start(&rt, job);
    state.wait_finished(6).await;
    background.stop().await;
    assert_eq!(state.started(), 6, "after the first non-full batch the loop waits for its interval");
}

#[tokio::test]
async fn a_tick_running_past_its_timeout_is_cancelled_and_counted_as_timeout() {
    let (_test_db, metrics, rt) = setup().await;
    let schedule = Schedule::every(Duration::from_secs(3600), Duration::from_millis(100));
    let (job, state) = probe("slowpoke", schedule, Behaviour::Hang);
    let mut runner = rt.runner(job);

    let report = runner.tick_once().await;
    assert_eq!(report.outcome, Outcome::Timeout);
    assert_eq!(state.cancelled.load(Ordering::SeqCst), 1, "the hung tick future was dropped");
    assert_eq!(state.in_flight.load(Ordering::SeqCst), 0);
    assert_eq!(
        metrics.counter("worker.loop.ticks", &[("loop", "slowpoke"), ("outcome", "timeout")]).await,
        1
    );

    state.set(Behaviour::Return);
    assert_eq!(runner.tick_once().await.outcome, Outcome::Ok);
    assert_eq!(metrics.counter("worker.loop.ticks", &[("loop", "slowpoke"), ("outcome", "ok")]).await, 1);
    let readiness = rt.health.readiness(Ok(()));
    assert_eq!(readiness.loops[0].ticks, 2);
    assert!(readiness.loops[0].last_error.as_deref().unwrap_or("").contains("timeout"));
}

#[tokio::test]
async fn the_interval_is_independent_of_the_tick_timeout() {
    let (_test_db, _metrics, rt) = setup().await;

    // A tick longer than its interval but within its timeout completes normally.
    let schedule = Schedule::every(Duration::from_millis(20), Duration::from_secs(10));
    let (job, _) = probe("long_tick", schedule, Behaviour::Take(Duration::from_millis(200)));
    assert_eq!(rt.runner(job).tick_once().await.outcome, Outcome::Ok);

    // A tick timeout far shorter than the interval cuts the tick at the timeout, not the interval.
    let schedule = Schedule::every(Duration::from_secs(3600), Duration::from_millis(50));
    let (job, _) = probe("short_timeout", schedule, Behaviour::Hang);
    let started = Instant::now();
    assert_eq!(rt.runner(job).tick_once().await.outcome, Outcome::Timeout);
    assert!(started.elapsed() < Duration::from_secs(5), "timeout fired at {:?}", started.elapsed());
}

#[tokio::test]
async fn two_runners_of_a_leader_only_loop_never_tick_together() {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let schedule = Schedule::every(Duration::from_millis(1), Duration::from_secs(30)).leader_only(0x7e57);
    let state = ProbeState::new(Behaviour::Gated);
    let replica = |db: Db| {
        let rt = runtime_for(db, &metrics.meter());
        let job = Probe { name: "leader", schedule: schedule.clone(), state: state.clone() };
        (rt.clone(), rt.runner(job))
    };
    let (rt_a, mut a) = replica(test_db.db.clone());
    let (_rt_b, mut b) = replica(test_db.another_pool());

    // A holds the leader lock while its tick waits on the gate; B must skip without ticking.
    let a_tick = tokio::spawn(async move { (a.tick_once().await, a) });
    state.wait_started(1).await;
    assert_eq!(b.tick_once().await.outcome, Outcome::SkippedNotLeader);
    assert_eq!(state.started(), 1, "B ticked while A led");
    state.gate.add_permits(1);
    let (report, mut a) = a_tick.await.expect("join");
    assert_eq!(report.outcome, Outcome::Ok);

    // Leadership is per tick: with A idle, B leads.
    let b_tick = tokio::spawn(async move { (b.tick_once().await, b) });
    state.wait_started(2).await;
    assert_eq!(a.tick_once().await.outcome, Outcome::SkippedNotLeader);
    state.gate.add_permits(1);
    assert_eq!(b_tick.await.expect("join").0.outcome, Outcome::Ok);

    // Both replicas running flat out: still never two ticks at once.
    state.set(Behaviour::Take(Duration::from_millis(2)));
    let background = Background::new();
    background.add(&rt_a, Probe { name: "leader", schedule: schedule.clone(), state: state.clone() });
    let rt_c = runtime_for(test_db.another_pool(), &metrics.meter());
    background.add(&rt_c, Probe { name: "leader", schedule: schedule.clone(), state: state.clone() });
    state.wait_finished(40).await;
    background.stop().await;
    assert_eq!(state.max_in_flight.load(Ordering::SeqCst), 1, "two replicas ticked at once");
    assert!(metrics.counter("worker.loop.ticks", &[("outcome", "skipped_not_leader")]).await >= 2);
}

#[tokio::test]
async fn shutdown_waits_for_an_in_flight_tick_and_starts_no_new_one() {
    let (_test_db, _metrics, rt) = setup().await;
    let schedule = Schedule::every(Duration::from_millis(1), Duration::from_secs(30));
    let (job, state) = probe("drain", schedule, Behaviour::Gated);
    let background = Background::start(&rt, job);
    state.wait_started(1).await;

    let Background { shutdown, tracker } = background;
    shutdown.cancel();
    tracker.close();
    let done = Arc::new(AtomicBool::new(false));
    let waiter = {
        let (tracker, done) = (tracker.clone(), done.clone());
        tokio::spawn(async move {
            tracker.wait().await;
            done.store(true, Ordering::SeqCst);
        })
    };
    tokio::task::yield_now().await;
    assert!(!done.load(Ordering::SeqCst), "shutdown finished with a tick in flight");
    assert_eq!(tracker.len(), 1, "the runner task is still draining");

    state.gate.add_permits(1);
    tokio::time::timeout(LIMIT, waiter).await.expect("drained").expect("join");
    assert_eq!(state.finished.borrow().to_owned(), 1, "the in-flight tick completed");
    assert_eq!(state.cancelled.load(Ordering::SeqCst), 0, "the in-flight tick was not cut short");
    assert_eq!(state.started(), 1, "no tick started after shutdown");
}

async fn notify(db: &Db, sql: &str) {
    db.get().await.expect("conn").exec(sql, &[]).await.expect("notify");
}

#[tokio::test]
async fn a_burst_of_notifies_wakes_a_loop_a_handful_of_times() {
    let (test_db, _metrics, rt) = setup().await;
    let schedule = Schedule::every(Duration::from_secs(3600), Duration::from_secs(30)).woken_by("burst_test");
    let (job, state) = probe("burst", schedule, Behaviour::Gated);
    let background = Background::start(&rt, job);
    state.wait_started(1).await; // the first tick runs at start and waits on the gate

    let stats = listen::spawn(
        test_db.url.clone(),
        rt.wakes().clone(),
        rt.health.clone(),
        background.shutdown.clone(),
    );
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1))
        .await
        .expect("listener connected")
        .expect("watch");

    // 1,000 notifications in one commit (distinct payloads, so Postgres does not fold them).
    notify(&test_db.db, "SELECT pg_notify('burst_test', g::text) FROM generate_series(1, 1000) g").await;
    let mut received = stats.received.clone();
    tokio::time::timeout(LIMIT, received.wait_for(|n| *n >= 1000))
        .await
        .expect("all delivered")
        .expect("watch");

    // Open the gate wide: a loop that did not coalesce would now run up to 1,000 ticks.
    state.gate.add_permits(10_000);
    state.wait_finished(2).await;
    notify(&test_db.db, "SELECT pg_notify('burst_test', 'sentinel')").await;
    state.wait_finished(3).await;
    let ticks = state.started();
    assert!(ticks <= 4, "1,000 notifies caused {ticks} ticks; expected a handful");

    background.stop().await;
}

#[tokio::test]
async fn a_dropped_listen_connection_is_re_established() {
    let (test_db, _metrics, rt) = setup().await;
    let schedule =
        Schedule::every(Duration::from_secs(3600), Duration::from_secs(30)).woken_by("relisten_test");
    let (job, state) = probe("relisten", schedule, Behaviour::Return);
    let background = Background::start(&rt, job);
    let stats = listen::spawn(
        test_db.url.clone(),
        rt.wakes().clone(),
        rt.health.clone(),
        background.shutdown.clone(),
    );
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("connected").expect("watch");

    let terminated = test_db
        .db
        .get()
        .await
        .expect("conn")
        .fetch_one(
            "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
             WHERE application_name = $1 AND datname = current_database()",
            &[(&listen::APPLICATION_NAME, Type::TEXT)],
        )
        .await
        .expect("terminate listener")
        .get::<_, i64>(0);
    assert_eq!(terminated, 1, "exactly one LISTEN connection per process");
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 2)).await.expect("reconnected").expect("watch");

    // Notifications flow again on the new connection and still wake the loop.
    let before = state.started();
    let mut received = stats.received.clone();
    let seen = *received.borrow();
    notify(&test_db.db, "SELECT pg_notify('relisten_test', 'again')").await;
    tokio::time::timeout(LIMIT, received.wait_for(|n| *n > seen)).await.expect("delivered").expect("watch");
    state.wait_started(before + 1).await;

    background.stop().await;
}

async fn set_paused(db: &Db, name: &str, paused: bool) {
    db.get()
        .await
        .expect("conn")
        .exec(
            "INSERT INTO loop_controls (loop_name, paused) VALUES ($1, $2) \
             ON CONFLICT (loop_name) DO UPDATE SET paused = EXCLUDED.paused",
            &[(&name, Type::TEXT), (&paused, Type::BOOL)],
        )
        .await
        .expect("set paused");
}

#[tokio::test]
async fn a_paused_loop_stops_ticking_on_two_replicas_and_resumes() {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let schedule = Schedule::every(Duration::from_secs(3600), Duration::from_secs(30));
    let (job_a, state_a) = probe("pausable", schedule.clone(), Behaviour::Return);
    let (job_b, state_b) = probe("pausable", schedule, Behaviour::Return);
    let rt_a = runtime_for(test_db.db.clone(), &metrics.meter());
    let rt_b = runtime_for(test_db.another_pool(), &metrics.meter());
    let (mut a, mut b) = (rt_a.runner(job_a), rt_b.runner(job_b));

    assert_eq!(a.tick_once().await.outcome, Outcome::Ok);
    assert_eq!(b.tick_once().await.outcome, Outcome::Ok);

    set_paused(&test_db.db, "pausable", true).await;
    for _ in 0..3 {
        assert_eq!(a.tick_once().await.outcome, Outcome::Paused);
        assert_eq!(b.tick_once().await.outcome, Outcome::Paused);
    }
    assert_eq!((state_a.started(), state_b.started()), (1, 1), "a paused loop ran its tick");
    let readiness = rt_a.health.readiness(Ok(()));
    assert!(readiness.loops[0].paused && readiness.ready, "paused shows on /readyz and is not a failure");
    assert_eq!(metrics.counter("worker.loop.ticks", &[("loop", "pausable"), ("outcome", "paused")]).await, 6);

    set_paused(&test_db.db, "pausable", false).await;
    assert_eq!(a.tick_once().await.outcome, Outcome::Ok);
    assert_eq!(b.tick_once().await.outcome, Outcome::Ok);
    assert_eq!((state_a.started(), state_b.started()), (2, 2));
    assert!(!rt_b.health.readiness(Ok(())).loops[0].paused);
}

#[tokio::test]
async fn a_loop_recovers_by_itself_after_its_database_connections_are_killed() {
    let (test_db, _metrics, rt) = setup().await;
    let schedule = Schedule::every(Duration::from_secs(3600), Duration::from_secs(10));
    let (job, _) = probe("survivor", schedule, Behaviour::Return);
    let mut runner = rt.runner(job);
    assert_eq!(runner.tick_once().await.outcome, Outcome::Ok);

    // Kill every backend of the runtime's pool, as a PostgreSQL restart would.
    let admin = worker::db::connect_direct(&test_db.url, "test-admin").await.expect("admin");
    let killed = admin
        .fetch_one(
            "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
             WHERE datname = current_database() AND application_name = 'worker'",
            &[],
        )
        .await
        .expect("terminate")
        .get::<_, i64>(0);
    assert!(killed >= 1, "the pool had live connections");

    // At most one tick may notice the dead connection; the next one works on a fresh one.
    let first = runner.tick_once().await.outcome;
    let second = runner.tick_once().await.outcome;
    assert!(first == Outcome::Ok || second == Outcome::Ok, "no recovery: {first:?}, {second:?}");
    assert_eq!(runner.tick_once().await.outcome, Outcome::Ok);
}
