//! Reliability suite, scenario 7: bad input (docs/reliability.md, `scripts/chaos.sh`). Malformed
//! TOML and environment overrides, agents that print garbage or 10 MiB lines, a GitHub answering
//! HTML, 500s and huge bodies, rows with invalid origins or odd payloads: each must end in an error
//! that names the thing, nothing may be lost, and a running daemon stays ready throughout.
//!
//! 7a. the config: `worker config check` and `worker run` on each bad input;
//! 7b. one running replica (chats, gitsync, outbox) fed bad agent output, bad GitHub answers,
//!     invalid origins and odd outbox rows while `/readyz` is sampled every 50 ms;
//! 7c. poison values the database itself refuses (a NUL character, an infinite timestamp) in
//!     agent output, a GitHub payload and an outbox row.

mod chaos_support;
mod chats_support;
mod common;
mod gitsync_support;

use std::collections::BTreeSet;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chaos_support::{LIMIT, Replica, WorkerConfig, agent, redis_client, report, scalar};
use chats_support::{chat, messages, pending_chat};
use common::process::{BIN, inherited_overrides, readyz};
use common::{TestDb, eventually, within};
use fred::prelude::{HashesInterface, KeysInterface, SortedSetsInterface};
use gitsync_support::{Answer, FakeGitHub, HEAD_SHA, fixture};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::{Db, Exec};

// ---------------------------------------------------------------------------------------------
// Shared helpers
// ---------------------------------------------------------------------------------------------

/// Samples `/readyz` every 50 ms in the background: every status it answered, in order (0 when
/// nothing answered), and every distinct tick error a loop reported in its body (bad input must
/// be settled item by item, never fail a whole tick).
struct ReadyzWatch {
    samples: Arc<Mutex<Vec<u16>>>,
    loop_errors: Arc<Mutex<BTreeSet<String>>>,
    started: Instant,
    task: tokio::task::JoinHandle<()>,
}

