//! A private redis-server on a port of its own, for tests that take Redis away (kill it, stop it
//! with SIGSTOP) without disturbing the shared server other tests use.

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub struct RedisServer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

/// A port nothing listens on (bound, then released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port()
}

pub fn url_for(port: u16) -> String {
    format!("redis://127.0.0.1:{port}")
}

async fn answers_ping(port: u16) -> bool {
    let Ok(mut stream) = tokio::net::TcpStream::connect(("127.0.0.1", port)).await else { return false };
    if stream.write_all(b"PING\r\n").await.is_err() {
        return false;
    }
    let mut buf = [0u8; 7];
    matches!(tokio::time::timeout(Duration::from_secs(1), stream.read_exact(&mut buf)).await, Ok(Ok(_)))
        && &buf == b"+PONG\r\n"
}

impl RedisServer {
    /// Starts redis-server on `port` (no persistence) and waits until it answers PING.
    pub async fn start_on(port: u16) -> Self {
        let dir = tempfile::tempdir().expect("temp dir");
        let child = Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("redis-server is installed (apt-get install -y redis-server)");
        let server = Self { child, port, _dir: dir };
        crate::common::eventually(Duration::from_secs(10), "the private redis-server to answer PING", || {
            answers_ping(port)
        })
        .await;
        server
    }

    pub fn url(&self) -> String {
        url_for(self.port)
    }

    fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).expect("signal redis-server");
    }

    /// Freezes the server: connections stay open, nothing is answered (a hung Redis).
    pub fn freeze(&self) {
        self.signal(Signal::SIGSTOP);
    }

    pub fn thaw(&self) {
        self.signal(Signal::SIGCONT);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
