//! Reliability suite, the agent boundary (issue 16, `scripts/chaos.sh`):
//! 9. a worker cut off from PostgreSQL (a proxy frozen for longer than `stale_after`): the
//!    survivor recovers its chats, and every old agent is dead before the new one starts;
//! 10. the same with the worker SIGSTOPped instead (a watchdog outside the worker must stop its
//!     agents);
//! 11. 200 agents writing continuously through a pool of 4 with a 1 s heartbeat: no lease renewal
//!     missed over 60 s.
//!
//! Agents record their own start (`start <chat> <generation> <pid> <realtime_ns>`, see
//! [`chaos_support::record_start`]); their exits are observed by the test through pidfds
//! ([`AgentWatcher`]), since a SIGKILLed agent records nothing. Both on CLOCK_REALTIME.

mod chaos_support;
mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use chaos_support::{
    AgentLife, AgentWatcher, FreezingProxy, LIMIT, Replica, WorkerConfig, agent, agent_script, agents_of,
    realtime_ns, record_start, report, seed_pending_chats, worker_id,
};
use common::{TestDb, within};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::Exec;

/// As configured below: `chats.heartbeat_interval`, `runtime.jitter`, `chats.stale_after`.
const HEARTBEAT: Duration = Duration::from_secs(1);
const JITTER: f64 = 0.1;
/// The lease guarantee needs at least `2 × (h × (1 + jitter) + t) + t + kill_grace + 1 s` with
/// tick timeout t = h and kill_grace 1 s: 7.2 s; 9 s leaves room.
const STALE_AFTER: &str = "9s";
const STALE_AFTER_S: u64 = 9;

