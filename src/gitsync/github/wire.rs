//! GitHub's wire format: the shapes of the JSON answers gitsync reads, and the pure derivations
//! from them (and from a response's status and headers) to what a row stores: the PR's state,
//! the review verdict, the checks verdict, the branch's PR, rate-limit waits and status classes.
//! No I/O: the client in [`super`] fetches and hands the answers to these.

use std::collections::HashMap;
use std::collections::hash_map::Entry;
use std::time::Duration;

use reqwest::header::HeaderMap;
use serde::Deserialize;

use crate::gitsync::provider::{ChecksState, PrNumber, PrState, PrStatus};
use crate::text;

/// GitHub: without `retry-after` or a reset time, wait at least a minute.
pub const DEFAULT_RATE_LIMIT_WAIT: Duration = Duration::from_secs(60);
/// GitHub's primary window is one hour; a longer wait means a bad header or a skewed clock.
pub const MAX_RATE_LIMIT_WAIT: Duration = Duration::from_secs(3600);
/// Longest provider error message kept in
/// [`ProviderError::Status`](crate::gitsync::ProviderError::Status) (it ends up in `last_error`).
const MAX_MESSAGE_CHARS: usize = 200;

// ---------------------------------------------------------------------------------------------
// Response shapes: only the fields gitsync stores; serde ignores the rest.

/// `GET /repos/{o}/{r}/pulls/{n}`.
#[derive(Debug, Clone, Deserialize)]
pub struct PullRequest {
    pub number: i64,
    pub html_url: String,
    pub state: WireState,
    pub title: String,
    /// Absent on old GitHub Enterprise versions, which had no drafts.
    #[serde(default)]
    pub draft: bool,
    #[serde(default)]
    pub merged: bool,
    pub additions: i64,
    pub deletions: i64,
    pub changed_files: i64,
    pub commits: i64,
    /// `null` when the author's account was deleted.
    pub user: Option<User>,
    pub head: GitRef,
    pub base: GitRef,
}

