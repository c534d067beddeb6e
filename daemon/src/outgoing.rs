//! Source side of a pre-copy migration: connect to the target, pass 0 over
//! the memfd's data ranges, dirty passes until the estimated downtime fits
//! the limit, then stop-and-copy and hand over.
//!
//! Until the target's `Done` arrives every failure resumes the guest here
//! and stops dirty logging; the record says why with a stable code.
//!
//! Downtime is measured here, from the source pause to the target's `Done`
//! (which the target sends right after resuming the guest), so it includes
//! one network round trip. In verify mode the source's digest time is left
//! out and so is an equal estimate for the target's.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmem::{DirtyBitmap, GuestMemory};
use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};
use transport::codec::ReasonCode;
use transport::driver::{DriverError, SourceDriver};
use transport::endpoint::MigrationId;
use transport::layout::{PageRange, PAGE_SIZE};
use transport::limiter::{BytesPerSecond, RateLimiter};
use transport::session::{SourceError, SourceOptions, SourceSession};
use vmm::control::{CallError, ControlClient};

use crate::config::MigrationDefaults;
use crate::engine::MigrationHandle;
use crate::guestio::{
    holes, page_ranges, to_wire_layout, ConvertLayoutError, GuestPages, StateEnvelope,
};
use crate::model::{AbortStatus, MigrationPhase, MigrationRecord, Timestamp};
use crate::peers::{ConnectPeerError, Peers};
use crate::service::Service;

const PAGE: u64 = PAGE_SIZE as u64;
/// What a target's abort message says when verification failed.
pub const DIGEST_MISMATCH: &str = "memory digest mismatch";
/// Page streams per migration: enough to keep a loopback or LAN link busy.
const BULK_STREAMS: u16 = 2;
/// Records are persisted (fsync) at most this often while passes run.
/// Dirty bytes small enough to switch over at once: well under a
/// millisecond on any link a migration uses.
const SWITCHOVER_FLOOR: u64 = 64 * PAGE;

const PERSIST_EVERY: Duration = Duration::from_millis(500);
/// How long one VMM control call may block.
const VMM_CALL_TIMEOUT: Duration = Duration::from_secs(30);

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
    #[error("no progress for {timeout:?}: the guest dirties memory faster than it can be sent")]
    ProgressTimeout { timeout: Duration },
    #[error("migration did not complete within {timeout:?}")]
    CompletionTimeout { timeout: Duration },
    #[error("migration was cancelled")]
    Cancelled,
    #[error("memory digests differ between source and target")]
    DigestMismatch,
    #[error("internal error: {what}")]
    Internal { what: String },
}

impl MigrateOutError {
    /// Lifts the peer's own refusal or abort out of a driver error, so the
    /// record shows the target's code and message.
    fn from_driver(e: DriverError) -> Self {
        match e {
            DriverError::Source(SourceError::Refused { code, message }) => {
                MigrateOutError::Refused { code, message }
            }
            DriverError::Source(SourceError::PeerAborted { code, message }) => {
                if code == ReasonCode::Internal && message.contains(DIGEST_MISMATCH) {
                    MigrateOutError::DigestMismatch
                } else {
                    MigrateOutError::Aborted { code, message }
                }
            }
            e => MigrateOutError::Transfer(e),
        }
    }

    /// The stable code stored in the record.
    pub fn code(&self) -> &'static str {
        use MigrateOutError::*;
        match self {
            VmGone { .. } => "vm_not_found",
            Connect(_) | Streams(_) => "target_unreachable",
            Refused { code, .. } | Aborted { code, .. } => code.as_str(),
            Transfer(e) if e.is_peer_lost() => "peer_lost",
            Transfer(_) => "transfer_failed",
            Vmm { .. } => "vmm_failed",
            Layout(_) | Memory(_) | Internal { .. } => "internal",
            ProgressTimeout { .. } => "progress_timeout",
            CompletionTimeout { .. } => "timeout",
            Cancelled => "aborted",
            DigestMismatch => "digest_mismatch",
        }
    }

    fn reason(&self) -> ReasonCode {
        match self {
            MigrateOutError::Cancelled => ReasonCode::Cancelled,
            MigrateOutError::ProgressTimeout { .. } => ReasonCode::ProgressTimeout,
            MigrateOutError::CompletionTimeout { .. } => ReasonCode::Timeout,
            _ => ReasonCode::Internal,
        }
    }
}

