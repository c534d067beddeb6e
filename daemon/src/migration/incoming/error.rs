//! Why an incoming migration failed or was refused, and the reason code
//! the source is told.

use std::path::PathBuf;

use tokio::task::JoinError;
use transport::codec::ReasonCode;
use transport::driver::DriverError;
use transport::session::DestError;
use vmm::control::CallError;

use crate::migration::guestio::{ConvertLayoutError, DecodeEnvelopeError};
use crate::service::ServiceError;
use crate::supervisor::LaunchError;

/// Why an incoming migration failed. Until the guest resumes here, the
/// source keeps (or resumes) its copy and nothing is left behind here.
#[derive(Debug, thiserror::Error)]
pub enum MigrateInError {
    #[error("transfer from the source failed")]
    Transfer(#[source] DriverError),
    #[error("destination session cannot {step}")]
    Session {
        step: &'static str,
        #[source]
        source: DestError,
    },
    #[error("{what}")]
    Protocol { what: &'static str },
    #[error("unexpected {event}")]
    Unexpected { event: String },
    #[error("cannot read /proc/meminfo")]
    MemInfo(#[source] std::io::Error),
    #[error("host memory check failed")]
    HostMemory(#[source] LaunchError),
    #[error("vm {name} already exists on the target")]
    VmExists { name: String },
    #[error("cannot reserve vm {name}")]
    Reserve {
        name: String,
        #[source]
        source: ServiceError,
    },
    #[error("guest layout from the source cannot be used")]
    Layout(#[source] ConvertLayoutError),
    #[error("cannot set up guest memory")]
    Memory(#[source] guestmem::GuestMemoryError),
    #[error("cannot create {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot start the vmm")]
    Spawn(#[source] LaunchError),
    #[error("cannot read the vm state from the source")]
    State(#[source] DecodeEnvelopeError),
    #[error("state names vm {state}, the hello named {hello}")]
    StateNames { state: String, hello: String },
    #[error("memory digest mismatch ({}): source {}, target {}", .scope, .expected, .got)]
    DigestMismatch {
        /// Which pages were compared.
        scope: &'static str,
        expected: String,
        got: String,
    },
    #[error("cannot digest guest memory")]
    Digest(#[source] std::io::Error),
    #[error("vmm {step} failed")]
    Vmm {
        step: &'static str,
        #[source]
        source: CallError,
    },
    #[error("cannot register guest memory for post-copy")]
    Pager(#[source] guestmem::PagerError),
    #[error("cannot poll the userfaultfd")]
    Poll(#[source] std::io::Error),
    #[error("cannot record the arrived vm")]
    Persist(#[source] ServiceError),
    #[error("{what} task failed")]
    Task {
        what: &'static str,
        #[source]
        source: JoinError,
    },
}

impl MigrateInError {
    /// The code the source is told when this side refuses or aborts.
    pub fn reason(&self) -> ReasonCode {
        match self {
            MigrateInError::VmExists { .. } => ReasonCode::VmExists,
            MigrateInError::HostMemory(LaunchError::InsufficientMemory { .. }) => {
                ReasonCode::NotEnoughMemory
            }
            MigrateInError::Reserve { .. } => ReasonCode::Refused,
            MigrateInError::DigestMismatch { .. } => ReasonCode::DigestMismatch,
            _ => ReasonCode::Internal,
        }
    }
}
