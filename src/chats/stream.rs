//! Following a chat's visible messages: each exactly once, none missing (the argument:
//! `docs/stream.md`). Used by `worker chat tail --follow`; any other reader of a chat (a websocket
//! relay, say) can use [`Follower`] the same way.
//!
//! # Why this is not just "read everything above the last id"
//!
//! Message ids come from one sequence, so writers can commit out of id order: id 8 can be
//! visible while id 7's transaction is still open. `post_chat_message` (and every writer that
//! publishes a message) notifies `chat_<id>` with `{"after_message_id": id - 1}` in the
//! inserting transaction, so the notification arrives only after the row is committed. The
//! algorithm:
//!
//! 1. LISTEN `chat_<id>` before reading the snapshot: a message committed after the snapshot
//!    is then always notified to us.
//! 2. Read the snapshot (ids above `--after`), deliver it; `delivered` holds what was delivered.
//! 3. On a notification, look up ids above `min(after_message_id, last_delivered)` and deliver
//!    those not in `delivered`. The message that caused the notification has id
//!    `after_message_id + 1` and is committed, so the look-up finds it even when it sits below
//!    ids delivered earlier.
//! 4. On [`ListenEvent::Reconnected`] notifications were lost while the connection was down;
//!    what they announced may lie anywhere above the **floor**, so re-read from there.
//!
//! # The floor (the low-water mark)
//!
//! Invariant: every visible message with id ≤ `floor` has been delivered, and no message with
//! id ≤ `floor` will ever become visible later. `delivered` only holds ids above it, so the
//! floor is what bounds its memory, and it is the one safe place to re-read from after a
//! reconnect. `last_delivered` is not safe: a transaction holding id 7 may commit while the
//! listener is down after 8 was delivered.
//!
//! The floor starts at `--after` and advances by a [`Horizon`] check, with the database as the
//! witness (no process clock involved):
//!
//! - take a mark: `allocated` = the sequence's last value, then `at` = the database clock. Every
//!   id ≤ `allocated` was drawn from the sequence before `at` by a transaction that started
//!   before `at` (a transaction's `xact_start` precedes everything it does);
//! - later, once no client backend of this database has a transaction open that started at or
//!   before `at` (`pg_stat_activity`), and no prepared transaction exists, every id ≤ `allocated`
//!   is committed or gone for good;
//! - then read once more from the floor (this read sees every such commit), deliver what is new,
//!   and move the floor to `allocated`.
//!
//! Nothing here needs transaction ids, which matters: an `INSERT` draws its id (the column
//! default) before the transaction is assigned an xid, so "every xid below the snapshot's xmin
//! has finished" would not cover a writer caught between the two. Sessions whose activity is
//! hidden (another role without `pg_read_all_stats`, `track_activities = off`) show no state and
//! count as open: the floor then stops advancing, which costs memory, never a message. A long
//! transaction anywhere in the database holds the floor back in the same way; the floor catches
//! up when it ends. The check also re-reads the chat, so it is a polling safety net too.
//!
//! Assumes the sequence hands out ids one at a time (`CACHE 1`, the `bigserial` default): with a
//! per-session cache, a session could insert a pre-fetched id below `allocated` after `at`.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio::time::{Interval, MissedTickBehavior};
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::db::{Db, DbError, Exec};
use crate::listen::{ListenEvent, Listener, Subscription};

/// Rows per look-up; a reader catching up on a long chat reads it in pages of this size.
pub const PAGE_SIZE: i64 = 500;
/// How often a follower checks whether the floor can advance (and re-reads the chat as a
/// safety net). Short enough to keep `delivered` small, long enough to cost nothing.
pub const DEFAULT_SETTLE_EVERY: Duration = Duration::from_secs(5);

const VISIBLE_AFTER: &str = "SELECT id, role, content, created_at FROM chat_messages \
     WHERE chat_id = $1 AND id > $2 AND visibility IN ('user', 'both') AND NOT deleted \
     ORDER BY id LIMIT $3";

/// The sequence is read in a materialized CTE so the clock is read after it: the outer
/// projection is computed only once the CTE has produced its row.
const TAKE_HORIZON: &str = "WITH seq AS MATERIALIZED ( \
         SELECT coalesce(pg_sequence_last_value('chat_messages_id_seq'::regclass), 0) AS allocated) \
     SELECT allocated, clock_timestamp() FROM seq";

