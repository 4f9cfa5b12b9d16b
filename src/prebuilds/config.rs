//! `[prebuilds]`: the reconciler's interval, the system user that owns prebuilds, the failure
//! backoff and the fan-out.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::runtime::{LoopConfig, check_fallback};
use crate::validate::{Violation, check, positive};

/// A cycle a minute (`docs/prebuilds.md`); NOTIFY `template_version_activated` wakes it earlier.
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(30);
/// The owner of every unclaimed prebuild. A fixed, well-known id (not the nil uuid, which
/// too many tools read as "unset") that the API tier must use for the same user.
pub const DEFAULT_SYSTEM_USER_ID: Uuid = Uuid::from_u128(1);
/// Each failed build in the window pushes creation back by this much.
pub const DEFAULT_BACKOFF_INTERVAL: Duration = Duration::from_secs(60);
/// Failures older than this no longer count towards the backoff.
pub const DEFAULT_FAILURE_WINDOW: Duration = Duration::from_secs(3600);

/// The prebuilds reconciler.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct PrebuildsConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
    /// The interval while the LISTEN connection is known to deliver `template_version_activated`
    /// wakes; at least `interval`. Unset: the interval (claims and failed builds are found by
    /// polling alone, so polling is not only a fallback here).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub fallback_interval: Option<Duration>,
    /// Owner of unclaimed prebuilds (`workspaces.owner_id`); a claim changes the owner.
    pub system_user_id: Uuid,
    /// Backoff after failed builds: nothing is created before `last failure + failures ×
    /// backoff_interval`.
    #[serde(with = "humantime_serde")]
    pub backoff_interval: Duration,
    /// How far back failed builds are counted for the backoff.
    #[serde(with = "humantime_serde")]
    pub failure_window: Duration,
    /// Presets reconciled at once (each holds one pooled connection while it writes);
    /// 0 = derive from the pool size (`max(1, pool_size / 2)`), and never more than that, see
    /// `config::Concurrency`.
    pub concurrency: usize,
}

impl Default for PrebuildsConfig {
    fn default() -> Self {
        Self {
            base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT),
            fallback_interval: None,
            system_user_id: DEFAULT_SYSTEM_USER_ID,
            backoff_interval: DEFAULT_BACKOFF_INTERVAL,
            failure_window: DEFAULT_FAILURE_WINDOW,
            concurrency: 0,
        }
    }
}

impl PrebuildsConfig {
    /// The effective `fallback_interval`: unset, the interval, because the reconciler also
    /// repairs what no NOTIFY announces (claims, failed builds, deleted workspaces).
    pub fn fallback_interval(&self) -> Duration {
        self.fallback_interval.unwrap_or(self.base.interval).max(self.base.interval)
    }

    /// Keys are relative to `[prebuilds]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()?;
        check_fallback("fallback_interval", self.fallback_interval, "interval", self.base.interval)?;
        check(!self.system_user_id.is_nil(), "system_user_id", self.system_user_id, "a non-nil uuid")?;
        positive("backoff_interval", self.backoff_interval)?;
        positive("failure_window", self.failure_window)?;
        check(self.concurrency <= 1000, "concurrency", self.concurrency, "0..=1000 (0 = from pool size)")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_defaults_validate_and_a_nil_system_user_or_zero_durations_do_not() {
        assert!(PrebuildsConfig::default().validate().is_ok());
        let nil = PrebuildsConfig { system_user_id: Uuid::nil(), ..PrebuildsConfig::default() };
        assert_eq!(nil.validate().map_err(|v| v.key), Err("system_user_id".to_owned()));
        let zero = PrebuildsConfig { backoff_interval: Duration::ZERO, ..PrebuildsConfig::default() };
        assert_eq!(zero.validate().map_err(|v| v.key), Err("backoff_interval".to_owned()));
    }
}
