//! The guest program itself: x86-64 code that runs in ring 3 on every vCPU,
//! and the ABI it shares with the loader (params page, status slots, ports).
//!
//! The code is assembled by `global_asm!` into a read-only data section of the
//! VMM binary, between the symbols `migrated_workload_start` and
//! `migrated_workload_end`; the loader copies those bytes into guest memory.
//! It is position independent (only RIP-relative and register-based
//! addressing), so it runs wherever the loader puts it.
//!
//! Registers at entry (set by [`super::initial_vcpu_state`]): `rdi` = params
//! page GPA, `rsi` = vCPU id, `rdx` = this vCPU's status slot GPA, `rsp` = top
//! of this vCPU's stack. Guest virtual addresses equal guest-physical ones
//! (identity map).
//!
//! # Algorithm
//!
//! Every vCPU owns a slice of the working set (`slice_gpa`, `slice_pages` in
//! its status slot). The slot's `gen` counts completed *write* passes; after
//! `gen` write passes page `p` holds `pattern(seed, pfn(p), gen - 1)`, where
//! the pattern is a xorshift64 stream seeded by a splitmix64 hash of
//! `(seed, pfn, pass)`. Full mode uses the whole page (512 words), sparse
//! mode only its first word.
//!
//! * Write pass (paced or max): for each page, if `gen > 0` check it still
//!   holds `pattern(gen - 1)` (report CORRUPT if not), then write
//!   `pattern(gen)`. At the end `gen += 1`, `passes += 1`, report PASS_DONE.
//!   Because the expected content follows from `gen` in guest memory and the
//!   loop position lives in registers, a snapshot taken at any instruction
//!   boundary and restored elsewhere carries on checking correctly.
//! * Idle: after the first write pass, sleep 10 ms per tick via the SLEEP
//!   port; every `idle_verify_ticks` ticks do a read-only check pass
//!   (`passes += 1`, PASS_DONE). A corrupt page is rewritten with the expected
//!   content so that one corruption is reported once.
//! * Pacing: after each page, compare pages written in the current window
//!   (`rbx`) times `tsc_per_page` with TSC ticks elapsed since the window
//!   start (`r12`). When ahead by at least `sleep_min_tsc`, ask the VMM to
//!   sleep (SLEEP port, microseconds) and check again. When far behind (e.g.
//!   after a pause or migration) or the TSC went backwards, restart the
//!   window instead of bursting to catch up.
//!
//! * Without our VMM (the Multiboot image under QEMU, [`crate::multiboot`]),
//!   params added after `CODE_LEN` change three things, all off (zero) when
//!   our loader writes the page: `FLAGS` can drop the port `out`s,
//!   `SLEEP_HOW` replaces the SLEEP port by a spin on the TSC or a `ud2`
//!   call into the image's ring-0 code, and `PROGRESS_TSC` prints a
//!   `PROGRESS` line on COM1 at most that often.
//!
//! Long-lived registers: r15 = params, r14 = status slot, r13 = vCPU id,
//! r12 = pacing window start TSC, rbx = pages in pacing window, rbp = page
//! index inside the current pass. Subroutines clobber rax, rcx, rdx, rsi,
//! rdi, r8-r11.

use std::ops::Range;

/// Magic at the start of the params page: "MIGWKLD1" little-endian.
pub const PARAMS_MAGIC: u64 = u64::from_le_bytes(*b"MIGWKLD1");
/// Version of the params/status/port ABI below.
pub const ABI_VERSION: u64 = 1;

