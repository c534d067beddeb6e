//! Why an API operation was refused or failed: the stable code the API
//! reports and a hint at what the user can do.

use crate::migration::engine::ResumeError;
use crate::migration::UpdateMigrationError;
use crate::model::{codes, InvalidNameError, InvalidSpecError, MigrationPhase, VmPhase};
use crate::store::{DeleteRecordError, SaveRecordError};
use crate::supervisor::{LaunchError, StopError};

/// Why an API operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("vm {name} not found")]
    VmNotFound { name: String },
    #[error("vm {name} already exists")]
    VmExists { name: String },
    #[error("invalid vm spec")]
    InvalidSpec(#[source] InvalidSpecError),
    #[error(transparent)]
    InvalidName(#[from] InvalidNameError),
    #[error("vm {name} is {phase}, not Running")]
    VmNotRunning { name: String, phase: VmPhase },
    #[error("vm {name} is busy: {operation} in progress")]
    VmBusy {
        name: String,
        operation: &'static str,
    },
    #[error("vm {vm} already has migration {migration} in phase {phase}")]
    MigrationInProgress {
        vm: String,
        migration: String,
        phase: MigrationPhase,
    },
    #[error("unknown target host {host}")]
    UnknownHost { host: String, known: Vec<String> },
    #[error("target host {host} is this host")]
    TargetIsSelf { host: String },
    #[error("migration {name} not found")]
    MigrationNotFound { name: String },
    #[error("migration {name} already finished ({phase})")]
    MigrationFinished { name: String, phase: MigrationPhase },
    #[error("migration {name} is in post-copy: the guest already runs on {target} and its memory is split between both hosts, so it cannot be cancelled")]
    CancelInPostCopy { name: String, target: String },
    #[error("migration {name} cannot be resumed: {why}")]
    NotResumable { name: String, why: String },
    #[error("migration {name} cannot be resumed")]
    ResumeRefused {
        name: String,
        #[source]
        source: ResumeError,
    },
    #[error("migration {name} is already in post-copy")]
    AlreadyPostCopy { name: String },
    #[error("invalid migration option {key}: {message}")]
    InvalidOption { key: &'static str, message: String },
    #[error("cannot start vm {name}")]
    Launch {
        name: String,
        #[source]
        source: LaunchError,
    },
    #[error("cannot stop vm {name}")]
    Stop {
        name: String,
        #[source]
        source: StopError,
    },
    #[error("cannot save state")]
    Persist(#[source] SaveRecordError),
    #[error("cannot delete vm files")]
    Delete(#[source] DeleteRecordError),
    #[error("cannot update migration record")]
    UpdateMigration(#[source] UpdateMigrationError),
}

impl ServiceError {
    /// The stable code the API reports.
    pub fn code(&self) -> &'static str {
        use ServiceError::*;
        match self {
            VmNotFound { .. } | MigrationNotFound { .. } => codes::NOT_FOUND,
            VmExists { .. } => codes::ALREADY_EXISTS,
            InvalidSpec(_) | InvalidName(_) | TargetIsSelf { .. } | InvalidOption { .. } => {
                codes::INVALID_ARGUMENT
            }
            CancelInPostCopy { .. }
            | AlreadyPostCopy { .. }
            | NotResumable { .. }
            | ResumeRefused { .. } => codes::CONFLICT,
            VmNotRunning { .. } => codes::VM_NOT_RUNNING,
            VmBusy { .. } => codes::VM_BUSY,
            MigrationInProgress { .. } => codes::MIGRATION_IN_PROGRESS,
            UnknownHost { .. } => codes::UNKNOWN_HOST,
            MigrationFinished { .. } => codes::ALREADY_FINISHED,
            Launch {
                source: LaunchError::InsufficientMemory { .. },
                ..
            } => codes::INSUFFICIENT_MEMORY,
            Launch { .. } | Stop { .. } => codes::VMM_FAILED,
            Persist(_) | Delete(_) | UpdateMigration(_) => codes::INTERNAL,
        }
    }

    /// What the user can do about it.
    pub fn hint(&self) -> Option<String> {
        use ServiceError::*;
        Some(match self {
            VmNotFound { .. } => "list VMs with `migratectl vm list`".into(),
            MigrationNotFound { .. } => "list migrations with `migratectl get migrations`".into(),
            VmExists { name } => format!("pick another name, or delete it first with `migratectl vm delete {name}`"),
            VmNotRunning { name, .. } => format!("start it with `migratectl vm start {name}`"),
            VmBusy { .. } => "wait for the other operation to finish and retry".into(),
            MigrationInProgress { migration, .. } => format!(
                "only one migration per VM runs at a time; follow it with `migratectl describe migration {migration}`"
            ),
            CancelInPostCopy { name, .. } => format!(
                "wait for it to finish with `migratectl describe migration {name}`; if the link broke, `migratectl migrate --resume {name}` continues it"
            ),
            UnknownHost { known, .. } if known.is_empty() => {
                "no peers are configured: add the target under [peers] in the daemon's config".into()
            }
            UnknownHost { known, .. } => format!("known peers: {}", known.join(", ")),
            Launch {
                source: LaunchError::InsufficientMemory { .. },
                ..
            } => "free memory on this host or ask for less with --memory".into(),
            Launch { .. } => "the message above ends with the VMM's own log; check that /dev/kvm is usable and that vmm_binary in the daemon's config points at migrate-vmm".into(),
            _ => return None,
        })
    }
}
