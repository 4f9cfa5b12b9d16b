//! The tick-loop runner shared by every loop, and the rest of what loops run on.
//!
//! A loop implements [`Loop`] (a name, a [`Schedule`] and `tick`); [`Runner`] gives it
//! everything else: non-overlapping ticks, a tick timeout separate from the interval, ±jitter,
//! drain mode (tick again at once after a full batch, up to a bound), error backoff, an optional
//! leader-only mode (`pg_try_advisory_xact_lock` in a transaction held for the whole tick, and a
//! REPEATABLE READ snapshot taken under it on demand), early wakes from a NOTIFY channel (see [`crate::listen`])
//! and a slower fallback interval while that channel is known to deliver ([`cadence`]),
//! pause/resume through `loop_controls` ([`pauses`]), per-loop metrics labelled by the loop's own
//! error policy ([`LoopError`]), health state and rate-limited error logs. No loop spawns its own
//! ticker.
//!
//! - [`tick`]: the [`Tick`] context every tick receives.
//! - [`supervisor`]: long-lived tasks that outlive a tick (chat runners), drained at shutdown.
//! - [`lease`]: this worker's lease state, published by the lease loop to the others.
//! - [`pauses`]: the `loop_controls` cache.
//!
//! Shutdown ([`Runtime::begin_shutdown`]) stops new ticks and cancels every supervised task at
//! once; [`Runtime::drained`] resolves when both in-flight ticks and tasks have ended.

mod config;
pub mod lease;
pub mod pauses;
pub mod supervisor;
pub mod tick;

use std::sync::Arc;
use std::time::{Duration, Instant};

use opentelemetry::context::FutureExt as _;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use opentelemetry::trace::{SpanBuilder, Status, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use self::config::{LoopConfig, RuntimeConfig, check_fallback, fallback_or};
pub use self::lease::{LeasePublisher, LeaseState, LeaseStatus, LeaseWatch};
pub use self::supervisor::{StartError, StopSignal, Supervisor, TaskSet};
pub use self::tick::Tick;
use crate::db::{self, Db, DbError, Transaction};
use crate::health::{self, Health, LoopFacts, TickError, TickRecord};
use crate::identity::WorkerIdentity;
use crate::listen::{Delivery, Listener, Verdict};
use crate::telemetry::traces;

/// Ceiling of the delay after repeated failed ticks (never below the loop's own interval).
pub const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(30);

/// Ceiling of the delay after a failed tick while the database cannot be reached (at some time
/// since the tick started, [`Db::unreachable_since`]): looking again costs one connect, bounded
/// by `database.connect_timeout`, and every loop should tick again within seconds of the
/// database's return, not up to [`MAX_ERROR_BACKOFF`] later (readiness waits for every loop).
pub const DB_RECONNECT_CHECK: Duration = Duration::from_secs(2);

/// When and how a loop ticks.
#[derive(Debug, Clone)]
pub struct Schedule {
    pub interval: Duration,
    /// Bounds one tick; independent of the interval (a 10s loop may have a 30s timeout).
    pub tick_timeout: Duration,
    /// Leader-only loops name an advisory lock key; at most one replica ticks at a time.
    pub leader_key: Option<i64>,
    /// A NOTIFY channel whose notifications wake the loop before its interval.
    pub wake_channel: Option<&'static str>,
    /// With a wake channel: the interval while the LISTEN connection is known to deliver
    /// ([`Delivery::Delivered`]); the loop then polls only as a fallback for lost wakes.
    pub fallback_interval: Option<Duration>,
    /// An in-process wake (e.g. a runner ended: a slot is free), besides the channel's.
    pub local_wake: Option<Arc<Notify>>,
    /// Ceiling of the pause after failed (or timed-out) ticks; never below the interval.
    pub max_backoff: Duration,
    /// Whether `worker loop pause` applies (checked before each tick, on the shared pool).
    pub pausable: bool,
}

impl Schedule {
    pub fn every(interval: Duration, tick_timeout: Duration) -> Self {
        Self {
            interval,
            tick_timeout,
            leader_key: None,
            wake_channel: None,
            fallback_interval: None,
            local_wake: None,
            max_backoff: MAX_ERROR_BACKOFF,
            pausable: true,
        }
    }

    /// After a failure or a timeout the next tick comes one interval later, as after a success:
    /// for a loop whose lateness costs more than its retries (the lease).
    #[must_use]
    pub fn without_backoff(mut self) -> Self {
        self.max_backoff = Duration::ZERO;
        self
    }

    /// Never paused, and no pause check (a read on the shared pool) before its ticks: for a
    /// loop whose pause would do harm (the lease: every agent would be killed).
    #[must_use]
    pub fn unpausable(mut self) -> Self {
        self.pausable = false;
        self
    }

    /// Leader only: the tick runs while this replica holds `pg_try_advisory_xact_lock(key)` in
    /// a READ COMMITTED transaction ([`Tick::leader_tx`]); a loop that needs one consistent
    /// view takes [`Tick::snapshot`] under that lock.
    #[must_use]
    pub fn leader_only(mut self, key: i64) -> Self {
        self.leader_key = Some(key);
        self
    }

    #[must_use]
    pub fn woken_by(mut self, channel: &'static str) -> Self {
        self.wake_channel = Some(channel);
        self
    }

    /// Woken by `channel`, and polling only every `fallback` while that channel is known to
    /// deliver (a probe on the current LISTEN connection came back); back to the interval, at
    /// once, when the connection drops or reconnects or a probe hears nothing. A `fallback` no
    /// longer than the interval changes nothing.
    #[must_use]
    pub fn woken_by_with_fallback(self, channel: &'static str, fallback: Duration) -> Self {
        let mut schedule = self.woken_by(channel);
        schedule.fallback_interval = (fallback > schedule.interval).then_some(fallback);
        schedule
    }

    /// Also woken (before the interval) when `notify` is notified in this process.
    #[must_use]
    pub fn woken_locally_by(mut self, notify: Arc<Notify>) -> Self {
        self.local_wake = Some(notify);
        self
    }

    /// The longest pause between two healthy ticks: the fallback interval, if there is one.
    pub fn slowest_interval(&self) -> Duration {
        self.fallback_interval.map_or(self.interval, |fallback| fallback.max(self.interval))
    }

    /// How long after its last completed tick a loop still counts as healthy (at its slowest
    /// cadence: a loop in fallback mode is not wedged for ticking every fallback interval).
    pub fn staleness_limit(&self) -> Duration {
        let interval = self.slowest_interval();
        (interval * 3).max(self.tick_timeout + interval)
    }

    fn facts(&self) -> LoopFacts {
        LoopFacts {
            interval: self.interval,
            tick_timeout: self.tick_timeout,
            staleness_limit: self.staleness_limit(),
            leader_only: self.leader_key.is_some(),
        }
    }
}

/// What a successful tick found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Progress {
    /// Nothing more to do now: wait for the interval (or a wake).
    Done,
    /// A full batch was processed: tick again at once (bounded by `runtime.max_drain_ticks`).
    More,
}

