//! The built-in workload as a Multiboot v1 image, so that QEMU
//! (`qemu-system-x86_64 -kernel IMAGE`) boots the same guest our own VMM
//! runs: the QEMU backend's tests and the QEMU-vs-ours benchmark need a
//! guest that runs at native speed on nested KVM (PVM), where a stock
//! kernel's ring-0, 16- and 32-bit code is emulated ~1000x slower.
//!
//! [`image`] builds the file in Rust (no cross toolchain): a flat binary
//! with a Multiboot header using the address fields (flag bit 16), so the
//! loader needs no ELF parsing; QEMU 7.2's `-kernel` accepts it (its ELF
//! path refuses 64-bit images). `migrate-vmm multiboot-image --out FILE`
//! writes it.
//!
//! # Boot
//!
//! 1. The loader (QEMU's option ROM, after SeaBIOS or qboot: see
//!    [`fast_firmware_args`]) copies the file to
//!    [`layout::LOAD_GPA`] and enters the 32-bit stub with paging off. The
//!    stub masks the PICs, loads CR3 with prebuilt tables that identity-map
//!    the first 4 GiB with 2 MiB pages, enables PAE + EFER.LME + paging and
//!    far-jumps to 64-bit ring 0.
//! 2. Ring 0 loads TR (a TSS whose I/O bitmap allows COM1, the workload
//!    ports, PIT channel 2 and port 0x61) and the IDT, then `iretq`s to
//!    ring 3 with IOPL 3, IF = 0. About 35 ring-0 instructions in all.
//! 3. The ring-3 boot program parses the command line, settles the TSC
//!    rate and the sleep method, maps RAM above 4 GiB (page directories it
//!    writes into free memory after the image, up to the highest usable
//!    byte of the Multiboot memory map, at most 512 GiB), takes the largest
//!    usable piece of RAM above that for the working set, fills the
//!    workload's params page and status slot the way
//!    [`crate::workload::load`] does, prints the `BOOT` line and jumps into
//!    the unchanged workload code as vCPU 0.
//!
//! Ring 3 reaches ring 0 with `ud2` (eax = call number, rdx = argument),
//! handled by the #UD vector: on PVM a ring-3 `int n` becomes #UD and a
//! `syscall` target runs at CPL 3, while exceptions are delivered to ring 0
//! as on hardware. The calls: sleep until a TSC deadline (0, made by the
//! workload itself), [`SYS_HALT`], [`SYS_LAPIC`], [`SYS_KVMCLOCK`].
//!
//! # Running it
//!
//! ```text
//! migrate-vmm multiboot-image --out guest.img
//! qemu-system-x86_64 -accel kvm -machine q35 -cpu host -m 256 \
//!     -bios /usr/share/qemu/qboot.rom -nodefaults -display none -no-reboot \
//!     -serial file:guest.log -kernel guest.img \
//!     -append "wss=64M dirty_rate=50 mode=full seed=7 tsc_khz=2300000" \
//!     -qmp unix:guest.qmp,server=on,wait=off
//! ```
//!
//! `-bios` is optional ([`fast_firmware_args`]); `-no-reboot` turns a
//! triple fault into a QEMU exit instead of a reboot loop. A migration
//! target runs the same command line plus `-incoming defer` (QEMU sends
//! the image's RAM, and the kernel blob in fw_cfg must match).
//! `tests/qemu_guest.rs` has a minimal QMP exchange for `migrate`.
//!
//! # Memory map (guest-physical = virtual, all mapped user-writable)
//!
//! ```text
//! 0x100000  header page: Multiboot header; boot variables at 0x100
//! 0x101000  PML4
//! 0x102000  PDPT
//! 0x103000  four page directories of 2 MiB pages (the first 4 GiB)
//! 0x107000  GDT (Linux's selectors, as the built-in guest)
//! 0x108000  TSS with I/O permission bitmap
//! 0x109000  IDT: 256 interrupt gates
//! 0x10a000  workload params page
//! 0x10b000  workload status slot of vCPU 0
//! 0x10c000  ring-3 stack;  0x10d000 ring-0 stack;  0x10e000 #DF stack
//! 0x10f000  boot code (`boot`), then the workload code on a page boundary
//! image end page directories for RAM above 4 GiB (one page per GiB)
//! then      the working set: the largest usable piece of free RAM (with
//!           -m 4G on q35 that is the 2 GiB above 4 GiB)
//! ```
//!
//! The boot program keeps clear of the loader's info block and memory map
//! while it reads them; the command line (QEMU puts it right after the
//! image) may be overwritten once parsed.
//!
//! # Command line (`-append`)
//!
//! Words `key=value`, separated by blanks; a first word without `=` is the
//! image path QEMU puts there and is skipped. Names follow `migrate-vmm run`:
//!
//! * `wss=SIZE|max` (required): bytes with an optional `K`/`M`/`G`/`T`
//!   suffix (binary, optionally followed by `B` or `iB`), a multiple of
//!   4 KiB; `max` takes the whole largest free piece.
//! * `dirty_rate=0|idle|N|max` (alias `rate=`; default 0): MiB/s.
//! * `mode=sparse|full` (default sparse), `seed=N` (default 1; decimal or
//!   `0x` hex).
//! * `tsc_khz=N`: the TSC rate. Without it the guest uses the hypervisor's
//!   timing leaf 0x40000010 if present, else KVM's clock page (the
//!   TSC-to-ns factor KVM derived from the guest's TSC rate; exact), else
//!   measures 50 ms of PIT channel 2 from ring 3. Passing the host's rate
//!   ([`host_tsc_khz`]; KVM gives guests the host TSC rate) is exact too.
//! * `progress_ms=N` (default 1000; 0 = none): `PROGRESS` line interval.
//! * `sleep=auto|hlt|spin` (default auto = hlt when the vCPU has x2APIC and
//!   the TSC-deadline timer): how a guest ahead of its pace, or idle, waits.
//!   `hlt` calls ring 0, which arms the x2APIC TSC-deadline timer and halts
//!   until it fires, so an idle or paced guest leaves the host CPU free
//!   (a few emulated ring-0 instructions per wait of 1 to 100 ms); `spin`
//!   polls `rdtsc` with `pause` in ring 3 (100% of a host CPU).
//! * `selftest=exception`: fault (#GP) in ring 3 right after parsing, to
//!   test that an exception reaches COM1.
//!
//! # COM1 lines
//!
//! Parsed by [`parse_line`]; every line is `\n`-terminated.
//!
//! ```text
//! BOOT migrated-multiboot vcpus=1 wss=16777216 wss_gpa=0x0000000000113000 ram=267910144 mapped_top=0x0000000100000000 mode=full dirty_rate=50 seed=7 tsc_khz=2300000 tsc_from=cmdline sleep=hlt progress_ms=1000
//! migrated workload guest: 1 vcpus, started
//! PROGRESS vcpu=0 passes=12 pages=786432 corrupt=0 tsc=123456789
//! CORRUPT vcpu=0 gpa=0x0000000000345000 pass=11
//! ERROR bad command line: "wss=12Q": expected a size such as 65536, 256M or 1G, or max
//! USAGE wss=SIZE|max [dirty_rate=0|MiB/s|max] ...
//! EXCEPTION vector=13 error=0x... rip=0x... cs=0x... rsp=0x... cr2=0x...
//! STRAY vector=N
//! ```
//!
//! `PROGRESS` comes at most every `progress_ms`, checked every 64 pages and
//! at each pass end (an idle guest checks its set every 0.5 s, so no more
//! often than that); `pages` counts pages written, `tsc` is the guest TSC
//! when printed, so rates follow from two lines and `tsc_khz`. `passes`,
//! `pages` and `corrupt` live in guest RAM and continue across a migration.
//! `CORRUPT` (a page not holding what the guest wrote) is printed for the
//! first 16 corrupt pages only; `corrupt=` counts them all. After an
//! `ERROR` or `EXCEPTION` line the vCPU halts for good.
//!
//! # Limits
//!
//! * One vCPU: APs would need an INIT-SIPI-SIPI and a 16-bit trampoline,
//!   which is emulated (and partly broken) here. Extra QEMU `-smp` CPUs stay
//!   parked in wait-for-SIPI.
//! * No devices but COM1 (QEMU's UART is always ready, so no flow control)
//!   and, when `sleep=hlt`, the local APIC timer.
//! * RAM up to 512 GiB (one PML4 entry); the page directories for RAM above
//!   4 GiB take 4 KiB per GiB of low memory.
//! * Without KVM's clock page or `tsc_khz=`, the PIT fallback is only as
//!   good as the host is idle: on this nested host, under load, it has been
//!   off by 5% and once 10x (cause not pinned down), although it brackets
//!   both ends with rdtsc and retries up to 8 times.
//! * The workload ports of our VMM (STARTED, PASS_DONE, CORRUPT, SLEEP) are
//!   not used (`flags::NO_PORTS`); the host learns everything from COM1.

