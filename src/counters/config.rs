//! `[counters]`: how often Redis's running-task counters are copied into PostgreSQL.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::LoopConfig;
use crate::validate::Violation;

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(5);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(10);

/// `[counters]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct CountersConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
}

impl Default for CountersConfig {
    fn default() -> Self {
        Self { base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT) }
    }
}

impl CountersConfig {
    /// Keys are relative to `[counters]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()
    }
}
