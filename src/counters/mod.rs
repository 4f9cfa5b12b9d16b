//! The `counters` loop: Redis running-task counters → `jobs.running_tasks`
//! (`docs/counters.md`).
//!
//! Task runners keep `HINCRBY {prefix}:running {job_id} ±1` in Redis; this loop copies the hash
//! into Postgres every `counters.interval` so the API tier can read it with the job. The hash is
//! read in `HSCAN` pages of `counters.scan_count` fields, each page parsed into ids and counts and
//! dropped before the next is asked for (never one reply as large as the hash, as `HGETALL`
//! was), then ONE batched statement for every active job (`pending|running`): the hash's value
//! clamped to `0..=i32::MAX`, or 0 for an active job missing from the hash. Completed, canceled
//! and failed jobs are never touched.
//!
//! Runners write the hash, and anything can: a field that cannot be a job's count is skipped
//! and counted by why ([`Invalid`]), never failing the sync for every job. A field name that is
//! not UTF-8 or holds a NUL is no job id PostgreSQL can store (sent as one, it would fail the
//! statement for all); a value that is not an integer leaves that job's count as it was.
//!
//! The statement locks the jobs it changes in id order (concurrent replicas and `cancel_job`
//! cannot deadlock on it), writes only rows whose count changed, and returns the skew (|Redis −
//! Postgres| per active job) as a compact distribution for the `counters.skew` histogram. It runs
//! through [`Exec`] like everything else: no named prepared statement, so pgbouncer in
//! transaction mode is fine.
//!
//! A tick whose read gives the statement the same input as the last successful sync skips the
//! statement (no checkout, no transaction: issue 21, an idle replica's cost), unless that sync
//! still changed rows or is older than `counters.resync_interval` ([`decide`]): PostgreSQL can
//! drift while Redis stands still, and only a sync repairs it.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use fred::prelude::{ClientLike, Value};
use fred::types::scan::Scanner;
use futures_util::StreamExt;
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
    #[error("redis did not finish the HSCAN of the running-task counters within {0:?}")]
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

/// Why a field of the hash was skipped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Invalid {
    /// The field name or the value is not UTF-8.
    NotUtf8,
    /// The field name or the value holds a NUL character (PostgreSQL text cannot).
    Nul,
    /// The value is not an integer.
    NotANumber,
}

/// Fields skipped, counted by why.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Skipped {
    pub not_utf8: usize,
    pub nul: usize,
    pub not_a_number: usize,
}

impl Skipped {
    pub fn total(&self) -> usize {
        self.not_utf8 + self.nul + self.not_a_number
    }

    fn count(&mut self, why: Invalid) {
        match why {
            Invalid::NotUtf8 => self.not_utf8 += 1,
            Invalid::Nul => self.nul += 1,
            Invalid::NotANumber => self.not_a_number += 1,
        }
    }
}

/// What one sync did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SyncReport {
    /// Fields read from the Redis hash (each once, skipped ones included).
    pub entries: usize,
    /// Fields skipped (their job, if the name is one, keeps its count), by why.
    pub skipped: Skipped,
    /// `HSCAN` pages read.
    pub pages: usize,
    /// Active jobs compared.
    pub active_jobs: u64,
    /// Jobs whose count was changed.
    pub updated: u64,
    /// Largest |Redis − Postgres| among active jobs before the update.
    pub max_skew: i64,
}

/// What the last successful sync read and did: all a tick needs to tell whether its own read
/// would give the statement anything new ([`decide`]). A digest rather than the counts: a few
/// bytes whatever the size of the hash.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LastSync {
    /// Digest of the statement's input: every job id and its count (or "unreadable"), in id
    /// order. Fields that are no job id are not in it: they never reach the statement.
    pub digest: u64,
    /// When the read of that sync began (a sync is as old as its read).
    pub at: Instant,
    /// Rows that sync changed.
    pub updated: u64,
}

/// Whether a tick runs the statement, and why.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Sync(SyncReason),
    /// The read is the last synced one, which found PostgreSQL in step, recently enough.
    Skip,
}

