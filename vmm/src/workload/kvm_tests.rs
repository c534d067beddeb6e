//! Boots the workload in a minimal KVM VM built right here with kvm-ioctls
//! (one slot per guestmem region, supported CPUID, our initial registers),
//! so the loader, the register setup and the guest program are tested
//! without the real VMM.
//!
//! Without /dev/kvm the tests print "skipped: /dev/kvm not available" and
//! pass, unless MIGRATED_REQUIRE_KVM=1, which turns that into a failure.

use std::time::{Duration, Instant};

use guestmem::{Gpa, GuestMemory, MemoryLayout, PAGE_SIZE};
use kvm_bindings::{
    kvm_mp_state, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_MEM_LOG_DIRTY_PAGES,
    KVM_MP_STATE_RUNNABLE,
};
use kvm_ioctls::{Kvm, VcpuExit, VcpuFd, VmFd};

use super::*;
use crate::kvm_check::kvm_available_or_skip;

const PAGE: u64 = PAGE_SIZE as u64;
/// A test whose guest takes longer than this is broken, not slow.
const RUN_LIMIT: Duration = Duration::from_secs(60);

struct TestVm {
    _kvm: Kvm,
    vm: VmFd,
    mem: GuestMemory,
    layout: GuestLayout,
    params: WorkloadParams,
    vcpus: Vec<VcpuFd>,
    created: Instant,
}

impl TestVm {
    fn new(mem_bytes: u64, params: WorkloadParams, n: u32) -> TestVm {
        let created = Instant::now();
        let mem = GuestMemory::create(
            "workload-test",
            MemoryLayout::for_size(mem_bytes).expect("layout"),
        )
        .expect("guest memory");
        let (kvm, vm) = Self::vm_for(&mem, false);
        let mut vcpus: Vec<VcpuFd> = (0..n)
            .map(|id| vm.create_vcpu(u64::from(id)).expect("create vcpu"))
            .collect();
        let tsc_khz = vcpus[0].get_tsc_khz().expect("tsc khz");
        let layout = load(&mem, &params, n, tsc_khz).expect("load workload");
        let cpuid = kvm
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("supported cpuid");
        for (id, vcpu) in vcpus.iter_mut().enumerate() {
            vcpu.set_cpuid2(&cpuid).expect("set cpuid");
            let base = vcpu.get_sregs().expect("get sregs");
            let (regs, sregs, fpu) = initial_vcpu_state(&layout, id as u32, &base);
            vcpu.set_sregs(&sregs).expect("set sregs");
            vcpu.set_regs(&regs).expect("set regs");
            vcpu.set_fpu(&fpu).expect("set fpu");
            // With the in-kernel irqchip, APs start UNINITIALIZED (waiting
            // for INIT/SIPI, which nobody sends) and would block in KVM_RUN.
            vcpu.set_mp_state(kvm_mp_state {
                mp_state: KVM_MP_STATE_RUNNABLE,
            })
            .expect("set mp state");
        }
        TestVm {
            _kvm: kvm,
            vm,
            mem,
            layout,
            params,
            vcpus,
            created,
        }
    }

    /// A VM with `mem` as its RAM, one slot per region.
    fn vm_for(mem: &GuestMemory, dirty_log: bool) -> (Kvm, VmFd) {
        let kvm = Kvm::new().expect("open /dev/kvm");
        let vm = kvm.create_vm().expect("create vm");
        vm.set_tss_address(0xfffb_d000).expect("tss address");
        vm.create_irq_chip().expect("irqchip");
        set_slots(&vm, mem, dirty_log);
        (kvm, vm)
    }

    fn status(&self, id: u32) -> VcpuStatus {
        read_status(&self.mem, &self.layout, id)
    }

    /// Fetches (and so clears and re-protects) every slot's dirty log.
    fn fetch_dirty_pages(&self) -> u64 {
        let mut n = 0;
        for (slot, r) in self.mem.layout().regions().iter().enumerate() {
            let words = self
                .vm
                .get_dirty_log(slot as u32, r.size as usize)
                .expect("dirty log");
            n += words.iter().map(|w| u64::from(w.count_ones())).sum::<u64>();
        }
        n
    }

