//! The outbox and counters against a real Redis Cluster: 3 masters + 3 replicas on 127.0.0.1
//! (`ensure_redis_cluster` in scripts/lib/services.sh, which `scripts/test.sh` runs and which
//! exports `WORKER_TEST_REDIS_CLUSTER_URL`). Tasks of many queues land on their slots' masters; a
//! graceful `CLUSTER FAILOVER` and a `kill -9` of a master while the sweeper runs under load lose
//! nothing the cluster acknowledged and dead-letter nothing, and the sweeper resumes within
//! seconds; the counters loop reads its hash from the cluster, also across a failover.
//!
//! The scenarios share one cluster and fail it over, so they run one at a time (a mutex), each
//! starting from a healthy cluster and leaving it healthy (a killed node is restarted and rejoins
//! as a replica). Each prints one line of figures, also appended to the file named by
//! `WORKER_REDIS_CLUSTER_FIGURES` (scripts/test.sh prints them at the end).

mod common;
mod outbox_support;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::TestDb;
use common::metrics::MetricsProbe;
use fred::prelude::{HashesInterface, SortedSetsInterface};
use outbox_support::{Harness, connected};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use worker::counters::Counters;
use worker::db::{Db, Exec};
use worker::health::Health;
use worker::runtime::{Loop, Progress, Runtime, RuntimeConfig, Tick};

const URL_VAR: &str = "WORKER_TEST_REDIS_CLUSTER_URL";
/// Bound of any one wait (a failover with cluster-node-timeout 2 s takes a few seconds).
const LIMIT: Duration = Duration::from_secs(60);
/// How soon after a failover begins tasks must reach the affected master again (generous: the
/// measured figure is printed).
const RESUME_BOUND: Duration = Duration::from_secs(20);
const QUEUES: i64 = 50;

/// One scenario at a time: they fail the shared cluster over.
static CLUSTER: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

fn cluster_url() -> String {
    std::env::var(URL_VAR).unwrap_or_else(|_| {
        panic!(
            "{URL_VAR} is not set: tests/redis_cluster.rs needs a Redis Cluster (3 masters + 3 replicas). \
             scripts/test.sh starts one and sets it; by hand: \
             `source scripts/lib/services.sh && ensure_redis_cluster && cargo test --test redis_cluster` \
             (ensure_redis_cluster exports {URL_VAR}=redis-cluster://127.0.0.1:7101)"
        )
    })
}

/// The port of the URL's (first) node.
fn seed_port() -> u16 {
    let url = url::Url::parse(&cluster_url()).expect("cluster url parses");
    url.port().expect("the cluster url names a port")
}

/// Prints one line of figures (and appends it to `WORKER_REDIS_CLUSTER_FIGURES` when set).
fn report(scenario: u32, name: &str, figures: &[(&str, String)]) {
    let figures: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let line = format!("redis_cluster[{scenario}] {name}: {}", figures.join(" "));
    println!("{line}");
    if let Ok(path) = std::env::var("WORKER_REDIS_CLUSTER_FIGURES")
        && let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}

// ---- the cluster, seen through redis-cli (works whatever state the cluster is in) ----

