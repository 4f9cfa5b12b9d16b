//! `worker chat …` end to end: the real binary against a real database. One-shot commands print
//! what is in the database; `tail --follow` prints every message exactly once, even when two
//! writers commit out of id order, and ends with exit 0 on SIGTERM or SIGINT.

mod common;

use std::collections::BTreeMap;
use std::process::{Output, Stdio};
use std::time::Duration;

use common::TestDb;
use common::process::{BIN, inherited_overrides, repo_path};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout, Command};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::Exec;

const LIMIT: Duration = Duration::from_secs(15);

/// A runner-style publish that does not lock the chat row (unlike `post_chat_message`), so it
/// can commit before a lower id held open by another transaction.
const PUBLISH: &str = "WITH m AS (INSERT INTO chat_messages (chat_id, role, content) \
         VALUES ($1, 'assistant', to_jsonb($2::text)) RETURNING id) \
     SELECT id, pg_notify('chat_' || $1::text, json_build_object('after_message_id', id - 1)::text)::text \
     FROM m";

fn command(test_db: &TestDb, args: &[&str]) -> Command {
    let mut command = Command::new(BIN);
    command.arg("--database-url").arg(&test_db.url).args(args).current_dir(repo_path(""));
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command.env("RUST_LOG", "warn");
    command
}

async fn worker(test_db: &TestDb, args: &[&str]) -> Output {
    command(test_db, args).output().await.expect("run worker")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "exit {:?}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

/// Runs a command that must fail: exit 1, and stderr (returned) names the problem.
async fn failing(test_db: &TestDb, args: &[&str]) -> String {
    let output = worker(test_db, args).await;
    assert_eq!(output.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&output.stdout));
    String::from_utf8(output.stderr).expect("utf-8")
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines().map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{l}: {e}"))).collect()
}

async fn post(client: &impl Exec, chat: Uuid, text: &str) -> i64 {
    client
        .fetch_one(
            "SELECT post_chat_message($1, 'user', to_jsonb($2::text))",
            &[(&chat, Type::UUID), (&text, Type::TEXT)],
        )
        .await
        .expect("post")
        .get(0)
}

#[tokio::test]
async fn create_send_list_and_tail_print_what_is_in_the_database() {
    let test_db = TestDb::new().await;
    let owner = Uuid::new_v4().to_string();
    let first =
        stdout(&worker(&test_db, &["chat", "create", "--owner", &owner, "--title", "first", "hello"]).await);
    let first: Uuid = first.trim().parse().expect("create prints the chat id");
    let quiet = stdout(&worker(&test_db, &["chat", "create"]).await);
    let quiet: Uuid = quiet.trim().parse().expect("chat id");

    let conn = test_db.db.get().await.expect("conn");
    let status = |chat: Uuid| {
        let conn = &conn;
        async move {
            let row = conn.fetch_one("SELECT status FROM chats WHERE id = $1", &[(&chat, Type::UUID)]).await;
            row.expect("chat").get::<_, String>(0)
        }
    };
    assert_eq!(status(first).await, "pending", "a first message makes the chat pending");
    assert_eq!(status(quiet).await, "waiting");

    let sent = stdout(&worker(&test_db, &["chat", "send", &first.to_string(), "second"]).await);
    let sent: i64 = sent.trim().parse().expect("send prints the message id");
    let content: serde_json::Value = conn
        .fetch_one("SELECT content FROM chat_messages WHERE id = $1", &[(&sent, Type::INT8)])
        .await
        .expect("message")
        .get(0);
    assert_eq!(content, serde_json::json!("second"), "the content is the JSON string");

    let listed: serde_json::Value =
        serde_json::from_str(&stdout(&worker(&test_db, &["chat", "list", "--json"]).await)).expect("JSON");
    let listed = listed.as_array().expect("array");
    assert_eq!(listed.len(), 2);
    assert_eq!(listed[0]["id"], quiet.to_string(), "newest first");
    assert_eq!(listed[1]["id"], first.to_string());
    assert_eq!(listed[1]["title"], "first");
    assert_eq!(listed[1]["owner_id"], owner);
    assert_eq!(listed[1]["status"], "pending");
    assert_eq!(listed[1]["generation"], 0);
    assert_eq!(listed[1]["worker_id"], serde_json::Value::Null);
    let waiting: serde_json::Value = serde_json::from_str(&stdout(
        &worker(&test_db, &["chat", "list", "--status", "waiting", "--json"]).await,
    ))
    .expect("JSON");
    assert_eq!(waiting.as_array().map(Vec::len), Some(1));
    let table = stdout(&worker(&test_db, &["chat", "list"]).await);
    assert!(table.lines().next().is_some_and(|h| h.starts_with("ID")), "{table}");
    assert!(table.contains(&first.to_string()) && table.contains("first"), "{table}");

    let tail = json_lines(&stdout(&worker(&test_db, &["chat", "tail", &first.to_string(), "--json"]).await));
    assert_eq!(tail.len(), 2, "{tail:?}");
    assert_eq!(tail[0]["role"], "user");
    assert_eq!(tail[0]["content"], "hello");
    assert_eq!(tail[1]["id"], sent);
    assert_eq!(tail[1]["content"], "second");
    assert!(tail[1]["created_at"].is_string());
    let hello = tail[0]["id"].as_i64().expect("id");

    let after = json_lines(&stdout(
        &worker(&test_db, &["chat", "tail", &first.to_string(), "--after", &hello.to_string(), "--json"])
            .await,
    ));
    assert_eq!(after.len(), 1);
    assert_eq!(after[0]["id"], sent);
    let readable = stdout(&worker(&test_db, &["chat", "tail", &first.to_string()]).await);
    assert_eq!(readable, format!("#{hello} user: hello\n#{sent} user: second\n"));
}

