//! Harness for the end-to-end tests: real `migrated` daemons (the binaries
//! cargo built, never in-process), a generated cluster CA, real KVM guests,
//! QUIC over loopback or between network namespaces.
//!
//! Everything a test starts is undone by `Drop` even when the test fails:
//! guests are deleted through their daemon, daemons stopped, and any
//! process still mentioning the test's temp dir (a guest whose daemon was
//! killed, a half-built destination VMM) is SIGKILLed.

#![forbid(unsafe_code)]

use std::io::Read;
use std::net::SocketAddr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{mpsc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use migrated_api::client::ApiClient;
use migrated_api::config::Config;
use migrated_api::model::{
    GuestCounters, MigrationOverrides, MigrationRecord, MigrationRequest, Vm,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use transport::identity::{ClusterCa, HostName, Validity};

pub mod linkcut;
pub mod netns;

/// How long a daemon gets to answer its health endpoint after start.
pub const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// Tests share two cores with everything else; running two clusters of
/// guests at once only makes both flaky, so clusters run one at a time.
static SERIAL: Mutex<()> = Mutex::new(());

/// Holds the one-cluster-at-a-time lock, for tests that start daemons
/// without a [`Cluster`] (e.g. through `migratectl demo`).
pub fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|p| p.into_inner())
}

/// The programs under test, from the target directory this test binary
/// was built into (`target/<profile>/deps/e2e-*` → `target/<profile>/`).
#[derive(Clone, Debug)]
pub struct Binaries {
    pub migrated: PathBuf,
    pub vmm: PathBuf,
    pub migratectl: PathBuf,
}

impl Binaries {
    /// Panics with what to run if a binary is missing: cargo does not build
    /// other packages' binaries for this crate's tests.
    pub fn locate() -> Self {
        let exe = std::env::current_exe().expect("test executable path");
        let deps = exe.parent().expect("test executable has a directory");
        let dir = if deps.file_name().is_some_and(|n| n == "deps") {
            deps.parent().expect("deps has a parent")
        } else {
            deps
        };
        let find = |name: &str| {
            let p = dir.join(name);
            assert!(
                p.is_file(),
                "{} is missing: build the binaries first with `cargo build --workspace` \
                 (same profile and CARGO_TARGET_DIR as the tests)",
                p.display()
            );
            p
        };
        Self {
            migrated: find("migrated"),
            vmm: find("migrate-vmm"),
            migratectl: find("migratectl"),
        }
    }
}

/// One host of a test cluster.
pub struct HostSpec {
    pub name: &'static str,
    /// QUIC listen address.
    pub listen: SocketAddr,
    /// Network namespace to run the daemon in (`ip netns exec`).
    pub netns: Option<String>,
}

/// A running (or stopped) `migrated`.
pub struct Node {
    pub name: &'static str,
    pub config: PathBuf,
    pub socket: PathBuf,
    pub log: PathBuf,
    netns: Option<String>,
    child: Option<Child>,
    migrated: PathBuf,
}

/// Daemons, their certificates and state, all in one temp dir.
pub struct Cluster {
    pub bins: Binaries,
    pub nodes: Vec<Node>,
    rt: tokio::runtime::Runtime,
    tmp: Option<tempfile::TempDir>,
    _serial: MutexGuard<'static, ()>,
}

