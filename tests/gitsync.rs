//! The gitsync loop against real PostgreSQL and a local fake GitHub (tests/gitsync_support),
//! driving `refresh`/`tick` directly: leasing, per-group tokens and rate limits, backoffs, the
//! fan-out bound, ticks that are cut short, two replicas, ETags and bad answers.

mod common;
mod gitsync_support;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::TestDb;
use common::metrics::MetricsProbe;
use gitsync_support::{Answer, Counts, FakeGitHub, RATE_LIMIT, fixture};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::audit::Actor;
use worker::config::{Concurrency, Config};
use worker::db::{Db, Exec};
use worker::gitsync::cli::{self, GitsyncCommand};
use worker::gitsync::{
    GitHub, GitHubOptions, Gitsync, GitsyncConfig, ProviderConfig, ProviderKind, RefreshOutcome,
    RefreshReport,
};
use worker::health::Health;
use worker::runtime::RuntimeConfig;
use worker::runtime::{Outcome, Runtime, Tick};

const WAIT: Duration = Duration::from_secs(10);

struct Harness {
    tdb: TestDb,
    fake: FakeGitHub,
    config: GitsyncConfig,
    pool_size: usize,
}

/// A row as the refresher left it; times relative to the database's `now()`.
#[derive(Debug)]
struct Row {
    outcome: Option<String>,
    last_error: Option<String>,
    stale_in_secs: f64,
    /// `stale_at - refreshed_at`, when refreshed.
    ttl_secs: Option<f64>,
    leased: bool,
    pr_number: Option<i64>,
    state: Option<String>,
    branch: String,
}

impl Harness {
    async fn new() -> Self {
        Self::with_pool_size(10).await
    }

    async fn with_pool_size(pool_size: usize) -> Self {
        let tdb = TestDb::with_pool_size(pool_size).await;
        let fake = FakeGitHub::start().await;
        let mut github = ProviderConfig::github_default();
        github.api_base_url = fake.base_url.clone();
        github.allow_insecure_http = true;
        let config = GitsyncConfig { providers: vec![github], ..GitsyncConfig::default() };
        Self { tdb, fake, config, pool_size }
    }

    fn db(&self) -> &Db {
        &self.tdb.db
    }

    /// The effective concurrency for this harness's pool, as the daemon computes it.
    fn concurrency(&self) -> usize {
        let mut config = Config::default();
        config.database.pool_size = self.pool_size;
        config.gitsync = self.config.clone();
        Concurrency::from_config(&config).gitsync
    }

    fn gitsync_on(&self, db: Db) -> Gitsync {
        let meter = opentelemetry::global::meter("gitsync-test");
        Gitsync::new(db, self.config.clone(), self.concurrency(), &meter).expect("gitsync")
    }

    fn gitsync_measured(&self, meter: &opentelemetry::metrics::Meter) -> Gitsync {
        Gitsync::new(self.db().clone(), self.config.clone(), self.concurrency(), meter).expect("gitsync")
    }

    fn gitsync(&self) -> Gitsync {
        self.gitsync_on(self.db().clone())
    }

    async fn refresh(&self, gitsync: &Gitsync) -> RefreshReport {
        gitsync.refresh(&Tick::detached(self.db())).await.expect("refresh")
    }

    /// A chat of `owner` whose diff status is marked for `origin` and `branch` (due now).
    async fn row(&self, owner: Uuid, origin: &str, branch: &str) -> Uuid {
        let chat: Uuid = self
            .db()
            .get()
            .await
            .expect("conn")
            .fetch_one("INSERT INTO chats (owner_id) VALUES ($1) RETURNING id", &[(&owner, Type::UUID)])
            .await
            .expect("chat")
            .get(0);
        self.mark(chat, origin, branch).await;
        chat
    }

    async fn mark(&self, chat: Uuid, origin: &str, branch: &str) {
        let (origin, branch) = (origin.to_owned(), branch.to_owned());
        self.db()
            .get()
            .await
            .expect("conn")
            .exec(
                "SELECT mark_diff_stale($1, $2, $3)",
                &[(&chat, Type::UUID), (&origin, Type::TEXT), (&branch, Type::TEXT)],
            )
            .await
            .expect("mark_diff_stale");
    }

    /// `owner`'s token for `provider`, expiring in `expires_in_secs` (None = never).
    async fn link(
        &self,
        owner: Uuid,
        provider: &str,
        token: &str,
        expires_in_secs: Option<f64>,
        refresh: Option<&str>,
    ) {
        let (provider, token, refresh) = (provider.to_owned(), token.to_owned(), refresh.map(str::to_owned));
        self.db()
            .get()
            .await
            .expect("conn")
            .exec(
                "INSERT INTO external_auth_links (user_id, provider_id, access_token, refresh_token, expires_at) \
                 VALUES ($1, $2, $3, $4, now() + make_interval(secs => $5))",
                &[
                    (&owner, Type::UUID),
                    (&provider, Type::TEXT),
                    (&token, Type::TEXT),
                    (&refresh, Type::TEXT),
                    (&expires_in_secs, Type::FLOAT8),
                ],
            )
            .await
            .expect("link");
    }

    /// An owner with a github.com token.
    async fn owner(&self) -> Uuid {
        let owner = Uuid::new_v4();
        self.link(owner, "github", &format!("tok-{owner}"), None, None).await;
        owner
    }

    async fn sql(&self, sql: &str) {
        self.db().get().await.expect("conn").exec(sql, &[]).await.expect(sql);
    }

    /// `columns` of the chat's diff status.
    async fn columns(&self, chat: Uuid, columns: &str) -> tokio_postgres::Row {
        let sql = format!("SELECT {columns} FROM chat_diff_statuses WHERE chat_id = $1");
        let conn = self.db().get().await.expect("conn");
        conn.fetch_one(&sql, &[(&chat, Type::UUID)]).await.expect("row")
    }

    async fn get(&self, chat: Uuid) -> Row {
        let r = self
            .columns(
                chat,
                "last_outcome, last_error, extract(epoch FROM stale_at - now())::float8, \
                 extract(epoch FROM stale_at - refreshed_at)::float8, leased_at IS NOT NULL, pr_number, \
                 pull_request_state, git_branch",
            )
            .await;
        Row {
            outcome: r.get(0),
            last_error: r.get(1),
            stale_in_secs: r.get(2),
            ttl_secs: r.get(3),
            leased: r.get(4),
            pr_number: r.get(5),
            state: r.get(6),
            branch: r.get(7),
        }
    }
}

