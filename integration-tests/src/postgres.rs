//! A throwaway PostgreSQL server in a temp dir on a free port, run as the `postgres` user
//! when the tests run as root (PostgreSQL refuses to run as root).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio_postgres::{Client, NoTls};

use crate::certs::CertFiles;

const PG_BIN: &str = "/usr/lib/postgresql/15/bin";

/// A running (or stopped) PostgreSQL cluster owned by one test.
pub struct PgServer {
    pub port: u16,
    dir: tempfile::TempDir,
    child: Option<Child>,
}

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

fn pg_command(binary: &str) -> Command {
    let path = Path::new(PG_BIN).join(binary);
    if is_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", "postgres", "--"]).arg(path);
        c
    } else {
        Command::new(path)
    }
}

impl PgServer {
    /// initdb + start; waits until it accepts connections.
    pub fn start() -> Self {
        Self::init(None)
    }

    /// Like [`PgServer::start`], with TLS on (`ssl = on`, the given certificate) and TCP
    /// connections accepted over TLS only (`hostnossl ... reject`): a query that works
    /// proves its connection was encrypted. [`PgServer::connect`] uses the Unix socket.
    pub fn start_tls(cert: &CertFiles) -> Self {
        Self::init(Some(cert))
    }

    fn init(tls: Option<&CertFiles>) -> Self {
        let dir = tempfile::Builder::new().prefix("strata-pg-").tempdir().expect("temp dir");
        if is_root() {
            let status =
                Command::new("chown").args(["-R", "postgres:postgres"]).arg(dir.path()).status().expect("chown");
            assert!(status.success(), "chown of the PostgreSQL dir failed");
        }
        let data = dir.path().join("data");
        let out = pg_command("initdb")
            .args(["-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8", "--locale", "C", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        if let Some(cert) = tls {
            enable_tls(&data, cert);
        }
        let mut server = Self { port: crate::free_port(), dir, child: None };
        server.resume();
        server
    }

    fn data_dir(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// Starts the server again (after [`PgServer::stop`]) on the same port.
    pub fn resume(&mut self) {
        let child = pg_command("postgres")
            .arg("-D")
            .arg(self.data_dir())
            .args(["-p", &self.port.to_string(), "-c", "listen_addresses=127.0.0.1", "-c", "fsync=off"])
            .arg("-k")
            .arg(self.dir.path())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn postgres");
        self.child = Some(child);
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            assert!(Instant::now() < deadline, "PostgreSQL did not start on port {}", self.port);
            std::thread::sleep(Duration::from_millis(50));
        }
        // Accepting TCP is not the same as accepting queries; wait for a real connection.
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = std::process::Command::new(Path::new(PG_BIN).join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if ok {
                break;
            }
            assert!(Instant::now() < deadline, "PostgreSQL never became ready");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the server (fast shutdown), keeping its data for [`PgServer::resume`].
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = pg_command("pg_ctl").arg("stop").arg("-D").arg(self.data_dir()).args(["-m", "fast", "-w"]).output();
            let _ = child.wait();
        }
    }

    /// The process the server runs under (`runuser` when the tests run as root): the
    /// postmaster and every backend are in its tree.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// The directory of the server's Unix socket (a `host` that is a path).
    pub fn socket_dir(&self) -> &Path {
        self.dir.path()
    }

    /// Connection params for a Strata dataset, as YAML flow mapping.
    pub fn params_yaml(&self) -> String {
        format!("{{host: 127.0.0.1, port: '{}', user: postgres, db: postgres, sslmode: disable}}", self.port)
    }

    /// A client connection for loading data and computing expected answers, over the
    /// server's Unix socket.
    pub async fn connect(&self) -> Client {
        let (client, connection) = tokio_postgres::connect(
            &format!("host={} port={} user=postgres dbname=postgres", self.socket_dir().display(), self.port),
            NoTls,
        )
        .await
        .expect("connect to PostgreSQL");
        tokio::spawn(connection);
        client
    }
}

/// `ssl = on` with `cert` as the server's certificate, and TCP over TLS only.
fn enable_tls(data: &Path, cert: &CertFiles) {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(&cert.cert_file, data.join("server.crt")).expect("copy certificate");
    std::fs::copy(&cert.key_file, data.join("server.key")).expect("copy key");
    // PostgreSQL refuses a key others can read.
    std::fs::set_permissions(data.join("server.key"), std::fs::Permissions::from_mode(0o600)).expect("chmod key");
    let mut conf = std::fs::OpenOptions::new().append(true).open(data.join("postgresql.conf")).expect("conf");
    std::io::Write::write_all(&mut conf, b"\nssl = on\n").expect("write conf");
    let hba = "local all all trust\nhostssl all all 127.0.0.1/32 trust\nhostnossl all all 127.0.0.1/32 reject\n";
    std::fs::write(data.join("pg_hba.conf"), hba).expect("write pg_hba.conf");
    if is_root() {
        let status = Command::new("chown").args(["-R", "postgres:postgres"]).arg(data).status().expect("chown");
        assert!(status.success(), "chown of the PostgreSQL data dir failed");
    }
}

impl Drop for PgServer {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = pg_command("pg_ctl").arg("stop").arg("-D").arg(self.data_dir()).args(["-m", "immediate"]).output();
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
