//! Stand-ins for the VMM and the migration engine, for tests of the API,
//! the service and `migratectl` that must run without KVM. Behind the
//! `testing` feature, which the tests of this crate and of `migratectl`
//! turn on.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex};

use tracing::warn;

use crate::migration::{MigrationEngine, MigrationHandle};
use crate::model::{FailureCode, GuestCounters, MigrationRecord, Quantity, VmSpec};
use crate::service::Service;
use crate::store::VmPaths;
use crate::supervisor::{
    LaunchError, Probe, ProbeError, StopError, VmBackend, HOST_MEMORY_RESERVE,
};

/// A VMM that lives in a map keyed by control socket path. Each probe
/// advances its pass counter, like a running workload.
#[derive(Debug)]
pub struct FakeBackend {
    guests: Mutex<BTreeMap<PathBuf, u64>>,
    next_pid: AtomicU32,
    /// Memory this fake host has available.
    pub available: Quantity,
}

impl Default for FakeBackend {
    fn default() -> Self {
        Self {
            guests: Mutex::new(BTreeMap::new()),
            next_pid: AtomicU32::new(1000),
            available: Quantity(64 << 30),
        }
    }
}

impl FakeBackend {
    /// A fake host with `available` memory.
    pub fn with_memory(available: Quantity) -> Self {
        Self {
            available,
            ..Self::default()
        }
    }

    fn guests(&self) -> std::sync::MutexGuard<'_, BTreeMap<PathBuf, u64>> {
        self.guests.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes a VMM vanish, as if it had been killed.
    pub fn kill(&self, paths: &VmPaths) -> bool {
        self.guests().remove(&paths.control_socket).is_some()
    }

    /// How many fake VMMs are running.
    pub fn running(&self) -> usize {
        self.guests().len()
    }
}

impl VmBackend for FakeBackend {
    fn launch(&self, spec: &VmSpec, paths: &VmPaths) -> Result<u32, LaunchError> {
        if spec.memory.bytes() + HOST_MEMORY_RESERVE.bytes() > self.available.bytes() {
            return Err(LaunchError::InsufficientMemory {
                needed: spec.memory,
                available: self.available,
                reserve: HOST_MEMORY_RESERVE,
            });
        }
        self.guests().insert(paths.control_socket.clone(), 0);
        Ok(self.next_pid.fetch_add(1, Ordering::Relaxed))
    }

    fn probe(&self, paths: &VmPaths) -> Result<Probe, ProbeError> {
        let mut guests = self.guests();
        let passes = guests
            .get_mut(&paths.control_socket)
            .ok_or_else(|| ProbeError::Gone {
                path: paths.control_socket.clone(),
            })?;
        *passes += 1;
        Ok(Probe {
            healthy: true,
            reason: None,
            counters: GuestCounters {
                run_state: "running".into(),
                passes: *passes,
                pages_written: *passes * 256,
                corrupt_pages: 0,
                throttle_pct: 0,
                uptime_ms: *passes * 1000,
            },
        })
    }

    fn shutdown(&self, paths: &VmPaths) -> Result<(), StopError> {
        self.guests().remove(&paths.control_socket);
        Ok(())
    }
}

/// An engine that takes migrations and leaves them Pending until aborted,
/// so tests can hold a migration "in flight".
#[derive(Debug, Default)]
pub struct HoldingEngine {
    started: Mutex<Vec<String>>,
}

impl HoldingEngine {
    /// Names of the migrations handed to `start`, in order.
    pub fn started(&self) -> Vec<String> {
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }
}

impl MigrationEngine for HoldingEngine {
    fn start(&self, record: MigrationRecord, _handle: MigrationHandle, _service: Arc<Service>) {
        self.started
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .push(record.name);
    }

    fn abort(&self, handle: MigrationHandle) {
        let _ = handle.update(MigrationRecord::settle_abort);
    }

    fn configure(
        &self,
        options: &crate::model::MigrationOverrides,
    ) -> Option<crate::model::MigrationConfiguration> {
        Some(crate::config::MigrationDefaults::default().resolve(options))
    }

    /// Switches at once (a real engine does at its next pass boundary).
    fn switch_to_post_copy(&self, handle: MigrationHandle) {
        let _ = handle.update(|r| r.mode = crate::model::MigrationMode::PostCopy);
    }
}

/// An engine that fails every migration at once with a clear reason, for
/// tests of what the API does around a failed migration.
#[derive(Debug, Default)]
pub struct UnavailableEngine;

/// The message every migration fails with under [`UnavailableEngine`].
pub const ENGINE_UNAVAILABLE_REASON: &str = "migration engine not available yet";

impl MigrationEngine for UnavailableEngine {
    fn start(&self, record: MigrationRecord, handle: MigrationHandle, _service: Arc<Service>) {
        warn!(migration = %record.name, "no migration engine in this build; failing the migration");
        if let Err(e) =
            handle.update(|r| r.fail(FailureCode::EngineUnavailable, ENGINE_UNAVAILABLE_REASON))
        {
            warn!(migration = %record.name, error = %e, "cannot record the failure");
        }
    }

    fn abort(&self, handle: MigrationHandle) {
        // Nothing runs, so there is nothing to stop: finish the abort.
        let _ = handle.update(MigrationRecord::settle_abort);
    }
}
