//! Budgets of an agent, `[chats.runner.limits]`: resource limits set in the forked child before
//! exec, how a turn that ran into one is described, and whether this worker's cgroup could bound
//! the agent as a whole.
//!
//! | key          | rlimit          | default | what it bounds                                    |
//! |--------------|-----------------|---------|---------------------------------------------------|
//! | `memory`     | `RLIMIT_AS`     | 8 GiB   | address space of each process, in bytes           |
//! | `cpu`        | `RLIMIT_CPU`    | 30m     | CPU time of each process, whole seconds           |
//! | `open_files` | `RLIMIT_NOFILE` | 4096    | descriptors open at once in each process          |
//! | `processes`  | `RLIMIT_NPROC`  | 1024    | processes (and threads) of the agent's real uid   |
//! | `file_size`  | `RLIMIT_FSIZE`  | 4 GiB   | size of any file a process writes, in bytes       |
//!
//! `0` (`"0s"` for `cpu`) leaves a resource as the worker has it. Soft and hard limits are set to
//! the same value (the agent cannot raise them), except `cpu`: SIGXCPU at the limit, SIGKILL
//! [`CPU_KILL_AFTER`] later for a process that handles SIGXCPU. A value above the worker's own
//! hard limit is capped to it ([`LimitsConfig::effective`]), so setting the limits never fails a
//! spawn.
//!
//! What rlimits do not do: they are per process (each process an agent starts gets its own
//! `memory` and `cpu` budget; `processes` caps how many there are), and `RLIMIT_NPROC` counts
//! every process and thread of the real uid on the machine, not of one agent. It is a per-agent
//! bound only when `chats.runner.user` is set (and then all agents of the worker share it), root
//! ignores it (an agent of a root worker without `chats.runner.user` has no process limit), and
//! an agent running as the worker's own non-root user shares it with the worker's threads.
//!
//! cgroup v2 would bound the agent as a whole (`memory.max`, `pids.max` on a leaf per agent).
//! [`CgroupSupport::detect`] finds out whether the worker's cgroup is v2 and delegated to it; the
//! per-agent leaf itself is not implemented, so rlimits are what is enforced either way, and
//! `/readyz` (`agent_limits`) says so together with what detection found.

use std::fmt;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nix::sys::resource::{Resource, getrlimit, rlim_t, setrlimit};
use serde::{Deserialize, Serialize};

use crate::validate::{Violation, check};

/// Enough for a compiler or a test suite, far from what a runaway allocation reaches.
pub const DEFAULT_MEMORY: u64 = 8 << 30;
/// As long as the default turn: a process spinning for a whole turn is stuck.
pub const DEFAULT_CPU: Duration = Duration::from_secs(30 * 60);
pub const DEFAULT_OPEN_FILES: u64 = 4096;
pub const DEFAULT_PROCESSES: u64 = 1024;
pub const DEFAULT_FILE_SIZE: u64 = 4 << 30;
/// Between SIGXCPU (the `cpu` limit) and SIGKILL (the hard limit): time for a process that
/// handles SIGXCPU to save its work.
pub const CPU_KILL_AFTER: Duration = Duration::from_secs(5);

/// The full key of the table, as `config check` names it.
const TABLE: &str = "chats.runner.limits";

const KIB: u64 = 1 << 10;
const MIB: u64 = 1 << 20;
const GIB: u64 = 1 << 30;

/// One of the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limit {
    Memory,
    Cpu,
    OpenFiles,
    Processes,
    FileSize,
}

impl Limit {
    pub const ALL: [Limit; 5] =
        [Limit::Memory, Limit::Cpu, Limit::OpenFiles, Limit::Processes, Limit::FileSize];