/// An item of `GET /repos/{o}/{r}/pulls`.
#[derive(Debug, Clone, Deserialize)]
pub struct PullSummary {
    pub number: i64,
    pub head: GitRef,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WireState {
    Open,
    Closed,
}

#[derive(Debug, Clone, Deserialize)]
pub struct GitRef {
    /// `owner:branch`.
    #[serde(default)]
    pub label: String,
    #[serde(rename = "ref")]
    pub name: String,
    pub sha: String,
}

#[derive(Debug, Clone, Deserialize)]
pub struct User {
    pub login: String,
}

/// An item of `GET /repos/{o}/{r}/pulls/{n}/reviews`.
#[derive(Debug, Clone, Deserialize)]
pub struct Review {
    pub id: i64,
    pub user: Option<User>,
    pub state: String,
}

/// `GET /repos/{o}/{r}/commits/{ref}/check-runs`.
#[derive(Debug, Clone, Deserialize)]
pub struct CheckRuns {
    pub check_runs: Vec<CheckRun>,
}

#[derive(Debug, Clone, Deserialize)]
pub struct CheckRun {
    pub status: String,
    pub conclusion: Option<String>,
}

#[derive(Deserialize)]
struct ErrorBody {
    message: String,
}

// ---------------------------------------------------------------------------------------------
// Pure derivations.

/// `merged: true` wins over `closed` (GitHub reports merged PRs as closed).
pub fn pr_state(state: WireState, merged: bool) -> PrState {
    match (state, merged) {
        (_, true) => PrState::Merged,
        (WireState::Open, false) => PrState::Open,
        (WireState::Closed, false) => PrState::Closed,
    }
}

/// The review fields of a PR.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ReviewSummary {
    pub approved: bool,
    pub changes_requested: bool,
    pub reviewer_count: i64,
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Verdict {
    Approved,
    ChangesRequested,
    Dismissed,
}

/// Only APPROVED, CHANGES_REQUESTED and DISMISSED reviews count (a COMMENTED or PENDING review
/// is no verdict). Per reviewer (login compared case-insensitively) the review with the highest
/// id is their latest, so a dismissal or a later approval replaces an earlier verdict.
/// `reviewer_count` counts those reviewers; `changes_requested` is any latest
/// CHANGES_REQUESTED; `approved` is any latest APPROVED and no changes requested. Reviews of
/// deleted accounts (`user: null`) are skipped: they cannot be told apart.
pub fn review_summary(reviews: &[Review]) -> ReviewSummary {
    let mut latest: HashMap<String, (i64, Verdict)> = HashMap::new();
    for review in reviews {
        let verdict = match review.state.to_ascii_uppercase().as_str() {
            "APPROVED" => Verdict::Approved,
            "CHANGES_REQUESTED" => Verdict::ChangesRequested,
            "DISMISSED" => Verdict::Dismissed,
            _ => continue,
        };
        let Some(user) = &review.user else { continue };
        match latest.entry(user.login.to_lowercase()) {
            Entry::Occupied(mut seen) => {
                if review.id > seen.get().0 {
                    seen.insert((review.id, verdict));
                }
            }
            Entry::Vacant(slot) => {
                slot.insert((review.id, verdict));
            }
        }
    }
    let changes_requested = latest.values().any(|(_, v)| *v == Verdict::ChangesRequested);
    let any_approval = latest.values().any(|(_, v)| *v == Verdict::Approved);
    ReviewSummary {
        approved: any_approval && !changes_requested,
        changes_requested,
        reviewer_count: i64::try_from(latest.len()).unwrap_or(i64::MAX),
    }
}

/// Conclusions that mean the checks did not pass.
const FAILURE_CONCLUSIONS: [&str; 5] =
    ["failure", "timed_out", "cancelled", "action_required", "startup_failure"];
/// Conclusions that do not hold a PR back.
const PASSING_CONCLUSIONS: [&str; 3] = ["success", "neutral", "skipped"];

/// The head commit's verdict: any failure-like conclusion (failure, timed_out, cancelled,
/// action_required, startup_failure) → failure, whatever else is running; else any run not
/// completed (queued, in_progress, waiting, requested, pending) → pending; else all
/// success/neutral/skipped → success; no runs → none. A completed run with another conclusion
/// (`stale`, which GitHub sets on runs left incomplete for 14 days, or one added later) gives
/// no verdict either way and counts as pending.
pub fn checks_state(runs: &[CheckRun]) -> ChecksState {
    if runs.is_empty() {
        return ChecksState::None;
    }
    let mut pending = false;
    for run in runs {
        let conclusion = run.conclusion.as_deref().unwrap_or_default();
        if FAILURE_CONCLUSIONS.contains(&conclusion) {
            return ChecksState::Failure;
        }
        if run.status != "completed" || !PASSING_CONCLUSIONS.contains(&conclusion) {
            pending = true;
        }
    }
    if pending { ChecksState::Pending } else { ChecksState::Success }
}

/// The PR of `owner:branch` among a `pulls?head=…` answer. The head is checked again because
/// GitHub ignores a `head` filter it cannot parse and then lists every open PR.
pub fn pull_request_for_branch(items: &[PullSummary], owner: &str, branch: &str) -> Option<PrNumber> {
    items
        .iter()
        .find(|pr| {
            let same_owner = match pr.head.label.split_once(':') {
                Some((label_owner, _)) => label_owner.eq_ignore_ascii_case(owner),
                None => true,
            };
            pr.head.name == branch && same_owner
        })
        .map(|pr| PrNumber(pr.number))
}

/// All stored fields from a PR, its reviews and its head commit's check runs. Text is made
/// [`storable`](text::storable): a NUL in a title must not keep the status from being written.
pub fn derive_status(pr: &PullRequest, reviews: &[Review], check_runs: &[CheckRun]) -> PrStatus {
    let review = review_summary(reviews);
    let store = |s: &String| text::storable(s.clone());
    PrStatus {
        pr_number: PrNumber(pr.number),
        url: store(&pr.html_url),
        state: pr_state(pr.state, pr.merged),
        title: store(&pr.title),
        draft: pr.draft,
        additions: pr.additions,
        deletions: pr.deletions,
        changed_files: pr.changed_files,
        commits: pr.commits,
        approved: review.approved,
        changes_requested: review.changes_requested,
        reviewer_count: review.reviewer_count,
        checks_state: checks_state(check_runs),
        author_login: pr.user.as_ref().map(|u| store(&u.login)).unwrap_or_default(),
        base_branch: store(&pr.base.name),
        head_branch: store(&pr.head.name),
        head_sha: store(&pr.head.sha),
    }
}

/// How long to wait when a response is a rate limit, `None` when it is not one. As GitHub
/// documents it, only 403 and 429 can be rate limits:
///
/// 1. an integer `retry-after` > 0 (secondary limit) → that many seconds;
/// 2. `x-ratelimit-remaining: 0` (primary limit) → until `x-ratelimit-reset` (Unix seconds), or
///    60 s if the reset is missing or not in the future;
/// 3. a 429 otherwise → 60 s (the status alone says "too many requests");
/// 4. a 403 otherwise → `None`: an ordinary error such as "Resource not accessible by
///    integration". GitHub sends `x-ratelimit-reset` on *every* response, so a reset time
///    without `remaining: 0` says nothing about this answer.
///
/// Waits are capped at [`MAX_RATE_LIMIT_WAIT`].
pub fn rate_limit_wait(status: u16, headers: &HeaderMap, now_epoch_secs: u64) -> Option<Duration> {
    if status != 403 && status != 429 {
        return None;
    }
    let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
    let wait = if let Some(secs) = number("retry-after").filter(|secs| *secs > 0) {
        Duration::from_secs(secs)
    } else if number("x-ratelimit-remaining") == Some(0) {
        match number("x-ratelimit-reset") {
            Some(reset) if reset > now_epoch_secs => Duration::from_secs(reset - now_epoch_secs),
            _ => DEFAULT_RATE_LIMIT_WAIT,
        }
    } else if status == 429 {
        DEFAULT_RATE_LIMIT_WAIT
    } else {
        return None;
    };
    Some(wait.min(MAX_RATE_LIMIT_WAIT))
}

/// A 403 whose message says it is a secondary rate limit but that carries none of the headers
/// [`rate_limit_wait`] reads; GitHub: "otherwise, wait for at least one minute".
pub fn is_secondary_rate_limit_message(message: &str) -> bool {
    message.to_ascii_lowercase().contains("secondary rate limit")
}

/// GitHub's `{"message": …}`, shortened; empty when the body is not that.
pub fn error_message(body: &[u8]) -> String {
    match serde_json::from_slice::<ErrorBody>(body) {
        Ok(error) => error.message.chars().take(MAX_MESSAGE_CHARS).collect(),
        Err(_) => String::new(),
    }
}

// ---------------------------------------------------------------------------------------------
// HTTP status classes, for a metrics layer.

/// What became of a request: the class of its status, or `Error` when no response came
/// (connection failure, timeout).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StatusClass {
    Success,
    Redirection,
    ClientError,
    ServerError,
    Error,
}

