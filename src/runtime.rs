//! The tick-loop runner shared by every loop.
//!
//! A loop implements [`Loop`] (a name, a [`Schedule`] and `tick`); [`Runner`] gives it
//! everything else: non-overlapping ticks, a tick timeout separate from the interval, ±jitter,
//! drain mode (tick again at once after a full batch, up to a bound), error backoff, an optional
//! leader-only mode (`pg_try_advisory_xact_lock` in a transaction held for the whole tick), early
//! wakes from a NOTIFY channel (see [`crate::listen`]), pause/resume through `loop_controls`,
//! per-loop metrics, health state and rate-limited error logs. No loop spawns its own ticker.

use std::collections::HashMap;
use std::fmt;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Histogram, Meter};
use tokio::sync::Notify;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::RuntimeConfig;
use crate::db::{self, Db, DbError, Exec, Transaction};
use crate::health::Health;

/// Ceiling of the delay after repeated failed ticks (never below the loop's own interval).
pub const MAX_ERROR_BACKOFF: Duration = Duration::from_secs(30);

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
    /// Effective fan-out, reported on /readyz and as a gauge.
    pub concurrency: Option<usize>,
}

impl Schedule {
    pub fn every(interval: Duration, tick_timeout: Duration) -> Self {
        Self { interval, tick_timeout, leader_key: None, wake_channel: None, concurrency: None }
    }

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

    #[must_use]
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = Some(concurrency);
        self
    }

    /// How long after its last completed tick a loop still counts as healthy.
    pub fn staleness_limit(&self) -> Duration {
        (self.interval * 3).max(self.tick_timeout + self.interval)
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

/// Passed to every tick.
pub struct Tick<'a> {
    leader: Option<&'a Transaction<'a>>,
}

impl<'a> Tick<'a> {
    /// For leader-only loops: the transaction that holds the leader lock. Work done in it
    /// commits with the tick and is fenced by the lock.
    pub fn leader_tx(&self) -> Option<&'a Transaction<'a>> {
        self.leader
    }

    /// A tick with no leader transaction, for tests that drive `tick` directly.
    pub fn detached() -> Tick<'static> {
        Tick { leader: None }
    }
}

/// One background loop.
pub trait Loop: Send + Sync + 'static {
    type Error: std::error::Error + Send + Sync + 'static;

    /// Stable name: metric label, log field, `loop_controls` key, `worker loop pause NAME`.
    fn name(&self) -> &'static str;

    fn schedule(&self) -> Schedule;

    fn tick(&self, tick: &Tick<'_>) -> impl Future<Output = Result<Progress, Self::Error>> + Send;
}

/// How a tick ended; the `outcome` label of `worker.loop.ticks`.
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
            Outcome::Paused => "paused",
        }
    }

    /// Whether the loop did what it is supposed to do this tick (for readiness).
    pub fn completed(self) -> bool {
        matches!(self, Outcome::Ok | Outcome::SkippedNotLeader | Outcome::Paused)
    }
}

impl fmt::Display for Outcome {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
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
                .with_description("Ticks by loop and outcome")
                .build(),
            duration: meter
                .f64_histogram("worker.loop.tick.duration")
                .with_unit("s")
                .with_description("Wall time of one tick")
                .build(),
        }
    }
}

/// NOTIFY channel → the loops it wakes. Filled as runners are created, read by the listener.
#[derive(Clone, Default)]
pub struct Wakes {
    by_channel: Arc<Mutex<HashMap<String, Vec<Arc<Notify>>>>>,
}

impl Wakes {
    fn register(&self, channel: &str) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let mut map = self.by_channel.lock().unwrap_or_else(|e| e.into_inner());
        map.entry(channel.to_owned()).or_default().push(notify.clone());
        notify
    }

    pub fn channels(&self) -> Vec<String> {
        let map = self.by_channel.lock().unwrap_or_else(|e| e.into_inner());
        let mut channels: Vec<String> = map.keys().cloned().collect();
        channels.sort();
        channels
    }

    /// Wakes every loop listening on `channel`. `notify_one` stores at most one permit, so a
    /// burst of notifications while a loop is busy coalesces into a single extra tick.
    pub fn wake(&self, channel: &str) {
        let map = self.by_channel.lock().unwrap_or_else(|e| e.into_inner());
        for notify in map.get(channel).into_iter().flatten() {
            notify.notify_one();
        }
    }

    pub fn wake_all(&self) {
        let map = self.by_channel.lock().unwrap_or_else(|e| e.into_inner());
        map.values().flatten().for_each(|n| n.notify_one());
    }
}

