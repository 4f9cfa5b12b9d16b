//! How the worker's PostgreSQL connections are opened (docs/database.md#dead-connections): every
//! one of them — the pool's, the LISTEN connection and the migrator's — carries `[database]`'s
//! TCP keepalives and `tcp_user_timeout`, read back from the sockets themselves, and the wait for
//! the migration lock ends at `database.migrate_lock_timeout` with the holder's pid.

mod common;

use std::time::{Duration, Instant};

use common::{TestDb, eventually};
use tokio_postgres::types::Type;
use tokio_util::sync::CancellationToken;
use worker::db::{DatabaseConfig, Db, Exec};
use worker::health::Health;
use worker::listen::Listener;
use worker::migrate::{self, MIGRATION_LOCK_KEY};

/// Values no default and no kernel default has, so finding them on a socket means they were set;
/// the pool's sessions are named apart from the test's own pool.
fn config_with_socket_settings(url: &str) -> DatabaseConfig {
    let url = format!("{url}?application_name={POOL_APPLICATION_NAME}");
    DatabaseConfig {
        keepalives_idle: Duration::from_secs(7),
        keepalives_interval: Duration::from_secs(3),
        keepalives_retries: 4,
        tcp_user_timeout: Duration::from_millis(11_500),
        migrate_lock_timeout: Duration::from_secs(30),
        ..TestDb::database_config_for(&url, 1)
    }
}

const POOL_APPLICATION_NAME: &str = "sockets-test-pool";

/// The socket options this process set on its TCP connection from `local_port`: SO_KEEPALIVE,
/// TCP_KEEPIDLE (s), TCP_KEEPINTVL (s), TCP_KEEPCNT, TCP_USER_TIMEOUT (ms).
fn socket_options(local_port: u16) -> (i32, i32, i32, i32, i32) {
    use nix::libc;

    let inode = socket_inode(local_port).unwrap_or_else(|| panic!("no TCP socket from port {local_port}"));
    let fd = std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .flatten()
        .find(|entry| {
            std::fs::read_link(entry.path())
                .is_ok_and(|target| target.to_string_lossy() == format!("socket:[{inode}]"))
        })
        .and_then(|entry| entry.file_name().to_str()?.parse::<i32>().ok())
        .unwrap_or_else(|| panic!("socket inode {inode} (port {local_port}) is not open in this process"));
    // Only read: the connection keeps owning its descriptor.
    let get = |level: libc::c_int, name: libc::c_int| -> i32 {
        let mut value: libc::c_int = 0;
        let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
        // SAFETY: an open socket of this process, and a c_int-sized buffer with its length.
        let rc = unsafe { libc::getsockopt(fd, level, name, (&raw mut value).cast(), &raw mut len) };
        assert_eq!(rc, 0, "getsockopt({level}, {name}): {}", std::io::Error::last_os_error());
        value
    };
    (
        get(libc::SOL_SOCKET, libc::SO_KEEPALIVE),
        get(libc::IPPROTO_TCP, libc::TCP_KEEPIDLE),
        get(libc::IPPROTO_TCP, libc::TCP_KEEPINTVL),
        get(libc::IPPROTO_TCP, libc::TCP_KEEPCNT),
        get(libc::IPPROTO_TCP, libc::TCP_USER_TIMEOUT),
    )
}

/// The inode of the TCP socket whose local port is `port` (from /proc/net/tcp and tcp6).
fn socket_inode(port: u16) -> Option<String> {
    let wanted = format!(":{port:04X}");
    ["/proc/net/tcp", "/proc/net/tcp6"].iter().find_map(|table| {
        let text = std::fs::read_to_string(table).unwrap_or_default();
        text.lines().skip(1).find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            (fields.len() > 9 && fields[1].ends_with(&wanted)).then(|| fields[9].to_owned())
        })
    })
}

