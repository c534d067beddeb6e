//! Helpers shared by the daemon's real-KVM tests: the KVM/VMM gate and
//! process checks.

use std::path::PathBuf;

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
