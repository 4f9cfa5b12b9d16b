//! The agent boundary from the attacker's side (issue 16, acceptance 1 and 2): a real `worker`
//! whose environment holds every kind of secret runs an agent that dumps its environment, tries
//! to read the worker's `/proc/<pid>/environ`, `mem` and descriptors, and lists its own
//! descriptors. Nothing of the worker may be in what it finds.
//!
//! The suite runs as root, so the agent is made unprivileged two ways: `chats.runner.user =
//! nobody` under a root worker, and a worker that itself runs as `nobody` (same uid as its agent:
//! only the worker's non-dumpable mark stands between them).

mod chaos_support;
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use chaos_support::WorkerConfig;
use common::TestDb;
use common::process::{BIN, exit_and_log, free_port, inherited_overrides, repo_path};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

const NOBODY: u32 = 65534;

/// The secrets a production worker may hold in its environment.
const SECRETS: &[(&str, &str)] = &[
    ("AWS_SECRET_ACCESS_KEY", "aws-secret-value"),
    ("GITHUB_TOKEN", "ghp-secret-value"),
    ("OTEL_EXPORTER_OTLP_METRICS_HEADERS", "x-api-key=otel-secret-value"),
];

/// A python agent (the system one: the agent user cannot reach a pyenv under /root) that writes
/// what it can reach to `report` and answers once.
fn spy_agent(dir: &Path, report: &Path) -> String {
    let script = format!(
        r#"#!/usr/bin/python3
import json, os, sys, time
def attempt(f):
    try:
        return {{"ok": True, "got": f()}}
    except Exception as e:
        return {{"ok": False, "error": type(e).__name__}}
def read(path, n=None):
    with open(path, "rb") as fh:
        return fh.read(n).decode("latin-1")
ppid = os.getppid()
names = os.listdir("/proc/self/fd")
fds = []
for name in names:
    try:
        os.fstat(int(name))
        fds.append(int(name))
    except OSError:
        pass
def readable_environs():
    found = {{}}
    for pid in os.listdir("/proc"):
        if pid.isdigit() and int(pid) != os.getpid():
            try:
                found[pid] = read("/proc/%s/environ" % pid)
            except Exception:
                pass
    return found
def orphan():
    # A process that leaves the agent's group and outlives its parent: re-parented to PID 1,
    # which alone can reap it once it exits.
    r, w = os.pipe()
    child = os.fork()
    if child == 0:
        os.setsid()
        parent = os.getpid()
        if os.fork() == 0:
            while os.getppid() == parent:
                time.sleep(0.01)
            os.write(w, ("%d %d" % (os.getpid(), os.getppid())).encode())
            os._exit(0)
        os._exit(0)
    os.waitpid(child, 0)
    os.close(w)
    pid, parent = map(int, os.read(r, 64).split())
    deadline = time.monotonic() + 10
    while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
        time.sleep(0.01)
    return {{"parent": parent, "reaped": not os.path.exists("/proc/%d" % pid)}}
report = {{
    "uid": os.getuid(),
    "pid_one_environ": attempt(lambda: read("/proc/1/environ")),
    # In a container of its own only: on the host /proc holds other tests' processes.
    "readable_environs": readable_environs() if os.environ.get("SPY_CONTAINER") else None,
    "orphan": orphan() if os.environ.get("SPY_CONTAINER") else None,
    "env": dict(os.environ),
    "parent_environ": attempt(lambda: read("/proc/%d/environ" % ppid)),
    "parent_mem": attempt(lambda: read("/proc/%d/mem" % ppid, 1)),
    "parent_fds": attempt(lambda: os.listdir("/proc/%d/fd" % ppid)),
    "parent_fd0": attempt(lambda: os.readlink("/proc/%d/fd/0" % ppid)),
    "own_fds": sorted(fds),
}}
with open("{report}", "w") as fh:
    json.dump(report, fh)
sys.stdin.read()
print(json.dumps({{"type": "message", "role": "assistant", "content": "done"}}), flush=True)
"#,
        report = report.display()
    );
    let path = dir.join("spy-agent");
    std::fs::write(&path, script).expect("write agent");
    chmod(&path, 0o755);
    path.to_string_lossy().into_owned()
}

fn chmod(path: &Path, mode: u32) {
    let mut permissions = std::fs::metadata(path).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, mode);
    std::fs::set_permissions(path, permissions).expect("chmod");
}

