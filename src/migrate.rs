//! Schema migrations (refinery, `migrations/V*__*.sql`, embedded in the binary).
//!
//! Runs on a direct connection (`database.migrate_url`), never through pgbouncer, under a
//! session advisory lock: replicas that start together queue on the lock and the later ones find
//! every migration applied. This is the one place a session lock is right.

use crate::db::{self, DbError};

refinery::embed_migrations!("migrations");

/// Session advisory lock key serialising migrators ("worker migrate" as ASCII).
const MIGRATION_LOCK_KEY: i64 = 0x0077_6f72_6b6d_6967;

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect for migrations: {0}")]
    Connect(#[from] DbError),
    #[error("cannot take the migration lock: {0}")]
    Lock(tokio_postgres::Error),
    #[error("migration failed: {0}")]
    Refinery(#[from] refinery::Error),
}

/// Applies every pending migration; returns the names of those this call applied.
pub async fn run(url: &str) -> Result<Vec<String>, MigrateError> {
    let mut client = db::connect_direct(url, "worker-migrate").await?;
    client
        .batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})"))
        .await
        .map_err(MigrateError::Lock)?;
    let report = migrations::runner().set_grouped(true).run_async(&mut client).await;
    // Closing the connection releases the lock even if this unlock is never sent.
    let _ = client.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")).await;
    let applied = report?.applied_migrations().iter().map(|m| m.to_string()).collect();
    Ok(applied)
}