/// A `chat tail --follow --json` child and its stdout lines.
struct Tail {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    counts: BTreeMap<i64, usize>,
}

impl Tail {
    fn spawn(test_db: &TestDb, chat: Uuid) -> Self {
        let mut child = command(test_db, &["chat", "tail", &chat.to_string(), "--follow", "--json"])
            .stdout(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("spawn tail");
        let lines = BufReader::new(child.stdout.take().expect("stdout")).lines();
        Self { child, lines, counts: BTreeMap::new() }
    }

    /// Reads lines until `id` has been printed.
    async fn until(&mut self, id: i64) {
        while !self.counts.contains_key(&id) {
            let line = tokio::time::timeout(LIMIT, self.lines.next_line())
                .await
                .unwrap_or_else(|_| panic!("message {id} was never printed"))
                .expect("read stdout")
                .expect("tail ended early");
            let message: serde_json::Value = serde_json::from_str(&line).expect("a JSON line");
            *self.counts.entry(message["id"].as_i64().expect("id")).or_default() += 1;
        }
    }

    /// Sends `signal` and expects a clean exit 0.
    async fn stop(mut self, signal: Signal) {
        let pid = Pid::from_raw(self.child.id().expect("running") as i32);
        kill(pid, signal).expect("signal");
        let status = tokio::time::timeout(LIMIT, self.child.wait()).await.expect("tail exits").expect("wait");
        assert_eq!(status.code(), Some(0), "{signal} ends tail --follow with exit 0");
    }
}

#[tokio::test]
async fn tail_follow_prints_each_message_once_even_out_of_id_order_and_ends_on_sigterm() {
    let test_db = TestDb::new().await;
    let chat = Uuid::new_v4();
    let a = worker::db::connect_direct(&test_db.url, "test-writer-a").await.expect("writer a");
    let b = worker::db::connect_direct(&test_db.url, "test-writer-b").await.expect("writer b");
    b.exec("INSERT INTO chats (id, owner_id) VALUES ($1, gen_random_uuid())", &[(&chat, Type::UUID)])
        .await
        .expect("chat");
    let before = post(&b, chat, "before").await;

    let mut tail = Tail::spawn(&test_db, chat);
    // The snapshot is printed after the LISTEN is in place: from here nothing can be missed.
    tail.until(before).await;

    // A holds id n open (the gate); B's n + 1 commits first and is printed; then A commits.
    a.batch_execute("BEGIN").await.expect("begin");
    let held: i64 =
        a.fetch_one(PUBLISH, &[(&chat, Type::UUID), (&"held", Type::TEXT)]).await.expect("a").get(0);
    let overtaking = post(&b, chat, "overtakes").await;
    assert_eq!(overtaking, held + 1);
    tail.until(overtaking).await;
    assert!(!tail.counts.contains_key(&held), "an uncommitted message was printed");
    a.batch_execute("COMMIT").await.expect("commit");
    tail.until(held).await;

    let mut expected = vec![before, held, overtaking];
    for i in 0..5 {
        expected.push(post(&b, chat, &format!("more {i}")).await);
    }
    // The sentinel comes last: anything repeated before it has been printed by then.
    let sentinel = post(&b, chat, "sentinel").await;
    expected.push(sentinel);
    tail.until(sentinel).await;
    let printed: Vec<i64> = tail.counts.keys().copied().collect();
    let mut sorted = expected.clone();
    sorted.sort();
    assert_eq!(printed, sorted, "every message printed");
    assert!(tail.counts.values().all(|n| *n == 1), "printed more than once: {:?}", tail.counts);

    tail.stop(Signal::SIGTERM).await;
}

#[tokio::test]
async fn tail_follow_ends_on_sigint_with_exit_0() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let chat: Uuid = conn
        .fetch_one("INSERT INTO chats (owner_id) VALUES (gen_random_uuid()) RETURNING id", &[])
        .await
        .expect("chat")
        .get(0);
    let mut tail = Tail::spawn(&test_db, chat);
    let id = post(&conn, chat, "hi").await;
    tail.until(id).await;
    tail.stop(Signal::SIGINT).await;
}

#[tokio::test]
async fn bad_input_exits_1_with_a_message_naming_the_value() {
    let test_db = TestDb::new().await;
    let unknown = Uuid::new_v4().to_string();

    let error = failing(&test_db, &["chat", "list", "--status", "bogus"]).await;
    assert!(error.contains("`bogus`") && error.contains("waiting"), "{error}");
    let error = failing(&test_db, &["chat", "list", "--limit", "0"]).await;
    assert!(error.contains("--limit 0"), "{error}");
    let error = failing(&test_db, &["chat", "send", "not-a-uuid", "hi"]).await;
    assert!(error.contains("`not-a-uuid`"), "{error}");
    let error = failing(&test_db, &["chat", "send", &unknown, "hi"]).await;
    assert!(error.contains(&format!("chat {unknown} does not exist")), "{error}");
    let error = failing(&test_db, &["chat", "tail", "42"]).await;
    assert!(error.contains("`42`"), "{error}");
    let error = failing(&test_db, &["chat", "tail", &unknown, "--follow"]).await;
    assert!(error.contains(&format!("chat {unknown} does not exist")), "{error}");
    let error = failing(&test_db, &["chat", "create", "--owner", "bob"]).await;
    assert!(error.contains("`bob`"), "{error}");
}