    /// Checks page `gpa` holds what pass `pass` wrote.
    fn page_matches(&self, gpa: Gpa, pass: u64) -> bool {
        let words = match self.params.mode {
            DirtyMode::Sparse => 1,
            DirtyMode::Full => PAGE_SIZE / 8,
        };
        let mut buf = vec![0u8; words * 8];
        self.mem.read_gpa(gpa, &mut buf).expect("read page");
        let want: Vec<u8> = pattern_words(self.params.seed, gpa.0 / PAGE, pass, words)
            .flat_map(u64::to_le_bytes)
            .collect();
        buf == want
    }
}

fn set_slots(vm: &VmFd, mem: &GuestMemory, dirty_log: bool) {
    for (slot, r) in mem.layout().regions().iter().enumerate() {
        let region = kvm_userspace_memory_region {
            slot: slot as u32,
            flags: if dirty_log {
                KVM_MEM_LOG_DIRTY_PAGES
            } else {
                0
            },
            guest_phys_addr: r.gpa.0,
            memory_size: r.size,
            userspace_addr: mem.as_ptr() as u64 + r.file_offset,
        };
        // SAFETY: the range [as_ptr + file_offset, + size) is inside the
        // guest memory mapping (the layout describes that mapping), which
        // outlives the VM in every test (the VM is dropped first or with it).
        unsafe { vm.set_user_memory_region(region) }.expect("memory region");
    }
}

/// What one vCPU's run loop saw.
#[derive(Default, Debug)]
struct Seen {
    started_at: Option<Duration>,
    passes: Vec<u32>,
    corrupt: Vec<Gpa>,
    sleeps: u64,
    serial: Vec<u8>,
}

/// Runs `vcpu` until `stop` says so after an exit. Sleep requests are
/// honoured only if `honor_sleeps` (the guest does not care; skipping them
/// makes idle tests fast). Panics on a triple fault or a foreign exit.
fn run_until(
    vcpu: &mut VcpuFd,
    id: u32,
    seen: &mut Seen,
    honor_sleeps: bool,
    since: Instant,
    mut stop: impl FnMut(&Seen) -> bool,
) {
    let t0 = Instant::now();
    loop {
        assert!(
            t0.elapsed() < RUN_LIMIT,
            "vcpu {id}: guest ran too long: {seen:?}"
        );
        match vcpu.run() {
            Ok(VcpuExit::IoOut(port, data)) if port == ports::COM1 => {
                seen.serial.extend_from_slice(data)
            }
            Ok(VcpuExit::IoOut(port, data)) => match decode_port_io(port, data) {
                PortEvent::Started { vcpu } => {
                    assert_eq!(vcpu, id);
                    assert_eq!(data, STARTED_MAGIC.to_le_bytes());
                    seen.started_at = Some(since.elapsed());
                }
                PortEvent::PassDone { vcpu, pass } => {
                    assert_eq!(vcpu, id);
                    seen.passes.push(pass);
                }
                PortEvent::Corrupt { vcpu, gpa } => {
                    assert_eq!(vcpu, id);
                    seen.corrupt.push(gpa);
                }
                PortEvent::Sleep { micros } => {
                    seen.sleeps += 1;
                    assert!(micros <= guest::MAX_SLEEP_US, "sleep of {micros} us");
                    if honor_sleeps {
                        std::thread::sleep(Duration::from_micros(u64::from(micros)));
                    }
                }
                PortEvent::Unknown { port } => panic!("vcpu {id}: unknown port {port:#x}"),
            },
            Ok(VcpuExit::Shutdown) => {
                panic!(
                    "vcpu {id}: triple fault; regs {:?} sregs {:?}",
                    vcpu.get_regs(),
                    vcpu.get_sregs()
                );
            }
            Ok(other) => panic!("vcpu {id}: unexpected exit {other:?}"),
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => panic!("vcpu {id}: KVM_RUN failed: {e}"),
        }
        if stop(seen) {
            return;
        }
    }
}