/// Why a tick runs the statement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SyncReason {
    /// No successful sync is remembered: the first tick, or the last sync failed (or was cut
    /// short), so what PostgreSQL holds is unknown.
    First,
    /// The hash reads differently from the last synced read.
    Changed,
    /// The same read, but the last sync changed rows: PostgreSQL was out of step, and something
    /// besides this loop may still be moving those rows (another replica committing an older
    /// read after ours, a job re-activated meanwhile). One more sync finds it settled.
    Unsettled,
    /// The same read, but the last sync is `resync_interval` old: PostgreSQL can drift without
    /// Redis changing (a job re-activated with a stale count, a manual UPDATE).
    ResyncDue,
}

impl SyncReason {
    pub fn as_str(self) -> &'static str {
        match self {
            SyncReason::First => "first",
            SyncReason::Changed => "changed",
            SyncReason::Unsettled => "unsettled",
            SyncReason::ResyncDue => "resync_due",
        }
    }
}

/// Whether a tick whose read has `digest`, at `now`, must run the statement after `last`. No
/// I/O and no clock: the caller passes both.
pub fn decide(last: Option<&LastSync>, digest: u64, now: Instant, resync: Duration) -> Decision {
    let Some(last) = last else { return Decision::Sync(SyncReason::First) };
    if last.digest != digest {
        Decision::Sync(SyncReason::Changed)
    } else if last.updated > 0 {
        Decision::Sync(SyncReason::Unsettled)
    } else if now.saturating_duration_since(last.at) >= resync {
        Decision::Sync(SyncReason::ResyncDue)
    } else {
        Decision::Skip
    }
}

pub struct Counters {
    db: Db,
    redis: Client,
    key: String,
    config: CountersConfig,
    skew: Histogram<u64>,
    /// Skipped fields are reported once per minute, not every tick.
    skipped_log: Mutex<ErrorLog>,
    /// The last successful sync; `None` until one succeeds and from the start of every sync until
    /// it does (a failed or cut-short sync leaves none, so the next tick syncs).
    last: Mutex<Option<LastSync>>,
    /// Keys of the read digests, random per process: the field names come from anything that
    /// can write the hash, and nobody should be able to make two reads collide on purpose.
    digests: RandomState,
}

impl Counters {
    pub fn new(db: Db, redis: Client, prefix: &str, config: CountersConfig, meter: &Meter) -> Self {
        let skew = meter
            .u64_histogram("counters.skew")
            .with_description("Per active job at each sync: |Redis running count − jobs.running_tasks|")
            .with_boundaries(vec![0.0, 1.0, 2.0, 5.0, 10.0, 50.0, 100.0, 1000.0])
            .build();
        let skipped_log = Mutex::new(ErrorLog::new(Duration::from_secs(60)));
        Self {
            db,
            redis,
            key: format!("{prefix}:running"),
            config,
            skew,
            skipped_log,
            last: Mutex::new(None),
            digests: RandomState::new(),
        }
    }

    /// One sync, whatever the last one read: read the hash, write every active job's count in
    /// one statement. Redis gets half the tick timeout, leaving the other half for the statement.
    pub async fn sync(&self) -> Result<SyncReport, CountersError> {
        self.sync_within(self.config.base.tick_timeout / 2).await
    }

    /// [`Counters::sync`] with the time Redis may take given by the caller.
    pub async fn sync_within(&self, redis_budget: Duration) -> Result<SyncReport, CountersError> {
        let now = Instant::now();
        self.forget();
        let parsed = self.read(redis_budget).await?;
        let digest = self.digest(&parsed);
        self.write(&parsed, digest, now).await
    }

