//! The Redis side of a sweep: two pipelined round trips per batch, one answer per row.
//!
//! Per queue chunk (at most [`MAX_CHUNK_ROWS`] rows / [`MAX_CHUNK_BYTES`] of payload of one
//! queue): first `HSET {prefix}:payload:{queue} task_id payload …` for every chunk in one
//! pipeline, then `ZADD {prefix}:sched:{queue} run_at_ms task_id …` in a second pipeline, only
//! for the chunks whose HSET succeeded. A pipeline runs every command whatever the previous one
//! answered (and in a cluster the two keys live on different slots), so this is what guarantees
//! that a task is never scheduled without its payload. Both writes are idempotent (stable field
//! and member), which makes "outcome unknown" safe: a re-send after a timeout, or two replicas
//! racing after a rollback, converge on the same state.
//!
//! Why chunks and not one command pair per row: fred 10.1 flushes each command of a pipeline in
//! its own socket write when nothing else is queued (`Counters::should_send`), so a 500-row batch
//! as 1,000 commands costs 1,000 writes — measured at ~51k rows/s for Redis alone on 2 cores,
//! below the 50k rows/s target of the whole sweep (BENCHMARKS.md). A multi-field HSET and a
//! multi-member ZADD are each atomic, and the errors Redis can return for them (WRONGTYPE,
//! OOM, …) are about the key or the server, never about one field: the answer for a chunk is
//! the answer for each of its rows.
//!
//! fred's `try_all` answers with one result per command, or with a single error when the
//! pipeline could not run at all; the length check tells the two apart only for pipelines of
//! more than one command, so a one-chunk batch's single error is judged by its kind (an outage
//! is never a row's fault). Nothing is sent while the client is disconnected: commands queued
//! during an outage would be replayed when Redis returns, long after their sweep rolled back.

use std::collections::HashMap;
use std::time::Duration;

use fred::error::{Error as FredError, ErrorKind};
use fred::prelude::{Client, ClientLike, HashesInterface, SortedSetsInterface, Value};
use tokio::time::Instant;

use crate::redis::key;

/// Rows carried by one HSET/ZADD pair at most.
pub const MAX_CHUNK_ROWS: usize = 256;
/// Payload bytes carried by one HSET at most (a single larger payload gets a chunk of its own).
pub const MAX_CHUNK_BYTES: usize = 1 << 20;

/// What Redis said about one row's writes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RowOutcome {
    /// Both writes succeeded: the task is scheduled.
    Written,
    /// Redis refused a write for a reason tied to this row (e.g. WRONGTYPE on its queue's key):
    /// retrying later may help, so it costs an attempt.
    Rejected(String),
    /// No definite answer for this row (connection dropped, server busy/loading/OOM, timed out):
    /// the write may or may not have happened. Costs no attempt; the row is left as it was.
    Unknown(String),
}

/// One claimed row, as sent to Redis.
#[derive(Debug, Clone)]
pub struct Claimed {
    pub id: i64,
    pub task_id: String,
    pub queue: String,
    /// The jsonb payload as text (Postgres' canonical form), sent to Redis as is.
    pub payload: String,
    /// `run_at` in milliseconds since the epoch: the sorted-set score.
    pub run_at_ms: i64,
    pub attempts: i32,
}

/// The pipeline as a whole got no answer: nothing can be settled.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DispatchError {
    #[error("redis unavailable: {0}")]
    Unavailable(String),
    #[error("redis did not answer within {0:?}")]
    TimedOut(Duration),
}

/// Whether an error is the row's fault or the server's/connection's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    Row,
    Server,
}

/// Error replies that are the command's own fault — the same command would fail again, so
/// they cost the rows an attempt. Every other error (connection, timeout, server state such as
/// OOM/LOADING/READONLY, and replies not recognised here, e.g. a proxy's "upstream failure")
/// leaves the outcome unknown: an outage must never consume attempts or dead-letter anything.
const ROW_FAULT_REPLIES: &[&str] = &[
    "WRONGTYPE",
    "ERR value is not a valid float",
    "ERR string exceeds maximum allowed size",
    "ERR Protocol error",
];

