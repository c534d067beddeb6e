//! Live migration: the engine that moves guests between hosts and the
//! records it keeps about them.
//!
//! * [`engine`]: the [`MigrationEngine`] seam the service calls and the
//!   real one, [`LiveMigrationEngine`] (pre-copy, auto-converge, post-copy
//!   and resume over QUIC).
//! * [`table`]: every migration record, in memory and on disk, and the
//!   [`MigrationHandle`] through which an engine updates one.
//! * [`outgoing`]: the source side of one migration; [`incoming`]: the
//!   target side, from the endpoint's accept loop.
//! * [`guestio`]: guest RAM as the transport's page source and sink;
//!   [`peers`]: connections to the other daemons.

pub mod engine;
pub mod guestio;
pub mod incoming;
pub mod outgoing;
pub mod peers;
pub mod table;

use std::path::Path;

use vmm::control::{CallError, ControlClient, VMM_CALL_TIMEOUT};

pub use engine::{LiveMigrationEngine, MigrationEngine};
pub use table::{MigrationHandle, MigrationTable, UpdateMigrationError};

/// A control connection to the VMM at `socket` whose calls time out after
/// the VMM crate's [`VMM_CALL_TIMEOUT`].
fn connect_vmm(socket: &Path) -> Result<ControlClient, CallError> {
    ControlClient::connect_with_timeout(socket, VMM_CALL_TIMEOUT)
}
