//! Gitsync benchmark (target in BENCHMARKS.md#targets): one tick over 50 due rows against a fake
//! provider answering each call after 200 ms, at the effective concurrency (10) versus sequentially
//! (1), in the same run against the real PostgreSQL; the same through the real GitHub client; and
//! the HTTP calls a rate-limited group of 10 rows costs.
//!
//! Two fakes:
//! - a [`Provider`] whose every call (`status`, `pull_request_by_branch`) takes 200 ms: the
//!   target's "fake provider with 200 ms latency"; rows that know their PR cost one call each;
//! - the local fake GitHub of the tests (tests/gitsync_support) with 200 ms per HTTP request,
//!   through the real client. Each row's requests are told apart by path (row `n`: branch `b{n}`,
//!   PR `n`, head commit `n` in hex) and grouped into round trips (requests sent before an earlier
//!   one of the row was answered share its round trip); "counted" requests are the fake's
//!   answers other than 304, as GitHub's primary rate limit counts them. Rows: PR number known
//!   but no head commit (rows written before head commits were used), first refresh, steady
//!   state (same client: every answer a 304) and steady state with a cold ETag cache; then the
//!   counted requests per unchanged row per hour at the default `ttl`.
//!
//! `cargo bench --bench gitsync -- [--rows N] [--latency-ms N]`; `scripts/bench.sh gitsync`
//! runs it and prints the machine it ran on.

mod common;
#[path = "../tests/gitsync_support/mod.rs"]
mod gitsync_support;

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::{BenchDb, table};
use gitsync_support::{Answer, FakeGitHub, Seen};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::Exec;
use worker::gitsync::{
    ChecksState, Gitsync, GitsyncConfig, Origin, PrNumber, PrState, PrStatus, Provider, ProviderConfig,
    ProviderError, RefreshOutcome, RefreshReport,
};
use worker::runtime::Tick;

struct Args {
    rows: usize,
    latency: Duration,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Args { rows: 50, latency: Duration::from_millis(200) };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--rows" => args.rows = value()?.parse()?,
                "--latency-ms" => args.latency = Duration::from_millis(value()?.parse()?),
                _ => {} // cargo bench passes --bench
            }
        }
        Ok(args)
    }
}

/// A provider whose every call takes `latency`; branch `b{n}` has PR `n`. `rate_limited`
/// answers every call with a rate limit instead.
struct SlowProvider {
    latency: Duration,
    rate_limited: bool,
    calls: AtomicU64,
}

impl SlowProvider {
    async fn call(&self, url: String) -> Result<(), ProviderError> {
        self.calls.fetch_add(1, Ordering::Relaxed);
        tokio::time::sleep(self.latency).await;
        if self.rate_limited {
            return Err(ProviderError::RateLimited { url, wait: Duration::from_secs(60) });
        }
        Ok(())
    }
}

impl Provider for SlowProvider {
    async fn pull_request_by_branch(
        &self,
        origin: &Origin,
        branch: &str,
        _token: &str,
        _timeout: Duration,
    ) -> Result<Option<PrNumber>, ProviderError> {
        self.call(format!("fake://{origin}/pulls?head={branch}")).await?;
        Ok(branch.strip_prefix('b').and_then(|n| n.parse().ok()).map(PrNumber))
    }

    async fn status(
        &self,
        origin: &Origin,
        pr_number: PrNumber,
        _known_head_sha: Option<&str>,
        _token: &str,
        _timeout: Duration,
    ) -> Result<PrStatus, ProviderError> {
        self.call(format!("fake://{origin}/pulls/{pr_number}")).await?;
        Ok(PrStatus {
            pr_number,
            url: format!("https://{}/{}/{}/pull/{pr_number}", origin.host, origin.owner, origin.repo),
            state: PrState::Open,
            title: "benchmark".into(),
            draft: false,
            additions: 1,
            deletions: 1,
            changed_files: 1,
            commits: 1,
            approved: false,
            changes_requested: false,
            reviewer_count: 0,
            checks_state: ChecksState::Success,
            author_login: "octocat".into(),
            base_branch: "main".into(),
            head_branch: format!("b{pr_number}"),
            head_sha: "0".repeat(40),
        })
    }
}

fn config(concurrency: usize) -> GitsyncConfig {
    GitsyncConfig { concurrency, ..GitsyncConfig::default() }
}

