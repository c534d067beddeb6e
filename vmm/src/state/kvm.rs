//! Capture and restore of the KVM side of a guest: per-vCPU registers and
//! in-kernel device state, and the VM-wide irqchip, PIT and clock.
//!
//! Ordering rules (KVM is sensitive to them):
//! * save: MP_STATE first (it may flush pending APIC events into the state
//!   we read next), VCPU_EVENTS last (so no later read changes them);
//! * restore: CPUID first (it defines which MSRs and xsave features exist),
//!   then TSC frequency, MP_STATE, REGS, SREGS, FPU, XSAVE, XCRS, DEBUGREGS,
//!   LAPIC (after SREGS, which sets APIC_BASE), MSRS (after LAPIC, since
//!   x2APIC/TSC-deadline MSRs land in the LAPIC), VCPU_EVENTS last (after
//!   REGS, or injected events would be overwritten);
//! * the VM-wide state is restored after the irqchip and PIT exist and
//!   before any vCPU runs; emulated devices come after it.
//!
//! Both sides must only run while every vCPU is paused, on the vCPU's own
//! thread for the per-vCPU part.

use std::sync::OnceLock;

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_fpu, kvm_irqchip, kvm_lapic_state,
    kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs,
    CpuId, Msrs, Xsave, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_MAX_CPUID_ENTRIES, KVM_MAX_MSR_ENTRIES,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use serde::{Deserialize, Serialize};

/// Size of the legacy `struct kvm_xsave` region, in u32 words.
const XSAVE_REGION_WORDS: usize = 1024;
/// Bound on a saved xsave area (AMX needs ~11 KiB; leave room).
const MAX_XSAVE_WORDS: usize = 64 * 1024 / 4;

/// The x87/SSE state as KVM_GET_FPU returns it (kvm-bindings has no serde
/// for `kvm_fpu`).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Fpu {
    pub fpr: [[u8; 16]; 8],
    pub fcw: u16,
    pub fsw: u16,
    pub ftwx: u8,
    pub last_opcode: u16,
    pub last_ip: u64,
    pub last_dp: u64,
    pub xmm: [[u8; 16]; 16],
    pub mxcsr: u32,
}

mirror_fields!(
    Fpu,
    kvm_fpu {
        fpr,
        fcw,
        fsw,
        ftwx,
        last_opcode,
        last_ip,
        last_dp,
        xmm,
        mxcsr,
    }..Default::default()
);

/// One model-specific register.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct MsrEntry {
    pub index: u32,
    pub data: u64,
}

/// Everything KVM holds about one vCPU.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct VcpuState {
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub fpu: Fpu,
    /// The whole `kvm_xsave` area as u32 words: the 4 KiB legacy region plus
    /// any extended components KVM_GET_XSAVE2 reported.
    pub xsave: Vec<u32>,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    /// The saveable MSRs (KVM_GET_MSR_INDEX_LIST) that actually read back.
    pub msrs: Vec<MsrEntry>,
    pub vcpu_events: kvm_vcpu_events,
    /// `None` when the kernel cannot report it (no KVM_CAP_GET_TSC_KHZ).
    pub tsc_khz: Option<u32>,
}

/// VM-wide in-kernel state.
#[derive(Clone, Serialize, Deserialize)]
pub struct VmWideState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit2: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

impl std::fmt::Debug for VmWideState {
    // kvm_irqchip is a union without Debug; show the parts that are not.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VmWideState")
            .field("pic_master.chip_id", &self.pic_master.chip_id)
            .field("pic_slave.chip_id", &self.pic_slave.chip_id)
            .field("ioapic.chip_id", &self.ioapic.chip_id)
            .field("pit2", &self.pit2)
            .field("clock", &self.clock)
            .finish()
    }
}

