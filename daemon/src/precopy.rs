//! The real [`MigrationEngine`]: pre-copy live migration over QUIC. Each
//! outgoing migration runs as a task (see `outgoing`); incoming ones are
//! handled by the endpoint's accept loop (see `incoming`).

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock, Weak};

use tokio::sync::watch;
use tracing::warn;

use crate::config::MigrationDefaults;
use crate::engine::{MigrationEngine, MigrationHandle};
use crate::model::{AbortStatus, MigrationConfiguration, MigrationOverrides, MigrationRecord};
use crate::outgoing::{self, OutgoingContext};
use crate::peers::Peers;
use crate::service::Service;

/// Code of migrations started while this host has no TLS identity.
pub const NO_IDENTITY: &str = "tls_unavailable";

/// The user's signals to a running migration.
struct Signals {
    cancel: watch::Sender<bool>,
    switch: watch::Sender<bool>,
    resume: watch::Sender<u32>,
}

type Cancels = Arc<Mutex<HashMap<String, Signals>>>;

/// Pre-copy migrations to peers.
pub struct PrecopyEngine {
    rt: tokio::runtime::Handle,
    host: String,
    /// `None` when the daemon has no TLS identity: migrations fail at once.
    peers: Option<Arc<Peers>>,
    defaults: MigrationDefaults,
    service: OnceLock<Weak<Service>>,
    cancels: Cancels,
}

impl PrecopyEngine {
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
            service: OnceLock::new(),
            cancels: Arc::default(),
        }
    }

    /// Connects the engine to the service that owns it (the service is
    /// built with the engine, so this comes after).
    pub fn attach(&self, service: &Arc<Service>) {
        let _ = self.service.set(Arc::downgrade(service));
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Signals>> {
        self.cancels.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn fail_now(handle: &MigrationHandle, code: &str, reason: &str) {
    if let Err(e) = handle.update(|r| r.fail(code, reason)) {
        warn!(migration = handle.name(), error = %crate::error_chain(&e), "cannot record the failure");
    }
}

impl MigrationEngine for PrecopyEngine {
    fn start(&self, record: MigrationRecord, handle: MigrationHandle) {
        let Some(peers) = self.peers.clone() else {
            fail_now(
                &handle,
                NO_IDENTITY,
                "this host has no TLS identity: set [tls] ca, cert and key in the daemon's config",
            );
            return;
        };
        let Some(service) = self.service.get().and_then(Weak::upgrade) else {
            fail_now(&handle, "internal", "migration engine is not attached");
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

    fn resume(&self, record: MigrationRecord, handle: MigrationHandle) -> Result<(), String> {
        let _ = handle;
        match self.lock().get(&record.name) {
            // The task parked after its reconnects failed; it redials.
            Some(signals) => {
                signals.resume.send_modify(|n| *n = n.wrapping_add(1));
                Ok(())
            }
            None => Err(
                "no task holds this migration's post-copy state any more (the daemon restarted); \
                 the guest's pages are split between both hosts and cannot be joined automatically"
                    .into(),
            ),
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
        let _ = handle.update(|r| {
            if r.phase.is_final() {
                r.abort_status = Some(AbortStatus::Failed);
            } else {
                r.abort_status = Some(AbortStatus::Succeeded);
                r.fail("aborted", "migration was cancelled");
            }
        });
    }
}
