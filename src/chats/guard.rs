//! The lease guard: a small process outside the worker that kills the worker's agents when the
//! worker stops extending their deadline — the one failure the worker cannot handle itself,
//! because a frozen process (SIGSTOP, a paused VM, a stuck allocator) runs no watchdog.
//!
//! One guard per worker, the worker binary itself in a hidden mode (`worker agent-guard`),
//! started like the agents (through the worker's long-lived spawner thread, no descriptor but
//! 0–2, an empty environment) and non-dumpable like the worker. The worker writes text lines to its stdin:
//!
//! - `deadline <ns>`: after each successful lease renewal, the instant (`CLOCK_BOOTTIME`, which
//!   keeps counting while the machine sleeps) at which every agent must be dead: the renewal's
//!   start + `stale_after` − [`LEASE_MARGIN`](super::config::LEASE_MARGIN);
//! - `watch <token> <pgid>` when an agent starts, `unwatch <token>` when its turn is over.
//!
//! When the deadline passes without a newer one, the guard SIGKILLs the process group of every
//! watched agent whose leader has not been reaped yet (checked through a pidfd, so a recycled
//! group id is never signalled). At EOF on stdin (the worker died, even by SIGKILL, or dropped
//! it) it kills every watched group, including what the agents started (their own parent-death
//! signal does not reach their children), and exits. The in-process watchdog of each runner (SIGTERM, then SIGKILL after
//! `kill_grace`) acts earlier; the guard is the backstop.
//!
//! Writes never block the worker: the pipe is non-blocking, and a guard that does not drain it
//! (stopped, dead) is marked broken, replaced at the next renewal ([`LeaseGuard::extend`]) and
//! told every watched agent again.

use std::collections::HashMap;
use std::io::{self, Write};
use std::os::fd::{AsFd, AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::time::{ClockId, clock_gettime};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::Instant;

/// The hidden subcommand of the `worker` binary that runs [`run`].
pub const SUBCOMMAND: &str = "agent-guard";

/// `CLOCK_BOOTTIME` in nanoseconds: one clock for the worker and the guard.
fn boottime_ns() -> u64 {
    clock_gettime(ClockId::CLOCK_BOOTTIME)
        .map(|t| {
            u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000 + u64::try_from(t.tv_nsec()).unwrap_or(0)
        })
        .unwrap_or(0)
}

/// What the guard is told, one line each.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum GuardCommand {
    Deadline(u64),
    Watch { token: u64, pgid: i32 },
    Unwatch(u64),
}

impl GuardCommand {
    fn line(&self) -> String {
        match self {
            GuardCommand::Deadline(ns) => format!("deadline {ns}\n"),
            GuardCommand::Watch { token, pgid } => format!("watch {token} {pgid}\n"),
            GuardCommand::Unwatch(token) => format!("unwatch {token}\n"),
        }
    }

    fn parse(line: &str) -> Option<Self> {
        let mut words = line.split_ascii_whitespace();
        let command = match (words.next()?, words.next(), words.next()) {
            ("deadline", Some(ns), None) => GuardCommand::Deadline(ns.parse().ok()?),
            ("watch", Some(token), Some(pgid)) => GuardCommand::Watch {
                token: token.parse().ok()?,
                pgid: pgid.parse().ok().filter(|p| *p > 1)?,
            },
            ("unwatch", Some(token), None) => GuardCommand::Unwatch(token.parse().ok()?),
            _ => return None,
        };
        words.next().is_none().then_some(command)
    }
}

// ---- the guard process ----------------------------------------------------------------------

/// A watched agent: its group, and a pidfd of its leader (`None` if it was gone already).
struct Watched {
    pgid: i32,
    leader: Option<OwnedFd>,
}

impl Watched {
    fn open(pgid: i32) -> Self {
        // SAFETY: a raw syscall with integer arguments; a non-negative result is a new fd we own.
        let fd = unsafe { nix::libc::syscall(nix::libc::SYS_pidfd_open, pgid, 0) };
        let leader = (fd >= 0).then(|| unsafe { OwnedFd::from_raw_fd(fd as i32) });
        Self { pgid, leader }
    }

