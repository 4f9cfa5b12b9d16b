//! The `outbox` loop: due `task_outbox` rows → Redis sorted sets, one transaction per batch.
//!
//! A tick drains up to [`BATCHES_PER_TICK`] batches, [`PIPELINE_DEPTH`] (three) in flight at once
//! ([`Sweeper::drain`]: a batch is claimed while the others wait for Redis, commit, or claim
//! too). A batch:
//! `BEGIN; SET LOCAL statement_timeout`; claim up to the batch limit of due rows
//! `ORDER BY run_at, id FOR UPDATE SKIP LOCKED` (replicas sweep side by side, never the same
//! row), and of those the oldest whose payloads fit `outbox.max_batch_bytes` (at least one); send
//! them to Redis (an HSET pipeline, then a ZADD pipeline for the chunks whose payload
//! is in place, see [`scheduler`]) under `outbox.redis_timeout` (inside the tick timeout, so
//! time is left to settle); settle each row by its own answer — delete the dispatched, bump
//! the failed with a backoff and their own error, move the exhausted to `task_outbox_dead` —
//! with at most three statements; `COMMIT`. A full batch starts the next one; a tick whose
//! batches were all full asks the runner to tick again at once.
//!
//! When Redis gives no answer (disconnected, timed out) the transaction rolls back and the tick
//! fails: an outage consumes no attempts and dead-letters nothing, and the runner backs off; a
//! timeout also halves the batch limit (doubled back after each success), so a batch too big to
//! send in time cannot wedge the loop. Rows whose own answer is unknown are left untouched while
//! the others are settled.
//! `kill -9` at any point loses nothing: before COMMIT every row is still in the outbox (maybe
//! also in Redis, which the idempotent re-send absorbs).

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::StreamExt as _;
use futures_util::stream::FuturesUnordered;
use opentelemetry::metrics::{Counter, Meter};
use opentelemetry::trace::{Link, SpanBuilder, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};
use tokio::sync::oneshot;
use tokio_postgres::types::Type;

use super::config::OutboxConfig;
pub use super::scheduler::Claimed;
use super::scheduler::{self, DispatchError};
use super::settle::{self, Settlement};
use super::stats;
use crate::db::{self, Db, DbError, Exec, Transaction};
use crate::redis::Client;
use crate::runtime::{ErrorLog, Loop, LoopError, Progress, Schedule, Tick};
use crate::telemetry::traces;
use crate::text;

pub const NAME: &str = "outbox";
/// NOTIFY channel of `enqueue_task`; wakes the sweeper before its interval.
pub const WAKE_CHANNEL: &str = "task_outbox";
/// Longest `last_error` stored (Redis error replies are short; this bounds a pathological one).
const MAX_ERROR_LEN: usize = 1000;
/// Identical dispatch failures are logged once per this window (ARCHITECTURE.md, "Errors").
const FAILURE_LOG_WINDOW: Duration = Duration::from_secs(60);
/// Backoff cap while Redis is unreachable ([`LoopError::backoff_cap`]).
const REDIS_RECONNECT_CHECK: Duration = Duration::from_secs(2);

/// Due rows, oldest first, skipping rows another sweeper (or a producer) holds: at most `$1`
/// rows, and of those only the prefix whose payloads (bytes of their JSON text, what Redis gets)
/// add up to at most `$2`, but always the first row, so a payload larger than the budget still
/// moves on its own. A window function cannot run in a query that locks (`FOR UPDATE` is not
/// allowed with window functions), hence the nesting: the innermost query locks and sizes the
/// rows, the window adds up their sizes, and only the kept rows' payloads become text (the
/// projection runs after the filter; a large payload travels through the window as its TOAST
/// pointer). Locking drops the index order, so the window sorts the locked rows (at most `$1`),
/// never the due rows; the result comes out in that sort's order. The rows locked but not kept
/// are released at COMMIT.
/// Columns: id, task_id, queue, payload, run_at in ms, attempts, rows locked, the producer's
/// traceparent (`enqueue_task`'s, for the sweep span's links). Public for the
/// benchmark's baselines, which must run the very same statements.
pub const CLAIM: &str = "SELECT s.id, s.task_id, s.queue, s.payload::text, \
     floor(extract(epoch FROM s.run_at) * 1000)::int8, s.attempts, s.locked, s.traceparent \
     FROM (SELECT l.*, row_number() OVER w AS n, sum(l.bytes) OVER w AS running, count(*) OVER () AS locked \
       FROM (SELECT id, task_id, queue, payload, run_at, attempts, traceparent, \
           octet_length(payload::text)::int8 AS bytes FROM task_outbox \
         WHERE run_at <= now() ORDER BY run_at, id LIMIT $1 FOR UPDATE SKIP LOCKED) AS l \
       WINDOW w AS (ORDER BY l.run_at, l.id ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)) AS s \
     WHERE s.n = 1 OR s.running <= $2::int8 ORDER BY s.run_at, s.id";
