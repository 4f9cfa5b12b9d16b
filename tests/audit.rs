//! The audit trail (issue 20) through the real binary against a real database: every
//! state-changing command leaves exactly one `operator_actions` row with its command, arguments,
//! rows and outcome, in the same transaction as its effect; a failing command leaves one `error`
//! row and no effect; read-only commands write nothing; `put-token` never stores a token;
//! `audit list` shows the rows, newest first, escaped (text) or exact (JSON).

mod common;

use std::process::{Output, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::TestDb;
use common::process::{BIN, inherited_overrides};
use serde_json::{Value, json};
use tokio::io::AsyncWriteExt;
use tokio::process::Command;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::Exec;

/// A fresh random token key, base64 as `gitsync.token_keys` takes it.
fn new_key() -> String {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("random");
    STANDARD.encode(bytes)
}

struct Harness {
    tdb: TestDb,
    key: String,
    dir: tempfile::TempDir,
}

/// How one invocation runs: the actor flag, `USER`, stdin.
#[derive(Default)]
struct Run<'a> {
    actor: Option<&'a str>,
    user: Option<&'a str>,
    stdin: &'a str,
}

impl Harness {
    async fn new() -> Self {
        Self { tdb: TestDb::new().await, key: new_key(), dir: tempfile::tempdir().expect("dir") }
    }

    /// The binary in an empty directory (no config file), with a token key and `USER=tester`.
    async fn run(&self, args: &[&str], how: Run<'_>) -> Output {
        let mut command = Command::new(BIN);
        command.current_dir(self.dir.path()).arg("--database-url").arg(&self.tdb.url);
        if let Some(actor) = how.actor {
            command.arg("--actor").arg(actor);
        }
        command.args(args);
        for var in inherited_overrides() {
            command.env_remove(var);
        }
        command.env("RUST_LOG", "warn").env("WORKER__GITSYNC__TOKEN_KEYS", &self.key);
        match how.user {
            Some(user) => command.env("USER", user),
            None => command.env_remove("USER"),
        };
        let mut child = command
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn worker");
        let mut stdin = child.stdin.take().expect("stdin");
        stdin.write_all(how.stdin.as_bytes()).await.expect("write stdin");
        drop(stdin);
        child.wait_with_output().await.expect("worker output")
    }

    /// A command that must succeed (as actor `ops`); its stdout.
    async fn ok(&self, args: &[&str]) -> String {
        self.ok_with(args, "").await
    }

    async fn ok_with(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run(args, Run { actor: Some("ops"), stdin, ..Run::default() }).await;
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8(out.stdout).expect("utf-8")
    }

    /// A command that must fail with exit 1 (as actor `ops`); its stderr.
    async fn fails(&self, args: &[&str]) -> String {
        self.fails_with(args, "").await
    }

    async fn fails_with(&self, args: &[&str], stdin: &str) -> String {
        let out = self.run(args, Run { actor: Some("ops"), stdin, ..Run::default() }).await;
        assert_eq!(out.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&out.stdout));
        String::from_utf8(out.stderr).expect("utf-8")
    }

    async fn scalar(&self, sql: &str) -> i64 {
        self.tdb.db.get().await.expect("conn").fetch_one(sql, &[]).await.expect(sql).get(0)
    }

    async fn exec(&self, sql: &str) {
        self.tdb.db.get().await.expect("conn").batch_execute(sql).await.expect(sql);
    }

    /// Every row, oldest first, as JSON objects.
    async fn rows(&self) -> Vec<Value> {
        let conn = self.tdb.db.get().await.expect("conn");
        let rows = conn
            .fetch_all("SELECT to_jsonb(o) FROM operator_actions AS o ORDER BY id", &[])
            .await
            .expect("rows");
        rows.iter().map(|r| r.get(0)).collect()
    }

    /// The one row written since there were `before`.
    async fn one_new_row(&self, before: usize) -> Value {
        let rows = self.rows().await;
        assert_eq!(rows.len(), before + 1, "exactly one new row: {rows:#?}");
        rows[before].clone()
    }

    async fn chat(&self) -> Uuid {
        self.ok(&["chat", "create"]).await.trim().parse().expect("chat id")
    }
}

