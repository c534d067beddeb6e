//! KVM dirty logging through the control socket, checked against what the
//! guest is known to write: its slice of the working set, its status slot
//! and its stack.

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::*;
use guestmem::{Gpa, MemoryLayout, PAGE_SIZE};
use vmm::control::ErrorCode;
use vmm::kvm_check::kvm_available_or_skip;

const PAGE: u64 = PAGE_SIZE as u64;

fn page_index(layout: &MemoryLayout, gpa: Gpa) -> u64 {
    layout.gpa_to_offset(gpa).expect("gpa is RAM") / PAGE
}

#[test]
fn dirty_log_reports_exactly_the_pages_the_guest_wrote() {
    if !kvm_available_or_skip() {
        return;
    }
    let dir = scratch();
    let vmm = Vmm::run(
        dir.path(),
        "dirty",
        &RunOpts {
            memory: "64M",
            vcpus: 1,
            wss: "2M",
            dirty_rate: "100",
            mode: "sparse",
            ..Default::default()
        },
    );
    let mut c = vmm.client();
    // Fetching before logging is on is refused with a stable code.
    let err = c.dirty_log_fetch().unwrap_err();
    assert!(err.code().is_some(), "{err}");
    assert_ne!(err.code(), Some(ErrorCode::Unknown));

    wait_for(&vmm, "first pass", Duration::from_secs(60), |s| {
        all_passes_at_least(s, 1)
    });
    c.dirty_log_start().expect("dirty log start");
    assert!(c.status().unwrap().dirty_logging);
    c.pause().expect("pause");
    let _ = c.dirty_log_fetch().expect("clearing fetch");
    let empty = c.dirty_log_fetch().expect("fetch while paused");
    assert!(
        empty.is_empty(),
        "paused guest dirtied {} pages: {:?}",
        empty.count(),
        empty.ranges().take(8).collect::<Vec<_>>()
    );

    let paused = c.status().unwrap();
    let layout = paused.guest_layout.clone().expect("workload layout");
    let (mem_layout, _fd) = c.get_memory().expect("memory layout");
    assert_eq!(empty.pages(), mem_layout.total_pages());

    // Run until at least one whole pass happened after the resume: the pass
    // in progress at the pause may be partial, the next one is complete.
    let start_passes = paused.counters[0].passes;
    c.resume().expect("resume");
    wait_for(&vmm, "2 more passes", Duration::from_secs(60), |s| {
        s.counters[0].passes >= start_passes + 2
    });
    c.pause().expect("pause");
    let dirty = c.dirty_log_fetch().expect("fetch");

    let (slice_gpa, slice_pages) = layout.slice(0);
    let mut expected: BTreeSet<u64> = (0..slice_pages)
        .map(|p| page_index(&mem_layout, Gpa(slice_gpa.0 + p * PAGE)))
        .collect();
    expected.insert(page_index(&mem_layout, layout.status_slot_gpa(0)));
    // The guest's code calls subroutines, so its stack page is written.
    expected.insert(page_index(&mem_layout, Gpa(layout.stack_top(0).0 - 1)));
    let got: BTreeSet<u64> = dirty.iter().collect();
    let missing: Vec<_> = expected.difference(&got).take(8).collect();
    let extra: Vec<_> = got.difference(&expected).take(8).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "dirty log differs from the guest's writes: {} expected, {} got; missing {missing:?}, extra {extra:?}",
        expected.len(),
        got.len()
    );

    // Stop: further fetches are refused, the guest keeps running.
    c.dirty_log_stop().expect("stop");
    assert!(!c.status().unwrap().dirty_logging);
    assert!(c.dirty_log_fetch().is_err());
    c.resume().expect("resume");
    let p = c.status().unwrap().counters[0].passes;
    wait_for(&vmm, "progress after stop", Duration::from_secs(60), |s| {
        s.counters[0].passes > p
    });
    assert!(vmm.shutdown().success());
}