/// Writes `outbox.max_payload_bytes` where `enqueue_task` reads it (migrations/V8), only when it
/// differs; returns the value it replaced (NULL when unchanged).
const PUBLISH_PAYLOAD_LIMIT: &str = "WITH old AS (SELECT max_payload_bytes FROM outbox_settings), \
     written AS (INSERT INTO outbox_settings (id, max_payload_bytes) VALUES (true, $1) \
       ON CONFLICT (id) DO UPDATE SET max_payload_bytes = EXCLUDED.max_payload_bytes, updated_at = now() \
       WHERE outbox_settings.max_payload_bytes <> EXCLUDED.max_payload_bytes RETURNING 1) \
     SELECT CASE WHEN EXISTS (SELECT 1 FROM written) THEN (SELECT max_payload_bytes FROM old) END";
pub const DELETE_DISPATCHED: &str = "DELETE FROM task_outbox WHERE id = ANY($1)";
const RETRY: &str = "UPDATE task_outbox AS o \
     SET attempts = o.attempts + 1, last_error = u.error, run_at = now() + make_interval(secs => u.delay) \
     FROM unnest($1::int8[], $2::text[], $3::float8[]) AS u(id, error, delay) WHERE o.id = u.id";
const DEAD_LETTER: &str = "WITH moved AS (\
     DELETE FROM task_outbox AS o USING unnest($1::int8[], $2::text[]) AS u(id, error) WHERE o.id = u.id \
     RETURNING o.id, o.task_id, o.job_id, o.queue, o.payload, o.run_at, o.attempts, o.created_at, u.error, \
       o.traceparent) \
     INSERT INTO task_outbox_dead \
     (original_id, task_id, job_id, queue, payload, run_at, attempts, last_error, created_at, traceparent) \
     SELECT id, task_id, job_id, queue, payload, run_at, attempts + 1, error, created_at, traceparent FROM moved";

#[derive(Debug, thiserror::Error)]
pub enum SweepError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("{0}; nothing settled, no attempts consumed")]
    Redis(#[from] DispatchError),
    /// The message stays the same from tick to tick (no counts in it), so the runner's
    /// once-a-minute error log can fold repeats.
    #[error("some rows got no definite answer from redis and were left as they were: {error}")]
    Undetermined { error: String },
}

impl LoopError for SweepError {
    fn metric_label(&self) -> &'static str {
        match self {
            SweepError::Db(e) => e.metric_label(),
            SweepError::Redis(DispatchError::Unavailable(_)) => "redis_unavailable",
            SweepError::Redis(DispatchError::TimedOut(_)) => "redis_timeout",
            SweepError::Undetermined { .. } => "redis_undetermined",
        }
    }

    /// While the client reconnects (fred retries every ≤ 2 s on its own), a tick costs no
    /// statement and no round trip ([`scheduler::ensure_connected`] comes before the claim), so
    /// look again every couple of seconds and resume soon after Redis is back.
    fn backoff_cap(&self) -> Option<Duration> {
        matches!(self, SweepError::Redis(DispatchError::Unavailable(_))).then_some(REDIS_RECONNECT_CHECK)
    }
}

/// What one sweep did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SweepReport {
    pub claimed: usize,
    /// Payload bytes of the claimed rows (their JSON text): at most `outbox.max_batch_bytes`,
    /// unless the batch is one row.
    pub bytes: u64,
    /// The byte budget ended the claim before the row limit: more rows were locked than kept.
    pub cut_by_bytes: bool,
    /// Outbox ids of the rows now in Redis (deleted from the outbox).
    pub dispatched: Vec<i64>,
    pub retried: u64,
    pub dead_lettered: u64,
    /// Rows left as they were because their outcome is unknown.
    pub untouched: usize,
    /// The first error among untouched rows.
    pub untouched_error: Option<String>,
    /// The sweep claimed as many rows (or bytes) as it was allowed to: more may be due.
    pub full: bool,
}

/// Backlog gauges (`outbox.backlog.*`, `outbox.queue.*`, `outbox.dead_letters`), refreshed at
/// most every `outbox.probe_interval` by a tick and read by the meter's callbacks.
#[derive(Default)]
struct Probe {
    last: Mutex<Option<Instant>>,
    /// `None` until the first measurement, and after a failed one: nothing is observed then.
    backlog: Mutex<Option<stats::Backlog>>,
}

