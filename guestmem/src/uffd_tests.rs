//! Pager tests without KVM: a thread of this process faults on a registered
//! memfd mapping and another thread serves it.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;
use crate::layout::MemoryLayout;

/// Values from `<linux/userfaultfd.h>` (printed by a C program on x86-64).
#[test]
fn ioctl_numbers_match_the_kernel_header() {
    assert_eq!(UFFDIO_API, 0xc018_aa3f);
    assert_eq!(UFFDIO_REGISTER, 0xc020_aa00);
    assert_eq!(UFFDIO_WAKE, 0x8010_aa02);
    assert_eq!(UFFDIO_COPY, 0xc028_aa03);
    assert_eq!(UFFDIO_ZEROPAGE, 0xc020_aa04);
    assert_eq!(USERFAULTFD_IOC_NEW, 0xaa00);
}

/// userfaultfd needs /dev/userfaultfd or CAP_SYS_PTRACE. Like the KVM gate:
/// skip (saying so) without it, unless MIGRATED_REQUIRE_KVM=1, where
/// post-copy is expected to work and its absence fails.
pub(crate) fn uffd_or_skip() -> Option<Userfaultfd> {
    match Userfaultfd::create() {
        Ok(u) => Some(u),
        Err(e) => {
            if std::env::var("MIGRATED_REQUIRE_KVM").as_deref() == Ok("1") {
                panic!("userfaultfd unavailable and MIGRATED_REQUIRE_KVM=1: {e}");
            }
            eprintln!("skipped: userfaultfd unavailable: {e}");
            None
        }
    }
}

/// Memory with `pages` pages of pattern, registered; returns it and a pager.
fn setup(bytes: u64) -> Option<(Arc<GuestMemory>, Pager)> {
    let uffd = uffd_or_skip()?;
    let layout = MemoryLayout::for_size(bytes).unwrap();
    let mem = Arc::new(GuestMemory::create("uffd-test", layout.clone()).unwrap());
    let regions = uffd.register_memory(&mem).unwrap();
    let pager = Pager::new(uffd.into_fd(), &layout, regions).unwrap();
    Some((mem, pager))
}

fn page_of(v: u8) -> Vec<u8> {
    vec![v; PAGE_SIZE]
}

/// Polls `read_faults` until `n` faults arrived (a deadline, not a sleep).
fn wait_faults(p: &Pager, n: usize) -> Vec<u64> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut out = Vec::new();
    while out.len() < n {
        p.read_faults(&mut out).unwrap();
        assert!(Instant::now() < deadline, "only {out:?} faults arrived");
        std::thread::yield_now();
    }
    out
}

#[test]
fn fault_on_hole_is_served_from_another_thread() {
    let Some((mem, pager)) = setup(2 << 20) else {
        return;
    };
    let mut none = Vec::new();
    assert_eq!(pager.read_faults(&mut none).unwrap(), 0);
    let m = Arc::clone(&mem);
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 8];
        m.read_at(7 * 4096 + 100, &mut b).unwrap();
        b
    });
    let faults = wait_faults(&pager, 1);
    assert_eq!(faults[0], 7);
    assert!(!reader.is_finished(), "reader ran without its page");
    let got = pager.install(7, &page_of(0xab)).unwrap();
    assert_eq!(
        got,
        Installed {
            copied: 1,
            present: 0
        }
    );
    assert_eq!(reader.join().unwrap(), [0xab; 8]);
    // Installed pages are ordinary memory now: no new fault.
    let mut b = [0u8; 1];
    mem.read_at(7 * 4096, &mut b).unwrap();
    assert_eq!(pager.read_faults(&mut none).unwrap(), 0);
}

#[test]
fn present_pages_are_reported_and_their_waiters_woken() {
    let Some((mem, pager)) = setup(2 << 20) else {
        return;
    };
    // Pages 3 and 5 are present before a run over 2..=6 is installed: the
    // copy stops at each (partial copy, then EEXIST) and carries on.
    pager.install(3, &page_of(1)).unwrap();
    pager.install(5, &page_of(1)).unwrap();
    let mut run = Vec::new();
    for v in 2..=6u8 {
        run.extend(page_of(v));
    }
    let got = pager.install(2, &run).unwrap();
    assert_eq!(
        got,
        Installed {
            copied: 3,
            present: 2
        }
    );
    let mut b = [0u8; 1];
    for (page, want) in [(2, 2), (3, 1), (4, 4), (5, 1), (6, 6)] {
        mem.read_at(page * 4096, &mut b).unwrap();
        assert_eq!(b[0], want, "page {page}");
    }
}

