//! A local fake GitHub (axum on 127.0.0.1:0) for the gitsync loop tests: any number of
//! repositories and branches, each branch's PR built from GitHub's own `pull-request.json`
//! example, reviews and check runs from the other fixtures, an `etag` on every answer (a matching
//! `If-None-Match` gets a 304), per-path overrides (errors, rate limits, hangs), and a gate that
//! holds matching requests until the test opens it while counting how many are held at once (so
//! a test proves requests were in flight together without timing). A branch's head commit can be
//! moved ([`FakeGitHub::push`]) and any path given a JSON answer of its own ([`FakeGitHub::json`]).
//! It counts its answers as GitHub's rate limit does ([`FakeGitHub::counts`]): every answer but a
//! 304 is counted.
//! Its own answers carry GitHub's primary rate-limit headers (`x-ratelimit-limit`, `-remaining`,
//! `-used`, `-reset`, `-resource`), `remaining` counting down with every answer but a 304 (which
//! GitHub does not count), from a window set with [`FakeGitHub::set_rate_limit`].
#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::hash::{DefaultHasher, Hash, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderName, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

pub fn fixture(name: &str) -> String {
    let path = format!("{}/tests/fixtures/github/{name}", env!("CARGO_MANIFEST_DIR"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read fixture {path}: {e}"))
}

/// The head commit of a fake PR until [`FakeGitHub::push`] moves it (the check-runs fixture
/// answers for any commit).
pub const HEAD_SHA: &str = "6dcb09b5b57875f334f61aebed695e2e4193db5e";

/// An answer that replaces the fake's own for every path starting with a prefix.
#[derive(Clone)]
pub enum Answer {
    Raw {
        status: u16,
        headers: Vec<(&'static str, String)>,
        body: String,
    },
    /// Never answers: only a client timeout (or a dropped tick) ends the request.
    Hang,
}

/// What the fake saw and answered.
#[derive(Debug, Clone)]
pub struct Seen {
    pub path: String,
    pub path_and_query: String,
    pub if_none_match: Option<String>,
    pub authorization: Option<String>,
    pub status: u16,
    /// When the request arrived and when it was answered (the bench counts round trips with it).
    pub arrived: Instant,
    pub answered: Instant,
}

/// Answers by how GitHub's primary rate limit counts them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counts {
    /// Every answer but a 304: counted against the rate limit.
    pub counted: u64,
    /// 304 Not Modified: not counted.
    pub not_modified: u64,
}

impl std::ops::Sub for Counts {
    type Output = Counts;

    fn sub(self, earlier: Counts) -> Counts {
        Counts {
            counted: self.counted - earlier.counted,
            not_modified: self.not_modified - earlier.not_modified,
        }
    }
}

/// A branch's open PR.
struct FakePr {
    number: i64,
    head_sha: String,
}

/// Holds requests under `prefix` until opened; `held` counts those waiting now.
pub struct Gate {
    prefix: String,
    held: watch::Sender<usize>,
    open: watch::Sender<bool>,
    max_held: Mutex<usize>,
}

impl Gate {
    /// Waits until exactly `n` requests are held (at most `limit`).
    pub async fn wait_held(&self, n: usize, limit: Duration) {
        let mut held = self.held.subscribe();
        tokio::time::timeout(limit, held.wait_for(|h| *h == n))
            .await
            .unwrap_or_else(|_| panic!("{} requests held at the gate, expected {n}", *self.held.borrow()))
            .expect("gate alive");
    }

    pub fn held(&self) -> usize {
        *self.held.borrow()
    }

    /// The most requests ever held at once.
    pub fn max_held(&self) -> usize {
        *self.max_held.lock().expect("max held")
    }

    pub fn open(&self) {
        self.open.send_replace(true);
    }
}

struct Inner {
    /// (owner, repo) → branch → its PR.
    prs: Mutex<HashMap<(String, String), HashMap<String, FakePr>>>,
    /// Path → a JSON answer served instead of the fake's own, with an ETag like it.
    json: Mutex<HashMap<String, String>>,
    counted: AtomicU64,
    not_modified: AtomicU64,
    overrides: Mutex<Vec<(String, Answer)>>,
    seen: Mutex<Vec<Seen>>,
    gate: Mutex<Option<Arc<Gate>>>,
    latency: Mutex<Duration>,
    /// The primary rate-limit window: (remaining, reset in Unix seconds).
    rate_limit: Mutex<(u64, u64)>,
}

/// The limit of an authenticated user's window (requests per hour).
pub const RATE_LIMIT: u64 = 5000;

#[derive(Clone)]
pub struct FakeGitHub {
    pub base_url: String,
    inner: Arc<Inner>,
}

impl FakeGitHub {
    pub async fn start() -> Self {
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock").as_secs();
        let inner = Arc::new(Inner {
            prs: Mutex::default(),
            json: Mutex::default(),
            counted: AtomicU64::new(0),
            not_modified: AtomicU64::new(0),
            overrides: Mutex::default(),
            seen: Mutex::default(),
            gate: Mutex::default(),
            latency: Mutex::default(),
            rate_limit: Mutex::new((RATE_LIMIT, now + 3600)),
        });
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind fake github");
        let addr = listener.local_addr().expect("fake github address");
        let router = Router::new().fallback(serve).with_state(Arc::clone(&inner));
        tokio::spawn(async move { axum::serve(listener, router).await });
        Self { base_url: format!("http://{addr}"), inner }
    }

    /// `owner/repo` has an open PR `number` whose head is `branch` at [`HEAD_SHA`].
    pub fn pr(&self, owner: &str, repo: &str, branch: &str, number: i64) {
        let mut prs = self.inner.prs.lock().expect("prs");
        let pr = FakePr { number, head_sha: HEAD_SHA.into() };
        prs.entry((owner.into(), repo.into())).or_default().insert(branch.into(), pr);
    }

    /// The head of `branch`'s PR in `owner/repo` is now commit `sha`.
    pub fn push(&self, owner: &str, repo: &str, branch: &str, sha: &str) {
        let mut prs = self.inner.prs.lock().expect("prs");
        let pr = prs.get_mut(&(owner.into(), repo.into())).and_then(|b| b.get_mut(branch));
        pr.unwrap_or_else(|| panic!("no PR for {owner}/{repo} {branch}")).head_sha = sha.into();
    }

    /// Requests for exactly `path` are answered `body` (JSON) from now on, with an ETag and a
    /// 304 like the fake's own answers (unlike [`FakeGitHub::answer`]'s).
    pub fn json(&self, path: &str, body: String) {
        self.inner.json.lock().expect("json").insert(path.into(), body);
    }

    /// The answers so far, as GitHub's rate limit counts them.
    pub fn counts(&self) -> Counts {
        Counts {
            counted: self.inner.counted.load(Ordering::Relaxed),
            not_modified: self.inner.not_modified.load(Ordering::Relaxed),
        }
    }

    /// Every request whose path starts with `prefix` gets `answer`.
    pub fn answer(&self, prefix: &str, answer: Answer) {
        self.inner.overrides.lock().expect("overrides").push((prefix.into(), answer));
    }

    pub fn clear_answers(&self) {
        self.inner.overrides.lock().expect("overrides").clear();
    }

    /// Each request waits this long before it is answered.
    pub fn set_latency(&self, latency: Duration) {
        *self.inner.latency.lock().expect("latency") = latency;
    }

    /// Holds every request whose path starts with `prefix` until [`Gate::open`].
    pub fn gate(&self, prefix: &str) -> Arc<Gate> {
        let gate = Arc::new(Gate {
            prefix: prefix.into(),
            held: watch::channel(0).0,
            open: watch::channel(false).0,
            max_held: Mutex::new(0),
        });
        *self.inner.gate.lock().expect("gate") = Some(Arc::clone(&gate));
        gate
    }

    /// The rate-limit window the next answers report: `remaining` requests until `reset`.
    pub fn set_rate_limit(&self, remaining: u64, reset_epoch_secs: u64) {
        *self.inner.rate_limit.lock().expect("rate limit") = (remaining, reset_epoch_secs);
    }

    /// (remaining, reset) as the last answer reported it.
    pub fn rate_limit(&self) -> (u64, u64) {
        *self.inner.rate_limit.lock().expect("rate limit")
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.inner.seen.lock().expect("seen").clone()
    }

    /// Requests under `prefix` (answered ones).
    pub fn requests_under(&self, prefix: &str) -> usize {
        self.seen().iter().filter(|s| s.path.starts_with(prefix)).count()
    }
}

fn json_response(body: String, if_none_match: Option<&str>) -> Response {
    let mut hasher = DefaultHasher::new();
    body.hash(&mut hasher);
    let etag = format!("\"{:016x}\"", hasher.finish());
    if if_none_match == Some(etag.as_str()) {
        return (StatusCode::NOT_MODIFIED, [(header::ETAG, etag)]).into_response();
    }
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json; charset=utf-8"));
    headers.insert(header::ETAG, HeaderValue::from_str(&etag).expect("etag"));
    (StatusCode::OK, headers, body).into_response()
}

fn not_found() -> Response {
    (StatusCode::NOT_FOUND, [(header::CONTENT_TYPE, "application/json")], r#"{"message":"Not Found"}"#)
        .into_response()
}

/// The fake's answer for `GET /repos/{owner}/{repo}/pulls/{number}`.
pub fn pull_request(owner: &str, repo: &str, number: i64, branch: &str, head_sha: &str) -> String {
    let mut pr: serde_json::Value = serde_json::from_str(&fixture("pull-request.json")).expect("fixture");
    pr["number"] = number.into();
    pr["html_url"] = format!("https://github.com/{owner}/{repo}/pull/{number}").into();
    pr["head"]["ref"] = branch.into();
    pr["head"]["label"] = format!("{owner}:{branch}").into();
    pr["head"]["sha"] = head_sha.into();
    pr.to_string()
}

/// The fake's own answer for a GitHub REST path.
fn route(inner: &Inner, path: &str, query: &str, if_none_match: Option<&str>) -> Response {
    if let Some(body) = inner.json.lock().expect("json").get(path) {
        return json_response(body.clone(), if_none_match);
    }
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let prs = inner.prs.lock().expect("prs");
    let Some(["repos", owner, repo, rest @ ..]) = Some(segments.as_slice()) else { return not_found() };
    let Some(branches) = prs.get(&((*owner).to_owned(), (*repo).to_owned())) else { return not_found() };
    match rest {
        ["pulls"] => {
            let head = url::form_urlencoded::parse(query.as_bytes())
                .find(|(k, _)| k == "head")
                .map(|(_, v)| v.into_owned())
                .unwrap_or_default();
            let branch = head.split_once(':').map_or(head.as_str(), |(_, b)| b);
            let items: Vec<serde_json::Value> = branches
                .get(branch)
                .map(|pr| {
                    let body = pull_request(owner, repo, pr.number, branch, &pr.head_sha);
                    serde_json::from_str::<serde_json::Value>(&body).expect("pr")
                })
                .into_iter()
                .collect();
            json_response(serde_json::Value::from(items).to_string(), if_none_match)
        }
        ["pulls", number] => {
            let number: i64 = number.parse().unwrap_or(-1);
            match branches.iter().find(|(_, pr)| pr.number == number) {
                Some((branch, pr)) => {
                    json_response(pull_request(owner, repo, number, branch, &pr.head_sha), if_none_match)
                }
                None => not_found(),
            }
        }
        ["pulls", _, "reviews"] => json_response(fixture("pull-request-review-items.json"), if_none_match),
        ["commits", _, "check-runs"] => json_response(fixture("check-run-paginated.json"), if_none_match),
        _ => not_found(),
    }
}

/// GitHub's rate-limit headers on one of the fake's own answers; a 304 costs nothing.
fn with_rate_limit(inner: &Inner, mut response: Response) -> Response {
    let (remaining, reset) = {
        let mut window = inner.rate_limit.lock().expect("rate limit");
        if response.status() != StatusCode::NOT_MODIFIED {
            window.0 = window.0.saturating_sub(1);
        }
        *window
    };
    let headers = response.headers_mut();
    for (name, value) in [
        ("x-ratelimit-limit", RATE_LIMIT.to_string()),
        ("x-ratelimit-remaining", remaining.to_string()),
        ("x-ratelimit-used", (RATE_LIMIT.saturating_sub(remaining)).to_string()),
        ("x-ratelimit-reset", reset.to_string()),
        ("x-ratelimit-resource", "core".to_owned()),
    ] {
        headers.insert(HeaderName::from_static(name), HeaderValue::from_str(&value).expect("header"));
    }
    response
}

async fn serve(State(inner): State<Arc<Inner>>, request: Request) -> Response {
    let (request, _) = request.into_parts();
    let get =
        |name: header::HeaderName| request.headers.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
    let path = request.uri.path().to_owned();
    let query = request.uri.query().unwrap_or_default().to_owned();
    let if_none_match = get(header::IF_NONE_MATCH);
    let arrived = Instant::now();

    let gate = inner.gate.lock().expect("gate").clone().filter(|g| path.starts_with(&g.prefix));
    if let Some(gate) = gate {
        let mut open = gate.open.subscribe();
        if !*open.borrow() {
            gate.held.send_modify(|h| *h += 1);
            {
                let mut max = gate.max_held.lock().expect("max held");
                *max = (*max).max(gate.held());
            }
            // Dropped with the connection when the client gives up: count it out either way.
            struct Release(Arc<Gate>);
            impl Drop for Release {
                fn drop(&mut self) {
                    self.0.held.send_modify(|h| *h -= 1);
                }
            }
            let _release = Release(Arc::clone(&gate));
            let _ = open.wait_for(|o| *o).await;
        }
    }
    let latency = *inner.latency.lock().expect("latency");
    if !latency.is_zero() {
        tokio::time::sleep(latency).await;
    }

    let answer = {
        let overrides = inner.overrides.lock().expect("overrides");
        overrides.iter().rev().find(|(prefix, _)| path.starts_with(prefix)).map(|(_, a)| a.clone())
    };
    let response = match answer {
        Some(Answer::Hang) => std::future::pending().await,
        Some(Answer::Raw { status, headers, body }) => {
            let mut map = HeaderMap::new();
            for (name, value) in headers {
                map.insert(HeaderName::from_static(name), HeaderValue::from_str(&value).expect("header"));
            }
            (StatusCode::from_u16(status).expect("status"), map, body).into_response()
        }
        None => with_rate_limit(&inner, route(&inner, &path, &query, if_none_match.as_deref())),
    };
    let counter =
        if response.status() == StatusCode::NOT_MODIFIED { &inner.not_modified } else { &inner.counted };
    counter.fetch_add(1, Ordering::Relaxed);
    inner.seen.lock().expect("seen").push(Seen {
        path_and_query: format!(
            "{path}{}",
            if query.is_empty() { String::new() } else { format!("?{query}") }
        ),
        path,
        if_none_match,
        authorization: get(header::AUTHORIZATION),
        status: response.status().as_u16(),
        arrived,
        answered: Instant::now(),
    });
    response
}
