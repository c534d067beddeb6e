//! QEMU processes: start one from a spec, find a running one again after
//! a daemon restart, stop one.
//!
//! QEMU daemonizes itself (see `args`): the process the daemon spawns only
//! sets the VM up and exits with the verdict, and the VM process lives in
//! its own session, not as the daemon's child. So a running QEMU is known
//! by its state directory alone, the same way after a launch and after a
//! restart:
//!
//! * the pidfile names it, and QEMU holds a POSIX lock on that file for
//!   its whole life, so the lock's owner (F_GETLK) is the live QEMU and a
//!   stale pidfile with a recycled pid is never mistaken for one;
//! * a pidfd on that pid tells when it exits (zombies included: nobody
//!   here reaps it) and signals it without pid-reuse races;
//! * the QMP socket controls it, and its closing is the first sign of an
//!   exit: supervision waits on [`QmpClient::closed`], then confirms with
//!   [`QemuProcess::wait_exit`].
//!
//! Waiting on the pidfd is a bounded `poll(2)` on a blocking thread:
//! tokio's `AsyncFd` needs `unsafe` to register a raw fd, which this crate
//! forbids.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom};
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::Arc;
use std::time::Duration;

use rustix::event::{poll, PollFd, PollFlags, Timespec};
use rustix::process::{
    fcntl_getlk, pidfd_open, pidfd_send_signal, Flock, FlockOffsetType, FlockType, Pid, PidfdFlags,
    Signal,
};
use tracing::{info, warn};

use super::args::{qemu_command, LaunchMode, QemuCommandError, QemuPaths, QemuTools};
use super::commands::StatusInfo;
use super::qmp::{QmpClient, QmpError, QmpOptions};
use super::spec::QemuVmSpec;

/// The bytes of `qemu.log` quoted in a launch error.
const LOG_TAIL_BYTES: u64 = 2048;

/// How QEMUs are started and stopped on this host.
#[derive(Clone, Debug)]
pub struct QemuLauncher {
    /// `qemu-system-x86_64` (looked up in PATH) or a path.
    pub binary: PathBuf,
    pub tools: QemuTools,
    pub qmp: QmpOptions,
    /// Time for QEMU to set the VM up (allocating guest RAM included).
    pub setup_timeout: Duration,
    /// Time for QEMU to exit after `quit`, and again after SIGKILL.
    pub exit_timeout: Duration,
}

impl Default for QemuLauncher {
    fn default() -> Self {
        Self {
            binary: "qemu-system-x86_64".into(),
            tools: QemuTools::default(),
            qmp: QmpOptions::default(),
            setup_timeout: Duration::from_secs(60),
            exit_timeout: Duration::from_secs(15),
        }
    }
}

/// A running QEMU and a connection to its monitor.
#[derive(Debug)]
pub struct QemuProcess {
    pid: i32,
    pidfd: Arc<OwnedFd>,
    pub qmp: QmpClient,
    pub paths: QemuPaths,
}

