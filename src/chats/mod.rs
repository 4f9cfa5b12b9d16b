//! Chats: AI agent conversations run as subprocesses (SPEC §7.1).
//!
//! The schema and the API tier's entry point, `post_chat_message(...)`, are in
//! `migrations/V3__chats.sql`. Three loops and one kind of long-lived task:
//!
//! - [`acquire`]: `chats_acquire` claims pending chats (SKIP LOCKED, generation + 1) and starts
//!   a runner for each.
//! - [`runner`]: one agent turn per chat, a supervised task; every write fenced by worker and
//!   generation.
//! - [`heartbeat`]: `chats_heartbeat`, the worker's lease (one write per tick whatever the
//!   number of chats) and the set difference between what runs here and what is ours.
//! - [`recover`]: `chats_recover` returns the chats of dead workers to `pending`.
//! - [`agent`]: the subprocess itself — spawn, bounded event lines, stderr tail, timeout and
//!   process-group interrupt. No database.
//! - [`config`]: `[chats]` and `[chats.runner]`; [`metrics`]: `chats.*`.

pub mod acquire;
pub mod agent;
pub mod config;
pub mod heartbeat;
pub mod metrics;
pub mod recover;
pub mod runner;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::Meter;

pub use agent::{Agent, AgentCommand, AgentError, AgentEvent, AgentLimits, AgentTurn, MessageRole};
pub use config::{ChatsConfig, RunnerConfig};

use self::metrics::ChatMetrics;
use self::runner::{RunnerContext, Runners};
use crate::runtime::Runtime;
use crate::workers::WorkerLease;

/// The chat loops of one process, sharing one registry of runners and one ownership lock.
pub struct ChatLoops {
    ctx: Arc<RunnerContext>,
    runners: Runners,
    ownership: Arc<tokio::sync::Mutex<()>>,
}

#[derive(Debug, thiserror::Error)]
#[error("chats.runner.command is empty: set the agent program, e.g. [\"python3\", \"scripts/demo-agent\"]")]
pub struct NoAgentCommand;

impl ChatLoops {
    /// Builds the loops on `rt` (its database, worker identity, lease state and supervisor).
    pub fn new(rt: &Runtime, config: ChatsConfig, meter: &Meter) -> Result<Self, NoAgentCommand> {
        let command = config.runner.agent_command().ok_or(NoAgentCommand)?;
        let agent = Agent::new(command, config.runner.limits());
        let runners: Runners = rt.supervisor().task_set("chat_runners");
        let metrics = ChatMetrics::new(meter, &runners);
        let ctx = Arc::new(RunnerContext {
            db: rt.db.clone(),
            worker_id: rt.worker().id,
            agent,
            config,
            metrics,
            lease: rt.lease(),
        });
        Ok(Self { ctx, runners, ownership: Arc::default() })
    }

    pub fn acquire(&self) -> acquire::Acquire {
        acquire::Acquire {
            ctx: self.ctx.clone(),
            runners: self.runners.clone(),
            ownership: self.ownership.clone(),
            after_claim: None,
        }
    }

    /// The heartbeat renews `lease` (which must publish to the runtime's lease state).
    pub fn heartbeat(&self, lease: WorkerLease) -> heartbeat::Heartbeat {
        heartbeat::Heartbeat {
            ctx: self.ctx.clone(),
            runners: self.runners.clone(),
            ownership: self.ownership.clone(),
            lease,
        }
    }

    /// Recovery; also deletes worker rows unseen for `retention`.
    pub fn recover(&self, retention: Duration) -> recover::Recover {
        recover::Recover { ctx: self.ctx.clone(), retention }
    }

    /// The chats running in this process.
    pub fn runners(&self) -> &Runners {
        &self.runners
    }
}