/// Classifies one command error: only a reply known to be about the command itself, or a
/// command this client could not even build, is the row's fault.
pub fn classify(kind: &ErrorKind, details: &str) -> ErrorClass {
    if matches!(kind, ErrorKind::InvalidCommand) || ROW_FAULT_REPLIES.iter().any(|p| details.starts_with(p)) {
        ErrorClass::Row
    } else {
        ErrorClass::Server
    }
}

/// Rows of one queue sent in one HSET/ZADD pair (indices into the batch, in batch order).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chunk {
    pub queue: String,
    pub rows: Vec<usize>,
}

/// Groups a batch by queue (queues in order of first appearance), splitting a queue's rows into
/// chunks of at most [`MAX_CHUNK_ROWS`] rows and [`MAX_CHUNK_BYTES`] of payload.
pub fn chunks(rows: &[Claimed]) -> Vec<Chunk> {
    let mut chunks: Vec<Chunk> = Vec::new();
    // queue → (index of its open chunk, payload bytes in it)
    let mut open: HashMap<&str, (usize, usize)> = HashMap::new();
    for (i, row) in rows.iter().enumerate() {
        let size = row.payload.len() + row.task_id.len();
        match open.get_mut(row.queue.as_str()) {
            Some((at, bytes))
                if chunks[*at].rows.len() < MAX_CHUNK_ROWS && *bytes + size <= MAX_CHUNK_BYTES =>
            {
                chunks[*at].rows.push(i);
                *bytes += size;
            }
            _ => {
                open.insert(row.queue.as_str(), (chunks.len(), size));
                chunks.push(Chunk { queue: row.queue.clone(), rows: vec![i] });
            }
        }
    }
    chunks
}

/// `Unavailable` while the client has no connection (it reconnects on its own); costs nothing.
pub fn ensure_connected(client: &Client) -> Result<(), DispatchError> {
    if client.is_connected() {
        Ok(())
    } else {
        Err(DispatchError::Unavailable("not connected (reconnecting)".to_owned()))
    }
}

/// Sends every row's writes, bounded by `deadline` in total; one outcome per row.
pub async fn dispatch(
    client: &Client,
    prefix: &str,
    rows: &[Claimed],
    deadline: Duration,
) -> Result<Vec<RowOutcome>, DispatchError> {
    ensure_connected(client)?;
    let deadline_at = Instant::now() + deadline;
    let chunks = chunks(rows);

    // Phase 1: every payload. A new pipeline per phase: a pipeline keeps its buffer and would
    // re-send it.
    let pipeline = client.pipeline();
    for chunk in &chunks {
        let fields: Vec<(&str, &str)> =
            chunk.rows.iter().map(|&i| (rows[i].task_id.as_str(), rows[i].payload.as_str())).collect();
        // Queuing only buffers the command; a conversion error (which these plain strings cannot
        // cause) would surface as a short answer below.
        let _: Result<(), _> = pipeline.hset(key(prefix, "payload", &chunk.queue), fields).await;
    }
    let answers = tokio::time::timeout_at(deadline_at, pipeline.try_all::<Value>())
        .await
        .map_err(|_| DispatchError::TimedOut(deadline))?;
    let mut chunk_outcomes = command_outcomes("HSET", "payload", prefix, &chunks, answers)?;

    // Phase 2: schedule entries, only where the payload is in place.
    let written: Vec<usize> =
        (0..chunks.len()).filter(|&c| chunk_outcomes[c] == RowOutcome::Written).collect();
    if !written.is_empty() {
        let pipeline = client.pipeline();
        let scheduled: Vec<Chunk> = written.iter().map(|&c| chunks[c].clone()).collect();
        for chunk in &scheduled {
            let members: Vec<(f64, &str)> =
                chunk.rows.iter().map(|&i| (rows[i].run_at_ms as f64, rows[i].task_id.as_str())).collect();
            let _: Result<(), _> =
                pipeline.zadd(key(prefix, "sched", &chunk.queue), None, None, false, false, members).await;
        }
        let answers = tokio::time::timeout_at(deadline_at, pipeline.try_all::<Value>())
            .await
            .map_err(|_| DispatchError::TimedOut(deadline))?;
        let outcomes = command_outcomes("ZADD", "sched", prefix, &scheduled, answers)?;
        for (c, outcome) in written.into_iter().zip(outcomes) {
            chunk_outcomes[c] = outcome;
        }
    }

    let mut outcomes = vec![RowOutcome::Written; rows.len()];
    for (chunk, outcome) in chunks.iter().zip(chunk_outcomes) {
        for &i in &chunk.rows {
            outcomes[i] = outcome.clone();
        }
    }
    Ok(outcomes)
}