impl Probe {
    fn read(&self) -> Option<stats::Backlog> {
        self.backlog.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

/// The outbox sweeper loop.
pub struct Sweeper {
    db: Db,
    redis: Client,
    prefix: String,
    config: OutboxConfig,
    rows: Counter<u64>,
    probe: Arc<Probe>,
    /// Rows claimed per sweep: `batch_size`, halved after each Redis timeout so a batch too big
    /// to send within `redis_timeout` cannot wedge the loop, doubled back after each success.
    batch_limit: AtomicU32,
    /// Dispatch failures are logged once per minute per distinct error, with a count.
    failure_log: Mutex<ErrorLog>,
    /// `outbox.max_payload_bytes` is in `outbox_settings` (written on the first tick that could).
    payload_limit_published: AtomicBool,
}

/// Batches of one [`Sweeper::drain`] in flight at once, each holding a pooled connection: while
/// one waits for Redis or commits, the others claim. Measured in pairs against the SQL-only
/// limit on two cores (BENCHMARKS.md, "Issue 21"), three with overlapping claims did better
/// than two in most pairs (median 0.84 of the limit against 0.73 for two with the claims one
/// after the other); a fourth gave no steady gain (at 32 per drain it won 6 of 9 pairs with the
/// lower median, 0.81 against 0.85; at 128, 5 of 9 with 0.96 against 0.93) and holds one more
/// connection, and one more batch a kill can repeat.
pub const PIPELINE_DEPTH: usize = 3;

/// Batches one tick drains at most (each at most `outbox.batch_size` rows): the pipeline stays
/// full across batches, and a tick stays short (one ends, and the runner ticks again at once
/// after a full one, `runtime.max_drain_ticks` times in a row at most; no batch starts once
/// less than twice `outbox.redis_timeout` of the tick is left, with the defaults after 4 s of
/// 10). Each drain starts with one batch alone and ends with its last batches alone, so fewer
/// batches per tick leave PostgreSQL idle more often: against the SQL-only limit in pairs, 32
/// did better than 8 in 5 of 7 pairs (median 0.83 against 0.81), and 128 better than 32 in each
/// of 9 pairs (median 0.91 against 0.85; BENCHMARKS.md, "Issue 21"). A tick of 128 full batches
/// of the default 500 rows is ~64,000 rows, under a second on the benchmark machine; where the
/// budget ends the drain first, its full batches still ask for the next tick at once
/// ([`progress`]).
pub const BATCHES_PER_TICK: usize = 128;

/// How [`Sweeper::drain`] overlaps its batches: at most `depth` in flight, `batches` in all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DrainShape {
    pub depth: usize,
    pub batches: usize,
}

impl DrainShape {
    /// What one tick of the loop drains.
    pub const TICK: DrainShape = DrainShape { depth: PIPELINE_DEPTH, batches: BATCHES_PER_TICK };
}

/// When [`Sweeper::drain`] starts its next batch (the decision apart from the I/O).
#[derive(Debug, Default)]
struct Pipeline {
    depth: usize,
    max_batches: usize,
    started: usize,
    /// Whether the last claim to come back was full (`None` before the first).
    last_full: Option<bool>,
    stopped: bool,
}

impl Pipeline {
    /// A next batch starts when more may be due — the last claim to come back was full, or, for
    /// the first batch, none has come back and none is running (so an idle tick costs one claim,
    /// and claims overlap only once a backlog is known) — fewer than `depth` batches are in
    /// flight, the budget of batches is not spent and no batch failed. A batch may start while
    /// another's claim still runs: `SKIP LOCKED` keeps the two claims' rows apart. `claiming`:
    /// the batches in flight whose claim has not come back yet.
    fn may_start(&self, in_flight: usize, claiming: usize) -> bool {
        let more_due = self.last_full.unwrap_or(claiming == 0);
        !self.stopped && more_due && in_flight < self.depth && self.started < self.max_batches
    }

    fn started(&mut self) {
        self.started += 1;
    }

    fn claimed(&mut self, full: bool) {
        self.last_full = Some(full);
    }

    fn stop(&mut self) {
        self.stopped = true;
    }
}

/// How a sweep that claimed rows ended, as far as the next batch limit is concerned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BatchOutcome {
    /// Redis did not answer within the budget.
    TimedOut,
    /// Redis answered, and the byte budget kept only `kept` of the rows the claim locked.
    CutByBytes { kept: u32 },
    /// Redis answered, and the row limit was what bounded the batch.
    Answered,
}

/// The next sweep's batch limit (see [`Sweeper`]): halve on a Redis timeout; after a sweep the
/// byte budget cut short, twice the rows it kept (every locked row's payload is sized by the
/// database, so locking hundreds of large rows to keep a few is work thrown away); otherwise grow
/// back by doubling. Never below 1 or above `configured`.
pub fn next_batch_limit(current: u32, configured: u32, outcome: BatchOutcome) -> u32 {
    match outcome {
        BatchOutcome::TimedOut => (current / 2).max(1),
        BatchOutcome::CutByBytes { kept } => kept.saturating_mul(2).clamp(1, configured),
        BatchOutcome::Answered => current.saturating_mul(2).min(configured),
    }
}

