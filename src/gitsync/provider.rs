//! Git hosting providers: their configuration (`[[gitsync.providers]]`), which one serves an
//! origin, the [`Provider`] trait the refresher calls, and what it answers.
//!
//! A token is only ever sent to the provider whose `origin_host` matches the origin's host
//! (`docs/gitsync.md`): [`provider_for`] is the one place that decides the match, and `id` is the
//! `external_auth_links.provider_id` whose tokens belong to that provider.

use std::fmt;
use std::future::Future;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::origin::Origin;

/// The API dialect of a provider. Only GitHub (github.com and GitHub Enterprise Server) today.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ProviderKind {
    Github,
}

/// One `[[gitsync.providers]]` entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProviderConfig {
    /// `external_auth_links.provider_id` of the tokens for this provider.
    pub id: String,
    pub kind: ProviderKind,
    /// REST API root, e.g. `https://api.github.com` or `https://ghe.example.com/api/v3`.
    pub api_base_url: String,
    /// Host name of the origins this provider serves, e.g. `github.com` (no scheme, no port).
    pub origin_host: String,
    /// With `app.env = production`, accept an `http://` `api_base_url` (tokens in plaintext),
    /// with a warning, instead of refusing it (a local fake in tests, a proxy on the same host).
    #[serde(default)]
    pub allow_insecure_http: bool,
}

/// A provider entry with a bad field; names the entry and the field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("gitsync provider {id:?}: `{field}` {problem}")]
pub struct ProviderConfigError {
    pub id: String,
    pub field: &'static str,
    pub problem: String,
}

impl ProviderConfig {
    /// github.com, whose tokens are linked under provider id `github`.
    pub fn github_default() -> Self {
        ProviderConfig {
            id: "github".into(),
            kind: ProviderKind::Github,
            api_base_url: "https://api.github.com".into(),
            origin_host: "github.com".into(),
            allow_insecure_http: false,
        }
    }

    pub fn validate(&self) -> Result<(), ProviderConfigError> {
        let fail = |field, problem: &str| ProviderConfigError {
            id: self.id.clone(),
            field,
            problem: problem.to_owned(),
        };
        if self.id.trim().is_empty() {
            return Err(fail("id", "is empty"));
        }
        let url = url::Url::parse(&self.api_base_url)
            .map_err(|e| fail("api_base_url", &format!("is not a url ({e})")))?;
        if !matches!(url.scheme(), "https" | "http") {
            return Err(fail("api_base_url", "must be an http(s) url"));
        }
        if url.cannot_be_a_base() || url.host_str().is_none() {
            return Err(fail("api_base_url", "has no host"));
        }
        // It is named in every provider error (and so in logs and `last_error`): the token goes
        // in a header, never in the URL.
        if !url.username().is_empty() || url.password().is_some() {
            return Err(fail(
                "api_base_url",
                "must not hold credentials (user-info): tokens come from external_auth_links",
            ));
        }
        // Anything after the path is a query or a fragment.
        if !url[url::Position::AfterPath..].is_empty() {
            return Err(fail("api_base_url", "must not have a query or fragment"));
        }
        let host = &self.origin_host;
        if host.is_empty() {
            return Err(fail("origin_host", "is empty"));
        }
        if host.contains("://") || host.contains(['/', ':', '@']) || host.chars().any(char::is_whitespace) {
            return Err(fail(
                "origin_host",
                "must be a bare host name such as github.com (no scheme, port or path)",
            ));
        }
        Ok(())
    }
}

/// Validates every entry, then rejects duplicate ids and hosts: two providers for one host
/// would make the choice of token ambiguous.
pub fn validate_providers(providers: &[ProviderConfig]) -> Result<(), ProviderConfigError> {
    for (i, provider) in providers.iter().enumerate() {
        provider.validate()?;
        let earlier = &providers[..i];
        if earlier.iter().any(|p| p.id == provider.id) {
            return Err(ProviderConfigError {
                id: provider.id.clone(),
                field: "id",
                problem: "is used by another provider".into(),
            });
        }
        if let Some(other) =
            earlier.iter().find(|p| p.origin_host.eq_ignore_ascii_case(&provider.origin_host))
        {
            return Err(ProviderConfigError {
                id: provider.id.clone(),
                field: "origin_host",
                problem: format!("{:?} is already served by provider {:?}", provider.origin_host, other.id),
            });
        }
    }
    Ok(())
}

