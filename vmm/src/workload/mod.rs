//! The built-in workload guest: a small 64-bit program the VMM loads itself
//! and starts on every vCPU directly in long mode at CPL 3 (IOPL 3, IF = 0).
//!
//! It dirties its share of a working set at a chosen rate, checks on every
//! pass that each page still holds what it wrote on the previous pass, and
//! reports progress and corruption through I/O ports (see [`PortEvent`]) and
//! the COM1 serial console. Its counters live in guest RAM, so they survive
//! snapshot, restore and migration; [`read_counters`] reads them.
//!
//! Ring 3 because on nested KVM (PVM) guest ring-0 code is emulated and about
//! 1000x slower, while ring-3 code runs natively.
//!
//! The same code also runs under QEMU, wrapped in a Multiboot image by
//! [`crate::multiboot`].
//!
//! # Guest memory map (identity mapped)
//!
//! ```text
//! 0x0000            unused
//! 0x1000            params page (fixed: PARAMS_GPA; read-only for the guest)
//! 0x2000            PML4
//! 0x3000            PDPT
//! 0x4000            GDT
//! 0x5000            TSS with I/O permission bitmap
//! 0x6000..          status slots, 64 bytes per vCPU
//! ..                stacks, one 4 KiB page per vCPU
//! ..                page directories, one per GiB holding RAM (2 MiB pages)
//! ..                code
//! wss_gpa..         working set (after the code, or at the start of a
//!                   higher region if it does not fit there)
//! ```
//!
//! # Recovering the layout after a restore
//!
//! [`GuestLayout`] is serialisable and is meant to be stored in `VmState`;
//! it is also derivable from guest memory alone with
//! [`GuestLayout::read_from`], which decodes the params page at the fixed
//! [`PARAMS_GPA`]. The params page also records the [`WorkloadParams`]
//! ([`read_params`]).
//!
//! # KVM setup the guest needs from the VM
//!
//! * One memory slot per guestmem region; `set_tss_address` (Intel KVM
//!   wants it even though the real-mode TSS is never used).
//! * CPUID from `KVM_GET_SUPPORTED_CPUID` (only long mode is needed).
//! * The vCPU's own `KVM_GET_SREGS` as the base for [`initial_vcpu_state`];
//!   then `set_sregs`, `set_regs`, `set_fpu`.
//! * `KVM_MP_STATE_RUNNABLE` on every vCPU: with the in-kernel irqchip the
//!   APs otherwise wait for an INIT/SIPI nobody sends and block in KVM_RUN.
//! * No interrupts: the guest has no IDT. (PVM treats IF as set in user mode,
//!   so an injected interrupt would kill the guest even with IF = 0.)
//! * Ring-3 `out`: RFLAGS has IOPL 3, which bare-metal VMX/SVM honour. PVM
//!   drops IOPL from the hardware RFLAGS after the first exit, so the TSS
//!   also carries an I/O permission bitmap allowing exactly the workload
//!   ports and COM1 (KVM's emulator checks it).
//! * The SLEEP port must be honoured (interruptibly) or a paced/idle guest
//!   spins; everything else is informational.

pub(crate) mod guest;
pub(crate) mod setup;

#[cfg(test)]
mod kvm_tests;
#[cfg(test)]
mod tests;

use std::fmt;
use std::str::FromStr;

use guestmem::{Gpa, GuestMemory, GuestMemoryError, PAGE_SIZE};
use kvm_bindings::{kvm_fpu, kvm_regs, kvm_sregs};
use serde::{Deserialize, Serialize};
use thiserror::Error;

pub use guest::{pattern_words, ports, STARTED_MAGIC};

const PAGE: u64 = PAGE_SIZE as u64;

/// Where the params page lives in every workload guest.
pub const PARAMS_GPA: Gpa = Gpa(0x1000);
/// Most vCPUs the workload supports: the port encoding has 8 bits for the id.
pub const MAX_VCPUS: u32 = 256;
/// Idle mode checks its working set every this many 10 ms ticks.
pub const IDLE_VERIFY_TICKS: u64 = 50;

/// What the guest should do.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkloadParams {
    /// Bytes of guest RAM the guest keeps writing and checking; a multiple
    /// of 4096, split evenly between vCPUs.
    pub wss_bytes: u64,
    pub dirty_rate: DirtyRate,
    pub mode: DirtyMode,
    /// Seeds the page patterns, so two runs with the same seed write the
    /// same bytes.
    pub seed: u64,
}

