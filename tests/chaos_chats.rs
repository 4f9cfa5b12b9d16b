//! Reliability suite, the chat loops under faults (docs/lease-and-fencing.md, docs/reliability.md,
//! `scripts/chaos.sh`):
//! 5. two replicas running 200 chats, one of them SIGKILLed mid-turn: its chats come back after
//!    `stale_after` and finish on the survivor, no chat ever has two live runners;
//! 8. resource bounds: one worker with 1,000 pending chats and `max_running = 50` never holds
//!    more than 50 agent processes, nor more connections than `pool_size` + the LISTEN one.

mod chaos_support;
mod chats_support;
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::OnceLock;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use chaos_support::{
    LIMIT, Replica, WorkerConfig, agent, agents_of, peak_while, report, seed_pending_chats, worker_id,
};
use chats_support::alive;
use common::{TestDb, eventually};
use uuid::Uuid;
use worker::db::{Db, Exec};

/// The single int8 a query returns.
async fn scalar(db: &impl Exec, sql: &str) -> i64 {
    db.fetch_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

async fn pooled_scalar(db: &Db, sql: &str) -> i64 {
    scalar(&db.get().await.expect("conn"), sql).await
}

/// The lines of a file the agents append to (none when it was never written).
fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path).map(|text| text.lines().map(str::to_owned).collect()).unwrap_or_default()
}

/// `("start" | "done", generation)` from an assistant message the scenario 5 agent wrote.
fn turn_mark(content: &serde_json::Value) -> Option<(String, i64)> {
    let (what, generation) = content.as_str()?.split_once(' ')?;
    Some((what.to_owned(), generation.parse().ok()?))
}

#[derive(Debug)]
struct ChatState {
    status: String,
    worker_id: Option<Uuid>,
    generation: i64,
}

async fn chat_states(db: &Db) -> BTreeMap<Uuid, ChatState> {
    let conn = db.get().await.expect("conn");
    let rows =
        conn.fetch_all("SELECT id, status, worker_id, generation FROM chats", &[]).await.expect("chats");
    rows.iter()
        .map(|row| {
            (row.get(0), ChatState { status: row.get(1), worker_id: row.get(2), generation: row.get(3) })
        })
        .collect()
}