/// A loop's error policy, kept apart from the work (as kube-rs keeps `error_policy` apart from
/// `reconcile`).
pub trait LoopError: std::error::Error + Send + Sync + 'static {
    /// A fixed string per variant: the `error` attribute of `worker.loop.ticks` and the key on
    /// which repeated failures are folded in the log. Never built from `Debug` or message text
    /// (that would mint a label value per row id or timestamp), so `Display` can say everything.
    fn metric_label(&self) -> &'static str;

    /// Whether trying again later can succeed without anyone acting (a database restart, a
    /// Redis outage). Transient failures are logged as warnings, the others as errors.
    fn is_transient(&self) -> bool {
        true
    }

    /// The longest pause before the next try after this failure, when it is shorter than
    /// [`MAX_ERROR_BACKOFF`]: for failures whose end is free to notice (a Redis client that is
    /// reconnecting on its own), so work resumes within seconds of the outage, not up to 30 s.
    fn backoff_cap(&self) -> Option<Duration> {
        None
    }
}

impl LoopError for DbError {
    fn metric_label(&self) -> &'static str {
        match self {
            DbError::Url(_) => "db_config",
            DbError::Pool(_) => "db_pool",
            DbError::Postgres(e) if e.is_closed() => "db_connection",
            DbError::Postgres(_) => match self.code() {
                Some("57014") => "db_statement_timeout",
                Some("40001" | "40P01") => "db_conflict",
                Some(code) if code.starts_with("08") || code.starts_with("57P") => "db_connection",
                Some(_) => "db_statement",
                None => "db_connection",
            },
        }
    }

    fn is_transient(&self) -> bool {
        !matches!(self, DbError::Url(_))
    }
}

/// What the rest of the process knows of a loop without running it: each loop module declares
/// its own as `INFO`, and [`crate::loops::ALL`] lists them.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LoopInfo {
    /// What `worker loop pause NAME` accepts and the `loop` attribute of every metric.
    pub name: &'static str,
    /// The config table with this loop's `enabled`, interval and limits.
    pub config_table: &'static str,
    /// Its interval key in that table (`interval`, or `acquire_interval` where a table serves
    /// several loops).
    pub interval_key: &'static str,
    pub about: &'static str,
    /// Whether `worker loop pause` may stop it (its `Schedule::pausable` says the same).
    pub pausable: bool,
}