impl Sweeper {
    pub fn new(db: Db, redis: Client, prefix: &str, config: OutboxConfig, meter: &Meter) -> Self {
        let probe = Arc::new(Probe::default());
        register_gauges(meter, &probe);
        let rows = meter
            .u64_counter("outbox.sweep.rows")
            .with_description("Outbox rows settled by a sweep, by outcome (dispatched|retried|dead_lettered)")
            .build();
        let batch_limit = AtomicU32::new(config.batch_size);
        let failure_log = Mutex::new(ErrorLog::new(FAILURE_LOG_WINDOW));
        Self {
            db,
            redis,
            prefix: prefix.to_owned(),
            config,
            rows,
            probe,
            batch_limit,
            failure_log,
            payload_limit_published: AtomicBool::new(false),
        }
    }

    /// Writes `outbox.max_payload_bytes` into `outbox_settings`, where `enqueue_task` reads it,
    /// unless it is already there; returns the value it replaced, if any. The loop does this on
    /// its first tick (and again on the next one if it failed); see migrations/V8 for why one
    /// row, last writer wins, is correct with many replicas.
    pub async fn publish_payload_limit(&self) -> Result<Option<i64>, DbError> {
        let limit = i64::try_from(self.config.max_payload_bytes).unwrap_or(i64::MAX);
        let replaced: Option<i64> = db::in_transaction(&self.db, async |tx| {
            Ok::<_, DbError>(tx.fetch_one(PUBLISH_PAYLOAD_LIMIT, &[(&limit, Type::INT8)]).await?.get(0))
        })
        .await?;
        self.payload_limit_published.store(true, Ordering::Relaxed);
        if let Some(from) = replaced {
            tracing::info!(from, to = limit, "outbox.max_payload_bytes written for enqueue_task");
        }
        Ok(replaced)
    }

    /// Rows the next sweep claims at most.
    pub fn batch_limit(&self) -> u32 {
        self.batch_limit.load(Ordering::Relaxed)
    }

    /// The next limit from what a batch claimed with `claimed_with` found. Two batches are in
    /// flight during a drain: one claimed before the other lowered the limit must not raise it
    /// back, so growth replaces only the limit the batch was claimed with, and a timeout only
    /// ever lowers it.
    fn adapt_batch_limit(&self, claimed_with: u32, outcome: BatchOutcome) {
        let next = next_batch_limit(claimed_with, self.config.batch_size, outcome);
        let replaced = if outcome == BatchOutcome::TimedOut {
            Ok(self.batch_limit.fetch_min(next, Ordering::Relaxed))
        } else {
            self.batch_limit.compare_exchange(claimed_with, next, Ordering::Relaxed, Ordering::Relaxed)
        };
        match replaced {
            Ok(from) if from > next && outcome == BatchOutcome::TimedOut => {
                tracing::warn!(from, to = next, "redis timed out; outbox batch limit lowered");
            }
            Ok(from) if from != next => tracing::debug!(from, to = next, "outbox batch limit adapted"),
            _ => {}
        }
    }

    /// One sweep: claim, dispatch, settle, commit. `Err` means nothing was settled (rolled back).
    /// Redis gets `outbox.redis_timeout`.
    pub async fn sweep(&self) -> Result<SweepReport, SweepError> {
        self.sweep_within(self.config.redis_timeout).await
    }

    /// [`Sweeper::sweep`] with the time Redis may take given by the caller (the tick's budget).
    pub async fn sweep_within(&self, redis_budget: Duration) -> Result<SweepReport, SweepError> {
        self.sweep_batch(redis_budget, None).await
    }

