//! GitHub tokens at rest (issue 16, acceptance 7) against real PostgreSQL, the fake GitHub
//! (tests/gitsync_support) and the real `worker` binary for `put-token`, `encrypt-tokens` and
//! `config check|print`: a stored token is ciphertext and gitsync refreshes with it; a rotation
//! re-encrypts every row under the new key while refreshes keep working; an unknown key, a
//! foreign ciphertext and a plaintext row are per-row errors without an HTTP call.

mod common;
mod gitsync_support;

use std::io::Write;
use std::process::{Command, Output, Stdio};

use base64::Engine;
use base64::engine::general_purpose::STANDARD;
use common::TestDb;
use common::process::{BIN, inherited_overrides};
use gitsync_support::FakeGitHub;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::config::{Concurrency, Config};
use worker::db::{Db, Exec};
use worker::gitsync::cli;
use worker::gitsync::tokens::{self, Column};
use worker::gitsync::{Gitsync, GitsyncConfig, ProviderConfig, RefreshReport, TokenKeySecret, TokenKeys};
use worker::runtime::Tick;

/// A fresh random key, base64 as `gitsync.token_keys` takes it.
fn new_key() -> String {
    let mut bytes = [0u8; 32];
    aws_lc_rs::rand::fill(&mut bytes).expect("random");
    STANDARD.encode(bytes)
}

fn key_id(key: &str) -> String {
    tokens::key_id(&STANDARD.decode(key).expect("base64"))
}

fn keyring(keys: &[&str]) -> TokenKeys {
    let secrets: Vec<_> = keys.iter().map(|k| TokenKeySecret::new(*k)).collect();
    TokenKeys::parse(&secrets).expect("valid keys")
}

/// Runs the real binary with `keys` as `WORKER__GITSYNC__TOKEN_KEYS` (comma-separated, as an
/// operator would export them), `stdin` piped in, in an empty directory (no config file).
fn worker(database_url: &str, keys: &[&str], args: &[&str], stdin: &str) -> Output {
    worker_to(database_url, keys, args, stdin, Stdio::piped())
}

/// [`worker`] with its stdout going to `stdout`.
fn worker_to(database_url: &str, keys: &[&str], args: &[&str], stdin: &str, stdout: Stdio) -> Output {
    let dir = tempfile::tempdir().expect("dir");
    let mut command = Command::new(BIN);
    command.current_dir(dir.path()).arg("--database-url").arg(database_url).args(args);
    for var in inherited_overrides() {
        command.env_remove(var);
    }
    command.env_remove("WORKER_CONFIG").env("RUST_LOG", "warn");
    if !keys.is_empty() {
        command.env("WORKER__GITSYNC__TOKEN_KEYS", keys.join(","));
    }
    let mut child =
        command.stdin(Stdio::piped()).stdout(stdout).stderr(Stdio::piped()).spawn().expect("spawn worker");
    child.stdin.take().expect("stdin").write_all(stdin.as_bytes()).expect("write stdin");
    child.wait_with_output().expect("worker output")
}

