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
use std::sync::Arc;
use std::time::Duration;

use common::{TestDb, admin_url, eventually};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
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

/// A role that can only log in with SCRAM-SHA-256 over TCP (a pg_hba.conf line of its own, ahead
/// of the trust lines), for channel binding.
const SCRAM_USER: &str = "worker_scram_test";
const SCRAM_PASSWORD: &str = "worker-scram-test-password";

static SCRAM: OnceCell<()> = OnceCell::const_new();

/// Sets up [`SCRAM_USER`] once (TLS first): the role with a SCRAM verifier, and its pg_hba.conf
/// line, under the same lock as the TLS setup. Left in place afterwards: it concerns that role
/// only.
async fn scram_user() {
    SCRAM.get_or_init(configure_scram_user).await;
}

async fn configure_scram_user() {
    server_ca().await;
    let admin = worker::db::connect_direct(&admin_url(), "worker-tests").await.expect("admin connection");
    admin.batch_execute(&format!("SELECT pg_advisory_lock({SETUP_LOCK_KEY})")).await.expect("setup lock");
    let exists = admin
        .fetch_opt(
            "SELECT 1::int4 FROM pg_roles WHERE rolname = $1",
            &[(&SCRAM_USER, tokio_postgres::types::Type::TEXT)],
        )
        .await
        .expect("look up the role")
        .is_some();
    let verb = if exists { "ALTER" } else { "CREATE" };
    // The password is hashed by the server with the session's password_encryption.
    admin
        .batch_execute(&format!(
            "SET password_encryption = 'scram-sha-256'; \
             {verb} ROLE {SCRAM_USER} LOGIN PASSWORD '{SCRAM_PASSWORD}'"
        ))
        .await
        .expect("SCRAM role");
    let hba_file: String =
        admin.fetch_one("SELECT current_setting('hba_file')", &[]).await.expect("hba_file").get(0);
    let rules = std::fs::read_to_string(&hba_file).expect("read pg_hba.conf");
    let line = format!("host all {SCRAM_USER} 127.0.0.1/32 scram-sha-256");
    if !rules.lines().any(|l| l.trim() == line) {
        // First match wins, so the line goes ahead of every trust line.
        let marked = format!("# worker tests (tests/postgres_tls.rs): channel binding\n{line}\n{rules}");
        std::fs::write(&hba_file, marked).expect("write pg_hba.conf");
    }
    // Also when the line was there: a run that wrote it may have stopped before the reload.
    admin.batch_execute("SELECT pg_reload_conf()").await.expect("reload");
    // The reload is asynchronous: wait until a login without the password is refused.
    let without_password = url_for_user(&common::url_for("postgres"), None, "sslmode=disable");
    eventually(Duration::from_secs(10), "the server to ask the SCRAM user for a password", || async {
        worker::db::connect_direct(&without_password, "worker-tests")
            .await
            .is_err_and(|e| e.to_string().contains("password"))
    })
    .await;
    admin.batch_execute(&format!("SELECT pg_advisory_unlock({SETUP_LOCK_KEY})")).await.expect("unlock");
}

/// `url` as [`SCRAM_USER`] (with `password`) and `query` added.
fn url_for_user(url: &str, password: Option<&str>, query: &str) -> String {
    let mut url = url::Url::parse(url).expect("url");
    url.set_username(SCRAM_USER).expect("user");
    url.set_password(password).expect("password");
    format!("{url}?{query}")
}

#[tokio::test]
async fn channel_binding_require_logs_in_over_tls_and_is_refused_by_name_without_it() {
    let ca = server_ca().await;
    scram_user().await;
    let test_db = TestDb::new().await;
    let scram = |query: &str| url_for_user(&test_db.url, Some(SCRAM_PASSWORD), query);

    // tokio-postgres refuses a `require` login that did not run SCRAM-SHA-256-PLUS, so each
    // success is a bound login (without the stream's tls-server-end-point these fail).
    assert_eq!(encrypted_direct(&scram("sslmode=require&channel_binding=require")).await, Ok(true));
    let verified = url_with_user_at_localhost(&test_db, &ca);
    assert_eq!(encrypted_direct(&verified).await, Ok(true), "verify-full + channel_binding=require");
    let pool = Db::new(&DatabaseConfig {
        url: scram("sslmode=require&channel_binding=require"),
        pool_size: 1,
        ..DatabaseConfig::default()
    })
    .expect("pool");
    let conn = pool.get().await.expect("the pool logs in with channel binding");
    assert!(conn.fetch_one(ENCRYPTED, &[]).await.expect("pg_stat_ssl").get::<_, bool>(0));

    // Without TLS there is nothing to bind to: refused by name, before any connection, and by
    // `config check`.
    let plaintext = scram("sslmode=disable&channel_binding=require");
    let err = encrypted_direct(&plaintext).await.expect_err("require without TLS");
    assert!(err.contains("channel_binding=require needs TLS") && err.contains("sslmode=disable"), "{err}");
    let violation = DatabaseConfig { url: plaintext, ..DatabaseConfig::default() }
        .validate()
        .expect_err("config check refuses it");
    assert_eq!(violation.key, "url");
    assert!(violation.problem.contains("channel_binding=require"), "{violation:?}");

    // A login that skips SCRAM (trust, as the `postgres` user here) cannot satisfy it either:
    // a server, or an interceptor, that never asks for the password proves nothing.
    let trust = url_with(&test_db, "127.0.0.1", "sslmode=require&channel_binding=require");
    let err = encrypted_direct(&trust).await.expect_err("a trust login is not bound");
    assert!(err.contains("channel binding"), "{err}");
    // The role itself is fine without binding, where it is not required.
    assert_eq!(encrypted_direct(&scram("sslmode=disable")).await, Ok(false));
}