/// What an outgoing migration needs from the daemon.
pub struct OutgoingContext {
    pub host: String,
    pub peers: Arc<Peers>,
    pub service: Arc<Service>,
    pub defaults: MigrationDefaults,
    /// Becomes true when the user cancels.
    pub cancel: watch::Receiver<bool>,
}

/// A VMM control connection shared with blocking threads.
#[derive(Clone)]
struct Vmm(Arc<Mutex<ControlClient>>);

impl Vmm {
    async fn call<T: Send + 'static>(
        &self,
        step: &'static str,
        f: impl FnOnce(&mut ControlClient) -> Result<T, CallError> + Send + 'static,
    ) -> Result<T, MigrateOutError> {
        let c = self.0.clone();
        tokio::task::spawn_blocking(move || f(&mut c.lock().unwrap_or_else(|p| p.into_inner())))
            .await
            .map_err(|e| MigrateOutError::Internal {
                what: format!("vmm call task: {e}"),
            })?
            .map_err(|source| MigrateOutError::Vmm { step, source })
    }
}

/// Runs the migration of `record` to completion and records the outcome.
pub async fn run(ctx: OutgoingContext, record: MigrationRecord, handle: MigrationHandle) {
    let span = info_span!("migration", id = %record.name, role = "source");
    async move {
        let started = Instant::now();
        match migrate(&ctx, &record, &handle).await {
            Ok(()) => info!(took = ?started.elapsed(), "migration succeeded"),
            Err(e) => {
                let reason = crate::error_chain(&e);
                warn!(error = %reason, "migration failed; the guest keeps running here");
                let cancelled = matches!(e, MigrateOutError::Cancelled);
                let mismatch = matches!(e, MigrateOutError::DigestMismatch);
                let _ = handle.update(|r| {
                    r.fail(e.code(), reason);
                    if mismatch {
                        r.memory_digest_matched = Some(false);
                    }
                    if r.abort_requested {
                        r.abort_status = Some(if cancelled {
                            AbortStatus::Succeeded
                        } else {
                            AbortStatus::Failed
                        });
                    }
                });
            }
        }
    }
    .instrument(span)
    .await
}

fn update(handle: &MigrationHandle, f: impl FnOnce(&mut MigrationRecord)) {
    if let Err(e) = handle.update(f) {
        warn!(error = %crate::error_chain(&e), "cannot persist migration progress");
    }
}

async fn migrate(
    ctx: &OutgoingContext,
    record: &MigrationRecord,
    handle: &MigrationHandle,
) -> Result<(), MigrateOutError> {
    update(handle, |r| {
        r.phase = MigrationPhase::Scheduling;
        r.start_timestamp = Some(Timestamp::now());
    });
    let vm = ctx
        .service
        .vm_record(&record.vm)
        .ok_or_else(|| MigrateOutError::VmGone {
            vm: record.vm.clone(),
        })?;
    let paths = ctx.service.store().vm_paths(&record.vm);
    let client =
        ControlClient::connect(&paths.control_socket).map_err(|source| MigrateOutError::Vmm {
            step: "connect",
            source,
        })?;
    client
        .set_timeout(Some(VMM_CALL_TIMEOUT))
        .map_err(|source| MigrateOutError::Vmm {
            step: "connect",
            source,
        })?;
    let vmm = Vmm(Arc::new(Mutex::new(client)));
    let mem: Arc<GuestMemory> = Arc::new(vmm.call("get_memory", |c| c.map_memory()).await?);
    let layout = to_wire_layout(mem.layout()).map_err(MigrateOutError::Layout)?;

    let pages = GuestPages(mem.clone());
    // Nothing has touched the guest yet: a cancel just drops the attempt
    // (the target cleans up when the streams go).
    let mut cancel = ctx.cancel.clone();
    let (session, driver) = tokio::select! {
        r = open_target(ctx, record, handle, layout, &pages) => r?,
        _ = cancel.wait_for(|c| *c) => return Err(MigrateOutError::Cancelled),
    };
    update(handle, |r| r.phase = MigrationPhase::TargetReady);

    let mut run = Transfer {
        ctx,
        handle,
        vmm: vmm.clone(),
        mem,
        pages,
        session,
        driver,
        verify: record.verify,
        spec: vm.spec,
        started: Instant::now(),
        paused: false,
        logging: false,
    };
    let result = run.precopy().await;
    if let Err(e) = &result {
        run.roll_back(e).await;
    }
    result?;
    // The guest runs on the target: tear down the copy here.
    let service = ctx.service.clone();
    let name = record.vm.clone();
    let removed = tokio::task::spawn_blocking(move || service.remove_migrated_vm(&name)).await;
    match removed {
        Ok(Ok(())) => {}
        Ok(Err(e)) => warn!(error = %crate::error_chain(&e), "cannot remove the migrated vm here"),
        Err(e) => warn!(error = %e, "cannot remove the migrated vm here"),
    }
    update(handle, |r| {
        r.phase = MigrationPhase::Succeeded;
        r.end_timestamp = Some(Timestamp::now());
        if r.abort_requested {
            // Too late: the guest already runs on the target.
            r.abort_status = Some(AbortStatus::Failed);
        }
    });
    Ok(())
}