fn params(wss: u64, rate: DirtyRate, mode: DirtyMode) -> WorkloadParams {
    WorkloadParams {
        wss_bytes: wss,
        dirty_rate: rate,
        mode,
        seed: 0x5eed_1234_abcd_0042,
    }
}

#[test]
fn boots_in_ring3_and_completes_sparse_passes() {
    if !kvm_available_or_skip() {
        return;
    }
    let mut t = TestVm::new(
        32 << 20,
        params(1 << 20, DirtyRate::Max, DirtyMode::Sparse),
        1,
    );
    let since = t.created;
    let mut seen = Seen::default();
    run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
        s.passes.len() == 3
    });
    let boot = seen.started_at.expect("Started before any pass");
    eprintln!("boot to first Started (VM creation included): {boot:?}");
    assert_eq!(seen.passes, vec![1, 2, 3]);
    assert!(seen.corrupt.is_empty());
    let serial = String::from_utf8_lossy(&seen.serial);
    assert_eq!(serial, "migrated workload guest: 1 vcpus, started\n");

    let st = t.status(0);
    let slice = 256;
    assert_eq!(st.slice_pages, slice);
    assert_eq!(
        st.counters,
        VcpuCounters {
            passes: 3,
            pages_written: 3 * slice,
            corrupt: 0
        }
    );
    assert_eq!(st.generation, 3);
    assert_eq!(
        read_counters(&t.mem, &t.layout, 1),
        vec![st.counters.clone()]
    );
    // Every page holds what the last pass (number 2, 0-based) wrote.
    for i in 0..slice {
        let g = Gpa(t.layout.wss_gpa.0 + i * PAGE);
        assert!(t.page_matches(g, 2), "page {g:?}");
    }
    // Sparse: the rest of each page was never written.
    let mut rest = vec![0u8; PAGE_SIZE - 8];
    t.mem
        .read_gpa(Gpa(t.layout.wss_gpa.0 + 8), &mut rest)
        .expect("read");
    assert!(rest.iter().all(|&b| b == 0));
    // The layout can be recovered from guest memory alone.
    assert_eq!(GuestLayout::read_from(&t.mem).expect("layout"), t.layout);
    assert_eq!(read_params(&t.mem).expect("params"), t.params);
}

#[test]
fn full_mode_detects_a_flipped_byte_once() {
    if !kvm_available_or_skip() {
        return;
    }
    let mut t = TestVm::new(
        16 << 20,
        params(512 << 10, DirtyRate::Max, DirtyMode::Full),
        1,
    );
    let since = t.created;
    let mut seen = Seen::default();
    run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
        s.passes.len() == 2
    });
    assert!(seen.corrupt.is_empty());

    // Between passes: flip one byte in the middle of page 5 (a byte sparse
    // mode would never look at).
    let victim = Gpa(t.layout.wss_gpa.0 + 5 * PAGE);
    let mut b = [0u8; 1];
    t.mem.read_gpa(Gpa(victim.0 + 1234), &mut b).expect("read");
    b[0] ^= 0x40;
    t.mem.write_gpa(Gpa(victim.0 + 1234), &b).expect("write");
    // The host-side check sees it too.
    assert_eq!(
        find_corrupt_pages(&t.mem, &t.layout).expect("check"),
        vec![victim]
    );

    run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
        s.passes.len() == 4
    });
    assert_eq!(seen.corrupt, vec![victim], "reported once, then repaired");
    let st = t.status(0);
    assert_eq!(st.counters.corrupt, 1);
    assert_eq!(st.last_corrupt_gpa, victim);
    assert!(t.page_matches(victim, 3));
    assert_eq!(
        find_corrupt_pages(&t.mem, &t.layout).expect("check"),
        vec![]
    );
    let serial = String::from_utf8_lossy(&seen.serial);
    let want = format!("CORRUPT vcpu=0 gpa={:#018x} pass=1\n", victim.0);
    assert!(serial.contains(&want), "serial log: {serial:?}");
}

