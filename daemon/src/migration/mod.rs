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
use std::time::Duration;

use transport::driver::DriverError;
use vmm::control::{CallError, ControlClient};

pub use engine::{LiveMigrationEngine, MigrationEngine};
pub use table::{MigrationHandle, MigrationTable, UpdateMigrationError};

/// What the target's abort message starts with when verification found
/// the memory digests different.
// TODO(i14-lower): goes once the target sends `ReasonCode::DigestMismatch`.
pub(crate) const DIGEST_MISMATCH: &str = "memory digest mismatch";

/// How long one VMM control call may block.
// TODO(i14-lower): `vmm::control::VMM_CALL_TIMEOUT` and its
// connect-with-timeout replace this and `connect_vmm`.
const VMM_CALL_TIMEOUT: Duration = Duration::from_secs(30);

/// A control connection to the VMM at `socket` whose calls time out.
fn connect_vmm(socket: &Path) -> Result<ControlClient, CallError> {
    let client = ControlClient::connect(socket)?;
    client.set_timeout(Some(VMM_CALL_TIMEOUT))?;
    Ok(client)
}

/// Errors a new connection can cure: the link, not the peer's will.
// TODO(i14-lower): becomes `DriverError::is_recoverable`.
fn recoverable(e: &DriverError) -> bool {
    matches!(e, DriverError::Transport { .. } | DriverError::StreamsEnded)
}
