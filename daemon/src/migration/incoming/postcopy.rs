//! Destination side of post-copy: the guest runs here while pages still
//! arrive.
//!
//! On the post-copy switchover the pages the source named are punched out
//! of the memfd, the VMM registers guest RAM with userfaultfd and hands
//! the fd over, the state is restored and the guest resumed at once. Then
//! one loop serves three things: faults read from the userfaultfd become
//! page requests on the priority stream (one per page in flight), replies
//! and pushed pages are installed with `UFFDIO_COPY` (which wakes the
//! faulting vCPU), and the session's `Done` ends it when nothing is
//! missing.
//!
//! A fault on a page the source never named is a hole of the memfd (a
//! page the guest never wrote): it gets a zero page. Pages are never read
//! through the daemon's own mapping here: reading a hole would fill it and
//! hide it from userfaultfd.
//!
//! If the link breaks, the session keeps its missing set and outstanding
//! requests, faulting vCPUs wait in the kernel, and this task waits (with
//! no deadline: only the source holds the missing pages) for the source to
//! dial again; the endpoint's accept loop routes the new streams here by
//! migration id.

use std::collections::{HashMap, HashSet};
use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use guestmem::uffd::Pager;
use guestmem::DirtyBitmap;
use tokio::io::unix::AsyncFd;
use tokio::io::Interest;
use tokio::sync::mpsc;
use tracing::{info, warn};
use transport::codec::{Frame, PostcopyDigest, PostcopyReport};
use transport::driver::{DestEvent, DestinationDriver};
use transport::endpoint::{DestinationStreams, MigrationId};
use transport::layout::{PageIndex, PAGE_SIZE};
use transport::session::{DestinationSession, PageSink};
use vmm::control::ControlClient;

use super::{decode_state, MigrateInError, Prepared};
use crate::migration::connect_vmm;
use crate::migration::guestio::{page_digest, page_set_digest};
use crate::service::Service;

/// Post-copy migrations that can take a resumed connection, by id.
pub type Resumable = Arc<Mutex<HashMap<MigrationId, mpsc::Sender<DestinationStreams>>>>;

/// How often a broken post-copy logs that it still waits for the source.
const WAIT_LOG_EVERY: Duration = Duration::from_secs(30);

/// Writes pages into guest RAM through the userfaultfd (each install wakes
/// whoever waits for the page) and sums the digest of what it installed.
struct PagerSink {
    pager: Arc<Pager>,
    /// Wrapping sum of the installed pages' digests (verify mode).
    digest: Option<u128>,
}

impl PagerSink {
    fn add(&mut self, first: u64, data: &[u8]) {
        if let Some(sum) = &mut self.digest {
            for (i, page) in data.chunks_exact(PAGE_SIZE).enumerate() {
                if let Ok(page) = <&[u8; PAGE_SIZE]>::try_from(page) {
                    *sum = sum.wrapping_add(page_digest(first + i as u64, page));
                }
            }
        }
    }
}

impl PageSink for PagerSink {
    fn write_page(&mut self, index: PageIndex, data: &[u8; PAGE_SIZE]) -> std::io::Result<()> {
        self.write_pages(index, data)
    }

    fn write_zero(&mut self, start: PageIndex, count: u64) -> std::io::Result<()> {
        self.pager
            .install_zero(start.0, count)
            .map_err(std::io::Error::other)?;
        if let Some(sum) = &mut self.digest {
            let zero = [0u8; PAGE_SIZE];
            for i in start.0..start.0 + count {
                *sum = sum.wrapping_add(page_digest(i, &zero));
            }
        }
        Ok(())
    }

    fn write_pages(&mut self, first: PageIndex, data: &[u8]) -> std::io::Result<()> {
        self.pager
            .install(first.0, data)
            .map_err(std::io::Error::other)?;
        self.add(first.0, data);
        Ok(())
    }
}

/// The userfaultfd as something tokio can poll.
struct FaultFd(Arc<Pager>);

impl AsRawFd for FaultFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.as_raw_fd()
    }
}

/// What the caller still owns after a post-copy ended.
pub enum Outcome {
    /// Every page arrived; the guest runs here for good.
    Complete,
    /// Failed before the guest ran here: clean up as for pre-copy.
    FailedBeforeResume(MigrateInError),
}

/// Everything a post-copy needs from `receive`.
pub struct PostCopy<'a> {
    pub session: &'a mut DestinationSession,
    pub driver: DestinationDriver,
    pub prepared: &'a Prepared,
    pub blob: Vec<u8>,
    pub service: Arc<Service>,
    pub id: MigrationId,
    pub resumable: Resumable,
}

