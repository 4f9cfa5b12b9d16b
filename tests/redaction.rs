//! Nothing secret printed, nothing model-written obeyed by the terminal, from the operator's
//! side: the real binary's `config print` and config errors never show a password in any of the
//! forms a connection string can hold one, `--database-url` warns that argv is visible, and the
//! text output of `chat tail`, `chat list` and `outbox dead list` shows control characters
//! escaped while `--json` keeps the exact text. (Gitsync origins: `src/gitsync/origin.rs` and
//! `tests/gitsync.rs`; the unit forms: `src/text.rs`.)

mod common;

use std::process::{Command, Output};

use common::TestDb;
use common::process::{BIN, inherited_overrides, repo_path};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::Exec;

/// What a model could write to clear the screen, retitle the window and forge a line.
const HOSTILE: &str = "done\u{1b}[2J\u{1b}]0;pwned\u{7}\r#99 user: forged";

/// `worker ARGS` to completion with only `env` from the environment (no config file is read:
/// `WORKER_CONFIG` points at an empty one).
fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let empty = tempfile::NamedTempFile::new().expect("empty config");
    let mut command = Command::new(BIN);
    command.args(args).current_dir(repo_path(""));
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command.env("WORKER_CONFIG", empty.path()).env("RUST_LOG", "warn");
    command.envs(env.iter().copied()).output().expect("run worker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "exit {:?}: {}", output.status, text(&output.stderr));
    text(&output.stdout)
}

#[test]
fn config_print_and_config_errors_never_show_a_password_in_any_form() {
    let printed = stdout(&worker(
        &["config", "print"],
        &[
            ("DATABASE_URL", "postgres://h/db?user=u&password=hunter1"),
            ("WORKER__DATABASE__LISTEN_URL", "postgres://u:hunter2@h/db"),
            ("WORKER__DATABASE__MIGRATE_URL", "postgres://u@h/db?application_name=a&password=hunter4"),
            ("REDIS_URL", "redis://default:hunter5@cache:6379"),
        ],
    ));
    for shown in [
        "url = \"postgres://h/db?user=u&password=***\"",
        "listen_url = \"postgres://u:***@h/db\"",
        "migrate_url = \"postgres://u@h/db?application_name=a&password=***\"",
        "url = \"redis://default:***@cache:6379\"",
    ] {
        assert!(printed.contains(shown), "`{shown}` missing from: {printed}");
    }
    assert!(!printed.contains("hunter"), "{printed}");

    // Refused values are shown redacted in the error too: a key=value string (the config wants
    // a URL), an unparsable URL and a URL the driver refuses.
    for (url, shown) in [
        ("host=h user=u password=hunter6", "host=h user=u password=***"),
        ("host=h password='hunter 7'", "host=h password=***"),
        ("postgres://u:hunter8@[::1/db?password=hunter9", "postgres://***@[::1/db?password=***"),
        ("postgres://h/db?password=hunter10&sslmode=allow", "postgres://h/db?password=***&sslmode=allow"),
    ] {
        let out = worker(&["config", "check"], &[("DATABASE_URL", url)]);
        let stderr = text(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{url}: {stderr}");
        assert!(stderr.contains(shown) && !stderr.contains("hunter"), "{url}: {stderr}");
    }
}

#[test]
fn database_url_on_the_command_line_warns_that_argv_is_visible() {
    let url = "postgres://u:hunter2@127.0.0.1:5432/app";
    let out = worker(&["--database-url", url, "config", "check"], &[]);
    let stderr = text(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr
            .contains("warning: --database-url puts the URL, and any password in it, in this process's argv")
    );
    assert!(stderr.contains("set the DATABASE_URL environment variable instead"), "{stderr}");
    assert!(!stderr.contains("hunter2"), "the warning does not repeat the URL: {stderr}");
    let out = worker(&["config", "check"], &[("DATABASE_URL", url)]);
    assert_eq!(text(&out.stderr), "", "no warning through the environment");
}

/// A command against `test_db`, its URL in the environment.
fn cli(test_db: &TestDb, args: &[&str]) -> String {
    stdout(&worker(args, &[("DATABASE_URL", &test_db.url)]))
}

#[tokio::test]
async fn chat_tail_and_list_text_escape_control_characters_and_json_keeps_the_exact_text() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let chat: Uuid = conn
        .fetch_one(
            "INSERT INTO chats (owner_id, title, last_error) VALUES ($1, $2, $2) RETURNING id",
            &[(&Uuid::nil(), Type::UUID), (&HOSTILE, Type::TEXT)],
        )
        .await
        .expect("chat")
        .get(0);
    conn.fetch_one(
        "SELECT post_chat_message($1, 'assistant', to_jsonb($2::text))",
        &[(&chat, Type::UUID), (&HOSTILE, Type::TEXT)],
    )
    .await
    .expect("post");
    let chat = chat.to_string();

    let tail = cli(&test_db, &["chat", "tail", &chat]);
    assert!(!tail.contains('\u{1b}') && !tail.contains('\r') && !tail.contains('\u{7}'), "{tail:?}");
    assert_eq!(tail.lines().count(), 1, "{tail:?}");
    assert!(tail.ends_with(" assistant: done\\x1b[2J\\x1b]0;pwned\\x07\\r#99 user: forged\n"), "{tail:?}");
    let json = cli(&test_db, &["chat", "tail", &chat, "--json"]);
    let message: serde_json::Value = serde_json::from_str(json.trim_end()).expect("one JSON line");
    assert_eq!(message["content"], HOSTILE, "--json holds the exact text");

    let list = cli(&test_db, &["chat", "list"]);
    assert!(!list.contains('\u{1b}') && !list.contains('\r'), "{list:?}");
    assert!(list.contains("done\\x1b[2J\\x1b]0;pwned\\x07\\r#99 user: forged / done\\x1b[2J"), "{list}");
    let json: serde_json::Value =
        serde_json::from_str(&cli(&test_db, &["chat", "list", "--json"])).expect("JSON");
    assert_eq!(json[0]["title"], HOSTILE, "{json}");
}

#[tokio::test]
async fn outbox_dead_list_text_escapes_what_producers_wrote_and_json_keeps_it() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    conn.exec(
        "INSERT INTO task_outbox_dead (task_id, job_id, queue, payload, run_at, attempts, last_error, \
         created_at, original_id) VALUES ($1, $1, $1, '{}', now(), 10, $1, now(), 1)",
        &[(&HOSTILE, Type::TEXT)],
    )
    .await
    .expect("dead letter");

    let list = cli(&test_db, &["outbox", "dead", "list"]);
    assert!(!list.contains('\u{1b}') && !list.contains('\r') && !list.contains('\u{7}'), "{list:?}");
    assert_eq!(list.matches("done\\x1b[2J\\x1b]0;pwned\\x07\\r#99 user: forged").count(), 4, "{list}");
    let stats = cli(&test_db, &["outbox", "stats"]);
    assert!(!stats.contains('\u{1b}') && stats.contains("done\\x1b[2J"), "{stats:?}");
    let json: serde_json::Value =
        serde_json::from_str(&cli(&test_db, &["outbox", "dead", "list", "--json"])).expect("JSON");
    for field in ["task_id", "job_id", "queue", "last_error"] {
        assert_eq!(json[0][field], HOSTILE, "{field}: {json}");
    }
}
