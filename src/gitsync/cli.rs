//! `worker gitsync …`: the refresh backlog, and marking one chat due now. A readable table by
//! default, JSON with `--json`.

use std::collections::BTreeMap;
use std::io::Write;
use std::time::Duration;

use clap::Subcommand;
use serde::Serialize;
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::db::{self, Db, DbError, Exec};

/// A row is due when the refresher would lease it (same conditions as its lease).
const STATS: &str = "SELECT \
       count(*) FILTER (WHERE due), \
       count(*) FILTER (WHERE d.leased_at IS NOT NULL AND d.stale_at > now()), \
       coalesce(extract(epoch FROM now() - min(d.stale_at) FILTER (WHERE due)), 0)::float8, \
       count(*) \
     FROM chat_diff_statuses AS d JOIN chats AS c ON c.id = d.chat_id, \
     LATERAL (SELECT d.stale_at <= now() AND d.git_remote_origin <> '' AND d.git_branch <> '' \
              AND NOT c.archived AS due) AS f";

const BY_OUTCOME: &str =
    "SELECT coalesce(last_outcome, 'never'), count(*) FROM chat_diff_statuses GROUP BY 1 ORDER BY 1";

/// Due now, as `mark_diff_stale` would (origin and branch kept); any lease is dropped, and an
/// answer in flight for the old lease is discarded by the refresher's fence.
const REFRESH: &str = "UPDATE chat_diff_statuses \
     SET stale_at = now(), leased_at = NULL, updated_at = now() WHERE chat_id = $1";

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum GitsyncCommand {
    /// Rows due, leased, by last outcome, and how long the oldest due row has waited.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Mark a chat's diff status due now; the next gitsync tick on any replica refreshes it.
    Refresh {
        /// The chat's id.
        chat_id: Uuid,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("chat {0} has no diff status (mark_diff_stale was never called for it)")]
    NoDiffStatus(Uuid),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// `worker gitsync stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GitsyncStats {
    pub rows: u64,
    /// Due now (the next tick leases them).
    pub due: u64,
    /// Leased by a tick in progress (or by one that died, until the lease expires).
    pub leased: u64,
    /// How long past its `stale_at` the oldest due row is; 0 when none is due.
    pub oldest_due_secs: f64,
    /// Rows by `last_outcome` (`never` = not refreshed since it was marked).
    pub by_outcome: BTreeMap<String, u64>,
}

pub async fn stats(db: &Db) -> Result<GitsyncStats, DbError> {
    let conn = db.get().await?;
    let row = conn.fetch_one(STATS, &[]).await?;
    let by_outcome =
        conn.fetch_all(BY_OUTCOME, &[]).await?.iter().map(|r| (r.get(0), count(r.get(1)))).collect();
    Ok(GitsyncStats {
        due: count(row.get(0)),
        leased: count(row.get(1)),
        oldest_due_secs: row.get::<_, f64>(2).max(0.0),
        rows: count(row.get(3)),
        by_outcome,
    })
}

/// `worker gitsync refresh <chat_id>`.
pub async fn mark_due(db: &Db, chat_id: Uuid) -> Result<(), CliError> {
    let mut conn = db.get().await?;
    let tx = db::begin(&mut conn, db.statement_timeout()).await?;
    let updated = tx.exec(REFRESH, &[(&chat_id, Type::UUID)]).await?;
    db::commit(tx).await?;
    if updated == 0 {
        return Err(CliError::NoDiffStatus(chat_id));
    }
    Ok(())
}

/// Runs one `worker gitsync` command, writing its output to `out`.
pub async fn run(db: &Db, command: &GitsyncCommand, out: &mut impl Write) -> Result<(), CliError> {
    match command {
        GitsyncCommand::Stats { json } => {
            let stats = stats(db).await?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &stats)?;
                writeln!(out)?;
                return Ok(());
            }
            writeln!(out, "{:<14} {:>10}", "rows", stats.rows)?;
            writeln!(out, "{:<14} {:>10}", "due", stats.due)?;
            writeln!(out, "{:<14} {:>10}", "leased", stats.leased)?;
            writeln!(out, "{:<14} {:>10}", "oldest due", age(stats.oldest_due_secs))?;
            writeln!(out)?;
            writeln!(out, "{:<14} {:>10}", "LAST OUTCOME", "ROWS")?;
            for (outcome, n) in &stats.by_outcome {
                writeln!(out, "{outcome:<14} {n:>10}")?;
            }
        }
        GitsyncCommand::Refresh { chat_id } => {
            mark_due(db, *chat_id).await?;
            writeln!(out, "chat {chat_id} is due now; the next gitsync tick refreshes it")?;
        }
    }
    Ok(())
}

fn age(secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    humantime::format_duration(Duration::from_secs(secs.round() as u64)).to_string()
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}