    /// Up to `shape.batches` sweeps, `shape.depth` of them in flight at once: the next batch is
    /// claimed, on a connection and in a transaction of its own, while the others wait for
    /// Redis, settle and commit, or claim too (their rows are locked, so `SKIP LOCKED` passes
    /// over them). One sweep alone is latency-bound (claim, two Redis round trips, settle,
    /// commit, one after the other); overlapping them keeps PostgreSQL busy while Redis answers.
    /// Each batch keeps every guarantee of [`Sweeper::sweep`]: its own transaction, per-row
    /// settlement, a payload in Redis before its schedule, and an uncommitted batch is simply
    /// claimed again later.
    ///
    /// A batch is started only when the last claim to come back was full (more may be due; the
    /// first batch starts alone, so an idle tick costs one claim), and none after a batch failed
    /// or left rows undetermined; the batches in flight then finish. Once a claim was full, a
    /// batch that ends makes room for the next at once, even while the other batch's claim still
    /// runs: the claim is most of a batch's database time, and waiting for it (as the drain did
    /// at first) left PostgreSQL idle between batches (BENCHMARKS.md, "Issue 21").
    /// `redis_budget` is asked for each batch as it starts (the tick's shrinking budget); once
    /// it is below `outbox.redis_timeout` (half of what is left of the tick: with the defaults,
    /// after 4 s of 10) no further batch starts, so a slow but healthy Redis is not cut short by
    /// a budget the first batch would have had. `Err` is the first batch error; batches that
    /// committed before it stay committed (and counted). A later batch that finds no free pooled
    /// connection ends the drain quietly (the pool is busy, nothing failed).
    pub async fn drain(
        &self,
        redis_budget: impl Fn() -> Duration,
        shape: DrainShape,
    ) -> Result<Vec<SweepReport>, SweepError> {
        let mut in_flight = FuturesUnordered::new();
        let mut reports = Vec::new();
        let mut first_error = None;
        let mut claims = FuturesUnordered::new();
        let mut pipeline = Pipeline { depth: shape.depth, max_batches: shape.batches, ..Pipeline::default() };
        loop {
            if pipeline.may_start(in_flight.len(), claims.len()) {
                let budget = redis_budget();
                if pipeline.started > 0 && budget < self.config.redis_timeout {
                    pipeline.stop();
                } else {
                    let (claimed, claim) = oneshot::channel();
                    let first = pipeline.started == 0;
                    in_flight.push(async move { (first, self.sweep_batch(budget, Some(claimed)).await) });
                    claims.push(claim);
                    pipeline.started();
                }
            }
            tokio::select! {
                Some(full) = claims.next(), if !claims.is_empty() => {
                    // A batch that failed before its claim drops the sender: not full.
                    pipeline.claimed(full.unwrap_or(false));
                }
                done = in_flight.next(), if !in_flight.is_empty() => match done {
                    Some((_, Ok(report))) => {
                        if report.untouched_error.is_some() {
                            pipeline.stop();
                        }
                        reports.push(report);
                    }
                    Some((false, Err(SweepError::Db(error)))) if error.is_pool_busy() => {
                        tracing::debug!(%error, "no pooled connection for another outbox batch; the drain ends here");
                        pipeline.stop();
                    }
                    Some((_, Err(error))) => {
                        pipeline.stop();
                        first_error.get_or_insert(error);
                    }
                    None => {}
                },
                else => break,
            }
        }
        match first_error {
            Some(error) => Err(error),
            None => Ok(reports),
        }
    }

    /// One batch: claim, dispatch, settle, commit. Once the claim has run, `claimed` (if any) is
    /// told whether it was full (the next batch may start).
    async fn sweep_batch(
        &self,
        redis_budget: Duration,
        claimed_full: Option<oneshot::Sender<bool>>,
    ) -> Result<SweepReport, SweepError> {
        // Claiming rows only to roll back is wasted work while Redis is away.
        scheduler::ensure_connected(&self.redis)?;
        let mut conn = self.db.get().await?;
        let tx = db::begin(&mut conn, self.db.tx_limits()).await?;
        let batch_limit = self.batch_limit();
        let limit = i64::from(batch_limit);
        let budget = i64::try_from(self.config.max_batch_bytes).unwrap_or(i64::MAX);
        let claimed = tx.fetch_all(CLAIM, &[(&limit, Type::INT8), (&budget, Type::INT8)]).await?;
        let locked = claimed.first().map_or(0, |r| r.get::<_, i64>(6));
        let span = sweep_span(&claimed);
        let rows: Vec<Claimed> = claimed
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                task_id: r.get(1),
                queue: r.get(2),
                payload: r.get(3),
                run_at_ms: r.get(4),
                attempts: r.get(5),
            })
            .collect();
        drop(claimed);
        let cut_by_bytes = (rows.len() as i64) < locked;
        if let Some(sender) = claimed_full {
            let _ = sender.send(!rows.is_empty() && (cut_by_bytes || rows.len() >= batch_limit as usize));
        }
        if rows.is_empty() {
            db::commit(tx).await?;
            return Ok(SweepReport::default());
        }
        // Dropping `tx` on the error path rolls back: no row changes, locks released.
        let dispatched = scheduler::dispatch(&self.redis, &self.prefix, &rows, redis_budget).await;
        match &dispatched {
            Ok(_) if cut_by_bytes => self.adapt_batch_limit(
                batch_limit,
                BatchOutcome::CutByBytes { kept: u32::try_from(rows.len()).unwrap_or(u32::MAX) },
            ),
            Ok(_) => self.adapt_batch_limit(batch_limit, BatchOutcome::Answered),
            Err(DispatchError::TimedOut(_)) => self.adapt_batch_limit(batch_limit, BatchOutcome::TimedOut),
            Err(DispatchError::Unavailable(_)) => {}
        }
        let outcomes = dispatched?;
        let mut plan = Settlements::default();
        for (row, outcome) in rows.iter().zip(outcomes) {
            plan.add(row, settle::settle(row.attempts, outcome, self.config.max_attempts), &self.config);
        }
        let first_error = plan.retry_errors.first().or(plan.dead_errors.first()).cloned();
        let mut report = plan.apply(&tx, rows.len()).await?;
        report.bytes = rows.iter().map(|r| r.payload.len() as u64).sum();
        report.cut_by_bytes = cut_by_bytes;
        report.full = cut_by_bytes || rows.len() >= batch_limit as usize;
        db::commit(tx).await?;
        self.record(&report, first_error.as_deref());
        traces::set_attributes(
            span.as_ref(),
            [
                KeyValue::new("outbox.dispatched", report.dispatched.len() as i64),
                KeyValue::new("outbox.retried", report.retried as i64),
                KeyValue::new("outbox.dead_lettered", report.dead_lettered as i64),
            ],
        );
        Ok(report)
    }

    fn record(&self, report: &SweepReport, first_error: Option<&str>) {
        for (outcome, n) in [
            ("dispatched", report.dispatched.len() as u64),
            ("retried", report.retried),
            ("dead_lettered", report.dead_lettered),
        ] {
            if n > 0 {
                self.rows.add(n, &[KeyValue::new("outcome", outcome)]);
            }
        }
        let Some(error) = first_error else { return };
        let mut log = self.failure_log.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(repeated) = log.should_log(error, Instant::now()) {
            tracing::warn!(
                error,
                repeated,
                claimed = report.claimed,
                dispatched = report.dispatched.len(),
                retried = report.retried,
                dead_lettered = report.dead_lettered,
                "outbox rows failed to dispatch"
            );
        }
    }

    /// Refreshes the backlog gauges if the last refresh is older than `outbox.probe_interval`.
    /// A probe that fails (its statement timed out on a backlog of millions of rows, say) is
    /// logged and leaves the gauges absent until one succeeds: the last figure kept would look
    /// like a small backlog exactly while it is huge. The drain goes on either way: failing the
    /// tick for it would slow the drain just when the backlog needs it.
    async fn probe_if_due(&self) {
        {
            let mut last = self.probe.last.lock().unwrap_or_else(|e| e.into_inner());
            if last.is_some_and(|at| at.elapsed() < self.config.probe_interval) {
                return;
            }
            *last = Some(Instant::now());
        }
        let backlog = match stats::backlog(&self.db, self.config.metrics_queues).await {
            Ok(backlog) => Some(backlog),
            Err(error) => {
                tracing::warn!(
                    %error,
                    "the outbox backlog probe failed; the backlog gauges are absent until it succeeds"
                );
                None
            }
        };
        *self.probe.backlog.lock().unwrap_or_else(|e| e.into_inner()) = backlog;
    }
}

