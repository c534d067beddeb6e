//! What the daemon does, independent of HTTP: the VM table with its
//! supervision, migration records and their rules. Every method blocks
//! (store fsyncs, VMM control calls), so the API runs them on tokio's
//! blocking pool.
//!
//! Lock order: `vms` before the migration table's lock. Neither is held
//! across a VMM call or an engine call.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, MutexGuard};

use tracing::{info, warn};

use crate::migration::{MigrationEngine, MigrationTable};
use crate::model::{
    check_name, AbortStatus, Condition, ConditionStatus, ConditionType, FailureCode, GuestCounters,
    Health, MigrationMethod, MigrationMode, MigrationOverrides, MigrationPhase, MigrationRecord,
    MigrationRequest, Quantity, Timestamp, Vm, VmPhase, VmSpec, VmStatus,
};
use crate::store::{DesiredState, ListRecordsError, Store, VmRecord};
use crate::supervisor::{check_workload, ProbeError, VmBackend};
pub use error::ServiceError;

mod error;

/// Range checks of per-migration options (serde checked the types).
fn check_options(o: &MigrationOverrides) -> Result<(), ServiceError> {
    let positive = [
        ("completionTimeoutPerGiB", o.completion_timeout_per_gib),
        ("progressTimeout", o.progress_timeout),
        (
            "downtimeLimit",
            o.downtime_limit.map(|d| d.get().as_millis() as u64),
        ),
    ];
    for (key, v) in positive {
        if v == Some(0) {
            return Err(ServiceError::InvalidOption {
                key,
                message: "must be greater than 0".into(),
            });
        }
    }
    Ok(())
}

/// `busy` marker of a VM being received by migration.
const INCOMING: &str = "incoming migration";

/// A VM as the daemon tracks it.
#[derive(Debug)]
struct VmEntry {
    record: VmRecord,
    /// Pending, Running, Stopped or Failed; Migrating is derived.
    phase: VmPhase,
    reason: Option<String>,
    guest: Option<GuestCounters>,
    /// An operation (start, stop, delete) holds the VM.
    busy: Option<&'static str>,
}

/// What the daemon found at start.
#[derive(Debug, Default)]
pub struct Recovery {
    pub running: Vec<String>,
    pub failed: Vec<String>,
    pub stopped: Vec<String>,
    /// Migrations that were in flight when the daemon went down.
    pub interrupted_migrations: Vec<String>,
    /// Record files that could not be read (each already logged).
    pub skipped_files: usize,
}

/// The daemon's state and operations.
pub struct Service {
    host_name: String,
    peers: BTreeMap<String, String>,
    store: Store,
    backend: Arc<dyn VmBackend>,
    engine: Arc<dyn MigrationEngine>,
    vms: Mutex<BTreeMap<String, VmEntry>>,
    migrations: Arc<MigrationTable>,
}

impl Service {
    /// Loads every record from `store` and re-attaches to the VMMs that
    /// are still running. Guests are never started or stopped here.
    pub fn open(
        host_name: String,
        peers: BTreeMap<String, String>,
        store: Store,
        backend: Arc<dyn VmBackend>,
        engine: Arc<dyn MigrationEngine>,
    ) -> Result<(Self, Recovery), ListRecordsError> {
        let mut recovery = Recovery::default();
        let vms = store.load_vms()?;
        let migs = store.load_migrations()?;
        for e in vms.skipped.iter().chain(migs.skipped.iter()) {
            warn!(error = %crate::error_chain(e), "skipping unreadable record");
        }
        recovery.skipped_files = vms.skipped.len() + migs.skipped.len();
        let mut table = BTreeMap::new();
        for record in vms.records {
            let name = record.spec.name.clone();
            let entry = VmEntry {
                phase: match record.desired {
                    DesiredState::Running => VmPhase::Pending,
                    DesiredState::Stopped => VmPhase::Stopped,
                },
                reason: record.failure.clone(),
                guest: None,
                busy: None,
                record,
            };
            table.insert(name, entry);
        }
        let svc = Self {
            host_name,
            peers,
            migrations: Arc::new(MigrationTable::new(store.clone(), migs.records)),
            store,
            backend,
            engine,
            vms: Mutex::new(table),
        };
        let names: Vec<String> = svc.lock_vms().keys().cloned().collect();
        for name in names {
            svc.refresh(&name);
            match svc.lock_vms().get(&name).map(|e| e.phase) {
                Some(VmPhase::Running) => recovery.running.push(name),
                Some(VmPhase::Stopped) => recovery.stopped.push(name),
                _ => recovery.failed.push(name),
            }
        }
        // Whatever drove an in-flight migration died with the old daemon.
        for r in svc
            .migrations
            .list()
            .into_iter()
            .filter(|r| !r.phase.is_final())
        {
            let h = svc.migrations.handle(&r.name);
            if let Err(e) = h.update(|r| {
                r.fail(
                    FailureCode::DaemonRestarted,
                    "the daemon restarted during the migration",
                )
            }) {
                warn!(migration = %r.name, error = %crate::error_chain(&e), "cannot mark interrupted migration");
            }
            recovery.interrupted_migrations.push(r.name);
        }
        Ok((svc, recovery))
    }

