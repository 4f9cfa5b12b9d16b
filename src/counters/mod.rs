//! The `counters` loop: Redis running-task counters → `jobs.running_tasks`
//! (`docs/counters.md`).
//!
//! Task runners keep `HINCRBY {prefix}:running {job_id} ±1` in Redis; this loop copies the hash
//! into Postgres every `counters.interval` so the API tier can read it with the job. One
//! `HGETALL`, then ONE batched statement for every active job (`pending|running`): the hash's
//! value clamped to `0..=i32::MAX`, or 0 for an active job missing from the hash. Completed,
//! canceled and failed jobs are never touched. A value that is not an integer is logged and
//! skipped (that job keeps its count) rather than failing the sync for every job.
//!
//! The statement locks the jobs it changes in id order (concurrent replicas and `cancel_job`
//! cannot deadlock on it), writes only rows whose count changed, and returns the skew (|Redis −
//! Postgres| per active job) as a compact distribution for the `counters.skew` histogram. It runs
//! through [`Exec`] like everything else: no named prepared statement, so pgbouncer in
//! transaction mode is fine.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::prelude::{ClientLike, HashesInterface, Value};
use opentelemetry::metrics::{Histogram, Meter};
use tokio_postgres::types::Type;

use crate::db::{self, Db, DbError, Exec};
use crate::redis::Client;
use crate::runtime::{ErrorLog, Loop, LoopError, LoopInfo, Progress, Schedule, Tick};

mod config;

pub use config::CountersConfig;

pub const NAME: &str = "counters";

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "counters",
    interval_key: "interval",
    about: "Redis running-task counters into jobs.running_tasks",
    pausable: true,
};

/// `$1` job ids, `$2` their counts (NULL = unreadable: keep the current count). Returns
/// `(skew, jobs with that skew, jobs updated with that skew)`.
const SYNC: &str = "WITH src AS (SELECT * FROM unnest($1::text[], $2::int8[]) AS s(id, n)), \
     counts AS (\
       SELECT j.id, j.running_tasks AS old, \
              CASE WHEN s.id IS NULL THEN 0 \
                   WHEN s.n IS NULL THEN j.running_tasks \
                   ELSE least(greatest(s.n, 0), 2147483647)::int4 END AS new \
       FROM jobs AS j LEFT JOIN src AS s ON s.id = j.id \
       WHERE j.status IN ('pending', 'running')), \
     locked AS (\
       SELECT j.id FROM jobs AS j JOIN counts AS c ON c.id = j.id \
       WHERE c.old <> c.new ORDER BY j.id FOR UPDATE OF j), \
     updated AS (\
       UPDATE jobs AS j SET running_tasks = c.new, updated_at = now() \
       FROM counts AS c, locked AS l \
       WHERE j.id = c.id AND l.id = c.id AND j.status IN ('pending', 'running') \
       RETURNING j.id) \
     SELECT abs(c.new::int8 - c.old::int8) AS skew, count(*), count(u.id) \
     FROM counts AS c LEFT JOIN updated AS u ON u.id = c.id GROUP BY 1 ORDER BY 1";

#[derive(Debug, thiserror::Error)]
pub enum CountersError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot read the running-task counters from redis: {0}")]
    Redis(#[from] fred::error::Error),
    #[error("redis did not answer HGETALL within {0:?}")]
    RedisTimeout(Duration),
    #[error("redis is not connected (reconnecting)")]
    RedisDisconnected,
}

impl LoopError for CountersError {
    fn metric_label(&self) -> &'static str {
        match self {
            CountersError::Db(e) => e.metric_label(),
            CountersError::Redis(_) => "redis_error",
            CountersError::RedisTimeout(_) => "redis_timeout",
            CountersError::RedisDisconnected => "redis_unavailable",
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Entries in the Redis hash.
    pub entries: usize,
    /// Entries skipped because their value is not an integer.
    pub unreadable: usize,
    /// Active jobs compared.
    pub active_jobs: u64,
    /// Jobs whose count was changed.
    pub updated: u64,
    /// Largest |Redis − Postgres| among active jobs before the update.
    pub max_skew: i64,
}

pub struct Counters {
    db: Db,
    redis: Client,
    key: String,
    config: CountersConfig,
    skew: Histogram<u64>,
    /// Unreadable values are reported once per minute, not every tick.
    unreadable_log: Mutex<ErrorLog>,
}

impl Counters {
    pub fn new(db: Db, redis: Client, prefix: &str, config: CountersConfig, meter: &Meter) -> Self {
        let skew = meter
            .u64_histogram("counters.skew")
            .with_description("Per active job at each sync: |Redis running count − jobs.running_tasks|")
            .with_boundaries(vec![0.0, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 1000.0])
            .build();
        let unreadable_log = Mutex::new(ErrorLog::new(Duration::from_secs(60)));
        Self { db, redis, key: format!("{prefix}:running"), config, skew, unreadable_log }
    }

