//! The API over a real unix socket, with the fake VMM backend and fake
//! engines: what `migratectl` sees, including error codes.

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::http::StatusCode;
use migrated::client::{ApiCallError, ApiClient};
use migrated::migration::MigrationEngine;
use migrated::model::{
    AbortStatus, ConditionStatus, FailureCode, MigrationMethod, MigrationPhase, MigrationRequest,
    Quantity, VmPhase, VmSpec, WorkloadSpec,
};
use migrated::service::Service;
use migrated::store::Store;
use migrated::testing::{FakeBackend, HoldingEngine, UnavailableEngine, ENGINE_UNAVAILABLE_REASON};
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

struct Daemon {
    client: ApiClient,
    socket: PathBuf,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<std::io::Result<()>>>,
}

impl Daemon {
    async fn start(
        state: &Path,
        backend: Arc<FakeBackend>,
        engine: Arc<dyn MigrationEngine>,
    ) -> Daemon {
        let peers = BTreeMap::from([
            ("host-b".to_string(), "127.0.0.1:7879".to_string()),
            ("host-c".to_string(), "127.0.0.1:7880".to_string()),
        ]);
        let store = Store::open(state.join("state")).unwrap();
        let (svc, _) = Service::open("host-a".into(), peers, store, backend, engine).unwrap();
        let socket = state.join("api.sock");
        let listener = migrated::api::bind_socket(&socket, 0o600).unwrap();
        let (tx, rx) = oneshot::channel();
        let task = tokio::spawn(migrated::api::serve(listener, Arc::new(svc), async {
            let _ = rx.await;
        }));
        Daemon {
            client: ApiClient::new(&socket),
            socket,
            stop: Some(tx),
            task: Some(task),
        }
    }

    /// A daemon with a fake VMM and a [`HoldingEngine`], which keeps every
    /// migration in flight.
    async fn holding(state: &Path) -> (Daemon, Arc<FakeBackend>, Arc<HoldingEngine>) {
        let backend = Arc::new(FakeBackend::default());
        let engine = Arc::new(HoldingEngine::default());
        let d = Daemon::start(state, backend.clone(), engine.clone()).await;
        (d, backend, engine)
    }

    async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        self.task.take().unwrap().await.unwrap().unwrap();
    }
}

fn spec(name: &str) -> VmSpec {
    VmSpec {
        name: name.into(),
        labels: BTreeMap::from([("app".into(), "web".into())]),
        memory: Quantity(256 << 20),
        vcpus: 2,
        workload: WorkloadSpec::default(),
    }
}

fn api_err(e: ApiCallError) -> (StatusCode, String, String, Option<String>) {
    match e {
        ApiCallError::Api { status, body } => (status, body.code, body.message, body.hint),
        other => panic!("expected an API error, got {other:?}"),
    }
}

fn migrate(vm: &str, to: &str) -> MigrationRequest {
    MigrationRequest {
        vm: vm.into(),
        target_host: to.into(),
        verify: false,
        options: Default::default(),
    }
}