#[test]
fn vcpus_split_the_working_set() {
    if !kvm_available_or_skip() {
        return;
    }
    let n = 3;
    let mut t = TestVm::new(
        16 << 20,
        // 301 pages: slices of 100, 100 and 101.
        params(301 * PAGE, DirtyRate::Max, DirtyMode::Full),
        n,
    );
    let since = t.created;
    std::thread::scope(|s| {
        for (id, vcpu) in t.vcpus.iter_mut().enumerate() {
            s.spawn(move || {
                let mut seen = Seen::default();
                run_until(vcpu, id as u32, &mut seen, false, since, |s| {
                    s.passes.len() == 2
                });
                assert!(seen.corrupt.is_empty());
                assert!(seen.started_at.is_some());
            });
        }
    });
    let mut total = 0;
    for id in 0..n {
        let st = t.status(id);
        let (g, pages) = t.layout.slice(id);
        assert_eq!((st.slice_gpa, st.slice_pages), (g, pages));
        assert_eq!(st.counters.pages_written, 2 * pages);
        total += pages;
    }
    assert_eq!(total, 301);
    for i in 0..301 {
        let g = Gpa(t.layout.wss_gpa.0 + i * PAGE);
        assert!(t.page_matches(g, 1), "page {i}");
    }
}

#[test]
fn paced_guest_stays_near_its_rate() {
    if !kvm_available_or_skip() {
        return;
    }
    // 4 MiB/s = 1024 pages/s over a 2 MiB (512-page) working set.
    let mut t = TestVm::new(
        16 << 20,
        params(2 << 20, DirtyRate::MibPerSec(4), DirtyMode::Sparse),
        1,
    );
    let since = t.created;
    let mut seen = Seen::default();
    let start = Instant::now();
    run_until(&mut t.vcpus[0], 0, &mut seen, true, since, |_| {
        start.elapsed() >= Duration::from_millis(1500)
    });
    let secs = start.elapsed().as_secs_f64();
    let written = t.status(0).counters.pages_written as f64;
    let budget = 1024.0 * secs;
    eprintln!(
        "paced 4 MiB/s: {written} pages in {secs:.2} s ({:.0} pages/s), {} sleeps",
        written / secs,
        seen.sleeps
    );
    assert!(seen.sleeps > 0);
    // Never faster than the budget (plus the 1 ms sleep threshold)...
    assert!(written <= budget * 1.1 + 10.0, "{written} > {budget}");
    // ...and not starved either (generous: the host has 2 busy cores).
    assert!(written >= budget * 0.3, "{written} < {budget}");
}

#[test]
fn idle_guest_fills_once_then_checks_read_only() {
    if !kvm_available_or_skip() {
        return;
    }
    let mut t = TestVm::new(
        16 << 20,
        params(128 * PAGE, DirtyRate::Idle, DirtyMode::Full),
        1,
    );
    let since = t.created;
    let mut seen = Seen::default();
    run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
        s.passes.len() == 3
    });
    let st = t.status(0);
    assert_eq!(st.counters.passes, 3);
    assert_eq!(
        st.counters.pages_written, 128,
        "only the initial fill writes"
    );
    assert_eq!(st.generation, 1);
    assert_eq!(st.ticks, 2 * IDLE_VERIFY_TICKS);
    assert_eq!(seen.sleeps, 2 * IDLE_VERIFY_TICKS);

    let victim = Gpa(t.layout.wss_gpa.0 + 77 * PAGE);
    t.mem
        .write_gpa(Gpa(victim.0 + 4000), &[0xee])
        .expect("write");
    run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
        s.passes.len() == 5
    });
    assert_eq!(seen.corrupt, vec![victim]);
    let st = t.status(0);
    assert_eq!(st.counters.corrupt, 1);
    assert_eq!(st.counters.pages_written, 128);
    assert!(t.page_matches(victim, 0), "repaired to the fill pattern");
}