/// Params page field offsets (u64 each). Written by the loader, only read by
/// the guest, so the params page is never dirtied.
pub mod params {
    pub const MAGIC: usize = 0x00;
    pub const VERSION: usize = 0x08;
    pub const SEED: usize = 0x10;
    /// 1 (sparse) or 512 (full): how many words of each page the pattern covers.
    pub const WORDS_PER_PAGE: usize = 0x18;
    /// TSC ticks per page per vCPU at the configured rate; 0 = unpaced.
    pub const TSC_PER_PAGE: usize = 0x20;
    /// 1 = idle mode (fill once, then verify read-only every few ticks).
    pub const IDLE: usize = 0x28;
    pub const TSC_KHZ: usize = 0x30;
    /// Don't bother the VMM for sleeps shorter than this (TSC ticks).
    pub const SLEEP_MIN_TSC: usize = 0x38;
    /// Lag behind schedule (TSC ticks) after which the pacing window restarts.
    pub const LAG_MAX_TSC: usize = 0x40;
    /// Lead ahead of schedule (TSC ticks) that can only mean a TSC jump back.
    pub const AHEAD_MAX_TSC: usize = 0x48;
    pub const IDLE_VERIFY_TICKS: usize = 0x50;
    pub const VCPUS: usize = 0x58;
    pub const MODE: usize = 0x60;
    pub const RATE_KIND: usize = 0x68;
    pub const RATE_MIB: usize = 0x70;
    pub const WSS_GPA: usize = 0x78;
    pub const WSS_BYTES: usize = 0x80;
    pub const STATUS_GPA: usize = 0x88;
    pub const STACKS_GPA: usize = 0x90;
    pub const PML4_GPA: usize = 0x98;
    pub const GDT_GPA: usize = 0xa0;
    pub const TSS_GPA: usize = 0xa8;
    pub const CODE_GPA: usize = 0xb0;
    pub const CODE_LEN: usize = 0xb8;
    /// Bits of [`super::flags`]. 0 under our own VMM.
    pub const FLAGS: usize = 0xc0;
    /// How the guest waits, one of [`super::sleep`]. 0 under our own VMM.
    pub const SLEEP_HOW: usize = 0xc8;
    /// Print a `PROGRESS` line on COM1 at most every this many TSC ticks
    /// (checked every 64 pages and at the end of each pass); 0 = never.
    pub const PROGRESS_TSC: usize = 0xd0;
    /// Bytes of the params page that carry fields.
    pub const LEN: usize = 0xd8;
}

/// Bits of the `FLAGS` param. The fields after `CODE_LEN` were added for
/// guests that run without our VMM (the Multiboot image under QEMU): a
/// params page written before them holds zeros there, which keeps the
/// original behaviour, so the ABI version did not change.
pub mod flags {
    /// No VMM listens on the workload ports: skip the STARTED, PASS_DONE
    /// and CORRUPT `out`s (each would be a useless exit).
    pub const NO_PORTS: u64 = 1 << 0;
}

/// Values of the `SLEEP_HOW` param.
pub mod sleep {
    /// `out` to the SLEEP port: the VMM sleeps the vCPU thread.
    pub const PORT: u64 = 0;
    /// Spin on `rdtsc` with `pause` until the time is up.
    pub const SPIN: u64 = 1;
    /// `ud2` with `eax` = [`super::SLEEP_CALL`] and `rdx` = the TSC
    /// deadline: the image's #UD handler (ring 0) arms a timer, halts until
    /// it fires and resumes after the `ud2`.
    pub const GATE: u64 = 2;
}

/// Call number (eax at the `ud2`) of the sleep call (see [`sleep::GATE`]).
pub const SLEEP_CALL: u32 = 0;

/// Status slot field offsets (u64 each). One 64-byte slot (a cache line) per
/// vCPU, written by the guest; `SLICE_*` are written once by the loader.
pub mod slot {
    pub const PASSES: usize = 0x00;
    pub const PAGES_WRITTEN: usize = 0x08;
    pub const CORRUPT: usize = 0x10;
    /// Completed write passes: the data in the slice is `pattern(gen - 1)`.
    pub const GEN: usize = 0x18;
    pub const TICKS: usize = 0x20;
    pub const LAST_CORRUPT_GPA: usize = 0x28;
    pub const SLICE_GPA: usize = 0x30;
    pub const SLICE_PAGES: usize = 0x38;
    pub const SIZE: usize = 0x40;
}

