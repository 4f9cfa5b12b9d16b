//! Worker memory per running agent turn (issue 16, acceptance 6), measured on the real `worker`
//! binary (`run --config config/worker.toml`, all default loops, its own database and Redis
//! prefix) from its `/proc/<pid>/status`, against the real PostgreSQL:
//!
//! 1. **A 50 MB history.** One chat with `--messages` (50,000) visible messages of ~1 KB as the
//!    agent's JSON lines (one `INSERT … generate_series`), read by an agent that copies its stdin
//!    to a file and answers once, with `chats.runner.max_input_bytes` at each of
//!    `--input-limits` (8 MiB, the default, and 1 MiB), a fresh worker process for each. Per turn:
//!    the document the agent received (bytes, messages, `dropped_messages`), the worker's VmRSS
//!    before, its peak during the turn (VmRSS sampled every 5 ms, and VmHWM) and after, and the
//!    peak increase over the idle worker against 2 × the document + 64 KiB. Then VmRSS once the
//!    worker has idled for a while after its last turn.
//! 2. **A soak**: `--soak-chats` (20) chats answering continuously for `--soak-seconds` (480):
//!    the agent answers each turn with one short message and exits; a driver here posts a short
//!    user message (`post_chat_message`) to every chat that is `waiting`, paced so that each
//!    history grows to about `--target-history` (1,500) messages by the end. VmRSS every
//!    `--sample-seconds` (5); RSS at the end of warm-up (`--warmup-seconds`, 60, at most a
//!    quarter of the soak), min/max after it and their spread (target ≤ 10 MB), the final RSS,
//!    turns completed, the final history length, and the worker's peak increase over idle per
//!    running turn against 2 × the average document + 64 KiB.
//!
//! `cargo bench --bench agent_memory -- [--parts history,soak] [--messages N] [--message-bytes N]
//! [--input-limits 8388608,1048576] [--turns N] [--soak-seconds N] [--warmup-seconds N]
//! [--soak-chats N] [--target-history N] [--sample-seconds N]`; `scripts/bench.sh agent_memory`
//! runs it and prints the machine it ran on.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use common::{BenchDb, table};
use tokio_postgres::types::Type;
use uuid::Uuid;
use worker::db::Exec;

/// The per-turn allowance of the target: worker memory per running turn ≤ 2 × document + this.
const SLACK_BYTES: u64 = 64 * 1024;
/// The soak's target: VmRSS max − min after warm-up.
const SPREAD_TARGET_BYTES: u64 = 10_000_000;

struct Args {
    history: bool,
    soak: bool,
    messages: i64,
    message_bytes: i64,
    input_limits: Vec<usize>,
    turns: usize,
    soak_seconds: u64,
    warmup_seconds: u64,
    soak_chats: i64,
    target_history: i64,
    sample_seconds: u64,
    /// Set in the child process of [`vec_baseline`]: `(bytes, reserve up front)`.
    vec_child: Option<(usize, bool)>,
}

impl Args {
    fn parse() -> anyhow::Result<Self> {
        let mut args = Args {
            history: true,
            soak: true,
            messages: 50_000,
            message_bytes: 920,
            input_limits: vec![8 * 1024 * 1024, 1024 * 1024],
            turns: 3,
            soak_seconds: 480,
            warmup_seconds: 60,
            soak_chats: 20,
            target_history: 1_500,
            sample_seconds: 5,
            vec_child: None,
        };
        let mut it = std::env::args().skip(1);
        while let Some(flag) = it.next() {
            let mut value = || it.next().with_context(|| format!("{flag} needs a value"));
            match flag.as_str() {
                "--parts" => {
                    let parts = value()?;
                    args.history = parts.split(',').any(|p| p.trim() == "history");
                    args.soak = parts.split(',').any(|p| p.trim() == "soak");
                }
                "--messages" => args.messages = value()?.parse()?,
                "--message-bytes" => args.message_bytes = value()?.parse()?,
                "--input-limits" => {
                    args.input_limits =
                        value()?.split(',').map(|s| s.trim().parse()).collect::<Result<_, _>>()?;
                }
                "--turns" => args.turns = value()?.parse()?,
                "--soak-seconds" => args.soak_seconds = value()?.parse()?,
                "--warmup-seconds" => args.warmup_seconds = value()?.parse()?,
                "--soak-chats" => args.soak_chats = value()?.parse()?,
                "--target-history" => args.target_history = value()?.parse()?,
                "--sample-seconds" => args.sample_seconds = value()?.parse()?,
                "--vec-child" => {
                    let bytes = value()?.parse()?;
                    args.vec_child = Some((bytes, value()? == "reserve"));
                }
                _ => {} // cargo bench passes --bench
            }
        }
        anyhow::ensure!(args.history || args.soak, "--parts: history, soak or both");
        anyhow::ensure!(args.turns > 0 && args.messages > 0, "nothing to measure");
        anyhow::ensure!(args.soak_seconds >= 4 && args.soak_chats > 0, "the soak needs chats and time");
        anyhow::ensure!(args.sample_seconds > 0, "--sample-seconds must be positive");
        Ok(args)
    }
}

