//! The types of the local API, shared by `migrated` and `migratectl`:
//! VMs (`vm`), migrations (`migration`), and what both use (timestamps,
//! names, errors). JSON field names are camelCase and the migration record
//! follows KubeVirt's `VirtualMachineInstanceMigration` status and
//! `migrationState`, so people who know KubeVirt read our output without a
//! glossary. Everything is re-exported here: `model::VmSpec`,
//! `model::MigrationRecord`.

use std::fmt;
use std::time::{Duration, SystemTime};

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

pub use crate::quantity::{HumanDuration, ParseAmountError, Quantity};
pub use migration::*;
pub use vm::*;

mod migration;
mod vm;

/// Longest VM name: a DNS label, so a name is also safe as a path component.
pub const MAX_NAME_LEN: usize = 63;
/// Smallest guest RAM the VMM can lay out.
pub const MIN_MEMORY: Quantity = Quantity::mib(16);

/// A point in time, written as RFC 3339 UTC with milliseconds.
#[derive(Copy, Clone, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct Timestamp(pub SystemTime);

impl Timestamp {
    /// Now, truncated to the milliseconds the text form keeps, so a
    /// timestamp reads back equal to what was written.
    pub fn now() -> Self {
        let since = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self(SystemTime::UNIX_EPOCH + Duration::from_millis(since.as_millis() as u64))
    }

    /// Time from `self` to `later`, zero if `later` is earlier.
    pub fn until(self, later: Timestamp) -> Duration {
        later.0.duration_since(self.0).unwrap_or_default()
    }
}

impl fmt::Display for Timestamp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", humantime::format_rfc3339_millis(self.0))
    }
}

impl Serialize for Timestamp {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Timestamp {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        humantime::parse_rfc3339_weak(&s)
            .map(Timestamp)
            .map_err(|e| de::Error::custom(format!("bad timestamp {s:?}: {e}")))
    }
}

/// A name that is not a DNS label.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what} {name:?} is invalid: use 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit")]
pub struct InvalidNameError {
    pub what: &'static str,
    pub name: String,
}

/// Checks a DNS-label name (RFC 1123), as Kubernetes does for object names.
pub fn check_name(what: &'static str, name: &str) -> Result<(), InvalidNameError> {
    let ok_char = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME_LEN
        && name.chars().all(ok_char)
        && !name.starts_with('-')
        && !name.ends_with('-');
    if ok {
        Ok(())
    } else {
        Err(InvalidNameError {
            what,
            name: name.into(),
        })
    }
}

/// `GET /v1/health`.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Health {
    pub host_name: String,
    pub version: String,
    pub vms: usize,
    pub active_migrations: usize,
}

/// Every API error body: a stable code to branch on, a message for people,
/// and what to do about it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hint: Option<String>,
}

/// Stable API error codes (the `code` of [`ErrorBody`]); a migration's
/// own failure codes are [`FailureCode`].
pub mod codes {
    pub const NOT_FOUND: &str = "not_found";
    pub const ALREADY_EXISTS: &str = "already_exists";
    pub const INVALID_ARGUMENT: &str = "invalid_argument";
    pub const MIGRATION_IN_PROGRESS: &str = "migration_in_progress";
    pub const VM_NOT_RUNNING: &str = "vm_not_running";
    pub const VM_BUSY: &str = "vm_busy";
    pub const UNKNOWN_HOST: &str = "unknown_host";
    pub const INSUFFICIENT_MEMORY: &str = "insufficient_memory";
    pub const VMM_FAILED: &str = "vmm_failed";
    pub const ALREADY_FINISHED: &str = "already_finished";
    /// The request conflicts with the migration's current mode.
    pub const CONFLICT: &str = "conflict";
    pub const INTERNAL: &str = "internal";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names() {
        for ok in ["a", "web-1", "0x", &"a".repeat(63)] {
            assert!(check_name("vm name", ok).is_ok(), "{ok}");
        }
        for bad in ["", "-a", "a-", "A", "a_b", "a/b", "..", &"a".repeat(64)] {
            assert!(check_name("vm name", bad).is_err(), "{bad}");
        }
    }
}
