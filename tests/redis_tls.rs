//! Redis over TLS: a private redis-server with a TLS port only and a certificate from a throwaway
//! CA; the outbox drains through a `rediss://` client that trusts that CA via `redis.ca_file`.

mod common;
mod outbox_support;
mod tls_support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use fred::prelude::{ClientLike, EventInterface};
use outbox_support::Harness;
use outbox_support::redis_server::free_port;
use tls_support::TestPki;
use worker::db::Db;
use worker::redis::RedisConfig;
use worker::runtime::{Loop, Progress, Tick};

const LIMIT: Duration = Duration::from_secs(20);

/// redis-server listening on a TLS port only (`--port 0`), killed on drop.
struct TlsRedis {
    child: Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl TlsRedis {
    async fn start(pki: &TestPki) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let port = free_port();
        let child = Command::new("redis-server")
            .args(["--port", "0", "--bind", "127.0.0.1", "--tls-port", &port.to_string()])
            .arg("--tls-cert-file")
            .arg(pki.cert_file())
            .arg("--tls-key-file")
            .arg(pki.key_file())
            .arg("--tls-ca-cert-file")
            .arg(pki.ca_file())
            .args(["--tls-auth-clients", "no", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (built with TLS)");
        common::eventually(LIMIT, "the TLS redis-server to accept connections", || async {
            tokio::net::TcpStream::connect(("127.0.0.1", port)).await.is_ok()
        })
        .await;
        Self { child, port, _dir: dir }
    }

    fn url(&self) -> String {
        format!("rediss://127.0.0.1:{}", self.port)
    }
}

impl Drop for TlsRedis {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn drain(h: &Harness, db: &Db) {
    let sweeper = h.sweeper(&opentelemetry::global::meter("redis_tls"));
    let tick = Tick::detached(db);
    for _ in 0..100 {
        if sweeper.tick(&tick).await.expect("tick through TLS") == Progress::Done {
            return;
        }
    }
    panic!("the outbox never drained");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_outbox_drains_into_a_tls_redis_whose_ca_is_given_by_redis_ca_file() {
    let pki = TestPki::new("redis test CA");
    let server = TlsRedis::start(&pki).await;
    let mut h = Harness::new().await;
    h.config.redis.url = server.url();
    h.config.redis.ca_file = Some(pki.ca_file());
    h.redis = outbox_support::connected(&h.config.redis).await;

    h.enqueue(30, &["emails", "builds"], None).await;
    let expected = h.expected().await;
    drain(&h, h.db()).await;

    for queue in ["emails", "builds"] {
        let in_redis = h.scheduled(queue).await;
        assert_eq!(in_redis.len(), 15, "queue {queue}");
        assert!(in_redis == expected[queue], "queue {queue}: the TLS server holds the rows' tasks");
    }
    assert_eq!(h.scalar("SELECT count(*) FROM task_outbox").await, 0, "the outbox is empty");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_certificate_from_another_ca_is_refused_with_an_error_that_says_so() {
    let pki = TestPki::new("redis test CA");
    let other = TestPki::new("some other CA");
    let server = TlsRedis::start(&pki).await;
    let config = RedisConfig { url: server.url(), ca_file: Some(other.ca_file()), ..RedisConfig::default() };
    let client = worker::redis::build(&config).expect("client");
    // The client keeps retrying (fail_fast is off), so read the first connection error it reports.
    let mut errors = client.error_rx();
    let _connection = client.connect();
    let (error, _server) =
        tokio::time::timeout(LIMIT, errors.recv()).await.expect("a connection error").expect("error channel");
    let error = error.to_string();
    assert!(!client.is_connected());
    assert!(error.contains("InvalidCertificate(UnknownIssuer)"), "{error}");
}

#[test]
fn a_ca_file_without_certificates_is_an_error_naming_the_key() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("empty.pem");
    std::fs::write(&path, "not a certificate\n").expect("write");
    let config =
        RedisConfig { url: "rediss://127.0.0.1:6380".into(), ca_file: Some(path), ..RedisConfig::default() };
    let error = worker::redis::build(&config).expect_err("no certificate").to_string();
    assert!(error.contains("redis.ca_file") && error.contains("no PEM certificate"), "{error}");
}