/// `redis-cli -p port args…`; `None` when the node does not answer.
async fn cli(port: u16, args: &[&str]) -> Option<String> {
    let out = tokio::process::Command::new("redis-cli")
        .arg("-p")
        .arg(port.to_string())
        .args(args)
        .output()
        .await
        .expect("redis-cli is installed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    (out.status.success() && !text.starts_with("Could not connect")).then_some(text)
}

/// One line of `CLUSTER NODES`.
#[derive(Debug, Clone)]
struct Node {
    id: String,
    port: u16,
    master: bool,
    master_id: Option<String>,
    failing: bool,
    slots: Vec<(u16, u16)>,
}

async fn topology(port: u16) -> Option<Vec<Node>> {
    let text = cli(port, &["cluster", "nodes"]).await?;
    let nodes = text
        .lines()
        .filter(|l| !l.trim().is_empty())
        .filter_map(|line| {
            let f: Vec<&str> = line.split_whitespace().collect();
            let port = f.get(1)?.split('@').next()?.rsplit(':').next()?.parse().ok()?;
            let flags = f.get(2)?;
            let slots = f
                .iter()
                .skip(8)
                .filter(|s| !s.starts_with('['))
                .filter_map(|s| match s.split_once('-') {
                    Some((a, b)) => Some((a.parse().ok()?, b.parse().ok()?)),
                    None => s.parse().ok().map(|n| (n, n)),
                })
                .collect();
            Some(Node {
                id: f[0].to_owned(),
                port,
                master: flags.contains("master"),
                master_id: (f.get(3)? != &"-").then(|| f[3].to_owned()),
                failing: flags.contains("fail") || f.get(7) != Some(&"connected"),
                slots,
            })
        })
        .collect();
    Some(nodes)
}

/// The topology as seen from the first live node among the seed and the ports it knows of.
async fn live_topology() -> Vec<Node> {
    let seed = seed_port();
    for port in std::iter::once(seed).chain(seed..seed + 6) {
        if let Some(nodes) = topology(port).await
            && !nodes.is_empty()
        {
            return nodes;
        }
    }
    panic!("no node of the cluster at {} answers CLUSTER NODES", cluster_url());
}

fn master_of(nodes: &[Node], slot: u16) -> u16 {
    nodes
        .iter()
        .find(|n| n.master && !n.failing && n.slots.iter().any(|(a, b)| (*a..=*b).contains(&slot)))
        .unwrap_or_else(|| panic!("no live master serves slot {slot}: {nodes:#?}"))
        .port
}

fn replica_of(nodes: &[Node], master_port: u16) -> u16 {
    let master = nodes.iter().find(|n| n.port == master_port).expect("the master");
    nodes
        .iter()
        .find(|n| !n.master && !n.failing && n.master_id.as_deref() == Some(master.id.as_str()))
        .unwrap_or_else(|| panic!("master {master_port} has no live replica: {nodes:#?}"))
        .port
}

fn slot_of(key: &str) -> u16 {
    fred::util::redis_keyslot(key.as_bytes())
}

/// Healthy: 3 masters owning every slot and 3 replicas, none failing, each replica's link up and
/// its sync done, and every node reporting `cluster_state:ok`.
async fn cluster_healthy() -> bool {
    let Some(nodes) = topology(seed_port()).await else { return false };
    let masters = nodes.iter().filter(|n| n.master && !n.slots.is_empty() && !n.failing).count();
    let replicas = nodes.iter().filter(|n| !n.master && !n.failing).count();
    if nodes.len() != 6 || masters != 3 || replicas != 3 {
        return false;
    }
    for node in &nodes {
        let Some(info) = cli(node.port, &["cluster", "info"]).await else { return false };
        if !info.contains("cluster_state:ok") {
            return false;
        }
        if !node.master {
            let Some(repl) = cli(node.port, &["info", "replication"]).await else { return false };
            if !repl.contains("master_link_status:up") || !repl.contains("master_sync_in_progress:0") {
                return false;
            }
        }
    }
    true
}

async fn wait_healthy(what: &str) {
    common::eventually(LIMIT, what, cluster_healthy).await;
}

/// `CLUSTER FAILOVER` on `replica` (graceful: its master stops writes, it catches up and takes
/// over); returns once the topology shows it as a master.
async fn graceful_failover(replica: u16) {
    let answer = cli(replica, &["cluster", "failover"]).await.expect("the replica answers");
    assert!(answer.trim() == "OK", "CLUSTER FAILOVER on {replica}: {answer}");
    common::eventually(LIMIT, "the replica to be promoted", || async move {
        topology(replica).await.is_some_and(|nodes| nodes.iter().any(|n| n.port == replica && n.master))
    })
    .await;
}

/// A node killed with SIGKILL; dropping it starts the node again (same nodes.conf, so it rejoins
/// the cluster, as a replica of whoever took its slots), even when the test failed first.
struct Killed {
    port: u16,
    cluster_dir: PathBuf,
    restarted: bool,
}

impl Killed {
    async fn kill(port: u16) -> Self {
        let info = cli(port, &["info", "server"]).await.expect("the node answers");
        let pid: i32 = info
            .lines()
            .find_map(|l| l.strip_prefix("process_id:"))
            .and_then(|p| p.trim().parse().ok())
            .expect("process_id in INFO server");
        let dir = cli(port, &["config", "get", "dir"]).await.expect("CONFIG GET dir");
        let dir = PathBuf::from(dir.lines().nth(1).expect("the dir").trim());
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGKILL)
            .expect("kill -9 the master");
        // The node's dir is {cluster dir}/{port}: what start_redis_cluster_node wants.
        let cluster_dir = dir.parent().expect("cluster dir").to_owned();
        Self { port, cluster_dir, restarted: false }
    }

    fn restart(&mut self) {
        assert!(self.start(), "restarting the killed node {}", self.port);
    }

    /// Starts the node again (once); whether that worked.
    fn start(&mut self) -> bool {
        if self.restarted {
            return true;
        }
        self.restarted = true;
        std::process::Command::new("bash")
            .arg("-c")
            .arg(format!("source scripts/lib/services.sh && start_redis_cluster_node {}", self.port))
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("REDIS_CLUSTER_DIR", &self.cluster_dir)
            .status()
            .is_ok_and(|status| status.success())
    }
}

