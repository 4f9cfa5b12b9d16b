//! One chat turn: the agent subprocess and every database write it causes, each fenced on
//! `worker_id = me AND generation = g AND status = 'running'`.
//!
//! A runner is a long-lived task in the runtime's supervisor ([`Runners`], keyed by chat id,
//! carrying the generation it runs), started by the acquire loop, read and interrupted by the
//! heartbeat (its stop signal carries the [`InterruptCause`]), stopped at shutdown. It ends in
//! exactly one of these ways:
//!
//! - the agent exits 0 → `waiting`, or `pending` if a user message arrived during the turn;
//! - the agent fails (non-zero exit, malformed or over-long line, turn timeout, cannot start,
//!   output the database refuses to store)
//!   → `error` with a `last_error` naming the cause and the stderr tail; messages already
//!   written are kept;
//! - interrupted because the chat is no longer ours (stolen, canceled, recovered elsewhere):
//!   the agent's group is stopped (SIGTERM, SIGKILL after `kill_grace`) and nothing is written;
//! - interrupted by shutdown or by this worker's own lease failing: the agent is stopped and
//!   the chat goes back to `pending` (fenced: a no-op if another worker has it by now).
//!
//! Any write that the fence rejects means the chat was taken from us: the agent is stopped at
//! once and nothing more is written.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::trace::{SpanBuilder, Status, TraceContextExt as _};
use opentelemetry::{Context, KeyValue};
use serde_json::json;
use tokio_postgres::types::Type;
use uuid::Uuid;

use super::agent::{Agent, AgentError, AgentEvent, AgentTurn};
use super::config::ChatsConfig;
use super::guard::LeaseGuard;
use super::metrics::ChatMetrics;
use crate::db::{self, Db, DbError, Exec};
use crate::runtime::{LeaseState, LeaseStatus, LeaseWatch, StopSignal, TaskSet};
use crate::telemetry::traces;
use crate::text;

/// Longest `last_error` stored; the stderr tail is bounded already, this bounds the rest.
const MAX_ERROR_LEN: usize = 8 * 1024;
/// How many statement timeouts one runner write (checkout, statements, commit) may take in all:
/// a write stuck on a half-open path ends by this bound even when no byte comes back.
const WRITE_BUDGET_STATEMENTS: u32 = 2;

/// What the agent reads: the newest messages the model may see whose JSON lines (each as the
/// document holds it, plus its comma) fit in `$2` bytes, in id order. The first row is a header:
/// NULL id and line, how many visible messages did not fit, the newest visible id (what the turn
/// has seen, whether it fit or not) and the bytes of the lines that follow. The lines are built
/// by the server, so the worker only copies bytes into a buffer of the document's exact size.
const MODEL_MESSAGES: &str = "WITH visible AS (\
       SELECT id, json_build_object('id', id, 'role', role, 'content', content, \
                                    'created_at', created_at::text)::text AS line \
       FROM chat_messages WHERE chat_id = $1 AND NOT deleted AND visibility IN ('model', 'both')), \
     ranked AS (\
       SELECT id, line, sum(octet_length(line) + 1) OVER (ORDER BY id DESC) AS newest_bytes FROM visible) \
     SELECT NULL::int8 AS id, NULL::text AS line, \
            count(*) FILTER (WHERE newest_bytes > $2) AS dropped, coalesce(max(id), 0) AS last_seen, \
            coalesce(max(newest_bytes) FILTER (WHERE newest_bytes <= $2), 0)::int8 AS kept_bytes \
     FROM ranked \
     UNION ALL \
     SELECT id, line, NULL, NULL, NULL FROM ranked WHERE newest_bytes <= $2 \
     ORDER BY 1 NULLS FIRST";

/// An agent message, written only while the chat is ours (the chat row is share-locked so a
/// steal waits for this insert), notified like `post_chat_message` does.
const INSERT_MESSAGE: &str = "WITH owned AS (\
       SELECT id FROM chats WHERE id = $1 AND worker_id = $2 AND generation = $3 AND status = 'running' \
       FOR SHARE), \
     inserted AS (\
       INSERT INTO chat_messages (chat_id, role, content) SELECT id, $4, $5 FROM owned RETURNING id, chat_id) \
     SELECT id, pg_notify('chat_' || chat_id, json_build_object('after_message_id', id - 1)::text) IS NULL \
     FROM inserted";