#[tokio::test]
async fn vm_lifecycle() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::default());
    let d = Daemon::start(tmp.path(), backend.clone(), Arc::new(UnavailableEngine)).await;
    let mode = std::fs::metadata(&d.socket).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o600);
    let c = &d.client;

    let health = c.health().await.unwrap();
    assert_eq!(health.host_name, "host-a");
    assert_eq!(health.vms, 0);

    let vm = c.create_vm(&spec("web-1")).await.unwrap();
    assert_eq!(vm.status.phase, VmPhase::Running);
    assert_eq!(vm.status.node_name, "host-a");
    assert_eq!(vm.status.migration_method, MigrationMethod::LiveMigration);
    let live = vm.status.live_migratable().unwrap();
    assert_eq!(live.status, ConditionStatus::True);
    assert_eq!(backend.running(), 1);

    let (status, code, msg, hint) = api_err(c.create_vm(&spec("web-1")).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "already_exists")
    );
    assert!(msg.contains("web-1"), "{msg}");
    assert!(hint.unwrap().contains("vm delete web-1"));

    c.create_vm(&spec("web-2")).await.unwrap();
    let names: Vec<String> = c
        .list_vms()
        .await
        .unwrap()
        .into_iter()
        .map(|v| v.spec.name)
        .collect();
    assert_eq!(names, ["web-1", "web-2"]);

    // The guest's counters come from the VMM on every get.
    let p1 = c
        .get_vm("web-1")
        .await
        .unwrap()
        .status
        .guest
        .unwrap()
        .passes;
    let got = c.get_vm("web-1").await.unwrap();
    assert!(got.status.guest.unwrap().passes > p1);
    assert_eq!(got.spec, spec("web-1"));

    let stopped = c.stop_vm("web-1").await.unwrap();
    assert_eq!(stopped.status.phase, VmPhase::Stopped);
    let live = stopped.status.live_migratable().unwrap();
    assert_eq!(live.status, ConditionStatus::False);
    assert_eq!(live.reason, "VmNotRunning");
    assert_eq!(backend.running(), 1);
    assert_eq!(
        c.start_vm("web-1").await.unwrap().status.phase,
        VmPhase::Running
    );
    assert_eq!(backend.running(), 2);

    c.delete_vm("web-1").await.unwrap();
    assert_eq!(backend.running(), 1);
    let (status, code, msg, hint) = api_err(c.get_vm("web-1").await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    assert!(msg.contains("web-1"));
    assert!(hint.unwrap().contains("vm list"));
    let (status, code, ..) = api_err(c.delete_vm("web-1").await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    d.stop().await;
}

#[tokio::test]
async fn bad_requests_get_typed_errors() {
    let tmp = tempfile::tempdir().unwrap();
    let backend = Arc::new(FakeBackend::with_memory(Quantity(1 << 30)));
    let d = Daemon::start(tmp.path(), backend.clone(), Arc::new(UnavailableEngine)).await;
    let c = &d.client;

    let mut s = spec("a");
    s.vcpus = 0;
    let (status, code, msg, _) = api_err(c.create_vm(&s).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );
    assert!(msg.contains("vcpus"), "{msg}");

    let (status, code, ..) = api_err(c.get_vm("Not_A_Name").await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );

    let mut s = spec("big");
    s.memory = Quantity(2 << 30);
    let (status, code, msg, hint) = api_err(c.create_vm(&s).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::INSUFFICIENT_STORAGE, "insufficient_memory")
    );
    assert!(msg.contains("2Gi"), "{msg}");
    assert!(hint.is_some());
    // A refused create leaves nothing behind.
    assert!(c.list_vms().await.unwrap().is_empty());
    assert_eq!(backend.running(), 0);

    // Raw bodies the typed client would never send.
    let raw = raw_post(
        &d.socket,
        "/v1/vms",
        r#"{"name":"a","memory":"1Gi","cpus":2}"#,
    )
    .await;
    assert!(raw.starts_with("HTTP/1.1 400"), "{raw}");
    assert!(
        raw.contains("\"code\":\"invalid_argument\"") && raw.contains("cpus"),
        "{raw}"
    );
    let raw = raw_post(&d.socket, "/v1/nothing", "{}").await;
    assert!(
        raw.starts_with("HTTP/1.1 404") && raw.contains("not_found"),
        "{raw}"
    );
    d.stop().await;
}

/// One HTTP/1.1 POST written by hand; returns the whole reply.
async fn raw_post(socket: &Path, path: &str, body: &str) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::UnixStream::connect(socket).await.unwrap();
    let req = format!(
        "POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).await.unwrap();
    out
}

