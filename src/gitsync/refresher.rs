//! The `gitsync` loop: due `chat_diff_statuses` rows → their pull request's status
//! (`docs/gitsync.md`).
//!
//! A tick:
//!
//! 1. **Lease** up to `batch_size` due rows (`stale_at <= now()`, non-empty origin and branch,
//!    chat not archived), oldest first, `FOR UPDATE SKIP LOCKED`, moving `stale_at` a lease
//!    ahead in the same statement, which commits at once. Every replica runs this loop; SKIP
//!    LOCKED plus the moved `stale_at` hand each row to one replica per lease. The same
//!    transaction then counts the due rows left per provider (the `gitsync.due*` gauges).
//! 2. **Resolve** a provider and a token once per (owner, origin) group, sequentially (DB only):
//!    the provider is the one whose `origin_host` is the origin's host ([`provider_for`]) and the
//!    token the owner's `external_auth_links` row for that provider's id, never another's. An
//!    expired token without a refresh token counts as none (one with a refresh token is still
//!    sent: the API tier refreshes tokens, a 401 then shows up as an ordinary error). With
//!    `gitsync.token_keys` set the token is decrypted ([`super::tokens`]) and a plaintext one is
//!    refused; without keys a plaintext token is used and an encrypted one refused. A token that
//!    cannot be used is the group's rows' error (`last_outcome` `error`, naming the
//!    `external_auth_links` row), with no HTTP call; other groups carry on.
//! 3. **Refresh** under one semaphore of the effective concurrency (permits are per row: a row's
//!    calls and its write-back; a row that knows its PR and head commit sends the PR, reviews and
//!    checks requests at once). Each group sends its first row alone and releases the others only
//!    once that answer is not a rate limit, so a group whose token is rate-limited costs one
//!    row's HTTP calls (one for a lookup, three in steady state); a rate limit seen later flags the
//!    group and its rows not yet started are skipped without a call. Other groups carry on.
//! 4. **Write back** each row in its own short transaction: read what the row holds under its
//!    lock, [`decide`] what to write (pure: the outcome, the fields, when the row is due again),
//!    write it. A failed write leaves that row leased (retried after the lease) and the others go
//!    on. Every write is fenced on the `stale_at` its lease set: a row re-marked by
//!    `mark_diff_stale` meanwhile (or re-leased after an expired lease) is left alone, so an
//!    answer about an old branch never overwrites a newer mark; the re-marked row is simply
//!    refreshed again by the next tick.
//!
//! Each HTTP request is bounded by [`Tick::budget`] at the moment its row starts, so the fan-out
//! ends inside the tick. If the runner drops the tick at its timeout anyway, rows not written
//! keep their lease and come back once it expires: nothing is lost.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use futures_util::future::join_all;
use opentelemetry::KeyValue;
use opentelemetry::metrics::{Counter, Meter};
use tokio::sync::Semaphore;
use tokio_postgres::Row;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::config::GitsyncConfig;
use super::decide::{Fields, Found, RefreshOutcome, Stored, decide};
use super::github::{GitHub, GitHubBuildError, GitHubOptions, HttpStats, RateLimitSeen, StatusClass};
use super::origin::Origin;
use super::provider::{
    ChecksState, PrNumber, PrState, PrStatus, Provider, ProviderConfig, ProviderError, provider_for,
};
use super::tokens::{self, Column, KeyConfigError, TokenKeys};
use crate::db::{self, Db, DbError, Exec};
use crate::runtime::{Loop, LoopError, Progress, Schedule, Tick};

pub const NAME: &str = "gitsync";
/// Longest single HTTP request; [`Tick::budget`] shortens it as the tick runs out.
pub const MAX_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// A row whose request could get less than this is not started (it keeps its lease).
const MIN_REQUEST_TIMEOUT: Duration = Duration::from_millis(50);