/// The provider serving `origin`'s host (compared case-insensitively), if any.
pub fn provider_for<'a>(providers: &'a [ProviderConfig], origin: &Origin) -> Option<&'a ProviderConfig> {
    providers.iter().find(|p| p.origin_host.eq_ignore_ascii_case(&origin.host))
}

/// A pull-request number. `i64` because it is stored in a Postgres integer column.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct PrNumber(pub i64);

impl fmt::Display for PrNumber {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

/// `pull_request_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PrState {
    Open,
    Closed,
    /// Merged PRs are also `closed` on GitHub; `merged` wins.
    Merged,
}

impl PrState {
    pub const ALL: [PrState; 3] = [PrState::Open, PrState::Closed, PrState::Merged];

    pub fn as_str(self) -> &'static str {
        match self {
            PrState::Open => "open",
            PrState::Closed => "closed",
            PrState::Merged => "merged",
        }
    }

    /// The state a stored `pull_request_state` names; `None` for any other text.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// `checks_state`: the verdict of the head commit's checks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChecksState {
    Success,
    Failure,
    Pending,
    /// No checks ran on the head commit.
    None,
}

impl ChecksState {
    pub const ALL: [ChecksState; 4] =
        [ChecksState::Success, ChecksState::Failure, ChecksState::Pending, ChecksState::None];

    pub fn as_str(self) -> &'static str {
        match self {
            ChecksState::Success => "success",
            ChecksState::Failure => "failure",
            ChecksState::Pending => "pending",
            ChecksState::None => "none",
        }
    }

    /// The verdict a stored `checks_state` names; `None` for any other text.
    pub fn parse(s: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|state| state.as_str() == s)
    }
}

/// Everything `chat_diff_statuses` stores about a pull request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PrStatus {
    pub pr_number: PrNumber,
    /// The PR's web page.
    pub url: String,
    pub state: PrState,
    pub title: String,
    pub draft: bool,
    pub additions: i64,
    pub deletions: i64,
    pub changed_files: i64,
    pub commits: i64,
    /// Some reviewer's latest verdict approves and none requests changes.
    pub approved: bool,
    /// Some reviewer's latest verdict requests changes.
    pub changes_requested: bool,
    /// Reviewers with an approving, change-requesting or dismissed review.
    pub reviewer_count: i64,
    pub checks_state: ChecksState,
    pub author_login: String,
    pub base_branch: String,
    pub head_branch: String,
    pub head_sha: String,
}

/// A provider call that failed. Every variant names the URL it was about; none holds the token.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The provider asked us to wait (`docs/gitsync.md`: the group's remaining rows are skipped).
    #[error("rate limited by {url}: retry in {}s", wait.as_secs())]
    RateLimited { url: String, wait: Duration },
    /// A non-success answer that is not a rate limit. `message` is the provider's own
    /// explanation (GitHub's error `message`), empty when it sent none.
    #[error("{url} answered HTTP {status}{}{message}", if message.is_empty() { "" } else { ": " })]
    Status { url: String, status: u16, message: String },
    /// Not JSON, cut short, or not the shape expected (`problem` is serde's explanation).
    #[error("{url} answered with an unreadable body: {problem}")]
    Body { url: String, problem: String },
    #[error("{url} answered with a body over the {limit}-byte limit")]
    BodyTooLarge { url: String, limit: usize },
    #[error("request to {url} timed out after {}ms", timeout.as_millis())]
    Timeout { url: String, timeout: Duration },
    #[error("request to {url} failed: {source}")]
    Transport {
        url: String,
        #[source]
        source: reqwest::Error,
    },
}