    /// SIGKILL to the group while its leader is not reaped (alive or a zombie: its id, and so the
    /// group's, cannot have been reused). A reaped leader's leftovers were killed by the worker
    /// when it reaped it. With `unchecked` (the worker is dead: its agents died by their
    /// parent-death signal and were reaped by init at once, but what they started may live on in
    /// their groups, which keeps the group ids from being reused) the group is signalled anyway.
    fn kill(&self, unchecked: bool) -> bool {
        if unchecked {
            return killpg(Pid::from_raw(self.pgid), Signal::SIGKILL).is_ok();
        }
        let Some(leader) = &self.leader else { return false };
        // SAFETY: pidfd_send_signal(fd, 0, NULL, 0) only probes; ESRCH once the leader is reaped.
        let probe = unsafe {
            nix::libc::syscall(
                nix::libc::SYS_pidfd_send_signal,
                leader.as_raw_fd(),
                0,
                std::ptr::null::<nix::libc::siginfo_t>(),
                0,
            )
        };
        if probe != 0 {
            return false;
        }
        // The leader itself through its pidfd (cannot reach another process), then its group.
        // SAFETY: as above, with SIGKILL.
        unsafe {
            nix::libc::syscall(
                nix::libc::SYS_pidfd_send_signal,
                leader.as_raw_fd(),
                nix::libc::SIGKILL,
                std::ptr::null::<nix::libc::siginfo_t>(),
                0,
            );
        }
        let _ = killpg(Pid::from_raw(self.pgid), Signal::SIGKILL);
        true
    }
}

/// The guard's state, apart from its I/O.
#[derive(Default)]
struct GuardState {
    deadline: Option<u64>,
    watched: HashMap<u64, Watched>,
}

impl GuardState {
    fn apply(&mut self, command: GuardCommand) {
        match command {
            GuardCommand::Deadline(ns) => self.deadline = Some(ns),
            GuardCommand::Watch { token, pgid } => {
                self.watched.insert(token, Watched::open(pgid));
            }
            GuardCommand::Unwatch(token) => {
                self.watched.remove(&token);
            }
        }
    }

    /// Kills every watched agent if the deadline has passed (and forgets the deadline).
    fn enforce(&mut self, worker: Pid) {
        if let Some(deadline) = self.deadline
            && boottime_ns() >= deadline
        {
            let killed = self.kill_all(false);
            eprintln!(
                "agent-guard: the worker (pid {worker}) did not renew its lease in time; killed {killed} agent process group(s)"
            );
            self.deadline = None;
        }
    }

    /// Kills every watched agent; returns how many groups were signalled.
    fn kill_all(&mut self, unchecked: bool) -> usize {
        self.watched.values().filter(|w| w.kill(unchecked)).count()
    }
}

