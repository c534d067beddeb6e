//! `migratectl` as a user runs it: the real binary against a daemon served
//! in-process with the fake VMM backend, checking output and exit codes.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;

use migrated::migration::engine::ResumeError;
use migrated::migration::{MigrationEngine, MigrationHandle};
use migrated::model::{
    AbortStatus, FailureCode, HumanDuration, MigrationConfiguration, MigrationMode,
    MigrationOverrides, MigrationPhase, MigrationRecord, ThrottleStep, Timestamp,
};
use migrated::service::Service;
use migrated::store::Store;
use migrated::testing::{FakeBackend, HoldingEngine, UnavailableEngine};

/// A daemon serving on a socket in a temp dir until dropped.
struct TestDaemon {
    socket: PathBuf,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
    _tmp: tempfile::TempDir,
}

impl TestDaemon {
    fn start(engine: Arc<dyn MigrationEngine>) -> Self {
        let tmp = tempfile::tempdir().unwrap();
        let store = Store::open(tmp.path().join("state")).unwrap();
        let peers = BTreeMap::from([("host-b".to_string(), "127.0.0.1:7879".to_string())]);
        let (svc, _) = Service::open(
            "host-a".into(),
            peers,
            store,
            Arc::new(FakeBackend::default()),
            engine,
        )
        .unwrap();
        let socket = tmp.path().join("api.sock");
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .enable_all()
            .build()
            .unwrap();
        // Bound before this returns: clients connecting from now on queue
        // in the backlog until the server task accepts them.
        let listener = {
            let _guard = rt.enter();
            migrated::api::bind_socket(&socket, 0o600).unwrap()
        };
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::spawn(move || {
            rt.block_on(migrated::api::serve(listener, Arc::new(svc), async {
                let _ = rx.await;
            }))
            .unwrap();
        });
        Self {
            socket,
            stop: Some(tx),
            thread: Some(thread),
            _tmp: tmp,
        }
    }

    fn ctl(&self, args: &[&str]) -> Output {
        ctl_at(&self.socket, args)
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let _ = self.stop.take().unwrap().send(());
        let _ = self.thread.take().unwrap().join();
    }
}

fn ctl_at(socket: &Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_migratectl"))
        .arg("--socket")
        .arg(socket)
        .args(args)
        .env_remove("MIGRATED_SOCKET")
        .output()
        .unwrap()
}