    /// What a tick does: read the hash and run the statement only if [`decide`] says so; `None`
    /// when it was skipped. Redis may take `redis_budget` (the tick's budget).
    pub async fn sync_if_due(&self, redis_budget: Duration) -> Result<Option<SyncReport>, CountersError> {
        let now = Instant::now();
        // Taken, not copied: a read or a statement that fails (or a tick cut short at its
        // timeout) from here on leaves nothing remembered, so the next tick syncs.
        let last = self.forget();
        let parsed = self.read(redis_budget).await?;
        let digest = self.digest(&parsed);
        match decide(last.as_ref(), digest, now, self.config.resync_interval()) {
            Decision::Skip => {
                tracing::debug!(
                    jobs_in_hash = parsed.counts.len(),
                    since_sync = ?last.map(|l| now.saturating_duration_since(l.at)),
                    "running-task counters read as at the last sync; statement skipped"
                );
                // Remembered as it was: the resync bound counts from the last sync that looked
                // at PostgreSQL, not from this read.
                self.remember(last);
                Ok(None)
            }
            Decision::Sync(reason) => {
                tracing::debug!(reason = reason.as_str(), "running-task counters: sync due");
                let report = self.write(&parsed, digest, now).await?;
                if reason == SyncReason::ResyncDue && report.updated > 0 {
                    // Nothing in Redis changed, yet PostgreSQL had drifted: worth knowing about.
                    tracing::info!(
                        updated = report.updated,
                        max_skew = report.max_skew,
                        "a resync repaired running-task counts that drifted while the hash did not change"
                    );
                }
                Ok(Some(report))
            }
        }
    }

    fn forget(&self) -> Option<LastSync> {
        self.last.lock().unwrap_or_else(|e| e.into_inner()).take()
    }

    fn remember(&self, last: Option<LastSync>) {
        *self.last.lock().unwrap_or_else(|e| e.into_inner()) = last;
    }

    /// The digest of what the statement would be sent: ids and counts, in id order.
    fn digest(&self, parsed: &Parsed) -> u64 {
        self.digests.hash_one(&parsed.counts)
    }

    /// The whole hash, parsed, within `redis_budget`; skipped fields logged (rate-limited).
    async fn read(&self, redis_budget: Duration) -> Result<Parsed, CountersError> {
        if !self.redis.is_connected() {
            return Err(CountersError::RedisDisconnected);
        }
        // The whole scan or nothing: a partial one would zero the jobs of the pages not read.
        let parsed = tokio::time::timeout(redis_budget, self.scan())
            .await
            .map_err(|_| CountersError::RedisTimeout(redis_budget))??;
        if let Some((field, why)) = &parsed.example {
            let mut log = self.skipped_log.lock().unwrap_or_else(|e| e.into_inner());
            if let Some(repeated) = log.should_log("skipped running-task counters", Instant::now()) {
                tracing::warn!(
                    key = %self.key,
                    not_utf8 = parsed.skipped.not_utf8,
                    nul = parsed.skipped.nul,
                    not_a_number = parsed.skipped.not_a_number,
                    example_field = %field,
                    example_reason = ?why,
                    repeated,
                    "running-task counter fields that are no job's count were skipped"
                );
            }
        }
        Ok(parsed)
    }