/// The row's command, arguments, rows, outcome and actor.
fn summary(row: &Value) -> (Value, Value, Value, Value, Value) {
    (
        row["command"].clone(),
        row["arguments"].clone(),
        row["rows_affected"].clone(),
        row["outcome"].clone(),
        row["actor"].clone(),
    )
}

#[tokio::test]
async fn every_state_changing_command_leaves_exactly_one_row_and_read_only_ones_none() {
    let h = Harness::new().await;
    let owner = Uuid::new_v4();
    let owner_text = owner.to_string();
    let mut n = 0;

    let steps: Vec<(Vec<String>, &str, Value, Value)> = vec![
        (
            vec!["loop".into(), "pause".into(), "outbox".into(), "--reason".into(), "deploy".into()],
            "loop pause",
            json!({ "name": "outbox", "reason": "deploy" }),
            json!(1),
        ),
        (
            vec!["loop".into(), "resume".into(), "outbox".into()],
            "loop resume",
            json!({ "name": "outbox" }),
            json!(1),
        ),
        (
            vec![
                "chat".into(),
                "create".into(),
                "--owner".into(),
                owner_text.clone(),
                "--title".into(),
                "t".into(),
                "héllo".into(),
            ],
            "chat create",
            json!({ "owner": owner_text, "org": null, "title": "t", "text_bytes": 6 }),
            json!(2),
        ),
        (
            vec![
                "chat".into(),
                "quota".into(),
                "set".into(),
                "--owner".into(),
                owner_text.clone(),
                "--max-running".into(),
                "3".into(),
            ],
            "chat quota set",
            json!({ "owner": owner_text, "org": null, "max_running": "3", "weight": null }),
            json!(1),
        ),
        (
            vec!["chat".into(), "quota".into(), "rm".into(), "--owner".into(), owner_text.clone()],
            "chat quota rm",
            json!({ "owner": owner_text, "org": null }),
            json!(1),
        ),
        (
            vec!["outbox".into(), "dead".into(), "purge".into(), "--older-than".into(), "7d".into()],
            "outbox dead purge",
            json!({ "older_than": "7days" }),
            json!(1),
        ),
    ];
    // One dead letter older than 7 days for purge.
    h.exec(
        "INSERT INTO task_outbox_dead (id, original_id, task_id, queue, payload, run_at, attempts, created_at, \
         dead_lettered_at) VALUES (1, 1, 'old', 'q', '{}', now(), 10, now(), now() - interval '8 days'), \
         (2, 2, 't2', 'q', '{}', now(), 10, now(), now()), (3, 3, 't3', 'q', '{}', now(), 10, now(), now())",
    )
    .await;
    for (args, command, arguments, rows) in steps {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        h.ok(&args).await;
        let row = h.one_new_row(n).await;
        n += 1;
        assert_eq!(summary(&row), (json!(command), arguments, rows, json!("ok"), json!("ops")), "{args:?}");
        assert_eq!(row["error"], Value::Null);
    }
    assert_eq!(
        h.scalar("SELECT count(*) FROM loop_controls WHERE updated_by = 'ops'").await,
        1,
        "updated_by is the actor"
    );

    assert_eq!(h.scalar("SELECT count(*) FROM chats").await, 1, "chat create made one chat");
    let chat: Uuid = h
        .tdb
        .db
        .get()
        .await
        .expect("conn")
        .fetch_one("SELECT id FROM chats", &[])
        .await
        .expect("chat")
        .get(0);
    n = h.rows().await.len();
    h.ok(&["chat", "send", &chat.to_string(), "a secret-ish message"]).await;
    let row = h.one_new_row(n).await;
    n += 1;
    assert_eq!(row["command"], "chat send");
    assert_eq!(
        row["arguments"],
        json!({ "chat": chat.to_string(), "text_bytes": 20 }),
        "the size, not the text"
    );
    assert_eq!(row["rows_affected"], 1);

    h.ok(&["outbox", "dead", "requeue", "--id", "2", "3", "99"]).await;
    let row = h.one_new_row(n).await;
    n += 1;
    assert_eq!(
        (row["command"].clone(), row["arguments"].clone(), row["rows_affected"].clone()),
        (json!("outbox dead requeue"), json!({ "ids": [2, 3, 99] }), json!(2))
    );
    h.exec("INSERT INTO task_outbox_dead (id, original_id, task_id, queue, payload, run_at, attempts, created_at, dead_lettered_at) VALUES (4, 4, 't4', 'q', '{}', now(), 10, now(), now())").await;
    h.ok(&["outbox", "dead", "requeue", "--all", "--json"]).await;
    let row = h.one_new_row(n).await;
    n += 1;
    assert_eq!(
        (row["arguments"].clone(), row["rows_affected"].clone()),
        (json!({ "all": true }), json!(1)),
        "--json is not recorded"
    );

    let conn = h.tdb.db.get().await.expect("conn");
    let origin = "https://github.com/o/r";
    conn.exec("SELECT mark_diff_stale($1, $2, 'b')", &[(&chat, Type::UUID), (&origin, Type::TEXT)])
        .await
        .expect("mark");
    h.ok(&["gitsync", "refresh", &chat.to_string()]).await;
    let row = h.one_new_row(n).await;
    n += 1;
    assert_eq!(
        summary(&row),
        (
            json!("gitsync refresh"),
            json!({ "chat_id": chat.to_string() }),
            json!(1),
            json!("ok"),
            json!("ops")
        )
    );

    let preset: Uuid = conn
        .fetch_one(
            "WITH t AS (INSERT INTO templates (name) VALUES ('t') RETURNING id), \
                  v AS (INSERT INTO template_versions (template_id, name) SELECT id, 'v1' FROM t RETURNING id) \
             INSERT INTO presets (template_version_id, name) SELECT id, 'p' FROM v RETURNING id",
            &[],
        )
        .await
        .expect("preset")
        .get(0);
    h.ok(&["prebuilds", "invalidate", &preset.to_string()]).await;
    let row = h.one_new_row(n).await;
    n += 1;
    assert_eq!(
        summary(&row),
        (
            json!("prebuilds invalidate"),
            json!({ "preset_id": preset.to_string() }),
            json!(1),
            json!("ok"),
            json!("ops")
        )
    );

    let user = Uuid::new_v4();
    h.ok_with(
        &["gitsync", "put-token", &user.to_string(), "github", "--expires-at", "2030-01-01T00:00:00Z"],
        "ghu_x\n",
    )
    .await;
    let row = h.one_new_row(n).await;
    n += 1;
    assert_eq!(
        summary(&row),
        (
            json!("gitsync put-token"),
            json!({ "user": user.to_string(), "provider": "github", "expires_at": "2030-01-01T00:00:00Z", "refresh_token_stdin": false }),
            json!(1),
            json!("ok"),
            json!("ops")
        )
    );

    // Three plaintext rows, in batches of 2: one row for the run, with the total.
    for _ in 0..3 {
        let other = Uuid::new_v4();
        conn.exec(
            "INSERT INTO external_auth_links (user_id, provider_id, access_token) VALUES ($1, 'github', 'plain')",
            &[(&other, Type::UUID)],
        )
        .await
        .expect("plaintext link");
    }
    h.ok(&["gitsync", "encrypt-tokens", "--batch", "2"]).await;
    let row = h.one_new_row(n).await;
    n += 1;
    assert_eq!(
        summary(&row),
        (json!("gitsync encrypt-tokens"), json!({ "batch": 2 }), json!(3), json!("ok"), json!("ops"))
    );

    // Read-only commands write nothing.
    for args in [
        &["loop", "list"][..],
        &["status"],
        &["outbox", "stats"],
        &["outbox", "dead", "list"],
        &["chat", "list"],
        &["chat", "queue"],
        &["chat", "quota", "list"],
        &["chat", "tail", &chat.to_string()],
        &["gitsync", "stats"],
        &["prebuilds", "status"],
        &["prebuilds", "plan"],
        &["audit", "list"],
    ] {
        h.ok(args).await;
    }
    assert_eq!(h.rows().await.len(), n, "read-only commands write no row");
}

