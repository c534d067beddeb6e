//! The spec of a QEMU guest: what a user writes (YAML or JSON, camelCase
//! like the rest of the API) and `validate()`, whose errors name the field
//! (`disks[1].path: must be an absolute path`).
//!
//! The spec is the only input to QEMU's command line (see `args`), so
//! everything QEMU parses with its own option syntax (machine type, CPU
//! model, bridge name) is held to a character set that cannot smuggle in
//! another option; paths go to QEMU inside JSON. Checks that need the
//! filesystem (does the image exist, is it writable) are in `args`, run
//! right before QEMU starts.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{de, Deserialize, Deserializer, Serialize, Serializer};

use crate::model::Quantity;

pub const DEFAULT_MACHINE: &str = "q35";
pub const DEFAULT_CPU_MODEL: &str = "host";
pub const MIN_MEMORY: Quantity = Quantity::mib(16);
/// Beyond 255 vCPUs q35 needs x2APIC with interrupt remapping.
pub const MAX_VCPUS: u32 = 255;
pub const MAX_DISKS: usize = 16;
/// q35's built-in AHCI controller has six ports.
pub const MAX_IDE_DISKS: usize = 6;
pub const MAX_NICS: usize = 8;
/// Longest kernel command line accepted (x86 kernels take 2048 by default).
pub const MAX_CMDLINE: usize = 4096;
/// Linux interface names are at most 15 bytes.
pub const MAX_IFNAME: usize = 15;
const MAX_NAME: usize = 63;
const MAX_IDENT: usize = 64;

/// A QEMU guest as the user describes it.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct QemuVmSpec {
    /// DNS label; also QEMU's `-name`.
    pub name: String,
    /// A q35 machine type: `q35` (this QEMU's newest) or a versioned one
    /// such as `pc-q35-7.2`.
    #[serde(default = "default_machine")]
    pub machine: String,
    #[serde(default)]
    pub cpu: CpuSpec,
    pub memory: Quantity,
    #[serde(default = "default_vcpus")]
    pub vcpus: u32,
    #[serde(default)]
    pub boot: BootSpec,
    #[serde(default)]
    pub disks: Vec<DiskSpec>,
    /// None at all is valid: a guest without network needs no root setup.
    #[serde(default)]
    pub nics: Vec<NicSpec>,
}

fn default_machine() -> String {
    DEFAULT_MACHINE.into()
}

fn default_vcpus() -> u32 {
    1
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct CpuSpec {
    /// `host` (everything this host has; migrate only between identical
    /// hosts) or a named QEMU model such as `Skylake-Server-v4`.
    #[serde(default = "default_cpu_model")]
    pub model: String,
}

fn default_cpu_model() -> String {
    DEFAULT_CPU_MODEL.into()
}

impl Default for CpuSpec {
    fn default() -> Self {
        Self {
            model: default_cpu_model(),
        }
    }
}

/// Direct kernel boot when `kernel` is set, else boot from `disks[0]`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct BootSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<PathBuf>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub initrd: Option<PathBuf>,
    /// The guest kernel's command line (QEMU passes it through untouched).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmdline: Option<String>,
}

/// How a validated spec boots.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum BootMode<'a> {
    Kernel {
        kernel: &'a Path,
        initrd: Option<&'a Path>,
        cmdline: Option<&'a str>,
    },
    FirstDisk,
}

impl BootSpec {
    pub fn mode(&self) -> BootMode<'_> {
        match &self.kernel {
            Some(kernel) => BootMode::Kernel {
                kernel,
                initrd: self.initrd.as_deref(),
                cmdline: self.cmdline.as_deref(),
            },
            None => BootMode::FirstDisk,
        }
    }
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskFormat {
    #[default]
    Raw,
    Qcow2,
}

impl DiskFormat {
    /// QEMU's block driver name.
    pub fn driver(self) -> &'static str {
        match self {
            DiskFormat::Raw => "raw",
            DiskFormat::Qcow2 => "qcow2",
        }
    }
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DiskBus {
    #[default]
    Virtio,
    /// On q35's AHCI controller (for guests without virtio drivers).
    Ide,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct DiskSpec {
    /// An image file or a block device, absolute.
    pub path: PathBuf,
    #[serde(default)]
    pub format: DiskFormat,
    #[serde(default)]
    pub bus: DiskBus,
    /// Reachable under the same path from the migration target (NFS, a
    /// SAN LUN...): then a migration leaves it alone. A non-shared disk
    /// must be copied (NBD + mirror) for the guest to move.
    #[serde(default)]
    pub shared: bool,
    #[serde(default)]
    pub read_only: bool,
}

#[derive(Copy, Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NicModel {
    #[default]
    Virtio,
    E1000e,
}

