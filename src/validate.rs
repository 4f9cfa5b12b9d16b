//! What every config section's `validate` is built from: a [`Violation`] that names its key, and
//! the small checks that produce one. A leaf: it imports nothing of the crate, so each component
//! can validate its own section without importing the whole [`crate::config`] (which composes
//! them all).

use std::fmt;
use std::path::Path;
use std::time::Duration;

/// Prefix of the `WORKER__SECTION__KEY` environment variables the config is read from (the agent
/// boundary refuses to pass them on, so it needs the spelling without the whole config).
pub const ENV_PREFIX: &str = "WORKER__";

/// A value a loop's (or section's) `validate` refused; `key` is relative to the table that
/// validated it until [`Violation::under`] puts the table in front.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Violation {
    pub key: String,
    pub problem: String,
    pub expected: String,
}

impl Violation {
    pub fn new(key: &str, problem: impl Into<String>, expected: impl Into<String>) -> Self {
        Self { key: key.to_owned(), problem: problem.into(), expected: expected.into() }
    }

    /// The same violation with `table.` in front of its key.
    #[must_use]
    pub fn under(mut self, table: &str) -> Self {
        self.key = format!("{table}.{}", self.key);
        self
    }
}

/// `Err` naming `key`, the value and what was expected, unless `ok`.
pub fn check(ok: bool, key: &str, actual: impl fmt::Display, expected: &str) -> Result<(), Violation> {
    if ok { Ok(()) } else { Err(Violation::new(key, format!("out of range: {actual}"), expected)) }
}

/// A duration that must not be zero.
pub fn positive(key: &str, value: Duration) -> Result<(), Violation> {
    check(!value.is_zero(), key, humantime::format_duration(value), "a duration > 0")
}

/// A file that must be readable now (a CA bundle, …), so a bad path fails `config check`.
pub fn readable_file(key: &str, path: &Path) -> Result<(), Violation> {
    std::fs::File::open(path)
        .map(drop)
        .map_err(|e| Violation::new(key, format!("cannot read {}: {e}", path.display()), "a readable file"))
}

/// Whether `url` parses and has one of `schemes`.
pub fn url_scheme(url: &str, schemes: &[&str]) -> bool {
    url::Url::parse(url).is_ok_and(|u| schemes.contains(&u.scheme()))
}