/// Who the CLI calls of these tests are, in the audit trail.
fn actor() -> Actor {
    Actor::named("tests").expect("actor")
}

fn epoch_secs() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).expect("clock").as_secs()
}

fn near(actual: f64, want: f64) -> bool {
    (actual - want).abs() < 5.0
}

#[tokio::test]
async fn a_due_row_gets_its_branch_pr_and_is_due_again_one_ttl_after_the_refresh() {
    let h = Harness::new().await;
    h.fake.pr("octocat", "Hello-World", "new-topic", 1347);
    let owner = h.owner().await;
    let chat = h.row(owner, "git@github.com:octocat/Hello-World.git", "new-topic").await;

    let report = h.refresh(&h.gitsync()).await;
    assert_eq!((report.leased, report.count(RefreshOutcome::Ok)), (1, 1), "{report:?}");
    let row = h.get(chat).await;
    assert_eq!(row.outcome.as_deref(), Some("ok"));
    assert_eq!((row.pr_number, row.state.as_deref()), (Some(1347), Some("open")));
    assert_eq!(row.last_error, None);
    assert_eq!(row.ttl_secs, Some(120.0), "stale_at = refreshed_at + ttl");
    assert!(!row.leased);
    let stored = h
        .db()
        .get()
        .await
        .expect("conn")
        .fetch_one(
            "SELECT url, title, approved, reviewer_count, checks_state, author_login, head_sha \
             FROM chat_diff_statuses WHERE chat_id = $1",
            &[(&chat, Type::UUID)],
        )
        .await
        .expect("row");
    assert_eq!(stored.get::<_, String>(0), "https://github.com/octocat/Hello-World/pull/1347");
    assert_eq!(stored.get::<_, String>(1), "Amazing new feature");
    assert!(stored.get::<_, bool>(2));
    assert_eq!(stored.get::<_, i64>(3), 1);
    assert_eq!(stored.get::<_, String>(4), "success");
    assert_eq!(stored.get::<_, String>(5), "octocat");
    assert_eq!(stored.get::<_, String>(6), gitsync_support::HEAD_SHA);
    let seen = h.fake.seen();
    assert!(seen.iter().all(|s| s.authorization.as_deref() == Some(&*format!("Bearer tok-{owner}"))));

    assert_eq!(h.refresh(&h.gitsync()).await.leased, 0, "not due again before the ttl");
}

#[tokio::test]
async fn mark_diff_stale_on_another_branch_clears_the_pr_and_makes_the_row_due() {
    let h = Harness::new().await;
    h.fake.pr("o", "r", "a", 1);
    let owner = h.owner().await;
    let chat = h.row(owner, "https://github.com/o/r", "a").await;
    h.refresh(&h.gitsync()).await;
    assert_eq!(h.get(chat).await.pr_number, Some(1));

    h.mark(chat, "https://github.com/o/r", "a").await;
    let same = h.get(chat).await;
    assert_eq!((same.pr_number, same.outcome.as_deref()), (Some(1), Some("ok")), "same branch keeps the PR");
    assert!(same.stale_in_secs <= 0.0);

    h.mark(chat, "https://github.com/o/r", "b").await;
    let moved = h.get(chat).await;
    assert_eq!((moved.pr_number, moved.outcome, moved.branch.as_str()), (None, None, "b"));
    assert!(moved.stale_in_secs <= 0.0);
}

#[tokio::test]
async fn the_fan_out_holds_exactly_the_effective_concurrency_in_flight() {
    let h = Harness::with_pool_size(4).await;
    assert_eq!(h.concurrency(), 2, "pool_size 4 → 2");
    let mut chats = Vec::new();
    for i in 0..6 {
        let owner = h.owner().await;
        h.fake.pr(&format!("o{i}"), "r", "b", 1);
        chats.push(h.row(owner, &format!("https://github.com/o{i}/r"), "b").await);
    }
    let gate = h.fake.gate("/repos/");
    let gitsync = h.gitsync();
    let (report, ()) = tokio::join!(h.refresh(&gitsync), async {
        gate.wait_held(2, WAIT).await;
        // A window for an over-eager fan-out to send a third request; none may arrive.
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(gate.held(), 2, "more requests in flight than the effective concurrency");
        gate.open();
    });
    assert_eq!(gate.max_held(), 2);
    assert_eq!(report.count(RefreshOutcome::Ok), 6, "{report:?}");
}

fn primary_rate_limit() -> Answer {
    Answer::Raw {
        status: 403,
        headers: vec![
            ("x-ratelimit-limit", "5000".into()),
            ("x-ratelimit-remaining", "0".into()),
            ("x-ratelimit-reset", (epoch_secs() + 754).to_string()),
            ("content-type", "application/json".into()),
        ],
        body: r#"{"message":"API rate limit exceeded"}"#.into(),
    }
}

/// Three rows of one owner on `limited/r` and two of another owner on `good/r`.
async fn two_groups(h: &Harness) -> (Vec<Uuid>, Vec<Uuid>) {
    let (limited_owner, good_owner) = (h.owner().await, h.owner().await);
    let mut limited = Vec::new();
    let mut good = Vec::new();
    for (i, branch) in ["b1", "b2", "b3"].into_iter().enumerate() {
        h.fake.pr("limited", "r", branch, i as i64 + 1);
        limited.push(h.row(limited_owner, "git@github.com:limited/r.git", branch).await);
    }
    for (i, branch) in ["b1", "b2"].into_iter().enumerate() {
        h.fake.pr("good", "r", branch, i as i64 + 1);
        good.push(h.row(good_owner, "https://github.com/good/r", branch).await);
    }
    (limited, good)
}

