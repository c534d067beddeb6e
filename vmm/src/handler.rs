//! The VMM's [`ControlHandler`]: maps control requests onto the
//! [`Machine`], and in `restore --wait-state` mode holds the inherited memfd
//! until a Restore request brings the state to build the guest from.
//!
//! Post-copy: a Userfaultfd request (before Restore) registers the prepared
//! VM's mapping of guest RAM with a userfaultfd and passes a dup to the
//! daemon. From then on every access to a missing page, by a vCPU, by KVM
//! or by this process (Status reads the counters from guest RAM, Restore
//! may read the workload layout), waits until the daemon installs it; so
//! the daemon serves faults concurrently with its control calls. The VMM
//! keeps its own copy of the fd until UserfaultfdRelease: if the daemon
//! dies mid post-copy, faulting vCPUs wait for a restarted daemon (which
//! asks for the fd again) instead of the kernel resolving the missing
//! pages as zeros when the last fd closes.

use std::fs::File;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use guestmem::{GuestMemory, MemoryLayout, PagerRegion, Userfaultfd};
use tracing::{debug, info, warn};

use crate::control::{ControlHandler, ErrorCode, Reply, Request, RunState, VmStatus};
use crate::machine::{Machine, MachineOpError};
use crate::state::VmState;
use crate::vm::{DirtyLogError, Vm};

/// What the handler currently drives.
enum Slot {
    /// `--wait-state`: no guest yet. The memfd and the serial log are
    /// consumed by the first successful Restore.
    Waiting {
        memfd: OwnedFd,
        serial_log: File,
        /// A VM created ahead of the state over the memfd's standard
        /// layout; used when the state's layout is that one.
        prepared: Option<Vm>,
        /// `prepared`'s mapping is registered with the userfaultfd, so the
        /// guest must run on it: no other mapping would fault to the daemon.
        registered: bool,
    },
    Ready(Arc<Machine>),
}

/// The control handler of one VMM process.
pub struct VmmHandler {
    name: String,
    started: Instant,
    slot: Mutex<Slot>,
    /// Post-copy registration, kept from the Userfaultfd request until
    /// UserfaultfdRelease. Lock order: `slot` before `uffd`.
    uffd: Mutex<Option<Registration>>,
    /// Set once a Shutdown request was answered.
    shutdown: (Mutex<bool>, Condvar),
}

/// The VMM's copy of the userfaultfd and where each region is registered.
struct Registration {
    uffd: Userfaultfd,
    regions: Vec<PagerRegion>,
}

/// Joins an error and its sources into one line.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

fn op_error(e: &MachineOpError) -> Reply {
    let code = match e {
        MachineOpError::WrongState { .. } => ErrorCode::WrongState,
        MachineOpError::ThrottleRange { .. } => ErrorCode::InvalidArgument,
        _ => ErrorCode::Internal,
    };
    Reply::error(code, error_chain(e))
}

fn dirty_error(e: &DirtyLogError) -> Reply {
    let code = match e {
        DirtyLogError::NotEnabled => ErrorCode::WrongState,
        _ => ErrorCode::Internal,
    };
    Reply::error(code, error_chain(e))
}

impl VmmHandler {
    /// A handler driving a booted or restored guest.
    pub fn with_machine(name: impl Into<String>, machine: Arc<Machine>) -> Self {
        Self::new(name.into(), Slot::Ready(machine))
    }

    /// A handler waiting for a Restore request (`restore --wait-state`).
    pub fn waiting_for_state(name: impl Into<String>, memfd: OwnedFd, serial_log: File) -> Self {
        let prepared = prepare_vm(&memfd);
        Self::new(
            name.into(),
            Slot::Waiting {
                memfd,
                serial_log,
                prepared,
                registered: false,
            },
        )
    }

