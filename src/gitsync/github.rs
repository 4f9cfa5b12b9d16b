//! GitHub: the REST client behind [`Provider`], with its ETag cache; the JSON shapes it reads
//! and the pure derivations it applies to them are in [`wire`].
//!
//! Requests (`docs/gitsync.md`): the open PR of a branch
//! (`pulls?state=open&head={owner}:{branch}…`), then `pulls/{n}`, and at once both
//! `pulls/{n}/reviews?per_page=100` and `commits/{head_sha}/check-runs?per_page=100`. When the
//! caller knows the head commit from last time, all three go at once (one round trip), and the
//! checks are asked for again only if the PR's head turns out to have moved. Only the first page
//! of reviews and check runs is read (100 is GitHub's page maximum; a PR with more is rare and
//! then shows a partial verdict).
//!
//! Every response body is read in chunks up to `max_body_bytes`, so a huge or endless answer
//! cannot exhaust memory. Successful answers carrying an `etag` are cached (keyed by URL and a
//! SHA-256 of the token, so one user's cached answer is never served to another token, and the
//! token itself is never kept); the next request sends `If-None-Match` and a `304` reuses the
//! cached body. A 304 does not count against GitHub's primary rate limit.
//!
//! Rate limits follow GitHub's documentation, see [`wire::rate_limit_wait`].

pub mod wire;

use std::collections::{BTreeMap, HashMap};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use opentelemetry::trace::{SpanBuilder, SpanKind, Status, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};
use reqwest::header::{self, HeaderMap};
use reqwest::{StatusCode, Url};
use serde::de::DeserializeOwned;
use sha2::{Digest, Sha256};

use super::origin::Origin;
use super::provider::{PrNumber, PrStatus, Provider, ProviderConfig, ProviderConfigError, ProviderError};
use crate::telemetry::traces;
/// What [`HttpStats`] counts by; here too, beside the client whose requests it classifies.
pub use wire::StatusClass;
use wire::{
    CheckRuns, DEFAULT_RATE_LIMIT_WAIT, PullRequest, PullSummary, Review, derive_status, error_message,
    is_secondary_rate_limit_message, pull_request_for_branch, rate_limit_wait,
};

/// Large enough for a PR with long descriptions and 100 reviews; far below what would hurt.
pub const DEFAULT_MAX_BODY_BYTES: usize = 4 << 20;
pub const DEFAULT_ETAG_CACHE_ENTRIES: usize = 10_000;
/// The entry bound alone would allow 10k × `max_body_bytes`; this caps the cache's memory.
pub const DEFAULT_ETAG_CACHE_BYTES: usize = 64 << 20;
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The API version the response shapes in [`wire`] were written against.
const API_VERSION: &str = "2022-11-28";
/// Redirects followed per request (a rename chain is one or two hops).
const MAX_REDIRECTS: usize = 3;

// ---------------------------------------------------------------------------------------------
// Request counts.

/// Requests by [`StatusClass`] since the client was built, each request counted once (redirects
/// followed are part of their request); monotonic, so a metrics layer can export them as
/// observable counters.
#[derive(Debug, Default)]
pub struct HttpStats {
    counts: [AtomicU64; 5],
}

impl HttpStats {
    pub fn record(&self, class: StatusClass) {
        self.counts[class as usize].fetch_add(1, Ordering::Relaxed);
    }

    pub fn count(&self, class: StatusClass) -> u64 {
        self.counts[class as usize].load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Rate limit as GitHub reports it.

/// The primary rate limit of a response: `x-ratelimit-remaining` and `x-ratelimit-reset`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RateLimit {
    /// Requests left in the current window.
    pub remaining: u64,
    /// When the window resets, in Unix seconds.
    pub reset_epoch_secs: u64,
}

impl RateLimit {
    /// Both headers, when the response carries them as numbers.
    fn from_headers(headers: &HeaderMap) -> Option<Self> {
        let number = |name: &str| headers.get(name)?.to_str().ok()?.trim().parse::<u64>().ok();
        Some(RateLimit {
            remaining: number("x-ratelimit-remaining")?,
            reset_epoch_secs: number("x-ratelimit-reset")?,
        })
    }

