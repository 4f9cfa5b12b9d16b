//! The `prebuilds` loop (`docs/prebuilds.md`): every minute, on the leader only, bring each
//! preset's prebuilds to the desired count.
//!
//! A cycle:
//! 1. Under the leader lock (the runner's READ COMMITTED transaction, held for the whole tick),
//!    read every preset's state in one REPEATABLE READ, read-only snapshot ([`snapshot::load`])
//!    and END it, so its connection is back in the pool before any write: during the fan-out the
//!    reconciler holds at most `concurrency` connections plus the lock's.
//! 2. Plan ([`plan`], pure): drop the presets [`can_skip`] says cannot produce work (most of a
//!    large deployment: presets of old versions with nothing left) before they take a slot, and
//!    decide the rest with [`calculate_actions`]. `worker prebuilds plan` runs the same function
//!    on a fresh snapshot.
//! 3. Execute ([`execute`]): the remaining presets concurrently, at most `concurrency` at a time,
//!    futures owned by the tick (no spawned tasks). A preset with nothing to write finishes
//!    without a connection; the others take one pooled connection and run each action in its
//!    own transaction: cancel pending jobs, delete (only while the workspace is still the system
//!    user's: a claim may have won the race since the snapshot), create (workspace + `start`
//!    build + pending job, NOTIFY `provisioner_job_posted` delivered at commit). One preset's
//!    failure is logged and counted; the cycle goes on.
//! 4. Stats and metrics for the cycle ([`CycleStats`]).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::StreamExt;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Gauge, Histogram, Meter};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::actions::{Actions, Conditions, PresetState, assess, can_skip};
use super::config::PrebuildsConfig;
use super::snapshot::{self, LoadError};
use crate::db::{self, Conn, Db, DbError, Exec, TxLimits};
use crate::runtime::{Loop, LoopError, Progress, Schedule, Tick};

pub const NAME: &str = "prebuilds";
/// The leader lock of the reconciler (`pg_try_advisory_xact_lock`): "prebuild" in ASCII.
pub const LEADER_KEY: i64 = 0x7072_6562_7569_6c64;
/// NOTIFY channel of the `templates.active_version_id` trigger (migration V4).
pub const WAKE_CHANNEL: &str = "template_version_activated";
/// NOTIFY channel provisioners listen on; the payload is the new job's id.
pub const JOB_POSTED_CHANNEL: &str = "provisioner_job_posted";

/// `$1` workspace id, `$2` owner (the system user), `$3` template, `$4` preset, `$5` name,
/// `$6` template version. One statement: the workspace, its pending job, its first `start` build
/// and the NOTIFY `provisioner_job_posted` of the job (delivered when the transaction commits,
/// never for a rolled-back one).
pub const CREATE: &str = "WITH w AS (\
       INSERT INTO workspaces (id, owner_id, template_id, preset_id, name) \
       VALUES ($1, $2, $3, $4, $5) RETURNING id), \
     j AS (INSERT INTO provisioner_jobs (status) VALUES ('pending') RETURNING id), \
     b AS (INSERT INTO workspace_builds \
       (workspace_id, template_version_id, preset_id, transition, build_number, job_id, initiator_id) \
       SELECT w.id, $6, $4, 'start', 1, j.id, $2 FROM w, j RETURNING job_id) \
     SELECT b.job_id FROM b, LATERAL (SELECT pg_notify('provisioner_job_posted', b.job_id::text)) AS n";
/// `$1` workspace id. Locks the row so a concurrent claim either finished before (and is seen
/// here) or waits for this transaction.
pub const LOCK_WORKSPACE: &str = "SELECT owner_id, deleted FROM workspaces WHERE id = $1 FOR UPDATE";
/// `$1` workspace id, `$2` initiator (the system user). The `delete` build follows the latest
/// build, on the same template version; its job is announced like a create's.
pub const DELETE: &str = "WITH latest AS (\
       SELECT template_version_id, preset_id, build_number FROM workspace_builds \
       WHERE workspace_id = $1 ORDER BY build_number DESC LIMIT 1), \
     j AS (INSERT INTO provisioner_jobs (status) SELECT 'pending' FROM latest RETURNING id), \
     b AS (INSERT INTO workspace_builds \
       (workspace_id, template_version_id, preset_id, transition, build_number, job_id, initiator_id) \
       SELECT $1, latest.template_version_id, latest.preset_id, 'delete', latest.build_number + 1, j.id, $2 \
       FROM latest, j RETURNING job_id) \
     SELECT b.job_id FROM b, LATERAL (SELECT pg_notify('provisioner_job_posted', b.job_id::text)) AS n";
