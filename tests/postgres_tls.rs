//! TLS to the real local PostgreSQL, with libpq's `sslmode` meanings.
//!
//! The server is given a certificate for `localhost` only, signed by a test CA (rcgen), in a
//! fixed directory so every test process agrees on one setup: the first process (under an
//! advisory lock) writes the files, points `ssl_cert_file`/`ssl_key_file` at them and reloads;
//! later ones find it in place and reuse it. `ssl = on` is left configured afterwards: that is
//! harmless, because a server with TLS on still accepts plaintext (every `host` line in
//! pg_hba.conf matches both), and clients that do not ask for TLS never get it.

mod common;

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use common::{TestDb, admin_url, eventually};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::sync::OnceCell;
use tokio_util::sync::CancellationToken;
use worker::db::DatabaseConfig;
use worker::db::{Db, Exec};
use worker::health::Health;
use worker::listen::{APPLICATION_NAME as LISTEN_APPLICATION_NAME, Listener};

/// Shared by every test process; readable by the `postgres` user.
const TLS_DIR: &str = "/var/lib/postgresql/worker-test-tls";
/// Serialises the setup across test processes ("worker tls" as ASCII).
const SETUP_LOCK_KEY: i64 = 0x0077_6f72_6b74_736c;

const ENCRYPTED: &str = "SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()";

static SETUP: OnceCell<PathBuf> = OnceCell::const_new();

/// The CA file the server's certificate chains to (setting the server up on first use).
async fn server_ca() -> PathBuf {
    SETUP.get_or_init(configure_server).await.clone()
}

async fn configure_server() -> PathBuf {
    let dir = Path::new(TLS_DIR);
    let (ca, cert, key) = (dir.join("ca.pem"), dir.join("server.pem"), dir.join("server.key"));
    let admin = worker::db::connect_direct(&admin_url(), "worker-tests").await.expect("admin connection");
    admin.batch_execute(&format!("SELECT pg_advisory_lock({SETUP_LOCK_KEY})")).await.expect("setup lock");
    if !(ca.exists() && cert.exists() && key.exists()) {
        write_certificates(dir, &ca, &cert, &key);
    }
    let wanted = (cert.display().to_string(), key.display().to_string());
    let row = admin
        .fetch_one("SELECT current_setting('ssl') = 'on', current_setting('ssl_cert_file'), current_setting('ssl_key_file')", &[])
        .await
        .expect("read ssl settings");
    let current: (bool, String, String) = (row.get(0), row.get(1), row.get(2));
    if current != (true, wanted.0.clone(), wanted.1.clone()) {
        // ALTER SYSTEM refuses to run in the implicit transaction of a multi-statement batch.
        for statement in [
            "ALTER SYSTEM SET ssl = on".to_owned(),
            format!("ALTER SYSTEM SET ssl_cert_file = '{}'", wanted.0),
            format!("ALTER SYSTEM SET ssl_key_file = '{}'", wanted.1),
            "SELECT pg_reload_conf()".to_owned(),
        ] {
            admin.batch_execute(&statement).await.expect("turn ssl on");
        }
        // The postmaster applies the reload asynchronously; new backends see it once it has.
        eventually(Duration::from_secs(10), "the server to load the test certificate", || async {
            match worker::db::connect_direct(&admin_url(), "worker-tests").await {
                Ok(client) => client
                    .fetch_one("SELECT current_setting('ssl_cert_file')", &[])
                    .await
                    .is_ok_and(|row| row.get::<_, String>(0) == wanted.0),
                Err(_) => false,
            }
        })
        .await;
    }
    admin.batch_execute(&format!("SELECT pg_advisory_unlock({SETUP_LOCK_KEY})")).await.expect("unlock");
    ca
}