/// `/proc/<pid>/status` memory fields, KiB.
#[derive(Debug, Clone, Copy, Default)]
struct Mem {
    rss: u64,
    hwm: u64,
    anon: u64,
    file: u64,
}

fn mem(pid: u32) -> anyhow::Result<Mem> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<u64> {
        let line = status.lines().find(|l| l.starts_with(name)).with_context(|| format!("no {name}"))?;
        Ok(line.split_whitespace().nth(1).context("no value")?.parse()?)
    };
    Ok(Mem {
        rss: field("VmRSS:")?,
        hwm: field("VmHWM:")?,
        anon: field("RssAnon:")?,
        file: field("RssFile:")?,
    })
}

fn mib(kib: u64) -> String {
    format!("{:.1}", kib as f64 / 1024.0)
}

fn signed_mib(kib: i64) -> String {
    format!("{:+.1}", kib as f64 / 1024.0)
}

fn kib_of_bytes(bytes: u64) -> String {
    format!("{:.0}", bytes as f64 / 1024.0)
}

fn held(ok: bool) -> &'static str {
    if ok { "**met**" } else { "**NOT met**" }
}

/// The real binary, started like an operator would (`run --config config/worker.toml`), on the
/// bench database, a free loopback health port and a Redis prefix of its own; stderr (warnings
/// and errors) goes to a file in the bench's temporary directory.
struct Worker {
    child: tokio::process::Child,
    pid: u32,
    log: PathBuf,
}

impl Worker {
    async fn start(bench: &BenchDb, dir: &Path, name: &str, sets: &[String]) -> anyhow::Result<Self> {
        let log = dir.join(format!("worker-{name}.log"));
        let stderr = std::fs::File::create(&log)?;
        let child = common::start_worker(&bench.url, sets, stderr.into(), Duration::from_secs(60))
            .await
            .with_context(|| tail(&log))?;
        let pid = child.id().context("the worker exited at once")?;
        // Its loops have ticked a few times and every pooled connection it uses is open.
        tokio::time::sleep(Duration::from_secs(5)).await;
        Ok(Self { child, pid, log })
    }

    fn mem(&mut self) -> anyhow::Result<Mem> {
        if let Some(status) = self.child.try_wait()? {
            anyhow::bail!("the worker exited ({status}): {}", tail(&self.log));
        }
        mem(self.pid)
    }

    /// SIGTERM, then waits for the drain (bounded; `kill_on_drop` is the backstop).
    async fn stop(mut self) -> anyhow::Result<()> {
        use nix::sys::signal::{Signal, kill};
        kill(nix::unistd::Pid::from_raw(self.pid as i32), Signal::SIGTERM)?;
        tokio::time::timeout(Duration::from_secs(90), self.child.wait())
            .await
            .context("the worker did not stop within 90 s of SIGTERM")??;
        Ok(())
    }
}

/// The last lines of a worker's stderr, for error messages.
fn tail(log: &Path) -> String {
    let text = std::fs::read_to_string(log).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(20)..].join("\n")
}