impl NicModel {
    /// QEMU's device name.
    pub fn device(self) -> &'static str {
        match self {
            NicModel::Virtio => "virtio-net-pci",
            NicModel::E1000e => "e1000e",
        }
    }
}

/// A NIC on a tap device attached to a host bridge.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
pub struct NicSpec {
    /// An existing Linux bridge on every host the guest may run on.
    pub bridge: String,
    /// Left out: derived from the VM name and the NIC's index, so it is
    /// the same on every host (a guest keeps its MAC across migrations).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mac: Option<MacAddress>,
    #[serde(default)]
    pub model: NicModel,
}

impl NicSpec {
    /// The MAC the guest sees on NIC `index` of VM `vm_name`.
    pub fn effective_mac(&self, vm_name: &str, index: usize) -> MacAddress {
        self.mac
            .unwrap_or_else(|| MacAddress::derived(vm_name, index))
    }
}

/// An Ethernet address, written `52:54:00:12:34:56`.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Hash)]
pub struct MacAddress(pub [u8; 6]);

impl MacAddress {
    /// QEMU/KVM's locally administered prefix plus 24 bits of a hash of
    /// the VM name and NIC index: stable, and distinct for distinct guests
    /// unless the hash collides (then set `mac` explicitly).
    pub fn derived(vm_name: &str, index: usize) -> Self {
        let h = xxhash_rust::xxh3::xxh3_64(format!("{vm_name}/{index}").as_bytes());
        let b = h.to_le_bytes();
        Self([0x52, 0x54, 0x00, b[0], b[1], b[2]])
    }

    /// Group (multicast/broadcast) addresses cannot be a NIC's own.
    pub fn is_unicast(self) -> bool {
        self.0[0] & 1 == 0
    }
}

impl fmt::Display for MacAddress {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0;
        write!(
            f,
            "{:02x}:{:02x}:{:02x}:{:02x}:{:02x}:{:02x}",
            b[0], b[1], b[2], b[3], b[4], b[5]
        )
    }
}

/// Text that is not `xx:xx:xx:xx:xx:xx`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{input:?} is not a MAC address (use e.g. 52:54:00:12:34:56)")]
pub struct ParseMacError {
    pub input: String,
}

impl FromStr for MacAddress {
    type Err = ParseMacError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let bad = || ParseMacError { input: s.into() };
        let mut out = [0u8; 6];
        let mut parts = s.split(':');
        for byte in &mut out {
            let p = parts.next().ok_or_else(bad)?;
            if p.len() != 2 || !p.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(bad());
            }
            *byte = u8::from_str_radix(p, 16).map_err(|_| bad())?;
        }
        if parts.next().is_some() {
            return Err(bad());
        }
        Ok(Self(out))
    }
}

