//! Tests against a real `qemu-system-x86_64` with KVM. Guests start paused
//! (`-S`): firmware is 16-bit code, emulated slowly on nested KVM, and
//! nothing here needs the guest to run. Without QEMU or KVM each test
//! prints why and passes, unless `MIGRATED_REQUIRE_QEMU=1` /
//! `MIGRATED_REQUIRE_KVM=1` make that a failure.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::json;
use tokio::sync::broadcast;

use super::args::{LaunchMode, QemuPaths};
use super::commands::{
    unix_uri, CapabilityState, CpuModelExpansionType, CpuModelInfo, CpuModelSupport,
    MigrationCapability, MigrationParameters, MigrationStatus, RunState,
};
use super::process::{pidfile_owner, AttachError, LaunchError, QemuLauncher, QemuProcess};
use super::qmp::{QmpError, QmpEvent, QmpOptions};
use super::spec::QemuVmSpec;

mod migration;

const REQUIRE_QEMU_ENV: &str = "MIGRATED_REQUIRE_QEMU";
/// Overrides the QEMU binary for these tests.
const QEMU_BINARY_ENV: &str = "MIGRATED_QEMU_BINARY";
/// Guards waits against a hang; never an expectation of speed.
const HANG_GUARD: Duration = Duration::from_secs(120);

/// A launcher if QEMU and KVM are usable; None (after saying why) if not
/// and not required.
fn launcher_or_skip(test: &str) -> Option<QemuLauncher> {
    if !vmm::kvm_check::kvm_available_or_skip() {
        return None;
    }
    let binary = std::env::var_os(QEMU_BINARY_ENV)
        .map(PathBuf::from)
        .unwrap_or_else(|| "qemu-system-x86_64".into());
    let found = std::process::Command::new(&binary)
        .arg("--version")
        .output()
        .map(|o| o.status.success());
    if !matches!(found, Ok(true)) {
        let why = format!("{} is not runnable ({found:?})", binary.display());
        if std::env::var(REQUIRE_QEMU_ENV).as_deref() == Ok("1") {
            panic!("{test}: {why} and {REQUIRE_QEMU_ENV}=1");
        }
        eprintln!("SKIPPED {test}: {why}; set {REQUIRE_QEMU_ENV}=1 to fail instead");
        return None;
    }
    Some(QemuLauncher {
        binary,
        ..QemuLauncher::default()
    })
}

/// Kills its QEMU when dropped, so a failing test leaves nothing behind.
struct Guard(QemuProcess);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
    }
}

impl std::ops::Deref for Guard {
    type Target = QemuProcess;
    fn deref(&self) -> &QemuProcess {
        &self.0
    }
}

/// A state directory (with a comma, to exercise QEMU's option escaping)
/// and a 1 MiB raw disk image to boot from.
struct Setup {
    _tmp: tempfile::TempDir,
    root: PathBuf,
}

impl Setup {
    fn new() -> Self {
        let tmp = tempfile::Builder::new().prefix("qemu,t").tempdir().unwrap();
        let root = tmp.path().to_owned();
        Self { _tmp: tmp, root }
    }

    fn image(&self, name: &str, fill: u8) -> PathBuf {
        let path = self.root.join(name);
        std::fs::write(&path, vec![fill; 1 << 20]).unwrap();
        path
    }

    fn vm_dir(&self, name: &str) -> QemuPaths {
        let dir = self.root.join(name);
        std::fs::create_dir_all(&dir).unwrap();
        QemuPaths::in_dir(&dir)
    }
}

fn spec(name: &str, disk: &Path, shared: bool) -> QemuVmSpec {
    let s: QemuVmSpec = serde_json::from_value(json!({
        "name": name, "memory": "64Mi",
        "disks": [{"path": disk, "shared": shared}],
    }))
    .unwrap();
    s.validate().unwrap();
    s
}

async fn within<T>(f: impl std::future::Future<Output = T>) -> T {
    tokio::time::timeout(HANG_GUARD, f).await.expect("hung")
}

/// The next event named `name` whose data matches `pred`.
async fn wait_event(
    rx: &mut broadcast::Receiver<QmpEvent>,
    name: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> QmpEvent {
    within(async {
        loop {
            let e = rx.recv().await.expect("event stream ended");
            if e.event == name && pred(&e.data) {
                return e;
            }
        }
    })
    .await
}

async fn wait_migration(rx: &mut broadcast::Receiver<QmpEvent>, status: &str) -> QmpEvent {
    wait_event(rx, "MIGRATION", |d| d["status"] == status).await
}

/// The session id of a process, from /proc/<pid>/stat.
fn session_of(pid: i32) -> i32 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command's closing parenthesis: state ppid pgrp session.
    let rest = &stat[stat.rfind(')').unwrap() + 2..];
    rest.split(' ').nth(3).unwrap().parse().unwrap()
}

