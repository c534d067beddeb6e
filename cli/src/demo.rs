//! `migratectl demo`: the whole product on one machine. It makes a CA and
//! two host certificates, starts two `migrated` daemons on loopback, runs a
//! guest on the first, live-migrates it to the second with verification and
//! shows the guest's counters carrying on there. Then it tears everything
//! down, also after an error or Ctrl-C: a demo that leaves guests running
//! behind is worse than one that fails.
//!
//! `--strategy` and the tuning flags travel with the migration as its
//! options, so the record shows what the run used. A failed migration is a
//! scenario too: if the guest never ran on the target, the demo shows it
//! still running on the source before it exits 1 with the reason.
//!
//! With `--output json` only the final migration record goes to stdout, so
//! scripts and the end-to-end tests can read it; the narrative goes to
//! stderr.

use std::fmt::Display;
use std::fs::File;
use std::net::UdpSocket;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context, Result};
use clap::{Args, ValueEnum};
use migrated_api::client::ApiClient;
use migrated_api::config::Config;
use migrated_api::model::{
    DirtyRate, FailureCode, GuestCounters, MigrationOverrides, MigrationPhase, Quantity, VmPhase,
    VmSpec, WorkloadSpec,
};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

use crate::request::{self, Strategy, TuningArgs};
use crate::{cert, render, ModeArg, Output};

const HOST_A: &str = "node-a";
const HOST_B: &str = "node-b";
const VM_NAME: &str = "demo";
/// How long a daemon gets to answer its health endpoint after start.
const DAEMON_READY_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a daemon gets to exit after SIGTERM before SIGKILL.
const DAEMON_EXIT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long cancelled migrations get to end before their VMs are deleted.
const CANCEL_TIMEOUT: Duration = Duration::from_secs(15);
/// Gap between the two counter readings that show the guest is alive.
const COUNTER_GAP: Duration = Duration::from_millis(1200);

#[derive(Args, Debug)]
pub struct DemoArgs {
    /// Guest RAM.
    #[arg(long, default_value = "1Gi")]
    memory: Quantity,
    #[arg(long, default_value_t = 2)]
    vcpus: u32,
    /// Working set the guest keeps dirtying and verifying.
    #[arg(long, default_value = "256Mi")]
    wss: Quantity,
    /// MiB/s the guest dirties: 0 (idle), a number, or max.
    #[arg(long, default_value = "50")]
    dirty_rate: DirtyRate,
    #[arg(long, value_enum, default_value_t = ModeArg::Sparse)]
    mode: ModeArg,
    /// What the migration may do when passes stop converging.
    #[arg(long, value_enum, default_value_t = Strategy::AutoConverge)]
    strategy: Strategy,
    #[command(flatten)]
    tuning: TuningArgs,
    /// Keep the temp dir (configs, logs, certificates) and print its path.
    #[arg(long)]
    keep: bool,
}

impl DemoArgs {
    /// The per-migration options the demo sends: its strategy and knobs,
    /// so the record shows them in `migrationConfiguration`.
    pub fn overrides(&self) -> MigrationOverrides {
        let (auto_converge, post_copy) = self.strategy.allows();
        request::overrides(auto_converge, post_copy, &self.tuning)
    }
}

/// Where the narrative goes: stdout for people, stderr when stdout is
/// reserved for the machine-readable record.
#[derive(Copy, Clone)]
struct Say {
    stdout: bool,
}

impl Say {
    fn line(self, msg: impl Display) {
        if self.stdout {
            println!("{msg}");
        } else {
            eprintln!("{msg}");
        }
    }
}

/// One `migrated` started by the demo.
struct Daemon {
    host: &'static str,
    child: Option<Child>,
    client: ApiClient,
    log: PathBuf,
}

/// Everything the demo started; [`Cluster::shutdown`] undoes it, and `Drop`
/// is the last resort if that never ran (a panic).
struct Cluster {
    dir: Option<tempfile::TempDir>,
    daemons: Vec<Daemon>,
    say: Say,
}

