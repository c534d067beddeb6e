//! Migrations between two real QEMUs: pre-copy, cancel, local disks by
//! NBD + mirror, post-copy with pause and recovery, and the connections
//! each migration channel opens (what the daemons will carry over QUIC).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use serde_json::json;

use super::*;

/// Source and target of one migration, both from the same spec.
async fn source_and_target(
    launcher: &QemuLauncher,
    t: &Setup,
    s: &QemuVmSpec,
) -> (Guard, Guard, String) {
    let source = Guard(
        within(launcher.launch(s, &t.vm_dir("src"), LaunchMode::Start { paused: true }))
            .await
            .unwrap(),
    );
    let target_paths = t.vm_dir("dst");
    let target = Guard(
        within(launcher.launch(s, &target_paths, LaunchMode::Incoming))
            .await
            .unwrap(),
    );
    assert_eq!(target.status().await.unwrap().status, RunState::InMigrate);
    let uri = unix_uri(&target_paths.socket("migrate.sock")).unwrap();
    (source, target, uri)
}

fn events_on() -> [CapabilityState; 1] {
    [CapabilityState {
        capability: MigrationCapability::Events,
        state: true,
    }]
}

#[tokio::test]
async fn a_paused_guest_migrates_over_a_unix_socket() {
    let Some(launcher) = launcher_or_skip("a_paused_guest_migrates_over_a_unix_socket") else {
        return;
    };
    let t = Setup::new();
    // One image for both, as on shared storage: the target opens it
    // inactive until the switchover, so QEMU's image locks allow it.
    let s = spec("vm1", &t.image("disk.raw", 0), true);
    let (source, target, uri) = source_and_target(&launcher, &t, &s).await;

    target
        .qmp
        .migrate_set_capabilities(&events_on())
        .await
        .unwrap();
    let mut target_events = target.qmp.subscribe();
    target.qmp.migrate_incoming(&uri).await.unwrap();

    source
        .qmp
        .migrate_set_capabilities(&events_on())
        .await
        .unwrap();
    let mut source_events = source.qmp.subscribe();
    source.qmp.migrate(&uri).await.unwrap();
    wait_migration(&mut source_events, "completed").await;
    wait_migration(&mut target_events, "completed").await;

    let info = source.qmp.query_migrate().await.unwrap();
    eprintln!("source after migration: {info:?}");
    assert_eq!(info.status, MigrationStatus::Completed);
    assert!(
        info.total_time.is_some() && info.downtime.is_some(),
        "{info:?}"
    );
    assert!(info.error_desc.is_none());
    let ram = info.ram.expect("ram stats");
    assert!(ram.total >= 64 << 20, "{ram:?}");
    assert!(ram.transferred > 0 && ram.remaining == 0, "{ram:?}");
    // An untouched guest is almost all zero pages.
    assert!(ram.duplicate > ram.normal, "{ram:?}");
    assert!(ram.dirty_sync_count >= 1, "{ram:?}");
    assert_eq!(ram.page_size, 4096);

    // QEMU announces `completed` from its migration thread and switches the
    // run state to postmigrate a moment later on its main loop.
    let after = source.status().await.unwrap();
    assert!(
        !after.running
            && matches!(
                after.status,
                RunState::PostMigrate | RunState::FinishMigrate
            ),
        "{after:?}"
    );
    assert_eq!(
        target.qmp.query_migrate().await.unwrap().status,
        MigrationStatus::Completed
    );
    // -S on the target: it waits for the daemon's word to run.
    let target_status = target.status().await.unwrap();
    assert!(!target_status.running, "{target_status:?}");
    assert_ne!(target_status.status, RunState::InMigrate);
    let mut resumed = target.qmp.subscribe();
    target.qmp.cont().await.unwrap();
    wait_event(&mut resumed, "RESUME", |_| true).await;
    assert_eq!(target.status().await.unwrap().status, RunState::Running);

    within(launcher.stop(&target)).await.unwrap();
    within(launcher.stop(&source)).await.unwrap();
}

