//! `worker`: the control-plane daemon of the chat platform.
//!
//! # Layout
//!
//! - [`config`]: typed configuration, layered defaults < TOML < env < flags, with errors that
//!   name the key and where its value came from; concurrency sizing from the pool limit.
//! - [`db`]: the pool, the pgbouncer-safe statement policy ([`db::Exec`]), tick transactions.
//! - [`migrate`]: embedded refinery migrations, serialised across replicas.
//! - [`runtime`]: the [`runtime::Loop`] trait and the one runner every loop plugs into; the tick
//!   context, the supervisor of long-lived tasks, the lease state, the pause cache.
//! - [`listen`]: the shared LISTEN connection: early wakes for loops, payload streams.
//! - [`loops`]: the one list of loops (names, config tables).
//! - [`audit`]: the audit trail of state-changing CLI commands (`operator_actions`), written in
//!   the same transaction as their effect; `worker audit list`.
//! - [`controls`]: pause/resume of loops on every replica through `loop_controls`.
//! - [`identity`]: who this process is (its `workers` id).
//! - [`init`]: the worker as a container's PID 1: a minimal init that reaps orphans and forwards
//!   signals stays behind, so no shell holds the environment.
//! - [`health`]: `/healthz` and `/readyz`.
//! - [`status`]: `worker status`, the fleet as the database sees it.
//! - [`telemetry`]: tracing, the OTLP meter provider and, with `telemetry.traces`, the tracer provider.
//! - [`workers`]: the `workers` loop, this process's lease row.
//! - [`redis`]: the shared Redis client (reconnect policy, timeouts, key spelling).
//! - [`outbox`]: the `outbox` loop (task_outbox → Redis sorted sets), dead letters, its CLI.
//! - [`chats`]: the chat loops (`chats_acquire`, `chats_heartbeat`, `chats_recover`), the
//!   supervised agent runners and what bounds their agents (allow-listed environment, agent user,
//!   rlimits, bounded input and output, the lease guard process `worker agent-guard`), the
//!   exactly-once message stream and `worker chat …`.
//! - [`gitsync`]: the `gitsync` loop (due `chat_diff_statuses` rows → their PR's status from
//!   GitHub), its CLI; origin parsing, providers, the API client and the pure derivations
//!   (approved, checks state, rate-limit waits); tokens at rest ([`gitsync::tokens`]).
//! - [`counters`]: the `counters` loop (Redis running-task counters → `jobs.running_tasks`).
//! - [`prebuilds`]: the `prebuilds` loop (keeps each preset's prebuilt workspaces at its desired
//!   count, leader only), its pure decision core ([`prebuilds::actions`]) and its CLI.
//! - [`text`]: bounding text for columns (`clip`) and CLI tables (`one_line`).
//! - [`daemon`]: wiring for `worker run`: start everything, drain on the first signal.
//!
//! Adding a loop: implement [`runtime::Loop`] (and [`runtime::LoopError`] for its error) in its
//! own module with its config struct beside it, add the table to [`config::Config`], one entry
//! to [`loops::ALL`] and one `spawn` line in [`daemon`].

/// jemalloc instead of glibc's malloc. tokio aligns every task to 128 bytes, which glibc serves
/// from over-sized chunks: ~110 bytes lost per task, i.e. per running chat (100k registered tasks
/// in a scratch program: 494 bytes each with glibc, 382 with jemalloc), and a real running chat
/// costs less (27 → 19.6 KB of worker memory). mimalloc saved as much per chat but cost 11 MB more
/// at idle (BENCHMARKS.md, chats). Declared in the library, not in `main.rs`, so the tests and
/// benchmarks run on the allocator that ships.
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

pub mod audit;
pub mod chats;
pub mod config;
pub mod controls;
pub mod counters;
pub mod daemon;
pub mod db;
pub mod gitsync;
pub mod health;
pub mod identity;
pub mod init;
pub mod listen;
pub mod loops;
pub mod migrate;
pub mod outbox;
pub mod prebuilds;
pub mod redis;
pub mod retention;
pub mod runtime;
pub mod status;
pub mod telemetry;
pub mod text;
pub mod validate;
pub mod wakes;
pub mod workers;
