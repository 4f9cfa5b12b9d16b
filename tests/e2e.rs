//! End to end: the real binary, started the way production starts it (`scripts/start.sh`),
//! checked through the database, `/readyz`, the CLI and its exit status.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use common::process::{BIN, exit_and_log, free_port, inherited_overrides, readyz, repo_path, start_worker};
use common::{TestDb, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio_postgres::types::Type;
use worker::db::Exec;

/// A config file for one test: its database, a private Redis prefix and health port.
fn write_config(dir: &Path, database_url: &str, health_port: u16, shutdown_timeout: &str) -> PathBuf {
    let path = dir.join("worker.toml");
    let text = format!(
        "[app]\nenv = \"test\"\nshutdown_timeout = \"{shutdown_timeout}\"\n\n[log]\nformat = \"json\"\n\n\
         [database]\nurl = \"{database_url}\"\npool_size = 4\n\n[redis]\nurl = \"{}\"\nprefix = \"{}\"\n\n\
         [health]\nlisten = \"127.0.0.1:{health_port}\"\n\n[workers]\ninterval = \"200ms\"\nretention = \"1h\"\n",
        common::redis_url(),
        common::unique_prefix(),
    );
    std::fs::write(&path, text).expect("write config");
    path
}

/// Runs `worker ARGS` to completion with only `env` as configuration from the environment.
fn worker(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).current_dir(repo_path(""));
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command.envs(env.iter().copied()).output().expect("run worker")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_binary_migrates_a_fresh_database_becomes_ready_and_drains_on_sigterm() {
    let test_db = TestDb::empty().await;
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = write_config(dir.path(), &test_db.url, port, "10s");
    let config_arg = config.to_str().expect("utf-8 path");

    let started = Instant::now();
    let mut command = tokio::process::Command::new("bash");
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    let mut child = command
        .arg(repo_path("scripts/start.sh"))
        .args([BIN, "run", "--config", config_arg])
        .current_dir(repo_path(""))
        .stdout(std::fs::File::create(dir.path().join("stdout.log")).expect("log file"))
        .stderr(std::fs::File::create(dir.path().join("stderr.log")).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("start.sh");

    eventually(Duration::from_secs(5), "/readyz to answer 200", || async {
        matches!(readyz(port).await, Some((200, _)))
    })
    .await;
    assert!(started.elapsed() < Duration::from_secs(5), "ready after {:?}", started.elapsed());
    let (_, body) = readyz(port).await.expect("readyz");
    let worker_id = body["worker_id"].as_str().expect("worker_id on /readyz").to_owned();
    assert!(body["loops"].as_array().expect("loops").iter().any(|l| l["name"] == "workers"), "{body}");
    let build = &body["build"];
    assert_eq!(build["version"], env!("CARGO_PKG_VERSION"), "{body}");
    assert_eq!(
        format!(
            "{} (commit {}, built {})",
            build["version"].as_str().unwrap_or_default(),
            build["commit"].as_str().unwrap_or_default(),
            build["date"].as_str().unwrap_or_default()
        ),
        worker::identity::LONG_VERSION,
        "/readyz says what --version says"
    );

    let conn = test_db.db.get().await.expect("conn");
    let id = uuid::Uuid::parse_str(&worker_id).expect("uuid");
    let row = conn
        .fetch_opt("SELECT hostname FROM workers WHERE id = $1", &[(&id, Type::UUID)])
        .await
        .expect("query workers");
    assert!(row.is_some(), "the worker registered its row");

    // Pause through the CLI: every replica sees it at the next tick and /readyz says so.
    let db_flag = ["--database-url", test_db.url.as_str()];
    let out = worker(&[&["loop", "pause", "workers", "--reason", "e2e"][..], &db_flag].concat(), &[]);
    assert!(out.status.success(), "pause: {}", String::from_utf8_lossy(&out.stderr));
    let out = worker(&[&["loop", "pause", "nonsense"][..], &db_flag].concat(), &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("unknown loop `nonsense`"));
    eventually(Duration::from_secs(5), "the workers loop to show paused", || async {
        readyz(port).await.is_some_and(|(_, b)| {
            b["loops"]
                .as_array()
                .is_some_and(|ls| ls.iter().any(|l| l["name"] == "workers" && l["paused"] == true))
        })
    })
    .await;
    let out = worker(&[&["status", "--json"][..], &db_flag].concat(), &[]);
    assert!(out.status.success(), "status: {}", String::from_utf8_lossy(&out.stderr));
    let fleet: serde_json::Value = serde_json::from_slice(&out.stdout).expect("status --json is JSON");
    assert_eq!(fleet["workers"][0]["id"], worker_id.as_str(), "{fleet}");
    assert_eq!(fleet["loop_controls"][0]["loop_name"], "workers", "{fleet}");
    assert_eq!(fleet["loop_controls"][0]["paused"], true, "{fleet}");
    let out = worker(&[&["loop", "resume", "workers"][..], &db_flag].concat(), &[]);
    assert!(out.status.success());

    // SIGTERM to the pid start.sh was started as (as a container runtime sends it): it exec'd the worker.
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    let signalled = Instant::now();
    kill(pid, Signal::SIGTERM).expect("signal start.sh");
    let status = tokio::time::timeout(Duration::from_secs(10), child.wait())
        .await
        .expect("exited within the 10s shutdown timeout")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "graceful exit after {:?}", signalled.elapsed());
    let left = conn
        .fetch_one("SELECT count(*)::int8 FROM workers WHERE id = $1", &[(&id, Type::UUID)])
        .await
        .expect("count")
        .get::<_, i64>(0);
    assert_eq!(left, 0, "a graceful stop removes this worker's row");

    // With no OTLP endpoint configured, a clean run logs no error at all (JSON logs on stdout).
    let logs = std::fs::read_to_string(dir.path().join("stdout.log")).expect("logs")
        + &std::fs::read_to_string(dir.path().join("stderr.log")).expect("logs");
    assert!(logs.contains("worker stopped"), "logs captured: {logs}");
    let errors: Vec<&str> = logs.lines().filter(|l| l.contains("\"level\":\"ERROR\"")).collect();
    assert!(errors.is_empty(), "errors logged: {errors:#?}");
}

/// A signal while the worker is still starting (here: waiting for a Redis that does not answer,
/// after its lease row is written) ends the start before any loop runs: exit 0, the row removed.
/// Before, the handlers were installed last and the signal killed the process mid-start, with
/// the chat loops (and any chat they had claimed) already running.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sigterm_while_the_worker_starts_ends_the_start_before_any_loop_runs() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let config = write_config(dir.path(), &test_db.url, free_port(), "10s");
    let silent_redis = format!("redis://127.0.0.1:{}", free_port());
    let text = std::fs::read_to_string(&config).expect("config").replace(&common::redis_url(), &silent_redis);
    std::fs::write(&config, text).expect("config");
    let log = dir.path().join("worker.log");
    let mut child = start_worker(&config, &[], &log);
    let conn = test_db.db.get().await.expect("conn");
    eventually(Duration::from_secs(10), "the worker's lease row", || async {
        conn.fetch_one("SELECT count(*) FROM workers", &[]).await.expect("workers").get::<_, i64>(0) == 1
    })
    .await;
    kill(Pid::from_raw(child.id().expect("pid") as i32), Signal::SIGTERM).expect("SIGTERM");
    let (status, log) = exit_and_log(&mut child, Duration::from_secs(30), &log).await;
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("stopped while starting; no loop was started"), "{log}");
    assert!(!log.contains("loop started"), "{log}");
    assert!(log.contains("worker stopped") && log.contains("\"drained\":true"), "{log}");
    assert_eq!(worker_rows(&test_db).await, 0, "a drained worker removes its row");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_migrations_at_once_all_succeed() {
    let test_db = TestDb::empty().await;
    let runs: Vec<_> = (0..3)
        .map(|_| {
            Command::new(BIN)
                .args(["migrate", "--database-url", &test_db.url])
                .current_dir(repo_path(""))
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .expect("spawn migrate")
        })
        .collect();
    for run in runs {
        let out = run.wait_with_output().expect("migrate");
        assert!(out.status.success(), "migrate failed: {}", String::from_utf8_lossy(&out.stderr));
    }
    let conn = test_db.db.get().await.expect("conn");
    let rows = conn
        .fetch_all("SELECT version, count(*)::int8 FROM refinery_schema_history GROUP BY version", &[])
        .await
        .expect("history");
    let migrations = std::fs::read_dir(repo_path("migrations")).expect("dir").count();
    assert_eq!(rows.len(), migrations, "every migration recorded");
    assert!(rows.iter().all(|r| r.get::<_, i64>(1) == 1), "a migration applied twice");
}

