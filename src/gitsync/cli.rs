//! `worker gitsync …`: the refresh backlog, marking one chat due now, and tokens at rest
//! (`put-token` stores one encrypted, `encrypt-tokens` encrypts and re-encrypts the table in
//! batches). A readable table by default, JSON with `--json`.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::time::Duration;

use chrono::{DateTime, Utc};
use clap::Subcommand;
use serde::Serialize;
use serde_json::json;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::config::GitsyncConfig;
use super::tokens::{self, Column, KeyConfigError, TokenError, TokenKeys};
use crate::audit::{self, Action, Actor};
use crate::db::{self, Db, DbError, Exec};
use crate::text::terminal;

/// A row is due when the refresher would lease it (same conditions as its lease).
const STATS: &str = "SELECT \
       count(*) FILTER (WHERE due), \
       count(*) FILTER (WHERE d.leased_at IS NOT NULL AND d.stale_at > now()), \
       coalesce(extract(epoch FROM now() - min(d.stale_at) FILTER (WHERE due)), 0)::float8, \
       count(*) \
     FROM chat_diff_statuses AS d JOIN chats AS c ON c.id = d.chat_id, \
     LATERAL (SELECT d.stale_at <= now() AND d.git_remote_origin <> '' AND d.git_branch <> '' \
              AND NOT c.archived AS due) AS f";

const BY_OUTCOME: &str =
    "SELECT coalesce(last_outcome, 'never'), count(*) FROM chat_diff_statuses GROUP BY 1 ORDER BY 1";

/// Due now, as `mark_diff_stale` would (origin and branch kept); any lease is dropped, and an
/// answer in flight for the old lease is discarded by the refresher's fence.
const REFRESH: &str = "UPDATE chat_diff_statuses \
     SET stale_at = now(), leased_at = NULL, updated_at = now() WHERE chat_id = $1";

/// `$1` user, `$2` provider, `$3`/`$4` access token and its key id, `$5`/`$6` refresh token and
/// its key id, `$7` expires_at. Replaces the row's tokens and expiry; true when inserted.
const PUT_TOKEN: &str = "INSERT INTO external_auth_links \
       (user_id, provider_id, access_token, access_token_key_id, refresh_token, refresh_token_key_id, expires_at) \
     VALUES ($1, $2, $3, $4, $5, $6, $7) \
     ON CONFLICT (user_id, provider_id) DO UPDATE SET \
       access_token = EXCLUDED.access_token, access_token_key_id = EXCLUDED.access_token_key_id, \
       refresh_token = EXCLUDED.refresh_token, refresh_token_key_id = EXCLUDED.refresh_token_key_id, \
       expires_at = EXCLUDED.expires_at, updated_at = now() \
     RETURNING xmax = 0";

/// A token not under key `$1`: plaintext (NULL key id) or under another key.
const NOT_UNDER_KEY: &str = "(access_token_key_id IS DISTINCT FROM $1 \
       OR (refresh_token IS NOT NULL AND refresh_token_key_id IS DISTINCT FROM $1))";

/// `$1` the first key's id, `$2`/`$3` the last row of the previous batch, `$4` batch size. Keyset
/// order on the primary key, so rows that fail stay behind the cursor and a run ends; rows a
/// concurrent writer (or another copy of the command) holds are skipped, not waited for.
fn to_encrypt() -> String {
    format!(
        "SELECT user_id, provider_id, access_token, access_token_key_id, refresh_token, refresh_token_key_id \
         FROM external_auth_links WHERE (user_id, provider_id) > ($2, $3) AND {NOT_UNDER_KEY} \
         ORDER BY user_id, provider_id LIMIT $4 FOR UPDATE SKIP LOCKED"
    )
}

/// `$1..$4` per row: user, provider, access token, refresh token (NULL: none); `$5` key id.
/// `updated_at` is left alone: the tokens are the same, only their encryption changed.
const REWRITE: &str = "UPDATE external_auth_links AS e SET \
       access_token = u.access_token, access_token_key_id = $5, \
       refresh_token = u.refresh_token, \
       refresh_token_key_id = CASE WHEN u.refresh_token IS NULL THEN NULL ELSE $5 END \
     FROM unnest($1::uuid[], $2::text[], $3::text[], $4::text[]) AS u(user_id, provider_id, access_token, refresh_token) \
     WHERE e.user_id = u.user_id AND e.provider_id = u.provider_id";

