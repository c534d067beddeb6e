//! A small client of etcd's v3 JSON gateway (grpc-gateway in front of the
//! gRPC API): `POST /v3/kv/range` etc. with JSON bodies over HTTP/1.1,
//! optionally TLS with a client certificate. We use it instead of the gRPC
//! client because that needs `protoc` at build time.
//!
//! Gateway quirks this module absorbs (etcd 3.4):
//! * keys and values are base64; int64 fields are JSON strings;
//! * fields at their default (0, false, "", PUT) are left out of replies;
//! * a failed txn compare is `succeeded` missing, not `false`;
//! * `lease/keepalive` is a gRPC stream: one POST sends one keepalive and
//!   gets one `{"result": ...}`; an unknown or expired lease answers 200
//!   with `TTL` missing (0), not an error;
//! * `watch` answers with newline-delimited `{"result": ...}` objects for
//!   as long as the connection lives; the first one only confirms
//!   `created`; a compacted start revision comes back `canceled` with
//!   `compact_revision`;
//! * errors are `{"error", "message", "code"}` with the gRPC code, and the
//!   HTTP status mapped from it.
//!
//! Connections are kept in a small idle pool (unary calls) or dedicated
//! (each watch owns one). Endpoints are tried in order, starting with the
//! last one that worked.

use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Bytes, Incoming};
use hyper::client::conn::http1::SendRequest;
use hyper::header::{CONTENT_TYPE, HOST};
use hyper::{Request, StatusCode};
use hyper_util::rt::TokioIo;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

pub(crate) use super::wire::{
    Compare, DeleteRangeRequest, DeleteRangeResponse, EventType, KeyValue, PutRequest, PutResponse,
    RangeRequest, RangeResponse, RequestOp, TxnRequest, TxnResponse, WatchCreateRequest,
    WatchResponse,
};
use super::wire::{
    LeaseGrantResponse, LeaseKeepAliveResponse, LeaseRequest, StreamEnvelope, WatchRequest,
};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tracing::debug;

/// Largest unary reply read (a range over every policy and host fits).
const MAX_REPLY_BYTES: usize = 16 << 20;
/// Largest single watch message buffered.
const MAX_WATCH_LINE: usize = 16 << 20;
/// Idle connections kept for reuse.
const MAX_IDLE: usize = 8;

/// A gateway call that failed, or a gateway that cannot be set up.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    #[error("no etcd endpoints configured")]
    NoEndpoints,
    #[error("etcd endpoint {endpoint:?} is invalid: {reason}")]
    BadEndpoint {
        endpoint: String,
        reason: &'static str,
    },
    #[error("https endpoint {endpoint} needs the etcd CA certificate (`ca`)")]
    NoCa { endpoint: String },
    #[error("etcd client `cert` and `key` must be given together")]
    CertWithoutKey,
    #[error("cannot read PEM file {path}")]
    ReadPem {
        path: PathBuf,
        #[source]
        source: rustls::pki_types::pem::Error,
    },
    #[error("invalid TLS setup for etcd")]
    Tls(#[source] rustls::Error),
    #[error("cannot connect to etcd at {endpoint}")]
    Connect {
        endpoint: String,
        #[source]
        source: std::io::Error,
    },
    #[error("http exchange with etcd at {endpoint} failed")]
    Http {
        endpoint: String,
        #[source]
        source: hyper::Error,
    },
    #[error("etcd at {endpoint} did not answer within {timeout:?}")]
    Timeout { endpoint: String, timeout: Duration },
    #[error("etcd refused {path}: {message} (grpc code {code})")]
    Status {
        path: &'static str,
        code: i32,
        message: String,
    },
    #[error("etcd reply to {path} does not parse")]
    Decode {
        path: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("etcd reply to {path} is larger than {max} bytes")]
    TooLarge { path: &'static str, max: usize },
}

impl GatewayError {
    /// True when etcd could not be reached or did not answer, as opposed
    /// to answering "no". gRPC 14 is UNAVAILABLE, 4 DEADLINE_EXCEEDED.
    pub fn is_unreachable(&self) -> bool {
        match self {
            Self::Connect { .. } | Self::Http { .. } | Self::Timeout { .. } => true,
            Self::Status { code, .. } => matches!(code, 4 | 14),
            _ => false,
        }
    }
}

/// Where etcd listens, parsed once.
#[derive(Debug, Clone)]
struct Endpoint {
    url: String,
    host: String,
    port: u16,
    authority: String,
    tls: bool,
}

impl Endpoint {
    /// `http://host:port`, `https://host:port`, or bare `host:port` (https
    /// when a CA is configured, as etcdctl does).
    fn parse(s: &str, default_tls: bool) -> Result<Self, GatewayError> {
        let bad = |reason| GatewayError::BadEndpoint {
            endpoint: s.into(),
            reason,
        };
        let (tls, rest) = if let Some(r) = s.strip_prefix("https://") {
            (true, r)
        } else if let Some(r) = s.strip_prefix("http://") {
            (false, r)
        } else if s.contains("://") {
            return Err(bad("use http:// or https://"));
        } else {
            (default_tls, s)
        };
        let authority = rest.trim_end_matches('/');
        if authority.contains('/') {
            return Err(bad("an endpoint has no path"));
        }
        let (host, port) = authority
            .rsplit_once(':')
            .ok_or_else(|| bad("missing :port"))?;
        let port: u16 = port.parse().map_err(|_| bad("bad port"))?;
        let host = host.trim_start_matches('[').trim_end_matches(']');
        if host.is_empty() || port == 0 {
            return Err(bad("missing host or port"));
        }
        Ok(Self {
            url: format!("{}://{authority}", if tls { "https" } else { "http" }),
            host: host.into(),
            port,
            authority: authority.into(),
            tls,
        })
    }
}

/// Client certificates for TLS to etcd (all PEM).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
}

