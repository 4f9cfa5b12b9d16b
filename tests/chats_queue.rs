//! `worker chat quota set|list|rm`, `worker chat list --status pending` (the wait and why) and
//! `worker chat queue`, through the real binary against a real database; and a quota changed
//! through the CLI taking effect at the next claim of two replicas, without a restart.

mod chats_support;
mod common;

use std::process::Output;

use chats_support::{Worker, agent, config};
use common::TestDb;
use common::process::{BIN, inherited_overrides, repo_path};
use serde_json::{Value, json};
use tokio::process::Command;
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::{Db, Exec};
use worker::runtime::{Loop, Tick};

/// The default caps every command of these tests runs with (`[chats]` of the loaded config).
const CAPS: [&str; 4] = ["--set", "chats.max_running_per_owner=2", "--set", "chats.max_running_per_org=0"];

async fn worker(test_db: &TestDb, args: &[&str]) -> Output {
    let mut command = Command::new(BIN);
    command.arg("--database-url").arg(&test_db.url).args(CAPS).args(args).current_dir(repo_path(""));
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command.env("RUST_LOG", "warn");
    command.output().await.expect("run worker")
}

fn stdout(output: &Output) -> String {
    assert!(output.status.success(), "exit {:?}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

async fn text(test_db: &TestDb, args: &[&str]) -> String {
    stdout(&worker(test_db, args).await)
}

async fn json_of(test_db: &TestDb, args: &[&str]) -> Value {
    serde_json::from_str(&text(test_db, args).await).expect("JSON")
}

/// Runs a command that must fail: exit 1, and stderr (returned) names the problem.
async fn failing(test_db: &TestDb, args: &[&str]) -> String {
    let output = worker(test_db, args).await;
    assert_eq!(output.status.code(), Some(1), "{args:?}: {}", String::from_utf8_lossy(&output.stdout));
    String::from_utf8(output.stderr).expect("utf-8")
}

/// The words of the first line of `text` that contains `needle`.
fn words_of_line(text: &str, needle: &str) -> Vec<String> {
    let line =
        text.lines().find(|l| l.contains(needle)).unwrap_or_else(|| panic!("no `{needle}` in\n{text}"));
    line.split_whitespace().map(str::to_owned).collect()
}

/// A chat of `owner` (and `org`) in `status`: running on a made-up worker, or pending since
/// `waited` seconds ago.
async fn chat(db: &Db, owner: Uuid, org: Option<Uuid>, status: &str, waited: i32) -> Uuid {
    let worker = (status == "running").then(Uuid::new_v4);
    db.get()
        .await
        .expect("conn")
        .fetch_one(
            "INSERT INTO chats (owner_id, org_id, status, worker_id, pending_since) \
             VALUES ($1, $2, $3, $4, CASE WHEN $3 = 'pending' THEN now() - make_interval(secs => $5) END) \
             RETURNING id",
            &[
                (&owner, Type::UUID),
                (&org, Type::UUID),
                (&status, Type::TEXT),
                (&worker, Type::UUID),
                (&waited, Type::INT4),
            ],
        )
        .await
        .expect("insert chat")
        .get(0)
}

#[tokio::test]
async fn quotas_are_set_listed_and_removed_and_bad_values_are_refused_naming_them() {
    let test_db = TestDb::new().await;
    let (owner, org) = (Uuid::new_v4().to_string(), Uuid::new_v4().to_string());

    let set = text(&test_db, &["chat", "quota", "set", "--owner", &owner, "--max-running", "3"]).await;
    assert_eq!(words_of_line(&set, &owner)[..4], ["owner", owner.as_str(), "3", "1"], "{set}");
    // Omitted flags keep the current value.
    let set = text(&test_db, &["chat", "quota", "set", "--owner", &owner, "--weight", "2.5"]).await;
    assert_eq!(words_of_line(&set, &owner)[..4], ["owner", owner.as_str(), "3", "2.5"], "{set}");
    // A new row without --max-running has the worker's default cap.
    let set = text(&test_db, &["chat", "quota", "set", "--org", &org]).await;
    assert_eq!(words_of_line(&set, &org)[..4], ["org", org.as_str(), "default", "1"], "{set}");
    let set = text(&test_db, &["chat", "quota", "set", "--org", &org, "--max-running", "0"]).await;
    assert_eq!(words_of_line(&set, &org)[..4], ["org", org.as_str(), "none", "1"], "{set}");

    let listed = json_of(&test_db, &["chat", "quota", "list", "--json"]).await;
    let rows = listed.as_array().expect("array");
    assert_eq!(rows.len(), 2, "{listed}");
    assert_eq!(
        (&rows[0]["subject_kind"], &rows[0]["subject_id"], &rows[0]["max_running"], &rows[0]["weight"]),
        (&json!("owner"), &json!(owner), &json!(3), &json!(2.5)),
        "owners first, exact values"
    );
    assert_eq!(
        (&rows[1]["subject_kind"], &rows[1]["max_running"], &rows[1]["weight"]),
        (&json!("org"), &json!(0), &json!(1.0))
    );
    assert!(rows[1]["updated_at"].is_string());
    let table = text(&test_db, &["chat", "quota", "list"]).await;
    assert!(table.starts_with("KIND"), "{table}");
    assert_eq!(words_of_line(&table, &org)[..4], ["org", org.as_str(), "none", "1"], "{table}");

    for (args, named) in [
        (vec!["--owner", owner.as_str(), "--max-running", "-1"], "--max-running `-1`"),
        (vec!["--owner", owner.as_str(), "--max-running", "1000001"], "--max-running `1000001`"),
        (vec!["--owner", owner.as_str(), "--max-running", "lots"], "--max-running `lots`"),
        (vec!["--owner", owner.as_str(), "--weight", "0"], "--weight `0`"),
        (vec!["--owner", owner.as_str(), "--weight", "1000.5"], "--weight `1000.5`"),
        (vec!["--owner", owner.as_str(), "--weight", "NaN"], "--weight `NaN`"),
        (vec!["--owner", "bob"], "--owner `bob`"),
        (vec!["--org", "acme", "--weight", "2"], "--org `acme`"),
        (vec!["--owner", owner.as_str(), "--org", org.as_str()], "exactly one of --owner UUID or --org UUID"),
        (vec!["--weight", "2"], "exactly one of --owner UUID or --org UUID"),
    ] {
        let error = failing(&test_db, &[&["chat", "quota", "set"], args.as_slice()].concat()).await;
        assert!(error.contains(named), "{args:?}: {error}");
    }
    assert_eq!(json_of(&test_db, &["chat", "quota", "list", "--json"]).await, listed, "nothing written");

    let removed = text(&test_db, &["chat", "quota", "rm", "--org", &org]).await;
    assert!(removed.contains(&format!("org {org}")), "{removed}");
    let error = failing(&test_db, &["chat", "quota", "rm", "--org", &org]).await;
    assert!(error.contains(&format!("no quota for org {org}")), "{error}");
    let error = failing(&test_db, &["chat", "quota", "rm", "--org", "x"]).await;
    assert!(error.contains("--org `x`"), "{error}");
    let left = json_of(&test_db, &["chat", "quota", "list", "--json"]).await;
    assert_eq!(left.as_array().map(Vec::len), Some(1), "{left}");
    let error = failing(&test_db, &["chat", "create", "--org", "acme"]).await;
    assert!(error.contains("--org `acme`"), "{error}");
}

#[tokio::test]
async fn the_pending_list_shows_each_chats_wait_and_why_it_waits_oldest_first() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (capped, member, free, org) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    // `capped` runs 2 of its default cap of 2.
    for _ in 0..2 {
        chat(db, capped, None, "running", 0).await;
    }
    let at_owner_cap = chat(db, capped, None, "pending", 300).await;
    // The org runs 1 of its quota of 1; `member` runs nothing.
    chat(db, Uuid::new_v4(), Some(org), "running", 0).await;
    text(&test_db, &["chat", "quota", "set", "--org", &org.to_string(), "--max-running", "1"]).await;
    let at_org_cap = chat(db, member, Some(org), "pending", 200).await;
    let for_capacity = chat(db, free, None, "pending", 100).await;
    let newest = chat(db, member, None, "pending", 0).await;
    let archived = chat(db, free, None, "pending", 900).await;
    db.get()
        .await
        .expect("conn")
        .exec("UPDATE chats SET archived = true WHERE id = $1", &[(&archived, Type::UUID)])
        .await
        .expect("archive");
    // The org's id comes from `chat create --org`.
    let created =
        text(&test_db, &["chat", "create", "--owner", &free.to_string(), "--org", &org.to_string(), "hi"])
            .await;
    let created: Uuid = created.trim().parse().expect("chat id");

    let listed = json_of(&test_db, &["chat", "list", "--status", "pending", "--json"]).await;
    let listed = listed.as_array().expect("array");
    let ids: Vec<&Value> = listed.iter().map(|c| &c["id"]).collect();
    let expected = [at_owner_cap, at_org_cap, for_capacity, newest, created].map(|id| json!(id));
    assert_eq!(ids, expected.iter().collect::<Vec<_>>(), "oldest wait first, archived chats are not waiting");
    let reasons: Vec<&Value> = listed.iter().map(|c| &c["waits_for"]).collect();
    assert_eq!(
        reasons,
        [&json!("owner_cap"), &json!("org_cap"), &json!("capacity"), &json!("capacity"), &json!("org_cap")]
    );
    let waited = listed[0]["wait_seconds"].as_f64().expect("wait_seconds");
    assert!((300.0..360.0).contains(&waited), "{waited}");
    assert!(listed[0]["pending_since"].is_string());
    assert_eq!(listed[1]["org_id"], json!(org));
    assert_eq!(listed[4]["org_id"], json!(org), "chat create --org sets the org");

    let table = text(&test_db, &["chat", "list", "--status", "pending"]).await;
    assert!(table.starts_with("ID"), "{table}");
    let line = words_of_line(&table, &at_owner_cap.to_string());
    assert!(line.contains(&"5m".to_owned()) && line.contains(&"owner_cap".to_owned()), "{table}");
    assert!(words_of_line(&table, &at_org_cap.to_string()).contains(&"org_cap".to_owned()), "{table}");
    assert!(words_of_line(&table, &for_capacity.to_string()).contains(&"capacity".to_owned()), "{table}");

    // A quota lifting the owner's cap changes the reason at once.
    text(&test_db, &["chat", "quota", "set", "--owner", &capped.to_string(), "--max-running", "0"]).await;
    let listed = json_of(&test_db, &["chat", "list", "--status", "pending", "--json"]).await;
    assert_eq!(listed[0]["waits_for"], "capacity", "{listed}");

    // Other statuses: as before, no wait.
    let running = json_of(&test_db, &["chat", "list", "--status", "running", "--json"]).await;
    let running = running.as_array().expect("array");
    assert_eq!(running.len(), 3);
    assert!(running.iter().all(|c| c["waits_for"].is_null() && c["wait_seconds"].is_null()), "{running:?}");
}

#[tokio::test]
async fn the_queue_shows_pending_and_running_per_owner_and_org_oldest_wait_first() {
    let test_db = TestDb::new().await;
    let db = &test_db.db;
    let (a, b, c, org) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
    for _ in 0..2 {
        chat(db, a, Some(org), "running", 0).await;
    }
    chat(db, a, Some(org), "pending", 500).await;
    chat(db, a, Some(org), "pending", 50).await;
    chat(db, a, None, "pending", 10).await;
    chat(db, b, None, "pending", 100).await;
    chat(db, c, Some(org), "running", 0).await;
    // Neither waiting nor settled chats are in the queue.
    chat(db, c, Some(org), "waiting", 0).await;
    chat(db, b, None, "completed", 0).await;
    text(
        &test_db,
        &["chat", "quota", "set", "--org", &org.to_string(), "--max-running", "4", "--weight", "2"],
    )
    .await;
    text(&test_db, &["chat", "quota", "set", "--owner", &b.to_string(), "--max-running", "0"]).await;

    let queue = json_of(&test_db, &["chat", "queue", "--json"]).await;
    let subjects = queue["subjects"].as_array().expect("subjects");
    let row = |s: &Value| {
        (
            s["kind"].clone(),
            s["id"].clone(),
            s["pending"].clone(),
            s["running"].clone(),
            s["cap"].clone(),
            s["weight"].clone(),
        )
    };
    assert_eq!(
        subjects.iter().map(row).collect::<Vec<_>>(),
        [
            (json!("owner"), json!(a), json!(3), json!(2), json!(2), json!(1.0)),
            (json!("org"), json!(org), json!(2), json!(3), json!(4), json!(2.0)),
            (json!("owner"), json!(b), json!(1), json!(0), Value::Null, json!(1.0)),
            (json!("owner"), json!(c), json!(0), json!(1), json!(2), json!(1.0)),
        ],
        "oldest wait first (an owner before its org), nothing pending last; cap null = none: {queue}"
    );
    let oldest = |s: &Value| s["oldest_wait_seconds"].as_f64();
    assert!(oldest(&subjects[0]).is_some_and(|w| (500.0..560.0).contains(&w)), "{queue}");
    assert_eq!(oldest(&subjects[0]), oldest(&subjects[1]), "the org's oldest chat is a's");
    assert!(oldest(&subjects[2]).is_some_and(|w| (100.0..160.0).contains(&w)), "{queue}");
    assert_eq!(subjects[3]["oldest_wait_seconds"], Value::Null);
    assert_eq!((&queue["totals"]["pending"], &queue["totals"]["running"]), (&json!(4), &json!(3)));
    assert_eq!(queue["totals"]["oldest_wait_seconds"].as_f64(), oldest(&subjects[0]));

    let table = text(&test_db, &["chat", "queue"]).await;
    let lines: Vec<Vec<&str>> = table.lines().map(|l| l.split_whitespace().collect()).collect();
    assert_eq!(lines[0], ["KIND", "ID", "PENDING", "RUNNING", "CAP", "WEIGHT", "OLDEST", "WAIT"], "{table}");
    let (a, org, b, c) = (a.to_string(), org.to_string(), b.to_string(), c.to_string());
    assert_eq!(lines[1][..7], ["owner", a.as_str(), "3", "2", "2", "1", "8m"], "{table}");
    assert_eq!(lines[2][..7], ["org", org.as_str(), "2", "3", "4", "2", "8m"], "{table}");
    assert_eq!(lines[3][..7], ["owner", b.as_str(), "1", "0", "none", "1", "1m"], "{table}");
    assert_eq!(lines[4], ["owner", c.as_str(), "0", "1", "2", "1", "-"], "{table}");
    assert_eq!(lines[5][..4], ["total", "4", "3", "8m"], "{table}");
    assert_eq!(lines.len(), 6, "{table}");
}

/// Running chats per worker.
async fn running_by_worker(db: &Db) -> std::collections::BTreeMap<Uuid, i64> {
    let rows = db
        .get()
        .await
        .expect("conn")
        .fetch_all(
            "SELECT worker_id, count(*)::int8 FROM chats WHERE status = 'running' GROUP BY worker_id",
            &[],
        )
        .await
        .expect("running");
    rows.iter().map(|r| (r.get(0), r.get(1))).collect()
}

async fn acquire(w: &Worker) {
    w.chats.acquire().tick(&Tick::detached(&w.db)).await.expect("acquire");
}

/// Acceptance 4: a quota changed through the CLI applies at the next claim of every replica.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_quota_set_through_the_cli_applies_at_the_next_claim_of_every_replica() {
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("dir");
    let mut cfg = config(agent(dir.path(), "a", "exec sleep 300"));
    cfg.max_running_per_owner = 1;
    // Two replicas, each with its own runtime and pool.
    let a = Worker::start(test_db.db.clone(), cfg.clone()).await;
    let b = Worker::start(test_db.another_pool(), cfg).await;
    let owner = Uuid::new_v4();
    for _ in 0..6 {
        chat(&test_db.db, owner, None, "pending", 0).await;
    }
    let owner = owner.to_string();
    let cap_1 = ["--set", "chats.max_running_per_owner=1"];

    acquire(&a).await;
    acquire(&b).await;
    assert_eq!(running_by_worker(&test_db.db).await, [(a.id, 1)].into(), "the default cap: 1");

    text(
        &test_db,
        &[&cap_1[..], &["chat", "quota", "set", "--owner", &owner, "--max-running", "3"]].concat(),
    )
    .await;
    // The replica that holds nothing claims first, so both end up holding some.
    acquire(&b).await;
    acquire(&a).await;
    assert_eq!(running_by_worker(&test_db.db).await, [(a.id, 1), (b.id, 2)].into(), "the quota's cap: 3");
    acquire(&a).await;
    acquire(&b).await;
    assert_eq!(running_by_worker(&test_db.db).await.values().sum::<i64>(), 3, "and no more");
    let pending =
        json_of(&test_db, &[&cap_1[..], &["chat", "list", "--status", "pending", "--json"]].concat()).await;
    let reasons: Vec<&Value> = pending.as_array().expect("array").iter().map(|c| &c["waits_for"]).collect();
    assert_eq!(reasons, [&json!("owner_cap"); 3], "{pending}");

    // Raised to 4 (one more claim would fit), then removed before any claim: the claims follow
    // the default cap of 1 again, and take nothing.
    text(
        &test_db,
        &[&cap_1[..], &["chat", "quota", "set", "--owner", &owner, "--max-running", "4"]].concat(),
    )
    .await;
    text(&test_db, &[&cap_1[..], &["chat", "quota", "rm", "--owner", &owner]].concat()).await;
    acquire(&a).await;
    acquire(&b).await;
    assert_eq!(
        running_by_worker(&test_db.db).await,
        [(a.id, 1), (b.id, 2)].into(),
        "no claim over the default"
    );
    let queue = json_of(&test_db, &[&cap_1[..], &["chat", "queue", "--json"]].concat()).await;
    let row = &queue["subjects"][0];
    assert_eq!((&row["pending"], &row["running"], &row["cap"]), (&json!(3), &json!(3), &json!(1)), "{queue}");

    a.stop().await;
    b.stop().await;
}