const SET_TITLE: &str = "UPDATE chats SET title = $4, updated_at = now() \
     WHERE id = $1 AND worker_id = $2 AND generation = $3 AND status = 'running'";
/// Step one of finishing a turn: lock our row. `post_chat_message` locks it too, so a user
/// message either committed before this (and step two sees it) or waits and then finds the chat
/// `waiting` and makes it `pending` itself.
const LOCK_OWNED: &str = "SELECT 1::int4 FROM chats \
     WHERE id = $1 AND worker_id = $2 AND generation = $3 AND status = 'running' FOR UPDATE";
/// Step two, a new statement (a new snapshot under READ COMMITTED): user messages newer than
/// the turn's input make the chat `pending` again. Only messages the model may see, as
/// [`MODEL_MESSAGES`] reads them: `$4` is the newest of those, so a user message hidden from the
/// model (`visibility = 'user'`) would count as unseen after every turn and rerun it forever.
const FINISH_TURN: &str = "UPDATE chats SET worker_id = NULL, last_error = NULL, updated_at = now(), \
     status = CASE WHEN EXISTS (SELECT 1 FROM chat_messages m WHERE m.chat_id = $1 AND m.role = 'user' \
                                AND NOT m.deleted AND m.visibility IN ('model', 'both') AND m.id > $4) \
                   THEN 'pending' ELSE 'waiting' END \
     WHERE id = $1 AND worker_id = $2 AND generation = $3 AND status = 'running' RETURNING status";
const FAIL_TURN: &str = "UPDATE chats SET status = 'error', worker_id = NULL, last_error = $4, updated_at = now() \
     WHERE id = $1 AND worker_id = $2 AND generation = $3 AND status = 'running'";
/// Back to the queue (shutdown, lease trouble, a turn that could not start for a transient
/// reason); the generation is kept and bumped by the next acquisition. Notified on
/// `chat_pending` (at commit) so another replica claims it now, not at its fallback poll.
pub(crate) const RELEASE: &str = "UPDATE chats SET status = 'pending', worker_id = NULL, updated_at = now() \
     WHERE id = $1 AND worker_id = $2 AND generation = $3 AND status = 'running' \
     RETURNING pg_notify('chat_pending', id::text) IS NULL";

/// Why a runner was told to stop; the `cause` label of `chats.interrupts`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum InterruptCause {
    /// The database says the chat is no longer ours (stolen, canceled, finished elsewhere).
    Stolen,
    /// This worker's lease failed for too long or was reaped.
    Lease,
    /// The worker is shutting down.
    Shutdown,
}

impl InterruptCause {
    pub fn as_str(self) -> &'static str {
        match self {
            InterruptCause::Stolen => "stolen",
            InterruptCause::Lease => "lease",
            InterruptCause::Shutdown => "shutdown",
        }
    }
}

/// The chats running in this process, keyed by chat id, carrying the generation each runs.
pub type Runners = TaskSet<Uuid, i64, InterruptCause>;

/// What a runner's stop signal carries when the runtime shuts down.
pub const SHUTDOWN_CAUSE: InterruptCause = InterruptCause::Shutdown;

/// A chat the acquire loop claimed for this worker.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: Uuid,
    pub generation: i64,
    pub owner_id: Uuid,
    pub workspace_id: Option<Uuid>,
    pub title: String,
}

/// What a runner needs, shared by every runner of the process.
pub struct ChatsContext {
    pub db: Db,
    pub worker_id: Uuid,
    pub agent: Agent,
    pub config: ChatsConfig,
    pub metrics: ChatMetrics,
    pub lease: LeaseWatch,
    /// The process that kills this worker's agents if the worker stops renewing (frozen).
    pub guard: LeaseGuard,
}

impl ChatsContext {
    /// The bound of one runner write (see [`WRITE_BUDGET_STATEMENTS`]).
    fn write_budget(&self) -> Duration {
        self.db.statement_timeout() * WRITE_BUDGET_STATEMENTS
    }

