//! Helpers shared by the `migrate-vmm` integration tests: starting VMM
//! processes (synchronised on their `READY` line), talking to them through
//! the control client, and waiting on the guest's own counters with a
//! bounded deadline.
//!
//! Each test file is its own binary; cargo runs them one after another. The
//! KVM tests are heavy for a 2-core host, so run them with
//! `-- --test-threads=1`.

#![allow(dead_code)] // each test binary uses a different subset

use std::io::{BufRead, BufReader, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdout, Command, ExitStatus, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use vmm::control::{ControlClient, RunState, VmStatus};

pub const VMM_BIN: &str = env!("CARGO_BIN_EXE_migrate-vmm");
/// Bound on how long a VMM may take to print READY.
pub const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// Bound on every control call, so a hung VMM fails the test instead of
/// hanging it.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// Arguments of `migrate-vmm run`.
#[derive(Clone, Debug)]
pub struct RunOpts {
    pub memory: &'static str,
    pub vcpus: u32,
    pub wss: &'static str,
    pub dirty_rate: &'static str,
    pub mode: &'static str,
    pub seed: u64,
    pub paused: bool,
}

impl Default for RunOpts {
    fn default() -> Self {
        Self {
            memory: "64M",
            vcpus: 1,
            wss: "4M",
            dirty_rate: "200",
            mode: "sparse",
            seed: 7,
            paused: false,
        }
    }
}

/// A running `migrate-vmm` process. Killed on drop if still alive.
pub struct Vmm {
    pub child: Child,
    pub socket: PathBuf,
    pub serial_log: PathBuf,
    pub name: String,
    stdout_rest: Option<mpsc::Receiver<String>>,
}

/// How a VMM start ended.
pub enum Started {
    Ready(Vmm),
    /// Exited (or closed stdout) without printing READY.
    Failed {
        status: ExitStatus,
        stdout: String,
        stderr: String,
    },
}

/// Reads stdout lines on a thread so the wait for READY has a deadline.
fn line_reader(stdout: ChildStdout) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn start(mut cmd: Command, name: &str, socket: PathBuf, serial_log: PathBuf) -> Started {
    cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn migrate-vmm");
    let rx = line_reader(child.stdout.take().expect("stdout"));
    let deadline = Instant::now() + READY_TIMEOUT;
    let want = format!("READY {}", socket.display());
    let mut seen = String::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line == want => break,
            Ok(line) => {
                seen.push_str(&line);
                seen.push('\n');
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().expect("wait migrate-vmm");
                let mut stderr = String::new();
                if let Some(mut e) = child.stderr.take() {
                    let _ = e.read_to_string(&mut stderr);
                }
                return Started::Failed {
                    status,
                    stdout: seen,
                    stderr,
                };
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!("{name}: no READY line within {READY_TIMEOUT:?}; stdout so far: {seen}");
            }
        }
    }
    // Drain stderr on a thread so the VMM never blocks on a full pipe; it
    // is echoed to ours so failures show the VMM's logs.
    if let Some(e) = child.stderr.take() {
        let tag = name.to_owned();
        std::thread::spawn(move || {
            for l in BufReader::new(e).lines() {
                let Ok(l) = l else { break };
                eprintln!("[{tag}] {l}");
            }
        });
    }
    Started::Ready(Vmm {
        child,
        socket,
        serial_log,
        name: name.to_owned(),
        stdout_rest: Some(rx),
    })
}

impl Vmm {
    /// `migrate-vmm run` in `dir`; panics if it does not become ready.
    pub fn run(dir: &Path, name: &str, o: &RunOpts) -> Vmm {
        let socket = dir.join(format!("{name}.sock"));
        let serial_log = dir.join(format!("{name}.serial.log"));
        let mut cmd = Command::new(VMM_BIN);
        cmd.arg("run")
            .args(["--name", name])
            .arg("--control-socket")
            .arg(&socket)
            .arg("--serial-log")
            .arg(&serial_log)
            .args(["--memory", o.memory])
            .args(["--vcpus", &o.vcpus.to_string()])
            .args(["--wss", o.wss])
            .args(["--dirty-rate", o.dirty_rate])
            .args(["--mode", o.mode])
            .args(["--seed", &o.seed.to_string()]);
        if o.paused {
            cmd.arg("--paused");
        }
        match start(cmd, name, socket, serial_log) {
            Started::Ready(v) => v,
            Started::Failed { status, stderr, .. } => {
                panic!("{name}: migrate-vmm run failed ({status}):\n{stderr}")
            }
        }
    }