/// `rows` rows of `owners` owners (one origin each, `o{owner}/r`), branch `b{n}` with PR `n`
/// already known when `known_pr`. Each owner has a github token.
async fn seed(bench: &BenchDb, rows: usize, owners: usize, known_pr: bool) -> anyhow::Result<()> {
    let direct = bench.direct().await?;
    direct.batch_execute("TRUNCATE chats CASCADE; TRUNCATE external_auth_links").await?;
    let owner_ids: Vec<Uuid> = (0..owners).map(|_| Uuid::new_v4()).collect();
    for owner in &owner_ids {
        direct
            .exec(
                "INSERT INTO external_auth_links (user_id, provider_id, access_token) VALUES ($1, 'github', 'tok')",
                &[(owner, Type::UUID)],
            )
            .await?;
    }
    for n in 1..=rows {
        let owner_index = (n - 1) % owners;
        let owner = owner_ids[owner_index];
        let origin = format!("https://github.com/o{owner_index}/r");
        let branch = format!("b{n}");
        let pr = known_pr.then_some(n as i64);
        direct
            .exec(
                "WITH c AS (INSERT INTO chats (owner_id) VALUES ($1) RETURNING id) \
                 INSERT INTO chat_diff_statuses (chat_id, git_remote_origin, git_branch, pr_number) \
                 SELECT id, $2, $3, $4 FROM c",
                &[(&owner, Type::UUID), (&origin, Type::TEXT), (&branch, Type::TEXT), (&pr, Type::INT8)],
            )
            .await?;
    }
    Ok(())
}

async fn timed<P: Provider>(
    bench: &BenchDb,
    gitsync: &Gitsync<P>,
) -> anyhow::Result<(Duration, RefreshReport)> {
    let tick = Tick::detached(&bench.db);
    let started = Instant::now();
    let report = gitsync.refresh(&tick).await?;
    Ok((started.elapsed(), report))
}

fn slow(latency: Duration, rate_limited: bool) -> Vec<(ProviderConfig, SlowProvider)> {
    vec![(ProviderConfig::github_default(), SlowProvider { latency, rate_limited, calls: AtomicU64::new(0) })]
}

fn refreshed(report: &RefreshReport) -> usize {
    report.count(RefreshOutcome::Ok) + report.count(RefreshOutcome::NotModified)
}

async fn fan_out(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let meter = opentelemetry::global::meter("bench");
    let mut results = Vec::new();
    let variants: [(&str, usize, usize, bool); 5] = [
        ("concurrent, 10 owners, PRs known (1 call per row)", 10, 10, true),
        ("concurrent, 1 owner, PRs known (1 call per row)", 10, 1, true),
        ("sequential baseline, 10 owners, PRs known (1 call per row)", 1, 10, true),
        ("concurrent, 10 owners, first refresh (lookup + status: 2 calls per row)", 10, 10, false),
        ("sequential baseline, 10 owners, first refresh (2 calls per row)", 1, 10, false),
    ];
    // The sequential baseline of each kind (PRs known / first refresh).
    let mut sequential = [Duration::ZERO; 2];
    for (name, concurrency, owners, known_pr) in variants {
        seed(bench, args.rows, owners, known_pr).await?;
        let gitsync = Gitsync::with_providers(
            bench.db.clone(),
            config(concurrency),
            concurrency,
            &meter,
            slow(args.latency, false),
        );
        let (elapsed, report) = timed(bench, &gitsync).await?;
        let calls = gitsync_calls(&gitsync);
        if concurrency == 1 {
            sequential[usize::from(known_pr)] = elapsed;
        }
        results.push((name, concurrency, known_pr, report, calls, elapsed));
    }
    let rows: Vec<Vec<String>> = results
        .iter()
        .map(|(name, concurrency, known_pr, report, calls, elapsed)| {
            vec![
                (*name).to_owned(),
                concurrency.to_string(),
                format!("{}/{}", refreshed(report), report.leased),
                calls.to_string(),
                format!("{:.2}", elapsed.as_secs_f64()),
                format!("{:.1}×", sequential[usize::from(*known_pr)].as_secs_f64() / elapsed.as_secs_f64()),
            ]
        })
        .collect();
    table(
        &format!(
            "One tick over {} due rows, fake Provider answering each call after {} ms",
            args.rows,
            args.latency.as_millis()
        ),
        &[
            "variant",
            "concurrency",
            "refreshed/leased",
            "provider calls",
            "tick seconds",
            "vs its sequential baseline",
        ],
        &rows,
    );
    Ok(())
}

