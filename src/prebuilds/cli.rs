//! `worker prebuilds …`: what the reconciler sees and what its next cycle would do, from a fresh
//! snapshot read the way the loop reads it, writing nothing (`status`, `plan`); and `invalidate`,
//! which marks a preset's current prebuilds expired and wakes the reconciler. A table by default,
//! JSON with `--json`.
//!
//! A malformed or unknown preset id is an error naming it, so the binary exits 1 with a message
//! rather than clap's usage exit.

use std::io::Write;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde::Serialize;
use serde_json::json;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::actions::{invalidated, target_instances};
use super::config::PrebuildsConfig;
use super::reconciler::{self, ReconcileError, WAKE_CHANNEL};
use super::snapshot::{self, BuildState, classify};
use crate::audit::{self, Action, Actor};
use crate::db::{self, Db, DbError, Exec};

/// `$1` preset, `$2` the reconciler's wake channel ([`WAKE_CHANNEL`]). Sets
/// `last_invalidated_at = now()` and NOTIFYs the channel with the preset's template id (delivered
/// at commit, never for a rolled-back transaction), so the leader runs a cycle at once. The
/// channel is the `templates.active_version_id` trigger's (migration V4), whose payload is a
/// template id too; the reconciler only needs the wake-up, and a second channel would mean a
/// second LISTEN for the same effect. No row: no such preset, and nothing is notified.
const INVALIDATE: &str = "WITH p AS (\
       UPDATE presets AS p SET last_invalidated_at = now() FROM template_versions AS v \
       WHERE p.id = $1 AND v.id = p.template_version_id \
       RETURNING p.name, p.last_invalidated_at, v.template_id) \
     SELECT p.name, p.last_invalidated_at \
     FROM p, LATERAL (SELECT pg_notify($2, p.template_id::text)) AS n";

/// `$1` the system user, `$2` preset. The preset's live prebuilds with their latest build's
/// transition and job status: [`snapshot::PREBUILDS`] for one preset, classified the same way.
const PRESET_PREBUILDS: &str = "SELECT w.created_at, b.transition, j.status \
     FROM workspaces AS w \
     CROSS JOIN LATERAL (\
       SELECT transition, job_id FROM workspace_builds \
       WHERE workspace_id = w.id ORDER BY build_number DESC LIMIT 1) AS b \
     JOIN provisioner_jobs AS j ON j.id = b.job_id \
     WHERE w.owner_id = $1 AND NOT w.deleted AND w.preset_id = $2";

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
    /// Mark every current prebuild of a preset expired (`presets.last_invalidated_at = now()`) and
    /// wake the reconciler: its next cycle deletes them and creates replacements. A claimed
    /// workspace is no longer a prebuild and is untouched.
    Invalidate {
        /// The preset's id.
        preset_id: String,
        /// Print JSON instead of a line of text.
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
    #[error("invalid preset id `{0}`: expected a UUID")]
    InvalidPresetId(String),
    #[error(transparent)]
    Invalidate(#[from] InvalidateError),
}

/// Why `invalidate` changed nothing.
#[derive(Debug, thiserror::Error)]
pub enum InvalidateError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("preset {0} does not exist")]
    UnknownPreset(Uuid),
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
    /// What the planner aims at ([`target_instances`]): 0 for an inactive preset, else from the
    /// matching schedule, else `desired_instances` (also when the schedules are unusable).
    pub desired: u32,
    /// Running and not expired.
    pub running: usize,
    /// Running and expired (TTL, or created before `last_invalidated_at`): the next cycle
    /// deletes them.
    pub expired: usize,
    /// When `worker prebuilds invalidate` last ran for this preset.
    pub last_invalidated_at: Option<DateTime<Utc>>,
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
                desired: target_instances(p, now).unwrap_or_else(|w| w.fallback),
                running: p.running.len() - expired,
                expired,
                last_invalidated_at: p.last_invalidated_at,
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

/// One preset's invalidation, as `invalidate` committed it.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Invalidated {
    pub preset_id: Uuid,
    pub preset: String,
    /// The new `last_invalidated_at`: prebuilds created before it are expired.
    pub invalidated_at: DateTime<Utc>,
}

