//! Typed configuration: built-in defaults < TOML file < environment < CLI flags.
//!
//! The top of the module graph: [`Config`] composes each component's own section
//! (`db::DatabaseConfig`, `outbox::OutboxConfig`, …, each validated by its owner with the helpers
//! of [`crate::validate`]); no component imports this module.
//!
//! Every key can come from the environment as `WORKER__SECTION__KEY`; the conventional
//! `DATABASE_URL`, `REDIS_URL`, `APP_ENV` and `OTEL_EXPORTER_OTLP_PROTOCOL` are honoured too (the
//! OTLP endpoint variables are read by the exporter itself, see `telemetry`).
//! Errors name the key, where its value came from (`file:line`, env var or flag) and what was
//! expected, so an operator can fix a bad deploy from the log line alone.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use figment::Figment;
use figment::providers::{Format, Serialized, Toml};
use figment::value::Value;
use serde::{Deserialize, Serialize};

use crate::chats::ChatsConfig;
use crate::counters::CountersConfig;
use crate::db::DatabaseConfig;
use crate::gitsync::GitsyncConfig;
use crate::health::HealthConfig;
use crate::outbox::OutboxConfig;
use crate::prebuilds::PrebuildsConfig;
use crate::redis::RedisConfig;
use crate::retention::{AuditConfig, RetentionConfig};
use crate::runtime::RuntimeConfig;
use crate::telemetry::{LogConfig, TelemetryConfig};
use crate::text::redact_url;
pub use crate::validate::ENV_PREFIX;
use crate::validate::{Violation, check, positive};
use crate::wakes::ListenConfig;
use crate::workers::WorkersConfig;

/// Default config file, relative to the working directory.
pub const DEFAULT_CONFIG_PATH: &str = "config/worker.toml";

/// The `app.env` that turns on the production floors (verified TLS, see [`Config::tls_floor`]).
pub const PRODUCTION: &str = "production";

/// Conventional environment variables mapped onto config keys (lower precedence than
/// `WORKER__…`, which is the more specific spelling).
const ENV_ALIASES: &[(&str, &str)] = &[
    ("DATABASE_URL", "database.url"),
    ("REDIS_URL", "redis.url"),
    ("APP_ENV", "app.env"),
    ("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL", "telemetry.otlp_protocol"),
    ("OTEL_EXPORTER_OTLP_PROTOCOL", "telemetry.otlp_protocol"),
];

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub app: AppConfig,
    pub log: LogConfig,
    pub database: DatabaseConfig,
    pub redis: RedisConfig,
    pub health: HealthConfig,
    pub telemetry: TelemetryConfig,
    pub runtime: RuntimeConfig,
    pub workers: WorkersConfig,
    pub outbox: OutboxConfig,
    pub counters: CountersConfig,
    pub chats: ChatsConfig,
    pub gitsync: GitsyncConfig,
    pub prebuilds: PrebuildsConfig,
    pub listen: ListenConfig,
    pub retention: RetentionConfig,
    pub audit: AuditConfig,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct AppConfig {
    /// `development`, `staging`, `production`, … (exported as `deployment.environment.name`).
    pub env: String,
    /// How long a graceful stop may take before the process exits anyway.
    #[serde(with = "humantime_serde")]
    pub shutdown_timeout: Duration,
}

impl Default for AppConfig {
    fn default() -> Self {
        Self { env: "development".into(), shutdown_timeout: Duration::from_secs(30) }
    }
}

/// Fan-out of the loops that fan out, derived from the pool limit in one place so the pool can
/// never be exhausted by them
/// (`docs/configuration.md`, "Concurrency").
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Concurrency {
    pub prebuilds: usize,
    pub gitsync: usize,
}

impl Concurrency {
    pub fn from_config(config: &Config) -> Self {
        let half_pool = (config.database.shared_pool_size(config.chats.enabled) / 2).max(1);
        // An explicit value is capped like gitsync's: above half the pool the reconciler's
        // fan-out would hold every connection for a whole cycle and starve the other loops.
        let prebuilds = match config.prebuilds.concurrency {
            0 => half_pool,
            n => n.min(half_pool),
        };
        Self { prebuilds, gitsync: config.gitsync.concurrency.min(half_pool) }
    }
}

/// Where a configuration value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    Default,
    File { path: PathBuf, line: usize },
    Env(String),
    Flag(String),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Default => f.write_str("built-in default"),
            Source::File { path, line } => write!(f, "{}:{line}", path.display()),
            Source::Env(name) => write!(f, "env {name}"),
            Source::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {error}")]
    Read { path: PathBuf, error: std::io::Error },
    #[error("{path}:{line}:{column}: invalid TOML: {message}")]
    Syntax { path: PathBuf, line: usize, column: usize, message: String },
    #[error("config key `{key}` (from {origin}): {problem}; expected {expected}")]
    Invalid { key: String, origin: Source, problem: String, expected: String },
}

impl ConfigError {
    /// The dotted key the error is about, if it is about one.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::Invalid { key, .. } => Some(key),
            _ => None,
        }
    }
}

/// Everything a config is built from; environment and flags are passed in (not read from the
/// process) so loading is a pure function that tests can call in parallel.
#[derive(Debug, Clone, Default)]
pub struct ConfigInputs {
    /// The TOML file; `None` = defaults only. A missing file is an error when it was named.
    pub file: Option<PathBuf>,
    /// Environment variables (only `WORKER__*` and the aliases are looked at).
    pub env: BTreeMap<String, String>,
    /// `(dotted key, raw value, flag name)` from the command line.
    pub flags: Vec<(String, String, String)>,
}

impl ConfigInputs {
    /// Inputs from the real process environment and an optional `--config` path.
    pub fn from_process(config_path: Option<PathBuf>) -> Self {
        let env: BTreeMap<String, String> = std::env::vars().collect();
        let file = config_path.or_else(|| env.get("WORKER_CONFIG").map(PathBuf::from)).or_else(|| {
            let default = PathBuf::from(DEFAULT_CONFIG_PATH);
            default.exists().then_some(default)
        });
        Self { file, env, flags: Vec::new() }
    }

    pub fn flag(mut self, key: &str, value: impl Into<String>, flag: &str) -> Self {
        self.flags.push((key.to_owned(), value.into(), flag.to_owned()));
        self
    }
}

/// A loaded config plus where each leaf value came from.
#[derive(Debug, Clone)]
pub struct Loaded {
    pub config: Config,
    pub sources: BTreeMap<String, Source>,
    /// Risks the config accepts explicitly (a production floor relaxed by an `allow_*` key):
    /// printed by `config check`, logged by `run` and `migrate`.
    pub warnings: Vec<String>,
}

