//! Errors of the endpoint: setting it up, dialing and accepting peers, and
//! the failures every stream of a live connection can report.
//!
//! Certificate problems are told apart by which side refused: a TLS error
//! raised by our own stack means *we* refused the peer
//! ([`ConnectError::Unauthenticated`], [`AcceptError::Unauthenticated`]); a
//! CONNECTION_CLOSE carrying a TLS alert means the *peer* refused us
//! ([`ConnectError::PeerRejected`], [`AcceptError::PeerRejected`]).

use std::net::SocketAddr;

use crate::identity::{HostName, PeerNameError};

/// QUIC transport error codes 0x100..=0x1ff carry a TLS alert (RFC 9001 §4.8).
const CRYPTO_ERROR_BASE: u64 = 0x100;

/// Setting up an endpoint failed.
#[derive(Debug, thiserror::Error)]
pub enum BindError {
    /// The UDP socket could not be created, tuned or bound.
    #[error("cannot bind udp socket on {addr}")]
    Socket {
        /// The configured listen address.
        addr: SocketAddr,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// The host's certificate, key or trust anchor was refused by rustls.
    #[error("cannot build tls configuration")]
    Tls(#[source] rustls::Error),
    /// The client-certificate verifier could not be built.
    #[error("cannot build client certificate verifier")]
    Verifier(#[source] rustls::server::VerifierBuilderError),
    /// The TLS configuration has no cipher suite usable for QUIC.
    #[error("tls configuration unusable for quic")]
    Quic(#[source] quinn::crypto::rustls::NoInitialCipherSuite),
    /// The MTU settings are out of range.
    #[error("mtu out of range")]
    Mtu(#[source] quinn::ConfigError),
    /// The keepalive window is too long for QUIC's idle timeout field.
    #[error("keepalive window out of range")]
    Keepalive(#[source] quinn::VarIntBoundsExceeded),
}

/// Dialing a peer failed.
#[derive(Debug, thiserror::Error)]
pub enum ConnectError {
    /// The connection could not even be started (bad address, endpoint closed).
    #[error("cannot dial {peer} at {addr}")]
    Start {
        /// The host we meant to reach.
        peer: HostName,
        /// Its address.
        addr: SocketAddr,
        /// What quinn reported.
        #[source]
        source: quinn::ConnectError,
    },
    /// The peer refused our certificate (unknown CA, expired, missing).
    #[error("{peer} at {addr} refused us (tls alert {alert}): {reason}")]
    PeerRejected {
        /// The host we meant to reach.
        peer: HostName,
        /// Its address.
        addr: SocketAddr,
        /// The TLS alert it sent.
        alert: u8,
        /// Its explanation, if it gave one.
        reason: String,
    },
    /// We refused the peer's certificate: not from our cluster CA, expired,
    /// or not issued for the host name we dialed.
    #[error("{peer} at {addr} failed authentication: {reason}")]
    Unauthenticated {
        /// The host we meant to reach.
        peer: HostName,
        /// Its address.
        addr: SocketAddr,
        /// Why its certificate was refused.
        reason: String,
    },
    /// The verified certificate carries no usable host name.
    #[error("{peer} at {addr} presented a certificate without host name")]
    PeerName {
        /// The host we meant to reach.
        peer: HostName,
        /// Its address.
        addr: SocketAddr,
        /// What was wrong with it.
        #[source]
        source: PeerNameError,
    },
    /// The handshake failed for another reason (timeout, protocol error).
    #[error("handshake with {peer} at {addr} failed")]
    Handshake {
        /// The host we meant to reach.
        peer: HostName,
        /// Its address.
        addr: SocketAddr,
        /// The connection-level error.
        #[source]
        source: TransportError,
    },
}

/// Accepting a peer failed. The endpoint keeps listening; call
/// [`super::Endpoint::accept`] again.
#[derive(Debug, thiserror::Error)]
pub enum AcceptError {
    /// We refused the peer's certificate (none, unknown CA, expired).
    #[error("refused peer at {addr}: {reason}")]
    Unauthenticated {
        /// Where it came from.
        addr: SocketAddr,
        /// Why its certificate was refused.
        reason: String,
    },
    /// The peer refused our certificate.
    #[error("peer at {addr} refused us (tls alert {alert}): {reason}")]
    PeerRejected {
        /// Where it came from.
        addr: SocketAddr,
        /// The TLS alert it sent.
        alert: u8,
        /// Its explanation, if it gave one.
        reason: String,
    },
    /// The verified certificate carries no usable host name.
    #[error("peer at {addr} presented a certificate without host name")]
    PeerName {
        /// Where it came from.
        addr: SocketAddr,
        /// What was wrong with it.
        #[source]
        source: PeerNameError,
    },
    /// The handshake failed for another reason.
    #[error("handshake with {addr} failed")]
    Handshake {
        /// Where it came from.
        addr: SocketAddr,
        /// The connection-level error.
        #[source]
        source: TransportError,
    },
}

/// A live connection or one of its streams failed. Every stream of every
/// migration on the connection reports the same error once the connection
/// is gone.
#[derive(Debug, Clone, thiserror::Error)]
pub enum TransportError {
    /// Nothing was heard from the peer for the whole keepalive window
    /// (interval x (count + 1)).
    #[error("peer lost: silent for the whole keepalive window")]
    PeerLost,
    /// The peer answered with a stateless reset: it restarted and forgot us.
    #[error("peer reset the connection")]
    PeerReset,
    /// The peer closed the connection.
    #[error("connection closed by peer (code {code}): {reason}")]
    ClosedByPeer {
        /// Its application or transport error code.
        code: u64,
        /// Its explanation.
        reason: String,
    },
    /// This side closed the connection.
    #[error("connection closed locally")]
    ClosedLocally,
    /// The peer reset a stream we were reading.
    #[error("stream reset by peer (code {code})")]
    StreamReset {
        /// Its error code.
        code: u64,
    },
    /// The peer stopped a stream we were writing.
    #[error("stream stopped by peer (code {code})")]
    StreamStopped {
        /// Its error code.
        code: u64,
    },
    /// A stream ended where more bytes were required.
    #[error("stream ended early")]
    StreamFinished,
    /// The stream was already finished or reset by this side.
    #[error("stream already closed")]
    StreamClosed,
    /// The peer sent a stream that does not follow the stream rules.
    #[error("bad stream from peer: {what}")]
    BadStream {
        /// What was wrong.
        what: &'static str,
    },
    /// Any other connection failure (protocol violation by the peer,
    /// version mismatch, ...).
    #[error("connection failed")]
    Connection(#[source] quinn::ConnectionError),
}

impl From<quinn::ConnectionError> for TransportError {
    fn from(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match e {
            E::TimedOut => Self::PeerLost,
            E::Reset => Self::PeerReset,
            E::LocallyClosed => Self::ClosedLocally,
            E::ApplicationClosed(close) => Self::ClosedByPeer {
                code: close.error_code.into_inner(),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            E::ConnectionClosed(close) => Self::ClosedByPeer {
                code: u64::from(close.error_code),
                reason: String::from_utf8_lossy(&close.reason).into_owned(),
            },
            other => Self::Connection(other),
        }
    }
}

impl From<quinn::WriteError> for TransportError {
    fn from(e: quinn::WriteError) -> Self {
        use quinn::WriteError as E;
        match e {
            E::Stopped(code) => Self::StreamStopped {
                code: code.into_inner(),
            },
            E::ConnectionLost(e) => e.into(),
            E::ClosedStream | E::ZeroRttRejected => Self::StreamClosed,
        }
    }
}

impl From<quinn::ReadError> for TransportError {
    fn from(e: quinn::ReadError) -> Self {
        use quinn::ReadError as E;
        match e {
            E::Reset(code) => Self::StreamReset {
                code: code.into_inner(),
            },
            E::ConnectionLost(e) => e.into(),
            E::ClosedStream | E::IllegalOrderedRead | E::ZeroRttRejected => Self::StreamClosed,
        }
    }
}

impl From<quinn::ReadExactError> for TransportError {
    fn from(e: quinn::ReadExactError) -> Self {
        match e {
            quinn::ReadExactError::FinishedEarly(_) => Self::StreamFinished,
            quinn::ReadExactError::ReadError(e) => e.into(),
        }
    }
}

impl From<quinn::ClosedStream> for TransportError {
    fn from(_: quinn::ClosedStream) -> Self {
        Self::StreamClosed
    }
}

/// How a failed handshake ended, from this side's point of view.
pub(crate) enum HandshakeFailure {
    /// Our TLS stack refused the peer.
    WeRefused { reason: String },
    /// The peer's TLS stack refused us.
    TheyRefused { alert: u8, reason: String },
    /// Anything else.
    Other(TransportError),
}

impl HandshakeFailure {
    pub(crate) fn classify(e: quinn::ConnectionError) -> Self {
        use quinn::ConnectionError as E;
        match &e {
            E::TransportError(te) => {
                if let Some(_alert) = tls_alert(u64::from(te.code)) {
                    return Self::WeRefused {
                        reason: te.reason.clone(),
                    };
                }
            }
            E::ConnectionClosed(close) => {
                if let Some(alert) = tls_alert(u64::from(close.error_code)) {
                    return Self::TheyRefused {
                        alert,
                        reason: String::from_utf8_lossy(&close.reason).into_owned(),
                    };
                }
            }
            _ => {}
        }
        Self::Other(e.into())
    }
}

fn tls_alert(code: u64) -> Option<u8> {
    code.checked_sub(CRYPTO_ERROR_BASE)
        .and_then(|alert| u8::try_from(alert).ok())
}