#[tokio::test]
async fn a_primary_rate_limit_costs_its_group_one_call_and_waits_past_the_reset_while_others_refresh() {
    let h = Harness::new().await;
    let (limited, good) = two_groups(&h).await;
    let reset = epoch_secs() + 754;
    h.fake.answer("/repos/limited/", primary_rate_limit());

    let report = h.refresh(&h.gitsync()).await;
    assert_eq!(h.fake.requests_under("/repos/limited/"), 1, "one HTTP call for the rate-limited group");
    assert_eq!(report.rate_limited_groups, 1);
    assert_eq!(report.count(RefreshOutcome::RateLimited), 3, "{report:?}");
    for chat in limited {
        let row = h.get(chat).await;
        assert_eq!(row.outcome.as_deref(), Some("rate_limited"));
        let stale_at = epoch_secs() as f64 + row.stale_in_secs;
        assert!(stale_at >= reset as f64, "stale_at {stale_at} before the reset {reset}");
        assert!(row.last_error.as_deref().is_some_and(|e| e.contains("/repos/limited/r/pulls")), "{row:?}");
    }
    for chat in good {
        assert_eq!(h.get(chat).await.outcome.as_deref(), Some("ok"), "the other group carried on");
    }
}

#[tokio::test]
async fn a_429_with_retry_after_skips_the_rest_of_its_group_likewise() {
    let h = Harness::new().await;
    let (limited, good) = two_groups(&h).await;
    let headers = vec![("retry-after", "30".to_owned())];
    h.fake.answer("/repos/limited/", Answer::Raw { status: 429, headers, body: String::new() });

    let report = h.refresh(&h.gitsync()).await;
    assert_eq!(h.fake.requests_under("/repos/limited/"), 1);
    assert_eq!(report.rate_limited_groups, 1);
    for chat in limited {
        let row = h.get(chat).await;
        assert_eq!(row.outcome.as_deref(), Some("rate_limited"));
        assert!(near(row.stale_in_secs, 30.0 + 300.0), "retry-after + padding: {row:?}");
    }
    for chat in good {
        assert_eq!(h.get(chat).await.outcome.as_deref(), Some("ok"));
    }
}

#[tokio::test]
async fn a_403_without_rate_limit_headers_is_an_ordinary_error_for_each_row() {
    let h = Harness::new().await;
    let (limited, good) = two_groups(&h).await;
    let body = r#"{"message":"Resource not accessible by integration"}"#.to_owned();
    let headers = vec![("content-type", "application/json".to_owned())];
    h.fake.answer("/repos/limited/", Answer::Raw { status: 403, headers, body });

    let report = h.refresh(&h.gitsync()).await;
    assert_eq!(report.rate_limited_groups, 0);
    assert_eq!(h.fake.requests_under("/repos/limited/"), 3, "no row was skipped");
    for chat in limited {
        let row = h.get(chat).await;
        assert_eq!(row.outcome.as_deref(), Some("error"));
        let error = row.last_error.expect("last_error");
        assert!(error.contains("403") && error.contains("Resource not accessible"), "{error}");
        assert!(near(row.stale_in_secs, 120.0), "{}", row.stale_in_secs);
    }
    for chat in good {
        assert_eq!(h.get(chat).await.outcome.as_deref(), Some("ok"));
    }
}

#[tokio::test]
async fn an_owner_without_a_usable_token_backs_off_ten_minutes() {
    let h = Harness::new().await;
    h.fake.pr("o", "r", "b", 1);
    let origin = "https://github.com/o/r";
    let no_link = h.row(Uuid::new_v4(), origin, "b").await;
    let expired_owner = Uuid::new_v4();
    h.link(expired_owner, "github", "old", Some(-60.0), None).await;
    let expired = h.row(expired_owner, origin, "b").await;
    let refreshable_owner = Uuid::new_v4();
    h.link(refreshable_owner, "github", "tok-r", Some(-60.0), Some("refresh")).await;
    let refreshable = h.row(refreshable_owner, origin, "b").await;

    let report = h.refresh(&h.gitsync()).await;
    assert_eq!(report.count(RefreshOutcome::NoToken), 2, "{report:?}");
    for chat in [no_link, expired] {
        let row = h.get(chat).await;
        assert_eq!(row.outcome.as_deref(), Some("no_token"));
        assert!(near(row.stale_in_secs, 600.0), "{row:?}");
        assert!(row.last_error.as_deref().is_some_and(|e| e.contains("\"github\"")), "{row:?}");
    }
    assert_eq!(h.get(refreshable).await.outcome.as_deref(), Some("ok"), "a refresh token keeps it usable");
    assert!(h.fake.seen().iter().all(|s| s.authorization.as_deref() == Some("Bearer tok-r")));
}

#[tokio::test]
async fn a_token_is_only_taken_from_a_link_to_the_provider_serving_the_origins_host() {
    let mut h = Harness::new().await;
    let ghe = ProviderConfig {
        id: "ghe".into(),
        kind: ProviderKind::Github,
        api_base_url: h.fake.base_url.clone(),
        origin_host: "ghe.example.com".into(),
        allow_insecure_http: true,
    };
    h.config.providers.push(ghe);
    h.fake.pr("o", "r", "b", 1);
    let owner = Uuid::new_v4();
    h.link(owner, "ghe", "tok-ghe", None, None).await;
    let on_github = h.row(owner, "https://github.com/o/r", "b").await;
    let on_ghe = h.row(owner, "git@ghe.example.com:o/r.git", "b").await;
    let on_gitlab = h.row(owner, "https://gitlab.com/o/r", "b").await;

    h.refresh(&h.gitsync()).await;
    assert_eq!(h.get(on_github).await.outcome.as_deref(), Some("no_token"), "the ghe token is not github's");
    assert_eq!(h.get(on_ghe).await.outcome.as_deref(), Some("ok"));
    let gitlab = h.get(on_gitlab).await;
    assert_eq!(gitlab.outcome.as_deref(), Some("no_token"));
    assert!(gitlab.last_error.as_deref().is_some_and(|e| e.contains("gitlab.com")), "{gitlab:?}");
    assert!(near(gitlab.stale_in_secs, 600.0));
    let seen = h.fake.seen();
    assert!(!seen.is_empty() && seen.iter().all(|s| s.authorization.as_deref() == Some("Bearer tok-ghe")));
}