/// `$1` batch size, `$2` lease in seconds. Returns what a refresh needs (the PR number and head
/// commit stored last time among it), with the chat's owner and the `stale_at` the lease set (the
/// fence of the write-back).
pub const LEASE: &str = "UPDATE chat_diff_statuses AS d \
     SET stale_at = now() + make_interval(secs => $2), leased_at = now() \
     FROM chats AS c \
     WHERE c.id = d.chat_id AND d.chat_id IN (\
       SELECT s.chat_id FROM chat_diff_statuses AS s JOIN chats AS sc ON sc.id = s.chat_id \
       WHERE s.stale_at <= now() AND s.git_remote_origin <> '' AND s.git_branch <> '' \
         AND NOT sc.archived \
       ORDER BY s.stale_at LIMIT $1 FOR UPDATE OF s SKIP LOCKED) \
     RETURNING d.chat_id, c.owner_id, d.git_remote_origin, d.git_branch, d.pr_number, d.stale_at, \
       d.head_sha";

/// `$1` the providers' `origin_host`s (lower-cased), `$2` their ids. The rows due (as [`LEASE`]
/// picks them) that no lease holds, per provider id (NULL: no provider serves the host), with the
/// age of the oldest `stale_at`. The host is cut from the origin as [`Origin::parse`] does for the
/// accepted forms (URL: after the scheme and any user-info, up to a port or path; scp-like: after
/// any user-info, up to the `:`). Runs in the lease's transaction, after the lease, so the rows
/// this tick leased are not due any more.
const DUE: &str = "SELECT p.id, count(*)::int8, \
       coalesce(extract(epoch FROM now() - min(d.stale_at)), 0)::float8 \
     FROM (SELECT s.stale_at, lower(CASE WHEN s.git_remote_origin LIKE '%://%' \
         THEN substring(btrim(s.git_remote_origin) FROM '^[^:/]+://(?:[^/]*@)?([^/:?#]+)') \
         ELSE substring(btrim(s.git_remote_origin) FROM '^(?:[^:/]*@)?([^:/@]+):') END) AS host \
       FROM chat_diff_statuses AS s JOIN chats AS c ON c.id = s.chat_id \
       WHERE s.stale_at <= now() AND s.git_remote_origin <> '' AND s.git_branch <> '' \
         AND NOT c.archived) AS d \
     LEFT JOIN unnest($1::text[], $2::text[]) AS p(host, id) ON p.host = d.host \
     GROUP BY p.id";

/// The `provider` attribute of due rows whose origin's host no configured provider serves.
pub const NO_PROVIDER: &str = "none";

/// `$1` owner, `$2` provider id. An expired token counts only with a refresh token beside it.
/// The key id is NULL for a plaintext token.
const TOKEN: &str = "SELECT access_token, access_token_key_id FROM external_auth_links \
     WHERE user_id = $1 AND provider_id = $2 \
       AND (expires_at IS NULL OR expires_at > now() OR refresh_token IS NOT NULL)";

/// `$1` chat, `$2` the lease's stale_at. What [`decide`] needs of the row, locked until the write
/// commits, with the transaction's `now()`, which the write's `now()` equals. No row: the row was
/// re-marked or re-leased since the lease (the fence).
const STORED: &str = "SELECT now(), updated_at, last_error IS NOT NULL, url, pr_number, \
     pull_request_state, title, draft, additions, deletions, changed_files, commits, approved, \
     changes_requested, reviewer_count, checks_state, author_login, base_branch, head_branch, \
     head_sha FROM chat_diff_statuses WHERE chat_id = $1 AND stale_at = $2 FOR UPDATE";

/// `$1` chat, `$2` the lease's stale_at, `$3` outcome, `$4..$20` the PR fields, `$21` delay in
/// seconds.
const WRITE_STATUS: &str = "UPDATE chat_diff_statuses SET \
     last_outcome = $3, url = $4, pr_number = $5, pull_request_state = $6, title = $7, draft = $8, \
     additions = $9, deletions = $10, changed_files = $11, commits = $12, approved = $13, \
     changes_requested = $14, reviewer_count = $15, checks_state = $16, author_login = $17, \
     base_branch = $18, head_branch = $19, head_sha = $20, last_error = NULL, refreshed_at = now(), \
     stale_at = now() + make_interval(secs => $21), leased_at = NULL \
     WHERE chat_id = $1 AND stale_at = $2";

