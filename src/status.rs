//! `worker status`: what the fleet looks like from the database (registered workers with the
//! age of their lease, loop controls, and what the retention loop last removed), for operators
//! without access to each replica.

use serde::Serialize;

use crate::controls::{self, LoopControl};
use crate::db::{Db, DbError, Exec};
use crate::retention::{self, RetentionRun};

const WORKERS: &str = "SELECT id::text, hostname, version, \
     to_char(started_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"'), \
     extract(epoch FROM now() - last_seen_at)::float8 \
     FROM workers ORDER BY started_at";

#[derive(Debug, Clone, Serialize)]
pub struct WorkerStatus {
    pub id: String,
    pub hostname: String,
    pub version: String,
    pub started_at: String,
    /// Seconds since the worker last renewed its lease (database clock).
    pub last_seen_secs: f64,
}

#[derive(Debug, Clone, Serialize)]
pub struct FleetStatus {
    pub workers: Vec<WorkerStatus>,
    pub loop_controls: Vec<LoopControl>,
    /// Per table, the `retention` loop's last run (empty before its first).
    pub retention: Vec<RetentionRun>,
}

pub async fn fleet(db: &Db) -> Result<FleetStatus, DbError> {
    let conn = db.get().await?;
    let rows = conn.fetch_all(WORKERS, &[]).await?;
    let workers = rows
        .iter()
        .map(|r| WorkerStatus {
            id: r.get(0),
            hostname: r.get(1),
            version: r.get(2),
            started_at: r.get(3),
            last_seen_secs: r.get(4),
        })
        .collect();
    let retention = retention::runs(&conn).await?;
    Ok(FleetStatus { workers, loop_controls: controls::list(db).await?, retention })
}

impl FleetStatus {
    /// A plain-text table for terminals.
    pub fn render(&self) -> String {
        let mut out = format!("WORKERS ({})\n", self.workers.len());
        out.push_str(&format!(
            "{:<38} {:<24} {:<10} {:<22} {:>10}\n",
            "ID", "HOST", "VERSION", "STARTED", "SEEN AGO"
        ));
        for w in &self.workers {
            out.push_str(&format!(
                "{:<38} {:<24} {:<10} {:<22} {:>9.1}s\n",
                w.id, w.hostname, w.version, w.started_at, w.last_seen_secs
            ));
        }
        let paused: Vec<&str> =
            self.loop_controls.iter().filter(|c| c.paused).map(|c| c.loop_name.as_str()).collect();
        out.push_str(&format!(
            "\nPAUSED LOOPS: {}\n",
            if paused.is_empty() { "none".to_owned() } else { paused.join(", ") }
        ));
        out.push_str("\nRETENTION\n");
        if self.retention.is_empty() {
            out.push_str("  the retention loop has not run yet\n");
        }
        for run in &self.retention {
            out.push_str(&format!(
                "  {:<18} last run {}: removed {} ({} in all)\n",
                run.table,
                run.ran_at.to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                run.last_removed,
                run.total_removed
            ));
        }
        out
    }
}