#[tokio::test]
async fn a_paused_start_runs_and_stops_with_events() {
    let Some(launcher) = launcher_or_skip("a_paused_start_runs_and_stops_with_events") else {
        return;
    };
    let t = Setup::new();
    let paths = t.vm_dir("vm");
    let vm = Guard(
        within(launcher.launch(
            &spec("vm1", &t.image("disk.raw", 0), false),
            &paths,
            LaunchMode::Start { paused: true },
        ))
        .await
        .unwrap(),
    );
    let greeting = vm.qmp.greeting();
    eprintln!("qemu {:?} ({})", greeting.version, greeting.package);
    // Its own session: not the test's (the daemon's) process group/session.
    assert_ne!(session_of(vm.pid()), session_of(std::process::id() as i32));
    assert_eq!(pidfile_owner(&paths.pidfile).unwrap(), Some(vm.pid()));
    assert!(paths.serial_log.exists());
    assert!(!vm.has_exited());

    let status = vm.status().await.unwrap();
    assert_eq!(
        (status.status, status.running),
        (RunState::Prelaunch, false)
    );
    let mut events = vm.qmp.subscribe();
    vm.qmp.cont().await.unwrap();
    wait_event(&mut events, "RESUME", |_| true).await;
    assert_eq!(vm.status().await.unwrap().status, RunState::Running);
    vm.qmp.stop().await.unwrap();
    wait_event(&mut events, "STOP", |_| true).await;
    let status = vm.status().await.unwrap();
    assert_eq!((status.status, status.running), (RunState::Paused, false));

    let hmp = vm.qmp.human_monitor_command("info status").await.unwrap();
    assert!(hmp.contains("paused"), "{hmp}");
    let err = vm.qmp.execute("no-such-command", None).await.unwrap_err();
    assert_eq!(err.class(), Some("CommandNotFound"), "{err:?}");

    within(launcher.stop(&vm)).await.unwrap();
    assert!(vm.has_exited());
    wait_event(&mut events, "SHUTDOWN", |d| d["guest"] == false).await;
    // QEMU removes its pidfile on a clean exit.
    assert_eq!(pidfile_owner(&paths.pidfile).unwrap(), None);
}