/// How the worker under test is started.
#[derive(Clone, Copy)]
enum Launch {
    /// `worker run` as the test's own user (root).
    AsIs,
    /// `worker run` as this uid (and gid).
    As(u32),
    /// As a container starts it: `scripts/start.sh` is the first process (PID 1) of a new pid
    /// namespace with its own `/proc`, as `nobody`, so the agent runs as the same user as every
    /// process there.
    Container,
}

/// A container's first process (host pid), killed when this is dropped, and with it every
/// process of its pid namespace, unless it has exited: `unshare --kill-child` cannot do that,
/// the parent-death signal it sets is cleared when `setpriv` changes the user.
struct PidOne(Option<Pid>);

impl PidOne {
    /// `unshare`'s one child, once it exists.
    async fn of(unshare: &tokio::process::Child) -> PidOne {
        let id = unshare.id().expect("unshare's pid");
        let first_child = || {
            let children =
                std::fs::read_to_string(format!("/proc/{id}/task/{id}/children")).unwrap_or_default();
            children.split_whitespace().next().map(|pid| Pid::from_raw(pid.parse().expect("a pid")))
        };
        common::eventually(Duration::from_secs(10), "unshare's first process", || async {
            first_child().is_some()
        })
        .await;
        PidOne(first_child())
    }

    fn pid(&self) -> Pid {
        self.0.expect("still running")
    }

    /// It exited by itself: its pid may be reused, never kill it.
    fn exited(&mut self) {
        self.0 = None;
    }
}

impl Drop for PidOne {
    fn drop(&mut self) {
        if let Some(pid) = self.0 {
            let _ = kill(pid, Signal::SIGKILL);
        }
    }
}

/// What [`spy_on`] leaves running for the caller.
struct Spied {
    report: serde_json::Value,
    worker: tokio::process::Child,
    /// With [`Launch::Container`].
    pid_one: Option<PidOne>,
    _test_db: TestDb,
    dir: tempfile::TempDir,
}

/// Runs one chat turn on a real worker whose environment holds [`SECRETS`] and the worker's own
/// URLs, and returns the agent's report; the worker is killed.
async fn spy(config: impl FnOnce(WorkerConfig) -> WorkerConfig, launch: Launch) -> serde_json::Value {
    let mut spied = spy_on(config, launch).await;
    let _ = spied.worker.start_kill();
    spied.report
}

