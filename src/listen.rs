//! One LISTEN connection per process, shared by every loop and stream that needs NOTIFY.
//!
//! LISTEN is session state, so it needs a direct connection (`database.listen_url`), never
//! pgbouncer. Channels are subscribed and unsubscribed at run time (LISTEN/UNLISTEN on the live
//! connection); subscriptions made before [`Listener::start`] are queued, so there is no order
//! to get wrong between creating loops and starting the listener. Two kinds of subscriber:
//!
//! - a wake ([`Listener::wake_on`]): a `Notify` that stores at most one permit, so a burst of
//!   10,000 notifications wakes a busy loop once;
//! - a stream ([`Listener::subscribe`]): every payload, in order, plus
//!   [`ListenEvent::Reconnected`] after the connection was re-established, because
//!   notifications sent while it was down are lost and the subscriber must re-read.
//!
//! When the connection drops it is re-established with backoff, every channel is LISTENed
//! again, every wake fires once and every stream is told. The connection carries `[database]`'s
//! TCP keepalives and `tcp_user_timeout`, so a path that went silent ends it (an idle LISTEN
//! connection would otherwise wait for a notification forever), and opening it is bounded by
//! `connect_timeout`.
//!
//! Whether the connection is known to deliver ([`Delivery`]) is kept here too: the wake probe
//! (`crate::wakes`) reports what it found on the current connection ([`Listener::report_delivery`]),
//! and every drop or (re)connect sets it back to [`Delivery::Unknown`]. Loops with a fallback
//! interval watch it ([`Listener::delivery`]) to know whether they may poll slowly.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio_postgres::AsyncMessage;
use tokio_util::sync::CancellationToken;

use crate::db::{ConnectError, DbError, Direct};
use crate::health::Health;

const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(100);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);
/// `application_name` of the LISTEN connection (visible in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "worker-listen";

/// Whether notifications sent through the pool are known to reach the LISTEN connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Delivery {
    /// A probe's NOTIFY came back on the current connection.
    Delivered,
    /// A probe's NOTIFY did not come back in time (e.g. `listen_url` is a transaction-mode pooler).
    NotDelivered,
    /// No probe on the current connection yet, or the connection is down.
    Unknown,
}

impl Delivery {
    pub fn as_str(self) -> &'static str {
        match self {
            Delivery::Delivered => "delivered",
            Delivery::NotDelivered => "not_delivered",
            Delivery::Unknown => "unknown",
        }
    }
}

/// The delivery verdict and the connection it is about: `connection` counts every drop and
/// (re)connect, so a probe that straddled one cannot vouch for the new connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verdict {
    pub connection: u64,
    pub delivery: Delivery,
}

impl Verdict {
    /// The connection changed (dropped or re-established): nothing is known about it yet.
    fn next_connection(&mut self) {
        self.connection += 1;
        self.delivery = Delivery::Unknown;
    }
}

/// What a stream subscriber receives.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenEvent {
    /// One NOTIFY on the channel, with its payload.
    Notification(String),
    /// The connection was re-established: notifications may have been missed; re-read.
    Reconnected,
}

enum Sink {
    Wake(Arc<Notify>),
    Events(mpsc::UnboundedSender<ListenEvent>),
}

enum Command {
    Subscribe {
        channel: String,
        id: u64,
        sink: Sink,
        ack: Option<oneshot::Sender<()>>,
    },
    /// Notified each time the connection is (re)established, whatever the channels.
    OnConnect(Arc<Notify>),
    Unsubscribe {
        channel: String,
        id: u64,
    },
}

/// Counters a caller can await: connections made and notifications received.
#[derive(Clone)]
pub struct ListenerStats {
    pub connects: watch::Receiver<u64>,
    pub received: watch::Receiver<u64>,
}

/// Handle to the process's LISTEN connection; cheap to clone.
#[derive(Clone)]
pub struct Listener {
    commands: mpsc::UnboundedSender<Command>,
    /// Taken by [`Listener::start`]; commands wait in the channel until then.
    pending: Arc<Mutex<Option<mpsc::UnboundedReceiver<Command>>>>,
    next_id: Arc<AtomicU64>,
    verdict: Arc<watch::Sender<Verdict>>,
}

