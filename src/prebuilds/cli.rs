//! `worker prebuilds …`: what the reconciler sees and what its next cycle would do, from a fresh
//! snapshot read the way the loop reads it, writing nothing. A table by default, JSON with
//! `--json`.

use std::io::Write;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde::Serialize;
use uuid::Uuid;

use super::actions::desired_instances;
use super::config::PrebuildsConfig;
use super::reconciler::{self, ReconcileError};
use super::snapshot;
use crate::db::{self, Db, DbError};

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum PrebuildsCommand {
    /// Per preset: desired, running, expired, starting, pending jobs, backoff.
    Status {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// The actions the next cycle would take (computed like the loop does, nothing written).
    Plan {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Reconcile(#[from] ReconcileError),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

impl From<DbError> for CliError {
    fn from(error: DbError) -> Self {
        CliError::Reconcile(error.into())
    }
}

/// One preset as `status` shows it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PresetStatus {
    pub id: Uuid,
    pub name: String,
    pub active: bool,
    pub prebuild_status: &'static str,
    /// From the matching schedule, else `desired_instances` (also when the schedules are
    /// unusable).
    pub desired: u32,
    /// Running and not expired.
    pub running: usize,
    pub expired: usize,
    pub starting: u32,
    pub stopping: u32,
    pub deleting: u32,
    /// Start jobs no provisioner has picked up yet.
    pub pending: usize,
    pub failures: u32,
    pub backoff_until: Option<DateTime<Utc>>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct StatusReport {
    pub now: DateTime<Utc>,
    pub presets: Vec<PresetStatus>,
}

/// One preset's actions as `plan` shows them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlannedActions {
    pub preset_id: Uuid,
    pub preset: String,
    pub create: u32,
    pub delete: Vec<Uuid>,
    pub cancel_jobs: Vec<Uuid>,
    pub backoff_until: Option<DateTime<Utc>>,
    pub schedule_warning: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct PlanTotals {
    pub create: u64,
    pub delete: u64,
    pub cancel: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PlanReport {
    pub now: DateTime<Utc>,
    pub presets_total: usize,
    pub skipped: usize,
    pub reconciled: usize,
    pub totals: PlanTotals,
    /// Presets with something to write, by id.
    pub actions: Vec<PlannedActions>,
}

/// Every preset's state from a fresh snapshot.
pub async fn status(db: &Db, config: &PrebuildsConfig) -> Result<StatusReport, ReconcileError> {
    let snapshot = db::begin_snapshot(db).await?;
    let loaded = snapshot::load(&snapshot, config.system_user_id, config.failure_window).await?;
    snapshot.finish().await?;
    let now = loaded.now;
    let presets = loaded
        .presets
        .iter()
        .map(|p| {
            let expired = p.running.iter().filter(|r| p.is_expired(r, now)).count();
            PresetStatus {
                id: p.id,
                name: p.name.clone(),
                active: p.active,
                prebuild_status: p.prebuild_status.as_str(),
                desired: desired_instances(p, now).unwrap_or_else(|w| w.fallback),
                running: p.running.len() - expired,
                expired,
                starting: p.starting,
                stopping: p.stopping,
                deleting: p.deleting,
                pending: p.pending_initial_jobs.len(),
                failures: p.failures,
                backoff_until: p.backoff_until(now, config.backoff_interval),
            }
        })
        .collect();
    Ok(StatusReport { now, presets })
}

/// What the next cycle would do, from a fresh snapshot ([`reconciler::plan_from_snapshot`]).
pub async fn plan(db: &Db, config: &PrebuildsConfig) -> Result<PlanReport, ReconcileError> {
    let plan = reconciler::plan_from_snapshot(db, config).await?;
    let mut totals = PlanTotals::default();
    let actions = plan
        .with_actions()
        .map(|p| {
            let a = &p.actions;
            totals.create += u64::from(a.create);
            totals.delete += a.delete.len() as u64;
            totals.cancel += a.cancel_jobs.len() as u64;
            PlannedActions {
                preset_id: p.preset.id,
                preset: p.preset.name.clone(),
                create: a.create,
                delete: a.delete.clone(),
                cancel_jobs: a.cancel_jobs.clone(),
                backoff_until: a.backoff_until,
                schedule_warning: a.schedule_warning.as_ref().map(ToString::to_string),
            }
        })
        .collect();
    Ok(PlanReport {
        now: plan.now,
        presets_total: plan.presets_total,
        skipped: plan.skipped,
        reconciled: plan.reconcile.len(),
        totals,
        actions,
    })
}

/// Runs one `worker prebuilds` command, writing its output to `out`.
pub async fn run(
    db: &Db,
    config: &PrebuildsConfig,
    command: &PrebuildsCommand,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match command {
        PrebuildsCommand::Status { json } => {
            let report = status(db, config).await?;
            if *json {
                return write_json(out, &report);
            }
            writeln!(
                out,
                "{:<36} {:<20} {:<6} {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} BACKOFF UNTIL",
                "PRESET",
                "NAME",
                "ACTIVE",
                "DESIRED",
                "RUNNING",
                "EXPIRED",
                "STARTING",
                "PENDING",
                "FAILURES"
            )?;
            for p in &report.presets {
                writeln!(
                    out,
                    "{:<36} {:<20} {:<6} {:>7} {:>7} {:>7} {:>8} {:>7} {:>8} {}",
                    p.id,
                    p.name,
                    if p.active { "yes" } else { "no" },
                    p.desired,
                    p.running,
                    p.expired,
                    p.starting,
                    p.pending,
                    p.failures,
                    time(p.backoff_until)
                )?;
            }
            if report.presets.is_empty() {
                writeln!(out, "(no presets)")?;
            }
        }
        PrebuildsCommand::Plan { json } => {
            let report = plan(db, config).await?;
            if *json {
                return write_json(out, &report);
            }
            writeln!(
                out,
                "presets: {} total, {} skipped (idle), {} to reconcile; actions: {} create, {} delete, {} cancel",
                report.presets_total,
                report.skipped,
                report.reconciled,
                report.totals.create,
                report.totals.delete,
                report.totals.cancel
            )?;
            for a in &report.actions {
                writeln!(
                    out,
                    "{} {:<20} create {:>3}  delete {:>3}  cancel {:>3}{}",
                    a.preset_id,
                    a.preset,
                    a.create,
                    a.delete.len(),
                    a.cancel_jobs.len(),
                    a.backoff_until
                        .map(|t| format!("  backoff until {}", t.to_rfc3339()))
                        .unwrap_or_default()
                )?;
                for workspace in &a.delete {
                    writeln!(out, "    delete workspace {workspace}")?;
                }
                for job in &a.cancel_jobs {
                    writeln!(out, "    cancel job {job}")?;
                }
                if let Some(warning) = &a.schedule_warning {
                    writeln!(out, "    warning: {warning}")?;
                }
            }
        }
    }
    Ok(())
}

fn write_json(out: &mut impl Write, value: &impl Serialize) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

fn time(at: Option<DateTime<Utc>>) -> String {
    at.map_or_else(|| "-".into(), |t| t.format("%Y-%m-%d %H:%M:%S").to_string())
}