mod boot;
#[cfg(test)]
mod tests;

use std::str::FromStr;

use guestmem::Gpa;
use kvm_ioctls::Kvm;
use vmm_sys_util::errno;

use crate::workload::guest::{self, params as p};
use crate::workload::setup::{self, pte};
use crate::workload::{DirtyMode, DirtyRate, IDLE_VERIFY_TICKS};

/// Where things are in the image, as offsets from [`layout::LOAD_GPA`].
pub mod layout {
    /// Where the loader puts the image (the Multiboot `load_addr`).
    pub const LOAD_GPA: u64 = 0x10_0000;
    pub const HEADER: u64 = 0x0000;
    pub const PML4: u64 = 0x1000;
    pub const PDPT: u64 = 0x2000;
    /// Four page directories of 2 MiB pages: the first 4 GiB.
    pub const PD: u64 = 0x3000;
    pub const GDT: u64 = 0x7000;
    pub const TSS: u64 = 0x8000;
    pub const IDT: u64 = 0x9000;
    pub const PARAMS: u64 = 0xa000;
    pub const STATUS: u64 = 0xb000;
    pub const STACK3: u64 = 0xc000;
    pub const STACK0: u64 = 0xd000;
    pub const STACK_DF: u64 = 0xe000;
    /// The boot code; the workload code follows on the next page boundary.
    pub const BOOT: u64 = 0xf000;
}