/// `out` ports. The vCPU id is added to the `*_BASE` ports so that one 32-bit
/// `out` carries both the id and a value.
pub mod ports {
    /// + vcpu, data = [`super::STARTED_MAGIC`].
    pub const STARTED_BASE: u16 = 0x7000;
    /// + vcpu, data = low 32 bits of the completed pass count.
    pub const PASS_DONE_BASE: u16 = 0x7100;
    /// + vcpu, data = page frame number (gpa >> 12) of the corrupt page.
    pub const CORRUPT_BASE: u16 = 0x7200;
    /// data = microseconds the vCPU asks to sleep.
    pub const SLEEP: u16 = 0x7300;
    /// COM1 data register: the guest writes its banner and CORRUPT lines here.
    pub const COM1: u16 = 0x3f8;
}

/// Data of the STARTED `out`: "WL" and the ABI version.
pub const STARTED_MAGIC: u32 = 0x574c_0000 | ABI_VERSION as u32;
/// Sleep per idle tick.
pub const IDLE_TICK_US: u32 = 10_000;
/// Upper bound of a single pacing sleep; the guest re-checks after each.
pub const MAX_SLEEP_US: u32 = 100_000;
/// Only the first this many corruptions of a vCPU are printed on the serial
/// console (each byte is an exit); all are counted and sent to the port.
pub const SERIAL_CORRUPT_LINES: u64 = 16;

const MIX_PFN: u64 = 0x9E37_79B9_7F4A_7C15;
const MIX_PASS: u64 = 0xD1B5_4A32_D192_ED03;
const MIX_1: u64 = 0xBF58_476D_1CE4_E5B9;
const MIX_2: u64 = 0x94D0_49BB_1331_11EB;

/// Starting state of the pattern stream of one page in one pass: a
/// splitmix64 finalizer over `(seed, pfn, pass)`, forced non-zero because
/// xorshift64 would stay at zero forever.
pub fn pattern_seed(seed: u64, pfn: u64, pass: u64) -> u64 {
    let mut z = pfn.wrapping_mul(MIX_PFN) ^ pass.wrapping_mul(MIX_PASS) ^ seed;
    z = (z ^ (z >> 30)).wrapping_mul(MIX_1);
    z = (z ^ (z >> 27)).wrapping_mul(MIX_2);
    (z ^ (z >> 31)) | 1
}

/// One xorshift64 step (13, 7, 17).
pub fn xorshift64(mut x: u64) -> u64 {
    x ^= x << 13;
    x ^= x >> 7;
    x ^= x << 17;
    x
}

/// What the guest writes into the first `words` words of page `pfn` in
/// write pass `pass`: the reference the tests check guest memory against.
pub fn pattern_words(seed: u64, pfn: u64, pass: u64, words: usize) -> impl Iterator<Item = u64> {
    let mut x = pattern_seed(seed, pfn, pass);
    (0..words).map(move |_| {
        x = xorshift64(x);
        x
    })
}

/// Page indexes (relative to the working set) of vCPU `id`'s slice: the
/// working set split as evenly as possible, in vCPU order.
pub fn slice_pages(wss_pages: u64, vcpus: u32, id: u32) -> Range<u64> {
    let n = u128::from(vcpus.max(1));
    let at = |i: u32| (u128::from(wss_pages) * u128::from(i) / n) as u64;
    at(id)..at(id + 1)
}

/// Bytes of the assembled guest program.
pub fn code() -> &'static [u8] {
    extern "C" {
        static migrated_workload_start: u8;
        static migrated_workload_end: u8;
    }
    // SAFETY: both symbols are defined by the `global_asm!` below, in the same
    // read-only section, start before end; the bytes between them are the
    // assembled program, immutable for the life of the process. Only their
    // addresses are taken here.
    unsafe {
        let start = core::ptr::addr_of!(migrated_workload_start);
        let end = core::ptr::addr_of!(migrated_workload_end);
        let len = (end as usize).saturating_sub(start as usize);
        std::slice::from_raw_parts(start, len)
    }
}

