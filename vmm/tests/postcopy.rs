//! Post-copy: guest RAM with pages punched out, registered with
//! userfaultfd, faults served by a pager in another thread or process.
//!
//! The cross-process test plays the daemon of a post-copy destination:
//! it copies a paused source guest's memory into a new memfd, punches out
//! the working set and every other remaining data page, starts
//! `migrate-vmm restore --wait-state` on it, takes the VMM's userfaultfd,
//! serves faults from a thread (reading the source memfd) while another
//! thread pushes the rest, and checks the guest's own verdicts, counters
//! and memory against the source.

mod common;

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use guestmem::{GuestMemory, MemoryLayout, Pager, Userfaultfd, PAGE_SIZE};
use vmm::kvm_check::kvm_available_or_skip;
use vmm::machine::Machine;
use vmm::workload::{DirtyMode, DirtyRate, WorkloadParams};

/// Copies every data page of `from` into a fresh memfd.
fn copy_memory(from: &GuestMemory) -> GuestMemory {
    let to = GuestMemory::create("copy", from.layout().clone()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    for r in from.data_ranges().unwrap() {
        let (mut at, end) = (r.start * PAGE_SIZE as u64, r.end * PAGE_SIZE as u64);
        while at < end {
            let n = ((end - at) as usize).min(buf.len());
            from.read_at(at, &mut buf[..n]).unwrap();
            to.write_at(at, &buf[..n]).unwrap();
            at += n as u64;
        }
    }
    to
}

/// The feasibility probe: an in-process workload guest whose RAM is
/// punched out and served over userfaultfd from a thread.
#[test]
fn in_process_guest_runs_on_served_faults() {
    if !kvm_available_or_skip() {
        return;
    }
    let layout = MemoryLayout::for_size(256 << 20).unwrap();
    let mem = Arc::new(GuestMemory::create("pc", layout.clone()).unwrap());
    let params = WorkloadParams {
        wss_bytes: 32 << 20,
        dirty_rate: DirtyRate::MibPerSec(200),
        mode: DirtyMode::Sparse,
        seed: 3,
    };
    let log = tempfile::tempfile().unwrap();
    let m = Machine::boot_workload(Arc::clone(&mem), 2, &params, log, false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !m.counters().iter().all(|c| c.passes >= 2) {
        assert!(Instant::now() < deadline, "{:?}", m.counters());
        std::thread::sleep(Duration::from_millis(20));
    }
    m.pause().unwrap();
    let before = m.counters();
    let backup = copy_memory(&mem);
    let data = mem.data_ranges().unwrap();
    let punched: u64 = data.iter().map(|r| r.end - r.start).sum();
    for r in &data {
        mem.punch_hole(r.start, r.end - r.start).unwrap();
    }
    let uffd = Userfaultfd::create().expect("userfaultfd");
    let regions = uffd.register_memory(&mem).unwrap();
    let pager = Pager::new(uffd.into_fd(), &layout, regions).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let faults = Arc::new(AtomicU64::new(0));
    let (s, f) = (Arc::clone(&stop), Arc::clone(&faults));
    let server = std::thread::spawn(move || {
        let mut pending = Vec::new();
        let mut page = vec![0u8; PAGE_SIZE];
        while !s.load(Ordering::Relaxed) {
            pending.clear();
            if pager.read_faults(&mut pending).unwrap() == 0 {
                std::thread::yield_now();
                continue;
            }
            for &i in &pending {
                f.fetch_add(1, Ordering::Relaxed);
                backup.read_at(i * PAGE_SIZE as u64, &mut page).unwrap();
                pager.install(i, &page).unwrap();
            }
        }
        pager
    });
    m.resume().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let now = m.counters();
        if now
            .iter()
            .zip(&before)
            .all(|(n, b)| n.passes >= b.passes + 2)
        {
            assert!(now.iter().all(|c| c.corrupt == 0), "{now:?}");
            break;
        }
        assert!(Instant::now() < deadline, "{now:?}");
        std::thread::sleep(Duration::from_millis(20));
    }
    m.shutdown();
    stop.store(true, Ordering::Relaxed);
    let _pager = server.join().unwrap();
    let n = faults.load(Ordering::Relaxed);
    eprintln!("punched {punched} pages, served {n} faults");
    assert!(n > 0);
}

/// A pause issued while vCPUs are blocked on unserved missing pages
/// completes once the pages are served, and the guest then carries on
/// intact. (On this nested host a vCPU stuck in such a fault does NOT
/// leave KVM_RUN on the kick: a pause with nobody serving times out after
/// the 5 s vCPU reply timeout. So the daemon must keep serving faults,
/// or at least serve them before it expects a pause to finish.)
#[test]
fn pause_completes_once_blocked_faults_are_served() {
    if !kvm_available_or_skip() {
        return;
    }
    let layout = MemoryLayout::for_size(64 << 20).unwrap();
    let mem = Arc::new(GuestMemory::create("pp", layout.clone()).unwrap());
    let params = WorkloadParams {
        wss_bytes: 8 << 20,
        dirty_rate: DirtyRate::MibPerSec(100),
        mode: DirtyMode::Sparse,
        seed: 5,
    };
    let log = tempfile::tempfile().unwrap();
    let m = Machine::boot_workload(Arc::clone(&mem), 2, &params, log, false).unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !m.counters().iter().all(|c| c.passes >= 1) {
        assert!(Instant::now() < deadline, "{:?}", m.counters());
        std::thread::sleep(Duration::from_millis(20));
    }
    m.pause().unwrap();
    let before = m.counters();
    let backup = copy_memory(&mem);
    for r in mem.data_ranges().unwrap() {
        mem.punch_hole(r.start, r.end - r.start).unwrap();
    }
    let uffd = Userfaultfd::create().expect("userfaultfd");
    let regions = uffd.register_memory(&mem).unwrap();
    let pager = Pager::new(uffd.into_fd(), &layout, regions).unwrap();
    m.resume().unwrap();
    // Both vCPUs fault at once (code, page tables); nobody serves yet.
    let mut faults = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(10);
    while faults.len() < 2 {
        pager.read_faults(&mut faults).unwrap();
        assert!(Instant::now() < deadline, "faults: {faults:?}");
        std::thread::yield_now();
    }
    let serve = |i: u64| {
        let mut page = vec![0u8; PAGE_SIZE];
        backup.read_at(i * PAGE_SIZE as u64, &mut page).unwrap();
        pager.install(i, &page).unwrap();
    };
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let pause = s.spawn(|| {
            let t = Instant::now();
            m.pause().map(|()| t.elapsed())
        });
        s.spawn(|| {
            let mut pending = Vec::new();
            while !stop.load(Ordering::Acquire) {
                pending.clear();
                if pager.read_faults(&mut pending).unwrap() == 0 {
                    std::thread::yield_now();
                }
                pending.iter().for_each(|&i| serve(i));
            }
        });
        // The faults read above are served here, the rest by the thread.
        faults.iter().for_each(|&i| serve(i));
        let took = pause.join().unwrap().expect("pause once faults are served");
        eprintln!("pause took {took:?} with its vCPUs blocked on faults");
        m.resume().unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let now = m.counters();
            if now
                .iter()
                .zip(&before)
                .all(|(n, b)| n.passes >= b.passes + 2)
            {
                assert!(now.iter().all(|c| c.corrupt == 0), "{now:?}");
                break;
            }
            assert!(Instant::now() < deadline, "{now:?}");
            std::thread::sleep(Duration::from_millis(20));
        }
        m.shutdown();
        stop.store(true, Ordering::Release);
    });
}