    /// `migrate-vmm restore` with `memfd` inherited as a non-CLOEXEC fd and
    /// either `--state FILE` or `--wait-state`.
    pub fn restore(dir: &Path, name: &str, memfd: &OwnedFd, state: Option<&Path>) -> Started {
        let socket = dir.join(format!("{name}.sock"));
        let serial_log = dir.join(format!("{name}.serial.log"));
        // dup() gives a descriptor without FD_CLOEXEC, which the child
        // inherits under the same number; ours is closed after the spawn.
        let inheritable = nix::unistd::dup(memfd.as_fd()).expect("dup memfd");
        let mut cmd = Command::new(VMM_BIN);
        cmd.arg("restore")
            .args(["--name", name])
            .arg("--control-socket")
            .arg(&socket)
            .arg("--serial-log")
            .arg(&serial_log)
            .args(["--memfd-fd", &inheritable.as_raw_fd().to_string()]);
        match state {
            Some(p) => {
                cmd.arg("--state").arg(p);
            }
            None => {
                cmd.arg("--wait-state");
            }
        }
        let started = start(cmd, name, socket, serial_log);
        drop(inheritable);
        started
    }

    pub fn client(&self) -> ControlClient {
        ControlClient::connect_with_timeout(&self.socket, CALL_TIMEOUT)
            .expect("connect control socket")
    }

    pub fn status(&self) -> VmStatus {
        self.client().status().expect("status")
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(&self.serial_log).unwrap_or_default()
    }

    /// Sends Shutdown and waits for the process to exit; returns its status.
    pub fn shutdown(mut self) -> ExitStatus {
        self.client().shutdown().expect("shutdown request");
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Some(st) = self.child.try_wait().expect("try_wait") {
                return st;
            }
            assert!(
                Instant::now() < deadline,
                "{}: did not exit within 30 s of Shutdown",
                self.name
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stdout lines printed after READY (there should be none without --watch).
    pub fn extra_stdout(&mut self) -> Vec<String> {
        self.stdout_rest
            .as_ref()
            .map(|rx| rx.try_iter().collect())
            .unwrap_or_default()
    }
}

impl Drop for Vmm {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls Status until `done` holds, failing after `timeout`. Polling the
/// guest's own counters is the synchronisation; the short pause between
/// polls only keeps the poll from spinning a core.
pub fn wait_for(
    vmm: &Vmm,
    what: &str,
    timeout: Duration,
    done: impl Fn(&VmStatus) -> bool,
) -> VmStatus {
    let mut c = vmm.client();
    let deadline = Instant::now() + timeout;
    loop {
        let s = c.status().expect("status");
        if let RunState::Crashed { reason } = &s.run_state {
            panic!(
                "{}: guest crashed while waiting for {what}: {reason}",
                vmm.name
            );
        }
        if done(&s) {
            return s;
        }
        assert!(
            Instant::now() < deadline,
            "{}: timed out after {timeout:?} waiting for {what}; last status: {s:?}",
            vmm.name
        );
        std::thread::sleep(Duration::from_millis(25));
    }
}

/// Every vCPU has completed at least `n` passes.
pub fn all_passes_at_least(s: &VmStatus, n: u64) -> bool {
    s.counters.len() == s.vcpus as usize && s.counters.iter().all(|c| c.passes >= n)
}

pub fn total_corrupt(s: &VmStatus) -> u64 {
    s.counters.iter().map(|c| c.corrupt).sum()
}

/// A per-test scratch directory (sockets, serial logs, state files).
pub fn scratch() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("vmm-it-")
        .tempdir()
        .expect("tempdir")
}
