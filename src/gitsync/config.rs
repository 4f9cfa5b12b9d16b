//! `[gitsync]` and `[[gitsync.providers]]`: the refresher's schedule, lease, backoffs, fan-out,
//! the git providers whose tokens it may use and the keys those tokens are encrypted under.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::github::DEFAULT_MAX_BODY_BYTES;
use super::provider::{ProviderConfig, validate_providers};
use super::tokens::{TokenKeySecret, TokenKeys, deserialize_key_list};
use crate::runtime::LoopConfig;
use crate::validate::{Violation, check, positive, url_scheme};

/// Every 10 s (`docs/gitsync.md`), with a 30 s tick timeout (separate from the interval).
pub const DEFAULT_INTERVAL: Duration = Duration::from_secs(10);
pub const DEFAULT_TICK_TIMEOUT: Duration = Duration::from_secs(30);
pub const DEFAULT_BATCH_SIZE: u32 = 50;
/// How long leased rows stay away from other replicas; longer than any tick, so a row is never
/// refreshed twice within one lease, and short enough that a crashed tick's rows come back soon.
pub const DEFAULT_LEASE: Duration = Duration::from_secs(300);
/// A refreshed row is due again after this long.
pub const DEFAULT_TTL: Duration = Duration::from_secs(120);
/// An owner without a usable token is asked about again after this long.
pub const DEFAULT_NO_TOKEN_BACKOFF: Duration = Duration::from_secs(600);
/// A recently marked branch without a PR yet is looked at again this soon (a PR usually follows
/// a push within seconds).
pub const DEFAULT_NO_PR_BACKOFF: Duration = Duration::from_secs(15);
/// Upper bound of rows refreshed at once; `database.pool_size` caps it further
/// (`docs/configuration.md`, "Concurrency").
pub const DEFAULT_CONCURRENCY: usize = 10;

/// `[gitsync]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GitsyncConfig {
    #[serde(flatten)]
    pub base: LoopConfig,
    /// Rows leased per tick.
    pub batch_size: u32,
    #[serde(with = "humantime_serde")]
    pub lease: Duration,
    #[serde(with = "humantime_serde")]
    pub ttl: Duration,
    #[serde(with = "humantime_serde")]
    pub no_token_backoff: Duration,
    #[serde(with = "humantime_serde")]
    pub no_pr_backoff: Duration,
    /// Upper bound of rows refreshed at once; the effective value is
    /// `min(concurrency, max(1, database.pool_size / 2))` ([`crate::config::Concurrency`]).
    pub concurrency: usize,
    /// Hard limit on any provider response body.
    pub max_body_bytes: usize,
    /// Empty means one `github` provider for `github.com` ([`ProviderConfig::github_default`]).
    pub providers: Vec<ProviderConfig>,
    /// Base64-encoded 32-byte AES-256-GCM keys of the tokens in `external_auth_links`
    /// ([`super::tokens`]): the first encrypts, every one decrypts. Empty: tokens are plaintext.
    /// From the environment as a list (`[k1,k2]`) or comma-separated (`k1,k2`).
    #[serde(deserialize_with = "deserialize_key_list")]
    pub token_keys: Vec<TokenKeySecret>,
}

impl Default for GitsyncConfig {
    fn default() -> Self {
        Self {
            base: LoopConfig::new(DEFAULT_INTERVAL, DEFAULT_TICK_TIMEOUT),
            batch_size: DEFAULT_BATCH_SIZE,
            lease: DEFAULT_LEASE,
            ttl: DEFAULT_TTL,
            no_token_backoff: DEFAULT_NO_TOKEN_BACKOFF,
            no_pr_backoff: DEFAULT_NO_PR_BACKOFF,
            concurrency: DEFAULT_CONCURRENCY,
            max_body_bytes: DEFAULT_MAX_BODY_BYTES,
            providers: Vec::new(),
            token_keys: Vec::new(),
        }
    }
}

impl GitsyncConfig {
    /// The providers in effect: the configured ones, or github.com alone when none is.
    pub fn effective_providers(&self) -> Vec<ProviderConfig> {
        if self.providers.is_empty() {
            vec![ProviderConfig::github_default()]
        } else {
            self.providers.clone()
        }
    }

    /// The parsed `token_keys` (empty when none is configured).
    pub fn token_keys(&self) -> Result<TokenKeys, super::tokens::KeyConfigError> {
        TokenKeys::parse(&self.token_keys)
    }