/// The client port of the session of `application_name` in `database`, as the server sees it.
async fn client_port(db: &Db, database: &str, application_name: &str) -> Option<u16> {
    let row = db
        .get()
        .await
        .expect("conn")
        .fetch_opt(
            "SELECT client_port FROM pg_stat_activity WHERE datname = $1 AND application_name = $2",
            &[(&database, Type::TEXT), (&application_name, Type::TEXT)],
        )
        .await
        .expect("pg_stat_activity")?;
    row.get::<_, Option<i32>>(0).and_then(|port| u16::try_from(port).ok())
}

#[tokio::test]
async fn the_pool_the_listener_and_the_migrator_carry_the_configured_keepalives_and_user_timeout() {
    let test_db = TestDb::empty().await;
    let config = config_with_socket_settings(&test_db.url);

    // The migrator waits on a held lock, so its connection stays open to be looked at.
    let holder = worker::db::connect_direct(&test_db.url, "lock-holder").await.expect("holder");
    holder.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")).await.expect("lock");
    let migrating = tokio::spawn(migrate::run(migrate::Target::from(&config)));

    let pool = Db::new(&config).expect("pool");
    let pooled = pool.get().await.expect("pooled connection");
    pooled.fetch_one("SELECT 1::int4", &[]).await.expect("select");

    let listener = Listener::default();
    let stop = CancellationToken::new();
    listener.start(config.listen_direct(), Health::default(), stop.clone());
    let _subscription = listener.subscribe("worker_sockets_test").await;

    let observer = &test_db.db;
    eventually(Duration::from_secs(10), "the migrator to wait on the lock", || async {
        client_port(observer, &test_db.name, "worker-migrate").await.is_some()
    })
    .await;
    let expected = (1, 7, 3, 4, 11_500);
    for application_name in [POOL_APPLICATION_NAME, worker::listen::APPLICATION_NAME, "worker-migrate"] {
        let port = client_port(observer, &test_db.name, application_name)
            .await
            .unwrap_or_else(|| panic!("no {application_name} session"));
        assert_eq!(socket_options(port), expected, "{application_name}'s socket (port {port})");
    }

    holder.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")).await.expect("unlock");
    let applied = migrating.await.expect("join").expect("migrates once the lock is free");
    assert!(!applied.is_empty());
    stop.cancel();
}

#[tokio::test]
async fn a_held_migration_lock_fails_the_migrator_within_the_timeout_naming_the_holders_pid() {
    let test_db = TestDb::empty().await;
    let holder = worker::db::connect_direct(&test_db.url, "lock-holder").await.expect("holder");
    holder.batch_execute(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK_KEY})")).await.expect("lock");
    let pid: i32 = holder.fetch_one("SELECT pg_backend_pid()", &[]).await.expect("pid").get(0);
    let target =
        migrate::Target { direct: test_db.url.as_str().into(), lock_timeout: Duration::from_secs(1) };

    let started = Instant::now();
    // Without a bound the migrator waits for the holder forever: cut it off well past the bound.
    let outcome =
        tokio::time::timeout(Duration::from_secs(15), migrate::run(target.clone())).await.unwrap_or_else(
            |_| panic!("still waiting after {:?}: the lock wait has no bound", started.elapsed()),
        );
    let took = started.elapsed();
    let err = outcome.expect_err("the lock is held by another session").to_string();
    assert!(err.contains(&format!("held by the session with pid {pid}")), "{err}");
    assert!(err.contains("database.migrate_lock_timeout (1s)"), "{err}");
    assert!(took >= Duration::from_secs(1) && took < Duration::from_secs(5), "failed after {took:?}");
    let tables: i64 = test_db
        .db
        .get()
        .await
        .expect("conn")
        .fetch_one("SELECT count(*)::int8 FROM pg_tables WHERE schemaname = 'public'", &[])
        .await
        .expect("tables")
        .get(0);
    assert_eq!(tables, 0, "nothing was migrated without the lock");

    // The holder lets go: the same call migrates (the bound is on the wait, not the work).
    holder.batch_execute(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK_KEY})")).await.expect("unlock");
    let applied = migrate::run(target).await.expect("migrates once the lock is free");
    assert!(!applied.is_empty());
}