    pub fn host_name(&self) -> &str {
        &self.host_name
    }

    fn lock_vms(&self) -> MutexGuard<'_, BTreeMap<String, VmEntry>> {
        self.vms.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Probes the VMM of a VM that should be running and updates its phase.
    fn refresh(&self, name: &str) {
        let paths = {
            let vms = self.lock_vms();
            match vms.get(name) {
                Some(e) if e.busy.is_none() && e.record.desired == DesiredState::Running => {
                    self.store.vm_paths(name)
                }
                _ => return,
            }
        };
        let probe = self.backend.probe(&paths);
        let mut vms = self.lock_vms();
        let Some(e) = vms.get_mut(name) else { return };
        if e.busy.is_some() || e.record.desired != DesiredState::Running {
            return;
        }
        let (phase, reason, guest) = match probe {
            Ok(p) if p.healthy => (VmPhase::Running, None, Some(p.counters)),
            Ok(p) => (VmPhase::Failed, p.reason, Some(p.counters)),
            Err(err @ ProbeError::Gone { .. }) => (VmPhase::Failed, Some(err.to_string()), None),
            Err(err) => (VmPhase::Failed, Some(crate::error_chain(&err)), None),
        };
        if phase != e.phase {
            info!(vm = name, from = %e.phase, to = %phase, reason = reason.as_deref().unwrap_or(""), "vm phase");
        }
        if reason != e.record.failure && phase == VmPhase::Failed {
            e.record.failure = reason.clone();
            if let Err(err) = self.store.save_vm(&e.record) {
                warn!(vm = name, error = %crate::error_chain(&err), "cannot persist vm failure");
            }
        }
        e.phase = phase;
        e.reason = reason;
        e.guest = guest;
    }

    fn view(&self, e: &VmEntry) -> Vm {
        let active = self.migrations.active_for(&e.record.spec.name);
        let phase = match (&active, e.phase) {
            (Some(_), VmPhase::Running) => VmPhase::Migrating,
            (_, p) => p,
        };
        let live = if matches!(phase, VmPhase::Running | VmPhase::Migrating) {
            Condition {
                kind: ConditionType::LiveMigratable,
                status: ConditionStatus::True,
                reason: String::new(),
                message: String::new(),
            }
        } else {
            Condition {
                kind: ConditionType::LiveMigratable,
                status: ConditionStatus::False,
                reason: "VmNotRunning".into(),
                message: format!("vm is {phase}; only a running vm can be live-migrated"),
            }
        };
        Vm {
            spec: e.record.spec.clone(),
            status: VmStatus {
                phase,
                node_name: self.host_name.clone(),
                pid: e.record.pid.filter(|_| phase != VmPhase::Stopped),
                reason: e.reason.clone(),
                conditions: vec![live],
                migration_method: MigrationMethod::LiveMigration,
                active_migration: active.map(|r| r.name),
                guest: e.guest.clone(),
                created: Some(e.record.created),
            },
        }
    }

    fn get_view(&self, name: &str) -> Result<Vm, ServiceError> {
        let vms = self.lock_vms();
        let e = vms
            .get(name)
            .ok_or_else(|| ServiceError::VmNotFound { name: name.into() })?;
        Ok(self.view(e))
    }