impl StatusClass {
    pub const ALL: [StatusClass; 5] = [
        StatusClass::Success,
        StatusClass::Redirection,
        StatusClass::ClientError,
        StatusClass::ServerError,
        StatusClass::Error,
    ];

    pub fn of(status: u16) -> Self {
        match status {
            200..=299 => StatusClass::Success,
            300..=399 => StatusClass::Redirection,
            400..=499 => StatusClass::ClientError,
            500..=599 => StatusClass::ServerError,
            _ => StatusClass::Error,
        }
    }

    /// Metric label: `2xx`, `3xx`, `4xx`, `5xx` or `error`.
    pub fn label(self) -> &'static str {
        match self {
            StatusClass::Success => "2xx",
            StatusClass::Redirection => "3xx",
            StatusClass::ClientError => "4xx",
            StatusClass::ServerError => "5xx",
            StatusClass::Error => "error",
        }
    }
}

#[cfg(test)]
mod tests {
    use reqwest::header::{HeaderName, HeaderValue};
    use serde::de::DeserializeOwned;

    use super::*;

    fn fixture(name: &str) -> String {
        let path = format!("{}/tests/fixtures/github/{name}", env!("CARGO_MANIFEST_DIR"));
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read fixture {path}: {e}"))
    }

    fn parse<T: DeserializeOwned>(name: &str) -> T {
        serde_json::from_str(&fixture(name)).unwrap_or_else(|e| panic!("fixture {name}: {e}"))
    }

