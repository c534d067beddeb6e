//! Tests of the VM machinery (vCPU threads, pause/resume, kicks, throttle,
//! dirty log, save/restore) with a tiny guest of their own, so they do not
//! depend on the workload.
//!
//! The guest, per vCPU: `loop { inc qword [rdi]; mov al, [rdi]; out dx, al }`
//! with `rdi` = its own counter page and `dx` = the COM1 scratch register, so
//! every iteration dirties one page and exits to the VMM once. It runs in
//! ring 3 with IOPL 0: port access is granted by the TSS I/O bitmap, which
//! is what PVM's emulator consults (it cannot keep a guest IOPL of 3).

use std::sync::Arc;
use std::time::{Duration, Instant};

use guestmem::{Gpa, GuestMemory, MemoryLayout, PAGE_SIZE};
use kvm_bindings::{kvm_dtable, kvm_mp_state, kvm_regs, kvm_segment, KVM_MP_STATE_RUNNABLE};
use kvm_ioctls::VcpuFd;

use super::*;
use crate::control::RunState;
use crate::kvm_check::kvm_available_or_skip;

const PML4: u64 = 0x1000;
const PDPT: u64 = 0x2000;
const PD: u64 = 0x3000;
const GDT: u64 = 0x4000;
const TSS: u64 = 0x5000;
/// 104-byte TSS, 8 KiB I/O bitmap (all ports allowed), 0xff terminator.
const TSS_LIMIT: u64 = 104 + 8192;
const CODE: u64 = 0x8000;
const STACK_TOP: u64 = 0xa000;
const COUNTERS: u64 = 0x10000;

const USER_CS: u16 = 0x1b;
const USER_DS: u16 = 0x23;
const TSS_SEL: u16 = 0x28;

/// inc qword [rdi]; mov al, [rdi]; out dx, al; jmp -8
const LOOP_CODE: [u8; 8] = [0x48, 0xff, 0x07, 0x8a, 0x07, 0xee, 0xeb, 0xf8];

fn write_u64s(mem: &GuestMemory, gpa: u64, words: &[u64]) {
    let bytes: Vec<u8> = words.iter().flat_map(|w| w.to_le_bytes()).collect();
    mem.write_gpa(Gpa(gpa), &bytes).unwrap();
}

/// Page tables (one 2 MiB user page at 0), GDT, TSS with I/O bitmap, code.
fn load_test_guest(mem: &GuestMemory) {
    const P_RW_US: u64 = 0x7;
    write_u64s(mem, PML4, &[PDPT | P_RW_US]);
    write_u64s(mem, PDPT, &[PD | P_RW_US]);
    write_u64s(mem, PD, &[P_RW_US | 0x80]);
    let tss_desc_lo = (TSS_LIMIT & 0xffff)
        | ((TSS & 0xff_ffff) << 16)
        | (0x8b << 40)
        | (((TSS_LIMIT >> 16) & 0xf) << 48)
        | (((TSS >> 24) & 0xff) << 56);
    write_u64s(
        mem,
        GDT,
        &[
            0,
            0,
            0,
            0x00af_fa00_0000_ffff, // 0x18: 64-bit code, DPL 3
            0x00cf_f200_0000_ffff, // 0x20: data, DPL 3
            tss_desc_lo,           // 0x28: 64-bit TSS (busy)
            TSS >> 32,
        ],
    );
    let mut tss = vec![0u8; TSS_LIMIT as usize + 1];
    tss[102..104].copy_from_slice(&104u16.to_le_bytes());
    tss[TSS_LIMIT as usize] = 0xff;
    mem.write_gpa(Gpa(TSS), &tss).unwrap();
    mem.write_gpa(Gpa(CODE), &LOOP_CODE).unwrap();
}

fn counter_gpa(id: u32) -> u64 {
    COUNTERS + u64::from(id) * PAGE_SIZE as u64
}

