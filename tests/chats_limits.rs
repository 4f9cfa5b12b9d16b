//! Agent budgets, `[chats.runner.limits]` (issue 16, acceptance 3): an agent that allocates
//! without bound, forks without bound or spins is stopped by its limit; its chat ends in `error`
//! with a `last_error` naming the limit (or, when the agent died its own way, the limits in
//! force); the worker keeps running and its other chats finish normally. Plus the signals that
//! name a limit exactly (SIGXCPU, SIGXFSZ) on `Agent` directly, and `config check` naming the key.
//!
//! The chat tests run the in-process chat loops against PostgreSQL. One agent script serves
//! every chat of a test and misbehaves only when its input holds the word the test posted.

mod chats_support;
mod common;

use std::path::Path;
use std::time::Duration;

use chats_support::{LIMIT, Worker, agent, config, group_members, pending_chat, wait_status};
use common::TestDb;
use serde_json::json;
use uuid::Uuid;
use worker::chats::agent::{Agent, AgentCommand, AgentError, AgentLimits};
use worker::chats::limits::LimitsConfig;

const MIB: u64 = 1 << 20;

/// The agent of every chat test: answers "fine", unless the input asks it to misbehave.
fn script(dir: &Path) -> Vec<String> {
    let body = format!(
        r#"input=$(cat)
case "$input" in
  *allocate*)
    py=/usr/bin/python3; [ -x "$py" ] || py=python3
    exec "$py" -c 'x = []
while True: x.append(bytearray(1 << 20))' ;;
  *fork*)
    echo $$ > {dir}/bomb.pid
    while :; do sleep 60 & done ;;
  *spin*)
    while :; do :; done ;;
esac
echo '{{"type":"message","role":"assistant","content":"fine"}}'"#,
        dir = dir.display()
    );
    agent(dir, "agent", &body)
}

fn chmod(path: &Path, mode: u32) {
    let mut permissions = std::fs::metadata(path).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, mode);
    std::fs::set_permissions(path, permissions).expect("chmod");
}

/// A worker running its loops with `limits` (and `user`), its agent in a fresh directory.
async fn worker(test_db: &TestDb, limits: LimitsConfig, user: Option<&str>) -> (Worker, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("dir");
    // The agent user must reach the script and write next to it.
    chmod(dir.path(), 0o777);
    let mut cfg = config(script(dir.path()));
    cfg.runner.limits = limits;
    cfg.runner.user = user.map(str::to_owned);
    let w = Worker::start(test_db.db.clone(), cfg).await;
    w.run_loops();
    (w, dir)
}

/// A chat that must end `waiting` with the agent's "fine": the worker still runs chats.
async fn assert_runs_normally(test_db: &TestDb, id: Uuid) {
    let row = wait_status(&test_db.db, id, "waiting").await;
    assert_eq!(row.last_error, None, "a chat of the same worker finishes normally");
    let answers = chats_support::messages(&test_db.db, id, "assistant").await;
    assert_eq!(answers, vec![json!("fine")]);
}