    pub fn get_vm(&self, name: &str) -> Result<Vm, ServiceError> {
        check_name("vm name", name)?;
        self.refresh(name);
        self.get_view(name)
    }

    pub fn list_vms(&self) -> Vec<Vm> {
        let names: Vec<String> = self.lock_vms().keys().cloned().collect();
        for n in &names {
            self.refresh(n);
        }
        let vms = self.lock_vms();
        vms.values().map(|e| self.view(e)).collect()
    }

    /// Marks `name` busy with `op` and returns its record; refuses if it is
    /// missing, busy, or (when `check_migration`) has an active migration.
    fn begin(
        &self,
        name: &str,
        op: &'static str,
        check_migration: bool,
    ) -> Result<VmRecord, ServiceError> {
        check_name("vm name", name)?;
        let mut vms = self.lock_vms();
        let e = vms
            .get_mut(name)
            .ok_or_else(|| ServiceError::VmNotFound { name: name.into() })?;
        if let Some(operation) = e.busy {
            return Err(ServiceError::VmBusy {
                name: name.into(),
                operation,
            });
        }
        if check_migration {
            if let Some(m) = self.migrations.active_for(name) {
                return Err(ServiceError::MigrationInProgress {
                    vm: name.into(),
                    migration: m.name,
                    phase: m.phase,
                });
            }
        }
        e.busy = Some(op);
        Ok(e.record.clone())
    }

    /// Ends an operation started with `begin`, storing the outcome.
    fn finish(&self, name: &str, record: VmRecord, phase: VmPhase, reason: Option<String>) -> Vm {
        let mut vms = self.lock_vms();
        let e = vms.get_mut(name).expect("a busy vm is not removed");
        e.record = record;
        e.phase = phase;
        e.reason = reason;
        e.busy = None;
        if phase != VmPhase::Running {
            e.guest = None;
        }
        self.view(e)
    }

    pub fn create_vm(&self, spec: VmSpec) -> Result<Vm, ServiceError> {
        spec.validate().map_err(ServiceError::InvalidSpec)?;
        check_workload(&spec).map_err(ServiceError::InvalidSpec)?;
        let name = spec.name.clone();
        let mut record = VmRecord {
            spec,
            desired: DesiredState::Running,
            pid: None,
            failure: None,
            created: Timestamp::now(),
        };
        {
            let mut vms = self.lock_vms();
            if vms.contains_key(&name) {
                return Err(ServiceError::VmExists { name });
            }
            vms.insert(
                name.clone(),
                VmEntry {
                    record: record.clone(),
                    phase: VmPhase::Pending,
                    reason: None,
                    guest: None,
                    busy: Some("create"),
                },
            );
        }
        let undo = |err: ServiceError| {
            if let Err(e) = self.store.delete_vm(&name) {
                warn!(vm = %name, error = %crate::error_chain(&e), "cannot clean up after a failed create");
            }
            self.lock_vms().remove(&name);
            err
        };
        self.store
            .save_vm(&record)
            .map_err(|e| undo(ServiceError::Persist(e)))?;
        let paths = self.store.vm_paths(&name);
        let pid = self
            .backend
            .launch(&record.spec, &paths)
            .map_err(|source| {
                undo(ServiceError::Launch {
                    name: name.clone(),
                    source,
                })
            })?;
        record.pid = Some(pid);
        if let Err(e) = self.store.save_vm(&record) {
            // The guest runs but would be forgotten by a restart: stop it
            // rather than leave an unsupervised guest behind.
            let _ = self.backend.shutdown(&paths);
            return Err(undo(ServiceError::Persist(e)));
        }
        info!(vm = %name, pid, "vm created");
        Ok(self.finish(&name, record, VmPhase::Running, None))
    }

