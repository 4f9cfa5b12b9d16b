//! The `workers` loop: this process's lease row.
//!
//! Every replica registers a row in `workers` and renews `last_seen_at = now()` each tick: one
//! write per interval, whatever else the process does. Other loops judge liveness from this row
//! with the database clock, so replicas with skewed clocks cannot declare each other dead.
//! Rows unseen for `workers.retention` are deleted in small batches.
//!
//! With chats enabled this loop does not run: the chat heartbeat ([`crate::chats::heartbeat`])
//! is the one loop that writes the lease (through [`WorkerLease::renew`]) and chat recovery
//! reaps the dead rows, so there is still one lease row and one writer of it.

use std::time::Duration;

use opentelemetry::metrics::{Histogram, Meter};
use tokio_postgres::types::Type;

use crate::db::{self, Db, DbError, Exec};
use crate::identity::WorkerIdentity;
use crate::runtime::{LeasePublisher, Loop, LoopInfo, Progress, Schedule, Tick};

mod config;

pub use config::WorkersConfig;

pub const NAME: &str = "workers";

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "workers",
    interval_key: "interval",
    about: "this worker's lease row in `workers` (when chats are disabled)",
    pausable: true,
};

/// Registers (or re-registers after being reaped) this worker.
const REGISTER: &str = "INSERT INTO workers (id, hostname, version) VALUES ($1, $2, $3) \
     ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), hostname = EXCLUDED.hostname, version = EXCLUDED.version";
/// The renewal, returning how old the lease was just before it (seconds, on the database clock):
/// the previous `last_seen_at` is read under the row lock in the same statement.
const RENEW: &str = "WITH prev AS (SELECT last_seen_at FROM workers WHERE id = $1 FOR UPDATE) \
     UPDATE workers AS w SET last_seen_at = now() FROM prev WHERE w.id = $1 \
     RETURNING extract(epoch FROM now() - prev.last_seen_at)::float8";
const REAP: &str = "DELETE FROM workers WHERE id IN (\
     SELECT id FROM workers WHERE last_seen_at < now() - make_interval(secs => $1) \
     ORDER BY last_seen_at LIMIT 100 FOR UPDATE SKIP LOCKED)";
const DEREGISTER: &str = "DELETE FROM workers WHERE id = $1";

pub struct WorkerLease {
    db: Db,
    me: WorkerIdentity,
    config: WorkersConfig,
    lease: LeasePublisher,
    /// `workers.lease.age_at_renewal`, when measured ([`WorkerLease::measured_by`]).
    age_at_renewal: Option<Histogram<f64>>,
}

/// Buckets of `workers.lease.age_at_renewal` (s): around the renewal intervals (`workers.interval`
/// 10 s, `chats.heartbeat_interval` 30 s) up to past the default `chats.stale_after` (300 s).
const AGE_BUCKETS: [f64; 14] =
    [1.0, 2.0, 5.0, 10.0, 15.0, 20.0, 30.0, 45.0, 60.0, 90.0, 120.0, 180.0, 300.0, 600.0];

impl WorkerLease {
    pub fn new(db: Db, me: WorkerIdentity, config: WorkersConfig) -> Self {
        Self { db, me, config, lease: LeasePublisher::default(), age_at_renewal: None }
    }

    /// Records, at each successful renewal, the age the lease had just before it
    /// (`workers.lease.age_at_renewal`): how close this worker came to being judged stale.
    #[must_use]
    pub fn measured_by(mut self, meter: &Meter) -> Self {
        self.age_at_renewal = Some(
            meter
                .f64_histogram("workers.lease.age_at_renewal")
                .with_unit("s")
                .with_description(
                    "Age of this worker's lease (now - last_seen_at, database clock) when it was renewed",
                )
                .with_boundaries(AGE_BUCKETS.to_vec())
                .build(),
        );
        self
    }

    /// Publishes what each renewal finds to the runtime's lease state (the daemon's lease loop
    /// does; a bare `WorkerLease` keeps it to itself).
    #[must_use]
    pub fn publishing_to(mut self, lease: LeasePublisher) -> Self {
        self.lease = lease;
        self
    }

    /// The pool the lease renews through (its own one-connection pool when the chat loops run).
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// Registers this worker: the first renewal of its lease (published like one).
    pub async fn register(&self) -> Result<(), DbError> {
        let attempt = self.lease.attempt();
        let conn = self.db.get().await?;
        let me = &self.me;
        conn.exec(REGISTER, &[(&me.id, Type::UUID), (&me.hostname, Type::TEXT), (&me.version, Type::TEXT)])
            .await?;
        attempt.succeeded();
        Ok(())
    }

    /// Renews the lease: ONE write (`UPDATE workers SET last_seen_at = now() WHERE id = me`,
    /// returning the lease's age before it, recorded once the renewal committed).
    /// A missing row means this worker was reaped as dead: the lease state records the loss
    /// (a new epoch, so everything run under the old one stops) and the row is registered
    /// again. Any way out but success (an error, a timeout dropping this future) records a
    /// failed renewal.
    pub async fn renew(&self) -> Result<(), DbError> {
        let attempt = self.lease.attempt();
        let me = &self.me;
        let mut conn = self.db.get().await?;
        // A transaction, so SET LOCAL statement_timeout bounds even a lease write stuck on a lock.
        let tx = db::begin(&mut conn, self.db.tx_limits()).await?;
        let age: Option<f64> = tx.fetch_opt(RENEW, &[(&me.id, Type::UUID)]).await?.map(|row| row.get(0));
        if age.is_none() {
            tracing::warn!(worker_id = %me.id, "worker row was missing (reaped as dead?); registering again");
            self.lease.lost();
            tx.exec(REGISTER, &[(&me.id, Type::UUID), (&me.hostname, Type::TEXT), (&me.version, Type::TEXT)])
                .await?;
        }
        db::commit(tx).await?;
        attempt.succeeded();
        if let (Some(age), Some(histogram)) = (age, &self.age_at_renewal) {
            histogram.record(age.max(0.0), &[]);
        }
        Ok(())
    }

    /// Removes this worker's row on a graceful stop, so others need not wait for it to go stale.
    /// Bounded by `database.statement_timeout` like every tick statement: a row lock held by
    /// someone else must not hold the exit hostage.
    pub async fn deregister(&self) -> Result<(), DbError> {
        let id = self.me.id;
        db::in_transaction(&self.db, async |tx| tx.exec(DEREGISTER, &[(&id, Type::UUID)]).await).await?;
        Ok(())
    }
}

impl Loop for WorkerLease {
    type Error = DbError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.config.base.schedule()
    }

    async fn tick(&self, _tick: &Tick<'_>) -> Result<Progress, DbError> {
        self.renew().await?;
        let reaped = reap(&self.db, self.config.retention).await?;
        if reaped > 0 {
            tracing::info!(reaped, "deleted long-dead worker rows");
        }
        Ok(Progress::Done)
    }
}

/// Deletes worker rows unseen for longer than `retention` (a small batch per call).
pub async fn reap(db: &Db, retention: Duration) -> Result<u64, DbError> {
    let retention = retention.as_secs_f64();
    db::in_transaction(db, async |tx| tx.exec(REAP, &[(&retention, Type::FLOAT8)]).await).await
}