#[tokio::test]
async fn one_active_migration_per_vm() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, _, engine) = Daemon::holding(tmp.path()).await;
    let c = &d.client;
    c.create_vm(&spec("db")).await.unwrap();

    let (status, code, ..) = api_err(
        c.create_migration(&migrate("nope", "host-b"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "not_found")
    );
    let (status, code, _, hint) = api_err(
        c.create_migration(&migrate("db", "host-z"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "unknown_host")
    );
    assert!(hint.unwrap().contains("host-b, host-c"));
    let (status, code, ..) = api_err(
        c.create_migration(&migrate("db", "host-a"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );

    let first = c.create_migration(&migrate("db", "host-b")).await.unwrap();
    assert_eq!(first.phase, MigrationPhase::Pending);
    assert!(
        first.name.starts_with("db-") && first.name.len() == 8,
        "{}",
        first.name
    );
    assert_eq!(first.source_host, "host-a");
    assert_eq!(first.target_address, "127.0.0.1:7879");
    assert_eq!(first.bytes_total, 256 << 20);
    assert_eq!(engine.started(), std::slice::from_ref(&first.name));

    let (status, code, msg, _) = api_err(
        c.create_migration(&migrate("db", "host-c"))
            .await
            .unwrap_err(),
    );
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "migration_in_progress")
    );
    assert!(
        msg.contains(&first.name) && msg.contains("Pending"),
        "{msg}"
    );
    assert_eq!(engine.started().len(), 1);

    let vm = c.get_vm("db").await.unwrap();
    assert_eq!(vm.status.phase, VmPhase::Migrating);
    assert_eq!(
        vm.status.active_migration.as_deref(),
        Some(first.name.as_str())
    );
    let (status, code, ..) = api_err(c.stop_vm("db").await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "migration_in_progress")
    );
    let (status, ..) = api_err(c.delete_vm("db").await.unwrap_err());
    assert_eq!(status, StatusCode::CONFLICT);

    assert_eq!(c.list_migrations().await.unwrap().len(), 1);
    assert_eq!(c.get_migration(&first.name).await.unwrap(), first);

    let cancelled = c.cancel_migration(&first.name).await.unwrap();
    assert_eq!(cancelled.phase, MigrationPhase::Failed);
    assert!(cancelled.abort_requested);
    assert_eq!(cancelled.abort_status, Some(AbortStatus::Succeeded));
    let (status, code, ..) = api_err(c.cancel_migration(&first.name).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::CONFLICT, "already_finished")
    );

    // With the first one finished, a new one is accepted.
    let second = c.create_migration(&migrate("db", "host-c")).await.unwrap();
    assert_ne!(second.name, first.name);
    assert_eq!(c.list_migrations().await.unwrap().len(), 2);
    d.stop().await;
}

#[tokio::test]
async fn without_an_engine_migrations_fail_clearly() {
    let tmp = tempfile::tempdir().unwrap();
    let d = Daemon::start(
        tmp.path(),
        Arc::new(FakeBackend::default()),
        Arc::new(UnavailableEngine),
    )
    .await;
    let c = &d.client;
    c.create_vm(&spec("db")).await.unwrap();
    let m = c.create_migration(&migrate("db", "host-b")).await.unwrap();
    assert_eq!(m.phase, MigrationPhase::Failed);
    assert_eq!(m.failure_reason.as_deref(), Some(ENGINE_UNAVAILABLE_REASON));
    assert_eq!(m.failure_code, Some(FailureCode::EngineUnavailable));
    assert!(m.end_timestamp.is_some());
    // The failure is persisted, not just shown.
    let on_disk = Store::open(tmp.path().join("state"))
        .unwrap()
        .load_migrations()
        .unwrap();
    assert_eq!(on_disk.records, vec![m]);
    // A failed migration does not block the next one.
    c.create_migration(&migrate("db", "host-b")).await.unwrap();
    let vm = c.get_vm("db").await.unwrap();
    assert_eq!(vm.status.phase, VmPhase::Running);
    d.stop().await;
}

