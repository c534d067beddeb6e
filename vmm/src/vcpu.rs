//! vCPU threads. Each vCPU runs on its own std thread that owns its
//! `VcpuFd` and loops on `KVM_RUN`; the rest of the VMM talks to it with
//! Firecracker's pattern: a bounded [`VcpuEvent`] channel in, a bounded
//! [`VcpuResponse`] channel out, and a kick (a real-time signal whose handler
//! sets `kvm_run.immediate_exit`) to get the thread out of `KVM_RUN`.
//!
//! Why the handler sets `immediate_exit`: a signal that lands after the
//! thread checked its channel but before it entered `KVM_RUN` would
//! otherwise be lost and the vCPU would keep running. With the flag set,
//! that next `KVM_RUN` returns `EINTR` at once, the thread clears the flag
//! and looks at its channel again.
//!
//! Waits inside the thread (the workload's Sleep port, throttle sleeps, the
//! paused state) are `recv`s on the event channel, so a pause request ends
//! them at once.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::ptr;
use std::sync::atomic::{AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use kvm_bindings::kvm_run;
use kvm_ioctls::{VcpuExit, VcpuFd};
use tracing::{debug, error, info, warn};
use vmm_sys_util::errno;
use vmm_sys_util::signal::{register_signal_handler, SIGRTMIN};

use crate::ratelimit::RateLimit;
use crate::serial::SerialConsole;
use crate::state::{save_vcpu, SaveVcpuError, VcpuState};
use crate::workload::{decode_port_io, PortEvent};

/// Offset from SIGRTMIN of the signal that kicks vCPUs out of `KVM_RUN`.
const KICK_SIGNAL_OFFSET: i32 = 0;
/// Longest sleep one Sleep port write gets.
const MAX_GUEST_SLEEP: Duration = Duration::from_secs(1);
/// Length of one throttle time slice.
pub const THROTTLE_SLICE: Duration = Duration::from_millis(10);

thread_local! {
    /// The running vCPU's `kvm_run` page, for the kick signal handler.
    static KVM_RUN_PTR: Cell<*mut kvm_run> = const { Cell::new(ptr::null_mut()) };
}

extern "C" fn handle_kick(_: libc::c_int, _: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // Only async-signal-safe work here: a TLS read and one volatile store.
    let _ = KVM_RUN_PTR.try_with(|p| {
        let run = p.get();
        if !run.is_null() {
            // SAFETY: `run` is set by the vCPU thread (the one this handler
            // interrupts, since kicks are sent with pthread_kill) to its own
            // mmapped kvm_run page while it owns the VcpuFd, and reset to
            // null before the VcpuFd is dropped; so it points to live memory.
            unsafe { ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
        }
    });
}

/// The kick signal number.
pub fn kick_signal() -> i32 {
    SIGRTMIN() + KICK_SIGNAL_OFFSET
}

/// Installs the kick signal handler (once per process; later calls return
/// the first result).
pub fn register_kick_signal() -> Result<(), errno::Error> {
    static REGISTERED: OnceLock<Result<(), errno::Error>> = OnceLock::new();
    *REGISTERED.get_or_init(|| register_signal_handler(kick_signal(), handle_kick))
}

/// Sends the kick signal to a vCPU thread.
pub fn kick_thread(thread: libc::pthread_t) {
    // SAFETY: `thread` comes from a JoinHandle that has not been joined (the
    // callers keep the handle until after their last kick), so the pthread_t
    // still names a live or zombie thread, for which pthread_kill is defined.
    let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
    if rc != 0 {
        debug!(rc, "kick failed (thread already gone)");
    }
}

/// State shared by all vCPU threads of a VM and read by the control side.
pub struct VcpuShared {
    pub serial: Arc<SerialConsole>,
    /// 0 = off, else percentage of time the vCPUs sleep.
    pub throttle_pct: AtomicU8,
    pub pass_events: AtomicU64,
    pub corrupt_events: AtomicU64,
    /// Time all vCPUs together spent in throttle sleeps.
    pub throttled_ns: AtomicU64,
    /// The first crash reason, if any vCPU crashed.
    crash: Mutex<Option<String>>,
    unknown_port_log: RateLimit,
    corrupt_log: RateLimit,
}

impl VcpuShared {
    pub fn new(serial: Arc<SerialConsole>) -> Self {
        VcpuShared {
            serial,
            throttle_pct: AtomicU8::new(0),
            pass_events: AtomicU64::new(0),
            corrupt_events: AtomicU64::new(0),
            throttled_ns: AtomicU64::new(0),
            crash: Mutex::new(None),
            unknown_port_log: RateLimit::new(),
            corrupt_log: RateLimit::new(),
        }
    }

    /// Why the guest crashed, if it did.
    pub fn crash_reason(&self) -> Option<String> {
        self.crash
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn set_crashed(&self, id: u32, reason: String) {
        error!(vcpu = id, %reason, "guest crashed");
        let mut c = self.crash.lock().unwrap_or_else(PoisonError::into_inner);
        if c.is_none() {
            *c = Some(format!("vcpu {id}: {reason}"));
        }
    }
}

/// A request to a vCPU thread.
#[derive(Debug)]
pub enum VcpuEvent {
    Pause,
    Resume,
    /// Only while paused: capture the vCPU's KVM state on its own thread.
    SaveState,
    Exit,
}

/// A vCPU thread's answer to a [`VcpuEvent`].
#[derive(Debug)]
pub enum VcpuResponse {
    Paused,
    Resumed,
    Saved(Result<Box<VcpuState>, SaveOnVcpuError>),
    Exited,
}

/// Saving on the vCPU thread failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveOnVcpuError {
    #[error("vcpu is not paused")]
    NotPaused,
    #[error("cannot save vcpu state")]
    Save(#[source] SaveVcpuError),
}

/// Talking to a vCPU thread failed.
#[derive(Debug, thiserror::Error)]
pub enum VcpuCommError {
    #[error("vcpu {id} thread is gone")]
    Gone { id: u32 },
    #[error("vcpu {id} has not taken its previous event")]
    Busy { id: u32 },
    #[error("vcpu {id} did not answer within {timeout:?}")]
    Timeout { id: u32, timeout: Duration },
}

/// Starting a vCPU thread failed.
#[derive(Debug, thiserror::Error)]
pub enum SpawnVcpuError {
    #[error("cannot register the vcpu kick signal")]
    Signal(#[source] errno::Error),
    #[error("cannot spawn the thread of vcpu {id}")]
    Thread {
        id: u32,
        #[source]
        source: std::io::Error,
    },
}

/// The control side's handle on one vCPU thread.
pub struct VcpuHandle {
    id: u32,
    events: SyncSender<VcpuEvent>,
    responses: Receiver<VcpuResponse>,
    thread: Option<JoinHandle<()>>,
}

impl VcpuHandle {
    /// Starts the thread for vCPU `id`, paused or running.
    pub fn spawn(
        id: u32,
        fd: VcpuFd,
        shared: Arc<VcpuShared>,
        start_paused: bool,
    ) -> Result<Self, SpawnVcpuError> {
        register_kick_signal().map_err(SpawnVcpuError::Signal)?;
        // Capacity 1 each way: the control side sends one event and waits
        // for its answer before sending the next.
        let (ev_tx, ev_rx) = mpsc::sync_channel(1);
        let (resp_tx, resp_rx) = mpsc::sync_channel(1);
        let thread = VcpuThread {
            id,
            fd,
            shared,
            events: ev_rx,
            responses: resp_tx,
            paused: start_paused,
            halted: false,
        };
        let handle = std::thread::Builder::new()
            .name(format!("vcpu{id}"))
            .spawn(move || thread.run())
            .map_err(|source| SpawnVcpuError::Thread { id, source })?;
        Ok(VcpuHandle {
            id,
            events: ev_tx,
            responses: resp_rx,
            thread: Some(handle),
        })
    }

    /// The vCPU id.
    pub fn id(&self) -> u32 {
        self.id
    }

    /// The thread, for kicking it from elsewhere (see [`kick_thread`]).
    pub fn pthread(&self) -> Option<libc::pthread_t> {
        self.thread.as_ref().map(|t| t.as_pthread_t())
    }

    /// Kicks the thread out of `KVM_RUN` (or out of its next one).
    pub fn kick(&self) {
        if let Some(t) = self.pthread() {
            kick_thread(t);
        }
    }

    /// Sends `ev` and kicks the thread so that it sees it promptly. Never
    /// blocks: the control side sends one event at a time, so a full
    /// channel means the vCPU has not taken the previous one.
    pub fn send(&self, ev: VcpuEvent) -> Result<(), VcpuCommError> {
        self.events.try_send(ev).map_err(|e| match e {
            TrySendError::Full(_) => VcpuCommError::Busy { id: self.id },
            TrySendError::Disconnected(_) => VcpuCommError::Gone { id: self.id },
        })?;
        self.kick();
        Ok(())
    }

    /// Waits for the thread's answer.
    pub fn recv(&self, timeout: Duration) -> Result<VcpuResponse, VcpuCommError> {
        self.responses.recv_timeout(timeout).map_err(|e| match e {
            RecvTimeoutError::Timeout => VcpuCommError::Timeout {
                id: self.id,
                timeout,
            },
            RecvTimeoutError::Disconnected => VcpuCommError::Gone { id: self.id },
        })
    }

    /// Waits for the thread to finish after it was sent [`VcpuEvent::Exit`]
    /// and joins it. A thread that does not acknowledge within `timeout` is
    /// left behind rather than hanging the caller.
    pub fn join(mut self, timeout: Duration) {
        let Some(t) = self.thread.take() else { return };
        loop {
            match self.recv(timeout) {
                Ok(VcpuResponse::Exited) | Err(VcpuCommError::Gone { .. }) => break,
                // A late answer to an earlier request.
                Ok(_) => continue,
                Err(e) => {
                    error!(vcpu = self.id, error = %e, "vcpu thread does not stop");
                    return;
                }
            }
        }
        if t.join().is_err() {
            error!(vcpu = self.id, "vcpu thread panicked");
        }
    }
}

/// What to do after handling an event.
#[derive(Copy, Clone, PartialEq, Eq)]
enum Flow {
    Continue,
    Exit,
}

/// What a VM exit asks of the run loop.
enum ExitAction {
    Continue,
    Sleep(Duration),
    Crash(String),
}

struct VcpuThread {
    id: u32,
    fd: VcpuFd,
    shared: Arc<VcpuShared>,
    events: Receiver<VcpuEvent>,
    responses: SyncSender<VcpuResponse>,
    paused: bool,
    /// Crashed: stays stopped whatever it is asked, but still answers.
    halted: bool,
}

impl VcpuThread {
    fn run(mut self) {
        let run_ptr: *mut kvm_run = self.fd.get_kvm_run();
        KVM_RUN_PTR.with(|p| p.set(run_ptr));
        debug!(vcpu = self.id, paused = self.paused, "vcpu thread started");
        self.run_loop();
        KVM_RUN_PTR.with(|p| p.set(ptr::null_mut()));
        debug!(vcpu = self.id, "vcpu thread exiting");
    }

    fn run_loop(&mut self) {
        let mut slice_start = Instant::now();
        loop {
            if self.paused || self.halted {
                let Ok(ev) = self.events.recv() else { return };
                if self.handle_event(ev) == Flow::Exit {
                    return;
                }
                slice_start = Instant::now();
                continue;
            }
            match self.events.try_recv() {
                Ok(ev) => {
                    if self.handle_event(ev) == Flow::Exit {
                        return;
                    }
                    continue;
                }
                Err(TryRecvError::Empty) => {}
                Err(TryRecvError::Disconnected) => return,
            }
            let action = match self.fd.run() {
                Ok(exit) => handle_exit(self.id, &self.shared, exit),
                Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                    // A kick: clear the flag the handler set, then re-check
                    // the channel at the top of the loop.
                    self.fd.set_kvm_immediate_exit(0);
                    ExitAction::Continue
                }
                Err(e) => ExitAction::Crash(format!("KVM_RUN failed: {e}")),
            };
            match action {
                ExitAction::Continue => {}
                ExitAction::Sleep(d) => {
                    if self.wait(d) == Flow::Exit {
                        return;
                    }
                }
                ExitAction::Crash(reason) => {
                    let reason = format!("{reason}{}", self.where_stopped());
                    self.shared.set_crashed(self.id, reason);
                    self.halted = true;
                    continue;
                }
            }
            let pct = self.shared.throttle_pct.load(Ordering::Relaxed);
            let ran = slice_start.elapsed();
            if pct > 0 && ran >= THROTTLE_SLICE {
                let asleep = Instant::now();
                let flow = self.wait(throttle_sleep(ran, pct));
                self.shared
                    .throttled_ns
                    .fetch_add(asleep.elapsed().as_nanos() as u64, Ordering::Relaxed);
                if flow == Flow::Exit {
                    return;
                }
                slice_start = Instant::now();
            } else if pct == 0 && ran >= THROTTLE_SLICE {
                slice_start = Instant::now();
            }
        }
    }

    /// Where the vCPU stopped, for crash reports.
    fn where_stopped(&self) -> String {
        match (self.fd.get_regs(), self.fd.get_sregs()) {
            (Ok(r), Ok(s)) => format!(
                " at rip {:#x} rsp {:#x} rflags {:#x} (cs {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x})",
                r.rip, r.rsp, r.rflags, s.cs.selector, s.cr0, s.cr3, s.cr4, s.efer
            ),
            _ => String::new(),
        }
    }

    /// Sleeps up to `d`, cut short by any event (which is then handled).
    fn wait(&mut self, d: Duration) -> Flow {
        match self.events.recv_timeout(d) {
            Ok(ev) => self.handle_event(ev),
            Err(RecvTimeoutError::Timeout) => Flow::Continue,
            Err(RecvTimeoutError::Disconnected) => Flow::Exit,
        }
    }

    fn respond(&self, r: VcpuResponse) {
        // The control side may have given up waiting (timeout) and gone; a
        // full or closed channel must not block the vCPU.
        let _ = self.responses.try_send(r);
    }

    fn handle_event(&mut self, ev: VcpuEvent) -> Flow {
        match ev {
            VcpuEvent::Pause => {
                self.paused = true;
                self.respond(VcpuResponse::Paused);
            }
            VcpuEvent::Resume => {
                self.paused = false;
                self.respond(VcpuResponse::Resumed);
            }
            VcpuEvent::SaveState => {
                let r = if self.paused {
                    save_vcpu(&self.fd)
                        .map(Box::new)
                        .map_err(SaveOnVcpuError::Save)
                } else {
                    Err(SaveOnVcpuError::NotPaused)
                };
                self.respond(VcpuResponse::Saved(r));
            }
            VcpuEvent::Exit => {
                self.respond(VcpuResponse::Exited);
                return Flow::Exit;
            }
        }
        Flow::Continue
    }
}

/// How long to sleep after running `ran` with throttle `pct`, so that the
/// vCPU sleeps `pct`% of wall time (QEMU's cpu-throttle formula).
pub fn throttle_sleep(ran: Duration, pct: u8) -> Duration {
    let pct = u32::from(pct.min(99));
    ran * pct / (100 - pct)
}

fn handle_exit(id: u32, shared: &VcpuShared, exit: VcpuExit<'_>) -> ExitAction {
    match exit {
        VcpuExit::IoOut(port, data) => {
            if SerialConsole::handles(port) {
                shared.serial.pio_write(port, data);
                return ExitAction::Continue;
            }
            match decode_port_io(port, data) {
                PortEvent::Started { vcpu } => {
                    info!(vcpu, "workload started");
                }
                PortEvent::PassDone { vcpu, pass } => {
                    shared.pass_events.fetch_add(1, Ordering::Relaxed);
                    debug!(vcpu, pass, "pass done");
                }
                PortEvent::Corrupt { vcpu, gpa } => {
                    shared.corrupt_events.fetch_add(1, Ordering::Relaxed);
                    if shared.corrupt_log.allow() {
                        error!(vcpu, gpa = gpa.0, "guest reports CORRUPT page");
                    }
                }
                PortEvent::Sleep { micros } => {
                    // The guest asks; it does not get to park a vCPU for
                    // an hour.
                    let d = Duration::from_micros(u64::from(micros)).min(MAX_GUEST_SLEEP);
                    return ExitAction::Sleep(d);
                }
                PortEvent::Unknown { port } => {
                    if shared.unknown_port_log.allow() {
                        warn!(vcpu = id, port, "out to unknown port");
                    }
                }
            }
            ExitAction::Continue
        }
        VcpuExit::IoIn(port, data) => {
            if SerialConsole::handles(port) {
                shared.serial.pio_read(port, data);
            } else {
                // Like an empty ISA bus.
                data.fill(0xff);
            }
            ExitAction::Continue
        }
        VcpuExit::MmioRead(addr, data) => {
            if shared.unknown_port_log.allow() {
                warn!(vcpu = id, addr, "mmio read outside RAM");
            }
            data.fill(0xff);
            ExitAction::Continue
        }
        VcpuExit::MmioWrite(addr, _) => {
            if shared.unknown_port_log.allow() {
                warn!(vcpu = id, addr, "mmio write outside RAM");
            }
            ExitAction::Continue
        }
        VcpuExit::Hlt => ExitAction::Crash("guest halted (KVM_EXIT_HLT)".into()),
        VcpuExit::Shutdown => ExitAction::Crash("guest triple fault (KVM_EXIT_SHUTDOWN)".into()),
        VcpuExit::FailEntry(reason, cpu) => ExitAction::Crash(format!(
            "KVM entry failed (hardware reason {reason:#x}, cpu {cpu})"
        )),
        VcpuExit::InternalError => ExitAction::Crash("KVM internal error".into()),
        VcpuExit::SystemEvent(kind, _) => ExitAction::Crash(format!("guest system event {kind}")),
        VcpuExit::Intr => ExitAction::Continue,
        other => ExitAction::Crash(format!("unexpected exit {other:?}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn throttle_sleep_matches_qemu_formula() {
        let ran = Duration::from_millis(10);
        assert_eq!(throttle_sleep(ran, 50), Duration::from_millis(10));
        assert_eq!(throttle_sleep(ran, 75), Duration::from_millis(30));
        assert_eq!(throttle_sleep(ran, 99), Duration::from_millis(990));
        assert_eq!(throttle_sleep(ran, 0), Duration::ZERO);
        // Out-of-range input is clamped rather than dividing by zero.
        assert_eq!(throttle_sleep(ran, 100), Duration::from_millis(990));
    }
}