/// How fast the whole guest dirties its working set.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirtyRate {
    /// Fill once, then only read (check) every [`IDLE_VERIFY_TICKS`] ticks.
    Idle,
    /// Pages dirtied per second × 4 KiB, in MiB/s, summed over all vCPUs.
    MibPerSec(u32),
    /// As fast as the vCPUs go.
    Max,
}

/// How much of each page a pass rewrites.
#[derive(Copy, Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum DirtyMode {
    /// One 8-byte word per page: maximal page dirty rate for little work.
    Sparse,
    /// The whole page, fresh pseudo-random data every pass (incompressible,
    /// no useful XOR delta).
    Full,
}

/// A `--dirty-rate` that is not `0`, a number of MiB/s or `max`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid dirty rate {input:?}: expected 0, a number of MiB/s or \"max\"")]
pub struct ParseDirtyRateError {
    pub input: String,
}

impl FromStr for DirtyRate {
    type Err = ParseDirtyRateError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let t = s.trim();
        if t.eq_ignore_ascii_case("max") {
            return Ok(DirtyRate::Max);
        }
        if t.eq_ignore_ascii_case("idle") {
            return Ok(DirtyRate::Idle);
        }
        match t.parse::<u32>() {
            Ok(0) => Ok(DirtyRate::Idle),
            Ok(n) => Ok(DirtyRate::MibPerSec(n)),
            Err(_) => Err(ParseDirtyRateError { input: s.into() }),
        }
    }
}

impl fmt::Display for DirtyRate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DirtyRate::Idle => f.write_str("0"),
            DirtyRate::MibPerSec(n) => write!(f, "{n}"),
            DirtyRate::Max => f.write_str("max"),
        }
    }
}

/// A `--mode` that is neither `sparse` nor `full`.
#[derive(Debug, Error, Clone, PartialEq, Eq)]
#[error("invalid dirty mode {input:?}: expected \"sparse\" or \"full\"")]
pub struct ParseDirtyModeError {
    pub input: String,
}

impl FromStr for DirtyMode {
    type Err = ParseDirtyModeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim() {
            t if t.eq_ignore_ascii_case("sparse") => Ok(DirtyMode::Sparse),
            t if t.eq_ignore_ascii_case("full") => Ok(DirtyMode::Full),
            _ => Err(ParseDirtyModeError { input: s.into() }),
        }
    }
}

impl fmt::Display for DirtyMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            DirtyMode::Sparse => "sparse",
            DirtyMode::Full => "full",
        })
    }
}

impl DirtyMode {
    /// Words of each page the pattern covers.
    fn words_per_page(self) -> u64 {
        match self {
            DirtyMode::Sparse => 1,
            DirtyMode::Full => PAGE / 8,
        }
    }
}

/// Where the loader put everything in guest memory.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GuestLayout {
    pub vcpus: u32,
    pub params_gpa: Gpa,
    pub pml4_gpa: Gpa,
    pub gdt_gpa: Gpa,
    pub tss_gpa: Gpa,
    /// One 64-byte slot per vCPU (counters, slice).
    pub status_gpa: Gpa,
    /// vCPU `i`'s stack is the page at `stacks_gpa + i * 4096`.
    pub stacks_gpa: Gpa,
    /// Entry point is the first byte.
    pub code_gpa: Gpa,
    pub code_len: u64,
    pub wss_gpa: Gpa,
    pub wss_bytes: u64,
}

impl GuestLayout {
    /// Where the guest starts executing.
    pub fn entry_gpa(&self) -> Gpa {
        self.code_gpa
    }

    /// Status slot of vCPU `id`.
    pub fn status_slot_gpa(&self, id: u32) -> Gpa {
        Gpa(self.status_gpa.0 + u64::from(id) * guest::slot::SIZE as u64)
    }

    /// Initial stack pointer of vCPU `id` (top of its page).
    pub fn stack_top(&self, id: u32) -> Gpa {
        Gpa(self.stacks_gpa.0 + (u64::from(id) + 1) * PAGE)
    }

