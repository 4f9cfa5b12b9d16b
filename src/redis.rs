//! The Redis client shared by the loops that talk to Redis (outbox, counters).
//!
//! fred facts this module encodes (10.1, measured; `docs/outbox.md`): the default `Builder` has no
//! reconnect policy, so a dropped connection would stay dropped; here it reconnects forever with
//! capped exponential backoff, also when Redis is down at start-up (the daemon must come up and
//! recover by itself; that takes `Config::fail_fast = false`, whose default `true` silently gives
//! //! up after a failed first connection — measured here). Callers check `is_connected()` before
//! writing (commands queued while disconnected would run when Redis returns), in-flight commands
//! are not retried on a new connection, and the queue is bounded; still, a command that timed out
//! is NOT cancelled and may run later, so everything written through this client must be
//! idempotent. `redis-cluster://` URLs give a
//! cluster client that routes each command to its slot.
//!
//! TLS: `rediss://` (and `rediss-cluster://`) URLs connect over rustls (fred's `enable-rustls`,
//! the aws-lc-rs provider reqwest already uses, so one crypto stack). The server certificate is
//! checked against `redis.ca_file` when set, else the platform's roots.

use std::time::Duration;

use std::path::{Path, PathBuf};

use fred::prelude::{Builder, ClientLike, Config, ReconnectPolicy};
use fred::rustls::pki_types::CertificateDer;
use fred::rustls::pki_types::pem::PemObject;
use fred::rustls::{ClientConfig, RootCertStore};
use fred::types::config::{ClusterDiscoveryPolicy, TlsConnector};
use serde::{Deserialize, Serialize};

use crate::validate::{Violation, check, readable_file, url_scheme};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RedisConfig {
    pub url: String,
    /// Prefix of every key this worker writes (`{prefix}:sched:{queue}`, …).
    pub prefix: String,
    /// PEM file of the CA(s) that sign the server certificate of a `rediss://` URL. Unset: the
    /// platform's root certificates (what managed Redis services are signed by).
    pub ca_file: Option<PathBuf>,
    /// With `app.env = production`, accept a plaintext `redis://` URL, with a warning, instead
    /// of refusing it.
    pub allow_plaintext: bool,
}

impl Default for RedisConfig {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "worker".into(),
            ca_file: None,
            allow_plaintext: false,
        }
    }
}

impl RedisConfig {
    /// Keys are relative to `[redis]`.
    pub fn validate(&self) -> Result<(), Violation> {
        check(
            url_scheme(&self.url, &["redis", "rediss", "redis-cluster", "rediss-cluster"]),
            "url",
            crate::text::redact_url(&self.url),
            "a redis:// URL",
        )?;
        check(!self.prefix.is_empty(), "prefix", "\"\"", "a non-empty key prefix")?;
        match &self.ca_file {
            Some(path) => readable_file("ca_file", path),
            None => Ok(()),
        }
    }
}

impl RedisConfig {
    /// The production TLS floor (`Config::validate` asks when `app.env = production` and a loop
    /// uses Redis): a plaintext URL is refused unless `allow_plaintext` accepts it, with the
    /// warning returned. Keys are relative to `[redis]`.
    pub fn tls_floor(&self) -> Result<Option<String>, Violation> {
        if !url_scheme(&self.url, &["redis", "redis-cluster"]) {
            return Ok(None);
        }
        let risk = "is plaintext: the password, task payloads and counters cross the network unencrypted";
        if !self.allow_plaintext {
            return Err(Violation::new(
                "url",
                format!("{} {risk} (refused when app.env = production)", crate::text::redact_url(&self.url)),
                "a rediss:// URL (TLS, checked against the platform roots or redis.ca_file); or \
                 redis.allow_plaintext = true to accept the risk",
            ));
        }
        Ok(Some(format!("redis.url: redis:// {risk}; accepted because redis.allow_plaintext = true")))
    }
}

pub use fred::prelude::Client;

