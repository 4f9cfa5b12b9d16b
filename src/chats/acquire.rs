//! The `chats_acquire` loop: claims pending chats for this worker and starts their runners.
//!
//! Every second (every `chats.acquire_fallback_interval` while `chat_pending` wakes are known to
//! be delivered), at once on NOTIFY `chat_pending`, and at once when one of this worker's turns
//! ends (a slot is free): claim up to
//! `min(max_per_acquire, max_running - running)` pending, non-archived chats in the order and
//! within the caps of [`admission`](super::admission) (one short transaction: the claim lock,
//! then one statement), setting `running`, `worker_id = me`, `generation = generation + 1` (the
//! fencing token every later write checks). Then one runner per chat in the runtime's
//! supervisor. Nothing is claimed while this worker's lease is not healthy (another replica may
//! be recovering its chats) or while it shuts down.
//!
//! Every [`CENSUS_EVERY`], the tick also counts the pending chats and the oldest wait for the
//! `chats.pending` gauges (the same numbers on every replica: dashboards take the max).
//!
//! Claim and registration happen under the ownership lock the heartbeat also takes, so a
//! heartbeat never sees a chat that is ours in the database but not yet registered here (it
//! would hand it back) or the reverse.

use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio_postgres::types::Type;

use super::admission::{self, Rules};
use super::runner::{self, ChatsContext, Claimed, Runners};
use crate::db::{self, DbError, Exec};
use crate::runtime::{LeaseState, Loop, LoopInfo, Progress, Schedule, StartError, Tick};

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

/// How often the acquire tick counts the pending chats for the gauges: half the default
/// `telemetry.export_interval` (60 s), so every export sees a fresh count, at one transaction per
/// 30 s on an idle replica.
pub const CENSUS_EVERY: Duration = Duration::from_secs(30);

/// Pending chats and the oldest wait in seconds (0 when none waits).
const CENSUS: &str = "SELECT count(*)::int8, \
       coalesce(extract(epoch FROM now() - min(pending_since)), 0)::float8 \
     FROM chats WHERE status = 'pending' AND NOT archived";

pub struct Acquire {
    pub(super) ctx: Arc<ChatsContext>,
    pub(super) last_census: std::sync::Mutex<Option<Instant>>,
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
        let tx = db::begin(conn, self.ctx.db.tx_limits()).await?;
        let admitted = admission::claim(&tx, self.ctx.worker_id, limit, Rules::of(&self.ctx.config)).await?;
        db::commit(tx).await?;
        let metrics = &self.ctx.metrics;
        metrics.capped("owner_cap", admitted.owners_capped);
        metrics.capped("org_cap", admitted.orgs_capped);
        Ok(admitted
            .chats
            .into_iter()
            .map(|(chat, waited)| {
                metrics.admitted(waited);
                chat
            })
            .collect())
    }

    /// The pending census for the gauges, when [`CENSUS_EVERY`] has passed since the last one.
    async fn census_if_due(&self) -> Result<(), DbError> {
        {
            let mut last = self.last_census.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            if last.is_some_and(|at| at.elapsed() < CENSUS_EVERY) {
                return Ok(());
            }
            *last = Some(Instant::now());
        }
        let row = db::in_transaction(&self.ctx.db, async |tx| tx.fetch_one(CENSUS, &[]).await).await?;
        self.ctx.metrics.set_pending(row.get(0), row.get(1));
        Ok(())
    }

    /// Starts the runner of a chat claimed under `lease`; a chat that cannot start here goes
    /// back to pending.
    async fn start(&self, chat: Claimed, lease: LeaseState) -> Result<(), DbError> {
        let (id, generation) = (chat.id, chat.generation);
        let ctx = self.ctx.clone();
        // The tick's span (with traces on): the turn's parent.
        let parent = opentelemetry::Context::current();
        let started =
            self.runners.start(id, generation, move |signal| runner::run(ctx, chat, lease, signal, parent));
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
            .woken_by_with_fallback(WAKE_CHANNEL, self.ctx.config.acquire_fallback_interval())
            // A turn that ends frees a slot: claim into it now, not up to an interval later.
            .woken_locally_by(self.runners.ended())
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, DbError> {
        if tick.shutdown().is_cancelled() {
            return Ok(Progress::Done);
        }
        self.census_if_due().await?;
        // The lease the claim is made under: its runners stop at that renewal + the agents'
        // budget unless a later renewal extends it in time (`runner::lease_watchdog`).
        let lease = self.ctx.lease.current();
        if !lease.may_start_work(tokio::time::Instant::now(), self.ctx.config.agent_budget()) {
            tracing::debug!(status = ?lease.status, "lease not healthy, or not renewed within the agents' budget; acquiring nothing");
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
        tick.record_rows(n);
        self.ctx.metrics.acquired(n as u64);
        for chat in claimed {
            self.start(chat, lease).await?;
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