/// A CA, and a server certificate for `localhost` only (no IP address: connecting to 127.0.0.1
/// with verify-full must fail on the name).
fn write_certificates(dir: &Path, ca_path: &Path, cert_path: &Path, key_path: &Path) {
    std::fs::create_dir_all(dir).expect("create tls dir");
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).expect("chmod tls dir");
    let ca = certificate_authority("worker test CA");
    let server_key = KeyPair::generate().expect("server key");
    let mut params = CertificateParams::new(vec!["localhost".to_owned()]).expect("server params");
    params.distinguished_name.push(DnType::CommonName, "localhost");
    let server = params.signed_by(&server_key, &ca).expect("sign server certificate");
    std::fs::write(ca_path, ca.pem()).expect("write ca");
    std::fs::write(cert_path, server.pem()).expect("write server certificate");
    std::fs::write(key_path, server_key.serialize_pem()).expect("write server key");
    // PostgreSQL refuses a key readable by group or others, or not owned by itself (or root).
    std::fs::set_permissions(key_path, std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    let postgres =
        nix::unistd::User::from_name("postgres").expect("look up postgres").expect("postgres user");
    std::os::unix::fs::chown(key_path, Some(postgres.uid.as_raw()), Some(postgres.gid.as_raw()))
        .expect("chown key");
}

fn certificate_authority(name: &str) -> CertifiedIssuer<'static, KeyPair> {
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("ca params");
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.distinguished_name.push(DnType::CommonName, name);
    CertifiedIssuer::self_signed(params, KeyPair::generate().expect("ca key")).expect("self-sign ca")
}

/// `test_db`'s URL with `host` swapped in (the server is still reached at 127.0.0.1 through
/// `hostaddr`, so `localhost` cannot resolve to an address nothing listens on) and `query` added.
fn url_with(test_db: &TestDb, host: &str, query: &str) -> String {
    let mut url = url::Url::parse(&test_db.url).expect("test url");
    url.set_host(Some(host)).expect("host");
    format!("{url}?hostaddr=127.0.0.1&{query}")
}

async fn encrypted_direct(url: &str) -> Result<bool, String> {
    let client = worker::db::connect_direct(url, "worker-tests").await.map_err(|e| e.to_string())?;
    let row = client.fetch_one(ENCRYPTED, &[]).await.map_err(|e| e.to_string())?;
    Ok(row.get(0))
}

#[tokio::test]
async fn sslmode_require_encrypts_the_pool_the_listener_and_migrations() {
    server_ca().await;
    let test_db = TestDb::empty().await;
    let url = url_with(&test_db, "127.0.0.1", "sslmode=require");

    // Migrations: require fails rather than fall back, so success means the session was TLS.
    let applied = worker::migrate::run(&url).await.expect("migrate over TLS");
    assert!(!applied.is_empty());

    let db = Db::new(&DatabaseConfig { url: url.clone(), pool_size: 2, ..DatabaseConfig::default() })
        .expect("pool");
    let conn = db.get().await.expect("pooled connection");
    let encrypted: bool = conn.fetch_one(ENCRYPTED, &[]).await.expect("pg_stat_ssl").get(0);
    assert!(encrypted, "the pool's connection is encrypted");

    let listener = Listener::default();
    let stop = CancellationToken::new();
    listener.start(url, Health::default(), stop.clone());
    let _subscription = listener.subscribe("worker_tls_test").await;
    const LISTENER_SSL: &str = "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
                                WHERE a.application_name = $1 AND a.datname = $2";
    let rows = conn
        .fetch_all(
            LISTENER_SSL,
            &[
                (&LISTEN_APPLICATION_NAME, tokio_postgres::types::Type::TEXT),
                (&test_db.name, tokio_postgres::types::Type::TEXT),
            ],
        )
        .await
        .expect("listener's pg_stat_ssl");
    let flags: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
    assert_eq!(flags, vec![true], "one encrypted LISTEN connection");
    stop.cancel();
}

#[tokio::test]
async fn verify_full_with_the_servers_ca_connects_encrypted() {
    let ca = server_ca().await;
    let test_db = TestDb::new().await;
    let url = url_with(&test_db, "localhost", &format!("sslmode=verify-full&sslrootcert={}", ca.display()));
    assert_eq!(encrypted_direct(&url).await, Ok(true));
}

