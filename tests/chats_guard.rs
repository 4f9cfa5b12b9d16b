//! The lease guard (`worker agent-guard`, src/chats/guard.rs) as the worker uses it: a real guard
//! process kills a watched agent's process group once its deadline passes without a newer one,
//! and when the worker lets go of it (EOF); an extended deadline keeps the agent alive.

use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::time::Instant;
use worker::chats::guard::LeaseGuard;

const LIMIT: Duration = Duration::from_secs(10);

/// A `sleep` in a process group of its own, as an agent runs.
fn agent() -> tokio::process::Child {
    tokio::process::Command::new("sleep")
        .arg("1000")
        .process_group(0)
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("spawn sleep")
}

fn pid(child: &tokio::process::Child) -> i32 {
    child.id().expect("running") as i32
}

/// Waits (bounded) for `child` to exit and returns how it ended.
async fn exit_of(child: &mut tokio::process::Child) -> std::process::ExitStatus {
    tokio::time::timeout(LIMIT, child.wait()).await.expect("the agent was killed in time").expect("wait")
}

async fn guard() -> LeaseGuard {
    LeaseGuard::start(std::path::Path::new(env!("CARGO_BIN_EXE_worker"))).await.expect("guard starts")
}

#[tokio::test]
async fn a_deadline_that_is_not_extended_kills_the_watched_agents() {
    let guard = guard().await;
    let mut watched = agent();
    let mut unwatched = agent();
    let _watch = guard.watch(pid(&watched));
    let deadline = Instant::now() + Duration::from_millis(300);
    guard.extend(deadline).await.expect("extend");
    let status = exit_of(&mut watched).await;
    assert!(Instant::now() >= deadline, "killed before its deadline");
    assert_eq!(std::os::unix::process::ExitStatusExt::signal(&status), Some(Signal::SIGKILL as i32));
    assert!(unwatched.try_wait().expect("try_wait").is_none(), "an agent the guard does not watch lives on");
    let _ = unwatched.start_kill();
}

#[tokio::test]
async fn extended_deadlines_keep_the_agent_and_unwatched_agents_are_left_alone() {
    let guard = guard().await;
    let mut kept = agent();
    let mut finished = agent();
    let _kept = guard.watch(pid(&kept));
    let finished_watch = guard.watch(pid(&finished));
    drop(finished_watch);
    // Renewals every 100 ms, each 2 s ahead, for a second: the deadline is never reached (a
    // loaded machine would need a 2 s stall to fail this).
    for _ in 0..10 {
        guard.extend(Instant::now() + Duration::from_secs(2)).await.expect("extend");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(kept.try_wait().expect("try_wait").is_none(), "killed although its deadline kept moving");
    // The renewals stop (a frozen worker): the watched agent dies, the unwatched one does not.
    exit_of(&mut kept).await;
    assert!(finished.try_wait().expect("try_wait").is_none(), "unwatched, so not the guard's to kill");
    let _ = finished.start_kill();
}

#[tokio::test]
async fn a_worker_that_lets_go_of_its_guard_takes_its_agents_along() {
    let guard = guard().await;
    let guard_pid = guard.pid().expect("guard runs") as i32;
    let mut watched = agent();
    let watch = guard.watch(pid(&watched));
    std::mem::forget(watch);
    guard.extend(Instant::now() + Duration::from_secs(3600)).await.expect("extend");
    // The worker's end of the pipe closes (as when it dies): the guard kills and exits.
    drop(guard);
    exit_of(&mut watched).await;
    let gone = async {
        while kill(Pid::from_raw(guard_pid), None).is_ok() && !is_zombie(guard_pid) {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    };
    tokio::time::timeout(LIMIT, gone).await.expect("the guard exits at EOF");
}

fn is_zombie(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|stat| stat.rsplit_once(')').is_some_and(|(_, rest)| rest.trim_start().starts_with('Z')))
        .unwrap_or(true)
}