#[tokio::test]
async fn a_branch_without_a_pr_is_retried_in_15s_while_recently_marked_else_after_the_ttl() {
    let h = Harness::new().await;
    h.fake.pr("o", "r", "other", 1);
    let owner = h.owner().await;
    let chat = h.row(owner, "https://github.com/o/r", "no-pr-yet").await;

    let report = h.refresh(&h.gitsync()).await;
    assert_eq!(report.count(RefreshOutcome::NoPr), 1, "{report:?}");
    let row = h.get(chat).await;
    assert_eq!((row.outcome.as_deref(), row.pr_number), (Some("no_pr"), None));
    assert!(near(row.stale_in_secs, 15.0), "{row:?}");

    // The mark is now older than the ttl: the branch may never get a PR.
    h.sql("UPDATE chat_diff_statuses SET updated_at = now() - interval '5 minutes', stale_at = now()").await;
    h.refresh(&h.gitsync()).await;
    let row = h.get(chat).await;
    assert_eq!(row.outcome.as_deref(), Some("no_pr"));
    assert!(near(row.stale_in_secs, 120.0), "{row:?}");
}

#[tokio::test]
async fn a_provider_that_hangs_costs_its_rows_a_timeout_error_inside_the_tick_and_others_refresh() {
    let mut h = Harness::new().await;
    h.config.base.tick_timeout = Duration::from_secs(2);
    h.fake.pr("hang", "r", "b", 1);
    h.fake.pr("good", "r", "b", 1);
    let hanging = h.row(h.owner().await, "https://github.com/hang/r", "b").await;
    let good = h.row(h.owner().await, "https://github.com/good/r", "b").await;
    h.fake.answer("/repos/hang/", Answer::Hang);

    let meter = opentelemetry::global::meter("gitsync-test");
    let runtime = Runtime::new(h.db().clone(), Health::default(), &meter, RuntimeConfig::default());
    let report = runtime.runner(h.gitsync()).tick_once().await;
    assert_eq!(report.outcome, Outcome::Ok, "the request budget ends the hang inside the tick");
    let row = h.get(hanging).await;
    assert_eq!(row.outcome.as_deref(), Some("error"));
    assert!(row.last_error.as_deref().is_some_and(|e| e.contains("timed out") && e.contains("/repos/hang/")));
    assert_eq!(h.get(good).await.outcome.as_deref(), Some("ok"));
}

#[tokio::test]
async fn a_tick_cut_short_leaves_its_rows_leased_and_the_next_tick_refreshes_other_rows() {
    let h = Harness::new().await;
    h.fake.pr("hang", "r", "b1", 1);
    h.fake.pr("hang", "r", "b2", 2);
    let owner = h.owner().await;
    let held = [
        h.row(owner, "https://github.com/hang/r", "b1").await,
        h.row(owner, "https://github.com/hang/r", "b2").await,
    ];
    let gate = h.fake.gate("/repos/hang/");
    let gitsync = h.gitsync();
    {
        // The runner drops a tick at its timeout; dropping it here does the same.
        let tick = Tick::detached(h.db());
        let refresh = gitsync.refresh(&tick);
        tokio::select! {
            _ = refresh => panic!("the tick finished while its request was held"),
            () = gate.wait_held(1, WAIT) => {}
        }
    }
    for chat in held {
        let row = h.get(chat).await;
        assert!(row.leased && row.outcome.is_none(), "{row:?}");
        assert!(near(row.stale_in_secs, 300.0), "leased for the lease length, not lost: {row:?}");
    }

    h.fake.pr("good", "r", "b", 1);
    let good = h.row(h.owner().await, "https://github.com/good/r", "b").await;
    let report = h.refresh(&gitsync).await;
    assert_eq!(report.leased, 1, "only the other row is due: {report:?}");
    assert_eq!(h.get(good).await.outcome.as_deref(), Some("ok"));

    // Once the lease has run out the rows come back.
    gate.open();
    h.sql("UPDATE chat_diff_statuses SET stale_at = now() WHERE leased_at IS NOT NULL").await;
    let report = h.refresh(&gitsync).await;
    assert_eq!(report.count(RefreshOutcome::Ok), 2, "{report:?}");
}

#[tokio::test]
async fn two_workers_never_refresh_the_same_row_within_one_lease() {
    let h = Harness::new().await;
    let mut chats = Vec::new();
    for i in 0..6 {
        h.fake.pr(&format!("o{i}"), "r", "b", 1);
        chats.push(h.row(h.owner().await, &format!("https://github.com/o{i}/r"), "b").await);
    }
    let first = h.gitsync();
    let second = h.gitsync_on(h.tdb.another_pool());
    let gate = h.fake.gate("/repos/");
    let (first_report, second_report) = tokio::join!(h.refresh(&first), async {
        // The first worker holds its leased rows (its requests wait at the gate)...
        gate.wait_held(h.concurrency(), WAIT).await;
        // ...while the second ticks to the end.
        let report = h.refresh(&second).await;
        gate.open();
        report
    });
    assert_eq!(second_report.leased, 0, "the second worker claimed leased rows: {second_report:?}");
    assert_eq!((first_report.leased, first_report.count(RefreshOutcome::Ok)), (6, 6), "{first_report:?}");
    for i in 0..6 {
        let lookups = h
            .fake
            .seen()
            .iter()
            .filter(|s| s.path_and_query.starts_with(&format!("/repos/o{i}/r/pulls?")))
            .count();
        assert_eq!(lookups, 1, "row {i} was refreshed more than once");
    }
}

#[tokio::test]
async fn a_row_re_marked_during_its_refresh_keeps_the_new_mark() {
    let h = Harness::new().await;
    h.fake.pr("o", "r", "old", 1);
    let chat = h.row(h.owner().await, "https://github.com/o/r", "old").await;
    let gate = h.fake.gate("/repos/");
    let gitsync = h.gitsync();
    let (report, ()) = tokio::join!(h.refresh(&gitsync), async {
        gate.wait_held(1, WAIT).await;
        h.mark(chat, "https://github.com/o/r", "new").await;
        gate.open();
    });
    assert_eq!(report.fenced, 1, "{report:?}");
    let row = h.get(chat).await;
    assert_eq!((row.branch.as_str(), row.pr_number, row.outcome.as_deref()), ("new", None, None));
    assert!(row.stale_in_secs <= 0.0, "still due for the next tick: {row:?}");
}

// ---------------------------------------------------------------------------------------------
// Steady state: the PR, its reviews and its stored head's checks at once, revalidated by ETag.

