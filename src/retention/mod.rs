//! The `retention` loop (leader only): deletes what has been kept long enough.
//!
//! - dead letters (`task_outbox_dead`) older than `outbox.dead_retention` (30 d), by
//!   `dead_lettered_at`;
//! - audit rows (`operator_actions`) older than `audit.retention` (180 d), by `at`.
//!
//! Every `retention.interval` (1 h), one replica at a time (the leader lock), deletes at most
//! `retention.batch_size` rows of each table per tick, oldest first (each table's `at` index
//! makes that a range scan); a full batch ticks again at once (bounded by
//! `runtime.max_drain_ticks`), so a large backlog goes in short transactions. Each tick records
//! what it removed per table in `retention_runs` (migration V10), which `worker status` shows.

pub mod config;

use std::time::Duration;

use tokio_postgres::types::Type;

pub use self::config::{AuditConfig, RetentionConfig};
use crate::db::{self, Db, DbError, Exec};
use crate::runtime::{Loop, LoopInfo, Progress, Schedule, Tick};

pub const NAME: &str = "retention";

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "retention",
    interval_key: "interval",
    about: "deletes dead letters and audit rows past their retention",
    pausable: true,
};

/// The leader lock of the retention loop ("retentio" in ASCII).
pub const LEADER_KEY: i64 = 0x7265_7465_6e74_696f;

/// `$1` retention in seconds, `$2` batch size. The oldest first, on `dead_lettered_at`'s index.
const DELETE_DEAD_LETTERS: &str = "DELETE FROM task_outbox_dead WHERE id IN (\
       SELECT id FROM task_outbox_dead \
       WHERE dead_lettered_at < now() - make_interval(secs => $1) \
       ORDER BY dead_lettered_at LIMIT $2)";
/// Same for the audit trail, on `operator_actions_at_idx`.
const DELETE_AUDIT_ROWS: &str = "DELETE FROM operator_actions WHERE id IN (\
       SELECT id FROM operator_actions \
       WHERE at < now() - make_interval(secs => $1) \
       ORDER BY at LIMIT $2)";
/// `$1` table, `$2` rows removed by this tick.
const RECORD: &str = "INSERT INTO retention_runs AS r (table_name, ran_at, last_removed, total_removed) \
     VALUES ($1, now(), $2, $2) \
     ON CONFLICT (table_name) DO UPDATE SET ran_at = now(), last_removed = $2, \
       total_removed = r.total_removed + $2";

pub struct Retention {
    db: Db,
    config: RetentionConfig,
    dead_letters: Duration,
    audit: Duration,
}

/// What one tick removed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    pub dead_letters: u64,
    pub audit_rows: u64,
}

impl Retention {
    pub fn new(db: Db, config: RetentionConfig, dead_letters: Duration, audit: Duration) -> Self {
        Self { db, config, dead_letters, audit }
    }

    /// One batch of each table, and its record, in one transaction (the leader's, when there is
    /// one: it commits with the tick).
    pub async fn sweep(&self, tick: &Tick<'_>) -> Result<Removed, DbError> {
        match tick.leader_tx() {
            Some(tx) => self.sweep_in(tx).await,
            None => db::in_transaction(&self.db, async |tx| self.sweep_in(tx).await).await,
        }
    }

    async fn sweep_in(&self, tx: &impl Exec) -> Result<Removed, DbError> {
        let batch = i64::from(self.config.batch_size);
        let mut removed = Removed::default();
        for (sql, keep, table, count) in [
            (DELETE_DEAD_LETTERS, self.dead_letters, "task_outbox_dead", &mut removed.dead_letters),
            (DELETE_AUDIT_ROWS, self.audit, "operator_actions", &mut removed.audit_rows),
        ] {
            let seconds = keep.as_secs_f64();
            *count = tx.exec(sql, &[(&seconds, Type::FLOAT8), (&batch, Type::INT8)]).await?;
            let n = i64::try_from(*count).unwrap_or(i64::MAX);
            tx.exec(RECORD, &[(&table, Type::TEXT), (&n, Type::INT8)]).await?;
        }
        Ok(removed)
    }
}

impl Loop for Retention {
    type Error = DbError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.config.base.schedule().leader_only(LEADER_KEY)
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, DbError> {
        let removed = self.sweep(tick).await?;
        tick.record_rows(usize::try_from(removed.dead_letters + removed.audit_rows).unwrap_or(usize::MAX));
        if removed != Removed::default() {
            tracing::info!(
                dead_letters = removed.dead_letters,
                audit_rows = removed.audit_rows,
                "retention: removed rows past their retention"
            );
        }
        let batch = u64::from(self.config.batch_size);
        Ok(if removed.dead_letters >= batch || removed.audit_rows >= batch {
            Progress::More
        } else {
            Progress::Done
        })
    }
}

/// One table's last retention run, as `worker status` shows it.
#[derive(Debug, Clone, serde::Serialize, PartialEq)]
pub struct RetentionRun {
    pub table: String,
    pub ran_at: chrono::DateTime<chrono::Utc>,
    pub last_removed: i64,
    pub total_removed: i64,
}

const RUNS: &str =
    "SELECT table_name, ran_at, last_removed, total_removed FROM retention_runs ORDER BY table_name";

/// Every table's last run (none before the loop first ran).
pub async fn runs(tx: &impl Exec) -> Result<Vec<RetentionRun>, DbError> {
    Ok(tx
        .fetch_all(RUNS, &[])
        .await?
        .iter()
        .map(|r| RetentionRun {
            table: r.get(0),
            ran_at: r.get(1),
            last_removed: r.get(2),
            total_removed: r.get(3),
        })
        .collect())
}