pub async fn run(args: DemoArgs, output: Output) -> Result<()> {
    let say = Say {
        stdout: output == Output::Table,
    };
    let bins = Binaries::locate()?;
    // Checked up front: otherwise this shows up as a VMM launch failure
    // deep in a daemon log.
    std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/kvm")
        .context("the demo runs real KVM guests but cannot open /dev/kvm (run as root or join the kvm group)")?;
    let dir = tempfile::Builder::new()
        .prefix("migratectl-demo-")
        .tempdir()
        .context("cannot create a temp dir")?;
    let mut cluster = Cluster {
        dir: Some(dir),
        daemons: Vec::new(),
        say,
    };
    let outcome = tokio::select! {
        r = scenario(&mut cluster, &bins, &args, output) => r,
        r = tokio::signal::ctrl_c() => match r {
            Ok(()) => Err(Interrupted.into()),
            Err(e) => Err(anyhow!(e).context("cannot watch for Ctrl-C")),
        },
    };
    if outcome
        .as_ref()
        .is_err_and(|e| e.downcast_ref::<Interrupted>().is_none())
    {
        cluster.show_logs();
    }
    cluster.shutdown(args.keep).await;
    outcome
}

/// Ctrl-C: the demo stops, cleans up, and says so without the logs.
#[derive(Debug)]
struct Interrupted;

impl Display for Interrupted {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("interrupted; everything the demo started was stopped")
    }
}

impl std::error::Error for Interrupted {}

/// The daemon and VMM programs, next to this executable (where cargo and
/// packages put them).
struct Binaries {
    migrated: PathBuf,
    vmm: PathBuf,
}

impl Binaries {
    fn locate() -> Result<Self> {
        let exe = std::env::current_exe().context("cannot find migratectl's own path")?;
        let dir = exe
            .parent()
            .ok_or_else(|| anyhow!("{} has no parent directory", exe.display()))?;
        let found = |name: &str| {
            let p = dir.join(name);
            if p.is_file() {
                Ok(p)
            } else {
                Err(anyhow!(
                    "cannot find {} next to migratectl; build with `cargo build --release --workspace`",
                    p.display()
                ))
            }
        };
        Ok(Self {
            migrated: found("migrated")?,
            vmm: found("migrate-vmm")?,
        })
    }
}

/// Two UDP ports on 127.0.0.1 that were free a moment ago. Both sockets are
/// held until both ports are known, so the two differ.
fn free_udp_ports() -> Result<[u16; 2]> {
    let a = UdpSocket::bind("127.0.0.1:0").context("cannot find a free udp port")?;
    let b = UdpSocket::bind("127.0.0.1:0").context("cannot find a free udp port")?;
    Ok([a.local_addr()?.port(), b.local_addr()?.port()])
}

/// The config of one demo host, checked with the daemon's own parser so a
/// mistake shows here rather than as a daemon that will not start.
fn host_config(
    root: &Path,
    host: &str,
    port: u16,
    peer: &str,
    peer_port: u16,
    vmm: &Path,
) -> Result<(PathBuf, PathBuf)> {
    let home = root.join(host);
    let tls = home.join("tls");
    let mut c = Config {
        host_name: host.into(),
        state_dir: home.join("state"),
        api_socket: home.join("api.sock"),
        listen: format!("127.0.0.1:{port}").parse()?,
        vmm_binary: vmm.to_owned(),
        ..Config::default()
    };
    c.tls.ca = tls.join(cert::CA_CERT);
    c.tls.cert = tls.join(cert::HOST_CERT);
    c.tls.key = tls.join(cert::HOST_KEY);
    c.peers
        .insert(peer.into(), format!("127.0.0.1:{peer_port}"));
    // Loopback is fast: the production default cap (64Mi/s) would only
    // make the demo slow. `--bandwidth` brings a cap back per migration;
    // the strategy, too, travels with the migration rather than here.
    c.migration.bandwidth_per_migration = Quantity(0);
    let text = toml::to_string(&c).context("cannot encode the demo config")?;
    std::fs::create_dir_all(&home).with_context(|| format!("cannot create {}", home.display()))?;
    let path = home.join("config.toml");
    Config::parse(&text, &path).context("the demo config does not load")?;
    std::fs::write(&path, text).with_context(|| format!("cannot write {}", path.display()))?;
    Ok((path, c.api_socket))
}