/// Reading a vCPU's state failed.
#[derive(Debug, thiserror::Error)]
pub enum SaveVcpuError {
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot query host KVM capabilities")]
    Host(#[source] HostInfoError),
    #[error("xsave area of {bytes} bytes is larger than supported")]
    XsaveTooLarge { bytes: usize },
}

/// Writing a vCPU's state failed.
#[derive(Debug, thiserror::Error)]
pub enum RestoreVcpuError {
    #[error("{op} failed")]
    Ioctl {
        op: &'static str,
        #[source]
        source: kvm_ioctls::Error,
    },
    #[error("cannot query host KVM capabilities")]
    Host(#[source] HostInfoError),
    #[error("saved xsave area has {saved_words} words, this host's has {host_words}")]
    XsaveSize {
        saved_words: usize,
        host_words: usize,
    },
    #[error("saved cpuid has {entries} entries, more than {max}")]
    TooManyCpuidEntries { entries: usize, max: usize },
    #[error("KVM refused MSR {index:#x}")]
    SetMsr { index: u32 },
    #[error("cannot set TSC frequency to {khz} kHz (host runs at {host_khz:?} kHz)")]
    TscKhz {
        khz: u32,
        host_khz: Option<u32>,
        #[source]
        source: kvm_ioctls::Error,
    },
}

/// Reading the VM-wide state failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed")]
pub struct SaveVmError {
    pub op: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Writing the VM-wide state failed.
#[derive(Debug, thiserror::Error)]
#[error("{op} failed")]
pub struct RestoreVmError {
    pub op: &'static str,
    #[source]
    pub source: kvm_ioctls::Error,
}

/// Querying /dev/kvm for the MSR list or xsave size failed.
#[derive(Clone, Debug, thiserror::Error)]
#[error("{op} failed: {errno}")]
pub struct HostInfoError {
    pub op: &'static str,
    // kvm_ioctls::Error is not Clone; the errno is all it carries.
    pub errno: i32,
}

/// Host facts that are the same for every vCPU of this process.
#[derive(Debug)]
struct HostInfo {
    /// KVM_GET_MSR_INDEX_LIST: MSRs KVM says are worth saving.
    msr_indices: Vec<u32>,
    /// Total `kvm_xsave` size in u32 words (KVM_CAP_XSAVE2), at least the
    /// legacy 1024.
    xsave_words: usize,
}

/// Queried once: opening /dev/kvm per vCPU per save would be wasteful and
/// the answers cannot change while the process lives.
fn host_info() -> Result<&'static HostInfo, HostInfoError> {
    static INFO: OnceLock<Result<HostInfo, HostInfoError>> = OnceLock::new();
    INFO.get_or_init(|| {
        let kvm = Kvm::new().map_err(|e| HostInfoError {
            op: "open /dev/kvm",
            errno: e.errno(),
        })?;
        let list = kvm.get_msr_index_list().map_err(|e| HostInfoError {
            op: "KVM_GET_MSR_INDEX_LIST",
            errno: e.errno(),
        })?;
        // KVM_CAP_XSAVE2 returns the full kvm_xsave size in bytes for this
        // process (it depends on the process's xstate permissions, which is
        // also what sizes the vCPU's buffer), or 0 on pre-5.17 kernels.
        let xsave_bytes = usize::try_from(kvm.check_extension_int(Cap::Xsave2)).unwrap_or(0);
        Ok(HostInfo {
            msr_indices: list.as_slice().to_vec(),
            xsave_words: xsave_bytes.div_ceil(4).max(XSAVE_REGION_WORDS),
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

fn vcpu_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> SaveVcpuError {
    move |source| SaveVcpuError::Ioctl { op, source }
}

fn restore_err(op: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RestoreVcpuError {
    move |source| RestoreVcpuError::Ioctl { op, source }
}

/// Reads every MSR in `indices` that KVM lets us read. KVM_GET_MSRS stops
/// at the first MSR it refuses and returns how many it read, so a refusal
/// drops that index and the read continues after it.
fn read_msrs(vcpu: &VcpuFd, indices: &[u32]) -> Result<Vec<MsrEntry>, SaveVcpuError> {
    let mut out = Vec::with_capacity(indices.len());
    let mut rest = indices;
    while !rest.is_empty() {
        let batch = &rest[..rest.len().min(KVM_MAX_MSR_ENTRIES)];
        let entries: Vec<kvm_msr_entry> = batch
            .iter()
            .map(|&index| kvm_msr_entry {
                index,
                ..Default::default()
            })
            .collect();
        let mut msrs = Msrs::from_entries(&entries).map_err(|_| SaveVcpuError::Ioctl {
            op: "KVM_GET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let read = vcpu.get_msrs(&mut msrs).map_err(vcpu_err("KVM_GET_MSRS"))?;
        out.extend(
            msrs.as_slice()[..read.min(batch.len())]
                .iter()
                .map(|e| MsrEntry {
                    index: e.index,
                    data: e.data,
                }),
        );
        // Skip the refused MSR (if any) and go on with the rest.
        let consumed = (read + 1).min(batch.len());
        rest = &rest[consumed..];
    }
    Ok(out)
}

fn write_msrs(vcpu: &VcpuFd, msrs: &[MsrEntry]) -> Result<(), RestoreVcpuError> {
    for chunk in msrs.chunks(KVM_MAX_MSR_ENTRIES) {
        let entries: Vec<kvm_msr_entry> = chunk
            .iter()
            .map(|m| kvm_msr_entry {
                index: m.index,
                data: m.data,
                ..Default::default()
            })
            .collect();
        let wrapped = Msrs::from_entries(&entries).map_err(|_| RestoreVcpuError::Ioctl {
            op: "KVM_SET_MSRS",
            source: kvm_ioctls::Error::new(libc::E2BIG),
        })?;
        let written = vcpu
            .set_msrs(&wrapped)
            .map_err(restore_err("KVM_SET_MSRS"))?;
        if written < chunk.len() {
            return Err(RestoreVcpuError::SetMsr {
                index: chunk[written].index,
            });
        }
    }
    Ok(())
}

fn read_xsave(vcpu: &VcpuFd, words: usize) -> Result<Vec<u32>, SaveVcpuError> {
    if words > MAX_XSAVE_WORDS {
        return Err(SaveVcpuError::XsaveTooLarge { bytes: words * 4 });
    }
    if words <= XSAVE_REGION_WORDS {
        let x = vcpu.get_xsave().map_err(vcpu_err("KVM_GET_XSAVE"))?;
        return Ok(x.region.to_vec());
    }
    let extra = words - XSAVE_REGION_WORDS;
    let mut x = Xsave::new(extra).map_err(|_| SaveVcpuError::XsaveTooLarge { bytes: words * 4 })?;
    // SAFETY: KVM_GET_XSAVE2 writes the vCPU's uabi xsave size, which is the
    // KVM_CAP_XSAVE2 answer for this process (`words`, from host_info); the
    // buffer was allocated with exactly that many words above.
    unsafe { vcpu.get_xsave2(&mut x) }.map_err(vcpu_err("KVM_GET_XSAVE2"))?;
    let fam = x.as_fam_struct_ref();
    let mut out = Vec::with_capacity(words);
    out.extend_from_slice(&fam.xsave.region);
    out.extend_from_slice(x.as_slice());
    Ok(out)
}

fn write_xsave(vcpu: &VcpuFd, saved: &[u32], host_words: usize) -> Result<(), RestoreVcpuError> {
    // A larger saved area holds components this host cannot hold; a
    // smaller one (or the legacy 4 KiB) is padded: XSTATE_BV in the header
    // says which components are present, so the zero tail is ignored.
    if saved.len() > host_words || saved.len() < XSAVE_REGION_WORDS || host_words > MAX_XSAVE_WORDS
    {
        return Err(RestoreVcpuError::XsaveSize {
            saved_words: saved.len(),
            host_words,
        });
    }
    let extra = host_words - XSAVE_REGION_WORDS;
    let mut x = Xsave::new(extra).map_err(|_| RestoreVcpuError::XsaveSize {
        saved_words: saved.len(),
        host_words,
    })?;
    // SAFETY: as_mut_fam_struct is unsafe only because changing the length
    // field could desync it from the allocation; we write the fixed-size
    // legacy region and leave the length alone.
    let fam = unsafe { x.as_mut_fam_struct() };
    fam.xsave
        .region
        .copy_from_slice(&saved[..XSAVE_REGION_WORDS]);
    let tail = &saved[XSAVE_REGION_WORDS..];
    x.as_mut_slice()[..tail.len()].copy_from_slice(tail);
    // SAFETY: KVM_SET_XSAVE reads the vCPU's uabi xsave size, which is
    // `host_words` words (KVM_CAP_XSAVE2 for this process, or the legacy
    // 1024); `x` was allocated with exactly that many words.
    unsafe { vcpu.set_xsave2(&x) }.map_err(restore_err("KVM_SET_XSAVE"))
}

/// Captures one vCPU. The vCPU must not be running (call it on the vCPU's
/// thread while paused).
pub fn save_vcpu(vcpu: &VcpuFd) -> Result<VcpuState, SaveVcpuError> {
    let host = host_info().map_err(SaveVcpuError::Host)?;
    let mp_state = vcpu.get_mp_state().map_err(vcpu_err("KVM_GET_MP_STATE"))?;
    let regs = vcpu.get_regs().map_err(vcpu_err("KVM_GET_REGS"))?;
    let sregs = vcpu.get_sregs().map_err(vcpu_err("KVM_GET_SREGS"))?;
    let fpu = Fpu::from(&vcpu.get_fpu().map_err(vcpu_err("KVM_GET_FPU"))?);
    let xsave = read_xsave(vcpu, host.xsave_words)?;
    let xcrs = vcpu.get_xcrs().map_err(vcpu_err("KVM_GET_XCRS"))?;
    let debugregs = vcpu
        .get_debug_regs()
        .map_err(vcpu_err("KVM_GET_DEBUGREGS"))?;
    let lapic = vcpu.get_lapic().map_err(vcpu_err("KVM_GET_LAPIC"))?;
    let msrs = read_msrs(vcpu, &host.msr_indices)?;
    let cpuid = vcpu
        .get_cpuid2(KVM_MAX_CPUID_ENTRIES)
        .map_err(vcpu_err("KVM_GET_CPUID2"))?
        .as_slice()
        .to_vec();
    let tsc_khz = vcpu.get_tsc_khz().ok();
    let vcpu_events = vcpu
        .get_vcpu_events()
        .map_err(vcpu_err("KVM_GET_VCPU_EVENTS"))?;
    Ok(VcpuState {
        cpuid,
        mp_state,
        regs,
        sregs,
        fpu,
        xsave,
        xcrs,
        debugregs,
        lapic,
        msrs,
        vcpu_events,
        tsc_khz,
    })
}

/// Loads a saved state into a freshly created vCPU of a VM whose irqchip
/// exists. See the module docs for the order.
pub fn restore_vcpu(vcpu: &VcpuFd, s: &VcpuState) -> Result<(), RestoreVcpuError> {
    let host = host_info().map_err(RestoreVcpuError::Host)?;
    if s.cpuid.len() > KVM_MAX_CPUID_ENTRIES {
        return Err(RestoreVcpuError::TooManyCpuidEntries {
            entries: s.cpuid.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        });
    }
    let cpuid =
        CpuId::from_entries(&s.cpuid).map_err(|_| RestoreVcpuError::TooManyCpuidEntries {
            entries: s.cpuid.len(),
            max: KVM_MAX_CPUID_ENTRIES,
        })?;
    vcpu.set_cpuid2(&cpuid)
        .map_err(restore_err("KVM_SET_CPUID2"))?;
    if let Some(khz) = s.tsc_khz {
        // Only touch the frequency when it differs: setting it needs TSC
        // scaling, which same-host restores should not depend on.
        let host_khz = vcpu.get_tsc_khz().ok();
        if host_khz != Some(khz) {
            vcpu.set_tsc_khz(khz)
                .map_err(|source| RestoreVcpuError::TscKhz {
                    khz,
                    host_khz,
                    source,
                })?;
        }
    }
    vcpu.set_mp_state(s.mp_state)
        .map_err(restore_err("KVM_SET_MP_STATE"))?;
    vcpu.set_regs(&s.regs)
        .map_err(restore_err("KVM_SET_REGS"))?;
    vcpu.set_sregs(&s.sregs)
        .map_err(restore_err("KVM_SET_SREGS"))?;
    vcpu.set_fpu(&kvm_fpu::from(&s.fpu))
        .map_err(restore_err("KVM_SET_FPU"))?;
    write_xsave(vcpu, &s.xsave, host.xsave_words)?;
    vcpu.set_xcrs(&s.xcrs)
        .map_err(restore_err("KVM_SET_XCRS"))?;
    vcpu.set_debug_regs(&s.debugregs)
        .map_err(restore_err("KVM_SET_DEBUGREGS"))?;
    vcpu.set_lapic(&s.lapic)
        .map_err(restore_err("KVM_SET_LAPIC"))?;
    write_msrs(vcpu, &s.msrs)?;
    vcpu.set_vcpu_events(&s.vcpu_events)
        .map_err(restore_err("KVM_SET_VCPU_EVENTS"))?;
    Ok(())
}

fn get_chip(vm: &VmFd, chip_id: u32, op: &'static str) -> Result<kvm_irqchip, SaveVmError> {
    let mut chip = kvm_irqchip {
        chip_id,
        ..Default::default()
    };
    vm.get_irqchip(&mut chip)
        .map_err(|source| SaveVmError { op, source })?;
    Ok(chip)
}

/// Captures the VM-wide state (in-kernel irqchip and PIT must exist). Call
/// while every vCPU is paused.
pub fn save_vm(vm: &VmFd) -> Result<VmWideState, SaveVmError> {
    let pic_master = get_chip(vm, KVM_IRQCHIP_PIC_MASTER, "KVM_GET_IRQCHIP(pic master)")?;
    let pic_slave = get_chip(vm, KVM_IRQCHIP_PIC_SLAVE, "KVM_GET_IRQCHIP(pic slave)")?;
    let ioapic = get_chip(vm, KVM_IRQCHIP_IOAPIC, "KVM_GET_IRQCHIP(ioapic)")?;
    let pit2 = vm.get_pit2().map_err(|source| SaveVmError {
        op: "KVM_GET_PIT2",
        source,
    })?;
    let clock = vm.get_clock().map_err(|source| SaveVmError {
        op: "KVM_GET_CLOCK",
        source,
    })?;
    Ok(VmWideState {
        pic_master,
        pic_slave,
        ioapic,
        pit2,
        clock,
    })
}

/// Loads the VM-wide state into a VM whose irqchip and PIT were created,
/// before its vCPUs run.
pub fn restore_vm(vm: &VmFd, s: &VmWideState) -> Result<(), RestoreVmError> {
    let chips = [
        (&s.pic_master, "KVM_SET_IRQCHIP(pic master)"),
        (&s.pic_slave, "KVM_SET_IRQCHIP(pic slave)"),
        (&s.ioapic, "KVM_SET_IRQCHIP(ioapic)"),
    ];
    for (chip, op) in chips {
        vm.set_irqchip(chip)
            .map_err(|source| RestoreVmError { op, source })?;
    }
    vm.set_pit2(&s.pit2).map_err(|source| RestoreVmError {
        op: "KVM_SET_PIT2",
        source,
    })?;
    // KVM_GET_CLOCK reports flags (TSC_STABLE, HOST_TSC, REALTIME) that
    // older kernels refuse in KVM_SET_CLOCK; the plain clock value is what
    // we restore, so the guest's kvmclock resumes where it was paused.
    let clock = kvm_clock_data {
        clock: s.clock.clock,
        ..Default::default()
    };
    vm.set_clock(&clock).map_err(|source| RestoreVmError {
        op: "KVM_SET_CLOCK",
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fpu_conversion_round_trips() {
        let mut k = kvm_fpu {
            fcw: 0x37f,
            mxcsr: 0x1f80,
            last_ip: 0xdead_beef,
            ..Default::default()
        };
        k.xmm[3][7] = 0xaa;
        k.fpr[1][0] = 5;
        let back = kvm_fpu::from(&Fpu::from(&k));
        assert_eq!(back, k);
    }

    /// Needs /dev/kvm: a vCPU's state saved and restored into a second vCPU
    /// reads back identically (apart from what KVM itself derives).
    #[test]
    fn vcpu_state_survives_restore_into_fresh_vm() {
        if !crate::kvm_check::kvm_available_or_skip() {
            return;
        }
        let kvm = Kvm::new().expect("open kvm");
        let make = || {
            let vm = kvm.create_vm().expect("create vm");
            vm.create_irq_chip().expect("irqchip");
            vm.create_pit2(Default::default()).expect("pit");
            let vcpu = vm.create_vcpu(0).expect("vcpu");
            let cpuid = kvm
                .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
                .expect("cpuid");
            vcpu.set_cpuid2(&cpuid).expect("set cpuid");
            (vm, vcpu)
        };
        let (vm_a, vcpu_a) = make();
        let mut regs = vcpu_a.get_regs().unwrap();
        regs.rax = 0x1234_5678;
        regs.rip = 0xfff0;
        regs.rflags = 0x2;
        vcpu_a.set_regs(&regs).unwrap();
        let saved = save_vcpu(&vcpu_a).expect("save vcpu");
        let saved_vm = save_vm(&vm_a).expect("save vm");
        assert!(saved.xsave.len() >= XSAVE_REGION_WORDS);
        assert!(!saved.cpuid.is_empty());

        let (vm_b, vcpu_b) = make();
        restore_vm(&vm_b, &saved_vm).expect("restore vm");
        restore_vcpu(&vcpu_b, &saved).expect("restore vcpu");
        let again = save_vcpu(&vcpu_b).expect("save again");
        assert_eq!(again.regs, saved.regs);
        assert_eq!(again.sregs, saved.sregs);
        assert_eq!(again.fpu, saved.fpu);
        assert_eq!(again.xcrs, saved.xcrs);
        assert_eq!(again.cpuid, saved.cpuid);
        assert_eq!(again.lapic.regs[..], saved.lapic.regs[..]);
        assert_eq!(again.msrs.len(), saved.msrs.len());
    }
}
