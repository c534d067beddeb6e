//! VM supervision: one `migrate-vmm` process per guest, driven through its
//! control socket with the vmm crate's blocking `ControlClient`.
//!
//! VMMs are started in their own process group with stdin closed and stderr
//! going to a file in the VM's directory, and they are never tied to the
//! daemon's lifetime: a daemon restart finds them again through their
//! control sockets (`probe`). The daemon only waits for the `READY` line on
//! the VMM's stdout, then lets go of the pipe.
//!
//! Everything here blocks; the service calls it from blocking threads.

use std::io::{self, BufRead, BufReader, Read};
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::{mpsc, Mutex};
use std::time::Duration;

use tracing::{info, warn};
use vmm::control::{CallError, ControlClient, RunState};
use vmm::workload as vmm_workload;

use crate::model::{
    DirtyMode, DirtyRate, GuestCounters, InvalidSpecError, Quantity, VmSpec, WorkloadSpec,
};
use crate::store::VmPaths;

/// Memory left to the host when deciding whether a guest fits.
pub const HOST_MEMORY_RESERVE: Quantity = Quantity::mib(256);

/// What a probe of a live VMM found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Probe {
    /// False when the guest crashed or the VMM is on its way out.
    pub healthy: bool,
    /// Why, when not healthy.
    pub reason: Option<String>,
    pub counters: GuestCounters,
}