/// The PR fields the steady-state tests look at.
#[derive(Debug, PartialEq, Eq)]
struct Verdict {
    title: String,
    approved: bool,
    changes_requested: bool,
    checks: String,
    head_sha: String,
}

impl Harness {
    async fn verdict(&self, chat: Uuid) -> Verdict {
        let r = self.columns(chat, "title, approved, changes_requested, checks_state, head_sha").await;
        Verdict {
            title: r.get(0),
            approved: r.get(1),
            changes_requested: r.get(2),
            checks: r.get(3),
            head_sha: r.get(4),
        }
    }

    /// Refreshes every row again, now.
    async fn refresh_again(&self, gitsync: &Gitsync) -> RefreshReport {
        self.sql("UPDATE chat_diff_statuses SET stale_at = now()").await;
        self.refresh(gitsync).await
    }
}

/// What the fixtures derive to.
fn fixture_verdict() -> Verdict {
    Verdict {
        title: "Amazing new feature".into(),
        approved: true,
        changes_requested: false,
        checks: "success".into(),
        head_sha: gitsync_support::HEAD_SHA.into(),
    }
}

fn changes_requested() -> String {
    let mut reviews: serde_json::Value =
        serde_json::from_str(&fixture("pull-request-review-items.json")).expect("fixture");
    reviews[0]["state"] = "CHANGES_REQUESTED".into();
    reviews.to_string()
}

fn failed_checks() -> String {
    let mut checks: serde_json::Value =
        serde_json::from_str(&fixture("check-run-paginated.json")).expect("fixture");
    checks["check_runs"][0]["conclusion"] = "failure".into();
    checks.to_string()
}

/// `repo`: `/repos/{owner}/{repo}`.
fn checks_path(repo: &str, sha: &str) -> String {
    format!("{repo}/commits/{sha}/check-runs")
}

/// (path, status, If-None-Match sent) of the requests from `from` on, sorted by path.
fn requests_since(fake: &FakeGitHub, from: usize) -> Vec<(String, u16, bool)> {
    let mut seen: Vec<_> =
        fake.seen()[from..].iter().map(|s| (s.path.clone(), s.status, s.if_none_match.is_some())).collect();
    seen.sort();
    seen
}

#[tokio::test]
async fn an_unchanged_row_costs_one_round_trip_and_no_counted_request() {
    let h = Harness::new().await;
    h.fake.pr("octocat", "Hello-World", "new-topic", 1347);
    let chat = h.row(h.owner().await, "https://github.com/octocat/Hello-World", "new-topic").await;
    let gitsync = h.gitsync();
    h.refresh(&gitsync).await;
    assert!(h.fake.seen().iter().all(|s| s.if_none_match.is_none() && s.status == 200));
    assert_eq!(h.fake.counts().counted, 4, "first refresh: lookup, PR, reviews, checks");
    assert_eq!(h.verdict(chat).await, fixture_verdict());

    let (first, before) = (h.fake.seen().len(), h.fake.counts());
    // Held until all three are in flight: sent one after the other, they never would be.
    let gate = h.fake.gate("/repos/");
    h.sql("UPDATE chat_diff_statuses SET stale_at = now()").await;
    let (report, ()) = tokio::join!(h.refresh(&gitsync), async {
        gate.wait_held(3, WAIT).await;
        gate.open();
    });
    assert_eq!(report.count(RefreshOutcome::NotModified), 1, "{report:?}");
    assert_eq!(gate.max_held(), 3);
    let repo = "/repos/octocat/Hello-World";
    assert_eq!(
        requests_since(&h.fake, first),
        vec![
            (checks_path(repo, gitsync_support::HEAD_SHA), 304, true),
            (format!("{repo}/pulls/1347"), 304, true),
            (format!("{repo}/pulls/1347/reviews"), 304, true),
        ],
        "one round trip: the stored PR number and head commit, each revalidated"
    );
    assert_eq!(h.fake.counts() - before, Counts { counted: 0, not_modified: 3 });
    assert_eq!(h.get(chat).await.outcome.as_deref(), Some("not_modified"));
    assert_eq!(h.verdict(chat).await, fixture_verdict(), "the cached bodies, derived again");
}

#[tokio::test]
async fn each_call_answered_304_alone_reuses_its_cached_body_beside_fresh_answers() {
    let h = Harness::new().await;
    let owner = h.owner().await;
    // Repository `keep-{call}/r`: only that call's answer stays the same.
    let calls = ["pr", "reviews", "checks"];
    let mut chats = Vec::new();
    for call in calls {
        h.fake.pr(&format!("keep-{call}"), "r", "b", 1);
        chats.push(h.row(owner, &format!("https://github.com/keep-{call}/r"), "b").await);
    }
    let gitsync = h.gitsync();
    assert_eq!(h.refresh(&gitsync).await.count(RefreshOutcome::Ok), 3);

    let sha = gitsync_support::HEAD_SHA;
    for call in calls {
        let repo = format!("/repos/keep-{call}/r");
        if call != "pr" {
            let mut pr: serde_json::Value = serde_json::from_str(&gitsync_support::pull_request(
                &format!("keep-{call}"),
                "r",
                1,
                "b",
                sha,
            ))
            .expect("pr");
            pr["title"] = "Renamed".into();
            h.fake.json(&format!("{repo}/pulls/1"), pr.to_string());
        }
        if call != "reviews" {
            h.fake.json(&format!("{repo}/pulls/1/reviews"), changes_requested());
        }
        if call != "checks" {
            h.fake.json(&checks_path(&repo, sha), failed_checks());
        }
    }
    let (first, before) = (h.fake.seen().len(), h.fake.counts());
    assert_eq!(h.refresh_again(&gitsync).await.count(RefreshOutcome::Ok), 3);
    assert_eq!(h.fake.counts() - before, Counts { counted: 6, not_modified: 3 });

    let seen = h.fake.seen()[first..].to_vec();
    for (call, chat) in calls.into_iter().zip(chats) {
        let repo = format!("/repos/keep-{call}/r");
        let path = match call {
            "pr" => format!("{repo}/pulls/1"),
            "reviews" => format!("{repo}/pulls/1/reviews"),
            _ => checks_path(&repo, sha),
        };
        for request in seen.iter().filter(|s| s.path.starts_with(&format!("{repo}/"))) {
            assert!(request.if_none_match.is_some(), "{request:?}");
            let want = if request.path == path { 304 } else { 200 };
            assert_eq!(request.status, want, "{call}: {request:?}");
        }
        let verdict = h.verdict(chat).await;
        let want = Verdict {
            title: if call == "pr" { "Amazing new feature" } else { "Renamed" }.into(),
            approved: call == "reviews",
            changes_requested: call != "reviews",
            checks: if call == "checks" { "success" } else { "failure" }.into(),
            head_sha: sha.into(),
        };
        assert_eq!(verdict, want, "{call}");
    }
}

