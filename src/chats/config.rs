//! `[chats]` and `[chats.runner]`: how many chats this worker runs, how it claims them, how it
//! proves it is alive, and how an agent turn is run and bounded.

use std::collections::BTreeMap;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::agent::{self, AgentCommand, AgentLimits};
use super::boundary::{self, AgentUser};
use super::limits::LimitsConfig;
use crate::runtime::{check_fallback, fallback_or};
use crate::validate::{Violation, check, positive};

pub const DEFAULT_MAX_RUNNING: u32 = 10;
/// Claims are serialised across replicas (the claim lock of `admission`), so a burst is filled
/// in few, larger claims: with 5 a claim, 150 free runners took 30 claims in a row and the last
/// light owner waited for all of them (BENCHMARKS.md, admission). One claim's plan reads at most
/// `limit` rows of any owner, so 25 costs a claim little more than 5.
pub const DEFAULT_MAX_PER_ACQUIRE: u32 = 25;
pub const DEFAULT_ACQUIRE_INTERVAL: Duration = Duration::from_secs(1);
/// While `chat_pending` wakes are known to be delivered: a pending chat whose NOTIFY was lost
/// (or that became admissible without one) waits at most this long.
pub const DEFAULT_ACQUIRE_FALLBACK_INTERVAL: Duration = Duration::from_secs(10);
/// A claim is one short transaction; starting the runners is in memory.
pub const DEFAULT_ACQUIRE_TICK_TIMEOUT: Duration = Duration::from_secs(10);
/// The lease is one row: renewing it every 30s costs one write per worker, whatever it runs.
pub const DEFAULT_HEARTBEAT_INTERVAL: Duration = Duration::from_secs(30);
/// Ten missed heartbeats: long enough to ride out a database failover, short enough that a
/// dead worker's chats resume within minutes.
pub const DEFAULT_STALE_AFTER: Duration = Duration::from_secs(300);
pub const DEFAULT_RECOVER_INTERVAL: Duration = Duration::from_secs(60);
/// Recovery returns up to a batch of chats and reaps dead workers' rows in one tick.
pub const DEFAULT_RECOVER_TICK_TIMEOUT: Duration = Duration::from_secs(30);
/// Slack between the instant every agent of a worker is dead and the earliest instant another
/// worker may recover its chats (the end of `stale_after` after the renewal's start): covers the
/// kernel delivering SIGKILL and the guard's wake-up.
pub const LEASE_MARGIN: Duration = Duration::from_secs(1);
/// A long conversation's recent part: far more than a model's context, bounded worker memory.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 8 << 20;
/// A very busy turn writes hundreds of messages; thousands is a loop.
pub const DEFAULT_MAX_OUTPUT_MESSAGES: u32 = 2_000;
pub const DEFAULT_MAX_OUTPUT_BYTES: usize = 64 << 20;

/// The order among those under their caps (`chats.admission`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Order {
    /// The fewest running (weighted) first, then the oldest wait.
    #[default]
    Fair,
    /// The oldest wait first, whoever the owner.
    Fifo,
}

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
    /// The acquire interval while the LISTEN connection is known to deliver `chat_pending`
    /// wakes (a turn's end wakes acquisition in process anyway); at least `acquire_interval`.
    /// Unset: 10 s, or `acquire_interval` if longer ([`ChatsConfig::acquire_fallback_interval`]).
    #[serde(default, with = "humantime_serde", skip_serializing_if = "Option::is_none")]
    pub acquire_fallback_interval: Option<Duration>,
    #[serde(with = "humantime_serde")]
    pub acquire_tick_timeout: Duration,
    #[serde(with = "humantime_serde")]
    pub heartbeat_interval: Duration,
    /// A worker whose lease is older than this is dead: its running chats go back to `pending`.
    #[serde(with = "humantime_serde")]
    pub stale_after: Duration,
    #[serde(with = "humantime_serde")]
    pub recover_interval: Duration,
    #[serde(with = "humantime_serde")]
    pub recover_tick_timeout: Duration,
    /// Running chats one owner may have at once over every replica; 0 = no cap. A
    /// `chat_quotas` row overrides it per owner.
    pub max_running_per_owner: u32,
    /// Running chats one org (`chats.org_id`) may have at once over every replica; 0 = no cap.
    pub max_running_per_org: u32,
    /// The order among chats under their caps: `fair` (the owner with the fewest running,
    /// weighted, first) or `fifo` (the oldest wait first).
    pub admission: Order,
    pub runner: RunnerConfig,
}