    /// `work` within the write budget; past it, [`Ending::WriteTimedOut`].
    async fn bounded<T>(&self, work: impl Future<Output = Result<T, DbError>>) -> Result<T, Ending> {
        match tokio::time::timeout(self.write_budget(), work).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(error)) => Err(Ending::Database(error)),
            Err(_elapsed) => Err(Ending::WriteTimedOut(self.write_budget())),
        }
    }
}

/// What the turn's span reports beyond its outcome.
#[derive(Debug, Default)]
struct TurnFacts {
    /// The turn span's W3C traceparent, given to the agent as `TRACEPARENT`.
    traceparent: Option<String>,
    /// Messages the agent wrote that were stored.
    messages_written: u32,
    /// The agent's exit code, when it exited by itself.
    exit_code: Option<i32>,
}

impl TurnFacts {
    /// Sets the span's attributes and status and ends it.
    fn record(&self, cx: &Context, ending: &Ending, settle_error: Option<&String>) {
        let span = cx.span();
        span.set_attribute(KeyValue::new("chat.turn.outcome", ending.label()));
        span.set_attribute(KeyValue::new("chat.turn.messages_written", i64::from(self.messages_written)));
        if let Some(code) = self.exit_code {
            span.set_attribute(KeyValue::new("agent.exit_code", i64::from(code)));
        }
        match (ending, settle_error) {
            (Ending::Finished { .. }, None) => {}
            (_, Some(error)) => span.set_status(Status::error(format!("not settled: {error}"))),
            (ending, None) => span.set_status(Status::error(ending.label())),
        }
        span.end();
    }
}

/// The fence of every write: this chat, this worker, this generation.
struct Fence {
    chat: Uuid,
    worker: Uuid,
    generation: i64,
}

impl Fence {
    async fn write(&self, db: &Db, sql: &str, extra: &[db::Param<'_>]) -> Result<u64, DbError> {
        let mut params: Vec<db::Param<'_>> =
            vec![(&self.chat, Type::UUID), (&self.worker, Type::UUID), (&self.generation, Type::INT8)];
        params.extend(extra.iter().cloned());
        db::in_transaction(db, async |tx| tx.exec(sql, &params).await).await
    }
}

/// How a turn ended, for the log and the `outcome` label of `chats.turns`.
#[derive(Debug)]
enum Ending {
    /// Exit 0; the chat is `waiting` or (a user message arrived) `pending`.
    Finished {
        status: String,
    },
    Failed(AgentError),
    Interrupted(InterruptCause),
    /// A write found the chat no longer ours.
    FencedOut,
    /// The database failed us mid-turn; the chat is released if possible, else recovered.
    Database(DbError),
    /// A write did not finish within its budget (a half-open path, a lock): as `Database`.
    WriteTimedOut(Duration),
    /// The turn wrote more than `max_output_messages` events or `max_output_bytes`: the agent
    /// is stopped, what it wrote before stays, the event over the bound is not stored.
    OutputLimit(String),
    /// Not even the newest message fits the input bound: no agent is started.
    InputLimit(String),
    /// The database refused what the agent wrote (a value it cannot store): running the turn
    /// again would fail again, so the chat ends `error` naming it.
    Unstorable(DbError),
}

impl Ending {
    fn label(&self) -> &'static str {
        match self {
            Ending::Finished { status } if status == "pending" => "completed_followed_up",
            Ending::Finished { .. } => "completed",
            Ending::Failed(error) => error.metric_label(),
            Ending::Interrupted(_) => "interrupted",
            Ending::FencedOut => "fenced_out",
            Ending::Database(_) => "db_error",
            Ending::WriteTimedOut(_) => "db_timeout",
            Ending::OutputLimit(_) => "output_limit",
            Ending::InputLimit(_) => "input_limit",
            Ending::Unstorable(_) => "unstorable_output",
        }
    }
}