/// True when every transaction that could hold an id drawn before `$1` has ended. A session
/// without a visible state (hidden by privileges, or activity tracking off) counts as open.
const HORIZON_SETTLED: &str = "SELECT NOT EXISTS ( \
         SELECT 1 FROM pg_stat_activity \
         WHERE datname = current_database() AND backend_type = 'client backend' \
           AND pid <> pg_backend_pid() \
           AND (state IS NULL OR state = 'disabled' OR xact_start <= $1)) \
     AND NOT EXISTS (SELECT 1 FROM pg_prepared_xacts WHERE database = current_database())";

const CHAT_EXISTS: &str = "SELECT 1::int4 FROM chats WHERE id = $1";

/// One visible message, as `chat tail --json` prints it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub id: i64,
    pub role: String,
    pub content: serde_json::Value,
    pub created_at: DateTime<Utc>,
}

impl Message {
    /// The message as text: a JSON string as is, `{"text": …}` by its text (the shapes
    /// `scripts/demo-agent` reads and writes), anything else as compact JSON.
    pub fn text(&self) -> String {
        match &self.content {
            serde_json::Value::String(text) => text.clone(),
            serde_json::Value::Object(map) => match map.get("text") {
                Some(serde_json::Value::String(text)) => text.clone(),
                _ => self.content.to_string(),
            },
            other => other.to_string(),
        }
    }
}

/// The NOTIFY channel of a chat's messages (quoted by the listener: it contains hyphens).
pub fn channel(chat: Uuid) -> String {
    format!("chat_{chat}")
}

/// `after_message_id` of a `chat_<id>` payload; `None` for anything else.
pub fn parse_after(payload: &str) -> Option<i64> {
    #[derive(Deserialize)]
    struct Payload {
        after_message_id: i64,
    }
    serde_json::from_str::<Payload>(payload).ok().map(|p| p.after_message_id)
}

/// What has been delivered, and from where a look-up must start. No I/O: [`Follower`] does the
/// reading; this decides.
#[derive(Debug, Clone)]
pub struct MessageStream {
    /// Every visible id ≤ floor is delivered, and no id ≤ floor can still appear.
    floor: i64,
    /// The highest id delivered (or the starting point).
    last_delivered: i64,
    /// Delivered ids above `floor`.
    delivered: BTreeSet<i64>,
}

impl MessageStream {
    /// A stream that delivers ids above `after` (0: the whole chat).
    pub fn new(after: i64) -> Self {
        Self { floor: after, last_delivered: after, delivered: BTreeSet::new() }
    }

    pub fn floor(&self) -> i64 {
        self.floor
    }

    pub fn last_delivered(&self) -> i64 {
        self.last_delivered
    }

    /// How many delivered ids are remembered (those above the floor).
    pub fn remembered(&self) -> usize {
        self.delivered.len()
    }

    /// Look up ids above this after `event`. A notification for id `a + 1` starts at
    /// `min(a, last_delivered)`; never below the floor, under which nothing new can appear. A
    /// reconnect (notifications were lost) or a payload that cannot be read starts at the floor.
    pub fn look_up_after(&self, event: &ListenEvent) -> i64 {
        match event {
            ListenEvent::Notification(payload) => match parse_after(payload) {
                Some(after) => after.min(self.last_delivered).max(self.floor),
                None => self.floor,
            },
            ListenEvent::Reconnected => self.floor,
        }
    }

    /// Keeps the messages of `batch` not delivered before (in the batch's order) and records
    /// them as delivered.
    pub fn accept(&mut self, batch: Vec<Message>) -> Vec<Message> {
        let fresh: Vec<Message> =
            batch.into_iter().filter(|m| m.id > self.floor && self.delivered.insert(m.id)).collect();
        if let Some(max) = fresh.iter().map(|m| m.id).max() {
            self.last_delivered = self.last_delivered.max(max);
        }
        fresh
    }

    /// Raises the floor to `settled`: the caller has established that every id ≤ `settled` is
    /// committed or gone for good AND has since read (and accepted) everything above the floor.
    /// Forgets the delivered ids below it.
    pub fn settle(&mut self, settled: i64) {
        if settled <= self.floor {
            return;
        }
        self.floor = settled;
        self.delivered = self.delivered.split_off(&(settled + 1));
    }
}

/// A mark for advancing the floor: ids ≤ `allocated` were drawn before `at` (database clock).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Horizon {
    pub allocated: i64,
    pub at: DateTime<Utc>,
}