/// TCP connect (+ handshake) bound of one connection attempt.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Backstop for any command without a deadline of its own.
const COMMAND_TIMEOUT: Duration = Duration::from_secs(30);
/// Commands that may wait in the client's queue (e.g. while reconnecting).
const MAX_QUEUED_COMMANDS: usize = 10_000;
/// Reconnect backoff: from 100 ms doubling up to 2 s, forever (0 = unlimited attempts).
const RECONNECT_MIN_MS: u32 = 100;
const RECONNECT_MAX_MS: u32 = 2_000;

#[derive(Debug, thiserror::Error)]
pub enum RedisError {
    #[error("invalid redis.url `{url}`: {source}")]
    Url { url: String, source: fred::error::Error },
    #[error("cannot create the redis client: {0}")]
    Build(fred::error::Error),
    #[error("redis.ca_file `{}`: {problem}", path.display())]
    CaFile { path: PathBuf, problem: String },
}

/// Builds a client for `config.redis` and starts its connection task without waiting for it, so
/// an unreachable Redis delays the first commands, not the caller.
pub fn connect(config: &RedisConfig) -> Result<Client, RedisError> {
    let client = build(config)?;
    // The handle ends when the client quits; reconnects happen inside it.
    drop(client.connect());
    Ok(client)
}

/// Like [`connect`], then waits up to the connect timeout for the first connection, so loops do
/// not start their first tick (and their failure backoff) a few milliseconds before Redis
/// answers. A Redis that is down at start is not fatal: the client keeps reconnecting and the
/// loops report errors until it is back.
pub async fn connect_and_wait(config: &RedisConfig) -> Result<Client, RedisError> {
    let client = connect(config)?;
    match tokio::time::timeout(CONNECT_TIMEOUT, client.wait_for_connect()).await {
        Ok(Ok(())) => {}
        Ok(Err(error)) => {
            tracing::warn!(%error, "redis is not reachable at start; retrying in the background")
        }
        Err(_) => tracing::warn!(
            waited_ms = CONNECT_TIMEOUT.as_millis() as u64,
            "redis is not reachable at start; retrying in the background"
        ),
    }
    Ok(client)
}

/// Builds a client without connecting (the caller decides when: `connect` or `init`).
pub fn build(config: &RedisConfig) -> Result<Client, RedisError> {
    let redacted = crate::text::redact_url(&config.url);
    let mut fred_config =
        Config::from_url(&config.url).map_err(|source| RedisError::Url { url: redacted, source })?;
    // fred's default (`true`) ends the connection task for good when the FIRST connection fails,
    // reconnect policy or not: a worker started during a Redis outage would never recover.
    fred_config.fail_fast = false;
    // Cluster: fred's default discovery (`ConfigEndpoint`) looks for the cluster only through
    // the node(s) in the URL, so once that node dies (kill -9 of the master the URL names,
    // measured in tests/redis_cluster.rs) the client cannot learn the new topology and stays
    // disconnected until that very node returns. `UseCache` also tries every master of the last
    // known routing table: it reconnects through the survivors as soon as a replica took over.
    if fred_config.server.is_clustered() {
        // Only fails for a non-cluster config, which this is not.
        let _ = fred_config.server.set_cluster_discovery_policy(ClusterDiscoveryPolicy::UseCache);
    }
    // fred gives a TLS URL the platform roots; a private CA replaces them.
    if fred_config.tls.is_some()
        && let Some(path) = &config.ca_file
    {
        fred_config.tls = Some(TlsConnector::from(client_config_trusting(path)?).into());
    }
    Builder::from_config(fred_config)
        .with_connection_config(|c| {
            c.connection_timeout = CONNECT_TIMEOUT;
            c.internal_command_timeout = CONNECT_TIMEOUT;
            c.tcp.nodelay = Some(true);
            // A command in flight when the connection drops fails (outcome unknown) instead of
            // being replayed after the reconnect, long after its sweep rolled back.
            c.max_command_attempts = 1;
            // Bounded queue: past it commands fail at once (backpressure) instead of piling up.
            c.max_command_buffer_len = MAX_QUEUED_COMMANDS;
        })
        .with_performance_config(|p| p.default_command_timeout = COMMAND_TIMEOUT)
        .set_policy(ReconnectPolicy::new_exponential(0, RECONNECT_MIN_MS, RECONNECT_MAX_MS, 2))
        .build()
        .map_err(RedisError::Build)
}

