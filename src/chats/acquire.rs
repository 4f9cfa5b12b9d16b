//! The `chats_acquire` loop: claims pending chats for this worker and starts their runners.
//!
//! Every second, and at once on NOTIFY `chat_pending`: claim up to
//! `min(max_per_acquire, max_running - running)` pending, non-archived chats, oldest first,
//! `FOR UPDATE SKIP LOCKED` (replicas claim side by side, never the same chat), setting
//! `running`, `worker_id = me`, `generation = generation + 1` (the fencing token every later
//! write checks). Then one runner per chat in the runtime's supervisor. Nothing is claimed while
//! this worker's lease is not healthy (another replica may be recovering its chats) or while it
//! shuts down.
//!
//! Claim and registration happen under the ownership lock the heartbeat also takes, so a
//! heartbeat never sees a chat that is ours in the database but not yet registered here (it
//! would hand it back) or the reverse.

use std::sync::Arc;

use tokio_postgres::types::Type;

use super::runner::{self, ChatsContext, Claimed, Runners};
use crate::db::{self, DbError, Exec};
use crate::runtime::{Loop, LoopInfo, Progress, Schedule, StartError, Tick};

pub const NAME: &str = "chats_acquire";

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "chats",
    interval_key: "acquire_interval",
    about: "claims pending chats and starts their runners",
    pausable: true,
};
/// NOTIFY channel of `post_chat_message` when a chat becomes pending.
pub const WAKE_CHANNEL: &str = "chat_pending";

/// The claim (public for `benches/chats.rs`, which measures it on its own).
pub const CLAIM: &str = "WITH picked AS (\
       SELECT id FROM chats WHERE status = 'pending' AND NOT archived \
       ORDER BY created_at, id LIMIT $2 FOR UPDATE SKIP LOCKED) \
     UPDATE chats AS c SET status = 'running', worker_id = $1, generation = c.generation + 1, \
       started_at = now(), updated_at = now(), last_error = NULL \
     FROM picked WHERE c.id = picked.id \
     RETURNING c.id, c.generation, c.owner_id, c.workspace_id, c.title";

pub struct Acquire {
    pub(super) ctx: Arc<ChatsContext>,
    pub(super) runners: Runners,
    pub(super) ownership: Arc<tokio::sync::Mutex<()>>,
    /// Test support: see [`Acquire::gated_after_claim`].
    #[cfg(feature = "test-support")]
    pub(super) after_claim: Option<Arc<tokio::sync::Semaphore>>,
}

/// How many chats to claim now: what the batch allows and what capacity is left.
pub fn claim_limit(max_per_acquire: u32, max_running: u32, running: usize) -> u32 {
    let running = u32::try_from(running).unwrap_or(u32::MAX);
    max_per_acquire.min(max_running.saturating_sub(running))
}

impl Acquire {
    /// For tests that force an interleaving: each tick waits for a permit of `gate` between
    /// committing its claim and registering the runners (still holding the ownership lock).
    #[cfg(feature = "test-support")]
    #[must_use]
    pub fn gated_after_claim(mut self, gate: Arc<tokio::sync::Semaphore>) -> Self {
        self.after_claim = Some(gate);
        self
    }

    async fn claim(&self, conn: &mut db::Conn, limit: u32) -> Result<Vec<Claimed>, DbError> {
        let tx = db::begin(conn, self.ctx.db.statement_timeout()).await?;
        let limit = i64::from(limit);
        let rows = tx.fetch_all(CLAIM, &[(&self.ctx.worker_id, Type::UUID), (&limit, Type::INT8)]).await?;
        db::commit(tx).await?;
        Ok(rows
            .iter()
            .map(|r| Claimed {
                id: r.get(0),
                generation: r.get(1),
                owner_id: r.get(2),
                workspace_id: r.get(3),
                title: r.get(4),
            })
            .collect())
    }

    /// Starts the runner of a claimed chat; a chat that cannot start here goes back to pending.
    async fn start(&self, chat: Claimed) -> Result<(), DbError> {
        let (id, generation) = (chat.id, chat.generation);
        let ctx = self.ctx.clone();
        let started = self.runners.start(id, generation, move |signal| runner::run(ctx, chat, signal));
        let reason = match started {
            Ok(()) => return Ok(()),
            // An earlier turn of this chat is still winding down here (interrupted, not yet
            // gone): the next acquisition, on any worker, will run it.
            Err(StartError::AlreadyRunning) => "an earlier turn is still stopping",
            Err(StartError::ShuttingDown) => "shutting down",
        };
        tracing::info!(chat_id = %id, generation, reason, "claimed chat not started; returning it");
        let worker_id = self.ctx.worker_id;
        db::in_transaction(&self.ctx.db, async |tx| {
            tx.exec(
                runner::RELEASE,
                &[(&id, Type::UUID), (&worker_id, Type::UUID), (&generation, Type::INT8)],
            )
            .await
        })
        .await?;
        Ok(())
    }
}

impl Loop for Acquire {
    type Error = DbError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        Schedule::every(self.ctx.config.acquire_interval, self.ctx.config.acquire_tick_timeout)
            .woken_by(WAKE_CHANNEL)
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, DbError> {
        if tick.shutdown().is_cancelled() {
            return Ok(Progress::Done);
        }
        if !self.ctx.lease.current().is_healthy() {
            tracing::debug!("lease not healthy; acquiring nothing");
            return Ok(Progress::Done);
        }
        let config = &self.ctx.config;
        if claim_limit(config.max_per_acquire, config.max_running, self.runners.len()) == 0 {
            return Ok(Progress::Done);
        }
        // The connection first: a pool busy with runner writes must not hold the ownership lock
        // (which the heartbeat takes) while this waits for one.
        let mut conn = self.ctx.db.get().await?;
        let _ownership = self.ownership.lock().await;
        let limit = claim_limit(config.max_per_acquire, config.max_running, self.runners.len());
        if limit == 0 {
            return Ok(Progress::Done);
        }
        let claimed = self.claim(&mut conn, limit).await?;
        drop(conn);
        #[cfg(feature = "test-support")]
        if let Some(gate) = &self.after_claim {
            // Tests hold the claim here, committed but not yet registered.
            gate.acquire().await.map(|permit| permit.forget()).ok();
        }
        let n = claimed.len();
        self.ctx.metrics.acquired(n as u64);
        for chat in claimed {
            self.start(chat).await?;
        }
        if n > 0 {
            tracing::debug!(claimed = n, running = self.runners.len(), "chats acquired");
        }
        // A full claim with room left: more may be pending.
        let room_left = claim_limit(config.max_per_acquire, config.max_running, self.runners.len()) > 0;
        Ok(if n as u32 == limit && room_left { Progress::More } else { Progress::Done })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_claim_is_bounded_by_the_batch_and_by_the_room_left() {
        assert_eq!(claim_limit(5, 10, 0), 5);
        assert_eq!(claim_limit(5, 10, 8), 2);
        assert_eq!(claim_limit(5, 10, 10), 0);
        assert_eq!(claim_limit(5, 10, 12), 0, "over capacity claims nothing");
    }
}
