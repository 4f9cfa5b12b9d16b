//! Read-only views of the outbox: the backlog probe behind the sweeper's gauges and the per-queue
//! breakdown of `worker outbox stats`.

use serde::Serialize;
use tokio_postgres::types::Type;

use crate::db::{self, Db, DbError, Exec};

/// One statement, one row: the due rows (read through the (run_at, id) index) grouped by queue
/// once, then the totals, the `$1` queues with the most due rows (ties by name) in that order,
/// and the rest summed (their oldest row's age is the oldest among them). Dead letters counted.
const BACKLOG: &str = "WITH q AS (SELECT queue, count(*) AS n, min(created_at) AS oldest \
       FROM task_outbox WHERE run_at <= now() GROUP BY queue), \
     r AS (SELECT queue, n, oldest, row_number() OVER (ORDER BY n DESC, queue) AS rank FROM q) \
     SELECT coalesce(sum(n), 0)::int8, \
       coalesce(extract(epoch FROM now() - min(oldest)), 0)::float8, \
       (SELECT count(*) FROM task_outbox_dead), \
       coalesce(array_agg(queue ORDER BY rank) FILTER (WHERE rank <= $1), '{}'), \
       coalesce(array_agg(n ORDER BY rank) FILTER (WHERE rank <= $1), '{}'), \
       coalesce(array_agg(extract(epoch FROM now() - oldest)::float8 ORDER BY rank) FILTER (WHERE rank <= $1), '{}'), \
       coalesce(sum(n) FILTER (WHERE rank > $1), 0)::int8, \
       coalesce(extract(epoch FROM now() - min(oldest) FILTER (WHERE rank > $1)), 0)::float8 \
     FROM r";

/// The `queue` attribute of the queues summed together.
pub const OTHER_QUEUES: &str = "other";

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

/// Due rows of one queue (or of the queues summed as [`OTHER_QUEUES`]).
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct QueueBacklog {
    pub due: u64,
    /// Age of the oldest due row, from its `created_at`; 0 when nothing is due.
    pub oldest_due_age_secs: f64,
}

/// The sweeper's probe.
#[derive(Debug, Clone, PartialEq)]
pub struct Backlog {
    pub due: u64,
    /// Age of the oldest due row, from its `created_at`; 0 when nothing is due.
    pub oldest_due_age_secs: f64,
    pub dead: u64,
    /// The busiest queues by due rows (at most the `queues` asked for), busiest first; a queue
    /// with no due row is not among them.
    pub busiest: Vec<(String, QueueBacklog)>,
    /// Every other queue with due rows, summed: the rows added up, the oldest age the largest.
    /// A queue literally named `other` is counted here too, so no two series share a label.
    pub other: QueueBacklog,
}

/// The probe, in one statement of its own transaction (the sweeper calls it from its tick at most
/// every `outbox.probe_interval`). `queues`: how many of the busiest queues to name.
pub async fn backlog(db: &Db, queues: u32) -> Result<Backlog, DbError> {
    let top = i64::from(queues);
    // Runs inside the sweeper's tick: bounded by the statement timeout like every tick statement.
    let row = db::in_transaction(db, async |tx| tx.fetch_one(BACKLOG, &[(&top, Type::INT8)]).await).await?;
    let names: Vec<String> = row.get(3);
    let dues: Vec<i64> = row.get(4);
    let ages: Vec<f64> = row.get(5);
    let mut other =
        QueueBacklog { due: count(row.get(6)), oldest_due_age_secs: row.get::<_, f64>(7).max(0.0) };
    let mut busiest = Vec::with_capacity(names.len());
    for ((name, due), age) in names.into_iter().zip(dues).zip(ages) {
        let queue = QueueBacklog { due: count(due), oldest_due_age_secs: age.max(0.0) };
        if name == OTHER_QUEUES {
            other.due += queue.due;
            other.oldest_due_age_secs = other.oldest_due_age_secs.max(queue.oldest_due_age_secs);
        } else {
            busiest.push((name, queue));
        }
    }
    Ok(Backlog {
        due: count(row.get(0)),
        oldest_due_age_secs: row.get::<_, f64>(1).max(0.0),
        dead: count(row.get(2)),
        busiest,
        other,
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
