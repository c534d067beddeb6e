//! Unit tests of the loader, the guest ABI and port decoding (no KVM).

use guestmem::{Gpa, GuestMemory, MemoryLayout, PAGE_SIZE};

use super::setup::pte;
use super::*;

const PAGE: u64 = PAGE_SIZE as u64;

fn mem(bytes: u64) -> GuestMemory {
    GuestMemory::create(
        "workload-unit",
        MemoryLayout::for_size(bytes).expect("layout"),
    )
    .expect("guest memory")
}

fn params(wss: u64) -> WorkloadParams {
    WorkloadParams {
        wss_bytes: wss,
        dirty_rate: DirtyRate::MibPerSec(100),
        mode: DirtyMode::Full,
        seed: 7,
    }
}

fn u64_at(m: &GuestMemory, g: u64) -> u64 {
    let mut b = [0u8; 8];
    m.read_gpa(Gpa(g), &mut b).expect("read");
    u64::from_le_bytes(b)
}

/// Walks the guest's page tables like the MMU does for a user-mode write.
fn translate(m: &GuestMemory, cr3: u64, va: u64) -> Option<u64> {
    let need = pte::PRESENT | pte::WRITABLE | pte::USER;
    let addr = |e: u64| e & 0x000f_ffff_ffff_f000;
    let pml4e = u64_at(m, cr3 + ((va >> 39) & 511) * 8);
    if pml4e & need != need {
        return None;
    }
    let pdpte = u64_at(m, addr(pml4e) + ((va >> 30) & 511) * 8);
    if pdpte & need != need || pdpte & pte::HUGE != 0 {
        return None;
    }
    let pde = u64_at(m, addr(pdpte) + ((va >> 21) & 511) * 8);
    if pde & need != need || pde & pte::HUGE == 0 {
        return None;
    }
    assert_eq!(
        pde & (pte::ACCESSED | pte::DIRTY),
        pte::ACCESSED | pte::DIRTY
    );
    Some((pde & 0x000f_ffff_ffe0_0000) + (va & 0x1f_ffff))
}

#[test]
fn dirty_rate_and_mode_parse_and_round_trip() {
    assert_eq!("0".parse(), Ok(DirtyRate::Idle));
    assert_eq!("200".parse(), Ok(DirtyRate::MibPerSec(200)));
    assert_eq!("max".parse(), Ok(DirtyRate::Max));
    assert_eq!("MAX".parse(), Ok(DirtyRate::Max));
    for bad in ["", "-1", "1.5", "fast", "4294967296"] {
        assert!(bad.parse::<DirtyRate>().is_err(), "{bad:?}");
    }
    for r in [DirtyRate::Idle, DirtyRate::MibPerSec(3), DirtyRate::Max] {
        assert_eq!(r.to_string().parse(), Ok(r));
    }
    assert_eq!("sparse".parse(), Ok(DirtyMode::Sparse));
    assert_eq!("full".parse(), Ok(DirtyMode::Full));
    assert!("dense".parse::<DirtyMode>().is_err());
    for m in [DirtyMode::Sparse, DirtyMode::Full] {
        assert_eq!(m.to_string().parse(), Ok(m));
    }
}

#[test]
fn port_events_decode() {
    let d = |v: u32| v.to_le_bytes();
    assert_eq!(
        decode_port_io(0x7003, &d(STARTED_MAGIC)),
        PortEvent::Started { vcpu: 3 }
    );
    assert_eq!(
        decode_port_io(0x71ff, &d(9)),
        PortEvent::PassDone { vcpu: 255, pass: 9 }
    );
    assert_eq!(
        decode_port_io(0x7201, &d(0x12345)),
        PortEvent::Corrupt {
            vcpu: 1,
            gpa: Gpa(0x1234_5000)
        }
    );
    assert_eq!(
        decode_port_io(ports::SLEEP, &d(10_000)),
        PortEvent::Sleep { micros: 10_000 }
    );
    // Short and empty data zero-extend; nothing panics.
    assert_eq!(
        decode_port_io(ports::SLEEP, &[0x10]),
        PortEvent::Sleep { micros: 16 }
    );
    assert_eq!(
        decode_port_io(0x7100, &[]),
        PortEvent::PassDone { vcpu: 0, pass: 0 }
    );
    for port in [0x3f8, 0x80, 0x7301, 0x7400, 0xffff] {
        assert_eq!(decode_port_io(port, &d(1)), PortEvent::Unknown { port });
    }
}

#[test]
fn slices_cover_the_working_set_exactly() {
    for (pages, vcpus) in [(4u64, 4u32), (301, 3), (1000, 7), (1 << 20, 256)] {
        let mut next = 0;
        for id in 0..vcpus {
            let r = guest::slice_pages(pages, vcpus, id);
            assert_eq!(r.start, next);
            assert!(r.end > r.start);
            let len = r.end - r.start;
            assert!(len == pages / u64::from(vcpus) || len == pages / u64::from(vcpus) + 1);
            next = r.end;
        }
        assert_eq!(next, pages);
    }
}