impl ProviderError {
    /// A fixed label per variant, for metrics (never built from the message: bounded cardinality).
    pub fn metric_label(&self) -> &'static str {
        match self {
            ProviderError::RateLimited { .. } => "rate_limited",
            ProviderError::Status { .. } => "http_status",
            ProviderError::Body { .. } => "bad_body",
            ProviderError::BodyTooLarge { .. } => "body_too_large",
            ProviderError::Timeout { .. } => "timeout",
            ProviderError::Transport { .. } => "transport",
        }
    }

    /// Whether the same call may succeed later without anything changing on our side: rate
    /// limits, timeouts, connection failures and server-side errors (5xx, 408, 429). A 4xx,
    /// an oversized or malformed body are answers about the request or the data and repeat.
    pub fn is_transient(&self) -> bool {
        match self {
            ProviderError::RateLimited { .. }
            | ProviderError::Timeout { .. }
            | ProviderError::Transport { .. } => true,
            ProviderError::Status { status, .. } => *status >= 500 || matches!(status, 408 | 429),
            ProviderError::Body { .. } | ProviderError::BodyTooLarge { .. } => false,
        }
    }

    /// The URL the failed call was about.
    pub fn url(&self) -> &str {
        match self {
            ProviderError::RateLimited { url, .. }
            | ProviderError::Status { url, .. }
            | ProviderError::Body { url, .. }
            | ProviderError::BodyTooLarge { url, .. }
            | ProviderError::Timeout { url, .. }
            | ProviderError::Transport { url, .. } => url,
        }
    }
}

/// A git hosting API. Each call makes its HTTP requests with `timeout` as the bound of each
/// request (the caller derives it from its tick deadline). The futures are `Send` so the
/// refresher can run calls on other tasks; the trait is generic rather than object-safe, as the
/// refresher knows its one provider kind.
pub trait Provider: Send + Sync {
    /// The most recently updated open PR whose head is `branch` in `origin` itself (not a fork),
    /// or `None` when there is none.
    fn pull_request_by_branch(
        &self,
        origin: &Origin,
        branch: &str,
        token: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<Option<PrNumber>, ProviderError>> + Send;

    /// The PR with its reviews and its head commit's checks, derived into the row's fields.
    ///
    /// `known_head_sha` is the head commit the row stored last time, if any: the checks of that
    /// commit may then be asked for together with the PR (one round trip when the head has not
    /// moved), and asked for again only when the PR's head turns out to be another commit.
    fn status(
        &self,
        origin: &Origin,
        pr_number: PrNumber,
        known_head_sha: Option<&str>,
        token: &str,
        timeout: Duration,
    ) -> impl Future<Output = Result<PrStatus, ProviderError>> + Send;
}

#[cfg(test)]
mod tests {
    use super::*;

    fn github_enterprise() -> ProviderConfig {
        ProviderConfig {
            id: "ghe".into(),
            kind: ProviderKind::Github,
            api_base_url: "https://ghe.example.com/api/v3".into(),
            origin_host: "GHE.example.com".into(),
            allow_insecure_http: false,
        }
    }

    #[test]
    fn the_github_default_is_valid_and_serves_github_com() {
        let github = ProviderConfig::github_default();
        assert_eq!(github.validate(), Ok(()));
        assert_eq!((github.id.as_str(), github.origin_host.as_str()), ("github", "github.com"));
        assert_eq!(github.api_base_url, "https://api.github.com");
    }

    #[test]
    fn the_provider_is_chosen_by_origin_host_ignoring_case() {
        let providers = [ProviderConfig::github_default(), github_enterprise()];
        let pick =
            |origin: &str| provider_for(&providers, &Origin::parse(origin).expect("origin")).map(|p| &*p.id);
        assert_eq!(pick("git@github.com:o/r.git"), Some("github"));
        assert_eq!(pick("https://GitHub.COM/o/r"), Some("github"));
        assert_eq!(pick("ssh://git@ghe.example.com:2222/o/r"), Some("ghe"));
        assert_eq!(pick("https://gitlab.com/o/r"), None);
        assert_eq!(pick("https://github.com.evil.example/o/r"), None);
    }