    fn review(id: i64, login: &str, state: &str) -> Review {
        Review { id, user: Some(User { login: login.into() }), state: state.into() }
    }

    fn run(status: &str, conclusion: Option<&str>) -> CheckRun {
        CheckRun { status: status.into(), conclusion: conclusion.map(Into::into) }
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut map = HeaderMap::new();
        for (name, value) in pairs {
            map.insert(HeaderName::from_static(name), HeaderValue::from_str(value).expect("header value"));
        }
        map
    }

    #[test]
    fn the_pull_request_fixture_derives_every_field() {
        let pr: PullRequest = parse("pull-request.json");
        let reviews: Vec<Review> = parse("pull-request-review-items.json");
        let checks: CheckRuns = parse("check-run-paginated.json");
        let status = derive_status(&pr, &reviews, &checks.check_runs);
        assert_eq!(
            status,
            PrStatus {
                pr_number: PrNumber(1347),
                url: "https://github.com/octocat/Hello-World/pull/1347".into(),
                // The fixture has a `merged_at` but `merged: false`: `merged` is what counts.
                state: PrState::Open,
                title: "Amazing new feature".into(),
                draft: false,
                additions: 100,
                deletions: 3,
                changed_files: 5,
                commits: 3,
                approved: true,
                changes_requested: false,
                reviewer_count: 1,
                // One completed run concluding `neutral`.
                checks_state: ChecksState::Success,
                author_login: "octocat".into(),
                base_branch: "master".into(),
                head_branch: "new-topic".into(),
                head_sha: "6dcb09b5b57875f334f61aebed695e2e4193db5e".into(),
            }
        );
    }

    #[test]
    fn merged_wins_over_closed() {
        let mut pr: PullRequest = parse("pull-request.json");
        pr.state = WireState::Closed;
        assert_eq!(derive_status(&pr, &[], &[]).state, PrState::Closed);
        pr.merged = true;
        assert_eq!(derive_status(&pr, &[], &[]).state, PrState::Merged);
        assert_eq!(pr_state(WireState::Open, true), PrState::Merged);
        assert_eq!(pr_state(WireState::Open, false), PrState::Open);
    }

    #[test]
    fn a_deleted_author_and_a_draft_are_carried_over() {
        let mut value: serde_json::Value = serde_json::from_str(&fixture("pull-request.json")).expect("json");
        value["user"] = serde_json::Value::Null;
        value["draft"] = true.into();
        let pr: PullRequest = serde_json::from_value(value).expect("shape");
        let status = derive_status(&pr, &[], &[]);
        assert_eq!((status.author_login.as_str(), status.draft), ("", true));
        assert_eq!(status.checks_state, ChecksState::None);
        assert_eq!((status.approved, status.changes_requested, status.reviewer_count), (false, false, 0));
    }

