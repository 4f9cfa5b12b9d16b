//! The admission queue for operators: `worker chat quota set|list|rm` (the `chat_quotas` rows
//! the claim reads, so a change applies at the next claim on every replica), `worker chat queue`
//! (pending and running per owner and per org, the oldest wait first) and why each chat of
//! `worker chat list --status pending` waits.
//!
//! Caps are counted as the claim counts them ([`admission`](super::admission)): running chats
//! over every replica; a subject's cap is its quota's `max_running`, else the `[chats]` default
//! of this process's config (`max_running_per_owner`, `max_running_per_org`); 0 = no cap.

use std::io::{self, Write};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::Serialize;
use tokio_postgres::Row;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::admission::Rules;
use crate::db::{self, Db, DbError, Exec};
use crate::text::{one_line, terminal};

/// `last_error` is shown on one line of at most this many characters.
const LAST_ERROR_CHARS: usize = 200;

/// One row of `chat list`.
#[derive(Debug, Clone, Serialize)]
pub struct ChatSummary {
    pub id: Uuid,
    pub status: String,
    pub title: String,
    pub owner_id: Uuid,
    pub worker_id: Option<Uuid>,
    pub generation: i64,
    pub updated_at: DateTime<Utc>,
    /// The first line, at most 200 characters.
    pub last_error: Option<String>,
    pub org_id: Option<Uuid>,
    /// `--status pending` only (else null): when the chat became pending, the seconds since, and
    /// why it waits.
    pub pending_since: Option<DateTime<Utc>>,
    pub wait_seconds: Option<f64>,
    pub waits_for: Option<WaitsFor>,
}

/// A `chat list` row from columns `id, status, title, owner_id, worker_id, generation,
/// updated_at, last_error, org_id` (in this order, first); no wait.
pub(super) fn summary(row: &Row) -> ChatSummary {
    ChatSummary {
        id: row.get(0),
        status: row.get(1),
        title: row.get(2),
        owner_id: row.get(3),
        worker_id: row.get(4),
        generation: row.get(5),
        updated_at: row.get(6),
        last_error: row.get::<_, Option<String>>(7).map(|e| one_line(&e, LAST_ERROR_CHARS)),
        org_id: row.get(8),
        pending_since: None,
        wait_seconds: None,
        waits_for: None,
    }
}

/// Largest `--max-running` of a quota (the same bound as the config's default caps).
pub const MAX_QUOTA_RUNNING: i32 = 1_000_000;
/// Largest `--weight` (the CHECK on `chat_quotas.weight`).
pub const MAX_WEIGHT: f64 = 1000.0;

/// Upsert: an omitted `$3` (max_running) or `$4` (weight) is NULL (the default cap) and 1 on
/// insert, and keeps the current value on update.
const QUOTA_SET: &str = "INSERT INTO chat_quotas AS q (subject_kind, subject_id, max_running, weight) \
     VALUES ($1, $2, $3, coalesce($4, 1)) \
     ON CONFLICT (subject_kind, subject_id) DO UPDATE SET \
       max_running = coalesce($3, q.max_running), weight = coalesce($4, q.weight), updated_at = now() \
     RETURNING subject_kind, subject_id, max_running, weight, updated_at";
const QUOTA_LIST: &str = "SELECT subject_kind, subject_id, max_running, weight, updated_at \
     FROM chat_quotas ORDER BY subject_kind DESC, subject_id";
const QUOTA_RM: &str = "DELETE FROM chat_quotas WHERE subject_kind = $1 AND subject_id = $2 \
     RETURNING subject_kind, subject_id, max_running, weight, updated_at";

