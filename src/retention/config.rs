//! `[retention]` (the loop) and `[audit]` (how long the audit trail is kept). How long dead
//! letters are kept is `outbox.dead_retention`, beside the rest of the outbox's settings.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::runtime::LoopConfig;
use crate::validate::{Violation, check};

pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(3600);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(60);
/// Rows deleted per table per tick: a short transaction even on a slow disk.
pub const DEFAULT_BATCH_SIZE: u32 = 1000;
/// Half a year: long enough for an incident review or an audit question months later.
pub const DEFAULT_AUDIT_RETENTION: Duration = Duration::from_secs(180 * 24 * 3600);

/// `[retention]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
    /// Rows deleted per table per tick; a full batch ticks again at once.
    pub batch_size: u32,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        Self { base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT), batch_size: DEFAULT_BATCH_SIZE }
    }
}

impl RetentionConfig {
    /// Keys are relative to `[retention]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()?;
        check((1..=100_000).contains(&self.batch_size), "batch_size", self.batch_size, "1..=100000")
    }
}

/// `[audit]`: the trail of operator actions (`operator_actions`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AuditConfig {
    /// Rows older than this are deleted by the `retention` loop.
    #[serde(with = "humantime_serde")]
    pub retention: Duration,
}

impl Default for AuditConfig {
    fn default() -> Self {
        Self { retention: DEFAULT_AUDIT_RETENTION }
    }
}

impl AuditConfig {
    /// Keys are relative to `[audit]`.
    pub fn validate(&self) -> Result<(), Violation> {
        check(
            self.retention >= Duration::from_secs(24 * 3600),
            "retention",
            humantime::format_duration(self.retention),
            "at least 1d",
        )
    }
}