/// A rustls client configuration that trusts only the certificates in the PEM file at `path`.
fn client_config_trusting(path: &Path) -> Result<ClientConfig, RedisError> {
    let error = |problem: String| RedisError::CaFile { path: path.to_owned(), problem };
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(|e| error(e.to_string()))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| error(e.to_string()))?;
    let mut roots = RootCertStore::empty();
    let (added, _ignored) = roots.add_parsable_certificates(certs);
    if added == 0 {
        return Err(error("no PEM certificate in it".into()));
    }
    Ok(ClientConfig::builder().with_root_certificates(roots).with_no_client_auth())
}

/// `{prefix}:{kind}:{name}`, the one spelling of every key this crate writes.
pub fn key(prefix: &str, kind: &str, name: &str) -> String {
    let mut key = String::with_capacity(prefix.len() + kind.len() + name.len() + 2);
    key.push_str(prefix);
    key.push(':');
    key.push_str(kind);
    key.push(':');
    key.push_str(name);
    key
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_prefix_kind_name() {
        assert_eq!(key("worker", "sched", "emails"), "worker:sched:emails");
        assert_eq!(key("test:abc", "payload", "q:1"), "test:abc:payload:q:1");
    }

    #[test]
    fn a_bad_url_is_an_error_naming_the_key_and_never_the_password() {
        for (url, shown) in [
            ("redis://user:secret@[::1", "redis://***@[::1"),
            ("redis://user:secret@127.0.0.1:6379/not-a-db", "redis://user:***@127.0.0.1:6379/not-a-db"),
        ] {
            let config = RedisConfig { url: url.into(), ..RedisConfig::default() };
            let text = build(&config).expect_err("bad url").to_string();
            assert!(!text.contains("secret"), "{text}");
            assert!(text.contains("redis.url") && text.contains(shown), "{text}");
        }
    }

    #[test]
    fn a_client_has_a_reconnect_policy() {
        let client = build(&RedisConfig::default()).expect("client");
        assert!(client.client_reconnect_policy().is_some(), "the default builder has none; we must set one");
    }

    #[test]
    fn a_cluster_client_finds_the_cluster_through_any_known_master() {
        let config = RedisConfig { url: "redis-cluster://127.0.0.1:7101".into(), ..RedisConfig::default() };
        let client = build(&config).expect("client");
        match client.client_config().server {
            fred::types::config::ServerConfig::Clustered { policy, .. } => {
                assert_eq!(policy, ClusterDiscoveryPolicy::UseCache)
            }
            other => panic!("not a cluster config: {other:?}"),
        }
    }

    #[test]
    fn the_tls_floor_refuses_plaintext_unless_allowed() {
        for url in ["redis://:secret@cache:6379", "redis-cluster://cache:6379"] {
            let config = RedisConfig { url: url.into(), ..RedisConfig::default() };
            let refused = config.tls_floor().expect_err(url);
            assert_eq!(refused.key, "url");
            assert!(
                refused.problem.contains("is plaintext") && !refused.problem.contains("secret"),
                "{refused:?}"
            );
            assert!(
                refused.expected.contains("rediss://") && refused.expected.contains("redis.allow_plaintext")
            );
            let allowed = RedisConfig { allow_plaintext: true, ..config };
            let warning = allowed.tls_floor().expect(url).expect("a warning");
            assert!(warning.contains("redis.allow_plaintext = true"), "{warning}");
        }
        for url in ["rediss://:secret@cache:6380", "rediss-cluster://cache:6380"] {
            let config = RedisConfig { url: url.into(), ..RedisConfig::default() };
            assert_eq!(config.tls_floor(), Ok(None), "{url}");
        }
    }
}
