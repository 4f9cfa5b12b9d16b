//! `[runtime]`, what every loop's runner shares, and [`LoopConfig`], the part of a loop's table
//! that the runner reads (whether it runs, how often, how long a tick may take).

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::Schedule;
use crate::validate::{Violation, check, positive};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RuntimeConfig {
    /// Fraction of an interval added or removed at random so replicas do not synchronise.
    pub jitter: f64,
    /// How many ticks in a row a loop that keeps finding full batches may run before it sleeps.
    pub max_drain_ticks: u32,
    /// Identical errors of one loop are logged once per this window, with a count.
    #[serde(with = "humantime_serde")]
    pub error_log_interval: Duration,
    /// How stale the process's view of `loop_controls` (paused loops) may be: it is read at most
    /// once per this interval, whatever the number of loops. 0s reads it before every tick.
    #[serde(with = "humantime_serde")]
    pub controls_refresh: Duration,
    /// The same while NOTIFY wakes are known to reach the LISTEN connection: every pause or
    /// resume NOTIFYs, and a notification (or a dropped connection) makes the next check read at
    /// once, so the cache only needs reading as a fallback. Unset: 1 m, or `controls_refresh` if
    /// longer ([`RuntimeConfig::controls_fallback_refresh`]).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub controls_fallback_refresh: Option<Duration>,
}

impl Default for RuntimeConfig {
    fn default() -> Self {
        Self {
            jitter: 0.1,
            max_drain_ticks: 50,
            error_log_interval: Duration::from_secs(60),
            controls_refresh: Duration::from_secs(1),
            controls_fallback_refresh: None,
        }
    }
}

/// The `loop_controls` refresh while wakes are known to be delivered, unless configured.
pub const DEFAULT_CONTROLS_FALLBACK_REFRESH: Duration = Duration::from_secs(60);

impl RuntimeConfig {
    /// The effective `controls_fallback_refresh`.
    pub fn controls_fallback_refresh(&self) -> Duration {
        fallback_or(self.controls_fallback_refresh, DEFAULT_CONTROLS_FALLBACK_REFRESH, self.controls_refresh)
    }

    /// Keys are relative to `[runtime]`.
    pub fn validate(&self) -> Result<(), Violation> {
        check((0.0..=0.5).contains(&self.jitter), "jitter", self.jitter, "0.0..=0.5")?;
        check(
            (1..=10_000).contains(&self.max_drain_ticks),
            "max_drain_ticks",
            self.max_drain_ticks,
            "1..=10000",
        )?;
        positive("error_log_interval", self.error_log_interval)?;
        check_fallback(
            "controls_fallback_refresh",
            self.controls_fallback_refresh,
            "controls_refresh",
            self.controls_refresh,
        )
    }
}

/// A fallback interval (used while NOTIFY wakes are known to be delivered) as configured: unset
/// means `default`, or `interval` when that is longer (a config that slowed a loop down before
/// the key existed keeps working).
pub fn fallback_or(configured: Option<Duration>, default: Duration, interval: Duration) -> Duration {
    configured.unwrap_or(default).max(interval)
}

/// A configured fallback interval must be at least the interval it stands in for: `key` and
/// `interval_key` are relative to the same table.
pub fn check_fallback(
    key: &str,
    fallback: Option<Duration>,
    interval_key: &str,
    interval: Duration,
) -> Result<(), Violation> {
    let Some(fallback) = fallback else { return Ok(()) };
    check(
        fallback >= interval && !fallback.is_zero(),
        key,
        humantime::format_duration(fallback),
        &format!("a duration > 0 and at least {interval_key} ({})", humantime::format_duration(interval)),
    )
}

/// `enabled`, `interval` and `tick_timeout`: the keys every single-loop table starts with
/// (`[workers]`, `[outbox]`, `[counters]`, `[gitsync]`, `[prebuilds]`), flattened into it so the
/// keys stay where operators write them. No `Default` of its own: each table's default sets it,
/// and loading always starts from the defaults, so no key is ever missing here.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
pub struct LoopConfig {
    pub enabled: bool,
    /// Between the end of one tick and the start of the next (jittered; a wake-up may come
    /// sooner).
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    /// The deadline of one tick; the tick is cancelled when it passes.
    #[serde(with = "humantime_serde")]
    pub tick_timeout: Duration,
}

impl LoopConfig {
    pub const fn new(interval: Duration, tick_timeout: Duration) -> Self {
        Self { enabled: true, interval, tick_timeout }
    }

    /// The runner's schedule for these settings (callers add wake channels and the like).
    pub fn schedule(&self) -> Schedule {
        Schedule::every(self.interval, self.tick_timeout)
    }

    /// Keys are relative to the loop's table.
    pub fn validate(&self) -> Result<(), Violation> {
        positive("interval", self.interval)?;
        positive("tick_timeout", self.tick_timeout)
    }
}