#[test]
fn load_identity_maps_all_ram_and_records_the_layout() {
    // 4 GiB + 2 MiB: RAM 0..3 GiB and 4 GiB..5 GiB+2 MiB (sparse memfd, never touched).
    let m = mem((4 << 30) + (2 << 20));
    let l = load(&m, &params(8 << 20), 4, 2_000_000).expect("load");
    assert_eq!(l.params_gpa, PARAMS_GPA);
    for va in [
        0x1000u64,
        l.code_gpa.0,
        l.wss_gpa.0,
        (3 << 30) - 8,
        4 << 30,
        (5 << 30) + (2 << 20) - 8,
    ] {
        assert_eq!(translate(&m, l.pml4_gpa.0, va), Some(va), "va {va:#x}");
    }
    // The MMIO hole and beyond the end are not mapped.
    for va in [3u64 << 30, (4 << 30) - 8, (5 << 30) + (2 << 20)] {
        assert_eq!(translate(&m, l.pml4_gpa.0, va), None, "va {va:#x}");
    }
    // Structures don't overlap and the working set follows them.
    let mut spans = [
        (l.params_gpa.0, PAGE),
        (l.pml4_gpa.0, PAGE),
        (l.gdt_gpa.0, 0x100),
        (l.tss_gpa.0, setup::TSS_LEN as u64),
        (l.status_gpa.0, 4 * 64),
        (l.stacks_gpa.0, 4 * PAGE),
        (l.code_gpa.0, l.code_len),
        (l.wss_gpa.0, l.wss_bytes),
    ];
    spans.sort();
    for w in spans.windows(2) {
        assert!(
            w[0].0 + w[0].1 <= w[1].0,
            "{:x?} overlaps {:x?}",
            w[0],
            w[1]
        );
    }
    assert_eq!(GuestLayout::read_from(&m).expect("read back"), l);
    assert_eq!(read_params(&m).expect("params"), params(8 << 20));
    // The code in guest memory is the assembled program.
    let mut code = vec![0u8; l.code_len as usize];
    m.read_gpa(l.code_gpa, &mut code).expect("read");
    assert_eq!(code, guest::code());
    assert!(code.len() > 100);
    // Status slots carry the slices; counters start at zero.
    for id in 0..4 {
        let st = read_status(&m, &l, id);
        assert_eq!((st.slice_gpa, st.slice_pages), l.slice(id));
        assert_eq!(st.counters, VcpuCounters::default());
        assert_eq!(l.stack_top(id).0 % 16, 0);
    }
}

#[test]
fn pacing_constant_follows_rate_and_vcpus() {
    let m = mem(64 << 20);
    let tsc_per_page = |rate, vcpus| {
        let mut p = params(1 << 20);
        p.dirty_rate = rate;
        load(&m, &p, vcpus, 3_000_000).expect("load");
        u64_at(&m, PARAMS_GPA.0 + guest::params::TSC_PER_PAGE as u64)
    };
    // 100 MiB/s = 25600 pages/s; 3 GHz TSC; one vCPU does all of it.
    assert_eq!(
        tsc_per_page(DirtyRate::MibPerSec(100), 1),
        3_000_000_000 / 25_600
    );
    // Two vCPUs share the rate: each gets half as many pages per second.
    assert_eq!(
        tsc_per_page(DirtyRate::MibPerSec(100), 2),
        2 * 3_000_000_000 / 25_600
    );
    assert_eq!(tsc_per_page(DirtyRate::Max, 1), 0);
    assert_eq!(tsc_per_page(DirtyRate::Idle, 1), 0);
}

#[test]
fn load_refuses_what_cannot_work() {
    let m = mem(16 << 20);
    let e = |p: WorkloadParams, vcpus, khz| load(&m, &p, vcpus, khz).unwrap_err();
    assert!(matches!(
        e(params(1 << 20), 0, 1),
        LoadWorkloadError::BadVcpuCount { vcpus: 0, .. }
    ));
    assert!(matches!(
        e(params(1 << 20), 257, 1),
        LoadWorkloadError::BadVcpuCount { vcpus: 257, .. }
    ));
    assert!(matches!(
        e(params(1000), 1, 1),
        LoadWorkloadError::WssNotPageMultiple { wss_bytes: 1000 }
    ));
    assert!(matches!(
        e(params(2 * PAGE), 3, 1),
        LoadWorkloadError::WssTooSmall { .. }
    ));
    assert!(matches!(
        e(params(32 << 20), 1, 1),
        LoadWorkloadError::WssTooLarge { wss_bytes, available } if wss_bytes == 32 << 20 && available < 16 << 20
    ));
    // A working set of all of memory takes the largest free piece.
    let whole = load(&m, &params(16 << 20), 1, 1).expect("wss = memory");
    assert!(
        whole.wss_bytes < 16 << 20 && whole.wss_bytes > 15 << 20,
        "{whole:?}"
    );
    assert_eq!(whole.wss_bytes % PAGE, 0);
    assert!(matches!(
        e(params(1 << 20), 1, 0),
        LoadWorkloadError::NoTscFrequency
    ));
    // Idle and max don't need the TSC.
    let mut p = params(1 << 20);
    p.dirty_rate = DirtyRate::Max;
    load(&m, &p, 1, 0).expect("max without tsc");
    // 2 MiB of RAM cannot hold 256 vCPUs' stacks plus a working set.
    let small = mem(2 << 20);
    assert!(matches!(
        load(&small, &params(1 << 20), 256, 1).unwrap_err(),
        LoadWorkloadError::WssTooLarge { .. } | LoadWorkloadError::MemoryTooSmall { .. }
    ));
}