fn gitsync_calls(gitsync: &Gitsync<SlowProvider>) -> u64 {
    gitsync.providers().iter().map(|(_, p)| p.calls.load(Ordering::Relaxed)).sum()
}

/// Row `n`'s head commit in the fake GitHub: the row can be told from its check-runs path.
fn head_sha(n: usize) -> String {
    format!("{n:040x}")
}

/// The row (branch `b{n}`, PR `n`) a request of [`over_http`] was for.
fn row_of(seen: &Seen) -> Option<usize> {
    let tail = seen.path.strip_prefix("/repos/")?.splitn(3, '/').nth(2)?;
    let parts: Vec<&str> = tail.split('/').collect();
    match parts.as_slice() {
        ["pulls"] => seen.path_and_query.split_once("%3Ab")?.1.split('&').next()?.parse().ok(),
        ["pulls", n, ..] => n.parse().ok(),
        ["commits", sha, "check-runs"] => usize::from_str_radix(sha, 16).ok(),
        _ => None,
    }
}

/// Round trips of one row: its requests in waves, a wave being those sent before any earlier
/// one of the row was answered (sequential requests are one wave each, parallel ones one).
fn round_trips(requests: &mut [&Seen]) -> usize {
    requests.sort_by_key(|s| s.arrived);
    let mut waves = 0;
    let mut wave_answered = None;
    for request in requests.iter() {
        match wave_answered {
            Some(answered) if request.arrived < answered => {
                wave_answered = Some(request.answered.max(answered));
            }
            _ => {
                waves += 1;
                wave_answered = Some(request.answered);
            }
        }
    }
    waves
}

/// One measured tick through the GitHub client: what it cost per row.
struct HttpTick {
    name: &'static str,
    report: RefreshReport,
    requests: usize,
    round_trips_per_row: f64,
    counted_per_row: f64,
    elapsed: Duration,
}

async fn http_tick(
    bench: &BenchDb,
    fake: &FakeGitHub,
    gitsync: &Gitsync,
    name: &'static str,
) -> anyhow::Result<HttpTick> {
    let (first, before) = (fake.seen().len(), fake.counts());
    let (elapsed, report) = timed(bench, gitsync).await?;
    let seen = fake.seen();
    let seen = &seen[first..];
    let rows = report.leased.max(1);
    let mut by_row: std::collections::HashMap<usize, Vec<&Seen>> = std::collections::HashMap::new();
    for request in seen {
        by_row.entry(row_of(request).context("a request of no row")?).or_default().push(request);
    }
    let round_trips: usize = by_row.values_mut().map(|requests| round_trips(requests)).sum();
    let counted = (fake.counts() - before).counted;
    Ok(HttpTick {
        name,
        report,
        requests: seen.len(),
        round_trips_per_row: round_trips as f64 / rows as f64,
        counted_per_row: counted as f64 / rows as f64,
        elapsed,
    })
}

