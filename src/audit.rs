//! The audit trail of operator actions (`operator_actions`, migration V10): every state-changing
//! CLI command writes exactly one row — when, who ([`Actor`]: `--actor NAME`, else
//! `$USER@hostname`), the command, its arguments, the rows it changed and its outcome — in the
//! same transaction as its effect, so an effect without its row, or a row without its effect,
//! cannot commit. Read it with `worker audit list [--since 1d] [--limit N] [--json]`.
//!
//! [`run`] is the one way a command writes: it begins a transaction, runs the command's effect
//! in it, inserts the `ok` row and commits. When the effect fails (or the row, or the commit),
//! the transaction is rolled back and a row with outcome `error` and the error's text is
//! inserted in a transaction of its own; the original error is returned. Input checks belong
//! inside the effect, or, when they must not hold a transaction open (reading stdin), before it
//! with their refusal recorded by [`failed`]; so a refused command is recorded too. Only what
//! clap refuses, and an invalid `--actor`, leave no row. A commit whose
//! answer is lost (the connection drops during COMMIT) may still have committed: its `ok` row is
//! then followed by an `error` row.
//!
//! Wiring a new command (as `prebuilds invalidate` is): build an [`Action`] from what the
//! operator typed and move the command's statements into the effect, on the transaction it gets:
//!
//! ```ignore
//! let action = Action::new("prebuilds invalidate", json!({ "preset": audit::typed(preset) }));
//! let n = audit::run(db, actor, action, async |tx| {
//!     let n = tx.exec(INVALIDATE, &[(&preset, Type::TEXT)]).await?;
//!     Ok((n, Some(n))) // (what the command returns, rows affected)
//! })
//! .await?;
//! ```
//!
//! The command's error type needs `From<DbError>` and `Display` (its text is what the row
//! records). Read-only commands (`list`, `stats`, `status`, `plan`, `tail`, `queue`, `config`)
//! write nothing.
//!
//! Arguments hold what the operator typed that chooses the effect (ids, names, flags; output
//! flags such as `--json` are left out), each string clipped to [`MAX_ARGUMENT_BYTES`] and
//! redacted like the error text ([`redact`]: URL passwords and `password=` values masked by
//! [`text::redact_url`]). Secrets are never arguments: `gitsync put-token` records the user, the
//! provider, `--expires-at` and whether a refresh token was given, never a token (they come from
//! stdin); chat messages are recorded by their size in bytes, not their text.
//!
//! `gitsync encrypt-tokens` works in batches, each its own transaction, so that a large table
//! never holds one long transaction: it writes one summary row, in its own transaction after
//! the last batch (with the count of rows left), carrying the total rows it re-encrypted and
//! its outcome (`error` when some rows could not be decrypted, or a batch failed: the batches
//! before stay committed, as the command is resumable). A crash between batches leaves the
//! batches done without a row.

use std::ffi::OsString;
use std::io::Write;
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde::Serialize;
use tokio_postgres::types::Type;

use crate::db::{self, Db, DbError, Exec, Transaction};
use crate::text::{self, one_line, terminal};

/// Longest string argument kept (longer ones are clipped on a character boundary).
pub const MAX_ARGUMENT_BYTES: usize = 256;
/// Longest error text kept.
pub const MAX_ERROR_BYTES: usize = 2048;
/// Longest `--actor`, in characters.
pub const MAX_ACTOR_CHARS: usize = 128;
/// Longest `audit list --limit`.
pub const MAX_LIST_LIMIT: i64 = 10_000;
/// The error column is shown on one line of at most this many characters.
const ERROR_CHARS: usize = 200;

const INSERT: &str = "INSERT INTO operator_actions (actor, command, arguments, rows_affected, outcome, error) \
     VALUES ($1, $2, $3, $4, $5, $6)";
const LIST: &str = "SELECT id, at, actor, command, arguments, rows_affected, outcome, error \
     FROM operator_actions WHERE at >= now() - make_interval(secs => $1) \
     ORDER BY at DESC, id DESC LIMIT $2";

/// Who ran a command: `--actor`, else `$USER@hostname`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Actor(String);

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ActorError {
    #[error("invalid --actor {0:?}: expected 1 to 128 characters, no control characters")]
    Invalid(String),
}

impl Actor {
    /// An `--actor` value: 1 to [`MAX_ACTOR_CHARS`] characters, not blank, no control
    /// characters.
    pub fn named(name: &str) -> Result<Self, ActorError> {
        let count = name.chars().count();
        if name.trim().is_empty() || count > MAX_ACTOR_CHARS || name.chars().any(char::is_control) {
            return Err(ActorError::Invalid(name.to_owned()));
        }
        Ok(Self(name.to_owned()))
    }

