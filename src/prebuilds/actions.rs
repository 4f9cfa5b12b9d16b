//! What one reconciliation cycle does to one preset: pure, no I/O, no clock (`now` is a
//! parameter, the snapshot's database time), so every rule below is a table test.
//!
//! Rules (`docs/prebuilds.md`), and why:
//!
//! - A preset is *active* when its template version is the template's active version and the
//!   template is neither deleted nor deprecated: only then can a user claim its prebuilds, so only
//!   then are new ones created. [`target_instances`] is 0 for an inactive preset.
//! - Delete *expired* prebuilds (`created_at + ttl <= now`, or created before the preset's
//!   `last_invalidated_at`: [`PresetState::is_expired`]) so a claim never hands out state older
//!   than the preset allows, and replace them in the same cycle (an expired prebuild is not
//!   counted as live). Delete *extraneous* live prebuilds, oldest first, when more are live than
//!   the target (the desired count dropped, or an operator started some by hand): the oldest are
//!   the stalest. Create `target − live − starting`: builds already in progress count, so a slow
//!   provisioner is not flooded with duplicates every cycle.
//! - Inactive preset: nothing can claim its prebuilds any more, so its target is 0: every running
//!   prebuild is deleted (expired or not), and its pending jobs (initial builds no provisioner
//!   has started) are cancelled.
//! - Backoff: after `failures` failed builds, the last at `last_failure_at`, nothing is created
//!   before `last_failure_at + failures × backoff_interval`: a broken template must not burn
//!   provisioner capacity every cycle. Deletes and cancels still happen; they free resources and
//!   do not need the template to build.
//! - `hard_limited` and `validation_failed` presets create nothing: the first has failed too
//!   often, the second has parameters every build would fail on. (SPEC names only hard-limited;
//!   creating builds that cannot succeed would only feed the backoff.)
//! - The target of an active preset comes from [`desired_instances`]: the preset's cron schedule
//!   matching `now` in the preset's timezone, else its own `desired_instances`.

use std::str::FromStr;
use std::time::Duration;

use chrono::{DateTime, TimeDelta, Timelike, Utc};
use chrono_tz::Tz;
use croner::parser::{CronParser, Seconds, Year};
use uuid::Uuid;

/// `presets.prebuild_status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrebuildStatus {
    Healthy,
    HardLimited,
    ValidationFailed,
}

impl PrebuildStatus {
    /// The column's text.
    pub fn as_str(self) -> &'static str {
        match self {
            PrebuildStatus::Healthy => "healthy",
            PrebuildStatus::HardLimited => "hard_limited",
            PrebuildStatus::ValidationFailed => "validation_failed",
        }
    }

    /// Whether new prebuilds may be created for a preset in this status.
    pub fn creates_prebuilds(self) -> bool {
        self == PrebuildStatus::Healthy
    }
}

/// A `prebuild_status` text outside the column's CHECK set.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown prebuild_status {0:?} (expected healthy, hard_limited or validation_failed)")]
pub struct UnknownPrebuildStatus(pub String);

impl FromStr for PrebuildStatus {
    type Err = UnknownPrebuildStatus;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "healthy" => Ok(PrebuildStatus::Healthy),
            "hard_limited" => Ok(PrebuildStatus::HardLimited),
            "validation_failed" => Ok(PrebuildStatus::ValidationFailed),
            other => Err(UnknownPrebuildStatus(other.to_owned())),
        }
    }
}

/// One `preset_schedules` row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresetSchedule {
    /// Five fields (minute hour day-of-month month day-of-week), read in the preset's timezone.
    pub cron_expression: String,
    pub desired_instances: u32,
}

/// A prebuild whose latest build is a succeeded `start`, still owned by the prebuilds user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunningPrebuild {
    pub workspace_id: Uuid,
    pub created_at: DateTime<Utc>,
}

