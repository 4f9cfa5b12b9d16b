//! Traces on a real run (`telemetry.traces = true`): a `worker run` process exporting OTLP/HTTP to
//! an in-test receiver, with the demo agent, which reads `TRACEPARENT` and sends a span of its own
//! as OTLP JSON to the same receiver.
//!
//! - A chat turn is one trace: the acquire tick's span → the turn's span → the agent's span.
//! - An outbox sweep's span links to the span a producer passed to `enqueue_task`.
//! - A GitHub request is a span under the gitsync tick.

mod chaos_support;
mod common;
mod gitsync_support;

use std::collections::BTreeMap;
use std::time::Duration;

use chaos_support::{Replica, WorkerConfig};
use common::TestDb;
use common::otlp::{Otlp, ReceivedSpan};
use common::process::repo_path;
use gitsync_support::FakeGitHub;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::{Db, Exec};

async fn exec(db: &Db, sql: &str, params: &[worker::db::Param<'_>]) {
    let conn = db.get().await.expect("conn");
    conn.exec(sql, params).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The spans received so far, by span id.
#[derive(Default)]
struct Seen(BTreeMap<String, ReceivedSpan>);

impl Seen {
    fn named<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a ReceivedSpan> + 'a {
        self.0.values().filter(move |s| s.name == name)
    }

    fn by_id(&self, span_id: &str) -> Option<&ReceivedSpan> {
        self.0.get(span_id)
    }

    /// The agent's span, its turn's span and that turn's tick span, once all three are here.
    fn turn_chain(&self, chat: Uuid) -> Option<(&ReceivedSpan, &ReceivedSpan, &ReceivedSpan)> {
        let turn = self
            .named("chat turn")
            .find(|s| s.attributes.get("chat.id").map(String::as_str) == Some(chat.to_string().as_str()))?;
        let agent = self.named("demo-agent answer").find(|s| s.parent_span_id == turn.span_id)?;
        let tick = self.by_id(&turn.parent_span_id)?;
        Some((tick, turn, agent))
    }

    /// The sweep span linking to `span_id`, and its parent, once both are here.
    fn linked_sweep(&self, span_id: &str) -> Option<(&ReceivedSpan, &ReceivedSpan)> {
        let sweep = self.named("outbox sweep").find(|s| s.links.iter().any(|(_, id)| id == span_id))?;
        Some((sweep, self.by_id(&sweep.parent_span_id)?))
    }

    /// A GitHub request span and the tick span it is under.
    fn github_request(&self) -> Option<(&ReceivedSpan, &ReceivedSpan)> {
        self.named("github request").find_map(|s| Some((s, self.by_id(&s.parent_span_id)?)))
    }

    fn names(&self) -> Vec<&str> {
        let mut names: Vec<&str> = self.0.values().map(|s| s.name.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        names
    }
}

#[tokio::test]
async fn a_turn_a_sweep_and_a_github_request_are_spans_of_one_trace_each_with_their_parents() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let fake = FakeGitHub::start().await;
    let mut otlp = Otlp::start().await;

    // A pending chat; a due task whose producer traced (a span of its own we know); a due diff
    // status whose PR the fake serves, and its owner's token.
    let chat = Uuid::new_v4();
    exec(
        db,
        "INSERT INTO chats (id, owner_id) VALUES ($1, $2)",
        &[(&chat, Type::UUID), (&Uuid::new_v4(), Type::UUID)],
    )
    .await;
    exec(db, "SELECT post_chat_message($1, 'user', '\"hello\"')", &[(&chat, Type::UUID)]).await;
    let producer_trace = "0af7651916cd43dd8448eb211c80319c";
    let producer_span = "b7ad6b7169203331";
    let traceparent = format!("00-{producer_trace}-{producer_span}-01");
    exec(
        db,
        "SELECT enqueue_task('traced', 'emails', '{}'::jsonb, now(), NULL, $1)",
        &[(&traceparent, Type::TEXT)],
    )
    .await;
    let owner = Uuid::new_v4();
    exec(
        db,
        "INSERT INTO external_auth_links (user_id, provider_id, access_token) VALUES ($1, 'github', $2)",
        &[(&owner, Type::UUID), (&format!("tok-{owner}"), Type::TEXT)],
    )
    .await;
    fake.pr("octocat", "Hello-World", "topic", 7);
    exec(
        db,
        "WITH c AS (INSERT INTO chats (owner_id) VALUES ($1) RETURNING id) \
         SELECT mark_diff_stale(c.id, 'https://github.com/octocat/Hello-World', 'topic') FROM c",
        &[(&owner, Type::UUID)],
    )
    .await;

    let demo_agent = repo_path("scripts/demo-agent").to_string_lossy().into_owned();
    let github = toml::toml! {
        id = "github"
        kind = "github"
        origin_host = "github.com"
        allow_insecure_http = true
    };
    let mut github = github;
    github.insert("api_base_url".into(), fake.base_url.clone().into());
    let config = WorkerConfig::for_test(&test_db)
        .set("telemetry.otlp_endpoint", otlp.endpoint.clone())
        .set("telemetry.traces", true)
        .set("telemetry.trace_sample_ratio", 1.0)
        .set("outbox.enabled", true)
        .set("gitsync.enabled", true)
        .set("gitsync.interval", "200ms")
        .set("gitsync.providers", toml::Value::Array(vec![toml::Value::Table(github)]))
        .set("chats.enabled", true)
        .set("chats.runner.command", vec![demo_agent])
        .set("chats.runner.env.DEMO_AGENT_DELAY_MS", "0")
        .set("chats.runner.env.OTEL_EXPORTER_OTLP_ENDPOINT", otlp.endpoint.clone());
    // Spans leave the batch every 200 ms instead of every 5 s.
    let mut replica =
        Replica::start_with_env(dir.path(), "replica", &config, &[("OTEL_BSP_SCHEDULE_DELAY", "200")]);
    replica.ready().await;

    let mut seen = Seen::default();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while seen.turn_chain(chat).is_none()
        || seen.linked_sweep(producer_span).is_none()
        || seen.github_request().is_none()
    {
        let span = tokio::time::timeout_at(deadline, otlp.spans.recv())
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "not all spans within 30 s; span names seen: {:?}\n{}",
                    seen.names(),
                    replica.log_tail(40)
                )
            })
            .expect("receiver open");
        seen.0.insert(span.span_id.clone(), span);
    }

    let (tick, turn, agent) = seen.turn_chain(chat).expect("the turn's spans");
    assert_eq!(tick.name, "tick chats_acquire");
    assert_eq!(tick.attributes.get("loop").map(String::as_str), Some("chats_acquire"));
    assert_eq!(tick.attributes.get("outcome").map(String::as_str), Some("ok"));
    assert_eq!(tick.attributes.get("rows").map(String::as_str), Some("1"), "{tick:?}");
    assert_eq!(
        (turn.trace_id.as_str(), agent.trace_id.as_str()),
        (tick.trace_id.as_str(), tick.trace_id.as_str())
    );
    assert_eq!(turn.attributes.get("chat.generation").map(String::as_str), Some("1"), "{turn:?}");
    assert_eq!(turn.attributes.get("chat.turn.outcome").map(String::as_str), Some("completed"), "{turn:?}");
    assert_eq!(turn.attributes.get("chat.turn.messages_written").map(String::as_str), Some("3"), "{turn:?}");
    assert_eq!(turn.attributes.get("agent.exit_code").map(String::as_str), Some("0"), "{turn:?}");
    assert_eq!(turn.status, 0, "a completed turn is no error: {turn:?}");
    assert_eq!(agent.attributes.get("chat.id").map(String::as_str), Some(chat.to_string().as_str()));

    let (sweep, sweep_tick) = seen.linked_sweep(producer_span).expect("the sweep's spans");
    assert!(sweep.links.contains(&(producer_trace.to_owned(), producer_span.to_owned())), "{sweep:?}");
    assert_ne!(sweep.trace_id, producer_trace, "linked, not joined: the sweep is the worker's trace");
    assert_eq!(sweep_tick.name, "tick outbox");
    assert_eq!(sweep.trace_id, sweep_tick.trace_id);
    assert_eq!(sweep.attributes.get("outbox.dispatched").map(String::as_str), Some("1"), "{sweep:?}");

    let (request, gitsync_tick) = seen.github_request().expect("a GitHub request span");
    assert_eq!(gitsync_tick.name, "tick gitsync");
    assert_eq!(request.trace_id, gitsync_tick.trace_id);
    assert_eq!(
        request.attributes.get("http.response.status_class").map(String::as_str),
        Some("2xx"),
        "{request:?}"
    );
    assert!(request.attributes.contains_key("github.rate_limit.remaining"), "{request:?}");

    replica.sigterm(Duration::from_secs(20)).await;
}