    /// One sync: read the hash, write every active job's count in one statement. Redis gets
    /// half the tick timeout, leaving the other half for the statement.
    pub async fn sync(&self) -> Result<SyncReport, CountersError> {
        self.sync_within(self.config.base.tick_timeout / 2).await
    }

    /// [`Counters::sync`] with the time Redis may take given by the caller (the tick's budget).
    pub async fn sync_within(&self, redis_budget: Duration) -> Result<SyncReport, CountersError> {
        if !self.redis.is_connected() {
            return Err(CountersError::RedisDisconnected);
        }
        let deadline = redis_budget;
        let hash: HashMap<String, Value> = tokio::time::timeout(deadline, self.redis.hgetall(&self.key))
            .await
            .map_err(|_| CountersError::RedisTimeout(deadline))??;
        let parsed = parse_counts(hash);
        if let Some(example) = parsed.unreadable.first() {
            let mut log = self.unreadable_log.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(repeated) = log.should_log("unreadable running-task counters", Instant::now()) {
                tracing::warn!(
                    key = %self.key,
                    unreadable = parsed.unreadable.len(),
                    example_job_id = %example,
                    repeated,
                    "running-task counters that are not integers were skipped"
                );
            }
        }

        let rows = db::in_transaction(&self.db, async |tx| {
            tx.fetch_all(SYNC, &[(&parsed.ids, Type::TEXT_ARRAY), (&parsed.counts, Type::INT8_ARRAY)]).await
        })
        .await?;

        let mut report = SyncReport {
            entries: parsed.ids.len(),
            unreadable: parsed.unreadable.len(),
            ..SyncReport::default()
        };
        for row in &rows {
            let (skew, jobs, updated): (i64, i64, i64) = (row.get(0), row.get(1), row.get(2));
            let jobs = u64::try_from(jobs).unwrap_or(0);
            for _ in 0..jobs {
                self.skew.record(u64::try_from(skew).unwrap_or(0), &[]);
            }
            report.active_jobs += jobs;
            report.updated += u64::try_from(updated).unwrap_or(0);
            report.max_skew = report.max_skew.max(skew);
        }
        if report.updated > 0 {
            tracing::debug!(
                updated = report.updated,
                max_skew = report.max_skew,
                "running-task counters synced"
            );
        }
        Ok(report)
    }
}

/// The hash as statement parameters: ids in sorted order, `None` for unreadable values.
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    ids: Vec<String>,
    counts: Vec<Option<i64>>,
    unreadable: Vec<String>,
}

fn parse_counts(hash: HashMap<String, Value>) -> Parsed {
    let mut entries: Vec<(String, Value)> = hash.into_iter().collect();
    entries.sort_by(|a, b| a.0.cmp(&b.0));
    let mut parsed = Parsed::default();
    for (id, value) in entries {
        let count = match &value {
            Value::Integer(n) => Some(*n),
            Value::String(s) => s.trim().parse().ok(),
            Value::Bytes(b) => std::str::from_utf8(b).ok().and_then(|s| s.trim().parse().ok()),
            _ => None,
        };
        if count.is_none() {
            parsed.unreadable.push(id.clone());
        }
        parsed.ids.push(id);
        parsed.counts.push(count);
    }
    parsed
}

impl Loop for Counters {
    type Error = CountersError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        self.config.base.schedule()
    }

    async fn tick(&self, tick: &Tick<'_>) -> Result<Progress, CountersError> {
        self.sync_within(tick.budget(tick.remaining())).await?;
        Ok(Progress::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_are_parsed_in_id_order_and_garbage_is_kept_as_unknown() {
        let hash = HashMap::from([
            ("b".to_owned(), Value::String("-2".into())),
            ("a".to_owned(), Value::String("3".into())),
            ("c".to_owned(), Value::String("lots".into())),
            ("d".to_owned(), Value::Integer(7)),
        ]);
        let parsed = parse_counts(hash);
        assert_eq!(parsed.ids, ["a", "b", "c", "d"]);
        assert_eq!(parsed.counts, [Some(3), Some(-2), None, Some(7)]);
        assert_eq!(parsed.unreadable, ["c"]);
    }
}
