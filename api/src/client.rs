//! A client of the local API over its unix socket (HTTP/1.1 with hyper),
//! used by `migratectl` and by tests. One connection per request: calls are
//! rare and this keeps a dead daemon from leaving a half-open connection.

use std::io;
use std::path::{Path, PathBuf};

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Bytes;
use hyper::{header, Method, Request, StatusCode};
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::model::{ErrorBody, Health, MigrationRecord, MigrationRequest, Vm, VmSpec};

/// Largest reply accepted; a listing of thousands of records fits.
pub const MAX_REPLY_BYTES: usize = 16 << 20;

/// An API call that did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiCallError {
    #[error("cannot connect to migrated at {path}")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("http exchange with migrated failed")]
    Http(#[source] hyper::Error),
    #[error("cannot read the reply from migrated: {0}")]
    Body(String),
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    /// The daemon refused or failed the request and said why.
    #[error("{}", .body.message)]
    Api { status: StatusCode, body: ErrorBody },
    #[error("unexpected reply from migrated (HTTP {status})")]
    Decode {
        status: StatusCode,
        #[source]
        source: serde_json::Error,
    },
}

impl ApiCallError {
    /// The API's error body, if the daemon answered with an error.
    pub fn api_error(&self) -> Option<&ErrorBody> {
        match self {
            ApiCallError::Api { body, .. } => Some(body),
            _ => None,
        }
    }
}

/// A client for one daemon.
#[derive(Clone, Debug)]
pub struct ApiClient {
    socket: PathBuf,
}

impl ApiClient {
    pub fn new(socket: impl Into<PathBuf>) -> Self {
        Self {
            socket: socket.into(),
        }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Sends one request; returns the status and body of a 2xx reply.
    async fn exchange(
        &self,
        method: Method,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(StatusCode, Bytes), ApiCallError> {
        let stream = tokio::net::UnixStream::connect(&self.socket)
            .await
            .map_err(|source| ApiCallError::Connect {
                path: self.socket.clone(),
                source,
            })?;
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(ApiCallError::Http)?;
        // The connection task ends when the exchange is over.
        tokio::spawn(async move {
            let _ = conn.await;
        });
        let req = Request::builder()
            .method(method)
            .uri(path)
            .header(header::HOST, "migrated")
            .header(header::CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body.unwrap_or_default())))
            .map_err(|e| ApiCallError::Body(e.to_string()))?;
        let resp = sender.send_request(req).await.map_err(ApiCallError::Http)?;
        let status = resp.status();
        let bytes = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
            .collect()
            .await
            .map_err(|e| ApiCallError::Body(e.to_string()))?
            .to_bytes();
        if status.is_success() {
            return Ok((status, bytes));
        }
        let body = serde_json::from_slice::<ErrorBody>(&bytes).unwrap_or_else(|_| ErrorBody {
            code: "http_error".into(),
            message: format!(
                "migrated answered HTTP {status}: {}",
                String::from_utf8_lossy(&bytes[..bytes.len().min(200)])
            ),
            hint: None,
        });
        Err(ApiCallError::Api { status, body })
    }

    async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&impl Serialize>,
    ) -> Result<T, ApiCallError> {
        let body = body
            .map(serde_json::to_vec)
            .transpose()
            .map_err(ApiCallError::Encode)?;
        let (status, bytes) = self.exchange(method, path, body).await?;
        serde_json::from_slice(&bytes).map_err(|source| ApiCallError::Decode { status, source })
    }

    /// A call without a request body.
    async fn send<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
    ) -> Result<T, ApiCallError> {
        self.call(method, path, None::<&()>).await
    }

    pub async fn health(&self) -> Result<Health, ApiCallError> {
        self.send(Method::GET, "/v1/health").await
    }

    pub async fn list_vms(&self) -> Result<Vec<Vm>, ApiCallError> {
        self.send(Method::GET, "/v1/vms").await
    }

    pub async fn get_vm(&self, name: &str) -> Result<Vm, ApiCallError> {
        self.send(Method::GET, &object("vms", name, "")).await
    }

    pub async fn create_vm(&self, spec: &VmSpec) -> Result<Vm, ApiCallError> {
        self.call(Method::POST, "/v1/vms", Some(spec)).await
    }

    pub async fn delete_vm(&self, name: &str) -> Result<(), ApiCallError> {
        self.exchange(Method::DELETE, &object("vms", name, ""), None)
            .await
            .map(|_| ())
    }

    pub async fn stop_vm(&self, name: &str) -> Result<Vm, ApiCallError> {
        self.send(Method::POST, &object("vms", name, "/stop")).await
    }

    pub async fn start_vm(&self, name: &str) -> Result<Vm, ApiCallError> {
        self.send(Method::POST, &object("vms", name, "/start"))
            .await
    }

    pub async fn create_migration(
        &self,
        req: &MigrationRequest,
    ) -> Result<MigrationRecord, ApiCallError> {
        self.call(Method::POST, "/v1/migrations", Some(req)).await
    }

    pub async fn list_migrations(&self) -> Result<Vec<MigrationRecord>, ApiCallError> {
        self.send(Method::GET, "/v1/migrations").await
    }

    pub async fn get_migration(&self, name: &str) -> Result<MigrationRecord, ApiCallError> {
        self.send(Method::GET, &object("migrations", name, ""))
            .await
    }

    pub async fn cancel_migration(&self, name: &str) -> Result<MigrationRecord, ApiCallError> {
        self.send(Method::DELETE, &object("migrations", name, ""))
            .await
    }

    /// Switches a running pre-copy migration to post-copy.
    pub async fn switch_migration(&self, name: &str) -> Result<MigrationRecord, ApiCallError> {
        self.send(Method::POST, &object("migrations", name, "/switch"))
            .await
    }

    /// Continues a post-copy migration that failed because the link broke.
    pub async fn resume_migration(&self, name: &str) -> Result<MigrationRecord, ApiCallError> {
        self.send(Method::POST, &object("migrations", name, "/resume"))
            .await
    }
}

/// The path of object `name` in `collection`, plus `action` ("" or
/// "/stop" ...).
fn object(collection: &str, name: &str, action: &str) -> String {
    format!("/v1/{collection}/{}{action}", seg(name))
}

/// Percent-encodes a path segment, so any user-typed name reaches the
/// daemon intact (and is refused there with a clear message if invalid).
fn seg(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn path_segments_are_escaped() {
        assert_eq!(super::seg("web-1"), "web-1");
        assert_eq!(super::seg("a/b c"), "a%2Fb%20c");
        assert_eq!(super::seg(".."), "..");
        assert_eq!(
            super::object("migrations", "a/b", "/switch"),
            "/v1/migrations/a%2Fb/switch"
        );
    }
}