    pub fn start_vm(&self, name: &str) -> Result<Vm, ServiceError> {
        let mut record = self.begin(name, "start", true)?;
        let paths = self.store.vm_paths(name);
        // A VMM that still answers is adopted, never started twice.
        if let Ok(p) = self.backend.probe(&paths) {
            if p.healthy {
                record.desired = DesiredState::Running;
                record.failure = None;
                let _ = self.store.save_vm(&record);
                return Ok(self.finish(name, record, VmPhase::Running, None));
            }
            let _ = self.backend.shutdown(&paths);
        }
        let old = record.clone();
        let launched = self.backend.launch(&record.spec, &paths);
        match launched {
            Ok(pid) => {
                record.pid = Some(pid);
                record.desired = DesiredState::Running;
                record.failure = None;
                if let Err(e) = self.store.save_vm(&record) {
                    let _ = self.backend.shutdown(&paths);
                    self.finish(name, old, VmPhase::Stopped, None);
                    return Err(ServiceError::Persist(e));
                }
                info!(vm = name, pid, "vm started");
                Ok(self.finish(name, record, VmPhase::Running, None))
            }
            Err(source) => {
                let reason = source.to_string();
                record.failure = Some(reason.clone());
                record.desired = DesiredState::Stopped;
                let _ = self.store.save_vm(&record);
                self.finish(name, record, VmPhase::Failed, Some(reason));
                Err(ServiceError::Launch {
                    name: name.into(),
                    source,
                })
            }
        }
    }

    /// Stops the VMM of `name`, which `begin` holds. On failure the VM is
    /// released in the phase it had and the error returned.
    fn shut_down(&self, name: &str, record: VmRecord) -> Result<VmRecord, ServiceError> {
        let paths = self.store.vm_paths(name);
        match self.backend.shutdown(&paths) {
            Ok(()) => Ok(record),
            Err(source) => {
                let phase = self
                    .lock_vms()
                    .get(name)
                    .map(|e| e.phase)
                    .unwrap_or(VmPhase::Failed);
                self.finish(name, record, phase, None);
                Err(ServiceError::Stop {
                    name: name.into(),
                    source,
                })
            }
        }
    }

    pub fn stop_vm(&self, name: &str) -> Result<Vm, ServiceError> {
        let record = self.begin(name, "stop", true)?;
        let mut record = self.shut_down(name, record)?;
        record.desired = DesiredState::Stopped;
        record.pid = None;
        record.failure = None;
        let saved = self.store.save_vm(&record);
        let vm = self.finish(name, record, VmPhase::Stopped, None);
        saved.map_err(ServiceError::Persist)?;
        info!(vm = name, "vm stopped");
        Ok(vm)
    }

    pub fn delete_vm(&self, name: &str) -> Result<(), ServiceError> {
        let record = self.begin(name, "delete", true)?;
        let record = self.shut_down(name, record)?;
        if let Err(e) = self.store.delete_vm(name) {
            self.finish(name, record, VmPhase::Stopped, None);
            return Err(ServiceError::Delete(e));
        }
        self.lock_vms().remove(name);
        info!(vm = name, "vm deleted");
        Ok(())
    }

    /// Creates a migration record and hands it to the engine, which gets
    /// this service for the VM it moves (hence `Arc<Self>`).
    pub fn create_migration(
        self: &Arc<Self>,
        req: MigrationRequest,
    ) -> Result<MigrationRecord, ServiceError> {
        check_name("vm name", &req.vm)?;
        check_options(&req.options)?;
        if req.target_host == self.host_name {
            return Err(ServiceError::TargetIsSelf {
                host: req.target_host,
            });
        }
        let Some(address) = self.peers.get(&req.target_host).cloned() else {
            return Err(ServiceError::UnknownHost {
                host: req.target_host,
                known: self.peers.keys().cloned().collect(),
            });
        };
        self.refresh(&req.vm);
        let record = {
            // vms before migrations (see the module doc): a VM cannot be
            // deleted between the checks and the insert.
            let vms = self.lock_vms();
            let e = vms.get(&req.vm).ok_or_else(|| ServiceError::VmNotFound {
                name: req.vm.clone(),
            })?;
            if let Some(operation) = e.busy {
                return Err(ServiceError::VmBusy {
                    name: req.vm.clone(),
                    operation,
                });
            }
            let mut migs = self.migrations.lock();
            if let Some(m) = migs
                .values()
                .find(|r| r.vm == req.vm && !r.phase.is_final())
            {
                return Err(ServiceError::MigrationInProgress {
                    vm: req.vm.clone(),
                    migration: m.name.clone(),
                    phase: m.phase,
                });
            }
            if e.phase != VmPhase::Running {
                return Err(ServiceError::VmNotRunning {
                    name: req.vm.clone(),
                    phase: e.phase,
                });
            }
            let mut record =
                MigrationRecord::new_pending(&req.vm, &self.host_name, &req.target_host, &address);
            record.verify = req.verify;
            record.migration_configuration = self.engine.configure(&req.options);
            record.bytes_total = e.record.spec.memory.bytes();
            record.bytes_remaining = record.bytes_total;
            self.store
                .save_migration(&record)
                .map_err(ServiceError::Persist)?;
            migs.insert(record.name.clone(), record.clone());
            record
        };
        info!(migration = %record.name, vm = %record.vm, target = %record.target_host, "migration created");
        let handle = self.migrations.handle(&record.name);
        self.engine.start(record.clone(), handle, self.clone());
        Ok(self.migrations.get(&record.name).unwrap_or(record))
    }

