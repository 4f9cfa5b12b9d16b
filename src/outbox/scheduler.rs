//! The Redis side of a sweep: one pipeline per batch, one answer per row.
//!
//! For each queue in the batch, in this order: `HSET {prefix}:payload:{queue} task_id payload …`,
//! then `ZADD {prefix}:sched:{queue} run_at_ms task_id …` — one command pair per queue chunk
//! (at most [`MAX_CHUNK_ROWS`] rows / [`MAX_CHUNK_BYTES`] of payload), carrying every row of
//! that queue. The payload is written before the schedule entry, so a consumer that sees a task
//! in the sorted set finds its payload. Both writes are idempotent (stable member and field),
//! which is what makes "outcome unknown" safe: a re-send after a timeout, or two replicas racing
//! after a rollback, converge on the same state.
//!
//! Why chunks and not one command pair per row: fred 10.1 flushes each command of a pipeline in
//! its own socket write when nothing else is queued (`Counters::should_send`), so a 500-row batch
//! as 1,000 commands costs 1,000 writes — measured at ~45k rows/s for Redis alone on 2 cores,
//! below the 50k rows/s target of the whole sweep (BENCHMARKS.md). A multi-field HSET and a
//! multi-member ZADD are each atomic, so a chunk that succeeded wrote every row in it. A chunk
//! refused for a reason that may be one row's fault is re-sent as one command pair per row
//! (the same idempotent writes), so each row is still settled by its own answer and one bad row
//! never costs its neighbours an attempt.
//!
//! fred's `try_all` answers with one result per command, or with a single error when the pipeline
//! could not run at all (Redis down, timed out). Every chunk has two commands, so a correct answer
//! is never one result long and the length check cannot confuse the two.

use std::collections::HashMap;
use std::time::Duration;

use fred::error::{Error as FredError, ErrorKind};
use fred::prelude::{Client, HashesInterface, Key, SortedSetsInterface, Value};
use tokio::time::Instant;

use super::sweeper::Claimed;
use crate::redis::key;

/// Commands sent per chunk (HSET + ZADD).
const COMMANDS_PER_CHUNK: usize = 2;
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

/// Error replies that describe the server's state, not the command (Redis reply prefixes).
const SERVER_STATE_REPLIES: &[&str] = &[
    "OOM",
    "LOADING",
    "READONLY",
    "MISCONF",
    "BUSY",
    "MASTERDOWN",
    "NOREPLICAS",
    "TRYAGAIN",
    "CLUSTERDOWN",
    "NOAUTH",
    "WRONGPASS",
    "NOPERM",
];

