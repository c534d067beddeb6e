//! The Multiboot image's own code: the 32-bit entry that switches to long
//! mode at once, the ring-0 pieces (exception stubs, the `ud2` call gate
//! with its sleep, halt and LAPIC calls, the timer ISR) and the ring-3 boot
//! program that parses the command line, maps RAM above 4 GiB, picks the
//! working set from the memory map, fills the workload's params page and
//! jumps into the workload.
//!
//! The assembly (Intel syntax) is in `ring0.s` (entry, ring 0), `ring3.s`
//! (the boot program) and `helpers.s` (parsing, PIT calibration, COM1
//! output, strings), assembled by one `global_asm!` into a read-only
//! section of the VMM binary between `migrated_mb_start` and
//! `migrated_mb_end`; [`super::image`] copies those bytes to
//! [`super::layout::BOOT`]. The code runs only at that address: the 32-bit
//! part uses absolute addresses (const operands), the 64-bit parts reach
//! their own labels RIP-relative and the image's data at absolute
//! addresses.
//!
//! The blob starts with a table of `u32` offsets ([`entry`]) that the image
//! builder reads to fill the multiboot header and the IDT.
//!
//! Ring 0 is emulated about 1000x slower on PVM, so it does as little as
//! possible: everything that loops runs in ring 3.

use super::layout as l;
use super::var;
use crate::workload::setup::selector;

/// Indexes into the offset table at the start of the blob.
pub mod entry {
    /// 32-bit protected-mode entry (the multiboot `entry_addr`).
    pub const ENTRY32: usize = 0;
    /// 256 exception/interrupt stubs, 16 bytes apart.
    pub const STUBS: usize = 1;
    pub const TIMER_ISR: usize = 2;
    pub const SPURIOUS_ISR: usize = 3;
    /// #UD: the `ud2` call gate (see `super::SYS_HALT`), else an exception.
    pub const UD_ISR: usize = 4;
}

/// Bytes between two IDT stubs.
pub const STUB_STRIDE: u64 = 16;

/// Bytes of the assembled boot code.
pub fn code() -> &'static [u8] {
    extern "C" {
        static migrated_mb_start: u8;
        static migrated_mb_end: u8;
    }
    // SAFETY: both symbols are defined by the `global_asm!` below, in the same
    // read-only section, start before end; the bytes between them are the
    // assembled code, immutable for the life of the process. Only their
    // addresses are taken here.
    unsafe {
        let start = core::ptr::addr_of!(migrated_mb_start);
        let end = core::ptr::addr_of!(migrated_mb_end);
        let len = (end as usize).saturating_sub(start as usize);
        std::slice::from_raw_parts(start, len)
    }
}

/// Offset of table entry `i` (one of [`entry`]) from the start of the blob.
pub fn offset(i: usize) -> u64 {
    let c = code();
    let b = [c[i * 4], c[i * 4 + 1], c[i * 4 + 2], c[i * 4 + 3]];
    u64::from(u32::from_le_bytes(b))
}

/// Multiboot v1 bootloader magic in EAX at entry.
const MB_BOOT_MAGIC: u32 = 0x2bad_b002;
/// Bytes of the Multiboot info block the boot program reads.
const MBI_LEN: u64 = 52;
/// PIT input clock, Hz.
const PIT_HZ: u64 = 1_193_182;
/// PIT channel 2 count for the TSC calibration: 50 ms.
const PIT_LATCH: u64 = PIT_HZ / 20;
/// Give up calibrating after this many TSC ticks (seconds at any real rate).
const PIT_GIVE_UP_TSC: u64 = 1 << 34;
/// LVT timer: TSC-deadline mode (bits 18:17 = 10b).
const LVT_TSC_DEADLINE: u32 = 2 << 17;

