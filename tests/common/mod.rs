//! Shared fixtures for integration tests: a fresh database per test (cloned from a migrated
//! template, so it costs one CREATE DATABASE), a unique Redis key prefix per test, and helpers
//! that wait on conditions with a deadline instead of sleeping.
#![allow(dead_code)] // each test binary uses a different subset of these helpers

pub mod metrics;
pub mod otlp;
pub mod pgbouncer;
pub mod process;

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::path::Path;
use std::time::Duration;

use tokio::sync::OnceCell;
use worker::config::Config;
use worker::db::DatabaseConfig;
use worker::db::{Db, Exec};

/// Admin connection (any database but the test ones); override with WORKER_TEST_ADMIN_URL.
pub fn admin_url() -> String {
    std::env::var("WORKER_TEST_ADMIN_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/postgres".into())
}

pub fn redis_url() -> String {
    std::env::var("WORKER_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into())
}

/// URL of database `name` on the same server as the admin URL.
pub fn url_for(name: &str) -> String {
    let mut url = url::Url::parse(&admin_url()).expect("admin url parses");
    url.set_path(&format!("/{name}"));
    url.to_string()
}

static TEMPLATE: OnceCell<String> = OnceCell::const_new();

/// Name of the migrated template database for the current migrations (created once per
/// migration set, under an advisory lock so parallel test processes agree).
async fn template() -> String {
    TEMPLATE
        .get_or_init(|| async {
            let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("migrations");
            let mut files: Vec<_> = std::fs::read_dir(&dir).expect("migrations dir").flatten().collect();
            files.sort_by_key(|e| e.file_name());
            let mut hasher = DefaultHasher::new();
            for file in files {
                file.file_name().hash(&mut hasher);
                std::fs::read(file.path()).expect("read migration").hash(&mut hasher);
            }
            let hash = hasher.finish();
            let name = format!("worker_tpl_{hash:016x}");
            let admin = worker::db::connect_direct(&admin_url(), "worker-tests").await.expect("admin connection");
            let lock_key = (hash >> 1) as i64;
            admin.batch_execute(&format!("SELECT pg_advisory_lock({lock_key})")).await.expect("template lock");
            let exists = admin
                .fetch_opt("SELECT 1::int4 FROM pg_database WHERE datname = $1", &[(&name, tokio_postgres::types::Type::TEXT)])
                .await
                .expect("look up template")
                .is_some();
            if !exists {
                let building = format!("{name}_building");
                admin.batch_execute(&format!("DROP DATABASE IF EXISTS {building} WITH (FORCE)")).await.expect("drop stale");
                admin.batch_execute(&format!("CREATE DATABASE {building}")).await.expect("create template");
                worker::migrate::run(&url_for(&building)).await.expect("migrate template");
                // The migrator's connection closes asynchronously; FORCE-rename is not a thing, so
                // terminate stragglers first.
                admin
                    .batch_execute(&format!(
                        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{building}' AND pid <> pg_backend_pid()"
                    ))
                    .await
                    .expect("terminate template sessions");
                admin.batch_execute(&format!("ALTER DATABASE {building} RENAME TO {name}")).await.expect("publish template");
            }
            admin.batch_execute(&format!("SELECT pg_advisory_unlock({lock_key})")).await.expect("template unlock");
            name
        })
        .await
        .clone()
}

/// A database of its own for one test, dropped when the value is dropped.
pub struct TestDb {
    pub name: String,
    pub url: String,
    pub db: Db,
}

impl TestDb {
    pub async fn new() -> Self {
        Self::with_pool_size(10).await
    }

    pub async fn with_pool_size(pool_size: usize) -> Self {
        let template = template().await;
        let name = format!("worker_test_{}", uuid::Uuid::new_v4().simple());
        let admin = worker::db::connect_direct(&admin_url(), "worker-tests").await.expect("admin connection");
        admin
            .batch_execute(&format!("CREATE DATABASE {name} TEMPLATE {template}"))
            .await
            .expect("create test database");
        let url = url_for(&name);
        let db = Db::new(&Self::database_config_for(&url, pool_size)).expect("pool");
        Self { name, url, db }
    }

    /// An empty database with no schema (for testing migrations themselves).
    pub async fn empty() -> Self {
        let name = format!("worker_test_{}", uuid::Uuid::new_v4().simple());
        let admin = worker::db::connect_direct(&admin_url(), "worker-tests").await.expect("admin connection");
        admin.batch_execute(&format!("CREATE DATABASE {name}")).await.expect("create empty database");
        let url = url_for(&name);
        let db = Db::new(&Self::database_config_for(&url, 4)).expect("pool");
        Self { name, url, db }
    }

    pub fn database_config_for(url: &str, pool_size: usize) -> DatabaseConfig {
        DatabaseConfig { url: url.to_owned(), pool_size, ..DatabaseConfig::default() }
    }

    pub fn database_config(&self) -> DatabaseConfig {
        Self::database_config_for(&self.url, 10)
    }

    /// A config pointing at this database and a fresh Redis prefix.
    pub fn config(&self) -> Config {
        let mut config = Config { database: self.database_config(), ..Config::default() };
        config.redis.url = redis_url();
        config.redis.prefix = unique_prefix();
        config.runtime.jitter = 0.0;
        config
    }

    /// A second, independent pool on the same database (another "replica").
    pub fn another_pool(&self) -> Db {
        Db::new(&self.database_config()).expect("pool")
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let name = self.name.clone();
        // Drop runs outside any async context guarantee: use a private runtime on a thread.
        let _ = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                if let Ok(admin) = worker::db::connect_direct(&admin_url(), "worker-tests").await {
                    let _ =
                        admin.batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                }
            });
        })
        .join();
    }
}

impl TestDb {
    /// Terminates this database's LISTEN backends (as a failover or a proxy would drop them);
    /// returns how many there were.
    pub async fn terminate_listeners(&self) -> i64 {
        self.db
            .get()
            .await
            .expect("conn")
            .fetch_one(
                "SELECT count(pg_terminate_backend(pid))::int8 FROM pg_stat_activity \
                 WHERE application_name = $1 AND datname = current_database()",
                &[(&worker::listen::APPLICATION_NAME, tokio_postgres::types::Type::TEXT)],
            )
            .await
            .expect("terminate the LISTEN backends")
            .get(0)
    }
}

/// A Redis key prefix no other test uses.
pub fn unique_prefix() -> String {
    format!("test:{}", uuid::Uuid::new_v4().simple())
}

/// Waits until `check` returns true, failing the test with `what` after `limit`. For conditions
/// that another task or process makes true: the wait ends as soon as it holds.
pub async fn eventually<F, Fut>(limit: Duration, what: &str, check: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    assert!(within(limit, check).await, "timed out after {limit:?} waiting for {what}");
}

/// Waits up to `limit` for `check` (polled every 20 ms); whether it came true, for a caller that
/// reports its figures before failing.
pub async fn within<F, Fut>(limit: Duration, mut check: F) -> bool
where
    F: FnMut() -> Fut,
    Fut: Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if check().await {
            return true;
        }
        if tokio::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