/// The boot program's variables, offsets in the header page. The image
/// holds their defaults; the boot code overwrites them.
mod var {
    pub const MAGIC: u64 = 0x100;
    pub const MBI: u64 = 0x108;
    pub const MAPPED_TOP: u64 = 0x118;
    pub const X2APIC: u64 = 0x120;
    /// First free byte above the image (the image's end until boot).
    pub const FREE: u64 = 0x128;
    pub const RAM: u64 = 0x130;
    pub const WSS: u64 = 0x138;
    pub const WSS_MAX: u64 = 0x140;
    pub const RATE_KIND: u64 = 0x148;
    pub const RATE_MIB: u64 = 0x150;
    pub const MODE: u64 = 0x158;
    pub const SEED: u64 = 0x160;
    pub const TSC_KHZ: u64 = 0x168;
    pub const TSC_FROM: u64 = 0x170;
    pub const PROGRESS_MS: u64 = 0x178;
    pub const SLEEP: u64 = 0x180;
    pub const SELFTEST: u64 = 0x188;
    /// KVM's pvclock page while the TSC rate is read from it (32 bytes).
    pub const PVCLOCK: u64 = 0x200;
    /// Pseudo-descriptors for `lgdt`/`lidt` (limit, base).
    pub const GDTR: u64 = 0x1c0;
    pub const IDTR: u64 = 0x1d0;
}

// The variables follow the header, precede the descriptors, and all fit
// in the header page.
const _: () = assert!(
    var::MAGIC >= 0x20
        && var::SELFTEST < var::GDTR
        && var::IDTR + 10 <= var::PVCLOCK
        && var::PVCLOCK.is_multiple_of(32)
        && var::PVCLOCK + 32 <= 4096
);

