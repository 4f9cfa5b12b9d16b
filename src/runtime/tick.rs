//! What a tick receives: the database, its deadline, the shutdown signal, who this worker is,
//! the lease state and, for leader-only loops, the transaction that holds the leader lock.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use opentelemetry::KeyValue;

use super::lease::{LeaseState, LeaseWatch};
use crate::db::{self, Db, DbError, Snapshot, Transaction};
use crate::identity::WorkerIdentity;
use crate::telemetry::traces;

/// Passed to every tick.
pub struct Tick<'a> {
    pub(super) db: Db,
    pub(super) deadline: Instant,
    pub(super) shutdown: CancellationToken,
    pub(super) worker: Arc<WorkerIdentity>,
    pub(super) lease: LeaseWatch,
    pub(super) leader: Option<&'a Transaction<'a>>,
}

impl<'a> Tick<'a> {
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// When the runner drops this tick's future (its `tick_timeout` from the start).
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// Time left before the deadline.
    pub fn remaining(&self) -> Duration {
        self.deadline.saturating_duration_since(Instant::now())
    }

    /// A budget for one outside call (Redis, HTTP) that leaves the tick time to record what the
    /// call did: at most `cap`, and at most half of what is left.
    pub fn budget(&self, cap: Duration) -> Duration {
        cap.min(self.remaining() / 2)
    }

    /// Fires when shutdown starts. A tick that waits on something long should select on it
    /// and finish cleanly (its work is either done or left as it was).
    pub fn shutdown(&self) -> &CancellationToken {
        &self.shutdown
    }

    pub fn worker(&self) -> &WorkerIdentity {
        &self.worker
    }

    /// This worker's lease as the lease loop last saw it.
    pub fn lease(&self) -> LeaseState {
        self.lease.current()
    }

    /// Records on the tick's span (with traces on) how many rows this tick handled: claimed,
    /// refreshed, recovered, deleted… whatever the loop's unit of work is.
    pub fn record_rows(&self, rows: usize) {
        if traces::enabled() {
            opentelemetry::trace::get_active_span(|span| {
                span.set_attribute(KeyValue::new("rows", i64::try_from(rows).unwrap_or(i64::MAX)));
            });
        }
    }

    /// For leader-only loops: the READ COMMITTED transaction that holds the leader lock. Work
    /// done in it commits with the tick and is fenced by the lock.
    pub fn leader_tx(&self) -> Option<&'a Transaction<'a>> {
        self.leader
    }

    /// One REPEATABLE READ, read-only snapshot on a connection of its own. In a leader-only
    /// loop it is taken after the lock is held (a snapshot taken by the lock statement itself
    /// could predate the previous leader's last commit, and a reconciler would act twice on the
    /// same state). The loop ends it when it is done reading ([`Snapshot::finish`]), so it
    /// holds no connection while the loop fans out its writes: a reconciler then uses at most
    /// its fan-out + the lock's connection.
    pub async fn snapshot(&self) -> Result<Snapshot, DbError> {
        db::begin_snapshot(&self.db).await
    }

    /// A tick outside any runner, for tests and benchmarks that drive `tick` directly: a fresh
    /// identity, no shutdown, a healthy lease, an hour until the deadline.
    #[cfg(feature = "test-support")]
    pub fn detached(db: &Db) -> Tick<'static> {
        Tick {
            db: db.clone(),
            deadline: Instant::now() + Duration::from_secs(3600),
            shutdown: CancellationToken::new(),
            worker: Arc::new(WorkerIdentity::generate()),
            lease: super::lease::LeasePublisher::default().watch(),
            leader: None,
        }
    }
}
