//! The `chats_heartbeat` loop: this worker's lease, and the reconciliation of what runs here with
//! what the database says this worker owns.
//!
//! Per tick, whatever the number of chats:
//! 1. ONE write: `UPDATE workers SET last_seen_at = now() WHERE id = me` (the lease; 0 rows:
//!    this worker was reaped as dead → every runner stops, the row is registered again).
//! 2. ONE read: `SELECT id, generation FROM chats WHERE worker_id = me AND status = 'running'`,
//!    streamed row by row into the set difference (see [`OWNED`]).
//! 3. The set difference, both ways: a runner whose chat is missing from the read (or has
//!    another generation) is interrupted (stolen, canceled, finished elsewhere); a chat in the
//!    read with no runner here is released to `pending`, fenced by its generation (a runner that
//!    died without settling its chat, a claim whose runner never started).
//! 4. One batched statement bumps the `last_used_at` of the workspaces of the chats that are
//!    ours and running, selected through the same partial index as the read (no ids are
//!    shipped), and only where it is older than [`WORKSPACE_ACTIVITY_GRANULARITY`] — so a
//!    workspace row is rewritten about once a minute, not on every heartbeat.
//!
//! Steps 2–4 are one transaction, after the lease's own: a failure there never costs the lease.
//! All of it runs on the lease's database handle ([`WorkerLease::db`]: a one-connection pool of
//! its own in the daemon), never on the pool the runners write through.
//!
//! Why not `UPDATE chats SET heartbeat_at = now() … RETURNING id` over every chat: at 100k
//! chats that rewrites 100k rows each interval (WAL, bloat, vacuum) — see BENCHMARKS.md. Readers
//! get each chat's heartbeat from the view `chat_liveness` (the owner's `last_seen_at`).
//!
//! After a successful renewal the lease guard's deadline moves to the renewal's start +
//! `stale_after - LEASE_MARGIN` ([`super::guard`]): if this worker freezes, the guard kills its
//! agents before anyone may recover their chats.
//!
//! A failed heartbeat interrupts nothing by itself; runners stop themselves once `stale_after -
//! kill_grace - LEASE_MARGIN` has passed since the start of the last successful renewal (see
//! [`super::runner`]), and acquisition stops at once. A failed or timed-out heartbeat is retried
//! at the next interval (no backoff), and the loop cannot be paused.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::TryStreamExt;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::guard::GuardError;
use super::runner::{ChatsContext, InterruptCause, Runners};
use crate::db::{self, DbError, Exec};
use crate::runtime::{Loop, LoopError, LoopInfo, Progress, Schedule, Tick};
use crate::workers::WorkerLease;

pub const NAME: &str = "chats_heartbeat";

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "chats",
    interval_key: "heartbeat_interval",
    about: "the lease row plus the set difference of running and owned chats (chats enabled)",
    // Paused, the lease would lapse and every agent of the fleet be killed.
    pausable: false,
};

/// How fresh `workspaces.last_used_at` is kept for workspaces in use.
pub const WORKSPACE_ACTIVITY_GRANULARITY: Duration = Duration::from_secs(60);

/// The chats this worker owns, streamed (see [`Exec::fetch_stream`]): at 100k chats the result
/// is 100k small rows fed one at a time to the [`OwnershipDiff`], never one 2–3 MB value that the
/// pooled connection's read buffer would grow to and keep.
const OWNED: &str = "SELECT id, generation FROM chats WHERE worker_id = $1 AND status = 'running'";
/// Owned here but not running here: back to the queue, fenced by (id, generation), and
/// notified on `chat_pending` like every other way back to it.
const RELEASE_UNREGISTERED: &str = "UPDATE chats AS c \
     SET status = 'pending', worker_id = NULL, updated_at = now() \
     FROM unnest($2::uuid[], $3::int8[]) AS u(id, generation) \
     WHERE c.id = u.id AND c.generation = u.generation AND c.worker_id = $1 AND c.status = 'running' \
     RETURNING pg_notify('chat_pending', c.id::text) IS NULL";