/// Copies guest memory and vCPU registers into a brand-new VM mid-pass (at
/// a pacing sleep) and checks the guest carries on without seeing
/// corruption: the state the guest needs really is in RAM + registers.
#[test]
fn continues_in_a_new_vm_from_a_mid_pass_snapshot() {
    if !kvm_available_or_skip() {
        return;
    }
    let mut t = TestVm::new(
        16 << 20,
        params(256 * PAGE, DirtyRate::MibPerSec(8), DirtyMode::Full),
        1,
    );
    let since = t.created;
    let mut seen = Seen::default();
    // Stop at a sleep after the first pass, i.e. in the middle of pass 2.
    run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
        s.passes.len() == 1
    });
    let sleeps = seen.sleeps;
    run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
        s.sleeps >= sleeps + 3
    });
    let before = t.status(0);
    assert!(before.counters.pages_written > 256 && before.counters.pages_written < 512);
    let regs = t.vcpus[0].get_regs().expect("regs");
    let sregs = t.vcpus[0].get_sregs().expect("sregs");
    let fpu = t.vcpus[0].get_fpu().expect("fpu");

    // Mid-pass, pages hold either this pass's or the previous pass's data.
    assert_eq!(
        find_corrupt_pages(&t.mem, &t.layout).expect("check"),
        vec![]
    );
    let mem2 = GuestMemory::create("workload-copy", t.mem.layout().clone()).expect("mem");
    let mut page = [0u8; PAGE_SIZE];
    for i in 0..t.mem.layout().total_pages() {
        t.mem.read_page(i, &mut page).expect("read");
        mem2.write_page(i, &page).expect("write");
    }
    drop(t.vcpus);
    let (kvm2, vm2) = TestVm::vm_for(&mem2, false);
    let mut vcpu = vm2.create_vcpu(0).expect("vcpu");
    vcpu.set_cpuid2(
        &kvm2
            .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
            .expect("cpuid"),
    )
    .expect("set cpuid");
    vcpu.set_sregs(&sregs).expect("sregs");
    vcpu.set_regs(&regs).expect("regs");
    vcpu.set_fpu(&fpu).expect("fpu");

    let mut seen2 = Seen::default();
    run_until(&mut vcpu, 0, &mut seen2, false, since, |s| {
        s.passes.len() == 2
    });
    assert_eq!(seen2.started_at, None, "resumed, not rebooted");
    assert_eq!(seen2.passes, vec![2, 3]);
    assert!(seen2.corrupt.is_empty());
    let after = read_status(&mem2, &t.layout, 0);
    assert_eq!(after.counters.pages_written, 3 * 256);
    assert_eq!(after.counters.corrupt, 0);
    assert_eq!(find_corrupt_pages(&mem2, &t.layout).expect("check"), vec![]);
}

/// Numbers for the report (not a pass/fail test):
/// `cargo test -p vmm --lib workload::kvm_tests::measure -- --ignored --nocapture`
#[test]
#[ignore]
fn measure_dirty_rates() {
    if !kvm_available_or_skip() {
        return;
    }
    for mode in [DirtyMode::Sparse, DirtyMode::Full] {
        for dirty_log in [false, true] {
            let mut t = TestVm::new(128 << 20, params(32 << 20, DirtyRate::Max, mode), 1);
            if dirty_log {
                set_slots(&t.vm, &t.mem, true);
            }
            let since = t.created;
            let mut seen = Seen::default();
            // The first pass faults every page in; measure the passes after.
            run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
                s.passes.len() == 1
            });
            if dirty_log {
                t.fetch_dirty_pages();
            }
            let w0 = t.status(0).counters.pages_written;
            let start = Instant::now();
            let mut fetched = 0;
            while start.elapsed() < Duration::from_secs(2) {
                let n = seen.passes.len() + 1;
                run_until(&mut t.vcpus[0], 0, &mut seen, false, since, |s| {
                    s.passes.len() == n
                });
                if dirty_log {
                    // Like a migration pass: fetch and re-protect.
                    fetched += t.fetch_dirty_pages();
                }
            }
            let secs = start.elapsed().as_secs_f64();
            let w = t.status(0).counters.pages_written - w0;
            eprintln!(
                "{mode:?} max, dirty log {}: {:.0} pages/s ({:.0} MiB/s of pages), {} pages fetched, boot {:?}",
                if dirty_log { "on" } else { "off" },
                w as f64 / secs,
                w as f64 / secs / 256.0,
                fetched,
                seen.started_at
            );
        }
    }
}