/// [`spy`], leaving the worker running (with its database and directory) for the caller.
async fn spy_on(config: impl FnOnce(WorkerConfig) -> WorkerConfig, launch: Launch) -> Spied {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    // The agent (and, as `nobody`, the worker) must reach its script, config and report.
    chmod(dir.path(), 0o777);
    let report = dir.path().join("report.json");
    let agent = spy_agent(dir.path(), &report);
    let port = free_port();
    let base = WorkerConfig::for_test(&test_db)
        .set("health.listen", format!("127.0.0.1:{port}"))
        .set("chats.enabled", true)
        .set("chats.runner.command", toml::Value::Array(vec![agent.into()]));
    let config_path = dir.path().join("worker.toml");
    std::fs::write(&config_path, config(base).to_toml()).expect("write config");
    chmod(&config_path, 0o644);
    let config_arg = config_path.to_str().expect("utf-8");

    let mut command = match launch {
        Launch::AsIs | Launch::As(_) => {
            let mut command = tokio::process::Command::new(BIN);
            command.args(["run", "--config", config_arg]);
            command
        }
        Launch::Container => {
            let mut command = tokio::process::Command::new("unshare");
            let nobody = NOBODY.to_string();
            command
                .args(["--pid", "--fork", "--mount-proc", "setpriv"])
                .args(["--reuid", &nobody, "--regid", &nobody, "--clear-groups", "bash"])
                .arg(repo_path("scripts/start.sh"))
                .args([BIN, "run", "--config", config_arg]);
            command
        }
    };
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    let log = std::fs::File::create(dir.path().join("worker.log")).expect("log file");
    // The worker's own URLs as the conventional variables too, as a production deploy has them.
    command
        .env("DATABASE_URL", &test_db.url)
        .env("WORKER__DATABASE__URL", &test_db.url)
        .env("REDIS_URL", common::redis_url())
        .envs(SECRETS.iter().copied())
        .current_dir(repo_path(""))
        .stdin(Stdio::null())
        .stdout(log.try_clone().expect("log file"))
        .stderr(log)
        .kill_on_drop(true);
    if let Launch::As(uid) = launch {
        command.uid(uid).gid(uid);
    }
    let mut worker = command.spawn().expect("start worker");
    let pid_one = match launch {
        Launch::Container => Some(PidOne::of(&worker).await),
        Launch::AsIs | Launch::As(_) => None,
    };
    let log = || std::fs::read_to_string(dir.path().join("worker.log")).unwrap_or_default();

    let conn = test_db.db.get().await.expect("conn");
    conn.batch_execute(
        "WITH c AS (INSERT INTO chats (owner_id) VALUES (gen_random_uuid()) RETURNING id) \
         SELECT post_chat_message(c.id, 'user', '\"hi\"'::jsonb) FROM c",
    )
    .await
    .expect("a pending chat");
    drop(conn);
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let report_written = || {
        std::fs::read_to_string(&report).is_ok_and(|t| serde_json::from_str::<serde_json::Value>(&t).is_ok())
    };
    while !report_written() {
        if let Ok(Some(status)) = worker.try_wait() {
            panic!("the worker exited ({status}):\n{}", log());
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no report from the agent within 30 s; the worker's log:\n{}",
            log()
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let text = std::fs::read_to_string(&report).expect("report");
    Spied {
        report: serde_json::from_str(&text).expect("report is JSON"),
        worker,
        pid_one,
        _test_db: test_db,
        dir,
    }
}

/// Nothing of the worker's secrets, nor a way to its memory, in what the agent found.
fn assert_walled_off(report: &serde_json::Value) {
    let env = report["env"].as_object().expect("env");
    for name in [
        "DATABASE_URL",
        "REDIS_URL",
        "WORKER__DATABASE__URL",
        "AWS_SECRET_ACCESS_KEY",
        "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
    ] {
        assert!(!env.contains_key(name), "{name} reached the agent: {env:?}");
    }
    let text = report.to_string();
    for secret in ["aws-secret-value", "otel-secret-value", "postgres://"] {
        assert!(!text.contains(secret), "{secret} reached the agent: {text}");
    }
    for probe in ["parent_environ", "parent_mem", "parent_fds", "parent_fd0", "pid_one_environ"] {
        assert_eq!(report[probe]["ok"], false, "{probe} was readable: {}", report[probe]);
    }
    assert_eq!(report["own_fds"], serde_json::json!([0, 1, 2]), "inherited descriptors");
    assert!(env.contains_key("CHAT_ID") && env.contains_key("CHAT_GENERATION"), "{env:?}");
}

#[tokio::test]
async fn an_agent_running_as_another_user_sees_the_allow_list_only() {
    let report = spy(|c| c.set("chats.runner.user", "nobody"), Launch::AsIs).await;
    assert_eq!(report["uid"], NOBODY);
    assert_walled_off(&report);
    let env = report["env"].as_object().expect("env");
    assert!(!env.contains_key("GITHUB_TOKEN"), "not passed unless asked: {env:?}");
    let mut names: Vec<&str> = env.keys().map(String::as_str).collect();
    names.sort_unstable();
    let allowed = ["CHAT_GENERATION", "CHAT_ID", "HOME", "LANG", "PATH", "TZ"];
    assert!(names.iter().all(|n| allowed.contains(n)), "beyond the allow-list: {names:?}");
    assert_eq!(env["HOME"], "/nonexistent", "the agent user's home, not the worker's");
}

#[tokio::test]
async fn pass_env_passes_exactly_the_named_variable() {
    let report = spy(
        |c| {
            c.set("chats.runner.user", "nobody")
                .set("chats.runner.pass_env", toml::Value::Array(vec!["GITHUB_TOKEN".into()]))
                .set("chats.runner.env", toml::Value::Table(toml::toml! { MODE = "review" }))
        },
        Launch::AsIs,
    )
    .await;
    assert_walled_off(&report);
    assert_eq!(report["env"]["GITHUB_TOKEN"], "ghp-secret-value");
    assert_eq!(report["env"]["MODE"], "review");
}

#[tokio::test]
async fn an_agent_of_the_same_user_cannot_read_the_non_dumpable_worker() {
    // The worker itself runs as nobody, and so does its agent: same uid, so only the worker's
    // PR_SET_DUMPABLE = 0 keeps /proc/<worker>/environ, mem and fd closed.
    let report = spy(|c| c, Launch::As(NOBODY)).await;
    assert_eq!(report["uid"], NOBODY);
    assert_walled_off(&report);
}

/// The production start (`scripts/start.sh` as a container's first process, every process the
/// same user): before, the script's shell stayed PID 1 holding the whole environment, and the
/// agent read `DATABASE_URL` from `/proc/1/environ`. Now the worker replaces the shell, and the
/// init it keeps as PID 1 is non-dumpable, reaps what agents orphan, and passes SIGTERM on: the
/// worker drains and the container exits 0.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_a_container_no_process_of_the_agents_user_shows_the_workers_environment() {
    let in_container =
        |c: WorkerConfig| c.set("chats.runner.env", toml::Value::Table(toml::toml! { SPY_CONTAINER = "1" }));
    let mut spied = spy_on(in_container, Launch::Container).await;
    let report = &spied.report;
    assert_eq!(report["uid"], NOBODY);
    assert_walled_off(report);
    let readable = report["readable_environs"].as_object().expect("environs");
    assert!(!readable.contains_key("1"), "PID 1's environment was readable: {readable:?}");
    assert_eq!(report["orphan"]["parent"], 1, "an orphan goes to PID 1: {}", report["orphan"]);
    assert_eq!(report["orphan"]["reaped"], true, "PID 1 left a zombie: {}", report["orphan"]);

    // SIGTERM to PID 1, as a container runtime sends it.
    let pid_one = spied.pid_one.as_mut().expect("a container");
    kill(pid_one.pid(), Signal::SIGTERM).expect("SIGTERM");
    let log = spied.dir.path().join("worker.log");
    let (status, log) = exit_and_log(&mut spied.worker, Duration::from_secs(30), &log).await;
    pid_one.exited();
    assert!(status.success(), "{status}: {log}");
    assert!(log.contains("worker stopped") && log.contains("\"drained\":true"), "{log}");
}

/// The init exits with the worker's own status: a refused config is still exit 1 in a container.
#[tokio::test]
async fn in_a_container_the_workers_exit_status_is_the_containers() {
    let status = tokio::process::Command::new("unshare")
        .args(["--pid", "--fork", "--mount-proc", "bash"])
        .arg(repo_path("scripts/start.sh"))
        .args([BIN, "--config", "/nonexistent/worker.toml", "config", "check"])
        .current_dir(repo_path(""))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .await
        .expect("unshare");
    assert_eq!(status.code(), Some(1));
}

/// `worker config check` of a config file holding `toml`.
fn config_check(toml: &str) -> (Option<i32>, String) {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, toml).expect("write");
    let output = std::process::Command::new(BIN)
        .args(["--config", path.to_str().expect("utf-8"), "config", "check"])
        .env_remove("WORKER_CONFIG")
        .output()
        .expect("run worker");
    (output.status.code(), String::from_utf8_lossy(&output.stderr).into_owned())
}