fn remaining() -> String {
    format!("SELECT count(*) FROM external_auth_links WHERE {NOT_UNDER_KEY}")
}

/// `encrypt-tokens --batch` default: one short transaction per this many rows.
pub const DEFAULT_ENCRYPT_BATCH: u32 = 500;
/// Longest stdin `put-token` reads.
const MAX_STDIN_BYTES: u64 = 64 * 1024;

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum GitsyncCommand {
    /// Rows due, leased, by last outcome, and how long the oldest due row has waited.
    Stats {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Mark a chat's diff status due now; the next gitsync tick on any replica refreshes it.
    Refresh {
        /// The chat's id.
        chat_id: Uuid,
    },
    /// Store USER's token for PROVIDER, read from stdin (one line), encrypted under the first key
    /// of gitsync.token_keys. Replaces the row's tokens and expiry.
    PutToken {
        /// The user's id (`external_auth_links.user_id`).
        user: Uuid,
        /// The provider's id (`[[gitsync.providers]].id`, `github` by default).
        provider: String,
        /// When the token expires (RFC 3339, e.g. 2030-01-01T00:00:00Z); default: never.
        #[arg(long)]
        expires_at: Option<DateTime<Utc>>,
        /// Stdin holds two lines: the access token, then the refresh token (else no refresh token).
        #[arg(long)]
        refresh_token_stdin: bool,
    },
    /// Encrypt plaintext tokens and re-encrypt tokens under any key but the first of
    /// gitsync.token_keys, in batches (resumable; safe beside gitsync and another copy).
    EncryptTokens {
        /// Rows per transaction.
        #[arg(long, default_value_t = DEFAULT_ENCRYPT_BATCH, value_parser = clap::value_parser!(u32).range(1..=10_000))]
        batch: u32,
    },
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("chat {0} has no diff status (mark_diff_stale was never called for it)")]
    NoDiffStatus(Uuid),
    #[error("cannot write output: {0}")]
    Io(#[from] std::io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
    #[error(
        "gitsync.token_keys is empty: `worker gitsync {0}` needs a key (README, \"GitHub tokens at rest\")"
    )]
    NoKeys(&'static str),
    #[error("invalid key: {0}")]
    Keys(#[from] KeyConfigError),
    #[error("cannot encrypt: {0}")]
    Token(#[from] TokenError),
    #[error("refused: {0}")]
    Input(String),
    #[error("no [[gitsync.providers]] entry has id {id:?} (configured: {configured})")]
    UnknownProvider { id: String, configured: String },
    #[error("{0} row(s) could not be encrypted (listed above; they keep what they had)")]
    Failed(u64),
}

/// `worker gitsync stats`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct GitsyncStats {
    pub rows: u64,
    /// Due now (the next tick leases them).
    pub due: u64,
    /// Leased by a tick in progress (or by one that died, until the lease expires).
    pub leased: u64,
    /// How long past its `stale_at` the oldest due row is; 0 when none is due.
    pub oldest_due_secs: f64,
    /// Rows by `last_outcome` (`never` = not refreshed since it was marked).
    pub by_outcome: BTreeMap<String, u64>,
}

pub async fn stats(db: &Db) -> Result<GitsyncStats, DbError> {
    let conn = db.get().await?;
    let row = conn.fetch_one(STATS, &[]).await?;
    let by_outcome =
        conn.fetch_all(BY_OUTCOME, &[]).await?.iter().map(|r| (r.get(0), count(r.get(1)))).collect();
    Ok(GitsyncStats {
        due: count(row.get(0)),
        leased: count(row.get(1)),
        oldest_due_secs: row.get::<_, f64>(2).max(0.0),
        rows: count(row.get(3)),
        by_outcome,
    })
}

/// `worker gitsync refresh <chat_id>`, in `tx`.
pub async fn mark_due(tx: &impl Exec, chat_id: Uuid) -> Result<(), CliError> {
    let updated = tx.exec(REFRESH, &[(&chat_id, Type::UUID)]).await?;
    if updated == 0 {
        return Err(CliError::NoDiffStatus(chat_id));
    }
    Ok(())
}

/// What `encrypt-tokens` did.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct EncryptReport {
    /// Rows that had a plaintext token, now encrypted under the first key.
    pub encrypted: u64,
    /// Rows that were under another key, now under the first key.
    pub re_encrypted: u64,
    /// Rows left as they were: `(user, provider, why)`.
    pub failed: Vec<(Uuid, String, String)>,
    /// Rows with a token not under the first key after the run (failed rows, rows written
    /// meanwhile, rows another copy holds).
    pub remaining: u64,
}