/// The oldest `$1` pending chats in the queue (not archived: the claim never takes those),
/// with the running count and quota of each one's owner and org. The chat columns come first,
/// in the order [`summary`] reads them. Counts use `chats_running_owner_idx` and
/// `chats_running_org_idx`, one probe per distinct subject of the page.
const PENDING: &str = "WITH p AS (\
       SELECT id, status, title, owner_id, worker_id, generation, updated_at, last_error, org_id, \
              pending_since \
       FROM chats WHERE status = 'pending' AND NOT archived ORDER BY pending_since, id LIMIT $1), \
     owners AS (\
       SELECT o.owner_id, q.max_running, \
              (SELECT count(*) FROM chats AS c WHERE c.status = 'running' AND c.owner_id = o.owner_id) \
                AS running \
       FROM (SELECT DISTINCT owner_id FROM p) AS o \
       LEFT JOIN chat_quotas AS q ON q.subject_kind = 'owner' AND q.subject_id = o.owner_id), \
     orgs AS (\
       SELECT g.org_id, q.max_running, \
              (SELECT count(*) FROM chats AS c WHERE c.status = 'running' AND c.org_id = g.org_id) \
                AS running \
       FROM (SELECT DISTINCT org_id FROM p WHERE org_id IS NOT NULL) AS g \
       LEFT JOIN chat_quotas AS q ON q.subject_kind = 'org' AND q.subject_id = g.org_id) \
     SELECT p.id, p.status, p.title, p.owner_id, p.worker_id, p.generation, p.updated_at, \
            p.last_error, p.org_id, p.pending_since, \
            extract(epoch FROM now() - p.pending_since)::float8, \
            o.running, o.max_running, g.running, g.max_running \
     FROM p JOIN owners AS o ON o.owner_id = p.owner_id LEFT JOIN orgs AS g ON g.org_id = p.org_id \
     ORDER BY p.pending_since, p.id";

/// Pending (not archived) and running chats per owner and per org, with each subject's quota:
/// the rows of a pending partial index (`chats_pending_owner_idx`) and of
/// `chats_running_owner_idx`, grouped, and one quota probe per subject. Subjects with the oldest
/// wait first (an owner before its org on a tie), those with nothing pending last.
const QUEUE: &str = "WITH live AS (\
       SELECT owner_id, org_id, true AS pending, pending_since FROM chats \
       WHERE status = 'pending' AND NOT archived \
       UNION ALL \
       SELECT owner_id, org_id, false, NULL FROM chats WHERE status = 'running'), \
     subjects AS (\
       SELECT 'owner' AS kind, owner_id AS id, count(*) FILTER (WHERE pending) AS pending, \
              count(*) FILTER (WHERE NOT pending) AS running, min(pending_since) AS oldest \
       FROM live GROUP BY owner_id \
       UNION ALL \
       SELECT 'org', org_id, count(*) FILTER (WHERE pending), count(*) FILTER (WHERE NOT pending), \
              min(pending_since) \
       FROM live WHERE org_id IS NOT NULL GROUP BY org_id) \
     SELECT s.kind, s.id, s.pending, s.running, q.max_running, coalesce(q.weight, 1), \
            extract(epoch FROM now() - s.oldest)::float8 \
     FROM subjects AS s \
     LEFT JOIN chat_quotas AS q ON q.subject_kind = s.kind AND q.subject_id = s.id \
     ORDER BY s.oldest NULLS LAST, s.kind = 'org', s.id";

#[derive(Debug, thiserror::Error)]
pub enum QuotaError {
    #[error("invalid --max-running `{0}`: expected 0..=1000000 (0 = no cap)")]
    MaxRunning(String),
    #[error("invalid --weight `{0}`: expected a number greater than 0 and at most 1000")]
    Weight(String),
    #[error("expected exactly one of --owner UUID or --org UUID")]
    Subject,
    #[error("no quota for {0}")]
    NoQuota(Subject),
}

/// Whom a quota is for (`chat_quotas.subject_kind`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum SubjectKind {
    Owner,
    Org,
}

impl SubjectKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SubjectKind::Owner => "owner",
            SubjectKind::Org => "org",
        }
    }

    /// From the column (a CHECK allows only `owner` and `org`).
    fn of(text: &str) -> Self {
        if text == "org" { SubjectKind::Org } else { SubjectKind::Owner }
    }
}

/// An owner or an org.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subject {
    pub kind: SubjectKind,
    pub id: Uuid,
}

impl std::fmt::Display for Subject {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}", self.kind.as_str(), self.id)
    }
}

/// A `--max-running` value: 0..=[`MAX_QUOTA_RUNNING`], 0 = no cap.
pub fn parse_max_running(raw: &str) -> Result<i32, QuotaError> {
    raw.parse::<i32>()
        .ok()
        .filter(|n| (0..=MAX_QUOTA_RUNNING).contains(n))
        .ok_or_else(|| QuotaError::MaxRunning(raw.to_owned()))
}