/// Vector of the LAPIC timer interrupt that ends a `sleep=hlt` wait.
pub const TIMER_VECTOR: u8 = 0x20;
/// Call number (eax at a ring-3 `ud2`): halt for good (after an error line).
pub const SYS_HALT: u32 = 1;
/// Call number: switch the LAPIC to x2APIC with a TSC-deadline timer.
pub const SYS_LAPIC: u32 = 2;
/// Call number: write rdx to MSR_KVM_SYSTEM_TIME_NEW (KVM's clock page).
pub const SYS_KVMCLOCK: u32 = 3;
/// Invalid opcode: also the ring-3 call gate.
const UD_VECTOR: u8 = 6;
/// The LAPIC's spurious-interrupt vector.
pub const SPURIOUS_VECTOR: u8 = 0xff;
/// Default `PROGRESS` interval.
pub const DEFAULT_PROGRESS_MS: u32 = 1000;
/// Default seed, as `migrate-vmm run`.
pub const DEFAULT_SEED: u64 = 1;

const PAGE: u64 = 4096;
const MB_HEADER_MAGIC: u32 = 0x1bad_b002;
/// Page-align modules, want memory info and map, address fields valid.
const MB_HEADER_FLAGS: u32 = (1 << 0) | (1 << 1) | (1 << 16);
/// Non-leaf page-table entries.
const TABLE_FLAGS: u64 = pte::PRESENT | pte::WRITABLE | pte::USER | pte::ACCESSED;
/// 2 MiB page entries, preset accessed and dirty.
const LEAF_FLAGS: u64 = TABLE_FLAGS | pte::DIRTY | pte::HUGE;
/// Ports the ring-3 boot program needs beyond the workload's: PIT channel 2
/// and its control port, and port B (gate and output of channel 2).
const EXTRA_RING3_PORTS: [u16; 3] = [0x42, 0x43, 0x61];

/// The Multiboot image: write it to a file and give it to
/// `qemu-system-x86_64 -kernel`. Deterministic for a given build.
pub fn image() -> Vec<u8> {
    use layout as l;
    let boot_code = boot::code();
    let workload = guest::code();
    let code_off = (l::BOOT + boot_code.len() as u64).next_multiple_of(PAGE);
    let len = (code_off + workload.len() as u64).next_multiple_of(PAGE);
    let mut img = Image(vec![0u8; len as usize]);
    let abs = |off: u64| l::LOAD_GPA + off;

    let entry = abs(l::BOOT + boot::offset(boot::entry::ENTRY32));
    let header = [
        MB_HEADER_MAGIC,
        MB_HEADER_FLAGS,
        0u32.wrapping_sub(MB_HEADER_MAGIC.wrapping_add(MB_HEADER_FLAGS)),
        abs(l::HEADER) as u32,
        abs(0) as u32,
        abs(len) as u32,
        0,
        entry as u32,
    ];
    for (i, w) in header.iter().enumerate() {
        img.put(l::HEADER + i as u64 * 4, &w.to_le_bytes());
    }

    // The first 4 GiB; the boot program adds the rest.
    img.put_u64(l::PML4, abs(l::PDPT) | TABLE_FLAGS);
    for i in 0..4 {
        img.put_u64(l::PDPT + i * 8, abs(l::PD + i * PAGE) | TABLE_FLAGS);
    }
    for j in 0..4 * 512 {
        img.put_u64(l::PD + j * 8, (j << 21) | LEAF_FLAGS);
    }

    let mut gdt = setup::gdt(Gpa(abs(l::TSS)));
    // `ltr` wants an available TSS; the built-in loader sets TR directly.
    gdt[usize::from(setup::selector::TSS) + 5] = 0x89;
    img.put(l::GDT, &gdt);
    img.put(l::TSS, &tss());
    img.put(l::IDT, &idt());

    let params = [
        (p::MAGIC, guest::PARAMS_MAGIC),
        (p::VERSION, guest::ABI_VERSION),
        (p::IDLE_VERIFY_TICKS, IDLE_VERIFY_TICKS),
        (p::VCPUS, 1),
        (p::STATUS_GPA, abs(l::STATUS)),
        (p::STACKS_GPA, abs(l::STACK3)),
        (p::PML4_GPA, abs(l::PML4)),
        (p::GDT_GPA, abs(l::GDT)),
        (p::TSS_GPA, abs(l::TSS)),
        (p::CODE_GPA, abs(code_off)),
        (p::CODE_LEN, workload.len() as u64),
        (p::FLAGS, guest::flags::NO_PORTS),
    ];
    for (off, v) in params {
        img.put_u64(l::PARAMS + off as u64, v);
    }

    img.put_u64(var::FREE, abs(len));
    img.put_u64(var::SEED, DEFAULT_SEED);
    img.put_u64(var::PROGRESS_MS, u64::from(DEFAULT_PROGRESS_MS));
    img.put(var::GDTR, &(gdt.len() as u16 - 1).to_le_bytes());
    img.put_u64(var::GDTR + 2, abs(l::GDT));
    img.put(var::IDTR, &(256u16 * 16 - 1).to_le_bytes());
    img.put_u64(var::IDTR + 2, abs(l::IDT));

    img.put(l::BOOT, boot_code);
    img.put(code_off, workload);
    img.0
}