#[test]
fn read_from_rejects_memory_without_a_workload() {
    let m = mem(4 << 20);
    assert!(matches!(
        GuestLayout::read_from(&m),
        Err(ReadWorkloadError::NoParams { found: 0 })
    ));
    load(&m, &params(1 << 20), 2, 1).expect("load");
    // A wrong version is refused rather than misread.
    m.write_gpa(Gpa(PARAMS_GPA.0 + 8), &99u64.to_le_bytes())
        .expect("write");
    assert!(matches!(
        GuestLayout::read_from(&m),
        Err(ReadWorkloadError::Version { found: 99, .. })
    ));
}

#[test]
fn a_working_set_too_big_for_low_ram_goes_above_4g() {
    // 3 GiB low (the system area eats some) + 4 GiB high: 3 GiB fits only high.
    let m = mem(7 << 30);
    let l = load(&m, &params(3 << 30), 2, 1).expect("load");
    assert_eq!(l.wss_gpa, Gpa(4 << 30));
}

#[test]
fn initial_state_is_ring3_long_mode_at_the_entry() {
    let m = mem(8 << 20);
    let l = load(&m, &params(1 << 20), 2, 1).expect("load");
    let base = kvm_bindings::kvm_sregs {
        apic_base: 0xfee0_0900,
        ..Default::default()
    };
    let (regs, sregs, fpu) = initial_vcpu_state(&l, 1, &base);
    assert_eq!(regs.rip, l.code_gpa.0);
    assert_eq!(regs.rsp, l.stacks_gpa.0 + 2 * PAGE);
    assert_eq!(
        (regs.rdi, regs.rsi, regs.rdx),
        (PARAMS_GPA.0, 1, l.status_gpa.0 + 64)
    );
    assert_eq!(regs.rflags & 0x3000, 0x3000, "IOPL 3");
    assert_eq!(regs.rflags & 0x200, 0, "IF clear");
    assert_eq!((sregs.cs.dpl, sregs.cs.l, sregs.cs.selector), (3, 1, 0x33));
    assert_eq!((sregs.ss.dpl, sregs.ss.selector), (3, 0x2b));
    assert_eq!(sregs.efer & 0x500, 0x500, "LME and LMA");
    assert_eq!(sregs.cr3, l.pml4_gpa.0);
    assert_eq!(sregs.gdt.base, l.gdt_gpa.0);
    assert_eq!(sregs.tr.base, l.tss_gpa.0);
    assert_eq!(sregs.apic_base, 0xfee0_0900, "kept from the base");
    assert_eq!((fpu.fcw, fpu.mxcsr), (0x37f, 0x1f80));
    // The GDT in guest memory is the one the segments were decoded from.
    let mut gdt = vec![0u8; usize::from(sregs.gdt.limit) + 1];
    m.read_gpa(l.gdt_gpa, &mut gdt).expect("read");
    assert_eq!(setup::segment(&gdt, 0x33), sregs.cs);
}

#[test]
fn pattern_is_deterministic_and_distinct() {
    let a: Vec<u64> = pattern_words(1, 100, 5, 512).collect();
    assert_eq!(a, pattern_words(1, 100, 5, 512).collect::<Vec<_>>());
    assert_eq!(a[0], pattern_words(1, 100, 5, 1).next().unwrap());
    for other in [
        pattern_words(2, 100, 5, 512).collect::<Vec<_>>(),
        pattern_words(1, 101, 5, 512).collect(),
        pattern_words(1, 100, 6, 512).collect(),
    ] {
        assert_ne!(a, other);
        assert_ne!(a[0], other[0]);
    }
    assert!(a.iter().all(|&w| w != 0));
}

#[test]
fn host_check_accepts_a_fresh_set_and_flags_stray_bytes() {
    let m = mem(8 << 20);
    let mut p = params(64 * PAGE);
    p.mode = DirtyMode::Sparse;
    let l = load(&m, &p, 2, 1).expect("load");
    assert_eq!(find_corrupt_pages(&m, &l).expect("check"), vec![]);
    // Pattern 0 (what the first pass writes) is fine before it completes.
    let good = Gpa(l.wss_gpa.0 + 3 * PAGE);
    let w0 = pattern_words(p.seed, good.0 / PAGE, 0, 1).next().unwrap();
    m.write_gpa(good, &w0.to_le_bytes()).expect("write");
    // Sparse mode looks at the first word only; anything else there is bad.
    let bad = Gpa(l.wss_gpa.0 + 40 * PAGE);
    m.write_gpa(bad, &[1]).expect("write");
    assert_eq!(find_corrupt_pages(&m, &l).expect("check"), vec![bad]);
}