/// `worker agent-guard`: reads the worker's commands on stdin until EOF; returns the exit code.
pub fn run() -> i32 {
    // EOF on stdin is how a dead worker is noticed (only the worker holds the pipe's write
    // end). No parent-death signal: the guard must outlive a killed worker long enough to kill
    // what its agents left running.
    let parent = nix::unistd::getppid();
    let mut state = GuardState::default();
    let stdin = io::stdin();
    let mut pending: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        state.enforce(parent);
        // At most a second between looks at the clock: poll counts on CLOCK_MONOTONIC, which
        // stands still while the machine sleeps, the deadline on CLOCK_BOOTTIME, which does not.
        let timeout = match state.deadline {
            None => nix::poll::PollTimeout::NONE,
            Some(deadline) => {
                let ms = deadline.saturating_sub(boottime_ns()).div_ceil(1_000_000).min(1_000);
                nix::poll::PollTimeout::try_from(ms as i32).unwrap_or(nix::poll::PollTimeout::MAX)
            }
        };
        let mut fds = [nix::poll::PollFd::new(stdin.as_fd(), nix::poll::PollFlags::POLLIN)];
        match nix::poll::poll(&mut fds, timeout) {
            Ok(0) | Err(Errno::EINTR) => continue,
            Ok(_) => {}
            Err(_) => return 1,
        }
        let n = match nix::unistd::read(&stdin, &mut chunk) {
            Ok(n) => n,
            Err(Errno::EINTR | Errno::EAGAIN) => continue,
            Err(_) => 0,
        };
        if n == 0 {
            // The worker is gone or let go of us: nothing it started may outlive it.
            state.kill_all(true);
            return 0;
        }
        // A deadline that passed while the guard could not run (frozen with the worker) is
        // enforced before any newer one replaces it.
        state.enforce(parent);
        pending.extend_from_slice(&chunk[..n]);
        while let Some(end) = pending.iter().position(|&b| b == b'\n') {
            let line: Vec<u8> = pending.drain(..=end).collect();
            match std::str::from_utf8(&line).ok().and_then(GuardCommand::parse) {
                Some(command) => state.apply(command),
                None => eprintln!(
                    "agent-guard: ignoring a malformed command: {}",
                    String::from_utf8_lossy(&line).trim_end()
                ),
            }
        }
        if pending.len() > 4096 {
            pending.clear();
        }
    }
}

// ---- the worker's side ----------------------------------------------------------------------

#[derive(Debug, thiserror::Error)]
pub enum GuardError {
    #[error("cannot start the lease guard `{program} {SUBCOMMAND}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
}

/// The worker's handle on its guard process.
pub struct LeaseGuard {
    program: PathBuf,
    inner: Mutex<Inner>,
}

struct Inner {
    process: Option<GuardProcess>,
    /// What a replacement guard must be told again.
    deadline: Option<u64>,
    watched: HashMap<u64, i32>,
    next_token: u64,
}

struct GuardProcess {
    child: Child,
    stdin: std::fs::File,
}

impl GuardProcess {
    /// Writes whole lines without blocking; a full pipe means the guard is not reading.
    fn send(&mut self, commands: &[GuardCommand]) -> io::Result<()> {
        let text: String = commands.iter().map(GuardCommand::line).collect();
        self.stdin.write_all(text.as_bytes())
    }
}

/// An agent the guard watches until this is dropped.
pub struct WatchedAgent<'a> {
    guard: &'a LeaseGuard,
    token: u64,
}

impl Drop for WatchedAgent<'_> {
    fn drop(&mut self) {
        self.guard.unwatch(self.token);
    }
}