#[test]
fn zero_install_and_wake_serve_waiters() {
    let Some((mem, pager)) = setup(2 << 20) else {
        return;
    };
    let done = Arc::new(AtomicBool::new(false));
    let (m, d) = (Arc::clone(&mem), Arc::clone(&done));
    let reader = std::thread::spawn(move || {
        let mut b = [0xffu8; 16];
        m.read_at(20 * 4096, &mut b).unwrap();
        d.store(true, Ordering::SeqCst);
        b
    });
    assert_eq!(wait_faults(&pager, 1), vec![20]);
    let got = pager.install_zero(16, 8).unwrap();
    assert_eq!(got.copied + got.present, 8);
    assert_eq!(reader.join().unwrap(), [0u8; 16]);
    assert!(done.load(Ordering::SeqCst));
}

#[test]
fn bad_arguments_are_refused() {
    let Some((_mem, pager)) = setup(2 << 20) else {
        return;
    };
    assert!(matches!(
        pager.install(0, &[0u8; 100]),
        Err(PagerError::NotPages { len: 100 })
    ));
    assert!(matches!(
        pager.install(0, &[]),
        Err(PagerError::NotPages { len: 0 })
    ));
    assert!(matches!(
        pager.install(511, &[0u8; 2 * PAGE_SIZE]),
        Err(PagerError::OutOfRange {
            index: 511,
            count: 2
        })
    ));
    assert!(matches!(
        pager.install_zero(u64::MAX, 2),
        Err(PagerError::OutOfRange { .. })
    ));
    assert!(pager.wake(512, 1).is_err());
    assert_eq!(pager.index_of(pager.addr_of(100).unwrap() + 5), Some(100));
    assert_eq!(pager.addr_of(512), None);
}

#[test]
fn regions_must_match_the_layout() {
    let Some(uffd) = uffd_or_skip() else {
        return;
    };
    let fd = || uffd.as_fd().try_clone_to_owned().unwrap();
    let layout = MemoryLayout::for_size(4 << 20).unwrap();
    let good = PagerRegion {
        first_index: 0,
        pages: 1024,
        host_addr: 0x7000_0000_0000,
    };
    assert!(Pager::new(fd(), &layout, vec![good]).is_ok());
    for bad in [
        vec![],
        vec![good, good],
        vec![PagerRegion { pages: 512, ..good }],
        vec![PagerRegion {
            first_index: 1,
            ..good
        }],
        vec![PagerRegion {
            host_addr: 0x7000_0000_0010,
            ..good
        }],
        vec![PagerRegion {
            host_addr: u64::MAX - 4095,
            ..good
        }],
    ] {
        assert!(
            matches!(
                Pager::new(fd(), &layout, bad.clone()),
                Err(PagerError::Regions { .. })
            ),
            "{bad:?}"
        );
    }
}

/// Above 3 GiB the layout has two regions; a run across the boundary is
/// split, and faults map back to the right index on both sides.
#[test]
fn runs_cross_region_boundaries() {
    let Some((mem, pager)) = setup((3 << 30) + (2 << 20)) else {
        return;
    };
    assert_eq!(mem.layout().regions().len(), 2);
    let boundary = mem.layout().regions()[1].first_index();
    let mut run = page_of(1);
    run.extend(page_of(2));
    let got = pager.install(boundary - 1, &run).unwrap();
    assert_eq!(
        got,
        Installed {
            copied: 2,
            present: 0
        }
    );
    let mut b = [0u8; 1];
    mem.read_at(boundary * 4096, &mut b).unwrap();
    assert_eq!(b[0], 2);
    let m = Arc::clone(&mem);
    let reader = std::thread::spawn(move || {
        let mut b = [0u8; 1];
        m.read_at((boundary + 7) * 4096, &mut b).unwrap();
        b[0]
    });
    assert_eq!(wait_faults(&pager, 1), vec![boundary + 7]);
    pager.install(boundary + 7, &page_of(9)).unwrap();
    assert_eq!(reader.join().unwrap(), 9);
}

/// A page written through another mapping of the memfd while a thread
/// waits on it: the copy finds it present (EEXIST), which the kernel does
/// not treat as a wake-up; `install` must wake the waiter itself.
#[test]
fn waiter_on_a_page_that_appears_elsewhere_is_woken() {
    let Some((mem, pager)) = setup(2 << 20) else {
        return;
    };
    let m = Arc::clone(&mem);
    let (tx, rx) = std::sync::mpsc::channel();
    // Reported through a channel so a missing wake fails within a deadline
    // instead of hanging the test.
    std::thread::spawn(move || {
        let mut b = [0u8; 1];
        m.read_at(9 * 4096, &mut b).unwrap();
        let _ = tx.send(b[0]);
    });
    assert_eq!(wait_faults(&pager, 1), vec![9]);
    // Registration is per mapping: this second one does not fault.
    let other =
        GuestMemory::from_fd(mem.fd().try_clone_to_owned().unwrap(), mem.layout().clone()).unwrap();
    other.write_at(9 * 4096, &[0x5a]).unwrap();
    let got = pager.install(9, &page_of(0x11)).unwrap();
    assert_eq!(
        got,
        Installed {
            copied: 0,
            present: 1
        }
    );
    let got = rx.recv_timeout(Duration::from_secs(10));
    assert_eq!(got, Ok(0x5a), "waiter not woken, or the present page lost");
}