/// What every runner of a process shares.
#[derive(Clone)]
pub struct Runtime {
    pub db: Db,
    pub health: Health,
    metrics: LoopMetrics,
    settings: RuntimeConfig,
    wakes: Wakes,
}

impl Runtime {
    pub fn new(db: Db, health: Health, meter: &Meter, settings: RuntimeConfig) -> Self {
        Self { db, health, metrics: LoopMetrics::new(meter), settings, wakes: Wakes::default() }
    }

    pub fn wakes(&self) -> &Wakes {
        &self.wakes
    }

    pub fn runner<L: Loop>(&self, job: L) -> Runner<L> {
        let schedule = job.schedule();
        let name = job.name();
        self.health.register(name, &schedule);
        let wake = schedule.wake_channel.map(|channel| self.wakes.register(channel));
        Runner {
            job: Arc::new(job),
            db: self.db.clone(),
            health: self.health.clone(),
            metrics: self.metrics.clone(),
            name_attr: [KeyValue::new("loop", name)],
            errors: ErrorLog::new(self.settings.error_log_interval),
            jitter: self.settings.jitter,
            max_drain_ticks: self.settings.max_drain_ticks,
            consecutive_failures: 0,
            schedule,
            wake,
        }
    }

    /// Creates a runner for `job` and runs it on `tracker` until `shutdown`.
    pub fn spawn<L: Loop>(&self, job: L, tracker: &TaskTracker, shutdown: CancellationToken) {
        let runner = self.runner(job);
        tracker.spawn(runner.run(shutdown));
    }
}

#[derive(Debug, thiserror::Error)]
enum AttemptError<E> {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Loop(E),
}

enum Attempt {
    Ticked(Progress),
    NotLeader,
    Paused,
}

/// Drives one [`Loop`].
pub struct Runner<L: Loop> {
    job: Arc<L>,
    db: Db,
    health: Health,
    metrics: LoopMetrics,
    name_attr: [KeyValue; 1],
    schedule: Schedule,
    wake: Option<Arc<Notify>>,
    errors: ErrorLog,
    jitter: f64,
    max_drain_ticks: u32,
    consecutive_failures: u32,
}

const IS_PAUSED: &str = "SELECT paused FROM loop_controls WHERE loop_name = $1";

impl<L: Loop> Runner<L> {
    pub fn name(&self) -> &'static str {
        self.job.name()
    }

    /// One complete tick: pause check, leader lock, the loop's work under the tick timeout,
    /// then metrics, health and logs. Dropping the future cancels the tick (and rolls back).
    pub async fn tick_once(&mut self) -> TickReport {
        let name = self.job.name();
        let started = Instant::now();
        let attempt = tokio::time::timeout(self.schedule.tick_timeout, self.attempt()).await;
        let elapsed = started.elapsed();

        let (outcome, progress, error) = match attempt {
            Ok(Ok(Attempt::Ticked(progress))) => (Outcome::Ok, progress, None),
            Ok(Ok(Attempt::NotLeader)) => (Outcome::SkippedNotLeader, Progress::Done, None),
            Ok(Ok(Attempt::Paused)) => (Outcome::Paused, Progress::Done, None),
            Ok(Err(error)) => (Outcome::Error, Progress::Done, Some(error.to_string())),
            Err(_) => (
                Outcome::Timeout,
                Progress::Done,
                Some(format!("tick exceeded its timeout of {:?}", self.schedule.tick_timeout)),
            ),
        };

        self.metrics.ticks.add(1, &[self.name_attr[0].clone(), KeyValue::new("outcome", outcome.as_str())]);
        self.metrics.duration.record(elapsed.as_secs_f64(), &self.name_attr);
        self.health.record(name, outcome, error.as_deref());
        match &error {
            None => {
                self.consecutive_failures = 0;
                if let Some(repeats) = self.errors.clear() {
                    tracing::info!(target: "worker::runtime", loop_name = name, suppressed = repeats, "loop recovered");
                }
                tracing::trace!(target: "worker::runtime", loop_name = name, %outcome, elapsed_ms = elapsed.as_millis() as u64, "tick");
            }
            Some(message) => {
                self.consecutive_failures = self.consecutive_failures.saturating_add(1);
                if let Some(repeats) = self.errors.should_log(message, Instant::now()) {
                    tracing::warn!(
                        target: "worker::runtime",
                        loop_name = name,
                        %outcome,
                        error = %message,
                        repeated = repeats,
                        consecutive_failures = self.consecutive_failures,
                        "tick failed"
                    );
                }
            }
        }
        TickReport { outcome, progress }
    }

    async fn attempt(&self) -> Result<Attempt, AttemptError<L::Error>> {
        {
            let conn = self.db.get().await?;
            let row =
                conn.fetch_opt(IS_PAUSED, &[(&self.job.name(), Type::TEXT)]).await.map_err(DbError::from)?;
            if row.is_some_and(|r| r.get::<_, bool>(0)) {
                return Ok(Attempt::Paused);
            }
        }
        let Some(key) = self.schedule.leader_key else {
            let progress = self.job.tick(&Tick { leader: None }).await.map_err(AttemptError::Loop)?;
            return Ok(Attempt::Ticked(progress));
        };
        let mut conn = self.db.get().await?;
        let tx = db::begin(&mut conn, self.db.statement_timeout()).await?;
        if !db::try_xact_lock(&tx, key).await? {
            return Ok(Attempt::NotLeader);
        }
        let progress = self.job.tick(&Tick { leader: Some(&tx) }).await.map_err(AttemptError::Loop)?;
        tx.commit().await.map_err(DbError::from)?;
        Ok(Attempt::Ticked(progress))
    }

    /// Ticks until `shutdown`. A tick in flight when shutdown starts is allowed to finish
    /// (bounded by its timeout); no new tick starts after it.
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
            if drain_again(report.progress, drained, self.max_drain_ticks) {
                drained += 1;
                tokio::task::yield_now().await;
                continue;
            }
            drained = 0;
            let delay =
                next_delay(&self.schedule, self.jitter, self.consecutive_failures, rand::random::<f64>());
            // While backing off from failures a wake must not cut the backoff short (its permit
            // stays stored and is honoured by the next wait).
            let wake = self.wake.clone().filter(|_| self.consecutive_failures == 0);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(delay) => {}
                _ = wait_for(wake) => {}
            }
        }
        tracing::info!(loop_name = name, "loop stopped");
    }
}

