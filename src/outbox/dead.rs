//! Dead letters: rows that failed `outbox.max_attempts` times, moved to `task_outbox_dead` by the
//! sweeper in the same transaction that recorded their last failure. Operators list them, requeue
//! them (attempts reset, due now) or purge old ones (`worker outbox dead …`).

use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::Type;

use super::sweeper::WAKE_CHANNEL;
use crate::db::{self, Db, DbError, Exec};

const LIST: &str = "SELECT id, original_id, task_id, job_id, queue, payload, run_at, attempts, last_error, \
     created_at, dead_lettered_at FROM task_outbox_dead \
     WHERE $1::text IS NULL OR queue = $1 ORDER BY dead_lettered_at DESC, id DESC LIMIT $2";

/// Moves the chosen dead letters back (new outbox ids, attempts 0, due now; `created_at` and the
/// last error are kept). A task whose id is already back in the outbox (re-enqueued meanwhile)
/// keeps that row: its dead copy is just removed. `$1` NULL = all.
const REQUEUE: &str = "WITH moved AS (\
       DELETE FROM task_outbox_dead WHERE $1::int8[] IS NULL OR id = ANY($1) \
       RETURNING id, task_id, job_id, queue, payload, last_error, created_at), \
     inserted AS (\
       INSERT INTO task_outbox (task_id, job_id, queue, payload, run_at, attempts, last_error, created_at) \
       SELECT task_id, job_id, queue, payload, now(), 0, last_error, created_at FROM moved ORDER BY id \
       ON CONFLICT (task_id) DO NOTHING RETURNING 1) \
     SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM inserted), \
            coalesce((SELECT array_agg(x ORDER BY x) FROM unnest($1::int8[]) AS x \
                      WHERE x NOT IN (SELECT id FROM moved)), '{}')";
const NOTIFY: &str = "SELECT 1::int4 FROM pg_notify($1, '')";
const PURGE: &str = "DELETE FROM task_outbox_dead WHERE dead_lettered_at < now() - make_interval(secs => $1)";

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeadLetter {
    pub id: i64,
    pub original_id: i64,
    pub task_id: String,
    pub job_id: Option<String>,
    pub queue: String,
    pub payload: serde_json::Value,
    pub run_at: DateTime<Utc>,
    pub attempts: i32,
    pub last_error: Option<String>,
    pub created_at: DateTime<Utc>,
    pub dead_lettered_at: DateTime<Utc>,
}

/// Which dead letters to requeue.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selection {
    Ids(Vec<i64>),
    All,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct RequeueReport {
    /// Dead letters removed from `task_outbox_dead`.
    pub removed: u64,
    /// Of those, rows put back into the outbox.
    pub requeued: u64,
    /// Requested ids that are not (or no longer) dead letters.
    pub not_found: Vec<i64>,
}

impl RequeueReport {
    /// Removed but not requeued: their task id was already back in the outbox.
    pub fn already_pending(&self) -> u64 {
        self.removed.saturating_sub(self.requeued)
    }
}

/// The newest dead letters first, optionally of one queue.
pub async fn list(db: &Db, queue: Option<&str>, limit: i64) -> Result<Vec<DeadLetter>, DbError> {
    let conn = db.get().await?;
    let rows = conn.fetch_all(LIST, &[(&queue, Type::TEXT), (&limit.max(0), Type::INT8)]).await?;
    Ok(rows
        .iter()
        .map(|r| DeadLetter {
            id: r.get(0),
            original_id: r.get(1),
            task_id: r.get(2),
            job_id: r.get(3),
            queue: r.get(4),
            payload: r.get(5),
            run_at: r.get(6),
            attempts: r.get(7),
            last_error: r.get(8),
            created_at: r.get(9),
            dead_lettered_at: r.get(10),
        })
        .collect())
}

/// Requeues dead letters in one transaction and wakes the sweepers.
pub async fn requeue(db: &Db, selection: &Selection) -> Result<RequeueReport, DbError> {
    let ids: Option<&[i64]> = match selection {
        Selection::Ids(ids) => Some(ids),
        Selection::All => None,
    };
    let mut conn = db.get().await?;
    let tx = db::begin(&mut conn, db.statement_timeout()).await?;
    let row = tx.fetch_one(REQUEUE, &[(&ids, Type::INT8_ARRAY)]).await?;
    let report = RequeueReport {
        removed: u64::try_from(row.get::<_, i64>(0)).unwrap_or(0),
        requeued: u64::try_from(row.get::<_, i64>(1)).unwrap_or(0),
        not_found: row.get(2),
    };
    if report.requeued > 0 {
        tx.fetch_one(NOTIFY, &[(&WAKE_CHANNEL, Type::TEXT)]).await?;
    }
    tx.commit().await?;
    Ok(report)
}

/// Deletes dead letters older than `older_than`; returns how many.
pub async fn purge(db: &Db, older_than: Duration) -> Result<u64, DbError> {
    let conn = db.get().await?;
    let secs = older_than.as_secs_f64();
    Ok(conn.exec(PURGE, &[(&secs, Type::FLOAT8)]).await?)
}
