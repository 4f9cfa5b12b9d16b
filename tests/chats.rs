//! The chat loops against real PostgreSQL with real agent subprocesses: exactly-once runs across
//! two workers, fencing, the heartbeat's one write and set difference, recovery and its race,
//! and how each kind of turn ends.

mod chats_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use chats_support::{
    LIMIT, Worker, agent, alive, chat, config, ddl, exec, messages, pending_chat, read_when_written,
    wait_status,
};
use common::TestDb;
use tokio::sync::Semaphore;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::{Db, Exec};
use worker::runtime::{Loop, Tick};

/// Statement-level triggers that log every write statement per table (even those touching no
/// row), so a test can count statements rather than trust the code's own report.
async fn count_write_statements(db: &Db) {
    ddl(
        db,
        "CREATE TABLE stmt_log (tbl text NOT NULL, op text NOT NULL); \
         CREATE FUNCTION log_stmt() RETURNS trigger LANGUAGE plpgsql AS \
         $$ BEGIN INSERT INTO stmt_log VALUES (TG_TABLE_NAME, TG_OP); RETURN NULL; END $$",
    )
    .await;
    for table in ["workers", "chats", "workspaces", "chat_messages"] {
        ddl(
            db,
            &format!(
                "CREATE TRIGGER log_{table} AFTER INSERT OR UPDATE OR DELETE ON {table} \
                 FOR EACH STATEMENT EXECUTE FUNCTION log_stmt()"
            ),
        )
        .await;
    }
}

async fn write_statements(db: &Db) -> BTreeMap<String, i64> {
    let rows = db
        .get()
        .await
        .expect("conn")
        .fetch_all("SELECT tbl, count(*)::int8 FROM stmt_log GROUP BY tbl", &[])
        .await
        .expect("log");
    exec(db, "TRUNCATE stmt_log").await;
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_run_fifty_chats_each_exactly_once() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let log = dir.path().join("runs.log");
    let command = agent(
        dir.path(),
        "agent",
        &format!(
            "cat >/dev/null\necho \"$CHAT_ID $CHAT_GENERATION\" >> {}\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"done\"}}'",
            log.display()
        ),
    );
    let mut cfg = config(command);
    cfg.max_running = 10;
    cfg.max_per_acquire = 5;
    let a = Worker::start(test_db.db.clone(), cfg.clone()).await;
    let b = Worker::start(test_db.another_pool(), cfg).await;
    let mut chats = Vec::new();
    for i in 0..50 {
        chats.push(pending_chat(&test_db.db, &format!("task {i}")).await);
    }
    a.run_loops();
    b.run_loops();
    for id in &chats {
        let row = wait_status(&test_db.db, *id, "waiting").await;
        assert_eq!(row.generation, 1, "chat {id} was acquired more than once");
    }
    a.stop().await;
    b.stop().await;

    let runs = std::fs::read_to_string(&log).expect("run log");
    let lines: Vec<&str> = runs.lines().collect();
    let distinct: BTreeSet<&str> = lines.iter().copied().collect();
    assert_eq!(lines.len(), 50, "agent runs: {runs}");
    assert_eq!(distinct.len(), 50, "a chat ran twice");
    assert!(lines.iter().all(|l| l.ends_with(" 1")), "every run under generation 1: {runs}");
    for id in &chats {
        assert_eq!(messages(&test_db.db, *id, "assistant").await.len(), 1, "one answer per chat");
    }
    let by_worker = test_db
        .db
        .get()
        .await
        .expect("conn")
        .fetch_one("SELECT count(*)::int8 FROM chats WHERE worker_id IS NOT NULL", &[])
        .await
        .expect("count")
        .get::<_, i64>(0);
    assert_eq!(by_worker, 0, "settled chats keep no worker");
}