/// A `--weight` value: greater than 0, at most [`MAX_WEIGHT`] (NaN and infinities refused).
pub fn parse_weight(raw: &str) -> Result<f64, QuotaError> {
    raw.parse::<f64>()
        .ok()
        .filter(|w| *w > 0.0 && *w <= MAX_WEIGHT)
        .ok_or_else(|| QuotaError::Weight(raw.to_owned()))
}

/// The cap that applies: the quota's `max_running` when set, else the config default; `None` =
/// no cap (a 0 in either).
pub fn effective_cap(quota: Option<i32>, default: u32) -> Option<i64> {
    match quota.map_or(i64::from(default), i64::from) {
        0 => None,
        cap => Some(cap),
    }
}

/// A subject's running chats (over every replica) and the cap that applies to it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Load {
    pub running: i64,
    pub cap: Option<i64>,
}

impl Load {
    fn at_cap(self) -> bool {
        self.cap.is_some_and(|cap| self.running >= cap)
    }
}

/// Why a pending chat waits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitsFor {
    /// Its owner runs as many chats as its cap allows.
    OwnerCap,
    /// Its org runs as many chats as its cap allows.
    OrgCap,
    /// Nothing of its own: a free slot on some worker (or its turn in the fair order).
    Capacity,
}

impl WaitsFor {
    pub fn as_str(self) -> &'static str {
        match self {
            WaitsFor::OwnerCap => "owner_cap",
            WaitsFor::OrgCap => "org_cap",
            WaitsFor::Capacity => "capacity",
        }
    }
}

/// The owner's cap first (the claim checks it first), then the org's, else capacity.
pub fn waits_for(owner: Load, org: Option<Load>) -> WaitsFor {
    if owner.at_cap() {
        WaitsFor::OwnerCap
    } else if org.is_some_and(Load::at_cap) {
        WaitsFor::OrgCap
    } else {
        WaitsFor::Capacity
    }
}

/// One `chat_quotas` row, as stored (`max_running`: NULL = the default cap, 0 = no cap).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Quota {
    pub subject_kind: SubjectKind,
    pub subject_id: Uuid,
    pub max_running: Option<i32>,
    pub weight: f64,
    pub updated_at: DateTime<Utc>,
}

impl Quota {
    fn of(row: &Row) -> Self {
        Self {
            subject_kind: SubjectKind::of(row.get(0)),
            subject_id: row.get(1),
            max_running: row.get(2),
            weight: row.get(3),
            updated_at: row.get(4),
        }
    }
}

/// Inserts or updates `subject`'s quota (see [`QUOTA_SET`]); returns the row as stored.
pub async fn set_quota(
    tx: &impl Exec,
    subject: Subject,
    max_running: Option<i32>,
    weight: Option<f64>,
) -> Result<Quota, DbError> {
    let kind = subject.kind.as_str();
    let row = tx
        .fetch_one(
            QUOTA_SET,
            &[
                (&kind, Type::TEXT),
                (&subject.id, Type::UUID),
                (&max_running, Type::INT4),
                (&weight, Type::FLOAT8),
            ],
        )
        .await?;
    Ok(Quota::of(&row))
}

/// Every quota, owners first.
pub async fn quotas(db: &Db) -> Result<Vec<Quota>, DbError> {
    db::in_transaction(db, async |tx| {
        Ok(tx.fetch_all(QUOTA_LIST, &[]).await?.iter().map(Quota::of).collect())
    })
    .await
}

/// Deletes `subject`'s quota; the removed row, or `None` when it had none.
pub async fn remove_quota(tx: &impl Exec, subject: Subject) -> Result<Option<Quota>, DbError> {
    let kind = subject.kind.as_str();
    let row = tx.fetch_opt(QUOTA_RM, &[(&kind, Type::TEXT), (&subject.id, Type::UUID)]).await?;
    Ok(row.as_ref().map(Quota::of))
}