/// A span keeps at most this many links (the SDK's default limit; more would be dropped).
const MAX_SWEEP_LINKS: usize = 128;

/// With traces on, rows claimed and the tick sampled: the sweep's span, a child of the tick's,
/// linked to the span of each producer that passed a traceparent to `enqueue_task` (the first
/// [`MAX_SWEEP_LINKS`]). An unsampled tick's sweep would be dropped anyway: nothing is parsed.
fn sweep_span(claimed: &[tokio_postgres::Row]) -> Option<Context> {
    if claimed.is_empty() || !traces::enabled() {
        return None;
    }
    let parent = Context::current();
    if !parent.span().span_context().is_sampled() {
        return None;
    }
    traces::start_span(&parent, || {
        let links = claimed
            .iter()
            .filter_map(|r| r.get::<_, Option<&str>>(7))
            .filter_map(traces::remote_span)
            .take(MAX_SWEEP_LINKS)
            .map(Link::with_context)
            .collect();
        SpanBuilder::from_name("outbox sweep")
            .with_attributes([KeyValue::new("outbox.claimed", claimed.len() as i64)])
            .with_links(links)
    })
}

fn register_gauges(meter: &Meter, probe: &Arc<Probe>) {
    let p = probe.clone();
    meter
        .u64_observable_gauge("outbox.backlog.due")
        .with_description("Outbox rows due now (run_at <= now())")
        .with_callback(move |o| p.read().into_iter().for_each(|b| o.observe(b.due, &[])))
        .build();
    let p = probe.clone();
    meter
        .f64_observable_gauge("outbox.backlog.oldest_due_age")
        .with_unit("s")
        .with_description("Age (from created_at) of the oldest due outbox row; 0 when none is due")
        .with_callback(move |o| p.read().into_iter().for_each(|b| o.observe(b.oldest_due_age_secs, &[])))
        .build();
    let p = probe.clone();
    meter
        .u64_observable_gauge("outbox.dead_letters")
        .with_description("Rows in task_outbox_dead")
        .with_callback(move |o| p.read().into_iter().for_each(|b| o.observe(b.dead, &[])))
        .build();
    // Per queue: the `outbox.metrics_queues` busiest by name, the rest as `other` (always
    // observed, 0 when there is no other), so at most `metrics_queues + 1` series.
    let p = probe.clone();
    meter
        .u64_observable_gauge("outbox.queue.backlog")
        .with_description(
            "Due outbox rows per queue: the busiest outbox.metrics_queues queues, the rest as other",
        )
        .with_callback(move |o| {
            if let Some(b) = p.read() {
                for (queue, q) in &b.busiest {
                    o.observe(q.due, &[KeyValue::new("queue", queue.clone())]);
                }
                o.observe(b.other.due, &[KeyValue::new("queue", stats::OTHER_QUEUES)]);
            }
        })
        .build();
    let p = probe.clone();
    meter
        .f64_observable_gauge("outbox.queue.oldest_due_age")
        .with_unit("s")
        .with_description(
            "Age (from created_at) of the oldest due row per queue, as outbox.queue.backlog groups them",
        )
        .with_callback(move |o| {
            if let Some(b) = p.read() {
                for (queue, q) in &b.busiest {
                    o.observe(q.oldest_due_age_secs, &[KeyValue::new("queue", queue.clone())]);
                }
                o.observe(b.other.oldest_due_age_secs, &[KeyValue::new("queue", stats::OTHER_QUEUES)]);
            }
        })
        .build();
}

