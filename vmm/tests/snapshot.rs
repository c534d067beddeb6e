//! Snapshot and restore across two `migrate-vmm` processes sharing one
//! memfd: guest memory is bit-identical and the guest carries on counting
//! from where it stopped without seeing corruption.

mod common;

use std::time::Duration;

use common::*;
use guestmem::GuestMemory;
use vmm::control::RunState;
use vmm::kvm_check::kvm_available_or_skip;
use vmm::state::{write_blob, VmState};
use vmm::workload::read_counters;

struct Case {
    memory: &'static str,
    vcpus: u32,
    wss: &'static str,
    rate: &'static str,
    /// Restore through a Restore request (`--wait-state`) instead of
    /// `--state FILE`.
    wait_state: bool,
}

fn roundtrip(case: Case) {
    let dir = scratch();
    let src = Vmm::run(
        dir.path(),
        "src",
        &RunOpts {
            memory: case.memory,
            vcpus: case.vcpus,
            wss: case.wss,
            dirty_rate: case.rate,
            ..Default::default()
        },
    );
    wait_for(
        &src,
        "2 passes on every vCPU",
        Duration::from_secs(120),
        |s| all_passes_at_least(s, 2),
    );

    let mut c = src.client();
    c.pause().expect("pause");
    let paused = c.status().expect("status");
    assert_eq!(paused.run_state, RunState::Paused);
    let saved = paused.counters.clone();
    assert_eq!(saved.len(), case.vcpus as usize);
    assert!(
        saved.iter().all(|v| v.passes >= 2 && v.corrupt == 0),
        "{saved:?}"
    );

    let blob = c.save_state().expect("save state");
    let state = VmState::from_bytes(&blob).expect("saved blob decodes");
    assert_eq!(state.vcpus.len(), case.vcpus as usize);
    assert_eq!(state.workload, paused.guest_layout);
    let layout = state.workload.clone().expect("workload layout in state");

    let (mem_layout, memfd) = c.get_memory().expect("get memory");
    assert_eq!(mem_layout, state.layout);
    let mem = GuestMemory::from_fd(memfd.try_clone().unwrap(), mem_layout).expect("map memfd");
    // Paused: guest RAM is stable, and its counters are what Status said.
    assert_eq!(read_counters(&mem, &layout, case.vcpus), saved);
    let digest_at_pause = mem.digest();

    let state_path = dir.path().join("state.bin");
    write_blob(&state_path, &blob).expect("write state file");
    let file_arg = (!case.wait_state).then_some(state_path.as_path());
    let dst = match Vmm::restore(dir.path(), "dst", &memfd, file_arg) {
        Started::Ready(v) => v,
        Started::Failed { status, stderr, .. } => {
            panic!("restore failed ({status}):\n{stderr}")
        }
    };
    let mut d = dst.client();
    if case.wait_state {
        assert_eq!(d.status().unwrap().run_state, RunState::WaitingForState);
        d.restore(&blob).expect("restore request");
    }
    let restored = d.status().expect("status");
    assert_eq!(restored.run_state, RunState::Paused, "restore stays paused");
    assert_eq!(restored.counters, saved, "restored counters");
    assert_eq!(restored.vcpus, case.vcpus);
    assert_eq!(restored.guest_layout, Some(layout));
    let digest_restored = d.map_memory().expect("map restored memory").digest();
    assert_eq!(
        digest_restored, digest_at_pause,
        "guest memory changed between pause and restore"
    );

    // The source must be gone before the destination runs on the same RAM.
    assert!(src.shutdown().success(), "source exit status");

    d.resume().expect("resume");
    let after = wait_for(
        &dst,
        "3 more passes on every vCPU",
        Duration::from_secs(120),
        |s| {
            s.counters
                .iter()
                .zip(&saved)
                .all(|(now, then)| now.passes >= then.passes + 3)
        },
    );
    for (i, (now, then)) in after.counters.iter().zip(&saved).enumerate() {
        assert!(now.passes > then.passes, "vcpu {i}: {now:?} vs {then:?}");
        assert!(now.pages_written > then.pages_written, "vcpu {i}");
        assert_eq!(now.corrupt, 0, "vcpu {i} saw corruption");
    }
    assert_eq!(after.corrupt_events, 0);
    assert!(after.pass_events >= 3 * u64::from(case.vcpus), "{after:?}");
    let serial = dst.serial();
    assert!(!serial.contains("CORRUPT"), "serial log: {serial}");

    let socket = dst.socket.clone();
    assert!(dst.shutdown().success(), "destination exit status");
    assert!(!socket.exists(), "control socket removed on shutdown");
}

#[test]
fn snapshot_roundtrip_preserves_memory_and_counter() {
    if !kvm_available_or_skip() {
        return;
    }
    roundtrip(Case {
        memory: "1G",
        vcpus: 4,
        wss: "256M",
        rate: "200",
        wait_state: false,
    });
}

#[test]
fn snapshot_roundtrip_one_vcpu_via_restore_request() {
    if !kvm_available_or_skip() {
        return;
    }
    roundtrip(Case {
        memory: "256M",
        vcpus: 1,
        wss: "32M",
        rate: "200",
        wait_state: true,
    });
}
