//! Prebuilds (`docs/prebuilds.md`): keep the desired number of prebuilt workspaces ready per
//! preset, so a user who picks a preset gets a workspace that is already built.
//!
//! - [`actions`]: the pure decision per preset (what to create, delete and cancel given one
//!   snapshot and `now`), including which cron schedule sets the desired count.
//! - [`snapshot`]: every preset's state, read with a few set-based statements in one snapshot.
//! - [`reconciler`]: the `prebuilds` loop — snapshot, plan (skip idle presets before they take a
//!   slot), bounded concurrent execution, cycle stats and metrics.
//! - [`config`]: the `[prebuilds]` table.
//! - [`cli`]: `worker prebuilds status | plan | invalidate`.
//!
//! Tables: `templates`, `template_versions`, `presets`, `preset_schedules`, `workspaces`,
//! `workspace_builds`, `provisioner_jobs` (migration `V4__prebuilds.sql`);
//! `presets.last_invalidated_at` (`V10__operator_plane.sql`).

pub mod actions;
pub mod cli;
pub mod config;
pub mod reconciler;
pub mod snapshot;

use crate::runtime::LoopInfo;

pub use config::PrebuildsConfig;
pub use reconciler::{CycleStats, LEADER_KEY, NAME, ReconcileError, Reconciler, WAKE_CHANNEL};

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "prebuilds",
    interval_key: "interval",
    about: "keeps each preset's prebuilt workspaces at the desired count (leader only)",
    pausable: true,
};
