//! Test support: a throwaway single-member etcd on loopback, with its own
//! data directory, killed and removed when dropped. Public so the daemon's
//! and the end-to-end tests can share it.
//!
//! Gate: without an `etcd` binary (PATH, or `MIGRATED_ETCD`), tests skip
//! with a message; under `MIGRATED_REQUIRE_ETCD=1` that is a failure.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// How long etcd may take to say it serves clients.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Server-side TLS: etcd serves https with `cert`/`key` and requires
/// client certificates signed by `ca`.
#[derive(Clone, Debug)]
pub struct EtcdTls {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A running etcd. See the module docs.
#[derive(Debug)]
pub struct EtcdServer {
    binary: PathBuf,
    dir: PathBuf,
    client_port: u16,
    peer_port: u16,
    tls: Option<EtcdTls>,
    child: Option<Child>,
}

/// The etcd binary, if there is one.
pub fn etcd_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MIGRATED_ETCD") {
        return Some(p.into());
    }
    std::env::split_paths(&std::env::var_os("PATH")?)
        .map(|d| d.join("etcd"))
        .find(|p| p.is_file())
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("bind a loopback port")
        .port()
}

impl EtcdServer {
    /// Starts etcd, or returns `None` (after saying why) when it is not
    /// installed and `MIGRATED_REQUIRE_ETCD` is not `1`.
    pub fn start_or_skip(tls: Option<EtcdTls>) -> Option<Self> {
        let Some(binary) = etcd_binary() else {
            if std::env::var("MIGRATED_REQUIRE_ETCD").as_deref() == Ok("1") {
                panic!("MIGRATED_REQUIRE_ETCD=1 but no etcd binary (install etcd-server or set MIGRATED_ETCD)");
            }
            eprintln!("SKIPPED: etcd is not installed (apt-get install etcd-server)");
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "migrated-etcd-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("create the etcd test directory");
        let mut server = Self {
            binary,
            dir,
            client_port: free_port(),
            peer_port: free_port(),
            tls,
            child: None,
        };
        server.launch();
        Some(server)
    }

    /// The client URL (`http://127.0.0.1:port`, or https with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        // With TLS, the name must match the test certificate's SAN.
        let host = if self.tls.is_some() {
            "localhost"
        } else {
            "127.0.0.1"
        };
        format!("{scheme}://{host}:{}", self.client_port)
    }

    /// Where etcd's own log goes (for a failing test's reader).
    pub fn log_path(&self) -> PathBuf {
        self.dir.join("etcd.log")
    }

    /// Kills etcd (SIGKILL: a crash, not a shutdown). Its data stays.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts etcd again on the same ports and data.
    pub fn restart(&mut self) {
        self.kill();
        self.launch();
    }

    fn launch(&mut self) {
        let client = format!(
            "{}://127.0.0.1:{}",
            if self.tls.is_some() { "https" } else { "http" },
            self.client_port
        );
        let peer = format!("http://127.0.0.1:{}", self.peer_port);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("--name=test")
            .arg(format!("--data-dir={}", self.dir.join("data").display()))
            .arg(format!("--listen-client-urls={client}"))
            .arg(format!("--advertise-client-urls={client}"))
            .arg(format!("--listen-peer-urls={peer}"))
            .arg(format!("--initial-advertise-peer-urls={peer}"))
            .arg(format!("--initial-cluster=test={peer}"))
            .arg("--logger=zap")
            .arg("--log-outputs=stderr")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        if let Some(t) = &self.tls {
            cmd.arg(format!("--cert-file={}", t.cert.display()))
                .arg(format!("--key-file={}", t.key.display()))
                .arg(format!("--trusted-ca-file={}", t.ca.display()))
                .arg("--client-cert-auth");
        }
        let mut child = cmd.spawn().expect("start etcd");
        let stderr = child.stderr.take().expect("piped stderr");
        let log = self.log_path();
        let (ready_tx, ready_rx) = mpsc::channel();
        // Copy etcd's log to a file, and report the line that says it
        // serves clients (or EOF, if it died first).
        std::thread::spawn(move || {
            let mut out = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&log)
                .ok();
            let mut ready_tx = Some(ready_tx);
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if let Some(f) = out.as_mut() {
                    let _ = writeln!(f, "{line}");
                }
                if line.contains("serving client traffic") {
                    if let Some(tx) = ready_tx.take() {
                        let _ = tx.send(true);
                    }
                }
            }
            if let Some(tx) = ready_tx.take() {
                let _ = tx.send(false);
            }
        });
        self.child = Some(child);
        match ready_rx.recv_timeout(READY_TIMEOUT) {
            Ok(true) => {}
            other => {
                let log = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                let tail: Vec<&str> = log.lines().rev().take(15).collect();
                let tail: Vec<&str> = tail.into_iter().rev().collect();
                panic!(
                    "etcd did not become ready ({}); its log ends:\n{}",
                    if other == Ok(false) {
                        "it exited"
                    } else {
                        "timed out"
                    },
                    tail.join("\n")
                )
            }
        }
    }

    /// The test directory (data and log).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
