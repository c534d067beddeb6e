//! Everything needed to resume a guest in another VMM process: the memory
//! layout, every vCPU's KVM state, the VM-wide KVM state (irqchip, PIT,
//! clock), the serial device and the workload's guest layout.
//!
//! The state travels as one self-checking blob (it is written to files and
//! sent to the peer host), so reading it is defensive:
//!
//! ```text
//! offset  size  field
//! 0       8     magic "MIGVMST\0"
//! 8       4     format version, u32 LE (FORMAT_VERSION)
//! 12      8     body length, u64 LE (<= MAX_BYTES - HEADER_LEN)
//! 20      4     crc32 of the body, u32 LE
//! 24      n     body = postcard(VmState)
//! ```
//!
//! [`VmState::from_bytes`] checks the size cap, magic, version, length and
//! CRC, in that order, before the body reaches the deserialiser, so each kind
//! of damage gets its own [`DecodeStateError`] variant. Guest RAM is not part
//! of the blob: it stays in the memfd.

/// `From<&Theirs> for Ours` and back, field by field, for our serde
/// mirrors of state types that have no serde (kvm-bindings', vm-superio's):
/// one field list, so the two directions cannot drift apart. Fields are
/// cloned (a `Vec` among them is fine); `..rest` fills the foreign type's
/// fields we do not keep (kernel padding).
macro_rules! mirror_fields {
    ($ours:ty, $theirs:ty { $($field:ident),+ $(,)? } $(..$rest:expr)?) => {
        impl From<&$theirs> for $ours {
            fn from(s: &$theirs) -> Self {
                Self {
                    $($field: Clone::clone(&s.$field),)+
                }
            }
        }

        impl From<&$ours> for $theirs {
            fn from(s: &$ours) -> Self {
                Self {
                    $($field: Clone::clone(&s.$field),)+
                    $(..$rest)?
                }
            }
        }
    };
}

mod kvm;

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use guestmem::{LayoutError, MemoryLayout};
use serde::{Deserialize, Serialize};

pub use kvm::{
    restore_vcpu, restore_vm, save_vcpu, save_vm, Fpu, MsrEntry, RestoreVcpuError, RestoreVmError,
    SaveVcpuError, SaveVmError, VcpuState, VmWideState,
};

/// First eight bytes of every state blob.
pub const MAGIC: [u8; 8] = *b"MIGVMST\0";
/// Version of the blob layout and of the postcard body schema. Bump it on any
/// change to the types below: postcard is not self-describing, so an old
/// reader must refuse a new body rather than misread it.
pub const FORMAT_VERSION: u32 = 1;
/// Bytes before the body: magic, version, body length, crc.
pub const HEADER_LEN: usize = 8 + 4 + 8 + 4;

/// The state of a whole guest apart from its RAM.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct VmState {
    /// Where guest RAM lives; the restoring VMM checks its memfd against it.
    pub layout: MemoryLayout,
    /// One entry per vCPU, index = vCPU id.
    pub vcpus: Vec<VcpuState>,
    pub vm: VmWideState,
    pub serial: SerialState,
    /// Where the built-in workload keeps its code, counters and working set;
    /// `None` for other guests.
    pub workload: Option<crate::workload::GuestLayout>,
}

/// The 16550 UART's registers, mirroring `vm_superio::SerialState` so the
/// blob does not depend on vm-superio's (non-serde) type.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    /// Bytes received but not yet read by the guest.
    pub in_buffer: Vec<u8>,
}

mirror_fields!(
    SerialState,
    vm_superio::serial::SerialState {
        baud_divisor_low,
        baud_divisor_high,
        interrupt_enable,
        interrupt_identification,
        line_control,
        line_status,
        modem_control,
        modem_status,
        scratch,
        in_buffer,
    }
);

impl From<vm_superio::serial::SerialState> for SerialState {
    fn from(s: vm_superio::serial::SerialState) -> Self {
        Self::from(&s)
    }
}

impl From<SerialState> for vm_superio::serial::SerialState {
    fn from(s: SerialState) -> Self {
        Self::from(&s)
    }
}