/// Every assistant message, per chat, in id order.
async fn assistant_messages(db: &Db) -> BTreeMap<Uuid, Vec<serde_json::Value>> {
    let conn = db.get().await.expect("conn");
    let rows = conn
        .fetch_all("SELECT chat_id, content FROM chat_messages WHERE role = 'assistant' ORDER BY id", &[])
        .await
        .expect("messages");
    let mut by_chat: BTreeMap<Uuid, Vec<serde_json::Value>> = BTreeMap::new();
    for row in &rows {
        by_chat.entry(row.get(0)).or_default().push(row.get(1));
    }
    by_chat
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_5_a_replica_sigkilled_mid_turn_leaves_no_chat_stuck_and_none_run_twice_at_once() {
    const CHATS: i64 = 200;
    /// Per replica: below `CHATS`, so both replicas take a share.
    const MAX_RUNNING: i64 = 150;
    // As configured below (chats.stale_after, heartbeat_interval, recover_interval).
    // The shortest the config check accepts: 2 × (1s + 1s) + 1s + kill_grace 2s + margin 1s.
    const STALE_AFTER: Duration = Duration::from_secs(8);
    const HEARTBEAT: Duration = Duration::from_secs(1);
    const RECOVER_INTERVAL: Duration = Duration::from_millis(500);
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let d = dir.path().display();
    // The gate every turn waits on after its first answer: the test holds it exclusively until
    // the killed replica's chats run again on the survivor (so first and second runs of a chat
    // would overlap if the first were still alive); an agent waits for a shared lock on it
    // (blocking, no polling).
    let gate_path = dir.path().join("gate");
    let gate = std::fs::File::create(&gate_path).expect("gate file");
    gate.lock().expect("hold the gate");
    // Each turn records itself (`runs`), holds an exclusive lock on its chat for its whole life
    // (the kernel drops it when the process dies, so a second live runner of the same chat
    // cannot take it and records itself in `double`), answers `start <generation>`, waits for
    // the gate, answers `done <generation>`. The gate's waiter (a child that could outlive a
    // killed agent) gets fd 9 closed, so only the agent itself holds the chat's lock.
    let command = agent(
        dir.path(),
        "agent",
        &format!(
            "cat >/dev/null\n\
             echo \"$CHAT_ID $CHAT_GENERATION $$\" >> '{d}/runs'\n\
             exec 9>\"{d}/$CHAT_ID.lock\"\n\
             flock -n 9 || echo \"$CHAT_ID $CHAT_GENERATION\" >> '{d}/double'\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"start '\"$CHAT_GENERATION\"'\"}}'\n\
             flock -s '{d}/gate' true 9>&-\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"done '\"$CHAT_GENERATION\"'\"}}'"
        ),
    );
    let config = WorkerConfig::for_test(&test_db)
        .set("chats.enabled", true)
        .set("chats.acquire_interval", "100ms")
        .set("chats.heartbeat_interval", "1s")
        .set("chats.stale_after", "8s")
        .set("chats.recover_interval", "500ms")
        .set("chats.max_running", MAX_RUNNING)
        .set("chats.max_per_acquire", 50)
        .set("chats.runner.command", vec![command])
        .set("chats.runner.kill_grace", "2s");

    let mut a = Replica::start(dir.path(), "replica-a", &config);
    let mut b = Replica::start(dir.path(), "replica-b", &config);
    let (a_id, b_id) = (worker_id(&a).await, worker_id(&b).await);
    seed_pending_chats(&test_db.db.get().await.expect("conn"), CHATS, &[]).await;

    // Mid-turn: every chat running, and its agent has answered once and waits at the gate.
    eventually(LIMIT, "all chats running with a first answer", || async {
        pooled_scalar(
            &test_db.db,
            "SELECT count(*)::int8 FROM chats AS c WHERE c.status = 'running' AND EXISTS \
               (SELECT 1 FROM chat_messages AS m WHERE m.chat_id = c.id AND m.role = 'assistant')",
        )
        .await
            == CHATS
    })
    .await;
    let before = chat_states(&test_db.db).await;
    let a_chats: BTreeSet<Uuid> =
        before.iter().filter(|(_, c)| c.worker_id == Some(a_id)).map(|(id, _)| *id).collect();
    let b_chats: BTreeSet<Uuid> =
        before.iter().filter(|(_, c)| c.worker_id == Some(b_id)).map(|(id, _)| *id).collect();
    assert!(
        !a_chats.is_empty() && !b_chats.is_empty(),
        "both replicas run chats: A {a_chats:?} B {b_chats:?}"
    );
    assert_eq!(a_chats.len() + b_chats.len(), CHATS as usize, "every chat runs on A or B");
    assert!(before.values().all(|c| c.generation == 1), "one acquisition per chat so far");
    let a_agents = agents_of(a.pid());
    assert_eq!(a_agents.len(), a_chats.len(), "one live agent per chat of A");

    let killed_at = Instant::now();
    a.kill9().await;
    eventually(LIMIT, "every agent of the killed replica to die", || async {
        a_agents.iter().all(|pid| !alive(*pid))
    })
    .await;
    let agents_dead_in = killed_at.elapsed();

    // A's chats stay A's until its lease is stale, then go back to `pending` all at once.
    let first_recovered = OnceLock::new();
    eventually(LIMIT, "no chat running under the killed replica", || async {
        let left = pooled_scalar(
            &test_db.db,
            &format!("SELECT count(*)::int8 FROM chats WHERE status = 'running' AND worker_id = '{a_id}'"),
        )
        .await;
        if left < a_chats.len() as i64 {
            first_recovered.get_or_init(|| killed_at.elapsed());
        }
        left == 0
    })
    .await;
    let recovered_in = killed_at.elapsed();
    let first_recovered = *first_recovered.get().expect("A's chats left it");
    // The survivor at capacity, every turn of it at the gate after answering under its current
    // generation: its own first runs and second runs of A's chats side by side.
    eventually(LIMIT, "the survivor running max_running turns, recovered ones among them", || async {
        pooled_scalar(
            &test_db.db,
            &format!(
                "SELECT count(*)::int8 FROM chats AS c WHERE c.status = 'running' AND c.worker_id = '{b_id}' \
                   AND EXISTS (SELECT 1 FROM chat_messages AS m WHERE m.chat_id = c.id AND m.role = 'assistant' \
                     AND m.content = to_jsonb('start ' || c.generation))"
            ),
        )
        .await
            == MAX_RUNNING
    })
    .await;
    gate.unlock().expect("open the gate");

    eventually(LIMIT, "every chat waiting after its turn", || async {
        pooled_scalar(&test_db.db, "SELECT count(*)::int8 FROM chats WHERE status = 'waiting'").await == CHATS
    })
    .await;
    let finished_in = killed_at.elapsed();
    b.assert_alive();

    let after = chat_states(&test_db.db).await;
    let messages = assistant_messages(&test_db.db).await;
    let double = lines(&dir.path().join("double"));
    let runs = lines(&dir.path().join("runs"));
    let stuck_running = after.values().filter(|c| c.status == "running" && c.worker_id == Some(a_id)).count();
    let recovered: BTreeSet<Uuid> =
        after.iter().filter(|(_, c)| c.generation == 2).map(|(id, _)| *id).collect();
    // Per chat: the turns that answered, in message order; a turn of a generation the chat never
    // had, an unreadable answer or generations going backwards (a fenced-out writer) are foreign.
    let mut unfinished = Vec::new();
    let mut foreign = Vec::new();
    let mut done_answers = 0;
    for (id, chat) in &after {
        let marks: Vec<Option<(String, i64)>> =
            messages.get(id).map(|m| m.iter().map(turn_mark).collect()).unwrap_or_default();
        let generations: Vec<i64> = marks.iter().flatten().map(|(_, g)| *g).collect();
        let readable = marks.iter().all(Option::is_some);
        let in_range = generations.iter().all(|g| (1..=chat.generation).contains(g));
        let ordered = generations.is_sorted();
        if !(readable && in_range && ordered) {
            foreign.push((*id, messages.get(id).cloned()));
        }
        let dones: Vec<i64> = marks.iter().flatten().filter(|(w, _)| w == "done").map(|(_, g)| *g).collect();
        done_answers += dones.len();
        if dones != [chat.generation] {
            unfinished.push((*id, chat.generation, dones));
        }
    }
    // One agent run per (chat, generation); the runs are exactly the acquisitions.
    let mut run_counts: BTreeMap<(String, String), usize> = BTreeMap::new();
    for run in &runs {
        let mut fields = run.split_whitespace();
        let key = (fields.next().unwrap_or("").to_owned(), fields.next().unwrap_or("").to_owned());
        *run_counts.entry(key).or_default() += 1;
    }
    let duplicated =
        run_counts.values().map(|n| n - 1).sum::<usize>() + done_answers.saturating_sub(CHATS as usize);
    let lost = (CHATS as usize).saturating_sub(after.len()) + unfinished.len();
    let warnings = b.problems();
    for record in &warnings {
        eprintln!("survivor {record}");
    }
    report(
        5,
        "chats-sigkill-mid-turn",
        &[
            ("replicas", "2".into()),
            ("chats", CHATS.to_string()),
            ("on_killed", a_chats.len().to_string()),
            ("sigkills", "1".into()),
            ("agents_dead_s", format!("{:.2}", agents_dead_in.as_secs_f64())),
            ("first_recovered_s", format!("{:.1}", first_recovered.as_secs_f64())),
            ("recovered_s", format!("{:.1}", recovered_in.as_secs_f64())),
            ("finished_s", format!("{:.1}", finished_in.as_secs_f64())),
            ("recovered", recovered.len().to_string()),
            ("agent_runs", runs.len().to_string()),
            ("double_runners", double.len().to_string()),
            ("stuck_running", stuck_running.to_string()),
            ("unfinished", unfinished.len().to_string()),
            ("foreign_answers", foreign.len().to_string()),
            ("lost", lost.to_string()),
            ("duplicated", duplicated.to_string()),
            ("survivor_warnings", warnings.len().to_string()),
        ],
    );
    assert!(double.is_empty(), "a chat had two live runners at once: {double:?}");
    assert_eq!(stuck_running, 0, "chats left running under the dead replica");
    assert!(
        unfinished.is_empty(),
        "chats without exactly one `done` of their final generation: {unfinished:?}"
    );
    assert!(foreign.is_empty(), "answers out of fence order or of no acquisition: {foreign:?}");
    assert_eq!((lost, duplicated), (0, 0));
    assert_eq!(after.len(), CHATS as usize);
    assert_eq!(recovered, a_chats, "exactly the killed replica's chats ran a second time");
    assert!(after.values().all(|c| (1..=2).contains(&c.generation)), "at most one recovery per chat");
    assert_eq!(runs.len(), CHATS as usize + a_chats.len(), "one agent run per acquisition");
    // The lease decides: nothing is recovered before it can be stale (last renewal at most one
    // heartbeat before the kill), everything soon after.
    let earliest = STALE_AFTER - HEARTBEAT - Duration::from_millis(500);
    assert!(first_recovered >= earliest, "recovered after {first_recovered:?}, before the lease was stale");
    assert!(
        recovered_in <= STALE_AFTER + RECOVER_INTERVAL + Duration::from_secs(5),
        "A's chats stayed running under a dead worker for {recovered_in:?}"
    );
    assert_eq!(b.sigterm(LIMIT).await.code(), Some(0), "the survivor drains on SIGTERM");
}

/// How many ticks the replica's acquire loop has completed (its `/readyz` report).
async fn acquire_ticks(replica: &Replica) -> i64 {
    let Some((_, body)) = replica.readyz().await else { return 0 };
    body["loops"]
        .as_array()
        .and_then(|loops| loops.iter().find(|l| l["name"] == "chats_acquire"))
        .and_then(|l| l["ticks"].as_i64())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_8_max_running_bounds_agents_and_pool_size_bounds_connections() {
    const CHATS: i64 = 1_000;
    const MAX_RUNNING: i64 = 50;
    /// Below `MAX_RUNNING`, so the bound is reached by claims that must shrink to the room left.
    const MAX_PER_ACQUIRE: i64 = 20;
    const POOL_SIZE: i64 = 4;
    /// Acquire ticks that must pass at full capacity before the first wave may finish.
    const TICKS_AT_CAPACITY: i64 = 5;
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    // The test's own queries go over one direct connection of its own (the TestDb pool is never
    // used here, so every other client backend of the database is the worker's).
    let probe =
        worker::db::connect_direct(&test_db.url, "worker-chaos-probe").await.expect("probe connection");
    seed_pending_chats(&probe, CHATS, &[]).await;
    assert_eq!(scalar(&probe, "SELECT count(*)::int8 FROM chats WHERE status = 'pending'").await, CHATS);
    // The first wave of agents waits at a gate the test holds until the worker has been at full
    // capacity for a few acquire ticks (where an over-claim would show); then every turn is short.
    let gate = std::fs::File::create(dir.path().join("gate")).expect("gate file");
    gate.lock().expect("hold the gate");
    let command = agent(
        dir.path(),
        "agent",
        &format!(
            "cat >/dev/null\nflock -s '{}/gate' true\nsleep 0.1\n\
             echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"ok\"}}'",
            dir.path().display()
        ),
    );
    let config = WorkerConfig::for_test(&test_db)
        .set("database.pool_size", POOL_SIZE)
        .set("chats.enabled", true)
        .set("chats.acquire_interval", "50ms")
        .set("chats.max_running", MAX_RUNNING)
        .set("chats.max_per_acquire", MAX_PER_ACQUIRE)
        .set("chats.runner.command", vec![command]);

    let started = Instant::now();
    let mut replica = Replica::start(dir.path(), "replica", &config);
    let pid = replica.pid();
    let peak_connections = AtomicI64::new(0);
    let peak_running = AtomicI64::new(0);
    let sample = {
        let (probe, peak_connections, peak_running) = (&probe, &peak_connections, &peak_running);
        move || async move {
            let row = probe
                .fetch_one(
                    "SELECT (SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() \
                       AND backend_type = 'client backend' AND pid <> pg_backend_pid())::int8, \
                     (SELECT count(*) FROM chats WHERE status = 'running')::int8",
                    &[],
                )
                .await
                .expect("sample");
            peak_connections.fetch_max(row.get(0), Ordering::Relaxed);
            peak_running.fetch_max(row.get(1), Ordering::Relaxed);
            agents_of(pid).len() as i64
        }
    };
    let first_wave_held = OnceLock::new();
    let run = async {
        eventually(LIMIT, "max_running agents alive at the gate", || async {
            agents_of(pid).len() as i64 >= MAX_RUNNING
        })
        .await;
        let ticks = acquire_ticks(&replica).await;
        eventually(LIMIT, "more acquire ticks at full capacity", || async {
            acquire_ticks(&replica).await >= ticks + TICKS_AT_CAPACITY
        })
        .await;
        first_wave_held.get_or_init(|| started.elapsed());
        gate.unlock().expect("open the gate");
        eventually(LIMIT, "every chat waiting after its turn", || async {
            scalar(&probe, "SELECT count(*)::int8 FROM chats WHERE status = 'waiting'").await == CHATS
        })
        .await;
    };
    let peak_agents = peak_while(Duration::from_millis(20), sample, run).await;
    let finished_in = started.elapsed();
    replica.assert_alive();
    let peak_connections = peak_connections.load(Ordering::Relaxed);
    let peak_running = peak_running.load(Ordering::Relaxed);

    let finished = scalar(&probe, "SELECT count(*)::int8 FROM chats WHERE status = 'waiting'").await;
    let answers = scalar(&probe, "SELECT count(*)::int8 FROM chat_messages WHERE role = 'assistant'").await;
    let answered = scalar(
        &probe,
        "SELECT count(DISTINCT chat_id)::int8 FROM chat_messages WHERE role = 'assistant' AND content = '\"ok\"'",
    )
    .await;
    let generations = scalar(&probe, "SELECT coalesce(sum(generation), 0)::int8 FROM chats").await;
    let warnings = replica.problems();
    for record in &warnings {
        eprintln!("replica {record}");
    }
    report(
        8,
        "chats-resource-bounds",
        &[
            ("chats", CHATS.to_string()),
            ("max_running", MAX_RUNNING.to_string()),
            ("max_per_acquire", MAX_PER_ACQUIRE.to_string()),
            ("peak_agents", peak_agents.to_string()),
            ("peak_running", peak_running.to_string()),
            ("pool_size", POOL_SIZE.to_string()),
            ("peak_connections", peak_connections.to_string()),
            ("held_at_capacity_s", format!("{:.1}", first_wave_held.get().map_or(0.0, |d| d.as_secs_f64()))),
            ("finished", finished.to_string()),
            ("finished_s", format!("{:.1}", finished_in.as_secs_f64())),
            ("lost", (CHATS - answered).to_string()),
            ("duplicated", (answers - answered).to_string()),
            ("warnings", warnings.len().to_string()),
        ],
    );
    assert_eq!(
        peak_agents, MAX_RUNNING,
        "agent processes at once (held at the gate until the bound was reached)"
    );
    assert_eq!(peak_running, MAX_RUNNING, "chats running at once");
    assert!(
        peak_connections <= POOL_SIZE + 1,
        "{peak_connections} connections at once, pool_size {POOL_SIZE} + the LISTEN connection"
    );
    assert!(peak_connections >= 2, "the sampler saw the worker's connections: peak {peak_connections}");
    assert_eq!(finished, CHATS);
    assert_eq!((answered, answers), (CHATS, CHATS), "one answer per chat, none twice");
    assert_eq!(generations, CHATS, "one acquisition per chat");
    assert_eq!(replica.sigterm(LIMIT).await.code(), Some(0));
}