/// Starting QEMU failed. On every error after the spawn, a QEMU that got
/// as far as running has been killed.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error("cannot build qemu's command line")]
    Command(#[source] QemuCommandError),
    #[error("a qemu (pid {pid}) already runs in {dir}")]
    AlreadyRunning { pid: i32, dir: PathBuf },
    #[error("cannot use the files in {dir}")]
    StateFiles {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot start {binary}")]
    Spawn {
        binary: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("qemu failed to set up the vm ({status}); qemu.log ends with: {log_tail}")]
    Setup { status: String, log_tail: String },
    #[error("qemu did not finish setting up within {timeout:?}; it was killed")]
    SetupTimeout { timeout: Duration },
    #[error("qemu reported success but holds no lock on its pidfile {path}")]
    NoPidfileLock { path: PathBuf },
    #[error("cannot watch qemu process {pid}")]
    Pidfd {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("qemu started but its monitor does not answer; it was killed")]
    Qmp(#[source] QmpError),
}

/// Finding a running QEMU failed.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    #[error("no qemu runs in {dir}")]
    NotRunning { dir: PathBuf },
    #[error("cannot read pidfile {path}")]
    Pidfile {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot watch qemu process {pid}")]
    Pidfd {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("qemu (pid {pid}) runs but its monitor does not answer")]
    Qmp {
        pid: i32,
        #[source]
        source: QmpError,
    },
}

/// QEMU could not be made to exit.
#[derive(Debug, thiserror::Error)]
pub enum StopError {
    #[error("cannot signal qemu (pid {pid})")]
    Kill {
        pid: i32,
        #[source]
        source: io::Error,
    },
    #[error("qemu (pid {pid}) still runs {timeout:?} after SIGKILL")]
    NotExited { pid: i32, timeout: Duration },
}

impl QemuLauncher {
    /// Checks the spec's files, starts QEMU and returns once its monitor
    /// answers. `Start { paused: true }` and `Incoming` leave the vCPUs
    /// stopped until `cont`.
    pub async fn launch(
        &self,
        spec: &QemuVmSpec,
        paths: &QemuPaths,
        mode: LaunchMode,
    ) -> Result<QemuProcess, LaunchError> {
        let args = qemu_command(spec, paths, mode, &self.tools).map_err(LaunchError::Command)?;
        info!(vm = %spec.name, ?mode, "starting qemu");
        let qemu = self.spawn_daemonized(&args, paths).await?;
        info!(vm = %spec.name, pid = qemu.pid, "qemu running");
        Ok(qemu)
    }

    /// Runs QEMU with `args` (which must daemonize it with `paths`' pidfile
    /// and QMP socket) and connects to it once it is set up.
    pub(crate) async fn spawn_daemonized(
        &self,
        args: &[std::ffi::OsString],
        paths: &QemuPaths,
    ) -> Result<QemuProcess, LaunchError> {
        let state_err = |source| LaunchError::StateFiles {
            dir: paths.dir.clone(),
            source,
        };
        if let Some(pid) = pidfile_owner(&paths.pidfile).map_err(state_err)? {
            return Err(LaunchError::AlreadyRunning {
                pid,
                dir: paths.dir.clone(),
            });
        }
        // Leftovers of a QEMU that was killed: nobody owns them.
        for stale in [&paths.pidfile, &paths.qmp_socket] {
            match std::fs::remove_file(stale) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(state_err(e)),
                _ => {}
            }
        }
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&paths.qemu_log)
            .map_err(state_err)?;
        let log_for_stdout = log.try_clone().map_err(state_err)?;
        let mut setup = tokio::process::Command::new(&self.binary)
            .args(args)
            .stdin(Stdio::null())
            .stdout(log_for_stdout)
            .stderr(log)
            // The setup process only; the VM process makes its own session.
            .process_group(0)
            .kill_on_drop(true)
            .spawn()
            .map_err(|source| LaunchError::Spawn {
                binary: self.binary.clone(),
                source,
            })?;
        let status = match tokio::time::timeout(self.setup_timeout, setup.wait()).await {
            Ok(status) => status.map_err(state_err)?,
            Err(_) => {
                let _ = setup.kill().await;
                // The VM process may exist already; it must not linger.
                if let Ok(Some(pid)) = pidfile_owner(&paths.pidfile) {
                    if let Ok(fd) = open_pidfd(pid) {
                        let _ = pidfd_send_signal(&fd, Signal::KILL);
                    }
                }
                return Err(LaunchError::SetupTimeout {
                    timeout: self.setup_timeout,
                });
            }
        };
        if !status.success() {
            return Err(LaunchError::Setup {
                status: status.to_string(),
                log_tail: log_tail(&paths.qemu_log),
            });
        }
        let pid = pidfile_owner(&paths.pidfile)
            .map_err(state_err)?
            .ok_or_else(|| LaunchError::NoPidfileLock {
                path: paths.pidfile.clone(),
            })?;
        let pidfd = open_pidfd(pid).map_err(|source| LaunchError::Pidfd { pid, source })?;
        let qmp = match QmpClient::connect(&paths.qmp_socket, &self.qmp).await {
            Ok(qmp) => qmp,
            Err(e) => {
                let _ = pidfd_send_signal(&pidfd, Signal::KILL);
                return Err(LaunchError::Qmp(e));
            }
        };
        Ok(QemuProcess {
            pid,
            pidfd: Arc::new(pidfd),
            qmp,
            paths: paths.clone(),
        })
    }

    /// Finds the QEMU running in `paths.dir` (after a daemon restart) and
    /// connects to its monitor. The guest is not disturbed.
    pub async fn attach(&self, paths: &QemuPaths) -> Result<QemuProcess, AttachError> {
        let pid = pidfile_owner(&paths.pidfile)
            .map_err(|source| AttachError::Pidfile {
                path: paths.pidfile.clone(),
                source,
            })?
            .ok_or_else(|| AttachError::NotRunning {
                dir: paths.dir.clone(),
            })?;
        let pidfd = open_pidfd(pid).map_err(|source| AttachError::Pidfd { pid, source })?;
        // The lock owner could have exited between the two calls and its
        // pid been reused: the pidfd is QEMU's only if QEMU still holds it.
        if pidfile_owner(&paths.pidfile).ok().flatten() != Some(pid) {
            return Err(AttachError::NotRunning {
                dir: paths.dir.clone(),
            });
        }
        let qmp = QmpClient::connect(&paths.qmp_socket, &self.qmp)
            .await
            .map_err(|source| AttachError::Qmp { pid, source })?;
        info!(pid, dir = %paths.dir.display(), "re-attached to qemu");
        Ok(QemuProcess {
            pid,
            pidfd: Arc::new(pidfd),
            qmp,
            paths: paths.clone(),
        })
    }

    /// Ends QEMU: `quit` (the guest is not asked; use `system_powerdown`
    /// first for a clean guest shutdown), then SIGKILL if it has not
    /// exited within `exit_timeout`.
    pub async fn stop(&self, qemu: &QemuProcess) -> Result<(), StopError> {
        if qemu.has_exited() {
            return Ok(());
        }
        match qemu.qmp.quit().await {
            // QEMU may close the socket before its reply gets out.
            Ok(()) | Err(QmpError::Disconnected { .. }) => {
                if qemu.wait_exit(self.exit_timeout).await {
                    return Ok(());
                }
                warn!(pid = qemu.pid, "qemu did not exit after quit; killing it");
            }
            Err(e) => warn!(pid = qemu.pid, error = %e, "quit failed; killing qemu"),
        }
        qemu.kill()?;
        if qemu.wait_exit(self.exit_timeout).await {
            Ok(())
        } else {
            Err(StopError::NotExited {
                pid: qemu.pid,
                timeout: self.exit_timeout,
            })
        }
    }
}