/// Everything one snapshot knows about one preset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PresetState {
    pub id: Uuid,
    pub name: String,
    /// Where new prebuilds come from: the preset's template and version.
    pub template_id: Uuid,
    pub template_version_id: Uuid,
    /// Its version is the template's active version and the template is neither deleted nor
    /// deprecated.
    pub active: bool,
    pub prebuild_status: PrebuildStatus,
    /// Used when no schedule matches (and as the fallback when the schedules are unusable).
    pub desired_instances: u32,
    /// TTL of a prebuild (`invalidate_after_secs`); `None`: prebuilds never expire by age.
    pub invalidate_after: Option<Duration>,
    /// `worker prebuilds invalidate` was last run at this instant: prebuilds created before it are
    /// expired. `None`: never invalidated.
    pub last_invalidated_at: Option<DateTime<Utc>>,
    /// IANA zone name the schedules are read in (`scheduling_timezone`).
    pub timezone: String,
    pub schedules: Vec<PresetSchedule>,
    pub running: Vec<RunningPrebuild>,
    /// Prebuilds with a `start` build in progress: they will be running soon, so they count
    /// towards the desired number.
    pub starting: u32,
    /// Builds in progress that take prebuilds away (`stop`, `delete`). Reported, never counted:
    /// such a prebuild is already out of `running` and will never serve a claim.
    pub stopping: u32,
    pub deleting: u32,
    /// Pending jobs of this preset's prebuilds that no provisioner has started; only cancelled
    /// when the preset is inactive.
    pub pending_initial_jobs: Vec<Uuid>,
    /// Failed prebuild builds counted by the snapshot, the latest at `last_failure_at`.
    pub failures: u32,
    pub last_failure_at: Option<DateTime<Utc>>,
}

impl PresetState {
    /// Whether `prebuild` is expired at `now`: created before the preset's last invalidation
    /// ([`invalidated`]), or outlived the preset's TTL. A prebuild created after `now` (clock
    /// skew between rows) has not outlived any TTL.
    pub fn is_expired(&self, prebuild: &RunningPrebuild, now: DateTime<Utc>) -> bool {
        invalidated(prebuild.created_at, self.last_invalidated_at)
            || self.invalidate_after.is_some_and(|ttl| {
                now.signed_duration_since(prebuild.created_at).to_std().is_ok_and(|age| age >= ttl)
            })
    }

    /// The end of the failure backoff, when `now` is inside it: `last_failure_at + failures ×
    /// backoff_interval`. Saturates instead of overflowing: an absurd product means "for now,
    /// no", not a panic.
    pub fn backoff_until(&self, now: DateTime<Utc>, backoff_interval: Duration) -> Option<DateTime<Utc>> {
        let last = self.last_failure_at?;
        if self.failures == 0 {
            return None;
        }
        let wait =
            TimeDelta::from_std(backoff_interval.saturating_mul(self.failures)).unwrap_or(TimeDelta::MAX);
        let until = last.checked_add_signed(wait).unwrap_or(DateTime::<Utc>::MAX_UTC);
        (until > now).then_some(until)
    }
}

/// What the reconciler does for one preset in this cycle.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Actions {
    /// New prebuilds to create.
    pub create: u32,
    /// Workspaces to delete: expired ones, then extraneous ones oldest first (every running
    /// prebuild of an inactive preset, whose target is 0).
    pub delete: Vec<Uuid>,
    /// Pending provisioner jobs to cancel.
    pub cancel_jobs: Vec<Uuid>,
    /// Set while the preset is in its failure backoff; nothing is created until then.
    pub backoff_until: Option<DateTime<Utc>>,
    /// The schedules could not decide the desired count; the caller logs it.
    pub schedule_warning: Option<ScheduleWarning>,
}

impl Actions {
    /// Nothing to write for this preset.
    pub fn is_empty(&self) -> bool {
        self.create == 0 && self.delete.is_empty() && self.cancel_jobs.is_empty()
    }
}

/// Why a preset's schedules could not decide its desired count.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ScheduleProblem {
    #[error("unknown timezone {timezone:?}")]
    InvalidTimezone { timezone: String },
    #[error("invalid cron expression {expression:?}: {reason}")]
    InvalidCron { expression: String, reason: String },
    #[error("overlapping schedules match now: {}", .expressions.join(", "))]
    Overlapping { expressions: Vec<String> },
}

impl ScheduleProblem {
    /// A fixed label per kind, for metrics (never the expression: unbounded label values).
    pub fn label(&self) -> &'static str {
        match self {
            ScheduleProblem::InvalidTimezone { .. } => "invalid_timezone",
            ScheduleProblem::InvalidCron { .. } => "invalid_cron",
            ScheduleProblem::Overlapping { .. } => "overlapping",
        }
    }
}