/// `$1` job ids. Only jobs still pending: one a provisioner started in the meantime is its own.
pub const CANCEL: &str = "UPDATE provisioner_jobs SET status = 'canceled', completed_at = now() \
     WHERE id = ANY($1) AND status = 'pending'";

#[derive(Debug, thiserror::Error)]
pub enum ReconcileError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot read the prebuilds snapshot: {0}")]
    BadRow(String),
}

impl From<LoadError> for ReconcileError {
    fn from(error: LoadError) -> Self {
        match error {
            LoadError::Db(e) => ReconcileError::Db(e),
            bad @ LoadError::BadRow { .. } => ReconcileError::BadRow(bad.to_string()),
        }
    }
}

impl LoopError for ReconcileError {
    fn metric_label(&self) -> &'static str {
        match self {
            ReconcileError::Db(e) => e.metric_label(),
            ReconcileError::BadRow(_) => "bad_row",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            ReconcileError::Db(e) => e.is_transient(),
            ReconcileError::BadRow(_) => false,
        }
    }
}

/// One preset the executor works on, with what it is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresetPlan {
    pub preset: PresetState,
    pub actions: Actions,
}

/// One cycle's decisions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CyclePlan {
    /// The snapshot's database time the decisions were made at.
    pub now: DateTime<Utc>,
    pub presets_total: usize,
    /// Presets dropped before taking a slot ([`can_skip`]).
    pub skipped: usize,
    /// Every other preset, in snapshot order (by id), with its actions (possibly none).
    pub reconcile: Vec<PresetPlan>,
    /// How many presets are in each condition (a skipped preset is in none).
    pub conditions: ConditionCounts,
}

/// Presets per [`Conditions`] flag in one cycle (`prebuilds.presets{condition}`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ConditionCounts {
    pub deficit: usize,
    pub excess: usize,
    pub backing_off: usize,
    pub expired_present: usize,
}

impl ConditionCounts {
    fn add(&mut self, c: Conditions) {
        self.deficit += usize::from(c.deficit);
        self.excess += usize::from(c.excess);
        self.backing_off += usize::from(c.backing_off);
        self.expired_present += usize::from(c.expired_present);
    }

    /// Each count with its `condition` attribute.
    pub fn labelled(&self) -> [(&'static str, usize); 4] {
        [
            ("deficit", self.deficit),
            ("excess", self.excess),
            ("backing_off", self.backing_off),
            ("expired_present", self.expired_present),
        ]
    }
}

impl CyclePlan {
    /// The presets with something to write.
    pub fn with_actions(&self) -> impl Iterator<Item = &PresetPlan> {
        self.reconcile.iter().filter(|p| !p.actions.is_empty())
    }
}

/// Decides a cycle: skip what [`can_skip`], [`assess`] the rest (their actions and conditions).
/// Pure.
pub fn plan(presets: Vec<PresetState>, now: DateTime<Utc>, backoff_interval: Duration) -> CyclePlan {
    let presets_total = presets.len();
    let mut conditions = ConditionCounts::default();
    let reconcile: Vec<PresetPlan> = presets
        .into_iter()
        .filter(|p| !can_skip(p, now, backoff_interval))
        .map(|preset| {
            let (actions, found) = assess(&preset, now, backoff_interval);
            conditions.add(found);
            PresetPlan { preset, actions }
        })
        .collect();
    CyclePlan { now, presets_total, skipped: presets_total - reconcile.len(), reconcile, conditions }
}

/// Reads a fresh snapshot (REPEATABLE READ, read-only, ended before this returns) and plans
/// from it, writing nothing: what the next cycle would do.
pub async fn plan_from_snapshot(db: &Db, config: &PrebuildsConfig) -> Result<CyclePlan, ReconcileError> {
    let snapshot = db::begin_snapshot(db).await?;
    let loaded = snapshot::load(&snapshot, config.system_user_id, config.failure_window).await?;
    snapshot.finish().await?;
    Ok(plan(loaded.presets, loaded.now, config.backoff_interval))
}

/// What a delete found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// A `delete` build and its pending job were written.
    Deleted,
    /// The workspace was claimed (or deleted) since the snapshot: left alone.
    Claimed,
}