async fn over_http(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let fake = FakeGitHub::start().await;
    fake.set_latency(args.latency);
    for n in 1..=args.rows {
        let (owner, branch) = (format!("o{}", (n - 1) % 10), format!("b{n}"));
        fake.pr(&owner, "r", &branch, n as i64);
        fake.push(&owner, "r", &branch, &head_sha(n));
    }
    let mut github = ProviderConfig::github_default();
    github.api_base_url = fake.base_url.clone();
    github.allow_insecure_http = true;
    let config = GitsyncConfig { providers: vec![github], ..config(10) };
    let meter = opentelemetry::global::meter("bench");
    let client = || Gitsync::new(bench.db.clone(), config.clone(), 10, &meter);
    let again = "UPDATE chat_diff_statuses SET stale_at = now()";
    let mut ticks = Vec::new();

    // Rows stored before head commits were used: the PR, then reviews + checks.
    seed(bench, args.rows, 10, true).await?;
    ticks.push(
        http_tick(bench, &fake, &client()?, "PR number known, head not: PR, then reviews + checks").await?,
    );

    seed(bench, args.rows, 10, false).await?;
    let gitsync = client()?;
    ticks.push(http_tick(bench, &fake, &gitsync, "first refresh: lookup, PR, reviews + checks").await?);
    bench.direct().await?.batch_execute(again).await?;
    ticks.push(
        http_tick(bench, &fake, &gitsync, "steady state: PR + reviews + checks at once, all 304").await?,
    );
    // A restarted worker: number and head stored, nothing cached.
    bench.direct().await?.batch_execute(again).await?;
    ticks.push(http_tick(bench, &fake, &client()?, "steady state, cold ETag cache (after a restart)").await?);

    let rows: Vec<Vec<String>> = ticks
        .iter()
        .map(|t| {
            vec![
                t.name.to_owned(),
                format!("{}/{}", refreshed(&t.report), t.report.leased),
                t.requests.to_string(),
                format!("{:.2}", t.round_trips_per_row),
                format!("{:.2}", t.counted_per_row),
                format!("{:.2}", t.elapsed.as_secs_f64()),
            ]
        })
        .collect();
    table(
        &format!(
            "The same tick through the GitHub client, local fake GitHub with {} ms per HTTP request (concurrency 10, 10 owners)",
            args.latency.as_millis()
        ),
        &[
            "variant",
            "refreshed/leased",
            "HTTP requests",
            "round trips per row",
            "counted requests (200s) per row",
            "tick seconds",
        ],
        &rows,
    );

    // An unchanged row is refreshed once per ttl (the lease picks it up within an interval).
    let defaults = GitsyncConfig::default();
    let per_hour = 3600.0 / defaults.ttl.as_secs_f64();
    let steady = ticks[2].counted_per_row;
    println!(
        "\ncounted requests per unchanged row per hour: {:.1} ({steady:.2} per refresh × at most {per_hour:.0} \
         refreshes/h: one per ttl {}, leased within an interval of {}), against {:.0} at the old 3 per refresh",
        steady * per_hour,
        humantime::format_duration(defaults.ttl),
        humantime::format_duration(defaults.base.interval),
        3.0 * per_hour,
    );
    Ok(())
}

async fn rate_limited(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let meter = opentelemetry::global::meter("bench");
    seed(bench, 10, 1, true).await?;
    let gitsync = Gitsync::with_providers(bench.db.clone(), config(10), 10, &meter, slow(args.latency, true));
    let (elapsed, report) = timed(bench, &gitsync).await?;
    let mut rows = vec![vec![
        "fake Provider: every call rate-limited".to_owned(),
        report.count(RefreshOutcome::RateLimited).to_string(),
        gitsync_calls(&gitsync).to_string(),
        format!("{:.2}", elapsed.as_secs_f64()),
    ]];

    let fake = FakeGitHub::start().await;
    fake.set_latency(args.latency);
    let reset =
        (std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?.as_secs() + 600).to_string();
    fake.answer(
        "/repos/",
        Answer::Raw {
            status: 403,
            headers: vec![("x-ratelimit-remaining", "0".into()), ("x-ratelimit-reset", reset)],
            body: r#"{"message":"API rate limit exceeded"}"#.into(),
        },
    );
    let mut github = ProviderConfig::github_default();
    github.api_base_url = fake.base_url.clone();
    github.allow_insecure_http = true;
    seed(bench, 10, 1, true).await?;
    let gitsync =
        Gitsync::new(bench.db.clone(), GitsyncConfig { providers: vec![github], ..config(10) }, 10, &meter)?;
    let (elapsed, report) = timed(bench, &gitsync).await?;
    rows.push(vec![
        "fake GitHub over HTTP: 403, x-ratelimit-remaining: 0".to_owned(),
        report.count(RefreshOutcome::RateLimited).to_string(),
        fake.seen().len().to_string(),
        format!("{:.2}", elapsed.as_secs_f64()),
    ]);
    table(
        "A rate-limited group: 10 rows of one owner and origin (concurrency 10)",
        &["provider", "rows rate_limited", "HTTP calls", "tick seconds"],
        &rows,
    );
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    // pool_size 20: the effective concurrency min(10, 20 / 2) is 10.
    let bench = BenchDb::create(20).await?;
    let result = async {
        fan_out(&bench, &args).await?;
        over_http(&bench, &args).await?;
        rate_limited(&bench, &args).await
    }
    .await;
    bench.drop_now().await?;
    result
}