    /// Seconds from `now_epoch_secs` until the window resets (0 once it has).
    pub fn reset_in(&self, now_epoch_secs: u64) -> u64 {
        self.reset_epoch_secs.saturating_sub(now_epoch_secs)
    }
}

/// The rate limit of the last response that carried one (whichever token it was sent with), for
/// the `gitsync.rate_limit.*` gauges.
#[derive(Debug, Default)]
pub struct RateLimitSeen(Mutex<Option<RateLimit>>);

impl RateLimitSeen {
    fn record(&self, limit: RateLimit) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(limit);
    }

    /// `None` until a response carried both headers.
    pub fn last(&self) -> Option<RateLimit> {
        *self.0.lock().unwrap_or_else(|e| e.into_inner())
    }
}

// ---------------------------------------------------------------------------------------------
// ETag cache.

#[derive(Clone)]
struct Cached {
    etag: String,
    body: Arc<[u8]>,
}

/// Bounded by entries and bytes; the least recently used entry goes first.
struct EtagCache {
    max_entries: usize,
    max_bytes: usize,
    bytes: usize,
    next_use: u64,
    entries: HashMap<String, (Cached, u64)>,
    by_use: BTreeMap<u64, String>,
}

impl EtagCache {
    fn new(max_entries: usize, max_bytes: usize) -> Self {
        EtagCache {
            max_entries,
            max_bytes,
            bytes: 0,
            next_use: 0,
            entries: HashMap::new(),
            by_use: BTreeMap::new(),
        }
    }

    fn tick(&mut self) -> u64 {
        self.next_use += 1;
        self.next_use
    }

    fn get(&mut self, key: &str) -> Option<Cached> {
        let now = self.tick();
        let (cached, used) = self.entries.get_mut(key)?;
        let old = std::mem::replace(used, now);
        let cached = cached.clone();
        if let Some(key) = self.by_use.remove(&old) {
            self.by_use.insert(now, key);
        }
        Some(cached)
    }

    fn insert(&mut self, key: String, cached: Cached) {
        self.remove(&key);
        let size = entry_bytes(&key, &cached);
        if self.max_entries == 0 || size > self.max_bytes {
            return;
        }
        while self.entries.len() >= self.max_entries || self.bytes + size > self.max_bytes {
            let Some((_, oldest)) = self.by_use.pop_first() else { break };
            self.remove(&oldest);
        }
        let now = self.tick();
        self.bytes += size;
        self.by_use.insert(now, key.clone());
        self.entries.insert(key, (cached, now));
    }

    fn remove(&mut self, key: &str) {
        if let Some((cached, used)) = self.entries.remove(key) {
            self.bytes -= entry_bytes(key, &cached);
            self.by_use.remove(&used);
        }
    }

    fn len(&self) -> usize {
        self.entries.len()
    }
}

/// What an entry costs the byte bound: its body, and the ETag and key it is kept under (a server
/// may send an ETag as long as a header may be; counting bodies alone let 10k such entries pass
/// the bound many times over).
fn entry_bytes(key: &str, cached: &Cached) -> usize {
    key.len() + cached.etag.len() + cached.body.len()
}

/// Cache key: a SHA-256 of the token (a different token may see different data) and the URL.
fn cache_key(token: &str, url: &Url) -> String {
    let digest = Sha256::digest(token.as_bytes());
    let mut key = String::with_capacity(33 + url.as_str().len());
    for byte in &digest[..16] {
        let _ = write!(key, "{byte:02x}");
    }
    key.push(' ');
    key.push_str(url.as_str());
    key
}

// ---------------------------------------------------------------------------------------------
// The client.

/// Client settings that are not part of the provider's identity.
#[derive(Debug, Clone)]
pub struct GitHubOptions {
    /// Hard limit on any response body.
    pub max_body_bytes: usize,
    pub etag_cache_entries: usize,
    pub etag_cache_bytes: usize,
    pub connect_timeout: Duration,
    pub user_agent: String,
    /// The wall clock in Unix seconds, compared with `x-ratelimit-reset`; tests pin it.
    pub epoch_secs: fn() -> u64,
}

