//! Which loops operators paused, read from `loop_controls` at most once per
//! `runtime.controls_refresh` per process (not once per tick per loop: five loops at 200 ms
//! would otherwise cost 25 pooled checkouts a second for a table that changes a few times a year).
//! `worker loop pause|resume` also NOTIFYs [`CHANNEL`] in the same transaction; a notification
//! (or a LISTEN reconnect) makes the next check read again at once, so a pause takes effect on
//! every replica at its next tick, not a refresh later. While the LISTEN connection is known to
//! deliver (the wake probe says so) the cache is read only every
//! `runtime.controls_fallback_refresh` (1 m): the NOTIFY is what announces a change then.

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use futures_util::FutureExt;
use tokio::sync::{Mutex, Notify, watch};
use tokio::time::Instant;

use crate::db::{self, Db, DbError, Exec};
use crate::listen::{Delivery, Verdict};

const PAUSED_LOOPS: &str = "SELECT loop_name FROM loop_controls WHERE paused";
/// NOTIFY channel of changes to `loop_controls`.
pub const CHANNEL: &str = "loop_controls";

/// The paused loop names and when they were read.
type Cached = Option<(Instant, Arc<HashSet<String>>)>;

/// Shared by every runner of a process.
#[derive(Clone)]
pub struct Pauses {
    db: Db,
    refresh: Duration,
    fallback_refresh: Duration,
    /// Whether [`CHANNEL`]'s notifications are known to reach this process.
    delivery: watch::Receiver<Verdict>,
    /// Held across the read, so concurrent runners wait for one query instead of each sending one.
    cached: Arc<Mutex<Cached>>,
    /// A stored permit means `loop_controls` changed since the last read.
    changed: Arc<Notify>,
    reads: Arc<AtomicU64>,
}

impl Pauses {
    /// `changed` is the listener's wake for [`CHANNEL`], `delivery` its verdict watch; the
    /// cache is read every `refresh`, or every `fallback_refresh` while delivery is known.
    pub fn new(
        db: Db,
        (refresh, fallback_refresh): (Duration, Duration),
        changed: Arc<Notify>,
        delivery: watch::Receiver<Verdict>,
    ) -> Self {
        Self {
            db,
            refresh,
            fallback_refresh,
            delivery,
            cached: Arc::default(),
            changed,
            reads: Arc::default(),
        }
    }

    pub async fn is_paused(&self, name: &str) -> Result<bool, DbError> {
        let mut cached = self.cached.lock().await;
        // Taking the permit under the lock: one runner re-reads, every runner sees the result.
        let changed = self.changed.notified().now_or_never().is_some();
        if !changed
            && let Some((at, paused)) = cached.as_ref()
            && at.elapsed() < self.current_refresh()
        {
            return Ok(paused.contains(name));
        }
        let paused = match self.read().await {
            Ok(paused) => Arc::new(paused),
            Err(error) => {
                // The change this read was for is still unread: keep it announced, or a pause
                // would wait for the next refresh (a minute while wakes are delivered).
                if changed {
                    self.changed.notify_one();
                }
                return Err(error);
            }
        };
        *cached = Some((Instant::now(), paused.clone()));
        Ok(paused.contains(name))
    }

    /// The fallback refresh while wakes are known to be delivered (a change NOTIFYs), else the
    /// refresh.
    fn current_refresh(&self) -> Duration {
        if self.delivery.borrow().delivery == Delivery::Delivered {
            self.fallback_refresh.max(self.refresh)
        } else {
            self.refresh
        }
    }

    async fn read(&self) -> Result<HashSet<String>, DbError> {
        self.reads.fetch_add(1, Ordering::Relaxed);
        let rows = db::in_transaction(&self.db, async |tx| tx.fetch_all(PAUSED_LOOPS, &[]).await).await?;
        Ok(rows.iter().map(|r| r.get(0)).collect())
    }

    /// How many times `loop_controls` was read (for tests and the curious).
    pub fn reads(&self) -> u64 {
        self.reads.load(Ordering::Relaxed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::db::DatabaseConfig;

    #[tokio::test]
    async fn a_change_whose_read_failed_is_read_again_at_the_next_check() {
        // Nothing listens on port 1: every read fails at its checkout.
        let config = DatabaseConfig {
            url: "postgres://worker@127.0.0.1:1/none".into(),
            acquire_timeout: Duration::from_millis(500),
            ..DatabaseConfig::default()
        };
        let changed = Arc::new(Notify::new());
        let (_verdicts, delivery) = watch::channel(Verdict { connection: 0, delivery: Delivery::Unknown });
        let refresh = Duration::from_secs(60);
        let pauses =
            Pauses::new(Db::new(&config).expect("pool"), (refresh, refresh), changed.clone(), delivery);
        changed.notify_one();
        assert!(pauses.is_paused("outbox").await.is_err());
        assert!(changed.notified().now_or_never().is_some(), "the change is still announced");
        assert_eq!(pauses.reads(), 1);
    }
}