/// Starting a VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("host has {available} of memory available, the guest needs {needed} plus a reserve of {reserve}")]
    InsufficientMemory {
        needed: Quantity,
        available: Quantity,
        reserve: Quantity,
    },
    #[error("cannot read available host memory from /proc/meminfo")]
    MemInfo(#[source] io::Error),
    #[error("cannot open vmm log {path}")]
    Log {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start vmm binary {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("vmm exited before it was ready ({status}); its log says: {log_tail}")]
    Exited { status: String, log_tail: String },
    #[error("vmm did not report ready within {timeout:?}; it was killed")]
    NotReady { timeout: Duration },
}

/// A VMM could not be reached or did not answer.
#[derive(Debug, thiserror::Error)]
pub enum ProbeError {
    #[error("vmm control socket {path} is gone (vmm not running)")]
    Gone { path: PathBuf },
    #[error("vmm did not answer")]
    Call(#[source] CallError),
}

/// Stopping a VMM failed.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("vmm refused to shut down")]
    Call(#[source] CallError),
    #[error("control socket i/o failed")]
    Io(#[source] io::Error),
    #[error("vmm acknowledged the shutdown but did not exit within {timeout:?}")]
    NotExited { timeout: Duration },
}

/// What the service needs from a VM runtime. The real one runs
/// `migrate-vmm`; tests use a fake (see `testing`).
pub trait VmBackend: Send + Sync + 'static {
    /// Starts the guest and returns its VMM's pid once it is ready.
    fn launch(&self, spec: &VmSpec, paths: &VmPaths) -> Result<u32, LaunchError>;
    /// Asks the VMM behind `paths.control_socket` how it is doing.
    fn probe(&self, paths: &VmPaths) -> Result<Probe, ProbeError>;
    /// Shuts the VMM down; a VMM that is already gone is not an error.
    fn shutdown(&self, paths: &VmPaths) -> Result<(), StopError>;
}

/// The real backend.
#[derive(Clone, Debug)]
pub struct VmmSupervisor {
    binary: PathBuf,
    ready_timeout: Duration,
    call_timeout: Duration,
    exit_timeout: Duration,
}

impl VmmSupervisor {
    /// `binary` as configured: a bare name is looked up next to the
    /// running executable first (where cargo and packages put it), then
    /// left for PATH lookup by `Command`.
    pub fn new(binary: &Path) -> Self {
        Self {
            binary: resolve_binary(binary),
            ready_timeout: Duration::from_secs(30),
            call_timeout: Duration::from_secs(5),
            exit_timeout: Duration::from_secs(15),
        }
    }

    pub fn binary(&self) -> &Path {
        &self.binary
    }

    /// Starts `migrate-vmm restore --wait-state` on `memfd` for an incoming
    /// migration and returns its pid once it serves its control socket.
    /// The guest stays paused until it gets its state and a Resume.
    pub fn spawn_restore(
        &self,
        name: &str,
        paths: &VmPaths,
        memfd: BorrowedFd<'_>,
    ) -> Result<u32, LaunchError> {
        let log = open_log(paths)?;
        // Spawns are serialized (see SPAWN_LOCK) from here until the child
        // exists, so no other child inherits this memfd.
        let serial = SPAWN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        // dup() gives a descriptor without FD_CLOEXEC: the child inherits it
        // under the same number; ours is closed right after the spawn.
        let inheritable = nix::unistd::dup(memfd).map_err(|e| LaunchError::Spawn {
            binary: self.binary.clone(),
            source: e.into(),
        })?;
        let mut cmd = Command::new(&self.binary);
        cmd.arg("restore")
            .arg("--name")
            .arg(name)
            .arg("--control-socket")
            .arg(&paths.control_socket)
            .arg("--serial-log")
            .arg(&paths.serial_log)
            .arg("--memfd-fd")
            .arg(inheritable.as_raw_fd().to_string())
            .arg("--wait-state")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            .process_group(0);
        self.spawn_ready(cmd, name, paths, (serial, inheritable))
    }

    /// Spawns `cmd` (stdout piped) and waits for the VMM's READY line.
    /// `held` (the spawn lock, an inheritable fd) is released as soon as
    /// the child exists, not after the wait.
    fn spawn_ready(
        &self,
        mut cmd: Command,
        name: &str,
        paths: &VmPaths,
        held: impl Sized,
    ) -> Result<u32, LaunchError> {
        let spawned = cmd.spawn();
        drop(held);
        let mut child = spawned.map_err(|source| LaunchError::Spawn {
            binary: self.binary.clone(),
            source,
        })?;
        let pid = child.id();
        let stdout = child.stdout.take().expect("stdout was piped");
        // The READY line is read on a helper thread so the wait can time
        // out; the pipe is dropped with the thread once the line is in.
        let (tx, rx) = mpsc::sync_channel(1);
        std::thread::Builder::new()
            .name(format!("vmm-ready-{pid}"))
            .spawn(move || {
                let mut line = String::new();
                let got = BufReader::new(stdout.take(4096)).read_line(&mut line);
                let _ = tx.send(got.map(|_| line));
            })
            .map_err(|source| LaunchError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let ready = match rx.recv_timeout(self.ready_timeout) {
            Ok(Ok(line)) => line.starts_with("READY "),
            Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => false,
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                return Err(LaunchError::NotReady {
                    timeout: self.ready_timeout,
                });
            }
        };
        if !ready {
            // No READY: the VMM is exiting (or printed garbage). Reap it and
            // show the end of its log, which says why.
            let _ = child.kill();
            let status = child
                .wait()
                .map(|s| s.to_string())
                .unwrap_or_else(|e| format!("wait failed: {e}"));
            return Err(LaunchError::Exited {
                status,
                log_tail: log_tail(&paths.vmm_log),
            });
        }
        // Reap the VMM when it exits, so it does not linger as a zombie
        // while this daemon lives. After a daemon restart init reaps it.
        let vm = name.to_owned();
        let _ = std::thread::Builder::new()
            .name(format!("vmm-reap-{pid}"))
            .spawn(move || match child.wait() {
                Ok(status) => info!(%vm, pid, %status, "vmm exited"),
                Err(e) => warn!(%vm, pid, error = %e, "cannot wait for vmm"),
            });
        info!(vm = %name, pid, "vmm ready");
        Ok(pid)
    }

    fn connect(&self, paths: &VmPaths) -> Result<ControlClient, ProbeError> {
        // A wedged VMM must not wedge the daemon's blocking pool.
        ControlClient::connect_with_timeout(&paths.control_socket, self.call_timeout).map_err(|e| {
            match e {
                CallError::Connect { path, .. } => ProbeError::Gone { path },
                other => ProbeError::Call(other),
            }
        })
    }
}

fn resolve_binary(binary: &Path) -> PathBuf {
    if binary.components().count() == 1 {
        if let Some(dir) = std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(Path::to_owned))
        {
            let candidate = dir.join(binary);
            if candidate.is_file() {
                return candidate;
            }
        }
    }
    binary.to_owned()
}

impl VmBackend for VmmSupervisor {
    fn launch(&self, spec: &VmSpec, paths: &VmPaths) -> Result<u32, LaunchError> {
        let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(LaunchError::MemInfo)?;
        check_host_memory(spec.memory, &meminfo)?;
        let log = open_log(paths)?;
        let w = &spec.workload;
        let (rate, mode) = vmm_rate_and_mode(w);
        let mut cmd = Command::new(&self.binary);
        cmd.arg("run")
            .arg("--name")
            .arg(&spec.name)
            .arg("--control-socket")
            .arg(&paths.control_socket)
            .arg("--serial-log")
            .arg(&paths.serial_log)
            .arg("--memory")
            .arg(spec.memory.bytes().to_string())
            .arg("--vcpus")
            .arg(spec.vcpus.to_string())
            .arg("--wss")
            .arg(w.wss.bytes().to_string())
            .arg("--dirty-rate")
            .arg(rate.to_string())
            .arg("--mode")
            .arg(mode.to_string())
            .arg("--seed")
            .arg(w.seed.to_string())
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(log)
            // Own process group: a Ctrl-C or SIGTERM aimed at the daemon's
            // group never reaches the guests.
            .process_group(0);
        let serial = SPAWN_LOCK.lock().unwrap_or_else(|p| p.into_inner());
        self.spawn_ready(cmd, &spec.name, paths, serial)
    }

    fn probe(&self, paths: &VmPaths) -> Result<Probe, ProbeError> {
        let mut client = self.connect(paths)?;
        let s = client.status().map_err(ProbeError::Call)?;
        let (healthy, reason) = match &s.run_state {
            RunState::Crashed { reason } => (false, Some(format!("guest crashed: {reason}"))),
            RunState::ShuttingDown => (false, Some("vmm is shutting down".to_string())),
            _ => (true, None),
        };
        let run_state = match &s.run_state {
            RunState::Created => "created",
            RunState::Running => "running",
            RunState::Paused => "paused",
            RunState::WaitingForState => "waiting_for_state",
            RunState::ShuttingDown => "shutting_down",
            RunState::Crashed { .. } => "crashed",
        };
        Ok(Probe {
            healthy,
            reason,
            counters: GuestCounters {
                run_state: run_state.into(),
                passes: s.counters.iter().map(|c| c.passes).sum(),
                pages_written: s.counters.iter().map(|c| c.pages_written).sum(),
                corrupt_pages: s.counters.iter().map(|c| c.corrupt).sum(),
                throttle_pct: s.throttle_pct,
                uptime_ms: s.uptime_ms,
            },
        })
    }

    fn shutdown(&self, paths: &VmPaths) -> Result<(), StopError> {
        let stream = match UnixStream::connect(&paths.control_socket) {
            Ok(s) => s,
            // No socket or nobody listening: the VMM is already gone.
            Err(_) => return Ok(()),
        };
        let waiter = stream.try_clone().map_err(StopError::Io)?;
        let mut client = ControlClient::from_stream(stream);
        client
            .set_timeout(Some(self.call_timeout))
            .map_err(StopError::Call)?;
        match client.shutdown() {
            Ok(()) | Err(CallError::Closed) => {}
            Err(e) => return Err(StopError::Call(e)),
        }
        // The VMM keeps the connection open until its process ends (after
        // removing its socket), so end of stream here means it is gone and
        // the VM can be started again at once.
        waiter
            .set_read_timeout(Some(self.exit_timeout))
            .map_err(StopError::Io)?;
        let mut buf = [0u8; 64];
        loop {
            match (&waiter).read(&mut buf) {
                Ok(0) => return Ok(()),
                Ok(_) => continue,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(StopError::NotExited {
                        timeout: self.exit_timeout,
                    })
                }
                // A reset is the connection going away too.
                Err(_) => return Ok(()),
            }
        }
    }
}

