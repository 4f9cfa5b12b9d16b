//! What an agent can reach of the worker: its environment, its identity, its descriptors.
//!
//! The agent runs model-driven code, so everything here starts from "nothing" and adds:
//!
//! - **Environment by allow-list.** The agent's environment is empty but for `PATH`, `HOME`,
//!   `LANG`, `TZ` (the worker's values, or the user's home when the agent runs as another user),
//!   `CHAT_ID`, `CHAT_GENERATION`, the `[chats.runner] env` table and the worker variables named
//!   in `pass_env`. Names the worker itself reads as secrets cannot be passed
//!   ([`refused_pass_env`]).
//! - **Another identity.** With `chats.runner.user` the agent runs as that user and its primary
//!   group (setgroups, setgid, setuid in the child before exec); `root` is refused.
//! - **No descriptors but 0, 1, 2.** Everything else is marked close-on-exec in the child, so a
//!   descriptor some library opened without `O_CLOEXEC` cannot leak into the agent.
//! - **No way into the worker's memory.** [`forbid_inspection`] (called by `worker run`) makes the
//!   worker non-dumpable: a process of the same user can no longer read its
//!   `/proc/<pid>/environ`, `mem` or `fd`.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;

use nix::unistd::{Gid, Uid, User};

/// The worker's own variables an agent may inherit unless configured otherwise.
const INHERITED: &[&str] = &["PATH", "LANG", "TZ"];
/// Set by the runner for each turn; not configurable.
pub const RESERVED: &[&str] = &["CHAT_ID", "CHAT_GENERATION", "TRACEPARENT"];

/// Why a `pass_env` name is refused, if it is: a variable the worker itself reads as a secret.
pub fn refused_pass_env(name: &str) -> Option<&'static str> {
    if name == "DATABASE_URL" || name == "REDIS_URL" {
        Some("the worker's own connection URL (with its password)")
    } else if name.starts_with(crate::validate::ENV_PREFIX) {
        Some("a WORKER__* variable: the worker's own configuration (database and Redis URLs, token keys)")
    } else if name.starts_with("OTEL_") && name.ends_with("HEADERS") {
        Some("OTLP export headers: the telemetry backend's credentials")
    } else {
        None
    }
}

/// Why an environment variable name cannot be set at all, if it cannot.
pub fn invalid_env_name(name: &str) -> Option<&'static str> {
    if name.is_empty() {
        Some("an empty name")
    } else if name.contains('=') || name.contains('\0') {
        Some("a name holding `=` or NUL")
    } else if RESERVED.contains(&name) {
        Some("set by the runner for each turn")
    } else {
        None
    }
}

/// The user an agent runs as (`chats.runner.user`), resolved from the user database.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AgentUser {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    pub home: String,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum UserError {
    #[error("no such user: {0}")]
    Unknown(String),
    #[error("cannot look up user {name}: {reason}")]
    Lookup { name: String, reason: String },
    #[error("{0} is root (uid 0): agents never run as root")]
    Root(String),
}

impl AgentUser {
    /// Looks `spec` up by name, or by numeric uid.
    pub fn resolve(spec: &str) -> Result<Self, UserError> {
        let found = match spec.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(spec),
        };
        let user = found
            .map_err(|errno| UserError::Lookup { name: spec.to_owned(), reason: errno.to_string() })?
            .ok_or_else(|| UserError::Unknown(spec.to_owned()))?;
        if user.uid.is_root() {
            return Err(UserError::Root(spec.to_owned()));
        }
        Ok(Self {
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            home: user.dir.to_string_lossy().into_owned(),
        })
    }
}

/// What the runner configuration says about the agent's boundary, resolved once at start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentBoundary {
    /// The agent's environment but for `CHAT_ID` and `CHAT_GENERATION`.
    env: Vec<(String, String)>,
    user: Option<AgentUser>,
}

impl AgentBoundary {
    /// The environment from `worker_env` (the worker's own), the configured `env` table and
    /// `pass_env` names (absent ones are skipped), for an agent running as `user`.
    pub fn new(
        worker_env: &BTreeMap<String, String>,
        env: &BTreeMap<String, String>,
        pass_env: &[String],
        user: Option<AgentUser>,
    ) -> Self {
        let mut chosen: BTreeMap<String, String> = INHERITED
            .iter()
            .filter_map(|name| worker_env.get(*name).map(|value| ((*name).to_owned(), value.clone())))
            .collect();
        let home = user.as_ref().map(|u| u.home.clone()).or_else(|| worker_env.get("HOME").cloned());
        if let Some(home) = home {
            chosen.insert("HOME".into(), home);
        }
        for name in pass_env {
            if let Some(value) = worker_env.get(name) {
                chosen.insert(name.clone(), value.clone());
            }
        }
        chosen.extend(env.iter().map(|(k, v)| (k.clone(), v.clone())));
        Self { env: chosen.into_iter().collect(), user }
    }

    pub fn env(&self) -> &[(String, String)] {
        &self.env
    }

    /// Everything the child must do before exec that allocates, done in the parent.
    pub fn child_setup(&self) -> io::Result<ChildSetup> {
        let user = match &self.user {
            None => None,
            // Already that user and group: nothing to change (and an unprivileged worker could
            // not call setgroups).
            Some(user) if user.uid == nix::unistd::geteuid() && user.gid == nix::unistd::getegid() => None,
            Some(user) => {
                let name = CString::new(user.name.as_str()).map_err(io::Error::other)?;
                Some((name, user.uid, user.gid))
            }
        };
        Ok(ChildSetup { user })
    }
}

/// The credential change of one agent child, prepared so that the child only makes syscalls.
pub struct ChildSetup {
    user: Option<(CString, Uid, Gid)>,
}

