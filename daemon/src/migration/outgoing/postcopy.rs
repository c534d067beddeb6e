//! Source side of post-copy: pause, hand the guest to the target with the
//! set of pages it lacks, then answer its faults and push the rest until
//! it holds every page.
//!
//! The point of no return is sending the switchover: from then on the
//! target may be running the guest, so this side never resumes it. If the
//! link breaks, the paused guest and the session (which pages the target
//! still lacks) are kept; the target keeps its running guest, whose
//! faulting vCPUs simply wait. This side redials a bounded number of times;
//! after that the record says `post_copy_interrupted` and the task waits
//! for `migratectl migrate --resume`, which dials again. Only when the
//! target answers that it does not hold the migration, and never reported
//! the guest running, is it safe to resume the guest here.

use std::time::{Duration, Instant};

use guestmem::DirtyBitmap;
use tracing::{info, warn};
use transport::codec::PostcopyDigest;
use transport::driver::{DriverError, SourceDriver};
use transport::session::SourceError;

use super::{
    bitmap_ranges, migration_id, update, MigrateOutError, Progress, Transfer, BULK_STREAMS,
};
use crate::migration::guestio::{page_set_digest, PostCopyDigests, StateEnvelope};
use crate::model::{FailureCode, MigrationMode, MigrationPhase, Timestamp};

/// Dial attempts after the link broke, before the record says
/// `post_copy_interrupted` and waits for a manual resume.
const RECONNECT_ATTEMPTS: u32 = 20;
/// How long the target's report may take after its `Done`.
const REPORT_WAIT: Duration = Duration::from_secs(5);
/// Pause between dial attempts (a backoff, not a synchronisation wait).
const RECONNECT_BACKOFF: Duration = Duration::from_millis(500);

/// How a reconnect ended.
enum Reconnect {
    /// The target took the resume: serving goes on.
    Resumed,
    /// The target does not hold the migration.
    Unknown,
    /// Every attempt failed.
    Exhausted(String),
}

