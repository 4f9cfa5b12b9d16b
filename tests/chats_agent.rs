//! One agent turn as a subprocess (`worker::chats::agent`): events in order, exit statuses with
//! the stderr tail, malformed and oversized lines, the turn timeout, and interrupts that leave
//! nothing of the agent's process group running. Agents are small inline `sh` and python3
//! scripts, plus `scripts/demo-agent`.

mod chats_support;
mod common;

use std::os::unix::process::ExitStatusExt;
use std::time::{Duration, Instant};

use chats_support::group_members;
use serde_json::json;
use uuid::Uuid;
use worker::chats::agent::{
    Agent, AgentCommand, AgentError, AgentEvent, AgentLimits, AgentTurn, MessageRole,
};

/// Bounded wait for processes to disappear after a kill.
const EXIT_WAIT: Duration = Duration::from_secs(5);

fn limits() -> AgentLimits {
    AgentLimits {
        turn_timeout: Duration::from_secs(20),
        kill_grace: Duration::from_secs(2),
        ..AgentLimits::default()
    }
}

fn command(argv: &[&str]) -> AgentCommand {
    AgentCommand::try_from(argv.iter().map(|s| s.to_string()).collect::<Vec<_>>()).expect("non-empty command")
}

fn sh(script: &str) -> Agent {
    Agent::new(command(&["sh", "-c", script]), limits())
}

fn python(script: &str) -> Agent {
    Agent::new(command(&["python3", "-c", script]), limits())
}

/// An input document as the runner writes it: JSON and a newline.
fn document(input: &serde_json::Value) -> Vec<u8> {
    format!("{input}\n").into_bytes()
}

async fn start(agent: &Agent) -> AgentTurn {
    agent.spawn(Uuid::new_v4(), 1, None, document(&json!({"chat": {}, "messages": []}))).await.expect("spawn")
}

/// Every event until EOF or the first error.
async fn events(turn: &mut AgentTurn) -> (Vec<AgentEvent>, Option<AgentError>) {
    let mut seen = Vec::new();
    loop {
        match turn.next_event().await {
            Ok(Some(event)) => seen.push(event),
            Ok(None) => return (seen, None),
            Err(error) => return (seen, Some(error)),
        }
    }
}

fn assistant(content: serde_json::Value) -> AgentEvent {
    AgentEvent::Message { role: MessageRole::Assistant, content }
}

/// Pids in process group `pgid` that are still alive (zombies excluded: they are dead, only not
/// yet reaped by whichever process inherited them).
fn live_members(pgid: i32) -> Vec<i32> {
    group_members(pgid).into_iter().filter(|(_, zombie)| !zombie).map(|(pid, _)| pid).collect()
}