// Intel syntax. Labels are assembler-local (`.Lmb_`) except the two
// delimiting symbols. Absolute addresses come in as const operands.
core::arch::global_asm!(
    include_str!("ring0.s"),
    include_str!("ring3.s"),
    include_str!("helpers.s"),
    BOOT = const l::LOAD_GPA + l::BOOT,
    PML4 = const l::LOAD_GPA + l::PML4,
    PDPT = const l::LOAD_GPA + l::PDPT,
    TABLE_FLAGS = const super::TABLE_FLAGS,
    LEAF_FLAGS = const super::LEAF_FLAGS,
    MAX_MAPPED = const crate::workload::setup::MAX_MAPPED_GPA,
    MBI_LEN = const MBI_LEN,
    GDTR = const l::LOAD_GPA + var::GDTR,
    IDTR = const l::LOAD_GPA + var::IDTR,
    PARAMS = const l::LOAD_GPA + l::PARAMS,
    STATUS = const l::LOAD_GPA + l::STATUS,
    STACK0_TOP = const l::LOAD_GPA + l::STACK0 + 4096,
    STACK3_TOP = const l::LOAD_GPA + l::STACK3 + 4096,
    V_MAGIC = const l::LOAD_GPA + var::MAGIC,
    V_MBI = const l::LOAD_GPA + var::MBI,
    V_MAPPED_TOP = const l::LOAD_GPA + var::MAPPED_TOP,
    V_X2APIC = const l::LOAD_GPA + var::X2APIC,
    V_FREE = const l::LOAD_GPA + var::FREE,
    V_RAM = const l::LOAD_GPA + var::RAM,
    V_WSS = const l::LOAD_GPA + var::WSS,
    V_WSS_MAX = const l::LOAD_GPA + var::WSS_MAX,
    V_RATE_KIND = const l::LOAD_GPA + var::RATE_KIND,
    V_RATE_MIB = const l::LOAD_GPA + var::RATE_MIB,
    V_MODE = const l::LOAD_GPA + var::MODE,
    V_SEED = const l::LOAD_GPA + var::SEED,
    V_TSC_KHZ = const l::LOAD_GPA + var::TSC_KHZ,
    V_TSC_FROM = const l::LOAD_GPA + var::TSC_FROM,
    V_PROGRESS_MS = const l::LOAD_GPA + var::PROGRESS_MS,
    V_SLEEP = const l::LOAD_GPA + var::SLEEP,
    V_SELFTEST = const l::LOAD_GPA + var::SELFTEST,
    CR0 = const crate::workload::setup::CR0,
    CR4 = const crate::workload::setup::CR4,
    KERNEL_CS = const selector::KERNEL_CS,
    KERNEL_DS = const selector::KERNEL_DS,
    USER_CS = const selector::USER_CS,
    USER_DS = const selector::USER_DS,
    TSS_SEL = const selector::TSS,
    RFLAGS3 = const crate::workload::setup::RFLAGS,
    MB_BOOT_MAGIC = const MB_BOOT_MAGIC,
    TIMER_VECTOR = const super::TIMER_VECTOR,
    LVT_TSC_DEADLINE = const LVT_TSC_DEADLINE,
    SYS_SLEEP = const crate::workload::guest::SLEEP_CALL,
    SYS_HALT = const super::SYS_HALT,
    SYS_LAPIC = const super::SYS_LAPIC,
    SYS_KVMCLOCK = const super::SYS_KVMCLOCK,
    PVCLOCK = const l::LOAD_GPA + var::PVCLOCK,
    NS_KHZ_SHIFTED = const 1_000_000u64 << 32,
    SLEEP_GATE = const crate::workload::guest::sleep::GATE,
    SLEEP_SPIN = const crate::workload::guest::sleep::SPIN,
    PIT_HZ = const PIT_HZ,
    PIT_LATCH_LO = const PIT_LATCH & 0xff,
    PIT_LATCH_HI = const PIT_LATCH >> 8,
    PIT_LATCH_KHZ = const PIT_LATCH * 1000,
    PIT_GIVE_UP_TSC = const PIT_GIVE_UP_TSC,
    COM1 = const crate::workload::guest::ports::COM1,
    P_WSS_BYTES = const crate::workload::guest::params::WSS_BYTES,
    P_WSS_GPA = const crate::workload::guest::params::WSS_GPA,
    P_SEED = const crate::workload::guest::params::SEED,
    P_MODE = const crate::workload::guest::params::MODE,
    P_WORDS_PER_PAGE = const crate::workload::guest::params::WORDS_PER_PAGE,
    P_TSC_KHZ = const crate::workload::guest::params::TSC_KHZ,
    P_SLEEP_MIN_TSC = const crate::workload::guest::params::SLEEP_MIN_TSC,
    P_LAG_MAX_TSC = const crate::workload::guest::params::LAG_MAX_TSC,
    P_AHEAD_MAX_TSC = const crate::workload::guest::params::AHEAD_MAX_TSC,
    P_RATE_KIND = const crate::workload::guest::params::RATE_KIND,
    P_RATE_MIB = const crate::workload::guest::params::RATE_MIB,
    P_IDLE = const crate::workload::guest::params::IDLE,
    P_TSC_PER_PAGE = const crate::workload::guest::params::TSC_PER_PAGE,
    P_SLEEP_HOW = const crate::workload::guest::params::SLEEP_HOW,
    P_PROGRESS_TSC = const crate::workload::guest::params::PROGRESS_TSC,
    P_CODE_GPA = const crate::workload::guest::params::CODE_GPA,
    S_SLICE_GPA = const crate::workload::guest::slot::SLICE_GPA,
    S_SLICE_PAGES = const crate::workload::guest::slot::SLICE_PAGES,
);