/// The oldest `limit` pending chats, oldest first, each with its wait and why it waits.
pub async fn pending(db: &Db, defaults: Rules, limit: i64) -> Result<Vec<ChatSummary>, DbError> {
    let rows =
        db::in_transaction(db, async |tx| tx.fetch_all(PENDING, &[(&limit, Type::INT8)]).await).await?;
    Ok(rows
        .iter()
        .map(|row| {
            let owner = Load { running: row.get(11), cap: effective_cap(row.get(12), defaults.owner_cap) };
            let org = row
                .get::<_, Option<i64>>(13)
                .map(|running| Load { running, cap: effective_cap(row.get(14), defaults.org_cap) });
            ChatSummary {
                pending_since: row.get(9),
                wait_seconds: row.get(10),
                waits_for: Some(waits_for(owner, org)),
                ..summary(row)
            }
        })
        .collect())
}

/// One owner's or one org's share of the queue.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct SubjectQueue {
    pub kind: SubjectKind,
    pub id: Uuid,
    pub pending: i64,
    pub running: i64,
    /// The cap that applies (quota, else the default); `null` = no cap.
    pub cap: Option<i64>,
    pub weight: f64,
    /// Seconds the oldest pending chat has waited; `null` when none is pending.
    pub oldest_wait_seconds: Option<f64>,
}

/// The whole queue: every chat counted once (by its owner).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Totals {
    pub pending: i64,
    pub running: i64,
    pub oldest_wait_seconds: Option<f64>,
}

/// `worker chat queue`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Queue {
    pub subjects: Vec<SubjectQueue>,
    pub totals: Totals,
}

/// The totals, from the owner rows (every chat has exactly one owner; orgs would count twice).
pub fn totals(subjects: &[SubjectQueue]) -> Totals {
    let owners = subjects.iter().filter(|s| s.kind == SubjectKind::Owner);
    owners.fold(Totals { pending: 0, running: 0, oldest_wait_seconds: None }, |t, s| Totals {
        pending: t.pending + s.pending,
        running: t.running + s.running,
        oldest_wait_seconds: match (t.oldest_wait_seconds, s.oldest_wait_seconds) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        },
    })
}

/// Pending and running chats per owner and per org (see [`QUEUE`]).
pub async fn queue(db: &Db, defaults: Rules) -> Result<Queue, DbError> {
    let rows = db::in_transaction(db, async |tx| tx.fetch_all(QUEUE, &[]).await).await?;
    let subjects: Vec<SubjectQueue> = rows
        .iter()
        .map(|row| {
            let kind = SubjectKind::of(row.get(0));
            let default = match kind {
                SubjectKind::Owner => defaults.owner_cap,
                SubjectKind::Org => defaults.org_cap,
            };
            SubjectQueue {
                kind,
                id: row.get(1),
                pending: row.get(2),
                running: row.get(3),
                cap: effective_cap(row.get(4), default),
                weight: row.get(5),
                oldest_wait_seconds: row.get(6),
            }
        })
        .collect();
    let totals = totals(&subjects);
    Ok(Queue { subjects, totals })
}

/// A wait as whole seconds in humantime's form (`3m 12s`).
pub fn wait(seconds: f64) -> String {
    humantime::format_duration(Duration::from_secs(seconds.max(0.0).round() as u64)).to_string()
}

fn cap_text(cap: Option<i64>) -> String {
    cap.map_or_else(|| "none".to_owned(), |cap| cap.to_string())
}

/// A quota's `max_running` as stored: `default` (NULL), `none` (0) or the number.
fn quota_cap_text(max_running: Option<i32>) -> String {
    match max_running {
        None => "default".to_owned(),
        Some(0) => "none".to_owned(),
        Some(n) => n.to_string(),
    }
}

/// Quotas as a table, one row each.
pub fn write_quotas(out: &mut impl Write, quotas: &[Quota]) -> io::Result<()> {
    writeln!(out, "{:<5} {:<36} {:>11} {:>8} UPDATED", "KIND", "ID", "MAX RUNNING", "WEIGHT")?;
    for q in quotas {
        writeln!(
            out,
            "{:<5} {:<36} {:>11} {:>8} {}",
            q.subject_kind.as_str(),
            q.subject_id,
            quota_cap_text(q.max_running),
            q.weight,
            q.updated_at.format("%Y-%m-%d %H:%M:%S")
        )?;
    }
    if quotas.is_empty() {
        writeln!(out, "(no quotas: every owner and org has the default cap and weight 1)")?;
    }
    Ok(())
}