/// The production form: verify-full against the test CA, as [`SCRAM_USER`], binding required.
fn url_with_user_at_localhost(test_db: &TestDb, ca: &Path) -> String {
    let mut url = url::Url::parse(&test_db.url).expect("test url");
    url.set_host(Some("localhost")).expect("host");
    let query = format!(
        "hostaddr=127.0.0.1&sslmode=verify-full&sslrootcert={}&channel_binding=require",
        ca.display()
    );
    url_for_user(url.as_str(), Some(SCRAM_PASSWORD), &query)
}

/// PostgreSQL's SSLRequest: length 8, code 80877103.
const SSL_REQUEST: [u8; 8] = [0, 0, 0, 8, 0x04, 0xd2, 0x16, 0x2f];

/// An interceptor on the path, as an attacker would run one: it answers the client's TLS with a
/// certificate of its own (a client with `sslmode=require` checks none), opens a TLS session of
/// its own to the real server, and relays the decrypted bytes both ways, login included.
/// Returns its port.
async fn start_interceptor(server_ca: &Path) -> u16 {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};

    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let key = KeyPair::generate().expect("interceptor key");
    let params = CertificateParams::new(vec!["localhost".to_owned()]).expect("interceptor params");
    let certificate = params.self_signed(&key).expect("interceptor certificate");
    let own = rustls::ServerConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![certificate.der().clone()], PrivateKeyDer::Pkcs8(key.serialize_der().into()))
        .expect("interceptor server config");
    let mut roots = rustls::RootCertStore::empty();
    for ca in CertificateDer::pem_file_iter(server_ca).expect("read ca") {
        roots.add(ca.expect("ca pem")).expect("add ca");
    }
    let upstream = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots)
        .with_no_client_auth();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(own));
    let connector = tokio_rustls::TlsConnector::from(Arc::new(upstream));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind interceptor");
    let port = listener.local_addr().expect("addr").port();
    tokio::spawn(async move {
        while let Ok((mut client, _)) = listener.accept().await {
            let (acceptor, connector) = (acceptor.clone(), connector.clone());
            tokio::spawn(async move {
                let mut request = [0u8; 8];
                client.read_exact(&mut request).await?;
                assert_eq!(request, SSL_REQUEST, "the client asks for TLS first");
                client.write_all(b"S").await?;
                let mut client = acceptor.accept(client).await?;
                let mut server = tokio::net::TcpStream::connect("127.0.0.1:5432").await?;
                server.write_all(&SSL_REQUEST).await?;
                let mut answer = [0u8; 1];
                server.read_exact(&mut answer).await?;
                assert_eq!(&answer, b"S", "the server offers TLS");
                let name = ServerName::try_from("localhost").expect("name");
                let mut server = connector.connect(name, server).await?;
                tokio::io::copy_bidirectional(&mut client, &mut server).await.map(drop)
            });
        }
    });
    port
}

#[tokio::test]
async fn an_interceptor_relaying_a_scram_login_is_refused_once_the_login_is_bound_to_tls() {
    let ca = server_ca().await;
    scram_user().await;
    let test_db = TestDb::new().await;
    let port = start_interceptor(&ca).await;
    let through = |binding: &str| {
        format!(
            "postgres://{SCRAM_USER}:{SCRAM_PASSWORD}@127.0.0.1:{port}/{}?sslmode=require&channel_binding={binding}",
            test_db.name
        )
    };
    // Unbound, the relayed login succeeds: the interceptor is in the session as the user.
    assert_eq!(encrypted_direct(&through("disable")).await, Ok(true), "the attack, without binding");
    // Bound (require, and prefer, the default, since the server offers SCRAM-SHA-256-PLUS), the
    // server compares the hash of its own certificate with the one the client saw, the
    // interceptor's, and refuses the login.
    for binding in ["require", "prefer"] {
        let err = encrypted_direct(&through(binding)).await.expect_err(binding);
        assert!(err.contains("SCRAM channel binding check failed"), "channel_binding={binding}: {err}");
    }
}