fn init_test_vcpu(id: u32, fd: &VcpuFd, _tsc_khz: u32) -> Result<(), BuildMachineError> {
    let seg = |selector: u16, type_: u8, l: u8, db: u8| kvm_segment {
        base: 0,
        limit: 0xffff_ffff,
        selector,
        type_,
        present: 1,
        dpl: 3,
        db,
        s: 1,
        l,
        g: 1,
        ..Default::default()
    };
    let mut s = fd.get_sregs().unwrap();
    s.cs = seg(USER_CS, 0xb, 1, 0);
    let data = seg(USER_DS, 0x3, 0, 1);
    (s.ds, s.es, s.fs, s.gs, s.ss) = (data, data, data, data, data);
    s.tr = kvm_segment {
        base: TSS,
        limit: TSS_LIMIT as u32,
        selector: TSS_SEL,
        type_: 0xb,
        present: 1,
        ..Default::default()
    };
    s.ldt = kvm_segment {
        type_: 2,
        unusable: 1,
        ..Default::default()
    };
    s.gdt = kvm_dtable {
        base: GDT,
        limit: 7 * 8 - 1,
        ..Default::default()
    };
    s.idt = kvm_dtable::default();
    s.cr0 = 0x8001_0033;
    s.cr3 = PML4;
    s.cr4 = 0x620;
    s.efer = 0x500;
    fd.set_sregs(&s).unwrap();
    fd.set_regs(&kvm_regs {
        rip: CODE,
        rsp: STACK_TOP - u64::from(id) * 0x100,
        rflags: 0x2,
        rdi: counter_gpa(id),
        rdx: 0x3ff,
        ..Default::default()
    })
    .unwrap();
    fd.set_mp_state(kvm_mp_state {
        mp_state: KVM_MP_STATE_RUNNABLE,
    })
    .unwrap();
    Ok(())
}

/// A machine running the test guest (shared with the handler tests).
pub(crate) fn test_machine(vcpus: u32, paused: bool) -> Machine {
    let mem =
        GuestMemory::create("machine-test", MemoryLayout::for_size(2 << 20).unwrap()).unwrap();
    load_test_guest(&mem);
    Machine::build(
        Arc::new(mem),
        vcpus,
        tempfile::tempfile().unwrap(),
        paused,
        &mut init_test_vcpu,
    )
    .unwrap()
}

pub(crate) fn counter(m: &Machine, id: u32) -> u64 {
    let mut b = [0u8; 8];
    m.memory().read_gpa(Gpa(counter_gpa(id)), &mut b).unwrap();
    u64::from_le_bytes(b)
}

/// Waits until vCPU `id`'s counter passes `above` (bounded).
pub(crate) fn wait_counter_above(m: &Machine, id: u32, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let c = counter(m, id);
        if c > above {
            return c;
        }
        assert!(
            Instant::now() < deadline,
            "vcpu {id} counter stuck at {c} ({:?})",
            m.run_state()
        );
        std::thread::yield_now();
    }
}

#[test]
fn runs_pauses_and_resumes() {
    if !kvm_available_or_skip() {
        return;
    }
    let m = test_machine(2, false);
    for id in 0..2 {
        wait_counter_above(&m, id, 100);
    }
    assert_eq!(m.run_state(), RunState::Running);

    m.pause().unwrap();
    assert_eq!(m.run_state(), RunState::Paused);
    let frozen: Vec<u64> = (0..2).map(|id| counter(&m, id)).collect();
    // Every vCPU acknowledged the pause from outside KVM_RUN, so nothing may
    // move now, however long we look.
    std::thread::sleep(Duration::from_millis(50));
    assert_eq!(frozen, (0..2).map(|id| counter(&m, id)).collect::<Vec<_>>());
    // Pausing twice is harmless.
    m.pause().unwrap();

    m.resume().unwrap();
    for id in 0..2 {
        wait_counter_above(&m, id, frozen[id as usize]);
    }
    m.shutdown();
    assert_eq!(m.run_state(), RunState::ShuttingDown);
}

#[test]
fn created_paused_does_not_run_until_resume() {
    if !kvm_available_or_skip() {
        return;
    }
    let m = test_machine(1, true);
    assert_eq!(m.run_state(), RunState::Created);
    std::thread::sleep(Duration::from_millis(20));
    assert_eq!(counter(&m, 0), 0);
    m.resume().unwrap();
    wait_counter_above(&m, 0, 0);
}

