//! The seam between migration records and whatever moves the guest
//! ([`MigrationEngine`]), and the real engine, [`LiveMigrationEngine`]:
//! live migration over QUIC. Each outgoing migration runs as a task (see
//! `outgoing`), which pre-copies, auto-converges, switches to post-copy and
//! resumes a broken post-copy; incoming ones are handled by the endpoint's
//! accept loop (see `incoming`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use tokio::sync::watch;
use tracing::warn;

use super::outgoing::{self, OutgoingContext};
use super::peers::Peers;
use super::table::{MigrationHandle, UpdateMigrationError};
use crate::config::MigrationDefaults;
use crate::model::{FailureCode, MigrationConfiguration, MigrationOverrides, MigrationRecord};
use crate::service::Service;

/// Drives migrations. Implementations must return quickly from every
/// method (spawn their work) because the API waits on them.
pub trait MigrationEngine: Send + Sync + 'static {
    /// Takes over a record that was just created in phase Pending.
    /// `service` is the daemon's, for the VM being moved.
    fn start(&self, record: MigrationRecord, handle: MigrationHandle, service: Arc<Service>);
    /// The user asked to cancel `handle`'s migration (its record already
    /// has `abort_requested` set).
    fn abort(&self, handle: MigrationHandle);

    /// The settings a new migration with `options` will run with (stored
    /// in its record). `None`: this engine has no settings.
    fn configure(&self, options: &MigrationOverrides) -> Option<MigrationConfiguration> {
        let _ = options;
        None
    }

    /// The user asked to switch `handle`'s running migration to post-copy
    /// (its record already has `switch_requested` set). Engines without
    /// post-copy ignore it.
    fn switch_to_post_copy(&self, handle: MigrationHandle) {
        let _ = handle;
    }

    /// Continues a post-copy migration that failed with the guest split
    /// between both hosts (`migratectl migrate --resume`).
    fn resume(&self, record: MigrationRecord, handle: MigrationHandle) -> Result<(), ResumeError> {
        let _ = (record, handle);
        Err(ResumeError::Unsupported)
    }
}

/// Why an interrupted post-copy cannot be resumed.
#[derive(Debug, thiserror::Error)]
pub enum ResumeError {
    #[error("this engine cannot resume migrations")]
    Unsupported,
    #[error(
        "no task holds this migration's post-copy state any more (the daemon restarted); \
         the guest's pages are split between both hosts and cannot be joined automatically"
    )]
    NoTask,
    #[error("cannot record the resume")]
    Record(#[source] UpdateMigrationError),
}

/// The user's signals to a running migration.
struct Signals {
    cancel: watch::Sender<bool>,
    switch: watch::Sender<bool>,
    resume: watch::Sender<u32>,
}

type Cancels = Arc<Mutex<HashMap<String, Signals>>>;

/// Live migrations to peers.
pub struct LiveMigrationEngine {
    rt: tokio::runtime::Handle,
    host: String,
    /// `None` when the daemon has no TLS identity: migrations fail at once.
    peers: Option<Arc<Peers>>,
    defaults: MigrationDefaults,
    cancels: Cancels,
}

impl LiveMigrationEngine {
    pub fn new(
        rt: tokio::runtime::Handle,
        host: String,
        peers: Option<Arc<Peers>>,
        defaults: MigrationDefaults,
    ) -> Self {
        Self {
            rt,
            host,
            peers,
            defaults,
            cancels: Arc::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Signals>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn fail_now(handle: &MigrationHandle, code: FailureCode, reason: &str) {
    if let Err(e) = handle.update(|r| r.fail(code, reason)) {
        warn!(migration = handle.name(), error = %crate::error_chain(&e), "cannot record the failure");
    }
}

impl MigrationEngine for LiveMigrationEngine {
    fn start(&self, record: MigrationRecord, handle: MigrationHandle, service: Arc<Service>) {
        let Some(peers) = self.peers.clone() else {
            fail_now(
                &handle,
                FailureCode::TlsUnavailable,
                "this host has no TLS identity: set [tls] ca, cert and key in the daemon's config",
            );
            return;
        };
        let (cancel_tx, cancel) = watch::channel(false);
        let post_copy_now = record
            .migration_configuration
            .as_ref()
            .is_some_and(|c| c.post_copy_now);
        // Post-copy now: the first pass is cut after its first chunk.
        let (switch_tx, switch) = watch::channel(record.switch_requested || post_copy_now);
        let (resume_tx, resume) = watch::channel(0);
        self.lock().insert(
            record.name.clone(),
            Signals {
                cancel: cancel_tx,
                switch: switch_tx,
                resume: resume_tx,
            },
        );
        let config = record
            .migration_configuration
            .clone()
            .unwrap_or_else(|| self.defaults.resolve(&Default::default()));
        let ctx = OutgoingContext {
            host: self.host.clone(),
            peers,
            service,
            config,
            cancel,
            switch,
            resume,
        };
        let cancels = self.cancels.clone();
        self.rt.spawn(async move {
            let name = record.name.clone();
            outgoing::run(ctx, record, handle).await;
            cancels
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .remove(&name);
        });
    }

    fn configure(&self, options: &MigrationOverrides) -> Option<MigrationConfiguration> {
        Some(self.defaults.resolve(options))
    }

    fn switch_to_post_copy(&self, handle: MigrationHandle) {
        if let Some(signals) = self.lock().get(handle.name()) {
            // Takes effect at the next transport pass boundary.
            let _ = signals.switch.send(true);
        }
    }

    fn resume(&self, record: MigrationRecord, handle: MigrationHandle) -> Result<(), ResumeError> {
        let _ = handle;
        match self.lock().get(&record.name) {
            // The task parked after its reconnects failed; it redials.
            Some(signals) => {
                signals.resume.send_modify(|n| *n = n.wrapping_add(1));
                Ok(())
            }
            None => Err(ResumeError::NoTask),
        }
    }

    fn abort(&self, handle: MigrationHandle) {
        if let Some(signals) = self.lock().get(handle.name()) {
            // The task stops at its next step, resumes the guest and
            // records the outcome (abort status included).
            let _ = signals.cancel.send(true);
            return;
        }
        // Nothing runs for it (already finished): settle the abort.
        let _ = handle.update(MigrationRecord::settle_abort);
    }
}