/// One background loop.
pub trait Loop: Send + Sync + 'static {
    type Error: LoopError;

    fn name(&self) -> &'static str;

    fn schedule(&self) -> Schedule;

    /// One unit of work. Must not block the thread; bounded by `schedule().tick_timeout`.
    fn tick(&self, tick: &Tick<'_>) -> impl Future<Output = Result<Progress, Self::Error>> + Send;
}

/// How a tick ended, as reported in metrics and /readyz.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Ok,
    Error,
    Timeout,
    SkippedNotLeader,
    Paused,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::Error => "error",
            Outcome::Timeout => "timeout",
            Outcome::SkippedNotLeader => "skipped_not_leader",
            Outcome::Paused => health::PAUSED,
        }
    }

    /// Whether the loop did what it is supposed to do this tick (for readiness).
    pub fn completed(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::SkippedNotLeader | Outcome::Paused)
    }
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Result of one tick, as the runner saw it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TickReport {
    pub outcome: Outcome,
    pub progress: Progress,
}

/// Per-loop instruments (`worker.loop.*`), shared by every runner of a process.
#[derive(Clone)]
pub struct LoopMetrics {
    ticks: Counter<u64>,
    duration: Histogram<f64>,
}

impl LoopMetrics {
    pub fn new(meter: &Meter) -> Self {
        Self {
            ticks: meter
                .u64_counter("worker.loop.ticks")
                .with_description("Ticks by loop and outcome (and error kind, for failed ticks)")
                .build(),
            duration: meter
                .f64_histogram("worker.loop.tick.duration")
                .with_unit("s")
                .with_description("Wall time of one tick")
                .build(),
        }
    }
}

/// What every runner of a process shares.
#[derive(Clone)]
pub struct Runtime {
    pub db: Db,
    pub health: Health,
    metrics: LoopMetrics,
    settings: RuntimeConfig,
    worker: Arc<WorkerIdentity>,
    listener: Listener,
    pauses: pauses::Pauses,
    lease: LeasePublisher,
    supervisor: Supervisor,
    /// Stops the tick loops (not the supervised tasks: see [`Runtime::begin_shutdown`]).
    shutdown: CancellationToken,
    loops: TaskTracker,
}

impl Runtime {
    /// A runtime for a fresh worker identity (tests); the daemon passes its own with
    /// [`Runtime::for_worker`].
    pub fn new(db: Db, health: Health, meter: &Meter, settings: RuntimeConfig) -> Self {
        Self::for_worker(db, health, meter, settings, WorkerIdentity::generate())
    }

    pub fn for_worker(
        db: Db,
        health: Health,
        meter: &Meter,
        settings: RuntimeConfig,
        worker: WorkerIdentity,
    ) -> Self {
        let listener = Listener::default();
        let controls_changed = listener.wake_on(pauses::CHANNEL);
        Self {
            pauses: pauses::Pauses::new(
                db.clone(),
                (settings.controls_refresh, settings.controls_fallback_refresh()),
                controls_changed,
                listener.delivery(),
            ),
            db,
            health,
            metrics: LoopMetrics::new(meter),
            settings,
            worker: Arc::new(worker),
            listener,
            lease: LeasePublisher::default(),
            supervisor: Supervisor::default(),
            shutdown: CancellationToken::new(),
            loops: TaskTracker::new(),
        }
    }

    /// The process's LISTEN connection; loops subscribe through their [`Schedule`], streams
    /// directly. Started by the daemon (subscriptions made before that wait for it).
    pub fn listener(&self) -> &Listener {
        &self.listener
    }

    pub fn worker(&self) -> &WorkerIdentity {
        &self.worker
    }

    /// Where long-lived tasks are started.
    pub fn supervisor(&self) -> &Supervisor {
        &self.supervisor
    }

    /// The lease state, for loops that must react to it outside a tick.
    pub fn lease(&self) -> LeaseWatch {
        self.lease.watch()
    }

    /// For the lease loop only: where it publishes what its renewals found.
    pub fn lease_publisher(&self) -> LeasePublisher {
        self.lease.clone()
    }

    pub fn pauses(&self) -> &pauses::Pauses {
        &self.pauses
    }

    pub fn runner<L: Loop>(&self, job: L) -> Runner<L> {
        let schedule = job.schedule();
        let name = job.name();
        self.health.register(name, schedule.facts());
        let wake = schedule.wake_channel.map(|channel| self.listener.wake_on(channel));
        let delivery = schedule.fallback_interval.and(wake.as_ref()).map(|_| self.listener.delivery());
        Runner {
            job: Arc::new(job),
            rt: self.clone(),
            name_attr: KeyValue::new("loop", name),
            errors: ErrorLog::new(self.settings.error_log_interval),
            consecutive_failures: 0,
            backoff_cap: MAX_ERROR_BACKOFF,
            schedule,
            wake,
            delivery,
        }
    }