/// `worker gitsync put-token`, in `tx`: `true` when the row was inserted, `false` when
/// replaced.
pub async fn put_token(
    tx: &impl Exec,
    keys: &TokenKeys,
    user: Uuid,
    provider: &str,
    tokens: &(String, Option<String>),
    expires_at: Option<DateTime<Utc>>,
) -> Result<bool, CliError> {
    let (access, refresh) = tokens;
    let (access, key_id) = keys.encrypt(access, &tokens::aad(Column::AccessToken, user, provider))?;
    let refresh = match refresh {
        Some(refresh) => Some(keys.encrypt(refresh, &tokens::aad(Column::RefreshToken, user, provider))?),
        None => None,
    };
    let (refresh, refresh_key_id) = refresh.unzip();
    let provider = provider.to_owned();
    let inserted = tx
        .fetch_one(
            PUT_TOKEN,
            &[
                (&user, Type::UUID),
                (&provider, Type::TEXT),
                (&access, Type::TEXT),
                (&key_id, Type::TEXT),
                (&refresh, Type::TEXT),
                (&refresh_key_id, Type::TEXT),
                (&expires_at, Type::TIMESTAMPTZ),
            ],
        )
        .await?
        .get(0);
    Ok(inserted)
}

/// `put-token`'s stdin: the access token (and with `two`, the refresh token on the next line),
/// without the trailing newline. Empty tokens, extra lines, whitespace and control characters
/// inside a token (which no HTTP header can carry) are refused.
pub fn parse_token_input(input: &[u8], two: bool) -> Result<(String, Option<String>), CliError> {
    let text = std::str::from_utf8(input).map_err(|_| CliError::Input("stdin is not UTF-8".into()))?;
    let text = text.strip_suffix('\n').map(|t| t.strip_suffix('\r').unwrap_or(t)).unwrap_or(text);
    let check = |token: &str, what: &str| -> Result<String, CliError> {
        if token.is_empty() {
            return Err(CliError::Input(format!("the {what} on stdin is empty")));
        }
        if let Some(at) = token.chars().position(|c| c.is_whitespace() || c.is_control()) {
            return Err(CliError::Input(format!(
                "the {what} on stdin has whitespace or a control character (at character {at})"
            )));
        }
        Ok(token.to_owned())
    };
    if !two {
        return Ok((check(text, "token")?, None));
    }
    let (access, refresh) = text.split_once('\n').ok_or_else(|| {
        CliError::Input("--refresh-token-stdin: expected two lines (access token, refresh token)".into())
    })?;
    let access = access.strip_suffix('\r').unwrap_or(access);
    Ok((check(access, "access token")?, Some(check(refresh, "refresh token")?)))
}

/// One row as `encrypt-tokens` reads it.
struct Stored {
    user: Uuid,
    provider: String,
    access: (String, Option<String>),
    refresh: Option<(String, Option<String>)>,
}

/// A column under the first key: (sealed text, was plaintext). Already under it: kept as is.
fn reseal(
    keys: &TokenKeys,
    aad: &str,
    stored: &(String, Option<String>),
) -> Result<(String, bool), TokenError> {
    let (text, key_id) = stored;
    match key_id.as_deref() {
        Some(id) if Some(id) == keys.primary_id() => Ok((text.clone(), false)),
        Some(id) => Ok((keys.encrypt(&keys.decrypt(text, id, aad)?, aad)?.0, false)),
        None => Ok((keys.encrypt(text, aad)?.0, true)),
    }
}

