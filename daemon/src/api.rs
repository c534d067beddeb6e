//! The local HTTP/JSON API on a unix socket, what `migratectl` talks to.
//!
//! ```text
//! GET    /v1/health                  host name, version
//! GET    /v1/vms                     list       POST /v1/vms          create (VmSpec)
//! GET    /v1/vms/{name}              get        DELETE /v1/vms/{name} stop + delete
//! POST   /v1/vms/{name}/stop|start
//! GET    /v1/migrations              list       POST /v1/migrations   create (MigrationRequest:
//!                                                                    {vm, targetHost, verify?})
//! GET    /v1/migrations/{name}       get        DELETE /v1/migrations/{name} cancel
//! ```
//!
//! Every error is `{"code", "message", "hint"}` with a stable `code`.
//! Access control is the socket's file mode (0600 or 0660): whoever can
//! connect is an operator.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::extract::rejection::JsonRejection;
use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::net::UnixListener;

use crate::model::{codes, ErrorBody, Health, MigrationRecord, MigrationRequest, Vm, VmSpec};
use crate::service::{Service, ServiceError};

/// An error as the API returns it.
#[derive(Debug)]
pub struct ApiError {
    pub status: StatusCode,
    pub body: ErrorBody,
}

impl ApiError {
    fn new(status: StatusCode, code: &str, message: String, hint: Option<String>) -> Self {
        Self {
            status,
            body: ErrorBody {
                code: code.into(),
                message,
                hint,
            },
        }
    }
}

impl From<ServiceError> for ApiError {
    fn from(e: ServiceError) -> Self {
        let status = match e.code() {
            codes::NOT_FOUND => StatusCode::NOT_FOUND,
            codes::INVALID_ARGUMENT | codes::UNKNOWN_HOST => StatusCode::BAD_REQUEST,
            codes::ALREADY_EXISTS
            | codes::MIGRATION_IN_PROGRESS
            | codes::VM_NOT_RUNNING
            | codes::VM_BUSY
            | codes::ALREADY_FINISHED
            | codes::CONFLICT => StatusCode::CONFLICT,
            codes::INSUFFICIENT_MEMORY => StatusCode::INSUFFICIENT_STORAGE,
            codes::VMM_FAILED => StatusCode::BAD_GATEWAY,
            _ => StatusCode::INTERNAL_SERVER_ERROR,
        };
        if status.is_server_error() {
            tracing::error!(error = %crate::error_chain(&e), "api request failed");
        }
        Self::new(status, e.code(), crate::error_chain(&e), e.hint())
    }
}

impl From<JsonRejection> for ApiError {
    fn from(r: JsonRejection) -> Self {
        Self::new(
            StatusCode::BAD_REQUEST,
            codes::INVALID_ARGUMENT,
            format!("bad request body: {}", r.body_text()),
            Some("the body must be JSON of the documented shape (see api/src/model.rs)".into()),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status, Json(self.body)).into_response()
    }
}

type ApiResult<T> = Result<Json<T>, ApiError>;

/// Runs a blocking service call off the async workers.
async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, ServiceError> + Send + 'static,
) -> ApiResult<T> {
    match tokio::task::spawn_blocking(f).await {
        Ok(r) => r.map(Json).map_err(ApiError::from),
        Err(join) => Err(ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::INTERNAL,
            format!("request handler failed: {join}"),
            Some("this is a bug in migrated; its log has details".into()),
        )),
    }
}

type Svc = State<Arc<Service>>;

/// The API's routes over `svc`.
pub fn router(svc: Arc<Service>) -> Router {
    Router::new()
        .route("/v1/health", get(health))
        .route("/v1/vms", get(list_vms).post(create_vm))
        .route("/v1/vms/{name}", get(get_vm).delete(delete_vm))
        .route("/v1/vms/{name}/stop", post(stop_vm))
        .route("/v1/vms/{name}/start", post(start_vm))
        .route(
            "/v1/migrations",
            get(list_migrations).post(create_migration),
        )
        .route(
            "/v1/migrations/{name}",
            get(get_migration).delete(cancel_migration),
        )
        .route("/v1/migrations/{name}/cancel", post(cancel_migration))
        .route("/v1/migrations/{name}/switch", post(switch_migration))
        .route("/v1/migrations/{name}/resume", post(resume_migration))
        .fallback(unknown_route)
        .with_state(svc)
}

async fn unknown_route(uri: axum::http::Uri) -> ApiError {
    ApiError::new(
        StatusCode::NOT_FOUND,
        codes::NOT_FOUND,
        format!("no such endpoint {}", uri.path()),
        Some("migratectl and migrated versions may differ".into()),
    )
}

async fn health(State(svc): Svc) -> Json<Health> {
    Json(svc.health())
}

async fn list_vms(State(svc): Svc) -> ApiResult<Vec<Vm>> {
    blocking(move || Ok(svc.list_vms())).await
}

