//! VMs: what a user asks for (`VmSpec`, the workload) and what the daemon
//! reports (`Vm`, its phase, conditions and guest counters).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use super::{check_name, InvalidNameError, Timestamp, MAX_NAME_LEN, MIN_MEMORY};
use crate::quantity::Quantity;

/// How fast the built-in workload dirties its working set. Text form: `0`
/// (idle: it only verifies), a number of MiB/s, or `max`.
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq)]
pub enum DirtyRate {
    #[default]
    Idle,
    MibPerSec(u32),
    Max,
}

impl FromStr for DirtyRate {
    type Err = InvalidDirtyRateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("max") {
            return Ok(DirtyRate::Max);
        }
        match t.parse::<u32>() {
            Ok(0) => Ok(DirtyRate::Idle),
            Ok(n) => Ok(DirtyRate::MibPerSec(n)),
            Err(_) => Err(InvalidDirtyRateError { input: s.into() }),
        }
    }
}

/// A dirty rate that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a dirty rate: use 0 (idle), a number of MiB/s, or max")]
pub struct InvalidDirtyRateError {
    pub input: String,
}

impl fmt::Display for DirtyRate {
    /// The form `migrate-vmm --dirty-rate` accepts.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyRate::Idle => f.write_str("0"),
            DirtyRate::MibPerSec(n) => write!(f, "{n}"),
            DirtyRate::Max => f.write_str("max"),
        }
    }
}

impl Serialize for DirtyRate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for DirtyRate {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl de::Visitor<'_> for V {
            type Value = DirtyRate;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("0, a number of MiB/s, or \"max\"")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<DirtyRate, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<DirtyRate, E> {
                self.visit_str(&v.to_string())
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<DirtyRate, E> {
                v.parse().map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

/// How the workload writes a page: one word (`sparse`) or every byte (`full`).
#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DirtyMode {
    #[default]
    Sparse,
    Full,
}

impl DirtyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            DirtyMode::Sparse => "sparse",
            DirtyMode::Full => "full",
        }
    }
}

/// Parameters of the built-in workload guest.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Working set the workload keeps dirtying and verifying.
    #[serde(default = "WorkloadSpec::default_wss")]
    pub wss: Quantity,
    #[serde(default)]
    pub dirty_rate: DirtyRate,
    #[serde(default)]
    pub mode: DirtyMode,
    #[serde(default = "WorkloadSpec::default_seed")]
    pub seed: u64,
}

impl WorkloadSpec {
    fn default_wss() -> Quantity {
        Quantity::mib(8)
    }

    fn default_seed() -> u64 {
        1
    }
}

impl Default for WorkloadSpec {
    fn default() -> Self {
        Self {
            wss: Self::default_wss(),
            dirty_rate: DirtyRate::Idle,
            mode: DirtyMode::Sparse,
            seed: Self::default_seed(),
        }
    }
}

/// What a user asks for when creating a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct VmSpec {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    pub memory: Quantity,
    #[serde(default = "VmSpec::default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub workload: WorkloadSpec,
}

/// A VM spec that cannot be run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidSpecError {
    #[error(transparent)]
    Name(#[from] InvalidNameError),
    #[error("label key {key:?} is invalid: use 1-63 letters, digits, '-', '_', '.' or '/'")]
    LabelKey { key: String },
    #[error("memory {memory} is below the minimum of {min}")]
    MemoryTooSmall { memory: Quantity, min: Quantity },
    #[error("memory {memory} is not a multiple of 4Ki pages")]
    MemoryNotPageAligned { memory: Quantity },
    #[error("vcpus {vcpus} is out of range 1..={max}")]
    Vcpus { vcpus: u32, max: u32 },
    #[error("workload wss {wss} is larger than memory {memory}")]
    WssTooLarge { wss: Quantity, memory: Quantity },
}

impl VmSpec {
    fn default_vcpus() -> u32 {
        1
    }

    /// Checks what the API itself defines: names, labels and the memory
    /// size. Whether the VMM can run the workload (vCPUs, working set) is
    /// the VMM's to say; the daemon checks that against the VMM's own
    /// limits before it launches anything (`supervisor::check_workload`).
    pub fn validate(&self) -> Result<(), InvalidSpecError> {
        check_name("vm name", &self.name)?;
        let key_ok = |k: &str| {
            !k.is_empty()
                && k.len() <= MAX_NAME_LEN
                && k.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-_./".contains(c))
        };
        if let Some(key) = self.labels.keys().find(|k| !key_ok(k)) {
            return Err(InvalidSpecError::LabelKey { key: key.clone() });
        }
        if self.memory < MIN_MEMORY {
            return Err(InvalidSpecError::MemoryTooSmall {
                memory: self.memory,
                min: MIN_MEMORY,
            });
        }
        if !self.memory.bytes().is_multiple_of(4096) {
            return Err(InvalidSpecError::MemoryNotPageAligned {
                memory: self.memory,
            });
        }
        Ok(())
    }
}

