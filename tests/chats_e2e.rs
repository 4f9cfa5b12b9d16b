//! The chat loops inside the real binary: `kill -9` of a worker leaves no agent behind and its
//! chats run on the survivor; SIGTERM returns running chats to `pending` for another worker.

mod chats_support;
mod common;

use std::path::Path;
use std::process::Stdio;
use std::time::Duration;

use chats_support::{LIMIT, alive, pending_chat, read_when_written, wait_status};
use common::TestDb;
use common::process::{BIN, free_port, inherited_overrides, readyz, repo_path};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use uuid::Uuid;

/// An agent that answers once, records its pid, waits for `go`, then answers again.
fn write_agent(dir: &Path) -> String {
    let path = dir.join("agent");
    let d = dir.display();
    std::fs::write(
        &path,
        format!(
            "#!/bin/sh\ncat >/dev/null\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"working\"}}'\n\
             echo $$ > {d}/$CHAT_ID.$CHAT_GENERATION.pid\n\
             while [ ! -f {d}/go ]; do sleep 0.02; done\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"done\"}}'\n"
        ),
    )
    .expect("agent");
    let mut permissions = std::fs::metadata(&path).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&path, permissions).expect("chmod");
    path.to_string_lossy().into_owned()
}

fn write_config(dir: &Path, name: &str, test_db: &TestDb, port: u16, agent: &str) -> std::path::PathBuf {
    let path = dir.join(name);
    let text = format!(
        "[app]\nenv = \"test\"\nshutdown_timeout = \"10s\"\n\n[log]\nformat = \"json\"\n\n\
         [database]\nurl = \"{}\"\npool_size = 4\n\n[redis]\nurl = \"{}\"\nprefix = \"{}\"\n\n\
         [health]\nlisten = \"127.0.0.1:{port}\"\n\n[outbox]\nenabled = false\n\n[counters]\nenabled = false\n\n\
         [chats]\nenabled = true\nacquire_interval = \"100ms\"\nrecover_interval = \"200ms\"\n\n\
         [chats.runner]\ncommand = [\"{agent}\"]\nkill_grace = \"2s\"\n",
        test_db.url,
        common::redis_url(),
        common::unique_prefix(),
    );
    std::fs::write(&path, text).expect("config");
    path
}

fn start(config: &Path) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(BIN);
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command
        .args(["run", "--config", config.to_str().expect("utf-8")])
        .current_dir(repo_path(""))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("worker")
}

async fn ready(port: u16) {
    common::eventually(Duration::from_secs(10), "/readyz 200", || async {
        matches!(readyz(port).await, Some((200, _)))
    })
    .await;
}

async fn agent_pids(dir: &Path, chats: &[Uuid], generation: i64) -> Vec<i32> {
    let mut pids = Vec::new();
    for id in chats {
        let pid = read_when_written(&dir.join(format!("{id}.{generation}.pid"))).await;
        pids.push(pid.parse().expect("pid"));
    }
    pids
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_of_a_worker_leaves_no_agent_and_its_chats_run_on_the_survivor() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let agent = write_agent(dir.path());
    let port_a = free_port();
    let mut a = start(&write_config(dir.path(), "a.toml", &test_db, port_a, &agent));
    ready(port_a).await;
    let mut chats = Vec::new();
    for i in 0..3 {
        chats.push(pending_chat(&test_db.db, &format!("chat {i}")).await);
    }
    let pids = agent_pids(dir.path(), &chats, 1).await;

    kill(Pid::from_raw(a.id().expect("pid") as i32), Signal::SIGKILL).expect("kill -9");
    a.wait().await.expect("reaped");
    common::eventually(LIMIT, "every agent of the killed worker to die", || async {
        pids.iter().all(|pid| !alive(*pid))
    })
    .await;

    // Move time instead of waiting stale_after (5m): the dead worker's lease is an hour old.
    chats_support::exec(&test_db.db, "UPDATE workers SET last_seen_at = now() - interval '1 hour'").await;
    std::fs::write(dir.path().join("go"), "").expect("go");
    let port_b = free_port();
    let mut b = start(&write_config(dir.path(), "b.toml", &test_db, port_b, &agent));
    ready(port_b).await;
    for id in &chats {
        let row = wait_status(&test_db.db, *id, "waiting").await;
        assert_eq!(row.generation, 2, "recovered once and run again on the survivor");
        // The killed turn's first answer is kept if it was written before the kill (the agent
        // records its pid right after printing it, so that is a race), then one full turn.
        let answers = chats_support::messages(&test_db.db, *id, "assistant").await;
        assert!((2..=3).contains(&answers.len()), "{answers:?}");
        assert_eq!(answers.last(), Some(&serde_json::json!("done")), "{answers:?}");
    }
    kill(Pid::from_raw(b.id().expect("pid") as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(b.wait().await.expect("wait").code(), Some(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_returns_running_chats_to_pending_and_another_worker_runs_them() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let agent = write_agent(dir.path());
    let port_a = free_port();
    let mut a = start(&write_config(dir.path(), "a.toml", &test_db, port_a, &agent));
    ready(port_a).await;
    let chats = [pending_chat(&test_db.db, "one").await, pending_chat(&test_db.db, "two").await];
    let pids = agent_pids(dir.path(), &chats, 1).await;

    kill(Pid::from_raw(a.id().expect("pid") as i32), Signal::SIGTERM).expect("SIGTERM");
    let status = tokio::time::timeout(Duration::from_secs(10), a.wait())
        .await
        .expect("exits within shutdown_timeout")
        .expect("wait");
    assert_eq!(status.code(), Some(0), "a clean drain");
    for id in &chats {
        let row = chats_support::chat(&test_db.db, *id).await;
        assert_eq!((row.status.as_str(), row.worker_id), ("pending", None));
    }
    assert!(pids.iter().all(|pid| !alive(*pid)), "agents stopped");
    assert_eq!(chats_support::exec_count(&test_db.db, "SELECT count(*)::int8 FROM workers").await, 0);

    std::fs::write(dir.path().join("go"), "").expect("go");
    let port_b = free_port();
    let mut b = start(&write_config(dir.path(), "b.toml", &test_db, port_b, &agent));
    ready(port_b).await;
    for id in &chats {
        assert_eq!(wait_status(&test_db.db, *id, "waiting").await.generation, 2);
    }
    kill(Pid::from_raw(b.id().expect("pid") as i32), Signal::SIGTERM).expect("SIGTERM");
    assert_eq!(b.wait().await.expect("wait").code(), Some(0));
}