/// Held while a VMM process is being spawned: `spawn_restore` makes the
/// guest's memfd inheritable for that moment, and any other child spawned
/// then would inherit it too (keeping the guest's RAM alive).
static SPAWN_LOCK: Mutex<()> = Mutex::new(());

fn open_log(paths: &VmPaths) -> Result<std::fs::File, LaunchError> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&paths.vmm_log)
        .map_err(|source| LaunchError::Log {
            path: paths.vmm_log.clone(),
            source,
        })
}

/// Last few lines of a VMM log, for error messages.
fn log_tail(path: &Path) -> String {
    let text = std::fs::read(path)
        .map(|b| String::from_utf8_lossy(&b[b.len().saturating_sub(2048)..]).into_owned())
        .unwrap_or_default();
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    let tail = lines[lines.len().saturating_sub(3)..].join(" | ");
    if tail.is_empty() {
        "(empty)".into()
    } else {
        tail
    }
}

/// `MemAvailable` from /proc/meminfo text.
pub fn mem_available(meminfo: &str) -> Option<Quantity> {
    meminfo.lines().find_map(|l| {
        let rest = l.strip_prefix("MemAvailable:")?;
        let kib: u64 = rest.trim().strip_suffix("kB")?.trim().parse().ok()?;
        kib.checked_mul(1024).map(Quantity)
    })
}