/// Whether a workspace locked for delete is still an unclaimed prebuild.
pub fn still_prebuild(owner_id: Uuid, deleted: bool, system_user_id: Uuid) -> bool {
    owner_id == system_user_id && !deleted
}

/// Creates one prebuild of `preset` in its own transaction; returns (workspace id, job id).
pub async fn create_prebuild(
    conn: &mut Conn,
    limits: TxLimits,
    system_user_id: Uuid,
    preset: &PresetState,
) -> Result<(Uuid, Uuid), DbError> {
    let workspace_id = Uuid::new_v4();
    let name = format!("prebuild-{}", &workspace_id.simple().to_string()[..12]);
    let tx = db::begin(conn, limits).await?;
    let job_id: Uuid = tx
        .fetch_one(
            CREATE,
            &[
                (&workspace_id, Type::UUID),
                (&system_user_id, Type::UUID),
                (&preset.template_id, Type::UUID),
                (&preset.id, Type::UUID),
                (&name, Type::TEXT),
                (&preset.template_version_id, Type::UUID),
            ],
        )
        .await?
        .get(0);
    db::commit(tx).await?;
    Ok((workspace_id, job_id))
}

/// Deletes one prebuild in its own transaction, unless it was claimed since the snapshot.
pub async fn delete_prebuild(
    conn: &mut Conn,
    limits: TxLimits,
    system_user_id: Uuid,
    workspace_id: Uuid,
) -> Result<DeleteOutcome, DbError> {
    let tx = db::begin(conn, limits).await?;
    let Some(row) = tx.fetch_opt(LOCK_WORKSPACE, &[(&workspace_id, Type::UUID)]).await? else {
        return Ok(DeleteOutcome::Claimed);
    };
    if !still_prebuild(row.get(0), row.get(1), system_user_id) {
        return Ok(DeleteOutcome::Claimed);
    }
    let params: [db::Param<'_>; 2] = [(&workspace_id, Type::UUID), (&system_user_id, Type::UUID)];
    if tx.fetch_opt(DELETE, &params).await?.is_none() {
        // No build at all: nothing a provisioner could tear down.
        return Ok(DeleteOutcome::Claimed);
    }
    db::commit(tx).await?;
    Ok(DeleteOutcome::Deleted)
}

/// Cancels the still-pending jobs among `jobs`; returns how many.
pub async fn cancel_jobs(conn: &mut Conn, limits: TxLimits, jobs: &[Uuid]) -> Result<u64, DbError> {
    let tx = db::begin(conn, limits).await?;
    let canceled = tx.exec(CANCEL, &[(&jobs, Type::UUID_ARRAY)]).await?;
    db::commit(tx).await?;
    Ok(canceled)
}

/// What the executor did for one preset (what committed, even if a later action failed).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PresetOutcome {
    pub created: u64,
    pub deleted: u64,
    /// Deletes skipped because the workspace was claimed since the snapshot.
    pub claimed: u64,
    pub canceled: u64,
}

impl PresetOutcome {
    fn add(&mut self, other: PresetOutcome) {
        self.created += other.created;
        self.deleted += other.deleted;
        self.claimed += other.claimed;
        self.canceled += other.canceled;
    }
}

/// Runs one preset's actions on `conn`: cancels, then deletes, then creates, each in its own
/// transaction. Returns what committed and the first error (which stops this preset only).
pub async fn apply(
    conn: &mut Conn,
    limits: TxLimits,
    system_user_id: Uuid,
    work: &PresetPlan,
) -> (PresetOutcome, Result<(), DbError>) {
    let mut done = PresetOutcome::default();
    let result = async {
        let actions = &work.actions;
        if !actions.cancel_jobs.is_empty() {
            done.canceled += cancel_jobs(conn, limits, &actions.cancel_jobs).await?;
        }
        for &workspace_id in &actions.delete {
            match delete_prebuild(conn, limits, system_user_id, workspace_id).await? {
                DeleteOutcome::Deleted => done.deleted += 1,
                DeleteOutcome::Claimed => done.claimed += 1,
            }
        }
        for _ in 0..actions.create {
            create_prebuild(conn, limits, system_user_id, &work.preset).await?;
            done.created += 1;
        }
        Ok(())
    }
    .await;
    (done, result)
}