impl Drop for Killed {
    /// Also after a failed assertion, so the next run finds the node (no panic here: this may
    /// run while unwinding).
    fn drop(&mut self) {
        if !self.start() {
            eprintln!("could not restart the killed cluster node {}", self.port);
        }
    }
}

// ---- the outbox side ----

/// A test database and a client of the cluster, with a key prefix of their own.
async fn harness() -> Harness {
    let test_db = TestDb::new().await;
    let mut config = test_db.config();
    config.redis.url = cluster_url();
    let redis = connected(&config.redis).await;
    Harness { test_db, config, redis }
}

fn queue(g: i64) -> String {
    format!("q{}", g % QUEUES)
}

/// Tasks `{tag}{from}..{tag}{to}` (queue `q{g % QUEUES}`) through `enqueue_task`, in one statement.
async fn enqueue_range(db: &Db, tag: &str, from: i64, to: i64) {
    db.get()
        .await
        .expect("conn")
        .fetch_one(
            "SELECT count(enqueue_task($3 || g, 'q' || (g % $4), jsonb_build_object('n', g))) \
             FROM generate_series($1::int8, $2::int8) AS g",
            &[(&from, Type::INT8), (&to, Type::INT8), (&tag, Type::TEXT), (&QUEUES, Type::INT8)],
        )
        .await
        .expect("enqueue");
}

/// The ids `{tag}{from..=to}` by queue.
fn expected_ids(tag: &str, from: i64, to: i64, into: &mut BTreeMap<String, BTreeSet<String>>) {
    for g in from..=to {
        into.entry(queue(g)).or_default().insert(format!("{tag}{g}"));
    }
}