impl ChildSetup {
    /// In the forked child before exec: drop to the agent user (supplementary groups, group,
    /// user, in that order: after setuid nothing else can be changed). Only async-signal-safe
    /// calls; `initgroups` is avoided (it reads the group database), the agent gets its primary
    /// group alone.
    pub fn become_agent_user(&self) -> io::Result<()> {
        if let Some((_, uid, gid)) = &self.user {
            nix::unistd::setgroups(&[*gid])?;
            nix::unistd::setgid(*gid)?;
            nix::unistd::setuid(*uid)?;
        }
        Ok(())
    }
}

/// In the forked child before exec: every descriptor above 2 is closed by exec. Marks them
/// close-on-exec rather than closing them, so the pipe through which the standard library
/// reports a failed exec keeps working.
pub fn close_inherited_descriptors() -> io::Result<()> {
    // close_range(3, ~0, CLOSE_RANGE_CLOEXEC): Linux 5.11+.
    const CLOSE_RANGE_CLOEXEC: nix::libc::c_uint = 1 << 2;
    // SAFETY: a raw syscall with integer arguments; no memory is passed.
    let done = unsafe {
        nix::libc::syscall(
            nix::libc::SYS_close_range,
            3 as nix::libc::c_uint,
            !0 as nix::libc::c_uint,
            CLOSE_RANGE_CLOEXEC,
        )
    };
    if done == 0 {
        return Ok(());
    }
    // Older kernels: one fcntl per possible descriptor.
    let max = match nix::sys::resource::getrlimit(nix::sys::resource::Resource::RLIMIT_NOFILE) {
        Ok((soft, _)) => soft.min(1 << 20) as i32,
        Err(errno) => return Err(errno.into()),
    };
    for fd in 3..max {
        // SAFETY: fcntl on an integer descriptor; EBADF for the ones not open is expected.
        unsafe {
            nix::libc::fcntl(fd, nix::libc::F_SETFD, nix::libc::FD_CLOEXEC);
        }
    }
    Ok(())
}

/// Makes this process non-dumpable: processes of the same user can no longer read its
/// `/proc/<pid>/environ`, `mem`, `maps` or `fd` (they become root-owned), nor ptrace it, and it
/// writes no core file. `worker run` calls it first thing, before any secret is read.
pub fn forbid_inspection() -> io::Result<()> {
    nix::sys::prctl::set_dumpable(false)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vars(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| ((*k).to_owned(), (*v).to_owned())).collect()
    }

    #[test]
    fn the_agent_gets_the_allow_list_and_nothing_else() {
        let worker = vars(&[
            ("PATH", "/usr/bin"),
            ("HOME", "/root"),
            ("LANG", "C.UTF-8"),
            ("DATABASE_URL", "postgres://secret"),
            ("AWS_SECRET_ACCESS_KEY", "aws"),
            ("GITHUB_TOKEN", "ghp"),
        ]);
        let boundary = AgentBoundary::new(&worker, &BTreeMap::new(), &[], None);
        assert_eq!(
            boundary.env(),
            &[
                ("HOME".into(), "/root".into()),
                ("LANG".into(), "C.UTF-8".into()),
                ("PATH".into(), "/usr/bin".into())
            ]
        );
        let passed = AgentBoundary::new(
            &worker,
            &vars(&[("PATH", "/opt/agent/bin"), ("MODE", "x")]),
            &["GITHUB_TOKEN".into(), "ABSENT".into()],
            None,
        );
        assert_eq!(
            passed.env(),
            &[
                ("GITHUB_TOKEN".into(), "ghp".into()),
                ("HOME".into(), "/root".into()),
                ("LANG".into(), "C.UTF-8".into()),
                ("MODE".into(), "x".into()),
                ("PATH".into(), "/opt/agent/bin".into()),
            ]
        );
    }

    #[test]
    fn another_user_gets_its_own_home() {
        let user = AgentUser {
            name: "agent".into(),
            uid: Uid::from_raw(1000),
            gid: Gid::from_raw(1000),
            home: "/home/agent".into(),
        };
        let boundary = AgentBoundary::new(&vars(&[("HOME", "/root")]), &BTreeMap::new(), &[], Some(user));
        assert_eq!(boundary.env(), &[("HOME".into(), "/home/agent".into())]);
    }

    #[test]
    fn the_workers_secrets_cannot_be_passed() {
        for name in [
            "DATABASE_URL",
            "REDIS_URL",
            "WORKER__DATABASE__URL",
            "WORKER__GITSYNC__TOKEN_KEYS",
            "OTEL_EXPORTER_OTLP_HEADERS",
            "OTEL_EXPORTER_OTLP_METRICS_HEADERS",
        ] {
            assert!(refused_pass_env(name).is_some(), "{name}");
        }
        for name in ["GITHUB_TOKEN", "AWS_REGION", "OTEL_SERVICE_NAME", "WORKERS"] {
            assert_eq!(refused_pass_env(name), None, "{name}");
        }
        assert!(invalid_env_name("CHAT_ID").is_some());
        assert!(invalid_env_name("A=B").is_some());
        assert_eq!(invalid_env_name("GIT_AUTHOR_NAME"), None);
    }

    #[test]
    fn users_resolve_by_name_or_uid_and_root_is_refused() {
        assert_eq!(AgentUser::resolve("root"), Err(UserError::Root("root".into())));
        assert_eq!(AgentUser::resolve("0"), Err(UserError::Root("0".into())));
        assert_eq!(
            AgentUser::resolve("no-such-user-here"),
            Err(UserError::Unknown("no-such-user-here".into()))
        );
        let nobody = AgentUser::resolve("nobody").expect("nobody exists on Debian");
        assert_eq!(AgentUser::resolve(&nobody.uid.to_string()), Ok(nobody));
    }
}