/// Image bytes with little-endian stores at offsets.
struct Image(Vec<u8>);

impl Image {
    fn put(&mut self, off: u64, bytes: &[u8]) {
        let o = off as usize;
        self.0[o..o + bytes.len()].copy_from_slice(bytes);
    }

    fn put_u64(&mut self, off: u64, v: u64) {
        self.put(off, &v.to_le_bytes());
    }
}

/// The built-in guest's TSS, plus the ports the ring-3 boot program uses,
/// and stacks for entries into ring 0 (RSP0) and for double faults (IST1).
fn tss() -> Vec<u8> {
    let mut t = setup::tss();
    let map = usize::from(u16::from_le_bytes([t[102], t[103]]));
    for port in EXTRA_RING3_PORTS {
        t[map + usize::from(port / 8)] &= !(1 << (port % 8));
    }
    let top = |stack: u64| (layout::LOAD_GPA + stack + PAGE).to_le_bytes();
    t[4..12].copy_from_slice(&top(layout::STACK0));
    t[36..44].copy_from_slice(&top(layout::STACK_DF));
    t
}

/// One 16-byte 64-bit interrupt gate, DPL 0 (IF cleared on entry).
fn gate(handler: u64, ist: u8) -> [u8; 16] {
    let cs = u64::from(setup::selector::KERNEL_CS);
    let kind: u8 = 0x8e;
    let lo = (handler & 0xffff)
        | (cs << 16)
        | (u64::from(ist) << 32)
        | (u64::from(kind) << 40)
        | (((handler >> 16) & 0xffff) << 48);
    let mut g = [0u8; 16];
    g[..8].copy_from_slice(&lo.to_le_bytes());
    g[8..].copy_from_slice(&(handler >> 32).to_le_bytes());
    g
}

/// The IDT: every vector has a handler, all DPL 0 (ring 3 calls ring 0
/// with `ud2`); a double fault gets its own stack.
fn idt() -> Vec<u8> {
    let at = |i| layout::LOAD_GPA + layout::BOOT + boot::offset(i);
    let mut idt = Vec::with_capacity(256 * 16);
    for v in 0..=255u8 {
        let handler = match v {
            TIMER_VECTOR => at(boot::entry::TIMER_ISR),
            SPURIOUS_VECTOR => at(boot::entry::SPURIOUS_ISR),
            UD_VECTOR => at(boot::entry::UD_ISR),
            _ => at(boot::entry::STUBS) + u64::from(v) * boot::STUB_STRIDE,
        };
        idt.extend_from_slice(&gate(handler, u8::from(v == 8)));
    }
    idt
}

/// The working set on the command line.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Wss {
    Bytes(u64),
    /// The largest free piece of RAM.
    Max,
}