/// The queue as a table, one row per subject, then the totals.
pub fn write_queue(out: &mut impl Write, queue: &Queue) -> io::Result<()> {
    writeln!(
        out,
        "{:<5} {:<36} {:>7} {:>7} {:>7} {:>6} OLDEST WAIT",
        "KIND", "ID", "PENDING", "RUNNING", "CAP", "WEIGHT"
    )?;
    let oldest = |seconds: Option<f64>| seconds.map_or_else(|| "-".to_owned(), wait);
    for s in &queue.subjects {
        writeln!(
            out,
            "{:<5} {:<36} {:>7} {:>7} {:>7} {:>6} {}",
            s.kind.as_str(),
            s.id,
            s.pending,
            s.running,
            cap_text(s.cap),
            s.weight,
            oldest(s.oldest_wait_seconds)
        )?;
    }
    let t = &queue.totals;
    writeln!(
        out,
        "{:<5} {:<36} {:>7} {:>7} {:>7} {:>6} {}",
        "total",
        "",
        t.pending,
        t.running,
        "",
        "",
        oldest(t.oldest_wait_seconds)
    )?;
    Ok(())
}

/// `chat list --status pending` as a table: the wait and its reason instead of the worker.
pub fn write_pending(out: &mut impl Write, chats: &[ChatSummary]) -> io::Result<()> {
    writeln!(
        out,
        "{:<36} {:>4} {:<16} {:<9} {:<36} {:<36} TITLE / LAST ERROR",
        "ID", "GEN", "WAIT", "WAITS FOR", "OWNER", "ORG"
    )?;
    for c in chats {
        let org = c.org_id.map_or_else(|| "-".to_owned(), |o| o.to_string());
        let waited = c.wait_seconds.map_or_else(|| "-".to_owned(), wait);
        let reason = c.waits_for.map_or("-", WaitsFor::as_str);
        let mut about = c.title.clone();
        if let Some(error) = &c.last_error {
            about = format!("{about} / {error}");
        }
        // Titles and errors come from users and agents: escaped for the terminal.
        writeln!(
            out,
            "{:<36} {:>4} {:<16} {:<9} {:<36} {:<36} {}",
            c.id,
            c.generation,
            waited,
            reason,
            c.owner_id,
            org,
            terminal(&about)
        )?;
    }
    if chats.is_empty() {
        writeln!(out, "(no pending chats)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quota_values_are_checked_and_errors_name_the_value() {
        assert_eq!(parse_max_running("0").ok(), Some(0));
        assert_eq!(parse_max_running("1000000").ok(), Some(1_000_000));
        for bad in ["-1", "1000001", "3.5", "", "many", "99999999999"] {
            let error = parse_max_running(bad).expect_err(bad).to_string();
            assert!(error.contains(&format!("`{bad}`")), "{error}");
        }
        assert_eq!(parse_weight("0.5").ok(), Some(0.5));
        assert_eq!(parse_weight("1000").ok(), Some(1000.0));
        for bad in ["0", "-2", "1000.5", "nan", "inf", "heavy"] {
            let error = parse_weight(bad).expect_err(bad).to_string();
            assert!(error.contains(&format!("--weight `{bad}`")), "{error}");
        }
    }

    #[test]
    fn the_cap_is_the_quota_else_the_default_and_zero_is_none() {
        assert_eq!(effective_cap(None, 5), Some(5));
        assert_eq!(effective_cap(Some(3), 5), Some(3));
        assert_eq!(effective_cap(Some(0), 5), None, "a quota of 0 lifts the default cap");
        assert_eq!(effective_cap(None, 0), None);
        assert_eq!(effective_cap(Some(2), 0), Some(2), "a quota caps where the default does not");
    }

    #[test]
    fn a_chat_waits_for_its_owner_cap_first_then_its_org_cap_else_capacity() {
        let full = Load { running: 3, cap: Some(3) };
        let room = Load { running: 2, cap: Some(3) };
        let uncapped = Load { running: 100, cap: None };
        assert_eq!(waits_for(full, Some(full)), WaitsFor::OwnerCap);
        assert_eq!(waits_for(full, None), WaitsFor::OwnerCap);
        assert_eq!(waits_for(room, Some(full)), WaitsFor::OrgCap);
        assert_eq!(waits_for(uncapped, Some(Load { running: 4, cap: Some(3) })), WaitsFor::OrgCap);
        assert_eq!(waits_for(room, Some(room)), WaitsFor::Capacity);
        assert_eq!(waits_for(uncapped, Some(uncapped)), WaitsFor::Capacity);
        assert_eq!(waits_for(room, None), WaitsFor::Capacity);
        assert_eq!(serde_json::to_value(WaitsFor::OwnerCap).ok(), Some(serde_json::json!("owner_cap")));
    }

    fn subject(kind: SubjectKind, pending: i64, running: i64, oldest: Option<f64>) -> SubjectQueue {
        SubjectQueue {
            kind,
            id: Uuid::new_v4(),
            pending,
            running,
            cap: Some(2),
            weight: 1.0,
            oldest_wait_seconds: oldest,
        }
    }

    #[test]
    fn totals_count_each_chat_once_by_its_owner() {
        let subjects = [
            subject(SubjectKind::Owner, 3, 1, Some(40.0)),
            subject(SubjectKind::Org, 5, 2, Some(90.0)),
            subject(SubjectKind::Owner, 2, 1, Some(90.0)),
            subject(SubjectKind::Owner, 0, 4, None),
        ];
        assert_eq!(totals(&subjects), Totals { pending: 5, running: 6, oldest_wait_seconds: Some(90.0) });
        assert_eq!(totals(&[]), Totals { pending: 0, running: 0, oldest_wait_seconds: None });
    }

    #[test]
    fn waits_are_whole_seconds_in_human_form() {
        assert_eq!(wait(0.4), "0s");
        assert_eq!(wait(192.2), "3m 12s");
        assert_eq!(wait(-1.0), "0s", "a clock step back is no wait");
    }

    #[test]
    fn the_queue_table_shows_none_for_no_cap_and_a_dash_for_nothing_pending() {
        let mut idle = subject(SubjectKind::Org, 0, 4, None);
        idle.cap = None;
        let queue = Queue {
            subjects: vec![subject(SubjectKind::Owner, 3, 2, Some(75.0)), idle],
            totals: Totals { pending: 3, running: 6, oldest_wait_seconds: Some(75.0) },
        };
        let mut out = Vec::new();
        write_queue(&mut out, &queue).expect("table");
        let out = String::from_utf8(out).expect("utf-8");
        let lines: Vec<Vec<&str>> = out.lines().map(|l| l.split_whitespace().collect()).collect();
        assert_eq!(lines[0], ["KIND", "ID", "PENDING", "RUNNING", "CAP", "WEIGHT", "OLDEST", "WAIT"]);
        assert_eq!(lines[1][2..], ["3", "2", "2", "1", "1m", "15s"]);
        assert_eq!(lines[2][2..], ["0", "4", "none", "1", "-"]);
        assert_eq!(lines[3], ["total", "3", "6", "1m", "15s"]);
    }

    #[test]
    fn the_pending_table_escapes_titles_and_errors() {
        let chat = ChatSummary {
            id: Uuid::nil(),
            status: "pending".into(),
            title: "t\u{1b}[2J".into(),
            owner_id: Uuid::nil(),
            worker_id: None,
            generation: 1,
            updated_at: Utc::now(),
            last_error: Some("boom\u{9b}31m".into()),
            org_id: None,
            pending_since: Some(Utc::now()),
            wait_seconds: Some(61.0),
            waits_for: Some(WaitsFor::OrgCap),
        };
        let mut out = Vec::new();
        write_pending(&mut out, &[chat]).expect("table");
        let out = String::from_utf8(out).expect("utf-8");
        assert!(out.contains("t\\x1b[2J / boom\\u{9b}31m"), "{out}");
        assert!(out.contains("1m 1s") && out.contains("org_cap"), "{out}");
        assert!(!out.contains(['\u{1b}', '\u{9b}']), "{out:?}");
    }
}
