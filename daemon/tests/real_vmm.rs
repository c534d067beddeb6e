//! A real guest through the real daemon: `migrated` supervises a
//! `migrate-vmm` KVM guest, is killed, restarts, and re-attaches to the
//! guest, which kept running the whole time.
//!
//! Needs /dev/kvm and the `migrate-vmm` binary (build it first with
//! `cargo build -p vmm --bin migrate-vmm`, or set MIGRATE_VMM_BIN). Without
//! them the test is skipped with a message, unless MIGRATED_REQUIRE_KVM=1,
//! which turns a skip into a failure.

use std::path::Path;
use std::process::Child;
use std::time::{Duration, Instant};

use migrated::client::ApiClient;
use migrated::model::{Quantity, VmPhase, VmSpec, WorkloadSpec};

mod common;
use common::{gone, kvm_and_vmm, spawn_migrated, Reaper};

/// A running `migrated`, killed (SIGKILL, like a crash) on drop.
struct DaemonProcess {
    child: Child,
}

impl DaemonProcess {
    /// Starts the daemon and returns once it logged that it is serving.
    fn start(config: &Path) -> Self {
        Self {
            child: spawn_migrated(config, "migrated"),
        }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

impl Drop for DaemonProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits (bounded) until the guest's pass counter exceeds `above`.
async fn passes_above(c: &ApiClient, name: &str, above: u64) -> u64 {
    let deadline = Instant::now() + Duration::from_secs(30);
    let mut tick = tokio::time::interval(Duration::from_millis(100));
    loop {
        tick.tick().await;
        let vm = c.get_vm(name).await.unwrap();
        assert_eq!(vm.status.phase, VmPhase::Running, "{:?}", vm.status);
        let g = vm
            .status
            .guest
            .expect("a running vm reports guest counters");
        assert_eq!(g.corrupt_pages, 0);
        if g.passes > above {
            return g.passes;
        }
        assert!(
            Instant::now() < deadline,
            "guest passes stuck at {} (wanted > {above})",
            g.passes
        );
    }
}

#[tokio::test]
async fn real_guest_survives_daemon_restart() {
    let Some(vmm) = kvm_and_vmm() else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let socket = tmp.path().join("api.sock");
    let config = tmp.path().join("config.toml");
    std::fs::write(
        &config,
        format!(
            "host_name = \"host-a\"\nstate_dir = {:?}\napi_socket = {:?}\nvmm_binary = {:?}\n\n[peers]\nhost-b = \"127.0.0.1:7879\"\n",
            tmp.path().join("state"),
            socket,
            vmm
        ),
    )
    .unwrap();

    let daemon = DaemonProcess::start(&config);
    let c = ApiClient::new(&socket);
    let spec = VmSpec {
        name: "real".into(),
        labels: Default::default(),
        memory: Quantity::mib(64),
        vcpus: 1,
        workload: WorkloadSpec {
            wss: Quantity::mib(4),
            dirty_rate: "64".parse().unwrap(),
            ..WorkloadSpec::default()
        },
    };
    let vm = c.create_vm(&spec).await.unwrap();
    // Kills the guest's VMM if the test ends before deleting the VM.
    let mut guard = Reaper(vm.status.pid.into_iter().collect());
    assert_eq!(vm.status.phase, VmPhase::Running);
    let pid = vm.status.pid.expect("pid of the vmm");
    let p1 = passes_above(&c, "real", 0).await;
    let p2 = passes_above(&c, "real", p1).await;

    // A daemon crash must not take the guest with it.
    daemon.kill();
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "vmm died with the daemon"
    );

    let daemon = DaemonProcess::start(&config);
    let vms = c.list_vms().await.unwrap();
    assert_eq!(vms.len(), 1);
    assert_eq!(vms[0].status.phase, VmPhase::Running, "{:?}", vms[0].status);
    assert_eq!(vms[0].status.pid, Some(pid));
    // The guest kept counting across the restart.
    passes_above(&c, "real", p2).await;

    // Stop waits for the VMM to exit, so a start right after works.
    assert_eq!(
        c.stop_vm("real").await.unwrap().status.phase,
        VmPhase::Stopped
    );
    assert!(gone(pid), "vmm {pid} still running after stop");
    let vm = c.start_vm("real").await.unwrap();
    assert_eq!(vm.status.phase, VmPhase::Running);
    let pid = vm.status.pid.unwrap();
    guard.0 = vec![pid];
    passes_above(&c, "real", 0).await;

    c.delete_vm("real").await.unwrap();
    assert!(gone(pid), "vmm {pid} still running after delete");
    guard.0.clear();
    assert!(c.list_vms().await.unwrap().is_empty());
    drop(daemon);
}
