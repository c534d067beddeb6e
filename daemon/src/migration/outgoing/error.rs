//! Why an outgoing migration failed, and the stable code its record keeps.

use std::time::Duration;

use tokio::task::JoinError;
use transport::codec::ReasonCode;
use transport::driver::DriverError;
use transport::session::SourceError;
use vmm::control::CallError;

use crate::migration::guestio::ConvertLayoutError;
use crate::migration::peers::ConnectPeerError;
use crate::migration::UpdateMigrationError;
use crate::model::FailureCode;

/// Why an outgoing migration failed. The guest keeps running here.
#[derive(Debug, thiserror::Error)]
pub enum MigrateOutError {
    #[error("vm {vm} is not on this host")]
    VmGone { vm: String },
    #[error("target unreachable")]
    Connect(#[source] ConnectPeerError),
    #[error("cannot open migration streams to the target")]
    Streams(#[source] transport::endpoint::TransportError),
    #[error("target refused: {code}: {message}")]
    Refused { code: ReasonCode, message: String },
    #[error("target aborted: {code}: {message}")]
    Aborted { code: ReasonCode, message: String },
    #[error("transfer to the target failed")]
    Transfer(#[source] DriverError),
    #[error("vmm {step} failed")]
    Vmm {
        step: &'static str,
        #[source]
        source: CallError,
    },
    #[error("guest layout cannot be sent")]
    Layout(#[source] ConvertLayoutError),
    #[error("cannot read guest memory")]
    Memory(#[source] guestmem::GuestMemoryError),
    #[error("cannot digest guest memory")]
    Digest(#[source] std::io::Error),
    #[error("source session cannot {step}")]
    Session {
        step: &'static str,
        #[source]
        source: SourceError,
    },
    #[error("{what} task failed")]
    Task {
        what: &'static str,
        #[source]
        source: JoinError,
    },
    #[error("cannot record {what}")]
    Record {
        what: &'static str,
        #[source]
        source: UpdateMigrationError,
    },
    #[error("no progress for {timeout:?}: the guest dirties memory faster than it can be sent")]
    ProgressTimeout { timeout: Duration },
    #[error("migration did not complete within {timeout:?}")]
    CompletionTimeout { timeout: Duration },
    #[error("migration was cancelled")]
    Cancelled,
    #[error("memory digests differ between source and target")]
    DigestMismatch,
}

impl MigrateOutError {
    /// Lifts the peer's own refusal or abort out of a driver error, so the
    /// record shows the target's code and message.
    pub(super) fn from_driver(e: DriverError) -> Self {
        match e {
            DriverError::Source(SourceError::Refused { code, message }) => {
                MigrateOutError::Refused { code, message }
            }
            DriverError::Source(SourceError::PeerAborted { code, message }) => {
                if code == ReasonCode::DigestMismatch {
                    MigrateOutError::DigestMismatch
                } else {
                    MigrateOutError::Aborted { code, message }
                }
            }
            e => MigrateOutError::Transfer(e),
        }
    }

    /// The stable code stored in the record.
    pub fn code(&self) -> FailureCode {
        use MigrateOutError::*;
        match self {
            VmGone { .. } => FailureCode::VmNotFound,
            Connect(_) | Streams(_) => FailureCode::TargetUnreachable,
            Refused { code, .. } | Aborted { code, .. } => peer_failure_code(*code),
            Transfer(e) if e.is_peer_lost() => FailureCode::PeerLost,
            Transfer(_) => FailureCode::TransferFailed,
            Vmm { .. } => FailureCode::VmmFailed,
            Layout(_) | Memory(_) | Digest(_) | Session { .. } | Task { .. } | Record { .. } => {
                FailureCode::Internal
            }
            ProgressTimeout { .. } => FailureCode::ProgressTimeout,
            CompletionTimeout { .. } => FailureCode::Timeout,
            Cancelled => FailureCode::Aborted,
            DigestMismatch => FailureCode::DigestMismatch,
        }
    }

    /// The code the target is told when this side aborts.
    pub(super) fn reason(&self) -> ReasonCode {
        match self {
            MigrateOutError::Cancelled => ReasonCode::Cancelled,
            MigrateOutError::ProgressTimeout { .. } => ReasonCode::ProgressTimeout,
            MigrateOutError::CompletionTimeout { .. } => ReasonCode::Timeout,
            _ => ReasonCode::Internal,
        }
    }
}

/// The record's code for a refusal or abort the target sent. A cancel is
/// `aborted` whichever side it came from.
fn peer_failure_code(code: ReasonCode) -> FailureCode {
    match code {
        ReasonCode::Unknown => FailureCode::Unknown,
        ReasonCode::Cancelled => FailureCode::Aborted,
        ReasonCode::Timeout => FailureCode::Timeout,
        ReasonCode::ProgressTimeout => FailureCode::ProgressTimeout,
        ReasonCode::PeerLost => FailureCode::PeerLost,
        ReasonCode::BadFrame => FailureCode::BadFrame,
        ReasonCode::BadCrc => FailureCode::BadCrc,
        ReasonCode::OutOfRange => FailureCode::OutOfRange,
        ReasonCode::VersionMismatch => FailureCode::VersionMismatch,
        ReasonCode::Refused => FailureCode::Refused,
        ReasonCode::NotEnoughMemory => FailureCode::NotEnoughMemory,
        ReasonCode::VmExists => FailureCode::VmExists,
        ReasonCode::Internal => FailureCode::Internal,
        ReasonCode::Protocol => FailureCode::Protocol,
        ReasonCode::Unauthorized => FailureCode::Unauthorized,
        ReasonCode::Incompatible => FailureCode::Incompatible,
        ReasonCode::DigestMismatch => FailureCode::DigestMismatch,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_stable() {
        assert_eq!(MigrateOutError::Cancelled.code(), FailureCode::Aborted);
        let refused = MigrateOutError::Refused {
            code: ReasonCode::VmExists,
            message: "x".into(),
        };
        assert_eq!(refused.code(), FailureCode::VmExists);
        assert!(refused.to_string().contains("vm_exists"));
    }

    #[test]
    fn peer_codes_keep_their_names_but_a_cancel_is_aborted() {
        assert_eq!(
            peer_failure_code(ReasonCode::Cancelled),
            FailureCode::Aborted
        );
        for code in ReasonCode::ALL {
            if code != ReasonCode::Cancelled {
                assert_eq!(peer_failure_code(code).as_str(), code.as_str());
            }
        }
    }

    #[test]
    fn a_targets_digest_mismatch_is_recognised() {
        let aborted = |code, message: &str| {
            MigrateOutError::from_driver(DriverError::Source(SourceError::PeerAborted {
                code,
                message: message.into(),
            }))
        };
        // What the target sends (see `incoming::MigrateInError`).
        let theirs = crate::migration::incoming::MigrateInError::DigestMismatch {
            scope: "whole memory",
            expected: "a".into(),
            got: "b".into(),
        };
        let e = aborted(theirs.reason(), &crate::error_chain(&theirs));
        assert!(matches!(e, MigrateOutError::DigestMismatch), "{e:?}");
        assert_eq!(e.code(), FailureCode::DigestMismatch);
        let e = aborted(ReasonCode::Internal, "vmm restore failed");
        assert_eq!(e.code(), FailureCode::Internal);
    }
}
