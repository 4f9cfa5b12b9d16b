//! Fixtures for the chat loop tests: agents as small shell scripts, a worker's chat loops on a
//! runtime of their own, chats in given states, and waits on the database.
#![allow(dead_code)] // each test binary uses a different subset

use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::chats::{ChatLoops, ChatsConfig, RunnerConfig};
use worker::db::{Db, Exec};
use worker::health::Health;
use worker::identity::WorkerIdentity;
use worker::runtime::Runtime;
use worker::runtime::RuntimeConfig;
use worker::workers::{WorkerLease, WorkersConfig};

use crate::common::{self, TestDb};

pub const LIMIT: Duration = Duration::from_secs(30);

/// Writes an executable `#!/bin/sh` agent into `dir`.
pub fn agent(dir: &Path, name: &str, body: &str) -> Vec<String> {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n")).expect("write agent");
    let mut permissions = std::fs::metadata(&path).expect("stat").permissions();
    std::os::unix::fs::PermissionsExt::set_mode(&mut permissions, 0o755);
    std::fs::set_permissions(&path, permissions).expect("chmod");
    vec![path.to_string_lossy().into_owned()]
}

/// A `[chats]` config for tests: fast acquire, the given agent, short grace.
pub fn config(command: Vec<String>) -> ChatsConfig {
    ChatsConfig {
        enabled: true,
        acquire_interval: Duration::from_millis(20),
        runner: RunnerConfig { command, kill_grace: Duration::from_secs(2), ..RunnerConfig::default() },
        ..ChatsConfig::default()
    }
}

/// One worker: its runtime (own pool), registered lease row and chat loops.
pub struct Worker {
    pub rt: Runtime,
    pub chats: ChatLoops,
    pub id: Uuid,
    pub db: Db,
}

impl Worker {
    pub async fn start(db: Db, config: ChatsConfig) -> Self {
        Self::start_with_meter(db, config, opentelemetry::global::meter("chats-tests")).await
    }

    /// As [`Worker::start`], its instruments registered on `meter` (e.g. a `MetricsProbe`'s).
    pub async fn start_with_meter(db: Db, config: ChatsConfig, meter: opentelemetry::metrics::Meter) -> Self {
        let me = WorkerIdentity::generate();
        let settings =
            RuntimeConfig { jitter: 0.0, controls_refresh: Duration::ZERO, ..RuntimeConfig::default() };
        let rt = Runtime::for_worker(db.clone(), Health::default(), &meter, settings, me.clone());
        WorkerLease::new(db.clone(), me.clone(), WorkersConfig::default())
            .publishing_to(rt.lease_publisher())
            .register()
            .await
            .expect("register");
        let chats = ChatLoops::new(&rt, config, &meter, std::path::Path::new(env!("CARGO_BIN_EXE_worker")))
            .await
            .expect("agent configured");
        Self { rt, chats, id: me.id, db }
    }

    /// The lease loop this worker's heartbeat renews, publishing to its runtime.
    pub fn lease(&self) -> WorkerLease {
        let me = WorkerIdentity { id: self.id, hostname: "test".into(), version: "test".into() };
        WorkerLease::new(self.db.clone(), me, WorkersConfig::default())
            .publishing_to(self.rt.lease_publisher())
    }

    /// Acquire, heartbeat and recovery ticking in the background until `stop`.
    pub fn run_loops(&self) {
        self.rt.spawn(self.chats.acquire());
        self.rt.spawn(self.chats.heartbeat(self.lease()));
        self.rt.spawn(self.chats.recover(Duration::from_secs(3600)));
    }

    pub async fn stop(&self) {
        self.rt.begin_shutdown();
        tokio::time::timeout(LIMIT, self.rt.drained()).await.expect("runners and loops stopped");
    }
}

