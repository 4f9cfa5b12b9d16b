//! `[database]`: the pooled URL (may be pgbouncer), the direct URLs for LISTEN and migrations,
//! the pool limit, the timeouts of every tick transaction, the TCP settings of every connection
//! and the bound on the migration lock wait.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Direct, SocketSettings};
use crate::text::redact_url;
use crate::validate::{Violation, check, positive, url_scheme};

/// Longer than the idle fallback polls of the outbox (5 s) and acquire (10 s), so a quiet
/// replica's warm connection, reused by whichever loop ticks next, is rarely verified; short
/// beside the minutes after which NAT entries, proxies and poolers drop idle connections.
pub const DEFAULT_VERIFY_AFTER_IDLE: Duration = Duration::from_secs(30);

/// Longer than any transaction of the worker waits on something else (the prebuilds leader's
/// tick, 30 s by default; the outbox's Redis writes), short beside the hours a server takes to
/// notice on its own that a client behind a silent path is gone.
pub const DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct DatabaseConfig {
    /// Pooled connection (may point at pgbouncer in transaction mode).
    pub url: String,
    /// Direct connection for LISTEN; defaults to `url`.
    pub listen_url: Option<String>,
    /// Direct connection for migrations (they take a session advisory lock); defaults to `url`.
    pub migrate_url: Option<String>,
    /// With `app.env = production`, accept URLs whose `sslmode` checks no server certificate
    /// (`disable`, `prefer`, `require`), with a warning, instead of refusing them.
    pub allow_unverified_tls: bool,
    /// Pool limit; also sizes the fan-out of gitsync and prebuilds.
    pub pool_size: usize,
    /// `SET LOCAL statement_timeout` of every tick transaction.
    #[serde(with = "humantime_serde")]
    pub statement_timeout: Duration,
    /// `SET LOCAL idle_in_transaction_session_timeout` of every transaction: PostgreSQL ends the
    /// session of a transaction whose client sent nothing for this long, so one cut off
    /// mid-transaction (a silent path, a frozen or killed worker) releases its locks instead of
    /// holding them until the server's TCP notices, which can take hours.
    #[serde(with = "humantime_serde")]
    pub idle_in_transaction_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub connect_timeout: Duration,
    /// How long a loop waits for a pooled connection before its tick fails.
    #[serde(with = "humantime_serde")]
    pub acquire_timeout: Duration,
    /// A pooled connection idle longer than this answers an empty query (within
    /// `connect_timeout`) before it is handed out again; one used more recently is handed out if
    /// its socket is open. `0s` verifies every checkout, at one round trip and one PostgreSQL
    /// transaction each.
    #[serde(with = "humantime_serde")]
    pub verify_after_idle: Duration,
    /// TCP keepalives on every connection (pool, LISTEN, migrations): the first probe after
    /// this long without traffic, then one every `keepalives_interval`, so a connection whose
    /// path went silent (no RST, no FIN) is noticed instead of waited on for hours.
    #[serde(with = "humantime_serde")]
    pub keepalives_idle: Duration,
    #[serde(with = "humantime_serde")]
    pub keepalives_interval: Duration,
    /// Unanswered probes before the connection is dropped (where `tcp_user_timeout` is
    /// supported, Linux, that timeout decides instead).
    pub keepalives_retries: u32,
    /// `TCP_USER_TIMEOUT` (Linux): a connection whose sent data or probes stay unacknowledged
    /// this long is dropped.
    #[serde(with = "humantime_serde")]
    pub tcp_user_timeout: Duration,
    /// How long `worker migrate` (and migrate_on_start) waits for another session's migration
    /// lock before failing with that session's pid.
    #[serde(with = "humantime_serde")]
    pub migrate_lock_timeout: Duration,
    pub migrate_on_start: bool,
}