async fn create_vm(
    State(svc): Svc,
    body: Result<Json<VmSpec>, JsonRejection>,
) -> Result<(StatusCode, Json<Vm>), ApiError> {
    let Json(spec) = body?;
    let vm = blocking(move || svc.create_vm(spec)).await?;
    Ok((StatusCode::CREATED, vm))
}

async fn get_vm(State(svc): Svc, UrlPath(name): UrlPath<String>) -> ApiResult<Vm> {
    blocking(move || svc.get_vm(&name)).await
}

async fn delete_vm(
    State(svc): Svc,
    UrlPath(name): UrlPath<String>,
) -> Result<StatusCode, ApiError> {
    let _ = blocking(move || svc.delete_vm(&name)).await?;
    Ok(StatusCode::NO_CONTENT)
}

async fn stop_vm(State(svc): Svc, UrlPath(name): UrlPath<String>) -> ApiResult<Vm> {
    blocking(move || svc.stop_vm(&name)).await
}

async fn start_vm(State(svc): Svc, UrlPath(name): UrlPath<String>) -> ApiResult<Vm> {
    blocking(move || svc.start_vm(&name)).await
}

async fn list_migrations(State(svc): Svc) -> ApiResult<Vec<MigrationRecord>> {
    blocking(move || Ok(svc.list_migrations())).await
}

async fn create_migration(
    State(svc): Svc,
    body: Result<Json<MigrationRequest>, JsonRejection>,
) -> Result<(StatusCode, Json<MigrationRecord>), ApiError> {
    let Json(req) = body?;
    let rec = blocking(move || svc.create_migration(req)).await?;
    Ok((StatusCode::CREATED, rec))
}

async fn get_migration(
    State(svc): Svc,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<MigrationRecord> {
    blocking(move || svc.get_migration(&name)).await
}

async fn cancel_migration(
    State(svc): Svc,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<MigrationRecord> {
    blocking(move || svc.cancel_migration(&name)).await
}

async fn switch_migration(
    State(svc): Svc,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<MigrationRecord> {
    blocking(move || svc.switch_migration(&name)).await
}

async fn resume_migration(
    State(svc): Svc,
    UrlPath(name): UrlPath<String>,
) -> ApiResult<MigrationRecord> {
    blocking(move || svc.resume_migration(&name)).await
}

/// The API socket could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum BindApiError {
    #[error("another migrated is already serving {path}")]
    InUse { path: PathBuf },
    #[error("cannot remove stale socket {path}")]
    RemoveStale {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot create socket directory {path}")]
    CreateDir {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot bind {path}")]
    Bind {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cannot set mode {mode:o} on {path}")]
    Chmod {
        path: PathBuf,
        mode: u32,
        #[source]
        source: io::Error,
    },
}

/// Binds the API socket with permission bits `mode`, replacing a stale
/// socket left by a daemon that died but refusing to steal a live one.
pub fn bind_socket(path: &Path, mode: u32) -> Result<UnixListener, BindApiError> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o755)
            .create(dir)
            .map_err(|source| BindApiError::CreateDir {
                path: dir.to_owned(),
                source,
            })?;
    }
    if std::fs::symlink_metadata(path).is_ok() {
        if std::os::unix::net::UnixStream::connect(path).is_ok() {
            return Err(BindApiError::InUse {
                path: path.to_owned(),
            });
        }
        std::fs::remove_file(path).map_err(|source| BindApiError::RemoveStale {
            path: path.to_owned(),
            source,
        })?;
    }
    // Bind inside a private directory, set the mode, then move the socket
    // into place: nobody can connect before the mode is right.
    let private = path.with_file_name(format!(
        ".{}.tmp-{}",
        path.file_name()
            .map(|n| n.to_string_lossy())
            .unwrap_or_default(),
        std::process::id()
    ));
    let _ = std::fs::remove_dir_all(&private);
    std::fs::DirBuilder::new()
        .mode(0o700)
        .create(&private)
        .map_err(|source| BindApiError::CreateDir {
            path: private.clone(),
            source,
        })?;
    let tmp_sock = private.join("s");
    let result = (|| {
        let listener = UnixListener::bind(&tmp_sock).map_err(|source| BindApiError::Bind {
            path: path.to_owned(),
            source,
        })?;
        // fchmod on a socket fd does not change the path's mode on Linux,
        // hence chmod by path.
        std::fs::set_permissions(&tmp_sock, std::fs::Permissions::from_mode(mode)).map_err(
            |source| BindApiError::Chmod {
                path: path.to_owned(),
                mode,
                source,
            },
        )?;
        std::fs::rename(&tmp_sock, path).map_err(|source| BindApiError::Bind {
            path: path.to_owned(),
            source,
        })?;
        Ok(listener)
    })();
    let _ = std::fs::remove_dir_all(&private);
    result
}

/// Serves the API on `listener` until `shutdown` resolves.
pub async fn serve(
    listener: UnixListener,
    svc: Arc<Service>,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> io::Result<()> {
    axum::serve(listener, router(svc))
        .with_graceful_shutdown(shutdown)
        .await
}
