//! Helpers shared by the daemon's real-KVM tests: the KVM/VMM gate,
//! starting `migrated`, and process checks.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

/// Fails the test under `MIGRATED_REQUIRE_KVM=1`, else reports a skip.
pub fn skip_or_fail(why: &str) {
    if std::env::var("MIGRATED_REQUIRE_KVM").as_deref() == Ok("1") {
        panic!("MIGRATED_REQUIRE_KVM=1 but {why}");
    }
    eprintln!("SKIPPED: {why}");
}

/// The `migrate-vmm` binary: `MIGRATE_VMM_BIN`, or the one cargo built
/// beside this test (test binaries live in target/<profile>/deps).
pub fn vmm_binary() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("MIGRATE_VMM_BIN") {
        return Some(PathBuf::from(p));
    }
    let exe = std::env::current_exe().ok()?;
    let candidate = exe.parent()?.parent()?.join("migrate-vmm");
    candidate.is_file().then_some(candidate)
}

/// The VMM binary when KVM is usable, else `None` (test skipped, or failed
/// under `MIGRATED_REQUIRE_KVM=1`).
pub fn kvm_and_vmm() -> Option<PathBuf> {
    if !vmm::kvm_check::kvm_available_or_skip() {
        return None;
    }
    let vmm = vmm_binary();
    if vmm.is_none() {
        skip_or_fail("migrate-vmm not built (cargo build -p vmm --bin migrate-vmm)");
    }
    vmm
}

/// Starts `migrated --config config`, forwards its log to stderr with
/// `[tag]` in front, and returns once it logged that it is serving.
pub fn spawn_migrated(config: &Path, tag: &str) -> Child {
    let mut child = Command::new(env!("CARGO_BIN_EXE_migrated"))
        .arg("--config")
        .arg(config)
        .env("RUST_LOG", "info")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start migrated");
    let stderr = child.stderr.take().unwrap();
    let (tx, rx) = mpsc::channel();
    let tag = tag.to_string();
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let Ok(line) = line else { break };
            eprintln!("[{tag}] {line}");
            if line.contains("migrated ready") {
                let _ = tx.send(());
            }
        }
    });
    rx.recv_timeout(Duration::from_secs(60))
        .expect("migrated did not become ready (see its log above)");
    child
}

/// Kills (SIGKILL) the VMMs a test may leave behind when it ends early.
pub struct Reaper(pub Vec<u32>);

impl Drop for Reaper {
    fn drop(&mut self) {
        for pid in &self.0 {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
        }
    }
}

/// Whether process `pid` has exited (a zombie awaiting its reaper counts).
pub fn gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        // The state letter follows the parenthesised command name.
        Ok(stat) => stat
            .rsplit_once(") ")
            .is_some_and(|(_, rest)| rest.starts_with('Z')),
    }
}
