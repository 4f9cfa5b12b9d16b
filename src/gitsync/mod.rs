//! Gitsync (SPEC §7.2): keeps `chat_diff_statuses` in step with the pull request of each chat's
//! branch. This part is the database-free core:
//!
//! - [`origin`]: git remote origins → host, owner, repository.
//! - [`provider`]: provider configuration and matching, the [`Provider`] trait, [`PrStatus`]
//!   (every field the row stores) and [`ProviderError`].
//! - [`github`]: the GitHub REST client (ETag cache, bounded bodies, rate-limit detection) and
//!   the pure derivations it applies to GitHub's payloads.

pub mod github;
pub mod origin;
pub mod provider;

pub use github::{GitHub, GitHubOptions, HttpStats};
pub use origin::{Origin, OriginError};
pub use provider::{
    ChecksState, PrNumber, PrState, PrStatus, Provider, ProviderConfig, ProviderConfigError, ProviderError,
    ProviderKind, provider_for, validate_providers,
};
