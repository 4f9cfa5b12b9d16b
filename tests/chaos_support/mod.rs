//! The reliability suite's harness (docs/reliability.md, `scripts/chaos.sh`): real `worker`
//! processes with a config of their own and a JSON log on disk, the faults an incident brings
//! (SIGKILL, SIGTERM, a PostgreSQL restart, a Redis that goes away, a network path that freezes),
//! and one line of figures per scenario.
//!
//! The chaos binaries are not part of `cargo test` (`test = false` in Cargo.toml): some of their
//! faults (restarting the shared PostgreSQL) would break tests running beside them, so
//! `scripts/chaos.sh` runs them one scenario at a time.
#![allow(dead_code)] // each chaos binary uses a different subset

pub mod silent_path;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use worker::db::Exec;

use crate::common::process::{BIN, free_port, inherited_overrides, readyz, repo_path};
use crate::common::{self, TestDb};

/// How long any one wait of the suite may take before the scenario fails.
pub const LIMIT: Duration = Duration::from_secs(60);

/// Prints the scenario's one line of figures (`scripts/chaos.sh` collects these lines).
pub fn report(scenario: u32, name: &str, figures: &[(&str, String)]) {
    let figures: Vec<String> = figures.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let line = format!("chaos[{scenario}] {name}: {}", figures.join(" "));
    println!("{line}");
    // Also to a file when asked, so the script can print all lines together at the end.
    if let Ok(path) = std::env::var("WORKER_CHAOS_FIGURES")
        && let Ok(mut file) = std::fs::OpenOptions::new().create(true).append(true).open(path)
    {
        let _ = writeln!(file, "{line}");
    }
}

/// A worker config as a TOML table: every loop off except the lease, a JSON log, the test's
/// database and Redis prefix, and `/readyz` with raw error messages (`health.detail`), so a
/// scenario's failure says what went wrong, not only its label. Scenarios switch on what they exercise with [`WorkerConfig::set`].
#[derive(Clone)]
pub struct WorkerConfig(toml::Table);

impl WorkerConfig {
    pub fn new(database_url: &str, redis_url: &str, redis_prefix: &str) -> Self {
        let text = format!(
            "[app]\nenv = \"test\"\nshutdown_timeout = \"15s\"\n\n[log]\nformat = \"json\"\nlevel = \"info\"\n\n\
             [database]\nurl = \"{database_url}\"\npool_size = 4\nmigrate_on_start = false\n\n\
             [redis]\nurl = \"{redis_url}\"\nprefix = \"{redis_prefix}\"\n\n\
             [health]\ndetail = true\n\n[runtime]\njitter = 0.0\n\n\
             [outbox]\nenabled = false\n\n[counters]\nenabled = false\n\n[chats]\nenabled = false\n\n\
             [gitsync]\nenabled = false\n\n[prebuilds]\nenabled = false\n"
        );
        Self(toml::from_str(&text).expect("base config parses"))
    }

    /// The config of a test database with a Redis prefix of its own.
    pub fn for_test(test_db: &TestDb) -> Self {
        Self::new(&test_db.url, &common::redis_url(), &common::unique_prefix())
    }

    /// Sets `section.key` (dotted, any depth) to `value`.
    pub fn set(mut self, path: &str, value: impl Into<toml::Value>) -> Self {
        let mut table = &mut self.0;
        let mut parts: Vec<&str> = path.split('.').collect();
        let last = parts.pop().expect("a key");
        for part in parts {
            let entry = table.entry(part).or_insert_with(|| toml::Value::Table(toml::Table::new()));
            table = entry.as_table_mut().unwrap_or_else(|| panic!("{path}: {part} is not a table"));
        }
        table.insert(last.to_owned(), value.into());
        self
    }

    pub fn get(&self, path: &str) -> Option<&toml::Value> {
        let mut value: Option<&toml::Value> = None;
        let mut table = &self.0;
        for part in path.split('.') {
            value = table.get(part);
            if let Some(toml::Value::Table(next)) = value {
                table = next;
            }
        }
        value
    }