pub fn load(inputs: &ConfigInputs) -> Result<Loaded, ConfigError> {
    let file = match &inputs.file {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|error| ConfigError::Read { path: path.clone(), error })?;
            check_toml_syntax(path, &text)?;
            Some((path.clone(), text))
        }
        None => None,
    };
    let overrides = Overrides::collect(inputs);

    let mut figment = Figment::from(Serialized::defaults(Config::default()));
    if let Some((_, text)) = &file {
        figment = figment.merge(Toml::string(text));
    }
    for over in &overrides.0 {
        let value: Value = over.raw.parse().unwrap_or_else(|never| match never {});
        figment = figment.merge(Serialized::default(&over.key, value));
    }

    let lines = file.as_ref().map(|(path, text)| (path.clone(), KeyLines::parse(text)));
    let locate = |key: &str| locate(key, &overrides, lines.as_ref());
    let config: Config = figment.extract().map_err(|error| {
        let (key, problem, expected) = describe_figment_error(&precise_error(&figment, error));
        ConfigError::Invalid { origin: locate(&key), key, problem, expected }
    })?;
    let invalid = |Violation { key, problem, expected }| ConfigError::Invalid {
        origin: locate(&key),
        key,
        problem,
        expected,
    };
    let warnings = config.validate().map_err(invalid)?;

    let sources = leaf_keys(&config).into_iter().map(|key| {
        let source = locate(&key);
        (key, source)
    });
    Ok(Loaded { sources: sources.collect(), config, warnings })
}

/// One override from the environment or a flag, in precedence order (later wins).
struct Override {
    key: String,
    raw: String,
    source: Source,
}

struct Overrides(Vec<Override>);

impl Overrides {
    fn collect(inputs: &ConfigInputs) -> Self {
        let mut all = Vec::new();
        // Aliases first (reverse so the more specific alias, listed first, wins).
        for (var, key) in ENV_ALIASES.iter().rev() {
            if let Some(raw) = inputs.env.get(*var).filter(|v| !v.is_empty()) {
                all.push(Override {
                    key: (*key).into(),
                    raw: raw.clone(),
                    source: Source::Env((*var).into()),
                });
            }
        }
        for (var, raw) in &inputs.env {
            if let Some(rest) = var.strip_prefix(ENV_PREFIX) {
                let key = rest.split("__").map(str::to_lowercase).collect::<Vec<_>>().join(".");
                all.push(Override { key, raw: raw.clone(), source: Source::Env(var.clone()) });
            }
        }
        for (key, raw, flag) in &inputs.flags {
            all.push(Override { key: key.clone(), raw: raw.clone(), source: Source::Flag(flag.clone()) });
        }
        Self(all)
    }
}

fn locate(key: &str, overrides: &Overrides, file: Option<&(PathBuf, KeyLines)>) -> Source {
    if let Some(over) =
        // The key itself or a table above it (`--set outbox={…}`); failing those, a key below it:
        // an unknown section such as WORKER__OUTBX__ENABLED is reported at `outbx`.
        overrides
            .0
            .iter()
            .rev()
            .find(|o| o.key == key || key.starts_with(&format!("{}.", o.key)))
            .or_else(|| overrides.0.iter().rev().find(|o| o.key.starts_with(&format!("{key}."))))
    {
        return over.source.clone();
    }
    if let Some((path, lines)) = file
        && let Some(line) = lines.line_of(key)
    {
        return Source::File { path: path.clone(), line };
    }
    Source::Default
}

/// The line of every key, table header and array-of-tables element of a TOML text, under its
/// dotted path (`chats.runner.command`; elements of `[[gitsync.providers]]` as
/// `gitsync.providers.0`, their keys as `gitsync.providers.0.id`), taken from the parser's
/// spans so nested tables, dotted keys, inline tables and arrays of tables all resolve.
#[derive(Debug, Default)]
struct KeyLines(BTreeMap<String, usize>);

impl KeyLines {
    fn parse(text: &str) -> Self {
        let mut lines = Self::default();
        // The text was syntax-checked already; an unparsable one simply has no lines.
        if let Ok(table) = toml::de::DeTable::parse(text) {
            let line_at = |offset: usize| text[..offset.min(text.len())].matches('\n').count() + 1;
            lines.table("", table.get_ref(), &line_at);
        }
        lines
    }

    fn table(&mut self, prefix: &str, table: &toml::de::DeTable<'_>, line_at: &dyn Fn(usize) -> usize) {
        for (key, value) in table {
            let path = join(prefix, key.get_ref());
            self.0.entry(path.clone()).or_insert(line_at(key.span().start));
            self.value(&path, value, line_at);
        }
    }

    fn value(
        &mut self,
        path: &str,
        value: &toml::Spanned<toml::de::DeValue<'_>>,
        line_at: &dyn Fn(usize) -> usize,
    ) {
        match value.get_ref() {
            toml::de::DeValue::Table(inner) => self.table(path, inner, line_at),
            toml::de::DeValue::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    let element = format!("{path}.{index}");
                    self.0.entry(element.clone()).or_insert(line_at(item.span().start));
                    self.value(&element, item, line_at);
                }
            }
            _ => {}
        }
    }

    /// The line of `key`, else of the closest enclosing table or element that the file has (an
    /// unknown key inside a table is reported at that table when its own line is unknown).
    fn line_of(&self, key: &str) -> Option<usize> {
        let mut candidate = key;
        loop {
            if let Some(line) = self.0.get(candidate) {
                return Some(*line);
            }
            candidate = &candidate[..candidate.rfind('.')?];
        }
    }
}

fn join(prefix: &str, key: &str) -> String {
    if prefix.is_empty() { key.to_owned() } else { format!("{prefix}.{key}") }
}

fn check_toml_syntax(path: &Path, text: &str) -> Result<(), ConfigError> {
    match text.parse::<toml::Table>() {
        Ok(_) => Ok(()),
        Err(error) => {
            let offset = error.span().map_or(0, |span| span.start);
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            let message = error.message().to_owned();
            Err(ConfigError::Syntax { path: path.to_owned(), line, column, message })
        }
    }
}

/// serde reports a bad value among the keys flattened into a loop's table
/// ([`crate::runtime::LoopConfig`]: `enabled`, `interval`, `tick_timeout`) at the table, not at the
/// key: reading those keys of that table on their own names the key.
fn precise_error(figment: &Figment, error: figment::Error) -> figment::Error {
    if error.path.len() != 1 || matches!(error.kind, figment::error::Kind::UnknownField(..)) {
        return error;
    }
    let table = &error.path[0];
    match figment.extract_inner::<crate::runtime::LoopConfig>(table) {
        // figment puts the key before the table it was read from; the key's own path is
        // `table.key`.
        Err(mut precise) if precise.path.len() > error.path.len() => {
            let key = precise.path.iter().filter(|part| *part != table).cloned();
            precise.path = std::iter::once(table.clone()).chain(key).collect();
            precise
        }
        _ => error,
    }
}