impl Default for DatabaseConfig {
    fn default() -> Self {
        Self {
            url: "postgres://postgres@127.0.0.1:5432/worker".into(),
            listen_url: None,
            migrate_url: None,
            allow_unverified_tls: false,
            pool_size: 10,
            statement_timeout: Duration::from_secs(5),
            idle_in_transaction_timeout: DEFAULT_IDLE_IN_TRANSACTION_TIMEOUT,
            connect_timeout: Duration::from_secs(5),
            acquire_timeout: Duration::from_secs(5),
            verify_after_idle: DEFAULT_VERIFY_AFTER_IDLE,
            keepalives_idle: Duration::from_secs(30),
            keepalives_interval: Duration::from_secs(10),
            keepalives_retries: 3,
            tcp_user_timeout: Duration::from_secs(30),
            migrate_lock_timeout: Duration::from_secs(60),
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

    /// The connect bound and TCP settings every connection gets.
    pub fn socket(&self) -> SocketSettings {
        SocketSettings {
            connect_timeout: self.connect_timeout,
            keepalives_idle: self.keepalives_idle,
            keepalives_interval: self.keepalives_interval,
            keepalives_retries: self.keepalives_retries,
            tcp_user_timeout: self.tcp_user_timeout,
        }
    }

    /// The LISTEN connection.
    pub fn listen_direct(&self) -> Direct {
        Direct { url: self.listen_url().to_owned(), socket: self.socket() }
    }

    /// The migrations' connection.
    pub fn migrate_direct(&self) -> Direct {
        Direct { url: self.migrate_url().to_owned(), socket: self.socket() }
    }

    /// The shared pool's limit: `pool_size`, less the connection reserved for the lease when
    /// the chat loops run (the heartbeat renews on a one-connection pool of its own, so runner
    /// writes can never make it wait).
    pub fn shared_pool_size(&self, lease_reserved: bool) -> usize {
        self.pool_size.saturating_sub(usize::from(lease_reserved)).max(1)
    }

    /// The lease's one-connection pool (with the chat loops): like the shared one, but it checks
    /// its connection before every renewal (one empty query per heartbeat), so a renewal never
    /// waits out TCP's user timeout on a connection whose path died (a NAT entry dropped) while
    /// a new connection would go through at once.
    pub fn lease_pool(&self) -> DatabaseConfig {
        DatabaseConfig { pool_size: 1, verify_after_idle: Duration::ZERO, ..self.clone() }
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
        self.validate_socket()?;
        positive("statement_timeout", self.statement_timeout)?;
        positive("idle_in_transaction_timeout", self.idle_in_transaction_timeout)?;
        positive("connect_timeout", self.connect_timeout)?;
        positive("acquire_timeout", self.acquire_timeout)
    }
}

/// How the production TLS floor words a fix.
const VERIFIED_MODES: &str = "sslmode=verify-full with sslrootcert=system (a publicly trusted server \
     certificate) or sslrootcert=<CA file>; or database.allow_unverified_tls = true to accept the risk";

impl DatabaseConfig {
    /// The production TLS floor (`Config::validate` asks when `app.env = production`): every
    /// URL must check the server's certificate (`verify-ca` or `verify-full`), else it is
    /// refused, unless `allow_unverified_tls` accepts it: then one warning per such URL. Keys
    /// are relative to `[database]`.
    pub fn tls_floor(&self) -> Result<Vec<String>, Violation> {
        let urls = [
            ("url", Some(&self.url)),
            ("listen_url", self.listen_url.as_ref()),
            ("migrate_url", self.migrate_url.as_ref()),
        ];
        let mut warnings = Vec::new();
        for (key, url) in urls.into_iter().filter_map(|(key, url)| Some((key, url?))) {
            let mode = super::tls::effective_sslmode(url)
                .map_err(|problem| Violation::new(key, problem, "a postgres:// URL"))?;
            let Some(risk) = unverified(mode) else { continue };
            if !self.allow_unverified_tls {
                let problem = format!("sslmode={mode} {risk} (refused when app.env = production)");
                return Err(Violation::new(key, problem, VERIFIED_MODES));
            }
            warnings.push(format!(
                "database.{key}: sslmode={mode} {risk}; accepted because database.allow_unverified_tls = true"
            ));
        }
        Ok(warnings)
    }
}

/// What a connection with libpq's `sslmode` risks, for the modes that check no certificate.
fn unverified(mode: &str) -> Option<&'static str> {
    match mode {
        "disable" => Some("sends everything, the password included, in plaintext"),
        // Also what a URL without sslmode gets.
        "prefer" => Some(
            "(libpq's default when the URL names none) checks no certificate and falls back to \
             plaintext: anyone on the path can downgrade the connection or impersonate the server",
        ),
        "require" => {
            Some("encrypts but checks no certificate: anyone on the path can impersonate the server")
        }
        _ => None,
    }
}

impl DatabaseConfig {
    /// The TCP settings become socket options in whole seconds (keepalives) or milliseconds
    /// (`TCP_USER_TIMEOUT`, `lock_timeout`); Linux's limits for the keepalive ones.
    fn validate_socket(&self) -> Result<(), Violation> {
        whole_seconds("keepalives_idle", self.keepalives_idle, MAX_KEEPALIVE_SECONDS)?;
        whole_seconds("keepalives_interval", self.keepalives_interval, MAX_KEEPALIVE_SECONDS)?;
        check(
            (1..=MAX_KEEPALIVE_PROBES).contains(&self.keepalives_retries),
            "keepalives_retries",
            self.keepalives_retries,
            "1..=127",
        )?;
        milliseconds("tcp_user_timeout", self.tcp_user_timeout)?;
        milliseconds("migrate_lock_timeout", self.migrate_lock_timeout)
    }
}

/// `TCP_KEEPIDLE` and `TCP_KEEPINTVL` at most (Linux).
const MAX_KEEPALIVE_SECONDS: u64 = 32_767;
/// `TCP_KEEPCNT` at most (Linux).
const MAX_KEEPALIVE_PROBES: u32 = 127;

/// A duration of 1 s..=`max_seconds` s in whole seconds: the socket option has no finer unit, and
/// 0 would be refused when connecting.
fn whole_seconds(key: &str, value: Duration, max_seconds: u64) -> Result<(), Violation> {
    let ok = value.subsec_nanos() == 0 && (1..=max_seconds).contains(&value.as_secs());
    let expected = format!("whole seconds, 1s..={max_seconds}s");
    check(ok, key, humantime::format_duration(value), &expected)
}

/// A positive duration that fits PostgreSQL's and Linux's millisecond settings (an int4).
fn milliseconds(key: &str, value: Duration) -> Result<(), Violation> {
    positive(key, value)?;
    let ok = value.as_millis() <= i32::MAX as u128;
    check(ok, key, humantime::format_duration(value), "at most 24 days (2147483647 ms)")
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

#[cfg(test)]
mod tests {
    use super::*;

    fn floor(url: &str, allow: bool) -> Result<Vec<String>, Violation> {
        DatabaseConfig { url: url.into(), allow_unverified_tls: allow, ..DatabaseConfig::default() }
            .tls_floor()
    }

    #[test]
    fn the_lease_pool_is_one_connection_checked_before_every_renewal() {
        let shared =
            DatabaseConfig { pool_size: 7, statement_timeout: Duration::from_secs(3), ..Default::default() };
        let lease = shared.lease_pool();
        assert_eq!((lease.pool_size, lease.verify_after_idle), (1, Duration::ZERO));
        assert_eq!(lease.statement_timeout, shared.statement_timeout, "everything else as configured");
        assert!(shared.verify_after_idle > Duration::ZERO, "the shared pool keeps its warm connections");
    }

    #[test]
    fn the_tls_floor_refuses_every_mode_that_checks_no_certificate_unless_allowed() {
        for (url, mode) in [
            ("postgres://u:pw@db/app?sslmode=disable", "sslmode=disable"),
            ("postgres://u:pw@db/app?sslmode=prefer", "sslmode=prefer"),
            ("postgres://u:pw@db/app", "sslmode=prefer (libpq's default"),
            ("postgres://u:pw@db/app?sslmode=require", "sslmode=require"),
        ] {
            let refused = floor(url, false).expect_err(url);
            assert_eq!(refused.key, "url", "{url}");
            assert!(refused.problem.starts_with(mode), "{url}: {}", refused.problem);
            assert!(refused.expected.contains("sslmode=verify-full with sslrootcert=system"), "{refused:?}");
            assert!(refused.expected.contains("database.allow_unverified_tls = true"), "{refused:?}");
            let warnings = floor(url, true).expect(url);
            assert_eq!(warnings.len(), 1, "{url}");
            assert!(warnings[0].starts_with(&format!("database.url: {mode}")), "{warnings:?}");
            assert!(!warnings[0].contains("pw"), "{warnings:?}");
        }
        for url in [
            "postgres://db/app?sslmode=verify-full&sslrootcert=system",
            "postgres://db/app?sslrootcert=system",
            "postgres://db/app?sslmode=verify-full&sslrootcert=/ca.pem",
            "postgres://db/app?sslmode=verify-ca&sslrootcert=/ca.pem",
            // libpq: require with a CA file checks the chain (verify-ca).
            "postgres://db/app?sslmode=require&sslrootcert=/ca.pem",
        ] {
            assert_eq!(floor(url, false), Ok(Vec::new()), "{url}");
        }
    }

    #[test]
    fn the_tls_floor_judges_the_listen_and_migrate_urls_too() {
        let verified = "postgres://db/app?sslmode=verify-full&sslrootcert=system";
        let config = DatabaseConfig {
            url: verified.into(),
            listen_url: Some(verified.into()),
            migrate_url: Some("postgres://db/app?sslmode=require".into()),
            ..DatabaseConfig::default()
        };
        assert_eq!(config.tls_floor().expect_err("migrate_url").key, "migrate_url");
        let config = DatabaseConfig {
            listen_url: Some("postgres://db/app?sslmode=disable".into()),
            migrate_url: Some(verified.into()),
            ..config
        };
        assert_eq!(config.tls_floor().expect_err("listen_url").key, "listen_url");
        let allowed = DatabaseConfig { allow_unverified_tls: true, ..config };
        assert_eq!(allowed.tls_floor().expect("allowed").len(), 1, "only listen_url is unverified");
    }

    #[test]
    fn the_defaults_are_valid_and_every_socket_setting_is_checked_by_key() {
        DatabaseConfig::default().validate().expect("the defaults are valid");
        let refused = |change: fn(&mut DatabaseConfig)| {
            let mut config = DatabaseConfig::default();
            change(&mut config);
            config.validate().expect_err("refused").key
        };
        assert_eq!(refused(|c| c.keepalives_idle = Duration::from_millis(500)), "keepalives_idle");
        assert_eq!(refused(|c| c.keepalives_idle = Duration::from_millis(1500)), "keepalives_idle");
        assert_eq!(refused(|c| c.keepalives_interval = Duration::from_secs(40_000)), "keepalives_interval");
        assert_eq!(refused(|c| c.keepalives_retries = 0), "keepalives_retries");
        assert_eq!(refused(|c| c.keepalives_retries = 128), "keepalives_retries");
        assert_eq!(refused(|c| c.tcp_user_timeout = Duration::ZERO), "tcp_user_timeout");
        assert_eq!(refused(|c| c.migrate_lock_timeout = Duration::ZERO), "migrate_lock_timeout");
        assert_eq!(
            refused(|c| c.migrate_lock_timeout = Duration::from_secs(30 * 24 * 3600)),
            "migrate_lock_timeout"
        );
    }

    #[test]
    fn listen_and_migrations_connect_with_the_sections_socket_settings() {
        let config = DatabaseConfig {
            migrate_url: Some("postgres://direct/db".into()),
            keepalives_idle: Duration::from_secs(7),
            ..DatabaseConfig::default()
        };
        assert_eq!(config.listen_direct().url, config.url);
        assert_eq!(config.migrate_direct().url, "postgres://direct/db");
        assert_eq!(config.listen_direct().socket.keepalives_idle, Duration::from_secs(7));
        assert_eq!(config.migrate_direct().socket, config.socket());
    }
}