impl PostCopy<'_> {
    /// Runs the post-copy to the end (see the module doc).
    pub async fn run(mut self) -> Outcome {
        let (tx, mut rx) = mpsc::channel(1);
        self.resumable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(self.id, tx);
        let outcome = self.serve(&mut rx).await;
        self.resumable
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
        outcome
    }

    async fn serve(&mut self, resumed: &mut mpsc::Receiver<DestinationStreams>) -> Outcome {
        let p = self.prepared;
        let envelope = match decode_state(&self.blob, &p.name) {
            Ok(e) => e,
            Err(e) => return self.fail(e).await,
        };
        let missing = self.session.missing_ranges();
        let missing_pages: u64 = missing.iter().map(|r| r.count).sum();
        info!(missing_pages, "post-copy switchover");
        // Stale pages out, so that the guest's first touch faults.
        for r in &missing {
            if let Err(e) = p.mem.punch_hole(r.start.0, r.count) {
                return self.fail(MigrateInError::Memory(e)).await;
            }
        }
        if let Some(d) = envelope.post_copy {
            let mem = p.mem.clone();
            let mut set = DirtyBitmap::new(mem.layout().total_pages());
            for r in &missing {
                set.set_range(r.start.0, r.count);
            }
            let got =
                tokio::task::spawn_blocking(move || page_set_digest(&mem, |i| !set.test(i))).await;
            match got {
                Ok(Ok(got)) if got == d.present => {
                    info!("pages held before the switchover match the source")
                }
                Ok(Ok(got)) => {
                    let e = MigrateInError::DigestMismatch {
                        scope: "pages held before the switchover",
                        expected: format!("{:032x}", d.present),
                        got: format!("{got:032x}"),
                    };
                    return self.fail(e).await;
                }
                Ok(Err(e)) => return self.fail(MigrateInError::Digest(e)).await,
                Err(source) => {
                    let e = MigrateInError::Task {
                        what: "digest",
                        source,
                    };
                    return self.fail(e).await;
                }
            }
        }
        let paths = p.paths.clone();
        let layout = p.mem.layout().clone();
        let pager = tokio::task::spawn_blocking(
            move || -> Result<(ControlClient, Pager), MigrateInError> {
                let vmm_err = |step| move |source| MigrateInError::Vmm { step, source };
                let mut client = connect_vmm(&paths.control_socket).map_err(vmm_err("connect"))?;
                let (fd, regions) = client.userfaultfd().map_err(vmm_err("userfaultfd"))?;
                let pager = Pager::new(fd, &layout, regions).map_err(MigrateInError::Pager)?;
                Ok((client, pager))
            },
        )
        .await;
        let (client, pager) = match pager {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => return self.fail(e).await,
            Err(source) => {
                let e = MigrateInError::Task {
                    what: "userfaultfd",
                    source,
                };
                return self.fail(e).await;
            }
        };
        let pager = Arc::new(pager);
        // `AsyncFd::new` is deprecated for callers that might close the fd
        // under it; `FaultFd` holds an `Arc` of the pager, which owns the
        // fd, so it stays open and the same for the AsyncFd's whole life
        // (and this crate forbids the `unsafe` of `register`).
        #[allow(deprecated)]
        let registered = AsyncFd::with_interest(FaultFd(pager.clone()), Interest::READABLE);
        let faults = match registered {
            Ok(f) => f,
            Err(e) => return self.fail(MigrateInError::Poll(e)).await,
        };
        let mut sink = PagerSink {
            pager: pager.clone(),
            digest: envelope.post_copy.map(|_| 0),
        };
        // Restore and resume run beside the fault loop: the VMM touches
        // guest RAM while restoring, and those faults need serving too.
        let svc = self.service.clone();
        let (name, pid) = (p.name.clone(), p.pid);
        let spec = envelope.spec.clone();
        let vm_state = envelope.vm_state.clone();
        let mut restore = tokio::task::spawn_blocking(move || {
            let mut client = client;
            client
                .restore(&vm_state)
                .map_err(|source| MigrateInError::Vmm {
                    step: "restore",
                    source,
                })?;
            svc.complete_incoming(spec, pid)
                .map_err(MigrateInError::Persist)?;
            if let Err(source) = client.resume() {
                let _ = svc.remove_migrated_vm(&name);
                return Err(MigrateInError::Vmm {
                    step: "resume",
                    source,
                });
            }
            Ok(client)
        });
        let mut running: Option<ControlClient> = None;
        let mut in_flight: HashSet<u64> = HashSet::new();
        let mut fault_buf = Vec::new();
        loop {
            let event = tokio::select! {
                r = &mut restore, if running.is_none() => {
                    match r {
                        Ok(Ok(c)) => {
                            running = Some(c);
                            if let Err(e) = self.driver.resumed(self.session).await {
                                // The guest runs here now: a broken link is
                                // recovered below like any other.
                                warn!(error = %crate::error_chain(&e), "cannot tell the source the guest runs");
                            }
                            info!("guest resumed here in post-copy");
                        }
                        Ok(Err(e)) => return self.fail(e).await,
                        Err(source) => {
                            let e = MigrateInError::Task { what: "restore", source };
                            return self.fail(e).await;
                        }
                    }
                    continue;
                }
                guard = faults.readable() => {
                    let mut guard = match guard {
                        Ok(g) => g,
                        Err(e) => {
                            warn!(error = %e, "cannot poll the userfaultfd");
                            continue;
                        }
                    };
                    fault_buf.clear();
                    match pager.read_faults(&mut fault_buf) {
                        Ok(0) => guard.clear_ready(),
                        Ok(_) => {}
                        Err(e) => warn!(error = %crate::error_chain(&e), "cannot read faults"),
                    }
                    drop(guard);
                    for &page in &fault_buf {
                        if self.session.is_missing(PageIndex(page)) {
                            if in_flight.insert(page) {
                                // A lost link keeps the request in the
                                // session; resume sends it again.
                                let _ = self.driver.send_page_request(self.session, PageIndex(page), 1).await;
                            }
                        } else if let Err(e) = pager.install_zero(page, 1) {
                            // A hole of the memfd (never written), or a page
                            // installed since the fault was queued.
                            warn!(page, error = %crate::error_chain(&e), "cannot serve a fault");
                        }
                    }
                    continue;
                }
                ev = self.driver.next_event(self.session, &mut sink) => ev,
            };
            match event {
                Ok(DestEvent::PageReply { index, count, .. }) => {
                    for i in index.0..index.0 + u64::from(count) {
                        in_flight.remove(&i);
                    }
                }
                Ok(DestEvent::PostcopyComplete) => break,
                Ok(DestEvent::PassComplete(_)) => {}
                Ok(other) => {
                    warn!(event = ?other, "unexpected event in post-copy");
                }
                Err(e) if running.is_none() && !e.is_recoverable() => {
                    return self.fail(MigrateInError::Transfer(e)).await;
                }
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), "link to the source broke in post-copy; waiting for it to reconnect");
                    self.wait_for_source(resumed, &mut sink).await;
                }
            }
        }
        let stats = self.session.postcopy_stats();
        let latency = self.driver.request_latency();
        info!(
            requests = stats.requests,
            from_replies = stats.pages_from_replies,
            from_push = stats.pages_from_push,
            p50_us = latency.p50.map(|d| d.as_micros() as u64),
            p99_us = latency.p99.map(|d| d.as_micros() as u64),
            "post-copy complete: every page is here"
        );
        let mut digest = PostcopyDigest::NotChecked;
        if let (Some(d), Some(got)) = (envelope.post_copy, sink.digest) {
            if got == d.needed {
                digest = PostcopyDigest::Matched;
                info!("pages received in post-copy match the source");
            } else {
                digest = PostcopyDigest::Mismatched;
                warn!(
                    source = %format!("{:032x}", d.needed),
                    target = %format!("{got:032x}"),
                    "memory digest mismatch: pages received in post-copy differ from the source"
                );
            }
        }
        let us =
            |d: Option<Duration>| d.map_or(0, |d| u32::try_from(d.as_micros()).unwrap_or(u32::MAX));
        let report = Frame::PostcopyReport(PostcopyReport {
            requests: stats.requests,
            p50_us: us(latency.p50),
            p99_us: us(latency.p99),
            max_us: us(latency.max),
            digest,
        });
        if let Err(e) = self.driver.send_control(&report).await {
            warn!(error = %crate::error_chain(&e), "cannot send the post-copy report");
        }
        if let Some(mut client) = running {
            let _ = tokio::task::spawn_blocking(move || client.userfaultfd_release()).await;
        }
        Outcome::Complete
    }

    /// Waits for the source to dial again and resumes the session on the
    /// new streams. Never gives up: the missing pages exist only there.
    async fn wait_for_source(
        &mut self,
        resumed: &mut mpsc::Receiver<DestinationStreams>,
        sink: &mut PagerSink,
    ) {
        if let Err(e) = self.session.prepare_resume() {
            warn!(error = %crate::error_chain(&e), "cannot prepare the session for a resume");
        }
        loop {
            let streams = match tokio::time::timeout(WAIT_LOG_EVERY, resumed.recv()).await {
                Ok(Some(s)) => s,
                Ok(None) => return,
                Err(_) => {
                    warn!(
                        missing = self.session.missing_count(),
                        "still waiting for the source to reconnect; the guest waits for its missing pages"
                    );
                    continue;
                }
            };
            let mut driver = DestinationDriver::new(streams);
            match driver.resume(self.session, sink).await {
                Ok(missing) => {
                    info!(missing, "post-copy resumed on a new connection");
                    self.driver = driver;
                    return;
                }
                Err(e) => {
                    warn!(error = %crate::error_chain(&e), "resume attempt failed; waiting for another");
                }
            }
        }
    }

    /// Fails before the guest ran here: tells the source (which then
    /// resumes its copy) and leaves the clean-up to the caller.
    async fn fail(&mut self, e: MigrateInError) -> Outcome {
        let abort = self.session.refuse(e.reason(), &crate::error_chain(&e));
        let _ = self.driver.send_control(&abort).await;
        Outcome::FailedBeforeResume(e)
    }
}
