//! What a turn may read and write, and how long a stuck write may keep an agent alive (issue
//! 16): the input document holds the newest messages that fit `max_input_bytes` and says how
//! many older ones were dropped; a turn writing past `max_output_messages` ends `output_limit`
//! with nothing half-stored; a runner write stuck behind a lock does not keep the agent alive
//! past its lease budget.

mod chats_support;
mod common;

use std::time::Duration;

use chats_support::{Worker, alive, chat, config, messages, pending_chat, read_when_written, wait_status};
use common::TestDb;
use tokio_postgres::types::Type;
use worker::db::Exec;
use worker::runtime::{Loop as _, Tick};

/// An agent that saves its input document to `<dir>/<chat>.json` and answers once.
fn document_keeper(dir: &std::path::Path) -> Vec<String> {
    chats_support::agent(
        dir,
        "keeper",
        &format!(
            "cat > '{d}/'\"$CHAT_ID\".json\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"ok\"}}'",
            d = dir.display()
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_input_is_the_newest_messages_that_fit_and_says_how_many_were_dropped() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = config(document_keeper(dir.path()));
    cfg.runner.max_input_bytes = 64 * 1024;
    let w = Worker::start(test_db.db.clone(), cfg).await;
    let id = pending_chat(&test_db.db, "first").await;
    // 2,000 messages of ~1 KB: ~2 MB of history, 32 times the bound.
    let conn = test_db.db.get().await.expect("conn");
    conn.exec(
        "INSERT INTO chat_messages (chat_id, role, content) \
         SELECT $1, 'user', to_jsonb(n || ' ' || repeat('x', 1000)) FROM generate_series(1, 2000) AS n",
        &[(&id, Type::UUID)],
    )
    .await
    .expect("history");
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    wait_status(&test_db.db, id, "waiting").await;

    let text = std::fs::read(dir.path().join(format!("{id}.json"))).expect("document");
    assert!(text.len() <= 64 * 1024, "document of {} bytes over the bound", text.len());
    let document: serde_json::Value = serde_json::from_slice(&text).expect("the document is JSON");
    let kept = document["messages"].as_array().expect("messages");
    let dropped = document["dropped_messages"].as_i64().expect("dropped_messages");
    assert!(kept.len() > 30, "the bound is used: {} kept", kept.len());
    assert_eq!(kept.len() as i64 + dropped, 2001, "every visible message is kept or counted as dropped");
    let last = kept.last().expect("a message");
    assert!(last["content"].as_str().expect("text").starts_with("2000 "), "the newest is kept: {last}");
    let ids: Vec<i64> = kept.iter().map(|m| m["id"].as_i64().expect("id")).collect();
    assert!(ids.windows(2).all(|w| w[0] < w[1]), "in id order");
    assert_eq!(document["chat"]["id"], id.to_string());
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_newest_message_larger_than_the_input_bound_ends_in_input_limit_without_an_agent() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = config(document_keeper(dir.path()));
    cfg.runner.max_input_bytes = 4096;
    let w = Worker::start(test_db.db.clone(), cfg).await;
    let id = pending_chat(&test_db.db, &"x".repeat(10_000)).await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    let row = wait_status(&test_db.db, id, "error").await;
    let error = row.last_error.expect("last_error");
    assert!(error.contains("input_limit") && error.contains("max_input_bytes"), "{error}");
    assert!(!dir.path().join(format!("{id}.json")).exists(), "no agent was started");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_writing_past_its_output_bound_ends_in_output_limit() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let chatty = chats_support::agent(
        dir.path(),
        "chatty",
        "cat >/dev/null\n\
         for n in 1 2 3 4 5 6 7 8 9 10; do echo '{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"m\"}'; done",
    );
    let mut cfg = config(chatty);
    cfg.runner.max_output_messages = 3;
    let w = Worker::start(test_db.db.clone(), cfg).await;
    let id = pending_chat(&test_db.db, "talk").await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    let row = wait_status(&test_db.db, id, "error").await;
    let error = row.last_error.expect("last_error");
    assert!(error.contains("output_limit") && error.contains("max_output_messages"), "{error}");
    assert_eq!(messages(&test_db.db, id, "assistant").await.len(), 3, "the bound, not one message more");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_stuck_behind_a_lock_does_not_keep_the_agent_past_its_lease_budget() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    let writer = chats_support::agent(
        dir.path(),
        "writer",
        &format!(
            "cat >/dev/null\n\
             echo $$ > '{d}/'\"$CHAT_ID\".pid\n\
             while [ ! -f '{d}/go' ]; do sleep 0.02; done\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"stuck\"}}'\n\
             sleep 1000"
        ),
    );
    let mut cfg = config(writer);
    // Budget from the registration: stale_after - kill_grace - margin = 2.7 s; no heartbeat runs.
    cfg.stale_after = Duration::from_secs(4);
    cfg.heartbeat_interval = Duration::from_millis(500);
    cfg.runner.kill_grace = Duration::from_millis(300);
    let w = Worker::start(test_db.db.clone(), cfg).await;
    let id = pending_chat(&test_db.db, "hello").await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    let pid: i32 = read_when_written(&dir.path().join(format!("{id}.pid"))).await.parse().expect("pid");

    // Another session holds the chat row: the runner's message insert (FOR SHARE) waits on it,
    // up to the write budget (2 × statement_timeout), far past the lease budget.
    let mut locker = test_db.another_pool().get().await.expect("conn");
    let lock = locker.transaction().await.expect("begin");
    lock.exec("SELECT 1 FROM chats WHERE id = $1 FOR UPDATE", &[(&id, Type::UUID)]).await.expect("lock");
    std::fs::write(dir.path().join("go"), "").expect("go");
    common::eventually(Duration::from_secs(6), "the agent stopped by the lease watchdog", || async {
        !alive(pid)
    })
    .await;
    // The agent died while its runner's write was still waiting: the lock is only let go now.
    drop(lock);
    common::eventually(chats_support::LIMIT, "the runner to end", || async { w.chats.runners().is_empty() })
        .await;
    let row = chat(&test_db.db, id).await;
    assert_ne!(row.status, "error", "a lease interrupt is not the agent's failure: {row:?}");
    w.stop().await;
}
