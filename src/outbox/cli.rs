//! `worker outbox …`: stats and dead-letter operations. A readable table by default, JSON with
//! `--json` (one document per command, for scripts).

use std::io::Write;
use std::time::Duration;

use clap::Subcommand;

use serde_json::json;

use super::dead::{self, Selection};
use super::stats;
use crate::audit::{self, Action, Actor};
use crate::db::{Db, DbError};
use crate::text::{one_line, terminal};

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum OutboxCommand {
    /// Backlog per queue: rows, due now, retrying, age of the oldest due row, dead letters.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Inspect, requeue or purge dead-lettered tasks.
    #[command(subcommand)]
    Dead(DeadCommand),
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum DeadCommand {
    /// The newest dead letters first.
    List {
        #[arg(long, default_value_t = 50)]
        limit: i64,
        /// Only this queue.
        #[arg(long)]
        queue: Option<String>,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Put dead letters back into the outbox: attempts reset, due now. Of several chosen copies
    /// of one task the newest comes back and the older ones are removed; dead letters of a job
    /// that is over (canceled, completed, failed) are skipped and kept.
    Requeue {
        /// Dead-letter ids (from `dead list`); repeat or list several: `--id 3 7 9`.
        #[arg(long = "id", value_name = "ID", num_args = 1.., required_unless_present = "all", conflicts_with = "all")]
        ids: Vec<i64>,
        /// Every dead letter.
        #[arg(long)]
        all: bool,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Delete dead letters older than a duration (e.g. `7d`, `12h`).
    Purge {
        #[arg(long, value_name = "DURATION", value_parser = humantime::parse_duration)]
        older_than: Duration,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs one `worker outbox` command, writing its output to `out`; `requeue` and `purge` are
/// recorded in the audit trail as `actor`'s (rows: the dead letters removed).
pub async fn run(
    db: &Db,
    actor: &Actor,
    command: &OutboxCommand,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match command {
        OutboxCommand::Stats { json } => {
            let stats = stats::outbox_stats(db).await?;
            if *json {
                return write_json(out, &stats);
            }
            writeln!(
                out,
                "{:<24} {:>10} {:>10} {:>10} {:>14} {:>10}",
                "QUEUE", "ROWS", "DUE", "RETRYING", "OLDEST DUE", "DEAD"
            )?;
            for q in &stats.queues {
                writeln!(
                    out,
                    "{:<24} {:>10} {:>10} {:>10} {:>14} {:>10}",
                    terminal(&q.queue),
                    q.rows,
                    q.due,
                    q.retrying,
                    age(q.oldest_due_age_secs),
                    q.dead
                )?;
            }
            writeln!(
                out,
                "{:<24} {:>10} {:>10} {:>10} {:>14} {:>10}",
                "TOTAL",
                stats.rows,
                stats.due,
                stats.retrying,
                age(stats.oldest_due_age_secs),
                stats.dead
            )?;
        }
        OutboxCommand::Dead(DeadCommand::List { limit, queue, json }) => {
            let letters = dead::list(db, queue.as_deref(), *limit).await?;
            if *json {
                return write_json(out, &letters);
            }
            writeln!(
                out,
                "{:>8} {:<36} {:<16} {:<16} {:>8} {:<20} LAST ERROR",
                "ID", "TASK", "QUEUE", "JOB", "ATTEMPTS", "DEAD SINCE"
            )?;
            // Task ids, queues and errors come from producers and consumers: escaped for the
            // terminal.
            for d in &letters {
                writeln!(
                    out,
                    "{:>8} {:<36} {:<16} {:<16} {:>8} {:<20} {}",
                    d.id,
                    terminal(&d.task_id),
                    terminal(&d.queue),
                    terminal(d.job_id.as_deref().unwrap_or("-")),
                    d.attempts,
                    d.dead_lettered_at.format("%Y-%m-%d %H:%M:%S"),
                    terminal(&one_line(d.last_error.as_deref().unwrap_or(""), 120))
                )?;
            }
            if letters.is_empty() {
                writeln!(out, "(no dead letters)")?;
            }
        }
        OutboxCommand::Dead(DeadCommand::Requeue { ids, all, json }) => {
            let (selection, arguments) = if *all {
                (Selection::All, json!({ "all": true }))
            } else {
                (Selection::Ids(ids.clone()), json!({ "ids": ids }))
            };
            let action = Action::new("outbox dead requeue", arguments);
            let report = audit::run(db, actor, action, async |tx| {
                let report = dead::requeue(tx, &selection).await?;
                let removed = report.removed;
                Ok::<_, CliError>((report, Some(removed)))
            })
            .await?;
            if *json {
                return write_json(out, &report);
            }
            writeln!(out, "requeued {} dead letter(s) (attempts reset, due now)", report.requeued)?;
            if report.superseded > 0 {
                writeln!(
                    out,
                    "removed {} older dead letter(s) superseded by a newer copy of the same task, requeued instead",
                    report.superseded
                )?;
            }
            if report.already_pending > 0 {
                writeln!(
                    out,
                    "removed {} dead letter(s) whose task is already back in the outbox",
                    report.already_pending
                )?;
            }
            if report.skipped > 0 {
                let why: Vec<String> =
                    report.skipped_by_job_status.iter().map(|(status, n)| format!("{status}: {n}")).collect();
                writeln!(
                    out,
                    "skipped {} dead letter(s) whose job is over ({}); kept as dead letters",
                    report.skipped,
                    why.join(", ")
                )?;
            }
            if !report.not_found.is_empty() {
                let ids: Vec<String> = report.not_found.iter().map(i64::to_string).collect();
                writeln!(out, "not found: {}", ids.join(", "))?;
            }
        }
        OutboxCommand::Dead(DeadCommand::Purge { older_than, json }) => {
            let older = humantime::format_duration(*older_than).to_string();
            let action = Action::new("outbox dead purge", json!({ "older_than": older }));
            let purged = audit::run(db, actor, action, async |tx| {
                let purged = dead::purge(tx, *older_than).await?;
                Ok::<_, CliError>((purged, Some(purged)))
            })
            .await?;
            if *json {
                return write_json(out, &serde_json::json!({ "purged": purged }));
            }
            writeln!(
                out,
                "purged {purged} dead letter(s) older than {}",
                humantime::format_duration(*older_than)
            )?;
        }
    }
    Ok(())
}

fn write_json(out: &mut impl Write, value: &impl serde::Serialize) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// `3m 12s`-style age, whole seconds.
fn age(secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    humantime::format_duration(Duration::from_secs(secs.round() as u64)).to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ages_are_human() {
        assert_eq!(age(0.0), "-");
        assert_eq!(age(0.4), "0s");
        assert_eq!(age(192.2), "3m 12s");
    }
}
