//! The gate every QEMU-dependent test goes through, like
//! [`crate::kvm_check`] for KVM: without `qemu-system-x86_64` on the PATH
//! the tests skip (saying so), unless `MIGRATED_REQUIRE_QEMU=1` makes QEMU
//! mandatory, in which case its absence is a failure rather than a silent
//! pass.

use std::ffi::OsStr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

/// The environment variable that makes QEMU mandatory.
pub const REQUIRE_QEMU_ENV: &str = "MIGRATED_REQUIRE_QEMU";
/// The binary the QEMU backend runs.
pub const QEMU_BINARY: &str = "qemu-system-x86_64";

/// What a test should do.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum QemuGate {
    /// Run the test with this binary.
    Run(PathBuf),
    /// QEMU is missing and not required: skip, with this reason.
    Skip(String),
}

/// QEMU is missing but required.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{binary} is not on the PATH and {REQUIRE_QEMU_ENV}=1 requires it")]
pub struct QemuRequired {
    pub binary: String,
}

/// The first executable file called `name` in the directories of `path`
/// (a PATH value).
pub fn find_in_path(name: &str, path: &OsStr) -> Option<PathBuf> {
    std::env::split_paths(path)
        .map(|dir| dir.join(name))
        .find(|p| is_executable(p))
}

fn is_executable(p: &Path) -> bool {
    std::fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
}

/// Decides from a PATH value and the value of `MIGRATED_REQUIRE_QEMU`
/// (both passed in, so the decision is testable).
pub fn check_qemu(
    binary: &str,
    path: Option<&OsStr>,
    require: Option<&str>,
) -> Result<QemuGate, QemuRequired> {
    if let Some(found) = path.and_then(|p| find_in_path(binary, p)) {
        return Ok(QemuGate::Run(found));
    }
    if require.map(str::trim) == Some("1") {
        return Err(QemuRequired {
            binary: binary.to_string(),
        });
    }
    Ok(QemuGate::Skip(format!(
        "skipped: {binary} is not on the PATH"
    )))
}

/// For tests: the QEMU binary if there is one. Prints the skip message and
/// returns None when it is missing and not required; panics (failing the
/// test) when it is required.
pub fn qemu_available_or_skip() -> Option<PathBuf> {
    let path = std::env::var_os("PATH");
    let require = std::env::var(REQUIRE_QEMU_ENV).ok();
    match check_qemu(QEMU_BINARY, path.as_deref(), require.as_deref()) {
        Ok(QemuGate::Run(p)) => Some(p),
        Ok(QemuGate::Skip(msg)) => {
            eprintln!("{msg}");
            None
        }
        Err(e) => panic!("{e}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dir_with(name: &str, mode: u32) -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join(name);
        std::fs::write(&p, b"#!/bin/sh\n").unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
        dir
    }

    #[test]
    fn missing_binary_fails_when_required() {
        let dir = tempfile::tempdir().unwrap();
        let err = check_qemu("qemu-x", Some(dir.path().as_os_str()), Some("1")).unwrap_err();
        assert!(err.to_string().contains("MIGRATED_REQUIRE_QEMU=1"), "{err}");
        assert_eq!(err.binary, "qemu-x");
    }

    #[test]
    fn missing_binary_skips_when_not_required() {
        let dir = dir_with("qemu-x", 0o644);
        for (path, require) in [
            (Some(dir.path().as_os_str()), None),
            (Some(dir.path().as_os_str()), Some("0")),
            (None, Some("")),
        ] {
            match check_qemu("qemu-x", path, require).unwrap() {
                QemuGate::Skip(msg) => assert!(msg.starts_with("skipped: "), "{msg}"),
                QemuGate::Run(p) => panic!("gate ran with {p:?} ({require:?})"),
            }
        }
    }

    #[test]
    fn executable_on_the_path_runs_even_when_required() {
        let empty = tempfile::tempdir().unwrap();
        let dir = dir_with("qemu-x", 0o755);
        let path = std::env::join_paths([empty.path(), dir.path()]).unwrap();
        let want = dir.path().join("qemu-x");
        assert_eq!(
            check_qemu("qemu-x", Some(&path), Some("1")),
            Ok(QemuGate::Run(want.clone()))
        );
        assert_eq!(
            check_qemu("qemu-x", Some(&path), None),
            Ok(QemuGate::Run(want))
        );
    }
}