    /// The key in `[chats.runner.limits]`.
    pub fn name(self) -> &'static str {
        match self {
            Limit::Memory => "memory",
            Limit::Cpu => "cpu",
            Limit::OpenFiles => "open_files",
            Limit::Processes => "processes",
            Limit::FileSize => "file_size",
        }
    }

    fn resource(self) -> Resource {
        match self {
            Limit::Memory => Resource::RLIMIT_AS,
            Limit::Cpu => Resource::RLIMIT_CPU,
            Limit::OpenFiles => Resource::RLIMIT_NOFILE,
            Limit::Processes => Resource::RLIMIT_NPROC,
            Limit::FileSize => Resource::RLIMIT_FSIZE,
        }
    }

    /// The smallest value accepted other than 0: below it no agent could even start.
    fn minimum(self) -> u64 {
        match self {
            Limit::Memory => 16 * MIB,
            Limit::Cpu => 1,
            Limit::OpenFiles => 16,
            Limit::Processes => 8,
            Limit::FileSize => MIB,
        }
    }

    /// The signal the kernel sends a process that reaches this limit, for those that have one.
    fn signal(self) -> Option<i32> {
        match self {
            Limit::Cpu => Some(nix::libc::SIGXCPU),
            Limit::FileSize => Some(nix::libc::SIGXFSZ),
            Limit::Memory | Limit::OpenFiles | Limit::Processes => None,
        }
    }

    fn what(self) -> &'static str {
        match self {
            Limit::Memory => "address space",
            Limit::Cpu => "CPU time",
            Limit::OpenFiles => "open files",
            Limit::Processes => "processes",
            Limit::FileSize => "file size",
        }
    }
}

/// `[chats.runner.limits]`. `0` (`"0s"`) = not limited.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Address space of each agent process in bytes (`RLIMIT_AS`).
    pub memory: u64,
    /// CPU time of each agent process, whole seconds (`RLIMIT_CPU`).
    #[serde(with = "humantime_serde")]
    pub cpu: Duration,
    /// Descriptors per process (`RLIMIT_NOFILE`).
    pub open_files: u64,
    /// Processes and threads of the agent's real uid (`RLIMIT_NPROC`; root is exempt).
    pub processes: u64,
    /// Largest file a process may write, in bytes (`RLIMIT_FSIZE`).
    pub file_size: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            memory: DEFAULT_MEMORY,
            cpu: DEFAULT_CPU,
            open_files: DEFAULT_OPEN_FILES,
            processes: DEFAULT_PROCESSES,
            file_size: DEFAULT_FILE_SIZE,
        }
    }
}

impl LimitsConfig {
    /// Nothing limited: the agent gets the worker's own limits.
    pub const NONE: LimitsConfig =
        LimitsConfig { memory: 0, cpu: Duration::ZERO, open_files: 0, processes: 0, file_size: 0 };

    /// The value of `limit` in its rlimit unit (seconds for `cpu`); 0 = not limited.
    pub fn value(&self, limit: Limit) -> u64 {
        match limit {
            Limit::Memory => self.memory,
            Limit::Cpu => self.cpu.as_secs(),
            Limit::OpenFiles => self.open_files,
            Limit::Processes => self.processes,
            Limit::FileSize => self.file_size,
        }
    }

    fn set(&mut self, limit: Limit, value: u64) {
        match limit {
            Limit::Memory => self.memory = value,
            Limit::Cpu => self.cpu = Duration::from_secs(value),
            Limit::OpenFiles => self.open_files = value,
            Limit::Processes => self.processes = value,
            Limit::FileSize => self.file_size = value,
        }
    }