/// Runs one turn of `chat` until it ends or `stop` is raised. Never panics on agent output or
/// database errors: whatever happens, the chat ends settled, released, or left for recovery.
///
/// With traces on, the turn is a span under `parent` (the acquire tick that claimed it), and the
/// agent gets its `TRACEPARENT`.
pub async fn run(
    ctx: Arc<ChatsContext>,
    chat: Claimed,
    claimed_under: LeaseState,
    mut stop: StopSignal<InterruptCause>,
    parent: Context,
) {
    let fence = Fence { chat: chat.id, worker: ctx.worker_id, generation: chat.generation };
    let span = traces::start_span(&parent, || {
        SpanBuilder::from_name("chat turn").with_attributes([
            KeyValue::new("chat.id", chat.id.to_string()),
            KeyValue::new("chat.generation", chat.generation),
        ])
    });
    let mut facts =
        TurnFacts { traceparent: span.as_ref().and_then(traces::traceparent), ..TurnFacts::default() };
    let ending = match turn(&ctx, &chat, &fence, &mut stop, claimed_under, &mut facts).await {
        // Killed by the lease guard (this worker stalled past its lease), not the agent's own
        // failure: the chat goes back to the queue, not to `error`.
        Ending::Failed(_) if lease_expired(&ctx) => Ending::Interrupted(InterruptCause::Lease),
        ending => ending,
    };
    let settled = match tokio::time::timeout(ctx.write_budget(), settle(&ctx, &fence, &ending)).await {
        Ok(settled) => settled.map_err(|e| e.to_string()),
        Err(_elapsed) => Err(format!("no answer within {:?}", ctx.write_budget())),
    };
    ctx.metrics.turn(ending.label());
    if let Some(cx) = span {
        facts.record(&cx, &ending, settled.as_ref().err());
    }
    if let Ending::Interrupted(cause) = &ending {
        ctx.metrics.interrupt(cause.as_str());
    }
    match (&ending, settled) {
        (Ending::Finished { status }, Ok(())) => {
            tracing::info!(chat_id = %chat.id, generation = chat.generation, %status, "turn finished");
        }
        (Ending::Database(error), Ok(())) => {
            tracing::warn!(chat_id = %chat.id, generation = chat.generation, %error, "database failed mid-turn; chat returned to pending");
        }
        (Ending::WriteTimedOut(after), Ok(())) => {
            tracing::warn!(chat_id = %chat.id, generation = chat.generation, after_ms = after.as_millis() as u64, "a write timed out mid-turn; chat returned to pending");
        }
        (Ending::Failed(error), Ok(())) => {
            tracing::warn!(chat_id = %chat.id, generation = chat.generation, error_kind = error.metric_label(), %error, "turn failed");
        }
        (Ending::OutputLimit(what) | Ending::InputLimit(what), Ok(())) => {
            tracing::warn!(chat_id = %chat.id, generation = chat.generation, outcome = ending.label(), %what, "turn failed");
        }
        (Ending::Unstorable(error), Ok(())) => {
            tracing::warn!(chat_id = %chat.id, generation = chat.generation, %error, "turn failed: the agent's output cannot be stored");
        }
        (ending, Ok(())) => {
            tracing::info!(chat_id = %chat.id, generation = chat.generation, outcome = ending.label(), "turn ended");
        }
        (ending, Err(error)) => {
            tracing::warn!(
                chat_id = %chat.id,
                generation = chat.generation,
                outcome = ending.label(),
                %error,
                "could not record how the turn ended; the heartbeat or recovery will return the chat"
            );
        }
    }
}