/// How the guest waits when idle or ahead of its pace (`sleep=`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Sleep {
    /// `hlt` when the vCPU has x2APIC and the TSC-deadline timer, else spin.
    #[default]
    Auto,
    Hlt,
    Spin,
}

/// The guest's parameters, as a QEMU `-append` string ([`Self::cmdline`]).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GuestArgs {
    pub wss: Wss,
    pub dirty_rate: DirtyRate,
    pub mode: DirtyMode,
    pub seed: u64,
    /// None: the guest finds the rate itself (CPUID or PIT).
    pub tsc_khz: Option<u32>,
    /// 0 = no PROGRESS lines.
    pub progress_ms: u32,
    pub sleep: Sleep,
}

impl GuestArgs {
    /// An idle guest with this working set; the other fields at their
    /// defaults.
    pub fn new(wss: Wss) -> Self {
        Self {
            wss,
            dirty_rate: DirtyRate::Idle,
            mode: DirtyMode::Sparse,
            seed: DEFAULT_SEED,
            tsc_khz: None,
            progress_ms: DEFAULT_PROGRESS_MS,
            sleep: Sleep::Auto,
        }
    }

    /// The command line for QEMU's `-append`.
    pub fn cmdline(&self) -> String {
        let wss = match self.wss {
            Wss::Bytes(b) => b.to_string(),
            Wss::Max => "max".into(),
        };
        let mut s = format!(
            "wss={wss} dirty_rate={} mode={} seed={} progress_ms={}",
            self.dirty_rate, self.mode, self.seed, self.progress_ms
        );
        if let Some(khz) = self.tsc_khz {
            s.push_str(&format!(" tsc_khz={khz}"));
        }
        s.push_str(match self.sleep {
            Sleep::Auto => "",
            Sleep::Hlt => " sleep=hlt",
            Sleep::Spin => " sleep=spin",
        });
        s
    }
}

/// Where Debian's QEMU keeps qboot, a minimal firmware that boots the image
/// in about 0.3 s where SeaBIOS takes 3 to 5 s here (its 16-bit code is
/// emulated on PVM). Both work.
pub const QBOOT_ROM: &str = "/usr/share/qemu/qboot.rom";

/// `-bios` arguments for the fastest firmware present: qboot if installed,
/// else none (QEMU's default SeaBIOS).
pub fn fast_firmware_args() -> Vec<String> {
    if std::path::Path::new(QBOOT_ROM).is_file() {
        vec!["-bios".into(), QBOOT_ROM.into()]
    } else {
        Vec::new()
    }
}