/// The keys a table of the default config has: what an unknown key inside a flattened table is
/// told to be instead (serde lists none there).
fn known_keys(path: &[String]) -> Vec<String> {
    let Ok(mut table) = toml::Table::try_from(Config::default()) else { return Vec::new() };
    for part in path {
        match table.remove(part) {
            Some(toml::Value::Table(inner)) => table = inner,
            _ => return Vec::new(),
        }
    }
    table.keys().cloned().collect()
}

fn describe_figment_error(error: &figment::Error) -> (String, String, String) {
    use figment::error::Kind;
    // Inside a flattened table serde says only "unknown field `x`", at the table.
    let unknown_in_flattened = match &error.kind {
        Kind::UnknownField(name, []) => Some(name.clone()),
        Kind::Message(message) => message
            .strip_prefix("unknown field `")
            .and_then(|rest| rest.split_once('`'))
            .map(|(name, _)| name.to_owned()),
        _ => None,
    };
    if let Some(name) = unknown_in_flattened {
        let expected = format!("one of: {}", known_keys(&error.path).join(", "));
        return (join(&error.path.join("."), &name), "unknown key".to_owned(), expected);
    }
    let (problem, expected) = match &error.kind {
        // figment's path already ends with the unknown field.
        Kind::UnknownField(_, known) => ("unknown key".to_owned(), format!("one of: {}", known.join(", "))),
        Kind::InvalidType(actual, expected) => (format!("wrong type: found {actual}"), expected.clone()),
        Kind::InvalidValue(actual, expected) => (format!("invalid value: {actual}"), expected.clone()),
        Kind::UnknownVariant(found, known) => {
            (format!("unknown value `{found}`"), format!("one of: {}", known.join(", ")))
        }
        Kind::Message(message) => (message.clone(), "a valid value".to_owned()),
        other => (other.to_string(), "a valid value".to_owned()),
    };
    (error.path.join("."), problem, expected)
}

impl Config {
    /// Range checks serde cannot express, and the checks spanning sections. Returns the first
    /// violation as (key, problem, expected), else the warnings of risks the config accepts.
    fn validate(&self) -> Result<Vec<String>, Violation> {
        self.database.validate().map_err(|v| v.under("database"))?;
        self.redis.validate().map_err(|v| v.under("redis"))?;
        self.log.validate().map_err(|v| v.under("log"))?;
        positive("app.shutdown_timeout", self.app.shutdown_timeout)?;
        check(!self.app.env.is_empty(), "app.env", "\"\"", "a non-empty environment name")?;
        self.telemetry.validate().map_err(|v| v.under("telemetry"))?;
        self.health.validate().map_err(|v| v.under("health"))?;
        self.runtime.validate().map_err(|v| v.under("runtime"))?;
        self.workers.validate().map_err(|v| v.under("workers"))?;
        self.outbox.validate().map_err(|v| v.under("outbox"))?;
        self.counters.validate().map_err(|v| v.under("counters"))?;
        self.chats.validate().map_err(|v| v.under("chats"))?;
        // Recovery takes the chats of a worker whose row is gone at once: a row reaped before its
        // lease is stale would hand out chats whose agents still run. Every replica that reaps
        // checks it, chat loops or not: a replica without them deletes the rows of those with.
        if self.chats.enabled || self.workers.base.enabled {
            check(
                self.workers.retention > self.chats.stale_after,
                "workers.retention",
                humantime::format_duration(self.workers.retention),
                "more than chats.stale_after (a dead worker's row must outlive its lease, on every \
                 replica that reaps rows, chat loops or not)",
            )?;
        }
        if self.chats.enabled {
            self.chats.check_lease_margin(self.runtime.jitter).map_err(|v| v.under("chats"))?;
            // The lease renews on a connection of its own (see `daemon`), out of the shared pool.
            check(
                self.database.pool_size >= 2,
                "database.pool_size",
                self.database.pool_size,
                "at least 2 while chats.enabled (one connection is reserved for the lease)",
            )?;
        }
        self.gitsync.validate().map_err(|v| v.under("gitsync"))?;
        self.prebuilds.validate().map_err(|v| v.under("prebuilds"))?;
        self.listen.validate().map_err(|v| v.under("listen"))?;
        self.retention.validate().map_err(|v| v.under("retention"))?;
        self.audit.validate().map_err(|v| v.under("audit"))?;
        // The reconciler holds the leader lock on one connection and reads its snapshot on a
        // second: with one connection it could never tick.
        check(
            !self.prebuilds.base.enabled || self.database.pool_size >= 2,
            "database.pool_size",
            self.database.pool_size,
            "at least 2 while prebuilds.enabled (leader lock + snapshot)",
        )?;
        self.check_idle_in_transaction()?;
        self.tls_floor()
    }

    /// Two loops keep a transaction open while they wait on something else: the prebuilds
    /// leader for its whole tick, the outbox across its Redis writes. The server must not end
    /// those for idling; their tick timeout bounds the wait.
    fn check_idle_in_transaction(&self) -> Result<(), Violation> {
        let idle = self.database.idle_in_transaction_timeout;
        for (enabled, key, tick_timeout) in [
            (self.prebuilds.base.enabled, "prebuilds.tick_timeout", self.prebuilds.base.tick_timeout),
            (self.outbox.base.enabled, "outbox.tick_timeout", self.outbox.base.tick_timeout),
        ] {
            check(
                !enabled || idle > tick_timeout,
                "database.idle_in_transaction_timeout",
                humantime::format_duration(idle),
                &format!(
                    "longer than {key} ({}): that loop keeps its transaction open for up to a tick",
                    humantime::format_duration(tick_timeout)
                ),
            )?;
        }
        Ok(())
    }

    /// With `app.env = production`, every connection leaving the process must be verified TLS:
    /// PostgreSQL URLs `sslmode=verify-ca|verify-full`, `rediss://` while a loop uses Redis,
    /// `https` providers while gitsync runs. Each weaker one is refused naming its key, unless
    /// its section's `allow_*` key accepts it; the warnings of those are returned. Elsewhere
    /// (development, tests) nothing is checked: local servers rarely have certificates.
    pub fn tls_floor(&self) -> Result<Vec<String>, Violation> {
        if self.app.env != PRODUCTION {
            return Ok(Vec::new());
        }
        let mut warnings = self.database.tls_floor().map_err(|v| v.under("database"))?;
        if self.outbox.base.enabled || self.counters.base.enabled {
            warnings.extend(self.redis.tls_floor().map_err(|v| v.under("redis"))?);
        }
        if self.gitsync.base.enabled {
            warnings.extend(self.gitsync.tls_floor().map_err(|v| v.under("gitsync"))?);
        }
        Ok(warnings)
    }

