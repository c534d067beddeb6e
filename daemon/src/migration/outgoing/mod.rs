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
//!
//! Auto-converge and the downtime estimate are in `converge`; post-copy
//! (after a switch) in `postcopy`; failures and their codes in `error`.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use guestmem::{DirtyBitmap, GuestMemory};
use tokio::sync::watch;
use tracing::{info, info_span, warn, Instrument};
use transport::driver::SourceDriver;
use transport::endpoint::MigrationId;
use transport::layout::{PageRange, PAGE_SIZE};
use transport::limiter::{BytesPerSecond, RateLimiter};
use transport::session::{Compression, SourceOptions, SourceSession};
use vmm::control::{CallError, ControlClient};

use super::guestio::{holes, page_ranges, to_wire_layout, GuestPages, StateEnvelope};
use super::peers::Peers;
use super::table::MigrationHandle;
use crate::model::{AbortStatus, MigrationPhase, MigrationRecord, Timestamp};
use crate::model::{MigrationConfiguration, ThrottleStep};
use crate::service::Service;
use chunk::{bitmap_ranges, chunk_pages, chunk_ranges};
use converge::{expected_downtime, AutoConverge};
pub use error::MigrateOutError;

mod chunk;
mod converge;
mod error;
mod postcopy;

const PAGE: u64 = PAGE_SIZE as u64;
/// Page streams per migration: enough to keep a loopback or LAN link busy.
const BULK_STREAMS: u16 = 2;
/// Dirty bytes small enough to switch over at once: well under a
/// millisecond on any link a migration uses.
const SWITCHOVER_FLOOR: u64 = 64 * PAGE;
/// Records are persisted (fsync) at most this often while passes run.
const PERSIST_EVERY: Duration = Duration::from_millis(500);
/// Wire rate below which a link counts as slower than compression.
const COMPRESS_BELOW: f64 = 256.0 * 1024.0 * 1024.0;