const TOUCH_WORKSPACES: &str = "UPDATE workspaces SET last_used_at = now() WHERE id IN (\
       SELECT workspace_id FROM chats WHERE worker_id = $1 AND status = 'running' AND workspace_id IS NOT NULL) \
     AND (last_used_at IS NULL OR last_used_at < now() - make_interval(secs => $2))";

pub struct Heartbeat {
    pub(super) ctx: Arc<ChatsContext>,
    pub(super) runners: Runners,
    pub(super) ownership: Arc<tokio::sync::Mutex<()>>,
    pub(super) lease: WorkerLease,
}

/// What the set difference decided.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciliation {
    /// Running here, not ours (or not this generation) in the database.
    pub interrupt: Vec<Uuid>,
    /// Ours in the database, not running here: (id, generation) to release.
    pub release: Vec<(Uuid, i64)>,
}

/// The set difference of the heartbeat, both ways (pure), fed the owned chats one at a time.
pub struct OwnershipDiff {
    /// What runs here and was not matched yet: what is left at the end runs here without being
    /// ours.
    registered: HashMap<Uuid, i64>,
    owned: usize,
    result: Reconciliation,
}

impl OwnershipDiff {
    pub fn new(registered: HashMap<Uuid, i64>) -> Self {
        Self { registered, owned: 0, result: Reconciliation::default() }
    }

    /// One chat the database says this worker owns.
    pub fn owned(&mut self, id: Uuid, generation: i64) {
        self.owned += 1;
        match self.registered.remove(&id) {
            Some(running) if running == generation => {}
            // Running here under another generation: the chat moved on without us.
            Some(_) => self.result.interrupt.push(id),
            None => self.result.release.push((id, generation)),
        }
    }

    /// The decision, and how many chats were owned.
    pub fn finish(self) -> (Reconciliation, usize) {
        let mut result = self.result;
        result.interrupt.extend(self.registered.into_keys());
        result.interrupt.sort_unstable();
        result.release.sort_unstable();
        (result, self.owned)
    }
}

/// Why a heartbeat failed.
#[derive(Debug, thiserror::Error)]
pub enum HeartbeatError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error(transparent)]
    Guard(#[from] GuardError),
}

impl From<tokio_postgres::Error> for HeartbeatError {
    fn from(error: tokio_postgres::Error) -> Self {
        HeartbeatError::Db(error.into())
    }
}

impl LoopError for HeartbeatError {
    fn metric_label(&self) -> &'static str {
        match self {
            HeartbeatError::Db(error) => error.metric_label(),
            HeartbeatError::Guard(_) => "guard",
        }
    }

    fn is_transient(&self) -> bool {
        match self {
            HeartbeatError::Db(error) => error.is_transient(),
            HeartbeatError::Guard(_) => true,
        }
    }
}

/// What one heartbeat did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct HeartbeatReport {
    pub owned: usize,
    pub interrupted: usize,
    pub released: u64,
}