    /// Keys are relative to `[gitsync]`.
    pub fn validate(&self) -> Result<(), Violation> {
        self.base.validate()?;
        check((1..=1000).contains(&self.batch_size), "batch_size", self.batch_size, "1..=1000")?;
        check(
            self.lease > self.base.tick_timeout,
            "lease",
            humantime::format_duration(self.lease),
            "longer than gitsync.tick_timeout (a lease must outlive the tick that holds it)",
        )?;
        positive("ttl", self.ttl)?;
        positive("no_token_backoff", self.no_token_backoff)?;
        positive("no_pr_backoff", self.no_pr_backoff)?;
        check((1..=1000).contains(&self.concurrency), "concurrency", self.concurrency, "1..=1000")?;
        check(
            (1024..=(1 << 30)).contains(&self.max_body_bytes),
            "max_body_bytes",
            self.max_body_bytes,
            "1024..=1073741824",
        )?;
        validate_providers(&self.providers).map_err(|e| {
            let index = self.providers.iter().position(|p| p.id == e.id).unwrap_or_default();
            Violation::new(&format!("providers.{index}.{}", e.field), e.to_string(), "a valid provider entry")
        })?;
        // Never the key itself: the problem names the entry by its index only.
        self.token_keys().map(drop).map_err(|e| {
            Violation::new(
                &format!("token_keys.{}", e.index),
                e.problem.to_string(),
                "a base64-encoded 32-byte key, each key once (`openssl rand -base64 32`)",
            )
        })
    }
}

impl GitsyncConfig {
    /// The production TLS floor (`Config::validate` asks when `app.env = production` and the
    /// loop runs): a provider whose `api_base_url` is not `https` would send its users' tokens in
    /// plaintext, and is refused unless its `allow_insecure_http` accepts that, with the warning
    /// returned. Keys are relative to `[gitsync]`.
    pub fn tls_floor(&self) -> Result<Vec<String>, Violation> {
        let mut warnings = Vec::new();
        for (index, provider) in self.effective_providers().iter().enumerate() {
            if url_scheme(&provider.api_base_url, &["https"]) {
                continue;
            }
            let risk = format!(
                "is not https: the tokens of provider {:?} and its answers cross the network in plaintext",
                provider.id
            );
            if !provider.allow_insecure_http {
                return Err(Violation::new(
                    &format!("providers.{index}.api_base_url"),
                    format!("{} {risk} (refused when app.env = production)", provider.api_base_url),
                    format!(
                        "an https:// URL; or gitsync.providers.{index}.allow_insecure_http = true to accept \
                         the risk"
                    ),
                ));
            }
            warnings.push(format!(
                "gitsync.providers.{index}.api_base_url {risk}; accepted because \
                 gitsync.providers.{index}.allow_insecure_http = true"
            ));
        }
        Ok(warnings)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_follow_the_spec() {
        let config = GitsyncConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(
            (config.base.interval, config.base.tick_timeout),
            (Duration::from_secs(10), Duration::from_secs(30))
        );
        assert_eq!((config.batch_size, config.concurrency), (50, 10));
        assert_eq!(config.effective_providers(), vec![ProviderConfig::github_default()]);
    }

    #[test]
    fn validate_names_the_bad_key() {
        type Spoil = fn(&mut GitsyncConfig);
        let cases: [(Spoil, &str); 6] = [
            (|c| c.base.interval = Duration::ZERO, "interval"),
            (|c| c.batch_size = 0, "batch_size"),
            (|c| c.lease = c.base.tick_timeout, "lease"),
            (|c| c.concurrency = 0, "concurrency"),
            (|c| c.max_body_bytes = 10, "max_body_bytes"),
            (
                |c| {
                    let mut bad = ProviderConfig::github_default();
                    bad.origin_host = "https://github.com".into();
                    c.providers = vec![bad];
                },
                "providers.0.origin_host",
            ),
        ];
        for (spoil, key) in cases {
            let mut config = GitsyncConfig::default();
            spoil(&mut config);
            assert_eq!(config.validate().expect_err(key).key, key);
        }
    }

    #[test]
    fn the_tls_floor_refuses_a_provider_that_is_not_https_unless_it_allows_it() {
        assert_eq!(GitsyncConfig::default().tls_floor(), Ok(Vec::new()), "github.com is https");
        let fake = ProviderConfig {
            id: "fake".into(),
            api_base_url: "http://127.0.0.1:8080".into(),
            origin_host: "fake.example".into(),
            ..ProviderConfig::github_default()
        };
        let mut config = GitsyncConfig {
            providers: vec![ProviderConfig::github_default(), fake],
            ..GitsyncConfig::default()
        };
        let refused = config.tls_floor().expect_err("http");
        assert_eq!(refused.key, "providers.1.api_base_url");
        assert!(
            refused
                .problem
                .starts_with("http://127.0.0.1:8080 is not https: the tokens of provider \"fake\""),
            "{refused:?}"
        );
        assert!(refused.expected.contains("gitsync.providers.1.allow_insecure_http = true"), "{refused:?}");
        config.providers[1].allow_insecure_http = true;
        let warnings = config.tls_floor().expect("allowed");
        assert_eq!(warnings.len(), 1);
        assert!(warnings[0].starts_with("gitsync.providers.1.api_base_url is not https"), "{warnings:?}");
    }
}
