//! Operator controls over loops on every replica (`worker loop pause|resume|list`).
//!
//! The runtime reads `loop_controls` at most once per `runtime.controls_refresh` per process
//! (see [`crate::runtime::pauses`]), so a pause takes effect on every replica within that plus
//! one interval, with no restart and no signal to deliver.

use tokio_postgres::types::Type;

use crate::db::{Db, DbError, Exec};
use crate::loops;

/// The change and its NOTIFY (delivered at commit) in one statement.
const SET_PAUSED: &str = "WITH changed AS (\
       INSERT INTO loop_controls (loop_name, paused, reason, updated_by) VALUES ($1, $2, $3, $4) \
       ON CONFLICT (loop_name) DO UPDATE SET paused = EXCLUDED.paused, reason = EXCLUDED.reason, \
       updated_by = EXCLUDED.updated_by, updated_at = now() RETURNING loop_name) \
     SELECT pg_notify($5, loop_name) IS NULL FROM changed";
const LIST: &str = "SELECT loop_name, paused, coalesce(reason, ''), coalesce(updated_by, ''), \
     to_char(updated_at AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS\"Z\"') FROM loop_controls ORDER BY loop_name";

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error("unknown loop `{name}`; known loops: {}", loops::names().join(", "))]
    UnknownLoop { name: String },
    #[error(
        "loop `{name}` cannot be paused: it renews this fleet's leases, and without them every \
         agent is killed and every chat recovered elsewhere"
    )]
    NotPausable { name: String },
    #[error(transparent)]
    Db(#[from] DbError),
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct LoopControl {
    pub loop_name: String,
    pub paused: bool,
    pub reason: String,
    pub updated_by: String,
    pub updated_at: String,
}

/// Pauses or resumes `name` in `tx` (the caller commits; the NOTIFY is delivered then).
pub async fn set_paused(
    tx: &impl Exec,
    name: &str,
    paused: bool,
    reason: Option<&str>,
    who: &str,
) -> Result<(), ControlError> {
    match loops::find(name) {
        None => return Err(ControlError::UnknownLoop { name: name.to_owned() }),
        Some(info) if paused && !info.pausable => {
            return Err(ControlError::NotPausable { name: name.to_owned() });
        }
        Some(_) => {}
    }
    let channel = crate::runtime::pauses::CHANNEL;
    tx.exec(
        SET_PAUSED,
        &[
            (&name, Type::TEXT),
            (&paused, Type::BOOL),
            (&reason, Type::TEXT),
            (&who, Type::TEXT),
            (&channel, Type::TEXT),
        ],
    )
    .await?;
    Ok(())
}

pub async fn list(db: &Db) -> Result<Vec<LoopControl>, DbError> {
    let conn = db.get().await?;
    let rows = conn.fetch_all(LIST, &[]).await?;
    Ok(rows
        .iter()
        .map(|r| LoopControl {
            loop_name: r.get(0),
            paused: r.get(1),
            reason: r.get(2),
            updated_by: r.get(3),
            updated_at: r.get(4),
        })
        .collect())
}
