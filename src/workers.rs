//! The `workers` loop: this process's lease row.
//!
//! Every replica registers a row in `workers` and renews `last_seen_at = now()` each tick: one
//! write per interval, whatever else the process does. Other loops judge liveness from this row
//! with the database clock, so replicas with skewed clocks cannot declare each other dead.
//! Rows unseen for `workers.retention` are deleted in small batches.

use std::time::Duration;

use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::config::WorkersConfig;
use crate::db::{self, Db, DbError, Exec};
use crate::runtime::{Loop, Progress, Schedule, Tick};

pub const NAME: &str = "workers";

/// Registers (or re-registers after being reaped) this worker.
const REGISTER: &str = "INSERT INTO workers (id, hostname, version) VALUES ($1, $2, $3) \
     ON CONFLICT (id) DO UPDATE SET last_seen_at = now(), hostname = EXCLUDED.hostname, version = EXCLUDED.version";
const RENEW: &str = "UPDATE workers SET last_seen_at = now() WHERE id = $1";
const REAP: &str = "DELETE FROM workers WHERE id IN (\
     SELECT id FROM workers WHERE last_seen_at < now() - make_interval(secs => $1) \
     ORDER BY last_seen_at LIMIT 100 FOR UPDATE SKIP LOCKED)";
const DEREGISTER: &str = "DELETE FROM workers WHERE id = $1";

/// Identity of this process, as recorded in `workers`.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub id: Uuid,
    pub hostname: String,
    pub version: String,
}

impl WorkerIdentity {
    pub fn new() -> Self {
        let hostname = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        Self { id: Uuid::new_v4(), hostname, version: env!("CARGO_PKG_VERSION").to_owned() }
    }
}

impl Default for WorkerIdentity {
    fn default() -> Self {
        Self::new()
    }
}

pub struct WorkerLease {
    db: Db,
    me: WorkerIdentity,
    config: WorkersConfig,
}

impl WorkerLease {
    pub fn new(db: Db, me: WorkerIdentity, config: WorkersConfig) -> Self {
        Self { db, me, config }
    }

    pub async fn register(&self) -> Result<(), DbError> {
        let conn = self.db.get().await?;
        let me = &self.me;
        conn.exec(REGISTER, &[(&me.id, Type::UUID), (&me.hostname, Type::TEXT), (&me.version, Type::TEXT)])
            .await?;
        Ok(())
    }

    /// Removes this worker's row on a graceful stop, so others need not wait for it to go stale.
    pub async fn deregister(&self) -> Result<(), DbError> {
        let conn = self.db.get().await?;
        conn.exec(DEREGISTER, &[(&self.me.id, Type::UUID)]).await?;
        Ok(())
    }
}

impl Loop for WorkerLease {
    type Error = DbError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        Schedule::every(self.config.interval, self.config.tick_timeout)
    }

    async fn tick(&self, _tick: &Tick<'_>) -> Result<Progress, DbError> {
        let me = &self.me;
        let mut conn = self.db.get().await?;
        // A transaction, so SET LOCAL statement_timeout bounds even a lease write stuck on a lock.
        let tx = db::begin(&mut conn, self.db.statement_timeout()).await?;
        if tx.exec(RENEW, &[(&me.id, Type::UUID)]).await? == 0 {
            tracing::warn!(worker_id = %me.id, "worker row was missing (reaped as dead?); registering again");
            tx.exec(REGISTER, &[(&me.id, Type::UUID), (&me.hostname, Type::TEXT), (&me.version, Type::TEXT)])
                .await?;
        }
        let retention = secs(self.config.retention);
        let reaped = tx.exec(REAP, &[(&retention, Type::FLOAT8)]).await?;
        tx.commit().await?;
        if reaped > 0 {
            tracing::info!(reaped, "deleted long-dead worker rows");
        }
        Ok(Progress::Done)
    }
}

fn secs(duration: Duration) -> f64 {
    duration.as_secs_f64()
}
