//! One agent turn as a subprocess (`docs/chats.md`, "Bounds on the agent"; no database).
//!
//! [`Agent::spawn`] starts `chats.runner.command` in a process group of its own, inside its
//! [`AgentBoundary`] (an allow-listed environment with `CHAT_ID` and `CHAT_GENERATION`, the agent
//! user, no descriptor but 0–2), writes the turn's input document to its stdin and closes it.
//! [`AgentTurn::next_event`] then yields one [`AgentEvent`] per stdout line until EOF, and
//! [`AgentTurn::finish`] waits for the exit. The caller fences and writes; this module only
//! guarantees that the agent cannot wedge or outlive its turn:
//!
//! - every read and the final wait are bounded by the turn's deadline (spawn time +
//!   `turn_timeout`);
//! - a stdout line is read with a hard size bound and never buffered beyond it;
//! - stderr is drained concurrently into a bounded tail, so a chatty stderr never blocks the agent
//!   and errors can quote its last words;
//! - on any error (timeout, oversized or malformed line) the whole process group is stopped before
//!   the error is returned: SIGTERM, then SIGKILL after `kill_grace`; dropping an unfinished turn
//!   SIGKILLs the group;
//! - the agent gets `PR_SET_PDEATHSIG(SIGKILL)`, so a `kill -9` of the worker kills it too;
//! - with [`Agent::with_resource_limits`] its rlimits are set before exec (`[chats.runner.limits]`,
//!   see [`super::limits`]), and a turn that ends badly under them says which limit ended it, or
//!   else which were in force ([`AgentError::ExitedUnderLimits`]).
//!
//! Known limits: PDEATHSIG is not inherited across fork, so what an agent started survives a
//! `kill -9` of the worker by this mechanism alone; the lease guard ([`super::guard`]) kills the
//! agents' groups when it sees the worker's end of its pipe close. A grandchild that leaves the
//! group (`setsid`) escapes every signal here (a container or cgroup boundary is the
//! deploy-level answer).

use std::collections::VecDeque;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, LazyLock, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{Signal, killpg};
use nix::unistd::{Pid, getppid};
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdout, Command};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::task::AbortOnDropHandle;
use uuid::Uuid;

use super::boundary::{self, AgentBoundary};
use super::limits::LimitsConfig;

/// Long enough for a real coding turn; a turn that runs longer is almost certainly stuck.
pub const DEFAULT_TURN_TIMEOUT: Duration = Duration::from_secs(30 * 60);
/// Time between SIGTERM and SIGKILL: enough to flush and exit, short enough for shutdown.
pub const DEFAULT_KILL_GRACE: Duration = Duration::from_secs(10);
/// One event line; a message larger than this is a bug in the agent, not a message.
pub const DEFAULT_MAX_LINE_BYTES: usize = 1024 * 1024;
/// Enough for a short traceback in `last_error` without bloating the chat row.
pub const DEFAULT_STDERR_TAIL_BYTES: usize = 4 * 1024;

/// How much of a malformed line is quoted in the error.
const EXCERPT_BYTES: usize = 200;
/// After the group was killed, stderr reaches EOF at once unless a process outside the group
/// holds the pipe; the tail is taken as it is after this long.
const STDERR_DRAIN_LIMIT: Duration = Duration::from_secs(1);
/// Read size for stdout; a longer line is assembled in the turn's line buffer, so this only sets
/// the number of reads, not the longest line. Small, because every running chat holds one.
const STDOUT_BUFFER_BYTES: usize = 8 * 1024;
/// Read size for stderr, of which only the tail is kept.
const STDERR_CHUNK_BYTES: usize = 2 * 1024;

/// The agent program and its arguments; configured as an array of strings, e.g.
/// `["python3", "scripts/demo-agent"]`, so no shell parses it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(try_from = "Vec<String>", into = "Vec<String>")]
pub struct AgentCommand {
    pub program: String,
    pub args: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
#[error("the agent command is empty: expected an array like [\"python3\", \"scripts/demo-agent\"]")]
pub struct EmptyCommand;

impl TryFrom<Vec<String>> for AgentCommand {
    type Error = EmptyCommand;

