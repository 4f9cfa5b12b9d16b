//! `/healthz` (the process runs) and `/readyz` (the database answers and every enabled loop
//! completed a tick recently), with a JSON body that says what each loop is doing.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Json;
use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::get;
use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::db::Db;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct HealthConfig {
    /// Address of `/healthz` and `/readyz`.
    pub listen: SocketAddr,
}

impl Default for HealthConfig {
    fn default() -> Self {
        Self { listen: SocketAddr::from(([0, 0, 0, 0], 8080)) }
    }
}

/// How long `/readyz` waits for `SELECT 1`.
const DB_PING_TIMEOUT: Duration = Duration::from_secs(2);

/// What /readyz needs to know about a loop's schedule (the runtime fills it in).
#[derive(Debug, Clone, Copy)]
pub struct LoopFacts {
    pub interval: Duration,
    pub tick_timeout: Duration,
    /// How long after its last completed tick the loop still counts as ready.
    pub staleness_limit: Duration,
    pub leader_only: bool,
}

/// One tick as /readyz records it.
#[derive(Debug, Clone, Copy)]
pub struct TickRecord<'a> {
    /// The `outcome` label of `worker.loop.ticks` (`ok`, `error`, `timeout`, `paused`, …).
    pub outcome: &'static str,
    /// The loop did what it is supposed to do (ok, not leader, paused): it counts as alive.
    pub completed: bool,
    pub error: Option<&'a str>,
}

/// The `outcome` of a paused tick; shown as `paused: true` on /readyz.
pub const PAUSED: &str = "paused";
const OK: &str = "ok";

#[derive(Debug, Clone)]
struct LoopStatus {
    facts: LoopFacts,
    ticks: u64,
    last_outcome: Option<&'static str>,
    last_completed: Option<Instant>,
    last_success_at: Option<DateTime<Utc>>,
    last_error: Option<String>,
    last_error_at: Option<DateTime<Utc>>,
}

#[derive(Debug, Default)]
struct State_ {
    loops: BTreeMap<&'static str, LoopStatus>,
    listener_connected: bool,
    draining: bool,
    info: BTreeMap<&'static str, serde_json::Value>,
}

/// Health state shared by the runners (writers) and the HTTP handlers (readers).
#[derive(Clone, Default)]
pub struct Health {
    state: Arc<Mutex<State_>>,
}

#[derive(Debug, Serialize)]
pub struct LoopReport {
    pub name: &'static str,
    pub ready: bool,
    pub paused: bool,
    pub leader_only: bool,
    pub ticks: u64,
    pub last_outcome: Option<&'static str>,
    pub last_success_at: Option<DateTime<Utc>>,
    pub last_error: Option<String>,
    pub last_error_at: Option<DateTime<Utc>>,
    pub interval_ms: u64,
    pub tick_timeout_ms: u64,
}

#[derive(Debug, Serialize)]
pub struct Readiness {
    pub ready: bool,
    pub database: String,
    pub listener_connected: bool,
    pub draining: bool,
    pub loops: Vec<LoopReport>,
    #[serde(flatten)]
    pub info: BTreeMap<&'static str, serde_json::Value>,
}