/// What the executor did in one cycle.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ExecReport {
    pub done: PresetOutcome,
    /// Presets whose actions stopped on an error.
    pub failed: usize,
    /// Presets that went through a concurrency slot.
    pub slots_taken: usize,
    /// Most presets in flight at once (never above the concurrency).
    pub peak_in_flight: usize,
}

/// Runs `work` with at most `concurrency` presets at a time (each with at most one pooled
/// connection). Presets not started when `shutdown` fires are left for the next leader.
pub async fn execute(
    db: &Db,
    system_user_id: Uuid,
    work: &[PresetPlan],
    concurrency: usize,
    shutdown: &CancellationToken,
) -> ExecReport {
    let in_flight = AtomicUsize::new(0);
    let peak = AtomicUsize::new(0);
    let slots = AtomicUsize::new(0);
    // Indices, not references, as stream items: a borrowed item type trips the compiler's
    // higher-ranked lifetime inference once the tick future must be `Send`.
    let outcomes: Vec<(PresetOutcome, bool)> = futures_util::stream::iter(0..work.len())
        .filter(|_| std::future::ready(!shutdown.is_cancelled()))
        .map(|i| {
            let (in_flight, peak, slots) = (&in_flight, &peak, &slots);
            let item = &work[i];
            async move {
                slots.fetch_add(1, Ordering::Relaxed);
                let now = in_flight.fetch_add(1, Ordering::Relaxed) + 1;
                peak.fetch_max(now, Ordering::Relaxed);
                let (done, result) = reconcile_preset(db, system_user_id, item).await;
                in_flight.fetch_sub(1, Ordering::Relaxed);
                if let Err(error) = &result {
                    tracing::warn!(
                        preset_id = %item.preset.id,
                        preset = %item.preset.name,
                        %error,
                        created = done.created,
                        deleted = done.deleted,
                        canceled = done.canceled,
                        "prebuilds: reconciling a preset failed; the cycle goes on"
                    );
                }
                (done, result.is_err())
            }
        })
        .buffer_unordered(concurrency.max(1))
        .collect()
        .await;
    let mut report = ExecReport {
        slots_taken: slots.into_inner(),
        peak_in_flight: peak.into_inner(),
        ..ExecReport::default()
    };
    for (done, failed) in outcomes {
        report.done.add(done);
        report.failed += usize::from(failed);
    }
    report
}

async fn reconcile_preset(
    db: &Db,
    system_user_id: Uuid,
    work: &PresetPlan,
) -> (PresetOutcome, Result<(), DbError>) {
    if work.actions.is_empty() {
        return (PresetOutcome::default(), Ok(()));
    }
    let mut conn = match db.get().await {
        Ok(conn) => conn,
        Err(error) => return (PresetOutcome::default(), Err(error)),
    };
    apply(&mut conn, db.tx_limits(), system_user_id, work).await
}

/// One cycle, as logged and exported.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CycleStats {
    pub presets_total: usize,
    /// Dropped before taking a slot.
    pub skipped: usize,
    /// Went through the executor (total − skipped).
    pub reconciled: usize,
    pub created: u64,
    pub deleted: u64,
    /// Deletes not done because the workspace was claimed since the snapshot.
    pub claimed: u64,
    pub canceled: u64,
    /// Presets whose actions stopped on an error.
    pub failed: usize,
    /// Presets per condition, as planned (before the executor ran).
    pub conditions: ConditionCounts,
    pub slots_taken: usize,
    pub peak_in_flight: usize,
    /// Reading the snapshot (from asking for it to ending it).
    pub snapshot: Duration,
    pub elapsed: Duration,
}