#[tokio::test]
async fn enqueue_task_keeps_a_w3c_traceparent_and_stores_anything_else_as_null() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let valid = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    for (task, traceparent) in [
        ("valid", Some(valid)),
        ("upper", Some("00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01")),
        ("none", None),
        ("blank", Some("  ")),
        ("garbage", Some("not a traceparent")),
        ("zero-trace", Some("00-00000000000000000000000000000000-b7ad6b7169203331-01")),
        ("zero-span", Some("00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01")),
        ("version-ff", Some("ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01")),
    ] {
        exec(
            db,
            "SELECT enqueue_task($1, 'q', '{}'::jsonb, now() + interval '1 hour', NULL, $2)",
            &[(&task, Type::TEXT), (&traceparent, Type::TEXT)],
        )
        .await;
    }
    // The five-argument call of every existing producer still works.
    exec(db, "SELECT enqueue_task('five', 'q', '{}'::jsonb, now() + interval '1 hour', NULL)", &[]).await;
    let conn = db.get().await.expect("conn");
    let rows = conn
        .fetch_all("SELECT task_id, traceparent FROM task_outbox ORDER BY task_id", &[])
        .await
        .expect("select");
    let stored: BTreeMap<String, Option<String>> = rows.iter().map(|r| (r.get(0), r.get(1))).collect();
    let expected: BTreeMap<String, Option<String>> = [
        ("blank", None),
        ("five", None),
        ("garbage", None),
        ("none", None),
        ("upper", Some(valid)),
        ("valid", Some(valid)),
        ("version-ff", None),
        ("zero-span", None),
        ("zero-trace", None),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_owned(), v.map(str::to_owned)))
    .collect();
    assert_eq!(stored, expected);
    // The column refuses what the function would never store.
    let direct = conn
        .exec(
            "INSERT INTO task_outbox (task_id, queue, payload, traceparent) VALUES ('x', 'q', '{}', 'nope')",
            &[],
        )
        .await;
    assert!(direct.is_err(), "the CHECK refuses a malformed traceparent");
}