/// `$1` chat, `$2` the lease's stale_at, `$3` outcome, `$4` delay in seconds.
const WRITE_CLEARED: &str = "UPDATE chat_diff_statuses SET \
     url = NULL, pr_number = NULL, pull_request_state = NULL, title = NULL, draft = NULL, \
     additions = NULL, deletions = NULL, changed_files = NULL, commits = NULL, approved = NULL, \
     changes_requested = NULL, reviewer_count = NULL, checks_state = NULL, author_login = NULL, \
     base_branch = NULL, head_branch = NULL, head_sha = NULL, last_error = NULL, \
     last_outcome = $3, refreshed_at = now(), leased_at = NULL, \
     stale_at = now() + make_interval(secs => $4) \
     WHERE chat_id = $1 AND stale_at = $2";

/// `$1` chat, `$2` the lease's stale_at, `$3` outcome, `$4` last_error, `$5` delay in seconds.
const WRITE_KEPT: &str = "UPDATE chat_diff_statuses SET \
     last_outcome = $3, last_error = $4, stale_at = now() + make_interval(secs => $5), leased_at = NULL \
     WHERE chat_id = $1 AND stale_at = $2";

#[derive(Debug, thiserror::Error)]
pub enum GitsyncError {
    #[error("cannot lease gitsync rows: {0}")]
    Db(#[from] DbError),
}

impl LoopError for GitsyncError {
    fn metric_label(&self) -> &'static str {
        match self {
            GitsyncError::Db(e) => e.metric_label(),
        }
    }
}

/// What one tick did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefreshReport {
    pub leased: usize,
    /// Rows written back, by outcome.
    pub outcomes: HashMap<RefreshOutcome, usize>,
    /// Groups whose token hit a rate limit.
    pub rate_limited_groups: usize,
    /// Rows re-marked (or re-leased) while refreshed: their answer was discarded.
    pub fenced: usize,
    /// Rows not written (not started, write failed): they keep their lease.
    pub left_leased: usize,
}

impl RefreshReport {
    pub fn count(&self, outcome: RefreshOutcome) -> usize {
        self.outcomes.get(&outcome).copied().unwrap_or_default()
    }
}

/// A leased row.
#[derive(Debug, Clone)]
struct Leased {
    chat_id: Uuid,
    owner_id: Uuid,
    origin: String,
    branch: String,
    pr_number: Option<i64>,
    /// The PR's head commit when the row was last refreshed: its checks are asked for together
    /// with the PR.
    head_sha: Option<String>,
    /// The `stale_at` the lease set: the write-back's fence.
    lease_until: DateTime<Utc>,
}

/// An `external_auth_links.access_token` as stored: ciphertext under `key_id`, or plaintext.
struct StoredToken {
    access_token: String,
    key_id: Option<String>,
}

/// A group's way to the provider, or why there is none.
enum Access {
    Token { provider: usize, origin: Origin, token: String },
    Denied(Found),
}

/// The rows of one (owner, origin) and their way to the provider.
struct Group {
    access: Access,
    rows: Vec<Leased>,
}

/// What every row of one tick shares: the tick's budget, the permits of the fan-out and the
/// report the rows add to.
struct FanOut<'a, 't> {
    tick: &'a Tick<'t>,
    semaphore: Semaphore,
    report: Mutex<RefreshReport>,
}

/// What the rows of one group with a token share while they are refreshed.
struct GroupCall<'g, P> {
    provider: &'g P,
    origin: &'g Origin,
    token: &'g str,
    /// The first rate limit a row of the group met; the rows not started by then skip their call.
    limited: Mutex<Option<(Duration, String)>>,
}

/// Instruments of the loop.
struct Metrics {
    refreshes: Counter<u64>,
    rate_limited_groups: Counter<u64>,
    due: Arc<DueCensus>,
}

/// Due rows of one provider (or of none).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Due {
    rows: u64,
    oldest_age_secs: f64,
}

/// The last tick's count of due rows per provider id (every configured provider, then
/// [`NO_PROVIDER`]), read by the `gitsync.due*` gauges; `None` before the first lease.
#[derive(Default)]
struct DueCensus(Mutex<Option<Vec<(String, Due)>>>);

