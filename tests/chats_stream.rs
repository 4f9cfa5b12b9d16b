//! Following a chat (`chats::stream`) against a real database: every visible message exactly
//! once when writers commit out of id order, when the LISTEN connection is killed mid-stream,
//! and while the floor (the low-water mark bounding what is remembered) advances.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::TestDb;
use tokio::sync::watch;
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;
use worker::chats::stream::{self, Follower};
use worker::db::Exec;
use worker::health::Health;
use worker::listen::Listener;

/// How long a test waits for a message before failing.
const LIMIT: Duration = Duration::from_secs(15);
/// Long enough that no settle tick fires during a test that settles by hand.
const NEVER: Duration = Duration::from_secs(3600);

/// What a runner does to publish a message (docs/stream.md#the-algorithm): INSERT and notify in one
/// transaction. Unlike `post_chat_message` it does not lock the chat row, so two of these (or one
/// of these and one `post_chat_message`) on one chat can commit out of id order.
const PUBLISH: &str = "WITH m AS (INSERT INTO chat_messages (chat_id, role, content) \
         VALUES ($1, 'assistant', to_jsonb($2::text)) RETURNING id) \
     SELECT id, pg_notify('chat_' || $1::text, json_build_object('after_message_id', id - 1)::text)::text \
     FROM m";

struct Setup {
    test_db: TestDb,
    listener: Listener,
    connects: watch::Receiver<u64>,
    stop: CancellationToken,
    chat: Uuid,
}

impl Drop for Setup {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn setup() -> Setup {
    let test_db = TestDb::new().await;
    let listener = Listener::default();
    let stop = CancellationToken::new();
    let connects = listener.start(test_db.url.clone(), Health::default(), stop.clone()).connects;
    let chat = test_db
        .db
        .get()
        .await
        .expect("conn")
        .fetch_one("INSERT INTO chats (owner_id) VALUES (gen_random_uuid()) RETURNING id", &[])
        .await
        .expect("create chat")
        .get(0);
    Setup { test_db, listener, connects, stop, chat }
}

/// A writer on a connection of its own, so it can hold a transaction open.
struct Writer {
    client: tokio_postgres::Client,
    chat: Uuid,
}

impl Writer {
    async fn new(setup: &Setup) -> Self {
        let client = worker::db::connect_direct(&setup.test_db.url, "test-writer").await.expect("writer");
        Self { client, chat: setup.chat }
    }

    async fn begin(&self) {
        self.client.batch_execute("BEGIN").await.expect("begin");
    }

    async fn commit(&self) {
        self.client.batch_execute("COMMIT").await.expect("commit");
    }

    /// A runner-style publish (in the open transaction, if any); returns the id.
    async fn publish(&self, text: &str) -> i64 {
        let row = self
            .client
            .fetch_one(PUBLISH, &[(&self.chat, Type::UUID), (&text, Type::TEXT)])
            .await
            .expect("publish");
        row.get(0)
    }

    /// `post_chat_message` as the API tier calls it; returns the id.
    async fn post(&self, text: &str) -> i64 {
        let row = self
            .client
            .fetch_one(
                "SELECT post_chat_message($1, 'user', to_jsonb($2::text))",
                &[(&self.chat, Type::UUID), (&text, Type::TEXT)],
            )
            .await
            .expect("post_chat_message");
        row.get(0)
    }
}

/// Every delivery, in the order it happened.
#[derive(Default)]
struct Deliveries(Vec<i64>);

impl Deliveries {
    fn record(&mut self, messages: Vec<stream::Message>) {
        self.0.extend(messages.iter().map(|m| m.id));
    }

    fn contains(&self, id: i64) -> bool {
        self.0.contains(&id)
    }

    /// Reads from `follower` until every id of `wanted` was delivered.
    async fn until(&mut self, follower: &mut Follower, wanted: impl IntoIterator<Item = i64>) {
        let wanted: BTreeSet<i64> = wanted.into_iter().collect();
        while !wanted.iter().all(|id| self.contains(*id)) {
            let next = tokio::time::timeout(LIMIT, follower.next()).await;
            let missing: Vec<i64> = wanted.iter().filter(|id| !self.contains(**id)).copied().collect();
            let next = next.unwrap_or_else(|_| panic!("messages {missing:?} were never delivered"));
            self.record(next.expect("look-up").expect("listener alive"));
        }
    }