// The guest program. Intel syntax. Labels are assembler-local (`.L`) except
// the two delimiting symbols.
core::arch::global_asm!(
    ".pushsection .rodata.migrated_workload,\"a\",@progbits",
    ".balign 16",
    ".globl migrated_workload_start",
    "migrated_workload_start:",
    // x = xorshift64(x) on rax, rdx scratch.
    ".macro wl_xorshift",
    "    mov rdx, rax",
    "    shl rdx, 13",
    "    xor rax, rdx",
    "    mov rdx, rax",
    "    shr rdx, 7",
    "    xor rax, rdx",
    "    mov rdx, rax",
    "    shl rdx, 17",
    "    xor rax, rdx",
    ".endm",
    // ---- entry ----
    "    mov r15, rdi",
    "    mov r14, rdx",
    "    mov r13, rsi",
    "    mov edx, r13d",
    "    add edx, {PORT_STARTED}",
    "    mov eax, {STARTED_MAGIC}",
    "    call .Lwl_port_out",
    // vCPU 0 greets the serial console.
    "    test r13, r13",
    "    jnz .Lwl_after_banner",
    "    lea rsi, [rip + .Lwl_banner]",
    "    call .Lwl_puts",
    "    mov rax, [r15 + {P_VCPUS}]",
    "    call .Lwl_putdec",
    "    lea rsi, [rip + .Lwl_banner2]",
    "    call .Lwl_puts",
    ".Lwl_after_banner:",
    "    call .Lwl_pace_reset",
    // ---- main loop: write passes, or idle ticks once the set is filled ----
    ".Lwl_main:",
    "    cmp qword ptr [r15 + {P_IDLE}], 0",
    "    je .Lwl_do_write",
    "    cmp qword ptr [r14 + {S_GEN}], 0",
    "    jne .Lwl_idle",
    ".Lwl_do_write:",
    "    call .Lwl_write_pass",
    "    jmp .Lwl_main",
    ".Lwl_idle:",
    "    mov eax, {IDLE_TICK_US}",
    "    call .Lwl_sleep",
    "    inc qword ptr [r14 + {S_TICKS}]",
    "    mov rax, [r14 + {S_TICKS}]",
    "    xor edx, edx",
    "    div qword ptr [r15 + {P_IDLE_VERIFY_TICKS}]",
    "    test rdx, rdx",
    "    jnz .Lwl_main",
    "    call .Lwl_verify_pass",
    "    jmp .Lwl_main",
    // ---- write pass: check pattern(gen-1), write pattern(gen), per page ----
    ".Lwl_write_pass:",
    "    xor ebp, ebp",
    ".Lwl_wp_loop:",
    "    cmp rbp, [r14 + {S_SLICE_PAGES}]",
    "    jae .Lwl_wp_done",
    "    mov rdi, rbp",
    "    shl rdi, 12",
    "    add rdi, [r14 + {S_SLICE_GPA}]",
    "    mov rcx, [r14 + {S_GEN}]",
    "    test rcx, rcx",
    "    jz .Lwl_wp_fill",
    "    dec rcx",
    "    push rdi",
    "    call .Lwl_check_page",
    "    pop rdi",
    "    test eax, eax",
    "    jz .Lwl_wp_fill",
    "    push rdi",
    "    call .Lwl_report_corrupt",
    "    pop rdi",
    ".Lwl_wp_fill:",
    "    mov rcx, [r14 + {S_GEN}]",
    "    call .Lwl_fill_page",
    "    inc qword ptr [r14 + {S_PAGES_WRITTEN}]",
    "    inc rbp",
    "    inc rbx",
    "    call .Lwl_pace",
    "    test ebp, 63",
    "    jnz .Lwl_wp_loop",
    "    call .Lwl_progress",
    "    jmp .Lwl_wp_loop",
    ".Lwl_wp_done:",
    "    inc qword ptr [r14 + {S_GEN}]",
    "    inc qword ptr [r14 + {S_PASSES}]",
    "    mov eax, [r14 + {S_PASSES}]",
    "    mov edx, r13d",
    "    add edx, {PORT_PASS_DONE}",
    "    call .Lwl_port_out",
    "    jmp .Lwl_progress",
    // ---- idle check pass: read-only unless a page is corrupt ----
    ".Lwl_verify_pass:",
    "    xor ebp, ebp",
    ".Lwl_vp_loop:",
    "    cmp rbp, [r14 + {S_SLICE_PAGES}]",
    "    jae .Lwl_vp_done",
    "    mov rdi, rbp",
    "    shl rdi, 12",
    "    add rdi, [r14 + {S_SLICE_GPA}]",
    "    mov rcx, [r14 + {S_GEN}]",
    "    dec rcx",
    "    push rdi",
    "    call .Lwl_check_page",
    "    pop rdi",
    "    test eax, eax",
    "    jz .Lwl_vp_next",
    "    push rdi",
    "    call .Lwl_report_corrupt",
    "    pop rdi",
    "    mov rcx, [r14 + {S_GEN}]",
    "    dec rcx",
    "    call .Lwl_fill_page",
    ".Lwl_vp_next:",
    "    inc rbp",
    "    jmp .Lwl_vp_loop",
    ".Lwl_vp_done:",
    "    inc qword ptr [r14 + {S_PASSES}]",
    "    mov eax, [r14 + {S_PASSES}]",
    "    mov edx, r13d",
    "    add edx, {PORT_PASS_DONE}",
    "    call .Lwl_port_out",
    "    jmp .Lwl_progress",
    // ---- rax = pattern_seed(seed, rdi >> 12, rcx); keeps rdi, rcx ----
    ".Lwl_seed:",
    "    mov rax, rdi",
    "    shr rax, 12",
    "    movabs rdx, {MIX_PFN}",
    "    imul rax, rdx",
    "    mov r10, rcx",
    "    movabs rdx, {MIX_PASS}",
    "    imul r10, rdx",
    "    xor rax, r10",
    "    xor rax, [r15 + {P_SEED}]",
    "    mov rdx, rax",
    "    shr rdx, 30",
    "    xor rax, rdx",
    "    movabs rdx, {MIX_1}",
    "    imul rax, rdx",
    "    mov rdx, rax",
    "    shr rdx, 27",
    "    xor rax, rdx",
    "    movabs rdx, {MIX_2}",
    "    imul rax, rdx",
    "    mov rdx, rax",
    "    shr rdx, 31",
    "    xor rax, rdx",
    "    or rax, 1",
    "    ret",
    // ---- eax = 1 if page rdi does not hold pattern(rcx), else 0 ----
    // Differences are ORed together rather than branching per word.
    ".Lwl_check_page:",
    "    call .Lwl_seed",
    "    mov rsi, [r15 + {P_WORDS_PER_PAGE}]",
    "    xor r8d, r8d",
    "    mov r9, rdi",
    ".Lwl_check_loop:",
    "    wl_xorshift",
    "    mov r10, [r9]",
    "    xor r10, rax",
    "    or r8, r10",
    "    add r9, 8",
    "    dec rsi",
    "    jnz .Lwl_check_loop",
    "    xor eax, eax",
    "    test r8, r8",
    "    setnz al",
    "    ret",
    // ---- write pattern(rcx) into page rdi ----
    ".Lwl_fill_page:",
    "    call .Lwl_seed",
    "    mov rsi, [r15 + {P_WORDS_PER_PAGE}]",
    "    mov r9, rdi",
    ".Lwl_fill_loop:",
    "    wl_xorshift",
    "    mov [r9], rax",
    "    add r9, 8",
    "    dec rsi",
    "    jnz .Lwl_fill_loop",
    "    ret",
    // ---- page rdi failed its check: count, tell the VMM, maybe print ----
    ".Lwl_report_corrupt:",
    "    inc qword ptr [r14 + {S_CORRUPT}]",
    "    mov [r14 + {S_LAST_CORRUPT_GPA}], rdi",
    "    mov rax, rdi",
    "    shr rax, 12",
    "    mov edx, r13d",
    "    add edx, {PORT_CORRUPT}",
    "    call .Lwl_port_out",
    "    cmp qword ptr [r14 + {S_CORRUPT}], {SERIAL_CORRUPT_LINES}",
    "    ja .Lwl_rc_done",
    "    push rdi",
    "    lea rsi, [rip + .Lwl_msg_corrupt]",
    "    call .Lwl_puts",
    "    mov rax, r13",
    "    call .Lwl_putdec",
    "    lea rsi, [rip + .Lwl_msg_gpa]",
    "    call .Lwl_puts",
    "    mov rax, [rsp]",
    "    call .Lwl_puthex",
    "    lea rsi, [rip + .Lwl_msg_pass]",
    "    call .Lwl_puts",
    "    mov rax, [r14 + {S_GEN}]",
    "    dec rax",
    "    call .Lwl_putdec",
    "    mov al, 10",
    "    call .Lwl_putc",
    "    pop rdi",
    ".Lwl_rc_done:",
    "    ret",
    // ---- pacing ----
    ".Lwl_pace_reset:",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r12, rax",
    "    xor ebx, ebx",
    "    ret",
    ".Lwl_pace:",
    "    mov r8, [r15 + {P_TSC_PER_PAGE}]",
    "    test r8, r8",
    "    jz .Lwl_pace_ret",
    ".Lwl_pace_check:",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r9, rax",
    "    sub rax, r12",
    "    mov r10, rax",
    "    mov rax, rbx",
    "    imul rax, r8",
    "    cmp rax, r10",
    "    jbe .Lwl_pace_behind",
    // Ahead of schedule by rax - r10 ticks.
    "    sub rax, r10",
    "    cmp rax, [r15 + {P_AHEAD_MAX_TSC}]",
    "    ja .Lwl_pace_reset",
    "    cmp rax, [r15 + {P_SLEEP_MIN_TSC}]",
    "    jb .Lwl_pace_ret",
    "    imul rax, rax, 1000",
    "    xor edx, edx",
    "    div qword ptr [r15 + {P_TSC_KHZ}]",
    "    cmp rax, {MAX_SLEEP_US}",
    "    jbe .Lwl_pace_sleep",
    "    mov eax, {MAX_SLEEP_US}",
    ".Lwl_pace_sleep:",
    "    call .Lwl_sleep",
    "    jmp .Lwl_pace",
    // On time or behind by r10 - rax ticks.
    ".Lwl_pace_behind:",
    "    sub r10, rax",
    "    cmp r10, [r15 + {P_LAG_MAX_TSC}]",
    "    ja .Lwl_pace_reset",
    ".Lwl_pace_ret:",
    "    ret",
    // ---- waiting: eax = microseconds; clobbers rax, rcx, rdx, r8 ----
    ".Lwl_sleep:",
    "    mov rcx, [r15 + {P_SLEEP_HOW}]",
    "    cmp rcx, {SLEEP_PORT}",
    "    jne .Lwl_sleep_local",
    "    mov edx, {PORT_SLEEP}",
    "    out dx, eax",
    "    ret",
    // No VMM to sleep in: wait for TSC deadline = now + us * tsc_khz / 1000.
    ".Lwl_sleep_local:",
    "    mov eax, eax",
    "    imul rax, [r15 + {P_TSC_KHZ}]",
    "    xor edx, edx",
    "    mov r8d, 1000",
    "    div r8",
    "    mov r8, rax",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    add r8, rax",
    "    cmp rcx, {SLEEP_GATE}",
    "    jne .Lwl_sleep_spin",
    "    mov rdx, r8",
    "    mov eax, {SLEEP_CALL}",
    "    ud2",
    "    ret",
    ".Lwl_sleep_spin:",
    "    pause",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    cmp rax, r8",
    "    jb .Lwl_sleep_spin",
    "    ret",
    // ---- edx = port, eax = value: out unless no VMM listens ----
    ".Lwl_port_out:",
    "    test qword ptr [r15 + {P_FLAGS}], {FLAG_NO_PORTS}",
    "    jnz .Lwl_port_out_ret",
    "    out dx, eax",
    ".Lwl_port_out_ret:",
    "    ret",
    // ---- PROGRESS line on COM1 when one is due (PROGRESS_TSC != 0) ----
    // The next deadline lives in the lowest word of this vCPU's stack page
    // (the stack never grows that deep), so it is per vCPU, in guest RAM
    // (survives migration) and needs no slot field.
    ".Lwl_progress:",
    "    mov r8, [r15 + {P_PROGRESS_TSC}]",
    "    test r8, r8",
    "    jz .Lwl_progress_ret",
    "    rdtsc",
    "    shl rdx, 32",
    "    or rax, rdx",
    "    mov r9, rsp",
    "    and r9, -4096",
    "    lea r11, [rax + r8]",
    // A deadline more than one interval away means the TSC went back:
    // re-arm rather than stay silent until it catches up.
    "    cmp [r9], r11",
    "    ja .Lwl_progress_arm",
    "    cmp rax, [r9]",
    "    jb .Lwl_progress_ret",
    "    mov [r9], r11",
    "    push rax",
    "    lea rsi, [rip + .Lwl_msg_progress]",
    "    call .Lwl_puts",
    "    mov rax, r13",
    "    call .Lwl_putdec",
    "    lea rsi, [rip + .Lwl_msg_passes]",
    "    call .Lwl_puts",
    "    mov rax, [r14 + {S_PASSES}]",
    "    call .Lwl_putdec",
    "    lea rsi, [rip + .Lwl_msg_pages]",
    "    call .Lwl_puts",
    "    mov rax, [r14 + {S_PAGES_WRITTEN}]",
    "    call .Lwl_putdec",
    "    lea rsi, [rip + .Lwl_msg_corrupt_n]",
    "    call .Lwl_puts",
    "    mov rax, [r14 + {S_CORRUPT}]",
    "    call .Lwl_putdec",
    "    lea rsi, [rip + .Lwl_msg_tsc]",
    "    call .Lwl_puts",
    "    pop rax",
    "    call .Lwl_putdec",
    "    mov al, 10",
    "    jmp .Lwl_putc",
    ".Lwl_progress_arm:",
    "    mov [r9], r11",
    ".Lwl_progress_ret:",
    "    ret",
    // ---- serial output (COM1 data register; the VMM's UART is always ready) ----
    ".Lwl_putc:",
    "    push rdx",
    "    mov edx, {PORT_COM1}",
    "    out dx, al",
    "    pop rdx",
    "    ret",
    ".Lwl_puts:",
    "    mov al, [rsi]",
    "    test al, al",
    "    jz .Lwl_puts_done",
    "    call .Lwl_putc",
    "    inc rsi",
    "    jmp .Lwl_puts",
    ".Lwl_puts_done:",
    "    ret",
    // rax in decimal; digits built backwards in a buffer on the stack.
    ".Lwl_putdec:",
    "    sub rsp, 32",
    "    lea rsi, [rsp + 31]",
    "    mov byte ptr [rsi], 0",
    "    mov ecx, 10",
    ".Lwl_putdec_loop:",
    "    xor edx, edx",
    "    div rcx",
    "    add dl, 48",
    "    dec rsi",
    "    mov [rsi], dl",
    "    test rax, rax",
    "    jnz .Lwl_putdec_loop",
    "    call .Lwl_puts",
    "    add rsp, 32",
    "    ret",
    // rax as 0x + 16 hex digits.
    ".Lwl_puthex:",
    "    mov r8, rax",
    "    mov al, 48",
    "    call .Lwl_putc",
    "    mov al, 120",
    "    call .Lwl_putc",
    "    mov ecx, 16",
    ".Lwl_puthex_loop:",
    "    rol r8, 4",
    "    mov eax, r8d",
    "    and eax, 15",
    "    cmp eax, 10",
    "    jb .Lwl_puthex_digit",
    "    add eax, 39",
    ".Lwl_puthex_digit:",
    "    add eax, 48",
    "    call .Lwl_putc",
    "    dec ecx",
    "    jnz .Lwl_puthex_loop",
    "    ret",
    ".Lwl_banner: .asciz \"migrated workload guest: \"",
    ".Lwl_banner2: .asciz \" vcpus, started\\n\"",
    ".Lwl_msg_corrupt: .asciz \"CORRUPT vcpu=\"",
    ".Lwl_msg_gpa: .asciz \" gpa=\"",
    ".Lwl_msg_pass: .asciz \" pass=\"",
    ".Lwl_msg_progress: .asciz \"PROGRESS vcpu=\"",
    ".Lwl_msg_passes: .asciz \" passes=\"",
    ".Lwl_msg_pages: .asciz \" pages=\"",
    ".Lwl_msg_corrupt_n: .asciz \" corrupt=\"",
    ".Lwl_msg_tsc: .asciz \" tsc=\"",
    ".purgem wl_xorshift",
    ".globl migrated_workload_end",
    "migrated_workload_end:",
    ".popsection",
    PORT_STARTED = const ports::STARTED_BASE,
    PORT_PASS_DONE = const ports::PASS_DONE_BASE,
    PORT_CORRUPT = const ports::CORRUPT_BASE,
    PORT_SLEEP = const ports::SLEEP,
    PORT_COM1 = const ports::COM1,
    STARTED_MAGIC = const STARTED_MAGIC,
    IDLE_TICK_US = const IDLE_TICK_US,
    MAX_SLEEP_US = const MAX_SLEEP_US,
    SERIAL_CORRUPT_LINES = const SERIAL_CORRUPT_LINES,
    MIX_PFN = const MIX_PFN,
    MIX_PASS = const MIX_PASS,
    MIX_1 = const MIX_1,
    MIX_2 = const MIX_2,
    P_SEED = const params::SEED,
    P_WORDS_PER_PAGE = const params::WORDS_PER_PAGE,
    P_TSC_PER_PAGE = const params::TSC_PER_PAGE,
    P_IDLE = const params::IDLE,
    P_TSC_KHZ = const params::TSC_KHZ,
    P_SLEEP_MIN_TSC = const params::SLEEP_MIN_TSC,
    P_LAG_MAX_TSC = const params::LAG_MAX_TSC,
    P_AHEAD_MAX_TSC = const params::AHEAD_MAX_TSC,
    P_IDLE_VERIFY_TICKS = const params::IDLE_VERIFY_TICKS,
    P_VCPUS = const params::VCPUS,
    P_FLAGS = const params::FLAGS,
    P_SLEEP_HOW = const params::SLEEP_HOW,
    P_PROGRESS_TSC = const params::PROGRESS_TSC,
    FLAG_NO_PORTS = const flags::NO_PORTS,
    SLEEP_GATE = const sleep::GATE,
    SLEEP_PORT = const sleep::PORT,
    SLEEP_CALL = const SLEEP_CALL,
    S_PASSES = const slot::PASSES,
    S_PAGES_WRITTEN = const slot::PAGES_WRITTEN,
    S_CORRUPT = const slot::CORRUPT,
    S_GEN = const slot::GEN,
    S_TICKS = const slot::TICKS,
    S_LAST_CORRUPT_GPA = const slot::LAST_CORRUPT_GPA,
    S_SLICE_GPA = const slot::SLICE_GPA,
    S_SLICE_PAGES = const slot::SLICE_PAGES,
);
