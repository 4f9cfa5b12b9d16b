//! The transactional outbox: `task_outbox` rows → Redis sorted sets (`docs/outbox.md`).
//!
//! Producers call `enqueue_task(...)` (migrations/V2) inside their own transaction, so a task
//! exists exactly when the change that created it commits; its NOTIFY wakes the sweeper, which
//! moves due rows into `{prefix}:sched:{queue}` (score = run_at in ms, member = task id) with the
//! payload in `{prefix}:payload:{queue}`.
//!
//! - [`sweeper`]: the `outbox` loop — claim, dispatch, settle, in one transaction per tick.
//! - [`scheduler`]: the Redis pipeline and what each row's answer means.
//! - [`settle`]: pure decisions — dispatched / retry with backoff / dead letter / untouched.
//! - [`dead`]: dead-letter list, requeue, purge.
//! - [`stats`]: backlog probe (gauges) and per-queue stats.
//! - [`config`]: the `[outbox]` table.
//! - [`cli`]: `worker outbox stats | dead list | dead requeue | dead purge`.

pub mod cli;
pub mod config;
pub mod dead;
pub mod scheduler;
pub mod settle;
pub mod stats;
pub mod sweeper;

use crate::runtime::LoopInfo;

pub use config::OutboxConfig;
pub use sweeper::{NAME, SweepError, SweepReport, Sweeper, WAKE_CHANNEL};

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "outbox",
    interval_key: "interval",
    about: "task_outbox rows into Redis sorted sets",
    pausable: true,
};