/// Takes a [`Horizon`] mark now.
pub async fn take_horizon(db: &impl Exec) -> Result<Horizon, DbError> {
    let row = db.fetch_one(TAKE_HORIZON, &[]).await?;
    Ok(Horizon { allocated: row.get(0), at: row.get(1) })
}

/// Whether every id ≤ `horizon.allocated` is now committed or gone for good.
pub async fn horizon_settled(db: &impl Exec, horizon: &Horizon) -> Result<bool, DbError> {
    let row = db.fetch_one(HORIZON_SETTLED, &[(&horizon.at, Type::TIMESTAMPTZ)]).await?;
    Ok(row.get(0))
}

/// Up to `limit` visible messages of `chat` with id > `after`, in id order.
pub async fn visible_after(
    db: &impl Exec,
    chat: Uuid,
    after: i64,
    limit: i64,
) -> Result<Vec<Message>, DbError> {
    let rows = db
        .fetch_all(VISIBLE_AFTER, &[(&chat, Type::UUID), (&after, Type::INT8), (&limit, Type::INT8)])
        .await?;
    Ok(rows
        .iter()
        .map(|r| Message { id: r.get(0), role: r.get(1), content: r.get(2), created_at: r.get(3) })
        .collect())
}

/// Whether the chat exists.
pub async fn chat_exists(db: &impl Exec, chat: Uuid) -> Result<bool, DbError> {
    Ok(db.fetch_opt(CHAT_EXISTS, &[(&chat, Type::UUID)]).await?.is_some())
}

/// Follows one chat: [`Follower::start`] returns the snapshot, then each [`Follower::next`]
/// returns the next messages, every visible message exactly once.
pub struct Follower {
    db: Db,
    chat: Uuid,
    subscription: Subscription,
    stream: MessageStream,
    horizon: Horizon,
    settle: Interval,
}

impl Follower {
    /// Subscribes (LISTEN before the snapshot), then reads the snapshot of ids above `after`.
    /// The listener must be started (or be started by someone else) for this to return.
    pub async fn start(
        db: Db,
        listener: &Listener,
        chat: Uuid,
        after: i64,
        settle_every: Duration,
    ) -> Result<(Self, Vec<Message>), DbError> {
        let subscription = listener.subscribe(&channel(chat)).await;
        // The mark comes before the snapshot read, so the first settle may cover the snapshot.
        let horizon = take_horizon(&db.get().await?).await?;
        let mut settle = tokio::time::interval_at(tokio::time::Instant::now() + settle_every, settle_every);
        settle.set_missed_tick_behavior(MissedTickBehavior::Delay);
        let mut follower =
            Self { db, chat, subscription, stream: MessageStream::new(after), horizon, settle };
        let snapshot = follower.read_from(after).await?;
        Ok((follower, snapshot))
    }

    /// The next messages, possibly none (an event that announced nothing new); `None` once the
    /// listener has stopped. Cancel-safe between events: dropping the future while it waits
    /// loses nothing; dropping it during a read may lose that read's messages, so only drop it
    /// to stop following.
    pub async fn next(&mut self) -> Result<Option<Vec<Message>>, DbError> {
        tokio::select! {
            event = self.subscription.recv() => {
                let Some(event) = event else { return Ok(None) };
                if event == ListenEvent::Reconnected {
                    tracing::info!(chat = %self.chat, floor = self.stream.floor(), "listener reconnected; re-reading from the floor");
                }
                let after = self.stream.look_up_after(&event);
                self.read_from(after).await.map(Some)
            }
            _ = self.settle.tick() => self.settle().await.map(Some),
        }
    }

    /// The decision state, for inspection.
    pub fn stream(&self) -> &MessageStream {
        &self.stream
    }

    /// Advances the floor if the current mark has settled (see the module docs), then takes a
    /// new mark. Returns what the re-read found (normally nothing: notifications delivered it).
    pub async fn settle(&mut self) -> Result<Vec<Message>, DbError> {
        let conn = self.db.get().await?;
        if !horizon_settled(&conn, &self.horizon).await? {
            return Ok(Vec::new());
        }
        drop(conn);
        let found = self.read_from(self.stream.floor()).await?;
        self.stream.settle(self.horizon.allocated);
        self.horizon = take_horizon(&self.db.get().await?).await?;
        Ok(found)
    }

