//! `[chats]` and `[chats.runner]`: how many chats this worker runs, how it claims them, how it
//! proves it is alive, and how an agent turn is run and bounded.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::agent::{self, AgentCommand, AgentLimits};
use super::boundary::{self, AgentUser};
use crate::config::{Violation, check, positive};

pub const DEFAULT_MAX_RUNNING: u32 = 10;
pub const DEFAULT_MAX_PER_ACQUIRE: u32 = 5;
pub const DEFAULT_ACQUIRE_INTERVAL: Duration = Duration::from_secs(1);
/// The lease is one row: renewing it every 30s costs one write per worker, whatever it runs.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Ten missed heartbeats: long enough to ride out a database failover, short enough that a
/// dead worker's chats resume within minutes.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(300);
pub const DEFAULT_RECOVER_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ChatsConfig {
    pub enabled: bool,
    /// Agent subprocesses this worker runs at most at once.
    pub max_running: u32,
    /// Chats claimed by one acquire tick at most.
    pub max_per_acquire: u32,
    #[serde(with = "humantime_serde")]
    pub acquire_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A worker whose lease is older than this is dead: its running chats go back to `pending`.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    #[serde(with = "humantime_serde")]
    pub recover_interval: Duration,
    pub runner: RunnerConfig,
}

impl Default for ChatsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_running: DEFAULT_MAX_RUNNING,
            max_per_acquire: DEFAULT_MAX_PER_ACQUIRE,
            acquire_interval: DEFAULT_ACQUIRE_INTERVAL,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            stale_after: DEFAULT_STALE_AFTER,
            recover_interval: DEFAULT_RECOVER_INTERVAL,
            runner: RunnerConfig::default(),
        }
    }
}

/// `[chats.runner]`: the agent program and the bounds of one turn.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct RunnerConfig {
    /// The agent as an argument vector (no shell), e.g. `["python3", "scripts/demo-agent"]`.
    pub command: Vec<String>,
    #[serde(with = "humantime_serde")]
    pub turn_timeout: Duration,
    /// Between SIGTERM and SIGKILL when a turn is interrupted.
    #[serde(with = "humantime_serde")]
    pub kill_grace: Duration,
    /// Longest stdout line (one event) accepted from the agent.
    pub max_line_bytes: usize,
    /// Variables set in the agent's environment (on top of PATH, HOME, LANG, TZ, CHAT_ID and
    /// CHAT_GENERATION; a name here overrides the worker's value of PATH, HOME, LANG or TZ).
    pub env: BTreeMap<String, String>,
    /// Names of the worker's own environment variables copied into the agent's (absent ones are
    /// skipped). The worker's secrets are refused (see [`boundary::refused_pass_env`]).
    pub pass_env: Vec<String>,
    /// Run the agent as this user (name or uid) and its primary group; never root. Unset: the
    /// worker's own user.
    pub user: Option<String>,
}

impl Default for RunnerConfig {
    fn default() -> Self {
        Self {
            command: Vec::new(),
            turn_timeout: agent::DEFAULT_TURN_TIMEOUT,
            kill_grace: agent::DEFAULT_KILL_GRACE,
            max_line_bytes: agent::DEFAULT_MAX_LINE_BYTES,
            env: BTreeMap::new(),
            pass_env: Vec::new(),
            user: None,
        }
    }
}

impl RunnerConfig {
    /// `env`, `pass_env` and `user`; keys relative to `[chats]`.
    fn validate_boundary(&self) -> Result<(), Violation> {
        for (name, value) in &self.env {
            if let Some(reason) = boundary::invalid_env_name(name) {
                return Err(Violation::new(
                    &format!("runner.env.{name}"),
                    format!("cannot be set: {reason}"),
                    "a variable name without `=` or NUL, other than CHAT_ID and CHAT_GENERATION",
                ));
            }
            if value.contains('\0') {
                return Err(Violation::new(
                    &format!("runner.env.{name}"),
                    "the value holds NUL",
                    "text without NUL",
                ));
            }
        }
        for (index, name) in self.pass_env.iter().enumerate() {
            let refused = boundary::refused_pass_env(name).or_else(|| boundary::invalid_env_name(name));
            if let Some(reason) = refused {
                return Err(Violation::new(
                    &format!("runner.pass_env.{index}"),
                    format!("refused: {name} is {reason}"),
                    "names of variables the agent may see (never DATABASE_URL, REDIS_URL, WORKER__*, OTEL_*HEADERS)",
                ));
            }
        }
        if let Some(user) = &self.user {
            AgentUser::resolve(user).map_err(|error| {
                Violation::new(
                    "runner.user",
                    error.to_string(),
                    "an existing user other than root (name or uid)",
                )
            })?;
        }
        Ok(())
    }

    /// The agent's user, resolved (validated at load, so a failure here is a user removed since).
    pub fn agent_user(&self) -> Result<Option<AgentUser>, boundary::UserError> {
        self.user.as_deref().map(AgentUser::resolve).transpose()
    }

    /// The command, if one is configured.
    pub fn agent_command(&self) -> Option<AgentCommand> {
        AgentCommand::try_from(self.command.clone()).ok()
    }

    pub fn limits(&self) -> AgentLimits {
        AgentLimits {
            turn_timeout: self.turn_timeout,
            kill_grace: self.kill_grace,
            max_line_bytes: self.max_line_bytes,
            ..AgentLimits::default()
        }
    }
}

impl ChatsConfig {
    /// Keys are relative to `[chats]`.
    pub fn validate(&self) -> Result<(), Violation> {
        check((1..=100_000).contains(&self.max_running), "max_running", self.max_running, "1..=100000")?;
        check(
            (1..=10_000).contains(&self.max_per_acquire),
            "max_per_acquire",
            self.max_per_acquire,
            "1..=10000",
        )?;
        positive("acquire_interval", self.acquire_interval)?;
        positive("heartbeat_interval", self.heartbeat_interval)?;
        positive("recover_interval", self.recover_interval)?;
        check(
            self.stale_after > self.heartbeat_interval,
            "stale_after",
            humantime::format_duration(self.stale_after),
            "more than chats.heartbeat_interval (a live worker must renew its lease before it goes stale)",
        )?;
        let runner = &self.runner;
        if self.enabled {
            check(
                runner.agent_command().is_some(),
                "runner.command",
                format!("{:?}", runner.command),
                "an argument vector with the agent program first, e.g. [\"python3\", \"scripts/demo-agent\"]",
            )?;
        }
        positive("runner.turn_timeout", runner.turn_timeout)?;
        positive("runner.kill_grace", runner.kill_grace)?;
        check(
            (1024..=(64 << 20)).contains(&runner.max_line_bytes),
            "runner.max_line_bytes",
            runner.max_line_bytes,
            "1024..=67108864",
        )?;
        runner.validate_boundary()
    }

    /// How long heartbeats may fail before this worker stops its own runners: after that,
    /// another replica may already have recovered them.
    pub fn lease_tolerance(&self) -> Duration {
        self.stale_after.saturating_sub(self.heartbeat_interval)
    }
}