#[tokio::test]
async fn verify_full_with_another_ca_fails_naming_the_ca_file() {
    server_ca().await;
    let test_db = TestDb::new().await;
    let other = tempfile::tempdir().expect("tempdir");
    let other_ca = other.path().join("other-ca.pem");
    std::fs::write(&other_ca, certificate_authority("some other CA").pem()).expect("write other ca");
    let url =
        url_with(&test_db, "localhost", &format!("sslmode=verify-full&sslrootcert={}", other_ca.display()));
    let err = encrypted_direct(&url).await.expect_err("an untrusted certificate must be refused");
    let expected = format!(
        "sslmode=verify-full: certificate is not signed by a CA in sslrootcert={}",
        other_ca.display()
    );
    assert!(err.contains(&expected), "{err}");
}

#[tokio::test]
async fn verify_full_refuses_a_certificate_for_another_host_but_verify_ca_accepts_it() {
    let ca = server_ca().await;
    let test_db = TestDb::new().await;
    let root = format!("sslrootcert={}", ca.display());
    let url = url_with(&test_db, "127.0.0.1", &format!("sslmode=verify-full&{root}"));
    let err = encrypted_direct(&url).await.expect_err("the certificate is for localhost only");
    assert!(err.contains("sslmode=verify-full: certificate is for host localhost, not 127.0.0.1"), "{err}");
    let pool = Db::new(&DatabaseConfig { url, pool_size: 1, ..DatabaseConfig::default() }).expect("pool");
    let err = pool.get().await.expect_err("the pool refuses the same certificate").to_string();
    assert!(err.contains("certificate is for host localhost, not 127.0.0.1"), "{err}");

    let url = url_with(&test_db, "127.0.0.1", &format!("sslmode=verify-ca&{root}"));
    assert_eq!(encrypted_direct(&url).await, Ok(true), "verify-ca checks the chain, not the name");
}

#[tokio::test]
async fn disable_connects_in_plaintext_and_prefer_encrypts_when_the_server_offers_tls() {
    server_ca().await;
    let test_db = TestDb::new().await;
    let disable = url_with(&test_db, "127.0.0.1", "sslmode=disable");
    assert_eq!(encrypted_direct(&disable).await, Ok(false));
    let prefer = url_with(&test_db, "127.0.0.1", "sslmode=prefer");
    assert_eq!(encrypted_direct(&prefer).await, Ok(true));
    // No sslmode at all is libpq's default, prefer.
    assert_eq!(encrypted_direct(&test_db.url).await, Ok(true));
}

#[tokio::test]
async fn an_unreadable_ca_file_is_reported_with_the_option_that_named_it() {
    let test_db = TestDb::new().await;
    let url = url_with(&test_db, "localhost", "sslmode=verify-full&sslrootcert=/nonexistent/ca.pem");
    let err = encrypted_direct(&url).await.expect_err("missing CA file");
    assert!(err.contains("sslrootcert=/nonexistent/ca.pem: cannot read"), "{err}");
}

#[tokio::test]
async fn a_client_certificate_is_loaded_and_a_missing_key_file_is_named() {
    server_ca().await;
    let test_db = TestDb::new().await;
    let dir = tempfile::tempdir().expect("tempdir");
    let issuer = certificate_authority("client CA");
    let key = KeyPair::generate().expect("client key");
    let mut params = CertificateParams::new(Vec::<String>::new()).expect("client params");
    params.distinguished_name.push(DnType::CommonName, "postgres");
    let cert = params.signed_by(&key, &issuer).expect("sign client certificate");
    let (cert_path, key_path) = (dir.path().join("client.pem"), dir.path().join("client.key"));
    std::fs::write(&cert_path, cert.pem()).expect("write client certificate");
    std::fs::write(&key_path, key.serialize_pem()).expect("write client key");

    // This server does not ask for a client certificate (no ssl_ca_file), so the connection
    // proves the files load and the handshake still completes.
    let query = format!("sslmode=require&sslcert={}&sslkey={}", cert_path.display(), key_path.display());
    assert_eq!(encrypted_direct(&url_with(&test_db, "127.0.0.1", &query)).await, Ok(true));

    let missing = dir.path().join("missing.key");
    let query = format!("sslmode=require&sslcert={}&sslkey={}", cert_path.display(), missing.display());
    let err = encrypted_direct(&url_with(&test_db, "127.0.0.1", &query)).await.expect_err("no key file");
    assert!(err.contains(&format!("sslkey={}: cannot read", missing.display())), "{err}");
}