impl Serialize for MacAddress {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for MacAddress {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// A spec that cannot run, and where.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub struct InvalidQemuSpec {
    /// The field's path in the spec: `memory`, `disks[1].path`, ...
    pub field: String,
    pub problem: SpecProblem,
}

/// What is wrong with a field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpecProblem {
    #[error("must be 1-63 lower-case letters, digits and '-', starting and ending with a letter or digit")]
    NotDnsLabel,
    #[error("must be 1-{MAX_IDENT} letters, digits, '.', '_' or '-'")]
    NotIdentifier,
    #[error("only q35 machine types are supported (q35 or pc-q35-<version>)")]
    NotQ35,
    #[error("{memory} is below the minimum of {min}")]
    MemoryTooSmall { memory: Quantity, min: Quantity },
    #[error("{memory} is not a whole number of MiB")]
    MemoryNotMib { memory: Quantity },
    #[error("{vcpus} is out of range 1..={max}")]
    Vcpus { vcpus: u32, max: u32 },
    #[error("must be an absolute path")]
    NotAbsolute,
    #[error("must be valid UTF-8")]
    NotUtf8,
    #[error("must not contain control characters")]
    ControlCharacters,
    #[error("is longer than {max} bytes")]
    TooLong { max: usize },
    #[error("needs boot.kernel")]
    NeedsKernel,
    #[error("no kernel and no disk to boot from")]
    NothingToBoot,
    #[error("more than {max} entries")]
    TooMany { max: usize },
    #[error("the same image as {other}")]
    SameImage { other: String },
    #[error("must be 1-{MAX_IFNAME} letters, digits, '.', '_' or '-'")]
    NotInterfaceName,
    #[error("{mac} is a group address, not a NIC's own")]
    MacNotUnicast { mac: MacAddress },
    #[error("{mac} is used by {other} too")]
    MacInUse { mac: MacAddress, other: String },
    // Found when the command line is built (see `args`).
    #[error("{path} is not accessible ({kind})")]
    Inaccessible {
        path: PathBuf,
        kind: std::io::ErrorKind,
    },
    #[error("{path} is neither a regular file nor a block device")]
    NotFileOrBlockDevice { path: PathBuf },
    #[error("{path} is not a regular file")]
    NotRegularFile { path: PathBuf },
    #[error("{path} is not {access}")]
    Access { path: PathBuf, access: &'static str },
    #[error("no bridge {bridge} on this host")]
    NoSuchBridge { bridge: String },
}

impl InvalidQemuSpec {
    pub fn new(field: impl Into<String>, problem: SpecProblem) -> Self {
        Self {
            field: field.into(),
            problem,
        }
    }
}

fn fail<T>(field: impl Into<String>, problem: SpecProblem) -> Result<T, InvalidQemuSpec> {
    Err(InvalidQemuSpec::new(field, problem))
}

fn is_dns_label(s: &str) -> bool {
    let ok = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-';
    !s.is_empty()
        && s.len() <= MAX_NAME
        && s.chars().all(ok)
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// Names QEMU parses in its `key=value,...` syntax: no ',' or '='.
fn is_identifier(s: &str, max: usize) -> bool {
    !s.is_empty()
        && s.len() <= max
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

/// Absolute, UTF-8 (it travels in JSON), no control characters.
fn check_path(field: &str, path: &Path) -> Result<(), InvalidQemuSpec> {
    let Some(text) = path.to_str() else {
        return fail(field, SpecProblem::NotUtf8);
    };
    if !path.is_absolute() {
        return fail(field, SpecProblem::NotAbsolute);
    }
    if text.chars().any(char::is_control) {
        return fail(field, SpecProblem::ControlCharacters);
    }
    Ok(())
}

impl QemuVmSpec {
    /// Checks everything that needs no filesystem access; the first
    /// problem found is returned.
    pub fn validate(&self) -> Result<(), InvalidQemuSpec> {
        if !is_dns_label(&self.name) {
            return fail("name", SpecProblem::NotDnsLabel);
        }
        if !is_identifier(&self.machine, MAX_IDENT) {
            return fail("machine", SpecProblem::NotIdentifier);
        }
        if self.machine != "q35" && !self.machine.starts_with("pc-q35-") {
            return fail("machine", SpecProblem::NotQ35);
        }
        if !is_identifier(&self.cpu.model, MAX_IDENT) {
            return fail("cpu.model", SpecProblem::NotIdentifier);
        }
        if self.memory < MIN_MEMORY {
            return fail(
                "memory",
                SpecProblem::MemoryTooSmall {
                    memory: self.memory,
                    min: MIN_MEMORY,
                },
            );
        }
        if !self.memory.bytes().is_multiple_of(1 << 20) {
            return fail(
                "memory",
                SpecProblem::MemoryNotMib {
                    memory: self.memory,
                },
            );
        }
        if self.vcpus == 0 || self.vcpus > MAX_VCPUS {
            return fail(
                "vcpus",
                SpecProblem::Vcpus {
                    vcpus: self.vcpus,
                    max: MAX_VCPUS,
                },
            );
        }
        self.validate_boot()?;
        self.validate_disks()?;
        self.validate_nics()
    }

    fn validate_boot(&self) -> Result<(), InvalidQemuSpec> {
        let boot = &self.boot;
        match &boot.kernel {
            Some(kernel) => check_path("boot.kernel", kernel)?,
            None if boot.initrd.is_some() => return fail("boot.initrd", SpecProblem::NeedsKernel),
            None if boot.cmdline.is_some() => {
                return fail("boot.cmdline", SpecProblem::NeedsKernel)
            }
            None if self.disks.is_empty() => return fail("boot", SpecProblem::NothingToBoot),
            None => {}
        }
        if let Some(initrd) = &boot.initrd {
            check_path("boot.initrd", initrd)?;
        }
        if let Some(cmdline) = &boot.cmdline {
            if cmdline.len() > MAX_CMDLINE {
                return fail("boot.cmdline", SpecProblem::TooLong { max: MAX_CMDLINE });
            }
            if cmdline.chars().any(char::is_control) {
                return fail("boot.cmdline", SpecProblem::ControlCharacters);
            }
        }
        Ok(())
    }

    fn validate_disks(&self) -> Result<(), InvalidQemuSpec> {
        if self.disks.len() > MAX_DISKS {
            return fail("disks", SpecProblem::TooMany { max: MAX_DISKS });
        }
        let ide = self.disks.iter().filter(|d| d.bus == DiskBus::Ide).count();
        if ide > MAX_IDE_DISKS {
            return fail("disks", SpecProblem::TooMany { max: MAX_IDE_DISKS });
        }
        for (i, disk) in self.disks.iter().enumerate() {
            let field = format!("disks[{i}].path");
            check_path(&field, &disk.path)?;
            // Two nodes on one image corrupt it (QEMU's locking would
            // refuse it too, later and less clearly).
            if let Some(j) = self.disks[..i].iter().position(|d| d.path == disk.path) {
                return fail(
                    field,
                    SpecProblem::SameImage {
                        other: format!("disks[{j}].path"),
                    },
                );
            }
        }
        Ok(())
    }

    fn validate_nics(&self) -> Result<(), InvalidQemuSpec> {
        if self.nics.len() > MAX_NICS {
            return fail("nics", SpecProblem::TooMany { max: MAX_NICS });
        }
        let mut macs: Vec<MacAddress> = Vec::with_capacity(self.nics.len());
        for (i, nic) in self.nics.iter().enumerate() {
            if !is_identifier(&nic.bridge, MAX_IFNAME) {
                return fail(format!("nics[{i}].bridge"), SpecProblem::NotInterfaceName);
            }
            let mac = nic.effective_mac(&self.name, i);
            if !mac.is_unicast() {
                return fail(format!("nics[{i}].mac"), SpecProblem::MacNotUnicast { mac });
            }
            if let Some(j) = macs.iter().position(|m| *m == mac) {
                return fail(
                    format!("nics[{i}].mac"),
                    SpecProblem::MacInUse {
                        mac,
                        other: format!("nics[{j}]"),
                    },
                );
            }
            macs.push(mac);
        }
        Ok(())
    }
}

/// Why a guest cannot be live-migrated now (KubeVirt's `LiveMigratable`
/// condition reasons).
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum NotMigratableReason {
    /// A non-shared disk and no way to copy it (block migration over NBD
    /// not possible with this peer or configuration).
    DisksNotLiveMigratable,
    /// QEMU itself refuses (`query-migrate`'s `blocked-reasons`: a device
    /// without migration support). The spec has no passthrough devices; a
    /// `HostDeviceNotMigratable` reason belongs here once it has (a VFIO
    /// device whose driver cannot migrate makes QEMU add such a blocker).
    MigrationBlocked,
}

/// One reason with its human-readable detail.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotMigratable {
    pub reason: NotMigratableReason,
    pub message: String,
}

/// Everything that keeps this guest from moving; empty means it can.
/// `block_migration`: non-shared disks can be copied to the target.
/// `qemu_blocked_reasons`: what the running QEMU reports.
pub fn live_migration_blockers(
    spec: &QemuVmSpec,
    block_migration: bool,
    qemu_blocked_reasons: &[String],
) -> Vec<NotMigratable> {
    let mut out = Vec::new();
    let local: Vec<String> = spec
        .disks
        .iter()
        .enumerate()
        .filter(|(_, d)| !d.shared)
        .map(|(i, d)| format!("disks[{i}] ({})", d.path.display()))
        .collect();
    if !local.is_empty() && !block_migration {
        out.push(NotMigratable {
            reason: NotMigratableReason::DisksNotLiveMigratable,
            message: format!(
                "not shared and block migration is not available: {}",
                local.join(", ")
            ),
        });
    }
    out.extend(qemu_blocked_reasons.iter().map(|r| NotMigratable {
        reason: NotMigratableReason::MigrationBlocked,
        message: r.clone(),
    }));
    out
}

#[cfg(test)]
mod tests;