/// Turns a pipeline's answers (one `command` on `{prefix}:{kind}:{queue}` per chunk, in order)
/// into one outcome per chunk; `Err` when the pipeline as a whole got no answer.
pub fn command_outcomes(
    command: &str,
    kind: &str,
    prefix: &str,
    chunks: &[Chunk],
    answers: Vec<Result<Value, FredError>>,
) -> Result<Vec<RowOutcome>, DispatchError> {
    if answers.len() != chunks.len() {
        let reason = answers
            .into_iter()
            .find_map(Result::err)
            .map_or_else(|| "short pipeline answer".to_owned(), |e| describe(&e));
        return Err(DispatchError::Unavailable(reason));
    }
    let outcomes = chunks
        .iter()
        .zip(answers)
        .map(|(chunk, answer)| match answer {
            Ok(_) => RowOutcome::Written,
            Err(error) => {
                let message = format!("{command} {}: {}", key(prefix, kind, &chunk.queue), describe(&error));
                match classify(error.kind(), error.details()) {
                    ErrorClass::Row => RowOutcome::Rejected(message),
                    ErrorClass::Server => RowOutcome::Unknown(message),
                }
            }
        })
        .collect();
    Ok(outcomes)
}

fn describe(error: &FredError) -> String {
    match error.details() {
        "" => format!("{:?}", error.kind()),
        details => details.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(id: i64, queue: &str) -> Claimed {
        Claimed {
            id,
            task_id: format!("t{id}"),
            queue: queue.into(),
            payload: "{}".into(),
            run_at_ms: 1_700_000_000_000 + id,
            attempts: 0,
        }
    }

    fn wrongtype() -> FredError {
        FredError::new(
            ErrorKind::InvalidArgument,
            "WRONGTYPE Operation against a key holding the wrong kind of value",
        )
    }

    #[test]
    fn only_replies_known_to_be_about_the_command_are_the_rows_fault() {
        let cases: &[(ErrorKind, &str, ErrorClass)] = &[
            (ErrorKind::InvalidArgument, "WRONGTYPE Operation against a key", ErrorClass::Row),
            (ErrorKind::Unknown, "ERR value is not a valid float", ErrorClass::Row),
            (ErrorKind::InvalidCommand, "Invalid command", ErrorClass::Row),
            (
                ErrorKind::Unknown,
                "OOM command not allowed when used memory > 'maxmemory'",
                ErrorClass::Server,
            ),
            (ErrorKind::Unknown, "LOADING Redis is loading the dataset in memory", ErrorClass::Server),
            (ErrorKind::Unknown, "READONLY You can't write against a read only replica.", ErrorClass::Server),
            (ErrorKind::Unknown, "", ErrorClass::Server),
            (ErrorKind::Timeout, "Request timed out.", ErrorClass::Server),
            (ErrorKind::IO, "Connection refused", ErrorClass::Server),
            (ErrorKind::Canceled, "Canceled.", ErrorClass::Server),
            (ErrorKind::Cluster, "CLUSTERDOWN The cluster is down", ErrorClass::Server),
            (ErrorKind::Auth, "NOAUTH Authentication required.", ErrorClass::Server),
            (ErrorKind::Backpressure, "", ErrorClass::Server),
            (ErrorKind::Unknown, "ERR upstream failure", ErrorClass::Server),
            (ErrorKind::InvalidArgument, "no upstream host", ErrorClass::Server),
        ];
        for (kind, details, expected) in cases {
            assert_eq!(classify(kind, details), *expected, "{kind:?} {details}");
        }
    }

    fn chunk(queue: &str, rows: Vec<usize>) -> Chunk {
        Chunk { queue: queue.into(), rows }
    }

    #[test]
    fn each_chunk_gets_its_own_answer() {
        let chunks = [chunk("a", vec![0, 2]), chunk("bad", vec![1]), chunk("busy", vec![3])];
        let oom =
            FredError::new(ErrorKind::Unknown, "OOM command not allowed when used memory > 'maxmemory'");
        let answers = vec![Ok(Value::Integer(2)), Err(wrongtype()), Err(oom)];
        let outcomes = command_outcomes("ZADD", "sched", "p", &chunks, answers).expect("full answer");
        assert_eq!(outcomes[0], RowOutcome::Written);
        assert!(
            matches!(&outcomes[1], RowOutcome::Rejected(m) if m.starts_with("ZADD p:sched:bad: WRONGTYPE")),
            "{outcomes:?}"
        );
        assert!(
            matches!(&outcomes[2], RowOutcome::Unknown(m) if m.starts_with("ZADD p:sched:busy: OOM")),
            "{outcomes:?}"
        );
    }

    #[test]
    fn an_unrecognised_error_reply_is_never_the_rows_fault() {
        // e.g. a proxy in front of Redis reporting its own backend outage per command.
        let chunks = [chunk("a", vec![0])];
        let proxy = FredError::new(ErrorKind::Unknown, "ERR upstream failure");
        let outcomes = command_outcomes("HSET", "payload", "p", &chunks, vec![Err(proxy)]).expect("answer");
        assert!(matches!(&outcomes[0], RowOutcome::Unknown(_)), "{outcomes:?}");
    }

    #[test]
    fn batches_are_chunked_per_queue_in_order_of_first_appearance() {
        let rows: Vec<Claimed> =
            ["a", "b", "a", "c", "b", "a"].iter().enumerate().map(|(i, q)| row(i as i64, q)).collect();
        let got: Vec<(String, Vec<usize>)> = chunks(&rows).into_iter().map(|c| (c.queue, c.rows)).collect();
        let want = [("a", vec![0, 2, 5]), ("b", vec![1, 4]), ("c", vec![3])];
        assert_eq!(got, want.map(|(q, r)| (q.to_owned(), r)));
    }

    #[test]
    fn chunks_are_bounded_in_rows_and_bytes() {
        let rows: Vec<Claimed> = (0..(MAX_CHUNK_ROWS as i64 * 2 + 1)).map(|i| row(i, "q")).collect();
        let sizes: Vec<usize> = chunks(&rows).iter().map(|c| c.rows.len()).collect();
        assert_eq!(sizes, [MAX_CHUNK_ROWS, MAX_CHUNK_ROWS, 1]);

        let mut big = vec![row(0, "q"), row(1, "q"), row(2, "q")];
        big[0].payload = "x".repeat(MAX_CHUNK_BYTES / 2);
        big[1].payload = "x".repeat(MAX_CHUNK_BYTES / 2);
        big[2].payload = "x".repeat(MAX_CHUNK_BYTES * 2);
        let split: Vec<Vec<usize>> = chunks(&big).into_iter().map(|c| c.rows).collect();
        assert_eq!(split, [vec![0], vec![1], vec![2]], "no chunk exceeds the byte bound unless one row does");
    }

    #[test]
    fn a_short_answer_means_the_pipeline_did_not_run() {
        // fred with Redis down: ONE Err(Timeout) for a many-command pipeline.
        let chunks = [chunk("a", vec![0]), chunk("b", vec![1])];
        let timeout = || FredError::new(ErrorKind::Timeout, "Request timed out.");
        assert_eq!(
            command_outcomes("HSET", "payload", "p", &chunks, vec![Err(timeout())]),
            Err(DispatchError::Unavailable("Request timed out.".into()))
        );
        let short = vec![Ok(Value::Integer(1))];
        assert!(matches!(
            command_outcomes("HSET", "payload", "p", &chunks, short),
            Err(DispatchError::Unavailable(_))
        ));
        // A one-command pipeline's single error is judged by its kind: a timeout is unknown.
        let one = [chunk("a", vec![0])];
        let outcomes = command_outcomes("HSET", "payload", "p", &one, vec![Err(timeout())]).expect("answer");
        assert!(matches!(&outcomes[0], RowOutcome::Unknown(_)), "{outcomes:?}");
    }
}
