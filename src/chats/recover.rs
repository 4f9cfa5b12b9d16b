//! The `chats_recover` loop: running chats of dead workers go back to `pending`.
//!
//! Every `recover_interval`, on every replica (no leader: the statement is safe to run side by
//! side), ONE statement per batch moves running chats whose worker's lease is older than
//! `stale_after` — or whose worker row is gone — to `pending` and clears their worker. Staleness
//! is decided inside the statement, on the database clock, with the worker rows share-locked:
//! a lease renewal in flight makes the statement wait and re-check the renewed row (READ
//! COMMITTED re-evaluates a locked row's conditions), so a worker that renews meanwhile keeps
//! its chats. Chats are taken `FOR UPDATE SKIP LOCKED`, in batches; a full batch ticks again.
//! Worker rows unseen for `workers.retention` are deleted here too.

use std::sync::Arc;
use std::time::Duration;

use tokio_postgres::types::Type;

use super::runner::ChatsContext;
use crate::db::{self, DbError, Exec};
use crate::runtime::{Loop, LoopInfo, Progress, Schedule, Tick};
use crate::workers;

pub const NAME: &str = "chats_recover";

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "chats",
    interval_key: "recover_interval",
    about: "returns running chats of dead workers to pending",
    pausable: true,
};
/// Chats recovered per statement.
pub const BATCH: i64 = 500;

/// `$1` stale_after in seconds, `$2` batch size. Each chat is notified on `chat_pending` like
/// `post_chat_message` does (at commit): every replica's acquire loop wakes, instead of finding it
/// at its next fallback poll (`chats.acquire_fallback_interval`, 10 s while NOTIFY works).
const RECOVER: &str = "WITH stale AS (\
       SELECT c.id FROM chats AS c JOIN workers AS w ON w.id = c.worker_id \
       WHERE c.status = 'running' AND w.last_seen_at < now() - make_interval(secs => $1) \
       ORDER BY c.id LIMIT $2 FOR UPDATE OF c SKIP LOCKED FOR SHARE OF w), \
     orphaned AS (\
       SELECT c.id FROM chats AS c \
       WHERE c.status = 'running' AND NOT EXISTS (SELECT 1 FROM workers AS w WHERE w.id = c.worker_id) \
       ORDER BY c.id LIMIT $2 FOR UPDATE OF c SKIP LOCKED) \
     UPDATE chats AS c SET status = 'pending', worker_id = NULL, updated_at = now() \
     FROM (SELECT id FROM stale UNION SELECT id FROM orphaned) AS r \
     WHERE c.id = r.id AND c.status = 'running' \
     RETURNING c.id, pg_notify('chat_pending', c.id::text) IS NULL";

pub struct Recover {
    pub(super) ctx: Arc<ChatsContext>,
    pub(super) retention: Duration,
}

impl Recover {
    /// One batch; returns how many chats went back to `pending`.
    pub async fn recover(&self) -> Result<u64, DbError> {
        let db = &self.ctx.db;
        let stale_after = self.ctx.config.stale_after.as_secs_f64();
        let rows = db::in_transaction(db, async |tx| {
            tx.fetch_all(RECOVER, &[(&stale_after, Type::FLOAT8), (&BATCH, Type::INT8)]).await
        })
        .await?;
        let recovered = rows.len() as u64;
        if let Some(first) = rows.first() {
            let first: uuid::Uuid = first.get(0);
            tracing::info!(recovered, first_chat_id = %first, "chats of dead workers returned to pending");
        }
        self.ctx.metrics.recovered(recovered);
        Ok(recovered)
    }
}

impl Loop for Recover {
    type Error = DbError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        Schedule::every(self.ctx.config.recover_interval, self.ctx.config.recover_tick_timeout)
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, DbError> {
        let recovered = self.recover().await?;
        tick.record_rows(usize::try_from(recovered).unwrap_or(usize::MAX));
        let reaped = workers::reap(&self.ctx.db, self.retention).await?;
        if reaped > 0 {
            tracing::info!(reaped, "deleted long-dead worker rows");
        }
        // Either half of the union may have been full.
        Ok(if recovered >= BATCH as u64 { Progress::More } else { Progress::Done })
    }
}
