//! The one list of the loops this binary runs: their names (what `worker loop pause NAME`
//! accepts, the `loop` attribute of every metric) and the config table each is set up by.
//! Adding a loop adds one entry here; nothing else keeps a list of loops.

use crate::chats::{acquire, heartbeat, recover};
use crate::{counters, gitsync, outbox, prebuilds, workers};

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct LoopInfo {
    pub name: &'static str,
    /// The config table with this loop's `enabled`, interval and limits.
    pub config_table: &'static str,
    pub about: &'static str,
    /// Whether `worker loop pause` may stop it (its `Schedule::pausable` says the same).
    pub pausable: bool,
}

pub const ALL: &[LoopInfo] = &[
    LoopInfo {
        name: workers::NAME,
        config_table: "workers",
        about: "this worker's lease row in `workers` (when chats are disabled)",
        pausable: true,
    },
    LoopInfo {
        name: heartbeat::NAME,
        config_table: "chats",
        about: "the lease row plus the set difference of running and owned chats (chats enabled)",
        // Paused, the lease would lapse and every agent of the fleet be killed.
        pausable: false,
    },
    LoopInfo {
        name: acquire::NAME,
        config_table: "chats",
        about: "claims pending chats and starts their runners",
        pausable: true,
    },
    LoopInfo {
        name: recover::NAME,
        config_table: "chats",
        about: "returns running chats of dead workers to pending",
        pausable: true,
    },
    LoopInfo {
        name: outbox::NAME,
        config_table: "outbox",
        about: "task_outbox rows into Redis sorted sets",
        pausable: true,
    },
    LoopInfo {
        name: counters::NAME,
        config_table: "counters",
        about: "Redis running-task counters into jobs.running_tasks",
        pausable: true,
    },
    LoopInfo {
        name: gitsync::NAME,
        config_table: "gitsync",
        about: "pull-request status of each chat's branch into chat_diff_statuses",
        pausable: true,
    },
    LoopInfo {
        name: prebuilds::NAME,
        config_table: "prebuilds",
        about: "keeps each preset's prebuilt workspaces at the desired count (leader only)",
        pausable: true,
    },
];

pub fn find(name: &str) -> Option<&'static LoopInfo> {
    ALL.iter().find(|info| info.name == name)
}

pub fn names() -> Vec<&'static str> {
    ALL.iter().map(|info| info.name).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_loop_has_its_own_config_table_with_an_enabled_switch() {
        let config = toml::Table::try_from(crate::config::Config::default()).expect("config serializes");
        for info in ALL {
            let table = config.get(info.config_table).and_then(toml::Value::as_table);
            let enabled = table.and_then(|t| t.get("enabled")).and_then(toml::Value::as_bool);
            assert!(enabled.is_some(), "[{}] has no `enabled` for loop {}", info.config_table, info.name);
        }
        let mut names = names();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), ALL.len(), "loop names are unique");
    }
}
