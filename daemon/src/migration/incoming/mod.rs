//! Destination side: accepts peers on the daemon's endpoint and receives
//! their migrations.
//!
//! On `Hello` the VM name is reserved (refused with `vm_exists` if taken),
//! host memory is checked (`not_enough_memory`), a memfd of the guest's
//! layout is created and `migrate-vmm restore --wait-state` is started on
//! it at once, so its start-up is not part of the downtime. Pages go
//! straight into the memfd mapping. On `Switchover` the state is restored
//! into that VMM, the VM is persisted here, the guest is resumed and `Done`
//! is sent. Any failure before the resume kills the VMM and drops the
//! memfd and the reservation: nothing is left behind.
//!
//! The guest running here while pages still arrive (post-copy) is in
//! `postcopy`; failures and the codes the source is told in `error`.

use std::sync::Arc;

use guestmem::GuestMemory;
use tracing::{field, info, info_span, warn, Instrument, Span};
use transport::codec::Hello;
use transport::driver::{DestEvent, DestinationDriver};
use transport::endpoint::{DestinationStreams, Endpoint, PeerConnection};
use transport::session::{DestOptions, DestinationSession, PageSink};

use super::connect_vmm;
use super::guestio::{to_guest_layout, GuestPages, StateEnvelope};
use crate::model::Quantity;
use crate::service::{Service, ServiceError};
use crate::store::VmPaths;
use crate::supervisor::{check_host_memory, VmBackend, VmmSupervisor};
pub use error::MigrateInError;
use postcopy::{Outcome, PostCopy, Resumable};

mod error;
mod postcopy;

/// Accepts peers until the endpoint closes; each peer's migrations run in
/// their own tasks.
pub async fn accept_loop(endpoint: Endpoint, service: Arc<Service>, vmm: VmmSupervisor) {
    let resumable = Resumable::default();
    while let Some(accepted) = endpoint.accept().await {
        let Ok(conn) = accepted else {
            continue; // already logged by the endpoint
        };
        let (service, vmm, resumable) = (service.clone(), vmm.clone(), resumable.clone());
        tokio::spawn(async move { serve_peer(conn, service, vmm, resumable).await });
    }
}

async fn serve_peer(
    conn: PeerConnection,
    service: Arc<Service>,
    vmm: VmmSupervisor,
    resumable: Resumable,
) {
    loop {
        match conn.accept_migration().await {
            Ok(streams) => {
                // A post-copy whose link broke takes its new streams.
                let waiting = resumable
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .get(&streams.id)
                    .cloned();
                if let Some(tx) = waiting {
                    info!(peer = %conn.peer(), "source reconnected to a post-copy migration");
                    let _ = tx.send(streams).await;
                    continue;
                }
                let (service, vmm, resumable) = (service.clone(), vmm.clone(), resumable.clone());
                let peer = conn.peer().to_string();
                tokio::spawn(async move {
                    // The id (the source's migration name) comes with the hello.
                    let span = info_span!("migration", id = field::Empty, role = "target", %peer);
                    receive(streams, service, vmm, resumable)
                        .instrument(span)
                        .await
                });
            }
            Err(e) => {
                info!(peer = %conn.peer(), reason = %e, "peer connection closed");
                return;
            }
        }
    }
}

/// Guest RAM before the hello is accepted: there is none, and the session
/// never writes pages before it accepted.
struct Incoming(Option<GuestPages>);

impl PageSink for Incoming {
    fn write_page(
        &mut self,
        index: transport::layout::PageIndex,
        data: &[u8; transport::layout::PAGE_SIZE],
    ) -> std::io::Result<()> {
        self.get()?.write_page(index, data)
    }
    fn write_zero(
        &mut self,
        start: transport::layout::PageIndex,
        count: u64,
    ) -> std::io::Result<()> {
        self.get()?.write_zero(start, count)
    }
    fn read_back(
        &self,
        index: transport::layout::PageIndex,
        out: &mut [u8; transport::layout::PAGE_SIZE],
    ) -> std::io::Result<()> {
        self.0
            .as_ref()
            .ok_or_else(|| std::io::Error::other("no guest memory yet"))?
            .read_back(index, out)
    }
    fn write_pages(
        &mut self,
        first: transport::layout::PageIndex,
        data: &[u8],
    ) -> std::io::Result<()> {
        self.get()?.write_pages(first, data)
    }
    fn writes_bytes(&self) -> bool {
        self.0.as_ref().is_some_and(|g| g.writes_bytes())
    }
    fn write_bytes(&mut self, at: u64, data: &[u8]) -> std::io::Result<()> {
        self.get()?.write_bytes(at, data)
    }
}

