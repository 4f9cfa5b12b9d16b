//! Gitsync (SPEC §7.2): keeps `chat_diff_statuses` in step with the pull request of each chat's
//! branch.
//!
//! - [`refresher`]: the `gitsync` loop — lease due rows, resolve a token per (owner, origin),
//!   ask the provider under one semaphore, write each row back.
//! - [`config`]: the `[gitsync]` table and its `[[gitsync.providers]]`.
//! - [`cli`]: `worker gitsync stats | refresh <chat_id>`.
//! - [`origin`]: git remote origins → host, owner, repository.
//! - [`provider`]: provider configuration and matching, the [`Provider`] trait, [`PrStatus`]
//!   (every field the row stores) and [`ProviderError`].
//! - [`github`]: the GitHub REST client (ETag cache, bounded bodies, rate-limit detection) and
//!   the pure derivations it applies to GitHub's payloads.
//!
//! The schema and `mark_diff_stale` are in `migrations/V5__gitsync.sql`.

pub mod cli;
pub mod config;
pub mod github;
pub mod origin;
pub mod provider;
pub mod refresher;

pub use config::GitsyncConfig;
pub use github::{GitHub, GitHubOptions, HttpStats};
pub use origin::{Origin, OriginError};
pub use provider::{
    ChecksState, PrNumber, PrState, PrStatus, Provider, ProviderConfig, ProviderConfigError, ProviderError,
    ProviderKind, provider_for, validate_providers,
};
pub use refresher::{Gitsync, GitsyncError, NAME, RefreshOutcome, RefreshReport};
