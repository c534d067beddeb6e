//! End-to-end: real daemons, real KVM guests, real QUIC. Each test skips
//! with a message without /dev/kvm (fails under MIGRATED_REQUIRE_KVM=1).
//! The binaries must be built first: `cargo build --workspace`.

use std::process::Command;
use std::time::Duration;

use e2e::netns::{NetnsPair, ADDR_B};
use e2e::{run_with_deadline, serial, stderr, stdout, Binaries, Cluster};
use migrated_api::model::{HumanDuration, MigrationPhase, MigrationRecord, Quantity, VmPhase};
use vmm::kvm_check::kvm_available_or_skip;

const A: &str = "node-a";
const B: &str = "node-b";
/// Gap between two counter readings.
const GAP: Duration = Duration::from_millis(1000);
/// Generous: two cores shared with builds.
const MIGRATION_TIMEOUT: Duration = Duration::from_secs(180);

fn migrate(c: &Cluster, vm: &str, verify: bool) -> MigrationRecord {
    c.start_migration(A, B, vm, verify, Default::default())
}

fn assert_succeeded_and_verified(c: &Cluster, m: &MigrationRecord) {
    assert_eq!(
        m.phase,
        MigrationPhase::Succeeded,
        "{m:?}\n{}\n{}",
        c.node(A).log_tail(30),
        c.node(B).log_tail(30)
    );
    assert_eq!(m.memory_digest_matched, Some(true), "{m:?}");
    assert!(m.actual_downtime_ms.is_some_and(|d| d > 0), "{m:?}");
    assert!(m.bytes_sent > 0 && m.passes >= 1, "{m:?}");
}

/// After a successful migration the guest runs on B, not on A.
fn assert_moved(c: &Cluster, vm: &str) {
    let on_b = c.block_on(c.client(B).get_vm(vm)).expect("vm on B");
    assert_eq!(on_b.status.node_name, B);
    assert_eq!(on_b.status.phase, VmPhase::Running, "{on_b:?}");
    c.assert_guest_alive(B, vm, GAP);
    if let Ok(on_a) = c.block_on(c.client(A).get_vm(vm)) {
        assert_ne!(on_a.status.phase, VmPhase::Running, "still on A: {on_a:?}");
    }
}

#[test]
fn demo_json_reports_success() {
    if !kvm_available_or_skip() {
        return;
    }
    let _serial = serial();
    let bins = Binaries::locate();
    let mut cmd = Command::new(&bins.migratectl);
    cmd.args(["demo", "--output", "json", "--memory", "512Mi"]);
    let o = run_with_deadline(cmd, Duration::from_secs(300));
    assert!(o.status.success(), "demo failed:\n{}", stderr(&o));
    let out = stdout(&o);
    // stdout holds exactly one JSON object: the final record.
    let m: serde_json::Value = serde_json::from_str(out.trim())
        .unwrap_or_else(|e| panic!("stdout is not one JSON object ({e}): {out}"));
    assert_eq!(m["phase"], "Succeeded", "{m}");
    assert!(m["actualDowntimeMs"].as_u64().is_some_and(|d| d > 0), "{m}");
    assert!(m["bytesSent"].as_u64().is_some_and(|b| b > 0), "{m}");
    assert!(m["passes"].as_u64().is_some_and(|p| p >= 1), "{m}");
    assert_eq!(m["memoryDigestMatched"], true, "{m}");
    // The narrative went to stderr, and the demo cleaned up after itself.
    assert!(stderr(&o).contains("node-b"), "{}", stderr(&o));
}

#[test]
fn migrates_between_network_namespaces() {
    if !kvm_available_or_skip() {
        return;
    }
    let Some(ns) = NetnsPair::create_or_skip("migrates_between_network_namespaces") else {
        return;
    };
    // Declared after `ns`, so the daemons stop before the namespaces go.
    let c = Cluster::in_netns(&ns, |_| {});
    c.create_vm(
        A,
        &[
            "web",
            "--memory",
            "256Mi",
            "--vcpus",
            "2",
            "--wss",
            "64Mi",
            "--dirty-rate",
            "20",
        ],
    );
    c.assert_guest_alive(A, "web", GAP);
    let m = migrate(&c, "web", true);
    let m = c.wait_migration(A, &m.name, MIGRATION_TIMEOUT, |m| m.phase.is_final());
    assert_succeeded_and_verified(&c, &m);
    assert_eq!(m.target_address, format!("{ADDR_B}:7878"));
    assert_moved(&c, "web");
}

/// A migration that stays Running for a while: a busy guest behind a
/// bandwidth cap.
fn slow_cluster() -> Cluster {
    Cluster::loopback(|c| {
        c.migration.bandwidth_per_migration = Quantity::mib(8);
        c.migration.keepalive_interval = HumanDuration::from_millis(500);
        c.migration.keepalive_count = 4;
    })
}

fn create_busy_vm(c: &Cluster, name: &str) {
    c.create_vm(
        A,
        &[
            name,
            "--memory",
            "256Mi",
            "--wss",
            "128Mi",
            "--dirty-rate",
            "max",
            "--mode",
            "full",
        ],
    );
}

