//! The guest's own memory check catches a byte flipped behind its back:
//! the proof that the "no CORRUPT" assertions elsewhere can fail.

mod common;

use std::time::{Duration, Instant};

use common::*;
use guestmem::{Gpa, PAGE_SIZE};
use vmm::kvm_check::kvm_available_or_skip;

/// Finds the GPA in a serial line like `CORRUPT vcpu=0 gpa=0x... pass=N`.
fn corrupt_gpa(line: &str) -> Option<u64> {
    let tok = line
        .split_whitespace()
        .find_map(|t| t.strip_prefix("gpa="))?;
    let hex = tok.strip_prefix("0x").unwrap_or(tok);
    u64::from_str_radix(hex, 16).ok()
}

#[test]
fn flipped_byte_in_paused_guest_is_reported_as_corrupt() {
    if !kvm_available_or_skip() {
        return;
    }
    let dir = scratch();
    let vmm = Vmm::run(
        dir.path(),
        "corrupt",
        &RunOpts {
            memory: "64M",
            vcpus: 1,
            wss: "4M",
            dirty_rate: "200",
            mode: "sparse",
            ..Default::default()
        },
    );
    // After two passes every page of the slice holds a known pattern.
    wait_for(&vmm, "2 passes", Duration::from_secs(60), |s| {
        all_passes_at_least(s, 2)
    });
    let mut c = vmm.client();
    c.pause().expect("pause");
    let before = c.status().expect("status");
    assert_eq!(total_corrupt(&before), 0);
    assert_eq!(before.corrupt_events, 0);
    let layout = before.guest_layout.clone().expect("workload layout");
    let (slice_gpa, slice_pages) = layout.slice(0);
    assert!(slice_pages > 2);
    // Sparse mode keeps its pattern in the first word of each page.
    let victim = Gpa(slice_gpa.0 + (slice_pages / 2) * PAGE_SIZE as u64);

    let mem = c.map_memory().expect("map guest memory");
    let mut byte = [0u8; 1];
    mem.read_gpa(victim, &mut byte).unwrap();
    mem.write_gpa(victim, &[byte[0] ^ 0xa5]).unwrap();

    c.resume().expect("resume");
    let s = wait_for(&vmm, "a CORRUPT report", Duration::from_secs(60), |s| {
        total_corrupt(s) >= 1 && s.corrupt_events >= 1
    });
    // The guest repairs the page in the same pass, so one flip is one report
    // even after more passes.
    let passes = s.counters[0].passes;
    let later = wait_for(&vmm, "2 more passes", Duration::from_secs(60), |s| {
        s.counters[0].passes >= passes + 2
    });
    assert_eq!(total_corrupt(&later), 1, "{later:?}");
    assert_eq!(later.corrupt_events, 1);

    // The serial line names the page; the guest writes it right after the
    // counter, so give the log a bounded moment.
    let deadline = Instant::now() + Duration::from_secs(10);
    let line = loop {
        let serial = vmm.serial();
        if let Some(l) = serial.lines().find(|l| l.contains("CORRUPT")) {
            break l.to_owned();
        }
        assert!(
            Instant::now() < deadline,
            "no CORRUPT line in serial log:\n{serial}"
        );
        std::thread::sleep(Duration::from_millis(25));
    };
    assert!(line.contains("vcpu=0"), "{line}");
    assert_eq!(corrupt_gpa(&line), Some(victim.0), "{line}");

    assert!(vmm.shutdown().success());
}