fn tls_connector(files: &TlsFiles) -> Result<Option<tokio_rustls::TlsConnector>, GatewayError> {
    let Some(ca) = &files.ca else {
        if files.cert.is_some() || files.key.is_some() {
            return Err(GatewayError::NoCa {
                endpoint: "(all)".into(),
            });
        }
        return Ok(None);
    };
    let pem_err = |path: &PathBuf| {
        let path = path.clone();
        move |source| GatewayError::ReadPem { path, source }
    };
    let mut roots = rustls::RootCertStore::empty();
    for cert in CertificateDer::pem_file_iter(ca).map_err(pem_err(ca))? {
        roots
            .add(cert.map_err(pem_err(ca))?)
            .map_err(GatewayError::Tls)?;
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(GatewayError::Tls)?
        .with_root_certificates(roots);
    let mut config = match (&files.cert, &files.key) {
        (Some(cert), Some(key)) => {
            let chain = CertificateDer::pem_file_iter(cert)
                .map_err(pem_err(cert))?
                .collect::<Result<Vec<_>, _>>()
                .map_err(pem_err(cert))?;
            let key = PrivateKeyDer::from_pem_file(key).map_err(pem_err(key))?;
            builder
                .with_client_auth_cert(chain, key)
                .map_err(GatewayError::Tls)?
        }
        (None, None) => builder.with_no_client_auth(),
        _ => return Err(GatewayError::CertWithoutKey),
    };
    // etcd serves gRPC (h2) and the gateway on one port; ask for HTTP/1.1.
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(Some(tokio_rustls::TlsConnector::from(Arc::new(config))))
}

type Sender = SendRequest<Full<Bytes>>;

/// The client. Shared by `Arc`.
pub(crate) struct Gateway {
    endpoints: Vec<Endpoint>,
    tls: Option<tokio_rustls::TlsConnector>,
    idle: Mutex<Vec<(usize, Sender)>>,
    preferred: AtomicUsize,
    timeout: Duration,
}

impl std::fmt::Debug for Gateway {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let urls: Vec<_> = self.endpoints.iter().map(|e| e.url.as_str()).collect();
        f.debug_struct("Gateway").field("endpoints", &urls).finish()
    }
}

async fn handshake<T>(io: T, endpoint: &str) -> Result<Sender, GatewayError>
where
    T: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|source| GatewayError::Http {
            endpoint: endpoint.into(),
            source,
        })?;
    let endpoint = endpoint.to_owned();
    tokio::spawn(async move {
        if let Err(error) = conn.await {
            debug!(%endpoint, %error, "etcd connection ended");
        }
    });
    Ok(sender)
}