/// Writes an executable agent script; the worker runs it as `["/bin/sh", path]`.
fn agent_script(dir: &Path, name: &str, body: &str) -> anyhow::Result<String> {
    let path = dir.join(name);
    std::fs::write(&path, format!("#!/bin/sh\n{body}\n"))?;
    Ok(format!(r#"chats.runner.command=["/bin/sh", "{}"]"#, path.display()))
}

const ANSWER: &str = r#"printf '%s\n' '{"type":"message","role":"assistant","content":{"text":"ok"}}'"#;

/// Samples the worker's VmRSS every 5 ms until stopped; the highest value seen (KiB).
struct Sampler {
    stop: Arc<AtomicBool>,
    max: Arc<AtomicU64>,
    task: tokio::task::JoinHandle<()>,
}

impl Sampler {
    fn start(pid: u32) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let max = Arc::new(AtomicU64::new(0));
        let task = tokio::spawn({
            let (stop, max) = (stop.clone(), max.clone());
            async move {
                while !stop.load(Ordering::Relaxed) {
                    if let Ok(m) = mem(pid) {
                        max.fetch_max(m.rss, Ordering::Relaxed);
                    }
                    tokio::time::sleep(Duration::from_millis(5)).await;
                }
            }
        });
        Self { stop, max, task }
    }

    async fn finish(self) -> u64 {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        self.max.load(Ordering::Relaxed)
    }
}

// ---------------------------------------------------------------------------------------------
// Part 1: a 50 MB history.

/// The history chat: `waiting`, with `messages` visible messages, alternately user and
/// assistant, each `{"text": <message_bytes characters>}`. Returns its id, and the history's size
/// as the agent's JSON lines (each plus its comma), as if nothing were left out.
async fn seed_history(bench: &BenchDb, args: &Args) -> anyhow::Result<(Uuid, i64)> {
    let direct = bench.direct().await?;
    let chat: Uuid = direct
        .fetch_one(
            "INSERT INTO chats (owner_id, status) VALUES (gen_random_uuid(), 'waiting') RETURNING id",
            &[],
        )
        .await?
        .get(0);
    direct
        .exec(
            "INSERT INTO chat_messages (chat_id, role, content, created_at) \
             SELECT $1, CASE WHEN g % 2 = 1 THEN 'user' ELSE 'assistant' END, \
                    jsonb_build_object('text', left(repeat(md5(g::text), ($3 / 32 + 1)::int), $3::int)), \
                    now() - interval '1 day' + g * interval '1 millisecond' \
             FROM generate_series(1, $2) AS g",
            &[(&chat, Type::UUID), (&args.messages, Type::INT8), (&args.message_bytes, Type::INT8)],
        )
        .await?;
    direct.batch_execute("VACUUM ANALYZE chats, chat_messages").await?;
    let bytes: i64 = direct
        .fetch_one(
            "SELECT coalesce(sum(octet_length(json_build_object('id', id, 'role', role, 'content', content, \
                    'created_at', created_at::text)::text) + 1), 0)::int8 \
             FROM chat_messages WHERE chat_id = $1",
            &[(&chat, Type::UUID)],
        )
        .await?
        .get(0);
    Ok((chat, bytes))
}

/// What one turn of the history chat cost.
struct HistoryTurn {
    turn: usize,
    document: u64,
    messages: usize,
    dropped: i64,
    before: Mem,
    /// Highest VmRSS sampled during the turn.
    sampled_peak: u64,
    after: Mem,
    /// The turn's peak: VmHWM when it rose during the turn, else the sampled peak.
    peak: u64,
}

struct HistoryRun {
    limit: usize,
    idle: Mem,
    turns: Vec<HistoryTurn>,
    /// VmRSS after idling `SETTLE` past the last turn.
    settled: Mem,
}

/// How long the worker idles after its last turn before its RSS is read again.
const SETTLE: Duration = Duration::from_secs(15);

/// Posts a user message and waits until the turn answering it is over (`waiting` again, with
/// `answers` assistant answers written by the agent).
async fn one_turn(
    direct: &tokio_postgres::Client,
    chat: Uuid,
    answers: i64,
    w: &mut Worker,
) -> anyhow::Result<()> {
    let content = serde_json::json!({ "text": "and now?" });
    direct
        .fetch_one(
            "SELECT post_chat_message($1, 'user', $2)",
            &[(&chat, Type::UUID), (&content, Type::JSONB)],
        )
        .await?;
    let deadline = Instant::now() + Duration::from_secs(300);
    loop {
        let row = direct
            .fetch_one(
                "SELECT status, coalesce(last_error, ''), \
                        (SELECT count(*) FROM chat_messages m WHERE m.chat_id = c.id AND m.role = 'assistant' \
                         AND m.content = '{\"text\": \"ok\"}'::jsonb)::int8 \
                 FROM chats c WHERE id = $1",
                &[(&chat, Type::UUID)],
            )
            .await?;
        let (status, error, answered): (String, String, i64) = (row.get(0), row.get(1), row.get(2));
        anyhow::ensure!(status != "error", "the turn failed: {error}");
        if status == "waiting" && answered >= answers {
            return Ok(());
        }
        w.mem()?; // the worker is still alive
        anyhow::ensure!(Instant::now() < deadline, "the turn did not end within 300 s (status {status})");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn history_run(
    bench: &BenchDb,
    args: &Args,
    dir: &Path,
    chat: Uuid,
    limit: usize,
    answered_before: i64,
) -> anyhow::Result<HistoryRun> {
    let doc_path = dir.join(format!("doc-{chat}.json"));
    let command = agent_script(
        dir,
        "agent-history.sh",
        &format!("cat > \"{}/doc-$CHAT_ID.json\"\n{ANSWER}", dir.display()),
    )?;
    let sets = [
        command,
        format!("chats.runner.max_input_bytes={limit}"),
        "chats.max_running=20".into(),
        "chats.max_per_acquire=20".into(),
        "chats.acquire_interval=100ms".into(),
    ];
    let mut w = Worker::start(bench, dir, &format!("history-{limit}"), &sets).await?;
    let direct = bench.direct().await?;
    let idle = w.mem()?;
    let mut turns = Vec::new();
    for turn in 1..=args.turns {
        let _ = std::fs::remove_file(&doc_path);
        let before = w.mem()?;
        let sampler = Sampler::start(w.pid);
        let result = one_turn(&direct, chat, answered_before + turn as i64, &mut w).await;
        let sampled_peak = sampler.finish().await;
        result?;
        let after = w.mem()?;
        let peak = if after.hwm > before.hwm { after.hwm.max(sampled_peak) } else { sampled_peak };
        let bytes =
            std::fs::read(&doc_path).with_context(|| format!("the agent wrote no {}", doc_path.display()))?;
        let document: serde_json::Value =
            serde_json::from_slice(&bytes).context("the agent's input is not one JSON document")?;
        turns.push(HistoryTurn {
            turn,
            document: bytes.len() as u64,
            messages: document["messages"].as_array().map_or(0, Vec::len),
            dropped: document["dropped_messages"].as_i64().unwrap_or(-1),
            before,
            sampled_peak,
            after,
            peak,
        });
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    tokio::time::sleep(SETTLE).await;
    let settled = w.mem()?;
    w.stop().await?;
    Ok(HistoryRun { limit, idle, turns, settled })
}

/// Part 1; returns whether the target held in every turn.
async fn history(bench: &BenchDb, args: &Args, dir: &Path) -> anyhow::Result<bool> {
    let (chat, history_bytes) = seed_history(bench, args).await?;
    let mut runs = Vec::new();
    let mut answered = 0;
    for &limit in &args.input_limits {
        runs.push(history_run(bench, args, dir, chat, limit, answered).await?);
        answered += args.turns as i64;
    }
    let _ = std::fs::remove_file(dir.join(format!("doc-{chat}.json")));

    let mut rows = Vec::new();
    let mut all_met = true;
    for run in &runs {
        for t in &run.turns {
            let increase_kib = t.peak.saturating_sub(run.idle.rss);
            let target = 2 * t.document + SLACK_BYTES;
            let met = increase_kib * 1024 <= target;
            all_met &= met;
            rows.push(vec![
                format!("{} ({:.1} MiB)", run.limit, run.limit as f64 / 1048576.0),
                t.turn.to_string(),
                format!("{} ({:.2} MiB)", t.document, t.document as f64 / 1048576.0),
                format!("{} / {}", t.messages, t.dropped),
                mib(run.idle.rss),
                mib(t.before.rss),
                format!("{} / {}", mib(t.sampled_peak), mib(t.after.hwm)),
                mib(t.after.rss),
                format!("**+{}**", mib(increase_kib)),
                format!("{:.2}×", increase_kib as f64 * 1024.0 / t.document.max(1) as f64),
                format!("{} {}", mib(target / 1024), if met { "met" } else { "NOT met" }),
            ]);
        }
    }
    table(
        &format!(
            "A {:.1} MB history ({} messages of ~{} bytes as JSON lines), one turn at a time (MiB from /proc/<pid>/status)",
            history_bytes as f64 / 1e6,
            args.messages,
            history_bytes / args.messages.max(1),
        ),
        &[
            "max_input_bytes",
            "turn",
            "document bytes the agent read",
            "messages in it / dropped_messages",
            "VmRSS idle",
            "VmRSS before",
            "peak VmRSS (5 ms samples) / VmHWM",
            "VmRSS after",
            "peak − idle",
            "÷ document",
            "target 2 × doc + 64 KiB",
        ],
        &rows,
    );
    let mut settled = Vec::new();
    for run in &runs {
        settled.push(vec![
            run.limit.to_string(),
            format!("{} (anonymous {}, file {})", mib(run.idle.rss), mib(run.idle.anon), mib(run.idle.file)),
            mib(run.idle.hwm),
            mib(run.turns.iter().map(|t| t.after.hwm).max().unwrap_or(0)),
            format!(
                "{} (anonymous {}, file {})",
                mib(run.settled.rss),
                mib(run.settled.anon),
                mib(run.settled.file)
            ),
            signed_mib(run.settled.rss as i64 - run.idle.rss as i64),
        ]);
    }
    table(
        &format!("The same workers, {} s after their last turn (MiB)", SETTLE.as_secs()),
        &[
            "max_input_bytes",
            "VmRSS idle, before any turn",
            "VmHWM idle",
            "VmHWM after the turns",
            "VmRSS settled",
            "settled − idle",
        ],
        &settled,
    );
    println!(
        "\nThe history is {:.1} MB; a turn reads only the newest messages that fit `max_input_bytes`. \
         Worker memory per running turn ≤ 2 × document + 64 KiB: {} (peak − idle; one turn runs at a \
         time, so the increase is that turn's).",
        history_bytes as f64 / 1e6,
        held(all_met),
    );

    // Baselines: the document's bytes alone, in a Vec built two ways, in a fresh process on the
    // same allocator.
    let mut rows = Vec::new();
    for run in &runs {
        let document = run.turns.first().map_or(0, |t| t.document) as usize;
        for (reserve, label) in [
            (false, "(a) `Vec::new()` + `extend_from_slice` per line (grows by doubling)"),
            (true, "(b) `Vec::with_capacity(document)` + `extend_from_slice` per line"),
        ] {
            let v = vec_baseline(document, reserve).await?;
            rows.push(vec![
                label.into(),
                format!("{document} ({:.2} MiB)", document as f64 / 1048576.0),
                mib(v.before),
                format!("+{}", mib(v.peak.saturating_sub(v.before))),
                format!("{:.2}×", v.peak.saturating_sub(v.before) as f64 * 1024.0 / document.max(1) as f64),
                signed_mib(v.after_drop as i64 - v.before as i64),
            ]);
        }
    }
    table(
        "Baseline: the document's bytes alone in a `Vec<u8>` (1 KiB lines), a fresh process on the same allocator (jemalloc)",
        &["how", "bytes", "VmRSS before", "peak increase (VmHWM)", "÷ document", "VmRSS after drop − before"],
        &rows,
    );
    Ok(all_met)
}

/// VmRSS before, VmHWM with the Vec built, VmRSS 100 ms after dropping it (KiB).
struct VecMemory {
    before: u64,
    peak: u64,
    after_drop: u64,
}

/// The child of [`vec_baseline`]: builds a `Vec<u8>` of `bytes` from 1 KiB lines like
/// `input_document` does (optionally reserved up front), and prints its own memory.
fn vec_child(bytes: usize, reserve: bool) -> anyhow::Result<()> {
    let line = vec![b'x'; 1023];
    let before = mem(std::process::id())?;
    let mut document: Vec<u8> = if reserve { Vec::with_capacity(bytes) } else { Vec::new() };
    while document.len() + line.len() < bytes {
        if !document.is_empty() {
            document.push(b',');
        }
        document.extend_from_slice(&line);
    }
    std::hint::black_box(&document);
    let built = mem(std::process::id())?;
    drop(document);
    std::thread::sleep(Duration::from_millis(100));
    let after = mem(std::process::id())?;
    println!("{} {} {}", before.rss, built.hwm.max(built.rss), after.rss);
    Ok(())
}

async fn vec_baseline(bytes: usize, reserve: bool) -> anyhow::Result<VecMemory> {
    let output = tokio::process::Command::new(std::env::current_exe()?)
        .args(["--vec-child", &bytes.to_string(), if reserve { "reserve" } else { "grow" }])
        .stderr(Stdio::inherit())
        .output()
        .await?;
    anyhow::ensure!(output.status.success(), "the Vec child failed: {}", output.status);
    let text = String::from_utf8(output.stdout)?;
    let v: Vec<u64> = text.split_whitespace().map(str::parse).collect::<Result<_, _>>()?;
    anyhow::ensure!(v.len() == 3, "the Vec child said {text:?}");
    Ok(VecMemory { before: v[0], peak: v[1], after_drop: v[2] })
}

// ---------------------------------------------------------------------------------------------
// Part 2: the soak.

struct SoakSample {
    at: Duration,
    mem: Mem,
    /// Assistant answers so far: one per completed turn.
    turns: i64,
    /// Messages in the soak's chats.
    messages: i64,
    /// The agents' last document sizes (average over the chats that had a turn).
    avg_document: u64,
    running: i64,
}

async fn soak_sample(
    direct: &tokio_postgres::Client,
    w: &mut Worker,
    chats: &[Uuid],
    dir: &Path,
    started: Instant,
) -> anyhow::Result<SoakSample> {
    let mem = w.mem()?;
    let at = started.elapsed();
    let row = direct
        .fetch_one(
            "SELECT count(*) FILTER (WHERE role = 'assistant')::int8, count(*)::int8, \
                    (SELECT count(*) FROM chats WHERE id = ANY($1) AND status = 'running')::int8 \
             FROM chat_messages WHERE chat_id = ANY($1)",
            &[(&chats, Type::UUID_ARRAY)],
        )
        .await?;
    let sizes: Vec<u64> = chats
        .iter()
        .filter_map(|id| std::fs::read_to_string(dir.join(format!("bytes-{id}"))).ok()?.trim().parse().ok())
        .collect();
    let avg_document = if sizes.is_empty() { 0 } else { sizes.iter().sum::<u64>() / sizes.len() as u64 };
    Ok(SoakSample { at, mem, turns: row.get(0), messages: row.get(1), avg_document, running: row.get(2) })
}

/// Least-squares slope of VmRSS over time, MiB per minute.
fn slope_mib_per_min(samples: &[&SoakSample]) -> f64 {
    let n = samples.len() as f64;
    if n < 2.0 {
        return 0.0;
    }
    let xs: Vec<f64> = samples.iter().map(|s| s.at.as_secs_f64() / 60.0).collect();
    let ys: Vec<f64> = samples.iter().map(|s| s.mem.rss as f64 / 1024.0).collect();
    let (mx, my) = (xs.iter().sum::<f64>() / n, ys.iter().sum::<f64>() / n);
    let num: f64 = xs.iter().zip(&ys).map(|(x, y)| (x - mx) * (y - my)).sum();
    let den: f64 = xs.iter().map(|x| (x - mx) * (x - mx)).sum();
    if den == 0.0 { 0.0 } else { num / den }
}

/// Part 2; returns whether both targets held.
async fn soak(bench: &BenchDb, args: &Args, dir: &Path) -> anyhow::Result<bool> {
    let duration = Duration::from_secs(args.soak_seconds);
    let warmup = Duration::from_secs(args.warmup_seconds.min(args.soak_seconds / 4));
    let n = args.soak_chats;
    let command = agent_script(
        dir,
        "agent-soak.sh",
        &format!("wc -c > \"{}/bytes-$CHAT_ID\"\n{ANSWER}", dir.display()),
    )?;
    let sets = [
        command,
        format!("chats.max_running={}", n.max(20)),
        format!("chats.max_per_acquire={}", n.max(20)),
        "chats.acquire_interval=100ms".into(),
    ];
    let mut w = Worker::start(bench, dir, "soak", &sets).await?;
    let idle = w.mem()?;
    let direct = bench.direct().await?;
    let chats: Vec<Uuid> = direct
        .fetch_all(
            "INSERT INTO chats (owner_id, status) SELECT gen_random_uuid(), 'waiting' FROM generate_series(1, $1) \
             RETURNING id",
            &[(&n, Type::INT8)],
        )
        .await?
        .iter()
        .map(|r| r.get(0))
        .collect();
    // Each turn adds a user message and an answer: a chat gets a new message at most this often.
    let pace = duration.div_f64((args.target_history as f64 / 2.0).max(1.0));
    let sample_every = Duration::from_secs(args.sample_seconds);
    let started = Instant::now();
    let end = started + duration;
    let mut next_sample = started;
    let mut last_post: HashMap<Uuid, Instant> = HashMap::new();
    let mut samples = Vec::new();
    let mut posted = 0u64;
    loop {
        let now = Instant::now();
        if now >= next_sample {
            samples.push(soak_sample(&direct, &mut w, &chats, dir, started).await?);
            next_sample += sample_every;
        }
        if now >= end {
            break;
        }
        let waiting: Vec<Uuid> = direct
            .fetch_all(
                "SELECT id FROM chats WHERE id = ANY($1) AND status = 'waiting'",
                &[(&chats, Type::UUID_ARRAY)],
            )
            .await?
            .iter()
            .map(|r| r.get(0))
            .filter(|id| last_post.get(id).is_none_or(|at| now.duration_since(*at) >= pace))
            .collect();
        if !waiting.is_empty() {
            direct
                .fetch_all(
                    "SELECT post_chat_message(u, 'user', jsonb_build_object('text', 'what next? ' || clock_timestamp()::text)) \
                     FROM unnest($1::uuid[]) AS u",
                    &[(&waiting, Type::UUID_ARRAY)],
                )
                .await?;
            posted += waiting.len() as u64;
            for id in waiting {
                last_post.insert(id, now);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    // The last turns finish; nothing new is posted.
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let busy: i64 = direct
            .fetch_one(
                "SELECT count(*)::int8 FROM chats WHERE id = ANY($1) AND status IN ('pending', 'running')",
                &[(&chats, Type::UUID_ARRAY)],
            )
            .await?
            .get(0);
        if busy == 0 {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "{busy} chats still busy 120 s after the soak");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last = soak_sample(&direct, &mut w, &chats, dir, started).await?;
    let errors = direct
        .fetch_all(
            "SELECT coalesce(last_error, '') FROM chats WHERE id = ANY($1) AND status = 'error'",
            &[(&chats, Type::UUID_ARRAY)],
        )
        .await?;
    if let Some(first) = errors.first() {
        eprintln!("soak: {} chat(s) ended in error, e.g.: {}", errors.len(), first.get::<_, String>(0));
    }
    let lengths = direct
        .fetch_one(
            "SELECT min(n)::int8, max(n)::int8, avg(n)::float8 FROM \
             (SELECT count(m.id) AS n FROM unnest($1::uuid[]) AS c(id) LEFT JOIN chat_messages m ON m.chat_id = c.id \
              GROUP BY c.id) AS per_chat",
            &[(&chats, Type::UUID_ARRAY)],
        )
        .await?;
    let (min_len, max_len, avg_len): (i64, i64, f64) = (lengths.get(0), lengths.get(1), lengths.get(2));
    w.stop().await?;

    // The timeline: every 30 s or so, and the end.
    let every = (30 / args.sample_seconds).max(1) as usize;
    let mut rows: Vec<Vec<String>> = samples
        .iter()
        .enumerate()
        .filter(|(i, _)| i % every == 0)
        .map(|(_, s)| s)
        .chain(std::iter::once(&last))
        .map(|s| {
            vec![
                format!("{:.0}", s.at.as_secs_f64()),
                mib(s.mem.rss),
                mib(s.mem.anon),
                s.turns.to_string(),
                format!("{:.0}", s.messages as f64 / n as f64),
                kib_of_bytes(s.avg_document),
                s.running.to_string(),
            ]
        })
        .collect();
    rows.last_mut().expect("the end")[0].push_str(" (end, all settled)");
    table(
        &format!(
            "Soak: {n} chats answering continuously for {} s (VmRSS every {} s; rows every ~30 s)",
            args.soak_seconds, args.sample_seconds
        ),
        &[
            "t (s)",
            "VmRSS MiB",
            "RssAnon MiB",
            "turns completed",
            "messages per chat",
            "average document KiB",
            "running",
        ],
        &rows,
    );

    let after: Vec<&SoakSample> = samples.iter().filter(|s| s.at >= warmup).collect();
    let at_warmup = after.first().map_or(idle, |s| s.mem);
    let min = after.iter().map(|s| s.mem.rss).min().unwrap_or(0);
    let max = after.iter().map(|s| s.mem.rss).max().unwrap_or(0);
    let spread = max - min;
    let spread_met = spread * 1024 <= SPREAD_TARGET_BYTES;
    let peak = last.mem.hwm.max(samples.iter().map(|s| s.mem.rss).max().unwrap_or(0));
    let per_turn = peak.saturating_sub(idle.rss) * 1024 / n as u64;
    let turn_target = 2 * last.avg_document + SLACK_BYTES;
    let per_turn_met = per_turn <= turn_target;
    let elapsed = last.at.as_secs_f64();
    let summary = vec![
        vec!["VmRSS idle, before the chats (all default loops)".into(), mib(idle.rss)],
        vec![format!("VmRSS at the end of warm-up (t = {} s)", warmup.as_secs()), mib(at_warmup.rss)],
        vec!["VmRSS min / max after warm-up".into(), format!("{} / {}", mib(min), mib(max))],
        vec![
            "**spread after warm-up (max − min)** (target ≤ 10 MB)".into(),
            format!("**{}** ({:.1} MB) {}", mib(spread), spread as f64 * 1024.0 / 1e6, held(spread_met)),
        ],
        vec![
            "growth after warm-up (least squares)".into(),
            format!("{:+.2} MiB/min", slope_mib_per_min(&after)),
        ],
        vec![
            "VmRSS at the end (every turn over) / VmHWM".into(),
            format!("{} / {}", mib(last.mem.rss), mib(last.mem.hwm)),
        ],
        vec![
            "turns completed".into(),
            format!("{} ({:.1}/s; {posted} user messages posted)", last.turns, last.turns as f64 / elapsed),
        ],
        vec![
            "messages per chat at the end (min / avg / max)".into(),
            format!("{min_len} / {avg_len:.0} / {max_len}"),
        ],
        vec!["chats that ended in `error`".into(), errors.len().to_string()],
        vec![
            "average document at the end (the agents' `wc -c`)".into(),
            format!("{} bytes ({} KiB)", last.avg_document, kib_of_bytes(last.avg_document)),
        ],
        vec![
            format!("**worker memory per running turn**, estimate: (peak − idle) / {n}"),
            format!(
                "**{} KiB** vs 2 × {} + 64 = {} KiB {}",
                per_turn / 1024,
                kib_of_bytes(last.avg_document),
                turn_target / 1024,
                held(per_turn_met)
            ),
        ],
    ];
    table("Soak summary (MiB unless said otherwise)", &["what", "value"], &summary);
    println!(
        "\nThe per-turn figure charges the whole peak increase over the idle worker (pool connections, \
         runtime, allocator) to {n} turns. The driver posts to every due `waiting` chat in one statement, so \
         the chats' turns run in bursts of up to {n} at once; if fewer overlapped at the peak, the cost per \
         turn is higher than this (part 1 measures one turn alone)."
    );
    Ok(spread_met && per_turn_met)
}

async fn run(bench: &BenchDb, args: &Args) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut met = true;
    if args.history {
        met &= history(bench, args, dir.path()).await?;
    }
    if args.soak {
        met &= soak(bench, args, dir.path()).await?;
    }
    println!("\nAll targets: {}", held(met));
    Ok(())
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> anyhow::Result<()> {
    let args = Args::parse()?;
    if let Some((bytes, reserve)) = args.vec_child {
        return vec_child(bytes, reserve);
    }
    let bench = BenchDb::create(2).await?;
    let result = run(&bench, &args).await;
    bench.drop_now().await?;
    result
}