async fn last_error(test_db: &TestDb, id: Uuid) -> String {
    let row = wait_status(&test_db.db, id, "error").await;
    let error = row.last_error.expect("an error chat has a last_error");
    eprintln!("chat {id}: last_error = {error}");
    error
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_allocating_without_bound_is_stopped_by_the_memory_limit() {
    let test_db = TestDb::new().await;
    let limits = LimitsConfig { memory: 256 * MIB, ..LimitsConfig::default() };
    let (w, _dir) = worker(&test_db, limits, None).await;
    let info = &w.rt.health.readiness(Ok(())).info["agent_limits"];
    eprintln!("/readyz agent_limits: {info}");
    assert_eq!(info["enforced_by"], "rlimit", "{info}");
    assert!(info["cgroup_v2"].as_str().is_some_and(|s| !s.is_empty()), "what detection found: {info}");
    assert_eq!(info["memory"], 256 * MIB, "{info}");

    let hog = pending_chat(&test_db.db, "allocate").await;
    let other = pending_chat(&test_db.db, "hello").await;
    let error = last_error(&test_db, hog).await;
    assert!(error.contains("MemoryError"), "the allocation failed at the limit: {error}");
    assert!(
        error.contains("exited with code 1")
            && error.contains("limits: memory 256 MiB (chats.runner.limits.memory)"),
        "the reader can tell a limit was in force: {error}"
    );
    assert_runs_normally(&test_db, other).await;
    let after = pending_chat(&test_db.db, "hello again").await;
    assert_runs_normally(&test_db, after).await;
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_spinning_is_stopped_by_the_cpu_limit() {
    let test_db = TestDb::new().await;
    let limits = LimitsConfig { cpu: Duration::from_secs(1), ..LimitsConfig::default() };
    let (w, _dir) = worker(&test_db, limits, None).await;

    let spinner = pending_chat(&test_db.db, "spin").await;
    let other = pending_chat(&test_db.db, "hello").await;
    let error = last_error(&test_db, spinner).await;
    assert!(
        error.contains("SIGXCPU") && error.contains("CPU time limit, chats.runner.limits.cpu = 1s"),
        "names the limit, its key and value: {error}"
    );
    assert_runs_normally(&test_db, other).await;
    let after = pending_chat(&test_db.db, "hello again").await;
    assert_runs_normally(&test_db, after).await;
    w.stop().await;
}

/// Reaps the zombies of `pgid` that were handed to this process (a child subreaper): until they
/// are reaped they still count toward their user's RLIMIT_NPROC.
fn reap_orphans(pgid: i32) {
    for (pid, zombie) in group_members(pgid) {
        if zombie {
            let _ = nix::sys::wait::waitpid(
                nix::unistd::Pid::from_raw(pid),
                Some(nix::sys::wait::WaitPidFlag::WNOHANG),
            );
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_forking_without_bound_is_stopped_by_the_process_limit() {
    // The bomb's leftovers are orphaned when its leader dies; as a subreaper this process gets
    // them (not pid 1, which may reap late or never) and reaps them below.
    nix::sys::prctl::set_child_subreaper(true).expect("PR_SET_CHILD_SUBREAPER");
    let test_db = TestDb::new().await;
    // Root ignores RLIMIT_NPROC (the suite runs as root): the agent runs as nobody.
    let limits = LimitsConfig { processes: 32, ..LimitsConfig::default() };
    let (w, dir) = worker(&test_db, limits, Some("nobody")).await;
    let info = &w.rt.health.readiness(Ok(())).info["agent_limits"];
    assert!(info["processes_scope"].as_str().is_some_and(|s| s.contains("agent user")), "{info}");

    let bomb = pending_chat(&test_db.db, "fork").await;
    let error = last_error(&test_db, bomb).await;
    assert!(error.to_lowercase().contains("fork"), "the fork failed at the limit: {error}");
    assert!(
        error.contains("exited with code") && error.contains("processes 32 (chats.runner.limits.processes)"),
        "the reader can tell a limit was in force: {error}"
    );

    // Nothing of the bomb survives its turn (its leftovers were SIGKILLed with its group).
    let pgid: i32 = std::fs::read_to_string(dir.path().join("bomb.pid"))
        .expect("the bomb wrote its pid")
        .trim()
        .parse()
        .expect("pid");
    common::eventually(LIMIT, "the bomb's process group to be gone", || async {
        reap_orphans(pgid);
        group_members(pgid).iter().all(|(_, zombie)| *zombie)
    })
    .await;
    // Reaped too: zombies still count toward nobody's RLIMIT_NPROC.
    common::eventually(LIMIT, "the bomb's zombies to be reaped", || async {
        reap_orphans(pgid);
        group_members(pgid).is_empty()
    })
    .await;

    // The worker still runs chats (as nobody too, now that the bomb's processes are gone).
    let after = pending_chat(&test_db.db, "hello").await;
    assert_runs_normally(&test_db, after).await;
    w.stop().await;
}

fn sh(script: &str, args: &[&str], limits: LimitsConfig) -> Agent {
    let argv = ["sh", "-c", script].iter().chain(args).map(|s| s.to_string()).collect::<Vec<_>>();
    let command = AgentCommand::try_from(argv).expect("command");
    let bounds =
        AgentLimits { turn_timeout: LIMIT, kill_grace: Duration::from_secs(2), ..AgentLimits::default() };
    Agent::new(command, bounds).with_resource_limits(limits)
}

async fn turn_error(agent: &Agent) -> AgentError {
    let mut turn = agent.spawn(Uuid::new_v4(), 1, None, b"{}\n".to_vec()).await.expect("spawn");
    while turn.next_event().await.expect("no bad output").is_some() {}
    turn.finish().await.expect_err("the agent was stopped")
}

#[tokio::test]
async fn sigxcpu_and_sigxfsz_name_the_cpu_and_file_size_limits() {
    let dir = tempfile::tempdir().expect("dir");
    let file = dir.path().join("big");
    let limits = LimitsConfig { file_size: MIB, ..LimitsConfig::NONE };
    let writer = sh("exec head -c 4194304 /dev/zero > \"$0\"", &[&file.to_string_lossy()], limits);
    let error = turn_error(&writer).await;
    assert!(matches!(error, AgentError::ExitedUnderLimits { .. }), "{error:?}");
    assert_eq!(error.metric_label(), "limit_file_size");
    let text = error.to_string();
    assert!(
        text.contains("SIGXFSZ") && text.contains("file size limit, chats.runner.limits.file_size = 1 MiB"),
        "{text}"
    );
    assert_eq!(std::fs::metadata(&file).expect("written").len(), MIB, "the file stopped at the limit");

    let limits = LimitsConfig { cpu: Duration::from_secs(1), ..LimitsConfig::NONE };
    let error = turn_error(&sh("while :; do :; done", &[], limits)).await;
    assert_eq!(error.metric_label(), "limit_cpu", "{error}");

    // A death no signal ties to a limit: the limits in force, and the usual label.
    let limits = LimitsConfig { processes: 64, ..LimitsConfig::NONE };
    let error = turn_error(&sh("kill -SEGV $$", &[], limits)).await;
    assert_eq!(error.metric_label(), "exit_nonzero");
    assert_eq!(
        error.to_string(),
        "agent was killed by signal 11 (SIGSEGV); limits: processes 64 (chats.runner.limits.processes)"
    );
}

#[test]
fn config_check_refuses_limits_naming_the_key() {
    let load = |name: &str, value: &str| {
        let inputs = worker::config::ConfigInputs {
            env: [(format!("WORKER__CHATS__RUNNER__LIMITS__{name}"), value.to_owned())].into(),
            ..Default::default()
        };
        worker::config::load(&inputs)
    };
    let refused = |name: &str, value: &str| load(name, value).expect_err("refused").to_string();
    let error = refused("MEMORY", "1000");
    assert!(error.contains("chats.runner.limits.memory") && error.contains("at least 16777216"), "{error}");
    let error = refused("CPU", "1500ms");
    assert!(
        error.contains("chats.runner.limits.cpu") && error.contains("whole number of seconds"),
        "{error}"
    );
    assert!(refused("PROCESSES", "2").contains("chats.runner.limits.processes"));
    assert!(refused("OPEN_FILES", "3").contains("chats.runner.limits.open_files"));
    assert!(refused("FILE_SIZE", "4096").contains("chats.runner.limits.file_size"));

    let loaded = load("PROCESSES", "0").expect("0 = not limited");
    assert_eq!(loaded.config.chats.runner.limits, LimitsConfig { processes: 0, ..LimitsConfig::default() });
    assert_eq!(load("CPU", "0s").expect("0s = not limited").config.chats.runner.limits.cpu, Duration::ZERO);
}
