//! The shared tick runner, driven with a probe loop against a real database: overlap,
//! timeouts, leader-only mode (and its snapshot), shutdown of ticks and supervised tasks, NOTIFY
//! wakes and payload streams, pause/resume across replicas and what the pause check costs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::TestDb;
use common::metrics::MetricsProbe;
use tokio::sync::{Semaphore, watch};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use worker::db::{Db, Exec};
use worker::health::Health;
use worker::listen::{self, ListenEvent};
use worker::runtime::{Loop, LoopError, Outcome, Progress, Runtime, Schedule, Tick};
use worker::runtime::{LoopConfig, RuntimeConfig};

/// Generous bound for conditions that should hold in milliseconds; reaching it is a failure.
const LIMIT: Duration = Duration::from_secs(15);
/// How long a drain that does not wait is given to show itself (it would resolve at once).
const PREMATURE: Duration = Duration::from_millis(200);

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
    /// Wait for shutdown (the tick context's token), announce it, then wait for the gate.
    UntilShutdownThenGated,
    /// Fail with a [`ProbeError`] carrying this text.
    Fail(&'static str),
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
    saw_shutdown: watch::Sender<bool>,
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
            saw_shutdown: watch::channel(false).0,
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
#[error("probe failed: {0}")]
struct ProbeError(&'static str);

impl LoopError for ProbeError {
    fn metric_label(&self) -> &'static str {
        "probe"
    }
}

impl Loop for Probe {
    type Error = ProbeError;

    fn name(&self) -> &'static str {
        self.name
    }

    fn schedule(&self) -> Schedule {
        self.schedule.clone()
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, ProbeError> {
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
            Behaviour::Fail(message) => {
                guard.1 = true;
                return Err(ProbeError(message));
            }
            Behaviour::UntilShutdownThenGated => {
                tick.shutdown().cancelled().await;
                state.saw_shutdown.send_replace(true);
                state.gate.acquire().await.expect("gate").forget();
            }
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

/// A runtime that reads `loop_controls` before every tick (tests flip pauses and tick at once).
fn runtime_for(db: Db, meter: &opentelemetry::metrics::Meter) -> Runtime {
    let settings =
        RuntimeConfig { jitter: 0.0, controls_refresh: Duration::ZERO, ..RuntimeConfig::default() };
    Runtime::new(db, Health::default(), meter, settings)
}

/// Runners ticking in the background (on one or more runtimes) until `stop`.
struct Background {
    runtimes: std::sync::Mutex<Vec<Runtime>>,
    /// Stops the listener, if a test started one.
    listener: CancellationToken,
}

impl Background {
    fn new() -> Self {
        Self { runtimes: std::sync::Mutex::new(Vec::new()), listener: CancellationToken::new() }
    }

    fn start<L: Loop>(rt: &Runtime, job: L) -> Self {
        let background = Self::new();
        background.add(rt, job);
        background
    }

    fn add<L: Loop>(&self, rt: &Runtime, job: L) {
        rt.spawn(job);
        self.runtimes.lock().unwrap().push(rt.clone());
    }

    async fn stop(self) {
        self.listener.cancel();
        let runtimes = std::mem::take(&mut *self.runtimes.lock().unwrap());
        for rt in &runtimes {
            rt.begin_shutdown();
        }
        for rt in &runtimes {
            tokio::time::timeout(LIMIT, rt.drained()).await.expect("runners stopped");
        }
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
    rt.begin_shutdown();
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
async fn shutdown_is_seen_by_the_tick_in_flight_which_finishes_and_no_new_tick_starts() {
    let (_test_db, _metrics, rt) = setup().await;
    let schedule = Schedule::every(Duration::from_millis(1), Duration::from_secs(30));
    let (job, state) = probe("drain", schedule, Behaviour::UntilShutdownThenGated);
    let background = Background::start(&rt, job);
    state.wait_started(1).await;

    rt.begin_shutdown();
    let mut saw = state.saw_shutdown.subscribe();
    tokio::time::timeout(LIMIT, saw.wait_for(|s| *s))
        .await
        .expect("the tick in flight never saw shutdown through its context")
        .expect("watch");
    // The tick is parked on the gate; a drain that did not wait for it would resolve now.
    let mut drained = tokio::spawn({
        let (rt, state) = (rt.clone(), state.clone());
        async move {
            rt.drained().await;
            *state.finished.borrow()
        }
    });
    assert!(tokio::time::timeout(PREMATURE, &mut drained).await.is_err(), "drained with a tick in flight");

    state.gate.add_permits(1);
    let finished_when_drained = tokio::time::timeout(LIMIT, drained).await.expect("drained").expect("join");
    assert_eq!(finished_when_drained, 1, "the in-flight tick completed before the drain did");
    assert_eq!(state.cancelled.load(Ordering::SeqCst), 0, "the in-flight tick was not cut short");
    assert_eq!(state.started(), 1, "no tick started after shutdown");
    background.stop().await;
}

#[tokio::test]
async fn a_supervised_task_is_cancelled_at_shutdown_and_awaited_before_the_runtime_drains() {
    let (_test_db, _metrics, rt) = setup().await;
    let runners: worker::runtime::TaskSet<u32, i64, ()> = rt.supervisor().task_set("test_runners", ());
    let gate = Arc::new(Semaphore::new(0));
    let cleaned = Arc::new(AtomicBool::new(false));
    let (saw_cancel_tx, mut saw_cancel) = watch::channel(false);
    runners
        .start(7, 1, {
            let (gate, cleaned) = (gate.clone(), cleaned.clone());
            move |mut signal| async move {
                signal.stopped().await;
                saw_cancel_tx.send_replace(true);
                // Cleanup that takes a while (a chat runner returning its chat).
                gate.acquire().await.expect("gate").forget();
                cleaned.store(true, Ordering::SeqCst);
            }
        })
        .expect("task starts");
    assert_eq!(runners.snapshot::<Vec<_>>(), vec![(7, 1)]);

    rt.begin_shutdown();
    tokio::time::timeout(LIMIT, saw_cancel.wait_for(|s| *s)).await.expect("task cancelled").expect("watch");
    let mut drained = tokio::spawn({
        let (rt, cleaned) = (rt.clone(), cleaned.clone());
        async move {
            rt.drained().await;
            cleaned.load(Ordering::SeqCst)
        }
    });
    assert!(
        tokio::time::timeout(PREMATURE, &mut drained).await.is_err(),
        "drained while a supervised task was still cleaning up"
    );
    assert_eq!(runners.start(8, 1, |_| async {}), Err(worker::runtime::StartError::ShuttingDown));
    gate.add_permits(1);
    let cleaned_when_drained = tokio::time::timeout(LIMIT, drained).await.expect("drained").expect("join");
    assert!(cleaned_when_drained, "the drain finished before the task's cleanup");
    assert!(runners.is_empty(), "the task left the registry when it ended");
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

    let stats = rt.listener().start(test_db.url.clone(), rt.health.clone(), background.listener.clone());
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
    let stats = rt.listener().start(test_db.url.clone(), rt.health.clone(), background.listener.clone());
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("connected").expect("watch");

    let terminated = test_db.terminate_listeners().await;
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

#[tokio::test]
async fn a_channel_subscribed_at_run_time_gets_payloads_and_is_told_of_a_reconnect() {
    let (test_db, _metrics, rt) = setup().await;
    let stop = CancellationToken::new();
    let stats = rt.listener().start(test_db.url.clone(), rt.health.clone(), stop.clone());
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("connected").expect("watch");

    // Subscribed after the listener is up; `subscribe` returns once the LISTEN is in place.
    let mut sub = tokio::time::timeout(LIMIT, rt.listener().subscribe("chat_a-b")).await.expect("subscribed");
    notify(&test_db.db, "SELECT pg_notify('chat_a-b', 'one')").await;
    notify(&test_db.db, "SELECT pg_notify('chat_a-b', 'two')").await;
    assert_eq!(next(&mut sub).await, ListenEvent::Notification("one".into()));
    assert_eq!(next(&mut sub).await, ListenEvent::Notification("two".into()));

    let terminated = test_db.terminate_listeners().await;
    assert_eq!(terminated, 1);
    assert_eq!(next(&mut sub).await, ListenEvent::Reconnected, "the subscriber is told to re-read");
    notify(&test_db.db, "SELECT pg_notify('chat_a-b', 'three')").await;
    assert_eq!(next(&mut sub).await, ListenEvent::Notification("three".into()), "re-subscribed");

    // Dropping the subscription UNLISTENs; a later subscriber on another channel still works.
    drop(sub);
    let mut other = rt.listener().subscribe("other").await;
    notify(&test_db.db, "SELECT pg_notify('other', 'x')").await;
    assert_eq!(next(&mut other).await, ListenEvent::Notification("x".into()));
    stop.cancel();
}

async fn next(sub: &mut listen::Subscription) -> ListenEvent {
    tokio::time::timeout(LIMIT, sub.recv()).await.expect("an event in time").expect("listener alive")
}

/// A leader-only loop that records what its transaction looks like from inside and outside.
struct SnapshotProbe {
    key: i64,
    seen: watch::Sender<Option<(String, String, bool)>>,
    db: Db,
}

impl Loop for SnapshotProbe {
    type Error = ProbeError;

    fn name(&self) -> &'static str {
        "snapshot_probe"
    }

    fn schedule(&self) -> Schedule {
        Schedule::every(Duration::from_secs(3600), Duration::from_secs(30)).leader_only(self.key)
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, ProbeError> {
        assert!(tick.leader_tx().is_some(), "a leader-only loop gets its lock transaction");
        let snapshot = tick.snapshot().await.expect("snapshot");
        let row = snapshot
            .fetch_one(
                "SELECT current_setting('transaction_isolation'), current_setting('transaction_read_only')",
                &[],
            )
            .await
            .expect("settings");
        snapshot.finish().await.expect("end the snapshot");
        // From another connection: the leader lock is held right now.
        let other = self.db.get().await.expect("conn");
        let free = other
            .fetch_one("SELECT pg_try_advisory_xact_lock($1)", &[(&self.key, Type::INT8)])
            .await
            .expect("try lock")
            .get::<_, bool>(0);
        self.seen.send_replace(Some((row.get(0), row.get(1), !free)));
        Ok(Progress::Done)
    }
}

#[tokio::test]
async fn a_leader_only_loop_asking_for_a_snapshot_reads_repeatable_read_read_only_under_the_lock() {
    let (test_db, _metrics, rt) = setup().await;
    let seen = watch::channel(None).0;
    let probe = SnapshotProbe { key: 0x5a, seen: seen.clone(), db: test_db.another_pool() };
    assert_eq!(rt.runner(probe).tick_once().await.outcome, Outcome::Ok);
    let (isolation, read_only, lock_held) = seen.borrow().clone().expect("the tick ran");
    assert_eq!(isolation, "repeatable read");
    assert_eq!(read_only, "on");
    assert!(lock_held, "the leader lock was not held during the tick");
}

#[tokio::test]
async fn five_loops_at_200ms_read_loop_controls_about_once_a_second() {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    let settings = RuntimeConfig { jitter: 0.0, ..RuntimeConfig::default() };
    assert_eq!(settings.controls_refresh, Duration::from_secs(1), "the default under test");
    let rt = Runtime::new(test_db.db.clone(), Health::default(), &metrics.meter(), settings);
    let names = ["p1", "p2", "p3", "p4", "p5"];
    let background = Background::new();
    let mut states = Vec::new();
    let started = Instant::now();
    for name in names {
        let (job, state) = probe(
            name,
            Schedule::every(Duration::from_millis(200), Duration::from_secs(5)),
            Behaviour::Return,
        );
        background.add(&rt, job);
        states.push(state);
    }
    // ~2.5 s of ticking: 13 ticks per loop at 200 ms.
    for state in &states {
        state.wait_finished(13).await;
    }
    let elapsed = started.elapsed();
    background.stop().await;
    let ticks: u64 = states.iter().map(|s| s.started()).sum();
    let reads = rt.pauses().reads();
    let allowed = elapsed.as_secs() + 2;
    assert!(ticks >= 65, "{ticks} ticks");
    assert!(reads <= allowed, "{reads} reads of loop_controls in {elapsed:?} for {ticks} ticks");
}

#[tokio::test]
async fn a_failed_tick_is_labelled_by_the_loops_error_policy_and_keeps_its_full_message() {
    let (_test_db, metrics, rt) = setup().await;
    let schedule = Schedule::every(Duration::from_secs(3600), Duration::from_secs(5));
    let (job, state) = probe("failing", schedule, Behaviour::Fail("row 17 had a bad payload"));
    let mut runner = rt.runner(job);
    assert_eq!(runner.tick_once().await.outcome, Outcome::Error);
    state.set(Behaviour::Fail("row 18 had a bad payload"));
    assert_eq!(runner.tick_once().await.outcome, Outcome::Error);
    let labelled = [("loop", "failing"), ("outcome", "error"), ("error", "probe")];
    assert_eq!(metrics.counter("worker.loop.ticks", &labelled).await, 2, "one fixed label per variant");
    let readiness = rt.health.readiness(Ok(()));
    assert_eq!(readiness.loops[0].last_error.as_deref(), Some("probe failed: row 18 had a bad payload"));
}

#[tokio::test]
async fn a_pause_is_pushed_by_notify_and_takes_effect_at_the_next_tick_despite_the_cache() {
    let test_db = TestDb::new().await;
    let metrics = MetricsProbe::new();
    // An hour-long cache: only the NOTIFY can make the runner see the pause.
    let settings = RuntimeConfig {
        jitter: 0.0,
        controls_refresh: Duration::from_secs(3600),
        ..RuntimeConfig::default()
    };
    let rt = Runtime::new(test_db.db.clone(), Health::default(), &metrics.meter(), settings);
    let stop = CancellationToken::new();
    let stats = rt.listener().start(test_db.url.clone(), rt.health.clone(), stop.clone());
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("connected").expect("watch");
    // A name the CLI accepts (the registry's); the probe stands in for that loop.
    let (job, state) = probe(
        "outbox",
        Schedule::every(Duration::from_secs(3600), Duration::from_secs(5)),
        Behaviour::Return,
    );
    let mut runner = rt.runner(job);
    assert_eq!(runner.tick_once().await.outcome, Outcome::Ok);
    assert_eq!(runner.tick_once().await.outcome, Outcome::Ok);

    let mut received = stats.received.clone();
    let seen = *received.borrow();
    worker::controls::set_paused(
        &test_db.db.get().await.expect("conn"),
        "outbox",
        true,
        Some("test"),
        "tests",
    )
    .await
    .expect("pause");
    tokio::time::timeout(LIMIT, received.wait_for(|n| *n > seen)).await.expect("notified").expect("watch");
    assert_eq!(runner.tick_once().await.outcome, Outcome::Paused);

    let seen = *received.borrow();
    worker::controls::set_paused(&test_db.db.get().await.expect("conn"), "outbox", false, None, "tests")
        .await
        .expect("resume");
    tokio::time::timeout(LIMIT, received.wait_for(|n| *n > seen)).await.expect("notified").expect("watch");
    assert_eq!(runner.tick_once().await.outcome, Outcome::Ok);
    assert_eq!(state.started(), 3);
    let refused = worker::controls::set_paused(
        &test_db.db.get().await.expect("conn"),
        "chats_heartbeat",
        true,
        None,
        "tests",
    )
    .await;
    assert!(
        matches!(refused, Err(worker::controls::ControlError::NotPausable { .. })),
        "the lease loop cannot be paused: {refused:?}"
    );
    stop.cancel();
}

/// With wakes known to be delivered a woken loop ticks once per NOTIFY and never at its fast
/// interval (zero here: polling would tick back to back, dozens of times per round trip); when
/// the LISTEN connection drops it returns to its fast interval at once, with no NOTIFY at all.
#[tokio::test]
async fn a_loop_in_fallback_mode_ticks_only_when_woken_and_polls_fast_again_once_the_listen_connection_drops()
{
    let (test_db, _metrics, rt) = setup().await;
    let background = Background::new();
    let stats = rt.listener().start(test_db.url.clone(), rt.health.clone(), background.listener.clone());
    let mut connects = stats.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 1)).await.expect("connected").expect("watch");
    // What the wake probe reports when its NOTIFY comes back on this connection.
    let connection = rt.listener().delivery().borrow().connection;
    assert!(rt.listener().report_delivery(connection, listen::Delivery::Delivered));

    let schedule = Schedule::every(Duration::ZERO, Duration::from_secs(30))
        .woken_by_with_fallback("fallback_test", Duration::from_secs(3600));
    let (job, state) = probe("fallback", schedule, Behaviour::Return);
    background.add(&rt, job);
    state.wait_finished(1).await; // the tick at start; then the fallback interval (1 h)
    // Acked once LISTENed, after the runner's own subscription (commands are applied in order).
    let mut heard = rt.listener().subscribe("fallback_test").await;

    const WAKES: u64 = 20;
    for n in 1..=WAKES {
        notify(&test_db.db, "SELECT pg_notify('fallback_test', '')").await;
        assert_eq!(next(&mut heard).await, ListenEvent::Notification(String::new()));
        state.wait_finished(1 + n).await;
    }
    assert_eq!(state.started(), 1 + WAKES, "one tick per wake, none at the fast interval");

    // The connection drops (and comes back, but no probe vouches for it): fast polling again.
    assert_eq!(test_db.terminate_listeners().await, 1);
    state.wait_finished(1 + WAKES + 100).await;

    background.stop().await;
}

/// Each fallback key is validated against the interval it stands in for, by its own name.
#[test]
fn a_fallback_interval_shorter_than_its_interval_is_refused_by_its_key() {
    use worker::chats::ChatsConfig;
    use worker::outbox::OutboxConfig;
    use worker::prebuilds::PrebuildsConfig;
    let short = Duration::from_millis(100);
    let outbox = OutboxConfig { fallback_interval: Some(short), ..OutboxConfig::default() };
    let chats = ChatsConfig { acquire_fallback_interval: Some(short), ..ChatsConfig::default() };
    let prebuilds = PrebuildsConfig { fallback_interval: Some(short), ..PrebuildsConfig::default() };
    let runtime = RuntimeConfig { controls_fallback_refresh: Some(short), ..RuntimeConfig::default() };
    assert_eq!(outbox.validate().map_err(|v| v.key), Err("fallback_interval".to_owned()));
    assert_eq!(chats.validate().map_err(|v| v.key), Err("acquire_fallback_interval".to_owned()));
    assert_eq!(prebuilds.validate().map_err(|v| v.key), Err("fallback_interval".to_owned()));
    assert_eq!(runtime.validate().map_err(|v| v.key), Err("controls_fallback_refresh".to_owned()));
    assert!(OutboxConfig::default().validate().is_ok());
    assert!(ChatsConfig::default().validate().is_ok());
    assert!(PrebuildsConfig::default().validate().is_ok());
    assert!(RuntimeConfig::default().validate().is_ok());

    // Unset, a fallback is its default or the interval, whichever is longer: a config that slowed
    // a loop down before the key existed still validates and is never sped up.
    let slow = OutboxConfig {
        base: LoopConfig::new(Duration::from_secs(3600), Duration::from_secs(10)),
        ..OutboxConfig::default()
    };
    assert!(slow.validate().is_ok());
    assert_eq!(slow.fallback_interval(), Duration::from_secs(3600));
    assert_eq!(OutboxConfig::default().fallback_interval(), Duration::from_secs(5));
    assert_eq!(ChatsConfig::default().acquire_fallback_interval(), Duration::from_secs(10));
    assert_eq!(PrebuildsConfig::default().fallback_interval(), Duration::from_secs(60));
    assert_eq!(RuntimeConfig::default().controls_fallback_refresh(), Duration::from_secs(60));
}

/// The readiness probe pings every 10 s while the database answers, not every second; a database
/// that stops answering still turns `/readyz` unready within that plus the ping's timeout.
#[tokio::test]
async fn readiness_turns_unready_when_the_database_stops_answering_despite_the_slower_ping() {
    use worker::db::DatabaseConfig;
    let test_db = TestDb::new().await;
    let admin = test_db.db.get().await.expect("conn");
    let role = format!("worker_ready_{}", uuid::Uuid::new_v4().simple());
    admin.exec(&format!("CREATE ROLE {role} LOGIN"), &[]).await.expect("role");
    let url = format!("postgres://{role}@127.0.0.1:5432/{}", test_db.name);
    let db = Db::new(&DatabaseConfig { url, pool_size: 2, ..DatabaseConfig::default() }).expect("pool");
    let health = Health::default();
    let stop = CancellationToken::new();
    let probe = tokio::spawn(worker::health::probe(health.clone(), db, stop.clone().cancelled_owned()));
    let database = || health.readyz(true).database;
    common::eventually(LIMIT, "the database ready", || async { database() == "ok" }).await;

    // Its connections end and no new one may log in: the database is gone for this worker.
    admin.exec(&format!("ALTER ROLE {role} NOLOGIN"), &[]).await.expect("no more logins");
    admin
        .exec(
            &format!("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = '{role}'"),
            &[],
        )
        .await
        .expect("terminate");
    let bound = worker::health::IDLE_PROBE_INTERVAL + Duration::from_secs(5);
    common::eventually(bound, "the database unready", || async { database() != "ok" }).await;
    assert!(!health.is_ready());

    stop.cancel();
    probe.await.expect("probe stopped");
    admin.exec(&format!("DROP ROLE {role}"), &[]).await.expect("drop role");
}
