//! A private pgbouncer in transaction-pooling mode in front of the test PostgreSQL, started
//! per test on a free port (`scripts/test.sh` installs the package when it is missing).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

pub struct PgBouncer {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
}

const BINARIES: &[&str] = &["/usr/sbin/pgbouncer", "/usr/bin/pgbouncer", "/usr/local/bin/pgbouncer"];

impl PgBouncer {
    /// Starts pgbouncer with `pool_size` server connections per database; panics with a clear
    /// message if the binary is missing.
    pub async fn start(pool_size: u32) -> Self {
        let binary = BINARIES.iter().find(|p| std::path::Path::new(p).exists()).unwrap_or_else(|| {
            panic!("pgbouncer is not installed: run scripts/test.sh (it installs it) or apt-get install -y pgbouncer")
        });
        let admin = url::Url::parse(&super::admin_url()).expect("admin url");
        let pg_host = admin.host_str().unwrap_or("127.0.0.1").to_owned();
        let pg_port = admin.port().unwrap_or(5432);
        let port =
            std::net::TcpListener::bind("127.0.0.1:0").expect("free port").local_addr().expect("addr").port();
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).expect("chmod");
        let d = dir.path().display();
        let ini = format!(
            "[databases]\n* = host={pg_host} port={pg_port}\n\n[pgbouncer]\nlisten_addr = 127.0.0.1\n\
             listen_port = {port}\nunix_socket_dir =\nauth_type = trust\nauth_file = {d}/users.txt\n\
             pool_mode = transaction\ndefault_pool_size = {pool_size}\nmax_client_conn = 500\n\
             ignore_startup_parameters = extra_float_digits,options\nlogfile = {d}/pgbouncer.log\n\
             pidfile = {d}/pgbouncer.pid\nserver_reset_query =\n"
        );
        for (file, text) in [("pgbouncer.ini", ini.as_str()), ("users.txt", "\"postgres\" \"\"\n")] {
            let path = dir.path().join(file);
            std::fs::File::create(&path)
                .and_then(|mut f| f.write_all(text.as_bytes()))
                .expect("write pgbouncer config");
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).expect("chmod");
        }
        let mut command = Command::new(binary);
        // pgbouncer refuses to run as root; drop to the postgres user when we are root.
        if nix::unistd::Uid::effective().is_root() {
            command.args(["-u", "postgres"]);
        }
        let child = command
            .arg(dir.path().join("pgbouncer.ini"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn pgbouncer");
        let bouncer = Self { child, port, _dir: dir };
        let url = bouncer.url("postgres");
        super::eventually(Duration::from_secs(10), "pgbouncer to accept connections", || {
            let url = url.clone();
            async move { worker::db::connect_direct(&url, "probe").await.is_ok() }
        })
        .await;
        bouncer
    }

    /// URL of database `name` through this pgbouncer.
    pub fn url(&self, database: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{database}", self.port)
    }
}

impl Drop for PgBouncer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