/// Connects to the target, opens the migration's streams and says hello.
async fn open_target(
    ctx: &OutgoingContext,
    record: &MigrationRecord,
    handle: &MigrationHandle,
    layout: transport::layout::MemoryLayout,
    pages: &GuestPages,
) -> Result<(SourceSession, SourceDriver), MigrateOutError> {
    update(handle, |r| r.phase = MigrationPhase::PreparingTarget);
    let conn = ctx
        .peers
        .connect(&record.target_host)
        .await
        .map_err(MigrateOutError::Connect)?;
    let id = MigrationId(u128::from_str_radix(&record.uid.replace('-', ""), 16).unwrap_or(0));
    let streams = conn
        .open_migration(id, BULK_STREAMS)
        .await
        .map_err(MigrateOutError::Streams)?;
    let mut session = SourceSession::new(
        layout,
        SourceOptions {
            host: ctx.host.clone(),
            migration_id: record.name.clone(),
            vm_name: record.vm.clone(),
            max_streams: BULK_STREAMS,
            ..SourceOptions::default()
        },
    )
    .map_err(|e| MigrateOutError::Internal {
        what: format!("source session: {e}"),
    })?;
    let limiter = match ctx.defaults.bandwidth_per_migration.bytes() {
        0 => RateLimiter::unlimited(),
        n => RateLimiter::new(BytesPerSecond(n)),
    };
    let mut driver = SourceDriver::new(streams, limiter);
    driver
        .handshake(&mut session, pages)
        .await
        .map_err(MigrateOutError::from_driver)?;
    Ok((session, driver))
}

/// One migration after the handshake.
struct Transfer<'a> {
    ctx: &'a OutgoingContext,
    handle: &'a MigrationHandle,
    vmm: Vmm,
    mem: Arc<GuestMemory>,
    pages: GuestPages,
    session: SourceSession,
    driver: SourceDriver,
    verify: bool,
    spec: crate::model::VmSpec,
    started: Instant,
    paused: bool,
    logging: bool,
}

/// Progress numbers carried from pass to pass.
#[derive(Default)]
struct Progress {
    passes: u32,
    bytes_sent: u64,
    zero_pages: u64,
    /// Bytes per second, from passes big enough to measure.
    bandwidth: f64,
    dirty_rate: u64,
    last_persist: Option<Instant>,
}