#[test]
fn pause_is_prompt() {
    if !kvm_available_or_skip() {
        return;
    }
    let m = test_machine(2, false);
    wait_counter_above(&m, 0, 10);
    let mut worst = Duration::ZERO;
    for _ in 0..20 {
        let t = Instant::now();
        m.pause().unwrap();
        worst = worst.max(t.elapsed());
        m.resume().unwrap();
    }
    assert!(worst < Duration::from_millis(500), "pause took {worst:?}");
}

#[test]
fn dirty_log_reports_guest_writes() {
    if !kvm_available_or_skip() {
        return;
    }
    let m = test_machine(2, false);
    wait_counter_above(&m, 0, 10);
    let vm = m.vm();
    assert!(matches!(
        vm.fetch_dirty_log(),
        Err(crate::vm::DirtyLogError::NotEnabled)
    ));
    vm.start_dirty_log().unwrap();
    assert!(vm.dirty_logging());
    // Let both vCPUs write after the log was switched on.
    let c0 = counter(&m, 0);
    let c1 = counter(&m, 1);
    wait_counter_above(&m, 0, c0);
    wait_counter_above(&m, 1, c1);
    let b = vm.fetch_dirty_log().unwrap();
    let page = |id| counter_gpa(id) / PAGE_SIZE as u64;
    assert!(
        b.test(page(0)) && b.test(page(1)),
        "dirty: {:?}",
        b.iter().collect::<Vec<_>>()
    );
    // The code and page tables are only read.
    assert!(!b.test(CODE / PAGE_SIZE as u64));
    assert!(!b.test(PML4 / PAGE_SIZE as u64));

    // Paused: after one fetch the log is clean, except what the VMM wrote.
    m.pause().unwrap();
    let _ = vm.fetch_dirty_log().unwrap();
    vm.note_vmm_write(300, 2);
    let b = vm.fetch_dirty_log().unwrap();
    assert_eq!(b.iter().collect::<Vec<_>>(), vec![300, 301]);
    assert!(vm.fetch_dirty_log().unwrap().is_empty());

    vm.stop_dirty_log().unwrap();
    assert!(!vm.dirty_logging());
    m.resume().unwrap();
}

#[test]
fn throttle_slows_the_guest() {
    if !kvm_available_or_skip() {
        return;
    }
    let m = test_machine(2, false);
    wait_counter_above(&m, 0, 10);
    // Runs the guest for a window at `pct` and returns (iterations, share of
    // wall time each vCPU slept). Ending the window with a pause cuts any
    // sleep in progress short and accounts for it; starting it from an
    // unthrottled, running guest means no sleep straddles the start.
    let measure = |m: &Machine, pct: u8| {
        let (c, asleep) = (counter(m, 0), m.throttled_time());
        let t = Instant::now();
        m.set_throttle(pct).unwrap();
        std::thread::sleep(Duration::from_millis(800));
        m.pause().unwrap();
        let wall = t.elapsed().as_secs_f64();
        let slept = (m.throttled_time() - asleep).as_secs_f64() / 2.0;
        let n = counter(m, 0) - c;
        m.set_throttle(0).unwrap();
        m.resume().unwrap();
        (n, slept / wall)
    };
    let (free, asleep) = measure(&m, 0);
    assert_eq!(asleep, 0.0);
    let (throttled, asleep) = measure(&m, 90);
    eprintln!("throttle 90%: asleep {asleep:.3}, iterations {throttled} vs {free} free");
    // Each vCPU sleeps 90% of wall time, less its first slice; this holds
    // however busy the host is.
    assert!(
        (0.8..=1.0).contains(&asleep),
        "asleep {asleep:.2} of the time"
    );
    // Progress drops too, though by less than 10x on a loaded host, where
    // a vCPU that slept gets the CPU to itself when it runs.
    assert!(
        throttled * 2 < free,
        "free {free} vs throttled {throttled} iterations"
    );
    assert_eq!(m.throttle_pct(), 0);
    assert!(matches!(
        m.set_throttle(100),
        Err(MachineOpError::ThrottleRange { pct: 100 })
    ));
}