    /// First page and page count of vCPU `id`'s share of the working set.
    pub fn slice(&self, id: u32) -> (Gpa, u64) {
        let r = guest::slice_pages(self.wss_bytes / PAGE, self.vcpus, id);
        (Gpa(self.wss_gpa.0 + r.start * PAGE), r.end - r.start)
    }

    /// Decodes the layout from the params page of a loaded (or restored)
    /// workload guest.
    pub fn read_from(mem: &GuestMemory) -> Result<GuestLayout, ReadWorkloadError> {
        let p = read_params_page(mem)?;
        let gpa = |off| Gpa(p.get(off));
        let layout = GuestLayout {
            vcpus: u32::try_from(p.get(guest::params::VCPUS)).unwrap_or(u32::MAX),
            params_gpa: PARAMS_GPA,
            pml4_gpa: gpa(guest::params::PML4_GPA),
            gdt_gpa: gpa(guest::params::GDT_GPA),
            tss_gpa: gpa(guest::params::TSS_GPA),
            status_gpa: gpa(guest::params::STATUS_GPA),
            stacks_gpa: gpa(guest::params::STACKS_GPA),
            code_gpa: gpa(guest::params::CODE_GPA),
            code_len: p.get(guest::params::CODE_LEN),
            wss_gpa: gpa(guest::params::WSS_GPA),
            wss_bytes: p.get(guest::params::WSS_BYTES),
        };
        if layout.vcpus == 0 || layout.vcpus > MAX_VCPUS {
            return Err(ReadWorkloadError::BadField {
                field: "vcpus",
                value: u64::from(layout.vcpus),
            });
        }
        // Every structure must be RAM, or the counters would read garbage.
        let ram = |g: Gpa, len: u64| {
            len == 0 || (mem.host_addr(g).is_some() && mem.host_addr(Gpa(g.0 + len - 1)).is_some())
        };
        let checks = [
            (
                "status_gpa",
                layout.status_gpa,
                u64::from(layout.vcpus) * 64,
            ),
            ("code_gpa", layout.code_gpa, layout.code_len),
            ("wss_gpa", layout.wss_gpa, layout.wss_bytes),
        ];
        for (field, g, len) in checks {
            if !ram(g, len) {
                return Err(ReadWorkloadError::BadField { field, value: g.0 });
            }
        }
        Ok(layout)
    }
}