    fn try_from(argv: Vec<String>) -> Result<Self, EmptyCommand> {
        let mut argv = argv.into_iter();
        let program = argv.next().filter(|p| !p.is_empty()).ok_or(EmptyCommand)?;
        Ok(Self { program, args: argv.collect() })
    }
}

impl From<AgentCommand> for Vec<String> {
    fn from(command: AgentCommand) -> Self {
        std::iter::once(command.program).chain(command.args).collect()
    }
}

/// Bounds of one turn.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AgentLimits {
    /// From spawn to exit, reading included.
    pub turn_timeout: Duration,
    /// Between SIGTERM and SIGKILL when the turn is stopped because of an error.
    pub kill_grace: Duration,
    /// Longest accepted stdout line, newline excluded.
    pub max_line_bytes: usize,
    /// How much of the end of stderr is kept for error messages.
    pub stderr_tail_bytes: usize,
}

impl Default for AgentLimits {
    fn default() -> Self {
        Self {
            turn_timeout: DEFAULT_TURN_TIMEOUT,
            kill_grace: DEFAULT_KILL_GRACE,
            max_line_bytes: DEFAULT_MAX_LINE_BYTES,
            stderr_tail_bytes: DEFAULT_STDERR_TAIL_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("agent limit `{field}` must be greater than zero")]
pub struct InvalidLimit {
    pub field: &'static str,
}

impl AgentLimits {
    /// Zero is never meaningful here (a zero timeout would fail every turn), so it is rejected
    /// rather than read as "unbounded".
    pub fn validate(&self) -> Result<(), InvalidLimit> {
        let zero = [
            ("turn_timeout", self.turn_timeout.is_zero()),
            ("kill_grace", self.kill_grace.is_zero()),
            ("max_line_bytes", self.max_line_bytes == 0),
            ("stderr_tail_bytes", self.stderr_tail_bytes == 0),
        ];
        match zero.into_iter().find(|(_, is_zero)| *is_zero) {
            Some((field, _)) => Err(InvalidLimit { field }),
            None => Ok(()),
        }
    }
}

/// Who an agent message is from, as stored in `chat_messages.role`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageRole {
    Assistant,
    Tool,
}

impl MessageRole {
    pub fn as_str(self) -> &'static str {
        match self {
            MessageRole::Assistant => "assistant",
            MessageRole::Tool => "tool",
        }
    }
}

/// One stdout line of the agent.
#[derive(Debug, Clone, PartialEq)]
pub enum AgentEvent {
    /// `{"type":"message","role":"assistant"|"tool","content":<json>}`: a durable message.
    Message { role: MessageRole, content: serde_json::Value },
    /// `{"type":"title","title":"…"}`: the chat's new title.
    Title(String),
}

/// The wire form of [`AgentEvent`]; unknown fields are ignored so agents can add their own.
#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "lowercase")]
enum WireEvent {
    Message { role: MessageRole, content: serde_json::Value },
    Title { title: String },
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("cannot start agent `{program}`: {source}")]
    Spawn {
        program: String,
        #[source]
        source: io::Error,
    },
    #[error("agent output line {line_number} is longer than {limit} bytes{}", stderr_suffix(.stderr_tail))]
    LineTooLong { limit: usize, line_number: u64, stderr_tail: String },
    #[error("agent output line {line_number} is not a valid event: {reason}{}", stderr_suffix(.stderr_tail))]
    MalformedLine { line_number: u64, reason: String, stderr_tail: String },
    #[error("agent {}{}", describe_exit(.status), stderr_suffix(.stderr_tail))]
    Exited { status: ExitStatus, stderr_tail: String },
    /// [`AgentError::Exited`] of an agent that ran under resource limits: names the limit when
    /// the signal does (SIGXCPU: `cpu`, SIGXFSZ: `file_size`), else lists the limits in force.
    #[error("agent {}{}{}", describe_exit(.status), .limits.explain(.status), stderr_suffix(.stderr_tail))]
    ExitedUnderLimits { status: ExitStatus, limits: LimitsConfig, stderr_tail: String },
    #[error("agent turn timed out after {}{}", humantime::format_duration(*.after), stderr_suffix(.stderr_tail))]
    TurnTimedOut { after: Duration, stderr_tail: String },
    #[error("{context}: {source}")]
    Io {
        context: &'static str,
        #[source]
        source: io::Error,
    },
}

