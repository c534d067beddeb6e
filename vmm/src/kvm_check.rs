//! The gate every KVM-dependent test goes through. On a machine without
//! /dev/kvm the tests skip (saying so), unless `MIGRATED_REQUIRE_KVM=1`
//! says KVM is mandatory here (CI on a KVM host), in which case a missing
//! device is a failure rather than a silent pass.

use std::path::Path;

/// The environment variable that makes KVM mandatory.
pub const REQUIRE_KVM_ENV: &str = "MIGRATED_REQUIRE_KVM";
/// Where KVM normally lives.
pub const KVM_DEVICE: &str = "/dev/kvm";

/// What a test should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum KvmGate {
    /// KVM can be opened: run the test.
    Run,
    /// KVM is missing and not required: skip, with this reason.
    Skip(String),
}

/// KVM is missing but required.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{device} is not usable ({reason}) and {REQUIRE_KVM_ENV}=1 requires it")]
pub struct KvmRequired {
    pub device: String,
    pub reason: String,
}

/// Decides from the device path and the value of `MIGRATED_REQUIRE_KVM`
/// (passed in, so the decision is testable without removing /dev/kvm).
/// "Usable" means it opens read-write, which is what KVM_CREATE_VM needs.
pub fn check_kvm(device: &Path, require: Option<&str>) -> Result<KvmGate, KvmRequired> {
    let reason = match std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(device)
    {
        Ok(_) => return Ok(KvmGate::Run),
        Err(e) => e.to_string(),
    };
    if require.map(str::trim) == Some("1") {
        return Err(KvmRequired {
            device: device.display().to_string(),
            reason,
        });
    }
    Ok(KvmGate::Skip(format!(
        "skipped: {} not available ({reason})",
        device.display()
    )))
}

/// The gate, for every KVM test of the workspace: true if KVM is usable.
/// When it is not, prints the skip message (naming the test, from libtest's
/// thread name) and returns false, or panics (failing the test) under
/// `MIGRATED_REQUIRE_KVM=1`.
pub fn kvm_available_or_skip() -> bool {
    let require = std::env::var(REQUIRE_KVM_ENV).ok();
    match check_kvm(Path::new(KVM_DEVICE), require.as_deref()) {
        Ok(KvmGate::Run) => true,
        Ok(KvmGate::Skip(msg)) => {
            let thread = std::thread::current();
            eprintln!("{}: {msg}", thread.name().unwrap_or("test"));
            false
        }
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_device_fails_when_required() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("kvm");
        let err = check_kvm(&missing, Some("1")).unwrap_err();
        assert!(err.to_string().contains("MIGRATED_REQUIRE_KVM=1"), "{err}");
        assert_eq!(err.device, missing.display().to_string());
    }

    #[test]
    fn missing_device_skips_when_not_required() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("kvm");
        for require in [None, Some("0"), Some("")] {
            match check_kvm(&missing, require).unwrap() {
                KvmGate::Skip(msg) => assert!(msg.starts_with("skipped: "), "{msg}"),
                KvmGate::Run => panic!("gate ran with a missing device ({require:?})"),
            }
        }
    }

    #[test]
    fn openable_device_runs_even_when_required() {
        // Any read-write openable file stands in for the device.
        let file = tempfile::NamedTempFile::new().unwrap();
        assert_eq!(check_kvm(file.path(), Some("1")), Ok(KvmGate::Run));
        assert_eq!(check_kvm(file.path(), None), Ok(KvmGate::Run));
    }
}