async fn turn(
    ctx: &ChatsContext,
    chat: &Claimed,
    fence: &Fence,
    signal: &mut StopSignal<InterruptCause>,
    claimed_under: LeaseState,
    facts: &mut TurnFacts,
) -> Ending {
    let max_input = ctx.config.runner.max_input_bytes;
    let input = match ctx.bounded(input_document(&ctx.db, chat, max_input)).await {
        Ok(input) => input,
        Err(ending) => return ending,
    };
    if input.kept == 0 && input.dropped > 0 {
        // Not even the newest message fits: the agent would answer without the question.
        return Ending::InputLimit(format!(
            "the newest message does not fit chats.runner.max_input_bytes ({max_input} bytes)"
        ));
    }
    let last_seen = input.last_seen;
    let budget = ctx.config.agent_budget();
    if lease_deadline(&ctx.lease.current(), &claimed_under, tokio::time::Instant::now(), budget).is_none() {
        // Frozen (or starved) since the claim: the chat may be recovered elsewhere already.
        return Ending::Interrupted(InterruptCause::Lease);
    }
    // The document moves to the task writing it to stdin and is freed once written.
    let mut agent =
        match ctx.agent.spawn(chat.id, chat.generation, facts.traceparent.as_deref(), input.bytes).await {
            Ok(agent) => agent,
            Err(error) => return Ending::Failed(error),
        };
    // Dropped (the guard told to forget the agent) when the turn is over, after `agent` stopped.
    let _watched = ctx.guard.watch(agent.process_group_id());
    let watchdog = lease_watchdog(ctx.lease.clone(), claimed_under, budget);
    tokio::pin!(watchdog);
    let mut events: u32 = 0;
    loop {
        let event = tokio::select! {
            biased;
            _ = signal.stopped() => {
                let cause = signal.cause().unwrap_or(SHUTDOWN_CAUSE);
                return stop(&mut agent, ctx, Ending::Interrupted(cause)).await;
            }
            _ = &mut watchdog => return stop(&mut agent, ctx, Ending::Interrupted(InterruptCause::Lease)).await,
            event = agent.next_event() => event,
        };
        if let Ok(Some(_)) = &event {
            events += 1;
            if let Some(what) = over_output_limit(&ctx.config.runner, events, agent.output_bytes()) {
                return stop(&mut agent, ctx, Ending::OutputLimit(what)).await;
            }
        }
        let is_message = matches!(&event, Ok(Some(AgentEvent::Message { .. })));
        let write = async {
            match event {
                Ok(Some(AgentEvent::Message { role, content })) => {
                    let role = role.as_str();
                    let params = [
                        (&role as &(dyn tokio_postgres::types::ToSql + Sync), Type::TEXT),
                        (&content, Type::JSONB),
                    ];
                    Some(ctx.bounded(fence.write(&ctx.db, INSERT_MESSAGE, &params)).await)
                }
                Ok(Some(AgentEvent::Title(title))) => {
                    Some(ctx.bounded(fence.write(&ctx.db, SET_TITLE, &[(&title, Type::TEXT)])).await)
                }
                Ok(None) => None,
                Err(error) => Some(Err(Ending::Failed(error))),
            }
        };
        // A write races the lease watchdog (which also fires when the heartbeat finds the lease
        // lost): a write stuck on a dead path must not keep the agent alive past its lease. A
        // stop for any other cause waits for the write in flight (bounded), so an answer the
        // agent gave before a shutdown is kept; a stolen chat's write is refused by the fence.
        let written = tokio::select! {
            biased;
            _ = &mut watchdog => return stop(&mut agent, ctx, Ending::Interrupted(InterruptCause::Lease)).await,
            written = write => written,
        };
        match written {
            None => break,
            Some(Ok(0)) => return stop(&mut agent, ctx, Ending::FencedOut).await,
            Some(Ok(_)) => facts.messages_written += u32::from(is_message),
            // The agent stopped itself already (its error ended the output).
            Some(Err(ending @ Ending::Failed(_))) => return ending,
            Some(Err(Ending::Database(error))) if error.is_refused_value() => {
                return stop(&mut agent, ctx, Ending::Unstorable(error)).await;
            }
            Some(Err(ending)) => return stop(&mut agent, ctx, ending).await,
        }
    }
    // The agent closed its output; it may still run (finish waits up to the turn's deadline),
    // so the wait races the stop signal and the watchdog too. Dropping the unfinished `finish`
    // drops the turn, which SIGKILLs the agent's group.
    let finished = tokio::select! {
        biased;
        _ = signal.stopped() => Err(Ending::Interrupted(signal.cause().unwrap_or(SHUTDOWN_CAUSE))),
        _ = &mut watchdog => Err(Ending::Interrupted(InterruptCause::Lease)),
        finished = agent.finish() => Ok(finished),
    };
    match finished {
        Ok(Ok(status)) => {
            facts.exit_code = status.code();
            finish(ctx, fence, last_seen).await
        }
        Ok(Err(error)) => Ending::Failed(error),
        Err(interrupted) => interrupted,
    }
}