impl CycleStats {
    /// Whether the cycle wrote anything (or tried and failed).
    pub fn changed_something(&self) -> bool {
        self.created + self.deleted + self.canceled + self.claimed > 0 || self.failed > 0
    }
}

/// The last cycle's stats, readable by tests and benchmarks while the loop runs.
#[cfg(feature = "test-support")]
#[derive(Debug, Clone, Default)]
pub struct LastCycle(std::sync::Arc<std::sync::Mutex<Option<CycleStats>>>);

#[cfg(feature = "test-support")]
impl LastCycle {
    pub fn get(&self) -> Option<CycleStats> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn set(&self, stats: CycleStats) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(stats);
    }
}

struct Instruments {
    presets: Gauge<u64>,
    conditions: Gauge<u64>,
    actions: Counter<u64>,
    duration: Histogram<f64>,
}

/// The prebuilds reconciler loop.
pub struct Reconciler {
    config: PrebuildsConfig,
    concurrency: usize,
    instruments: Instruments,
    #[cfg(feature = "test-support")]
    last: LastCycle,
}

impl Reconciler {
    /// `concurrency`: the effective fan-out (`config::Concurrency::from_config(..).prebuilds`).
    pub fn new(config: PrebuildsConfig, concurrency: usize, meter: &Meter) -> Self {
        let instruments = Instruments {
            presets: meter
                .u64_gauge("prebuilds.cycle.presets")
                .with_description("Presets in the last cycle, by state (total|skipped|reconciled)")
                .build(),
            conditions: meter
                .u64_gauge("prebuilds.presets")
                .with_description(
                    "Presets in each condition in the last cycle (deficit|excess|backing_off|expired_present)",
                )
                .build(),
            actions: meter
                .u64_counter("prebuilds.actions")
                .with_description("Prebuild actions committed, by kind (create|delete|cancel)")
                .build(),
            duration: meter
                .f64_histogram("prebuilds.cycle.duration")
                .with_unit("s")
                .with_description("Wall time of one reconciliation cycle")
                .build(),
        };
        Self {
            config,
            concurrency: concurrency.max(1),
            instruments,
            #[cfg(feature = "test-support")]
            last: LastCycle::default(),
        }
    }

    /// A handle on the last cycle's stats that outlives handing the loop to a runner.
    #[cfg(feature = "test-support")]
    pub fn last_cycle(&self) -> LastCycle {
        self.last.clone()
    }

    /// One cycle: snapshot (ended before any write), plan, execute, record.
    pub async fn cycle(&self, tick: &Tick<'_>) -> Result<CycleStats, ReconcileError> {
        let started = Instant::now();
        let snapshot = tick.snapshot().await?;
        let loaded =
            snapshot::load(&snapshot, self.config.system_user_id, self.config.failure_window).await?;
        snapshot.finish().await?;
        let snapshot_elapsed = started.elapsed();

        let plan = plan(loaded.presets, loaded.now, self.config.backoff_interval);
        for item in &plan.reconcile {
            if let Some(warning) = &item.actions.schedule_warning {
                tracing::warn!(
                    preset_id = %warning.preset_id,
                    preset = %warning.preset_name,
                    kind = warning.problem.label(),
                    problem = %warning.problem,
                    fallback = warning.fallback,
                    "prebuilds: a preset's schedules cannot decide its desired count; using desired_instances"
                );
            }
        }
        let report = execute(
            tick.db(),
            self.config.system_user_id,
            &plan.reconcile,
            self.concurrency,
            tick.shutdown(),
        )
        .await;
        let stats = CycleStats {
            presets_total: plan.presets_total,
            skipped: plan.skipped,
            reconciled: plan.reconcile.len(),
            created: report.done.created,
            deleted: report.done.deleted,
            claimed: report.done.claimed,
            canceled: report.done.canceled,
            failed: report.failed,
            conditions: plan.conditions,
            slots_taken: report.slots_taken,
            peak_in_flight: report.peak_in_flight,
            snapshot: snapshot_elapsed,
            elapsed: started.elapsed(),
        };
        self.record(&stats);
        Ok(stats)
    }

