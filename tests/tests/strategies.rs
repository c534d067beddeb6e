//! The convergence scenario end to end: a 1 GiB guest that
//! dirties its whole memory as fast as it can, behind a 64 MiB/s link.
//! Pre-copy alone cannot move it (the failure tests cover that); with
//! auto-converge it converges under a rising throttle, and with post-copy
//! it moves and runs on the target while its pages follow.
//!
//! Real daemons, real KVM guests, loopback QUIC. Each test skips with a
//! message without /dev/kvm (fails under MIGRATED_REQUIRE_KVM=1).

use std::time::Duration;

use e2e::Cluster;
use migrated_api::model::{
    MigrationMode, MigrationOverrides, MigrationPhase, MigrationRecord, Quantity, VmPhase,
};
use vmm::kvm_check::kvm_available_or_skip;

const A: &str = "node-a";
const B: &str = "node-b";
const GAP: Duration = Duration::from_millis(1000);
const TIMEOUT: Duration = Duration::from_secs(400);

/// A 1 GiB guest rewriting all of its memory, every byte, at max rate,
/// with its working set written once before the migration starts.
fn restless_gib(c: &Cluster, vm: &str) {
    c.create_vm(
        A,
        &[
            vm,
            "--memory",
            "1Gi",
            "--vcpus",
            "2",
            "--wss",
            "1Gi",
            "--dirty-rate",
            "max",
            "--mode",
            "full",
        ],
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(120);
    while c.counters(A, vm).passes < 1 {
        assert!(
            std::time::Instant::now() < deadline,
            "guest never wrote its memory"
        );
        // The guest runs on its own; this polls its counter.
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn migrate(c: &Cluster, vm: &str, options: MigrationOverrides) -> MigrationRecord {
    let options = MigrationOverrides {
        bandwidth_per_migration: Some(Quantity::mib(64)),
        ..options
    };
    let m = c.start_migration(A, B, vm, true, options);
    c.wait_migration(A, &m.name, TIMEOUT, |m| m.phase.is_final())
}

/// The guest left A and runs intact on B.
fn assert_moved(c: &Cluster, vm: &str, m: &MigrationRecord) {
    assert_eq!(
        m.phase,
        MigrationPhase::Succeeded,
        "{m:?}\n{}\n{}",
        c.node(A).log_tail(30),
        c.node(B).log_tail(30)
    );
    assert_eq!(m.memory_digest_matched, Some(true), "{m:?}");
    let on_b = c.block_on(c.client(B).get_vm(vm)).expect("vm on B");
    assert_eq!(on_b.status.phase, VmPhase::Running, "{on_b:?}");
    let g = c.assert_guest_alive(B, vm, GAP);
    assert_eq!(g.throttle_pct, 0, "throttle left on at B: {g:?}");
    assert!(c.block_on(c.client(A).get_vm(vm)).is_err(), "still on A");
    assert!(c.vmm_pids(A, vm).is_empty(), "a vmm is left on A");
}

#[test]
fn auto_converge_moves_a_guest_dirtying_all_its_memory_over_64mi() {
    if !kvm_available_or_skip() {
        return;
    }
    let c = Cluster::loopback(|_| {});
    restless_gib(&c, "busy");
    let m = migrate(
        &c,
        "busy",
        MigrationOverrides {
            allow_auto_converge: Some(true),
            ..Default::default()
        },
    );
    assert_moved(&c, "busy", &m);
    assert_eq!(m.mode, MigrationMode::PreCopy, "{m:?}");
    assert!(
        !m.throttle_steps.is_empty(),
        "converged without throttle? {m:?}"
    );
    let pcts: Vec<u8> = m.throttle_steps.iter().map(|s| s.percent).collect();
    assert!(pcts.windows(2).all(|w| w[0] < w[1]), "{pcts:?}");
    eprintln!(
        "MEASURED auto-converge 1Gi full max @64Mi: steps {pcts:?}, {} passes, downtime {:?} ms",
        m.passes, m.actual_downtime_ms
    );
}

#[test]
fn post_copy_moves_a_guest_dirtying_all_its_memory_over_64mi() {
    if !kvm_available_or_skip() {
        return;
    }
    let c = Cluster::loopback(|_| {});
    restless_gib(&c, "busy");
    let m = migrate(
        &c,
        "busy",
        MigrationOverrides {
            allow_post_copy: Some(true),
            // 20 s for the whole GiB: pre-copy cannot finish in that time
            // at 64 MiB/s, so the completion timeout switches to post-copy.
            completion_timeout_per_gib: Some(20),
            ..Default::default()
        },
    );
    assert_moved(&c, "busy", &m);
    assert_eq!(m.mode, MigrationMode::PostCopy, "{m:?}");
    assert!(m.remote_faults > 0, "{m:?}");
    assert!(m.post_copy_pages > 0, "{m:?}");
    assert!(m.fault_latency_p99_us.is_some(), "{m:?}");
    eprintln!(
        "MEASURED post-copy 1Gi full max @64Mi: downtime {:?} ms, {} remote faults (p50 {:?} us, p99 {:?} us), {} pages after the switchover",
        m.actual_downtime_ms,
        m.remote_faults,
        m.fault_latency_p50_us,
        m.fault_latency_p99_us,
        m.post_copy_pages
    );
}