    /// The statement for `parsed`, read at `read_at`; on success remembered as the last sync.
    async fn write(
        &self,
        parsed: &Parsed,
        digest: u64,
        read_at: Instant,
    ) -> Result<SyncReport, CountersError> {
        let (ids, counts): (Vec<&str>, Vec<Option<i64>>) =
            parsed.counts.iter().map(|(id, n)| (id.as_str(), *n)).unzip();
        let rows = db::in_transaction(&self.db, async |tx| {
            tx.fetch_all(SYNC, &[(&ids, Type::TEXT_ARRAY), (&counts, Type::INT8_ARRAY)]).await
        })
        .await?;

        let mut report = SyncReport {
            entries: parsed.entries,
            skipped: parsed.skipped,
            pages: parsed.pages,
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
        self.remember(Some(LastSync { digest, at: read_at, updated: report.updated }));
        Ok(report)
    }

    /// Every field of the hash, a page at a time (each page parsed and dropped before the next
    /// is requested: fred asks for the next page only when told to).
    async fn scan(&self) -> Result<Parsed, CountersError> {
        let mut pages =
            std::pin::pin!(self.redis.hscan(self.key.as_str(), "*", Some(self.config.scan_count)));
        let mut parsed = Parsed::default();
        while let Some(page) = pages.next().await {
            let mut page = page?;
            parsed.pages += 1;
            if let Some(fields) = page.take_results() {
                for (field, value) in fields.inner() {
                    parsed.add(field.as_bytes(), &value);
                }
            }
            page.next();
        }
        Ok(parsed)
    }
}

/// The hash as statement parameters.
#[derive(Debug, Default, PartialEq, Eq)]
struct Parsed {
    /// Job id → count, `None` for a value that is not a count (that job keeps its count). Sorted
    /// and without duplicates: `HSCAN` may return a field twice when the hash is resized
    /// meanwhile, and each job must appear once in the statement.
    counts: BTreeMap<String, Option<i64>>,
    /// Fields read, each once.
    entries: usize,
    pages: usize,
    skipped: Skipped,
    /// The first skipped field (escaped for the log) and why.
    example: Option<(String, Invalid)>,
}

impl Parsed {
    fn add(&mut self, field: &[u8], value: &Value) {
        match job_id(field) {
            Err(why) => {
                self.entries += 1;
                self.skip(field, why);
            }
            Ok(id) => {
                let n = count(value);
                // A field seen again in a later page is one entry, with its latest value.
                if self.counts.insert(id.to_owned(), n.ok()).is_none() {
                    self.entries += 1;
                    if let Err(why) = n {
                        self.skip(field, why);
                    }
                }
            }
        }
    }

