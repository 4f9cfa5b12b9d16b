//! Gitsync (`docs/gitsync.md`): keeps `chat_diff_statuses` in step with the pull request of each
//! chat's branch.
//!
//! - [`refresher`]: the `gitsync` loop — lease due rows, resolve a token per (owner, origin),
//!   ask the provider under one semaphore, write each row back as [`decide`] says.
//! - [`decide`]: the pure write-back decision: what a row's refresh found → its outcome, the
//!   fields written and when it is due again. Table-tested without I/O.
//! - [`config`]: the `[gitsync]` table and its `[[gitsync.providers]]`.
//! - [`cli`]: `worker gitsync stats | refresh <chat_id> | put-token | encrypt-tokens`.
//! - [`tokens`]: tokens at rest: AES-256-GCM under `gitsync.token_keys` (pure; the format the
//!   API tier may produce itself).
//! - [`origin`]: git remote origins → host, owner, repository.
//! - [`provider`]: provider configuration and matching, the [`Provider`] trait, [`PrStatus`]
//!   (every field the row stores) and [`ProviderError`].
//! - [`github`]: the GitHub REST client (ETag cache, bounded bodies, rate-limit detection); its
//!   [`github::wire`]: GitHub's JSON shapes and the pure derivations from them.
//!
//! The schema and `mark_diff_stale` are in `migrations/V5__gitsync.sql`; the key id columns of
//! encrypted tokens in `migrations/V7__token_encryption.sql`.

pub mod cli;
pub mod config;
pub mod decide;
pub mod github;
pub mod origin;
pub mod provider;
pub mod refresher;
pub mod tokens;

use crate::runtime::LoopInfo;

pub use config::GitsyncConfig;
pub use decide::{Found, RefreshOutcome, RowOutcome, decide};
pub use github::{GitHub, GitHubOptions, HttpStats};
pub use origin::{Origin, OriginError};
pub use provider::{
    ChecksState, PrNumber, PrState, PrStatus, Provider, ProviderConfig, ProviderConfigError, ProviderError,
    ProviderKind, provider_for, validate_providers,
};
pub use refresher::{Gitsync, GitsyncError, NAME, RefreshReport};
pub use tokens::{KeyConfigError, TokenError, TokenKeySecret, TokenKeys};

pub const INFO: LoopInfo = LoopInfo {
    name: NAME,
    config_table: "gitsync",
    interval_key: "interval",
    about: "pull-request status of each chat's branch into chat_diff_statuses",
    pausable: true,
};