/// Task ids scheduled and payloads present, per queue, read through the cluster client (each
/// key from the master of its slot). Retries a read that fails while the cluster settles.
async fn in_redis(h: &Harness, queues: &[String]) -> BTreeMap<String, (BTreeSet<String>, BTreeSet<String>)> {
    let mut found = BTreeMap::new();
    for q in queues {
        let sched = worker::redis::key(h.prefix(), "sched", q);
        let payloads = worker::redis::key(h.prefix(), "payload", q);
        let deadline = Instant::now() + LIMIT;
        let pair = loop {
            let ids: Result<Vec<String>, _> = h.redis.zrange(&sched, 0, -1, None, false, None, false).await;
            let fields: Result<Vec<String>, _> = h.redis.hkeys(&payloads).await;
            match (ids, fields) {
                (Ok(ids), Ok(fields)) => break (ids.into_iter().collect(), fields.into_iter().collect()),
                (a, b) => {
                    assert!(Instant::now() < deadline, "reading {q} from the cluster: {a:?} {b:?}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            }
        };
        found.insert(q.clone(), pair);
    }
    found
}

/// Tasks expected but not in Redis (scheduled with their payload): what the cluster lost.
async fn lost(h: &Harness, expected: &BTreeMap<String, BTreeSet<String>>) -> (usize, usize) {
    let queues: Vec<String> = expected.keys().cloned().collect();
    let found = in_redis(h, &queues).await;
    let mut lost = 0;
    let mut total = 0;
    for (q, ids) in expected {
        let (sched, payloads) = &found[q];
        total += ids.len();
        lost += ids.iter().filter(|id| !sched.contains(*id) || !payloads.contains(*id)).count();
    }
    (total, lost)
}

/// A producer enqueueing batches of `batch` tasks (`L1`, `L2`, … over every queue) until stopped;
/// returns the last id enqueued.
struct Load {
    stop: CancellationToken,
    handle: tokio::task::JoinHandle<i64>,
    last: Arc<AtomicI64>,
}

impl Load {
    fn start(db: Db, batch: i64) -> Self {
        let stop = CancellationToken::new();
        let last = Arc::new(AtomicI64::new(0));
        let (token, counter) = (stop.clone(), last.clone());
        let handle = tokio::spawn(async move {
            let mut next = 1;
            while !token.is_cancelled() {
                enqueue_range(&db, "L", next, next + batch - 1).await;
                next += batch;
                counter.store(next - 1, Ordering::Relaxed);
                // The pace of the load (about 1,000 tasks/s), not a wait for anything.
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            next - 1
        });
        Self { stop, handle, last }
    }

    async fn stop(self) -> i64 {
        self.stop.cancel();
        self.handle.await.expect("producer")
    }
}

/// The sweeper running as the daemon runs it (the runtime's loop, interval 50 ms).
struct Running {
    runtime: Runtime,
    metrics: MetricsProbe,
}

impl Running {
    fn start(h: &Harness) -> Self {
        let metrics = MetricsProbe::new();
        let runtime = Runtime::new(
            h.db().clone(),
            Health::default(),
            &metrics.meter(),
            RuntimeConfig { jitter: 0.0, ..RuntimeConfig::default() },
        );
        let mut config = h.config.outbox.clone();
        config.base.interval = Duration::from_millis(50);
        // Any failure costs an attempt budget of one: a single row settled as failed by the
        // failover would be dead-lettered, and dead=0 would catch it.
        config.max_attempts = 1;
        let sweeper = worker::outbox::Sweeper::new(
            h.db().clone(),
            h.redis.clone(),
            h.prefix(),
            config,
            &metrics.meter(),
        );
        runtime.spawn(sweeper);
        Self { runtime, metrics }
    }

    /// The loop's failed ticks by error label, e.g. `redis_unavailable:3,redis_undetermined:1`.
    async fn failed_ticks(&self) -> String {
        let mut failed = Vec::new();
        let errors = [("loop", "outbox"), ("outcome", "error")];
        let total = self.metrics.counter("worker.loop.ticks", &errors).await;
        let mut labelled = 0;
        for label in ["redis_unavailable", "redis_timeout", "redis_undetermined", "timeout"] {
            let n =
                self.metrics.counter("worker.loop.ticks", &[errors[0], errors[1], ("error", label)]).await;
            if n > 0 {
                failed.push(format!("{label}:{n}"));
                labelled += n;
            }
        }
        if total > labelled {
            failed.push(format!("other:{}", total - labelled));
        }
        if failed.is_empty() { "0".into() } else { failed.join(",") }
    }

    async fn stop(self) {
        self.runtime.begin_shutdown();
        self.runtime.drained().await;
    }
}

/// A queue whose sorted set lives on `master` (its tasks are the ones a failover of it affects).
fn queue_on(nodes: &[Node], prefix: &str, master: u16) -> String {
    (0..QUEUES)
        .map(queue)
        .find(|q| master_of(nodes, slot_of(&worker::redis::key(prefix, "sched", q))) == master)
        .expect("a queue on every master (50 queues over 3 masters)")
}

/// One failover under load: the sweeper runs while a producer enqueues; `fail_over` (given the
/// master to fail and the replica that should take over) starts the failover and returns what
/// to restart later, if anything. Then a marker task on the failed master's slots must reach the
/// new master; measured from the start of the failover. Returns (tasks, lost, dead, resumed).
async fn failover_under_load<F, Fut>(
    scenario: u32,
    name: &str,
    pick_master: impl Fn(&[Node]) -> u16,
    fail_over: F,
) where
    F: FnOnce(u16, u16) -> Fut,
    Fut: Future<Output = Option<Killed>>,
{
    let h = harness().await;
    let nodes = live_topology().await;
    let master = pick_master(&nodes);
    let replica = replica_of(&nodes, master);
    let marker_queue = queue_on(&nodes, h.prefix(), master);
    let running = Running::start(&h);
    let load = Load::start(h.db().clone(), 50);

    // Under way: tasks flow before the failover.
    common::eventually(LIMIT, "the first tasks in the cluster", || {
        let redis = h.redis.clone();
        let key = worker::redis::key(h.prefix(), "sched", &queue(1));
        async move { redis.zcard::<i64, _>(key).await.is_ok_and(|n| n > 0) }
    })
    .await;
    let before = load.last.load(Ordering::Relaxed);

    let started = Instant::now();
    let mut killed = fail_over(master, replica).await;
    // The first task enqueued after the failover began, on the failed master's slots.
    let marker = "marker";
    h.db()
        .get()
        .await
        .expect("conn")
        .fetch_one(
            "SELECT enqueue_task($1, $2, '{}')",
            &[(&marker, Type::TEXT), (&marker_queue.as_str(), Type::TEXT)],
        )
        .await
        .expect("enqueue the marker");
    let marker_key = worker::redis::key(h.prefix(), "sched", &marker_queue);
    let resumed = common::within(LIMIT, || {
        let redis = h.redis.clone();
        let key = marker_key.clone();
        async move { redis.zscore::<Option<f64>, _, _>(key, marker).await.ok().flatten().is_some() }
    })
    .await;
    let resumed_after = started.elapsed();
    if let Some(killed) = killed.as_mut() {
        killed.restart();
    }
    // Some more load after the failover, then let the sweeper empty the outbox.
    let target = load.last.load(Ordering::Relaxed) + 500;
    common::eventually(LIMIT, "more load after the failover", || {
        let last = load.last.clone();
        async move { last.load(Ordering::Relaxed) >= target }
    })
    .await;
    let last = load.stop().await;
    let drained =
        common::within(LIMIT, || async { h.scalar("SELECT count(*) FROM task_outbox").await == 0 }).await;
    let failed_ticks = running.failed_ticks().await;
    running.stop().await;
    let dead = h.scalar("SELECT count(*) FROM task_outbox_dead").await;
    let mut expected = BTreeMap::new();
    expected_ids("L", 1, last, &mut expected);
    expected.entry(marker_queue.clone()).or_default().insert(marker.to_owned());
    let (tasks, lost) = lost(&h, &expected).await;
    let left = h.scalar("SELECT count(*) FROM task_outbox").await;
    report(
        scenario,
        name,
        &[
            ("tasks", tasks.to_string()),
            ("before_failover", before.to_string()),
            ("failovers", "1".into()),
            ("failed_master", master.to_string()),
            ("promoted", replica.to_string()),
            ("lost", lost.to_string()),
            ("dead", dead.to_string()),
            ("left_in_outbox", left.to_string()),
            ("resumed_after", format!("{}ms", resumed_after.as_millis())),
            ("failed_ticks", failed_ticks),
        ],
    );
    assert!(resumed, "the marker task never reached the new master of its slot");
    assert!(drained, "the outbox did not drain after the failover: {left} rows left");
    assert_eq!(lost, 0, "tasks deleted from the outbox (acknowledged by the cluster) but not in it");
    assert_eq!(dead, 0, "a failover dead-lettered tasks");
    assert!(
        resumed_after < RESUME_BOUND,
        "the sweeper took {resumed_after:?} to reach the new master (bound {RESUME_BOUND:?})"
    );
    drop(killed);
    wait_healthy("the cluster to be healthy again (3 masters with a synced replica each)").await;
}

// ---- the scenarios ----

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tasks_of_fifty_queues_land_on_the_masters_of_their_slots() {
    let _one = CLUSTER.lock().await;
    wait_healthy("a healthy cluster (scripts/lib/services.sh ensure_redis_cluster)").await;
    let h = harness().await;
    const PER_QUEUE: i64 = 40;
    let total = QUEUES * PER_QUEUE;
    enqueue_range(h.db(), "t", 1, total).await;
    let sweeper = h.sweeper(&MetricsProbe::new().meter());
    let tick = Tick::detached(h.db());
    for ticks in 1.. {
        if sweeper.tick(&tick).await.expect("tick") == Progress::Done {
            break;
        }
        assert!(ticks < 100, "the outbox never drained");
    }
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0);
    let dead = h.scalar("SELECT count(*) FROM task_outbox_dead").await;

    let mut expected = BTreeMap::new();
    expected_ids("t", 1, total, &mut expected);
    let (tasks, lost) = lost(&h, &expected).await;
    // Each queue's keys are on the master of their slot, and only there: asked directly (no
    // redirection), that master holds all 40 tasks; the 50 queues span all three masters.
    let nodes = live_topology().await;
    let mut per_master: HashMap<u16, usize> = HashMap::new();
    for q in expected.keys() {
        for (kind, count_cmd) in [("sched", "zcard"), ("payload", "hlen")] {
            let key = worker::redis::key(h.prefix(), kind, q);
            let master = master_of(&nodes, slot_of(&key));
            let n = cli(master, &[count_cmd, &key]).await.expect("the master answers");
            assert_eq!(n.trim(), PER_QUEUE.to_string(), "{kind} of {q} on its master {master}");
            for other in nodes.iter().filter(|n| n.master && n.port != master) {
                let n = cli(other.port, &[count_cmd, &key]).await.expect("a master answers");
                assert!(
                    n.starts_with("MOVED"),
                    "{key} answered by {} which does not own it: {n}",
                    other.port
                );
            }
            *per_master.entry(master).or_default() += 1;
        }
    }
    report(
        1,
        "fifty_queues",
        &[
            ("tasks", tasks.to_string()),
            ("queues", QUEUES.to_string()),
            ("failovers", "0".into()),
            ("masters", per_master.len().to_string()),
            ("keys_per_master", format!("{:?}", per_master.values().collect::<BTreeSet<_>>())),
            ("lost", lost.to_string()),
            ("dead", dead.to_string()),
        ],
    );
    assert_eq!(per_master.len(), 3, "the queues' keys span the three masters: {per_master:?}");
    assert_eq!((tasks, lost, dead), (total as usize, 0, 0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_failover_under_load_loses_nothing_and_the_sweeper_resumes_within_seconds() {
    let _one = CLUSTER.lock().await;
    wait_healthy("a healthy cluster (scripts/lib/services.sh ensure_redis_cluster)").await;
    // The master of queue q1's sorted set (any master would do).
    failover_under_load(
        2,
        "cluster_failover",
        |nodes| master_of(nodes, slot_of(&format!("x:sched:{}", queue(1)))),
        |_master, replica| async move {
            graceful_failover(replica).await;
            None
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_master_killed_under_load_loses_nothing_and_the_sweeper_resumes_within_seconds() {
    let _one = CLUSTER.lock().await;
    wait_healthy("a healthy cluster (scripts/lib/services.sh ensure_redis_cluster)").await;
    // The node the URL names when it is a master (the client must then find the cluster through
    // the others), else its master.
    failover_under_load(
        3,
        "kill_9_master",
        |nodes| {
            let seed = nodes.iter().find(|n| n.port == seed_port()).expect("the seed node");
            if seed.master {
                seed.port
            } else {
                let id = seed.master_id.as_deref().expect("a replica has a master");
                nodes.iter().find(|n| n.id == id).expect("its master").port
            }
        },
        |master, replica| async move {
            let killed = Killed::kill(master).await;
            // The replica takes over once the others mark the master failed (node timeout 2 s).
            common::eventually(LIMIT, "the replica of the killed master to be promoted", || async move {
                topology(replica)
                    .await
                    .is_some_and(|nodes| nodes.iter().any(|n| n.port == replica && n.master))
            })
            .await;
            Some(killed)
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn counters_sync_reads_the_running_hash_from_the_cluster_across_a_failover() {
    let _one = CLUSTER.lock().await;
    wait_healthy("a healthy cluster (scripts/lib/services.sh ensure_redis_cluster)").await;
    let mut h = harness().await;
    h.config.counters.scan_count = 100; // several HSCAN pages
    const JOBS: i64 = 1000;
    h.exec(&format!(
        "INSERT INTO jobs (id, status) SELECT 'job-' || g, 'running' FROM generate_series(1, {JOBS}) g"
    ))
    .await;
    let key = format!("{}:running", h.prefix());
    let write = |round: i64| {
        let redis = h.redis.clone();
        let key = key.clone();
        async move {
            let fields: Vec<(String, String)> =
                (1..=JOBS).map(|g| (format!("job-{g}"), ((g + round) % 7).to_string())).collect();
            redis.hset::<(), _, _>(&key, fields).await
        }
    };
    let synced = |round: i64| {
        let db = h.db().clone();
        async move {
            let wrong: i64 = db
                .get()
                .await
                .expect("conn")
                .fetch_one(
                    "SELECT count(*) FROM jobs WHERE running_tasks <> (split_part(id, '-', 2)::int8 + $1) % 7",
                    &[(&round, Type::INT8)],
                )
                .await
                .expect("compare")
                .get(0);
            wrong == 0
        }
    };
    let sync = Counters::new(
        h.db().clone(),
        h.redis.clone(),
        h.prefix(),
        h.config.counters.clone(),
        &MetricsProbe::new().meter(),
    );
    write(0).await.expect("hset");
    let first = sync.sync().await.expect("sync from the cluster");
    assert_eq!(first.entries, JOBS as usize);
    assert!(first.pages > 1, "read in pages: {first:?}");
    assert!(synced(0).await, "every job's count from the cluster");

    // Fail over the hash's master; the next counts are read from the new master.
    let nodes = live_topology().await;
    let master = master_of(&nodes, slot_of(&key));
    let replica = replica_of(&nodes, master);
    let started = Instant::now();
    graceful_failover(replica).await;
    let deadline = Instant::now() + LIMIT;
    let mut failed_syncs = 0;
    loop {
        let ok = write(1).await.is_ok() && sync.tick(&Tick::detached(h.db())).await.is_ok();
        if ok && synced(1).await {
            break;
        }
        failed_syncs += 1;
        assert!(Instant::now() < deadline, "the counters never synced from the new master");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let resumed_after = started.elapsed();
    let now_master = master_of(&live_topology().await, slot_of(&key));
    report(
        4,
        "counters",
        &[
            ("jobs", JOBS.to_string()),
            ("pages", first.pages.to_string()),
            ("failovers", "1".into()),
            ("hash_master", format!("{master}->{now_master}")),
            ("failed_syncs", failed_syncs.to_string()),
            ("resumed_after", format!("{}ms", resumed_after.as_millis())),
        ],
    );
    assert_eq!(now_master, replica, "the hash is now served by the promoted replica");
    assert!(resumed_after < RESUME_BOUND, "{resumed_after:?}");
    let _: i64 = fred::prelude::KeysInterface::del(&h.redis, &key).await.expect("del");
    wait_healthy("the cluster to be healthy again").await;
}