    /// The effective config as TOML with secrets redacted, each value annotated with its source
    /// (nested tables and arrays of tables included).
    pub fn render(&self, sources: &BTreeMap<String, Source>) -> String {
        let mut redacted = self.clone();
        redacted.database.url = redact_url(&redacted.database.url);
        redacted.database.listen_url = redacted.database.listen_url.as_deref().map(redact_url);
        redacted.database.migrate_url = redacted.database.migrate_url.as_deref().map(redact_url);
        redacted.redis.url = redact_url(&redacted.redis.url);
        // The agent's own variables may be credentials (a model API key): names only.
        for value in redacted.chats.runner.env.values_mut() {
            *value = "<redacted>".into();
        }
        let keys = redacted.gitsync.token_keys.iter().map(|k| k.redacted());
        redacted.gitsync.token_keys = keys.map(crate::gitsync::TokenKeySecret::new).collect();
        match toml::Table::try_from(&redacted) {
            Ok(table) => {
                let mut out = String::new();
                render_table(&mut out, "", &table, sources, None);
                out
            }
            Err(e) => format!("# cannot render config: {e}\n"),
        }
    }
}

/// Writes `table`'s plain keys (annotated), then its sub-tables as `[path]` and its arrays of
/// tables as `[[path]]` sections, recursively. `header` is the section line to write first.
fn render_table(
    out: &mut String,
    path: &str,
    table: &toml::Table,
    sources: &BTreeMap<String, Source>,
    header: Option<String>,
) {
    let is_section = |v: &toml::Value| match v {
        toml::Value::Table(_) => true,
        toml::Value::Array(items) => !items.is_empty() && items.iter().all(toml::Value::is_table),
        _ => false,
    };
    let plain: Vec<_> = table.iter().filter(|(_, v)| !is_section(v)).collect();
    if let Some(header) = header
        && (!plain.is_empty() || path.matches('.').count() == 0 || path.ends_with(char::is_numeric))
    {
        if !out.is_empty() {
            out.push('\n');
        }
        out.push_str(&header);
        out.push('\n');
    }
    for (key, value) in plain {
        let full = join(path, key);
        let mut line = format!("{key} = {value}");
        if let Some(source) = sources.get(&full) {
            line.push_str(&format!("  # {source}"));
        }
        out.push_str(&line);
        out.push('\n');
    }
    for (key, value) in table.iter().filter(|(_, v)| is_section(v)) {
        let full = join(path, key);
        match value {
            toml::Value::Table(inner) => render_table(out, &full, inner, sources, Some(format!("[{full}]"))),
            toml::Value::Array(items) => {
                for (index, item) in items.iter().enumerate() {
                    if let toml::Value::Table(inner) = item {
                        let element = format!("{full}.{index}");
                        render_table(out, &element, inner, sources, Some(format!("[[{full}]]")));
                    }
                }
            }
            _ => {}
        }
    }
}

/// Every dotted leaf key of a config (from its serialized form), array-of-tables elements as
/// `table.array.N.key`.
fn leaf_keys(config: &Config) -> Vec<String> {
    let mut keys = Vec::new();
    if let Ok(table) = toml::Table::try_from(config) {
        collect_leaves("", &toml::Value::Table(table), &mut keys);
    }
    keys
}