/// Refuses a guest that would not fit in available memory plus the reserve.
pub fn check_host_memory(needed: Quantity, meminfo: &str) -> Result<(), LaunchError> {
    let available = mem_available(meminfo).ok_or_else(|| {
        LaunchError::MemInfo(io::Error::new(
            io::ErrorKind::InvalidData,
            "no MemAvailable line",
        ))
    })?;
    if needed.bytes().saturating_add(HOST_MEMORY_RESERVE.bytes()) > available.bytes() {
        return Err(LaunchError::InsufficientMemory {
            needed,
            available,
            reserve: HOST_MEMORY_RESERVE,
        });
    }
    Ok(())
}

/// Checks a spec's workload against the VMM's own limits, before anything
/// is launched, so that a bad spec is an invalid argument and not a failed
/// VMM. The VMM checks again when it loads the guest (with the exact
/// layout: the working set must also fit beside the guest program).
pub fn check_workload(spec: &VmSpec) -> Result<(), InvalidSpecError> {
    if spec.vcpus == 0 || spec.vcpus > vmm_workload::MAX_VCPUS {
        return Err(InvalidSpecError::Vcpus {
            vcpus: spec.vcpus,
            max: vmm_workload::MAX_VCPUS,
        });
    }
    if spec.workload.wss > spec.memory {
        return Err(InvalidSpecError::WssTooLarge {
            wss: spec.workload.wss,
            memory: spec.memory,
        });
    }
    Ok(())
}