async fn assert_group_gone(pgid: i32) {
    let deadline = Instant::now() + EXIT_WAIT;
    loop {
        let alive = live_members(pgid);
        if alive.is_empty() {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "process group {pgid} still has live members {alive:?} after {EXIT_WAIT:?}: the agent's processes were not all killed"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn a_successful_turn_yields_its_events_in_order_then_exits_ok() {
    let agent = sh(r#"cat >/dev/null
printf '%s\n' '{"type":"message","role":"assistant","content":"one"}' '' \
  '{"type":"title","title":"A title"}' '{"type":"message","role":"tool","content":{"n":2}}'"#);
    let mut turn = start(&agent).await;
    let (seen, error) = events(&mut turn).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(
        seen,
        vec![
            assistant(json!("one")),
            AgentEvent::Title("A title".into()),
            AgentEvent::Message { role: MessageRole::Tool, content: json!({"n": 2}) },
        ]
    );
    let status = turn.finish().await.expect("exit 0");
    assert!(status.success());
}

#[tokio::test]
async fn a_non_zero_exit_is_an_error_carrying_the_stderr_tail() {
    let agent = sh(r#"cat >/dev/null; echo 'Traceback: something broke' >&2; exit 3"#);
    let mut turn = start(&agent).await;
    assert_eq!(turn.next_event().await.expect("clean EOF"), None);
    let error = turn.finish().await.expect_err("exit 3 fails");
    match &error {
        AgentError::Exited { status, stderr_tail } => {
            assert_eq!(status.code(), Some(3));
            assert_eq!(stderr_tail, "Traceback: something broke");
        }
        other => panic!("expected Exited, got {other:?}"),
    }
    assert_eq!(error.metric_label(), "exit_nonzero");
    let message = error.to_string();
    assert!(message.contains("code 3") && message.contains("something broke"), "{message}");
}

#[tokio::test]
async fn a_malformed_line_is_an_error_after_the_earlier_events_and_stops_the_agent() {
    // stderr is written before the bad line: the worker stops the agent as soon as it reads it.
    let agent = sh(r#"echo '{"type":"message","role":"assistant","content":"fine"}'
echo 'agent: about to misbehave' >&2
echo 'this is not json'
sleep 1000"#);
    let mut turn = start(&agent).await;
    let pgid = turn.process_group_id();
    let (seen, error) = events(&mut turn).await;
    assert_eq!(seen, vec![assistant(json!("fine"))], "events before the bad line are delivered");
    match error {
        Some(AgentError::MalformedLine { line_number, reason, stderr_tail }) => {
            assert_eq!(line_number, 2);
            assert!(reason.contains("this is not json"), "the reason quotes the line: {reason}");
            assert_eq!(stderr_tail, "agent: about to misbehave");
        }
        other => panic!("expected MalformedLine, got {other:?}"),
    }
    assert_eq!(turn.next_event().await.expect("no more"), None, "nothing is delivered after an error");
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn a_line_over_the_limit_is_an_error_without_reading_it_whole() {
    let agent = sh(r#"head -c 2097152 /dev/zero | tr '\0' x; echo; sleep 1000"#);
    let mut turn = start(&agent).await;
    let pgid = turn.process_group_id();
    let error = turn.next_event().await.expect_err("2 MiB line");
    match &error {
        AgentError::LineTooLong { limit, line_number, .. } => {
            assert_eq!((*limit, *line_number), (1024 * 1024, 1));
        }
        other => panic!("expected LineTooLong, got {other:?}"),
    }
    assert_eq!(error.metric_label(), "line_too_long");
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn a_turn_past_its_timeout_is_stopped_with_its_whole_group() {
    let limits = AgentLimits { turn_timeout: Duration::from_millis(300), ..limits() };
    let agent = Agent::new(command(&["sh", "-c", "sleep 1000 & sleep 1000"]), limits);
    let mut turn = start(&agent).await;
    let pgid = turn.process_group_id();
    let error = turn.next_event().await.expect_err("times out");
    assert!(
        matches!(error, AgentError::TurnTimedOut { after, .. } if after == Duration::from_millis(300)),
        "{error:?}"
    );
    assert!(error.to_string().contains("timed out after 300ms"), "{error}");
    assert_group_gone(pgid).await;
    assert!(matches!(turn.finish().await, Err(AgentError::Exited { .. })), "finish reports how it ended");
}

#[tokio::test]
async fn an_agent_ignoring_sigterm_is_killed_after_the_grace() {
    let agent = sh(r#"trap '' TERM
echo '{"type":"title","title":"ready"}'
while :; do sleep 1; done"#);
    let mut turn = start(&agent).await;
    let pgid = turn.process_group_id();
    assert_eq!(turn.next_event().await.expect("ready"), Some(AgentEvent::Title("ready".into())));
    let grace = Duration::from_millis(300);
    let started = Instant::now();
    let status = turn.interrupt(grace).await.expect("interrupt");
    assert_eq!(status.signal(), Some(9), "SIGKILLed: {status:?}");
    assert!(started.elapsed() >= grace, "SIGKILL only after the grace");
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn an_interrupt_also_kills_grandchildren_that_ignore_sigterm() {
    let agent = sh(r#"(trap '' TERM; exec sleep 1000) &
echo '{"type":"title","title":"ready"}'
wait"#);
    let mut turn = start(&agent).await;
    let pgid = turn.process_group_id();
    assert_eq!(turn.next_event().await.expect("ready"), Some(AgentEvent::Title("ready".into())));
    assert!(live_members(pgid).len() >= 2, "the grandchild runs in the agent's group");
    let status = turn.interrupt(Duration::from_secs(2)).await.expect("interrupt");
    assert_eq!(status.signal(), Some(15), "the leader ended on SIGTERM: {status:?}");
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn a_background_process_holding_stdout_does_not_outlive_the_agent() {
    let agent = sh(r#"sleep 1000 &
echo '{"type":"title","title":"done"}'"#);
    let mut turn = start(&agent).await;
    let pgid = turn.process_group_id();
    let (seen, error) = events(&mut turn).await;
    assert!(error.is_none(), "EOF follows the agent's exit, not the deadline: {error:?}");
    assert_eq!(seen, vec![AgentEvent::Title("done".into())]);
    assert!(turn.finish().await.expect("exit 0").success());
    assert_group_gone(pgid).await;
}

#[tokio::test]
async fn the_input_document_and_the_chat_environment_reach_the_agent_intact() {
    let agent = python(
        r#"import json, os, sys
doc = json.load(sys.stdin)
print(json.dumps({"type": "message", "role": "assistant",
                  "content": {"doc": doc, "chat_id": os.environ["CHAT_ID"],
                              "generation": os.environ["CHAT_GENERATION"]}}))"#,
    );
    // Larger than a pipe buffer, with text that needs escaping.
    let big = "ünïcødé \"quoted\" \n line ".repeat(20_000);
    let input =
        json!({"chat": {"id": "c", "title": ""}, "messages": [{"id": 7, "role": "user", "content": big}]});
    let chat_id = Uuid::new_v4();
    let mut turn = agent.spawn(chat_id, 42, None, document(&input)).await.expect("spawn");
    let (seen, error) = events(&mut turn).await;
    assert!(error.is_none(), "{error:?}");
    let expected = json!({"doc": input, "chat_id": chat_id.to_string(), "generation": "42"});
    assert_eq!(seen, vec![assistant(expected)]);
    turn.finish().await.expect("exit 0");
}

#[tokio::test]
async fn a_missing_program_is_a_spawn_error_naming_it() {
    let agent = Agent::new(command(&["/nonexistent/agent"]), limits());
    let error = agent.spawn(Uuid::new_v4(), 1, None, document(&json!({}))).await.err().expect("spawn fails");
    assert_eq!(error.metric_label(), "spawn_failed");
    assert!(error.to_string().contains("/nonexistent/agent"), "{error}");
}

fn demo_agent(env: &[&str]) -> Agent {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/demo-agent");
    let argv: Vec<&str> = ["env"].iter().chain(env).chain(&["python3", script]).copied().collect();
    Agent::new(command(&argv), limits())
}

#[tokio::test]
async fn the_demo_agent_titles_the_chat_and_answers_the_last_user_message() {
    let input = json!({
        "chat": {"id": "c", "title": ""},
        "messages": [
            {"id": 1, "role": "user", "content": {"text": "first question"}},
            {"id": 2, "role": "assistant", "content": {"text": "an answer"}},
            {"id": 3, "role": "user", "content": "hello world"},
        ],
    });
    let mut turn = demo_agent(&["DEMO_AGENT_DELAY_MS=0"])
        .spawn(Uuid::new_v4(), 1, None, document(&input))
        .await
        .expect("spawn");
    let (seen, error) = events(&mut turn).await;
    assert!(error.is_none(), "{error:?}");
    turn.finish().await.expect("exit 0");
    assert_eq!(seen.first(), Some(&AgentEvent::Title("first question".into())), "{seen:?}");
    let replies: Vec<&serde_json::Value> = seen
        .iter()
        .filter_map(|e| match e {
            AgentEvent::Message { role: MessageRole::Assistant, content } => Some(content),
            _ => None,
        })
        .collect();
    assert!(replies.len() >= 2, "several assistant messages: {seen:?}");
    assert_eq!(replies.last().map(|c| c["text"].clone()), Some(json!("Reversed: dlrow olleh")));
}

#[tokio::test]
async fn the_demo_agent_fails_on_request_with_its_stderr() {
    let agent = demo_agent(&["DEMO_AGENT_FAIL=5"]);
    let turn = agent
        .spawn(Uuid::new_v4(), 1, None, document(&json!({"chat": {}, "messages": []})))
        .await
        .expect("spawn");
    let error = turn.finish().await.expect_err("exit 5");
    assert!(matches!(&error, AgentError::Exited { status, .. } if status.code() == Some(5)), "{error:?}");
    assert!(error.to_string().contains("failing on purpose"), "{error}");
}

/// Set in the environment of this test binary when it is re-run as the worker stand-in below.
const HELPER_ENV: &str = "CHATS_AGENT_TEST_HELPER";

/// Not a test on its own: run by `an_agent_dies_with_a_worker_killed_by_sigkill` as a separate
/// process (this binary, filtered to this test) that spawns an agent, prints its pid and waits.
#[tokio::test]
async fn helper_spawns_an_agent_and_waits_to_be_killed() {
    if std::env::var_os(HELPER_ENV).is_none() {
        return;
    }
    let turn =
        sh("exec sleep 1000").spawn(Uuid::new_v4(), 1, None, document(&json!({}))).await.expect("spawn");
    println!("AGENT_PID={}", turn.process_group_id());
    std::future::pending::<()>().await;
}

/// Alive: present in /proc and not a zombie (the agent's new parent may never reap it).
fn alive(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| stat.rsplit_once(')').map(|(_, rest)| rest.trim_start().to_owned()))
        .is_some_and(|rest| !rest.starts_with('Z'))
}

#[tokio::test]
async fn an_agent_dies_with_a_worker_killed_by_sigkill() {
    use tokio::io::AsyncBufReadExt;

    let mut worker = tokio::process::Command::new(std::env::current_exe().expect("test binary"))
        .args(["--exact", "helper_spawns_an_agent_and_waits_to_be_killed", "--nocapture"])
        .env(HELPER_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("start the worker stand-in");
    let mut lines = tokio::io::BufReader::new(worker.stdout.take().expect("stdout")).lines();
    let agent_pid = tokio::time::timeout(EXIT_WAIT, async {
        while let Some(line) = lines.next_line().await.expect("read helper output") {
            if let Some(pid) = line.strip_prefix("AGENT_PID=") {
                return pid.parse::<i32>().expect("pid");
            }
        }
        panic!("the worker stand-in exited without starting an agent");
    })
    .await
    .expect("the worker stand-in did not report its agent in time");
    assert!(alive(agent_pid), "the agent runs while its worker does");

    worker.start_kill().expect("kill -9 the worker stand-in");
    worker.wait().await.expect("reap the worker stand-in");
    let deadline = Instant::now() + EXIT_WAIT;
    while alive(agent_pid) {
        assert!(
            Instant::now() < deadline,
            "agent {agent_pid} outlived its SIGKILLed worker: PDEATHSIG not set"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_outlives_the_thread_that_spawned_it() {
    let marker = tempfile::tempdir().expect("tempdir");
    let go = marker.path().join("go");
    let script = format!(
        r#"cat >/dev/null; while [ ! -e '{}' ]; do sleep 0.01; done; echo '{{"type":"title","title":"alive"}}'"#,
        go.display()
    );
    let agent = sh(&script);
    let runtime = tokio::runtime::Handle::current();
    // PR_SET_PDEATHSIG fires when the forking *thread* exits; this thread is gone before the
    // agent answers, which must not matter.
    let short_lived = std::thread::spawn(move || {
        runtime.block_on(agent.spawn(Uuid::new_v4(), 1, None, document(&json!({}))))
    });
    let mut turn = tokio::task::spawn_blocking(move || short_lived.join())
        .await
        .expect("join task")
        .expect("spawning thread")
        .expect("spawn");
    std::fs::write(&go, b"").expect("marker");
    assert_eq!(
        turn.next_event().await.expect("event"),
        Some(AgentEvent::Title("alive".into())),
        "the agent was killed when the thread that spawned it exited"
    );
    assert!(turn.finish().await.expect("exit 0").success());
}

#[tokio::test]
async fn the_agent_leads_a_session_of_its_own_and_cannot_leave_its_process_group() {
    // A leader that moved itself into another group would dodge every killpg of its turn.
    let agent = python(
        "import json, os, sys\n\
         sys.stdin.read()\n\
         try:\n    os.setpgid(0, 0)\n    moved = 'moved'\n\
         except OSError as e:\n    moved = type(e).__name__\n\
         print(json.dumps({'type': 'message', 'role': 'assistant', 'content': \
           [os.getsid(0) == os.getpid(), os.getpgid(0) == os.getpid(), moved]}), flush=True)",
    );
    let mut turn = start(&agent).await;
    let (seen, error) = events(&mut turn).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(seen, vec![assistant(json!([true, true, "PermissionError"]))]);
    turn.finish().await.expect("exit 0");
}

#[tokio::test]
async fn a_descriptor_the_worker_left_inheritable_does_not_reach_the_agent() {
    // A library that opened a file without O_CLOEXEC: exec would hand it to the agent.
    let leaked = std::fs::File::open("/etc/hostname").expect("open");
    let fd = std::os::fd::AsRawFd::as_raw_fd(&leaked);
    nix::fcntl::fcntl(&leaked, nix::fcntl::FcntlArg::F_SETFD(nix::fcntl::FdFlag::empty()))
        .expect("clear CLOEXEC");
    let agent = python(
        "import json, os, sys\n\
         sys.stdin.read()\n\
         fds = []\n\
         for name in os.listdir('/proc/self/fd'):\n\
         \x20   try:\n\
         \x20       os.fstat(int(name)); fds.append(int(name))\n\
         \x20   except OSError:\n\
         \x20       pass\n\
         print(json.dumps({'type': 'message', 'role': 'assistant', 'content': sorted(fds)}), flush=True)",
    );
    let mut turn = start(&agent).await;
    let (seen, error) = events(&mut turn).await;
    assert!(error.is_none(), "{error:?}");
    assert_eq!(seen, vec![assistant(json!([0, 1, 2]))], "fd {fd} was left inheritable in the worker");
    turn.finish().await.expect("exit 0");
    drop(leaked);
}
