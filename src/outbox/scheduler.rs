//! The Redis side of a sweep: one pipeline per batch, one answer per row.
//!
//! Per row, in this order: `HSET {prefix}:payload:{queue} task_id payload`, then
//! `ZADD {prefix}:sched:{queue} run_at_ms task_id`. The payload is written before the schedule
//! entry, so a consumer that sees the task in the sorted set finds its payload. Both writes are
//! idempotent (stable member and field), which is what makes "outcome unknown" safe: a re-send
//! after a timeout, or two replicas racing after a rollback, converge on the same state.
//!
//! fred's `try_all` answers with one result per command, or with a single error when the pipeline
//! could not run at all (Redis down, timed out). Every row has two commands, so a correct answer
//! is never one result long and the length check cannot confuse the two.

use std::collections::HashMap;
use std::time::Duration;

use fred::error::{Error as FredError, ErrorKind};
use fred::prelude::{Client, HashesInterface, Key, SortedSetsInterface, Value};

use super::sweeper::Claimed;
use crate::redis::key;

/// Commands sent per row (HSET + ZADD).
const COMMANDS_PER_ROW: usize = 2;

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

/// Sends every row's writes in one new pipeline, bounded by `deadline`.
pub async fn dispatch(
    client: &Client,
    prefix: &str,
    rows: &[Claimed],
    deadline: Duration,
) -> Result<Vec<RowOutcome>, DispatchError> {
    // A new pipeline per batch: a pipeline keeps its buffer and would re-send it.
    let pipeline = client.pipeline();
    let mut keys: HashMap<&str, (Key, Key)> = HashMap::new();
    for row in rows {
        let (payload_key, sched_key) = keys
            .entry(row.queue.as_str())
            .or_insert_with(|| {
                (key(prefix, "payload", &row.queue).into(), key(prefix, "sched", &row.queue).into())
            })
            .clone();
        // Queuing only buffers the command; errors here are argument conversions, which these
        // plain strings cannot fail, and would surface again as a short answer below.
        let _: Result<(), _> = pipeline.hset(payload_key, (row.task_id.as_str(), row.payload.as_str())).await;
        let _: Result<(), _> = pipeline
            .zadd(sched_key, None, None, false, false, (row.run_at_ms as f64, row.task_id.as_str()))
            .await;
    }
    let results = tokio::time::timeout(deadline, pipeline.try_all::<Value>())
        .await
        .map_err(|_| DispatchError::TimedOut(deadline))?;
    row_outcomes(prefix, rows, results)
}

/// Turns the pipeline's answers (two per row, in order) into one outcome per row.
pub fn row_outcomes(
    prefix: &str,
    rows: &[Claimed],
    results: Vec<Result<Value, FredError>>,
) -> Result<Vec<RowOutcome>, DispatchError> {
    if results.len() != rows.len() * COMMANDS_PER_ROW {
        let reason = results
            .into_iter()
            .find_map(Result::err)
            .map_or_else(|| "short pipeline answer".to_owned(), |e| describe(&e));
        return Err(DispatchError::Unavailable(reason));
    }
    let mut results = results.into_iter();
    let outcomes = rows
        .iter()
        .map(|row| {
            let hset = results.next().unwrap_or(Ok(Value::Null));
            let zadd = results.next().unwrap_or(Ok(Value::Null));
            let mut unknown = None;
            for (command, kind, result) in [("HSET", "payload", hset), ("ZADD", "sched", zadd)] {
                let Err(error) = result else { continue };
                let message = format!("{command} {}: {}", key(prefix, kind, &row.queue), describe(&error));
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

    #[test]
    fn each_row_gets_its_own_answer() {
        let rows = [row(1, "a"), row(2, "bad"), row(3, "a")];
        let results = vec![
            Ok(Value::Integer(1)),
            Ok(Value::Integer(1)),
            Ok(Value::Integer(1)),
            Err(wrongtype()),
            Ok(Value::Integer(0)),
            Ok(Value::Integer(0)),
        ];
        let outcomes = row_outcomes("p", &rows, results).expect("full answer");
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
        let outcomes = row_outcomes("p", &rows, results).expect("full answer");
        assert!(matches!(&outcomes[0], RowOutcome::Rejected(m) if m.contains("WRONGTYPE")), "{outcomes:?}");
        assert!(matches!(&outcomes[1], RowOutcome::Unknown(m) if m.starts_with("ZADD")), "{outcomes:?}");
    }

    #[test]
    fn a_single_error_for_the_whole_pipeline_means_unavailable() {
        // fred with Redis down: ONE Err(Timeout) for a many-command pipeline.
        let rows = [row(1, "a")];
        let results = vec![Err(FredError::new(ErrorKind::Timeout, "Request timed out."))];
        assert_eq!(
            row_outcomes("p", &rows, results),
            Err(DispatchError::Unavailable("Request timed out.".into()))
        );
        let short = vec![Ok(Value::Integer(1))];
        assert!(matches!(row_outcomes("p", &rows, short), Err(DispatchError::Unavailable(_))));
    }
}
