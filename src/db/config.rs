//! `[database]`: the pooled URL (may be pgbouncer), the direct URLs for LISTEN and migrations,
//! the pool limit and the timeouts of every tick transaction.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::text::redact_url;
use crate::validate::{Violation, check, positive, url_scheme};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Pooled connection (may point at pgbouncer in transaction mode).
    pub url: String,
    /// Direct connection for LISTEN; defaults to `url`.
    pub listen_url: Option<String>,
    /// Direct connection for migrations (they take a session advisory lock); defaults to `url`.
    pub migrate_url: Option<String>,
    /// Pool limit; also sizes the fan-out of gitsync and prebuilds.
    pub pool_size: usize,
    /// `SET LOCAL statement_timeout` of every tick transaction.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a loop waits for a pooled connection before its tick fails.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    pub migrate_on_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/worker".into(),
            listen_url: None,
            migrate_url: None,
            pool_size: 10,
            statement_timeout: Duration::from_secs(5),
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            migrate_on_start: true,
        }
    }
}

impl DatabaseConfig {
    pub fn listen_url(&self) -> &str {
        self.listen_url.as_deref().unwrap_or(&self.url)
    }

    pub fn migrate_url(&self) -> &str {
        self.migrate_url.as_deref().unwrap_or(&self.url)
    }

    /// The shared pool's limit: `pool_size`, less the connection reserved for the lease when
    /// the chat loops run (the heartbeat renews on a one-connection pool of its own, so runner
    /// writes can never make it wait).
    pub fn shared_pool_size(&self, lease_reserved: bool) -> usize {
        self.pool_size.saturating_sub(usize::from(lease_reserved)).max(1)
    }

    /// Keys are relative to `[database]`.
    pub fn validate(&self) -> Result<(), Violation> {
        check_postgres_url("url", &self.url)?;
        if let Some(url) = &self.listen_url {
            check_postgres_url("listen_url", url)?;
        }
        if let Some(url) = &self.migrate_url {
            check_postgres_url("migrate_url", url)?;
        }
        check((1..=1000).contains(&self.pool_size), "pool_size", self.pool_size, "1..=1000")?;
        positive("statement_timeout", self.statement_timeout)?;
        positive("connect_timeout", self.connect_timeout)?;
        positive("acquire_timeout", self.acquire_timeout)
    }
}

/// A URL the PostgreSQL driver accepts, checked at load time so a bad deploy fails
/// `config check` instead of every tick (certificate files are read when connecting).
fn check_postgres_url(key: &str, url: &str) -> Result<(), Violation> {
    let shown = redact_url(url);
    check(url_scheme(url, &["postgres", "postgresql"]), key, &shown, "a postgres:// URL")?;
    super::check_url(url).map_err(|problem| {
        Violation::new(
            key,
            format!("not accepted by the PostgreSQL driver ({problem}): {shown}"),
            "a postgres:// URL; sslmode=disable|prefer|require|verify-ca|verify-full, \
             sslrootcert=<file>|system, sslcert + sslkey",
        )
    })
}