impl Incoming {
    fn get(&mut self) -> std::io::Result<&mut GuestPages> {
        self.0
            .as_mut()
            .ok_or_else(|| std::io::Error::other("no guest memory yet"))
    }
}

/// The guest being received, for clean-up.
pub(crate) struct Prepared {
    name: String,
    paths: VmPaths,
    pid: u32,
    mem: Arc<GuestMemory>,
}

async fn receive(
    streams: DestinationStreams,
    service: Arc<Service>,
    vmm: VmmSupervisor,
    resumable: Resumable,
) {
    let id = streams.id;
    let mut session = DestinationSession::new(DestOptions::default());
    let mut driver = DestinationDriver::new(streams);
    let mut sink = Incoming(None);
    let mut prepared: Option<Prepared> = None;
    let mut state: Option<Vec<u8>> = None;
    let result: Result<(), MigrateInError> = async {
        loop {
            let event = driver
                .next_event(&mut session, &mut sink)
                .await
                .map_err(MigrateInError::Transfer)?;
            match event {
                DestEvent::Hello(hello) => {
                    Span::current().record("id", field::display(&hello.migration_id));
                    let svc = service.clone();
                    let sup = vmm.clone();
                    let prep = tokio::task::spawn_blocking(move || prepare(&hello, &svc, &sup))
                        .await
                        .map_err(|source| MigrateInError::Task {
                            what: "prepare",
                            source,
                        })?;
                    match prep {
                        Ok(p) => {
                            sink.0 = Some(GuestPages(p.mem.clone()));
                            info!(vm = %p.name, pid = p.pid, "accepted incoming migration");
                            prepared = Some(p);
                            let ack = session
                                .accept()
                                .map_err(|source| MigrateInError::Session {
                                    step: "accept",
                                    source,
                                })?;
                            driver
                                .send_control(&ack)
                                .await
                                .map_err(MigrateInError::Transfer)?;
                        }
                        Err(e) => {
                            let (code, message) = (e.reason(), crate::error_chain(&e));
                            warn!(%code, %message, "refusing incoming migration");
                            let refuse = session.refuse(code, &message);
                            let _ = driver.send_control(&refuse).await;
                            // Keep the streams until the source has read it.
                            let _ = driver.next_event(&mut session, &mut sink).await;
                            return Ok(());
                        }
                    }
                }
                DestEvent::PassComplete(end) => {
                    tracing::debug!(pass = end.pass, pages = end.pages_sent, "pass received");
                }
                DestEvent::State(blob) => state = Some(blob),
                DestEvent::SwitchedOver { postcopy: false } => {
                    let (p, blob) = switchover(prepared.as_ref(), &mut state)?;
                    let svc = service.clone();
                    let (name, paths, pid, mem) =
                        (p.name.clone(), p.paths.clone(), p.pid, p.mem.clone());
                    let finished = tokio::task::spawn_blocking(move || {
                        finish(&blob, &name, &paths, pid, &mem, &svc)
                    })
                    .await
                    .map_err(|source| MigrateInError::Task {
                        what: "restore",
                        source,
                    })?;
                    if let Err(e) = finished {
                        let abort = session.refuse(e.reason(), &crate::error_chain(&e));
                        let _ = driver.send_control(&abort).await;
                        return Err(e);
                    }
                    // From here on the guest runs here: no clean-up.
                    prepared = None;
                    let done = session
                        .resumed()
                        .map_err(|source| MigrateInError::Session {
                            step: "report the resume",
                            source,
                        })?;
                    if let Err(e) = driver.send_control(&done).await {
                        warn!(error = %crate::error_chain(&e), "guest runs here but Done was not delivered");
                    }
                    info!("incoming migration complete; guest running");
                    return Ok(());
                }
                DestEvent::SwitchedOver { postcopy: true } => {
                    let (p, blob) = switchover(prepared.as_ref(), &mut state)?;
                    let outcome = PostCopy {
                        session: &mut session,
                        driver,
                        prepared: p,
                        blob,
                        service: service.clone(),
                        id,
                        resumable: resumable.clone(),
                    }
                    .run()
                    .await;
                    return match outcome {
                        Outcome::Complete => {
                            prepared = None;
                            info!("incoming post-copy migration complete");
                            Ok(())
                        }
                        Outcome::FailedBeforeResume(e) => Err(e),
                    };
                }
                other => {
                    return Err(MigrateInError::Unexpected {
                        event: format!("{other:?}"),
                    })
                }
            }
        }
    }
    .await;
    if let Err(e) = &result {
        warn!(error = %crate::error_chain(e), "incoming migration failed");
    }
    if let Some(p) = prepared {
        // Before the resume: the guest still runs on the source.
        let svc = service.clone();
        let _ = tokio::task::spawn_blocking(move || {
            if let Err(e) = vmm.shutdown(&p.paths) {
                warn!(vm = %p.name, error = %crate::error_chain(&e), "cannot stop the pre-started vmm");
            }
            svc.cancel_incoming(&p.name);
        })
        .await;
    }
}