/// Both columns of a row under the first key: (access, refresh, had plaintext), or why not.
fn reseal_row(keys: &TokenKeys, row: &Stored) -> Result<(String, Option<String>, bool), String> {
    let aad = |column| tokens::aad(column, row.user, &row.provider);
    let (access, plain_access) =
        reseal(keys, &aad(Column::AccessToken), &row.access).map_err(|e| format!("access_token: {e}"))?;
    let (refresh, plain_refresh) = match &row.refresh {
        Some(stored) => {
            let (sealed, plain) = reseal(keys, &aad(Column::RefreshToken), stored)
                .map_err(|e| format!("refresh_token: {e}"))?;
            (Some(sealed), plain)
        }
        None => (None, false),
    };
    Ok((access, refresh, plain_access || plain_refresh))
}

/// `worker gitsync encrypt-tokens`: every row with a token not under the first key, in batches
/// of `batch` rows, each its own transaction (`FOR UPDATE SKIP LOCKED`). A row that cannot be
/// decrypted is reported and skipped. Failed rows are written to `out` once their batch's
/// transaction has ended, never while it is open. The run is recorded as `actor`'s in one audit
/// row, written after the last batch with the count of rows left (see [`crate::audit`]): rows
/// re-encrypted in all, outcome `error` when a row failed or a batch did (the batches before
/// stay committed).
pub async fn encrypt_tokens(
    db: &Db,
    actor: &Actor,
    keys: &TokenKeys,
    batch: u32,
    out: &mut impl Write,
) -> Result<EncryptReport, CliError> {
    let action = Action::new("gitsync encrypt-tokens", json!({ "batch": batch }));
    let Some(key_id) = keys.primary_id().map(str::to_owned) else {
        return Err(audit::failed(db, actor, &action, CliError::NoKeys("encrypt-tokens")).await);
    };
    let mut report = EncryptReport::default();
    let batches = encrypt_batches(db, keys, &key_id, batch, out, &mut report).await;
    let failure = match &batches {
        Err(error) => Some(audit::error_text(error)),
        Ok(()) if !report.failed.is_empty() => {
            Some(audit::error_text(&CliError::Failed(report.failed.len() as u64)))
        }
        Ok(()) => None,
    };
    let changed = report.encrypted + report.re_encrypted;
    // Bounded like every other statement (a count over the whole table).
    let remaining = db::in_transaction(db, async |tx| {
        audit::record(tx, actor, &action, Some(changed), failure.as_deref()).await?;
        tx.fetch_one(&remaining(), &[(&key_id, Type::TEXT)]).await
    })
    .await;
    batches?;
    report.remaining = count(remaining?.get(0));
    Ok(report)
}