async fn wait_for(wake: Option<Arc<Notify>>) {
    match wake {
        Some(notify) => notify.notified().await,
        None => std::future::pending().await,
    }
}

/// Whether to tick again at once: after a full batch, while the drain budget lasts (so one busy
/// loop cannot starve the others or spin forever on a batch that never shrinks).
pub fn drain_again(progress: Progress, drained_so_far: u32, max_drain_ticks: u32) -> bool {
    progress == Progress::More && drained_so_far < max_drain_ticks
}

/// The pause before the next tick: the interval ± jitter, doubled per consecutive failure up to
/// [`MAX_ERROR_BACKOFF`] (or the interval, if that is longer). `unit` is a random number in
/// [0, 1) so the function stays pure.
pub fn next_delay(schedule: &Schedule, jitter: f64, consecutive_failures: u32, unit: f64) -> Duration {
    let base = if consecutive_failures == 0 {
        schedule.interval
    } else {
        let factor = 2u32.saturating_pow(consecutive_failures.min(16));
        schedule.interval.saturating_mul(factor).min(MAX_ERROR_BACKOFF.max(schedule.interval))
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
        assert_eq!(next_delay(&s, 0.1, 0, 0.5), Duration::from_secs(10));
        assert_eq!(next_delay(&s, 0.1, 0, 0.0), Duration::from_secs(9));
        assert!(next_delay(&s, 0.1, 0, 0.999_999) <= Duration::from_secs(11));
        assert_eq!(next_delay(&s, 0.0, 0, 0.9), Duration::from_secs(10));
    }

    #[test]
    fn failures_back_off_exponentially_up_to_the_cap() {
        let s = Schedule::every(Duration::from_millis(200), Duration::from_secs(5));
        assert_eq!(next_delay(&s, 0.0, 1, 0.5), Duration::from_millis(400));
        assert_eq!(next_delay(&s, 0.0, 3, 0.5), Duration::from_millis(1600));
        assert_eq!(next_delay(&s, 0.0, 40, 0.5), MAX_ERROR_BACKOFF);
        let slow = Schedule::every(Duration::from_secs(60), Duration::from_secs(5));
        assert_eq!(next_delay(&slow, 0.0, 5, 0.5), Duration::from_secs(60), "never below the interval");
    }

    #[test]
    fn staleness_limit_covers_a_slow_tick() {
        let s = Schedule::every(Duration::from_secs(10), Duration::from_secs(30));
        assert_eq!(s.staleness_limit(), Duration::from_secs(40));
        let fast = Schedule::every(Duration::from_secs(10), Duration::from_secs(5));
        assert_eq!(fast.staleness_limit(), Duration::from_secs(30));
    }
}