/// The schedules of a preset were unusable; `fallback` (its `desired_instances`) applies.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("preset {preset_name:?} ({preset_id}): {problem}; using its desired_instances ({fallback})")]
pub struct ScheduleWarning {
    pub preset_id: Uuid,
    pub preset_name: String,
    pub problem: ScheduleProblem,
    pub fallback: u32,
}

/// Whether a prebuild created at `created_at` predates its preset's last invalidation
/// (`presets.last_invalidated_at`), and so is expired whatever its TTL: strictly before, as
/// upstream coder decides, so a prebuild created at the invalidation's instant is a replacement.
pub fn invalidated(created_at: DateTime<Utc>, last_invalidated_at: Option<DateTime<Utc>>) -> bool {
    last_invalidated_at.is_some_and(|at| created_at < at)
}

/// True when reconciling `preset` cannot produce any work, so the reconciler drops it before
/// taking a concurrency slot: inactive, nothing running (hence nothing expired), no pending job
/// to cancel, and not in backoff (a preset in backoff is reconciled so its backoff is reported).
/// Active presets are never skipped: they may need creates. In a large deployment most presets
/// belong to old versions and are skipped here.
pub fn can_skip(preset: &PresetState, now: DateTime<Utc>, backoff_interval: Duration) -> bool {
    !preset.active
        && preset.running.is_empty()
        && preset.pending_initial_jobs.is_empty()
        && preset.backoff_until(now, backoff_interval).is_none()
}

/// The number of prebuilds `preset` should have at `now`.
///
/// Semantics: each schedule's cron expression has five fields (minute, hour, day of month,
/// month, day of week; Vixie/POSIX syntax, `0` and `7` are Sunday, day of month and day of week
/// are ORed when both are restricted). It names a set of wall-clock minutes in the preset's IANA
/// timezone, and its desired count applies during every minute of that set: `* 9-17 * * 1-5`
/// means 09:00–17:59 local time on weekdays, whatever the UTC offset of the day (so the window
/// moves in UTC across a DST change, a local hour skipped in spring never matches and one
/// repeated in autumn matches twice). A nickname like `@hourly` (`0 * * * *`) therefore covers
/// only the first minute of each hour.
///
/// No schedule matching → the preset's `desired_instances`. Exactly one → its count. Two or more
/// (overlap), an unknown timezone or any invalid expression → `Err` with the preset's
/// `desired_instances` as `fallback`: an unusable schedule is a configuration error to report,
/// and the unscheduled count is the safest guess.
pub fn desired_instances(preset: &PresetState, now: DateTime<Utc>) -> Result<u32, ScheduleWarning> {
    if preset.schedules.is_empty() {
        return Ok(preset.desired_instances);
    }
    let warning = |problem| ScheduleWarning {
        preset_id: preset.id,
        preset_name: preset.name.clone(),
        problem,
        fallback: preset.desired_instances,
    };
    let tz: Tz = preset
        .timezone
        .parse()
        .map_err(|_| warning(ScheduleProblem::InvalidTimezone { timezone: preset.timezone.clone() }))?;
    // Cron fields are wall-clock fields; seconds are dropped so the whole minute matches (the
    // parser fills the absent seconds field with 0).
    let local = now.with_timezone(&tz).naive_local();
    let minute = local.with_second(0).and_then(|t| t.with_nanosecond(0)).unwrap_or(local);
    let parser = CronParser::builder().seconds(Seconds::Disallowed).year(Year::Disallowed).build();
    let mut matching = Vec::new();
    for schedule in &preset.schedules {
        let invalid = |reason: String| {
            warning(ScheduleProblem::InvalidCron { expression: schedule.cron_expression.clone(), reason })
        };
        let cron = parser.parse(&schedule.cron_expression).map_err(|e| invalid(e.to_string()))?;
        if cron.is_time_matching(&minute).map_err(|e| invalid(e.to_string()))? {
            matching.push(schedule);
        }
    }
    match matching.as_slice() {
        [] => Ok(preset.desired_instances),
        [schedule] => Ok(schedule.desired_instances),
        overlapping => Err(warning(ScheduleProblem::Overlapping {
            expressions: overlapping.iter().map(|s| s.cron_expression.clone()).collect(),
        })),
    }
}