impl AgentError {
    /// A fixed label per variant, for metrics (never built from the message: bounded cardinality).
    pub fn metric_label(&self) -> &'static str {
        match self {
            AgentError::Spawn { .. } => "spawn_failed",
            AgentError::LineTooLong { .. } => "line_too_long",
            AgentError::MalformedLine { .. } => "malformed_line",
            AgentError::Exited { .. } => "exit_nonzero",
            AgentError::ExitedUnderLimits { status, limits, .. } => match limits.ended_by(status) {
                Some(super::limits::Limit::Cpu) => "limit_cpu",
                Some(super::limits::Limit::FileSize) => "limit_file_size",
                _ => "exit_nonzero",
            },
            AgentError::TurnTimedOut { .. } => "turn_timeout",
            AgentError::Io { .. } => "io",
        }
    }
}

fn stderr_suffix(tail: &str) -> String {
    if tail.is_empty() { String::new() } else { format!("; stderr tail: {tail}") }
}

fn describe_exit(status: &ExitStatus) -> String {
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => match Signal::try_from(signal) {
            Ok(name) => format!("was killed by signal {signal} ({name})"),
            Err(_) => format!("was killed by signal {signal}"),
        },
        (None, None) => format!("ended with {status}"),
    }
}

/// A configured agent: what to run, within which limits and boundary.
#[derive(Debug, Clone)]
pub struct Agent {
    command: AgentCommand,
    limits: AgentLimits,
    boundary: AgentBoundary,
    /// Effective rlimits ([`LimitsConfig::effective`]); none unless configured.
    resource_limits: LimitsConfig,
}

impl Agent {
    /// An agent with the default boundary: the worker's PATH, HOME, LANG and TZ, its own user,
    /// the worker's own rlimits.
    pub fn new(command: AgentCommand, limits: AgentLimits) -> Self {
        let worker_env = std::env::vars().collect();
        let boundary = AgentBoundary::new(&worker_env, &Default::default(), &[], None);
        Self { command, limits, boundary, resource_limits: LimitsConfig::NONE }
    }

    /// Rlimits set in the child before exec, each capped at the worker's own hard limit.
    #[must_use]
    pub fn with_resource_limits(mut self, limits: LimitsConfig) -> Self {
        self.resource_limits = limits.effective();
        self
    }

    /// The rlimits in force for this agent (after capping).
    pub fn resource_limits(&self) -> &LimitsConfig {
        &self.resource_limits
    }

    #[must_use]
    pub fn with_boundary(mut self, boundary: AgentBoundary) -> Self {
        self.boundary = boundary;
        self
    }

    /// Starts one turn: the agent runs with `CHAT_ID` and `CHAT_GENERATION` set (and
    /// `TRACEPARENT`, the turn's span, when traces are on) and reads `document` (one JSON
    /// document and a newline, then EOF) from stdin; the bytes are freed as soon as the agent has
    /// read them. The turn's deadline starts now.
    pub async fn spawn(
        &self,
        chat_id: Uuid,
        generation: i64,
        traceparent: Option<&str>,
        document: Vec<u8>,
    ) -> Result<AgentTurn, AgentError> {
        let spawn_error =
            |source: io::Error| AgentError::Spawn { program: self.command.program.clone(), source };
        let mut command = Command::new(&self.command.program);
        command
            .args(&self.command.args)
            .env_clear()
            .envs(self.boundary.env().iter().map(|(k, v)| (k, v)))
            .env("CHAT_ID", chat_id.to_string())
            .env("CHAT_GENERATION", generation.to_string())
            .envs(traceparent.map(|value| ("TRACEPARENT", value)))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            // A session (and so a group) of its own, made in `pre_exec` by setsid: one signal
            // reaches the agent and everything it started, and a session leader cannot move
            // itself into another group to dodge it.
            // Backstop for the leader; `AgentTurn`'s Drop kills the whole group.
            .kill_on_drop(true);
        let parent = Pid::this();
        let setup = self.boundary.child_setup().map_err(spawn_error)?;
        let rlimits = self.resource_limits.rlimits();
        // SAFETY: runs in the forked child before exec. It only makes syscalls (setsid, setgroups,
        // setgid, setuid, close_range or fcntl, setrlimit, prctl, getppid: all
        // async-signal-safe) and builds io::Errors from raw errnos, which does not allocate.
        unsafe {
            command.pre_exec(move || {
                nix::unistd::setsid()?;
                setup.become_agent_user()?;
                boundary::close_inherited_descriptors()?;
                // After the user switch: RLIMIT_NPROC then counts the agent user's processes
                // without making the exec itself fail when that user is already at the limit.
                rlimits.apply()?;
                // After the credential change, which clears the parent-death signal.
                die_with_parent(parent)
            });
        }
        let mut child = spawn_from_long_lived_thread(command).await.map_err(spawn_error)?;

        let missing = |what: &str| spawn_error(io::Error::other(format!("no {what} for the child")));
        let pid = child.id().ok_or_else(|| missing("pid"))?;
        let pgid = Pid::from_raw(i32::try_from(pid).map_err(|_| missing("valid pid"))?);
        let stdin = child.stdin.take().ok_or_else(|| missing("stdin pipe"))?;
        let stdout = child.stdout.take().ok_or_else(|| missing("stdout pipe"))?;
        let stderr = child.stderr.take().ok_or_else(|| missing("stderr pipe"))?;
        tracing::debug!(%chat_id, generation, pid, program = %self.command.program, "agent started");

        // Written concurrently with reading stdout: an agent that answers before reading all of a
        // large document must not deadlock against us.
        let stdin_task = AbortOnDropHandle::new(tokio::spawn(write_stdin(stdin, document, chat_id)));
        let tail = Arc::new(Mutex::new(Tail::new(self.limits.stderr_tail_bytes)));
        let stderr_task = AbortOnDropHandle::new(tokio::spawn(drain_stderr(stderr, tail.clone())));
        Ok(AgentTurn {
            chat_id,
            child,
            pgid,
            stdout: Some(BufReader::with_capacity(STDOUT_BUFFER_BYTES, stdout)),
            line: Vec::new(),
            line_number: 0,
            output_bytes: 0,
            deadline: Instant::now() + self.limits.turn_timeout,
            limits: self.limits,
            resource_limits: self.resource_limits,
            stderr: tail,
            stderr_task: Some(stderr_task),
            _stdin_task: stdin_task,
            exit: None,
        })
    }
}