#[test]
fn save_needs_pause_and_restore_continues() {
    if !kvm_available_or_skip() {
        return;
    }
    let m = test_machine(2, false);
    wait_counter_above(&m, 1, 10);
    assert!(matches!(m.save(), Err(MachineOpError::WrongState { .. })));
    m.pause().unwrap();
    let state = m.save().unwrap();
    assert_eq!(state.vcpus.len(), 2);
    let at_save: Vec<u64> = (0..2).map(|id| counter(&m, id)).collect();
    let blob = state.to_bytes();
    let mem = Arc::clone(m.memory());
    m.shutdown();
    drop(m);

    // A fresh VM over the same memory, as a destination would have it.
    let fd = mem.fd().try_clone_to_owned().unwrap();
    let mem2 = GuestMemory::from_fd(fd, mem.layout().clone()).unwrap();
    let state = VmState::from_bytes(&blob).unwrap();
    let r = Machine::restore(Arc::new(mem2), &state, tempfile::tempfile().unwrap()).unwrap();
    assert_eq!(r.run_state(), RunState::Paused);
    assert_eq!(
        (0..2).map(|id| counter(&r, id)).collect::<Vec<_>>(),
        at_save
    );
    r.resume().unwrap();
    for id in 0..2 {
        wait_counter_above(&r, id, at_save[id as usize]);
    }
    assert!(r.shared.crash_reason().is_none());
}

/// Guest for the dirty-log benchmark: `loop { for p in [rbx, rsi) step 4 KiB
/// { [p] = rax }; inc qword [rdi]; out dx, al }`.
const SWEEP_CODE: [u8; 24] = [
    0x48, 0x89, 0xd9, // mov rcx, rbx
    0x48, 0x89, 0x01, // mov [rcx], rax
    0x48, 0x81, 0xc1, 0x00, 0x10, 0x00, 0x00, // add rcx, 4096
    0x48, 0x39, 0xf1, // cmp rcx, rsi
    0x72, 0xf1, // jb -15
    0x48, 0xff, 0x07, // inc qword [rdi]
    0xee, // out dx, al
    0xeb, 0xe8, // jmp -24
];
/// Page directories identity-mapping the first 16 GiB with 2 MiB pages.
const SWEEP_PDS: u64 = 0x20000;

/// Measures `KVM_GET_DIRTY_LOG` fetch time over all slots with every page
/// dirty and with none dirty. Run with
/// `MIGRATED_BENCH_MEM=8G cargo test -p vmm --release --lib dirty_log_fetch_timing -- --ignored --nocapture`.
#[test]
#[ignore = "benchmark: touches all of guest RAM"]
fn dirty_log_fetch_timing() {
    if !kvm_available_or_skip() {
        return;
    }
    let size = match std::env::var("MIGRATED_BENCH_MEM").as_deref() {
        Ok("8G") => 8u64 << 30,
        Ok("4G") => 4u64 << 30,
        _ => 1u64 << 30,
    };
    let layout = MemoryLayout::for_size(size).unwrap();
    let regions: Vec<(u64, u64)> = layout
        .regions()
        .iter()
        .map(|r| (r.gpa.0, r.gpa.0 + r.size))
        .collect();
    let mem = GuestMemory::create("dirty-bench", layout).unwrap();
    load_test_guest(&mem);
    // Replace the 2 MiB map with a 16 GiB one and the code with the sweep.
    const P_RW_US: u64 = 0x7;
    let pdpt: Vec<u64> = (0..16)
        .map(|i| (SWEEP_PDS + i * 0x1000) | P_RW_US)
        .collect();
    write_u64s(&mem, PDPT, &pdpt);
    for i in 0..16u64 {
        let pd: Vec<u64> = (0..512)
            .map(|j| ((i << 30) + (j << 21)) | P_RW_US | 0x80)
            .collect();
        write_u64s(&mem, SWEEP_PDS + i * 0x1000, &pd);
    }
    mem.write_gpa(Gpa(CODE), &SWEEP_CODE).unwrap();
    let vcpus = regions.len() as u32;
    let mut init = |id: u32, fd: &VcpuFd, tsc: u32| {
        init_test_vcpu(id, fd, tsc)?;
        let mut r = fd.get_regs().unwrap();
        let (start, end) = regions[id as usize];
        r.rbx = start.max(1 << 20);
        r.rsi = end;
        r.rax = 0x5a5a_5a5a;
        fd.set_regs(&r).unwrap();
        Ok(())
    };
    let t = Instant::now();
    let m = Machine::build(
        Arc::new(mem),
        vcpus,
        tempfile::tempfile().unwrap(),
        false,
        &mut init,
    )
    .unwrap();
    let vm = m.vm();
    // First pass populates memory; then log a whole pass.
    for id in 0..vcpus {
        wait_counter_above_for(&m, id, 0, Duration::from_secs(600));
    }
    eprintln!("first pass (populate) {:?}", t.elapsed());
    let t = Instant::now();
    vm.start_dirty_log().unwrap();
    eprintln!("start dirty log {:?}", t.elapsed());
    let at_start: Vec<u64> = (0..vcpus).map(|id| counter(&m, id)).collect();
    let t = Instant::now();
    for id in 0..vcpus {
        wait_counter_above_for(&m, id, at_start[id as usize] + 1, Duration::from_secs(600));
    }
    eprintln!("logged pass {:?}", t.elapsed());
    m.pause().unwrap();
    let t = Instant::now();
    let b = vm.fetch_dirty_log().unwrap();
    let full = t.elapsed();
    let t = Instant::now();
    let b2 = vm.fetch_dirty_log().unwrap();
    let empty = t.elapsed();
    eprintln!(
        "guest {} MiB: fetch with {} dirty pages {:?}; fetch with {} dirty {:?}",
        size >> 20,
        b.count(),
        full,
        b2.count(),
        empty
    );
    assert!(b.count() > (size / PAGE_SIZE as u64) * 9 / 10);
    assert!(b2.is_empty());
}

