//! The chats schema (migrations/V3): `post_chat_message` inserts, notifies subscribers and wakes
//! the acquire loops; the CHECKs keep status and ownership consistent.

mod common;

use std::time::Duration;

use common::TestDb;
use futures_util::StreamExt;
use tokio::sync::mpsc;
use tokio_postgres::types::Type;
use tokio_postgres::{AsyncMessage, NoTls};
use uuid::Uuid;
use worker::db::{Conn, Exec};

/// How long a test waits for a notification before failing.
const NOTIFY_WAIT: Duration = Duration::from_secs(5);
/// Channel notified after the statements under test, see [`drain`].
const MARKER: &str = "test_marker";

/// A direct connection LISTENing on `channels`; its notifications arrive as (channel, payload).
/// `connect_direct` drops notifications, so this drives the connection itself.
async fn listen(
    url: &str,
    channels: &[&str],
) -> (tokio_postgres::Client, mpsc::UnboundedReceiver<(String, String)>) {
    let pg: tokio_postgres::Config = url.parse().expect("url");
    let (client, mut connection) = pg.connect(NoTls).await.expect("listen connection");
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(Ok(message)) = messages.next().await {
            if let AsyncMessage::Notification(n) = message
                && tx.send((n.channel().to_owned(), n.payload().to_owned())).is_err()
            {
                break;
            }
        }
    });
    let sql: String = channels.iter().chain(&[MARKER]).map(|c| format!("LISTEN \"{c}\";")).collect();
    client.batch_execute(&sql).await.expect("LISTEN");
    (client, rx)
}

/// Every notification sent so far: a marker is notified last and waited for, so the ones before
/// it (delivered in order on one connection) have all arrived.
async fn drain(
    client: &tokio_postgres::Client,
    rx: &mut mpsc::UnboundedReceiver<(String, String)>,
) -> Vec<(String, String)> {
    client.batch_execute(&format!("NOTIFY {MARKER}")).await.expect("marker");
    let mut seen = Vec::new();
    loop {
        let next = tokio::time::timeout(NOTIFY_WAIT, rx.recv()).await;
        let (channel, payload) =
            next.expect("no marker notification: LISTEN connection stalled").expect("open");
        if channel == MARKER {
            return seen;
        }
        seen.push((channel, payload));
    }
}

/// A chat in `status`; a running one is owned by a made-up worker (the CHECK requires an owner).
async fn new_chat(conn: &Conn, status: &str) -> Uuid {
    let owner = Uuid::new_v4();
    let worker = (status == "running").then(Uuid::new_v4);
    let row = conn
        .fetch_one(
            "INSERT INTO chats (owner_id, status, worker_id) VALUES ($1, $2, $3) RETURNING id",
            &[(&owner, Type::UUID), (&status, Type::TEXT), (&worker, Type::UUID)],
        )
        .await
        .expect("insert chat");
    row.get(0)
}

async fn post(
    conn: &Conn,
    chat: Uuid,
    role: &str,
    content: serde_json::Value,
) -> Result<i64, worker::db::DbError> {
    let row = conn
        .fetch_one(
            "SELECT post_chat_message($1, $2, $3)",
            &[(&chat, Type::UUID), (&role, Type::TEXT), (&content, Type::JSONB)],
        )
        .await?;
    Ok(row.get(0))
}

async fn status_of(conn: &Conn, chat: Uuid) -> String {
    conn.fetch_one("SELECT status FROM chats WHERE id = $1", &[(&chat, Type::UUID)])
        .await
        .expect("status")
        .get(0)
}

#[tokio::test]
async fn post_chat_message_inserts_and_notifies_the_chat_channel_with_the_id_before_it() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let chat = new_chat(&conn, "running").await;
    let channel = format!("chat_{chat}");
    let (listener, mut rx) = listen(&test_db.url, &[&channel, "chat_pending"]).await;

    let content = serde_json::json!({"text": "hello", "parts": [1, 2]});
    let id = post(&conn, chat, "assistant", content.clone()).await.expect("post");

    let row = conn
        .fetch_one(
            "SELECT chat_id, role, content, visibility, deleted FROM chat_messages WHERE id = $1",
            &[(&id, Type::INT8)],
        )
        .await
        .expect("message row");
    assert_eq!(row.get::<_, Uuid>(0), chat);
    assert_eq!(row.get::<_, String>(1), "assistant");
    assert_eq!(row.get::<_, serde_json::Value>(2), content);
    assert_eq!(row.get::<_, String>(3), "both");
    assert!(!row.get::<_, bool>(4));

    let notified = drain(&listener, &mut rx).await;
    assert_eq!(notified.len(), 1, "one notification on the chat channel: {notified:?}");
    assert_eq!(notified[0].0, channel);
    let payload: serde_json::Value = serde_json::from_str(&notified[0].1).expect("payload is JSON");
    assert_eq!(payload, serde_json::json!({"after_message_id": id - 1}));
    assert_eq!(status_of(&conn, chat).await, "running", "a running chat stays running");
}