/// What an operator sees when the database and the binary disagree about landed migrations:
/// each refusal once, naming the migration and what to do (the checksums and rows are what
/// refinery recorded; changing them is what an edited file or another build would do).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_refuses_an_edited_unknown_or_skipped_migration_saying_what_to_do() {
    let test_db = TestDb::empty().await;
    let run = |args: &[&str]| {
        let out = worker(args, &[("DATABASE_URL", test_db.url.as_str())]);
        let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
        let errors: Vec<String> =
            stderr.lines().filter(|l| l.starts_with("error: ")).map(str::to_owned).collect();
        (out.status.code(), errors)
    };

    // Before any migration a command names the missing table, once (not once per cause).
    let (code, errors) = run(&["outbox", "stats"]);
    assert_eq!(code, Some(1));
    assert_eq!(errors, ["error: db error: ERROR: relation \"task_outbox\" does not exist"]);

    let (code, errors) = run(&["migrate"]);
    assert_eq!((code, errors.len()), (Some(0), 0), "{errors:?}");
    let conn = test_db.db.get().await.expect("conn");
    let history = |sql: String| {
        let conn = &conn;
        async move { conn.batch_execute(&sql).await.expect(&sql) }
    };

    let recorded: String = conn
        .fetch_one("SELECT checksum FROM refinery_schema_history WHERE version = 3", &[])
        .await
        .expect("V3's checksum")
        .get(0);
    // Refinery reads the checksum as a u64 (and panics on anything else): swap in another one.
    let other = if recorded == "1" { "2" } else { "1" };
    history(format!("UPDATE refinery_schema_history SET checksum = '{other}' WHERE version = 3")).await;
    let (code, errors) = run(&["migrate"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        errors,
        ["error: the applied migration V3__chats differs from V3__chats built into this binary: a landed \
          migration was edited, or another build applied a different V3__chats. A landed migration is never \
          edited: restore the file and put the change in a new migration"]
    );
    history(format!("UPDATE refinery_schema_history SET checksum = '{recorded}' WHERE version = 3")).await;

    history(
        "INSERT INTO refinery_schema_history (version, name, applied_on, checksum) \
         VALUES (9999, 'from_a_newer_build', '2026-12-07T00:00:00Z', '1')"
            .to_owned(),
    )
    .await;
    let (code, errors) = run(&["migrate"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        errors,
        ["error: migration V9999__from_a_newer_build is applied to this database but not built into this \
          binary: a newer build migrated it. Run that build (or a newer one); this one does not know the newer \
          schema"]
    );
    history("DELETE FROM refinery_schema_history WHERE version = 9999".to_owned()).await;

    history("DELETE FROM refinery_schema_history WHERE version = 5".to_owned()).await;
    let (code, errors) = run(&["migrate"]);
    assert_eq!(code, Some(1));
    assert_eq!(
        errors,
        ["error: migration V5__gitsync is built into this binary but was never applied, while a later one \
          was: migrations must land in the order of their numbers; renumber it after the last applied one"]
    );
    let applied: i64 =
        conn.fetch_one("SELECT count(*) FROM refinery_schema_history", &[]).await.expect("count").get(0);
    assert_eq!(
        applied as usize,
        std::fs::read_dir(repo_path("migrations")).expect("dir").count() - 1,
        "nothing applied"
    );
}

/// A migration whose SQL fails shows the server's own message, not only refinery's summary.
#[tokio::test]
async fn a_failing_migration_names_the_servers_error() {
    let test_db = TestDb::empty().await;
    test_db
        .db
        .get()
        .await
        .expect("conn")
        .batch_execute("CREATE TABLE workers (x int)")
        .await
        .expect("a clash");
    let out = worker(&["migrate"], &[("DATABASE_URL", test_db.url.as_str())]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("ERROR: relation \"workers\" already exists"), "{stderr}");
}

#[test]
fn version_names_the_crate_version_the_commit_and_the_build_date() {
    let out = worker(&["--version"], &[]);
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout).trim().to_owned();
    let rest = text
        .strip_prefix(&format!("worker {} (commit ", env!("CARGO_PKG_VERSION")))
        .and_then(|r| r.strip_suffix(')'))
        .unwrap_or_else(|| panic!("unexpected --version: {text}"));
    let (commit, date) = rest.split_once(", built ").unwrap_or_else(|| panic!("no build date: {text}"));
    assert!(
        commit == "unknown" || (commit.len() == 12 && commit.chars().all(|c| c.is_ascii_hexdigit())),
        "commit {commit:?}"
    );
    assert!(chrono::NaiveDate::parse_from_str(date, "%Y-%m-%d").is_ok(), "build date {date:?}");
}

