//! The image's structures checked from its bytes (QEMU runs it in
//! `tests/qemu_guest.rs`), and the host-side helpers.

use super::*;
use crate::workload::setup::selector;

fn u32_at(img: &[u8], off: u64) -> u32 {
    let o = off as usize;
    u32::from_le_bytes(img[o..o + 4].try_into().unwrap())
}

fn u64_at(img: &[u8], off: u64) -> u64 {
    let o = off as usize;
    u64::from_le_bytes(img[o..o + 8].try_into().unwrap())
}

/// Image offset of guest-physical address `gpa` inside the image.
fn off(gpa: u64) -> u64 {
    gpa - layout::LOAD_GPA
}

/// Walks the image's page tables like the CPU (2 MiB leaves only).
fn translate(img: &[u8], va: u64) -> Option<u64> {
    let pml4 = u64_at(img, layout::PML4 + ((va >> 39) & 511) * 8);
    if pml4 & pte::PRESENT == 0 {
        return None;
    }
    let pdpt = u64_at(img, off(pml4 & !0xfff) + ((va >> 30) & 511) * 8);
    if pdpt & pte::PRESENT == 0 {
        return None;
    }
    let pde = u64_at(img, off(pdpt & !0xfff) + ((va >> 21) & 511) * 8);
    assert_eq!(pde & LEAF_FLAGS, LEAF_FLAGS, "{va:#x}: {pde:#x}");
    Some((pde & !0x1f_ffff & !(1 << 63)) | (va & 0x1f_ffff))
}

#[test]
fn header_is_multiboot_v1_with_address_fields() {
    let img = image();
    assert_eq!(img.len() % 4096, 0);
    let w = |i: u64| u32_at(&img, i * 4);
    assert_eq!(w(0), 0x1bad_b002);
    assert_eq!(w(1) & (1 << 16), 1 << 16, "address fields");
    assert_eq!(w(1) & (1 << 2), 0, "no video mode request");
    assert_eq!(w(0).wrapping_add(w(1)).wrapping_add(w(2)), 0, "checksum");
    let load = layout::LOAD_GPA as u32;
    assert_eq!((w(3), w(4)), (load, load), "header and load address");
    assert_eq!(w(5), load + img.len() as u32, "load end");
    assert_eq!(w(6), 0, "no bss");
    let boot_start = load + layout::BOOT as u32;
    let boot_end = boot_start + boot::code().len() as u32;
    assert!((boot_start..boot_end).contains(&w(7)), "entry {:#x}", w(7));
    assert!(img.len() as u64 + layout::LOAD_GPA < 1 << 32);
}

#[test]
fn image_is_deterministic_and_carries_both_programs() {
    let img = image();
    assert_eq!(img, image());
    let b = layout::BOOT as usize;
    assert_eq!(&img[b..b + boot::code().len()], boot::code());
    let params = layout::PARAMS;
    let code_gpa = u64_at(&img, params + p::CODE_GPA as u64);
    let code = guest::code();
    assert_eq!(code_gpa % 4096, 0);
    assert!(code_gpa >= layout::LOAD_GPA + layout::BOOT + boot::code().len() as u64);
    let c = off(code_gpa) as usize;
    assert_eq!(&img[c..c + code.len()], code);
    assert_eq!(u64_at(&img, params + p::CODE_LEN as u64), code.len() as u64);
}

#[test]
fn page_tables_identity_map_the_first_4g_only() {
    let img = image();
    for va in [
        0,
        0x10_0000,
        0x10_f123,
        0x7fff_ffff,
        0xbfe0_0000,
        0xffff_f000,
    ] {
        assert_eq!(translate(&img, va), Some(va), "{va:#x}");
    }
    // The boot program maps the rest once it knows where RAM ends.
    assert_eq!(translate(&img, 1 << 32), None);
    assert_eq!(translate(&img, 1 << 39), None);
}