impl Default for Listener {
    fn default() -> Self {
        let (commands, pending) = mpsc::unbounded_channel();
        let (verdict, _) = watch::channel(Verdict { connection: 0, delivery: Delivery::Unknown });
        Self {
            commands,
            pending: Arc::new(Mutex::new(Some(pending))),
            next_id: Arc::new(AtomicU64::new(0)),
            verdict: Arc::new(verdict),
        }
    }
}

impl Listener {
    /// A wake for `channel`, for the life of the process.
    pub fn wake_on(&self, channel: &str) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let sink = Sink::Wake(notify.clone());
        let _ = self.commands.send(Command::Subscribe { channel: channel.to_owned(), id, sink, ack: None });
        notify
    }

    /// A wake that fires each time the LISTEN connection is established or re-established
    /// (notifications may have been missed, and what was known about delivery may have changed).
    pub fn on_connect(&self) -> Arc<Notify> {
        let notify = Arc::new(Notify::new());
        let _ = self.commands.send(Command::OnConnect(notify.clone()));
        notify
    }

    /// The delivery verdict on the current connection, and every change of it.
    pub fn delivery(&self) -> watch::Receiver<Verdict> {
        self.verdict.subscribe()
    }

    /// Records what a probe found about `connection` (the [`Verdict::connection`] read before
    /// it sent its NOTIFY); ignored when the connection dropped or changed since. Returns whether
    /// it was recorded.
    pub fn report_delivery(&self, connection: u64, delivery: Delivery) -> bool {
        let mut recorded = false;
        self.verdict.send_if_modified(|verdict| {
            recorded = verdict.connection == connection;
            let changed = recorded && verdict.delivery != delivery;
            if changed {
                verdict.delivery = delivery;
            }
            changed
        });
        recorded
    }

    /// Every notification on `channel` from now on. Returns once the channel is LISTENed on a
    /// live connection, so a caller that reads a snapshot after this misses nothing committed
    /// after the snapshot (LISTEN before the snapshot). If the listener stops before that, the
    /// subscription ends at once (`recv` returns `None`).
    pub async fn subscribe(&self, channel: &str) -> Subscription {
        let (events_tx, events) = mpsc::unbounded_channel();
        let (ack, acked) = oneshot::channel();
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let channel = channel.to_owned();
        let command = Command::Subscribe {
            channel: channel.clone(),
            id,
            sink: Sink::Events(events_tx),
            ack: Some(ack),
        };
        let _ = self.commands.send(command);
        let _ = acked.await;
        Subscription { channel, id, events, commands: self.commands.clone() }
    }

    /// Starts the connection task on `target` (`[database]`'s [`DatabaseConfig::listen_direct`],
    /// or a bare URL with the default socket settings) once; later calls return the same kind
    /// of stats but start nothing. Runs until `shutdown`.
    ///
    /// [`DatabaseConfig::listen_direct`]: crate::db::DatabaseConfig::listen_direct
    pub fn start(
        &self,
        target: impl Into<Direct>,
        health: Health,
        shutdown: CancellationToken,
    ) -> ListenerStats {
        let (connects_tx, connects) = watch::channel(0);
        let (received_tx, received) = watch::channel(0);
        let taken = self.pending.lock().unwrap_or_else(|e| e.into_inner()).take();
        if let Some(commands) = taken {
            let task = ListenerTask {
                target: target.into(),
                health,
                commands,
                channels: HashMap::new(),
                on_connect: Vec::new(),
                verdict: self.verdict.clone(),
                connects: connects_tx,
                received: received_tx,
            };
            tokio::spawn(task.run(shutdown));
        }
        ListenerStats { connects, received }
    }
}

/// A stream subscription; UNLISTENs its channel (if no one else listens) when dropped.
pub struct Subscription {
    channel: String,
    id: u64,
    events: mpsc::UnboundedReceiver<ListenEvent>,
    commands: mpsc::UnboundedSender<Command>,
}