#[tokio::test]
async fn a_failing_command_leaves_one_error_row_and_no_effect() {
    let h = Harness::new().await;
    let unknown = Uuid::new_v4().to_string();
    h.chat().await;
    let mut n = h.rows().await.len();
    let owner = Uuid::new_v4().to_string();
    let cases: Vec<(Vec<&str>, &str, &str)> = vec![
        // Fails at the database, inside the transaction: post_chat_message raises.
        (vec!["chat", "send", &unknown, "hi"], "chat send", "does not exist"),
        (vec!["gitsync", "refresh", &unknown], "gitsync refresh", "has no diff status"),
        (vec!["chat", "quota", "rm", "--owner", &owner], "chat quota rm", "no quota"),
        (vec!["loop", "pause", "nosuchloop"], "loop pause", "unknown loop `nosuchloop`"),
        (vec!["loop", "pause", "chats_heartbeat"], "loop pause", "cannot be paused"),
        (
            vec!["chat", "quota", "set", "--owner", &owner, "--weight", "0"],
            "chat quota set",
            "invalid --weight `0`",
        ),
        (vec!["chat", "create", "--owner", "nope"], "chat create", "invalid --owner `nope`"),
        (vec!["prebuilds", "invalidate", &unknown], "prebuilds invalidate", "does not exist"),
        (vec!["prebuilds", "invalidate", "nope"], "prebuilds invalidate", "invalid preset id `nope`"),
        (vec!["chat", "send", "not-a-chat", "hi"], "chat send", "invalid chat id `not-a-chat`"),
    ];
    for (args, command, error) in cases {
        let stderr = h.fails(&args).await;
        assert!(stderr.contains(error), "{args:?}: {stderr}");
        let row = h.one_new_row(n).await;
        n += 1;
        assert_eq!(
            (row["command"].clone(), row["outcome"].clone(), row["rows_affected"].clone()),
            (json!(command), json!("error"), Value::Null),
            "{args:?}"
        );
        assert!(row["error"].as_str().is_some_and(|e| e.contains(error)), "{args:?}: {row}");
    }
    assert_eq!(h.scalar("SELECT count(*) FROM chat_messages").await, 0, "no message posted");
    assert_eq!(h.scalar("SELECT count(*) FROM chats").await, 1, "no chat created");
    assert_eq!(h.scalar("SELECT count(*) FROM loop_controls").await, 0, "no loop paused");
    assert_eq!(h.scalar("SELECT count(*) FROM chat_quotas").await, 0, "no quota written");
    assert_eq!(h.scalar("SELECT count(*) FROM presets WHERE last_invalidated_at IS NOT NULL").await, 0);
    let sent = h.rows().await;
    assert_eq!(sent[1]["arguments"], json!({ "chat": unknown, "text_bytes": 2 }));

    // Refused before its transaction (stdin is read first): recorded as well.
    let user = Uuid::new_v4().to_string();
    let stderr = h.fails_with(&["gitsync", "put-token", &user, "github"], "ghu x\n").await;
    assert!(stderr.contains("whitespace"), "{stderr}");
    let row = h.one_new_row(n).await;
    assert_eq!(
        (row["command"].clone(), row["outcome"].clone()),
        (json!("gitsync put-token"), json!("error"))
    );
    assert_eq!(h.scalar("SELECT count(*) FROM external_auth_links").await, 0);
}

