//! The GitHub client against a local fake GitHub (axum on 127.0.0.1:0) serving GitHub's own
//! example payloads: the full status fetch, ETag revalidation, bad bodies, size limits, rate
//! limits and timeouts. No real network, no sleeps.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use worker::gitsync::github::{GitHubOptions, StatusClass};
use worker::gitsync::{
    ChecksState, GitHub, Origin, PrNumber, PrState, Provider, ProviderConfig, ProviderError,
};

const TOKEN: &str = "ghp_test_token";
const TIMEOUT: Duration = Duration::from_secs(10);
const NOW: u64 = 1_700_000_000;
const HEAD_SHA: &str = "6dcb09b5b57875f334f61aebed695e2e4193db5e";
const PULLS: &str = "/repos/octocat/Hello-World/pulls";
const PULL: &str = "/repos/octocat/Hello-World/pulls/1347";
const REVIEWS: &str = "/repos/octocat/Hello-World/pulls/1347/reviews";
const CHECKS: &str = "/repos/octocat/Hello-World/commits/6dcb09b5b57875f334f61aebed695e2e4193db5e/check-runs";

fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/github/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read fixture {path}: {e}"))
}

/// One canned answer for a path.
#[derive(Clone)]
enum Answer {
    Json {
        body: String,
        etag: Option<&'static str>,
    },
    Raw {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// A 200 whose body arrives in chunks with no content-length.
    Streamed {
        chunk: usize,
        count: usize,
    },
    /// Never answers: only a client timeout ends the request.
    Hang,
}

fn json(name: &str) -> Answer {
    Answer::Json { body: fixture(name), etag: None }
}

/// What the fake saw and answered.
#[derive(Debug, Clone)]
struct Seen {
    path_and_query: String,
    if_none_match: Option<String>,
    authorization: Option<String>,
    accept: Option<String>,
    user_agent: Option<String>,
    status: u16,
}

#[derive(Default)]
struct Fake {
    answers: Mutex<HashMap<String, Answer>>,
    seen: Mutex<Vec<Seen>>,
}

impl Fake {
    fn answer(&self, path: &str, answer: Answer) {
        self.answers.lock().expect("answers").insert(path.to_owned(), answer);
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("seen").clone()
    }
}

async fn serve(State(fake): State<Arc<Fake>>, request: Request) -> Response {
    // Only the head is needed; the body type is not `Sync`, so borrowing it across the
    // `Hang` await would make the handler's future not `Send`.
    let (request, _) = request.into_parts();
    let get =
        |name: header::HeaderName| request.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let if_none_match = get(header::IF_NONE_MATCH);
    let answer = fake.answers.lock().expect("answers").get(request.uri.path()).cloned();
    let response = match answer {
        None => (
            StatusCode::NOT_FOUND,
            [(header::CONTENT_TYPE, "application/json")],
            r#"{"message":"Not Found"}"#,
        )
            .into_response(),
        Some(Answer::Json { etag: Some(etag), .. }) if if_none_match.as_deref() == Some(etag) => {
            (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response()
        }
        Some(Answer::Json { body, etag }) => {
            let mut headers = HeaderMap::new();
            headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
            if let Some(etag) = etag {
                headers.insert(header::ETAG, HeaderValue::from_static(etag));
            }
            (StatusCode::OK, headers, body).into_response()
        }
        Some(Answer::Raw { status, headers, body }) => {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(HeaderName::from_static(name), HeaderValue::from_str(&value).expect("header"));
            }
            (StatusCode::from_u16(status).expect("status"), map, body).into_response()
        }
        Some(Answer::Streamed { chunk, count }) => {
            let chunks = (0..count).map(move |_| Ok::<_, std::io::Error>(vec![b' '; chunk]));
            let body = Body::from_stream(futures_util::stream::iter(chunks));
            (StatusCode::OK, [(header::CONTENT_TYPE, "application/json")], body).into_response()
        }
        Some(Answer::Hang) => std::future::pending().await,
    };
    fake.seen.lock().expect("seen").push(Seen {
        path_and_query: request.uri.path_and_query().map(ToString::to_string).unwrap_or_default(),
        if_none_match,
        authorization: get(header::AUTHORIZATION),
        accept: get(header::ACCEPT),
        user_agent: get(header::USER_AGENT),
        status: response.status().as_u16(),
    });
    response
}

struct Bundle {
    github: GitHub,
    addr: std::net::SocketAddr,
    fake: Arc<Fake>,
    origin: Origin,
}

/// A fake GitHub serving the fixtures for PR 1347 of octocat/Hello-World, and a client for it.
async fn setup(options: GitHubOptions) -> Bundle {
    let fake = Arc::new(Fake::default());
    fake.answer(PULLS, json("pull-request-simple-items.json"));
    fake.answer(PULL, json("pull-request.json"));
    fake.answer(REVIEWS, json("pull-request-review-items.json"));
    fake.answer(CHECKS, json("check-run-paginated.json"));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake github");
    let addr = listener.local_addr().expect("fake github address");
    let router = Router::new().fallback(serve).with_state(Arc::clone(&fake));
    tokio::spawn(async move { axum::serve(listener, router).await });

    let mut config = ProviderConfig::github_default();
    config.api_base_url = format!("http://{addr}");
    config.allow_insecure_http = true;
    let options = GitHubOptions { epoch_secs: || NOW, ..options };
    let github = GitHub::new(&config, options).expect("client");
    let origin = Origin::parse("git@github.com:octocat/Hello-World.git").expect("origin");
    Bundle { github, addr, fake, origin }
}

async fn status_error(bundle: &Bundle) -> ProviderError {
    bundle
        .github
        .status(&bundle.origin, PrNumber(1347), None, TOKEN, TIMEOUT)
        .await
        .expect_err("the status fetch fails")
}

#[tokio::test]
async fn a_branch_resolves_to_its_pr_and_the_status_combines_pr_reviews_and_checks() {
    let bundle = setup(GitHubOptions::default()).await;
    let number = bundle.github.pull_request_by_branch(&bundle.origin, "new-topic", TOKEN, TIMEOUT).await;
    assert_eq!(number.expect("pr lookup"), Some(PrNumber(1347)));

    let status =
        bundle.github.status(&bundle.origin, PrNumber(1347), None, TOKEN, TIMEOUT).await.expect("status");
    assert_eq!(status.pr_number, PrNumber(1347));
    assert_eq!(status.url, "https://github.com/octocat/Hello-World/pull/1347");
    assert_eq!(status.state, PrState::Open);
    assert_eq!(status.title, "Amazing new feature");
    assert!(!status.draft);
    assert_eq!((status.additions, status.deletions, status.changed_files, status.commits), (100, 3, 5, 3));
    assert_eq!((status.approved, status.changes_requested, status.reviewer_count), (true, false, 1));
    assert_eq!(status.checks_state, ChecksState::Success);
    assert_eq!(status.author_login, "octocat");
    assert_eq!((status.base_branch.as_str(), status.head_branch.as_str()), ("master", "new-topic"));
    assert_eq!(status.head_sha, HEAD_SHA);

    let seen = bundle.fake.seen();
    let paths: Vec<_> = seen.iter().map(|s| s.path_and_query.as_str()).collect();
    assert_eq!(
        paths[0],
        "/repos/octocat/Hello-World/pulls?state=open&head=octocat%3Anew-topic&sort=updated&direction=desc&per_page=1"
    );
    assert_eq!(paths[1], PULL);
    assert!(paths.contains(&format!("{REVIEWS}?per_page=100").as_str()), "{paths:?}");
    assert!(paths.contains(&format!("{CHECKS}?per_page=100").as_str()), "{paths:?}");
    for request in &seen {
        assert_eq!(request.authorization.as_deref(), Some("Bearer ghp_test_token"));
        assert_eq!(request.accept.as_deref(), Some("application/vnd.github+json"));
        assert!(request.user_agent.as_deref().is_some_and(|ua| ua.starts_with("worker/")), "{request:?}");
        assert_eq!(request.if_none_match, None, "nothing was cached yet");
    }
    let stats = bundle.github.stats();
    assert_eq!((stats.count(StatusClass::Success), stats.count(StatusClass::Error)), (4, 0));
}

#[tokio::test]
async fn a_branch_without_an_open_pr_is_none() {
    let bundle = setup(GitHubOptions::default()).await;
    bundle.fake.answer(PULLS, Answer::Json { body: "[]".into(), etag: None });
    let number = bundle.github.pull_request_by_branch(&bundle.origin, "new-topic", TOKEN, TIMEOUT).await;
    assert_eq!(number.expect("pr lookup"), None);
}

#[tokio::test]
async fn an_unchanged_pr_is_revalidated_with_its_etag_and_the_304_reuses_the_body() {
    let bundle = setup(GitHubOptions::default()).await;
    for (path, name, etag) in [
        (PULL, "pull-request.json", "\"pr-v1\""),
        (REVIEWS, "pull-request-review-items.json", "\"reviews-v1\""),
        (CHECKS, "check-run-paginated.json", "\"checks-v1\""),
    ] {
        bundle.fake.answer(path, Answer::Json { body: fixture(name), etag: Some(etag) });
    }
    let first =
        bundle.github.status(&bundle.origin, PrNumber(1347), None, TOKEN, TIMEOUT).await.expect("first");
    assert_eq!(bundle.github.cached_responses(), 3);
    let second =
        bundle.github.status(&bundle.origin, PrNumber(1347), None, TOKEN, TIMEOUT).await.expect("second");
    assert_eq!(second, first);

    let seen = bundle.fake.seen();
    assert_eq!(seen.len(), 6);
    let (fresh, revalidated) = seen.split_at(3);
    assert!(fresh.iter().all(|s| s.status == 200 && s.if_none_match.is_none()), "{fresh:?}");
    for request in revalidated {
        assert_eq!(request.status, 304, "{request:?}");
        let want = if request.path_and_query.starts_with(REVIEWS) {
            "\"reviews-v1\""
        } else if request.path_and_query.starts_with(CHECKS) {
            "\"checks-v1\""
        } else {
            "\"pr-v1\""
        };
        assert_eq!(request.if_none_match.as_deref(), Some(want), "{request:?}");
    }
    assert_eq!(bundle.github.stats().count(StatusClass::Redirection), 3);

    // Another token never revalidates against (or reads) the first token's cached answers.
    bundle
        .github
        .status(&bundle.origin, PrNumber(1347), None, "ghp_other", TIMEOUT)
        .await
        .expect("other token");
    assert!(bundle.fake.seen()[6..].iter().all(|s| s.if_none_match.is_none() && s.status == 200));
}

#[tokio::test]
async fn a_known_head_is_asked_for_with_the_pr_and_a_moved_one_costs_one_more_request() {
    let bundle = setup(GitHubOptions::default()).await;
    let known = bundle.github.status(&bundle.origin, PrNumber(1347), Some(HEAD_SHA), TOKEN, TIMEOUT).await;
    let checks = format!("{CHECKS}?per_page=100");
    let paths = |from: usize| -> Vec<String> {
        let mut paths: Vec<_> = bundle.fake.seen()[from..].iter().map(|s| s.path_and_query.clone()).collect();
        paths.sort();
        paths
    };
    assert_eq!(known.expect("status").head_sha, HEAD_SHA);
    assert_eq!(paths(0), [checks.clone(), PULL.to_owned(), format!("{REVIEWS}?per_page=100")]);

    // The stored head is gone (force-pushed away: 404): that answer is not the PR's head's, so
    // it is no error; the PR's head is asked for instead.
    let gone = "0000000000000000000000000000000000000000";
    let status = bundle.github.status(&bundle.origin, PrNumber(1347), Some(gone), TOKEN, TIMEOUT).await;
    assert_eq!(status.expect("status").checks_state, ChecksState::Success);
    let again = paths(3);
    assert_eq!(again.len(), 4, "{again:?}");
    assert!(again.contains(&checks) && again.iter().any(|p| p.contains(gone)), "{again:?}");
}

#[tokio::test]
async fn an_html_page_is_a_body_error_naming_the_url() {
    let bundle = setup(GitHubOptions::default()).await;
    let html = "<html><body>Unicorn!</body></html>".to_owned();
    let headers = vec![("content-type", "text/html; charset=utf-8".to_owned())];
    bundle.fake.answer(PULL, Answer::Raw { status: 200, headers, body: html });
    match status_error(&bundle).await {
        ProviderError::Body { url, problem } => {
            assert!(url.ends_with(PULL), "{url}");
            assert!(problem.contains("text/html"), "{problem}");
        }
        other => panic!("expected a body error, got {other:?}"),
    }
}

#[tokio::test]
async fn truncated_json_is_a_body_error_naming_the_url() {
    let bundle = setup(GitHubOptions::default()).await;
    let full = fixture("pull-request.json");
    bundle.fake.answer(PULL, Answer::Json { body: full[..full.len() / 2].to_owned(), etag: Some("\"cut\"") });
    let err = status_error(&bundle).await;
    assert_eq!(err.metric_label(), "bad_body", "{err}");
    assert!(err.url().ends_with(PULL), "{err}");
    assert!(err.to_string().contains("EOF"), "{err}");
    assert_eq!(bundle.github.cached_responses(), 0, "a body that did not parse is not cached");
}

#[tokio::test]
async fn json_of_the_wrong_shape_is_a_body_error_naming_what_was_wrong() {
    let bundle = setup(GitHubOptions::default()).await;
    bundle.fake.answer(REVIEWS, Answer::Json { body: r#"{"reviews": []}"#.into(), etag: None });
    let err = status_error(&bundle).await;
    assert!(matches!(err, ProviderError::Body { .. }), "{err}");
    assert!(err.url().contains(REVIEWS), "{err}");
    assert!(err.to_string().contains("expected a sequence"), "{err}");
}

#[tokio::test]
async fn a_server_error_is_a_transient_status_error_naming_the_url() {
    let bundle = setup(GitHubOptions::default()).await;
    bundle.fake.answer(CHECKS, Answer::Raw { status: 500, headers: vec![], body: "oops".into() });
    match status_error(&bundle).await {
        ref err @ ProviderError::Status { ref url, status, .. } => {
            assert_eq!(status, 500);
            assert!(url.contains(CHECKS), "{url}");
            assert!(err.is_transient());
        }
        other => panic!("expected a status error, got {other:?}"),
    }
    assert_eq!(bundle.github.stats().count(StatusClass::ServerError), 1);
}

#[tokio::test]
async fn a_body_over_the_limit_is_refused_whether_or_not_its_length_is_announced() {
    let bundle = setup(GitHubOptions { max_body_bytes: 4096, ..GitHubOptions::default() }).await;
    // pull-request.json is ~26 KB, sent with a content-length.
    match status_error(&bundle).await {
        ProviderError::BodyTooLarge { url, limit } => {
            assert_eq!(limit, 4096);
            assert!(url.ends_with(PULL), "{url}");
        }
        other => panic!("expected body too large, got {other:?}"),
    }
    // An endless-looking chunked body is cut off once past the limit.
    bundle.fake.answer(PULL, Answer::Streamed { chunk: 1024, count: 64 });
    let err = status_error(&bundle).await;
    assert!(matches!(err, ProviderError::BodyTooLarge { limit: 4096, .. }), "{err}");
}

#[tokio::test]
async fn an_exhausted_primary_limit_waits_until_the_reset() {
    let bundle = setup(GitHubOptions::default()).await;
    let headers = vec![
        ("x-ratelimit-limit", "5000".to_owned()),
        ("x-ratelimit-remaining", "0".to_owned()),
        ("x-ratelimit-reset", (NOW + 754).to_string()),
        ("content-type", "application/json".to_owned()),
    ];
    let body = r#"{"message":"API rate limit exceeded"}"#.to_owned();
    bundle.fake.answer(PULL, Answer::Raw { status: 403, headers, body });
    match status_error(&bundle).await {
        ProviderError::RateLimited { url, wait } => {
            assert_eq!(wait, Duration::from_secs(754));
            assert!(url.ends_with(PULL), "{url}");
        }
        other => panic!("expected rate limited, got {other:?}"),
    }
}

#[tokio::test]
async fn a_429_with_retry_after_waits_that_long() {
    let bundle = setup(GitHubOptions::default()).await;
    let headers = vec![("retry-after", "30".to_owned())];
    bundle.fake.answer(PULL, Answer::Raw { status: 429, headers, body: String::new() });
    let err = status_error(&bundle).await;
    assert!(
        matches!(err, ProviderError::RateLimited { wait, .. } if wait == Duration::from_secs(30)),
        "{err}"
    );
    assert!(err.is_transient());
}

#[tokio::test]
async fn a_403_without_rate_limit_headers_is_an_ordinary_status_error() {
    let bundle = setup(GitHubOptions::default()).await;
    let headers = vec![("content-type", "application/json".to_owned())];
    let body = r#"{"message":"Resource not accessible by integration","documentation_url":"https://docs.github.com"}"#;
    bundle.fake.answer(PULL, Answer::Raw { status: 403, headers, body: body.into() });
    match status_error(&bundle).await {
        ref err @ ProviderError::Status { status, ref message, ref url } => {
            assert_eq!(status, 403);
            assert_eq!(message, "Resource not accessible by integration");
            assert!(url.ends_with(PULL), "{url}");
            assert!(!err.is_transient());
            assert_eq!(err.metric_label(), "http_status");
        }
        other => panic!("expected a status error, got {other:?}"),
    }
}

#[tokio::test]
async fn a_403_reporting_a_secondary_rate_limit_waits_a_minute() {
    let bundle = setup(GitHubOptions::default()).await;
    let body = r#"{"message":"You have exceeded a secondary rate limit. Please wait a few minutes."}"#;
    bundle.fake.answer(PULL, Answer::Raw { status: 403, headers: vec![], body: body.into() });
    let err = status_error(&bundle).await;
    assert!(
        matches!(err, ProviderError::RateLimited { wait, .. } if wait == Duration::from_secs(60)),
        "{err}"
    );
}

#[tokio::test]
async fn a_request_that_gets_no_answer_times_out_naming_the_url() {
    let bundle = setup(GitHubOptions::default()).await;
    bundle.fake.answer(PULL, Answer::Hang);
    let timeout = Duration::from_millis(200);
    let err =
        bundle.github.status(&bundle.origin, PrNumber(1347), None, TOKEN, timeout).await.expect_err("hangs");
    match err {
        ProviderError::Timeout { ref url, timeout: waited } => {
            assert_eq!(waited, timeout);
            assert!(url.ends_with(PULL), "{url}");
        }
        other => panic!("expected a timeout, got {other:?}"),
    }
    assert_eq!(bundle.github.stats().count(StatusClass::Error), 1);
}

#[tokio::test]
async fn a_renamed_repository_is_followed_and_the_token_never_leaves_the_api_host() {
    let bundle = setup(GitHubOptions::default()).await;
    let moved = "/repositories/1296269/pulls/1347";
    let location = format!("http://{}{moved}", bundle.addr);
    bundle.fake.answer(
        PULL,
        Answer::Raw { status: 301, headers: vec![("location", location)], body: String::new() },
    );
    bundle.fake.answer(moved, json("pull-request.json"));
    let status =
        bundle.github.status(&bundle.origin, PrNumber(1347), None, TOKEN, TIMEOUT).await.expect("status");
    assert_eq!(status.pr_number, PrNumber(1347));
    let seen = bundle.fake.seen();
    let followed = seen.iter().find(|s| s.path_and_query == moved).expect("redirect followed");
    assert_eq!(followed.authorization.as_deref(), Some("Bearer ghp_test_token"));

    // `localhost` is another host than `127.0.0.1` as far as the redirect policy can tell.
    let elsewhere = "/elsewhere/pulls/1347";
    let location = format!("http://localhost:{}{elsewhere}", bundle.addr.port());
    bundle.fake.answer(
        PULL,
        Answer::Raw { status: 301, headers: vec![("location", location)], body: String::new() },
    );
    bundle.fake.answer(elsewhere, json("pull-request.json"));
    bundle.github.status(&bundle.origin, PrNumber(1347), None, TOKEN, TIMEOUT).await.expect("status");
    let seen = bundle.fake.seen();
    let followed = seen.iter().find(|s| s.path_and_query == elsewhere).expect("redirect followed");
    assert_eq!(followed.authorization, None, "the token was sent to another host");
}
