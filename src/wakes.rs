//! The `listen_probe` loop: are NOTIFY wakes known to reach this worker?
//!
//! Loops that are woken by NOTIFY (the outbox, chat acquisition, pause changes) keep polling, so
//! wakes are an optimisation, but a silent one: with `database.listen_url` pointing at a
//! transaction-mode pooler, LISTEN succeeds and then hears nothing, and nothing says so. At
//! start, whenever the LISTEN connection is (re)established, and every `listen.probe_interval`
//! (5 m), this loop NOTIFYs a channel of its own through the shared pool (the path every producer
//! uses) and waits `listen.probe_timeout` (5 s) for the notification to come back on the LISTEN
//! connection. The verdict is `/readyz` info `wakes` (`delivered`, `not_delivered`, or `unknown`
//! before the first probe, or while the LISTEN connection cannot take the probe's channel); a
//! probe that hears nothing is counted (`listen.wakes.not_delivered`) and logged as a warning
//! naming `database.listen_url`.
//!
//! The verdict is also reported to the listener ([`Listener::report_delivery`]), for the
//! connection the probe ran on: while it is `delivered`, loops with a fallback interval
//! (`outbox.fallback_interval`, `chats.acquire_fallback_interval`, …) poll only at that slower
//! cadence, and they return to their fast interval at once when the connection drops or
//! reconnects or a probe hears nothing. Wakes that stop arriving on a connection that stays up
//! are noticed by the next probe, so the probe interval (1 m by default: one NOTIFY, about 0.02
//! transactions a second) bounds how long loops stay slow after that; work is still found
//! within each loop's fallback interval meanwhile.

use std::sync::Arc;
use std::time::Duration;

use opentelemetry::metrics::{Counter, Meter};
use serde::{Deserialize, Serialize};
use tokio::sync::{Mutex, Notify};
use tokio_postgres::types::Type;
use uuid::Uuid;

use crate::db::{self, Db, DbError, Exec};
use crate::health::Health;
pub use crate::listen::Delivery;
use crate::listen::{ListenEvent, Listener, Subscription};
use crate::runtime::{Loop, LoopInfo, Progress, Schedule, Tick};
use crate::validate::{Violation, check, positive};

pub const NAME: &str = "listen_probe";

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "listen",
    interval_key: "probe_interval",
    about: "checks that NOTIFY wakes reach this worker's LISTEN connection",
    pausable: true,
};

pub const DEFAULT_PROBE_INTERVAL: Duration = Duration::from_secs(60);
pub const DEFAULT_PROBE_TIMEOUT: Duration = Duration::from_secs(5);

/// `[listen]`: the wake probe.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields, default)]
pub struct ListenConfig {
    pub enabled: bool,
    /// Between two probes (a reconnect of the LISTEN connection probes at once).
    #[serde(with = "humantime_serde")]
    pub probe_interval: Duration,
    /// How long a probe waits for its notification.
    #[serde(with = "humantime_serde")]
    pub probe_timeout: Duration,
}

impl Default for ListenConfig {
    fn default() -> Self {
        Self { enabled: true, probe_interval: DEFAULT_PROBE_INTERVAL, probe_timeout: DEFAULT_PROBE_TIMEOUT }
    }
}

impl ListenConfig {
    /// Keys are relative to `[listen]`.
    pub fn validate(&self) -> Result<(), Violation> {
        positive("probe_interval", self.probe_interval)?;
        positive("probe_timeout", self.probe_timeout)?;
        check(
            self.probe_timeout < self.probe_interval,
            "probe_timeout",
            humantime::format_duration(self.probe_timeout),
            "less than listen.probe_interval",
        )
    }
}

pub struct Probe {
    db: Db,
    listener: Listener,
    health: Health,
    config: ListenConfig,
    /// This worker's probe channel (one per process: replicas never hear each other's probes).
    channel: String,
    /// Subscribed on the first tick and kept: a LISTEN that stays, not one per probe.
    subscription: Mutex<Option<Subscription>>,
    /// Fires when the LISTEN connection is (re)established: a new probe is due then.
    connected: Arc<Notify>,
    /// The last verdict, to say when delivery comes back.
    last: std::sync::Mutex<Delivery>,
    not_delivered: Counter<u64>,
}

