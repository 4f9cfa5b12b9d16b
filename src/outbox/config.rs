//! `[outbox]`: the sweeper's interval, batch, Redis budget, retry backoff and dead-lettering.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::LoopConfig;
use crate::validate::{Violation, check, positive};

/// 200 ms: with the NOTIFY wake most tasks move in milliseconds; polling is the fallback.
pub const DEFAULT_INTERVAL: Duration = Duration::from_millis(200);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(10);
pub const DEFAULT_REDIS_TIMEOUT: Duration = Duration::from_secs(3);
/// Claim size: measured at 500 the SQL side runs ~85k rows/s on 2 cores (BENCHMARKS.md).
pub const DEFAULT_BATCH_SIZE: u32 = 500;
pub const DEFAULT_MAX_ATTEMPTS: u32 = 10;
pub const DEFAULT_BACKOFF_BASE: Duration = Duration::from_secs(1);
pub const DEFAULT_BACKOFF_MAX: Duration = Duration::from_secs(300);
pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(15);

/// The outbox sweeper: `task_outbox` → Redis sorted sets.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct OutboxConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
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
}

impl Default for OutboxConfig {
    fn default() -> Self {
        Self {
            base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT),
            redis_timeout: DEFAULT_REDIS_TIMEOUT,
            batch_size: DEFAULT_BATCH_SIZE,
            max_attempts: DEFAULT_MAX_ATTEMPTS,
            backoff_base: DEFAULT_BACKOFF_BASE,
            backoff_max: DEFAULT_BACKOFF_MAX,
            probe_interval: DEFAULT_PROBE_INTERVAL,
        }
    }
}

impl OutboxConfig {
    /// Keys are relative to `[outbox]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()?;
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
        positive("probe_interval", self.probe_interval)
    }
}