/// The VMM's own dirty rate and mode for the API's: `migrate-vmm` parses
/// its command line with these types, so their text forms always agree.
fn vmm_rate_and_mode(w: &WorkloadSpec) -> (vmm_workload::DirtyRate, vmm_workload::DirtyMode) {
    let rate = match w.dirty_rate {
        DirtyRate::Idle => vmm_workload::DirtyRate::Idle,
        DirtyRate::MibPerSec(n) => vmm_workload::DirtyRate::MibPerSec(n),
        DirtyRate::Max => vmm_workload::DirtyRate::Max,
    };
    let mode = match w.mode {
        DirtyMode::Sparse => vmm_workload::DirtyMode::Sparse,
        DirtyMode::Full => vmm_workload::DirtyMode::Full,
    };
    (rate, mode)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workload_checks_use_the_vmms_limits() {
        let spec = VmSpec {
            name: "web-1".into(),
            labels: Default::default(),
            memory: Quantity(1 << 30),
            vcpus: 2,
            workload: WorkloadSpec::default(),
        };
        assert_eq!(check_workload(&spec), Ok(()));
        for vcpus in [0, vmm_workload::MAX_VCPUS + 1] {
            let s = VmSpec {
                vcpus,
                ..spec.clone()
            };
            assert!(matches!(
                check_workload(&s),
                Err(InvalidSpecError::Vcpus { .. })
            ));
        }
        let mut s = spec.clone();
        s.vcpus = vmm_workload::MAX_VCPUS;
        assert_eq!(check_workload(&s), Ok(()));
        s.workload.wss = Quantity(2 << 30);
        assert!(matches!(
            check_workload(&s),
            Err(InvalidSpecError::WssTooLarge { .. })
        ));
    }

    #[test]
    fn workload_text_is_the_vmms() {
        // What the daemon writes on `migrate-vmm`'s command line reads back
        // as the same parameters there.
        for dirty_rate in [DirtyRate::Idle, DirtyRate::MibPerSec(50), DirtyRate::Max] {
            for mode in [DirtyMode::Sparse, DirtyMode::Full] {
                let w = WorkloadSpec {
                    dirty_rate,
                    mode,
                    ..WorkloadSpec::default()
                };
                let (rate, vmode) = vmm_rate_and_mode(&w);
                assert_eq!(rate.to_string().parse(), Ok(rate));
                assert_eq!(vmode.to_string().parse(), Ok(vmode));
                // The API's text form is the same, so a user reads one.
                assert_eq!(rate.to_string(), dirty_rate.to_string());
                assert_eq!(vmode.to_string(), mode.as_str());
            }
        }
    }

    const MEMINFO: &str = "MemTotal:       24683876 kB\nMemFree:        20144216 kB\nMemAvailable:    1048576 kB\nBuffers:  1 kB\n";

    #[test]
    fn reads_mem_available() {
        assert_eq!(mem_available(MEMINFO), Some(Quantity(1 << 30)));
        assert_eq!(mem_available("MemTotal: 5 kB\n"), None);
        assert_eq!(mem_available("MemAvailable: lots kB\n"), None);
    }

    #[test]
    fn refuses_guests_that_do_not_fit() {
        // 1 GiB available, 256 MiB reserved.
        assert!(check_host_memory(Quantity::mib(512), MEMINFO).is_ok());
        assert!(check_host_memory(Quantity::mib(768), MEMINFO).is_ok());
        let err = check_host_memory(Quantity::mib(769), MEMINFO).unwrap_err();
        assert!(matches!(err, LaunchError::InsufficientMemory { .. }));
        assert!(err.to_string().contains("1Gi"), "{err}");
        assert!(matches!(
            check_host_memory(Quantity::mib(1), "garbage"),
            Err(LaunchError::MemInfo(_))
        ));
    }

    #[test]
    fn missing_binary_is_a_spawn_error() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(tmp.path()).unwrap();
        let paths = store.vm_paths("a");
        std::fs::create_dir_all(&paths.dir).unwrap();
        let sup = VmmSupervisor::new(&tmp.path().join("no-such-vmm"));
        let spec = VmSpec {
            name: "a".into(),
            labels: Default::default(),
            memory: Quantity::mib(16),
            vcpus: 1,
            workload: Default::default(),
        };
        assert!(matches!(
            sup.launch(&spec, &paths),
            Err(LaunchError::Spawn { .. })
        ));
        // And a VMM that was never started is reported gone, not hung.
        assert!(matches!(sup.probe(&paths), Err(ProbeError::Gone { .. })));
        assert!(sup.shutdown(&paths).is_ok());
    }

    #[test]
    fn a_vmm_that_exits_early_is_reported_with_its_log() {
        let tmp = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(tmp.path()).unwrap();
        let paths = store.vm_paths("a");
        std::fs::create_dir_all(&paths.dir).unwrap();
        // A stand-in VMM that fails the way a real one does without KVM.
        let fake = tmp.path().join("fake-vmm");
        std::fs::write(
            &fake,
            "#!/bin/sh\necho 'error: cannot open /dev/kvm' >&2\nexit 3\n",
        )
        .unwrap();
        std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let sup = VmmSupervisor::new(&fake);
        let spec = VmSpec {
            name: "a".into(),
            labels: Default::default(),
            memory: Quantity::mib(16),
            vcpus: 1,
            workload: Default::default(),
        };
        match sup.launch(&spec, &paths) {
            Err(LaunchError::Exited { status, log_tail }) => {
                assert!(status.contains('3'), "{status}");
                assert!(log_tail.contains("/dev/kvm"), "{log_tail}");
            }
            other => panic!("expected Exited, got {other:?}"),
        }
    }
}