impl Default for GitHubOptions {
    fn default() -> Self {
        GitHubOptions {
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            etag_cache_entries: DEFAULT_ETAG_CACHE_ENTRIES,
            etag_cache_bytes: DEFAULT_ETAG_CACHE_BYTES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            user_agent: concat!("worker/", env!("CARGO_PKG_VERSION"), " (gitsync)").to_owned(),
            epoch_secs: system_epoch_secs,
        }
    }
}

pub fn system_epoch_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

#[derive(Debug, thiserror::Error)]
pub enum GitHubBuildError {
    #[error(transparent)]
    Config(#[from] ProviderConfigError),
    #[error("cannot build the http client: {0}")]
    Http(#[from] reqwest::Error),
}

/// A GitHub (or GitHub Enterprise Server) REST client. Cheap to share behind an `Arc`; the
/// connection pool and the ETag cache are shared by every call.
pub struct GitHub {
    http: reqwest::Client,
    api: Url,
    options: GitHubOptions,
    cache: Mutex<EtagCache>,
    stats: Arc<HttpStats>,
    rate_limit: Arc<RateLimitSeen>,
}

/// A successful body, fresh or from the cache.
struct Fetched {
    body: Arc<[u8]>,
    etag: Option<String>,
    key: String,
    from_cache: bool,
}

impl GitHub {
    pub fn new(config: &ProviderConfig, options: GitHubOptions) -> Result<Self, GitHubBuildError> {
        config.validate()?;
        let api = Url::parse(&config.api_base_url).map_err(|e| ProviderConfigError {
            id: config.id.clone(),
            field: "api_base_url",
            problem: format!("is not a url ({e})"),
        })?;
        let http = reqwest::Client::builder()
            .user_agent(options.user_agent.clone())
            .connect_timeout(options.connect_timeout)
            // GitHub answers 301 for a renamed or transferred repository; follow it. reqwest drops
            // `Authorization` when a redirect leaves the host, so the token stays with the API.
            .redirect(reqwest::redirect::Policy::limited(MAX_REDIRECTS))
            .build()?;
        let cache = Mutex::new(EtagCache::new(options.etag_cache_entries, options.etag_cache_bytes));
        Ok(GitHub { http, api, options, cache, stats: Arc::default(), rate_limit: Arc::default() })
    }

    /// Request counts by status class.
    pub fn stats(&self) -> Arc<HttpStats> {
        Arc::clone(&self.stats)
    }

    /// The rate limit GitHub reported last (any status, a 304 included).
    pub fn rate_limit(&self) -> Arc<RateLimitSeen> {
        Arc::clone(&self.rate_limit)
    }

    /// Entries in the ETag cache.
    pub fn cached_responses(&self) -> usize {
        self.cache().len()
    }

    fn cache(&self) -> std::sync::MutexGuard<'_, EtagCache> {
        // The cache is consistent after every statement, so a panic elsewhere leaves it usable.
        self.cache.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// `{api}/repos/{owner}/{repo}/{tail…}?{query}`, each segment and value percent-encoded.
    fn endpoint(&self, origin: &Origin, tail: &[&str], query: &[(&str, &str)]) -> Url {
        let mut url = self.api.clone();
        // `validate` rejected cannot-be-a-base urls, the only case where this is Err.
        if let Ok(mut segments) = url.path_segments_mut() {
            segments.pop_if_empty().extend(["repos", &origin.owner, &origin.repo]).extend(tail);
        }
        if !query.is_empty() {
            url.query_pairs_mut().extend_pairs(query);
        }
        url
    }

    /// The first page of the check runs of commit `sha`.
    async fn check_runs(
        &self,
        origin: &Origin,
        sha: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<CheckRuns, ProviderError> {
        let url = self.endpoint(origin, &["commits", sha, "check-runs"], &[("per_page", "100")]);
        self.get_json(url, token, timeout).await
    }

    async fn get_json<T: DeserializeOwned>(
        &self,
        url: Url,
        token: &str,
        timeout: Duration,
    ) -> Result<T, ProviderError> {
        let fetched = self.fetch(&url, token, timeout).await?;
        let value = serde_json::from_slice(&fetched.body)
            .map_err(|e| ProviderError::Body { url: url.to_string(), problem: e.to_string() })?;
        // Cached only once it parsed: a bad body must not be replayed on every 304.
        if let (Some(etag), false) = (fetched.etag, fetched.from_cache) {
            self.cache().insert(fetched.key, Cached { etag, body: fetched.body });
        }
        Ok(value)
    }

    async fn fetch(&self, url: &Url, token: &str, timeout: Duration) -> Result<Fetched, ProviderError> {
        let key = cache_key(token, url);
        let cached = self.cache().get(&key);
        let mut request = self
            .http
            .get(url.clone())
            .bearer_auth(token)
            .header(header::ACCEPT, "application/vnd.github+json")
            .header("x-github-api-version", API_VERSION)
            .timeout(timeout);
        if let Some(cached) = &cached {
            request = request.header(header::IF_NONE_MATCH, &cached.etag);
        }
        // Ends when this call returns (the context holding it drops).
        let span = request_span(url, cached.is_some());
        let response = match request.send().await {
            Ok(response) => response,
            Err(error) => {
                self.stats.record(StatusClass::Error);
                traces::set_attributes(
                    span.as_ref(),
                    [KeyValue::new(STATUS_CLASS, StatusClass::Error.label())],
                );
                if let Some(cx) = &span {
                    cx.span().set_status(Status::error("no response"));
                }
                return Err(transport_error(url, timeout, error));
            }
        };
        let status = response.status();
        self.stats.record(StatusClass::of(status.as_u16()));
        let limit = RateLimit::from_headers(response.headers());
        if let Some(limit) = limit {
            self.rate_limit.record(limit);
        }
        if !(status.is_success() || status == StatusCode::NOT_MODIFIED)
            && let Some(cx) = &span
        {
            cx.span().set_status(Status::error(format!("HTTP {}", status.as_u16())));
        }
        traces::set_attributes(
            span.as_ref(),
            [
                KeyValue::new(STATUS_CLASS, StatusClass::of(status.as_u16()).label()),
                KeyValue::new("http.response.status_code", i64::from(status.as_u16())),
            ]
            .into_iter()
            .chain(limit.map(|l| KeyValue::new("github.rate_limit.remaining", l.remaining as i64))),
        );
        tracing::debug!(url = %url, status = status.as_u16(), revalidated = cached.is_some(), "github response");

        if status == StatusCode::NOT_MODIFIED {
            return match cached {
                Some(cached) => Ok(Fetched { body: cached.body, etag: None, key, from_cache: true }),
                None => Err(ProviderError::Status {
                    url: url.to_string(),
                    status: status.as_u16(),
                    message: "not modified, but nothing was cached for this request".into(),
                }),
            };
        }
        if status.is_success() {
            let etag = response.headers().get(header::ETAG).and_then(|v| v.to_str().ok()).map(str::to_owned);
            check_content_type(url, response.headers())?;
            let body = self.read_body(url, response, timeout).await?;
            return Ok(Fetched { body: body.into(), etag, key, from_cache: false });
        }

        let wait = rate_limit_wait(status.as_u16(), response.headers(), (self.options.epoch_secs)());
        if let Some(wait) = wait {
            return Err(ProviderError::RateLimited { url: url.to_string(), wait });
        }
        // The explanation is a courtesy: an unreadable error body still yields the status error.
        let message = self.read_body(url, response, timeout).await.ok().map(|body| error_message(&body));
        let message = message.unwrap_or_default();
        if status == StatusCode::FORBIDDEN && is_secondary_rate_limit_message(&message) {
            return Err(ProviderError::RateLimited { url: url.to_string(), wait: DEFAULT_RATE_LIMIT_WAIT });
        }
        Err(ProviderError::Status { url: url.to_string(), status: status.as_u16(), message })
    }

    /// The body, chunk by chunk, failing as soon as it passes `max_body_bytes`.
    async fn read_body(
        &self,
        url: &Url,
        mut response: reqwest::Response,
        timeout: Duration,
    ) -> Result<Vec<u8>, ProviderError> {
        let limit = self.options.max_body_bytes;
        let too_large = || ProviderError::BodyTooLarge { url: url.to_string(), limit };
        if response.content_length().is_some_and(|len| len > limit as u64) {
            return Err(too_large());
        }
        let mut body = Vec::new();
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    if body.len() + chunk.len() > limit {
                        return Err(too_large());
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => return Ok(body),
                // Not counted as an `error` request: its status class is counted already.
                Err(error) => return Err(transport_error(url, timeout, error)),
            }
        }
    }
}

fn transport_error(url: &Url, timeout: Duration, error: reqwest::Error) -> ProviderError {
    if error.is_timeout() {
        ProviderError::Timeout { url: url.to_string(), timeout }
    } else {
        // The url is in the variant already; keep it out of the source's message.
        ProviderError::Transport { url: url.to_string(), source: error.without_url() }
    }
}

/// The span attribute of a request's status class (`2xx` … `5xx`, `error`).
const STATUS_CLASS: &str = "http.response.status_class";

/// With traces on: a span for one GET, a child of the current context (the gitsync tick's).
fn request_span(url: &Url, revalidated: bool) -> Option<Context> {
    traces::start_span(&Context::current(), || {
        SpanBuilder::from_name("github request").with_kind(SpanKind::Client).with_attributes([
            KeyValue::new("http.request.method", "GET"),
            KeyValue::new("url.path", url.path().to_owned()),
            KeyValue::new("github.revalidated", revalidated),
        ])
    })
}

/// An answer declared as something other than JSON (an HTML error page from a proxy, say) is
/// reported as such rather than as serde's "expected value at line 1 column 1".
fn check_content_type(url: &Url, headers: &HeaderMap) -> Result<(), ProviderError> {
    let Some(content_type) = headers.get(header::CONTENT_TYPE) else { return Ok(()) };
    let content_type = content_type.to_str().unwrap_or_default();
    if content_type.to_ascii_lowercase().contains("json") {
        return Ok(());
    }
    Err(ProviderError::Body {
        url: url.to_string(),
        problem: format!("content-type {content_type:?} is not JSON"),
    })
}

impl Provider for GitHub {
    async fn pull_request_by_branch(
        &self,
        origin: &Origin,
        branch: &str,
        token: &str,
        timeout: Duration,
    ) -> Result<Option<PrNumber>, ProviderError> {
        let head = format!("{}:{branch}", origin.owner);
        let query = [
            ("state", "open"),
            ("head", head.as_str()),
            ("sort", "updated"),
            ("direction", "desc"),
            ("per_page", "1"),
        ];
        let url = self.endpoint(origin, &["pulls"], &query);
        let items: Vec<PullSummary> = self.get_json(url, token, timeout).await?;
        Ok(pull_request_for_branch(&items, &origin.owner, branch))
    }

    async fn status(
        &self,
        origin: &Origin,
        pr_number: PrNumber,
        known_head_sha: Option<&str>,
        token: &str,
        timeout: Duration,
    ) -> Result<PrStatus, ProviderError> {
        let number = pr_number.to_string();
        let pull =
            self.get_json::<PullRequest>(self.endpoint(origin, &["pulls", &number], &[]), token, timeout);
        let reviews_url = self.endpoint(origin, &["pulls", &number, "reviews"], &[("per_page", "100")]);
        let reviews = self.get_json::<Vec<Review>>(reviews_url, token, timeout);
        let (pr, reviews, checks) = match known_head_sha {
            // Steady state: all three at once, the checks of the commit the row stored.
            Some(known) => {
                let (pr, reviews, known_checks) =
                    tokio::join!(pull, reviews, self.check_runs(origin, known, token, timeout));
                let (pr, reviews) = (pr?, reviews?);
                // The head moved: the prefetched checks (or their error: the old commit may be
                // gone) describe another commit; ask for the new head's.
                let checks = if pr.head.sha == known {
                    known_checks?
                } else {
                    self.check_runs(origin, &pr.head.sha, token, timeout).await?
                };
                (pr, reviews, checks)
            }
            // First refresh: the head commit is known only once the PR has answered.
            None => {
                let pr = pull.await?;
                let (reviews, checks) =
                    tokio::try_join!(reviews, self.check_runs(origin, &pr.head.sha, token, timeout))?;
                (pr, reviews, checks)
            }
        };
        Ok(derive_status(&pr, &reviews, &checks.check_runs))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_etag_cache_evicts_the_least_recently_used_within_both_bounds() {
        let entry = |n: usize| Cached { etag: format!("\"{n}\""), body: vec![0; n].into() };
        let mut cache = EtagCache::new(2, 100);
        cache.insert("a".into(), entry(10));
        cache.insert("b".into(), entry(10));
        assert!(cache.get("a").is_some(), "a is now the most recently used");
        cache.insert("c".into(), entry(10));
        assert!(cache.get("b").is_none(), "b was the least recently used");
        assert!(cache.get("a").is_some() && cache.get("c").is_some());

        // An entry costs its key, ETag and body: "d" + "\"95\"" + 95 bytes = 100.
        cache.insert("d".into(), entry(95));
        assert_eq!(cache.len(), 1, "byte bound evicts until the new entry fits");
        assert_eq!(cache.bytes, 100);
        cache.insert("e".into(), entry(96));
        assert!(cache.get("e").is_none(), "an entry over the byte bound is not cached");
        cache.insert("d".into(), entry(5));
        assert_eq!((cache.len(), cache.bytes), (1, 1 + 3 + 5), "replacing an entry releases its bytes");
        let long_etag = Cached { etag: "x".repeat(200), body: vec![0; 1].into() };
        cache.insert("f".into(), long_etag);
        assert!(cache.get("f").is_none(), "a small body under a huge ETag is not cached either");
    }

    #[test]
    fn the_rate_limit_needs_both_headers_as_numbers() {
        let mut headers = HeaderMap::new();
        headers.insert("x-ratelimit-remaining", "4987".parse().expect("value"));
        assert_eq!(RateLimit::from_headers(&headers), None, "no reset");
        headers.insert("x-ratelimit-reset", "1700000754".parse().expect("value"));
        let limit = RateLimit::from_headers(&headers).expect("both");
        assert_eq!(limit, RateLimit { remaining: 4987, reset_epoch_secs: 1_700_000_754 });
        assert_eq!(limit.reset_in(1_700_000_000), 754);
        assert_eq!(limit.reset_in(1_800_000_000), 0, "a reset in the past is 0 s away");
        headers.insert("x-ratelimit-remaining", "lots".parse().expect("value"));
        assert_eq!(RateLimit::from_headers(&headers), None);
    }

    #[test]
    fn cache_keys_hold_a_token_hash_not_the_token() {
        let url = Url::parse("https://api.github.com/repos/o/r/pulls/1").expect("url");
        let key = cache_key("ghp_secret", &url);
        assert!(!key.contains("ghp_secret"));
        assert!(key.ends_with(url.as_str()));
        assert_ne!(key, cache_key("ghp_other", &url));
    }

    #[test]
    fn endpoints_encode_segments_and_keep_an_enterprise_path() {
        let mut config = ProviderConfig::github_default();
        config.api_base_url = "https://ghe.example.com/api/v3/".into();
        let github = GitHub::new(&config, GitHubOptions::default()).expect("client");
        let origin = Origin::parse("git@ghe.example.com:o/r.git").expect("origin");
        let url = github.endpoint(&origin, &["pulls"], &[("head", "o:feat/x#1"), ("state", "open")]);
        assert_eq!(
            url.as_str(),
            "https://ghe.example.com/api/v3/repos/o/r/pulls?head=o%3Afeat%2Fx%231&state=open"
        );
        let url = github.endpoint(&origin, &["commits", "a/b", "check-runs"], &[]);
        assert_eq!(url.as_str(), "https://ghe.example.com/api/v3/repos/o/r/commits/a%2Fb/check-runs");
    }
}