#[test]
fn config_check_exits_1_naming_the_key_and_source_and_0_on_the_shipped_config() {
    let dir = tempfile::tempdir().expect("dir");
    let file = |name: &str, text: &str| {
        let path = dir.path().join(name);
        std::fs::write(&path, text).expect("write");
        path.to_str().expect("utf-8").to_owned()
    };
    let syntax = file("syntax.toml", "[database]\npool_size = = 3\n");
    let unknown = file("unknown.toml", "[outbox]\nbatch_sise = 3\n");
    let range = file("range.toml", "[database]\n\npool_size = 0\n");
    /// (arguments, environment, what stderr must mention)
    type Case<'a> = (Vec<&'a str>, Vec<(&'a str, &'a str)>, Vec<String>);
    let cases: Vec<Case> = vec![
        (vec!["config", "check", "--config", &syntax], vec![], vec![format!("{syntax}:2")]),
        (
            vec!["config", "check", "--config", &unknown],
            vec![],
            vec!["outbox.batch_sise".into(), format!("{unknown}:2")],
        ),
        (
            vec!["config", "check", "--config", &range],
            vec![],
            vec!["database.pool_size".into(), format!("{range}:3")],
        ),
        (
            vec!["config", "check", "--config", "config/worker.toml"],
            vec![("WORKER__OUTBOX__MAX_ATTEMPTS", "many")],
            vec!["outbox.max_attempts".into(), "env WORKER__OUTBOX__MAX_ATTEMPTS".into()],
        ),
    ];
    for (args, env, expected) in cases {
        let out = worker(&args, &env);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(1), "{args:?} should fail: {stderr}");
        for needle in expected {
            assert!(stderr.contains(&needle), "{args:?}: `{needle}` missing from: {stderr}");
        }
    }
    let out = worker(&["config", "check", "--config", "config/worker.toml"], &[]);
    assert!(out.status.success(), "worker.toml: {}", String::from_utf8_lossy(&out.stderr));
    // production.toml takes its URLs from the environment, and only verified TLS ones: with
    // them it passes without a warning; without them the built-in local defaults are refused.
    let production = ["config", "check", "--config", "config/production.toml"];
    let verified = [
        ("DATABASE_URL", "postgres://app:pw@db.internal:5432/app?sslmode=verify-full&sslrootcert=system"),
        ("REDIS_URL", "rediss://default:pw@cache.internal:6380"),
    ];
    let out = worker(&production, &verified);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && stderr.is_empty(), "production.toml: {stderr}");
    let out = worker(&production, &[]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "production.toml without URLs: {stderr}");
    assert!(stderr.contains("config key `database.url`") && stderr.contains("sslmode=prefer"), "{stderr}");
}

