//! The one list of loops: what each is ([`ALL`], from the `INFO` of each loop's module) and how
//! `worker run` starts the ones the config enables ([`start`]). The daemon builds the shared
//! pieces once and hands them here; nothing else keeps a list of loops.
//!
//! Adding a loop touches two existing files: this one (its `INFO` in [`ALL`], its start in
//! [`start`]) and `config.rs` (its table in [`Config`] and in `Config::validate`). A test starts a
//! fully enabled daemon and compares what registered with [`ALL`] (`tests/loops.rs`).

use std::path::Path;

use opentelemetry::metrics::Meter;

use crate::chats::{ChatLoops, acquire, heartbeat, recover};
use crate::config::{Concurrency, Config};
use crate::counters::{self, Counters};
use crate::db::Db;
use crate::gitsync::{self, Gitsync};
use crate::outbox::{self, Sweeper};
use crate::prebuilds::{self, Reconciler};
use crate::redis::Client;
use crate::retention::{self, Retention};
use crate::runtime::{LoopInfo, Runtime};
use crate::wakes::{self, Probe};
use crate::workers::{self, WorkerLease};

pub const ALL: &[LoopInfo] = &[
    workers::INFO,
    heartbeat::INFO,
    acquire::INFO,
    recover::INFO,
    outbox::INFO,
    counters::INFO,
    gitsync::INFO,
    prebuilds::INFO,
    wakes::INFO,
    retention::INFO,
];

pub fn find(name: &str) -> Option<&'static LoopInfo> {
    ALL.iter().find(|info| info.name == name)
}

pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|info| info.name).collect()
}

/// What the daemon builds once and every loop may need.
pub struct Shared<'a> {
    pub runtime: &'a Runtime,
    pub config: &'a Config,
    pub meter: &'a Meter,
    /// The shared pool.
    pub db: Db,
    /// The pool the lease is written through (a one-connection pool of its own with chats).
    pub lease_db: Db,
    pub concurrency: Concurrency,
    /// The `worker` binary, for the chat loops' lease guard (`worker agent-guard`).
    pub guard_program: &'a Path,
}

/// Starts every loop `shared.config` enables on `shared.runtime`. Returns the Redis client when a
/// loop needed one, for the daemon to close at exit.
pub async fn start(shared: Shared<'_>) -> anyhow::Result<Option<Client>> {
    let Shared { runtime, config, meter, db, lease_db, concurrency, guard_program } = shared;
    let me = runtime.worker().clone();
    let publishing_lease = || {
        WorkerLease::new(lease_db.clone(), me.clone(), config.workers.clone())
            .publishing_to(runtime.lease_publisher())
            .measured_by(meter)
    };
    // Everything that can fail (or wait) comes before the first spawn: a start that fails
    // leaves no loop running, and no chat claimed by a process about to exit.
    let redis = if config.outbox.base.enabled || config.counters.base.enabled {
        Some(crate::redis::connect_and_wait(&config.redis).await?)
    } else {
        None
    };
    let gitsync = if config.gitsync.base.enabled {
        Some(Gitsync::new(db.clone(), config.gitsync.clone(), concurrency.gitsync, meter)?)
    } else {
        None
    };
    if config.chats.enabled {
        refuse_root_agents_in_production(config)?;
        let chats = ChatLoops::new(runtime, config.chats.clone(), meter, guard_program).await?;
        // The chat heartbeat is the one loop that writes the lease.
        runtime.spawn(chats.heartbeat(publishing_lease()));
        runtime.spawn(chats.acquire());
        runtime.spawn(chats.recover(config.workers.retention));
    } else if config.workers.base.enabled {
        runtime.spawn(publishing_lease());
    }
    if let Some(redis) = redis.as_ref().filter(|_| config.outbox.base.enabled) {
        let sweeper =
            Sweeper::new(db.clone(), redis.clone(), &config.redis.prefix, config.outbox.clone(), meter);
        runtime.spawn(sweeper);
    }
    if let Some(redis) = redis.as_ref().filter(|_| config.counters.base.enabled) {
        let counters =
            Counters::new(db.clone(), redis.clone(), &config.redis.prefix, config.counters.clone(), meter);
        runtime.spawn(counters);
    }
    if config.prebuilds.base.enabled {
        runtime.spawn(Reconciler::new(config.prebuilds.clone(), concurrency.prebuilds, meter));
    }
    if config.retention.base.enabled {
        let (dead_letters, audit) = (config.outbox.dead_retention, config.audit.retention);
        runtime.spawn(Retention::new(db.clone(), config.retention.clone(), dead_letters, audit));
    }
    if config.listen.enabled {
        let (listener, health, me) =
            (runtime.listener().clone(), runtime.health.clone(), runtime.worker().id);
        runtime.spawn(Probe::new(db.clone(), listener, health, me, config.listen.clone(), meter));
    }
    if let Some(gitsync) = gitsync {
        runtime.spawn(gitsync);
    }
    Ok(redis)
}

/// A root worker without `chats.runner.user` would run its agents as root: nothing between them
/// and the machine. Refused in production; said once elsewhere (development machines often run
/// everything as root).
fn refuse_root_agents_in_production(config: &Config) -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() || config.chats.runner.user.is_some() {
        return Ok(());
    }
    anyhow::ensure!(
        config.app.env != crate::config::PRODUCTION,
        "the worker runs as root and chats.runner.user is not set: agents would run as root; \
         set chats.runner.user to an unprivileged user (or run the worker as one)"
    );
    tracing::info!(
        "the worker runs as root and chats.runner.user is not set: agents run as root \
         (refused when app.env = production)"
    );
    Ok(())
}