    #[test]
    fn validate_names_the_bad_field() {
        type Spoil = fn(&mut ProviderConfig);
        let cases: [(Spoil, &str); 9] = [
            (|p| p.id = " ".into(), "id"),
            (|p| p.api_base_url = "https://ghp_x@api.github.com".into(), "api_base_url"),
            (|p| p.api_base_url = "https://x:ghp_x@api.github.com".into(), "api_base_url"),
            (|p| p.api_base_url = "api.github.com".into(), "api_base_url"),
            (|p| p.api_base_url = "ftp://api.github.com".into(), "api_base_url"),
            (|p| p.api_base_url = "https://api.github.com/?x=1".into(), "api_base_url"),
            (|p| p.origin_host = String::new(), "origin_host"),
            (|p| p.origin_host = "https://github.com".into(), "origin_host"),
            (|p| p.origin_host = "github.com:443".into(), "origin_host"),
        ];
        for (spoil, field) in cases {
            let mut config = ProviderConfig::github_default();
            spoil(&mut config);
            let err = config.validate().expect_err(field);
            assert_eq!(err.field, field, "{err}");
            assert!(err.to_string().contains(&format!("`{field}`")), "{err}");
            assert!(!err.to_string().contains("ghp_x"), "{err}");
        }
    }

    #[test]
    fn two_providers_for_one_host_or_id_are_rejected() {
        let mut twin = github_enterprise();
        twin.origin_host = "GitHub.com".into();
        let err = validate_providers(&[ProviderConfig::github_default(), twin]).expect_err("same host");
        assert_eq!((err.id.as_str(), err.field), ("ghe", "origin_host"));

        let mut same_id = github_enterprise();
        same_id.id = "github".into();
        let err = validate_providers(&[ProviderConfig::github_default(), same_id]).expect_err("same id");
        assert_eq!(err.field, "id");

        assert_eq!(validate_providers(&[ProviderConfig::github_default(), github_enterprise()]), Ok(()));
    }

    #[test]
    fn config_rejects_unknown_fields_and_kinds() {
        let ok: ProviderConfig = toml::from_str(
            "id = \"github\"\nkind = \"github\"\napi_base_url = \"https://api.github.com\"\norigin_host = \"github.com\"",
        )
        .expect("parses");
        assert_eq!(ok, ProviderConfig::github_default());
        let unknown = toml::from_str::<ProviderConfig>(
            "id = \"g\"\nkind = \"github\"\napi_base_url = \"https://a\"\norigin_host = \"h\"\npattern = \"x\"",
        );
        assert!(unknown.is_err());
        let gitlab = toml::from_str::<ProviderConfig>(
            "id = \"g\"\nkind = \"gitlab\"\napi_base_url = \"https://a\"\norigin_host = \"h\"",
        );
        assert!(gitlab.is_err());
    }

    #[test]
    fn stored_state_texts_parse_back_to_their_state() {
        for state in PrState::ALL {
            assert_eq!(PrState::parse(state.as_str()), Some(state));
        }
        for state in ChecksState::ALL {
            assert_eq!(ChecksState::parse(state.as_str()), Some(state));
        }
        assert_eq!((PrState::parse("Open"), ChecksState::parse("")), (None, None));
    }

    #[test]
    fn metric_labels_and_transience_are_fixed_per_variant() {
        let url = || "https://api.github.com/x".to_owned();
        let status = |status| ProviderError::Status { url: url(), status, message: String::new() };
        let cases = [
            (ProviderError::RateLimited { url: url(), wait: Duration::from_secs(1) }, "rate_limited", true),
            (status(502), "http_status", true),
            (status(404), "http_status", false),
            (ProviderError::Body { url: url(), problem: "x".into() }, "bad_body", false),
            (ProviderError::BodyTooLarge { url: url(), limit: 1 }, "body_too_large", false),
            (ProviderError::Timeout { url: url(), timeout: Duration::from_secs(1) }, "timeout", true),
        ];
        for (err, label, transient) in cases {
            assert_eq!((err.metric_label(), err.is_transient()), (label, transient), "{err}");
            assert_eq!(err.url(), url());
        }
    }
}