/// The value of a `Key:   value` line of `describe` output.
fn field(text: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}:");
    text.lines().find_map(|l| {
        l.trim_start()
            .strip_prefix(prefix.as_str())
            .map(|v| v.trim().to_string())
    })
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[test]
fn bad_arguments_exit_2_with_clap_messages() {
    let sock = Path::new("/nonexistent/api.sock");
    let o = ctl_at(sock, &["vm", "create"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("NAME"), "{}", stderr(&o));
    let o = ctl_at(sock, &["vm", "create", "a", "--memory", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(
        stderr(&o).contains("lots") && stderr(&o).contains("64Mi"),
        "{}",
        stderr(&o)
    );
    let o = ctl_at(sock, &["--output", "xml", "vm", "list"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("xml"));
    let o = ctl_at(
        sock,
        &[
            "vm",
            "create",
            "a",
            "--memory",
            "1Gi",
            "--dirty-rate",
            "fast",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("max"), "{}", stderr(&o));
    let o = ctl_at(sock, &["migrate", "a"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("--to"));
}

#[test]
fn socket_comes_from_migrated_socket_env() {
    let d = TestDaemon::start(Arc::new(UnavailableEngine));
    let o = Command::new(env!("CARGO_BIN_EXE_migratectl"))
        .args(["-o", "json", "health"])
        .env("MIGRATED_SOCKET", &d.socket)
        .output()
        .unwrap();
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let h: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(h["hostName"], "host-a");
}

#[test]
fn no_daemon_says_how_to_start_it() {
    let tmp = tempfile::tempdir().unwrap();
    let o = ctl_at(&tmp.path().join("none.sock"), &["vm", "list"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("cannot connect to migrated"), "{err}");
    assert!(err.contains("is migrated running?"), "{err}");
}

#[test]
fn unknown_vm_is_a_clear_error() {
    let d = TestDaemon::start(Arc::new(UnavailableEngine));
    for args in [
        &["vm", "get", "nope"][..],
        &["vm", "delete", "nope"],
        &["migrate", "nope", "--to", "host-b"],
    ] {
        let o = d.ctl(args);
        assert_eq!(o.status.code(), Some(1), "{args:?}");
        let err = stderr(&o);
        assert!(err.contains("error: vm nope not found"), "{args:?}: {err}");
        assert!(
            err.contains("hint: list VMs with `migratectl vm list`"),
            "{err}"
        );
        assert!(stdout(&o).is_empty());
    }
    let o = d.ctl(&["describe", "migration", "nope-12345"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("migration nope-12345 not found"));
}

#[test]
fn vm_commands_and_output_formats() {
    let d = TestDaemon::start(Arc::new(UnavailableEngine));
    let o = d.ctl(&[
        "vm",
        "create",
        "web",
        "--memory",
        "256Mi",
        "--vcpus",
        "2",
        "--label",
        "app=web",
        "--dirty-rate",
        "max",
    ]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("Running"));

    let o = d.ctl(&["vm", "list"]);
    assert_eq!(o.status.code(), Some(0));
    let out = stdout(&o);
    assert!(out.starts_with("NAME"), "{out}");
    let row = out
        .lines()
        .find(|l| l.starts_with("web "))
        .expect("a row for web");
    for col in ["Running", "256Mi", "max", "True", "host-a"] {
        assert!(row.contains(col), "{col} missing in {row}");
    }

    let o = d.ctl(&["-o", "json", "vm", "get", "web"]);
    assert_eq!(o.status.code(), Some(0));
    let v: serde_json::Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(v["spec"]["memory"], "256Mi");
    assert_eq!(v["spec"]["labels"]["app"], "web");
    assert_eq!(v["status"]["phase"], "Running");
    assert_eq!(v["status"]["migrationMethod"], "LiveMigration");
    assert_eq!(v["status"]["conditions"][0]["type"], "LiveMigratable");

    let o = d.ctl(&["vm", "get", "web", "--output", "yaml"]);
    assert_eq!(o.status.code(), Some(0));
    let y = stdout(&o);
    assert!(y.contains("\n  phase: Running\n"), "{y}");
    assert!(y.contains("memory: 256Mi"), "{y}");

    let o = d.ctl(&["vm", "create", "web", "--memory", "256Mi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already exists"));
    let o = d.ctl(&["vm", "create", "Bad_Name", "--memory", "256Mi"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("lower-case"), "{}", stderr(&o));

    let o = d.ctl(&["vm", "stop", "web"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&o).contains("Stopped"));
    let o = d.ctl(&["migrate", "web", "--to", "host-b"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("not Running") && stderr(&o).contains("vm start web"),
        "{}",
        stderr(&o)
    );
    assert_eq!(d.ctl(&["vm", "start", "web"]).status.code(), Some(0));
    let o = d.ctl(&["vm", "delete", "web"]);
    assert_eq!(o.status.code(), Some(0));
    assert!(stdout(&d.ctl(&["vm", "list"])).lines().count() == 1);
}

#[test]
fn migrate_without_engine_fails_with_the_reason() {
    let d = TestDaemon::start(Arc::new(UnavailableEngine));
    create_vm(&d, "db");
    let o = d.ctl(&["migrate", "db", "--to", "host-b", "--wait"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("migration engine not available yet"),
        "{}",
        stderr(&o)
    );
    let o = d.ctl(&["migrate", "db", "--to", "host-x"]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("known peers: host-b"), "{}", stderr(&o));

    let o = d.ctl(&["-o", "json", "get", "migrations"]);
    let ms: Vec<MigrationRecord> = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(ms.len(), 1);
    let name = &ms[0].name;
    let o = d.ctl(&["get", "migrations"]);
    assert!(stdout(&o)
        .lines()
        .any(|l| l.starts_with(name.as_str()) && l.contains("Failed")));
    let o = d.ctl(&["describe", "migration", name]);
    assert_eq!(o.status.code(), Some(0));
    let text = stdout(&o);
    assert!(text.contains("Migration State:"), "{text}");
    assert_eq!(
        field(&text, "Failure Reason").as_deref(),
        Some("migration engine not available yet"),
        "{text}"
    );
    assert_eq!(
        field(&text, "Target Node").as_deref(),
        Some("host-b"),
        "{text}"
    );
    assert_eq!(field(&text, "Failed").as_deref(), Some("true"), "{text}");
}

#[test]
fn second_migration_is_refused_and_cancel_works() {
    let d = TestDaemon::start(Arc::new(HoldingEngine::default()));
    create_vm(&d, "db");
    let o = d.ctl(&["-o", "json", "migrate", "db", "--to", "host-b"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let m: MigrationRecord = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(m.phase, MigrationPhase::Pending);
    let o = d.ctl(&["migrate", "db", "--to", "host-b"]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(
        err.contains(&format!(
            "vm db already has migration {} in phase Pending",
            m.name
        )),
        "{err}"
    );
    assert!(err.contains("hint: only one migration per VM"), "{err}");
    let o = d.ctl(&["cancel", &m.name]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let o = d.ctl(&["-o", "json", "describe", "migration", &m.name]);
    let after: MigrationRecord = serde_json::from_slice(&o.stdout).unwrap();
    assert!(after.abort_requested);
    assert_eq!(after.phase, MigrationPhase::Failed);
}

/// Completes every migration at once, as a stand-in for a working engine.
struct InstantEngine;

impl MigrationEngine for InstantEngine {
    fn start(&self, _record: MigrationRecord, handle: MigrationHandle, _service: Arc<Service>) {
        handle
            .update(|r| {
                r.start_timestamp = Some(Timestamp::now());
                r.passes = 3;
                r.bytes_sent = r.bytes_total;
                r.bytes_remaining = 0;
                r.actual_downtime_ms = Some(42);
                r.phase = MigrationPhase::Succeeded;
                r.end_timestamp = Some(Timestamp::now());
            })
            .unwrap();
    }

    fn abort(&self, _handle: MigrationHandle) {}
}

#[test]
fn successful_migration_exits_0() {
    let d = TestDaemon::start(Arc::new(InstantEngine));
    create_vm(&d, "db");
    let o = d.ctl(&["migrate", "db", "--to", "host-b", "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let out = stdout(&o);
    assert_eq!(field(&out, "Completed").as_deref(), Some("true"), "{out}");
    assert_eq!(
        field(&out, "Memory Sent").as_deref(),
        Some("64.0 MiB (100.0%)"),
        "{out}"
    );
    assert_eq!(
        field(&out, "Actual Downtime").as_deref(),
        Some("42 ms"),
        "{out}"
    );
    assert_eq!(field(&out, "Passes").as_deref(), Some("3"), "{out}");
}

#[test]
fn cert_commands_write_a_usable_ca_and_host_identity() {
    use std::os::unix::fs::PermissionsExt;
    let tmp = tempfile::tempdir().unwrap();
    let sock = tmp.path().join("unused.sock");
    let ca = tmp.path().join("ca");
    let ca_arg = ca.to_str().unwrap();
    let out = tmp.path().join("node-a");
    let out_arg = out.to_str().unwrap();
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;

    let o = ctl_at(
        &sock,
        &["cert", "init-ca", "--dir", ca_arg, "--name", "test ca"],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert_eq!(mode(&ca.join("ca.key")), 0o600);
    let o = ctl_at(
        &sock,
        &[
            "cert", "issue", "node-a", "--ca-dir", ca_arg, "--out", out_arg, "--days", "30",
        ],
    );
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    assert!(stdout(&o).contains("host.pem"), "{}", stdout(&o));
    assert_eq!(mode(&out.join("host.key")), 0o600);
    let id = transport::identity::HostIdentity::load_pem(
        &out.join("ca.pem"),
        &out.join("host.pem"),
        &out.join("host.key"),
    )
    .unwrap();
    assert_eq!(id.host().as_str(), "node-a");

    // Key material is never overwritten by accident.
    let before = std::fs::read(ca.join("ca.key")).unwrap();
    let o = ctl_at(&sock, &["cert", "init-ca", "--dir", ca_arg]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("--force"), "{}", stderr(&o));
    assert_eq!(std::fs::read(ca.join("ca.key")).unwrap(), before);

    let o = ctl_at(
        &sock,
        &[
            "cert", "issue", "node_a!", "--ca-dir", ca_arg, "--out", out_arg,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("invalid host name"), "{}", stderr(&o));
    let o = ctl_at(
        &sock,
        &[
            "cert", "issue", "node-b", "--ca-dir", out_arg, "--out", out_arg,
        ],
    );
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cert init-ca"), "{}", stderr(&o));
    let o = ctl_at(
        &sock,
        &[
            "cert", "issue", "node-b", "--ca-dir", ca_arg, "--out", out_arg, "--days", "0",
        ],
    );
    assert_eq!(o.status.code(), Some(2));
}

#[test]
fn demo_bad_arguments_exit_2() {
    let sock = Path::new("/nonexistent/api.sock");
    let o = ctl_at(sock, &["demo", "--memory", "lots"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("lots"), "{}", stderr(&o));
    let o = ctl_at(sock, &["demo", "--mode", "weird"]);
    assert_eq!(o.status.code(), Some(2));
    assert!(stderr(&o).contains("sparse"), "{}", stderr(&o));
}

#[test]
fn demo_without_the_other_binaries_says_how_to_build_them() {
    // A hard link, not a copy: a copy leaves a write descriptor that a child
    // forked concurrently by another test may inherit, and exec then fails
    // with ETXTBSY. The link lives beside the target dir (same filesystem).
    let tmp = tempfile::tempdir_in(env!("CARGO_TARGET_TMPDIR")).unwrap();
    let lone = tmp.path().join("migratectl");
    std::fs::hard_link(env!("CARGO_BIN_EXE_migratectl"), &lone).unwrap();
    let o = Command::new(&lone).arg("demo").output().unwrap();
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("cannot find"), "{err}");
    assert!(err.contains("cargo build --release --workspace"), "{err}");
}

#[test]
fn strategy_and_resume_flags_are_checked_before_anything_is_sent() {
    let sock = Path::new("/nonexistent/api.sock");
    for (args, want) in [
        (
            &["migrate", "a", "--to", "b", "--bandwidth", "lots"][..],
            "64Mi",
        ),
        (
            &["migrate", "a", "--to", "b", "--downtime-limit", "soon"],
            "not a duration",
        ),
        (
            &["migrate", "a", "--to", "b", "--progress-timeout", "0"],
            "--progress-timeout",
        ),
        (
            &["migrate", "a", "--to", "b", "--auto-converge-step", "big"],
            "adaptive",
        ),
        (
            &["migrate", "--resume", "a-xyz12", "--to", "b"],
            "cannot be used with",
        ),
        (
            &["migrate", "--resume", "a-xyz12", "--post-copy-now"],
            "cannot be used with",
        ),
        (&["demo", "--strategy", "teleport"], "auto-converge"),
        (&["demo", "--bandwidth", "fast"], "64Mi"),
        (&["demo", "--downtime-limit", "0s"], "greater than 0"),
        (&["switch"], "<MIGRATION>"),
    ] {
        let o = ctl_at(sock, args);
        assert_eq!(o.status.code(), Some(2), "{args:?}: {}", stderr(&o));
        assert!(stderr(&o).contains(want), "{args:?}: {}", stderr(&o));
    }
}

/// Plays the engine's part of issue 5 with canned numbers, keyed on the VM
/// name: `hold` runs pre-copy until switched to post-copy, `pc` sits in
/// post-copy, `cut` fails in post-copy with a broken link until resumed.
/// It keeps every options object the daemon handed it.
#[derive(Default)]
struct ScriptEngine {
    options: std::sync::Mutex<Vec<MigrationOverrides>>,
}

impl ScriptEngine {
    fn options(&self) -> Vec<MigrationOverrides> {
        self.options.lock().unwrap().clone()
    }
}

fn post_copy_numbers(r: &mut MigrationRecord) {
    r.mode = MigrationMode::PostCopy;
    r.post_copy_start_timestamp = Some(Timestamp::now());
    r.actual_downtime_ms = Some(17);
    r.remote_faults = 321;
    r.fault_latency_p50_us = Some(180);
    r.fault_latency_p99_us = Some(2400);
    r.post_copy_pages = 15_000;
}

impl MigrationEngine for ScriptEngine {
    fn configure(&self, options: &MigrationOverrides) -> Option<MigrationConfiguration> {
        self.options.lock().unwrap().push(options.clone());
        Some(MigrationConfiguration {
            allow_auto_converge: options.allow_auto_converge.unwrap_or(false),
            auto_converge_step: options.auto_converge_step.unwrap_or_default(),
            allow_post_copy: options.allow_post_copy.unwrap_or(false) || options.post_copy_now,
            completion_timeout_per_gib: options.completion_timeout_per_gib.unwrap_or(800),
            progress_timeout: options.progress_timeout.unwrap_or(150),
            bandwidth_per_migration: options.bandwidth_per_migration.unwrap_or_default(),
            downtime_limit: options
                .downtime_limit
                .unwrap_or(HumanDuration::from_millis(300)),
            keepalive_interval: HumanDuration::from_secs(5),
            keepalive_count: 5,
            post_copy_now: options.post_copy_now,
        })
    }

    fn start(&self, record: MigrationRecord, handle: MigrationHandle, _service: Arc<Service>) {
        handle
            .update(|r| {
                r.start_timestamp = Some(Timestamp::now());
                r.phase = MigrationPhase::Running;
                r.passes = 4;
                r.bytes_sent = r.bytes_total / 2;
                r.delta_pages = 77;
                r.throttle_pct = 40;
                r.throttle_steps = vec![
                    ThrottleStep {
                        at_ms: 1500,
                        percent: 20,
                        dirty_rate: 300 << 20,
                        bandwidth: 100 << 20,
                    },
                    ThrottleStep {
                        at_ms: 3250,
                        percent: 40,
                        dirty_rate: 200 << 20,
                        bandwidth: 100 << 20,
                    },
                ];
                match record.vm.as_str() {
                    "pc" => post_copy_numbers(r),
                    "cut" => {
                        post_copy_numbers(r);
                        r.fail(FailureCode::PostCopyInterrupted, "link to host-b lost");
                    }
                    _ => {}
                }
            })
            .unwrap();
    }

    fn abort(&self, handle: MigrationHandle) {
        let _ = handle.update(|r| {
            r.abort_status = Some(AbortStatus::Succeeded);
            r.fail(FailureCode::Aborted, "migration was cancelled");
        });
    }

    fn switch_to_post_copy(&self, handle: MigrationHandle) {
        handle
            .update(|r| {
                post_copy_numbers(r);
                r.bytes_sent = r.bytes_total;
                r.bytes_remaining = 0;
                r.phase = MigrationPhase::Succeeded;
                r.end_timestamp = Some(Timestamp::now());
            })
            .unwrap();
    }

    fn resume(&self, _record: MigrationRecord, handle: MigrationHandle) -> Result<(), ResumeError> {
        handle
            .update(|r| {
                r.reconnects += 1;
                r.failure_code = None;
                r.failure_reason = None;
                r.phase = MigrationPhase::Succeeded;
                r.end_timestamp = Some(Timestamp::now());
            })
            .map(|_| ())
            .map_err(ResumeError::Record)
    }
}

fn create_vm(d: &TestDaemon, name: &str) {
    let o = d.ctl(&["vm", "create", name, "--memory", "64Mi"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
}

/// `migrate -o json ...`: the record it printed.
fn migrate_json(d: &TestDaemon, args: &[&str]) -> MigrationRecord {
    let mut full = vec!["-o", "json", "migrate"];
    full.extend_from_slice(args);
    let o = d.ctl(&full);
    assert_eq!(o.status.code(), Some(0), "{args:?}: {}", stderr(&o));
    serde_json::from_slice(&o.stdout).unwrap()
}

#[test]
fn only_given_flags_reach_the_daemon() {
    let engine = Arc::new(ScriptEngine::default());
    let d = TestDaemon::start(engine.clone());
    create_vm(&d, "hold");
    let m = migrate_json(
        &d,
        &[
            "hold",
            "--to",
            "host-b",
            "--allow-post-copy",
            "--bandwidth",
            "64Mi",
            "--downtime-limit",
            "250ms",
        ],
    );
    assert_eq!(m.phase, MigrationPhase::Running);
    let sent = engine.options();
    assert_eq!(sent.len(), 1);
    assert_eq!(
        serde_json::to_value(&sent[0]).unwrap(),
        serde_json::json!({
            "allowPostCopy": true,
            "bandwidthPerMigration": "64Mi",
            "downtimeLimit": "250ms",
        })
    );
    // The effective settings are in the record and in `describe`.
    let text = stdout(&d.ctl(&["describe", "migration", &m.name]));
    assert_eq!(field(&text, "Allow Post-Copy").as_deref(), Some("true"));
    assert_eq!(
        field(&text, "Allow Auto-Converge").as_deref(),
        Some("false")
    );
    assert_eq!(
        field(&text, "Bandwidth Limit").as_deref(),
        Some("64Mi/s"),
        "{text}"
    );
    assert_eq!(
        field(&text, "Downtime Limit").as_deref(),
        Some("250ms"),
        "{text}"
    );
    assert_eq!(
        field(&text, "Completion Timeout").as_deref(),
        Some("800s per GiB"),
        "{text}"
    );
    assert_eq!(field(&text, "Keepalive").as_deref(), Some("5s x 5"));
    assert!(text.contains("Throttle Steps:\n"), "{text}");
    assert_eq!(field(&text, "Mode").as_deref(), Some("PreCopy"), "{text}");
    // No post-copy block before post-copy.
    assert!(!text.contains("Remote Faults"), "{text}");

    // A plain migrate sends no options at all, so the defaults apply.
    create_vm(&d, "other");
    migrate_json(&d, &["other", "--to", "host-b"]);
    assert_eq!(engine.options()[1], MigrationOverrides::default());
}

#[test]
fn switch_moves_to_post_copy_and_describe_shows_its_numbers() {
    let d = TestDaemon::start(Arc::new(ScriptEngine::default()));
    create_vm(&d, "hold");
    let m = migrate_json(&d, &["hold", "--to", "host-b"]);
    let o = d.ctl(&["switch", &m.name, "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&format!(
            "migration {} switch to post-copy requested",
            m.name
        )),
        "{text}"
    );
    assert_eq!(field(&text, "Mode").as_deref(), Some("PostCopy"), "{text}");
    assert_eq!(field(&text, "Switch Requested").as_deref(), Some("true"));
    assert!(text.contains("Post-Copy:\n"), "{text}");
    for (k, v) in [
        ("Switchover Downtime", "17 ms"),
        ("Remote Faults", "321"),
        ("Fault Latency p50", "180 us"),
        ("Fault Latency p99", "2400 us"),
        ("Pushed Pages", "15000"),
        ("Reconnects", "0"),
        ("Delta Pages", "77"),
        ("Throttle", "40%"),
    ] {
        assert_eq!(field(&text, k).as_deref(), Some(v), "{k}: {text}");
    }
    // The throttle steps table, under its header, one row per step.
    let steps: Vec<&str> = text
        .lines()
        .skip_while(|l| *l != "Throttle Steps:")
        .skip(1)
        .take(3)
        .collect();
    assert_eq!(
        steps[0].split_whitespace().collect::<Vec<_>>(),
        ["TIME", "PERCENT", "DIRTY-RATE", "BANDWIDTH"],
        "{text}"
    );
    assert_eq!(
        steps[1].split_whitespace().collect::<Vec<_>>(),
        ["1.5s", "20%", "300.0", "MiB/s", "100.0", "MiB/s"],
        "{text}"
    );
    assert!(steps[2].trim_start().starts_with("3.2s   40%"), "{text}");

    // A second switch, and a cancel, are refused: it is over.
    let o = d.ctl(&["switch", &m.name]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("already finished"), "{}", stderr(&o));

    // Table, JSON and YAML carry the mode and the new fields.
    let o = d.ctl(&["get", "migrations"]);
    let out = stdout(&o);
    assert!(out.lines().next().unwrap().contains("MODE"), "{out}");
    assert!(
        out.lines()
            .any(|l| l.starts_with(m.name.as_str()) && l.contains("PostCopy")),
        "{out}"
    );
    let o = d.ctl(&["-o", "yaml", "describe", "migration", &m.name]);
    let y = stdout(&o);
    for want in [
        "mode: PostCopy\n",
        "remoteFaults: 321\n",
        "faultLatencyP99Us: 2400\n",
        "throttleSteps:\n  - atMs: 1500\n",
        "migrationConfiguration:\n",
    ] {
        assert!(y.contains(want), "{want:?} missing in {y}");
    }
}

#[test]
fn post_copy_cannot_be_cancelled_but_an_interrupted_one_resumes() {
    let d = TestDaemon::start(Arc::new(ScriptEngine::default()));
    create_vm(&d, "pc");
    let m = migrate_json(&d, &["pc", "--to", "host-b", "--allow-post-copy"]);
    assert_eq!(m.mode, MigrationMode::PostCopy);
    let o = d.ctl(&["cancel", &m.name]);
    assert_eq!(o.status.code(), Some(1));
    let err = stderr(&o);
    assert!(err.contains("cannot be cancelled"), "{err}");
    assert!(
        err.contains("hint: wait for it to finish") && err.contains("migratectl migrate --resume"),
        "{err}"
    );
    let o = d.ctl(&["switch", &m.name]);
    assert_eq!(o.status.code(), Some(1));
    assert!(
        stderr(&o).contains("already in post-copy"),
        "{}",
        stderr(&o)
    );
    // Running post-copy is not resumable either.
    let o = d.ctl(&["migrate", "--resume", &m.name]);
    assert_eq!(o.status.code(), Some(1));
    assert!(stderr(&o).contains("cannot be resumed"), "{}", stderr(&o));

    create_vm(&d, "cut");
    let o = d.ctl(&["-o", "json", "migrate", "cut", "--to", "host-b"]);
    assert_eq!(o.status.code(), Some(1), "{}", stderr(&o));
    assert!(stderr(&o).contains("link to host-b lost"), "{}", stderr(&o));
    let failed: MigrationRecord = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(failed.failure_code, Some(FailureCode::PostCopyInterrupted));
    let o = d.ctl(&["migrate", "--resume", &failed.name, "--wait"]);
    assert_eq!(o.status.code(), Some(0), "{}", stderr(&o));
    let text = stdout(&o);
    assert!(
        text.contains(&format!("migration {} resumed", failed.name)),
        "{text}"
    );
    assert_eq!(field(&text, "Completed").as_deref(), Some("true"), "{text}");
    assert_eq!(field(&text, "Reconnects").as_deref(), Some("1"), "{text}");
}
