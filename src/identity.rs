//! Who this process is: the id it registers in `workers` and stamps on everything it owns.

use uuid::Uuid;

/// The crate version.
pub const VERSION: &str = env!("CARGO_PKG_VERSION");
/// The commit built (`build.rs`: `WORKER_GIT_COMMIT`, else `git rev-parse`, else `unknown`).
pub const COMMIT: &str = env!("WORKER_BUILD_COMMIT");
/// The build date, YYYY-MM-DD UTC (`SOURCE_DATE_EPOCH` when set).
pub const BUILD_DATE: &str = env!("WORKER_BUILD_DATE");
/// What `worker --version` prints after the name.
pub const LONG_VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (commit ",
    env!("WORKER_BUILD_COMMIT"),
    ", built ",
    env!("WORKER_BUILD_DATE"),
    ")"
);

/// The build, for `/readyz` info.
pub fn build_info() -> serde_json::Value {
    serde_json::json!({ "version": VERSION, "commit": COMMIT, "date": BUILD_DATE })
}

/// Identity of this process, as recorded in `workers`.
#[derive(Debug, Clone)]
pub struct WorkerIdentity {
    pub id: Uuid,
    pub hostname: String,
    pub version: String,
}

impl WorkerIdentity {
    /// A fresh identity: a new id each process start, so a restarted worker never inherits the
    /// chats (or the lease) of its previous life.
    pub fn generate() -> Self {
        let hostname = hostname::get().map(|h| h.to_string_lossy().into_owned()).unwrap_or_default();
        Self { id: Uuid::new_v4(), hostname, version: VERSION.to_owned() }
    }
}