impl DueCensus {
    fn read(&self) -> Option<Vec<(String, Due)>> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn set(&self, due: Vec<(String, Due)>) {
        *self.0.lock().unwrap_or_else(|e| e.into_inner()) = Some(due);
    }
}

/// The gitsync loop over providers of type `P` (the daemon: [`GitHub`]).
pub struct Gitsync<P = GitHub> {
    db: Db,
    config: GitsyncConfig,
    concurrency: usize,
    /// The configured providers, each with its client.
    providers: Vec<(ProviderConfig, P)>,
    /// `gitsync.token_keys`, parsed. A validated config always parses; should one not, every
    /// token is refused (as the rows' error) rather than any being sent unchecked.
    keys: Result<TokenKeys, KeyConfigError>,
    metrics: Metrics,
}

impl Gitsync<GitHub> {
    /// The daemon's loop: one GitHub client per configured provider (`max_body_bytes` from the
    /// config), their request counts exported as `gitsync.http.requests{class}`.
    pub fn new(
        db: Db,
        config: GitsyncConfig,
        concurrency: usize,
        meter: &Meter,
    ) -> Result<Self, GitHubBuildError> {
        let options = GitHubOptions { max_body_bytes: config.max_body_bytes, ..GitHubOptions::default() };
        let mut providers = Vec::new();
        for provider in config.effective_providers() {
            let client = GitHub::new(&provider, options.clone())?;
            providers.push((provider, client));
        }
        let stats: Vec<Arc<HttpStats>> = providers.iter().map(|(_, client)| client.stats()).collect();
        meter
            .u64_observable_counter("gitsync.http.requests")
            .with_description("HTTP requests to git providers, by status class (2xx|3xx|4xx|5xx|error)")
            .with_callback(move |observer| {
                for class in StatusClass::ALL {
                    let total = stats.iter().map(|s| s.count(class)).sum();
                    observer.observe(total, &[KeyValue::new("class", class.label())]);
                }
            })
            .build();
        // The rate limit each provider's client saw last, by provider id (from the config).
        let limits: Vec<(KeyValue, Arc<RateLimitSeen>)> = providers
            .iter()
            .map(|(c, client)| (KeyValue::new("provider", c.id.clone()), client.rate_limit()))
            .collect();
        let epoch_secs = options.epoch_secs;
        let remaining = limits.clone();
        meter
            .u64_observable_gauge("gitsync.rate_limit.remaining")
            .with_description("Requests left in the provider's rate-limit window (x-ratelimit-remaining of the last response)")
            .with_callback(move |observer| {
                for (provider, seen) in &remaining {
                    if let Some(limit) = seen.last() {
                        observer.observe(limit.remaining, std::slice::from_ref(provider));
                    }
                }
            })
            .build();
        meter
            .u64_observable_gauge("gitsync.rate_limit.reset")
            .with_unit("s")
            .with_description("Seconds until the provider's rate-limit window resets (x-ratelimit-reset of the last response)")
            .with_callback(move |observer| {
                for (provider, seen) in &limits {
                    if let Some(limit) = seen.last() {
                        observer.observe(limit.reset_in(epoch_secs()), std::slice::from_ref(provider));
                    }
                }
            })
            .build();
        Ok(Self::with_providers(db, config, concurrency, meter, providers))
    }
}