impl Probe {
    pub fn new(
        db: Db,
        listener: Listener,
        health: Health,
        worker: Uuid,
        config: ListenConfig,
        meter: &Meter,
    ) -> Self {
        health.set_info("wakes", Delivery::Unknown.as_str().into());
        let connected = listener.on_connect();
        Self {
            db,
            listener,
            health,
            config,
            channel: format!("worker_probe_{}", worker.simple()),
            subscription: Mutex::default(),
            connected,
            last: std::sync::Mutex::new(Delivery::Unknown),
            not_delivered: meter
                .u64_counter("listen.wakes.not_delivered")
                .with_description(
                    "Wake probes whose NOTIFY did not come back on the LISTEN connection in time \
                     (database.listen_url does not deliver notifications)",
                )
                .build(),
        }
    }

    /// One probe: NOTIFY through the pool, wait for it on the LISTEN connection.
    pub async fn probe(&self) -> Result<Delivery, DbError> {
        let timeout = self.config.probe_timeout;
        let mut subscription = self.subscription.lock().await;
        if subscription.is_none() {
            // Acked once the channel is LISTENed on a live connection.
            match tokio::time::timeout(timeout, self.listener.subscribe(&self.channel)).await {
                Ok(subscribed) => *subscription = Some(subscribed),
                Err(_) => return Ok(Delivery::Unknown),
            }
        }
        let Some(events) = subscription.as_mut() else { return Ok(Delivery::Unknown) };
        let nonce = Uuid::new_v4().to_string();
        let connection = self.listener.delivery().borrow().connection;
        let channel = self.channel.as_str();
        db::in_transaction(&self.db, async |tx| {
            tx.exec("SELECT pg_notify($1, $2)", &[(&channel, Type::TEXT), (&nonce, Type::TEXT)]).await
        })
        .await?;
        let heard = tokio::time::timeout(timeout, async {
            loop {
                match events.recv().await {
                    Some(ListenEvent::Notification(payload)) if payload == nonce => return true,
                    // An earlier probe's late answer, or a reconnect: keep waiting for ours.
                    Some(_) => {}
                    None => return false,
                }
            }
        })
        .await;
        let delivery = if heard == Ok(true) { Delivery::Delivered } else { Delivery::NotDelivered };
        self.listener.report_delivery(connection, delivery);
        Ok(delivery)
    }
}

impl Loop for Probe {
    type Error = DbError;

    fn name(&self) -> &'static str {
        NAME
    }

    fn schedule(&self) -> Schedule {
        // A probe waits at most twice the timeout (subscribe, then the answer) plus one NOTIFY.
        Schedule::every(self.config.probe_interval, self.config.probe_timeout * 3)
            .woken_locally_by(self.connected.clone())
    }

    async fn tick(&self, _tick: &Tick<'_>) -> Result<Progress, DbError> {
        let delivery = self.probe().await?;
        let previous = std::mem::replace(
            &mut *self.last.lock().unwrap_or_else(std::sync::PoisonError::into_inner),
            delivery,
        );
        self.health.set_info("wakes", delivery.as_str().into());
        match delivery {
            Delivery::Delivered => {
                if previous == Delivery::NotDelivered {
                    tracing::info!("NOTIFY wakes reach the LISTEN connection again");
                }
            }
            Delivery::NotDelivered => {
                self.not_delivered.add(1, &[]);
                tracing::warn!(
                    timeout_ms = self.config.probe_timeout.as_millis() as u64,
                    "a NOTIFY sent through the pool did not arrive on the LISTEN connection: check \
                     database.listen_url (it must be a direct connection, not a transaction-mode \
                     pooler); loops keep polling at their intervals"
                );
            }
            Delivery::Unknown => {
                tracing::debug!("LISTEN connection not up; wake delivery unknown");
            }
        }
        Ok(Progress::Done)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_timeout_must_be_shorter_than_the_interval() {
        assert_eq!(ListenConfig::default().validate(), Ok(()));
        let config = ListenConfig { probe_timeout: Duration::from_secs(300), ..ListenConfig::default() };
        assert_eq!(config.validate().expect_err("too long").key, "probe_timeout");
        let config = ListenConfig { probe_interval: Duration::ZERO, ..ListenConfig::default() };
        assert_eq!(config.validate().expect_err("zero").key, "probe_interval");
    }
}
