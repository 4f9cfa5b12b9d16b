//! `[counters]`: how often Redis's running-task counters are copied into PostgreSQL, and how the
//! hash is read.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::LoopConfig;
use crate::validate::{Violation, check};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(10);
/// Fields asked for per `HSCAN` page: a page is a few tens of KiB, and 200k fields take 200
/// round trips.
pub const DEFAULT_SCAN_COUNT: u32 = 1000;

/// `[counters]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CountersConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
    /// `COUNT` of each `HSCAN` page (a hint Redis may exceed a little, or ignore for a hash
    /// small enough to be stored compactly, which it returns in one page).
    pub scan_count: u32,
}

impl Default for CountersConfig {
    fn default() -> Self {
        Self { base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT), scan_count: DEFAULT_SCAN_COUNT }
    }
}

impl CountersConfig {
    /// Keys are relative to `[counters]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()?;
        check((1..=100_000).contains(&self.scan_count), "scan_count", self.scan_count, "1..=100000")
    }
}