/// Acceptance of the production TLS floor: the real binary with `APP_ENV=production` and a
/// `verify-full` URL against the test CA passes `config check` without a warning, migrates, and
/// runs until ready, every one of its connections encrypted (`tests/tls_floor.rs` has the
/// refusals).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_production_config_with_verify_full_against_the_test_ca_checks_migrates_and_runs() {
    use common::process::{BIN, free_port, inherited_overrides, readyz, repo_path};
    use nix::sys::signal::{Signal, kill};
    use nix::unistd::Pid;

    let ca = server_ca().await;
    let test_db = TestDb::empty().await;
    let application = "worker-production-tls";
    let url = url_with(
        &test_db,
        "localhost",
        &format!("sslmode=verify-full&sslrootcert={}&application_name={application}", ca.display()),
    );
    let dir = tempfile::tempdir().expect("dir");
    let port = free_port();
    // No Redis: the loops that use it are off, so the floor asks nothing of redis.url.
    let config = dir.path().join("worker.toml");
    std::fs::write(
        &config,
        format!(
            "[app]\nenv = \"production\"\n\n[log]\nformat = \"json\"\n\n[database]\npool_size = 4\n\n\
             [health]\nlisten = \"127.0.0.1:{port}\"\n\n[workers]\ninterval = \"200ms\"\n\n\
             [outbox]\nenabled = false\n\n[counters]\nenabled = false\n"
        ),
    )
    .expect("write config");
    let command = |args: &[&str]| {
        let mut command = tokio::process::Command::new(BIN);
        for key in inherited_overrides() {
            command.env_remove(key);
        }
        command
            .args(args)
            .args(["--config", config.to_str().expect("utf-8")])
            .env("DATABASE_URL", &url)
            .current_dir(repo_path(""))
            .kill_on_drop(true);
        command
    };

    for step in [&["config", "check"][..], &["migrate"]] {
        let out = command(step).output().await.expect("run worker");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "{step:?}: {stderr}");
        assert!(!stderr.contains("warning") && !stderr.contains("WARN"), "{step:?}: {stderr}");
    }

    let mut child = command(&["run"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("worker run");
    eventually(Duration::from_secs(10), "/readyz to answer 200", || async {
        matches!(readyz(port).await, Some((200, _)))
    })
    .await;
    let observer = worker::db::connect_direct(&admin_url(), "worker-tests").await.expect("admin connection");
    let rows = observer
        .fetch_all(
            "SELECT s.ssl FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) \
             WHERE a.application_name = $1 AND a.datname = $2",
            &[
                (&application, tokio_postgres::types::Type::TEXT),
                (&test_db.name, tokio_postgres::types::Type::TEXT),
            ],
        )
        .await
        .expect("the worker's connections");
    let encrypted: Vec<bool> = rows.iter().map(|r| r.get(0)).collect();
    assert!(!encrypted.is_empty() && encrypted.iter().all(|ssl| *ssl), "{encrypted:?}");
    kill(Pid::from_raw(child.id().expect("pid") as i32), Signal::SIGTERM).expect("SIGTERM");
    let status =
        tokio::time::timeout(Duration::from_secs(15), child.wait()).await.expect("drains").expect("wait");
    assert_eq!(status.code(), Some(0));
}
