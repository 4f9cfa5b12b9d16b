//! `[counters]`: how often Redis's running-task counters are copied into PostgreSQL, how the
//! hash is read, and how long an unchanged hash may go without a sync.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::{LoopConfig, check_fallback};
use crate::validate::{Violation, check};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(10);
/// Fields asked for per `HSCAN` page: a page is a few tens of KiB, and 200k fields take 200
/// round trips.
pub const DEFAULT_SCAN_COUNT: u32 = 1000;
/// An idle replica's counters cost one transaction a minute instead of one per interval (issue
/// 21), and a count PostgreSQL lost while Redis stood still is back within a minute.
pub const DEFAULT_RESYNC_INTERVAL: Duration = Duration::from_secs(60);

/// `[counters]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CountersConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
    /// `COUNT` of each `HSCAN` page (a hint Redis may exceed a little, or ignore for a hash
    /// small enough to be stored compactly, which it returns in one page).
    pub scan_count: u32,
    /// The longest a tick may skip the statement because the hash reads as it did at the last
    /// sync: PostgreSQL can drift while Redis does not change (a job re-activated with a stale
    /// count, a manual UPDATE), and only a sync repairs that. At least `interval`. Unset: 1 m,
    /// or `interval` if longer ([`CountersConfig::resync_interval`]).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub resync_interval: Option<Duration>,
}

impl Default for CountersConfig {
    fn default() -> Self {
        Self {
            base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT),
            scan_count: DEFAULT_SCAN_COUNT,
            resync_interval: None,
        }
    }
}

impl CountersConfig {
    /// The effective `resync_interval`. Unset, the default stretches to a longer `interval`, so
    /// a config that slowed the loop down before the key existed keeps loading; a value that is
    /// set is used as it is (`validate` holds it to at least `interval`).
    pub fn resync_interval(&self) -> Duration {
        self.resync_interval.unwrap_or(DEFAULT_RESYNC_INTERVAL.max(self.base.interval))
    }

    /// Keys are relative to `[counters]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()?;
        check((1..=100_000).contains(&self.scan_count), "scan_count", self.scan_count, "1..=100000")?;
        // A resync cannot come more often than ticks do: a shorter value would promise a bound
        // the loop does not keep.
        check_fallback("resync_interval", self.resync_interval, "interval", self.base.interval)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_validate_and_resync_every_minute_or_every_tick_of_a_slower_loop() {
        let config = CountersConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(config.resync_interval(), Duration::from_secs(60));
        let slow = CountersConfig {
            base: LoopConfig::new(Duration::from_secs(300), DEFAULT_TICK_TIMEOUT),
            ..config
        };
        assert_eq!(slow.validate(), Ok(()), "a config from before the key still loads");
        assert_eq!(slow.resync_interval(), Duration::from_secs(300));
    }

    #[test]
    fn a_resync_interval_of_zero_or_shorter_than_the_interval_is_refused_by_its_key_and_value() {
        for (resync, shown) in [(Duration::ZERO, "0s"), (Duration::from_secs(4), "4s")] {
            let config = CountersConfig { resync_interval: Some(resync), ..CountersConfig::default() };
            let violation = config.validate().expect_err("refused");
            assert_eq!(violation.key, "resync_interval");
            assert!(violation.problem.contains(shown), "{violation:?}");
            assert!(violation.expected.contains("at least interval (5s)"), "{violation:?}");
        }
        let every_tick =
            CountersConfig { resync_interval: Some(DEFAULT_INTERVAL), ..CountersConfig::default() };
        assert_eq!(every_tick.validate(), Ok(()), "a resync every tick is allowed");
        assert_eq!(every_tick.resync_interval(), DEFAULT_INTERVAL);
    }
}