impl ReadyzWatch {
    fn start(port: u16) -> Self {
        let samples = Arc::new(Mutex::new(Vec::new()));
        let loop_errors = Arc::new(Mutex::new(BTreeSet::new()));
        let task = tokio::spawn({
            let (samples, loop_errors) = (samples.clone(), loop_errors.clone());
            async move {
                loop {
                    let answer = readyz(port).await;
                    if let Some((_, body)) = &answer {
                        for l in body["loops"].as_array().into_iter().flatten() {
                            if let Some(error) = l["last_error"].as_str() {
                                let name = l["name"].as_str().unwrap_or("?");
                                loop_errors.lock().expect("errors").insert(format!("{name}: {error}"));
                            }
                        }
                    }
                    samples.lock().expect("samples").push(answer.map_or(0, |(status, _)| status));
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        });
        Self { samples, loop_errors, started: Instant::now(), task }
    }

    /// Waits until the watch has sampled for `window` (a loop whose ticks fail turns /readyz 503
    /// once its staleness limit has passed: the window must cover it).
    async fn observe_at_least(&self, window: Duration) {
        eventually(LIMIT, "the /readyz watch to cover its window", || async {
            self.started.elapsed() >= window
        })
        .await;
    }

    fn loop_errors(&self) -> Vec<String> {
        self.loop_errors.lock().expect("errors").iter().cloned().collect()
    }

    /// (samples taken, answers other than 200 after the first 200, the statuses of those).
    fn failures(&self) -> (usize, usize, Vec<u16>) {
        let samples = self.samples.lock().expect("samples");
        let Some(first) = samples.iter().position(|s| *s == 200) else {
            return (samples.len(), samples.len(), samples.clone());
        };
        let bad: Vec<u16> = samples[first..].iter().copied().filter(|s| *s != 200).collect();
        (samples.len(), bad.len(), bad)
    }
}

impl Drop for ReadyzWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn exec(db: &Db, sql: &str, params: &[worker::db::Param<'_>]) -> Result<u64, String> {
    let conn = db.get().await.map_err(|e| e.to_string())?;
    conn.exec(sql, params).await.map_err(|e| e.to_string())
}

/// An owner with a github token.
async fn github_owner(db: &Db) -> Uuid {
    let owner = Uuid::new_v4();
    let token = format!("tok-{owner}");
    exec(
        db,
        "INSERT INTO external_auth_links (user_id, provider_id, access_token) VALUES ($1, 'github', $2)",
        &[(&owner, Type::UUID), (&token, Type::TEXT)],
    )
    .await
    .expect("link");
    owner
}

/// A chat of `owner` (status `waiting`, so no agent runs) whose diff status is due for
/// `origin` and `branch`, as the API tier marks it.
async fn diff_row(db: &Db, owner: Uuid, origin: &str, branch: &str) -> Uuid {
    let chat: Uuid = db
        .get()
        .await
        .expect("conn")
        .fetch_one("INSERT INTO chats (owner_id) VALUES ($1) RETURNING id", &[(&owner, Type::UUID)])
        .await
        .expect("chat")
        .get(0);
    let (origin, branch) = (origin.to_owned(), branch.to_owned());
    exec(
        db,
        "SELECT mark_diff_stale($1, $2, $3)",
        &[(&chat, Type::UUID), (&origin, Type::TEXT), (&branch, Type::TEXT)],
    )
    .await
    .expect("mark_diff_stale");
    chat
}

/// A diff-status row as the refresher left it.
#[derive(Debug, Clone)]
struct DiffRow {
    outcome: Option<String>,
    last_error: Option<String>,
    leased: bool,
    /// `stale_at` in seconds since the epoch.
    stale_at: f64,
}

async fn diff_status(db: &Db, chat: Uuid) -> Option<DiffRow> {
    db.get()
        .await
        .expect("conn")
        .fetch_opt(
            "SELECT last_outcome, last_error, leased_at IS NOT NULL, extract(epoch FROM stale_at)::float8 \
             FROM chat_diff_statuses WHERE chat_id = $1",
            &[(&chat, Type::UUID)],
        )
        .await
        .expect("diff status")
        .map(|r| DiffRow { outcome: r.get(0), last_error: r.get(1), leased: r.get(2), stale_at: r.get(3) })
}

fn json_headers() -> Vec<(&'static str, String)> {
    vec![("content-type", "application/json; charset=utf-8".to_owned())]
}

// ---------------------------------------------------------------------------------------------
// 7a. Config
// ---------------------------------------------------------------------------------------------

/// One bad config input: a file (written as `file_name`) and/or environment variables and
/// flags, and what the error must mention.
struct ConfigInput {
    what: &'static str,
    file_name: &'static str,
    file: Option<Vec<u8>>,
    env: Vec<(&'static str, &'static str)>,
    flags: Vec<&'static str>,
    wants: Vec<&'static str>,
}

impl ConfigInput {
    fn file(
        what: &'static str,
        name: &'static str,
        text: impl Into<Vec<u8>>,
        wants: &[&'static str],
    ) -> Self {
        Self {
            what,
            file_name: name,
            file: Some(text.into()),
            env: vec![],
            flags: vec![],
            wants: wants.to_vec(),
        }
    }

    fn env(what: &'static str, var: &'static str, value: &'static str, wants: &[&'static str]) -> Self {
        Self {
            what,
            file_name: "base.toml",
            file: None,
            env: vec![(var, value)],
            flags: vec![],
            wants: wants.to_vec(),
        }
    }
}

/// What one `worker` invocation did: its exit code (None: killed or did not exit in time) and
/// stderr.
struct Ran {
    code: Option<i32>,
    stderr: String,
}

/// Runs `worker --config FILE [flags] ARGS` in `dir` with only `env` as config overrides.
async fn run_worker(dir: &Path, input: &ConfigInput, args: &[&str]) -> Ran {
    let mut command = tokio::process::Command::new(BIN);
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    // RUST_LOG wins over log.level: a developer's shell must not hide a bad log.level.
    command.env_remove("RUST_LOG");
    command
        .current_dir(dir)
        .args(["--config", input.file_name])
        .args(&input.flags)
        .args(args)
        .envs(input.env.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    let child = command.spawn().expect("start worker");
    // A bad config must stop `run` before it connects to anything: 10 s is generous.
    match tokio::time::timeout(Duration::from_secs(10), child.wait_with_output()).await {
        Ok(output) => {
            let output = output.expect("wait");
            Ran { code: output.status.code(), stderr: String::from_utf8_lossy(&output.stderr).into_owned() }
        }
        Err(_) => Ran { code: None, stderr: "(still running after 10s: the bad input was accepted)".into() },
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_7a_malformed_config_and_env_fail_naming_the_file_line_or_key() {
    let dir = tempfile::tempdir().expect("dir");
    let garbage: Vec<u8> = (0..512u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8 | 0x80).collect();
    let inputs = vec![
        ConfigInput::file(
            "unterminated string",
            "unterminated.toml",
            "[app]\nenv = \"test\"\n\n[outbox]\ninterval = \"200ms\n",
            &["unterminated.toml:5", "invalid TOML"],
        ),
        ConfigInput::file(
            "unclosed array",
            "array.toml",
            "[chats.runner]\ncommand = [\"agent\",\n",
            &["array.toml:2", "invalid TOML"],
        ),
        ConfigInput::file(
            "duplicate table",
            "duplicate.toml",
            "[app]\nenv = \"test\"\n[app]\nenv = \"prod\"\n",
            &["duplicate.toml:3", "duplicate"],
        ),
        ConfigInput::file(
            "wrong type",
            "type.toml",
            "[outbox]\nbatch_size = \"many\"\n",
            &["outbox.batch_size", "type.toml:2", "\"many\""],
        ),
        ConfigInput::file(
            "unknown key",
            "unknown.toml",
            "[outbox]\nenabled = true\nbatch_sise = 5\n",
            &["outbox.batch_sise", "unknown.toml:3", "unknown key"],
        ),
        ConfigInput::file(
            "unknown section",
            "section.toml",
            "[app]\nenv = \"test\"\n[outbx]\nenabled = true\n",
            &["outbx", "section.toml:3", "unknown key"],
        ),
        ConfigInput::file(
            "out of range",
            "range.toml",
            "[chats.runner]\nmax_line_bytes = 10\n",
            &["chats.runner.max_line_bytes", "range.toml:2", "10"],
        ),
        ConfigInput::file("binary garbage", "garbage.toml", garbage, &["garbage.toml", "UTF-8"]),
        ConfigInput {
            what: "missing file",
            file_name: "missing.toml",
            file: None,
            env: vec![],
            flags: vec![],
            wants: vec!["missing.toml", "No such file"],
        },
        ConfigInput::env(
            "env not a number",
            "WORKER__OUTBOX__BATCH_SIZE",
            "abc",
            &["outbox.batch_size", "WORKER__OUTBOX__BATCH_SIZE", "\"abc\""],
        ),
        ConfigInput::env(
            "env not a duration",
            "WORKER__CHATS__STALE_AFTER",
            "bogus",
            &["chats.stale_after", "WORKER__CHATS__STALE_AFTER", "\"bogus\""],
        ),
        ConfigInput::env(
            "env negative size",
            "WORKER__GITSYNC__MAX_BODY_BYTES",
            "-5",
            &["gitsync.max_body_bytes", "WORKER__GITSYNC__MAX_BODY_BYTES", "-5"],
        ),
        ConfigInput::env(
            "env not a boolean",
            "WORKER__OUTBOX__ENABLED",
            "maybe",
            &["outbox.enabled", "WORKER__OUTBOX__ENABLED", "\"maybe\""],
        ),
        ConfigInput::env(
            "env empty value",
            "WORKER__OUTBOX__BATCH_SIZE",
            "",
            &["outbox.batch_size", "WORKER__OUTBOX__BATCH_SIZE"],
        ),
        ConfigInput::env(
            "env scalar for a table array",
            "WORKER__GITSYNC__PROVIDERS",
            "github",
            &["gitsync.providers", "WORKER__GITSYNC__PROVIDERS", "\"github\""],
        ),
        ConfigInput::env(
            "env unknown key",
            "WORKER__OUTBOX__BATCH_SISE",
            "5",
            &["outbox.batch_sise", "WORKER__OUTBOX__BATCH_SISE", "unknown key"],
        ),
        ConfigInput::env(
            "conventional env not a url",
            "REDIS_URL",
            "bogus://",
            &["redis.url", "REDIS_URL", "bogus://"],
        ),
        ConfigInput::env(
            "env unknown section",
            "WORKER__OUTBX__ENABLED",
            "true",
            &["outbx", "WORKER__OUTBX__ENABLED", "unknown key"],
        ),
        ConfigInput::env(
            "env invalid log filter",
            "WORKER__LOG__LEVEL",
            "info,[[[",
            &["log.level", "WORKER__LOG__LEVEL", "info,[[["],
        ),
        ConfigInput {
            what: "flag not a number",
            file_name: "base.toml",
            file: None,
            env: vec![],
            flags: vec!["--set", "outbox.batch_size=lots"],
            wants: vec!["outbox.batch_size", "--set", "\"lots\""],
        },
    ];
    // Valid on its own (checked below), so the env and flag inputs are the only fault.
    std::fs::write(dir.path().join("base.toml"), "[app]\nenv = \"test\"\n\n[log]\nformat = \"json\"\n")
        .expect("base config");
    let base = ConfigInput::file("base", "base.toml", "", &[]);
    let ok = run_worker(dir.path(), &base, &["config", "check"]).await;
    assert_eq!(ok.code, Some(0), "the base config is valid: {}", ok.stderr);

    let started = Instant::now();
    let mut tried = 0;
    let mut exited_nonzero = 0;
    let mut named = 0;
    let mut failures = Vec::new();
    for input in &inputs {
        if let Some(text) = &input.file {
            std::fs::write(dir.path().join(input.file_name), text).expect("write config");
        }
        for args in [&["config", "check"][..], &["run"][..]] {
            tried += 1;
            let ran = run_worker(dir.path(), input, args).await;
            let nonzero = ran.code.is_some_and(|code| code != 0);
            let missing: Vec<&str> =
                input.wants.iter().copied().filter(|w| !ran.stderr.contains(w)).collect();
            exited_nonzero += usize::from(nonzero);
            named += usize::from(missing.is_empty());
            if !nonzero || !missing.is_empty() {
                failures.push(format!(
                    "{} / `worker {}`: exit {:?}, stderr missing {missing:?}: {}",
                    input.what,
                    args.join(" "),
                    ran.code,
                    ran.stderr.trim()
                ));
            }
        }
    }
    report(
        7,
        "bad-config",
        &[
            ("inputs", inputs.len().to_string()),
            ("invocations", tried.to_string()),
            ("exited_nonzero", exited_nonzero.to_string()),
            ("errors_naming_the_thing", named.to_string()),
            ("elapsed_s", format!("{:.1}", started.elapsed().as_secs_f64())),
        ],
    );
    assert!(
        failures.is_empty(),
        "{} of {tried} invocations did not fail naming the input:\n{}",
        failures.len(),
        failures.join("\n")
    );
}

// ---------------------------------------------------------------------------------------------
// 7b. A running replica fed bad input
// ---------------------------------------------------------------------------------------------

/// The agent of 7b: one good message, then what the chat's first user message asks for.
const AGENT_7B: &str = r#"input=$(cat)
printf '%s\n' '{"type":"message","role":"assistant","content":"before the bad line"}'
case "$input" in
  *case-garbage*)
    echo 'agent: about to print garbage' >&2
    printf 'this is not JSON \377\376 {{{ \033[31m\n' ;;
  *case-huge-line*)
    head -c 10485760 /dev/zero | tr '\0' x
    echo ;;
  *case-unknown-event*)
    printf '%s\n' '{"type":"dance","steps":3}' ;;
  *case-bad-role*)
    printf '%s\n' '{"type":"message","role":"system","content":"I am root"}' ;;
  *case-truncated-json*)
    printf '%s\n' '{"type":"message","role":"assistant","content":"cut' ;;
  *case-exit-code*)
    echo 'fatal: model quota exceeded' >&2
    exit 3 ;;
  *)
    printf '%s\n' '{"type":"message","role":"assistant","content":"all good"}' ;;
