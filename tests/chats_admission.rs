//! Fair admission (issue 19) against real PostgreSQL: `pending_since` from every path into
//! `pending`, the order of the claim (waiting time, fewest running weighted, FIFO), caps per
//! owner and per org that hold while three workers claim side by side, and the claim's plan with
//! one owner's 100k pending chats.

mod chats_support;
mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use chats_support::{Notifications, Worker, agent, chat, config, exec, exec_count, wait_status};
use common::TestDb;
use common::metrics::MetricsProbe;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::chats::ChatsConfig;
use worker::chats::admission::{self, Order, Rules};
use worker::db::{self, Db, Exec};
use worker::runtime::{Loop, Tick};

/// `n` chats of `owner` (and `org`) made pending through `post_chat_message`, then given a
/// pending_since `age_secs` in the past (time moved by updating rows). Returns their ids.
async fn pending(db: &Db, owner: Uuid, org: Option<Uuid>, n: i64, age_secs: f64) -> Vec<Uuid> {
    let conn = db.get().await.expect("conn");
    let ids: Vec<Uuid> = conn
        .fetch_all(
            "INSERT INTO chats (owner_id, org_id) SELECT $1, $2 FROM generate_series(1, $3) RETURNING id",
            &[(&owner, Type::UUID), (&org, Type::UUID), (&n, Type::INT8)],
        )
        .await
        .expect("insert chats")
        .iter()
        .map(|r| r.get(0))
        .collect();
    conn.exec(
        "SELECT post_chat_message(id, 'user', '\"go\"') FROM chats WHERE id = ANY($1) ORDER BY id",
        &[(&ids, Type::UUID_ARRAY)],
    )
    .await
    .expect("post");
    conn.exec(
        "UPDATE chats SET pending_since = now() - make_interval(secs => $2) WHERE id = ANY($1)",
        &[(&ids, Type::UUID_ARRAY), (&age_secs, Type::FLOAT8)],
    )
    .await
    .expect("age");
    ids
}

async fn pending_since(db: &Db, id: Uuid) -> Option<chrono::DateTime<chrono::Utc>> {
    db.get()
        .await
        .expect("conn")
        .fetch_one("SELECT pending_since FROM chats WHERE id = $1", &[(&id, Type::UUID)])
        .await
        .expect("chat")
        .get(0)
}

/// Running chats per owner.
async fn running_by_owner(db: &Db) -> BTreeMap<Uuid, i64> {
    db.get()
        .await
        .expect("conn")
        .fetch_all(
            "SELECT owner_id, count(*)::int8 FROM chats WHERE status = 'running' GROUP BY owner_id",
            &[],
        )
        .await
        .expect("running")
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect()
}