impl Transfer<'_> {
    async fn precopy(&mut self) -> Result<(), MigrateOutError> {
        let d = &self.ctx.defaults;
        let downtime_limit = d.downtime_limit.get();
        let progress_timeout = Duration::from_secs(d.progress_timeout);
        let gib = self.mem.len().div_ceil(1 << 30).max(1);
        let completion_timeout = Duration::from_secs(d.completion_timeout_per_gib * gib);

        self.vmm
            .call("dirty_log_start", |c| c.dirty_log_start())
            .await?;
        self.logging = true;
        update(self.handle, |r| r.phase = MigrationPhase::Running);

        // Pass 0: every data range of the memfd; holes go as known-zero
        // without being read.
        let total = self.mem.layout().total_pages();
        let data = self.mem.data_ranges().map_err(MigrateOutError::Memory)?;
        let zero = holes(&data, total);
        let mut p = Progress::default();
        let mut last_fetch = Instant::now();
        self.pass(&mut p, &page_ranges(data), &page_ranges(zero))
            .await?;

        let mut best_remaining = u64::MAX;
        let mut last_progress = Instant::now();
        loop {
            let bitmap = self
                .vmm
                .call("dirty_log_fetch", |c| c.dirty_log_fetch())
                .await?;
            let since = last_fetch.elapsed();
            last_fetch = Instant::now();
            let remaining = bitmap.count() * PAGE;
            p.dirty_rate = (remaining as f64 / since.as_secs_f64().max(1e-3)) as u64;
            let expected = expected_downtime(remaining, p.bandwidth);
            self.report(&mut p, remaining, expected, true);
            // Under the limit is enough to switch over, but not a reason
            // to: while passes keep shrinking the dirty set (the link drains
            // faster than the guest dirties), one more pass costs the guest
            // nothing and cuts the downtime. Switch once it stops shrinking
            // or is already tiny.
            let shrinking = remaining < best_remaining.saturating_mul(3) / 4;
            if expected <= downtime_limit && (!shrinking || remaining <= SWITCHOVER_FLOOR) {
                return self.stop_and_copy(p, bitmap).await;
            }
            if remaining < best_remaining {
                best_remaining = remaining;
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= progress_timeout {
                return Err(MigrateOutError::ProgressTimeout {
                    timeout: progress_timeout,
                });
            }
            if self.started.elapsed() >= completion_timeout {
                return Err(MigrateOutError::CompletionTimeout {
                    timeout: completion_timeout,
                });
            }
            let ranges = bitmap_ranges(&bitmap);
            self.pass(&mut p, &ranges, &[]).await?;
        }
    }

    /// One pass, cancellable; updates bandwidth and byte counts.
    async fn pass(
        &mut self,
        p: &mut Progress,
        pages: &[PageRange],
        zero: &[PageRange],
    ) -> Result<(), MigrateOutError> {
        if *self.ctx.cancel.borrow() {
            return Err(MigrateOutError::Cancelled);
        }
        let mut cancel = self.ctx.cancel.clone();
        let t = Instant::now();
        let sent = tokio::select! {
            r = self.driver.send_pass(&mut self.session, &self.pages, pages, zero) => r,
            _ = cancel.wait_for(|c| *c) => return Err(MigrateOutError::Cancelled),
        };
        let stats = sent.map_err(MigrateOutError::from_driver)?;
        let took = t.elapsed().as_secs_f64().max(1e-6);
        // Guest bytes moved per second (compression included), the unit of
        // the dirty bytes it is compared with. Small passes are dominated by
        // the round trip; only passes of a few MiB say much about the link.
        let moved = stats.pages * PAGE;
        if moved >= 4 << 20 || p.bandwidth == 0.0 {
            let measured = moved as f64 / took;
            p.bandwidth = if p.bandwidth == 0.0 {
                measured
            } else {
                0.5 * p.bandwidth + 0.5 * measured
            };
        }
        p.passes += 1;
        p.bytes_sent += stats.wire_bytes;
        p.zero_pages += stats.zero_pages;
        info!(
            pass = stats.pass,
            pages = stats.pages,
            zero_pages = stats.zero_pages,
            wire_bytes = stats.wire_bytes,
            ms = (took * 1000.0) as u64,
            "pass sent"
        );
        Ok(())
    }

    fn report(&self, p: &mut Progress, remaining: u64, expected: Duration, throttled: bool) {
        if throttled && p.last_persist.is_some_and(|t| t.elapsed() < PERSIST_EVERY) {
            return;
        }
        p.last_persist = Some(Instant::now());
        let (passes, sent, zero, rate, bw) = (
            p.passes,
            p.bytes_sent,
            p.zero_pages,
            p.dirty_rate,
            p.bandwidth as u64,
        );
        update(self.handle, |r| {
            r.passes = passes;
            r.bytes_sent = sent;
            r.bytes_remaining = remaining;
            r.zero_pages = zero;
            r.dirty_rate = rate;
            r.bandwidth = bw;
            r.expected_downtime_ms = Some(expected.as_millis() as u64);
        });
    }

    async fn stop_and_copy(
        &mut self,
        mut p: Progress,
        pending: DirtyBitmap,
    ) -> Result<(), MigrateOutError> {
        let t0 = Instant::now();
        self.vmm.call("pause", |c| c.pause()).await?;
        self.paused = true;
        let mut dirty = self
            .vmm
            .call("dirty_log_fetch", |c| c.dirty_log_fetch())
            .await?;
        dirty.merge(&pending);
        let ranges = bitmap_ranges(&dirty);
        self.pass(&mut p, &ranges, &[]).await?;
        let vm_state = self.vmm.call("save_state", |c| c.save_state()).await?;
        let mut digest_time = Duration::ZERO;
        let digest = if self.verify {
            let mem = self.mem.clone();
            let t = Instant::now();
            let d = tokio::task::spawn_blocking(move || mem.digest())
                .await
                .map_err(|e| MigrateOutError::Internal {
                    what: format!("digest task: {e}"),
                })?;
            digest_time = t.elapsed();
            Some(d)
        } else {
            None
        };
        let envelope = StateEnvelope {
            spec: self.spec.clone(),
            vm_state,
            digest,
        }
        .encode();
        self.driver
            .switchover(&mut self.session, &self.pages, &envelope, false)
            .await
            .map_err(MigrateOutError::from_driver)?;
        // Done: the guest runs on the target. Nothing here may resume it.
        self.paused = false;
        self.logging = false;
        let downtime = t0.elapsed().saturating_sub(digest_time * 2);
        let verify = self.verify;
        let (passes, sent, zero) = (p.passes, p.bytes_sent, p.zero_pages);
        info!(
            downtime_ms = downtime.as_millis() as u64,
            passes,
            bytes = sent,
            "switched over"
        );
        update(self.handle, |r| {
            r.passes = passes;
            r.bytes_sent = sent;
            r.bytes_remaining = 0;
            r.zero_pages = zero;
            r.actual_downtime_ms = Some((downtime.as_millis() as u64).max(1));
            if verify {
                r.memory_digest_matched = Some(true);
            }
        });
        Ok(())
    }

    /// Undoes what the migration did to the guest here, best effort, and
    /// tells the target (if it still listens) why.
    async fn roll_back(&mut self, e: &MigrateOutError) {
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.driver
                .abort(&mut self.session, e.reason(), &e.to_string()),
        )
        .await;
        if self.logging {
            if let Err(e) = self
                .vmm
                .call("dirty_log_stop", |c| c.dirty_log_stop())
                .await
            {
                warn!(error = %crate::error_chain(&e), "cannot stop dirty logging");
            }
        }
        if self.paused {
            match self.vmm.call("resume", |c| c.resume()).await {
                Ok(()) => info!("guest resumed on the source"),
                Err(e) => warn!(error = %crate::error_chain(&e), "cannot resume the guest"),
            }
        }
    }
}