#[test]
fn config_check_refuses_passing_the_workers_secrets() {
    for name in ["DATABASE_URL", "WORKER__DATABASE__URL", "OTEL_EXPORTER_OTLP_HEADERS"] {
        let (code, stderr) =
            config_check(&format!("[chats.runner]\npass_env = [\"GITHUB_TOKEN\", \"{name}\"]\n"));
        assert_eq!(code, Some(1), "{name}: {stderr}");
        assert!(stderr.contains("chats.runner.pass_env.1") && stderr.contains(name), "{name}: {stderr}");
    }
    let (code, stderr) = config_check("[chats.runner]\npass_env = [\"GITHUB_TOKEN\"]\n");
    assert_eq!(code, Some(0), "{stderr}");
    let (code, stderr) = config_check("[chats.runner]\nuser = \"root\"\n");
    assert_eq!(code, Some(1), "{stderr}");
    assert!(stderr.contains("chats.runner.user") && stderr.contains("root"), "{stderr}");
}

#[tokio::test]
async fn a_root_worker_in_production_refuses_to_run_agents_as_root() {
    if !nix::unistd::geteuid().is_root() {
        return; // only a root worker can be asked this
    }
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("temp dir");
    let config = WorkerConfig::for_test(&test_db)
        .set("app.env", "production")
        // The test servers have no certificates: the TLS floor is relaxed, not the agent check.
        .set("database.allow_unverified_tls", true)
        .set("redis.allow_plaintext", true)
        .set("health.listen", format!("127.0.0.1:{}", free_port()))
        .set("chats.enabled", true)
        .set("chats.runner.command", toml::Value::Array(vec!["/bin/cat".into()]));
    let path = dir.path().join("worker.toml");
    std::fs::write(&path, config.to_toml()).expect("write config");
    let mut command = std::process::Command::new(BIN);
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    let output = command
        .args(["run", "--config", path.to_str().expect("utf-8")])
        .current_dir(repo_path(""))
        .output()
        .expect("run worker");
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("chats.runner.user"), "{stderr}");
}