async fn scenario(c: &mut Cluster, bins: &Binaries, a: &DemoArgs, output: Output) -> Result<()> {
    let say = c.say;
    let root = c.root().to_owned();
    say.line(format_args!("demo directory {}", root.display()));

    let ca_dir = root.join("ca");
    cert::init_ca(&ca_dir, "migratectl demo CA", false)?;
    for host in [HOST_A, HOST_B] {
        cert::issue(host, &ca_dir, &root.join(host).join("tls"), 1, false)?;
    }
    say.line(format_args!(
        "cluster CA and certificates for {HOST_A} and {HOST_B} created"
    ));

    let [port_a, port_b] = free_udp_ports()?;
    let (cfg_a, sock_a) = host_config(&root, HOST_A, port_a, HOST_B, port_b, &bins.vmm)?;
    let (cfg_b, sock_b) = host_config(&root, HOST_B, port_b, HOST_A, port_a, &bins.vmm)?;
    c.start_daemon(HOST_A, &bins.migrated, &cfg_a, &sock_a)?;
    c.start_daemon(HOST_B, &bins.migrated, &cfg_b, &sock_b)?;
    for i in 0..c.daemons.len() {
        c.wait_ready(i).await?;
    }
    say.line(format_args!(
        "migrated {HOST_A} on udp 127.0.0.1:{port_a}, {HOST_B} on udp 127.0.0.1:{port_b}"
    ));

    let client_a = c.daemons[0].client.clone();
    let client_b = c.daemons[1].client.clone();
    let spec = VmSpec {
        name: VM_NAME.into(),
        labels: Default::default(),
        memory: a.memory,
        vcpus: a.vcpus,
        workload: WorkloadSpec {
            wss: a.wss,
            dirty_rate: a.dirty_rate,
            mode: a.mode.into(),
            seed: 1,
        },
    };
    client_a
        .create_vm(&spec)
        .await
        .context("cannot create the demo vm")?;
    say.line(format_args!(
        "vm {VM_NAME} created on {HOST_A}: {} RAM, {} vCPUs, dirtying {} at {} MiB/s ({})",
        a.memory,
        a.vcpus,
        a.wss,
        a.dirty_rate,
        spec.workload.mode.as_str()
    ));
    watch_counters(&client_a, HOST_A, say).await?;

    let options = a.overrides();
    say.line(format_args!(
        "migrating {VM_NAME} {HOST_A} -> {HOST_B} with memory verification, strategy {}{}",
        a.strategy
            .to_possible_value()
            .map(|v| v.get_name().to_owned())
            .unwrap_or_default(),
        serde_json::to_string(&options)
            .map(|o| format!(", options {o}"))
            .unwrap_or_default()
    ));
    let req = request::migration_request(VM_NAME.into(), HOST_B.into(), true, options);
    let mut m = client_a
        .create_migration(&req)
        .await
        .context("cannot start the migration")?;
    if !m.phase.is_final() {
        m = crate::follow(&client_a, &m.name).await?;
    }
    let digests = m.memory_digest_matched;
    match output {
        Output::Table => print!("{}", render::describe_migration(&m)),
        Output::Yaml => print!(
            "{}",
            render::yaml(&serde_json::to_value(&m).context("cannot encode yaml")?)
        ),
        Output::Json => println!(
            "{}",
            serde_json::to_string(&m).context("cannot encode json")?
        ),
    }
    if m.phase != MigrationPhase::Succeeded {
        let why = format!(
            "migration {} {} ({}): {}",
            m.name,
            m.phase,
            m.failure_code.map_or("no code", FailureCode::as_str),
            m.failure_reason.as_deref().unwrap_or("no reason recorded")
        );
        if m.post_copy_start_timestamp.is_none() {
            // Until the guest has run on the target, a failed migration
            // must leave it where it was, running and intact (also when it
            // failed while switching to post-copy): show that before
            // reporting the failure.
            say.line(format_args!(
                "{why}; checking that the guest kept running on {HOST_A}"
            ));
            watch_counters(&client_a, HOST_A, say)
                .await
                .with_context(|| format!("{why}, and the guest is not running on {HOST_A}"))?;
            say.line(format_args!("the guest kept running on {HOST_A}"));
        } else {
            let resume = if m.failure_code == Some(FailureCode::PostCopyInterrupted) {
                format!(
                    " (outside the demo, `migratectl migrate --resume {}` continues it)",
                    m.name
                )
            } else {
                String::new()
            };
            say.line(format_args!(
                "{why}; the guest already ran on {HOST_B} in post-copy, so its memory is split \
                 between the hosts{resume}"
            ));
        }
        bail!("{why}");
    }
    match digests {
        Some(true) => say.line("memory digests of source and destination match"),
        Some(false) => bail!("migration {} reported different memory digests", m.name),
        None => say.line("(the daemon did not report memory digests)"),
    }
    let vm = client_b
        .get_vm(VM_NAME)
        .await
        .with_context(|| format!("vm {VM_NAME} is not on {HOST_B} after the migration"))?;
    if vm.status.node_name != HOST_B {
        bail!(
            "vm {VM_NAME} reports node {} after the migration",
            vm.status.node_name
        );
    }
    watch_counters(&client_b, HOST_B, say).await?;
    // The source's copy is torn down once the destination runs.
    if let Ok(old) = client_a.get_vm(VM_NAME).await {
        if old.status.phase == VmPhase::Running {
            bail!("vm {VM_NAME} is still running on {HOST_A} after the migration");
        }
    }
    say.line(format_args!(
        "done: {VM_NAME} moved to {HOST_B}: {}",
        render::summary(&m)
    ));
    Ok(())
}