impl Heartbeat {
    /// One heartbeat (see the module doc).
    pub async fn beat(&self) -> Result<HeartbeatReport, HeartbeatError> {
        let started = Instant::now();
        let before = self.ctx.lease.current();
        let epoch = before.epoch;
        if before.renewed_at.is_some_and(|renewed_at| {
            tokio::time::Instant::now() >= renewed_at + self.ctx.config.guard_budget()
        }) {
            // This worker stalled past its lease (frozen, starved): its chats may run elsewhere
            // by now, whatever this renewal finds. Its runners have stopped, or stop now.
            self.runners.stop_all(InterruptCause::Lease);
        }
        self.lease.renew().await?;
        let lease = self.ctx.lease.current();
        if lease.epoch != epoch {
            // Reaped: everything that ran under the old registration may run elsewhere now.
            self.runners.stop_all(InterruptCause::Lease);
        }
        if let Some(renewed_at) = lease.renewed_at {
            self.ctx.guard.extend(renewed_at + self.ctx.config.guard_budget()).await?;
        }

        let worker = self.ctx.worker_id;
        // The lease's own connection (a one-connection pool in the daemon) for the rest of the
        // beat too: however busy the shared pool is with runner writes, no part of the
        // heartbeat waits for it, so renewals stay one interval apart.
        let db = self.lease.db();
        let mut conn = db.get().await?;
        let granularity = WORKSPACE_ACTIVITY_GRANULARITY.as_secs_f64();
        let report = {
            // Under the ownership lock no claim is between its commit and its registration.
            let _ownership = self.ownership.lock().await;
            let tx = db::begin(&mut conn, db.tx_limits()).await?;
            // The registry is read first (the rows are streamed into it). A runner that settles
            // its own chat while the rows stream is then counted as interrupted: harmless (it is
            // past waiting for its signal), and a release is still safe, since nothing registers
            // under the ownership lock.
            let mut diff = OwnershipDiff::new(self.runners.snapshot());
            let mut rows = std::pin::pin!(tx.fetch_stream(OWNED, &[(&worker, Type::UUID)]).await?);
            while let Some(row) = rows.try_next().await? {
                diff.owned(row.try_get(0)?, row.try_get(1)?);
            }
            let (decided, owned) = diff.finish();
            let released = if decided.release.is_empty() {
                0
            } else {
                let (ids, generations): (Vec<Uuid>, Vec<i64>) = decided.release.iter().copied().unzip();
                tx.exec(
                    RELEASE_UNREGISTERED,
                    &[(&worker, Type::UUID), (&ids, Type::UUID_ARRAY), (&generations, Type::INT8_ARRAY)],
                )
                .await?
            };
            tx.exec(TOUCH_WORKSPACES, &[(&worker, Type::UUID), (&granularity, Type::FLOAT8)]).await?;
            db::commit(tx).await?;
            for id in &decided.interrupt {
                self.runners.stop(id, InterruptCause::Stolen);
            }
            HeartbeatReport { owned, interrupted: decided.interrupt.len(), released }
        };
        self.ctx.metrics.released(report.released);
        self.ctx.metrics.heartbeat(started.elapsed().as_secs_f64());
        if report.interrupted > 0 || report.released > 0 {
            tracing::info!(
                owned = report.owned,
                interrupted = report.interrupted,
                released = report.released,
                "heartbeat reconciled chat ownership"
            );
        }
        Ok(report)
    }
}

impl Loop for Heartbeat {
    type Error = HeartbeatError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        // A heartbeat still running when the next is due has failed its purpose. A late
        // renewal eats the margin `stale_after` keeps (see `ChatsConfig::min_stale_after`), so
        // no backoff after a failure or a timeout, and no pause (a paused lease kills every
        // agent of the fleet).
        let interval = self.ctx.config.heartbeat_interval;
        Schedule::every(interval, interval).without_backoff().unpausable()
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, HeartbeatError> {
        let report = self.beat().await?;
        tick.record_rows(report.owned);
        Ok(Progress::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_set_difference_interrupts_strangers_and_releases_orphans() {
        let [a, b, c, d] = [Uuid::from_u128(1), Uuid::from_u128(2), Uuid::from_u128(3), Uuid::from_u128(4)];
        // a: ours and running; b: running here but stolen; c: running here, re-acquired
        // elsewhere and back to us under a newer generation; d: ours but not running here.
        let registered = HashMap::from([(a, 1), (b, 1), (c, 1)]);
        let owned = [(a, 1), (c, 2), (d, 5)];
        let mut diff = OwnershipDiff::new(registered);
        owned.into_iter().for_each(|(id, generation)| diff.owned(id, generation));
        let (decided, n) = diff.finish();
        assert_eq!(decided.interrupt, vec![b, c]);
        assert_eq!(decided.release, vec![(d, 5)]);
        assert_eq!(n, 3);
    }

    #[test]
    fn nothing_to_do_when_both_sides_agree() {
        let a = Uuid::from_u128(1);
        let mut diff = OwnershipDiff::new(HashMap::from([(a, 3)]));
        diff.owned(a, 3);
        assert_eq!(diff.finish(), (Reconciliation::default(), 1));
    }
}
