//! The KVM virtual machine: one VM fd, one memory slot per guest RAM region
//! (mapped straight from the shared memfd), the in-kernel irqchip and PIT,
//! vCPU creation with CPUID, and KVM dirty logging.
//!
//! Dirty logging uses plain `KVM_GET_DIRTY_LOG` (fetch-and-clear per slot).
//! Pages the VMM itself writes into guest RAM are not seen by KVM's log, so
//! callers record them with [`Vm::note_vmm_write`] and they are ORed into the
//! next fetch.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use guestmem::{DirtyBitmap, GuestMemory, PAGE_SIZE};
use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, CpuId, KVM_MAX_CPUID_ENTRIES,
    KVM_MEM_LOG_DIRTY_PAGES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{Cap, Kvm, VcpuFd, VmFd};
use tracing::{debug, info, warn};
use vmm_sys_util::errno;

/// Where KVM puts the three-page TSS it needs for real-mode emulation on
/// Intel: just below the 4 GiB boundary, inside the MMIO hole, so it never
/// overlaps guest RAM.
const TSS_ADDRESS: usize = 0xfffb_d000;

/// Failure to create the VM and its fixed devices.
#[derive(Debug, thiserror::Error)]
pub enum CreateVmError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] errno::Error),
    #[error("cannot create the KVM VM")]
    CreateVm(#[source] errno::Error),
    #[error("cannot create the in-kernel irqchip")]
    Irqchip(#[source] errno::Error),
    #[error("cannot create the in-kernel PIT")]
    Pit(#[source] errno::Error),
    #[error("cannot register memory slot {slot} (gpa {gpa:#x}, {size} bytes)")]
    MemorySlot {
        slot: u32,
        gpa: u64,
        size: u64,
        #[source]
        source: errno::Error,
    },
    #[error("cannot read the host's supported CPUID")]
    SupportedCpuid(#[source] errno::Error),
}

/// Failure to create one vCPU.
#[derive(Debug, thiserror::Error)]
pub enum CreateVcpuError {
    #[error("cannot create vcpu {id}")]
    Create {
        id: u32,
        #[source]
        source: errno::Error,
    },
    #[error("cannot set cpuid on vcpu {id}")]
    SetCpuid {
        id: u32,
        #[source]
        source: errno::Error,
    },
    #[error("cannot read the TSC frequency of vcpu {id}")]
    TscKhz {
        id: u32,
        #[source]
        source: errno::Error,
    },
}

/// Failure to switch or fetch the dirty log.
#[derive(Debug, thiserror::Error)]
pub enum DirtyLogError {
    #[error("cannot change dirty logging on memory slot {slot}")]
    SetFlags {
        slot: u32,
        #[source]
        source: errno::Error,
    },
    #[error("cannot fetch the dirty log of memory slot {slot}")]
    Fetch {
        slot: u32,
        #[source]
        source: errno::Error,
    },
    #[error("dirty logging is not enabled")]
    NotEnabled,
}

/// One KVM memory slot, backed by one region of the memfd.
#[derive(Clone, Debug)]
struct Slot {
    id: u32,
    gpa: u64,
    size: u64,
    host_addr: u64,
    /// Page index (memfd offset / 4096) of the slot's first page.
    first_page: u64,
}

/// What the host's KVM offers, probed once at VM creation and reported in
/// logs: the nested hosts this project runs on lack some of it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct KvmCaps {
    pub irqchip: bool,
    pub pit2: bool,
    pub xsave2: bool,
    pub manual_dirty_log_protect: bool,
    pub dirty_log_ring: bool,
}

/// Dirty-log bookkeeping kept under one lock so that switching the log on
/// or off never races with a fetch.
struct DirtyState {
    enabled: bool,
    /// Pages written by the VMM since the last fetch.
    vmm_written: DirtyBitmap,
}

/// A KVM VM whose RAM is a [`GuestMemory`] memfd.
pub struct Vm {
    kvm: Kvm,
    fd: VmFd,
    mem: Arc<GuestMemory>,
    slots: Vec<Slot>,
    supported_cpuid: CpuId,
    caps: KvmCaps,
    dirty: Mutex<DirtyState>,
}

impl Vm {
    /// Creates the VM, its in-kernel irqchip and PIT, and one memory slot per
    /// region of `mem`'s layout. Dirty logging starts off.
    pub fn create(mem: Arc<GuestMemory>) -> Result<Self, CreateVmError> {
        let kvm = Kvm::new().map_err(CreateVmError::OpenKvm)?;
        let fd = kvm.create_vm().map_err(CreateVmError::CreateVm)?;
        let caps = KvmCaps {
            irqchip: fd.check_extension(Cap::Irqchip),
            pit2: fd.check_extension(Cap::Pit2),
            xsave2: fd.check_extension_int(Cap::Xsave2) > 0,
            manual_dirty_log_protect: fd
                .check_extension_raw(u64::from(kvm_bindings::KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2))
                > 0,
            dirty_log_ring: fd.check_extension_int(Cap::DirtyLogRing) > 0,
        };
        info!(?caps, "kvm capabilities");
        // Only needed for real-mode emulation on Intel; our guests start in
        // long mode, so a host that refuses it is not fatal.
        if let Err(e) = fd.set_tss_address(TSS_ADDRESS) {
            warn!(error = %e, "cannot set the TSS address");
        }
        fd.create_irq_chip().map_err(CreateVmError::Irqchip)?;
        let pit = kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        };
        fd.create_pit2(pit).map_err(CreateVmError::Pit)?;
        let supported_cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .map_err(CreateVmError::SupportedCpuid)?;

        let base = mem.as_ptr() as u64;
        let slots: Vec<Slot> = mem
            .layout()
            .regions()
            .iter()
            .zip(0u32..)
            .map(|(r, id)| Slot {
                id,
                gpa: r.gpa.0,
                size: r.size,
                host_addr: base + r.file_offset,
                first_page: r.file_offset / PAGE_SIZE as u64,
            })
            .collect();
        let pages = mem.layout().total_pages();
        let vm = Vm {
            kvm,
            fd,
            mem,
            slots,
            supported_cpuid,
            caps,
            dirty: Mutex::new(DirtyState {
                enabled: false,
                vmm_written: DirtyBitmap::new(pages),
            }),
        };
        for slot in &vm.slots {
            vm.set_slot(slot, 0)
                .map_err(|source| CreateVmError::MemorySlot {
                    slot: slot.id,
                    gpa: slot.gpa,
                    size: slot.size,
                    source,
                })?;
        }
        debug!(slots = vm.slots.len(), "memory slots registered");
        Ok(vm)
    }

    /// (Re-)registers `slot` with `flags`; used both to create the slot and
    /// to switch `KVM_MEM_LOG_DIRTY_PAGES` on an existing one.
    fn set_slot(&self, slot: &Slot, flags: u32) -> Result<(), errno::Error> {
        let region = kvm_userspace_memory_region {
            slot: slot.id,
            flags,
            guest_phys_addr: slot.gpa,
            memory_size: slot.size,
            userspace_addr: slot.host_addr,
        };
        // SAFETY: `host_addr..host_addr + size` lies inside the MAP_SHARED
        // mapping of the memfd owned by `self.mem` (the layout's regions are
        // validated to fit the file, and GuestMemory maps the whole file).
        // `self` holds an Arc to that mapping, and the VM fd (which keeps the
        // slot) is dropped together with `self`, so the mapping outlives every
        // guest access through the slot.
        unsafe { self.fd.set_user_memory_region(region) }
    }

    /// The VM fd, for VM-wide state save/restore and device setup.
    pub fn fd(&self) -> &VmFd {
        &self.fd
    }

    /// Guest RAM.
    pub fn memory(&self) -> &Arc<GuestMemory> {
        &self.mem
    }

    /// What the host's KVM supports.
    pub fn caps(&self) -> &KvmCaps {
        &self.caps
    }

    /// Creates vCPU `id` with the host's supported CPUID, patched so that the
    /// vCPU reports `id` as its (x2)APIC id and that it runs under a
    /// hypervisor. Returns the fd and the vCPU's TSC frequency in kHz.
    pub fn create_vcpu(&self, id: u32) -> Result<(VcpuFd, u32), CreateVcpuError> {
        let vcpu = self
            .fd
            .create_vcpu(u64::from(id))
            .map_err(|source| CreateVcpuError::Create { id, source })?;
        let cpuid = vcpu_cpuid(&self.supported_cpuid, id);
        vcpu.set_cpuid2(&cpuid)
            .map_err(|source| CreateVcpuError::SetCpuid { id, source })?;
        let tsc_khz = vcpu
            .get_tsc_khz()
            .map_err(|source| CreateVcpuError::TscKhz { id, source })?;
        Ok((vcpu, tsc_khz))
    }

    /// The KVM system fd (for MSR index lists and similar system queries).
    pub fn kvm(&self) -> &Kvm {
        &self.kvm
    }

    fn dirty_state(&self) -> MutexGuard<'_, DirtyState> {
        // The state is two plain fields that no panic can leave half-updated.
        self.dirty.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether KVM dirty logging is on.
    pub fn dirty_logging(&self) -> bool {
        self.dirty_state().enabled
    }

    /// Turns on dirty logging on every slot. From now on each first write to
    /// a page is recorded. Idempotent.
    pub fn start_dirty_log(&self) -> Result<(), DirtyLogError> {
        let mut st = self.dirty_state();
        if st.enabled {
            return Ok(());
        }
        for (n, slot) in self.slots.iter().enumerate() {
            if let Err(source) = self.set_slot(slot, KVM_MEM_LOG_DIRTY_PAGES) {
                // Leave no slot half-switched.
                for s in &self.slots[..n] {
                    let _ = self.set_slot(s, 0);
                }
                return Err(DirtyLogError::SetFlags {
                    slot: slot.id,
                    source,
                });
            }
        }
        st.vmm_written.clear_all();
        st.enabled = true;
        info!("dirty logging started");
        Ok(())
    }

    /// Returns the pages written since the previous fetch (or since the log
    /// was started) and clears them: KVM's per-slot logs, placed at each
    /// slot's page index, ORed with the pages the VMM wrote itself.
    pub fn fetch_dirty_log(&self) -> Result<DirtyBitmap, DirtyLogError> {
        let mut st = self.dirty_state();
        if !st.enabled {
            return Err(DirtyLogError::NotEnabled);
        }
        let mut bitmap = DirtyBitmap::new(self.mem.layout().total_pages());
        for slot in &self.slots {
            let words = self
                .fd
                .get_dirty_log(slot.id, slot.size as usize)
                .map_err(|source| DirtyLogError::Fetch {
                    slot: slot.id,
                    source,
                })?;
            bitmap.merge_words_at(slot.first_page, &words);
        }
        bitmap.merge(&st.vmm_written);
        st.vmm_written.clear_all();
        Ok(bitmap)
    }

    /// Turns dirty logging off on every slot. Idempotent.
    pub fn stop_dirty_log(&self) -> Result<(), DirtyLogError> {
        let mut st = self.dirty_state();
        if !st.enabled {
            return Ok(());
        }
        for slot in &self.slots {
            self.set_slot(slot, 0)
                .map_err(|source| DirtyLogError::SetFlags {
                    slot: slot.id,
                    source,
                })?;
        }
        st.enabled = false;
        info!("dirty logging stopped");
        Ok(())
    }

    /// Records that the VMM wrote `count` pages from page index `first`
    /// directly into guest RAM, so the next dirty-log fetch includes them.
    pub fn note_vmm_write(&self, first: u64, count: u64) {
        let mut st = self.dirty_state();
        if st.enabled {
            let pages = st.vmm_written.pages();
            let end = first.saturating_add(count).min(pages);
            if first < end {
                st.vmm_written.set_range(first, end - first);
            }
        }
    }
}

/// The CPUID for vCPU `id`: the host's supported set, with the APIC ids that
/// the guest reads back (leaf 1 EBX[31:24], the x2APIC id in leaves 0xB and
/// 0x1F EDX) fixed to `id`, and the hypervisor bit set.
pub fn vcpu_cpuid(supported: &CpuId, id: u32) -> CpuId {
    let mut cpuid = supported.clone();
    for entry in cpuid.as_mut_slice() {
        match entry.function {
            1 => {
                entry.ebx = (entry.ebx & 0x00ff_ffff) | ((id & 0xff) << 24);
                entry.ecx |= 1 << 31;
            }
            0xb | 0x1f => entry.edx = id,
            _ => {}
        }
    }
    cpuid
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    #[test]
    fn cpuid_sets_apic_id_per_vcpu() {
        let entries = [
            kvm_cpuid_entry2 {
                function: 1,
                ebx: 0xab12_3456,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 0xb,
                index: 1,
                edx: 77,
                ..Default::default()
            },
            kvm_cpuid_entry2 {
                function: 7,
                ebx: 0x1234,
                ..Default::default()
            },
        ];
        let supported = CpuId::from_entries(&entries).unwrap();
        let c = vcpu_cpuid(&supported, 3);
        let e = c.as_slice();
        assert_eq!(e[0].ebx, 0x0312_3456);
        assert_ne!(e[0].ecx & (1 << 31), 0);
        assert_eq!(e[1].edx, 3);
        assert_eq!(e[2].ebx, 0x1234);
        // The supported set itself is left untouched.
        assert_eq!(supported.as_slice()[0].ebx, 0xab12_3456);
    }
}