    fn new(name: String, slot: Slot) -> Self {
        VmmHandler {
            name,
            started: Instant::now(),
            slot: Mutex::new(slot),
            uffd: Mutex::new(None),
            shutdown: (Mutex::new(false), Condvar::new()),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Slot> {
        // The slot only ever changes from Waiting to Ready in one assignment.
        self.slot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The guest, once there is one.
    pub fn machine(&self) -> Option<Arc<Machine>> {
        match &*self.slot() {
            Slot::Ready(m) => Some(Arc::clone(m)),
            Slot::Waiting { .. } => None,
        }
    }

    fn shutting_down(&self) -> bool {
        *self
            .shutdown
            .0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts the shutdown as a Shutdown request does (also used for
    /// SIGTERM/SIGINT).
    pub fn request_shutdown(&self) {
        let (lock, cv) = &self.shutdown;
        *lock.lock().unwrap_or_else(PoisonError::into_inner) = true;
        cv.notify_all();
    }

    /// Blocks until a Shutdown request has been answered.
    pub fn wait_for_shutdown(&self) {
        let (lock, cv) = &self.shutdown;
        let mut done = lock.lock().unwrap_or_else(PoisonError::into_inner);
        while !*done {
            done = cv.wait(done).unwrap_or_else(PoisonError::into_inner);
        }
    }

    /// The Status reply's body.
    pub fn status(&self) -> VmStatus {
        let uptime_ms = self.started.elapsed().as_millis() as u64;
        let machine = self.machine();
        let shutting_down = self.shutting_down();
        let Some(m) = machine else {
            return VmStatus {
                name: self.name.clone(),
                run_state: if shutting_down {
                    RunState::ShuttingDown
                } else {
                    RunState::WaitingForState
                },
                vcpus: 0,
                memory_bytes: 0,
                throttle_pct: 0,
                dirty_logging: false,
                counters: Vec::new(),
                corrupt_events: 0,
                pass_events: 0,
                guest_layout: None,
                uptime_ms,
            };
        };
        let (pass_events, corrupt_events) = m.port_events();
        VmStatus {
            name: self.name.clone(),
            run_state: if shutting_down {
                RunState::ShuttingDown
            } else {
                m.run_state()
            },
            vcpus: m.vcpu_count(),
            memory_bytes: m.memory().layout().total_bytes(),
            throttle_pct: m.throttle_pct(),
            dirty_logging: m.vm().dirty_logging(),
            counters: m.counters(),
            corrupt_events,
            pass_events,
            guest_layout: m.workload().cloned(),
            uptime_ms,
        }
    }

    fn restore(&self, blob: &[u8]) -> Reply {
        let mut slot = self.slot();
        let Slot::Waiting {
            memfd,
            serial_log,
            prepared,
            registered,
        } = &mut *slot
        else {
            return Reply::error(ErrorCode::WrongState, "not waiting for state");
        };
        let state = match VmState::from_bytes(blob) {
            Ok(s) => s,
            Err(e) => return Reply::error(ErrorCode::BadState, error_chain(&e)),
        };
        if *registered
            && prepared
                .as_ref()
                .is_none_or(|vm| vm.memory().layout() != &state.layout)
        {
            // Checked before anything is consumed, so a refused state
            // leaves the registered VM for a correct one.
            return Reply::error(
                ErrorCode::BadState,
                "state layout differs from the memory registered for post-copy",
            );
        }
        // Work on duplicates so that a refused state leaves the VMM able to
        // take another Restore.
        let dup_err = |what: &str, e: std::io::Error| {
            Reply::error(ErrorCode::Internal, format!("cannot dup {what}: {e}"))
        };
        let fd = match memfd.try_clone() {
            Ok(f) => f,
            Err(e) => return dup_err("memfd", e),
        };
        let log = match serial_log.try_clone() {
            Ok(f) => f,
            Err(e) => return dup_err("serial log", e),
        };
        let t = Instant::now();
        let restored = match prepared.take() {
            Some(vm) if vm.memory().layout() == &state.layout => {
                Machine::restore_into(vm, &state, log)
            }
            _ => match GuestMemory::from_fd(fd, state.layout.clone()) {
                Ok(m) => Machine::restore(Arc::new(m), &state, log),
                Err(e) => return Reply::error(ErrorCode::BadState, error_chain(&e)),
            },
        };
        debug!(
            us = t.elapsed().as_micros() as u64,
            "restore request applied"
        );
        match restored {
            Ok(m) => {
                *slot = Slot::Ready(Arc::new(m));
                info!("state restored from control request");
                Reply::ok()
            }
            Err(e) => {
                warn!(error = %error_chain(&e), "restore failed");
                Reply::error(ErrorCode::BadState, error_chain(&e))
            }
        }
    }
}

impl VmmHandler {
    fn registration(&self) -> MutexGuard<'_, Option<Registration>> {
        self.uffd.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Userfaultfd request: registers on the first call (only while waiting
    /// for state), then hands out dups of the same fd.
    fn userfaultfd(&self) -> Reply {
        let mut slot = self.slot();
        let mut reg = self.registration();
        if reg.is_none() {
            let Slot::Waiting {
                memfd,
                prepared,
                registered,
                ..
            } = &mut *slot
            else {
                return Reply::error(
                    ErrorCode::WrongState,
                    "post-copy registration must precede restore",
                );
            };
            if prepared.is_none() {
                *prepared = prepare_vm(memfd);
            }
            let Some(vm) = prepared.as_ref() else {
                return Reply::error(
                    ErrorCode::Internal,
                    "cannot create the VM whose memory post-copy registers",
                );
            };
            let uffd = match Userfaultfd::create() {
                Ok(u) => u,
                Err(e) => return Reply::error(ErrorCode::Unsupported, error_chain(&e)),
            };
            let regions = match uffd.register_memory(vm.memory()) {
                Ok(r) => r,
                Err(e) => return Reply::error(ErrorCode::Unsupported, error_chain(&e)),
            };
            *registered = true;
            info!(
                regions = regions.len(),
                "guest memory registered for post-copy"
            );
            *reg = Some(Registration { uffd, regions });
        }
        let r = reg.as_ref().expect("registered above");
        match r.uffd.as_fd().try_clone_to_owned() {
            Ok(fd) => Reply::userfaultfd(r.regions.clone(), fd),
            Err(e) => Reply::error(ErrorCode::Internal, format!("cannot dup userfaultfd: {e}")),
        }
    }

    /// UserfaultfdRelease: drop our copy; idempotent.
    fn release_userfaultfd(&self) -> Reply {
        if self.registration().take().is_some() {
            info!("post-copy userfaultfd released");
        }
        Reply::ok()
    }
}

/// Creates the VM (KVM VM, irqchip, PIT, memory slots) over the memfd's
/// standard layout before the state arrives. Best effort: on any error the
/// Restore request builds everything itself.
fn prepare_vm(memfd: &OwnedFd) -> Option<Vm> {
    let prepare = || -> Result<Vm, Box<dyn std::error::Error>> {
        let size = File::from(memfd.try_clone()?).metadata()?.len();
        let layout = MemoryLayout::for_size(size)?;
        let mem = GuestMemory::from_fd(memfd.try_clone()?, layout)?;
        Ok(Vm::create(Arc::new(mem))?)
    };
    match prepare() {
        Ok(vm) => Some(vm),
        Err(e) => {
            debug!(error = %e, "no VM prepared ahead of the state");
            None
        }
    }
}

impl ControlHandler for VmmHandler {
    fn handle(&self, req: Request, attachment: Vec<u8>) -> Reply {
        if let Request::Status = req {
            return Reply::status(self.status());
        }
        if let Request::Shutdown = req {
            return Reply::ok();
        }
        if self.shutting_down() {
            return Reply::error(ErrorCode::WrongState, "shutting down");
        }
        match req {
            Request::Restore => return self.restore(&attachment),
            Request::Userfaultfd => return self.userfaultfd(),
            Request::UserfaultfdRelease => return self.release_userfaultfd(),
            _ => {}
        }
        let Some(m) = self.machine() else {
            return Reply::error(
                ErrorCode::WrongState,
                format!("{} needs a guest; waiting for state", req.name()),
            );
        };
        let done = |r: Result<(), MachineOpError>| match r {
            Ok(()) => Reply::ok(),
            Err(e) => op_error(&e),
        };
        match req {
            Request::Pause => done(m.pause()),
            Request::Resume => done(m.resume()),
            Request::Throttle { pct } => done(m.set_throttle(pct)),
            Request::DirtyLogStart => match m.vm().start_dirty_log() {
                Ok(()) => Reply::ok(),
                Err(e) => dirty_error(&e),
            },
            Request::DirtyLogFetch => match m.vm().fetch_dirty_log() {
                Ok(b) => Reply::bitmap(&b),
                Err(e) => dirty_error(&e),
            },
            Request::DirtyLogStop => match m.vm().stop_dirty_log() {
                Ok(()) => Reply::ok(),
                Err(e) => dirty_error(&e),
            },
            Request::SaveState => match m.save() {
                Ok(s) => Reply::state(s.to_bytes()),
                Err(e) => op_error(&e),
            },
            Request::GetMemory => match m.memory().fd().try_clone_to_owned() {
                Ok(fd) => Reply::memory(m.memory().layout().clone(), fd),
                Err(e) => Reply::error(ErrorCode::Internal, format!("cannot dup memfd: {e}")),
            },
            // Answered before the guest lookup.
            Request::Status
            | Request::Shutdown
            | Request::Restore
            | Request::Userfaultfd
            | Request::UserfaultfdRelease => {
                Reply::error(ErrorCode::Internal, "request routed wrongly")
            }
        }
    }

    fn reply_sent(&self, req: &Request) {
        if let Request::Shutdown = req {
            info!("shutdown requested");
            self.request_shutdown();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control::{serve, ControlClient};
    use crate::kvm_check::kvm_available_or_skip;
    use crate::machine::tests::{counter, test_machine, wait_counter_above};
    use std::os::unix::net::UnixListener;
    use std::path::Path;

    fn start(handler: VmmHandler, dir: &Path) -> (Arc<VmmHandler>, ControlClient) {
        let path = dir.join("vmm.sock");
        let listener = UnixListener::bind(&path).unwrap();
        let h = Arc::new(handler);
        serve(listener, h.clone());
        (h, ControlClient::connect(&path).unwrap())
    }

    #[test]
    fn control_requests_drive_the_machine() {
        if !kvm_available_or_skip() {
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let m = Arc::new(test_machine(2, false));
        let (h, mut c) = start(VmmHandler::with_machine("t", m.clone()), dir.path());

        let s = c.status().unwrap();
        assert_eq!((s.name.as_str(), s.vcpus), ("t", 2));
        assert_eq!(s.run_state, RunState::Running);
        assert_eq!(s.memory_bytes, 2 << 20);

        let err = c.save_state().unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::WrongState));
        let err = c.throttle(100).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::InvalidArgument));
        c.throttle(20).unwrap();
        assert_eq!(c.status().unwrap().throttle_pct, 20);
        c.throttle(0).unwrap();

        let err = c.dirty_log_fetch().unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::WrongState));
        c.dirty_log_start().unwrap();
        assert!(c.status().unwrap().dirty_logging);
        let before = counter(&m, 0);
        wait_counter_above(&m, 0, before);
        let bitmap = c.dirty_log_fetch().unwrap();
        assert_eq!(bitmap.pages(), 512);
        assert!(bitmap.test(0x10));
        c.dirty_log_stop().unwrap();

        c.pause().unwrap();
        assert_eq!(c.status().unwrap().run_state, RunState::Paused);
        let blob = c.save_state().unwrap();
        let state = VmState::from_bytes(&blob).unwrap();
        assert_eq!(state.vcpus.len(), 2);
        let (layout, fd) = c.get_memory().unwrap();
        assert_eq!(&layout, m.memory().layout());
        // The fd is the guest's memfd: the counter reads the same through it.
        let other = GuestMemory::from_fd(fd, layout).unwrap();
        let mut b = [0u8; 8];
        other.read_gpa(guestmem::Gpa(0x10000), &mut b).unwrap();
        assert_eq!(u64::from_le_bytes(b), counter(&m, 0));

        let err = c.restore(&blob).unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::WrongState));
        c.resume().unwrap();
        assert_eq!(c.status().unwrap().run_state, RunState::Running);

        c.shutdown().unwrap();
        h.wait_for_shutdown();
        assert_eq!(c.status().unwrap().run_state, RunState::ShuttingDown);
        let err = c.pause().unwrap_err();
        assert_eq!(err.code(), Some(ErrorCode::WrongState));
    }

    #[test]
    fn wait_state_mode_restores_from_request() {
        if !kvm_available_or_skip() {
            return;
        }
        let src = test_machine(1, false);
        wait_counter_above(&src, 0, 10);
        src.pause().unwrap();
        let blob = src.save().unwrap().to_bytes();
        let at_save = counter(&src, 0);
        let memfd = src.memory().fd().try_clone_to_owned().unwrap();
        src.shutdown();

        let dir = tempfile::tempdir().unwrap();
        let log = tempfile::tempfile().unwrap();
        let (h, mut c) = start(VmmHandler::waiting_for_state("d", memfd, log), dir.path());
        let s = c.status().unwrap();
        assert_eq!(s.run_state, RunState::WaitingForState);
        assert_eq!(c.pause().unwrap_err().code(), Some(ErrorCode::WrongState));

        // Damaged blobs are refused and the VMM keeps waiting.
        let mut bad = blob.clone();
        let last = bad.len() - 1;
        bad[last] ^= 0xff;
        assert_eq!(
            c.restore(&bad).unwrap_err().code(),
            Some(ErrorCode::BadState)
        );
        assert_eq!(
            c.restore(&blob[..10]).unwrap_err().code(),
            Some(ErrorCode::BadState)
        );
        assert_eq!(c.status().unwrap().run_state, RunState::WaitingForState);

        c.restore(&blob).unwrap();
        assert_eq!(c.status().unwrap().run_state, RunState::Paused);
        assert_eq!(
            c.restore(&blob).unwrap_err().code(),
            Some(ErrorCode::WrongState)
        );
        let m = h.machine().unwrap();
        assert_eq!(counter(&m, 0), at_save);
        c.resume().unwrap();
        wait_counter_above(&m, 0, at_save);
        m.shutdown();
    }

    /// Registration before Restore, dups after it, release; no page is
    /// missing here, so nothing faults (the post-copy test punches pages).
    #[test]
    fn userfaultfd_requests_follow_the_lifecycle() {
        if !kvm_available_or_skip() {
            return;
        }
        let src = test_machine(1, false);
        wait_counter_above(&src, 0, 10);
        src.pause().unwrap();
        let blob = src.save().unwrap().to_bytes();
        let layout = src.memory().layout().clone();
        let memfd = src.memory().fd().try_clone_to_owned().unwrap();
        src.shutdown();

        let dir = tempfile::tempdir().unwrap();
        let log = tempfile::tempfile().unwrap();
        let (h, mut c) = start(VmmHandler::waiting_for_state("d", memfd, log), dir.path());
        let (fd, regions) = match c.userfaultfd() {
            Ok(r) => r,
            Err(e) if e.code() == Some(ErrorCode::Unsupported) => {
                panic!("userfaultfd unsupported on a KVM host: {e}")
            }
            Err(e) => panic!("{e}"),
        };
        assert_eq!(regions.len(), 1);
        assert_eq!((regions[0].first_index, regions[0].pages), (0, 512));
        let pager = guestmem::Pager::new(fd, &layout, regions.clone()).unwrap();
        let (_fd2, again) = c.userfaultfd().unwrap();
        assert_eq!(again, regions, "later calls describe the same registration");

        c.restore(&blob).unwrap();
        c.resume().unwrap();
        let m = h.machine().unwrap();
        wait_counter_above(&m, 0, counter(&m, 0));
        let mut faults = Vec::new();
        assert_eq!(pager.read_faults(&mut faults).unwrap(), 0, "{faults:?}");
        c.userfaultfd_release().unwrap();
        c.userfaultfd_release().unwrap();
        assert_eq!(
            c.userfaultfd().unwrap_err().code(),
            Some(ErrorCode::WrongState)
        );
        m.shutdown();
    }
}
