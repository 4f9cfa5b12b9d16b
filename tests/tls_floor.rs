//! The production TLS floor from the operator's side: the real binary's `config check` and `run`
//! with `APP_ENV=production` refuse a connection that checks no certificate (exit 1, naming the
//! key, the mode and the fix), accept it with a warning when an `allow_*` key says so, and leave
//! development alone. (A verified URL actually connecting is `tests/postgres_tls.rs`.)

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use common::process::{BIN, free_port, inherited_overrides, readyz, repo_path};
use common::{TestDb, eventually};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const REQUIRE: &str = "postgres://app:hunter2@db.internal:5432/app?sslmode=require";
const VERIFIED: &str = "postgres://app:hunter2@db.internal:5432/app?sslmode=verify-full&sslrootcert=system";
const TLS_REDIS: &str = "rediss://default:hunter2@cache.internal:6380";

/// A config file that loads nothing else (the repository's `config/worker.toml` is not read).
fn config_file(dir: &Path, text: &str) -> PathBuf {
    let path = dir.join("worker.toml");
    std::fs::write(&path, text).expect("write config");
    path
}

/// `worker ARGS --config FILE` to completion with only `env` from the environment.
fn worker(args: &[&str], config: &Path, env: &[(&str, &str)]) -> Output {
    let mut command = Command::new(BIN);
    command.args(args).arg("--config").arg(config).current_dir(repo_path(""));
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command.envs(env.iter().copied()).output().expect("run worker")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// Exit 1, nothing printed on stdout, and stderr (returned) never shows the password.
fn refused(out: &Output) -> String {
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "stdout: {} stderr: {stderr}", text(&out.stdout));
    assert!(!text(&out.stdout).contains("config ok"));
    assert!(!stderr.contains("hunter2"), "{stderr}");
    stderr
}

#[test]
fn config_check_in_production_refuses_sslmode_require_and_accepts_it_with_a_warning_when_allowed() {
    let dir = tempfile::tempdir().expect("dir");
    let config = config_file(dir.path(), "[log]\nlevel = \"warn\"\n");
    let production = [("APP_ENV", "production"), ("DATABASE_URL", REQUIRE), ("REDIS_URL", TLS_REDIS)];

    let stderr = refused(&worker(&["config", "check"], &config, &production));
    for needle in [
        "config key `database.url` (from env DATABASE_URL)",
        "sslmode=require encrypts but checks no certificate",
        "sslmode=verify-full with sslrootcert=system",
        "sslrootcert=<CA file>",
        "database.allow_unverified_tls = true",
    ] {
        assert!(stderr.contains(needle), "`{needle}` missing from: {stderr}");
    }

    let allowed = [&production[..], &[("WORKER__DATABASE__ALLOW_UNVERIFIED_TLS", "true")]].concat();
    let out = worker(&["config", "check"], &config, &allowed);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert_eq!(text(&out.stdout), "config ok\n");
    assert!(
        stderr.contains(
            "warning: database.url: sslmode=require encrypts but checks no certificate: anyone on the path \
             can impersonate the server; accepted because database.allow_unverified_tls = true"
        ),
        "{stderr}"
    );
    assert!(!stderr.contains("hunter2"), "{stderr}");

    // Verified: exit 0 and nothing to warn about.
    let verified = [("APP_ENV", "production"), ("DATABASE_URL", VERIFIED), ("REDIS_URL", TLS_REDIS)];
    let out = worker(&["config", "check"], &config, &verified);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    assert_eq!(text(&out.stderr), "", "no warning for verified TLS");

    // Development keeps today's defaults: the same URL, no floor and no warning.
    for env in [&[("DATABASE_URL", REQUIRE)][..], &[("APP_ENV", "development"), ("DATABASE_URL", REQUIRE)]] {
        let out = worker(&["config", "check"], &config, env);
        assert_eq!(out.status.code(), Some(0), "{env:?}: {}", text(&out.stderr));
        assert_eq!(text(&out.stderr), "", "{env:?}");
    }
}

