//! Who this process is: the id it registers in `workers` and stamps on everything it owns.

use uuid::Uuid;

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
        Self { id: Uuid::new_v4(), hostname, version: env!("CARGO_PKG_VERSION").to_owned() }
    }
}