#[tokio::test]
async fn the_actor_is_the_flag_else_user_at_hostname_else_the_uid() {
    let h = Harness::new().await;
    let host = hostname::get().expect("hostname").to_string_lossy().into_owned();
    let uid = nix::unistd::getuid().as_raw();
    for (how, want) in [
        (
            Run { actor: Some("alice on call"), user: Some("tester"), ..Run::default() },
            "alice on call".to_owned(),
        ),
        (Run { user: Some("tester"), ..Run::default() }, format!("tester@{host}")),
        (Run::default(), format!("uid {uid}@{host}")),
    ] {
        let out = h.run(&["chat", "create"], how).await;
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let rows = h.rows().await;
        assert_eq!(rows.last().map(|r| r["actor"].clone()), Some(json!(want)));
    }
    // An invalid --actor is refused by value before anything runs: no effect, no row.
    let out = h.run(&["--actor", "x\u{1b}[2J", "chat", "create"], Run::default()).await;
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("invalid --actor \"x\\u{1b}[2J\""), "{out:?}");
    assert_eq!(h.rows().await.len(), 3);
    assert_eq!(h.scalar("SELECT count(*) FROM chats").await, 3);
}

#[tokio::test]
async fn put_token_never_stores_a_token_in_the_audit_trail() {
    let h = Harness::new().await;
    let user = Uuid::new_v4().to_string();
    let (access, refresh) = ("ghu_AUDITSECRET1", "ghr_AUDITSECRET2");
    h.ok_with(
        &["gitsync", "put-token", &user, "github", "--refresh-token-stdin"],
        &format!("{access}\n{refresh}\n"),
    )
    .await;
    // Failures that see the token: an extra line, an unknown provider, one line too few.
    h.fails_with(&["gitsync", "put-token", &user, "github"], &format!("{access}\n{refresh}\n")).await;
    h.fails_with(&["gitsync", "put-token", &user, "gitlab"], &format!("{access}\n")).await;
    h.fails_with(&["gitsync", "put-token", &user, "github", "--refresh-token-stdin"], &format!("{access}\n"))
        .await;
    let rows = h.rows().await;
    assert_eq!(rows.len(), 4);
    assert_eq!(rows[0]["arguments"]["refresh_token_stdin"], true);
    let text = h
        .tdb
        .db
        .get()
        .await
        .expect("conn")
        .fetch_one("SELECT string_agg(o::text, ' ') FROM operator_actions AS o", &[])
        .await
        .expect("text")
        .get::<_, String>(0);
    assert!(!text.contains("AUDITSECRET"), "{text}");
}