/// The settlements of one batch, grouped into the three batched statements.
#[derive(Default)]
struct Settlements {
    dispatched: Vec<i64>,
    retry_ids: Vec<i64>,
    retry_errors: Vec<String>,
    retry_delays: Vec<f64>,
    dead_ids: Vec<i64>,
    dead_errors: Vec<String>,
    untouched: usize,
    untouched_error: Option<String>,
}

impl Settlements {
    fn add(&mut self, row: &Claimed, settlement: Settlement, config: &OutboxConfig) {
        match settlement {
            Settlement::Dispatched => self.dispatched.push(row.id),
            Settlement::Retry { error } => {
                let delay = settle::retry_delay(
                    row.attempts,
                    config.backoff_base,
                    config.backoff_max,
                    rand::random::<f64>(),
                );
                self.retry_ids.push(row.id);
                self.retry_errors.push(text::clip(error, MAX_ERROR_LEN));
                self.retry_delays.push(delay.as_secs_f64());
            }
            Settlement::DeadLetter { error } => {
                self.dead_ids.push(row.id);
                self.dead_errors.push(text::clip(error, MAX_ERROR_LEN));
            }
            Settlement::Untouched { error } => {
                self.untouched += 1;
                self.untouched_error.get_or_insert(error);
            }
        }
    }

    async fn apply(self, tx: &Transaction<'_>, claimed: usize) -> Result<SweepReport, SweepError> {
        if !self.dispatched.is_empty() {
            tx.exec(DELETE_DISPATCHED, &[(&self.dispatched, Type::INT8_ARRAY)]).await?;
        }
        let retried = if self.retry_ids.is_empty() {
            0
        } else {
            tx.exec(
                RETRY,
                &[
                    (&self.retry_ids, Type::INT8_ARRAY),
                    (&self.retry_errors, Type::TEXT_ARRAY),
                    (&self.retry_delays, Type::FLOAT8_ARRAY),
                ],
            )
            .await?
        };
        let dead_lettered = if self.dead_ids.is_empty() {
            0
        } else {
            tx.exec(DEAD_LETTER, &[(&self.dead_ids, Type::INT8_ARRAY), (&self.dead_errors, Type::TEXT_ARRAY)])
                .await?
        };
        Ok(SweepReport {
            claimed,
            bytes: 0,
            cut_by_bytes: false,
            dispatched: self.dispatched,
            retried,
            dead_lettered,
            untouched: self.untouched,
            untouched_error: self.untouched_error,
            full: false,
        })
    }
}

impl Loop for Sweeper {
    type Error = SweepError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.config.base.schedule().woken_by_with_fallback(WAKE_CHANNEL, self.config.fallback_interval())
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, SweepError> {
        if !self.payload_limit_published.load(Ordering::Relaxed) {
            self.publish_payload_limit().await?;
        }
        self.probe_if_due().await;
        let reports = self.drain(|| tick.budget(self.config.redis_timeout), DrainShape::TICK).await?;
        tick.record_rows(reports.iter().map(|r| r.claimed).sum());
        if let Some((report, error)) = reports.iter().find_map(|r| Some((r, r.untouched_error.clone()?))) {
            tracing::debug!(untouched = report.untouched, claimed = report.claimed, "rows left undetermined");
            return Err(SweepError::Undetermined { error });
        }
        Ok(progress(&reports))
    }
}