    fn skip(&mut self, field: &[u8], why: Invalid) {
        self.skipped.count(why);
        self.example.get_or_insert_with(|| (String::from_utf8_lossy(field).escape_debug().to_string(), why));
    }
}

/// A field name as a job id: UTF-8 without NUL (what a PostgreSQL `text` can hold).
fn job_id(field: &[u8]) -> Result<&str, Invalid> {
    let id = std::str::from_utf8(field).map_err(|_| Invalid::NotUtf8)?;
    if id.contains('\0') { Err(Invalid::Nul) } else { Ok(id) }
}

/// A value as a running-task count: an integer (surrounding whitespace allowed).
fn count(value: &Value) -> Result<i64, Invalid> {
    let text = match value {
        Value::Integer(n) => return Ok(*n),
        Value::String(s) => &**s,
        Value::Bytes(b) => std::str::from_utf8(b).map_err(|_| Invalid::NotUtf8)?,
        _ => return Err(Invalid::NotANumber),
    };
    if text.contains('\0') {
        return Err(Invalid::Nul);
    }
    text.trim().parse().map_err(|_| Invalid::NotANumber)
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
        // A skipped sync handled no row.
        let rows = self.sync_if_due(tick.budget(tick.remaining())).await?.map_or(0, |r| r.active_jobs);
        tick.record_rows(usize::try_from(rows).unwrap_or(usize::MAX));
        Ok(Progress::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(fields: &[(&[u8], Value)]) -> Parsed {
        let mut parsed = Parsed::default();
        for (field, value) in fields {
            parsed.add(field, value);
        }
        parsed
    }

    #[test]
    fn counts_are_parsed_in_id_order_and_a_value_that_is_no_number_keeps_its_job_as_it_was() {
        let parsed = parse(&[
            (b"b".as_slice(), Value::String("-2".into())),
            (b"a".as_slice(), Value::String(" 3\n".into())),
            (b"c".as_slice(), Value::String("lots".into())),
            (b"d".as_slice(), Value::Integer(7)),
            (b"e".as_slice(), Value::Bytes(b"5".to_vec().into())),
        ]);
        let counts: Vec<(&str, Option<i64>)> = parsed.counts.iter().map(|(k, v)| (k.as_str(), *v)).collect();
        assert_eq!(counts, [("a", Some(3)), ("b", Some(-2)), ("c", None), ("d", Some(7)), ("e", Some(5))]);
        assert_eq!(parsed.skipped, Skipped { not_a_number: 1, ..Skipped::default() });
        assert_eq!(parsed.entries, 5);
    }

    #[test]
    fn each_kind_of_poison_field_is_skipped_and_counted_by_why() {
        let parsed = parse(&[
            (b"ok".as_slice(), Value::String("1".into())),
            (b"\xff\xfejob".as_slice(), Value::String("1".into())), // name not UTF-8: no job id
            (b"jo\0b".as_slice(), Value::String("1".into())),       // name with NUL: PostgreSQL refuses it
            (b"v-bytes".as_slice(), Value::Bytes(b"\xff1".to_vec().into())), // value not UTF-8
            (b"v-nul".as_slice(), Value::String("1\0".into())),     // value with NUL
            (b"v-float".as_slice(), Value::String("1.5".into())),   // not an integer
            (b"v-array".as_slice(), Value::Array(vec![])),          // not a string at all
        ]);
        assert_eq!(parsed.skipped, Skipped { not_utf8: 2, nul: 2, not_a_number: 2 });
        assert_eq!(parsed.skipped.total(), 6);
        assert_eq!(parsed.entries, 7);
        let ids: Vec<&str> = parsed.counts.keys().map(String::as_str).collect();
        assert_eq!(
            ids,
            ["ok", "v-array", "v-bytes", "v-float", "v-nul"],
            "bad names never reach the statement"
        );
        assert_eq!(parsed.counts["ok"], Some(1));
        assert!(parsed.counts.iter().filter(|(k, _)| *k != "ok").all(|(_, v)| v.is_none()));
        let (example, why) = parsed.example.expect("an example");
        assert_eq!((example.as_str(), why), ("\u{fffd}\u{fffd}job", Invalid::NotUtf8), "escaped for the log");
    }

    #[test]
    fn a_sync_is_skipped_only_for_an_unchanged_read_after_a_settled_recent_sync() {
        use Decision::{Skip, Sync};
        use SyncReason::{Changed, First, ResyncDue, Unsettled};
        const READ: u64 = 7;
        const OTHER: u64 = 8;
        let t0 = Instant::now();
        let resync = Duration::from_secs(60);
        let settled = Some(LastSync { digest: READ, at: t0, updated: 0 });
        let unsettled = Some(LastSync { digest: READ, at: t0, updated: 3 });
        let later = Some(LastSync { digest: READ, at: t0 + resync, updated: 0 });
        let tick = t0 + Duration::from_secs(5);
        let almost = t0 + resync - Duration::from_millis(1);
        let cases = [
            ("first tick", None, READ, tick, Sync(First)),
            ("changed read", settled, OTHER, tick, Sync(Changed)),
            ("changed read after an unsettled sync", unsettled, OTHER, tick, Sync(Changed)),
            ("unchanged and settled", settled, READ, tick, Skip),
            ("unchanged, but the last sync updated rows", unsettled, READ, tick, Sync(Unsettled)),
            ("unchanged, just short of the resync", settled, READ, almost, Skip),
            ("unchanged, the resync due", settled, READ, t0 + resync, Sync(ResyncDue)),
            ("unchanged, the resync long overdue", settled, READ, t0 + resync * 10, Sync(ResyncDue)),
            // A `now` read before the last sync's `at` is no reason to resync (nor a panic).
            ("unchanged, now before the last sync", later, READ, t0, Skip),
        ];
        for (case, last, digest, now, expected) in cases {
            assert_eq!(decide(last.as_ref(), digest, now, resync), expected, "{case}");
        }
    }

    #[test]
    fn a_field_seen_twice_is_one_entry_with_its_latest_value() {
        let parsed = parse(&[
            (b"a".as_slice(), Value::String("1".into())),
            (b"a".as_slice(), Value::String("2".into())),
        ]);
        assert_eq!(parsed.entries, 1);
        assert_eq!(parsed.counts["a"], Some(2));
    }
}