/// The conditions `prebuilds.presets{condition}` counts presets by; any number may hold at once.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Conditions {
    /// Active, and fewer live (unexpired) plus starting prebuilds than desired: short of
    /// prebuilds, whether or not this cycle may create them (backoff, hard limit).
    pub deficit: bool,
    /// More live (unexpired) prebuilds than the target (an inactive preset's target is 0, so any
    /// live one).
    pub excess: bool,
    /// Inside its failure backoff: nothing is created until it ends.
    pub backing_off: bool,
    /// At least one running prebuild is expired (outlived the preset's TTL, or was created
    /// before `presets.last_invalidated_at`).
    pub expired_present: bool,
}

/// The number of prebuilds the planner keeps `preset` at, at `now`: 0 for an inactive preset
/// (nothing can claim its prebuilds, so every one is extraneous), else [`desired_instances`].
/// [`calculate_actions`] aims at it and `worker prebuilds status` shows it, so the two never
/// disagree. `Err` carries the fallback as [`desired_instances`] does.
pub fn target_instances(preset: &PresetState, now: DateTime<Utc>) -> Result<u32, ScheduleWarning> {
    if preset.active { desired_instances(preset, now) } else { Ok(0) }
}

/// Decides this cycle's actions for `preset` (see the module doc for the rules).
pub fn calculate_actions(preset: &PresetState, now: DateTime<Utc>, backoff_interval: Duration) -> Actions {
    assess(preset, now, backoff_interval).0
}