/// Whether the guest made progress between two readings (passes or pages).
pub fn advanced(before: &GuestCounters, after: &GuestCounters) -> bool {
    after.passes + after.pages_written > before.passes + before.pages_written
}

/// Reads the guest's counters twice, `COUNTER_GAP` apart, and fails unless
/// they advanced with no corrupt page.
async fn watch_counters(client: &ApiClient, host: &str, say: Say) -> Result<()> {
    let read = || async {
        let vm = client
            .get_vm(VM_NAME)
            .await
            .with_context(|| format!("cannot read vm {VM_NAME} on {host}"))?;
        vm.status.guest.clone().ok_or_else(|| {
            anyhow!(
                "vm {VM_NAME} on {host} reports no guest counters (phase {}{})",
                vm.status.phase,
                vm.status
                    .reason
                    .map(|r| format!(": {r}"))
                    .unwrap_or_default()
            )
        })
    };
    let first = read().await?;
    tokio::time::sleep(COUNTER_GAP).await;
    let second = read().await?;
    for g in [&first, &second] {
        say.line(format_args!(
            "  {host}: guest {} passes {} pages written {} corrupt {} throttle {}%",
            g.run_state, g.passes, g.pages_written, g.corrupt_pages, g.throttle_pct
        ));
    }
    if second.corrupt_pages > 0 {
        bail!(
            "the guest on {host} found {} corrupt pages",
            second.corrupt_pages
        );
    }
    if !advanced(&first, &second) {
        bail!("the guest's counters on {host} did not advance in {COUNTER_GAP:?}");
    }
    Ok(())
}

impl Cluster {
    fn root(&self) -> &Path {
        self.dir
            .as_ref()
            .map(tempfile::TempDir::path)
            .expect("the temp dir lives until shutdown")
    }

    fn start_daemon(
        &mut self,
        host: &'static str,
        bin: &Path,
        config: &Path,
        socket: &Path,
    ) -> Result<()> {
        let log = self.root().join(host).join("migrated.log");
        let out = File::create(&log).with_context(|| format!("cannot create {}", log.display()))?;
        let err = out.try_clone().context("cannot share the log file")?;
        let child = Command::new(bin)
            .arg("--config")
            .arg(config)
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            // Own process group: Ctrl-C reaches only migratectl, which then
            // uses the daemons to delete the guest before stopping them.
            .process_group(0)
            .spawn()
            .with_context(|| format!("cannot start {}", bin.display()))?;
        self.daemons.push(Daemon {
            host,
            child: Some(child),
            client: ApiClient::new(socket),
            log,
        });
        Ok(())
    }