impl<P: Provider> Gitsync<P> {
    /// The loop over given provider clients (tests and benchmarks pass fakes). `concurrency` is
    /// the effective fan-out, `Concurrency::from_config(&config).gitsync`.
    pub fn with_providers(
        db: Db,
        config: GitsyncConfig,
        concurrency: usize,
        meter: &Meter,
        providers: Vec<(ProviderConfig, P)>,
    ) -> Self {
        let metrics = Metrics {
            refreshes: meter
                .u64_counter("gitsync.refreshes")
                .with_description(
                    "Diff-status rows refreshed, by outcome (ok|not_modified|no_pr|no_token|rate_limited|error)",
                )
                .build(),
            rate_limited_groups: meter
                .u64_counter("gitsync.rate_limited_groups")
                .with_description("(owner, origin) groups whose remaining rows were skipped after a rate limit")
                .build(),
            due: Arc::default(),
        };
        let due = metrics.due.clone();
        meter
            .u64_observable_gauge("gitsync.due")
            .with_description("Diff-status rows due for a refresh that no lease holds, per provider (the last tick's count)")
            .with_callback(move |o| {
                for (provider, d) in due.read().unwrap_or_default() {
                    o.observe(d.rows, &[KeyValue::new("provider", provider)]);
                }
            })
            .build();
        let due = metrics.due.clone();
        meter
            .f64_observable_gauge("gitsync.due.oldest_age")
            .with_unit("s")
            .with_description(
                "How long the longest-due unleased diff-status row has been due, per provider (0: none)",
            )
            .with_callback(move |o| {
                for (provider, d) in due.read().unwrap_or_default() {
                    o.observe(d.oldest_age_secs, &[KeyValue::new("provider", provider)]);
                }
            })
            .build();
        let keys = config.token_keys();
        Self { db, config, concurrency: concurrency.max(1), providers, keys, metrics }
    }

    pub fn concurrency(&self) -> usize {
        self.concurrency
    }

    /// The configured providers with their clients.
    pub fn providers(&self) -> &[(ProviderConfig, P)] {
        &self.providers
    }

    /// One tick's work: lease, resolve, refresh, write back.
    pub async fn refresh(&self, tick: &Tick<'_>) -> Result<RefreshReport, GitsyncError> {
        let started = Instant::now();
        let rows = self.lease().await?;
        let report = RefreshReport { leased: rows.len(), ..RefreshReport::default() };
        if rows.is_empty() {
            return Ok(report);
        }
        let groups = self.resolve(rows).await;
        let fan_out =
            FanOut { tick, semaphore: Semaphore::new(self.concurrency), report: Mutex::new(report) };
        join_all(groups.iter().map(|group| self.refresh_group(&fan_out, group))).await;
        let report = fan_out.report.into_inner().unwrap_or_else(|e| e.into_inner());
        tracing::debug!(
            leased = report.leased,
            groups = groups.len(),
            rate_limited_groups = report.rate_limited_groups,
            fenced = report.fenced,
            left_leased = report.left_leased,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "gitsync tick"
        );
        Ok(report)
    }

    /// Leases this tick's rows, and counts the due rows left (the `gitsync.due*` gauges) in the
    /// same transaction.
    async fn lease(&self) -> Result<Vec<Leased>, DbError> {
        let mut conn = self.db.get().await?;
        let tx = db::begin(&mut conn, self.db.tx_limits()).await?;
        let limit = i64::from(self.config.batch_size);
        let lease = self.config.lease.as_secs_f64();
        let rows: Vec<Leased> = tx
            .fetch_all(LEASE, &[(&limit, Type::INT8), (&lease, Type::FLOAT8)])
            .await?
            .iter()
            .map(|r| Leased {
                chat_id: r.get(0),
                owner_id: r.get(1),
                origin: r.get(2),
                branch: r.get(3),
                pr_number: r.get(4),
                lease_until: r.get(5),
                head_sha: r.get(6),
            })
            .collect();
        let hosts: Vec<String> =
            self.providers.iter().map(|(c, _)| c.origin_host.to_ascii_lowercase()).collect();
        let ids: Vec<String> = self.providers.iter().map(|(c, _)| c.id.clone()).collect();
        let counted = tx.fetch_all(DUE, &[(&hosts, Type::TEXT_ARRAY), (&ids, Type::TEXT_ARRAY)]).await?;
        let mut due: Vec<(String, Due)> = ids.into_iter().map(|id| (id, Due::default())).collect();
        due.push((NO_PROVIDER.to_owned(), Due::default()));
        for row in &counted {
            let provider: Option<String> = row.get(0);
            let provider = provider.as_deref().unwrap_or(NO_PROVIDER);
            if let Some((_, d)) = due.iter_mut().find(|(id, _)| id == provider) {
                d.rows += u64::try_from(row.get::<_, i64>(1)).unwrap_or(0);
                d.oldest_age_secs = d.oldest_age_secs.max(row.get::<_, f64>(2));
            }
        }
        db::commit(tx).await?;
        self.metrics.due.set(due);
        Ok(rows)
    }