impl Subscription {
    /// The next event; `None` once the listener has stopped.
    pub async fn recv(&mut self) -> Option<ListenEvent> {
        self.events.recv().await
    }

    pub fn channel(&self) -> &str {
        &self.channel
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let _ = self.commands.send(Command::Unsubscribe { channel: self.channel.clone(), id: self.id });
    }
}

struct Subscriber {
    id: u64,
    sink: Sink,
}

struct ListenerTask {
    target: Direct,
    health: Health,
    commands: mpsc::UnboundedReceiver<Command>,
    channels: HashMap<String, Vec<Subscriber>>,
    on_connect: Vec<Arc<Notify>>,
    verdict: Arc<watch::Sender<Verdict>>,
    connects: watch::Sender<u64>,
    received: watch::Sender<u64>,
}

/// Acks held until the channel is LISTENed on a live connection.
type Acks = Vec<oneshot::Sender<()>>;

/// What the connection's driver hands on: a notification's channel and payload, or the error
/// that ended the connection.
type Driven = Result<(String, String), tokio_postgres::Error>;

impl ListenerTask {
    async fn run(mut self, shutdown: CancellationToken) {
        let mut delay = MIN_RECONNECT_DELAY;
        let mut acks: Acks = Vec::new();
        loop {
            let connects = *self.connects.borrow();
            // Shutdown first: once the process is stopping, the session can also end because
            // the command senders are being dropped, and that is no reason to warn.
            let result = tokio::select! {
                biased;
                _ = shutdown.cancelled() => return,
                result = self.session(&mut acks) => result,
            };
            if shutdown.is_cancelled() {
                return;
            }
            self.health.set_listener_connected(false);
            // Loops in fallback mode return to their fast interval at once.
            self.verdict.send_modify(Verdict::next_connection);
            // Only failed attempts in a row grow the delay: a connection that was up and then
            // closed or failed (a restart, a silent path noticed) is retried at once.
            if *self.connects.borrow() > connects {
                delay = MIN_RECONNECT_DELAY;
            }
            let retry_in_ms = delay.as_millis() as u64;
            match result {
                Ok(()) => tracing::warn!(retry_in_ms, "LISTEN connection closed; reconnecting"),
                Err(error) => tracing::warn!(%error, retry_in_ms, "LISTEN connection failed"),
            }
            // Keep taking subscriptions while waiting to reconnect; they are LISTENed (and
            // acked) as soon as the connection is back.
            let sleep = tokio::time::sleep(delay);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    _ = shutdown.cancelled() => return,
                    command = self.commands.recv() => match command {
                        Some(command) => { self.apply_offline(command, &mut acks); }
                        None => return,
                    },
                }
            }
            delay = (delay * 2).min(MAX_RECONNECT_DELAY);
        }
    }

    /// One connection's lifetime: connect (bounded by `connect_timeout`), LISTEN every channel,
    /// then serve commands and forward notifications until the connection closes or fails (a
    /// silent path fails it through the socket's keepalives and `tcp_user_timeout`).
    async fn session(&mut self, acks: &mut Acks) -> Result<(), ConnectError> {
        let (client, mut connection) = self.target.open(APPLICATION_NAME).await?;
        let (tx, mut notifications) = mpsc::unbounded_channel();
        let driver = tokio::spawn(async move {
            let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
            while let Some(message) = messages.next().await {
                match message {
                    Ok(AsyncMessage::Notification(n)) => {
                        if tx.send(Ok((n.channel().to_owned(), n.payload().to_owned()))).is_err() {
                            break;
                        }
                    }
                    Ok(_) => {}
                    Err(error) => {
                        // Handed to `serve`, so the reconnect is logged with its cause.
                        let _ = tx.send(Err(error));
                        break;
                    }
                }
            }
        });
        let result = self.serve(&client, &mut notifications, acks).await;
        driver.abort();
        Ok(result.map_err(DbError::from)?)
    }

    async fn serve(
        &mut self,
        client: &tokio_postgres::Client,
        notifications: &mut mpsc::UnboundedReceiver<Driven>,
        acks: &mut Acks,
    ) -> Result<(), tokio_postgres::Error> {
        // Subscriptions queued before this connection (e.g. before `start`) are LISTENed below
        // with the rest and get this connection's wake.
        while let Ok(command) = self.commands.try_recv() {
            self.apply_offline(command, acks);
        }
        let listen_all: String =
            self.channels.keys().map(|c| format!("LISTEN {};", quote_ident(c))).collect();
        if !listen_all.is_empty() {
            client.batch_execute(&listen_all).await?;
        }
        let reconnect = *self.connects.borrow() > 0;
        self.health.set_listener_connected(true);
        // A new connection: unknown until a probe on it comes back (the probe is woken below).
        self.verdict.send_modify(Verdict::next_connection);
        self.connects.send_modify(|n| *n += 1);
        tracing::debug!(channels = self.channels.len(), "listening");
        self.on_connect.iter().for_each(|notify| notify.notify_one());
        // Anything notified while we were not listening is lost: every wake looks once, every
        // stream that was already subscribed re-reads. Streams acked only now need not.
        for subscriber in self.channels.values().flatten() {
            match &subscriber.sink {
                Sink::Wake(notify) => notify.notify_one(),
                Sink::Events(events) if reconnect => {
                    let _ = events.send(ListenEvent::Reconnected);
                }
                Sink::Events(_) => {}
            }
        }
        acks.drain(..).for_each(|ack| {
            let _ = ack.send(());
        });
        loop {
            tokio::select! {
                notification = notifications.recv() => {
                    let Some(notification) = notification else { return Ok(()) };
                    let (channel, payload) = notification?;
                    self.dispatch(&channel, payload);
                    self.received.send_modify(|n| *n += 1);
                }
                command = self.commands.recv() => {
                    let Some(command) = command else { return Ok(()) };
                    self.apply_online(command, client).await?;
                }
            }
        }
    }

    fn dispatch(&mut self, channel: &str, payload: String) {
        let Some(subscribers) = self.channels.get(channel) else { return };
        for subscriber in subscribers {
            match &subscriber.sink {
                Sink::Wake(notify) => notify.notify_one(),
                Sink::Events(events) => {
                    let _ = events.send(ListenEvent::Notification(payload.clone()));
                }
            }
        }
    }

    /// Records the command; returns the SQL to run on a live connection, if any.
    fn record(&mut self, command: Command, acks: &mut Acks) -> Option<String> {
        match command {
            Command::OnConnect(notify) => {
                self.on_connect.push(notify);
                None
            }
            Command::Subscribe { channel, id, sink, ack } => {
                acks.extend(ack);
                let subscribers = self.channels.entry(channel.clone()).or_default();
                subscribers.push(Subscriber { id, sink });
                (subscribers.len() == 1).then(|| format!("LISTEN {}", quote_ident(&channel)))
            }
            Command::Unsubscribe { channel, id } => {
                let subscribers = self.channels.get_mut(&channel)?;
                subscribers.retain(|s| s.id != id);
                if !subscribers.is_empty() {
                    return None;
                }
                self.channels.remove(&channel);
                Some(format!("UNLISTEN {}", quote_ident(&channel)))
            }
        }
    }

    fn apply_offline(&mut self, command: Command, acks: &mut Acks) {
        let _ = self.record(command, acks);
    }

    async fn apply_online(
        &mut self,
        command: Command,
        client: &tokio_postgres::Client,
    ) -> Result<(), tokio_postgres::Error> {
        let mut acks = Vec::new();
        if let Some(sql) = self.record(command, &mut acks) {
            // On failure the state already holds the change: the next connection applies it,
            // and the ack (dropped here) lets the subscriber go on (it will see Reconnected).
            client.batch_execute(&sql).await?;
        }
        acks.into_iter().for_each(|ack| {
            let _ = ack.send(());
        });
        Ok(())
    }
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
