//! What one row's refresh writes back: pure, no I/O, no clock (`now` is the database's time in
//! the write's own transaction, the `now()` the write then adds the delay to), so every rule
//! below is a table test.
//!
//! Rules (`docs/gitsync.md`), and why:
//!
//! - A PR found: every field is stored, `last_error` cleared, and the row is due again one `ttl`
//!   later. The outcome is `not_modified` when the row already showed exactly these fields with
//!   no error since (what an ETag revalidation answered with `304` comes to), else `ok`.
//! - No open PR for the branch: every PR field is cleared, so no stale PR stays shown.
//!   `updated_at` is when the row was last *marked*; the no-PR backoff is short only while that
//!   is recent (a PR usually follows a push), else the row waits a full `ttl`.
//! - No usable token (none linked, expired, or no provider serves the origin's host):
//!   `no_token`, asked about again after `no_token_backoff`.
//! - A rate limit, the row's own or its group's: `rate_limited`, due once the provider's wait and
//!   [`RATE_LIMIT_PADDING`] have passed.
//! - Anything else, transient or not (a provider error, an answer that is not the expected
//!   JSON, an origin that names no repository, a token that cannot be decrypted, an answer the
//!   database refused): `error`, retried after `ttl`.
//!
//! An outcome that is not a status leaves the PR fields as they are and records why in
//! `last_error`, clipped to [`MAX_ERROR_LEN`].

use std::time::Duration;

use chrono::{DateTime, Utc};

use super::config::GitsyncConfig;
use super::provider::{PrStatus, ProviderError};
use crate::text;

/// Added to a provider's rate-limit wait before a skipped row is due again
/// (`docs/gitsync.md`, "Rate limits").
pub const RATE_LIMIT_PADDING: Duration = Duration::from_secs(300);
/// Longest `last_error` stored, in bytes.
pub const MAX_ERROR_LEN: usize = 500;

/// What a row's refresh came to (`chat_diff_statuses.last_outcome`, `gitsync.refreshes{outcome}`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum RefreshOutcome {
    Ok,
    /// Refreshed, and nothing changed.
    NotModified,
    NoPr,
    NoToken,
    RateLimited,
    Error,
}

impl RefreshOutcome {
    pub const ALL: [RefreshOutcome; 6] = [
        RefreshOutcome::Ok,
        RefreshOutcome::NotModified,
        RefreshOutcome::NoPr,
        RefreshOutcome::NoToken,
        RefreshOutcome::RateLimited,
        RefreshOutcome::Error,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            RefreshOutcome::Ok => "ok",
            RefreshOutcome::NotModified => "not_modified",
            RefreshOutcome::NoPr => "no_pr",
            RefreshOutcome::NoToken => "no_token",
            RefreshOutcome::RateLimited => "rate_limited",
            RefreshOutcome::Error => "error",
        }
    }
}

/// What a row's refresh found, before it is written.
#[derive(Debug, Clone)]
pub enum Found {
    Status(Box<PrStatus>),
    /// The branch has no open PR.
    NoPr,
    /// No token can be sent; no call was made.
    NoToken(String),
    /// The provider asked to wait, on this row's call or on an earlier one of its group.
    RateLimited {
        wait: Duration,
        error: String,
    },
    Failed(String),
}

impl Found {
    /// What the provider's answer about a row comes to.
    pub fn from_answer(answer: Result<Option<PrStatus>, ProviderError>) -> Self {
        match answer {
            Ok(Some(status)) => Found::Status(Box::new(status)),
            Ok(None) => Found::NoPr,
            Err(ProviderError::RateLimited { url, wait }) => {
                let error = ProviderError::RateLimited { url, wait }.to_string();
                Found::RateLimited { wait, error }
            }
            Err(error) => Found::Failed(error.to_string()),
        }
    }
}

/// What a leased row holds when its answer is written: read under the row's lock and fenced on
/// its lease, so nothing changes it before the write.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stored {
    /// The PR fields, when every one is set (`None` before a first PR and after a `no_pr`).
    pub status: Option<PrStatus>,
    /// A `last_error` is recorded.
    pub has_error: bool,
    /// When the row was last marked (`updated_at`).
    pub marked_at: DateTime<Utc>,
}

/// What to write to one row.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RowOutcome {
    /// `last_outcome`, and the `outcome` label of `gitsync.refreshes`.
    pub outcome: RefreshOutcome,
    pub fields: Fields,
    /// The row is due again this long after `now` (`stale_at`).
    pub due_in: Duration,
}