fn sleeping_agent(dir: &std::path::Path, seconds: &str) -> Vec<String> {
    agent(dir, "sleeper", &format!("cat >/dev/null\nsleep {seconds}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_recovery_and_a_shutdown_release_each_start_the_pending_clock_and_notify() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let cfg = config(sleeping_agent(dir.path(), "30"));
    let first = Worker::start(db.clone(), cfg.clone()).await;
    let second = Worker::start(test_db.another_pool(), cfg).await;
    // Every way back to pending notifies `chat_pending`: replicas idling on their slow fallback
    // poll (chats.acquire_fallback_interval) claim the chat now.
    let mut pending = Notifications::listen(&test_db, "chat_pending").await;

    // A new chat waits for a message: no clock.
    let id: Uuid = db
        .get()
        .await
        .expect("conn")
        .fetch_one("INSERT INTO chats (owner_id) VALUES (gen_random_uuid()) RETURNING id", &[])
        .await
        .expect("insert")
        .get(0);
    assert_eq!(pending_since(db, id).await, None, "a waiting chat has no pending_since");

    // A user message makes it pending and starts the clock.
    exec(db, &format!("SELECT post_chat_message('{id}', 'user', '\"hi\"')")).await;
    let by_message = pending_since(db, id).await.expect("set by post_chat_message");
    pending.expect(&id.to_string()).await;

    // Claimed: running, the clock cleared.
    first.chats.acquire().tick(&Tick::detached(db)).await.expect("acquire");
    assert_eq!(chat(db, id).await.status, "running");
    assert_eq!(pending_since(db, id).await, None, "a running chat has no pending_since");

    // The first worker's lease goes stale: recovery returns the chat with a new clock.
    exec(
        db,
        &format!("UPDATE workers SET last_seen_at = now() - interval '1 hour' WHERE id = '{}'", first.id),
    )
    .await;
    assert_eq!(second.chats.recover(Duration::from_secs(7200)).recover().await.expect("recover"), 1);
    let by_recovery = pending_since(db, id).await.expect("set by recovery");
    pending.expect(&id.to_string()).await;
    assert!(by_recovery > by_message, "recovery restarts the clock: {by_recovery} after {by_message}");

    // The second worker claims it and shuts down: the release starts the clock again.
    second.chats.acquire().tick(&Tick::detached(db)).await.expect("acquire");
    assert_eq!(chat(db, id).await.worker_id, Some(second.id));
    second.stop().await;
    let row = wait_status(db, id, "pending").await;
    assert_eq!(row.worker_id, None);
    let by_release = pending_since(db, id).await.expect("set by the shutdown release");
    pending.expect(&id.to_string()).await;
    assert!(by_release > by_recovery, "the release restarts the clock: {by_release} after {by_recovery}");

    // The schema holds the rule for every writer.
    exec(db, &format!("UPDATE chats SET status = 'waiting', pending_since = now() WHERE id = '{id}'")).await;
    assert_eq!(pending_since(db, id).await, None);
    first.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chat_created_long_ago_that_becomes_pending_waits_behind_one_pending_for_longer() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = config(sleeping_agent(dir.path(), "30"));
    cfg.max_per_acquire = 1;
    let w = Worker::start(db.clone(), cfg).await;

    // Created a week ago, idle until now.
    let old: Uuid = db
        .get()
        .await
        .expect("conn")
        .fetch_one(
            "INSERT INTO chats (owner_id, created_at) VALUES (gen_random_uuid(), now() - interval '7 days') \
             RETURNING id",
            &[],
        )
        .await
        .expect("insert")
        .get(0);
    // Created a minute ago, pending for ten minutes' worth of clock.
    let waiting_longer = pending(db, Uuid::new_v4(), None, 1, 600.0).await[0];
    exec(db, &format!("SELECT post_chat_message('{old}', 'user', '\"again\"')")).await;

    w.chats.acquire().tick(&Tick::detached(db)).await.expect("acquire");
    assert_eq!(chat(db, waiting_longer).await.status, "running", "the longer wait goes first");
    assert_eq!(chat(db, old).await.status, "pending", "creation time does not jump the queue");
    w.chats.acquire().tick(&Tick::detached(db)).await.expect("acquire");
    assert_eq!(chat(db, old).await.status, "running");
    w.stop().await;
}

/// Owners A (3 running), B (1 running) and C (none), five pending each; A's the oldest, then
/// B's, then C's. Claims of six under each order, and with weight 3 for A.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fair_order_serves_the_fewest_running_weighted_first_and_fifo_serves_the_oldest() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (a, b, c) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    let elsewhere = Uuid::new_v4();
    for (owner, running) in [(a, 3i64), (b, 1)] {
        exec(
            db,
            &format!(
                "INSERT INTO chats (owner_id, status, worker_id, generation) \
                 SELECT '{owner}', 'running', '{elsewhere}', 1 FROM generate_series(1, {running})"
            ),
        )
        .await;
    }
    pending(db, a, None, 5, 30.0).await;
    pending(db, b, None, 5, 20.0).await;
    pending(db, c, None, 5, 10.0).await;

    let claimed_by_owner = |order: Order| async move {
        let mut conn = db.get().await.expect("conn");
        let tx = db::begin(
            &mut conn,
            db::TxLimits { statement: Duration::from_secs(5), idle: Duration::from_secs(5) },
        )
        .await
        .expect("begin");
        let rules = Rules { owner_cap: 0, org_cap: 0, order };
        let admitted = admission::claim(&tx, Uuid::new_v4(), 6, rules).await.expect("claim");
        // Rolled back: every case starts from the same rows.
        drop(tx);
        let mut by_owner = BTreeMap::new();
        for (chat, _) in &admitted.chats {
            *by_owner.entry(chat.owner_id).or_insert(0) += 1;
        }
        [a, b, c].map(|o| by_owner.get(&o).copied().unwrap_or(0))
    };
    // Keys (running + k − 1) / weight: C 0,1,2,… B 1,2,… A 3,…: C0 B1 C1 B2 C2, then A's oldest.
    assert_eq!(claimed_by_owner(Order::Fair).await, [1, 2, 3], "fair: A, B, C");
    assert_eq!(claimed_by_owner(Order::Fifo).await, [5, 1, 0], "fifo: the oldest first");
    // Weight 3 for A: A's keys 1, 1.33, 1.67, …: C0, then A1 B1 C1 (oldest first), A1.33, A1.67.
    exec(
        db,
        &format!("INSERT INTO chat_quotas (subject_kind, subject_id, weight) VALUES ('owner', '{a}', 3)"),
    )
    .await;
    assert_eq!(claimed_by_owner(Order::Fair).await, [3, 1, 2], "fair with A weighted 3");
}

#[derive(Clone, Copy)]
enum Subject {
    Owner,
    Org,
}

/// Acceptance 2: three workers (max_running 50 each) claim side by side; one owner has 200
/// pending chats, 20 owners 3 each. Sampled every 50 ms while they run, no subject ever has more
/// running than its cap, and the cap is reached (else the test could not fail).
async fn caps_hold_while_three_workers_claim(subject: Subject) {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg: ChatsConfig = config(sleeping_agent(dir.path(), "0.1"));
    cfg.max_running = 50;
    let cap: i64 = 5;
    let orgs: Vec<Uuid> = (0..4).map(|_| Uuid::new_v4()).collect();
    match subject {
        Subject::Owner => cfg.max_running_per_owner = 5,
        Subject::Org => cfg.max_running_per_org = 5,
    }
    let heavy = Uuid::new_v4();
    let mut chats = pending(db, heavy, Some(orgs[0]), 200, 2.0).await;
    for i in 0..20 {
        chats.extend(pending(db, Uuid::new_v4(), Some(orgs[1 + i % 3]), 3, 1.0).await);
    }
    let workers = [
        Worker::start(test_db.another_pool(), cfg.clone()).await,
        Worker::start(test_db.another_pool(), cfg.clone()).await,
        Worker::start(test_db.another_pool(), cfg).await,
    ];

    let group = match subject {
        Subject::Owner => "owner_id",
        Subject::Org => "org_id",
    };
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let (db, sampling) = (db.clone(), sampling.clone());
        let sql = format!(
            "SELECT coalesce(max(n), 0)::int8 FROM \
             (SELECT count(*) AS n FROM chats WHERE status = 'running' GROUP BY {group}) AS r"
        );
        tokio::spawn(async move {
            let (mut samples, mut most) = (0u64, 0i64);
            while sampling.load(Ordering::Relaxed) {
                most = most.max(exec_count(&db, &sql).await);
                samples += 1;
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            (samples, most)
        })
    };
    for w in &workers {
        w.run_loops();
    }
    common::eventually(Duration::from_secs(120), "every chat ran its turn", || async {
        exec_count(db, "SELECT count(*)::int8 FROM chats WHERE status <> 'waiting'").await == 0
    })
    .await;
    sampling.store(false, Ordering::Relaxed);
    let (samples, most) = sampler.await.expect("sampler");
    for w in &workers {
        w.stop().await;
    }
    let kind = match subject {
        Subject::Owner => "owner",
        Subject::Org => "org",
    };
    println!("cap per {kind} = {cap}: samples={samples} most_running={most}");
    assert!(most <= cap, "a {kind} ran {most} chats at once, over its cap of {cap}");
    assert_eq!(most, cap, "the cap was reached ({samples} samples), so it was tested");
    let runs = exec_count(db, "SELECT count(*)::int8 FROM chats WHERE generation = 1").await;
    assert_eq!(runs, chats.len() as i64, "every chat ran exactly once");
    assert!(running_by_owner(db).await.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_owner_cap_holds_while_three_workers_claim_side_by_side() {
    caps_hold_while_three_workers_claim(Subject::Owner).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_org_cap_holds_while_three_workers_claim_side_by_side() {
    caps_hold_while_three_workers_claim(Subject::Org).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_row_overrides_the_default_cap_at_the_next_claim() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let owner = Uuid::new_v4();
    let org = Uuid::new_v4();
    pending(db, owner, Some(org), 10, 1.0).await;
    let claim = |rules: Rules| async move {
        let mut conn = db.get().await.expect("conn");
        let tx = db::begin(
            &mut conn,
            db::TxLimits { statement: Duration::from_secs(5), idle: Duration::from_secs(5) },
        )
        .await
        .expect("begin");
        let admitted = admission::claim(&tx, Uuid::new_v4(), 10, rules).await.expect("claim");
        drop(tx);
        (admitted.chats.len(), admitted.owners_capped, admitted.orgs_capped)
    };
    let capped = Rules { owner_cap: 2, org_cap: 0, order: Order::Fair };
    assert_eq!(claim(capped).await, (2, 0, 0));
    exec(
        db,
        &format!(
            "INSERT INTO chat_quotas (subject_kind, subject_id, max_running) VALUES ('owner', '{owner}', 4)"
        ),
    )
    .await;
    assert_eq!(claim(capped).await, (4, 0, 0), "the owner's row raises its cap");
    exec(db, &format!("UPDATE chat_quotas SET max_running = 0 WHERE subject_id = '{owner}'")).await;
    assert_eq!(claim(capped).await, (10, 0, 0), "0 in the row: no cap");
    exec(
        db,
        &format!(
            "INSERT INTO chat_quotas (subject_kind, subject_id, max_running) VALUES ('org', '{org}', 3)"
        ),
    )
    .await;
    assert_eq!(claim(capped).await, (3, 0, 0), "the org's row caps it (the default is none)");

    // At the cap: nothing claimed, the capped subjects counted.
    exec(
        db,
        &format!(
            "UPDATE chats SET status = 'running', worker_id = gen_random_uuid(), generation = 1 \
             WHERE id IN (SELECT id FROM chats WHERE owner_id = '{owner}' LIMIT 3)"
        ),
    )
    .await;
    assert_eq!(claim(capped).await, (0, 0, 1), "the org is at its cap");
    exec(db, &format!("DELETE FROM chat_quotas WHERE subject_id = '{owner}'")).await;
    // Over the default cap of 2 again: the owner's cap holds its chats back before the org's
    // is looked at, so the claim counts the owner only (as `chat list` says `owner_cap`).
    assert_eq!(claim(capped).await, (0, 1, 0), "the owner is at the default cap of 2");
}

/// Walks an EXPLAIN (FORMAT JSON) plan: (node type, relation, index, rows × loops) per node.
fn plan_nodes(node: &serde_json::Value, out: &mut Vec<(String, String, String, f64)>) {
    let text = |k: &str| node.get(k).and_then(|v| v.as_str()).unwrap_or_default().to_owned();
    let num = |k: &str| node.get(k).and_then(serde_json::Value::as_f64).unwrap_or(0.0);
    out.push((
        text("Node Type"),
        text("Relation Name"),
        text("Index Name"),
        num("Actual Rows") * num("Actual Loops"),
    ));
    for child in node.get("Plans").and_then(|p| p.as_array()).into_iter().flatten() {
        plan_nodes(child, out);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_claim_reads_a_few_rows_of_an_owner_with_100k_pending_chats() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let heavy = Uuid::new_v4();
    exec(
        db,
        &format!(
            "INSERT INTO chats (owner_id, status, pending_since) \
             SELECT '{heavy}', 'pending', now() - interval '1 hour' + g * interval '1 millisecond' \
             FROM generate_series(1, 100000) AS g"
        ),
    )
    .await;
    for _ in 0..20 {
        pending(db, Uuid::new_v4(), None, 3, 1.0).await;
    }
    // The heavy owner already runs its cap of 5 (plus running chats of others).
    exec(
        db,
        &format!(
            "INSERT INTO chats (owner_id, status, worker_id, generation) \
             SELECT '{heavy}', 'running', gen_random_uuid(), 1 FROM generate_series(1, 5)"
        ),
    )
    .await;
    exec(db, "ANALYZE chats").await;

    for (order, fair) in [(Order::Fair, true), (Order::Fifo, false)] {
        let mut conn = db.get().await.expect("conn");
        let tx = db::begin(
            &mut conn,
            db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) },
        )
        .await
        .expect("begin");
        let sql = format!("EXPLAIN (ANALYZE, FORMAT JSON) {}", admission::CLAIM);
        let (worker, limit, cap, no_cap, from) = (Uuid::new_v4(), 50i64, 5i32, 0i32, Uuid::nil());
        let row = tx
            .fetch_one(
                &sql,
                &[
                    (&worker, Type::UUID),
                    (&limit, Type::INT8),
                    (&cap, Type::INT4),
                    (&no_cap, Type::INT4),
                    (&fair, Type::BOOL),
                    (&from, Type::UUID),
                    (&admission::OWNER_SWEEP, Type::INT4),
                    (&admission::OLDEST_HEAD, Type::INT8),
                ],
            )
            .await
            .expect("explain");
        let plan: serde_json::Value = row.get(0);
        drop(tx);
        let mut nodes = Vec::new();
        plan_nodes(&plan[0]["Plan"], &mut nodes);
        let seq: Vec<_> = nodes.iter().filter(|n| n.0 == "Seq Scan" && n.1 == "chats").collect();
        assert!(seq.is_empty(), "{order:?}: no sequential scan of chats: {seq:?}\n{plan:#}");
        let most = nodes.iter().filter(|n| n.1 == "chats").map(|n| n.3).fold(0.0, f64::max);
        assert!(most <= 1_000.0, "{order:?}: a scan of chats returned {most} rows:\n{plan:#}");
        let answered = plan[0]["Plan"]["Actual Rows"].as_f64().unwrap_or(0.0);
        println!("{order:?}: {answered} rows answered, largest scan of chats {most} rows");
        // 20 light owners × 3 = 60 under their caps, the limit is 50; plus the row counting the
        // one owner at its cap.
        assert_eq!(answered, 51.0, "{order:?}: the claim filled its limit from the light owners");
    }
}

/// Two replicas' claims, forced to overlap: B's starts while A's is uncommitted. B waits on the
/// claim lock (seen in `pg_locks`), and once A commits it counts A's chats against the cap.
/// Without the lock B does not wait, and its snapshot does not see A's claims: here it happens
/// to pick A's (locked, skipped) rows as its candidates, but with other rows locked or an org cap
/// in the way it would claim past the cap.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_waits_for_a_concurrent_one_and_counts_its_chats_against_the_cap() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let owner = Uuid::new_v4();
    pending(db, owner, None, 10, 1.0).await;
    let rules = Rules { owner_cap: 3, org_cap: 0, order: Order::Fair };

    let mut conn_a = db.get().await.expect("conn");
    let tx_a = db::begin(
        &mut conn_a,
        db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) },
    )
    .await
    .expect("begin");
    let a = admission::claim(&tx_a, Uuid::new_v4(), 10, rules).await.expect("claim a");
    assert_eq!(a.chats.len(), 3, "A claims up to the cap");

    let other = test_db.another_pool();
    let b = tokio::spawn(async move {
        let mut conn = other.get().await.expect("conn");
        let tx = db::begin(
            &mut conn,
            db::TxLimits { statement: Duration::from_secs(30), idle: Duration::from_secs(30) },
        )
        .await
        .expect("begin");
        let b = admission::claim(&tx, Uuid::new_v4(), 10, rules).await.expect("claim b");
        db::commit(tx).await.expect("commit b");
        (b.chats.len(), b.owners_capped)
    });
    let waiting = "SELECT count(*)::int8 FROM pg_locks WHERE locktype = 'advisory' AND NOT granted";
    let b_waits =
        common::within(Duration::from_secs(10), || async { exec_count(db, waiting).await == 1 }).await;
    assert!(b_waits && !b.is_finished(), "B waits for the claim lock while A's claim is open");

    db::commit(tx_a).await.expect("commit a");
    assert_eq!(b.await.expect("b"), (0, 1), "B sees A's three and claims nothing: the owner is at its cap");
    assert_eq!(running_by_owner(db).await.get(&owner), Some(&3));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_claim_records_the_wait_and_the_capped_owners_and_the_tick_counts_the_pending() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let probe = MetricsProbe::new();
    let mut cfg = config(sleeping_agent(dir.path(), "30"));
    cfg.max_running_per_owner = 1;
    let w = Worker::start_with_meter(db.clone(), cfg, probe.meter()).await;
    pending(db, Uuid::new_v4(), None, 3, 60.0).await;

    w.chats.acquire().tick(&Tick::detached(db)).await.expect("acquire");
    let (wait, attributed) = probe.histogram("chats.admission.wait").await;
    assert_eq!(wait.count, 1, "one chat claimed");
    assert!((60..120).contains(&wait.sum), "it had waited a minute: {wait:?}");
    assert!(!attributed, "no attributes on the wait");
    assert_eq!(probe.counter("chats.admission.capped", &[("cap", "owner_cap")]).await, 0, "room at first");
    // The census ran at the start of the tick, before the claim.
    assert_eq!(probe.gauge("chats.pending").await, Some(3.0));
    let oldest = probe.gauge("chats.pending.oldest_age").await.expect("oldest age");
    assert!((60.0..120.0).contains(&oldest), "oldest wait {oldest}");

    w.chats.acquire().tick(&Tick::detached(db)).await.expect("acquire");
    assert_eq!(
        probe.counter("chats.admission.capped", &[("cap", "owner_cap")]).await,
        1,
        "the owner is at its cap"
    );
    assert_eq!(probe.histogram("chats.admission.wait").await.0.count, 1, "nothing more claimed");
    w.stop().await;
}

/// A turn that ends frees a slot, and the acquire loop claims into it at once, not an
/// `acquire_interval` (here an hour) later.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_finished_turn_wakes_acquisition_into_the_free_slot() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = config(sleeping_agent(dir.path(), "0"));
    cfg.max_running = 1;
    cfg.acquire_interval = Duration::from_secs(3600);
    let w = Worker::start(db.clone(), cfg).await;
    let chats = pending(db, Uuid::new_v4(), None, 3, 1.0).await;
    w.run_loops();
    for id in &chats {
        let row = wait_status(db, *id, "waiting").await;
        assert_eq!(row.generation, 1, "chat {id} ran once");
    }
    w.stop().await;
}
