//! `[outbox]`: the sweeper's interval, batch (rows and bytes), Redis budget, retry backoff,
//! dead-lettering, and the payload bound `enqueue_task` enforces.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::{LoopConfig, check_fallback, fallback_or};
use crate::validate::{Violation, check, positive};

/// 200 ms: with the NOTIFY wake most tasks move in milliseconds; polling is the fallback.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);
/// 5 s while NOTIFY wakes are known to be delivered: an idle replica then costs one sweep every
/// 5 s instead of five a second; a task enqueued with a future `run_at` (or retried) is then
/// moved up to this late, since only tasks due at enqueue NOTIFY.
pub const DEFAULT_FALLBACK_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Claim size: measured at 500 the SQL side runs ~85k rows/s on 2 cores (BENCHMARKS.md).
pub const DEFAULT_BATCH_SIZE: u32 = 500;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
/// Half the default `telemetry.export_interval` (60 s): every export sees fresh gauges, and an
/// idle replica spends one statement on them per 30 s.
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(30);
/// Queues with a series of their own in `outbox.queue.*`; the rest are summed as `other`.
pub const DEFAULT_METRICS_QUEUES: u32 = 20;
/// 1 MiB: the default `enqueue_task` starts with (migrations/V8), before a worker writes its own.
pub const DEFAULT_MAX_PAYLOAD_BYTES: u64 = 1 << 20;
/// 16 MiB of payload per sweep: a batch of small tasks (500 × 1 KiB) never comes near it, while a
/// backlog of large ones cannot make a sweep hold `batch_size` × `max_payload_bytes`.
pub const DEFAULT_MAX_BATCH_BYTES: u64 = 16 << 20;
/// A month: time to notice, fix the cause and requeue, then the table stops growing.
pub const DEFAULT_DEAD_RETENTION: Duration = Duration::from_secs(30 * 24 * 3600);
/// Redis refuses strings over 512 MiB (`proto-max-bulk-len`): a larger payload could never move.
pub const MAX_PAYLOAD_BYTES_LIMIT: u64 = 512 << 20;

/// The outbox sweeper: `task_outbox` → Redis sorted sets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
    /// The interval while the LISTEN connection is known to deliver `task_outbox` wakes (the
    /// wake probe says so); back to `interval` at once when that stops being known. Unset: 5 s,
    /// or `interval` if longer ([`OutboxConfig::fallback_interval`]).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub fallback_interval: Option<Duration>,
    /// Deadline of the Redis pipeline inside a tick (also at most half of what is left of the
    /// tick), leaving time to settle the rows.
    #[serde(with = "humantime_serde")]
    pub redis_timeout: Duration,
    pub batch_size: u32,
    pub max_attempts: u32,
    #[serde(with = "humantime_serde")]
    pub backoff_base: Duration,
    #[serde(with = "humantime_serde")]
    pub backoff_max: Duration,
    /// How often the backlog gauges are refreshed.
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// The busiest queues (by due rows) that get a series of their own in `outbox.queue.backlog`
    /// and `outbox.queue.oldest_due_age`; the others are summed as `queue="other"`. Bounds those
    /// gauges to `metrics_queues + 1` series however many queues exist.
    pub metrics_queues: u32,
    /// Largest payload (bytes of its JSON text) `enqueue_task` accepts. The database enforces it:
    /// the loop writes it into `outbox_settings` on its first tick (migrations/V8 says why one
    /// row, last writer wins, is right with many replicas).
    pub max_payload_bytes: u64,
    /// Payload bytes one sweep claims at most: the claim stops adding rows once their running sum
    /// would pass it, but always takes one row, so a payload larger than the budget still moves.
    pub max_batch_bytes: u64,
    /// Dead letters older than this are deleted by the `retention` loop (requeue or purge them
    /// before; `worker outbox dead purge` removes them sooner).
    #[serde(with = "humantime_serde")]
    pub dead_retention: Duration,
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT),
            fallback_interval: None,
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            batch_size: DEFAULT_BATCH_SIZE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            probe_interval: DEFAULT_PROBE_INTERVAL,
            metrics_queues: DEFAULT_METRICS_QUEUES,
            max_payload_bytes: DEFAULT_MAX_PAYLOAD_BYTES,
            max_batch_bytes: DEFAULT_MAX_BATCH_BYTES,
            dead_retention: DEFAULT_DEAD_RETENTION,
        }
    }
}

impl OutboxConfig {
    /// The effective `fallback_interval`.
    pub fn fallback_interval(&self) -> Duration {
        fallback_or(self.fallback_interval, DEFAULT_FALLBACK_INTERVAL, self.base.interval)
    }

    /// Keys are relative to `[outbox]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()?;
        check_fallback("fallback_interval", self.fallback_interval, "interval", self.base.interval)?;
        check(
            self.dead_retention >= Duration::from_secs(3600),
            "dead_retention",
            humantime::format_duration(self.dead_retention),
            "at least 1h",
        )?;
        check(
            !self.redis_timeout.is_zero() && self.redis_timeout < self.base.tick_timeout,
            "redis_timeout",
            humantime::format_duration(self.redis_timeout),
            "a duration > 0 and below outbox.tick_timeout",
        )?;
        check((1..=10_000).contains(&self.batch_size), "batch_size", self.batch_size, "1..=10000")?;
        check((1..=1000).contains(&self.max_attempts), "max_attempts", self.max_attempts, "1..=1000")?;
        positive("backoff_base", self.backoff_base)?;
        check(
            self.backoff_max >= self.backoff_base,
            "backoff_max",
            humantime::format_duration(self.backoff_max),
            "at least outbox.backoff_base",
        )?;
        positive("probe_interval", self.probe_interval)?;
        check((1..=1000).contains(&self.metrics_queues), "metrics_queues", self.metrics_queues, "1..=1000")?;
        check(
            (1024..=MAX_PAYLOAD_BYTES_LIMIT).contains(&self.max_payload_bytes),
            "max_payload_bytes",
            self.max_payload_bytes,
            "1024..=536870912 (1 KiB to 512 MiB, Redis's largest string)",
        )?;
        check(
            (1024..=1 << 30).contains(&self.max_batch_bytes),
            "max_batch_bytes",
            self.max_batch_bytes,
            "1024..=1073741824 (1 KiB to 1 GiB)",
        )
    }
}