impl Health {
    fn lock(&self) -> std::sync::MutexGuard<'_, State_> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    pub fn register(&self, name: &'static str, facts: LoopFacts) {
        self.lock().loops.insert(
            name,
            LoopStatus {
                facts,
                ticks: 0,
                last_outcome: None,
                last_completed: None,
                last_success_at: None,
                last_error: None,
                last_error_at: None,
            },
        );
    }

    pub fn record(&self, name: &'static str, tick: TickRecord<'_>) {
        let mut state = self.lock();
        let Some(status) = state.loops.get_mut(name) else { return };
        status.ticks += 1;
        status.last_outcome = Some(tick.outcome);
        if tick.completed {
            status.last_completed = Some(Instant::now());
        }
        if tick.outcome == OK {
            status.last_success_at = Some(Utc::now());
        }
        if let Some(error) = tick.error {
            status.last_error = Some(error.to_owned());
            status.last_error_at = Some(Utc::now());
        }
    }

    pub fn set_listener_connected(&self, connected: bool) {
        self.lock().listener_connected = connected;
    }

    pub fn set_draining(&self) {
        self.lock().draining = true;
    }

    /// Static facts shown on /readyz (worker id, version, effective concurrency, …).
    pub fn set_info(&self, key: &'static str, value: serde_json::Value) {
        self.lock().info.insert(key, value);
    }

    /// Readiness given whether the database answered (`Err` = why not).
    pub fn readiness(&self, database: Result<(), String>) -> Readiness {
        let state = self.lock();
        let now = Instant::now();
        let loops: Vec<LoopReport> = state
            .loops
            .iter()
            .map(|(name, s)| LoopReport {
                name,
                ready: s.last_completed.is_some_and(|at| now.duration_since(at) <= s.facts.staleness_limit),
                paused: s.last_outcome == Some(PAUSED),
                leader_only: s.facts.leader_only,
                ticks: s.ticks,
                last_outcome: s.last_outcome,
                last_success_at: s.last_success_at,
                last_error: s.last_error.clone(),
                last_error_at: s.last_error_at,
                interval_ms: s.facts.interval.as_millis() as u64,
                tick_timeout_ms: s.facts.tick_timeout.as_millis() as u64,
            })
            .collect();
        let ready = database.is_ok() && !state.draining && loops.iter().all(|l| l.ready);
        Readiness {
            ready,
            database: database.err().unwrap_or_else(|| "ok".to_owned()),
            listener_connected: state.listener_connected,
            draining: state.draining,
            loops,
            info: state.info.clone(),
        }
    }
}

#[derive(Clone)]
struct AppState {
    health: Health,
    db: Db,
}

async fn healthz() -> &'static str {
    "ok\n"
}

async fn readyz(State(app): State<AppState>) -> (StatusCode, Json<Readiness>) {
    let database = match tokio::time::timeout(DB_PING_TIMEOUT, app.db.ping()).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(error)) => Err(error.to_string()),
        Err(_) => Err(format!("no answer within {DB_PING_TIMEOUT:?}")),
    };
    let readiness = app.health.readiness(database);
    let status = if readiness.ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (status, Json(readiness))
}

/// Binds `listen` and serves until `shutdown`. Binding errors are returned at once so a port
/// conflict fails start-up instead of leaving a daemon nobody can probe.
pub async fn serve(
    listen: SocketAddr,
    health: Health,
    db: Db,
    shutdown: CancellationToken,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = tokio::net::TcpListener::bind(listen).await?;
    let local = listener.local_addr()?;
    let app = axum::Router::new()
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .with_state(AppState { health, db });
    tracing::info!(addr = %local, "health endpoint listening");
    Ok(tokio::spawn(async move {
        let server = axum::serve(listener, app).with_graceful_shutdown(shutdown.cancelled_owned());
        if let Err(error) = server.await {
            tracing::error!(%error, "health endpoint failed");
        }
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_loop_is_ready_only_after_a_completed_tick() {
        let health = Health::default();
        let facts = LoopFacts {
            interval: Duration::from_secs(10),
            tick_timeout: Duration::from_secs(5),
            staleness_limit: Duration::from_secs(30),
            leader_only: false,
        };
        health.register("a", facts);
        assert!(!health.readiness(Ok(())).ready);
        health.record("a", TickRecord { outcome: "error", completed: false, error: Some("boom") });
        let r = health.readiness(Ok(()));
        assert!(!r.ready);
        assert_eq!(r.loops[0].last_error.as_deref(), Some("boom"));
        health.record("a", TickRecord { outcome: "skipped_not_leader", completed: true, error: None });
        assert!(health.readiness(Ok(())).ready);
        assert!(!health.readiness(Err("down".into())).ready, "database down is not ready");
        health.record("a", TickRecord { outcome: PAUSED, completed: true, error: None });
        let r = health.readiness(Ok(()));
        assert!(r.ready && r.loops[0].paused);
        health.set_draining();
        assert!(!health.readiness(Ok(())).ready, "draining is not ready");
    }
}