/// From the attacker's side: a trigger refuses the audit row; the effect goes with it.
#[tokio::test]
async fn when_the_audit_row_cannot_be_written_the_effect_is_rolled_back_too() {
    let h = Harness::new().await;
    let chat = h.chat().await.to_string();
    h.exec(
        "CREATE FUNCTION refuse_ok() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.outcome = 'ok' THEN RAISE EXCEPTION 'audit row refused by the test'; END IF; RETURN NEW; END $$; \
         CREATE TRIGGER refuse_ok BEFORE INSERT ON operator_actions FOR EACH ROW EXECUTE FUNCTION refuse_ok()",
    )
    .await;
    let owner = Uuid::new_v4().to_string();
    h.exec("INSERT INTO task_outbox_dead (id, original_id, task_id, queue, payload, run_at, attempts, created_at, dead_lettered_at) VALUES (1, 1, 't', 'q', '{}', now(), 10, now(), now() - interval '8 days')").await;
    let commands: [&[&str]; 6] = [
        &["loop", "pause", "outbox"],
        &["chat", "create", "hello"],
        &["chat", "send", &chat, "hi"],
        &["chat", "quota", "set", "--owner", &owner, "--weight", "2"],
        &["outbox", "dead", "purge", "--older-than", "7d"],
        &["outbox", "dead", "requeue", "--all"],
    ];
    for args in commands {
        let stderr = h.fails(args).await;
        assert!(stderr.contains("audit row refused by the test"), "{args:?}: {stderr}");
    }
    assert_eq!(h.scalar("SELECT count(*) FROM loop_controls").await, 0);
    assert_eq!(h.scalar("SELECT count(*) FROM chats").await, 1);
    assert_eq!(h.scalar("SELECT count(*) FROM chat_messages").await, 0);
    assert_eq!(h.scalar("SELECT count(*) FROM chat_quotas").await, 0);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox_dead").await, 1);
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
    // Each failure is recorded by the row the trigger lets through.
    let rows = h.rows().await;
    assert_eq!(rows.len(), 1 + commands.len(), "{rows:#?}");
    assert!(
        rows[1..].iter().all(|r| r["outcome"] == "error"
            && r["error"].as_str().is_some_and(|e| e.contains("refused by the test")))
    );

    // No row at all: still no effect.
    h.exec("CREATE OR REPLACE FUNCTION refuse_ok() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RAISE EXCEPTION 'no audit'; END $$").await;
    h.fails(&["loop", "pause", "outbox"]).await;
    assert_eq!(h.scalar("SELECT count(*) FROM loop_controls").await, 0);
    assert_eq!(h.rows().await.len(), 1 + commands.len());
}