    /// Groups the rows by (owner, origin) and finds each group's provider and token, one group
    /// after the other.
    async fn resolve(&self, rows: Vec<Leased>) -> Vec<Group> {
        let mut by_key: HashMap<(Uuid, String), Vec<Leased>> = HashMap::new();
        for row in rows {
            by_key.entry((row.owner_id, row.origin.clone())).or_default().push(row);
        }
        let mut groups = Vec::with_capacity(by_key.len());
        for ((owner, origin), rows) in by_key {
            let access = self.access(owner, &origin).await;
            groups.push(Group { access, rows });
        }
        groups
    }

    async fn access(&self, owner: Uuid, origin: &str) -> Access {
        let origin = match Origin::parse(origin) {
            Ok(origin) => origin,
            Err(e) => return Access::Denied(Found::Failed(e.to_string())),
        };
        let configs: Vec<ProviderConfig> = self.providers.iter().map(|(c, _)| c.clone()).collect();
        let Some(config) = provider_for(&configs, &origin) else {
            return Access::Denied(Found::NoToken(format!(
                "no [[gitsync.providers]] entry serves host {:?} (origin {origin})",
                origin.host
            )));
        };
        let provider = self.providers.iter().position(|(c, _)| c.id == config.id).unwrap_or_default();
        match self.token(owner, &config.id).await {
            Ok(Some(stored)) => match self.reveal(owner, &config.id, &stored) {
                Ok(token) => Access::Token { provider, origin, token },
                Err(error) => Access::Denied(Found::Failed(error)),
            },
            Ok(None) => Access::Denied(Found::NoToken(format!(
                "the chat's owner has no usable token for provider {:?}",
                config.id
            ))),
            Err(e) => Access::Denied(Found::Failed(format!("cannot look up the owner's token: {e}"))),
        }
    }

    async fn token(&self, owner: Uuid, provider_id: &str) -> Result<Option<StoredToken>, DbError> {
        let mut conn = self.db.get().await?;
        let tx = db::begin(&mut conn, self.db.tx_limits()).await?;
        let provider_id = provider_id.to_owned();
        let row = tx.fetch_opt(TOKEN, &[(&owner, Type::UUID), (&provider_id, Type::TEXT)]).await?;
        db::commit(tx).await?;
        Ok(row.map(|r| StoredToken { access_token: r.get(0), key_id: r.get(1) }))
    }

    /// The token to send, or why this row's token cannot be used (naming the row).
    fn reveal(&self, owner: Uuid, provider_id: &str, stored: &StoredToken) -> Result<String, String> {
        let row = || format!("external_auth_links row (user {owner}, provider {provider_id:?})");
        let keys = self.keys.as_ref().map_err(|e| format!("{}: token not used: {e}", row()))?;
        let aad = tokens::aad(Column::AccessToken, owner, provider_id);
        keys.reveal(&stored.access_token, stored.key_id.as_deref(), &aad)
            .map_err(|e| format!("{}: access_token: {e}", row()))
    }

    async fn refresh_group(&self, fan_out: &FanOut<'_, '_>, group: &Group) {
        let call = match &group.access {
            Access::Token { provider, origin, token } => {
                GroupCall { provider: &self.providers[*provider].1, origin, token, limited: Mutex::new(None) }
            }
            Access::Denied(found) => {
                for row in &group.rows {
                    let Ok(_permit) = fan_out.semaphore.acquire().await else { return };
                    self.settle(row, found.clone(), &fan_out.report).await;
                }
                return;
            }
        };
        let refresh = |row| self.refresh_row(fan_out, &call, row);
        let Some((first, rest)) = group.rows.split_first() else { return };
        // The first row alone: a rate-limited token then costs this one call.
        refresh(first).await;
        join_all(rest.iter().map(refresh)).await;
        if let Some((wait, error)) = call.limited.into_inner().unwrap_or_else(|e| e.into_inner()) {
            self.metrics.rate_limited_groups.add(1, &[]);
            fan_out.report.lock().unwrap_or_else(|e| e.into_inner()).rate_limited_groups += 1;
            tracing::info!(
                origin = %call.origin,
                rows = group.rows.len(),
                wait_s = wait.as_secs(),
                %error,
                "rate limited; the group's remaining rows wait for the reset"
            );
        }
    }

