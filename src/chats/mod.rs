//! Chats: AI agent conversations run as subprocesses (`docs/chats.md`).
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
//! - [`boundary`]: what the agent can reach of the worker: allow-listed environment, agent
//!   user, descriptors; the worker's own non-dumpable mark.
//! - [`limits`]: the agent's budgets (`[chats.runner.limits]` rlimits) and cgroup v2 detection.
//! - [`config`]: `[chats]` and `[chats.runner]`; [`metrics`]: `chats.*`.
//! - [`stream`]: following a chat's visible messages, each exactly once, even when writers
//!   commit out of id order or the LISTEN connection drops (`chat tail --follow`).
//! - [`cli`]: `worker chat list|create|send|tail|quota|queue`; [`queue`]: the quota and queue
//!   commands' SQL and output, and why a pending chat waits.

pub mod acquire;
pub mod admission;
pub mod agent;
pub mod boundary;
pub mod cli;
pub mod config;
pub mod guard;
pub mod heartbeat;
pub mod limits;
pub mod metrics;
pub mod queue;
pub mod recover;
pub mod runner;
pub mod stream;

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::Meter;

pub use agent::{Agent, AgentCommand, AgentError, AgentEvent, AgentLimits, AgentTurn, MessageRole};
pub use config::{ChatsConfig, RunnerConfig};

use self::boundary::AgentBoundary;
use self::metrics::ChatMetrics;
use self::runner::{ChatsContext, Runners};
use crate::runtime::Runtime;
use crate::workers::WorkerLease;

/// The chat loops of one process, sharing one registry of runners and one ownership lock.
pub struct ChatLoops {
    ctx: Arc<ChatsContext>,
    runners: Runners,
    ownership: Arc<tokio::sync::Mutex<()>>,
}

/// Why the chat loops cannot start with this configuration.
#[derive(Debug, thiserror::Error)]
pub enum NoAgentCommand {
    #[error(
        "chats.runner.command is empty: set the agent program, e.g. [\"python3\", \"scripts/demo-agent\"]"
    )]
    Empty,
    #[error("chats.runner.command: `{0}` is not an executable file (nor one on PATH)")]
    NotExecutable(String),
    #[error("chats.runner.user: {0}")]
    User(#[from] boundary::UserError),
    #[error(
        "chats.runner.user = {user}: only a worker running as root can start agents as another user \
         (this worker runs as uid {uid}); unset it to run agents as the worker's own user"
    )]
    CannotSwitchUser { user: String, uid: u32 },
    #[error(transparent)]
    Guard(#[from] guard::GuardError),
}

/// Whether `program` names an executable file, directly (with a `/`) or on `PATH`: checked at
/// start so a wrong path fails the deploy instead of putting every chat in `error`.
fn executable(program: &str) -> bool {
    use std::os::unix::fs::PermissionsExt;
    let is_executable = |path: &std::path::Path| {
        std::fs::metadata(path).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
    };
    if program.contains('/') {
        return is_executable(std::path::Path::new(program));
    }
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| is_executable(&dir.join(program))))
}

impl ChatLoops {
    /// Builds the loops on `rt` (its database, worker identity, lease state and supervisor) and
    /// starts the lease guard, `guard_program agent-guard` (`guard_program` is the `worker`
    /// binary: `std::env::current_exe()` in the daemon).
    pub async fn new(
        rt: &Runtime,
        config: ChatsConfig,
        meter: &Meter,
        guard_program: &std::path::Path,
    ) -> Result<Self, NoAgentCommand> {
        let command = config.runner.agent_command().ok_or(NoAgentCommand::Empty)?;
        if !executable(&command.program) {
            return Err(NoAgentCommand::NotExecutable(command.program));
        }
        let user = config.runner.agent_user()?;
        let euid = nix::unistd::geteuid();
        if let Some(user) = &user
            && !euid.is_root()
            && user.uid != euid
        {
            return Err(NoAgentCommand::CannotSwitchUser { user: user.name.clone(), uid: euid.as_raw() });
        }
        let worker_env = std::env::vars().collect();
        let boundary =
            AgentBoundary::new(&worker_env, &config.runner.env, &config.runner.pass_env, user.clone());
        rt.health.set_info(
            "agent_boundary",
            serde_json::json!({
                "user": user.as_ref().map_or_else(|| format!("{} (the worker's own)", euid), |u| u.name.clone()),
                "env": boundary.env().iter().map(|(name, _)| name.as_str()).collect::<Vec<_>>(),
            }),
        );
        let runs_as = match (&user, euid.is_root()) {
            (Some(_), _) => limits::RunsAs::AgentUser,
            (None, true) => limits::RunsAs::Root,
            (None, false) => limits::RunsAs::WorkerUser,
        };
        let mut resource_limits = config.runner.limits;
        if runs_as == limits::RunsAs::Root {
            // RLIMIT_NPROC does not bind root: not set, and not listed in errors as in force.
            resource_limits.processes = 0;
        }
        let agent = Agent::new(command, config.runner.limits())
            .with_boundary(boundary)
            .with_resource_limits(resource_limits);
        let cgroup = limits::CgroupSupport::detect();
        rt.health.set_info("agent_limits", limits::readyz_info(agent.resource_limits(), &cgroup, runs_as));
        let runners: Runners = rt.supervisor().task_set("chat_runners", runner::SHUTDOWN_CAUSE);
        let observed = runners.clone();
        let metrics = ChatMetrics::new(meter, move || observed.len());
        let ctx = Arc::new(ChatsContext {
            db: rt.db.clone(),
            worker_id: rt.worker().id,
            agent,
            config,
            metrics,
            lease: rt.lease(),
            guard: guard::LeaseGuard::start(guard_program).await?,
        });
        Ok(Self { ctx, runners, ownership: Arc::default() })
    }

    pub fn acquire(&self) -> acquire::Acquire {
        acquire::Acquire {
            ctx: self.ctx.clone(),
            runners: self.runners.clone(),
            ownership: self.ownership.clone(),
            last_census: std::sync::Mutex::default(),
            #[cfg(feature = "test-support")]
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_agent_program_must_be_an_executable_file_or_on_path() {
        assert!(executable("sh"), "found on PATH");
        assert!(executable("/bin/sh"));
        assert!(!executable("/nonexistent/agent"));
        assert!(!executable("no-such-agent-program-here"));
        let plain = tempfile::NamedTempFile::new().expect("temp file");
        let path = plain.path().to_string_lossy().into_owned();
        std::fs::set_permissions(plain.path(), std::os::unix::fs::PermissionsExt::from_mode(0o644))
            .expect("chmod");
        assert!(!executable(&path), "a file that is not executable");
    }
}