impl Gateway {
    /// `timeout` bounds connecting and each unary call (a watch's headers
    /// too, not its body).
    pub(crate) fn new(
        endpoints: &[String],
        tls: &TlsFiles,
        timeout: Duration,
    ) -> Result<Self, GatewayError> {
        if endpoints.is_empty() {
            return Err(GatewayError::NoEndpoints);
        }
        let connector = tls_connector(tls)?;
        let endpoints = endpoints
            .iter()
            .map(|e| Endpoint::parse(e, connector.is_some()))
            .collect::<Result<Vec<_>, _>>()?;
        if connector.is_none() {
            if let Some(e) = endpoints.iter().find(|e| e.tls) {
                return Err(GatewayError::NoCa {
                    endpoint: e.url.clone(),
                });
            }
        }
        Ok(Self {
            endpoints,
            tls: connector,
            idle: Mutex::new(Vec::new()),
            preferred: AtomicUsize::new(0),
            timeout,
        })
    }

    async fn connect_one(&self, idx: usize) -> Result<Sender, GatewayError> {
        let ep = &self.endpoints[idx];
        let timeout_err = || GatewayError::Timeout {
            endpoint: ep.url.clone(),
            timeout: self.timeout,
        };
        let connect = async {
            let tcp = TcpStream::connect((ep.host.as_str(), ep.port))
                .await
                .map_err(|source| GatewayError::Connect {
                    endpoint: ep.url.clone(),
                    source,
                })?;
            let _ = tcp.set_nodelay(true);
            match (&self.tls, ep.tls) {
                (Some(tls), true) => {
                    let name = ServerName::try_from(ep.host.clone()).map_err(|_| {
                        GatewayError::BadEndpoint {
                            endpoint: ep.url.clone(),
                            reason: "host is not a valid TLS server name",
                        }
                    })?;
                    let stream =
                        tls.connect(name, tcp)
                            .await
                            .map_err(|source| GatewayError::Connect {
                                endpoint: ep.url.clone(),
                                source,
                            })?;
                    handshake(stream, &ep.url).await
                }
                _ => handshake(tcp, &ep.url).await,
            }
        };
        tokio::time::timeout(self.timeout, connect)
            .await
            .map_err(|_| timeout_err())?
    }

    /// A new connection to the first endpoint that answers, starting with
    /// the one that worked last.
    async fn connect(&self) -> Result<(usize, Sender), GatewayError> {
        let n = self.endpoints.len();
        let first = self.preferred.load(Ordering::Relaxed) % n;
        let mut last_err = None;
        for i in 0..n {
            let idx = (first + i) % n;
            match self.connect_one(idx).await {
                Ok(s) => {
                    self.preferred.store(idx, Ordering::Relaxed);
                    return Ok((idx, s));
                }
                Err(e) => last_err = Some(e),
            }
        }
        Err(last_err.expect("at least one endpoint"))
    }

    /// An idle pooled connection that is still open, or a new one.
    async fn checkout(&self) -> Result<(usize, Sender), GatewayError> {
        loop {
            let next = self.idle.lock().unwrap_or_else(|p| p.into_inner()).pop();
            let Some((idx, mut sender)) = next else {
                return self.connect().await;
            };
            if !sender.is_closed() && sender.ready().await.is_ok() {
                return Ok((idx, sender));
            }
        }
    }

    fn checkin(&self, idx: usize, sender: Sender) {
        let mut idle = self.idle.lock().unwrap_or_else(|p| p.into_inner());
        if idle.len() < MAX_IDLE {
            idle.push((idx, sender));
        }
    }

    fn request(&self, idx: usize, path: &'static str, body: Vec<u8>) -> Request<Full<Bytes>> {
        Request::post(path)
            .header(HOST, &self.endpoints[idx].authority)
            .header(CONTENT_TYPE, "application/json")
            .body(Full::new(Bytes::from(body)))
            .expect("a static path and valid headers make a valid request")
    }