    async fn refresh_row(&self, fan_out: &FanOut<'_, '_>, call: &GroupCall<'_, P>, row: &Leased) {
        let Ok(_permit) = fan_out.semaphore.acquire().await else { return };
        let seen = call.limited.lock().unwrap_or_else(|e| e.into_inner()).clone();
        let found = if let Some((wait, error)) = seen {
            Found::RateLimited { wait, error }
        } else {
            let timeout = fan_out.tick.budget(MAX_REQUEST_TIMEOUT);
            if timeout < MIN_REQUEST_TIMEOUT || fan_out.tick.shutdown().is_cancelled() {
                fan_out.report.lock().unwrap_or_else(|e| e.into_inner()).left_leased += 1;
                return;
            }
            let found = Found::from_answer(fetch(call, row, timeout).await);
            if let Found::RateLimited { wait, error } = &found {
                call.limited.lock().unwrap_or_else(|e| e.into_inner()).get_or_insert((*wait, error.clone()));
            }
            found
        };
        self.settle(row, found, &fan_out.report).await;
    }

    /// Writes one row's result, fenced on its lease, and records the outcome.
    async fn settle(&self, row: &Leased, found: Found, report: &Mutex<RefreshReport>) {
        let mut written = self.write(row, found).await;
        if let Err(error) = &written
            && error.is_refused_value()
        {
            // What the provider answered cannot be stored (writing it again would fail again):
            // record that as the row's error instead of leaving it leased with no word why.
            let refused = Found::Failed(format!("the provider's answer cannot be stored: {error}"));
            written = self.write(row, refused).await;
        }
        let mut report = report.lock().unwrap_or_else(|e| e.into_inner());
        match written {
            Ok(Some(outcome)) => {
                *report.outcomes.entry(outcome).or_default() += 1;
                self.metrics.refreshes.add(1, &[KeyValue::new("outcome", outcome.as_str())]);
            }
            Ok(None) => report.fenced += 1,
            Err(error) => {
                report.left_leased += 1;
                tracing::warn!(chat_id = %row.chat_id, %error, "cannot write a diff status; it stays leased");
            }
        }
    }

    /// Reads what the row holds, decides what to write and writes it, in one transaction.
    /// `None`: the row was re-marked or re-leased since its lease, and is left alone.
    async fn write(&self, row: &Leased, found: Found) -> Result<Option<RefreshOutcome>, DbError> {
        let mut conn = self.db.get().await?;
        let tx = db::begin(&mut conn, self.db.tx_limits()).await?;
        let (id, fence) = (&row.chat_id, &row.lease_until);
        let Some(held) = tx.fetch_opt(STORED, &[(id, Type::UUID), (fence, Type::TIMESTAMPTZ)]).await? else {
            db::commit(tx).await?;
            return Ok(None);
        };
        let (now, stored) = stored(&held);
        let decided = decide(found, &stored, &self.config, now);
        let outcome = decided.outcome.as_str().to_owned();
        let due_in = decided.due_in.as_secs_f64();
        let written = match &decided.fields {
            Fields::Status(status) => {
                let s = status.as_ref();
                let state = s.state.as_str().to_owned();
                let checks = s.checks_state.as_str().to_owned();
                tx.exec(
                    WRITE_STATUS,
                    &[
                        (id, Type::UUID),
                        (fence, Type::TIMESTAMPTZ),
                        (&outcome, Type::TEXT),
                        (&s.url, Type::TEXT),
                        (&s.pr_number.0, Type::INT8),
                        (&state, Type::TEXT),
                        (&s.title, Type::TEXT),
                        (&s.draft, Type::BOOL),
                        (&s.additions, Type::INT8),
                        (&s.deletions, Type::INT8),
                        (&s.changed_files, Type::INT8),
                        (&s.commits, Type::INT8),
                        (&s.approved, Type::BOOL),
                        (&s.changes_requested, Type::BOOL),
                        (&s.reviewer_count, Type::INT8),
                        (&checks, Type::TEXT),
                        (&s.author_login, Type::TEXT),
                        (&s.base_branch, Type::TEXT),
                        (&s.head_branch, Type::TEXT),
                        (&s.head_sha, Type::TEXT),
                        (&due_in, Type::FLOAT8),
                    ],
                )
                .await?
            }
            Fields::Cleared => {
                tx.exec(
                    WRITE_CLEARED,
                    &[
                        (id, Type::UUID),
                        (fence, Type::TIMESTAMPTZ),
                        (&outcome, Type::TEXT),
                        (&due_in, Type::FLOAT8),
                    ],
                )
                .await?
            }
            Fields::Kept { error } => {
                tx.exec(
                    WRITE_KEPT,
                    &[
                        (id, Type::UUID),
                        (fence, Type::TIMESTAMPTZ),
                        (&outcome, Type::TEXT),
                        (error, Type::TEXT),
                        (&due_in, Type::FLOAT8),
                    ],
                )
                .await?
            }
        };
        db::commit(tx).await?;
        Ok((written > 0).then_some(decided.outcome))
    }
}

