//! One cycle's view of every preset, read in one REPEATABLE READ snapshot with a handful of
//! set-based statements (never one per preset: a deployment has thousands of presets and most of
//! them are idle), then assembled into [`PresetState`]s in memory.
//!
//! - presets with their template's state (active = the template's active version, template
//!   neither deleted nor deprecated) and when they were last invalidated;
//! - their cron schedules;
//! - every live prebuild (owned by the system user, not deleted) with its latest build and that
//!   build's job: a succeeded `start` is running, a `start` in progress is starting (and its job,
//!   while pending, cancellable), `stop`/`delete` in progress are reported;
//! - failed prebuild `start` builds within the failure window, per preset (the backoff).
//!
//! "Now" is the database's `now()` read in the same snapshot (the transaction's start), so the
//! decisions use the same clock as the rows.

use std::collections::HashMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::actions::{PrebuildStatus, PresetSchedule, PresetState, RunningPrebuild};
use crate::db::{DbError, Exec};

pub const NOW: &str = "SELECT now()";

/// Every preset with its template's state. `active` is false while the template has no active
/// version.
pub const PRESETS: &str = "SELECT p.id, p.name, t.id, p.template_version_id, \
     coalesce(t.active_version_id = p.template_version_id AND NOT t.deleted AND NOT t.deprecated, false), \
     p.prebuild_status, p.desired_instances, p.invalidate_after_secs, p.scheduling_timezone, \
     p.last_invalidated_at \
     FROM presets AS p \
     JOIN template_versions AS v ON v.id = p.template_version_id \
     JOIN templates AS t ON t.id = v.template_id \
     ORDER BY p.id";

pub const SCHEDULES: &str =
    "SELECT preset_id, cron_expression, desired_instances FROM preset_schedules ORDER BY preset_id, id";

/// `$1` the system user. Live prebuilds (the `workspaces_prebuilds_idx` range) with their latest
/// build (the `(workspace_id, build_number)` unique index, scanned backwards) and its job.
pub const PREBUILDS: &str = "SELECT w.id, w.preset_id, w.created_at, b.transition, j.id, j.status \
     FROM workspaces AS w \
     CROSS JOIN LATERAL (\
       SELECT transition, job_id FROM workspace_builds \
       WHERE workspace_id = w.id ORDER BY build_number DESC LIMIT 1) AS b \
     JOIN provisioner_jobs AS j ON j.id = b.job_id \
     WHERE w.owner_id = $1 AND NOT w.deleted AND w.preset_id IS NOT NULL";

/// `$1` the system user, `$2` the failure window in seconds. Failed prebuild `start` builds per
/// preset within the window (the partial index on failed jobs' `completed_at`).
pub const FAILURES: &str = "SELECT b.preset_id, count(*), max(j.completed_at) \
     FROM provisioner_jobs AS j JOIN workspace_builds AS b ON b.job_id = j.id \
     WHERE j.status = 'failed' AND j.completed_at > now() - make_interval(secs => $2) \
       AND b.transition = 'start' AND b.initiator_id = $1 AND b.preset_id IS NOT NULL \
     GROUP BY b.preset_id";

/// What one snapshot read: the database's `now` and every preset.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub now: DateTime<Utc>,
    pub presets: Vec<PresetState>,
}

/// A row the reconciler cannot interpret; the CHECK constraints make it a schema mismatch.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("preset {preset_id}: {problem}")]
    BadRow { preset_id: Uuid, problem: String },
}