/// After a drain: every batch full means more may be due, and the runner ticks again at once
/// (within `runtime.max_drain_ticks`), whether the drain ended at its count of batches, at the
/// tick's budget or on a busy pool. Counting batches instead would leave a backlog to the next
/// interval (the 5 s fallback while wakes are delivered) whenever the budget ends the drain.
fn progress(reports: &[SweepReport]) -> Progress {
    if !reports.is_empty() && reports.iter().all(|r| r.full) { Progress::More } else { Progress::Done }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_drain_of_full_batches_asks_for_another_tick_however_it_ended() {
        let batch = |full| SweepReport { claimed: 500, full, ..SweepReport::default() };
        assert_eq!(progress(&[]), Progress::Done, "nothing claimed");
        assert_eq!(progress(&vec![batch(true); BATCHES_PER_TICK]), Progress::More, "the count of batches");
        assert_eq!(
            progress(&[batch(true), batch(true), batch(true)]),
            Progress::More,
            "ended early (the tick's budget, a busy pool) with every batch full: the backlog is not drained"
        );
        assert_eq!(
            progress(&[batch(true), batch(false), batch(true)]),
            Progress::Done,
            "one came back short"
        );
    }

    #[test]
    fn a_drain_starts_a_batch_after_a_full_claim_with_room_in_the_pipeline_and_the_budget() {
        // `may_start(in_flight, claiming)`: batches in flight, and of them those still claiming.
        let fresh = || Pipeline { depth: PIPELINE_DEPTH, max_batches: 4, ..Pipeline::default() };
        assert!(fresh().may_start(0, 0), "the first batch");
        let mut p = fresh();
        p.started();
        assert!(!p.may_start(1, 1), "not while the first claim runs: nothing is known to be due");
        p.claimed(true);
        assert!(p.may_start(1, 0), "a full claim: the next one, alongside");
        p.started();
        assert!(p.may_start(2, 1), "room left: the next starts while the other still claims");
        p.started();
        assert!(!p.may_start(PIPELINE_DEPTH, 2), "the pipeline is full");
        assert!(p.may_start(PIPELINE_DEPTH - 1, 2), "one finished: the next starts while two still claim");
        p.claimed(true);
        p.claimed(true);
        p.started();
        assert!(!p.may_start(0, 0), "four of max_batches 4");
        let mut short = fresh();
        short.started();
        short.claimed(false);
        assert!(!short.may_start(0, 0), "a claim that was not full: nothing more is due");
        let mut tail = fresh();
        tail.started();
        tail.claimed(true);
        tail.started();
        tail.claimed(false);
        assert!(!tail.may_start(1, 0), "the last claim to come back was short: the backlog is drained");
        let mut failed = fresh();
        failed.stop();
        assert!(!failed.may_start(0, 0), "after a failure");
    }

    /// Two batches in flight: the one claimed before the other's timeout halved the limit must
    /// not double it back; the next batch, claimed with the halved limit, grows it.
    #[tokio::test]
    async fn a_batch_claimed_before_a_timeout_does_not_undo_the_halving() {
        // Neither the pool nor the client connects until used.
        let db = Db::new(&crate::db::DatabaseConfig::default()).expect("pool");
        let redis = crate::redis::build(&crate::redis::RedisConfig::default()).expect("client");
        let meter = opentelemetry::metrics::MeterProvider::meter(
            &opentelemetry::metrics::NoopMeterProvider::new(),
            "test",
        );
        let sweeper = Sweeper::new(db, redis, "t", OutboxConfig::default(), &meter);
        let full = sweeper.batch_limit();
        sweeper.adapt_batch_limit(full, BatchOutcome::TimedOut);
        assert_eq!(sweeper.batch_limit(), full / 2);
        sweeper.adapt_batch_limit(full, BatchOutcome::Answered);
        assert_eq!(sweeper.batch_limit(), full / 2, "the stale batch left the halved limit alone");
        sweeper.adapt_batch_limit(full, BatchOutcome::TimedOut);
        assert_eq!(sweeper.batch_limit(), full / 2, "a stale timeout lowers to at most its own half");
        sweeper.adapt_batch_limit(full / 2, BatchOutcome::Answered);
        assert_eq!(sweeper.batch_limit(), full, "a batch claimed with the current limit grows it");
    }

    #[test]
    fn the_batch_limit_halves_on_a_redis_timeout_and_grows_back() {
        use BatchOutcome::{Answered, TimedOut};
        assert_eq!(next_batch_limit(500, 500, TimedOut), 250);
        assert_eq!(next_batch_limit(1, 500, TimedOut), 1, "never below one row");
        assert_eq!(next_batch_limit(250, 500, Answered), 500);
        assert_eq!(next_batch_limit(300, 500, Answered), 500, "never above the configured size");
        assert_eq!(next_batch_limit(500, 500, Answered), 500);
    }

    #[test]
    fn after_a_sweep_the_byte_budget_cut_short_the_limit_is_twice_what_it_kept() {
        use BatchOutcome::{Answered, CutByBytes};
        assert_eq!(next_batch_limit(500, 500, CutByBytes { kept: 18 }), 36);
        assert_eq!(next_batch_limit(36, 500, CutByBytes { kept: 1 }), 2, "one large row: lock two");
        assert_eq!(
            next_batch_limit(500, 500, CutByBytes { kept: 400 }),
            500,
            "never above the configured size"
        );
        assert_eq!(next_batch_limit(2, 500, CutByBytes { kept: 0 }), 1, "never below one row");
        // Small payloads again: the limit doubles back to the configured size.
        assert_eq!(next_batch_limit(36, 500, Answered), 72);
    }
}