#[tokio::test]
async fn a_moved_head_fetches_the_new_commits_checks_and_stores_their_verdict() {
    let h = Harness::new().await;
    h.fake.pr("o", "r", "b", 1);
    let chat = h.row(h.owner().await, "https://github.com/o/r", "b").await;
    let gitsync = h.gitsync();
    h.refresh(&gitsync).await;
    assert_eq!(h.verdict(chat).await.head_sha, gitsync_support::HEAD_SHA);

    let moved = "0123456789abcdef0123456789abcdef01234567";
    h.fake.push("o", "r", "b", moved);
    h.fake.json(&checks_path("/repos/o/r", moved), failed_checks());
    let (first, before) = (h.fake.seen().len(), h.fake.counts());
    assert_eq!(h.refresh_again(&gitsync).await.count(RefreshOutcome::Ok), 1);
    let seen = h.fake.seen()[first..].to_vec();
    assert_eq!(
        requests_since(&h.fake, first),
        vec![
            (checks_path("/repos/o/r", moved), 200, false),
            (checks_path("/repos/o/r", gitsync_support::HEAD_SHA), 304, true),
            ("/repos/o/r/pulls/1".into(), 200, true),
            ("/repos/o/r/pulls/1/reviews".into(), 304, true),
        ]
    );
    // The new commit's checks were asked for only once the PR had named it: a second round trip.
    let pr_answered = seen.iter().find(|s| s.path == "/repos/o/r/pulls/1").expect("pr").answered;
    let new_checks = seen.iter().find(|s| s.path.contains(moved)).expect("new checks");
    assert!(new_checks.arrived >= pr_answered, "{seen:?}");
    assert_eq!(h.fake.counts() - before, Counts { counted: 2, not_modified: 2 });
    let verdict = h.verdict(chat).await;
    assert_eq!((verdict.head_sha.as_str(), verdict.checks.as_str()), (moved, "failure"));

    // And the moved head is the one revalidated from then on.
    let first = h.fake.seen().len();
    assert_eq!(h.refresh_again(&gitsync).await.count(RefreshOutcome::NotModified), 1);
    let again = requests_since(&h.fake, first);
    assert_eq!(again.len(), 3, "{again:?}");
    assert!(again.iter().all(|(_, status, _)| *status == 304), "{again:?}");
    assert_eq!(again[0].0, checks_path("/repos/o/r", moved));
}

#[tokio::test]
async fn a_branch_without_a_pr_is_looked_up_again_with_its_etag() {
    let h = Harness::new().await;
    h.fake.pr("o", "r", "other", 1);
    let chat = h.row(h.owner().await, "https://github.com/o/r", "b").await;
    let gitsync = h.gitsync();
    assert_eq!(h.refresh(&gitsync).await.count(RefreshOutcome::NoPr), 1);
    assert_eq!(h.fake.counts(), Counts { counted: 1, not_modified: 0 });

    assert_eq!(h.refresh_again(&gitsync).await.count(RefreshOutcome::NoPr), 1);
    assert_eq!(h.fake.counts(), Counts { counted: 1, not_modified: 1 });
    assert_eq!(requests_since(&h.fake, 1), vec![("/repos/o/r/pulls".into(), 304, true)]);

    // The branch gets a PR: the lookup's answer changes, and the PR is found.
    h.fake.pr("o", "r", "b", 2);
    assert_eq!(h.refresh_again(&gitsync).await.count(RefreshOutcome::Ok), 1);
    assert_eq!(h.get(chat).await.pr_number, Some(2));
}

#[tokio::test]
async fn an_etag_cache_too_small_for_the_pr_still_answers_right_by_fetching_it_again() {
    let h = Harness::new().await;
    h.fake.pr("octocat", "Hello-World", "new-topic", 1347);
    let chat = h.row(h.owner().await, "https://github.com/octocat/Hello-World", "new-topic").await;
    // Room for the reviews and the checks (~5 KB), not for the PR (~20 KB).
    let options = GitHubOptions { etag_cache_bytes: 10_000, ..GitHubOptions::default() };
    let provider = h.config.providers[0].clone();
    let github = GitHub::new(&provider, options).expect("client");
    let meter = opentelemetry::global::meter("gitsync-test");
    let gitsync = Gitsync::with_providers(
        h.db().clone(),
        h.config.clone(),
        h.concurrency(),
        &meter,
        vec![(provider, github)],
    );
    h.refresh(&gitsync).await;
    assert_eq!(
        gitsync.providers()[0].1.cached_responses(),
        2,
        "the reviews and checks; neither the lookup nor the PR fits"
    );

    let before = h.fake.counts();
    assert_eq!(h.refresh_again(&gitsync).await.count(RefreshOutcome::NotModified), 1);
    assert_eq!(h.fake.counts() - before, Counts { counted: 1, not_modified: 2 }, "the PR costs a 200");
    assert_eq!(h.verdict(chat).await, fixture_verdict());
}

