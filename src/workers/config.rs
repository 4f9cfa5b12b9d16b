//! `[workers]`: how often this process renews its lease row and how long dead rows are kept.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::LoopConfig;
use crate::validate::{Violation, check};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(5);
/// A day: long enough to read a dead worker's row in an incident review.
pub const DEFAULT_RETENTION: Duration = Duration::from_secs(24 * 3600);

/// `[workers]`: this process's lease row.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct WorkersConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
    /// Worker rows unseen for longer than this are deleted.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for WorkersConfig {
    fn default() -> Self {
        Self { base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT), retention: DEFAULT_RETENTION }
    }
}

impl WorkersConfig {
    /// Keys are relative to `[workers]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()?;
        check(
            self.retention > self.base.interval * 3,
            "retention",
            humantime::format_duration(self.retention),
            "more than 3 × workers.interval",
        )
    }
}