    /// The actor of this invocation: `flag` when given, else `user@host` (`uid <uid>@host` when
    /// `USER` is unset, empty or not UTF-8). `host` is `None` when the host name is unknown.
    pub fn resolve(
        flag: Option<&str>,
        user: Option<OsString>,
        uid: u32,
        host: Option<String>,
    ) -> Result<Self, ActorError> {
        if let Some(name) = flag {
            return Self::named(name);
        }
        let user = user.and_then(|u| u.into_string().ok()).filter(|u| !u.trim().is_empty());
        let user = user.unwrap_or_else(|| format!("uid {uid}"));
        let host = host.filter(|h| !h.is_empty()).unwrap_or_else(|| "unknown-host".to_owned());
        // Environment text: kept as it is (bounded), shown escaped.
        Ok(Self(text::clip(format!("{user}@{host}"), MAX_ARGUMENT_BYTES)))
    }

    /// [`Actor::resolve`] with this process's `USER`, uid and host name.
    pub fn of_process(flag: Option<&str>) -> Result<Self, ActorError> {
        let host = hostname::get().ok().map(|h| h.to_string_lossy().into_owned());
        Self::resolve(flag, std::env::var_os("USER"), nix::unistd::getuid().as_raw(), host)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// One command as recorded: its subcommand path and its (redacted) arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct Action {
    pub command: &'static str,
    pub arguments: serde_json::Value,
}

impl Action {
    pub fn new(command: &'static str, arguments: serde_json::Value) -> Self {
        Self { command, arguments }
    }
}

/// A string argument as recorded: [`redact`]ed and clipped to [`MAX_ARGUMENT_BYTES`].
pub fn typed(raw: &str) -> serde_json::Value {
    serde_json::Value::String(text::clip(redact(raw), MAX_ARGUMENT_BYTES))
}

/// Text with URL passwords and `password=` values masked ([`text::redact_url`]).
pub fn redact(raw: &str) -> String {
    text::redact_url(raw)
}

/// An error's text as recorded: redacted, clipped to [`MAX_ERROR_BYTES`].
pub fn error_text(error: &impl std::fmt::Display) -> String {
    text::clip(redact(&error.to_string()), MAX_ERROR_BYTES)
}

/// Inserts one row in `tx`: `error` `None` = outcome `ok`.
pub async fn record(
    tx: &impl Exec,
    actor: &Actor,
    action: &Action,
    rows_affected: Option<u64>,
    error: Option<&str>,
) -> Result<(), DbError> {
    let rows = rows_affected.map(|n| i64::try_from(n).unwrap_or(i64::MAX));
    let outcome = if error.is_some() { "error" } else { "ok" };
    tx.exec(
        INSERT,
        &[
            (&actor.as_str(), Type::TEXT),
            (&action.command, Type::TEXT),
            (&action.arguments, Type::JSONB),
            (&rows, Type::INT8),
            (&outcome, Type::TEXT),
            (&error, Type::TEXT),
        ],
    )
    .await?;
    Ok(())
}

/// Runs `effect` and its `ok` row in one transaction; on any failure, rolls it back, records an
/// `error` row in a transaction of its own and returns the original error. `effect` returns the
/// command's value and the rows it changed (`None`: nothing countable).
pub async fn run<T, E>(
    db: &Db,
    actor: &Actor,
    action: Action,
    effect: impl AsyncFnOnce(&Transaction<'_>) -> Result<(T, Option<u64>), E>,
) -> Result<T, E>
where
    E: From<DbError> + std::fmt::Display,
{
    let attempt = async {
        let mut conn = db.get().await?;
        let tx = db::begin(&mut conn, db.tx_limits()).await?;
        // An error drops `tx` uncommitted: rolled back before the connection is used again.
        let (value, rows) = effect(&tx).await?;
        record(&tx, actor, &action, rows, None).await?;
        db::commit(tx).await?;
        Ok(value)
    };
    match attempt.await {
        Ok(value) => Ok(value),
        Err(error) => Err(failed(db, actor, &action, error).await),
    }
}

/// Records `action` as failed with `error` (outcome `error`, in a transaction of its own) and
/// returns `error`: for a command refused before its transaction began. A row that cannot be
/// written is logged; the command's own error is what the caller reports.
pub async fn failed<E: std::fmt::Display>(db: &Db, actor: &Actor, action: &Action, error: E) -> E {
    let text = error_text(&error);
    let recorded =
        db::in_transaction(db, async |tx| record(tx, actor, action, None, Some(&text)).await).await;
    if let Err(audit) = recorded {
        tracing::error!(command = action.command, error = %audit, "cannot record the failed command in operator_actions");
    }
    error
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum AuditCommand {
    /// Operator actions, newest first.
    List {
        /// How far back (e.g. `1d`, `12h`, `30m`).
        #[arg(long, value_name = "DURATION", default_value = "1d", value_parser = humantime::parse_duration)]
        since: Duration,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid --limit {0}: expected 1..=10000")]
    InvalidLimit(i64),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// One `operator_actions` row.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Entry {
    pub id: i64,
    pub at: DateTime<Utc>,
    pub actor: String,
    pub command: String,
    pub arguments: serde_json::Value,
    pub rows_affected: Option<i64>,
    pub outcome: String,
    pub error: Option<String>,
}

/// Rows of the last `since`, newest first, at most `limit`.
pub async fn list(db: &Db, since: Duration, limit: i64) -> Result<Vec<Entry>, DbError> {
    let secs = since.as_secs_f64();
    let rows = db::in_transaction(db, async |tx| {
        tx.fetch_all(LIST, &[(&secs, Type::FLOAT8), (&limit, Type::INT8)]).await
    })
    .await?;
    Ok(rows
        .iter()
        .map(|r| Entry {
            id: r.get(0),
            at: r.get(1),
            actor: r.get(2),
            command: r.get(3),
            arguments: r.get(4),
            rows_affected: r.get(5),
            outcome: r.get(6),
            error: r.get(7),
        })
        .collect())
}

/// Runs one `worker audit` command, writing to `out`.
pub async fn cli(db: &Db, command: &AuditCommand, out: &mut impl Write) -> Result<(), CliError> {
    match command {
        AuditCommand::List { since, limit, json } => {
            if !(1..=MAX_LIST_LIMIT).contains(limit) {
                return Err(CliError::InvalidLimit(*limit));
            }
            let entries = list(db, *since, *limit).await?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &entries)?;
                writeln!(out)?;
            } else {
                write_table(out, &entries)?;
            }
        }
    }
    Ok(())
}

/// The table: every text column escaped for the terminal (actors, arguments and errors hold
/// outside input).
fn write_table(out: &mut impl Write, entries: &[Entry]) -> std::io::Result<()> {
    writeln!(
        out,
        "{:<20} {:<24} {:<22} {:>6} {:<7} {:<40} ERROR",
        "AT", "ACTOR", "COMMAND", "ROWS", "OUTCOME", "ARGUMENTS"
    )?;
    for e in entries {
        let rows = e.rows_affected.map_or_else(|| "-".to_owned(), |n| n.to_string());
        writeln!(
            out,
            "{:<20} {:<24} {:<22} {:>6} {:<7} {:<40} {}",
            e.at.format("%Y-%m-%d %H:%M:%S"),
            terminal(&e.actor),
            terminal(&e.command),
            rows,
            terminal(&e.outcome),
            terminal(&e.arguments.to_string()),
            terminal(&one_line(e.error.as_deref().unwrap_or(""), ERROR_CHARS)),
        )?;
    }
    if entries.is_empty() {
        writeln!(out, "(no operator actions)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_actor_is_the_flag_else_user_at_host_else_the_uid() {
        let user = || Some(OsString::from("ada"));
        let host = || Some("box".to_owned());
        assert_eq!(Actor::resolve(Some("oncall"), user(), 7, host()).map(|a| a.0), Ok("oncall".into()));
        assert_eq!(Actor::resolve(None, user(), 7, host()).map(|a| a.0), Ok("ada@box".into()));
        assert_eq!(Actor::resolve(None, None, 7, host()).map(|a| a.0), Ok("uid 7@box".into()));
        assert_eq!(
            Actor::resolve(None, Some("".into()), 0, None).map(|a| a.0),
            Ok("uid 0@unknown-host".into())
        );
    }

    #[test]
    fn an_actor_flag_that_is_blank_too_long_or_holds_control_characters_is_refused_by_value() {
        for bad in ["", "  ", "a\u{1b}[2J", "a\nb", &"x".repeat(MAX_ACTOR_CHARS + 1)] {
            let error = Actor::named(bad).expect_err(bad);
            assert!(error.to_string().contains(&format!("{bad:?}")), "{error}");
        }
        assert!(Actor::named(&"é".repeat(MAX_ACTOR_CHARS)).is_ok());
    }

    #[test]
    fn arguments_and_errors_lose_passwords_and_are_bounded() {
        assert_eq!(typed("postgres://u:hunter2@h/db"), serde_json::json!("postgres://u:***@h/db"));
        assert_eq!(typed("host=h password=hunter2"), serde_json::json!("host=h password=***"));
        assert_eq!(typed(&"a".repeat(1000)).as_str().map(str::len), Some(MAX_ARGUMENT_BYTES));
        let error = error_text(&"invalid database url: postgres://u:hunter2@h/db");
        assert!(!error.contains("hunter2"), "{error}");
        assert!(error_text(&"é".repeat(MAX_ERROR_BYTES)).len() <= MAX_ERROR_BYTES);
    }

    #[test]
    fn the_table_escapes_what_came_from_outside() {
        let entry = Entry {
            id: 1,
            at: Utc::now(),
            actor: "ev\u{1b}[2Jil".into(),
            command: "chat send".into(),
            arguments: serde_json::json!({ "chat": "x\u{9b}31m" }),
            rows_affected: None,
            outcome: "error".into(),
            error: Some("boom\rforged\nsecond line".into()),
        };
        let mut out = Vec::new();
        write_table(&mut out, &[entry]).expect("table");
        let out = String::from_utf8(out).expect("utf-8");
        assert!(!out.contains(['\u{1b}', '\u{9b}', '\r']), "{out:?}");
        assert!(out.contains("ev\\x1b[2Jil") && out.contains("boom\\rforged"), "{out}");
        assert!(!out.contains("second line"), "one line per row: {out}");
        assert_eq!(out.lines().count(), 2, "{out}");
    }
}