    pub fn redis_prefix(&self) -> String {
        self.get("redis.prefix").and_then(|v| v.as_str()).expect("redis.prefix").to_owned()
    }

    pub fn to_toml(&self) -> String {
        toml::to_string(&self.0).expect("config serialises")
    }
}

/// A real `worker run` process: its config file, its health port and its log (stdout and
/// stderr, appended across restarts).
pub struct Replica {
    pub name: String,
    pub port: u16,
    config: PathBuf,
    log: PathBuf,
    env: Vec<(String, String)>,
    child: Option<tokio::process::Child>,
    /// Processes this replica has been (one per start).
    pub starts: usize,
}

impl Replica {
    /// Writes `config` (with a health port of its own) into `dir` and starts the worker.
    pub fn start(dir: &Path, name: &str, config: &WorkerConfig) -> Self {
        Self::start_with_env(dir, name, config, &[])
    }

    pub fn start_with_env(dir: &Path, name: &str, config: &WorkerConfig, env: &[(&str, &str)]) -> Self {
        let port = free_port();
        let config = config.clone().set("health.listen", format!("127.0.0.1:{port}"));
        let path = dir.join(format!("{name}.toml"));
        std::fs::write(&path, config.to_toml()).expect("write config");
        let mut replica = Self {
            name: name.to_owned(),
            port,
            config: path,
            log: dir.join(format!("{name}.log")),
            env: env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect(),
            child: None,
            starts: 0,
        };
        replica.spawn();
        replica
    }

    fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new().create(true).append(true).open(&self.log).expect("log file");
        let mut command = tokio::process::Command::new(BIN);
        for key in inherited_overrides() {
            command.env_remove(key);
        }
        command
            .args(["run", "--config", self.config.to_str().expect("utf-8")])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .current_dir(repo_path(""))
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("log file"))
            .stderr(log)
            .kill_on_drop(true);
        self.child = Some(command.spawn().expect("start worker"));
        self.starts += 1;
    }

    /// Starts the process again (after a kill or an exit) with the same config.
    pub fn restart(&mut self) {
        assert!(self.child.is_none(), "{} still runs", self.name);
        self.spawn();
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().and_then(|c| c.id()).expect("running") as i32
    }

    pub fn is_running(&self) -> bool {
        self.child.is_some()
    }

    /// `kill -9`, and reaps it.
    pub async fn kill9(&mut self) {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id().expect("pid") as i32), Signal::SIGKILL).expect("SIGKILL");
        child.wait().await.expect("reap");
    }

    /// SIGTERM, then waits for the exit (at most `limit`).
    pub async fn sigterm(&mut self, limit: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        kill(Pid::from_raw(child.id().expect("pid") as i32), Signal::SIGTERM).expect("SIGTERM");
        tokio::time::timeout(limit, child.wait())
            .await
            .unwrap_or_else(|_| panic!("{} did not exit within {limit:?} of SIGTERM", self.name))
            .expect("wait")
    }

    /// The process has not exited (a crash would fail the scenario here).
    pub fn assert_alive(&mut self) {
        let child = self.child.as_mut().expect("running");
        if let Some(status) = child.try_wait().expect("try_wait") {
            panic!("{} exited ({status}); log:\n{}", self.name, self.log_tail(40));
        }
    }

    pub async fn readyz(&self) -> Option<(u16, serde_json::Value)> {
        readyz(self.port).await
    }

    /// Waits for `/readyz` 200; returns the last answer that was not (what kept it unready).
    pub async fn ready(&self) -> Option<serde_json::Value> {
        let deadline = tokio::time::Instant::now() + LIMIT;
        let mut unready = None;
        loop {
            let answer = self.readyz().await;
            match answer {
                Some((200, _)) => return unready,
                Some((_, ref body)) => unready = Some(body.clone()),
                None => {}
            }
            if tokio::time::Instant::now() > deadline {
                panic!(
                    "{} not ready within {LIMIT:?}; /readyz: {answer:?}\nlog:\n{}",
                    self.name,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn log_tail(&self, lines: usize) -> String {
        let log = self.log();
        let all: Vec<&str> = log.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// The log's JSON records at WARN or ERROR.
    pub fn problems(&self) -> Vec<serde_json::Value> {
        self.log()
            .lines()
            .filter_map(|line| serde_json::from_str::<serde_json::Value>(line).ok())
            .filter(|record| matches!(record["level"].as_str(), Some("WARN" | "ERROR")))
            .collect()
    }
}

/// The single int8 `sql` returns, on a pooled connection.
pub async fn scalar(db: &worker::db::Db, sql: &str) -> i64 {
    db.get().await.expect("conn").fetch_one(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}")).get(0)
}

/// A connected Redis client for checking what the workers wrote.
pub async fn redis_client(url: &str) -> fred::prelude::Client {
    use fred::prelude::{Builder, ClientLike, Config};
    let client = Builder::from_config(Config::from_url(url).expect("redis url")).build().expect("client");
    client.init().await.expect("redis connects");
    client
}

/// What a [`Consumer`] executed.
#[derive(Debug, Default)]
pub struct Executions {
    /// Task id → how many times it ran (a pop that found its payload).
    pub by_task: std::collections::HashMap<String, u32>,
    /// Pops whose payload was already gone, so nothing ran: a re-send wrote the payload and the
    /// member again between this consumer's read and delete of the payload, and the delete took
    /// the re-sent payload with it. Each is a second pop of a task that already ran once.
    pub without_payload: u64,
}

impl Executions {
    /// Tasks `task-1` … `task-n` that never ran.
    pub fn lost(&self, n: i64) -> usize {
        (1..=n).filter(|g| !self.by_task.contains_key(&format!("task-{g}"))).count()
    }

    /// Runs beyond the first, over all tasks.
    pub fn duplicates(&self) -> u64 {
        self.by_task.values().map(|n| u64::from(n.saturating_sub(1))).sum()
    }

    /// Tasks that ran more than once.
    pub fn repeated_tasks(&self) -> usize {
        self.by_task.values().filter(|n| **n > 1).count()
    }

    pub fn most_runs_of_one_task(&self) -> u32 {
        self.by_task.values().copied().max().unwrap_or(0)
    }
}

/// A task consumer as the outbox's delivery contract describes one (docs/outbox.md): pops tasks
/// from `{prefix}:sched:{queue}` with `ZPOPMIN`, reads and deletes their payloads from
/// `{prefix}:payload:{queue}` (`HMGET`, `HDEL`), and records each execution by task id, without
/// deduplicating, so what at-least-once costs a consumer is measured. When every queue is empty
/// it looks again after [`CONSUMER_IDLE`], as a polling consumer does (`BZPOPMIN` would block
/// instead, but fred times a blocking command out on its own clock and fails it). Every task the
/// scenarios enqueue is due at once, so the lowest score is always due.
pub struct Consumer {
    stop: tokio_util::sync::CancellationToken,
    task: tokio::task::JoinHandle<Executions>,
}

/// Tasks popped from one queue at a time.
const CONSUMER_BATCH: usize = 200;
/// The consumer's poll interval while every queue is empty.
const CONSUMER_IDLE: Duration = Duration::from_millis(5);

impl Consumer {
    pub async fn start(redis_url: &str, prefix: &str, queues: &[&str]) -> Self {
        use fred::prelude::{HashesInterface, SortedSetsInterface, Value};

        let client = redis_client(redis_url).await;
        let keys: Vec<(String, String)> = queues
            .iter()
            .map(|q| (worker::redis::key(prefix, "sched", q), worker::redis::key(prefix, "payload", q)))
            .collect();
        let stop = tokio_util::sync::CancellationToken::new();
        let task = tokio::spawn({
            let stop = stop.clone();
            async move {
                let mut executions = Executions::default();
                let run = async |executions: &mut Executions, payload_key: &str, tasks: Vec<String>| {
                    let payloads: Vec<Option<String>> =
                        client.hmget(payload_key, tasks.clone()).await.expect("HMGET");
                    let _: i64 = client.hdel(payload_key, tasks.clone()).await.expect("HDEL");
                    for (task, payload) in tasks.into_iter().zip(payloads) {
                        match payload {
                            Some(_) => *executions.by_task.entry(task).or_default() += 1,
                            None => executions.without_payload += 1,
                        }
                    }
                };
                loop {
                    let mut popped = false;
                    for (sched, payload_key) in &keys {
                        let answer: Value =
                            client.zpopmin(sched, Some(CONSUMER_BATCH)).await.expect("ZPOPMIN");
                        let tasks = popped_members(answer);
                        if !tasks.is_empty() {
                            popped = true;
                            run(&mut executions, payload_key, tasks).await;
                        }
                    }
                    if popped {
                        continue;
                    }
                    if stop.is_cancelled() {
                        return executions;
                    }
                    tokio::time::sleep(CONSUMER_IDLE).await;
                }
            }
        });
        Self { stop, task }
    }

    /// Stops once the queues are empty (within one poll interval) and returns what ran.
    pub async fn stop(self) -> Executions {
        self.stop.cancel();
        self.task.await.expect("the consumer task")
    }
}

/// The members of a `ZPOPMIN key count` answer: a flat `[member, score, …]` (RESP2) or
/// `[[member, score], …]` (RESP3).
fn popped_members(answer: fred::prelude::Value) -> Vec<String> {
    use fred::prelude::Value;
    let Value::Array(items) = answer else { return Vec::new() };
    if items.iter().all(|item| matches!(item, Value::Array(_))) {
        items
            .into_iter()
            .filter_map(|pair| match pair {
                Value::Array(pair) => pair.first().and_then(Value::as_string),
                _ => None,
            })
            .collect()
    } else {
        items.iter().step_by(2).filter_map(Value::as_string).collect()
    }
}

/// The pids whose parent is `parent` (an agent runs as a direct child of its worker).
pub fn children_of(parent: i32) -> Vec<i32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(|stat| {
                // Fields after the command (which may hold spaces and parentheses): state ppid …
                let mut rest = stat.rsplit(')').next().unwrap_or("").split_whitespace();
                let state = rest.next();
                let ppid = rest.next().and_then(|p| p.parse::<i32>().ok());
                state != Some("Z") && ppid == Some(parent)
            })
        })
        .collect()
}

/// Server connections to database `name`, counted from an admin connection (not included).
pub async fn backends(name: &str) -> i64 {
    let admin = worker::db::connect_direct(&common::admin_url(), "worker-chaos").await.expect("admin");
    admin
        .fetch_one(
            "SELECT count(*)::int8 FROM pg_stat_activity WHERE datname = $1 AND pid <> pg_backend_pid()",
            &[(&name, tokio_postgres::types::Type::TEXT)],
        )
        .await
        .expect("pg_stat_activity")
        .get(0)
}

/// `pg_ctlcluster … stop` of the local cluster (the one every test uses), fast mode.
pub fn stop_postgres() {
    pg_ctlcluster(&["stop", "-m", "fast"]);
}

/// `pg_ctlcluster … start` of the local cluster.
pub fn start_postgres() {
    pg_ctlcluster(&["start"]);
}

fn pg_ctlcluster(action: &[&str]) {
    let version = std::fs::read_dir("/etc/postgresql")
        .expect("/etc/postgresql: a Debian PostgreSQL cluster")
        .flatten()
        .filter_map(|e| e.file_name().into_string().ok())
        .max_by_key(|v| v.split('.').map(|p| p.parse::<u32>().unwrap_or(0)).collect::<Vec<_>>())
        .expect("a PostgreSQL version directory");
    let mut command = if nix::unistd::Uid::effective().is_root() {
        std::process::Command::new("pg_ctlcluster")
    } else {
        let mut sudo = std::process::Command::new("sudo");
        sudo.args(["-n", "pg_ctlcluster"]);
        sudo
    };
    let status = command
        .args(["--skip-systemctl-redirect", &version, "main"])
        .args(action)
        .status()
        .expect("run pg_ctlcluster");
    assert!(status.success(), "pg_ctlcluster {action:?}: {status}");
}

/// A redis-server of the scenario's own that can be stopped and started again on the same port
/// with its data (SHUTDOWN SAVE, then a restart that loads the dump).
pub struct StoppableRedis {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<std::process::Child>,
}

impl StoppableRedis {
    pub async fn start() -> Self {
        let mut redis = Self { port: free_port(), dir: tempfile::tempdir().expect("dir"), child: None };
        redis.start_again().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub async fn start_again(&mut self) {
        assert!(self.child.is_none(), "redis already runs");
        let child = std::process::Command::new("redis-server")
            .args([
                "--port",
                &self.port.to_string(),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ])
            .arg("--dir")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed");
        self.child = Some(child);
        let url = self.url();
        common::eventually(LIMIT, "the private redis-server to answer", || async {
            let client =
                fred::prelude::Builder::from_config(fred::prelude::Config::from_url(&url).expect("url"))
                    .build()
                    .expect("client");
            tokio::time::timeout(Duration::from_secs(1), async {
                use fred::prelude::{ClientLike, KeysInterface};
                client.init().await.is_ok() && client.exists::<i64, _>("probe").await.is_ok()
            })
            .await
            .unwrap_or(false)
        })
        .await;
    }

    /// SHUTDOWN SAVE: connections are refused until [`StoppableRedis::start_again`].
    pub fn stop(&mut self) {
        let status = std::process::Command::new("redis-cli")
            .args(["-p", &self.port.to_string(), "shutdown", "save"])
            .stdout(Stdio::null())
            .status()
            .expect("redis-cli");
        assert!(status.success(), "redis-cli shutdown: {status}");
        let mut child = self.child.take().expect("running");
        child.wait().expect("reap redis-server");
    }
}

impl Drop for StoppableRedis {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A TCP proxy in front of an address that can freeze: while frozen it moves no byte either way
/// and answers new connections with silence, and it closes nothing (no RST, no FIN) — a
/// half-open network path. Thawed, it carries on where it stopped.
pub struct FreezingProxy {
    pub port: u16,
    frozen: watch::Sender<bool>,
    connections: Arc<AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl FreezingProxy {
    pub async fn start(upstream: &str) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind proxy");
        let port = listener.local_addr().expect("addr").port();
        let (frozen, _) = watch::channel(false);
        let connections = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_owned();
        let task = tokio::spawn({
            let frozen = frozen.clone();
            let connections = connections.clone();
            async move {
                while let Ok((client, _)) = listener.accept().await {
                    connections.fetch_add(1, Ordering::Relaxed);
                    let upstream = upstream.clone();
                    let frozen = frozen.subscribe();
                    tokio::spawn(async move {
                        wait_thawed(&mut frozen.clone()).await;
                        let Ok(server) = TcpStream::connect(&upstream).await else { return };
                        let (client_read, client_write) = client.into_split();
                        let (server_read, server_write) = server.into_split();
                        tokio::join!(
                            pump(client_read, server_write, frozen.clone()),
                            pump(server_read, client_write, frozen),
                        );
                    });
                }
            }
        });
        Self { port, frozen, connections, task }
    }

    pub fn freeze(&self) {
        self.frozen.send_replace(true);
    }

    pub fn thaw(&self) {
        self.frozen.send_replace(false);
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(Ordering::Relaxed)
    }
}

impl Drop for FreezingProxy {
    fn drop(&mut self) {
        self.task.abort();
    }
}

async fn wait_thawed(frozen: &mut watch::Receiver<bool>) {
    let _ = frozen.wait_for(|frozen| !frozen).await;
}

/// Copies `from` to `to`, holding every byte while frozen (before reading and before writing).
async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    mut frozen: watch::Receiver<bool>,
) {
    let mut buf = vec![0u8; 16 * 1024];
    loop {
        wait_thawed(&mut frozen).await;
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        wait_thawed(&mut frozen).await;
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
    }
    let _ = to.shutdown().await;
}

/// Samples `probe` every `every` until `done` resolves; returns the largest value seen.
pub async fn peak_while<P, PF, D>(every: Duration, mut probe: P, done: D) -> i64
where
    P: FnMut() -> PF,
    PF: Future<Output = i64>,
    D: Future<Output = ()>,
{
    tokio::pin!(done);
    let mut peak = 0;
    loop {
        peak = peak.max(probe().await);
        tokio::select! {
            _ = &mut done => return peak.max(probe().await),
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// A shell script agent in `dir` (see `tests/chats_support` for the protocol).
pub fn agent(dir: &Path, name: &str, body: &str) -> String {
    agent_script(dir, name, "/bin/sh", body)
}

/// Like [`agent`], with another interpreter on the `#!` line (e.g. `/bin/bash` for its builtin
/// `read -t`, a sleep that forks nothing).
pub fn agent_script(dir: &Path, name: &str, interpreter: &str, body: &str) -> String {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!{interpreter}\n{body}\n")).expect("write agent");
    let mut permissions = std::fs::metadata(&path).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&path, permissions).expect("chmod");
    path.to_string_lossy().into_owned()
}

/// The agents of worker `parent`: its live children but the guard process (`worker
/// agent-guard`, one per worker, which is no agent).
pub fn agents_of(parent: i32) -> Vec<i32> {
    children_of(parent)
        .into_iter()
        .filter(|pid| {
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            !String::from_utf8_lossy(&cmdline).contains("agent-guard")
        })
        .collect()
}

impl Replica {
    /// SIGSTOP to the worker process only (its agents, in process groups of their own, run on):
    /// a frozen worker, as a paused VM or a debugger would leave it.
    pub fn sigstop(&self) {
        kill(Pid::from_raw(self.pid()), Signal::SIGSTOP).expect("SIGSTOP");
    }

    pub fn sigcont(&self) {
        kill(Pid::from_raw(self.pid()), Signal::SIGCONT).expect("SIGCONT");
    }
}

/// Now on CLOCK_REALTIME, in ns since the epoch: the clock `date +%s%N` reads, so agents' own
/// records and the test's observations compare directly.
pub fn realtime_ns() -> i64 {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("after the epoch");
    i64::try_from(now.as_nanos()).expect("fits in i64 until 2262")
}

/// Shell text for the first line of an agent script: appends `start <chat_id> <generation>
/// <pid> <realtime_ns>` to `starts` (one `write(2)` with `O_APPEND`, so lines of agents
/// starting together never interleave). See [`AgentWatcher`].
pub fn record_start(starts: &Path) -> String {
    format!("echo \"start $CHAT_ID $CHAT_GENERATION $$ $(date +%s%N)\" >> '{}'", starts.display())
}

/// One agent process as an [`AgentWatcher`] saw it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentLife {
    pub chat_id: String,
    pub generation: i64,
    pub pid: i32,
    /// Its own start record (CLOCK_REALTIME ns), taken first thing in the script.
    pub started_ns: i64,
    /// When the process was gone (CLOCK_REALTIME ns); `None` while it lives.
    pub exited_ns: Option<i64>,
    /// `exited_ns` is when its pidfd became readable (within a poll's latency of the exit);
    /// otherwise the process was already gone (or its pid was another program's) when the start
    /// line was read, and `exited_ns` is that moment: an upper bound.
    pub exit_observed: bool,
}

/// How often the watcher reads the start file (also its longest poll).
const WATCH_EVERY_MS: i32 = 20;

/// Watches the agents of a scenario: reads the start lines (see [`record_start`]) agents append
/// to one file, opens a pidfd on each new pid at once, and records when each becomes readable —
/// the exit of a process that cannot record its own (SIGKILL). One thread; every wait bounded:
/// it stops when asked, or after `limit`, whatever happens.
pub struct AgentWatcher {
    lives: Arc<std::sync::Mutex<Vec<AgentLife>>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl AgentWatcher {
    /// Watches `starts` (it need not exist yet) for agents whose command line contains `program`
    /// (the script's path; anything else under a recorded pid means the pid was reused).
    pub fn start(starts: &Path, program: &str, limit: Duration) -> Self {
        let lives = Arc::new(std::sync::Mutex::new(Vec::new()));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = std::thread::Builder::new()
            .name("agent-watcher".into())
            .spawn({
                let (starts, program) = (starts.to_owned(), program.to_owned());
                let (lives, stop) = (lives.clone(), stop.clone());
                move || watch_agents(&starts, &program, limit, &lives, &stop)
            })
            .expect("start the watcher thread");
        Self { lives, stop, thread: Some(thread) }
    }

    /// What was seen so far, in start-line order.
    pub fn lives(&self) -> Vec<AgentLife> {
        self.lives.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone()
    }

    /// Stops watching (within one poll) and returns what was seen; fails if the watcher failed.
    pub fn finish(mut self) -> Vec<AgentLife> {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take()
            && let Err(panic) = thread.join()
        {
            std::panic::resume_unwind(panic);
        }
        self.lives()
    }
}

impl Drop for AgentWatcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

fn watch_agents(
    starts: &Path,
    program: &str,
    limit: Duration,
    lives: &std::sync::Mutex<Vec<AgentLife>>,
    stop: &std::sync::atomic::AtomicBool,
) {
    use std::io::{Read, Seek, SeekFrom};
    use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

    use nix::libc;

    let deadline = std::time::Instant::now() + limit;
    let mut offset = 0u64;
    let mut unread = Vec::new();
    // Open pidfds and the index of their life.
    let mut watched: Vec<(OwnedFd, usize)> = Vec::new();
    let record = |index: usize, observed: bool| {
        let mut lives = lives.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        lives[index].exited_ns = Some(realtime_ns());
        lives[index].exit_observed = observed;
    };
    while !stop.load(Ordering::Relaxed) && std::time::Instant::now() < deadline {
        if let Ok(mut file) = std::fs::File::open(starts) {
            file.seek(SeekFrom::Start(offset)).expect("seek the start file");
            let read = file.read_to_end(&mut unread).expect("read the start file");
            offset += read as u64;
        }
        // Whole lines only: an agent's line may be half written.
        while let Some(end) = unread.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = unread.drain(..=end).collect();
            let line = String::from_utf8_lossy(&line);
            let fields: Vec<&str> = line.split_whitespace().collect();
            let parsed = match fields[..] {
                ["start", chat, generation, pid, started] => {
                    generation.parse().ok().zip(pid.parse().ok()).zip(started.parse().ok()).map(
                        |((generation, pid), started_ns)| AgentLife {
                            chat_id: chat.to_owned(),
                            generation,
                            pid,
                            started_ns,
                            exited_ns: None,
                            exit_observed: false,
                        },
                    )
                }
                _ => None,
            };
            let life =
                parsed.unwrap_or_else(|| panic!("malformed start line {line:?} in {}", starts.display()));
            let pid = life.pid;
            let index = {
                let mut lives = lives.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
                lives.push(life);
                lives.len() - 1
            };
            // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
            let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
            if fd < 0 {
                let error = std::io::Error::last_os_error();
                assert_eq!(error.raw_os_error(), Some(libc::ESRCH), "pidfd_open({pid}): {error}");
                record(index, false);
                continue;
            }
            // SAFETY: a new fd that nothing else owns.
            let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
            // Checked after the pidfd is open, so the pidfd is of the process checked: a zombie
            // (empty command line) or a reused pid counts as gone now.
            let cmdline = std::fs::read(format!("/proc/{pid}/cmdline")).unwrap_or_default();
            if String::from_utf8_lossy(&cmdline).contains(program) {
                watched.push((fd, index));
            } else {
                record(index, false);
            }
        }
        let mut polled: Vec<libc::pollfd> = watched
            .iter()
            .map(|(fd, _)| libc::pollfd { fd: fd.as_raw_fd(), events: libc::POLLIN, revents: 0 })
            .collect();
        // SAFETY: `polled` is a valid array of `polled.len()` pollfds (with none, a timed sleep).
        let ready = unsafe { libc::poll(polled.as_mut_ptr(), polled.len() as libc::nfds_t, WATCH_EVERY_MS) };
        if ready < 0 {
            let error = std::io::Error::last_os_error();
            assert_eq!(error.raw_os_error(), Some(libc::EINTR), "poll: {error}");
            continue;
        }
        if ready > 0 {
            let exited: Vec<bool> = polled.iter().map(|p| p.revents != 0).collect();
            let mut exited = exited.into_iter();
            watched.retain(|(_, index)| {
                let gone = exited.next().unwrap_or(false);
                if gone {
                    record(*index, true);
                }
                !gone
            });
        }
    }
}

/// A scenario's directory (configs, logs, agent scripts and records): removed at the end, kept
/// (and its path printed) when `WORKER_CHAOS_KEEP` is set, to read the logs of a failure.
pub fn scenario_dir() -> tempfile::TempDir {
    let keep = std::env::var_os("WORKER_CHAOS_KEEP").is_some();
    let dir = tempfile::Builder::new()
        .prefix("worker-chaos-")
        .disable_cleanup(keep)
        .tempdir()
        .expect("scenario dir");
    if keep {
        eprintln!("scenario files kept in {}", dir.path().display());
    }
    dir
}

/// `n` new chats, each made `pending` by a first user message (the producer API); the database
/// must hold no other chat. With `titles`, chat `g` (1-based) gets `titles[g % titles.len()]`.
pub async fn seed_pending_chats(db: &impl Exec, n: i64, titles: &[&str]) {
    let titles: Vec<String> = titles.iter().map(|t| (*t).to_owned()).collect();
    let inserted = db
        .exec(
            "INSERT INTO chats (owner_id, title) \
             SELECT gen_random_uuid(), coalesce(($2::text[])[(g % greatest(cardinality($2::text[]), 1))::int4 + 1], '') \
             FROM generate_series(1, $1::int8) AS g",
            &[(&n, tokio_postgres::types::Type::INT8), (&titles, tokio_postgres::types::Type::TEXT_ARRAY)],
        )
        .await
        .expect("insert chats");
    assert_eq!(inserted, n as u64);
    let posted: i64 = db
        .fetch_one("SELECT count(post_chat_message(id, 'user', '\"hello\"'::jsonb))::int8 FROM chats", &[])
        .await
        .expect("post the first messages")
        .get(0);
    assert_eq!(posted, n, "one user message per chat");
}

/// The replica's worker id, as its `/readyz` shows it.
pub async fn worker_id(replica: &Replica) -> uuid::Uuid {
    replica.ready().await;
    let (_, body) = replica.readyz().await.expect("/readyz answers");
    body["worker_id"]
        .as_str()
        .and_then(|id| id.parse().ok())
        .unwrap_or_else(|| panic!("{}: no worker_id in /readyz: {body}", replica.name))
}