    /// Creates a runner for `job` and runs it until [`Runtime::begin_shutdown`].
    pub fn spawn<L: Loop>(&self, job: L) {
        let runner = self.runner(job);
        self.loops.spawn(runner.run(self.shutdown.clone()));
    }

    /// Shutdown, first step: no tick starts any more (ticks in flight see [`Tick::shutdown`]
    /// fire and may finish) and every supervised task is cancelled.
    pub fn begin_shutdown(&self) {
        self.shutdown.cancel();
        self.loops.close();
        self.supervisor.cancel_all();
    }

    /// Resolves once, after [`Runtime::begin_shutdown`], every tick and every supervised task
    /// has ended.
    pub async fn drained(&self) {
        tokio::join!(self.loops.wait(), self.supervisor.wait());
    }

    fn tick_context<'a>(
        &self,
        deadline: tokio::time::Instant,
        leader: Option<&'a Transaction<'a>>,
    ) -> Tick<'a> {
        Tick {
            db: self.db.clone(),
            deadline,
            shutdown: self.shutdown.clone(),
            worker: self.worker.clone(),
            lease: self.lease.watch(),
            leader,
        }
    }
}

/// Why an attempt failed: the runtime's own statements, or the loop.
#[derive(Debug, thiserror::Error)]
enum AttemptError<E> {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Loop(E),
}

impl<E: LoopError> AttemptError<E> {
    fn metric_label(&self) -> &'static str {
        match self {
            AttemptError::Db(e) => e.metric_label(),
            AttemptError::Loop(e) => e.metric_label(),
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            AttemptError::Db(e) => e.is_transient(),
            AttemptError::Loop(e) => e.is_transient(),
        }
    }

    fn backoff_cap(&self) -> Option<Duration> {
        match self {
            AttemptError::Db(e) => e.backoff_cap(),
            AttemptError::Loop(e) => e.backoff_cap(),
        }
    }
}

enum Attempt {
    Ticked(Progress),
    NotLeader,
    Paused,
}

/// A failed tick as the runner logs it.
struct Failure {
    label: &'static str,
    message: String,
    transient: bool,
    backoff_cap: Duration,
}

/// Drives one [`Loop`].
pub struct Runner<L: Loop> {
    job: Arc<L>,
    rt: Runtime,
    name_attr: KeyValue,
    schedule: Schedule,
    wake: Option<Arc<Notify>>,
    /// Whether the wake channel is known to deliver (only with a fallback interval).
    delivery: Option<tokio::sync::watch::Receiver<Verdict>>,
    errors: ErrorLog,
    consecutive_failures: u32,
    /// The backoff cap of the last failure ([`LoopError::backoff_cap`]).
    backoff_cap: Duration,
}