    /// The limits that are set (non-zero), in table order.
    pub fn in_force(&self) -> impl Iterator<Item = Limit> + '_ {
        Limit::ALL.into_iter().filter(|limit| self.value(*limit) != 0)
    }

    pub fn is_unlimited(&self) -> bool {
        self.in_force().next().is_none()
    }

    /// `limit`'s value as an operator writes it: `256 MiB`, `30m`, `4096`.
    pub fn shown(&self, limit: Limit) -> String {
        match limit {
            Limit::Memory | Limit::FileSize => bytes(self.value(limit)),
            Limit::Cpu => humantime::format_duration(self.cpu).to_string(),
            Limit::OpenFiles | Limit::Processes => self.value(limit).to_string(),
        }
    }

    /// Keys relative to `[chats]`, like the rest of `ChatsConfig::validate`.
    pub fn validate(&self) -> Result<(), Violation> {
        for limit in [Limit::Memory, Limit::OpenFiles, Limit::Processes, Limit::FileSize] {
            let value = self.value(limit);
            let minimum = limit.minimum();
            let minimum_shown = match limit {
                Limit::Memory | Limit::FileSize => format!("{minimum} ({})", bytes(minimum)),
                _ => minimum.to_string(),
            };
            check(
                value == 0 || value >= minimum,
                &format!("runner.limits.{}", limit.name()),
                value,
                &format!("0 (not limited) or at least {minimum_shown}"),
            )?;
        }
        check(
            self.cpu.is_zero() || (self.cpu >= Duration::from_secs(1) && self.cpu.subsec_nanos() == 0),
            "runner.limits.cpu",
            humantime::format_duration(self.cpu),
            "\"0s\" (not limited) or a whole number of seconds, at least \"1s\" (RLIMIT_CPU counts seconds)",
        )
    }

    /// The limits an agent gets: each capped at the worker's own hard limit, which an
    /// unprivileged worker cannot raise (and root cannot raise `open_files` past `fs.nr_open`).
    /// Read from the worker's limits now; call it once, at start.
    #[must_use]
    pub fn effective(&self) -> LimitsConfig {
        let mut effective = *self;
        for limit in self.in_force() {
            if let Ok((_, hard)) = getrlimit(limit.resource())
                && hard < self.value(limit)
            {
                effective.set(limit, hard.max(1));
            }
        }
        effective
    }

    /// What the child sets before exec, prepared here so that it only makes syscalls.
    pub fn rlimits(&self) -> Rlimits {
        let mut entries = [None; 5];
        for (slot, limit) in entries.iter_mut().zip(self.in_force()) {
            let value = self.value(limit) as rlim_t;
            let hard = match limit {
                Limit::Cpu => value.saturating_add(CPU_KILL_AFTER.as_secs()),
                _ => value,
            };
            // Never above the worker's own hard limit (for `cpu`, the one value that exceeds it).
            let hard = match getrlimit(limit.resource()) {
                Ok((_, worker_hard)) => hard.min(worker_hard).max(value),
                Err(_) => hard,
            };
            *slot = Some((limit.resource(), value, hard));
        }
        Rlimits { entries }
    }

    /// The limit that killed a process exiting with `status`, when its signal says so and the
    /// limit was in force: SIGXCPU is `cpu`, SIGXFSZ is `file_size`. (The other limits make a
    /// call fail instead of sending a signal; the agent then dies in its own way.)
    pub fn ended_by(&self, status: &ExitStatus) -> Option<Limit> {
        let signal = status.signal()?;
        self.in_force().find(|limit| limit.signal() == Some(signal))
    }

    /// What to say after "agent was killed by signal …" / "agent exited with code …" so that
    /// the reader can tell whether a limit ended it: the limit named by the signal, or (a
    /// shell's `128 + signal` exit code) the one it probably was, or else every limit in force.
    pub fn explain(&self, status: &ExitStatus) -> String {
        if let Some(limit) = self.ended_by(status) {
            return format!(
                ": it reached its {} limit, {TABLE}.{} = {}",
                limit.what(),
                limit.name(),
                self.shown(limit)
            );
        }
        let reported = status.code().and_then(|code| code.checked_sub(128));
        if let Some(limit) =
            self.in_force().find(|limit| limit.signal().is_some() && limit.signal() == reported)
        {
            let signal = nix::sys::signal::Signal::try_from(reported.unwrap_or_default())
                .map_or_else(|_| "a signal".to_owned(), |s| s.to_string());
            return format!(
                " (128 + {signal}, as a shell reports a command killed by it: probably the {} limit, \
                 {TABLE}.{} = {}; {})",
                limit.what(),
                limit.name(),
                self.shown(limit),
                self.summary()
            );
        }
        format!("; {}", self.summary())
    }

    /// `limits: memory 256 MiB (chats.runner.limits.memory), cpu 30m (chats.runner.limits.cpu),
    /// …`: every limit in force, named by its key.
    pub fn summary(&self) -> String {
        if self.is_unlimited() {
            return "no limits in force".to_owned();
        }
        let each: Vec<String> = self
            .in_force()
            .map(|limit| format!("{} {} ({TABLE}.{})", limit.name(), self.shown(limit), limit.name()))
            .collect();
        format!("limits: {}", each.join(", "))
    }
}

/// `1 GiB`, `256 MiB`, `3 KiB` when exact, else the bytes.
fn bytes(n: u64) -> String {
    match n {
        0 => "0".to_owned(),
        n if n % GIB == 0 => format!("{} GiB", n / GIB),
        n if n % MIB == 0 => format!("{} MiB", n / MIB),
        n if n % KIB == 0 => format!("{} KiB", n / KIB),
        n => format!("{n} bytes"),
    }
}

/// The rlimits of one agent, ready for the child.
#[derive(Debug, Clone, Copy)]
pub struct Rlimits {
    entries: [Option<(Resource, rlim_t, rlim_t)>; 5],
}

