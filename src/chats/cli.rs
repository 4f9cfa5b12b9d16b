//! `worker chat …`: list chats, start one, post a user message, follow a chat's messages; and
//! the admission queue's commands (`quota set|list|rm`, `queue`), whose SQL and output are in
//! [`queue`](super::queue).
//!
//! Bad input (an unknown status, a malformed or unknown chat id, a quota value out of range, not
//! exactly one of `--owner`/`--org`) is an error naming the value, so the binary exits 1 with a
//! message rather than clap's usage exit. `tail` prints one line per message and flushes it, so
//! a pipe sees each message as it arrives; `tail --follow` ends cleanly (exit 0) when the
//! `shutdown` future passed in completes (SIGTERM/SIGINT in `main`).

use std::io::{self, Write};

use clap::{Args, Subcommand};
use serde::Serialize;
use serde_json::json;
use tokio::signal::unix::{SignalKind, signal};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::admission::Rules;
use super::config::ChatsConfig;
use super::queue::{self, ChatSummary, QuotaError, Subject, SubjectKind, summary};
use super::stream::{self, DEFAULT_SETTLE_EVERY, Follower, Message};
use crate::audit::{self, Action, Actor};
use crate::db::{self, Db, DbError, Exec};
use crate::health::Health;
use crate::listen::Listener;
use crate::text::terminal;

/// The chat statuses (the CHECK on `chats.status`).
pub const STATUSES: [&str; 6] = ["waiting", "pending", "running", "paused", "completed", "error"];
/// Longest `--limit` of `chat list`; a larger listing wants SQL, not a terminal.
pub const MAX_LIST_LIMIT: i64 = 10_000;
/// SQLSTATE `no_data_found`: `post_chat_message` raises it for an unknown chat.
const NO_DATA_FOUND: &str = "P0002";

const LIST: &str = "SELECT id, status, title, owner_id, worker_id, generation, updated_at, last_error, \
       org_id \
     FROM chats WHERE ($1::text IS NULL OR status = $1) \
     ORDER BY created_at DESC, id DESC LIMIT $2";