impl LeaseGuard {
    /// Starts the guard: `program` is the `worker` binary (`std::env::current_exe()` in the
    /// daemon).
    pub async fn start(program: &Path) -> Result<Self, GuardError> {
        let process = spawn(program).await?;
        tracing::info!(pid = process.child.id(), "lease guard started");
        Ok(Self {
            program: program.to_owned(),
            inner: Mutex::new(Inner {
                process: Some(process),
                deadline: None,
                watched: HashMap::new(),
                next_token: 0,
            }),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every agent must be dead by `deadline` unless it is extended again. Replaces a broken
    /// guard first (the heartbeat calls this after each renewal, so that is within one interval).
    pub async fn extend(&self, deadline: Instant) -> Result<(), GuardError> {
        let now = Instant::now();
        let ns = boottime_ns().saturating_add(
            u64::try_from(deadline.saturating_duration_since(now).as_nanos()).unwrap_or(u64::MAX),
        );
        let replacement =
            if self.lock().process.is_none() { Some(spawn(&self.program).await?) } else { None };
        let mut inner = self.lock();
        inner.deadline = Some(ns);
        if let Some(process) = replacement {
            tracing::info!(pid = process.child.id(), watched = inner.watched.len(), "lease guard replaced");
            inner.process = Some(process);
            let mut commands = vec![GuardCommand::Deadline(ns)];
            commands.extend(inner.watched.iter().map(|(&token, &pgid)| GuardCommand::Watch { token, pgid }));
            inner.send(&commands);
        } else {
            inner.send(&[GuardCommand::Deadline(ns)]);
        }
        Ok(())
    }

    /// Watches an agent's process group until the returned handle is dropped.
    pub fn watch(&self, pgid: i32) -> WatchedAgent<'_> {
        let mut inner = self.lock();
        inner.next_token += 1;
        let token = inner.next_token;
        inner.watched.insert(token, pgid);
        inner.send(&[GuardCommand::Watch { token, pgid }]);
        WatchedAgent { guard: self, token }
    }

    fn unwatch(&self, token: u64) {
        let mut inner = self.lock();
        inner.watched.remove(&token);
        inner.send(&[GuardCommand::Unwatch(token)]);
    }

    /// The guard's pid, while one runs.
    pub fn pid(&self) -> Option<u32> {
        self.lock().process.as_ref().and_then(|p| p.child.id())
    }
}

impl Inner {
    fn send(&mut self, commands: &[GuardCommand]) {
        let Some(process) = self.process.as_mut() else { return };
        if let Err(error) = process.send(commands) {
            tracing::warn!(%error, "the lease guard does not take commands; replacing it at the next renewal");
            if let Some(mut broken) = self.process.take() {
                let _ = broken.child.start_kill();
            }
        }
    }
}

async fn spawn(program: &Path) -> Result<GuardProcess, GuardError> {
    let spawn_error =
        |source: io::Error| GuardError::Spawn { program: program.display().to_string(), source };
    let mut command = Command::new(program);
    command
        .arg(SUBCOMMAND)
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::inherit());
    // Not killed on drop: dropping the handle closes its stdin, and at that EOF the guard kills
    // whatever agent is still watched, then exits (tokio reaps it).
    // SAFETY: only syscalls in the child (setsid, close_range/fcntl), see `boundary`.
    unsafe {
        command.pre_exec(|| {
            // A session of its own: a signal to the worker's group (a shell's Ctrl-Z,
            // `kill -STOP -<pgid>`) does not freeze the guard with the worker.
            nix::unistd::setsid()?;
            super::boundary::close_inherited_descriptors()
        });
    }
    let mut child = super::agent::spawn_from_long_lived_thread(command).await.map_err(spawn_error)?;
    let stdin = child.stdin.take().ok_or_else(|| spawn_error(io::Error::other("no stdin pipe")))?;
    let fd: OwnedFd = stdin.into_owned_fd().map_err(spawn_error)?;
    // tokio made the pipe non-blocking: a write to a guard that stopped reading fails at once.
    Ok(GuardProcess { child, stdin: std::fs::File::from(fd) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_round_trip_and_garbage_is_refused() {
        for command in [
            GuardCommand::Deadline(123),
            GuardCommand::Watch { token: 7, pgid: 4242 },
            GuardCommand::Unwatch(7),
        ] {
            assert_eq!(GuardCommand::parse(command.line().trim_end()), Some(command));
        }
        for garbage in
            ["", "deadline", "deadline x", "watch 1", "watch 1 1", "watch 1 -5", "unwatch 1 2", "kill 1"]
        {
            assert_eq!(GuardCommand::parse(garbage), None, "{garbage:?}");
        }
    }

    #[test]
    fn an_unwatched_agent_is_forgotten() {
        let mut state = GuardState::default();
        state.apply(GuardCommand::Watch { token: 1, pgid: 999_999_999 });
        state.apply(GuardCommand::Watch { token: 2, pgid: 999_999_998 });
        state.apply(GuardCommand::Unwatch(1));
        assert_eq!(state.watched.keys().copied().collect::<Vec<_>>(), vec![2]);
        assert_eq!(state.kill_all(false), 0, "no such process: nothing signalled");
        assert_eq!(state.kill_all(true), 0, "no such group: nothing signalled");
    }
}