    /// One unary call: `path` with `req` as JSON, the reply parsed as `R`.
    pub(crate) async fn call<Q: Serialize, R: DeserializeOwned>(
        &self,
        path: &'static str,
        req: &Q,
    ) -> Result<R, GatewayError> {
        let body = serde_json::to_vec(req).expect("gateway requests serialize");
        let exchange = async {
            let (idx, mut sender) = self.checkout().await?;
            let endpoint = &self.endpoints[idx].url;
            let http_err = |source| GatewayError::Http {
                endpoint: endpoint.clone(),
                source,
            };
            let resp = sender
                .send_request(self.request(idx, path, body))
                .await
                .map_err(http_err)?;
            let status = resp.status();
            let bytes = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map_err(|e| match e.downcast::<hyper::Error>() {
                    Ok(source) => http_err(*source),
                    Err(_) => GatewayError::TooLarge {
                        path,
                        max: MAX_REPLY_BYTES,
                    },
                })?
                .to_bytes();
            self.checkin(idx, sender);
            Ok::<_, GatewayError>((idx, status, bytes))
        };
        let (idx, status, bytes) = tokio::time::timeout(self.timeout, exchange)
            .await
            .map_err(|_| GatewayError::Timeout {
                endpoint: self.endpoints[self.preferred.load(Ordering::Relaxed)]
                    .url
                    .clone(),
                timeout: self.timeout,
            })??;
        let _ = idx;
        if !status.is_success() {
            return Err(status_error(path, status, &bytes));
        }
        serde_json::from_slice(&bytes).map_err(|source| GatewayError::Decode { path, source })
    }

    /// Opens a watch on its own connection.
    pub(crate) async fn watch(
        &self,
        req: &WatchCreateRequest,
    ) -> Result<WatchStream, GatewayError> {
        const PATH: &str = "/v3/watch";
        let body = serde_json::to_vec(&WatchRequest {
            create_request: req,
        })
        .expect("watch requests serialize");
        let open = async {
            let (idx, mut sender) = self.connect().await?;
            let resp = sender
                .send_request(self.request(idx, PATH, body))
                .await
                .map_err(|source| GatewayError::Http {
                    endpoint: self.endpoints[idx].url.clone(),
                    source,
                })?;
            Ok::<_, GatewayError>((idx, resp))
        };
        let (idx, resp) = tokio::time::timeout(self.timeout, open)
            .await
            .map_err(|_| GatewayError::Timeout {
                endpoint: self.endpoints[self.preferred.load(Ordering::Relaxed)]
                    .url
                    .clone(),
                timeout: self.timeout,
            })??;
        let status = resp.status();
        if !status.is_success() {
            let bytes = Limited::new(resp.into_body(), MAX_REPLY_BYTES)
                .collect()
                .await
                .map(|b| b.to_bytes())
                .unwrap_or_default();
            return Err(status_error(PATH, status, &bytes));
        }
        Ok(WatchStream {
            endpoint: self.endpoints[idx].url.clone(),
            body: resp.into_body(),
            buf: Vec::new(),
        })
    }

    pub(crate) async fn range(&self, r: &RangeRequest) -> Result<RangeResponse, GatewayError> {
        self.call("/v3/kv/range", r).await
    }

    pub(crate) async fn put(&self, r: &PutRequest) -> Result<PutResponse, GatewayError> {
        self.call("/v3/kv/put", r).await
    }

    pub(crate) async fn delete_range(
        &self,
        r: &DeleteRangeRequest,
    ) -> Result<DeleteRangeResponse, GatewayError> {
        self.call("/v3/kv/deleterange", r).await
    }

    pub(crate) async fn txn(&self, r: &TxnRequest) -> Result<TxnResponse, GatewayError> {
        self.call("/v3/kv/txn", r).await
    }

    /// Grants a lease; returns its id and the TTL etcd gave (it may raise
    /// a TTL below its minimum).
    pub(crate) async fn lease_grant(&self, ttl_secs: i64) -> Result<(i64, i64), GatewayError> {
        let r: LeaseGrantResponse = self
            .call(
                "/v3/lease/grant",
                &LeaseRequest {
                    ttl: ttl_secs,
                    id: 0,
                },
            )
            .await?;
        if !r.error.is_empty() {
            return Err(GatewayError::Status {
                path: "/v3/lease/grant",
                code: 0,
                message: r.error,
            });
        }
        Ok((r.id, r.ttl))
    }

