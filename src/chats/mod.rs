//! Chats: AI agent conversations run as subprocesses (SPEC §7.1).
//!
//! The schema and the API tier's entry point, `post_chat_message(...)`, are in
//! `migrations/V3__chats.sql`. The loops (acquire, runner, heartbeat, recovery) build on:
//!
//! - [`agent`]: one agent turn as a subprocess — spawn, bounded event lines, stderr tail,
//!   timeout and process-group interrupt. No database: the runner fences and writes.

pub mod agent;

pub use agent::{Agent, AgentCommand, AgentError, AgentEvent, AgentLimits, AgentTurn, MessageRole};