    #[test]
    fn the_simple_items_fixture_yields_the_branch_pr() {
        let items: Vec<PullSummary> = parse("pull-request-simple-items.json");
        assert_eq!(pull_request_for_branch(&items, "octocat", "new-topic"), Some(PrNumber(1347)));
        assert_eq!(pull_request_for_branch(&items, "OctoCat", "new-topic"), Some(PrNumber(1347)));
        // GitHub lists every open PR when it ignores the head filter: another branch is no match.
        assert_eq!(pull_request_for_branch(&items, "octocat", "other"), None);
        assert_eq!(pull_request_for_branch(&items, "someone-else", "new-topic"), None);
        assert_eq!(pull_request_for_branch(&[], "octocat", "new-topic"), None);
    }

    #[test]
    fn the_review_fixture_is_one_approving_reviewer() {
        let reviews: Vec<Review> = parse("pull-request-review-items.json");
        assert_eq!(
            review_summary(&reviews),
            ReviewSummary { approved: true, changes_requested: false, reviewer_count: 1 }
        );
    }

    #[test]
    fn each_reviewers_latest_verdict_counts() {
        let cases: [(&str, Vec<Review>, ReviewSummary); 8] = [
            ("no reviews", vec![], ReviewSummary::default()),
            (
                "comments are no verdict",
                vec![review(1, "a", "COMMENTED"), review(2, "b", "PENDING")],
                ReviewSummary::default(),
            ),
            (
                "a later approval replaces a change request",
                vec![review(1, "a", "CHANGES_REQUESTED"), review(2, "a", "APPROVED")],
                ReviewSummary { approved: true, changes_requested: false, reviewer_count: 1 },
            ),
            (
                "the highest id wins, not the order listed",
                vec![review(5, "a", "CHANGES_REQUESTED"), review(2, "a", "APPROVED")],
                ReviewSummary { approved: false, changes_requested: true, reviewer_count: 1 },
            ),
            (
                "one change request blocks another's approval",
                vec![review(1, "a", "APPROVED"), review(2, "b", "CHANGES_REQUESTED")],
                ReviewSummary { approved: false, changes_requested: true, reviewer_count: 2 },
            ),
            (
                "a dismissal counts as a reviewer but is no verdict",
                vec![review(1, "a", "APPROVED"), review(3, "a", "DISMISSED"), review(2, "b", "DISMISSED")],
                ReviewSummary { approved: false, changes_requested: false, reviewer_count: 2 },
            ),
            (
                "logins compare case-insensitively",
                vec![review(1, "Alice", "CHANGES_REQUESTED"), review(2, "alice", "APPROVED")],
                ReviewSummary { approved: true, changes_requested: false, reviewer_count: 1 },
            ),
            (
                "a later comment does not replace a verdict",
                vec![review(1, "a", "APPROVED"), review(2, "a", "COMMENTED")],
                ReviewSummary { approved: true, changes_requested: false, reviewer_count: 1 },
            ),
        ];
        for (name, reviews, want) in cases {
            assert_eq!(review_summary(&reviews), want, "{name}");
        }
        let ghost = Review { id: 1, user: None, state: "APPROVED".into() };
        assert_eq!(review_summary(&[ghost]), ReviewSummary::default(), "deleted accounts are skipped");
    }

    #[test]
    fn the_check_run_fixture_is_success() {
        let checks: CheckRuns = parse("check-run-paginated.json");
        assert_eq!(checks_state(&checks.check_runs), ChecksState::Success);
    }

    #[test]
    fn checks_state_maps_conclusions() {
        let done = |c| run("completed", Some(c));
        let cases: [(&str, Vec<CheckRun>, ChecksState); 11] = [
            ("none", vec![], ChecksState::None),
            ("all pass", vec![done("success"), done("neutral"), done("skipped")], ChecksState::Success),
            ("failure", vec![done("success"), done("failure")], ChecksState::Failure),
            ("timed out", vec![done("timed_out")], ChecksState::Failure),
            ("cancelled", vec![done("cancelled")], ChecksState::Failure),
            ("action required", vec![done("action_required")], ChecksState::Failure),
            ("startup failure", vec![done("startup_failure")], ChecksState::Failure),
            (
                "failure wins over running",
                vec![run("in_progress", None), done("failure")],
                ChecksState::Failure,
            ),
            ("running", vec![done("success"), run("in_progress", None)], ChecksState::Pending),
            ("queued", vec![run("queued", None)], ChecksState::Pending),
            ("stale is no verdict", vec![done("success"), done("stale")], ChecksState::Pending),
        ];
        for (name, runs, want) in cases {
            assert_eq!(checks_state(&runs), want, "{name}");
        }
    }