/// Whether the guard's deadline (the last renewal's start + `stale_after` − margin) has passed.
fn lease_expired(ctx: &ChatsContext) -> bool {
    ctx.lease
        .current()
        .renewed_at
        .is_none_or(|renewed_at| tokio::time::Instant::now() >= renewed_at + ctx.config.guard_budget())
}

/// Which output bound a turn that has read `events` events in `bytes` has passed, if any.
fn over_output_limit(runner: &super::config::RunnerConfig, events: u32, bytes: u64) -> Option<String> {
    if events > runner.max_output_messages {
        Some(format!(
            "the turn wrote more than {} messages (chats.runner.max_output_messages)",
            runner.max_output_messages
        ))
    } else if bytes > runner.max_output_bytes as u64 {
        Some(format!(
            "the turn wrote more than {} bytes (chats.runner.max_output_bytes)",
            runner.max_output_bytes
        ))
    } else {
        None
    }
}

/// Stops the agent (SIGTERM to its group, SIGKILL after `kill_grace`) and returns `ending`.
async fn stop(agent: &mut AgentTurn, ctx: &ChatsContext, ending: Ending) -> Ending {
    if let Err(error) = agent.interrupt(ctx.config.runner.kill_grace).await {
        tracing::warn!(%error, "stopping the agent failed");
    }
    ending
}

/// Exit 0: `waiting`, or `pending` when a user message arrived during the turn (two statements
/// under the row lock, see [`LOCK_OWNED`]).
async fn finish(ctx: &ChatsContext, fence: &Fence, last_seen: i64) -> Ending {
    let result = ctx
        .bounded(async {
            let mut conn = ctx.db.get().await?;
            let tx = db::begin(&mut conn, ctx.db.tx_limits()).await?;
            let owned = tx
                .fetch_opt(
                    LOCK_OWNED,
                    &[
                        (&fence.chat, Type::UUID),
                        (&fence.worker, Type::UUID),
                        (&fence.generation, Type::INT8),
                    ],
                )
                .await?;
            if owned.is_none() {
                return Ok(None);
            }
            let row = tx
                .fetch_opt(
                    FINISH_TURN,
                    &[
                        (&fence.chat, Type::UUID),
                        (&fence.worker, Type::UUID),
                        (&fence.generation, Type::INT8),
                        (&last_seen, Type::INT8),
                    ],
                )
                .await?;
            db::commit(tx).await?;
            Ok(row.map(|r| r.get::<_, String>(0)))
        })
        .await;
    match result {
        Ok(Some(status)) => Ending::Finished { status },
        Ok(None) => Ending::FencedOut,
        Err(ending) => ending,
    }
}

/// Records how the turn ended, where that needs a write.
async fn settle(ctx: &ChatsContext, fence: &Fence, ending: &Ending) -> Result<(), DbError> {
    match ending {
        Ending::Finished { .. } | Ending::FencedOut | Ending::Interrupted(InterruptCause::Stolen) => Ok(()),
        Ending::Failed(error) => {
            let message = text::clip(error.to_string(), MAX_ERROR_LEN);
            fence.write(&ctx.db, FAIL_TURN, &[(&message, Type::TEXT)]).await.map(drop)
        }
        Ending::Unstorable(error) => {
            let message = text::clip(format!("the agent's output cannot be stored: {error}"), MAX_ERROR_LEN);
            fence.write(&ctx.db, FAIL_TURN, &[(&message, Type::TEXT)]).await.map(drop)
        }
        Ending::OutputLimit(what) => {
            let message = format!("output_limit: {what}");
            fence.write(&ctx.db, FAIL_TURN, &[(&message, Type::TEXT)]).await.map(drop)
        }
        Ending::InputLimit(what) => {
            let message = format!("input_limit: {what}");
            fence.write(&ctx.db, FAIL_TURN, &[(&message, Type::TEXT)]).await.map(drop)
        }
        Ending::Interrupted(InterruptCause::Shutdown | InterruptCause::Lease)
        | Ending::Database(_)
        | Ending::WriteTimedOut(_) => fence.write(&ctx.db, RELEASE, &[]).await.map(drop),
    }
}