/// Why [`load`] refused.
#[derive(Debug, Error)]
pub enum LoadWorkloadError {
    #[error("the workload supports 1 to {max} vcpus, not {vcpus}")]
    BadVcpuCount { vcpus: u32, max: u32 },
    #[error("working set of {wss_bytes} bytes is not a whole number of 4 KiB pages")]
    WssNotPageMultiple { wss_bytes: u64 },
    #[error("working set of {wss_bytes} bytes leaves some of the {vcpus} vcpus without a page")]
    WssTooSmall { wss_bytes: u64, vcpus: u32 },
    #[error("working set of {wss_bytes} bytes does not fit in guest memory (largest free piece: {available} bytes)")]
    WssTooLarge { wss_bytes: u64, available: u64 },
    #[error("guest memory below {needed:#x} is needed for the workload's own structures")]
    MemoryTooSmall { needed: u64 },
    #[error("guest memory reaches {end:#x}, beyond the {max:#x} the workload maps")]
    MemoryTooLarge { end: u64, max: u64 },
    #[error("a paced dirty rate needs the TSC frequency, but tsc_khz is 0")]
    NoTscFrequency,
    #[error("writing the workload into guest memory")]
    Write(#[source] GuestMemoryError),
}

/// Why the workload's params page could not be decoded.
#[derive(Debug, Error)]
pub enum ReadWorkloadError {
    #[error("reading the workload params page")]
    Read(#[source] GuestMemoryError),
    #[error("no workload params page at {gpa:#x} (magic {found:#x})", gpa = PARAMS_GPA.0)]
    NoParams { found: u64 },
    #[error("workload params version {found}, expected {expected}")]
    Version { found: u64, expected: u64 },
    #[error("workload params field {field} has an impossible value {value:#x}")]
    BadField { field: &'static str, value: u64 },
}

/// The params page as read back from guest memory.
struct ParamsPage(Vec<u8>);

impl ParamsPage {
    fn get(&self, off: usize) -> u64 {
        let mut b = [0u8; 8];
        b.copy_from_slice(&self.0[off..off + 8]);
        u64::from_le_bytes(b)
    }
}

fn read_params_page(mem: &GuestMemory) -> Result<ParamsPage, ReadWorkloadError> {
    let mut buf = vec![0u8; guest::params::LEN];
    mem.read_gpa(PARAMS_GPA, &mut buf)
        .map_err(ReadWorkloadError::Read)?;
    let p = ParamsPage(buf);
    let magic = p.get(guest::params::MAGIC);
    if magic != guest::PARAMS_MAGIC {
        return Err(ReadWorkloadError::NoParams { found: magic });
    }
    let version = p.get(guest::params::VERSION);
    if version != guest::ABI_VERSION {
        return Err(ReadWorkloadError::Version {
            found: version,
            expected: guest::ABI_VERSION,
        });
    }
    Ok(p)
}

/// Reads back the parameters a guest was loaded with.
pub fn read_params(mem: &GuestMemory) -> Result<WorkloadParams, ReadWorkloadError> {
    let p = read_params_page(mem)?;
    let mode = match p.get(guest::params::MODE) {
        0 => DirtyMode::Sparse,
        1 => DirtyMode::Full,
        value => {
            return Err(ReadWorkloadError::BadField {
                field: "mode",
                value,
            })
        }
    };
    let rate_mib = p.get(guest::params::RATE_MIB);
    let dirty_rate = match p.get(guest::params::RATE_KIND) {
        0 => DirtyRate::Idle,
        1 => DirtyRate::MibPerSec(u32::try_from(rate_mib).map_err(|_| {
            ReadWorkloadError::BadField {
                field: "rate_mib",
                value: rate_mib,
            }
        })?),
        2 => DirtyRate::Max,
        value => {
            return Err(ReadWorkloadError::BadField {
                field: "rate_kind",
                value,
            })
        }
    };
    Ok(WorkloadParams {
        wss_bytes: p.get(guest::params::WSS_BYTES),
        dirty_rate,
        mode,
        seed: p.get(guest::params::SEED),
    })
}

/// Bump allocator for the system area, in pages.
struct Alloc(u64);

impl Alloc {
    fn take(&mut self, pages: u64) -> Gpa {
        let g = Gpa(self.0);
        self.0 += pages * PAGE;
        g
    }
}

/// Writes code, page tables, GDT/TSS, params and status slots into fresh
/// guest memory and returns where everything is. `tsc_khz` (from
/// `KVM_GET_TSC_KHZ`) paces the guest; it may be 0 for idle and max rates.
pub fn load(
    mem: &GuestMemory,
    params: &WorkloadParams,
    vcpus: u32,
    tsc_khz: u32,
) -> Result<GuestLayout, LoadWorkloadError> {
    if vcpus == 0 || vcpus > MAX_VCPUS {
        return Err(LoadWorkloadError::BadVcpuCount {
            vcpus,
            max: MAX_VCPUS,
        });
    }
    let mut wss_bytes = params.wss_bytes;
    if !wss_bytes.is_multiple_of(PAGE) {
        return Err(LoadWorkloadError::WssNotPageMultiple { wss_bytes });
    }
    if wss_bytes / PAGE < u64::from(vcpus) {
        return Err(LoadWorkloadError::WssTooSmall { wss_bytes, vcpus });
    }
    let layout = mem.layout();
    let regions = layout.regions();
    let end = regions.last().map_or(0, |r| r.gpa.0 + r.size);
    if end > setup::MAX_MAPPED_GPA {
        return Err(LoadWorkloadError::MemoryTooLarge {
            end,
            max: setup::MAX_MAPPED_GPA,
        });
    }

    let gibs = setup::page_directory_gibs(layout);
    let code = guest::code();
    let mut a = Alloc(PARAMS_GPA.0 + PAGE);
    let pml4 = a.take(1);
    let pdpt = a.take(1);
    let gdt_gpa = a.take(1);
    let tss_gpa = a.take(1);
    let status_gpa = a.take((u64::from(vcpus) * 64).div_ceil(PAGE));
    let stacks_gpa = a.take(u64::from(vcpus));
    let pds = a.take(gibs.len() as u64);
    let code_gpa = a.take((code.len() as u64).div_ceil(PAGE));
    let sys_end = a.0;

    // The system area must be in the first region, which starts at 0.
    let low = regions.first().filter(|r| r.gpa.0 == 0);
    let low_end = low.map_or(0, |r| r.size);
    if sys_end > low_end {
        return Err(LoadWorkloadError::MemoryTooSmall { needed: sys_end });
    }
    let mut pieces = vec![(Gpa(sys_end), low_end - sys_end)];
    pieces.extend(regions.iter().skip(1).map(|r| (r.gpa, r.size)));
    // A working set as large as all of memory means "everything the guest
    // program itself does not use": the largest free piece.
    if wss_bytes == layout.total_bytes() {
        let largest = pieces.iter().map(|p| p.1).max().unwrap_or(0);
        wss_bytes = largest - largest % PAGE;
    }
    let wss_gpa = match pieces.iter().find(|(_, size)| *size >= wss_bytes) {
        Some((g, _)) => *g,
        None => {
            return Err(LoadWorkloadError::WssTooLarge {
                wss_bytes,
                available: pieces.iter().map(|p| p.1).max().unwrap_or(0),
            })
        }
    };

    let (tsc_per_page, idle) = match params.dirty_rate {
        DirtyRate::Idle | DirtyRate::MibPerSec(0) => (0, 1),
        DirtyRate::Max => (0, 0),
        DirtyRate::MibPerSec(mib) => {
            if tsc_khz == 0 {
                return Err(LoadWorkloadError::NoTscFrequency);
            }
            // Each vCPU does 1/vcpus of mib * 256 pages/s.
            let per_page = u128::from(tsc_khz) * 1000 * u128::from(vcpus)
                / (u128::from(mib) * (1 << 20) / u128::from(PAGE));
            (u64::try_from(per_page).unwrap_or(u64::MAX).max(1), 0)
        }
    };
    // TSC ticks per millisecond, and the pacing thresholds derived from it:
    // sleep only when ≥ 1 ms ahead; restart the window when > 100 ms behind;
    // more than 1 s (+ 2 pages) ahead can only be a TSC that went backwards.
    let tsc_ms = u64::from(tsc_khz);
    let sleep_min = tsc_ms;
    let lag_max = tsc_ms * 100;
    let ahead_max = tsc_ms * 1000 + tsc_per_page.saturating_mul(2);
    let (rate_kind, rate_mib) = match params.dirty_rate {
        DirtyRate::Idle => (0, 0),
        DirtyRate::MibPerSec(m) => (if m == 0 { 0 } else { 1 }, u64::from(m)),
        DirtyRate::Max => (2, 0),
    };

    let out = GuestLayout {
        vcpus,
        params_gpa: PARAMS_GPA,
        pml4_gpa: pml4,
        gdt_gpa,
        tss_gpa,
        status_gpa,
        stacks_gpa,
        code_gpa,
        code_len: code.len() as u64,
        wss_gpa,
        wss_bytes,
    };

    use guest::params as p;
    let mut page = vec![0u8; PAGE_SIZE];
    let mut put = |off: usize, v: u64| page[off..off + 8].copy_from_slice(&v.to_le_bytes());
    put(p::MAGIC, guest::PARAMS_MAGIC);
    put(p::VERSION, guest::ABI_VERSION);
    put(p::SEED, params.seed);
    put(p::WORDS_PER_PAGE, params.mode.words_per_page());
    put(p::TSC_PER_PAGE, tsc_per_page);
    put(p::IDLE, idle);
    put(p::TSC_KHZ, tsc_ms);
    put(p::SLEEP_MIN_TSC, sleep_min);
    put(p::LAG_MAX_TSC, lag_max);
    put(p::AHEAD_MAX_TSC, ahead_max);
    put(p::IDLE_VERIFY_TICKS, IDLE_VERIFY_TICKS);
    put(p::VCPUS, u64::from(vcpus));
    put(p::MODE, u64::from(params.mode == DirtyMode::Full));
    put(p::RATE_KIND, rate_kind);
    put(p::RATE_MIB, rate_mib);
    put(p::WSS_GPA, wss_gpa.0);
    put(p::WSS_BYTES, wss_bytes);
    put(p::STATUS_GPA, status_gpa.0);
    put(p::STACKS_GPA, stacks_gpa.0);
    put(p::PML4_GPA, pml4.0);
    put(p::GDT_GPA, gdt_gpa.0);
    put(p::TSS_GPA, tss_gpa.0);
    put(p::CODE_GPA, code_gpa.0);
    put(p::CODE_LEN, code.len() as u64);

    let mut status = vec![0u8; vcpus as usize * guest::slot::SIZE];
    for id in 0..vcpus {
        let (g, n) = out.slice(id);
        let s = id as usize * guest::slot::SIZE;
        status[s + guest::slot::SLICE_GPA..][..8].copy_from_slice(&g.0.to_le_bytes());
        status[s + guest::slot::SLICE_PAGES..][..8].copy_from_slice(&n.to_le_bytes());
    }

    let write = |g: Gpa, bytes: &[u8]| mem.write_gpa(g, bytes).map_err(LoadWorkloadError::Write);
    for (g, bytes) in setup::page_tables(layout, &gibs, pml4, pdpt, pds) {
        write(g, &bytes)?;
    }
    write(gdt_gpa, &setup::gdt(tss_gpa))?;
    write(tss_gpa, &setup::tss())?;
    write(status_gpa, &status)?;
    write(code_gpa, code)?;
    // Params last: a params page with a valid magic means a complete load.
    write(PARAMS_GPA, &page)?;
    Ok(out)
}

/// Initial registers for vCPU `id`: long mode, CPL 3, IOPL 3, IF = 0, at the
/// workload's entry with `rdi` = params, `rsi` = id, `rdx` = status slot and
/// `rsp` = its own stack. `base_sregs` is the vCPU's `KVM_GET_SREGS` (APIC
/// base and the like are kept). Apply with `set_sregs`, `set_regs`,
/// `set_fpu` (sregs first).
pub fn initial_vcpu_state(
    layout: &GuestLayout,
    id: u32,
    base_sregs: &kvm_sregs,
) -> (kvm_regs, kvm_sregs, kvm_fpu) {
    let gdt = setup::gdt(layout.tss_gpa);
    let sregs = setup::sregs(base_sregs, layout.gdt_gpa, &gdt, layout.pml4_gpa);
    let regs = kvm_regs {
        rip: layout.entry_gpa().0,
        rsp: layout.stack_top(id).0,
        rflags: setup::RFLAGS,
        rdi: layout.params_gpa.0,
        rsi: u64::from(id),
        rdx: layout.status_slot_gpa(id).0,
        ..Default::default()
    };
    (regs, sregs, setup::fpu())
}

/// What a guest `out` means.
#[derive(Copy, Clone, Debug, PartialEq, Eq)]
pub enum PortEvent {
    /// vCPU entered the workload (once per boot, not after a restore).
    Started { vcpu: u32 },
    /// vCPU finished pass number `pass` (low 32 bits of its `passes`).
    PassDone { vcpu: u32, pass: u32 },
    /// vCPU found page `gpa` not holding what it wrote last. The pass it was
    /// checking is the vCPU's `passes` counter at that moment.
    Corrupt { vcpu: u32, gpa: Gpa },
    /// vCPU is ahead of its rate budget: sleep it this long (interruptibly).
    Sleep { micros: u32 },
    /// Not a workload port (COM1 included: the VMM's UART handles that).
    Unknown { port: u16 },
}

/// Decodes an `out` from the guest. `data` is the bytes KVM reports
/// (1, 2 or 4, little-endian); missing high bytes read as zero.
pub fn decode_port_io(port: u16, data: &[u8]) -> PortEvent {
    let mut b = [0u8; 4];
    let n = data.len().min(4);
    b[..n].copy_from_slice(&data[..n]);
    let value = u32::from_le_bytes(b);
    let vcpu = u32::from(port & 0xff);
    match port & 0xff00 {
        ports::STARTED_BASE => PortEvent::Started { vcpu },
        ports::PASS_DONE_BASE => PortEvent::PassDone { vcpu, pass: value },
        ports::CORRUPT_BASE => PortEvent::Corrupt {
            vcpu,
            gpa: Gpa(u64::from(value) * PAGE),
        },
        _ if port == ports::SLEEP => PortEvent::Sleep { micros: value },
        _ => PortEvent::Unknown { port },
    }
}

/// Per-vCPU counters, kept by the guest in its status slot.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuCounters {
    /// Completed passes over the vCPU's slice (write passes, or check passes
    /// when idle).
    pub passes: u64,
    pub pages_written: u64,
    /// Pages found not holding what was written.
    pub corrupt: u64,
}

/// Everything in a vCPU's status slot (counters plus internals), for tests
/// and diagnostics.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct VcpuStatus {
    pub counters: VcpuCounters,
    /// Completed write passes: the slice holds pattern(`generation` - 1).
    pub generation: u64,
    /// Idle ticks (10 ms sleeps) so far.
    pub ticks: u64,
    pub last_corrupt_gpa: Gpa,
    pub slice_gpa: Gpa,
    pub slice_pages: u64,
}

/// Reads one aligned u64 of guest RAM in a single load, so a value the guest
/// is updating is never torn. `None` if it is not RAM.
fn read_u64(mem: &GuestMemory, gpa: Gpa) -> Option<u64> {
    if !gpa.0.is_multiple_of(8) {
        return None;
    }
    let p = mem.host_addr(gpa)? as *const u64;
    // SAFETY: `host_addr` returned a pointer into the live guest mapping for
    // this GPA; the GPA is 8-aligned and the mapping is page-aligned, so all
    // 8 bytes are in the same mapped page and the pointer is aligned. The
    // guest may write it concurrently, hence a volatile (single mov) read
    // and no reference to guest memory is created.
    Some(unsafe { p.read_volatile() })
}

/// Reads vCPU `id`'s status slot; zeros for a slot that is not RAM.
pub fn read_status(mem: &GuestMemory, layout: &GuestLayout, id: u32) -> VcpuStatus {
    use guest::slot as s;
    let base = layout.status_slot_gpa(id).0;
    let f = |off: usize| read_u64(mem, Gpa(base + off as u64)).unwrap_or(0);
    VcpuStatus {
        counters: VcpuCounters {
            passes: f(s::PASSES),
            pages_written: f(s::PAGES_WRITTEN),
            corrupt: f(s::CORRUPT),
        },
        generation: f(s::GEN),
        ticks: f(s::TICKS),
        last_corrupt_gpa: Gpa(f(s::LAST_CORRUPT_GPA)),
        slice_gpa: Gpa(f(s::SLICE_GPA)),
        slice_pages: f(s::SLICE_PAGES),
    }
}

/// Reads every vCPU's counters from guest memory. Authoritative: they live in
/// guest RAM, so they survive snapshot/restore and migration.
pub fn read_counters(mem: &GuestMemory, layout: &GuestLayout, vcpus: u32) -> Vec<VcpuCounters> {
    (0..vcpus)
        .map(|id| read_status(mem, layout, id).counters)
        .collect()
}

/// Host-side check of the whole working set, for tests that compare a guest
/// before and after migration while it is paused: returns the pages that
/// hold neither what the owning vCPU's last completed write pass wrote nor
/// what its pass in progress writes (a paused guest can be mid-pass). Before
/// the first pass completes, an all-zero page also counts as good.
pub fn find_corrupt_pages(
    mem: &GuestMemory,
    layout: &GuestLayout,
) -> Result<Vec<Gpa>, ReadWorkloadError> {
    let params = read_params(mem)?;
    let words = params.mode.words_per_page() as usize;
    let mut bad = Vec::new();
    let mut page = vec![0u8; words * 8];
    let expect = |pfn, pass| -> Vec<u8> {
        pattern_words(params.seed, pfn, pass, words)
            .flat_map(u64::to_le_bytes)
            .collect()
    };
    for id in 0..layout.vcpus {
        let gen = read_status(mem, layout, id).generation;
        let (first, pages) = layout.slice(id);
        for i in 0..pages {
            let gpa = Gpa(first.0 + i * PAGE);
            mem.read_gpa(gpa, &mut page)
                .map_err(ReadWorkloadError::Read)?;
            let pfn = gpa.0 / PAGE;
            let ok = page == expect(pfn, gen)
                || if gen == 0 {
                    page.iter().all(|&b| b == 0)
                } else {
                    page == expect(pfn, gen - 1)
                };
            if !ok {
                bad.push(gpa);
            }
        }
    }
    Ok(bad)
}