fn wait_counter_above_for(m: &Machine, id: u32, above: u64, limit: Duration) {
    let deadline = Instant::now() + limit;
    while counter(m, id) <= above {
        assert!(
            Instant::now() < deadline,
            "vcpu {id} stuck: {:?}",
            m.run_state()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// `loop { inc qword [rdi]; mov eax, 1_000_000; out dx, eax }` with dx =
/// the workload's Sleep port: the vCPU spends its life in 1 s sleeps.
const SLEEPER_CODE: [u8; 11] = [
    0x48, 0xff, 0x07, // inc qword [rdi]
    0xb8, 0x40, 0x42, 0x0f, 0x00, // mov eax, 1_000_000
    0xef, // out dx, eax
    0xeb, 0xf5, // jmp -11
];
const SLEEP_PORT: u16 = 0x7300;

#[test]
fn pause_interrupts_a_guest_sleep() {
    use crate::workload::{decode_port_io, PortEvent};
    if !kvm_available_or_skip() {
        return;
    }
    assert_eq!(
        decode_port_io(SLEEP_PORT, &1_000_000u32.to_le_bytes()),
        PortEvent::Sleep { micros: 1_000_000 }
    );
    let mem = GuestMemory::create("sleep-test", MemoryLayout::for_size(2 << 20).unwrap()).unwrap();
    load_test_guest(&mem);
    mem.write_gpa(Gpa(CODE), &SLEEPER_CODE).unwrap();
    let mut init = |id: u32, fd: &VcpuFd, tsc: u32| {
        init_test_vcpu(id, fd, tsc)?;
        let mut r = fd.get_regs().unwrap();
        r.rdx = u64::from(SLEEP_PORT);
        fd.set_regs(&r).unwrap();
        Ok(())
    };
    let m = Machine::build(
        Arc::new(mem),
        1,
        tempfile::tempfile().unwrap(),
        false,
        &mut init,
    )
    .unwrap();
    // Counter 1: the vCPU is now in (or entering) its first 1 s sleep.
    wait_counter_above(&m, 0, 0);
    let t = Instant::now();
    m.pause().unwrap();
    let took = t.elapsed();
    assert!(took < Duration::from_millis(300), "pause took {took:?}");
    assert_eq!(counter(&m, 0), 1);
    // The interrupted sleep is not resumed: the guest carries on at once.
    let t = Instant::now();
    m.resume().unwrap();
    wait_counter_above(&m, 0, 1);
    assert!(
        t.elapsed() < Duration::from_millis(900),
        "{:?}",
        t.elapsed()
    );
}