    fn record(&self, stats: &CycleStats) {
        let i = &self.instruments;
        for (state, n) in
            [("total", stats.presets_total), ("skipped", stats.skipped), ("reconciled", stats.reconciled)]
        {
            i.presets.record(n as u64, &[KeyValue::new("state", state)]);
        }
        for (condition, n) in stats.conditions.labelled() {
            i.conditions.record(n as u64, &[KeyValue::new("condition", condition)]);
        }
        for (kind, n) in [("create", stats.created), ("delete", stats.deleted), ("cancel", stats.canceled)] {
            if n > 0 {
                i.actions.add(n, &[KeyValue::new("kind", kind)]);
            }
        }
        i.duration.record(stats.elapsed.as_secs_f64(), &[]);
        #[cfg(feature = "test-support")]
        self.last.set(*stats);
        macro_rules! log_cycle {
            ($level:ident) => {
                tracing::$level!(
                    presets = stats.presets_total,
                    skipped = stats.skipped,
                    reconciled = stats.reconciled,
                    created = stats.created,
                    deleted = stats.deleted,
                    claimed = stats.claimed,
                    canceled = stats.canceled,
                    failed = stats.failed,
                    deficit = stats.conditions.deficit,
                    excess = stats.conditions.excess,
                    backing_off = stats.conditions.backing_off,
                    expired_present = stats.conditions.expired_present,
                    peak_in_flight = stats.peak_in_flight,
                    snapshot_ms = stats.snapshot.as_millis() as u64,
                    elapsed_ms = stats.elapsed.as_millis() as u64,
                    "prebuilds cycle"
                )
            };
        }
        if stats.changed_something() {
            log_cycle!(info);
        } else {
            log_cycle!(debug);
        }
    }
}

impl Loop for Reconciler {
    type Error = ReconcileError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.config
            .base
            .schedule()
            .leader_only(LEADER_KEY)
            .woken_by_with_fallback(WAKE_CHANNEL, self.config.fallback_interval())
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, ReconcileError> {
        let stats = self.cycle(tick).await?;
        tick.record_rows(stats.reconciled);
        Ok(Progress::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::prebuilds::actions::PrebuildStatus;

    fn preset(n: u128, active: bool, desired: u32) -> PresetState {
        PresetState {
            id: Uuid::from_u128(n),
            name: format!("p{n}"),
            template_id: Uuid::from_u128(1000),
            template_version_id: Uuid::from_u128(2000),
            active,
            prebuild_status: PrebuildStatus::Healthy,
            desired_instances: desired,
            invalidate_after: None,
            last_invalidated_at: None,
            timezone: "UTC".into(),
            schedules: Vec::new(),
            running: Vec::new(),
            starting: 0,
            stopping: 0,
            deleting: 0,
            pending_initial_jobs: Vec::new(),
            failures: 0,
            last_failure_at: None,
        }
    }

    #[test]
    fn a_plan_skips_idle_inactive_presets_and_keeps_the_rest_with_their_actions() {
        let now = Utc::now();
        let mut pending = preset(3, false, 0);
        pending.pending_initial_jobs = vec![Uuid::from_u128(77)];
        let presets = vec![preset(1, false, 4), preset(2, true, 2), pending, preset(4, true, 0)];
        let plan = plan(presets, now, Duration::from_secs(60));
        assert_eq!((plan.presets_total, plan.skipped), (4, 1));
        let ids: Vec<u128> = plan.reconcile.iter().map(|p| p.preset.id.as_u128()).collect();
        assert_eq!(ids, [2, 3, 4], "an active preset is kept even when it has nothing to do");
        assert_eq!(plan.reconcile[0].actions.create, 2);
        assert_eq!(plan.reconcile[1].actions.cancel_jobs, [Uuid::from_u128(77)]);
        let with_actions: Vec<u128> = plan.with_actions().map(|p| p.preset.id.as_u128()).collect();
        assert_eq!(with_actions, [2, 3]);
    }

    #[test]
    fn only_an_unclaimed_live_workspace_is_still_a_prebuild() {
        let system = Uuid::from_u128(1);
        assert!(still_prebuild(system, false, system));
        assert!(!still_prebuild(Uuid::from_u128(2), false, system), "claimed");
        assert!(!still_prebuild(system, true, system), "deleted");
    }
}