#[test]
fn idt_sends_every_vector_into_the_boot_code() {
    let img = image();
    let boot = layout::LOAD_GPA + layout::BOOT;
    let boot_end = boot + boot::code().len() as u64;
    let at = |i| boot + boot::offset(i);
    for v in 0..256u64 {
        let lo = u64_at(&img, layout::IDT + v * 16);
        let hi = u64_at(&img, layout::IDT + v * 16 + 8);
        let handler = (lo & 0xffff) | ((lo >> 32) & 0xffff_0000) | (hi << 32);
        let sel = ((lo >> 16) & 0xffff) as u16;
        let ist = (lo >> 32) & 7;
        let kind = (lo >> 40) & 0xff;
        assert_eq!(sel, selector::KERNEL_CS, "vector {v}");
        assert_eq!(kind, 0x8e, "vector {v}: present, DPL 0, interrupt gate");
        assert_eq!(ist, u64::from(v == 8), "vector {v}");
        assert!(
            (boot..boot_end).contains(&handler),
            "vector {v}: {handler:#x}"
        );
        let want = match v as u8 {
            TIMER_VECTOR => at(boot::entry::TIMER_ISR),
            SPURIOUS_VECTOR => at(boot::entry::SPURIOUS_ISR),
            UD_VECTOR => at(boot::entry::UD_ISR),
            _ => at(boot::entry::STUBS) + v * boot::STUB_STRIDE,
        };
        assert_eq!(handler, want, "vector {v}");
    }
    // Stubs push a dummy error code only where the CPU pushes none, then
    // the vector (push imm32).
    let stub = |v: u64| {
        let o = (layout::BOOT + boot::offset(boot::entry::STUBS) + v * boot::STUB_STRIDE) as usize;
        img[o..o + 7].to_vec()
    };
    assert_eq!(stub(0), [0x6a, 0x00, 0x68, 0, 0, 0, 0]);
    assert_eq!(stub(13)[..5], [0x68, 13, 0, 0, 0]);
    assert_eq!(stub(14)[..5], [0x68, 14, 0, 0, 0]);
    assert_eq!(stub(200)[..7], [0x6a, 0x00, 0x68, 200, 0, 0, 0]);
}

#[test]
fn gdt_and_tss_are_ready_for_ltr_and_ring3_io() {
    let img = image();
    let gdt = &img[layout::GDT as usize..][..setup::GDT_ENTRIES * 8];
    let tr = setup::segment(gdt, selector::TSS);
    assert_eq!((tr.type_, tr.present, tr.s), (0x9, 1, 0), "available TSS");
    assert_eq!(tr.base, layout::LOAD_GPA + layout::TSS);
    let cs = setup::segment(gdt, selector::USER_CS);
    assert_eq!((cs.l, cs.dpl), (1, 3));

    let tss = &img[layout::TSS as usize..][..4096];
    let top = |s: u64| layout::LOAD_GPA + s + 4096;
    assert_eq!(u64_at(tss, 4), top(layout::STACK0), "rsp0");
    assert_eq!(u64_at(tss, 36), top(layout::STACK_DF), "ist1");
    let map = usize::from(u16::from_le_bytes([tss[102], tss[103]]));
    let allowed = |port: u16| tss[map + usize::from(port / 8)] & (1 << (port % 8)) == 0;
    for port in [0x3f8, 0x3fd, 0x42, 0x43, 0x61, 0x7000, 0x7300] {
        assert!(allowed(port), "{port:#x}");
    }
    for port in [0x20, 0x21, 0x40, 0x41, 0x60, 0x70, 0xa1, 0x3f7, 0x400] {
        assert!(!allowed(port), "{port:#x}");
    }
}

#[test]
fn params_and_boot_variables_are_prefilled() {
    let img = image();
    let pp = |f: usize| u64_at(&img, layout::PARAMS + f as u64);
    assert_eq!(pp(p::MAGIC), guest::PARAMS_MAGIC);
    assert_eq!(pp(p::VERSION), guest::ABI_VERSION);
    assert_eq!(pp(p::VCPUS), 1);
    assert_eq!(pp(p::IDLE_VERIFY_TICKS), IDLE_VERIFY_TICKS);
    assert_eq!(pp(p::FLAGS), guest::flags::NO_PORTS);
    assert_eq!(pp(p::STATUS_GPA), layout::LOAD_GPA + layout::STATUS);
    assert_eq!(pp(p::STACKS_GPA), layout::LOAD_GPA + layout::STACK3);
    assert_eq!(pp(p::PML4_GPA), layout::LOAD_GPA + layout::PML4);
    // Left for the boot program: nothing that depends on the command line.
    for f in [
        p::WSS_BYTES,
        p::WSS_GPA,
        p::TSC_KHZ,
        p::SLEEP_HOW,
        p::PROGRESS_TSC,
    ] {
        assert_eq!(pp(f), 0, "field {f:#x}");
    }

    let v = |f: u64| u64_at(&img, f);
    assert_eq!(v(var::FREE), layout::LOAD_GPA + img.len() as u64);
    assert_eq!(v(var::SEED), DEFAULT_SEED);
    assert_eq!(v(var::PROGRESS_MS), u64::from(DEFAULT_PROGRESS_MS));
    assert_eq!(v(var::WSS), 0, "wss= is required");
    let limit = |f: u64| u16::from_le_bytes([img[f as usize], img[f as usize + 1]]);
    assert_eq!(limit(var::GDTR), (setup::GDT_ENTRIES * 8 - 1) as u16);
    assert_eq!(v(var::GDTR + 2), layout::LOAD_GPA + layout::GDT);
    assert_eq!(limit(var::IDTR), 4095);
    assert_eq!(v(var::IDTR + 2), layout::LOAD_GPA + layout::IDT);
}