    /// One keepalive; the remaining TTL, 0 if the lease is gone.
    pub(crate) async fn lease_keepalive(&self, id: i64) -> Result<i64, GatewayError> {
        let r: StreamEnvelope<LeaseKeepAliveResponse> = self
            .call("/v3/lease/keepalive", &LeaseRequest { ttl: 0, id })
            .await?;
        match (r.result, r.error) {
            (Some(res), _) => Ok(res.ttl),
            (None, e) => Err(GatewayError::Status {
                path: "/v3/lease/keepalive",
                code: 0,
                message: e.map(|v| v.to_string()).unwrap_or_default(),
            }),
        }
    }

    pub(crate) async fn lease_revoke(&self, id: i64) -> Result<(), GatewayError> {
        let _: serde_json::Value = self
            .call("/v3/lease/revoke", &LeaseRequest { ttl: 0, id })
            .await?;
        Ok(())
    }
}

fn status_error(path: &'static str, status: StatusCode, bytes: &[u8]) -> GatewayError {
    #[derive(Deserialize, Default)]
    #[serde(default)]
    struct ErrorBody {
        message: String,
        error: String,
        code: i32,
    }
    let body: ErrorBody = serde_json::from_slice(bytes).unwrap_or_default();
    let message = if !body.message.is_empty() {
        body.message
    } else if !body.error.is_empty() {
        body.error
    } else {
        format!("http status {status}")
    };
    GatewayError::Status {
        path,
        code: body.code,
        message,
    }
}

/// An open watch: newline-delimited JSON messages.
pub(crate) struct WatchStream {
    endpoint: String,
    body: Incoming,
    buf: Vec<u8>,
}

impl WatchStream {
    /// The next message; `None` when etcd closed the stream.
    pub(crate) async fn next(&mut self) -> Result<Option<WatchResponse>, GatewayError> {
        const PATH: &str = "/v3/watch";
        loop {
            if let Some(pos) = self.buf.iter().position(|b| *b == b'\n') {
                let line: Vec<u8> = self.buf.drain(..=pos).collect();
                if line.iter().all(u8::is_ascii_whitespace) {
                    continue;
                }
                let msg: StreamEnvelope<WatchResponse> = serde_json::from_slice(&line)
                    .map_err(|source| GatewayError::Decode { path: PATH, source })?;
                return match (msg.result, msg.error) {
                    (Some(r), _) => Ok(Some(r)),
                    (None, e) => Err(GatewayError::Status {
                        path: PATH,
                        code: e
                            .as_ref()
                            .and_then(|v| v.get("grpc_code"))
                            .and_then(|c| c.as_i64())
                            .unwrap_or(0) as i32,
                        message: e.map(|v| v.to_string()).unwrap_or_default(),
                    }),
                };
            }
            match self.body.frame().await {
                None => return Ok(None),
                Some(Err(source)) => {
                    return Err(GatewayError::Http {
                        endpoint: self.endpoint.clone(),
                        source,
                    })
                }
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        self.buf.extend_from_slice(&data);
                        if self.buf.len() > MAX_WATCH_LINE {
                            return Err(GatewayError::TooLarge {
                                path: PATH,
                                max: MAX_WATCH_LINE,
                            });
                        }
                    }
                }
            }
        }
    }
}

/// The first key after every key that starts with `prefix` (etcd's
/// `range_end` for a prefix query).
pub(crate) fn prefix_end(prefix: &[u8]) -> Vec<u8> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return end;
        }
    }
    // All 0xff (or empty): to the end of the keyspace.
    vec![0]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        let e = Endpoint::parse("http://127.0.0.1:2379", false).unwrap();
        assert_eq!((e.host.as_str(), e.port, e.tls), ("127.0.0.1", 2379, false));
        let e = Endpoint::parse("[::1]:2379", true).unwrap();
        assert_eq!((e.host.as_str(), e.tls), ("::1", true));
        assert_eq!(e.url, "https://[::1]:2379");
        for bad in [
            "etcd",
            "grpc://a:1",
            "http://a:0",
            "http://a:1/v3",
            "http://:1",
        ] {
            assert!(Endpoint::parse(bad, false).is_err(), "{bad}");
        }
    }

    #[test]
    fn prefix_end_is_the_next_key() {
        assert_eq!(prefix_end(b"/a/"), b"/a0");
        assert_eq!(prefix_end(b"a\xff"), b"b");
        assert_eq!(prefix_end(b""), b"\0");
    }
}