#[tokio::test]
async fn a_throttled_migration_can_be_cancelled_and_the_source_stays() {
    let Some(launcher) =
        launcher_or_skip("a_throttled_migration_can_be_cancelled_and_the_source_stays")
    else {
        return;
    };
    let t = Setup::new();
    let s = spec("vm1", &t.image("disk.raw", 0), true);
    let (source, target, uri) = source_and_target(&launcher, &t, &s).await;
    target.qmp.migrate_incoming(&uri).await.unwrap();
    source
        .qmp
        .migrate_set_capabilities(&events_on())
        .await
        .unwrap();
    // 4 KiB/s: hundreds of KB to send, so it is still going when cancelled.
    source
        .qmp
        .migrate_set_parameters(&MigrationParameters {
            max_bandwidth: Some(4096),
            ..MigrationParameters::default()
        })
        .await
        .unwrap();
    let mut events = source.qmp.subscribe();
    source.qmp.migrate(&uri).await.unwrap();
    wait_migration(&mut events, "active").await;
    let info = source.qmp.query_migrate().await.unwrap();
    assert_eq!(info.status, MigrationStatus::Active, "{info:?}");
    assert!(
        info.ram.is_some() && info.expected_downtime.is_some(),
        "{info:?}"
    );

    source.qmp.migrate_cancel().await.unwrap();
    wait_migration(&mut events, "cancelled").await;
    assert_eq!(
        source.qmp.query_migrate().await.unwrap().status,
        MigrationStatus::Cancelled
    );
    // The source keeps the guest, in the state it had.
    assert_eq!(source.status().await.unwrap().status, RunState::Prelaunch);
    // The target saw its stream break and gives up (QEMU exits).
    within(target.qmp.closed()).await;
    assert!(target.wait_exit(HANG_GUARD).await, "target still runs");
    // migrate-pause only applies to post-copy: a typed refusal.
    let err = source.qmp.migrate_pause().await.unwrap_err();
    assert!(matches!(err, QmpError::Command { .. }), "{err:?}");
    within(launcher.stop(&source)).await.unwrap();
}

#[tokio::test]
async fn a_local_disk_moves_by_nbd_mirror_before_the_memory() {
    let Some(launcher) = launcher_or_skip("a_local_disk_moves_by_nbd_mirror_before_the_memory")
    else {
        return;
    };
    let t = Setup::new();
    // Two images, as on two hosts: the source's holds data, the target's
    // is blank and must end up equal.
    let src_image = t.image("src.raw", 0xa5);
    let dst_image = t.image("dst.raw", 0);
    let src_spec = spec("vm1", &src_image, false);
    let dst_spec = spec("vm1", &dst_image, false);
    let source = Guard(
        within(launcher.launch(
            &src_spec,
            &t.vm_dir("src"),
            LaunchMode::Start { paused: true },
        ))
        .await
        .unwrap(),
    );
    let dst_paths = t.vm_dir("dst");
    let target = Guard(
        within(launcher.launch(&dst_spec, &dst_paths, LaunchMode::Incoming))
            .await
            .unwrap(),
    );
    // Target: export its disk over NBD on a unix socket.
    let nbd = dst_paths.socket("nbd.sock");
    target.qmp.nbd_server_start_unix(&nbd).await.unwrap();
    target
        .qmp
        .block_export_add_nbd("export-disk0", "disk0", "disk0", true)
        .await
        .unwrap();
    // Source: an NBD client node, and a mirror of disk0 onto it.
    source
        .qmp
        .blockdev_add(&json!({"driver": "nbd", "node-name": "mirror-disk0",
            "server": {"type": "unix", "path": nbd}, "export": "disk0"}))
        .await
        .unwrap();
    let mut events = source.qmp.subscribe();
    source
        .qmp
        .blockdev_mirror("mirror-disk0", "disk0", "mirror-disk0")
        .await
        .unwrap();
    wait_event(&mut events, "BLOCK_JOB_READY", |d| {
        d["device"] == "mirror-disk0"
    })
    .await;
    let jobs = source.qmp.query_block_jobs().await.unwrap();
    assert_eq!(jobs.len(), 1, "{jobs:?}");
    assert!(jobs[0].ready && jobs[0].kind == "mirror", "{jobs:?}");
    assert_eq!(jobs[0].offset, jobs[0].len);

    // Memory next, while the mirror keeps the copy in sync.
    target
        .qmp
        .migrate_set_capabilities(&events_on())
        .await
        .unwrap();
    let mut target_events = target.qmp.subscribe();
    let uri = unix_uri(&dst_paths.socket("migrate.sock")).unwrap();
    target.qmp.migrate_incoming(&uri).await.unwrap();
    source
        .qmp
        .migrate_set_capabilities(&events_on())
        .await
        .unwrap();
    source.qmp.migrate(&uri).await.unwrap();
    wait_migration(&mut events, "completed").await;
    wait_migration(&mut target_events, "completed").await;
    // Cancelling a ready mirror ends it cleanly (the copy stays complete).
    source.qmp.block_job_cancel("mirror-disk0").await.unwrap();
    wait_event(&mut events, "BLOCK_JOB_COMPLETED", |d| {
        d["device"] == "mirror-disk0"
    })
    .await;
    target.qmp.nbd_server_stop().await.unwrap();

    within(launcher.stop(&target)).await.unwrap();
    within(launcher.stop(&source)).await.unwrap();
    assert_eq!(
        std::fs::read(&dst_image).unwrap(),
        std::fs::read(&src_image).unwrap(),
        "target image differs from the source's"
    );
}