/// The single int8 a query returns.
async fn scalar(db: &impl Exec, sql: &str) -> i64 {
    db.fetch_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// The chats config shared by the boundary scenarios.
fn chats_config(config: WorkerConfig, command: String) -> WorkerConfig {
    config
        .set("runtime.jitter", JITTER)
        .set("chats.enabled", true)
        .set("chats.acquire_interval", "100ms")
        .set("chats.heartbeat_interval", "1s")
        .set("chats.stale_after", STALE_AFTER)
        .set("chats.recover_interval", "1s")
        .set("chats.runner.command", vec![command])
        .set("chats.runner.kill_grace", "1s")
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Fault {
    /// The path to PostgreSQL (pool and LISTEN) freezes: no byte either way, nothing closed.
    CutOff,
    /// SIGSTOP of the worker process (not its agents).
    Frozen,
}

/// Titles of the boundary scenarios' chats: how their first agent spends its endless turn.
/// Silent: no output (only the lease can stop it); writing: a message a second (a runner write
/// is due or in flight when the fault hits).
const SILENT: &str = "boundary-silent";
const WRITING: &str = "boundary-writing";

/// One chat's old and new agent: `new start − old exit` (negative: both lived at once).
struct Handover {
    chat: String,
    title: String,
    old_pid: i32,
    /// `None`: the old agent still lived when the scenario gave up waiting.
    margin_ns: Option<i64>,
}

/// Scenarios 9 and 10: replica A runs every chat, each agent in a turn that never ends on its
/// own (half of them silent, half answering once a second). A fault longer than
/// `stale_after` makes A's lease stale; replica B recovers the chats and runs each again (the
/// new turn answers once and exits 0). For every chat the old agent must be gone before the new
/// one starts.
async fn lease_boundary(scenario: u32, name: &str, fault: Fault) {
    const CHATS: i64 = 20;
    let outage = Duration::from_secs(STALE_AFTER_S + 5);
    let test_db = TestDb::new().await;
    let dir = chaos_support::scenario_dir();
    let starts = dir.path().join("starts");
    let command = agent(
        dir.path(),
        "agent",
        &format!(
            "{}\n\
             input=$(cat)\n\
             if [ \"$CHAT_GENERATION\" -gt 1 ]; then\n\
               echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"resumed\"}}'\n\
               exit 0\n\
             fi\n\
             case \"$input\" in *{SILENT}*) while :; do sleep 1; done ;; esac\n\
             while :; do\n\
               echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"working\"}}'\n\
               sleep 1\n\
             done",
            record_start(&starts)
        ),
    );
    // Bounded: the scenario's own waits add up to less.
    let watcher = AgentWatcher::start(&starts, &command, Duration::from_secs(300));
    let proxy = match fault {
        Fault::CutOff => Some(FreezingProxy::start("127.0.0.1:5432").await),
        Fault::Frozen => None,
    };
    let config = chats_config(WorkerConfig::for_test(&test_db), command)
        .set("database.connect_timeout", "2s")
        .set("database.acquire_timeout", "2s")
        .set("database.statement_timeout", "2s")
        .set("chats.max_running", 50)
        .set("chats.max_per_acquire", 50);
    let a_config = match &proxy {
        Some(proxy) => {
            let url = format!("postgres://postgres@127.0.0.1:{}/{}", proxy.port, test_db.name);
            config.clone().set("database.url", url.as_str()).set("database.listen_url", url.as_str())
        }
        None => config.clone(),
    };

    // A alone takes every chat; B joins once A runs them all.
    let mut a = Replica::start(dir.path(), "replica-a", &a_config);
    let a_id = worker_id(&a).await;
    seed_pending_chats(&test_db.db.get().await.expect("conn"), CHATS, &[SILENT, WRITING]).await;
    let all_started = within(LIMIT, || async {
        let started = watcher.lives().iter().filter(|l| l.generation == 1).count() as i64;
        let on_a = scalar(
            &test_db.db.get().await.expect("conn"),
            &format!("SELECT count(*)::int8 FROM chats WHERE status = 'running' AND worker_id = '{a_id}'"),
        )
        .await;
        started == CHATS && on_a == CHATS
    })
    .await;
    assert!(all_started, "A did not start an agent for every chat within {LIMIT:?}: {:?}", watcher.lives());
    let mut b = Replica::start(dir.path(), "replica-b", &config);
    worker_id(&b).await;
    let early: Vec<AgentLife> = watcher.lives().into_iter().filter(|l| l.exited_ns.is_some()).collect();
    assert!(early.is_empty(), "agents ended before the fault: {early:?}\nA's log:\n{}", a.log_tail(30));

    let fault_at = Instant::now();
    let fault_ns = realtime_ns();
    match (fault, &proxy) {
        (Fault::CutOff, Some(proxy)) => proxy.freeze(),
        _ => a.sigstop(),
    }
    // B recovers A's chats while the fault lasts (its own connection, not the frozen path).
    let recovered_in_fault = within(outage, || async {
        scalar(
            &test_db.db.get().await.expect("conn"),
            "SELECT count(*)::int8 FROM chats WHERE generation >= 2",
        )
        .await
            == CHATS
    })
    .await;
    tokio::time::sleep(outage.saturating_sub(fault_at.elapsed())).await;
    match (fault, &proxy) {
        (Fault::CutOff, Some(proxy)) => proxy.thaw(),
        _ => a.sigcont(),
    }
    let fault_len = fault_at.elapsed();

    // Every chat started again, and every old agent gone (it may take the thaw to end one).
    let settled = within(LIMIT, || async {
        let lives = watcher.lives();
        let restarted = lives
            .iter()
            .filter(|l| l.generation >= 2)
            .map(|l| l.chat_id.as_str())
            .collect::<std::collections::BTreeSet<_>>()
            .len() as i64;
        restarted == CHATS && lives.iter().filter(|l| l.generation == 1).all(|l| l.exited_ns.is_some())
    })
    .await;
    let lives = watcher.finish();
    a.assert_alive();
    b.assert_alive();

    let mut by_chat: BTreeMap<&str, Vec<&AgentLife>> = BTreeMap::new();
    for life in &lives {
        by_chat.entry(life.chat_id.as_str()).or_default().push(life);
    }
    let titles: BTreeMap<String, String> = test_db
        .db
        .get()
        .await
        .expect("conn")
        .fetch_all("SELECT id::text, title FROM chats", &[])
        .await
        .expect("titles")
        .iter()
        .map(|row| (row.get(0), row.get(1)))
        .collect();
    let mut handovers = Vec::new();
    for (chat, runs) in &by_chat {
        let olds: Vec<&&AgentLife> = runs.iter().filter(|l| l.generation == 1).collect();
        assert_eq!(olds.len(), 1, "chat {chat}: one first-generation agent, got {olds:?}");
        let old = olds[0];
        let Some(new) = runs.iter().filter(|l| l.generation >= 2).min_by_key(|l| l.started_ns) else {
            continue;
        };
        handovers.push(Handover {
            chat: (*chat).to_owned(),
            title: titles.get(*chat).cloned().unwrap_or_default(),
            old_pid: old.pid,
            margin_ns: old.exited_ns.map(|exit| new.started_ns - exit),
        });
    }
    let overlapping: Vec<&Handover> =
        handovers.iter().filter(|h| h.margin_ns.is_none_or(|m| m <= 0)).collect();
    let still_alive = handovers.iter().filter(|h| h.margin_ns.is_none()).count();
    let min_margin_ms = |title: Option<&str>| {
        handovers
            .iter()
            .filter(|h| title.is_none_or(|t| h.title == t))
            .filter_map(|h| h.margin_ns)
            .min()
            .map_or("none".into(), |m| format!("{:.0}", m as f64 / 1e6))
    };
    let overlap_of = |title: &str| overlapping.iter().filter(|h| h.title == title).count().to_string();
    let recovered = scalar(
        &test_db.db.get().await.expect("conn"),
        &format!(
            "SELECT count(*)::int8 FROM chats WHERE generation >= 2 AND worker_id IS DISTINCT FROM '{a_id}'"
        ),
    )
    .await;
    let since_fault_s = |ns: i64| format!("{:.2}", (ns - fault_ns) as f64 / 1e9);
    let first_new = lives.iter().filter(|l| l.generation >= 2).map(|l| l.started_ns).min();
    let last_old_exit = lives.iter().filter(|l| l.generation == 1).filter_map(|l| l.exited_ns).max();
    // Old agents already gone when their start line was read: their exit is an upper bound.
    let unobserved_exits =
        lives.iter().filter(|l| l.generation == 1 && l.exited_ns.is_some() && !l.exit_observed).count();
    report(
        scenario,
        name,
        &[
            ("replicas", "2".into()),
            ("chats", CHATS.to_string()),
            ("fault_s", format!("{:.1}", fault_len.as_secs_f64())),
            ("stale_after_s", STALE_AFTER_S.to_string()),
            ("recovered", recovered.to_string()),
            ("recovered_during_fault", recovered_in_fault.to_string()),
            ("first_new_start_s", first_new.map_or("none".into(), since_fault_s)),
            ("last_old_exit_s", last_old_exit.map_or("none".into(), since_fault_s)),
            ("handovers", handovers.len().to_string()),
            ("overlap", overlapping.len().to_string()),
            ("overlap_silent", overlap_of(SILENT)),
            ("overlap_writing", overlap_of(WRITING)),
            ("still_alive", still_alive.to_string()),
            ("min_margin_ms", min_margin_ms(None)),
            ("min_margin_silent_ms", min_margin_ms(Some(SILENT))),
            ("min_margin_writing_ms", min_margin_ms(Some(WRITING))),
            ("old_exits_upper_bound", unobserved_exits.to_string()),
        ],
    );
    let described: Vec<String> = overlapping
        .iter()
        .map(|h| match h.margin_ns {
            Some(m) => format!(
                "{} ({}, old pid {}): new agent started {:.0} ms before the old one exited",
                h.chat,
                h.title,
                h.old_pid,
                -m as f64 / 1e6
            ),
            None => {
                format!(
                    "{} ({}, old pid {}): old agent still alive after the new one started",
                    h.chat, h.title, h.old_pid
                )
            }
        })
        .collect();
    assert!(
        overlapping.is_empty(),
        "{} of {} chats had their old and new agent alive at once:\n  {}",
        overlapping.len(),
        handovers.len(),
        described.join("\n  ")
    );
    assert!(settled, "within {LIMIT:?} after the fault: every chat started again and every old agent ended");
    assert_eq!(handovers.len() as i64, CHATS, "every chat's agent ran again on B");
    // First: B claimed every chat during the fault. (Recovery notifies `chat_pending`, so B's
    // acquire does not wait for its 10 s fallback poll; had it waited past the thaw, A could
    // rightly claim what was still pending, and the count below would say so.)
    assert!(recovered_in_fault, "B recovered every chat while A's lease was stale");
    assert_eq!(recovered, CHATS, "every chat recovered by B");
    let _ = b.sigterm(LIMIT).await;
    let _ = a.sigterm(LIMIT).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_9_a_worker_cut_off_from_postgres_stops_its_agents_before_they_are_recovered() {
    lease_boundary(9, "agents-cut-off-worker", Fault::CutOff).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_10_a_frozen_worker_has_its_agents_stopped_before_they_are_recovered() {
    lease_boundary(10, "agents-frozen-worker", Fault::Frozen).await;
}

/// `(last_seen_at, clock_timestamp())` of `worker`, in µs on the database clock.
async fn lease_sample(probe: &impl Exec, worker: Uuid) -> Option<(i64, i64)> {
    probe
        .fetch_opt(
            "SELECT (extract(epoch FROM last_seen_at) * 1e6)::int8, (extract(epoch FROM clock_timestamp()) * 1e6)::int8 \
             FROM workers WHERE id = $1",
            &[(&worker, Type::UUID)],
        )
        .await
        .expect("sample the lease")
        .map(|row| (row.get(0), row.get(1)))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn scenario_11_two_hundred_writing_agents_on_a_pool_of_four_never_delay_the_lease() {
    const CHATS: i64 = 200;
    const POOL_SIZE: i64 = 4;
    const WINDOW: Duration = Duration::from_secs(60);
    const SAMPLE_EVERY: Duration = Duration::from_millis(200);
    // A healthy renewal follows the previous one by at most h × (1 + jitter) plus the renewal's
    // own latency (the next tick is scheduled after a tick ends). A failed one (it times out at
    // h, then backs off 2h × (1 ± jitter)) leaves a gap of at least 2.8 h. 2 h lies between.
    let missed_after = HEARTBEAT * 2;
    let test_db = TestDb::new().await;
    let dir = chaos_support::scenario_dir();
    let starts = dir.path().join("starts");
    // A message every ~20 ms for 60 s (bash's `read -t` on a pipe nobody writes: a sleep that
    // forks nothing), then exit 0. Blocks while the runner does not read: writes as fast as the
    // worker takes them.
    let command = agent_script(
        dir.path(),
        "agent",
        "/bin/bash",
        &format!(
            "{}\n\
             cat >/dev/null\n\
             exec 3<> <(:)\n\
             end=$((SECONDS + {}))\n\
             while [ \"$SECONDS\" -lt \"$end\" ]; do\n\
               echo '{{\"type\":\"message\",\"role\":\"assistant\",\"content\":\"m\"}}'\n\
               read -t 0.02 -u 3 || :\n\
             done",
            record_start(&starts),
            WINDOW.as_secs()
        ),
    );
    let config = chats_config(WorkerConfig::for_test(&test_db), command)
        .set("database.pool_size", POOL_SIZE)
        .set("chats.max_running", CHATS)
        .set("chats.max_per_acquire", CHATS);
    // The test's reads go over a connection of its own, not the worker's pool.
    let probe =
        worker::db::connect_direct(&test_db.url, "worker-chaos-probe").await.expect("probe connection");
    let mut replica = Replica::start(dir.path(), "replica", &config);
    let id = worker_id(&replica).await;
    seed_pending_chats(&probe, CHATS, &[]).await;
    let started = within(LIMIT, || async {
        std::fs::read_to_string(&starts).map_or(0, |s| s.lines().count()) as i64 >= CHATS
    })
    .await;
    assert!(started, "{CHATS} agents not started within {LIMIT:?}\nlog:\n{}", replica.log_tail(30));
    let agents = agents_of(replica.pid()).len();

    let messages_before =
        scalar(&probe, "SELECT count(*)::int8 FROM chat_messages WHERE role = 'assistant'").await;
    let window_start = Instant::now();
    let (first, mut sampled_until) = lease_sample(&probe, id).await.expect("the worker's row");
    let mut renewals: Vec<i64> = vec![first];
    let mut row_missing = 0;
    while window_start.elapsed() < WINDOW {
        tokio::time::sleep(SAMPLE_EVERY).await;
        match lease_sample(&probe, id).await {
            Some((seen, now)) => {
                if renewals.last() != Some(&seen) {
                    renewals.push(seen);
                }
                sampled_until = now;
            }
            None => row_missing += 1,
        }
    }
    let messages = scalar(&probe, "SELECT count(*)::int8 FROM chat_messages WHERE role = 'assistant'").await
        - messages_before;
    let running = scalar(&probe, "SELECT count(*)::int8 FROM chats WHERE status = 'running'").await;
    replica.assert_alive();

    // Gaps between successive renewals, and the one still open at the end of the window.
    let mut gaps: Vec<i64> = renewals.windows(2).map(|w| w[1] - w[0]).collect();
    gaps.push(sampled_until - renewals.last().copied().unwrap_or(first));
    let threshold = missed_after.as_micros() as i64;
    let missed: Vec<f64> = gaps.iter().filter(|g| **g > threshold).map(|g| *g as f64 / 1e6).collect();
    let max_gap_ms = gaps.iter().max().copied().unwrap_or(0) / 1000;
    let mean_gap_ms = match renewals.len() {
        0 | 1 => 0,
        n => (renewals[n - 1] - first) / 1000 / (n as i64 - 1),
    };
    let warnings = replica.problems();
    for record in warnings.iter().take(20) {
        eprintln!("replica {record}");
    }
    report(
        11,
        "lease-under-writing-agents",
        &[
            ("agents", CHATS.to_string()),
            ("agent_processes", agents.to_string()),
            ("pool_size", POOL_SIZE.to_string()),
            ("heartbeat_ms", HEARTBEAT.as_millis().to_string()),
            ("window_s", WINDOW.as_secs().to_string()),
            ("renewals", (renewals.len() - 1).to_string()),
            ("mean_gap_ms", mean_gap_ms.to_string()),
            ("max_gap_ms", max_gap_ms.to_string()),
            ("missed", missed.len().to_string()),
            ("messages", messages.to_string()),
            ("messages_per_s", format!("{:.0}", messages as f64 / WINDOW.as_secs_f64())),
            ("running_at_end", running.to_string()),
            ("warnings", warnings.len().to_string()),
        ],
    );
    assert_eq!(row_missing, 0, "the worker's lease row was missing in {row_missing} samples");
    assert!(
        missed.is_empty(),
        "{} renewal gaps over {missed_after:?} (s): {missed:?}; renewals seen: {}",
        missed.len(),
        renewals.len() - 1
    );
    assert!(messages > 0, "the agents wrote");
    let _ = replica.sigterm(LIMIT).await;
}