#[tokio::test]
async fn migration_capabilities_parameters_and_machine_type() {
    let Some(launcher) = launcher_or_skip("migration_capabilities_parameters_and_machine_type")
    else {
        return;
    };
    let t = Setup::new();
    let vm = Guard(
        within(launcher.launch(
            &spec("vm1", &t.image("disk.raw", 0), false),
            &t.vm_dir("vm"),
            LaunchMode::Start { paused: true },
        ))
        .await
        .unwrap(),
    );
    let caps = vm.qmp.query_migrate_capabilities().await.unwrap();
    let names: Vec<&str> = caps.iter().map(|c| c.capability.as_str()).collect();
    eprintln!("migration capabilities: {}", names.join(" "));
    for want in [
        "events",
        "multifd",
        "postcopy-ram",
        "auto-converge",
        "return-path",
        "pause-before-switchover",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    assert!(
        caps.iter().all(|c| !c.state),
        "all off by default: {caps:?}"
    );
    // Every capability of this QEMU is one we know by name.
    assert!(
        caps.iter()
            .all(|c| !matches!(c.capability, MigrationCapability::Other(_))),
        "{caps:?}"
    );

    let on = |capability| CapabilityState {
        capability,
        state: true,
    };
    vm.qmp
        .migrate_set_capabilities(&[
            on(MigrationCapability::Events),
            on(MigrationCapability::Multifd),
        ])
        .await
        .unwrap();
    let caps = vm.qmp.query_migrate_capabilities().await.unwrap();
    let state = |name: &str| {
        caps.iter()
            .find(|c| c.capability.as_str() == name)
            .unwrap()
            .state
    };
    assert!(state("events") && state("multifd") && !state("xbzrle"));

    let defaults = vm.qmp.query_migrate_parameters().await.unwrap();
    eprintln!("default migration parameters: {defaults:?}");
    let set = MigrationParameters {
        max_bandwidth: Some(64 << 20),
        downtime_limit: Some(500),
        multifd_channels: Some(4),
        cpu_throttle_initial: Some(30),
        cpu_throttle_increment: Some(5),
        ..MigrationParameters::default()
    };
    vm.qmp.migrate_set_parameters(&set).await.unwrap();
    let now = vm.qmp.query_migrate_parameters().await.unwrap();
    assert_eq!(now.max_bandwidth, Some(64 << 20));
    assert_eq!(now.downtime_limit, Some(500));
    assert_eq!(now.multifd_channels, Some(4));
    assert_eq!(now.cpu_throttle_initial, Some(30));
    assert_eq!(now.cpu_throttle_increment, Some(5));
    assert_eq!(now.max_cpu_throttle, defaults.max_cpu_throttle, "untouched");
    let bad = MigrationParameters {
        cpu_throttle_initial: Some(0),
        ..MigrationParameters::default()
    };
    let err = vm.qmp.migrate_set_parameters(&bad).await.unwrap_err();
    assert!(matches!(err, QmpError::Command { .. }), "{err:?}");

    let info = vm.qmp.query_migrate().await.unwrap();
    assert_eq!(info.status, MigrationStatus::None);
    assert!(
        info.blocked_reasons.is_empty(),
        "{:?}",
        info.blocked_reasons
    );

    let machine = vm.qmp.resolve_machine("q35").await.unwrap().unwrap();
    eprintln!("q35 is {machine}");
    assert!(machine.starts_with("pc-q35-"), "{machine}");
    assert_eq!(
        vm.qmp.resolve_machine(&machine).await.unwrap(),
        Some(machine)
    );
    assert_eq!(
        vm.qmp.resolve_machine("no-such-machine").await.unwrap(),
        None
    );
}

/// Named models with a feature that only some hosts have; the test uses
/// the first whose feature this host lacks.
const MODEL_FEATURES: &[(&str, &str)] = &[
    ("Skylake-Server", "avx512f"),
    ("Icelake-Server", "avx512vbmi2"),
    ("SapphireRapids", "amx-tile"),
    ("Opteron_G5", "xop"),
    ("EPYC", "sse4a"),
];

#[tokio::test]
async fn cpu_models_are_checked_against_the_host() {
    let Some(launcher) = launcher_or_skip("cpu_models_are_checked_against_the_host") else {
        return;
    };
    let t = Setup::new();
    let vm = Guard(
        within(launcher.launch(
            &spec("vm1", &t.image("disk.raw", 0), false),
            &t.vm_dir("vm"),
            LaunchMode::Start { paused: true },
        ))
        .await
        .unwrap(),
    );
    assert_eq!(
        vm.qmp.cpu_model_support("host").await.unwrap(),
        CpuModelSupport::Runnable
    );
    assert_eq!(
        vm.qmp.cpu_model_support("NoSuchModel").await.unwrap(),
        CpuModelSupport::Unknown
    );
    let host = vm
        .qmp
        .query_cpu_model_expansion(
            CpuModelExpansionType::Full,
            &CpuModelInfo {
                name: "host".into(),
                ..CpuModelInfo::default()
            },
        )
        .await
        .unwrap();
    assert!(host.enabled_features().count() > 0, "{host:?}");
    let lacking = MODEL_FEATURES
        .iter()
        .find(|(_, f)| host.feature(f) == Some(false));
    let Some(&(model, feature)) = lacking else {
        eprintln!("this host has every feature of {MODEL_FEATURES:?}; nothing to refuse");
        return;
    };
    // The named model does want the feature...
    let expanded = vm
        .qmp
        .query_cpu_model_expansion(
            CpuModelExpansionType::Static,
            &CpuModelInfo {
                name: model.into(),
                ..CpuModelInfo::default()
            },
        )
        .await
        .unwrap();
    assert_eq!(
        expanded.feature(feature),
        Some(true),
        "{model} without {feature}?"
    );
    // ...so it is not runnable here, and QEMU names the feature.
    match vm.qmp.cpu_model_support(model).await.unwrap() {
        CpuModelSupport::Unavailable { features } => {
            eprintln!(
                "{model} is not runnable here; missing: {}",
                features.join(" ")
            );
            assert!(features.iter().any(|f| f == feature), "{features:?}");
        }
        other => panic!("{model} lacks {feature} here but is {other:?}"),
    }
}

#[tokio::test]
async fn reattach_after_the_client_is_dropped_and_refuse_a_second_start() {
    let Some(launcher) =
        launcher_or_skip("reattach_after_the_client_is_dropped_and_refuse_a_second_start")
    else {
        return;
    };
    let t = Setup::new();
    let paths = t.vm_dir("vm");
    let s = spec("vm1", &t.image("disk.raw", 0), false);
    let first = within(launcher.launch(&s, &paths, LaunchMode::Start { paused: true }))
        .await
        .unwrap();
    let pid = first.pid();
    // As a daemon restart: the handle goes, QEMU stays.
    drop(first);
    let vm = Guard(within(launcher.attach(&paths)).await.unwrap());
    assert_eq!(vm.pid(), pid);
    assert!(!vm.has_exited());
    assert_eq!(vm.status().await.unwrap().status, RunState::Prelaunch);

    // The monitor serves one client; a second waits without a greeting.
    let quick = QemuLauncher {
        qmp: QmpOptions {
            greeting_timeout: Duration::from_millis(300),
            ..QmpOptions::default()
        },
        ..launcher.clone()
    };
    match within(quick.attach(&paths)).await {
        Err(AttachError::Qmp {
            source: QmpError::GreetingTimeout { .. },
            ..
        }) => {}
        other => panic!("{other:?}"),
    }
    match within(launcher.launch(&s, &paths, LaunchMode::Start { paused: true })).await {
        Err(LaunchError::AlreadyRunning { pid: p, .. }) => assert_eq!(p, pid),
        other => panic!("{other:?}"),
    }
    assert_eq!(vm.status().await.unwrap().status, RunState::Prelaunch);

    within(launcher.stop(&vm)).await.unwrap();
    match within(launcher.attach(&paths)).await {
        Err(AttachError::NotRunning { .. }) => {}
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn stop_kills_a_qemu_that_does_not_answer() {
    let Some(launcher) = launcher_or_skip("stop_kills_a_qemu_that_does_not_answer") else {
        return;
    };
    let launcher = QemuLauncher {
        qmp: QmpOptions {
            call_timeout: Duration::from_millis(500),
            ..QmpOptions::default()
        },
        exit_timeout: Duration::from_secs(5),
        ..launcher
    };
    let t = Setup::new();
    let vm = Guard(
        within(launcher.launch(
            &spec("vm1", &t.image("disk.raw", 0), false),
            &t.vm_dir("vm"),
            LaunchMode::Start { paused: true },
        ))
        .await
        .unwrap(),
    );
    // A frozen QEMU: quit goes unanswered.
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(vm.pid()),
        nix::sys::signal::Signal::SIGSTOP,
    )
    .unwrap();
    within(launcher.stop(&vm)).await.unwrap();
    assert!(vm.has_exited());
}

#[tokio::test]
async fn qemus_own_setup_errors_come_back_with_its_log() {
    let Some(launcher) = launcher_or_skip("qemus_own_setup_errors_come_back_with_its_log") else {
        return;
    };
    let t = Setup::new();
    let mut s = spec("vm1", &t.image("disk.raw", 0), false);
    s.cpu.model = "NoSuchCpuModel".into();
    match within(launcher.launch(&s, &t.vm_dir("vm"), LaunchMode::Start { paused: true })).await {
        Err(LaunchError::Setup { log_tail, .. }) => {
            assert!(log_tail.contains("NoSuchCpuModel"), "{log_tail}")
        }
        other => panic!("{other:?}"),
    }
    // A file problem is caught before QEMU runs, with the field named.
    s.cpu.model = "host".into();
    s.disks[0].path = t.root.join("missing.raw");
    match within(launcher.launch(&s, &t.vm_dir("vm"), LaunchMode::Start { paused: true })).await {
        Err(LaunchError::Command(e)) => {
            assert!(e.to_string().starts_with("disks[0].path: "), "{e}")
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_guestless_qemu_describes_the_host() {
    let Some(launcher) = launcher_or_skip("a_guestless_qemu_describes_the_host") else {
        return;
    };
    let t = Setup::new();
    let paths = t.vm_dir("probe");
    let probe = within(launcher.probe_host(&paths)).await.unwrap();
    eprintln!(
        "probe: qemu {:?}, {} machine types, {} cpu models, host cpu {} with {} features",
        probe.version,
        probe.machines.len(),
        probe.cpu_models.len(),
        probe.host_cpu.name,
        probe.host_cpu.enabled_features().count()
    );
    assert!(probe.has_capability(&MigrationCapability::PostcopyRam));
    assert!(probe
        .resolve_machine("q35")
        .is_some_and(|m| m.starts_with("pc-q35-")));
    assert_eq!(probe.cpu_model_support("host"), CpuModelSupport::Runnable);
    assert_eq!(
        probe.cpu_model_support("NoSuchModel"),
        CpuModelSupport::Unknown
    );
    // A static expansion is comparable, and the host lacks nothing of itself.
    assert_ne!(probe.host_cpu.name, "host");
    assert!(probe.missing_host_features(&probe.host_cpu).is_empty());
    // The probe QEMU is gone afterwards.
    assert_eq!(pidfile_owner(&paths.pidfile).unwrap(), None);
}