/// The effect of `worker prebuilds invalidate`, inside the caller's transaction `tx`: sets the
/// preset's `last_invalidated_at` to the transaction's `now()` and NOTIFYs the reconciler's wake
/// channel (delivered when `tx` commits). `UnknownPreset` when there is no such preset; the
/// caller then rolls back (nothing was written).
pub async fn invalidate(tx: &impl Exec, preset: Uuid) -> Result<Invalidated, InvalidateError> {
    let row = tx
        .fetch_opt(INVALIDATE, &[(&preset, Type::UUID), (&WAKE_CHANNEL, Type::TEXT)])
        .await?
        .ok_or(InvalidateError::UnknownPreset(preset))?;
    Ok(Invalidated { preset_id: preset, preset: row.get(0), invalidated_at: row.get(1) })
}

/// What `worker prebuilds invalidate` prints.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct InvalidateReport {
    #[serde(flatten)]
    pub invalidated: Invalidated,
    /// Running prebuilds created before `invalidated_at`, now expired: the next cycle deletes
    /// them and creates replacements.
    pub expired: u64,
    /// Prebuilds created before `invalidated_at` whose `start` is still in progress: they count
    /// towards the desired number while they start, and are replaced by the first cycle that
    /// finds them running (then expired).
    pub starting: u64,
}

/// The preset's live prebuilds that `invalidated` made expired, read in `tx` (the system user
/// owns unclaimed prebuilds; a claimed workspace is not counted).
pub async fn invalidated_prebuilds(
    tx: &impl Exec,
    system_user_id: Uuid,
    invalidation: &Invalidated,
) -> Result<InvalidateReport, DbError> {
    let params: [db::Param<'_>; 2] = [(&system_user_id, Type::UUID), (&invalidation.preset_id, Type::UUID)];
    let mut report = InvalidateReport { invalidated: invalidation.clone(), expired: 0, starting: 0 };
    for row in tx.fetch_all(PRESET_PREBUILDS, &params).await? {
        if !invalidated(row.get(0), Some(invalidation.invalidated_at)) {
            continue;
        }
        match classify(row.get(1), row.get(2)) {
            BuildState::Running => report.expired += 1,
            BuildState::Starting { .. } => report.starting += 1,
            BuildState::Stopping | BuildState::Deleting | BuildState::Other => {}
        }
    }
    Ok(report)
}

/// `worker prebuilds invalidate PRESET_ID`: [`invalidate`] and [`invalidated_prebuilds`] in one
/// transaction with its audit row (`prebuilds invalidate`; a malformed or unknown id is recorded
/// as an `error` row, and nothing is written).
pub async fn invalidate_preset(
    db: &Db,
    actor: &Actor,
    config: &PrebuildsConfig,
    preset_id: &str,
) -> Result<InvalidateReport, CliError> {
    let action = Action::new("prebuilds invalidate", json!({ "preset_id": audit::typed(preset_id) }));
    let report = audit::run(db, actor, action, async |tx| {
        let preset = parse_preset(preset_id)?;
        let invalidated = invalidate(tx, preset).await?;
        let report = invalidated_prebuilds(tx, config.system_user_id, &invalidated).await?;
        // One preset row changed.
        Ok::<_, CliError>((report, Some(1)))
    })
    .await?;
    tracing::info!(
        preset_id = %report.invalidated.preset_id,
        preset = %report.invalidated.preset,
        invalidated_at = %report.invalidated.invalidated_at,
        expired = report.expired,
        starting = report.starting,
        "prebuilds: preset invalidated; the reconciler is woken"
    );
    Ok(report)
}

fn parse_preset(id: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(id).map_err(|_| CliError::InvalidPresetId(id.to_owned()))
}

/// Runs one `worker prebuilds` command, writing its output to `out`.
pub async fn run(
    db: &Db,
    actor: &Actor,
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
        PrebuildsCommand::Invalidate { preset_id, json } => {
            let report = invalidate_preset(db, actor, config, preset_id).await?;
            if *json {
                return write_json(out, &report);
            }
            let i = &report.invalidated;
            writeln!(
                out,
                "preset {} ({}) invalidated at {}: {} running prebuild(s) expired, replaced by the next \
                 cycle; {} still starting, replaced once running",
                i.preset_id,
                i.preset,
                i.invalidated_at.to_rfc3339(),
                report.expired,
                report.starting
            )?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_malformed_preset_id_is_an_error_naming_it() {
        let error = parse_preset("not-a-uuid").expect_err("rejected");
        assert_eq!(error.to_string(), "invalid preset id `not-a-uuid`: expected a UUID");
        let id = Uuid::from_u128(7);
        assert_eq!(parse_preset(&id.to_string()).ok(), Some(id));
    }
}