/// An agent that answers once, records its pid, then waits for `go` before answering again.
fn two_step_agent(dir: &std::path::Path) -> Vec<String> {
    let d = dir.display();
    agent(
        dir,
        "two-step",
        &format!(
            "cat >/dev/null\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"first\"}}'\n\
             echo $$ > {d}/$CHAT_ID.pid\n\
             while [ ! -f {d}/go ]; do sleep 0.02; done\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"second\"}}'\n\
             echo '{{\"type\":\"title\",\"title\":\"late title\"}}'"
        ),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_write_after_the_chat_was_stolen_is_rejected_and_stops_the_agent() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let w = Worker::start(test_db.db.clone(), config(two_step_agent(dir.path()))).await;
    let id = pending_chat(&test_db.db, "hello").await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    let pid: i32 = read_when_written(&dir.path().join(format!("{id}.pid"))).await.parse().expect("pid");

    // Another worker takes the chat (as recovery plus a new acquisition would).
    let thief = Uuid::new_v4();
    test_db
        .db
        .get()
        .await
        .expect("conn")
        .exec(
            "UPDATE chats SET worker_id = $2, generation = generation + 1 WHERE id = $1",
            &[(&id, Type::UUID), (&thief, Type::UUID)],
        )
        .await
        .expect("steal");
    std::fs::write(dir.path().join("go"), "").expect("go");
    common::eventually(LIMIT, "the runner to end", || async { w.chats.runners().is_empty() }).await;

    assert_eq!(messages(&test_db.db, id, "assistant").await, vec![serde_json::json!("first")]);
    let row = chat(&test_db.db, id).await;
    assert_eq!((row.status.as_str(), row.worker_id, row.generation), ("running", Some(thief), 2));
    assert_eq!(row.title, "", "no title written after the steal");
    assert!(!alive(pid), "the agent was stopped");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stolen_chat_is_interrupted_by_the_next_heartbeat_within_the_kill_grace() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    // Ignores SIGTERM: only the SIGKILL after kill_grace ends it.
    let command = agent(
        dir.path(),
        "stubborn",
        &format!(
            "cat >/dev/null\ntrap '' TERM\necho $$ > {}/$CHAT_ID.pid\nwhile true; do sleep 0.02; done",
            dir.path().display()
        ),
    );
    let mut cfg = config(command);
    cfg.runner.kill_grace = Duration::from_millis(300);
    let w = Worker::start(test_db.db.clone(), cfg).await;
    let id = pending_chat(&test_db.db, "hello").await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    let pid: i32 = read_when_written(&dir.path().join(format!("{id}.pid"))).await.parse().expect("pid");

    exec(&test_db.db, "UPDATE chats SET worker_id = gen_random_uuid(), generation = generation + 1").await;
    let report = w.chats.heartbeat(w.lease()).beat().await.expect("beat");
    assert_eq!((report.owned, report.interrupted, report.released), (0, 1, 0));
    let interrupted = std::time::Instant::now();
    common::eventually(LIMIT, "the runner to end", || async { w.chats.runners().is_empty() }).await;
    assert!(!alive(pid), "the agent's group was killed");
    assert!(interrupted.elapsed() < Duration::from_secs(5), "took {:?}", interrupted.elapsed());
    assert_eq!(chat(&test_db.db, id).await.status, "running", "nothing written for a stolen chat");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_writes_one_lease_row_for_a_thousand_chats_and_acts_on_exactly_the_difference() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let w = Worker::start(test_db.db.clone(), config(agent(dir.path(), "unused", "exit 0"))).await;
    let worker = w.id;
    // 1,000 chats running here (runners that only wait to be cancelled), 3 of them stolen
    // meanwhile, and 2 more owned by this worker in the database with no runner here.
    let rows = test_db
        .db
        .get()
        .await
        .expect("conn")
        .fetch_all(
            "INSERT INTO chats (owner_id, status, worker_id, generation) \
             SELECT gen_random_uuid(), 'running', $1, 1 FROM generate_series(1, 1002) RETURNING id",
            &[(&worker, Type::UUID)],
        )
        .await
        .expect("chats");
    let ids: Vec<Uuid> = rows.iter().map(|r| r.get(0)).collect();
    let (registered, orphans) = ids.split_at(1000);
    for id in registered {
        w.chats
            .runners()
            .start(*id, 1, |mut signal| async move { signal.stopped().await })
            .expect("register");
    }
    let stolen = &registered[..3];
    test_db
        .db
        .get()
        .await
        .expect("conn")
        .exec(
            "UPDATE chats SET worker_id = gen_random_uuid() WHERE id = ANY($1)",
            &[(&stolen.to_vec(), Type::UUID_ARRAY)],
        )
        .await
        .expect("steal");
    count_write_statements(&test_db.db).await;

    let heartbeat = w.chats.heartbeat(w.lease());
    let report = heartbeat.beat().await.expect("beat");
    assert_eq!((report.owned, report.interrupted, report.released), (999, 3, 2));
    let writes = write_statements(&test_db.db).await;
    assert_eq!(writes.get("workers"), Some(&1), "one lease write: {writes:?}");
    assert_eq!(writes.get("chats"), Some(&1), "one batched release of the orphans: {writes:?}");
    assert_eq!(writes.get("workspaces"), Some(&1), "one batched workspace bump: {writes:?}");
    for id in orphans {
        assert_eq!(chat(&test_db.db, *id).await.status, "pending", "owned here, not running: released");
    }
    common::eventually(LIMIT, "the stolen runners to end", || async { w.chats.runners().len() == 997 }).await;
    assert!(stolen.iter().all(|id| !w.chats.runners().contains(id)), "exactly the stolen were interrupted");

    // Steady state: nothing to change, so the only chat-related writes are none at all.
    let report = heartbeat.beat().await.expect("beat");
    assert_eq!((report.owned, report.interrupted, report.released), (997, 0, 0));
    let writes = write_statements(&test_db.db).await;
    assert_eq!(writes.get("workers"), Some(&1), "{writes:?}");
    assert_eq!(writes.get("chats"), None, "no chat row written: {writes:?}");
    w.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_heartbeat_racing_an_acquisition_neither_releases_nor_interrupts_the_chat_being_acquired() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let w = Worker::start(test_db.db.clone(), config(two_step_agent(dir.path()))).await;
    let id = pending_chat(&test_db.db, "hello").await;
    let gate = Arc::new(Semaphore::new(0));
    let acquire = w.chats.acquire().gated_after_claim(gate.clone());
    let db = test_db.db.clone();
    let acquiring = tokio::spawn(async move { acquire.tick(&Tick::detached(&db)).await });
    // The claim is committed; the runner is not registered yet.
    wait_status(&test_db.db, id, "running").await;
    assert!(w.chats.runners().is_empty());

    let heartbeat = w.chats.heartbeat(w.lease());
    let mut beating = tokio::spawn(async move { heartbeat.beat().await });
    // A heartbeat that did not wait for the claim to be registered would finish now and hand
    // the chat back to pending.
    assert!(
        tokio::time::timeout(Duration::from_millis(300), &mut beating).await.is_err(),
        "the heartbeat read ownership while a claim was half done"
    );
    gate.add_permits(1);
    acquiring.await.expect("join").expect("acquire");
    let report = tokio::time::timeout(LIMIT, beating).await.expect("beat").expect("join").expect("beat ok");
    assert_eq!((report.owned, report.interrupted, report.released), (1, 0, 0));
    let row = chat(&test_db.db, id).await;
    assert_eq!((row.status.as_str(), row.worker_id), ("running", Some(w.id)));
    assert!(w.chats.runners().contains(&id));
    std::fs::write(dir.path().join("go"), "").expect("go");
    wait_status(&test_db.db, id, "waiting").await;
    w.stop().await;
}

/// Chats running under a worker that is not running them (its process is gone).
async fn chats_of_a_dead_worker(db: &Db, n: i64) -> (Uuid, Vec<Uuid>) {
    let dead = Uuid::new_v4();
    let conn = db.get().await.expect("conn");
    conn.exec(
        "INSERT INTO workers (id, hostname, version, last_seen_at) VALUES ($1, 'dead', 'x', now())",
        &[(&dead, Type::UUID)],
    )
    .await
    .expect("worker");
    let mut ids = Vec::new();
    for i in 0..n {
        let id = pending_chat(db, &format!("chat {i}")).await;
        conn.exec(
            "UPDATE chats SET status = 'running', worker_id = $2, generation = 1 WHERE id = $1",
            &[(&id, Type::UUID), (&dead, Type::UUID)],
        )
        .await
        .expect("owned by the dead worker");
        ids.push(id);
    }
    (dead, ids)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn chats_of_a_worker_with_a_stale_lease_return_to_pending_and_run_elsewhere() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let answer = "cat >/dev/null\necho '{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"ok\"}'";
    let survivor = Worker::start(test_db.db.clone(), config(agent(dir.path(), "agent", answer))).await;
    let (dead, ids) = chats_of_a_dead_worker(&test_db.db, 3).await;
    let recover = survivor.chats.recover(Duration::from_secs(3600));
    assert_eq!(recover.recover().await.expect("recover"), 0, "a fresh lease keeps its chats");

    // Move time: the lease is now older than stale_after (5m).
    test_db
        .db
        .get()
        .await
        .expect("conn")
        .exec(
            "UPDATE workers SET last_seen_at = now() - interval '6 minutes' WHERE id = $1",
            &[(&dead, Type::UUID)],
        )
        .await
        .expect("age the lease");
    // And one more chat whose worker row is gone altogether.
    let (gone, orphan) = chats_of_a_dead_worker(&test_db.db, 1).await;
    exec(&test_db.db, &format!("DELETE FROM workers WHERE id = '{gone}'")).await;

    assert_eq!(recover.recover().await.expect("recover"), 4);
    for id in ids.iter().chain(&orphan) {
        assert_eq!(chat(&test_db.db, *id).await.status, "pending");
    }
    survivor.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    for id in ids.iter().chain(&orphan) {
        let row = wait_status(&test_db.db, *id, "waiting").await;
        assert_eq!(row.generation, 2, "acquired again");
    }
    survivor.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lease_renewed_while_recovery_runs_keeps_its_chats() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let w = Worker::start(test_db.db.clone(), config(agent(dir.path(), "agent", "exit 0"))).await;
    let (dead, ids) = chats_of_a_dead_worker(&test_db.db, 2).await;
    exec(
        &test_db.db,
        &format!("UPDATE workers SET last_seen_at = now() - interval '6 minutes' WHERE id = '{dead}'"),
    )
    .await;

    // The "dead" worker renews its lease, but has not committed yet.
    let mut renewer = test_db.another_pool().get().await.expect("conn");
    let renewal = renewer.transaction().await.expect("begin");
    renewal
        .exec("UPDATE workers SET last_seen_at = now() WHERE id = $1", &[(&dead, Type::UUID)])
        .await
        .expect("renew");
    let recover = w.chats.recover(Duration::from_secs(3600));
    let recovering = tokio::spawn(async move { recover.recover().await });
    let observer = test_db.db.get().await.expect("conn");
    common::eventually(LIMIT, "recovery to wait on the worker row", || async {
        observer
            .fetch_one(
                "SELECT count(*)::int8 FROM pg_stat_activity WHERE datname = current_database() \
                 AND wait_event_type = 'Lock' AND query LIKE 'WITH stale AS%'",
                &[],
            )
            .await
            .expect("activity")
            .get::<_, i64>(0)
            == 1
    })
    .await;
    renewal.commit().await.expect("renewal commits");
    assert_eq!(recovering.await.expect("join").expect("recover"), 0, "the renewed lease keeps its chats");
    for id in ids {
        let row = chat(&test_db.db, id).await;
        assert_eq!((row.status.as_str(), row.worker_id), ("running", Some(dead)));
    }
    w.stop().await;
}

/// Runs one turn of a new chat with `body` as the agent and returns the settled chat.
async fn one_turn(
    body: &str,
    tune: impl FnOnce(&mut worker::chats::ChatsConfig),
    settled: &str,
) -> (TestDb, Uuid, chats_support::ChatRow) {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = config(agent(dir.path(), "agent", body));
    tune(&mut cfg);
    let w = Worker::start(test_db.db.clone(), cfg).await;
    let id = pending_chat(&test_db.db, "hello").await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    let row = wait_status(&test_db.db, id, settled).await;
    w.stop().await;
    (test_db, id, row)
}

const FIRST: &str = "echo '{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"first\"}'";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_that_exits_zero_leaves_the_chat_waiting_with_its_messages_and_title() {
    let body = format!("cat >/dev/null\n{FIRST}\necho '{{\"type\":\"title\",\"title\":\"Greeting\"}}'");
    let (test_db, id, row) = one_turn(&body, |_| {}, "waiting").await;
    assert_eq!((row.worker_id, row.last_error, row.title.as_str()), (None, None, "Greeting"));
    assert_eq!(messages(&test_db.db, id, "assistant").await, vec![serde_json::json!("first")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_exiting_3_puts_the_chat_in_error_with_its_stderr_tail() {
    let body = format!("cat >/dev/null\n{FIRST}\necho 'tool crashed: disk full' >&2\nexit 3");
    let (test_db, id, row) = one_turn(&body, |_| {}, "error").await;
    let error = row.last_error.expect("last_error");
    assert!(error.contains("code 3") && error.contains("disk full"), "{error}");
    assert_eq!(messages(&test_db.db, id, "assistant").await.len(), 1, "messages already written are kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_malformed_line_puts_the_chat_in_error_naming_it_and_keeps_earlier_messages() {
    let body = format!("cat >/dev/null\n{FIRST}\necho 'this is not an event'\nsleep 5");
    let (test_db, id, row) = one_turn(&body, |_| {}, "error").await;
    let error = row.last_error.expect("last_error");
    assert!(error.contains("line 2") && error.contains("not a valid event"), "{error}");
    assert_eq!(messages(&test_db.db, id, "assistant").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_over_long_line_puts_the_chat_in_error_naming_the_limit() {
    let body = format!("cat >/dev/null\n{FIRST}\nhead -c 5000 /dev/zero | tr '\\0' 'x'\necho\nsleep 5");
    let (test_db, id, row) = one_turn(&body, |c| c.runner.max_line_bytes = 1024, "error").await;
    let error = row.last_error.expect("last_error");
    assert!(error.contains("longer than 1024 bytes"), "{error}");
    assert_eq!(messages(&test_db.db, id, "assistant").await.len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_turn_past_its_timeout_is_killed_and_the_chat_goes_to_error() {
    let body = format!("cat >/dev/null\n{FIRST}\nwhile true; do sleep 0.05; done");
    let (_test_db, _id, row) =
        one_turn(&body, |c| c.runner.turn_timeout = Duration::from_millis(500), "error").await;
    let error = row.last_error.expect("last_error");
    assert!(error.contains("timed out"), "{error}");
}

/// Runs one turn of the two-step agent with `insert` (`$1` the chat, `$2` a JSON content)
/// committed while the agent waits; the chat once the turn has ended.
async fn a_turn_with_a_message_during_it(insert: &str) -> chats_support::ChatRow {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let w = Worker::start(test_db.db.clone(), config(two_step_agent(dir.path()))).await;
    let id = pending_chat(&test_db.db, "hello").await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    read_when_written(&dir.path().join(format!("{id}.pid"))).await;
    let content = serde_json::json!("and one more thing");
    let conn = test_db.db.get().await.expect("conn");
    conn.exec(insert, &[(&id, Type::UUID), (&content, Type::JSONB)])
        .await
        .expect("a message during the turn");
    std::fs::write(dir.path().join("go"), "").expect("go");
    common::eventually(LIMIT, "the turn to end", || async { w.chats.runners().is_empty() }).await;
    let row = chat(&test_db.db, id).await;
    w.stop().await;
    row
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_message_during_the_turn_makes_the_chat_pending_after_it() {
    let row = a_turn_with_a_message_during_it("SELECT post_chat_message($1, 'user', $2)").await;
    assert_eq!((row.status.as_str(), row.worker_id), ("pending", None), "the new message gets a turn");
}

/// The schema lets the API tier store a user message the model may not see (`visibility =
/// 'user'`); the agent never reads it, so it must not give the chat another turn (before, every
/// turn ended `pending` again and the agent ran forever).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_message_hidden_from_the_model_does_not_give_the_chat_another_turn() {
    let row = a_turn_with_a_message_during_it(
        "INSERT INTO chat_messages (chat_id, role, content, visibility) VALUES ($1, 'user', $2, 'user')",
    )
    .await;
    assert_eq!((row.status.as_str(), row.worker_id), ("waiting", None), "nothing new for the model");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_returns_running_chats_to_pending() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let w = Worker::start(test_db.db.clone(), config(two_step_agent(dir.path()))).await;
    let id = pending_chat(&test_db.db, "hello").await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    let pid: i32 = read_when_written(&dir.path().join(format!("{id}.pid"))).await.parse().expect("pid");
    w.stop().await;
    let row = chat(&test_db.db, id).await;
    assert_eq!((row.status.as_str(), row.worker_id, row.generation), ("pending", None, 1));
    assert!(!alive(pid));
    assert_eq!(messages(&test_db.db, id, "assistant").await.len(), 1, "the first answer is kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_output_the_database_refuses_by_value_ends_the_turn_in_error_instead_of_a_rerun() {
    let test_db = TestDb::new().await;
    // A value PostgreSQL refuses (as it refuses a NUL): SQLSTATE 22023 for one message content.
    ddl(
        &test_db.db,
        "CREATE FUNCTION refuse_poison() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           IF NEW.content = '\"poison\"'::jsonb THEN \
             RAISE EXCEPTION 'poison is not storable' USING ERRCODE = '22023'; END IF; \
           RETURN NEW; END $$; \
         CREATE TRIGGER refuse_poison BEFORE INSERT ON chat_messages FOR EACH ROW EXECUTE FUNCTION refuse_poison()",
    )
    .await;
    let dir = tempfile::tempdir().expect("dir");
    let body = format!(
        "cat >/dev/null\n{FIRST}\necho '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"poison\"}}'\nsleep 5"
    );
    let w = Worker::start(test_db.db.clone(), config(agent(dir.path(), "agent", &body))).await;
    let id = pending_chat(&test_db.db, "hello").await;
    w.chats.acquire().tick(&Tick::detached(&test_db.db)).await.expect("acquire");
    let row = wait_status(&test_db.db, id, "error").await;
    w.stop().await;
    let error = row.last_error.expect("last_error");
    assert!(error.contains("cannot be stored") && error.contains("poison is not storable"), "{error}");
    assert_eq!(row.generation, 1, "ended, not released to run again");
    assert_eq!(messages(&test_db.db, id, "assistant").await, vec![serde_json::json!("first")]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn only_errors_about_the_values_themselves_count_as_refused() {
    let test_db = TestDb::new().await;
    ddl(
        &test_db.db,
        "CREATE FUNCTION fail_with(code text) RETURNS int LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'failing with %', code USING ERRCODE = code; END $$",
    )
    .await;
    let conn = test_db.db.get().await.expect("conn");
    for (code, refused) in [
        ("22021", true),  // invalid byte sequence (a NUL)
        ("22008", true),  // datetime out of range
        ("23514", true),  // CHECK
        ("23502", true),  // NOT NULL
        ("23505", false), // unique: depends on other rows
        ("23503", false), // foreign key: depends on other rows
        ("40001", false), // serialization failure
        ("57014", false), // statement timeout
    ] {
        let error = conn
            .fetch_one("SELECT fail_with($1)", &[(&code, Type::TEXT)])
            .await
            .expect_err("the function raises");
        assert_eq!(error.code(), Some(code));
        assert_eq!(error.is_refused_value(), refused, "{code}");
    }
}

#[tokio::test]
async fn only_the_lease_loop_is_unpausable_and_the_loop_list_says_the_same() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let w = Worker::start(test_db.db.clone(), config(two_step_agent(dir.path()))).await;
    let schedules = [
        (w.chats.heartbeat(w.lease()).name(), w.chats.heartbeat(w.lease()).schedule()),
        (w.chats.acquire().name(), w.chats.acquire().schedule()),
        (
            w.chats.recover(Duration::from_secs(60)).name(),
            w.chats.recover(Duration::from_secs(60)).schedule(),
        ),
    ];
    for (name, schedule) in schedules {
        let listed = worker::loops::find(name).expect("listed").pausable;
        assert_eq!(schedule.pausable, listed, "{name}: Schedule and loops::ALL disagree");
        assert_eq!(schedule.pausable, name != "chats_heartbeat", "{name}");
    }
    w.stop().await;
}
