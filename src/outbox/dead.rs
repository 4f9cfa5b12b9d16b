//! Dead letters: rows that failed `outbox.max_attempts` times, moved to `task_outbox_dead` by the
//! sweeper in the same transaction that recorded their last failure. Operators list them, requeue
//! them (attempts reset, due now; never those of a job that is over) or purge old ones
//! (`worker outbox dead …`).

use std::collections::BTreeMap;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::types::Type;

use super::sweeper::WAKE_CHANNEL;
use crate::db::{Db, DbError, Exec};

const LIST: &str = "SELECT id, original_id, task_id, job_id, queue, payload, run_at, attempts, last_error, \
     created_at, dead_lettered_at FROM task_outbox_dead \
     WHERE $1::text IS NULL OR queue = $1 ORDER BY dead_lettered_at DESC, id DESC LIMIT $2";

/// Moves the chosen dead letters back (new outbox ids, attempts 0, due now; `created_at` and the
/// last error are kept), in one statement. `$1` NULL = all. Per chosen dead letter, in this order:
/// - its `job_id` names a job that is over (not `pending`/`running`: canceled, completed, failed):
///   skipped, and kept in `task_outbox_dead` as the record of what failed. A dead letter without a
///   job, or whose job is not in `jobs`, is requeued. The jobs are locked `FOR SHARE` in id order
///   and their status is read from the locked (latest) row versions, so a `cancel_job` that
///   commits while this runs is seen, and one that starts after waits for this transaction and
///   then deletes what it requeued (its DELETE takes a new snapshot under READ COMMITTED).
/// - several chosen copies of one task (dead-lettered, requeued, dead-lettered again): the newest
///   (highest id) is requeued and the older ones are removed as superseded, so a later
///   `requeue --all` cannot bring a stale payload back. Copies that were not chosen stay.
/// - the task is already back in the outbox (re-enqueued meanwhile): that row is kept and the
///   dead copies are just removed.
///
/// Columns: removed, requeued, superseded, already pending, skipped job statuses and their counts
/// (by status), requested ids that are not dead letters.
const REQUEUE: &str = "WITH chosen AS MATERIALIZED (\
       SELECT id, job_id FROM task_outbox_dead WHERE $1::int8[] IS NULL OR id = ANY($1)), \
     job_status AS MATERIALIZED (\
       SELECT id, status FROM jobs WHERE id IN (SELECT job_id FROM chosen) ORDER BY id FOR SHARE), \
     skipped AS MATERIALIZED (\
       SELECT c.id, j.status FROM chosen c JOIN job_status j ON j.id = c.job_id \
       WHERE j.status NOT IN ('pending', 'running')), \
     moved AS (\
       DELETE FROM task_outbox_dead WHERE id IN (SELECT id FROM chosen) AND id NOT IN (SELECT id FROM skipped) \
       RETURNING id, task_id, job_id, queue, payload, last_error, created_at, traceparent), \
     newest AS (\
       SELECT DISTINCT ON (task_id) id, task_id, job_id, queue, payload, last_error, created_at, traceparent \
       FROM moved ORDER BY task_id, id DESC), \
     inserted AS (\
       INSERT INTO task_outbox (task_id, job_id, queue, payload, run_at, attempts, last_error, created_at, \
         traceparent) \
       SELECT task_id, job_id, queue, payload, now(), 0, last_error, created_at, traceparent FROM newest ORDER BY id \
       ON CONFLICT (task_id) DO NOTHING RETURNING task_id), \
     skipped_by_status AS (SELECT status, count(*) AS n FROM skipped GROUP BY status) \
     SELECT (SELECT count(*) FROM moved), (SELECT count(*) FROM inserted), \
            (SELECT count(*) FROM moved WHERE task_id IN (SELECT task_id FROM inserted)) \
              - (SELECT count(*) FROM inserted), \
            (SELECT count(*) FROM moved WHERE task_id NOT IN (SELECT task_id FROM inserted)), \
            coalesce((SELECT array_agg(status ORDER BY status) FROM skipped_by_status), '{}'), \
            coalesce((SELECT array_agg(n ORDER BY status) FROM skipped_by_status), '{}'), \
            coalesce((SELECT array_agg(DISTINCT x ORDER BY x) FROM unnest($1::int8[]) AS x \
                      WHERE x NOT IN (SELECT id FROM chosen)), '{}')";
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
    /// Dead letters removed from `task_outbox_dead`: `requeued + superseded + already_pending`.
    pub removed: u64,
    /// Tasks put back into the outbox (the newest chosen copy of each).
    pub requeued: u64,
    /// Older chosen copies of a requeued task, removed: the newest copy came back instead.
    pub superseded: u64,
    /// Chosen copies of tasks already back in the outbox (re-enqueued meanwhile), removed; the
    /// outbox row is kept as it is.
    pub already_pending: u64,
    /// Chosen dead letters kept because their job is over; they stay in `task_outbox_dead`.
    pub skipped: u64,
    /// `skipped` by the status of their job (`canceled`, `completed`, `failed`).
    pub skipped_by_job_status: BTreeMap<String, u64>,
    /// Requested ids that are not (or no longer) dead letters.
    pub not_found: Vec<i64>,
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

/// Requeues dead letters in `tx` and wakes the sweepers (at commit).
pub async fn requeue(tx: &impl Exec, selection: &Selection) -> Result<RequeueReport, DbError> {
    let ids: Option<&[i64]> = match selection {
        Selection::Ids(ids) => Some(ids),
        Selection::All => None,
    };
    let row = tx.fetch_one(REQUEUE, &[(&ids, Type::INT8_ARRAY)]).await?;
    let count = |i: usize| u64::try_from(row.get::<_, i64>(i)).unwrap_or(0);
    let statuses: Vec<String> = row.get(4);
    let counts: Vec<i64> = row.get(5);
    let skipped_by_job_status: BTreeMap<String, u64> =
        statuses.into_iter().zip(counts.into_iter().map(|n| u64::try_from(n).unwrap_or(0))).collect();
    let report = RequeueReport {
        removed: count(0),
        requeued: count(1),
        superseded: count(2),
        already_pending: count(3),
        skipped: skipped_by_job_status.values().sum(),
        skipped_by_job_status,
        not_found: row.get(6),
    };
    if report.requeued > 0 {
        tx.fetch_one(NOTIFY, &[(&WAKE_CHANNEL, Type::TEXT)]).await?;
    }
    Ok(report)
}

/// Deletes dead letters older than `older_than` in `tx`; returns how many.
pub async fn purge(tx: &impl Exec, older_than: Duration) -> Result<u64, DbError> {
    let secs = older_than.as_secs_f64();
    tx.exec(PURGE, &[(&secs, Type::FLOAT8)]).await
}