#[tokio::test]
async fn audit_list_shows_the_newest_first_escaped_as_text_and_exact_as_json() {
    let h = Harness::new().await;
    h.exec(
        "INSERT INTO operator_actions (at, actor, command, arguments, rows_affected, outcome, error) VALUES \
         (now() - interval '2 days', 'old', 'loop pause', '{\"name\": \"outbox\"}', 1, 'ok', NULL), \
         (now() - interval '1 hour', E'ev\\x1b[2Jil', 'chat send', '{\"chat\": \"x\"}', NULL, 'error', E'boom\\rforged\\nline two')",
    )
    .await;
    h.ok(&["loop", "resume", "outbox"]).await;

    let json: Value = serde_json::from_str(&h.ok(&["audit", "list", "--json"]).await).expect("JSON");
    let rows = json.as_array().expect("array");
    assert_eq!(rows.len(), 2, "the default --since is 1d: {json:#}");
    assert_eq!(rows[0]["command"], "loop resume", "newest first");
    assert_eq!(rows[0]["actor"], "ops");
    assert_eq!(rows[0]["arguments"], json!({ "name": "outbox" }));
    assert_eq!(rows[0]["rows_affected"], 1);
    assert_eq!(rows[0]["outcome"], "ok");
    assert_eq!(rows[0]["error"], Value::Null);
    assert!(rows[0]["at"].is_string() && rows[0]["id"].is_i64());
    assert_eq!(rows[1]["actor"], "ev\u{1b}[2Jil", "JSON is exact");
    assert_eq!(rows[1]["error"], "boom\rforged\nline two");
    assert_eq!(rows[1]["rows_affected"], Value::Null);

    let all: Value =
        serde_json::from_str(&h.ok(&["audit", "list", "--since", "3d", "--json"]).await).expect("JSON");
    assert_eq!(all.as_array().map(Vec::len), Some(3));
    assert_eq!(all[2]["actor"], "old");
    let one: Value =
        serde_json::from_str(&h.ok(&["audit", "list", "--since", "3d", "--limit", "1", "--json"]).await)
            .expect("JSON");
    assert_eq!(one.as_array().map(Vec::len), Some(1));

    let text = h.ok(&["audit", "list"]).await;
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 3, "{text}");
    assert!(lines[0].starts_with("AT") && lines[0].contains("ACTOR") && lines[0].contains("ERROR"), "{text}");
    assert!(
        lines[1].contains("ops")
            && lines[1].contains("loop resume")
            && lines[1].contains(r#"{"name":"outbox"}"#),
        "{text}"
    );
    assert!(lines[2].contains("ev\\x1b[2Jil") && lines[2].contains("boom\\rforged"), "{text}");
    assert!(!text.contains(['\u{1b}', '\r']), "{text:?}");

    assert!(h.fails(&["audit", "list", "--limit", "0"]).await.contains("invalid --limit 0"));
}

/// `encrypt-tokens` commits batch by batch: one row for the run, with the rows it changed, and
/// outcome `error` when a row could not be decrypted.
#[tokio::test]
async fn encrypt_tokens_records_one_row_with_its_total_and_its_failed_rows_as_an_error() {
    let h = Harness::new().await;
    let conn = h.tdb.db.get().await.expect("conn");
    for key_id in [None, None, Some("0000000")] {
        let user = Uuid::new_v4();
        conn.exec(
            "INSERT INTO external_auth_links (user_id, provider_id, access_token, access_token_key_id) \
             VALUES ($1, 'github', 'plain', $2)",
            &[(&user, Type::UUID), (&key_id, Type::TEXT)],
        )
        .await
        .expect("link");
    }
    let stderr = h.fails(&["gitsync", "encrypt-tokens", "--batch", "1"]).await;
    assert!(stderr.contains("1 row(s) could not be encrypted"), "{stderr}");
    let rows = h.rows().await;
    assert_eq!(rows.len(), 1, "one row for the run: {rows:#?}");
    assert_eq!(
        summary(&rows[0]),
        (json!("gitsync encrypt-tokens"), json!({ "batch": 1 }), json!(2), json!("error"), json!("ops"))
    );
    assert!(rows[0]["error"].as_str().is_some_and(|e| e.contains("could not be encrypted")), "{rows:#?}");
    assert_eq!(
        h.scalar("SELECT count(*) FROM external_auth_links WHERE access_token_key_id IS NULL").await,
        0
    );
}