/// What an outgoing migration needs from the daemon.
pub struct OutgoingContext {
    pub host: String,
    pub peers: Arc<Peers>,
    pub service: Arc<Service>,
    /// The settings this migration runs with (also in its record).
    pub config: MigrationConfiguration,
    /// Becomes true when the user cancels.
    pub cancel: watch::Receiver<bool>,
    /// Becomes true when the user asks for post-copy now.
    pub switch: watch::Receiver<bool>,
    /// Changes when the user asks to resume an interrupted post-copy.
    pub resume: watch::Receiver<u32>,
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
            .map_err(|source| MigrateOutError::Task {
                what: "vmm call",
                source,
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
        super::connect_vmm(&paths.control_socket).map_err(|source| MigrateOutError::Vmm {
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
    let (session, driver, limiter) = tokio::select! {
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
        limiter,
        record: record.clone(),
        verify: record.verify,
        spec: vm.spec,
        started: Instant::now(),
        paused: false,
        logging: false,
        throttled: false,
        committed: false,
        deltas_useless: false,
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

/// The wire id of a migration: its uid's 128 bits (parsed when the
/// record was read, so it cannot be malformed here).
fn migration_id(record: &MigrationRecord) -> MigrationId {
    MigrationId(record.uid.as_u128())
}

/// Connects to the target, opens the migration's streams and says hello.
async fn open_target(
    ctx: &OutgoingContext,
    record: &MigrationRecord,
    handle: &MigrationHandle,
    layout: transport::layout::MemoryLayout,
    pages: &GuestPages,
) -> Result<(SourceSession, SourceDriver, RateLimiter), MigrateOutError> {
    update(handle, |r| r.phase = MigrationPhase::PreparingTarget);
    let conn = ctx
        .peers
        .connect(&record.target_host)
        .await
        .map_err(MigrateOutError::Connect)?;
    let id = migration_id(record);
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
            // Offered always: a switch to post-copy can be asked for at
            // any time, and the target's answer says whether it can.
            postcopy: true,
            ..SourceOptions::default()
        },
    )
    .map_err(|source| MigrateOutError::Session {
        step: "start",
        source,
    })?;
    let limiter = match ctx.config.bandwidth_per_migration.bytes() {
        0 => RateLimiter::unlimited(),
        n => RateLimiter::new(BytesPerSecond(n)),
    };
    let mut driver = SourceDriver::new(streams, limiter.clone());
    driver
        .handshake(&mut session, pages)
        .await
        .map_err(MigrateOutError::from_driver)?;
    // Start with compression only under a cap; passes adjust it.
    let capped = ctx.config.bandwidth_per_migration.bytes() > 0;
    session
        .set_compression(Compression {
            zstd: capped,
            delta: capped,
        })
        .map_err(|source| MigrateOutError::Session {
            step: "set compression",
            source,
        })?;
    Ok((session, driver, limiter))
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
    /// Shared by every driver of this migration (reconnects included).
    limiter: RateLimiter,
    record: MigrationRecord,
    verify: bool,
    spec: crate::model::VmSpec,
    started: Instant,
    paused: bool,
    logging: bool,
    /// Auto-converge has the vCPUs throttled.
    throttled: bool,
    /// The post-copy switchover was sent: the target may run the guest,
    /// so nothing here may resume it any more.
    committed: bool,
    /// A pass showed the guest rewrites whole pages: deltas stay off.
    deltas_useless: bool,
}

/// What one iteration did.
struct Iteration {
    /// Guest bytes of the pages it sent.
    guest_bytes: u64,
    /// Set when it was cut short: why, and the pages it did not send.
    cut: Option<(Cut, DirtyBitmap)>,
}

/// Why an iteration stopped before its end.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Cut {
    /// The user asked for post-copy.
    Switch,
    /// The completion deadline passed.
    Deadline,
}

/// Progress numbers carried from pass to pass.
#[derive(Default)]
struct Progress {
    /// Dirty-pass pages sent as XOR deltas.
    delta_pages: u64,
    /// Pages and wire bytes of the passes after the first.
    dirty_pages: u64,
    dirty_wire: u64,
    /// Iterations over the dirty set (each may be several transport passes).
    passes: u32,
    bytes_sent: u64,
    zero_pages: u64,
    /// Bytes per second, from passes big enough to measure.
    bandwidth: f64,
    dirty_rate: u64,
    last_persist: Option<Instant>,
}

impl Progress {
    /// Copies the counters into the record.
    fn write_to(&self, r: &mut MigrationRecord) {
        r.passes = self.passes;
        r.bytes_sent = self.bytes_sent;
        r.zero_pages = self.zero_pages;
        r.delta_pages = self.delta_pages;
        r.dirty_pass_pages = self.dirty_pages;
        r.dirty_pass_wire_bytes = self.dirty_wire;
        r.dirty_rate = self.dirty_rate;
        r.bandwidth = self.bandwidth as u64;
    }
}

impl Transfer<'_> {
    async fn precopy(&mut self) -> Result<(), MigrateOutError> {
        let c = self.ctx.config.clone();
        let downtime_limit = c.downtime_limit.get();
        let progress_timeout = Duration::from_secs(c.progress_timeout);
        let gib = self.mem.len().div_ceil(1 << 30).max(1);
        let completion_timeout = Duration::from_secs(c.completion_timeout_per_gib * gib);

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
        let deadline = self.started + completion_timeout;
        let mut sent = self
            .iteration(&mut p, page_ranges(data), page_ranges(zero), deadline)
            .await?;
        if let Some((why, unsent)) = sent.cut.take() {
            // Pages of a cut iteration that were not sent are stale on the
            // target; the ones it did send and the guest dirtied again
            // come with the fetch after the pause.
            return self.cut_short(p, why, unsent, completion_timeout).await;
        }
        if c.post_copy_now {
            return self
                .post_copy(p, DirtyBitmap::new(total), "post-copy requested at start")
                .await;
        }

        let mut best_remaining = u64::MAX;
        let mut last_progress = Instant::now();
        let mut converge = AutoConverge::new(&c);
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
            if *self.ctx.switch.borrow() {
                return self.post_copy(p, bitmap, "switch requested").await;
            }
            if remaining < best_remaining {
                best_remaining = remaining;
                last_progress = Instant::now();
            } else if last_progress.elapsed() >= progress_timeout {
                if c.allow_post_copy {
                    return self.post_copy(p, bitmap, "no progress").await;
                }
                return Err(MigrateOutError::ProgressTimeout {
                    timeout: progress_timeout,
                });
            }
            if Instant::now() >= deadline {
                return self
                    .cut_short(p, Cut::Deadline, bitmap, completion_timeout)
                    .await;
            }
            if let Some(pct) = converge.next(sent.guest_bytes, remaining, p.bandwidth) {
                self.set_throttle(&mut p, pct).await?;
            }
            let ranges = bitmap_ranges(&bitmap);
            sent = self.iteration(&mut p, ranges, Vec::new(), deadline).await?;
            if let Some((why, unsent)) = sent.cut.take() {
                return self.cut_short(p, why, unsent, completion_timeout).await;
            }
        }
    }

    /// Pre-copy stopped before converging: post-copy if it was asked for
    /// or is allowed, else the completion timeout.
    async fn cut_short(
        &mut self,
        p: Progress,
        why: Cut,
        pending: DirtyBitmap,
        completion_timeout: Duration,
    ) -> Result<(), MigrateOutError> {
        match why {
            Cut::Switch => self.post_copy(p, pending, "switch requested").await,
            Cut::Deadline if self.ctx.config.allow_post_copy => {
                self.post_copy(p, pending, "completion timeout reached")
                    .await
            }
            Cut::Deadline => Err(MigrateOutError::CompletionTimeout {
                timeout: completion_timeout,
            }),
        }
    }

    /// Sets the vCPU throttle and records the step.
    async fn set_throttle(&mut self, p: &mut Progress, pct: u8) -> Result<(), MigrateOutError> {
        self.vmm.call("throttle", move |c| c.throttle(pct)).await?;
        self.throttled = pct > 0;
        let step = ThrottleStep {
            at_ms: self.started.elapsed().as_millis() as u64,
            percent: pct,
            dirty_rate: p.dirty_rate,
            bandwidth: p.bandwidth as u64,
        };
        info!(
            throttle_pct = pct,
            dirty_rate = step.dirty_rate,
            bandwidth = step.bandwidth,
            "auto-converge throttle"
        );
        update(self.handle, |r| {
            r.throttle_pct = pct;
            r.throttle_steps.push(step);
        });
        Ok(())
    }

    /// Sends one iteration over `pages` (plus known-zero ranges) as
    /// transport passes of at most [`chunk_pages`]. Stops early, at a
    /// pass boundary, when a switch to post-copy is requested or
    /// `deadline` passes.
    async fn iteration(
        &mut self,
        p: &mut Progress,
        pages: Vec<PageRange>,
        zero: Vec<PageRange>,
        deadline: Instant,
    ) -> Result<Iteration, MigrateOutError> {
        let chunk = chunk_pages(self.ctx.config.bandwidth_per_migration.bytes());
        let mut chunks = chunk_ranges(pages, chunk).into_iter();
        let mut zero = zero;
        let mut guest_bytes = 0;
        let mut first = true;
        while let Some(chunk) = chunks.next() {
            let cut = if *self.ctx.switch.borrow() {
                Some(Cut::Switch)
            } else if Instant::now() >= deadline {
                Some(Cut::Deadline)
            } else {
                None
            };
            if let (Some(why), false) = (cut, first) {
                let mut unsent = DirtyBitmap::new(self.mem.layout().total_pages());
                for r in std::iter::once(chunk).chain(chunks).flatten() {
                    unsent.set_range(r.start.0, r.count);
                }
                return Ok(Iteration {
                    guest_bytes,
                    cut: Some((why, unsent)),
                });
            }
            first = false;
            guest_bytes += self.pass(p, &chunk, &std::mem::take(&mut zero)).await?;
        }
        if first {
            // Nothing to send (or only zeros): still one pass, so the
            // target hears about the zero ranges.
            guest_bytes += self.pass(p, &[], &zero).await?;
        }
        p.passes += 1;
        Ok(Iteration {
            guest_bytes,
            cut: None,
        })
    }

    /// One transport pass, cancellable; updates bandwidth and byte counts
    /// and returns the guest bytes it moved.
    async fn pass(
        &mut self,
        p: &mut Progress,
        pages: &[PageRange],
        zero: &[PageRange],
    ) -> Result<u64, MigrateOutError> {
        // `n` is the transport's pass number; `iteration` the record's
        // `passes` (an iteration may take several transport passes).
        let span = info_span!(
            "pass",
            n = self.session.pass_stats().len(),
            iteration = p.passes
        );
        self.send_pass(p, pages, zero).instrument(span).await
    }

    async fn send_pass(
        &mut self,
        p: &mut Progress,
        pages: &[PageRange],
        zero: &[PageRange],
    ) -> Result<u64, MigrateOutError> {
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
        p.bytes_sent += stats.wire_bytes;
        p.zero_pages += stats.zero_pages;
        p.delta_pages += stats.delta_pages;
        if p.passes > 0 {
            p.dirty_pages += stats.pages;
            p.dirty_wire += stats.wire_bytes;
        }
        self.choose_compression(&stats, took);
        info!(
            pass = stats.pass,
            pages = stats.pages,
            zero_pages = stats.zero_pages,
            wire_bytes = stats.wire_bytes,
            ms = (took * 1000.0) as u64,
            "pass sent"
        );
        Ok(moved)
    }

    fn report(&self, p: &mut Progress, remaining: u64, expected: Duration, throttled: bool) {
        if throttled && p.last_persist.is_some_and(|t| t.elapsed() < PERSIST_EVERY) {
            return;
        }
        p.last_persist = Some(Instant::now());
        update(self.handle, |r| {
            p.write_to(r);
            r.bytes_remaining = remaining;
            r.expected_downtime_ms = Some(expected.as_millis() as u64);
        });
    }

    async fn stop_and_copy(
        &mut self,
        mut p: Progress,
        pending: DirtyBitmap,
    ) -> Result<(), MigrateOutError> {
        let t0 = Instant::now();
        let dirty = self.pause(&pending).await?;
        let ranges = bitmap_ranges(&dirty);
        self.pass(&mut p, &ranges, &[]).await?;
        p.passes += 1;
        let vm_state = self.vmm.call("save_state", |c| c.save_state()).await?;
        let mut digest_time = Duration::ZERO;
        let digest = if self.verify {
            let mem = self.mem.clone();
            let t = Instant::now();
            let d = tokio::task::spawn_blocking(move || mem.digest())
                .await
                .map_err(|source| MigrateOutError::Task {
                    what: "digest",
                    source,
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
            post_copy: None,
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
        info!(
            downtime_ms = downtime.as_millis() as u64,
            passes = p.passes,
            bytes = p.bytes_sent,
            "switched over"
        );
        update(self.handle, |r| {
            p.write_to(r);
            r.bytes_remaining = 0;
            r.actual_downtime_ms = Some((downtime.as_millis() as u64).max(1));
            if verify {
                r.memory_digest_matched = Some(true);
            }
        });
        Ok(())
    }

    /// Pauses the guest; returns the pages it dirtied since the last fetch
    /// plus `pending` (pages known stale on the target).
    async fn pause(&mut self, pending: &DirtyBitmap) -> Result<DirtyBitmap, MigrateOutError> {
        self.vmm.call("pause", |c| c.pause()).await?;
        self.paused = true;
        let mut dirty = self
            .vmm
            .call("dirty_log_fetch", |c| c.dirty_log_fetch())
            .await?;
        dirty.merge(pending);
        Ok(dirty)
    }

    /// Compression policy: zstd and XOR deltas cost CPU (zstd ~0.2-0.3
    /// GiB/s per core here) and pay only when the link, not the CPU, is
    /// what limits the transfer: under a bandwidth cap, or on a link
    /// measured slower than [`COMPRESS_BELOW`]. Deltas also go off when a
    /// pass shows the guest rewrites whole pages (they never shrink).
    fn choose_compression(&mut self, stats: &transport::session::PassStats, took: f64) {
        let mut want = self.session.compression();
        let capped = self.ctx.config.bandwidth_per_migration.bytes() > 0;
        if stats.wire_bytes >= 4 << 20 {
            let wire_rate = stats.wire_bytes as f64 / took;
            let link_bound = capped || wire_rate < COMPRESS_BELOW;
            want.zstd = link_bound;
            want.delta = link_bound && !self.deltas_useless;
        }
        if stats.delta_rejected > 1024 && stats.delta_rejected > 9 * stats.delta_pages {
            self.deltas_useless = true;
            want.delta = false;
        }
        if want != self.session.compression() {
            info!(zstd = want.zstd, delta = want.delta, "compression changed");
            if let Err(e) = self.session.set_compression(want) {
                // Not fatal: the pages still go, just less compactly.
                warn!(error = %crate::error_chain(&e), "cannot change compression");
            }
        }
    }

    /// Takes the auto-converge throttle off (abort) and records it.
    async fn remove_throttle(&mut self) {
        match self.vmm.call("throttle", |c| c.throttle(0)).await {
            Ok(()) => {
                self.throttled = false;
                let at_ms = self.started.elapsed().as_millis() as u64;
                update(self.handle, |r| {
                    r.throttle_pct = 0;
                    r.throttle_steps.push(ThrottleStep {
                        at_ms,
                        percent: 0,
                        dirty_rate: 0,
                        bandwidth: 0,
                    });
                });
            }
            Err(e) => warn!(error = %crate::error_chain(&e), "cannot remove the vcpu throttle"),
        }
    }

    /// Undoes what the migration did to the guest here, best effort, and
    /// tells the target (if it still listens) why.
    async fn roll_back(&mut self, e: &MigrateOutError) {
        if self.committed {
            // Post-copy: the target may be running the guest; pausing it
            // here for good is the only safe thing (see `postcopy`).
            warn!(error = %e, "post-copy failed after the switchover; the guest stays paused here");
            return;
        }
        let _ = tokio::time::timeout(
            Duration::from_secs(2),
            self.driver
                .abort(&mut self.session, e.reason(), &e.to_string()),
        )
        .await;
        if self.throttled {
            self.remove_throttle().await;
        }
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