#[tokio::test]
async fn post_copy_survives_a_pause_and_recovers_on_a_new_socket() {
    let Some(launcher) =
        launcher_or_skip("post_copy_survives_a_pause_and_recovers_on_a_new_socket")
    else {
        return;
    };
    let t = Setup::new();
    let s = spec("vm1", &t.image("disk.raw", 0), true);
    let (source, target, uri) = source_and_target(&launcher, &t, &s).await;
    let caps = [
        MigrationCapability::Events,
        MigrationCapability::PostcopyRam,
    ]
    .map(|capability| CapabilityState {
        capability,
        state: true,
    });
    target.qmp.migrate_set_capabilities(&caps).await.unwrap();
    source.qmp.migrate_set_capabilities(&caps).await.unwrap();
    // Slow in both phases, so each state lasts until the test moves on.
    let slow = MigrationParameters {
        max_bandwidth: Some(4096),
        max_postcopy_bandwidth: Some(4096),
        ..MigrationParameters::default()
    };
    source.qmp.migrate_set_parameters(&slow).await.unwrap();
    let mut source_events = source.qmp.subscribe();
    let mut target_events = target.qmp.subscribe();
    target.qmp.migrate_incoming(&uri).await.unwrap();
    source.qmp.migrate(&uri).await.unwrap();
    wait_migration(&mut source_events, "active").await;

    source.qmp.migrate_start_postcopy().await.unwrap();
    wait_migration(&mut source_events, "postcopy-active").await;
    wait_migration(&mut target_events, "postcopy-active").await;
    // The guest now lives on the target, and -S keeps it from running.
    // (QEMU reports postcopy-active a moment before it leaves inmigrate.)
    let moved = target.status().await.unwrap();
    assert!(
        !moved.running && matches!(moved.status, RunState::Paused | RunState::InMigrate),
        "{moved:?}"
    );

    // The channel breaks (as a lost peer would): both sides hold on.
    source.qmp.migrate_pause().await.unwrap();
    wait_migration(&mut source_events, "postcopy-paused").await;
    wait_migration(&mut target_events, "postcopy-paused").await;
    assert_eq!(
        source.qmp.query_migrate().await.unwrap().status,
        MigrationStatus::PostcopyPaused
    );

    // A new channel: the target listens, the source resumes onto it.
    let again = unix_uri(&t.vm_dir("dst").socket("recover.sock")).unwrap();
    target.qmp.migrate_recover(&again).await.unwrap();
    source.qmp.migrate_resume(&again).await.unwrap();
    wait_migration(&mut source_events, "postcopy-active").await;
    source
        .qmp
        .migrate_set_parameters(&MigrationParameters {
            max_postcopy_bandwidth: Some(0),
            ..MigrationParameters::default()
        })
        .await
        .unwrap();
    wait_migration(&mut source_events, "completed").await;
    wait_migration(&mut target_events, "completed").await;
    let info = source.qmp.query_migrate().await.unwrap();
    assert_eq!(info.status, MigrationStatus::Completed);
    assert_eq!(info.ram.map(|r| r.remaining), Some(0));
    let after = source.status().await.unwrap();
    assert!(
        !after.running
            && matches!(
                after.status,
                RunState::PostMigrate | RunState::FinishMigrate
            ),
        "{after:?}"
    );

    within(launcher.stop(&target)).await.unwrap();
    within(launcher.stop(&source)).await.unwrap();
}