/// In the child, before exec: SIGKILL when the parent goes away, and exit at once if it already
/// has (it may have died between fork and prctl, and then the signal would never come).
fn die_with_parent(parent: Pid) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    nix::sys::prctl::set_pdeathsig(Signal::SIGKILL)?;
    if getppid() != parent {
        return Err(Errno::ESRCH.into());
    }
    Ok(())
}

type SpawnJob = Box<dyn FnOnce() + Send>;

/// The thread every agent is forked from. PR_SET_PDEATHSIG fires when the *thread* that forked
/// the child exits, not the process: forking from a tokio blocking-pool thread (which exits
/// after idling) or from a task on a runtime that is later shut down would kill agents in the
/// middle of their turn. This thread blocks on its queue for the life of the process (the sender
/// lives in a static), so the signal fires only when the process dies.
static SPAWNER: LazyLock<io::Result<std::sync::mpsc::Sender<SpawnJob>>> = LazyLock::new(|| {
    let (jobs, queue) = std::sync::mpsc::channel::<SpawnJob>();
    std::thread::Builder::new().name("agent-spawner".into()).spawn(move || {
        for job in queue {
            job();
        }
    })?;
    Ok(jobs)
});

pub(super) async fn spawn_from_long_lived_thread(mut command: Command) -> io::Result<Child> {
    let spawner = SPAWNER
        .as_ref()
        .map_err(|e| io::Error::new(e.kind(), format!("cannot start the agent spawner thread: {e}")))?;
    let runtime = tokio::runtime::Handle::current();
    let (reply, answer) = oneshot::channel();
    let job: SpawnJob = Box::new(move || {
        // The child registers with the caller's runtime (reaping, pipes).
        let _context = runtime.enter();
        if let Err(Ok(orphan)) = reply.send(command.spawn()) {
            // The caller stopped waiting; kill_on_drop ends the leader, this its group.
            if let Some(pid) = orphan.id().and_then(|pid| i32::try_from(pid).ok()) {
                let _ = killpg(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    });
    spawner.send(job).map_err(|_| io::Error::other("the agent spawner thread is gone"))?;
    answer.await.map_err(|_| io::Error::other("the agent spawner thread dropped the request"))?
}

async fn write_stdin(mut stdin: tokio::process::ChildStdin, document: Vec<u8>, chat_id: Uuid) {
    let written = stdin.write_all(&document).await;
    // Dropping the pipe is the EOF the agent waits for.
    drop(stdin);
    match written {
        // The agent exited or closed stdin without reading it all; its exit status tells.
        Err(error) if error.kind() == io::ErrorKind::BrokenPipe => {
            tracing::debug!(%chat_id, "agent closed stdin before reading its input")
        }
        Err(error) => tracing::warn!(%chat_id, %error, "writing the agent's input failed"),
        Ok(()) => {}
    }
}

async fn drain_stderr(mut stderr: ChildStderr, tail: Arc<Mutex<Tail>>) {
    let mut chunk = vec![0; STDERR_CHUNK_BYTES];
    while let Ok(n @ 1..) = stderr.read(&mut chunk).await {
        tail.lock().unwrap_or_else(PoisonError::into_inner).push(&chunk[..n]);
    }
}

/// The last `limit` bytes written to stderr.
struct Tail {
    bytes: VecDeque<u8>,
    limit: usize,
}

impl Tail {
    fn new(limit: usize) -> Self {
        Self { bytes: VecDeque::with_capacity(limit), limit }
    }

    fn push(&mut self, chunk: &[u8]) {
        let chunk = &chunk[chunk.len().saturating_sub(self.limit)..];
        let overflow = (self.bytes.len() + chunk.len()).saturating_sub(self.limit);
        self.bytes.drain(..overflow);
        self.bytes.extend(chunk);
    }

    fn text(&self) -> String {
        let (front, back) = self.bytes.as_slices();
        let bytes = [front, back].concat();
        String::from_utf8_lossy(&bytes).trim_end().to_owned()
    }
}

/// What one bounded line read found.
enum LineRead {
    /// A complete line (or the last one, unterminated) is in the buffer.
    Line,
    Eof,
    TooLong,
}

/// Reads up to the next newline into `line` without letting it grow past `limit`. Cancel-safe:
/// bytes are moved from the reader into `line` in one step, and a partial line stays in `line`
/// for the next call.
async fn read_bounded_line(
    reader: &mut BufReader<ChildStdout>,
    line: &mut Vec<u8>,
    limit: usize,
) -> io::Result<LineRead> {
    loop {
        let buffer = reader.fill_buf().await?;
        if buffer.is_empty() {
            return Ok(if line.is_empty() { LineRead::Eof } else { LineRead::Line });
        }
        let (content, consumed, complete) = match buffer.iter().position(|&b| b == b'\n') {
            Some(end) => (&buffer[..end], end + 1, true),
            None => (buffer, buffer.len(), false),
        };
        if line.len() + content.len() > limit {
            return Ok(LineRead::TooLong);
        }
        line.extend_from_slice(content);
        reader.consume(consumed);
        if complete {
            return Ok(LineRead::Line);
        }
    }
}

/// What ended one wait in [`AgentTurn::next_event`].
enum Step {
    Read(io::Result<LineRead>),
    Exited(io::Result<ExitStatus>),
    TimedOut,
}

/// Why a well-formed event with a `\u0000` is refused: PostgreSQL's `jsonb` and `text` cannot
/// store it, and the agent's words are not ours to rewrite.
const NUL_REASON: &str = "it holds a NUL character (\\u0000), which PostgreSQL cannot store";

/// Whether any string (or object key) in `value` holds a NUL character.
fn holds_nul(value: &serde_json::Value) -> bool {
    match value {
        serde_json::Value::String(s) => s.contains('\0'),
        serde_json::Value::Array(items) => items.iter().any(holds_nul),
        serde_json::Value::Object(map) => map.iter().any(|(k, v)| k.contains('\0') || holds_nul(v)),
        _ => false,
    }
}

/// `Ok(None)` for a blank line; `Err(reason)` names what is wrong (quoting the line's start when
/// it does not parse).
fn parse_event(line: &[u8]) -> Result<Option<AgentEvent>, String> {
    if line.iter().all(u8::is_ascii_whitespace) {
        return Ok(None);
    }
    match serde_json::from_slice::<WireEvent>(line) {
        Ok(WireEvent::Message { content, .. }) if holds_nul(&content) => Err(NUL_REASON.to_owned()),
        Ok(WireEvent::Title { title }) if title.contains('\0') => Err(NUL_REASON.to_owned()),
        Ok(WireEvent::Message { role, content }) => Ok(Some(AgentEvent::Message { role, content })),
        Ok(WireEvent::Title { title }) => Ok(Some(AgentEvent::Title(title))),
        Err(error) => {
            let start = String::from_utf8_lossy(&line[..line.len().min(EXCERPT_BYTES)]);
            let more = if line.len() > EXCERPT_BYTES { "…" } else { "" };
            Err(format!("{error}; the line starts with {start:?}{more}"))
        }
    }
}

/// A running agent turn. Dropping it before the agent was reaped SIGKILLs its process group.
pub struct AgentTurn {
    chat_id: Uuid,
    child: Child,
    /// The leader's pid, which is the group and session id (setsid before exec).
    pgid: Pid,
    /// `None` once EOF or an error ended the output: nothing more is delivered.
    stdout: Option<BufReader<ChildStdout>>,
    /// The line being read; kept across cancelled reads.
    line: Vec<u8>,
    line_number: u64,
    /// Bytes of the lines read so far, newlines included.
    output_bytes: u64,
    deadline: Instant,
    limits: AgentLimits,
    resource_limits: LimitsConfig,
    stderr: Arc<Mutex<Tail>>,
    stderr_task: Option<AbortOnDropHandle<()>>,
    _stdin_task: AbortOnDropHandle<()>,
    /// Set when the leader has been reaped.
    exit: Option<ExitStatus>,
}

impl AgentTurn {
    /// The agent's process group id (its pid).
    pub fn process_group_id(&self) -> i32 {
        self.pgid.as_raw()
    }

    /// Bytes of the event lines read so far (newlines included).
    pub fn output_bytes(&self) -> u64 {
        self.output_bytes
    }

    /// When the turn times out.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// The end of what the agent wrote to stderr so far (lossy UTF-8, trailing whitespace cut).
    pub fn stderr_tail(&self) -> String {
        self.stderr.lock().unwrap_or_else(PoisonError::into_inner).text()
    }

    /// The next event, or `None` at EOF. Blank lines are skipped. When the agent exits, whatever
    /// it left running in its group is killed, so EOF follows its exit. On an error the agent has
    /// already been stopped (SIGTERM, SIGKILL after `kill_grace`) and no further event is
    /// delivered. Cancel-safe: dropping the future loses nothing.
    pub async fn next_event(&mut self) -> Result<Option<AgentEvent>, AgentError> {
        loop {
            let Some(stdout) = self.stdout.as_mut() else { return Ok(None) };
            let limit = self.limits.max_line_bytes;
            let leader_running = self.exit.is_none();
            let step = tokio::select! {
                read = read_bounded_line(stdout, &mut self.line, limit) => Step::Read(read),
                // Watched too because EOF alone can wait forever: a background process the agent
                // started may hold stdout open after the agent exited.
                waited = self.child.wait(), if leader_running => Step::Exited(waited),
                () = tokio::time::sleep_until(self.deadline) => Step::TimedOut,
            };
            let read = match step {
                Step::Read(read) => read,
                Step::Exited(Ok(status)) => {
                    // The turn is over: what the agent left behind goes, and so does its hold on
                    // stdout; buffered lines are still read up to EOF.
                    self.exit = Some(status);
                    self.kill_leftovers();
                    continue;
                }
                Step::Exited(Err(source)) => {
                    let error = AgentError::Io { context: "waiting for the agent to exit", source };
                    return Err(self.fail(|_| error).await);
                }
                Step::TimedOut => return Err(self.fail(self.timed_out()).await),
            };
            match read {
                Err(source) => {
                    let error = AgentError::Io { context: "reading the agent's output", source };
                    return Err(self.fail(|_| error).await);
                }
                Ok(LineRead::Eof) => {
                    self.stdout = None;
                    return Ok(None);
                }
                Ok(LineRead::TooLong) => {
                    let line_number = self.line_number + 1;
                    let error = |stderr_tail| AgentError::LineTooLong { limit, line_number, stderr_tail };
                    return Err(self.fail(error).await);
                }
                Ok(LineRead::Line) => {
                    self.line_number += 1;
                    self.output_bytes += self.line.len() as u64 + 1;
                    let parsed = parse_event(&self.line);
                    self.line.clear();
                    match parsed {
                        Ok(Some(event)) => return Ok(Some(event)),
                        Ok(None) => {}
                        Err(reason) => {
                            let line_number = self.line_number;
                            let error =
                                |stderr_tail| AgentError::MalformedLine { line_number, reason, stderr_tail };
                            return Err(self.fail(error).await);
                        }
                    }
                }
            }
        }
    }

    /// Waits (until the deadline) for the agent to exit; call it after [`next_event`] returned
    /// `None`. Output not read yet is discarded. Anything the agent left running in its group is
    /// killed. A non-zero exit or a signal is [`AgentError::Exited`] with the stderr tail
    /// ([`AgentError::ExitedUnderLimits`] when rlimits were set).
    ///
    /// [`next_event`]: AgentTurn::next_event
    pub async fn finish(mut self) -> Result<ExitStatus, AgentError> {
        // Closing our end first: an agent still writing gets EPIPE instead of blocking forever.
        self.stdout = None;
        let status = match self.exit {
            Some(status) => status,
            None => match tokio::time::timeout_at(self.deadline, self.child.wait()).await {
                Err(_elapsed) => return Err(self.fail(self.timed_out()).await),
                Ok(Err(source)) => {
                    let error = AgentError::Io { context: "waiting for the agent to exit", source };
                    return Err(self.fail(|_| error).await);
                }
                Ok(Ok(status)) => {
                    self.exit = Some(status);
                    self.kill_leftovers();
                    status
                }
            },
        };
        let stderr_tail = self.collect_stderr().await;
        if status.success() {
            Ok(status)
        } else if self.resource_limits.is_unlimited() {
            Err(AgentError::Exited { status, stderr_tail })
        } else {
            Err(AgentError::ExitedUnderLimits { status, limits: self.resource_limits, stderr_tail })
        }
    }

    /// Stops the agent: SIGTERM to its process group, SIGKILL to the group if the agent has not
    /// exited after `kill_grace`, then reaps it. Returns how it ended (at once if it already had).
    /// The grace is the leader's: processes it started are SIGKILLed as soon as it is gone. No
    /// event is delivered after an interrupt.
    pub async fn interrupt(&mut self, kill_grace: Duration) -> Result<ExitStatus, AgentError> {
        if let Some(status) = self.exit {
            return Ok(status);
        }
        self.stdout = None;
        self.signal_group(Signal::SIGTERM)?;
        let status = match tokio::time::timeout(kill_grace, self.child.wait()).await {
            Ok(waited) => waited
                .map_err(|source| AgentError::Io { context: "waiting for the agent to exit", source })?,
            Err(_elapsed) => {
                tracing::info!(
                    chat_id = %self.chat_id,
                    grace_ms = kill_grace.as_millis() as u64,
                    "agent still running after SIGTERM; killing its process group"
                );
                self.signal_group(Signal::SIGKILL)?;
                self.child
                    .wait()
                    .await
                    .map_err(|source| AgentError::Io { context: "waiting for the killed agent", source })?
            }
        };
        self.exit = Some(status);
        self.kill_leftovers();
        Ok(status)
    }

    fn timed_out(&self) -> impl FnOnce(String) -> AgentError + use<> {
        let after = self.limits.turn_timeout;
        move |stderr_tail| AgentError::TurnTimedOut { after, stderr_tail }
    }

    /// Ends the turn because of an error: no more output, the agent stopped, the stderr tail
    /// complete. A failure to stop it is logged; the original error is what the caller needs.
    async fn fail(&mut self, error: impl FnOnce(String) -> AgentError) -> AgentError {
        self.stdout = None;
        if let Err(stop_error) = self.interrupt(self.limits.kill_grace).await {
            tracing::warn!(chat_id = %self.chat_id, error = %stop_error, "stopping the agent failed");
        }
        let stderr_tail = self.collect_stderr().await;
        error(stderr_tail)
    }

    /// Waits (bounded) for stderr to reach EOF so the tail includes the agent's last words.
    async fn collect_stderr(&mut self) -> String {
        if let Some(task) = self.stderr_task.take()
            && tokio::time::timeout(STDERR_DRAIN_LIMIT, task).await.is_err()
        {
            tracing::debug!(chat_id = %self.chat_id, "agent stderr still open after its group was killed");
        }
        self.stderr_tail()
    }

    fn signal_group(&self, signal: Signal) -> Result<(), AgentError> {
        if self.exit.is_none() {
            // The leader by pid too (it is ours and not reaped, so the pid is its own): even a
            // leader that somehow left its group is reached.
            let _ = nix::sys::signal::kill(self.pgid, signal);
        }
        match killpg(self.pgid, signal) {
            // Already gone (or only zombies left): nothing to signal.
            Ok(()) | Err(Errno::ESRCH) => Ok(()),
            Err(errno) => {
                Err(AgentError::Io { context: "signalling the agent's process group", source: errno.into() })
            }
        }
    }

    /// SIGKILL to whatever the reaped leader left in its group (background jobs, daemons). The
    /// group id cannot have been reused while any member is alive; only when the group is already
    /// empty and its number was recycled into a new group within these microseconds could this
    /// reach another group, a window accepted here.
    fn kill_leftovers(&self) {
        if let Err(error) = self.signal_group(Signal::SIGKILL) {
            tracing::warn!(chat_id = %self.chat_id, %error, "killing what the agent left running failed");
        }
    }
}

impl Drop for AgentTurn {
    fn drop(&mut self) {
        // Not reaped yet, so the group id is still ours: take everything in it down.
        if self.exit.is_none() {
            let _ = killpg(self.pgid, Signal::SIGKILL);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_built_from_a_non_empty_array_of_strings() {
        let command: AgentCommand =
            serde_json::from_str(r#"["python3", "scripts/demo-agent"]"#).expect("parses");
        assert_eq!(command.program, "python3");
        assert_eq!(command.args, vec!["scripts/demo-agent".to_owned()]);
        assert_eq!(
            serde_json::to_string(&command).expect("serializes"),
            r#"["python3","scripts/demo-agent"]"#
        );
        assert!(serde_json::from_str::<AgentCommand>("[]").is_err());
        assert!(serde_json::from_str::<AgentCommand>(r#"[""]"#).is_err());
        assert!(serde_json::from_str::<AgentCommand>(r#""python3 agent""#).is_err());
    }

    #[test]
    fn default_limits_are_valid_and_zero_limits_are_rejected() {
        assert_eq!(AgentLimits::default().validate(), Ok(()));
        let zero_grace = AgentLimits { kill_grace: Duration::ZERO, ..AgentLimits::default() };
        assert_eq!(zero_grace.validate(), Err(InvalidLimit { field: "kill_grace" }));
        let zero_line = AgentLimits { max_line_bytes: 0, ..AgentLimits::default() };
        assert_eq!(zero_line.validate(), Err(InvalidLimit { field: "max_line_bytes" }));
    }

    #[test]
    fn events_parse_from_their_wire_form() {
        let message = parse_event(br#"{"type":"message","role":"tool","content":{"k":[1]},"extra":1}"#);
        assert_eq!(
            message,
            Ok(Some(AgentEvent::Message { role: MessageRole::Tool, content: serde_json::json!({"k": [1]}) }))
        );
        assert_eq!(
            parse_event(b"{\"type\":\"title\",\"title\":\"T\"}\r"),
            Ok(Some(AgentEvent::Title("T".into())))
        );
        assert_eq!(parse_event(b"  \t"), Ok(None));
    }

    #[test]
    fn a_malformed_event_names_what_is_wrong() {
        let reason = |line: &[u8]| parse_event(line).expect_err("malformed");
        assert!(
            reason(br#"{"type":"message","role":"user","content":1}"#).contains("unknown variant `user`")
        );
        assert!(reason(br#"{"type":"message","role":"assistant"}"#).contains("missing field `content`"));
        assert!(reason(br#"{"type":"dance"}"#).contains("unknown variant `dance`"));
        assert!(reason(br#"{"role":"assistant"}"#).contains("missing field `type`"));
        let long = format!("not json {}", "x".repeat(1000));
        let text = reason(long.as_bytes());
        assert!(text.contains("\"not json") && text.ends_with('…') && text.len() < 400, "{text}");
        for nul in [
            br#"{"type":"message","role":"assistant","content":"a \u0000 b"}"#.as_slice(),
            br#"{"type":"message","role":"assistant","content":{"k":["ok","\u0000"]}}"#,
            br#"{"type":"message","role":"assistant","content":{"\u0000":1}}"#,
            br#"{"type":"title","title":"t\u0000"}"#,
        ] {
            assert!(reason(nul).contains("NUL character"), "{}", String::from_utf8_lossy(nul));
        }
    }

    #[test]
    fn the_stderr_tail_keeps_the_last_bytes() {
        let mut tail = Tail::new(8);
        tail.push(b"hello ");
        tail.push(b"world\n");
        assert_eq!(tail.text(), "o world");
        tail.push(b"a much longer chunk than the limit");
        assert_eq!(tail.text(), "he limit");
    }

    #[test]
    fn exit_descriptions_name_the_code_or_the_signal() {
        assert_eq!(describe_exit(&ExitStatus::from_raw(3 << 8)), "exited with code 3");
        assert_eq!(describe_exit(&ExitStatus::from_raw(9)), "was killed by signal 9 (SIGKILL)");
    }
}