impl Cluster {
    /// Starts one daemon per host, each with every other host as a peer,
    /// and waits until all answer. `tune` adjusts each host's config.
    pub fn start(hosts: Vec<HostSpec>, tune: impl Fn(&mut Config)) -> Self {
        let serial = serial();
        let bins = Binaries::locate();
        let tmp = tempfile::Builder::new()
            .prefix("migrated-e2e-")
            .tempdir()
            .expect("temp dir");
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("tokio runtime");
        let ca = ClusterCa::generate("e2e test CA").expect("generate CA");
        let mut nodes = Vec::new();
        for h in &hosts {
            let home = tmp.path().join(h.name);
            let tls = home.join("tls");
            std::fs::create_dir_all(&tls).expect("tls dir");
            let host = HostName::new(h.name).expect("host name");
            let cert = ca
                .issue_host(&host, Validity::for_duration(Duration::from_secs(86_400)))
                .expect("issue host cert");
            cert.write_pem(&tls.join("host.pem"), &tls.join("host.key"))
                .expect("write host cert");
            std::fs::write(tls.join("ca.pem"), ca.cert_pem()).expect("write ca");
            let mut c = Config {
                host_name: h.name.into(),
                state_dir: home.join("state"),
                api_socket: home.join("api.sock"),
                listen: h.listen,
                vmm_binary: bins.vmm.clone(),
                ..Config::default()
            };
            c.tls.ca = tls.join("ca.pem");
            c.tls.cert = tls.join("host.pem");
            c.tls.key = tls.join("host.key");
            for peer in hosts.iter().filter(|p| p.name != h.name) {
                c.peers.insert(peer.name.into(), peer.listen.to_string());
            }
            tune(&mut c);
            let text = toml::to_string(&c).expect("encode config");
            let config = home.join("config.toml");
            Config::parse(&text, &config).expect("test config loads");
            std::fs::write(&config, text).expect("write config");
            nodes.push(Node {
                name: h.name,
                config,
                socket: c.api_socket.clone(),
                log: home.join("migrated.log"),
                netns: h.netns.clone(),
                child: None,
                migrated: bins.migrated.clone(),
            });
        }
        let mut cluster = Self {
            bins,
            nodes,
            rt,
            tmp: Some(tmp),
            _serial: serial,
        };
        for i in 0..cluster.nodes.len() {
            cluster.start_node(i);
        }
        cluster
    }

    /// Two hosts `node-a` and `node-b` on loopback (free UDP ports).
    pub fn loopback(tune: impl Fn(&mut Config)) -> Self {
        let a = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp port");
        let b = std::net::UdpSocket::bind("127.0.0.1:0").expect("udp port");
        let hosts = vec![
            HostSpec {
                name: "node-a",
                listen: a.local_addr().expect("addr"),
                netns: None,
            },
            HostSpec {
                name: "node-b",
                listen: b.local_addr().expect("addr"),
                netns: None,
            },
        ];
        drop((a, b));
        Self::start(hosts, tune)
    }

    /// Two hosts `node-a` and `node-b` in the namespaces of `ns`, on their
    /// namespace's address. Declare the cluster after `ns`, so the daemons
    /// stop before the namespaces go.
    pub fn in_netns(ns: &netns::NetnsPair, tune: impl Fn(&mut Config)) -> Self {
        let hosts = vec![
            HostSpec {
                name: "node-a",
                listen: (netns::ADDR_A, 7878).into(),
                netns: Some(ns.a.clone()),
            },
            HostSpec {
                name: "node-b",
                listen: (netns::ADDR_B, 7878).into(),
                netns: Some(ns.b.clone()),
            },
        ];
        Self::start(hosts, tune)
    }

    pub fn root(&self) -> &Path {
        self.tmp.as_ref().expect("temp dir lives").path()
    }