/// Stands where the daemons will: accepts each connection the source QEMU
/// opens on `listen` and carries it to the target QEMU's `target` socket.
/// Returns the number of connections seen so far.
fn proxy(listen: &Path, target: PathBuf) -> Arc<AtomicUsize> {
    let listener = tokio::net::UnixListener::bind(listen).unwrap();
    let seen = Arc::new(AtomicUsize::new(0));
    let count = Arc::clone(&seen);
    tokio::spawn(async move {
        while let Ok((mut from, _)) = listener.accept().await {
            count.fetch_add(1, Ordering::SeqCst);
            let target = target.clone();
            tokio::spawn(async move {
                let mut to = tokio::net::UnixStream::connect(&target).await.unwrap();
                let _ = tokio::io::copy_bidirectional(&mut from, &mut to).await;
            });
        }
    });
    seen
}

#[tokio::test]
async fn every_migration_channel_is_its_own_connection() {
    let Some(launcher) = launcher_or_skip("every_migration_channel_is_its_own_connection") else {
        return;
    };
    let t = Setup::new();
    let s = spec("vm1", &t.image("disk.raw", 0), true);

    // Multifd: the main channel plus one per multifd channel.
    let (source, target, target_uri) = source_and_target(&launcher, &t, &s).await;
    let caps = [MigrationCapability::Events, MigrationCapability::Multifd].map(|capability| {
        CapabilityState {
            capability,
            state: true,
        }
    });
    let params = MigrationParameters {
        multifd_channels: Some(3),
        ..MigrationParameters::default()
    };
    for side in [&source, &target] {
        side.qmp.migrate_set_capabilities(&caps).await.unwrap();
        side.qmp.migrate_set_parameters(&params).await.unwrap();
    }
    let mut events = source.qmp.subscribe();
    target.qmp.migrate_incoming(&target_uri).await.unwrap();
    let relay = t.vm_dir("src").socket("relay.sock");
    let target_socket = PathBuf::from(target_uri.strip_prefix("unix:").unwrap());
    let seen = proxy(&relay, target_socket);
    source
        .qmp
        .migrate(&unix_uri(&relay).unwrap())
        .await
        .unwrap();
    wait_migration(&mut events, "completed").await;
    let info = source.qmp.query_migrate().await.unwrap();
    assert!(info.ram.unwrap().multifd_bytes > 0);
    assert_eq!(seen.load(Ordering::SeqCst), 1 + 3, "main + 3 multifd");
    within(launcher.stop(&target)).await.unwrap();
    within(launcher.stop(&source)).await.unwrap();
}

#[tokio::test]
async fn post_copy_preempt_adds_one_connection() {
    let Some(launcher) = launcher_or_skip("post_copy_preempt_adds_one_connection") else {
        return;
    };
    let t = Setup::new();
    let s = spec("vm1", &t.image("disk.raw", 0), true);
    let (source, target, target_uri) = source_and_target(&launcher, &t, &s).await;
    let caps = [
        MigrationCapability::Events,
        MigrationCapability::PostcopyRam,
        MigrationCapability::PostcopyPreempt,
    ]
    .map(|capability| CapabilityState {
        capability,
        state: true,
    });
    for side in [&source, &target] {
        side.qmp.migrate_set_capabilities(&caps).await.unwrap();
    }
    source
        .qmp
        .migrate_set_parameters(&MigrationParameters {
            max_bandwidth: Some(4096),
            ..MigrationParameters::default()
        })
        .await
        .unwrap();
    let mut events = source.qmp.subscribe();
    target.qmp.migrate_incoming(&target_uri).await.unwrap();
    let relay = t.vm_dir("src").socket("relay.sock");
    let seen = proxy(
        &relay,
        PathBuf::from(target_uri.strip_prefix("unix:").unwrap()),
    );
    source
        .qmp
        .migrate(&unix_uri(&relay).unwrap())
        .await
        .unwrap();
    wait_migration(&mut events, "active").await;
    source.qmp.migrate_start_postcopy().await.unwrap();
    wait_migration(&mut events, "completed").await;
    assert_eq!(seen.load(Ordering::SeqCst), 2, "main + preempt");
    within(launcher.stop(&target)).await.unwrap();
    within(launcher.stop(&source)).await.unwrap();
}