#[tokio::test]
async fn restart_reattaches_and_reports_lost_guests() {
    let tmp = tempfile::tempdir().unwrap();
    let (d, backend, engine) = Daemon::holding(tmp.path()).await;
    d.client.create_vm(&spec("keep")).await.unwrap();
    d.client.create_vm(&spec("lost")).await.unwrap();
    d.client.create_vm(&spec("off")).await.unwrap();
    d.client.stop_vm("off").await.unwrap();
    let m = d
        .client
        .create_migration(&migrate("keep", "host-b"))
        .await
        .unwrap();
    d.stop().await;

    // The daemon is down; one guest dies meanwhile, the others live on.
    let store = Store::open(tmp.path().join("state")).unwrap();
    assert!(backend.kill(&store.vm_paths("lost")));
    assert_eq!(backend.running(), 1);

    let d = Daemon::start(tmp.path(), backend.clone(), engine).await;
    let vms = d.client.list_vms().await.unwrap();
    let phase = |n: &str| {
        vms.iter()
            .find(|v| v.spec.name == n)
            .unwrap()
            .status
            .clone()
    };
    assert_eq!(phase("keep").phase, VmPhase::Running);
    assert!(phase("keep").guest.is_some());
    assert_eq!(phase("off").phase, VmPhase::Stopped);
    let lost = phase("lost");
    assert_eq!(lost.phase, VmPhase::Failed);
    assert!(
        lost.reason.as_deref().unwrap().contains("gone"),
        "{:?}",
        lost.reason
    );
    // Re-attaching started nothing.
    assert_eq!(backend.running(), 1);
    // The migration in flight at the restart is marked failed, not left hanging.
    let m = d.client.get_migration(&m.name).await.unwrap();
    assert_eq!(m.phase, MigrationPhase::Failed);
    assert_eq!(m.failure_code, Some(FailureCode::DaemonRestarted));
    // A lost guest can be started again.
    assert_eq!(
        d.client.start_vm("lost").await.unwrap().status.phase,
        VmPhase::Running
    );
    d.stop().await;
}

#[tokio::test]
async fn socket_binding_replaces_stale_but_not_live_sockets() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("run").join("api.sock");
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    // A socket file nobody listens on, as a killed daemon leaves it.
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let live = migrated::api::bind_socket(&path, 0o660).unwrap();
    let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode, 0o660);
    let err = migrated::api::bind_socket(&path, 0o600).unwrap_err();
    assert!(
        matches!(err, migrated::api::BindApiError::InUse { .. }),
        "{err}"
    );
    drop(live);
    // Nothing but the socket is left in its directory.
    let entries: Vec<_> = std::fs::read_dir(path.parent().unwrap()).unwrap().collect();
    assert_eq!(entries.len(), 1);
}

#[tokio::test]
async fn options_switch_and_cancel_in_post_copy() {
    use migrated::model::{MigrationMode, MigrationOverrides};
    let tmp = tempfile::tempdir().unwrap();
    let (d, _, engine) = Daemon::holding(tmp.path()).await;
    let c = &d.client;
    c.create_vm(&spec("db")).await.unwrap();

    // Out-of-range options are refused before anything starts.
    let mut req = migrate("db", "host-b");
    req.options.progress_timeout = Some(0);
    let (status, code, msg, _) = api_err(c.create_migration(&req).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_argument")
    );
    assert!(msg.contains("progressTimeout"), "{msg}");
    assert!(engine.started().is_empty());

    // The record shows what the migration runs with: defaults + options.
    req.options = MigrationOverrides {
        allow_auto_converge: Some(true),
        bandwidth_per_migration: Some(Quantity::mib(64)),
        ..Default::default()
    };
    let m = c.create_migration(&req).await.unwrap();
    let conf = m.migration_configuration.clone().expect("configuration");
    assert!(conf.allow_auto_converge && !conf.allow_post_copy);
    assert_eq!(conf.bandwidth_per_migration, Quantity::mib(64));
    assert_eq!(
        (conf.completion_timeout_per_gib, conf.progress_timeout),
        (800, 150)
    );

    // Resume is only for an interrupted post-copy.
    let (status, code, msg, _) = api_err(c.resume_migration(&m.name).await.unwrap_err());
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "conflict"));
    assert!(msg.contains("post_copy_interrupted"), "{msg}");

    // Switch to post-copy; from then on cancel is refused with the reason.
    let switched = c.switch_migration(&m.name).await.unwrap();
    assert!(switched.switch_requested);
    assert_eq!(switched.mode, MigrationMode::PostCopy);
    let (status, code, msg, hint) = api_err(c.cancel_migration(&m.name).await.unwrap_err());
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "conflict"));
    assert!(msg.contains("post-copy") && msg.contains("host-b"), "{msg}");
    assert!(hint.unwrap().contains("describe migration"));
    let after = c.get_migration(&m.name).await.unwrap();
    assert!(
        !after.abort_requested && !after.phase.is_final(),
        "{after:?}"
    );
    let (status, ..) = api_err(c.switch_migration(&m.name).await.unwrap_err());
    assert_eq!(status, StatusCode::CONFLICT);
    d.stop().await;
}