fn bitmap_ranges(b: &DirtyBitmap) -> Vec<PageRange> {
    b.ranges()
        .map(|r| PageRange::new(r.start, r.count))
        .collect()
}

/// Time to send `bytes` at `bandwidth` bytes/s (unknown bandwidth: never
/// small enough to stop, unless there is nothing left).
pub fn expected_downtime(bytes: u64, bandwidth: f64) -> Duration {
    if bytes == 0 {
        return Duration::ZERO;
    }
    if bandwidth <= 0.0 {
        return Duration::MAX;
    }
    Duration::try_from_secs_f64(bytes as f64 / bandwidth).unwrap_or(Duration::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn downtime_estimate() {
        assert_eq!(expected_downtime(0, 0.0), Duration::ZERO);
        assert_eq!(expected_downtime(1, 0.0), Duration::MAX);
        assert_eq!(
            expected_downtime(100 << 20, (1u64 << 30) as f64),
            Duration::from_secs_f64(100.0 / 1024.0)
        );
    }

    #[test]
    fn codes_are_stable() {
        assert_eq!(MigrateOutError::Cancelled.code(), "aborted");
        let refused = MigrateOutError::Refused {
            code: ReasonCode::VmExists,
            message: "x".into(),
        };
        assert_eq!(refused.code(), "vm_exists");
        assert!(refused.to_string().contains("vm_exists"));
    }
}