/// Where a VM is in its life.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum VmPhase {
    /// Accepted; its VMM is being started.
    Pending,
    Running,
    /// A migration of this VM is pending or running.
    Migrating,
    /// Stopped on request; can be started again.
    Stopped,
    /// Its VMM failed or disappeared; `status.reason` says why.
    Failed,
}

impl fmt::Display for VmPhase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self, f)
    }
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionType {
    /// Whether the VM can be live-migrated now (KubeVirt's `LiveMigratable`).
    LiveMigratable,
}

#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum ConditionStatus {
    True,
    False,
    Unknown,
}

/// A Kubernetes-style condition.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Condition {
    #[serde(rename = "type")]
    pub kind: ConditionType,
    pub status: ConditionStatus,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub message: String,
}

/// How a VM would move (KubeVirt's `migrationMethod`). Our guests have no
/// disks to copy, so it is always `LiveMigration` (memory only).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum MigrationMethod {
    LiveMigration,
}

/// What the guest's VMM reported on the last probe.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct GuestCounters {
    /// The VMM's own run state (running, paused, crashed ...).
    pub run_state: String,
    /// Workload passes summed over vCPUs.
    pub passes: u64,
    pub pages_written: u64,
    /// Pages the workload found corrupted: anything but 0 is a bug.
    pub corrupt_pages: u64,
    pub throttle_pct: u8,
    pub uptime_ms: u64,
}

/// Observed state of a VM.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmStatus {
    pub phase: VmPhase,
    /// The host running it.
    pub node_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Why the VM is Failed (or Stopped unexpectedly).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    pub conditions: Vec<Condition>,
    pub migration_method: MigrationMethod,
    /// The pending or running migration of this VM, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub active_migration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub guest: Option<GuestCounters>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<Timestamp>,
}

impl VmStatus {
    /// The LiveMigratable condition, if reported.
    pub fn live_migratable(&self) -> Option<&Condition> {
        self.conditions
            .iter()
            .find(|c| c.kind == ConditionType::LiveMigratable)
    }
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Vm {
    pub spec: VmSpec,
    pub status: VmStatus,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> VmSpec {
        VmSpec {
            name: "web-1".into(),
            labels: BTreeMap::from([("app".into(), "web".into())]),
            memory: Quantity(1 << 30),
            vcpus: 2,
            workload: WorkloadSpec::default(),
        }
    }

    #[test]
    fn spec_validation() {
        assert_eq!(spec().validate(), Ok(()));
        let mut s = spec();
        s.memory = Quantity(1 << 20);
        assert!(matches!(
            s.validate(),
            Err(InvalidSpecError::MemoryTooSmall { .. })
        ));
        let mut s = spec();
        s.memory = Quantity((64 << 20) + 1);
        assert!(matches!(
            s.validate(),
            Err(InvalidSpecError::MemoryNotPageAligned { .. })
        ));
        let mut s = spec();
        s.labels.insert("bad key".into(), "x".into());
        assert!(matches!(
            s.validate(),
            Err(InvalidSpecError::LabelKey { .. })
        ));
    }

    #[test]
    fn spec_json_is_camel_case_and_strict() {
        let json = r#"{"name":"a","memory":"64Mi","workload":{"dirtyRate":"max","wss":"1Mi"}}"#;
        let s: VmSpec = serde_json::from_str(json).unwrap();
        assert_eq!(s.memory, Quantity(64 << 20));
        assert_eq!(s.vcpus, 1);
        assert_eq!(s.workload.dirty_rate, DirtyRate::Max);
        assert_eq!(s.workload.seed, 1);
        let err =
            serde_json::from_str::<VmSpec>(r#"{"name":"a","memory":"64Mi","cpus":2}"#).unwrap_err();
        assert!(err.to_string().contains("cpus"), "{err}");
    }

    #[test]
    fn dirty_rates() {
        assert_eq!("0".parse(), Ok(DirtyRate::Idle));
        assert_eq!("100".parse(), Ok(DirtyRate::MibPerSec(100)));
        assert_eq!("MAX".parse(), Ok(DirtyRate::Max));
        assert!("fast".parse::<DirtyRate>().is_err());
        assert!("-1".parse::<DirtyRate>().is_err());
        for r in [DirtyRate::Idle, DirtyRate::MibPerSec(7), DirtyRate::Max] {
            assert_eq!(r.to_string().parse(), Ok(r));
        }
        assert_eq!(
            serde_json::from_str::<DirtyRate>("50").unwrap(),
            DirtyRate::MibPerSec(50)
        );
    }
}