/// What becomes of the row's PR fields and `last_error`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Fields {
    /// Every PR field from the status, `last_error` cleared, `refreshed_at` now.
    Status(Box<PrStatus>),
    /// Every PR field and `last_error` cleared, `refreshed_at` now.
    Cleared,
    /// The PR fields and `refreshed_at` left as they are; `last_error` is this (clipped).
    Kept { error: String },
}

/// What to write for a row whose refresh found `found`, given what the row holds and the
/// database's `now`.
pub fn decide(found: Found, row: &Stored, config: &GitsyncConfig, now: DateTime<Utc>) -> RowOutcome {
    let kept = |outcome, error: String, due_in| RowOutcome {
        outcome,
        fields: Fields::Kept { error: text::clip(error, MAX_ERROR_LEN) },
        due_in,
    };
    match found {
        Found::Status(status) => {
            let unchanged = !row.has_error && row.status.as_ref() == Some(&*status);
            let outcome = if unchanged { RefreshOutcome::NotModified } else { RefreshOutcome::Ok };
            RowOutcome { outcome, fields: Fields::Status(status), due_in: config.ttl }
        }
        Found::NoPr => {
            // A mark in the future (clock skew between writers) counts as recent.
            let recently_marked = !matches!((now - row.marked_at).to_std(), Ok(age) if age >= config.ttl);
            let due_in = if recently_marked { config.no_pr_backoff } else { config.ttl };
            RowOutcome { outcome: RefreshOutcome::NoPr, fields: Fields::Cleared, due_in }
        }
        Found::NoToken(error) => kept(RefreshOutcome::NoToken, error, config.no_token_backoff),
        Found::RateLimited { wait, error } => {
            kept(RefreshOutcome::RateLimited, error, wait + RATE_LIMIT_PADDING)
        }
        Found::Failed(error) => kept(RefreshOutcome::Error, error, config.ttl),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gitsync::provider::{ChecksState, PrNumber, PrState};

    const URL: &str = "https://api.github.com/repos/o/r/pulls/7";

    fn now() -> DateTime<Utc> {
        DateTime::from_timestamp(1_700_000_000, 0).expect("a valid instant")
    }

    fn config() -> GitsyncConfig {
        GitsyncConfig {
            ttl: Duration::from_secs(120),
            no_token_backoff: Duration::from_secs(600),
            no_pr_backoff: Duration::from_secs(15),
            ..GitsyncConfig::default()
        }
    }

    fn pr() -> PrStatus {
        PrStatus {
            pr_number: PrNumber(7),
            url: "https://github.com/o/r/pull/7".into(),
            state: PrState::Open,
            title: "Add a thing".into(),
            draft: false,
            additions: 10,
            deletions: 2,
            changed_files: 3,
            commits: 1,
            approved: false,
            changes_requested: false,
            reviewer_count: 0,
            checks_state: ChecksState::Pending,
            author_login: "octocat".into(),
            base_branch: "main".into(),
            head_branch: "feat".into(),
            head_sha: "6dcb09b5b57875f334f61aebed695e2e4193db5e".into(),
        }
    }

    fn approved_and_green() -> PrStatus {
        PrStatus { approved: true, reviewer_count: 1, checks_state: ChecksState::Success, ..pr() }
    }

    /// A row marked an hour ago that shows no PR and no error.
    fn row() -> Stored {
        Stored { status: None, has_error: false, marked_at: now() - chrono::TimeDelta::hours(1) }
    }

    impl Stored {
        fn showing(mut self, status: PrStatus) -> Self {
            self.status = Some(status);
            self
        }

        fn with_error(mut self) -> Self {
            self.has_error = true;
            self
        }

        fn marked_secs_ago(mut self, secs: i64) -> Self {
            self.marked_at = now() - chrono::TimeDelta::seconds(secs);
            self
        }
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    fn status(outcome: RefreshOutcome, status: PrStatus) -> RowOutcome {
        RowOutcome { outcome, fields: Fields::Status(Box::new(status)), due_in: secs(120) }
    }

    fn kept(outcome: RefreshOutcome, error: &str, due_in: Duration) -> RowOutcome {
        RowOutcome { outcome, fields: Fields::Kept { error: error.into() }, due_in }
    }

    fn answer(answer: Result<Option<PrStatus>, ProviderError>) -> Found {
        Found::from_answer(answer)
    }

    #[test]
    fn each_answer_decides_the_outcome_the_fields_and_when_the_row_is_due_again() {
        use RefreshOutcome::{Error, NoPr, NoToken, NotModified, RateLimited};
        let cases: Vec<(&str, Found, Stored, RowOutcome)> = vec![
            ("a first PR found is stored", answer(Ok(Some(pr()))), row(), status(RefreshOutcome::Ok, pr())),
            (
                "a PR whose fields changed is stored",
                answer(Ok(Some(approved_and_green()))),
                row().showing(pr()),
                status(RefreshOutcome::Ok, approved_and_green()),
            ),
            (
                "the same PR again (a 304 revalidation) is not modified",
                answer(Ok(Some(pr()))),
                row().showing(pr()),
                status(NotModified, pr()),
            ),
            (
                "the same PR after an error is ok again: the error is cleared",
                answer(Ok(Some(pr()))),
                row().showing(pr()).with_error(),
                status(RefreshOutcome::Ok, pr()),
            ),
            (
                "no PR for a recently marked branch is looked for again soon",
                answer(Ok(None)),
                row().marked_secs_ago(119),
                RowOutcome { outcome: NoPr, fields: Fields::Cleared, due_in: secs(15) },
            ),
            (
                "no PR for a branch marked a ttl ago or more waits a ttl",
                answer(Ok(None)),
                row().showing(pr()).marked_secs_ago(120),
                RowOutcome { outcome: NoPr, fields: Fields::Cleared, due_in: secs(120) },
            ),
            (
                "no PR for a branch marked in the future counts as recently marked",
                answer(Ok(None)),
                row().marked_secs_ago(-5),
                RowOutcome { outcome: NoPr, fields: Fields::Cleared, due_in: secs(15) },
            ),
            (
                "a rate limit waits the provider's wait plus the padding",
                answer(Err(ProviderError::RateLimited { url: URL.into(), wait: secs(90) })),
                row().showing(pr()),
                kept(RateLimited, &format!("rate limited by {URL}: retry in 90s"), secs(390)),
            ),
            (
                "a row skipped after its group's rate limit waits likewise",
                Found::RateLimited { wait: secs(60), error: "rate limited by x: retry in 60s".into() },
                row(),
                kept(RateLimited, "rate limited by x: retry in 60s", secs(360)),
            ),
            (
                "no token backs off the no-token backoff",
                Found::NoToken("the chat's owner has no usable token for provider \"github\"".into()),
                row(),
                kept(NoToken, "the chat's owner has no usable token for provider \"github\"", secs(600)),
            ),
            (
                "a transient provider error is retried after a ttl",
                answer(Err(ProviderError::Timeout { url: URL.into(), timeout: secs(10) })),
                row().showing(pr()),
                kept(Error, &format!("request to {URL} timed out after 10000ms"), secs(120)),
            ),
            (
                "a provider's refusal is retried after a ttl",
                answer(Err(ProviderError::Status {
                    url: URL.into(),
                    status: 404,
                    message: "Not Found".into(),
                })),
                row(),
                kept(Error, &format!("{URL} answered HTTP 404: Not Found"), secs(120)),
            ),
            (
                "a bad answer is the row's error",
                answer(Err(ProviderError::Body { url: URL.into(), problem: "expected value".into() })),
                row(),
                kept(Error, &format!("{URL} answered with an unreadable body: expected value"), secs(120)),
            ),
            (
                "an origin that names no repository is the row's error",
                Found::Failed("git remote origin \"x\" is not a repository url".into()),
                row(),
                kept(Error, "git remote origin \"x\" is not a repository url", secs(120)),
            ),
        ];
        for (name, found, stored, want) in cases {
            assert_eq!(decide(found, &stored, &config(), now()), want, "{name}");
        }
    }

    #[test]
    fn a_long_error_is_clipped_to_what_the_column_keeps() {
        let decided = decide(Found::Failed("é".repeat(MAX_ERROR_LEN)), &row(), &config(), now());
        let Fields::Kept { error } = decided.fields else { panic!("expected an error, got {decided:?}") };
        assert_eq!(error, "é".repeat(MAX_ERROR_LEN / 2), "cut to the byte bound on a character boundary");
    }

    #[test]
    fn a_rate_limit_keeps_its_wait_and_names_the_url() {
        let err = ProviderError::RateLimited {
            url: "https://api.github.com/x".into(),
            wait: Duration::from_secs(7),
        };
        match Found::from_answer(Err(err)) {
            Found::RateLimited { wait, error } => {
                assert_eq!(wait, Duration::from_secs(7));
                assert!(error.contains("https://api.github.com/x"), "{error}");
            }
            other => panic!("expected a rate limit, got {other:?}"),
        }
    }
}