/// The agent's input: `{"chat": {...}, "dropped_messages": N, "messages": [...]}` plus a
/// newline, at most `max_bytes` long (the newest messages that fit; `dropped_messages` older
/// ones left out), and the newest visible message id.
async fn input_document(db: &Db, chat: &Claimed, max_bytes: usize) -> Result<InputDocument, DbError> {
    let header = json!({
        "id": chat.id,
        "owner_id": chat.owner_id,
        "workspace_id": chat.workspace_id,
        "title": chat.title,
        "generation": chat.generation,
    })
    .to_string();
    // `{"chat":` header `,"dropped_messages":` up to 20 digits `,"messages":[` … `]}` newline.
    let frame = header.len() + 8 + 20 + 20 + 14 + 3;
    let budget = i64::try_from(max_bytes.saturating_sub(frame)).unwrap_or(i64::MAX);
    let mut conn = db.get().await?;
    let tx = db::begin(&mut conn, db.tx_limits()).await?;
    let mut rows = std::pin::pin!(
        tx.fetch_stream(MODEL_MESSAGES, &[(&chat.id, Type::UUID), (&budget, Type::INT8)]).await?
    );
    let mut document = Vec::new();
    let (mut last_seen, mut dropped, mut kept) = (0, 0, 0);
    while let Some(row) = futures_util::TryStreamExt::try_next(&mut rows).await? {
        match row.try_get::<_, Option<&str>>(1)? {
            None => {
                dropped = row.try_get(2)?;
                last_seen = row.try_get(3)?;
                // The exact size up front: a Vec grown by doubling would hold up to twice the
                // document (BENCHMARKS.md, agent_memory).
                let kept_bytes: i64 = row.try_get(4)?;
                document.reserve_exact(frame + usize::try_from(kept_bytes).unwrap_or(0));
                document.extend_from_slice(
                    format!("{{\"chat\":{header},\"dropped_messages\":{dropped},\"messages\":[").as_bytes(),
                );
            }
            Some(line) => {
                if kept > 0 {
                    document.push(b',');
                }
                kept += 1;
                document.extend_from_slice(line.as_bytes());
            }
        }
    }
    document.extend_from_slice(b"]}\n");
    db::commit(tx).await?;
    Ok(InputDocument { bytes: document, last_seen, kept, dropped })
}

/// What [`input_document`] built.
struct InputDocument {
    /// The document, newline included.
    bytes: Vec<u8>,
    /// The newest visible message id, whether it fit or not.
    last_seen: i64,
    kept: i64,
    dropped: i64,
}

/// Until when an agent may run for a chat claimed under `claimed_under`, judged at `now` on the
/// lease as it is (`current`); `None` = stop now (or do not start). The deadline is `budget`
/// after the renewal the claim was made under; a later renewal, seen before that deadline,
/// moves it to `budget` after its own start. Once the deadline has passed nothing moves it back
/// (a worker thawed from a freeze renews at once, but meanwhile its lease may have looked stale
/// to other workers, which may run the chat), nor does anything once the lease was lost or
/// registered again (a new epoch).
fn lease_deadline(
    current: &LeaseState,
    claimed_under: &LeaseState,
    now: tokio::time::Instant,
    budget: Duration,
) -> Option<tokio::time::Instant> {
    if current.epoch != claimed_under.epoch || current.status == LeaseStatus::Lost {
        return None;
    }
    let deadline = claimed_under.renewed_at? + budget;
    if now >= deadline {
        return None;
    }
    Some(current.renewed_at.map_or(deadline, |renewed_at| deadline.max(renewed_at + budget)))
}

/// Resolves when this worker must stop its runners on its own: at the deadline of
/// [`lease_deadline`] — whether renewals fail, hang or are not even attempted — or when the lease
/// is lost or registered again.
async fn lease_watchdog(mut lease: LeaseWatch, claimed_under: LeaseState, budget: Duration) {
    let mut under = claimed_under;
    loop {
        let Some(deadline) = lease_deadline(&lease.current(), &under, tokio::time::Instant::now(), budget)
        else {
            return;
        };
        tokio::select! {
            biased;
            _ = tokio::time::sleep_until(deadline) => return,
            // Judged again at once: a deadline that passed while this task could not run (the
            // worker was frozen) holds, whatever renewal came after it.
            _ = lease.changed() => {}
        }
        under.renewed_at = Some(deadline - budget);
    }
}