#[test]
fn target_killed_mid_transfer_leaves_guest_on_source() {
    if !kvm_available_or_skip() {
        return;
    }
    let mut c = slow_cluster();
    create_busy_vm(&c, "db");
    let m = migrate(&c, "db", false);
    let running = c.wait_migration(A, &m.name, MIGRATION_TIMEOUT, |m| {
        m.phase.is_final() || (m.phase == MigrationPhase::Running && m.bytes_sent > 0)
    });
    assert_eq!(running.phase, MigrationPhase::Running, "{running:?}");
    c.kill(B);
    let failed = c.wait_migration(A, &m.name, MIGRATION_TIMEOUT, |m| m.phase.is_final());
    assert_eq!(failed.phase, MigrationPhase::Failed, "{failed:?}");
    let reason = failed.failure_reason.clone().unwrap_or_default();
    eprintln!(
        "failure after killing {B}: {:?}: {reason}",
        failed.failure_code
    );
    assert!(!reason.is_empty(), "{failed:?}");
    assert!(failed.failure_code.is_some(), "{failed:?}");
    let vm = c.block_on(c.client(A).get_vm("db")).expect("vm still on A");
    assert_eq!(vm.status.phase, VmPhase::Running, "{vm:?}");
    assert_eq!(vm.status.active_migration, None);
    c.assert_guest_alive(A, "db", GAP);
}

#[test]
fn second_migration_of_same_vm_is_refused() {
    if !kvm_available_or_skip() {
        return;
    }
    let c = slow_cluster();
    create_busy_vm(&c, "db");
    let m = migrate(&c, "db", false);
    c.wait_migration(A, &m.name, MIGRATION_TIMEOUT, |m| {
        m.phase.is_final() || m.phase == MigrationPhase::Running
    });
    let o = c.ctl(A, &["migrate", "db", "--to", B]);
    assert_eq!(o.status.code(), Some(1), "{}", stdout(&o));
    let err = stderr(&o);
    assert!(
        err.contains(&format!("vm db already has migration {}", m.name)),
        "{err}"
    );
    assert!(err.contains("hint: only one migration per VM"), "{err}");
    // Cancelling brings the first one to an end, with the guest still on A.
    let o = c.ctl(A, &["cancel", &m.name]);
    assert!(o.status.success(), "{}", stderr(&o));
    let done = c.wait_migration(A, &m.name, MIGRATION_TIMEOUT, |m| m.phase.is_final());
    assert_eq!(done.phase, MigrationPhase::Failed, "{done:?}");
    assert!(done.abort_requested);
    c.assert_guest_alive(A, "db", GAP);
}

#[test]
fn daemon_restart_keeps_guest_and_it_still_migrates() {
    if !kvm_available_or_skip() {
        return;
    }
    let mut c = Cluster::loopback(|_| {});
    c.create_vm(A, &["app", "--memory", "128Mi", "--dirty-rate", "10"]);
    let before = c.assert_guest_alive(A, "app", GAP);
    let status = c.stop(A);
    assert!(status.success(), "migrated exited with {status}");
    c.restart(A);
    let list = c.block_on(c.client(A).list_vms()).expect("list vms");
    let vm = list
        .iter()
        .find(|v| v.spec.name == "app")
        .expect("app still listed after restart");
    assert_eq!(vm.status.phase, VmPhase::Running, "{vm:?}");
    // Same guest, not a new one: its counters carried on from before.
    let after = c.assert_guest_alive(A, "app", GAP);
    assert!(after.passes + after.pages_written > before.passes + before.pages_written);
    // This time through the CLI, as an operator would: --wait follows the
    // migration to its end and the exit code says how it ended.
    let o = c.ctl(
        A,
        &[
            "-o", "json", "migrate", "app", "--to", B, "--wait", "--verify",
        ],
    );
    assert!(
        o.status.success(),
        "{}\n{}",
        stderr(&o),
        c.node(A).log_tail(30)
    );
    let m: MigrationRecord = serde_json::from_slice(&o.stdout).expect("record json");
    assert_succeeded_and_verified(&c, &m);
    assert_moved(&c, "app");
}

#[test]
fn cli_errors_are_clear_against_real_daemons() {
    if !kvm_available_or_skip() {
        return;
    }
    let c = Cluster::loopback(|_| {});
    let o = c.ctl(A, &["migrate", "ghost", "--to", B, "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("vm ghost not found"), "{}", stderr(&o));
    assert!(stderr(&o).contains("migratectl vm list"), "{}", stderr(&o));
    let o = c.ctl(A, &["vm", "get", "ghost"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("vm ghost not found"), "{}", stderr(&o));
    let o = c.ctl(A, &["vm", "create", "x", "--memory", "1Gi", "--vcpus", "0"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("vcpus 0"), "{}", stderr(&o));
    let o = c.ctl(A, &["migrate", "x", "--to"]);
    assert_eq!(o.status.code(), Some(2));
    let o = c.ctl(A, &["migrate", "ghost", "--to", "node-z"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("not found") || err.contains("node-z"), "{err}");
    let o = c.ctl(A, &["-o", "json", "health"]);
    assert!(o.status.success(), "{}", stderr(&o));
    assert!(
        stdout(&o).contains("\"hostName\": \"node-a\""),
        "{}",
        stdout(&o)
    );
}