    /// Waits for daemon `i`'s health endpoint. The daemon gives no other
    /// readiness signal, so this retries until a deadline, failing at
    /// once if the process exits.
    async fn wait_ready(&mut self, i: usize) -> Result<()> {
        let d = &mut self.daemons[i];
        let deadline = Instant::now() + DAEMON_READY_TIMEOUT;
        loop {
            if let Ok(h) = d.client.health().await {
                if h.host_name != d.host {
                    bail!("{} answers as {}", d.client.socket().display(), h.host_name);
                }
                return Ok(());
            }
            if let Some(status) = d.child.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                bail!(
                    "migrated {} exited ({status}) at start: {}",
                    d.host,
                    log_tail(&d.log, 5)
                );
            }
            if Instant::now() > deadline {
                bail!(
                    "migrated {} did not answer on {} within {DAEMON_READY_TIMEOUT:?}",
                    d.host,
                    d.client.socket().display()
                );
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn show_logs(&self) {
        for d in &self.daemons {
            self.say.line(format_args!(
                "last lines of {} ({}):\n{}",
                d.log.display(),
                d.host,
                log_tail(&d.log, 8)
            ));
        }
    }

    /// Deletes the guest (cancelling its migration first), stops the
    /// daemons, kills anything still running from the demo directory and
    /// removes it unless `keep`. Problems are reported, not returned: the
    /// demo's own outcome matters more.
    async fn shutdown(&mut self, keep: bool) {
        // A cancelled migration ends asynchronously, and its VM cannot be
        // deleted before it has.
        let mut cancelled = Vec::new();
        for d in self.daemons.iter().filter(|d| d.alive()) {
            if let Ok(ms) = d.client.list_migrations().await {
                for m in ms.iter().filter(|m| !m.phase.is_final()) {
                    let _ = d.client.cancel_migration(&m.name).await;
                    cancelled.push((d.client.clone(), m.name.clone()));
                }
            }
        }
        let deadline = Instant::now() + CANCEL_TIMEOUT;
        for (client, name) in cancelled {
            while Instant::now() < deadline {
                match client.get_migration(&name).await {
                    Ok(m) if !m.phase.is_final() => {
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    _ => break,
                }
            }
        }
        for d in &self.daemons {
            if !d.alive() {
                continue;
            }
            if let Ok(vms) = d.client.list_vms().await {
                for vm in vms {
                    if let Err(e) = d.client.delete_vm(&vm.spec.name).await {
                        self.say.line(format_args!(
                            "warning: cannot delete vm {} on {}: {e}",
                            vm.spec.name, d.host
                        ));
                    }
                }
            }
        }
        for d in &mut self.daemons {
            d.stop().await;
        }
        self.kill_strays();
        if let Some(dir) = self.dir.take() {
            if keep {
                let path = dir.keep();
                self.say.line(format_args!(
                    "kept {} (configs, certificates, logs)",
                    path.display()
                ));
            } else if let Err(e) = dir.close() {
                self.say
                    .line(format_args!("warning: cannot remove the demo dir: {e}"));
            }
        }
    }

    /// SIGKILLs every process whose command line mentions the demo dir:
    /// guests whose daemon could not delete them, a destination VMM of an
    /// interrupted migration, a daemon that ignored SIGTERM.
    fn kill_strays(&self) {
        let Some(root) = self
            .dir
            .as_ref()
            .map(|d| d.path().to_string_lossy().into_owned())
        else {
            return;
        };
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
            let Ok(cmdline) = std::fs::read(p.path().join("cmdline")) else {
                continue;
            };
            if String::from_utf8_lossy(&cmdline).contains(root.as_str()) {
                self.say
                    .line(format_args!("warning: killing leftover process {pid}"));
                let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for d in &mut self.daemons {
            if let Some(mut child) = d.child.take() {
                let _ = child.kill();
                let _ = child.wait();
            }
        }
        self.kill_strays();
    }
}

impl Daemon {
    fn alive(&self) -> bool {
        self.child.is_some()
    }

    /// SIGTERM, then SIGKILL if it has not exited in time.
    async fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        if let Ok(pid) = i32::try_from(child.id()) {
            let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
        }
        let deadline = Instant::now() + DAEMON_EXIT_TIMEOUT;
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

/// The last `n` non-empty lines of a log file, indented.
fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b[b.len().saturating_sub(8192)..]).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = &lines[lines.len().saturating_sub(n)..];
    if tail.is_empty() {
        "    (empty)".into()
    } else {
        tail.iter()
            .map(|l| format!("    {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn demo_configs_point_at_each_other() {
        let tmp = tempfile::tempdir().unwrap();
        let (path, sock) = host_config(
            tmp.path(),
            HOST_A,
            4000,
            HOST_B,
            4001,
            Path::new("/x/migrate-vmm"),
        )
        .unwrap();
        let c = Config::load(&path).unwrap();
        assert_eq!(c.host_name, HOST_A);
        assert_eq!(c.api_socket, sock);
        assert_eq!(c.listen.to_string(), "127.0.0.1:4000");
        assert_eq!(
            c.peers.get(HOST_B).map(String::as_str),
            Some("127.0.0.1:4001")
        );
        assert!(c.tls.key.starts_with(tmp.path().join(HOST_A)));
        assert_eq!(c.vmm_binary, Path::new("/x/migrate-vmm"));
    }

    #[test]
    fn free_ports_differ() {
        let [a, b] = free_udp_ports().unwrap();
        assert_ne!(a, b);
        assert_ne!(a, 0);
    }

    #[test]
    fn counters_advance_by_passes_or_pages() {
        let g = |passes, pages_written| GuestCounters {
            passes,
            pages_written,
            ..GuestCounters::default()
        };
        assert!(advanced(&g(1, 10), &g(1, 11)));
        assert!(advanced(&g(1, 10), &g(2, 10)));
        assert!(!advanced(&g(1, 10), &g(1, 10)));
    }
}
