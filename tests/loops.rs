//! The one list of loops (`loops::ALL`) against the three places that must agree with it: what a
//! fully enabled daemon starts (`loops::start`, seen through /readyz as an operator sees it), the
//! config tables, and their validation. Each test fails when a loop is added in one place only.

mod common;

use std::collections::BTreeSet;

use common::TestDb;
use worker::config::{Concurrency, Config, ConfigInputs};
use worker::health::Health;
use worker::identity::WorkerIdentity;
use worker::loops::{self, ALL, Shared};
use worker::runtime::Runtime;
use worker::workers::WorkerLease;

/// The loops a daemon with `config` registers, by name, read from its readiness report.
async fn started(test_db: &TestDb, config: &Config) -> BTreeSet<&'static str> {
    let meter = opentelemetry::global::meter("loops-test");
    let me = WorkerIdentity::generate();
    WorkerLease::new(test_db.db.clone(), me.clone(), config.workers.clone()).register().await.expect("lease");
    let health = Health::default();
    let runtime = Runtime::for_worker(test_db.db.clone(), health.clone(), &meter, config.runtime.clone(), me);
    let guard_program = std::path::PathBuf::from(env!("CARGO_BIN_EXE_worker"));
    let shared = Shared {
        runtime: &runtime,
        config,
        meter: &meter,
        db: test_db.db.clone(),
        lease_db: test_db.another_pool(),
        concurrency: Concurrency::from_config(config),
        guard_program: &guard_program,
    };
    loops::start(shared).await.expect("the loops start");
    let names = health.readiness(Ok(())).loops.iter().map(|report| report.name).collect();
    runtime.begin_shutdown();
    runtime.drained().await;
    names
}

fn everything_enabled(test_db: &TestDb) -> Config {
    let mut config = test_db.config();
    config.chats.enabled = true;
    config.chats.runner.command = vec!["/bin/cat".into()];
    for base in [
        &mut config.workers.base,
        &mut config.outbox.base,
        &mut config.counters.base,
        &mut config.gitsync.base,
        &mut config.prebuilds.base,
    ] {
        base.enabled = true;
    }
    config
}

#[tokio::test]
async fn a_fully_enabled_daemon_starts_every_listed_loop_and_no_other() {
    let test_db = TestDb::new().await;
    let config = everything_enabled(&test_db);
    let with_chats = started(&test_db, &config).await;
    // With chats the heartbeat writes the lease; without them the workers loop does.
    let mut without = config.clone();
    without.chats.enabled = false;
    let without_chats = started(&test_db, &without).await;

    assert!(!with_chats.contains("workers"), "one writer of the lease row: {with_chats:?}");
    assert!(without_chats.contains("workers"), "{without_chats:?}");
    let all: BTreeSet<_> = ALL.iter().map(|info| info.name).collect();
    let union: BTreeSet<_> = with_chats.union(&without_chats).copied().collect();
    assert_eq!(union, all, "loops::ALL and what loops::start registers disagree");
    assert_eq!(all.len(), ALL.len(), "loop names are unique");
}

#[test]
fn every_listed_loop_has_a_config_table_whose_keys_are_validated() {
    let defaults = toml::Table::try_from(Config::default()).expect("config serializes");
    for info in ALL {
        let table = defaults.get(info.config_table).and_then(toml::Value::as_table);
        let table =
            table.unwrap_or_else(|| panic!("loop {}: no [{}] in Config", info.name, info.config_table));
        assert!(
            table.get("enabled").is_some_and(toml::Value::is_bool),
            "[{}] has no `enabled`",
            info.config_table
        );
        assert!(
            table.contains_key(info.interval_key),
            "[{}] has no `{}`",
            info.config_table,
            info.interval_key
        );

        // Config::validate reaches the loop's own checks: a zero interval is refused by key.
        let variable = format!("WORKER__{}__{}", info.config_table, info.interval_key).to_uppercase();
        let inputs = ConfigInputs { env: [(variable.clone(), "0s".to_owned())].into(), ..Default::default() };
        let refused = worker::config::load(&inputs).expect_err(&variable);
        assert_eq!(
            refused.key(),
            Some(format!("{}.{}", info.config_table, info.interval_key).as_str()),
            "{refused}"
        );
    }
    // The other way round: a table with an `enabled` switch is some listed loop's.
    let loop_tables: BTreeSet<_> = ALL.iter().map(|info| info.config_table).collect();
    for (name, value) in &defaults {
        if value.as_table().is_some_and(|t| t.contains_key("enabled")) {
            assert!(loop_tables.contains(name.as_str()), "[{name}] has `enabled` but no loop in loops::ALL");
        }
    }
}