impl<L: Loop> Runner<L> {
    pub fn name(&self) -> &'static str {
        self.job.name()
    }

    /// One complete tick: pause check, leader lock, the loop's work under the tick timeout,
    /// then metrics, health and logs. Dropping the future cancels the tick (and rolls back).
    pub async fn tick_once(&mut self) -> TickReport {
        let name = self.job.name();
        let started = Instant::now();
        let deadline = tokio::time::Instant::now() + self.schedule.tick_timeout;
        // With traces on, the tick's span is the current context of everything the tick awaits
        // (a turn it starts, a GitHub request, a sweep).
        let span = traces::start_span(&Context::current(), || {
            SpanBuilder::from_name(format!("tick {name}")).with_attributes([KeyValue::new("loop", name)])
        });
        let attempt = match &span {
            Some(cx) => {
                tokio::time::timeout_at(deadline, self.attempt(deadline).with_context(cx.clone())).await
            }
            None => tokio::time::timeout_at(deadline, self.attempt(deadline)).await,
        };
        let elapsed = started.elapsed();

        let (outcome, progress, failure) = match attempt {
            Ok(Ok(Attempt::Ticked(progress))) => (Outcome::Ok, progress, None),
            Ok(Ok(Attempt::NotLeader)) => (Outcome::SkippedNotLeader, Progress::Done, None),
            Ok(Ok(Attempt::Paused)) => (Outcome::Paused, Progress::Done, None),
            Ok(Err(error)) => {
                let failure = Failure {
                    label: error.metric_label(),
                    message: error.to_string(),
                    transient: error.is_transient(),
                    backoff_cap: error
                        .backoff_cap()
                        .unwrap_or(MAX_ERROR_BACKOFF)
                        .min(self.schedule.max_backoff),
                };
                (Outcome::Error, Progress::Done, Some(failure))
            }
            Err(_) => {
                let message = format!("tick exceeded its timeout of {:?}", self.schedule.tick_timeout);
                (
                    Outcome::Timeout,
                    Progress::Done,
                    Some(Failure {
                        label: "timeout",
                        message,
                        transient: true,
                        backoff_cap: backoff_cap(&self.schedule, None),
                    }),
                )
            }
        };

        let mut attrs = vec![self.name_attr.clone(), KeyValue::new("outcome", outcome.as_str())];
        if let Some(failure) = &failure {
            attrs.push(KeyValue::new("error", failure.label));
        }
        if let Some(cx) = span {
            let span = cx.span();
            span.set_attributes(attrs.iter().skip(1).cloned());
            if let Some(failure) = &failure {
                span.set_status(Status::error(failure.message.clone()));
            }
            span.end();
        }
        self.rt.metrics.ticks.add(1, &attrs);
        self.rt.metrics.duration.record(elapsed.as_secs_f64(), std::slice::from_ref(&self.name_attr));
        let record = TickRecord {
            outcome: outcome.as_str(),
            completed: outcome.completed(),
            error: failure.as_ref().map(|f| TickError { label: f.label, message: &f.message }),
        };
        self.rt.health.record(name, record);
        match failure {
            None => {
                self.consecutive_failures = 0;
                if let Some(repeats) = self.errors.clear() {
                    tracing::info!(target: "worker::runtime", loop_name = name, suppressed = repeats, "loop recovered");
                }
                tracing::trace!(target: "worker::runtime", loop_name = name, %outcome, elapsed_ms = elapsed.as_millis() as u64, "tick");
            }
            Some(failure) => {
                if may_be_the_database(failure.label) {
                    self.rt.db.verify_next_checkout();
                }
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                self.backoff_cap =
                    outage_backoff_cap(failure.backoff_cap, self.rt.db.unreachable_since(started));
                if let Some(repeats) = self.errors.should_log(failure.label, Instant::now()) {
                    log_failure(name, outcome, &failure, repeats, self.consecutive_failures);
                }
            }
        }
        TickReport { outcome, progress }
    }

    async fn attempt(&self, deadline: tokio::time::Instant) -> Result<Attempt, AttemptError<L::Error>> {
        if self.schedule.pausable && self.rt.pauses.is_paused(self.job.name()).await? {
            return Ok(Attempt::Paused);
        }
        let Some(key) = self.schedule.leader_key else {
            let tick = self.rt.tick_context(deadline, None);
            let progress = self.job.tick(&tick).await.map_err(AttemptError::Loop)?;
            return Ok(Attempt::Ticked(progress));
        };
        let db = &self.rt.db;
        let mut conn = db.get().await?;
        let tx = db::begin(&mut conn, db.tx_limits()).await?;
        if !db::try_xact_lock(&tx, key).await? {
            return Ok(Attempt::NotLeader);
        }
        let tick = self.rt.tick_context(deadline, Some(&tx));
        let progress = self.job.tick(&tick).await.map_err(AttemptError::Loop)?;
        drop(tick);
        db::commit(tx).await?;
        Ok(Attempt::Ticked(progress))
    }

    /// Ticks until `shutdown`. A tick in flight when shutdown starts is allowed to finish
    /// (bounded by its timeout; it sees [`Tick::shutdown`] fire); no new tick starts after it.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let name = self.job.name();
        tracing::info!(
            loop_name = name,
            interval_ms = self.schedule.interval.as_millis() as u64,
            tick_timeout_ms = self.schedule.tick_timeout.as_millis() as u64,
            leader_only = self.schedule.leader_key.is_some(),
            wake_channel = self.schedule.wake_channel,
            "loop started"
        );
        let mut drained = 0;
        while !shutdown.is_cancelled() {
            let report = self.tick_once().await;
            if drain_again(report.progress, drained, self.rt.settings.max_drain_ticks) {
                drained += 1;
                tokio::task::yield_now().await;
                continue;
            }
            drained = 0;
            let delivery = self.delivery.as_ref().map_or(Delivery::Unknown, |d| d.borrow().delivery);
            let interval = cadence(&self.schedule, delivery, report.progress, self.consecutive_failures);
            let delay = next_delay(
                interval,
                self.rt.settings.jitter,
                self.consecutive_failures,
                self.backoff_cap,
                rand::random::<f64>(),
            );
            // While backing off from failures a wake must not cut the backoff short (its permit
            // stays stored and is honoured by the next wait).
            let healthy = self.consecutive_failures == 0;
            let wake = self.wake.clone().filter(|_| healthy);
            let local_wake = self.schedule.local_wake.clone().filter(|_| healthy);
            // Polling slowly because wakes are delivered: tick at once when that stops being known.
            let slow = self.delivery.as_mut().filter(|_| interval > self.schedule.interval);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
                _ = wait_for(wake) => {}
                _ = wait_for(local_wake) => {}
                _ = delivery_lost(slow) => {}
            }
        }
        tracing::info!(loop_name = name, "loop stopped");
    }
}