    pub fn list_migrations(&self) -> Vec<MigrationRecord> {
        self.migrations.list()
    }

    pub fn get_migration(&self, name: &str) -> Result<MigrationRecord, ServiceError> {
        self.migrations
            .get(name)
            .ok_or_else(|| ServiceError::MigrationNotFound { name: name.into() })
    }

    /// The record of `name` if it is still in flight and in pre-copy;
    /// `in_post_copy` says why one in post-copy is refused.
    fn running_pre_copy(
        &self,
        name: &str,
        in_post_copy: impl FnOnce(MigrationRecord) -> ServiceError,
    ) -> Result<MigrationRecord, ServiceError> {
        let current = self.get_migration(name)?;
        if current.phase.is_final() {
            return Err(ServiceError::MigrationFinished {
                name: name.into(),
                phase: current.phase,
            });
        }
        if current.mode == MigrationMode::PostCopy {
            return Err(in_post_copy(current));
        }
        Ok(current)
    }

    /// Asks the engine to cancel a pending or running migration.
    pub fn cancel_migration(&self, name: &str) -> Result<MigrationRecord, ServiceError> {
        let current = self.running_pre_copy(name, |m| ServiceError::CancelInPostCopy {
            name: name.into(),
            target: m.target_host,
        })?;
        let handle = self.migrations.handle(name);
        // The engine re-checks under the record's lock: a switch to
        // post-copy racing with this cancel loses (see `outgoing`).
        let mut in_post_copy = false;
        handle
            .update(|r| {
                if r.mode == MigrationMode::PostCopy {
                    in_post_copy = true;
                    return;
                }
                r.abort_requested = true;
                r.abort_status = Some(AbortStatus::Aborting);
            })
            .map_err(ServiceError::UpdateMigration)?;
        if in_post_copy {
            return Err(ServiceError::CancelInPostCopy {
                name: name.into(),
                target: current.target_host,
            });
        }
        self.engine.abort(handle);
        self.get_migration(name)
    }

    /// Continues a post-copy migration whose link broke for longer than
    /// the automatic reconnects lasted.
    pub fn resume_migration(&self, name: &str) -> Result<MigrationRecord, ServiceError> {
        let current = self.get_migration(name)?;
        let resumable = current.phase == MigrationPhase::Failed
            && current.mode == MigrationMode::PostCopy
            && current.failure_code == Some(FailureCode::PostCopyInterrupted);
        if !resumable {
            return Err(ServiceError::NotResumable {
                name: name.into(),
                why: format!(
                    "only a post-copy migration that failed with {} can be resumed; this one is {} ({})",
                    FailureCode::PostCopyInterrupted,
                    current.phase,
                    current
                        .failure_code
                        .map_or("no failure", FailureCode::as_str),
                ),
            });
        }
        let handle = self.migrations.handle(name);
        self.engine
            .resume(current, handle)
            .map_err(|source| ServiceError::ResumeRefused {
                name: name.into(),
                source,
            })?;
        self.get_migration(name)
    }