/// The transaction's `now()` and what the row holds, from a [`STORED`] row.
fn stored(row: &Row) -> (DateTime<Utc>, Stored) {
    // Every PR field or none is written; a row with some unset shows no PR to compare with.
    let status = || {
        Some(PrStatus {
            url: row.get::<_, Option<String>>("url")?,
            pr_number: PrNumber(row.get::<_, Option<i64>>("pr_number")?),
            state: PrState::parse(row.get::<_, Option<&str>>("pull_request_state")?)?,
            title: row.get::<_, Option<String>>("title")?,
            draft: row.get::<_, Option<bool>>("draft")?,
            additions: row.get::<_, Option<i64>>("additions")?,
            deletions: row.get::<_, Option<i64>>("deletions")?,
            changed_files: row.get::<_, Option<i64>>("changed_files")?,
            commits: row.get::<_, Option<i64>>("commits")?,
            approved: row.get::<_, Option<bool>>("approved")?,
            changes_requested: row.get::<_, Option<bool>>("changes_requested")?,
            reviewer_count: row.get::<_, Option<i64>>("reviewer_count")?,
            checks_state: ChecksState::parse(row.get::<_, Option<&str>>("checks_state")?)?,
            author_login: row.get::<_, Option<String>>("author_login")?,
            base_branch: row.get::<_, Option<String>>("base_branch")?,
            head_branch: row.get::<_, Option<String>>("head_branch")?,
            head_sha: row.get::<_, Option<String>>("head_sha")?,
        })
    };
    (row.get(0), Stored { status: status(), has_error: row.get(2), marked_at: row.get(1) })
}

/// The row's PR: the stored number while its head is still the row's branch, else looked up
/// again by branch (`docs/gitsync.md`). `None`: the branch has no open PR. With the stored number
/// goes the stored head commit, so an unchanged PR costs one round trip.
async fn fetch<P: Provider>(
    call: &GroupCall<'_, P>,
    row: &Leased,
    timeout: Duration,
) -> Result<Option<PrStatus>, ProviderError> {
    let GroupCall { provider, origin, token, .. } = *call;
    if let Some(number) = row.pr_number {
        let known_head_sha = row.head_sha.as_deref();
        let status = provider.status(origin, PrNumber(number), known_head_sha, token, timeout).await?;
        if status.head_branch == row.branch {
            return Ok(Some(status));
        }
    }
    match provider.pull_request_by_branch(origin, &row.branch, token, timeout).await? {
        Some(number) => provider.status(origin, number, None, token, timeout).await.map(Some),
        None => Ok(None),
    }
}

impl<P: Provider + 'static> Loop for Gitsync<P> {
    type Error = GitsyncError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.config.base.schedule()
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, GitsyncError> {
        let report = self.refresh(tick).await?;
        tick.record_rows(report.leased);
        let full = report.leased >= self.config.batch_size as usize;
        Ok(if full { Progress::More } else { Progress::Done })
    }
}