#[cfg(test)]
mod tests {
    use tokio::time::Instant;

    use super::*;

    const BUDGET: Duration = Duration::from_secs(10);

    fn lease(status: LeaseStatus, epoch: u64, renewed_at: Option<Instant>) -> LeaseState {
        LeaseState { status, epoch, renewed_at }
    }

    #[test]
    fn an_agent_runs_until_the_budget_after_the_renewal_it_was_claimed_under_or_a_later_one_seen_in_time() {
        let r0 = Instant::now();
        let claimed = lease(LeaseStatus::Healthy, 1, Some(r0));
        let secs = |s: u64| Duration::from_secs(s);
        let cases = [
            // (what the lease is now, when it is judged, deadline or None = stop)
            ("no renewal since the claim", claimed, r0 + secs(3), Some(r0 + BUDGET)),
            (
                "renewals failing: the claim's deadline holds",
                lease(LeaseStatus::Failing, 1, Some(r0)),
                r0 + secs(9),
                Some(r0 + BUDGET),
            ),
            ("the claim's deadline has passed", claimed, r0 + BUDGET, None),
            (
                "a later renewal seen in time moves it",
                lease(LeaseStatus::Healthy, 1, Some(r0 + secs(5))),
                r0 + secs(9),
                Some(r0 + secs(15)),
            ),
            // The frozen worker: claimed at r0, frozen past the deadline, thawed, renewed at once.
            (
                "thawed and renewed after the deadline",
                lease(LeaseStatus::Healthy, 1, Some(r0 + secs(20))),
                r0 + secs(20),
                None,
            ),
            ("lost", lease(LeaseStatus::Lost, 2, Some(r0)), r0, None),
            (
                "registered again (a new epoch)",
                lease(LeaseStatus::Healthy, 2, Some(r0 + secs(1))),
                r0 + secs(1),
                None,
            ),
        ];
        for (what, current, now, expected) in cases {
            assert_eq!(lease_deadline(&current, &claimed, now, BUDGET), expected, "{what}");
        }
        let never_renewed = lease(LeaseStatus::Healthy, 1, None);
        assert_eq!(lease_deadline(&claimed, &never_renewed, r0, BUDGET), None, "claimed under no renewal");
    }

    #[tokio::test(start_paused = true)]
    async fn the_watchdog_follows_renewals_seen_in_time_and_stops_a_turn_claimed_before_a_freeze() {
        let publisher = crate::runtime::LeasePublisher::default();
        publisher.renewed(Instant::now());
        let claimed = publisher.watch().current();
        let watchdog = lease_watchdog(publisher.watch(), claimed, BUDGET);
        tokio::pin!(watchdog);
        assert!(futures_util::poll!(&mut watchdog).is_pending());
        // Renewed in time: the watchdog keeps going past the claim's deadline.
        tokio::time::advance(Duration::from_secs(5)).await;
        publisher.renewed(Instant::now());
        assert!(futures_util::poll!(&mut watchdog).is_pending(), "the renewal is seen at +5 s");
        tokio::time::advance(Duration::from_secs(6)).await;
        assert!(futures_util::poll!(&mut watchdog).is_pending(), "the renewal at +5 s holds until +15 s");
        tokio::time::advance(Duration::from_secs(4)).await;
        assert!(futures_util::poll!(&mut watchdog).is_ready(), "+15 s without another renewal");

        // A claim, then the process is frozen (its tasks do not run) past the claim's deadline;
        // thawed, it renews at once, and only then does the turn's watchdog first run.
        let claimed = publisher.watch().current();
        tokio::time::advance(Duration::from_secs(20)).await;
        publisher.renewed(Instant::now());
        let watchdog = lease_watchdog(publisher.watch(), claimed, BUDGET);
        tokio::pin!(watchdog);
        assert!(
            futures_util::poll!(&mut watchdog).is_ready(),
            "a renewal after the claim's deadline does not revive the turn"
        );
    }
}