fn collect_leaves(path: &str, value: &toml::Value, keys: &mut Vec<String>) {
    match value {
        toml::Value::Table(table) => {
            table.iter().for_each(|(key, inner)| collect_leaves(&join(path, key), inner, keys));
        }
        toml::Value::Array(items) if !items.is_empty() && items.iter().all(toml::Value::is_table) => {
            for (index, item) in items.iter().enumerate() {
                collect_leaves(&format!("{path}.{index}"), item, keys);
            }
        }
        _ => keys.push(path.to_owned()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(text: &str) -> tempfile::NamedTempFile {
        let file = tempfile::NamedTempFile::new().expect("temp file");
        std::fs::write(file.path(), text).expect("write temp config");
        file
    }

    fn inputs(file: &tempfile::NamedTempFile) -> ConfigInputs {
        ConfigInputs { file: Some(file.path().to_owned()), ..Default::default() }
    }

    #[test]
    fn defaults_are_valid() {
        let loaded = load(&ConfigInputs::default()).expect("defaults load");
        assert_eq!(loaded.config, Config::default());
        assert_eq!(loaded.sources["database.pool_size"], Source::Default);
    }

    #[test]
    fn a_bad_toml_line_is_reported_with_file_and_line() {
        let file = write("[database]\npool_size = 4\nurl = \"unterminated\n");
        let err = load(&inputs(&file)).expect_err("syntax error");
        match &err {
            ConfigError::Syntax { line, .. } => assert_eq!(*line, 3, "{err}"),
            other => panic!("expected a syntax error, got {other}"),
        }
        assert!(err.to_string().contains(&format!("{}:3:", file.path().display())), "{err}");
    }

    #[test]
    fn an_unknown_key_names_the_key_and_its_file_line() {
        let file = write("[database]\npool_size = 4\n\n[outbox]\nbatch_sise = 10\n");
        let err = load(&inputs(&file)).expect_err("unknown key");
        assert_eq!(err.key(), Some("outbox.batch_sise"), "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("{}:5", file.path().display())), "{text}");
        assert!(text.contains("batch_size"), "lists the known keys: {text}");
    }

    #[test]
    fn a_bad_value_among_a_loops_shared_keys_names_the_key() {
        let mut env = ConfigInputs::default();
        env.env.insert("WORKER__COUNTERS__INTERVAL".into(), "5 parsecs".into());
        let err = load(&env).expect_err("bad duration");
        assert_eq!(err.key(), Some("counters.interval"), "{err}");
        assert!(err.to_string().contains("env WORKER__COUNTERS__INTERVAL"), "{err}");

        let file = write("[prebuilds]\nenabled = \"maybe\"\n");
        let err = load(&inputs(&file)).expect_err("not a bool");
        assert_eq!(err.key(), Some("prebuilds.enabled"), "{err}");
        assert!(err.to_string().contains(&format!("{}:2", file.path().display())), "{err}");

        let file = write("[workers]\ntick_timeot = \"1s\"\n");
        let err = load(&inputs(&file)).expect_err("unknown key");
        assert_eq!(err.key(), Some("workers.tick_timeot"), "{err}");
        let text = err.to_string();
        assert!(text.contains("tick_timeout") && text.contains("retention"), "lists the known keys: {text}");
    }

    #[test]
    fn an_idle_in_transaction_bound_at_or_below_a_tick_that_holds_a_transaction_is_refused() {
        let file = write(
            "[database]\nidle_in_transaction_timeout = \"30s\"\n\n[prebuilds]\nenabled = true\ntick_timeout = \"30s\"\n",
        );
        let err = load(&inputs(&file)).expect_err("the leader's transaction would be ended");
        assert_eq!(err.key(), Some("database.idle_in_transaction_timeout"), "{err}");
        assert!(err.to_string().contains("prebuilds.tick_timeout (30s)"), "{err}");

        let file = write(
            "[database]\nidle_in_transaction_timeout = \"10s\"\n\n[prebuilds]\nenabled = false\n\n[outbox]\nenabled = true\n",
        );
        let err = load(&inputs(&file)).expect_err("the outbox's tick is 10 s by default");
        assert!(err.to_string().contains("outbox.tick_timeout (10s)"), "{err}");

        // A loop that is off holds nothing.
        let file = write(
            "[database]\nidle_in_transaction_timeout = \"10s\"\n\n[prebuilds]\nenabled = false\n\n[outbox]\nenabled = false\n",
        );
        load(&inputs(&file)).expect("both off");
        let file = write("[database]\nidle_in_transaction_timeout = \"0s\"\n");
        assert_eq!(
            load(&inputs(&file)).expect_err("zero").key(),
            Some("database.idle_in_transaction_timeout")
        );
    }

    #[test]
    fn an_unknown_section_is_an_error() {
        let file = write("[databse]\nurl = \"postgres://x/y\"\n");
        let err = load(&inputs(&file)).expect_err("unknown section");
        assert_eq!(err.key(), Some("databse"), "{err}");
        assert!(err.to_string().contains(":1"), "{err}");
    }

    #[test]
    fn a_wrong_type_from_env_names_the_variable() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("WORKER__OUTBOX__BATCH_SIZE".into(), "lots".into());
        let err = load(&inputs).expect_err("wrong type");
        assert_eq!(err.key(), Some("outbox.batch_size"), "{err}");
        let text = err.to_string();
        assert!(text.contains("env WORKER__OUTBOX__BATCH_SIZE"), "{text}");
        assert!(text.contains("lots"), "{text}");
    }

    #[test]
    fn an_unknown_section_from_env_names_the_variable() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("WORKER__OUTBX__ENABLED".into(), "true".into());
        let err = load(&inputs).expect_err("unknown section");
        assert_eq!(err.key(), Some("outbx"), "{err}");
        assert!(err.to_string().contains("env WORKER__OUTBX__ENABLED"), "{err}");
    }

    #[test]
    fn a_log_level_that_is_no_tracing_filter_is_refused_naming_its_source() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("WORKER__LOG__LEVEL".into(), "info,[[[".into());
        let err = load(&inputs).expect_err("bad filter");
        assert_eq!(err.key(), Some("log.level"), "{err}");
        let text = err.to_string();
        assert!(text.contains("WORKER__LOG__LEVEL") && text.contains("info,[[["), "{text}");
        inputs.env.insert("WORKER__LOG__LEVEL".into(), "worker=debug,info".into());
        load(&inputs).expect("directives are a valid filter");
    }

    #[test]
    fn a_bad_duration_from_env_names_the_variable() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("WORKER__DATABASE__STATEMENT_TIMEOUT".into(), "5 parsecs".into());
        let err = load(&inputs).expect_err("bad duration");
        assert_eq!(err.key(), Some("database.statement_timeout"), "{err}");
        assert!(err.to_string().contains("WORKER__DATABASE__STATEMENT_TIMEOUT"), "{err}");
    }

    #[test]
    fn an_out_of_range_value_names_key_line_and_range() {
        let file = write("[database]\n# comment\npool_size = 0\n");
        let err = load(&inputs(&file)).expect_err("out of range");
        assert_eq!(err.key(), Some("database.pool_size"), "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("{}:3", file.path().display())), "{text}");
        assert!(text.contains("1..=1000"), "{text}");
    }

    #[test]
    fn outbox_metrics_queues_defaults_to_20_and_out_of_range_names_the_key() {
        let file = write("[database]\npool_size = 4\n");
        assert_eq!(load(&inputs(&file)).expect("defaults").config.outbox.metrics_queues, 20);
        for bad in ["0", "1001"] {
            let file = write(&format!("[outbox]\nmetrics_queues = {bad}\n"));
            let err = load(&inputs(&file)).expect_err("out of range");
            assert_eq!(err.key(), Some("outbox.metrics_queues"), "{err}");
            assert!(err.to_string().contains("1..=1000"), "{err}");
        }
        let file = write("[outbox]\nmetrics_queues = 1000\n");
        assert_eq!(load(&inputs(&file)).expect("in range").config.outbox.metrics_queues, 1000);
    }

    #[test]
    fn an_unreadable_redis_ca_file_names_the_key_and_the_path() {
        let file = write("[redis]\nurl = \"rediss://127.0.0.1:6380\"\nca_file = \"/nonexistent/ca.pem\"\n");
        let err = load(&inputs(&file)).expect_err("unreadable CA file");
        assert_eq!(err.key(), Some("redis.ca_file"), "{err}");
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn precedence_is_defaults_file_env_flags() {
        let file =
            write("[database]\npool_size = 4\nstatement_timeout = \"7s\"\n[redis]\nprefix = \"file\"\n");
        let mut inputs = inputs(&file).flag("redis.prefix", "flag", "--set redis.prefix");
        inputs.env.insert("WORKER__DATABASE__POOL_SIZE".into(), "6".into());
        inputs.env.insert("WORKER__REDIS__PREFIX".into(), "env".into());
        inputs.env.insert("DATABASE_URL".into(), "postgres://u:pw@db:5432/app".into());
        let loaded = load(&inputs).expect("loads");
        let c = &loaded.config;
        assert_eq!(c.database.pool_size, 6);
        assert_eq!(c.database.statement_timeout, Duration::from_secs(7));
        assert_eq!(c.redis.prefix, "flag");
        assert_eq!(c.database.url, "postgres://u:pw@db:5432/app");
        assert_eq!(loaded.sources["database.pool_size"], Source::Env("WORKER__DATABASE__POOL_SIZE".into()));
        assert_eq!(loaded.sources["database.url"], Source::Env("DATABASE_URL".into()));
        assert!(matches!(loaded.sources["database.statement_timeout"], Source::File { line: 3, .. }));
        assert_eq!(loaded.sources["redis.prefix"], Source::Flag("--set redis.prefix".into()));
        assert_eq!(loaded.sources["outbox.batch_size"], Source::Default);
    }

    #[test]
    fn worker_prefixed_env_beats_the_conventional_alias() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("DATABASE_URL".into(), "postgres://alias/db".into());
        inputs.env.insert("WORKER__DATABASE__URL".into(), "postgres://specific/db".into());
        let loaded = load(&inputs).expect("loads");
        assert_eq!(loaded.config.database.url, "postgres://specific/db");
    }

    #[test]
    fn print_redacts_passwords_and_shows_sources() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("DATABASE_URL".into(), "postgres://u:hunter2@db/app".into());
        let loaded = load(&inputs).expect("loads");
        let text = loaded.config.render(&loaded.sources);
        assert!(!text.contains("hunter2"), "{text}");
        assert!(text.contains("postgres://u:***@db/app"), "{text}");
        assert!(text.contains("# env DATABASE_URL"), "{text}");
        assert!(text.contains("pool_size = 10  # built-in default"), "{text}");
    }

    #[test]
    fn database_urls_the_driver_rejects_fail_at_load_time() {
        for (url, needle) in [
            ("postgres://u:pw@db/app?sslmode=verify-full", "sslmode=verify-full needs sslrootcert"),
            ("postgres://u:pw@db/app?sslmode=allow", "sslmode=allow is not supported"),
            ("postgres://u:pw@db/app?sslmode=require&sslrootcert=system", "sslrootcert=system"),
            ("postgres://u:pw@db/app?sslkey=/k.pem", "sslkey is set without sslcert"),
            ("postgres://u:pw@db/app?gssencmode=require", "gssencmode"),
        ] {
            let mut inputs = ConfigInputs::default();
            inputs.env.insert("WORKER__DATABASE__MIGRATE_URL".into(), url.into());
            let err = load(&inputs).expect_err(url);
            assert_eq!(err.key(), Some("database.migrate_url"), "{err}");
            let text = err.to_string();
            assert!(text.contains(needle) && !text.contains(":pw@"), "{text}");
        }
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("DATABASE_URL".into(), "postgres://u@db:6432/app?sslmode=disable".into());
        assert!(load(&inputs).is_ok());
        // Certificate files are read when connecting, not at load (they may be mounted later).
        for url in [
            "postgres://u:pw@db/app?sslmode=require",
            "postgres://u:pw@db/app?sslmode=verify-ca&sslrootcert=/x.pem",
            "postgres://u:pw@db/app?sslmode=verify-full&sslrootcert=system",
            "postgres://u:pw@db/app?sslrootcert=/x.pem&sslcert=/c.pem&sslkey=/k.pem",
        ] {
            let mut inputs = ConfigInputs::default();
            inputs.env.insert("WORKER__DATABASE__MIGRATE_URL".into(), url.into());
            assert!(load(&inputs).is_ok(), "{url}");
        }
    }

    #[test]
    fn redaction_never_echoes_a_password() {
        assert_eq!(redact_url("postgres://u:pw@db/app"), "postgres://u:***@db/app");
        assert_eq!(redact_url("redis://127.0.0.1:6379"), "redis://127.0.0.1:6379");
        assert_eq!(redact_url("redis://user:secret@[::1"), "redis://***@[::1");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn an_invalid_url_error_does_not_echo_its_password() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("DATABASE_URL".into(), "mysql://u:hunter2@db/app".into());
        let err = load(&inputs).expect_err("wrong scheme");
        assert!(!err.to_string().contains("hunter2"), "{err}");
        inputs.env.insert("DATABASE_URL".into(), "postgres://u:hunter2@[::1".into());
        let err = load(&inputs).expect_err("unparseable");
        assert!(!err.to_string().contains("hunter2"), "{err}");
    }

    #[test]
    fn key_lines_resolve_nested_tables_dotted_keys_and_arrays_of_tables() {
        let text = "[app]\nenv = \"x\"\n\n[chats]\nenabled = true\n\n[chats.runner]\n# why\ncommand = [\"a\"]\n\
                    \n[[gitsync.providers]]\nid = \"github\"\n\n[[gitsync.providers]]\nid = \"ghe\"\n\
                    origin_host = \"git.example.com\"\n[outbox]\nlimits.batch = 3\n";
        let lines = KeyLines::parse(text);
        assert_eq!(lines.line_of("app.env"), Some(2));
        assert_eq!(lines.line_of("chats.runner.command"), Some(9));
        assert_eq!(lines.line_of("gitsync.providers.0.id"), Some(12));
        assert_eq!(lines.line_of("gitsync.providers.1.origin_host"), Some(16));
        assert_eq!(lines.line_of("outbox.limits.batch"), Some(18));
        assert_eq!(lines.line_of("chats.runner.unknown"), Some(7), "falls back to the table header");
        assert_eq!(lines.line_of("gitsync.providers.1.missing"), Some(14), "falls back to the element");
        assert_eq!(lines.line_of("nothing.here"), None);
    }

    #[test]
    fn render_writes_nested_tables_and_arrays_of_tables_with_sources() {
        let table: toml::Table =
            toml::from_str("[a]\nx = 1\n[a.inner]\ny = 2\n[[a.list]]\nid = \"p\"\n[[a.list]]\nid = \"q\"\n")
                .expect("toml");
        let path = PathBuf::from("f.toml");
        let sources = BTreeMap::from([
            ("a.inner.y".to_owned(), Source::File { path: path.clone(), line: 4 }),
            ("a.list.1.id".to_owned(), Source::File { path, line: 8 }),
        ]);
        let mut out = String::new();
        render_table(&mut out, "", &table, &sources, None);
        assert!(out.contains("[a.inner]\ny = 2  # f.toml:4\n"), "{out}");
        assert!(out.contains("[[a.list]]\nid = \"q\"  # f.toml:8\n"), "{out}");
        let back: toml::Table = toml::from_str(&out).expect("the rendering is TOML again");
        assert_eq!(back, table);
    }

    #[test]
    fn a_nested_key_shows_its_line_and_an_unknown_nested_key_is_named_with_file_and_line() {
        let file = write("[chats]\nenabled = true\n\n[chats.runner]\ncommand = [\"python3\", \"agent\"]\n");
        let loaded = load(&inputs(&file)).expect("loads");
        assert!(matches!(loaded.sources["chats.runner.command"], Source::File { line: 5, .. }));
        let printed = loaded.config.render(&loaded.sources);
        assert!(
            printed.contains(&format!(
                "[chats.runner]\ncommand = [\"python3\", \"agent\"]  # {}:5",
                file.path().display()
            )),
            "{printed}"
        );

        let file = write("[chats]\nenabled = false\n\n[chats.runner]\n# the agent\ncomand = [\"x\"]\n");
        let err = load(&inputs(&file)).expect_err("unknown nested key");
        assert_eq!(err.key(), Some("chats.runner.comand"), "{err}");
        let text = err.to_string();
        assert!(text.contains(&format!("{}:6", file.path().display())), "{text}");
        assert!(text.contains("command"), "lists the known keys: {text}");
    }

    #[test]
    fn chats_config_rejects_a_stale_after_not_above_the_heartbeat_interval() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("WORKER__CHATS__STALE_AFTER".into(), "30s".into());
        let err = load(&inputs).expect_err("stale_after <= heartbeat_interval");
        assert_eq!(err.key(), Some("chats.stale_after"), "{err}");
        assert!(err.to_string().contains("env WORKER__CHATS__STALE_AFTER"), "{err}");
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("WORKER__CHATS__ENABLED".into(), "true".into());
        let err = load(&inputs).expect_err("enabled without an agent");
        assert_eq!(err.key(), Some("chats.runner.command"), "{err}");
    }

    #[test]
    fn a_key_inside_an_array_of_tables_shows_its_line_and_a_bad_one_is_named() {
        let file = write(
            "[gitsync]\nconcurrency = 4\n\n[[gitsync.providers]]\nid = \"github\"\nkind = \"github\"\n\
             api_base_url = \"https://api.github.com\"\norigin_host = \"github.com\"\n\n\
             [[gitsync.providers]]\nid = \"ghe\"\nkind = \"github\"\n\
             api_base_url = \"https://ghe.example.com/api/v3\"\norigin_host = \"ghe.example.com\"\n",
        );
        let loaded = load(&inputs(&file)).expect("loads");
        assert!(matches!(loaded.sources["gitsync.providers.1.origin_host"], Source::File { line: 14, .. }));
        let printed = loaded.config.render(&loaded.sources);
        let expected = format!("origin_host = \"ghe.example.com\"  # {}:14", file.path().display());
        assert!(printed.contains(&expected), "{printed}");
        assert_eq!(printed.matches("[[gitsync.providers]]").count(), 2, "{printed}");

        let file = write("[[gitsync.providers]]\nid = \"x\"\nkind = \"github\"\nurl = \"https://x\"\n");
        let err = load(&inputs(&file)).expect_err("unknown key in an array of tables");
        let text = err.to_string();
        assert_eq!(err.key(), Some("gitsync.providers.0.url"), "{text}");
        assert!(text.contains(&format!("{}:4", file.path().display())), "{text}");
    }

    #[test]
    fn a_pool_of_one_is_refused_while_the_reconciler_needs_two_connections() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("WORKER__DATABASE__POOL_SIZE".into(), "1".into());
        let err = load(&inputs).expect_err("pool of one with prebuilds");
        assert_eq!(err.key(), Some("database.pool_size"), "{err}");
        inputs.env.insert("WORKER__PREBUILDS__ENABLED".into(), "false".into());
        assert!(load(&inputs).is_ok(), "fine without the reconciler");
    }

    #[test]
    fn a_reaped_workers_row_must_outlive_its_lease_and_runner_env_values_are_redacted() {
        let mut config = Config::default();
        config.chats.enabled = true;
        config.chats.runner.command = vec!["/bin/cat".into()];
        assert_eq!(config.validate(), Ok(Vec::new()));
        config.workers.retention = Duration::from_secs(120);
        let refused = config.validate().expect_err("retention under stale_after");
        assert_eq!(refused.key, "workers.retention");
        // A replica without the chat loops reaps the rows of those with them all the same.
        config.chats.enabled = false;
        let refused = config.validate().expect_err("retention under stale_after, chat loops off");
        assert_eq!(refused.key, "workers.retention");
        config.workers.base.enabled = false;
        assert_eq!(config.validate(), Ok(Vec::new()), "no workers loop: nothing reaped here");
        config.chats.enabled = true;
        config.workers.retention = Duration::from_secs(3600);
        config.chats.runner.env.insert("MODEL_API_KEY".into(), "sk-secret".into());
        let printed = config.render(&BTreeMap::new());
        assert!(printed.contains("MODEL_API_KEY") && !printed.contains("sk-secret"), "{printed}");
    }

    #[test]
    fn concurrency_is_derived_from_the_pool_size() {
        let mut config = Config::default();
        assert_eq!(Concurrency::from_config(&config), Concurrency { prebuilds: 5, gitsync: 5 });
        config.database.pool_size = 1;
        assert_eq!(Concurrency::from_config(&config), Concurrency { prebuilds: 1, gitsync: 1 });
        config.database.pool_size = 4;
        assert_eq!(Concurrency::from_config(&config), Concurrency { prebuilds: 2, gitsync: 2 });
        config.chats.enabled = true;
        assert_eq!(
            Concurrency::from_config(&config),
            Concurrency { prebuilds: 1, gitsync: 1 },
            "one connection of 4 is the lease's"
        );
        config.chats.enabled = false;
        config.database.pool_size = 40;
        config.prebuilds.concurrency = 3;
        assert_eq!(Concurrency::from_config(&config), Concurrency { prebuilds: 3, gitsync: 10 });
        config.prebuilds.concurrency = 50;
        assert_eq!(Concurrency::from_config(&config).prebuilds, 20, "capped at half the pool");
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

    fn from_env(value: &str) -> Result<Loaded, ConfigError> {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("WORKER__GITSYNC__TOKEN_KEYS".into(), value.into());
        load(&inputs)
    }

    fn exposed(loaded: &Loaded) -> Vec<String> {
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
                Source::Env("WORKER__GITSYNC__TOKEN_KEYS".into())
            );
        }
    }

    #[test]
    fn token_keys_in_a_file_are_a_toml_list() {
        let [a, b, _] = keys();
        let file = write(&format!("[gitsync]\ntoken_keys = [\"{a}\", \"{b}\"]\n"));
        let config = load(&inputs(&file)).expect("loads").config.gitsync;
        assert_eq!(config.token_keys().expect("valid").ids().len(), 2);

        let file = write(&format!("[gitsync]\ntoken_keys = [\n  \"{a}\",\n  \"{a}\",\n]\n"));
        let err = load(&inputs(&file)).expect_err("duplicate");
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
        let file = write(
            "[[gitsync.providers]]\nid = \"ghe\"\nkind = \"github\"\n\
             api_base_url = \"https://ghe.example.com/api/v3\"\norigin_host = \"ghe.example.com\"",
        );
        let config = load(&inputs(&file)).expect("loads").config.gitsync;
        let ids: Vec<_> = config.effective_providers().into_iter().map(|p| p.id).collect();
        assert_eq!(ids, ["ghe"]);
    }

    const VERIFIED: &str = "postgres://u:hunter2@db/app?sslmode=verify-full&sslrootcert=system";

    /// `APP_ENV=production` with verified database and Redis URLs, plus `extra`.
    fn production(extra: &[(&str, &str)]) -> Result<Loaded, ConfigError> {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("APP_ENV".into(), PRODUCTION.into());
        inputs.env.insert("DATABASE_URL".into(), VERIFIED.into());
        inputs.env.insert("REDIS_URL".into(), "rediss://default:hunter2@cache:6380".into());
        for (name, value) in extra {
            inputs.env.insert((*name).into(), (*value).into());
        }
        load(&inputs)
    }

    #[test]
    fn production_refuses_a_database_url_that_checks_no_certificate_naming_key_mode_and_fix() {
        assert_eq!(production(&[]).expect("verified").warnings, Vec::<String>::new());
        for (url, mode) in [
            ("postgres://u:hunter2@db/app?sslmode=require", "sslmode=require"),
            ("postgres://u:hunter2@db/app?sslmode=disable", "sslmode=disable"),
            ("postgres://u:hunter2@db/app?sslmode=prefer", "sslmode=prefer"),
            ("postgres://u:hunter2@db/app", "sslmode=prefer (libpq's default"),
        ] {
            let err = production(&[("DATABASE_URL", url)]).expect_err(url);
            assert_eq!(err.key(), Some("database.url"), "{err}");
            let text = err.to_string();
            for needle in [
                mode,
                "(from env DATABASE_URL)",
                "sslmode=verify-full",
                "sslrootcert=system",
                "allow_unverified_tls",
            ] {
                assert!(text.contains(needle), "{url}: `{needle}` missing: {text}");
            }
            assert!(!text.contains("hunter2"), "{text}");

            let allowed =
                production(&[("DATABASE_URL", url), ("WORKER__DATABASE__ALLOW_UNVERIFIED_TLS", "true")])
                    .unwrap_or_else(|e| panic!("{url}: {e}"));
            assert_eq!(allowed.warnings.len(), 1, "{:?}", allowed.warnings);
            assert!(
                allowed.warnings[0].starts_with(&format!("database.url: {mode}")),
                "{:?}",
                allowed.warnings
            );
            assert!(!allowed.warnings[0].contains("hunter2"));

            // Development (APP_ENV unset or `development`) keeps today's defaults.
            for env in [&[("DATABASE_URL", url), ("APP_ENV", "development")][..], &[("DATABASE_URL", url)]] {
                let mut inputs = ConfigInputs::default();
                inputs.env.extend(env.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
                let loaded = load(&inputs).unwrap_or_else(|e| panic!("{url}: {e}"));
                assert!(loaded.warnings.is_empty(), "{:?}", loaded.warnings);
            }
        }
        let err = production(&[("WORKER__DATABASE__MIGRATE_URL", "postgres://db/app?sslmode=require")])
            .expect_err("migrate_url");
        assert_eq!(err.key(), Some("database.migrate_url"), "{err}");
        let err =
            production(&[("WORKER__DATABASE__LISTEN_URL", "postgres://db/app")]).expect_err("listen_url");
        assert_eq!(err.key(), Some("database.listen_url"), "{err}");
        // `app.env` from a file line is named like any other key's source.
        let file =
            write("[app]\nenv = \"production\"\n\n[database]\nurl = \"postgres://db/app?sslmode=require\"\n");
        let err = load(&inputs(&file)).expect_err("file");
        assert!(err.to_string().contains(&format!("{}:5", file.path().display())), "{err}");
    }

    #[test]
    fn production_refuses_plaintext_redis_while_a_loop_uses_it() {
        let err = production(&[("REDIS_URL", "redis://:hunter2@cache:6379")]).expect_err("plaintext");
        assert_eq!(err.key(), Some("redis.url"), "{err}");
        let text = err.to_string();
        assert!(
            text.contains("rediss://") && text.contains("redis.allow_plaintext") && !text.contains("hunter2"),
            "{text}"
        );
        let allowed =
            production(&[("REDIS_URL", "redis://cache:6379"), ("WORKER__REDIS__ALLOW_PLAINTEXT", "true")])
                .expect("allowed");
        assert_eq!(allowed.warnings.len(), 1, "{:?}", allowed.warnings);
        assert!(
            allowed.warnings[0].starts_with("redis.url: redis:// is plaintext"),
            "{:?}",
            allowed.warnings
        );
        let unused = production(&[
            ("REDIS_URL", "redis://cache:6379"),
            ("WORKER__OUTBOX__ENABLED", "false"),
            ("WORKER__COUNTERS__ENABLED", "false"),
        ]);
        assert_eq!(unused.expect("no loop uses Redis").warnings, Vec::<String>::new());
    }

    #[test]
    fn production_refuses_a_provider_that_is_not_https_unless_it_allows_insecure_http() {
        let provider = |allow: bool| {
            format!(
                "[[gitsync.providers]]\nid = \"fake\"\nkind = \"github\"\n\
                 api_base_url = \"http://127.0.0.1:9\"\n\
                 origin_host = \"github.com\"\nallow_insecure_http = {allow}\n"
            )
        };
        let with_file = |text: &str, extra: &[(&str, &str)]| {
            let file = write(text);
            let mut inputs = inputs(&file);
            inputs.env.insert("APP_ENV".into(), PRODUCTION.into());
            inputs.env.insert("DATABASE_URL".into(), VERIFIED.into());
            inputs.env.insert("REDIS_URL".into(), "rediss://cache:6380".into());
            inputs.env.extend(extra.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())));
            (load(&inputs), file)
        };
        let (refused, file) = with_file(&provider(false), &[]);
        let err = refused.expect_err("http provider");
        assert_eq!(err.key(), Some("gitsync.providers.0.api_base_url"), "{err}");
        assert!(err.to_string().contains(&format!("{}:4", file.path().display())), "{err}");
        assert!(err.to_string().contains("allow_insecure_http = true"), "{err}");
        let (allowed, _) = with_file(&provider(true), &[]);
        let warnings = allowed.expect("allowed").warnings;
        assert_eq!(warnings.len(), 1, "{warnings:?}");
        assert!(warnings[0].contains("gitsync.providers.0.allow_insecure_http = true"), "{warnings:?}");
        let (disabled, _) = with_file(&provider(false), &[("WORKER__GITSYNC__ENABLED", "false")]);
        assert!(disabled.is_ok(), "gitsync off: its providers are not used");
    }

    #[test]
    fn print_and_errors_redact_a_password_in_a_query_string_or_a_key_value_string() {
        let mut inputs = ConfigInputs::default();
        inputs.env.insert("DATABASE_URL".into(), "postgres://h/db?user=u&password=hunter2".into());
        inputs.env.insert("WORKER__DATABASE__LISTEN_URL".into(), "postgres://u:hunter2@h/db".into());
        let loaded = load(&inputs).expect("loads");
        let printed = loaded.config.render(&loaded.sources);
        assert!(printed.contains("postgres://h/db?user=u&password=***"), "{printed}");
        assert!(!printed.contains("hunter2"), "{printed}");
        // A key=value string is refused (the config wants a URL), without echoing the password.
        inputs.env.insert("DATABASE_URL".into(), "host=h user=u password=hunter2".into());
        let err = load(&inputs).expect_err("not a URL").to_string();
        assert!(err.contains("password=***") && !err.contains("hunter2"), "{err}");
        let mut config = Config::default();
        config.database.migrate_url = Some("host=h password='hunter2 x'".into());
        let printed = config.render(&BTreeMap::new());
        assert!(printed.contains("host=h password=***") && !printed.contains("hunter2"), "{printed}");
    }
}
