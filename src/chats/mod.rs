//! Chats: AI agent conversations run as subprocesses (SPEC §7.1).
//!
//! The schema and the API tier's entry point, `post_chat_message(...)`, are in
//! `migrations/V3__chats.sql`. The loops (acquire, runner, heartbeat, recovery) build on:
//!
//! - [`agent`]: one agent turn as a subprocess — spawn, bounded event lines, stderr tail,
//!   timeout and process-group interrupt. No database: the runner fences and writes.
//! - [`stream`]: following a chat's visible messages, each exactly once, even when writers
//!   commit out of id order or the LISTEN connection drops (`chat tail --follow`).
//! - [`cli`]: `worker chat list|create|send|tail`.

pub mod agent;
pub mod cli;
pub mod stream;

pub use agent::{Agent, AgentCommand, AgentError, AgentEvent, AgentLimits, AgentTurn, MessageRole};
