//! Read-only views of the outbox: the backlog probe behind the sweeper's gauges and the per-queue
//! breakdown of `worker outbox stats`.

use serde::Serialize;

use crate::db::{self, Db, DbError, Exec};

/// One statement; the due rows are read through the (run_at, id) index.
const BACKLOG: &str = "SELECT due.n, due.age, (SELECT count(*) FROM task_outbox_dead) \
     FROM (SELECT count(*) AS n, \
           coalesce(extract(epoch FROM now() - min(created_at)), 0)::float8 AS age \
           FROM task_outbox WHERE run_at <= now()) AS due";

const PER_QUEUE: &str = "WITH live AS (\
       SELECT queue, count(*) AS total, \
              count(*) FILTER (WHERE run_at <= now()) AS due, \
              count(*) FILTER (WHERE attempts > 0) AS retrying, \
              coalesce(extract(epoch FROM now() - min(created_at) FILTER (WHERE run_at <= now())), 0)::float8 AS age \
       FROM task_outbox GROUP BY queue), \
     dead AS (SELECT queue, count(*) AS dead FROM task_outbox_dead GROUP BY queue) \
     SELECT queue, coalesce(total, 0), coalesce(due, 0), coalesce(retrying, 0), coalesce(age, 0), \
            coalesce(dead, 0) \
     FROM live FULL JOIN dead USING (queue) ORDER BY queue";

/// The sweeper's probe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backlog {
    pub due: u64,
    /// Age of the oldest due row, from its `created_at`; 0 when nothing is due.
    pub oldest_due_age_secs: f64,
    pub dead: u64,
}

pub async fn backlog(db: &Db) -> Result<Backlog, DbError> {
    // Runs inside the sweeper's tick: bounded by the statement timeout like every tick statement.
    let row = db::in_transaction(db, async |tx| tx.fetch_one(BACKLOG, &[]).await).await?;
    Ok(Backlog {
        due: count(row.get(0)),
        oldest_due_age_secs: row.get::<_, f64>(1).max(0.0),
        dead: count(row.get(2)),
    })
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueueStats {
    pub queue: String,
    /// Rows in the outbox (due or not).
    pub rows: u64,
    pub due: u64,
    /// Rows that failed at least once and wait for their next attempt.
    pub retrying: u64,
    pub oldest_due_age_secs: f64,
    pub dead: u64,
}

/// `worker outbox stats`: per queue, plus the totals.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OutboxStats {
    pub rows: u64,
    pub due: u64,
    pub retrying: u64,
    pub oldest_due_age_secs: f64,
    pub dead: u64,
    pub queues: Vec<QueueStats>,
}

pub async fn outbox_stats(db: &Db) -> Result<OutboxStats, DbError> {
    let conn = db.get().await?;
    let queues: Vec<QueueStats> = conn
        .fetch_all(PER_QUEUE, &[])
        .await?
        .iter()
        .map(|r| QueueStats {
            queue: r.get(0),
            rows: count(r.get(1)),
            due: count(r.get(2)),
            retrying: count(r.get(3)),
            oldest_due_age_secs: r.get::<_, f64>(4).max(0.0),
            dead: count(r.get(5)),
        })
        .collect();
    Ok(OutboxStats {
        rows: queues.iter().map(|q| q.rows).sum(),
        due: queues.iter().map(|q| q.due).sum(),
        retrying: queues.iter().map(|q| q.retrying).sum(),
        oldest_due_age_secs: queues.iter().map(|q| q.oldest_due_age_secs).fold(0.0, f64::max),
        dead: queues.iter().map(|q| q.dead).sum(),
        queues,
    })
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