/// One bit per page, set once the page is installed; shared by the fault
/// server and the background pusher.
struct PageSet(Vec<AtomicU64>);

impl PageSet {
    fn new(pages: u64) -> Self {
        Self((0..pages.div_ceil(64)).map(|_| AtomicU64::new(0)).collect())
    }
    fn contains(&self, i: u64) -> bool {
        self.0[(i / 64) as usize].load(Ordering::Acquire) & (1 << (i % 64)) != 0
    }
    fn insert(&self, i: u64) {
        self.0[(i / 64) as usize].fetch_or(1 << (i % 64), Ordering::Release);
    }
}

/// What the fault server saw.
#[derive(Default)]
struct Served {
    faults: u64,
    /// Fault read to install done, per page served.
    latencies: Vec<Duration>,
    /// Faults on pages the pusher had installed meanwhile.
    already_there: u64,
    /// What this thread's installs did (a page may turn out present when
    /// the pusher got there between the check and the copy).
    installed: guestmem::Installed,
}

/// The destination daemon's fault loop: waits on the fd with poll (no
/// spinning), installs each faulting page from the source memory.
fn serve_faults(
    pager: &Pager,
    src: &GuestMemory,
    installed: &PageSet,
    stop: &AtomicBool,
) -> Served {
    use std::os::fd::AsFd;
    let mut out = Served::default();
    let mut pending = Vec::new();
    let mut page = vec![0u8; PAGE_SIZE];
    while !stop.load(Ordering::Acquire) {
        let mut fds = [nix::poll::PollFd::new(
            pager.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut fds, 50u16) {
            Ok(_) | Err(nix::errno::Errno::EINTR) => {}
            Err(e) => panic!("poll: {e}"),
        }
        pending.clear();
        pager.read_faults(&mut pending).unwrap();
        let read_at = Instant::now();
        for &i in &pending {
            out.faults += 1;
            if installed.contains(i) {
                out.already_there += 1;
                continue;
            }
            src.read_page(i, (&mut page[..]).try_into().unwrap())
                .unwrap();
            out.installed += pager.install(i, &page).unwrap();
            installed.insert(i);
            out.latencies.push(read_at.elapsed());
        }
    }
    out
}

/// The background stream: installs every missing page not yet installed,
/// in ascending runs of up to 32 pages.
fn push_all(
    pager: &Pager,
    src: &GuestMemory,
    missing: &[u64],
    installed: &PageSet,
) -> guestmem::Installed {
    const RUN: usize = 32;
    let mut total = guestmem::Installed::default();
    let mut buf = vec![0u8; RUN * PAGE_SIZE];
    let mut k = 0;
    while k < missing.len() {
        let first = missing[k];
        if installed.contains(first) {
            k += 1;
            continue;
        }
        let mut n = 1;
        while n < RUN && k + n < missing.len() && missing[k + n] == first + n as u64 {
            n += 1;
        }
        let bytes = n * PAGE_SIZE;
        src.read_at(first * PAGE_SIZE as u64, &mut buf[..bytes])
            .unwrap();
        total += pager.install(first, &buf[..bytes]).unwrap();
        for i in first..first + n as u64 {
            installed.insert(i);
        }
        k += n;
    }
    total
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

#[test]
fn restored_guest_runs_on_pages_served_from_another_process() {
    if !kvm_available_or_skip() {
        return;
    }
    let dir = scratch();
    let src = Vmm::run(
        dir.path(),
        "src",
        &RunOpts {
            memory: "512M",
            vcpus: 2,
            wss: "128M",
            dirty_rate: "200",
            mode: "full",
            ..Default::default()
        },
    );
    wait_for(&src, "2 passes", Duration::from_secs(120), |s| {
        all_passes_at_least(s, 2)
    });
    let mut sc = src.client();
    sc.pause().unwrap();
    let saved = sc.status().unwrap().counters;
    let blob = sc.save_state().unwrap();
    let src_mem = sc.map_memory().unwrap();
    let layout = src_mem.layout().clone();
    let guest = vmm::state::VmState::from_bytes(&blob)
        .unwrap()
        .workload
        .expect("workload layout");

    // The destination's memfd: the source's pages minus the working set
    // and every other data page.
    let dst_mem = copy_memory(&src_mem);
    let wss =
        guest.wss_gpa.0 / PAGE_SIZE as u64..(guest.wss_gpa.0 + guest.wss_bytes) / PAGE_SIZE as u64;
    let mut missing = Vec::new();
    for r in src_mem.data_ranges().unwrap() {
        for i in r {
            if wss.contains(&i) || i % 2 == 0 {
                missing.push(i);
            }
        }
    }
    for &i in &missing {
        dst_mem.punch_hole(i, 1).unwrap();
    }
    let dst_fd = dst_mem.fd().try_clone_to_owned().unwrap();
    let dst = match Vmm::restore(dir.path(), "dst", &dst_fd, None) {
        Started::Ready(v) => v,
        Started::Failed { status, stderr, .. } => panic!("restore failed ({status}):\n{stderr}"),
    };
    let mut c = dst.client();
    let (uffd, regions) = c.userfaultfd().expect("userfaultfd");
    let pager = Pager::new(uffd, &layout, regions).unwrap();

    let installed = PageSet::new(layout.total_pages());
    let stop = AtomicBool::new(false);
    let t0 = Instant::now();
    let (served, pushed, after) = std::thread::scope(|s| {
        let server = s.spawn(|| serve_faults(&pager, &src_mem, &installed, &stop));
        c.restore(&blob).expect("restore");
        // Pages the guest dirties from here on may differ from the source.
        c.dirty_log_start().unwrap();
        c.resume().unwrap();
        let pusher = s.spawn(|| push_all(&pager, &src_mem, &missing, &installed));
        let after = wait_for(&dst, "3 more passes", Duration::from_secs(120), |st| {
            st.counters
                .iter()
                .zip(&saved)
                .all(|(now, then)| now.passes >= then.passes + 3)
        });
        let pushed = pusher.join().unwrap();
        stop.store(true, Ordering::Release);
        (server.join().unwrap(), pushed, after)
    });
    let elapsed = t0.elapsed();

    // The guest checked every page it wrote on the previous pass.
    for (i, (now, then)) in after.counters.iter().zip(&saved).enumerate() {
        assert!(now.pages_written > then.pages_written, "vcpu {i}");
        assert_eq!(now.corrupt, 0, "vcpu {i} saw corruption");
    }
    assert_eq!(after.corrupt_events, 0);
    assert!(!dst.serial().contains("CORRUPT"));
    assert!(served.faults > 0, "no remote faults");
    assert_eq!(
        served.installed.copied + pushed.copied,
        missing.len() as u64,
        "every missing page installed exactly once"
    );
    for &i in &missing {
        assert!(installed.contains(i));
    }

    // Memory: pause, then every page the destination did not dirty equals
    // the source's; overlaying the dirtied ones gives the same digest.
    c.pause().unwrap();
    let dirtied = c.dirty_log_fetch().unwrap();
    let dst_view = c.map_memory().unwrap();
    let expected = copy_memory(&src_mem);
    let mut page = [0u8; PAGE_SIZE];
    for i in 0..layout.total_pages() {
        if dirtied.test(i) {
            dst_view.read_page(i, &mut page).unwrap();
            expected.write_page(i, &page).unwrap();
        }
    }
    assert_eq!(
        dst_view.digest(),
        expected.digest(),
        "memory differs from the source"
    );
    // The dirtied pages include the working set the guest rewrote.
    assert!(dirtied.count() > 0);

    let mut lat = served.latencies.clone();
    lat.sort();
    eprintln!(
        "postcopy: {} missing pages ({} MiB), {} faults ({} on pages pushed meanwhile), \
         {} pushed, {} found present; fault service p50 {:?} p99 {:?} max {:?}; \
         3 passes in {:?}",
        missing.len(),
        (missing.len() * PAGE_SIZE) >> 20,
        served.faults,
        served.already_there,
        pushed.copied,
        pushed.present,
        percentile(&lat, 0.5),
        percentile(&lat, 0.99),
        lat.last().copied().unwrap_or_default(),
        elapsed,
    );

    c.userfaultfd_release().unwrap();
    drop(pager);
    assert!(dst.shutdown().success());
    assert!(src.shutdown().success());
}
