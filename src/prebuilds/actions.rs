//! What one reconciliation cycle does to one preset: pure, no I/O, no clock (`now` is a
//! parameter, the snapshot's database time), so every rule below is a table test.
//!
//! Rules (`docs/prebuilds.md`), and why:
//!
//! - A preset is *active* when its template version is the template's active version and the
//!   template is neither deleted nor deprecated: only then can a user claim its prebuilds, so only
//!   then are new ones created.
//! - Active preset: delete *expired* prebuilds (`created_at + ttl <= now`) so a claim never hands
//!   out state older than the preset allows, and replace them in the same cycle (an expired
//!   prebuild is not counted as live). Delete *extraneous* live prebuilds, oldest first, when more
//!   are live than desired (the desired count dropped, or an operator started some by hand):
//!   the oldest are the stalest. Create `desired − live − starting`: builds already in progress
//!   count, so a slow provisioner is not flooded with duplicates every cycle.
//! - Inactive preset: nothing can claim its prebuilds any more, so cancel its pending jobs (initial
//!   builds no provisioner has started) and delete every running prebuild, expired or not.
//! - Backoff: after `failures` failed builds, the last at `last_failure_at`, nothing is created
//!   before `last_failure_at + failures × backoff_interval`: a broken template must not burn
//!   provisioner capacity every cycle. Deletes and cancels still happen; they free resources and
//!   do not need the template to build.
//! - `hard_limited` and `validation_failed` presets create nothing: the first has failed too
//!   often, the second has parameters every build would fail on. (SPEC names only hard-limited;
//!   creating builds that cannot succeed would only feed the backoff.)
//! - The desired count comes from [`desired_instances`]: the preset's cron schedule matching
//!   `now` in the preset's timezone, else its own `desired_instances`.

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
    /// TTL of a prebuild (`invalidate_after_secs`); `None`: prebuilds never expire.
    pub invalidate_after: Option<Duration>,
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
    /// Whether `prebuild` has outlived the preset's TTL at `now`. A prebuild created after `now`
    /// (clock skew between rows) is not expired.
    pub fn is_expired(&self, prebuild: &RunningPrebuild, now: DateTime<Utc>) -> bool {
        self.invalidate_after.is_some_and(|ttl| {
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
    /// Workspaces to delete. Active preset: expired ones, then extraneous ones oldest first;
    /// inactive preset: every running prebuild.
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
    /// More live prebuilds than desired (an inactive preset desires none, so any running one).
    pub excess: bool,
    /// Inside its failure backoff: nothing is created until it ends.
    pub backing_off: bool,
    /// At least one running prebuild has outlived the preset's TTL.
    pub expired_present: bool,
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
        actions.cancel_jobs = preset.pending_initial_jobs.clone();
        actions.delete = preset.running.iter().map(|p| p.workspace_id).collect();
        conditions.excess = !preset.running.is_empty();
        conditions.expired_present = preset.running.iter().any(|p| preset.is_expired(p, now));
        return (actions, conditions);
    }

    let desired = desired_instances(preset, now).unwrap_or_else(|warning| {
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
            // Inactive: any running prebuild is in excess; no deficit.
            (preset().desired(3).ttl_minutes(60).inactive().running(&[(1, 90)]), c(false, true, false, true)),
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
        let state = preset().desired(3).ttl_minutes(60).inactive().running(&[(1, 90), (2, 10)]);
        let actions = calculate_actions(&state, now(), BACKOFF);
        assert_eq!(actions, Actions { delete: ids(&[1, 2]), ..Actions::default() });
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