#[tokio::test]
async fn bad_answers_are_recorded_per_row_and_the_tick_still_succeeds() {
    let mut h = Harness::new().await;
    h.config.max_body_bytes = 64 * 1024;
    let mut rows = Vec::new();
    for repo in ["html", "e500", "cut", "big", "good"] {
        h.fake.pr(repo, "r", "b", 1);
        rows.push(h.row(h.owner().await, &format!("https://github.com/{repo}/r"), "b").await);
    }
    let json = || vec![("content-type", "application/json".to_owned())];
    let html = vec![("content-type", "text/html; charset=utf-8".to_owned())];
    h.fake.answer(
        "/repos/html/",
        Answer::Raw { status: 200, headers: html, body: "<html>Unicorn!</html>".into() },
    );
    h.fake.answer("/repos/e500/", Answer::Raw { status: 500, headers: json(), body: "{}".into() });
    let full = fixture("pull-request-simple-items.json");
    h.fake.answer(
        "/repos/cut/",
        Answer::Raw { status: 200, headers: json(), body: full[..full.len() / 2].into() },
    );
    let big = format!("[{{\"padding\": \"{}\"}}]", "x".repeat(100 * 1024));
    h.fake.answer("/repos/big/", Answer::Raw { status: 200, headers: json(), body: big });

    let meter = opentelemetry::global::meter("gitsync-test");
    let runtime = Runtime::new(h.db().clone(), Health::default(), &meter, RuntimeConfig::default());
    assert_eq!(runtime.runner(h.gitsync()).tick_once().await.outcome, Outcome::Ok);
    let wants = ["text/html", "HTTP 500", "EOF", "65536-byte limit"];
    for ((chat, repo), want) in rows.iter().zip(["html", "e500", "cut", "big"]).zip(wants) {
        let row = h.get(*chat).await;
        assert_eq!(row.outcome.as_deref(), Some("error"), "{repo}: {row:?}");
        let error = row.last_error.unwrap_or_default();
        assert!(error.contains(want) && error.contains(&format!("/repos/{repo}/r/pulls")), "{repo}: {error}");
    }
    assert_eq!(h.get(rows[4]).await.outcome.as_deref(), Some("ok"));
}

#[tokio::test]
async fn gitsync_stats_counts_rows_by_state_and_refresh_marks_one_due() {
    let h = Harness::new().await;
    h.fake.pr("o", "r", "b", 1);
    let owner = h.owner().await;
    let refreshed = h.row(owner, "https://github.com/o/r", "b").await;
    h.refresh(&h.gitsync()).await;
    let _due = h.row(owner, "https://github.com/o/r", "c").await;
    let leased = h.row(owner, "https://github.com/o/r", "d").await;
    h.sql(&format!(
        "UPDATE chat_diff_statuses SET stale_at = now() + interval '5 minutes', leased_at = now() WHERE chat_id = '{leased}'"
    ))
    .await;
    h.sql("UPDATE chat_diff_statuses SET stale_at = now() - interval '90 seconds' WHERE git_branch = 'c'")
        .await;

    let stats = cli::stats(h.db()).await.expect("stats");
    assert_eq!((stats.rows, stats.due, stats.leased), (3, 1, 1), "{stats:?}");
    assert!(near(stats.oldest_due_secs, 90.0), "{stats:?}");
    assert_eq!(stats.by_outcome.get("ok"), Some(&1));
    assert_eq!(stats.by_outcome.get("never"), Some(&2));
    let mut out = Vec::new();
    cli::run(
        h.db(),
        &actor(),
        &h.config,
        &GitsyncCommand::Stats { json: true },
        &mut std::io::empty(),
        &mut out,
    )
    .await
    .expect("stats --json");
    let json: serde_json::Value = serde_json::from_slice(&out).expect("json");
    assert_eq!(json["due"], 1);

    let mut out = Vec::new();
    cli::run(
        h.db(),
        &actor(),
        &h.config,
        &GitsyncCommand::Refresh { chat_id: refreshed },
        &mut std::io::empty(),
        &mut out,
    )
    .await
    .expect("refresh");
    assert!(h.get(refreshed).await.stale_in_secs <= 0.0);
    assert_eq!(cli::stats(h.db()).await.expect("stats").due, 2);
    let unknown = Uuid::new_v4();
    let err = cli::run(
        h.db(),
        &actor(),
        &h.config,
        &GitsyncCommand::Refresh { chat_id: unknown },
        &mut std::io::empty(),
        &mut Vec::new(),
    )
    .await;
    assert!(err.is_err_and(|e| e.to_string().contains(&unknown.to_string())));
}

#[tokio::test]
async fn a_status_the_database_refuses_by_value_is_recorded_as_the_rows_error_not_left_leased() {
    let h = Harness::new().await;
    h.fake.pr("octocat", "Hello-World", "new-topic", 1347);
    let owner = h.owner().await;
    let chat = h.row(owner, "git@github.com:octocat/Hello-World.git", "new-topic").await;
    // Every successful status write refused as a value (as a NUL in a title would be).
    h.sql(
        "CREATE FUNCTION refuse_ok() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.last_outcome = 'ok' THEN RAISE EXCEPTION 'title not storable' USING ERRCODE = '22021'; END IF; \
           RETURN NEW; END $$",
    )
    .await;
    h.sql("CREATE TRIGGER refuse_ok BEFORE UPDATE ON chat_diff_statuses FOR EACH ROW EXECUTE FUNCTION refuse_ok()")
        .await;

    let report = h.refresh(&h.gitsync()).await;
    assert_eq!(report.count(RefreshOutcome::Error), 1, "{report:?}");
    let row = h.get(chat).await;
    assert_eq!(row.outcome.as_deref(), Some("error"));
    let error = row.last_error.clone().expect("last_error");
    assert!(error.contains("cannot be stored") && error.contains("title not storable"), "{error}");
    assert!(!row.leased, "settled, not left leased until the lease runs out");
    assert!(
        (row.stale_in_secs - 120.0).abs() < 5.0,
        "due again one ttl later, like any other error: {row:?}"
    );
}

/// The labels the refresher writes are exactly those the `last_outcome` CHECK admits, read from
/// the schema itself: a label added on one side only fails here, not at the first write.
#[tokio::test]
async fn outcome_labels_match_the_check_constraint() {
    let tdb = TestDb::new().await;
    let conn = tdb.db.get().await.expect("connection");
    let row = conn
        .fetch_one(
            "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
             WHERE conrelid = 'chat_diff_statuses'::regclass AND contype = 'c' \
               AND pg_get_constraintdef(oid) LIKE '%last_outcome%'",
            &[],
        )
        .await
        .expect("the CHECK on last_outcome");
    let definition: String = row.get(0);
    // e.g. CHECK ((last_outcome = ANY (ARRAY['ok'::text, 'not_modified'::text, …])))
    let mut allowed: Vec<&str> = definition.split('\'').skip(1).step_by(2).collect();
    allowed.sort_unstable();
    let mut written: Vec<&str> = RefreshOutcome::ALL.iter().map(|o| o.as_str()).collect();
    written.sort_unstable();
    assert!(!allowed.is_empty(), "no labels found in {definition}");
    assert_eq!(written, allowed, "RefreshOutcome::ALL against {definition}");
}