    /// Posts a sentinel and reads up to it: anything still to come for the ids before it (a
    /// repeat) has then arrived. Asserts every id of `expected` was delivered exactly once.
    async fn assert_each_exactly_once(&mut self, follower: &mut Follower, writer: &Writer, expected: &[i64]) {
        let sentinel = writer.post("sentinel").await;
        self.until(follower, [sentinel]).await;
        let mut counts: BTreeMap<i64, usize> = BTreeMap::new();
        for id in &self.0 {
            *counts.entry(*id).or_default() += 1;
        }
        let repeated: Vec<_> = counts.iter().filter(|(_, n)| **n > 1).collect();
        assert!(repeated.is_empty(), "delivered more than once (id, times): {repeated:?}");
        let missing: Vec<_> = expected.iter().filter(|id| !counts.contains_key(id)).collect();
        assert!(missing.is_empty(), "never delivered: {missing:?}");
    }
}

async fn terminate_listener(setup: &Setup) {
    assert_eq!(setup.test_db.terminate_listeners().await, 1, "one LISTEN connection");
}

#[tokio::test]
async fn the_snapshot_holds_the_visible_messages_after_the_starting_id() {
    let setup = setup().await;
    let writer = Writer::new(&setup).await;
    let first = writer.post("one").await;
    let second = writer.publish("two").await;
    let conn = setup.test_db.db.get().await.expect("conn");
    conn.exec(
        "INSERT INTO chat_messages (chat_id, role, content, visibility) VALUES ($1, 'system', '\"prompt\"', 'model')",
        &[(&setup.chat, Type::UUID)],
    )
    .await
    .expect("model-only message");
    let deleted = writer.post("deleted").await;
    conn.exec("UPDATE chat_messages SET deleted = true WHERE id = $1", &[(&deleted, Type::INT8)])
        .await
        .expect("delete");
    let third = writer.post("three").await;

    let (_, all) = Follower::start(setup.test_db.db.clone(), &setup.listener, setup.chat, 0, NEVER)
        .await
        .expect("start");
    let ids: Vec<i64> = all.iter().map(|m| m.id).collect();
    assert_eq!(ids, [first, second, third], "visible (user or both), not deleted, in id order");
    assert_eq!(all[0].content, serde_json::json!("one"));
    assert_eq!((all[0].role.as_str(), all[1].role.as_str()), ("user", "assistant"));

    let (_, later) = Follower::start(setup.test_db.db.clone(), &setup.listener, setup.chat, first, NEVER)
        .await
        .expect("start after");
    assert_eq!(later.iter().map(|m| m.id).collect::<Vec<_>>(), [second, third]);
}

#[tokio::test]
async fn two_writers_committing_out_of_id_order_are_each_delivered_exactly_once() {
    let setup = setup().await;
    let (a, b) = (Writer::new(&setup).await, Writer::new(&setup).await);
    let before = a.post("before").await;
    let (mut follower, snapshot) =
        Follower::start(setup.test_db.db.clone(), &setup.listener, setup.chat, 0, NEVER)
            .await
            .expect("start");
    let mut seen = Deliveries::default();
    seen.record(snapshot);
    assert!(seen.contains(before));

    // A holds id n uncommitted (the gate); B takes n + 1 and commits first.
    a.begin().await;
    let n = a.post("held").await;
    let n1 = b.publish("overtakes").await;
    assert_eq!(n1, n + 1);
    seen.until(&mut follower, [n1]).await;
    assert!(!seen.contains(n), "an uncommitted message was delivered");

    // A commits: its notification says after n - 1, below what was delivered (n + 1).
    a.commit().await;
    seen.until(&mut follower, [n]).await;
    seen.assert_each_exactly_once(&mut follower, &b, &[before, n, n1]).await;
}

#[tokio::test]
async fn messages_committed_while_the_listen_connection_is_down_are_delivered_once_after_it_returns() {
    let setup = setup().await;
    let (a, b) = (Writer::new(&setup).await, Writer::new(&setup).await);
    let (mut follower, _) = Follower::start(setup.test_db.db.clone(), &setup.listener, setup.chat, 0, NEVER)
        .await
        .expect("start");
    let mut seen = Deliveries::default();
    let mut expected = Vec::new();

    // The floor moves past what settled: nothing was open when the stream started.
    let early = b.post("early").await;
    seen.until(&mut follower, [early]).await;
    seen.record(follower.settle().await.expect("settle"));
    expected.push(early);

    // A holds n; B's n + 1 is delivered; the floor cannot pass n while A is open.
    a.begin().await;
    let n = a.publish("held across the outage").await;
    let n1 = b.publish("overtakes").await;
    seen.until(&mut follower, [n1]).await;
    seen.record(follower.settle().await.expect("settle"));
    seen.record(follower.settle().await.expect("settle"));
    assert!(follower.stream().floor() < n, "floor {} passed the open id {n}", follower.stream().floor());
    expected.extend([n, n1]);

    // The LISTEN backend dies; A commits and B posts while it is down (the listener waits
    // before reconnecting): those notifications are lost, the reconnect re-reads from the floor.
    terminate_listener(&setup).await;
    a.commit().await;
    for i in 0..5 {
        expected.push(b.post(&format!("during the outage {i}")).await);
    }
    seen.until(&mut follower, expected.iter().copied()).await;

    // Now everything up to the last mark is settled: the floor passes n and forgets below it.
    seen.record(follower.settle().await.expect("settle"));
    seen.record(follower.settle().await.expect("settle"));
    assert!(follower.stream().floor() >= n, "floor {} stuck below {n}", follower.stream().floor());

    // A second outage re-reads from the new floor: still no repeats.
    terminate_listener(&setup).await;
    for i in 0..3 {
        expected.push(b.publish(&format!("second outage {i}")).await);
    }
    seen.until(&mut follower, expected.iter().copied()).await;
    seen.assert_each_exactly_once(&mut follower, &b, &expected).await;
}

#[tokio::test]
async fn the_horizon_settles_only_once_every_transaction_that_could_hold_an_id_below_it_has_ended() {
    let setup = setup().await;
    let (a, b) = (Writer::new(&setup).await, Writer::new(&setup).await);
    let conn = setup.test_db.db.get().await.expect("conn");
    let before = stream::take_horizon(&conn).await.expect("mark");
    a.begin().await;
    let held = a.publish("held").await;
    let during = stream::take_horizon(&conn).await.expect("mark");
    assert!(during.allocated >= held);

    assert!(stream::horizon_settled(&conn, &before).await.expect("check"), "A began after the first mark");
    assert!(!stream::horizon_settled(&conn, &during).await.expect("check"), "A may still commit {held}");
    b.post("others do not matter").await;
    assert!(!stream::horizon_settled(&conn, &during).await.expect("check"));
    a.commit().await;
    assert!(stream::horizon_settled(&conn, &during).await.expect("check"));

    // A transaction open since before the mark holds it even with no id drawn: the check sees
    // when transactions began, not what they drew. Conservative: it only delays the floor.
    a.begin().await;
    a.client.batch_execute("SELECT 1").await.expect("in a transaction");
    let mark = stream::take_horizon(&conn).await.expect("mark");
    assert!(!stream::horizon_settled(&conn, &mark).await.expect("check"));
    a.commit().await;
    assert!(stream::horizon_settled(&conn, &mark).await.expect("check"));
}

#[tokio::test]
async fn concurrent_writers_and_two_listener_outages_deliver_every_message_exactly_once() {
    let setup = setup().await;
    // A short settle interval: the floor advances (and prunes) while messages keep coming.
    let (mut follower, _) =
        Follower::start(setup.test_db.db.clone(), &setup.listener, setup.chat, 0, Duration::from_millis(20))
            .await
            .expect("start");
    let writers = futures_util::future::join_all((0..4).map(|_| Writer::new(&setup))).await;
    let (published_tx, published) = watch::channel(0usize);

    // Four writers, each publishing in transactions of three messages, so commits interleave
    // out of id order, while the reader runs and the LISTEN backend is killed twice.
    let writing = futures_util::future::join_all(writers.iter().enumerate().map(|(w, writer)| {
        let published_tx = published_tx.clone();
        async move {
            let mut ids = Vec::new();
            for round in 0..10 {
                writer.begin().await;
                for k in 0..3 {
                    ids.push(writer.publish(&format!("w{w} r{round} k{k}")).await);
                }
                writer.commit().await;
                published_tx.send_modify(|n| *n += 3);
            }
            ids
        }
    }));
    let outages = async {
        let (mut published, mut connects) = (published.clone(), setup.connects.clone());
        for (after, connected) in [(30, 1), (80, 2)] {
            published.wait_for(|n| *n >= after).await.expect("writers alive");
            tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= connected))
                .await
                .expect("listener connected")
                .expect("listener alive");
            terminate_listener(&setup).await;
        }
    };
    let mut seen = Deliveries::default();
    let reading = async {
        while seen.0.len() < 120 {
            let next = tokio::time::timeout(LIMIT, follower.next()).await;
            let next = next.unwrap_or_else(|_| panic!("stalled after {} messages", seen.0.len()));
            seen.record(next.expect("look-up").expect("listener alive"));
        }
    };
    let (written, (), ()) = tokio::join!(writing, outages, reading);
    let expected: Vec<i64> = written.into_iter().flatten().collect();
    assert_eq!(expected.len(), 120);
    seen.assert_each_exactly_once(&mut follower, &writers[0], &expected).await;
    // Once the writers are idle, two settles move the floor past everything: nothing is
    // remembered any more.
    seen.record(follower.settle().await.expect("settle"));
    seen.record(follower.settle().await.expect("settle"));
    assert!(follower.stream().floor() >= expected.iter().copied().max().unwrap_or(0));
    assert_eq!(follower.stream().remembered(), 0);
    let mut connects = setup.connects.clone();
    tokio::time::timeout(LIMIT, connects.wait_for(|n| *n >= 3))
        .await
        .expect("the listener came back after both outages")
        .expect("listener alive");
}