/// The batches of [`encrypt_tokens`], counting into `report`.
async fn encrypt_batches(
    db: &Db,
    keys: &TokenKeys,
    key_id: &str,
    batch: u32,
    out: &mut impl Write,
    report: &mut EncryptReport,
) -> Result<(), CliError> {
    let key_id = key_id.to_owned();
    let (mut after_user, mut after_provider) = (Uuid::nil(), String::new());
    let limit = i64::from(batch.max(1));
    let select = to_encrypt();
    loop {
        let mut conn = db.get().await?;
        let tx = db::begin(&mut conn, db.tx_limits()).await?;
        let rows: Vec<Stored> = tx
            .fetch_all(
                &select,
                &[
                    (&key_id, Type::TEXT),
                    (&after_user, Type::UUID),
                    (&after_provider, Type::TEXT),
                    (&limit, Type::INT8),
                ],
            )
            .await?
            .iter()
            .map(|r| Stored {
                user: r.get(0),
                provider: r.get(1),
                access: (r.get(2), r.get(3)),
                refresh: r.get::<_, Option<String>>(4).map(|text| (text, r.get(5))),
            })
            .collect();
        let (mut users, mut providers, mut access, mut refresh) =
            (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let failed_before = report.failed.len();
        let (mut encrypted, mut re_encrypted) = (0, 0);
        for row in &rows {
            match reseal_row(keys, row) {
                Ok((sealed_access, sealed_refresh, had_plaintext)) => {
                    users.push(row.user);
                    providers.push(row.provider.clone());
                    access.push(sealed_access);
                    refresh.push(sealed_refresh);
                    if had_plaintext {
                        encrypted += 1;
                    } else {
                        re_encrypted += 1;
                    }
                }
                Err(error) => report.failed.push((row.user, row.provider.clone(), error)),
            }
        }
        let written = async {
            if !users.is_empty() {
                tx.exec(
                    REWRITE,
                    &[
                        (&users, Type::UUID_ARRAY),
                        (&providers, Type::TEXT_ARRAY),
                        (&access, Type::TEXT_ARRAY),
                        (&refresh, Type::TEXT_ARRAY),
                        (&key_id, Type::TEXT),
                    ],
                )
                .await?;
            }
            db::commit(tx).await
        }
        .await;
        // Written once the batch has ended: an output that blocks or breaks (a pipe closed early)
        // never holds the batch's transaction open or rolls it back; and its failed rows are
        // reported whether or not the others committed.
        for (user, provider, error) in &report.failed[failed_before..] {
            writeln!(out, "failed: user {user}, provider {provider:?}: {}", terminal(error))?;
        }
        written?;
        report.encrypted += encrypted;
        report.re_encrypted += re_encrypted;
        match rows.last() {
            Some(last) if rows.len() as i64 == limit => {
                (after_user, after_provider) = (last.user, last.provider.clone())
            }
            _ => return Ok(()),
        }
    }
}

fn keys_for(config: &GitsyncConfig, command: &'static str) -> Result<TokenKeys, CliError> {
    let keys = config.token_keys()?;
    if keys.is_empty() {
        return Err(CliError::NoKeys(command));
    }
    Ok(keys)
}

/// `put-token`'s key ring and tokens: checked and read before its transaction begins (stdin
/// may be a terminal, and a transaction must not wait on it).
fn prepare_put_token(
    config: &GitsyncConfig,
    provider: &str,
    two: bool,
    input: &mut impl Read,
) -> Result<(TokenKeys, (String, Option<String>)), CliError> {
    let keys = keys_for(config, "put-token")?;
    let providers = config.effective_providers();
    if !providers.iter().any(|p| p.id == provider) {
        let configured = providers.iter().map(|p| p.id.as_str()).collect::<Vec<_>>().join(", ");
        return Err(CliError::UnknownProvider { id: provider.to_owned(), configured });
    }
    let mut stdin = Vec::new();
    input.take(MAX_STDIN_BYTES + 1).read_to_end(&mut stdin)?;
    if stdin.len() as u64 > MAX_STDIN_BYTES {
        return Err(CliError::Input(format!("stdin holds more than {MAX_STDIN_BYTES} bytes")));
    }
    Ok((keys, parse_token_input(&stdin, two)?))
}

/// Runs one `worker gitsync` command, reading `put-token`'s stdin from `input` and writing its
/// output to `out`. `refresh`, `put-token` and `encrypt-tokens` are recorded in the audit trail
/// as `actor`'s; `put-token` records the user, the provider, `--expires-at` and whether a
/// refresh token was given, never a token.
pub async fn run(
    db: &Db,
    actor: &Actor,
    config: &GitsyncConfig,
    command: &GitsyncCommand,
    input: &mut impl Read,
    out: &mut impl Write,
) -> Result<(), CliError> {
    match command {
        GitsyncCommand::Stats { json } => {
            let stats = stats(db).await?;
            if *json {
                serde_json::to_writer_pretty(&mut *out, &stats)?;
                writeln!(out)?;
                return Ok(());
            }
            writeln!(out, "{:<14} {:>10}", "rows", stats.rows)?;
            writeln!(out, "{:<14} {:>10}", "due", stats.due)?;
            writeln!(out, "{:<14} {:>10}", "leased", stats.leased)?;
            writeln!(out, "{:<14} {:>10}", "oldest due", age(stats.oldest_due_secs))?;
            writeln!(out)?;
            writeln!(out, "{:<14} {:>10}", "LAST OUTCOME", "ROWS")?;
            for (outcome, n) in &stats.by_outcome {
                writeln!(out, "{:<14} {n:>10}", terminal(outcome))?;
            }
        }
        GitsyncCommand::Refresh { chat_id } => {
            let action = Action::new("gitsync refresh", json!({ "chat_id": chat_id }));
            audit::run(db, actor, action, async |tx| {
                mark_due(tx, *chat_id).await?;
                Ok::<_, CliError>(((), Some(1)))
            })
            .await?;
            writeln!(out, "chat {chat_id} is due now; the next gitsync tick refreshes it")?;
        }
        GitsyncCommand::PutToken { user, provider, expires_at, refresh_token_stdin } => {
            let arguments = json!({
                "user": user,
                "provider": audit::typed(provider),
                "expires_at": expires_at,
                "refresh_token_stdin": refresh_token_stdin,
            });
            let action = Action::new("gitsync put-token", arguments);
            let (keys, tokens) = match prepare_put_token(config, provider, *refresh_token_stdin, input) {
                Ok(prepared) => prepared,
                Err(error) => return Err(audit::failed(db, actor, &action, error).await),
            };
            let inserted = audit::run(db, actor, action, async |tx| {
                let inserted = put_token(tx, &keys, *user, provider, &tokens, *expires_at).await?;
                Ok::<_, CliError>((inserted, Some(1)))
            })
            .await?;
            writeln!(
                out,
                "{} the token of user {user} for provider {provider:?}, encrypted under key {}",
                if inserted { "stored" } else { "replaced" },
                keys.primary_id().unwrap_or_default(),
            )?;
        }
        GitsyncCommand::EncryptTokens { batch } => {
            let keys = match keys_for(config, "encrypt-tokens") {
                Ok(keys) => keys,
                Err(error) => {
                    let action = Action::new("gitsync encrypt-tokens", json!({ "batch": batch }));
                    return Err(audit::failed(db, actor, &action, error).await);
                }
            };
            let report = encrypt_tokens(db, actor, &keys, *batch, out).await?;
            let key = keys.primary_id().unwrap_or_default();
            writeln!(out, "{:<14} {key:>10}", "key")?;
            writeln!(out, "{:<14} {:>10}", "encrypted", report.encrypted)?;
            writeln!(out, "{:<14} {:>10}", "re-encrypted", report.re_encrypted)?;
            writeln!(out, "{:<14} {:>10}", "failed", report.failed.len())?;
            writeln!(
                out,
                "{:<14} {:>10}   (rows with a token not under key {key})",
                "remaining", report.remaining
            )?;
            if !report.failed.is_empty() {
                return Err(CliError::Failed(report.failed.len() as u64));
            }
        }
    }
    Ok(())
}

fn age(secs: f64) -> String {
    if secs <= 0.0 {
        return "-".into();
    }
    humantime::format_duration(Duration::from_secs(secs.round() as u64)).to_string()
}

fn count(n: i64) -> u64 {
    u64::try_from(n).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parsed(input: &str, two: bool) -> Result<(String, Option<String>), String> {
        parse_token_input(input.as_bytes(), two).map_err(|e| e.to_string())
    }

    #[test]
    fn put_token_input_loses_only_its_trailing_newline() {
        for input in ["ghu_x\n", "ghu_x\r\n", "ghu_x"] {
            assert_eq!(parsed(input, false), Ok(("ghu_x".into(), None)), "{input:?}");
        }
        assert_eq!(parsed("ghu_x\r\nghr_y\n", true), Ok(("ghu_x".into(), Some("ghr_y".into()))));
    }

    #[test]
    fn put_token_input_refuses_empty_tokens_extra_lines_and_inner_whitespace() {
        for (input, two, needle) in [
            ("", false, "empty"),
            ("\n", false, "empty"),
            ("ghu x\n", false, "whitespace"),
            ("ghu_x\n\n", false, "control character"),
            ("ghu_x\n", true, "expected two lines"),
            ("ghu_x\n\n", true, "refresh token on stdin is empty"),
            ("ghu_x\nghr_y\nmore\n", true, "control character"),
        ] {
            let error = parsed(input, two).expect_err(input);
            assert!(error.contains(needle), "{input:?}: {error}");
        }
        assert!(parse_token_input(&[0xff, 0xfe], false).is_err(), "not UTF-8");
    }
}