fn log_failure(name: &'static str, outcome: Outcome, failure: &Failure, repeats: u64, consecutive: u32) {
    let Failure { label, message, transient, .. } = failure;
    if *transient {
        tracing::warn!(
            target: "worker::runtime",
            loop_name = name,
            %outcome,
            error_kind = label,
            error = %message,
            repeated = repeats,
            consecutive_failures = consecutive,
            "tick failed"
        );
    } else {
        tracing::error!(
            target: "worker::runtime",
            loop_name = name,
            %outcome,
            error_kind = label,
            error = %message,
            repeated = repeats,
            consecutive_failures = consecutive,
            "tick failed; this will not fix itself"
        );
    }
}

async fn wait_for(wake: Option<Arc<Notify>>) {
    match wake {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

/// Resolves when the wake channel is no longer known to deliver (never without a watch, or
/// once the listener is gone).
async fn delivery_lost(delivery: Option<&mut tokio::sync::watch::Receiver<Verdict>>) {
    if let Some(delivery) = delivery
        && delivery.wait_for(|v| v.delivery != Delivery::Delivered).await.is_ok()
    {
        return;
    }
    std::future::pending().await
}

/// The interval before the next tick: the fallback interval while the loop's wake channel is
/// known to deliver, its ticks succeed and its last tick finished its work; the interval
/// otherwise (wakes unproven; failing: backoff starts from the fast interval, as without a
/// fallback; a full batch left after the drain budget: the backlog needs no wake to be found).
pub fn cadence(
    schedule: &Schedule,
    delivery: Delivery,
    last: Progress,
    consecutive_failures: u32,
) -> Duration {
    match schedule.fallback_interval {
        Some(fallback)
            if schedule.wake_channel.is_some()
                && delivery == Delivery::Delivered
                && last == Progress::Done
                && consecutive_failures == 0 =>
        {
            fallback.max(schedule.interval)
        }
        _ => schedule.interval,
    }
}

/// Whether to tick again at once: after a full batch, while the drain budget lasts (so one busy
/// loop cannot starve the others or spin forever on a batch that never shrinks).
pub fn drain_again(progress: Progress, drained_so_far: u32, max_drain_ticks: u32) -> bool {
    progress == Progress::More && drained_so_far < max_drain_ticks
}

/// Whether a failed tick's label leaves the database path in doubt: a tick that timed out, or a
/// database error (`db_*`), makes the next checkouts verify their connection
/// ([`Db::verify_next_checkout`]); a Redis or provider failure does not cost that round trip.
pub fn may_be_the_database(label: &str) -> bool {
    label == "timeout" || label.starts_with("db_")
}

/// A failed tick's backoff cap, at most [`DB_RECONNECT_CHECK`] when the database could not be
/// reached during the tick ([`Db::unreachable_since`] its start): whatever ended the tick (a pool
/// error, a statement on a dead connection, its timeout), what the loop waits for is the
/// database, and noticing its return is cheap.
pub fn outage_backoff_cap(cap: Duration, database_unreachable: bool) -> Duration {
    if database_unreachable { cap.min(DB_RECONNECT_CHECK) } else { cap }
}

/// The backoff cap after a failure: the error's own ([`LoopError::backoff_cap`]; `None` for a
/// timeout), within the schedule's ([`Schedule::max_backoff`]).
pub fn backoff_cap(schedule: &Schedule, error_cap: Option<Duration>) -> Duration {
    error_cap.unwrap_or(MAX_ERROR_BACKOFF).min(schedule.max_backoff).min(MAX_ERROR_BACKOFF)
}

/// The pause before the next tick: `interval` (the loop's [`cadence`]) ± jitter, doubled per
/// consecutive failure up to `cap` (the last failure's [`LoopError::backoff_cap`], at most
/// [`MAX_ERROR_BACKOFF`]) or the interval, if that is longer. `unit` is a random number in
/// [0, 1) so the function stays pure.
pub fn next_delay(
    interval: Duration,
    jitter: f64,
    consecutive_failures: u32,
    cap: Duration,
    unit: f64,
) -> Duration {
    let base = if consecutive_failures == 0 {
        interval
    } else {
        let factor = 2u32.saturating_pow(consecutive_failures.min(16));
        interval.saturating_mul(factor).min(cap.max(interval))
    };
    let spread = (unit.clamp(0.0, 1.0) * 2.0 - 1.0) * jitter;
    base.mul_f64((1.0 + spread).max(0.0))
}

/// Logs an error, then stays quiet about the same error for `window`, counting repeats.
#[derive(Debug)]
pub struct ErrorLog {
    window: Duration,
    last: Option<(String, Instant)>,
    suppressed: u64,
}

impl ErrorLog {
    pub fn new(window: Duration) -> Self {
        Self { window, last: None, suppressed: 0 }
    }

    /// `Some(repeats since the last log line)` when this error should be logged now.
    pub fn should_log(&mut self, message: &str, now: Instant) -> Option<u64> {
        match &self.last {
            Some((last, at)) if last == message && now.duration_since(*at) < self.window => {
                self.suppressed += 1;
                None
            }
            _ => {
                let repeats = std::mem::take(&mut self.suppressed);
                self.last = Some((message.to_owned(), now));
                Some(repeats)
            }
        }
    }

    /// A success: forget the last error; `Some(suppressed count)` if repeats went unlogged.
    pub fn clear(&mut self) -> Option<u64> {
        self.last.take()?;
        let repeats = std::mem::take(&mut self.suppressed);
        (repeats > 0).then_some(repeats)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_log_reports_an_error_once_per_window_with_a_count() {
        let mut log = ErrorLog::new(Duration::from_secs(60));
        let t0 = Instant::now();
        assert_eq!(log.should_log("boom", t0), Some(0));
        assert_eq!(log.should_log("boom", t0 + Duration::from_secs(1)), None);
        assert_eq!(log.should_log("boom", t0 + Duration::from_secs(30)), None);
        assert_eq!(log.should_log("boom", t0 + Duration::from_secs(61)), Some(2));
        assert_eq!(log.should_log("other", t0 + Duration::from_secs(62)), Some(0));
        assert_eq!(log.should_log("other", t0 + Duration::from_secs(63)), None);
        assert_eq!(log.clear(), Some(1));
        assert_eq!(log.clear(), None);
    }

    #[test]
    fn full_batches_drain_at_once_up_to_the_bound() {
        assert!(drain_again(Progress::More, 0, 3));
        assert!(drain_again(Progress::More, 2, 3));
        assert!(!drain_again(Progress::More, 3, 3), "the bound stops the drain");
        assert!(!drain_again(Progress::Done, 0, 3));
    }

    #[test]
    fn delay_is_the_interval_within_jitter() {
        let s = Schedule::every(Duration::from_secs(10), Duration::from_secs(30));
        assert_eq!(next_delay(s.interval, 0.1, 0, MAX_ERROR_BACKOFF, 0.5), Duration::from_secs(10));
        assert_eq!(next_delay(s.interval, 0.1, 0, MAX_ERROR_BACKOFF, 0.0), Duration::from_secs(9));
        assert!(next_delay(s.interval, 0.1, 0, MAX_ERROR_BACKOFF, 0.999_999) <= Duration::from_secs(11));
        assert_eq!(next_delay(s.interval, 0.0, 0, MAX_ERROR_BACKOFF, 0.9), Duration::from_secs(10));
    }

    #[test]
    fn a_loop_without_backoff_ticks_again_one_interval_after_a_failure_or_a_timeout() {
        let lease = Schedule::every(Duration::from_secs(1), Duration::from_secs(1)).without_backoff();
        for error_cap in [None, Some(Duration::from_secs(2))] {
            let cap = backoff_cap(&lease, error_cap);
            assert_eq!(next_delay(lease.interval, 0.0, 5, cap, 0.5), Duration::from_secs(1), "{error_cap:?}");
        }
        let other = Schedule::every(Duration::from_secs(1), Duration::from_secs(1));
        assert_eq!(backoff_cap(&other, None), MAX_ERROR_BACKOFF, "a timeout backs off as before");
        assert_eq!(backoff_cap(&other, Some(Duration::from_secs(2))), Duration::from_secs(2));
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap() {
        let s = Schedule::every(Duration::from_millis(200), Duration::from_secs(5));
        assert_eq!(next_delay(s.interval, 0.0, 1, MAX_ERROR_BACKOFF, 0.5), Duration::from_millis(400));
        assert_eq!(next_delay(s.interval, 0.0, 3, MAX_ERROR_BACKOFF, 0.5), Duration::from_millis(1600));
        assert_eq!(next_delay(s.interval, 0.0, 40, MAX_ERROR_BACKOFF, 0.5), MAX_ERROR_BACKOFF);
        let slow = Schedule::every(Duration::from_secs(60), Duration::from_secs(5));
        assert_eq!(
            next_delay(slow.interval, 0.0, 5, MAX_ERROR_BACKOFF, 0.5),
            Duration::from_secs(60),
            "never below the interval"
        );
        let short = Duration::from_secs(2);
        assert_eq!(
            next_delay(s.interval, 0.0, 3, short, 0.5),
            Duration::from_millis(1600),
            "below the cap: as before"
        );
        assert_eq!(next_delay(s.interval, 0.0, 40, short, 0.5), short, "a failure's own cap");
        assert_eq!(
            next_delay(slow.interval, 0.0, 5, short, 0.5),
            Duration::from_secs(60),
            "still never below the interval"
        );
    }

    #[test]
    fn while_the_database_cannot_be_reached_every_failure_is_tried_again_within_the_reconnect_check() {
        let s = Schedule::every(Duration::from_millis(500), Duration::from_secs(5));
        let timeout = backoff_cap(&s, None);
        assert_eq!(outage_backoff_cap(timeout, false), MAX_ERROR_BACKOFF, "a reachable database: as before");
        let cap = outage_backoff_cap(timeout, true);
        assert_eq!(cap, DB_RECONNECT_CHECK);
        assert_eq!(next_delay(s.interval, 0.0, 40, cap, 0.5), DB_RECONNECT_CHECK, "after a long outage");
        let short = Duration::from_millis(700);
        assert_eq!(outage_backoff_cap(short, true), short, "a shorter cap of its own stays");
        let lease = Schedule::every(Duration::from_secs(1), Duration::from_secs(1)).without_backoff();
        assert_eq!(outage_backoff_cap(backoff_cap(&lease, None), true), Duration::ZERO);
    }

    #[test]
    fn only_a_timeout_or_a_database_error_puts_the_pool_in_doubt() {
        for label in ["timeout", "db_connection", "db_pool", "db_statement_timeout"] {
            assert!(may_be_the_database(label), "{label}");
        }
        for label in ["redis_unavailable", "redis_timeout", "provider", "agent_spawn"] {
            assert!(!may_be_the_database(label), "{label}");
        }
    }

    #[test]
    fn a_woken_loop_polls_at_its_fallback_only_while_wakes_are_known_to_be_delivered() {
        let (fast, slow, timeout) =
            (Duration::from_millis(200), Duration::from_secs(5), Duration::from_secs(10));
        let fallback = Schedule::every(fast, timeout).woken_by_with_fallback("ch", slow);
        let woken = Schedule::every(fast, timeout).woken_by("ch");
        let mut unwoken = Schedule::every(fast, timeout);
        unwoken.fallback_interval = Some(slow);
        let shorter = Schedule::every(fast, timeout).woken_by_with_fallback("ch", Duration::from_millis(100));
        use Delivery::{Delivered, NotDelivered, Unknown};
        use Progress::{Done, More};
        // (schedule, delivery, last tick's progress, consecutive failures, interval)
        let table = [
            (&fallback, Delivered, Done, 0, slow),
            (&fallback, NotDelivered, Done, 0, fast),
            (&fallback, Unknown, Done, 0, fast),
            (&fallback, Delivered, Done, 1, fast),
            (&fallback, Delivered, More, 0, fast), // the drain budget ran out with a backlog left
            (&woken, Delivered, Done, 0, fast),
            (&unwoken, Delivered, Done, 0, fast),
            (&shorter, Delivered, Done, 0, fast),
        ];
        for (i, (schedule, delivery, last, failures, interval)) in table.into_iter().enumerate() {
            assert_eq!(cadence(schedule, delivery, last, failures), interval, "row {i}");
        }
        assert_eq!(shorter.fallback_interval, None, "a fallback no longer than the interval is none");
    }

    #[test]
    fn staleness_counts_from_the_fallback_interval() {
        let fast = Duration::from_millis(200);
        let s = Schedule::every(fast, Duration::from_secs(10))
            .woken_by_with_fallback("ch", Duration::from_secs(5));
        assert_eq!(s.slowest_interval(), Duration::from_secs(5));
        assert_eq!(s.staleness_limit(), Duration::from_secs(15));
        let plain = Schedule::every(fast, Duration::from_secs(10)).woken_by("ch");
        assert_eq!(plain.staleness_limit(), Duration::from_millis(10_200));
    }

    #[test]
    fn staleness_limit_covers_a_slow_tick() {
        let s = Schedule::every(Duration::from_secs(10), Duration::from_secs(30));
        assert_eq!(s.staleness_limit(), Duration::from_secs(40));
        let fast = Schedule::every(Duration::from_secs(10), Duration::from_secs(5));
        assert_eq!(fast.staleness_limit(), Duration::from_secs(30));
    }
}