/// Classifies one command error. Only errors the server returned about this command (e.g.
/// WRONGTYPE) are the row's; connection, timeout and server-state errors are not.
pub fn classify(kind: &ErrorKind, details: &str) -> ErrorClass {
    match kind {
        ErrorKind::InvalidArgument | ErrorKind::InvalidCommand => ErrorClass::Row,
        ErrorKind::Unknown => {
            let first = details.split_whitespace().next().unwrap_or("");
            if first.is_empty() || SERVER_STATE_REPLIES.contains(&first) {
                ErrorClass::Server
            } else {
                ErrorClass::Row
            }
        }
        _ => ErrorClass::Server,
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

/// Sends every row's writes, bounded by `deadline` in total; one outcome per row.
pub async fn dispatch(
    client: &Client,
    prefix: &str,
    rows: &[Claimed],
    deadline: Duration,
) -> Result<Vec<RowOutcome>, DispatchError> {
    let deadline_at = Instant::now() + deadline;
    let chunks = chunks(rows);
    // A new pipeline per batch: a pipeline keeps its buffer and would re-send it.
    let pipeline = client.pipeline();
    for chunk in &chunks {
        let fields: Vec<(&str, &str)> =
            chunk.rows.iter().map(|&i| (rows[i].task_id.as_str(), rows[i].payload.as_str())).collect();
        let members: Vec<(f64, &str)> =
            chunk.rows.iter().map(|&i| (rows[i].run_at_ms as f64, rows[i].task_id.as_str())).collect();
        // Queuing only buffers the command; an argument conversion error (which these plain
        // strings cannot cause) would surface as a short answer below.
        let _: Result<(), _> = pipeline.hset(key(prefix, "payload", &chunk.queue), fields).await;
        let _: Result<(), _> =
            pipeline.zadd(key(prefix, "sched", &chunk.queue), None, None, false, false, members).await;
    }
    let results = tokio::time::timeout_at(deadline_at, pipeline.try_all::<Value>())
        .await
        .map_err(|_| DispatchError::TimedOut(deadline))?;
    let chunk_outcomes = pair_outcomes(prefix, chunks.iter().map(|c| c.queue.as_str()), results)?;

    let mut outcomes = vec![RowOutcome::Written; rows.len()];
    let mut resend = Vec::new();
    for (chunk, outcome) in chunks.iter().zip(chunk_outcomes) {
        match outcome {
            RowOutcome::Written => {}
            RowOutcome::Rejected(_) => resend.extend(chunk.rows.iter().copied()),
            unknown @ RowOutcome::Unknown(_) => {
                chunk.rows.iter().for_each(|&i| outcomes[i] = unknown.clone())
            }
        }
    }
    if !resend.is_empty() {
        let subset: Vec<Claimed> = resend.iter().map(|&i| rows[i].clone()).collect();
        let answers = match tokio::time::timeout_at(deadline_at, dispatch_per_row(client, prefix, &subset))
            .await
        {
            Ok(Ok(answers)) => answers,
            Ok(Err(error)) => vec![RowOutcome::Unknown(error.to_string()); subset.len()],
            Err(_) => vec![RowOutcome::Unknown(DispatchError::TimedOut(deadline).to_string()); subset.len()],
        };
        for (i, outcome) in resend.into_iter().zip(answers) {
            outcomes[i] = outcome;
        }
    }
    Ok(outcomes)
}

/// One HSET/ZADD pair per row in one pipeline (no deadline of its own): the fallback for chunks
/// refused for a row reason, and the benchmark's per-row pipeline.
pub async fn dispatch_per_row(
    client: &Client,
    prefix: &str,
    rows: &[Claimed],
) -> Result<Vec<RowOutcome>, DispatchError> {
    let pipeline = client.pipeline();
    let mut keys: HashMap<&str, (Key, Key)> = HashMap::new();
    for row in rows {
        let (payload_key, sched_key) = keys
            .entry(row.queue.as_str())
            .or_insert_with(|| {
                (key(prefix, "payload", &row.queue).into(), key(prefix, "sched", &row.queue).into())
            })
            .clone();
        let _: Result<(), _> = pipeline.hset(payload_key, (row.task_id.as_str(), row.payload.as_str())).await;
        let _: Result<(), _> = pipeline
            .zadd(sched_key, None, None, false, false, (row.run_at_ms as f64, row.task_id.as_str()))
            .await;
    }
    let results = pipeline.try_all::<Value>().await;
    pair_outcomes(prefix, rows.iter().map(|r| r.queue.as_str()), results)
}

/// Turns a pipeline's answers (an HSET/ZADD pair per unit — a chunk or a row — in order, each
/// unit named by its queue) into one outcome per unit.
pub fn pair_outcomes<'a>(
    prefix: &str,
    queues: impl ExactSizeIterator<Item = &'a str>,
    results: Vec<Result<Value, FredError>>,
) -> Result<Vec<RowOutcome>, DispatchError> {
    if results.len() != queues.len() * COMMANDS_PER_CHUNK {
        let reason = results
            .into_iter()
            .find_map(Result::err)
            .map_or_else(|| "short pipeline answer".to_owned(), |e| describe(&e));
        return Err(DispatchError::Unavailable(reason));
    }
    let mut results = results.into_iter();
    let outcomes = queues
        .map(|queue| {
            let hset = results.next().unwrap_or(Ok(Value::Null));
            let zadd = results.next().unwrap_or(Ok(Value::Null));
            let mut unknown = None;
            for (command, kind, result) in [("HSET", "payload", hset), ("ZADD", "sched", zadd)] {
                let Err(error) = result else { continue };
                let message = format!("{command} {}: {}", key(prefix, kind, queue), describe(&error));
                match classify(error.kind(), error.details()) {
                    ErrorClass::Row => return RowOutcome::Rejected(message),
                    ErrorClass::Server => unknown = unknown.or(Some(message)),
                }
            }
            unknown.map_or(RowOutcome::Written, RowOutcome::Unknown)
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
    fn errors_are_the_rows_only_when_the_server_refused_that_command() {
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
        ];
        for (kind, details, expected) in cases {
            assert_eq!(classify(kind, details), *expected, "{kind:?} {details}");
        }
    }

    fn queues(rows: &[Claimed]) -> impl ExactSizeIterator<Item = &str> {
        rows.iter().map(|r| r.queue.as_str())
    }

    #[test]
    fn each_unit_gets_its_own_answer() {
        let rows = [row(1, "a"), row(2, "bad"), row(3, "a")];
        let results = vec![
            Ok(Value::Integer(1)),
            Ok(Value::Integer(1)),
            Ok(Value::Integer(1)),
            Err(wrongtype()),
            Ok(Value::Integer(0)),
            Ok(Value::Integer(0)),
        ];
        let outcomes = pair_outcomes("p", queues(&rows), results).expect("full answer");
        assert_eq!(outcomes[0], RowOutcome::Written);
        assert_eq!(outcomes[2], RowOutcome::Written, "re-sending an existing member is still a success");
        match &outcomes[1] {
            RowOutcome::Rejected(message) => {
                assert!(message.starts_with("ZADD p:sched:bad: WRONGTYPE"), "{message}")
            }
            other => panic!("expected a rejection, got {other:?}"),
        }
    }

    #[test]
    fn a_row_error_wins_over_an_unknown_outcome() {
        let rows = [row(1, "a"), row(2, "a")];
        let timeout = || FredError::new(ErrorKind::Timeout, "Request timed out.");
        let results = vec![Err(timeout()), Err(wrongtype()), Ok(Value::Integer(1)), Err(timeout())];
        let outcomes = pair_outcomes("p", queues(&rows), results).expect("full answer");
        assert!(matches!(&outcomes[0], RowOutcome::Rejected(m) if m.contains("WRONGTYPE")), "{outcomes:?}");
        assert!(matches!(&outcomes[1], RowOutcome::Unknown(m) if m.starts_with("ZADD")), "{outcomes:?}");
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
    fn a_single_error_for_the_whole_pipeline_means_unavailable() {
        // fred with Redis down: ONE Err(Timeout) for a many-command pipeline.
        let rows = [row(1, "a")];
        let results = vec![Err(FredError::new(ErrorKind::Timeout, "Request timed out."))];
        assert_eq!(
            pair_outcomes("p", queues(&rows), results),
            Err(DispatchError::Unavailable("Request timed out.".into()))
        );
        let short = vec![Ok(Value::Integer(1))];
        assert!(matches!(pair_outcomes("p", queues(&rows), short), Err(DispatchError::Unavailable(_))));
    }
}