#[tokio::test]
async fn due_rows_and_the_oldest_due_age_are_counted_per_provider_after_each_lease() {
    let mut h = Harness::new().await;
    let mut ghe = ProviderConfig::github_default();
    ghe.id = "ghe".into();
    ghe.origin_host = "GHE.example.com".into();
    ghe.api_base_url = h.fake.base_url.clone();
    ghe.allow_insecure_http = true;
    h.config.providers.push(ghe);
    h.config.batch_size = 1;
    let metrics = MetricsProbe::new();
    let gitsync = h.gitsync_measured(&metrics.meter());
    // Owners without tokens: a leased row is settled as no_token, without an HTTP call.
    let owner = Uuid::new_v4();
    let due = async |origin: &str, due_secs: i64| {
        let chat = h.row(owner, origin, "b").await;
        h.sql(&format!(
            "UPDATE chat_diff_statuses SET stale_at = now() - interval '{due_secs} seconds' WHERE chat_id = '{chat}'"
        ))
        .await;
        chat
    };
    due("git@gitlab.com:o/r.git", 600).await; // the oldest: leased by the first tick
    due("https://github.com/o/r", 300).await;
    due("git@github.com:o/r.git", 200).await;
    due("ssh://git@GitHub.com:2222/o/r.git", 10).await;
    due("https://x-access-token:s3cret@github.com/o/r.git", 10).await;
    due("https://ghe.example.com:8443/o/r", 100).await;
    due("gitlab.com:x/y", 50).await;
    let archived = due("https://github.com/o/archived", 900).await;
    h.sql(&format!("UPDATE chats SET archived = true WHERE id = '{archived}'")).await;
    let later = due("https://github.com/o/later", 0).await;
    h.sql(&format!(
        "UPDATE chat_diff_statuses SET stale_at = now() + interval '1 hour' WHERE chat_id = '{later}'"
    ))
    .await;
    assert!(metrics.gauge_points("gitsync.due").await.is_empty(), "nothing before the first lease");

    let gauges = async || {
        let mut found = Vec::new();
        for provider in ["github", "ghe", "none"] {
            let rows = metrics.gauge_at("gitsync.due", &[("provider", provider)]).await.expect(provider);
            let age =
                metrics.gauge_at("gitsync.due.oldest_age", &[("provider", provider)]).await.expect(provider);
            found.push((provider, rows, age));
        }
        assert_eq!(
            metrics.gauge_points("gitsync.due").await.len(),
            3,
            "each provider and none, nothing else"
        );
        found
    };
    let near_age = |(_, _, age): (&str, f64, f64), want: f64| (want..want + 30.0).contains(&age);

    assert_eq!(h.refresh(&gitsync).await.leased, 1);
    let [github, ghe, none] = <[_; 3]>::try_from(gauges().await).expect("three");
    assert_eq!((github.1, ghe.1, none.1), (4.0, 1.0, 1.0), "{github:?} {ghe:?} {none:?}");
    assert!(
        near_age(github, 300.0) && near_age(ghe, 100.0) && near_age(none, 50.0),
        "{github:?} {ghe:?} {none:?}"
    );

    // The next tick leases the oldest github row: the count and the oldest age move on.
    assert_eq!(h.refresh(&gitsync).await.leased, 1);
    let [github, ..] = <[_; 3]>::try_from(gauges().await).expect("three");
    assert_eq!(github.1, 3.0);
    assert!(near_age(github, 200.0), "{github:?}");

    // Nothing due for a provider: observed as 0, not left out.
    h.sql("UPDATE chat_diff_statuses SET stale_at = now() + interval '1 hour'").await;
    assert_eq!(h.refresh(&gitsync).await.leased, 0);
    for (provider, rows, age) in gauges().await {
        assert_eq!((rows, age), (0.0, 0.0), "{provider}");
    }
}

#[tokio::test]
async fn the_rate_limit_gauges_show_what_the_last_response_reported() {
    let h = Harness::new().await;
    let metrics = MetricsProbe::new();
    let gitsync = h.gitsync_measured(&metrics.meter());
    assert!(
        metrics.gauge_points("gitsync.rate_limit.remaining").await.is_empty(),
        "nothing before a response"
    );

    assert_eq!(h.fake.rate_limit().0, RATE_LIMIT, "a fresh window");
    let reset = epoch_secs() + 754;
    h.fake.set_rate_limit(4321, reset);
    h.fake.pr("octocat", "Hello-World", "new-topic", 1347);
    h.row(h.owner().await, "https://github.com/octocat/Hello-World", "new-topic").await;
    assert_eq!(h.refresh(&gitsync).await.count(RefreshOutcome::Ok), 1);
    let requests = h.fake.seen().len() as u64;
    assert_eq!(h.fake.rate_limit().0, 4321 - requests, "the fake counts its answers down");
    let remaining = metrics.gauge_at("gitsync.rate_limit.remaining", &[("provider", "github")]).await;
    assert_eq!(remaining, Some((4321 - requests) as f64));
    let reset_in =
        metrics.gauge_at("gitsync.rate_limit.reset", &[("provider", "github")]).await.expect("reset");
    assert!((740.0..=754.0).contains(&reset_in), "seconds until the reset: {reset_in}");

    // A primary rate limit: remaining 0, and when it resets.
    let limited = h.owner().await;
    h.fake.pr("limited", "r", "b1", 1);
    h.row(limited, "git@github.com:limited/r.git", "b1").await;
    h.fake.answer("/repos/limited/", primary_rate_limit());
    h.refresh(&gitsync).await;
    assert_eq!(metrics.gauge_at("gitsync.rate_limit.remaining", &[("provider", "github")]).await, Some(0.0));
    let reset_in =
        metrics.gauge_at("gitsync.rate_limit.reset", &[("provider", "github")]).await.expect("reset");
    assert!((740.0..=754.0).contains(&reset_in), "{reset_in}");
    assert_eq!(metrics.gauge_points("gitsync.rate_limit.reset").await.len(), 1, "one series per provider");
}
