//! vCPU throttling slows the guest down by its own measure (its pass
//! counter) and turning it off restores the rate.

mod common;

use std::time::{Duration, Instant};

use common::*;
use vmm::control::{ControlClient, ErrorCode};
use vmm::kvm_check::kvm_available_or_skip;

/// Guest passes per second over `window`, from the guest's own counter.
/// The wait here is the measurement window itself, not a synchronisation.
fn pass_rate(c: &mut ControlClient, window: Duration) -> f64 {
    let s0 = c.status().expect("status");
    let t0 = Instant::now();
    std::thread::sleep(window);
    let s1 = c.status().expect("status");
    let dt = t0.elapsed().as_secs_f64();
    let passes = s1.counters[0].passes - s0.counters[0].passes;
    passes as f64 / dt
}

#[test]
fn throttle_80_slows_the_guest_and_0_restores_it() {
    if !kvm_available_or_skip() {
        return;
    }
    let dir = scratch();
    // Unpaced, so the rate is bounded by how much the vCPU gets to run.
    let vmm = Vmm::run(
        dir.path(),
        "throttle",
        &RunOpts {
            memory: "64M",
            vcpus: 1,
            wss: "1M",
            dirty_rate: "max",
            mode: "sparse",
            ..Default::default()
        },
    );
    wait_for(&vmm, "first pass", Duration::from_secs(60), |s| {
        all_passes_at_least(s, 1)
    });
    let mut c = vmm.client();
    let window = Duration::from_secs(2);

    let free = pass_rate(&mut c, window);
    assert!(
        free > 5.0,
        "unthrottled guest too slow to measure: {free:.1}/s"
    );

    c.throttle(80).expect("throttle 80");
    let s = c.status().unwrap();
    assert_eq!(s.throttle_pct, 80);
    let throttled = pass_rate(&mut c, window);

    c.throttle(0).expect("throttle 0");
    assert_eq!(c.status().unwrap().throttle_pct, 0);
    let restored = pass_rate(&mut c, window);

    eprintln!("passes/s: free {free:.1}, throttled(80%) {throttled:.1}, restored {restored:.1}");
    // 80% should leave ~20% of the rate; 50% leaves room for a busy host.
    assert!(
        throttled < 0.5 * free,
        "throttle 80 did not slow the guest: {throttled:.1} vs {free:.1} passes/s"
    );
    assert!(throttled > 0.0, "throttled guest made no progress at all");
    assert!(
        restored > 2.0 * throttled && restored > 0.6 * free,
        "throttle 0 did not restore the rate: {restored:.1} vs {free:.1} passes/s (throttled {throttled:.1})"
    );

    let err = c.throttle(100).unwrap_err();
    assert_eq!(err.code(), Some(ErrorCode::InvalidArgument), "{err}");
    assert_eq!(c.status().unwrap().throttle_pct, 0);
    assert!(vmm.shutdown().success());
}