impl Rlimits {
    /// In the forked child before exec: one `setrlimit` per limit in force. Async-signal-safe:
    /// no allocation (the error is a raw errno).
    pub fn apply(&self) -> io::Result<()> {
        for (resource, soft, hard) in self.entries.iter().flatten() {
            setrlimit(*resource, *soft, *hard)?;
        }
        Ok(())
    }
}

/// Who the agent runs as, for what `processes` means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunsAs {
    /// `chats.runner.user`: all agents of this worker share that user's count.
    AgentUser,
    /// The worker is root and no `chats.runner.user` is set: RLIMIT_NPROC does not apply.
    Root,
    /// The worker's own non-root user: shared with the worker's threads.
    WorkerUser,
}

/// `/readyz` info `agent_limits`: what is enforced, by what, and what detection found.
pub fn readyz_info(limits: &LimitsConfig, cgroup: &CgroupSupport, runs_as: RunsAs) -> serde_json::Value {
    let processes = match (runs_as, limits.processes) {
        (RunsAs::Root, _) => "not enforced: agents run as root, which RLIMIT_NPROC does not bound",
        (_, 0) => "not limited",
        (RunsAs::AgentUser, _) => {
            "counts every process of the agent user (all agents of this worker together)"
        }
        (RunsAs::WorkerUser, _) => {
            "counts every process and thread of the worker's user, the worker's included"
        }
    };
    serde_json::json!({
        "enforced_by": cgroup.enforced_by(),
        "memory": limits.memory,
        "cpu": humantime::format_duration(limits.cpu).to_string(),
        "open_files": limits.open_files,
        "processes": limits.processes,
        "file_size": limits.file_size,
        "summary": limits.summary(),
        "processes_scope": processes,
        "cgroup_v2": cgroup.to_string(),
    })
}

/// Whether this worker's cgroup could hold a leaf per agent with `memory.max` and `pids.max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CgroupSupport {
    /// No usable cgroup v2 hierarchy (v1 or hybrid, not mounted, unreadable).
    Unavailable(String),
    /// cgroup v2, but the worker cannot create leaves with both controllers under `dir`.
    NotDelegated { dir: PathBuf, reason: String },
    /// cgroup v2, `dir` writable by the worker, `memory` and `pids` available to its children.
    Delegated { dir: PathBuf },
}

impl fmt::Display for CgroupSupport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CgroupSupport::Unavailable(reason) => write!(f, "not available: {reason}"),
            CgroupSupport::NotDelegated { dir, reason } => {
                write!(f, "{} is cgroup v2 but not delegated to the worker: {reason}", dir.display())
            }
            CgroupSupport::Delegated { dir } => write!(
                f,
                "{} is cgroup v2 and delegated (memory, pids); a leaf per agent is not implemented, \
                 the rlimits apply",
                dir.display()
            ),
        }
    }
}

impl CgroupSupport {
    /// Looks at this process's cgroup (`/proc/self/cgroup`, `/proc/self/mountinfo`, the
    /// cgroup's `cgroup.controllers` and write access).
    pub fn detect() -> Self {
        let read = |path: &str| std::fs::read_to_string(path);
        match (read("/proc/self/cgroup"), read("/proc/self/mountinfo")) {
            (Ok(cgroup), Ok(mountinfo)) => assess(&cgroup, &mountinfo, &RealFs),
            (Err(error), _) | (_, Err(error)) => {
                CgroupSupport::Unavailable(format!("cannot read this process's cgroup: {error}"))
            }
        }
    }

    /// What enforces the limits: `rlimit` (the per-agent cgroup leaf is not implemented).
    pub fn enforced_by(&self) -> &'static str {
        "rlimit"
    }
}

/// File access [`assess`] needs, so it can be tested on fixtures.
trait CgroupFs {
    fn read(&self, path: &Path) -> io::Result<String>;
    fn writable(&self, path: &Path) -> bool;
}

struct RealFs;

impl CgroupFs for RealFs {
    fn read(&self, path: &Path) -> io::Result<String> {
        std::fs::read_to_string(path)
    }

    fn writable(&self, path: &Path) -> bool {
        nix::unistd::access(path, nix::unistd::AccessFlags::W_OK).is_ok()
    }
}

/// The controllers cgroup v2 needs for a per-agent leaf.
const NEEDED: [&str; 2] = ["memory", "pids"];