/// Why the host's TSC rate could not be read.
#[derive(Debug, thiserror::Error)]
pub enum HostTscError {
    #[error("cannot open /dev/kvm")]
    OpenKvm(#[source] errno::Error),
    #[error("cannot create a KVM VM")]
    CreateVm(#[source] errno::Error),
    #[error("cannot create a vcpu")]
    CreateVcpu(#[source] errno::Error),
    #[error("KVM_GET_TSC_KHZ failed")]
    GetTscKhz(#[source] errno::Error),
}

/// The TSC rate KVM gives a new vCPU on this host (the host's own rate),
/// for `tsc_khz=`. Creates and drops a throwaway VM.
pub fn host_tsc_khz() -> Result<u32, HostTscError> {
    let kvm = Kvm::new().map_err(HostTscError::OpenKvm)?;
    let vm = kvm.create_vm().map_err(HostTscError::CreateVm)?;
    let vcpu = vm.create_vcpu(0).map_err(HostTscError::CreateVcpu)?;
    vcpu.get_tsc_khz().map_err(HostTscError::GetTscKhz)
}

/// The `BOOT` line: what the guest made of its command line and memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BootLine {
    pub wss: u64,
    pub wss_gpa: u64,
    /// Usable RAM in the loader's memory map.
    pub ram: u64,
    /// End of the identity map: the highest usable RAM rounded up to a
    /// GiB, at least 4 GiB.
    pub mapped_top: u64,
    pub mode: DirtyMode,
    pub dirty_rate: DirtyRate,
    pub seed: u64,
    pub tsc_khz: u64,
    /// `cmdline`, `cpuid`, `kvmclock` or `pit`.
    pub tsc_from: String,
    pub sleep: Sleep,
    pub progress_ms: u64,
}

/// A `PROGRESS` line.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Progress {
    pub vcpu: u32,
    pub passes: u64,
    pub pages: u64,
    pub corrupt: u64,
    pub tsc: u64,
}

/// One line of the guest's COM1 output.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum SerialLine {
    Boot(BootLine),
    /// The workload's own banner (`migrated workload guest: ...`).
    Started,
    Progress(Progress),
    Corrupt {
        vcpu: u32,
        gpa: u64,
        pass: u64,
    },
    /// `ERROR ...` (the rest of the line); the guest has halted.
    Error(String),
    /// `EXCEPTION ...` (the rest of the line); the guest has halted.
    Exception(String),
    /// Anything else (`USAGE`, `STRAY`, a line cut short).
    Other(String),
}

/// Parses one COM1 line (without its newline). Lines that start with a
/// known word but do not parse come back as [`SerialLine::Other`].
pub fn parse_line(line: &str) -> SerialLine {
    let line = line.trim_end_matches(['\r', '\n']);
    let other = || SerialLine::Other(line.to_string());
    let Some((word, rest)) = line.split_once(' ') else {
        return other();
    };
    let parsed = match word {
        "BOOT" => parse_boot(rest).map(SerialLine::Boot),
        "PROGRESS" => parse_progress(rest).map(SerialLine::Progress),
        "CORRUPT" => parse_corrupt(rest),
        "ERROR" => Some(SerialLine::Error(rest.to_string())),
        "EXCEPTION" => Some(SerialLine::Exception(rest.to_string())),
        "migrated" if rest.starts_with("workload guest:") => Some(SerialLine::Started),
        _ => None,
    };
    parsed.unwrap_or_else(other)
}

/// The `key=value` fields of a line.
struct Fields<'a>(Vec<(&'a str, &'a str)>);

impl<'a> Fields<'a> {
    fn of(rest: &'a str) -> Self {
        Fields(
            rest.split_whitespace()
                .filter_map(|w| w.split_once('='))
                .collect(),
        )
    }

    fn str(&self, key: &str) -> Option<&'a str> {
        self.0.iter().find(|(k, _)| *k == key).map(|(_, v)| *v)
    }

    fn num<T: FromStr>(&self, key: &str) -> Option<T> {
        self.str(key)?.parse().ok()
    }

    fn hex(&self, key: &str) -> Option<u64> {
        u64::from_str_radix(self.str(key)?.strip_prefix("0x")?, 16).ok()
    }
}

fn parse_boot(rest: &str) -> Option<BootLine> {
    let f = Fields::of(rest);
    Some(BootLine {
        wss: f.num("wss")?,
        wss_gpa: f.hex("wss_gpa")?,
        ram: f.num("ram")?,
        mapped_top: f.hex("mapped_top")?,
        mode: f.num("mode")?,
        dirty_rate: f.num("dirty_rate")?,
        seed: f.num("seed")?,
        tsc_khz: f.num("tsc_khz")?,
        tsc_from: f.str("tsc_from")?.to_string(),
        sleep: match f.str("sleep")? {
            "hlt" => Sleep::Hlt,
            "spin" => Sleep::Spin,
            _ => return None,
        },
        progress_ms: f.num("progress_ms")?,
    })
}

fn parse_progress(rest: &str) -> Option<Progress> {
    let f = Fields::of(rest);
    Some(Progress {
        vcpu: f.num("vcpu")?,
        passes: f.num("passes")?,
        pages: f.num("pages")?,
        corrupt: f.num("corrupt")?,
        tsc: f.num("tsc")?,
    })
}

fn parse_corrupt(rest: &str) -> Option<SerialLine> {
    let f = Fields::of(rest);
    Some(SerialLine::Corrupt {
        vcpu: f.num("vcpu")?,
        gpa: f.hex("gpa")?,
        pass: f.num("pass")?,
    })
}