impl QemuProcess {
    pub fn pid(&self) -> i32 {
        self.pid
    }

    /// QEMU's run state (`running`, `paused`, `inmigrate`, `postmigrate`...).
    pub async fn status(&self) -> Result<StatusInfo, QmpError> {
        self.qmp.query_status().await
    }

    /// True once the process has exited.
    pub fn has_exited(&self) -> bool {
        exited_within(&self.pidfd, Duration::ZERO)
    }

    /// Waits up to `timeout` for the exit; true if it happened.
    pub async fn wait_exit(&self, timeout: Duration) -> bool {
        let pidfd = Arc::clone(&self.pidfd);
        tokio::task::spawn_blocking(move || exited_within(&pidfd, timeout))
            .await
            .unwrap_or(false)
    }

    /// SIGKILL, through the pidfd (never another process with a reused pid).
    pub fn kill(&self) -> Result<(), StopError> {
        match pidfd_send_signal(&*self.pidfd, Signal::KILL) {
            // ESRCH: it has exited already.
            Err(e) if e != rustix::io::Errno::SRCH => Err(StopError::Kill {
                pid: self.pid,
                source: e.into(),
            }),
            _ => Ok(()),
        }
    }
}

/// The pid holding the write lock on `pidfile`: the QEMU that wrote it,
/// if it still runs. No file, or no lock, is `None`.
pub fn pidfile_owner(pidfile: &Path) -> io::Result<Option<i32>> {
    let file = match File::open(pidfile) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e),
    };
    let probe = Flock {
        start: 0,
        length: 0,
        pid: None,
        typ: FlockType::WriteLock,
        offset_type: FlockOffsetType::Set,
    };
    let owner = fcntl_getlk(&file, &probe)?;
    Ok(owner
        .filter(|l| l.typ != FlockType::Unlocked)
        .and_then(|l| l.pid)
        .map(Pid::as_raw_nonzero)
        .map(|p| p.get()))
}

/// Polls a pidfd: it turns readable when the process exits.
fn exited_within(pidfd: &OwnedFd, timeout: Duration) -> bool {
    let timeout = Timespec::try_from(timeout).unwrap_or(Timespec {
        tv_sec: i64::MAX,
        tv_nsec: 0,
    });
    let mut fds = [PollFd::new(pidfd, PollFlags::IN)];
    loop {
        match poll(&mut fds, Some(&timeout)) {
            Ok(n) => return n > 0,
            // A signal cut the wait short; the deadline restarts, which
            // only makes a rare wait longer.
            Err(rustix::io::Errno::INTR) => continue,
            // An unusable pidfd cannot be told from an exit.
            Err(_) => return true,
        }
    }
}

fn open_pidfd(pid: i32) -> io::Result<OwnedFd> {
    let pid = Pid::from_raw(pid).ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
    Ok(pidfd_open(pid, PidfdFlags::empty())?)
}

/// The end of a log, for an error message.
fn log_tail(path: &Path) -> String {
    let read = || -> io::Result<String> {
        let mut f = File::open(path)?;
        let len = f.metadata()?.len();
        f.seek(SeekFrom::Start(len.saturating_sub(LOG_TAIL_BYTES)))?;
        let mut bytes = Vec::new();
        f.read_to_end(&mut bytes)?;
        Ok(String::from_utf8_lossy(&bytes).trim().to_owned())
    };
    match read() {
        Ok(s) if s.is_empty() => "(nothing)".into(),
        Ok(s) => s,
        Err(e) => format!("(unreadable: {e})"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pidfile_without_a_lock_has_no_owner() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.pid");
        assert_eq!(pidfile_owner(&path).unwrap(), None);
        // A stale pidfile naming a live process (ours) is still no owner.
        std::fs::write(&path, format!("{}\n", std::process::id())).unwrap();
        assert_eq!(pidfile_owner(&path).unwrap(), None);
    }

    #[test]
    fn log_tail_keeps_the_end() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("qemu.log");
        assert!(log_tail(&path).starts_with("(unreadable: "));
        std::fs::write(&path, "").unwrap();
        assert_eq!(log_tail(&path), "(nothing)");
        let mut text = "x".repeat(5000);
        text.push_str("\nqemu-system-x86_64: the real error\n");
        std::fs::write(&path, &text).unwrap();
        let tail = log_tail(&path);
        assert!(tail.ends_with("the real error"), "{tail}");
        assert!(tail.len() <= LOG_TAIL_BYTES as usize);
    }
}