/// The decision of [`CgroupSupport::detect`], from the contents of `/proc/self/cgroup` and
/// `/proc/self/mountinfo`.
fn assess(proc_cgroup: &str, mountinfo: &str, fs: &impl CgroupFs) -> CgroupSupport {
    let membership = parse_proc_cgroup(proc_cgroup);
    let on_v1: Vec<&str> =
        NEEDED.into_iter().filter(|c| membership.v1_controllers.iter().any(|v| v == c)).collect();
    if !on_v1.is_empty() {
        return CgroupSupport::Unavailable(format!(
            "cgroup v1 or hybrid: {} on a v1 hierarchy",
            on_v1.join(" and ")
        ));
    }
    let Some(path) = membership.unified else {
        return CgroupSupport::Unavailable("this process is in no cgroup v2 hierarchy".to_owned());
    };
    let Some(mount) = cgroup2_mount(mountinfo) else {
        return CgroupSupport::Unavailable("no cgroup2 file system is mounted".to_owned());
    };
    let Some(relative) = under_root(&path, &mount.root) else {
        return CgroupSupport::Unavailable(format!(
            "this process's cgroup {path} is outside the cgroup2 mount's root {}",
            mount.root
        ));
    };
    let dir = if relative.is_empty() { mount.point.clone() } else { mount.point.join(relative) };
    let controllers = match fs.read(&dir.join("cgroup.controllers")) {
        Ok(text) => text,
        Err(error) => {
            let reason = format!("cannot read cgroup.controllers: {error}");
            return CgroupSupport::NotDelegated { dir, reason };
        }
    };
    let available: Vec<&str> = controllers.split_whitespace().collect();
    let missing: Vec<&str> = NEEDED.into_iter().filter(|c| !available.contains(c)).collect();
    if !missing.is_empty() {
        let reason = format!(
            "{} not available to child cgroups (cgroup.controllers: {:?})",
            missing.join(" and "),
            controllers.trim()
        );
        return CgroupSupport::NotDelegated { dir, reason };
    }
    let targets = [dir.clone(), dir.join("cgroup.procs"), dir.join("cgroup.subtree_control")];
    if let Some(locked) = targets.iter().find(|path| !fs.writable(path)) {
        let reason = format!("{} is not writable by the worker", locked.display());
        return CgroupSupport::NotDelegated { dir, reason };
    }
    CgroupSupport::Delegated { dir }
}

/// `/proc/self/cgroup`: the cgroup v2 path (the `0::` line) and the controllers bound to v1
/// hierarchies.
#[derive(Debug, Default, PartialEq, Eq)]
struct Membership {
    unified: Option<String>,
    v1_controllers: Vec<String>,
}

fn parse_proc_cgroup(text: &str) -> Membership {
    let mut membership = Membership::default();
    for line in text.lines() {
        let mut fields = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (fields.next(), fields.next(), fields.next()) else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            membership.unified = Some(path.to_owned());
        } else {
            membership.v1_controllers.extend(
                controllers
                    .split(',')
                    .filter(|c| !c.is_empty() && !c.starts_with("name="))
                    .map(str::to_owned),
            );
        }
    }
    membership
}

/// Where the cgroup2 file system is mounted, and which cgroup is its root.
#[derive(Debug, PartialEq, Eq)]
struct Mount {
    root: String,
    point: PathBuf,
}

/// The first cgroup2 mount in `/proc/self/mountinfo` (`id parent dev root point options
/// [optional…] - fstype source super-options`).
fn cgroup2_mount(mountinfo: &str) -> Option<Mount> {
    mountinfo.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        let separator = fields.iter().position(|f| *f == "-")?;
        if fields.get(separator + 1) != Some(&"cgroup2") || separator < 6 {
            return None;
        }
        Some(Mount { root: unescape(fields[3]), point: PathBuf::from(unescape(fields[4])) })
    })
}