impl Transfer<'_> {
    /// Pauses the guest and hands it to the target in post-copy: the
    /// target runs it at once and fetches `pending` (plus whatever the
    /// guest dirtied since the last fetch) from here.
    pub(super) async fn post_copy(
        &mut self,
        mut p: Progress,
        pending: DirtyBitmap,
        why: &'static str,
    ) -> Result<(), MigrateOutError> {
        // A cancel that came first wins; once the mode is PostCopy the
        // service refuses cancels.
        let mut cancelled = false;
        self.handle
            .update(|r| {
                if r.abort_requested {
                    cancelled = true;
                } else {
                    r.mode = MigrationMode::PostCopy;
                }
            })
            .map_err(|source| MigrateOutError::Record {
                what: "the switch to post-copy",
                source,
            })?;
        if cancelled {
            return Err(MigrateOutError::Cancelled);
        }
        info!(why, "switching to post-copy");
        let t0 = Instant::now();
        let needed = self.pause(&pending).await?;
        if self.throttled {
            self.remove_throttle().await;
        }
        let vm_state = self.vmm.call("save_state", |c| c.save_state()).await?;
        let mut digest_time = Duration::ZERO;
        let post_copy = if self.verify {
            let t = Instant::now();
            let (mem, set) = (self.mem.clone(), needed.clone());
            let digests = tokio::task::spawn_blocking(move || {
                Ok::<_, std::io::Error>(PostCopyDigests {
                    present: page_set_digest(&mem, |i| !set.test(i))?,
                    needed: page_set_digest(&mem, |i| set.test(i))?,
                })
            })
            .await
            .map_err(|source| MigrateOutError::Task {
                what: "digest",
                source,
            })?
            .map_err(MigrateOutError::Digest)?;
            digest_time = t.elapsed();
            Some(digests)
        } else {
            None
        };
        let envelope = StateEnvelope {
            spec: self.spec.clone(),
            vm_state,
            digest: None,
            post_copy,
        }
        .encode();
        let missing = bitmap_ranges(&needed);
        let missing_pages = needed.count();
        update(self.handle, |r| {
            p.write_to(r);
            r.bytes_remaining = missing_pages * super::PAGE;
        });
        info!(missing_pages, "sending the state for post-copy");
        self.committed = true;
        let mut result = match self
            .driver
            .switchover_postcopy(&mut self.session, &self.pages, &envelope, &missing)
            .await
        {
            Err(e) if matches!(e, DriverError::Source(_)) && !peer_aborted(&e) => {
                // Our own session refused before writing the switchover:
                // the target never got it, the guest is whole here.
                self.committed = false;
                return Err(MigrateOutError::from_driver(e));
            }
            r => r,
        };
        // The record learns the switchover downtime as soon as the target
        // runs the guest, not when post-copy ends.
        let resumed = self.driver.watch_resumed();
        let handle = self.handle.clone();
        let mut recorder = tokio::spawn(async move {
            if let Ok(at) = resumed.await {
                let downtime = at.saturating_duration_since(t0).saturating_sub(digest_time);
                info!(
                    downtime_ms = downtime.as_millis() as u64,
                    "guest runs on the target"
                );
                update(&handle, |r| {
                    r.actual_downtime_ms = Some((downtime.as_millis() as u64).max(1));
                    r.post_copy_start_timestamp = Some(Timestamp::now());
                });
            }
        });
        let mut downtime_recorded = false;
        loop {
            if result.is_ok() {
                result = self
                    .driver
                    .serve_until_done(&mut self.session, &self.pages)
                    .await
                    .map(|_| ());
            }
            if !downtime_recorded && self.driver.resumed_at().is_some() {
                downtime_recorded = true;
                // The recorder has it (or is about to): let it finish.
                let _ = (&mut recorder).await;
            }
            self.record_post_copy(&mut p);
            let e = match result {
                Ok(()) => break,
                Err(e) => e,
            };
            if !e.is_recoverable() {
                if !downtime_recorded && peer_aborted(&e) {
                    // The target gave up before it ran the guest: it is
                    // still whole here.
                    self.committed = false;
                }
                return Err(MigrateOutError::from_driver(e));
            }
            warn!(error = %crate::error_chain(&e), "link to the target broke in post-copy; reconnecting");
            loop {
                match self.reconnect().await {
                    Reconnect::Resumed => break,
                    Reconnect::Unknown if !downtime_recorded => {
                        self.committed = false;
                        return Err(MigrateOutError::Transfer(e));
                    }
                    Reconnect::Unknown => {
                        self.park("the target no longer holds the migration").await
                    }
                    Reconnect::Exhausted(last) => self.park(&last).await,
                }
            }
            result = Ok(());
        }
        // Every page is on the target and its Done arrived.
        self.paused = false;
        self.logging = false;
        self.committed = false;
        self.record_post_copy(&mut p);
        match self
            .driver
            .postcopy_report(&mut self.session, &self.pages, REPORT_WAIT)
            .await
        {
            Some(r) => {
                let us = |v: u32| (v > 0).then_some(u64::from(v));
                let verify = self.verify;
                info!(
                    requests = r.requests,
                    p50_us = r.p50_us,
                    p99_us = r.p99_us,
                    digest = ?r.digest,
                    "target's post-copy report"
                );
                update(self.handle, |rec| {
                    rec.fault_latency_p50_us = us(r.p50_us);
                    rec.fault_latency_p99_us = us(r.p99_us);
                    if verify {
                        rec.memory_digest_matched = match r.digest {
                            PostcopyDigest::Matched => Some(true),
                            PostcopyDigest::Mismatched => Some(false),
                            PostcopyDigest::NotChecked => None,
                        };
                    }
                });
            }
            None => warn!("the target sent no post-copy report"),
        }
        update(self.handle, |r| r.bytes_remaining = 0);
        Ok(())
    }

    /// Copies the session's post-copy counters into the record.
    fn record_post_copy(&mut self, p: &mut Progress) {
        let s = self.session.postcopy_stats();
        let sent = p.bytes_sent + s.push_bytes + s.pages_served * super::PAGE;
        update(self.handle, |r| {
            r.remote_faults = s.requests_served;
            r.post_copy_pages = s.pages_pushed + s.pages_served;
            r.reconnects = s.resumes as u32;
            r.bytes_sent = sent;
        });
    }

    /// Dials the target again and resumes the session on new streams.
    async fn reconnect(&mut self) -> Reconnect {
        let mut last = String::from("no attempt made");
        for attempt in 1..=RECONNECT_ATTEMPTS {
            tokio::time::sleep(RECONNECT_BACKOFF).await;
            let conn = match self.ctx.peers.connect(&self.record.target_host).await {
                Ok(c) => c,
                Err(e) => {
                    last = crate::error_chain(&e);
                    info!(attempt, error = %last, "target not reachable yet");
                    continue;
                }
            };
            let streams = match conn
                .open_migration(migration_id(&self.record), BULK_STREAMS)
                .await
            {
                Ok(s) => s,
                Err(e) => {
                    last = crate::error_chain(&e);
                    info!(attempt, error = %last, "cannot open streams to the target yet");
                    continue;
                }
            };
            let mut driver = SourceDriver::new(streams, self.limiter.clone());
            match driver.resume(&mut self.session, &self.pages).await {
                Ok(missing) => {
                    info!(attempt, missing, "post-copy resumed on a new connection");
                    self.driver = driver;
                    return Reconnect::Resumed;
                }
                Err(DriverError::Source(SourceError::Refused { code, message })) => {
                    warn!(%code, %message, "the target does not hold this migration");
                    return Reconnect::Unknown;
                }
                Err(e) => {
                    last = crate::error_chain(&e);
                    info!(attempt, error = %last, "resume failed");
                }
            }
        }
        Reconnect::Exhausted(last)
    }

    /// Gives up dialing: records `post_copy_interrupted` (both hosts keep
    /// their part of the guest) and waits for `migratectl migrate
    /// --resume`, which puts the record back to Running.
    async fn park(&mut self, why: &str) {
        let reason = format!(
            "the link to the target broke during post-copy and {RECONNECT_ATTEMPTS} reconnects failed ({why}); \
             the guest is paused here and runs on the target with pages missing; \
             `migratectl migrate --resume {}` continues it",
            self.record.name
        );
        warn!(%reason, "post-copy interrupted");
        update(self.handle, |r| {
            r.fail(FailureCode::PostCopyInterrupted, reason)
        });
        let mut resume = self.ctx.resume.clone();
        let seen = *resume.borrow_and_update();
        let _ = resume.wait_for(|n| *n != seen).await;
        info!("resume requested; dialing the target again");
        update(self.handle, |r| {
            r.phase = MigrationPhase::Running;
            r.failure_code = None;
            r.failure_reason = None;
            r.end_timestamp = None;
        });
    }
}

/// The target aborted the migration itself.
fn peer_aborted(e: &DriverError) -> bool {
    matches!(
        e,
        DriverError::Source(SourceError::PeerAborted { .. } | SourceError::Refused { .. })
    )
}
