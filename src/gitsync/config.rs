//! `[gitsync]` and `[[gitsync.providers]]`: the refresher's schedule, lease, backoffs, fan-out,
//! the git providers whose tokens it may use and the keys those tokens are encrypted under.

use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::github::DEFAULT_MAX_BODY_BYTES;
use super::provider::{ProviderConfig, validate_providers};
use super::tokens::{TokenKeySecret, TokenKeys, deserialize_key_list};
use crate::config::{Violation, check, positive};

/// SPEC §7.2: every 10 s, with a 30 s tick timeout (separate from the interval).
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
/// Upper bound of rows refreshed at once; `database.pool_size` caps it further (SPEC §4).
pub const DEFAULT_CONCURRENCY: usize = 10;

/// `[gitsync]`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct GitsyncConfig {
    pub enabled: bool,
    #[serde(with = "humantime_serde")]
    pub interval: Duration,
    #[serde(with = "humantime_serde")]
    pub tick_timeout: Duration,
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
            enabled: true,
            interval: DEFAULT_INTERVAL,
            tick_timeout: DEFAULT_TICK_TIMEOUT,
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
        positive("interval", self.interval)?;
        positive("tick_timeout", self.tick_timeout)?;
        check((1..=1000).contains(&self.batch_size), "batch_size", self.batch_size, "1..=1000")?;
        check(
            self.lease > self.tick_timeout,
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_follow_the_spec() {
        let config = GitsyncConfig::default();
        assert_eq!(config.validate(), Ok(()));
        assert_eq!(
            (config.interval, config.tick_timeout),
            (Duration::from_secs(10), Duration::from_secs(30))
        );
        assert_eq!((config.batch_size, config.concurrency), (50, 10));
        assert_eq!(config.effective_providers(), vec![ProviderConfig::github_default()]);
    }

    #[test]
    fn validate_names_the_bad_key() {
        type Spoil = fn(&mut GitsyncConfig);
        let cases: [(Spoil, &str); 6] = [
            (|c| c.interval = Duration::ZERO, "interval"),
            (|c| c.batch_size = 0, "batch_size"),
            (|c| c.lease = c.tick_timeout, "lease"),
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

    /// Two valid keys, and one whose base64 starts with `true` (figment's env parser reads a
    /// bare `true` as a boolean, so a list holding it stays a string: the fallback splits it).
    fn keys() -> [String; 3] {
        use base64::Engine;
        let engine = base64::engine::general_purpose::STANDARD;
        let mut truthy = engine.decode("true").expect("b64");
        truthy.resize(32, 9);
        [engine.encode([1u8; 32]), engine.encode([2u8; 32]), engine.encode(truthy)]
    }

    fn from_env(value: &str) -> Result<crate::config::Loaded, crate::config::ConfigError> {
        let mut inputs = crate::config::ConfigInputs::default();
        inputs.env.insert("WORKER__GITSYNC__TOKEN_KEYS".into(), value.into());
        crate::config::load(&inputs)
    }

    fn exposed(loaded: &crate::config::Loaded) -> Vec<String> {
        loaded.config.gitsync.token_keys.iter().map(|k| k.expose().to_owned()).collect()
    }

    #[test]
    fn token_keys_come_from_the_environment_as_a_list_or_comma_separated() {
        let [a, b, t] = keys();
        assert!(t.starts_with("true"), "{t}");
        for (value, want) in [
            (format!("[{a},{b}]"), vec![a.clone(), b.clone()]),
            (format!("[\"{a}\", \"{b}\"]"), vec![a.clone(), b.clone()]),
            (format!("{a},{b}"), vec![a.clone(), b.clone()]),
            (format!(" {a} , {b} "), vec![a.clone(), b.clone()]),
            (a.clone(), vec![a.clone()]),
            (format!("[{t},{a}]"), vec![t.clone(), a.clone()]),
            (format!("{t},{a}"), vec![t.clone(), a.clone()]),
            (String::new(), vec![]),
            ("[]".into(), vec![]),
        ] {
            let loaded = from_env(&value).unwrap_or_else(|e| panic!("{value}: {e}"));
            assert_eq!(exposed(&loaded), want, "{value}");
            let keys = loaded.config.gitsync.token_keys().expect("valid");
            assert_eq!(keys.ids().len(), want.len());
            assert_eq!(
                loaded.sources["gitsync.token_keys"],
                crate::config::Source::Env("WORKER__GITSYNC__TOKEN_KEYS".into())
            );
        }
    }

    #[test]
    fn token_keys_in_a_file_are_a_toml_list() {
        let [a, b, _] = keys();
        let config: GitsyncConfig =
            toml::from_str(&format!("token_keys = [\"{a}\", \"{b}\"]")).expect("parses");
        assert_eq!(config.token_keys().expect("valid").ids().len(), 2);
        assert_eq!(config.validate(), Ok(()));

        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), format!("[gitsync]\ntoken_keys = [\n  \"{a}\",\n  \"{a}\",\n]\n"))
            .expect("write");
        let inputs = crate::config::ConfigInputs { file: Some(file.path().to_owned()), ..Default::default() };
        let err = crate::config::load(&inputs).expect_err("duplicate");
        assert_eq!(err.key(), Some("gitsync.token_keys.1"), "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("{}:4", file.path().display())) && !text.contains(&a), "{text}");
    }

    #[test]
    fn a_bad_token_key_is_refused_naming_its_index_and_source_never_the_key() {
        use base64::Engine;
        let [a, b, _] = keys();
        let short = base64::engine::general_purpose::STANDARD.encode([5u8; 31]);
        for (value, key, problem) in [
            (format!("{a},{b},not*base64*at*all"), "gitsync.token_keys.2", "not base64"),
            (format!("{a},{short}"), "gitsync.token_keys.1", "decodes to 31 bytes"),
            (format!("{a},{b},{a}"), "gitsync.token_keys.2", "the same key as gitsync.token_keys.0"),
            (format!("{a},,{b}"), "gitsync.token_keys.1", "empty"),
        ] {
            let err = from_env(&value).expect_err(&value);
            assert_eq!(err.key(), Some(key), "{err}");
            let text = err.to_string();
            assert!(text.contains(problem) && text.contains("env WORKER__GITSYNC__TOKEN_KEYS"), "{text}");
            for secret in [&a, &b, &short] {
                assert!(!text.contains(secret.as_str()), "the key is never shown: {text}");
            }
        }
    }

    #[test]
    fn config_print_and_debug_never_show_a_token_key() {
        let [a, b, _] = keys();
        let loaded = from_env(&format!("{a},{b}")).expect("loads");
        let printed = loaded.config.render(&loaded.sources);
        let debug = format!("{:?}", loaded.config);
        let ids = loaded.config.gitsync.token_keys().expect("valid");
        for text in [&printed, &debug] {
            assert!(!text.contains(&a) && !text.contains(&b), "{text}");
        }
        let line = format!(
            "token_keys = [\"*** (key id {})\", \"*** (key id {})\"]  # env WORKER__GITSYNC__TOKEN_KEYS",
            ids.ids()[0],
            ids.ids()[1]
        );
        assert!(printed.contains(&line), "{printed}");
    }

    #[test]
    fn configured_providers_replace_the_default() {
        let config: GitsyncConfig = toml::from_str(
            "[[providers]]\nid = \"ghe\"\nkind = \"github\"\napi_base_url = \"https://ghe.example.com/api/v3\"\n\
             origin_host = \"ghe.example.com\"",
        )
        .expect("parses");
        let ids: Vec<_> = config.effective_providers().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["ghe"]);
    }
}
