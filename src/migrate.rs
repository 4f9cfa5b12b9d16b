//! Schema migrations (refinery, `migrations/V*__*.sql`, embedded in the binary).
//!
//! Runs on a direct connection (`database.migrate_url`), never through pgbouncer, under a
//! session advisory lock: replicas that start together queue on the lock and the later ones find
//! every migration applied. This is the one place a session lock is right. The wait for the lock
//! is bounded (`database.migrate_lock_timeout`): a migrator that hangs, or a session someone
//! left holding the lock, fails the others with the holder's pid instead of stalling every
//! deploy.

use std::time::Duration;

use tokio_postgres::error::SqlState;
use tokio_postgres::types::Type;

use crate::db::{ConnectError, DatabaseConfig, Direct, Exec};

refinery::embed_migrations!("migrations");

/// Session advisory lock key serialising migrators ("worker migrate" as ASCII). In `pg_locks`
/// it shows as `locktype = 'advisory'`, `classid = 7827314`, `objid = 1802332519`, `objsubid = 1`.
pub const MIGRATION_LOCK_KEY: i64 = 0x0077_6f72_6b6d_6967;

/// Where migrations run and how long they wait for the lock. From `[database]`
/// (`&config.database`), or a bare URL with the defaults (tools and tests).
#[derive(Debug, Clone)]
pub struct Target {
    pub direct: Direct,
    pub lock_timeout: Duration,
}

impl From<&DatabaseConfig> for Target {
    fn from(config: &DatabaseConfig) -> Self {
        Self { direct: config.migrate_direct(), lock_timeout: config.migrate_lock_timeout }
    }
}

impl From<&str> for Target {
    fn from(url: &str) -> Self {
        Self { direct: url.into(), lock_timeout: DatabaseConfig::default().migrate_lock_timeout }
    }
}

impl From<&String> for Target {
    fn from(url: &String) -> Self {
        Self::from(url.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum MigrateError {
    #[error("cannot connect for migrations: {0}")]
    Connect(#[from] ConnectError),
    #[error(
        "the migration lock is held by {} and was not released within \
         database.migrate_lock_timeout ({}): another `worker migrate` (or a replica starting with \
         migrate_on_start) is still migrating or is stuck; see pg_stat_activity for that session",
        holder_text(*.holder),
        humantime::format_duration(*.waited)
    )]
    LockTimeout { waited: Duration, holder: Option<i32> },
    #[error("cannot take the migration lock: {}", crate::text::with_causes(.0))]
    Lock(tokio_postgres::Error),
    #[error(
        "the applied migration {applied} differs from {built} built into this binary: a landed \
         migration was edited, or another build applied a different {applied}. A landed migration \
         is never edited: restore the file and put the change in a new migration"
    )]
    Divergent { applied: String, built: String },
    #[error(
        "migration {0} is applied to this database but not built into this binary: a newer build \
         migrated it. Run that build (or a newer one); this one does not know the newer schema"
    )]
    NotBuiltIn(String),
    #[error(
        "migration {0} is built into this binary but was never applied, while a later one was: \
         migrations must land in the order of their numbers; renumber it after the last applied one"
    )]
    OutOfOrder(String),
    #[error("migration failed: {0}")]
    Refinery(#[source] refinery::Error),
}

impl From<refinery::Error> for MigrateError {
    /// The refusals an operator meets on a deploy, said in terms of what to do about them.
    fn from(error: refinery::Error) -> Self {
        use refinery::error::Kind;
        match error.kind() {
            Kind::DivergentVersion(applied, built) => {
                Self::Divergent { applied: applied.to_string(), built: built.to_string() }
            }
            // Refinery names one kind for both: an applied version this binary lacks, and a
            // version of this binary left behind by a later one.
            Kind::MissingVersion(migration) => {
                let version = migration.version();
                let built_in = migrations::runner().get_migrations().iter().any(|m| m.version() == version);
                if built_in {
                    Self::OutOfOrder(migration.to_string())
                } else {
                    Self::NotBuiltIn(migration.to_string())
                }
            }
            _ => Self::Refinery(error),
        }
    }
}

fn holder_text(holder: Option<i32>) -> String {
    match holder {
        Some(pid) => format!("the session with pid {pid}"),
        None => "another session (its pid is not visible to this user)".to_owned(),
    }
}

/// Applies every pending migration; returns the names of those this call applied.
pub async fn run(target: impl Into<Target>) -> Result<Vec<String>, MigrateError> {
    let target = target.into();
    let mut client = target.direct.connect("worker-migrate").await?;
    lock(&mut client, target.lock_timeout).await?;
    let report = migrations::runner().set_grouped(true).run_async(&mut client).await;
    // Closing the connection releases the lock even if this unlock is never sent.
    let _ = client.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")).await;
    let applied = report?.applied_migrations().iter().map(|m| m.to_string()).collect();
    Ok(applied)
}

/// Takes the session lock, waiting at most `timeout`. The wait is the server's `lock_timeout`,
/// set LOCAL to a transaction around the call, so the migrations that follow keep the server's
/// own setting; the session lock outlives that transaction.
async fn lock(client: &mut tokio_postgres::Client, timeout: Duration) -> Result<(), MigrateError> {
    let tx = client.transaction().await.map_err(MigrateError::Lock)?;
    let millis = timeout.as_millis().max(1);
    tx.batch_execute(&format!("SET LOCAL lock_timeout = {millis}")).await.map_err(MigrateError::Lock)?;
    match tx.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")).await {
        Ok(()) => tx.commit().await.map_err(MigrateError::Lock),
        Err(error) if error.code() == Some(&SqlState::LOCK_NOT_AVAILABLE) => {
            tx.rollback().await.map_err(MigrateError::Lock)?;
            let holder = lock_holder(client).await;
            Err(MigrateError::LockTimeout { waited: timeout, holder })
        }
        Err(error) => Err(MigrateError::Lock(error)),
    }
}

/// The pid of the session holding the migration lock in this database, if `pg_locks` shows it
/// (it may also have been released since).
async fn lock_holder(client: &tokio_postgres::Client) -> Option<i32> {
    // A bigint advisory key is stored as its high and low 32 bits, with objsubid 1.
    const SQL: &str = "SELECT pid FROM pg_locks \
                       WHERE locktype = 'advisory' AND granted AND objsubid = 1 \
                       AND database = (SELECT oid FROM pg_database WHERE datname = current_database()) \
                       AND classid = ($1::int8 >> 32)::oid AND objid = ($1::int8 & 4294967295)::oid \
                       LIMIT 1";
    let row = client.fetch_opt(SQL, &[(&MIGRATION_LOCK_KEY, Type::INT8)]).await.ok()??;
    row.get::<_, Option<i32>>(0)
}