/// Reads every preset's state. `snapshot` should be a REPEATABLE READ transaction (the reads
/// must agree with each other); `system_user_id` owns unclaimed prebuilds.
pub async fn load(
    snapshot: &impl Exec,
    system_user_id: Uuid,
    failure_window: Duration,
) -> Result<Loaded, LoadError> {
    let now: DateTime<Utc> = snapshot.fetch_one(NOW, &[]).await?.get(0);
    let mut presets = Vec::new();
    let mut index = HashMap::new();
    for row in snapshot.fetch_all(PRESETS, &[]).await? {
        let id: Uuid = row.get(0);
        let bad = |problem: String| LoadError::BadRow { preset_id: id, problem };
        let status: String = row.get(5);
        let prebuild_status: PrebuildStatus = status.parse().map_err(|e| bad(format!("{e}")))?;
        let desired: i32 = row.get(6);
        let ttl: Option<i32> = row.get(7);
        index.insert(id, presets.len());
        presets.push(PresetState {
            id,
            name: row.get(1),
            template_id: row.get(2),
            template_version_id: row.get(3),
            active: row.get(4),
            prebuild_status,
            desired_instances: u32::try_from(desired)
                .map_err(|_| bad(format!("desired_instances {desired}")))?,
            invalidate_after: ttl.and_then(|s| u64::try_from(s).ok()).map(Duration::from_secs),
            last_invalidated_at: row.get(9),
            timezone: row.get(8),
            schedules: Vec::new(),
            running: Vec::new(),
            starting: 0,
            stopping: 0,
            deleting: 0,
            pending_initial_jobs: Vec::new(),
            failures: 0,
            last_failure_at: None,
        });
    }
    let of = |preset_id: Uuid| index.get(&preset_id).copied();

    for row in snapshot.fetch_all(SCHEDULES, &[]).await? {
        let Some(i) = of(row.get(0)) else { continue };
        let desired: i32 = row.get(2);
        presets[i].schedules.push(PresetSchedule {
            cron_expression: row.get(1),
            desired_instances: u32::try_from(desired).unwrap_or(0),
        });
    }

    for row in snapshot.fetch_all(PREBUILDS, &[(&system_user_id, Type::UUID)]).await? {
        let Some(i) = of(row.get(1)) else { continue };
        let preset = &mut presets[i];
        let transition: &str = row.get(3);
        let status: &str = row.get(5);
        match classify(transition, status) {
            BuildState::Running => {
                preset.running.push(RunningPrebuild { workspace_id: row.get(0), created_at: row.get(2) });
            }
            BuildState::Starting { pending } => {
                preset.starting += 1;
                if pending {
                    preset.pending_initial_jobs.push(row.get(4));
                }
            }
            BuildState::Stopping => preset.stopping += 1,
            BuildState::Deleting => preset.deleting += 1,
            BuildState::Other => {}
        }
    }

    let window = failure_window.as_secs_f64();
    for row in snapshot.fetch_all(FAILURES, &[(&system_user_id, Type::UUID), (&window, Type::FLOAT8)]).await?
    {
        let Some(i) = of(row.get(0)) else { continue };
        let failures: i64 = row.get(1);
        presets[i].failures = u32::try_from(failures).unwrap_or(u32::MAX);
        presets[i].last_failure_at = row.get(2);
    }

    // Listing order is not part of the contract; sorting makes deletes and plans reproducible.
    for preset in &mut presets {
        preset.pending_initial_jobs.sort_unstable();
    }
    Ok(Loaded { now, presets })
}

/// What a prebuild's latest build says about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BuildState {
    /// A succeeded `start`: ready to be claimed.
    Running,
    /// A `start` in progress; `pending` while no provisioner has picked its job up.
    Starting {
        pending: bool,
    },
    Stopping,
    Deleting,
    /// Failed, canceled, or a finished stop/delete: not a prebuild any more.
    Other,
}

/// Classifies a latest build by its transition and its job's status.
pub fn classify(transition: &str, job_status: &str) -> BuildState {
    let in_progress = matches!(job_status, "pending" | "running");
    match (transition, job_status) {
        ("start", "succeeded") => BuildState::Running,
        ("start", _) if in_progress => BuildState::Starting { pending: job_status == "pending" },
        ("stop", _) if in_progress => BuildState::Stopping,
        ("delete", _) if in_progress => BuildState::Deleting,
        _ => BuildState::Other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_latest_build_is_classified_by_its_transition_and_job_status() {
        let cases = [
            ("start", "succeeded", BuildState::Running),
            ("start", "pending", BuildState::Starting { pending: true }),
            ("start", "running", BuildState::Starting { pending: false }),
            ("start", "failed", BuildState::Other),
            ("start", "canceled", BuildState::Other),
            ("stop", "running", BuildState::Stopping),
            ("stop", "succeeded", BuildState::Other),
            ("delete", "pending", BuildState::Deleting),
            ("delete", "succeeded", BuildState::Other),
        ];
        for (transition, status, state) in cases {
            assert_eq!(classify(transition, status), state, "{transition} {status}");
        }
    }
}