pub async fn exec(db: &Db, sql: &str) {
    db.get().await.expect("conn").exec(sql, &[]).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// The single int8 a query returns.
pub async fn exec_count(db: &Db, sql: &str) -> i64 {
    db.get().await.expect("conn").fetch_one(sql, &[]).await.expect(sql).get(0)
}

/// Runs DDL (several statements; the simple protocol, which only DDL may use).
pub async fn ddl(db: &Db, sql: &str) {
    db.get().await.expect("conn").batch_execute(sql).await.unwrap_or_else(|e| panic!("{sql}: {e}"));
}

/// A new chat with one user message: `pending`.
pub async fn pending_chat(db: &Db, text: &str) -> Uuid {
    let conn = db.get().await.expect("conn");
    let id: Uuid = conn
        .fetch_one("INSERT INTO chats (owner_id) VALUES (gen_random_uuid()) RETURNING id", &[])
        .await
        .expect("insert chat")
        .get(0);
    let content = serde_json::json!(text);
    conn.fetch_one("SELECT post_chat_message($1, 'user', $2)", &[(&id, Type::UUID), (&content, Type::JSONB)])
        .await
        .expect("post");
    id
}

#[derive(Debug, Clone, PartialEq)]
pub struct ChatRow {
    pub status: String,
    pub worker_id: Option<Uuid>,
    pub generation: i64,
    pub last_error: Option<String>,
    pub title: String,
}

pub async fn chat(db: &Db, id: Uuid) -> ChatRow {
    let row = db
        .get()
        .await
        .expect("conn")
        .fetch_one(
            "SELECT status, worker_id, generation, last_error, title FROM chats WHERE id = $1",
            &[(&id, Type::UUID)],
        )
        .await
        .expect("chat");
    ChatRow {
        status: row.get(0),
        worker_id: row.get(1),
        generation: row.get(2),
        last_error: row.get(3),
        title: row.get(4),
    }
}

/// Waits until the chat's status is `status`.
pub async fn wait_status(db: &Db, id: Uuid, status: &str) -> ChatRow {
    common::eventually(LIMIT, &format!("chat {id} to be {status}"), || async {
        chat(db, id).await.status == status
    })
    .await;
    chat(db, id).await
}

/// Contents of the chat's messages of `role`, in id order.
pub async fn messages(db: &Db, id: Uuid, role: &str) -> Vec<serde_json::Value> {
    db.get()
        .await
        .expect("conn")
        .fetch_all(
            "SELECT content FROM chat_messages WHERE chat_id = $1 AND role = $2 ORDER BY id",
            &[(&id, Type::UUID), (&role, Type::TEXT)],
        )
        .await
        .expect("messages")
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Whether a process is alive (not gone, not a zombie nobody reaped).
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => stat.rsplit(')').next().is_some_and(|rest| !rest.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// Waits for a file the agent writes (e.g. its pid) and returns its trimmed contents.
pub async fn read_when_written(path: &PathBuf) -> String {
    common::eventually(LIMIT, &format!("{} to be written", path.display()), || async {
        std::fs::read_to_string(path).is_ok_and(|s| s.ends_with('\n'))
    })
    .await;
    std::fs::read_to_string(path).expect("read").trim().to_owned()
}

pub fn test_db_url(test_db: &TestDb) -> &str {
    &test_db.url
}

/// Processes of process group `pgid`, zombies included: `(pid, zombie)`.
pub fn group_members(pgid: i32) -> Vec<(i32, bool)> {
    let mut members = Vec::new();
    for entry in std::fs::read_dir("/proc").expect("read /proc").flatten() {
        let Ok(stat) = std::fs::read_to_string(entry.path().join("stat")) else { continue };
        // "pid (comm) state ppid pgrp ...": comm may contain anything, so split after its ')'.
        let Some((head, rest)) = stat.rsplit_once(')') else { continue };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        let (Some(state), Some(pgrp)) = (fields.first(), fields.get(2)) else { continue };
        if *pgrp != pgid.to_string() {
            continue;
        }
        let Some(pid) = head.split_whitespace().next().and_then(|pid| pid.parse::<i32>().ok()) else {
            continue;
        };
        members.push((pid, *state == "Z"));
    }
    members
}

/// A direct connection LISTENing on one channel: the payloads of its notifications, in order.
pub struct Notifications {
    payloads: tokio::sync::mpsc::UnboundedReceiver<String>,
    _client: tokio_postgres::Client,
}

impl Notifications {
    /// Returns once the LISTEN is in place.
    pub async fn listen(test_db: &TestDb, channel: &str) -> Self {
        use futures_util::StreamExt as _;
        let (client, mut connection) =
            tokio_postgres::connect(&test_db.url, tokio_postgres::NoTls).await.expect("listen connection");
        let (sender, payloads) = tokio::sync::mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(Ok(message)) = messages.next().await {
                if let tokio_postgres::AsyncMessage::Notification(n) = message {
                    let _ = sender.send(n.payload().to_owned());
                }
            }
        });
        client.batch_execute(&format!("LISTEN {channel}")).await.expect("LISTEN");
        Self { payloads, _client: client }
    }

    /// Waits (up to [`LIMIT`]) for a notification whose payload is `payload`, skipping others.
    pub async fn expect(&mut self, payload: &str) {
        let found = tokio::time::timeout(LIMIT, async {
            while let Some(received) = self.payloads.recv().await {
                if received == payload {
                    return true;
                }
            }
            false
        })
        .await;
        assert_eq!(found, Ok(true), "no notification {payload:?} within {LIMIT:?}");
    }
}