    /// Asks the engine to switch a running pre-copy migration to post-copy.
    pub fn switch_migration(&self, name: &str) -> Result<MigrationRecord, ServiceError> {
        self.running_pre_copy(name, |_| ServiceError::AlreadyPostCopy {
            name: name.into(),
        })?;
        let handle = self.migrations.handle(name);
        handle
            .update(|r| r.switch_requested = true)
            .map_err(ServiceError::UpdateMigration)?;
        self.engine.switch_to_post_copy(handle);
        self.get_migration(name)
    }

    pub fn health(&self) -> Health {
        Health {
            host_name: self.host_name.clone(),
            version: env!("CARGO_PKG_VERSION").into(),
            vms: self.lock_vms().len(),
            active_migrations: self
                .migrations
                .list()
                .iter()
                .filter(|r| !r.phase.is_final())
                .count(),
        }
    }

    /// The store (VM paths for the migration engine).
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// The persisted record of `name`, if the VM exists here.
    pub fn vm_record(&self, name: &str) -> Option<VmRecord> {
        self.lock_vms().get(name).map(|e| e.record.clone())
    }

    /// Holds `name` for an incoming migration: the VM shows as Pending and
    /// no other create or migration can take the name meanwhile. Nothing is
    /// persisted until [`complete_incoming`](Self::complete_incoming).
    pub fn reserve_incoming(&self, name: &str, memory: Quantity) -> Result<(), ServiceError> {
        check_name("vm name", name)?;
        let mut vms = self.lock_vms();
        if vms.contains_key(name) {
            return Err(ServiceError::VmExists { name: name.into() });
        }
        let spec = VmSpec {
            name: name.into(),
            labels: Default::default(),
            memory,
            vcpus: 1,
            workload: Default::default(),
        };
        vms.insert(
            name.into(),
            VmEntry {
                record: VmRecord {
                    spec,
                    desired: DesiredState::Running,
                    pid: None,
                    failure: None,
                    created: Timestamp::now(),
                },
                phase: VmPhase::Pending,
                reason: None,
                guest: None,
                busy: Some(INCOMING),
            },
        );
        Ok(())
    }

    /// The migrated guest runs here under `pid`: persist it as a VM that
    /// this daemon supervises like any other.
    pub fn complete_incoming(&self, spec: VmSpec, pid: u32) -> Result<(), ServiceError> {
        let name = spec.name.clone();
        let record = VmRecord {
            spec,
            desired: DesiredState::Running,
            pid: Some(pid),
            failure: None,
            created: Timestamp::now(),
        };
        self.store.save_vm(&record).map_err(ServiceError::Persist)?;
        let mut vms = self.lock_vms();
        if let Some(e) = vms.get_mut(&name).filter(|e| e.busy == Some(INCOMING)) {
            e.record = record;
            e.phase = VmPhase::Running;
            e.busy = None;
        }
        info!(vm = %name, pid, "vm arrived by migration");
        Ok(())
    }

    /// Drops an incoming reservation (and any files it left).
    pub fn cancel_incoming(&self, name: &str) {
        let mut vms = self.lock_vms();
        if vms.get(name).is_some_and(|e| e.busy == Some(INCOMING)) {
            vms.remove(name);
            if let Err(e) = self.store.delete_vm(name) {
                warn!(vm = name, error = %crate::error_chain(&e), "cannot clean up after a failed incoming migration");
            }
        }
    }

    /// The guest now runs on another host: stop its VMM here and forget it.
    /// Unlike `delete_vm` this runs while the VM's migration is active.
    pub fn remove_migrated_vm(&self, name: &str) -> Result<(), ServiceError> {
        let paths = self.store.vm_paths(name);
        self.backend
            .shutdown(&paths)
            .map_err(|source| ServiceError::Stop {
                name: name.into(),
                source,
            })?;
        self.store.delete_vm(name).map_err(ServiceError::Delete)?;
        self.lock_vms().remove(name);
        info!(vm = name, "vm left by migration");
        Ok(())
    }

    /// The migration table, for an engine that needs records of other
    /// migrations (e.g. for limits).
    pub fn migrations(&self) -> &Arc<MigrationTable> {
        &self.migrations
    }
}