/// What a switchover needs: the prepared guest and the state that came
/// before it.
fn switchover<'a>(
    prepared: Option<&'a Prepared>,
    state: &mut Option<Vec<u8>>,
) -> Result<(&'a Prepared, Vec<u8>), MigrateInError> {
    let p = prepared.ok_or(MigrateInError::Protocol {
        what: "switchover before hello",
    })?;
    let blob = state.take().ok_or(MigrateInError::Protocol {
        what: "switchover without state",
    })?;
    Ok((p, blob))
}

/// Checks, reserves and pre-starts everything for `hello`; the error says
/// what to refuse with.
fn prepare(
    hello: &Hello,
    service: &Service,
    vmm: &VmmSupervisor,
) -> Result<Prepared, MigrateInError> {
    let name = hello.vm_name.clone();
    let bytes = hello.layout.total_bytes();
    let meminfo = std::fs::read_to_string("/proc/meminfo").map_err(MigrateInError::MemInfo)?;
    check_host_memory(Quantity(bytes), &meminfo).map_err(MigrateInError::HostMemory)?;
    service
        .reserve_incoming(&name, Quantity(bytes))
        .map_err(|e| match e {
            ServiceError::VmExists { .. } => MigrateInError::VmExists { name: name.clone() },
            source => MigrateInError::Reserve {
                name: name.clone(),
                source,
            },
        })?;
    let reserved = || -> Result<Prepared, MigrateInError> {
        let layout = to_guest_layout(&hello.layout).map_err(MigrateInError::Layout)?;
        let mem = GuestMemory::create(&name, layout).map_err(MigrateInError::Memory)?;
        let paths = service.store().vm_paths(&name);
        std::fs::create_dir_all(&paths.dir).map_err(|source| MigrateInError::CreateDir {
            path: paths.dir.clone(),
            source,
        })?;
        let pid = vmm
            .spawn_restore(&name, &paths, mem.fd())
            .map_err(MigrateInError::Spawn)?;
        Ok(Prepared {
            name: name.clone(),
            paths,
            pid,
            mem: Arc::new(mem),
        })
    };
    reserved().inspect_err(|_| service.cancel_incoming(&name))
}

/// Checks the state against the hello: it must name the same VM.
fn decode_state(blob: &[u8], name: &str) -> Result<StateEnvelope, MigrateInError> {
    let envelope = StateEnvelope::decode(blob).map_err(MigrateInError::State)?;
    if envelope.spec.name != name {
        return Err(MigrateInError::StateNames {
            state: envelope.spec.name,
            hello: name.into(),
        });
    }
    Ok(envelope)
}

/// Restores the state into the waiting VMM, persists the VM and resumes
/// the guest. Verify mode compares memory digests first.
fn finish(
    blob: &[u8],
    name: &str,
    paths: &VmPaths,
    pid: u32,
    mem: &GuestMemory,
    service: &Service,
) -> Result<(), MigrateInError> {
    let envelope = decode_state(blob, name)?;
    if let Some(expected) = envelope.digest {
        let got = mem.digest();
        if got != expected {
            return Err(MigrateInError::DigestMismatch {
                scope: "whole memory",
                expected: expected.to_string(),
                got: got.to_string(),
            });
        }
        info!(digest = %got, "memory digest matches the source");
    }
    let vmm_err = |step| move |source| MigrateInError::Vmm { step, source };
    let mut client = connect_vmm(&paths.control_socket).map_err(vmm_err("connect"))?;
    client
        .restore(&envelope.vm_state)
        .map_err(vmm_err("restore"))?;
    service
        .complete_incoming(envelope.spec, pid)
        .map_err(MigrateInError::Persist)?;
    if let Err(e) = client.resume() {
        // The VM is persisted but not running: report it failed rather than
        // pretend (the source resumes its copy).
        let _ = service.remove_migrated_vm(name);
        return Err(vmm_err("resume")(e));
    }
    Ok(())
}