#[tokio::test]
async fn a_user_message_on_a_waiting_chat_makes_it_pending_and_wakes_acquire() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let chat = new_chat(&conn, "waiting").await;
    let (listener, mut rx) = listen(&test_db.url, &[&format!("chat_{chat}"), "chat_pending"]).await;

    post(&conn, chat, "user", serde_json::json!("please help")).await.expect("post");

    assert_eq!(status_of(&conn, chat).await, "pending");
    let notified = drain(&listener, &mut rx).await;
    assert!(
        notified.contains(&("chat_pending".to_owned(), chat.to_string())),
        "chat_pending carries the chat id: {notified:?}"
    );
}

#[tokio::test]
async fn an_assistant_message_on_a_waiting_chat_changes_nothing_and_wakes_nobody() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let chat = new_chat(&conn, "waiting").await;
    let (listener, mut rx) = listen(&test_db.url, &["chat_pending"]).await;

    post(&conn, chat, "assistant", serde_json::json!("hi")).await.expect("post");

    assert_eq!(status_of(&conn, chat).await, "waiting");
    assert_eq!(drain(&listener, &mut rx).await, Vec::new(), "no chat_pending notification");
}

#[tokio::test]
async fn posting_to_an_unknown_chat_fails_with_a_clear_error() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let missing = Uuid::new_v4();
    let error = post(&conn, missing, "user", serde_json::json!("hello")).await.expect_err("must fail");
    let message = error.server_message().unwrap_or_default().to_owned();
    assert!(message.contains("does not exist") && message.contains(&missing.to_string()), "{error:?}");
    let count: i64 = conn.fetch_one("SELECT count(*) FROM chat_messages", &[]).await.expect("count").get(0);
    assert_eq!(count, 0);
}

#[tokio::test]
async fn the_checks_reject_an_unknown_status_and_running_without_a_worker() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let owner = Uuid::new_v4();
    let worker = Uuid::new_v4();
    let insert = "INSERT INTO chats (owner_id, status, worker_id) VALUES ($1, $2, $3)";
    let cases: [(&str, Option<Uuid>, bool); 5] = [
        ("sleeping", None, false),
        ("running", None, false),
        ("pending", Some(worker), false),
        ("running", Some(worker), true),
        ("pending", None, true),
    ];
    for (status, worker_id, accepted) in cases {
        let result =
            conn.exec(insert, &[(&owner, Type::UUID), (&status, Type::TEXT), (&worker_id, Type::UUID)]).await;
        match (result, accepted) {
            (Ok(_), true) => {}
            (Err(e), false) => {
                assert_eq!(e.code(), Some("23514"), "check violation for {status}: {e:?}")
            }
            (result, _) => panic!(
                "status {status} with worker {worker_id:?}: expected accepted={accepted}, got {result:?}"
            ),
        }
    }
    let bad_role = post(&conn, new_chat(&conn, "waiting").await, "robot", serde_json::json!("x")).await;
    assert_eq!(bad_role.expect_err("role check").code(), Some("23514"));
}

#[tokio::test]
async fn chat_liveness_shows_the_owners_lease_as_the_heartbeat() {
    let test_db = TestDb::new().await;
    let conn = test_db.db.get().await.expect("conn");
    let worker = Uuid::new_v4();
    conn.exec(
        "INSERT INTO workers (id, hostname, version, last_seen_at) VALUES ($1, 'h', 'v', now() - interval '1 minute')",
        &[(&worker, Type::UUID)],
    )
    .await
    .expect("worker");
    let owner = Uuid::new_v4();
    let running: Uuid = conn
        .fetch_one(
            "INSERT INTO chats (owner_id, status, worker_id, generation) VALUES ($1, 'running', $2, 4) RETURNING id",
            &[(&owner, Type::UUID), (&worker, Type::UUID)],
        )
        .await
        .expect("chat")
        .get(0);
    let idle = new_chat(&conn, "waiting").await;

    let row = conn
        .fetch_one(
            "SELECT status, worker_id, generation, \
                    extract(epoch FROM now() - heartbeat_at)::float8 \
             FROM chat_liveness WHERE chat_id = $1",
            &[(&running, Type::UUID)],
        )
        .await
        .expect("liveness");
    assert_eq!(row.get::<_, String>(0), "running");
    assert_eq!(row.get::<_, Option<Uuid>>(1), Some(worker));
    assert_eq!(row.get::<_, i64>(2), 4);
    let age: f64 = row.get(3);
    assert!((59.0..120.0).contains(&age), "heartbeat_at is the owner's last_seen_at ({age}s ago)");

    let heartbeat: Option<f64> = conn
        .fetch_one(
            "SELECT extract(epoch FROM heartbeat_at)::float8 FROM chat_liveness WHERE chat_id = $1",
            &[(&idle, Type::UUID)],
        )
        .await
        .expect("idle liveness")
        .get(0);
    assert_eq!(heartbeat, None, "a chat nobody owns has no heartbeat");
}