    pub fn node(&self, name: &str) -> &Node {
        self.nodes
            .iter()
            .find(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    fn index(&self, name: &str) -> usize {
        self.nodes
            .iter()
            .position(|n| n.name == name)
            .unwrap_or_else(|| panic!("no node {name}"))
    }

    pub fn client(&self, name: &str) -> ApiClient {
        ApiClient::new(&self.node(name).socket)
    }

    /// Starts migrating `vm` from `from` to `to`; a refusal panics with
    /// `from`'s log.
    pub fn start_migration(
        &self,
        from: &str,
        to: &str,
        vm: &str,
        verify: bool,
        options: MigrationOverrides,
    ) -> MigrationRecord {
        let req = MigrationRequest {
            vm: vm.into(),
            target_host: to.into(),
            verify,
            options,
        };
        self.block_on(self.client(from).create_migration(&req))
            .unwrap_or_else(|e| {
                panic!(
                    "create migration of {vm}: {e}\n{}",
                    self.node(from).log_tail(20)
                )
            })
    }

    /// Runs an async API call to completion.
    pub fn block_on<F: std::future::Future>(&self, f: F) -> F::Output {
        self.rt.block_on(f)
    }

    /// Starts node `i`'s daemon and waits for its health endpoint.
    fn start_node(&mut self, i: usize) {
        self.nodes[i].spawn();
        let client = ApiClient::new(&self.nodes[i].socket);
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            if let Ok(h) = self.rt.block_on(client.health()) {
                assert_eq!(h.host_name, self.nodes[i].name);
                return;
            }
            let n = &mut self.nodes[i];
            if let Some(status) = n.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!(
                    "migrated {} exited at start ({status}):\n{}",
                    n.name,
                    n.log_tail(20)
                );
            }
            assert!(
                Instant::now() < deadline,
                "migrated {} did not answer within {READY_TIMEOUT:?}:\n{}",
                n.name,
                n.log_tail(20)
            );
            // No readiness signal exists besides the socket answering.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `name`'s daemon again (after [`Cluster::stop`] or
    /// [`Cluster::kill`]).
    pub fn restart(&mut self, name: &str) {
        let i = self.index(name);
        self.start_node(i);
    }

    /// SIGTERM and wait: a clean daemon shutdown (guests keep running).
    pub fn stop(&mut self, name: &str) -> ExitStatus {
        let i = self.index(name);
        self.nodes[i].signal_and_wait(Signal::SIGTERM)
    }

    /// SIGKILL and reap: a daemon crash.
    pub fn kill(&mut self, name: &str) -> ExitStatus {
        let i = self.index(name);
        self.nodes[i].signal_and_wait(Signal::SIGKILL)
    }

    /// Runs `migratectl --socket <name's socket> args...` with a deadline.
    pub fn ctl(&self, name: &str, args: &[&str]) -> Output {
        let mut cmd = Command::new(&self.bins.migratectl);
        cmd.arg("--socket")
            .arg(&self.node(name).socket)
            .args(args)
            .env_remove("MIGRATED_SOCKET");
        run_with_deadline(cmd, Duration::from_secs(300))
    }

    /// Creates a VM with the built-in workload on `node`.
    pub fn create_vm(&self, node: &str, args: &[&str]) -> Vm {
        let mut full = vec!["-o", "json", "vm", "create"];
        full.extend_from_slice(args);
        let o = self.ctl(node, &full);
        assert!(
            o.status.success(),
            "vm create {args:?} on {node} failed: {}\n{}",
            stderr(&o),
            self.node(node).log_tail(20)
        );
        serde_json::from_slice(&o.stdout).expect("vm json")
    }

    /// The guest counters of `vm` on `node`, read through the daemon.
    pub fn counters(&self, node: &str, vm: &str) -> GuestCounters {
        let v = self
            .block_on(self.client(node).get_vm(vm))
            .unwrap_or_else(|e| panic!("get vm {vm} on {node}: {e}"));
        v.status.guest.unwrap_or_else(|| {
            panic!(
                "vm {vm} on {node} has no guest counters: phase {} reason {:?}",
                v.status.phase, v.status.reason
            )
        })
    }

    /// Asserts the guest's counters advance over `gap` and nothing is
    /// corrupt; returns the second reading.
    pub fn assert_guest_alive(&self, node: &str, vm: &str, gap: Duration) -> GuestCounters {
        let first = self.counters(node, vm);
        // The guest runs on its own clock: the gap is what we measure over,
        // not a wait for some event.
        std::thread::sleep(gap);
        let second = self.counters(node, vm);
        assert_eq!(
            second.corrupt_pages, 0,
            "corrupt pages on {node}: {second:?}"
        );
        assert!(
            second.passes + second.pages_written > first.passes + first.pages_written,
            "guest {vm} on {node} made no progress in {gap:?}: {first:?} then {second:?}"
        );
        second
    }

    /// Polls migration `name` on `node` until `done` holds or `timeout`.
    pub fn wait_migration(
        &self,
        node: &str,
        name: &str,
        timeout: Duration,
        done: impl Fn(&MigrationRecord) -> bool,
    ) -> MigrationRecord {
        let client = self.client(node);
        let deadline = Instant::now() + timeout;
        loop {
            let m = self
                .block_on(client.get_migration(name))
                .unwrap_or_else(|e| panic!("get migration {name} on {node}: {e}"));
            if done(&m) {
                return m;
            }
            assert!(
                Instant::now() < deadline,
                "migration {name} not there within {timeout:?}; last record {m:?}\n{}",
                self.node(node).log_tail(20)
            );
            // The record is the only view of the engine's progress.
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Pids of live VMM processes for `vm` on `node` (their command line
    /// names the VM's directory under that node's state dir). A killed VMM
    /// its daemon has not reaped yet has an empty command line and is not
    /// counted.
    pub fn vmm_pids(&self, node: &str, vm: &str) -> Vec<u32> {
        let dir = self.root().join(node).join("state").join("vms").join(vm);
        let needle = format!("{}/", dir.display());
        let Ok(procs) = std::fs::read_dir("/proc") else {
            return Vec::new();
        };
        procs
            .flatten()
            .filter_map(|p| {
                let pid = p.file_name().to_str()?.parse::<u32>().ok()?;
                let cmdline = std::fs::read(p.path().join("cmdline")).ok()?;
                let text = String::from_utf8_lossy(&cmdline);
                (text.contains("migrate-vmm") && text.contains(&needle)).then_some(pid)
            })
            .collect()
    }

    /// SIGKILLs every process whose command line mentions our temp dir.
    fn kill_strays(&self) {
        let Some(root) = self.tmp.as_ref() else {
            return;
        };
        kill_mentioning(&root.path().to_string_lossy());
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        // Guests first, while their daemons can still stop them cleanly.
        for n in &self.nodes {
            if n.child.is_none() {
                continue;
            }
            let c = ApiClient::new(&n.socket);
            if let Ok(vms) = self.rt.block_on(c.list_vms()) {
                for vm in vms {
                    if let Some(m) = &vm.status.active_migration {
                        let _ = self.rt.block_on(c.cancel_migration(m));
                    }
                    let _ = self.rt.block_on(c.delete_vm(&vm.spec.name));
                }
            }
        }
        for n in &mut self.nodes {
            if n.child.is_some() {
                n.signal_and_wait(Signal::SIGTERM);
            }
        }
        self.kill_strays();
        if std::thread::panicking() {
            if let Some(tmp) = self.tmp.take() {
                let kept = tmp.keep();
                eprintln!("e2e: kept {} for inspection", kept.display());
            }
        }
    }
}

impl Node {
    fn spawn(&mut self) {
        assert!(self.child.is_none(), "{} already runs", self.name);
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("daemon log");
        let err = log.try_clone().expect("log fd");
        let mut cmd = match &self.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(&self.migrated);
                c
            }
            None => Command::new(&self.migrated),
        };
        cmd.arg("--config")
            .arg(&self.config)
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .process_group(0);
        self.child = Some(cmd.spawn().expect("spawn migrated"));
    }

    /// Sends `sig` and reaps the daemon (SIGKILL after 15 s of SIGTERM).
    fn signal_and_wait(&mut self, sig: Signal) -> ExitStatus {
        let mut child = self.child.take().expect("daemon is running");
        let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
        let _ = kill(pid, sig);
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Ok(Some(status)) = child.try_wait() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                return child.wait().expect("reap migrated");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The last `n` lines of this daemon's log, for failure messages.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read(&self.log)
            .map(|b| String::from_utf8_lossy(&b[b.len().saturating_sub(16_384)..]).into_owned())
            .unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        format!(
            "--- {} log ---\n{}",
            self.name,
            lines[lines.len().saturating_sub(n)..].join("\n")
        )
    }
}

/// SIGKILLs every process (but this one) whose command line contains
/// `needle`.
pub fn kill_mentioning(needle: &str) {
    let me = std::process::id();
    let Ok(procs) = std::fs::read_dir("/proc") else {
        return;
    };
    for p in procs.flatten() {
        let Some(pid) = p.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        if pid as u32 == me {
            continue;
        }
        if let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) {
            if String::from_utf8_lossy(&cmdline).contains(needle) {
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

/// Runs `cmd` to completion, capturing output; after `timeout` it gets
/// SIGINT (so a `migratectl demo` cleans up), then SIGKILL, and the test
/// fails.
pub fn run_with_deadline(mut cmd: Command, timeout: Duration) -> Output {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn command");
    let pid = Pid::from_raw(i32::try_from(child.id()).expect("pid fits"));
    let mut out = child.stdout.take().expect("piped");
    let mut err = child.stderr.take().expect("piped");
    let (tx, rx) = mpsc::channel();
    let err_reader = std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = err.read_to_end(&mut v);
        v
    });
    std::thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        let _ = tx.send(v);
    });
    // stdout closes when the process (and anything holding its stdout)
    // exits; the wait below then returns at once.
    let stdout = match rx.recv_timeout(timeout) {
        Ok(v) => v,
        Err(_) => {
            let _ = kill(pid, Signal::SIGINT);
            match rx.recv_timeout(Duration::from_secs(30)) {
                Ok(_) => {}
                Err(_) => {
                    let _ = child.kill();
                }
            }
            let _ = child.wait();
            let e = err_reader.join().unwrap_or_default();
            panic!(
                "{cmd:?} did not finish within {timeout:?}; stderr:\n{}",
                String::from_utf8_lossy(&e)
            );
        }
    };
    let status = child.wait().expect("wait for command");
    let stderr = err_reader.join().unwrap_or_default();
    Output {
        status,
        stdout,
        stderr,
    }
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}