/// The function is dropped and created again (a new argument): whoever could call the old one can
/// call the new one, and whoever could not still cannot.
#[tokio::test]
async fn the_new_enqueue_task_keeps_the_privileges_granted_on_the_old_one() {
    let test_db = TestDb::empty().await;
    let client = worker::db::connect_direct(&test_db.url, "worker-tests").await.expect("connect");
    let mut migrations: Vec<std::path::PathBuf> = std::fs::read_dir(repo_path("migrations"))
        .expect("migrations")
        .map(|e| e.expect("entry").path())
        .collect();
    let version = |p: &std::path::PathBuf| -> u32 {
        let name = p.file_name().and_then(|n| n.to_str()).expect("name");
        name[1..name.find("__").expect("V{n}__")].parse().expect("version")
    };
    migrations.sort_by_key(version);
    for path in migrations.iter().filter(|p| version(p) <= 10) {
        client.batch_execute(&std::fs::read_to_string(path).expect("read")).await.expect("older migration");
    }
    let suffix = Uuid::new_v4().simple().to_string();
    let (api, other) = (format!("traces_api_{suffix}"), format!("traces_other_{suffix}"));
    client
        .batch_execute(&format!(
            "CREATE ROLE {api}; CREATE ROLE {other}; \
             REVOKE EXECUTE ON FUNCTION enqueue_task(text, text, jsonb, timestamptz, text) FROM PUBLIC; \
             GRANT EXECUTE ON FUNCTION enqueue_task(text, text, jsonb, timestamptz, text) TO {api}"
        ))
        .await
        .expect("grants");
    let v11 = migrations.iter().find(|p| version(p) == 11).expect("V11");
    client.batch_execute(&std::fs::read_to_string(v11).expect("read")).await.expect("V11");
    let can_call = |role: &str| {
        format!(
            "SELECT has_function_privilege('{role}', \
             'enqueue_task(text, text, jsonb, timestamptz, text, text)', 'EXECUTE')"
        )
    };
    let api_can: bool = client.query_one(&can_call(&api), &[]).await.expect("api").get(0);
    let other_can: bool = client.query_one(&can_call(&other), &[]).await.expect("other").get(0);
    let old_left: Option<String> = client
        .query_one("SELECT to_regprocedure('enqueue_task(text, text, jsonb, timestamptz, text)')::text", &[])
        .await
        .expect("old")
        .get(0);
    drop(client);
    let admin = worker::db::connect_direct(&common::admin_url(), "worker-tests").await.expect("admin");
    // Roles are the cluster's: the database (holding their grants) goes first, then the roles.
    for sql in [format!("DROP DATABASE {} WITH (FORCE)", test_db.name), format!("DROP ROLE {api}, {other}")] {
        admin.batch_execute(&sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
    }
    assert!(api_can, "the role granted EXECUTE on the old function can call the new one");
    assert!(!other_can, "EXECUTE revoked from PUBLIC stays revoked");
    assert_eq!(old_left, None, "no five-argument overload is left to make calls ambiguous");
}