const CREATE: &str = "INSERT INTO chats (owner_id, org_id, title) VALUES ($1, $2, $3) RETURNING id";
const POST_USER_MESSAGE: &str = "SELECT post_chat_message($1, 'user', to_jsonb($2::text))";

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum ChatCommand {
    /// Chats, newest first; with `--status pending`, the queue: oldest wait first, with each
    /// chat's wait and what it waits for (owner_cap, org_cap or capacity).
    List {
        /// Only chats in this status (waiting, pending, running, paused, completed, error).
        #[arg(long)]
        status: Option<String>,
        #[arg(long, default_value_t = 100)]
        limit: i64,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Start a chat (`waiting`; `pending` at once when a first message is given). Prints its id.
    Create {
        /// The chat's owner (default: the nil UUID, "nobody in particular").
        #[arg(long)]
        owner: Option<String>,
        /// The org the chat is billed to (its running chats count against the org's cap).
        #[arg(long)]
        org: Option<String>,
        #[arg(long, default_value = "")]
        title: String,
        /// A first user message.
        text: Option<String>,
    },
    /// Post a user message (a JSON string) to a chat. Prints the message id.
    Send { chat: String, text: String },
    /// Print a chat's visible messages, each once; with --follow, keep printing new ones until
    /// interrupted.
    Tail {
        chat: String,
        /// Only messages with a larger id.
        #[arg(long, default_value_t = 0)]
        after: i64,
        #[arg(long)]
        follow: bool,
        /// One JSON object per line (id, role, content, created_at) instead of `#id role: text`.
        #[arg(long)]
        json: bool,
    },
    /// Caps and weights per owner or org (`chat_quotas`), read by the next claim on every replica.
    #[command(subcommand)]
    Quota(QuotaCommand),
    /// Pending and running chats per owner and per org with cap, weight and oldest wait (oldest
    /// first), and the totals.
    Queue {
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand, Debug, Clone, PartialEq)]
pub enum QuotaCommand {
    /// Create or change a subject's quota; prints the row. Omitted flags keep the current value
    /// (a new row: the worker's default cap, weight 1).
    Set {
        #[command(flatten)]
        subject: SubjectArgs,
        /// Running chats at most, over every replica (0 = no cap; at most 1000000).
        #[arg(long, allow_hyphen_values = true)]
        max_running: Option<String>,
        /// Share of free capacity (greater than 0, at most 1000; default 1).
        #[arg(long, allow_hyphen_values = true)]
        weight: Option<String>,
    },
    /// Every quota.
    List {
        #[arg(long)]
        json: bool,
    },
    /// Remove a subject's quota: back to the worker's default cap and weight 1.
    Rm {
        #[command(flatten)]
        subject: SubjectArgs,
    },
}

/// Exactly one of `--owner` or `--org`.
#[derive(Args, Debug, Clone, PartialEq)]
pub struct SubjectArgs {
    #[arg(long)]
    owner: Option<String>,
    #[arg(long)]
    org: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error("invalid chat id `{0}`: expected a UUID")]
    InvalidChatId(String),
    #[error("invalid --owner `{0}`: expected a UUID")]
    InvalidOwner(String),
    #[error("invalid --org `{0}`: expected a UUID")]
    InvalidOrg(String),
    #[error("unknown status `{0}`: expected one of waiting, pending, running, paused, completed, error")]
    InvalidStatus(String),
    #[error("invalid --limit {0}: expected 1..=10000")]
    InvalidLimit(i64),
    #[error("chat {0} does not exist")]
    NoSuchChat(Uuid),
    /// The database refused the request and said why (e.g. a RAISE in `post_chat_message`).
    #[error("{0}")]
    Refused(String),
    #[error("the LISTEN connection stopped")]
    ListenerStopped,
    #[error(transparent)]
    Quota(#[from] QuotaError),
    #[error(transparent)]
    Db(#[from] DbError),
    #[error("cannot write output: {0}")]
    Io(#[from] io::Error),
    #[error("cannot encode JSON: {0}")]
    Json(#[from] serde_json::Error),
}

/// Runs one `worker chat` command, writing to `out`. `config` gives the default caps the
/// queue's commands show; `listen` is the direct connection `tail --follow` LISTENs on;
/// `shutdown` ends a `tail --follow`. `create`, `send` and `quota set|rm` are recorded in the
/// audit trail as `actor`'s, with their input checks inside (a refused value is recorded too);
/// message texts by their size in bytes, not their text.
pub async fn run(
    db: &Db,
    actor: &Actor,
    config: &ChatsConfig,
    listen: db::Direct,
    command: &ChatCommand,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    match command {
        ChatCommand::List { status, limit, json } => {
            if let Some(status) = status
                && !STATUSES.contains(&status.as_str())
            {
                return Err(CliError::InvalidStatus(status.clone()));
            }
            if !(1..=MAX_LIST_LIMIT).contains(limit) {
                return Err(CliError::InvalidLimit(*limit));
            }
            let pending = status.as_deref() == Some("pending");
            let chats = if pending {
                queue::pending(db, Rules::of(config), *limit).await?
            } else {
                list(db, status.as_deref(), *limit).await?
            };
            if *json {
                write_json(out, &chats)?;
            } else if pending {
                queue::write_pending(out, &chats)?;
            } else {
                write_table(out, &chats)?;
            }
        }
        ChatCommand::Create { owner, org, title, text } => {
            let arguments = json!({
                "owner": owner.as_deref().map(audit::typed),
                "org": org.as_deref().map(audit::typed),
                "title": audit::typed(title),
                "text_bytes": text.as_ref().map(String::len),
            });
            let chat = audit::run(db, actor, Action::new("chat create", arguments), async |tx| {
                let owner = match owner {
                    Some(owner) => parse_owner(owner)?,
                    None => Uuid::nil(),
                };
                let org = org.as_deref().map(parse_org).transpose()?;
                let chat = create(tx, owner, org, title, text.as_deref()).await?;
                Ok::<_, CliError>((chat, Some(1 + u64::from(text.is_some()))))
            })
            .await?;
            writeln!(out, "{chat}")?;
        }
        ChatCommand::Quota(QuotaCommand::Set { subject, max_running, weight }) => {
            let mut arguments = subject_arguments(subject);
            arguments["max_running"] = json!(max_running.as_deref().map(audit::typed));
            arguments["weight"] = json!(weight.as_deref().map(audit::typed));
            let quota = audit::run(db, actor, Action::new("chat quota set", arguments), async |tx| {
                let subject = parse_subject(subject)?;
                let max_running = max_running.as_deref().map(queue::parse_max_running).transpose()?;
                let weight = weight.as_deref().map(queue::parse_weight).transpose()?;
                let quota = queue::set_quota(tx, subject, max_running, weight).await?;
                Ok::<_, CliError>((quota, Some(1)))
            })
            .await?;
            queue::write_quotas(out, &[quota])?;
        }
        ChatCommand::Quota(QuotaCommand::List { json }) => {
            let quotas = queue::quotas(db).await?;
            if *json {
                write_json(out, &quotas)?;
            } else {
                queue::write_quotas(out, &quotas)?;
            }
        }
        ChatCommand::Quota(QuotaCommand::Rm { subject: args }) => {
            let action = Action::new("chat quota rm", subject_arguments(args));
            let subject = audit::run(db, actor, action, async |tx| {
                let subject = parse_subject(args)?;
                if queue::remove_quota(tx, subject).await?.is_none() {
                    return Err(QuotaError::NoQuota(subject).into());
                }
                Ok::<_, CliError>((subject, Some(1)))
            })
            .await?;
            writeln!(out, "removed the quota of {subject}: the default cap and weight 1 apply")?;
        }
        ChatCommand::Queue { json } => {
            let queue = queue::queue(db, Rules::of(config)).await?;
            if *json {
                write_json(out, &queue)?;
            } else {
                queue::write_queue(out, &queue)?;
            }
        }
        ChatCommand::Send { chat, text } => {
            let arguments = json!({ "chat": audit::typed(chat), "text_bytes": text.len() });
            let id = audit::run(db, actor, Action::new("chat send", arguments), async |tx| {
                let id = send(tx, parse_chat(chat)?, text).await?;
                Ok::<_, CliError>((id, Some(1)))
            })
            .await?;
            writeln!(out, "{id}")?;
        }
        ChatCommand::Tail { chat, after, follow, json } => {
            let chat = parse_chat(chat)?;
            if !stream::chat_exists(&db.get().await?, chat).await? {
                return Err(CliError::NoSuchChat(chat));
            }
            let result = if *follow {
                follow_chat(db, listen, chat, *after, *json, out, shutdown).await
            } else {
                print_snapshot(db, chat, *after, *json, out).await
            };
            // A reader that went away (`| head`) is the end of the tail, not a failure.
            return match result {
                Err(CliError::Io(e)) if e.kind() == io::ErrorKind::BrokenPipe => Ok(()),
                other => other,
            };
        }
    }
    Ok(())
}

/// Completes on the first SIGTERM or SIGINT. The handlers are installed by this call, so a
/// signal that arrives before the future is polled still ends it.
pub fn interrupted() -> io::Result<impl Future<Output = ()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
}

fn parse_chat(chat: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(chat).map_err(|_| CliError::InvalidChatId(chat.to_owned()))
}

fn parse_owner(owner: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(owner).map_err(|_| CliError::InvalidOwner(owner.to_owned()))
}

fn parse_org(org: &str) -> Result<Uuid, CliError> {
    Uuid::parse_str(org).map_err(|_| CliError::InvalidOrg(org.to_owned()))
}

/// `--owner`/`--org` as typed, for the audit trail.
fn subject_arguments(args: &SubjectArgs) -> serde_json::Value {
    json!({ "owner": args.owner.as_deref().map(audit::typed), "org": args.org.as_deref().map(audit::typed) })
}

fn parse_subject(args: &SubjectArgs) -> Result<Subject, CliError> {
    match (&args.owner, &args.org) {
        (Some(owner), None) => Ok(Subject { kind: SubjectKind::Owner, id: parse_owner(owner)? }),
        (None, Some(org)) => Ok(Subject { kind: SubjectKind::Org, id: parse_org(org)? }),
        _ => Err(QuotaError::Subject.into()),
    }
}

fn write_json(out: &mut impl Write, value: &impl Serialize) -> Result<(), CliError> {
    serde_json::to_writer_pretty(&mut *out, value)?;
    writeln!(out)?;
    Ok(())
}

/// Chats newest first, optionally in one status.
pub async fn list(db: &Db, status: Option<&str>, limit: i64) -> Result<Vec<ChatSummary>, DbError> {
    let rows = db::in_transaction(db, async |tx| {
        tx.fetch_all(LIST, &[(&status, Type::TEXT), (&limit, Type::INT8)]).await
    })
    .await?;
    Ok(rows.iter().map(summary).collect())
}

/// Inserts a `waiting` chat (billed to `org`, if any) and, when `text` is given, its first user
/// message (which makes it `pending`), in `tx`.
pub async fn create(
    tx: &impl Exec,
    owner: Uuid,
    org: Option<Uuid>,
    title: &str,
    text: Option<&str>,
) -> Result<Uuid, DbError> {
    let chat: Uuid =
        tx.fetch_one(CREATE, &[(&owner, Type::UUID), (&org, Type::UUID), (&title, Type::TEXT)]).await?.get(0);
    if let Some(text) = text {
        tx.fetch_one(POST_USER_MESSAGE, &[(&chat, Type::UUID), (&text, Type::TEXT)]).await?;
    }
    Ok(chat)
}

/// Posts a user message in `tx`; its content is the JSON string `text`. Returns the message id.
pub async fn send(tx: &impl Exec, chat: Uuid, text: &str) -> Result<i64, CliError> {
    match tx.fetch_one(POST_USER_MESSAGE, &[(&chat, Type::UUID), (&text, Type::TEXT)]).await {
        Ok(row) => Ok(row.get(0)),
        Err(e) if e.code() == Some(NO_DATA_FOUND) => {
            Err(CliError::Refused(e.server_message().unwrap_or("chat does not exist").to_owned()))
        }
        Err(e) => Err(e.into()),
    }
}

async fn print_snapshot(
    db: &Db,
    chat: Uuid,
    mut after: i64,
    json: bool,
    out: &mut impl Write,
) -> Result<(), CliError> {
    let conn = db.get().await?;
    loop {
        let page = stream::visible_after(&conn, chat, after, stream::PAGE_SIZE).await?;
        print_messages(out, &page, json)?;
        match page.last() {
            Some(last) if page.len() as i64 == stream::PAGE_SIZE => after = last.id,
            _ => return Ok(()),
        }
    }
}

async fn follow_chat(
    db: &Db,
    listen: db::Direct,
    chat: Uuid,
    after: i64,
    json: bool,
    out: &mut impl Write,
    shutdown: impl Future<Output = ()>,
) -> Result<(), CliError> {
    let listener = Listener::default();
    let stop = CancellationToken::new();
    listener.start(listen, Health::default(), stop.clone());
    let _stop_listener = stop.drop_guard();
    tokio::pin!(shutdown);
    let started = tokio::select! {
        started = Follower::start(db.clone(), &listener, chat, after, DEFAULT_SETTLE_EVERY) => started?,
        _ = &mut shutdown => return Ok(()),
    };
    let (mut follower, snapshot) = started;
    print_messages(out, &snapshot, json)?;
    loop {
        tokio::select! {
            next = follower.next() => match next? {
                Some(messages) => print_messages(out, &messages, json)?,
                None => return Err(CliError::ListenerStopped),
            },
            _ = &mut shutdown => return Ok(()),
        }
    }
}

/// One line per message, flushed: `tail` output is read through pipes as it comes.
fn print_messages(out: &mut impl Write, messages: &[Message], json: bool) -> Result<(), CliError> {
    for message in messages {
        if json {
            serde_json::to_writer(&mut *out, message)?;
            writeln!(out)?;
        } else {
            // Written by the agent (a model): escaped, so it cannot drive the terminal.
            writeln!(out, "#{} {}: {}", message.id, terminal(&message.role), terminal(&message.text()))?;
        }
        out.flush()?;
    }
    Ok(())
}

fn write_table(out: &mut impl Write, chats: &[ChatSummary]) -> io::Result<()> {
    writeln!(
        out,
        "{:<36} {:<9} {:>4} {:<20} {:<36} {:<36} TITLE / LAST ERROR",
        "ID", "STATUS", "GEN", "UPDATED", "OWNER", "WORKER"
    )?;
    for c in chats {
        let worker = c.worker_id.map(|w| w.to_string()).unwrap_or_else(|| "-".into());
        let mut about = c.title.clone();
        if let Some(error) = &c.last_error {
            about = format!("{about} / {error}");
        }
        // Titles and errors come from users and agents: escaped for the terminal.
        let about = terminal(&about);
        writeln!(
            out,
            "{:<36} {:<9} {:>4} {:<20} {:<36} {:<36} {}",
            c.id,
            c.status,
            c.generation,
            c.updated_at.format("%Y-%m-%d %H:%M:%S"),
            c.owner_id,
            worker,
            about
        )?;
    }
    if chats.is_empty() {
        writeln!(out, "(no chats)")?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use chrono::Utc;

    use super::*;

    #[test]
    fn a_malformed_chat_id_is_an_error_naming_it() {
        let error = parse_chat("not-a-uuid").expect_err("rejected");
        assert_eq!(error.to_string(), "invalid chat id `not-a-uuid`: expected a UUID");
    }

    fn message(text: &str) -> Message {
        Message { id: 7, role: "assistant".into(), content: serde_json::json!(text), created_at: Utc::now() }
    }

    #[test]
    fn tail_text_escapes_control_characters_and_tail_json_keeps_the_exact_text() {
        let raw = "hi\u{1b}[2J\u{1b}]0;owned\u{7}\rforged\n#8 user: fake";
        let mut text = Vec::new();
        print_messages(&mut text, &[message(raw)], false).expect("text");
        let text = String::from_utf8(text).expect("utf-8");
        assert_eq!(text, "#7 assistant: hi\\x1b[2J\\x1b]0;owned\\x07\\rforged\\n#8 user: fake\n");
        assert!(!text.contains('\u{1b}') && text.lines().count() == 1, "{text:?}");

        let mut json = Vec::new();
        print_messages(&mut json, &[message(raw)], true).expect("json");
        let back: serde_json::Value = serde_json::from_slice(&json).expect("one JSON object");
        assert_eq!(back["content"], raw, "--json holds the exact text");
    }

    #[test]
    fn chat_list_text_escapes_titles_and_errors() {
        let chat = ChatSummary {
            id: Uuid::nil(),
            status: "error".into(),
            title: "t\u{1b}[2J".into(),
            owner_id: Uuid::nil(),
            worker_id: None,
            generation: 1,
            updated_at: Utc::now(),
            last_error: Some("boom\u{9b}31m".into()),
            org_id: None,
            pending_since: None,
            wait_seconds: None,
            waits_for: None,
        };
        let mut out = Vec::new();
        write_table(&mut out, &[chat]).expect("table");
        let out = String::from_utf8(out).expect("utf-8");
        assert!(out.contains("t\\x1b[2J / boom\\u{9b}31m"), "{out}");
        assert!(!out.contains(['\u{1b}', '\u{9b}']), "{out:?}");
    }
}