    /// Reads every visible message above `after`, page by page, and keeps the new ones.
    async fn read_from(&mut self, mut after: i64) -> Result<Vec<Message>, DbError> {
        let conn = self.db.get().await?;
        let mut fresh = Vec::new();
        loop {
            let page = visible_after(&conn, self.chat, after, PAGE_SIZE).await?;
            let full = page.len() as i64 == PAGE_SIZE;
            if let Some(last) = page.last() {
                after = last.id;
            }
            fresh.extend(self.stream.accept(page));
            if !full {
                return Ok(fresh);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn message(id: i64) -> Message {
        Message {
            id,
            role: "user".into(),
            content: serde_json::json!("hi"),
            created_at: DateTime::<Utc>::UNIX_EPOCH,
        }
    }

    fn batch(ids: &[i64]) -> Vec<Message> {
        ids.iter().copied().map(message).collect()
    }

    fn ids(messages: &[Message]) -> Vec<i64> {
        messages.iter().map(|m| m.id).collect()
    }

    fn notified(after: i64) -> ListenEvent {
        ListenEvent::Notification(format!("{{\"after_message_id\": {after}}}"))
    }

    #[test]
    fn a_notification_looks_up_from_the_lower_of_its_after_id_and_the_last_delivered() {
        let mut stream = MessageStream::new(0);
        stream.accept(batch(&[3, 5, 8]));
        // 7 committed after 8 was delivered: look below 8.
        assert_eq!(stream.look_up_after(&notified(6)), 6);
        // 12 committed while 9..11 are unknown to us: look from what we have.
        assert_eq!(stream.look_up_after(&notified(11)), 8);
    }

    #[test]
    fn a_look_up_never_starts_below_the_floor() {
        let mut stream = MessageStream::new(10);
        assert_eq!(stream.look_up_after(&notified(4)), 10, "--after 10: nothing at or below 10");
        stream.accept(batch(&[11, 12]));
        stream.settle(20);
        assert_eq!(stream.look_up_after(&notified(15)), 20);
    }

    #[test]
    fn a_reconnect_or_an_unreadable_payload_re_reads_from_the_floor_not_the_last_delivered() {
        let mut stream = MessageStream::new(0);
        stream.accept(batch(&[1, 2, 9]));
        stream.settle(2);
        assert_eq!(stream.look_up_after(&ListenEvent::Reconnected), 2);
        assert_eq!(stream.look_up_after(&ListenEvent::Notification("garbage".into())), 2);
        assert_eq!(
            stream.look_up_after(&ListenEvent::Notification("{\"after_message_id\": \"x\"}".into())),
            2
        );
    }

    #[test]
    fn accept_delivers_each_id_once_whatever_the_order_of_arrival() {
        let mut stream = MessageStream::new(0);
        assert_eq!(ids(&stream.accept(batch(&[1, 2, 4]))), [1, 2, 4]);
        assert_eq!(ids(&stream.accept(batch(&[2, 3, 4, 5]))), [3, 5], "3 committed late");
        assert_eq!(ids(&stream.accept(batch(&[1, 2, 3, 4, 5]))), Vec::<i64>::new());
        assert_eq!(stream.last_delivered(), 5);
    }

    #[test]
    fn accept_ignores_ids_at_or_below_the_floor() {
        let mut stream = MessageStream::new(5);
        assert_eq!(ids(&stream.accept(batch(&[4, 5, 6]))), [6]);
    }

    #[test]
    fn settling_forgets_ids_below_the_floor_and_keeps_the_rest() {
        let mut stream = MessageStream::new(0);
        stream.accept(batch(&[1, 2, 3, 7, 9]));
        stream.settle(7);
        assert_eq!((stream.floor(), stream.remembered()), (7, 1));
        assert_eq!(ids(&stream.accept(batch(&[7, 8, 9]))), [8], "9 is still remembered");
        stream.settle(3);
        assert_eq!(stream.floor(), 7, "the floor never goes down");
        assert_eq!(stream.last_delivered(), 9);
    }

    #[test]
    fn payloads_are_read_from_the_post_chat_message_shape() {
        assert_eq!(parse_after("{\"after_message_id\" : 41}"), Some(41));
        assert_eq!(parse_after("41"), None);
        assert_eq!(channel(Uuid::nil()), "chat_00000000-0000-0000-0000-000000000000");
    }

    #[test]
    fn message_text_reads_strings_and_text_objects() {
        let mut m = message(1);
        assert_eq!(m.text(), "hi");
        m.content = serde_json::json!({"text": "hello"});
        assert_eq!(m.text(), "hello");
        m.content = serde_json::json!({"tool": "ls"});
        assert_eq!(m.text(), "{\"tool\":\"ls\"}");
    }
}
