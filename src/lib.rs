//! `worker`: the control-plane daemon of the chat platform.
//!
//! # Layout
//!
//! - [`config`]: typed configuration, layered defaults < TOML < env < flags, with errors that
//!   name the key and where its value came from; concurrency sizing from the pool limit.
//! - [`db`]: the pool, the pgbouncer-safe statement policy ([`db::Exec`]), tick transactions.
//! - [`migrate`]: embedded refinery migrations, serialised across replicas.
//! - [`runtime`]: the [`runtime::Loop`] trait and the one runner every loop plugs into.
//! - [`listen`]: the shared LISTEN connection that wakes loops early.
//! - [`controls`]: pause/resume of loops on every replica through `loop_controls`.
//! - [`health`]: `/healthz` and `/readyz`.
//! - [`status`]: `worker status`, the fleet as the database sees it.
//! - [`telemetry`]: tracing and the OTLP meter provider.
//! - [`workers`]: the `workers` loop, this process's lease row.
//! - [`redis`]: the shared Redis client (reconnect policy, timeouts, key spelling).
//! - [`outbox`]: the `outbox` loop (task_outbox → Redis sorted sets), dead letters, its CLI.
//! - [`gitsync`]: pull-request status from GitHub: origin parsing, providers, the API client and
//!   the pure derivations (approved, checks state, rate-limit waits).
//! - [`counters`]: the `counters` loop (Redis running-task counters → `jobs.running_tasks`).
//! - [`daemon`]: wiring for `worker run`: start everything, drain on the first signal.
//!
//! Adding a loop: implement [`runtime::Loop`] in its own module, add its config table to
//! [`config::Config`], its name to [`controls::LOOP_NAMES`] and one `spawn` line in [`daemon`].

pub mod config;
pub mod controls;
pub mod counters;
pub mod daemon;
pub mod db;
pub mod gitsync;
pub mod health;
pub mod listen;
pub mod migrate;
pub mod outbox;
pub mod redis;
pub mod runtime;
pub mod status;
pub mod telemetry;
pub mod workers;