#[test]
fn config_check_in_production_names_each_weaker_connection_and_its_allow_key() {
    let dir = tempfile::tempdir().expect("dir");
    let config = config_file(dir.path(), "");
    let base = [("APP_ENV", "production"), ("DATABASE_URL", VERIFIED), ("REDIS_URL", TLS_REDIS)];
    let with = |extra: &[(&'static str, &'static str)]| [&base[..], extra].concat();
    for (extra, needles) in [
        // No sslmode at all is libpq's default, prefer: refused too.
        (
            with(&[("DATABASE_URL", "postgres://app:hunter2@db.internal/app")]),
            &["`database.url`", "sslmode=prefer (libpq's default when the URL names none)"][..],
        ),
        (
            with(&[(
                "WORKER__DATABASE__MIGRATE_URL",
                "postgres://app:hunter2@db.internal/app?sslmode=disable",
            )]),
            &[
                "`database.migrate_url` (from env WORKER__DATABASE__MIGRATE_URL)",
                "sslmode=disable",
                "plaintext",
            ][..],
        ),
        (
            with(&[("WORKER__DATABASE__LISTEN_URL", "postgres://db.internal/app?sslmode=prefer")]),
            &["`database.listen_url`", "sslmode=prefer"][..],
        ),
        (
            with(&[("REDIS_URL", "redis://default:hunter2@cache.internal:6379")]),
            &[
                "`redis.url` (from env REDIS_URL)",
                "is plaintext",
                "rediss://",
                "redis.allow_plaintext = true",
            ][..],
        ),
    ] {
        let stderr = refused(&worker(&["config", "check"], &config, &extra));
        for needle in needles {
            assert!(stderr.contains(needle), "{extra:?}: `{needle}` missing from: {stderr}");
        }
    }

    let provider = "[[gitsync.providers]]\nid = \"ghe\"\nkind = \"github\"\n\
                    api_base_url = \"http://ghe.internal/api/v3\"\norigin_host = \"ghe.internal\"\n";
    let config = config_file(dir.path(), provider);
    let stderr = refused(&worker(&["config", "check"], &config, &base));
    let key = format!("`gitsync.providers.0.api_base_url` (from {}:4)", config.display());
    for needle in [key.as_str(), "is not https", "gitsync.providers.0.allow_insecure_http = true"] {
        assert!(stderr.contains(needle), "`{needle}` missing from: {stderr}");
    }
    let config = config_file(dir.path(), &format!("{provider}allow_insecure_http = true\n"));
    let out = worker(&["config", "check"], &config, &with(&[("WORKER__REDIS__ALLOW_PLAINTEXT", "true")]));
    assert_eq!(out.status.code(), Some(0), "{}", text(&out.stderr));
    let stderr = text(&out.stderr);
    assert!(stderr.contains("warning: gitsync.providers.0.api_base_url is not https"), "{stderr}");
    assert_eq!(stderr.matches("warning:").count(), 1, "redis is rediss:// here: {stderr}");
}

#[test]
fn run_in_production_refuses_an_unverified_database_url_before_connecting() {
    let dir = tempfile::tempdir().expect("dir");
    let config = config_file(dir.path(), "");
    let env = [("APP_ENV", "production"), ("DATABASE_URL", REQUIRE), ("REDIS_URL", TLS_REDIS)];
    let stderr = refused(&worker(&["run"], &config, &env));
    assert!(stderr.contains("`database.url`") && stderr.contains("sslmode=require"), "{stderr}");
    let stderr = refused(&worker(&["migrate"], &config, &env));
    assert!(stderr.contains("`database.url`") && stderr.contains("sslmode=require"), "{stderr}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn run_in_production_with_the_allow_keys_starts_and_logs_each_accepted_risk() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    let config = config_file(
        dir.path(),
        &format!(
            "[log]\nformat = \"json\"\n\n\
             [database]\nurl = \"{}\"\npool_size = 4\nallow_unverified_tls = true\n\n\
             [redis]\nurl = \"{}\"\nprefix = \"{}\"\nallow_plaintext = true\n\n\
             [health]\nlisten = \"127.0.0.1:{port}\"\n\n[workers]\ninterval = \"200ms\"\n",
            test_db.url,
            common::redis_url(),
            common::unique_prefix(),
        ),
    );
    let (log, errors) = (dir.path().join("stdout.log"), dir.path().join("stderr.log"));
    let mut command = tokio::process::Command::new(BIN);
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    let mut child = command
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .env("APP_ENV", "production")
        .current_dir(repo_path(""))
        .stdout(std::fs::File::create(&log).expect("log file"))
        .stderr(std::fs::File::create(&errors).expect("log file"))
        .kill_on_drop(true)
        .spawn()
        .expect("worker");
    eventually(Duration::from_secs(10), "/readyz to answer 200", || async {
        matches!(readyz(port).await, Some((200, _)))
    })
    .await;
    kill(Pid::from_raw(child.id().expect("pid") as i32), Signal::SIGTERM).expect("SIGTERM");
    let status =
        tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("drains").expect("wait");
    assert_eq!(status.code(), Some(0));

    let logs =
        std::fs::read_to_string(&log).expect("logs") + &std::fs::read_to_string(&errors).expect("logs");
    let warnings: Vec<&str> =
        logs.lines().filter(|l| l.contains("a production floor is relaxed by config")).collect();
    assert_eq!(warnings.len(), 2, "one for the database, one for Redis: {logs}");
    assert!(warnings.iter().all(|l| l.contains("\"level\":\"WARN\"")), "{warnings:#?}");
    assert!(warnings[0].contains("database.allow_unverified_tls = true"), "{warnings:#?}");
    assert!(warnings[1].contains("redis.allow_plaintext = true"), "{warnings:#?}");
}