fn text(output: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// The value printed beside `label` in `encrypt-tokens`' summary.
fn figure(stdout: &str, label: &str) -> u64 {
    stdout
        .lines()
        .find_map(|line| {
            let mut words = line.split_whitespace();
            (words.next() == Some(label)).then(|| words.next()?.parse().ok()).flatten()
        })
        .unwrap_or_else(|| panic!("no `{label}` line in:\n{stdout}"))
}

struct Harness {
    tdb: TestDb,
    fake: FakeGitHub,
}

/// One row of `external_auth_links`, as stored.
#[derive(Debug)]
struct Link {
    access_token: String,
    access_key_id: Option<String>,
    refresh_token: Option<String>,
    refresh_key_id: Option<String>,
}

impl Harness {
    async fn new() -> Self {
        Self { tdb: TestDb::new().await, fake: FakeGitHub::start().await }
    }

    fn db(&self) -> &Db {
        &self.tdb.db
    }

    fn config(&self, keys: &[&str]) -> GitsyncConfig {
        let mut github = ProviderConfig::github_default();
        github.api_base_url = self.fake.base_url.clone();
        github.allow_insecure_http = true;
        let token_keys = keys.iter().map(|k| TokenKeySecret::new(*k)).collect();
        GitsyncConfig { providers: vec![github], token_keys, ..GitsyncConfig::default() }
    }

    /// One gitsync tick's refresh with `keys` configured.
    async fn refresh(&self, keys: &[&str]) -> RefreshReport {
        let mut config = Config::default();
        config.gitsync = self.config(keys);
        let concurrency = Concurrency::from_config(&config).gitsync;
        let meter = opentelemetry::global::meter("gitsync-tokens-test");
        let gitsync = Gitsync::new(self.db().clone(), config.gitsync, concurrency, &meter).expect("gitsync");
        gitsync.refresh(&Tick::detached(self.db())).await.expect("refresh")
    }

    async fn sql(&self, sql: &str) {
        self.db().get().await.expect("conn").exec(sql, &[]).await.expect(sql);
    }

    /// Every diff status due now.
    async fn all_due(&self) {
        self.sql("UPDATE chat_diff_statuses SET stale_at = now(), leased_at = NULL").await;
    }

    /// A user whose chat has a diff status due for `o<user>/r` branch `b`, with a PR there.
    async fn chat(&self, user: Uuid) -> Uuid {
        let owner = format!("o{}", user.simple());
        self.fake.pr(&owner, "r", "b", 1);
        let conn = self.db().get().await.expect("conn");
        let chat: Uuid = conn
            .fetch_one("INSERT INTO chats (owner_id) VALUES ($1) RETURNING id", &[(&user, Type::UUID)])
            .await
            .expect("chat")
            .get(0);
        let origin = format!("https://github.com/{owner}/r");
        conn.exec("SELECT mark_diff_stale($1, $2, 'b')", &[(&chat, Type::UUID), (&origin, Type::TEXT)])
            .await
            .expect("mark_diff_stale");
        chat
    }

    /// Writes a row as an old deployment (no key id) or the API tier (`sealed` under a key id)
    /// would, bypassing `put-token`.
    async fn insert(&self, user: Uuid, access: &str, key_id: Option<&str>, refresh: Option<&str>) {
        let (access, key_id, refresh) =
            (access.to_owned(), key_id.map(str::to_owned), refresh.map(str::to_owned));
        self.db()
            .get()
            .await
            .expect("conn")
            .exec(
                "INSERT INTO external_auth_links (user_id, provider_id, access_token, access_token_key_id, refresh_token) \
                 VALUES ($1, 'github', $2, $3, $4)",
                &[(&user, Type::UUID), (&access, Type::TEXT), (&key_id, Type::TEXT), (&refresh, Type::TEXT)],
            )
            .await
            .expect("insert link");
    }

    /// `token` sealed for `user`'s github row under the first of `keys`, written as the API tier
    /// would (the library function `put-token` runs).
    async fn put(&self, keys: &[&str], user: Uuid, token: &str) {
        cli::put_token(
            &self.db().get().await.expect("conn"),
            &keyring(keys),
            user,
            "github",
            &(token.to_owned(), None),
            None,
        )
        .await
        .expect("put token");
    }

    async fn link(&self, user: Uuid) -> Link {
        let r = self
            .db()
            .get()
            .await
            .expect("conn")
            .fetch_one(
                "SELECT access_token, access_token_key_id, refresh_token, refresh_token_key_id \
                 FROM external_auth_links WHERE user_id = $1 AND provider_id = 'github'",
                &[(&user, Type::UUID)],
            )
            .await
            .expect("link");
        Link {
            access_token: r.get(0),
            access_key_id: r.get(1),
            refresh_token: r.get(2),
            refresh_key_id: r.get(3),
        }
    }

    /// `(last_outcome, last_error)` of a chat's diff status.
    async fn outcome(&self, chat: Uuid) -> (Option<String>, Option<String>) {
        let r = self
            .db()
            .get()
            .await
            .expect("conn")
            .fetch_one(
                "SELECT last_outcome, last_error FROM chat_diff_statuses WHERE chat_id = $1",
                &[(&chat, Type::UUID)],
            )
            .await
            .expect("status");
        (r.get(0), r.get(1))
    }

    /// Authorization headers the fake received for `user`'s repository.
    fn authorizations(&self, user: Uuid) -> Vec<Option<String>> {
        let prefix = format!("/repos/o{}/", user.simple());
        self.fake
            .seen()
            .into_iter()
            .filter(|s| s.path.starts_with(&prefix))
            .map(|s| s.authorization)
            .collect()
    }

    async fn count(&self, sql: &str) -> i64 {
        self.db().get().await.expect("conn").fetch_one(sql, &[]).await.expect(sql).get(0)
    }
}

/// Every chat refreshed in this tick (`ok`, or `not_modified` after the first), each user's
/// requests carrying that user's token.
async fn assert_all_refreshed(
    h: &Harness,
    users: &[(Uuid, Uuid)],
    requests_before: &mut [usize],
    when: &str,
) {
    for (i, (user, chat)) in users.iter().enumerate() {
        let (outcome, error) = h.outcome(*chat).await;
        assert!(
            matches!(outcome.as_deref(), Some("ok" | "not_modified")),
            "{when}: user {i}: {outcome:?} {error:?}"
        );
        assert_eq!(error, None, "{when}: user {i}");
        let seen = h.authorizations(*user);
        assert!(seen.len() > requests_before[i], "{when}: user {i} was asked about");
        let want = format!("Bearer tok-{user}");
        assert!(
            seen[requests_before[i]..].iter().all(|a| a.as_deref() == Some(want.as_str())),
            "{when}: {seen:?}"
        );
        requests_before[i] = seen.len();
    }
}

#[tokio::test]
async fn a_token_written_by_put_token_is_ciphertext_in_the_table_and_gitsync_refreshes_with_it() {
    let h = Harness::new().await;
    let key = new_key();
    let user = Uuid::new_v4();
    let token = "ghu_put_token_secret_1234";

    let out = worker(
        &h.tdb.url,
        &[&key],
        &["gitsync", "put-token", &user.to_string(), "github"],
        &format!("{token}\n"),
    );
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "put-token: {stderr}");
    assert!(
        stdout.contains(&format!("stored the token of user {user}")) && stdout.contains(&key_id(&key)),
        "{stdout}"
    );
    assert!(!stdout.contains(token) && !stderr.contains(token));

    let link = h.link(user).await;
    assert!(!link.access_token.contains(token), "ciphertext, not the token: {link:?}");
    assert_eq!(link.access_key_id.as_deref(), Some(key_id(&key).as_str()));
    assert_eq!((link.refresh_token, link.refresh_key_id), (None, None));
    let sealed = STANDARD.decode(&link.access_token).expect("base64 in the table");
    assert_eq!(sealed.len(), 12 + token.len() + 16, "nonce || ciphertext || tag");
    let aad = tokens::aad(Column::AccessToken, user, "github");
    assert_eq!(keyring(&[&key]).decrypt(&link.access_token, &key_id(&key), &aad).expect("opens"), token);

    let chat = h.chat(user).await;
    let report = h.refresh(&[&key]).await;
    assert_eq!(report.leased, 1);
    assert_eq!(h.outcome(chat).await, (Some("ok".into()), None));
    let seen = h.authorizations(user);
    assert!(
        !seen.is_empty() && seen.iter().all(|a| a.as_deref() == Some(&*format!("Bearer {token}"))),
        "{seen:?}"
    );

    // Again: the row is replaced, still encrypted (and the trailing CRLF is not part of it).
    let out =
        worker(&h.tdb.url, &[&key], &["gitsync", "put-token", &user.to_string(), "github"], "ghu_second\r\n");
    assert!(out.status.success(), "{}", text(&out).1);
    assert!(text(&out).0.contains("replaced"), "{}", text(&out).0);
    let link = h.link(user).await;
    assert_eq!(
        keyring(&[&key]).decrypt(&link.access_token, &key_id(&key), &aad).expect("opens"),
        "ghu_second"
    );

    // With a refresh token (stdin's second line, sealed for its own column) and an expiry.
    let args = ["gitsync", "put-token", &user.to_string(), "github", "--refresh-token-stdin"];
    let args: Vec<&str> = args.into_iter().chain(["--expires-at", "2030-01-01T00:00:00Z"]).collect();
    let out = worker(&h.tdb.url, &[&key], &args, "ghu_third\nghr_refresh\n");
    assert!(out.status.success(), "{}", text(&out).1);
    let link = h.link(user).await;
    let (refresh, refresh_key) =
        (link.refresh_token.expect("refresh token"), link.refresh_key_id.expect("key id"));
    let refresh_aad = tokens::aad(Column::RefreshToken, user, "github");
    assert_eq!(keyring(&[&key]).decrypt(&refresh, &refresh_key, &refresh_aad).expect("opens"), "ghr_refresh");
    assert_eq!(
        keyring(&[&key]).decrypt(&link.access_token, &key_id(&key), &aad).expect("opens"),
        "ghu_third"
    );
    let expires = h.count("SELECT extract(epoch FROM expires_at)::int8 FROM external_auth_links").await;
    assert_eq!(expires, 1_893_456_000, "2030-01-01T00:00:00Z");

    // Refused: an empty token, no keys configured, a provider nobody configured. None writes.
    for (keys, args, stdin, needle) in [
        (vec![key.as_str()], vec!["github"], "\n", "empty"),
        (vec![], vec!["github"], "ghu_x\n", "gitsync.token_keys is empty"),
        (vec![key.as_str()], vec!["gitlab"], "ghu_x\n", "no [[gitsync.providers]] entry has id \"gitlab\""),
    ] {
        let user = user.to_string();
        let args: Vec<&str> = ["gitsync", "put-token", user.as_str()].into_iter().chain(args).collect();
        let out = worker(&h.tdb.url, &keys, &args, stdin);
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{args:?}: {stderr}");
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    let link = h.link(user).await;
    assert_eq!(
        keyring(&[&key]).decrypt(&link.access_token, &key_id(&key), &aad).expect("opens"),
        "ghu_third"
    );
}

#[tokio::test]
async fn a_rotation_re_encrypts_every_row_under_the_new_key_while_refreshes_keep_working() {
    let h = Harness::new().await;
    let (new, old) = (new_key(), new_key());
    let (new_id, old_id) = (key_id(&new), key_id(&old));
    let mut users = Vec::new();
    for _ in 0..6 {
        let user = Uuid::new_v4();
        h.put(&[&old], user, &format!("tok-{user}")).await;
        users.push((user, h.chat(user).await));
    }
    let mut requests = vec![0; users.len()];
    h.refresh(&[&old]).await;
    assert_all_refreshed(&h, &users, &mut requests, "before: old key only").await;

    // Deployed with [new, old]: old rows still decrypt.
    h.all_due().await;
    h.refresh(&[&new, &old]).await;
    assert_all_refreshed(&h, &users, &mut requests, "new key first, rows under the old").await;

    // During: another transaction holds three rows, so encrypt-tokens skips them (SKIP LOCKED)
    // and re-encrypts the other three; the table is half and half, and a tick runs meanwhile.
    let mut holder = h.db().get().await.expect("conn");
    let held = worker::db::begin(
        &mut holder,
        worker::db::TxLimits {
            statement: std::time::Duration::from_secs(60),
            idle: std::time::Duration::from_secs(60),
        },
    )
    .await
    .expect("tx");
    let held_users: Vec<Uuid> = users[..3].iter().map(|(u, _)| *u).collect();
    held.fetch_all(
        "SELECT 1::int4 FROM external_auth_links WHERE user_id = ANY($1) FOR UPDATE",
        &[(&held_users, Type::UUID_ARRAY)],
    )
    .await
    .expect("hold three rows");
    h.all_due().await;
    let url = h.tdb.url.clone();
    let (new_arg, old_arg) = (new.clone(), old.clone());
    let both = [new.as_str(), old.as_str()];
    let (out, report) = tokio::join!(
        tokio::task::spawn_blocking(move || {
            worker(&url, &[&new_arg, &old_arg], &["gitsync", "encrypt-tokens", "--batch", "2"], "")
        }),
        h.refresh(&both),
    );
    let out = out.expect("encrypt-tokens");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!((figure(&stdout, "encrypted"), figure(&stdout, "re-encrypted")), (0, 3), "{stdout}");
    assert_eq!((figure(&stdout, "failed"), figure(&stdout, "remaining")), (0, 3), "{stdout}");
    assert_eq!(report.leased, 6);
    assert_all_refreshed(&h, &users, &mut requests, "during the re-encryption").await;
    let under =
        |id: &str| format!("SELECT count(*) FROM external_auth_links WHERE access_token_key_id = '{id}'");
    assert_eq!((h.count(&under(&new_id)).await, h.count(&under(&old_id)).await), (3, 3));
    h.all_due().await;
    h.refresh(&[&new, &old]).await;
    assert_all_refreshed(&h, &users, &mut requests, "half the rows under each key").await;

    // The holder lets go: a second run (resumable) finishes the rest.
    held.rollback().await.expect("release");
    let out = worker(&h.tdb.url, &[&new, &old], &["gitsync", "encrypt-tokens"], "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!((figure(&stdout, "re-encrypted"), figure(&stdout, "remaining")), (3, 0), "{stdout}");
    assert_eq!((h.count(&under(&new_id)).await, h.count(&under(&old_id)).await), (6, 0));
    for (user, _) in &users {
        let link = h.link(*user).await;
        assert!(!link.access_token.contains(&format!("tok-{user}")), "{link:?}");
    }

    // After: the old key is removed from the config; everything still refreshes.
    h.all_due().await;
    h.refresh(&[&new]).await;
    assert_all_refreshed(&h, &users, &mut requests, "after: new key only").await;
}

#[tokio::test]
async fn a_row_under_an_unknown_key_or_sealed_for_another_row_is_a_per_row_error_and_others_refresh() {
    let h = Harness::new().await;
    let (key, gone) = (new_key(), new_key());
    let (good, unknown, copied) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    h.put(&[&key], good, &format!("tok-{good}")).await;
    h.put(&[&gone], unknown, &format!("tok-{unknown}")).await;
    // A ciphertext copied from `good`'s row: the right key, the wrong row.
    let stolen = h.link(good).await;
    h.insert(copied, &stolen.access_token, stolen.access_key_id.as_deref(), None).await;
    let (good_chat, unknown_chat, copied_chat) =
        (h.chat(good).await, h.chat(unknown).await, h.chat(copied).await);

    let report = h.refresh(&[&key]).await;
    assert_eq!(report.leased, 3);
    assert_eq!(
        h.outcome(good_chat).await,
        (Some("ok".into()), None),
        "the other row refreshed in the same tick"
    );
    let (outcome, error) = h.outcome(unknown_chat).await;
    let error = error.expect("last_error");
    assert_eq!(outcome.as_deref(), Some("error"), "{error}");
    assert!(error.contains(&format!("user {unknown}")) && error.contains("provider \"github\""), "{error}");
    assert!(error.contains(&format!("unknown key id `{}`", key_id(&gone))), "{error}");
    let (outcome, error) = h.outcome(copied_chat).await;
    let error = error.expect("last_error");
    assert_eq!(outcome.as_deref(), Some("error"), "{error}");
    assert!(error.contains(&format!("user {copied}")) && error.contains("authentication failed"), "{error}");
    assert!(
        h.authorizations(unknown).is_empty() && h.authorizations(copied).is_empty(),
        "no HTTP call for them"
    );

    // encrypt-tokens reports both and skips them (exit 1), changing nothing.
    let out = worker(&h.tdb.url, &[&key], &["gitsync", "encrypt-tokens"], "");
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}{stderr}");
    assert_eq!((figure(&stdout, "failed"), figure(&stdout, "remaining")), (1, 1), "{stdout}");
    assert!(
        stdout
            .contains(&format!("failed: user {unknown}, provider \"github\": access_token: unknown key id")),
        "{stdout}"
    );
    assert!(stderr.contains("1 row(s) could not be encrypted"), "{stderr}");
    assert_eq!(h.link(unknown).await.access_key_id, Some(key_id(&gone)), "left as it was");
}

#[tokio::test]
async fn a_plaintext_row_is_refused_while_keys_are_configured_and_an_encrypted_one_without_keys() {
    let h = Harness::new().await;
    let key = new_key();
    let (plain, sealed) = (Uuid::new_v4(), Uuid::new_v4());
    h.insert(plain, &format!("tok-{plain}"), None, None).await;
    h.put(&[&key], sealed, &format!("tok-{sealed}")).await;
    let (plain_chat, sealed_chat) = (h.chat(plain).await, h.chat(sealed).await);

    h.refresh(&[&key]).await;
    let (outcome, error) = h.outcome(plain_chat).await;
    let error = error.expect("last_error");
    assert_eq!(outcome.as_deref(), Some("error"), "{error}");
    assert!(error.contains(&format!("user {plain}")) && error.contains("provider \"github\""), "{error}");
    assert!(error.contains("plaintext") && error.contains("encrypt-tokens"), "{error}");
    assert!(h.authorizations(plain).is_empty(), "no HTTP call with a plaintext token");
    assert_eq!(h.outcome(sealed_chat).await, (Some("ok".into()), None));

    // Without keys: plaintext works as before, the encrypted row is the error.
    h.all_due().await;
    h.refresh(&[]).await;
    assert_eq!(h.outcome(plain_chat).await, (Some("ok".into()), None));
    assert!(h.authorizations(plain).iter().all(|a| a.as_deref() == Some(&*format!("Bearer tok-{plain}"))));
    let (outcome, error) = h.outcome(sealed_chat).await;
    let error = error.expect("last_error");
    assert_eq!(outcome.as_deref(), Some("error"), "{error}");
    let want = format!("encrypted under key {} but gitsync.token_keys is empty", key_id(&key));
    assert!(error.contains(&format!("user {sealed}")) && error.contains(&want), "{error}");
}

#[tokio::test]
async fn encrypt_tokens_encrypts_plaintext_rows_in_batches_and_a_second_run_does_nothing() {
    let h = Harness::new().await;
    let key = new_key();
    let users: Vec<Uuid> = (0..5).map(|_| Uuid::new_v4()).collect();
    for (i, user) in users.iter().enumerate() {
        let refresh = (i == 0).then(|| format!("ghr-{user}"));
        h.insert(*user, &format!("tok-{user}"), None, refresh.as_deref()).await;
    }

    let refused = worker(&h.tdb.url, &[], &["gitsync", "encrypt-tokens"], "");
    assert_eq!(refused.status.code(), Some(1));
    assert!(text(&refused).1.contains("gitsync.token_keys is empty"), "{}", text(&refused).1);

    let out = worker(&h.tdb.url, &[&key], &["gitsync", "encrypt-tokens", "--batch", "2"], "");
    let (stdout, stderr) = text(&out);
    assert!(out.status.success(), "{stderr}");
    assert_eq!(figure(&stdout, "encrypted"), 5, "{stdout}");
    assert_eq!(
        (figure(&stdout, "re-encrypted"), figure(&stdout, "failed"), figure(&stdout, "remaining")),
        (0, 0, 0)
    );
    let keys = keyring(&[&key]);
    for (i, user) in users.iter().enumerate() {
        let link = h.link(*user).await;
        assert_eq!(link.access_key_id.as_deref(), Some(key_id(&key).as_str()));
        assert!(!link.access_token.contains(&user.to_string()), "{link:?}");
        let aad = tokens::aad(Column::AccessToken, *user, "github");
        assert_eq!(
            keys.decrypt(&link.access_token, &key_id(&key), &aad).expect("opens"),
            format!("tok-{user}")
        );
        if i == 0 {
            let (refresh, refresh_key) =
                (link.refresh_token.expect("refresh"), link.refresh_key_id.expect("key id"));
            assert!(!refresh.contains(&user.to_string()));
            let aad = tokens::aad(Column::RefreshToken, *user, "github");
            assert_eq!(keys.decrypt(&refresh, &refresh_key, &aad).expect("opens"), format!("ghr-{user}"));
        } else {
            assert_eq!((link.refresh_token, link.refresh_key_id), (None, None));
        }
    }

    let again = worker(&h.tdb.url, &[&key], &["gitsync", "encrypt-tokens"], "");
    let (stdout, stderr) = text(&again);
    assert!(again.status.success(), "{stderr}");
    let figures: Vec<u64> =
        ["encrypted", "re-encrypted", "failed", "remaining"].iter().map(|l| figure(&stdout, l)).collect();
    assert_eq!(figures, [0, 0, 0, 0], "{stdout}");
}

/// `worker gitsync encrypt-tokens | head -1` where `head` has already exited: the output breaks
/// at the first failed row's line, and that must not take the batch's re-encrypted rows with it.
/// The reader end of stdout's pipe is closed before the worker starts, so every write fails.
#[tokio::test]
async fn a_broken_stdout_does_not_roll_back_the_batch_it_reports_on() {
    let h = Harness::new().await;
    let (old, new, gone) = (new_key(), new_key(), new_key());
    let (moved, unknown) = (Uuid::new_v4(), Uuid::new_v4());
    h.put(&[&old], moved, &format!("tok-{moved}")).await;
    h.put(&[&gone], unknown, &format!("tok-{unknown}")).await;

    let (reader, writer) = std::io::pipe().expect("pipe");
    drop(reader);
    let out = worker_to(&h.tdb.url, &[&new, &old], &["gitsync", "encrypt-tokens"], "", writer.into());
    let (_, stderr) = text(&out);
    assert!(!out.status.success(), "the failed row and the broken output are an error: {stderr}");
    assert_eq!(
        h.link(moved).await.access_key_id,
        Some(key_id(&new)),
        "the batch committed before its failed row was reported: {stderr}"
    );
    assert_eq!(h.link(unknown).await.access_key_id, Some(key_id(&gone)), "left as it was");
}

#[test]
fn config_check_takes_token_keys_from_the_environment_and_names_a_bad_one_by_index_only() {
    let (a, b) = (new_key(), new_key());
    let run = |value: &str, command: &str| {
        let dir = tempfile::tempdir().expect("dir");
        let mut cmd = Command::new(BIN);
        cmd.current_dir(dir.path()).args(["config", command]);
        for var in inherited_overrides() {
            cmd.env_remove(var);
        }
        cmd.env_remove("WORKER_CONFIG")
            .env("WORKER__GITSYNC__TOKEN_KEYS", value)
            .output()
            .expect("run worker")
    };
    for value in [format!("[{a},{b}]"), format!("{a},{b}"), format!("[\"{a}\", \"{b}\"]")] {
        let out = run(&value, "check");
        assert!(out.status.success(), "{value}: {}", text(&out).1);
        let printed = run(&value, "print");
        let (stdout, _) = text(&printed);
        let line = format!(
            "token_keys = [\"*** (key id {})\", \"*** (key id {})\"]  # env WORKER__GITSYNC__TOKEN_KEYS",
            key_id(&a),
            key_id(&b)
        );
        assert!(stdout.contains(&line) && !stdout.contains(&a) && !stdout.contains(&b), "{stdout}");
    }
    let short = STANDARD.encode([3u8; 16]);
    for (value, key, problem) in [
        (format!("{a},{short}"), "gitsync.token_keys.1", "decodes to 16 bytes"),
        (format!("{a},%%%"), "gitsync.token_keys.1", "not base64"),
        (format!("{b},{a},{b}"), "gitsync.token_keys.2", "the same key as gitsync.token_keys.0"),
    ] {
        let out = run(&value, "check");
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(1), "{stderr}");
        assert!(stderr.contains(&format!("`{key}`")) && stderr.contains(problem), "{stderr}");
        assert!(stderr.contains("env WORKER__GITSYNC__TOKEN_KEYS"), "{stderr}");
        assert!(!stderr.contains(&a) && !stderr.contains(&b) && !stderr.contains(&short), "{stderr}");
    }
}