esac"#;

/// A chat of 7b: the user message that selects the agent's behaviour, the status it must end
/// in and what its `last_error` must say.
struct ChatInput {
    text: &'static str,
    status: &'static str,
    wants: &'static [&'static str],
    id: Uuid,
}

/// A gitsync row of 7b.
struct RowInput {
    origin: &'static str,
    outcome: &'static str,
    wants: &'static [&'static str],
    refuses: &'static [&'static str],
    chat: Uuid,
}

/// An outbox task of 7b: `payload` is an SQL expression; `dead` when the task must be
/// dead-lettered rather than delivered.
struct TaskInput {
    task_id: String,
    queue: String,
    payload: &'static str,
    dead: bool,
    /// `payload::text` as PostgreSQL renders it (what Redis must hold).
    expected: String,
}

/// One replica's config for 7b and 7c: chats, gitsync (against `fake`) and the outbox on, with
/// short intervals, small limits and quick retries so every bad input is met within seconds.
fn running_config(test_db: &TestDb, fake: &FakeGitHub, agent_path: &str) -> WorkerConfig {
    WorkerConfig::for_test(test_db)
        .set("chats.enabled", true)
        .set("chats.acquire_interval", "100ms")
        .set("chats.runner.command", toml::Value::Array(vec![agent_path.to_owned().into()]))
        .set("chats.runner.kill_grace", "2s")
        .set("gitsync.enabled", true)
        .set("gitsync.interval", "200ms")
        .set("gitsync.tick_timeout", "2s")
        .set("gitsync.lease", "10s")
        .set("gitsync.ttl", "1s")
        .set("gitsync.no_token_backoff", "1s")
        .set("gitsync.max_body_bytes", 65_536)
        .set("gitsync.providers", fake.providers_config())
        .set("outbox.enabled", true)
        .set("outbox.interval", "100ms")
        .set("outbox.tick_timeout", "2s")
        .set("outbox.redis_timeout", "1s")
        .set("outbox.max_attempts", 3)
        .set("outbox.backoff_base", "50ms")
        .set("outbox.backoff_max", "200ms")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_7b_a_running_replica_names_each_bad_input_loses_nothing_and_stays_ready() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let fake = FakeGitHub::start().await;
    let agent_path = agent(dir.path(), "agent", AGENT_7B);
    let config = running_config(&test_db, &fake, &agent_path);
    let prefix = config.redis_prefix();
    let redis = redis_client(&common::redis_url()).await;
    let mut replica = Replica::start(dir.path(), "replica", &config);
    replica.ready().await;
    let watch = ReadyzWatch::start(replica.port);
    let started = Instant::now();

    // Chats: agents printing garbage, a 10 MiB line, events of the wrong shape; one good chat.
    let mut chats = vec![
        ChatInput {
            text: "case-garbage",
            status: "error",
            wants: &["line 2 is not a valid event", "this is not JSON", "about to print garbage"],
            id: Uuid::nil(),
        },
        ChatInput {
            text: "case-huge-line",
            status: "error",
            wants: &["line 2 is longer than 1048576 bytes"],
            id: Uuid::nil(),
        },
        ChatInput {
            text: "case-unknown-event",
            status: "error",
            wants: &["line 2 is not a valid event", "dance"],
            id: Uuid::nil(),
        },
        ChatInput {
            text: "case-bad-role",
            status: "error",
            wants: &["line 2 is not a valid event", "system"],
            id: Uuid::nil(),
        },
        ChatInput {
            text: "case-truncated-json",
            status: "error",
            wants: &["line 2 is not a valid event", "EOF"],
            id: Uuid::nil(),
        },
        ChatInput {
            text: "case-exit-code",
            status: "error",
            wants: &["exited with code 3", "model quota exceeded"],
            id: Uuid::nil(),
        },
        ChatInput { text: "case-good", status: "waiting", wants: &[], id: Uuid::nil() },
    ];
    for input in &mut chats {
        input.id = pending_chat(db, input.text).await;
    }

    // Gitsync: GitHub answering HTML, 500, a huge body, the wrong shape, a cut body; origins
    // that are no repository or on a host no provider serves; one good row.
    let big = format!("[{{\"padding\": \"{}\"}}]", "x".repeat(100 * 1024));
    let pulls = fixture("pull-request-simple-items.json");
    let html = vec![("content-type", "text/html; charset=utf-8".to_owned())];
    fake.answer(
        "/repos/html/",
        Answer::Raw { status: 200, headers: html, body: "<html>Unicorn!</html>".into() },
    );
    fake.answer(
        "/repos/e500/",
        Answer::Raw { status: 500, headers: json_headers(), body: r#"{"message":"Server Error"}"#.into() },
    );
    fake.answer("/repos/big/", Answer::Raw { status: 200, headers: json_headers(), body: big });
    fake.answer(
        "/repos/shape/",
        Answer::Raw { status: 200, headers: json_headers(), body: r#"{"not": "a list"}"#.into() },
    );
    fake.answer(
        "/repos/cut/",
        Answer::Raw { status: 200, headers: json_headers(), body: pulls[..pulls.len() / 2].into() },
    );
    fake.pr("good", "r", "b", 1);
    let mut rows = vec![
        RowInput {
            origin: "https://github.com/html/r",
            outcome: "error",
            wants: &["/repos/html/r/pulls", "text/html"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "https://github.com/e500/r",
            outcome: "error",
            wants: &["/repos/e500/r/pulls", "HTTP 500", "Server Error"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "git@github.com:big/r.git",
            outcome: "error",
            wants: &["/repos/big/r/pulls", "65536-byte limit"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "https://github.com/shape/r",
            outcome: "error",
            wants: &["/repos/shape/r/pulls", "unreadable body"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "ssh://git@github.com/cut/r.git",
            outcome: "error",
            wants: &["/repos/cut/r/pulls", "EOF"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "not a url at all",
            outcome: "error",
            wants: &["\"not a url at all\"", "not a repository url"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "https://github.com/only-an-owner",
            outcome: "error",
            wants: &["https://github.com/only-an-owner", "owner/repo"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "ftp://github.com/o/r",
            outcome: "error",
            wants: &["ftp://github.com/o/r", "scheme"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "https://x-access-token:hunter2@github.com/o/r/tree/main",
            outcome: "error",
            wants: &["https://***@github.com/o/r/tree/main"],
            refuses: &["hunter2"],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "git@unknown.example.org:o/r.git",
            outcome: "no_token",
            wants: &["\"unknown.example.org\"", "[[gitsync.providers]]"],
            refuses: &[],
            chat: Uuid::nil(),
        },
        RowInput {
            origin: "https://github.com/good/r",
            outcome: "ok",
            wants: &[],
            refuses: &[],
            chat: Uuid::nil(),
        },
    ];
    let owner = github_owner(db).await;
    for row in &mut rows {
        row.chat = diff_row(db, owner, row.origin, "b").await;
    }

    // Outbox: a payload of exactly outbox.max_payload_bytes (1 MiB of JSON text; 5 MiB is refused
    // at enqueue, below), 10,000 levels of nesting, bare scalars, control characters, queue names
    // and task ids with spaces, unicode, newlines, glob and hash-tag characters, a 1,000-character
    // queue; a queue whose Redis key has the wrong type (dead-lettered).
    let long_queue = "q".repeat(1000);
    let long_task = format!("task-{}", "t".repeat(10_000));
    let tasks_spec: Vec<(String, String, &'static str, bool)> = vec![
        ("huge-1mib".into(), "q-odd".into(), "jsonb_build_object('blob', repeat('x', 1048564))", false),
        ("nested-10000".into(), "q-odd".into(), "(repeat('[', 10000) || repeat(']', 10000))::jsonb", false),
        ("scalar-null".into(), "q-odd".into(), "'null'::jsonb", false),
        ("scalar-string".into(), "q-odd".into(), "to_jsonb('just a string'::text)", false),
        ("scalar-big-number".into(), "q-odd".into(), "'1e308'::jsonb", false),
        (
            "control-chars".into(),
            "q-odd".into(),
            "jsonb_build_object('ctl', E'\\x01\\x1f\\t', 'quote', '\"''\\', 'rtl', E'\\u202e', 'crab', '🦀')",
            false,
        ),
        ("queue-spaces".into(), "queue with spaces".into(), "'{}'::jsonb", false),
        ("queue-unicode".into(), "ünïcödé/队列/🦀".into(), "'{}'::jsonb", false),
        ("queue-hashtag".into(), "colon:and{hash}tag".into(), "'{}'::jsonb", false),
        ("queue-newline".into(), "new\nline\r\n".into(), "'{}'::jsonb", false),
        ("queue-glob".into(), "*?[glob]".into(), "'{}'::jsonb", false),
        ("queue-long".into(), long_queue, "'{}'::jsonb", false),
        ("task id with spaces and 🦀".into(), "q-odd".into(), "'{}'::jsonb", false),
        (long_task, "q-odd".into(), "'{}'::jsonb", false),
        ("wrongtype-1".into(), "wrongtype".into(), "'{\"n\": 1}'::jsonb", true),
        ("wrongtype-2".into(), "wrongtype".into(), "'{\"n\": 2}'::jsonb", true),
    ];
    // The payload hash of queue `wrongtype` is a string: every HSET there fails with WRONGTYPE.
    let wrong_key = worker::redis::key(&prefix, "payload", "wrongtype");
    redis.set::<(), _, _>(&wrong_key, "not a hash", None, None, false).await.expect("SET");
    let mut tasks = Vec::new();
    for (task_id, queue, payload, dead) in tasks_spec {
        let expected: String = db
            .get()
            .await
            .expect("conn")
            .fetch_one(&format!("SELECT ({payload})::text"), &[])
            .await
            .expect("payload text")
            .get(0);
        tasks.push(TaskInput { task_id, queue, payload, dead, expected });
    }
    for task in &tasks {
        exec(
            db,
            &format!("SELECT enqueue_task($1, $2, {})", task.payload),
            &[(&task.task_id, Type::TEXT), (&task.queue, Type::TEXT)],
        )
        .await
        .unwrap_or_else(|e| panic!("enqueue {}: {e}", task.task_id));
    }
    // Inputs the producer API itself refuses, with an error naming the problem: nothing is
    // enqueued, and the producer knows.
    let refused_at_enqueue = [
        (
            "huge-5mib",
            "q-odd",
            "jsonb_build_object('blob', repeat('x', 5242880))",
            "payload is 5242892 bytes, over the limit of 1048576 bytes",
        ),
        ("too-deep", "q-odd", "(repeat('[', 100000) || repeat(']', 100000))::jsonb", "stack depth"),
        ("not-json", "q-odd", "'{not json'::jsonb", "invalid input syntax for type json"),
        ("empty-queue", "", "'{}'::jsonb", "task_outbox_queue_check"),
        ("", "q-odd", "'{}'::jsonb", "task_outbox_task_id_check"),
    ];
    let mut refused_named = 0;
    let mut failures = Vec::new();
    for (task_id, queue, payload, want) in refused_at_enqueue {
        let (task_id, queue) = (task_id.to_owned(), queue.to_owned());
        match exec(
            db,
            &format!("SELECT enqueue_task($1, $2, {payload})"),
            &[(&task_id, Type::TEXT), (&queue, Type::TEXT)],
        )
        .await
        {
            Err(error) if error.contains(want) => refused_named += 1,
            other => failures.push(format!("enqueue_task({task_id:?}, {queue:?}, {payload}): {other:?}")),
        }
    }

    // Chats end as expected, each with the cause named and the earlier message kept.
    let mut chats_named = 0;
    let mut chats_lost = 0;
    for input in &chats {
        let row = chats_support::wait_status(db, input.id, input.status).await;
        let error = row.last_error.clone().unwrap_or_default();
        if input.wants.iter().all(|w| error.contains(w)) && (input.status != "error" || !error.is_empty()) {
            chats_named += 1;
        } else {
            failures.push(format!("chat {}: last_error {error:?} lacks {:?}", input.text, input.wants));
        }
        let users = messages(db, input.id, "user").await;
        let assistants = messages(db, input.id, "assistant").await;
        let kept = users == [serde_json::json!(input.text)]
            && assistants.first() == Some(&serde_json::json!("before the bad line"));
        let expected_answers = if input.status == "waiting" { 2 } else { 1 };
        if !kept || assistants.len() != expected_answers {
            chats_lost += 1;
            failures.push(format!("chat {}: users {users:?}, assistants {assistants:?}", input.text));
        }
    }

    // Gitsync rows record an error naming the thing, then are refreshed again (ttl 1s): none is
    // lost or left leased.
    let mut first = Vec::new();
    for row in &rows {
        let what = format!("a first refresh of {}", row.origin);
        eventually(LIMIT, &what, || async {
            diff_status(db, row.chat).await.is_some_and(|r| r.outcome.is_some() && !r.leased)
        })
        .await;
        first.push(diff_status(db, row.chat).await.expect("row"));
    }
    let mut rows_named = 0;
    for (row, seen) in rows.iter().zip(&first) {
        let error = seen.last_error.clone().unwrap_or_default();
        // A good row may have been refreshed twice already: the second time nothing changed.
        let outcome = match seen.outcome.as_deref() {
            Some("not_modified") => Some("ok"),
            other => other,
        };
        let named = outcome == Some(row.outcome)
            && row.wants.iter().all(|w| error.contains(w))
            && !row.refuses.iter().any(|r| error.contains(r))
            && (row.outcome == "ok") == error.is_empty();
        if named {
            rows_named += 1;
        } else {
            failures.push(format!("gitsync row {}: {seen:?}, wants {:?}", row.origin, row.wants));
        }
    }
    eventually(LIMIT, "every gitsync row to be refreshed again after its ttl", || async {
        for (row, seen) in rows.iter().zip(&first) {
            match diff_status(db, row.chat).await {
                Some(now) if !now.leased && now.stale_at > seen.stale_at => {}
                _ => return false,
            }
        }
        true
    })
    .await;
    let mut rows_lost = 0;
    for (row, seen) in rows.iter().zip(&first) {
        let now = diff_status(db, row.chat).await;
        let same = match &now {
            // Refreshed again with nothing changed.
            Some(now) if row.outcome == "ok" => now.outcome.as_deref() == Some("not_modified"),
            Some(now) => (&now.outcome, &now.last_error) == (&seen.outcome, &seen.last_error),
            None => false,
        };
        if !same {
            rows_lost += 1;
            failures.push(format!("gitsync row {} changed on retry: {seen:?} → {now:?}", row.origin));
        }
    }
    let bad_answers_served = ["html", "e500", "big", "shape", "cut"]
        .iter()
        .map(|repo| fake.requests_under(&format!("/repos/{repo}/")))
        .min()
        .unwrap_or_default();

    // Outbox: everything delivered byte for byte, or dead-lettered with the reason.
    eventually(LIMIT, "the outbox to be empty", || async {
        scalar(db, "SELECT count(*)::int8 FROM task_outbox").await == 0
    })
    .await;
    let mut delivered = 0;
    let mut dead_named = 0;
    let mut tasks_lost = 0;
    for task in &tasks {
        let payload: Option<String> = redis
            .hget(worker::redis::key(&prefix, "payload", &task.queue), &task.task_id)
            .await
            .unwrap_or(None); // WRONGTYPE on the poisoned queue: nothing there
        let score: Option<f64> = redis
            .zscore(worker::redis::key(&prefix, "sched", &task.queue), &task.task_id)
            .await
            .expect("ZSCORE");
        let dead: Option<String> = db
            .get()
            .await
            .expect("conn")
            .fetch_opt(
                "SELECT coalesce(last_error, '') FROM task_outbox_dead WHERE task_id = $1",
                &[(&task.task_id, Type::TEXT)],
            )
            .await
            .expect("dead letter")
            .map(|r| r.get(0));
        let in_redis = payload.as_deref() == Some(task.expected.as_str()) && score.is_some();
        match (task.dead, in_redis, &dead) {
            (false, true, None) => delivered += 1,
            (true, false, Some(error)) if error.contains("WRONGTYPE") && error.contains(&wrong_key) => {
                dead_named += 1
            }
            _ => {
                tasks_lost += 1;
                let shown: String = task.task_id.chars().take(40).collect();
                failures.push(format!(
                    "task {shown:?} (queue {:?}): payload {} bytes (want {}), score {score:?}, dead {dead:?}",
                    task.queue.chars().take(40).collect::<String>(),
                    payload.map_or(0, |p| p.len()),
                    task.expected.len()
                ));
            }
        }
    }
    let dead_total = scalar(db, "SELECT count(*)::int8 FROM task_outbox_dead").await;

    // Loops failing their ticks would turn /readyz 503 after their staleness limit (2.2 s for
    // gitsync and the outbox here): watch past it.
    watch.observe_at_least(Duration::from_secs(4)).await;
    replica.assert_alive();
    let (samples, not_ready, statuses) = watch.failures();
    let loop_errors = watch.loop_errors();
    let inputs = chats.len() + rows.len() + tasks.len() + refused_at_enqueue.len();
    let named = chats_named + rows_named + dead_named + refused_named;
    let expected_named =
        chats.len() + rows.len() + refused_at_enqueue.len() + tasks.iter().filter(|t| t.dead).count();
    let lost = chats_lost + rows_lost + tasks_lost;
    report(
        7,
        "bad-input-running",
        &[
            ("inputs", inputs.to_string()),
            ("chats", format!("{}/{}", chats_named, chats.len())),
            ("gitsync_rows", format!("{}/{}", rows_named, rows.len())),
            ("bad_answers_per_repo", bad_answers_served.to_string()),
            ("outbox_delivered", delivered.to_string()),
            ("outbox_dead_lettered", format!("{dead_named}/{dead_total}")),
            ("refused_at_enqueue", refused_named.to_string()),
            ("errors_naming_the_thing", format!("{named}/{expected_named}")),
            ("lost", lost.to_string()),
            ("readyz_samples", samples.to_string()),
            ("readyz_not_200", not_ready.to_string()),
            ("loop_tick_errors", loop_errors.len().to_string()),
            ("elapsed_s", format!("{:.1}", started.elapsed().as_secs_f64())),
        ],
    );
    assert!(
        failures.is_empty(),
        "{} inputs were not handled as required:\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert_eq!((named, lost), (expected_named, 0));
    assert_eq!(dead_total, 2, "only the wrong-type queue's tasks are dead letters");
    assert!(bad_answers_served >= 2, "each bad GitHub answer was served again on the retry");
    assert_eq!(not_ready, 0, "/readyz answered {statuses:?} after it was ready");
    assert!(loop_errors.is_empty(), "bad input failed whole ticks: {loop_errors:?}");
    assert_eq!(replica.sigterm(LIMIT).await.code(), Some(0), "drains on SIGTERM");
}

// ---------------------------------------------------------------------------------------------
// 7c. Poison values: well-formed input that PostgreSQL refuses to store
// ---------------------------------------------------------------------------------------------

/// The agent of 7c: one good message, then a NUL character where the database cannot take it.
const AGENT_7C: &str = r#"input=$(cat)
printf '%s\n' '{"type":"message","role":"assistant","content":"before the poison"}'
case "$input" in
  *poison-content*)
    printf '%s\n' '{"type":"message","role":"assistant","content":"a NUL \u0000 in the content"}' ;;
  *poison-title*)
    printf '%s\n' '{"type":"title","title":"a NUL \u0000 in the title"}' ;;
  *poison-stderr*)
    printf 'crashed with a NUL \000 on stderr\n' >&2
    exit 1 ;;
esac"#;

/// The PR `owner/repo#number` on branch `branch` with `title`, as GitHub's example payload.
fn pull_request_titled(owner: &str, repo: &str, number: i64, branch: &str, title: &str) -> String {
    let mut pr: serde_json::Value = serde_json::from_str(&fixture("pull-request.json")).expect("fixture");
    pr["number"] = number.into();
    pr["title"] = title.into();
    pr["html_url"] = format!("https://github.com/{owner}/{repo}/pull/{number}").into();
    pr["head"]["ref"] = branch.into();
    pr["head"]["label"] = format!("{owner}:{branch}").into();
    pr["head"]["sha"] = HEAD_SHA.into();
    pr.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_7c_poison_values_the_database_refuses_end_in_a_named_error_not_a_loop() {
    const WITHIN: Duration = Duration::from_secs(15);
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let fake = FakeGitHub::start().await;
    let agent_path = agent(dir.path(), "agent", AGENT_7C);
    // A 1 s heartbeat: a chat released by a failed write would be rerun within seconds.
    let config = running_config(&test_db, &fake, &agent_path).set("chats.heartbeat_interval", "1s");
    let prefix = config.redis_prefix();
    let redis = redis_client(&common::redis_url()).await;
    let mut replica = Replica::start(dir.path(), "replica", &config);
    replica.ready().await;
    let watch = ReadyzWatch::start(replica.port);

    // Chats: a message content, a title and a stderr tail holding a NUL character.
    let cases = ["poison-content", "poison-title", "poison-stderr"];
    let mut chats = Vec::new();
    for case in cases {
        chats.push(pending_chat(db, case).await);
    }
    // Gitsync: a pull request whose title holds a NUL character.
    fake.pr("nul", "r", "b", 1);
    fake.answer(
        "/repos/nul/r/pulls/1",
        Answer::Raw {
            status: 200,
            headers: json_headers(),
            body: pull_request_titled("nul", "r", 1, "b", "a NUL \u{0} in the title"),
        },
    );
    fake.answer(
        "/repos/nul/r/pulls/1/reviews",
        Answer::Raw { status: 200, headers: json_headers(), body: fixture("pull-request-review-items.json") },
    );
    let row = diff_row(db, github_owner(db).await, "https://github.com/nul/r", "b").await;
    // Outbox: a task due at -infinity (refused by name since V6: before, the row stopped every
    // claim), and an ordinary one after it.
    let refused =
        exec(db, "SELECT enqueue_task('poison-minus-infinity', 'q-poison', '{}', '-infinity')", &[])
            .await
            .err()
            .unwrap_or_default();
    exec(db, "SELECT enqueue_task('behind-the-poison', 'q-poison', '{}')", &[]).await.expect("enqueue");
    let started = Instant::now();

    let chats_settled = within(WITHIN, || async {
        for id in &chats {
            let row = chat(db, *id).await;
            if row.status != "error" || row.last_error.is_none() {
                return false;
            }
        }
        true
    })
    .await;
    // The NUL becomes U+FFFD in the stored title (text::storable): the status is written.
    let row_settled = within(Duration::from_secs(5), || async {
        diff_status(db, row).await.is_some_and(|r| r.outcome.as_deref() == Some("ok") && !r.leased)
    })
    .await;
    let stored_title: Option<String> = db
        .get()
        .await
        .expect("conn")
        .fetch_one("SELECT title FROM chat_diff_statuses WHERE chat_id = $1", &[(&row, Type::UUID)])
        .await
        .expect("title")
        .get(0);
    let behind_delivered = within(Duration::from_secs(5), || async {
        let score: Option<f64> = redis
            .zscore(worker::redis::key(&prefix, "sched", "q-poison"), "behind-the-poison")
            .await
            .expect("ZSCORE");
        score.is_some()
    })
    .await;
    // What each input came to.
    let mut findings = Vec::new();
    let mut named = 0;
    let mut rerun = 0;
    let mut lost = 0;
    let mut duplicated = 0;
    for (case, id) in cases.iter().zip(&chats) {
        let row = chat(db, *id).await;
        let kept = messages(db, *id, "assistant").await.len();
        lost += usize::from(messages(db, *id, "user").await != [serde_json::json!(case)] || kept == 0);
        duplicated += kept.saturating_sub(1);
        if row.status == "error" && row.last_error.is_some() {
            named += 1;
        } else {
            findings.push(format!(
                "chat {case}: status {} generation {} (agent runs), {kept} copies of its first answer, last_error {:?}",
                row.status, row.generation, row.last_error
            ));
        }
        rerun += usize::from(row.generation > 1);
    }
    let diff = diff_status(db, row).await.expect("the diff row is never deleted");
    if row_settled && stored_title.as_deref() == Some("a NUL \u{FFFD} in the title") {
        named += 1;
    } else {
        let warned = replica
            .problems()
            .iter()
            .filter(|p| p["message"].as_str().is_some_and(|m| m.contains("cannot write a diff status")))
            .count();
        findings.push(format!(
            "gitsync row with a NUL title: {diff:?}, title {stored_title:?}; {warned} log warnings 'cannot write a diff status'"
        ));
    }
    let poison: Option<(i32, Option<String>)> = db
        .get()
        .await
        .expect("conn")
        .fetch_opt(
            "SELECT attempts, last_error FROM task_outbox WHERE task_id = 'poison-minus-infinity'",
            &[],
        )
        .await
        .expect("poison row")
        .map(|r| (r.get(0), r.get(1)));
    let poison_dead = scalar(db, "SELECT count(*)::int8 FROM task_outbox_dead").await;
    let outbox_rows = scalar(db, "SELECT count(*)::int8 FROM task_outbox").await;
    let in_redis: i64 = redis.zcard(worker::redis::key(&prefix, "sched", "q-poison")).await.expect("ZCARD");
    // One task was accepted (the refused one never existed, and its producer got the error).
    lost += 1usize.saturating_sub((outbox_rows + poison_dead + in_redis) as usize);
    if behind_delivered && poison.is_none() && refused.contains("run_at must be a finite time") {
        named += 1;
    } else {
        findings.push(format!(
            "outbox: -infinity refused with {refused:?}; the task after it delivered: {behind_delivered}; \
             the row: {poison:?}, dead letters {poison_dead}"
        ));
    }
    watch.observe_at_least(Duration::from_secs(3)).await;
    replica.assert_alive();
    let (samples, not_ready, statuses) = watch.failures();
    let loop_errors = watch.loop_errors();
    // The daemon's own account, for the report: its distinct warnings and errors.
    let mut logged = BTreeSet::new();
    for problem in replica.problems() {
        let error: String = problem["error"].as_str().unwrap_or_default().chars().take(160).collect();
        let (level, message) =
            (problem["level"].as_str().unwrap_or("?"), problem["message"].as_str().unwrap_or("?"));
        logged.insert(format!("{level} {message}: {error}"));
    }
    report(
        7,
        "poison-values",
        &[
            ("inputs", (cases.len() + 2).to_string()),
            ("errors_naming_the_thing", named.to_string()),
            ("chats_rerun", rerun.to_string()),
            ("duplicated_messages", duplicated.to_string()),
            ("lost", lost.to_string()),
            ("readyz_samples", samples.to_string()),
            ("readyz_not_200", not_ready.to_string()),
            ("loop_tick_errors", loop_errors.len().to_string()),
            ("elapsed_s", format!("{:.1}", started.elapsed().as_secs_f64())),
        ],
    );
    assert!(
        findings.is_empty() && chats_settled,
        "{} poison inputs did not end in a named error:\n{}\nloop tick errors: {loop_errors:?}\nlogged:\n{}",
        findings.len(),
        findings.join("\n"),
        logged.into_iter().collect::<Vec<_>>().join("\n")
    );
    assert_eq!(lost, 0, "nothing lost");
    assert_eq!(not_ready, 0, "/readyz answered {statuses:?} after it was ready");
    assert!(loop_errors.is_empty(), "bad input failed whole ticks: {loop_errors:?}");
    assert_eq!(replica.sigterm(LIMIT).await.code(), Some(0), "drains on SIGTERM");
}