/// mountinfo escapes space, tab, newline and backslash as `\ooo`.
fn unescape(field: &str) -> String {
    let mut out = Vec::with_capacity(field.len());
    let bytes = field.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let octal = bytes
            .get(i + 1..i + 4)
            .filter(|d| bytes[i] == b'\\' && d.iter().all(|b| (b'0'..=b'7').contains(b)));
        match octal {
            Some(d) => {
                out.push((d[0] - b'0') * 64 + (d[1] - b'0') * 8 + (d[2] - b'0'));
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// `path` relative to `root` (both absolute cgroup paths), without a leading `/`; `None` when
/// `path` is not under `root`.
fn under_root<'a>(path: &'a str, root: &str) -> Option<&'a str> {
    let root = root.trim_end_matches('/');
    let rest = path.strip_prefix(root)?;
    if rest.is_empty() || rest.starts_with('/') { Some(rest.trim_start_matches('/')) } else { None }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;

    #[test]
    fn defaults_are_valid_and_documented_values() {
        let limits = LimitsConfig::default();
        assert_eq!(limits.validate(), Ok(()));
        assert_eq!(LimitsConfig::NONE.validate(), Ok(()));
        assert!(LimitsConfig::NONE.is_unlimited());
        assert_eq!(
            limits.summary(),
            "limits: memory 8 GiB (chats.runner.limits.memory), cpu 30m (chats.runner.limits.cpu), \
             open_files 4096 (chats.runner.limits.open_files), processes 1024 \
             (chats.runner.limits.processes), file_size 4 GiB (chats.runner.limits.file_size)"
        );
    }

    #[test]
    fn validation_names_the_key_and_zero_means_not_limited() {
        let key = |limits: LimitsConfig| limits.validate().expect_err("invalid").key;
        let none = LimitsConfig::NONE;
        assert_eq!(key(LimitsConfig { memory: 1024, ..none }), "runner.limits.memory");
        assert_eq!(key(LimitsConfig { open_files: 3, ..none }), "runner.limits.open_files");
        assert_eq!(key(LimitsConfig { processes: 1, ..none }), "runner.limits.processes");
        assert_eq!(key(LimitsConfig { file_size: 10, ..none }), "runner.limits.file_size");
        assert_eq!(key(LimitsConfig { cpu: Duration::from_millis(1500), ..none }), "runner.limits.cpu");
        assert_eq!(key(LimitsConfig { cpu: Duration::from_millis(500), ..none }), "runner.limits.cpu");
        let error = LimitsConfig { memory: 1024, ..none }.validate().expect_err("invalid");
        assert!(error.expected.contains("16777216 (16 MiB)"), "{error:?}");
        let small = LimitsConfig {
            memory: 16 * MIB,
            cpu: Duration::from_secs(1),
            open_files: 16,
            processes: 8,
            file_size: MIB,
        };
        assert_eq!(small.validate(), Ok(()));
    }

    #[test]
    fn the_limits_parse_from_toml_with_a_duration_for_cpu() {
        let limits: LimitsConfig =
            toml::from_str("memory = 268435456\ncpu = \"90s\"\nprocesses = 0").expect("parses");
        assert_eq!(
            limits,
            LimitsConfig {
                memory: 256 * MIB,
                cpu: Duration::from_secs(90),
                processes: 0,
                ..LimitsConfig::default()
            }
        );
        assert!(toml::from_str::<LimitsConfig>("stack = 1").is_err(), "unknown keys are refused");
    }

    #[test]
    fn values_are_shown_as_written() {
        assert_eq!(bytes(256 * MIB), "256 MiB");
        assert_eq!(bytes(3 * KIB), "3 KiB");
        assert_eq!(bytes(1000), "1000 bytes");
        let limits = LimitsConfig { cpu: Duration::from_secs(90), ..LimitsConfig::NONE };
        assert_eq!(limits.shown(Limit::Cpu), "1m 30s");
        assert_eq!(limits.summary(), "limits: cpu 1m 30s (chats.runner.limits.cpu)");
        assert_eq!(LimitsConfig::NONE.summary(), "no limits in force");
    }

    #[test]
    fn the_signal_names_the_limit_only_when_it_is_in_force() {
        let limits =
            LimitsConfig { cpu: Duration::from_secs(2), file_size: MIB, processes: 64, ..LimitsConfig::NONE };
        let xcpu = ExitStatus::from_raw(nix::libc::SIGXCPU);
        let xfsz = ExitStatus::from_raw(nix::libc::SIGXFSZ);
        assert_eq!(limits.ended_by(&xcpu), Some(Limit::Cpu));
        assert_eq!(limits.ended_by(&xfsz), Some(Limit::FileSize));
        assert_eq!(limits.explain(&xcpu), ": it reached its CPU time limit, chats.runner.limits.cpu = 2s");
        assert_eq!(
            limits.explain(&xfsz),
            ": it reached its file size limit, chats.runner.limits.file_size = 1 MiB"
        );
        let no_cpu = LimitsConfig { cpu: Duration::ZERO, ..limits };
        assert_eq!(no_cpu.ended_by(&xcpu), None);
        let segv = ExitStatus::from_raw(nix::libc::SIGSEGV);
        assert_eq!(limits.ended_by(&segv), None);
        assert_eq!(
            limits.explain(&segv),
            "; limits: cpu 2s (chats.runner.limits.cpu), processes 64 (chats.runner.limits.processes), \
             file_size 1 MiB (chats.runner.limits.file_size)"
        );
        let shell_reported = ExitStatus::from_raw((128 + nix::libc::SIGXCPU) << 8);
        assert_eq!(limits.ended_by(&shell_reported), None);
        let text = limits.explain(&shell_reported);
        assert!(text.contains("128 + SIGXCPU") && text.contains("chats.runner.limits.cpu = 2s"), "{text}");
        assert!(limits.explain(&ExitStatus::from_raw(1 << 8)).starts_with("; limits: cpu 2s"));
    }

    #[test]
    fn effective_limits_never_exceed_the_workers_hard_limits() {
        let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).expect("getrlimit");
        let huge = LimitsConfig { open_files: hard.saturating_add(1), ..LimitsConfig::NONE };
        assert_eq!(huge.effective().open_files, hard);
        let small = LimitsConfig { open_files: 64, ..LimitsConfig::NONE };
        assert_eq!(small.effective(), small);
        assert_eq!(LimitsConfig::NONE.effective(), LimitsConfig::NONE);
    }

    #[test]
    fn rlimits_hold_one_entry_per_limit_in_force_with_a_cpu_kill_margin() {
        let limits = LimitsConfig { cpu: Duration::from_secs(3), file_size: MIB, ..LimitsConfig::NONE };
        let entries: Vec<_> = limits.rlimits().entries.into_iter().flatten().collect();
        let (_, cpu_hard) = getrlimit(Resource::RLIMIT_CPU).expect("getrlimit");
        assert_eq!(
            entries,
            vec![
                (Resource::RLIMIT_CPU, 3, (3 + CPU_KILL_AFTER.as_secs()).min(cpu_hard).max(3)),
                (Resource::RLIMIT_FSIZE, MIB, MIB)
            ]
        );
        assert!(LimitsConfig::NONE.rlimits().entries.iter().all(Option::is_none));
    }

    /// A fake file system: file contents, and the paths that are writable.
    #[derive(Default)]
    struct Fixture {
        files: BTreeMap<PathBuf, String>,
        writable: Vec<PathBuf>,
    }

    impl Fixture {
        fn delegated(dir: &str, controllers: &str) -> Self {
            let dir = PathBuf::from(dir);
            Self {
                files: [(dir.join("cgroup.controllers"), format!("{controllers}\n"))].into(),
                writable: vec![dir.clone(), dir.join("cgroup.procs"), dir.join("cgroup.subtree_control")],
            }
        }
    }

    impl CgroupFs for Fixture {
        fn read(&self, path: &Path) -> io::Result<String> {
            self.files.get(path).cloned().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
        }

        fn writable(&self, path: &Path) -> bool {
            self.writable.iter().any(|p| p == path)
        }
    }

    /// This machine's kind: systemd hybrid, memory and pids on v1, an empty v2 hierarchy.
    const HYBRID: &str = "9:name=systemd:/\n8:pids:/\n7:blkio:/\n4:memory:/process_api/b6af\n1:cpu:/\n0::/\n";
    const MOUNTS: &str = "\
        22 28 0:21 / /proc rw,nosuid,nodev,noexec,relatime shared:12 - proc proc rw\n\
        30 24 0:26 / /sys/fs/cgroup rw,nosuid,nodev,noexec,relatime shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
    const SERVICE: &str = "0::/system.slice/worker.service\n";

    #[test]
    fn hybrid_and_v1_hierarchies_are_not_used() {
        let found = assess(HYBRID, MOUNTS, &Fixture::default());
        assert_eq!(
            found,
            CgroupSupport::Unavailable("cgroup v1 or hybrid: memory and pids on a v1 hierarchy".into())
        );
        assert_eq!(found.enforced_by(), "rlimit");
        assert!(
            matches!(assess("", MOUNTS, &Fixture::default()), CgroupSupport::Unavailable(r) if r.contains("no cgroup v2"))
        );
        assert!(
            matches!(assess(SERVICE, "", &Fixture::default()), CgroupSupport::Unavailable(r) if r.contains("mounted"))
        );
    }

    #[test]
    fn a_writable_v2_cgroup_with_memory_and_pids_is_delegated() {
        let dir = "/sys/fs/cgroup/system.slice/worker.service";
        let fs = Fixture::delegated(dir, "cpuset cpu io memory pids");
        assert_eq!(assess(SERVICE, MOUNTS, &fs), CgroupSupport::Delegated { dir: dir.into() });
        let text = assess(SERVICE, MOUNTS, &fs).to_string();
        assert!(text.contains("delegated") && text.contains("not implemented"), "{text}");
    }

    #[test]
    fn missing_controllers_or_write_access_is_not_delegated() {
        let dir = "/sys/fs/cgroup/system.slice/worker.service";
        let no_pids = assess(SERVICE, MOUNTS, &Fixture::delegated(dir, "cpu io memory"));
        assert!(
            matches!(&no_pids, CgroupSupport::NotDelegated { reason, .. } if reason.starts_with("pids not available")),
            "{no_pids:?}"
        );
        let mut read_only = Fixture::delegated(dir, "memory pids");
        read_only.writable.retain(|p| !p.ends_with("cgroup.subtree_control"));
        let found = assess(SERVICE, MOUNTS, &read_only);
        assert!(
            matches!(&found, CgroupSupport::NotDelegated { reason, .. } if reason.contains("cgroup.subtree_control is not writable")),
            "{found:?}"
        );
        let unreadable = assess(SERVICE, MOUNTS, &Fixture::default());
        assert!(
            matches!(unreadable, CgroupSupport::NotDelegated { reason, .. } if reason.contains("cgroup.controllers"))
        );
    }

    #[test]
    fn the_cgroup_path_is_resolved_against_the_mounts_root() {
        // A container: the cgroup2 mount's root is the container's own cgroup.
        let mounts = "1 0 0:30 /docker/abc /sys/fs/cgroup ro,nosuid master:1 - cgroup2 cgroup rw\n";
        let fs = Fixture::delegated("/sys/fs/cgroup/worker", "memory pids");
        assert_eq!(
            assess("0::/docker/abc/worker\n", mounts, &fs),
            CgroupSupport::Delegated { dir: "/sys/fs/cgroup/worker".into() }
        );
        let root_fs = Fixture::delegated("/sys/fs/cgroup", "memory pids");
        assert_eq!(
            assess("0::/docker/abc\n", mounts, &root_fs),
            CgroupSupport::Delegated { dir: "/sys/fs/cgroup".into() }
        );
        assert!(matches!(
            assess("0::/docker/abcdef\n", mounts, &fs),
            CgroupSupport::Unavailable(r) if r.contains("outside")
        ));
        let escaped = "1 0 0:30 / /mnt/cgroup\\040two rw - cgroup2 none rw\n";
        assert_eq!(cgroup2_mount(escaped), Some(Mount { root: "/".into(), point: "/mnt/cgroup two".into() }));
    }

    #[test]
    fn proc_self_cgroup_lines_are_split_into_v1_controllers_and_the_v2_path() {
        assert_eq!(
            parse_proc_cgroup(HYBRID),
            Membership {
                unified: Some("/".into()),
                v1_controllers: vec!["pids".into(), "blkio".into(), "memory".into(), "cpu".into()],
            }
        );
        assert_eq!(
            parse_proc_cgroup("0::/a:b\n"),
            Membership { unified: Some("/a:b".into()), v1_controllers: vec![] }
        );
    }

    #[test]
    fn readyz_info_names_the_mechanism_and_the_limits() {
        let info = readyz_info(
            &LimitsConfig::default(),
            &CgroupSupport::Unavailable("cgroup v1 or hybrid".into()),
            RunsAs::Root,
        );
        assert_eq!(info["enforced_by"], "rlimit");
        assert_eq!(info["memory"], DEFAULT_MEMORY);
        assert_eq!(info["cpu"], "30m");
        assert!(info["processes_scope"].as_str().is_some_and(|s| s.contains("not enforced")));
        assert_eq!(info["cgroup_v2"], "not available: cgroup v1 or hybrid");
    }
}