impl Default for ChatsConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            max_running: DEFAULT_MAX_RUNNING,
            max_per_acquire: DEFAULT_MAX_PER_ACQUIRE,
            acquire_interval: DEFAULT_ACQUIRE_INTERVAL,
            acquire_fallback_interval: None,
            acquire_tick_timeout: DEFAULT_ACQUIRE_TICK_TIMEOUT,
            heartbeat_interval: DEFAULT_HEARTBEAT_INTERVAL,
            stale_after: DEFAULT_STALE_AFTER,
            recover_interval: DEFAULT_RECOVER_INTERVAL,
            recover_tick_timeout: DEFAULT_RECOVER_TICK_TIMEOUT,
            max_running_per_owner: 0,
            max_running_per_org: 0,
            admission: Order::Fair,
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
    /// `[chats.runner.limits]`: rlimits of every agent process (see [`super::limits`]).
    pub limits: LimitsConfig,
    /// Largest input document: the newest messages that fit, older ones dropped (the document
    /// says how many).
    pub max_input_bytes: usize,
    /// Most messages (and titles) one turn may write; past it the turn ends `output_limit`.
    pub max_output_messages: u32,
    /// Most bytes of event lines one turn may write; past it the turn ends `output_limit`.
    pub max_output_bytes: usize,
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
            limits: LimitsConfig::default(),
            max_input_bytes: DEFAULT_MAX_INPUT_BYTES,
            max_output_messages: DEFAULT_MAX_OUTPUT_MESSAGES,
            max_output_bytes: DEFAULT_MAX_OUTPUT_BYTES,
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
                    "a variable name without `=` or NUL, other than CHAT_ID, CHAT_GENERATION and TRACEPARENT",
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
    /// The effective `acquire_fallback_interval`.
    pub fn acquire_fallback_interval(&self) -> Duration {
        fallback_or(self.acquire_fallback_interval, DEFAULT_ACQUIRE_FALLBACK_INTERVAL, self.acquire_interval)
    }

    /// Keys are relative to `[chats]`.
    pub fn validate(&self) -> Result<(), Violation> {
        check((1..=100_000).contains(&self.max_running), "max_running", self.max_running, "1..=100000")?;
        check(
            (1..=10_000).contains(&self.max_per_acquire),
            "max_per_acquire",
            self.max_per_acquire,
            "1..=10000",
        )?;
        // A cap is an int4 in the database (`chat_quotas.max_running`).
        for (key, cap) in [
            ("max_running_per_owner", self.max_running_per_owner),
            ("max_running_per_org", self.max_running_per_org),
        ] {
            check(cap <= 1_000_000, key, cap, "0 (no cap) ..= 1000000")?;
        }
        positive("acquire_interval", self.acquire_interval)?;
        check_fallback(
            "acquire_fallback_interval",
            self.acquire_fallback_interval,
            "acquire_interval",
            self.acquire_interval,
        )?;
        positive("acquire_tick_timeout", self.acquire_tick_timeout)?;
        positive("heartbeat_interval", self.heartbeat_interval)?;
        positive("recover_interval", self.recover_interval)?;
        positive("recover_tick_timeout", self.recover_tick_timeout)?;
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
        runner.limits.validate()?;
        check(
            (4096..=(1 << 30)).contains(&runner.max_input_bytes),
            "runner.max_input_bytes",
            runner.max_input_bytes,
            "4096..=1073741824",
        )?;
        check(
            (1..=1_000_000).contains(&runner.max_output_messages),
            "runner.max_output_messages",
            runner.max_output_messages,
            "1..=1000000",
        )?;
        check(
            (1024..=(1 << 34)).contains(&runner.max_output_bytes),
            "runner.max_output_bytes",
            runner.max_output_bytes,
            "1024..=17179869184",
        )?;
        runner.validate_boundary()
    }

    /// From the start of the last successful renewal, how long this worker's agents may keep
    /// running: `stale_after - kill_grace - LEASE_MARGIN`. At that instant the runners SIGTERM
    /// their agents (SIGKILL `kill_grace` later), so every agent is dead by
    /// `renewed_at + stale_after - LEASE_MARGIN`, before any other worker may judge the lease
    /// stale and run the chat again.
    pub fn agent_budget(&self) -> Duration {
        self.stale_after.saturating_sub(self.runner.kill_grace).saturating_sub(LEASE_MARGIN)
    }

    /// From the start of the last successful renewal, when the guard process SIGKILLs every
    /// agent of a worker that stopped extending its deadline (frozen): `stale_after -
    /// LEASE_MARGIN`.
    pub fn guard_budget(&self) -> Duration {
        self.stale_after.saturating_sub(LEASE_MARGIN)
    }

    /// The shortest `stale_after` for which one failed renewal does not stop this worker's
    /// agents: renewals start at most `interval × (1 + jitter) + tick timeout` apart (the
    /// heartbeat's tick timeout is its interval), so after a good renewal at R one that fails
    /// and one that succeeds end by `R + 2 × (interval × (1 + jitter) + tick timeout) + tick
    /// timeout`; the agents' budget (see [`ChatsConfig::agent_budget`]) must reach past it.
    pub fn min_stale_after(&self, jitter: f64) -> Duration {
        let interval = self.heartbeat_interval;
        let tick_timeout = self.heartbeat_interval;
        let spacing = interval.mul_f64(1.0 + jitter) + tick_timeout;
        spacing * 2 + tick_timeout + self.runner.kill_grace + LEASE_MARGIN
    }

    /// `stale_after` against [`ChatsConfig::min_stale_after`], with the sum in the error. Key
    /// relative to `[chats]`.
    pub fn check_lease_margin(&self, jitter: f64) -> Result<(), Violation> {
        let needed = self.min_stale_after(jitter);
        if self.stale_after >= needed {
            return Ok(());
        }
        let h = humantime::format_duration(self.heartbeat_interval);
        let g = humantime::format_duration(self.runner.kill_grace);
        Err(Violation::new(
            "stale_after",
            format!(
                "{} is too short: a worker's agents must be dead before its lease can be judged stale, \
                 and one failed renewal must not stop them; needed 2 × (heartbeat_interval {h} × \
                 (1 + runtime.jitter {jitter}) + heartbeat tick timeout {h}) + tick timeout {h} + \
                 runner.kill_grace {g} + margin {} = {}",
                humantime::format_duration(self.stale_after),
                humantime::format_duration(LEASE_MARGIN),
                humantime::format_duration(Duration::from_millis(needed.as_millis() as u64)),
            ),
            "a longer stale_after, or a shorter heartbeat_interval or runner.kill_grace",
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_default_to_none_and_a_cap_past_an_int4_quota_is_refused_by_its_key() {
        let config = ChatsConfig::default();
        assert_eq!((config.max_running_per_owner, config.max_running_per_org), (0, 0));
        assert_eq!(config.admission, Order::Fair);
        let owner = ChatsConfig { max_running_per_owner: 1_000_001, ..ChatsConfig::default() };
        assert_eq!(owner.validate().expect_err("too large").key, "max_running_per_owner");
        let org = ChatsConfig { max_running_per_org: 1_000_001, ..ChatsConfig::default() };
        assert_eq!(org.validate().expect_err("too large").key, "max_running_per_org");
        let fine = ChatsConfig {
            max_running_per_owner: 5,
            max_running_per_org: 1_000_000,
            ..ChatsConfig::default()
        };
        assert_eq!(fine.validate(), Ok(()));
    }

    #[test]
    fn the_defaults_leave_room_for_one_failed_renewal() {
        let config = ChatsConfig::default();
        // 2 × (30s × 1.1 + 30s) + 30s + 10s + 1s.
        assert_eq!(config.min_stale_after(0.1), Duration::from_secs(167));
        assert_eq!(config.check_lease_margin(0.1), Ok(()));
        assert_eq!(config.agent_budget(), Duration::from_secs(289));
        assert_eq!(config.guard_budget(), Duration::from_secs(299));
    }

    #[test]
    fn a_stale_after_too_short_for_the_guarantee_is_refused_with_the_sum() {
        let mut config = ChatsConfig { heartbeat_interval: Duration::from_secs(1), ..ChatsConfig::default() };
        config.runner.kill_grace = Duration::from_secs(2);
        config.stale_after = Duration::from_secs(3);
        let error = config.check_lease_margin(0.0).expect_err("too short");
        assert_eq!(error.key, "stale_after");
        assert!(error.problem.contains("= 8s"), "{}", error.problem);
        config.stale_after = Duration::from_secs(8);
        assert_eq!(config.check_lease_margin(0.0), Ok(()));
    }
}
