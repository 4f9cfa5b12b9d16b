//! One LISTEN connection per process, shared by every loop that has a wake channel.
//!
//! LISTEN is session state, so it needs a direct connection (`database.listen_url`), never
//! pgbouncer. When the connection drops, it is re-established with backoff and every loop is
//! woken once, because notifications sent while it was down are lost (polling stays the
//! fallback either way).

use std::time::Duration;

use futures_util::StreamExt;
use tokio::sync::{mpsc, watch};
use tokio_postgres::{AsyncMessage, NoTls};
use tokio_util::sync::CancellationToken;

use crate::health::Health;
use crate::runtime::Wakes;

const MIN_RECONNECT_DELAY: Duration = Duration::from_millis(100);
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(10);
/// `application_name` of the LISTEN connection (visible in `pg_stat_activity`).
pub const APPLICATION_NAME: &str = "worker-listen";

/// Counters a caller can await: connections made and notifications received.
#[derive(Clone)]
pub struct ListenerStats {
    pub connects: watch::Receiver<u64>,
    pub received: watch::Receiver<u64>,
}

/// Starts the listener task for every channel registered in `wakes` so far.
pub fn spawn(url: String, wakes: Wakes, health: Health, shutdown: CancellationToken) -> ListenerStats {
    let (connects_tx, connects) = watch::channel(0);
    let (received_tx, received) = watch::channel(0);
    let channels = wakes.channels();
    tokio::spawn(async move {
        if channels.is_empty() {
            return;
        }
        let mut delay = MIN_RECONNECT_DELAY;
        loop {
            let session = listen_once(&url, &channels, &wakes, &connects_tx, &received_tx, &health);
            let result = tokio::select! {
                result = session => result,
                _ = shutdown.cancelled() => return,
            };
            health.set_listener_connected(false);
            match result {
                Ok(()) => {
                    tracing::warn!("LISTEN connection closed; reconnecting");
                    delay = MIN_RECONNECT_DELAY;
                }
                Err(error) => {
                    tracing::warn!(%error, retry_in_ms = delay.as_millis() as u64, "LISTEN connection failed");
                }
            }
            tokio::select! {
                _ = tokio::time::sleep(delay) => {}
                _ = shutdown.cancelled() => return,
            }
            delay = (delay * 2).min(MAX_RECONNECT_DELAY);
        }
    });
    ListenerStats { connects, received }
}

/// One connection's lifetime: connect, LISTEN, forward notifications until it closes.
async fn listen_once(
    url: &str,
    channels: &[String],
    wakes: &Wakes,
    connects: &watch::Sender<u64>,
    received: &watch::Sender<u64>,
    health: &Health,
) -> Result<(), tokio_postgres::Error> {
    let mut pg: tokio_postgres::Config = url.parse()?;
    pg.application_name(APPLICATION_NAME);
    let (client, mut connection) = pg.connect(NoTls).await?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    let driver = tokio::spawn(async move {
        let mut messages = futures_util::stream::poll_fn(move |cx| connection.poll_message(cx));
        while let Some(message) = messages.next().await {
            match message {
                Ok(AsyncMessage::Notification(n)) => {
                    if tx.send(n.channel().to_owned()).is_err() {
                        break;
                    }
                }
                Ok(_) => {}
                Err(error) => {
                    tracing::debug!(%error, "LISTEN connection error");
                    break;
                }
            }
        }
    });
    let listen_sql: String = channels.iter().map(|c| format!("LISTEN {};", quote_ident(c))).collect();
    let listened = client.batch_execute(&listen_sql).await;
    if let Err(error) = listened {
        driver.abort();
        return Err(error);
    }
    tracing::debug!(channels = ?channels, "listening");
    health.set_listener_connected(true);
    connects.send_modify(|n| *n += 1);
    // Anything notified while we were not listening is lost: let every loop look once.
    wakes.wake_all();
    while let Some(channel) = rx.recv().await {
        wakes.wake(&channel);
        received.send_modify(|n| *n += 1);
    }
    drop(client);
    Ok(())
}

fn quote_ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}