/// [`calculate_actions`], and the [`Conditions`] the preset is in, from the same numbers.
pub fn assess(preset: &PresetState, now: DateTime<Utc>, backoff_interval: Duration) -> (Actions, Conditions) {
    let mut actions =
        Actions { backoff_until: preset.backoff_until(now, backoff_interval), ..Actions::default() };
    let mut conditions = Conditions { backing_off: actions.backoff_until.is_some(), ..Conditions::default() };
    if !preset.active {
        // No build of an inactive preset can become a claimable prebuild.
        actions.cancel_jobs = preset.pending_initial_jobs.clone();
    }

    let desired = target_instances(preset, now).unwrap_or_else(|warning| {
        let fallback = warning.fallback;
        actions.schedule_warning = Some(warning);
        fallback
    });
    let (expired, mut live): (Vec<_>, Vec<_>) =
        preset.running.iter().partition(|p| preset.is_expired(p, now));
    actions.delete.extend(expired.iter().map(|p| p.workspace_id));

    let extraneous = live.len().saturating_sub(usize::try_from(desired).unwrap_or(usize::MAX));
    if extraneous > 0 {
        // Ties broken by id so the choice is the same on every replica and every run.
        live.sort_by_key(|p| (p.created_at, p.workspace_id));
        actions.delete.extend(live[..extraneous].iter().map(|p| p.workspace_id));
    }

    let live = u32::try_from(live.len()).unwrap_or(u32::MAX);
    // Saturating, so never below 0; every term subtracted is >= 0, so never above desired.
    let missing = desired.saturating_sub(live).saturating_sub(preset.starting);
    conditions.expired_present = !expired.is_empty();
    conditions.excess = extraneous > 0;
    conditions.deficit = missing > 0;
    if preset.prebuild_status.creates_prebuilds() && actions.backoff_until.is_none() {
        actions.create = missing;
    }
    (actions, conditions)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Monday 2025-06-02 12:00 UTC: the `now` of every test that does not need a specific day.
    fn now() -> DateTime<Utc> {
        at("2025-06-02T12:00:00Z")
    }

    fn at(rfc3339: &str) -> DateTime<Utc> {
        DateTime::parse_from_rfc3339(rfc3339).expect("test instant parses").with_timezone(&Utc)
    }

    fn minutes_ago(minutes: i64) -> DateTime<Utc> {
        now() - TimeDelta::minutes(minutes)
    }

    fn id(n: u128) -> Uuid {
        Uuid::from_u128(n)
    }

    const BACKOFF: Duration = Duration::from_secs(60);

    /// An active, healthy preset that wants nothing, in UTC; tests chain what they need.
    fn preset() -> PresetState {
        PresetState {
            id: id(0xAB),
            name: "small".into(),
            template_id: id(0x7E),
            template_version_id: id(0x7F),
            active: true,
            prebuild_status: PrebuildStatus::Healthy,
            desired_instances: 0,
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

    impl PresetState {
        fn desired(mut self, n: u32) -> Self {
            self.desired_instances = n;
            self
        }

        fn ttl_minutes(mut self, minutes: u64) -> Self {
            self.invalidate_after = Some(Duration::from_secs(minutes * 60));
            self
        }

        fn invalidated_minutes_ago(mut self, minutes: i64) -> Self {
            self.last_invalidated_at = Some(minutes_ago(minutes));
            self
        }

        /// Running prebuilds as (workspace id, minutes since created).
        fn running(mut self, prebuilds: &[(u128, i64)]) -> Self {
            self.running = prebuilds
                .iter()
                .map(|&(n, age)| RunningPrebuild { workspace_id: id(n), created_at: minutes_ago(age) })
                .collect();
            self
        }

        fn starting(mut self, n: u32) -> Self {
            self.starting = n;
            self
        }

        fn in_progress(mut self, stopping: u32, deleting: u32) -> Self {
            self.stopping = stopping;
            self.deleting = deleting;
            self
        }

        fn inactive(mut self) -> Self {
            self.active = false;
            self
        }

        fn status(mut self, status: PrebuildStatus) -> Self {
            self.prebuild_status = status;
            self
        }

        fn failed(mut self, failures: u32, minutes_since_last: i64) -> Self {
            self.failures = failures;
            self.last_failure_at = Some(minutes_ago(minutes_since_last));
            self
        }

        fn pending_jobs(mut self, jobs: &[u128]) -> Self {
            self.pending_initial_jobs = jobs.iter().copied().map(id).collect();
            self
        }

        fn timezone(mut self, tz: &str) -> Self {
            self.timezone = tz.into();
            self
        }

        fn schedule(mut self, cron_expression: &str, desired_instances: u32) -> Self {
            self.schedules
                .push(PresetSchedule { cron_expression: cron_expression.into(), desired_instances });
            self
        }
    }

    fn ids(ns: &[u128]) -> Vec<Uuid> {
        ns.iter().copied().map(id).collect()
    }

    #[test]
    fn conditions_count_deficit_excess_backoff_and_expired_from_the_same_numbers() {
        let c = |deficit, excess, backing_off, expired_present| Conditions {
            deficit,
            excess,
            backing_off,
            expired_present,
        };
        let cases = [
            (preset().desired(2).running(&[(1, 5), (2, 5)]), c(false, false, false, false)),
            (preset().desired(3).running(&[(1, 5)]), c(true, false, false, false)),
            // Starting builds fill the deficit.
            (preset().desired(3).running(&[(1, 5)]).starting(2), c(false, false, false, false)),
            (preset().desired(1).running(&[(1, 5), (2, 6)]), c(false, true, false, false)),
            // Expired ones are not live: deleted and short of them at once.
            (preset().desired(2).ttl_minutes(60).running(&[(1, 90), (2, 5)]), c(true, false, false, true)),
            // In backoff (or hard limited) nothing is created, but the deficit is still there.
            (preset().desired(2).failed(3, 2), c(true, false, true, false)),
            (preset().desired(2).status(PrebuildStatus::HardLimited), c(true, false, false, false)),
            // Inactive: the target is 0, so every live prebuild is in excess (an expired one counts
            // as expired, like an active preset's); no deficit.
            (
                preset().desired(3).ttl_minutes(60).inactive().running(&[(1, 90)]),
                c(false, false, false, true),
            ),
            (
                preset().desired(3).ttl_minutes(60).inactive().running(&[(1, 90), (2, 5)]),
                c(false, true, false, true),
            ),
            (preset().desired(3).inactive(), c(false, false, false, false)),
        ];
        for (state, expected) in cases {
            let (actions, conditions) = assess(&state, now(), BACKOFF);
            assert_eq!(conditions, expected, "{state:?}");
            assert_eq!(actions, calculate_actions(&state, now(), BACKOFF));
        }
    }

    #[test]
    fn an_active_preset_creates_the_prebuilds_it_is_missing() {
        let cases = [
            (3, &[][..], 3),
            (3, &[(1, 10)][..], 2),
            (3, &[(1, 10), (2, 5), (3, 1)][..], 0),
            (0, &[][..], 0),
        ];
        for (desired, running, create) in cases {
            let actions = calculate_actions(&preset().desired(desired).running(running), now(), BACKOFF);
            assert_eq!(
                actions,
                Actions { create, ..Actions::default() },
                "desired {desired}, running {}",
                running.len()
            );
        }
    }

    #[test]
    fn extraneous_prebuilds_are_deleted_oldest_first() {
        // Listed out of age order on purpose; 4 is the oldest, then 2.
        let state = preset().desired(2).running(&[(1, 10), (2, 30), (3, 20), (4, 40)]);
        let actions = calculate_actions(&state, now(), BACKOFF);
        assert_eq!(actions, Actions { delete: ids(&[4, 2]), ..Actions::default() });
    }

    #[test]
    fn expired_prebuilds_are_deleted_and_replaced_in_the_same_cycle() {
        // TTL 60 minutes: 1 (90 min) and 2 (exactly 60 min, created_at + ttl == now) are expired.
        let state = preset().desired(3).ttl_minutes(60).running(&[(1, 90), (2, 60), (3, 59)]);
        let actions = calculate_actions(&state, now(), BACKOFF);
        assert_eq!(actions, Actions { create: 2, delete: ids(&[1, 2]), ..Actions::default() });
    }

    #[test]
    fn a_prebuild_created_before_the_last_invalidation_is_invalidated() {
        let cases = [
            (60, Some(30), true),
            (31, Some(30), true),
            (30, Some(30), false), // created at the invalidation's instant: a replacement
            (29, Some(30), false),
            (-5, Some(-10), true), // both after `now` (clock skew): the order of the two decides
            (600, None, false),    // never invalidated
        ];
        for (created, invalidated_at, expected) in cases {
            assert_eq!(
                invalidated(minutes_ago(created), invalidated_at.map(minutes_ago)),
                expected,
                "created {created} min ago, invalidated {invalidated_at:?} min ago"
            );
        }
    }

    #[test]
    fn prebuilds_created_before_the_last_invalidation_are_expired_deleted_and_replaced() {
        let running = [(1, 90), (2, 31), (3, 30), (4, 5)];
        let cases = [
            // Invalidated 30 minutes ago, no TTL: 1 and 2 predate it, 3 was created at that instant.
            (preset().desired(4).invalidated_minutes_ago(30).running(&running), 2, &[1, 2][..]),
            // Both rules: TTL 60 expires 1, the invalidation 10 minutes ago everything older.
            (
                preset().desired(4).ttl_minutes(60).invalidated_minutes_ago(10).running(&running),
                3,
                &[1, 2, 3],
            ),
            // Invalidated just now: every running prebuild is replaced in this cycle.
            (preset().desired(4).invalidated_minutes_ago(0).running(&running), 4, &[1, 2, 3, 4]),
            // Invalidated before every prebuild was created: nothing to replace.
            (preset().desired(4).invalidated_minutes_ago(120).running(&running), 0, &[]),
            // Expired ones are replaced only up to the target; the extra live one is extraneous.
            (preset().desired(1).invalidated_minutes_ago(30).running(&running), 0, &[1, 2, 3]),
            // A starting prebuild counts towards the target while it starts.
            (preset().desired(4).invalidated_minutes_ago(30).running(&running).starting(1), 1, &[1, 2]),
            // In backoff: expired ones are still deleted, nothing is created.
            (preset().desired(4).invalidated_minutes_ago(30).running(&running).failed(3, 1), 0, &[1, 2]),
        ];
        for (state, create, delete) in cases {
            let actions = calculate_actions(&state, now(), BACKOFF);
            assert_eq!((actions.create, &actions.delete), (create, &ids(delete)), "{state:?}");
        }
    }

    #[test]
    fn the_target_is_zero_for_an_inactive_preset_and_desired_instances_for_an_active_one() {
        let scheduled = || preset().desired(2).schedule("* * * * *", 5);
        let cases = [
            (preset().desired(3), 3),
            (scheduled(), 5),
            (preset().desired(3).inactive(), 0),
            (scheduled().inactive(), 0),
        ];
        for (state, target) in cases {
            assert_eq!(target_instances(&state, now()), Ok(target), "{state:?}");
        }
        // An unusable schedule: the active preset's fallback, no warning for an inactive one.
        let broken = || preset().desired(3).schedule("* 25 * * *", 5);
        assert_eq!(target_instances(&broken(), now()).map_err(|w| w.fallback), Err(3));
        assert_eq!(target_instances(&broken().inactive(), now()), Ok(0));
        assert_eq!(calculate_actions(&broken().inactive(), now(), BACKOFF).schedule_warning, None);
    }

    #[test]
    fn builds_in_progress_count_towards_desired_but_stops_and_deletes_do_not() {
        let cases = [
            (preset().desired(4).running(&[(1, 5)]).starting(2), 1),
            (preset().desired(4).running(&[(1, 5)]).starting(3), 0),
            (preset().desired(4).running(&[(1, 5)]).in_progress(2, 2), 3),
        ];
        for (state, create) in cases {
            let actions = calculate_actions(&state, now(), BACKOFF);
            assert_eq!(actions.create, create, "{state:?}");
        }
    }

    #[test]
    fn a_failing_preset_creates_nothing_inside_its_backoff_window_and_resumes_after_it() {
        // 3 failures, the last 2 minutes ago, 1 minute per failure: backoff until 1 minute from now.
        let inside = preset().desired(2).ttl_minutes(60).running(&[(1, 90)]).failed(3, 2);
        let actions = calculate_actions(&inside, now(), BACKOFF);
        assert_eq!(
            actions,
            Actions {
                delete: ids(&[1]),
                backoff_until: Some(now() + TimeDelta::minutes(1)),
                ..Actions::default()
            },
            "inside the window: the expired prebuild is still deleted, nothing is created"
        );

        // The window ends exactly now (last failure 3 minutes ago): creation resumes.
        let after = preset().desired(2).failed(3, 3);
        assert_eq!(calculate_actions(&after, now(), BACKOFF), Actions { create: 2, ..Actions::default() });
    }

    #[test]
    fn an_inactive_preset_cancels_its_pending_jobs() {
        let state = preset().desired(3).inactive().pending_jobs(&[7, 8]);
        let actions = calculate_actions(&state, now(), BACKOFF);
        assert_eq!(actions, Actions { cancel_jobs: ids(&[7, 8]), ..Actions::default() });
    }

    #[test]
    fn an_inactive_preset_deletes_its_running_and_expired_prebuilds() {
        // Expired first, then the others oldest first (its target is 0: all are extraneous).
        let state =
            preset().desired(3).ttl_minutes(60).inactive().running(&[(3, 5), (1, 90), (2, 10), (4, 20)]);
        let actions = calculate_actions(&state, now(), BACKOFF);
        assert_eq!(actions, Actions { delete: ids(&[1, 4, 2, 3]), ..Actions::default() });
    }

    #[test]
    fn hard_limited_and_validation_failed_presets_create_nothing() {
        for (text, creates) in [("healthy", 2), ("hard_limited", 0), ("validation_failed", 0)] {
            let status: PrebuildStatus = text.parse().expect("a status of the CHECK set");
            assert_eq!(status.as_str(), text);
            let state = preset().desired(2).ttl_minutes(60).running(&[(1, 90)]).status(status);
            let actions = calculate_actions(&state, now(), BACKOFF);
            assert_eq!(actions.create, creates, "{text}");
            assert_eq!(actions.delete, ids(&[1]), "{text}: expired prebuilds are still deleted");
        }
        assert!("broken".parse::<PrebuildStatus>().is_err());
    }

    #[test]
    fn creation_is_clamped_to_desired() {
        let cases = [
            // Many expired do not mean more than desired is created.
            (preset().desired(2).ttl_minutes(60).running(&[(1, 90), (2, 91), (3, 92), (4, 93)]), 2),
            // More starting than desired never makes the count negative.
            (preset().desired(2).starting(5), 0),
            (preset().desired(2).running(&[(1, 1), (2, 2), (3, 3)]).starting(1), 0),
        ];
        for (state, create) in cases {
            assert_eq!(calculate_actions(&state, now(), BACKOFF).create, create, "{state:?}");
        }
    }

    #[test]
    fn a_schedule_follows_its_timezone_across_dst_changes() {
        // America/New_York: EST (UTC-5) until 2025-03-09 02:00, EDT (UTC-4) until 2025-11-02 02:00.
        let cases = [
            ("* 9-17 * * *", "2025-03-07T13:59:00Z", 1), // 08:59 EST
            ("* 9-17 * * *", "2025-03-07T14:00:00Z", 5), // 09:00 EST
            ("* 9-17 * * *", "2025-03-07T22:59:59Z", 5), // 17:59:59 EST: the whole minute matches
            ("* 9-17 * * *", "2025-03-07T23:00:00Z", 1), // 18:00 EST
            ("* 9-17 * * *", "2025-03-10T12:59:00Z", 1), // 08:59 EDT
            ("* 9-17 * * *", "2025-03-10T13:00:00Z", 5), // 09:00 EDT: an hour earlier in UTC
            ("* 9-17 * * *", "2025-03-10T21:59:00Z", 5), // 17:59 EDT
            ("* 9-17 * * *", "2025-03-10T22:00:00Z", 1), // 18:00 EDT
            ("* 9-17 * * *", "2025-10-31T13:00:00Z", 5), // 09:00 EDT
            ("* 9-17 * * *", "2025-11-03T13:30:00Z", 1), // 08:30 EST
            ("* 9-17 * * *", "2025-11-03T14:00:00Z", 5), // 09:00 EST
            ("* 2 * * *", "2025-03-09T06:59:00Z", 1),    // 01:59 EST
            ("* 2 * * *", "2025-03-09T07:00:00Z", 1),    // 03:00 EDT: 02:xx did not happen
            ("* 1 * * *", "2025-11-02T05:30:00Z", 5),    // 01:30 EDT
            ("* 1 * * *", "2025-11-02T06:30:00Z", 5),    // 01:30 EST, the same hour again
            ("* 1 * * *", "2025-11-02T07:00:00Z", 1),    // 02:00 EST
        ];
        for (cron, instant, desired) in cases {
            let state = preset().desired(1).timezone("America/New_York").schedule(cron, 5);
            assert_eq!(desired_instances(&state, at(instant)), Ok(desired), "{cron} at {instant}");
        }
    }

    #[test]
    fn overlapping_schedules_fall_back_to_desired_instances_with_a_warning() {
        let state = preset().desired(1).schedule("* 9-17 * * *", 5).schedule("* 12-20 * * *", 8);
        assert_eq!(desired_instances(&state, at("2025-06-02T10:00:00Z")), Ok(5));
        assert_eq!(desired_instances(&state, at("2025-06-02T19:00:00Z")), Ok(8));

        let warning = desired_instances(&state, at("2025-06-02T13:00:00Z")).expect_err("schedules overlap");
        assert_eq!(
            warning,
            ScheduleWarning {
                preset_id: id(0xAB),
                preset_name: "small".into(),
                problem: ScheduleProblem::Overlapping {
                    expressions: vec!["* 9-17 * * *".into(), "* 12-20 * * *".into()]
                },
                fallback: 1,
            }
        );
        assert!(warning.to_string().contains("\"small\""), "the message names the preset: {warning}");

        let actions = calculate_actions(&state, at("2025-06-02T13:00:00Z"), BACKOFF);
        assert_eq!(actions.create, 1, "the fallback count is what gets created");
        assert_eq!(actions.schedule_warning, Some(warning), "the caller gets the warning to log");
    }

    #[test]
    fn an_invalid_cron_or_timezone_falls_back_to_desired_instances_with_a_warning() {
        let cases = [
            (preset().schedule("* 25 * * *", 5), "invalid_cron"),
            (preset().schedule("not a cron", 5), "invalid_cron"),
            // Six fields (with seconds) are not the documented five-field syntax.
            (preset().schedule("0 * * * * *", 5), "invalid_cron"),
            // One bad schedule spoils the set, even when another one would match.
            (preset().schedule("* * * * *", 5).schedule("* 25 * * *", 7), "invalid_cron"),
            (preset().timezone("Mars/Olympus_Mons").schedule("* * * * *", 5), "invalid_timezone"),
        ];
        for (state, label) in cases {
            let state = state.desired(2);
            let warning = desired_instances(&state, now()).expect_err("unusable schedules");
            assert_eq!((warning.problem.label(), warning.fallback), (label, 2), "{state:?}");
            assert_eq!(calculate_actions(&state, now(), BACKOFF).create, 2, "{state:?}");
        }
    }

    #[test]
    fn only_an_idle_inactive_preset_outside_backoff_can_be_skipped() {
        let cases = [
            (preset().inactive(), true),
            (preset().inactive().failed(3, 10), true), // the backoff ended 7 minutes ago
            (preset(), false),                         // active: may need creates
            (preset().inactive().running(&[(1, 5)]), false),
            (preset().inactive().ttl_minutes(1).running(&[(1, 5)]), false), // running and expired
            (preset().inactive().pending_jobs(&[7]), false),
            (preset().inactive().failed(3, 1), false), // in backoff
        ];
        for (state, skip) in cases {
            assert_eq!(can_skip(&state, now(), BACKOFF), skip, "{state:?}");
        }
    }
}