/// Why a state blob was refused. Every variant is a distinct kind of damage
/// so callers (and tests) can tell a truncated transfer from a version skew.
#[derive(Debug, thiserror::Error)]
pub enum DecodeStateError {
    #[error("state blob is {len} bytes, more than the {max} byte cap")]
    TooLarge { len: u64, max: u64 },
    #[error("state blob is truncated: {len} bytes, need {needed}")]
    Truncated { len: u64, needed: u64 },
    #[error("not a state blob (bad magic)")]
    BadMagic,
    #[error("unsupported state format version {found} (this build reads {supported})")]
    UnsupportedVersion { found: u32, supported: u32 },
    #[error("state blob has {extra} bytes after the declared body")]
    TrailingBytes { extra: u64 },
    #[error("state blob checksum mismatch: header says {expected:#010x}, body has {actual:#010x}")]
    ChecksumMismatch { expected: u32, actual: u32 },
    #[error("state body does not decode")]
    Malformed(#[source] postcard::Error),
    #[error("state body has an invalid memory layout")]
    InvalidLayout(#[source] LayoutError),
    #[error("state has no vcpus")]
    NoVcpus,
}

/// Reading a state file failed.
#[derive(Debug, thiserror::Error)]
pub enum ReadStateError {
    #[error("cannot read state file {path}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("state file {path} is invalid")]
    Decode {
        path: PathBuf,
        #[source]
        source: DecodeStateError,
    },
}

/// Writing a state file failed.
#[derive(Debug, thiserror::Error)]
#[error("cannot write state file {path}")]
pub struct WriteStateError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

impl VmState {
    /// Cap on a whole blob, header included. A real state is tens of KiB per
    /// vCPU; the cap bounds what a reader allocates for a hostile input.
    pub const MAX_BYTES: usize = 16 * 1024 * 1024;

    /// Encodes the blob (header + postcard body).
    pub fn to_bytes(&self) -> Vec<u8> {
        // Serialising plain owned data into a Vec has no failure mode in
        // postcard (no I/O, no unknown-length sequences, no map keys).
        let body = postcard::to_allocvec(self).expect("postcard encoding of VmState");
        let mut out = Vec::with_capacity(HEADER_LEN + body.len());
        out.extend_from_slice(&MAGIC);
        out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
        out.extend_from_slice(&(body.len() as u64).to_le_bytes());
        out.extend_from_slice(&crc32fast::hash(&body).to_le_bytes());
        out.extend_from_slice(&body);
        out
    }

    /// Decodes and validates a blob. Never panics, whatever the bytes.
    pub fn from_bytes(b: &[u8]) -> Result<VmState, DecodeStateError> {
        let len = b.len() as u64;
        if b.len() > Self::MAX_BYTES {
            return Err(DecodeStateError::TooLarge {
                len,
                max: Self::MAX_BYTES as u64,
            });
        }
        // Check the magic on whatever prefix we have so that a short
        // non-blob file is reported as "not a state blob", not "truncated".
        let magic_len = b.len().min(MAGIC.len());
        if b[..magic_len] != MAGIC[..magic_len] {
            return Err(DecodeStateError::BadMagic);
        }
        let Some(header) = b.get(..HEADER_LEN) else {
            return Err(DecodeStateError::Truncated {
                len,
                needed: HEADER_LEN as u64,
            });
        };
        let version = u32::from_le_bytes(header[8..12].try_into().expect("4 bytes"));
        if version != FORMAT_VERSION {
            return Err(DecodeStateError::UnsupportedVersion {
                found: version,
                supported: FORMAT_VERSION,
            });
        }
        let body_len = u64::from_le_bytes(header[12..20].try_into().expect("8 bytes"));
        let expected_crc = u32::from_le_bytes(header[20..24].try_into().expect("4 bytes"));
        let max_body = (Self::MAX_BYTES - HEADER_LEN) as u64;
        if body_len > max_body {
            return Err(DecodeStateError::TooLarge {
                len: body_len.saturating_add(HEADER_LEN as u64),
                max: Self::MAX_BYTES as u64,
            });
        }
        let body = &b[HEADER_LEN..];
        let have = body.len() as u64;
        if have < body_len {
            return Err(DecodeStateError::Truncated {
                len,
                needed: HEADER_LEN as u64 + body_len,
            });
        }
        if have > body_len {
            return Err(DecodeStateError::TrailingBytes {
                extra: have - body_len,
            });
        }
        let actual_crc = crc32fast::hash(body);
        if actual_crc != expected_crc {
            return Err(DecodeStateError::ChecksumMismatch {
                expected: expected_crc,
                actual: actual_crc,
            });
        }
        let state: VmState = postcard::from_bytes(body).map_err(DecodeStateError::Malformed)?;
        // Deserialize bypasses MemoryLayout's constructor checks; run them.
        MemoryLayout::from_regions(state.layout.regions().to_vec())
            .map_err(DecodeStateError::InvalidLayout)?;
        if state.vcpus.is_empty() {
            return Err(DecodeStateError::NoVcpus);
        }
        Ok(state)
    }

    /// Reads and validates a state file, never reading more than the cap.
    pub fn read_from(path: impl AsRef<Path>) -> Result<VmState, ReadStateError> {
        let path = path.as_ref();
        let io_err = |source| ReadStateError::Io {
            path: path.to_owned(),
            source,
        };
        let file = File::open(path).map_err(io_err)?;
        let mut bytes = Vec::new();
        // One byte past the cap is enough to report TooLarge.
        file.take(Self::MAX_BYTES as u64 + 1)
            .read_to_end(&mut bytes)
            .map_err(io_err)?;
        Self::from_bytes(&bytes).map_err(|source| ReadStateError::Decode {
            path: path.to_owned(),
            source,
        })
    }

    /// Writes the blob to `path` through a temporary file and a rename, so
    /// a reader never sees a half-written state.
    pub fn write_to(&self, path: impl AsRef<Path>) -> Result<(), WriteStateError> {
        write_blob(path.as_ref(), &self.to_bytes())
    }
}

/// Writes an already encoded blob (e.g. one received from a VMM's control
/// socket) atomically to `path`.
pub fn write_blob(path: &Path, blob: &[u8]) -> Result<(), WriteStateError> {
    let err = |source| WriteStateError {
        path: path.to_owned(),
        source,
    };
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    let mut f = File::create(&tmp).map_err(err)?;
    f.write_all(blob).map_err(err)?;
    f.sync_all().map_err(err)?;
    std::fs::rename(&tmp, path).map_err(err)
}

#[cfg(test)]
mod tests;