/// Waits until a statement matching `pattern` (SQL LIKE) waits on a lock in this database.
async fn wait_for_lock_wait(test_db: &TestDb, pattern: &str, what: &str) {
    let observer = test_db.db.get().await.expect("conn");
    eventually(Duration::from_secs(10), what, || async {
        observer
            .fetch_one(
                "SELECT count(*)::int8 FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE $1",
                &[(&pattern, Type::TEXT)],
            )
            .await
            .expect("activity")
            .get::<_, i64>(0)
            >= 1
    })
    .await;
}

async fn worker_rows(test_db: &TestDb) -> i64 {
    let conn = test_db.db.get().await.expect("conn");
    conn.fetch_one("SELECT count(*)::int8 FROM workers", &[]).await.expect("count").get(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_drain_that_does_not_finish_leaves_the_worker_row_for_recovery() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = write_config(dir.path(), &test_db.url, port, "2s");
    // Long statement and tick timeouts: the blocked tick outlasts the 2s shutdown timeout.
    let mut child = start_worker(
        &config,
        &[
            "outbox.tick_timeout=60s",
            "database.statement_timeout=60s",
            "database.idle_in_transaction_timeout=2m",
        ],
        &dir.path().join("worker.log"),
    );
    eventually(Duration::from_secs(5), "/readyz 200", || async {
        matches!(readyz(port).await, Some((200, _)))
    })
    .await;
    assert_eq!(worker_rows(&test_db).await, 1);

    // Block the outbox tick on a table lock that the deregister (DELETE FROM workers) does not
    // touch: a shutdown that skipped the drain would remove the row at once.
    let mut blocker = test_db.db.get().await.expect("conn");
    let tx = blocker.transaction().await.expect("begin");
    tx.batch_execute("LOCK TABLE task_outbox IN ACCESS EXCLUSIVE MODE").await.expect("lock");
    wait_for_lock_wait(&test_db, "%task_outbox%", "the outbox tick to block on the table lock").await;

    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("SIGTERM");
    eventually(Duration::from_secs(5), "/readyz to report draining", || async {
        readyz(port).await.is_some_and(|(status, body)| status == 503 && body["draining"] == true)
    })
    .await;
    let status = tokio::time::timeout(Duration::from_secs(20), child.wait())
        .await
        .expect("exits after the shutdown timeout")
        .expect("wait");
    assert_eq!(status.code(), Some(worker::daemon::EXIT_DRAIN_TIMEOUT), "an unfinished drain exits 1");
    assert_eq!(worker_rows(&test_db).await, 1, "the row stays, so other replicas recover its work");
    tx.rollback().await.expect("release");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_signal_during_a_hanging_deregister_exits_130_at_once() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = write_config(dir.path(), &test_db.url, port, "20s");
    // One lease tick at start, then none: the row lock below holds up only the deregister.
    let mut child = start_worker(
        &config,
        &["workers.interval=1h", "workers.retention=1d", "database.statement_timeout=60s"],
        &dir.path().join("worker.log"),
    );
    eventually(Duration::from_secs(5), "/readyz 200", || async {
        matches!(readyz(port).await, Some((200, _)))
    })
    .await;

    let mut blocker = test_db.db.get().await.expect("conn");
    let tx = blocker.transaction().await.expect("begin");
    tx.batch_execute("SELECT * FROM workers FOR UPDATE").await.expect("lock rows");
    let pid = Pid::from_raw(child.id().expect("pid") as i32);
    kill(pid, Signal::SIGTERM).expect("first SIGTERM");
    wait_for_lock_wait(&test_db, "DELETE FROM workers%", "the deregister to block on the row lock").await;
    assert!(child.try_wait().expect("try_wait").is_none(), "exited with the deregister in flight");

    let forced = Instant::now();
    kill(pid, Signal::SIGTERM).expect("second SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(5), child.wait())
        .await
        .expect("exits at once")
        .expect("wait");
    assert_eq!(status.code(), Some(worker::daemon::EXIT_FORCED), "second signal exit code");
    assert!(forced.elapsed() < Duration::from_secs(3), "took {:?}", forced.elapsed());
    tx.rollback().await.expect("release");
}
