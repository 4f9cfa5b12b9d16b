//! The worker as a container's first process (PID 1).
//!
//! `scripts/start.sh` execs the worker, so in a container nothing stays behind it: a shell that
//! waited for the worker kept the whole environment (`DATABASE_URL`, `REDIS_URL`, `WORKER__*`)
//! in a `/proc/1/environ` that an agent running as the same user could read. The worker is then
//! PID 1, which has two duties no other process has: processes orphaned anywhere in the
//! container are re-parented to it and only it can reap them (an agent's process that left its
//! group with `setsid` and exited would stay a zombie, holding a pid, until the container
//! stops), and the kernel delivers to it no signal it has not asked for.
//!
//! So a worker that finds itself PID 1 forks once, first thing, while it has no thread: the
//! child goes on as the worker, and the parent stays a minimal init. It forwards SIGTERM and
//! SIGINT (the signals the worker drains on) to the worker, reaps every child, and exits with
//! the worker's status when the worker exits. Other signals reach it as they reached the shell
//! before: PID 1 without a handler ignores them (forwarding SIGHUP or SIGUSR1 would kill the
//! worker without a drain). It is the same image, already non-dumpable
//! ([`crate::chats::boundary::forbid_inspection`] runs before), so its environment is as closed
//! to an agent as the worker's.

use nix::sys::signal::{SigHandler, SigSet, SigmaskHow, Signal, kill, signal, sigprocmask};
use nix::sys::wait::{WaitPidFlag, WaitStatus, waitpid};
use nix::unistd::{ForkResult, Pid, fork, getpid};

/// The signals the init passes on to the worker; SIGCHLD is its own.
const FORWARDED: [Signal; 2] = [Signal::SIGTERM, Signal::SIGINT];

/// When this process is PID 1: forks, returns in the child (the worker) and never returns in the
/// parent (the init). Otherwise returns at once. Call before any thread is started.
pub fn serve_as_pid_one() -> nix::Result<()> {
    if getpid() != Pid::from_raw(1) {
        return Ok(());
    }
    let mut waited = SigSet::empty();
    waited.add(Signal::SIGCHLD);
    for signal in FORWARDED {
        waited.add(signal);
    }
    // Blocked before the fork, so no signal is lost between the fork and the first wait; the
    // child puts its mask back.
    let mut before = SigSet::empty();
    sigprocmask(SigmaskHow::SIG_BLOCK, Some(&waited), Some(&mut before))?;
    // Inherited as ignored (an exec'ing parent may have set it), SIGCHLD would make the kernel
    // reap the children itself and never announce the worker's exit.
    // SAFETY: the default disposition, no handler; no thread exists yet.
    unsafe { signal(Signal::SIGCHLD, SigHandler::SigDfl) }?;
    // SAFETY: no thread exists yet (this runs first in `main`), so the child is a whole copy.
    match unsafe { fork() }? {
        ForkResult::Child => sigprocmask(SigmaskHow::SIG_SETMASK, Some(&before), None),
        ForkResult::Parent { child } => std::process::exit(supervise(child, &waited)),
    }
}

/// The init's loop: forward, reap, and return the worker's exit code once it has exited.
fn supervise(worker: Pid, waited: &SigSet) -> i32 {
    loop {
        match waited.wait() {
            Ok(Signal::SIGCHLD) => {
                if let Some(code) = reap(worker) {
                    return code;
                }
            }
            // The worker may have exited a moment ago: its SIGCHLD is next.
            Ok(signal) => {
                let _ = kill(worker, signal);
            }
            // Cannot happen with a valid set; were it to, the init still owes the worker's status.
            Err(_) => return waitpid(worker, None).ok().and_then(exit_code).unwrap_or(1),
        }
    }
}

/// Reaps every child that has exited; the worker's exit code if it was one of them.
fn reap(worker: Pid) -> Option<i32> {
    let mut worker_code = None;
    loop {
        match waitpid(None, Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return worker_code,
            Ok(status) if status.pid() == Some(worker) => worker_code = exit_code(status),
            Ok(_) => {}
        }
    }
}

/// A shell's reading of a status: the exit code, or 128 + the signal that ended the process.
fn exit_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, signal, _) => Some(128 + signal as i32),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_init_exits_as_a_shell_reports_the_worker() {
        let pid = Pid::from_raw(7);
        assert_eq!(exit_code(WaitStatus::Exited(pid, 0)), Some(0));
        assert_eq!(exit_code(WaitStatus::Exited(pid, 75)), Some(75));
        assert_eq!(exit_code(WaitStatus::Signaled(pid, Signal::SIGKILL, false)), Some(137));
        assert_eq!(exit_code(WaitStatus::Stopped(pid, Signal::SIGSTOP)), None, "stopped is not gone");
    }
}
