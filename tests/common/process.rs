//! Starting the real `worker` binary from tests: its path, a clean environment, a free port and
//! a `/readyz` probe.

use std::path::{Path, PathBuf};

pub const BIN: &str = env!("CARGO_BIN_EXE_worker");

/// A path inside the repository (the binary runs with the repository as working directory).
pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("bind").local_addr().expect("addr").port()
}

/// Environment variables of the test process that would override a test's config file; remove
/// them from every child so a developer's shell cannot change what a test checks.
pub fn inherited_overrides() -> Vec<String> {
    std::env::vars()
        .map(|(k, _)| k)
        .filter(|k| {
            k.starts_with("WORKER")
                || k.starts_with("OTEL_")
                || ["DATABASE_URL", "REDIS_URL", "APP_ENV"].contains(&k.as_str())
        })
        .collect()
}

/// `/readyz` status and body, or `None` while nothing answers.
pub async fn readyz(port: u16) -> Option<(u16, serde_json::Value)> {
    let response = reqwest::get(format!("http://127.0.0.1:{port}/readyz")).await.ok()?;
    let status = response.status().as_u16();
    Some((status, response.json().await.ok()?))
}

/// Runs a `worker` CLI command against `database_url` to completion (no config file, quiet log).
pub fn cli(database_url: &str, args: &[&str]) -> std::process::Output {
    std::process::Command::new(BIN)
        .arg("--database-url")
        .arg(database_url)
        .args(args)
        .env_remove("WORKER_CONFIG")
        .env("RUST_LOG", "warn")
        .output()
        .expect("run worker")
}

/// Stdout of a command that must have succeeded (the failure shows its stderr).
pub fn stdout(output: &std::process::Output) -> String {
    assert!(output.status.success(), "exit {:?}: {}", output.status, String::from_utf8_lossy(&output.stderr));
    String::from_utf8(output.stdout.clone()).expect("utf-8")
}

/// Stdout of a successful command, parsed as one JSON document.
pub fn json(output: &std::process::Output) -> serde_json::Value {
    serde_json::from_str(&stdout(output)).expect("JSON output")
}

/// `worker run --config CONFIG` as a deploy starts it (nothing of this environment overrides the
/// file) with extra `--set` overrides, writing its log (stdout and stderr) to `log`.
pub fn start_worker(config: &Path, overrides: &[&str], log: &Path) -> tokio::process::Child {
    let mut command = tokio::process::Command::new(BIN);
    for key in inherited_overrides() {
        command.env_remove(key);
    }
    command.args(["run", "--config", config.to_str().expect("utf-8 path")]);
    for assignment in overrides {
        command.args(["--set", assignment]);
    }
    let file = std::fs::File::create(log).expect("log file");
    command
        .current_dir(repo_path(""))
        .stdout(file.try_clone().expect("log file"))
        .stderr(file)
        .kill_on_drop(true)
        .spawn()
        .expect("start worker")
}

/// Waits at most `limit` for `child` to exit; its status and the log it wrote to `log`.
pub async fn exit_and_log(
    child: &mut tokio::process::Child,
    limit: std::time::Duration,
    log: &Path,
) -> (std::process::ExitStatus, String) {
    let status = tokio::time::timeout(limit, child.wait())
        .await
        .unwrap_or_else(|_| panic!("the worker did not exit within {limit:?}"))
        .expect("wait");
    (status, std::fs::read_to_string(log).expect("log"))
}