    #[test]
    fn rate_limits_are_told_from_ordinary_errors() {
        let now = 1_700_000_000;
        let reset = (now + 90).to_string();
        let cases: [(&str, u16, HeaderMap, Option<u64>); 11] = [
            ("retry-after on 429", 429, headers(&[("retry-after", "30")]), Some(30)),
            ("retry-after on 403", 403, headers(&[("retry-after", "7")]), Some(7)),
            (
                "retry-after comes before the reset",
                403,
                headers(&[
                    ("retry-after", "5"),
                    ("x-ratelimit-remaining", "0"),
                    ("x-ratelimit-reset", &reset),
                ]),
                Some(5),
            ),
            (
                "primary limit waits until the reset",
                403,
                headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", &reset)]),
                Some(90),
            ),
            ("remaining 0 without a reset", 403, headers(&[("x-ratelimit-remaining", "0")]), Some(60)),
            (
                "a reset in the past",
                429,
                headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1")]),
                Some(60),
            ),
            ("a bare 429", 429, HeaderMap::new(), Some(60)),
            ("a bare 403 is no rate limit", 403, HeaderMap::new(), None),
            (
                "a 403 with quota left is no rate limit",
                403,
                headers(&[("x-ratelimit-remaining", "4999"), ("x-ratelimit-reset", &reset)]),
                None,
            ),
            ("other statuses never are", 500, headers(&[("retry-after", "30")]), None),
            (
                "a year away is capped",
                429,
                headers(&[("retry-after", "31536000")]),
                Some(MAX_RATE_LIMIT_WAIT.as_secs()),
            ),
        ];
        for (name, status, headers, want) in cases {
            assert_eq!(rate_limit_wait(status, &headers, now), want.map(Duration::from_secs), "{name}");
        }
    }

    #[test]
    fn the_rate_limit_fixture_headers_mean_a_limit_only_when_exhausted() {
        // GitHub's `x-ratelimit-*` headers carry the fixture's `rate` on every response.
        let overview: serde_json::Value = parse("rate-limit-overview.json");
        let rate = &overview["rate"];
        let reset = rate["reset"].as_u64().expect("reset");
        let remaining = rate["remaining"].as_u64().expect("remaining").to_string();
        let now = reset - 100;
        let with_quota =
            headers(&[("x-ratelimit-remaining", &remaining), ("x-ratelimit-reset", &reset.to_string())]);
        assert_eq!(rate_limit_wait(403, &with_quota, now), None);
        let exhausted = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", &reset.to_string())]);
        assert_eq!(rate_limit_wait(403, &exhausted, now), Some(Duration::from_secs(100)));
    }

    #[test]
    fn secondary_rate_limit_messages_are_recognised() {
        assert!(is_secondary_rate_limit_message("You have exceeded a secondary rate limit. Please wait."));
        assert!(!is_secondary_rate_limit_message("Resource not accessible by integration"));
    }

    #[test]
    fn status_classes_have_fixed_labels() {
        let labels: Vec<_> = StatusClass::ALL.iter().map(|c| c.label()).collect();
        assert_eq!(labels, ["2xx", "3xx", "4xx", "5xx", "error"]);
        assert_eq!(StatusClass::of(304), StatusClass::Redirection);
        assert_eq!(StatusClass::of(99), StatusClass::Error);
    }
}
