//! A whole guest: the [`Vm`], its vCPU threads, the serial console and the
//! throttle timer, with the lifecycle operations the control socket exposes
//! (pause, resume, throttle, save) and the two ways to start one: booting
//! the built-in workload, or restoring a [`VmState`] into existing memory.
//!
//! Control operations are serialised by one lock over the vCPU handles, so
//! every vCPU sees the same sequence of events and a pause is complete
//! (every vCPU acknowledged) before anything else happens.

use std::fs::File;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use guestmem::GuestMemory;
use kvm_bindings::{kvm_mp_state, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;
use tracing::info;
use vmm_sys_util::errno;

use crate::control::RunState;
use crate::serial::{CreateSerialError, SerialConsole, COM1_GSI};
use crate::state::{restore_vcpu, restore_vm, save_vm, RestoreVcpuError, RestoreVmError};
use crate::state::{SaveVmError, VmState};
use crate::vcpu::{
    kick_thread, SaveOnVcpuError, SpawnVcpuError, VcpuCommError, VcpuEvent, VcpuHandle,
    VcpuResponse, VcpuShared, THROTTLE_SLICE,
};
use crate::vm::{CreateVcpuError, CreateVmError, Vm};
use crate::workload::{self, GuestLayout, LoadWorkloadError, VcpuCounters, WorkloadParams};

/// How long a vCPU may take to acknowledge an event. Kicked vCPUs answer in
/// microseconds; this only bounds a wedged one.
const VCPU_REPLY_TIMEOUT: Duration = Duration::from_secs(5);
/// The most vCPUs a guest may have.
pub const MAX_VCPUS: u32 = workload::MAX_VCPUS;

/// Setting up a guest failed; nothing of it is left running.
#[derive(Debug, thiserror::Error)]
pub enum BuildMachineError {
    #[error("vcpu count {vcpus} is not within 1..={max}")]
    VcpuCount { vcpus: usize, max: u32 },
    #[error(transparent)]
    CreateVm(#[from] CreateVmError),
    #[error(transparent)]
    CreateVcpu(#[from] CreateVcpuError),
    #[error("cannot create the serial console")]
    Serial(#[source] CreateSerialError),
    #[error("cannot wire the serial interrupt to gsi {gsi}")]
    SerialIrq {
        gsi: u32,
        #[source]
        source: errno::Error,
    },
    #[error("cannot load the workload guest")]
    LoadWorkload(#[source] LoadWorkloadError),
    #[error("cannot set the initial {what} of vcpu {id}")]
    InitialState {
        id: u32,
        what: &'static str,
        #[source]
        source: errno::Error,
    },
    #[error("cannot restore the vm-wide state")]
    RestoreVm(#[source] RestoreVmError),
    #[error("cannot restore vcpu {id}")]
    RestoreVcpu {
        id: u32,
        #[source]
        source: RestoreVcpuError,
    },
    #[error(transparent)]
    Spawn(#[from] SpawnVcpuError),
}

/// A lifecycle operation was refused or failed.
#[derive(Debug, thiserror::Error)]
pub enum MachineOpError {
    #[error("not allowed while {state}")]
    WrongState { state: &'static str },
    #[error("throttle {pct}% is not within 0..=99")]
    ThrottleRange { pct: u8 },
    #[error(transparent)]
    Vcpu(#[from] VcpuCommError),
    #[error("vcpu {id} gave an unexpected answer")]
    Protocol { id: u32 },
    #[error("cannot save vcpu {id}")]
    SaveVcpu {
        id: u32,
        #[source]
        source: SaveOnVcpuError,
    },
    #[error("cannot save the vm-wide state")]
    SaveVm(#[source] SaveVmError),
}

/// Where the vCPUs are in their lifecycle.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
enum Phase {
    /// Never run yet (`run --paused`).
    Created,
    Running,
    Paused,
    Stopped,
}

/// The throttle timer's shared settings.
struct ThrottleCtl {
    pct: u8,
    stop: bool,
}

/// Kicks every vCPU once per throttle slice while a throttle is set, so a
/// vCPU that never exits on its own still gets to sleep its share.
struct ThrottleTimer {
    ctl: Arc<(Mutex<ThrottleCtl>, Condvar)>,
    thread: Option<JoinHandle<()>>,
}

impl ThrottleTimer {
    fn spawn(threads: Vec<libc::pthread_t>) -> std::io::Result<Self> {
        let ctl = Arc::new((
            Mutex::new(ThrottleCtl {
                pct: 0,
                stop: false,
            }),
            Condvar::new(),
        ));
        let c = Arc::clone(&ctl);
        let thread = std::thread::Builder::new()
            .name("throttle".into())
            .spawn(move || {
                let (lock, cv) = &*c;
                let mut st = lock.lock().unwrap_or_else(PoisonError::into_inner);
                loop {
                    if st.stop {
                        return;
                    }
                    if st.pct == 0 {
                        st = cv.wait(st).unwrap_or_else(PoisonError::into_inner);
                        continue;
                    }
                    let (s, timeout) = cv
                        .wait_timeout(st, THROTTLE_SLICE)
                        .unwrap_or_else(PoisonError::into_inner);
                    st = s;
                    if timeout.timed_out() && st.pct > 0 && !st.stop {
                        // The vCPU threads outlive this one (stop() joins
                        // the timer before the vCPUs are joined).
                        for &t in &threads {
                            kick_thread(t);
                        }
                    }
                }
            })?;
        Ok(ThrottleTimer {
            ctl,
            thread: Some(thread),
        })
    }

    fn set(&self, pct: u8) {
        let (lock, cv) = &*self.ctl;
        lock.lock().unwrap_or_else(PoisonError::into_inner).pct = pct;
        cv.notify_all();
    }

    fn stop(&mut self) {
        let (lock, cv) = &*self.ctl;
        lock.lock().unwrap_or_else(PoisonError::into_inner).stop = true;
        cv.notify_all();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Control {
    phase: Phase,
    vcpus: Vec<VcpuHandle>,
    throttle: ThrottleTimer,
}

/// A running (or paused) guest.
pub struct Machine {
    vm: Vm,
    shared: Arc<VcpuShared>,
    workload: Option<GuestLayout>,
    vcpu_count: u32,
    ctl: Mutex<Control>,
}

/// Sets the vCPU's initial state; called once per vCPU before its thread
/// starts. Lets tests boot guests other than the workload.
pub type VcpuInit<'a> = dyn FnMut(u32, &VcpuFd, u32) -> Result<(), BuildMachineError> + 'a;

impl Machine {
    /// Boots the built-in workload on `vcpus` vCPUs in fresh memory `mem`.
    /// With `paused` the vCPUs wait for [`Machine::resume`].
    pub fn boot_workload(
        mem: Arc<GuestMemory>,
        vcpus: u32,
        params: &WorkloadParams,
        serial_log: File,
        paused: bool,
    ) -> Result<Self, BuildMachineError> {
        let mut layout: Option<GuestLayout> = None;
        let mem2 = Arc::clone(&mem);
        let mut init = |id: u32, fd: &VcpuFd, tsc_khz: u32| {
            if layout.is_none() {
                // The loader paces the guest with the TSC frequency, known
                // only once a vCPU exists.
                layout = Some(
                    workload::load(&mem2, params, vcpus, tsc_khz)
                        .map_err(BuildMachineError::LoadWorkload)?,
                );
            }
            let l = layout.as_ref().expect("set above");
            set_initial_state(id, fd, l)
        };
        let mut m = Self::build(mem, vcpus, serial_log, paused, &mut init)?;
        m.workload = layout;
        info!(vcpus, paused, "workload guest booted");
        Ok(m)
    }

    /// Builds a guest whose vCPUs `init` sets up.
    pub fn build(
        mem: Arc<GuestMemory>,
        vcpus: u32,
        serial_log: File,
        paused: bool,
        init: &mut VcpuInit<'_>,
    ) -> Result<Self, BuildMachineError> {
        check_vcpu_count(vcpus as usize)?;
        let vm = Vm::create(mem)?;
        let serial = new_serial(&vm, None, serial_log)?;
        let mut fds = Vec::with_capacity(vcpus as usize);
        for id in 0..vcpus {
            let (fd, tsc_khz) = vm.create_vcpu(id)?;
            init(id, &fd, tsc_khz)?;
            fds.push(fd);
        }
        Self::start(vm, serial, fds, None, paused)
    }

    /// Restores `state` into `mem` (which already holds the guest's RAM).
    /// The guest stays paused until [`Machine::resume`].
    pub fn restore(
        mem: Arc<GuestMemory>,
        state: &VmState,
        serial_log: File,
    ) -> Result<Self, BuildMachineError> {
        check_vcpu_count(state.vcpus.len())?;
        Self::restore_into(Vm::create(mem)?, state, serial_log)
    }

    /// Restores `state` into an already created VM whose memory holds the
    /// guest's RAM (`restore --wait-state` creates it ahead of time, so that
    /// KVM_CREATE_VM and the memory slots stay out of the downtime).
    pub fn restore_into(
        vm: Vm,
        state: &VmState,
        serial_log: File,
    ) -> Result<Self, BuildMachineError> {
        check_vcpu_count(state.vcpus.len())?;
        // VM-wide KVM state first, then vCPUs, then devices.
        restore_vm(vm.fd(), &state.vm).map_err(BuildMachineError::RestoreVm)?;
        let mut fds = Vec::with_capacity(state.vcpus.len());
        for (vs, id) in state.vcpus.iter().zip(0u32..) {
            let (fd, _) = vm.create_vcpu(id)?;
            restore_vcpu(&fd, vs)
                .map_err(|source| BuildMachineError::RestoreVcpu { id, source })?;
            fds.push(fd);
        }
        let serial = new_serial(&vm, Some(&state.serial.clone().into()), serial_log)?;
        // States saved without the layout can still carry the workload: its
        // params page says where everything is.
        let workload = state
            .workload
            .clone()
            .or_else(|| GuestLayout::read_from(vm.memory()).ok());
        let m = Self::start(vm, serial, fds, workload, true)?;
        {
            let mut c = m.control();
            c.phase = Phase::Paused;
        }
        info!(vcpus = state.vcpus.len(), "guest restored, paused");
        Ok(m)
    }

    fn start(
        vm: Vm,
        serial: Arc<SerialConsole>,
        fds: Vec<VcpuFd>,
        workload: Option<GuestLayout>,
        paused: bool,
    ) -> Result<Self, BuildMachineError> {
        let shared = Arc::new(VcpuShared::new(serial));
        let vcpu_count = fds.len() as u32;
        let mut vcpus: Vec<VcpuHandle> = Vec::with_capacity(fds.len());
        for (fd, id) in fds.into_iter().zip(0u32..) {
            match VcpuHandle::spawn(id, fd, Arc::clone(&shared), paused) {
                Ok(h) => vcpus.push(h),
                Err(e) => {
                    stop_all(vcpus);
                    return Err(e.into());
                }
            }
        }
        let threads = vcpus.iter().filter_map(VcpuHandle::pthread).collect();
        let throttle = match ThrottleTimer::spawn(threads) {
            Ok(t) => t,
            Err(source) => {
                stop_all(vcpus);
                return Err(SpawnVcpuError::Thread { id: 0, source }.into());
            }
        };
        Ok(Machine {
            vm,
            shared,
            workload,
            vcpu_count,
            ctl: Mutex::new(Control {
                phase: if paused {
                    Phase::Created
                } else {
                    Phase::Running
                },
                vcpus,
                throttle,
            }),
        })
    }

    fn control(&self) -> MutexGuard<'_, Control> {
        // Every operation leaves `phase` consistent with what the vCPUs
        // acknowledged, so a panic elsewhere leaves nothing half-done here.
        self.ctl.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// The VM (dirty log, memory).
    pub fn vm(&self) -> &Vm {
        &self.vm
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        self.vm.memory()
    }

    /// Where the workload lives, if this guest runs it.
    pub fn workload(&self) -> Option<&GuestLayout> {
        self.workload.as_ref()
    }

    pub fn vcpu_count(&self) -> u32 {
        self.vcpu_count
    }

    /// The run state as the control protocol reports it.
    pub fn run_state(&self) -> RunState {
        if let Some(reason) = self.shared.crash_reason() {
            return RunState::Crashed { reason };
        }
        match self.control().phase {
            Phase::Created => RunState::Created,
            Phase::Running => RunState::Running,
            Phase::Paused => RunState::Paused,
            Phase::Stopped => RunState::ShuttingDown,
        }
    }

    pub fn throttle_pct(&self) -> u8 {
        self.shared.throttle_pct.load(Ordering::Relaxed)
    }

    /// Time the vCPUs (summed) have spent asleep because of the throttle.
    pub fn throttled_time(&self) -> Duration {
        Duration::from_nanos(self.shared.throttled_ns.load(Ordering::Relaxed))
    }

    /// (pass events, corrupt events) seen by this process.
    pub fn port_events(&self) -> (u64, u64) {
        (
            self.shared.pass_events.load(Ordering::Relaxed),
            self.shared.corrupt_events.load(Ordering::Relaxed),
        )
    }

    /// The workload's counters, read from guest RAM.
    pub fn counters(&self) -> Vec<VcpuCounters> {
        match &self.workload {
            Some(l) => workload::read_counters(self.memory(), l, self.vcpu_count),
            None => Vec::new(),
        }
    }

    /// Sends `ev` to every vCPU, then waits for each answer.
    fn broadcast(
        c: &Control,
        ev: impl Fn() -> VcpuEvent,
        want: fn(&VcpuResponse) -> bool,
    ) -> Result<(), MachineOpError> {
        // Send to all first so that the vCPUs stop in parallel.
        for v in &c.vcpus {
            v.send(ev())?;
        }
        for v in &c.vcpus {
            let r = v.recv(VCPU_REPLY_TIMEOUT)?;
            if !want(&r) {
                return Err(MachineOpError::Protocol { id: v.id() });
            }
        }
        Ok(())
    }

    /// Stops every vCPU; returns once all of them are out of `KVM_RUN`.
    /// Pausing a paused guest is a no-op.
    pub fn pause(&self) -> Result<(), MachineOpError> {
        let mut c = self.control();
        match c.phase {
            Phase::Paused | Phase::Created => return Ok(()),
            Phase::Stopped => return Err(MachineOpError::WrongState { state: "stopped" }),
            Phase::Running => {}
        }
        Self::broadcast(
            &c,
            || VcpuEvent::Pause,
            |r| matches!(r, VcpuResponse::Paused),
        )?;
        c.phase = Phase::Paused;
        info!("guest paused");
        Ok(())
    }

    /// Lets every vCPU run again (or for the first time).
    pub fn resume(&self) -> Result<(), MachineOpError> {
        let mut c = self.control();
        match c.phase {
            Phase::Running => return Ok(()),
            Phase::Stopped => return Err(MachineOpError::WrongState { state: "stopped" }),
            Phase::Paused | Phase::Created => {}
        }
        Self::broadcast(
            &c,
            || VcpuEvent::Resume,
            |r| matches!(r, VcpuResponse::Resumed),
        )?;
        c.phase = Phase::Running;
        info!("guest resumed");
        Ok(())
    }

    /// Sets the vCPU throttle: 0 = off, else the percentage of time the
    /// vCPUs sleep.
    pub fn set_throttle(&self, pct: u8) -> Result<(), MachineOpError> {
        if pct > 99 {
            return Err(MachineOpError::ThrottleRange { pct });
        }
        let c = self.control();
        self.shared.throttle_pct.store(pct, Ordering::Relaxed);
        c.throttle.set(pct);
        info!(pct, "throttle set");
        Ok(())
    }

    /// Captures the whole guest state. Only while paused (or never started).
    pub fn save(&self) -> Result<VmState, MachineOpError> {
        let c = self.control();
        match c.phase {
            Phase::Paused | Phase::Created => {}
            Phase::Running => return Err(MachineOpError::WrongState { state: "running" }),
            Phase::Stopped => return Err(MachineOpError::WrongState { state: "stopped" }),
        }
        let mut vcpus = Vec::with_capacity(c.vcpus.len());
        for v in &c.vcpus {
            v.send(VcpuEvent::SaveState)?;
            match v.recv(VCPU_REPLY_TIMEOUT)? {
                VcpuResponse::Saved(Ok(s)) => vcpus.push(*s),
                VcpuResponse::Saved(Err(source)) => {
                    return Err(MachineOpError::SaveVcpu { id: v.id(), source })
                }
                _ => return Err(MachineOpError::Protocol { id: v.id() }),
            }
        }
        let vm = save_vm(self.vm.fd()).map_err(MachineOpError::SaveVm)?;
        Ok(VmState {
            layout: self.memory().layout().clone(),
            vcpus,
            vm,
            serial: self.shared.serial.state().into(),
            workload: self.workload.clone(),
        })
    }

    /// Stops and joins every vCPU thread. Idempotent.
    pub fn shutdown(&self) {
        let mut c = self.control();
        if c.phase == Phase::Stopped {
            return;
        }
        c.phase = Phase::Stopped;
        c.throttle.stop();
        stop_all(std::mem::take(&mut c.vcpus));
        info!("vcpus stopped");
    }
}

impl Drop for Machine {
    fn drop(&mut self) {
        self.shutdown();
    }
}

fn stop_all(vcpus: Vec<VcpuHandle>) {
    let mut sent = Vec::with_capacity(vcpus.len());
    for v in vcpus {
        match v.send(VcpuEvent::Exit) {
            Ok(()) => sent.push(v),
            Err(VcpuCommError::Gone { .. }) => v.join(VCPU_REPLY_TIMEOUT),
            // Wedged: leave it rather than hang the shutdown.
            Err(e) => tracing::error!(vcpu = v.id(), error = %e, "cannot stop vcpu"),
        }
    }
    for v in sent {
        v.join(VCPU_REPLY_TIMEOUT);
    }
}

fn check_vcpu_count(n: usize) -> Result<(), BuildMachineError> {
    if n == 0 || n > MAX_VCPUS as usize {
        return Err(BuildMachineError::VcpuCount {
            vcpus: n,
            max: MAX_VCPUS,
        });
    }
    Ok(())
}

fn new_serial(
    vm: &Vm,
    state: Option<&vm_superio::serial::SerialState>,
    out: File,
) -> Result<Arc<SerialConsole>, BuildMachineError> {
    let (serial, irq) = match state {
        Some(s) => SerialConsole::from_state(s, out),
        None => SerialConsole::new(out),
    }
    .map_err(BuildMachineError::Serial)?;
    vm.fd()
        .register_irqfd(&irq, COM1_GSI)
        .map_err(|source| BuildMachineError::SerialIrq {
            gsi: COM1_GSI,
            source,
        })?;
    Ok(Arc::new(serial))
}

/// Puts vCPU `id` at the workload's entry point, runnable without waiting
/// for INIT/SIPI (with an in-kernel LAPIC, KVM parks every vCPU but the
/// first until the guest wakes it; the workload starts all of them itself).
fn set_initial_state(id: u32, fd: &VcpuFd, layout: &GuestLayout) -> Result<(), BuildMachineError> {
    let err = |what| move |source| BuildMachineError::InitialState { id, what, source };
    let base = fd.get_sregs().map_err(err("sregs"))?;
    let (regs, sregs, fpu) = workload::initial_vcpu_state(layout, id, &base);
    fd.set_sregs(&sregs).map_err(err("sregs"))?;
    fd.set_regs(&regs).map_err(err("regs"))?;
    fd.set_fpu(&fpu).map_err(err("fpu"))?;
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .map_err(err("mp state"))?;
    Ok(())
}

#[cfg(test)]
#[path = "machine_tests.rs"]
pub(crate) mod tests;