#[test]
fn guest_args_make_a_command_line() {
    let a = GuestArgs::new(Wss::Bytes(16 << 20));
    assert_eq!(
        a.cmdline(),
        "wss=16777216 dirty_rate=0 mode=sparse seed=1 progress_ms=1000"
    );
    let b = GuestArgs {
        dirty_rate: DirtyRate::MibPerSec(50),
        mode: DirtyMode::Full,
        seed: 7,
        tsc_khz: Some(2_300_000),
        progress_ms: 250,
        sleep: Sleep::Spin,
        ..GuestArgs::new(Wss::Max)
    };
    assert_eq!(
        b.cmdline(),
        "wss=max dirty_rate=50 mode=full seed=7 progress_ms=250 tsc_khz=2300000 sleep=spin"
    );
    let c = GuestArgs {
        dirty_rate: DirtyRate::Max,
        sleep: Sleep::Hlt,
        ..GuestArgs::new(Wss::Bytes(4096))
    };
    assert!(c.cmdline().contains("dirty_rate=max") && c.cmdline().ends_with("sleep=hlt"));
}

#[test]
fn serial_lines_parse() {
    let boot = "BOOT migrated-multiboot vcpus=1 wss=16777216 wss_gpa=0x0000000100000000 \
                ram=267910144 mapped_top=0x0000000180000000 mode=full dirty_rate=50 seed=7 \
                tsc_khz=2300000 tsc_from=cmdline sleep=hlt progress_ms=1000";
    assert_eq!(
        parse_line(boot),
        SerialLine::Boot(BootLine {
            wss: 16 << 20,
            wss_gpa: 1 << 32,
            ram: 267_910_144,
            mapped_top: 6 << 30,
            mode: DirtyMode::Full,
            dirty_rate: DirtyRate::MibPerSec(50),
            seed: 7,
            tsc_khz: 2_300_000,
            tsc_from: "cmdline".into(),
            sleep: Sleep::Hlt,
            progress_ms: 1000,
        })
    );
    assert_eq!(
        parse_line("PROGRESS vcpu=0 passes=12 pages=786432 corrupt=0 tsc=123456789\n"),
        SerialLine::Progress(Progress {
            vcpu: 0,
            passes: 12,
            pages: 786_432,
            corrupt: 0,
            tsc: 123_456_789,
        })
    );
    assert_eq!(
        parse_line("CORRUPT vcpu=0 gpa=0x0000000000345000 pass=11"),
        SerialLine::Corrupt {
            vcpu: 0,
            gpa: 0x345000,
            pass: 11
        }
    );
    assert_eq!(
        parse_line("migrated workload guest: 1 vcpus, started"),
        SerialLine::Started
    );
    assert_eq!(
        parse_line("ERROR bad command line: \"x=1\": unknown key"),
        SerialLine::Error("bad command line: \"x=1\": unknown key".into())
    );
    assert!(matches!(
        parse_line("EXCEPTION vector=13 error=0x0"),
        SerialLine::Exception(e) if e.starts_with("vector=13")
    ));
    // Unknown, cut short or malformed: Other, never a panic.
    for l in [
        "USAGE wss=SIZE",
        "PROGRESS vcpu=0 passes=1",
        "PROGRESS vcpu=x passes=1 pages=1 corrupt=0 tsc=1",
        "BOOT migrated-multiboot vcpus=1",
        "CORRUPT vcpu=0 gpa=345000 pass=1",
        "",
        "STRAY vector=39",
    ] {
        assert_eq!(parse_line(l), SerialLine::Other(l.into()), "{l:?}");
    }
}
