//! Prebuilds (SPEC §7.5): keep the desired number of prebuilt workspaces ready per preset, so a
//! user who picks a preset gets a workspace that is already built.
//!
//! - [`actions`]: the pure decision per preset (what to create, delete and cancel given one
//!   snapshot and `now`), including which cron schedule sets the desired count.
//!
//! Tables: `templates`, `template_versions`, `presets`, `preset_schedules`, `workspaces`,
//! `workspace_builds`, `provisioner_jobs` (migration `V4__prebuilds.sql`).

pub mod actions;
